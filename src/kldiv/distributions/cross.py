"""Closed forms between different families (P and Q of different types)."""

from __future__ import annotations

import math

from .. import _namespace as ns
from ._common import EULER_GAMMA, LOG_2PI, Array, loc_scale_pair, params_of
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
