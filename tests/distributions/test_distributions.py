"""Closed-form KL between parametric distributions: against torch.distributions (the real
package, float64), against Monte Carlo and quadrature where torch has no closed form,
gradients (float64 gradcheck, finiteness at boundaries), dtypes, validation and the registry."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch
import torch.distributions as td

from kldiv import distributions as D
from kldiv.distributions import continuous, registry

S = (4, 3)


def pos(rng, shape=S, lo=0.3, hi=3.0):
    return rng.uniform(lo, hi, shape)


def tril(rng, batch, k):
    a = np.tril(rng.normal(size=(*batch, k, k)), -1)
    return a + np.eye(k) * rng.uniform(0.5, 2.0, (*batch, k))[..., None, :]


def uniform_params(rng):
    # Half the pairs nested (finite KL), half not (+inf), in one batch.
    lp = rng.normal(size=S)
    hp = lp + pos(rng)
    nested = rng.random(S) < 0.5
    lq = np.where(nested, lp - pos(rng), lp + 0.1)
    hq = np.where(nested, hp + pos(rng), hp + 1.0)
    return [lp, hp, lq, hq]


def T(*a):
    return [torch.tensor(x) for x in a]


# name -> (kldiv function, parameter draw, torch.distributions pair built from the parameters)
CASES = {
    "normal": (
        D.normal_kl,
        lambda r: [r.normal(size=S), pos(r), r.normal(size=S), pos(r)],
        lambda a, b, c, d: (td.Normal(a, b), td.Normal(c, d)),
    ),
    "diag_normal": (
        D.diag_normal_kl,
        lambda r: [r.normal(size=S), r.normal(size=S), r.normal(size=S), r.normal(size=S)],
        lambda a, b, c, d: (
            td.Independent(td.Normal(a, torch.exp(b / 2)), 1),
            td.Independent(td.Normal(c, torch.exp(d / 2)), 1),
        ),
    ),
    "mvn": (
        D.mvn_kl,
        lambda r: [
            r.normal(size=(3, 4)),
            tril(r, (3,), 4),
            r.normal(size=(3, 4)),
            tril(r, (3,), 4),
        ],
        lambda a, b, c, d: (
            td.MultivariateNormal(a, scale_tril=b),
            td.MultivariateNormal(c, scale_tril=d),
        ),
    ),
    "lowrank_mvn": (
        D.lowrank_mvn_kl,
        lambda r: [
            r.normal(size=(3, 5)),
            r.normal(size=(3, 5, 2)),
            pos(r, (3, 5)),
            r.normal(size=(3, 5)),
            r.normal(size=(3, 5, 3)),
            pos(r, (3, 5)),
        ],
        lambda a, b, c, d, e, f: (
            td.LowRankMultivariateNormal(a, b, c),
            td.LowRankMultivariateNormal(d, e, f),
        ),
    ),
    "bernoulli": (
        D.bernoulli_kl,
        lambda r: [r.uniform(0.02, 0.98, S), r.uniform(0.02, 0.98, S)],
        lambda a, b: (td.Bernoulli(probs=a), td.Bernoulli(probs=b)),
    ),
    "binomial": (
        D.binomial_kl,
        lambda r: [
            r.integers(1, 20, S).astype(np.float64),
            r.uniform(0.05, 0.95, S),
            r.uniform(0.05, 0.95, S),
        ],
        lambda n, a, b: (td.Binomial(n, probs=a), td.Binomial(n, probs=b)),
    ),
    "geometric": (
        D.geometric_kl,
        lambda r: [r.uniform(0.05, 0.95, S), r.uniform(0.05, 0.95, S)],
        lambda a, b: (td.Geometric(probs=a), td.Geometric(probs=b)),
    ),
    "poisson": (
        D.poisson_kl,
        lambda r: [pos(r, lo=0.0), pos(r)],
        lambda a, b: (td.Poisson(a), td.Poisson(b)),
    ),
    "beta": (
        D.beta_kl,
        lambda r: [pos(r), pos(r), pos(r), pos(r)],
        lambda a, b, c, d: (td.Beta(a, b), td.Beta(c, d)),
    ),
    "dirichlet": (
        D.dirichlet_kl,
        lambda r: [pos(r, (4, 5)), pos(r, (4, 5))],
        lambda a, b: (td.Dirichlet(a), td.Dirichlet(b)),
    ),
    "gamma": (
        D.gamma_kl,
        lambda r: [pos(r), pos(r), pos(r), pos(r)],
        lambda a, b, c, d: (td.Gamma(a, b), td.Gamma(c, d)),
    ),
    "exponential": (
        D.exponential_kl,
        lambda r: [pos(r), pos(r)],
        lambda a, b: (td.Exponential(a), td.Exponential(b)),
    ),
    "laplace": (
        D.laplace_kl,
        lambda r: [r.normal(size=S), pos(r), r.normal(size=S), pos(r)],
        lambda a, b, c, d: (td.Laplace(a, b), td.Laplace(c, d)),
    ),
    "gumbel": (
        D.gumbel_kl,
        lambda r: [r.normal(size=S), pos(r), r.normal(size=S), pos(r)],
        lambda a, b, c, d: (td.Gumbel(a, b), td.Gumbel(c, d)),
    ),
    "cauchy": (
        D.cauchy_kl,
        lambda r: [r.normal(size=S), pos(r), r.normal(size=S), pos(r)],
        lambda a, b, c, d: (td.Cauchy(a, b), td.Cauchy(c, d)),
    ),
    "uniform": (
        D.uniform_kl,
        uniform_params,
        lambda a, b, c, d: (td.Uniform(a, b), td.Uniform(c, d)),
    ),
    "laplace_normal": (
        D.laplace_normal_kl,
        lambda r: [r.normal(size=S), pos(r), r.normal(size=S), pos(r)],
        lambda a, b, c, d: (td.Laplace(a, b), td.Normal(c, d)),
    ),
    "normal_laplace": (
        D.normal_laplace_kl,
        lambda r: [r.normal(size=S), pos(r), r.normal(size=S), pos(r)],
        lambda a, b, c, d: (td.Normal(a, b), td.Laplace(c, d)),
    ),
    "uniform_normal": (
        D.uniform_normal_kl,
        lambda r: (lambda lo: [lo, lo + pos(r), r.normal(size=S), pos(r)])(r.normal(size=S)),
        lambda a, b, c, d: (td.Uniform(a, b), td.Normal(c, d)),
    ),
    "exponential_normal": (
        D.exponential_normal_kl,
        lambda r: [pos(r), r.normal(size=S), pos(r)],
        lambda a, b, c: (td.Exponential(a), td.Normal(b, c)),
    ),
    "exponential_gamma": (
        D.exponential_gamma_kl,
        lambda r: [pos(r), pos(r), pos(r)],
        lambda a, b, c: (td.Exponential(a), td.Gamma(b, c)),
    ),
    "gamma_exponential": (
        D.gamma_exponential_kl,
        lambda r: [pos(r), pos(r), pos(r)],
        lambda a, b, c: (td.Gamma(a, b), td.Exponential(c)),
    ),
}


def torch_reference(name, params):
    p, q = CASES[name][2](*T(*params))
    return td.kl_divergence(p, q).numpy()


def assert_same(actual, expected, rtol=1e-10, atol=1e-12):
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected))
    fin = np.isfinite(expected)
    np.testing.assert_allclose(actual[fin], expected[fin], rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torch_distributions(xp, rng, name):
    fn, draw, _ = CASES[name]
    params = draw(rng)
    expected = torch_reference(name, params)
    got = fn(*[xp.asarray(a) for a in params])
    assert_same(xp.to_numpy(got), expected)
    assert (xp.to_numpy(got) >= -1e-12).all()


SAME_FAMILY = sorted(n for n in CASES if "_" not in n or n in ("diag_normal", "lowrank_mvn"))


@pytest.mark.parametrize("name", SAME_FAMILY)
def test_zero_for_identical_distributions(rng, name):
    """KL(P‖P) = 0, to rounding, for every same-family pair."""
    fn, draw, _ = CASES[name]
    params = draw(rng)
    if name == "binomial":
        same = [params[0], params[1], params[1]]
    else:
        same = params[: len(params) // 2] * 2
    np.testing.assert_allclose(np.asarray(fn(*same)), 0.0, atol=1e-12)


def test_cross_family_pairs_are_positive(rng):
    for name in (
        "laplace_normal",
        "normal_laplace",
        "uniform_normal",
        "exponential_normal",
        "exponential_gamma",
        "gamma_exponential",
    ):
        fn, draw, _ = CASES[name]
        assert (np.asarray(fn(*draw(rng))) > 0).all(), name


@pytest.mark.parametrize("name", ["normal", "laplace", "gumbel", "cauchy", "bernoulli"])
def test_gradients_match_torch_distributions(ad, rng, name):
    """Gradients of sum KL w.r.t. every parameter equal those of torch.distributions."""
    fn, draw, make = CASES[name]
    params = draw(rng)
    ts = [torch.tensor(a, requires_grad=True) for a in params]
    p, q = make(*ts)
    td.kl_divergence(p, q).sum().backward()
    expected = [t.grad.numpy() for t in ts]
    got = ad.grad(lambda *a: fn(*a).sum(), *[ad.asarray(a) for a in params])
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"uniform"}))
def test_torch_gradcheck_float64(rng, name):
    fn, draw, _ = CASES[name]
    params = draw(rng)
    # binomial's count is not a differentiable parameter
    diff = [name != "binomial" or i > 0 for i in range(len(params))]
    ts = [torch.tensor(a, requires_grad=d) for a, d in zip(params, diff, strict=True)]
    assert torch.autograd.gradcheck(lambda *a: fn(*a), ts)


def test_uniform_gradients_inside_and_zero_outside(ad, rng):
    lp, hp, lq, hq = uniform_params(rng)
    grads = ad.grad(lambda *a: D.uniform_kl(*a).sum(), *[ad.asarray(a) for a in (lp, hp, lq, hq)])
    nested = (lq <= lp) & (hp <= hq)
    w_p, w_q = hp - lp, hq - lq
    # d/d(each) of log(hq - lq) - log(hp - lp) inside; 0 where the value is +inf
    for g, expected in zip(grads, (1 / w_p, -1 / w_p, -1 / w_q, 1 / w_q), strict=True):
        np.testing.assert_allclose(g, np.where(nested, expected, 0.0), rtol=1e-12)


# --- boundaries: exact values and finite gradients ---------------------------------------------


def test_bernoulli_zero_support(xp):
    p = np.array([0.0, 1.0, 0.0, 1.0, 0.3, 0.3, 0.0])
    q = np.array([0.4, 0.4, 0.0, 1.0, 0.0, 1.0, 1.0])
    # hand-derived: p log(p/q) + (1-p) log((1-p)/(1-q)) with 0 log 0 = 0
    expected = np.array([-math.log(0.6), -math.log(0.4), 0.0, 0.0, math.inf, math.inf, math.inf])
    got = xp.to_numpy(D.bernoulli_kl(xp.asarray(p), xp.asarray(q)))
    assert_same(got, expected, rtol=1e-14)


def test_bernoulli_logits_equal_probs_and_saturate_finitely(xp, rng):
    a, b = rng.normal(scale=3, size=S), rng.normal(scale=3, size=S)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    ref = D.bernoulli_kl(sig(a), sig(b))
    for form, (x, y) in {
        "logits": (a, b),
        ("logits", "probs"): (a, sig(b)),
        ("probs", "logits"): (sig(a), b),
    }.items():
        got = D.bernoulli_kl(xp.asarray(x), xp.asarray(y), form=form)
        np.testing.assert_allclose(xp.to_numpy(got), ref, rtol=1e-9)
    # σ(40) = 1 - 4e-18: KL = σ(40)(log σ(40) + 40 + log1p(e^-40)) + σ(-40)(−40 − ...) ≈ 40
    big = D.bernoulli_kl(xp.asarray(np.array([40.0])), xp.asarray(np.array([-40.0])), form="logits")
    assert xp.to_numpy(big)[0] == pytest.approx(40.0, abs=1e-12)


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        (D.bernoulli_kl, ([0.0, 1.0, 0.3], [0.4, 0.6, 0.3])),
        (D.poisson_kl, ([0.0, 2.0], [1.5, 2.0])),
        (D.geometric_kl, ([1.0, 0.3], [0.4, 0.3])),
        (D.binomial_kl, ([5.0, 5.0], [0.0, 1.0], [0.5, 0.5])),
        (D.normal_kl, ([0.0], [1.0], [0.0], [1.0])),
        (D.laplace_kl, ([0.5], [1.0], [0.5], [2.0])),
        (D.normal_laplace_kl, ([0.5], [1.0], [0.5], [2.0])),
    ],
)
def test_boundary_gradients_are_finite(ad, fn, args):
    arrays = [ad.asarray(np.array(a)) for a in args]
    value = fn(*arrays)
    assert np.isfinite(ad.to_numpy(value)).all()
    for g in ad.grad(lambda *a: fn(*a).sum(), *arrays):
        assert np.isfinite(g).all(), g


def test_boundary_values_hand_derived():
    # Poisson(0) is a point mass at 0: KL = -log Q(0) = λq
    assert D.poisson_kl(0.0, 1.5) == pytest.approx(1.5, rel=1e-15)
    assert D.poisson_kl(2.0, 0.0) == math.inf
    # Geometric(1) is a point mass at 0: KL = -log Q(0) = -log q
    assert D.geometric_kl(1.0, 0.4) == pytest.approx(-math.log(0.4), rel=1e-15)
    assert D.geometric_kl(0.5, 1.0) == math.inf
    # laplace at equal locations: log(bq/bp) + bp/bq - 1
    assert D.laplace_kl(0.5, 1.0, 0.5, 2.0) == pytest.approx(math.log(2) + 0.5 - 1, rel=1e-14)
    # VAE term against N(0, I): -1/2 Σ (1 + lv - m² - e^lv)
    m, lv = np.array([0.3, -1.2]), np.array([0.5, -0.7])
    assert D.diag_normal_kl(m, lv) == pytest.approx(-0.5 * np.sum(1 + lv - m**2 - np.exp(lv)))
    # normal with equal scales: squared location gap over 2σ²
    assert D.normal_kl(1.0, 2.0, 0.0, 2.0) == pytest.approx(1 / 8, rel=1e-15)


# --- Student-t: quadrature against closed forms and Monte Carlo --------------------------------


def test_student_t_reduces_to_cauchy_closed_form(xp, rng):
    m1, s1, m2, s2 = rng.normal(size=S), pos(rng), rng.normal(size=S), pos(rng)
    ones = np.ones(S)
    got = D.student_t_kl(*[xp.asarray(a) for a in (ones, m1, s1, ones, m2, s2)])
    # The quadrature sums p·(log p − log q) with each log density computed on its own, from
    # terms lnΓ(1) − lnΓ(½) − ½ log π ≈ −1.14, −log σ and −log1p(z²), so each node's
    # log p − log q carries an absolute error of a few eps times those terms' sizes however
    # small the difference is (KL ≈ 1e-4 from nearby parameters left 1.3e-16 absolute,
    # 1.4e-12 relative). With E_p log1p(z_p²) = 2 log 2 and
    # E_p log1p(z_q²) = log(((σp + σq)² + δ²)/σq²) for Cauchy P, the expected terms' sizes
    # bound it (the batch's largest): 8 roundings of eps each over both densities. rtol
    # covers the rule's own truncation error, relative to the integrand.
    d = m1 - m2
    terms = (
        2 * 1.15
        + np.abs(np.log(s1))
        + np.abs(np.log(s2))
        + 2 * np.log(2)
        + np.log(((s1 + s2) ** 2 + d * d) / s2**2)
    )
    np.testing.assert_allclose(
        xp.to_numpy(got),
        D.cauchy_kl(m1, s1, m2, s2),
        rtol=1e-12,
        atol=8 * np.finfo(np.float64).eps * terms.max(),
    )


def test_student_t_hard_cases_and_node_convergence(monkeypatch):
    # far-apart locations and scale ratios of 1e4, where one angle map alone fails
    for m1, s1, m2, s2 in [(0.0, 1.0, 50.0, 0.01), (0.0, 1.0, 1e4, 1e-3), (0.0, 10.0, 0.0, 1e-3)]:
        got = D.student_t_kl(1.0, m1, s1, 1.0, m2, s2)
        assert got == pytest.approx(D.cauchy_kl(m1, s1, m2, s2), rel=1e-13)
    args = [np.array([0.2, 0.5, 1.0, 30.0]), 0.3, 1.2, np.array([0.3, 3.0, 0.7, 2.0]), -0.5, 0.1]
    base = D.student_t_kl(*args)
    # the quadrature converged: halving the node spacing of the float64 rule moves nothing
    halved = continuous._half_line_rule(1 / 64, 1e-100)
    assert halved[0].size > continuous._T_RULES[64][0].size
    monkeypatch.setitem(continuous._T_RULES, 64, halved)
    np.testing.assert_allclose(D.student_t_kl(*args), base, rtol=1e-12)


def test_student_t_tends_to_normal(rng):
    m1, s1, m2, s2 = rng.normal(size=S), pos(rng), rng.normal(size=S), pos(rng)
    nu = 1e12
    got = D.student_t_kl(nu, m1, s1, nu, m2, s2)
    # t_ν differs from the normal at O(1/ν): the log-densities gain terms up to z⁴/(4ν) with
    # z = (x − μ)/σ; bounded over x within 6σp of μp (the rest has mass < 1e-8).
    z = (np.abs(m1 - m2) + 6 * s1) / np.minimum(s1, s2)
    bound = (1 + z**2 + z**4) / nu + 1e-12 * np.abs(got)
    assert (np.abs(got - D.normal_kl(m1, s1, m2, s2)) <= bound).all()


def test_student_t_log_normaliser_is_accurate_for_large_df():
    from scipy.special import gammaln

    for df in (2.0, 39.0, 41.0, 1e3, 1e6):
        got = float(
            continuous.student_t_log_density(np, continuous.ns.special(np), 0.0, np.float64(df))
        )
        ref = gammaln((df + 1) / 2) - gammaln(df / 2) - 0.5 * np.log(df * np.pi)
        assert got == pytest.approx(ref, abs=1e-12 * max(1.0, gammaln(df / 2)))
    # and the density integrates to 1 however large ν is (where lgamma differences fail)
    x = np.linspace(-40, 40, 400_001)
    for df in (1e8, 1e12):
        dens = np.exp(
            continuous.student_t_log_density(np, continuous.ns.special(np), x, np.float64(df))
        )
        assert np.trapezoid(dens, x) == pytest.approx(1.0, abs=1e-12)


def test_student_t_float32_and_gradients(ad, rng):
    args = [
        rng.uniform(0.8, 5, 3),
        rng.normal(size=3),
        pos(rng, 3),
        rng.uniform(0.8, 5, 3),
        rng.normal(size=3),
        pos(rng, 3),
    ]
    ref = D.student_t_kl(*args)
    got32 = D.student_t_kl(*[ad.asarray(a, "float32") for a in args])
    assert ad.dtype_name(got32) == "float32"
    np.testing.assert_allclose(ad.to_numpy(got32), ref, rtol=2e-5, atol=1e-6)
    grads = ad.grad(lambda *a: D.student_t_kl(*a).sum(), *[ad.asarray(a) for a in args])
    # central finite differences of the float64 quadrature
    for i, g in enumerate(grads):
        for j in range(3):
            up = [a.copy() for a in args]
            dn = [a.copy() for a in args]
            up[i][j] += 1e-6
            dn[i][j] -= 1e-6
            fd = (D.student_t_kl(*up).sum() - D.student_t_kl(*dn).sum()) / 2e-6
            assert g[j] == pytest.approx(fd, rel=1e-5, abs=1e-8)


# --- objects, registry, Monte Carlo --------------------------------------------------------


def mc_check(p, q, exact, n=200_000, seed=0):
    """The k1 estimate from n draws is within 5 standard errors of the closed form."""
    x = p.sample(n, seed=seed)
    ratio = np.asarray(p.log_prob(x) - q.log_prob(x))
    est, se = ratio.mean(axis=0), ratio.std(axis=0) / math.sqrt(n)
    assert (np.abs(est - np.asarray(exact)) <= 5 * se + 1e-9).all(), (est, exact, se)


OBJECT_PAIRS = [
    (D.Normal(0.3, 1.2), D.Normal(-0.5, 0.7)),
    (
        D.DiagNormal(np.array([0.1, -0.3]), np.array([0.2, -0.5])),
        D.DiagNormal(np.zeros(2), np.zeros(2)),
    ),
    (
        D.MultivariateNormal(np.array([0.1, 0.2]), np.array([[1.0, 0.0], [0.5, 0.8]])),
        D.MultivariateNormal(np.zeros(2), np.array([[1.3, 0.0], [-0.2, 0.9]])),
    ),
    (
        D.LowRankMultivariateNormal(np.zeros(3), np.ones((3, 1)), np.ones(3)),
        D.LowRankMultivariateNormal(
            np.full(3, 0.2), np.array([[0.5], [0.0], [-0.5]]), np.full(3, 2.0)
        ),
    ),
    (D.Laplace(0.2, 1.0), D.Laplace(-0.3, 1.5)),
    (D.Gumbel(0.2, 1.0), D.Gumbel(-0.3, 1.5)),
    (D.Cauchy(0.2, 1.0), D.Cauchy(-0.3, 1.5)),
    (D.StudentT(3.0, 0.2, 1.0), D.StudentT(1.5, -0.3, 1.5)),
    (D.StudentT(0.7, 0.2, 1.0), D.StudentT(4.0, -0.3, 1.5)),
    (D.Uniform(0.1, 0.6), D.Uniform(0.0, 1.0)),
    (D.Exponential(1.3), D.Exponential(0.6)),
    (D.Gamma(2.5, 1.3), D.Gamma(1.5, 0.6)),
    (D.Beta(2.5, 1.3), D.Beta(1.5, 0.6)),
    (D.Dirichlet(np.array([2.5, 1.3, 0.8])), D.Dirichlet(np.array([1.0, 1.0, 2.0]))),
    (D.Poisson(3.0), D.Poisson(4.5)),
    (D.Geometric(0.3), D.Geometric(0.6)),
    (D.Binomial(10, 0.3), D.Binomial(10, 0.6)),
    (D.Bernoulli(probs=0.3), D.Bernoulli(logits=0.5)),
    (
        D.Categorical(probs=np.array([0.2, 0.5, 0.3])),
        D.Categorical(logits=np.array([0.0, 1.0, -1.0])),
    ),
    (D.Laplace(0.2, 1.0), D.Normal(-0.3, 1.5)),
    (D.Normal(0.2, 1.0), D.Laplace(-0.3, 1.5)),
    (D.Uniform(-0.5, 1.0), D.Normal(-0.3, 1.5)),
    (D.Exponential(1.3), D.Normal(-0.3, 1.5)),
    (D.Exponential(1.3), D.Gamma(2.0, 1.5)),
    (D.Gamma(2.0, 1.5), D.Exponential(1.3)),
]


@pytest.mark.parametrize(("p", "q"), OBJECT_PAIRS, ids=lambda d: type(d).__name__)
def test_every_closed_form_against_monte_carlo(p, q):
    mc_check(p, q, D.kl(p, q))


def test_normal_vs_student_t_falls_back_to_monte_carlo():
    p, q = D.Normal(0.3, 1.2), D.StudentT(2.5, -0.5, 0.7)
    with pytest.raises(
        NotImplementedError, match=r"Normal \|\| StudentT.*samples=n.*Beta \|\| Beta"
    ):
        D.kl(p, q)
    est = D.kl(p, q, samples=200_000, seed=1)
    # independent reference: Gauss–Hermite quadrature of E_p[log p − log q]
    x, w = np.polynomial.hermite_e.hermegauss(120)
    xs = 0.3 + 1.2 * x
    ref = np.sum(w * (np.asarray(p.log_prob(xs)) - np.asarray(q.log_prob(xs)))) / math.sqrt(
        2 * math.pi
    )
    assert est == pytest.approx(ref, abs=0.01)
    assert D.kl(p, q, samples=1000, seed=5) == D.kl(p, q, samples=1000, seed=5)


def test_monte_carlo_on_torch_and_jax_differentiates():
    loc = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    est = D.kl(D.Normal(loc, 1.0), D.StudentT(3.0, 0.0, 1.0), samples=20_000, seed=0)
    est.backward()
    assert torch.isfinite(loc.grad)

    def f(m):
        t = D.StudentT(3.0, 0.0, 1.0)
        return D.kl(D.Normal(m, 1.0), t, samples=20_000, key=jax.random.key(0))

    g = jax.grad(f)(jnp.asarray(0.3))
    # the pathwise gradient estimates d/dm KL, which is near m times a positive constant
    assert np.isfinite(g) and 0.0 < float(g) < 1.0 and float(loc.grad) > 0.0
    with pytest.raises(TypeError, match="needs key"):
        D.kl(D.Normal(jnp.asarray(0.0), 1.0), D.StudentT(3.0, 0.0, 1.0), samples=10)


def test_support_mismatch_is_infinite_and_mixed_measures_raise(xp):
    z = xp.asarray(np.zeros(3))  # every P carries an array, so results are in xp
    inf_pairs = [
        (D.Normal(z, 1.0), D.Gamma(2.0, 1.0)),
        (D.Normal(z, 1.0), D.Uniform(-1.0, 1.0)),
        (D.Laplace(z, 1.0), D.Beta(2.0, 2.0)),
        (D.Gamma(z + 2.0, 1.0), D.Beta(2.0, 2.0)),
        (D.Poisson(z + 1.0), D.Bernoulli(probs=0.5)),
        (D.Geometric(z + 0.5), D.Binomial(3, 0.5)),
    ]
    for p, q in inf_pairs:
        v = xp.to_numpy(D.kl(p, q))
        assert np.isposinf(v).all(), (p, q)
        # torch agrees wherever it implements the pair
    assert torch.isinf(td.kl_divergence(td.Normal(0.0, 1.0), td.Gamma(2.0, 1.0))).all()
    with pytest.raises(ValueError, match="discrete with a continuous"):
        D.kl(D.Poisson(1.0), D.Normal(0.0, 1.0))


def test_objects_validate_and_are_immutable():
    with pytest.raises(
        ValueError, match=r"`scale` to be > 0 and finite; 1 value\(s\).*index \(1,\)"
    ):
        D.Normal(0.0, np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="exactly one of `probs=` and `logits=`"):
        D.Bernoulli(probs=0.3, logits=0.1)
    with pytest.raises(ValueError, match="low` < `high"):
        D.Uniform(1.0, 0.0)
    with pytest.raises(TypeError, match="real floating dtype"):
        D.Normal(np.array([1, 2]), 1.0)
    D.Normal(0.0, -1.0, validate=False)  # opt-out
    n = D.Normal(0.0, 1.0)
    with pytest.raises(AttributeError):
        n.loc = 3.0  # type: ignore[misc]
    assert repr(D.Normal(np.zeros(3), 2.0)) == "Normal(loc=shape (3,), scale=2.0)"
    with pytest.raises(TypeError, match="two kldiv.distributions objects"):
        D.kl(np.zeros(3), n)
    with pytest.raises(ValueError, match="`samples` to be an int >= 2"):
        D.kl(D.Normal(0.0, 1.0), D.StudentT(3.0, 0.0, 1.0), samples=1)


def test_register_kl_adds_a_pair():
    @D.register_kl(D.Normal, D.Cauchy)
    def _normal_cauchy(p, q):  # a deliberately wrong value, only to see dispatch
        return -1.0

    try:
        assert D.kl(D.Normal(0.0, 1.0), D.Cauchy(0.0, 1.0)) == -1.0
        assert "Normal || Cauchy" in D.registered_pairs()
    finally:
        del registry._REGISTRY[(D.Normal, D.Cauchy)]


def test_sample_shapes_and_seeds(xp):
    p = D.Normal(xp.asarray(np.zeros((2, 3))), 1.0)
    kw = {"key": jax.random.key(0)} if xp.name == "jax" else {"seed": 0}
    assert tuple(p.sample(5, **kw).shape) == (5, 2, 3)
    np.testing.assert_array_equal(xp.to_numpy(p.sample(5, **kw)), xp.to_numpy(p.sample(5, **kw)))
    c = D.Categorical(logits=xp.asarray(np.zeros((2, 4))))
    assert tuple(c.sample(7, **kw).shape) == (7, 2)
    m = D.MultivariateNormal(xp.asarray(np.zeros((2, 3))), xp.asarray(np.eye(3)))
    assert tuple(m.sample(4, **kw).shape) == (4, 2, 3)


# --- dtypes, broadcasting, validation, transforms ------------------------------------------


def test_dtype_policy(xp, rng):
    m, s = rng.normal(size=S), pos(rng)
    out = D.normal_kl(xp.asarray(m, "float32"), xp.asarray(s, "float32"))  # defaults 0.0, 1.0
    assert xp.dtype_name(out) == "float32"
    half = D.diag_normal_kl(xp.asarray(m, "bfloat16"), xp.asarray(m, "bfloat16"))
    assert xp.dtype_name(half) == "float32"
    assert tuple(half.shape) == (4,)
    out = D.gamma_kl(xp.asarray(s), 2.0, 1.5, xp.asarray(s[:1]))  # broadcasting (4,3) x (1,3)
    assert tuple(out.shape) == S


def test_diag_normal_axis_options(rng):
    m, lv = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    full = D.diag_normal_kl(m, lv, axis=None)
    assert full.shape == (2, 3, 4)
    np.testing.assert_allclose(D.diag_normal_kl(m, lv, axis=(1, 2)), full.sum(axis=(1, 2)))


def test_check_true_names_the_parameter():
    with pytest.raises(ValueError, match=r"`scale_q` to be > 0 and finite"):
        D.normal_kl(0.0, 1.0, 0.0, np.array([1.0, 0.0]), check=True)
    with pytest.raises(ValueError, match=r"`p` to be in \[0, 1\]"):
        D.bernoulli_kl(np.array([1.2]), np.array([0.5]), check=True)
    with pytest.raises(ValueError, match="form 'probs' or 'logits'"):
        D.bernoulli_kl(0.2, 0.3, form="log_probs")
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3, 3\)"):
        D.mvn_kl(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="concrete values"):
        jax.jit(lambda s: D.normal_kl(0.0, s, check=True))(jnp.asarray(1.0))
    with pytest.raises(TypeError, match="one framework"):
        D.normal_kl(torch.zeros(2), jnp.ones(2))


def test_jax_jit_vmap_and_torch_compile(rng):
    args = [rng.normal(size=S), pos(rng), rng.normal(size=S), pos(rng)]
    ref = D.gumbel_kl(*args)
    j = jax.jit(D.gumbel_kl)(*[jnp.asarray(a) for a in args])
    # XLA fuses and reorders, and has its own lnΓ: the value is a sum of five terms (see
    # gumbel_kl's docstring) that can cancel to ~1e-5, so the bound is a few ulp of the
    # largest term, plus the exp term E = e^a times a few ulp of its argument a = shift + lnΓ
    mp, bp, mq, bq = args
    r, shift = bp / bq, (mq - mp) / bq
    lg = scipy.special.gammaln(1 + r)
    e = np.exp(shift + lg)
    scale = np.max(np.abs(np.broadcast_arrays(np.log(r), shift, r - 1, e, 1.0)), axis=0)
    bound = 16 * np.finfo(float).eps * (scale + e * (np.abs(shift) + np.abs(lg) + 1))
    np.testing.assert_array_less(np.abs(np.asarray(j) - ref), bound)
    v = jax.vmap(D.student_t_kl)(
        *[jnp.asarray(a) for a in (pos(rng), args[0], args[1], pos(rng), args[2], args[3])]
    )
    assert v.shape == S
    c = torch.compile(D.beta_kl, fullgraph=True)(*T(*[pos(rng) for _ in range(4)]))
    assert c.shape == S


# --- regressions found in review -------------------------------------------------------------


def test_bernoulli_logits_gradients_match_torch_including_logit_zero(ad):
    a = np.array([0.0, 0.0, 2.0, -3.0])
    b = np.array([1.0, 0.0, 0.0, 0.5])
    ta, tb = (torch.tensor(x, requires_grad=True) for x in (a, b))
    td.kl_divergence(td.Bernoulli(logits=ta), td.Bernoulli(logits=tb)).sum().backward()
    got = ad.grad(
        lambda x, y: D.bernoulli_kl(x, y, form="logits").sum(), ad.asarray(a), ad.asarray(b)
    )
    np.testing.assert_allclose(got[0], ta.grad.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got[1], tb.grad.numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("ours", "theirs", "x"),
    [
        (lambda a, b: D.Beta(a, b), lambda a, b: td.Beta(a, b), 0.3),
        (lambda a, b: D.Gamma(a, b), lambda a, b: td.Gamma(a, b), 0.3),
    ],
)
def test_log_prob_gradients_at_concentration_one(ad, ours, theirs, x):
    a, b = np.array([1.0, 2.5]), np.array([1.0, 0.7])
    ta, tb = (torch.tensor(v, requires_grad=True) for v in (a, b))
    theirs(ta, tb).log_prob(torch.tensor(x, dtype=torch.float64)).sum().backward()
    got = ad.grad(lambda u, v: ours(u, v).log_prob(x).sum(), ad.asarray(a), ad.asarray(b))
    np.testing.assert_allclose(got[0], ta.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(got[1], tb.grad.numpy(), rtol=1e-10)


def test_binomial_edge_cases():
    est = D.kl(D.Binomial(5, 0.3), D.Binomial(8, 0.3), samples=50_000, seed=0)
    # exact: Σ_k Bin5(k) log(Bin5(k)/Bin8(k)), written out
    k = np.arange(6)

    def lc(n):
        return np.array(
            [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in k]
        )

    lp5 = lc(5) + k * math.log(0.3) + (5 - k) * math.log(0.7)
    lp8 = lc(8) + k * math.log(0.3) + (8 - k) * math.log(0.7)
    exact = float(np.sum(np.exp(lp5) * (lp5 - lp8)))
    assert est == pytest.approx(exact, abs=0.02)
    assert D.binomial_kl(np.array(0.0), 0.5, 0.0) == 0.0  # n = 0: point masses at 0
    n = torch.tensor([0.0, 3.0], dtype=torch.float64, requires_grad=True)
    v = D.binomial_kl(n, 0.5, torch.tensor([1.0, 0.5], dtype=torch.float64))
    v.sum().backward()
    assert torch.isfinite(n.grad).all() and v[0] == 0.0


def test_point_masses_against_bounded_counts():
    # Poisson(0) and Geometric(1) are the point mass at 0: KL = -log Q(0)
    assert float(D.kl(D.Poisson(0.0), D.Bernoulli(probs=0.3))) == pytest.approx(-math.log(0.7))
    assert float(D.kl(D.Geometric(1.0), D.Binomial(3, 0.5))) == pytest.approx(3 * math.log(2))
    assert float(D.kl(D.Poisson(1.0), D.Binomial(3, 0.5))) == math.inf
    v = D.kl(D.Poisson(np.array([0.0, 2.0])), D.Bernoulli(probs=0.3))
    assert v[0] == pytest.approx(-math.log(0.7)) and v[1] == math.inf


def test_mvn_reads_only_the_lower_triangle_and_checks_factors(xp):
    full = np.array([[1.0, 0.5], [0.2, 1.0]])
    lower = np.tril(full)
    z = np.zeros(2)
    a = xp.to_numpy(
        D.mvn_kl(xp.asarray(z), xp.asarray(full), xp.asarray(z + 1), xp.asarray(np.eye(2)))
    )
    b = xp.to_numpy(
        D.mvn_kl(xp.asarray(z), xp.asarray(lower), xp.asarray(z + 1), xp.asarray(np.eye(2)))
    )
    assert a == pytest.approx(b, rel=1e-14)
    with pytest.raises(ValueError, match="lower triangular"):
        D.mvn_kl(z, full, z, np.eye(2), check=True)
    with pytest.raises(ValueError, match="positive diagonal"):
        D.mvn_kl(z, np.diag([1.0, -1.0]), z, np.eye(2), check=True)
    with pytest.raises(ValueError, match="lower triangular"):
        D.MultivariateNormal(z, full)
    with pytest.raises(ValueError, match="same dimension"):
        D.mvn_kl(np.zeros(3), np.eye(3), z, np.eye(2))
    with pytest.raises(ValueError, match=r"cov_factor_q \(\.\.\., 3, r\)"):
        D.lowrank_mvn_kl(
            np.zeros(3), np.ones((3, 1)), np.ones(3), np.zeros(3), np.ones((2, 1)), np.ones(3)
        )


def test_uniform_check_rejects_reversed_bounds():
    with pytest.raises(ValueError, match="`low_p` < `high_p`"):
        D.uniform_kl(1.0, 0.0, -1.0, 2.0, check=True)
    with pytest.raises(ValueError, match="`low_p` < `high_p`"):
        D.uniform_normal_kl(1.0, 0.0, 0.0, 1.0, check=True)


def test_float32_samples_never_reach_the_open_ends(xp):
    kw = {"key": jax.random.key(3)} if xp.name == "jax" else {"seed": 3}
    for d in (
        D.Gumbel(xp.asarray(np.zeros(1), "float32"), 1.0),
        D.Laplace(xp.asarray(np.zeros(1), "float32"), 1.0),
    ):
        x = xp.to_numpy(d.sample(2_000_000, **kw))
        assert np.isfinite(x).all()
    lap = D.Laplace(0.0, 1.0)
    half = 0.5 - np.finfo(np.float64).eps
    assert np.isfinite(float(lap.loc - lap.scale * np.log1p(-2 * half)))


def test_dtypes_follow_float32_values_and_counts():
    x = torch.zeros(3)
    assert D.Normal(0.0, 1.0).log_prob(x).dtype == torch.float32
    assert D.binomial_kl(torch.tensor([3.0, 5.0]), 0.3, 0.5).dtype == torch.float32
    est = D.kl(D.Normal(torch.zeros(3), 1.0), D.StudentT(3.0, 0.0, 1.0), samples=100, seed=0)
    assert est.dtype == torch.float32
    assert D.student_t_kl(*[torch.ones(2)] * 6).dtype == torch.float32


def test_student_t_float32_input_is_computed_in_float64():
    args = [np.array([0.2, 0.5]), 0.0, 1.0, np.array([0.3, 3.0]), 0.0, 1.0]
    ref = D.student_t_kl(*args)
    got = D.student_t_kl(*[torch.tensor(a, dtype=torch.float32) for a in args])
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6)


def test_torch_compile_fullgraph_on_defaults_student_t_and_objects():
    m, lv = torch.randn(4, 3), torch.randn(4, 3)
    for fn, args in (
        (D.diag_normal_kl, (m, lv)),
        (D.normal_kl, (m, lv.exp())),
        (D.student_t_kl, (lv.exp() + 1, m, lv.exp(), lv.exp() + 2, m, lv.exp())),
        (lambda a, b: D.kl(D.Normal(a, b), D.Normal(0.0, 1.0)), (m, lv.exp())),
    ):
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)
        torch.testing.assert_close(compiled(*args), fn(*args), rtol=1e-5, atol=1e-6)


def test_monte_carlo_needs_matching_event_dimensions():
    with pytest.raises(ValueError, match="events of different dimension"):
        D.kl(D.DiagNormal(np.zeros(3), np.zeros(3)), D.Normal(0.0, 1.0), samples=10, seed=0)


def test_binomials_with_different_counts_are_exact_with_their_support_rule():
    """No closed form exists; kl() sums P(k)·log(P(k)/Q(k)) over P's support, checked against
    SciPy's pmf in float64. +inf where P reaches a count Q cannot (never a Monte-Carlo guess,
    which gave 11.39 for Bin(31, 0.7)‖Bin(30, 0.3)), finite for P the point mass at 0."""
    from scipy.stats import binom

    def reference(n1, p1, n2, p2):
        k = np.arange(n1 + 1)
        pk, qk = binom.pmf(k, n1, p1), binom.pmf(k, n2, p2)
        live = pk > 0
        return float(np.sum(pk[live] * np.log(pk[live] / qk[live])))

    n_p, p = np.array([5.0, 7.0, 2.0, 31.0, 31.0]), np.array([0.2, 0.6, 0.9, 0.7, 0.0])
    n_q, q = np.array([9.0, 12.0, 3.0, 30.0, 30.0]), np.array([0.5, 0.4, 0.1, 0.3, 0.3])
    got = D.kl(D.Binomial(n_p, p), D.Binomial(n_q, q))
    want = [reference(5, 0.2, 9, 0.5), reference(7, 0.6, 12, 0.4), reference(2, 0.9, 3, 0.1)]
    np.testing.assert_allclose(got[:3], want, rtol=1e-12)
    assert got[3] == math.inf  # P reaches 31, Q cannot
    np.testing.assert_allclose(got[4], -30 * math.log(0.7), rtol=1e-14)  # −log Q(0)
    # gradients with respect to both probabilities, finite and equal to central differences
    tp, tq = torch.tensor(p[:3], requires_grad=True), torch.tensor(q[:3], requires_grad=True)
    D.kl(
        D.Binomial(torch.tensor(n_p[:3]), tp), D.Binomial(torch.tensor(n_q[:3]), tq)
    ).sum().backward()
    h = 1e-6
    for grad, base, side in ((tp.grad, p[:3], 0), (tq.grad, q[:3], 1)):
        for i in range(3):
            hi, lo = base.copy(), base.copy()
            hi[i] += h
            lo[i] -= h
            args = [(hi, q[:3]), (lo, q[:3])] if side == 0 else [(p[:3], hi), (p[:3], lo)]
            f = [reference(int(n_p[i]), a[i], int(n_q[i]), b[i]) for a, b in args]
            # central difference: error O(h²·f''') + rounding O(eps·|f|/h), both below 1e-8
            assert abs(grad[i].item() - (f[0] - f[1]) / (2 * h)) < 1e-7
    # q's batch wider than p's, and n_q > n_p > n_q mixed in one batch
    wide = D.kl(
        D.Binomial(5, 0.3), D.Binomial(np.array([4.0, 6.0, 7.0]), np.array([0.2, 0.3, 0.4]))
    )
    assert wide[0] == math.inf
    np.testing.assert_allclose(
        wide[1:], [reference(5, 0.3, 6, 0.3), reference(5, 0.3, 7, 0.4)], rtol=1e-12
    )

    # P a point mass (a = 0 or 1): the value, and a finite gradient. The Bernoulli part keeps
    # bernoulli_kl's convention at the boundary (its true slope is infinite there), so the
    # gradient differs from equal counts' by the count term's one-sided slope alone:
    # n_p·(S(1) − S(0)) at a = 0 and n_p·(S(n_p) − S(n_p − 1)) at a = 1, with
    # S(k) = Σ_{i=1..d} log(1 − k/(n_p + i)) written out here
    def count_term(k, n1, n2):
        return sum(math.log1p(-k / (n1 + i)) for i in range(1, n2 - n1 + 1))

    f64 = {"dtype": torch.float64}
    for a0, n1, n2 in ((0.0, 3, 5), (1.0, 3, 5), (0.0, 2, 9), (1.0, 6, 7)):
        grads = []
        for count_q in (n1, n2):
            ta = torch.tensor(a0, requires_grad=True, **f64)
            q_ = D.Binomial(torch.tensor(float(count_q), **f64), torch.tensor(0.4, **f64))
            v = D.kl(D.Binomial(torch.tensor(float(n1), **f64), ta), q_)
            v.backward()
            grads.append(ta.grad.item())
        np.testing.assert_allclose(v.item(), reference(n1, a0, n2, 0.4), rtol=1e-12)
        lo, hi = (0, 1) if a0 == 0.0 else (n1 - 1, n1)
        slope = n1 * (count_term(hi, n1, n2) - count_term(lo, n1, n2))
        assert math.isfinite(grads[1])
        np.testing.assert_allclose(grads[1] - grads[0], slope, rtol=1e-12)
