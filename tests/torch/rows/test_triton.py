"""The Triton kernels of DistillationLoss against the core in float64: every divergence ×
dtype, temperature, masked and fully masked rows, -inf logits, grad_output ≠ 1, odd shapes
(V not a multiple of the block), and the torch.library custom ops under torch.compile.

Without a GPU they run on CPU tensors in Triton's interpreter (conftest sets TRITON_INTERPRET=1
before the kernels are imported); with one, on CUDA tensors, compiled.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import kldiv
from kldiv._kinds import ENGINE_KINDS
from kldiv.torch import DistillationLoss
from kldiv.torch._rows.triton import ops as O

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIVS = list(ENGINE_KINDS)
PARAM = {"js": "beta", "skew_kl": "alpha", "skew_reverse_kl": "alpha"}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(rng, n, v, dtype, scale=2.0):
    s = rng.normal(scale=scale, size=(n, v))
    t = rng.normal(scale=scale, size=(n, v))
    t[:, :3][rng.random((n, 3)) < 0.3] = -np.inf  # the teacher rules tokens out
    s[:, 5][rng.random(n) < 0.2] = -np.inf  # the student too, where the teacher may not
    s[1, 7] = t[1, 7] = -np.inf  # both
    keep = rng.random(n) > 0.25
    keep[0] = True
    s[~keep] = np.nan  # masked rows are never read
    # the reference sees the same rounded values the kernel reads
    st = torch.tensor(s).to(dtype)
    tt = torch.tensor(t).to(dtype)
    return st.to(DEVICE), tt.to(DEVICE), torch.tensor(keep, device=DEVICE)


def reference(kind, st, tt, keep, temperature, w, go):
    s64 = st.double().cpu().requires_grad_(True)
    params = {PARAM[kind]: w} if kind in PARAM else {}
    ref = kldiv.divergence(
        tt.double().cpu(),
        s64,
        kind,
        form="logits",
        temperature=temperature,
        mask=keep.cpu(),
        reduction="none",
        **params,
    )
    ref = torch.where(keep.cpu(), ref, 0.0)
    (g,) = torch.autograd.grad((ref * go.double().cpu()).sum(), s64)
    return ref.detach(), torch.where(keep.cpu()[:, None], g, 0.0)


def close_or_both_inf(a, b, rtol, atol):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.equal(torch.isinf(a), torch.isinf(b)), (a, b)
    fin = torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", DIVS)
def test_kernels_against_the_core(rng, kind, dtype):
    n, v = 37, 1271  # V is not a multiple of the block: the last block is partial
    st, tt, keep = make(rng, n, v, dtype)
    w = 0.3
    go = torch.rand(n, dtype=torch.float32, device=DEVICE) + 0.5
    ref, gref = reference(kind, st, tt, keep, 1.7, w, go)
    s = st.clone().requires_grad_(True)
    # a block of 256 makes five online-softmax steps a row
    out = O.per_row(kind, s, tt, keep, 1.7, w, block=256)
    (g,) = torch.autograd.grad((out * go).sum(), s)
    assert out.dtype == torch.float32 and g.dtype == dtype
    close_or_both_inf(out, ref, rtol=2e-5, atol=2e-6)
    assert not g.isnan().any() and g.isfinite().all()
    # float32 arithmetic throughout; a half-precision gradient is rounded once, at the store
    eps = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    rows = torch.ones(n, dtype=torch.bool)
    if kind == "tv":
        rows = comparable_tv_rows(st, tt, keep, 1.7)
    torch.testing.assert_close(g.double().cpu()[rows], gref[rows], rtol=2 * eps, atol=1e-6)


@pytest.mark.parametrize("kind", DIVS)
def test_logits_near_the_float32_limit_in_a_later_block(rng, kind):
    """The online pass meets logits near ±3e38 only after its first block has set the
    running maxima: no NaN, the float64 core's value rounded to float32 (+inf where it
    exceeds the float32 range) and its gradient wherever the value is finite."""
    n, v = 6, 40
    s = rng.uniform(-1.0, 1.0, size=(n, v))
    t = rng.uniform(-1.0, 1.0, size=(n, v))
    big = [
        (3e38, -3e38),
        (-3e38, 3e38),
        (1.5e38, -1.5e38),
        (3e38, 0.0),
        (0.0, 3e38),
        (-3e38, -3e38),
    ]
    for i, (a, b) in enumerate(big):
        s[i, 20 + i], t[i, 20 + i] = a, b
        t[i, 33] = -a  # a second huge entry, in the last (partial) block
    st = torch.tensor(s, dtype=torch.float32, device=DEVICE)
    tt = torch.tensor(t, dtype=torch.float32, device=DEVICE)
    keep = torch.ones(n, dtype=torch.bool, device=DEVICE)
    go = torch.ones(n, dtype=torch.float32, device=DEVICE)
    for temperature in (1.0, 2.0):
        x = st.clone().requires_grad_(True)
        out = O.per_row(kind, x, tt, keep, temperature, 0.3, block=16)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert not out.isnan().any() and not g.isnan().any(), (temperature, out, g)
        ref, gref = reference(kind, st, tt, keep, temperature, 0.3, go)
        # a value above the float32 range is +inf in float32; every other one is rounded
        # once (relative 2^-24) after sums whose terms are up to 3e38: a few ulp of that
        expect = torch.where(ref > torch.finfo(torch.float32).max, math.inf, ref)
        close_or_both_inf(out, expect, rtol=1e-5, atol=1e-5)
        fin = expect.isfinite()
        # the gradient h − q·Σh differences terms up to q·3e38: a few float32 ulp of those
        # (32 allowed), not of the difference, bound its error
        q = torch.softmax(st.double().cpu() / temperature, -1)
        lq = torch.log_softmax(st.double().cpu() / temperature, -1)
        lp = torch.log_softmax(tt.double().cpu() / temperature, -1)
        h = torch.where(q > 0, q * ((lq - lp).clamp(max=1e300).abs() + 1), 0.0)
        scale = h + q * h.sum(-1, keepdim=True)
        bound = 32 * torch.finfo(torch.float32).eps * scale / temperature + 1e-5
        err = (g.double().cpu() - gref).abs()
        assert bool((err[fin] <= bound[fin] + 1e-5 * gref.abs()[fin]).all()), (err, bound)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl"])
def test_a_later_block_raising_the_maximum_past_the_float32_range(rng, kind):
    """A row whose first block is all −3e38 and whose later blocks hold +3e38: the maximum
    jumps by more than the float32 range (its increment is +inf), which rescales the earlier
    terms to exactly 0 or moves them to +inf. No NaN, and the float32 core's values and
    gradients (which share its overflow: 3.07e38 in float64 is +inf in both)."""
    v = 40
    jump = np.concatenate([np.full(16, -3e38), np.full(v - 16, 3e38)])
    plain = rng.normal(size=v)
    rows = [(jump, jump), (plain, jump), (jump, plain)]  # (student, teacher)
    st = torch.tensor(np.array([r[0] for r in rows]), dtype=torch.float32, device=DEVICE)
    tt = torch.tensor(np.array([r[1] for r in rows]), dtype=torch.float32, device=DEVICE)
    keep = torch.ones(len(rows), dtype=torch.bool, device=DEVICE)
    x = st.clone().requires_grad_(True)
    out = O.per_row(kind, x, tt, keep, 1.0, 0.3, block=16)
    (g,) = torch.autograd.grad(out.sum(), x)
    xc = st.cpu().clone().requires_grad_(True)
    ref = kldiv.divergence(tt.cpu(), xc, kind, form="logits", reduction="none")
    (gref,) = torch.autograd.grad(ref.sum(), xc)
    assert not out.isnan().any() and not g.isnan().any(), (out, g)
    close_or_both_inf(out, ref.detach(), rtol=1e-5, atol=1e-5)
    fin = ref.isfinite()
    torch.testing.assert_close(g.cpu()[fin], gref[fin], rtol=1e-5, atol=1e-5)


def comparable_tv_rows(st, tt, keep, temperature):
    """TV's gradient holds sign(q − p): where float32 cannot resolve q − p the sign is a coin
    toss that moves the whole row (through Σh), so such rows are not comparable (seed
    3997159059 had one, in float16)."""
    q = torch.softmax(torch.where(keep[:, None], st, 0).double().cpu() / temperature, -1)
    p = torch.softmax(tt.double().cpu() / temperature, -1)
    d = (q - p).abs()
    rows = ~((d <= 1e-5 * (q + p)) & (d > 0)).any(-1)  # exact ties are comparable
    assert rows.float().mean() > 0.8  # a handful of rows at most
    return rows


def test_masked_rows_and_a_fully_masked_batch(rng):
    st, tt, _ = make(rng, 6, 70, torch.float32)
    nothing = torch.zeros(6, dtype=torch.bool, device=DEVICE)
    st = st.clone().fill_(math.nan).requires_grad_(True)
    for kind in DIVS:
        out = O.per_row(kind, st, tt, nothing, 1.0, 0.5, block=32)
        (g,) = torch.autograd.grad(out.sum(), st)
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("kind", DIVS)
def test_identical_rows_are_never_negative_and_keep_their_gradient(rng, kind):
    # identical teacher and student: the exact value is 0; float32 sums of terms that cancel
    # round to about ±1e-8 per row, and the kernels return the bound, 0, instead of a
    # negative value. The gradient (exactly 0 in exact arithmetic) is the unclamped one, within
    # the rounding of q − p: 0 to float32 resolution.
    z = torch.tensor(rng.normal(scale=3.0, size=(64, 37)), dtype=torch.float32, device=DEVICE)
    s = z.clone().requires_grad_(True)
    out = O.per_row(kind, s, z, None, 1.0, 0.3)
    assert (out >= 0).all() and (out < 1e-5).all(), out.min()
    (g,) = torch.autograd.grad(out.sum(), s)
    assert torch.isfinite(g).all() and g.abs().max() < 1e-5


def test_identical_and_disjoint_rows():
    z = torch.tensor([[0.0, 1.0, -2.0, 3.0]], device=DEVICE)
    for kind in DIVS:
        # D(P‖P) = 0 exactly for KL (the online pass computes the same lse twice)
        out = O.per_row(kind, z, z, None, 1.0, 0.5)
        assert abs(out.item()) < 1e-6, kind
    a = torch.tensor([[0.0, -math.inf]], device=DEVICE)
    b = torch.tensor([[-math.inf, 0.0]], device=DEVICE)
    # disjoint supports: KL is +inf, JSD is log 2 (β = ½), skew KL is −log α, TV is 1
    assert O.per_row("kl", b, a, None, 1.0, 0.5).item() == math.inf
    assert O.per_row("reverse_kl", b, a, None, 1.0, 0.5).item() == math.inf
    assert O.per_row("js", b, a, None, 1.0, 0.5).item() == pytest.approx(math.log(2))
    assert O.per_row("skew_kl", b, a, None, 1.0, 0.25).item() == pytest.approx(-math.log(0.25))
    assert O.per_row("tv", b, a, None, 1.0, 0.5).item() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["kl", "js", "tv"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_distillation_loss_options_through_the_kernels(rng, kind, reduction):
    s = rng.normal(size=(2, 5, 70)) * 3
    t = rng.normal(size=(2, 5, 70)) * 3
    labels = rng.integers(0, 70, size=(2, 5))
    labels[0, 1] = labels[1, 4] = -1
    s[labels == -1] = np.nan
    st = torch.tensor(s, dtype=torch.float32, device=DEVICE, requires_grad=True)
    tt = torch.tensor(t, dtype=torch.float32, device=DEVICE)
    lab = torch.tensor(labels, device=DEVICE)
    opts = dict(
        temperature=2.0, scale_by_temperature_squared=True, ignore_index=-1, reduction=reduction
    )
    fast = DistillationLoss(kind, fast_path="triton", **opts)
    core = DistillationLoss(kind, fast_path=False, **opts)
    assert fast.path_for(st, tt) == "triton"
    num_items = 13.0 if reduction == "mean" else None
    out = fast(st, tt, lab, num_items=num_items)
    s64 = torch.tensor(np.nan_to_num(s), dtype=torch.float64, requires_grad=True)
    ref = core(s64, torch.tensor(t), lab.cpu(), num_items=num_items)
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=2e-5, atol=2e-6)
    # grad_output ≠ 1, per token for "none"
    go = torch.rand_like(ref) + 0.5
    (out * go.to(out)).sum().backward()
    (ref * go).sum().backward()
    torch.testing.assert_close(st.grad.double().cpu(), s64.grad, rtol=1e-4, atol=1e-6)


def test_dispatch_and_errors():
    s = torch.randn(3, 8, device=DEVICE)
    loss = DistillationLoss("kl", fast_path="triton")
    with pytest.raises(ValueError, match="teacher requires a gradient"):
        loss(s, s.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="float64 logits"):
        loss(s.double(), s.double())
    with pytest.raises(ValueError, match="identically 0"):
        DistillationLoss("skew_kl", alpha=1.0, fast_path="triton")(s, s)
    with pytest.raises(ValueError, match="Expected `fast_path`"):
        DistillationLoss("kl", fast_path="gpu")
    # skew KL at alpha = 0 is KL, computed by the KL kernel
    a, b = torch.randn(4, 9, device=DEVICE), torch.randn(4, 9, device=DEVICE)
    torch.testing.assert_close(
        DistillationLoss("skew_kl", alpha=0.0, fast_path="triton")(a, b),
        DistillationLoss("kl", fast_path=False)(a, b),
    )
    # automatic dispatch: Triton on CUDA, the chunked path on CPU
    expected = "triton" if DEVICE == "cuda" else "chunked"
    assert DistillationLoss("kl").path_for(s, s) == expected
    assert DistillationLoss("kl").path_for(s.double(), s.double()) == "core"


def test_custom_ops_pass_opcheck(rng):
    st, tt, keep = make(rng, 5, 40, torch.float32)
    st = torch.where(keep[:, None], st, 0.0).requires_grad_(True)
    # the packed logit maps: none, and a soft-capped student (cap 2, mul 0.5)
    for kind, maps in (("kl", [1.0, 0.0, 1.0, 0.0]), ("js", [0.5, 2.0, 1.0, 0.0])):
        args = (st, tt, keep, kind, 0.5, 0.5, 16, maps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            torch.library.opcheck(O.distill_rows, args)


def test_torch_compile_fullgraph(rng):
    st, tt, keep = make(rng, 4, 50, torch.float32)
    labels = torch.where(keep, 1, -100)
    loss = DistillationLoss("reverse_kl", temperature=1.5, fast_path="triton")
    s1 = st.clone().requires_grad_(True)
    eager = loss(s1, tt, labels)
    eager.backward()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    s2 = st.clone().requires_grad_(True)
    out = compiled(s2, tt, labels)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(s2.grad, s1.grad)
