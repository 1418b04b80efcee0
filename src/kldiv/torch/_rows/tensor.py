"""The CPU fast path of DistillationLoss and the core functions: row chunks that stay in
cache, loss and gradient in one pass, no float32 ``[N, V]`` scratch beyond the gradients.
From logits with a student-only gradient, the kernels below; for log-probabilities and a
teacher that needs a gradient too, the row specification itself (:func:`spec_forward`).

Three layers, as for the GPU kernels. The kernel: for every divergence on float32, the
compiled C kernel ``native.c`` (launched by :mod:`.native`); without it, and for
the rows it leaves to tensor code, the ``_chunk_*`` functions, which compute one chunk's
per-row loss and gradient. The launcher:
:func:`chunked_forward`, which walks the rows and owns the buffers. The autograd layer:
:class:`ChunkedDivergence`, the ``autograd.Function``. Zero support follows the
core exactly (``-inf`` logits are zero probabilities; p = 0 terms are 0; p > 0 = q is +inf),
and so do the endpoints of ``beta``/``alpha`` where a divergence is identically 0 or reduces
to KL. Plain tensor arithmetic: the launcher runs on any torch device, although its only
caller on accelerators is :mod:`kldiv.torch.fused_linear`.

Every kernel writes the gradient through the softmax in one form: with q the student's
probabilities, f the summand of the divergence and ``h_j = q_j·∂f/∂q_j``, the gradient with
respect to the student's logit ``z_j`` is ``h_j − q_j·Σ_k h_k``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from ... import _spec as spec
from ..._defaults import JS_BETA, SKEW_ALPHA
from ..._kinds import KIND_PARAMS, resolve, weight_of
from . import dispatch
from . import native as native_engine

# Rows per chunk: 2^18 floats (1 MiB per float32 temporary) measured fastest at V = 32000 on
# 2 cores (2^16: 15% slower, python overhead; 2^20: 5% slower, out of cache).
_CHUNK_ELEMENTS = 1 << 18

Kernel = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# the (teacher, student) logit maps, kldiv._spec.LogitMap
Maps = tuple[spec.LogitMap, spec.LogitMap]


def _chunk_kl(lt: torch.Tensor, ls: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """KL(T‖S) per row, ``Σ p_t (l_t − l_s)``; writes d/dz_s = ``q_s − p_t`` into ``grad``."""
    pt = lt.exp()
    if grad is not None:
        torch.exp(ls, out=grad).sub_(pt)
    diff = lt - ls
    # p_t > 0 = q_s is +inf even where p_t underflows to 0 (then diff·p_t reads inf·0)
    infinite = (diff == math.inf).any(-1)
    # p_t = 0 terms are 0 (they read 0·(−inf) or 0·NaN here)
    value = diff.mul_(pt).masked_fill_(pt == 0, 0.0).sum(-1)
    return value.masked_fill_(infinite, math.inf)


def _chunk_reverse_kl(
    lt: torch.Tensor, ls: torch.Tensor, grad: torch.Tensor | None
) -> torch.Tensor:
    """KL(S‖T) per row, ``R = Σ q (l_s − l_t)``; writes d/dz_s = ``h − q·Σh`` with
    ``h = q·(l_s − l_t + 1)`` on the terms where both are positive.

    A q > 0 = p term makes the value +inf; as in the core, it is left out of the gradient
    (h = 0 there), which stays finite.
    """
    qs = ls.exp()
    diff = ls - lt  # +inf where p = 0 < q; −inf or NaN where q = 0
    inf_terms = diff == math.inf
    infinite = inf_terms.any(-1)
    # not isfinite(diff): a NaN teacher (an all −inf row) must stay NaN, as in the core
    live = ~(inf_terms | (qs == 0))
    diff.masked_fill_(~live, 0.0)
    value = (qs * diff).sum(-1).masked_fill_(infinite, math.inf)
    if grad is not None:
        h = diff.add_(1.0).mul_(qs).masked_fill_(~live, 0.0)
        torch.mul(qs, h.sum(-1, keepdim=True), out=grad).neg_().add_(h)
    return value


def _chunk_js(
    lt: torch.Tensor, ls: torch.Tensor, grad: torch.Tensor | None, beta: float
) -> torch.Tensor:
    """β·KL(T‖M) + (1−β)·KL(S‖M), M = βT + (1−β)S, per row, 0 < β < 1; writes d/dz_s.

    ∂JS/∂q = (1−β)·log(q/m) (the other terms cancel because M mixes Q), so through the
    softmax d/dz_j = q_j·(g_j − Σ_k q_k g_k) with g = (1−β)·log(q/m).
    """
    pt, qs = lt.exp(), ls.exp()
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    tp = (lt - lm).mul_(pt).masked_fill_(pt == 0, 0.0)  # p·log(p/m), 0 where p = 0
    lq = (ls - lm).masked_fill_(qs == 0, 0.0)  # log(q/m), 0 where q = 0 (then m = βp)
    value = beta * tp.sum(-1) + (1 - beta) * (qs * lq).sum(-1)
    if grad is not None:
        g = lq.mul_(1 - beta)
        mean = (qs * g).sum(-1, keepdim=True)
        torch.mul(qs, g.sub_(mean), out=grad)
    return value


def _chunk_skew_kl(
    lt: torch.Tensor, ls: torch.Tensor, grad: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """KL(T ‖ M), M = αT + (1−α)S, per row, 0 < α < 1 (finite: m ≥ αp); writes d/dz_s.

    ∂f/∂q = −(1−α)·p/m, so h = −(1−α)·r with r = p·q/m, and d/dz = (1−α)·(q·Σr − r).
    """
    pt = lt.exp()
    dead = pt == 0
    lm = torch.logaddexp(lt + math.log(alpha), ls + math.log1p(-alpha))
    if grad is not None:
        # r = 0 where p = 0, where q/m may read exp(−inf + inf) = NaN (p = q = 0, m = 0)
        r = torch.sub(ls, lm).exp_().mul_(pt).masked_fill_(dead, 0.0)
        torch.exp(ls, out=grad).mul_(r.sum(-1, keepdim=True)).sub_(r).mul_(1 - alpha)
    return lm.neg_().add_(lt).mul_(pt).masked_fill_(dead, 0.0).sum(-1)


def _chunk_skew_reverse_kl(
    lt: torch.Tensor, ls: torch.Tensor, grad: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """KL(S ‖ M'), M' = αS + (1−α)T, per row, 0 < α < 1 (finite: m' ≥ αq); writes d/dz_s.

    ∂f/∂q = log(q/m') + 1 − α·q/m', so h = q·(log(q/m') − α·q/m') + q; the last q cancels in
    ``h − q·Σh`` (Σq = 1) and is left out.
    """
    qs = ls.exp()
    lm = torch.logaddexp(ls + math.log(alpha), lt + math.log1p(-alpha))
    d = torch.sub(ls, lm, out=lm).masked_fill_(qs == 0, 0.0)  # log(q/m'), 0 where q = 0
    value = (qs * d).sum(-1)
    if grad is not None:
        # α·q/m' as exp(d + log α) ≤ 1: exp(d) alone reaches 1/α, which overflows for α
        # below about 3e-39
        h = d.add(math.log(alpha)).exp_().neg_().add_(d).mul_(qs)  # 0 where q = 0 (d = 0)
        torch.mul(qs, h.sum(-1, keepdim=True), out=grad).neg_().add_(h)
    return value


def _chunk_tv(lt: torch.Tensor, ls: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """½·Σ|p − q| per row; writes d/dz_s with h = ½·q·sign(q − p).

    sign(0) = 0 is the core's slope of |d| at d = 0 (ties, e.g. p = q = 0, get no gradient).
    """
    qs = ls.exp()
    d = lt.exp().neg_().add_(qs)  # q − p
    value = torch.linalg.vector_norm(d, 1, -1).mul_(0.5)
    if grad is not None:
        h = d.sign_().mul_(qs).mul_(0.5)
        torch.mul(qs, h.sum(-1, keepdim=True), out=grad).neg_().add_(h)
    return value


def _logits_kl(
    s: torch.Tensor, t: torch.Tensor, grad: torch.Tensor | None, work: list[torch.Tensor]
) -> torch.Tensor | None:
    """KL(T‖S) per row straight from (tempered) logits, or None where a student logit is
    −inf (then :func:`_chunk_kl` takes the chunk: only its masks give exact +inf terms).

    One exp per element and distribution, and no comparisons or masks over the chunk, which
    cost as much as an exp each on CPU: with ``m`` the row maxima and ``z`` the sums of
    ``e^(x − m)``, ``KL = Σ p·((t − m_t) − (s − m_s)) − log(z_t/z_s)``. Each logit is
    shifted by its own row's maximum before the two are differenced, as a log-softmax does: a
    constant offset between teacher and student (logits near 1000 against logits near 0)
    then costs no precision. A teacher's −inf logits shift to the most negative float: p = 0
    there exactly and no 0·inf appears (an all −inf row still reads NaN through m_t = −inf).
    The same clamp catches a finite span that overflows (logits near ±3e38). A student chunk
    whose span is not finite (a −inf logit, or s − m_s overflowing to −inf) goes to
    :func:`_chunk_kl` instead.
    """
    if not _finite_span(s):
        return None
    r = s.shape[0]
    p, d, e = (w[:r] for w in work)
    m_s = s.amax(-1, keepdim=True)
    m_t = t.amax(-1, keepdim=True)
    torch.sub(t, m_t, out=d)
    if not _finite_span(t):
        d.clamp_min_(torch.finfo(d.dtype).min)
    z_t = torch.exp(d, out=p).sum(-1, keepdim=True)
    p.div_(z_t)
    torch.sub(s, m_s, out=e)
    if grad is not None:
        z_s = torch.exp(e, out=grad).sum(-1, keepdim=True)
        grad.div_(z_s).sub_(p)
    else:  # evaluation only: a temporary instead of the gradient buffer
        z_s = e.exp().sum(-1, keepdim=True)
    value = torch.linalg.vecdot(p, d.sub_(e))
    return value.sub_(torch.log(z_t / z_s).squeeze(-1))


def _logits_reverse_kl(
    s: torch.Tensor, t: torch.Tensor, grad: torch.Tensor | None, work: list[torch.Tensor]
) -> torch.Tensor | None:
    """KL(S‖T) per row straight from (tempered) logits, or None where a teacher logit is
    −inf (then :func:`_chunk_reverse_kl` takes the chunk); the mirror of :func:`_logits_kl`:
    with ``δ = (s − m_s) − (t − m_t)``, ``R = Σ q·δ − log(z_s/z_t)`` and the gradient is
    ``q ⊙ (δ − log(z_s/z_t) − R)``. Where that could overflow (a teacher span that is not
    finite, or some ``|R|`` above 2^100, where ``δ − R`` may reach −inf on a q = 0 term and
    read 0·inf) the chunk goes to :func:`_chunk_reverse_kl`, whose masks keep it exact.
    """
    if not _finite_span(t):
        return None
    r = s.shape[0]
    e, d, _ = (w[:r] for w in work)
    q = grad if grad is not None else e
    m_s = s.amax(-1, keepdim=True)
    m_t = t.amax(-1, keepdim=True)
    torch.sub(s, m_s, out=d)
    if not _finite_span(s):
        d.clamp_min_(torch.finfo(d.dtype).min)
    z_s = torch.exp(d, out=q).sum(-1, keepdim=True)
    q.div_(z_s)
    tt = work[2][:r]
    torch.sub(t, m_t, out=tt)
    if grad is not None:
        z_t = torch.exp(tt, out=e).sum(-1, keepdim=True)
    else:  # evaluation only: e holds q
        z_t = tt.exp().sum(-1, keepdim=True)
    d.sub_(tt)
    log_ratio = torch.log(z_s / z_t)
    value = torch.linalg.vecdot(q, d).sub_(log_ratio.squeeze(-1))
    if bool(value.abs().amax() > _SAFE_VALUE):  # NaN compares False: NaN rows stay NaN
        return None
    if grad is not None:
        grad.mul_(d.sub_(log_ratio + value[:, None]))
    return value


# Below 2^100, x − R cannot overflow for any float32 x ≥ −max (the ulp of max is 2^104).
_SAFE_VALUE = 2.0**100


def _finite_span(x: torch.Tensor) -> bool:
    """Whether every ``x − max`` in the chunk is finite: no −inf, and no span that overflows.
    Two reductions over the chunk, cheaper than a comparison over every element."""
    return bool(torch.isfinite(x.amax() - x.amin()))


_CHUNKS: dict[str, Kernel] = {"kl": _chunk_kl, "reverse_kl": _chunk_reverse_kl, "tv": _chunk_tv}
# The kinds with a weight (β or α), taken as the kernels' fourth argument.
_WEIGHTED: dict[str, Callable[..., torch.Tensor]] = {
    "js": _chunk_js,
    "skew_kl": _chunk_skew_kl,
    "skew_reverse_kl": _chunk_skew_reverse_kl,
}
_FROM_LOGITS = {_chunk_kl: _logits_kl, _chunk_reverse_kl: _logits_reverse_kl}
# The compiled kernel's kind for each chunk kernel it replaces (the weighted ones reach
# chunked_forward as partials carrying their weight).
_NATIVE: dict[Callable[..., torch.Tensor], str] = {
    _chunk_kl: "kl",
    _chunk_reverse_kl: "reverse_kl",
    _chunk_js: "js",
    _chunk_skew_kl: "skew_kl",
    _chunk_skew_reverse_kl: "skew_reverse_kl",
    _chunk_tv: "tv",
}


def _kernel(kind: str, beta: float, alpha: float) -> Kernel | None:
    """The chunk kernel for ``kind`` at these parameters (endpoints resolved by the
    registry: the skew kinds at α = 0 are plain KL and reverse KL); None where the divergence
    is identically 0 (JS at β ∈ {0, 1}, skew at α = 1: the core returns an exact 0 there)."""
    resolved = resolve(kind, weight_of(kind, beta, alpha))
    if resolved.zero:
        return None
    if resolved.kind in _WEIGHTED:
        (name,) = KIND_PARAMS[resolved.kind]
        return functools.partial(_WEIGHTED[resolved.kind], **{name: resolved.w})
    return _CHUNKS[resolved.kind]


def chunked_forward(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    temperature: float,
    need_grad: bool,
    beta: float = JS_BETA,
    *,
    alpha: float = SKEW_ALPHA,
    maps: Maps | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergences ``[N]`` (masked rows 0) and, if asked, the gradient of their sum
    with respect to ``student`` (``[N, V]``; masked rows 0), on ``student``'s device.
    ``maps``: the (teacher, student) logit maps (:class:`kldiv._spec.LogitMap`), applied before
    the temperature, inside the compiled kernel and in the tensor code alike.

    Computed in float32, or float64 when either input is float64; ``student`` and
    ``teacher`` are ``[N, V]`` logits (divided by ``temperature`` here). Every divergence on
    CPU goes through the compiled kernel (:mod:`.native`) when it is available, and the
    rows it flags through the tensor code here.
    """
    n, v = student.shape
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    device = student.device
    values = torch.zeros(n, dtype=dtype, device=device)
    fn = _kernel(kind, beta, alpha)
    if fn is None:
        return values, torch.zeros((n, v), dtype=dtype, device=device) if need_grad else None
    grad = torch.empty((n, v), dtype=dtype, device=device) if need_grad else None
    rows = max(1, _CHUNK_ELEMENTS // max(v, 1))
    base: Callable[..., torch.Tensor] = fn
    w = None
    if isinstance(fn, functools.partial):  # JS and skew: the keyword is the weight, β or α
        base, (w,) = fn.func, fn.keywords.values()
    native = _NATIVE.get(base)
    if native is not None and not (dtype == torch.float32 and native_engine.usable(native, device)):
        native = None
    step = rows
    if native is not None and student.dtype == teacher.dtype == torch.float32:
        step = max(n, 1)  # the kernel walks the rows itself; chunks bound half copies
    work: list[torch.Tensor] = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        s = student[start:stop].to(dtype)
        t = teacher[start:stop].to(dtype)
        k = None if keep is None else keep[start:stop]
        g = None if grad is None else grad[start:stop]
        if native is not None:
            val = _native_chunk(native, fn, s, t, k, g, temperature, rows, work, w, maps)
        else:
            val = _tensor_chunk(fn, s, t, k, g, temperature, work, maps)
        values[start:stop] = val
    # Every kind is >= 0, but float32 terms can round a row's sum below it (identical rows
    # read about -1e-8 where the core's exact mixture gives 0): the bound is closer to the
    # truth. NaN rows stay NaN; the gradient, computed apart, is unchanged.
    return values.clamp_min_(0.0), grad


def _native_chunk(
    native: str,
    fn: Kernel,
    s: torch.Tensor,
    t: torch.Tensor,
    k: torch.Tensor | None,
    g: torch.Tensor | None,
    temperature: float,
    rows: int,
    work: list[torch.Tensor],
    w: float | None = None,
    maps: Maps | None = None,
) -> torch.Tensor:
    """One chunk through the compiled kernel (``w``: the weight of JS and the skew kinds);
    the rows it flags (+inf or NaN logits, all −inf on a side, infinite reverse KL; see
    :func:`.native.rows`) through :func:`_tensor_chunk` with the same ``fn``, ``rows``
    at a time."""
    s = s if s.stride(-1) == 1 else s.contiguous()
    t = t if t.stride(-1) == 1 else t.contiguous()
    k = None if k is None else k.contiguous()
    val, flagged = native_engine.rows(native, s, t, k, 1.0 / temperature, g, w, maps)
    if bool(flagged.any()):
        index = flagged.nonzero().squeeze(-1)
        for part in index.split(rows):
            gp = None if g is None else torch.empty((part.numel(), s.shape[1]), dtype=g.dtype)
            val[part] = _tensor_chunk(fn, s[part], t[part], None, gp, temperature, work, maps).to(
                val.dtype
            )
            if g is not None:
                assert gp is not None  # allocated above whenever g is
                g[part] = gp
    return val


def _tensor_chunk(
    fn: Kernel,
    s: torch.Tensor,
    t: torch.Tensor,
    k: torch.Tensor | None,
    g: torch.Tensor | None,
    temperature: float,
    work: list[torch.Tensor],
    maps: Maps | None = None,
) -> torch.Tensor:
    """One chunk of rows in tensor code: values ``[r]``, and the gradient into ``g``.
    ``work`` holds the from-logits kernels' three buffers between chunks; ``maps`` as in
    :func:`chunked_forward`."""
    inv_t = 1.0 / temperature
    partial = k is not None and not bool(k.all())
    if partial:
        assert k is not None  # partial implies a mask
        # masked rows may hold anything (NaN included): overwrite before any arithmetic
        s = torch.where(k[:, None], s, 0.0)
        t = torch.where(k[:, None], t, 0.0)
    ds = None
    if maps is not None:
        t_map, s_map = maps
        if not s_map.identity:
            ds = None if g is None else spec.map_grad(torch, s, s_map)
            s = spec.apply_map(torch, s, s_map)
        if not t_map.identity:
            t = spec.apply_map(torch, t, t_map)
    if temperature != 1.0:
        s = s * inv_t
        t = t * inv_t
    val = None
    from_logits = _FROM_LOGITS.get(fn)  # type: ignore[arg-type]
    if from_logits is not None:
        r = s.shape[0]
        if not work or work[0].shape[0] < r or work[0].dtype != s.dtype:
            work[:] = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for _ in range(3)]
        val = from_logits(s, t, g, work)
    if val is None:
        val = fn(torch.log_softmax(t, -1), torch.log_softmax(s, -1), g)
    if g is not None:
        if temperature != 1.0:
            g.mul_(inv_t)
        if ds is not None:
            g.mul_(ds)
        if partial:
            assert k is not None
            g.masked_fill_(~k[:, None], 0.0)
    if partial:
        assert k is not None
        val = torch.where(k, val, 0.0)
    return val


LOGITS = ("logits", "logits")


def spec_forward(
    kind: str,
    w: float,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    temperature: float,
    forms: tuple[str, str],
    need_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row ``D(teacher‖student)`` ``[N]`` (skipped rows 0) of ``[N, V]`` inputs through the
    row specification (:func:`kldiv._spec.rows`: value, ``h_p = ∂D/∂lp``, ``h_q = ∂D/∂lq``)
    in cache-sized row chunks, and, if asked, the gradients of their sum with respect to the
    student and to the teacher (``[N, V]`` float32, skipped rows 0), for what the kernels
    leave: log-probabilities on either side (``forms``, teacher first; taken as given, so the
    gradient is ``h`` itself) and a teacher that needs a gradient. A side given as logits is
    divided by ``temperature`` (both are logits then) and its gradient goes through the
    softmax, ``(h − s·Σh)/T``. ``w`` is β for ``js`` and α for the skew kinds. Float32
    arithmetic for float32 and half inputs.

    Rows the specification does not decide as the core does go to the core, row by row with
    its autograd: a kept row with a NaN or ``+inf`` entry, or with every entry ``−inf``, on
    either side (the core's NaN and infinity propagation, gradients included)."""
    n, v = student.shape
    device = student.device
    values = torch.empty(n, dtype=torch.float32, device=device)
    grads = [
        torch.empty((n, v), dtype=torch.float32, device=device) if need else None
        for need in (need_grad, teacher_grad)
    ]
    rows = max(1, _CHUNK_ELEMENTS // max(v, 1))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        k = None if keep is None else keep[start:stop]
        gs, gt = (None if g is None else g[start:stop] for g in grads)
        values[start:stop] = _spec_chunk(
            kind, w, student[start:stop], teacher[start:stop], k, gs, gt, temperature, forms
        )
    if forms == LOGITS:
        # as in chunked_forward: float32 rounding can take a row's sum just below 0
        # (log-probabilities are taken as given, normalised or not, as the core takes them)
        values.clamp_min_(0.0)
    return values, grads[0], grads[1]


def _spec_chunk(
    kind: str,
    w: float,
    s: torch.Tensor,
    t: torch.Tensor,
    k: torch.Tensor | None,
    gs: torch.Tensor | None,
    gt: torch.Tensor | None,
    temperature: float,
    forms: tuple[str, str],
) -> torch.Tensor:
    """One chunk of :func:`spec_forward`: values ``[r]``, the gradients into ``gs``/``gt``."""
    s, t = s.float(), t.float()
    partial = k is not None and not bool(k.all())
    if partial:
        assert k is not None  # partial implies a mask
        # skipped rows may hold anything (NaN included): overwrite before any arithmetic
        s = torch.where(k[:, None], s, 0.0)
        t = torch.where(k[:, None], t, 0.0)
    # a row maximum that is not finite: a NaN or +inf entry, or every entry -inf
    flagged = ~(torch.isfinite(s.amax(-1)) & torch.isfinite(t.amax(-1)))
    sides = []
    for x, form in ((t, forms[0]), (s, forms[1])):
        if form == "logits":
            x = torch.log_softmax(x / temperature if temperature != 1.0 else x, -1)
        sides.append(x)
    lt, ls = sides
    # The plain formulas first (no zero-support masks: about half the elementwise work);
    # a row whose value or Σh comes out non-finite (a zero probability, a zero against a
    # positive one, an underflowing mixture) is recomputed with the exact ones, which
    # agree with the plain ones up to rounding on every other row (see kldiv._spec.rows).
    value, h_t, h_s = spec.rows(kind, lt, ls, w, teacher_grad=gt is not None, exact=False)
    sum_s = h_s.sum(-1, keepdim=True)
    sum_t = None if h_t is None else h_t.sum(-1, keepdim=True)
    plain_bad = ~torch.isfinite(value) | ~torch.isfinite(sum_s[:, 0])
    if sum_t is not None:
        plain_bad |= ~torch.isfinite(sum_t[:, 0])
    plain_bad &= ~flagged  # those go to the core below
    if bool(plain_bad.any()):
        index = plain_bad.nonzero().squeeze(-1)
        value[index], he_t, he_s = spec.rows(
            kind, lt[index], ls[index], w, teacher_grad=gt is not None
        )
        h_s[index] = he_s
        sum_s[index] = he_s.sum(-1, keepdim=True)
        if h_t is not None and sum_t is not None:
            h_t[index] = he_t
            sum_t[index] = he_t.sum(-1, keepdim=True)
    for g, h, total, lx, form in ((gs, h_s, sum_s, ls, forms[1]), (gt, h_t, sum_t, lt, forms[0])):
        if g is None:
            continue
        g.copy_(spec.through_softmax(h, lx, temperature, total) if form == "logits" else h)
        if partial:
            assert k is not None
            g.masked_fill_(~k[:, None], 0.0)
    if partial:
        assert k is not None
        value = torch.where(k, value, 0.0)
    if bool(flagged.any()):
        index = flagged.nonzero().squeeze(-1)
        value[index] = _core_chunk(kind, w, s[index], t[index], gs, gt, index, temperature, forms)
    return value


def _core_chunk(
    kind: str,
    w: float,
    s: torch.Tensor,
    t: torch.Tensor,
    gs: torch.Tensor | None,
    gt: torch.Tensor | None,
    index: torch.Tensor,
    temperature: float,
    forms: tuple[str, str],
) -> torch.Tensor:
    """The core's values of these rows, and its gradients written into ``gs``/``gt``."""
    beta, alpha = _beta_alpha(kind, w)
    with torch.enable_grad():
        xs = [x.detach().requires_grad_(g is not None) for x, g in ((s, gs), (t, gt))]
        values = dispatch.core_rows(kind, xs[0], xs[1], None, temperature, beta, alpha, forms=forms)
        wrt = [(x, g) for x, g in zip(xs, (gs, gt), strict=True) if g is not None]
        if wrt:
            found = torch.autograd.grad(
                values, [x for x, _ in wrt], torch.ones_like(values), allow_unused=True
            )
            for (_, g), d in zip(wrt, found, strict=True):
                assert g is not None  # in wrt
                g[index] = 0.0 if d is None else d
    return values.detach()


class ChunkedDivergence(torch.autograd.Function):
    """``(student, teacher, keep) -> per-row values``; backward returns ``grad_out[:, None] ⊙
    G`` for the student (and the teacher, on the row-specification path), with G computed in
    the forward pass (one pass over memory) and scaled in place by the first backward (no
    second ``[N, V]`` buffer).

    ``config`` None: the kernels of :func:`chunked_forward` (logits on both sides, the
    student alone differentiable). Otherwise ``(w, forms)``: :func:`spec_forward`, which
    also takes log-probabilities and gives the teacher its gradient.

    Only recomputations read the inputs again, so only they care whether the inputs were
    modified in place after the forward (PyTorch then raises its usual error): a second
    backward through a retained graph (the first consumed G) recomputes G with the same
    engine, and ``create_graph=True`` (Hessian-vector products, natural-gradient and TRPO
    steps) recomputes the gradient through the core, whose gradient is itself differentiable;
    G, computed without a graph, would make every second derivative silently 0. Skipped rows
    (``keep`` False) get a zero gradient whatever their ``grad_output``, NaN included."""

    @staticmethod
    def forward(
        ctx: Any,
        student: torch.Tensor,
        teacher: torch.Tensor,
        keep: torch.Tensor | None,
        kind: str,
        temperature: float,
        beta: float,
        alpha: float = SKEW_ALPHA,
        config: tuple[float, tuple[str, str]] | None = None,
        maps: Maps | None = None,
    ) -> torch.Tensor:
        ctx.save_for_backward(student, teacher)
        ctx.keep = keep
        ctx.dtypes = (student.dtype, teacher.dtype)
        ctx.config = (kind, temperature, beta, alpha, config)
        ctx.maps = maps
        values, *grads = _forward(ctx, student, teacher, *ctx.needs_input_grad[:2])
        ctx.grads = grads  # not saved: the first backward takes them and scales them in place
        return values

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        rest = (None,) * 7  # keep, kind, temperature, beta, alpha, config, maps
        needs = ctx.needs_input_grad[:2]
        if not any(needs):
            return (None, None, *rest)
        if ctx.keep is not None:
            grad_out = torch.where(ctx.keep, grad_out, 0.0)
        # the inputs are read (and so checked for in-place edits) only to recompute
        if torch.is_grad_enabled():
            student, teacher = ctx.saved_tensors
            ctx.grads = [None, None]  # not used by this or any later backward: free them
            outs = _core_grads(ctx, student, teacher, grad_out, needs)
            return (*outs, *rest)
        grads, ctx.grads = ctx.grads, [None, None]
        if any(g is None for g, need in zip(grads, needs, strict=True) if need):
            # a second backward through a retained graph
            _, *grads = _forward(ctx, *ctx.saved_tensors, *needs)
        scale = grad_out[:, None]
        outs = [
            None if g is None or not need else g.mul_(scale.to(g.dtype)).to(dtype)
            for g, need, dtype in zip(grads, needs, ctx.dtypes, strict=True)
        ]
        return (*outs, *rest)


def _forward(
    ctx: Any, student: torch.Tensor, teacher: torch.Tensor, need_s: bool, need_t: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    kind, temperature, beta, alpha, config = ctx.config
    # autocast would run the chunks' reductions (vecdot) in bfloat16 on CPU
    with torch.autocast(student.device.type, enabled=False):
        s, t = student.detach(), teacher.detach()
        if config is None:
            values, grad = chunked_forward(
                kind, s, t, ctx.keep, temperature, need_s, beta, alpha=alpha, maps=ctx.maps
            )
            return values, grad, None
        w, forms = config
        return spec_forward(kind, w, s, t, ctx.keep, temperature, forms, need_s, need_t)


def _core_grads(
    ctx: Any,
    student: torch.Tensor,
    teacher: torch.Tensor,
    grad_out: torch.Tensor,
    needs: tuple[bool, bool],
) -> list[torch.Tensor | None]:
    """The gradients recomputed through the core with a graph (``create_graph=True``)."""
    kind, temperature, beta, alpha, config = ctx.config
    forms = LOGITS if config is None else config[1]
    values = dispatch.core_rows(
        kind, student, teacher, ctx.keep, temperature, beta, alpha, forms=forms, maps=ctx.maps
    )
    wrt = [x for x, need in zip((student, teacher), needs, strict=True) if need]
    found = iter(torch.autograd.grad(values, wrt, grad_out, create_graph=True, allow_unused=True))
    return [(next(found) if need else None) for need in needs]


def per_row(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    temperature: float,
    beta: float = JS_BETA,
    *,
    alpha: float = SKEW_ALPHA,
    maps: Maps | None = None,
) -> torch.Tensor:
    """Per-row divergence through the fast path; rows flattened and options validated by the
    caller (DistillationLoss); ``maps`` as in :func:`chunked_forward`."""
    return ChunkedDivergence.apply(
        student, teacher, keep, kind, temperature, beta, alpha, None, maps
    )


def spec_per_row(
    kind: str,
    w: float,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    temperature: float,
    forms: tuple[str, str],
) -> torch.Tensor:
    """Per-row divergence through the row specification in row chunks (:func:`spec_forward`),
    differentiable with respect to both sides; rows flattened by the caller."""
    beta, alpha = _beta_alpha(kind, w)
    return ChunkedDivergence.apply(
        student, teacher, keep, kind, temperature, beta, alpha, (w, forms)
    )


def _beta_alpha(kind: str, w: float) -> tuple[float, float]:
    """The core's ``beta`` and ``alpha`` for a kind's weight ``w`` (the other at its default)."""
    params = dict.fromkeys(KIND_PARAMS.get(kind, {}), w)
    return params.get("beta", JS_BETA), params.get("alpha", SKEW_ALPHA)
