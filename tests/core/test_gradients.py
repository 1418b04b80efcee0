"""Gradients: float64 gradcheck, finiteness at zero support for both arguments, exact values."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads
from test_divergences import FORM_PAIRS, KINDS, PARAMS, encode, pair

import kldiv
from kldiv import _math

INF = math.inf


def positive_pair(rng, shape):
    """Strictly positive probabilities, so that finite differences stay inside the domain."""
    p, q = pair(rng, shape, p_zeros=0.0)
    return 0.5 * p + 0.5 / shape[-1], 0.5 * q + 0.5 / shape[-1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("forms", FORM_PAIRS, ids="-".join)
def test_torch_gradcheck_float64(rng, kind, forms):
    p, q = positive_pair(rng, (3, 5))
    a = torch.tensor(encode(p, forms[0], rng), requires_grad=True)
    b = torch.tensor(encode(q, forms[1], rng), requires_grad=True)
    params = PARAMS.get(kind, {})
    # tv's |p - q| is not differentiable where p = q; random inputs never tie.
    fn = lambda x, y: kldiv.divergence(x, y, kind, form=forms, reduction="none", **params)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("forms", [("logits", "logits"), ("probs", "probs")], ids="-".join)
def test_jax_check_grads_float64(rng, kind, forms):
    p, q = positive_pair(rng, (3, 5))
    a, b = jnp.asarray(encode(p, forms[0], rng)), jnp.asarray(encode(q, forms[1], rng))
    params = PARAMS.get(kind, {})
    # jit: check_grads calls fn and its derivatives dozens of times; traced once each, they
    # are compiled once instead of dispatched op by op (the same function either way)
    fn = jax.jit(lambda x, y: kldiv.divergence(x, y, kind, form=forms, **params))
    check_grads(fn, (a, b), order=2, modes=["rev", "fwd"], eps=1e-6)


def test_torch_gradgradcheck_through_the_custom_backward(rng):
    p, q = positive_pair(rng, (2, 4))
    for forms in [("logits", "logits"), ("probs", "probs")]:
        a = torch.tensor(encode(p, forms[0], rng), requires_grad=True)
        b = torch.tensor(encode(q, forms[1], rng), requires_grad=True)
        fn = lambda x, y, f=forms: kldiv.kl_div(x, y, form=f, reduction="none")  # noqa: E731
        assert torch.autograd.gradgradcheck(fn, (a, b))


def zero_support_cases():
    """(name, p, q, form): inputs with zeros whose divergence value is finite for KL(P‖Q)."""
    yield (
        "probs-p-zero",
        [[0.0, 0.6, 0.4], [0.5, 0.5, 0.0]],
        [[0.2, 0.3, 0.5], [0.1, 0.9, 0.0]],
        "probs",
    )
    yield "probs-both-zero", [[0.0, 1.0, 0.0]], [[0.0, 0.5, 0.5]], "probs"
    yield (
        "logits-neg-inf",
        [[-INF, 1.0, 2.0], [0.0, -INF, -INF]],
        [[0.5, -INF, 1.0], [1.0, 2.0, -INF]],
        "logits",
    )
    yield (
        "log-probs-neg-inf",
        [[-INF, math.log(0.25), math.log(0.75)]],
        [[-INF, math.log(0.5), math.log(0.5)]],
        "log_probs",
    )


def finite_zero_support_params():
    """(case, kind, swapped) combinations whose value is finite, decided by the reference."""
    import reference as ref

    out = []
    for case in zero_support_cases():
        name, p, q, form = case
        for kind in KINDS:
            for swapped in (False, True):
                a, b = (q, p) if swapped else (p, q)
                value = ref.reference(
                    kind, np.array(a), np.array(b), form=form, **PARAMS.get(kind, {})
                )
                if np.isfinite(value).all():
                    out.append(pytest.param(case, kind, swapped, id=f"{name}-{kind}-{swapped}"))
    return out


@pytest.mark.parametrize("case, kind, swapped", finite_zero_support_params())
def test_gradients_finite_wherever_value_is_finite(ad, case, kind, swapped):
    _, p, q, form = case
    params = PARAMS.get(kind, {})
    a, b = ad.asarray(np.array(p)), ad.asarray(np.array(q))
    if swapped:
        a, b = b, a
    assert np.isfinite(ad.to_numpy(kldiv.divergence(a, b, kind, form=form, **params)))
    ga, gb = ad.grad(lambda x, y: kldiv.divergence(x, y, kind, form=form, **params), a, b)
    assert np.isfinite(ga).all() and np.isfinite(gb).all(), (kind, ga, gb)


@pytest.mark.parametrize("kind", ["js", "tv", "skew_kl", "skew_reverse_kl"])
def test_bounded_divergences_have_finite_gradients_for_disjoint_supports(ad, kind):
    # These stay finite when the supports differ (skew: the mixture keeps m ≥ alpha·p > 0).
    params = PARAMS.get(kind, {})
    P, Q = ad.asarray(np.array([[0.7, 0.3, 0.0]])), ad.asarray(np.array([[0.0, 0.0, 1.0]]))
    assert np.isfinite(ad.to_numpy(kldiv.divergence(P, Q, kind, **params)))
    ga, gb = ad.grad(lambda x, y: kldiv.divergence(x, y, kind, **params), P, Q)
    assert np.isfinite(ga).all() and np.isfinite(gb).all()


def test_gradient_values_at_zero_probability(ad):
    # KL(P‖Q) = Σ p·log(p/q): ∂/∂p_j = log(p_j/q_j) + 1, ∂/∂q_j = -p_j/q_j; at p_j = 0 both
    # are taken as 0 (the term is absent), as torch.nn.functional.kl_div does.
    p = np.array([[0.0, 0.25, 0.75]])
    q = np.array([[0.5, 0.125, 0.375]])
    gp, gq = ad.grad(lambda x, y: kldiv.kl_div(x, y, reduction="sum"), ad.asarray(p), ad.asarray(q))
    np.testing.assert_allclose(gp, [[0.0, math.log(2) + 1, math.log(2) + 1]], rtol=1e-14)
    np.testing.assert_allclose(gq, [[0.0, -2.0, -2.0]], rtol=1e-14)


def test_gradient_with_respect_to_neg_inf_logit_is_zero(ad):
    a = np.array([[-INF, 0.0, 1.0]])
    b = np.array([[0.3, -0.2, 0.1]])
    ga, gb = ad.grad(lambda x, y: kldiv.kl_div(x, y, form="logits"), ad.asarray(a), ad.asarray(b))
    assert ga[0, 0] == 0.0
    # ∂KL/∂b = softmax(b) - softmax(a) (hand derivation for logits of the second argument).
    sa = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
    sb = np.exp(b - b.max()) / np.exp(b - b.max()).sum()
    np.testing.assert_allclose(gb, sb - sa, rtol=1e-12)


def test_masked_garbage_rows_get_exactly_zero_gradient(ad):
    p = np.array([[0.5, 0.5], [np.nan, np.inf], [0.2, 0.8]])
    q = np.array([[0.25, 0.75], [-1.0, 0.0], [0.9, 0.1]])
    mask = np.array([True, False, True])
    for kind in KINDS:
        for form in ("probs", "logits", "log_probs"):
            fn = lambda x, y, k=kind, f=form: kldiv.divergence(  # noqa: E731
                x, y, k, form=f, mask=ad.asarray(mask)
            )
            assert np.isfinite(ad.to_numpy(fn(ad.asarray(p), ad.asarray(q)))) or form == "log_probs"
            gp, gq = ad.grad(fn, ad.asarray(p), ad.asarray(q))
            assert (gp[1] == 0).all() and (gq[1] == 0).all(), (kind, form)


def edge_log_probs():
    """Rows of (lp, lq) pairs covering every zero-support combination, plus an underflow."""
    lp = np.array([[-INF, -INF, -1.0, -0.5, -800.0, -2.0]])
    lq = np.array([[-INF, -1.5, -INF, -0.7, -1.0, -2.0]])
    return lp, lq


@pytest.mark.parametrize("given_p", [False, True])
def test_torch_custom_backward_equals_the_generic_composition(rng, given_p):
    """_math.kl_rows on torch (analytic backward) vs autograd through sum(kl_terms)."""
    lp_edge, lq_edge = edge_log_probs()
    with np.errstate(divide="ignore"):
        lp_rand = np.log(pair(rng, (4, 6), p_zeros=0.3)[0])
    lq_rand = np.log(pair(rng, (4, 6), p_zeros=0.0)[1])
    for lp_np, lq_np in ((lp_edge, lq_edge), (lp_rand, lq_rand)):
        results = []
        for impl in ("custom", "generic"):
            lp = torch.tensor(lp_np, requires_grad=True)
            lq = torch.tensor(lq_np, requires_grad=True)
            p = torch.exp(lp) if given_p else None
            if impl == "custom":
                rows = _math.kl_rows(torch, lp, lq, p, -1)
            else:
                rows = torch.sum(_math.kl_terms(torch, lp, lq, p), dim=-1)
            terms_finite = torch.isfinite(rows)
            weights = torch.linspace(0.5, 1.5, rows.numel(), dtype=torch.float64).reshape(
                rows.shape
            )
            torch.where(terms_finite, rows * weights, 0.0).sum().backward()
            results.append((rows.detach().numpy(), lp.grad.numpy(), lq.grad.numpy()))
        (v1, gp1, gq1), (v2, gp2, gq2) = results
        np.testing.assert_array_equal(v1, v2)
        # Rows with a finite value must agree exactly; rows at +inf (dropped above) only need
        # gradients free of NaN (the analytic -p for log q there is as valid as the 0 of where).
        fin = np.isfinite(v1)
        np.testing.assert_allclose(gp1[fin], gp2[fin], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(gq1[fin], gq2[fin], rtol=1e-12, atol=1e-15)
        for g in (gp1, gq1, gp2, gq2):
            assert np.isfinite(g).all()


def test_torch_custom_rows_edge_values():
    lp, lq = edge_log_probs()
    terms = _math.kl_terms(np, lp, lq)
    # Hand derivation per column: p=0 → 0 (twice); p>0=q → inf; finite; exp(-800) > 0 = ... q>0
    # so the term underflows to 0 in float64; identical → 0.
    expected = [0.0, 0.0, INF, math.exp(-0.5) * 0.2, 0.0, 0.0]
    np.testing.assert_allclose(terms[0], expected, rtol=1e-15)
    rows = _math.kl_rows(torch, torch.tensor(lp), torch.tensor(lq), None, -1)
    assert rows.item() == INF


def test_jax_grad_matches_torch_grad(rng):
    p, q = pair(rng, (3, 6), p_zeros=0.3)
    a, b = encode(p, "logits", rng), encode(q, "logits", rng)
    for kind in KINDS:
        params = PARAMS.get(kind, {})
        fn_t = lambda x, y, k=kind, kw=params: kldiv.divergence(x, y, k, form="logits", **kw)  # noqa: E731
        ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
        value = fn_t(ta, tb)
        assert value.item() == pytest.approx(float(fn_t(jnp.asarray(a), jnp.asarray(b))), rel=1e-12)
        if not math.isfinite(value.item()):
            continue  # p has zeros: reverse/symmetric KL are +inf, their gradient unconstrained
        value.backward()
        ja, jb = jax.grad(fn_t, argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b))
        np.testing.assert_allclose(np.asarray(ja), ta.grad.numpy(), rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(np.asarray(jb), tb.grad.numpy(), rtol=1e-9, atol=1e-14)


def test_half_precision_gradients_are_finite_and_in_input_dtype(rng):
    p, q = pair(rng, (4, 64), p_zeros=0.1)
    for dtype in (torch.float16, torch.bfloat16):
        a = torch.tensor(encode(p, "logits", rng)).to(dtype).requires_grad_(True)
        b = torch.tensor(encode(q, "logits", rng)).to(dtype).requires_grad_(True)
        kldiv.kl_div(a, b, form="logits").backward()
        assert a.grad.dtype == dtype and b.grad.dtype == dtype
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_skew_gradient_at_zero_probability_is_the_analytic_one(ad, alpha):
    # d/dq_j KL(P ‖ aP + (1-a)Q) = -(1-a)·p_j/m_j, finite at q_j = 0 (m_j = a·p_j > 0): the
    # student must be pushed up where it has no mass. Hand derivation; checked at q_j = 0.
    p = np.array([[0.5, 0.5, 0.0]])
    q = np.array([[0.0, 0.6, 0.4]])
    m = alpha * p + (1 - alpha) * q
    expected_q = np.where(p > 0, -(1 - alpha) * p / np.where(m > 0, m, 1), 0.0)
    _, gq = ad.grad(
        lambda x, y: kldiv.skew_kl_div(x, y, alpha=alpha, reduction="sum"),
        ad.asarray(p),
        ad.asarray(q),
    )
    np.testing.assert_allclose(gq, expected_q, rtol=1e-12)
    # skew_reverse_kl_div(a, b) = KL(B ‖ aB + (1-a)A): with a = q, b = p it is the same value.
    gq2, _ = ad.grad(
        lambda x, y: kldiv.skew_reverse_kl_div(x, y, alpha=alpha, reduction="sum"),
        ad.asarray(q),
        ad.asarray(p),
    )
    np.testing.assert_allclose(gq2, expected_q, rtol=1e-12)


def test_js_gradient_through_the_mixture_reaches_zero_entries(ad):
    # JS_b = b·KL(P‖M) + (1-b)·KL(Q‖M). At q_j = 0 < p_j the Q-term's q·log q part has slope
    # -inf and is taken as 0 (the zero-support convention); the mixture part is finite:
    # d/dq_j [b·Σ p log(p/m)] = -b·(1-b)·p_j/m_j with m_j = b·p_j, i.e. -(1-b). By hand.
    b = 0.3
    p = np.array([[0.5, 0.5]])
    q = np.array([[0.0, 1.0]])
    _, gq = ad.grad(
        lambda x, y: kldiv.js_div(x, y, beta=b, reduction="sum"), ad.asarray(p), ad.asarray(q)
    )
    m1 = b * 0.5 + (1 - b) * 1.0
    # column 1: d/dq [b·p·log(p/m) + (1-b)·q·log(q/m)] = -b(1-b)p/m + (1-b)(log(q/m) + 1 - (1-b)q/m)
    col1 = -b * (1 - b) * 0.5 / m1 + (1 - b) * (math.log(1.0 / m1) + 1 - (1 - b) * 1.0 / m1)
    np.testing.assert_allclose(gq, [[-(1 - b), col1]], rtol=1e-12)


def test_pytorch_kl_div_gives_nan_where_kldiv_gives_zero():
    """Backs the README's claim about the real F.kl_div, side by side with kldiv."""
    import torch.nn.functional as F

    target = torch.tensor([[0.0, 0.6, 0.4]], dtype=torch.float64, requires_grad=True)
    log_input = torch.log(torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64))
    F.kl_div(log_input, target, reduction="sum").backward()
    assert torch.isnan(target.grad[0, 0])
    nan_value = F.kl_div(torch.tensor([[-INF, 0.0]]), torch.tensor([[0.0, 1.0]]), reduction="sum")
    assert torch.isnan(nan_value)

    p = target.detach().clone().requires_grad_(True)
    kldiv.kl_div(p, log_input, form=("probs", "log_probs"), reduction="sum").backward()
    assert p.grad[0, 0] == 0.0 and torch.isfinite(p.grad).all()
    value = kldiv.kl_div(
        torch.tensor([[0.0, 1.0]]), torch.tensor([[-INF, 0.0]]), form=("probs", "log_probs")
    )
    assert value.item() == 0.0


