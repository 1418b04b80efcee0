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
3. Each rank evaluates its slice's share of the divergence (the terms are elementwise) and
   of Σh, h the gradient with respect to the student's log-probabilities, as the row
   specification defines them (``kldiv/_spec.py``).
4. **Collective 2** sums ``[2, N]`` over the group: the divergence, and Σh.
5. The gradient with respect to the student's slice is ``(h − q·Σh) / T``, the softmax's
   chain rule with the global Σh. It is computed in the forward pass and only scaled in
   backward, as on the single-device CPU path.

The passes are the per-slice engine of :mod:`._rows.linear`: on CPU float32 the compiled C
kernel (statistics, terms, gradient; KL's Σh is −1 before any sum, Σp = 1, so its terms and
gradient take one pass), with the rows it flags (+inf or NaN logits, huge logits at T ≠ 1)
and every other dtype and device through the row specification. The fused loss runs the
chunked-linear loop of that module, with this module's vocab group as the statistics'
combiner.

The value and gradient are therefore the core's, zero support included: −inf logits are zero
probabilities (a −inf student logit gets a zero gradient), +inf rows are +inf, and an all −inf
row is NaN. No backward collective is needed.

A hand-rolled version typically all-reduces the maximum, the sum of exps and the loss
separately for each side: four or five collectives. See ``docs/parallel.md`` for the
communication volume.

``data_group``: ranks that hold different tokens. ``"mean"`` and ``"sum"`` add the per-rank
sums and counts with one all-reduce of two numbers, never a mean of means. The value is then
the single-process value on the concatenated batch. The gradient each rank gets is that of
this global loss with respect to its own tokens. DDP *averages* gradients over its ranks; to
keep the global loss's gradient under DDP, multiply the loss by the data-parallel world size
(``docs/parallel.md``).

