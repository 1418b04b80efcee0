"""Validation: static facts checked eagerly, value checks only when asked for (``check=True``).

Static checks look at Python values, shapes and dtypes only, so they cost nothing and work under
``jax.jit``, ``vmap`` and ``torch.compile``. Value checks read the data, so they are opt-in,
eager only, and name the first offending distribution. One value check runs by default:
integer masks must hold only 0 and 1 (:func:`as_mask`), and only where the data is concrete.
"""

from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Any

import numpy as np

from . import _namespace as ns
from ._defaults import FORMS, REDUCTIONS, Form, Reduction

__all__ = [
    "check_forms",
    "check_reduction",
    "check_axis",
    "check_unit_interval",
    "check_temperature",
    "check_num_items",
    "distribution_shape",
    "check_values",
    "as_mask",
]


def _quote(options: tuple[str, ...]) -> str:
    return ", ".join(repr(o) for o in options)


def check_forms(form: Any) -> tuple[Form, Form]:
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


def check_reduction(reduction: Any) -> Reduction:
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


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_unit_interval(name: str, value: Any) -> float:
    if not is_real(value):
        raise TypeError(f"Expected `{name}` to be a Python float in [0, 1], got {value!r}.")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"Expected `{name}` to be in [0, 1], got {value!r}.")
    return float(value)


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"Expected `{name}` to be True or False, got {value!r}.")
    return bool(value)


def check_temperature(temperature: Any, forms: tuple[str, str]) -> float:
    if not is_real(temperature):
        raise TypeError(f"Expected `temperature` to be a positive float, got {temperature!r}.")
    t = float(temperature)
    # comparisons, not math.isfinite: under torch.compile t can be a SymFloat (NaN fails both)
    if not (0.0 < t < math.inf):
        raise ValueError(f"Expected `temperature` to be finite and > 0, got {temperature!r}.")
    if t != 1.0 and forms != ("logits", "logits"):
        raise ValueError(
            f"Expected `form='logits'` for both sides when `temperature` is not 1, got "
            f"form={forms!r}. Temperature divides logits before the softmax; it has no "
            "unambiguous meaning for probabilities or log-probabilities, so kldiv refuses to "
            "guess. Temper those sides yourself, or pass logits."
        )
    return t


def _positive(name: str, value: Any, side: str) -> float | None:
    if value is None:
        return None
    if not is_real(value):
        raise TypeError(f"Expected `{name}`{side} to be None or a positive float, got {value!r}.")
    v = float(value)
    if not (0.0 < v < math.inf):
        raise ValueError(f"Expected `{name}`{side} to be None or finite and > 0, got {value!r}.")
    return v


def _per_side(name: str, value: Any) -> tuple[Any, Any]:
    """A value for both sides, or a ``(teacher, student)`` pair."""
    if isinstance(value, tuple | list):
        if len(value) != 2:
            raise ValueError(
                f"Expected `{name}` to be one value for both sides or a (teacher, student) "
                f"pair, got {value!r}."
            )
        return value[0], value[1]
    return value, value


def check_logit_maps(softcap: Any, logit_scale: Any, forms: tuple[str, str]) -> tuple[Any, Any]:
    """``(teacher, student)`` :class:`kldiv._spec.LogitMap` from ``softcap`` and
    ``logit_scale`` (each None, a positive float for both sides, or a ``(teacher, student)``
    pair), refused for a side whose form is not ``"logits"``."""
    from ._spec import IDENTITY, LogitMap

    caps, scales = _per_side("softcap", softcap), _per_side("logit_scale", logit_scale)
    paired = any(isinstance(x, tuple | list) for x in (softcap, logit_scale))
    maps = []
    for i, side in enumerate(("teacher", "student")):
        where = f" ({side})" if paired else ""
        cap = _positive("softcap", caps[i], where)
        scale = _positive("logit_scale", scales[i], where)
        m = LogitMap(1.0 if scale is None else scale, cap)
        if cap is not None and not (2.0**-100 <= m.scale / cap <= 2.0**100):
            raise ValueError(
                f"Expected `logit_scale`/`softcap`{where} within 2^±100 (the map computes "
                f"tanh(logit_scale/softcap · z) in float32), got {m.scale}/{cap}."
            )
        if not m.identity and forms[i] != "logits":
            raise ValueError(
                f"Expected form='logits' for the {side} with `softcap` or `logit_scale`, got "
                f"{forms[i]!r}: they transform logits before the softmax."
            )
        maps.append(IDENTITY if m.identity else m)
    return maps[0], maps[1]


