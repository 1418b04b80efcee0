"""Array namespaces, dtype policy and the few per-backend primitives the Array API lacks.

kldiv is written once against the Array API standard. This module finds the caller's namespace
without importing any framework (frameworks are detected through ``sys.modules``, as
array-api-compat does; TensorFlow, which array-api-compat does not cover, gets
:mod:`kldiv._namespace_tf`), decides the computation dtype, and supplies the two operations the
standard does not have: ``stop_gradient`` and a fast native ``log_softmax`` where a framework
offers a stable one.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np


# Frameworks are recognised through sys.modules, so none is imported here: an array of a
# framework can only exist if that framework has been imported. (array-api-compat's is_*_array
# helpers do the same, through an lru_cache that torch.compile warns about on every trace.)
def is_torch_array(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_jax_array(x: Any) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.Array)


def is_tf_tensor(x: Any) -> bool:
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(x, (tf.Tensor, tf.Variable))  # noqa: UP038


def is_numpy_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic))  # noqa: UP038 - torch.compile rejects X | Y


__all__ = [
    "namespace",
    "backend_name",
    "compute_dtype",
    "is_half",
    "stop_gradient",
    "native_log_softmax",
    "is_traced",
    "torch_without_data",
    "to_host_bool",
    "widest_float",
    "special",
    "device_of",
]


def is_array(x: Any) -> bool:
    return (
        is_torch_array(x)
        or is_jax_array(x)
        or is_numpy_array(x)
        or is_tf_tensor(x)
        or (hasattr(x, "__array_namespace__"))
    )


def namespace_of(x: Any) -> ModuleType:
    """The Array API namespace of one array (no checks across arguments)."""
    # Resolve the common frameworks directly: array_namespace's cached class lookup makes
    # torch.compile emit warnings while tracing, and these helpers are plain isinstance checks.
    if is_torch_array(x):
        import array_api_compat.torch as xp_torch

        return xp_torch
    if is_jax_array(x):
        return sys.modules["jax.numpy"]
    if is_numpy_array(x):
        import array_api_compat.numpy as xp_numpy

        return xp_numpy
    if is_tf_tensor(x):  # array-api-compat has no TensorFlow: kldiv's own namespace on it
        from . import _namespace_tf

        return _namespace_tf
    return array_api_compat.array_namespace(x)


def backend_name(xp: ModuleType) -> str:
    """Short name of the framework behind a namespace: 'torch', 'jax', 'numpy', 'tensorflow'
    or the module's name."""
    name = xp.__name__
    if name == "kldiv._namespace_tf":
        return "tensorflow"
    if "torch" in name:
        return "torch"
    if name.startswith("jax"):
        return "jax"
    if "numpy" in name:
        return "numpy"
    return name


def namespace(*args: Any, names: tuple[str, ...] | None = None) -> tuple[ModuleType, list[Any]]:
    """Return ``(xp, arrays)``: the one namespace shared by the array arguments.

    ``None`` entries are passed through. Python scalars, lists and tuples are converted with the
    namespace of the array arguments (NumPy if there are none). Arrays from two different
    frameworks raise ``TypeError`` naming both, because silently converting one would copy
    across devices or break autograd.
    """
    names = names or tuple(f"argument {i}" for i in range(len(args)))
    found: dict[str, tuple[ModuleType, str]] = {}
    for name, a in zip(names, args, strict=True):
        if a is None or not is_array(a):
            continue
        xp = namespace_of(a)
        found.setdefault(backend_name(xp), (xp, name))
    if len(found) > 1:
        desc = ", ".join(f"`{n}` is a {b} array" for b, (_, n) in found.items())
        raise TypeError(
            f"Expected all array arguments to come from one framework, got {desc}. "
            "Convert them explicitly (kldiv never moves data between frameworks for you)."
        )
    if found:
        xp = next(iter(found.values()))[0]
    else:
        import array_api_compat.numpy as xp
    out = []
    for a in args:
        if is_tf_tensor(a) and not hasattr(a, "ndim"):  # a tf.Variable: read its value
            out.append(sys.modules["tensorflow"].convert_to_tensor(a))
        elif a is None or is_array(a):
            out.append(a)
        elif isinstance(a, bool | int | float | list | tuple):
            out.append(xp.asarray(a))
        else:
            raise TypeError(
                f"Expected an array (NumPy, PyTorch or JAX), a Python number or a list, "
                f"got {type(a).__name__}."
            )
    return xp, out


def _dtype_name(dtype: Any) -> str:
    name = getattr(dtype, "name", None)  # NumPy and TensorFlow dtypes; torch's have none
    if isinstance(name, str):
        return name
    return str(dtype).rsplit(".", 1)[-1].strip("'>")


def is_half(dtype: Any) -> bool:
    return _dtype_name(dtype) in ("float16", "bfloat16")