``validate=True`` (the default) adds small collectives before the others: one all-gather
per group given, and one more on the vocab group when both are. A rank's checks of its own
inputs (types, shapes, dtypes, devices, labels, mask, ``num_items``, a teacher that requires
a gradient) only collect problems, which the gathers share. If no rank has one, they compare
what must agree: over the vocab group the token count (and the fused loss's hidden sizes),
over the data group the slice width (and hidden sizes), over both the dtypes and every
setting, ``num_items``'s value included. Every rank then raises the same ``ValueError``,
``"Inconsistent parallel inputs: rank 1: ..."``, rather than one rank raising alone (or a
size mismatch reaching a collective) while the others hang. Validation cannot check what it
runs over: ``validate`` and the groups must be the same on every rank. Its buffer is a CPU
tensor where the group's backend takes one (Gloo); on an NCCL-only group reading it back
costs a host synchronisation per step. ``validate=False`` runs the same local checks and
raises on the rank that fails them, alone.

``vocab_group=None`` (or a group of size 1) means the logits hold the whole vocabulary.
``data_group=None`` means there is no data parallelism. This is the same code path with the
collectives skipped. To split over every rank, pass ``torch.distributed.group.WORLD``
explicitly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from .. import _check
from .. import _spec as spec
from .._defaults import (
    JS_BETA,
    REDUCTION,
    SKEW_ALPHA,
    TEMPERATURE,
    DistillationKind,
    Reduction,
)
from .._kinds import params_of, weight_of
from .._spec import IDENTITY, LogitMap
from ._rows import dispatch, linear, mapped
from ._rows.dispatch import reduce_rows, reduce_total
from .distillation import (
    DistillationConfig,
    config_repr,
    configure,
    logit_maps,
    token_keep,
)

__all__ = [
    "ParallelDistillationLoss",
    "ParallelFusedLinearDistillationLoss",
    "vocab_parallel_rows",
]

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


class _VocabGroup:
    """The statistics' combiner of a vocab group (:class:`._rows.linear.Combiner`)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.world = _world(group)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return _gather(x, self.group)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return _sum(x, self.group)


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
        grad_enabled: bool,
        maps: tuple[LogitMap, LogitMap],
    ) -> torch.Tensor:
        need = grad_enabled and student.requires_grad  # nothing to compute under no_grad
        values, grad = _forward(
            kind, student.detach(), teacher, keep, temperature, params, group, need, maps
        )
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.student_dtype = student.dtype
        ctx.has_grad = grad is not None
        ctx.keep = keep
        return values

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        if not ctx.has_grad:
            return (None,) * 9
        if ctx.keep is not None:  # skipped tokens (G = 0): 0 even under an inf or NaN grad_output
            grad_out = torch.where(ctx.keep, grad_out, 0.0)
        # In place: no second [N, V_r] buffer. A second backward through the same forward
        # would see a scaled gradient; autograd's version counter refuses it instead.
        out = grad.mul_(grad_out.to(grad.dtype)[:, None])
        return (out.to(ctx.student_dtype),) + (None,) * 8


def _forward(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    temperature: float,
    params: dict[str, float],
    group: Any,
    need_grad: bool,
    maps: tuple[LogitMap, LogitMap] = (IDENTITY, IDENTITY),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-row values ``[N]`` and this slice's gradient ``[N, V_r]`` (if ``need_grad``)
    through the per-slice engine of :mod:`._rows.linear` (the C kernel on CPU float32, the
    row specification elsewhere), with the two collectives between its passes. ``maps``:
    the (teacher, student) logit maps, applied to each row chunk as it is read (they are
    elementwise, so per slice) and chained into the gradient at the end."""
    n, v = student.shape
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    device = student.device
    w = weight_of(kind, **params)
    inv_t = 1.0 / temperature
    if keep is not None:
        keep = keep.contiguous()
    identity = maps[0].identity and maps[1].identity
    whole = (
        identity
        and student.dtype == teacher.dtype == torch.float32
        and dispatch.slice_kernel(kind, w, student, teacher) is not None
    )
    # the kernel takes whole float32 tensors (and splits them over threads); other inputs go
    # in row chunks, so that conversions and the specification's temporaries stay a few MiB
    step = max(n, 1) if whole else max(1, _CHUNK_ELEMENTS // max(v, 1))
    chunks = [(a, min(n, a + step)) for a in range(0, n, step)]

    def k(a: int, b: int) -> torch.Tensor | None:
        return None if keep is None else keep[a:b]

    def rows(index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Both sides' rows ``index`` (a slice or an index tensor), through the maps."""
        s, t = student[index], teacher[index]
        if identity:
            return s, t
        s, t, _ = linear.mapped_chunk(maps, s, t, False)
        return s, t

    stats = torch.empty((4, n), dtype=dtype, device=device)
    for a, b in chunks:
        stats[:, a:b] = linear.slice_stats(*rows(slice(a, b)), k(a, b), inv_t)
    norms = linear.combine(_gather(stats, group))  # collective 1
    sums = torch.empty((2, n), dtype=dtype, device=device)
    grad = torch.empty((n, v), dtype=dtype, device=device) if need_grad else None
    pending = []
    for a, b in chunks:
        out = None if grad is None else grad[a:b]
        sums[:, a:b], redo = linear.slice_terms_grad(
            kind, w, *rows(slice(a, b)), k(a, b), inv_t, norms[:, a:b], out
        )
        pending.append(redo)
    _sum(sums, group)  # collective 2
    values = sums[0]
    if keep is not None:
        values = torch.where(keep, values, 0.0)
    if grad is not None:
        for (a, b), redo in zip(chunks, pending, strict=True):
            if redo is None:  # the gradient needs the sums: its own pass
                linear.slice_grad(
                    kind,
                    w,
                    *rows(slice(a, b)),
                    k(a, b),
                    inv_t,
                    norms[:, a:b],
                    sums[1, a:b],
                    out=grad[a:b],
                )
            else:  # rows the kernel left to the specification, a few MiB at a time
                for part in linear.fallback_parts(redo + a, v):
                    grad[part] = linear.slice_grad(
                        kind, w, *rows(part), None, inv_t, norms[:, part], sums[1, part]
                    )
        if not maps[1].identity:  # the chain rule through the student's map
            for a, b in chunks:
                d = spec.map_grad(torch, student[a:b].to(dtype), maps[1])
                kept = k(a, b)  # skipped rows may hold NaN, and their gradient is 0
                grad[a:b].mul_(d if kept is None else torch.where(kept[:, None], d, 0.0))
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
    maps: tuple[LogitMap, LogitMap] = (IDENTITY, IDENTITY),
) -> torch.Tensor:
    """Per-row D(teacher‖student) ``[N]`` from vocabulary slices ``[N, V_r]`` of both logits
    on every rank of ``vocab_group`` (the same on every rank; skipped rows 0); differentiable
    with respect to ``student``, each rank getting its own slice's gradient.

    The low-level form of :class:`ParallelDistillationLoss` (which validates, reduces and
    handles the data-parallel group); two collectives on ``vocab_group``, none in backward.
    """
    params = params_of(kind, beta, alpha)
    return _Rows.apply(
        student,
        teacher,
        keep,
        kind,
        temperature,
        params,
        vocab_group,
        torch.is_grad_enabled(),
        maps,
    )


@dispatch.opaque_to_compile
def _eager(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Runs ``fn`` outside ``torch.compile``'s tracing: its validation reads gathered
    metadata on the host, its chunk loops are Python, and its gradients come from
    ``torch.autograd.grad`` in the forward pass. One graph break; ``fullgraph=True`` is not
    supported."""
    return fn(*args)


class _ParallelConfig(DistillationConfig, Protocol):
    """The distillation configuration plus what :func:`_configure_groups` sets."""

    vocab_group: Any
    data_group: Any
    validate: bool


def _configure_groups(
    module: _ParallelConfig, vocab_group: Any, data_group: Any, validate: Any
) -> None:
    module.vocab_group = vocab_group
    module.data_group = data_group
    module.validate = _check.check_flag("validate", validate)


def _vocab_cut(module: _ParallelConfig, width: int, widths: list[int] | None, device: Any) -> int:
    """How many of this rank's ``width`` columns lie below ``vocab_size`` (all of them when it
    is None): the rank's first global column is the sum of the widths of the ranks before it
    in the vocab group (``widths``, from validation, else gathered here)."""
    if module.vocab_size is None:
        return width
    group = module.vocab_group
    if _world(group) == 1:
        if width < module.vocab_size:  # (validate=True has raised already)
            raise ValueError(
                f"Invalid inputs on this rank: the logits' width {width} is less than "
                f"vocab_size={module.vocab_size}."
            )
        start = 0
    else:
        if widths is None:
            mine = torch.tensor([width], dtype=torch.int64, device=device)
            widths = [int(x) for x in _gather(mine, group).reshape(-1).tolist()]
            if sum(widths) < module.vocab_size:
                raise ValueError(
                    f"Invalid inputs: the slices' widths {widths} add up to {sum(widths)}, "
                    f"less than vocab_size={module.vocab_size}."
                )
        start = sum(widths[: dist.get_rank(group)])
    return max(0, min(width, module.vocab_size - start))


class ParallelDistillationLoss(torch.nn.Module):
    """D(teacher‖student) per token from logits whose vocabulary is split over the ranks of
    ``vocab_group`` and whose tokens are split over the ranks of ``data_group``.

    The configuration is :class:`~kldiv.torch.DistillationLoss`'s (``divergence`` applied as
    ``f(teacher, student)``, ``beta``, ``alpha``, ``temperature``,
    ``scale_by_temperature_squared``, ``ignore_index``, ``reduction``), with the same values on
    every rank. The value equals ``DistillationLoss`` on the full logits of the whole batch; see
    the module docstring for the method and :doc:`docs/parallel.md` for examples.

    ``forward(student_logits, teacher_logits, labels=None, num_items=None, *, mask=None)``:
    this rank's ``[..., V_r]`` slices of both logits (the same tokens on every rank of
    ``vocab_group``), labels of the token shape with ``ignore_index`` marking tokens to skip,
    ``mask`` a keep-mask of the token shape (boolean or 0/1 integer such as Hugging Face's
    ``attention_mask``, as in :class:`~kldiv.torch.DistillationLoss`), and ``num_items`` the
    *global* denominator of ``"mean"`` if given (else the kept tokens are counted over
    ``data_group``). The teacher must not require a gradient (the student gets one; detach
    the teacher).

    ``vocab_size``: the real vocabulary, where the slices' widths add up to more (a
    vocabulary padded to a multiple of the group's size, the padding on the last ranks): the
    global columns from ``vocab_size`` on are ignored, whatever they hold, with a zero
    gradient. The widths must add up to at least ``vocab_size`` (checked by ``validate``;
    the ranks' widths are gathered to place each slice: one more small collective when
    ``validate=False``). ``shift_labels``, ``softcap`` and ``logit_scale`` are
    :class:`~kldiv.torch.DistillationLoss`'s (the maps are elementwise, so each rank maps its
    own slice).
    With ``validate=True`` anything wrong with one rank's inputs, or anything that differs
    between ranks, raises the same ``ValueError`` on every rank (see the module docstring);
    ``validate`` itself and the groups must agree on every rank. ``validate=False`` drops the
    consistency collectives; do that only once the inputs are known to agree, since a problem
    then raises on one rank only and mismatched shapes can hang or fail inside the
    collectives. Under ``torch.compile`` the loss runs eagerly (one graph
    break). A second backward through the same graph raises (the gradient is computed in the
    forward pass and scaled in place).
    """

    divergence: DistillationKind
    beta: float
    alpha: float
    temperature: float
    scale_by_temperature_squared: bool
    ignore_index: int
    reduction: Reduction
    shift_labels: bool
    vocab_size: int | None
    softcap: Any
    logit_scale: Any
    vocab_group: Any
    data_group: Any
    validate: bool

    def __init__(
        self,
        divergence: DistillationKind = "kl",
        *,
        beta: float = JS_BETA,
        alpha: float = SKEW_ALPHA,
        temperature: float = TEMPERATURE,
        scale_by_temperature_squared: bool = False,
        ignore_index: int = -100,
        reduction: Reduction = REDUCTION,
        vocab_group: Any = None,
        data_group: Any = None,
        vocab_size: int | None = None,
        validate: bool = True,
        shift_labels: bool = False,
        softcap: float | tuple[float | None, float | None] | None = None,
        logit_scale: float | tuple[float | None, float | None] | None = None,
    ) -> None:
        super().__init__()
        configure(
            self,
            divergence,
            beta,
            alpha,
            temperature,
            scale_by_temperature_squared,
            ignore_index,
            reduction,
            shift_labels=shift_labels,
            vocab_size=vocab_size,
            softcap=softcap,
            logit_scale=logit_scale,
        )
        _configure_groups(self, vocab_group, data_group, validate)

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
        *,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _eager(self._forward, student_logits, teacher_logits, labels, num_items, mask)

    def _forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None,
        num_items: Any,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        s, t = student_logits, teacher_logits
        keep, num_items, widths = _settle(
            self, self._inspect(s, t, labels, num_items, mask), (s, t)
        )
        cut = _vocab_cut(self, s.shape[-1], widths, s.device)
        s, t = s[..., :cut], t[..., :cut]
        maps, temperature = mapped.fold(logit_maps(self), self.temperature)
        v = s.shape[-1]
        tokens = tuple(s.shape[:-1])
        flat_keep = None if keep is None else keep.reshape(-1)
        n = math.prod(tokens)  # not reshape(-1, v): v may be 0 on a rank
        rows = vocab_parallel_rows(
            self.divergence,
            s.reshape(n, v),
            t.reshape(n, v),
            flat_keep,
            temperature=temperature,
            beta=self.beta,
            alpha=self.alpha,
            vocab_group=self.vocab_group,
            maps=maps,
        ).reshape(tokens)
        wide = torch.promote_types(s.dtype, t.dtype)
        rows = rows.to(torch.promote_types(wide, torch.float32))
        if self.scale_by_temperature_squared:
            rows = rows * self.temperature**2
        return _data_parallel_reduce(rows, keep, self.reduction, num_items, self.data_group)

    def _inspect(self, s: Any, t: Any, labels: Any, num_items: Any, mask: Any) -> _Inspection:
        num_items, problems, value = _num_items(num_items, self)
        problems += _not_tensors({"student_logits": s, "teacher_logits": t})
        if problems:
            return _Inspection(problems, num_items=num_items)
        if s.ndim < 1:
            problems.append("the logits have no vocabulary axis")
        # one rank holding the whole vocabulary: padded widths may differ, as in
        # DistillationLoss; slices of a split vocabulary must match
        padded = (
            _world(self.vocab_group) == 1
            and self.vocab_size is not None
            and s.ndim >= 1
            and s.shape[:-1] == t.shape[:-1]
            and min(s.shape[-1], t.shape[-1]) >= self.vocab_size
        )
        if s.shape != t.shape and not padded:
            problems.append(
                f"student and teacher logits differ in shape: {tuple(s.shape)} and {tuple(t.shape)}"
            )
        if s.dtype not in _DTYPES or t.dtype not in _DTYPES:
            problems.append(
                "the logits are not floating point (float16, bfloat16, float32 or float64): "
                f"{s.dtype} and {t.dtype}"
            )
        problems += _off_device(s.device, {"teacher_logits": t})
        if t.requires_grad:
            problems.append(_TEACHER_GRAD)
        tokens = tuple(s.shape[:-1])
        keep, more = _token_keep(self, labels, mask, tokens, s.device)
        problems += more
        if problems:
            return _Inspection(problems, num_items=num_items)
        width = s.shape[-1]
        facts = {
            "config": {
                "dtypes": [str(s.dtype), str(t.dtype)],
                "device type": s.device.type,
                "labels given": labels is not None,
                "mask given": mask is not None,
                "num_items": value,
            },
            "vocab": {"the row counts": math.prod(tokens), "the kept tokens": _digest(keep)},
            "data": {"the slice widths": width},
            "width": width,
        }
        return _Inspection(problems, facts, keep, num_items)


def _digest(keep: torch.Tensor | None) -> list[int] | None:
    """Which tokens a rank keeps, as (count, position-weighted sum): the ranks of a vocab group
    hold slices of the same tokens, so their labels and masks must keep the same ones (a
    different but valid label tensor on one rank gave each rank a different loss). One
    device-to-host read of two integers; nothing to read on meta tensors."""
    if keep is None or keep.device.type == "meta":
        return None
    flat = keep.reshape(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, device=flat.device) % 1_000_003
    return [int(v) for v in torch.stack([flat.sum(), (flat * weights).sum()]).tolist()]


_TEACHER_GRAD = "the teacher requires a gradient (detach it; the student gets one)"
_TEACHER_FORMS = (
    "Expected the teacher either as `teacher_logits` or as `teacher_hidden` with "
    "`teacher_weight` (and optionally `teacher_bias`)"
)


@dataclass
class _Inspection:
    """One rank's look at its inputs before any collective: what is wrong with them, the
    facts that validation compares over the groups (empty if anything is wrong: a rank's
    facts mean little then), and the kept tokens and ``num_items`` for the forward pass."""

    problems: list[str]
    facts: dict[str, Any] = field(
        default_factory=lambda: {"config": {}, "vocab": {}, "data": {}, "width": None}
    )
    keep: torch.Tensor | None = None
    num_items: Any = None


def _settle(
    module: _ParallelConfig, seen: _Inspection, inputs: tuple[Any, ...]
) -> tuple[Any, Any, list[int] | None]:
    """Raises for the problems ``seen``: with ``validate``, on every rank, after sharing them
    (:func:`_validate`); without, on this rank alone. Else the kept tokens and ``num_items``.

    Every local check runs before this point and only collects problems: a rank that raised
    on its own (an AttributeError on a None input, say) would leave the others waiting in
    the exchange, or matching their collectives with its next call."""
    widths = None
    if module.validate:
        widths = _validate(module, seen.problems, seen.facts, inputs)
    elif seen.problems:
        raise ValueError("Invalid inputs on this rank: " + "; ".join(seen.problems) + ".")
    return seen.keep, seen.num_items, widths


def _not_tensors(named: dict[str, Any], optional: tuple[str, ...] = ()) -> list[str]:
    return [
        f"Expected `{name}` to be a torch.Tensor, got {type(x).__name__}"
        for name, x in named.items()
        if not isinstance(x, torch.Tensor) and not (x is None and name in optional)
    ]


def _off_device(device: torch.device, named: dict[str, torch.Tensor | None]) -> list[str]:
    return [
        f"Expected `{name}` on the student's device {device}, got {x.device}"
        for name, x in named.items()
        if x is not None and x.device != device
    ]


def _shapes(named: dict[str, torch.Tensor | None]) -> str:
    return ", ".join(f"`{k}` {tuple(x.shape)}" for k, x in named.items() if x is not None)


def _token_keep(
    module: _ParallelConfig,
    labels: Any,
    mask: Any,
    tokens: tuple[int, ...],
    device: torch.device,
) -> tuple[torch.Tensor | None, list[str]]:
    """:func:`token_keep`, and its complaints as problems for :func:`_settle`."""
    problems = []
    if isinstance(labels, torch.Tensor) and tuple(labels.shape) != tokens:
        problems.append(f"labels are not of the token shape {tokens}: got {tuple(labels.shape)}")
        labels = None  # still check the mask
    try:
        keep = token_keep(labels, mask, tokens, module.ignore_index, device, module.shift_labels)
        return keep, problems
    except (TypeError, ValueError, RuntimeError) as e:
        return None, [*problems, str(e).rstrip(".")]


def _num_items(num_items: Any, module: _ParallelConfig) -> tuple[Any, list[str], float | None]:
    """``num_items`` checked, its complaint as a problem, and (when validating) its value,
    which every rank must share: it is the *global* denominator."""
    try:
        checked = _check.check_num_items(num_items, module.reduction)
        value = float(checked) if module.validate and checked is not None else None
    except (TypeError, ValueError, RuntimeError) as e:
        return None, [str(e).rstrip(".")], None
    return checked, [], value


def _validate(
    module: _ParallelConfig,
    local: list[str],
    facts: dict[str, Any],
    inputs: tuple[Any, ...],
) -> list[int] | None:
    """Share every rank's facts and problems over the vocab group, then the data group, then
    (when there are both) the vocab group again, so that every rank of a full mesh ends
    with the same list and raises the same ``ValueError``, or none does. Each round is one
    all-gather of a few KiB of JSON per rank.

    ``facts``: ``"config"``, settings that every rank must share; ``"vocab"`` and ``"data"``,
    sizes that must agree over that group, by name (those its collectives exchange first);
    ``"width"``, this rank's slice of the vocabulary. They are compared only when no rank
    has a problem of its own, whose facts may be missing or meaningless."""
    me = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    config = {
        "divergence": module.divergence,
        "beta": module.beta,
        "alpha": module.alpha,
        "temperature": module.temperature,
        "reduction": module.reduction,
        "ignore_index": module.ignore_index,
        "T^2": module.scale_by_temperature_squared,
        "vocab_size": module.vocab_size,
        "shift_labels": module.shift_labels,
        "softcap": module.softcap,
        "logit_scale": module.logit_scale,
        **facts["config"],
    }
    mine = {
        "problems": [f"rank {me}: {msg}" for msg in local],
        "config": config,
        "vocab": facts["vocab"],
        "data": facts["data"],
        "width": facts["width"],
    }
    problems = mine["problems"]
    vocab, data = module.vocab_group, module.data_group
    widths = [facts["width"]]
    if _world(vocab) > 1:
        every = _gather_json(mine, vocab, inputs)
        problems = _union(every) or _compare(every, "vocab")
        widths = [m["width"] for m in every]
    if not problems and module.vocab_size is not None and sum(widths) < module.vocab_size:
        problems = [
            f"the slices' widths {widths} add up to {sum(widths)}, less than "
            f"vocab_size={module.vocab_size}"
        ]
    if _world(data) > 1:
        every = _gather_json({**mine, "problems": problems}, data, inputs)
        problems = _union(every) or _compare(every, "data")
        if _world(vocab) > 1:  # tell the vocab group what the data groups found
            problems = _union(_gather_json({"problems": problems}, vocab, inputs))
    if problems:
        raise ValueError("Inconsistent parallel inputs: " + "; ".join(problems) + ".")
    return widths


_JSON_BYTES = 4096


def _gather_json(obj: dict, group: Any, inputs: tuple[Any, ...]) -> list[dict]:
    """Every rank's ``obj``, through one all-gather of a fixed-size byte buffer."""
    raw = json.dumps(obj, sort_keys=True).encode()  # ASCII: no NUL byte
    if len(raw) > _JSON_BYTES:  # only long problems get here: keep their starts
        short = [p[:200] for p in obj["problems"][:10]]
        raw = json.dumps({**obj, "problems": short}, sort_keys=True).encode()
    buf = torch.zeros(_JSON_BYTES, dtype=torch.uint8)
    buf[: len(raw)] = torch.frombuffer(bytearray(raw[:_JSON_BYTES]), dtype=torch.uint8)
    every = _gather(buf.to(_exchange_device(group, inputs)), group).cpu()
    # the text ends at the buffer's last nonzero byte
    return [json.loads(bytes(row[row != 0].tolist())) for row in every]


