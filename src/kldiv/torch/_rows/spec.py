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

Zero support, as the core defines it: a term whose first argument is 0 is 0 and has zero
gradient (``p = 0`` for ``kl``, ``q = 0`` for ``reverse_kl``); a positive first argument
against a zero second one makes the row ``+inf`` (tested on the log-ratio, so that it holds
even where the positive side underflows), and the gradient with respect to the positive side
leaves those terms out (``h = −p`` for the other side stays finite); the
mixtures are at least ``w·(own side)``, so ``js`` and the skew kinds are finite for any
supports; ``sign(0) = 0``, so ties in ``tv`` carry no gradient.

This is the reference the engines are tested against (every engine's value and student
gradient, on every zero-support pattern); it works in the dtype it is given, and the tests
give it float64.
"""

from __future__ import annotations

import math

import torch

from ..._kinds import resolve

__all__ = ["rows", "through_softmax"]

INF = math.inf


def _xlogr(x: torch.Tensor, lx: torch.Tensor, ly: torch.Tensor) -> torch.Tensor:
    """``x·(lx − ly)`` with 0 where x = 0 (whatever ly), and ``+inf`` where x > 0 = y; NaN
    stays NaN, as in the core."""
    out = torch.where(x == 0, 0.0, x * (lx - ly))
    return torch.where((lx - ly == INF) & (lx > -INF), INF, out)


def _log_mix(la: torch.Tensor, lb: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w·e^la + (1−w)·e^lb)``, 0 < w < 1; ``-inf`` where both are ``-inf``."""
    hi = torch.maximum(la, lb)
    safe = torch.where(hi == -INF, 0.0, hi)
    mixed = w * torch.exp(la - safe) + (1 - w) * torch.exp(lb - safe)
    return torch.where(hi == -INF, -INF, safe + torch.log(mixed))


def rows(
    kind: str, lp: torch.Tensor, lq: torch.Tensor, w: float = 0.5, *, teacher_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(value, h_p, h_q)`` of ``kind`` (from :mod:`kldiv._kinds`) along the last axis of
    log-probabilities ``lp`` (teacher) and ``lq`` (student); ``w`` is β for ``js`` and α for
    the skew kinds. ``value`` has the row shape, ``h_p`` and ``h_q`` the input shape;
    ``teacher_grad=False`` skips ``h_p`` (None)."""
    value, h_p, h_q = _rows(kind, lp, lq, w, teacher_grad)
    return value, h_p if teacher_grad else None, h_q


def _rows(
    kind: str, lp: torch.Tensor, lq: torch.Tensor, w: float, need_p: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    resolved = resolve(kind, w)
    kind, w = resolved.kind, resolved.w
    p, q = torch.exp(lp), torch.exp(lq)
    h_p: torch.Tensor | None
    if resolved.zero:
        zero = torch.zeros_like(lp)
        return zero.sum(-1), zero, zero
    if kind in ("reverse_kl", "skew_reverse_kl"):  # the other kind with the roles exchanged
        value, first, second = _rows(kind.replace("reverse_", ""), lq, lp, w, True)
        assert first is not None  # asked for
        return value, second, first
    if kind == "kl":
        h_p = None
        if need_p:
            live = (p > 0) & (q > 0)
            h_p = torch.where(live, p * (lp - lq + 1), 0.0)
        return _xlogr(p, lp, lq).sum(-1), h_p, -p
    if kind == "skew_kl":
        lm = _log_mix(lp, lq, w)
        r = torch.where(p > 0, torch.exp(lp + lq - lm), 0.0)  # p·q/m
        h_p = None
        if need_p:
            rp = torch.where(p > 0, torch.exp(2 * lp - lm), 0.0)  # p·p/m
            h_p = torch.where(p > 0, p * (lp - lm + 1), 0.0) - w * rp
        return _xlogr(p, lp, lm).sum(-1), h_p, -(1 - w) * r
    if kind == "js":
        lm = _log_mix(lp, lq, w)
        tp, tq = _xlogr(p, lp, lm), _xlogr(q, lq, lm)
        return w * tp.sum(-1) + (1 - w) * tq.sum(-1), w * tp, (1 - w) * tq
    if kind == "tv":
        d = q - p
        return 0.5 * d.abs().sum(-1), -0.5 * p * torch.sign(d), 0.5 * q * torch.sign(d)
    raise ValueError(f"No row specification for {kind!r}.")


def through_softmax(h: torch.Tensor, lx: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The gradient with respect to the logits ``z`` whose log-softmax of ``z/T`` is ``lx``,
    given ``h``, the gradient with respect to ``lx``: ``(h − s·Σh)/T``, ``s = exp(lx)``."""
    s = torch.exp(lx)
    return (h - s * h.sum(-1, keepdim=True)) / temperature
