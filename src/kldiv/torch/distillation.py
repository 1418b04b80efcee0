"""``DistillationLoss``: the divergence between a teacher's and a student's logits, per token,
with labels, temperature and global normalisation, dispatched to the fastest exact path."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .. import _check
from .._defaults import (
    FAST_PATHS,
    JS_BETA,
    REDUCTION,
    SKEW_ALPHA,
    TEMPERATURE,
    DistillationKind,
    FastPath,
    Reduction,
)
from .._kinds import ENGINE_KINDS, params_of, weight_of
from .._spec import LogitMap
from .._spec import apply_map as _apply_map
from ..divergences import KINDS
from ._rows import dispatch, mapped
from ._rows.dispatch import reduce_rows
from .topk import TopKTeacher, topk_distillation_rows

__all__ = ["DistillationLoss"]

DIVERGENCES = ENGINE_KINDS
_FAST_PATHS = FAST_PATHS


class DistillationConfig(Protocol):
    """The shared configuration that :func:`configure` sets on the distillation losses (each
    declares these attributes, so that type checkers know them on the ``nn.Module``)."""

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


def configure(
    module: DistillationConfig,
    divergence: DistillationKind,
    beta: float,
    alpha: float,
    temperature: float,
    scale_by_temperature_squared: bool,
    ignore_index: int,
    reduction: Reduction,
    *,
    shift_labels: bool = False,
    vocab_size: int | None = None,
    softcap: Any = None,
    logit_scale: Any = None,
) -> None:
    """Validate the distillation losses' shared configuration and set it on ``module``."""
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"Unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}."
        )
    module.divergence = divergence
    module.beta = _check.check_unit_interval("beta", beta)
    module.alpha = _check.check_unit_interval("alpha", alpha)
    module.temperature = _check.check_temperature(temperature, ("logits", "logits"))
    module.scale_by_temperature_squared = _check.check_flag(
        "scale_by_temperature_squared", scale_by_temperature_squared
    )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"Expected `ignore_index` to be an int, got {ignore_index!r}.")
    module.ignore_index = ignore_index
    module.reduction = _check.check_reduction(reduction)
    module.shift_labels = _check.check_flag("shift_labels", shift_labels)
    if vocab_size is not None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1
    ):
        raise ValueError(f"Expected `vocab_size` to be None or a positive int, got {vocab_size!r}.")
    module.vocab_size = vocab_size
    _check.check_logit_maps(softcap, logit_scale, ("logits", "logits"))
    module.softcap, module.logit_scale = softcap, logit_scale


def logit_maps(module: DistillationConfig) -> tuple[LogitMap, LogitMap]:
    """The (teacher, student) :class:`kldiv._spec.LogitMap` of ``softcap`` and
    ``logit_scale``."""
    return _check.check_logit_maps(module.softcap, module.logit_scale, ("logits", "logits"))


