"""Triton kernels of DistillationLoss (layer 1 of 3: jit kernels → launcher → autograd).

One program per row of ``[N, V]`` logits, looping over the vocabulary in ``BLOCK`` columns, in
float32 whatever the storage dtype. ``s`` is the student, ``t`` the teacher, both already divided
by the temperature (``x' = x·inv_t``); ``lq``/``lp`` their log-probabilities, ``q``/``p`` their
probabilities. Every divergence D(T‖S) is a row sum ``Σ_j f(p_j, q_j)``, and its gradient with
respect to the student's logits is, through the softmax,

    ∂D/∂z_j = (h_j − q_j·c)·inv_t,   h_j = q_j·∂f/∂q_j,   c = Σ_k h_k.

The forward kernel computes the row statistics (the maxima ``m`` and ``log z``, ``z = Σ
e^(x − m)``, the loss and ``c``), the backward kernel one pass that reads both rows and writes
the gradient. For KL and reverse KL the forward is a single online pass (the loss is
``Σ p·δ − log(z_t/z_s)`` with ``δ = (t' − m_t) − (s' − m_s)``, accumulated against the
running maxima and rebased when a block raises them, so that logits are never differenced raw
and a constant offset between the two costs no precision); the mixture
divergences and TV need the normalisers first, so they read the rows twice. Log-probabilities
are always formed as ``(x' − m) − log z``, never ``x' − lse``. Nothing of size ``[N, V]`` is
allocated besides the gradient, in the student's dtype.

Each side's logits may first go through its logit map (the heads' ``logit_scale`` and
soft-capping, :class:`kldiv._spec.LogitMap`; ``S_MAP``/``T_MAP``: 0 none, 1 ``mul·x``, 2
``cap·tanh(mul·x)`` with ``±inf`` kept), applied wherever a kernel reads them, before
``inv_t``; the backward multiplies the gradient by the student map's derivative.

Zero support as in the core (``kldiv._math``): a ``-inf`` logit is a zero probability; terms
with ``p = 0`` (``f`` of KL) are 0 and carry no gradient; ``p > 0 = q`` gives ``+inf`` even when
``p`` underflows. Masked rows (``keep = 0``) are never read: loss 0, gradient 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...._kinds import KIND_CODES

# Kinds, as constexpr integers: their codes in the registry, which the launcher passes.
KL: tl.constexpr = KIND_CODES["kl"]
REVERSE_KL: tl.constexpr = KIND_CODES["reverse_kl"]
JS: tl.constexpr = KIND_CODES["js"]
SKEW_KL: tl.constexpr = KIND_CODES["skew_kl"]
SKEW_REVERSE_KL: tl.constexpr = KIND_CODES["skew_reverse_kl"]
TV: tl.constexpr = KIND_CODES["tv"]

# The online sums Σ e·δ are kept scaled by 2^-32: unnormalised (e ≤ 1, so up to V·max|δ|) they
# would overflow float32 for logits near 3e38 where the normalised value does not. A power of
# two costs no precision (terms below 2^-94 turn subnormal, far under the rounding of the row).
ACC_SCALE: tl.constexpr = 2.0**-32
ACC_UNSCALE: tl.constexpr = 2.0**32
NEG_INF: tl.constexpr = float("-inf")
POS_INF: tl.constexpr = float("inf")


@triton.jit
def _log_mix(la, lb, wa, wb):
    """log(wa·e^la + wb·e^lb) for weights in (0, 1): the larger term is factored out, so the
    log is of a sum of positive terms (well conditioned); both zero gives -inf."""
    a_hi = la >= lb
    hi = tl.where(a_hi, la, lb)
    lo = tl.where(a_hi, lb, la)
    dead = hi == NEG_INF
    d = tl.where(dead, 0.0, lo - hi)
    w_hi = tl.where(a_hi, wa, wb)
    w_lo = tl.where(a_hi, wb, wa)
    return tl.where(dead, NEG_INF, hi + tl.log(w_hi + w_lo * tl.exp(d)))


@triton.jit
def _terms(lp, lq, w, KIND: tl.constexpr):
    """Elementwise ``(f, h)`` of the divergence D(P‖Q) for the mixture kinds and TV; ``w`` is
    beta (JS, weight on P) or alpha (skew, weight on the first argument), in (0, 1)."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    p0 = lp == NEG_INF
    q0 = lq == NEG_INF
    if KIND == JS:
        lm = _log_mix(lp, lq, w, 1.0 - w)
        f_p = tl.where(p0, 0.0, w * p * (lp - lm))
        g_q = tl.where(q0, 0.0, (1.0 - w) * (lq - lm))
        f = f_p + q * g_q
        h = q * g_q
    elif KIND == SKEW_KL:
        # KL(P ‖ αP + (1−α)Q): finite for α > 0; ∂f/∂q = −(1−α)·p/m
        lm = _log_mix(lp, lq, w, 1.0 - w)
        f = tl.where(p0, 0.0, p * (lp - lm))
        h = tl.where(p0 | q0, 0.0, -(1.0 - w) * tl.exp(lp + lq - lm))
    elif KIND == SKEW_REVERSE_KL:
        # KL(Q ‖ αQ + (1−α)P): ∂f/∂q = log(q/m) + 1 − α·q/m
        lm = _log_mix(lq, lp, w, 1.0 - w)
        f = tl.where(q0, 0.0, q * (lq - lm))
        h = tl.where(q0, 0.0, q * (lq - lm + 1.0) - w * tl.exp(2.0 * lq - lm))
    else:  # TV: ½|p − q|, slope 0 at ties as in the core
        diff = q - p
        f = 0.5 * tl.abs(diff)
        sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        h = 0.5 * q * sign
    return f, h


