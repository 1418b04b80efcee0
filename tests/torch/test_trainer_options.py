"""The trainers' options of the distillation losses: ``shift_labels`` (causal-LM labels),
``vocab_size`` (padded vocabularies) and ``softcap``/``logit_scale`` (what a model's head does
to its logits), on every engine (the C kernel, tensor code, Triton in its interpreter, the
core), the fused-linear loss, the vocab-parallel losses on two Gloo ranks, and the core
functions on NumPy, PyTorch and JAX.

The reference of every check is written here: the labels shifted by hand, the logits cut to
the vocabulary by hand, the maps composed in float64 (``c·tanh(σz/c)``), and the core in
float64 on the result. Tolerances: float32 engines against float64 give log-probabilities off
by a few eps32·(|z/T| + log Z), under 8·6e-8·40 ≈ 2e-5 at these scales, so values and
gradients are compared to ``rtol=1e-4, atol=1e-5``; float64 paths to 1e-10.
"""

from __future__ import annotations

import math
from pathlib import Path

import gloo
import numpy as np
import pytest
import torch

import kldiv
from kldiv.torch import DistillationLoss, FusedLinearDistillationLoss, TopKTeacher
from kldiv.torch._rows import linear
from kldiv.torch.parallel import ParallelDistillationLoss

KINDS = ["kl", "reverse_kl", "js", "skew_kl", "skew_reverse_kl", "tv"]
PARAMS = {"js": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
ENGINES = ["native", "tensor", "triton", "core"]
F32 = {"rtol": 1e-4, "atol": 1e-5}
F64 = {"rtol": 1e-10, "atol": 1e-10}
WORKER = Path(__file__).parent / "parallel_worker.py"


def head_map(z: torch.Tensor, cap: float | None, scale: float) -> torch.Tensor:
    """The composition the options stand for, in the test's own words: scale, then cap;
    ±inf logits stay as they are."""
    z = z * scale
    if cap is None:
        return z
    return torch.where(torch.isinf(z), z, cap * torch.tanh(z / cap))


def no_nan(x: torch.Tensor) -> torch.Tensor:
    """NaN (the garbage of skipped tokens) as 0; ±inf kept (torch.nan_to_num would not)."""
    return torch.where(x.isnan(), 0.0, x)


def shifted_keep(labels: torch.Tensor, ignore: int = -100) -> torch.Tensor:
    """Position i kept where token i + 1 is not ignored; the last position never."""
    keep = torch.zeros(labels.shape, dtype=torch.bool)
    keep[..., :-1] = labels[..., 1:] != ignore
    return keep


def reference(kind, s, t, keep, v, caps, scales, temperature, reduction, upstream):
    """The float64 loss and student gradient (full width) of the options, by hand."""
    s64 = no_nan(s.detach().double()).requires_grad_(True)
    zt = head_map(t.double()[..., :v], caps[0], scales[0])
    zs = head_map(s64[..., :v], caps[1], scales[1])
    loss = kldiv.divergence(
        zt,
        zs,
        kind,
        form="logits",
        temperature=temperature,
        mask=keep,
        reduction=reduction,
        **PARAMS.get(kind, {}),
    )
    (loss * upstream).sum().backward()
    return loss.detach(), s64.grad


def batch(rng, tokens=(2, 6), v=37, pad_s=3, pad_t=8):
    """Logits with padded columns that hold garbage (large values, NaN), -inf logits on
    both sides, ignored labels (whose student logits are NaN: never read) and input ids."""
    s = rng.normal(scale=3.0, size=(*tokens, v + pad_s))
    t = rng.normal(scale=3.0, size=(*tokens, v + pad_t))
    s[..., v:] = 1e4
    t[..., v:] = np.nan
    t[..., :3][rng.random(t[..., :3].shape) < 0.3] = -np.inf
    s[..., 5][rng.random(s[..., 5].shape) < 0.2] = -np.inf
    ids = rng.integers(0, v, size=tokens)
    ids[rng.random(tokens) < 0.3] = -100
    keep = shifted_keep(torch.tensor(ids))
    s[~keep.numpy()] = np.nan
    return torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), ids


