"""Distribution objects: immutable parameter holders that can sample (for Monte-Carlo KL)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from .. import _math
from .. import _namespace as ns
from .._defaults import BernoulliForm
from ._common import INF, LOG_2PI, Array, check_domain, host, params_of
from ._special import bessel, cb_log_normalizer, cb_logits, mv_gammaln
from .continuous import student_t_log_density
from .discrete import bernoulli_logs
from .multivariate import check_square, check_tril, diag, mT, woodbury

# ---------------------------------------------------------------------------------------------
# Distribution objects, sampling and the registry
# ---------------------------------------------------------------------------------------------


class _Rng:
    """Seeded draws in the caller's framework: NumPy Generator, torch.Generator, a JAX key, or
    TensorFlow's stateless samplers (seeds ``[seed, count]``: no state, so ``tf.function``
    traces them)."""

    def __init__(self, xp: ModuleType, like: Array, seed: int | None, key: Any) -> None:
        self.xp, self.dtype, self.device = xp, like.dtype, ns.device_of(like)
        self.backend = ns.backend_name(xp)
        if self.backend == "jax":
            if key is None:
                raise TypeError("Sampling JAX distributions needs key=jax.random.key(...).")
            self.key, self.count = key, 0
        elif key is not None:
            raise TypeError(f"key= is for JAX arrays; pass seed= for {self.backend} arrays.")
        elif self.backend == "torch":
            import torch

            self.gen: Any = torch.Generator(device=self.device)
            if seed is None:
                self.gen.seed()
            else:
                self.gen.manual_seed(int(seed))
        elif self.backend == "tensorflow":
            self.count = 0
            self.seed = int(np.random.default_rng(seed).integers(2**62))
        else:
            self.gen = np.random.default_rng(seed)

    def _key(self) -> Any:
        import jax

        self.count += 1
        return jax.random.fold_in(self.key, self.count)

    def _tf_seed(self) -> Any:
        """A fresh seed for TensorFlow's stateless samplers."""
        import tensorflow as tf

        self.count += 1
        return tf.constant([self.seed, self.count], dtype=tf.int64)

    def uniform(self, shape: tuple[int, ...]) -> Array:
        """U(0, 1) with 0 excluded (replaced by the smallest normal number)."""
        if self.backend == "tensorflow":
            import tensorflow as tf

            u: Array = tf.random.stateless_uniform(shape, self._tf_seed(), dtype=self.dtype)
        elif self.backend == "jax":
            import jax

            u = jax.random.uniform(self._key(), shape, dtype=self.dtype)
        elif self.backend == "torch":
            import torch

            u = torch.rand(shape, generator=self.gen, dtype=self.dtype, device=self.device)
        else:
            # drawn in the target dtype: float64 draws cast to float32 can round up to 1.0
            single = np.dtype(self.dtype) == np.float32
            u = self.xp.asarray(self.gen.random(shape, dtype=np.float32 if single else np.float64))
        return self.xp.where(u == 0, self.xp.finfo(self.dtype).smallest_normal, u)

    def normal(self, shape: tuple[int, ...]) -> Array:
        if self.backend == "jax":
            import jax

            return jax.random.normal(self._key(), shape, dtype=self.dtype)
        if self.backend == "torch":
            import torch

            return torch.randn(shape, generator=self.gen, dtype=self.dtype, device=self.device)
        if self.backend == "tensorflow":
            import tensorflow as tf

            return tf.random.stateless_normal(shape, self._tf_seed(), dtype=self.dtype)
        return self.xp.asarray(self.gen.standard_normal(shape), dtype=self.dtype)

    def gamma(self, alpha: Array, shape: tuple[int, ...]) -> Array:
        """Standard Gamma(alpha, 1) draws, reparameterised (differentiable in ``alpha``)."""
        alpha = self.xp.broadcast_to(alpha, shape)
        if self.backend == "jax":
            import jax

            return jax.random.gamma(self._key(), alpha, shape, dtype=self.dtype)
        if self.backend == "torch":
            import torch

            # torch's reparameterised gamma uses the global generators; seed them from ours,
            # inside fork_rng over every device that manual_seed touches, so that the
            # caller's random state is left as it was.
            seed = int(torch.randint(2**62, (1,), generator=self.gen, device=self.device))
            cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(seed)
                return torch.distributions.Gamma(alpha, torch.ones_like(alpha)).rsample()
        if self.backend == "tensorflow":
            import tensorflow as tf

            # implicitly reparameterised: the tape differentiates the draws in alpha
            return tf.random.stateless_gamma(shape, self._tf_seed(), alpha, dtype=self.dtype)
        return self.xp.asarray(self.gen.standard_gamma(np.asarray(alpha)), dtype=self.dtype)

    def poisson(self, rate: Array, shape: tuple[int, ...]) -> Array:
        rate = self.xp.broadcast_to(rate, shape)
        if self.backend == "jax":
            import jax

            return jax.random.poisson(self._key(), rate, shape).astype(self.dtype)
        if self.backend == "torch":
            import torch

            return torch.poisson(rate.detach(), generator=self.gen)
        if self.backend == "tensorflow":
            import tensorflow as tf

            rate = tf.stop_gradient(rate)
            return tf.random.stateless_poisson(shape, self._tf_seed(), rate, dtype=self.dtype)
        return self.xp.asarray(self.gen.poisson(np.asarray(rate)), dtype=self.dtype)

    def binomial(self, n: Array, p: Array, shape: tuple[int, ...]) -> Array:
        n, p = self.xp.broadcast_to(n, shape), self.xp.broadcast_to(p, shape)
        if self.backend == "jax":
            import jax

            return jax.random.binomial(self._key(), n, p, shape, dtype=self.dtype)
        if self.backend == "torch":
            import torch

            return torch.binomial(n.detach(), p.detach(), generator=self.gen)
        if self.backend == "tensorflow":
            import tensorflow as tf

            n, p = tf.stop_gradient(n), tf.stop_gradient(p)
            return tf.random.stateless_binomial(shape, self._tf_seed(), n, p, self.dtype)
        draws = self.gen.binomial(np.asarray(n).astype(np.int64), np.asarray(p))
        return self.xp.asarray(draws, dtype=self.dtype)


