"""kldiv: the Kullback–Leibler divergence and its family, exact and explicit.

Every function takes ``(p, q)`` in mathematical order (``kl_div(p, q)`` is KL(P‖Q); ``p`` the
teacher/target, ``q`` the student/model), works on NumPy, PyTorch and JAX arrays alike and
returns an array of the caller's framework. Importing kldiv imports no framework.
"""

from __future__ import annotations

from . import distributions, estimators, metrics
from ._version import __version__
from .divergences import (
    KINDS,
    divergence,
    js_div,
    kl_div,
    reverse_kl_div,
    skew_kl_div,
    skew_reverse_kl_div,
    symmetric_kl_div,
    tv_distance,
)

__all__ = [
    "KINDS",
    "divergence",
    "js_div",
    "kl_div",
    "reverse_kl_div",
    "skew_kl_div",
    "skew_reverse_kl_div",
    "symmetric_kl_div",
    "tv_distance",
    "distributions",
    "estimators",
    "metrics",
    "__version__",
]
