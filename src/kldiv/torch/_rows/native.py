"""The launcher of the compiled CPU kernel (``native.c``): it builds the kernel, caches
it, and runs it over row ranges, one range per intra-op thread.

This is layer 2 of the CPU fast path. Layer 1 is the C kernel and layer 3 is
:class:`kldiv.torch._rows.tensor.ChunkedDivergence`.

The kernel computes every divergence of DistillationLoss on float32 rows (:data:`KINDS`):
the loss and the student's gradient in one call, reading the logits from memory once, with two
exps per element and, for JS and the skew divergences, one log of the mixture. PyTorch's
elementwise operators would make a pass per operation, and torch.compile would cost seconds on
the first call; this kernel is what lets the CPU path beat both. Zero support is the core's
(``-inf`` logits are zero probabilities, terms with a zero first argument are 0); the rows it
does not decide exactly come back flagged, for the caller's tensor code (see :func:`rows`).

It is compiled on first use by the system C compiler (``$CC``, which may carry arguments,
else ``cc``, ``gcc`` or ``clang``), with ``-O3 -march=native`` so the vector code fits the CPU
it runs on. It takes about 0.3 s. Flags in ``$CC`` cannot change the kernel's floating-point
semantics: the build appends the flags that turn off ``-ffast-math``, ``-Ofast`` and their
parts (``-fno-fast-math``, ``-fno-unsafe-math-optimizations``, ``-fno-associative-math``,
``-fno-reciprocal-math``, ``-fsigned-zeros``, ``-fno-finite-math-only``; the compiler obeys
the last of a flag and its negation), and drops ``-mpc32``, ``-mpc64``, ``-mpc80`` and
``-mdaz-ftz`` (they link start-up code that sets the floating-point mode of the whole
process) and ``-mfpmath=`` (x87 extended precision). A compiler that rejects these flags is
not used.

The shared library is cached under ``$KLDIV_CACHE_DIR``, else ``$XDG_CACHE_HOME/kldiv``, else
``~/.cache/kldiv``, as ``cpu_kernel_<key>_<sha256>.so``. The key is the source, the compile
commands (flags included), the compiler's version and the CPU's feature flags; the second
part is the SHA-256 of the file itself. A build is compiled into a temporary file in the
cache, loaded and checked (it must export ``kldiv_cpu_rows``), and only then renamed to its
name, atomically, so concurrent processes never see a partial file. A cached file is loaded
only when it is a regular file whose SHA-256 matches its name and which exports the kernel:
a truncated, corrupted or foreign file, or a link to elsewhere, is removed and the kernel
rebuilt. A cache that cannot be written or mapped (a read-only or ``noexec`` directory)
builds in a private temporary directory instead. The compiler gets 120 s.

Without a usable compiler (none found, ``$CC`` unparsable, a failed or hung build, a library
that does not load), or with ``KLDIV_NATIVE=0`` set, the chunked path runs in tensor code
instead: the same values, 1.5 to 5 times slower (the most for JS and the skew
divergences); ``kldiv info`` (:func:`status`) says why. ctypes releases the GIL during the
call, so plain Python threads run the row ranges in parallel.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ... import _spec as spec
from ..._kinds import KIND_CODES, KIND_PARAMS

# The kernel's codes are the registry's. The kinds with a parameter (JS's beta, the skew
# kinds' alpha) take it as a weight strictly inside (0, 1).
KINDS = KIND_CODES
WEIGHTED = tuple(KIND_PARAMS)
SOURCE = Path(__file__).with_name("native.c")
SYMBOL = "kldiv_cpu_rows"
# The vocabulary-slice entries (the vocab-parallel losses): statistics, then terms or gradient.
SLICE_SYMBOLS = ("kldiv_cpu_slice_stats", "kldiv_cpu_slice_rows")
# The second set is for compilers that do not know -march=native (some non-x86 clangs).
_FLAG_SETS = (("-O3", "-march=native"), ("-O3",))
# After $CC's own flags, so they win: the kernel relies on IEEE infinities, NaN tests and
# signed zeros (-inf logits are zero probabilities), and for -ffast-math, -Ofast or
# -funsafe-math-optimizations GCC (12 at least) links crtfastmath.o even into a shared
# library, whose start-up code makes the whole process flush subnormals to zero.
_STRICT = (
    "-fno-fast-math",
    "-fno-unsafe-math-optimizations",
    "-fno-associative-math",
    "-fno-reciprocal-math",
    "-fsigned-zeros",
    "-fno-finite-math-only",
)
# Removed from $CC, having no negation that undoes them: -mpc* and -mdaz-ftz link start-up
# code that sets the whole process's x87 precision or flush-to-zero on load, and
# -mfpmath=387 moves the kernel's scalar arithmetic to x87's extended precision.
_DROPPED = re.compile(r"-mpc(32|64|80)|-mdaz-ftz|-mfpmath=.*")
# Fused multiply-adds on purpose (10% faster here, and more accurate): the one place where
# they change a result's range, the row maximum's shift, is guarded in the kernel.
_COMMON = ("-std=gnu11", "-ffp-contract=fast", "-shared", "-fPIC")
_TIMEOUT = 120.0
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


def _compiler() -> list[str]:
    cc = os.environ.get("CC", "")
    try:
        args = shlex.split(cc)  # "ccache gcc", "gcc -m64"
    except ValueError as e:
        raise RuntimeError(f"CC={cc!r} cannot be parsed: {e}") from None
    if args:
        return [
            shutil.which(args[0]) or args[0],
            *(a for a in args[1:] if not _DROPPED.fullmatch(a)),
        ]
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    raise RuntimeError("no C compiler found (cc, gcc or clang; or set CC)")


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    # Its own process group, killed whole on a timeout: a hung driver's children (cc1, as,
    # ld) would otherwise hold the pipes open and block us after the driver is killed.
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=_TIMEOUT)
        except BaseException:
            with contextlib.suppress(OSError):  # already gone
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


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


def _digest(path: Path) -> str | None:
    """The SHA-256 of the regular file at ``path``; None for anything else (a symbolic link,
    a directory, nothing)."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


