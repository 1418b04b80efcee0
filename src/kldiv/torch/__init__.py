"""PyTorch shells over the kldiv core: ``nn.Module`` losses that hold configuration only.

Importing this module imports torch; ``import kldiv`` alone does not.
"""

from __future__ import annotations

from .distillation import DistillationLoss
from .fused_linear import FusedLinearDistillationLoss
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
from .topk import TopKTeacher

__all__ = [
    "DistillationLoss",
    "FusedLinearDistillationLoss",
    "TopKTeacher",
    "Divergence",
    "KLDivergence",
    "ReverseKLDivergence",
    "JSDivergence",
    "SkewKLDivergence",
    "SkewReverseKLDivergence",
    "SymmetricKLDivergence",
    "TVDistance",
]
