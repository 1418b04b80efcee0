"""The row specification: for every kind, the value of ``D(P‖Q)`` on one row of
log-probabilities and its gradient with respect to them, the thing every engine computes.

With ``lp``/``lq`` the teacher's/student's log-probabilities (``p``, ``q`` their exps) and
``D = Σ_j f(p_j, q_j)``, :func:`rows` returns the value and the gradients with respect to the
log-probabilities, ``h_q = ∂D/∂lq = q·∂f/∂q`` and ``h_p = ∂D/∂lp = p·∂f/∂p``:

=====================  ==============================  ==================================
kind                   f(p, q)                         h_q (student)
=====================  ==============================  ==================================
``kl``                 p·log(p/q)                      −p
``reverse_kl``         q·log(q/p)                      q·(log(q/p) + 1)
``js``                 β·p·log(p/m) + (1−β)·q·log(q/m) (1−β)·q·log(q/m),  m = βp + (1−β)q
``skew_kl``            p·log(p/m)                      −(1−α)·p·q/m,      m = αp + (1−α)q
``skew_reverse_kl``    q·log(q/m')                     q·(log(q/m') + 1 − α·q/m'),
                                                       m' = αq + (1−α)p
``tv``                 ½·|p − q|                       ½·q·sign(q − p)
=====================  ==============================  ==================================

and ``h_p`` by the same rules with the roles exchanged (``kl``: p·(log(p/q) + 1); ``js``:
β·p·log(p/m); ``skew_kl``: p·(log(p/m) + 1 − α·p/m); ``skew_reverse_kl``: −(1−α)·q·p/m';
``tv``: ½·p·sign(p − q); ``reverse_kl``: −q).

The chain rule through the softmax is written once, in :func:`through_softmax`: for logits
``z`` divided by the temperature T, ``∂D/∂z_j = (h_j − s_j·Σ_k h_k)/T`` with ``s`` that side's
probabilities.

Before the temperature, each side's logits may go through a :class:`LogitMap` (the models'
``logit_scale`` and soft-capping, ``z ↦ c·tanh(σ·z/c)``): :func:`apply_map` and its
derivative :func:`map_grad`, which multiplies the gradient above elementwise.

Zero support, as the core defines it: a term whose first argument is 0 is 0 and has zero
gradient (``p = 0`` for ``kl``, ``q = 0`` for ``reverse_kl``); a positive first argument
against a zero second one makes the row ``+inf`` (tested on the log-ratio, so that it holds
even where the positive side underflows), and the gradient with respect to the positive side
leaves those terms out (``h = −p`` for the other side stays finite); the
mixtures are at least ``w·(own side)``, so ``js`` and the skew kinds are finite for any
supports; ``sign(0) = 0``, so ties in ``tv`` carry no gradient.

This is the reference the engines are tested against (every engine's value and student
gradient, on every zero-support pattern); it works in the dtype and the framework it is given
(any Array API namespace: the PyTorch engines run it for the rows their kernels leave, the JAX
engine differentiates through it), and the tests give it float64. Every operand is masked
before the arithmetic, so differentiating these formulas (second derivatives on JAX) gives no
NaN at zero support either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import _namespace as ns
from ._kinds import resolve

__all__ = [
    "rows",
    "through_softmax",
    "LogitMap",
    "IDENTITY",
    "apply_map",
    "map_grad",
    "pack_maps",
    "unpack_maps",
]

INF = math.inf
_TINY32 = 2.0**-126  # the smallest normal float32


def _xlogr(xp: Any, x: Any, lx: Any, ly: Any, exact: bool = True) -> Any:
    """``x·(lx − ly)`` with 0 where x = 0 (whatever ly), and ``+inf`` where x > 0 = y; NaN
    stays NaN, as in the core. The operands are masked before the arithmetic, so the
    derivative of this expression is NaN-free too (no ``0·inf`` in either branch)."""
    if not exact:
        return x * (lx - ly)
    inf = (lx - ly == INF) & (lx > -INF)
    ok = (x != 0) & ~inf
    out = xp.where(ok, xp.where(ok, x, 0.0) * (xp.where(ok, lx, 0.0) - xp.where(ok, ly, 0.0)), 0.0)
    return xp.where(inf, INF, out)


def _log_mix(xp: Any, la: Any, lb: Any, w: float, exact: bool = True) -> Any:
    """``log(w·e^la + (1−w)·e^lb)``, 0 < w < 1; ``-inf`` where both are ``-inf``; exactly
    ``la`` where ``la == lb``. The weights enter as logarithms, shifted with the components,
    so a subnormal weight (which flushes to 0 on some hardware) still counts."""
    a, b = la + math.log(w), lb + math.log1p(-w)
    hi = xp.maximum(a, b)
    if not exact:
        return hi + xp.log(xp.exp(a - hi) + xp.exp(b - hi))
    dead = hi == -INF
    safe = xp.where(dead, 0.0, hi)
    mixed = xp.exp(a - safe) + xp.exp(b - safe)
    lm = xp.where(dead, -INF, safe + xp.log(xp.where(dead, 1.0, mixed)))
    return _tie(xp, la, lb, w, lm)


def _tie(xp: Any, la: Any, lb: Any, w: float, lm: Any) -> Any:
    """``lm``, except exactly ``la`` where ``la == lb``: there ``lb + w·(la − lb)``, which is
    ``la`` to the bit and has the mixture's derivatives, ``w`` and ``1 − w``."""
    tie = la == lb
    return xp.where(tie, lb + w * (xp.where(tie, la, 0.0) - xp.where(tie, lb, 0.0)), lm)