def engine_setup(engine, monkeypatch):
    """The DistillationLoss fast_path and environment that select ``engine``."""
    monkeypatch.setenv("KLDIV_NATIVE", "0" if engine == "tensor" else "1")
    return {"native": "chunked", "tensor": "chunked", "triton": "triton", "core": False}[engine]


def tv_comparable(kind, s, t, v, caps, scales, temperature):
    """Rows whose TV gradient is decided in float32: sign(q − p) at near-ties is a coin
    toss that moves the whole row through Σh (see test_distillation)."""
    if kind != "tv":
        return torch.ones(s.shape[:-1], dtype=torch.bool)
    zs = head_map(no_nan(s.double()[..., :v]), caps[1], scales[1])
    zt = head_map(t.double()[..., :v], caps[0], scales[0])
    q, p = torch.softmax(zs / temperature, -1), torch.softmax(zt / temperature, -1)
    d = (q - p).abs()
    return ~((d <= 1e-5 * (q + p)) & (d > 0)).any(-1)


OPTION_SETS = {
    # a cap on each side, different scales, padding on both sides, shifted labels
    # (caps of a few logits' scale: tanh's both regimes, linear and saturated)
    "capped": {"softcap": (4.0, 3.0), "logit_scale": (1.3, 0.8)},
    # one scale on both sides and no cap: folded into the temperature
    "scaled": {"softcap": None, "logit_scale": 0.7},
    # the student's head only
    "student": {"softcap": (None, 2.0), "logit_scale": None},
}


def caps_scales(opts):
    caps, scales = opts["softcap"], opts["logit_scale"]
    caps = caps if isinstance(caps, tuple) else (caps, caps)
    scales = scales if isinstance(scales, tuple) else (scales, scales)
    return caps, tuple(1.0 if x is None else x for x in scales)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_distillation_options_on_every_engine(rng, engine, kind, options, reduction, monkeypatch):
    fast_path = engine_setup(engine, monkeypatch)
    opts = OPTION_SETS[options]
    caps, scales = caps_scales(opts)
    s, t, ids = batch(rng)
    v = 37
    loss = DistillationLoss(
        kind,
        temperature=1.5,
        reduction=reduction,
        shift_labels=True,
        vocab_size=v,
        fast_path=fast_path,
        **opts,
        **PARAMS.get(kind, {}),
    )
    st = s.clone().requires_grad_(True)
    out = loss(st, t, torch.tensor(ids))
    keep = shifted_keep(torch.tensor(ids))
    upstream = torch.rand(keep.shape, dtype=torch.float64) if reduction == "none" else 2.5
    want, want_grad = reference(kind, s, t, keep, v, caps, scales, 1.5, reduction, upstream)
    assert torch.equal(out.isposinf(), want.isposinf())
    fin = want.isfinite()
    torch.testing.assert_close(out.double()[fin], want[fin], **F32)
    if reduction == "none":
        assert (out[~keep] == 0).all() and (out[..., -1] == 0).all()
    if not fin.all():
        return  # gradients at an infinite value are unconstrained (the core's docs)
    (out.double() * upstream).sum().backward()
    g = st.grad
    assert g.isfinite().all()
    assert (g[..., v:] == 0).all()  # the padding gets exactly zero gradient
    assert (g[~keep] == 0).all()
    rows = tv_comparable(kind, s, t, v, caps, scales, 1.5)
    torch.testing.assert_close(g.double()[rows], want_grad[rows], **F32)


@pytest.mark.parametrize("engine", ["native", "tensor", "triton"])
def test_softcap_second_derivatives_and_retained_graph(rng, engine, monkeypatch):
    """create_graph=True recomputes through the core (second derivatives exact); a second
    backward through a retained graph recomputes the gradient."""
    fast_path = engine_setup(engine, monkeypatch)
    s, t, _ = batch(rng, pad_s=0, pad_t=0)
    s = no_nan(s)
    loss = DistillationLoss("kl", softcap=2.0, fast_path=fast_path, temperature=2.0)
    st = s.clone().requires_grad_(True)
    out = loss(st, t)
    (g,) = torch.autograd.grad(out, st, create_graph=True)
    hvp = torch.autograd.grad((g * torch.ones_like(g)).sum(), st)[0]
    s64 = s.double().requires_grad_(True)
    ref = DistillationLoss("kl", softcap=2.0, fast_path=False, temperature=2.0)(s64, t.double())
    (g64,) = torch.autograd.grad(ref, s64, create_graph=True)
    hvp64 = torch.autograd.grad(g64.sum(), s64)[0]
    torch.testing.assert_close(g.double(), g64, **F32)
    torch.testing.assert_close(hvp.double(), hvp64, **F32)
    st.grad = None
    out = loss(st, t)
    out.backward(retain_graph=True)
    once = st.grad.clone()
    out.backward()
    torch.testing.assert_close(st.grad, 2 * once)