def compute_dtype(xp: ModuleType, *named: tuple[str, Any]) -> Any:
    """The dtype all arithmetic runs in: float32 for half inputs, else the promoted float dtype.

    Integer, boolean and complex inputs raise ``TypeError``: a KL of integer "probabilities" is
    almost always a bug (labels passed where a distribution was meant).
    """
    dtypes = []
    for name, a in named:
        if a is None:
            continue
        dt = a.dtype
        if is_half(dt):  # checked by name: NumPy's isdtype rejects ml_dtypes' bfloat16
            dtypes.append(xp.float32)
            continue
        if not xp.isdtype(dt, "real floating"):
            raise TypeError(
                f"Expected `{name}` to have a real floating dtype (float16, bfloat16, float32, "
                f"float64), got {_dtype_name(dt)}. Cast explicitly, e.g. to float32; integer "
                "class labels are not a distribution."
            )
        dtypes.append(dt)
    # Only float32/float64 remain (halves were mapped to float32), so promotion is the widest;
    # computed here because torch.result_type returns a dtype, which torch.compile cannot trace.
    return max(dtypes, key=lambda d: xp.finfo(d).bits) if dtypes else xp.float32


def stop_gradient(xp: ModuleType, x: Any) -> Any:
    """Block gradients through ``x`` (the Array API has no autograd, so this is per backend)."""
    b = backend_name(xp)
    if b == "torch":
        return x.detach()
    if b == "jax":
        import jax

        return jax.lax.stop_gradient(x)
    if b == "tensorflow":
        return sys.modules["tensorflow"].stop_gradient(x)
    return x


def native_log_softmax(xp: ModuleType) -> Any | None:
    """The framework's own fused log-softmax, or ``None`` where the generic one must be used.

    PyTorch's, JAX's and TensorFlow's are numerically stable (max-shifted), map ``-inf``
    logits to ``-inf`` with zero gradient, and are several times faster than the composition
    of Array API calls in PyTorch eager mode, where every intermediate is a separate
    ``[N, V]`` allocation.
    """
    b = backend_name(xp)
    if b == "torch":
        import torch

        return lambda x, axis: torch.log_softmax(x, dim=axis)
    if b == "jax":
        import jax

        return lambda x, axis: jax.nn.log_softmax(x, axis=axis)
    if b == "tensorflow":
        tf = sys.modules["tensorflow"]

        return lambda x, axis: tf.nn.log_softmax(x, axis=axis)
    return None


