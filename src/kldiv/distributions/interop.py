"""Distribution objects of other libraries as kldiv's: ``as_kldiv(obj)``, used by ``kl(P, Q)``.

Accepted: ``torch.distributions``, TensorFlow Probability on TensorFlow
(``tfp.distributions``) and on its NumPy and JAX substrates
(``tfp.substrates.numpy.distributions``, ``tfp.substrates.jax.distributions``), and distrax.
The parameters are read from the object as they are, never detached or copied, so the KL
comes out in the object's framework (and dtype, half precision aside), torch autograd reaches
the object's parameter tensors, ``tf.GradientTape`` its ``tf.Variable``s (TensorFlow tensors
are computed by TensorFlow's own operations, see :mod:`kldiv._namespace_tf`), and
``jax.grad``/``jax.jit`` and ``tf.function`` trace through them.

Half-precision parameters give a float32 KL, as everywhere in kldiv; the library's own KL
keeps their dtype. Domain checks follow the object: an object built with
``validate_args=False`` is read without them (they read the values on the host).

The package is recognised from the class's module (``type(obj).__mro__``), so nothing is
imported here: an object of a framework exists only once that framework is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import _namespace as ns
from ._common import Array, host
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

__all__ = ["as_kldiv", "foreign_package", "supported"]

_Convert = Callable[[Any, bool], Distribution]

# module prefix -> the package's name in messages; the substrates before TFP itself
_PACKAGES = (
    ("torch.distributions", "torch.distributions"),
    ("tensorflow_probability.substrates.numpy", "TFP on NumPy"),
    ("tensorflow_probability.substrates.jax", "TFP on JAX"),
    ("tensorflow_probability", "TFP on TensorFlow"),
    ("distrax", "distrax"),
)


def _package_of(cls: type) -> str | None:
    mod = getattr(cls, "__module__", None) or ""
    for prefix, name in _PACKAGES:
        if mod == prefix or mod.startswith(prefix + "."):
            return name
    return None


def foreign_package(obj: Any) -> str | None:
    """The package a distribution object comes from (``"torch.distributions"``, ``"TFP on
    NumPy"``, ``"TFP on JAX"``, ``"TFP on TensorFlow"``, ``"distrax"``), or ``None``: the
    first class of its MRO defined in one of them (a subclass of theirs counts)."""
    for cls in type(obj).__mro__:
        pkg = _package_of(cls)
        if pkg is not None:
            return pkg
    return None


def _validates(obj: Any, pkg: str) -> bool:
    """Whether the object asked for its arguments to be checked."""
    if pkg == "torch.distributions":
        return bool(getattr(obj, "_validate_args", True))
    if pkg.startswith("TFP"):
        return bool(getattr(obj, "validate_args", True))
    return True


def _xp(x: Array) -> Any:
    return ns.namespace(x)[0]


def _logvar(scale: Array) -> Array:
    """2·log|scale|: the log-variance of a diagonal Gaussian from its scale (TFP and distrax
    allow a negative scale diagonal; the covariance is its square)."""
    xp = _xp(scale)
    return 2 * xp.log(xp.abs(scale))


def _zeros_loc(loc: Array | None, like: Array) -> Array:
    """``loc``, or zeros shaped like the event vector of ``like`` (a (..., k) array)."""
    if loc is not None:
        return loc
    xp = _xp(like)
    return xp.zeros(tuple(like.shape), dtype=like.dtype)


def _as_lower(tri: Array, is_lower: bool) -> Array:
    """A lower-triangular factor of ``S Sᵀ`` for a triangular ``S`` (upper: its Cholesky)."""
    if is_lower:
        return _positive_diagonal(tri)
    xp = _xp(tri)
    return ns.special(xp).cholesky(tri @ xp.matrix_transpose(tri))


def _positive_diagonal(tril: Array) -> Array:
    """The Cholesky factor of ``L Lᵀ`` for a lower-triangular ``L`` with a nonzero diagonal of
    either sign (TFP and distrax accept both): each column times the sign of its diagonal
    entry, which leaves ``L Lᵀ`` unchanged."""
    xp = _xp(tril)
    diag_ = xp.linalg.diagonal(tril)
    sign = xp.where(diag_ < 0, -1.0, 1.0)
    return tril * xp.astype(sign, tril.dtype)[..., None, :]


# ---------------------------------------------------------------------------------------------
# torch.distributions
# ---------------------------------------------------------------------------------------------


def _torch_given(d: Any) -> str:
    """Which of ``probs``/``logits`` a torch Bernoulli/Categorical was built from: the other is
    a lazily derived (and, at 0 or 1, clamped) copy, so the given one keeps the KL exact."""
    own = vars(d)
    param = own.get("_param")
    for name in ("logits", "probs"):
        if name in own and own[name] is param:
            return name
    present = [n for n in ("logits", "probs") if n in own]
    return present[0] if len(present) == 1 else "logits"


def _torch_probs_or_logits(d: Any) -> dict[str, Array]:
    name = _torch_given(d)
    return {name: vars(d)[name]}


def _independent(base: Any, n: int, v: bool) -> Distribution:
    """``Independent(base, n)`` of any package: the base itself for n = 0, ``DiagNormal`` for
    a normal over one axis (which has the multivariate-normal pairs), else kldiv's
    ``Independent`` of the base read as kldiv's."""
    if n == 0:
        return as_kldiv(base, validate=v)
    if n == 1 and _name_in(base, "Normal") and not _name_in(base, "LogNormal"):
        return DiagNormal(base.loc, _logvar(base.scale), validate=v)
    return Independent(as_kldiv(base, validate=v), n)


def _torch_independent(d: Any, v: bool) -> Distribution:
    return _independent(d.base_dist, int(d.reinterpreted_batch_ndims), v)


def _torch_transformed(d: Any, v: bool) -> Distribution:
    transforms = tuple(d.transforms)
    if not all(getattr(t, "bijective", False) for t in transforms):
        names = ", ".join(type(t).__name__ for t in transforms)
        raise TypeError(
            f"kldiv reads a torch.distributions TransformedDistribution only when its "
            f"transforms are one-to-one (bijective); got {names}."
        )
    return Transformed(as_kldiv(d.base_dist, validate=v), transforms)


def _torch_half_cauchy(d: Any, v: bool) -> Distribution:
    # |X| of a Cauchy centred at 0: folding is two-to-one, but both sides are symmetric about
    # 0, so the KL is the Cauchys' (what torch computes too)
    base = d.base_dist
    return Transformed(Cauchy(base.loc, base.scale, validate=v), "abs")


def _name_in(obj: Any, name: str) -> bool:
    return any(c.__name__ == name for c in type(obj).__mro__)


_TORCH: dict[str, _Convert] = {
    "Normal": lambda d, v: Normal(d.loc, d.scale, validate=v),
    "MultivariateNormal": lambda d, v: MultivariateNormal(d.loc, d.scale_tril, validate=v),
    "LowRankMultivariateNormal": lambda d, v: LowRankMultivariateNormal(
        d.loc, d.cov_factor, d.cov_diag, validate=v
    ),
    "Laplace": lambda d, v: Laplace(d.loc, d.scale, validate=v),
    "Gumbel": lambda d, v: Gumbel(d.loc, d.scale, validate=v),
    "Cauchy": lambda d, v: Cauchy(d.loc, d.scale, validate=v),
    "StudentT": lambda d, v: StudentT(d.df, d.loc, d.scale, validate=v),
    "Uniform": lambda d, v: Uniform(d.low, d.high, validate=v),
    "Exponential": lambda d, v: Exponential(d.rate, validate=v),
    "Gamma": lambda d, v: Gamma(d.concentration, d.rate, validate=v),
    "Beta": lambda d, v: Beta(d.concentration1, d.concentration0, validate=v),
    "Dirichlet": lambda d, v: Dirichlet(d.concentration, validate=v),
    "Bernoulli": lambda d, v: Bernoulli(**_torch_probs_or_logits(d), validate=v),
    "Categorical": lambda d, v: Categorical(**_torch_probs_or_logits(d), validate=v),
    "Poisson": lambda d, v: Poisson(d.rate, validate=v),
    "Geometric": lambda d, v: Geometric(d.probs, validate=v),
    "Binomial": lambda d, v: Binomial(d.total_count, d.probs, validate=v),
    "Independent": _torch_independent,
    "Pareto": lambda d, v: Pareto(d.scale, d.alpha, validate=v),
    "ContinuousBernoulli": lambda d, v: ContinuousBernoulli(
        **_torch_probs_or_logits(d), validate=v
    ),
    "HalfNormal": lambda d, v: HalfNormal(d.scale, validate=v),
    "HalfCauchy": _torch_half_cauchy,
    "LogNormal": lambda d, v: LogNormal(d.loc, d.scale, validate=v),
    "InverseGamma": lambda d, v: InverseGamma(d.concentration, d.rate, validate=v),
    "Weibull": lambda d, v: Weibull(d.concentration, d.scale, validate=v),
    "OneHotCategorical": lambda d, v: OneHotCategorical(
        **_torch_probs_or_logits(d._categorical), validate=v
    ),
    "Wishart": lambda d, v: Wishart(d.df, d.scale_tril, validate=v),
    "VonMises": lambda d, v: VonMises(d.loc, d.concentration, validate=v),
    "TransformedDistribution": _torch_transformed,
}

# ---------------------------------------------------------------------------------------------
# TensorFlow Probability (the same classes on every substrate)
# ---------------------------------------------------------------------------------------------


def _tfp_rate(d: Any) -> Array:
    """``rate``, or ``exp(log_rate)`` for a Gamma/Poisson built from ``log_rate``."""
    if getattr(d, "rate", None) is not None:
        return d.rate
    log_rate = d.log_rate
    return _xp(log_rate).exp(log_rate)


def _tfp_probs_or_logits(d: Any) -> dict[str, Array]:
    return {"probs": d.probs} if d.probs is not None else {"logits": d.logits}


def _tfp_independent(d: Any, v: bool) -> Distribution:
    return _independent(d.distribution, int(d.reinterpreted_batch_ndims), v)


def _tfp_gamma(d: Any, v: bool) -> Distribution:
    if getattr(d, "rate", None) is not None:
        return Gamma(d.concentration, d.rate, validate=v)
    return Gamma(d.concentration, log_rate=d.log_rate, validate=v)


def _tfp_deterministic(d: Any, v: bool) -> Distribution:
    for name in ("atol", "rtol"):
        tol = getattr(d, name, None)
        if tol is not None and bool((host(tol) != 0).any()):
            raise TypeError(
                f"kldiv reads a TFP Deterministic only as an exact point mass ({name}=0); this "
                f"one has {name}={tol!r}."
            )
    return Deterministic(d.loc, validate=v)


def _tfp_wishart(d: Any, v: bool) -> Distribution:
    if getattr(d, "input_output_cholesky", False):
        raise TypeError(
            "kldiv reads a TFP WishartTriL over matrices, not over their Cholesky factors "
            "(input_output_cholesky=True)."
        )
    return Wishart(d.df, _positive_diagonal(d.scale_tril), validate=v)


def _tfp_mvn_diag(d: Any, v: bool) -> Distribution:
    diag_ = d.scale.diag_part()
    return DiagNormal(_zeros_loc(d.loc, diag_), _logvar(diag_), validate=v)


def _tfp_mvn_tril(d: Any, v: bool) -> Distribution:
    tril = _positive_diagonal(d.scale.to_dense())
    return MultivariateNormal(_zeros_loc(d.loc, tril[..., 0]), tril, validate=v)


def _tfp_lowrank(d: Any, v: bool) -> Distribution:
    w, diag_ = d.cov_perturb_factor, d.cov_diag_factor
    return LowRankMultivariateNormal(_zeros_loc(d.loc, w[..., 0]), w, diag_, validate=v)


_TFP: dict[str, _Convert] = {
    "Normal": lambda d, v: Normal(d.loc, d.scale, validate=v),
    "MultivariateNormalTriL": _tfp_mvn_tril,
    "MultivariateNormalDiag": _tfp_mvn_diag,
    "MultivariateNormalDiagPlusLowRankCovariance": _tfp_lowrank,
    "Laplace": lambda d, v: Laplace(d.loc, d.scale, validate=v),
    "Gumbel": lambda d, v: Gumbel(d.loc, d.scale, validate=v),
    "Cauchy": lambda d, v: Cauchy(d.loc, d.scale, validate=v),
    "StudentT": lambda d, v: StudentT(d.df, d.loc, d.scale, validate=v),
    "Uniform": lambda d, v: Uniform(d.low, d.high, validate=v),
    "Exponential": lambda d, v: Exponential(_tfp_rate(d), validate=v),
    "Gamma": _tfp_gamma,
    "Chi2": lambda d, v: Gamma(d.df / 2, 0.5, validate=v),
    "Chi": lambda d, v: Chi(d.df, validate=v),
    "Beta": lambda d, v: Beta(d.concentration1, d.concentration0, validate=v),
    "Dirichlet": lambda d, v: Dirichlet(d.concentration, validate=v),
    "Bernoulli": lambda d, v: Bernoulli(**_tfp_probs_or_logits(d), validate=v),
    "Categorical": lambda d, v: Categorical(**_tfp_probs_or_logits(d), validate=v),
    "OneHotCategorical": lambda d, v: OneHotCategorical(**_tfp_probs_or_logits(d), validate=v),
    "Poisson": lambda d, v: Poisson(_tfp_rate(d), validate=v),
    "Geometric": lambda d, v: Geometric(d.probs_parameter(), validate=v),
    "Binomial": lambda d, v: Binomial(d.total_count, d.probs_parameter(), validate=v),
    "Independent": _tfp_independent,
    "Pareto": lambda d, v: Pareto(d.scale, d.concentration, validate=v),
    "ContinuousBernoulli": lambda d, v: ContinuousBernoulli(**_tfp_probs_or_logits(d), validate=v),
    "HalfNormal": lambda d, v: HalfNormal(d.scale, validate=v),
    "LogNormal": lambda d, v: LogNormal(d.loc, d.scale, validate=v),
    "InverseGamma": lambda d, v: InverseGamma(d.concentration, d.scale, validate=v),
    "Weibull": lambda d, v: Weibull(d.concentration, d.scale, validate=v),
    "VonMises": lambda d, v: VonMises(d.loc, d.concentration, validate=v),
    "Moyal": lambda d, v: Moyal(d.loc, d.scale, validate=v),
    "Deterministic": _tfp_deterministic,
    "WishartTriL": _tfp_wishart,
    "TransformedDistribution": lambda d, v: Transformed(
        as_kldiv(d.distribution, validate=v), d.bijector
    ),
}

# ---------------------------------------------------------------------------------------------
# distrax
# ---------------------------------------------------------------------------------------------


def _distrax_probs_or_logits(d: Any) -> dict[str, Array]:
    return {"probs": d._probs} if d._probs is not None else {"logits": d._logits}


def _distrax_independent(d: Any, v: bool) -> Distribution:
    return _independent(d.distribution, int(d.reinterpreted_batch_ndims), v)


_DISTRAX: dict[str, _Convert] = {
    "Normal": lambda d, v: Normal(d.loc, d.scale, validate=v),  # LogStddevNormal too
    "MultivariateNormalDiag": lambda d, v: DiagNormal(d.loc, _logvar(d.scale_diag), validate=v),
    # MultivariateNormalFullCovariance too (a subclass, its scale_tri the Cholesky factor)
    "MultivariateNormalTri": lambda d, v: MultivariateNormal(
        d.loc, _as_lower(d.scale_tri, d.is_lower), validate=v
    ),
    "Laplace": lambda d, v: Laplace(d.loc, d.scale, validate=v),
    "Gumbel": lambda d, v: Gumbel(d.loc, d.scale, validate=v),
    "Uniform": lambda d, v: Uniform(d.low, d.high, validate=v),
    "Gamma": lambda d, v: Gamma(d.concentration, d.rate, validate=v),
    "Beta": lambda d, v: Beta(d.alpha, d.beta, validate=v),
    "Dirichlet": lambda d, v: Dirichlet(d.concentration, validate=v),
    "Bernoulli": lambda d, v: Bernoulli(**_distrax_probs_or_logits(d), validate=v),
    "Categorical": lambda d, v: Categorical(**_distrax_probs_or_logits(d), validate=v),
    "Independent": _distrax_independent,
}

_TABLES: dict[str, dict[str, _Convert]] = {
    "torch.distributions": _TORCH,
    "TFP on NumPy": _TFP,
    "TFP on JAX": _TFP,
    "TFP on TensorFlow": _TFP,
    "distrax": _DISTRAX,
}

_INDEPENDENT_NOTE = (
    "Independent of any of these (of a Normal over 1 axis as DiagNormal), and a "
    "TransformedDistribution of one of them by one-to-one transforms"
)


def supported() -> dict[str, list[str]]:
    """The classes :func:`as_kldiv` accepts, per package (``Independent`` and
    ``TransformedDistribution`` of any of them; ``Independent`` of a ``Normal`` over one axis
    is read as ``DiagNormal``)."""
    return {pkg: sorted(table) for pkg, table in _TABLES.items()}


def _unsupported(obj: Any, pkg: str, what: str | None = None) -> TypeError:
    names = ", ".join(sorted(_TABLES[pkg])) if pkg in _TABLES else ""
    return TypeError(
        f"kldiv cannot read {pkg} {what or type(obj).__name__} as a kldiv distribution; "
        f"from {pkg} it reads {names}; {_INDEPENDENT_NOTE}."
    )


def as_kldiv(obj: Any, *, validate: bool | None = None) -> Distribution:
    """The kldiv distribution equal to ``obj``, a distribution object of kldiv,
    ``torch.distributions``, TFP (on TensorFlow, NumPy or JAX), or distrax.

    The parameters are the object's own arrays (not detached, not copied), so a KL of the
    result is in the object's framework and dtype and differentiates to the object's
    parameters. ``validate`` is passed to kldiv's constructor (``False`` skips the domain
    checks, which read the values on the host); by default it follows the object (torch's
    ``validate_args``, TFP's ``validate_args``; distrax has none and is checked). Derived
    parameters are computed in the object's framework: ``DiagNormal.logvar = 2·log|scale|``
    for ``Independent(Normal, 1)`` and diagonal multivariate normals,
    ``rate = exp(log_rate)``, ``probs = sigmoid(logits)`` for a geometric or binomial built
    from logits (kldiv's take ``probs``); Bernoulli and Categorical keep whichever of
    ``probs``/``logits`` the object was built from.

    Raises ``TypeError`` for a class kldiv does not read (naming it and listing the ones it
    does), and for anything that is not a distribution object.
    """
    if isinstance(obj, Distribution):
        return obj
    pkg = foreign_package(obj)
    if pkg is None:
        raise TypeError(
            "kl() takes distribution objects of kldiv.distributions (e.g. Normal(0.0, 1.0)), "
            "torch.distributions, TFP (on TensorFlow, NumPy or JAX), or distrax; for arrays "
            "call the functions, e.g. normal_kl(loc_p, scale_p, loc_q, scale_q), or "
            f"kldiv.kl_div for categorical arrays. Got {type(obj).__name__}."
        )
    if validate is None:
        validate = _validates(obj, pkg)
    table = _TABLES[pkg]
    for cls in type(obj).__mro__:
        if _package_of(cls) == pkg and cls.__name__ in table:
            return table[cls.__name__](obj, validate)
    raise _unsupported(obj, pkg)