@dataclass(frozen=True, eq=False, repr=False)
class Distribution:
    """Base of the small immutable distribution objects used by :func:`kl`.

    Fields are the parameters (arrays of one framework, or Python numbers); they broadcast
    against each other to the batch shape. On construction the parameter domains are checked
    when their values are concrete (``validate=False`` skips it, e.g. in a hot loop).
    ``log_prob(x)`` and ``sample(n, seed=..., key=...)`` serve the Monte-Carlo fallback.
    """

    PARAMS: ClassVar[tuple[tuple[str, str], ...]] = ()
    SUPPORT: ClassVar[str] = "real"
    DISCRETE: ClassVar[bool] = False
    EVENT_NDIM: ClassVar[int] = 0
    COUNTS: ClassVar[tuple[str, ...]] = ()

    validate: bool = field(default=True, kw_only=True, repr=False)

    def __post_init__(self) -> None:
        values = [getattr(self, n) for n, _ in self.PARAMS]
        traced = ns.compiling() or any(ns.is_traced(v) for v in values if v is not None)
        if self.validate and not traced:
            self.arrays()  # dtype errors now, not at first use
            for (name, domain), v in zip(self.PARAMS, values, strict=True):
                if v is not None:
                    check_domain(name, v if ns.is_array(v) else np.asarray(v), domain)

    def arrays(self) -> tuple[ModuleType, list[Array]]:
        """``(xp, params)``: the parameters as arrays of one framework and float dtype."""
        spec = tuple((n, getattr(self, n), d) for n, d in self.PARAMS)
        return params_of(spec, False, counts=self.COUNTS)

    def with_value(self, x: Array) -> tuple[ModuleType, list[Array], Array]:
        """``(xp, params, x)`` with ``x`` in the parameters' framework and dtype (Python-number
        parameters follow ``x``; integer values such as counts are cast)."""
        spec = tuple(
            (n, getattr(self, n), d) for n, d in self.PARAMS if getattr(self, n) is not None
        )
        xp, arrays = params_of((*spec, ("value", x, "any")), False, counts=(*self.COUNTS, "value"))
        return xp, arrays[:-1], arrays[-1]

    def batch_shape(self) -> tuple[int, ...]:
        _, arrays = self.arrays()
        shapes = [tuple(a.shape)[: a.ndim - self.EVENT_NDIM] for a in arrays]
        return tuple(np.broadcast_shapes(*shapes))

    def log_prob(self, x: Array) -> Array:
        raise NotImplementedError(f"{type(self).__name__}.log_prob is not implemented.")

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        raise NotImplementedError(f"{type(self).__name__}.sample is not implemented.")

    def sample(self, n: int, *, seed: int | None = None, key: Any = None) -> Array:
        """``n`` draws, shape ``(n, *batch_shape, *event_shape)``; reparameterised where the
        family allows it (gradients reach the parameters on PyTorch and JAX).

        ``seed`` seeds NumPy, PyTorch and TensorFlow; JAX needs ``key``.
        """
        xp, params = self.arrays()
        rng = _Rng(xp, params[0], seed, key)
        return self._draw(rng, (int(n), *self.batch_shape()), params)

    def __repr__(self) -> str:
        def show(v: Any) -> str:
            return (
                f"shape {tuple(v.shape)}"
                if hasattr(v, "shape") and v.ndim
                else repr(float(v) if hasattr(v, "shape") else v)
            )

        inner = ", ".join(
            f"{f.name}={show(getattr(self, f.name))}"
            for f in fields(self)
            if f.name != "validate" and getattr(self, f.name) is not None
        )
        return f"{type(self).__name__}({inner})"


@dataclass(frozen=True, eq=False, repr=False)
class Normal(Distribution):
    """Normal distribution N(loc, scale²)."""

    loc: Array = 0.0
    scale: Array = 1.0
    PARAMS = (("loc", "real"), ("scale", "positive"))

    def log_prob(self, x: Array) -> Array:
        xp, (m, s), x = self.with_value(x)
        z = (x - m) / s
        return -0.5 * z * z - xp.log(s) - 0.5 * LOG_2PI

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        m, s = params
        return m + s * rng.normal(shape)


@dataclass(frozen=True, eq=False, repr=False)
class DiagNormal(Distribution):
    """Diagonal Gaussian from mean and log-variance, event axis last (a VAE posterior)."""

    mean: Array = 0.0
    logvar: Array = 0.0
    PARAMS = (("mean", "real"), ("logvar", "real"))
    EVENT_NDIM = 1

    def log_prob(self, x: Array) -> Array:
        xp, (m, lv), x = self.with_value(x)
        d = x - m
        return -0.5 * xp.sum(d * d * xp.exp(-lv) + lv + LOG_2PI, axis=-1)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        m, lv = params
        k = np.broadcast_shapes(tuple(m.shape), tuple(lv.shape))[-1:]
        return m + rng.xp.exp(0.5 * lv) * rng.normal((*shape, *k))