def check_num_items(num_items: Any, reduction: str) -> Any:
    if num_items is None:
        return None
    if reduction != "mean":
        raise ValueError(
            f"Expected `num_items` only with reduction='mean', got reduction={reduction!r}. "
            "`num_items` replaces the denominator of the mean."
        )
    if isinstance(num_items, bool) or isinstance(num_items, str | bytes | list | tuple):
        raise TypeError(
            f"Expected `num_items` to be a number or a 0-d array, got {type(num_items).__name__}."
        )
    if is_real(num_items):
        if not (float(num_items) > 0 and math.isfinite(float(num_items))):
            raise ValueError(f"Expected `num_items` to be finite and > 0, got {num_items!r}.")
        return float(num_items)
    if getattr(num_items, "ndim", None) != 0:
        shape = getattr(num_items, "shape", None)
        raise ValueError(
            f"Expected `num_items` to be a scalar or a 0-d array, got "
            f"{'shape ' + str(tuple(shape)) if shape is not None else type(num_items).__name__}."
        )
    return num_items


def broadcast(shapes: list[tuple[int, ...]], what: str) -> tuple[int, ...]:
    if any(d is None for s in shapes for d in s):
        return _broadcast_symbolic(shapes, what)
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ValueError(f"Expected {what} to be broadcastable, got shapes {shapes}.") from None


def _broadcast_symbolic(shapes: list[tuple[Any, ...]], what: str) -> tuple[Any, ...]:
    """Broadcasting where ``None`` is a dimension not known yet (TensorFlow graph tracing):
    it matches anything and stays ``None`` unless the other side knows the size."""
    ndim = max(len(s) for s in shapes)
    out: list[Any] = []
    for dims in zip(*[(1,) * (ndim - len(s)) + tuple(s) for s in shapes], strict=True):
        known = {d for d in dims if d is not None and d != 1}
        if len(known) > 1:
            raise ValueError(f"Expected {what} to be broadcastable, got shapes {shapes}.")
        out.append(known.pop() if known else (None if None in dims else 1))
    return tuple(out)


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
    full = broadcast([pshape, qshape], "the shapes of `p` and `q`")
    if full[ax] == 0:
        raise ValueError(
            f"Expected at least one category along axis {axis}, got shape {full}. An empty "
            "category axis is not a distribution (an empty batch is fine)."
        )
    return ax, full[:ax] + full[ax + 1 :], full[ax]


def check_row_array(name: str, a: Any, batch: tuple, xp: ModuleType, kind: str) -> None:
    """``weight`` (float) is per distribution: broadcastable to the batch. (Masks go through
    :func:`as_mask`, which also makes integer masks boolean.)"""
    if kind == "weight" and not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(f"Expected `weight` to have a real floating dtype, got {a.dtype}.")
    check_row_shape(name, a, batch)


def check_row_shape(name: str, a: Any, batch: tuple) -> None:
    """A per-distribution array must broadcast to ``batch`` without growing it."""
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


_INTEGER_DTYPES = frozenset(
    ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
)


def _check_mask_dtype(name: str, a: Any, weights_hint: str | None) -> bool:
    """Return whether ``a`` is an integer mask; raise ``TypeError`` unless bool or integer.

    Checked by dtype name, which NumPy, PyTorch, JAX and TensorFlow dtypes all give (the
    Keras stand-in namespace has no "integral" kind). ``weights_hint`` names the caller's
    argument for real-valued weights, or is None where the caller has none, so that the
    message never points to an argument that does not exist.
    """
    dtype = ns._dtype_name(a.dtype)
    if dtype == "bool":
        return False
    if dtype in _INTEGER_DTYPES:
        return True
    hint = (
        f" For real-valued weights use {weights_hint}."
        if weights_hint
        else f" Convert it explicitly, e.g. `{name} > 0`, if that is what it means."
    )
    raise TypeError(
        f"Expected `{name}` to be a boolean array or an integer array of 0 and 1 (True or 1 "
        f"keeps an entry), got dtype {dtype}.{hint}"
    )


def as_mask(
    name: str, a: Any, batch: tuple | None = None, *, weights_hint: str | None = None
) -> Any:
    """A keep-mask as booleans: the one place where integer masks become ``mask != 0``.

    Boolean masks pass through untouched. Integer masks (Hugging Face's ``attention_mask``,
    int64 0/1) must hold only 0 and 1: a 2 or a -1 is more likely a label or an index passed
    by mistake than a mask. That check reads the data, so it runs only where the data is
    concrete: NumPy arrays, PyTorch tensors that can be read (not under ``torch.compile``,
    ``torch.func.vmap`` or CUDA graph capture, not fake or on the meta device) and JAX arrays
    that are not tracers (under ``jax.jit``/``vmap``/``grad`` the mask is a tracer). There,
    and for TensorFlow tensors, nothing value-dependent runs (DESIGN §1) and any non-zero
    value keeps the entry. Eagerly on an accelerator the check costs one device-to-host
    synchronisation per call; boolean masks never pay it. Float masks raise ``TypeError``
    (pointing to ``weights_hint`` where the caller has such an argument). With ``batch``,
    the shape must broadcast to it (checked before the values).
    """
    integer = _check_mask_dtype(name, a, weights_hint)
    if batch is not None:
        check_row_shape(name, a, batch)
    if not integer:
        return a
    eager = ns.is_numpy_array(a) or (
        (ns.is_torch_array(a) or ns.is_jax_array(a)) and not ns.is_traced(a)
    )
    if eager:
        bad = (a != 0) & (a != 1)
        if bool(bad.any()):
            idx = _first_bad(ns.to_host_bool(bad))
            value = int(a[idx])
            raise ValueError(
                f"Expected `{name}` to hold only 0 and 1 (or booleans), got {value} at index {idx}."
            )
    return a != 0


