"""The one dispatcher of the row engine: which engine computes ``D(teacher‖student)`` per row
of two tensors of logits (or, for the core functions, log-probabilities), the call into it,
and the reductions its callers share.

Engines, all with the core's values and zero-support rules (tested against it):

* ``"triton"``: fused Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``),
  torch.library custom ops that ``torch.compile`` traces through;
* ``"chunked"``: row chunks on CPU, through the compiled C kernel where it is available and
  tensor code for the rows it leaves (:mod:`.tensor`, :mod:`.native`); for the core
  functions, also the row specification itself in row chunks (:func:`.tensor.spec_per_row`),
  which takes log-probabilities and gives a teacher its gradient;
* ``"core"``: :func:`kldiv.divergence`, the definition, for everything the engines cannot
  decide exactly: float64, ``torch.func`` transforms, fake or meta tensors, jit tracing,
  the endpoints where a divergence is identically 0 and, in the losses, a teacher that needs
  a gradient.

Callers: the core functions on torch tensors (:func:`engine_rows`), ``DistillationLoss``
(:func:`choose`, :func:`rows`; :func:`choose_topk` for a top-k teacher), the chunk loop of
``FusedLinearDistillationLoss`` and the fused parallel loss (:func:`choose`,
:func:`rows_and_grad`), and the vocab-parallel slices (:func:`slice_kernel`: the C kernel
with global statistics in, or the row specification, in :mod:`.linear`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ... import _namespace as ns
from ..._defaults import JS_BETA, SKEW_ALPHA
from ..._kinds import ENGINE_KINDS, params_of, resolve, weight_of

__all__ = [
    "choose",
    "choose_topk",
    "slice_kernel",
    "rows",
    "rows_and_grad",
    "engine_rows",
    "core_rows",
    "core_only",
    "reduce_rows",
    "reduce_total",
    "opaque_to_compile",
]

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Set while an engine recomputes through the core (its double backward): the core functions
# must not hand the work back to the engine.
_CORE_ONLY = contextvars.ContextVar("kldiv_core_only", default=False)


def opaque_to_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)``, made on the first call rather than at import: the
    decorator imports ``torch._dynamo``, about 2 s that ``import kldiv.torch`` would pay
    otherwise. Called under ``torch.compile`` first, dynamo runs the decorator eagerly and
    breaks the graph there, as the decorated function does on every later call."""
    made: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        if not made:
            made.append(torch.compiler.disable(fn))
        return made[0](*args)

    return call


@contextlib.contextmanager
def core_only() -> Iterator[None]:
    """Within this block the core functions on torch tensors run the core, not an engine."""
    if torch.compiler.is_compiling():  # the engines step aside there anyway (and dynamo
        yield  # cannot trace a ContextVar)
        return
    token = _CORE_ONLY.set(True)
    try:
        yield
    finally:
        _CORE_ONLY.reset(token)


def choose(
    fast_path: bool | str,
    kind: str,
    w: float,
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    teacher_grad: bool | None = None,
) -> str:
    """``"triton"``, ``"chunked"`` or ``"core"`` for these inputs. ``fast_path=True`` picks
    the engine of the device and falls back to the core; ``"triton"`` or ``"chunked"`` forces
    that engine and raises ``ValueError`` with the first reason it cannot take the inputs;
    ``False`` is the core. ``teacher_grad`` (default: ``teacher.requires_grad``) says whether
    the teacher needs a gradient, which these engines do not give (the losses then take the
    core; the core functions, :func:`engine_rows`, the row specification in chunks)."""
    if fast_path is False:
        return "core"
    path = fast_path
    if path is True:
        path = "chunked" if student.device.type == "cpu" else "triton"
    if teacher_grad is None:
        teacher_grad = teacher.requires_grad and torch.is_grad_enabled()
    reasons = _common_obstacles(kind, w, student, teacher, teacher_grad)
    if path == "triton":
        reasons += _triton_obstacles(student, teacher)
    else:
        reasons += _chunked_obstacles(student)
    if not reasons:
        return str(path)
    if fast_path is True:
        return "core"
    raise ValueError(f"fast_path={fast_path!r} cannot take these inputs: {reasons[0]}.")