@dataclass(frozen=True, eq=False, repr=False)
class MultivariateNormal(Distribution):
    """N(loc, L Lᵀ) with ``scale_tril`` L lower triangular with a positive diagonal."""

    loc: Array = None
    scale_tril: Array = None
    PARAMS = (("loc", "real"), ("scale_tril", "real"))
    EVENT_NDIM = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.validate and not ns.compiling() and not ns.is_traced(self.scale_tril):
            _, (m, tril) = self.arrays()
            check_square("scale_tril", tril, m.shape[-1])
            check_tril("scale_tril", tril)

    def batch_shape(self) -> tuple[int, ...]:
        _, (m, tril) = self.arrays()
        return tuple(np.broadcast_shapes(tuple(m.shape)[:-1], tuple(tril.shape)[:-2]))

    def log_prob(self, x: Array) -> Array:
        xp, (m, tril), x = self.with_value(x)
        z = ns.special(xp).solve_tril(tril, (x - m)[..., None])[..., 0]
        k = m.shape[-1]
        return -0.5 * (xp.sum(z * z, axis=-1) + k * LOG_2PI) - xp.sum(
            xp.log(diag(xp, tril)), axis=-1
        )

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        m, tril = params
        eps = rng.normal((*shape, m.shape[-1]))
        return m + (tril @ eps[..., None])[..., 0]


@dataclass(frozen=True, eq=False, repr=False)
class LowRankMultivariateNormal(Distribution):
    """N(loc, W Wᵀ + diag(d)) with ``cov_factor`` W of shape (..., k, r), ``cov_diag`` d > 0."""

    loc: Array = None
    cov_factor: Array = None
    cov_diag: Array = None
    PARAMS = (("loc", "real"), ("cov_factor", "real"), ("cov_diag", "positive"))
    EVENT_NDIM = 1

    def batch_shape(self) -> tuple[int, ...]:
        _, (m, w, d) = self.arrays()
        return tuple(
            np.broadcast_shapes(tuple(m.shape)[:-1], tuple(w.shape)[:-2], tuple(d.shape)[:-1])
        )

    def log_prob(self, x: Array) -> Array:
        xp, (m, w, d), x = self.with_value(x)
        sp = ns.special(xp)
        a, lc, logdet = woodbury(xp, sp, w, d)
        delta = x - m
        b = sp.solve_tril(lc, mT(xp, a) @ delta[..., None])
        maha = xp.sum(delta * delta / d, axis=-1) - xp.sum(b * b, axis=(-2, -1))
        return -0.5 * (maha + logdet + m.shape[-1] * LOG_2PI)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        m, w, d = params
        e_r = rng.normal((*shape, w.shape[-1]))
        e_k = rng.normal((*shape, m.shape[-1]))
        return m + (w @ e_r[..., None])[..., 0] + rng.xp.sqrt(d) * e_k


@dataclass(frozen=True, eq=False, repr=False)
class Laplace(Distribution):
    """Laplace distribution, density exp(−|x − loc| / scale) / (2·scale)."""

    loc: Array = 0.0
    scale: Array = 1.0
    PARAMS = (("loc", "real"), ("scale", "positive"))

    def log_prob(self, x: Array) -> Array:
        xp, (m, b), x = self.with_value(x)
        return -xp.abs(x - m) / b - xp.log(2 * b)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        m, b = params
        # |u| < ½ strictly: u = ±½ would give log1p(−1) = −inf
        half = 0.5 - rng.xp.finfo(m.dtype).eps
        u = rng.xp.clip(rng.uniform(shape) - 0.5, -half, half)
        return m - b * rng.xp.sign(u) * rng.xp.log1p(-2 * rng.xp.abs(u))


@dataclass(frozen=True, eq=False, repr=False)
class Gumbel(Distribution):
    """Gumbel (maximum-value) distribution with location ``loc`` and scale ``scale``."""

    loc: Array = 0.0
    scale: Array = 1.0
    PARAMS = (("loc", "real"), ("scale", "positive"))

    def log_prob(self, x: Array) -> Array:
        xp, (m, b), x = self.with_value(x)
        z = (x - m) / b
        return -(z + xp.exp(-z)) - xp.log(b)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        m, b = params
        return m - b * rng.xp.log(-rng.xp.log(rng.uniform(shape)))


@dataclass(frozen=True, eq=False, repr=False)
class Cauchy(Distribution):
    """Cauchy distribution with location ``loc`` and scale ``scale``."""

    loc: Array = 0.0
    scale: Array = 1.0
    PARAMS = (("loc", "real"), ("scale", "positive"))

    def log_prob(self, x: Array) -> Array:
        xp, (m, g), x = self.with_value(x)
        z = (x - m) / g
        return -math.log(math.pi) - xp.log(g) - xp.log1p(z * z)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        m, g = params
        return m + g * rng.xp.tan(math.pi * (rng.uniform(shape) - 0.5))


