"""The core functions on torch tensors through the row engine: the same values and gradients as
the float64 core for every kind and option the engine takes (masks, weights, num_items,
temperature, reductions, -inf logits, garbage in masked rows), the core for everything it
does not, and second derivatives (create_graph) through every engine.

Error bound for float32 arithmetic against float64: with logits shifted by their row maximum
(spread at most R), every term carries at most a few ulp of its exp/log and of a log-ratio of
size ≤ 2R, so a row's value and each gradient entry are within ``16·(R + 1)·eps32`` (a factor
two above the worst case of this analysis); a reduction over n rows within n times that.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

import kldiv
from kldiv._kinds import KIND_PARAMS
from kldiv.torch import DistillationLoss

KINDS = list(kldiv.KINDS)
EPS32 = float(np.finfo(np.float32).eps)
PARAMS = {"js": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
FINITE_ONLY = ("js", "skew_kl", "skew_reverse_kl", "tv")  # finite for any supports


def logits(rng, shape, neg_inf, kind):
    t = rng.normal(scale=2.0, size=shape)
    s = rng.normal(scale=2.0, size=shape)
    if neg_inf:
        # zero probabilities on both sides where the kind stays finite; on the side whose
        # zeros make KL infinite only where the other side is zero too
        t[..., 0] = -np.inf
        s[..., 0] = -np.inf
        if kind in FINITE_ONLY + ("kl",):
            t[..., 1] = -np.inf  # teacher zero, student positive: finite for KL(T‖S)
        if kind in FINITE_ONLY + ("reverse_kl",):
            s[..., 2] = -np.inf  # student zero, teacher positive: finite for KL(S‖T)
    return t, s


def engine_used(out: torch.Tensor) -> bool:
    """Whether the autograd graph of ``out`` runs through the chunked engine's Function."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "ChunkedDivergence" in type(fn).__name__:
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


def spread(*xs):
    """R: the largest finite spread of a row of logits (for the error bound)."""
    r = 0.0
    for x in xs:
        x = x.reshape(-1, x.shape[-1])
        x = x[np.isfinite(x).any(-1)]  # masked rows may be all NaN
        hi = np.where(np.isfinite(x), x, -np.inf).max(-1)
        lo = np.where(np.isfinite(x), x, np.inf).min(-1)
        r = max(r, float((hi - lo).max()))
    return r


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "mask", "weight", "num_items", "temperature"])
def test_values_and_gradients_equal_the_float64_core(rng, kind, reduction, options):
    shape = (3, 5, 33)
    t, s = logits(rng, shape, neg_inf=True, kind=kind)
    kw: dict = dict(form="logits", reduction=reduction, **PARAMS.get(kind, {}))
    if options == "mask":
        mask = rng.random(shape[1]) > 0.4  # (T,) broadcast over (B, T), as documented
        mask[0] = True
        kw["mask"] = torch.tensor(mask.astype(np.int64))  # 0/1 integers, attention_mask style
        s[:, ~mask] = np.nan  # masked rows hold garbage the engine must never read
    if options == "weight":
        w = rng.random(shape[:2])
    if options == "num_items":  # replaces the mean's denominator: with "mean" only
        kw.update(num_items=7.0, reduction="mean")
    if options == "temperature":
        kw["temperature"] = 2.5
    s32 = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    s64 = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    if options == "weight":
        out = kldiv.divergence(torch.tensor(t, dtype=torch.float32), s32, kind, **kw,
                               weight=torch.tensor(w, dtype=torch.float32))  # fmt: skip
        ref = kldiv.divergence(torch.tensor(t), s64, kind, **kw, weight=torch.tensor(w))
    else:
        out = kldiv.divergence(torch.tensor(t, dtype=torch.float32), s32, kind, **kw)
        ref = kldiv.divergence(torch.tensor(t), s64, kind, **kw)
    assert engine_used(out), "the float32 logits should have gone through the engine"
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rows = 1 if kw["reduction"] == "mean" else shape[0] * shape[1]
    tol = 16 * (spread(t, s) + 1) * EPS32 * rows  # weights are in [0, 1): no larger
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=tol)
    cot = torch.tensor(rng.normal(size=tuple(out.shape)))
    (g32,) = torch.autograd.grad(out, s32, cot.float())
    (g64,) = torch.autograd.grad(ref, s64, cot)
    assert torch.isfinite(g32).all() if options != "mask" else torch.isfinite(g32[:, mask]).all()
    if options == "mask":
        assert (g32[:, ~mask] == 0).all()  # no gradient reaches masked rows, NaN included
        g32, g64 = g32[:, mask], g64[:, mask]
    cmax = float(cot.abs().max())
    torch.testing.assert_close(g32.double(), g64, rtol=0, atol=tol * max(cmax, 1.0))


