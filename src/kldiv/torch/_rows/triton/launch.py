"""Launchers of the Triton distillation kernels (layer 2 of 3: jit kernels → launcher →
autograd): argument checks, buffers, block sizes and the grid. No host synchronisation: nothing
here reads a device value back.

The kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (set before Triton is
imported); that is how the tests exercise them on machines without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias, cast

import torch
import triton

from ...._kinds import KIND_CODES
from . import kernels as K

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Columns per loop step. 4096 float32 per program keeps the loop body in registers on Hopper
# with 8 warps; small vocabularies take the next power of two.
MAX_BLOCK = 4096

# forward's (loss, m_s, lz_s, m_t, lz_t, c)
RowStats: TypeAlias = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]


def _block(v: int, block: int | None) -> tuple[int, int]:
    b = block or min(MAX_BLOCK, triton.next_power_of_2(max(v, 1)))
    warps = 4 if b <= 1024 else (8 if b <= 4096 else 16)
    return b, warps


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# the identity maps, packed as kldiv._spec.pack_maps packs them
NO_MAPS = (1.0, 0.0, 1.0, 0.0)


def _map_args(maps: Sequence[float]) -> tuple[list[float], dict[str, int]]:
    """The kernels' map arguments: ``[s_mul, s_cap, t_mul, t_cap]`` and the constexprs
    ``S_MAP``/``T_MAP`` (0 none, 1 a scale, 2 a cap)."""
    s_mul, s_cap, t_mul, t_cap = (float(x) for x in maps)

    def code(mul: float, cap: float) -> int:
        return 2 if cap > 0 else (1 if mul != 1.0 else 0)

    return [s_mul, s_cap, t_mul, t_cap], {"S_MAP": code(s_mul, s_cap), "T_MAP": code(t_mul, t_cap)}


def forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    kind: str,
    inv_t: float,
    w: float,
    block: int | None = None,
    maps: Sequence[float] = NO_MAPS,
) -> RowStats:
    """``(loss, m_s, lz_s, m_t, lz_t, c)``, each ``[N]`` float32, for ``[N, V]`` logits:
    the per-row divergences and the statistics the backward needs. ``maps``: the logit maps,
    packed (:func:`kldiv._spec.pack_maps`)."""
    n, v = student.shape
    student, teacher = _rows(student), _rows(teacher)
    # four separate buffers: a custom op's outputs may not alias one another
    out = cast(
        RowStats,
        tuple(torch.empty(n, dtype=torch.float32, device=student.device) for _ in range(6)),
    )
    if n == 0:
        return out
    b, warps = _block(v, block)
    keep_arg = keep if keep is not None else out[0]  # unused when HAS_KEEP is False
    map_args, map_codes = _map_args(maps)
    K.distill_forward_kernel[(n,)](
        student,
        teacher,
        keep_arg,
        *out,
        student.stride(0),
        teacher.stride(0),
        v,
        inv_t,
        w,
        *map_args,
        HAS_KEEP=keep is not None,
        KIND=KIND_CODES[kind],
        BLOCK=b,
        num_warps=warps,
        **map_codes,
    )
    return out


def backward(
    grad_out: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    stats: tuple[torch.Tensor, ...],
    kind: str,
    inv_t: float,
    w: float,
    block: int | None = None,
    maps: Sequence[float] = NO_MAPS,
) -> torch.Tensor:
    """``grad_out[:, None] ⊙ ∂loss/∂student`` in the student's dtype (the only ``[N, V]``
    allocation); ``stats`` is ``(m_s, lz_s, m_t, lz_t, c)`` from :func:`forward`."""
    n, v = student.shape
    student, teacher = _rows(student), _rows(teacher)
    grad = torch.empty((n, v), dtype=student.dtype, device=student.device)
    if n == 0:
        return grad
    b, warps = _block(v, block)
    go = grad_out.float() if grad_out.dtype != torch.float32 else grad_out
    keep_arg = keep if keep is not None else stats[0]
    map_args, map_codes = _map_args(maps)
    K.distill_backward_kernel[(n,)](
        student,
        teacher,
        keep_arg,
        go,
        *stats,
        grad,
        student.stride(0),
        teacher.stride(0),
        grad.stride(0),
        go.stride(0) if go.ndim else 0,
        v,
        inv_t,
        w,
        *map_args,
        HAS_KEEP=keep is not None,
        KIND=KIND_CODES[kind],
        BLOCK=b,
        num_warps=warps,
        **map_codes,
    )
    return grad
