"""Top-k sparse teachers for distillation: ``(indices, log_probs)`` per token, as offline
distillation pipelines store them (vLLM ``prompt_logprobs=k``, saved top-k log-softmax), with
an explicit policy for the probability mass outside the stored ids.

A :class:`TopKTeacher` holds, per token, ``indices [..., K]`` (vocabulary ids; a negative id
is padding: "no entry") and ``log_probs [..., K]``, the teacher's log-probabilities of those
ids under its *full* softmax, so ``Σ exp(log_probs) ≤ 1`` and the remainder is the tail mass.
:func:`topk_distillation_rows` gives the per-token divergence D(teacher‖student) against full
student logits ``[..., V]``, for the six kinds of :class:`~kldiv.torch.DistillationLoss`, with
the meaning of the core (``kldiv.divergence(teacher, student, kind=...)``) applied to one of two
finite distributions, chosen by the required ``tail=`` policy:

``tail="tail_bucket"``
    Both distributions are collapsed onto K + 1 outcomes: the K stored ids, and one bucket for
    every other id. Teacher bucket: ``1 − Σ_k p_k``, computed as ``log1mexp(logsumexp(
    log_probs))``. Student bucket: its mass outside the K ids, ``logsumexp`` of the student
    logits with the K ids masked out, minus the student's ``logsumexp`` over the vocabulary.
    (Not ``log(1 − Σ_k q_k)``: in float32 that cancels to 0 as soon as the student's tail falls
    below ~1e-7 of its mass, turning a finite KL into +inf, and its gradient loses
    ``log10(1/q_tail)`` digits; see the tests.) The value is the core divergence between these
    (K+1)-point distributions. Coarse-graining never increases an f-divergence (the
    data-processing inequality), and all six kinds are f-divergences of (teacher, student), so
    this is a **lower bound** on the full-vocabulary divergence, equal to it when the K ids
    cover the vocabulary, for a teacher whose tail is stored exactly. Stored in float32 or
    less, a confident teacher's tail (1e-8, say) is below the rounding of ``Σp``: it reads as
    exactly 0 (see the rounding rule below), and then the reverse-direction kinds
    (``"reverse_kl"``) are +inf for any student with mass outside the ids, as the core is for
    q > 0 = p. With such data use ``"skew_reverse_kl"`` (finite for any supports),
    ``"renormalize"``, or a forward-direction kind. The student is pushed to put the
    teacher's tail mass outside the K ids, but not told where. Temperature ≠ 1 raises: a
    stored tail mass cannot be re-tempered (its tempered value Σ_tail p^(1/T) depends on how
    the mass was spread over the tail ids).

    **A stored tail.** When the teacher carries ``tail_log_prob`` (per token, ``log(1 − Σ_k
    p_k)`` computed from its full logits, e.g. ``logsumexp(z_rest) − logsumexp(z)`` as
    :mod:`kldiv.topk` stores it), that is its bucket instead of ``1 − Σp`` of the stored
    values: the teacher's (K+1)-point distribution is ``(p_1, …, p_K, p_tail)`` normalised to
    sum to 1, i.e. ``a = [log_probs, tail_log_prob] − logsumexp([log_probs, tail_log_prob])``.
    The normalisation only removes the rounding of the stored values (its size is the
    tolerance below), and the tail keeps its relative accuracy however small it is: a tail of
    1e-12 stays 1e-12, where ``1 − Σp`` of float16 log-probs reads as 0 or as rounding noise
    of ~1e-3, so the reverse-direction kinds stay finite and accurate. ``-inf`` is an empty
    tail (the ids hold all the mass). The rounding rule below is then not needed and not
    applied: the teacher's bucket is exactly what is stored.
``tail="renormalize"``
    The teacher is taken as exactly sparse on its K ids: ``p = softmax(log_probs / T)`` over
    them, which is exact for the tempered teacher ``softmax(teacher_logits / T)`` conditioned
    on those ids. The student is conditioned on the same ids: ``q = softmax(z_ids / T)`` over
    the K ids. The value is the core divergence between these K-point distributions, i.e. the
    divergence on the simplex of the K ids (+inf only where the core's is: e.g. KL where the
    student has a −inf logit at an id the teacher gives mass). Student logits outside the
    ids are not read (NaN there does not propagate). It ignores
    how much mass the student puts outside the K ids (its gradient there is 0): for forward
    KL, the divergence from the sparse teacher to the *unconditioned* student is this value
    plus ``−log Q(ids)``; reverse-direction kinds against the unconditioned student would be
    +inf wherever the student has mass outside the K ids. Pair it with a cross-entropy term, or
    use ``"tail_bucket"``, when the student's out-of-set mass matters.

Data rules, on kept rows: ids in ``[0, V)``, a negative id is padding (its log-prob is
ignored, NaN included); no id twice in a row (a repeated id is almost always padding written as
a real id, e.g. 0; it would count the student's probability twice); no NaN log-probs;
log-probs ≤ 0 and ``Σ exp(log_probs) ≤ 1``, each up to ``tolerance`` in log space (the rounding
of the stored dtype: see :data:`TOLERANCE`). A stored sum above 1 but within tolerance is
rounding: the tail mass is then exactly 0 and the K probabilities are scaled to sum to 1 (so
every divergence stays a divergence, ≥ 0), never clamped. So is a remainder ``1 − Σp`` within
tolerance when the tail bucket is empty for the student, because the ids cover the vocabulary
or the student rules out every other id with -inf logits: a rounding remainder must not make KL
+inf there (a remainder beyond tolerance does, as in the core; ids covering the vocabulary with
a remainder beyond tolerance break the rules). Both are selected per token with ``where``, not
by a host branch.
The teacher's tail is only known as ``1 − Σp``: to an absolute accuracy of the stored
rounding (~1e-7 for float32 log-probs, ~1e-16 for float64), so a tail far below that is noise,
and the kinds that weigh ``log p_tail`` by the student's tail mass (reverse KL) inherit it.
With a stored ``tail_log_prob`` (``"tail_bucket"``), also: no NaN tail and a tail ≤ 0, and
the total ``Σ exp(log_probs) + exp(tail_log_prob)`` equal to 1 within ``tolerance`` in log
space; a finite tail where the ids cover the vocabulary breaks the rules.
Student rules: ``"renormalize"`` also needs, per kept row, one stored entry with probability
> 0 and one student logit > -inf among the ids (else the conditional distribution is
undefined); ``"tail_bucket"`` needs a student logit > -inf somewhere in the row.

Zero support is the core's: ``-inf`` student logits are zero probabilities, ``-inf`` teacher
log-probs are zero probabilities, terms with teacher probability 0 are 0, a teacher outcome
with probability > 0 where the student has none gives +inf (for ``"kl"``). Masked rows
(``keep`` False) contribute exactly 0 and no gradient, whatever they hold (NaN, ids out of
range, duplicates). NaN or +inf student logits in a kept row give NaN, as in the core.

Validation (DESIGN §1): static facts (shapes, dtypes, devices, the policy, ``temperature`` ≠ 1
with ``"tail_bucket"``, ``log_probs`` requiring grad) are always checked, eagerly. The data
rules and the student rules above are checked only with ``TopKTeacher(..., check=True)``:
eagerly, with host syncs, every failure a one-line ``ValueError`` naming the token; refused
under ``torch.compile`` (check the first batch eagerly, then trace with ``check=False``). By
default (``check=False``) nothing reads a value on the host or branches on one, so
``torch.compile(fullgraph=True)`` works, and a kept token that breaks any rule is **NaN**, in
value and in gradient (as if its student logits were NaN; a ``nansum`` or ``where`` applied to
the result does not clean the gradient): never a finite wrong number, never an exception. An
id ≥ V is not used as an index (no CPU index error, no out-of-bounds CUDA read); duplicates
are found by an ``[N, K]`` sort, not counted twice. On valid data both settings give the same
values and gradients, bit for bit. The cost of the default is ``[N, K]`` work (one sort),
small beside the ``[N, V]`` softmax.

Gradients: with respect to ``student_logits`` only, through plain autograd. The teacher is
data: ``log_probs`` that require grad are refused (pass ``.detach()``). Memory: ``"tail_bucket"``
makes one ``[N, V + 1]`` copy of the student logits in the compute dtype (saved for backward,
like a log-softmax output); ``"renormalize"`` only gathers ``[N, K]``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import cast, get_args

import numpy as np
import torch

from .. import _check
from .. import _namespace as ns
from .._defaults import (
    JS_BETA,
    SKEW_ALPHA,
    TEMPERATURE,
    DistillationKind,
    TailPolicy,
)
from .._kinds import ENGINE_KINDS, params_of
from ..divergences import KINDS as _CORE_KINDS

__all__ = ["TopKTeacher", "topk_distillation_rows", "TAIL_POLICIES", "TOLERANCE"]

INF = math.inf
TAIL_POLICIES: tuple[TailPolicy, ...] = get_args(TailPolicy)
KINDS = ENGINE_KINDS

# Default tolerance (in log space) for stored log-probs above 0 and for Σ exp(log_probs) above 1,
# by the dtype the log-probs are stored in. Measured worst excess of Σp over 1 for top-k
# (k ≤ 256) of a float32 log-softmax over 32000 ids: 5e-7 kept in float32, 3.4e-4 after a
# cast to float16, 2.8e-3 after a cast to bfloat16, 7.4e-3 for a log-softmax computed in
# bfloat16. float64 storage gets the float32 value: the producer usually computed in float32.
TOLERANCE = {
    torch.float64: 1e-4,
    torch.float32: 1e-4,
    torch.float16: 2.0**-8,
    torch.bfloat16: 2.0**-5,
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class TopKTeacher:
    """A top-k sparse teacher: ``indices [..., K]`` and ``log_probs [..., K]`` per token.

    ``indices``: integer vocabulary ids, a negative id marking padding ("no entry").
    ``log_probs``: floating, the teacher's log-probabilities of those ids under its full
    softmax (not renormalised over the K ids), so ``Σ exp(log_probs) ≤ 1``. ``tail`` (required,
    no default): ``"tail_bucket"`` or ``"renormalize"``, what the mass outside the ids means;
    see :mod:`kldiv.torch.topk`. ``tolerance``: how far (in log space) the stored log-probs
    may exceed 0, and their log-sum-exp may exceed 0, before the data breaks the rules; default
    from :data:`TOLERANCE` by the dtype of ``log_probs``. ``check`` (default False): validate the
    data when the teacher is used, eagerly, with a ``ValueError`` naming the first offending
    token (host syncs; refused under ``torch.compile``). Without it nothing value-dependent
    runs and a kept token that breaks a data rule gives NaN; see :mod:`kldiv.torch.topk`.
    ``tail_log_prob`` (optional, default None): the token shape ``[...]``, floating, the
    teacher's log-probability of everything outside the K ids, ``log(1 − Σ_k p_k)``, computed
    from its full logits (``logsumexp`` of the logits outside the ids minus ``logsumexp`` of
    all of them), as :func:`kldiv.topk.load` returns it. With ``tail="tail_bucket"`` it
    replaces ``1 − Σ exp(log_probs)`` as the teacher's bucket (accurate however small the tail
    and whatever the rounding of ``log_probs``); ``"renormalize"`` does not read it.

    Immutable; shapes, dtypes, the policy and ``requires_grad`` are checked here, always; the
    values only with ``check=True``, when it is used.
    """

    indices: torch.Tensor
    log_probs: torch.Tensor
    tail: TailPolicy = dataclasses.field(kw_only=True)
    tolerance: float | None = dataclasses.field(default=None, kw_only=True)
    check: bool = dataclasses.field(default=False, kw_only=True)
    tail_log_prob: torch.Tensor | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        idx, lp = self.indices, self.log_probs
        if not isinstance(idx, torch.Tensor) or not isinstance(lp, torch.Tensor):
            raise TypeError(
                f"Expected `indices` and `log_probs` to be torch tensors, got "
                f"{type(idx).__name__} and {type(lp).__name__}."
            )
        if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
            raise TypeError(
                f"Expected integer `indices` (vocabulary ids), got dtype {_dtype_name(idx.dtype)}."
            )
        if lp.dtype not in TOLERANCE:
            raise TypeError(
                f"Expected floating `log_probs` (float16, bfloat16, float32 or float64), got "
                f"dtype {_dtype_name(lp.dtype)}."
            )
        if idx.ndim == 0 or tuple(idx.shape) != tuple(lp.shape):
            raise ValueError(
                f"Expected `indices` and `log_probs` of the same shape [..., K], got "
                f"{tuple(idx.shape)} and {tuple(lp.shape)}."
            )
        if idx.device != lp.device:
            raise ValueError(
                f"Expected `indices` and `log_probs` on one device, got {idx.device} and "
                f"{lp.device}."
            )
        if lp.requires_grad:
            raise ValueError(
                "Expected `log_probs` that do not require grad: a top-k teacher is data, and "
                "no gradient is computed for it (pass `log_probs.detach()`)."
            )
        if self.tail not in TAIL_POLICIES:
            raise ValueError(
                f"Expected `tail` to be one of {', '.join(map(repr, TAIL_POLICIES))}, got "
                f"{self.tail!r} ('tail_bucket': the mass outside the ids is one more outcome; "
                "'renormalize': the teacher is exactly sparse on its ids)."
            )
        if self.tail == "renormalize" and idx.shape[-1] == 0:
            raise ValueError(
                "Expected at least one stored id (K ≥ 1) with tail='renormalize': conditioned "
                "on no ids there is no distribution."
            )
        tail = self.tail_log_prob
        if tail is not None:
            if not isinstance(tail, torch.Tensor):
                raise TypeError(
                    f"Expected `tail_log_prob` to be a torch tensor or None, got "
                    f"{type(tail).__name__}."
                )
            if tail.dtype not in TOLERANCE:
                raise TypeError(
                    f"Expected floating `tail_log_prob` (float16, bfloat16, float32 or "
                    f"float64), got dtype {_dtype_name(tail.dtype)}."
                )
            if tuple(tail.shape) != tuple(idx.shape[:-1]):
                raise ValueError(
                    f"Expected `tail_log_prob` of the token shape {tuple(idx.shape[:-1])} (one "
                    f"value per token), got {tuple(tail.shape)}."
                )
            if tail.device != idx.device:
                raise ValueError(
                    f"Expected `tail_log_prob` on the device of `indices` {idx.device}, got "
                    f"{tail.device}."
                )
            if tail.requires_grad:
                raise ValueError(
                    "Expected `tail_log_prob` that does not require grad: a top-k teacher is "
                    "data (pass `tail_log_prob.detach()`)."
                )
        tol = self.tolerance
        if tol is None:
            tol = TOLERANCE[lp.dtype]
        elif not isinstance(tol, numbers.Real) or isinstance(tol, bool) or not 0.0 <= tol < INF:
            raise ValueError(f"Expected `tolerance` to be a finite float ≥ 0, got {tol!r}.")
        object.__setattr__(self, "tolerance", float(tol))
        object.__setattr__(self, "check", _check.check_flag("check", self.check))

    @property
    def k(self) -> int:
        """The number of stored entries per token (padding included)."""
        return self.indices.shape[-1]

    @property
    def token_shape(self) -> tuple[int, ...]:
        """The leading shape ``[...]`` of ``indices``: one entry per token."""
        return tuple(self.indices.shape[:-1])

    def flatten(self) -> TopKTeacher:
        """The same teacher with its token axes flattened: ``[N, K]``."""
        shape = (math.prod(self.token_shape), self.k)
        tail = self.tail_log_prob
        return dataclasses.replace(
            self,
            indices=self.indices.reshape(shape),
            log_probs=self.log_probs.reshape(shape),
            tail_log_prob=None if tail is None else tail.reshape(shape[0]),
        )

    @classmethod
    def from_logits(
        cls,
        logits: torch.Tensor,
        k: int,
        *,
        tail: TailPolicy,
        tolerance: float | None = None,
        check: bool = False,
    ) -> TopKTeacher:
        """The top ``k`` ids of ``log_softmax(logits)`` (in float32, or float64 for float64
        logits) and their log-probabilities, as an offline pipeline would store them."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= logits.shape[-1]:
            raise ValueError(f"Expected `k` to be an int in [0, {logits.shape[-1]}], got {k!r}.")
        with torch.no_grad():
            dtype = torch.promote_types(logits.dtype, torch.float32)
            values, ids = torch.log_softmax(logits.to(dtype), dim=-1).topk(k, dim=-1)
        return cls(ids, values, tail=tail, tolerance=tolerance, check=check)

    def __repr__(self) -> str:
        return (
            f"TopKTeacher(shape={tuple(self.indices.shape)}, tail={self.tail!r}, "
            f"tolerance={self.tolerance:g}, check={self.check}, "
            f"log_probs dtype={_dtype_name(self.log_probs.dtype)}"
            f"{', stored tail' if self.tail_log_prob is not None else ''})"
        )