def _plain_log_mix(xp: Any, lp: Any, lq: Any, p: Any, q: Any, w: float) -> tuple[Any, Any]:
    """``log m`` and ``m = w·p + (1−w)·q``, from the probabilities. Both weights are rounded
    once from double (``q + w·(p − q)`` cancels for w near 1 when q is large, as it is for
    unnormalised log-probabilities); where ``p == q``, ``log m`` is ``lp`` itself
    (:func:`_tie`), so a divergence of a distribution from itself is exactly 0."""
    m = w * p + (1 - w) * q
    return _tie(xp, lp, lq, w, xp.log(m)), m


def _masked_exp(xp: Any, keep: Any, x: Any, exact: bool = True) -> Any:
    """``exp(x)`` where ``keep``, else 0, with ``x`` masked first (NaN-free derivative)."""
    if not exact:
        return xp.exp(x)
    return xp.where(keep, xp.exp(xp.where(keep, x, 0.0)), 0.0)


def _masked(xp: Any, keep: Any, x: Any, exact: bool) -> Any:
    return xp.where(keep, x, 0.0) if exact else x


def rows(
    kind: str,
    lp: Any,
    lq: Any,
    w: float = 0.5,
    *,
    teacher_grad: bool = True,
    exact: bool = True,
) -> tuple[Any, Any, Any]:
    """``(value, h_p, h_q)`` of ``kind`` (from :mod:`kldiv._kinds`) along the last axis of
    log-probabilities ``lp`` (teacher) and ``lq`` (student); ``w`` is β for ``js`` and α for
    the skew kinds. ``value`` has the row shape, ``h_p`` and ``h_q`` the input shape;
    ``teacher_grad=False`` skips ``h_p`` (None).

    ``"symmetric_kl"`` is KL plus reverse KL, term by term.

    ``exact=False`` drops the zero-support masks and forms the mixtures from the
    probabilities, ``log(w·p + (1−w)·q)``: the same formulas in plain arithmetic, equal to
    the exact ones up to rounding on every row whose value comes out finite (a zero
    probability makes a ``0·inf`` term, NaN; a positive one against a zero, or a mixture
    that underflows, makes the row ``+inf``), for engines that take the plain formulas first
    and the exact ones for a batch that has such a row. A weight below float32's smallest
    normal number (about 1.2e-38, or as close to 1) always takes the exact formulas."""
    xp = ns.namespace_of(lp)
    value, h_p, h_q = _rows(xp, kind, lp, lq, w, teacher_grad, exact)
    return value, h_p if teacher_grad else None, h_q