@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_logits(rng, kind):
    """bfloat16 and float16 logits: computed in float32, returned in float32, equal to the
    float64 core on the same rounded values."""
    t, s = logits(rng, (4, 40), neg_inf=True, kind=kind)
    for dtype in (torch.bfloat16, torch.float16):
        t16, s16 = torch.tensor(t).to(dtype), torch.tensor(s).to(dtype).requires_grad_()
        out = kldiv.divergence(
            t16, s16, kind, form="logits", reduction="none", **PARAMS.get(kind, {})
        )
        s64 = s16.detach().double().requires_grad_()
        ref = kldiv.divergence(
            t16.double(), s64, kind, form="logits", reduction="none", **PARAMS.get(kind, {})
        )
        assert engine_used(out) and out.dtype == torch.float32
        tol = 16 * (spread(t, s) + 1) * EPS32
        torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=tol)
        (g,) = torch.autograd.grad(out.sum(), s16)
        (g_ref,) = torch.autograd.grad(ref.sum(), s64)
        assert g.dtype == dtype
        # the gradient is rounded to the student's dtype: half an ulp of it, on top
        half_ulp = float(torch.finfo(dtype).eps) / 2
        torch.testing.assert_close(g.double(), g_ref, rtol=half_ulp, atol=tol)  # fmt: skip


def test_the_core_runs_where_the_engine_cannot_give_its_semantics(rng):
    t, s = logits(rng, (4, 9), neg_inf=False, kind="kl")
    t32, s32 = torch.tensor(t, dtype=torch.float32), torch.tensor(s, dtype=torch.float32)
    s_grad = s32.clone().requires_grad_()
    cases = {
        "broadcast teacher": lambda: kldiv.kl_div(t32[0], s_grad, form="logits"),
        "another axis": lambda: kldiv.kl_div(t32.T, s_grad.T, form="logits", axis=0),
        "probabilities": lambda: kldiv.kl_div(
            t32.softmax(-1), s_grad.log_softmax(-1), form=("probs", "log_probs")
        ),
        "float64": lambda: kldiv.kl_div(t32.double(), s_grad.double(), form="logits"),
        "endpoint": lambda: kldiv.js_div(t32, s_grad, form="logits", beta=1.0),
    }
    for name, call in cases.items():
        assert not engine_used(call()), name
    # ... and the endpoints keep their exact values
    assert kldiv.js_div(t32, s_grad, form="logits", beta=0.0).item() == 0.0
    torch.testing.assert_close(
        kldiv.skew_kl_div(t32, s_grad, form="logits", alpha=0.0),
        kldiv.kl_div(t32, s_grad, form="logits"),
    )


FORMS = [("logits", "log_probs"), ("log_probs", "log_probs"), ("log_probs", "logits")]


