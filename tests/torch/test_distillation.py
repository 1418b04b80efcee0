"""DistillationLoss: every divergence against the core in float64, the CPU fast path against
the core (values and student gradients), labels, temperature, num_items, grad_output ≠ 1."""

from __future__ import annotations

import os

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kldiv
from kldiv._kinds import ENGINE_KINDS
from kldiv.torch import DistillationLoss
from kldiv.torch._rows import tensor as tensor_engine

DIVS = ["kl", "reverse_kl", "js", "skew_kl", "skew_reverse_kl", "tv"]


def inputs(rng, shape=(3, 11, 37), neg_inf=True, ignore=True):
    s = rng.normal(scale=2.0, size=shape)
    t = rng.normal(scale=2.0, size=shape)
    if neg_inf:
        t[..., :3][rng.random(t[..., :3].shape) < 0.3] = -np.inf  # teacher rules tokens out
        s[..., 5][rng.random(s[..., 5].shape) < 0.2] = -np.inf  # student too (where t may be > 0)
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    if ignore:
        labels[rng.random(shape[:-1]) < 0.3] = -100
        s[labels == -100] = np.nan  # garbage in skipped tokens must not matter
    return s, t, labels


def core_reference(kind, s, t, labels, temperature, reduction, num_items=None, **params):
    keep = torch.tensor(labels != -100)
    s = s if isinstance(s, torch.Tensor) else torch.tensor(s)
    return kldiv.divergence(
        torch.tensor(t),
        s,
        kind,
        form="logits",
        temperature=temperature,
        mask=keep,
        reduction=reduction,
        num_items=num_items,
        **params,
    )