def _rows(
    xp: Any, kind: str, lp: Any, lq: Any, w: float, need_p: bool, exact: bool
) -> tuple[Any, Any, Any]:
    resolved = resolve(kind, w)
    kind, w = resolved.kind, resolved.w
    if kind in ("js", "skew_kl", "skew_reverse_kl") and min(w, 1 - w) < _TINY32:
        # a weight below float32's normal range keeps a few bits there (2% at 1e-44): the
        # plain mixture would be finite and wrong, the exact one takes log(w) in double
        exact = True
    if resolved.zero:
        zero = xp.zeros_like(lp)
        return xp.sum(zero, axis=-1), zero, zero
    if kind in ("reverse_kl", "skew_reverse_kl"):  # the other kind with the roles exchanged
        value, first, second = _rows(xp, kind.replace("reverse_", ""), lq, lp, w, True, exact)
        return value, second, first
    p, q = xp.exp(lp), xp.exp(lq)
    h_p: Any = None
    if kind == "kl":
        if need_p:
            live = (lp > -INF) & (lq > -INF)  # in log space, as the core: p·(lp − lq + 1)
            d = _masked(xp, live, lp, exact) - _masked(xp, live, lq, exact)
            h_p = _masked(xp, live, p * (d + 1), exact)
        return xp.sum(_xlogr(xp, p, lp, lq, exact), axis=-1), h_p, -p
    if kind == "symmetric_kl":  # KL(P‖Q) + KL(Q‖P), term by term
        a, b = (
            _rows(xp, "kl", lp, lq, w, need_p, exact),
            _rows(xp, "reverse_kl", lp, lq, w, True, exact),
        )
        return a[0] + b[0], None if a[1] is None else a[1] + b[1], a[2] + b[2]
    if kind == "skew_kl":
        pos = p > 0  # then m ≥ α·p > 0
        if exact:
            lm = _log_mix(xp, lp, lq, w)
            r = _masked_exp(xp, pos, lp + lq - lm)  # p·q/m
        else:  # m is 0 where both underflow (lm is finite there only if lp == lq)
            lm, m = _plain_log_mix(xp, lp, lq, p, q, w)
            live = m > 0
            m = xp.where(live, m, 1.0)
            r = xp.where(live, p * q / m, 0.0)
        if need_p:
            # α·p·p/m ≤ p, formed as p·(α·p/m) with α·p/m ≤ 1: p·p/m alone overflows where
            # m is tiny, and a subnormal α may flush to 0 (0·inf)
            if exact:
                rp = p * _masked_exp(xp, pos, math.log(w) + lp - lm)
            else:
                rp = xp.where(live, p * (w * p / m), 0.0)
            d = _masked(xp, pos, lp, exact) - _masked(xp, pos, lm, exact)
            h_p = _masked(xp, pos, p * (d + 1), exact) - rp
        return xp.sum(_xlogr(xp, p, lp, lm, exact), axis=-1), h_p, -(1 - w) * r
    if kind == "js":
        lm = _log_mix(xp, lp, lq, w) if exact else _plain_log_mix(xp, lp, lq, p, q, w)[0]
        tp, tq = _xlogr(xp, p, lp, lm, exact), _xlogr(xp, q, lq, lm, exact)
        return w * xp.sum(tp, axis=-1) + (1 - w) * xp.sum(tq, axis=-1), w * tp, (1 - w) * tq
    if kind == "tv":
        d = q - p
        sign = xp.sign(d)
        value = 0.5 * xp.sum(xp.where(d == 0, 0.0, xp.abs(d)) if exact else xp.abs(d), axis=-1)
        return value, -0.5 * p * sign, 0.5 * q * sign
    raise ValueError(f"No row specification for {kind!r}.")


def through_softmax(h: Any, lx: Any, temperature: float = 1.0, sum_h: Any = None) -> Any:
    """The gradient with respect to the logits ``z`` whose log-softmax of ``z/T`` is ``lx``,
    given ``h``, the gradient with respect to ``lx``: ``(h − s·Σh)/T``, ``s = exp(lx)``;
    ``sum_h`` is ``Σh`` (keeping the last axis) where the caller has it already."""
    xp = ns.namespace_of(lx)
    s = xp.exp(lx)
    g = h - s * (xp.sum(h, axis=-1, keepdims=True) if sum_h is None else sum_h)
    return g if temperature == 1.0 else g / temperature


@dataclass(frozen=True)
class LogitMap:
    """What a model's head does to its logits before the softmax: ``z ↦ σ·z`` (``scale`` σ,
    a ``logit_scale``) and then, if ``cap`` c is set, ``z ↦ c·tanh(z/c)`` (soft-capping, as
    Gemma-family models do), so ``z ↦ c·tanh(σ·z/c)``. ``±inf`` logits pass through unchanged
    (a masked token stays masked, with zero gradient); NaN stays NaN."""

    scale: float = 1.0
    cap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.cap is None


IDENTITY = LogitMap()


def apply_map(xp: Any, x: Any, m: LogitMap) -> Any:
    """``m`` applied to logits ``x`` (in their dtype and framework)."""
    if m.cap is None:
        return x if m.scale == 1.0 else x * m.scale
    y = m.cap * xp.tanh(x * (m.scale / m.cap))
    return xp.where(xp.isinf(x), x, y)


def map_grad(xp: Any, x: Any, m: LogitMap) -> Any:
    """``d m(x)/dx`` elementwise: σ, or ``σ·(1 − tanh²(σx/c))`` with a cap (0 at ``±inf``)."""
    if m.cap is None:
        return xp.full_like(x, m.scale)
    th = xp.tanh(xp.where(xp.isinf(x), 0.0, x) * (m.scale / m.cap))
    return xp.where(xp.isinf(x), 0.0, m.scale * (1.0 - th * th))


def pack_maps(maps: tuple[LogitMap, LogitMap]) -> list[float]:
    """The (teacher, student) maps as the kernels take them: ``[mul, cap]`` of the student's,
    then of the teacher's, where a side computes ``cap·tanh(mul·x)`` (``mul = scale/cap``) or,
    with ``cap = 0``, ``mul·x``."""
    out: list[float] = []
    for m in (maps[1], maps[0]):
        out += [m.scale / m.cap, m.cap] if m.cap else [m.scale, 0.0]
    return out


def unpack_maps(packed: list[float]) -> tuple[LogitMap, LogitMap]:
    """:func:`pack_maps` undone: the (teacher, student) maps."""

    def side(mul: float, cap: float) -> LogitMap:
        return LogitMap(mul * cap, cap) if cap else LogitMap(mul, None)

    return side(packed[2], packed[3]), side(packed[0], packed[1])