# ELF, and Mach-O (32/64-bit, either byte order, universal)
_LIBRARY_MAGIC = (
    b"\x7fELF",
    b"\xfe\xed\xfa\xce",
    b"\xfe\xed\xfa\xcf",
    b"\xce\xfa\xed\xfe",
    b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe",
)


def _looks_like_library(path: Path) -> bool:
    """Whether the file starts like a shared library: a file named by its own hash that is
    not one (any bytes can be named so) is foreign, not a sign of a noexec directory."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in _LIBRARY_MAGIC
    except OSError:
        return False


class _Library:
    """The kernel's entries, typed: ``rows`` (:data:`SYMBOL`), ``slice_stats`` and
    ``slice_rows`` (:data:`SLICE_SYMBOLS`)."""

    def __init__(self, lib: Any) -> None:
        missing = [name for name in (SYMBOL, *SLICE_SYMBOLS) if getattr(lib, name, None) is None]
        if missing:
            raise RuntimeError(f"the compiled library does not export {missing[0]}")
        p, i64, f32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double
        c_int = ctypes.c_int
        self.rows = getattr(lib, SYMBOL)
        self.rows.argtypes = [
            *(c_int, f64, i64, i64, p, i64, p, i64, p, f32, p, i64, p, f32, p, p, p),
            p,  # the logit maps: {mul, cap} of the student's and the teacher's, or NULL
        ]
        self.slice_stats = getattr(lib, SLICE_SYMBOLS[0])
        self.slice_stats.argtypes = [i64, i64, p, i64, p, i64, p, f32, p, i64, p]
        self.slice_rows = getattr(lib, SLICE_SYMBOLS[1])
        self.slice_rows.argtypes = [
            *(c_int, f64, i64, i64, p, i64, p, i64, p, f32),  # kind ... inv_t
            *(p, i64, p, p, i64, p, f32),  # stats, sn, sum_h, grad, gs, row_scale, scale
            *(p, p, p),  # values, hsums, flags
        ]
        for fn in (self.rows, self.slice_stats, self.slice_rows):
            fn.restype = None


def _dlopen(path: Path) -> _Library:
    """The kernel's entries in the library at ``path``, typed. OSError when the library does
    not load, RuntimeError when it lacks one of them."""
    return _Library(ctypes.CDLL(str(path)))


def _compile(commands: list[list[str]], out: str) -> None:
    error = ""
    for cmd in commands:
        try:
            proc = _run([*cmd, "-o", out, str(SOURCE), "-lm"])
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"{cmd[0]} did not compile {SOURCE.name} in {_TIMEOUT:g} s"
            ) from None
        except OSError as e:
            raise RuntimeError(f"the C compiler {cmd[0]} does not run: {e}") from e
        if proc.returncode == 0:
            if os.path.getsize(out) == 0:
                raise RuntimeError(f"{cmd[0]} exited 0 but wrote no library")
            return
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        error = lines[-1] if lines else f"exit status {proc.returncode}"
    raise RuntimeError(f"{commands[0][0]} could not compile {SOURCE.name}: {error}")


def _open(directory: Path, commands: list[list[str]], key: str) -> tuple[_Library, Path]:
    """The kernel from ``directory``: a verified cached build, else a fresh one installed
    there. OSError when the directory cannot be used, RuntimeError when no build works."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in sorted(directory.glob(f"cpu_kernel_{key}_*.so")):
        if path.name == f"cpu_kernel_{key}_{_digest(path)}.so" and _looks_like_library(path):
            # a library that is what its name says but does not load points at the directory
            # (noexec), so OSError goes up; one without the kernel is foreign
            with contextlib.suppress(RuntimeError):
                return _dlopen(path), path
        with contextlib.suppress(OSError):
            path.unlink()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        _compile(commands, tmp)
        fn = _dlopen(Path(tmp))
        path = directory / f"cpu_kernel_{key}_{_digest(Path(tmp))}.so"
        os.replace(tmp, path)  # atomic: other processes see the whole file or none
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fn, path