@pytest.mark.parametrize("kind", DIVS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_core_path_equals_the_core_in_float64(rng, kind, reduction):
    s, t, labels = inputs(rng)
    params = {"js": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
    kw = params.get(kind, {})
    loss = DistillationLoss(kind, temperature=1.7, reduction=reduction, **kw)
    got = loss(torch.tensor(s), torch.tensor(t), torch.tensor(labels))
    ref = core_reference(kind, s, t, labels, 1.7, reduction, **kw)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.fixture(params=["native", "tensor"])
def route(request, monkeypatch):
    """The chunked path's two routes for KL and reverse KL in float32: the compiled kernel
    (the default wherever a C compiler works) and tensor code (``KLDIV_NATIVE=0``)."""
    monkeypatch.setenv("KLDIV_NATIVE", "1" if request.param == "native" else "0")
    return request.param


@pytest.mark.parametrize("kind", ENGINE_KINDS)
@pytest.mark.parametrize("shape", [(37, 1271), (2, 5, 64), (1, 1)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fast_path_values_and_gradients_against_the_core(
    rng, kind, shape, reduction, route, monkeypatch
):
    monkeypatch.setattr(
        tensor_engine, "_CHUNK_ELEMENTS", 3 * shape[-1] + 1
    )  # several chunks, odd split
    s, t, labels = inputs(rng, shape, neg_inf=shape[-1] > 5, ignore=len(shape) > 1)
    loss = DistillationLoss(
        kind, temperature=2.0, reduction=reduction, scale_by_temperature_squared=True
    )
    st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    out = loss(st, torch.tensor(t, dtype=torch.float32), torch.tensor(labels))
    s64 = torch.tensor(np.where(np.isnan(s), 0.0, s), requires_grad=True)
    ref = 4.0 * core_reference(kind, s64, t, labels, 2.0, reduction)
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out.double()[fin], ref.detach()[fin], rtol=2e-5, atol=2e-5)
    assert torch.equal(torch.isposinf(out), torch.isposinf(ref))
    # grad_output ≠ 1: random upstream weights for "none", a factor otherwise
    w = torch.rand(out.shape, dtype=torch.float64) if reduction == "none" else torch.tensor(3.7)
    if not torch.isfinite(ref).all():
        return  # gradients at an infinite value are unconstrained (core docs)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    rows = torch.ones(st.shape[:-1], dtype=torch.bool)
    if kind == "tv":
        # TV's gradient holds sign(q − p): where float32 cannot resolve q − p the sign is a
        # coin toss that moves the whole row (through Σh), so such rows are not comparable
        q, p = torch.softmax(s64.detach() / 2, -1), torch.softmax(torch.tensor(t) / 2, -1)
        d = (q - p).abs()
        rows = ~((d <= 1e-5 * (q + p)) & (d > 0)).any(-1)  # exact ties (V = 1) are comparable
        assert rows.float().mean() > 0.8  # a handful of rows at most
    torch.testing.assert_close(st.grad.double()[rows], s64.grad[rows], rtol=1e-4, atol=1e-6)
    assert torch.isfinite(st.grad).all()


def test_paths_agree_and_dispatch(rng):
    s, t, labels = inputs(rng, (4, 50), neg_inf=False)
    st = torch.tensor(s, dtype=torch.float32)
    tt = torch.tensor(t, dtype=torch.float32)
    lab = torch.tensor(labels)
    fast = DistillationLoss("kl")(st, tt, lab)
    core = DistillationLoss("kl", fast_path=False)(st, tt, lab)
    torch.testing.assert_close(fast, core, rtol=1e-5, atol=1e-6)
    # a teacher that needs a gradient goes through the core, which gives it one
    tg = tt.clone().requires_grad_(True)
    DistillationLoss("kl")(st, tg, lab).backward()
    assert tg.grad is not None and torch.isfinite(tg.grad).all()


def test_num_items_bf16_and_empty_batches(rng):
    s, t, labels = inputs(rng, (6, 40), neg_inf=False, ignore=False)
    st, tt = torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)
    loss = DistillationLoss("reverse_kl")
    a = loss(st, tt, num_items=30.0)
    b = DistillationLoss("reverse_kl", reduction="sum")(st, tt) / 30.0
    torch.testing.assert_close(a, b)
    half = loss(st.bfloat16().requires_grad_(True), tt.bfloat16())
    assert half.dtype == torch.float32
    all_skipped = torch.full((6,), -100)
    sb = st.clone().requires_grad_(True)
    zero = loss(sb, tt, all_skipped)
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(sb.grad, torch.zeros_like(sb))


def test_second_backward_is_exact_and_errors_are_clear():
    s = torch.randn(3, 8, requires_grad=True)
    t = torch.randn(3, 8)
    out = DistillationLoss("kl")(s, t)
    out.backward(retain_graph=True)
    once = s.grad.clone()
    # the first backward scaled the forward's gradient in place; the second recomputes it
    out.backward()
    torch.testing.assert_close(s.grad, 2 * once)
    with pytest.raises(ValueError, match="Unknown divergence 'kld'"):
        DistillationLoss("kld")
    with pytest.raises(ValueError, match=r"same vocabulary width, got 5 and 6.*`vocab_size=`"):
        DistillationLoss()(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="same shape"):
        DistillationLoss()(torch.randn(2, 5), torch.randn(3, 5))
    with pytest.raises(ValueError, match="token shape"):
        DistillationLoss()(torch.randn(2, 5), torch.randn(2, 5), torch.zeros(3, dtype=torch.long))
    assert repr(DistillationLoss("js", beta=0.3, temperature=2.0)) == (
        "DistillationLoss(divergence='js', beta=0.3, temperature=2.0, reduction='mean')"
    )


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.9])
def test_fast_path_js_with_any_beta(rng, beta, monkeypatch):
    monkeypatch.setattr(tensor_engine, "_CHUNK_ELEMENTS", 3 * 40 + 1)
    s, t, labels = inputs(rng, (4, 9, 40))
    st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    loss = DistillationLoss("js", beta=beta, temperature=1.5)
    assert loss.path_for(st, torch.tensor(t, dtype=torch.float32)) == "chunked"
    out = loss(st, torch.tensor(t, dtype=torch.float32), torch.tensor(labels))
    s64 = torch.tensor(np.where(np.isnan(s), 0.0, s), requires_grad=True)
    ref = core_reference("js", s64, t, labels, 1.5, "mean", beta=beta)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    out.backward()
    ref.backward()
    torch.testing.assert_close(st.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    # the endpoints are identically 0 and go through the core
    assert not DistillationLoss("js", beta=0.0).path_for(st, st.detach()) == "chunked"


WEIGHTS = [("kl", {}), ("reverse_kl", {}), ("tv", {})] + [
    (kind, {name: w})
    for kind, name in (("js", "beta"), ("skew_kl", "alpha"), ("skew_reverse_kl", "alpha"))
    for w in (0.0, 0.25, 0.9, 1.0)
]


@pytest.mark.parametrize(("kind", "params"), WEIGHTS)
def test_chunk_kernels_in_float64_at_every_weight(rng, kind, params, monkeypatch):
    """The chunked kernels themselves, in float64, against the core: zero support, masked
    NaN rows, the endpoints (identically 0, or KL / reverse KL at alpha = 0), per-row weights."""
    monkeypatch.setattr(tensor_engine, "_CHUNK_ELEMENTS", 3 * 40 + 1)
    s, t, labels = inputs(rng, (5, 9, 40))
    s[:, 0] = t[:, 0]  # ties (p = q, both -inf included): TV's |d| has slope 0 there
    keep = torch.tensor(labels != -100).reshape(-1)
    st = torch.tensor(s.reshape(-1, 40), requires_grad=True)
    tt = torch.tensor(t.reshape(-1, 40))
    beta, alpha = params.get("beta", 0.5), params.get("alpha", 0.1)
    got = tensor_engine.per_row(kind, st, tt, keep, 1.3, beta, alpha=alpha)
    assert got.dtype == torch.float64
    s64 = torch.tensor(np.where(np.isnan(s), 0.0, s).reshape(-1, 40), requires_grad=True)
    ref = kldiv.divergence(
        tt, s64, kind, form="logits", temperature=1.3, mask=keep, reduction="none", **params
    )
    assert torch.equal(torch.isposinf(got), torch.isposinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref.detach()[fin], rtol=1e-12, atol=1e-14)
    w = torch.rand(got.shape, dtype=torch.float64) * fin  # infinite rows: gradient unconstrained
    (got.masked_fill(~fin, 0.0) * w).sum().backward()
    assert torch.isfinite(st.grad).all()
    if not ref.requires_grad:  # the core's exact 0 for an identically-zero divergence
        assert torch.equal(st.grad, torch.zeros_like(st.grad))
        return
    (ref.masked_fill(~fin, 0.0) * w).sum().backward()
    torch.testing.assert_close(st.grad, s64.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", ["skew_kl", "skew_reverse_kl"])
def test_chunked_path_uses_the_configured_alpha(rng, kind):
    s, t, labels = inputs(rng, (4, 9, 40))
    st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    loss = DistillationLoss(kind, alpha=0.35, temperature=1.5, reduction="none")
    assert loss.path_for(st, torch.tensor(t, dtype=torch.float32)) == "chunked"
    out = loss(st, torch.tensor(t, dtype=torch.float32), torch.tensor(labels))
    s64 = torch.tensor(np.where(np.isnan(s), 0.0, s), requires_grad=True)
    ref = core_reference(kind, s64, t, labels, 1.5, "none", alpha=0.35)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(st.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", ["chunked", "triton"])
@pytest.mark.parametrize("kind", DIVS)
def test_infinite_rows_match_the_core_in_value_and_gradient(kind, path):
    # row 0: q > 0 = p (reverse KL +inf); row 2: p = e^-300·… underflows in float32 while
    # q = 0, so KL is +inf although exp(l_p) reads 0; the gradient stays the core's
    inf = float("inf")
    s = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.1, 0.0], [0.0, 0.0, -inf]])
    t = torch.tensor([[0.0, -inf, 2.0], [0.0, 1.0, 2.0], [-300.0, 0.0, 0.0]])
    device = "cuda" if path == "triton" and torch.cuda.is_available() else "cpu"
    fast_s = s.clone().to(device).requires_grad_(True)
    fast = DistillationLoss(kind, alpha=0.2, reduction="none", fast_path=path)
    out = fast(fast_s, t.to(device))
    out.sum().backward()
    s64 = s.double().requires_grad_(True)
    ref = DistillationLoss(kind, alpha=0.2, reduction="none", fast_path=False)(s64, t.double())
    ref.sum().backward()
    assert torch.equal(out.isinf().cpu(), ref.isinf())
    fin = ref.isfinite()
    torch.testing.assert_close(out.double().cpu()[fin], ref.detach()[fin], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_s.grad.double().cpu(), s64.grad, rtol=1e-5, atol=1e-6)


