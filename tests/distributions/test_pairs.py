"""The closed forms added for every pair torch.distributions registers, and TFP's families.

Each array function is checked, in float64 on NumPy, PyTorch and JAX:

* against torch.distributions (the real package) where torch has the pair, to 1e-12 relative
  (its formulas are exact in float64 here: the continuous Bernoulli is drawn with |η| ≥ 0.2,
  away from λ = ½ where torch's formulas cancel), with +inf exactly where torch gives +inf;
* against TensorFlow Probability (NumPy substrate) for the pairs only TFP has, to 1e-12;
* against a Monte-Carlo estimate: |closed − mean(log p − log q)| ≤ 5·SE with SE = std/√n
  from n fixed-seed draws (a 5σ event has probability 6e-7 under the CLT), or a quadrature
  where kldiv has no sampler (von Mises);
* gradients against central finite differences in float64: with step h = 1e-6 the error is
  O(h²·|f‴|) + O(eps·|f|/h) ≈ 1e-12 + 2e-10, so |autograd − FD| ≤ 1e-6·|FD| + 1e-7.
"""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
import torch
import torch.distributions as td

from kldiv import distributions as D
from kldiv.distributions import _special, registry

S = (4, 3)
EPS = np.finfo(np.float64).eps


def pos(r, lo=0.3, hi=3.0, shape=S):
    return r.uniform(lo, hi, shape)


def real(r, shape=S):
    return r.normal(size=shape)


def cb_probs(r):
    # |η| ≥ 0.2: see the module docstring
    return 0.5 + np.where(r.random(S) < 0.5, 1.0, -1.0) * r.uniform(0.05, 0.45, S)


def interval(r, lo=-0.5, hi=1.5):
    """Intervals [a, b] that fall inside [0, 1] (or [0, ∞)) for some draws and not others."""
    a = r.uniform(lo, hi - 0.5, S)
    return [a, a + r.uniform(0.05, 0.6, S)]


def tril(r, batch, k):
    a = np.tril(r.normal(size=(*batch, k, k)), -1)
    return a + np.eye(k) * r.uniform(0.5, 2.0, (*batch, k))[..., None, :]


def T(*a):
    return [torch.tensor(x) for x in a]


