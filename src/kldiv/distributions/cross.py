"""Closed forms between different families (P and Q of different types).

Most are ``KL(P‖Q) = −H(P) − E_P[log q(X)]``, the entropy of P and the expectation of Q's
log-density under P, which needs only a few moments of P: its mean and variance against a
normal, ``E[log X]`` against a gamma or Pareto, ``E[e^{−X/β}]`` against a Gumbel. Where P's
support is not inside Q's the value is +inf (with gradient 0), decided elementwise from the
parameters (a uniform against a beta is finite only for an interval inside [0, 1]).
"""

from __future__ import annotations

import math
from types import ModuleType

from .. import _math
from .. import _namespace as ns
from .._defaults import BernoulliForm
from ._common import EULER_GAMMA, INF, LOG_2PI, Array, loc_scale_pair, params_of
from ._special import (
    beta_entropy,
    cb_entropy,
    cb_log_normalizer,
    cb_logits,
    cb_mean,
    cb_variance,
    gamma_entropy,
    gumbel_cross_entropy,
    log_beta,
    normal_cross_entropy,
    pareto_entropy,
)
from .discrete import bernoulli_logs
from .multivariate import check_ordered

# ---------------------------------------------------------------------------------------------
# Cross-family pairs
# ---------------------------------------------------------------------------------------------


def laplace_normal_kl(
    loc_p: Array, scale_p: Array, loc_q: Array, scale_q: Array, *, check: bool = False
) -> Array:
    """KL(Laplace(μp, b) ‖ N(μq, σ²)) = ``−1 − log 2b + ½ log 2πσ² + (2b² + (μp − μq)²)/(2σ²)``."""
    xp, (mp, b, mq, s) = loc_scale_pair(loc_p, scale_p, loc_q, scale_q, check)
    d = mp - mq
    return (
        -1.0
        - math.log(2.0)
        - xp.log(b)
        + 0.5 * LOG_2PI
        + xp.log(s)
        + (2 * b * b + d * d) / (2 * s * s)
    )


def normal_laplace_kl(
    loc_p: Array, scale_p: Array, loc_q: Array, scale_q: Array, *, check: bool = False
) -> Array:
    """KL(N(μp, σ²) ‖ Laplace(μq, b)) = ``−½ log 2πeσ² + log 2b + E|X − μq|/b``.

    ``E|X − μq| = σ√(2/π)·e^{−δ²/2σ²} + δ·erf(δ/(σ√2))`` with ``δ = μp − μq`` (the mean of a
    folded normal); smooth in δ with gradient 0 at δ = 0.
    """
    xp, (mp, s, mq, b) = loc_scale_pair(loc_p, scale_p, loc_q, scale_q, check)
    sp = ns.special(xp)
    d = mp - mq
    z = d / s
    mean_abs = s * math.sqrt(2 / math.pi) * xp.exp(-0.5 * z * z) + d * sp.erf(z / math.sqrt(2))
    return -0.5 * (LOG_2PI + 1) - xp.log(s) + math.log(2.0) + xp.log(b) + mean_abs / b


def uniform_normal_kl(
    low_p: Array, high_p: Array, loc_q: Array, scale_q: Array, *, check: bool = False
) -> Array:
    """KL(U(a, b) ‖ N(μ, σ²)) = ``−log(b − a) + ½ log 2πσ² + E[(X − μ)²]/(2σ²)``, with
    ``E[(X − μ)²] = (b − a)²/12 + ((a + b)/2 − μ)²``."""
    xp, (lo, hi, m, s) = params_of(
        (
            ("low_p", low_p, "real"),
            ("high_p", high_p, "real"),
            ("loc_q", loc_q, "real"),
            ("scale_q", scale_q, "positive"),
        ),
        check,
    )
    if check:
        check_ordered(("low_p", lo), ("high_p", hi))
    width = hi - lo
    c = (hi + lo) / 2 - m
    return -xp.log(width) + 0.5 * LOG_2PI + xp.log(s) + (width * width / 12 + c * c) / (2 * s * s)