def _where(token_shape: tuple[int, ...], row: int) -> str:
    if len(token_shape) <= 1:
        return f"row {row}"
    return f"token {tuple(int(i) for i in np.unravel_index(row, token_shape))}"


def _first(bad: torch.Tensor) -> tuple[int, ...]:
    """Index of the first True entry of ``bad`` (one sync; only on the error path)."""
    return tuple(int(i) for i in bad.nonzero()[0].tolist())


def _lse(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last axis; rows of only ``-inf`` give ``-inf`` with zero gradient
    (torch's logsumexp gives NaN gradients there, even for a zero cotangent)."""
    dead = (x == -INF).all(-1)
    out = torch.logsumexp(torch.where(dead[:, None], 0.0, x), dim=-1)
    return torch.where(dead, -INF, out)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 − e^a)`` for ``a ≤ 0``, accurate at both ends (Mächler 2012); no gradient needed."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def topk_distillation_rows(
    kind: DistillationKind,
    student_logits: torch.Tensor,
    teacher: TopKTeacher,
    keep: torch.Tensor | None = None,
    temperature: float = TEMPERATURE,
    beta: float = JS_BETA,
    alpha: float = SKEW_ALPHA,
) -> torch.Tensor:
    """Per-token D(teacher‖student) for a top-k sparse teacher; see :mod:`kldiv.torch.topk`.

    ``kind``: ``"kl"``, ``"reverse_kl"``, ``"js"`` (weight ``beta`` on the teacher),
    ``"skew_kl"``, ``"skew_reverse_kl"`` (``alpha``) or ``"tv"``, each with the core's meaning
    (``kldiv.divergence(teacher, student, kind)``) on the distributions that ``teacher.tail``
    defines. ``student_logits``: ``[..., V]``, any float dtype. ``teacher``: ``[..., K]`` with
    the same leading (token) shape. ``keep``: bool or 0/1 integer (e.g. an
    ``attention_mask``) of the token shape, or None; False (0) rows give exactly 0 and no
    gradient, whatever they hold. Other integers raise ``ValueError`` eagerly; under
    ``torch.compile`` nothing reads them and any non-zero value keeps the row.
    ``temperature`` divides the student logits and the teacher log-probs (``"renormalize"``
    only; ``"tail_bucket"`` needs 1).

    Returns the token shape, float32 (float64 when the student logits, the teacher log-probs
    or its stored tail are float64), differentiable with respect to ``student_logits``. No
    reduction and no T² factor: the caller reduces. Static facts are checked eagerly; the data
    only when ``teacher.check`` is True (host syncs, eager only). Otherwise nothing here reads a
    value on the host or branches on one, so it runs under ``torch.compile(fullgraph=True)``,
    and a kept token that breaks a data rule gives NaN (value and gradient).
    """
    if kind not in KINDS:
        raise ValueError(
            f"Expected `kind` to be one of {', '.join(map(repr, KINDS))}, got {kind!r}."
        )
    if not isinstance(teacher, TopKTeacher):
        raise TypeError(f"Expected `teacher` to be a TopKTeacher, got {type(teacher).__name__}.")
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point():
        what = getattr(student_logits, "dtype", type(student_logits).__name__)
        raise TypeError(f"Expected floating `student_logits`, got {what}.")
    if student_logits.ndim == 0 or student_logits.shape[-1] == 0:
        raise ValueError(
            f"Expected `student_logits` of shape [..., V] with V ≥ 1, got "
            f"{tuple(student_logits.shape)}."
        )
    tokens = tuple(student_logits.shape[:-1])
    if teacher.token_shape != tokens:
        raise ValueError(
            f"Expected the teacher's token shape to match the student's {tokens}, got indices "
            f"of shape {tuple(teacher.indices.shape)}."
        )
    if teacher.indices.device != student_logits.device:
        raise ValueError(
            f"Expected the teacher on the student's device {student_logits.device}, got "
            f"{teacher.indices.device}."
        )
    if keep is not None:
        if not isinstance(keep, torch.Tensor):
            raise TypeError(f"Expected `keep` to be a tensor, got {type(keep).__name__}.")
        if tuple(keep.shape) != tokens:
            raise ValueError(
                f"Expected `keep` of the token shape {tokens}, got {tuple(keep.shape)}."
            )
        keep = _check.as_mask("keep", keep)
    t = _check.check_temperature(temperature, ("logits", "logits"))
    if teacher.tail == "tail_bucket" and t != 1.0:
        raise ValueError(
            f"Expected `temperature=1` with tail='tail_bucket', got {temperature!r}: a stored "
            "tail mass 1 − Σp cannot be re-tempered (its tempered value depends on how it is "
            "spread over the tail ids). Use tail='renormalize', or store the teacher's top-k "
            "log-probs of logits / T and divide the student logits by T yourself."
        )
    params = {
        name: _check.check_unit_interval(name, value)
        for name, value in params_of(kind, beta, alpha).items()
    }
    if teacher.check and (ns.is_traced(teacher.log_probs) or ns.is_traced(student_logits)):
        raise ValueError(
            "`check=True` reads the data and cannot run under jax.jit, vmap or torch.compile; "
            "run it once eagerly (e.g. on the first batch) and trace a TopKTeacher with "
            "check=False."
        )

    v, k = student_logits.shape[-1], teacher.k
    z = student_logits.reshape(-1, v)
    n = z.shape[0]
    flat_keep = None if keep is None else keep.reshape(n)
    cdtype = torch.promote_types(
        torch.promote_types(z.dtype, teacher.log_probs.dtype), torch.float32
    )
    stored = teacher.tail_log_prob if teacher.tail == "tail_bucket" else None
    if stored is not None:
        cdtype = torch.promote_types(cdtype, stored.dtype)
    idx = teacher.indices.reshape(n, k).long()  # int32 ids are common in stored datasets
    lp = teacher.log_probs.reshape(n, k).to(cdtype)
    tail = None if stored is None else stored.reshape(n).to(cdtype)
    listed = idx >= 0  # stored entries (not padding) of kept rows
    if flat_keep is not None:
        listed = listed & flat_keep[:, None]
    # the entries that take part; an id ≥ V is never used as an index (no index error on CPU,
    # no out-of-bounds read on CUDA): its row is refused or made NaN below
    live = listed & (idx < v)
    x = torch.where(live, lp, -INF)  # padding and masked rows: probability 0, garbage dropped
    a_sum = torch.logsumexp(x, dim=-1) if k else x.new_full((n,), -INF)
    faults = _teacher_faults(teacher, idx, lp, listed, live, x, a_sum, v, flat_keep, tail)
    if teacher.check:
        _raise_teacher_fault(teacher, faults, idx, lp, a_sum, v, tokens, tail)
    if teacher.tail == "tail_bucket":
        b, empty, student_fault = _student_tail_bucket(z, idx, live, flat_keep, cdtype)
        if tail is None:
            a = _teacher_tail_bucket(x, a_sum, empty, cast(float, teacher.tolerance))
        else:
            a = _teacher_stored_tail(x, tail, flat_keep)
    else:
        a, live_r = _teacher_renormalized(x, live, flat_keep, t)
        b, student_fault = _student_renormalized(z, idx, live_r, flat_keep, t, cdtype)
    if teacher.check and bool(student_fault.any()):
        _raise_student_fault(teacher.tail, student_fault, tokens)
    rows = _CORE_KINDS[kind](a, b, form="log_probs", reduction="none", **params)
    invalid = student_fault
    for bad in faults.values():
        invalid = invalid | (bad.any(-1) if bad.ndim == 2 else bad)
    # A kept token that breaks a data rule (only possible without check) is NaN, in value and
    # in gradient, as if its student logits were NaN: a multiplicative NaN, because a
    # ``where`` would give it a zero gradient and finite training would go on silently.
    rows = rows * torch.where(invalid, math.nan, 1.0).to(rows.dtype)
    if v > 0:
        # ... and a NaN gradient reaches the student even where the row's value does not
        # depend on it (e.g. no usable id under "renormalize"): a double where, so that valid
        # rows add an exact 0 whatever their first logit holds.
        z0 = torch.where(invalid, z[:, 0].to(rows.dtype), 0.0)
        rows = rows + z0 * torch.where(invalid, math.nan, 0.0).to(rows.dtype)
    if flat_keep is not None:
        rows = torch.where(flat_keep, rows, 0.0)
    return rows.reshape(tokens)


