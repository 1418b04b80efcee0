"""``keras.losses.Loss`` subclasses for the divergence family.

``loss(y_true, y_pred)`` is D(y_true‖y_pred): the target first, as everywhere in Keras and in
kldiv. Each sample's divergence comes from the core (``reduction="none"``); Keras then applies
``sample_weight`` and its own ``reduction`` (default ``"sum_over_batch_size"``: the mean over
samples, the core's ``"mean"``). Configuration (``form``, ``axis``, ``temperature``,
``softcap``/``logit_scale``, ``beta``/``alpha``) is validated at construction and round-trips
through ``get_config``/``from_config``, so models compiled with these losses save and load.
"""

from __future__ import annotations

from typing import Any

import keras

from .. import _check
from .._defaults import AXIS, FORM, TEMPERATURE, FormSpec, KerasReduction, Kind
from .._kinds import KIND_PARAMS
from ..divergences import KINDS

__all__ = [
    "Divergence",
    "KLDivergence",
    "ReverseKLDivergence",
    "JSDivergence",
    "SkewKLDivergence",
    "SkewReverseKLDivergence",
    "SymmetricKLDivergence",
    "TVDistance",
]


@keras.saving.register_keras_serializable(package="kldiv")
class Divergence(keras.losses.Loss):
    """Any divergence of the family by name: ``Divergence("js", beta=0.3, form="logits")``.

    ``call(y_true, y_pred)`` returns ``kldiv.divergence(y_true, y_pred, kind, ...,
    reduction="none")``, one value per sample; see :func:`kldiv.divergence` and the function
    of each kind for the formula, forms, shapes and gradients.
    """

    def __init__(
        self,
        kind: Kind = "kl",
        *,
        form: FormSpec = FORM,
        axis: int = AXIS,
        temperature: float = TEMPERATURE,
        softcap: Any = None,
        logit_scale: Any = None,
        reduction: KerasReduction | None = "sum_over_batch_size",
        name: str | None = None,
        dtype: Any = None,
        **params: float,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"Unknown divergence {kind!r}; expected one of {sorted(KINDS)}.")
        forms = _check.check_forms(form)
        self.kind = kind
        self.form = form if isinstance(form, str) else list(forms)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"Expected `axis` to be an int, got {axis!r}.")
        self.axis = axis
        self.temperature = _check.check_temperature(temperature, forms)
        _check.check_logit_maps(softcap, logit_scale, forms)
        # lists, not tuples: the config must survive a JSON round trip unchanged
        self.softcap = list(softcap) if isinstance(softcap, tuple | list) else softcap
        self.logit_scale = (
            list(logit_scale) if isinstance(logit_scale, tuple | list) else logit_scale
        )
        allowed = KIND_PARAMS.get(kind, {})
        unknown = set(params) - set(allowed)
        if unknown:
            raise TypeError(f"{kind!r} takes no keywords {sorted(unknown)}.")
        self.params = {
            k: _check.check_unit_interval(k, params.get(k, v)) for k, v in allowed.items()
        }
        super().__init__(name=name or f"{kind}_divergence", reduction=reduction, dtype=dtype)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        form = self.form if isinstance(self.form, str) else tuple(self.form)
        return KINDS[self.kind](
            y_true,
            y_pred,
            form=form,
            axis=self.axis,
            temperature=self.temperature,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            reduction="none",
            **self.params,
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(kind=self.kind, form=self.form, axis=self.axis, temperature=self.temperature)
        config.update(softcap=self.softcap, logit_scale=self.logit_scale)
        config.update(self.params)
        return config


def _named(kind: Kind, cls_name: str, doc: str) -> type[Divergence]:
    def __init__(self: Any, *, name: str | None = None, **kwargs: Any) -> None:
        Divergence.__init__(self, kind, name=name, **kwargs)

    def get_config(self: Any) -> dict[str, Any]:
        config = Divergence.get_config(self)
        config.pop("kind")
        return config

    cls = type(
        cls_name,
        (Divergence,),
        {
            "__init__": __init__,
            "get_config": get_config,
            "__module__": __name__,
            "__qualname__": cls_name,
            "__doc__": f"{doc} ``call(y_true, y_pred)``: one value per sample, from "
            f"``kldiv.{KINDS[kind].__name__}``.",
        },
    )
    return keras.saving.register_keras_serializable(package="kldiv")(cls)


KLDivergence = _named("kl", "KLDivergence", "KL(y_true‖y_pred), exact: no clipping.")
ReverseKLDivergence = _named("reverse_kl", "ReverseKLDivergence", "KL(y_pred‖y_true).")
JSDivergence = _named("js", "JSDivergence", "Generalised Jensen–Shannon, ``beta`` = 0.5.")
SkewKLDivergence = _named("skew_kl", "SkewKLDivergence", "KL(P ‖ αP + (1−α)Q).")
SkewReverseKLDivergence = _named(
    "skew_reverse_kl", "SkewReverseKLDivergence", "KL(Q ‖ αQ + (1−α)P)."
)
SymmetricKLDivergence = _named("symmetric_kl", "SymmetricKLDivergence", "Jeffreys divergence.")
TVDistance = _named("tv", "TVDistance", "Total variation distance ½·Σ|p − q|.")