def _load() -> None:
    try:
        cc = _compiler()
        try:
            version = _run([*cc, "--version"]).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"the C compiler {cc[0]} does not run: {e}") from e
        commands = [[*cc, *flags, *_STRICT, *_COMMON] for flags in _FLAG_SETS]
        parts = [
            SOURCE.read_bytes(),
            repr(commands).encode(),
            version.encode(),
            platform.machine().encode(),
            _cpu_flags(),
        ]
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
        try:
            fn, path = _open(cache_dir(), commands, key)
        except OSError:
            # a cache that cannot be written or mapped (read-only or noexec home, a foreign
            # directory): build in a private directory, load, and remove it (the loaded
            # library stays mapped)
            private = Path(tempfile.mkdtemp(prefix="kldiv-"))
            try:
                fn, path = _open(private, commands, key)
            finally:
                shutil.rmtree(private, ignore_errors=True)
    except Exception as e:  # the kernel is optional: whatever stops it, tensor code runs
        _state["error"] = str(e) if isinstance(e, (OSError, RuntimeError)) else repr(e)
        return
    _state.update(fn=fn.rows, library=fn, path=path)


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
    w: float | None = None,
    maps: tuple[Any, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``kind`` of tempered float32 logits ``[n, v]`` (CPU, unit stride along rows;
    any row stride, 0 included) and, when ``grad`` is given, the gradient of their sum with
    respect to ``student`` written into it (``[n, v]`` float32, unit stride along rows).
    ``w`` is the weight of the kinds in :data:`WEIGHTED` (JS's ``beta``, the skew kinds'
    ``alpha``), 0 < w < 1; the other kinds ignore it.

    ``maps``: the (teacher, student) :class:`kldiv._spec.LogitMap`, applied to the logits
    before the temperature inside the kernel (the gradient is with respect to the unmapped
    student logits); None: neither.

    Returns ``(values, flagged)``: float64 ``[n]`` and bool ``[n]``. Flagged rows are left
    to the caller, with their value and gradient row unspecified: rows holding +inf or NaN,
    all ``-inf`` on a side, whose maximum ``logit/T`` exceeds 2^22 in magnitude at T ≠ 1,
    reverse KL's +inf rows, and every row of a skew kind with ``w`` below 2^-64. Rows with
    ``keep`` False are never read: value 0, gradient row 0.
    """
    if kind in WEIGHTED and not (w is not None and 0.0 < w < 1.0):
        raise ValueError(f"{kind} needs a weight strictly between 0 and 1, got {w!r}")
    fn = kernel()
    n, v = student.shape
    values = torch.empty(n, dtype=torch.float64)
    flags = torch.empty(n, dtype=torch.uint8)
    parts = max(1, min(torch.get_num_threads(), n)) if n * v >= _PARALLEL_MIN else 1
    # two row-long streams per range, each padded by the kernel's vector width (8 or 16)
    scratch = torch.empty((parts, 2 * (v + 16)), dtype=torch.float32)
    bounds = [n * k // parts for k in range(parts + 1)]
    code = KINDS[kind]
    packed = None
    if maps is not None and not all(m.identity for m in maps):
        packed = torch.tensor(spec.pack_maps(maps), dtype=torch.float32)

    def call(k: int) -> None:
        a, b = bounds[k], bounds[k + 1]
        if a == b:
            return
        fn(
            code,
            0.0 if w is None else w,
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
            None if packed is None else packed.data_ptr(),
        )

    if parts == 1:
        call(0)
    else:
        for future in [_executor(parts).submit(call, k) for k in range(parts)]:
            future.result()
    return values, flags.bool()


def _split(n: int, v: int, call: Any) -> None:
    """``call(a, b)`` over row ranges, one per intra-op thread when the work is large enough."""
    parts = max(1, min(torch.get_num_threads(), n)) if n * v >= _PARALLEL_MIN else 1
    bounds = [n * k // parts for k in range(parts + 1)]
    ranges = [(bounds[k], bounds[k + 1]) for k in range(parts) if bounds[k] < bounds[k + 1]]
    if len(ranges) <= 1:
        for a, b in ranges:
            call(a, b)
        return
    for future in [_executor(len(ranges)).submit(call, a, b) for a, b in ranges]:
        future.result()


def _library() -> _Library:
    kernel()
    return _state["library"]


def slice_stats(
    student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor | None, inv_t: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of vocabulary slices ``[n, v]`` of both float32 logits (CPU, unit stride along
    rows; ``v`` may be 0): ``[4, n]`` float32, the maxima of ``s/T`` and the log-sums
    ``log Σ exp(s/T − max)``, then the same for the teacher (``-inf, -inf`` for a side that is
    all ``-inf`` here), and the flagged rows ``[n]`` bool, left to the caller (+inf or NaN,
    or a maximum ``|logit/T|`` above 2^22 at T ≠ 1). Skipped rows (``keep`` False) read 0s."""
    lib = _library()
    n, v = student.shape
    stats = torch.empty((4, n), dtype=torch.float32)
    flags = torch.empty(n, dtype=torch.uint8)

    def call(a: int, b: int) -> None:
        lib.slice_stats(
            b - a,
            v,
            student[a].data_ptr(),
            student.stride(0),
            teacher[a].data_ptr(),
            teacher.stride(0),
            None if keep is None else keep[a:].data_ptr(),
            inv_t,
            stats[0, a:].data_ptr(),
            n,
            flags[a:].data_ptr(),
        )

    _split(n, max(v, 1), call)
    return stats, flags.bool()


def slice_rows(
    kind: str,
    w: float,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor | None,
    inv_t: float,
    stats: torch.Tensor,
    sum_h: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of vocabulary slices ``[n, v]`` of both float32 logits (CPU, unit stride along
    rows) and the *global* statistics ``stats`` (``[4, n]`` float32 contiguous: shift and
    log-normaliser of ``s/T``, then of ``t/T``): this slice's share of the divergence and of
    Σ_j h_j (float64 ``[n]`` each, ``h`` the gradient with respect to the student's
    log-probabilities, as in :mod:`kldiv._spec`; skew reverse KL's ``h`` leaves out its term
    ``q``, which sums to 1 over the row and cancels in the gradient), and the flagged rows
    (bool ``[n]``: +inf or NaN, statistics that are not finite, ``|shift|`` above 2^22 at
    T ≠ 1, a weight outside (0, 1); values and gradient rows unspecified there).

    Given ``sum_h`` (float64 ``[n]``, the global Σh) and ``grad`` (``[n, v]`` float32, unit
    stride along rows), also writes the slice's gradient ``(h − q·sum_h)·inv_t·row_scale``
    into ``grad`` (``row_scale`` float32 ``[n]``, or 1). Skipped rows (``keep`` False) are
    never read: 0, and a zero gradient row."""
    lib = _library()
    n, v = student.shape
    values = torch.empty(n, dtype=torch.float64)
    hsums = torch.empty(n, dtype=torch.float64)
    flags = torch.empty(n, dtype=torch.uint8)
    code = KINDS[kind]
    if grad is not None and sum_h is None:
        raise ValueError("the slice's gradient needs the global sum_h")

    def call(a: int, b: int) -> None:
        lib.slice_rows(
            code,
            w,
            b - a,
            v,
            student[a].data_ptr(),
            student.stride(0),
            teacher[a].data_ptr(),
            teacher.stride(0),
            None if keep is None else keep[a:].data_ptr(),
            inv_t,
            stats[0, a:].data_ptr(),
            n,
            None if sum_h is None else sum_h[a:].data_ptr(),
            None if grad is None else grad[a].data_ptr(),
            0 if grad is None else grad.stride(0),
            None if row_scale is None else row_scale[a:].data_ptr(),
            1.0,
            values[a:].data_ptr(),
            hsums[a:].data_ptr(),
            flags[a:].data_ptr(),
        )

    _split(n, max(v, 1), call)
    return values, hsums, flags.bool()