@dataclass(frozen=True, eq=False, repr=False)
class StudentT(Distribution):
    """Student's t distribution: ``df`` degrees of freedom, location ``loc``, scale ``scale``."""

    df: Array = 1.0
    loc: Array = 0.0
    scale: Array = 1.0
    PARAMS = (("df", "positive"), ("loc", "real"), ("scale", "positive"))

    def log_prob(self, x: Array) -> Array:
        xp, (v, m, s), x = self.with_value(x)
        z = (x - m) / s
        return student_t_log_density(xp, ns.special(xp), z, v) - xp.log(s)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        v, m, s = params
        g = rng.gamma(v / 2, shape)
        return m + s * rng.normal(shape) * rng.xp.sqrt(v / (2 * g))


@dataclass(frozen=True, eq=False, repr=False)
class Uniform(Distribution):
    """Uniform distribution on the interval [``low``, ``high``]."""

    low: Array = 0.0
    high: Array = 1.0
    PARAMS = (("low", "real"), ("high", "real"))
    SUPPORT = "interval"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.validate and not ns.compiling() and not ns.is_traced(self.low + self.high):
            if not (host(self.arrays()[1][1]) > host(self.arrays()[1][0])).all():
                raise ValueError("Expected `low` < `high` for every Uniform in the batch.")

    def log_prob(self, x: Array) -> Array:
        xp, (lo, hi), x = self.with_value(x)
        x = x
        inside = (x >= lo) & (x <= hi)
        return xp.where(inside, -xp.log(hi - lo), -INF)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        lo, hi = params
        return lo + (hi - lo) * rng.uniform(shape)


@dataclass(frozen=True, eq=False, repr=False)
class Exponential(Distribution):
    """Exponential distribution with rate ``rate`` (mean 1 / rate)."""

    rate: Array = 1.0
    PARAMS = (("rate", "positive"),)
    SUPPORT = "positive"

    def log_prob(self, x: Array) -> Array:
        xp, (lam,), x = self.with_value(x)
        x = x
        return xp.where(x >= 0, xp.log(lam) - lam * x, -INF)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        return -rng.xp.log(rng.uniform(shape)) / params[0]


@dataclass(frozen=True, eq=False, repr=False)
class Gamma(Distribution):
    """Gamma distribution with shape ``concentration`` and rate ``rate``, or its logarithm
    ``log_rate`` (give at most one; the default is rate 1). The log-rate parametrisation keeps
    the KL exact for rates far outside the floating range and differentiates to ``log_rate``.
    """

    concentration: Array = 1.0
    rate: Array = None
    log_rate: Array = None
    PARAMS = (("concentration", "positive"), ("rate", "positive"), ("log_rate", "real"))
    SUPPORT = "positive"

    def __post_init__(self) -> None:
        if self.rate is not None and self.log_rate is not None:
            raise ValueError("Gamma takes at most one of `rate=` and `log_rate=`.")
        if self.rate is None and self.log_rate is None:
            object.__setattr__(self, "rate", 1.0)
        super().__post_init__()

    def arrays(self) -> tuple[ModuleType, list[Array]]:
        """``(xp, [concentration, rate])``, the rate as ``exp(log_rate)`` when given so."""
        xp, (a, b) = self.natural_arrays()
        return xp, [a, b if self.log_rate is None else xp.exp(b)]

    def natural_arrays(self) -> tuple[ModuleType, list[Array]]:
        """``(xp, [concentration, rate or log_rate])``, as given."""
        name = "rate" if self.log_rate is None else "log_rate"
        return params_of(
            (("concentration", self.concentration, "any"), (name, getattr(self, name), "any")),
            False,
        )

    def log_rate_array(self) -> Array:
        """``log β``: ``log_rate`` as given, or the log of ``rate``."""
        xp, (_, b) = self.natural_arrays()
        return b if self.log_rate is not None else xp.log(b)

    def log_prob(self, x: Array) -> Array:
        xp, params, x = self.with_value(x)
        a, b = params[0], params[1] if self.log_rate is None else xp.exp(params[1])
        sp = ns.special(xp)
        pos = x >= 0
        xs = xp.where(pos, x, 1.0)
        val = a * xp.log(b) + _math.xlogy(xp, a - 1, xs) - b * xs - sp.gammaln(a)
        return xp.where(pos, val, -INF)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        a, b = params
        return rng.gamma(a, shape) / b


@dataclass(frozen=True, eq=False, repr=False)
class Beta(Distribution):
    """Beta distribution on [0, 1] with shape parameters ``alpha`` and ``beta``."""

    alpha: Array = 1.0
    beta: Array = 1.0
    PARAMS = (("alpha", "positive"), ("beta", "positive"))
    SUPPORT = "unit"

    def log_prob(self, x: Array) -> Array:
        xp, (a, b), x = self.with_value(x)
        x = x
        sp = ns.special(xp)
        inside = (x >= 0) & (x <= 1)
        xs = xp.where(inside, x, 0.5)
        val = (
            _math.xlogy(xp, a - 1, xs)
            + _math.xlogy(xp, b - 1, 1 - xs)
            - (sp.gammaln(a) + sp.gammaln(b) - sp.gammaln(a + b))
        )
        return xp.where(inside, val, -INF)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        a, b = params
        ga, gb = rng.gamma(a, shape), rng.gamma(b, shape)
        return ga / (ga + gb)