def as_form(x: np.ndarray, form: str) -> np.ndarray:
    if form == "logits":
        return x
    with np.errstate(invalid="ignore"):  # rows that are all -inf read NaN, as they should
        m = np.max(x, axis=-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("forms", [("logits", "logits"), *FORMS])
@pytest.mark.parametrize("options", ["plain", "mask", "temperature", "unnormalised"])
def test_log_probs_and_teacher_gradients_equal_the_float64_core(rng, kind, forms, options):
    """Log-probabilities on either side, and a teacher that needs a gradient, go through the
    row specification in row chunks: values and both gradients as the float64 core gives
    them, zero support and garbage in masked rows included. Log-probabilities are taken as
    given: unnormalised ones get the core's value (which may then be negative), not a
    renormalised one. Bound: as above, with R the spread of the inputs as passed."""
    if options == "temperature" and forms != ("logits", "logits"):
        return  # a temperature needs logits on both sides (the core raises otherwise)
    shape = (2, 5, 17)
    t, s = logits(rng, shape, neg_inf=True, kind=kind)
    t, s = as_form(t, forms[0]), as_form(s, forms[1])
    if options == "unnormalised":
        t, s = (x - 0.25 if f == "log_probs" else x for x, f in zip((t, s), forms, strict=True))
    kw: dict = dict(form=forms, reduction="none", **PARAMS.get(kind, {}))
    keep = np.ones(shape[:2], dtype=bool)
    if options == "mask":
        keep[:, 1] = keep[1, 3] = False
        kw["mask"] = torch.tensor(keep)
        t[~keep], s[~keep] = np.nan, np.inf  # never read
    if options == "temperature":
        kw["temperature"] = 0.7
    t32, s32 = (torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (t, s))
    t64, s64 = (torch.tensor(x, requires_grad=True) for x in (t, s))
    out = kldiv.divergence(t32, s32, kind, **kw)
    ref = kldiv.divergence(t64, s64, kind, **kw)
    assert engine_used(out) and out.dtype == torch.float32
    tol = 16 * (spread(t, s) + 1) * EPS32
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=tol)
    cot = torch.tensor(rng.normal(size=shape[:2]))
    grads = torch.autograd.grad(out, (t32, s32), cot.float())
    grads64 = torch.autograd.grad(ref, (t64, s64), cot)
    for g, g64 in zip(grads, grads64, strict=True):
        assert torch.isfinite(g[keep]).all() and (g[~keep] == 0).all()
        torch.testing.assert_close(
            g[keep].double(), g64[keep], rtol=0, atol=tol * float(cot.abs().max())
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("forms", [("logits", "logits"), *FORMS])
def test_plain_and_exact_rows_in_one_chunk(rng, kind, forms):
    """The row-specification path takes the plain formulas first and recomputes with the
    exact ones only the rows whose value or Σh comes out non-finite. One chunk mixing both:
    finite rows, rows with zero probabilities, a row whose probabilities underflow float32
    without a -inf logit (spread 300: exp(-300) is 0 in float32, its log-probability is not
    -inf) and a row identical on both sides (given in one form). TV is not differentiable
    where p = q, so no row may hold a near-tie that float32 rounds to a tie (two
    probabilities near 1 at one index). Every row against the float64 core within the
    bound of the module docstring for its own spread R, values and both gradients."""
    v = 23
    t, s = logits(rng, (6, v), neg_inf=False, kind=kind)
    t[2:4], s[2:4] = logits(rng, (2, v), neg_inf=True, kind=kind)
    t[4] *= 300 / np.ptp(t[4])
    s[4] = -t[4]  # its largest entries where t's are smallest: no near-tie for tv to round
    if forms[0] == forms[1]:  # in two forms, float32 rounding tells them apart (a TV tie)
        s[5] = t[5]
    t, s = as_form(t, forms[0]), as_form(s, forms[1])
    kw: dict = dict(form=forms, reduction="none", **PARAMS.get(kind, {}))
    t32, s32 = (torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (t, s))
    t64, s64 = (torch.tensor(x, requires_grad=True) for x in (t, s))
    out = kldiv.divergence(t32, s32, kind, **kw)
    ref = kldiv.divergence(t64, s64, kind, **kw)
    assert engine_used(out)
    tol = torch.tensor([16 * (spread(t[i], s[i]) + 1) * EPS32 for i in range(6)])
    err = (out.double() - ref.detach()).abs()
    inf = torch.isinf(ref.detach())
    assert (out[inf] == ref[inf]).all() and (err[~inf] <= tol[~inf]).all(), (err, tol)
    cot = torch.tensor(rng.normal(size=6))
    grads = torch.autograd.grad(out, (t32, s32), cot.float())
    grads64 = torch.autograd.grad(ref, (t64, s64), cot)
    for g, g64 in zip(grads, grads64, strict=True):
        assert torch.isfinite(g).all()
        err = (g.double() - g64).abs().amax(-1)
        assert (err <= tol * cot.abs()).all(), (err, tol * cot.abs())


@pytest.mark.parametrize("kind", ["skew_kl", "skew_reverse_kl", "js"])
@pytest.mark.parametrize("w", [1e-40, 1e-44, 1 - 1e-6, 0.999])
@pytest.mark.parametrize("forms", [("logits", "logits"), ("log_probs", "log_probs")])
def test_extreme_mixture_weights(kind, w, forms):
    """Weights the plain formulas would get wrong while staying finite, so no row would be
    recomputed: below float32's normal range a weight keeps a few bits (2% at 1e-44), and
    near 1 the mixture q + w·(p − q) cancels when q is large (unnormalised log-probabilities
    summing to e^c, c = 10, here). Zero support on the side the mixture then rests on.

    Bound: as in the module docstring, with the log-ratios up to R + c and every term scaled
    by the mass of the side it weighs: 16·(R + c + 1)·eps32·S per row, S = β·ΣP + (1 − β)·ΣQ
    for JS, ΣP for skew KL, ΣQ for skew reverse KL (1 for normalised inputs)."""
    t = np.array([[2.0, 1.0, 0.5, -1.0], [0.3, -2.0, 1.0, 0.0]])
    s = np.array([[2.5, 1.0, -np.inf, 0.0], [1.0, 0.5, 0.0, -np.inf]])
    c = 0.0
    if forms[0] == "log_probs":
        c = 10.0
        t, s = as_form(t, "log_probs"), as_form(s, "log_probs") + c  # s unnormalised
    if kind == "skew_reverse_kl":
        t, s = s, t  # the zeros on the side the mixture rests on
    params = {next(iter(KIND_PARAMS[kind])): w}
    t32, s32 = (torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (t, s))
    t64, s64 = (torch.tensor(x, requires_grad=True) for x in (t, s))
    out = kldiv.divergence(t32, s32, kind, form=forms, reduction="none", **params)
    ref = kldiv.divergence(t64, s64, kind, form=forms, reduction="none", **params)
    assert engine_used(out)
    mass_p, mass_q = (np.exp(as_form(x, "log_probs") if f == "logits" else x).sum(-1)
                      for x, f in zip((t, s), forms, strict=True))  # fmt: skip
    mass = {"js": w * mass_p + (1 - w) * mass_q, "skew_kl": mass_p, "skew_reverse_kl": mass_q}
    tol = torch.tensor(16 * (spread(t, s) + c + 1) * EPS32 * mass[kind])
    assert ((out.double() - ref.detach()).abs() <= tol).all(), (out, ref, tol)
    for g, g64 in zip(
        torch.autograd.grad(out.sum(), (t32, s32)),
        torch.autograd.grad(ref.sum(), (t64, s64)),
        strict=True,
    ):
        assert ((g.double() - g64).abs() <= tol[:, None]).all(), (g, g64, tol)


@pytest.mark.parametrize("forms", [("logits", "logits"), ("log_probs", "logits")])
def test_teacher_gradients_in_half_precision_and_second_derivatives(rng, forms):
    """A half-precision teacher gets its gradient in its dtype (computed in float32, rounded
    once); second derivatives (create_graph) of both sides go through the core."""
    t, s = logits(rng, (4, 12), neg_inf=True, kind="js")
    t = as_form(t, forms[0])
    t16 = torch.tensor(t).to(torch.bfloat16).requires_grad_()
    s16 = torch.tensor(s).to(torch.bfloat16).requires_grad_()
    out = kldiv.js_div(t16, s16, form=forms, reduction="sum")
    assert engine_used(out)
    t64, s64 = (x.detach().double().requires_grad_() for x in (t16, s16))
    ref = kldiv.js_div(t64, s64, form=forms, reduction="sum")
    half_ulp = float(torch.finfo(torch.bfloat16).eps) / 2
    tol = 16 * (spread(t, s) + 1) * EPS32 * 4
    for g, g64, x in zip(
        torch.autograd.grad(out, (t16, s16)),
        torch.autograd.grad(ref, (t64, s64)),
        (t16, s16),
        strict=True,
    ):
        assert g.dtype == x.dtype
        torch.testing.assert_close(g.double(), g64, rtol=half_ulp, atol=tol)
    # Hessian-vector products of both arguments
    a, b = (torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (t, s))
    a64, b64 = (torch.tensor(x, requires_grad=True) for x in (t, s))
    v = [torch.tensor(rng.normal(size=s.shape)) for _ in range(2)]
    hv = []
    for x, y, dt in ((a, b, torch.float32), (a64, b64, torch.float64)):
        o = kldiv.js_div(x, y, form=forms, reduction="sum")
        g = torch.autograd.grad(o, (x, y), create_graph=True)
        hv.append(
            torch.autograd.grad(
                sum((gi * vi.to(dt)).sum() for gi, vi in zip(g, v, strict=True)), (x, y)
            )
        )
    for h, h64 in zip(*hv, strict=True):
        torch.testing.assert_close(h.double(), h64, rtol=0, atol=1e-4)


BAD_ROWS = [  # (kind, forms, teacher row, student row)
    ("tv", "logits", [0.5, -1.0, 2.0], [-math.inf] * 3),
    ("tv", "logits", [0.5, math.nan, 2.0], [1.0, 0.0, -1.0]),
    ("kl", "log_probs", [-1.8, -3.3, -0.3], [-0.4, math.nan, -2.4]),
    ("kl", "logits", [0.5, -1.0, 2.0], [-math.inf] * 3),
    ("reverse_kl", "logits", [0.5, math.inf, 2.0], [1.0, 0.0, -1.0]),
    ("skew_kl", "log_probs", [-1.8, -3.3, -0.3], [-0.4, math.inf, -2.4]),
    ("skew_reverse_kl", ("log_probs", "logits"), [-1.8, math.inf, -0.3], [1.0, 0.0, -1.0]),
    ("js", ("logits", "log_probs"), [-math.inf] * 3, [-math.inf] * 3),
]


@pytest.mark.parametrize(("kind", "forms", "bad_t", "bad_s"), BAD_ROWS)
def test_rows_with_nan_inf_or_no_support_get_the_cores_values_and_gradients(
    rng, kind, forms, bad_t, bad_s
):
    """A kept row with a NaN or +inf entry, or all -inf, goes to the core: the same NaN and
    infinities in its value and both gradients (a NaN gradient where the loss is NaN, so that
    a gradient scaler skips the step), beside ordinary rows that stay on the engine."""
    from kldiv.torch._rows.dispatch import core_only

    forms = (forms, forms) if isinstance(forms, str) else forms
    t, s = logits(rng, (3, 3), neg_inf=False, kind=kind)
    t, s = as_form(t, forms[0]), as_form(s, forms[1])
    t[1], s[1] = bad_t, bad_s
    got = []
    for engine in (True, False):
        a, b = (torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (t, s))
        with contextlib.nullcontext() if engine else core_only():
            out = kldiv.divergence(a, b, kind, form=forms, reduction="none")
        assert engine_used(out) == engine
        got.append((out.detach(), *torch.autograd.grad(out.sum(), (a, b))))
    for x, y in zip(*got, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, equal_nan=True)


def test_a_teacher_gradient_through_a_retained_graph(rng):
    """Both gradients are scaled in place by the first backward; a second one recomputes."""
    t, s = small(rng)
    a, b = t.clone().requires_grad_(), s.clone().requires_grad_()
    out = kldiv.reverse_kl_div(a, b, form="logits")
    assert engine_used(out)
    out.backward(retain_graph=True)
    once = a.grad.clone(), b.grad.clone()
    (gb,) = torch.autograd.grad(out, b, retain_graph=True)  # the student's alone
    out.backward()
    torch.testing.assert_close(a.grad, 2 * once[0])
    torch.testing.assert_close(b.grad, 2 * once[1])
    torch.testing.assert_close(gb, once[1])


def test_no_gradient_needed_and_torch_func(rng):
    t, s = logits(rng, (4, 9), neg_inf=True, kind="kl")
    t32, s32 = torch.tensor(t, dtype=torch.float32), torch.tensor(s, dtype=torch.float32)
    ref = kldiv.kl_div(torch.tensor(t), torch.tensor(s), form="logits", reduction="none")
    with torch.no_grad():
        out = kldiv.kl_div(t32, s32.requires_grad_(), form="logits", reduction="none")
    assert out.grad_fn is None
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    # torch.func transforms have no data to hand to the kernels: the core runs, exactly
    g = torch.func.grad(lambda x: kldiv.kl_div(t32, x, form="logits"))(s32.detach())
    x = torch.tensor(s, requires_grad=True)
    (g64,) = torch.autograd.grad(kldiv.kl_div(torch.tensor(t), x, form="logits"), x)
    torch.testing.assert_close(g.double(), g64, rtol=0, atol=1e-6)
    rows = torch.func.vmap(lambda a, b: kldiv.kl_div(a, b, form="logits"))(t32, s32.detach())
    torch.testing.assert_close(rows.double(), ref, rtol=0, atol=1e-5)


def hessian_vector_products(rng, fn, dtype):
    t, s = logits(rng, (3, 8), neg_inf=True, kind="js")
    v = torch.tensor(rng.normal(size=s.shape), dtype=dtype)
    x = torch.tensor(s, dtype=dtype, requires_grad=True)
    out = fn(torch.tensor(t, dtype=dtype), x)
    (g,) = torch.autograd.grad(out, x, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    return g, h


@pytest.mark.parametrize("kind", KINDS)
def test_second_derivatives_through_the_engine(kind):
    """create_graph=True (Hessian-vector products, natural-gradient steps): the engine's
    one-pass gradient has no graph, so its backward recomputes through the core; the
    products equal the float64 core's instead of being silently 0."""
    params = PARAMS.get(kind, {})

    def fn(t, x):
        return kldiv.divergence(t, x, kind, form="logits", reduction="sum", **params)

    g32, h32 = hessian_vector_products(np.random.default_rng(3), fn, torch.float32)
    g64, h64 = hessian_vector_products(np.random.default_rng(3), fn, torch.float64)
    assert float(h64.abs().max()) > 1e-3  # the products are not trivially 0
    torch.testing.assert_close(g32.double(), g64, rtol=0, atol=1e-5)
    torch.testing.assert_close(h32.double(), h64, rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["chunked", "triton"])
@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "js", "skew_kl", "skew_reverse_kl", "tv"])
def test_second_derivatives_through_distillation_loss(path, kind):
    def fn(t, x):
        loss = DistillationLoss(kind, reduction="sum", temperature=1.5, fast_path=path)
        return loss(x, t)

    def ref(t, x):
        loss = DistillationLoss(kind, reduction="sum", temperature=1.5, fast_path=False)
        return loss(x, t)

    g32, h32 = hessian_vector_products(np.random.default_rng(4), fn, torch.float32)
    g64, h64 = hessian_vector_products(np.random.default_rng(4), ref, torch.float64)
    torch.testing.assert_close(g32.double(), g64, rtol=0, atol=1e-5)
    torch.testing.assert_close(h32.double(), h64, rtol=0, atol=1e-5)


