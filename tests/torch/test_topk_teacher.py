"""Top-k sparse teachers (kldiv.torch.topk): every kind × tail policy against an independent
float64 reference built from explicit dense (K+1)- or K-point distributions and the core;
a hand-derived case; the data-processing lower bound; padding, masking, zero support,
half precision, float32 accuracy for a confident student; validation: opt-in value checks
(check=True) with their messages, NaN tokens without them, and torch.compile(fullgraph=True)
as the proof that the default path never reads a value on the host."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import kldiv
from kldiv.torch.topk import TOLERANCE, TopKTeacher, topk_distillation_rows

KINDS = ["kl", "reverse_kl", "js", "skew_kl", "skew_reverse_kl", "tv"]
POLICIES = ["tail_bucket", "renormalize"]
PARAMS = {"js": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def case(rng, n=7, v=23, k=5, pad=True, neg_inf=True):
    """Student logits, and the top-k of a full teacher softmax (shuffled, with padding)."""
    lt = log_softmax(rng.normal(scale=2.0, size=(n, v)))
    idx = np.argsort(-lt, axis=-1)[:, :k]
    idx = np.take_along_axis(idx, rng.permuted(np.tile(np.arange(k), (n, 1)), axis=1), axis=1)
    lp = np.take_along_axis(lt, idx, axis=-1)
    if pad:
        holes = rng.random((n, k)) < 0.25
        holes[:, 0] = False  # every row keeps an entry
        idx = np.where(holes, -1, idx)
        lp = np.where(holes, np.nan, lp)  # padding log-probs are ignored, NaN included
    z = rng.normal(scale=2.0, size=(n, v))
    if neg_inf:
        z[rng.random((n, v)) < 0.1] = -np.inf
        z[np.arange(n), idx[:, 0]] = 0.0  # finite at a stored id: renormalize stays defined
    return z, idx, lp


def reference(kind, z, idx, lp, tail, temperature=1.0):
    """Float64 per-row divergence from explicit dense distributions, through the core's
    "probs" form. ``z`` is a float64 torch tensor (it may require grad)."""
    n, v = z.shape
    valid = idx >= 0
    safe = np.where(valid, idx, 0)
    vt = torch.tensor(valid)
    if tail == "tail_bucket":
        pk = np.where(valid, np.exp(np.where(valid, lp, -np.inf)), 0.0)
        P = np.concatenate([pk, 1.0 - pk.sum(-1, keepdims=True)], axis=-1)
        q = torch.softmax(z, dim=-1)
        in_k = torch.zeros(n, v, dtype=torch.bool)
        in_k[np.nonzero(valid)[0], idx[valid]] = True
        qk = torch.where(vt, q.gather(1, torch.tensor(safe)), 0.0)
        Q = torch.cat([qk, (q * ~in_k).sum(-1, keepdim=True)], dim=-1)
    else:
        x = np.where(valid, np.where(valid, lp, 0.0) / temperature, -np.inf)
        P = np.exp(log_softmax(x))
        zk = torch.where(vt, z.gather(1, torch.tensor(safe)) / temperature, -math.inf)
        Q = torch.softmax(zk, dim=-1)
    return kldiv.divergence(
        torch.tensor(P), Q, kind, form="probs", reduction="none", **PARAMS.get(kind, {})
    )


def rows(kind, z, idx, lp, tail, lp_dtype=torch.float64, check=False, **kw):
    lp = torch.tensor(lp, dtype=lp_dtype)
    teacher = TopKTeacher(torch.tensor(idx), lp, tail=tail, check=check)
    return topk_distillation_rows(kind, z, teacher, **kw, **PARAMS.get(kind, {}))


def values_and_grads(fn, z, w):
    z = z.detach().clone().requires_grad_(True)
    out = fn(z)
    # +inf rows (zero support) have a conventional finite gradient; compare the finite rows
    loss = (w * torch.where(torch.isfinite(out), out, 0.0).to(torch.float64)).sum()
    loss.backward()
    return out.detach(), z.grad


# The torch.compile tests come first: they are the slowest, and xdist overlaps them with the rest.


def _compile_case(rng, tail):
    """Student logits [2, 3, V] and a teacher with padding, a masked token holding garbage and
    a broken kept token (an id out of range), as a training batch might hold them."""
    z, idx, lp = case(rng, n=6, v=17, k=4, neg_inf=False)
    labels = torch.zeros(6, dtype=torch.long)
    labels[2] = -100
    idx[2] = [99, 3, 3, -1]  # masked: anything goes
    lp[2] = [np.nan, 4.0, 1.0, 0.0]
    idx[4, 1] = 17  # kept and out of range: NaN, not an index error
    teacher = TopKTeacher(
        torch.tensor(idx).reshape(2, 3, 4), torch.tensor(lp).reshape(2, 3, 4), tail=tail
    )
    return torch.tensor(z).reshape(2, 3, 17), teacher, labels.reshape(2, 3)


@pytest.mark.parametrize(
    ("backend", "tail"),
    [("inductor", "tail_bucket"), ("aot_eager", "tail_bucket"), ("aot_eager", "renormalize")],
)
def test_torch_compile_fullgraph_distillation_loss(rng, backend, tail):
    from kldiv.torch import DistillationLoss

    torch._dynamo.reset()
    z, teacher, labels = _compile_case(rng, tail)
    loss = DistillationLoss(
        "kl", reduction="none", temperature=1.0 if tail == "tail_bucket" else 1.5
    )
    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend=backend)):
        zt = z.clone().requires_grad_(True)
        out = fn(zt, teacher, labels)
        out.nansum().backward()
        results.append((out.detach(), zt.grad))
        # the broken token's gradient is NaN (even though nansum gives it a zero cotangent)
        assert torch.isnan(zt.grad[1, 1]).any() and torch.isfinite(zt.grad[0]).all()
        assert torch.isfinite(zt.grad[1, [0, 2]]).all()
    (eager, g_eager), (comp, g_comp) = results
    assert torch.isnan(eager[1, 1]) and eager[0, 2] == 0 and torch.isfinite(eager[0]).all()
    torch.testing.assert_close(comp, eager, rtol=1e-12, atol=1e-14, equal_nan=True)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-12, atol=1e-14, equal_nan=True)


def test_no_host_sync_without_check(rng):
    # Dynamo with fullgraph=True refuses .item(), .tolist(), bool(tensor), .nonzero() and any
    # branch on a value. The test above compiles DistillationLoss with a mask; here both
    # policies without a mask, in one graph, forward and backward. (The kinds differ only in
    # the core's formula, compiled in test_transforms.py.)
    import torch._dynamo.exc as dynamo_exc

    torch._dynamo.reset()
    z, bucket, _ = _compile_case(rng, "tail_bucket")
    renorm = dataclasses.replace(bucket, tail="renormalize")

    def fn(x):
        return sum(
            topk_distillation_rows(kind, x, t, **PARAMS.get(kind, {})).nansum()
            for kind, t in (("kl", bucket), ("js", renorm))
        )

    zt = z.clone().requires_grad_(True)
    torch.compile(fn, fullgraph=True, backend="eager")(zt).backward()
    zt2 = z.clone().requires_grad_(True)
    fn(zt2).backward()
    torch.testing.assert_close(zt.grad, zt2.grad, equal_nan=True)
    assert torch.isnan(zt.grad[1, 1]).any()  # the token with an id out of range
    # the control: the check=True path reads values on the host, and Dynamo says so
    from kldiv.torch import topk as topk_module

    checked = dataclasses.replace(bucket.flatten(), check=True)

    def reads_values(x):
        return topk_module._raise_teacher_fault(
            checked, {"sum": x.sum(-1) > 0}, checked.indices, x, x.sum(-1), 17, (6,)
        )

    with pytest.raises(dynamo_exc.Unsupported):
        torch.compile(reads_values, fullgraph=True, backend="eager")(-torch.ones(6, 4))


@pytest.mark.parametrize("tail", POLICIES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_against_dense_reference(rng, kind, tail, dtype):
    z, idx, lp = case(rng)
    t = 1.7 if tail == "renormalize" else 1.0
    zt = torch.tensor(z, dtype=dtype)
    w = torch.tensor(rng.random(z.shape[0]))
    got, g = values_and_grads(lambda x: rows(kind, x, idx, lp, tail, dtype, temperature=t), zt, w)
    ref, gref = values_and_grads(
        lambda x: reference(kind, x, idx, lp, tail, t), zt.to(torch.float64), w
    )
    assert got.dtype == dtype
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(got.to(torch.float64), ref, **tol)
    torch.testing.assert_close(g.to(torch.float64), gref, **tol)
    assert torch.isfinite(g).all()


def test_hand_derived_case():
    # V = 4, student q = (0.1, 0.2, 0.4, 0.3); teacher stores ids (2, 0) with p = (0.5, 0.3).
    z = torch.tensor([[0.1, 0.2, 0.4, 0.3]], dtype=torch.float64).log().requires_grad_(True)
    ids, lp = torch.tensor([[2, 0]]), torch.tensor([[0.5, 0.3]], dtype=torch.float64).log()
    bucket = TopKTeacher(ids, lp, tail="tail_bucket")
    # Buckets {2}, {0}, {1, 3}: teacher (0.5, 0.3, 0.2), student (0.4, 0.1, 0.5).
    kl = topk_distillation_rows("kl", z, bucket)
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.1) + 0.2 * math.log(0.2 / 0.5)
    assert kl.item() == pytest.approx(expected, rel=1e-14)
    # dKL/dz_v = q_v − p_v on the ids, q_v·(1 − p_tail/q_tail) outside them
    kl.sum().backward()
    torch.testing.assert_close(
        z.grad,
        torch.tensor(
            [[0.1 - 0.3, 0.2 * (1 - 0.4), 0.4 - 0.5, 0.3 * (1 - 0.4)]], dtype=torch.float64
        ),
        rtol=1e-12,
        atol=1e-14,
    )
    tv = topk_distillation_rows("tv", z.detach(), bucket)
    assert tv.item() == pytest.approx(0.5 * (0.1 + 0.2 + 0.3), rel=1e-14)
    # renormalize: teacher (0.625, 0.375), student (0.8, 0.2) on ids (2, 0)
    renorm = TopKTeacher(ids, lp, tail="renormalize")
    kl_r = topk_distillation_rows("kl", z.detach(), renorm)
    expected_r = 0.625 * math.log(0.625 / 0.8) + 0.375 * math.log(0.375 / 0.2)
    assert kl_r.item() == pytest.approx(expected_r, rel=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_tail_bucket_is_a_lower_bound_equal_at_full_vocabulary(rng, kind):
    n, v = 9, 17
    teacher_logits = torch.tensor(rng.normal(scale=2.5, size=(n, v)))
    z = torch.tensor(rng.normal(scale=2.5, size=(n, v)))
    kw = PARAMS.get(kind, {})
    full = kldiv.divergence(teacher_logits, z, kind, form="logits", reduction="none", **kw)
    previous = torch.zeros(n, dtype=torch.float64)
    for k in (0, 1, 3, 8, v - 1, v):
        teacher = TopKTeacher.from_logits(teacher_logits, k, tail="tail_bucket")
        got = topk_distillation_rows(kind, z, teacher, **kw)
        # 1 − Σp has absolute (not relative) accuracy: a tail of 1e-6 is known to ~1e-10
        assert (got <= full * (1 + 1e-9) + 1e-12).all()
        assert (got >= previous * (1 - 1e-9) - 1e-12).all()  # finer partitions never decrease it
        previous = got
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-13)
    # with every id stored, renormalize is the full divergence too, at any temperature
    teacher = TopKTeacher.from_logits(teacher_logits, v, tail="renormalize")
    got = topk_distillation_rows(kind, z, teacher, temperature=1.6, **kw)
    full_t = kldiv.divergence(
        teacher_logits, z, kind, form="logits", temperature=1.6, reduction="none", **kw
    )
    torch.testing.assert_close(got, full_t, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("tail", POLICIES)
def test_padding_equals_the_compacted_teacher(rng, tail):
    n, v, k = 5, 19, 6
    z, idx, lp = case(rng, n, v, k, pad=False, neg_inf=False)
    holes = np.zeros((n, k), dtype=bool)
    holes[:, 2:4] = True
    padded_idx = np.where(holes, np.array([-1, -7])[np.arange(k) % 2], idx)
    padded_lp = np.where(holes, np.where(np.arange(k) % 2, np.nan, 5.0), lp)
    kept = ~holes[0]
    zt = torch.tensor(z)
    for kind in KINDS:
        got = rows(kind, zt, padded_idx, padded_lp, tail)
        want = rows(kind, zt, idx[:, kept], lp[:, kept], tail)
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    # a row of padding only: under tail_bucket both distributions are the single tail bucket
    empty = TopKTeacher(torch.full((1, 3), -1), torch.zeros(1, 3), tail="tail_bucket")
    for kind in KINDS:
        assert topk_distillation_rows(kind, zt[:1], empty).item() == 0.0


@pytest.mark.parametrize("check", [False, True])
@pytest.mark.parametrize("tail", POLICIES)
def test_masked_rows_give_zero_and_no_gradient_whatever_they_hold(rng, tail, check):
    n, v, k = 6, 13, 4
    z, idx, lp = case(rng, n, v, k, pad=True, neg_inf=True)
    keep = np.array([True, False, True, False, True, False])
    z[~keep] = np.nan
    idx[1] = [v + 5, -3, 2, 2]  # out of range and duplicates
    idx[3] = [0, 1, 2, 3]
    lp[3] = [np.nan, 7.0, np.inf, -np.inf]
    idx[5] = -1
    kt = torch.tensor(keep)
    for kind in KINDS:
        zt = torch.tensor(z, requires_grad=True)
        out = rows(kind, zt, idx, lp, tail, keep=kt, check=check)
        out.sum().backward()
        assert (out[~kt] == 0).all() and not torch.isnan(out).any()
        assert (zt.grad[~kt] == 0).all() and torch.isfinite(zt.grad).all()
        want = rows(kind, torch.tensor(z[keep]), idx[keep], lp[keep], tail)
        torch.testing.assert_close(out[kt], want, rtol=1e-13, atol=1e-15)
        # fully masked: zero, differentiable, zero gradient
        zt.grad = None
        none = rows(kind, zt, idx, lp, tail, keep=torch.zeros(n, dtype=torch.bool), check=check)
        none.sum().backward()
        assert (none == 0).all() and (zt.grad == 0).all()


def test_zero_support_follows_the_core():
    inf = math.inf
    ids = torch.tensor([[0, 1], [0, 1], [0, 1]])
    lp = torch.tensor([[0.7, 0.2], [0.7, 0.2], [0.7, 0.3]], dtype=torch.float64).log()
    z = torch.tensor(
        [
            [-inf, 0.0, 1.0, 0.5],  # student gives 0 to a stored id with p > 0
            [0.0, 1.0, -inf, -inf],  # student tail 0, teacher tail 0.1 > 0
            [0.0, 1.0, -inf, -inf],  # both tails 0 (teacher stores everything)
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    bucket = TopKTeacher(ids, lp, tail="tail_bucket")
    kl = topk_distillation_rows("kl", z, bucket)
    assert kl[0].item() == inf and kl[1].item() == inf and math.isfinite(kl[2].item())
    for kind in ("reverse_kl", "js", "skew_kl", "skew_reverse_kl", "tv"):
        assert torch.isfinite(topk_distillation_rows(kind, z, bucket)).all()
    renorm = TopKTeacher(ids, lp, tail="renormalize")
    assert topk_distillation_rows("kl", z, renorm)[0].item() == inf
    assert topk_distillation_rows("reverse_kl", z, renorm)[0].item() < inf
    for kind in KINDS:
        for teacher in (bucket, renorm):
            z.grad = None
            topk_distillation_rows(kind, z, teacher, **PARAMS.get(kind, {})).sum().backward()
            assert torch.isfinite(z.grad).all(), (kind, teacher.tail)
    # The student rules out every id but the stored ones: a remainder 1 − Σp within tolerance
    # (1e-4 for float32) is rounding and the tail is 0 (finite KL); a larger one is real (+inf).
    zs = torch.tensor([[0.0, 1.0, -inf, -inf]])
    for remainder, finite in ((1e-6, True), (1e-3, False)):
        p = torch.tensor([[0.7, 0.3 - remainder]])
        teacher = TopKTeacher(ids[:1], p.log(), tail="tail_bucket")
        kl = topk_distillation_rows("kl", zs, teacher).item()
        assert math.isfinite(kl) == finite
        if finite:
            want = TopKTeacher(ids[:1], (p / p.sum()).log(), tail="renormalize")
            assert kl == pytest.approx(topk_distillation_rows("kl", zs, want).item(), abs=1e-6)
    # a stored probability of exactly 0 (log-prob -inf) is a zero term, not an error
    zero = TopKTeacher(ids[:1], torch.tensor([[0.0, -inf]]), tail="tail_bucket")
    assert math.isfinite(topk_distillation_rows("kl", z[2:].detach(), zero).item())


@pytest.mark.parametrize("kind", KINDS)
def test_confident_float32_student_keeps_its_tail(kind):
    # The student's mass outside the ids is 3.3e-10: 1 − Σq rounds to exactly 0 in float32
    # (log1mexp of the gathered log-probs would give KL = +inf); the masked logsumexp does not.
    v = 50
    z = torch.zeros(1, v)
    z[0, :2] = 25.0
    ids = torch.tensor([[0, 1]])
    naive = torch.logsumexp(torch.log_softmax(z, -1).gather(1, ids), -1)
    assert naive.item() == 0.0
    teacher = TopKTeacher(ids, torch.tensor([[0.6, 0.399]]).log(), tail="tail_bucket")
    w = torch.ones(1, dtype=torch.float64)
    fn = lambda x: topk_distillation_rows(kind, x, teacher, **PARAMS.get(kind, {}))  # noqa: E731
    got, g = values_and_grads(fn, z, w)
    ref, gref = values_and_grads(
        lambda x: reference(
            kind, x, ids.numpy(), teacher.log_probs.double().numpy(), "tail_bucket"
        ),
        z.double(),
        w,
    )
    # float32 rounding of logits of size 25 is ~2e-6 absolute in the log-probabilities
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(g.double(), gref, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("tail", POLICIES)
def test_bfloat16_student(rng, tail):
    z, idx, lp = case(rng, neg_inf=False)
    zb = torch.tensor(z).to(torch.bfloat16)
    w = torch.tensor(rng.random(z.shape[0]))
    for kind in KINDS:
        got, g = values_and_grads(lambda x: rows(kind, x, idx, lp, tail, torch.float32), zb, w)  # noqa: B023
        ref, gref = values_and_grads(lambda x: reference(kind, x, idx, lp, tail), zb.double(), w)  # noqa: B023
        assert got.dtype == torch.float32 and g.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.double(), gref, rtol=1e-2, atol=1e-3)


def test_stored_sum_above_one_within_tolerance_is_rounding(rng):
    # float32 log-probs whose probabilities sum to 1 + 5e-5 (< tolerance 1e-4): the tail is
    # exactly 0 and the stored entries are scaled to sum to 1, so every kind stays ≥ 0.
    p = np.array([0.5, 0.3, 0.2 + 5e-5])
    lp = np.log(p)[None]
    ids = np.array([[3, 0, 5]])
    z = torch.tensor(rng.normal(size=(1, 8)))
    for kind in KINDS:
        got = rows(kind, z, ids, lp, "tail_bucket", torch.float32)
        want = rows(kind, z, ids, np.log(p / p.sum())[None], "tail_bucket", torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
        same = torch.full((1, 8), -math.inf, dtype=torch.float64)
        same[0, ids[0]] = torch.tensor(np.log(p))
        # without the rescaling reverse_kl would read −log(1 + 5e-5) here
        assert rows(kind, same, ids, lp, "tail_bucket", torch.float32).item() >= -1e-15
    assert TOLERANCE[torch.bfloat16] > TOLERANCE[torch.float16] > TOLERANCE[torch.float32]


def test_leading_dims_and_flatten(rng):
    z, idx, lp = case(rng, n=6)
    keep = torch.tensor([True, True, False, True, True, True])
    teacher = TopKTeacher(
        torch.tensor(idx).reshape(2, 3, -1), torch.tensor(lp).reshape(2, 3, -1), tail="tail_bucket"
    )
    assert teacher.token_shape == (2, 3) and teacher.flatten().token_shape == (6,)
    zt = torch.tensor(z)
    got = topk_distillation_rows("js", zt.reshape(2, 3, -1), teacher, keep.reshape(2, 3))
    want = topk_distillation_rows("js", zt, teacher.flatten(), keep)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got.reshape(-1), want, rtol=0, atol=0)
    # int32 ids, as stored datasets often hold them
    small = dataclasses.replace(teacher, indices=teacher.indices.to(torch.int32))
    got32 = topk_distillation_rows("js", zt.reshape(2, 3, -1), small, keep.reshape(2, 3))
    torch.testing.assert_close(got32, got, rtol=0, atol=0)


@pytest.mark.parametrize("tail", POLICIES)
def test_float64_gradcheck(rng, tail):
    z, idx, lp = case(rng, n=3, v=7, k=3, neg_inf=False)
    teacher = TopKTeacher(torch.tensor(idx), torch.tensor(lp), tail=tail)
    t = 1.3 if tail == "renormalize" else 1.0
    for kind in KINDS:
        fn = lambda x: topk_distillation_rows(kind, x, teacher, temperature=t)  # noqa: E731, B023
        assert torch.autograd.gradcheck(fn, torch.tensor(z, requires_grad=True))


def test_empty_inputs():
    teacher = TopKTeacher(
        torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), tail="renormalize"
    )
    assert topk_distillation_rows("kl", torch.zeros(0, 5), teacher).shape == (0,)
    no_ids = TopKTeacher(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0), tail="tail_bucket")
    assert (topk_distillation_rows("kl", torch.randn(2, 5), no_ids) == 0).all()


def test_teacher_is_immutable_and_from_logits_matches_topk():
    logits = torch.randn(4, 10)
    teacher = TopKTeacher.from_logits(logits, 3, tail="renormalize")
    assert teacher.k == 3 and teacher.tolerance == TOLERANCE[torch.float32]
    torch.testing.assert_close(teacher.log_probs, torch.log_softmax(logits, -1).topk(3).values)
    with pytest.raises(dataclasses.FrozenInstanceError):
        teacher.tail = "tail_bucket"
    assert "renormalize" in repr(teacher) and "check=False" in repr(teacher)
    checked = TopKTeacher.from_logits(logits, 3, tail="renormalize", check=True)
    assert checked.check is True and "check=True" in repr(checked)


def _t(ids, lps, tail="tail_bucket", **kw):
    return TopKTeacher(torch.tensor(ids), torch.tensor(lps, dtype=torch.float64), tail=tail, **kw)


LOG = np.log
DIST6 = np.array([0.3, 0.25, 0.2, 0.1, 0.1, 0.05])  # a valid teacher over V = 6

# Data that breaks one rule: (ids, log_probs, tail, student logits or None for zeros(1, 6),
# the check=True message, the flat kept rows that break it).
BROKEN = [
    (
        [[0, 2, 2]],
        LOG([[0.2, 0.3, 0.1]]),
        "tail_bucket",
        None,
        r"distinct `teacher.indices`.*id 2 twice in row 0.*negative id",
        [0],
    ),
    (
        [[0, 1], [0, 9]],
        LOG([[0.2, 0.3], [0.2, 0.3]]),
        "tail_bucket",
        np.zeros((2, 6)),
        r"in \[0, 6\) \(negative = padding\), got 9 in row 1",
        [1],
    ),
    (
        [[0, 1]],
        [[0.5, -1.0]],
        "tail_bucket",
        None,
        r"log_probs` ≤ 0.*got 0.5 in row 0, entry 0",
        [0],
    ),
    ([[0, 1]], LOG([[0.6, 0.5]]), "tail_bucket", None, r"sum to at most 1.*got 1.1 in row 0", [0]),
    ([[0, 1]], [[np.nan, -1.0]], "renormalize", None, r"no NaN.*row 0, entry 0", [0]),
    (
        [[0, 1, 2, 3, 4, 5]],
        LOG([[0.1] * 6]),
        "tail_bucket",
        None,
        r"sum to 1 where the ids cover all 6",
        [0],
    ),
    (
        [[0, 1]],
        [[-np.inf, -np.inf]],
        "renormalize",
        None,
        r"at least one stored entry with probability > 0.*row 0",
        [0],
    ),
    (
        [[0, 1]],
        LOG([[0.2, 0.3]]),
        "renormalize",
        [[-np.inf, -np.inf, 0, 0, 0, 0]],
        r"student to give probability > 0.*row 0",
        [0],
    ),
    (
        [[0, 1]],
        LOG([[0.2, 0.3]]),
        "tail_bucket",
        [[-np.inf] * 6],
        r"at least one entry > -inf in every kept token, got only -inf in row 0",
        [0],
    ),
    (
        [[[0, 1]], [[0, 1]]],
        LOG([[[0.2, 0.3]], [[0.9, 0.7]]]),
        "tail_bucket",
        np.zeros((2, 1, 6)),
        r"sum to at most 1.*in token \(1, 0\)",
        [1],
    ),
]


def _broken(case_, check):
    ids, lps, tail, z, _, _ = case_
    z = torch.zeros(1, 6, dtype=torch.float64) if z is None else torch.tensor(z)
    return _t(ids, lps, tail, check=check), z


@pytest.mark.parametrize("case_", BROKEN, ids=range(len(BROKEN)))
def test_value_errors_with_check(case_):
    teacher, z = _broken(case_, check=True)
    with pytest.raises(ValueError, match=case_[4]):
        topk_distillation_rows("kl", z, teacher)
    # a masked token is never checked
    keep = torch.ones(teacher.token_shape, dtype=torch.bool).reshape(-1)
    keep[case_[5]] = False
    out = topk_distillation_rows("kl", z, teacher, keep.reshape(teacher.token_shape))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", KINDS)
def test_broken_data_without_check_gives_nan_rows_not_errors(kind):
    # Each broken token next to a valid one: the broken token is NaN in value and gradient (no
    # exception, no finite wrong number); the valid token is exactly what it is alone.
    z_ok = np.array([0.1, -0.4, 0.3, 1.0, -1.0, 0.2])
    for case_ in BROKEN:
        teacher, z = _broken(case_, check=False)
        ids, lp = teacher.flatten().indices, teacher.flatten().log_probs
        k = ids.shape[1]
        ids = torch.cat([ids, torch.arange(k)[None]])
        lp = torch.cat([lp, torch.tensor(LOG(DIST6[:k]))[None]])
        zz = torch.cat([z.reshape(-1, 6), torch.tensor(z_ok)[None]]).requires_grad_(True)
        both = TopKTeacher(ids, lp, tail=teacher.tail)
        out = topk_distillation_rows(kind, zz, both, **PARAMS.get(kind, {}))
        out.sum().backward()
        bad = torch.zeros(len(out), dtype=torch.bool)
        bad[case_[5]] = True
        assert torch.isnan(out[bad]).all(), (kind, case_[4])
        assert not torch.isnan(out[~bad]).any(), (kind, case_[4])
        assert torch.isnan(zz.grad[bad]).any(-1).all(), (kind, case_[4])
        assert torch.isfinite(zz.grad[~bad]).all(), (kind, case_[4])
        alone = TopKTeacher(ids[-1:], lp[-1:], tail=teacher.tail, check=True)
        z1 = zz[-1:].detach().clone().requires_grad_(True)
        want = topk_distillation_rows(kind, z1, alone, **PARAMS.get(kind, {}))
        want.sum().backward()
        assert torch.equal(out[-1:], want) and torch.equal(zz.grad[-1:], z1.grad)


@pytest.mark.parametrize("tail", POLICIES)
def test_check_false_equals_check_true_on_valid_data(rng, tail):
    z, idx, lp = case(rng, n=8)
    keep = torch.tensor(rng.random(8) < 0.7)
    t = 1.4 if tail == "renormalize" else 1.0
    for kind in KINDS:
        got = []
        for check in (False, True):
            teacher = TopKTeacher(torch.tensor(idx), torch.tensor(lp), tail=tail, check=check)
            zt = torch.tensor(z, requires_grad=True)
            out = topk_distillation_rows(
                kind, zt, teacher, keep, temperature=t, **PARAMS.get(kind, {})
            )
            torch.where(torch.isfinite(out), out, 0.0).sum().backward()
            got.append((out, zt.grad))
        assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1]), kind
    # the two rules that look like branches (sum above 1 within tolerance; a remainder within
    # tolerance with an empty student bucket) are selected per token, without check too
    inf = math.inf
    ids = torch.tensor([[3, 0, 5], [0, 1, -1]])
    lps = torch.tensor(LOG([[0.5, 0.3, 0.2 + 5e-5], [0.7, 0.3 - 1e-6, 1.0]]), dtype=torch.float32)
    zs = torch.tensor(np.array([rng.normal(size=8), [0.0, 1.0] + [-inf] * 6]))
    for check in (False, True):
        kl = topk_distillation_rows(
            "kl", zs, TopKTeacher(ids, lps, tail="tail_bucket", check=check)
        )
        assert torch.isfinite(kl).all() and (kl >= 0).all()


def test_check_true_is_refused_under_torch_compile():
    torch._dynamo.reset()
    teacher = _t([[0, 1]], LOG([[0.2, 0.3]]), check=True)
    compiled = torch.compile(
        lambda z: topk_distillation_rows("kl", z, teacher), fullgraph=True, backend="eager"
    )
    with pytest.raises(Exception, match="cannot run under jax.jit, vmap or torch.compile"):
        compiled(torch.zeros(1, 6, dtype=torch.float64))


def test_construction_errors():
    ids, lp = torch.tensor([[0, 1]]), torch.tensor([[-1.0, -2.0]])
    with pytest.raises(TypeError, match="tail"):
        TopKTeacher(ids, lp)  # the policy is required
    with pytest.raises(ValueError, match=r"`tail` to be one of 'tail_bucket', 'renormalize'"):
        TopKTeacher(ids, lp, tail="bucket")
    with pytest.raises(TypeError, match=r"integer `indices`.*float32"):
        TopKTeacher(ids.float(), lp, tail="tail_bucket")
    with pytest.raises(TypeError, match=r"floating `log_probs`.*int64"):
        TopKTeacher(ids, ids, tail="tail_bucket")
    with pytest.raises(ValueError, match=r"same shape \[\.\.\., K\], got \(1, 2\) and \(2, 1\)"):
        TopKTeacher(ids, lp.reshape(2, 1), tail="tail_bucket")
    with pytest.raises(ValueError, match=r"do not require grad.*detach"):
        TopKTeacher(ids, lp.requires_grad_(), tail="tail_bucket")
    with pytest.raises(ValueError, match="tolerance"):
        TopKTeacher(ids, lp.detach(), tail="tail_bucket", tolerance=-1.0)
    with pytest.raises(TypeError, match=r"`check` to be True or False"):
        TopKTeacher(ids, lp.detach(), tail="tail_bucket", check=1)
    # static facts are checked whatever `check` says
    for check in (False, True):
        teacher = TopKTeacher(ids, lp.detach(), tail="tail_bucket", check=check)
        with pytest.raises(ValueError, match=r"temperature=1.*tail='tail_bucket'.*re-tempered"):
            topk_distillation_rows("kl", torch.zeros(1, 4), teacher, temperature=2.0)
        with pytest.raises(ValueError, match=r"token shape to match the student's \(2,\)"):
            topk_distillation_rows("kl", torch.zeros(2, 4), teacher)
        with pytest.raises(ValueError, match=r"`keep` of the token shape \(1,\)"):
            topk_distillation_rows("kl", torch.zeros(1, 4), teacher, torch.ones(2, dtype=bool))
    teacher = TopKTeacher(ids, lp.detach(), tail="tail_bucket")
    with pytest.raises(ValueError, match="Expected `kind` to be one of"):
        topk_distillation_rows("symmetric", torch.zeros(1, 4), teacher)
    with pytest.raises(TypeError, match="floating `student_logits`"):
        topk_distillation_rows("kl", torch.zeros(1, 4, dtype=torch.long), teacher)
    with pytest.raises(TypeError, match="`keep` to be a boolean array or an integer array"):
        topk_distillation_rows("kl", torch.zeros(1, 4), teacher, torch.ones(1))
    with pytest.raises(ValueError, match=r"`keep` to hold only 0 and 1.*got 2 at index \(0,\)"):
        topk_distillation_rows("kl", torch.zeros(1, 4), teacher, torch.tensor([2]))
    with pytest.raises(ValueError, match=r"`beta` to be in \[0, 1\]"):
        topk_distillation_rows("js", torch.zeros(1, 4), teacher, beta=1.5)


@pytest.mark.parametrize("tail", POLICIES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_distillation_loss_takes_a_topk_teacher(rng, tail, reduction):
    from kldiv.torch import DistillationLoss

    z, idx, lp = case(rng, n=12, v=30, k=6, neg_inf=False)
    z = z.reshape(3, 4, 30)
    labels = torch.tensor(rng.integers(0, 30, size=(3, 4)))
    labels[0, 1] = labels[2, 3] = -1
    temperature = 1.0 if tail == "tail_bucket" else 2.0
    teacher = TopKTeacher(
        torch.tensor(idx).reshape(3, 4, 6), torch.tensor(lp).reshape(3, 4, 6), tail=tail
    )
    loss = DistillationLoss(
        "js",
        beta=0.3,
        temperature=temperature,
        ignore_index=-1,
        scale_by_temperature_squared=True,
        reduction=reduction,
    )
    num_items = 7.0 if reduction == "mean" else None
    zt = torch.tensor(z, requires_grad=True)
    out = loss(zt, teacher, labels, num_items=num_items)
    # the reference: dense per-token distributions through the core, reduced by hand
    keep = (labels != -1).reshape(-1)
    ref_rows = reference("js", torch.tensor(z).reshape(12, 30), idx, lp, tail, temperature)
    ref_rows = torch.where(keep, ref_rows * temperature**2, 0.0)
    want = {"none": ref_rows.reshape(3, 4), "sum": ref_rows.sum(), "mean": ref_rows.sum() / 7.0}[
        reduction
    ]
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    out.sum().backward()
    assert torch.equal(zt.grad[labels == -1], torch.zeros(2, 30, dtype=torch.float64))
    with pytest.raises(ValueError, match="token shape"):
        loss(zt, teacher, labels[:2])


def test_review_findings_nan_gradient_k0_and_forced_paths():
    from kldiv.torch import DistillationLoss

    # a kept row with no usable id under "renormalize" is NaN in value AND gradient
    z = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[1, 2], [-1, -1]])
    lp = torch.log(torch.tensor([[0.5, 0.3], [0.1, 0.1]], dtype=torch.float64))
    out = topk_distillation_rows("kl", z, TopKTeacher(ids, lp, tail="renormalize"))
    assert not out[0].isnan() and out[1].isnan()
    (g,) = torch.autograd.grad(out.nansum(), z)
    assert g[0].isfinite().all() and g[1].isnan().any()
    # K = 0 has no conditional distribution
    with pytest.raises(ValueError, match="K ≥ 1"):
        TopKTeacher(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0), tail="renormalize")
    # a forced dense path is refused, not silently ignored
    teacher = TopKTeacher(ids[:1], lp[:1].float(), tail="tail_bucket")
    with pytest.raises(ValueError, match="a TopKTeacher goes through the top-k path"):
        DistillationLoss("kl", fast_path="chunked")(torch.randn(1, 6), teacher)


def test_reverse_kl_of_a_rounded_away_tail_is_infinite_as_documented():
    # a confident teacher: its true tail (~1e-9) is below float32's rounding of Σp
    full = torch.log_softmax(torch.tensor([[30.0, 10.0, 9.0] + [0.0] * 37]), -1)
    lp, ids = full.topk(3, -1)
    assert float(torch.logsumexp(lp, -1).exp()) == 1.0  # stored sum reads exactly 1
    student = torch.randn(1, 40)
    teacher = TopKTeacher(ids, lp, tail="tail_bucket")
    assert topk_distillation_rows("reverse_kl", student, teacher).isinf().all()
    assert topk_distillation_rows("skew_reverse_kl", student, teacher).isfinite().all()
    assert topk_distillation_rows("kl", student, teacher).isfinite().all()