def _first_bad(bad: np.ndarray) -> tuple[int, ...]:
    idx = np.argwhere(bad)[0]
    return tuple(int(i) for i in idx)


# Unit roundoff of the input dtype and its subnormal spacing: a row of V values correctly
# rounded to the dtype sums to 1 within ~eps (relative errors scale with each p), plus up to
# V half-spacings for entries in the subnormal range (float16 has many: below 6.1e-5).
HALF_ROUNDING = {"float16": (2.0**-10, 2.0**-24), "bfloat16": (2.0**-7, 0.0)}


def _rounding(xp: ModuleType, dtype: Any) -> tuple[float, float]:
    name = str(dtype).rsplit(".", 1)[-1].strip("'>")
    if name in HALF_ROUNDING:  # before finfo, which rejects NumPy's (ml_dtypes) bfloat16
        return HALF_ROUNDING[name]
    return float(xp.finfo(dtype).eps), 0.0


def _tolerance(xp: ModuleType, dtype: Any, acc_dtype: Any, num_categories: int) -> float:
    eps, tiny = _rounding(xp, dtype)
    acc_eps = float(xp.finfo(acc_dtype).eps)
    # The accumulation error bound assumes a sequential sum (XLA on CPU may not be pairwise).
    return 4 * eps + num_categories * (tiny / 2 + acc_eps)


def check_values(
    xp: ModuleType,
    side: str,
    x: Any,
    form: str,
    axis: int,
    keep: Any | None,
) -> None:
    """Opt-in value checks of one argument (``keep``: the mask with the category axis, or None).

    Sums are accumulated in float64 where the backend has it, and the tolerance is what the
    input dtype's rounding explains (see ``_tolerance``), so it does not grow loose with V.
    """
    if ns.is_traced(x):
        raise ValueError(
            "`check=True` reads the data and cannot run under jax.jit, vmap or torch.compile; "
            "run it once eagerly (e.g. on the first batch) and trace with check=False."
        )
    acc = ns.widest_float(xp)
    xa = xp.astype(x, acc)
    tol = _tolerance(xp, x.dtype, acc, x.shape[axis])

    def fail(bad_rows: Any, what: str) -> None:
        bad = ns.to_host_bool(bad_rows)
        if keep is not None:
            kept = np.squeeze(ns.to_host_bool(keep), axis=axis)
            shape = np.broadcast_shapes(bad.shape, kept.shape)
            bad = np.broadcast_to(bad, shape) & np.broadcast_to(kept, shape)
        if bad.any():
            raise ValueError(
                f"`{side}` (form={form!r}) is not a valid distribution at batch index "
                f"{_first_bad(bad)}: {what}."
            )

    def rowany(m: Any) -> Any:
        return xp.any(m, axis=axis)

    fail(rowany(xp.isnan(x)), "it contains NaN")
    if form == "probs":
        fail(rowany(x < 0), "it has negative probabilities")
        total = xp.sum(xa, axis=axis)
        fail(xp.abs(total - 1) > tol, f"its probabilities do not sum to 1 (tolerance {tol:.1e})")
    elif form == "log_probs":
        fail(rowany(x > 0), "it has log-probabilities > 0")
        m = xp.max(xa, axis=axis, keepdims=True)
        m = xp.where(xp.isfinite(m), m, 0.0)
        lse = xp.squeeze(m, axis=axis) + xp.log(xp.sum(xp.exp(xa - m), axis=axis))
        # A rounded log-probability l is off by up to (eps/2)·|l|, a relative error in p; over
        # a row that moves the mass by (eps/2)·Σ p·|log p| = (eps/2)·H(p) ≤ (eps/2)·log V.
        tol_lp = tol + _rounding(xp, x.dtype)[0] * math.log(x.shape[axis] + 1)
        fail(
            xp.abs(lse) > tol_lp,
            f"its probabilities (exp of log_probs) do not sum to 1 (tolerance {tol_lp:.1e})",
        )
    else:
        fail(rowany(x == math.inf), "it has a +inf logit")
        fail(xp.all(x == -math.inf, axis=axis), "all its logits are -inf (no category has mass)")