def test_every_kind_with_a_parameter_is_tested():
    assert set(PARAMS) == set(KIND_PARAMS)


# Regression cases from a review of the engine route: each compares with the core.


def small(rng, dtype=torch.float32):
    t, s = logits(rng, (4, 9), neg_inf=True, kind="js")
    return torch.tensor(t, dtype=dtype), torch.tensor(s, dtype=dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_a_second_backward_through_a_retained_graph(rng, kind):
    """The first backward scales the engine's gradient in place; a second one through the
    retained graph recomputes it, so the two accumulate to twice the gradient."""
    t, s = small(rng)
    x = s.clone().requires_grad_()
    out = kldiv.divergence(t, x, kind, form="logits", **PARAMS.get(kind, {}))
    assert engine_used(out)
    out.backward(retain_graph=True)
    once = x.grad.clone()
    (g,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x, create_graph=True, retain_graph=True)
    out.backward()
    torch.testing.assert_close(x.grad, 2 * once)
    torch.testing.assert_close(g, once)
    torch.testing.assert_close(g2, once, rtol=0, atol=1e-6)


def test_fast_path_false_is_the_core_and_retains_its_graph(rng):
    t, s = small(rng)
    x = s.clone().requires_grad_()
    loss = DistillationLoss("kl", fast_path=False)(x, t)
    assert not engine_used(loss)
    loss.backward(retain_graph=True)
    loss.backward()


def test_a_nan_weight_on_a_masked_row_gives_no_gradient(rng):
    t, s = small(rng)
    mask = torch.tensor([True, True, False, True])
    weight = torch.tensor([1.0, 0.5, float("nan"), 2.0])
    x = s.clone().requires_grad_()
    out = kldiv.kl_div(t, x, form="logits", mask=mask, weight=weight)
    assert engine_used(out)
    out.backward()
    x64 = s.double().requires_grad_()
    kldiv.kl_div(t.double(), x64, form="logits", mask=mask, weight=weight.double()).backward()
    assert (x.grad[2] == 0).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=1e-6)


