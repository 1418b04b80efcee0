"""kl(P, Q) on other libraries' distribution objects, against those libraries' own KL.

torch.distributions: every pair that torch and kldiv both compute, float64, values to 1e-12
relative (inf where both say inf) and gradients with respect to the objects' parameter
tensors to 1e-10 relative (1e-12 absolute). TFP on NumPy: every pair TFP and kldiv both
compute, values to 1e-12 relative. TFP on JAX and distrax: the same, plus ``jax.grad`` and
``jax.jit`` through the parameters, where they import beside the installed JAX; where they do
not, the tests assert that the import fails with an ImportError or AttributeError and print
it (``-s``), and have nothing more to compare. TFP on TensorFlow: the same pairs, values to
1e-12 relative as tf.Tensor, ``tf.GradientTape`` gradients with respect to the objects'
tf.Variables against TFP's own to 1e-10, float32 in float32 out, broadcast batch shapes, and
``tf.function`` with XLA.

Parameters are drawn from a NumPy generator with a fixed seed per family and pair.
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys
import zlib

import numpy as np
import pytest
import scipy.stats

from kldiv import distributions as D
from kldiv.distributions import interop

S = (4, 3)  # batch shape of scalar families
K = 3  # event size of vector families (batch shape (4,))
# Values: 1e-12 relative, with a 1e-15 absolute floor for KLs near 0, which are differences of
# O(1) terms (a KL of 7e-6 agrees to 2e-17 absolute, 3e-12 relative).
RTOL_VALUE, ATOL_VALUE = 1e-12, 1e-15
RTOL_GRAD, ATOL_GRAD = 1e-10, 1e-12


def rng_for(*names: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("/".join(names).encode()))


def pos(r, shape=S, lo=0.3, hi=3.0):
    return r.uniform(lo, hi, shape)


def unit(r, shape=S):
    return r.uniform(0.05, 0.95, shape)


def tril(r, batch=(4,), k=K):
    a = np.tril(r.normal(size=(*batch, k, k)), -1)
    return a + np.eye(k) * r.uniform(0.5, 2.0, (*batch, k))[..., None, :]


def simplex(r, shape=(4, 5)):
    return r.dirichlet(np.ones(shape[-1]), shape[:-1])


def lower_flags(table, name: str, n: int) -> list[bool]:
    """Which parameters are lower-triangular scale factors (the second of a "mvn" draw)."""
    return [table[name][0] == "mvn" and i == 1 for i in range(n)]


def assert_grads(ours, theirs, lower: list[bool]) -> None:
    """Gradients to RTOL_GRAD/ATOL_GRAD; of a triangular scale factor only on its lower
    triangle: the upper one is no parameter (kldiv never reads it, a reference that
    multiplies full matrices differentiates its zeros)."""
    for go, gt, tri in zip(ours, theirs, lower, strict=True):
        go, gt = np.asarray(go, dtype=np.float64), np.asarray(gt, dtype=np.float64)
        if tri:
            go, gt = np.tril(go), np.tril(gt)
        np.testing.assert_allclose(go, gt, rtol=RTOL_GRAD, atol=ATOL_GRAD)


def assert_reads_alike(obj, to_numpy, points=None, rtol=1e-12, **sample_kw) -> None:
    """The kldiv object read from ``obj`` has ``obj``'s log-density (to 1e-12) at draws of its
    own (or at ``points``, for a family kldiv does not sample): the parameters were read with
    the right meaning, also where the package has no KL."""
    mine = interop.as_kldiv(obj)
    x = mine.sample(5, **sample_kw) if points is None else points
    np.testing.assert_allclose(
        to_numpy(mine.log_prob(x)), to_numpy(obj.log_prob(x)), rtol=rtol, atol=rtol
    )


ANGLES = np.linspace(-3.0, 3.0, 5)[:, None, None]  # points for the von Mises, batch (4, 3)


# name -> (draw(rng) -> list of float64 arrays, the parameters). The Uniform intervals are
# drawn so that about half of the pairs are nested (finite KL) and half not (+inf).
DRAWS = {
    "loc_scale": lambda r: [r.normal(size=S), pos(r)],
    "student_t": lambda r: [pos(r, lo=1.5, hi=6.0), r.normal(size=S), pos(r)],
    "uniform": lambda r: [r.uniform(-2.0, 0.0, S), r.uniform(0.5, 2.5, S)],
    "rate": lambda r: [pos(r)],
    "two_pos": lambda r: [pos(r), pos(r)],
    "dirichlet": lambda r: [pos(r, (4, K))],
    "unit": lambda r: [unit(r)],
    "logit": lambda r: [2 * r.normal(size=S)],
    "simplex": lambda r: [simplex(r)],
    "logits5": lambda r: [r.normal(size=(4, 5))],
    "mvn": lambda r: [r.normal(size=(4, K)), tril(r)],
    "mvn_cov": lambda r: [r.normal(size=(4, K)), (lambda L: L @ np.swapaxes(L, -1, -2))(tril(r))],
    "lowrank": lambda r: [r.normal(size=(4, K)), r.normal(size=(4, K, 2)), pos(r, (4, K))],
    "diag": lambda r: [r.normal(size=(4, K)), pos(r, (4, K))],
    "binary": lambda r: [r.integers(0, 2, S).astype(np.float64)],
    # continuous Bernoulli: torch's (and TFP's) formulas cancel near λ = ½, losing about
    # eps/η² absolute (1.3e-11 relative at η = 0.013), so the draws keep |η| ≥ 0.2 here;
    # kldiv's accuracy at λ = ½ is tested against mpmath in test_pairs.py
    "cb_probs": lambda r: [np.where(r.random(S) < 0.5, 1.0, -1.0) * r.uniform(0.05, 0.45, S) + 0.5],
    "cb_logits": lambda r: [np.where(r.random(S) < 0.5, 1.0, -1.0) * r.uniform(0.2, 4.0, S)],
}

# Read without a density kldiv can evaluate (a transform kldiv does not apply), or without a
# sampler (the von Mises, evaluated on a grid of angles instead)
NO_DENSITY = {"HalfCauchy", "Transformed(Normal, exp)", "LogitNormal", "Transformed(Normal, Exp)"}
NO_SAMPLER = {"VonMises"}


# ---------------------------------------------------------------------------------------------
# torch.distributions
# ---------------------------------------------------------------------------------------------

try:  # the suite installs torch; the TFP and distrax checks below also run without it
    import torch
    import torch.distributions as td
except ImportError:  # pragma: no cover
    torch = td = None

# name -> (draw, build from float64 tensors)
TORCH = (
    {}
    if td is None
    else {
        "Normal": ("loc_scale", lambda a, b: td.Normal(a, b)),
        "Laplace": ("loc_scale", lambda a, b: td.Laplace(a, b)),
        "Gumbel": ("loc_scale", lambda a, b: td.Gumbel(a, b)),
        "Cauchy": ("loc_scale", lambda a, b: td.Cauchy(a, b)),
        "StudentT": ("student_t", lambda v, a, b: td.StudentT(v, a, b)),
        "Uniform": ("uniform", lambda a, b: td.Uniform(a, b)),
        "Exponential": ("rate", lambda a: td.Exponential(a)),
        "Gamma": ("two_pos", lambda a, b: td.Gamma(a, b)),
        "Beta": ("two_pos", lambda a, b: td.Beta(a, b)),
        "Dirichlet": ("dirichlet", lambda a: td.Dirichlet(a)),
        "Bernoulli(probs)": ("unit", lambda a: td.Bernoulli(probs=a)),
        "Bernoulli(logits)": ("logit", lambda a: td.Bernoulli(logits=a)),
        "Categorical(probs)": ("simplex", lambda a: td.Categorical(probs=a)),
        "Categorical(logits)": ("logits5", lambda a: td.Categorical(logits=a)),
        "Poisson": ("rate", lambda a: td.Poisson(a)),
        "Geometric(probs)": ("unit", lambda a: td.Geometric(probs=a)),
        "Geometric(logits)": ("logit", lambda a: td.Geometric(logits=a)),
        "Binomial(probs)": ("unit", lambda a: td.Binomial(7, probs=a)),
        "Binomial(logits)": ("logit", lambda a: td.Binomial(torch.full(S, 7.0), logits=a)),
        "MultivariateNormal": ("mvn", lambda a, b: td.MultivariateNormal(a, scale_tril=b)),
        "MultivariateNormal(cov)": ("mvn_cov", lambda a, b: td.MultivariateNormal(a, b)),
        "LowRankMultivariateNormal": (
            "lowrank",
            lambda a, b, c: td.LowRankMultivariateNormal(a, b, c),
        ),
        "Independent(Normal)": ("diag", lambda a, b: td.Independent(td.Normal(a, b), 1)),
        "Independent(Gamma)": ("two_pos", lambda a, b: td.Independent(td.Gamma(a, b), 1)),
        "Chi2": ("rate", lambda a: td.Chi2(a)),
        "Pareto": ("two_pos", lambda a, b: td.Pareto(a, b)),
        "ContinuousBernoulli(probs)": ("cb_probs", lambda a: td.ContinuousBernoulli(probs=a)),
        "ContinuousBernoulli(logits)": ("cb_logits", lambda a: td.ContinuousBernoulli(logits=a)),
        "HalfNormal": ("rate", lambda a: td.HalfNormal(a)),
        "HalfCauchy": ("rate", lambda a: td.HalfCauchy(a)),
        "LogNormal": ("loc_scale", lambda a, b: td.LogNormal(a, b)),
        "InverseGamma": ("two_pos", lambda a, b: td.InverseGamma(a, b)),
        "Weibull": ("two_pos", lambda a, b: td.Weibull(a, b)),
        "VonMises": ("loc_scale", lambda a, b: td.VonMises(a, b)),
        "OneHotCategorical(probs)": ("simplex", lambda a: td.OneHotCategorical(probs=a)),
        "OneHotCategorical(logits)": ("logits5", lambda a: td.OneHotCategorical(logits=a)),
        "Transformed(Normal, exp)": (
            "loc_scale",
            lambda a, b: td.TransformedDistribution(td.Normal(a, b), [td.ExpTransform()]),
        ),
    }
)


def torch_dist(name: str, *seed: str):
    draw, build = TORCH[name]
    leaves = [
        torch.tensor(x, dtype=torch.float64, requires_grad=True)
        for x in DRAWS[draw](rng_for(name, *seed))
    ]
    return build(*leaves), leaves


def _computes(fn) -> bool:
    try:
        fn()
    except NotImplementedError:
        return False
    return True


# torch computes a KL between two Weibulls only for equal parameters (it compares their
# transforms, which hold the parameters): 0, nothing to compare
TORCH_EQUAL_ONLY = {("Weibull", "Weibull")}


def _torch_pairs() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(pairs both compute, pairs only torch computes), from one draw of every family."""
    both, torch_only = [], []
    made = {n: torch_dist(n, "probe")[0] for n in TORCH}
    for a in TORCH:
        for b in TORCH:
            p, q = made[a], made[b]
            if (a, b) in TORCH_EQUAL_ONLY:
                continue
            if tuple(p.batch_shape) != tuple(q.batch_shape) or p.event_shape != q.event_shape:
                continue
            if not _computes(lambda p=p, q=q: td.kl_divergence(p, q)):
                continue
            (both if _computes(lambda p=p, q=q: D.kl(p, q)) else torch_only).append((a, b))
    return both, torch_only