def slice_kernel(
    kind: str, w: float, student: torch.Tensor, teacher: torch.Tensor
) -> tuple[str, float] | None:
    """The per-slice engine of the vocab-parallel losses and the chunked-linear loop: the C
    kernel's kind and weight where it takes these slices (CPU, float32 arithmetic, the
    kernel built, not an endpoint where the divergence is identically 0), else None, and the
    row specification computes them (any dtype and device)."""
    resolved = resolve(kind, w)
    if resolved.zero or torch.float64 in (student.dtype, teacher.dtype):
        return None
    from . import native

    if not native.usable(resolved.kind, student.device) or teacher.device != student.device:
        return None
    return resolved.kind, resolved.w


def choose_topk(fast_path: bool | str) -> str:
    """The engine of a :class:`~kldiv.torch.TopKTeacher` (a sparse teacher): its own tensor
    code, ``"topk"``, for ``fast_path`` True or False; the full-row engines cannot take it,
    and forcing one raises ``ValueError``."""
    if fast_path in ("triton", "chunked"):
        raise ValueError(
            f"fast_path={fast_path!r} cannot take these inputs: a TopKTeacher goes "
            "through the top-k path (use fast_path=True or False)."
        )
    return "topk"


def rows(
    path: str,
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    temperature: float,
    beta: float = JS_BETA,
    alpha: float = SKEW_ALPHA,
    *,
    maps: tuple[Any, Any] | None = None,
) -> torch.Tensor:
    """Per-token ``D(teacher‖student)`` of ``[..., V]`` logits through the engine ``path``
    (``"triton"`` or ``"chunked"``, from :func:`choose`): the token shape, skipped tokens
    (``keep`` False) 0, float32 (float64 when an input is), differentiable with respect to
    ``student``. ``maps``: the (teacher, student) :class:`kldiv._spec.LogitMap`, applied before
    the temperature inside the engines' kernels (C and Triton) as they read the logits."""
    v = student.shape[-1]
    tokens = tuple(student.shape[:-1])
    flat_keep = None if keep is None else keep.reshape(-1)
    s2, t2 = student.reshape(-1, v), teacher.reshape(-1, v)
    if maps is not None and all(m.identity for m in maps):
        maps = None
    if path == "triton":
        from .triton import ops as triton_ops

        w = weight_of(kind, beta, alpha)
        out = triton_ops.per_row(kind, s2, t2, flat_keep, temperature, w, maps=maps)
    elif path == "chunked":
        from . import tensor

        out = tensor.per_row(kind, s2, t2, flat_keep, temperature, beta, alpha=alpha, maps=maps)
    else:
        raise ValueError(f"Unknown engine {path!r}.")
    out_dtype = torch.promote_types(student.dtype, torch.float32)
    return out.to(out_dtype).reshape(tokens)


def core_rows(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    temperature: float,
    beta: float = JS_BETA,
    alpha: float = SKEW_ALPHA,
    *,
    forms: tuple[str, str] = ("logits", "logits"),
    maps: tuple[Any, Any] | None = None,
) -> torch.Tensor:
    """Per-row ``D(teacher‖student)`` through the core (the definition), never an engine;
    ``forms``: the teacher's and the student's; ``maps``: their
    :class:`kldiv._spec.LogitMap` (None: neither)."""
    from ...divergences import KINDS

    extra = {}
    if maps is not None:
        extra = {
            "softcap": tuple(m.cap for m in maps),
            "logit_scale": tuple(m.scale for m in maps),
        }
    with core_only():
        return KINDS[kind](
            teacher,
            student,
            form=forms,
            temperature=temperature,
            mask=keep,
            reduction="none",
            **params_of(kind, beta, alpha),
            **extra,
        )