@triton.jit
def _tanh(y):
    """tanh in float32: an odd polynomial below |y| = 0.625 (where 1 − e^(−2|y|) cancels), else
    (1 − e)/(1 + e) with e = e^(−2|y|), the sign restored (the C kernel's formula)."""
    ay = tl.abs(y)
    z = y * y
    r = -5.70498872745e-3 * z + 2.06390887954e-2
    r = r * z - 5.37397155531e-2
    r = r * z + 1.33314422036e-1
    r = r * z - 3.33332819422e-1
    small = r * z * y + y
    e = tl.exp(-2.0 * ay)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(y < 0.0, -big, big)
    return tl.where(ay < 0.625, small, big)


@triton.jit
def _map(x, mul, cap, MAP: tl.constexpr):
    """A side's logit map (see the module doc); ``±inf`` stay."""
    y = x
    if MAP == 1:
        y = x * mul
    elif MAP == 2:
        inf = (x == POS_INF) | (x == NEG_INF)
        y = tl.where(inf, x, cap * _tanh(tl.where(inf, 0.0, x) * mul))
    return y


@triton.jit
def _load_mapped(row, cols, inside, mul, cap, inv_t, MAP: tl.constexpr):
    """A block of one side's logits in float32 (``-inf`` past the row), mapped and divided by
    the temperature."""
    x = tl.load(row + cols, mask=inside, other=NEG_INF).to(tl.float32)
    return _map(x, mul, cap, MAP) * inv_t


@triton.jit
def _map_grad(x, mul, cap, MAP: tl.constexpr):
    """The map's derivative: ``mul``, or ``cap·mul·(1 − tanh²(mul·x))`` (0 at ``±inf``)."""
    d = tl.full(x.shape, 1.0, tl.float32)
    if MAP == 1:
        d = d * mul
    elif MAP == 2:
        inf = (x == POS_INF) | (x == NEG_INF)
        th = _tanh(tl.where(inf, 0.0, x) * mul)
        d = tl.where(inf, 0.0, (cap * mul) * (1.0 - th * th))
    return d


@triton.jit
def _online_update(m, z, x):
    """Running max ``m`` and ``z = Σ e^(x − m)`` after one block ``x`` (``-inf`` padded); also
    returns the factor that rescales anything accumulated against the old max."""
    m_new = tl.maximum(m, tl.max(x, 0))
    scale = tl.where(m_new == NEG_INF, 1.0, tl.exp(m - m_new))
    e = tl.where(x == NEG_INF, 0.0, tl.exp(x - m_new))
    return m_new, z * scale + tl.sum(e, 0), scale, e


@triton.jit
def _rebase(acc, w_in, inf_hit, up_other, up_own, scale):
    """The summed terms after a block raised the maxima: their weights (this side's) scale by
    ``scale = e^-up_own`` and their δ moves by ``up_other − up_own``. A weight scaled to 0
    drops the terms (no 0·inf); a δ moved to +inf (the other side's maximum jumped past the
    float32 range) makes them infinite terms, counted in inf_hit and dropped from the sums."""
    moved = up_other - up_own
    gone = (w_in == 0.0) | (scale == 0.0)
    to_inf = ~gone & (moved == POS_INF)
    keep = ~gone & ~to_inf
    acc = tl.where(keep, (acc + w_in * (moved * ACC_SCALE)) * scale, 0.0)
    w_in = tl.where(keep, w_in * scale, 0.0)
    return acc, w_in, tl.where(to_inf, 1.0, inf_hit)