TORCH_BOTH, TORCH_ONLY = _torch_pairs()
# Of the pairs torch computes between the families above, those kldiv does not: LogNormal
# against the same law written as a TransformedDistribution (torch compares the transforms
# only), and the diagonal normal against an Independent of another family, e.g.
# Independent(Normal, 1) ‖ Independent(Gamma, 1) (+inf), which kldiv reads as DiagNormal.
N_TORCH_BOTH = 148


def test_torch_pairs_cover_every_registered_kldiv_pair():
    """Each kldiv pair whose two families torch reads, and torch has a KL for, is compared."""
    pytest.importorskip("torch")
    kinds = {type(interop.as_kldiv(torch_dist(n, "probe")[0])).__name__ for n in TORCH}
    compared = {
        f"{type(interop.as_kldiv(torch_dist(a, 'probe')[0])).__name__} || "
        f"{type(interop.as_kldiv(torch_dist(b, 'probe')[0])).__name__}"
        for a, b in TORCH_BOTH
    }
    # torch has no KL between Student's t, nor of a Geometric against a bounded count, nor
    # between a diagonal normal (Independent(Normal, 1)) and a full or low-rank one, nor for
    # the families it does not have (Chi, Moyal; a Weibull only against the same Weibull)
    torch_lacks = {
        "StudentT || StudentT",
        "Geometric || Bernoulli",
        "Geometric || Binomial",
        "DiagNormal || MultivariateNormal",
        "MultivariateNormal || DiagNormal",
        "DiagNormal || LowRankMultivariateNormal",
        "LowRankMultivariateNormal || DiagNormal",
        "Weibull || Weibull",
        "Weibull || Gamma",
        "VonMises || VonMises",
    }
    wanted = {
        pair for pair in D.registered_pairs() if all(side in kinds for side in pair.split(" || "))
    } - torch_lacks
    assert wanted <= compared, sorted(wanted - compared)
    assert len(TORCH_BOTH) == N_TORCH_BOTH, len(TORCH_BOTH)


@pytest.mark.parametrize("pair", TORCH_BOTH, ids=[f"{a}-{b}" for a, b in TORCH_BOTH])
def test_torch_objects_match_torch_kl(pair):
    a, b = pair
    p, leaves_p = torch_dist(a, "P", b)
    q, leaves_q = torch_dist(b, "Q", a)
    leaves = leaves_p + leaves_q
    ours, theirs = D.kl(p, q), td.kl_divergence(p, q)
    assert isinstance(ours, torch.Tensor) and ours.dtype == torch.float64
    assert ours.shape == theirs.shape
    o, t = ours.detach().numpy(), theirs.detach().numpy()
    np.testing.assert_allclose(o, t, rtol=RTOL_VALUE, atol=ATOL_VALUE)
    finite = torch.from_numpy(np.isfinite(t))
    if not finite.any():
        return
    g_ours = torch.autograd.grad(
        ours[finite].sum(), leaves, allow_unused=True, retain_graph=True
    )  # torch caches derived parameters (logits, scale_tril): the graphs share them
    g_theirs = torch.autograd.grad(theirs[finite].sum(), leaves, allow_unused=True)
    g_ours = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, g_ours, strict=True)]
    g_theirs = [
        torch.zeros_like(x) if g is None else g for x, g in zip(leaves, g_theirs, strict=True)
    ]
    lower = lower_flags(TORCH, a, len(leaves_p)) + lower_flags(TORCH, b, len(leaves_q))
    assert_grads([g.detach() for g in g_ours], [g.detach() for g in g_theirs], lower)


@pytest.mark.parametrize("pair", TORCH_ONLY, ids=[f"{a}-{b}" for a, b in TORCH_ONLY])
def test_torch_pair_kldiv_cannot_compute_lists_the_pairs_it_can(pair):
    a, b = pair
    p, q = torch_dist(a, "P"), torch_dist(b, "Q")
    with pytest.raises(NotImplementedError, match="No closed-form KL") as e:
        D.kl(p[0], q[0])
    assert "Pairs with a closed form: " in str(e.value)
    assert "Normal || Normal" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", sorted(set(TORCH) - NO_DENSITY))
