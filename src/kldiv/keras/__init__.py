"""Keras 3 shells over the kldiv core: losses and the KL sparsity regularizer.

They work on every Keras backend: on JAX and PyTorch the core runs on the backend's own
arrays; on TensorFlow it runs on TensorFlow's own operations (kldiv's Array API subset for
TensorFlow, since array-api-compat does not cover it).
Importing this module imports keras; ``import kldiv`` alone does not.
"""

from __future__ import annotations

from .losses import (
    Divergence,
    JSDivergence,
    KLDivergence,
    ReverseKLDivergence,
    SkewKLDivergence,
    SkewReverseKLDivergence,
    SymmetricKLDivergence,
    TVDistance,
)
from .regularizers import KLSparsityRegularizer

__all__ = [
    "Divergence",
    "KLDivergence",
    "ReverseKLDivergence",
    "JSDivergence",
    "SkewKLDivergence",
    "SkewReverseKLDivergence",
    "SymmetricKLDivergence",
    "TVDistance",
    "KLSparsityRegularizer",
]
