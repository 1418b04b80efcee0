"""``FusedLinearDistillationLoss``: distillation from the student's hidden states and LM head,
in row chunks, never materialising the ``[N, V]`` logits.

The chunked-linear loop and its ``autograd.Function`` are :mod:`._rows.linear`'s, shared with
the vocab-parallel fused loss; on one device each chunk's values and logits gradient come from
the engine the dispatcher chooses (:func:`._rows.linear.logit_chunk`). This module is the
shell: configuration, validation, skipped tokens and the reduction.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import _check
from .._defaults import (
    JS_BETA,
    REDUCTION,
    SKEW_ALPHA,
    TEMPERATURE,
    DistillationKind,
    Reduction,
)
from ._rows import linear, mapped
from ._rows.dispatch import reduce_total
from .distillation import (
    check_float_tensor,
    config_repr,
    configure,
    logit_maps,
    token_keep,
)

__all__ = ["FusedLinearDistillationLoss"]


class FusedLinearDistillationLoss(torch.nn.Module):
    """D(teacher‖student) per token from the student's hidden states and LM head, without the
    student's ``[N, V]`` logits.

    The student's logits are ``z_s = h @ W.T + b`` (``student_hidden`` ``[..., H]``,
    ``student_weight`` ``[V, H]``, optional ``student_bias`` ``[V]``); the teacher's are
    given as ``teacher_logits`` ``[..., V]``, or as ``teacher_hidden`` ``[..., H_t]`` with
    ``teacher_weight`` ``[V, H_t]`` (and optional ``teacher_bias``), in which case they are
    not materialised either. The loss is :class:`~kldiv.torch.DistillationLoss` on those
    logits, with the same constructor arguments and semantics: per token
    ``D(softmax(z_t / T) ‖ softmax(z_s / T))`` with ``divergence`` one of ``"kl"``
    (KL(teacher‖student)), ``"reverse_kl"`` (KL(student‖teacher)), ``"js"`` (weight
    ``beta`` on the teacher), ``"skew_kl"``, ``"skew_reverse_kl"`` (``alpha``), ``"tv"``;
    times T² if ``scale_by_temperature_squared``; tokens whose ``labels`` equal
    ``ignore_index``, or whose keyword ``mask`` (token shape, boolean or 0/1 integer such as
    Hugging Face's ``attention_mask``) is False or 0, are skipped (their hidden states and
    teacher logits are never read, so they may hold anything, NaN included); ``reduction``
    ``"mean"`` over kept tokens (or divided by ``num_items``; 0 when none are kept),
    ``"sum"``, or ``"none"`` (token shape, skipped tokens 0). ``shift_labels``,
    ``vocab_size`` (heads or teacher logits wider than it: their extra rows and columns are
    never read and get a zero gradient), ``softcap`` and ``logit_scale`` (applied to each
    chunk's logits after the matmul) are :class:`~kldiv.torch.DistillationLoss`'s. Zero
    support is the core's:
    ``-inf`` logits (e.g. a ``-inf`` bias entry) are zero probabilities, values may be
    ``+inf`` where the core's are, and gradients stay finite.

    Gradients: the student's hidden states, weight and bias get theirs; the teacher gets
    none, and teacher tensors that require a gradient are refused with a ``ValueError``
    (silently detaching them would hide a teacher that was meant to be frozen but is not).
    Rows are processed in chunks of ``chunk_size`` tokens (default ``⌊2^22 / V⌋``): one
    matmul gives the chunk's logits, a chunked kernel the per-row values and the gradient
    ``G`` with respect to them, and then ``grad_hidden = G @ W`` and ``grad_W += G.T @ h``
    (``grad_b += G.sum(0)``). For ``"mean"`` and ``"sum"`` this happens in the forward pass
    (one pass over the data) and backward scales by ``grad_output``; for ``"none"`` backward
    runs the pass again, weighting rows by their ``grad_output``. Double backward is not
    supported.

    Memory: beyond the gradients themselves (``[N, H]``, and ``[V, H]``, ``[V]`` in
    float32 for half-precision weights; for half precision on CPU the ``[N, H]`` gradient is
    accumulated in float32 until backward and rounded once) and, for half precision on CPU,
    a float32 copy of each weight, at most a few ``[chunk_size, V]`` buffers: the chunk's
    student logits, teacher logits and float32 gradient. Nothing scales with ``N × V``. For
    ``"mean"`` and ``"sum"`` the gradients are computed even if backward never runs: evaluate
    under ``torch.no_grad()``.

    Precision: float32 and half-precision inputs give float32 losses (divergences and
    gradient sums in float32; on CPU half-precision matmuls run in float32, on accelerators
    in their own dtype); float64 stays float64 throughout.

    Paths: the row engine's dispatcher picks each chunk's engine, as for
    :class:`~kldiv.torch.DistillationLoss`: on CUDA the Triton kernels (gradient in the
    logits' dtype), on CPU the C kernel (tensor code where it is not built), and the core
    for float64 and the endpoints where a divergence is identically 0. Under
    ``torch.compile`` the fused pass runs eagerly, as one opaque call (a graph break:
    ``fullgraph=True`` is not supported).

    >>> import torch
    >>> from kldiv.torch.fused_linear import FusedLinearDistillationLoss
    >>> h = torch.randn(6, 8, requires_grad=True)        # student hidden states [N, H]
    >>> w = torch.randn(50, 8, requires_grad=True)       # student LM head [V, H]
    >>> teacher = torch.randn(6, 50)                     # teacher logits [N, V]
    >>> labels = torch.tensor([1, 2, -100, 4, 5, -100])  # -100: skipped
    >>> loss = FusedLinearDistillationLoss("kl", temperature=2.0)(h, w, teacher, labels)
    >>> loss.backward()
    >>> h.grad.shape, bool(h.grad[2].abs().sum() == 0)
    (torch.Size([6, 8]), True)
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
        chunk_size: int | None = None,
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
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"Expected `chunk_size` to be None or an int ≥ 1, got {chunk_size!r}.")
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        parts = config_repr(self)
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        return ", ".join(parts)

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
        hidden, weight, bias = student_hidden, student_weight, student_bias
        teacher = self._check_inputs(
            hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias
        )
        if self.vocab_size is not None:  # the padded rows of the heads are never read
            v = self.vocab_size
            weight = weight[:v]
            bias = None if bias is None else bias[:v]
            t_src, t_w, t_b = teacher
            if t_w is None:
                teacher = (t_src[..., :v], None, None)
            else:
                teacher = (t_src, t_w[:v], None if t_b is None else t_b[:v])
        tokens = tuple(hidden.shape[:-1])
        index = None
        keep = token_keep(labels, mask, tokens, self.ignore_index, hidden.device, self.shift_labels)
        if keep is not None:
            keep = keep.reshape(-1)
            if not bool(keep.all()):
                index = keep.nonzero().squeeze(1)
        num_items = _check.check_num_items(num_items, self.reduction)
        n = math.prod(tokens)
        t_src, t_w, t_b = teacher
        t_src = t_src.reshape(n, t_src.shape[-1])
        maps, temperature = mapped.fold(logit_maps(self), self.temperature)
        cfg = linear.Config(
            self.divergence, temperature, self.beta, self.alpha, self.chunk_size, maps=maps
        )
        reduce = self.reduction != "none"
        out = linear.apply(
            hidden.reshape(n, hidden.shape[-1]),
            weight,
            bias,
            t_src,
            t_w,
            t_b,
            index,
            None,
            cfg,
            reduce,
            torch.is_grad_enabled(),
        )
        out = out.to(
            torch.promote_types(torch.promote_types(hidden.dtype, t_src.dtype), torch.float32)
        )
        if self.reduction == "none":
            loss = out.reshape(tokens)
        else:
            count = n if index is None else index.numel()
            loss = reduce_total(out, count, self.reduction, num_items)
        if self.scale_by_temperature_squared and self.temperature != 1.0:
            loss = loss * self.temperature**2
        return loss

    def _check_widths(self, v: int, v_t: int, name: str) -> None:
        """The student's vocabulary ``v`` (rows of its head) against the teacher's ``v_t``:
        equal, or both at least ``vocab_size``."""
        if self.vocab_size is None:
            if v_t != v:
                raise ValueError(
                    f"Expected {name} with V = {v} (the rows of `student_weight`), got "
                    f"{v_t}. If one vocabulary is padded (e.g. 32000 and 32064), pass "
                    "`vocab_size=` (the real vocabulary): the rows and columns beyond it are "
                    "ignored."
                )
        elif self.vocab_size > min(v, v_t):
            raise ValueError(
                f"Expected `vocab_size` ≤ the vocabulary of the student ({v}) and of "
                f"{name} ({v_t}), got vocab_size={self.vocab_size}."
            )

    def _check_inputs(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        teacher_logits: torch.Tensor | None,
        teacher_hidden: torch.Tensor | None,
        teacher_weight: torch.Tensor | None,
        teacher_bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        for name, x in (
            ("student_hidden", hidden),
            ("student_weight", weight),
            ("student_bias", bias),
            ("teacher_logits", teacher_logits),
            ("teacher_hidden", teacher_hidden),
            ("teacher_weight", teacher_weight),
            ("teacher_bias", teacher_bias),
        ):
            if x is not None or name in ("student_hidden", "student_weight"):
                check_float_tensor(name, x)
        if hidden.ndim < 1:
            raise ValueError("Expected `student_hidden` of shape [..., H], got a 0-d tensor.")
        if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"Expected `student_weight` of shape [V, H] with H = {hidden.shape[-1]} (the "
                f"last axis of `student_hidden`), got {tuple(weight.shape)}."
            )
        v = weight.shape[0]
        tokens = tuple(hidden.shape[:-1])
        for name, x in (
            ("student_hidden", hidden),
            ("student_weight", weight),
            ("student_bias", bias),
        ):
            if x is not None:
                if x.dtype != hidden.dtype:
                    raise TypeError(
                        f"Expected `{name}` to have the dtype of `student_hidden` "
                        f"({hidden.dtype}), got {x.dtype}."
                    )
                if x.device != hidden.device:
                    raise ValueError(f"Expected `{name}` on {hidden.device}, got {x.device}.")
        if bias is not None and tuple(bias.shape) != (v,):
            raise ValueError(f"Expected `student_bias` of shape [{v}], got {tuple(bias.shape)}.")
        if teacher_weight is None:
            if teacher_logits is None or teacher_hidden is not None or teacher_bias is not None:
                raise ValueError(
                    "Expected the teacher as `teacher_logits` [..., V], or as `teacher_hidden` "
                    "[..., H_t] with `teacher_weight` [V, H_t] (and optional `teacher_bias`), "
                    "not both and not neither."
                )
            if tuple(teacher_logits.shape[:-1]) != tokens or teacher_logits.ndim < 1:
                raise ValueError(
                    f"Expected `teacher_logits` of shape {(*tokens, v)} (the token shape of "
                    f"`student_hidden` and V of `student_weight`), got "
                    f"{tuple(teacher_logits.shape)}."
                )
            self._check_widths(v, teacher_logits.shape[-1], "`teacher_logits`")
            teacher: dict[str, torch.Tensor | None] = {"teacher_logits": teacher_logits}
        else:
            if teacher_hidden is None or teacher_logits is not None:
                raise ValueError(
                    "Expected `teacher_hidden` together with `teacher_weight`, and no "
                    "`teacher_logits` (the teacher's logits are computed from them)."
                )
            if teacher_weight.ndim != 2:
                raise ValueError(
                    f"Expected `teacher_weight` of shape [V, H_t] with V = {v}, got "
                    f"{tuple(teacher_weight.shape)}."
                )
            v_t = teacher_weight.shape[0]
            self._check_widths(v, v_t, "`teacher_weight`")
            if tuple(teacher_hidden.shape) != (*tokens, teacher_weight.shape[1]):
                raise ValueError(
                    f"Expected `teacher_hidden` of shape {(*tokens, teacher_weight.shape[1])}, "
                    f"got {tuple(teacher_hidden.shape)}."
                )
            if teacher_bias is not None and tuple(teacher_bias.shape) != (v_t,):
                raise ValueError(
                    f"Expected `teacher_bias` of shape [{v_t}], got {tuple(teacher_bias.shape)}."
                )
            teacher = {
                "teacher_hidden": teacher_hidden,
                "teacher_weight": teacher_weight,
                "teacher_bias": teacher_bias,
            }
        for name, x in teacher.items():
            if x is None:
                continue
            if x.device != hidden.device:
                raise ValueError(f"Expected `{name}` on {hidden.device}, got {x.device}.")
            if x.requires_grad:
                raise ValueError(
                    f"Expected `{name}` not to require a gradient: the teacher gets none from "
                    f"FusedLinearDistillationLoss. Pass `{name}.detach()`, compute the teacher "
                    "under `torch.no_grad()`, or freeze it with `requires_grad_(False)`."
                )
        if teacher_weight is not None and teacher_hidden is not None:
            if teacher_bias is not None and teacher_bias.dtype != teacher_weight.dtype:
                raise TypeError("Expected `teacher_bias` to have the dtype of `teacher_weight`.")
            if teacher_hidden.dtype != teacher_weight.dtype:
                raise TypeError(
                    f"Expected `teacher_hidden` to have the dtype of `teacher_weight` "
                    f"({teacher_weight.dtype}), got {teacher_hidden.dtype}."
                )
            return teacher_hidden, teacher_weight, teacher_bias
        assert teacher_logits is not None
        return teacher_logits, None, None
