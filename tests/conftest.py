"""Shared fixtures: the `xp` backend fixture runs a test on NumPy, PyTorch and JAX arrays."""

from __future__ import annotations

import inspect
import os
import random
import warnings
import zlib

import hypothesis
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
# kernel is decorated, i.e. when kldiv.torch._rows.triton.kernels is first imported (lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)  # pytest-xdist runs one worker per core
# Triton before TensorFlow (which TFP's tests import): the two register the same LLVM command
# line options, and whichever loads second aborts the process unless Triton came first.
import kldiv.torch  # noqa: E402, F401


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
def rng(seed) -> np.random.Generator:
    """Random data for one test, from its seed (a failing test's report shows the replay)."""
    return np.random.default_rng(seed)


# --- seeds --------------------------------------------------------------------------------------
# One base seed drives every random draw in the suite. Each test gets its own seed, a stable hash
# of the base and its node id, so a test's data does not depend on which tests ran before it or
# on how pytest-xdist shares them out, and `KLDIV_TEST_SEED=<base> pytest <node id>` replays it.
DEFAULT_SEED = 0
_SEED_ENV = "KLDIV_TEST_SEED"


def _base_seed() -> int:
    raw = os.environ.get(_SEED_ENV, "").strip()
    if raw.lower() == "random":
        seed = int.from_bytes(os.urandom(4), "little")
        # xdist's workers and the tests' own subprocesses inherit the environment: all of them
        # must see the seed drawn here, not draw their own.
        os.environ[_SEED_ENV] = str(seed)
        return seed
    return int(raw) if raw else DEFAULT_SEED


BASE_SEED = _base_seed()

# Registered and loaded at import, before any test module builds its own `settings(...)`:
# those inherit every setting they do not name (max_examples stays each test's own) from the
# profile that is current when they are built.
hypothesis.settings.register_profile("default", derandomize=True, database=None, deadline=None)
# Random examples; the seed still comes from the test's seed (see `seed` below), so a failure
# replays from the printed command.
hypothesis.settings.register_profile("soak", derandomize=False, database=None, deadline=None)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or (
    "soak" if BASE_SEED != DEFAULT_SEED else "default"
)
hypothesis.settings.load_profile(HYPOTHESIS_PROFILE)


def derive_seed(base: int, nodeid: str) -> int:
    """The seed of the test `nodeid` under the base seed `base` (CRC-32: stable across runs,
    processes and Python's hash randomisation)."""
    return zlib.crc32(f"{base}:{nodeid}".encode())


def replay_command(base: int, nodeid: str, hypothesis_test: bool) -> str:
    env = f"{_SEED_ENV}={base}"
    if hypothesis_test and HYPOTHESIS_PROFILE != "default":
        env += f" HYPOTHESIS_PROFILE={HYPOTHESIS_PROFILE}"
    return f"{env} .venv/bin/python -m pytest '{nodeid}'"


# Names (attributes or globals) whose use draws from torch's, NumPy's or Python's global
# generators: a test that reaches one, itself or through a helper in its module, depends on the
# seed even without the `rng` fixture (nn.Linear initialises its weights randomly).
_GLOBAL_RNG_NAMES = frozenset(
    "randn rand randint randperm rand_like randn_like randint_like multinomial bernoulli "
    "normal_ uniform_ Linear Embedding Dropout dropout shuffle".split()
)