def exponential_normal_kl(
    rate_p: Array, loc_q: Array, scale_q: Array, *, check: bool = False
) -> Array:
    """KL(Exp(λ) ‖ N(μ, σ²)) = ``log λ − 1 + ½ log 2πσ² + (2/λ² − 2μ/λ + μ²)/(2σ²)``."""
    xp, (lam, m, s) = params_of(
        (
            ("rate_p", rate_p, "positive"),
            ("loc_q", loc_q, "real"),
            ("scale_q", scale_q, "positive"),
        ),
        check,
    )
    inv = 1 / lam
    second = 2 * inv * inv - 2 * m * inv + m * m
    return xp.log(lam) - 1 + 0.5 * LOG_2PI + xp.log(s) + second / (2 * s * s)


def exponential_gamma_kl(
    rate_p: Array, concentration_q: Array, rate_q: Array, *, check: bool = False
) -> Array:
    """KL(Exp(λ) ‖ Gamma(α, β)) = ``−α log(β/λ) + β/λ + lnΓ(α) + (α − 1)γ − 1``."""
    xp, (lam, a, b) = params_of(
        (
            ("rate_p", rate_p, "positive"),
            ("concentration_q", concentration_q, "positive"),
            ("rate_q", rate_q, "positive"),
        ),
        check,
    )
    sp = ns.special(xp)
    return -a * (xp.log(b) - xp.log(lam)) + b / lam + sp.gammaln(a) + (a - 1) * EULER_GAMMA - 1


def gamma_exponential_kl(
    concentration_p: Array, rate_p: Array, rate_q: Array, *, check: bool = False
) -> Array:
    """KL(Gamma(α, β) ‖ Exp(λ)) = ``−H(Gamma) − log λ + λα/β``, with
    ``H = α − log β + lnΓ(α) + (1 − α)ψ(α)``."""
    xp, (a, b, lam) = params_of(
        (
            ("concentration_p", concentration_p, "positive"),
            ("rate_p", rate_p, "positive"),
            ("rate_q", rate_q, "positive"),
        ),
        check,
    )
    sp = ns.special(xp)
    entropy = a - xp.log(b) + sp.gammaln(a) + (1 - a) * sp.digamma(a)
    return -entropy - xp.log(lam) + lam * a / b


# ---------------------------------------------------------------------------------------------
# Against a Poisson
# ---------------------------------------------------------------------------------------------


def bernoulli_poisson_kl(
    p: Array,
    rate_q: Array,
    *,
    form: BernoulliForm = "probs",
    check: bool = False,
) -> Array:
    """KL(Bernoulli(p) ‖ Poisson(λ)) = ``p log p + (1 − p) log(1 − p) − p log λ + λ``.

    Q puts ``e^{−λ}`` on 0 and ``λe^{−λ}`` on 1; the mass it puts on 2, 3, ... is not P's
    concern. ``p`` is a probability (``form="probs"``) or a logit (``"logits"``). Zero support
    as in :func:`kldiv.distributions.bernoulli_kl`: ``p = 0`` gives ``λ`` (with finite
    gradients), ``λ = 0`` with ``p > 0`` gives +inf.
    """
    if form not in ("probs", "logits"):
        raise ValueError(f"bernoulli_poisson_kl takes form 'probs' or 'logits', got {form!r}.")
    dom = {"probs": "unit", "logits": "logit"}
    xp, (a, lam) = params_of((("p", p, dom[form]), ("rate_q", rate_q, "nonneg")), check)
    lp1, lp0, pp = bernoulli_logs(xp, a, form)
    lq1 = _math.safe_log(xp, lam) - lam
    one = _math.kl_terms(xp, lp1, lq1, pp)
    return one + _math.kl_terms(xp, lp0, -lam, None if pp is None else 1 - pp)


