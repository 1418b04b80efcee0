"""Distillation losses over ``torch.distributed``: the vocabulary split over the ranks of a
tensor-parallel group, the tokens over the ranks of a data-parallel group, or both.

``ParallelDistillationLoss`` computes :class:`~kldiv.torch.DistillationLoss`'s divergences
when each rank of ``vocab_group`` holds a slice of the vocabulary, ``[..., V_r]`` of both
logits (any split, uneven included; Σ V_r = V). The value equals the single-process value on
the full ``[..., V]`` logits, and every rank gets its own slice's gradient.

How (per row, T the temperature, s and t the tempered logits):

1. Each rank reduces its slice to four numbers per row, with no communication: the slice's
   maxima m_s, m_t and log-sums ``lz = log Σ exp(x − m)``.
2. **Collective 1** gathers those ``[4, N]``. Every rank then holds the global maximum
   M = max_r m_r and ``log Z = logsumexp_r(m_r − M + lz_r)``. With them it holds its slice of
   the normalised log-probabilities ``(x − M) − log Z``. Shifting by the global maximum before
   subtracting keeps a constant offset between teacher and student from costing precision.
3. Each rank evaluates the core's divergence on its slice of log-probabilities (``form=
   "log_probs"``; the terms are elementwise, so this is the slice's share of the sum). It also
   evaluates the core's gradient with respect to the student's log-probabilities, h.
4. **Collective 2** sums ``[2, N]`` over the group: the divergence, and Σh.
5. The gradient with respect to the student's slice is ``(h − q·Σh) / T``, the softmax's
   chain rule with the global Σh. It is computed in the forward pass and only scaled in
   backward, as on the single-device CPU path.

The value and gradient are therefore the core's, zero support included: −inf logits are zero
probabilities, +inf rows are +inf, and an all −inf row is NaN. No backward collective is
needed.

A hand-rolled version typically all-reduces the maximum, the sum of exps and the loss
separately for each side: four or five collectives. See ``docs/parallel.md`` for the
communication volume.

``data_group``: ranks that hold different tokens. ``"mean"`` and ``"sum"`` add the per-rank
sums and counts with one all-reduce of two numbers, never a mean of means. The value is then
the single-process value on the concatenated batch. The gradient each rank gets is that of
this global loss with respect to its own tokens. DDP *averages* gradients over its ranks; to
keep the global loss's gradient under DDP, multiply the loss by the data-parallel world size
(``docs/parallel.md``).

``validate=True`` (the default) adds one small collective before the others: every rank
shares its shapes, dtypes and configuration. Every rank then raises the same ``ValueError``
for inconsistent slices, rather than hanging in a collective with mismatched sizes.

``vocab_group=None`` (or a group of size 1) means the logits hold the whole vocabulary.
``data_group=None`` means there is no data parallelism. This is the same code path with the
collectives skipped. To split over every rank, pass ``torch.distributed.group.WORLD``
explicitly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from .. import _check
from .._defaults import JS_BETA, KIND_PARAMS, REDUCTION, SKEW_ALPHA, TEMPERATURE
from ..divergences import KINDS
from .distillation import DIVERGENCES, _reduce_rows, config_repr, configure

__all__ = ["ParallelDistillationLoss", "vocab_parallel_rows"]

# Rows per chunk of the per-slice passes: temporaries stay at a few MiB whatever N is.
_CHUNK_ELEMENTS = 1 << 18
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _world(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _gather(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``[world, *x.shape]``: every rank's ``x``, in rank order (the same on every rank)."""
    if _world(group) == 1:
        return x[None]
    parts = [torch.empty_like(x) for _ in range(_world(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def _sum(x: torch.Tensor, group: Any) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(x, group=group)
    return x


def _slice_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maxima and ``log Σ exp(x − m)`` of one chunk (−inf, −inf for an all −inf row)."""
    m = x.amax(-1)
    shift = torch.where(torch.isfinite(m), m, 0.0)
    return m, torch.logsumexp(x - shift[:, None], -1)


def _combine(m: torch.Tensor, lz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From every slice's ``[world, N]`` maxima and log-sums: the shift M and ``log Z`` such
    that the log-probabilities are ``(x − M) − log Z``. An all −inf row gives NaN there, as
    the core's log-softmax does."""
    top = m.amax(0)
    shift = torch.where(torch.isfinite(top), top, 0.0)
    return shift, torch.logsumexp(m - shift + lz, 0)


class _Rows(torch.autograd.Function):
    """``(student slice, teacher slice) -> per-row divergence [N]`` (equal on every rank of
    the group); the backward returns ``grad_out[:, None] ⊙ G`` for this rank's slice, with
    G computed in the forward pass."""

    @staticmethod
    def forward(
        ctx: Any,
        student: torch.Tensor,
        teacher: torch.Tensor,
        keep: torch.Tensor | None,
        kind: str,
        temperature: float,
        params: dict[str, float],
        group: Any,
    ) -> torch.Tensor:
        values, grad = _forward(kind, student.detach(), teacher, keep, temperature, params, group,
                                student.requires_grad)  # fmt: skip
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.student_dtype = student.dtype
        ctx.has_grad = grad is not None
        return values

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        if not ctx.has_grad:
            return (None,) * 7
        out = grad.mul_(grad_out.to(grad.dtype)[:, None])  # in place: no second [N, V_r]
        return (out.to(ctx.student_dtype),) + (None,) * 6


def _forward(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    temperature: float,
    params: dict[str, float],
    group: Any,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, v = student.shape
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    device = student.device
    rows = max(1, _CHUNK_ELEMENTS // max(v, 1))
    inv_t = 1.0 / temperature

    def chunk(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        x = x[a:b].to(dtype)
        x = x * inv_t if temperature != 1.0 else x
        if keep is not None:  # skipped rows may hold anything, NaN included
            x = torch.where(keep[a:b, None], x, 0.0)
        return x

    stats = torch.empty((4, n), dtype=dtype, device=device)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        stats[0, a:b], stats[1, a:b] = _slice_stats(chunk(student, a, b))
        stats[2, a:b], stats[3, a:b] = _slice_stats(chunk(teacher, a, b))
    every = _gather(stats, group)  # collective 1
    shift_s, logz_s = _combine(every[:, 0], every[:, 1])
    shift_t, logz_t = _combine(every[:, 2], every[:, 3])

    def log_probs(a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        lq = (chunk(student, a, b) - shift_s[a:b, None]).sub_(logz_s[a:b, None])
        lp = (chunk(teacher, a, b) - shift_t[a:b, None]).sub_(logz_t[a:b, None])
        return lq, lp

    sums = torch.zeros((2, n), dtype=dtype, device=device)
    grad = torch.empty((n, v), dtype=dtype, device=device) if need_grad else None
    for a in range(0, n, rows):
        b = min(n, a + rows)
        lq, lp = log_probs(a, b)
        with torch.enable_grad():
            lq.requires_grad_(need_grad)
            part = KINDS[kind](lp, lq, form="log_probs", reduction="none", **params)
            if need_grad:
                (h,) = torch.autograd.grad(part.sum(), lq)
        sums[0, a:b] = part.detach()
        if grad is not None:
            sums[1, a:b] = h.sum(-1)
            grad[a:b] = h
    _sum(sums, group)  # collective 2
    values = sums[0]
    if keep is not None:
        values = torch.where(keep, values, 0.0)
    if grad is not None:
        for a in range(0, n, rows):
            b = min(n, a + rows)
            q = log_probs(a, b)[0].exp_()
            g = grad[a:b].sub_(q.mul_(sums[1, a:b, None]))
            g.mul_(inv_t)
            if keep is not None:
                g.masked_fill_(~keep[a:b, None], 0.0)
    return values, grad


def vocab_parallel_rows(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None = None,
    *,
    temperature: float = TEMPERATURE,
    beta: float = JS_BETA,
    alpha: float = SKEW_ALPHA,
    vocab_group: Any = None,
) -> torch.Tensor:
    """Per-row D(teacher‖student) ``[N]`` from vocabulary slices ``[N, V_r]`` of both logits
    on every rank of ``vocab_group`` (the same on every rank; skipped rows 0); differentiable
    with respect to ``student``, each rank getting its own slice's gradient.

    The low-level form of :class:`ParallelDistillationLoss` (which validates, reduces and
    handles the data-parallel group); two collectives on ``vocab_group``, none in backward.
    """
    params = {name: {"beta": beta, "alpha": alpha}[name] for name in KIND_PARAMS.get(kind, {})}
    return _Rows.apply(student, teacher, keep, kind, temperature, params, vocab_group)


class ParallelDistillationLoss(torch.nn.Module):
    """D(teacher‖student) per token from logits whose vocabulary is split over the ranks of
    ``vocab_group`` and whose tokens are split over the ranks of ``data_group``.

    The configuration is :class:`~kldiv.torch.DistillationLoss`'s (``divergence`` applied as
    ``f(teacher, student)``, ``beta``, ``alpha``, ``temperature``,
    ``scale_by_temperature_squared``, ``ignore_index``, ``reduction``), with the same values on
    every rank. The value equals ``DistillationLoss`` on the full logits of the whole batch; see
    the module docstring for the method and :doc:`docs/parallel.md` for examples.

    ``forward(student_logits, teacher_logits, labels=None, num_items=None)``: this rank's
    ``[..., V_r]`` slices of both logits (the same tokens on every rank of ``vocab_group``),
    labels of the token shape with ``ignore_index`` marking tokens to skip, and ``num_items``
    the *global* denominator of ``"mean"`` if given (else the kept tokens are counted over
    ``data_group``). The teacher must not require a gradient (the student gets one; detach
    the teacher).

    ``vocab_size``: if given, the slices' widths must add up to it (checked by ``validate``).
    ``validate=False`` drops the consistency collective; do that only once the shapes are
    known to agree, since mismatched shapes can then hang or fail inside the collectives.
    """

    def __init__(
        self,
        divergence: str = "kl",
        *,
        beta: float = JS_BETA,
        alpha: float = SKEW_ALPHA,
        temperature: float = TEMPERATURE,
        scale_by_temperature_squared: bool = False,
        ignore_index: int = -100,
        reduction: str = REDUCTION,
        vocab_group: Any = None,
        data_group: Any = None,
        vocab_size: int | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        configure(self, divergence, beta, alpha, temperature, scale_by_temperature_squared,
                  ignore_index, reduction)  # fmt: skip
        if vocab_size is not None and (
            isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1
        ):
            raise ValueError(f"Expected `vocab_size` to be a positive int, got {vocab_size!r}.")
        self.vocab_group = vocab_group
        self.data_group = data_group
        self.vocab_size = vocab_size
        self.validate = _check.check_flag("validate", validate)

    def extra_repr(self) -> str:
        parts = config_repr(self)
        for name in ("vocab_group", "data_group"):
            group = getattr(self, name)
            if group is not None:
                parts.append(f"{name} of {_world(group)} ranks")
        return ", ".join(parts)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_items: Any = None,
    ) -> torch.Tensor:
        num_items = _check.check_num_items(num_items, self.reduction)
        if self.validate:
            self._check_consistency(student_logits, teacher_logits, labels)
        v = student_logits.shape[-1]
        tokens = tuple(student_logits.shape[:-1])
        keep = None if labels is None else labels != self.ignore_index
        flat_keep = None if keep is None else keep.reshape(-1)
        rows = vocab_parallel_rows(
            self.divergence, student_logits.reshape(-1, v), teacher_logits.reshape(-1, v),
            flat_keep, temperature=self.temperature, beta=self.beta, alpha=self.alpha,
            vocab_group=self.vocab_group,
        ).reshape(tokens)  # fmt: skip
        rows = rows.to(torch.promote_types(student_logits.dtype, torch.float32))
        if self.scale_by_temperature_squared:
            rows = rows * self.temperature**2
        return _data_parallel_reduce(rows, keep, self.reduction, num_items, self.data_group)

    def _check_consistency(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None
    ) -> None:
        """One all-gather of a few numbers per rank, then the same verdict, word for word, on
        every rank (local problems travel as bits, so every rank can name them)."""
        bits = [
            student.shape != teacher.shape,
            student.ndim < 1 or student.shape[-1] == 0,
            labels is not None and tuple(labels.shape) != tuple(student.shape[:-1]),
            teacher.requires_grad,
            student.dtype not in _DTYPES or teacher.dtype not in _DTYPES,
        ]
        flags = sum(1 << i for i, bad in enumerate(bits) if bad)
        width = student.shape[-1] if student.ndim else 0
        meta = [
            float(flags), float(math.prod(student.shape[:-1])), float(width),
            float(_code(student.dtype)), float(_code(teacher.dtype)),
            float(DIVERGENCES.index(self.divergence)), self.temperature, self.beta, self.alpha,
            float(labels is not None),
        ]  # fmt: skip
        every = _gather(torch.tensor(meta, dtype=torch.float64, device=student.device),
                        self.vocab_group).tolist()  # fmt: skip
        problems = [f"rank {r}: {msg}" for r, m in enumerate(every)
                    for i, msg in enumerate(_LOCAL_PROBLEMS) if int(m[0]) >> i & 1]  # fmt: skip
        for i, name in enumerate(_SHARED, start=1):
            if name is not None and len({m[i] for m in every}) > 1:
                problems.append(f"the {name} differ over the vocab group: "
                                f"{[_show(name, m[i]) for m in every]}")  # fmt: skip
        total = sum(int(m[2]) for m in every)
        if self.vocab_size is not None and total != self.vocab_size:
            problems.append(
                f"the slices' widths {[int(m[2]) for m in every]} add up to {total}, "
                f"not vocab_size={self.vocab_size}"
            )
        if problems:
            raise ValueError("Inconsistent vocab-parallel inputs: " + "; ".join(problems) + ".")


_LOCAL_PROBLEMS = (
    "student and teacher logits differ in shape",
    "the logits have no vocabulary axis",
    "labels are not of the token shape",
    "the teacher requires a gradient (detach it; the student gets one)",
    "the logits are not floating point",
)
# what must agree over the vocab group, by position in the metadata (None: free to differ)
_SHARED = ("row counts", None, "student dtypes", "teacher dtypes", "divergences",
           "temperatures", "betas", "alphas", "label flags")  # fmt: skip


def _code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def _show(name: str, x: float) -> Any:
    if name.endswith("dtypes"):
        return str(_DTYPES[int(x)]).removeprefix("torch.") if x >= 0 else "non-float"
    if name == "divergences":
        return DIVERGENCES[int(x)]
    return int(x) if name in ("row counts", "label flags") else x


def _data_parallel_reduce(
    rows: torch.Tensor, keep: torch.Tensor | None, reduction: str, num_items: Any, group: Any
) -> torch.Tensor:
    """``"mean"``/``"sum"`` over the tokens of every rank of ``group``: one all-reduce of
    (sum, count). The value is the global one on every rank; its gradient with respect to this
    rank's rows is the global loss's (1 or 1/count each), since the other ranks' sum enters as
    a constant."""
    if _world(group) == 1 or reduction == "none":
        return _reduce_rows(rows, keep, reduction, num_items)
    local = rows.sum()
    count = rows.numel() if keep is None else keep.sum()
    packed = torch.stack([local.detach().double(), torch.as_tensor(count, device=rows.device)
                          .double()])  # fmt: skip
    _sum(packed, group)
    total = _GlobalSum.apply(local, packed[0].to(local.dtype))
    if reduction == "sum":
        return total
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            num_items = num_items.to(device=total.device, dtype=total.dtype)
        return total / num_items
    return total / packed[1].clamp_min(1).to(total.dtype)


class _GlobalSum(torch.autograd.Function):
    """The value of the all-reduced sum, the gradient of this rank's own: the other ranks'
    sums are constants here. (``local + (total − local)`` would read inf − inf = NaN for an
    infinite sum.)"""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        return total.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None