# Rows whose shifted logits overflow float32 (x − max reads ±inf for finite logits near
# ±3e38): the true KL exceeds the float32 range (+inf) at T = 1 and is ~3e38 at T = 2.
HUGE_STUDENT = [[-3e38, 3e38, 0.0], [0.0, -3e38, 1.0], [-1.5e38, 1.5e38, 0.0], [1.0, 2.0, 3.0]]
HUGE_TEACHER = [[3e38, -3e38, 0.0], [0.5, 0.0, -3e38], [1.5e38, -1.5e38, 0.0], [3e38, 0.0, 1.0]]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("path", ["chunked", "tensor", "triton"])
@pytest.mark.parametrize("kind", DIVS)
def test_logits_near_the_float32_limit_match_the_core(kind, path, temperature, monkeypatch):
    """Every path gives the float32 core's value (+inf where it overflows, never NaN) and a
    NaN-free gradient equal to the core's wherever the value is finite."""
    if path == "tensor":
        monkeypatch.setenv("KLDIV_NATIVE", "0")
    s, t = torch.tensor(HUGE_STUDENT), torch.tensor(HUGE_TEACHER)
    device = "cuda" if path == "triton" and torch.cuda.is_available() else "cpu"
    fast_s = s.clone().to(device).requires_grad_(True)
    options = {"alpha": 0.2, "temperature": temperature, "reduction": "none"}
    fast_path = "triton" if path == "triton" else "chunked"
    out = DistillationLoss(kind, fast_path=fast_path, **options)(fast_s, t.to(device))
    out.sum().backward()
    core_s = s.clone().requires_grad_(True)
    ref = DistillationLoss(kind, fast_path=False, **options)(core_s, t)
    ref.sum().backward()
    assert not out.isnan().any() and not fast_s.grad.isnan().any(), (out, fast_s.grad)
    assert torch.equal(out.isinf().cpu(), ref.isinf())
    fin = ref.isfinite()
    # float32 rounding of values up to ~3e38: relative error a few ulp of the largest term
    torch.testing.assert_close(out.cpu()[fin], ref.detach()[fin], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_s.grad.cpu()[fin], core_s.grad[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl"])
@pytest.mark.parametrize("where_inf", ["none", "teacher", "student", "both"])
def test_chunks_from_raw_logits_against_the_core(rng, kind, where_inf, monkeypatch):
    """KL and reverse KL take most chunks straight from the logits (one exp per element, no
    masks); chunks with -inf on the side that needs masks go the log-softmax way. Both
    against the core in float64, and the fast route must actually be taken. (This is the
    tensor-code route; the compiled kernel has its own tests in torch/rows/test_native.py.)"""
    monkeypatch.setenv("KLDIV_NATIVE", "0")
    monkeypatch.setattr(tensor_engine, "_CHUNK_ELEMENTS", 3 * 97)  # 3 rows a chunk
    taken = []
    fast = tensor_engine._FROM_LOGITS[
        tensor_engine._chunk_kl if kind == "kl" else tensor_engine._chunk_reverse_kl
    ]

    def counted(*args):
        out = fast(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setitem(
        tensor_engine._FROM_LOGITS,
        tensor_engine._chunk_kl if kind == "kl" else tensor_engine._chunk_reverse_kl,
        counted,
    )
    s = rng.normal(scale=3.0, size=(11, 97))
    t = rng.normal(scale=3.0, size=(11, 97))
    # at least one -inf a row, so that every chunk holds one: with the random ones alone, a
    # chunk without any (probability 2^-12 for the teacher's) rightly takes the fast route
    rows = np.arange(11)
    if where_inf in ("teacher", "both"):
        t[:, :4][rng.random((11, 4)) < 0.5] = -np.inf
        t[rows, rng.integers(0, 4, 11)] = -np.inf
    if where_inf in ("student", "both"):
        s[:, 90:][rng.random((11, 7)) < 0.5] = -np.inf
        s[rows, rng.integers(90, 97, 11)] = -np.inf
    st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    out = DistillationLoss(kind, reduction="none", temperature=1.3)(st, torch.tensor(t).float())
    (out * torch.linspace(0.5, 2.0, 11)).sum().backward()
    s64 = torch.tensor(s, requires_grad=True)
    ref = DistillationLoss(kind, reduction="none", temperature=1.3, fast_path=False)(
        s64, torch.tensor(t)
    )
    (ref * torch.linspace(0.5, 2.0, 11, dtype=torch.float64)).sum().backward()
    assert torch.equal(out.isinf(), ref.isinf())
    fin = ref.isfinite()
    torch.testing.assert_close(out.double()[fin], ref.detach()[fin], rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(st.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    masked_side = "student" if kind == "kl" else "teacher"
    assert any(taken) == (where_inf not in (masked_side, "both"))


@pytest.mark.parametrize("path", ["chunked", "triton"])
def test_an_all_minus_inf_row_is_nan_as_in_the_core(path):
    inf = float("inf")
    device = "cuda" if path == "triton" and torch.cuda.is_available() else "cpu"
    s = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.1, 0.0]])
    t = torch.tensor([[-inf, -inf, -inf], [0.0, 1.0, 2.0]])
    for kind in ("kl", "reverse_kl"):
        for a, b in ((s, t), (t, s)):
            out = DistillationLoss(kind, reduction="none", fast_path=path)(
                a.to(device), b.to(device)
            ).cpu()
            ref = DistillationLoss(kind, reduction="none", fast_path=False)(a.double(), b.double())
            assert torch.equal(out.isnan(), ref.isnan()) and ref.isnan()[0], (kind, out, ref)


@pytest.mark.parametrize("path", ["chunked", "triton"])
@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "js", "tv"])
@pytest.mark.parametrize("offset", [1000.0, -300.0])
def test_a_constant_offset_between_the_logits_costs_no_precision(rng, kind, offset, path):
    """Softmax ignores a constant offset; the fast paths must too. Teacher = student + small
    noise + offset: the divergence is ~1e-5, far below one float32 step at the offset, so any
    formula that differences the raw logits (or the raw log-normalisers) loses it."""
    device = "cuda" if path == "triton" and torch.cuda.is_available() else "cpu"
    s = rng.normal(size=(16, 61))
    t = s + rng.normal(scale=0.005, size=s.shape) + offset
    st = torch.tensor(s, dtype=torch.float32, device=device, requires_grad=True)
    tt = torch.tensor(t, dtype=torch.float32, device=device)
    out = DistillationLoss(kind, reduction="none", fast_path=path)(st, tt)
    go = torch.linspace(0.5, 1.5, 16, device=device)
    (out * go).sum().backward()
    # the reference sees the same float32 inputs, in float64
    s64 = st.detach().double().cpu().requires_grad_(True)
    ref = DistillationLoss(kind, reduction="none", fast_path=False)(s64, tt.double().cpu())
    (ref * go.double().cpu()).sum().backward()
    assert ref.max() < (1e-2 if kind == "tv" else 1e-4)  # the case is what it claims
    assert (out >= 0).all()
    # float32 arithmetic on O(1) shifted logits: about 1e-7 per term; differencing the raw
    # logits instead gives errors of one float32 step at the offset (1e-5 to 1e-4)
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=1e-2, atol=1e-6)
    if kind == "tv":
        # TV's gradient holds sign(q − p), and here q ≈ p: a rounding-level change of q − p
        # flips a sign and moves the whole row (through Σh). Only the value is comparable.
        return
    torch.testing.assert_close(st.grad.double().cpu(), s64.grad, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("path", [True, "triton", False])
def test_empty_batch_and_tensor_num_items(path):
    device = "cuda" if path == "triton" and torch.cuda.is_available() else "cpu"
    s = torch.zeros(0, 9, device=device, requires_grad=True)
    loss = DistillationLoss("kl", fast_path=path)
    out = loss(s, torch.zeros(0, 9, device=device))
    assert out.item() == 0.0  # the mean of nothing is 0, as in the core
    (g,) = torch.autograd.grad(out, s)
    assert g.shape == (0, 9)
    st = torch.randn(3, 9, device=device)
    ref = loss(st, st.flip(0))
    # a float64 0-d num_items does not change the loss's dtype (the core casts it too)
    got = loss(st, st.flip(0), num_items=torch.tensor(3.0, dtype=torch.float64))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


@st.composite
def logit_batches(draw):
    """Small [N, V] logits in float32 with -inf patterns on either side, labels with skipped
    tokens holding NaN, a temperature and a weight: what the fast paths must agree on."""
    n, v = draw(st.integers(1, 5)), draw(st.integers(1, 9))
    finite = st.floats(-30, 30, width=32)
    s = draw(hnp.arrays(np.float32, (n, v), elements=st.one_of(finite, st.just(-np.inf))))
    t = draw(hnp.arrays(np.float32, (n, v), elements=st.one_of(finite, st.just(-np.inf))))
    offset = draw(st.sampled_from([0.0, 100.0, -1000.0]))
    s[:, 0] = np.where(np.isneginf(s[:, 0]), 0.0, s[:, 0])  # rows keep some mass
    t[:, -1] = np.where(np.isneginf(t[:, -1]), 0.0, t[:, -1])
    keep = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    s[~keep] = np.nan
    temperature = draw(st.sampled_from([1.0, 0.5, 3.0]))
    w = draw(st.sampled_from([0.0, 1e-6, 0.3, 0.5, 1.0 - 1e-6, 1.0]))
    return s, (t + offset).astype(np.float32), keep, temperature, w


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logit_batches(), st.sampled_from(DIVS), st.sampled_from(["1", "0"]))
def test_chunked_path_matches_the_core_on_generated_batches(batch, kind, native):
    s, t, keep, temperature, w = batch
    os.environ["KLDIV_NATIVE"] = native  # the compiled kernel or tensor code (KL, reverse KL)
    try:
        _check_against_the_core(s, t, keep, temperature, w, kind)
    finally:
        del os.environ["KLDIV_NATIVE"]


