"""``DistillationLoss``: the divergence between a teacher's and a student's logits, per token,
with labels, temperature and global normalisation, dispatched to the fastest exact path."""

from __future__ import annotations

from typing import Any

import torch

from .. import _check
from .._defaults import JS_BETA, KIND_PARAMS, REDUCTION, SKEW_ALPHA, TEMPERATURE
from ..divergences import KINDS
from . import _cpu

__all__ = ["DistillationLoss"]

DIVERGENCES = ("kl", "reverse_kl", "js", "skew_kl", "skew_reverse_kl", "tv")


class DistillationLoss(torch.nn.Module):
    """D(teacher‖student) per token from logits, for knowledge distillation.

    ``divergence`` names the core function applied as ``f(teacher, student)``: ``"kl"`` is
    KL(teacher‖student) (mass-covering), ``"reverse_kl"`` KL(student‖teacher)
    (mode-seeking), ``"js"`` the generalised JSD with weight ``beta`` on the teacher,
    ``"skew_kl"``/``"skew_reverse_kl"`` with ``alpha``, ``"tv"`` total variation. Both
    logits are divided by ``temperature``; ``scale_by_temperature_squared=True`` multiplies
    the loss by T² (Hinton et al.'s gradient-scale correction; off by default, never implied).

    ``forward(student_logits, teacher_logits, labels=None, num_items=None)``: logits
    ``[..., V]`` (any float dtype; computed in float32 or wider), ``labels`` the token shape
    with ``ignore_index`` marking tokens to skip (they may hold garbage, NaN included), and
    ``num_items`` the denominator of ``"mean"`` (e.g. the global count of valid tokens under
    gradient accumulation). ``reduction``: ``"mean"`` over valid tokens (0 when there are
    none), ``"sum"``, or ``"none"`` (per token, skipped tokens 0).

    Paths (same values and gradients, tested against each other): on CPU, for float32 and
    half-precision logits, when only the student needs a gradient and the divergence is
    ``"kl"``, ``"reverse_kl"`` or ``"js"``, a chunked
    path computes loss and gradient in one pass without ``[N, V]`` float32 temporaries;
    otherwise the core (:func:`kldiv.divergence`), which also gives the teacher its gradient
    when it requires one. ``fast_path=False`` forces the core.
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
        fast_path: bool = True,
    ) -> None:
        super().__init__()
        if divergence not in DIVERGENCES:
            raise ValueError(
                f"Unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}."
            )
        self.divergence = divergence
        self.beta = _check.check_unit_interval("beta", beta)
        self.alpha = _check.check_unit_interval("alpha", alpha)
        self.temperature = _check.check_temperature(temperature, ("logits", "logits"))
        self.scale_by_temperature_squared = _check.check_flag(
            "scale_by_temperature_squared", scale_by_temperature_squared
        )
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"Expected `ignore_index` to be an int, got {ignore_index!r}.")
        self.ignore_index = ignore_index
        self.reduction = _check.check_reduction(reduction)
        self.fast_path = _check.check_flag("fast_path", fast_path)

    def extra_repr(self) -> str:
        parts = [f"divergence={self.divergence!r}"]
        if self.divergence == "js":
            parts.append(f"beta={self.beta}")
        if self.divergence.startswith("skew"):
            parts.append(f"alpha={self.alpha}")
        parts += [f"temperature={self.temperature}", f"reduction={self.reduction!r}"]
        if self.scale_by_temperature_squared:
            parts.append("scale_by_temperature_squared=True")
        return ", ".join(parts)

    def _params(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in KIND_PARAMS.get(self.divergence, {})}

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_items: Any = None,
    ) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"Expected student and teacher logits of the same shape, got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}."
            )
        keep = None
        if labels is not None:
            if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
                raise ValueError(
                    f"Expected `labels` of the token shape {tuple(student_logits.shape[:-1])}, "
                    f"got {tuple(labels.shape)}."
                )
            keep = labels != self.ignore_index
        num_items = _check.check_num_items(num_items, self.reduction)
        scale = self.temperature**2 if self.scale_by_temperature_squared else 1.0
        if self._use_fast_path(student_logits, teacher_logits):
            loss = self._fast(student_logits, teacher_logits, keep, num_items)
        else:
            loss = KINDS[self.divergence](
                teacher_logits, student_logits, form="logits", temperature=self.temperature,
                mask=keep, reduction=self.reduction, num_items=num_items, **self._params(),
            )  # fmt: skip
        return loss * scale if scale != 1.0 else loss

    def _use_fast_path(self, student: torch.Tensor, teacher: torch.Tensor) -> bool:
        return (
            self.fast_path
            and self.divergence in _cpu.SUPPORTED
            # JSD at β ∈ {0, 1} is identically 0: the core's short-circuit handles it
            and not (self.divergence == "js" and self.beta in (0.0, 1.0))
            and student.device.type == "cpu"
            and not teacher.requires_grad
            # float32 arithmetic: float64 inputs keep the core's float64
            and torch.float64 not in (student.dtype, teacher.dtype)
            and not torch.compiler.is_compiling()
            and student.ndim >= 1
            and student.shape[-1] > 0
        )

    def _fast(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        keep: torch.Tensor | None,
        num_items: Any,
    ) -> torch.Tensor:
        v = student.shape[-1]
        tokens = student.shape[:-1]
        flat_keep = None if keep is None else keep.reshape(-1)
        rows = _cpu.per_row(
            self.divergence, student.reshape(-1, v), teacher.reshape(-1, v), flat_keep,
            self.temperature, self.beta,
        )  # fmt: skip
        out_dtype = torch.promote_types(student.dtype, torch.float32)
        rows = rows.to(out_dtype)
        if self.reduction == "none":
            return rows.reshape(tokens)
        total = rows.sum()
        if self.reduction == "sum":
            return total
        if num_items is not None:
            return total / num_items
        count = rows.numel() if flat_keep is None else flat_keep.sum().clamp_min(1)
        return total / count
