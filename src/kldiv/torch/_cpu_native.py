"""The launcher of the compiled CPU kernel (``_cpu_kernel.c``): it builds the kernel, caches
it, and runs it over row ranges, one range per intra-op thread.

This is layer 2 of the CPU fast path. Layer 1 is the C kernel and layer 3 is
:class:`kldiv.torch._cpu.ChunkedDivergence`.

The kernel computes KL and reverse KL on float32 rows: the loss and the student's gradient
in one call, reading the logits from memory once. PyTorch's elementwise operators would make
a pass per operation, and torch.compile would cost seconds on the first call; this kernel
is what lets the CPU path beat both.

It is compiled on first use by the system C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``), with ``-O3 -march=native`` so the vector code fits the CPU it runs on. It takes
about 0.3 s. The shared library is cached under ``$KLDIV_CACHE_DIR``, else
``$XDG_CACHE_HOME/kldiv``, else ``~/.cache/kldiv``. The cache key is the source, the
compiler and the CPU's feature flags.

Without a compiler, or with ``KLDIV_NATIVE=0`` set, the chunked path runs in tensor code
instead: the same values, about 1.8× slower (see ``kldiv info``). ctypes releases the GIL
during the call, so plain Python threads run the row ranges in parallel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

KINDS = {"kl": 0, "reverse_kl": 1}
SOURCE = Path(__file__).with_name("_cpu_kernel.c")
# The second set is for compilers that do not know -march=native (some non-x86 clangs).
_FLAG_SETS = (("-O3", "-march=native"), ("-O3",))
# Fused multiply-adds on purpose (10% faster here, and more accurate): the one place where
# they change a result's range, the row maximum's shift, is guarded in the kernel.
_COMMON = ("-std=gnu11", "-ffp-contract=fast", "-shared", "-fPIC")
_OFF = ("0", "false", "off", "no")
# Below this many elements a thread pool costs more than it saves.
_PARALLEL_MIN = 1 << 16

_lock = threading.Lock()
_state: dict[str, Any] = {}
_pool: dict[str, Any] = {"executor": None, "size": 0}


def _forget_after_fork() -> None:
    # a forked child has none of the parent's threads; the library itself stays loaded
    global _lock
    _lock = threading.Lock()
    _pool.update(executor=None, size=0)


os.register_at_fork(after_in_child=_forget_after_fork)


def disabled() -> bool:
    """True when ``KLDIV_NATIVE=0`` (or false, off, no) asks for the tensor-code path (read
    on every call)."""
    return os.environ.get("KLDIV_NATIVE", "1").strip().lower() in _OFF


def cache_dir() -> Path:
    if os.environ.get("KLDIV_CACHE_DIR"):
        return Path(os.environ["KLDIV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kldiv"


def _compiler() -> list[str] | None:
    cc = shlex.split(os.environ.get("CC", ""))  # "ccache gcc", "gcc -m64"
    if cc:
        return [shutil.which(cc[0]) or cc[0], *cc[1:]]
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _cpu_flags() -> bytes:
    # -march=native output is only valid on CPUs with the same features: a cache shared
    # between machines (a network home) must not hand one's build to another
    try:
        with open("/proc/cpuinfo", "rb") as f:
            for line in f:
                if line.startswith((b"flags", b"Features")):
                    return line
    except OSError:
        pass
    return platform.processor().encode()


def _build(directory: Path) -> Path:
    """The kernel's shared library in ``directory`` (compiled unless already there)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang; or set CC)")
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"the C compiler {cc[0]} does not run: {e}") from e
    parts = [
        SOURCE.read_bytes(),
        " ".join(cc).encode(),
        version,
        platform.machine().encode(),
        _cpu_flags(),
        repr((_FLAG_SETS, _COMMON)).encode(),
    ]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"cpu_kernel_{key}.so"
    if target.exists():
        return target
    error = ""
    for flags in _FLAG_SETS:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".build-", suffix=".so")
        os.close(fd)
        cmd = [*cc, *flags, *_COMMON, "-o", tmp, str(SOURCE), "-lm"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            proc, error = None, str(e)
        if proc is not None and proc.returncode == 0:
            os.replace(tmp, target)  # atomic: concurrent processes each install a whole file
            return target
        os.unlink(tmp)
        if proc is not None:
            lines = (proc.stderr or proc.stdout or "").strip().splitlines()
            error = lines[-1] if lines else f"exit status {proc.returncode}"
    raise RuntimeError(f"{cc[0]} could not compile {SOURCE.name}: {error}")


def _open(directory: Path) -> tuple[Any, Path]:
    path = _build(directory)
    try:
        return ctypes.CDLL(str(path)), path
    except OSError:  # a truncated or foreign file under our name: build it again
        path.unlink(missing_ok=True)
        path = _build(directory)
        return ctypes.CDLL(str(path)), path


def _load() -> None:
    try:
        try:
            lib, path = _open(cache_dir())
        except OSError:
            # a cache that cannot be written (read-only home, foreign directory): build in a
            # private directory, load, and remove it (the loaded library stays mapped)
            private = Path(tempfile.mkdtemp(prefix="kldiv-"))
            try:
                lib, path = _open(private)
            finally:
                shutil.rmtree(private, ignore_errors=True)
    except (OSError, RuntimeError) as e:
        _state["error"] = str(e)
        return
    fn = lib.kldiv_cpu_rows
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [
        ctypes.c_int,
        i64,
        i64,
        p,
        i64,
        p,
        i64,
        p,
        ctypes.c_float,
        p,
        i64,
        p,
        ctypes.c_float,
        p,
        p,
        p,
    ]
    fn.restype = None
    _state.update(fn=fn, path=path)


def kernel() -> Any:
    """The compiled ``kldiv_cpu_rows`` (built on the first call), or None when it cannot be
    built; :func:`status` says why."""
    if not _state:
        with _lock:
            if not _state:
                _load()
    return _state.get("fn")


def status() -> str:
    """One line for ``kldiv info``."""
    if disabled():
        return "disabled by KLDIV_NATIVE=0 (tensor code runs instead)"
    if kernel() is None:
        return f"unavailable ({_state['error']}); tensor code runs instead"
    return f"compiled ({_state['path']})"


def usable(kind: str, device: torch.device) -> bool:
    """Whether :func:`rows` takes ``kind`` on ``device`` here."""
    return kind in KINDS and device.type == "cpu" and not disabled() and kernel() is not None


def _executor(size: int) -> ThreadPoolExecutor:
    """A pool of at least ``size`` threads. It only ever grows, and an outgrown pool is never
    shut down, so a caller that got it from another thread can always submit to it."""
    with _lock:
        if _pool["size"] < size:
            _pool.update(executor=ThreadPoolExecutor(size, "kldiv-cpu"), size=size)
        return _pool["executor"]


def rows(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    inv_t: float,
    grad: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``kind`` of tempered float32 logits ``[n, v]`` (CPU, unit stride along rows;
    any row stride, 0 included) and, when ``grad`` is given, the gradient of their sum with
    respect to ``student`` written into it (``[n, v]`` float32, unit stride along rows).

    Returns ``(values, flagged)``: float64 ``[n]`` and bool ``[n]``. Flagged rows (those
    holding +inf or NaN, all ``-inf`` on a side, or reverse KL's +inf rows) are left to the
    caller, with their value and gradient row unspecified. Rows with ``keep`` False are
    never read: value 0, gradient row 0.
    """
    fn = kernel()
    n, v = student.shape
    values = torch.empty(n, dtype=torch.float64)
    flags = torch.empty(n, dtype=torch.uint8)
    parts = max(1, min(torch.get_num_threads(), n)) if n * v >= _PARALLEL_MIN else 1
    scratch = torch.empty((parts, 2 * (v + 8)), dtype=torch.float32)
    bounds = [n * k // parts for k in range(parts + 1)]
    code = KINDS[kind]

    def call(k: int) -> None:
        a, b = bounds[k], bounds[k + 1]
        if a == b:
            return
        fn(
            code,
            b - a,
            v,
            student[a].data_ptr(),
            student.stride(0),
            teacher[a].data_ptr(),
            teacher.stride(0),
            None if keep is None else keep[a:].data_ptr(),
            inv_t,
            None if grad is None else grad[a].data_ptr(),
            0 if grad is None else grad.stride(0),
            None,
            1.0,
            scratch[k].data_ptr(),
            values[a:].data_ptr(),
            flags[a:].data_ptr(),
        )

    if parts == 1:
        call(0)
    else:
        for future in [_executor(parts).submit(call, k) for k in range(parts)]:
            future.result()
    return values, flags.bool()
