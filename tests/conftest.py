"""Shared fixtures: the `xp` backend fixture runs a test on NumPy, PyTorch and JAX arrays."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras parity tests; before any keras import
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import ml_dtypes  # noqa: E402  (NumPy's bfloat16, shipped with JAX)
import torch  # noqa: E402

jax.config.update("jax_enable_x64", True)
# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. It is read when a
# kernel is decorated, i.e. when kldiv.torch._triton_kernels is first imported (lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)  # pytest-xdist runs one worker per core


class Backend:
    """Converts NumPy test data to one framework and back, and differentiates there."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def asarray(self, a, dtype: str | None = None):
        a = np.asarray(a)
        dtype = dtype or (str(a.dtype) if a.dtype.kind in "fb" else "float64")
        if self.name == "numpy":
            return a.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
        if self.name == "torch":
            return torch.from_numpy(
                np.array(a, dtype=np.float64 if dtype == "bfloat16" else dtype)
            ).to(getattr(torch, dtype))
        import jax.numpy as jnp

        return jnp.asarray(
            a.astype(np.float64) if dtype == "bfloat16" else a, dtype=getattr(jnp, dtype)
        )

    def to_numpy(self, x) -> np.ndarray:
        if self.name == "torch":
            return x.detach().to(torch.float64).numpy() if x.is_floating_point() else x.numpy()
        return np.asarray(x, dtype=np.float64) if np.asarray(x).dtype.kind == "f" else np.asarray(x)

    def dtype_name(self, x) -> str:
        return str(x.dtype).rsplit(".", 1)[-1]

    def grad(self, fn, *args):
        """Gradients of the scalar ``fn(*args)`` with respect to every argument, as NumPy."""
        if self.name == "torch":
            ts = [a.detach().clone().requires_grad_(True) for a in args]
            fn(*ts).backward()
            return [self.to_numpy(t.grad) if t.grad is not None else np.zeros(t.shape) for t in ts]
        if self.name == "jax":
            gs = jax.grad(fn, argnums=tuple(range(len(args))))(*args)
            return [np.asarray(g, dtype=np.float64) for g in gs]
        raise NotImplementedError("NumPy has no autograd")


BACKENDS = ["numpy", "torch", "jax"]
AUTOGRAD_BACKENDS = ["torch", "jax"]


@pytest.fixture(params=BACKENDS)
def xp(request) -> Backend:
    return Backend(request.param)


@pytest.fixture(params=AUTOGRAD_BACKENDS)
def ad(request) -> Backend:
    return Backend(request.param)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """Fresh random data per test, reproducible from the printed seed when a test fails."""
    # KLDIV_TEST_SEED=<printed seed> replays a failure.
    seed = int(os.environ.get("KLDIV_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    request.node.user_properties.append(("seed", seed))
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)