# name -> (kldiv function, draw(rng) -> parameters, torch pair from tensors or None)
CASES = {
    "bernoulli_poisson": (
        D.bernoulli_poisson_kl,
        lambda r: [r.uniform(0.0, 1.0, S), pos(r)],
        lambda a, b: (td.Bernoulli(probs=a), td.Poisson(b)),
    ),
    "beta_exponential": (
        D.beta_exponential_kl,
        lambda r: [pos(r), pos(r), pos(r)],
        lambda a, b, c: (td.Beta(a, b), td.Exponential(c)),
    ),
    "beta_gamma": (
        D.beta_gamma_kl,
        lambda r: [pos(r), pos(r), pos(r), pos(r)],
        lambda a, b, c, d: (td.Beta(a, b), td.Gamma(c, d)),
    ),
    "beta_normal": (
        D.beta_normal_kl,
        lambda r: [pos(r), pos(r), real(r), pos(r)],
        lambda a, b, c, d: (td.Beta(a, b), td.Normal(c, d)),
    ),
    "beta_uniform": (
        D.beta_uniform_kl,
        lambda r: [pos(r), pos(r), r.uniform(-1.0, 0.3, S), r.uniform(0.7, 2.0, S)],
        lambda a, b, c, d: (td.Beta(a, b), td.Uniform(c, d)),
    ),
    "beta_continuous_bernoulli": (
        D.beta_continuous_bernoulli_kl,
        lambda r: [pos(r), pos(r), cb_probs(r)],
        lambda a, b, c: (td.Beta(a, b), td.ContinuousBernoulli(c)),
    ),
    "exponential_gumbel": (
        D.exponential_gumbel_kl,
        lambda r: [pos(r), real(r), pos(r)],
        lambda a, b, c: (td.Exponential(a), td.Gumbel(b, c)),
    ),
    "gamma_gumbel": (
        D.gamma_gumbel_kl,
        lambda r: [pos(r), pos(r), real(r), pos(r)],
        lambda a, b, c, d: (td.Gamma(a, b), td.Gumbel(c, d)),
    ),
    "gamma_normal": (
        D.gamma_normal_kl,
        lambda r: [pos(r), pos(r), real(r), pos(r)],
        lambda a, b, c, d: (td.Gamma(a, b), td.Normal(c, d)),
    ),
    "gumbel_normal": (
        D.gumbel_normal_kl,
        lambda r: [real(r), pos(r), real(r), pos(r)],
        lambda a, b, c, d: (td.Gumbel(a, b), td.Normal(c, d)),
    ),
    "normal_gumbel": (
        D.normal_gumbel_kl,
        lambda r: [real(r), pos(r), real(r), pos(r)],
        lambda a, b, c, d: (td.Normal(a, b), td.Gumbel(c, d)),
    ),
    "uniform_beta": (
        D.uniform_beta_kl,
        lambda r: [*interval(r), pos(r), pos(r)],
        lambda a, b, c, d: (td.Uniform(a, b), td.Beta(c, d)),
    ),
    "uniform_exponential": (
        D.uniform_exponential_kl,
        lambda r: [*interval(r), pos(r)],
        lambda a, b, c: (td.Uniform(a, b), td.Exponential(c)),
    ),
    "uniform_gamma": (
        D.uniform_gamma_kl,
        lambda r: [*interval(r), pos(r), pos(r)],
        lambda a, b, c, d: (td.Uniform(a, b), td.Gamma(c, d)),
    ),
    "uniform_gumbel": (
        D.uniform_gumbel_kl,
        lambda r: [*interval(r), real(r), pos(r)],
        lambda a, b, c, d: (td.Uniform(a, b), td.Gumbel(c, d)),
    ),
    "uniform_continuous_bernoulli": (
        D.uniform_continuous_bernoulli_kl,
        lambda r: [*interval(r), cb_probs(r)],
        lambda a, b, c: (td.Uniform(a, b), td.ContinuousBernoulli(c)),
    ),
    "uniform_pareto": (
        D.uniform_pareto_kl,
        lambda r: [*interval(r, 0.5, 3.0), pos(r, 0.5, 1.5), pos(r)],
        lambda a, b, c, d: (td.Uniform(a, b), td.Pareto(c, d)),
    ),
    "continuous_bernoulli": (
        D.continuous_bernoulli_kl,
        lambda r: [cb_probs(r), cb_probs(r)],
        lambda a, b: (td.ContinuousBernoulli(a), td.ContinuousBernoulli(b)),
    ),
    "continuous_bernoulli_exponential": (
        D.continuous_bernoulli_exponential_kl,
        lambda r: [cb_probs(r), pos(r)],
        lambda a, b: (td.ContinuousBernoulli(a), td.Exponential(b)),
    ),
    "continuous_bernoulli_normal": (
        D.continuous_bernoulli_normal_kl,
        lambda r: [cb_probs(r), real(r), pos(r)],
        lambda a, b, c: (td.ContinuousBernoulli(a), td.Normal(b, c)),
    ),
    "continuous_bernoulli_uniform": (
        D.continuous_bernoulli_uniform_kl,
        lambda r: [cb_probs(r), r.uniform(-1.0, 0.3, S), r.uniform(0.7, 2.0, S)],
        lambda a, b, c: (td.ContinuousBernoulli(a), td.Uniform(b, c)),
    ),
    "pareto": (
        D.pareto_kl,
        lambda r: [pos(r), pos(r), pos(r), pos(r)],
        lambda a, b, c, d: (td.Pareto(a, b), td.Pareto(c, d)),
    ),
    "pareto_exponential": (
        D.pareto_exponential_kl,
        lambda r: [pos(r), pos(r, 0.5, 4.0), pos(r)],
        lambda a, b, c: (td.Pareto(a, b), td.Exponential(c)),
    ),
    "pareto_gamma": (
        D.pareto_gamma_kl,
        lambda r: [pos(r), pos(r, 0.5, 4.0), pos(r), pos(r)],
        lambda a, b, c, d: (td.Pareto(a, b), td.Gamma(c, d)),
    ),
    "pareto_normal": (
        D.pareto_normal_kl,
        lambda r: [pos(r), pos(r, 1.0, 5.0), real(r), pos(r)],
        lambda a, b, c, d: (td.Pareto(a, b), td.Normal(c, d)),
    ),
    "half_normal": (
        D.half_normal_kl,
        lambda r: [pos(r), pos(r)],
        lambda a, b: (td.HalfNormal(a), td.HalfNormal(b)),
    ),
    "log_normal": (
        D.log_normal_kl,
        lambda r: [real(r), pos(r), real(r), pos(r)],
        lambda a, b, c, d: (td.LogNormal(a, b), td.LogNormal(c, d)),
    ),
    "inverse_gamma": (
        D.inverse_gamma_kl,
        lambda r: [pos(r), pos(r), pos(r), pos(r)],
        lambda a, b, c, d: (td.InverseGamma(a, b), td.InverseGamma(c, d)),
    ),
    "lowrank_mvn_mvn": (
        D.lowrank_mvn_mvn_kl,
        lambda r: (
            [real(r, (3, 4)), real(r, (3, 4, 2)), pos(r, shape=(3, 4))]
            + [real(r, (3, 4)), tril(r, (3,), 4)]
        ),
        lambda a, b, c, d, e: (
            td.LowRankMultivariateNormal(a, b, c),
            td.MultivariateNormal(d, scale_tril=e),
        ),
    ),
    "mvn_lowrank_mvn": (
        D.mvn_lowrank_mvn_kl,
        lambda r: (
            [real(r, (3, 4)), tril(r, (3,), 4)]
            + [real(r, (3, 4)), real(r, (3, 4, 2)), pos(r, shape=(3, 4))]
        ),
        lambda a, b, c, d, e: (
            td.MultivariateNormal(a, scale_tril=b),
            td.LowRankMultivariateNormal(c, d, e),
        ),
    ),
    # families TFP has and torch has not (or not between different parameters): TFP below
    "weibull": (D.weibull_kl, lambda r: [pos(r), pos(r), pos(r), pos(r)], None),
    "weibull_gamma": (D.weibull_gamma_kl, lambda r: [pos(r), pos(r), pos(r), pos(r)], None),
    "chi": (D.chi_kl, lambda r: [pos(r), pos(r)], None),
    "von_mises": (D.von_mises_kl, lambda r: [3 * real(r), pos(r, 0.0, 5.0)] * 2, None),
    "moyal": (D.moyal_kl, lambda r: [real(r), pos(r), real(r), pos(r)], None),
    "gamma_log_rate": (
        lambda a, b, c, d: D.gamma_kl(a, b, c, d, log_rate=True),
        lambda r: [pos(r), real(r), pos(r), real(r)],
        lambda a, b, c, d: (td.Gamma(a, torch.exp(b)), td.Gamma(c, torch.exp(d))),
    ),
}
TORCH_CASES = sorted(n for n, c in CASES.items() if c[2] is not None)


