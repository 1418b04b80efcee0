"""The chunked-linear loop shared by the fused-linear losses, and the per-slice engine of the
vocab-parallel losses.

:func:`fused_pass` walks row chunks of the student's hidden states: one matmul gives a chunk's
logits (and the teacher's, when it is given as hidden states and a head), an engine the
per-row values and the gradient ``G`` with respect to those logits, and then
``grad_hidden = G @ W``, ``grad_W += G.T @ h`` and ``grad_b += G.sum(0)``; no ``[N, V]``
tensor is kept. :class:`FusedLinear` is its ``autograd.Function``. Both fused-linear losses
run it; what differs is the :class:`Combiner` of the rows' statistics:

* :data:`ONE_DEVICE` (``FusedLinearDistillationLoss``): a chunk holds whole rows, so their
  statistics are complete in it and the dispatcher's engine (:func:`.dispatch.choose`: the
  Triton kernels, the chunked CPU path with its C kernel, or the core) gives the values and
  ``G`` in one pass;
* a vocab group (``ParallelFusedLinearDistillationLoss``): a chunk holds this rank's slice of
  the vocabulary, so the loop makes three passes, each recomputing the chunk's logits: the
  slices' statistics (:func:`slice_stats`, combined over the group by ``gather``), the
  slices' terms and Σh (:func:`slice_terms`, summed by ``sum``), and the gradient
  (:func:`slice_grad`), whose hidden-state part the group sums as well.

The per-slice engine is also what :mod:`kldiv.torch.parallel` runs on given logits. On CPU
float32 it is the C kernel (:func:`.native.slice_stats`, :func:`.native.slice_rows`),
with the rows it flags (+inf or NaN logits, statistics that are not finite, huge logits at
T ≠ 1) and every other dtype and device through the row specification (:mod:`kldiv._spec`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.autograd.function import once_differentiable

from ... import _spec as spec
from ..._kinds import resolve, weight_of
from . import dispatch
from . import native as native_engine

__all__ = [
    "CHUNK_LOGITS",
    "HALF",
    "matmul_dtype",
    "Combiner",
    "ONE_DEVICE",
    "Config",
    "fused_pass",
    "FusedLinear",
    "apply",
    "tempered",
    "slice_stats",
    "combine",
    "slice_terms",
    "slice_grad",
    "slice_terms_grad",
]

# Default chunk: 2^22 logits (16 MiB per float32 [rows, V] buffer), e.g. 131 rows at
# V = 32000. At N = 2048, H = 256, V = 32000 on 2 CPU cores, 2^21 to 2^24 are within 5% of
# each other; smaller chunks pay Python overhead and thin matmuls, larger ones only memory.
CHUNK_LOGITS = 1 << 22

HALF = (torch.float16, torch.bfloat16)

# The engine the one-device chunks ask the dispatcher for: True, the device's (falling back
# to the core); the tests force "triton" (on CPU under TRITON_INTERPRET=1).
FAST_PATH: bool | str = True


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the logit matmuls: PyTorch's half-precision matmul on CPU is several times
    slower than float32 on most CPUs (8x measured on the development machine); on
    accelerators F.linear's own dtype."""
    return torch.float32 if dtype in HALF and device.type == "cpu" else dtype


# ---- the per-slice engine ------------------------------------------------------------------


def tempered(
    x: torch.Tensor, dtype: torch.dtype, inv_t: float, keep: torch.Tensor | None
) -> torch.Tensor:
    """``x / T`` in ``dtype``, skipped rows (``keep`` False, which may hold anything, NaN
    included) 0."""
    x = x.to(dtype)
    x = x * inv_t if inv_t != 1.0 else x
    if keep is not None:
        x = torch.where(keep[:, None], x, 0.0)
    return x