def test_shift_labels_is_the_shift_by_hand(rng):
    s = torch.randn(3, 7, 11)
    t = torch.randn(3, 7, 11)
    ids = torch.tensor(rng.integers(0, 11, size=(3, 7)))
    ids[0, 3] = -100
    by_hand = torch.full_like(ids, -100)
    by_hand[:, :-1] = ids[:, 1:]
    mask = torch.tensor(rng.integers(0, 2, size=(3, 7)))
    for kw in ({}, {"mask": mask}):
        shifted = DistillationLoss("js", shift_labels=True, reduction="none")(s, t, ids, **kw)
        manual = DistillationLoss("js", reduction="none")(s, t, by_hand, **kw)
        torch.testing.assert_close(shifted, manual, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sequence axis for shift_labels=True"):
        DistillationLoss(shift_labels=True)(torch.randn(5), torch.randn(5), torch.tensor(1))
    with pytest.raises(TypeError, match="shift_labels"):
        DistillationLoss(shift_labels=1)
    # the top-k teacher's path takes it too
    idx = torch.stack([torch.randperm(11)[:4] for _ in range(21)]).reshape(3, 7, 4)
    lp = torch.log_softmax(torch.randn(3, 7, 11), -1).gather(-1, idx)
    teacher = TopKTeacher(idx, lp, tail="tail_bucket")
    shifted = DistillationLoss("kl", shift_labels=True, reduction="none")(s, teacher, ids)
    manual = DistillationLoss("kl", reduction="none")(s, teacher, by_hand)
    torch.testing.assert_close(shifted, manual, rtol=0, atol=0)


def test_option_errors_are_one_line_and_name_the_option():
    s, t = torch.randn(2, 32000), torch.randn(2, 32064)
    with pytest.raises(ValueError, match=r"got 32000 and 32064.*pass `vocab_size=`"):
        DistillationLoss()(s, t)
    with pytest.raises(ValueError, match=r"vocab_size=32001 for widths 32000 and 32064"):
        DistillationLoss(vocab_size=32001)(s, t)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="vocab_size"):
            DistillationLoss(vocab_size=bad)
    with pytest.raises(ValueError, match=r"`softcap` to be None or finite and > 0, got 0"):
        DistillationLoss(softcap=0)
    with pytest.raises(ValueError, match=r"`logit_scale` \(student\) to be None or finite"):
        DistillationLoss(logit_scale=(1.0, math.inf))
    with pytest.raises(TypeError, match="`softcap` to be None or a positive float"):
        DistillationLoss(softcap="30")
    with pytest.raises(ValueError, match=r"\(teacher, student\) pair"):
        DistillationLoss(softcap=(1.0, 2.0, 3.0))
    idx = torch.tensor([[0, 1]])
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    teacher = TopKTeacher(idx, lp, tail="tail_bucket")
    with pytest.raises(ValueError, match=r"student only with a TopKTeacher.*\(None, value\)"):
        DistillationLoss(softcap=30.0)(torch.randn(1, 5), teacher)
    h, w = torch.randn(4, 3), torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"got 12\. If one vocabulary is padded.*`vocab_size=`"):
        FusedLinearDistillationLoss()(h, w, torch.randn(4, 12))
    with pytest.raises(ValueError, match=r"vocab_size=11"):
        FusedLinearDistillationLoss(vocab_size=11)(h, w, torch.randn(4, 12))
    with pytest.raises(ValueError, match="form='logits' for the student"):
        kldiv.kl_div(np.ones(3) / 3, np.ones(3) / 3, form=("logits", "probs"), softcap=3.0)
    assert "softcap=(None, 12.0)" in repr(DistillationLoss(softcap=(None, 12.0)))
    assert "shift_labels=True, vocab_size=7" in repr(
        DistillationLoss(shift_labels=True, vocab_size=7)
    )