# ---------------------------------------------------------------------------------------------
# Beta against the families of the half-line and the line
# ---------------------------------------------------------------------------------------------


def _beta(alpha_p: Array, beta_p: Array, rest: tuple, check: bool) -> tuple:
    xp, arrays = params_of(
        (("alpha_p", alpha_p, "positive"), ("beta_p", beta_p, "positive"), *rest), check
    )
    sp = ns.special(xp)
    a, b = arrays[0], arrays[1]
    return xp, sp, a, b, arrays[2:], beta_entropy(sp, a, b), a / (a + b)


def beta_exponential_kl(
    alpha_p: Array, beta_p: Array, rate_q: Array, *, check: bool = False
) -> Array:
    """KL(Beta(α, β) ‖ Exp(λ)) = ``−H(Beta) − log λ + λα/(α + β)``, with
    ``H(Beta) = ln B(α, β) − (α − 1)ψ(α) − (β − 1)ψ(β) + (α + β − 2)ψ(α + β)``."""
    xp, _, _, _, (lam,), h, mean = _beta(alpha_p, beta_p, (("rate_q", rate_q, "positive"),), check)
    return -h - xp.log(lam) + lam * mean


def beta_gamma_kl(
    alpha_p: Array,
    beta_p: Array,
    concentration_q: Array,
    rate_q: Array,
    *,
    check: bool = False,
) -> Array:
    """KL(Beta(α, β) ‖ Gamma(k, r)) = ``−H(Beta) − k log r + lnΓ(k) − (k − 1)E[log X] + rE[X]``
    with ``E[log X] = ψ(α) − ψ(α + β)`` and ``E[X] = α/(α + β)``."""
    xp, sp, a, b, (k, r), h, mean = _beta(
        alpha_p,
        beta_p,
        (("concentration_q", concentration_q, "positive"), ("rate_q", rate_q, "positive")),
        check,
    )
    e_log = sp.digamma(a) - sp.digamma(a + b)
    return -h - k * xp.log(r) + sp.gammaln(k) - (k - 1) * e_log + r * mean


def beta_normal_kl(
    alpha_p: Array, beta_p: Array, loc_q: Array, scale_q: Array, *, check: bool = False
) -> Array:
    """KL(Beta(α, β) ‖ N(μ, σ²)) = ``−H(Beta) + ½ log 2πσ² + (Var X + (E X − μ)²)/(2σ²)`` with
    ``E X = α/(α + β)``, ``Var X = αβ/((α + β)²(α + β + 1))``."""
    xp, _, a, b, (m, s), h, mean = _beta(
        alpha_p, beta_p, (("loc_q", loc_q, "real"), ("scale_q", scale_q, "positive")), check
    )
    n = a + b
    var = a * b / (n * n * (n + 1))
    return -h + normal_cross_entropy(xp, mean, var, m, s)


def beta_uniform_kl(
    alpha_p: Array, beta_p: Array, low_q: Array, high_q: Array, *, check: bool = False
) -> Array:
    """KL(Beta(α, β) ‖ U(a, b)) = ``−H(Beta) + log(b − a)`` where [0, 1] ⊆ [a, b], else +inf."""
    xp, _, _, _, (lo, hi), h, _ = _beta(
        alpha_p, beta_p, (("low_q", low_q, "real"), ("high_q", high_q, "real")), check
    )
    if check:
        check_ordered(("low_q", lo), ("high_q", hi))
    inside = (lo <= 0) & (hi >= 1)
    width = xp.where(inside, hi - lo, 1.0)
    return xp.where(inside, -h + xp.log(width), INF)