def _teacher_faults(
    teacher: TopKTeacher,
    idx: torch.Tensor,
    lp: torch.Tensor,
    listed: torch.Tensor,
    live: torch.Tensor,
    x: torch.Tensor,
    a_sum: torch.Tensor,
    v: int,
    keep: torch.Tensor | None,
    tail: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The teacher's data rules, as masks over kept rows ([N, ·] or [N]; True = broken), in
    the order the errors are reported. Tensor ops only ([N, K] work and one [N, K] sort).
    ``tail``: the stored tail ``[N]`` (tail_bucket only), or None."""
    tol = cast(float, teacher.tolerance)  # None only before __post_init__ sets the default
    covers = live.sum(-1) == v  # with distinct ids: "the ids are the whole vocabulary"
    faults = {
        "range": listed & (idx >= v),
        "nan": listed & torch.isnan(lp),
    }
    if idx.shape[1] > 1:
        s = torch.where(listed, idx, -1).sort(dim=-1).values
        faults["dup"] = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    faults["entry"] = listed & (lp > tol)
    faults["sum"] = a_sum > tol
    faults["short"] = covers & (a_sum < -tol)
    if tail is not None:
        kept = torch.ones_like(covers) if keep is None else keep
        total = torch.logsumexp(torch.cat([x, tail[:, None]], dim=-1), dim=-1)
        faults["tail"] = kept & (torch.isnan(tail) | (tail > tol))
        # written so that a NaN total (NaN entries, reported above) also counts as broken
        faults["total"] = kept & ~(total.abs() <= tol)
        faults["open"] = covers & (tail > -INF)
    if teacher.tail == "renormalize":
        empty = ~(x > -INF).any(-1)
        faults["empty"] = empty if keep is None else keep & empty
    return faults


def _raise_teacher_fault(
    teacher: TopKTeacher,
    faults: dict[str, torch.Tensor],
    idx: torch.Tensor,
    lp: torch.Tensor,
    a_sum: torch.Tensor,
    v: int,
    tokens: tuple[int, ...],
    tail: torch.Tensor | None = None,
) -> None:
    """``check=True``: raise for the first broken rule, naming the token (one host sync when
    the data is valid)."""
    if idx.shape[0] == 0:
        return
    flags = torch.stack([bad.any() for bad in faults.values()]).tolist()
    tol, dt = teacher.tolerance, _dtype_name(teacher.log_probs.dtype)
    for (name, bad), flagged in zip(faults.items(), flags, strict=True):
        if not flagged:
            continue
        pos = _first(bad)
        where = _where(tokens, pos[0])
        if name == "range":
            msg = (
                f"Expected `teacher.indices` in [0, {v}) (negative = padding), got "
                f"{int(idx[pos])} in {where}."
            )
        elif name == "nan":
            msg = (
                f"Expected no NaN in `teacher.log_probs` of kept tokens, got NaN in {where}, "
                f"entry {pos[1]}."
            )
        elif name == "dup":
            s = torch.where(idx >= 0, idx, -1)[pos[0]].sort().values
            msg = (
                f"Expected distinct `teacher.indices` within a token, got id "
                f"{int(s[pos[1] + 1])} twice in {where} (pad unused entries with a negative "
                "id, e.g. -1, not with a repeated id)."
            )
        elif name == "entry":
            msg = (
                f"Expected `teacher.log_probs` ≤ 0 (tolerance {tol:g} for {dt}), got "
                f"{float(lp[pos]):g} in {where}, entry {pos[1]} (log-probs of the full "
                "softmax are expected, not logits)."
            )
        elif name == "sum":
            msg = (
                f"Expected the stored teacher probabilities to sum to at most 1 (log-space "
                f"tolerance {tol:g} for {dt}), got {math.exp(float(a_sum[pos])):.6g} in "
                f"{where}; log_probs must come from a softmax over the full "
                "vocabulary."
            )
        elif name in ("tail", "total", "open") and tail is not None:
            t_row = float(tail[pos[0]])
            if name == "tail":
                msg = (
                    f"Expected `teacher.tail_log_prob` ≤ 0 and not NaN (tolerance {tol:g}), got "
                    f"{t_row:g} in {where}."
                )
            elif name == "total":
                total = torch.logsumexp(
                    torch.cat(
                        [torch.where(idx[pos[0]] >= 0, lp[pos[0]], -INF), tail[pos[0], None]]
                    ),
                    dim=0,
                )
                msg = (
                    f"Expected the stored teacher probabilities and the stored tail to sum to 1 "
                    f"(log-space tolerance {tol:g} for {dt}), got {math.exp(float(total)):.6g} "
                    f"in {where}; `tail_log_prob` must be log(1 − Σp) of the same softmax."
                )
            else:
                msg = (
                    f"Expected `teacher.tail_log_prob` = -inf where the ids cover all {v} "
                    f"vocabulary entries, got {t_row:g} in {where}."
                )
        elif name == "short":
            msg = (
                f"Expected the stored teacher probabilities to sum to 1 where the ids cover "
                f"all {v} vocabulary entries (log-space tolerance {tol:g}), got "
                f"{math.exp(float(a_sum[pos])):.6g} in {where}."
            )
        else:  # "empty"
            msg = (
                "Expected at least one stored entry with probability > 0 in every kept "
                "token for tail='renormalize' (the renormalised teacher is undefined "
                f"otherwise), got none in {where}."
            )
        raise ValueError(msg)


def _raise_student_fault(tail: str, bad: torch.Tensor, tokens: tuple[int, ...]) -> None:
    where = _where(tokens, _first(bad)[0])
    if tail == "tail_bucket":
        raise ValueError(
            "Expected student logits with at least one entry > -inf in every kept token, got "
            f"only -inf in {where}."
        )
    raise ValueError(
        "Expected the student to give probability > 0 to at least one of the teacher's ids in "
        "every kept token for tail='renormalize' (the student renormalised over them is "
        f"undefined), got -inf logits at all of them in {where}."
    )


def _teacher_renormalized(
    x: torch.Tensor, live: torch.Tensor, keep: torch.Tensor | None, t: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(log_probs / T)`` over the live entries, and the updated ``live``."""
    if keep is not None and x.shape[1]:
        # masked rows: a one-point distribution on entry 0, for teacher and student alike
        first = torch.arange(x.shape[1], device=x.device) == 0
        live = torch.where(keep[:, None], live, first)
        x = torch.where(keep[:, None], x, torch.where(first, 0.0, -INF))
    return torch.log_softmax(x / t if t != 1.0 else x, dim=-1), live


def _teacher_tail_bucket(
    x: torch.Tensor, a_sum: torch.Tensor, empty: torch.Tensor, tol: float
) -> torch.Tensor:
    """Teacher log-probabilities of the K ids and of the tail bucket, ``log(1 − Σp)``.

    Mass above 1 within tolerance is rounding, and so is a remainder within tolerance when the
    tail bucket is empty for the student (the ids cover the vocabulary, or the student rules
    out every other id with -inf logits): there the tail is exactly 0 and the K entries are
    scaled to sum to 1, so that every kind stays a divergence (≥ 0) and a rounding remainder
    cannot make KL infinite. Never a clamped ``log(1 − Σp)``. Selected per row with ``where``
    (no host branch).
    """
    closed = (a_sum > 0) | (empty & (a_sum >= -tol))
    shift = torch.where(closed, a_sum, 0.0)
    a_k = torch.where(closed[:, None], x - shift[:, None], x)
    a_tail = torch.where(closed, -INF, _log1mexp(torch.where(closed, -1.0, a_sum)))
    return torch.cat([a_k, a_tail[:, None]], dim=-1)


def _teacher_stored_tail(
    x: torch.Tensor, tail: torch.Tensor, keep: torch.Tensor | None
) -> torch.Tensor:
    """Teacher log-probabilities of the K ids and of the stored tail bucket, normalised to sum
    to 1: ``[x, tail] − logsumexp([x, tail])``. The normalisation removes only the rounding of
    the stored values; nothing is clamped. Masked rows get a point mass on the bucket (their
    stored tail may be anything, NaN included)."""
    if keep is not None:
        tail = torch.where(keep, tail, 0.0)
    a = torch.cat([x, tail[:, None]], dim=-1)
    total = torch.logsumexp(a, dim=-1)
    # a kept row with no mass at all breaks the rules (NaN below); -inf - -inf must not be NaN
    # in rows that are valid
    total = torch.where(total == -INF, 0.0, total)
    return a - total[:, None]


def _student_tail_bucket(
    z: torch.Tensor,
    idx: torch.Tensor,
    live: torch.Tensor,
    keep: torch.Tensor | None,
    cdtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student log-probabilities of the K ids and of the bucket of all other ids, where that
    bucket is empty for the student (probability exactly 0), and the kept rows where the
    student has no mass at all (only -inf logits)."""
    n, v = z.shape
    # One [N, V + 1] copy in the compute dtype: the K ids are set to -inf in it, so its
    # logsumexp is the mass outside them, summed directly (no 1 − Σq cancellation); column V
    # receives the padding entries' writes.
    zm = torch.empty((n, v + 1), dtype=cdtype, device=z.device)
    zm[:, v] = -INF
    zm[:, :v] = z
    if keep is not None:
        zm.masked_fill_(~keep[:, None], 0.0)  # garbage (NaN) in masked rows must not reach autograd
    zm.scatter_(1, torch.where(live, idx, v), -INF)
    with torch.no_grad():
        dead = zm.amax(dim=-1) == -INF  # nothing outside the ids: logsumexp's gradient is NaN
    zm[:, v].masked_fill_(dead, 0.0)
    lse_out = torch.where(dead, -INF, torch.logsumexp(zm, dim=-1))
    # gathered from the input, not from zm: gather keeps its source for backward
    zk = torch.where(live, z.gather(1, torch.where(live, idx, 0)).to(cdtype), -INF)
    lse_in = _lse(zk)
    fault = (lse_in == -INF) & dead
    if keep is not None:
        fault = fault & keep
    log_z = torch.logaddexp(lse_in, lse_out)
    b_k = torch.where(live, zk - log_z[:, None], -INF)
    return torch.cat([b_k, (lse_out - log_z)[:, None]], dim=-1), dead, fault


def _student_renormalized(
    z: torch.Tensor,
    idx: torch.Tensor,
    live: torch.Tensor,
    keep: torch.Tensor | None,
    t: float,
    cdtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log-probabilities conditioned on the teacher's ids: softmax of ``z_ids / T``;
    and the kept rows where the student gives probability 0 to every id."""
    gather_at = torch.where(live, idx, 0)
    if keep is not None:  # masked rows' ids may be anything, out of range included
        gather_at = torch.where(keep[:, None], gather_at, 0)
    zk = z.gather(1, gather_at).to(cdtype)
    if keep is not None:
        zk = torch.where(keep[:, None], zk, 0.0)
    zk = torch.where(live, zk / t if t != 1.0 else zk, -INF)
    fault = ~(live & ~torch.isneginf(zk)).any(-1)
    if keep is not None:
        fault = fault & keep
    return torch.log_softmax(zk, dim=-1), fault
