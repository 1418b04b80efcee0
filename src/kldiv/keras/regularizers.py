"""The sparse-autoencoder penalty as a Keras regularizer, done with the Bernoulli KL per unit."""

from __future__ import annotations

import functools
import math
from typing import Any

import keras

from .. import _check
from ..distributions import bernoulli_kl


@keras.saving.register_keras_serializable(package="kldiv")
class KLSparsityRegularizer(keras.regularizers.Regularizer):
    """``weight · Σ_units KL(Bernoulli(target) ‖ Bernoulli(ρ̂_unit))``, ρ̂ = mean activation.

    Use as ``activity_regularizer=`` of a layer whose activations lie in [0, 1] (sigmoid): ρ̂ is
    the mean of each unit over the batch (every axis but the last), and the penalty pushes it
    towards ``target``. The usual Keras recipe computes the same Bernoulli KL by calling
    ``keras.losses.kl_divergence`` twice, on ρ and on 1 − ρ; here it is one call to
    :func:`kldiv.distributions.bernoulli_kl`, exact at the boundary: a unit that never fires
    (ρ̂ = 0) or always fires (ρ̂ = 1) gives +inf, where the recipe's 1e-7 clipping reports
    a finite 0.6 and hides it. Gradients are finite for ρ̂ in (0, 1).

    The penalty does not depend on the batch size. Keras (3.14 and later) divides what an
    activity regularizer returns by the batch size, which suits penalties summed over the
    batch (L1, L2) but would weaken this one, already a function of the batch mean, by 1/B:
    as an activity regularizer (input ``[B, ..., units]``) the value is multiplied by B where
    the installed Keras divides, so the loss Keras adds is ``weight · Σ KL`` at every batch
    size. On a 1-D input (a bias, as ``bias_regularizer``) nothing is rescaled.

    Under a float16 mixed-precision policy a sigmoid saturates to exactly 1.0 from inputs of
    about 7.6, so ρ̂ = 1 and the penalty is +inf far sooner than in float32: keep the
    regularized layer in float32 (``dtype="float32"``).
    """

    def __init__(self, target: float = 0.05, weight: float = 0.01) -> None:
        self.target = _check.check_unit_interval("target", target)
        if not _check.is_real(weight) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"Expected `weight` to be a finite float >= 0, got {weight!r}.")
        self.weight = float(weight)

    def __call__(self, x: Any) -> Any:
        # A layer's bias or kernel arrives as a keras.Variable, which convert_to_tensor
        # returns unchanged on TensorFlow; copy reads its value into a backend tensor.
        x = keras.ops.copy(x)
        axes = tuple(range(len(x.shape) - 1))
        rho_hat = keras.ops.mean(x, axis=axes) if axes else x
        penalty = self.weight * keras.ops.sum(bernoulli_kl(self.target, rho_hat))
        if axes and _keras_divides_activity_losses():
            penalty = penalty * keras.ops.cast(keras.ops.shape(x)[0], penalty.dtype)
        return penalty

    def get_config(self) -> dict[str, Any]:
        return {"target": self.target, "weight": self.weight}


@functools.cache
def _keras_divides_activity_losses() -> bool:
    """Whether the installed Keras divides activity-regularizer losses by the batch size
    (keras-team/keras#22021, Keras 3.14): asked of Keras itself, once, with a regularizer
    that returns 1 on a batch of 4."""

    class One(keras.regularizers.Regularizer):
        def __call__(self, x: Any) -> Any:
            return keras.ops.convert_to_tensor(1.0)

    layer = keras.layers.Activation("linear", activity_regularizer=One())
    layer(keras.ops.ones((4, 1)))
    return abs(float(keras.ops.convert_to_numpy(layer.losses[0])) - 0.25) < 1e-6
