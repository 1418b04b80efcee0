"""``FusedLinearDistillationLoss``: distillation from the student's hidden states and LM head,
in row chunks, never materialising the ``[N, V]`` logits.

Same layering as the other fast paths: :func:`_logit_chunk` is the per-chunk "kernel" (one
chunk's per-row divergence and its gradient with respect to the chunk's student logits; the
one place where a CUDA implementation is swapped in), :func:`_fused_pass` the launcher (the
row loop and the three matmuls around each chunk, owning the gradient buffers) and
:class:`_FusedLinearDivergence` the ``autograd.Function``.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .. import _check
from .._defaults import (
    JS_BETA,
    REDUCTION,
    SKEW_ALPHA,
    TEMPERATURE,
    DistillationKind,
    Reduction,
)
from .._kinds import resolve, weight_of
from . import _cpu
from ._rows.dispatch import reduce_total
from .distillation import check_float_tensor, config_repr, configure, token_keep

__all__ = ["FusedLinearDistillationLoss"]

# Default chunk: 2^22 logits (16 MiB per float32 [rows, V] buffer), e.g. 131 rows at
# V = 32000. At N = 2048, H = 256, V = 32000 on 2 CPU cores, 2^21 to 2^24 are within 5% of
# each other; smaller chunks pay Python overhead and thin matmuls, larger ones only memory.
_CHUNK_LOGITS = 1 << 22

_HALF = (torch.float16, torch.bfloat16)


def _logit_chunk(
    kind: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    keep: torch.Tensor | None,
    temperature: float,
    beta: float,
    alpha: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row D(teacher‖student) ``[rows]`` of one chunk of ``[rows, V]`` logits (masked
    rows 0) and, if ``need_grad``, the gradient of their sum with respect to
    ``student_logits`` (``[rows, V]``, masked rows 0). Float32, float64 when either input is
    float64; both logits are divided by ``temperature`` here, and the gradient includes the
    1/T of that division.

    On CUDA (or when ``_TRITON`` is forced, which the tests do under ``TRITON_INTERPRET=1``)
    the Triton kernels compute it: the gradient then comes in the logits' dtype, from the
    same one-pass backward kernel as DistillationLoss's with ``grad_output = 1``.
    """
    w = weight_of(kind, beta, alpha)
    dtypes = (student_logits.dtype, teacher_logits.dtype)
    if (
        (_TRITON or (_TRITON is None and student_logits.is_cuda))
        and torch.float64 not in dtypes
        and importlib.util.find_spec("triton") is not None
    ):
        from . import _triton_launch as L

        resolved = resolve(kind, w)
        if not resolved.zero:
            kernel_kind = resolved.kind
            inv_t = 1.0 / temperature
            stats = L.forward(student_logits, teacher_logits, keep, kernel_kind, inv_t, w)
            grad = None
            if need_grad:
                ones = torch.ones((), dtype=torch.float32, device=student_logits.device)
                go = ones.expand(student_logits.shape[0])
                grad = L.backward(
                    go, student_logits, teacher_logits, keep, stats[1:], kernel_kind, inv_t, w
                )
            return stats[0], grad
    return _cpu.chunked_forward(
        kind, student_logits, teacher_logits, keep, temperature, need_grad, beta, alpha=alpha
    )


# None: the Triton kernels on CUDA tensors, the chunked torch path elsewhere; True forces the
# kernels (CPU tensors then need TRITON_INTERPRET=1); False forces the torch path.
_TRITON: bool | None = None


@dataclass(frozen=True)
class _Config:
    kind: str
    temperature: float
    beta: float
    alpha: float
    chunk_rows: int | None


def _rows(x: torch.Tensor, start: int, stop: int, index: torch.Tensor | None) -> torch.Tensor:
    """Rows ``start:stop`` of ``x``, or of ``x[index]``: a view, or a copy of those rows only."""
    return x[start:stop] if index is None else x.index_select(0, index[start:stop])


def _matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # PyTorch's half-precision matmul on CPU is several times slower than float32 on most
    # CPUs (8x measured on the development machine); on accelerators F.linear's own dtype.
    return torch.float32 if dtype in _HALF and device.type == "cpu" else dtype


