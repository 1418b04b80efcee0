"""Special functions of the closed forms that the backends do not share: the continuous
Bernoulli's log-normaliser and its derivatives, scaled Bessel functions, the multivariate
gamma function, and the entropies and moments that several cross-family pairs use."""

from __future__ import annotations

import math
from fractions import Fraction
from types import ModuleType, SimpleNamespace
from typing import Any

from .. import _namespace as ns
from ._common import LOG_2PI, Array

# ---------------------------------------------------------------------------------------------
# The continuous Bernoulli's log-normaliser A(η) = log((e^η − 1)/η) and its derivatives
# ---------------------------------------------------------------------------------------------


def _bernoulli_numbers(n: int) -> list[Fraction]:
    """B_0 .. B_n (B_1 = −½), exactly, by the recurrence Σ_{j<m+1} C(m+1, j) B_j = 0."""
    b = [Fraction(1)]
    for m in range(1, n + 1):
        b.append(-sum((math.comb(m + 1, j) * b[j] for j in range(m)), Fraction(0)) / (m + 1))
    return b


# A(η) = η/2 + Σ_{n≥1} B_2n η^2n / (2n·(2n)!): the log of the generating function of the
# Bernoulli numbers, (e^η − 1)/η = Σ B⁺_m η^m/(m+1)! with radius 2π. With |η| < 1 each term is
# below the previous one by (η/2π)² < 0.026, so 12 terms leave a truncation error below 1e-19
# relative (for A, A′ and A″ alike).
_SERIES_TERMS = 12
_SERIES_CUTOFF = 1.0
_B = _bernoulli_numbers(2 * _SERIES_TERMS)
_A_COEF = [float(_B[2 * n] / (2 * n * math.factorial(2 * n))) for n in range(1, _SERIES_TERMS + 1)]
_DA_COEF = [float(_B[2 * n] / math.factorial(2 * n)) for n in range(1, _SERIES_TERMS + 1)]
_D2A_COEF = [
    float(_B[2 * n] * (2 * n - 1) / math.factorial(2 * n)) for n in range(1, _SERIES_TERMS + 1)
]


def _horner(coef: list[float], x: Array) -> Array:
    out: Array = coef[-1]
    for c in reversed(coef[:-1]):
        out = out * x + c
    return out


def _split(xp: ModuleType, eta: Array) -> tuple[Array, Array, Array]:
    """``(small, η for the series, η for the direct formula)``; each branch sees only values
    where it is exact and finite (the double ``where``: no NaN gradient from the other)."""
    small = xp.abs(eta) < _SERIES_CUTOFF
    return small, xp.where(small, eta, 0.0), xp.where(small, 1.0, eta)


def cb_log_normalizer(xp: ModuleType, eta: Array) -> Array:
    """``A(η) = log((e^η − 1)/η)`` (``A(0) = 0``) for the natural parameter (logit) ``η``.

    ``max(η, 0) + log(−expm1(−|η|)) − log|η|`` for ``|η| ≥ 1`` (no overflow at any ``η``), the
    Bernoulli-number series below (no cancellation near 0); relative error a few ``eps``.
    """
    small, es, ed = _split(xp, eta)
    a = ed
    direct = xp.where(a > 0, a, 0.0) + xp.log(-xp.expm1(-xp.abs(a))) - xp.log(xp.abs(a))
    series = es / 2 + es * es * _horner(_A_COEF, es * es)
    return xp.where(small, series, direct)


def cb_mean(xp: ModuleType, eta: Array) -> Array:
    """``A′(η) = E[X] = 1/(1 − e^{−η}) − 1/η`` (½ at ``η = 0``); with ``a = |η|`` the first
    term is ``1/(1 − e^{−a})`` for η > 0 and ``−e^{−a}/(1 − e^{−a})`` for η < 0 (no overflow)."""
    small, es, ed = _split(xp, eta)
    a = xp.abs(ed)
    den = -xp.expm1(-a)
    direct = xp.where(ed > 0, 1.0, -xp.exp(-a)) / den - 1 / ed
    series = 0.5 + es * _horner(_DA_COEF, es * es)
    return xp.where(small, series, direct)


def cb_variance(xp: ModuleType, eta: Array) -> Array:
    """``A″(η) = Var[X] = 1/η² − 1/(4 sinh²(η/2))`` (1/12 at ``η = 0``), with
    ``1/(4 sinh²(η/2)) = e^{−|η|}/(1 − e^{−|η|})²`` (no overflow)."""
    small, es, ed = _split(xp, eta)
    a = xp.abs(ed)
    den = -xp.expm1(-a)
    direct = 1 / (ed * ed) - xp.exp(-a) / (den * den)
    series = _horner(_D2A_COEF, es * es)
    return xp.where(small, series, direct)