def _stats_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maxima and ``log Σ exp(x − m)`` of tempered logits (−inf, −inf for an all −inf
    row, and for a slice of width 0, which holds no probability)."""
    if x.shape[-1] == 0:
        empty = torch.full(x.shape[:-1], -math.inf, dtype=x.dtype, device=x.device)
        return empty, empty.clone()
    m = x.amax(-1)
    shift = torch.where(torch.isfinite(m), m, 0.0)
    return m, torch.logsumexp(x - shift[:, None], -1)


def _compute_dtype(s: torch.Tensor, t: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32


def _f32(x: torch.Tensor) -> torch.Tensor:
    """float32 with unit stride along rows, as the kernel reads it."""
    x = x.to(torch.float32)
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _f32_stats(norms: torch.Tensor) -> torch.Tensor:
    """``[4, r]`` float32, contiguous: the kernel reads side k of row i at ``k·r + i``."""
    return norms.to(torch.float32).contiguous()


def _flag_keep(keep: torch.Tensor | None) -> torch.Tensor | None:
    return None if keep is None else keep.to(torch.bool).contiguous()


# The rows the kernel flags go through the specification this many elements at a time: the
# kernel takes whole tensors, and a step whose every row is flagged (NaN logits after a
# divergence, a skew weight below 2^-64) must not build ~12 [N, V] temporaries at once.
_FALLBACK_ELEMENTS = 1 << 18


def fallback_parts(rows: torch.Tensor, v: int) -> tuple[torch.Tensor, ...]:
    """The index ``rows`` (rows of width ``v``) in groups of about 2^18 elements."""
    return rows.split(max(1, _FALLBACK_ELEMENTS // max(v, 1)))


def slice_stats(
    s: torch.Tensor, t: torch.Tensor, keep: torch.Tensor | None, inv_t: float
) -> torch.Tensor:
    """``[4, r]``: per row of slices ``[r, V_r]`` of both (untempered) logits, the maximum of
    ``s/T``, ``log Σ exp(s/T − max)``, and the same for the teacher; float32 (float64 when an
    input is). Skipped rows' entries are finite and meaningless."""
    dtype = _compute_dtype(s, t)
    if dispatch.slice_kernel("kl", 0.5, s, t) is not None:
        stats, flagged = native_engine.slice_stats(_f32(s), _f32(t), _flag_keep(keep), inv_t)
        for rows in fallback_parts(flagged.nonzero().squeeze(-1), s.shape[-1]):
            sf, tf = tempered(s[rows], dtype, inv_t, None), tempered(t[rows], dtype, inv_t, None)
            stats[:, rows] = torch.stack([*_stats_of(sf), *_stats_of(tf)])
        return stats
    sf, tf = tempered(s, dtype, inv_t, keep), tempered(t, dtype, inv_t, keep)
    return torch.stack([*_stats_of(sf), *_stats_of(tf)])


