"""The categorical divergence family: KL, reverse KL, generalised JS, skew KL, Jeffreys, TV.

Every function takes ``(p, q)`` in mathematical order and the same keywords; each is a few
lines over :mod:`kldiv._math`, where zero support is handled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from . import _check, _math, _spec
from . import _namespace as ns
from ._defaults import (
    AXIS,
    FORM,
    JS_BETA,
    REDUCTION,
    SKEW_ALPHA,
    TEMPERATURE,
    FormSpec,
    Kind,
    Reduction,
)
from ._reduce import reduce

__all__ = [
    "kl_div",
    "reverse_kl_div",
    "js_div",
    "skew_kl_div",
    "skew_reverse_kl_div",
    "symmetric_kl_div",
    "tv_distance",
    "divergence",
    "KINDS",
]

Array = Any

_SHARED_DOC = """
    Parameters
    ----------
    p, q : array
        NumPy, PyTorch or JAX arrays (one framework for both) whose ``axis`` holds the
        categories; all other axes index distributions and broadcast against each other.
        ``p`` is the reference (the target, the teacher), ``q`` the approximation (the model,
        the student).
    form : {"probs", "logits", "log_probs"} or a pair of them
        What the arrays hold. ``"logits"`` get a stable log-softmax along ``axis``. A pair
        gives ``p`` and ``q`` separately, e.g. ``("log_probs", "logits")``.
    axis : int
        The category axis (default -1).
    reduction : {"mean", "sum", "none"}
        ``"mean"`` (default) averages the per-distribution divergence over distributions (what
        PyTorch calls ``"batchmean"`` for 2-D input, a per-token mean for ``(B, T, V)``);
        ``"sum"`` sums it; ``"none"`` returns one value per distribution.
    mask : bool or 0/1 integer array, optional
        Per distribution (broadcastable, NumPy-style from the right, to the input shape without
        ``axis``: for a ``(B, T)`` batch pass ``(B, T)`` or ``(T,)``); False (or 0) drops the
        distribution from the value, the mean's denominator and the gradient. Masked rows may
        hold anything, NaN included. An all-masked batch gives 0. Integer masks such as
        Hugging Face's ``attention_mask`` give the same result as ``mask != 0``; values other
        than 0 and 1 raise ``ValueError`` naming the first one, checked eagerly only (under
        ``jax.jit``, ``vmap`` or ``torch.compile`` nothing reads the data, and any non-zero
        value keeps the distribution). Float masks raise ``TypeError``: use ``weight``.
    weight : float array, optional
        Per-distribution weights, multiplied in before reduction. ``"mean"`` still divides by
        the number of unmasked distributions; pass ``num_items`` for another denominator.
    num_items : float or 0-d array, optional
        Replaces the denominator of ``"mean"`` (the global count of valid tokens under
        gradient accumulation or data parallelism).
    temperature : float
        Divides logits before the softmax (both forms must be ``"logits"``). Never multiplies
        the result by ``temperature**2``.
    softcap, logit_scale : float or (teacher, student) pair, optional
        What a model's head does to its logits, applied before the temperature (the side's
        form must be ``"logits"``): ``z ↦ logit_scale·z``, then ``z ↦ softcap·tanh(z/softcap)``
        (Gemma-family soft-capping). One value applies to both sides; a pair to ``p`` and ``q``
        separately, None for neither. ``±inf`` logits stay ``±inf`` (zero probabilities stay
        zero, with zero gradient). The gradient is that of the composition.
    check : bool
        Validate the values (non-negative probabilities summing to 1, log-probabilities ≤ 0
        that normalise, no NaN) and raise naming the first bad distribution. Eager only.

    Returns
    -------
    array
        A 0-d array for ``"mean"``/``"sum"``, else the batch shape. Same framework and device
        as the inputs; dtype float32 for float16/bfloat16 inputs (computed and accumulated in
        float32), else the promoted input dtype.