def test_topk_teacher_skipped_rows_never_reach_the_cap():
    """NaN in a skipped row of the student must not reach tanh's gradient (0·NaN)."""
    torch.manual_seed(0)
    s = torch.randn(4, 10)
    s[2] = math.nan
    labels = torch.tensor([1, 2, -100, 3])
    lp, idx = torch.log_softmax(torch.randn(4, 10), -1).topk(3, -1)
    teacher = TopKTeacher(idx, lp, tail="tail_bucket")
    st = s.clone().requires_grad_(True)
    DistillationLoss("kl", softcap=(None, 5.0))(st, teacher, labels).backward()
    assert (st.grad[2] == 0).all() and st.grad.isfinite().all()


def test_maps_outside_float32_range_are_refused():
    with pytest.raises(ValueError, match=r"within 2\^±100"):
        kldiv.kl_div(np.zeros(3), np.zeros(3), form="logits", softcap=1e-40)
    with pytest.raises(ValueError, match=r"\(student\) within 2\^±100"):
        DistillationLoss(softcap=1.0, logit_scale=(1.0, 1e39))


def test_topk_teacher_with_padded_capped_student(rng):
    """A top-k teacher against a padded, soft-capped student: the student cut and mapped by
    hand gives the same loss and gradient."""
    v = 13
    s = torch.randn(4, v + 3, dtype=torch.float64) * 4
    idx = torch.stack([torch.randperm(v)[:5] for _ in range(4)])
    lp = torch.log_softmax(torch.randn(4, v, dtype=torch.float64), -1).gather(-1, idx)
    teacher = TopKTeacher(idx, lp, tail="tail_bucket")
    st = s.clone().requires_grad_(True)
    got = DistillationLoss("kl", vocab_size=v, softcap=(None, 6.0), logit_scale=(None, 0.5))(
        st, teacher
    )
    got.backward()
    sh = s.clone().requires_grad_(True)
    want = DistillationLoss("kl")(head_map(sh[:, :v], 6.0, 0.5), teacher)
    want.backward()
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(st.grad[:, :v], sh.grad[:, :v], **F64)
    assert (st.grad[:, v:] == 0).all()