@dataclass(frozen=True, eq=False, repr=False)
class Dirichlet(Distribution):
    """Dirichlet distribution on the simplex, ``concentration`` > 0, event axis last."""

    concentration: Array = None
    PARAMS = (("concentration", "positive"),)
    SUPPORT = "simplex"
    EVENT_NDIM = 1

    def log_prob(self, x: Array) -> Array:
        xp, (a,), x = self.with_value(x)
        sp = ns.special(xp)
        return (
            xp.sum(_math.xlogy(xp, a - 1, x), axis=-1)
            + sp.gammaln(xp.sum(a, axis=-1))
            - xp.sum(sp.gammaln(a), axis=-1)
        )

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        (a,) = params
        g = rng.gamma(a, (*shape, a.shape[-1]))
        return g / rng.xp.sum(g, axis=-1, keepdims=True)


def _one_of(obj: Any, a: str, b: str) -> None:
    if (getattr(obj, a) is None) == (getattr(obj, b) is None):
        raise ValueError(f"{type(obj).__name__} takes exactly one of `{a}=` and `{b}=`.")


class _ProbsOrLogits:
    """Parameters given as ``probs`` or as ``logits``: exactly one of them (the dataclass
    that uses this declares both fields)."""

    probs: Array
    logits: Array

    def __post_init__(self) -> None:
        _one_of(self, "probs", "logits")
        super().__post_init__()  # type: ignore[misc]  # Distribution's, next in the MRO

    def arrays(self) -> tuple[ModuleType, list[Array]]:
        name = "probs" if self.probs is not None else "logits"
        return params_of(((name, getattr(self, name), "any"),), False)

    @property
    def form(self) -> BernoulliForm:
        return "probs" if self.probs is not None else "logits"


@dataclass(frozen=True, eq=False, repr=False)
class Bernoulli(_ProbsOrLogits, Distribution):
    """Bernoulli distribution from ``probs`` (the probability of 1) or ``logits``: give one."""

    probs: Array = None
    logits: Array = None
    PARAMS = (("probs", "unit"), ("logits", "logit"))
    SUPPORT = "binary"
    DISCRETE = True

    def log_prob(self, x: Array) -> Array:
        xp, (t,), x = self.with_value(x)
        l1, l0, _ = bernoulli_logs(xp, t, self.form)
        return xp.where(x == 1, l1, xp.where(x == 0, l0, -INF))

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        (t,) = params
        l1, _, _ = bernoulli_logs(rng.xp, t, self.form)
        return rng.xp.astype(rng.xp.log(rng.uniform(shape)) < l1, t.dtype)


@dataclass(frozen=True, eq=False, repr=False)
class Categorical(_ProbsOrLogits, Distribution):
    """Categorical over the last axis, from ``probs`` or ``logits``; samples are indices."""

    probs: Array = None
    logits: Array = None
    PARAMS = (("probs", "unit"), ("logits", "logit"))
    SUPPORT = "categories"
    DISCRETE = True
    EVENT_NDIM = 1

    def _log_probs(self) -> tuple[ModuleType, Array]:
        xp, (t,) = self.arrays()
        if self.form == "probs":
            return xp, _math.safe_log(xp, t)
        return xp, _math.log_softmax(xp, t, -1)

    def log_prob(self, x: Array) -> Array:
        xp, lp = self._log_probs()
        v = lp.shape[-1]
        idx = xp.asarray(x)[..., None]
        onehot = idx == xp.arange(v, device=ns.device_of(lp))
        return xp.where(xp.any(onehot, axis=-1), xp.sum(xp.where(onehot, lp, 0.0), axis=-1), -INF)

    def sample(self, n: int, *, seed: int | None = None, key: Any = None) -> Array:
        """``n`` category indices per distribution (Gumbel-max), shape ``(n, *batch_shape)``."""
        xp, lp = self._log_probs()
        rng = _Rng(xp, lp, seed, key)
        g = -xp.log(-xp.log(rng.uniform((int(n), *lp.shape))))
        return xp.argmax(lp + g, axis=-1)


@dataclass(frozen=True, eq=False, repr=False)
class Poisson(Distribution):
    """Poisson distribution with ``rate`` ≥ 0 (rate 0 is a point mass at 0)."""

    rate: Array = 1.0
    PARAMS = (("rate", "nonneg"),)
    SUPPORT = "nonneg_int"
    DISCRETE = True

    def log_prob(self, x: Array) -> Array:
        xp, (lam,), k = self.with_value(x)
        sp = ns.special(xp)
        return _math.xlogy(xp, k, lam) - lam - sp.gammaln(k + 1)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        return rng.poisson(params[0], shape)


@dataclass(frozen=True, eq=False, repr=False)
class Geometric(Distribution):
    """Number of failures before the first success, ``probs`` the success probability."""

    probs: Array = 0.5
    PARAMS = (("probs", "unit_open_left"),)
    SUPPORT = "nonneg_int"
    DISCRETE = True

    def log_prob(self, x: Array) -> Array:
        xp, (p,), x = self.with_value(x)
        k = x
        return _math.xlogy(xp, k, 1 - p) + xp.log(p)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        (p,) = params
        return rng.xp.floor(rng.xp.log(rng.uniform(shape)) / rng.xp.log1p(-p))