def rows_and_grad(
    path: str,
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    need_grad: bool,
    beta: float = JS_BETA,
    alpha: float = SKEW_ALPHA,
    maps: tuple[Any, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row ``D(teacher‖student)`` ``[rows]`` of ``[rows, V]`` logits through the engine
    ``path`` (from :func:`choose`, ``"core"`` included) and, if ``need_grad``, the gradient of
    their sum with respect to ``student``, outside autograd: for callers that run their own
    autograd Function around many such chunks (the fused-linear losses). Triton gives the
    gradient in the logits' dtype (its one-pass backward with ``grad_output = 1``), the other
    engines in float32 (float64 for float64 logits); an engine that is identically 0 gives a
    zero gradient. ``maps`` as in :func:`rows` (the kernels apply them; for the core, tensor
    code maps the chunk first and chains the gradient)."""
    if maps is not None and all(m.identity for m in maps):
        maps = None
    if maps is not None and path == "core":
        from . import mapped

        return mapped.chunk_rows_and_grad(
            path, kind, student, teacher, temperature, need_grad, beta, alpha, maps
        )
    if path == "triton":
        from ... import _spec as spec
        from .triton import launch

        w = weight_of(kind, beta, alpha)
        code_kind, inv_t = resolve(kind, w).kind, 1.0 / temperature
        packed = launch.NO_MAPS if maps is None else spec.pack_maps(maps)
        stats = launch.forward(student, teacher, None, code_kind, inv_t, w, maps=packed)
        grad = None
        if need_grad:
            ones = torch.ones((), dtype=torch.float32, device=student.device)
            grad = launch.backward(
                ones.expand(student.shape[0]), student, teacher, None, stats[1:], code_kind,
                inv_t, w, maps=packed,
            )  # fmt: skip
        return stats[0], grad
    if path == "chunked":
        from . import tensor

        return tensor.chunked_forward(
            kind, student, teacher, None, temperature, need_grad, beta, alpha=alpha, maps=maps
        )
    if path != "core":
        raise ValueError(f"Unknown engine {path!r}.")
    with torch.enable_grad():
        leaf = student.detach().requires_grad_(need_grad)
        values = core_rows(kind, leaf, teacher, None, temperature, beta, alpha)
        if not need_grad:
            return values.detach(), None
        (grad,) = torch.autograd.grad(values, leaf, torch.ones_like(values), allow_unused=True)
    return values.detach(), torch.zeros_like(student) if grad is None else grad


def engine_rows(
    kind: str,
    p: torch.Tensor,
    q: torch.Tensor,
    keep: torch.Tensor | None,
    temperature: float,
    params: dict[str, float],
    forms: tuple[str, str] = ("logits", "logits"),
) -> torch.Tensor | None:
    """The core functions' fast path on torch tensors: per-distribution ``kind(p, q)`` along
    the last axis (``p`` the teacher, ``q`` the student, validated by the core; ``forms``
    theirs, ``"logits"`` or ``"log_probs"``; ``keep`` a boolean tensor broadcastable to the
    batch shape), or None where the engine cannot give exactly the core's semantics and the
    core must run: shapes that broadcast, float64, an endpoint where the divergence is
    identically 0, and whatever :func:`choose` refuses. Logits with a student-only gradient
    take the kernels (:func:`choose`); log-probabilities, and a teacher that needs a
    gradient, take the row specification in row chunks on CPU (:func:`.tensor.spec_per_row`).
    ``"symmetric_kl"`` is the sum of two engine calls. Under ``torch.compile`` the core runs,
    for the compiler to fuse."""
    if torch.compiler.is_compiling() or _CORE_ONLY.get():
        return None
    if kind == "symmetric_kl":
        if q.dtype in (torch.float16, torch.bfloat16):
            # both gradients meet in float32 and are rounded once, as in the core
            q = q.float()
        if p.dtype in (torch.float16, torch.bfloat16) and p.requires_grad:
            p = p.float()
        forward = engine_rows("kl", p, q, keep, temperature, {}, forms)
        if forward is None:
            return None
        backward = engine_rows("reverse_kl", p, q, keep, temperature, {}, forms)
        return None if backward is None else forward + backward
    if kind not in ENGINE_KINDS or p.shape != q.shape or p.ndim == 0 or p.numel() == 0:
        return None
    if keep is not None:
        if keep.device != q.device:
            return None
        keep = keep.expand(q.shape[:-1])
    w = weight_of(kind, **params)
    teacher_grad = p.requires_grad and torch.is_grad_enabled()
    if forms == ("logits", "logits") and not teacher_grad:
        path = choose(True, kind, w, q, p, teacher_grad=False)
        if path == "core":
            return None
        if not torch.is_grad_enabled():
            q = q.detach()
        beta, alpha = params.get("beta", JS_BETA), params.get("alpha", SKEW_ALPHA)
        return rows(path, kind, q, p.detach(), keep, temperature, beta, alpha)
    if _common_obstacles(kind, w, q, p, False) or _chunked_obstacles(q):
        return None
    from . import tensor

    if not torch.is_grad_enabled():
        p, q = p.detach(), q.detach()
    v = q.shape[-1]
    out = tensor.spec_per_row(
        kind,
        w,
        q.reshape(-1, v),
        p.reshape(-1, v),
        None if keep is None else keep.reshape(-1),
        temperature,
        forms,
    )
    return out.reshape(q.shape[:-1])


def reduce_rows(
    values: torch.Tensor, keep: torch.Tensor | None, reduction: str, num_items: Any
) -> torch.Tensor:
    """Per-token values (skipped tokens 0) reduced as the core does: "mean" over the kept
    tokens (or by ``num_items``; 0 when nothing is kept), "sum", or "none"."""
    if reduction == "none":
        return values
    return reduce_total(
        values.sum(), values.numel() if keep is None else keep.sum(), reduction, num_items
    )


def reduce_total(total: torch.Tensor, count: Any, reduction: str, num_items: Any) -> torch.Tensor:
    """``"sum"``: ``total``; ``"mean"``: ``total / num_items`` if given, else ``total / count``
    (an int or a tensor: the kept tokens), at least 1, so that an empty mean is 0."""
    if reduction == "sum":
        return total
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):  # the loss keeps its dtype, as in the core
            num_items = num_items.to(device=total.device, dtype=total.dtype)
        return total / num_items
    if isinstance(count, torch.Tensor):
        return total / count.clamp_min(1)
    return total / max(count, 1)


def _common_obstacles(
    kind: str, w: float, student: torch.Tensor, teacher: torch.Tensor, teacher_grad: bool
) -> list[str]:
    """Why no engine applies (empty: one may). The kernels give the student alone a gradient
    (``teacher_grad``: a reason); every engine works in float32 arithmetic over a non-empty
    last axis."""
    reasons = []
    if kind not in ENGINE_KINDS:
        reasons.append(f"the engines do not compute {kind!r}")
    elif resolve(kind, w).zero:
        reasons.append(f"{kind!r} at weight {w} is identically 0 (the core returns an exact 0)")
    if teacher_grad:
        reasons.append("the teacher requires a gradient (the core provides it)")
    if torch.float64 in (student.dtype, teacher.dtype):
        reasons.append("float64 logits keep the core's float64 arithmetic")
    if student.ndim < 1 or student.shape[-1] == 0:
        reasons.append("the logits have no category axis")
    if student.device != teacher.device:
        reasons.append("student and teacher are on different devices")
    if any(_no_data(x) for x in (student, teacher)):
        reasons.append(
            "the logits have no data to read (torch.func transforms, fake or meta tensors, "
            "torch.jit tracing)"
        )
    elif not torch.compiler.is_compiling() and _transformed(student, teacher):
        reasons.append(
            "a torch.func transform or forward-mode AD is active (the engines' autograd "
            "Functions have no rules for them)"
        )
    return reasons


def _transformed(student: torch.Tensor, teacher: torch.Tensor) -> bool:
    """A ``torch.func`` transform is running (over any argument, the mask or weight
    included), or an input carries a forward-mode tangent."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    from torch.autograd import forward_ad

    return any(forward_ad.unpack_dual(x).tangent is not None for x in (student, teacher))


def _no_data(x: torch.Tensor) -> bool:
    """Tensors the engines cannot run on: the C kernel reads raw memory and the autograd
    Functions have no vmap rule. Under torch.compile the inputs are fake too, but there the
    Triton custom ops trace (their fake kernels) and the chunked engine is refused anyway."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the checks below
        return False
    return ns.torch_without_data(x)


def _chunked_obstacles(student: torch.Tensor) -> list[str]:
    reasons = []
    if student.device.type != "cpu":
        reasons.append("the chunked path runs on CPU tensors")
    if torch.compiler.is_compiling():
        reasons.append("under torch.compile the chunked path's Python loop would be traced")
    return reasons


def _triton_obstacles(student: torch.Tensor, teacher: torch.Tensor) -> list[str]:
    if importlib.util.find_spec("triton") is None:
        return ["Triton is not installed"]
    reasons = []
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if student.device.type != "cuda" and not (interpret and student.device.type == "cpu"):
        reasons.append("the Triton kernels run on CUDA tensors (on CPU: TRITON_INTERPRET=1)")
    if student.dtype not in TRITON_DTYPES or teacher.dtype not in TRITON_DTYPES:
        reasons.append("the Triton kernels take float32, bfloat16 or float16 logits")
    return reasons
