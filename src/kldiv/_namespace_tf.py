"""The Array API subset kldiv uses, on TensorFlow itself: how ``tf.Tensor`` reaches the core.

array-api-compat covers NumPy, PyTorch and JAX but not TensorFlow, so a ``tf.Tensor`` or
``tf.Variable`` (what Keras hands a loss on its TensorFlow backend, what a TFP distribution
holds) is given this module as its namespace, and the core and the closed forms of
``kldiv.distributions`` run unchanged on it: TensorFlow's own operations, so the result is a
``tf.Tensor``, ``tf.GradientTape`` records every step, and ``tf.function`` traces it. Only the
functions kldiv calls are here, with the Array API's signatures. Two differences from
NumPy-style promotion are absorbed here: Python numbers take the dtype of the tensor beside
them (TensorFlow never promotes), and shapes may hold ``None`` (symbolic batch dimensions
inside ``tf.function``).

Imported only when a TensorFlow tensor is met (``import kldiv`` imports no framework).
"""

from __future__ import annotations

import builtins
import math
from typing import Any

import numpy as np
import tensorflow as tf

# `bool` shadows the builtin (a namespace attribute, as in NumPy): annotations use builtins.bool
float16, bfloat16, float32, float64 = tf.float16, tf.bfloat16, tf.float32, tf.float64
int32, int64, bool = tf.int32, tf.int64, tf.bool  # noqa: A001
nan, inf, e, pi = math.nan, math.inf, math.e, math.pi

_Axis = Any  # None, an int or a tuple of ints


def _is_tensor(x: Any) -> builtins.bool:
    return isinstance(x, (tf.Tensor, tf.Variable))  # noqa: UP038 - one check, both kinds


def _like(x: Any, other: Any) -> Any:
    """``x`` as a tensor; a Python number (or NumPy array) takes ``other``'s dtype."""
    if _is_tensor(x):
        return x
    if _is_tensor(other):
        return tf.convert_to_tensor(x, dtype=other.dtype)
    return tf.convert_to_tensor(x)


def _axis(axis: _Axis) -> Any:
    return list(axis) if isinstance(axis, tuple) else axis


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------


def isdtype(dtype: Any, kind: str | tuple[str, ...]) -> builtins.bool:
    if isinstance(kind, tuple):
        return builtins.any(isdtype(dtype, k) for k in kind)
    d = tf.as_dtype(dtype)
    if kind == "real floating":
        return builtins.bool(d.is_floating)
    if kind == "complex floating":
        return builtins.bool(d.is_complex)
    if kind == "bool":
        return builtins.bool(d.is_bool)
    if kind == "integral":
        return builtins.bool(d.is_integer)
    if kind == "signed integer":
        return builtins.bool(d.is_integer and not d.is_unsigned)
    if kind == "unsigned integer":
        return builtins.bool(d.is_integer and d.is_unsigned)
    if kind == "numeric":
        return builtins.bool(d.is_integer or d.is_floating or d.is_complex)
    raise ValueError(f"Unknown dtype kind {kind!r}.")


def finfo(dtype: Any) -> Any:
    d = tf.as_dtype(dtype)
    if d == tf.bfloat16:  # NumPy's finfo does not know ml_dtypes' bfloat16
        import ml_dtypes

        return ml_dtypes.finfo(ml_dtypes.bfloat16)
    return np.finfo(d.as_numpy_dtype)


def result_type(*args: Any) -> Any:
    """The widest floating dtype among the arguments (arrays or dtypes), else the first one's:
    kldiv casts its arguments to one float dtype before any arithmetic."""
    dtypes = [tf.as_dtype(a.dtype if _is_tensor(a) else a) for a in args]
    floats = [d for d in dtypes if d.is_floating]
    return builtins.max(floats, key=lambda d: d.size) if floats else dtypes[0]


# ---------------------------------------------------------------------------------------------
# Creation and conversion
# ---------------------------------------------------------------------------------------------


def asarray(obj: Any, dtype: Any = None, device: Any = None, copy: Any = None) -> Any:
    if isinstance(obj, tf.Variable):  # read its value (the tape records the read)
        obj = tf.convert_to_tensor(obj)
    if isinstance(obj, tf.Tensor):
        return obj if dtype is None or obj.dtype == dtype else tf.cast(obj, dtype)
    return tf.convert_to_tensor(obj, dtype=dtype)