@pytest.mark.parametrize("form", ["logits", "probs"])
def test_gradients_with_a_broadcast_argument(rng, form):
    """p of shape (V,) against q of shape (N, V): torch's gradient for p is summed back to (V,)
    (the custom backward returns it broadcast) and equals JAX's, for every kind."""
    a, b = rng.normal(size=(5,)), rng.normal(size=(3, 5))
    if form == "probs":
        a, b = np.exp(a) / np.exp(a).sum(), np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    for kind in KINDS:
        ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
        kldiv.divergence(ta, tb, kind, form=form).backward()
        ja, jb = jax.grad(lambda x, y, k=kind: kldiv.divergence(x, y, k, form=form), (0, 1))(
            jnp.asarray(a), jnp.asarray(b)
        )
        assert ta.grad.shape == (5,)
        np.testing.assert_allclose(ta.grad.numpy(), np.asarray(ja), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(tb.grad.numpy(), np.asarray(jb), rtol=1e-10, atol=1e-14)


def test_tv_gradient_is_zero_where_p_equals_q(ad):
    x = np.array([[0.3, 0.7], [0.5, 0.5]])
    gp, gq = ad.grad(lambda a, b: kldiv.tv_distance(a, b), ad.asarray(x), ad.asarray(x))
    np.testing.assert_array_equal(gp, 0.0)
    np.testing.assert_array_equal(gq, 0.0)


@pytest.mark.parametrize(
    "kind,params",
    [
        ("js", {"beta": 1.0}),
        ("js", {"beta": 0.0}),
        ("skew_kl", {"alpha": 1.0}),
        ("skew_reverse_kl", {"alpha": 1.0}),
    ],
)
@pytest.mark.parametrize("form", ["logits", "probs"])
def test_identically_zero_endpoints_still_give_both_sides_a_zero_gradient(kind, params, form):
    """At a weight's endpoint the divergence is 0 and one side drops out of the formula; that
    side must still get a gradient (0), or backward() raises when only it requires one."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64)
    if form == "probs":
        x = x.softmax(-1)
        x[0, 1] = 0.0
        x = x / x.sum(-1, keepdim=True)
    for side in (0, 1):
        p, q = x.clone(), x.flip(0).clone()
        leaf = (p, q)[side].requires_grad_(True)
        out = kldiv.divergence(p, q, kind, form=form, **params)
        assert out.item() == 0.0
        (g,) = torch.autograd.grad(out, leaf)
        assert torch.equal(g, torch.zeros_like(g))
