"""FusedLinearDistillationLoss: every divergence and reduction against the core on the
materialised logits in float64 (values and gradients of hidden states, weight and bias),
odd shapes and chunkings, skipped tokens holding NaN, teacher as hidden states, half
precision, and a dispatch-level proof that no ``[N, V]`` tensor is ever allocated."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kldiv
from kldiv.torch import DistillationLoss
from kldiv.torch import fused_linear as fl
from kldiv.torch._rows import linear
from kldiv.torch.fused_linear import FusedLinearDistillationLoss

DIVS = ["kl", "reverse_kl", "js", "skew_kl", "skew_reverse_kl", "tv"]
PARAMS = {"js": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


def problem(rng, tokens=(37,), h=19, v=1271, dtype=torch.float64, ignore=0.3, neg_inf=True):
    """Student hidden/weight/bias, teacher logits (some -inf unless not ``neg_inf``) and labels
    with skipped tokens whose hidden states are NaN."""
    hid = rng.normal(size=(*tokens, h))
    labels = rng.integers(0, v, size=tokens)
    labels[rng.random(tokens) < ignore] = -100
    hid[labels == -100] = np.nan
    w = rng.normal(scale=1.5 / np.sqrt(h), size=(v, h))
    b = rng.normal(scale=0.5, size=v)
    t = rng.normal(scale=2.0, size=(*tokens, v))
    if neg_inf:
        t[..., :4][rng.random(t[..., :4].shape) < 0.4] = -np.inf  # the teacher rules tokens out

    def tensor(a):
        return torch.tensor(a, dtype=dtype)

    return tensor(hid), tensor(w), tensor(b), tensor(t), torch.tensor(labels)


def reference(kind, hid, w, b, t, labels, temperature, reduction, num_items=None, **params):
    """The core on the materialised float64 logits; skipped rows' NaN is zeroed in the
    reference only (their gradient is 0 either way, and 0·NaN would poison grad_W)."""
    keep = labels != -100
    h64 = torch.where(keep[..., None], hid.double(), 0.0).requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    logits = h64 @ w64.T + (0 if b64 is None else b64)
    out = kldiv.divergence(
        t.double(),
        logits,
        kind,
        form="logits",
        temperature=temperature,
        mask=keep,
        reduction=reduction,
        num_items=num_items,
        **params,
    )
    return out, [x for x in (h64, w64, b64) if x is not None]


def leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_(True) for x in xs]


@pytest.mark.parametrize("kind", DIVS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_values_and_gradients_against_the_core_in_float64(rng, kind, reduction):
    # a teacher zero where the student has mass makes the reverse KL +inf: tested below
    hid, w, b, t, labels = problem(rng, neg_inf=kind != "reverse_kl")
    kw = PARAMS.get(kind, {})
    loss = FusedLinearDistillationLoss(
        kind,
        temperature=1.7,
        scale_by_temperature_squared=True,
        reduction=reduction,
        chunk_size=5,
        **kw,
    )
    h_, w_, b_ = leaves(hid, w, b)
    out = loss(h_, w_, t, labels, student_bias=b_)
    ref, ref_leaves = reference(kind, hid, w, b, t, labels, 1.7, reduction, **kw)
    ref = ref * 1.7**2
    assert out.dtype == torch.float64 and out.shape == ref.shape
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-12)
    # grad_output ≠ 1: a factor for the scalar reductions, random per-token weights for "none"
    g_out = torch.rand(out.shape, dtype=torch.float64) if reduction == "none" else 3.0
    got = torch.autograd.grad((out * g_out).sum(), (h_, w_, b_))
    want = torch.autograd.grad((ref * g_out).sum(), ref_leaves)
    for a, e in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
    assert torch.equal(got[0][labels == -100], torch.zeros_like(got[0][labels == -100]))


@pytest.mark.parametrize("kind", DIVS)
def test_teacher_as_hidden_states_and_weight_with_a_token_grid(rng, kind):
    tokens, h, ht, v = (3, 13), 11, 7, 301
    hid, w, b, _, labels = problem(rng, tokens, h, v, neg_inf=False)
    th = torch.tensor(rng.normal(size=(*tokens, ht)))
    tw = torch.tensor(rng.normal(scale=2.0 / np.sqrt(ht), size=(v, ht)))
    tb = torch.tensor(rng.normal(size=v))
    kw = PARAMS.get(kind, {})
    loss = FusedLinearDistillationLoss(kind, temperature=0.8, reduction="none", chunk_size=4, **kw)
    h_, w_ = leaves(hid, w)  # no student bias: its gradient must not be asked for
    out = loss(h_, w_, None, labels, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb)
    assert out.shape == tokens
    ref, ref_leaves = reference(kind, hid, w, None, th @ tw.T + tb, labels, 0.8, "none", **kw)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-12)
    g_out = torch.rand(tokens, dtype=torch.float64)
    got = torch.autograd.grad((out * g_out).sum(), (h_, w_))
    want = torch.autograd.grad((ref * g_out).sum(), ref_leaves)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("js", {"beta": 0.0}),
        ("js", {"beta": 1.0}),
        ("skew_kl", {"alpha": 0.0}),
        ("skew_kl", {"alpha": 1.0}),
        ("skew_reverse_kl", {"alpha": 0.0}),
        ("skew_reverse_kl", {"alpha": 1.0}),
    ],
)
def test_weight_endpoints_and_num_items(rng, kind, params):
    hid, w, b, t, labels = problem(rng, (9,), 5, 40)
    t = torch.where(torch.isinf(t), 0.0, t)  # KL at alpha = 0 would be +inf where p > q = 0
    loss = FusedLinearDistillationLoss(kind, chunk_size=4, **params)
    h_, w_, b_ = leaves(hid, w, b)
    out = loss(h_, w_, t, labels, 7.0, student_bias=b_)
    ref, ref_leaves = reference(kind, hid, w, b, t, labels, 1.0, "mean", num_items=7.0, **params)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(out, (h_, w_, b_))
    want = (
        torch.autograd.grad(ref, ref_leaves)
        if ref.requires_grad  # the core returns a constant 0 where the divergence is identically 0
        else [torch.zeros_like(x) for x in ref_leaves]
    )
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


def test_minus_inf_logits_are_zero_probabilities(rng):
    hid, w, b, t, labels = problem(rng, (12,), 6, 50, neg_inf=False)
    b[:2] = -np.inf  # a vocabulary masked through the bias: the student gives it no mass
    for kind, finite in (("kl", False), ("reverse_kl", True), ("skew_kl", True), ("tv", True)):
        loss = FusedLinearDistillationLoss(kind, reduction="none", chunk_size=5)
        h_, w_, b_ = leaves(hid, w, b)
        out = loss(h_, w_, t, labels, student_bias=b_)
        ref, ref_leaves = reference(kind, hid, w, b, t, labels, 1.0, "none")
        assert torch.equal(torch.isposinf(out), torch.isposinf(ref)), kind
        assert bool(torch.isposinf(out).any()) != finite, kind
        fin = torch.isfinite(ref)
        torch.testing.assert_close(out[fin], ref.detach()[fin], rtol=1e-10, atol=1e-12)
        got = torch.autograd.grad(out[fin].sum(), (h_, w_, b_))
        assert all(torch.isfinite(g).all() for g in got), kind
        if finite:
            want = torch.autograd.grad(ref.sum(), ref_leaves)
            for a, e in zip(got, want, strict=True):
                torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_fully_masked_batch_gives_zeros(rng, reduction):
    hid, w, b, t, labels = problem(rng, (2, 5), 4, 30, dtype=torch.float32, ignore=1.1)
    assert torch.isnan(hid).all()
    h_, w_, b_ = leaves(hid, w, b)
    out = FusedLinearDistillationLoss("js", reduction=reduction)(h_, w_, t, labels, student_bias=b_)
    assert torch.equal(out, torch.zeros_like(out)) and out.dtype == torch.float32
    for g in torch.autograd.grad(out.sum(), (h_, w_, b_)):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["kl", "skew_reverse_kl"])
def test_half_precision_inputs_against_float64(rng, dtype, kind):
    hid, w, b, t, labels = problem(rng, (29,), 16, 257, dtype=dtype)
    loss = FusedLinearDistillationLoss(kind, reduction="sum", chunk_size=8)
    h_, w_, b_ = leaves(hid, w, b)
    out = loss(h_, w_, t, labels, student_bias=b_)
    assert out.dtype == torch.float32
    # the reference sees the same half-precision values, exactly, in float64
    ref, ref_leaves = reference(kind, hid, w, b, t, labels, 1.0, "sum")
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(out * 2.0, (h_, w_, b_))
    want = torch.autograd.grad(ref * 2.0, ref_leaves)
    for a, e in zip(got, want, strict=True):
        assert a.dtype == dtype
        # gradients come back in the parameters' dtype: compare at its resolution
        torch.testing.assert_close(a.double(), e, rtol=2e-2, atol=2e-2 * e.abs().max().item())


def test_half_precision_matmuls_in_their_own_dtype(rng, monkeypatch):
    """The accelerator arrangement (F.linear in bfloat16, the weight gradient's chunk products
    in bfloat16 summed in float32), run on CPU: logits rounded to bfloat16, so looser."""
    monkeypatch.setattr(linear, "matmul_dtype", lambda dtype, device: dtype)
    hid, w, b, t, labels = problem(rng, (29,), 16, 257, dtype=torch.bfloat16)
    loss = FusedLinearDistillationLoss("js", reduction="mean", chunk_size=8)
    h_, w_, b_ = leaves(hid, w, b)
    out = loss(h_, w_, t, labels, student_bias=b_)
    ref, ref_leaves = reference("js", hid, w, b, t, labels, 1.0, "mean")
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-2, atol=1e-3)
    got = torch.autograd.grad(out, (h_, w_, b_))
    want = torch.autograd.grad(ref, ref_leaves)
    for a, e in zip(got, want, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), e, rtol=5e-2, atol=5e-2 * e.abs().max().item())


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an ATen op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, tuple | list) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_tensor_of_n_by_v_elements_is_ever_allocated(rng, reduction):
    n, h, v, chunk = 96, 8, 1000, 7
    hid, w, b, t, labels = problem(rng, (n,), h, v, dtype=torch.float32, ignore=0.0)
    teacher = {"teacher_hidden": torch.randn(n, h), "teacher_weight": torch.randn(v, h)}
    h_, w_, b_ = leaves(hid, w, b)
    loss = FusedLinearDistillationLoss("kl", reduction=reduction, chunk_size=chunk)
    with _LargestOutput() as fused:
        out = loss(h_, w_, None, labels, student_bias=b_, **teacher)
        out.sum().backward()  # for "none" the pass runs again here
    # the largest outputs are a chunk's logits and gradient and the [V, H] weight gradient
    assert fused.largest <= max(chunk * v, v * h, n * h) < n * v
    # the check sees allocations: the unfused composition is caught
    with _LargestOutput() as unfused:
        logits = h_ @ w_.T + b_
        DistillationLoss("kl")(logits, teacher["teacher_hidden"] @ teacher["teacher_weight"].T)
    assert unfused.largest == n * v


def test_no_grad_forward_and_second_backward(rng):
    hid, w, b, t, labels = problem(rng, (10,), 4, 20, dtype=torch.float32)
    loss = FusedLinearDistillationLoss("tv")
    h_, w_ = leaves(hid, w)
    with torch.no_grad():
        evaluated = loss(h_, w_, t, labels)
    out = loss(h_, w_, t, labels)
    assert evaluated.item() == out.item() and not evaluated.requires_grad
    out.backward(retain_graph=True)
    # gradients computed in forward are scaled in place: a second backward is refused
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_errors_are_clear():
    h, w, t = torch.randn(3, 4), torch.randn(10, 4), torch.randn(3, 10)
    loss = FusedLinearDistillationLoss()
    with pytest.raises(ValueError, match="teacher gets none"):
        loss(h, w, t.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="teacher gets none"):
        loss(
            h,
            w,
            teacher_hidden=torch.randn(3, 2),
            teacher_weight=torch.randn(10, 2, requires_grad=True),
        )
    with pytest.raises(ValueError, match="not both and not neither"):
        loss(h, w)
    with pytest.raises(ValueError, match="no `teacher_logits`"):
        loss(h, w, t, teacher_hidden=torch.randn(3, 2), teacher_weight=torch.randn(10, 2))
    with pytest.raises(ValueError, match=r"`student_weight` of shape \[V, H\] with H = 4"):
        loss(h, torch.randn(10, 5), t)
    with pytest.raises(ValueError, match=r"`teacher_logits` with V = 10 .*got 11.*`vocab_size=`"):
        loss(h, w, torch.randn(3, 11))
    with pytest.raises(ValueError, match=r"`teacher_logits` of shape \(3, 10\)"):
        loss(h, w, torch.randn(4, 10))
    with pytest.raises(ValueError, match=r"`student_bias` of shape \[10\]"):
        loss(h, w, t, student_bias=torch.randn(11))
    with pytest.raises(ValueError, match="token shape"):
        loss(h, w, t, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype of `student_hidden`"):
        loss(h, w.double(), t)
    with pytest.raises(TypeError, match="real floating dtype"):
        loss(h, w, torch.zeros(3, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="only with reduction='mean'"):
        FusedLinearDistillationLoss(reduction="sum")(h, w, t, num_items=3.0)
    with pytest.raises(ValueError, match="Unknown divergence 'kld'"):
        FusedLinearDistillationLoss("kld")
    with pytest.raises(ValueError, match="`chunk_size`"):
        FusedLinearDistillationLoss(chunk_size=0)
    with pytest.raises(ValueError, match="`alpha` to be in"):
        FusedLinearDistillationLoss("skew_kl", alpha=1.5)
    assert repr(FusedLinearDistillationLoss("skew_kl", alpha=0.2, chunk_size=64)) == (
        "FusedLinearDistillationLoss(divergence='skew_kl', alpha=0.2, temperature=1.0, "
        "reduction='mean', chunk_size=64)"
    )


@pytest.mark.seeded  # the doctest draws from torch's global generator
def test_docstring_example():
    result = doctest.testmod(fl, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "js", "tv"])
def test_triton_chunks_against_the_core(rng, kind, monkeypatch):
    """The CUDA arrangement: each chunk's loss and logits gradient from the Triton kernels
    (in the interpreter on CPU tensors when there is no GPU)."""
    monkeypatch.setattr(linear, "FAST_PATH", "triton")
    from kldiv.torch._rows.triton import launch as triton_launch

    calls = []
    real_backward = triton_launch.backward

    def counted(*args, **kwargs):
        calls.append(1)
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(triton_launch, "backward", counted)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hid, w, b, t, labels = problem(rng, (13,), 8, 300, dtype=torch.float32)
    loss = FusedLinearDistillationLoss(
        kind, reduction="mean", temperature=1.5, chunk_size=5, **PARAMS.get(kind, {})
    )
    h_, w_, b_ = leaves(hid.to(device), w.to(device), b.to(device))
    out = loss(h_, w_, t.to(device), labels.to(device), student_bias=b_)
    ref, ref_leaves = reference(kind, hid, w, b, t, labels, 1.5, "mean", **PARAMS.get(kind, {}))
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(out * 3.0, (h_, w_, b_))
    want = torch.autograd.grad(ref * 3.0, ref_leaves)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a.double().cpu(), e, rtol=1e-4, atol=1e-5)
    assert len(calls) == -(-int((labels != -100).sum()) // 5)  # one kernel call per chunk


def test_under_torch_compile_the_fused_pass_runs_eagerly(rng):
    hid, w, b, t, labels = problem(rng, (9,), 8, 50, dtype=torch.float32, ignore=0.0)
    loss = FusedLinearDistillationLoss("kl", chunk_size=4)
    h1, w1 = leaves(hid, w)
    eager = loss(h1, w1, t)
    eager.backward()
    compiled = torch.compile(lambda h_, w_: loss(h_, w_, t) * 2.0, backend="aot_eager")
    h2, w2 = leaves(hid, w)
    out = compiled(h2, w2)
    out.backward()
    torch.testing.assert_close(out, eager * 2.0)
    torch.testing.assert_close(h2.grad, h1.grad * 2.0)
    torch.testing.assert_close(w2.grad, w1.grad * 2.0)