def _check_against_the_core(s, t, keep, temperature, w, kind):
    labels = torch.tensor(np.where(keep, 0, -100))
    opts = dict(temperature=temperature, reduction="none", beta=w, alpha=w)
    st_ = torch.tensor(s, requires_grad=True)
    out = DistillationLoss(kind, **opts)(st_, torch.tensor(t), labels)
    s64 = torch.tensor(np.where(np.isnan(s), 0.0, s), dtype=torch.float64, requires_grad=True)
    ref = DistillationLoss(kind, fast_path=False, **opts)(s64, torch.tensor(t).double(), labels)
    assert torch.equal(out.isinf(), ref.isinf()) and torch.equal(out.isnan(), ref.isnan())
    fin = ref.isfinite()
    torch.testing.assert_close(out.double()[fin], ref.detach()[fin], rtol=1e-4, atol=1e-5)
    go = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    if fin.all():  # gradients of a +inf row are conventions; compare where all is finite
        (out * go).sum().backward()
        (ref * go.double()).sum().backward()
        assert st_.grad.isfinite().all()
        if kind != "tv":  # sign(q − p) at float32 near-ties is not comparable
            torch.testing.assert_close(st_.grad.double(), s64.grad, rtol=1e-3, atol=1e-5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logit_batches(), st.sampled_from(DIVS))
