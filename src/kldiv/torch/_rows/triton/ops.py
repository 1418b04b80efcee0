"""The Triton distillation kernels as PyTorch operators (layer 3 of 3: jit kernels → launcher
→ autograd).

``kldiv::distill_rows`` returns the per-row divergences together with the row statistics the
backward needs (the maxima and log-normalisers of both rows and ``c``: five floats a row, the
only thing saved besides the inputs); ``kldiv::distill_rows_backward`` writes the student's
gradient in one pass, with ``grad_output`` applied in that same pass (so ``grad_output ≠ 1``
costs nothing extra). Both are
``torch.library`` custom ops with fake implementations, so ``torch.compile`` traces through
them (``fullgraph=True`` included) instead of breaking the graph.

The teacher gets no gradient here; DistillationLoss sends a teacher that requires one to the
core instead.
"""

from __future__ import annotations

from typing import Any

import torch

from .... import _spec as spec
from ...._kinds import resolve
from .. import dispatch
from . import launch as L


@torch.library.custom_op("kldiv::distill_rows", mutates_args=())
def distill_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    kind: str,
    inv_t: float,
    w: float,
    block: int,
    maps: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out = L.forward(student, teacher, keep, kind, inv_t, w, block or None, maps)
    # Every kind is >= 0, but float32 terms can round a row's sum just below it (identical
    # rows); the bound is closer to the truth, as on the other engines. NaN rows stay NaN.
    # The backward reads only the statistics, so the gradient is unchanged.
    out[0].clamp_min_(0.0)
    return out


@distill_rows.register_fake
def _(student, teacher, keep, kind, inv_t, w, block, maps):
    n = student.shape[0]
    return tuple(student.new_empty(n, dtype=torch.float32) for _ in range(6))


@torch.library.custom_op("kldiv::distill_rows_backward", mutates_args=())
def distill_rows_backward(
    grad_out: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    stats: list[torch.Tensor],
    kind: str,
    inv_t: float,
    w: float,
    block: int,
    maps: list[float],
) -> torch.Tensor:
    return L.backward(
        grad_out, student, teacher, keep, tuple(stats), kind, inv_t, w, block or None, maps
    )


@distill_rows_backward.register_fake
def _(grad_out, student, teacher, keep, stats, kind, inv_t, w, block, maps):
    return torch.empty_like(student)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    student, teacher, keep, kind, inv_t, w, block, maps = inputs
    ctx.save_for_backward(student, teacher, keep, *output[1:])
    ctx.args = (kind, inv_t, w, block, maps)


def _backward(ctx: Any, g_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
    student, teacher, keep, *stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and torch.is_grad_enabled():
        # create_graph=True: the kernel's gradient has no graph of its own, so the gradient is
        # recomputed through the core, whose gradient is differentiable (Hessian-vector
        # products), instead of failing or dropping the second derivative
        kind, inv_t, w, _block, maps = ctx.args
        values = dispatch.core_rows(
            kind, student, teacher, keep, 1.0 / inv_t, w, w, maps=spec.unpack_maps(maps)
        )
        (grad,) = torch.autograd.grad(values, student, g_loss, create_graph=True)
    elif ctx.needs_input_grad[0]:
        grad = distill_rows_backward(g_loss, student, teacher, keep, stats, *ctx.args)
    return grad, None, None, None, None, None, None, None


distill_rows.register_autograd(_backward, setup_context=_setup_context)


def per_row(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    temperature: float,
    w: float,
    block: int | None = None,
    maps: tuple[Any, Any] | None = None,
) -> torch.Tensor:
    """Per-row D(teacher‖student) ``[N]`` (float32; masked rows 0) of ``[N, V]`` logits in
    float32, bfloat16 or float16, differentiable with respect to ``student``; ``maps``: the
    (teacher, student) :class:`kldiv._spec.LogitMap`, applied inside the kernels."""
    resolved = resolve(kind, w)
    kind = resolved.kind
    if resolved.zero:
        raise ValueError(f"{kind} with weight {w} is identically 0; use the core.")
    if student.dtype not in L.DTYPES or teacher.dtype not in L.DTYPES:
        raise TypeError(
            f"The Triton kernels take float32, bfloat16 or float16 logits, got "
            f"{student.dtype} and {teacher.dtype}."
        )
    if keep is not None:
        keep = keep.contiguous()
    packed = list(L.NO_MAPS) if maps is None else spec.pack_maps(maps)
    return distill_rows(student, teacher, keep, kind, 1.0 / temperature, w, block or 0, packed)[0]
