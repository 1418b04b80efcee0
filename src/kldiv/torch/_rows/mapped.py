"""Logit maps (``logit_scale``, soft-capping) for the engines: folding a common scale into
the temperature, and the core's chunks.

The kernels (C and Triton) apply a :class:`kldiv._spec.LogitMap` as they read the logits.
Where the core computes a chunk of rows (float64, the endpoints where a divergence is
identically 0), :func:`chunk_rows_and_grad` maps the chunk in tensor code first and chains
the gradient, ``G ⊙ m'(z)``.
"""

from __future__ import annotations

import torch

from ... import _spec as spec
from . import dispatch

__all__ = ["fold", "chunk_rows_and_grad"]

Maps = tuple[spec.LogitMap, spec.LogitMap]


def fold(maps: Maps, temperature: float) -> tuple[Maps, float]:
    """Equal scales on both sides and no cap are a temperature: ``σz/T = z/(T/σ)``, which
    the engines take as it is."""
    t_map, s_map = maps
    if t_map.cap is None and s_map.cap is None and t_map.scale == s_map.scale:
        return (spec.IDENTITY, spec.IDENTITY), temperature / t_map.scale
    return maps, temperature


def chunk_rows_and_grad(
    path: str,
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    need_grad: bool,
    beta: float,
    alpha: float,
    maps: Maps,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`.dispatch.rows_and_grad` of the mapped logits of one chunk, the gradient with
    respect to the unmapped student logits (float32; float64 for float64 logits)."""
    t_map, s_map = maps
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    s = student.to(dtype) if s_map.identity else spec.apply_map(torch, student.to(dtype), s_map)
    t = teacher.to(dtype) if t_map.identity else spec.apply_map(torch, teacher.to(dtype), t_map)
    values, grad = dispatch.rows_and_grad(path, kind, s, t, temperature, need_grad, beta, alpha)
    if grad is not None and not s_map.identity:
        grad = grad.to(dtype).mul_(spec.map_grad(torch, student.to(dtype), s_map))
    return values, grad