def draw(name, seed):
    return CASES[name][1](np.random.default_rng(seed))


def torch_reference(name, params):
    p, q = CASES[name][2](*T(*params))
    return td.kl_divergence(p, q).numpy()


def assert_same(actual, expected, rtol=1e-12, atol=1e-14):
    """Equal to ``rtol`` (absolute ``atol`` for values near 0), and +inf at the same places."""
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected))
    fin = np.isfinite(expected)
    np.testing.assert_allclose(actual[fin], expected[fin], rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", TORCH_CASES)
def test_matches_torch_distributions(xp, rng, name):
    params = CASES[name][1](rng)
    expected = torch_reference(name, params)
    got = xp.to_numpy(CASES[name][0](*[xp.asarray(a) for a in params]))
    assert_same(got, expected)
    assert (got >= 0).all()


def test_support_rules_give_inf_where_torch_does(rng):
    """Each draw that mixes nested and non-nested supports hits both sides."""
    for name in ("beta_uniform", "uniform_beta", "uniform_exponential", "uniform_gamma"):
        params = CASES[name][1](rng)
        expected = torch_reference(name, params)
        assert np.isinf(expected).any() and np.isfinite(expected).any(), name
    # Pareto's moments: infinite mean (α ≤ 1) against a rate, infinite variance (α ≤ 2)
    # against a normal, as torch
    for fn, args in (
        (D.pareto_kl, (0.3, 3.0, 1.0, 2.0)),
        (D.pareto_exponential_kl, (1.0, 1.0, 2.0)),
        (D.pareto_gamma_kl, (1.0, 0.9, 2.0, 1.0)),
        (D.pareto_normal_kl, (1.0, 2.0, 0.0, 1.0)),
        (D.uniform_pareto_kl, (0.5, 2.0, 1.0, 3.0)),
        (D.continuous_bernoulli_uniform_kl, (0.3, 0.1, 1.0)),
        (D.uniform_continuous_bernoulli_kl, (0.5, 1.2, 0.3)),
    ):
        assert fn(*args) == math.inf, fn.__name__
    torch_inf = [
        (td.Pareto(1.0, 1.0), td.Exponential(2.0)),
        (td.Pareto(1.0, 0.9), td.Gamma(2.0, 1.0)),
        (td.Pareto(1.0, 2.0), td.Normal(0.0, 1.0)),
        (td.Uniform(0.5, 2.0), td.Pareto(1.0, 3.0)),
    ]
    for p, q in torch_inf:
        assert torch.isinf(td.kl_divergence(p, q)) and D.kl(p, q) == math.inf


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_against_finite_differences(rng, name):
    """torch and JAX autograd in float64 against central differences of each element (every
    output depends only on its own batch element), where the value is finite. With h = 1e-6
    the difference carries O(h²·|f‴|) truncation and 2·eps·|f|/h ≈ 4.4e-10·|f| rounding, so
    |autograd − FD| ≤ 1e-6·|FD| + 1e-9·|f| + 1e-7."""
    fn = CASES[name][0]
    params = CASES[name][1](rng)
    value = fn(*params)
    finite = np.isfinite(value)
    ts = [torch.tensor(a, requires_grad=True) for a in params]
    out = fn(*ts)
    out[torch.from_numpy(finite)].sum().backward()
    grads = {"torch": [t.grad.numpy() for t in ts]}
    mask = jnp.asarray(finite)
    jgrads = jax.jit(  # compiled once: eager JAX compiles each operation on its own
        jax.grad(
            lambda *a: jnp.sum(jnp.where(mask, fn(*a), 0.0)), argnums=tuple(range(len(params)))
        )
    )(*[jnp.asarray(a) for a in params])
    grads["jax"] = [np.asarray(g) for g in jgrads]
    h = 1e-6
    for i, base in enumerate(params):
        fd = np.zeros_like(base)
        scale = np.zeros_like(base)
        for j in np.ndindex(base.shape):
            up = [a.copy() for a in params]
            dn = [a.copy() for a in params]
            up[i][j] += h
            dn[i][j] -= h
            k = j[: value.ndim]
            if finite[k]:
                fd[j] = (fn(*up)[k] - fn(*dn)[k]) / (2 * h)
                scale[j] = abs(value[k])
        for backend, g in grads.items():
            assert np.isfinite(g[i]).all(), (name, backend, i)
            err = np.abs(g[i] - fd)
            bound = 1e-6 * np.abs(fd) + 1e-9 * scale + 1e-7
            assert (err <= bound).all(), (name, backend, i, err.max(), g[i], fd)


# ---------------------------------------------------------------------------------------------
# TensorFlow Probability, for the pairs torch does not have
# ---------------------------------------------------------------------------------------------


def import_tfp_numpy():
    """TFP's NumPy substrate, imported after kldiv.torch: TensorFlow loaded before Triton's
    native library makes the process abort (both register the same LLVM options), and
    kldiv.torch loads Triton when it is first used (a categorical KL on torch tensors)."""
    importlib.import_module("kldiv.torch")
    import tensorflow_probability.substrates.numpy as tfp

    return tfp


@pytest.fixture(scope="module")
def tfd():
    return import_tfp_numpy().distributions


TFP_CASES = {
    "weibull": lambda t, a, b, c, d: (t.Weibull(a, b), t.Weibull(c, d)),
    "weibull_gamma": lambda t, a, b, c, d: (t.Weibull(a, b), t.Gamma(c, d)),
    "chi": lambda t, a, b: (t.Chi(a), t.Chi(b)),
    "von_mises": lambda t, a, b, c, d: (t.VonMises(a, b), t.VonMises(c, d)),
    "moyal": lambda t, a, b, c, d: (t.Moyal(a, b), t.Moyal(c, d)),
    "gamma_log_rate": lambda t, a, b, c, d: (t.Gamma(a, log_rate=b), t.Gamma(c, log_rate=d)),
    "pareto": lambda t, a, b, c, d: (t.Pareto(b, a), t.Pareto(d, c)),
    "half_normal": lambda t, a, b: (t.HalfNormal(a), t.HalfNormal(b)),
    "log_normal": lambda t, a, b, c, d: (t.LogNormal(a, b), t.LogNormal(c, d)),
}


@pytest.mark.parametrize("name", sorted(TFP_CASES))
def test_matches_tfp(xp, rng, tfd, name):
    params = CASES[name][1](rng)
    p, q = TFP_CASES[name](tfd, *params)
    expected = np.asarray(tfd.kl_divergence(p, q), dtype=np.float64)
    got = xp.to_numpy(CASES[name][0](*[xp.asarray(a) for a in params]))
    # Moyal: TFP's formula differs from kldiv's arrangement by a cancellation of O(1) terms
    assert_same(got, expected, rtol=1e-12, atol=1e-13)


def test_chi2_is_gamma_and_chi_shares_its_kl(tfd, rng):
    a, b = pos(rng), pos(rng)
    want = np.asarray(tfd.kl_divergence(tfd.Chi2(a), tfd.Chi2(b)))
    assert_same(D.chi_kl(a, b), want)
    assert_same(np.asarray(D.kl(tfd.Chi2(a), tfd.Gamma(b / 2, 0.5))), want)


# ---------------------------------------------------------------------------------------------
# Monte Carlo: every new pair as objects
# ---------------------------------------------------------------------------------------------


def mc_check(p, q, n=100_000, seed=0):
    """|closed − k1| ≤ 5·SE, SE = std(log p − log q)/√n over n draws from P (fixed seed)."""
    exact = np.asarray(D.kl(p, q))
    x = p.sample(n, seed=seed)
    ratio = np.asarray(p.log_prob(x) - q.log_prob(x))
    est, se = ratio.mean(axis=0), ratio.std(axis=0) / math.sqrt(n)
    assert np.isfinite(exact).all()
    assert (np.abs(est - exact) <= 5 * se + 1e-12).all(), (est, exact, se)


OBJECT_PAIRS = [
    (D.Bernoulli(probs=0.3), D.Poisson(0.8)),
    (D.Beta(2.5, 1.3), D.Exponential(1.4)),
    (D.Beta(2.5, 1.3), D.Gamma(1.5, 0.6)),
    (D.Beta(0.7, 1.3), D.Normal(0.2, 0.8)),
    (D.Beta(2.5, 1.3), D.Uniform(-0.5, 1.2)),
    (D.Beta(2.5, 1.3), D.ContinuousBernoulli(probs=0.3)),
    (D.Exponential(1.3), D.Gumbel(0.5, 1.5)),
    (D.Gamma(2.5, 1.3), D.Gumbel(0.5, 1.5)),
    (D.Gamma(2.5, 1.3), D.Normal(1.5, 1.5)),
    (D.Gumbel(0.2, 0.7), D.Normal(0.5, 1.5)),
    (D.Normal(0.2, 0.7), D.Gumbel(0.5, 1.5)),
    (D.Uniform(0.1, 0.7), D.Beta(1.5, 0.6)),
    (D.Uniform(0.1, 0.7), D.Exponential(1.5)),
    (D.Uniform(0.1, 0.7), D.Gamma(1.5, 0.6)),
    (D.Uniform(-0.1, 0.7), D.Gumbel(0.5, 0.6)),
    (D.Uniform(0.1, 0.7), D.ContinuousBernoulli(logits=-1.2)),
    (D.Uniform(1.1, 2.7), D.Pareto(0.9, 1.6)),
    (D.ContinuousBernoulli(probs=0.8), D.ContinuousBernoulli(logits=0.4)),
    (D.ContinuousBernoulli(probs=0.2), D.Exponential(1.5)),
    (D.ContinuousBernoulli(logits=0.3), D.Normal(0.2, 0.6)),
    (D.ContinuousBernoulli(probs=0.2), D.Uniform(-0.2, 1.5)),
    (D.Pareto(1.2, 2.5), D.Pareto(0.9, 1.6)),
    (D.Pareto(1.2, 3.5), D.Exponential(0.6)),
    (D.Pareto(1.2, 3.5), D.Gamma(2.0, 0.6)),
    (D.Pareto(1.2, 5.5), D.Normal(1.0, 1.1)),
    (D.HalfNormal(1.2), D.HalfNormal(0.7)),
    (D.LogNormal(0.2, 0.7), D.LogNormal(-0.3, 1.1)),
    (D.InverseGamma(3.0, 1.2), D.InverseGamma(2.0, 0.7)),
    (D.Chi(3.0), D.Chi(1.5)),
    (D.Weibull(1.7, 1.2), D.Weibull(0.9, 2.0)),
    (D.Weibull(1.7, 1.2), D.Gamma(2.0, 0.9)),
    (D.Moyal(0.3, 1.2), D.Moyal(-0.4, 0.8)),
    (D.Gamma(2.0, log_rate=0.4), D.Gamma(1.2, log_rate=-0.3)),
    (
        D.LowRankMultivariateNormal(np.zeros(3), np.ones((3, 1)), np.ones(3)),
        D.MultivariateNormal(np.full(3, 0.2), np.array([[1.2, 0, 0], [0.3, 0.9, 0], [0, 0.1, 1]])),
    ),
    (
        D.MultivariateNormal(np.full(3, 0.2), np.array([[1.2, 0, 0], [0.3, 0.9, 0], [0, 0.1, 1]])),
        D.LowRankMultivariateNormal(np.zeros(3), np.ones((3, 1)), np.ones(3)),
    ),
    (
        D.DiagNormal(np.array([0.1, -0.3, 0.2]), np.array([0.2, -0.5, 0.1])),
        D.MultivariateNormal(np.zeros(3), np.array([[1.2, 0, 0], [0.3, 0.9, 0], [0, 0.1, 1]])),
    ),
    (
        D.MultivariateNormal(np.zeros(3), np.array([[1.2, 0, 0], [0.3, 0.9, 0], [0, 0.1, 1]])),
        D.DiagNormal(np.array([0.1, -0.3, 0.2]), np.array([0.2, -0.5, 0.1])),
    ),
    (
        D.DiagNormal(np.array([0.1, -0.3, 0.2]), np.array([0.2, -0.5, 0.1])),
        D.LowRankMultivariateNormal(np.zeros(3), np.ones((3, 1)), np.ones(3)),
    ),
    (
        D.LowRankMultivariateNormal(np.zeros(3), np.ones((3, 1)), np.ones(3)),
        D.DiagNormal(np.array([0.1, -0.3, 0.2]), np.array([0.2, -0.5, 0.1])),
    ),
    (
        D.Wishart(4.5, np.array([[1.0, 0.0], [0.4, 0.8]])),
        D.Wishart(3.2, np.array([[1.3, 0.0], [-0.2, 0.6]])),
    ),
    (
        D.Independent(D.Gamma(np.array([2.0, 3.0]), 1.3), 1),
        D.Independent(D.Gamma(np.array([1.0, 2.5]), 0.8), 1),
    ),
    (
        D.OneHotCategorical(probs=np.array([0.2, 0.5, 0.3])),
        D.OneHotCategorical(logits=np.array([0.0, 1.0, -1.0])),
    ),
]


@pytest.mark.parametrize(("p", "q"), OBJECT_PAIRS, ids=lambda d: type(d).__name__)
def test_closed_forms_against_monte_carlo(p, q):
    mc_check(p, q)


def test_von_mises_against_quadrature(rng):
    """The trapezoid rule on a full period of a smooth periodic integrand converges
    geometrically; 2000 nodes leave far below 1e-12 for κ ≤ 5."""
    m1, k1, m2, k2 = CASES["von_mises"][1](rng)
    x = np.linspace(-np.pi, np.pi, 2000, endpoint=False)[:, None, None]
    p, q = D.VonMises(m1, k1), D.VonMises(m2, k2)
    lp, lq = np.asarray(p.log_prob(x)), np.asarray(q.log_prob(x))
    quad = np.mean(np.exp(lp) * (lp - lq), axis=0) * 2 * np.pi
    np.testing.assert_allclose(D.kl(p, q), quad, rtol=1e-12, atol=1e-14)
    # κ = 0 is the uniform distribution on the circle
    assert D.von_mises_kl(0.3, 0.0, -1.0, 0.0) == 0.0


# ---------------------------------------------------------------------------------------------
# The continuous Bernoulli at λ = ½, where the naive formulas cancel
# ---------------------------------------------------------------------------------------------


def test_continuous_bernoulli_log_normaliser_and_moments_against_mpmath():
    mpmath.mp.dps = 50
    etas = [0.0, 1e-12, -3e-7, 1e-3, -0.2, 0.5, -0.999, 1.0, 1.001, 3.0, -30.0, 700.0, -800.0]

    def exact(e):
        e = mpmath.mpf(e)
        if e == 0:
            return 0.0, 0.5, 1 / 12
        a = mpmath.log(mpmath.expm1(e) / e)
        m = 1 / (1 - mpmath.exp(-e)) - 1 / e
        v = 1 / e**2 - 1 / (4 * mpmath.sinh(e / 2) ** 2)
        return float(a), float(m), float(v)

    x = np.array(etas)
    got = [_special.cb_log_normalizer(np, x), _special.cb_mean(np, x), _special.cb_variance(np, x)]
    want = np.array([exact(e) for e in etas]).T
    for g, w in zip(got, want, strict=True):
        # a few eps: the series below |η| = 1 truncates below 1e-19, the closed forms above
        # it cancel at most a factor 1/(η²·Var) ≤ 13 for the variance
        np.testing.assert_allclose(g, w, rtol=64 * EPS, atol=1e-300)
    # the KL is smooth through λ = ½ and exactly 0 for equal parameters
    assert D.continuous_bernoulli_kl(0.5, 0.5) == 0.0
    near = D.continuous_bernoulli_kl(0.5 + 1e-9, 0.5)
    assert 0 < near < 1e-16


# ---------------------------------------------------------------------------------------------
# Every pair torch.distributions registers, through kl() on torch objects
# ---------------------------------------------------------------------------------------------


def _torch_instances(seed):
    r = np.random.default_rng(seed)

    def t(*shape, lo=0.3, hi=3.0):
        return torch.tensor(r.uniform(lo, hi, shape or S))

    def n(*shape):
        return torch.tensor(r.normal(size=shape or S))

    k = 3
    lt = torch.tensor(tril(r, (), k))
    return {
        td.Bernoulli: td.Bernoulli(t(lo=0.05, hi=0.95)),
        td.Beta: td.Beta(t(), t()),
        td.Binomial: td.Binomial(5, t(lo=0.05, hi=0.95)),
        td.Categorical: td.Categorical(logits=n(4, 3, 5)),
        td.Cauchy: td.Cauchy(n(), t()),
        td.ContinuousBernoulli: td.ContinuousBernoulli(torch.tensor(cb_probs(r))),
        td.Dirichlet: td.Dirichlet(t(4, 3, 5)),
        td.Exponential: td.Exponential(t()),
        td.ExponentialFamily: td.Wishart(torch.tensor(4.5), scale_tril=lt),
        td.Gamma: td.Gamma(t(), t()),
        td.Geometric: td.Geometric(t(lo=0.05, hi=0.95)),
        td.Gumbel: td.Gumbel(n(), t()),
        td.HalfNormal: td.HalfNormal(t()),
        td.Independent: td.Independent(td.Normal(n(4, 3, 2), t(4, 3, 2)), 1),
        td.Laplace: td.Laplace(n(), t()),
        td.LowRankMultivariateNormal: td.LowRankMultivariateNormal(
            n(4, 3, k), n(4, 3, k, 2), t(4, 3, k)
        ),
        td.MultivariateNormal: td.MultivariateNormal(
            n(4, 3, k), scale_tril=torch.tensor(tril(r, S, k))
        ),
        td.Normal: td.Normal(n(), t()),
        td.OneHotCategorical: td.OneHotCategorical(logits=n(4, 3, 5)),
        td.Pareto: td.Pareto(t(), t()),
        td.Poisson: td.Poisson(t()),
        td.TransformedDistribution: td.TransformedDistribution(
            td.Normal(n(), t()), [td.ExpTransform()]
        ),
        td.Uniform: (lambda lo: td.Uniform(lo, lo + t()))(n()),
    }


def test_every_torch_registered_pair_is_computed():
    """For each of the pairs torch registers, kl() on torch objects gives torch's value (to
    1e-12 relative, +inf at the same places); the generic exponential-family pair is exercised
    by the one torch class that reaches it, the Wishart."""
    from torch.distributions.kl import _KL_REGISTRY

    pairs = sorted(_KL_REGISTRY, key=lambda pq: (pq[0].__name__, pq[1].__name__))
    assert len(pairs) >= 87
    first, second = _torch_instances(1), _torch_instances(2)
    for tp, tq in pairs:
        p, q = first[tp], second[tq]
        ours = D.kl(p, q)
        theirs = td.kl_divergence(p, q)
        assert isinstance(ours, torch.Tensor), (tp, tq)
        assert_same(ours.detach().numpy(), theirs.detach().numpy())


def test_wishart_matches_torch_element_by_element(rng):
    """torch's Wishart KL (its generic exponential-family Bregman divergence) sums its
    degrees-of-freedom term over the batch when the batch is not empty, so it is compared one
    element at a time."""
    n_p, n_q = rng.uniform(3.0, 6.0, 4), rng.uniform(3.0, 6.0, 4)
    lp, lq = tril(rng, (4,), 3), tril(rng, (4,), 3)
    got = D.wishart_kl(n_p, lp, n_q, lq)
    for i in range(4):
        p = td.Wishart(torch.tensor(n_p[i]), scale_tril=torch.tensor(lp[i]))
        q = td.Wishart(torch.tensor(n_q[i]), scale_tril=torch.tensor(lq[i]))
        assert got[i] == pytest.approx(float(td.kl_divergence(p, q).detach()), rel=1e-12)
    assert D.wishart_kl(n_p, lp, n_p, lp) == pytest.approx(np.zeros(4), abs=1e-13)


# ---------------------------------------------------------------------------------------------
# Wrappers and point masses
# ---------------------------------------------------------------------------------------------


def test_independent_sums_and_transformed_reads_the_base(rng):
    a, b = pos(rng), pos(rng)
    per = D.gamma_kl(a, 1.3, b, 0.7)
    got = D.kl(D.Independent(D.Gamma(a, 1.3), 2), D.Independent(D.Gamma(b, 0.7), 2))
    assert got == pytest.approx(per.sum(), rel=1e-14)
    lp = D.Transformed(D.Normal(0.2, 1.3), "exp")
    assert D.kl(lp, D.Transformed(D.Normal(-0.1, 0.6), "exp")) == pytest.approx(
        float(D.log_normal_kl(0.2, 1.3, -0.1, 0.6)), rel=1e-15
    )
    with pytest.raises(NotImplementedError, match="different transforms"):
        D.kl(lp, D.Transformed(D.Normal(-0.1, 0.6), "sigmoid"))
    with pytest.raises(NotImplementedError, match="Transformed.sample is not implemented"):
        D.kl(lp, D.LogNormal(0.0, 1.0), samples=10, seed=0)
    # a DiagNormal meets an Independent as the Independent normals it is
    m, lv = real(rng, (3,)), real(rng, (3,))
    ind = D.Independent(D.Normal(np.zeros(3), 1.0), 1)
    assert D.kl(D.DiagNormal(m, lv), ind) == pytest.approx(D.diag_normal_kl(m, lv), rel=1e-14)


def test_deterministic_against_discrete_families_and_itself():
    q = D.Poisson(np.array([0.5, 2.0]))
    np.testing.assert_allclose(D.kl(D.Deterministic(3.0), q), -np.asarray(q.log_prob(3.0)))
    assert D.kl(D.Deterministic(1.0), D.Bernoulli(probs=0.25)) == pytest.approx(math.log(4))
    assert D.kl(D.Deterministic(2.0), D.Bernoulli(probs=0.25)) == math.inf
    pair = D.kl(D.Deterministic(np.array([1.0, 2.0])), D.Deterministic(1.0))
    np.testing.assert_array_equal(pair, [0.0, math.inf])
    with pytest.raises(ValueError, match="discrete with a continuous"):
        D.kl(D.Deterministic(1.0), D.Normal(0.0, 1.0))
    # gradients reach Q's parameters
    rate = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    D.kl(D.Deterministic(3.0), D.Poisson(rate)).sum().backward()
    np.testing.assert_allclose(rate.grad.numpy(), 1 - 3.0 / rate.detach().numpy(), rtol=1e-14)


def test_gamma_log_rate_object_and_registry(rng):
    a, lr, b = pos(rng), real(rng), pos(rng)
    by_log = D.kl(D.Gamma(a, log_rate=lr), D.Gamma(b, 0.7))
    np.testing.assert_allclose(by_log, D.gamma_kl(a, np.exp(lr), b, 0.7), rtol=1e-13)
    # rates far outside the floating range stay exact through their logs
    assert D.gamma_kl(2.0, 800.0, 2.0, 800.0, log_rate=True) == 0.0
    with pytest.raises(ValueError, match="at most one of `rate=` and `log_rate=`"):
        D.Gamma(1.0, 2.0, log_rate=0.1)
    assert float(D.Gamma(2.0).arrays()[1][1]) == 1.0
    for other in (D.Exponential(1.5), D.Normal(0.3, 1.0), D.Gumbel(0.3, 1.0)):
        assert D.kl(D.Gamma(2.0, log_rate=0.3), other) == pytest.approx(
            float(D.kl(D.Gamma(2.0, math.exp(0.3)), other)), rel=1e-14
        )


def test_registry_lists_every_pair_and_infinite_supports():
    pairs = D.registered_pairs()
    assert len(pairs) == len(set(pairs)) == len(registry._REGISTRY)
    for pair in (
        "Pareto || Pareto",
        "ContinuousBernoulli || Normal",
        "Wishart || Wishart",
        "Independent || Independent",
        "Transformed || Transformed",
        "DiagNormal || MultivariateNormal",
        "Deterministic || Poisson",
    ):
        assert pair in pairs
    # support rules, without a registered pair: +inf like torch
    for p, q in (
        (D.Normal(0.0, 1.0), D.Pareto(1.0, 2.0)),
        (D.Gamma(2.0, 1.0), D.Pareto(1.0, 2.0)),
        (D.Beta(2.0, 2.0), D.Pareto(1.0, 2.0)),
        (D.Pareto(1.0, 2.0), D.Uniform(0.0, 5.0)),
        (D.Pareto(1.0, 2.0), D.Beta(2.0, 2.0)),
        (D.Laplace(0.0, 1.0), D.ContinuousBernoulli(probs=0.3)),
        (D.Exponential(1.0), D.ContinuousBernoulli(probs=0.3)),
        (D.HalfNormal(1.0), D.Pareto(1.0, 3.0)),
    ):
        assert D.kl(p, q) == math.inf, (p, q)


def test_float32_and_half_precision_follow_the_policy(xp, rng):
    a, b = pos(rng), pos(rng)
    for fn, args in (
        (D.continuous_bernoulli_kl, (a / 4, b / 4)),
        (D.weibull_kl, (a, b, b, a)),
        (D.von_mises_kl, (a, b, b, a)),
        (D.uniform_gumbel_kl, (a, a + b, b, a)),
    ):
        out32 = fn(*[xp.asarray(x, "float32") for x in args])
        assert xp.dtype_name(out32) == "float32"
        np.testing.assert_allclose(xp.to_numpy(out32), fn(*args), rtol=2e-5, atol=1e-6)
        assert xp.dtype_name(fn(*[xp.asarray(x, "bfloat16") for x in args])) == "float32"


@pytest.mark.parametrize(
    ("fn", "args", "value"),
    [
        # Bernoulli(0) is the point mass at 0: −log Q(0) = λ; Poisson(0) against p > 0: +inf
        (D.bernoulli_poisson_kl, ([0.0, 0.3, 1.0], [1.5, 0.0, 2.0]), [1.5, math.inf, None]),
        # intervals touching 0 and 1: 0·log 0 = 0
        (D.uniform_beta_kl, ([0.0, 0.2], [0.5, 1.0], [0.7, 2.0], [1.5, 0.6]), [None, None]),
        (D.uniform_gamma_kl, ([0.0], [0.5], [0.7], [1.5]), [None]),
        (D.uniform_pareto_kl, ([1.0], [2.0], [1.0], [2.5]), [None]),
        (D.pareto_kl, ([1.0], [2.0], [1.0], [2.0]), [0.0]),
        (D.von_mises_kl, ([0.3], [0.0], [1.0], [2.0]), [None]),
        (D.continuous_bernoulli_kl, ([0.5], [0.5]), [0.0]),
    ],
)
def test_boundary_values_and_finite_gradients(fn, args, value):
    """Exact values at the boundaries, and finite gradients wherever the value is finite, on
    torch and JAX (the JAX gradient compiled once: eager JAX compiles op by op)."""
    params = [np.array(a) for a in args]
    got = fn(*params)
    for g, v in zip(got, value, strict=True):
        assert (v is None and np.isfinite(g)) or g == pytest.approx(v, rel=1e-15, abs=0)
    finite = np.isfinite(got)
    ts = [torch.tensor(a, requires_grad=True) for a in params]
    fn(*ts)[torch.from_numpy(finite)].sum().backward()
    mask = jnp.asarray(finite)
    jgrads = jax.jit(
        jax.grad(
            lambda *a: jnp.sum(jnp.where(mask, fn(*a), 0.0)), argnums=tuple(range(len(params)))
        )
    )(*[jnp.asarray(a) for a in params])
    for t, jg in zip(ts, jgrads, strict=True):
        assert torch.isfinite(t.grad).all(), t.grad
        np.testing.assert_allclose(np.asarray(jg), t.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_jit_and_vmap(rng):
    for name in ("continuous_bernoulli_normal", "uniform_beta", "pareto_normal", "von_mises"):
        fn, params = CASES[name][0], CASES[name][1](rng)
        ref = fn(*params)
        jitted = jax.jit(fn)(*[jnp.asarray(a) for a in params])
        assert_same(np.asarray(jitted), ref, rtol=1e-12, atol=1e-13)
        mapped = jax.vmap(fn)(*[jnp.asarray(a) for a in params])
        assert_same(np.asarray(mapped), ref, rtol=1e-12, atol=1e-13)