def astype(x: Any, dtype: Any, copy: builtins.bool = True) -> Any:
    return x if x.dtype == dtype else tf.cast(x, dtype)


def zeros(shape: Any, dtype: Any = None, device: Any = None) -> Any:
    return tf.zeros(shape, dtype=dtype or tf.float32)


def ones(shape: Any, dtype: Any = None, device: Any = None) -> Any:
    return tf.ones(shape, dtype=dtype or tf.float32)


def full(shape: Any, fill_value: Any, dtype: Any = None, device: Any = None) -> Any:
    return tf.fill(shape, tf.convert_to_tensor(fill_value, dtype=dtype))


def zeros_like(x: Any, dtype: Any = None, device: Any = None) -> Any:
    return tf.zeros_like(x, dtype=dtype)


def ones_like(x: Any, dtype: Any = None, device: Any = None) -> Any:
    return tf.ones_like(x, dtype=dtype)


def full_like(x: Any, fill_value: Any, dtype: Any = None, device: Any = None) -> Any:
    return tf.fill(tf.shape(x), tf.convert_to_tensor(fill_value, dtype=dtype or x.dtype))


def arange(
    start: Any, stop: Any = None, step: Any = 1, dtype: Any = None, device: Any = None
) -> Any:
    if stop is None:
        start, stop = 0, start
    if dtype is None and builtins.all(isinstance(v, int) for v in (start, stop, step)):
        dtype = tf.int64  # the Array API's default integer, and what argmax returns
    return tf.range(start, stop, step, dtype=dtype)


def _band(n_rows: Any, n_cols: Any, k: int) -> Any:
    """The (n_rows, n_cols) boolean matrix of the entries with ``col − row ≤ k``."""
    rows = tf.range(n_rows)[:, None]
    cols = tf.range(n_cols)[None, :]
    return cols - rows <= k


def eye(
    n_rows: int, n_cols: int | None = None, k: int = 0, dtype: Any = None, device: Any = None
) -> Any:
    n_cols = n_rows if n_cols is None else n_cols
    if k == 0:
        return tf.eye(n_rows, n_cols, dtype=dtype or tf.float32)
    on = _band(n_rows, n_cols, k) & ~_band(n_rows, n_cols, k - 1)
    return tf.cast(on, dtype or tf.float32)


def tril(x: Any, k: int = 0) -> Any:
    if k == 0:
        return tf.linalg.band_part(x, -1, 0)
    shape = tf.shape(x)
    return tf.where(_band(shape[-2], shape[-1], k), x, tf.zeros_like(x))


def triu(x: Any, k: int = 0) -> Any:
    if k == 0:
        return tf.linalg.band_part(x, 0, -1)
    shape = tf.shape(x)
    return tf.where(_band(shape[-2], shape[-1], k - 1), tf.zeros_like(x), x)


# ---------------------------------------------------------------------------------------------
# Element-wise
# ---------------------------------------------------------------------------------------------


def where(condition: Any, x1: Any, x2: Any) -> Any:
    return tf.where(condition, _like(x1, x2), _like(x2, x1))


def minimum(x1: Any, x2: Any) -> Any:
    return tf.minimum(_like(x1, x2), _like(x2, x1))


def maximum(x1: Any, x2: Any) -> Any:
    return tf.maximum(_like(x1, x2), _like(x2, x1))


def clip(x: Any, min: Any = None, max: Any = None) -> Any:  # noqa: A002
    if min is not None:
        x = maximum(x, min)
    if max is not None:
        x = minimum(x, max)
    return x


def exp(x: Any) -> Any:
    return tf.math.exp(x)


def expm1(x: Any) -> Any:
    return tf.math.expm1(x)


def log(x: Any) -> Any:
    return tf.math.log(x)


def log1p(x: Any) -> Any:
    return tf.math.log1p(x)


def logaddexp(x1: Any, x2: Any) -> Any:
    a, b = _like(x1, x2), _like(x2, x1)
    m = tf.maximum(a, b)
    m = tf.stop_gradient(tf.where(tf.math.is_finite(m), m, tf.zeros_like(m)))
    return m + tf.math.log(tf.math.exp(a - m) + tf.math.exp(b - m))


def sqrt(x: Any) -> Any:
    return tf.math.sqrt(x)