def _exchange_device(group: Any, inputs: tuple[Any, ...]) -> torch.device:
    """Where validation's buffer goes: the CPU if the group's backend takes CPU tensors
    (Gloo, or Gloo beside NCCL: no device synchronisation then), else the first input on a
    device it takes, else that device type's current device. Never read from one input
    alone: a rank whose input is None or a NumPy array must still take part."""
    config = dist.get_backend_config(group)  # e.g. "cpu:gloo,cuda:nccl"
    types = [part.split(":")[0].strip() for part in config.split(",") if ":" in part]
    if not types or "cpu" in types:
        return torch.device("cpu")
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.device.type in types:
            return x.device
    return torch.device(types[0], getattr(torch, types[0]).current_device())


def _union(every: list[dict]) -> list[str]:
    return sorted({p for m in every for p in m["problems"]})


def _compare(every: list[dict], group: str) -> list[str]:
    """What differs over ``group``: the sizes its collectives need equal, and the settings."""
    sizes = every[0][group]
    found = [p for k in sizes for p in _differ(k, [m[group][k] for m in every], group)]
    return found + _differ("the settings", [m["config"] for m in every], group)


def _differ(what: str, values: list[Any], group: str) -> list[str]:
    # compared as JSON text: a NaN num_items equals itself there
    text = [json.dumps(v, sort_keys=True) for v in values]
    if all(x == text[0] for x in text):
        return []
    if all(isinstance(v, dict) for v in values):
        keys = sorted(k for k in values[0] if len({json.dumps(v.get(k)) for v in values}) > 1)
        shown = {k: [v.get(k) for v in values] for k in keys}
        return [f"{what} differ over the {group} group: {shown}"]
    return [f"{what} differ over the {group} group: {values}"]


