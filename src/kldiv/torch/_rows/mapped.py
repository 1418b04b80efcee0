"""Logit maps (``logit_scale``, soft-capping) in front of the engines that do not apply them
themselves, in row chunks.

The C kernel applies a :class:`kldiv._spec.LogitMap` inside (the chunked CPU path); in front of
the Triton kernels and the core, a distillation loss with a map on a side computes, per chunk
of rows, the mapped logits ``m(z)`` (tensor code, float32: a chunk of at most 2^22 logits, so
nothing of size ``[N, V]`` but the gradient is allocated), the engine's values and gradient
``G`` with respect to them (:func:`.dispatch.rows_and_grad`), and the chain rule
``G ⊙ m'(z)``. As in the engines, the
gradient is computed in the forward pass and scaled by ``grad_output`` in backward; a second
backward through a retained graph computes it again, and ``create_graph=True`` recomputes
it through the core (whose ``softcap``/``logit_scale`` are the same maps).
"""

from __future__ import annotations

from typing import Any

import torch

from ... import _spec as spec
from . import dispatch

__all__ = ["fold", "per_row"]

Maps = tuple[spec.LogitMap, spec.LogitMap]

# Rows per chunk: 2^22 logits (16 MiB a float32 buffer), as the fused-linear loop's chunks.
CHUNK_LOGITS = 1 << 22


def fold(maps: Maps, temperature: float) -> tuple[Maps, float]:
    """Equal scales on both sides and no cap are a temperature: ``σz/T = z/(T/σ)``, which
    the engines take as it is (no chunked pass)."""
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


class MappedRows(torch.autograd.Function):
    """``(student [N, V], teacher [N, V], keep) -> per-row values [N]`` of the mapped logits;
    the student's gradient (in its dtype) is computed in the forward pass, chunk by chunk,
    and scaled by ``grad_output`` in backward. Only the kept rows are read."""

    @staticmethod
    def forward(
        ctx: Any,
        student: torch.Tensor,
        teacher: torch.Tensor,
        keep: torch.Tensor | None,
        config: tuple[str, str, float, float, float, Maps, bool],
    ) -> torch.Tensor:
        ctx.save_for_backward(student, teacher)
        ctx.keep, ctx.config = keep, config[:-1]
        need = ctx.needs_input_grad[0] and config[-1]  # not under torch.no_grad()
        values, ctx.grad = _forward(student, teacher, keep, config[:-1], need)
        return values

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        rest = (None, None, None)
        if not ctx.needs_input_grad[0]:
            return (None, *rest)
        if ctx.keep is not None:  # skipped rows: 0 whatever their grad_output, NaN included
            grad_out = torch.where(ctx.keep, grad_out, 0.0)
        student, teacher = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: through the core, differentiably
            ctx.grad = None
            path, kind, temperature, beta, alpha, maps = ctx.config
            values = dispatch.core_rows(
                kind, student, teacher, ctx.keep, temperature, beta, alpha, maps=maps
            )
            (g,) = torch.autograd.grad(values, student, grad_out, create_graph=True)
            return (g, *rest)
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # a second backward through a retained graph
            grad = _forward(student.detach(), teacher, ctx.keep, ctx.config, True)[1]
        assert grad is not None
        return (grad.mul_(grad_out.to(grad.dtype)[:, None]), *rest)


def _forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    config: tuple[str, str, float, float, float, Maps],
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    path, kind, temperature, beta, alpha, maps = config
    n, v = student.shape
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    device = student.device
    values = torch.zeros(n, dtype=dtype, device=device)
    grad = torch.zeros((n, v), dtype=student.dtype, device=device) if need_grad else None
    index = None if keep is None else keep.nonzero().squeeze(1)
    m = n if index is None else index.numel()
    step = max(1, CHUNK_LOGITS // max(v, 1))
    s_all, t_all = student.detach(), teacher.detach()
    for a in range(0, m, step):
        b = min(m, a + step)
        if index is None:
            s, t = s_all[a:b], t_all[a:b]
        else:
            s, t = s_all.index_select(0, index[a:b]), t_all.index_select(0, index[a:b])
        vals, g = chunk_rows_and_grad(path, kind, s, t, temperature, need_grad, beta, alpha, maps)
        if index is None:
            values[a:b] = vals
            if grad is not None and g is not None:
                grad[a:b] = g
        else:
            values.index_copy_(0, index[a:b], vals.to(dtype))
            if grad is not None and g is not None:
                grad.index_copy_(0, index[a:b], g.to(grad.dtype))
    return values, grad


@dispatch.opaque_to_compile
def per_row(
    path: str,
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    temperature: float,
    beta: float,
    alpha: float,
    maps: Maps,
) -> torch.Tensor:
    """Per-row ``D(teacher‖student)`` ``[N]`` of mapped ``[N, V]`` logits through the engine
    ``path`` (skipped rows 0), differentiable with respect to ``student``. Opaque to
    ``torch.compile``: its loop over row chunks runs eagerly (one graph break)."""
    config = (path, kind, temperature, beta, alpha, maps, torch.is_grad_enabled())
    return MappedRows.apply(student, teacher, keep, config)