@pytest.mark.parametrize("engine", ["native", "tensor", "triton", "float64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("teacher_form", ["head", "logits"])
def test_fused_linear_options(rng, engine, kind, teacher_form, monkeypatch):
    """FusedLinearDistillationLoss with padded heads (garbage in the padded rows), maps on
    both sides and shifted labels, against the float64 composition by hand."""
    monkeypatch.setenv("KLDIV_NATIVE", "0" if engine == "tensor" else "1")
    if engine == "triton":
        monkeypatch.setattr(linear, "FAST_PATH", "triton")
    dtype = torch.float64 if engine == "float64" else torch.float32
    n, hs, ht, v = 9, 6, 5, 31
    h = torch.tensor(rng.normal(size=(n, hs)), dtype=dtype)
    w = torch.tensor(rng.normal(size=(v + 4, hs)) * 2, dtype=dtype)
    b = torch.tensor(rng.normal(size=v + 4), dtype=dtype)
    w[v:] = 1e3  # padded rows: never read
    b[3] = -math.inf  # a token the student rules out
    th = torch.tensor(rng.normal(size=(n, ht)), dtype=dtype)
    tw = torch.tensor(rng.normal(size=(v + 9, ht)) * 2, dtype=dtype)
    tw[v:] = math.nan
    ids = torch.tensor(rng.integers(0, v, size=n))
    ids[[2, 6]] = -100
    keep = shifted_keep(ids)
    opts = {"softcap": (3.0, 4.0), "logit_scale": (1.3, 0.8)}
    loss = FusedLinearDistillationLoss(
        kind, temperature=2.0, shift_labels=True, vocab_size=v, chunk_size=4, **opts,
        **PARAMS.get(kind, {}),
    )  # fmt: skip
    hg, wg, bg = (x.clone().requires_grad_(True) for x in (h, w, b))
    if teacher_form == "head":
        out = loss(hg, wg, None, ids, student_bias=bg, teacher_hidden=th, teacher_weight=tw)
        zt = th.double() @ tw.double()[:v].T
    else:
        zt_full = torch.cat([th @ tw[:v].T, torch.full((n, 9), math.nan, dtype=dtype)], -1)
        out = loss(hg, wg, zt_full, ids, student_bias=bg)
        zt = zt_full.double()[:, :v]
    out.backward()
    h64, w64, b64 = (x.double().requires_grad_(True) for x in (h, w, b))
    zs = h64 @ w64[:v].T + b64[:v]
    want = kldiv.divergence(
        head_map(zt, 3.0, 1.3), head_map(zs, 4.0, 0.8), kind, form="logits",
        temperature=2.0, mask=keep, **PARAMS.get(kind, {}),
    )  # fmt: skip
    want.backward()
    tol = F64 if engine == "float64" else F32
    torch.testing.assert_close(out.double(), want.detach(), **tol)
    assert (wg.grad[v:] == 0).all() and (bg.grad[v:] == 0).all()
    if kind == "tv" or not want.isfinite():  # KL is +inf at the ruled-out token, where
        return  # gradients are unconstrained (the core's docs); TV: near-ties, as above
    for got, ref in ((hg.grad, h64.grad), (wg.grad[:v], w64.grad[:v]), (bg.grad[:v], b64.grad[:v])):
        torch.testing.assert_close(got.double(), ref, **tol)


@pytest.mark.parametrize("kind", ["kl", "js", "tv"])
@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_core_functions_take_the_maps(rng, kind, framework):
    """kldiv.divergence(form="logits", softcap=, logit_scale=) on every framework against the
    composition by hand; a -inf logit stays a zero probability; gradients finite."""
    p = rng.normal(scale=10.0, size=(4, 9))
    q = rng.normal(scale=10.0, size=(4, 9))
    p[0, 2] = -np.inf
    q[1, 4] = -np.inf
    opts = {"softcap": (7.0, 9.0), "logit_scale": 0.6, "temperature": 1.3}
    want = kldiv.divergence(
        head_map(torch.tensor(p), 7.0, 0.6), head_map(torch.tensor(q), 9.0, 0.6), kind,
        form="logits", temperature=1.3, reduction="none",
    )  # fmt: skip
    if framework == "numpy":
        got = kldiv.divergence(p, q, kind, form="logits", reduction="none", **opts)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12)
        return
    if framework == "torch":
        qt = torch.tensor(q, requires_grad=True)
        got = kldiv.divergence(torch.tensor(p), qt, kind, form="logits", reduction="none", **opts)
        got.sum().backward()
        # a zero probability gets a zero gradient where the row's value is finite (KL's row 1
        # is +inf: the teacher gives that token mass)
        assert qt.grad.isfinite().all() and (not got[1].isfinite() or qt.grad[1, 4] == 0)
        torch.testing.assert_close(got.detach(), want, **F64)
        return
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    with jax.enable_x64(True):
        fn = jax.jit(
            lambda a, b: kldiv.divergence(a, b, kind, form="logits", reduction="none", **opts)
        )
        got = fn(jnp.asarray(p), jnp.asarray(q))
        g = jax.grad(lambda b: fn(jnp.asarray(p), b).sum())(jnp.asarray(q))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-10)
    assert np.isfinite(np.asarray(g)).all() and (not np.isfinite(got[1]) or float(g[1, 4]) == 0)


# ---- the vocab-parallel losses on two Gloo ranks ----


