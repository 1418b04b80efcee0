"""The Array API subset the core uses, on ``keras.ops``: how TensorFlow tensors reach the core.

array-api-compat covers NumPy, PyTorch and JAX but not TensorFlow, so a ``tf.Tensor`` (what
Keras hands a loss on its TensorFlow backend) is given this module as its namespace, and the
core runs unchanged on it. Only the functions the core calls are here; shapes may hold
``None`` (symbolic batch dimensions inside ``tf.function``), which the core tolerates for
``reduction="none"``, the only reduction the Keras shells use.
"""

from __future__ import annotations

import builtins
from typing import Any

import numpy as np

# `bool` shadows the builtin (a namespace attribute, as in NumPy): annotations use builtins.bool
float16, bfloat16, float32, float64, bool = "float16", "bfloat16", "float32", "float64", "bool"  # noqa: A001

_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _ops() -> Any:
    import keras

    return keras.ops


def _name(dtype: Any) -> str:
    import keras

    return keras.backend.standardize_dtype(dtype)


def isdtype(dtype: Any, kind: str) -> builtins.bool:
    name = _name(dtype)
    if kind == "real floating":
        return name in _FLOATS
    if kind == "bool":
        return name == "bool"
    raise NotImplementedError(kind)


def finfo(dtype: Any) -> Any:
    name = _name(dtype)
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.finfo(ml_dtypes.bfloat16)
    return np.finfo(np.dtype(name))


def asarray(x: Any, dtype: Any = None, device: Any = None) -> Any:
    return _ops().convert_to_tensor(x, dtype=dtype)


def astype(x: Any, dtype: Any) -> Any:
    return _ops().cast(x, dtype)


def where(c: Any, a: Any, b: Any) -> Any:
    return _ops().where(c, a, b)


def exp(x: Any) -> Any:
    return _ops().exp(x)


def expm1(x: Any) -> Any:
    return _ops().expm1(x)


def log(x: Any) -> Any:
    return _ops().log(x)


def log1p(x: Any) -> Any:
    return _ops().log1p(x)


def abs(x: Any) -> Any:  # noqa: A001
    return _ops().abs(x)


def sum(x: Any, axis: Any = None, keepdims: builtins.bool = False) -> Any:  # noqa: A001
    return _ops().sum(x, axis=axis, keepdims=keepdims)


def mean(x: Any, axis: Any = None, keepdims: builtins.bool = False) -> Any:
    return _ops().mean(x, axis=axis, keepdims=keepdims)


def max(x: Any, axis: Any = None, keepdims: builtins.bool = False) -> Any:  # noqa: A001
    return _ops().max(x, axis=axis, keepdims=keepdims)


def isfinite(x: Any) -> Any:
    return _ops().isfinite(x)


def isnan(x: Any) -> Any:
    return _ops().isnan(x)


def any(x: Any, axis: Any = None) -> Any:  # noqa: A001
    return _ops().any(x, axis=axis)


def all(x: Any, axis: Any = None) -> Any:  # noqa: A001
    return _ops().all(x, axis=axis)


def squeeze(x: Any, axis: Any = None) -> Any:
    return _ops().squeeze(x, axis=axis)


def reshape(x: Any, shape: Any) -> Any:
    return _ops().reshape(x, shape)


def expand_dims(x: Any, axis: int) -> Any:
    return _ops().expand_dims(x, axis)


def broadcast_to(x: Any, shape: Any) -> Any:
    return _ops().broadcast_to(x, shape)


def clip(x: Any, lo: Any, hi: Any) -> Any:
    return _ops().clip(x, lo, hi)


def zeros_like(x: Any) -> Any:
    return _ops().zeros_like(x)


def ones_like(x: Any) -> Any:
    return _ops().ones_like(x)
