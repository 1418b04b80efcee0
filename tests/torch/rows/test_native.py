"""The compiled CPU kernel (``native.c`` through ``native_engine``) against the core in
float64 and against the tensor code: values and student gradients of every divergence (KL,
reverse KL, JS, the skew divergences, TV) within a stated error bound, zero support, flagged
rows, weights, offsets, strides, threads, half-precision inputs; and its build: cached, and a
clean fallback to tensor code when no compiler works, a cache that verifies what it loads,
and $CC flags that cannot change the kernel's floating-point semantics."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kldiv
from kldiv.torch import DistillationLoss
from kldiv.torch._rows import native as native_engine
from kldiv.torch._rows import tensor as tensor_engine


@pytest.fixture
def calls(monkeypatch):
    """Counts the rows handed to the compiled kernel, so a test can show it ran."""
    seen = []
    real = native_engine.rows

    def counted(kind, s, *args):
        seen.append(s.shape[0])
        return real(kind, s, *args)

    monkeypatch.setattr(native_engine, "rows", counted)
    return seen


@pytest.fixture
def launched(monkeypatch):
    """The (kind, weight) of each call of the compiled kernel."""
    seen = []
    real = native_engine.rows

    def counted(kind, s, t, keep, inv_t, grad, w=None, maps=None):
        seen.append((kind, w))
        return real(kind, s, t, keep, inv_t, grad, w, maps)

    monkeypatch.setattr(native_engine, "rows", counted)
    return seen


# Every kind the kernel computes, the weighted ones (JS's beta, the skew kinds' alpha) near
# both ends of their range and in the middle.
KINDS = [("kl", {}), ("reverse_kl", {}), ("tv", {})] + [
    (kind, {name: w})
    for kind, name in (("js", "beta"), ("skew_kl", "alpha"), ("skew_reverse_kl", "alpha"))
    for w in (0.1, 0.5, 0.9)
]
# One case per kind, at DistillationLoss's default weights, where the test varies other things.
DEFAULTS = [
    ("kl", {}),
    ("reverse_kl", {}),
    ("js", {"beta": 0.5}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("tv", {}),
]


def ids(cases):
    return [kind + "".join(f"-{k}={v}" for k, v in params.items()) for kind, params in cases]


def weight(params):
    """The weight the kernel takes for these parameters (None for the unweighted kinds)."""
    return next(iter(params.values()), None)


def reference(kind, s, t, keep, temperature, go, params=None):
    """The core in float64 on the same float32 inputs: per-row values and the student
    gradient of Σ go·values."""
    s64 = torch.tensor(np.where(np.isnan(s), 0.0, s), dtype=torch.float64, requires_grad=True)
    ref = kldiv.divergence(
        torch.tensor(t, dtype=torch.float64),
        s64,
        kind,
        form="logits",
        temperature=temperature,
        mask=keep,
        reduction="none",
        **(params or {}),
    )
    fin = ref.isfinite()
    (ref.masked_fill(~fin, 0.0) * go).sum().backward()
    return ref.detach(), s64.grad


EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


def grad_error_bound(kind, s, t, temperature, go, params=None):
    """Per element, a bound on the float32 kernel's student-gradient error in units of a
    few float32 eps (the tests allow 4).

    Each row is shifted by its own maximum first (a = s/T − max, as the kernel and
    log_softmax do), so log q_j = a_j − log z_s is off by a few eps·M_j absolutely, with
    M_j = |a_j| + log z_s + 1 (the 1: exp's and the normalisation's own rounding), and q_j
    by as much relatively; likewise log p_j with M'_j from the teacher. Then, with
    scale = go/T, each gradient is q_j·(w_j − Σ_k q_k w_k) up to a factor, and its error is
    q_j's relative error times |w_j − Σ q w|, plus w_j's own error and that of the mean:

    * KL, (q − p): scale·(q M + p M');
    * reverse KL, w = d = log q − log p: scale·q·(M |d − R| + M + M' + E_q[M + M']);
    * JS, w = (1−β)·log(q/m): log m is the log of β e_t + (1−β)(z_t/z_s) e_s, off by
      M + M' relatively, and log(q/m) = a − log m + const by that plus M:
      scale·(1−β)·q·(M |w' − E_q w'| + 2M + M' + E_q[M |w' − E_q w'| + 2M + M']), w' = log(q/m);
    * skew KL, w = −(1−α)·x with x = p/m, a ratio off by M' (p) plus M + M' (m) relatively:
      scale·(1−α)·q·(M |x − E_q x| + x (M + 2M') + E_q[x (2M + 2M')]);
    * skew reverse KL, w = log x − αx with x = q/m', off by 2M + M' relatively:
      scale·q·(M |w − E_q w| + (1 + αx)(2M + M') + E_q[M |w − E_q w| + (1 + αx)(2M + M')]);
    * TV, w = ½·sign(q − p): scale·q·(M + E_q M) where p and q are apart, and where they are
      within 8 eps·(qM + pM') of each other (float32 may see the other sign, or a tie) w_j
      may be off by 1, so q_j is allowed there, and the mean by the q of all such elements.

    Float64 values of the float32 inputs stand in for the exact ones; the final rounding to
    float32 is the test's eps·|g|. The core's float64 gradient itself is exact only to a few
    eps64·(p_j + q_j) absolutely: its mixture goes through expm1, whose backward reads e^d as
    expm1(d) + 1 (a relative error of eps64/e^d where the other side dominates), so that much
    is added for the mixture kinds.
    """
    params = params or {}
    s64 = np.where(np.isnan(s), 0.0, s).astype(np.float64) / temperature
    t64 = t.astype(np.float64) / temperature

    def shifted(a):
        m = a.max(-1, keepdims=True)
        a = a - np.where(np.isfinite(m), m, 0.0)
        return a, np.log(np.exp(a).sum(-1, keepdims=True))

    a, ls = shifted(s64)
    b, lt = shifted(t64)
    lq, lp = a - ls, b - lt
    q, p = np.exp(lq), np.exp(lp)
    scale = go[:, None] / temperature
    core = scale * (p + q) * 4 * EPS64 / EPS32

    def mean(x):
        return (q * x).sum(-1, keepdims=True)

    with np.errstate(invalid="ignore", divide="ignore"):  # −inf logits: their terms are 0
        m_s = np.where(q > 0, np.abs(a) + ls + 1, 0.0)
        m_t = np.where(p > 0, np.abs(b) + lt + 1, 0.0)
        if kind == "kl":
            return scale * (q * m_s + p * m_t)
        if kind == "reverse_kl":
            d = np.where(q > 0, lq - lp, 0.0)
            return scale * q * (m_s * np.abs(d - mean(d)) + m_s + m_t + mean(m_s + m_t))
        if kind == "js":
            beta = params["beta"]
            lm = np.logaddexp(lp + np.log(beta), lq + np.log1p(-beta))
            w = np.where(q > 0, lq - lm, 0.0)
            e = m_s * np.abs(w - mean(w)) + 2 * m_s + m_t
            return scale * (1 - beta) * q * (e + mean(e)) + core
        if kind == "skew_kl":
            alpha = params["alpha"]
            x = np.where(p > 0, p / (alpha * p + (1 - alpha) * q), 0.0)
            own = m_s * np.abs(x - mean(x)) + x * (m_s + 2 * m_t)
            return scale * (1 - alpha) * q * (own + mean(x * (2 * m_s + 2 * m_t))) + core
        if kind == "skew_reverse_kl":
            alpha = params["alpha"]
            x = np.where(q > 0, q / (alpha * q + (1 - alpha) * p), 0.0)
            w = np.where(q > 0, np.log(x) - alpha * x, 0.0)
            e = m_s * np.abs(w - mean(w)) + (1 + alpha * x) * (2 * m_s + m_t)
            return scale * q * (e + mean(e)) + core
        assert kind == "tv", kind
        near = np.abs(q - p) <= 8 * EPS32 * (q * m_s + p * m_t)
        flips = (q * near + q * mean(near)) / EPS32
        return scale * (q * (m_s + mean(m_s)) + flips)


def batch(rng, n, v, pattern):
    s = rng.normal(scale=3.0, size=(n, v)).astype(np.float32)
    t = rng.normal(scale=3.0, size=(n, v)).astype(np.float32)
    if pattern in ("teacher", "both") and v > 1:
        t[:, : v // 2][rng.random((n, v // 2)) < 0.4] = -np.inf
    if pattern in ("student", "both") and v > 1:
        s[:, v // 2 :][rng.random((n, v - v // 2)) < 0.4] = -np.inf
    if pattern == "both" and v > 2:
        s[:, 1] = t[:, 1] = -np.inf  # both zero: the term is 0, not NaN
    return s, t


def assert_gradient_within_the_bound(kind, params, grad, ref_grad, bound, rows, factor=1):
    """``grad`` (float32) against the core's ``ref_grad`` on ``rows``: within
    ``factor``·(4 eps·bound + eps·|ref|) per element (both 0 where q_j = 0)."""
    err = (grad.double() - ref_grad).abs().numpy()
    allowed = factor * (4 * EPS32 * bound + EPS32 * ref_grad.abs().numpy())
    over = err[rows] > allowed[rows]
    assert not over.any(), f"{kind} {params}: gradient errors over the bound: {err[rows][over]}"


@pytest.mark.parametrize(("kind", "params"), KINDS, ids=ids(KINDS))
@pytest.mark.parametrize("shape", [(37, 1271), (6, 1), (5, 7), (4, 8), (3, 9), (3, 600)])
# every pattern at T = 1 and at one other temperature (each temperature meets two patterns):
# the full product is twice the run time for no path that this pairing misses
@pytest.mark.parametrize(
    ("pattern", "temperature"),
    [("none", 1.0), ("teacher", 1.0), ("student", 1.0), ("both", 1.0)]
    + [("none", 0.7), ("both", 0.7), ("teacher", 2.5), ("student", 2.5)],
)
def test_values_and_gradients_against_the_core(
    rng, calls, kind, params, shape, pattern, temperature
):
    n, v = shape
    s, t = batch(rng, n, v, pattern)
    keep = torch.tensor(rng.random(n) < 0.8)
    s[~keep.numpy()] = np.nan  # skipped rows are never read
    st = torch.tensor(s, requires_grad=True)
    out = tensor_engine.per_row(kind, st, torch.tensor(t), keep, temperature, **params)
    assert sum(calls) == n
    go = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    ref, ref_grad = reference(kind, s, t, keep, temperature, go, params)
    assert torch.equal(out.isposinf(), ref.isposinf()) and not out.isnan().any()
    fin = ref.isfinite()
    torch.testing.assert_close(out.double()[fin], ref[fin], rtol=2e-5, atol=2e-6)
    (out.masked_fill(~fin, 0.0).double() * go).sum().backward()
    assert st.grad.isfinite().all()
    if kind == "reverse_kl":  # at +inf rows the core's gradient convention is its own
        st.grad[~fin] = ref_grad[~fin].float()
    bound = grad_error_bound(kind, s, t, temperature, go.numpy(), params)
    assert_gradient_within_the_bound(kind, params, st.grad, ref_grad, bound, (fin & keep).numpy())
    assert torch.equal(st.grad[~keep], torch.zeros_like(st.grad[~keep]))


@pytest.mark.parametrize(("kind", "params"), DEFAULTS, ids=ids(DEFAULTS))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_a_constant_offset_between_teacher_and_student_costs_no_precision(
    rng, calls, kind, params, temperature
):
    """Teacher logits near 1000 against student logits near −500: each row is shifted by its
    own maximum before the two meet, so the errors stay those of the shifted logits (the
    bound above), not of 1000·eps."""
    s, t = batch(rng, 8, 700, "both")
    s = (s - 500).astype(np.float32)
    t = (t + 1000).astype(np.float32)
    st = torch.tensor(s, requires_grad=True)
    out = tensor_engine.per_row(kind, st, torch.tensor(t), None, temperature, **params)
    assert calls == [8]
    go = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    ref, ref_grad = reference(kind, s, t, None, temperature, go, params)
    assert torch.equal(out.isposinf(), ref.isposinf())
    fin = ref.isfinite()
    torch.testing.assert_close(out.double()[fin], ref[fin], rtol=2e-5, atol=2e-6)
    (out.masked_fill(~fin, 0.0).double() * go).sum().backward()
    if kind == "reverse_kl":
        st.grad[~fin] = ref_grad[~fin].float()
    bound = grad_error_bound(kind, s, t, temperature, go.numpy(), params)
    assert_gradient_within_the_bound(kind, params, st.grad, ref_grad, bound, fin.numpy())


@pytest.mark.parametrize(("kind", "params"), KINDS, ids=ids(KINDS))
def test_the_kernel_agrees_with_the_tensor_code(rng, calls, monkeypatch, kind, params):
    """The compiled kernel and the tensor code (KLDIV_NATIVE=0) on the same float32 inputs
    (zeros on both sides, masked rows, T ≠ 1): each within the bound above of the core, so
    within twice it of each other."""
    s, t = batch(rng, 24, 700, "both")
    keep = torch.tensor(rng.random(24) < 0.8)
    go = torch.linspace(0.5, 2.0, 24, dtype=torch.float64)

    def run():
        st = torch.tensor(s, requires_grad=True)
        out = tensor_engine.per_row(kind, st, torch.tensor(t), keep, 1.3, **params)
        (out.masked_fill(~out.isfinite(), 0.0).double() * go).sum().backward()
        return out.detach().double(), st.grad

    native, native_grad = run()
    assert sum(calls) == 24
    monkeypatch.setenv("KLDIV_NATIVE", "0")
    calls.clear()
    tensor, tensor_grad = run()
    assert calls == []
    assert torch.equal(native.isposinf(), tensor.isposinf()) and not native.isnan().any()
    fin = native.isfinite()
    torch.testing.assert_close(native[fin], tensor[fin], rtol=4e-5, atol=4e-6)
    _, ref_grad = reference(kind, s, t, keep, 1.3, go, params)
    bound = grad_error_bound(kind, s, t, 1.3, go.numpy(), params)
    err = (native_grad.double() - tensor_grad.double()).abs().numpy()
    allowed = 2 * (4 * EPS32 * bound + EPS32 * ref_grad.abs().numpy())
    rows = (fin & keep).numpy()
    assert not (err[rows] > allowed[rows]).any()
    assert torch.equal(native_grad[~fin], tensor_grad[~fin])  # both 0: masked or go·0


@pytest.mark.parametrize(("kind", "params"), DEFAULTS, ids=ids(DEFAULTS))
def test_rows_the_kernel_leaves_to_tensor_code_are_flagged_and_exact(kind, params):
    """+inf, NaN, all −inf on a side, and reverse KL's +inf rows go back to tensor code; the
    mixtures and TV are finite wherever the logits are."""
    inf, nan = float("inf"), float("nan")
    s = torch.tensor(
        [
            [0.0, 1.0, 2.0],
            [inf, 0.0, 1.0],
            [0.0, nan, 1.0],
            [-inf, -inf, -inf],
            [0.5, 0.1, 0.0],
            [0.0, 1.0, 2.0],
        ]
    )
    t = torch.tensor(
        [
            [1.0, 0.0, 2.0],
            [0.0, 1.0, 2.0],
            [0.0, 1.0, 2.0],
            [0.0, 1.0, 2.0],
            [-inf, -inf, -inf],
            [0.0, -inf, 2.0],
        ]
    )
    w = weight(params)
    values, flagged = native_engine.rows(kind, s, t, None, 1.0, torch.empty(6, 3), w)
    expected = [False, True, True, True, True, kind == "reverse_kl"]
    assert flagged.tolist() == expected
    # |logit/T| above 2^22: exact at T = 1, left to tensor code at T ≠ 1
    big = torch.tensor([[3e7, 0.0, 1.0]])
    assert not native_engine.rows(kind, big, big.flip(-1), None, 1.0, None, w)[1].item()
    assert native_engine.rows(kind, big, big.flip(-1), None, 0.5, None, w)[1].item()
    st = s.clone().requires_grad_(True)
    out = DistillationLoss(kind, reduction="none", **params)(st, t)
    s64 = s.double().requires_grad_(True)
    ref = DistillationLoss(kind, reduction="none", fast_path=False, **params)(s64, t.double())
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    fin = ref.isfinite()
    torch.testing.assert_close(out.double()[fin], ref.detach()[fin])
    (out[fin]).sum().backward()
    (ref[fin]).sum().backward()
    torch.testing.assert_close(st.grad.double()[fin], s64.grad[fin], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["skew_kl", "skew_reverse_kl"])
def test_a_skew_weight_below_2_to_the_minus_64_goes_to_tensor_code(rng, kind, calls):
    """The skew kinds' ratios reach 1/alpha: below 2^-64 the kernel flags every row, and the
    tensor code computes them."""
    s, t = (torch.tensor(x) for x in batch(rng, 5, 40, "both"))
    assert not native_engine.rows(kind, s, t, None, 1.0, None, 2.0**-64)[1].any()
    assert native_engine.rows(kind, s, t, None, 1.0, None, 2.0**-65)[1].all()
    calls.clear()
    st = s.clone().requires_grad_(True)
    out = DistillationLoss(kind, reduction="none", alpha=1e-30)(st, t)
    out.sum().backward()
    assert calls == [5]
    s64 = s.double().requires_grad_(True)
    ref = DistillationLoss(kind, reduction="none", alpha=1e-30, fast_path=False)(s64, t.double())
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(st.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("w", [None, 0.0, 1.0, float("nan")])
def test_the_weighted_kinds_need_a_weight_inside_0_1(w):
    x = torch.zeros(2, 3)
    for kind in ("js", "skew_kl", "skew_reverse_kl"):
        with pytest.raises(ValueError, match="weight strictly between 0 and 1"):
            native_engine.rows(kind, x, x, None, 1.0, None, w)


@pytest.mark.parametrize(
    ("kind", "params", "expected"),
    [
        ("kl", {}, [("kl", None)]),
        ("tv", {}, [("tv", None)]),
        ("js", {"beta": 0.3}, [("js", 0.3)]),
        ("skew_kl", {"alpha": 0.2}, [("skew_kl", 0.2)]),
        ("skew_reverse_kl", {"alpha": 0.7}, [("skew_reverse_kl", 0.7)]),
        # the endpoints: the mixture is the other side (plain KL), or the divergence is 0
        ("skew_kl", {"alpha": 0.0}, [("kl", None)]),
        ("skew_reverse_kl", {"alpha": 0.0}, [("reverse_kl", None)]),
        ("js", {"beta": 1.0}, []),
        ("skew_kl", {"alpha": 1.0}, []),
    ],
)
def test_each_kind_runs_in_the_kernel_with_its_weight(rng, launched, kind, params, expected):
    s, t = (torch.tensor(x) for x in batch(rng, 6, 50, "none"))
    st = s.clone().requires_grad_(True)
    out = DistillationLoss(kind, reduction="none", **params)(st, t)
    out.sum().backward()
    assert launched == expected
    s64 = s.double().requires_grad_(True)
    ref = DistillationLoss(kind, reduction="none", fast_path=False, **params)(s64, t.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=2e-6)


def test_p_underflowing_against_q_zero_is_still_infinite(calls):
    # p = e^-300·… is 0 in float32, but it is positive: KL(p‖q) with q = 0 there is +inf
    s = torch.tensor([[0.0, 0.0, -float("inf")]])
    t = torch.tensor([[-300.0, 0.0, 0.0]])
    assert DistillationLoss("kl", reduction="none")(s, t).item() == float("inf")
    assert calls == [1]


@pytest.mark.parametrize(("kind", "params"), DEFAULTS, ids=ids(DEFAULTS))
@pytest.mark.parametrize("temperature", [0.7, 1.0, 3.0])
def test_huge_logits_and_subnormal_probabilities(kind, params, temperature, calls):
    """|s/T| near 1e20: the row maximum must shift to exactly 0 (a fused multiply-add there
    left its rounding error, e^(1e4), NaN); and a subnormal p (e^-88) against a log-ratio of
    3e38 contributes 1.8 to KL, so exp must not flush subnormals to 0 (the other kinds see
    the same rows)."""
    far = -3e38 * min(temperature, 1.0)  # -3e38 once divided by T (not -inf)
    s = torch.tensor([[1e20, 5e19, 0.0, 1.0], [0.0, far, 0.0, far]])
    t = torch.tensor([[1e20, 5e19, 0.0, 1.0], [0.0, -88.0 * temperature, -1e3, -1e3]])
    if kind in ("reverse_kl", "skew_reverse_kl"):
        s, t = t, s
    st = s.clone().requires_grad_(True)
    loss = DistillationLoss(kind, reduction="none", temperature=temperature, **params)
    out = loss(st, t)
    out.sum().backward()
    assert calls == [2]
    s64 = s.double().requires_grad_(True)
    ref = DistillationLoss(
        kind, reduction="none", temperature=temperature, fast_path=False, **params
    )(s64, t.double())
    ref.sum().backward()
    if kind in ("kl", "reverse_kl"):
        assert ref[1] > 1.0  # the subnormal term is what makes this row's value
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-6)
    assert st.grad.isfinite().all()
    torch.testing.assert_close(st.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("js", {"beta": 0.1}),
        ("js", {"beta": 0.9}),
        ("skew_kl", {"alpha": 0.1}),
        ("skew_reverse_kl", {"alpha": 0.1}),
    ],
)
def test_a_mixture_that_underflows_in_float32(kind, params, calls):
    """p = e^-103.3 (float32's smallest subnormals) where q = 0, and the mirror: the weighted
    product w·p rounds to 0, so the float32 mixture is 0 where the exact one is w·p > 0.
    log(p/m) is then log(1/w) exactly, as the core has it, not +inf."""
    inf = float("inf")
    s = torch.tensor([[0.0, -inf, 0.0, 0.0], [0.0, -103.3, 0.0, -1e3]])
    t = torch.tensor([[0.0, -103.3, 0.0, -1e3], [0.0, -inf, 0.0, 0.0]])
    st = s.clone().requires_grad_(True)
    out = DistillationLoss(kind, reduction="none", **params)(st, t)
    out.sum().backward()
    assert calls == [2]
    s64 = s.double().requires_grad_(True)
    ref = DistillationLoss(kind, reduction="none", fast_path=False, **params)(s64, t.double())
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    assert st.grad.isfinite().all()
    torch.testing.assert_close(st.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


# Every 127th float32 through the kernel's vector exp (x in [-104, 0]) and log (x >= 0,
# subnormals included), against double-precision references rounded to float32.
ULPS = r"""
#include SOURCE
int printf(const char *, ...);

static double ulps(float got, double want) {
    float w = (float)want, up = nextafterf(fabsf(w), INFINITY);
    return fabs(got - want) / (w == 0 ? 0x1p-149 : (double)(up - fabsf(w)));
}

int main(void) {
    double worst_exp = 0, worst_log = 0;
    float in[W], out[W];
    vf x, y;
    for (uint64_t b0 = 0; b0 < 0x7f800000u; b0 += 127 * W) {
        for (int k = 0; k < W; k++) {
            uint32_t b = (uint32_t)(b0 + 127 * k);
            b = b < 0x7f800000u ? b : 0x7f7fffffu;
            memcpy(&in[k], &b, 4);
        }
        memcpy(&x, in, sizeof x);
        y = vlog(x);
        memcpy(out, &y, sizeof y);
        for (int k = 0; k < W; k++) {
            double e = ulps(out[k], log((double)in[k]));
            worst_log = e > worst_log ? e : worst_log;
        }
    }
    for (uint64_t b0 = 0x80000000u; b0 < 0xC2D00000u; b0 += 127 * W) {
        for (int k = 0; k < W; k++) {
            uint32_t b = (uint32_t)(b0 + 127 * k);
            memcpy(&in[k], &b, 4);
        }
        memcpy(&x, in, sizeof x);
        y = vexp(x);
        memcpy(out, &y, sizeof y);
        for (int k = 0; k < W; k++) {
            double e = ulps(out[k], exp((double)in[k]));
            worst_exp = e > worst_exp ? e : worst_exp;
        }
    }
    float special[W] = {0};
    memcpy(&x, special, sizeof x);
    y = vlog(x);
    memcpy(out, &y, sizeof y);
    x = vexp(splat(-INFINITY));
    memcpy(in, &x, sizeof x);
    printf("{\"exp\": %.4f, \"log\": %.4f, \"log0_is_minus_inf\": %d, \"exp_minus_inf\": %g}\n",
           worst_exp, worst_log, out[0] == -INFINITY, in[0]);
    return 0;
}
"""


def test_the_vector_exp_and_log_are_within_their_stated_ulps(tmp_path):
    """The kernel's exp within 2 ulp and log within 1 ulp (its comments' claims), over a
    sample of every binade, subnormals included; log(0) = −inf and exp(−inf) = 0."""
    src = tmp_path / "ulps.c"
    src.write_text(ULPS)
    exe = tmp_path / "ulps"
    flags = [
        *native_engine._FLAG_SETS[0],
        *native_engine._STRICT,
        "-std=gnu11",
        "-ffp-contract=fast",
    ]
    cmd = [*native_engine._compiler(), *flags, f'-DSOURCE="{native_engine.SOURCE}"']
    subprocess.run([*cmd, "-o", str(exe), str(src), "-lm"], check=True, timeout=120)
    got = json.loads(subprocess.run([str(exe)], capture_output=True, text=True, timeout=120).stdout)
    assert got["exp"] <= 2.0 and got["log"] <= 1.0, got
    assert got["log0_is_minus_inf"] == 1 and got["exp_minus_inf"] == 0.0


def test_concurrent_callers_with_different_row_counts(rng, monkeypatch):
    """Python threads sharing the pool while their row counts (and so their range counts)
    differ: each gets its own rows' values."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(native_engine, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(sys, "getswitchinterval", sys.getswitchinterval)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    inputs = [tuple(torch.tensor(x) for x in batch(rng, n, 40, "none")) for n in range(1, 9)]
    want = [native_engine.rows("kl", s, t, None, 1.0, None)[0] for s, t in inputs]
    errors = []

    def work(i):
        try:
            for _ in range(200):
                got = native_engine.rows("kl", *inputs[i], None, 1.0, None)[0]
                assert torch.equal(got, want[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:3]


@pytest.mark.parametrize(("kind", "params"), DEFAULTS, ids=ids(DEFAULTS))
def test_strides_broadcast_teacher_and_half_precision(rng, kind, params, calls):
    s, t = batch(rng, 12, 257, "teacher")
    wide = torch.tensor(rng.normal(size=(12, 300)).astype(np.float32))
    wide[:, :257] = torch.tensor(s)
    student = wide[:, :257].requires_grad_(True)  # row stride 300
    teacher = torch.tensor(t[:1]).expand(12, 257)  # row stride 0
    out = DistillationLoss(kind, reduction="sum", temperature=1.5, **params)(student, teacher)
    out.backward()
    ref = DistillationLoss(kind, reduction="sum", temperature=1.5, fast_path=False, **params)
    s64 = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    expected = ref(s64, torch.tensor(t[:1], dtype=torch.float64).expand(12, 257))
    expected.backward()
    torch.testing.assert_close(out.double(), expected.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    # bfloat16 and float16 logits: converted a chunk at a time, then the same kernel
    for dtype in (torch.bfloat16, torch.float16):
        calls.clear()
        sh = torch.tensor(s).to(dtype).requires_grad_(True)
        th = torch.tensor(t).to(dtype)
        got = DistillationLoss(kind, reduction="none", **params)(sh, th)
        assert calls and got.dtype == torch.float32
        got.sum().backward()
        assert sh.grad.dtype == dtype
        s64 = sh.detach().double().requires_grad_(True)
        want = DistillationLoss(kind, reduction="none", fast_path=False, **params)(s64, th.double())
        want.sum().backward()
        torch.testing.assert_close(got.double(), want.detach(), rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(sh.grad.double(), s64.grad, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize(("kind", "params"), KINDS, ids=ids(KINDS))
def test_threads_split_rows_without_changing_a_bit(rng, kind, params, monkeypatch):
    s, t = batch(rng, 40, 2000, "both")
    s, t = torch.tensor(s), torch.tensor(t)
    keep = torch.tensor(rng.random(40) < 0.7)
    g1, g2 = torch.empty(40, 2000), torch.empty(40, 2000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # three ranges, uneven
    v1, f1 = native_engine.rows(kind, s, t, keep, 1.3, g1, weight(params))
    assert 40 * 2000 >= native_engine._PARALLEL_MIN
    monkeypatch.setattr(native_engine, "_PARALLEL_MIN", 1 << 62)  # one range
    v2, f2 = native_engine.rows(kind, s, t, keep, 1.3, g2, weight(params))
    assert torch.equal(f1, f2)
    ok = ~f1
    assert torch.equal(v1[ok], v2[ok]) and torch.equal(g1[ok], g2[ok])


@pytest.mark.parametrize(("kind", "params"), DEFAULTS, ids=ids(DEFAULTS))
def test_evaluation_without_a_gradient(rng, calls, kind, params):
    s, t = batch(rng, 9, 100, "teacher")
    out = DistillationLoss(kind, reduction="none", **params)(torch.tensor(s), torch.tensor(t))
    ref, _ = reference(kind, s, t, None, 1.0, torch.ones(9, dtype=torch.float64), params)
    fin = ref.isfinite()
    assert calls == [9] and torch.equal(out.isinf(), ~fin)
    torch.testing.assert_close(out.double()[fin], ref[fin], rtol=2e-5, atol=2e-6)
    # the same values as with a gradient, to the bit (the rows go through the same passes)
    st, tt = torch.tensor(s), torch.tensor(t)
    alone = native_engine.rows(kind, st, tt, None, 1.0, None, weight(params))
    both = native_engine.rows(kind, st, tt, None, 1.0, torch.empty(9, 100), weight(params))
    assert torch.equal(alone[1], both[1]) and torch.equal(alone[0][~alone[1]], both[0][~both[1]])


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_kldiv_native_off_selects_tensor_code(rng, calls, monkeypatch, value):
    monkeypatch.setenv("KLDIV_NATIVE", value)
    s, t = batch(rng, 4, 50, "none")
    DistillationLoss("kl")(torch.tensor(s), torch.tensor(t))
    assert calls == [] and "KLDIV_NATIVE=0" in native_engine.status()


def _python(code: str, env: dict[str, str], *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = """
import json, torch
from kldiv.torch import DistillationLoss
from kldiv.torch._rows import native as native_engine
torch.manual_seed(0)
s, t = torch.randn(5, 33), torch.randn(5, 33)
fast = DistillationLoss("kl")(s, t).item()
core = DistillationLoss("kl", fast_path=False)(s.double(), t.double()).item()
print(json.dumps({"fast": fast, "core": core, "status": native_engine.status(),
                  "path": str(native_engine._state.get("path"))}))
"""


def test_the_build_is_cached_and_a_missing_compiler_falls_back(tmp_path):
    env = {"KLDIV_CACHE_DIR": str(tmp_path / "cache")}
    first = _python(PROBE, env)
    assert first["status"].startswith("compiled")
    built = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert built == [os.path.basename(first["path"])]  # no build leftovers
    stamp = os.stat(first["path"]).st_mtime_ns
    second = _python(PROBE, env)
    assert second["path"] == first["path"] and os.stat(first["path"]).st_mtime_ns == stamp
    assert second["fast"] == first["fast"]
    # no working compiler: the same loss from tensor code, and `status` says why
    broken = _python(PROBE, {**env, "KLDIV_CACHE_DIR": str(tmp_path / "other"), "CC": "false"})
    assert broken["status"].startswith("unavailable (") and "tensor code" in broken["status"]
    for r in (first, broken):
        assert abs(r["fast"] - r["core"]) <= 2e-6 * abs(r["core"])
    # a cache that cannot be written (here: a file where the directory should be) builds in
    # a private directory, loads, and leaves nothing behind; CC may carry arguments
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    tmp = tmp_path / "tmp"  # its own, so other tests' private builds cannot show up in it
    tmp.mkdir()
    env = {"KLDIV_CACHE_DIR": str(blocked / "kldiv"), "CC": "cc -DUNUSED=1", "TMPDIR": str(tmp)}
    private = _python(PROBE, env)
    assert private["status"].startswith("compiled (") and private["fast"] == first["fast"]
    assert not os.path.exists(private["path"]) and os.listdir(tmp) == []
    # a corrupt library under the cache's name is rebuilt, not trusted
    Path(first["path"]).write_bytes(b"garbage")
    again = _python(PROBE, env)
    assert again["status"].startswith("compiled (") and again["fast"] == first["fast"]


def test_a_forked_child_runs_the_kernel(rng):
    """A child forked after the parent ran the thread pool gets a fresh pool (the parent's
    threads do not exist in it)."""
    s, t = (torch.tensor(x) for x in batch(rng, 64, 2048, "none"))
    loss = DistillationLoss("kl")
    parent = loss(s, t).item()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.write(write, repr(loss(s, t).item()).encode())
        finally:
            os._exit(0)
    os.close(write)
    for _ in range(600):  # a hung child fails the test instead of hanging the suite
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish in 60 s")
    with os.fdopen(read) as f:
        child = float(f.read())
    assert child == parent


# The losses of the logits saved in argv[1], from a fresh interpreter: a library that kills the
# process it is loaded into (SIGBUS from a truncated file) fails the test instead of pytest.
LOSSES = """
import json, sys
import numpy as np, torch
from kldiv.torch import DistillationLoss
from kldiv.torch._rows import native as native_engine
native = []
launch = native_engine.rows
def counted(kind, s, *args):
    native.append(kind)
    return launch(kind, s, *args)
native_engine.rows = counted
data = np.load(sys.argv[1])
s, t = torch.from_numpy(data["s"]), torch.from_numpy(data["t"])
kinds = ("kl", "reverse_kl", "js", "skew_kl", "skew_reverse_kl", "tv")
out = {k: DistillationLoss(k, reduction="none")(s, t).tolist() for k in kinds}
print(json.dumps({**out, "native": native, "status": native_engine.status(),
                  "path": str(native_engine._state.get("path")),
                  "flushes_subnormals": sys.float_info.min / 4 == 0}))
"""


def edge_logits(rng, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Float32 logits with -inf on either side and both, equal rows, and a subnormal
    probability that carries the value, saved to ``path`` for :data:`LOSSES`."""
    s, t = batch(rng, 12, 67, "both")
    s[0] = t[0] = 0.0
    # p = e^-88 (subnormal in float32) against a log-ratio of 3e38: a term of 1.8, which
    # a build that flushes subnormals to zero would lose; row 2 is the same for reverse KL
    s[1], t[1] = 0.0, -1e3
    s[1, 1::2] = -3e38
    t[1, :2] = (0.0, -88.0)
    s[2], t[2] = t[1], s[1]
    np.savez(path, s=s, t=t)
    return s, t


def assert_matches_the_core(s, t, got):
    """Every divergence against the core in float64, with the tolerance of the tests above."""
    t64, s64 = t.astype(np.float64), s.astype(np.float64)
    for kind, params in DEFAULTS:
        ref = torch.as_tensor(
            kldiv.divergence(t64, s64, kind, form="logits", reduction="none", **params)
        )
        out = torch.tensor(got[kind], dtype=torch.float64)
        assert torch.equal(out.isposinf(), ref.isposinf()) and not out.isnan().any(), kind
        fin = ref.isfinite()
        torch.testing.assert_close(out[fin], ref[fin], rtol=2e-5, atol=2e-6)
    assert not got["flushes_subnormals"]


def cached(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A library the launcher built and installed, with this environment's $CC."""
    cache = tmp_path_factory.mktemp("genuine")
    code = "from kldiv.torch._rows import native as native_engine; native_engine.kernel(); "
    code += "import json; print(json.dumps(str(native_engine._state.get('path'))))"
    path = Path(_python(code, {"KLDIV_CACHE_DIR": str(cache)}))
    assert path.parent == cache and path.name == f"{path.name.rsplit('_', 1)[0]}_{sha256(path)}.so"
    return path


def foreign_library(tmp_path: Path) -> Path:
    """A valid shared library that is not the kernel."""
    src = tmp_path / "foreign.c"
    src.write_text("int f(void) { return 1; }\n")
    out = tmp_path / "foreign.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(out), str(src)], check=True, timeout=120)
    return out


@pytest.mark.parametrize(
    "damage",
    ["truncated", "foreign", "foreign_under_its_hash", "garbage_under_its_hash", "symlink"],
)
def test_a_cached_library_that_is_not_the_kernel_is_rebuilt(rng, tmp_path, genuine, damage):
    """Loading a truncated library killed the process (SIGBUS), and a foreign one raised
    `undefined symbol` on every call: a cached file is loaded only when it is a regular file
    whose SHA-256 is the one in its name and which exports the kernel."""
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / genuine.name
    if damage == "truncated":
        target.write_bytes(genuine.read_bytes()[: genuine.stat().st_size // 2])
    elif damage == "foreign":
        shutil.copy(foreign_library(tmp_path), target)
    elif damage == "foreign_under_its_hash":  # passes the hash check, lacks the symbol
        foreign = foreign_library(tmp_path)
        key = genuine.name.rsplit("_", 1)[0]
        shutil.copy(foreign, cache / f"{key}_{sha256(foreign)}.so")
    elif damage == "garbage_under_its_hash":  # not a library: it was taken for a noexec cache
        junk = tmp_path / "junk"
        junk.write_bytes(b"garbage")
        key = genuine.name.rsplit("_", 1)[0]
        shutil.copy(junk, cache / f"{key}_{sha256(junk)}.so")
    else:
        elsewhere = tmp_path / "elsewhere.so"
        shutil.copy(genuine, elsewhere)
        target.symlink_to(elsewhere)
    s, t = edge_logits(rng, tmp_path / "logits.npz")
    got = _python(LOSSES, {"KLDIV_CACHE_DIR": str(cache)}, str(tmp_path / "logits.npz"))
    assert got["status"] == f"compiled ({target})" and "kl" in got["native"]
    assert_matches_the_core(s, t, got)
    assert cached(cache) == [genuine.name] and not target.is_symlink()
    assert sha256(target) == sha256(genuine)


@pytest.mark.parametrize(
    ("cc", "reason"),
    [
        ('cc "-O2', "cannot be parsed"),  # shlex.split raised ValueError out of the loss
        ("true", "wrote no library"),
        ("cc -Dkldiv_cpu_rows=renamed", "does not export kldiv_cpu_rows"),
    ],
)
def test_an_unusable_compiler_falls_back_to_tensor_code(rng, tmp_path, cc, reason):
    s, t = edge_logits(rng, tmp_path / "logits.npz")
    env = {"KLDIV_CACHE_DIR": str(tmp_path / "cache"), "CC": cc}
    got = _python(LOSSES, env, str(tmp_path / "logits.npz"))
    assert got["status"].startswith("unavailable (") and reason in got["status"]
    assert got["native"] == []
    assert_matches_the_core(s, t, got)
    assert not (tmp_path / "cache").exists() or cached(tmp_path / "cache") == []


def test_fast_math_flags_in_cc_change_nothing(rng, tmp_path):
    """CC="gcc -ffast-math" changed KL (0.9353 against 0.9226) and, through crtfastmath.o,
    made the whole process flush subnormals to zero. The build overrides such flags, so the
    values are the plain build's, bit for bit."""
    s, t = edge_logits(rng, tmp_path / "logits.npz")
    data = str(tmp_path / "logits.npz")
    plain = _python(LOSSES, {"KLDIV_CACHE_DIR": str(tmp_path / "plain"), "CC": "cc"}, data)
    assert plain["status"].startswith("compiled (") and "kl" in plain["native"]
    assert_matches_the_core(s, t, plain)
    # the reported flag, then the rest at once (any one of them left in force would show)
    for flags in (
        "-ffast-math",
        "-Ofast -funsafe-math-optimizations -ffinite-math-only -fno-signed-zeros"
        " -mpc32 -mfpmath=387",
    ):
        env = {"KLDIV_CACHE_DIR": str(tmp_path / "fast"), "CC": f"cc {flags}"}
        got = _python(LOSSES, env, data)
        assert got["status"].startswith("compiled (") and got["native"] == plain["native"]
        assert not got["flushes_subnormals"], flags
        assert all(got[kind] == plain[kind] for kind, _ in DEFAULTS), flags
    # one library per effective command line
    assert len(cached(tmp_path / "fast")) == 2


def test_a_cache_that_cannot_hold_the_library_builds_elsewhere(rng, tmp_path, genuine):
    s, t = edge_logits(rng, tmp_path / "logits.npz")
    data = str(tmp_path / "logits.npz")
    # a missing cache directory is created
    nested = tmp_path / "missing" / "kldiv"
    got = _python(LOSSES, {"KLDIV_CACHE_DIR": str(nested)}, data)
    assert got["status"] == f"compiled ({nested / genuine.name})"
    assert_matches_the_core(s, t, got)
    # a directory where the library should go: a private build, loaded, then removed
    blocked = tmp_path / "blocked"
    (blocked / genuine.name).mkdir(parents=True)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    got = _python(LOSSES, {"KLDIV_CACHE_DIR": str(blocked), "TMPDIR": str(tmp)}, data)
    assert got["status"].startswith("compiled (") and not os.path.exists(got["path"])
    assert got["path"].startswith(str(tmp)) and os.listdir(tmp) == []
    assert_matches_the_core(s, t, got)
    # a cache path below a regular file cannot be created, by root either (a permission bit
    # would not stop root, who runs CI): a private build again
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    got = _python(LOSSES, {"KLDIV_CACHE_DIR": str(afile / "kldiv"), "TMPDIR": str(tmp)}, data)
    assert got["status"].startswith("compiled (") and got["path"].startswith(str(tmp))
    assert os.listdir(tmp) == [] and afile.read_text() == "not a directory"
    assert_matches_the_core(s, t, got)


def test_concurrent_builds_install_one_whole_file(rng, tmp_path):
    """Processes building into one empty cache at once each load a whole library (built into
    a temporary file, renamed into place) and leave one file behind."""
    s, t = edge_logits(rng, tmp_path / "logits.npz")
    env = {**os.environ, "KLDIV_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-c", textwrap.dedent(LOSSES), str(tmp_path / "logits.npz")]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    for got in results:
        assert got["status"].startswith("compiled (") and got["path"] == results[0]["path"]
        assert all(got[kind] == results[0][kind] for kind, _ in DEFAULTS)
    assert_matches_the_core(s, t, results[0])
    assert cached(tmp_path / "cache") == [os.path.basename(results[0]["path"])]


def test_a_hung_compiler_times_out_and_leaves_nothing_running(rng, tmp_path):
    """A compiler that answers --version but never finishes the build (its children holding
    the output pipes open): killed with its whole process group after the timeout."""
    marker = f"3127.{os.getpid()}"  # sleep's argument, to find this run's survivors
    script = (
        f'if [ "$1" = --version ]; then echo hung-cc 1; else sleep {marker} & sleep {marker}; fi'
    )
    env = {"KLDIV_CACHE_DIR": str(tmp_path / "cache"), "CC": shlex.join(["sh", "-c", script, "cc"])}
    s, t = edge_logits(rng, tmp_path / "logits.npz")
    code = (
        "from kldiv.torch._rows import native as native_engine\nnative_engine._TIMEOUT = 2.0\n"
        + LOSSES
    )
    start = time.monotonic()
    got = _python(code, env, str(tmp_path / "logits.npz"))
    assert time.monotonic() - start < 60
    assert "did not compile native.c in 2 s" in got["status"] and got["native"] == []
    assert_matches_the_core(s, t, got)
    survivors = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes() == f"sleep\0{marker}\0".encode():
                survivors.append(cmdline.parent.name)
        except OSError:
            pass
    assert not survivors


def run_slices(kind, params, s, t, keep, temperature, cuts, go):
    """The vocab-parallel algorithm of every rank, run here slice by slice through
    ``_rows.linear`` (statistics, combined as the all-gather would; terms and Σh, summed as
    the all-reduce would; then each slice's gradient), reassembled: per-row values (float64)
    and the student gradient of Σ go·values."""
    from kldiv.torch._rows import linear

    w = weight(params) or 0.5
    inv_t = 1.0 / temperature
    k = None if keep is None else torch.as_tensor(keep)
    bounds = zip(cuts, cuts[1:], strict=False)
    parts = [(torch.tensor(s[:, a:b]), torch.tensor(t[:, a:b])) for a, b in bounds]
    norms = linear.combine(torch.stack([linear.slice_stats(x, y, k, inv_t) for x, y in parts]))
    sums = sum(linear.slice_terms(kind, w, x, y, k, inv_t, norms) for x, y in parts)
    scale = torch.as_tensor(go, dtype=torch.float32)
    grads = [linear.slice_grad(kind, w, x, y, k, inv_t, norms, sums[1], scale) for x, y in parts]
    return sums[0].double(), torch.cat(grads, -1)


@pytest.fixture
def sliced(monkeypatch):
    """Counts the rows handed to the slice kernel (terms and gradient calls)."""
    seen = []
    real = native_engine.slice_rows

    def counted(kind, w, s, *args):
        seen.append(s.shape[0])
        return real(kind, w, s, *args)

    monkeypatch.setattr(native_engine, "slice_rows", counted)
    return seen


@pytest.mark.parametrize(("kind", "params"), KINDS, ids=ids(KINDS))
@pytest.mark.parametrize(
    ("pattern", "temperature"),
    [("none", 1.0), ("teacher", 1.0), ("student", 1.0), ("both", 1.0), ("both", 0.7)]
    + [("teacher", 2.5), ("student", 2.5)],
)
def test_slices_reassemble_the_full_rows(rng, sliced, kind, params, pattern, temperature):
    """The slice kernel's statistics, terms and gradients over uneven vocabulary slices (one
    of width 0, one of a single column) add up to the core's value and gradient on the whole
    rows, in float64: values to 2e-5 relatively (as the row kernel), gradients within the row
    kernel's error bound (``grad_error_bound``) doubled, for the one more rounding of the
    statistics (each slice's log-sum, combined in float32 like the all-gather's)."""
    n, v = 23, 613
    s, t = batch(rng, n, v, pattern)
    keep = rng.random(n) < 0.8
    s[~keep] = np.nan  # skipped rows are never read
    t[~keep] = np.nan
    cuts = [0, 1, 200, 200, 451, v]
    go = np.linspace(0.5, 2.0, n)
    out, grad = run_slices(kind, params, s, t, keep, temperature, cuts, go)
    assert sum(sliced) == 2 * n * (len(cuts) - 1)  # terms and gradient: every row, every slice
    ref, ref_grad = reference(kind, s, t, torch.tensor(keep), temperature, torch.tensor(go), params)
    assert torch.equal(out.isposinf(), ref.isposinf()) and not out.isnan().any()
    fin = ref.isfinite()
    torch.testing.assert_close(out[fin], ref[fin], rtol=2e-5, atol=2e-6)
    assert grad.isfinite().all()
    rows = (fin & torch.tensor(keep)).numpy()
    if kind == "reverse_kl":  # at +inf rows the core's gradient convention is its own
        grad[~fin] = ref_grad[~fin].float()
    bound = grad_error_bound(kind, s, t, temperature, go, params)
    assert_gradient_within_the_bound(kind, params, grad, ref_grad, bound, rows, factor=2)
    assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))


@pytest.mark.parametrize(("kind", "params"), DEFAULTS, ids=ids(DEFAULTS))
def test_rows_the_slice_kernel_flags_go_to_the_specification(rng, monkeypatch, kind, params):
    """+inf and NaN logits in one slice, a row all −inf on a side, huge logits at T ≠ 1: the
    kernel flags them and the row specification computes them: what it gives without the
    kernel (KLDIV_NATIVE=0), NaN and inf where those are, and otherwise to float32 rounding
    (the other slices' statistics may come from the kernel, rounded differently)."""
    n, v = 7, 40
    s, t = batch(rng, n, v, "none")
    t[0, 3] = np.inf
    s[1, 30] = np.nan
    t[2, :] = -np.inf
    s[3, :] = 3e7  # |s/T| > 2^22
    cuts = [0, 25, v]
    go = np.ones(n)
    out, grad = run_slices(kind, params, s, t, None, 0.5, cuts, go)
    monkeypatch.setenv("KLDIV_NATIVE", "0")
    out0, grad0 = run_slices(kind, params, s, t, None, 0.5, cuts, go)
    torch.testing.assert_close(out, out0, rtol=2e-5, atol=2e-6, equal_nan=True)
    # (rows 4 on: the kernel against float32 tensor code; the float64 test above bounds them)
    torch.testing.assert_close(grad[:4], grad0[:4], rtol=2e-5, atol=1e-6, equal_nan=True)


def test_slice_statistics_are_the_rows_maxima_and_log_sums(rng):
    """Per slice: the maximum of s/T and log Σ exp(s/T − max) (float64 reference), −inf, −inf
    for a side that is all −inf there and for a slice of width 0; +inf and NaN rows flagged."""
    s, t = batch(rng, 5, 300, "both")
    t[1, :] = -np.inf
    s[2, 7] = np.inf
    t[3, 9] = np.nan
    stats, flagged = native_engine.slice_stats(torch.tensor(s), torch.tensor(t), None, 1 / 1.5)
    assert flagged.tolist() == [False, False, True, True, False]
    for row in (0, 1, 4):
        for side, x in ((0, s[row]), (2, t[row])):
            x = x.astype(np.float64) / 1.5
            m = x.max()
            lz = np.log(np.exp(x - m).sum()) if np.isfinite(m) else -np.inf
            got = stats[side : side + 2, row].double().numpy()
            np.testing.assert_allclose(got, [m, lz], rtol=4 * EPS32, atol=4 * EPS32)
    empty, flagged = native_engine.slice_stats(torch.empty(3, 0), torch.empty(3, 0), None, 1.0)
    assert not flagged.any() and torch.equal(empty, torch.full((4, 3), -np.inf))