@dataclass(frozen=True, eq=False, repr=False)
class Binomial(Distribution):
    """Binomial distribution: successes in ``total_count`` trials of probability ``probs``."""

    total_count: Array = 1
    probs: Array = 0.5
    PARAMS = (("total_count", "count"), ("probs", "unit"))
    SUPPORT = "count_n"
    DISCRETE = True
    COUNTS = ("total_count",)

    def log_prob(self, x: Array) -> Array:
        xp, (n, p), x = self.with_value(x)
        k = x
        sp = ns.special(xp)
        comb = sp.gammaln(n + 1) - sp.gammaln(k + 1) - sp.gammaln(n - k + 1)
        val = comb + _math.xlogy(xp, k, p) + _math.xlogy(xp, n - k, 1 - p)
        return xp.where((k >= 0) & (k <= n), val, -INF)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        n, p = params
        return rng.binomial(n, p, shape)


# ---------------------------------------------------------------------------------------------
# Families that are transforms of the ones above, the continuous Bernoulli, the von Mises
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class HalfNormal(Distribution):
    """Half-normal distribution: ``|X|`` for X ~ N(0, scale²), on [0, ∞)."""

    scale: Array = 1.0
    PARAMS = (("scale", "positive"),)
    SUPPORT = "positive"

    def log_prob(self, x: Array) -> Array:
        xp, (s,), x = self.with_value(x)
        z = x / s
        val = 0.5 * math.log(2 / math.pi) - xp.log(s) - 0.5 * z * z
        return xp.where(x >= 0, val, -INF)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        return params[0] * rng.xp.abs(rng.normal(shape))


@dataclass(frozen=True, eq=False, repr=False)
class LogNormal(Distribution):
    """Log-normal distribution: ``e^X`` for X ~ N(loc, scale²)."""

    loc: Array = 0.0
    scale: Array = 1.0
    PARAMS = (("loc", "real"), ("scale", "positive"))
    SUPPORT = "positive"

    def log_prob(self, x: Array) -> Array:
        xp, (m, s), x = self.with_value(x)
        pos = x > 0
        lx = xp.log(xp.where(pos, x, 1.0))
        z = (lx - m) / s
        return xp.where(pos, -0.5 * z * z - xp.log(s) - 0.5 * LOG_2PI - lx, -INF)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        m, s = params
        return rng.xp.exp(m + s * rng.normal(shape))


@dataclass(frozen=True, eq=False, repr=False)
class InverseGamma(Distribution):
    """Inverse-gamma distribution: ``1/X`` for X ~ Gamma(concentration, rate=scale); density
    ``β^α/Γ(α)·x^{−α−1}e^{−β/x}`` (PyTorch calls the scale β ``rate``)."""

    concentration: Array = 1.0
    scale: Array = 1.0
    PARAMS = (("concentration", "positive"), ("scale", "positive"))
    SUPPORT = "positive"

    def log_prob(self, x: Array) -> Array:
        xp, (a, b), x = self.with_value(x)
        pos = x > 0
        xs = xp.where(pos, x, 1.0)
        val = a * xp.log(b) - ns.special(xp).gammaln(a) - (a + 1) * xp.log(xs) - b / xs
        return xp.where(pos, val, -INF)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        a, b = params
        return b / rng.gamma(a, shape)


@dataclass(frozen=True, eq=False, repr=False)
class Chi(Distribution):
    """Chi distribution with ``df`` degrees of freedom: the norm of ``df`` standard normals
    (``√X`` for X ~ χ²(df)). A χ² distribution is ``Gamma(df/2, rate=0.5)``."""

    df: Array = 1.0
    PARAMS = (("df", "positive"),)
    SUPPORT = "positive"

    def log_prob(self, x: Array) -> Array:
        xp, (v,), x = self.with_value(x)
        pos = x >= 0
        xs = xp.where(pos, x, 1.0)
        val = (
            (1 - v / 2) * math.log(2.0)
            - ns.special(xp).gammaln(v / 2)
            + _math.xlogy(xp, v - 1, xs)
            - 0.5 * xs * xs
        )
        return xp.where(pos, val, -INF)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        return rng.xp.sqrt(2 * rng.gamma(params[0] / 2, shape))


@dataclass(frozen=True, eq=False, repr=False)
class Weibull(Distribution):
    """Weibull distribution, density ``(k/λ)(x/λ)^{k−1}e^{−(x/λ)^k}`` on [0, ∞), with
    ``concentration`` k and ``scale`` λ."""

    concentration: Array = 1.0
    scale: Array = 1.0
    PARAMS = (("concentration", "positive"), ("scale", "positive"))
    SUPPORT = "positive"

    def log_prob(self, x: Array) -> Array:
        xp, (k, lam), x = self.with_value(x)
        pos = x >= 0
        z = xp.where(pos, x, 0.0) / lam
        val = xp.log(k) - xp.log(lam) + _math.xlogy(xp, k - 1, z) - z**k
        return xp.where(pos, val, -INF)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        k, lam = params
        return lam * (-rng.xp.log(rng.uniform(shape))) ** (1 / k)


@dataclass(frozen=True, eq=False, repr=False)
class Pareto(Distribution):
    """Pareto distribution, density ``α m^α / x^{α+1}`` on [m, ∞), ``scale`` m and ``alpha`` α
    (TensorFlow Probability calls α ``concentration``)."""

    scale: Array = 1.0
    alpha: Array = 1.0
    PARAMS = (("scale", "positive"), ("alpha", "positive"))
    SUPPORT = "pareto"

    def log_prob(self, x: Array) -> Array:
        xp, (m, a), x = self.with_value(x)
        inside = x >= m
        xs = xp.where(inside, x, m)
        val = xp.log(a) + a * xp.log(m) - (a + 1) * xp.log(xs)
        return xp.where(inside, val, -INF)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        m, a = params
        return m * rng.xp.exp(-rng.xp.log(rng.uniform(shape)) / a)