@pytest.mark.spawns
def test_vocab_parallel_options_on_two_ranks(tmp_path, rng):
    """ParallelDistillationLoss with the padding on the last rank (vocab_size below the sum
    of the slices), maps on both sides and shifted labels; each rank's loss and gradient
    slice against the float64 composition by hand on the whole vocabulary."""
    n, v, pad = 10, 23, 5
    cases = []
    for kind in ("kl", "js", "skew_reverse_kl"):
        s = torch.tensor(rng.normal(scale=3.0, size=(n, v + pad)))
        t = torch.tensor(rng.normal(scale=3.0, size=(n, v + pad)))
        s[:, v:], t[:, v:] = 1e4, math.nan
        t[0, 1] = -math.inf
        ids = torch.tensor(rng.integers(0, v, size=n))
        ids[4] = -100
        for name, dtype in (("f64", torch.float64), ("f32", torch.float32)):
            cases.append(
                {
                    "name": f"{kind}-{name}",
                    "layout": "tp",
                    "kind": kind,
                    "beta": 0.3,  # PARAMS, which the reference uses
                    "alpha": 0.2,
                    "temperature": 1.5,
                    "reduction": "mean",
                    "vocab_size": v,
                    "shift_labels": True,
                    "softcap": (2.0, 3.0),
                    "logit_scale": (1.0, 0.9),
                    "widths": [16, v + pad - 16],  # the second rank holds the padding
                    "student": s.to(dtype),
                    "teacher": t.to(dtype),
                    "labels": ids,
                }
            )
    bad = {**cases[0], "name": "bad-softcap", "tweaks": {1: {"softcap": 3.0}}}
    results = gloo.launch(WORKER, 2, tmp_path, [*cases, bad], timeout=120)
    errors = [results[r]["bad-softcap"].get("error") for r in range(2)]
    assert errors[0] is not None and errors[0] == errors[1]
    assert "'softcap': [[2.0, 3.0], 3.0]" in errors[0], errors[0]
    for case in cases:
        keep = shifted_keep(case["labels"])
        want, want_grad = reference(
            case["kind"], case["student"], case["teacher"], keep, v, (2.0, 3.0), (1.0, 0.9),
            1.5, "mean", 3.7,
        )  # fmt: skip
        tol = F32 if "f32" in case["name"] else F64
        cols = [slice(0, 16), slice(16, v + pad)]
        for rank in range(2):
            got = results[rank][case["name"]]
            assert "error" not in got, got
            torch.testing.assert_close(got["loss"].double(), want, **tol)
            torch.testing.assert_close(got["grad"].double(), want_grad[:, cols[rank]], **tol)
        assert (results[1][case["name"]]["grad"][:, v - 16 :] == 0).all()


def test_vocab_parallel_options_without_groups(rng):
    """One process, no groups: the parallel loss is DistillationLoss, options included (padded
    widths that differ too)."""
    s, t, ids = batch(rng, tokens=(8,), pad_s=4, pad_t=9)
    opts = {"vocab_size": 37, "shift_labels": True, "softcap": 9.0, "logit_scale": 1.1}
    st, sd = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = ParallelDistillationLoss("js", **opts)(st, t, torch.tensor(ids))
    want = DistillationLoss("js", **opts)(sd, t, torch.tensor(ids))
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, **F32)
    torch.testing.assert_close(st.grad, sd.grad, **F32)
    for validate in (True, False):
        with pytest.raises(ValueError, match="vocab_size=50"):
            ParallelDistillationLoss(vocab_size=50, validate=validate)(st, t[..., :41])


def test_triton_maps_trace_under_torch_compile(rng):
    """The maps are arguments of the Triton custom ops: torch.compile(fullgraph=True) traces
    through them, with the eager values and gradients."""
    s, t, ids = batch(rng, pad_s=0, pad_t=0)
    s = no_nan(s)
    loss = DistillationLoss("js", softcap=(None, 2.0), logit_scale=1.3, fast_path="triton")
    s1 = s.clone().requires_grad_(True)
    eager = loss(s1, t)
    eager.backward()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    s2 = s.clone().requires_grad_(True)
    out = compiled(s2, t)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(s2.grad, s1.grad)


@pytest.mark.parametrize("engine", ["native", "tensor", "triton"])
def test_a_huge_cap_at_unit_temperature(rng, engine, monkeypatch):
    """cap = σ = 3e9 at T = 1: the row maximum must be mapped by the same code as its
    elements, or an ulp of difference times the cap underflows every exp of the row."""
    fast_path = engine_setup(engine, monkeypatch)
    s = torch.tensor(rng.standard_normal((8, 40)), dtype=torch.float32)
    t = torch.tensor(rng.standard_normal((8, 40)), dtype=torch.float32)
    st = s.clone().requires_grad_(True)
    cap = 3e9
    opts = {"softcap": (None, cap), "logit_scale": (None, cap), "reduction": "none"}
    for kind in ("kl", "js"):
        got = DistillationLoss(kind, fast_path=fast_path, **opts)(st, t)
        want = kldiv.divergence(
            t.double(), cap * torch.tanh(s.double()), kind, form="logits", reduction="none"
        )
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