def cb_logits(xp: ModuleType, x: Array, form: str) -> Array:
    """The natural parameter η of a continuous Bernoulli given ``probs`` λ or ``logits``:
    ``log λ − log(1 − λ)``."""
    if form == "logits":
        return x
    return xp.log(x) - xp.log1p(-x)


def cb_entropy(xp: ModuleType, eta: Array) -> Array:
    """``H = A(η) − η·A′(η)``: the density is ``exp(ηx − A(η))`` on [0, 1]."""
    return cb_log_normalizer(xp, eta) - eta * cb_mean(xp, eta)


# ---------------------------------------------------------------------------------------------
# Bessel functions and the multivariate gamma function
# ---------------------------------------------------------------------------------------------


class _Bessel:
    """Exponentially scaled modified Bessel functions ``i0e(x) = e^{−|x|} I₀(x)`` and ``i1e``,
    from the backend (``torch.special``, ``jax.scipy.special``, ``tf.math.special``, SciPy),
    differentiable."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def i0e(self, x: Array) -> Array:
        return self._mod().i0e(x)

    def i1e(self, x: Array) -> Array:
        return self._mod().i1e(x)

    def _mod(self) -> Any:
        if self.backend == "torch":
            import torch

            return torch.special
        if self.backend == "jax":
            import jax.scipy.special as jsp

            return jsp
        if self.backend == "tensorflow":
            import tensorflow as tf

            sp = tf.math.special
            return SimpleNamespace(i0e=sp.bessel_i0e, i1e=sp.bessel_i1e)
        import scipy.special

        return scipy.special


_BESSEL = {name: _Bessel(name) for name in ("torch", "jax", "numpy", "tensorflow")}


def bessel(xp: ModuleType) -> _Bessel:
    b = ns.backend_name(xp)
    if b not in _BESSEL:
        raise TypeError(f"Bessel functions are not available for {b} arrays.")
    return _BESSEL[b]


def mv_gammaln(xp: ModuleType, sp: Any, a: Array, k: int) -> Array:
    """``log Γ_k(a) = k(k − 1)/4·log π + Σ_{i<k} lnΓ(a − i/2)``."""
    half = xp.asarray([i / 2 for i in range(k)], dtype=a.dtype, device=ns.device_of(a))
    return k * (k - 1) / 4 * math.log(math.pi) + xp.sum(sp.gammaln(a[..., None] - half), axis=-1)


def mv_digamma(xp: ModuleType, sp: Any, a: Array, k: int) -> Array:
    """``ψ_k(a) = Σ_{i<k} ψ(a − i/2)``, the derivative of :func:`mv_gammaln`."""
    half = xp.asarray([i / 2 for i in range(k)], dtype=a.dtype, device=ns.device_of(a))
    return xp.sum(sp.digamma(a[..., None] - half), axis=-1)


# ---------------------------------------------------------------------------------------------
# Entropies and moments shared by the cross-family pairs (KL(P‖Q) = −H(P) − E_P[log q])
# ---------------------------------------------------------------------------------------------


def log_beta(sp: Any, a: Array, b: Array) -> Array:
    return sp.gammaln(a) + sp.gammaln(b) - sp.gammaln(a + b)


def beta_entropy(sp: Any, a: Array, b: Array) -> Array:
    """``ln B(α, β) − (α − 1)ψ(α) − (β − 1)ψ(β) + (α + β − 2)ψ(α + β)``."""
    return (
        log_beta(sp, a, b)
        - (a - 1) * sp.digamma(a)
        - (b - 1) * sp.digamma(b)
        + (a + b - 2) * sp.digamma(a + b)
    )


def gamma_entropy(xp: ModuleType, sp: Any, a: Array, rate: Array) -> Array:
    """``α − log β + lnΓ(α) + (1 − α)ψ(α)`` (shape α, rate β)."""
    return a - xp.log(rate) + sp.gammaln(a) + (1 - a) * sp.digamma(a)


def normal_cross_entropy(
    xp: ModuleType, mean: Array, var: Array, loc: Array, scale: Array
) -> Array:
    """``−E[log N(X; μ, σ²)] = ½ log 2πσ² + (Var X + (E X − μ)²)/(2σ²)``."""
    d = mean - loc
    return 0.5 * LOG_2PI + xp.log(scale) + (var + d * d) / (2 * scale * scale)


def gumbel_cross_entropy(
    xp: ModuleType, mean: Array, log_mgf: Array, loc: Array, scale: Array
) -> Array:
    """``−E[log Gumbel(X; μ, β)] = log β + (E X − μ)/β + exp(μ/β + log E[e^{−X/β}])``; the
    caller gives ``log_mgf = log E[e^{−X/β}]``."""
    return xp.log(scale) + (mean - loc) / scale + xp.exp(loc / scale + log_mgf)


def pareto_entropy(xp: ModuleType, scale: Array, alpha: Array) -> Array:
    """``log(m/α) + 1/α + 1`` (scale m, shape α)."""
    return xp.log(scale) - xp.log(alpha) + 1 / alpha + 1