def _draws_from_global_rngs(fn, seen=None) -> bool:
    seen = set() if seen is None else seen
    code = getattr(fn, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    module = inspect.getmodule(fn)
    codes = [code]
    while codes:
        c = codes.pop()
        if _GLOBAL_RNG_NAMES.intersection(c.co_names):
            return True
        codes += [k for k in c.co_consts if inspect.iscode(k)]
        for name in c.co_names:
            helper = getattr(module, name, None)
            if inspect.isfunction(helper) and inspect.getmodule(helper) is module:
                if _draws_from_global_rngs(helper, seen):
                    return True
    return False


def _is_seeded(function, fixturenames, node=None) -> bool:
    return (
        (node is not None and node.get_closest_marker("seeded") is not None)
        or "rng" in fixturenames
        or "seed" in inspect.signature(function).parameters
        or hasattr(function, "hypothesis")  # @given
        or _draws_from_global_rngs(function)
    )


def pytest_addoption(parser):
    group = parser.getgroup("kldiv")
    group.addoption(
        "--kldiv-soak-seeds",
        type=int,
        default=0,
        help="run every seeded test under this many base seeds (tests/soak.py)",
    )
    group.addoption(
        "--kldiv-soak-first", type=int, default=1, help="the first of the soak's base seeds"
    )
    group.addoption(
        "--kldiv-soak-spawn-seeds",
        type=int,
        default=None,
        help="fewer base seeds for tests marked `spawns` (they start Python subprocesses)",
    )


def pytest_report_header(config):
    how = f"{_SEED_ENV}=<int> or =random to change" if BASE_SEED == DEFAULT_SEED else "chosen"
    return f"kldiv test seed: {BASE_SEED} ({how}); hypothesis profile: {HYPOTHESIS_PROFILE}"


_SOAK_ID = "kseed"


@pytest.hookimpl(trylast=True)  # so that the soak's id comes last in the node id
def pytest_generate_tests(metafunc):
    n = metafunc.config.getoption("kldiv_soak_seeds")
    if not n or not _is_seeded(metafunc.function, metafunc.fixturenames, metafunc.definition):
        return
    if metafunc.definition.get_closest_marker("spawns"):
        n = metafunc.config.getoption("kldiv_soak_spawn_seeds") or n
    first = metafunc.config.getoption("kldiv_soak_first")
    bases = range(first, first + n)
    metafunc.parametrize("kldiv_soak_base", bases, ids=[f"{_SOAK_ID}{b}" for b in bases])


def pytest_collection_modifyitems(config, items):
    for item in items:
        if isinstance(item, pytest.Function) and _is_seeded(item.function, item.fixturenames):
            item.add_marker(pytest.mark.seeded)


def _canonical_nodeid(nodeid: str, soak_base: int | None) -> str:
    """The node id without the soak's parameter: the id a replay runs under."""
    if soak_base is None:
        return nodeid
    tag = f"{_SOAK_ID}{soak_base}"
    for old, new in ((f"[{tag}]", ""), (f"-{tag}]", "]"), (f"[{tag}-", "[")):
        if old in nodeid:
            return nodeid.replace(old, new, 1)
    return nodeid


@pytest.fixture
def kldiv_soak_base() -> int | None:
    """Overridden by a parameter under the soak: the base seed of this run of the test."""
    return None


@pytest.fixture(autouse=True)
def seed(request, kldiv_soak_base):
    """This test's seed; also seeds the global generators of torch, NumPy and `random`, so
    that a test's unseeded `torch.randn` (or nn.Linear's initialisation) is reproducible."""
    base = BASE_SEED if kldiv_soak_base is None else kldiv_soak_base
    nodeid = _canonical_nodeid(request.node.nodeid, kldiv_soak_base)
    value = derive_seed(base, nodeid)
    random.seed(value)
    np.random.seed(value)  # noqa: NPY002  (the legacy global generator is the point)
    torch.manual_seed(value)
    fn = getattr(request.node, "function", None)
    is_hypothesis = hasattr(fn, "hypothesis")
    if is_hypothesis and not hypothesis.settings.default.derandomize:
        # what hypothesis.seed(value) would set: this test's random examples follow its seed
        fn._hypothesis_internal_use_seed = value
    request.node.user_properties += [
        ("seed", value),
        ("base_seed", base),
        ("replay", replay_command(base, nodeid, is_hypothesis)),
    ]
    states = _global_rng_states()
    yield value
    if not request.node.get_closest_marker("seeded") and not _same_states(
        states, _global_rng_states()
    ):
        # the soak runs only tests marked `seeded`: this one would escape it
        warnings.warn(
            f"{nodeid} draws from a global random generator but is not marked `seeded`; "
            "add the name it calls to conftest._GLOBAL_RNG_NAMES",
            stacklevel=1,
        )


def _global_rng_states():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()  # noqa: NPY002


def _same_states(a, b) -> bool:
    return (
        torch.equal(a[0], b[0])
        and all(np.array_equal(x, y) for x, y in zip(a[1], b[1], strict=True))
        and a[2] == b[2]
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        props = dict(item.user_properties)
        if "replay" in props:
            report.sections.append(
                (
                    "kldiv seed",
                    f"test seed {props['seed']} (base seed {props['base_seed']}); replay:\n"
                    f"  {props['replay']}",
                )
            )
    return report