def abs(x: Any) -> Any:  # noqa: A001
    return tf.math.abs(x)


def sign(x: Any) -> Any:
    return tf.math.sign(x)


def floor(x: Any) -> Any:
    return tf.math.floor(x)


def sin(x: Any) -> Any:
    return tf.math.sin(x)


def cos(x: Any) -> Any:
    return tf.math.cos(x)


def tan(x: Any) -> Any:
    return tf.math.tan(x)


def atan(x: Any) -> Any:
    return tf.math.atan(x)


def tanh(x: Any) -> Any:
    return tf.math.tanh(x)


def isfinite(x: Any) -> Any:
    return tf.math.is_finite(x)


def isnan(x: Any) -> Any:
    return tf.math.is_nan(x)


def isinf(x: Any) -> Any:
    return tf.math.is_inf(x)


def logical_not(x: Any) -> Any:
    return tf.math.logical_not(x)


# ---------------------------------------------------------------------------------------------
# Reductions and shape
# ---------------------------------------------------------------------------------------------


def sum(  # noqa: A001
    x: Any, axis: _Axis = None, dtype: Any = None, keepdims: builtins.bool = False
) -> Any:
    if dtype is None and x.dtype == tf.bool:  # the Array API counts booleans as integers
        dtype = tf.int64
    if dtype is not None:
        x = astype(x, dtype)
    return tf.math.reduce_sum(x, axis=_axis(axis), keepdims=keepdims)


def mean(x: Any, axis: _Axis = None, keepdims: builtins.bool = False) -> Any:
    return tf.math.reduce_mean(x, axis=_axis(axis), keepdims=keepdims)


def max(x: Any, axis: _Axis = None, keepdims: builtins.bool = False) -> Any:  # noqa: A001
    return tf.math.reduce_max(x, axis=_axis(axis), keepdims=keepdims)


def min(x: Any, axis: _Axis = None, keepdims: builtins.bool = False) -> Any:  # noqa: A001
    return tf.math.reduce_min(x, axis=_axis(axis), keepdims=keepdims)


def any(x: Any, axis: _Axis = None, keepdims: builtins.bool = False) -> Any:  # noqa: A001
    return tf.math.reduce_any(tf.cast(x, tf.bool), axis=_axis(axis), keepdims=keepdims)


def all(x: Any, axis: _Axis = None, keepdims: builtins.bool = False) -> Any:  # noqa: A001
    return tf.math.reduce_all(tf.cast(x, tf.bool), axis=_axis(axis), keepdims=keepdims)


def argmax(x: Any, axis: int | None = None, keepdims: builtins.bool = False) -> Any:
    if axis is None:
        x, axis = tf.reshape(x, [-1]), 0
    out = tf.math.argmax(x, axis=axis)
    return tf.expand_dims(out, axis) if keepdims else out


def reshape(x: Any, shape: Any, copy: Any = None) -> Any:
    # None (a symbolic dimension inside tf.function) and -1 both mean "whatever is left"
    return tf.reshape(x, [-1 if s is None else s for s in shape])


def squeeze(x: Any, axis: _Axis = None) -> Any:
    return tf.squeeze(x, axis=_axis(axis))


def expand_dims(x: Any, axis: int = 0) -> Any:
    return tf.expand_dims(x, axis)


def broadcast_to(x: Any, shape: Any) -> Any:
    return tf.broadcast_to(x, shape)


def matrix_transpose(x: Any) -> Any:
    return tf.linalg.matrix_transpose(x)


def swapaxes(x: Any, axis1: int, axis2: int) -> Any:
    n = x.shape.rank
    perm = list(range(n))
    perm[axis1 % n], perm[axis2 % n] = perm[axis2 % n], perm[axis1 % n]
    return tf.transpose(x, perm)


def matmul(x1: Any, x2: Any) -> Any:
    return tf.linalg.matmul(x1, x2)


class linalg:  # noqa: N801 - the Array API's extension namespace
    @staticmethod
    def diagonal(x: Any, offset: int = 0) -> Any:
        return tf.linalg.diag_part(x, k=offset)

    @staticmethod
    def cholesky(x: Any, upper: builtins.bool = False) -> Any:
        c = tf.linalg.cholesky(x)
        return tf.linalg.matrix_transpose(c) if upper else c