def compiling() -> bool:
    """True while torch.compile traces (whatever the arguments are)."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.compiler.is_compiling())


def is_traced(x: Any) -> bool:
    """True when ``x`` has no concrete value to read: a JAX tracer, or a torch tensor inside
    ``torch.compile``, under a ``torch.func`` transform (``vmap`` forbids reading values),
    fake or on the meta device (``make_fx``, shape propagation), or during CUDA graph capture
    (a device-to-host read would break the capture)."""
    if is_jax_array(x):
        import jax

        return isinstance(x, jax.core.Tracer)
    if is_torch_array(x):
        return _torch_traced(x)
    if is_tf_tensor(x):  # inside tf.function: a symbolic tensor, no value to read
        tf = sys.modules["tensorflow"]

        return not tf.executing_eagerly() or bool(tf.is_symbolic_tensor(x))
    return False


def _torch_traced(x: Any) -> bool:
    import torch

    if torch.compiler.is_compiling():  # first: dynamo cannot trace the checks below
        return True
    return torch_without_data(x) or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def torch_without_data(x: Any) -> bool:
    """Outside torch.compile: a torch tensor whose memory cannot be read (under a
    ``torch.func`` transform or jit tracing, fake, or on the meta device)."""
    import torch
    from torch._subclasses.fake_tensor import is_fake

    if torch._C._functorch.is_functorch_wrapped_tensor(x) or torch.jit.is_tracing():
        return True
    return x.device.type == "meta" or is_fake(x)


def to_host_bool(x: Any) -> np.ndarray:
    """A small boolean array brought to the host, for the opt-in value checks only."""
    if is_torch_array(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def widest_float(xp: ModuleType) -> Any:
    """float64, unless the backend cannot hold it (JAX without ``jax_enable_x64``)."""
    if backend_name(xp) == "jax":
        import jax

        # the flags are set on jax.config at run time, its type does not declare them
        if not jax.config.jax_enable_x64:  # type: ignore[attr-defined]
            return xp.float32
    return xp.float64


def device_of(x: Any) -> Any:
    """The device of an array (``"cpu"`` for NumPy), for creating constants beside it."""
    if is_torch_array(x):
        return x.device  # direct: array-api-compat's generic lookup is slow to trace
    if is_tf_tensor(x):
        return None  # TensorFlow places new tensors itself
    return array_api_compat.device(x)


# Plain classes with static methods, not objects built per call: torch.compile traces
# attribute lookups on a class but cannot trace constructing a SimpleNamespace.
class _TorchSpecial:
    @staticmethod
    def gammaln(x: Any) -> Any:
        import torch

        return torch.special.gammaln(x)

    @staticmethod
    def digamma(x: Any) -> Any:
        import torch

        return torch.special.digamma(x)

    @staticmethod
    def erf(x: Any) -> Any:
        import torch

        return torch.special.erf(x)

    @staticmethod
    def cholesky(a: Any) -> Any:
        import torch

        return torch.linalg.cholesky(a)

    @staticmethod
    def solve_tril(tril: Any, r: Any) -> Any:
        import torch

        return torch.linalg.solve_triangular(tril, r, upper=False)


class _JaxSpecial:
    @staticmethod
    def gammaln(x: Any) -> Any:
        import jax.scipy.special as jsp

        return jsp.gammaln(x)

    @staticmethod
    def digamma(x: Any) -> Any:
        import jax.scipy.special as jsp

        return jsp.digamma(x)

    @staticmethod
    def erf(x: Any) -> Any:
        import jax.scipy.special as jsp

        return jsp.erf(x)

    @staticmethod
    def cholesky(a: Any) -> Any:
        import jax.numpy as jnp

        return jnp.linalg.cholesky(a)

    @staticmethod
    def solve_tril(tril: Any, r: Any) -> Any:
        import jax
        import jax.numpy as jnp

        # triangular_solve wants equal batch axes; broadcasting is views, not copies, in XLA.
        batch = jnp.broadcast_shapes(tril.shape[:-2], r.shape[:-2])
        tril = jnp.broadcast_to(tril, batch + tril.shape[-2:])
        r = jnp.broadcast_to(r, batch + r.shape[-2:])
        return jax.lax.linalg.triangular_solve(tril, r, left_side=True, lower=True)


class _TensorFlowSpecial:
    """TensorFlow tensors (they reach the core through :mod:`kldiv._namespace_tf`): TensorFlow's
    own functions, whose gradients the tape records (SciPy's would silently drop them)."""

    @staticmethod
    def gammaln(x: Any) -> Any:
        import tensorflow as tf

        return tf.math.lgamma(x)

    @staticmethod
    def digamma(x: Any) -> Any:
        import tensorflow as tf

        return tf.math.digamma(x)

    @staticmethod
    def erf(x: Any) -> Any:
        import tensorflow as tf

        return tf.math.erf(x)

    @staticmethod
    def cholesky(a: Any) -> Any:
        import tensorflow as tf

        return tf.linalg.cholesky(a)

    @staticmethod
    def solve_tril(tril: Any, r: Any) -> Any:
        import tensorflow as tf

        # like torch and JAX, read only the lower triangle
        return tf.linalg.triangular_solve(tf.linalg.band_part(tril, -1, 0), r, lower=True)


def _scipy_special() -> Any:
    try:
        import scipy.special
    except ImportError as e:  # pragma: no cover - scipy is in the test environment
        raise ImportError(
            "kldiv.distributions needs SciPy for lgamma/digamma/erf on NumPy arrays: "
            "pip install scipy (or kldiv[numpy]). PyTorch and JAX arrays need nothing extra."
        ) from e
    return scipy.special


class _NumpySpecial:
    @staticmethod
    def gammaln(x: Any) -> Any:
        return _scipy_special().gammaln(x)

    @staticmethod
    def digamma(x: Any) -> Any:
        return _scipy_special().psi(x)

    @staticmethod
    def erf(x: Any) -> Any:
        return _scipy_special().erf(x)

    @staticmethod
    def cholesky(a: Any) -> Any:
        return np.linalg.cholesky(a)

    @staticmethod
    def solve_tril(tril: Any, r: Any) -> Any:
        # NumPy has no batched triangular solve; LU with partial pivoting on a triangular
        # matrix is backward stable. np.tril: like torch and JAX, read only the lower triangle.
        return np.linalg.solve(np.tril(tril), r)


def special(xp: ModuleType) -> Any:
    """Special functions and the triangular solve the Array API lacks, for ``xp``'s backend.

    The result has ``gammaln``, ``digamma``, ``erf``, ``cholesky(a)`` and
    ``solve_tril(l, b)`` (``l⁻¹ b`` for lower-triangular ``l``, batch axes broadcast), from
    ``torch.special``/``torch.linalg``, ``jax.scipy.special``/``jax.lax.linalg``,
    ``tf.math``/``tf.linalg`` for TensorFlow tensors, or SciPy and NumPy (SciPy imported only
    when a NumPy distribution needs it).
    """
    b = backend_name(xp)
    if b == "torch":
        return _TorchSpecial
    if b == "jax":
        return _JaxSpecial
    if b == "tensorflow":
        return _TensorFlowSpecial
    return _NumpySpecial