def test_torch_func_over_mask_weight_and_num_items(rng):
    t, s = (torch.tensor(x, dtype=torch.float32) for x in logits(rng, (4, 9), False, "kl"))
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1]])
    weight = torch.tensor(rng.random(4), dtype=torch.float32)

    def f(w, m, n):
        return kldiv.kl_div(t, s, form="logits", weight=w, mask=m, num_items=n)

    rows = torch.func.vmap(lambda m: f(weight, m, None))(mask)
    want = torch.stack([f(weight, m, None) for m in mask])
    torch.testing.assert_close(rows, want)
    gw = torch.func.grad(lambda w: f(w, mask[0], None))(weight)
    per_row = kldiv.kl_div(t, s, form="logits", reduction="none") * mask[0] / mask[0].sum()
    torch.testing.assert_close(gw, per_row)
    gn = torch.func.grad(lambda n: f(weight, None, n))(torch.tensor(3.0))
    torch.testing.assert_close(gn, -f(weight, None, 1.0) / 9)
    jw = torch.func.jacrev(lambda w: f(w, mask[0], None))(weight)
    torch.testing.assert_close(jw, gw)


def test_forward_mode_tangents_of_both_arguments(rng):
    from torch.autograd import forward_ad

    t, s = small(rng)
    dt, ds = (
        torch.tensor(rng.normal(size=t.shape), dtype=torch.float32),
        torch.tensor(rng.normal(size=s.shape), dtype=torch.float32),
    )
    for dual_t, dual_s in ((True, False), (False, True), (True, True)):
        with forward_ad.dual_level():
            a = forward_ad.make_dual(t, dt) if dual_t else t
            b = forward_ad.make_dual(s, ds) if dual_s else s
            tangent = forward_ad.unpack_dual(kldiv.js_div(a, b, form="logits")).tangent
        assert tangent is not None
        want = torch.func.jvp(
            lambda x, y: kldiv.js_div(x, y, form="logits"),
            (t.double(), s.double()),
            (dt.double() * dual_t, ds.double() * dual_s),
        )[1]
        torch.testing.assert_close(tangent.double(), want, rtol=0, atol=1e-6)