def _fused_pass(
    cfg: _Config,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    index: torch.Tensor | None,
    need: tuple[bool, bool, bool],
    row_scale: torch.Tensor | None = None,
    per_row: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """One pass over the kept rows (``index``, or all rows when None).

    Returns the per-row values ``[N]`` (``per_row``; skipped rows 0) or their sum (0-d), and
    the gradients ``[grad_hidden, grad_weight, grad_bias]`` (None where not ``need``ed) of
    ``Σ_rows row_scale·value``. ``teacher`` is ``(logits, None, None)`` or ``(hidden, weight,
    bias)``. Gradients of half-precision weights and biases are accumulated in float32.
    """
    n, v = hidden.shape[0], weight.shape[0]
    m = n if index is None else index.numel()
    device = hidden.device
    mm = _matmul_dtype(hidden.dtype, device)
    w = weight.to(mm)
    b = None if bias is None else bias.to(mm)
    t_src, t_w, t_b = teacher
    if t_w is not None:
        t_mm = _matmul_dtype(t_w.dtype, device)
        t_w = t_w.to(t_mm)
        t_b = None if t_b is None else t_b.to(t_mm)
    val_dtype = torch.float64 if torch.float64 in (hidden.dtype, t_src.dtype) else torch.float32
    acc_dtype = torch.float32 if weight.dtype in _HALF else weight.dtype
    out = torch.zeros(n if per_row else (), dtype=val_dtype, device=device)
    gh = torch.zeros_like(hidden) if need[0] else None
    gw = torch.zeros(weight.shape, dtype=acc_dtype, device=device) if need[1] else None
    gb = torch.zeros(v, dtype=acc_dtype, device=device) if need[2] and bias is not None else None
    need_grad = gh is not None or gw is not None or gb is not None
    chunk = cfg.chunk_rows or max(1, _CHUNK_LOGITS // max(v, 1))
    for start in range(0, m, chunk):
        stop = min(m, start + chunk)
        h = _rows(hidden, start, stop, index).to(mm)
        logits = torch.nn.functional.linear(h, w, b)
        t = _rows(t_src, start, stop, index)
        if t_w is not None:
            t = torch.nn.functional.linear(t.to(t_w.dtype), t_w, t_b)
        vals, g = _logit_chunk(
            cfg.kind, logits, t, None, cfg.temperature, cfg.beta, cfg.alpha, need_grad
        )
        del logits, t  # before the gradient matmuls: one [rows, V] buffer fewer at the peak
        if per_row:
            if index is None:
                out[start:stop] = vals
            else:
                out.index_copy_(0, index[start:stop], vals.to(val_dtype))
        else:
            out += vals.sum()
        if g is None:
            continue
        if row_scale is not None:
            g.mul_(_rows(row_scale, start, stop, index).to(g.dtype)[:, None])
        gm = g.to(mm)
        if gh is not None:
            gh_rows = (gm @ w).to(gh.dtype)
            if index is None:
                gh[start:stop] = gh_rows
            else:
                gh.index_copy_(0, index[start:stop], gh_rows)
        if gw is not None:
            if gw.dtype == mm:
                gw.addmm_(gm.t(), h)
            else:  # half precision on an accelerator: product in its dtype, sum in float32
                gw.add_(gm.t() @ h)
        if gb is not None:
            gb.add_(g.sum(0).to(acc_dtype))
    return out, [gh, gw, gb]


@torch.compiler.disable
def _fused_apply(*args: Any) -> torch.Tensor:
    """The autograd function, opaque to ``torch.compile``: its Python loop over row chunks
    (with a host check per chunk) would otherwise be unrolled or broken into many graphs. Under
    ``torch.compile`` the surrounding model compiles; this call runs eagerly (one graph break,
    so ``fullgraph=True`` is not supported here)."""
    return _FusedLinearDivergence.apply(*args)


class _FusedLinearDivergence(torch.autograd.Function):
    """``(hidden, weight, bias, teacher…) -> Σ values`` (``reduce``) or per-row values.

    With ``reduce`` the gradients are computed in the forward pass (one pass over the rows)
    and scaled by the scalar ``grad_output`` in backward; without it, ``grad_output`` differs
    per row and backward runs the pass again with the rows weighted by it.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        teacher_src: torch.Tensor,
        teacher_weight: torch.Tensor | None,
        teacher_bias: torch.Tensor | None,
        index: torch.Tensor | None,
        cfg: _Config,
        reduce: bool,
        grad_enabled: bool,
    ) -> torch.Tensor:
        h_, w_, b_ = ctx.needs_input_grad[:3]
        need = (grad_enabled and h_, grad_enabled and w_, grad_enabled and b_)
        teacher = (teacher_src, teacher_weight, teacher_bias)
        ctx.cfg, ctx.reduce = cfg, reduce
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if reduce:
            total, grads = _fused_pass(cfg, hidden, weight, bias, teacher, index, need)
            ctx.save_for_backward(*grads)
            return total
        values, _ = _fused_pass(
            cfg, hidden, weight, bias, teacher, index, (False, False, False), per_row=True
        )
        ctx.need = need
        ctx.save_for_backward(
            hidden, weight, bias, teacher_src, teacher_weight, teacher_bias, index
        )
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        if ctx.reduce:
            # In place: a second backward through the same forward would see scaled
            # gradients; autograd's version counter refuses it instead.
            grads = [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in ctx.saved_tensors]
        else:
            hidden, weight, bias, t_src, t_w, t_b, index = ctx.saved_tensors
            _, grads = _fused_pass(
                ctx.cfg,
                hidden,
                weight,
                bias,
                (t_src, t_w, t_b),
                index,
                ctx.need,
                row_scale=grad_out,
            )
        out = [None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes, strict=True)]
        return (*out, None, None, None, None, None, None, None)


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
    ``"sum"``, or ``"none"`` (token shape, skipped tokens 0). Zero support is the core's:
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
    float32 for half-precision weights) and, for half precision on CPU, a float32 copy of
    each weight, at most a few ``[chunk_size, V]`` buffers: the chunk's student logits,
    teacher logits and float32 gradient. Nothing scales with ``N × V``. For ``"mean"`` and
    ``"sum"`` the gradients are computed even if backward never runs: evaluate under
    ``torch.no_grad()``.

    Precision: float32 and half-precision inputs give float32 losses (divergences and
    gradient sums in float32; on CPU half-precision matmuls run in float32, on accelerators
    in their own dtype); float64 stays float64 throughout.

    Paths: on CUDA the chunk's values and logits gradient come from the Triton kernels of
    :class:`~kldiv.torch.DistillationLoss` (gradient in the logits' dtype), elsewhere from
    its chunked CPU path. Under ``torch.compile`` the fused pass runs eagerly, as one opaque
    call (a graph break: ``fullgraph=True`` is not supported).

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
        tokens = tuple(hidden.shape[:-1])
        index = None
        keep = token_keep(labels, mask, tokens, self.ignore_index, hidden.device)
        if keep is not None:
            keep = keep.reshape(-1)
            if not bool(keep.all()):
                index = keep.nonzero().squeeze(1)
        num_items = _check.check_num_items(num_items, self.reduction)
        n = math.prod(tokens)
        t_src, t_w, t_b = teacher
        t_src = t_src.reshape(n, t_src.shape[-1])
        cfg = _Config(self.divergence, self.temperature, self.beta, self.alpha, self.chunk_size)
        reduce = self.reduction != "none"
        out = _fused_apply(
            hidden.reshape(n, hidden.shape[-1]),
            weight,
            bias,
            t_src,
            t_w,
            t_b,
            index,
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
            if tuple(teacher_logits.shape) != (*tokens, v):
                raise ValueError(
                    f"Expected `teacher_logits` of shape {(*tokens, v)} (the token shape of "
                    f"`student_hidden` and V of `student_weight`), got "
                    f"{tuple(teacher_logits.shape)}."
                )
            teacher: dict[str, torch.Tensor | None] = {"teacher_logits": teacher_logits}
        else:
            if teacher_hidden is None or teacher_logits is not None:
                raise ValueError(
                    "Expected `teacher_hidden` together with `teacher_weight`, and no "
                    "`teacher_logits` (the teacher's logits are computed from them)."
                )
            if teacher_weight.ndim != 2 or teacher_weight.shape[0] != v:
                raise ValueError(
                    f"Expected `teacher_weight` of shape [V, H_t] with V = {v}, got "
                    f"{tuple(teacher_weight.shape)}."
                )
            if tuple(teacher_hidden.shape) != (*tokens, teacher_weight.shape[1]):
                raise ValueError(
                    f"Expected `teacher_hidden` of shape {(*tokens, teacher_weight.shape[1])}, "
                    f"got {tuple(teacher_hidden.shape)}."
                )
            if teacher_bias is not None and tuple(teacher_bias.shape) != (v,):
                raise ValueError(
                    f"Expected `teacher_bias` of shape [{v}], got {tuple(teacher_bias.shape)}."
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