def test_triton_path_matches_the_core_on_generated_batches(batch, kind):
    s, t, keep, temperature, w = batch
    if (kind == "js" and w in (0.0, 1.0)) or (kind.startswith("skew") and w == 1.0):
        w = 0.5  # identically 0: the kernels leave these to the core
    device = "cuda" if torch.cuda.is_available() else "cpu"
    labels = torch.tensor(np.where(keep, 0, -100), device=device)
    opts = dict(temperature=temperature, reduction="none", beta=w, alpha=w)
    st_ = torch.tensor(s, device=device, requires_grad=True)
    out = DistillationLoss(kind, fast_path="triton", **opts)(
        st_, torch.tensor(t, device=device), labels
    )
    s64 = torch.tensor(np.where(np.isnan(s), 0.0, s), dtype=torch.float64, requires_grad=True)
    ref = DistillationLoss(kind, fast_path=False, **opts)(
        s64, torch.tensor(t).double(), labels.cpu()
    )
    out = out.cpu()
    assert torch.equal(out.isinf(), ref.isinf()) and torch.equal(out.isnan(), ref.isnan())
    fin = ref.isfinite()
    torch.testing.assert_close(out.double()[fin], ref.detach()[fin], rtol=1e-4, atol=1e-5)
    if fin.all() and kind != "tv":
        go = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
        (out * go).sum().backward()
        (ref * go.double()).sum().backward()
        torch.testing.assert_close(st_.grad.double().cpu(), s64.grad, rtol=1e-3, atol=1e-5)