def beta_continuous_bernoulli_kl(
    alpha_p: Array,
    beta_p: Array,
    q: Array,
    *,
    form: BernoulliForm = "probs",
    check: bool = False,
) -> Array:
    """KL(Beta(α, β) ‖ CB(λ)) = ``−H(Beta) + A(η) − η·α/(α + β)``: the continuous Bernoulli's
    log-density is ``ηx − A(η)`` (see :func:`kldiv.distributions.continuous_bernoulli_kl`);
    ``q`` is λ (``form="probs"``) or the logit η (``"logits"``)."""
    xp, _, _, _, (t,), h, mean = _beta(alpha_p, beta_p, (("q", q, _cb_domain(form)),), check)
    eta = cb_logits(xp, t, form)
    return -h + cb_log_normalizer(xp, eta) - eta * mean


# ---------------------------------------------------------------------------------------------
# Against a Gumbel, and Gamma/Gumbel against a normal
# ---------------------------------------------------------------------------------------------


def exponential_gumbel_kl(
    rate_p: Array, loc_q: Array, scale_q: Array, *, check: bool = False
) -> Array:
    """KL(Exp(λ) ‖ Gumbel(μ, β)) = ``log λ − 1 + log β + (1/λ − μ)/β + e^{μ/β}·λβ/(1 + λβ)``.

    From ``−log q(x) = log β + z + e^{−z}``, ``z = (x − μ)/β``, and the exponential's moment
    generating function ``E[e^{−X/β}] = λβ/(1 + λβ)``.
    """
    xp, (lam, m, b) = params_of(
        (
            ("rate_p", rate_p, "positive"),
            ("loc_q", loc_q, "real"),
            ("scale_q", scale_q, "positive"),
        ),
        check,
    )
    log_mgf = -xp.log1p(1 / (lam * b))
    return xp.log(lam) - 1 + gumbel_cross_entropy(xp, 1 / lam, log_mgf, m, b)


def gamma_gumbel_kl(
    concentration_p: Array,
    rate_p: Array,
    loc_q: Array,
    scale_q: Array,
    *,
    check: bool = False,
) -> Array:
    """KL(Gamma(k, r) ‖ Gumbel(μ, β)) = ``−H(Gamma) + log β + (k/r − μ)/β +
    exp(μ/β − k·log(1 + 1/(rβ)))``, from ``E[e^{−X/β}] = (1 + 1/(rβ))^{−k}``; ``H(Gamma) =
    k − log r + lnΓ(k) + (1 − k)ψ(k)``."""
    xp, (k, r, m, b) = params_of(
        (
            ("concentration_p", concentration_p, "positive"),
            ("rate_p", rate_p, "positive"),
            ("loc_q", loc_q, "real"),
            ("scale_q", scale_q, "positive"),
        ),
        check,
    )
    sp = ns.special(xp)
    log_mgf = -k * xp.log1p(1 / (r * b))
    return -gamma_entropy(xp, sp, k, r) + gumbel_cross_entropy(xp, k / r, log_mgf, m, b)


def gamma_normal_kl(
    concentration_p: Array,
    rate_p: Array,
    loc_q: Array,
    scale_q: Array,
    *,
    check: bool = False,
) -> Array:
    """KL(Gamma(k, r) ‖ N(μ, σ²)) = ``−H(Gamma) + ½ log 2πσ² + (k/r² + (k/r − μ)²)/(2σ²)``."""
    xp, (k, r, m, s) = params_of(
        (
            ("concentration_p", concentration_p, "positive"),
            ("rate_p", rate_p, "positive"),
            ("loc_q", loc_q, "real"),
            ("scale_q", scale_q, "positive"),
        ),
        check,
    )
    sp = ns.special(xp)
    return -gamma_entropy(xp, sp, k, r) + normal_cross_entropy(xp, k / r, k / (r * r), m, s)


def gumbel_normal_kl(
    loc_p: Array, scale_p: Array, loc_q: Array, scale_q: Array, *, check: bool = False
) -> Array:
    """KL(Gumbel(μp, β) ‖ N(μ, σ²)) = ``−(log β + γ + 1) + ½ log 2πσ² + (π²β²/6 +
    (μp + γβ − μ)²)/(2σ²)``: the Gumbel's entropy, mean ``μp + γβ`` and variance ``π²β²/6``."""
    xp, (mp, b, m, s) = loc_scale_pair(loc_p, scale_p, loc_q, scale_q, check)
    entropy = xp.log(b) + EULER_GAMMA + 1
    var = (math.pi**2 / 6) * b * b
    return -entropy + normal_cross_entropy(xp, mp + EULER_GAMMA * b, var, m, s)


