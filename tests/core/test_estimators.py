"""Monte-Carlo KL estimators: values against float64 formulas written here, the stated bias of
values (sampling) and of gradients (exact expectations), masking, clamping, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kldiv import estimators as E


def probs(rng, v):
    p = rng.dirichlet(np.ones(v))
    return p


def test_values_match_formulas(xp, rng):
    lp, lq = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    ell = lq - lp
    expected = {"k1": -ell, "k2": 0.5 * ell**2, "k3": np.exp(ell) - 1 - ell}
    for name, ref in expected.items():
        got = E.kl_estimate(xp.asarray(lp), xp.asarray(lq), estimator=name, reduction="none")
        np.testing.assert_allclose(xp.to_numpy(got), ref, rtol=1e-12, atol=1e-15)
        mean = E.kl_estimate(xp.asarray(lp), xp.asarray(lq), estimator=name)
        assert xp.to_numpy(mean) == pytest.approx(ref.mean(), rel=1e-12)
    assert xp.to_numpy(E.k3(xp.asarray(lp), xp.asarray(lq), reduction="sum")) == pytest.approx(
        expected["k3"].sum(), rel=1e-12
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_k3_is_never_negative(xp, rng, dtype):
    ell = np.concatenate(
        [rng.normal(scale=s, size=2000) for s in (1e-8, 1e-4, 1e-2, 1.0, 30.0)]
        + [np.array([0.0, -0.0, 1e-30, -1e-30, -80.0, 80.0])]
    )
    got = E.k3(xp.asarray(np.zeros_like(ell), dtype), xp.asarray(ell, dtype), reduction="none")
    assert (xp.to_numpy(got) >= 0).all()


def sample_ratio(rng, p, q, n):
    x = rng.choice(len(p), size=n, p=p)
    return np.log(p[x]), np.log(q[x])


def test_value_bias_on_categoricals(rng):
    p, q = probs(rng, 6), probs(rng, 6)
    kl = float(np.sum(p * np.log(p / q)))
    half_sq = float(np.sum(p * 0.5 * np.log(q / p) ** 2))  # E[k2], not KL
    n = 200_000
    lp, lq = sample_ratio(rng, p, q, n)
    for name, target in (("k1", kl), ("k3", kl), ("k2", half_sq)):
        vals = E.kl_estimate(lp, lq, estimator=name, reduction="none")
        se = vals.std() / math.sqrt(n)
        assert abs(vals.mean() - target) < 5 * se, (name, vals.mean(), target, se)
    # k2 is biased: its expectation differs from KL (to third order in the log-ratio)
    assert abs(half_sq - kl) > 1e-4


def test_value_bias_on_normals(rng):
    # P = N(0, 1), Q = N(0.5, 1.2²): KL = log(1.2) + (1 + 0.25)/(2·1.44) − ½
    kl = math.log(1.2) + 1.25 / 2.88 - 0.5
    n = 200_000
    x = rng.normal(size=n)
    lp = -0.5 * x**2 - 0.5 * math.log(2 * math.pi)
    lq = -0.5 * ((x - 0.5) / 1.2) ** 2 - math.log(1.2) - 0.5 * math.log(2 * math.pi)
    for name in ("k1", "k3"):
        vals = E.kl_estimate(lp, lq, estimator=name, reduction="none")
        assert abs(vals.mean() - kl) < 5 * vals.std() / math.sqrt(n)


def exact_expected_gradient(theta_np, q_np, **kwargs):
    """E_{x~P}[∇θ estimate(x)] computed exactly: every category weighted by P(x) (held fixed),
    which is what averaging the loss over many fixed samples converges to."""
    theta = torch.tensor(theta_np, requires_grad=True)
    log_p = torch.log_softmax(theta, -1)
    log_q = torch.log(torch.tensor(q_np))
    per = E.kl_estimate(log_p, log_q, reduction="none", **kwargs)
    (torch.exp(log_p).detach() * per).sum().backward()
    return theta.grad.numpy()


def analytic_kl_grads(theta_np, q_np):
    theta = torch.tensor(theta_np, requires_grad=True)
    log_p = torch.log_softmax(theta, -1)
    log_q = torch.log(torch.tensor(q_np))
    fwd = (log_p.exp() * (log_p - log_q)).sum()
    (g_fwd,) = torch.autograd.grad(fwd, theta)
    rev = (log_q.exp() * (log_q - torch.log_softmax(theta, -1))).sum()
    (g_rev,) = torch.autograd.grad(rev, theta)
    return g_fwd.numpy(), g_rev.numpy()


def test_gradient_bias_as_documented(rng):
    theta, q = rng.normal(size=7), probs(rng, 7)
    g_fwd, g_rev = analytic_kl_grads(theta, q)
    np.testing.assert_allclose(exact_expected_gradient(theta, q, estimator="k1"), 0.0, atol=1e-14)
    np.testing.assert_allclose(exact_expected_gradient(theta, q, estimator="k2"), g_fwd, rtol=1e-10)
    np.testing.assert_allclose(exact_expected_gradient(theta, q, estimator="k3"), g_rev, rtol=1e-10)
    assert np.abs(g_fwd - g_rev).max() > 1e-3  # the two really differ here
    # straight-through: k3's value, k2's gradient
    st = exact_expected_gradient(theta, q, estimator="k3", grad_estimator="k2")
    np.testing.assert_allclose(st, g_fwd, rtol=1e-10)


def test_straight_through_value_is_the_first_estimator(ad, rng):
    lp, lq = rng.normal(size=6), rng.normal(size=6)
    a, b = ad.asarray(lp), ad.asarray(lq)
    st = E.kl_estimate(a, b, estimator="k3", grad_estimator="k2", reduction="none")
    np.testing.assert_allclose(
        ad.to_numpy(st), ad.to_numpy(E.k3(a, b, reduction="none")), rtol=1e-15
    )
    g_st = ad.grad(lambda x, y: E.kl_estimate(x, y, estimator="k3", grad_estimator="k2"), a, b)
    g_k2 = ad.grad(lambda x, y: E.k2(x, y), a, b)
    for u, v in zip(g_st, g_k2, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-13)


def test_importance_weighting(rng):
    theta, q = rng.normal(size=5), probs(rng, 5)
    s = probs(rng, 5)
    p = np.exp(theta - theta.max())
    p /= p.sum()
    kl = float(np.sum(p * np.log(p / q)))
    # value: Σ_x S(x) · w(x) · k1(x) = KL(P‖Q) exactly
    per = E.k1(np.log(p), np.log(q), log_sampling=np.log(s), reduction="none")
    assert float(np.sum(s * per)) == pytest.approx(kl, rel=1e-12)
    # on-policy with a detached sampling log-prob: k1's gradient becomes the exact ∇KL(P‖Q)
    t = torch.tensor(theta, requires_grad=True)
    log_p = torch.log_softmax(t, -1)
    per = E.k1(log_p, torch.log(torch.tensor(q)), log_sampling=log_p.detach(), reduction="none")
    (log_p.exp().detach() * per).sum().backward()
    g_fwd, _ = analytic_kl_grads(theta, q)
    np.testing.assert_allclose(t.grad.numpy(), g_fwd, rtol=1e-10)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_masking_before_exp(ad, rng, estimator):
    lp, lq = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
    mask = np.ones((2, 6), dtype=bool)
    mask[0, 4:] = False
    mask[1, 5] = False
    bad_p, bad_q = lp.copy(), lq.copy()
    bad_p[~mask] = [-np.inf, np.nan, 1e30]
    bad_q[~mask] = [1e30, -np.inf, np.nan]
    kw = {"estimator": estimator, "mask": ad.asarray(mask)}
    val = E.kl_estimate(ad.asarray(bad_p), ad.asarray(bad_q), **kw)
    ref = E.kl_estimate(lp[mask], lq[mask], estimator=estimator)
    assert ad.to_numpy(val) == pytest.approx(float(ref), rel=1e-12)
    for g in ad.grad(lambda a, b: E.kl_estimate(a, b, **kw), ad.asarray(bad_p), ad.asarray(bad_q)):
        assert np.isfinite(g).all()
        np.testing.assert_array_equal(g[~mask], 0.0)
    none = E.kl_estimate(ad.asarray(bad_p), ad.asarray(bad_q), reduction="none", **kw)
    np.testing.assert_array_equal(ad.to_numpy(none)[~mask], 0.0)
    # num_items replaces the denominator; an all-masked batch gives 0
    s = E.kl_estimate(ad.asarray(bad_p), ad.asarray(bad_q), num_items=100.0, **kw)
    assert ad.to_numpy(s) == pytest.approx(float(ref) * mask.sum() / 100.0, rel=1e-12)
    empty = E.kl_estimate(
        ad.asarray(bad_p), ad.asarray(bad_q), estimator=estimator, mask=ad.asarray(mask & False)
    )
    assert ad.to_numpy(empty) == 0.0


def test_zero_probability_under_q_is_infinite(xp):
    got = E.k3(
        xp.asarray(np.array([-1.0, -2.0])), xp.asarray(np.array([-1.0, -np.inf])), reduction="none"
    )
    np.testing.assert_array_equal(xp.to_numpy(got), [0.0, np.inf])


def test_clamping_matches_verl_low_var_kl(rng):
    lp = rng.normal(scale=15, size=200)
    lq = rng.normal(scale=15, size=200)
    # verl's low_var_kl, written out: kl = clamp(ref − logp, −20, 20); clamp(e^kl − kl − 1, ±10)
    ell = np.clip(lq - lp, -20, 20)
    ref = np.clip(np.exp(ell) - ell - 1, -10, 10)
    got = E.k3(lp, lq, clamp_log_ratio=20.0, clamp_value=10.0, reduction="none")
    # expm1 is more accurate than e^ℓ − 1 for small ℓ; they agree to ~1e-16 absolute there
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
    assert (got <= 10).all() and (got > 9).any()


def test_half_precision_computes_in_float32(ad, rng):
    lp, lq = rng.normal(size=8), rng.normal(size=8)
    out = E.k3(ad.asarray(lp, "bfloat16"), ad.asarray(lq, "bfloat16"))
    assert ad.dtype_name(out) == "float32"


def test_validation_messages():
    z = np.zeros(3)
    with pytest.raises(ValueError, match="`estimator` to be one of 'k1', 'k2', 'k3', got 'k4'"):
        E.kl_estimate(z, z, estimator="k4")
    with pytest.raises(ValueError, match="`grad_estimator` to be one of"):
        E.kl_estimate(z, z, grad_estimator="kl")
    with pytest.raises(ValueError, match="`clamp_value` to be a positive float"):
        E.k3(z, z, clamp_value=-1.0)
    with pytest.raises(ValueError, match="batchmean"):
        E.k3(z, z, reduction="batchmean")
    with pytest.raises(ValueError, match="broadcast"):
        E.k3(np.zeros(3), np.zeros(4))
    with pytest.raises(TypeError, match="real floating dtype"):
        E.k3(np.zeros(3, dtype=np.int64), z)
    with pytest.raises(TypeError, match="one framework"):
        E.k3(torch.zeros(3), z)
    with pytest.raises((TypeError, ValueError), match="mask"):
        E.k3(z, z, mask=np.ones(3))


def test_overflowing_ratios_keep_finite_values_finite_gradients(ad):
    lp = np.array([0.0, -100.0, -1e4])
    zero = np.zeros(3)
    clamped = lambda a, b: E.k3(a, b, clamp_value=10.0, reduction="none")  # noqa: E731
    val = ad.to_numpy(clamped(ad.asarray(lp, "float32"), ad.asarray(zero, "float32")))
    np.testing.assert_array_equal(val, [0.0, 10.0, 10.0])
    for g in ad.grad(
        lambda a, b: clamped(a, b).sum(), ad.asarray(lp, "float32"), ad.asarray(zero, "float32")
    ):
        np.testing.assert_array_equal(g, 0.0)
    st = lambda a, b: E.kl_estimate(a, b, estimator="k2", grad_estimator="k3", reduction="none")  # noqa: E731
    val = ad.to_numpy(st(ad.asarray(lp, "float32"), ad.asarray(zero, "float32")))
    np.testing.assert_allclose(val, 0.5 * lp**2, rtol=1e-6)
    for g in ad.grad(
        lambda a, b: st(a, b).sum(), ad.asarray(lp, "float32"), ad.asarray(zero, "float32")
    ):
        assert np.isfinite(g).all()
    # clamping k1 and k2 is a plain clamp (the cap on ℓ is k3's alone)
    for name, expected in (("k1", [0.0, -10.0, -10.0]), ("k2", [0.0, 10.0, 10.0])):
        got = E.kl_estimate(lp, zero, estimator=name, clamp_value=10.0, reduction="none")
        np.testing.assert_array_equal(got, expected)
    got = E.k1(np.array([-3.0]), np.zeros(1), clamp_value=10.0, reduction="none")
    np.testing.assert_array_equal(got, [-3.0])


def test_estimators_compile_fullgraph():
    lp, lq = torch.randn(5), torch.randn(5)
    for kw in (
        {"estimator": "k3"},
        {"estimator": "k3", "grad_estimator": "k2", "clamp_value": 10.0},
    ):
        torch._dynamo.reset()
        f = torch.compile(lambda a, b, kw=kw: E.kl_estimate(a, b, **kw), fullgraph=True)
        torch.testing.assert_close(f(lp, lq), E.kl_estimate(lp, lq, **kw))