@dataclass(frozen=True, eq=False, repr=False)
class ContinuousBernoulli(_ProbsOrLogits, Distribution):
    """Continuous Bernoulli distribution on [0, 1] (Loaiza-Ganem & Cunningham, 2019), density
    ``C(λ)·λ^x(1 − λ)^{1−x}`` = ``exp(ηx − A(η))``, from ``probs`` λ ∈ (0, 1) or ``logits``
    η = log(λ/(1 − λ)): give one."""

    probs: Array = None
    logits: Array = None
    PARAMS = (("probs", "unit_open"), ("logits", "real"))
    SUPPORT = "unit"

    def log_prob(self, x: Array) -> Array:
        xp, (t,), x = self.with_value(x)
        eta = cb_logits(xp, t, self.form)
        inside = (x >= 0) & (x <= 1)
        return xp.where(inside, eta * x - cb_log_normalizer(xp, eta), -INF)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        xp = rng.xp
        eta = xp.broadcast_to(cb_logits(xp, params[0], self.form), shape)
        u = rng.uniform(shape)
        # the inverse of F(x) = expm1(ηx)/expm1(η), written for each sign of η so that e^η
        # never overflows; for |η| < 1e-6, its expansion u + ηu(1 − u)/2 (error O(η²))
        tiny = xp.abs(eta) < 1e-6
        e = xp.where(tiny, 1.0, eta)
        neg = xp.log1p(u * xp.expm1(e)) / e
        pos = 1 + xp.log(xp.exp(-xp.abs(e)) - u * xp.expm1(-xp.abs(e))) / e
        return xp.where(tiny, u + eta * u * (1 - u) / 2, xp.where(e > 0, pos, neg))


@dataclass(frozen=True, eq=False, repr=False)
class VonMises(Distribution):
    """Von Mises distribution on the circle, density ``e^{κ cos(x − μ)}/(2π I₀(κ))`` with
    location ``loc`` μ and ``concentration`` κ ≥ 0 (no sampler: its KL is closed-form)."""

    loc: Array = 0.0
    concentration: Array = 1.0
    PARAMS = (("loc", "real"), ("concentration", "nonneg"))
    SUPPORT = "circle"

    def log_prob(self, x: Array) -> Array:
        xp, (m, k), x = self.with_value(x)
        log_i0 = xp.log(bessel(xp).i0e(k)) + k
        return k * xp.cos(x - m) - math.log(2 * math.pi) - log_i0


@dataclass(frozen=True, eq=False, repr=False)
class Moyal(Distribution):
    """Moyal distribution, density ``exp(−(z + e^{−z})/2)/(σ√(2π))``, ``z = (x − loc)/scale``
    (``e^{−z}`` is χ²(1))."""

    loc: Array = 0.0
    scale: Array = 1.0
    PARAMS = (("loc", "real"), ("scale", "positive"))

    def log_prob(self, x: Array) -> Array:
        xp, (m, s), x = self.with_value(x)
        z = (x - m) / s
        return -0.5 * (z + xp.exp(-z)) - 0.5 * LOG_2PI - xp.log(s)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        m, s = params
        z = rng.normal(shape)
        return m - s * rng.xp.log(z * z)


@dataclass(frozen=True, eq=False, repr=False)
class Deterministic(Distribution):
    """The point mass at ``loc``. Against a discrete Q, ``KL(δ_loc ‖ Q) = −log Q(loc)``; against
    another point mass, 0 or +inf; against a continuous Q there is no common reference measure
    (see :func:`kl`)."""

    loc: Array = 0.0
    PARAMS = (("loc", "real"),)
    SUPPORT = "point"
    DISCRETE = True

    def log_prob(self, x: Array) -> Array:
        xp, (m,), x = self.with_value(x)
        return xp.where(x == m, xp.zeros_like(m), -INF)

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        return rng.xp.broadcast_to(params[0], shape)


@dataclass(frozen=True, eq=False, repr=False)
class OneHotCategorical(Categorical):
    """A categorical distribution over one-hot vectors (``probs`` or ``logits`` along the last
    axis): its KL is the categorical one; samples and ``log_prob`` take one-hot vectors."""

    def log_prob(self, x: Array) -> Array:
        xp, lp = self._log_probs()
        x = xp.asarray(x, dtype=lp.dtype, device=ns.device_of(lp))
        return xp.sum(_math.xlogy(xp, x, xp.exp(lp)), axis=-1)

    def sample(self, n: int, *, seed: int | None = None, key: Any = None) -> Array:
        """``n`` one-hot draws, shape ``(n, *batch_shape, k)``."""
        xp, lp = self._log_probs()
        idx = super().sample(n, seed=seed, key=key)
        k = lp.shape[-1]
        return xp.astype(idx[..., None] == xp.arange(k, device=ns.device_of(lp)), lp.dtype)