def normal_gumbel_kl(
    loc_p: Array, scale_p: Array, loc_q: Array, scale_q: Array, *, check: bool = False
) -> Array:
    """KL(N(μ, σ²) ‖ Gumbel(m, β)) = ``−½ log 2πeσ² + log β + (μ − m)/β +
    exp((m − μ)/β + σ²/(2β²))``, from the normal's ``E[e^{−X/β}] = e^{−μ/β + σ²/(2β²)}``."""
    xp, (mu, s, m, b) = loc_scale_pair(loc_p, scale_p, loc_q, scale_q, check)
    entropy = 0.5 * (LOG_2PI + 1) + xp.log(s)
    z = s / b
    return -entropy + gumbel_cross_entropy(xp, mu, -mu / b + 0.5 * z * z, m, b)


# ---------------------------------------------------------------------------------------------
# Uniform against the families of the half-line and the unit interval
# ---------------------------------------------------------------------------------------------


def _uniform(low_p: Array, high_p: Array, rest: tuple, check: bool) -> tuple:
    xp, arrays = params_of((("low_p", low_p, "real"), ("high_p", high_p, "real"), *rest), check)
    if check:
        check_ordered(("low_p", arrays[0]), ("high_p", arrays[1]))
    return xp, arrays[0], arrays[1], arrays[2:]


def uniform_mean_log(xp: ModuleType, lo: Array, hi: Array) -> Array:
    """``E[log X]`` for X ~ U(lo, hi), 0 ≤ lo < hi: ``(hi·log hi − lo·log lo)/(hi − lo) − 1``
    (``0·log 0 = 0``, with a finite gradient there)."""
    return (_math.xlogy(xp, hi, hi) - _math.xlogy(xp, lo, lo)) / (hi - lo) - 1


def uniform_beta_kl(
    low_p: Array, high_p: Array, alpha_q: Array, beta_q: Array, *, check: bool = False
) -> Array:
    """KL(U(a, b) ‖ Beta(α, β)) = ``−log(b − a) + ln B(α, β) − (α − 1)E[log X] −
    (β − 1)E[log(1 − X)]`` where [a, b] ⊆ [0, 1], else +inf.

    ``E[log X] = (b log b − a log a)/(b − a) − 1`` and ``E[log(1 − X)]`` likewise with
    ``1 − b``, ``1 − a``; the endpoints 0 and 1 are allowed (``0·log 0 = 0``; the one-sided
    gradient there is infinite and is reported as its finite limit of the ``x log x`` term
    dropped, i.e. the gradient of the other terms).
    """
    xp, lo, hi, (a, b) = _uniform(
        low_p, high_p, (("alpha_q", alpha_q, "positive"), ("beta_q", beta_q, "positive")), check
    )
    sp = ns.special(xp)
    inside = (lo >= 0) & (hi <= 1)
    lo_s, hi_s = xp.where(inside, lo, 0.25), xp.where(inside, hi, 0.75)
    e_log = uniform_mean_log(xp, lo_s, hi_s)
    e_log1m = uniform_mean_log(xp, 1 - hi_s, 1 - lo_s)
    value = -xp.log(hi_s - lo_s) + log_beta(sp, a, b) - (a - 1) * e_log - (b - 1) * e_log1m
    return xp.where(inside, value, INF)