def _combine_side(m: torch.Tensor, lz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top = m.amax(0)
    shift = torch.where(torch.isfinite(top), top, 0.0)
    return shift, torch.logsumexp(m - shift + lz, 0)


def combine(every: torch.Tensor) -> torch.Tensor:
    """From every slice's ``[world, 4, r]`` statistics, the global ones ``[4, r]``: the shift
    M and ``log Z`` of each side such that its log-probabilities are ``(x − M) − log Z``. An
    all −inf row gives ``log Z = −inf`` (and NaN log-probabilities, as the core's
    log-softmax)."""
    if every.shape[-1] == 0:
        return every[0].clone()
    return torch.stack(
        [*_combine_side(every[:, 0], every[:, 1]), *_combine_side(every[:, 2], every[:, 3])]
    ).contiguous()


def _spec_terms(
    kind: str,
    w: float,
    s: torch.Tensor,
    t: torch.Tensor,
    keep: torch.Tensor | None,
    inv_t: float,
    norms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of the slices through the row specification: the slice's share of the value,
    h = ∂(those terms)/∂(student log-probabilities) and the student's log-probabilities.
    Skew reverse KL's h leaves out its term q (as the kernel's does): summed over the row it
    is 1, and it cancels in h − q·Σh, so both engines' shares add up alike."""
    dtype = _compute_dtype(s, t)
    sf, tf = tempered(s, dtype, inv_t, keep), tempered(t, dtype, inv_t, keep)
    lq = (sf - norms[0, :, None]).sub_(norms[1, :, None])
    lp = (tf - norms[2, :, None]).sub_(norms[3, :, None])
    if lq.shape[-1] == 0:  # a slice of width 0 adds nothing
        zeros = torch.zeros(lq.shape[:-1], dtype=dtype, device=lq.device)
        return zeros, torch.zeros_like(lq), lq
    part, _, h = spec.rows(kind, lp, lq, w, teacher_grad=False)
    resolved = resolve(kind, w)
    if resolved.kind == "skew_reverse_kl" and not resolved.zero:
        h = h - lq.exp()
    return part, h, lq


def _spec_terms_into(
    out: torch.Tensor,
    index: torch.Tensor,
    kind: str,
    w: float,
    s: torch.Tensor,
    t: torch.Tensor,
    inv_t: float,
    norms: torch.Tensor,
) -> None:
    """The rows ``index`` that the kernel flagged, through the specification a few MiB at a
    time: their share of the value and of Σh into ``out[:, index]``."""
    for rows in fallback_parts(index, s.shape[-1]):
        part, h, _ = _spec_terms(kind, w, s[rows], t[rows], None, inv_t, norms[:, rows])
        out[:, rows] = torch.stack([part, h.sum(-1)]).to(out.dtype)


def slice_terms(
    kind: str,
    w: float,
    s: torch.Tensor,
    t: torch.Tensor,
    keep: torch.Tensor | None,
    inv_t: float,
    norms: torch.Tensor,
) -> torch.Tensor:
    """``[2, r]``: per row of the slices, their share of the divergence and of Σh, given the
    global statistics ``norms`` (:func:`combine`); skipped rows 0. ``w``: β for JS, α for the
    skew kinds."""
    dtype = _compute_dtype(s, t)
    native = dispatch.slice_kernel(kind, w, s, t)
    if native is None:
        part, h, _ = _spec_terms(kind, w, s, t, keep, inv_t, norms)
        out = torch.stack([part, h.sum(-1)])
    else:
        values, hsums, flagged = native_engine.slice_rows(
            *native, _f32(s), _f32(t), _flag_keep(keep), inv_t, _f32_stats(norms)
        )
        out = torch.stack([values, hsums]).to(dtype)
        _spec_terms_into(out, flagged.nonzero().squeeze(-1), kind, w, s, t, inv_t, norms)
    if keep is not None:
        out = torch.where(keep, out, 0.0)
    return out


def slice_terms_grad(
    kind: str,
    w: float,
    s: torch.Tensor,
    t: torch.Tensor,
    keep: torch.Tensor | None,
    inv_t: float,
    norms: torch.Tensor,
    out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`slice_terms`, and where Σh is known before the sums the gradient too, written
    into ``out``: KL's h is −p, whose sum over the row is −1 (the row kernel's (q − p)/T),
    so on the C kernel one pass gives both. Returns the terms and the rows (an index) whose
    gradient :func:`slice_grad` must still give after the sums, or None where it gave none
    (every other kind and engine, or no ``out``)."""
    native = dispatch.slice_kernel(kind, w, s, t)
    if out is None or native is None or native[0] != "kl":
        return slice_terms(kind, w, s, t, keep, inv_t, norms), None
    r = s.shape[0]
    minus_one = torch.full((r,), -1.0, dtype=torch.float64)
    values, hsums, flagged = native_engine.slice_rows(
        *native, _f32(s), _f32(t), _flag_keep(keep), inv_t, _f32_stats(norms), minus_one, out
    )
    terms = torch.stack([values, hsums]).to(out.dtype)
    redo = flagged.nonzero().squeeze(-1)
    _spec_terms_into(terms, redo, kind, w, s, t, inv_t, norms)
    if keep is not None:
        terms = torch.where(keep, terms, 0.0)
    return terms, redo


def slice_grad(
    kind: str,
    w: float,
    s: torch.Tensor,
    t: torch.Tensor,
    keep: torch.Tensor | None,
    inv_t: float,
    norms: torch.Tensor,
    sum_h: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gradient of the rows' divergence (times ``row_scale``, if given) with respect to
    the student's slice ``[r, V_r]``: ``(h − q·Σh)/T`` with the global statistics and Σh
    (:func:`slice_terms` summed over the slices); skipped rows 0. Written into ``out`` if
    given (the compute dtype, unit stride along rows)."""
    dtype = _compute_dtype(s, t)
    if out is None:
        out = torch.empty(s.shape, dtype=dtype, device=s.device)
    native = dispatch.slice_kernel(kind, w, s, t)
    if native is not None:
        scale = None if row_scale is None else row_scale.to(torch.float32).contiguous()
        k = _flag_keep(keep)
        _, _, flagged = native_engine.slice_rows(
            *native,
            _f32(s),
            _f32(t),
            k,
            inv_t,
            _f32_stats(norms),
            sum_h.to(torch.float64).contiguous(),
            out,
            scale,
        )
        for rows in fallback_parts(flagged.nonzero().squeeze(-1), s.shape[-1]):
            scale = None if row_scale is None else row_scale[rows]
            g = _spec_grad(kind, w, s[rows], t[rows], None, inv_t, norms[:, rows], sum_h[rows])
            out[rows] = (g if scale is None else g.mul_(scale.to(g.dtype)[:, None])).to(out.dtype)
        return out
    g = _spec_grad(kind, w, s, t, keep, inv_t, norms, sum_h)
    if row_scale is not None:
        g.mul_(row_scale.to(g.dtype)[:, None])
    return out.copy_(g)


def _spec_grad(
    kind: str,
    w: float,
    s: torch.Tensor,
    t: torch.Tensor,
    keep: torch.Tensor | None,
    inv_t: float,
    norms: torch.Tensor,
    sum_h: torch.Tensor,
) -> torch.Tensor:
    """``(h − q·Σh)/T`` of the slices through the row specification; skipped rows 0."""
    _, h, lq = _spec_terms(kind, w, s, t, keep, inv_t, norms)
    g = h.sub_(lq.exp_().mul_(sum_h.to(h.dtype)[:, None])).mul_(inv_t)
    if keep is not None:
        g.masked_fill_(~keep[:, None], 0.0)
    return g


# ---- the chunked-linear loop ---------------------------------------------------------------


class Combiner(Protocol):
    """How the rows' statistics are made whole: over the ``world`` ranks that hold slices of
    the vocabulary (1: a chunk's rows are whole)."""

    @property
    def world(self) -> int: ...

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[world, *x.shape]``: every rank's ``x`` in rank order."""
        ...

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the ranks, in place."""
        ...


class _OneDevice:
    """The identity: the rows are whole on this device."""

    world = 1

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x[None]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x


ONE_DEVICE: Combiner = _OneDevice()


@dataclass(frozen=True)
class Config:
    """A fused loss's settings: the kind and its weights, the temperature, the chunk (rows;
    None: ``CHUNK_LOGITS // V``) and the statistics' :class:`Combiner`."""

    kind: str
    temperature: float
    beta: float
    alpha: float
    chunk_rows: int | None
    combiner: Combiner = ONE_DEVICE
    # the (teacher, student) logit maps (logit_scale, soft-capping), applied per chunk
    maps: tuple[spec.LogitMap, spec.LogitMap] = (spec.IDENTITY, spec.IDENTITY)

    @property
    def w(self) -> float:
        return weight_of(self.kind, self.beta, self.alpha)


Teacher = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]