def vocab_slices(
    module: DistillationConfig, student: torch.Tensor, teacher: torch.Tensor, names: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits cut to the first ``vocab_size`` columns (views; the columns beyond get a
    zero gradient through the slicing), or checked for one width when it is None.
    ``names``: what to call the two in a message."""
    ws, wt = student.shape[-1], teacher.shape[-1]
    v = module.vocab_size
    if v is None:
        if ws != wt:
            raise ValueError(
                f"Expected {names} of the same vocabulary width, got {ws} and {wt}. If one is "
                "padded (e.g. 32000 and 32064), pass `vocab_size=` (the real vocabulary): the "
                "columns beyond it are ignored."
            )
        return student, teacher
    if v > min(ws, wt):
        raise ValueError(
            f"Expected `vocab_size` ≤ the width of {names}, got vocab_size={v} for widths "
            f"{ws} and {wt}."
        )
    return student[..., :v], teacher[..., :v]


def check_float_tensor(name: str, x: Any) -> None:
    """A floating-point torch tensor, or ``TypeError`` naming the argument: integer, boolean
    and complex logits are refused on every path, as the core refuses them."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"Expected `{name}` to have a real floating dtype (float16, bfloat16, float32, "
            f"float64), got {x.dtype}. Cast explicitly, e.g. to float32."
        )


def token_keep(
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    tokens: tuple[int, ...],
    ignore_index: int,
    device: torch.device,
    shift: bool = False,
) -> torch.Tensor | None:
    """The tokens to keep, a bool tensor of the token shape (None: all of them), shared by
    the distillation losses: ``labels != ignore_index`` (with ``shift``, the causal-LM
    convention: ``labels`` are the input ids, position i is kept where ``labels[..., i + 1]``
    is not ``ignore_index``, and the last position of the last axis never is), and ``mask``
    where given (boolean
    or 0/1 integer, e.g. Hugging Face's ``attention_mask``; made boolean by the core's
    :func:`kldiv._check.as_mask`, value check included). Both must be tensors on ``device``
    (the logits'): a NumPy mask or a CPU mask beside CUDA logits is refused here, by name,
    instead of failing deep inside a kernel."""
    for name, x in (("labels", labels), ("mask", mask)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Expected `{name}` to be a torch.Tensor, got {type(x).__name__}.")
        if x.device != device:
            raise ValueError(f"Expected `{name}` on the logits' device {device}, got {x.device}.")
    keep = None
    if labels is not None:
        if tuple(labels.shape) != tokens:
            raise ValueError(
                f"Expected `labels` of the token shape {tokens}, got {tuple(labels.shape)}."
            )
        if labels.dtype == torch.bool:
            # `labels != ignore_index` would keep every token of a boolean mask: refuse it
            # rather than silently ignore what was meant as a mask
            raise TypeError(
                "Expected `labels` to hold token ids (ignore_index marks tokens to skip), got "
                "dtype torch.bool. Pass a keep-mask as `mask=`."
            )
        keep = labels != ignore_index
        if shift:
            if labels.ndim == 0:
                raise ValueError(
                    "Expected `labels` with a sequence axis for shift_labels=True, got a 0-d "
                    "tensor."
                )
            keep = torch.cat([keep[..., 1:], torch.zeros_like(keep[..., :1])], dim=-1)
    if mask is not None:
        if tuple(mask.shape) != tokens:
            raise ValueError(
                f"Expected `mask` of the token shape {tokens}, got {tuple(mask.shape)}."
            )
        mask = _check.as_mask("mask", mask)
        keep = mask if keep is None else keep & mask
    return keep


def config_repr(module: DistillationConfig) -> list[str]:
    """The set parts of the shared configuration, for ``extra_repr``."""
    parts = [f"divergence={module.divergence!r}"]
    if module.divergence == "js":
        parts.append(f"beta={module.beta}")
    if module.divergence.startswith("skew"):
        parts.append(f"alpha={module.alpha}")
    parts += [f"temperature={module.temperature}", f"reduction={module.reduction!r}"]
    if module.scale_by_temperature_squared:
        parts.append("scale_by_temperature_squared=True")
    for name in ("shift_labels", "vocab_size", "softcap", "logit_scale"):
        value = getattr(module, name)
        if value not in (None, False):
            parts.append(f"{name}={value!r}")
    return parts


class DistillationLoss(torch.nn.Module):
    """D(teacher‖student) per token from logits, for knowledge distillation.

    ``divergence`` names the core function applied as ``f(teacher, student)``: ``"kl"`` is
    KL(teacher‖student) (mass-covering), ``"reverse_kl"`` KL(student‖teacher)
    (mode-seeking), ``"js"`` the generalised JSD with weight ``beta`` on the teacher,
    ``"skew_kl"``/``"skew_reverse_kl"`` with ``alpha``, ``"tv"`` total variation. Both
    logits are divided by ``temperature``; ``scale_by_temperature_squared=True`` multiplies
    the loss by T² (Hinton et al.'s gradient-scale correction; off by default, never implied).

    ``forward(student_logits, teacher_logits, labels=None, num_items=None, *, mask=None)``:
    logits ``[..., V]`` (any float dtype; computed in float32 or wider), ``labels`` the token
    shape with ``ignore_index`` marking tokens to skip (they may hold garbage, NaN included),
    ``num_items`` the denominator of ``"mean"`` (e.g. the global count of valid tokens under
    gradient accumulation), and ``mask`` a keep-mask of the token shape, boolean or 0/1
    integer (Hugging Face's ``attention_mask`` as it comes; other values raise
    ``ValueError``, checked eagerly only: under ``torch.compile`` any non-zero value keeps
    the token). With both, a token is kept where its label is not ``ignore_index`` and its
    mask is set. Pass an ``attention_mask`` as ``mask=``, never as ``labels``: its 0s are not
    ``ignore_index``, so as labels it would skip nothing. ``reduction``: ``"mean"`` over valid
    tokens (0 when there are none), ``"sum"``, or ``"none"`` (per token, skipped tokens 0).

    Labels are per position: the label of position i is the token that position predicts.
    ``shift_labels=True`` takes the causal-LM batch as it comes instead: ``labels`` are the
    input ids, position i is kept where ``labels[..., i + 1]`` is not ``ignore_index``, and the
    last position of the last axis (the sequence) never is. ``mask`` is never shifted: it
    keeps positions as they are (without ``labels``, ``shift_labels`` changes nothing).

    ``vocab_size``: the real vocabulary, for teacher and student logits of different widths
    (padded embedding tables, e.g. 32000 and 32064): the first ``vocab_size`` columns are the
    vocabulary, the columns beyond it are ignored on either side whatever they hold, and
    their gradient is exactly 0. Without it the widths must be equal.

    ``softcap`` (c) and ``logit_scale`` (σ): what the models' heads do to their logits before
    the softmax, applied before the temperature: ``z ↦ σ·z``, then ``z ↦ c·tanh(z/c)``
    (Gemma-family soft-capping). One value applies to both sides, a ``(teacher, student)``
    pair to each (None: nothing). ``±inf`` logits stay ``±inf``. The gradient is that of the
    composition, ``σ·(1 − tanh²(σz/c))`` times the divergence's. The C and Triton kernels
    apply them as they read the logits (no ``[N, V]`` copy; one tanh more per logit read);
    equal scales without a cap are a temperature of ``T/σ``.

    ``teacher_logits`` may instead be a :class:`~kldiv.torch.TopKTeacher` (``indices`` and
    ``log_probs`` ``[..., K]`` as offline pipelines store them, with a required tail policy,
    ``"tail_bucket"`` or ``"renormalize"``; see :mod:`kldiv.torch.topk`): the same
    divergence between the teacher's stored top-k and the student's full logits, never a
    silently truncated sum.

    Paths (same values and gradients, tested against each other), chosen per call when
    ``fast_path=True`` and only the student needs a gradient:

    * CUDA tensors with Triton installed: fused Triton kernels for all six divergences
      (float32, bfloat16 or float16 logits; float32 arithmetic). The forward reads the logits
      once (twice for JS, skew and TV) and keeps five floats a row; the backward reads them
      once more and writes the gradient in the student's dtype, with ``grad_output`` applied in
      the same pass. No ``[N, V]`` float32 scratch, no host synchronisation, and the kernels are
      ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` traces through them.
    * CPU tensors (float32 or half precision): a chunked path that computes loss and gradient
      in one pass over row blocks that stay in cache. KL and reverse KL go through a small C
      kernel that the system compiler builds on first use (cached; ``KLDIV_NATIVE=0`` or a
      missing compiler selects the same path in tensor code, see
      :mod:`kldiv.torch._rows.native`).
    * Otherwise the core (:func:`kldiv.divergence`), which also gives the teacher its gradient
      when it requires one, and keeps float64 inputs in float64.

    The chunked CPU path computes the gradient in the forward pass and scales it in place in
    backward; a second backward through a retained graph (``retain_graph=True``) computes it
    again, and ``create_graph=True`` (second derivatives) recomputes it through the core, so
    both are exact.

    ``fast_path=False`` forces the core; ``fast_path="triton"`` or ``"chunked"`` forces that
    path and raises if it cannot take the inputs (``"triton"`` runs on CPU tensors under
    ``TRITON_INTERPRET=1``, which is how the kernels are tested without a GPU).
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
        fast_path: bool | FastPath = True,
        shift_labels: bool = False,
        vocab_size: int | None = None,
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
        # by identity: 0 and 1 equal False and True, and would pass a membership test
        if not any(
            fast_path is p or (isinstance(fast_path, str) and fast_path == p) for p in _FAST_PATHS
        ):
            raise ValueError(
                f"Expected `fast_path` to be True, False, 'triton' or 'chunked', got {fast_path!r}."
            )
        self.fast_path = fast_path

    def extra_repr(self) -> str:
        return ", ".join(config_repr(self))

    def _params(self) -> dict[str, float]:
        return params_of(self.divergence, self.beta, self.alpha)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_items: Any = None,
        *,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_float_tensor("student_logits", student_logits)
        if isinstance(teacher_logits, TopKTeacher):
            return self._topk(student_logits, teacher_logits, labels, num_items, mask)
        check_float_tensor("teacher_logits", teacher_logits)
        if student_logits.ndim == 0:
            raise ValueError("Expected logits of shape [..., V], got 0-d tensors.")
        if student_logits.device != teacher_logits.device:
            raise ValueError(
                f"Expected the teacher's logits on the student's device {student_logits.device}, "
                f"got {teacher_logits.device}."
            )
        if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
            raise ValueError(
                f"Expected student and teacher logits of the same shape, got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}."
            )
        student_logits, teacher_logits = vocab_slices(
            self, student_logits, teacher_logits, "the student and teacher logits"
        )
        keep = token_keep(
            labels,
            mask,
            tuple(student_logits.shape[:-1]),
            self.ignore_index,
            student_logits.device,
            self.shift_labels,
        )
        num_items = _check.check_num_items(num_items, self.reduction)
        scale = self.temperature**2 if self.scale_by_temperature_squared else 1.0
        maps = logit_maps(self)
        path = self.path_for(student_logits, teacher_logits)
        if path != "core":
            folded, temperature = mapped.fold(maps, self.temperature)
            rows = dispatch.rows(
                path,
                self.divergence,
                student_logits,
                teacher_logits,
                keep,
                temperature,
                self.beta,
                self.alpha,
                maps=folded,
            )
            loss = reduce_rows(rows, keep, self.reduction, num_items)
        else:
            with dispatch.core_only():  # the core, not the engine it may hand work to
                loss = KINDS[self.divergence](
                    teacher_logits,
                    student_logits,
                    form="logits",
                    temperature=self.temperature,
                    mask=keep,
                    reduction=self.reduction,
                    num_items=num_items,
                    softcap=self.softcap,
                    logit_scale=self.logit_scale,
                    **self._params(),
                )
        return loss * scale if scale != 1.0 else loss

    def path_for(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> str:
        """Which engine computes these inputs: ``"triton"``, ``"chunked"`` or ``"core"`` (see
        the class doc). Raises ``ValueError`` with the reason when a forced ``fast_path``
        cannot take them."""
        return dispatch.choose(
            self.fast_path, self.divergence, self._weight(), student_logits, teacher_logits
        )

    def _weight(self) -> float:
        return weight_of(self.divergence, self.beta, self.alpha)

    def _topk(
        self,
        student: torch.Tensor,
        teacher: TopKTeacher,
        labels: torch.Tensor | None,
        num_items: Any,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """D(teacher‖student) for a top-k sparse teacher (see :mod:`kldiv.torch.topk`)."""
        dispatch.choose_topk(self.fast_path)
        t_map, s_map = logit_maps(self)
        if not t_map.identity:
            raise ValueError(
                "Expected `softcap` and `logit_scale` for the student only with a TopKTeacher "
                "(it holds log-probabilities): pass them as (None, value)."
            )
        if self.vocab_size is not None:
            if self.vocab_size > student.shape[-1]:
                raise ValueError(
                    f"Expected `vocab_size` ≤ the width of the student logits, got "
                    f"vocab_size={self.vocab_size} for width {student.shape[-1]}."
                )
            student = student[..., : self.vocab_size]
        keep = token_keep(
            labels,
            mask,
            tuple(student.shape[:-1]),
            self.ignore_index,
            student.device,
            self.shift_labels,
        )
        if not s_map.identity:
            if keep is not None:  # skipped rows filled first: NaN there must not reach tanh's grad
                student = torch.where(keep[..., None], student, 0.0)
            student = spec_map(student, s_map)
        num_items = _check.check_num_items(num_items, self.reduction)
        rows = topk_distillation_rows(
            self.divergence, student, teacher, keep, self.temperature, self.beta, self.alpha
        )
        if self.scale_by_temperature_squared:
            rows = rows * self.temperature**2
        return reduce_rows(rows, keep, self.reduction, num_items)


def spec_map(x: torch.Tensor, m: LogitMap) -> torch.Tensor:
    """``m`` applied to logits in float32 or wider, differentiably (tensor code)."""
    return _apply_map(torch, x.to(torch.promote_types(x.dtype, torch.float32)), m)