def uniform_exponential_kl(
    low_p: Array, high_p: Array, rate_q: Array, *, check: bool = False
) -> Array:
    """KL(U(a, b) ‖ Exp(λ)) = ``−log(b − a) − log λ + λ(a + b)/2`` where ``a ≥ 0``, else +inf."""
    xp, lo, hi, (lam,) = _uniform(low_p, high_p, (("rate_q", rate_q, "positive"),), check)
    value = -xp.log(hi - lo) - xp.log(lam) + lam * (lo + hi) / 2
    return xp.where(lo >= 0, value, INF)


def uniform_gamma_kl(
    low_p: Array,
    high_p: Array,
    concentration_q: Array,
    rate_q: Array,
    *,
    check: bool = False,
) -> Array:
    """KL(U(a, b) ‖ Gamma(k, r)) = ``−log(b − a) − k log r + lnΓ(k) − (k − 1)E[log X] +
    r(a + b)/2`` where ``a ≥ 0``, else +inf; ``E[log X] = (b log b − a log a)/(b − a) − 1``."""
    xp, lo, hi, (k, r) = _uniform(
        low_p,
        high_p,
        (("concentration_q", concentration_q, "positive"), ("rate_q", rate_q, "positive")),
        check,
    )
    sp = ns.special(xp)
    inside = lo >= 0
    lo_s, hi_s = xp.where(inside, lo, 0.0), xp.where(inside, hi, 1.0)
    e_log = uniform_mean_log(xp, lo_s, hi_s)
    value = (
        -xp.log(hi_s - lo_s)
        - k * xp.log(r)
        + sp.gammaln(k)
        - (k - 1) * e_log
        + r * (lo_s + hi_s) / 2
    )
    return xp.where(inside, value, INF)


def uniform_gumbel_kl(
    low_p: Array, high_p: Array, loc_q: Array, scale_q: Array, *, check: bool = False
) -> Array:
    """KL(U(a, b) ‖ Gumbel(μ, β)) = ``−log(b − a) + log β + ((a + b)/2 − μ)/β +
    (β/(b − a))·e^{(μ − a)/β}·(1 − e^{−(b − a)/β})``, from ``E[e^{−X/β}]`` of the uniform."""
    xp, lo, hi, (m, b) = _uniform(
        low_p, high_p, (("loc_q", loc_q, "real"), ("scale_q", scale_q, "positive")), check
    )
    w = hi - lo
    log_mgf = xp.log(b) - xp.log(w) - lo / b + xp.log(-xp.expm1(-w / b))
    return -xp.log(w) + gumbel_cross_entropy(xp, (lo + hi) / 2, log_mgf, m, b)


def uniform_continuous_bernoulli_kl(
    low_p: Array,
    high_p: Array,
    q: Array,
    *,
    form: BernoulliForm = "probs",
    check: bool = False,
) -> Array:
    """KL(U(a, b) ‖ CB(λ)) = ``−log(b − a) − η(a + b)/2 + A(η)`` where [a, b] ⊆ [0, 1], else
    +inf (η the logit of λ, ``A`` as in :func:`kldiv.distributions.continuous_bernoulli_kl`)."""
    xp, lo, hi, (t,) = _uniform(low_p, high_p, (("q", q, _cb_domain(form)),), check)
    eta = cb_logits(xp, t, form)
    value = -xp.log(hi - lo) - eta * (lo + hi) / 2 + cb_log_normalizer(xp, eta)
    return xp.where((lo >= 0) & (hi <= 1), value, INF)


def uniform_pareto_kl(
    low_p: Array, high_p: Array, scale_q: Array, alpha_q: Array, *, check: bool = False
) -> Array:
    """KL(U(a, b) ‖ Pareto(m, α)) = ``−log(b − a) − log α − α log m + (α + 1)E[log X]`` where
    ``a ≥ m``, else +inf; ``E[log X] = (b log b − a log a)/(b − a) − 1``."""
    xp, lo, hi, (m, a) = _uniform(
        low_p, high_p, (("scale_q", scale_q, "positive"), ("alpha_q", alpha_q, "positive")), check
    )
    inside = lo >= m
    lo_s, hi_s = xp.where(inside, lo, 1.0), xp.where(inside, hi, 2.0)
    e_log = uniform_mean_log(xp, lo_s, hi_s)
    value = -xp.log(hi_s - lo_s) - xp.log(a) - a * xp.log(m) + (a + 1) * e_log
    return xp.where(inside, value, INF)


