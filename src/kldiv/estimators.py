"""Monte-Carlo estimators of KL(P‖Q) from samples x ~ P: k1, k2, k3, importance-weighted and
straight-through forms, as used for the KL penalty of PPO, GRPO and RLHF trainers.

Inputs are per-sample log-probabilities ``log_p = log P(x)`` and ``log_q = log Q(x)`` of the
same samples (in RL: P the policy being trained, Q the frozen reference, x the sampled
tokens; shapes such as ``(batch, tokens)``). With the log-ratio ``ℓ = log_q − log_p`` and
``r = e^ℓ = Q(x)/P(x)``:

==========  ===========================  =======================  ===============================
estimator   per-sample value             bias of the value        expected gradient (x fixed)
==========  ===========================  =======================  ===============================
``k1``      ``−ℓ``                       unbiased                 0 — ``E_P[∇ log P] = 0``
``k2``      ``½ ℓ²``                     biased (agrees with KL   ``∇ KL(P‖Q)`` — unbiased
                                         to 2nd order near P = Q;
                                         above or below it)
``k3``      ``r − 1 − ℓ`` (≥ 0)          unbiased when Q's        ``∇ KL(Q‖P)`` — the *reverse*
                                         support is inside P's    KL's gradient
==========  ===========================  =======================  ===============================

The gradient column is for ``log_p`` differentiable and the samples held fixed, which is how
trainers use these as losses (no score-function term): ``∇k1 = ∇log P``,
``∇k2 = (log P − log Q)∇log P`` and ``∇k3 = (1 − r)∇log P``, whose expectations under P are
0, ∇KL(P‖Q) and −E_Q[∇log P] = ∇KL(Q‖P). So k3's value is unbiased for KL(P‖Q) with low
variance, but its gradient, as a loss, is that of the reverse KL (the GRPO choice); k2's
gradient is the forward KL's. ``grad_estimator=`` combines them: the value of one estimator
with the gradient of another (straight-through: ``value + g − stop_gradient(g)``), e.g.
``estimator="k3", grad_estimator="k2"`` reports an unbiased KL value and follows an unbiased
forward-KL gradient.

``log_sampling=``: the samples were drawn from another distribution S (the behaviour or old
policy), not P. Each value is multiplied by the importance weight ``w = P(x)/S(x)``, which
makes the value unbiased for samples from S, and, since ``w`` is differentiable in
``log_p``, adds the score-function term: with ``log_sampling = stop_gradient(log_p)`` the
gradient of the k1 estimate becomes ``(log P − log Q + 1)∇log P``, whose expectation is the
exact ∇KL(P‖Q).

Masking happens before any ``exp``: masked positions (padding) are replaced by a log-ratio of
0 first, so garbage there (``-inf``, NaN, ``±1e30``) reaches neither the value nor the
gradient, and ``reduction="mean"`` averages over unmasked positions only (``num_items=``
replaces the denominator, e.g. with the global token count). Unmasked ``log_q = -inf``
(Q gives a sample zero probability) is a true +inf KL and stays +inf.

Clamping, off by default, matches what RL trainers do for stability: ``clamp_log_ratio=c``
clamps ℓ to [−c, c] before ``exp`` (verl uses 20), ``clamp_value=c`` clamps the per-sample
estimate to [−c, c] (verl's ``low_var_kl`` uses 10). Clamping biases the estimate and zeroes
the gradient where it is active; it is never applied silently.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, get_args

import numpy as np

from . import _check
from . import _namespace as ns
from ._defaults import REDUCTION, Estimator, Reduction
from ._reduce import reduce

Array = Any

__all__ = ["ESTIMATORS", "kl_estimate", "k1", "k2", "k3"]

ESTIMATORS: tuple[Estimator, ...] = get_args(Estimator)
"""The names that ``kl_estimate(..., estimator=, grad_estimator=)`` accepts."""


def _clamp(xp: Any, x: Array, c: float | None) -> Array:
    if c is None:
        return x
    return xp.clip(x, -c, c)


def _per_sample(xp: Any, name: str, log_ratio: Array, clamp_value: float | None) -> Array:
    """The estimator's per-sample value from ``ℓ = log Q(x) − log P(x)``, clamped if asked."""
    if name == "k1":
        value = 0.0 - log_ratio  # not -ℓ, which would print a zero ratio as -0.0
    elif name == "k2":
        value = 0.5 * log_ratio * log_ratio
    else:
        if clamp_value is not None:
            # Where a clamped k3 sits at its bound anyway, cap ℓ first (k3 at ℓ = log(2c + 2)
            # already exceeds c), so that the clamp's zero gradient is not multiplied by an
            # overflowing e^ℓ = inf, which would give NaN.
            cap = math.log(2 * clamp_value + 2)
            log_ratio = xp.where(log_ratio > cap, cap, log_ratio)
        # e^ℓ − 1 − ℓ through expm1: exactly 0 at ℓ = 0 and ≥ 0 in floating point (exp(ℓ) − 1
        # cancels badly for small ℓ). Beyond the dtype's range it is a true +inf.
        value = xp.expm1(log_ratio) - log_ratio
    return _clamp(xp, value, clamp_value)