def test_torch_objects_read_alike(name):
    p, _ = torch_dist(name, "read")
    points = torch.tensor(ANGLES) if name in NO_SAMPLER else None
    # torch's von Mises evaluates log I₀ by polynomial approximations (Abramowitz & Stegun
    # 9.8.1–9.8.2, relative error below 2e-7); kldiv by the backend's i0e
    rtol = 1e-6 if name == "VonMises" else 1e-12
    assert_reads_alike(p, lambda t: t.detach().numpy(), points, rtol=rtol, seed=0)


def test_torch_logits_stay_logits():
    """A logits-built Bernoulli/Categorical is read from its logits, even after torch has
    cached the derived probs (which saturate to 0 and 1 here)."""
    pytest.importorskip("torch")
    x = torch.tensor([40.0, -40.0, 3.0], dtype=torch.float64)
    y = torch.tensor([-40.0, 40.0, -2.0], dtype=torch.float64)
    p, q = td.Bernoulli(logits=x), td.Bernoulli(logits=y)
    _ = p.probs, q.probs  # cache the lossy copies
    assert interop.as_kldiv(p).form == "logits"
    expected = D.bernoulli_kl(x, y, form="logits")
    torch.testing.assert_close(D.kl(p, q), expected, rtol=0, atol=0)
    assert torch.all(torch.isfinite(D.kl(p, q)))
    pp = td.Bernoulli(probs=torch.tensor([0.0, 1.0, 0.3], dtype=torch.float64))
    _ = pp.logits
    assert interop.as_kldiv(pp).form == "probs"
    c = td.Categorical(logits=torch.tensor([[50.0, -50.0, 0.0]], dtype=torch.float64))
    _ = c.probs
    assert interop.as_kldiv(c).form == "logits"


def test_torch_mixed_with_kldiv_objects():
    pytest.importorskip("torch")
    loc = torch.tensor([0.1, 0.5], dtype=torch.float64, requires_grad=True)
    p = td.Normal(loc, torch.tensor(1.5, dtype=torch.float64))
    got = D.kl(p, D.Normal(0.0, 1.0))  # Python numbers take the torch dtype
    torch.testing.assert_close(got, td.kl_divergence(p, td.Normal(0.0, 1.0)), rtol=1e-12, atol=0)
    (g,) = torch.autograd.grad(got.sum(), [loc])
    torch.testing.assert_close(g, loc.detach(), rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match="one framework"):
        D.kl(p, D.Normal(np.array([0.0, 1.0]), 1.0))


def test_torch_unsupported_classes_say_what_is_read():
    pytest.importorskip("torch")
    with pytest.raises(TypeError, match="torch.distributions LKJCholesky") as e:
        D.kl(td.LKJCholesky(3, 1.0), td.LKJCholesky(3, 2.0))
    msg = str(e.value)
    assert "\n" not in msg and "Normal" in msg and "MultivariateNormal" in msg
    ind = td.Independent(td.LKJCholesky(3, torch.ones(2)), 1)
    with pytest.raises(TypeError, match="LKJCholesky"):
        D.kl(ind, ind)
    folded = td.TransformedDistribution(td.Normal(0.0, 1.0), [td.AbsTransform()])
    with pytest.raises(TypeError, match="one-to-one.*AbsTransform"):
        D.kl(folded, folded)
    with pytest.raises(TypeError, match="two kldiv.distributions objects"):
        D.kl(object(), td.Normal(0.0, 1.0))


def test_torch_independent_two_axes_and_zero():
    pytest.importorskip("torch")
    f64 = {"dtype": torch.float64}
    base = td.Normal(torch.zeros(2, 3, **f64), torch.ones(2, 3, **f64))
    other = td.Normal(torch.full((2, 3), 0.5, **f64), torch.full((2, 3), 2.0, **f64))
    p, q = td.Independent(base, 2), td.Independent(other, 2)
    assert isinstance(interop.as_kldiv(p), D.Independent)
    torch.testing.assert_close(D.kl(p, q), td.kl_divergence(p, q), rtol=1e-12, atol=0)
    assert D.kl(p, q).shape == ()
    assert isinstance(interop.as_kldiv(td.Independent(base, 0)), D.Normal)
    kp, kq = D.Independent(D.Normal(np.zeros((2, 3)), 1.0), 1), D.Independent(D.Normal(1.0, 1.0), 2)
    with pytest.raises(NotImplementedError, match="reinterpreted_batch_ndims"):
        D.kl(kp, kq)


def test_torch_monte_carlo_fallback_on_foreign_objects():
    pytest.importorskip("torch")
    p = td.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    q = td.StudentT(torch.tensor(3.0, dtype=torch.float64))
    est = D.kl(p, q, samples=20_000, seed=0)
    assert isinstance(est, torch.Tensor) and 0.0 < float(est) < 0.1


# ---------------------------------------------------------------------------------------------
# TensorFlow Probability and distrax: which import here
# ---------------------------------------------------------------------------------------------

_PROBES = {
    "tfp_numpy": "import tensorflow_probability as t, tensorflow_probability.substrates.numpy; "
    "print('tensorflow-probability', t.__version__)",
    "tfp_jax": "import jax, tensorflow_probability as t, tensorflow_probability.substrates.jax; "
    "print('tensorflow-probability', t.__version__, 'jax', jax.__version__)",
    "distrax": "import jax, distrax; print('distrax', distrax.__version__, 'jax', jax.__version__)",
}