# ---------------------------------------------------------------------------------------------
# Continuous Bernoulli against other families
# ---------------------------------------------------------------------------------------------


def _cb_domain(form: str) -> str:
    if form not in ("probs", "logits"):
        raise ValueError(f"A continuous Bernoulli takes form 'probs' or 'logits', got {form!r}.")
    return "unit_open" if form == "probs" else "real"


def continuous_bernoulli_exponential_kl(
    p: Array, rate_q: Array, *, form: BernoulliForm = "probs", check: bool = False
) -> Array:
    """KL(CB(λ) ‖ Exp(r)) = ``−H(CB) − log r + r·E[X]``, with ``H(CB) = A(η) − η A′(η)`` and
    ``E[X] = A′(η)`` (see :func:`kldiv.distributions.continuous_bernoulli_kl`)."""
    xp, (t, r) = params_of((("p", p, _cb_domain(form)), ("rate_q", rate_q, "positive")), check)
    eta = cb_logits(xp, t, form)
    return -cb_entropy(xp, eta) - xp.log(r) + r * cb_mean(xp, eta)


def continuous_bernoulli_normal_kl(
    p: Array,
    loc_q: Array,
    scale_q: Array,
    *,
    form: BernoulliForm = "probs",
    check: bool = False,
) -> Array:
    """KL(CB(λ) ‖ N(μ, σ²)) = ``−H(CB) + ½ log 2πσ² + (Var X + (E X − μ)²)/(2σ²)`` with
    ``E X = A′(η)``, ``Var X = A″(η) = 1/η² − 1/(4 sinh²(η/2))`` (1/12 at λ = ½, evaluated
    by its series near there)."""
    xp, (t, m, s) = params_of(
        (("p", p, _cb_domain(form)), ("loc_q", loc_q, "real"), ("scale_q", scale_q, "positive")),
        check,
    )
    eta = cb_logits(xp, t, form)
    return -cb_entropy(xp, eta) + normal_cross_entropy(
        xp, cb_mean(xp, eta), cb_variance(xp, eta), m, s
    )


def continuous_bernoulli_uniform_kl(
    p: Array,
    low_q: Array,
    high_q: Array,
    *,
    form: BernoulliForm = "probs",
    check: bool = False,
) -> Array:
    """KL(CB(λ) ‖ U(a, b)) = ``−H(CB) + log(b − a)`` where [0, 1] ⊆ [a, b], else +inf."""
    xp, (t, lo, hi) = params_of(
        (("p", p, _cb_domain(form)), ("low_q", low_q, "real"), ("high_q", high_q, "real")),
        check,
    )
    if check:
        check_ordered(("low_q", lo), ("high_q", hi))
    eta = cb_logits(xp, t, form)
    inside = (lo <= 0) & (hi >= 1)
    width = xp.where(inside, hi - lo, 1.0)
    return xp.where(inside, -cb_entropy(xp, eta) + xp.log(width), INF)


# ---------------------------------------------------------------------------------------------
# Pareto against the families of the half-line and the line; Weibull against a gamma
# ---------------------------------------------------------------------------------------------


def _pareto(scale_p: Array, alpha_p: Array, rest: tuple, check: bool, above: float) -> tuple:
    """Pareto parameters, with ``alpha`` replaced by 2·above where α ≤ above (where the moment
    the pair needs is infinite and the value +inf): no inf or NaN reaches the gradients."""
    xp, arrays = params_of(
        (("scale_p", scale_p, "positive"), ("alpha_p", alpha_p, "positive"), *rest), check
    )
    m, a = arrays[0], arrays[1]
    finite = a > above
    a_s = xp.where(finite, a, 2.0 * above)
    return xp, m, a_s, finite, arrays[2:], pareto_entropy(xp, m, a_s)


