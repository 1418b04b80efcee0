"""Mask, weight, ``num_items`` and reduction, in one place for every divergence."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["reduce"]


def reduce(
    xp: ModuleType,
    values: Any,
    batch: tuple[int, ...],
    *,
    reduction: str,
    mask: Any | None = None,
    weight: Any | None = None,
    num_items: Any | None = None,
) -> Any:
    """Reduce per-distribution ``values`` (shape ``batch``).

    ``"none"`` returns them (masked entries 0, weights applied); ``"sum"`` sums them;
    ``"mean"`` divides that sum by ``num_items`` if given, else by the number of unmasked
    distributions (never by a sum of weights, as in Keras' ``sample_weight``; pass
    ``num_items=weight.sum()`` for a weighted average). Zero distributions give 0, not NaN.
    """
    if weight is not None:
        values = values * weight
    if mask is not None:
        values = xp.where(mask, values, 0.0)
    if reduction == "none":
        if tuple(values.shape) != batch:
            values = xp.broadcast_to(values, batch)
        return values
    total = xp.sum(values)
    if reduction == "mean":
        if num_items is not None:
            total = total / num_items
        elif mask is None and None in batch:
            # a dimension known only at run time (TensorFlow graph tracing): count it there
            count = xp.sum(xp.ones_like(values))
            total = total / xp.where(count > 0, count, 1.0)
        elif mask is None:
            total = total / max(math.prod(batch), 1)
        else:
            count = xp.sum(xp.astype(xp.broadcast_to(mask, batch), values.dtype))
            total = total / xp.where(count > 0, count, 1.0)
    # NumPy reductions and 0-d arithmetic return scalars; every backend returns a 0-d array.
    return xp.asarray(total) if isinstance(total, np.generic) else total