@triton.jit
def _with_inf(finite, inf_hit, z_s, z_t):
    """The row's value: +inf where a term is, NaN where the sum is NaN (NaN logits) or a row
    has no mass at all (all −inf logits: no distribution), as in the core."""
    invalid = (finite != finite) | (z_s == 0.0) | (z_t == 0.0)
    return tl.where(invalid, float("nan"), tl.where(inf_hit > 0, POS_INF, finite))


@triton.jit
def distill_forward_kernel(
    s_ptr, t_ptr, keep_ptr,
    loss_ptr, m_s_ptr, lz_s_ptr, m_t_ptr, lz_t_ptr, c_ptr,
    stride_s, stride_t, V, inv_t, w, s_mul, s_cap, t_mul, t_cap,
    HAS_KEEP: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr,
    S_MAP: tl.constexpr, T_MAP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    n_cols = V
    if HAS_KEEP:
        # a masked row loops zero times: its data (NaN included) is never read
        n_cols = tl.where(tl.load(keep_ptr + row) != 0, V, 0)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    cols0 = tl.arange(0, BLOCK)
    m_s = tl.full((), NEG_INF, tl.float32)
    m_t = tl.full((), NEG_INF, tl.float32)
    z_s = tl.zeros((), tl.float32)
    z_t = tl.zeros((), tl.float32)
    # KL: acc = Σ e^(t'−m_t)·δ with δ = (t' − m_t) − (s' − m_s), over the summed terms, whose
    # weights Σ e^(t'−m_t) are w_in; reverse KL the mirror (e^(s'−m_s), δ = (s'−m_s) − (t'−m_t)).
    # Both are kept against the running maxima: when a block raises them, the old terms'
    # weights scale by e^(m − m_new) and their δ moves by the increments (the online softmax
    # rebase), so no logit is differenced against a stale reference and a row whose maximum
    # comes late loses no precision. Logits are shifted by their own row's maximum before the
    # two are differenced, so a constant offset between teacher and student costs none either.
    acc = tl.zeros((), tl.float32)
    w_in = tl.zeros((), tl.float32)
    inf_hit = tl.zeros((), tl.float32)  # a p > 0 = q term (KL) or q > 0 = p term (RKL)
    for off in range(0, n_cols, BLOCK):
        cols = off + cols0
        inside = cols < V
        s = _load_mapped(s_row, cols, inside, s_mul, s_cap, inv_t, S_MAP)
        t = _load_mapped(t_row, cols, inside, t_mul, t_cap, inv_t, T_MAP)
        m_s_old = m_s
        m_t_old = m_t
        m_s, z_s, scale_s, e_s = _online_update(m_s, z_s, s)
        m_t, z_t, scale_t, e_t = _online_update(m_t, z_t, t)
        live = (s != NEG_INF) & (t != NEG_INF)
        # Logits near ±3e38 overflow a shifted difference to ±inf. δ = +inf is a p > 0 = q
        # term (KL; q > 0 = p for RKL) whatever the weight, as in the core; it is counted in
        # inf_hit, never summed (inf·0 after a rescale would be NaN). A zero weight is a
        # zero term: its δ may be −inf or NaN.
        if KIND == KL:
            d = (t - m_t) - (s - m_s)
            hit = (t != NEG_INF) & ((s == NEG_INF) | (d == POS_INF))
            summed = live & ~hit & (e_t > 0.0)
            acc, w_in, inf_hit = _rebase(acc, w_in, inf_hit, m_s - m_s_old, m_t - m_t_old, scale_t)
            acc += tl.sum(tl.where(summed, e_t * (d * ACC_SCALE), 0.0), 0)
            w_in += tl.sum(tl.where(summed, e_t, 0.0), 0)
            inf_hit = tl.maximum(inf_hit, tl.max(hit.to(tl.float32), 0))
        elif KIND == REVERSE_KL:
            d = (s - m_s) - (t - m_t)
            hit = (s != NEG_INF) & ((t == NEG_INF) | (d == POS_INF))
            summed = live & ~hit & (e_s > 0.0)
            acc, w_in, inf_hit = _rebase(acc, w_in, inf_hit, m_t - m_t_old, m_s - m_s_old, scale_s)
            acc += tl.sum(tl.where(summed, e_s * (d * ACC_SCALE), 0.0), 0)
            w_in += tl.sum(tl.where(summed, e_s, 0.0), 0)
            inf_hit = tl.maximum(inf_hit, tl.max(hit.to(tl.float32), 0))

    lz_s = tl.log(z_s)
    lz_t = tl.log(z_t)
    if KIND == KL:
        # lp − lq = δ − log(z_t/z_s)
        loss = _with_inf((acc / z_t) * ACC_UNSCALE - tl.log(z_t / z_s), inf_hit, z_s, z_t)
        c = tl.full((), -1.0, tl.float32)  # Σ h = −Σ p = −1: the gradient is q − p
    elif KIND == REVERSE_KL:
        # Σ q·(lq − lp) over the summed terms, whose Σ q is w_in/z_s (1 without q > 0 = p
        # terms). Where there are such terms the value is +inf and, as in the core, they are
        # left out of the gradient: h = 0 there and c sums the finite terms only.
        q_in = w_in / z_s
        finite = (acc / z_s) * ACC_UNSCALE - tl.log(z_s / z_t) * q_in
        loss = _with_inf(finite, inf_hit, z_s, z_t)
        c = finite + q_in
    else:
        loss = tl.zeros((), tl.float32)
        c = tl.zeros((), tl.float32)
        for off in range(0, n_cols, BLOCK):
            cols = off + cols0
            inside = cols < V
            s = _load_mapped(s_row, cols, inside, s_mul, s_cap, inv_t, S_MAP)
            t = _load_mapped(t_row, cols, inside, t_mul, t_cap, inv_t, T_MAP)
            f, h = _terms((t - m_t) - lz_t, (s - m_s) - lz_s, w, KIND)
            loss += tl.sum(tl.where(inside, f, 0.0), 0)
            c += tl.sum(tl.where(inside, h, 0.0), 0)

    if HAS_KEEP:
        kept = n_cols > 0
        loss = tl.where(kept, loss, 0.0)
        c = tl.where(kept, c, 0.0)
        m_s = tl.where(kept, m_s, 0.0)
        m_t = tl.where(kept, m_t, 0.0)
        lz_s = tl.where(kept, lz_s, 0.0)
        lz_t = tl.where(kept, lz_t, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(m_s_ptr + row, m_s)
    tl.store(lz_s_ptr + row, lz_s)
    tl.store(m_t_ptr + row, m_t)
    tl.store(lz_t_ptr + row, lz_t)
    tl.store(c_ptr + row, c)


@triton.jit
def distill_backward_kernel(
    s_ptr, t_ptr, keep_ptr, go_ptr, m_s_ptr, lz_s_ptr, m_t_ptr, lz_t_ptr, c_ptr, grad_ptr,
    stride_s, stride_t, stride_g, stride_go, V, inv_t, w, s_mul, s_cap, t_mul, t_cap,
    HAS_KEEP: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr,
    S_MAP: tl.constexpr, T_MAP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    g_row = grad_ptr + row * stride_g
    cols0 = tl.arange(0, BLOCK)
    go = tl.load(go_ptr + row * stride_go).to(tl.float32) * inv_t
    m_s = tl.load(m_s_ptr + row)
    lz_s = tl.load(lz_s_ptr + row)
    m_t = tl.load(m_t_ptr + row)
    lz_t = tl.load(lz_t_ptr + row)
    c = tl.load(c_ptr + row)
    kept = 1
    if HAS_KEEP:
        kept = tl.load(keep_ptr + row) != 0
    if kept:
        for off in range(0, V, BLOCK):
            cols = off + cols0
            inside = cols < V
            s_raw = tl.load(s_row + cols, mask=inside, other=NEG_INF).to(tl.float32)
            s = _map(s_raw, s_mul, s_cap, S_MAP) * inv_t
            t = _load_mapped(t_row, cols, inside, t_mul, t_cap, inv_t, T_MAP)
            lq = (s - m_s) - lz_s
            lp = (t - m_t) - lz_t
            q = tl.exp(lq)
            if KIND == KL:
                g = q - tl.exp(lp)
            elif KIND == REVERSE_KL:
                # q = 0 terms carry no gradient (lq − lp may read −inf or NaN there)
                h = tl.where((q == 0.0) | (lp == NEG_INF), 0.0, q * (lq - lp + 1.0))
                g = h - q * c
            else:
                f, h = _terms(lp, lq, w, KIND)
                g = h - q * c
            if S_MAP != 0:
                g = g * _map_grad(s_raw, s_mul, s_cap, S_MAP)
            tl.store(g_row + cols, (g * go).to(grad_ptr.dtype.element_ty), mask=inside)
    else:
        zero = tl.zeros((BLOCK,), grad_ptr.dtype.element_ty)
        for off in range(0, V, BLOCK):
            cols = off + cols0
            tl.store(g_row + cols, zero, mask=cols < V)