@functools.cache
def probe(name: str) -> tuple[bool, str]:
    """Whether a package imports in a fresh interpreter, and its versions or its error."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBES[name]], capture_output=True, text=True, timeout=300
    )
    if out.returncode == 0:
        return True, out.stdout.strip().splitlines()[-1]
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    return False, lines[-1] if lines else f"exit status {out.returncode}"


def available(name: str) -> bool:
    """Whether ``name`` imports here; where it does not, the failure must be the known one
    (an ImportError or AttributeError: TFP's JAX substrate and distrax against a JAX newer
    than they know), and the comparisons that need it have nothing to compare."""
    ok, detail = probe(name)
    if not ok:
        assert detail.split(":")[0].endswith(
            ("ImportError", "ModuleNotFoundError", "AttributeError")
        ), detail
        print(f"{name} does not import beside this JAX: {detail}")
    return ok


@pytest.mark.spawns
@pytest.mark.parametrize("name", ["tfp_numpy", "tfp_jax", "distrax"])
def test_which_packages_import(name):
    """Not silent: each package either imports, or fails with ImportError/AttributeError
    (TFP's JAX substrate and distrax against a newer JAX than they know); printed either way."""
    ok, detail = probe(name)
    print(f"{name}: {'imports, ' if ok else 'does not import: '}{detail}")
    if not ok:
        assert detail.split(":")[0].endswith(
            ("ImportError", "ModuleNotFoundError", "AttributeError")
        ), detail
    if name == "tfp_numpy":
        assert ok, detail  # in the test extra; its NumPy substrate needs no JAX


# name -> (draw, build(tfd, *arrays)); the same builders serve the NumPy and JAX substrates
TFP = {
    "Normal": ("loc_scale", lambda t, a, b: t.Normal(a, b)),
    "Laplace": ("loc_scale", lambda t, a, b: t.Laplace(a, b)),
    "Gumbel": ("loc_scale", lambda t, a, b: t.Gumbel(a, b)),
    "Cauchy": ("loc_scale", lambda t, a, b: t.Cauchy(a, b)),
    "StudentT": ("student_t", lambda t, v, a, b: t.StudentT(v, a, b)),
    "Uniform": ("uniform", lambda t, a, b: t.Uniform(a, b)),
    "Exponential": ("rate", lambda t, a: t.Exponential(a)),
    "Gamma": ("two_pos", lambda t, a, b: t.Gamma(a, b)),
    "Gamma(log_rate)": ("loc_scale", lambda t, a, b: t.Gamma(b, log_rate=a)),
    "Beta": ("two_pos", lambda t, a, b: t.Beta(a, b)),
    "Dirichlet": ("dirichlet", lambda t, a: t.Dirichlet(a)),
    "Bernoulli(probs)": ("unit", lambda t, a: t.Bernoulli(probs=a)),
    "Bernoulli(logits)": ("logit", lambda t, a: t.Bernoulli(logits=a)),
    "Categorical(probs)": ("simplex", lambda t, a: t.Categorical(probs=a)),
    "Categorical(logits)": ("logits5", lambda t, a: t.Categorical(logits=a)),
    "Poisson": ("rate", lambda t, a: t.Poisson(a)),
    "Poisson(log_rate)": ("logit", lambda t, a: t.Poisson(log_rate=a)),
    "Geometric(probs)": ("unit", lambda t, a: t.Geometric(probs=a)),
    "Geometric(logits)": ("logit", lambda t, a: t.Geometric(logits=a)),
    "Binomial(probs)": ("unit", lambda t, a: t.Binomial(7.0, probs=a)),
    "Binomial(logits)": ("logit", lambda t, a: t.Binomial(7.0, logits=a)),
    "MultivariateNormalTriL": ("mvn", lambda t, a, b: t.MultivariateNormalTriL(a, b)),
    "MultivariateNormalDiag": ("diag", lambda t, a, b: t.MultivariateNormalDiag(a, b)),
    "MultivariateNormalDiagPlusLowRankCovariance": (
        "lowrank",
        lambda t, a, b, c: t.MultivariateNormalDiagPlusLowRankCovariance(a, c, b),
    ),
    "Independent(Normal)": ("diag", lambda t, a, b: t.Independent(t.Normal(a, b), 1)),
    "Independent(Gamma)": ("two_pos", lambda t, a, b: t.Independent(t.Gamma(a, b), 1)),
    "Chi": ("rate", lambda t, a: t.Chi(a)),
    "Chi2": ("rate", lambda t, a: t.Chi2(a)),
    "Weibull": ("two_pos", lambda t, a, b: t.Weibull(a, b)),
    "VonMises": ("loc_scale", lambda t, a, b: t.VonMises(a, b)),
    "Moyal": ("loc_scale", lambda t, a, b: t.Moyal(a, b)),
    "Pareto": ("two_pos", lambda t, a, b: t.Pareto(a, b)),
    "ContinuousBernoulli(probs)": ("cb_probs", lambda t, a: t.ContinuousBernoulli(probs=a)),
    "ContinuousBernoulli(logits)": ("cb_logits", lambda t, a: t.ContinuousBernoulli(logits=a)),
    "HalfNormal": ("rate", lambda t, a: t.HalfNormal(a)),
    "LogNormal": ("loc_scale", lambda t, a, b: t.LogNormal(a, b)),
    "InverseGamma": ("two_pos", lambda t, a, b: t.InverseGamma(a, b)),
    "Deterministic": ("binary", lambda t, a: t.Deterministic(a)),
    "OneHotCategorical(probs)": ("simplex", lambda t, a: t.OneHotCategorical(probs=a)),
    "OneHotCategorical(logits)": ("logits5", lambda t, a: t.OneHotCategorical(logits=a)),
    "LogitNormal": ("loc_scale", lambda t, a, b: t.LogitNormal(a, b)),
    "Transformed(Normal, Exp)": (
        "loc_scale",
        lambda t, a, b: t.TransformedDistribution(t.Normal(a, b), _bijectors(t).Exp()),
    ),
}
NO_DENSITY_TFP = {"LogitNormal", "Transformed(Normal, Exp)"}


def _bijectors(tfd):
    """The bijectors of the substrate whose distributions are ``tfd``."""
    return sys.modules[tfd.__name__.rsplit(".", 1)[0]].bijectors


# Pairs where TFP and kldiv differ by convention, not by value: a Deterministic against a
# continuous Q, where TFP returns −log q(loc) (a density is no probability: the KL of a point
# mass against a density is +inf by definition) and kldiv raises ValueError, as it does for any
# discrete P against a continuous Q.
TFP_CONVENTION = "Deterministic"


def tfp_params(name: str, *seed: str) -> list[np.ndarray]:
    return DRAWS[TFP[name][0]](rng_for("tfp", name, *seed))


def compare_tfp(tfd, asarray, to_numpy, result_type=None) -> list[tuple[str, str]]:
    """kl vs tfd.kl_divergence over every pair both compute (each result an instance of
    ``result_type`` when given); the pairs compared."""
    compared, failures = [], []
    for a in TFP:
        for b in TFP:
            pa = [asarray(x) for x in tfp_params(a, "P", b)]
            qa = [asarray(x) for x in tfp_params(b, "Q", a)]
            p, q = TFP[a][1](tfd, *pa), TFP[b][1](tfd, *qa)
            if p.batch_shape != q.batch_shape or p.event_shape != q.event_shape:
                continue
            try:
                # TFP's Deterministic against a density evaluates it at the boundary of its
                # support (log 0): NumPy warns, the value is right
                with np.errstate(divide="ignore", invalid="ignore"):
                    theirs = to_numpy(tfd.kl_divergence(p, q))
            except NotImplementedError:
                continue
            except ValueError:
                # TFP 0.25's KL of a Gamma against a Chi2 or a Weibull reads the Gamma's `rate`,
                # which is None for a Gamma built from `log_rate` (kldiv's value for these
                # pairs is checked with Gamma(rate=exp(log_rate)) in test_pairs.py)
                if "Gamma(log_rate)" in (a, b) and {a, b} & {"Chi2", "Weibull"}:
                    continue
                raise
            try:
                ours = D.kl(p, q)
            except NotImplementedError:
                continue
            except ValueError as e:
                if a == TFP_CONVENTION and "discrete with a continuous" in str(e):
                    continue
                raise
            compared.append((a, b))
            if result_type is not None and not isinstance(ours, result_type):
                failures.append(f"{a}-{b}: type {type(ours).__name__}")
                continue
            if np.asarray(ours).dtype != np.float64:
                failures.append(f"{a}-{b}: dtype {np.asarray(ours).dtype}")
                continue
            # TFP 0.25's ContinuousBernoulli has dtype float32 whatever its parameters' dtype
            # and computes in it: agreement to float32 rounding of O(1) terms (kldiv's float64
            # values are checked against torch and mpmath in test_pairs.py)
            f32 = "ContinuousBernoulli" in a + b
            rtol, atol = (1e-5, 1e-6) if f32 else (RTOL_VALUE, ATOL_VALUE)
            try:
                np.testing.assert_allclose(to_numpy(ours), theirs, rtol=rtol, atol=atol)
            except AssertionError as e:
                failures.append(f"{a}-{b}: {str(e).strip().splitlines()[-3:]}")
    assert not failures, "\n".join(failures)
    return compared


# Imported by module fixtures, set up before the per-test seed fixture looks at the global
# random generators: importing TFP draws from them, the tests themselves do not.
@pytest.fixture(scope="module")
def tfp_numpy():
    assert available("tfp_numpy"), probe("tfp_numpy")[1]  # in the test extra, needs no JAX
    # kldiv.torch first: TensorFlow loaded before Triton's native library makes the process
    # abort (both register the same LLVM options), and kldiv.torch loads Triton when first
    # used (a categorical KL on torch tensors), possibly after this fixture in a worker
    importlib.import_module("kldiv.torch")
    import tensorflow_probability.substrates.numpy as tfp

    return tfp.distributions


@pytest.fixture(scope="module")
def tfp_jax():
    if not available("tfp_jax"):
        return None
    import tensorflow_probability.substrates.jax as tfp

    return tfp.distributions


@pytest.fixture(scope="module")
def distrax_and_tfp(request):
    if not available("distrax") or request.getfixturevalue("tfp_jax") is None:
        return None
    import distrax

    return distrax, request.getfixturevalue("tfp_jax")


def tril_twin_kl(tfd, cholesky, p, q):
    """TFP's KL between the MultivariateNormalTriL twins of two normals (for the classes TFP
    has no KL between): the Cholesky factor of each covariance."""

    def twin(d):
        return tfd.MultivariateNormalTriL(d.mean(), cholesky(d.covariance()))

    return tfd.kl_divergence(twin(p), twin(q))


@pytest.mark.spawns
def test_tfp_numpy_objects_match_tfp_kl(tfp_numpy):
    tfd = tfp_numpy
    compared = compare_tfp(tfd, np.asarray, np.asarray)
    assert len(compared) == 62, len(compared)
    for name, (_draw, build) in TFP.items():
        if name in NO_DENSITY_TFP:
            continue
        points = ANGLES if name in NO_SAMPLER else None
        assert_reads_alike(build(tfd, *tfp_params(name, "read")), np.asarray, points, seed=0)
    # TFP has no KL of its own between low-rank-plus-diagonal normals: against its TriL twins
    r = rng_for("tfp", "lowrank", "numpy")
    build = TFP["MultivariateNormalDiagPlusLowRankCovariance"][1]
    p, q = build(tfd, *DRAWS["lowrank"](r)), build(tfd, *DRAWS["lowrank"](r))
    np.testing.assert_allclose(
        D.kl(p, q), tril_twin_kl(tfd, np.linalg.cholesky, p, q), rtol=RTOL_VALUE
    )
    p = tfd.Normal(np.zeros(3), np.ones(3))
    assert isinstance(D.kl(p, p), np.ndarray)
    p32 = tfd.Gamma(np.float32(2.0), np.float32(1.5))
    assert D.kl(p32, tfd.Exponential(np.float32(1.3))).dtype == np.float32


@pytest.mark.spawns
def test_tfp_numpy_errors(tfp_numpy):
    tfd = tfp_numpy
    with pytest.raises(TypeError, match="TFP on NumPy Logistic") as e:
        D.kl(tfd.Logistic(0.0, 1.0), tfd.Normal(0.0, 1.0))
    assert "MultivariateNormalTriL" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(NotImplementedError, match=r"KL\(Pareto \|\| Cauchy\)"):
        D.kl(tfd.Pareto(2.0, 3.0), tfd.Cauchy(0.0, 1.0))


def _jax():
    import jax
    import jax.numpy as jnp

    assert jax.config.jax_enable_x64, "the test suite runs JAX in float64 (tests/conftest.py)"
    return jax, jnp


@pytest.mark.spawns
def test_tfp_jax_objects_match_tfp_kl_and_differentiate(tfp_jax):
    if tfp_jax is None:  # the import failure was checked by available()
        return
    jax, jnp = _jax()
    tfd = tfp_jax
    compared = compare_tfp(tfd, jnp.asarray, lambda x: np.asarray(x, dtype=np.float64))
    assert len(compared) == 62, len(compared)
    for name, (_draw, build) in TFP.items():
        if name in NO_DENSITY_TFP:
            continue
        params = [jnp.asarray(x) for x in tfp_params(name, "read")]
        points = jnp.asarray(ANGLES) if name in NO_SAMPLER else None
        assert_reads_alike(build(tfd, *params), np.asarray, points, key=jax.random.key(0))
    # jax.grad and jax.jit through the parameters, against TFP's own KL
    for a, b in [
        ("Normal", "Normal"),
        ("Gamma(log_rate)", "Gamma"),
        ("Beta", "Beta"),
        ("MultivariateNormalTriL", "MultivariateNormalTriL"),
        ("MultivariateNormalDiag", "MultivariateNormalDiag"),
        ("Independent(Normal)", "Independent(Normal)"),
        ("Bernoulli(logits)", "Bernoulli(probs)"),
        ("Categorical(logits)", "Categorical(logits)"),
        ("Laplace", "Laplace"),
        ("Gumbel", "Gumbel"),
        ("Exponential", "Gamma"),
    ]:
        pa = [jnp.asarray(x) for x in tfp_params(a, "P", b)]
        qa = [jnp.asarray(x) for x in tfp_params(b, "Q", a)]
        n = len(pa)

        def total(*args, kl, a=a, b=b, n=n):
            return jnp.sum(kl(TFP[a][1](tfd, *args[:n]), TFP[b][1](tfd, *args[n:])))

        argnums = tuple(range(len(pa) + len(qa)))
        ours = jax.jit(jax.grad(functools.partial(total, kl=D.kl), argnums))(*pa, *qa)
        theirs = jax.grad(functools.partial(total, kl=tfd.kl_divergence), argnums)(*pa, *qa)
        assert_grads(ours, theirs, lower_flags(TFP, a, len(pa)) + lower_flags(TFP, b, len(qa)))
    # TFP has no KL of its own between low-rank-plus-diagonal normals: against its TriL twins
    r = rng_for("tfp", "lowrank", "jax")
    args = [jnp.asarray(x) for x in DRAWS["lowrank"](r) + DRAWS["lowrank"](r)]

    def lowrank(*x, kl):
        build = TFP["MultivariateNormalDiagPlusLowRankCovariance"][1]
        return jnp.sum(kl(build(tfd, *x[:3]), build(tfd, *x[3:])))

    twin = functools.partial(tril_twin_kl, tfd, jnp.linalg.cholesky)
    ours = jax.jit(jax.grad(functools.partial(lowrank, kl=D.kl), tuple(range(6))))(*args)
    theirs = jax.grad(functools.partial(lowrank, kl=twin), tuple(range(6)))(*args)
    np.testing.assert_allclose(
        functools.partial(lowrank, kl=D.kl)(*args), lowrank(*args, kl=twin), rtol=RTOL_VALUE
    )
    assert_grads(ours, theirs, [False] * 6)


# ---------------------------------------------------------------------------------------------
# TFP on TensorFlow: tf.Tensor out, tf.GradientTape through to the objects' tf.Variables
# ---------------------------------------------------------------------------------------------

# float32 against the float64 KL of the same (float32-rounded) parameters: a closed form is a
# few dozen float32 operations on terms of magnitude at most about 1 + |KL|, each rounding by at
# most eps32 relative, so |error| <= 64·eps32·(1 + |KL|) (observed: below 8·eps32·(1 + |KL|)).
TOL32 = 64 * float(np.finfo(np.float32).eps)
# TFP 0.25's ContinuousBernoulli computes in float32 (see compare_tfp), and its formulas cancel
# near λ = ½, losing eps32/η² ≈ 3e-6 at the draws' |η| >= 0.2: its gradients to 1e-5.
RTOL_CB, ATOL_CB = 1e-5, 1e-5


@pytest.fixture(scope="module")
def tfp_tf():
    """``(tf, tfd)``: TensorFlow and TFP's distributions on it (both in the test extra)."""
    importlib.import_module("kldiv.torch")  # Triton before TensorFlow (see tfp_numpy)
    import tensorflow as tf
    import tensorflow_probability as tfp

    return tf, tfp.distributions


@functools.cache
def tf_compared(tfd) -> tuple[tuple[str, str], ...]:
    """The pairs compared on TensorFlow (values in float64, as on the other substrates)."""
    tf = sys.modules["tensorflow"]
    return tuple(
        compare_tfp(
            tfd, tf.constant, lambda x: np.asarray(x, dtype=np.float64), result_type=tf.Tensor
        )
    )


def test_tfp_tensorflow_objects_match_tfp_kl(tfp_tf):
    tf, tfd = tfp_tf
    assert len(tf_compared(tfd)) == 62, len(tf_compared(tfd))
    # the objects read alike: log-densities at kldiv's own draws (TensorFlow's samplers)
    for name, (_draw, build) in TFP.items():
        if name in NO_DENSITY_TFP:
            continue
        params = [tf.constant(x) for x in tfp_params(name, "read")]
        points = tf.constant(ANGLES) if name in NO_SAMPLER else None
        assert_reads_alike(build(tfd, *params), np.asarray, points, seed=0)
    # TFP has no KL of its own between low-rank-plus-diagonal normals: against its TriL twins
    r = rng_for("tfp", "lowrank", "tensorflow")
    build = TFP["MultivariateNormalDiagPlusLowRankCovariance"][1]
    p = build(tfd, *(tf.constant(x) for x in DRAWS["lowrank"](r)))
    q = build(tfd, *(tf.constant(x) for x in DRAWS["lowrank"](r)))
    np.testing.assert_allclose(
        D.kl(p, q), tril_twin_kl(tfd, tf.linalg.cholesky, p, q), rtol=RTOL_VALUE
    )


def test_tfp_tensorflow_gradients_match_tfp_kl(tfp_tf):
    """``tf.GradientTape`` through ``kl(P, Q)`` to the ``tf.Variable``s the TFP objects hold,
    against the tape through TFP's own KL, float64, for every pair compared (where TFP's KL is
    finite). Two parameters are compared with care: probabilities on the simplex (TFP
    normalises ``probs`` inside its KL, kldiv reads them as given: the KLs agree on the simplex,
    so the gradients agree up to a multiple of (1, …, 1), removed by centring over the event
    axis), and a point mass's ``loc`` on a discrete support, which has no derivative (TFP
    differentiates its formula for the pmf in the point, kldiv its indicator): not compared."""
    tf, tfd = tfp_tf
    failures, differentiated = [], 0
    for a, b in tf_compared(tfd):
        pa = [tf.Variable(x) for x in tfp_params(a, "P", b)]
        qa = [tf.Variable(x) for x in tfp_params(b, "Q", a)]
        with tf.GradientTape(persistent=True) as tape:
            p, q = TFP[a][1](tfd, *pa), TFP[b][1](tfd, *qa)
            ours, theirs = D.kl(p, q), tfd.kl_divergence(p, q)
            finite = np.isfinite(theirs.numpy())
            total_ours = tf.reduce_sum(tf.boolean_mask(ours, finite))
            total_theirs = tf.reduce_sum(tf.boolean_mask(theirs, finite))
        if not finite.any():
            continue
        differentiated += 1
        zero = tf.UnconnectedGradients.ZERO
        g_ours = [g.numpy() for g in tape.gradient(total_ours, pa + qa, unconnected_gradients=zero)]
        g_theirs = [
            g.numpy() for g in tape.gradient(total_theirs, pa + qa, unconnected_gradients=zero)
        ]
        sides = [(a, len(pa)), (b, len(qa))]
        simplex = [TFP[n][0] == "simplex" for n, k in sides for _ in range(k)]
        g_ours, g_theirs = (
            [g - g.mean(-1, keepdims=True) if s else g for g, s in zip(gs, simplex, strict=True)]
            for gs in (g_ours, g_theirs)
        )
        if a == "Deterministic":
            g_ours[0] = g_theirs[0] = np.zeros_like(g_ours[0])
        lower = lower_flags(TFP, a, len(pa)) + lower_flags(TFP, b, len(qa))
        try:
            if "ContinuousBernoulli" in a + b:
                for go, gt in zip(g_ours, g_theirs, strict=True):
                    np.testing.assert_allclose(go, gt, rtol=RTOL_CB, atol=ATOL_CB)
            else:
                assert_grads(g_ours, g_theirs, lower)
        except AssertionError as e:
            failures.append(f"{a}-{b}: {str(e).strip().splitlines()[-3:]}")
    assert not failures, "\n".join(failures)
    assert differentiated == 62, differentiated  # every pair has a finite KL somewhere


def test_tfp_tensorflow_float32_in_float32_out(tfp_tf):
    tf, tfd = tfp_tf
    for a, b in tf_compared(tfd):
        pa = [x.astype(np.float32) for x in tfp_params(a, "P", b)]
        qa = [x.astype(np.float32) for x in tfp_params(b, "Q", a)]
        ours = D.kl(TFP[a][1](tfd, *map(tf.constant, pa)), TFP[b][1](tfd, *map(tf.constant, qa)))
        assert isinstance(ours, tf.Tensor) and ours.dtype == tf.float32, (a, b, ours.dtype)
        wide = [tf.constant(x, dtype=tf.float64) for x in pa + qa]
        ref = tfd.kl_divergence(TFP[a][1](tfd, *wide[: len(pa)]), TFP[b][1](tfd, *wide[len(pa) :]))
        np.testing.assert_allclose(
            np.asarray(ours, dtype=np.float64), ref, rtol=TOL32, atol=TOL32, err_msg=f"{a}-{b}"
        )


def test_tfp_tensorflow_batch_shapes_broadcast(tfp_tf):
    tf, tfd = tfp_tf
    r = rng_for("tfp", "tensorflow", "broadcast")

    def c(x):
        return tf.constant(x, dtype=tf.float64)

    cases = [
        (
            tfd.Normal(c(r.normal(size=(4, 3))), c(pos(r, (3,)))),
            tfd.Normal(c(0.5), c(pos(r, (4, 1)))),
        ),
        (
            tfd.MultivariateNormalTriL(c(r.normal(size=(2, 1, K))), c(tril(r, (4,)))),
            tfd.MultivariateNormalTriL(c(r.normal(size=K)), c(tril(r, ()))),
        ),
        (
            tfd.MultivariateNormalDiag(c(r.normal(size=(2, 1, K))), c(pos(r, (4, K)))),
            tfd.MultivariateNormalTriL(c(r.normal(size=K)), c(tril(r, ()))),
        ),
        (
            tfd.Categorical(logits=c(r.normal(size=(2, 1, 5)))),
            tfd.Categorical(probs=c(simplex(r, (3, 5)))),
        ),
        (tfd.Dirichlet(c(pos(r, (2, 1, K)))), tfd.Dirichlet(c(pos(r, (4, K))))),
        (tfd.Gamma(c(pos(r, (4, 1))), c(pos(r, (4, 1)))), tfd.Exponential(c(pos(r, (3,))))),
        (
            tfd.Independent(tfd.Normal(c(r.normal(size=(2, 4, K))), c(pos(r, (K,)))), 1),
            tfd.Independent(tfd.Normal(c(r.normal(size=K)), c(pos(r, (4, K)))), 1),
        ),
    ]
    for p, q in cases:
        ours, theirs = D.kl(p, q), tfd.kl_divergence(p, q)
        assert isinstance(ours, tf.Tensor) and ours.dtype == tf.float64
        assert tuple(ours.shape) == tuple(theirs.shape), (p, ours.shape, theirs.shape)
        np.testing.assert_allclose(ours, theirs, rtol=RTOL_VALUE, atol=ATOL_VALUE)


def test_tfp_tensorflow_under_tf_function_and_xla(tfp_tf):
    """kl(P, Q) and its gradient traced by ``tf.function`` and compiled by XLA, equal to the
    eager ones (to 1e-12: XLA may fuse and reorder the same float64 operations); the objects
    are built with ``validate_args=True``, whose domain checks kldiv skips while tracing.
    ``autograph=False``: kldiv has no tensor-dependent Python control flow to convert, and
    autograph's first conversion inspects every module loaded (tens of seconds here)."""
    tf, tfd = tfp_tf
    r = rng_for("tfp", "tensorflow", "tf.function")
    v = [tf.Variable(x) for x in (r.normal(size=(4, K)), tril(r), r.normal(size=(4, 5)))]

    def run(kl):
        with tf.GradientTape() as tape:
            mvn = tfd.MultivariateNormalTriL(v[0], v[1], validate_args=True)
            cat = tfd.Categorical(logits=v[2], validate_args=True)
            outs = [
                kl(mvn, tfd.MultivariateNormalTriL(v[0][::-1], v[1][::-1])),
                kl(cat, tfd.Categorical(logits=v[2][::-1])),
            ]
            total = tf.add_n([tf.reduce_sum(o) for o in outs])
        return outs, tape.gradient(total, v)

    eager = run(D.kl)
    traced = tf.function(lambda: run(D.kl), jit_compile=True, autograph=False)()
    for x, y in zip(traced[0] + traced[1], eager[0] + eager[1], strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)
    theirs = run(tfd.kl_divergence)
    for x, y in zip(eager[0], theirs[0], strict=True):
        np.testing.assert_allclose(x, y, rtol=RTOL_VALUE, atol=ATOL_VALUE)


def test_tfp_tensorflow_pairs_tfp_lacks(tfp_tf):
    """Pairs TFP has no KL for, on TensorFlow: equal to kldiv's NumPy values (checked against
    references in test_pairs.py) to 1e-12, as tf.Tensor; the binomial with different counts
    (an exact sum over P's support, read on the host) differentiates to ``probs``, against
    central differences (step 1e-6: truncation ~1e-12, rounding ~1e-10 relative)."""
    tf, tfd = tfp_tf
    f64 = tf.float64
    r = rng_for("tfp", "tensorflow", "lacks")
    n_p, n_q, a, b = np.array([5.0, 5.0, 9.0]), np.array([7.0, 30.0, 9.0]), unit(r, 3), unit(r, 3)
    lp, lq = tril(r, ()), tril(r, ())
    cases = [  # (TF objects, the same as kldiv's on NumPy)
        (
            (tfd.Binomial(tf.constant(n_p), probs=tf.constant(a)), tfd.Binomial(n_q, probs=b)),
            (D.Binomial(n_p, a), D.Binomial(n_q, b)),
        ),
        (
            (tfd.WishartTriL(tf.constant(5.0, f64), lp), tfd.WishartTriL(6.5, tf.constant(lq))),
            (D.Wishart(5.0, lp), D.Wishart(6.5, lq)),
        ),
        (
            (tfd.Normal(tf.constant(a), 1.0), tfd.Laplace(tf.constant(b), 2.0)),
            (D.Normal(a, 1.0), D.Laplace(b, 2.0)),
        ),
        (
            (tfd.Normal(tf.constant(a), 1.0), tfd.Gamma(tf.constant(b), 2.0)),  # +inf
            (D.Normal(a, 1.0), D.Gamma(b, 2.0)),
        ),
    ]
    for (p, q), (p_np, q_np) in cases:
        ours = D.kl(p, q)
        assert isinstance(ours, tf.Tensor) and ours.dtype == f64
        np.testing.assert_allclose(ours, D.kl(p_np, q_np), rtol=RTOL_VALUE, atol=ATOL_VALUE)
    probs = tf.Variable(a)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(D.kl(tfd.Binomial(n_p, probs=probs), tfd.Binomial(n_q, probs=b)))
    h = 1e-6
    fd = [
        (
            np.sum(D.kl(D.Binomial(n_p, a + h * e), D.Binomial(n_q, b)))
            - np.sum(D.kl(D.Binomial(n_p, a - h * e), D.Binomial(n_q, b)))
        )
        / (2 * h)
        for e in np.eye(3)
    ]
    np.testing.assert_allclose(tape.gradient(total, probs), fd, rtol=1e-7)


def test_tfp_tensorflow_errors_mixing_and_fallback(tfp_tf):
    tf, tfd = tfp_tf
    with pytest.raises(TypeError, match="TFP on TensorFlow Logistic") as e:
        D.kl(tfd.Logistic(0.0, 1.0), tfd.Normal(0.0, 1.0))
    assert "MultivariateNormalTriL" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(NotImplementedError, match=r"KL\(Pareto \|\| Cauchy\)") as e:
        D.kl(tfd.Pareto(2.0, 3.0), tfd.Cauchy(0.0, 1.0))
    assert "Pairs with a closed form: " in str(e.value) and "Normal || Normal" in str(e.value)
    assert "\n" not in str(e.value)
    # beside kldiv's own objects: Python numbers take the TensorFlow dtype, arrays of another
    # framework are refused
    loc = tf.Variable([0.1, 0.5], dtype=tf.float64)
    with tf.GradientTape() as tape:
        got = D.kl(tfd.Normal(loc, 1.5), D.Normal(0.0, 1.0))
    assert isinstance(got, tf.Tensor) and got.dtype == tf.float64
    want = tfd.kl_divergence(tfd.Normal(loc, 1.5), tfd.Normal(tf.constant(0.0, tf.float64), 1.0))
    np.testing.assert_allclose(got, want, rtol=RTOL_VALUE)
    np.testing.assert_allclose(tape.gradient(got, loc), loc.numpy(), rtol=1e-12)
    with pytest.raises(TypeError, match="one framework"):
        D.kl(tfd.Normal(loc, 1.5), D.Normal(np.array([0.0, 1.0]), 1.0))
    # no closed form: the Monte-Carlo estimate, reparameterised, so the tape reaches `loc`
    p = tfd.Normal(loc, tf.constant(1.0, tf.float64))
    q = tfd.StudentT(tf.constant(3.0, tf.float64), 0.0, 1.0)
    with tf.GradientTape() as tape:
        est = D.kl(p, q, samples=20_000, seed=0)
    assert isinstance(est, tf.Tensor) and est.dtype == tf.float64
    # against quadrature: within 5 standard errors sqrt(Var[log p − log q]/n)
    x = np.linspace(-30.0, 30.0, 600_001)[:, None]
    log_p = scipy.stats.norm.logpdf(x, loc.numpy(), 1.0)
    log_r = log_p - scipy.stats.t.logpdf(x, 3.0)
    dx = x[1, 0] - x[0, 0]
    kl_ref = np.sum(np.exp(log_p) * log_r, axis=0) * dx
    se = np.sqrt((np.sum(np.exp(log_p) * log_r**2, axis=0) * dx - kl_ref**2) / 20_000)
    assert np.all(np.abs(est.numpy() - kl_ref) < 5 * se), (est, kl_ref, se)
    np.testing.assert_array_equal(est, D.kl(p, q, samples=20_000, seed=0))  # seeded
    assert np.all(np.isfinite(tape.gradient(est, loc)))


# distrax family -> (draw, build(distrax, *arrays), its TFP-on-JAX twin build(tfd, *arrays))
def _upper(jnp, b):
    return jnp.swapaxes(b, -1, -2)


DISTRAX = {
    "Normal": ("loc_scale", lambda d, a, b: d.Normal(a, b), lambda t, a, b: t.Normal(a, b)),
    "LogStddevNormal": (
        "loc_scale",
        lambda d, a, b: d.LogStddevNormal(a, b - 1.0),
        lambda t, a, b: t.Normal(a, _jax()[1].exp(b - 1.0)),
    ),
    "Laplace": ("loc_scale", lambda d, a, b: d.Laplace(a, b), lambda t, a, b: t.Laplace(a, b)),
    "Gumbel": ("loc_scale", lambda d, a, b: d.Gumbel(a, b), lambda t, a, b: t.Gumbel(a, b)),
    "Uniform": ("uniform", lambda d, a, b: d.Uniform(a, b), lambda t, a, b: t.Uniform(a, b)),
    "Gamma": ("two_pos", lambda d, a, b: d.Gamma(a, b), lambda t, a, b: t.Gamma(a, b)),
    "Beta": ("two_pos", lambda d, a, b: d.Beta(a, b), lambda t, a, b: t.Beta(a, b)),
    "Dirichlet": ("dirichlet", lambda d, a: d.Dirichlet(a), lambda t, a: t.Dirichlet(a)),
    "Bernoulli(probs)": (
        "unit",
        lambda d, a: d.Bernoulli(probs=a),
        lambda t, a: t.Bernoulli(probs=a),
    ),
    "Bernoulli(logits)": (
        "logit",
        lambda d, a: d.Bernoulli(logits=a),
        lambda t, a: t.Bernoulli(logits=a),
    ),
    "Categorical(probs)": (
        "simplex",
        lambda d, a: d.Categorical(probs=a),
        lambda t, a: t.Categorical(probs=a),
    ),
    "Categorical(logits)": (
        "logits5",
        lambda d, a: d.Categorical(logits=a),
        lambda t, a: t.Categorical(logits=a),
    ),
    "MultivariateNormalDiag": (
        "diag",
        lambda d, a, b: d.MultivariateNormalDiag(a, b),
        lambda t, a, b: t.MultivariateNormalDiag(a, b),
    ),
    "MultivariateNormalTri": (
        "mvn",
        lambda d, a, b: d.MultivariateNormalTri(a, b),
        lambda t, a, b: t.MultivariateNormalTriL(a, b),
    ),
    "MultivariateNormalTri(upper)": (
        "mvn",
        lambda d, a, b: d.MultivariateNormalTri(a, _upper(_jax()[1], b), is_lower=False),
        lambda t, a, b: t.MultivariateNormalFullCovariance(
            a, _upper(_jax()[1], b) @ _upper(_jax()[1], b).swapaxes(-1, -2)
        ),
    ),
    "MultivariateNormalFullCovariance": (
        "mvn_cov",
        lambda d, a, b: d.MultivariateNormalFullCovariance(a, b),
        lambda t, a, b: t.MultivariateNormalFullCovariance(a, b),
    ),
    "Independent(Normal)": (
        "diag",
        lambda d, a, b: d.Independent(d.Normal(a, b), 1),
        lambda t, a, b: t.Independent(t.Normal(a, b), 1),
    ),
}


@pytest.mark.spawns
def test_distrax_objects_match_tfp_kl_and_differentiate(distrax_and_tfp):
    if distrax_and_tfp is None:  # the import failure was checked by available()
        return
    jax, jnp = _jax()
    distrax, tfd = distrax_and_tfp
    compared, failures = 0, []
    for a in DISTRAX:
        for b in DISTRAX:
            pa = [jnp.asarray(x) for x in DRAWS[DISTRAX[a][0]](rng_for("distrax", a, "P", b))]
            qa = [jnp.asarray(x) for x in DRAWS[DISTRAX[b][0]](rng_for("distrax", b, "Q", a))]
            n = len(pa)

            def total(*args, a=a, b=b, n=n, twin=False):
                build = 2 if twin else 1
                lib = tfd if twin else distrax
                p = DISTRAX[a][build](lib, *args[:n])
                q = DISTRAX[b][build](lib, *args[n:])
                return (tfd.kl_divergence if twin else D.kl)(p, q)

            tp, tq = DISTRAX[a][2](tfd, *pa), DISTRAX[b][2](tfd, *qa)
            if tp.batch_shape != tq.batch_shape or tp.event_shape != tq.event_shape:
                continue
            try:
                theirs = np.asarray(total(*pa, *qa, twin=True))
                ours = np.asarray(total(*pa, *qa))
            except NotImplementedError:
                continue
            compared += 1
            try:
                np.testing.assert_allclose(ours, theirs, rtol=RTOL_VALUE, atol=ATOL_VALUE)
                if np.isfinite(theirs).all():
                    argnums = tuple(range(len(pa) + len(qa)))
                    g_ours = jax.jit(jax.grad(lambda *x, f=total: jnp.sum(f(*x)), argnums))(
                        *pa, *qa
                    )
                    g_theirs = jax.grad(lambda *x, f=total: jnp.sum(f(*x, twin=True)), argnums)(
                        *pa, *qa
                    )
                    lower = lower_flags(DISTRAX, a, n) + lower_flags(DISTRAX, b, len(qa))
                    assert_grads(g_ours, g_theirs, lower)
            except AssertionError as e:
                failures.append(f"{a}-{b}: {str(e).strip().splitlines()[-3:]}")
    assert not failures, "\n".join(failures)
    assert compared >= 15, compared
    for name, (draw, build, _) in DISTRAX.items():
        params = [jnp.asarray(x) for x in DRAWS[draw](rng_for("distrax", name, "read"))]
        assert_reads_alike(build(distrax, *params), np.asarray, key=jax.random.key(0))
    with pytest.raises(TypeError, match="distrax Logistic"):
        D.kl(distrax.Logistic(0.0, 1.0), distrax.Logistic(0.0, 1.0))


@pytest.mark.spawns
def test_kl_of_kldiv_objects_imports_no_framework():
    code = (
        "import sys, numpy as np\n"
        "from kldiv import distributions as D\n"
        "from kldiv.distributions import interop\n"
        "D.kl(D.Normal(0.0, 1.0), D.Normal(np.array([1.0]), 2.0))\n"
        "assert interop.foreign_package(np.zeros(2)) is None\n"
        "heavy = [m for m in ('torch', 'jax', 'tensorflow', 'tensorflow_probability', "
        "'distrax') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout


# ---------------------------------------------------------------------------------------------
# Review findings: checks follow the object, factors of either sign, traced binomial counts
# ---------------------------------------------------------------------------------------------


def test_domain_checks_follow_the_objects_validate_args():
    import torch
    import torch.distributions as td

    from kldiv.distributions.interop import as_kldiv

    assert as_kldiv(td.Normal(0.0, 1.0, validate_args=False)).validate is False
    assert as_kldiv(td.Normal(0.0, 1.0, validate_args=True)).validate is True
    assert as_kldiv(td.Normal(0.0, 1.0), validate=False).validate is False
    # unchecked, an out-of-domain scale reaches the formula (NaN) instead of raising
    bad = td.Normal(torch.tensor(0.0), torch.tensor(-1.0), validate_args=False)
    assert torch.isnan(D.kl(bad, td.Normal(1.0, 2.0)))


def test_tfp_lower_triangular_factors_with_negative_diagonals(tfp_numpy):
    # L and L·diag(±1) give the same covariance L Lᵀ; TFP accepts either sign on the diagonal
    rng = np.random.default_rng(17)
    lo = np.tril(rng.normal(size=(3, 3)), -1)
    lp = lo + np.diag([-1.3, 0.8, -0.6])
    lq = np.tril(rng.normal(size=(3, 3)), -1) + np.diag([0.9, -1.1, 1.4])
    mp, mq = rng.normal(size=3), rng.normal(size=3)
    p = tfp_numpy.MultivariateNormalTriL(mp, lp)
    q = tfp_numpy.MultivariateNormalTriL(mq, lq)
    want = tfp_numpy.kl_divergence(p, q)
    got = D.kl(p, q)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_binomial_counts_that_differ_under_jit_are_nan_not_the_equal_count_formula():
    import jax
    import jax.numpy as jnp

    def f(n_p, n_q):
        return D.kl(D.Binomial(n_p, jnp.float64(0.3)), D.Binomial(n_q, jnp.float64(0.4)))

    same = jax.jit(f)(jnp.float64(5.0), jnp.float64(5.0))
    np.testing.assert_allclose(same, f(5.0, 5.0), rtol=1e-12)  # eager: the exact formula
    assert np.isnan(jax.jit(f)(jnp.float64(5.0), jnp.float64(7.0)))
    assert np.isfinite(f(jnp.float64(5.0), jnp.float64(7.0)))  # eager: the exact sum
