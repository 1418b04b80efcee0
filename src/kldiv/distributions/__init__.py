"""Closed-form KL divergence between parametric distributions, on NumPy, PyTorch and JAX.

Two layers:

* plain functions on arrays, ``<family>_kl(params_p..., params_q...)`` returning KL(P‖Q)
  elementwise over broadcast batch shapes (``normal_kl``, ``diag_normal_kl`` for the VAE term,
  ``mvn_kl``, ``bernoulli_kl`` for the sparse-autoencoder penalty, ...);
* small immutable distribution objects (``Normal``, ``Beta``, ...) and ``kl(P, Q)``, which
  looks the pair up in a registry, falls back to a Monte-Carlo estimate when asked to
  (``samples=``), and otherwise names the pair and lists the pairs that exist.

Conventions shared by every function: the first distribution is P, the second Q, the value is
KL(P‖Q) = E_P[log P − log Q] ≥ 0; parameters broadcast against each other (Python numbers are
welcome and take the dtype of the array arguments); the result has the framework, device and
floating dtype of the array arguments (float32 for half precision); +inf where the support of
P is not inside the support of Q; no epsilon anywhere. Gradients are finite wherever the value
is: boundary terms (a probability of 0 or 1, a Poisson rate of 0) are computed with a
double ``where``, so they give gradient 0 rather than NaN. ``check=True``
validates the parameter domains eagerly and raises ``ValueError`` naming the parameter (off by
default, like the core, because it needs the values on the host).

Special functions (``lgamma``, ``digamma``, ``erf``) come from the backend: ``torch.special``,
``jax.scipy.special``, or SciPy for NumPy arrays.
"""

from __future__ import annotations

from .continuous import (
    beta_kl,
    cauchy_kl,
    diag_normal_kl,
    dirichlet_kl,
    exponential_kl,
    gamma_kl,
    gumbel_kl,
    laplace_kl,
    normal_kl,
    student_t_kl,
    uniform_kl,
)
from .cross import (
    exponential_gamma_kl,
    exponential_normal_kl,
    gamma_exponential_kl,
    laplace_normal_kl,
    normal_laplace_kl,
    uniform_normal_kl,
)
from .discrete import bernoulli_kl, binomial_kl, categorical_kl, geometric_kl, poisson_kl
from .multivariate import lowrank_mvn_kl, mvn_kl
from .objects import (
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Cauchy,
    DiagNormal,
    Dirichlet,
    Distribution,
    Exponential,
    Gamma,
    Geometric,
    Gumbel,
    Laplace,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    Poisson,
    StudentT,
    Uniform,
)
from .registry import kl, register_kl, registered_pairs

__all__ = [
    # functions on arrays
    "normal_kl",
    "diag_normal_kl",
    "mvn_kl",
    "lowrank_mvn_kl",
    "bernoulli_kl",
    "categorical_kl",
    "binomial_kl",
    "geometric_kl",
    "poisson_kl",
    "beta_kl",
    "dirichlet_kl",
    "gamma_kl",
    "exponential_kl",
    "laplace_kl",
    "uniform_kl",
    "gumbel_kl",
    "cauchy_kl",
    "student_t_kl",
    "laplace_normal_kl",
    "normal_laplace_kl",
    "uniform_normal_kl",
    "exponential_normal_kl",
    "exponential_gamma_kl",
    "gamma_exponential_kl",
    # objects and registry
    "Distribution",
    "Normal",
    "DiagNormal",
    "MultivariateNormal",
    "LowRankMultivariateNormal",
    "Bernoulli",
    "Categorical",
    "Binomial",
    "Geometric",
    "Poisson",
    "Beta",
    "Dirichlet",
    "Gamma",
    "Exponential",
    "Laplace",
    "Uniform",
    "Gumbel",
    "Cauchy",
    "StudentT",
    "kl",
    "register_kl",
    "registered_pairs",
]
