"""Validation: static facts checked eagerly, value checks only when asked for (``check=True``).

Static checks look at Python values, shapes and dtypes only, so they cost nothing and work under
``jax.jit``, ``vmap`` and ``torch.compile``. Value checks read the data, so they are opt-in,
eager only, and name the first offending distribution.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from . import _namespace as ns
from ._defaults import FORMS, REDUCTIONS

__all__ = [
    "check_forms",
    "check_reduction",
    "check_axis",
    "check_unit_interval",
    "check_temperature",
    "check_num_items",
    "distribution_shape",
    "check_values",
]


def _quote(options: tuple[str, ...]) -> str:
    return ", ".join(repr(o) for o in options)


def check_forms(form: Any) -> tuple[str, str]:
    """Normalise ``form`` to a ``(form_p, form_q)`` pair."""
    pair = form if isinstance(form, tuple | list) else (form, form)
    if len(pair) != 2:
        raise ValueError(
            f"Expected `form` to be one of {_quote(FORMS)} or a pair of them, got {form!r}."
        )
    for side, f in zip("pq", pair, strict=True):
        if f not in FORMS:
            hint = ""
            if f in ("from_logits", "logit", "log_softmax", "log"):
                hint = " ('logits' are unnormalised scores; 'log_probs' are log-softmax outputs)"
            raise ValueError(
                f"Expected `form` for {side} to be one of {_quote(FORMS)}, got {f!r}{hint}."
            )
    return pair[0], pair[1]


def check_reduction(reduction: Any) -> str:
    if reduction in REDUCTIONS:
        return reduction
    hint = ""
    if reduction == "batchmean":
        hint = (
            " (kldiv's 'mean' already is the mean over distributions of the summed divergence, "
            "which is what PyTorch calls 'batchmean' for 2-D input; use 'mean')"
        )
    elif reduction in ("elementwise_mean", "sum_over_batch_size", "auto"):
        hint = " (use 'mean': the mean over distributions, never over classes)"
    raise ValueError(
        f"Expected `reduction` to be one of {_quote(REDUCTIONS)}, got {reduction!r}{hint}."
    )


def check_axis(axis: Any, ndim: int) -> int:
    """Return the non-negative category axis."""
    if ndim == 0:
        raise ValueError(
            "Expected `p` and `q` to have at least 1 dimension (the category axis), got 0-d "
            "arrays. A single probability is not a distribution; for a Bernoulli pass "
            "[p, 1 - p] along the last axis."
        )
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"Expected `axis` to be an int, got {type(axis).__name__}.")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"Expected `axis` to be in [{-ndim}, {ndim - 1}] for {ndim}-d inputs, got {axis}."
        )
    return int(axis) % ndim


def check_unit_interval(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise TypeError(f"Expected `{name}` to be a Python float in [0, 1], got {value!r}.")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"Expected `{name}` to be in [0, 1], got {value!r}.")
    return float(value)


def check_temperature(temperature: Any, forms: tuple[str, str]) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float | np.floating):
        raise TypeError(f"Expected `temperature` to be a positive float, got {temperature!r}.")
    t = float(temperature)
    if not (t > 0.0 and math.isfinite(t)):
        raise ValueError(f"Expected `temperature` to be finite and > 0, got {temperature!r}.")
    if t != 1.0 and forms != ("logits", "logits"):
        raise ValueError(
            f"Expected `form='logits'` for both sides when `temperature` is not 1, got "
            f"form={forms!r}. Temperature divides logits before the softmax; it has no "
            "unambiguous meaning for probabilities or log-probabilities, so kldiv refuses to "
            "guess. Temper those sides yourself, or pass logits."
        )
    return t


def check_num_items(num_items: Any, reduction: str) -> Any:
    if num_items is None:
        return None
    if reduction != "mean":
        raise ValueError(
            f"Expected `num_items` only with reduction='mean', got reduction={reduction!r}. "
            "`num_items` replaces the denominator of the mean."
        )
    if isinstance(num_items, bool):
        raise TypeError("Expected `num_items` to be a number or a 0-d array, got a bool.")
    if isinstance(num_items, int | float | np.number):
        if not (float(num_items) > 0 and math.isfinite(float(num_items))):
            raise ValueError(f"Expected `num_items` to be finite and > 0, got {num_items!r}.")
        return float(num_items)
    if getattr(num_items, "ndim", None) not in (0, None):
        raise ValueError(
            f"Expected `num_items` to be a scalar, got an array of shape {tuple(num_items.shape)}."
        )
    return num_items


def _broadcast(shapes: list[tuple[int, ...]], what: str) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ValueError(f"Expected {what} to be broadcastable, got shapes {shapes}.") from None


def distribution_shape(p: Any, q: Any, axis: Any) -> tuple[int, tuple[int, ...], int]:
    """Check that ``p`` and ``q`` agree; return ``(axis, batch_shape, num_categories)``.

    ``axis`` refers to the broadcast shape of ``p`` and ``q``; the batch shape is that shape
    without the category axis.
    """
    if p.ndim == 0 or q.ndim == 0:
        check_axis(axis, 0)
    ndim = max(p.ndim, q.ndim)
    ax = check_axis(axis, ndim)
    pshape = (1,) * (ndim - p.ndim) + tuple(p.shape)
    qshape = (1,) * (ndim - q.ndim) + tuple(q.shape)
    if pshape[ax] != qshape[ax]:
        raise ValueError(
            f"Expected `p` and `q` to have the same number of categories along axis {axis}, "
            f"got {pshape[ax]} and {qshape[ax]} (shapes {tuple(p.shape)} and {tuple(q.shape)})."
        )
    full = _broadcast([pshape, qshape], "the shapes of `p` and `q`")
    if full[ax] == 0:
        raise ValueError(
            f"Expected at least one category along axis {axis}, got shape {full}. An empty "
            "category axis is not a distribution (an empty batch is fine)."
        )
    return ax, full[:ax] + full[ax + 1 :], full[ax]


def check_row_array(name: str, a: Any, batch: tuple, xp: ModuleType, kind: str) -> None:
    """``mask`` (bool) and ``weight`` (float) are per distribution: broadcastable to the batch."""
    if kind == "mask" and not xp.isdtype(a.dtype, "bool"):
        raise TypeError(
            f"Expected `mask` to be a boolean array (True keeps a distribution), got dtype "
            f"{a.dtype}. For real-valued weights use `weight=`."
        )
    if kind == "weight" and not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(f"Expected `weight` to have a real floating dtype, got {a.dtype}.")
    shape = tuple(a.shape)
    try:
        ok = len(shape) <= len(batch) and np.broadcast_shapes(shape, batch) == batch
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"Expected `{name}` to be broadcastable to the batch shape {batch} (the input shape "
            f"without the category axis), got shape {shape}."
        )


def _first_bad(bad: np.ndarray) -> tuple[int, ...]:
    idx = np.argwhere(bad)[0]
    return tuple(int(i) for i in idx)


def check_values(
    xp: ModuleType,
    side: str,
    x: Any,
    form: str,
    axis: int,
    keep: Any | None,
    orig_dtype: Any,
) -> None:
    """Opt-in value checks. ``keep`` is the broadcast mask of rows that count (or None)."""
    if ns.is_traced(x):
        raise ValueError(
            "`check=True` reads the data and cannot run under jax.jit, vmap or torch.compile; "
            "run it once eagerly (e.g. on the first batch) and trace with check=False."
        )
    eps = float(np.finfo(np.float16).eps) if ns.is_half(orig_dtype) else ns.finfo_eps(xp, x.dtype)
    tol = max(math.sqrt(eps), 8 * eps * x.shape[axis])

    def fail(bad_rows: Any, what: str) -> None:
        bad = ns.to_host_bool(bad_rows)
        if keep is not None:
            kept = np.squeeze(ns.to_host_bool(keep), axis=axis)
            bad = bad & np.broadcast_to(kept, bad.shape)
        if bad.any():
            raise ValueError(
                f"`{side}` (form={form!r}) is not a valid distribution at batch index "
                f"{_first_bad(bad)}: {what}."
            )

    rowany = lambda m: xp.any(m, axis=axis)  # noqa: E731
    fail(rowany(xp.isnan(x)), "it contains NaN")
    if form == "probs":
        fail(rowany(x < 0), "it has negative probabilities")
        fail(
            xp.abs(xp.sum(x, axis=axis) - 1) > tol,
            f"its probabilities do not sum to 1 (tol {tol:.1e})",
        )
    elif form == "log_probs":
        fail(rowany(x > 0), "it has log-probabilities > 0")
        m = xp.max(x, axis=axis, keepdims=True)
        m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
        lse = xp.squeeze(m, axis=axis) + xp.log(xp.sum(xp.exp(x - m), axis=axis))
        fail(
            xp.abs(lse) > tol,
            f"its probabilities (exp of log_probs) do not sum to 1 (tol {tol:.1e})",
        )
    else:
        fail(rowany(x == math.inf), "it has a +inf logit")
        fail(xp.all(x == -math.inf, axis=axis), "all its logits are -inf (no category has mass)")