def _data_parallel_reduce(
    rows: torch.Tensor, keep: torch.Tensor | None, reduction: str, num_items: Any, group: Any
) -> torch.Tensor:
    """Per-token values reduced over the tokens of every rank of ``group``."""
    if _world(group) == 1 or reduction == "none":
        return reduce_rows(rows, keep, reduction, num_items)
    count = rows.numel() if keep is None else keep.sum()
    return _global_total(rows.sum(), count, reduction, num_items, group)


def _global_total(
    local: torch.Tensor, count: Any, reduction: str, num_items: Any, group: Any
) -> torch.Tensor:
    """``"mean"``/``"sum"`` from this rank's sum and count of kept tokens: one all-reduce of
    (sum, count) over ``group``, never a mean of means. The value is the global one on every
    rank; its gradient with respect to this rank's sum is the global loss's (1, or 1/count),
    since the other ranks' sums enter as constants. An empty mean is 0."""
    packed = torch.stack(
        [local.detach().double(), torch.as_tensor(count, device=local.device).double()]
    )
    _sum(packed, group)
    total = _GlobalSum.apply(local, packed[0].to(local.dtype))
    return reduce_total(total, packed[1].to(total.dtype), reduction, num_items)


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


class ParallelFusedLinearDistillationLoss(torch.nn.Module):
    """:class:`~kldiv.torch.FusedLinearDistillationLoss` with the LM heads split by vocabulary
    over the ranks of ``vocab_group`` (and the tokens over ``data_group``).

    ``forward(student_hidden, student_weight, teacher_logits=None, labels=None,
    num_items=None, *, student_bias=None, teacher_hidden=None, teacher_weight=None,
    teacher_bias=None, mask=None)``: the student's hidden states ``[..., H]`` (the same on
    every rank of the vocab group), this rank's rows ``[V_r, H]`` of its LM head (and
    ``[V_r]`` of its bias), and the teacher as this rank's ``[..., V_r]`` logits or as hidden
    states with its own head's ``[V_r, H_t]`` rows; ``mask`` as in
    :class:`ParallelDistillationLoss`. Configuration, validation and reductions are those of
    :class:`ParallelDistillationLoss`; the value equals ``FusedLinearDistillationLoss`` on the
    full heads and the whole batch.

    No ``[N, V_r]`` logits are kept: every chunk of ``chunk_size`` rows is recomputed by
    one matmul in each of three passes (statistics, terms, gradients), three times the
    logit matmuls of the single-device loss, in exchange for memory that does not grow with
    N·V. Gradients: the hidden states (summed over the vocab group with one all-reduce of
    ``[N, H]``, as any vocab-parallel LM head needs), this rank's weight rows and bias. The
    teacher gets none. Collectives per forward: validation's gathers, the statistics' gather,
    the terms' all-reduce and the hidden gradient's all-reduce (in backward instead for
    ``reduction="none"``: backward must then run on every rank of the vocab group), plus one
    on ``data_group``. Since that all-reduce and the statistics' gather need equal sizes and
    dtypes, validation also compares the student's and the teacher's hidden sizes, the
    dtypes and which inputs want gradients.
    """

    divergence: DistillationKind
    beta: float
    alpha: float
    temperature: float
    scale_by_temperature_squared: bool
    ignore_index: int
    reduction: Reduction
    shift_labels: bool
    vocab_size: int | None
    softcap: Any
    logit_scale: Any
    vocab_group: Any
    data_group: Any
    validate: bool

    def __init__(
        self,
        divergence: DistillationKind = "kl",
        *,
        beta: float = JS_BETA,
        alpha: float = SKEW_ALPHA,
        temperature: float = TEMPERATURE,
        scale_by_temperature_squared: bool = False,
        ignore_index: int = -100,
        reduction: Reduction = REDUCTION,
        vocab_group: Any = None,
        data_group: Any = None,
        vocab_size: int | None = None,
        validate: bool = True,
        chunk_size: int | None = None,
        shift_labels: bool = False,
        softcap: float | tuple[float | None, float | None] | None = None,
        logit_scale: float | tuple[float | None, float | None] | None = None,
    ) -> None:
        super().__init__()
        configure(
            self,
            divergence,
            beta,
            alpha,
            temperature,
            scale_by_temperature_squared,
            ignore_index,
            reduction,
            shift_labels=shift_labels,
            vocab_size=vocab_size,
            softcap=softcap,
            logit_scale=logit_scale,
        )
        _configure_groups(self, vocab_group, data_group, validate)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"Expected `chunk_size` to be None or an int ≥ 1, got {chunk_size!r}.")
        self.chunk_size = chunk_size

    extra_repr = ParallelDistillationLoss.extra_repr

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items: Any = None,
        *,
        student_bias: torch.Tensor | None = None,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _eager(
            self._forward,
            student_hidden,
            student_weight,
            teacher_logits,
            labels,
            num_items,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            mask,
        )

    def _forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None,
        num_items: Any,
        student_bias: torch.Tensor | None,
        teacher_hidden: torch.Tensor | None,
        teacher_weight: torch.Tensor | None,
        teacher_bias: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        hidden, weight, bias = student_hidden, student_weight, student_bias
        by_head = teacher_hidden is not None or teacher_weight is not None
        if by_head:
            teacher, stray = (teacher_hidden, teacher_weight, teacher_bias), teacher_logits
        else:
            teacher, stray = (teacher_logits, None, None), teacher_bias
        seen = self._inspect(hidden, weight, bias, teacher, by_head, stray, labels, num_items, mask)
        keep, num_items, widths = _settle(self, seen, (hidden, weight, *teacher))
        t_src, t_w, t_b = teacher
        assert t_src is not None  # settled: the teacher is given
        cut = _vocab_cut(self, weight.shape[0], widths, hidden.device)
        if cut < weight.shape[0]:  # the padded rows of the heads are never read
            weight, bias = weight[:cut], None if bias is None else bias[:cut]
            if t_w is None:
                t_src = t_src[..., :cut]
            else:
                t_w, t_b = t_w[:cut], None if t_b is None else t_b[:cut]
        maps, temperature = mapped.fold(logit_maps(self), self.temperature)
        tokens = tuple(hidden.shape[:-1])
        n, v = math.prod(tokens), weight.shape[0]
        keep = None if keep is None else keep.reshape(-1)
        t_src = t_src.reshape(n, v if t_w is None else t_w.shape[1])
        cfg = linear.Config(
            self.divergence,
            temperature,
            self.beta,
            self.alpha,
            self.chunk_size,
            _VocabGroup(self.vocab_group),
            maps,
        )
        reduce = self.reduction != "none"
        out = linear.apply(
            hidden.reshape(n, hidden.shape[-1]),
            weight,
            bias,
            t_src,
            t_w,
            t_b,
            None,
            keep,
            cfg,
            reduce,
            torch.is_grad_enabled(),
        )
        out = out.to(
            torch.promote_types(torch.promote_types(hidden.dtype, t_src.dtype), torch.float32)
        )
        if self.scale_by_temperature_squared:
            out = out * self.temperature**2
        if not reduce:
            return out.reshape(tokens)
        count = n if keep is None else keep.sum()
        if _world(self.data_group) > 1:
            return _global_total(out, count, self.reduction, num_items, self.data_group)
        return reduce_total(out, count, self.reduction, num_items)

    def _inspect(
        self,
        hidden: Any,
        weight: Any,
        bias: Any,
        teacher: tuple[Any, Any, Any],
        by_head: bool,
        stray: Any,
        labels: Any,
        num_items: Any,
        mask: Any,
    ) -> _Inspection:
        """``teacher``: ``(teacher_logits, None, None)``, or ``(teacher_hidden,
        teacher_weight, teacher_bias)`` if ``by_head``; ``stray``: the other form's argument
        (``teacher_bias`` or ``teacher_logits``), which must be None."""
        num_items, problems, value = _num_items(num_items, self)
        t_src, t_w, t_b = teacher
        inputs = {"student_hidden": hidden, "student_weight": weight, "student_bias": bias}
        if by_head:
            inputs |= {"teacher_hidden": t_src, "teacher_weight": t_w, "teacher_bias": t_b}
        else:
            inputs["teacher_logits"] = t_src
        problems += _not_tensors(inputs, optional=("student_bias", "teacher_bias"))
        if stray is not None:
            problems.append(_TEACHER_FORMS)
        if problems:
            return _Inspection(problems, num_items=num_items)
        given = {k: x for k, x in inputs.items() if x is not None}
        tokens = tuple(hidden.shape[:-1])
        v = weight.shape[0] if weight.ndim == 2 else 0
        if not (
            hidden.ndim >= 1
            and weight.ndim == 2
            and weight.shape[1] == hidden.shape[-1]
            and (bias is None or tuple(bias.shape) == (v,))
        ):
            problems.append(
                "the student's hidden states, LM-head slice or bias do not fit together: "
                + _shapes({k: x for k, x in given.items() if k.startswith("student")})
            )
        elif not (
            t_w.ndim == 2
            and t_w.shape[0] == v
            and tuple(t_src.shape) == (*tokens, t_w.shape[1])
            and (t_b is None or tuple(t_b.shape) == (v,))
            if by_head
            else tuple(t_src.shape) == (*tokens, v)
        ):
            problems.append(
                f"the teacher's inputs do not fit the student's tokens {tokens} and {v} "
                "vocabulary rows: "
                + _shapes({k: x for k, x in given.items() if k.startswith("teacher")})
            )
        not_float = [f"`{k}` {x.dtype}" for k, x in given.items() if not x.is_floating_point()]
        if not_float:
            problems.append("the inputs are not floating point: " + ", ".join(not_float))
        problems += _off_device(hidden.device, given)
        if any(x.requires_grad for k, x in given.items() if k.startswith("teacher")):
            problems.append(_TEACHER_GRAD)
        keep, more = _token_keep(self, labels, mask, tokens, hidden.device)
        problems += more
        if problems:
            return _Inspection(problems, num_items=num_items)
        # the hidden states' all-reduce runs where their gradient is wanted: everywhere or
        # nowhere, which validation checks with the settings
        grads = [
            torch.is_grad_enabled() and x is not None and x.requires_grad
            for x in (hidden, weight, bias)
        ]
        sizes = {
            "the hidden sizes": hidden.shape[-1],
            "the teacher's hidden sizes": None if t_w is None else t_w.shape[1],
        }
        facts = {
            "config": {
                "dtypes": [str(x.dtype) for x in (hidden, weight, t_src)],
                # the dtype of the hidden states' gradient, which the vocab group sums
                "matmul dtype": str(linear.matmul_dtype(hidden.dtype, hidden.device)),
                "gradients (hidden, weight, bias)": grads,
                "device type": hidden.device.type,
                "labels given": labels is not None,
                "mask given": mask is not None,
                "num_items": value,
            },
            "vocab": {
                "the row counts": math.prod(tokens),
                "the kept tokens": _digest(keep),
                **sizes,
            },
            "data": {"the slice widths": v, **sizes},
            "width": v,
        }
        return _Inspection(problems, facts, keep, num_items)
