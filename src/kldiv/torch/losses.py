"""``nn.Module`` losses for the divergence family: configuration in ``__init__``, the data in
``forward``, every number computed by the functional core (:mod:`kldiv.divergences`).

The argument order is the core's, mathematical: ``loss(p, q)`` is D(P‖Q) with ``p`` the target
or teacher and ``q`` the model or student. This is the *reverse* of ``torch.nn.KLDivLoss``,
whose ``forward(input, target)`` takes the model first; the modules here are named
``KLDivergence`` etc. rather than ``KLDivLoss`` so that the two cannot be confused.

>>> import torch
>>> from kldiv.torch import KLDivergence
>>> loss = KLDivergence(form="logits", temperature=2.0)
>>> loss
KLDivergence(form='logits', reduction='mean', temperature=2.0)
>>> teacher, student = torch.randn(4, 10), torch.randn(4, 10, requires_grad=True)
>>> loss(teacher, student).backward()
"""

from __future__ import annotations

from typing import Any, cast

import torch

from .. import _check
from .._defaults import (
    AXIS,
    FORM,
    JS_BETA,
    REDUCTION,
    SKEW_ALPHA,
    TEMPERATURE,
    FormSpec,
    Kind,
    Reduction,
)
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


class _DivergenceModule(torch.nn.Module):
    """Holds the keywords of one core function; ``forward(p, q, mask=, weight=, num_items=)``.

    The per-call arguments (``mask``, ``weight``, ``num_items``) are data, so they go to
    ``forward``; everything else is configuration, validated here, at construction, so that a
    typo fails when the model is built rather than at the first batch. No parameters or
    buffers: ``state_dict()`` is empty and the module pickles with its configuration.
    """

    kind: str = ""
    _params: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        form: FormSpec = FORM,
        axis: int = AXIS,
        reduction: Reduction = REDUCTION,
        temperature: float = TEMPERATURE,
        softcap: Any = None,
        logit_scale: Any = None,
        check: bool = False,
        **params: float,
    ) -> None:
        super().__init__()
        forms = _check.check_forms(form)
        self.form = form if isinstance(form, str) else forms
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"Expected `axis` to be an int, got {axis!r}.")
        self.axis = axis
        self.reduction = _check.check_reduction(reduction)
        self.temperature = _check.check_temperature(temperature, forms)
        _check.check_logit_maps(softcap, logit_scale, forms)
        self.softcap, self.logit_scale = softcap, logit_scale
        self.check = _check.check_flag("check", check)
        for name in self._params:
            setattr(self, name, _check.check_unit_interval(name, params.pop(name)))
        if params:
            raise TypeError(f"{type(self).__name__} got unexpected keywords {sorted(params)}.")

    def _config(self) -> dict[str, Any]:
        return {
            "form": self.form,
            "axis": self.axis,
            "reduction": self.reduction,
            "temperature": self.temperature,
            "softcap": self.softcap,
            "logit_scale": self.logit_scale,
            "check": self.check,
            **{name: getattr(self, name) for name in self._params},
        }

    def forward(
        self,
        p: torch.Tensor,
        q: torch.Tensor,
        mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        num_items: Any = None,
    ) -> torch.Tensor:
        return KINDS[self.kind](
            p, q, mask=mask, weight=weight, num_items=num_items, **self._config()
        )

    def extra_repr(self) -> str:
        # Only what differs from the defaults, plus form and reduction, which always matter.
        defaults = {
            "axis": AXIS,
            "temperature": TEMPERATURE,
            "softcap": None,
            "logit_scale": None,
            "check": False,
        }
        shown = []
        for key, value in self._config().items():
            if key in defaults and value == defaults[key]:
                continue
            shown.append(f"{key}={value!r}")
        return ", ".join(shown)


def _module(kind: Kind, name: str, params: dict[str, float], doc: str) -> type[_DivergenceModule]:
    param_doc = "".join(f", {k}={v}" for k, v in params.items())

    def __init__(
        self: Any,
        *,
        form: FormSpec = FORM,
        axis: int = AXIS,
        reduction: Reduction = REDUCTION,
        temperature: float = TEMPERATURE,
        softcap: Any = None,
        logit_scale: Any = None,
        check: bool = False,
        **kw: float,
    ) -> None:
        for k, v in params.items():
            kw.setdefault(k, v)
        _DivergenceModule.__init__(
            self,
            form=form,
            axis=axis,
            reduction=reduction,
            temperature=temperature,
            softcap=softcap,
            logit_scale=logit_scale,
            check=check,
            **kw,
        )

    fn = KINDS[kind]
    cls = type(
        name,
        (_DivergenceModule,),
        {
            "kind": kind,
            "_params": tuple(params),
            "__init__": __init__,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": (
                f"{doc}\n\n    ``{name}(form={FORM!r}, axis={AXIS}, reduction={REDUCTION!r}, "
                f"temperature={TEMPERATURE}, softcap=None, logit_scale=None, check=False"
                f"{param_doc})``; "
                f"``forward(p, q, mask=None, weight=None, num_items=None)`` returns "
                f"``kldiv.{fn.__name__}(p, q, ...)`` with these settings (see it for the "
                "formula, forms, shapes and gradients)."
            ),
        },
    )
    # type() with these bases makes a _DivergenceModule subclass; mypy only knows "type"
    return cast("type[_DivergenceModule]", cls)


KLDivergence = _module("kl", "KLDivergence", {}, "KL(P‖Q), P the target/teacher.")
ReverseKLDivergence = _module(
    "reverse_kl", "ReverseKLDivergence", {}, "KL(Q‖P): mode-seeking in the model Q."
)
JSDivergence = _module(
    "js", "JSDivergence", {"beta": JS_BETA}, "β·KL(P‖M) + (1−β)·KL(Q‖M), M = βP + (1−β)Q."
)
SkewKLDivergence = _module(
    "skew_kl", "SkewKLDivergence", {"alpha": SKEW_ALPHA}, "KL(P ‖ αP + (1−α)Q)."
)
SkewReverseKLDivergence = _module(
    "skew_reverse_kl", "SkewReverseKLDivergence", {"alpha": SKEW_ALPHA}, "KL(Q ‖ αQ + (1−α)P)."
)
SymmetricKLDivergence = _module(
    "symmetric_kl", "SymmetricKLDivergence", {}, "KL(P‖Q) + KL(Q‖P) (Jeffreys)."
)
TVDistance = _module("tv", "TVDistance", {}, "½·Σ|p − q|.")


class Divergence(_DivergenceModule):
    """Any divergence of the family by name, for configuration files:
    ``Divergence("js", beta=0.3, form="logits")``."""

    def __init__(self, kind: Kind = "kl", **kwargs: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"Unknown divergence {kind!r}; expected one of {sorted(KINDS)}.")
        defaults = KIND_PARAMS.get(kind, {})
        self.kind = kind
        self._params = tuple(defaults)
        for k, v in defaults.items():
            kwargs.setdefault(k, v)
        super().__init__(**kwargs)

    def extra_repr(self) -> str:
        rest = super().extra_repr()
        return f"kind={self.kind!r}" + (f", {rest}" if rest else "")