def test_cpu_autocast_keeps_float32_arithmetic(rng):
    # finite logits (the chunks' from-logits kernels, with their reductions) and large
    # log-ratios: bfloat16 reductions would lose digits
    t, s = (40 * torch.tensor(x, dtype=torch.float32) for x in logits(rng, (4, 9), False, "kl"))
    for native in ("1", "0"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KLDIV_NATIVE", native)
            for kind in ("kl", "reverse_kl"):
                x = s.clone().requires_grad_()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = kldiv.divergence(t, x, kind, form="logits")
                (g,) = torch.autograd.grad(out, x)
                x64 = s.double().requires_grad_()
                ref = kldiv.divergence(t.double(), x64, kind, form="logits")
                (g64,) = torch.autograd.grad(ref, x64)
                assert out.dtype == torch.float32
                tol = 16 * (spread(t.numpy(), s.numpy()) + 1) * EPS32  # float32, not bfloat16
                torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol)
                torch.testing.assert_close(g.double(), g64, rtol=0, atol=tol)


def test_logits_edited_in_place_after_the_forward(rng):
    """The first-order backward never reads the logits again (the gradient came from the
    forward pass), so editing them in place afterwards changes nothing, as with the core."""
    t, s = small(rng)
    x = s.clone().requires_grad_()
    y = x * 1.0
    tt = t.clone()
    out = kldiv.kl_div(tt, y, form="logits")
    assert engine_used(out)
    with torch.no_grad():
        y.mul_(3.0)
    tt.mul_(2.0)
    out.backward()
    x64 = s.double().requires_grad_()
    kldiv.kl_div(t.double(), x64, form="logits").backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=1e-6)