"""


_F = TypeVar("_F", bound=Callable[..., Any])


def _doc(func: _F) -> _F:
    func.__doc__ = (func.__doc__ or "").rstrip() + "\n" + _SHARED_DOC
    return func


@dataclass(frozen=True)
class _Side:
    """One argument in log space; ``p`` is kept when it was given exactly (``"probs"``)."""

    lp: Array
    p: Array | None

    def probs(self, xp: ModuleType) -> Array:
        return self.p if self.p is not None else xp.exp(self.lp)


# Masked rows are overwritten before any arithmetic with values that are valid in every form
# (probabilities 1, logits 0, log-probabilities 0), so that garbage there, NaN included, can
# reach neither the value nor the gradient.
_MASK_FILL = {"probs": 1.0, "logits": 0.0, "log_probs": 0.0}


def _lift(xp: ModuleType, x: Array, ndim: int) -> Array:
    """Prepend unit axes so every array has ``ndim`` dimensions (a view, no copy)."""
    return x if x.ndim == ndim else xp.reshape(x, (1,) * (ndim - x.ndim) + tuple(x.shape))


def _fill(xp: ModuleType, x: Array, dtype: Any, keep: Any, form: str) -> Array:
    """``x`` in the compute dtype, masked rows overwritten (:data:`_MASK_FILL`)."""
    if x.dtype != dtype:
        x = xp.astype(x, dtype)
    return x if keep is None else xp.where(keep, x, _MASK_FILL[form])


def _side(xp: ModuleType, x: Array, form: str, axis: int, dtype: Any, keep: Any, t: float) -> _Side:
    x = _fill(xp, x, dtype, keep, form)
    if form == "probs":
        return _Side(_math.safe_log(xp, x), x)
    if form == "logits":
        return _Side(_math.log_softmax(xp, x / t if t != 1.0 else x, axis), None)
    return _Side(x, None)


def _evaluate(
    kind: str,
    p: Array,
    q: Array,
    *,
    form: Any,
    axis: int,
    reduction: str,
    mask: Array | None,
    weight: Array | None,
    num_items: Any,
    temperature: float,
    check: bool,
    softcap: Any = None,
    logit_scale: Any = None,
    **params: float,
) -> Array:
    forms = _check.check_forms(form)
    reduction = _check.check_reduction(reduction)
    num_items = _check.check_num_items(num_items, reduction)
    t = _check.check_temperature(temperature, forms)
    maps = _check.check_logit_maps(softcap, logit_scale, forms)
    check = _check.check_flag("check", check)
    xp, (p, q, mask, weight) = ns.namespace(p, q, mask, weight, names=("p", "q", "mask", "weight"))
    # dtypes before shapes: integer labels passed as `q` should hear that, not about shapes
    dtype = ns.compute_dtype(xp, ("p", p), ("q", q))
    if num_items is not None and not isinstance(num_items, float):
        ns.namespace(p, num_items, names=("p", "num_items"))
        num_items = xp.astype(num_items, dtype)  # a float64 count must not promote the result
    ax, batch, _ = _check.distribution_shape(p, q, axis)
    p, q = _lift(xp, p, len(batch) + 1), _lift(xp, q, len(batch) + 1)
    keep = None
    if mask is not None:
        mask = _check.as_mask("mask", mask, batch, weights_hint="`weight=`")
        mask = _lift(xp, mask, len(batch))
        keep = xp.expand_dims(mask, axis=ax)
    if weight is not None:
        _check.check_row_array("weight", weight, batch, xp, "weight")
        weight = xp.astype(weight, dtype)
    if check:
        for name, x, f in (("p", p, forms[0]), ("q", q, forms[1])):
            _check.check_values(xp, name, x, f, ax, keep)
    if not maps[0].identity:  # masked rows filled first: their NaN must not reach tanh's grad
        p = _spec.apply_map(xp, _fill(xp, p, dtype, keep, "logits"), maps[0])
    if not maps[1].identity:
        q = _spec.apply_map(xp, _fill(xp, q, dtype, keep, "logits"), maps[1])
    if "probs" not in forms and ax == len(batch) and ns.backend_name(xp) == "torch":
        # The row engine (C kernel, Triton, chunked tensor code) where it gives exactly these
        # semantics; it declines (None) whatever only the core decides exactly.
        from .torch._rows.dispatch import engine_rows

        values = engine_rows(kind, p, q, mask, t, params, forms)
        if values is not None:
            return reduce(
                xp,
                values,
                batch,
                reduction=reduction,
                mask=mask,
                weight=weight,
                num_items=num_items,
            )
    if forms == ("logits", "logits") and ax == len(batch) and ns.backend_name(xp) == "jax":
        # The JAX row engine: the row specification as one rule from the logits, whose
        # backward pass recomputes from the inputs rather than keeping [N, V] residuals.
        from . import _rows_jax

        p, q = (_fill(xp, x, dtype, keep, "logits") for x in (p, q))
        w = next(iter(params.values()), 0.5)
        values = _rows_jax.rows(kind, p, q, w, t)
        return reduce(
            xp, values, batch, reduction=reduction, mask=mask, weight=weight, num_items=num_items
        )
    P = _side(xp, p, forms[0], ax, dtype, keep, t)
    Q = _side(xp, q, forms[1], ax, dtype, keep, t)
    values = _ROWS[kind](xp, P, Q, ax, **params)
    return reduce(
        xp, values, batch, reduction=reduction, mask=mask, weight=weight, num_items=num_items
    )


def _kl_rows(xp: ModuleType, P: _Side, Q: _Side, axis: int) -> Array:
    return _math.kl_rows(xp, P.lp, Q.lp, P.p, axis)


def _js_rows(xp: ModuleType, P: _Side, Q: _Side, axis: int, beta: float) -> Array:
    # beta·KL(P‖M) = Σ (beta·p)·log((beta·p)/(beta·m)): folding beta into both log arguments
    # makes the beta = 0 endpoint an exact zero-probability term (0, not 0·inf = NaN).
    lm = _math.log_mix(xp, P.lp, Q.lp, beta, P.p, Q.p)
    parts = []
    for w, S in ((beta, P), (1.0 - beta, Q)):
        if w > 0.0:
            lw = math.log(w)
            sp = None if S.p is None else S.p * w
            parts.append(_math.kl_rows(xp, S.lp + lw, lm + lw, sp, axis))
    if len(parts) == 2:
        return parts[0] + parts[1]
    # at beta ∈ {0, 1} the divergence is identically 0 and one side drops out of the formula
    return parts[0] + _zero_of(xp, Q if beta == 1.0 else P, axis)


def _skew_rows(xp: ModuleType, P: _Side, Q: _Side, axis: int, alpha: float) -> Array:
    lm = _math.log_mix(xp, P.lp, Q.lp, alpha, P.p, Q.p)
    rows = _math.kl_rows(xp, P.lp, lm, P.p, axis)
    return rows + _zero_of(xp, Q, axis) if alpha == 1.0 else rows


def _zero_of(xp: ModuleType, S: _Side, axis: int) -> Array:
    """An exact 0 per row that depends on ``S``: a side that drops out of a formula (at a
    weight's endpoint) still gets its gradient, 0, rather than none, so ``backward()`` works
    when only that side requires a gradient."""
    lp = S.lp if S.p is None else S.p
    return xp.sum(xp.where(xp.isfinite(lp), lp, 0.0) * 0.0, axis=axis)


def _tv_rows(xp: ModuleType, P: _Side, Q: _Side, axis: int) -> Array:
    diff = P.probs(xp) - Q.probs(xp)
    # |d| with slope 0 where d = 0 in every framework (JAX's abs has slope 1 there).
    return 0.5 * xp.sum(xp.where(diff == 0, 0.0, xp.abs(diff)), axis=axis)


def _swap(rows: Callable[..., Array]) -> Callable[..., Array]:
    return lambda xp, P, Q, axis, **kw: rows(xp, Q, P, axis, **kw)


def _symmetric_rows(xp: ModuleType, P: _Side, Q: _Side, axis: int) -> Array:
    return _kl_rows(xp, P, Q, axis) + _kl_rows(xp, Q, P, axis)


_ROWS: dict[str, Callable[..., Array]] = {
    "kl": _kl_rows,
    "reverse_kl": _swap(_kl_rows),
    "js": _js_rows,
    "skew_kl": _skew_rows,
    "skew_reverse_kl": _swap(_skew_rows),
    "symmetric_kl": _symmetric_rows,
    "tv": _tv_rows,
}
"""Each kind's rows in the core: the definition every engine is tested against."""


@_doc
def kl_div(
    p: Array,
    q: Array,
    *,
    form: FormSpec = FORM,
    axis: int = AXIS,
    reduction: Reduction = REDUCTION,
    mask: Array | None = None,
    weight: Array | None = None,
    num_items: Any = None,
    temperature: float = TEMPERATURE,
    softcap: Any = None,
    logit_scale: Any = None,
    check: bool = False,
) -> Array:
    """KL(P‖Q) = Σ p·(log p − log q), the forward (mean-covering) Kullback–Leibler divergence.

    In distillation ``p`` is the teacher and ``q`` the student: minimising over ``q`` makes the
    student cover every category the teacher gives mass to.

    Zero support is exact: terms with ``p = 0`` are 0 (whatever ``q``), ``p > 0`` where
    ``q = 0`` gives ``+inf``; ``-inf`` logits are zero probabilities. Gradients are finite for
    both arguments wherever the value is finite; at ``p = 0`` the gradient with respect to
    ``p`` and ``q`` is 0 (``torch.nn.functional.kl_div`` gives NaN for ``p`` there).

    >>> import numpy as np, kldiv
    >>> p = np.array([0.2, 0.5, 0.2, 0.1]); q = np.array([0.3, 0.4, 0.1, 0.2])
    >>> round(float(kldiv.kl_div(p, q)), 6)
    0.099793
    """
    return _evaluate(
        "kl",
        p,
        q,
        form=form,
        axis=axis,
        reduction=reduction,
        mask=mask,
        weight=weight,
        num_items=num_items,
        temperature=temperature,
        softcap=softcap,
        logit_scale=logit_scale,
        check=check,
    )


@_doc
def reverse_kl_div(
    p: Array,
    q: Array,
    *,
    form: FormSpec = FORM,
    axis: int = AXIS,
    reduction: Reduction = REDUCTION,
    mask: Array | None = None,
    weight: Array | None = None,
    num_items: Any = None,
    temperature: float = TEMPERATURE,
    softcap: Any = None,
    logit_scale: Any = None,
    check: bool = False,
) -> Array:
    """KL(Q‖P) = Σ q·(log q − log p), the reverse (mode-seeking) divergence.

    Same argument order as :func:`kl_div` (``p`` the teacher/target, ``q`` the student/model);
    only the direction differs. Terms with ``q = 0`` are 0; ``q > 0`` where ``p = 0`` is
    ``+inf``. Gradient at ``q = 0`` is 0 for both arguments.

    >>> import numpy as np, kldiv
    >>> p = np.array([0.0, 0.9, 0.0, 0.1]); q = np.array([0.2, 0.5, 0.2, 0.1])
    >>> float(kldiv.reverse_kl_div(p, q))
    inf
    """
    return _evaluate(
        "reverse_kl",
        p,
        q,
        form=form,
        axis=axis,
        reduction=reduction,
        mask=mask,
        weight=weight,
        num_items=num_items,
        temperature=temperature,
        softcap=softcap,
        logit_scale=logit_scale,
        check=check,
    )


@_doc
def js_div(
    p: Array,
    q: Array,
    *,
    beta: float = JS_BETA,
    form: FormSpec = FORM,
    axis: int = AXIS,
    reduction: Reduction = REDUCTION,
    mask: Array | None = None,
    weight: Array | None = None,
    num_items: Any = None,
    temperature: float = TEMPERATURE,
    softcap: Any = None,
    logit_scale: Any = None,
    check: bool = False,
) -> Array:
    """Generalised Jensen–Shannon divergence β·KL(P‖M) + (1−β)·KL(Q‖M), M = β·P + (1−β)·Q.

    ``beta=0.5`` (default) is the symmetric JSD, bounded by log 2. It is finite for every
    ``beta`` in [0, 1] even when the supports differ, continuous in ``beta``, and exactly 0 at
    ``beta = 0`` and ``beta = 1`` (where M equals Q or P), with gradients finite everywhere.
    Note ``js_div(p, q, beta=b) == js_div(q, p, beta=1 - b)``.

    >>> import numpy as np, kldiv
    >>> p = np.array([1.0, 0.0]); q = np.array([0.0, 1.0])
    >>> bool(np.isclose(kldiv.js_div(p, q), np.log(2)))
    True
    """
    beta = _check.check_unit_interval("beta", beta)
    return _evaluate(
        "js",
        p,
        q,
        form=form,
        axis=axis,
        reduction=reduction,
        mask=mask,
        weight=weight,
        num_items=num_items,
        temperature=temperature,
        softcap=softcap,
        logit_scale=logit_scale,
        check=check,
        beta=beta,
    )


@_doc
def skew_kl_div(
    p: Array,
    q: Array,
    *,
    alpha: float = SKEW_ALPHA,
    form: FormSpec = FORM,
    axis: int = AXIS,
    reduction: Reduction = REDUCTION,
    mask: Array | None = None,
    weight: Array | None = None,
    num_items: Any = None,
    temperature: float = TEMPERATURE,
    softcap: Any = None,
    logit_scale: Any = None,
    check: bool = False,
) -> Array:
    """Skew KL: KL(P ‖ α·P + (1−α)·Q).

    Mixing a little of ``p`` into ``q`` keeps the divergence finite (≤ −log α) where ``q`` has
    no mass; ``alpha=0`` is :func:`kl_div`, ``alpha=1`` is 0. ``alpha`` in [0, 1]. Terms with
    ``p = 0`` are 0 with zero gradient; for ``0 < alpha`` value and gradients are finite for
    any supports.

    >>> import numpy as np, kldiv
    >>> p = np.array([0.5, 0.5]); q = np.array([1.0, 0.0])
    >>> bool(np.isfinite(kldiv.skew_kl_div(p, q, alpha=0.1)))
    True
    """
    alpha = _check.check_unit_interval("alpha", alpha)
    return _evaluate(
        "skew_kl",
        p,
        q,
        form=form,
        axis=axis,
        reduction=reduction,
        mask=mask,
        weight=weight,
        num_items=num_items,
        temperature=temperature,
        softcap=softcap,
        logit_scale=logit_scale,
        check=check,
        alpha=alpha,
    )


@_doc
def skew_reverse_kl_div(
    p: Array,
    q: Array,
    *,
    alpha: float = SKEW_ALPHA,
    form: FormSpec = FORM,
    axis: int = AXIS,
    reduction: Reduction = REDUCTION,
    mask: Array | None = None,
    weight: Array | None = None,
    num_items: Any = None,
    temperature: float = TEMPERATURE,
    softcap: Any = None,
    logit_scale: Any = None,
    check: bool = False,
) -> Array:
    """Skew reverse KL: KL(Q ‖ α·Q + (1−α)·P).

    :func:`skew_kl_div` with the roles of ``p`` and ``q`` exchanged; ``alpha=0`` is
    :func:`reverse_kl_div`, ``alpha=1`` is 0. Terms with ``q = 0`` are 0 with zero gradient;
    for ``0 < alpha`` value and gradients are finite for any supports.

    >>> import numpy as np, kldiv
    >>> p = np.array([1.0, 0.0]); q = np.array([0.5, 0.5])
    >>> bool(np.isfinite(kldiv.skew_reverse_kl_div(p, q)))
    True
    """
    alpha = _check.check_unit_interval("alpha", alpha)
    return _evaluate(
        "skew_reverse_kl",
        p,
        q,
        form=form,
        axis=axis,
        reduction=reduction,
        mask=mask,
        weight=weight,
        num_items=num_items,
        temperature=temperature,
        softcap=softcap,
        logit_scale=logit_scale,
        check=check,
        alpha=alpha,
    )


@_doc
def symmetric_kl_div(
    p: Array,
    q: Array,
    *,
    form: FormSpec = FORM,
    axis: int = AXIS,
    reduction: Reduction = REDUCTION,
    mask: Array | None = None,
    weight: Array | None = None,
    num_items: Any = None,
    temperature: float = TEMPERATURE,
    softcap: Any = None,
    logit_scale: Any = None,
    check: bool = False,
) -> Array:
    """Jeffreys divergence KL(P‖Q) + KL(Q‖P): symmetric, +inf unless the supports agree.

    Where both ``p = 0`` and ``q = 0`` the category contributes 0, with zero gradient.

    >>> import numpy as np, kldiv
    >>> p = np.array([0.2, 0.8]); q = np.array([0.8, 0.2])
    >>> bool(np.isclose(kldiv.symmetric_kl_div(p, q), 2 * kldiv.kl_div(p, q)))
    True
    """
    return _evaluate(
        "symmetric_kl",
        p,
        q,
        form=form,
        axis=axis,
        reduction=reduction,
        mask=mask,
        weight=weight,
        num_items=num_items,
        temperature=temperature,
        softcap=softcap,
        logit_scale=logit_scale,
        check=check,
    )


@_doc
def tv_distance(
    p: Array,
    q: Array,
    *,
    form: FormSpec = FORM,
    axis: int = AXIS,
    reduction: Reduction = REDUCTION,
    mask: Array | None = None,
    weight: Array | None = None,
    num_items: Any = None,
    temperature: float = TEMPERATURE,
    softcap: Any = None,
    logit_scale: Any = None,
    check: bool = False,
) -> Array:
    """Total variation distance ½·Σ|p − q|, in [0, 1]; bounded by √(KL/2) (Pinsker).

    The gradient of ``|p − q|`` where ``p = q`` is taken as 0.

    >>> import numpy as np, kldiv
    >>> float(kldiv.tv_distance(np.array([1.0, 0.0]), np.array([0.25, 0.75])))
    0.75
    """
    return _evaluate(
        "tv",
        p,
        q,
        form=form,
        axis=axis,
        reduction=reduction,
        mask=mask,
        weight=weight,
        num_items=num_items,
        temperature=temperature,
        softcap=softcap,
        logit_scale=logit_scale,
        check=check,
    )


KINDS: dict[str, Callable[..., Array]] = {
    "kl": kl_div,
    "reverse_kl": reverse_kl_div,
    "js": js_div,
    "skew_kl": skew_kl_div,
    "skew_reverse_kl": skew_reverse_kl_div,
    "symmetric_kl": symmetric_kl_div,
    "tv": tv_distance,
}
"""The divergence family by name, as :func:`divergence` and the ``kind=`` options accept it."""


def divergence(p: Array, q: Array, kind: Kind = "kl", **kwargs: Any) -> Array:
    """Dispatch by name, for configuration files: ``divergence(p, q, "js", beta=0.3)``.

    ``kind`` is one of ``"kl"``, ``"reverse_kl"``, ``"js"``, ``"skew_kl"``,
    ``"skew_reverse_kl"``, ``"symmetric_kl"``, ``"tv"``; the keywords are those of the
    function it names (``beta`` only for ``"js"``, ``alpha`` only for the skew kinds).

    >>> import numpy as np, kldiv
    >>> p = np.array([0.2, 0.8]); q = np.array([0.5, 0.5])
    >>> bool(kldiv.divergence(p, q, "reverse_kl") == kldiv.kl_div(q, p))
    True
    """
    try:
        func = KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(
            f"Expected `kind` to be one of {', '.join(map(repr, KINDS))}, got {kind!r}."
        ) from None
    return func(p, q, **kwargs)
