"""The registry of closed-form pairs and ``kl(P, Q)``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from .. import _math
from .. import _namespace as ns
from ._common import INF, Array, host, params_of
from .continuous import (
    beta_kl,
    cauchy_kl,
    chi_kl,
    continuous_bernoulli_kl,
    diag_normal_kl,
    dirichlet_kl,
    exponential_kl,
    gamma_kl,
    gumbel_kl,
    half_normal_kl,
    inverse_gamma_kl,
    laplace_kl,
    log_normal_kl,
    moyal_kl,
    normal_kl,
    pareto_kl,
    student_t_kl,
    uniform_kl,
    von_mises_kl,
    weibull_kl,
)
from .cross import (
    bernoulli_poisson_kl,
    beta_continuous_bernoulli_kl,
    beta_exponential_kl,
    beta_gamma_kl,
    beta_normal_kl,
    beta_uniform_kl,
    continuous_bernoulli_exponential_kl,
    continuous_bernoulli_normal_kl,
    continuous_bernoulli_uniform_kl,
    exponential_gamma_kl,
    exponential_gumbel_kl,
    exponential_normal_kl,
    gamma_exponential_kl,
    gamma_gumbel_kl,
    gamma_normal_kl,
    gumbel_normal_kl,
    laplace_normal_kl,
    normal_gumbel_kl,
    normal_laplace_kl,
    pareto_exponential_kl,
    pareto_gamma_kl,
    pareto_normal_kl,
    uniform_beta_kl,
    uniform_continuous_bernoulli_kl,
    uniform_exponential_kl,
    uniform_gamma_kl,
    uniform_gumbel_kl,
    uniform_normal_kl,
    uniform_pareto_kl,
    weibull_gamma_kl,
)
from .discrete import bernoulli_kl, binomial_kl, categorical_kl, geometric_kl, poisson_kl
from .interop import as_kldiv, foreign_package
from .multivariate import (
    lowrank_mvn_kl,
    lowrank_mvn_mvn_kl,
    mvn_kl,
    mvn_lowrank_mvn_kl,
    wishart_kl,
)
from .objects import (
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Cauchy,
    Chi,
    ContinuousBernoulli,
    Deterministic,
    DiagNormal,
    Dirichlet,
    Distribution,
    Exponential,
    Gamma,
    Geometric,
    Gumbel,
    HalfNormal,
    Independent,
    InverseGamma,
    Laplace,
    LogNormal,
    LowRankMultivariateNormal,
    Moyal,
    MultivariateNormal,
    Normal,
    OneHotCategorical,
    Pareto,
    Poisson,
    StudentT,
    Transformed,
    Uniform,
    VonMises,
    Weibull,
    Wishart,
)

_F = TypeVar("_F", bound=Callable[..., Any])

# The registry: (type of P, type of Q) -> KL(P‖Q) from the objects' parameters.
_REGISTRY: dict[tuple[type, type], Callable[[Any, Any], Array]] = {}


def register_kl(type_p: type, type_q: type) -> Callable[[_F], _F]:
    """Decorator registering ``fn(p, q) -> KL(p‖q)`` for a pair of distribution types."""

    def deco(fn: _F) -> _F:
        _REGISTRY[(type_p, type_q)] = fn
        return fn

    return deco


def registered_pairs() -> list[str]:
    """The pairs with a closed form, as ``"P || Q"`` strings, sorted."""
    return sorted(f"{p.__name__} || {q.__name__}" for p, q in _REGISTRY)


def _pair(tp: type, tq: type, fn: Callable) -> None:
    _REGISTRY[(tp, tq)] = fn


_pair(Normal, Normal, lambda p, q: normal_kl(p.loc, p.scale, q.loc, q.scale))
_pair(DiagNormal, DiagNormal, lambda p, q: diag_normal_kl(p.mean, p.logvar, q.mean, q.logvar))
_pair(
    MultivariateNormal,
    MultivariateNormal,
    lambda p, q: mvn_kl(p.loc, p.scale_tril, q.loc, q.scale_tril),
)
_pair(
    LowRankMultivariateNormal,
    LowRankMultivariateNormal,
    lambda p, q: lowrank_mvn_kl(p.loc, p.cov_factor, p.cov_diag, q.loc, q.cov_factor, q.cov_diag),
)
_pair(Laplace, Laplace, lambda p, q: laplace_kl(p.loc, p.scale, q.loc, q.scale))
_pair(Gumbel, Gumbel, lambda p, q: gumbel_kl(p.loc, p.scale, q.loc, q.scale))
_pair(Cauchy, Cauchy, lambda p, q: cauchy_kl(p.loc, p.scale, q.loc, q.scale))
_pair(
    StudentT,
    StudentT,
    lambda p, q: student_t_kl(p.df, p.loc, p.scale, q.df, q.loc, q.scale),
)
_pair(Uniform, Uniform, lambda p, q: uniform_kl(p.low, p.high, q.low, q.high))
_pair(Exponential, Exponential, lambda p, q: exponential_kl(p.rate, q.rate))


def _rate(g: Gamma) -> Array:
    """The rate of a Gamma in its own framework (``exp(log_rate)`` when built from it)."""
    if g.log_rate is None:
        return g.rate
    return _exp(g.log_rate)


def _exp(x: Array) -> Array:
    return ns.namespace(x)[0].exp(x) if ns.is_array(x) else math.exp(x)


def _log(x: Array) -> Array:
    return ns.namespace(x)[0].log(x) if ns.is_array(x) else math.log(x)


def _gamma_pair(p: Gamma, q: Gamma) -> Array:
    if p.log_rate is None and q.log_rate is None:
        return gamma_kl(p.concentration, p.rate, q.concentration, q.rate)
    lp = p.log_rate if p.log_rate is not None else _log(p.rate)
    lq = q.log_rate if q.log_rate is not None else _log(q.rate)
    return gamma_kl(p.concentration, lp, q.concentration, lq, log_rate=True)


_pair(Gamma, Gamma, _gamma_pair)
_pair(Beta, Beta, lambda p, q: beta_kl(p.alpha, p.beta, q.alpha, q.beta))
_pair(Dirichlet, Dirichlet, lambda p, q: dirichlet_kl(p.concentration, q.concentration))
_pair(Poisson, Poisson, lambda p, q: poisson_kl(p.rate, q.rate))
_pair(Geometric, Geometric, lambda p, q: geometric_kl(p.probs, q.probs))
_pair(
    Bernoulli,
    Bernoulli,
    lambda p, q: bernoulli_kl(
        p.probs if p.probs is not None else p.logits,
        q.probs if q.probs is not None else q.logits,
        form=(p.form, q.form),
    ),
)
_pair(
    Categorical,
    Categorical,
    lambda p, q: categorical_kl(
        p.probs if p.probs is not None else p.logits,
        q.probs if q.probs is not None else q.logits,
        form=(p.form, q.form),
    ),
)
_pair(Laplace, Normal, lambda p, q: laplace_normal_kl(p.loc, p.scale, q.loc, q.scale))
_pair(Normal, Laplace, lambda p, q: normal_laplace_kl(p.loc, p.scale, q.loc, q.scale))
_pair(Uniform, Normal, lambda p, q: uniform_normal_kl(p.low, p.high, q.loc, q.scale))
_pair(Exponential, Normal, lambda p, q: exponential_normal_kl(p.rate, q.loc, q.scale))
_pair(Exponential, Gamma, lambda p, q: exponential_gamma_kl(p.rate, q.concentration, _rate(q)))
_pair(Gamma, Exponential, lambda p, q: gamma_exponential_kl(p.concentration, _rate(p), q.rate))


def _cb(d: ContinuousBernoulli) -> Array:
    return d.probs if d.probs is not None else d.logits


def _bern(d: Bernoulli) -> Array:
    return d.probs if d.probs is not None else d.logits


# the families added with the torch.distributions pairs: transforms of the ones above, the
# continuous Bernoulli, Pareto, and the cross-family pairs of the half-line and unit interval
_pair(HalfNormal, HalfNormal, lambda p, q: half_normal_kl(p.scale, q.scale))
_pair(LogNormal, LogNormal, lambda p, q: log_normal_kl(p.loc, p.scale, q.loc, q.scale))
_pair(
    InverseGamma,
    InverseGamma,
    lambda p, q: inverse_gamma_kl(p.concentration, p.scale, q.concentration, q.scale),
)
_pair(Chi, Chi, lambda p, q: chi_kl(p.df, q.df))
_pair(
    Weibull,
    Weibull,
    lambda p, q: weibull_kl(p.concentration, p.scale, q.concentration, q.scale),
)
_pair(
    Weibull,
    Gamma,
    lambda p, q: weibull_gamma_kl(p.concentration, p.scale, q.concentration, _rate(q)),
)
_pair(Pareto, Pareto, lambda p, q: pareto_kl(p.scale, p.alpha, q.scale, q.alpha))
_pair(Pareto, Exponential, lambda p, q: pareto_exponential_kl(p.scale, p.alpha, q.rate))
_pair(Pareto, Gamma, lambda p, q: pareto_gamma_kl(p.scale, p.alpha, q.concentration, _rate(q)))
_pair(Pareto, Normal, lambda p, q: pareto_normal_kl(p.scale, p.alpha, q.loc, q.scale))
_pair(Uniform, Pareto, lambda p, q: uniform_pareto_kl(p.low, p.high, q.scale, q.alpha))
_pair(
    ContinuousBernoulli,
    ContinuousBernoulli,
    lambda p, q: continuous_bernoulli_kl(_cb(p), _cb(q), form=(p.form, q.form)),
)
_pair(
    ContinuousBernoulli,
    Exponential,
    lambda p, q: continuous_bernoulli_exponential_kl(_cb(p), q.rate, form=p.form),
)
_pair(
    ContinuousBernoulli,
    Normal,
    lambda p, q: continuous_bernoulli_normal_kl(_cb(p), q.loc, q.scale, form=p.form),
)
_pair(
    ContinuousBernoulli,
    Uniform,
    lambda p, q: continuous_bernoulli_uniform_kl(_cb(p), q.low, q.high, form=p.form),
)
_pair(
    Beta,
    ContinuousBernoulli,
    lambda p, q: beta_continuous_bernoulli_kl(p.alpha, p.beta, _cb(q), form=q.form),
)
_pair(
    Uniform,
    ContinuousBernoulli,
    lambda p, q: uniform_continuous_bernoulli_kl(p.low, p.high, _cb(q), form=q.form),
)
_pair(Beta, Exponential, lambda p, q: beta_exponential_kl(p.alpha, p.beta, q.rate))
_pair(Beta, Gamma, lambda p, q: beta_gamma_kl(p.alpha, p.beta, q.concentration, _rate(q)))
_pair(Beta, Normal, lambda p, q: beta_normal_kl(p.alpha, p.beta, q.loc, q.scale))
_pair(Beta, Uniform, lambda p, q: beta_uniform_kl(p.alpha, p.beta, q.low, q.high))
_pair(Exponential, Gumbel, lambda p, q: exponential_gumbel_kl(p.rate, q.loc, q.scale))
_pair(Gamma, Gumbel, lambda p, q: gamma_gumbel_kl(p.concentration, _rate(p), q.loc, q.scale))
_pair(Gamma, Normal, lambda p, q: gamma_normal_kl(p.concentration, _rate(p), q.loc, q.scale))
_pair(Gumbel, Normal, lambda p, q: gumbel_normal_kl(p.loc, p.scale, q.loc, q.scale))
_pair(Normal, Gumbel, lambda p, q: normal_gumbel_kl(p.loc, p.scale, q.loc, q.scale))
_pair(Uniform, Beta, lambda p, q: uniform_beta_kl(p.low, p.high, q.alpha, q.beta))
_pair(Uniform, Exponential, lambda p, q: uniform_exponential_kl(p.low, p.high, q.rate))
_pair(Uniform, Gamma, lambda p, q: uniform_gamma_kl(p.low, p.high, q.concentration, _rate(q)))
_pair(Uniform, Gumbel, lambda p, q: uniform_gumbel_kl(p.low, p.high, q.loc, q.scale))
_pair(
    Bernoulli,
    Poisson,
    lambda p, q: bernoulli_poisson_kl(_bern(p), q.rate, form=p.form),
)
_pair(Moyal, Moyal, lambda p, q: moyal_kl(p.loc, p.scale, q.loc, q.scale))
_pair(
    VonMises,
    VonMises,
    lambda p, q: von_mises_kl(p.loc, p.concentration, q.loc, q.concentration),
)
_pair(
    OneHotCategorical,
    OneHotCategorical,
    lambda p, q: categorical_kl(
        p.probs if p.probs is not None else p.logits,
        q.probs if q.probs is not None else q.logits,
        form=(p.form, q.form),
    ),
)
_pair(Wishart, Wishart, lambda p, q: wishart_kl(p.df, p.scale_tril, q.df, q.scale_tril))

# Multivariate normals of different kinds: a DiagNormal is a MultivariateNormal with a diagonal
# Cholesky factor, and a LowRankMultivariateNormal with a zero factor.
_pair(
    LowRankMultivariateNormal,
    MultivariateNormal,
    lambda p, q: lowrank_mvn_mvn_kl(p.loc, p.cov_factor, p.cov_diag, q.loc, q.scale_tril),
)
_pair(
    MultivariateNormal,
    LowRankMultivariateNormal,
    lambda p, q: mvn_lowrank_mvn_kl(p.loc, p.scale_tril, q.loc, q.cov_factor, q.cov_diag),
)


def _diag_parts(d: DiagNormal) -> tuple[Array, Array, Array, Array]:
    """``(mean, std, Cholesky factor diag(std), zero (k, 1) low-rank factor)`` of a DiagNormal,
    in its framework and dtype."""
    xp, (m, lv) = d.arrays()
    shape = tuple(np.broadcast_shapes(tuple(m.shape), tuple(lv.shape)))
    m, lv = xp.broadcast_to(m, shape), xp.broadcast_to(lv, shape)
    k = shape[-1]
    std = xp.exp(lv / 2)
    eye = xp.eye(k, dtype=std.dtype, device=ns.device_of(std))
    zeros = xp.zeros((*shape, 1), dtype=std.dtype, device=ns.device_of(std))
    return m, std, eye * std[..., None, :], zeros


def _diag_mvn(p: DiagNormal, q: MultivariateNormal) -> Array:
    m, _, tril, _ = _diag_parts(p)
    return mvn_kl(m, tril, q.loc, q.scale_tril)


def _mvn_diag(p: MultivariateNormal, q: DiagNormal) -> Array:
    m, _, tril, _ = _diag_parts(q)
    return mvn_kl(p.loc, p.scale_tril, m, tril)


def _diag_lowrank(p: DiagNormal, q: LowRankMultivariateNormal) -> Array:
    m, std, _, zeros = _diag_parts(p)
    return lowrank_mvn_kl(m, zeros, std * std, q.loc, q.cov_factor, q.cov_diag)


def _lowrank_diag(p: LowRankMultivariateNormal, q: DiagNormal) -> Array:
    m, std, _, zeros = _diag_parts(q)
    return lowrank_mvn_kl(p.loc, p.cov_factor, p.cov_diag, m, zeros, std * std)


_pair(DiagNormal, MultivariateNormal, _diag_mvn)
_pair(MultivariateNormal, DiagNormal, _mvn_diag)
_pair(DiagNormal, LowRankMultivariateNormal, _diag_lowrank)
_pair(LowRankMultivariateNormal, DiagNormal, _lowrank_diag)


def _binomial_pair(p: Binomial, q: Binomial) -> Array:
    _, (n_p, _) = p.arrays()
    _, (n_q, _) = q.arrays()
    if ns.is_traced(n_p) or ns.is_traced(n_q):
        # Equal counts cannot be verified on traced values, and the different-count sum needs
        # them on the host: where they differ the answer is NaN, never the equal-count formula.
        xp, _ = p.arrays()
        same = binomial_kl(p.total_count, p.probs, q.probs)
        return xp.where(n_p == n_q, same, xp.nan)
    if not (host(n_p) == host(n_q)).all():
        return _binomial_counts_differ(p, q)
    return binomial_kl(p.total_count, p.probs, q.probs)


# Up to this many extra trials the count term is summed trial by trial (log1p, exact); beyond,
# as a difference of lnΓ (relative rounding of lnΓ(n), fine when the term is that large).
_FEW_EXTRA = 64


def _binomial_counts_differ(p: Binomial, q: Binomial) -> Array:
    """KL(Bin(n_p, a) ‖ Bin(n_q, b)) for different counts (no closed form exists).

    For n_p ≤ n_q, with d = n_q − n_p: ``n_p·KL(Ber(a)‖Ber(b)) − d·log(1 − b) + E[S(k)]``,
    k ~ Bin(n_p, a), ``S(k) = lnC(n_p, k) − lnC(n_q, k) = Σ_{i=1..d} log(1 − k/(n_p + i))``,
    the expectation an exact sum over k = 0..n_p (O(n_p·min(d, 64)) per element). At a = 0 or
    1 (P a point mass) E[S] is S(0) or S(n_p) and its derivative the one-sided
    ``n_p·(S(1) − S(0))`` or ``n_p·(S(n_p) − S(n_p − 1))``. For n_p > n_q, P reaches counts Q
    cannot: +inf unless a = 0, where P is the point mass at 0 and the KL is ``−n_q·log(1 − b)``
    (no gradient with respect to a there: any a > 0 gives +inf).
    """
    spec = (
        ("total_count_p", p.total_count, "any"),
        ("probs_p", p.probs, "any"),
        ("total_count_q", q.total_count, "any"),
        ("probs_q", q.probs, "any"),
    )
    xp, (n_p, a, n_q, b) = params_of(spec, False, counts=("total_count_p", "total_count_q"))
    shape = tuple(np.broadcast_shapes(*(tuple(x.shape) for x in (n_p, a, n_q, b))))
    n_p, a, n_q, b = (xp.broadcast_to(x, shape) for x in (n_p, a, n_q, b))
    dtype, device = a.dtype, ns.device_of(a)
    d = n_q - n_p
    fits = d >= 0
    n = xp.where(fits, n_p, 0.0)  # the sum runs where P fits in Q; elsewhere a dummy
    dd = xp.where(fits, d, 0.0)
    most = int(np.max(host(n))) if math.prod(n.shape) else 0
    k = xp.reshape(xp.arange(most + 1, dtype=dtype, device=device), (most + 1,) + (1,) * len(shape))
    inside = k <= n
    kk = xp.where(inside, k, 0.0)
    sp = ns.special(xp)
    few = int(np.max(host(dd))) <= _FEW_EXTRA if math.prod(dd.shape) else True

    def count_term(at: Array) -> Array:
        if few:
            total = xp.zeros_like(at + n)
            for i in range(1, int(np.max(host(dd))) + 1 if math.prod(dd.shape) else 1):
                step = xp.log1p(-at / (n + i))
                total = total + xp.where(dd >= i, step, 0.0)
            return total
        return (sp.gammaln(n + dd - at + 1) - sp.gammaln(n - at + 1)) - (
            sp.gammaln(n + dd + 1) - sp.gammaln(n + 1)
        )

    # P(k) for a strictly inside (0, 1); the point masses are handled below
    edge = (a == 0) | (a == 1)
    a_in = xp.where(edge, 0.5, a)
    log_pmf = (
        sp.gammaln(n + 1)
        - sp.gammaln(kk + 1)
        - sp.gammaln(n - kk + 1)
        + kk * xp.log(a_in)
        + (n - kk) * xp.log1p(-a_in)
    )
    pmf = xp.where(inside, xp.exp(log_pmf), 0.0)
    s_k = count_term(kk)
    expected = xp.sum(pmf * s_k, axis=0)
    s0, s1 = count_term(xp.zeros_like(n)), count_term(xp.minimum(n, 1.0))
    s_top, s_below = count_term(n), count_term(xp.maximum(n - 1, 0.0))
    at_zero = s0 + a * n * (s1 - s0)
    at_one = s_top + (a - 1) * n * (s_top - s_below)
    expected = xp.where(a == 0, at_zero, xp.where(a == 1, at_one, expected))
    # −d·log(1 − b): 0 for d = 0 even at b = 1 (made safe before the product)
    log_miss = _math.safe_log(xp, 1 - b)
    extra = -xp.where(dd > 0, dd * xp.where(dd > 0, log_miss, 0.0), 0.0)
    fitted = n * bernoulli_kl(a, b) + extra + expected
    point = -n_q * xp.where(a == 0, log_miss, 0.0)
    beyond = xp.where(a == 0, point, INF)
    return xp.where(fits, fitted, xp.where(a == 0, beyond, INF))


_pair(Binomial, Binomial, _binomial_pair)

# Support of P not inside the support of Q: KL = +inf whatever the parameters. Keyed by the
# SUPPORT of each side; only combinations where no parameter can make P's support fit.
_DISJOINT = {
    ("real", "positive"),
    ("real", "unit"),
    ("real", "interval"),
    ("real", "simplex"),
    ("real", "pareto"),
    ("positive", "unit"),
    ("positive", "interval"),
    ("positive", "pareto"),  # every "positive" family has mass near 0, below Pareto's scale
    ("unit", "pareto"),
    ("pareto", "unit"),
    ("pareto", "interval"),
}


def _point_mass_at_zero_or_inf(p: Distribution, q: Distribution, at: float) -> Array:
    """KL of an unbounded count distribution against a bounded one: finite only when P is the
    point mass at 0 (Poisson rate 0, Geometric probs 1: its parameter equals ``at``), where it
    is ``−log Q(0)``."""
    xp, (param,) = p.arrays()
    is_point = param == at
    log_q0 = q.log_prob(xp.zeros((), dtype=param.dtype, device=ns.device_of(param)))
    return xp.where(is_point, xp.where(is_point, -log_q0, 0.0), INF)


for _tp, _at in ((Poisson, 0.0), (Geometric, 1.0)):
    for _tq in (Bernoulli, Binomial):
        _pair(_tp, _tq, lambda p, q, at=_at: _point_mass_at_zero_or_inf(p, q, at))


def _deterministic(p: Deterministic, q: Distribution) -> Array:
    """KL(δ_a ‖ Q) = −log Q(a) for a discrete Q (the only term of the sum over P's support)."""
    return -q.log_prob(p.loc)


def _deterministic_pair(p: Deterministic, q: Deterministic) -> Array:
    xp, (a, b) = params_of((("p.loc", p.loc, "any"), ("q.loc", q.loc, "any")), False)
    return xp.where(a == b, xp.zeros_like(a), INF)  # zeros_like: the dtype of loc


_pair(Deterministic, Deterministic, _deterministic_pair)
for _discrete in (Bernoulli, Binomial, Categorical, Geometric, Poisson):
    _pair(Deterministic, _discrete, _deterministic)


def _independent_pair(p: Independent, q: Independent) -> Array:
    n = p.reinterpreted_batch_ndims
    if n != q.reinterpreted_batch_ndims:
        raise NotImplementedError(
            "No closed-form KL(Independent || Independent) with different "
            f"reinterpreted_batch_ndims ({n} and {q.reinterpreted_batch_ndims}): they are "
            "distributions over spaces of different dimension."
        )
    value = kl(p.base, q.base)
    if n == 0:
        return value
    return ns.namespace(value)[0].sum(value, axis=tuple(range(-n, 0)))


def _same_transform(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # an elementwise == (arrays) or a comparison that is not defined
        return False


def _transformed_pair(p: Transformed, q: Transformed) -> Array:
    if not _same_transform(p.transform, q.transform):
        raise NotImplementedError(
            "No closed-form KL(Transformed || Transformed) with different transforms "
            f"({p.transform!r} and {q.transform!r}): only the same one-to-one map applied to "
            "both sides leaves the KL that of the bases."
        )
    return kl(p.base, q.base)


def _as_independent(d: DiagNormal) -> Independent:
    """A DiagNormal as the Independent normals it is, to meet another Independent."""
    return Independent(Normal(d.mean, _exp(_half(d.logvar)), validate=False), 1)


def _half(x: Array) -> Array:
    return x / 2


_pair(Independent, Independent, _independent_pair)
_pair(DiagNormal, Independent, lambda p, q: _independent_pair(_as_independent(p), q))
_pair(Independent, DiagNormal, lambda p, q: _independent_pair(p, _as_independent(q)))
_pair(Transformed, Transformed, _transformed_pair)


def kl(
    p: Distribution | Any,
    q: Distribution | Any,
    *,
    samples: int | None = None,
    seed: int | None = None,
    key: Any = None,
) -> Array:
    """KL(p‖q) for two distribution objects, over their broadcast batch shape.

    ``p`` and ``q`` are kldiv's objects or those of ``torch.distributions``, TFP (on
    TensorFlow, NumPy or JAX), or distrax, read by
    :func:`kldiv.distributions.interop.as_kldiv`: the result is in their framework and
    differentiates to their parameters.

    Looks up the closed form registered for ``(type(p), type(q))`` (:func:`registered_pairs`
    lists them). Where P's support can never lie inside Q's (a Normal against a Gamma or a
    Pareto, a Poisson against a Bernoulli) the answer is +inf. ``Independent`` pairs sum their
    bases' KL over the reinterpreted axes; ``Transformed`` pairs with equal transforms are
    their bases' KL; a ``Deterministic`` P against a discrete Q is ``−log Q(loc)``.
    Otherwise, with ``samples=n``, returns the Monte-Carlo estimate
    ``mean(log p(x) − log q(x))`` over ``n`` draws ``x ~ p`` (the unbiased k1 estimator;
    its standard error is ``std/√n``), seeded by ``seed`` (NumPy, PyTorch) or ``key`` (JAX);
    draws are reparameterised where the family allows, so the estimate differentiates.
    ``samples`` is only a fallback: a closed form, when one exists, is always used.

    Raises ``NotImplementedError`` naming the pair and listing the registered ones when there is
    neither a closed form nor ``samples``; ``ValueError`` for a continuous against a discrete
    distribution (no common reference measure).
    """
    if not isinstance(p, Distribution) or not isinstance(q, Distribution):
        if any(not isinstance(d, Distribution) and foreign_package(d) is None for d in (p, q)):
            raise TypeError(
                "kl() takes two kldiv.distributions objects (e.g. Normal(0.0, 1.0)) or objects "
                "of torch.distributions, TFP (on TensorFlow, NumPy or JAX), or distrax; for "
                "arrays call the functions, e.g. normal_kl(loc_p, scale_p, loc_q, scale_q), or "
                f"kldiv.kl_div for categorical arrays. Got {type(p).__name__}, {type(q).__name__}."
            )
        p, q = as_kldiv(p), as_kldiv(q)  # a foreign object: read as kldiv's (see interop)
    fn = _REGISTRY.get((type(p), type(q)))
    reason = f"No closed-form KL({type(p).__name__} || {type(q).__name__})"
    if fn is not None:
        return fn(p, q)
    if p.DISCRETE != q.DISCRETE:
        raise ValueError(
            f"KL({type(p).__name__} || {type(q).__name__}) compares a "
            f"{'discrete' if p.DISCRETE else 'continuous'} with a "
            f"{'discrete' if q.DISCRETE else 'continuous'} distribution: neither has a density "
            "with respect to the other, so the divergence is +inf by definition. "
            "Discretise one of them explicitly if an approximation is meant."
        )
    if fn is None and (p.SUPPORT, q.SUPPORT) in _DISJOINT:
        spec = tuple(
            (f"{side}.{n}", getattr(d, n), "any")
            for side, d in (("p", p), ("q", q))
            for n, _ in d.PARAMS
            if getattr(d, n) is not None
        )
        xp, arrays = params_of(spec, False, counts=("p.total_count", "q.total_count"))
        shape = np.broadcast_shapes(p.batch_shape(), q.batch_shape())
        return xp.full(shape, INF, dtype=arrays[0].dtype, device=ns.device_of(arrays[0]))
    if samples is not None:
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 2:
            raise ValueError(f"Expected `samples` to be an int >= 2, got {samples!r}.")
        if p.EVENT_NDIM != q.EVENT_NDIM:
            raise ValueError(
                f"{type(p).__name__} and {type(q).__name__} have events of different "
                f"dimension ({p.EVENT_NDIM} and {q.EVENT_NDIM}): they are not distributions "
                "over the same space."
            )
        x = p.sample(samples, seed=seed, key=key)
        xp, _ = p.arrays()
        return xp.mean(p.log_prob(x) - q.log_prob(x), axis=0)
    raise NotImplementedError(
        f"{reason}. Pass samples=n (and "
        "seed= or key=) for a Monte-Carlo estimate, or register one with @register_kl. "
        "Pairs with a closed form: " + ", ".join(registered_pairs()) + "."
    )
