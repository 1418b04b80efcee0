"""kldiv inside other libraries' training loops.

Each integration is its own submodule and imports its library only when imported itself:
``import kldiv`` and ``import kldiv.integrations`` import neither PyTorch nor any trainer
library.

* :mod:`kldiv.integrations.trl`: TRL's ``DistillationTrainer`` and ``GKDTrainer`` with kldiv's
  distillation losses (``pip install "kldiv[trl]"``).
"""

from __future__ import annotations

__all__: list[str] = []