def test_path_for_agrees_with_what_runs_under_no_grad(rng):
    t, s = small(rng)
    loss = DistillationLoss("kl")
    t_grad = t.clone().requires_grad_()
    assert loss.path_for(s, t_grad) == "core"
    with torch.no_grad():
        assert loss.path_for(s, t_grad) == "chunked"


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("alpha", [1e-39, 1e-30, 5e-324])
def test_skew_reverse_kl_with_a_tiny_alpha(native, alpha, monkeypatch):
    """α·q/m' is formed as exp(log(q/m') + log α) ≤ 1: exp(log(q/m')) alone reaches 1/α,
    which overflows float32 (a NaN or inf gradient) for α below about 3e-39."""
    monkeypatch.setenv("KLDIV_NATIVE", native)
    t = torch.tensor([[0.0, -math.inf, 1.0, 2.0], [1.0, 0.5, -math.inf, -math.inf]])
    s = torch.tensor([[0.5, 0.3, -1.0, 2.0], [0.0, -1.0, 2.0, -math.inf]])
    x = s.clone().requires_grad_()
    out = kldiv.skew_reverse_kl_div(t, x, form="logits", alpha=alpha, reduction="sum")
    assert engine_used(out)
    (g,) = torch.autograd.grad(out, x)
    x64 = s.double().requires_grad_()
    ref = kldiv.skew_reverse_kl_div(t.double(), x64, form="logits", alpha=alpha, reduction="sum")
    (g64,) = torch.autograd.grad(ref, x64)
    assert torch.isfinite(g).all()
    # values near -log α ≈ 90: float32 carries 16·(R + 1)·eps32 of them
    tol = 16 * (-math.log(max(alpha, 1e-45)) + 4) * EPS32
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=2 * tol)
    torch.testing.assert_close(g.double(), g64, rtol=0, atol=tol)


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("kind", ["js", "skew_kl", "skew_reverse_kl", "tv", "kl", "reverse_kl"])
def test_identical_rows_are_not_negative(rng, kind, native, monkeypatch):
    """No row is negative, and D(P‖P) is 0 within the float32 bound: the engines' float32
    terms could round a row's sum below 0 (a JS row of identical logits read about -1e-8)."""
    monkeypatch.setenv("KLDIV_NATIVE", native)
    t = torch.tensor(rng.normal(scale=3.0, size=(16, 300)), dtype=torch.float32)
    for w in (0.5, 1e-30, 1 - 1e-7):
        params = {name: w for name in KIND_PARAMS.get(kind, {})}
        same = kldiv.divergence(t, t.clone(), kind, form="logits", reduction="none", **params)
        bound = 16 * (spread(t.numpy()) + 1) * EPS32
        assert (same >= 0).all() and (same <= bound).all(), same
        s = t + torch.tensor(rng.normal(scale=1e-3, size=t.shape), dtype=torch.float32)
        near = kldiv.divergence(t, s, kind, form="logits", reduction="none", **params)
        assert (near >= 0).all(), near
