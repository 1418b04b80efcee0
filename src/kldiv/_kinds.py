"""The registry of divergence kinds: names, parameters and their defaults, endpoint resolution
and which row engines compute each. Every module that needs a kind reads it from here.

A kind's name says the direction as the distillation losses use it, ``D(teacher‖student)``
with the teacher ``p`` first, as in the core functions ``f(p, q)``:

========================  ==============================  ==========  ====================
kind                      value                           parameter   engines
========================  ==============================  ==========  ====================
``"kl"``                  KL(P‖Q)                         —           tensor, C, Triton
``"reverse_kl"``          KL(Q‖P)                         —           tensor, C, Triton
``"js"``                  β·KL(P‖M) + (1−β)·KL(Q‖M)       ``beta``    tensor, C, Triton
``"skew_kl"``             KL(P‖αP + (1−α)Q)               ``alpha``   tensor, C, Triton
``"skew_reverse_kl"``     KL(Q‖αQ + (1−α)P)               ``alpha``   tensor, C, Triton
``"tv"``                  ½·Σ|p − q|                      —           tensor, C, Triton
``"symmetric_kl"``        KL(P‖Q) + KL(Q‖P)               —           the core (two rows)
========================  ==============================  ==========  ====================

with ``M = βP + (1−β)Q``. The engines compute a kind only strictly inside its parameter's
range; :func:`resolve` maps the endpoints first, as the core defines them: JS at β ∈ {0, 1}
and the skew kinds at α = 1 are identically 0, and the skew kinds at α = 0 are plain KL and
reverse KL (the mixture is then exactly the other side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, get_args

from ._defaults import JS_BETA, SKEW_ALPHA, DistillationKind, Kind

__all__ = ["KIND_NAMES", "ENGINE_KINDS", "KIND_PARAMS", "KIND_CODES", "Resolved", "resolve"]

KIND_NAMES: Final[tuple[Kind, ...]] = get_args(Kind)
# The kinds a row engine computes (every kind but "symmetric_kl", which is two of them), in
# the order of their integer codes in the C and Triton kernels.
ENGINE_KINDS: Final[tuple[DistillationKind, ...]] = get_args(DistillationKind)
KIND_CODES: Final[dict[str, int]] = {kind: code for code, kind in enumerate(ENGINE_KINDS)}

# The extra keyword each kind takes, with its default (for shells that dispatch by name).
KIND_PARAMS: Final[dict[str, dict[str, float]]] = {
    "js": {"beta": JS_BETA},
    "skew_kl": {"alpha": SKEW_ALPHA},
    "skew_reverse_kl": {"alpha": SKEW_ALPHA},
}


def weight_of(kind: str, beta: float = JS_BETA, alpha: float = SKEW_ALPHA) -> float:
    """The one weight the kernels take for ``kind``: ``beta`` for JS, ``alpha`` for the skew
    kinds, and an unused 0.5 for the others."""
    name = next(iter(KIND_PARAMS.get(kind, {})), None)
    return {"beta": beta, "alpha": alpha}.get(name, 0.5) if name else 0.5


def params_of(kind: str, beta: float = JS_BETA, alpha: float = SKEW_ALPHA) -> dict[str, float]:
    """The keyword arguments of the core function of ``kind`` (``{"beta": β}`` for JS,
    ``{"alpha": α}`` for the skew kinds, ``{}`` otherwise)."""
    return {name: {"beta": beta, "alpha": alpha}[name] for name in KIND_PARAMS.get(kind, {})}


@dataclass(frozen=True)
class Resolved:
    """What an engine computes for a kind at a weight: ``kind`` (a skew kind at α = 0 becomes
    plain KL or reverse KL), the weight ``w`` the kernel takes, and ``zero``, True where the
    divergence is identically 0 (the engines leave those to the core, which returns an exact
    0 with a zero gradient)."""

    kind: str
    w: float
    zero: bool


def resolve(kind: str, w: float) -> Resolved:
    """The endpoints of ``kind`` at weight ``w`` (``beta`` for JS, ``alpha`` for skew)."""
    if kind == "js" and w in (0.0, 1.0):
        return Resolved(kind, w, True)
    if kind in ("skew_kl", "skew_reverse_kl"):
        if w == 1.0:
            return Resolved(kind, w, True)
        if w == 0.0:
            return Resolved("kl" if kind == "skew_kl" else "reverse_kl", 0.5, False)
    return Resolved(kind, w, False)