@dataclass(frozen=True, eq=False, repr=False)
class Wishart(Distribution):
    """Wishart distribution W_k(df, V) over k×k positive-definite matrices, with ``df`` > k − 1
    degrees of freedom and the Cholesky factor ``scale_tril`` L of the scale matrix V = LLᵀ."""

    df: Array = None
    scale_tril: Array = None
    PARAMS = (("df", "positive"), ("scale_tril", "real"))
    SUPPORT = "positive_definite"
    EVENT_NDIM = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.validate and not ns.compiling() and not ns.is_traced(self.scale_tril):
            _, (v, tril) = self.arrays()
            k = tril.shape[-1]
            check_square("scale_tril", tril, k)
            check_tril("scale_tril", tril)
            if not (host(v) > k - 1).all():
                raise ValueError(f"Expected `df` > k − 1 = {k - 1} for every Wishart.")

    def batch_shape(self) -> tuple[int, ...]:
        _, (v, tril) = self.arrays()
        return tuple(np.broadcast_shapes(tuple(v.shape), tuple(tril.shape)[:-2]))

    def log_prob(self, x: Array) -> Array:
        xp, (v, tril), x = self.with_value(x)
        sp = ns.special(xp)
        k = tril.shape[-1]
        cx = sp.cholesky(x)
        half_logdet_x = xp.sum(xp.log(diag(xp, cx)), axis=-1)
        half_logdet_v = xp.sum(xp.log(diag(xp, tril)), axis=-1)
        m = sp.solve_tril(tril, cx)
        trace = xp.sum(m * m, axis=(-2, -1))
        return (
            (v - k - 1) * half_logdet_x
            - 0.5 * trace
            - v * k / 2 * math.log(2.0)
            - v * half_logdet_v
            - mv_gammaln(xp, sp, v / 2, k)
        )

    def _draw(self, rng: _Rng, shape: tuple[int, ...], params: list[Array]) -> Array:
        # Bartlett's decomposition: X = (LA)(LA)ᵀ with A lower triangular, A_ii² ~ χ²(df − i),
        # A_ij ~ N(0, 1) below the diagonal.
        xp = rng.xp
        v, tril = params
        k = tril.shape[-1]
        steps = xp.asarray([i / 2 for i in range(k)], dtype=v.dtype, device=ns.device_of(v))
        chi2 = 2 * rng.gamma(v[..., None] / 2 - steps, (*shape, k))
        eye = xp.eye(k, dtype=v.dtype, device=ns.device_of(v))
        lower = xp.tril(rng.normal((*shape, k, k)), k=-1)
        a = lower + eye * xp.sqrt(chi2)[..., None, :]
        la = tril @ a
        return la @ mT(xp, la)


# ---------------------------------------------------------------------------------------------
# Wrappers: independent batch axes, one-to-one transforms
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class Independent(Distribution):
    """``base`` with its last ``reinterpreted_batch_ndims`` batch axes read as event axes: the
    joint law of independent components, whose KL is the sum of the components' KLs."""

    base: Distribution = None  # type: ignore[assignment]
    reinterpreted_batch_ndims: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.base, Distribution):
            raise TypeError(f"Independent takes a kldiv distribution, got {type(self.base)}.")
        n = self.reinterpreted_batch_ndims
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"Expected `reinterpreted_batch_ndims` to be an int >= 0, got {n!r}.")

    @property
    def DISCRETE(self) -> bool:  # type: ignore[override]
        return self.base.DISCRETE

    @property
    def SUPPORT(self) -> str:  # type: ignore[override]
        return self.base.SUPPORT

    @property
    def EVENT_NDIM(self) -> int:  # type: ignore[override]
        return self.base.EVENT_NDIM + self.reinterpreted_batch_ndims

    def arrays(self) -> tuple[ModuleType, list[Array]]:
        return self.base.arrays()

    def batch_shape(self) -> tuple[int, ...]:
        shape = self.base.batch_shape()
        return shape[: len(shape) - self.reinterpreted_batch_ndims]

    def log_prob(self, x: Array) -> Array:
        lp = self.base.log_prob(x)
        n = self.reinterpreted_batch_ndims
        if n == 0:
            return lp
        xp = ns.namespace(lp)[0]
        return xp.sum(lp, axis=tuple(range(-n, 0)))

    def sample(self, n: int, *, seed: int | None = None, key: Any = None) -> Array:
        return self.base.sample(n, seed=seed, key=key)


@dataclass(frozen=True, eq=False, repr=False)
class Transformed(Distribution):
    """The law of ``T(X)`` for X ~ ``base`` and a one-to-one map T named by ``transform``.

    ``transform`` is any object that compares with ``==`` (a string such as ``"exp"``, a
    ``torch.distributions`` transform or a tuple of them, a TFP bijector). Since KL is
    invariant under a one-to-one map applied to both sides, ``kl`` of two ``Transformed`` with
    equal transforms is the KL of their bases; with different transforms there is no general
    closed form. kldiv does not apply the map: there is no ``log_prob`` or sampler.
    """

    base: Distribution = None  # type: ignore[assignment]
    transform: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.base, Distribution):
            raise TypeError(f"Transformed takes a kldiv distribution, got {type(self.base)}.")

    @property
    def DISCRETE(self) -> bool:  # type: ignore[override]
        return self.base.DISCRETE

    @property
    def SUPPORT(self) -> str:  # type: ignore[override]
        return "transformed"

    @property
    def EVENT_NDIM(self) -> int:  # type: ignore[override]
        return self.base.EVENT_NDIM

    def arrays(self) -> tuple[ModuleType, list[Array]]:
        return self.base.arrays()

    def batch_shape(self) -> tuple[int, ...]:
        return self.base.batch_shape()