def _check_estimator(name: str, value: Any, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if value not in ESTIMATORS:
        raise ValueError(f"Expected `{name}` to be one of 'k1', 'k2', 'k3', got {value!r}.")
    return value


def _check_clamp(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if not _check.is_real(value) or not float(value) > 0:
        raise ValueError(f"Expected `{name}` to be a positive float or None, got {value!r}.")
    return float(value)


def kl_estimate(
    log_p: Array,
    log_q: Array,
    *,
    estimator: Estimator = "k3",
    grad_estimator: Estimator | None = None,
    log_sampling: Array | None = None,
    mask: Array | None = None,
    reduction: Reduction = REDUCTION,
    num_items: Any = None,
    clamp_log_ratio: float | None = None,
    clamp_value: float | None = None,
) -> Array:
    """Monte-Carlo estimate of KL(P‖Q) from log-probabilities of samples x ~ P.

    See the module docstring for the value and gradient bias of each estimator.

    Parameters
    ----------
    log_p, log_q : array
        ``log P(x)`` and ``log Q(x)`` per sample, same (broadcastable) shape; NumPy, PyTorch
        or JAX, one framework. Half precision is computed in float32.
    estimator : {"k3", "k1", "k2"}
        Whose value is returned (default ``"k3"``: unbiased, non-negative, low variance).
    grad_estimator : "k1", "k2" or "k3", optional
        Whose gradient is followed (straight-through); default: the same as ``estimator``.
    log_sampling : array, optional
        ``log S(x)`` when the samples came from S rather than P: values are weighted by
        ``P(x)/S(x)`` (differentiable in ``log_p``).
    mask : bool or 0/1 integer array, optional
        False (or 0) marks padding: excluded from the value, the mean's denominator and the
        gradient, applied before any ``exp``. Broadcastable to the shape of the inputs.
        Integer masks such as Hugging Face's ``attention_mask`` mean ``mask != 0``; values
        other than 0 and 1 raise ``ValueError`` naming the first one, checked eagerly only
        (under ``jax.jit``, ``vmap`` or ``torch.compile`` any non-zero value keeps the sample).
        Float masks raise ``TypeError``; to weight samples, multiply the ``"none"`` result.
    reduction : {"mean", "sum", "none"}
        Mean over unmasked samples (default), sum, or per-sample values (masked ones 0).
    num_items : float or 0-d array, optional
        Replaces the denominator of ``"mean"`` (e.g. the global token count).
    clamp_log_ratio, clamp_value : float, optional
        Clamp ``log Q − log P`` to [−c, c] before ``exp``, and the per-sample estimate to
        [−c, c]. Off by default.

    Returns
    -------
    array
        0-d for ``"mean"``/``"sum"``, else the broadcast shape of the inputs.

    Examples
    --------
    >>> import numpy as np
    >>> log_p = np.log(np.array([0.5, 0.25, 0.25]))
    >>> log_q = np.log(np.array([0.25, 0.5, 0.25]))
    >>> print(np.round(kl_estimate(log_p, log_q, estimator="k1", reduction="none"), 4))
    [ 0.6931 -0.6931  0.    ]
    """
    estimator = _check_estimator("estimator", estimator)
    grad_estimator = _check_estimator("grad_estimator", grad_estimator, allow_none=True)
    reduction = _check.check_reduction(reduction)
    num_items = _check.check_num_items(num_items, reduction)
    clamp_log_ratio = _check_clamp("clamp_log_ratio", clamp_log_ratio)
    clamp_value = _check_clamp("clamp_value", clamp_value)
    xp, (log_p, log_q, log_s, mask) = ns.namespace(
        log_p, log_q, log_sampling, mask, names=("log_p", "log_q", "log_sampling", "mask")
    )
    dtype = ns.compute_dtype(xp, ("log_p", log_p), ("log_q", log_q), ("log_sampling", log_s))
    shapes = [tuple(a.shape) for a in (log_p, log_q, log_s) if a is not None]
    batch = _check.broadcast(shapes, "`log_p`, `log_q` and `log_sampling`")
    if num_items is not None and not isinstance(num_items, float):
        num_items = xp.astype(num_items, dtype)
    log_p, log_q = xp.astype(log_p, dtype), xp.astype(log_q, dtype)
    if mask is not None:
        mask = _check.as_mask("mask", mask, batch)
        # before anything else: padded positions become ℓ = 0 (and w = 1) with zero gradient
        log_p = xp.where(mask, log_p, 0.0)
        log_q = xp.where(mask, log_q, 0.0)
    log_ratio = _clamp(xp, log_q - log_p, clamp_log_ratio)
    quiet = np.errstate(over="ignore") if ns.backend_name(xp) == "numpy" else nullcontext()
    with quiet:
        value = _per_sample(xp, estimator, log_ratio, clamp_value)
        if grad_estimator is not None and grad_estimator != estimator:
            # The gradient-only term g − stop_gradient(g) is 0 in value; where g overflows
            # (an unclamped k3 with e^ℓ beyond the dtype) it is dropped, with its gradient,
            # rather than turning the value into inf − inf = NaN.
            over = log_ratio > math.log(float(xp.finfo(dtype).max))
            if grad_estimator != "k3" or clamp_value is not None:
                over = xp.zeros_like(over)
            g = _per_sample(xp, grad_estimator, xp.where(over, 0.0, log_ratio), clamp_value)
            value = ns.stop_gradient(xp, value) + xp.where(over, 0.0, g - ns.stop_gradient(xp, g))
        if log_s is not None:
            log_s = xp.astype(log_s, dtype)
            if mask is not None:
                log_s = xp.where(mask, log_s, log_p)
            value = value * xp.exp(log_p - log_s)
    value = xp.broadcast_to(value, batch)
    return reduce(xp, value, batch, reduction=reduction, mask=mask, num_items=num_items)


def k1(log_p: Array, log_q: Array, **kwargs: Any) -> Array:
    """``log P(x) − log Q(x)``: unbiased for KL(P‖Q), high variance, can be negative per sample;
    its gradient as a loss (samples fixed) is zero in expectation. Keywords of
    :func:`kl_estimate`."""
    return kl_estimate(log_p, log_q, estimator="k1", **kwargs)


def k2(log_p: Array, log_q: Array, **kwargs: Any) -> Array:
    """``½(log P(x) − log Q(x))²``: biased value (exact to second order as Q → P), low
    variance, ≥ 0; its gradient as a loss is unbiased for ∇KL(P‖Q). Keywords of
    :func:`kl_estimate`."""
    return kl_estimate(log_p, log_q, estimator="k2", **kwargs)


def k3(log_p: Array, log_q: Array, **kwargs: Any) -> Array:
    """``r − 1 − log r`` with ``r = Q(x)/P(x)``: unbiased for KL(P‖Q) when Q's support lies
    inside P's, low variance, ≥ 0 per sample; its gradient as a loss is unbiased for the
    reverse KL's, ∇KL(Q‖P). Keywords of :func:`kl_estimate`."""
    return kl_estimate(log_p, log_q, estimator="k3", **kwargs)