class _Operands:
    """The matmuls' operands in their dtype, and one chunk's hidden states and logits.
    Chunk rows ``a:b`` count the visited rows: ``index[a:b]`` when ``index`` is given."""

    def __init__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        teacher: Teacher,
        index: torch.Tensor | None,
        keep: torch.Tensor | None,
    ) -> None:
        device = hidden.device
        self.mm = matmul_dtype(hidden.dtype, device)
        self.hidden, self.index, self.keep = hidden, index, keep
        self.w = weight.to(self.mm)
        self.b = None if bias is None else bias.to(self.mm)
        t_src, t_w, t_b = teacher
        if t_w is not None:
            t_mm = matmul_dtype(t_w.dtype, device)
            t_w = t_w.to(t_mm)
            t_b = None if t_b is None else t_b.to(t_mm)
        self.teacher = (t_src, t_w, t_b)

    def rows(self, x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Rows ``a:b`` of ``x``, or of ``x[index]``: a view, or a copy of those rows only."""
        return x[a:b] if self.index is None else x.index_select(0, self.index[a:b])

    def chunk(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chunk's hidden states (matmul dtype; skipped rows 0, which keeps their NaN out
        of the weight's gradient) and both logits."""
        h = self.rows(self.hidden, a, b).to(self.mm)
        if self.keep is not None:
            h = torch.where(self.keep[a:b, None], h, 0.0)
        logits = torch.nn.functional.linear(h, self.w, self.b)
        t_src, t_w, t_b = self.teacher
        t = self.rows(t_src, a, b)
        if t_w is not None:
            t = torch.nn.functional.linear(t.to(t_w.dtype), t_w, t_b)
        return h, logits, t


def logit_chunk(
    cfg: Config, s: torch.Tensor, t: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row D(teacher‖student) ``[rows]`` of one chunk of whole ``[rows, V]`` logits and,
    if ``need_grad``, the gradient of their sum with respect to ``s``, from the engine the
    dispatcher chooses: the Triton kernels (gradient in the logits' dtype, from the same
    one-pass backward kernel as DistillationLoss's with ``grad_output = 1``), the chunked CPU
    path, or the core (float64, the endpoints where a divergence is identically 0)."""
    path = dispatch.choose(FAST_PATH, cfg.kind, cfg.w, s, t, teacher_grad=False)
    return dispatch.rows_and_grad(
        path, cfg.kind, s, t, cfg.temperature, need_grad, cfg.beta, cfg.alpha, cfg.maps
    )


def mapped_chunk(
    maps: tuple[spec.LogitMap, spec.LogitMap], s: torch.Tensor, t: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk's logits through the (teacher, student) maps, and the student map's
    derivative (None where the map is the identity or no gradient is needed), in the compute
    dtype; unmapped logits are returned as they are."""
    t_map, s_map = maps
    dtype = _compute_dtype(s, t)
    ds = None
    if not s_map.identity:
        x = s.to(dtype)
        ds = spec.map_grad(torch, x, s_map) if need_grad else None
        s = spec.apply_map(torch, x, s_map)
    if not t_map.identity:
        t = spec.apply_map(torch, t.to(dtype), t_map)
    return s, t, ds


def fused_pass(
    cfg: Config,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher: Teacher,
    index: torch.Tensor | None,
    keep: torch.Tensor | None,
    need: tuple[bool, ...],
    row_scale: torch.Tensor | None = None,
    per_row: bool = False,
    state: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None], dict[str, torch.Tensor] | None]:
    """One pass over the rows: ``index`` (None: every row) selects the rows visited, ``keep``
    (None: all) which of them count; the others get value 0 and no gradient, and are never
    read.

    Returns the per-row values ``[N]`` (``per_row``) or their sum (0-d), the gradients
    ``[grad_hidden, grad_weight, grad_bias]`` of ``Σ_rows row_scale·value`` (None where not
    ``need``ed; ``grad_hidden`` in the matmul dtype, the weight's and bias's in float32 for
    half precision), and, over a vocab group, the rows' statistics and Σh (``state``, which a
    later call with ``row_scale`` takes to run the gradient pass alone). ``teacher`` is
    ``(logits, None, None)`` or ``(hidden, weight, bias)``.
    """
    n, v = hidden.shape[0], weight.shape[0]
    if keep is not None and cfg.combiner.world == 1:  # whole rows: visit the kept ones only
        kept = keep if index is None else keep[index]
        sel = kept.nonzero().squeeze(1)
        index, keep = (sel if index is None else index[sel]), None
    m = n if index is None else index.numel()
    device = hidden.device
    ops = _Operands(hidden, weight, bias, teacher, index, keep)
    val_dtype = _compute_dtype(hidden, teacher[0])
    acc_dtype = torch.float32 if weight.dtype in HALF else weight.dtype
    gh = torch.zeros((n, hidden.shape[1]), dtype=ops.mm, device=device) if need[0] else None
    gw = torch.zeros(weight.shape, dtype=acc_dtype, device=device) if need[1] else None
    gb = torch.zeros(v, dtype=acc_dtype, device=device) if need[2] and bias is not None else None
    need_grad = gh is not None or gw is not None or gb is not None
    chunk = cfg.chunk_rows or max(1, CHUNK_LOGITS // max(v, 1))
    chunks = [(a, min(m, a + chunk)) for a in range(0, m, chunk)]

    def accumulate(a: int, b: int, h: torch.Tensor, g: torch.Tensor) -> None:
        gm = g.to(ops.mm)
        if gh is not None:
            rows = gm @ ops.w
            if index is None:
                gh[a:b] = rows
            else:
                gh.index_copy_(0, index[a:b], rows)
        if gw is not None:
            if gw.dtype == ops.mm:
                gw.addmm_(gm.t(), h)
            else:  # half precision on an accelerator: product in its dtype, sum in float32
                gw.add_(gm.t() @ h)
        if gb is not None:
            gb.add_(g.sum(0).to(acc_dtype))

    if cfg.combiner.world == 1:
        # a chunk's rows are whole: the engine gives the values and G in one pass
        out = torch.zeros(n if per_row else (), dtype=val_dtype, device=device)
        for a, b in chunks:
            h, s, t = ops.chunk(a, b)
            vals, g = logit_chunk(cfg, s, t, need_grad)
            del s, t  # before the gradient matmuls: one [rows, V] buffer fewer at the peak
            if per_row:
                if index is None:
                    out[a:b] = vals
                else:
                    out.index_copy_(0, index[a:b], vals.to(val_dtype))
            else:
                out += vals.sum()
            if g is None:
                continue
            if row_scale is not None:
                g.mul_(ops.rows(row_scale, a, b).to(g.dtype)[:, None])
            accumulate(a, b, h, g)
        return out, [gh, gw, gb], None

    # a vocab group: the statistics and Σh over every slice, then the gradient
    inv_t = 1.0 / cfg.temperature
    k_of = (lambda a, b: None) if keep is None else (lambda a, b: keep[a:b])
    if state is None:
        stats = torch.empty((4, m), dtype=val_dtype, device=device)
        for a, b in chunks:
            _, s, t = ops.chunk(a, b)
            s, t, _ = mapped_chunk(cfg.maps, s, t, False)
            stats[:, a:b] = slice_stats(s, t, k_of(a, b), inv_t)
        norms = combine(cfg.combiner.gather(stats))  # collective 1
        sums = torch.zeros((2, m), dtype=val_dtype, device=device)
        for a, b in chunks:
            _, s, t = ops.chunk(a, b)
            s, t, _ = mapped_chunk(cfg.maps, s, t, False)
            sums[:, a:b] = slice_terms(cfg.kind, cfg.w, s, t, k_of(a, b), inv_t, norms[:, a:b])
        cfg.combiner.sum(sums)  # collective 2
        values = sums[0] if keep is None else torch.where(keep, sums[0], 0.0)
        state = {"values": values, "norms": norms, "sum_h": sums[1]}
    if need_grad:
        norms, sum_h = state["norms"], state["sum_h"]
        for a, b in chunks:
            h, s, t = ops.chunk(a, b)
            s, t, ds = mapped_chunk(cfg.maps, s, t, True)
            scale = None if row_scale is None else row_scale[a:b]
            g = slice_grad(
                cfg.kind, cfg.w, s, t, k_of(a, b), inv_t, norms[:, a:b], sum_h[a:b], scale
            )
            del s, t
            if ds is not None:
                g = g.to(ds.dtype).mul_(ds)
            accumulate(a, b, h, g)
        if gh is not None:
            cfg.combiner.sum(gh)  # every vocab slice's share of dL/dhidden
    values = state["values"]
    return (values if per_row else values.sum()), [gh, gw, gb], state


class FusedLinear(torch.autograd.Function):
    """``(hidden, weight, bias, teacher…, index, keep) -> Σ values`` (``reduce``) or per-row
    values.

    With ``reduce`` the gradients are computed in the forward pass (one pass over the rows)
    and scaled by the scalar ``grad_output`` in backward; without it, ``grad_output`` differs
    per row and backward runs the gradient pass again with the rows weighted by it (over a
    vocab group, from the statistics the forward pass kept: no collective but the hidden
    states' sum).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        t_src: torch.Tensor,
        t_w: torch.Tensor | None,
        t_b: torch.Tensor | None,
        index: torch.Tensor | None,
        keep: torch.Tensor | None,
        cfg: Config,
        reduce: bool,
        grad_enabled: bool,
    ) -> torch.Tensor:
        need = tuple(grad_enabled and x for x in ctx.needs_input_grad[:3])
        teacher = (t_src, t_w, t_b)
        ctx.cfg, ctx.reduce, ctx.need = cfg, reduce, need
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if reduce:
            total, grads, _ = fused_pass(cfg, hidden, weight, bias, teacher, index, keep, need)
            ctx.save_for_backward(*grads)
            return total
        values, _, state = fused_pass(
            cfg, hidden, weight, bias, teacher, index, keep, (False,) * 3, per_row=True
        )
        kept = (None, None) if state is None else (state["norms"], state["sum_h"])
        ctx.save_for_backward(hidden, weight, bias, t_src, t_w, t_b, index, keep, *kept)
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        if ctx.reduce:
            # In place: a second backward through the same forward would see scaled
            # gradients; autograd's version counter refuses it instead.
            grads = [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in ctx.saved_tensors]
        else:
            hidden, weight, bias, t_src, t_w, t_b, index, keep, norms, sum_h = ctx.saved_tensors
            state = None if norms is None else {"norms": norms, "sum_h": sum_h, "values": sum_h}
            _, grads, _ = fused_pass(
                ctx.cfg,
                hidden,
                weight,
                bias,
                (t_src, t_w, t_b),
                index,
                keep,
                ctx.need,
                row_scale=grad_out,
                state=state,
            )
        out = [None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes, strict=True)]
        return (*out,) + (None,) * 8


@dispatch.opaque_to_compile
def apply(*args: Any) -> torch.Tensor:
    """:class:`FusedLinear`, opaque to ``torch.compile``: its Python loop over row chunks
    (with a host check per chunk) would otherwise be unrolled or broken into many graphs.
    Under ``torch.compile`` the surrounding model compiles; this call runs eagerly (one graph
    break, so ``fullgraph=True`` is not supported)."""
    return FusedLinear.apply(*args)