def pareto_exponential_kl(
    scale_p: Array, alpha_p: Array, rate_q: Array, *, check: bool = False
) -> Array:
    """KL(Pareto(m, α) ‖ Exp(λ)) = ``−H(Pareto) − log λ + λ·αm/(α − 1)`` for α > 1, +inf for
    α ≤ 1 (P's mean is infinite); ``H(Pareto) = log(m/α) + 1/α + 1``."""
    xp, m, a, finite, (lam,), h = _pareto(
        scale_p, alpha_p, (("rate_q", rate_q, "positive"),), check, 1.0
    )
    value = -h - xp.log(lam) + lam * a * m / (a - 1)
    return xp.where(finite, value, INF)


def pareto_gamma_kl(
    scale_p: Array,
    alpha_p: Array,
    concentration_q: Array,
    rate_q: Array,
    *,
    check: bool = False,
) -> Array:
    """KL(Pareto(m, α) ‖ Gamma(k, r)) = ``−H(Pareto) − k log r + lnΓ(k) − (k − 1)(log m + 1/α)
    + r·αm/(α − 1)`` for α > 1, +inf for α ≤ 1 (P's mean is infinite)."""
    xp, m, a, finite, (k, r), h = _pareto(
        scale_p,
        alpha_p,
        (("concentration_q", concentration_q, "positive"), ("rate_q", rate_q, "positive")),
        check,
        1.0,
    )
    sp = ns.special(xp)
    e_log = xp.log(m) + 1 / a
    value = -h - k * xp.log(r) + sp.gammaln(k) - (k - 1) * e_log + r * a * m / (a - 1)
    return xp.where(finite, value, INF)


def pareto_normal_kl(
    scale_p: Array, alpha_p: Array, loc_q: Array, scale_q: Array, *, check: bool = False
) -> Array:
    """KL(Pareto(m, α) ‖ N(μ, σ²)) = ``−H(Pareto) + ½ log 2πσ² + (Var X + (E X − μ)²)/(2σ²)``
    with ``E X = αm/(α − 1)``, ``Var X = αm²/((α − 1)²(α − 2))``, for α > 2; +inf for α ≤ 2
    (P's variance is infinite)."""
    xp, m, a, finite, (mu, s), h = _pareto(
        scale_p, alpha_p, (("loc_q", loc_q, "real"), ("scale_q", scale_q, "positive")), check, 2.0
    )
    mean = a * m / (a - 1)
    var = mean * mean / (a * (a - 2))
    return xp.where(finite, -h + normal_cross_entropy(xp, mean, var, mu, s), INF)


def weibull_gamma_kl(
    concentration_p: Array,
    scale_p: Array,
    concentration_q: Array,
    rate_q: Array,
    *,
    check: bool = False,
) -> Array:
    """KL(Weibull(k, λ) ‖ Gamma(α, β)) = ``log k − α log(βλ) + lnΓ(α) + γ(α/k − 1) +
    βλ·Γ(1 + 1/k) − 1``, from the Weibull's entropy ``γ(1 − 1/k) + log(λ/k) + 1``,
    ``E[log X] = log λ − γ/k`` and ``E[X] = λΓ(1 + 1/k)``."""
    xp, (k, lam, a, b) = params_of(
        (
            ("concentration_p", concentration_p, "positive"),
            ("scale_p", scale_p, "positive"),
            ("concentration_q", concentration_q, "positive"),
            ("rate_q", rate_q, "positive"),
        ),
        check,
    )
    sp = ns.special(xp)
    log_bl = xp.log(b) + xp.log(lam)
    return (
        xp.log(k)
        - a * log_bl
        + sp.gammaln(a)
        + EULER_GAMMA * (a / k - 1)
        + xp.exp(log_bl + sp.gammaln(1 + 1 / k))
        - 1
    )
