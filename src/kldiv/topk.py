"""Stored top-k teachers: a teacher's top-k log-probabilities per token, written once to a
directory of safetensors shards and read back, a token range at a time, as a
:class:`kldiv.torch.TopKTeacher` for offline distillation.

Per token ``t`` with teacher logits ``z_t`` ``[V]`` and temperature ``T``, with
``x = (z_t − max z_t) / T`` computed in float32 (float64 for float64 logits; the maximum is
subtracted first, so the rounding errors scale with the log-probabilities, not with the
logits' offset, and no temperature overflows) and ``S`` the ``K`` ids of largest ``x``:

- ``indices``: int32 ``[tokens, K]``, the ids ``S`` in decreasing order of probability;
- ``log_probs``: ``[tokens, K]`` in the chosen dtype (float16, bfloat16 or float32), the
  teacher's log-probabilities of those ids under its *full* tempered softmax,
  ``x_S − logsumexp(x)`` (not renormalised over the K ids);
- ``tail_log_prob``: float32 ``[tokens]``, the log of the mass outside the K ids,
  ``log(1 − Σ_S p) = logsumexp(x over ids ∉ S) − logsumexp(x)``, computed from the full logits
  before any rounding: accurate to float32's relative precision however small the tail is
  (``-inf`` when ``K = V`` or every other id has a ``-inf`` logit). ``1 − Σ exp(log_probs)``
  of the stored values could not give it: in float16 the rounding of ``Σp`` is ~1e-3, so a
  confident teacher's tail of 1e-6 reads as noise, or as 0;
- ``input_ids`` (optional): int32 ``[tokens]``, the input token at each position, when the
  writer was given them (``kldiv teacher-topk --model`` stores them), so that a student can be
  run on the same inputs.

Layout of a directory::

    manifest.json                 what the shards hold (below)
    shard-00000.safetensors       tokens [0, n0)
    shard-00001.safetensors       tokens [n0, n1) ...

``manifest.json``: ``format`` (``"kldiv.topk"``), ``format_version`` (1), ``teacher`` (a JSON
object saying where the logits came from: model path or name, revision when known, ...),
``vocab_size``, ``k``, ``temperature``, ``dtype`` (of ``log_probs``), ``num_tokens``,
``token_shape`` (the shape the tokens had, e.g. ``[windows, ctx]``; the shards hold them
flattened in C order), ``input_ids`` (whether the shards hold them), ``shards`` (a list of
``{"file", "start", "stop"}``, contiguous token ranges covering ``[0, num_tokens)``, each file
listed once) and ``kldiv_version``. Each shard's safetensors metadata repeats ``format``,
``start`` and ``stop`` (as strings): :func:`load` refuses a shard whose range is not the one
the manifest gives it (shards swapped or copied from another store).

Writing is streamed (:class:`TopKWriter`): memory stays at one shard's buffer and one block of
logits, whatever the number of tokens; :func:`save` writes in-memory logits through it. The
writer fills a hidden sibling directory and renames it to the destination when it closes, so a
failed or interrupted run leaves no half-written directory. :func:`load` reads the manifest and
only the shards that overlap the requested token range, through ``safe_open`` (each shard is
memory-mapped, and only the rows of the range are copied out).

Needs PyTorch and safetensors (``pip install "kldiv[torch,cli]"``); they are imported when a
function runs, so ``import kldiv.topk`` imports no framework.
"""

from __future__ import annotations

import errno
import json
import math
import numbers
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from ._defaults import TailPolicy
from ._version import __version__

if TYPE_CHECKING:
    import torch

    from .torch.topk import TopKTeacher

__all__ = [
    "TopKWriter",
    "save",
    "load",
    "load_input_ids",
    "read_manifest",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "DTYPES",
]

FORMAT = "kldiv.topk"
"""The ``format`` field of every manifest."""
FORMAT_VERSION = 1
"""The ``format_version`` this release writes and reads."""
MANIFEST = "manifest.json"
"""The manifest's file name inside a top-k directory."""
StoredDtype = Literal["float16", "bfloat16", "float32"]
DTYPES: tuple[str, ...] = get_args(StoredDtype)
"""The dtypes ``log_probs`` may be stored in."""

# Default shard size, in bytes of indices + log_probs + tail (+ input ids): big enough that a
# shard's header and file cost nothing, small enough that one shard's buffer is a modest part
# of a machine's memory.
SHARD_BYTES = 256 << 20
# Elements of float32 scratch per block of logits (two [rows, V] copies are made): 16 MiB each.
_BLOCK_ELEMENTS = 4 << 20


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError('kldiv.topk needs PyTorch: pip install "kldiv[torch,cli]"') from None
    return torch


def _safetensors_torch() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(
            'kldiv.topk needs the safetensors package: pip install "kldiv[torch,cli]"'
        ) from None
    return safetensors.torch


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}.")
    return int(value)


def _check_temperature(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 < float(value) < math.inf
    ):
        raise ValueError(f"Expected `temperature` to be a finite float > 0, got {value!r}.")
    return float(value)


def _write_error(e: Exception, file: Path) -> OSError:
    """An ``OSError`` for ``file`` from safetensors' error ``e``, whose text carries the I/O
    error (``Error while serializing: I/O error: File too large (os error 27)``)."""
    text = " ".join(str(e).split()) or type(e).__name__
    found = re.search(r"os error (\d+)|code: (\d+)", text)
    if found:
        code = int(found[1] or found[2])
        return OSError(code, os.strerror(code), str(file))
    return OSError(errno.EIO, text, str(file))


def _check_new_dir(path: Path) -> None:
    """``path`` must not exist, or be an empty directory; its parent must exist."""
    if path.is_symlink():
        raise ValueError(
            f"Expected `path` to be a new or empty directory, got the symbolic link {path}."
        )
    if path.exists() and not path.is_dir():
        raise ValueError(f"Expected `path` to be a new or empty directory, got the file {path}.")
    if path.is_dir() and any(path.iterdir()):
        raise ValueError(
            f"Expected `path` to be a new or empty directory, got {path}, which holds files "
            "(stored teachers are never overwritten)."
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"Expected the parent of `path` to be a directory, got {parent}.")


class TopKWriter:
    """Streams a teacher's top-k log-probabilities into a new directory of shards.

    ``TopKWriter(path, k, *, vocab_size=None, temperature=1.0, dtype="float32",
    shard_tokens=None, teacher=None, token_shape=None)``; then :meth:`add` blocks of logits
    ``[..., V]`` (and optionally the input ids of their positions), in token order, and
    :meth:`close` (or use it as a context manager: closed on success, removed on an error).

    ``path``: a directory that must not exist yet (or be empty); nothing appears there until
    :meth:`close`, which renames a hidden sibling (``.<name>.<random>``, see :attr:`staging`)
    into place. ``k``: ids kept per token (1 ≤ k ≤ V). ``vocab_size``: V, checked against every
    block (default: the first block's). ``temperature``: T > 0; the stored values are those of
    ``softmax(logits / T)``. ``dtype``: of the stored ``log_probs``, ``"float16"``,
    ``"bfloat16"`` or ``"float32"`` (the tail is always float32). ``shard_tokens``: tokens per
    shard file (default: about 256 MiB of data per shard); memory holds one shard's buffer.
    ``teacher``: a JSON-serialisable mapping stored as the manifest's ``teacher`` (say where the
    logits came from: model name or path, revision, ...). ``token_shape``: the shape the tokens
    have (e.g. ``(windows, ctx)``), recorded in the manifest; its product must equal the number
    of tokens written (default: ``[num_tokens]``).

    Logits may be NumPy arrays (any byte order; longdouble is read as float64) or torch
    tensors (float16, bfloat16, float32 or float64, on any device); they are computed in
    float32 (float64 stays float64). A NaN or ``+inf`` logit, or
    a token whose logits are all ``-inf``, raises ``ValueError`` naming the token. Any error in
    :meth:`add` or :meth:`close` discards the whole write (the hidden directory is removed and
    the writer can no longer be used): a store is written completely or not at all.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        k: int,
        *,
        vocab_size: int | None = None,
        temperature: float = 1.0,
        dtype: StoredDtype = "float32",
        shard_tokens: int | None = None,
        teacher: Mapping[str, Any] | None = None,
        token_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.path = Path(path)
        self.k = _positive_int("k", k)
        if vocab_size is not None:
            vocab_size = _positive_int("vocab_size", vocab_size)
            if self.k > vocab_size:
                raise ValueError(f"Expected `k` ≤ `vocab_size` = {vocab_size}, got k = {self.k}.")
        self.vocab_size = vocab_size
        self.temperature = _check_temperature(temperature)
        if dtype not in DTYPES:
            raise ValueError(
                f"Expected `dtype` to be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}."
            )
        self.dtype: StoredDtype = dtype
        self._shard_tokens = (
            None if shard_tokens is None else _positive_int("shard_tokens", shard_tokens)
        )
        if teacher is not None and not isinstance(teacher, Mapping):
            raise TypeError(
                f"Expected `teacher` to be a mapping (e.g. a dict) or None, got "
                f"{type(teacher).__name__}."
            )
        try:
            self._teacher = json.loads(json.dumps(dict(teacher or {}), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise TypeError(f"Expected `teacher` to be JSON-serialisable ({e}).") from None
        if token_shape is not None:
            if not isinstance(token_shape, (tuple, list)) or not all(
                isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0
                for d in token_shape
            ):
                raise ValueError(
                    f"Expected `token_shape` to be a tuple of non-negative ints, got "
                    f"{token_shape!r}."
                )
            token_shape = tuple(int(d) for d in token_shape)
        self._token_shape = token_shape
        _check_new_dir(self.path)
        parent = self.path.parent if str(self.path.parent) else Path(".")
        self.staging = parent / f".{self.path.name[:200]}.{secrets.token_hex(4)}"
        """The hidden directory being written (created on the first shard or at close)."""
        # One preallocated buffer per tensor, a shard long: blocks are copied in and a full
        # buffer is written out. Keeping the blocks themselves until a flush would interleave
        # small long-lived allocations with the large temporary ones, and the allocator's heap
        # then grows with every block (measured: +1.2 bytes per byte of logits read).
        self._buf: dict[str, Any] | None = None
        self._buffered = 0
        self._shards: list[dict[str, Any]] = []
        self._num_tokens = 0
        self._input_ids: bool | None = None  # whether blocks come with input ids
        self._state = "open"

    @property
    def num_tokens(self) -> int:
        """Tokens added so far."""
        return self._num_tokens

    def _per_token_bytes(self) -> int:
        size = 2 if self.dtype != "float32" else 4
        return self.k * (4 + size) + 4 + (4 if self._input_ids else 0)

    def _shard_size(self) -> int:
        if self._shard_tokens is None:
            self._shard_tokens = max(1, SHARD_BYTES // self._per_token_bytes())
        return self._shard_tokens

    def add(self, logits: Any, input_ids: Any = None) -> None:
        """Append the tokens of ``logits`` ``[..., V]`` (flattened in C order), with
        ``input_ids`` (integer, the token shape ``[...]``) when the directory is to hold them:
        given for every block or for none."""
        torch = _torch()
        if self._state != "open":
            raise ValueError(f"Expected an open writer, got one that is {self._state}.")
        try:
            self._add(torch, logits, input_ids)
        except BaseException:
            self.abort()
            raise

    def _add(self, torch: Any, logits: Any, input_ids: Any) -> None:
        if isinstance(logits, np.ndarray):
            if logits.dtype.kind != "f" or logits.dtype.itemsize < 2:
                raise TypeError(f"Expected floating `logits`, got dtype {logits.dtype}.")
            if logits.dtype.itemsize > 8:  # longdouble: no torch dtype; float64 is its precision
                logits = logits.astype(np.float64)
            elif not logits.dtype.isnative:  # e.g. a big-endian .npy: torch takes native only
                logits = logits.astype(logits.dtype.newbyteorder("="))
            logits = torch.from_numpy(np.ascontiguousarray(logits))
        elif not isinstance(logits, torch.Tensor):
            raise TypeError(
                f"Expected `logits` to be a NumPy array or a torch tensor, got "
                f"{type(logits).__name__}."
            )
        if not logits.is_floating_point():
            raise TypeError(f"Expected floating `logits`, got dtype {logits.dtype}.")
        if logits.ndim == 0:
            raise ValueError("Expected `logits` of shape [..., V], got a 0-d array.")
        v = int(logits.shape[-1])
        if self.vocab_size is None:
            if v < self.k:
                raise ValueError(f"Expected `k` ≤ V = {v} (the logits' last axis), got {self.k}.")
            self.vocab_size = v
        elif v != self.vocab_size:
            raise ValueError(
                f"Expected `logits` with V = {self.vocab_size} entries on the last axis, got "
                f"shape {tuple(logits.shape)}."
            )
        z = logits.detach().reshape(-1, v)
        n = z.shape[0]
        given = input_ids is not None
        if self._input_ids is None:
            self._input_ids = given
        elif given != self._input_ids:
            raise ValueError(
                "Expected `input_ids` with every block or with none, got a block "
                + ("with them after blocks without." if given else "without them.")
            )
        ids = self._check_ids(torch, input_ids, tuple(logits.shape[:-1])) if given else None
        rows = max(1, _BLOCK_ELEMENTS // max(1, v))
        for s in range(0, n, rows):
            block = self._topk(torch, z[s : s + rows], self._num_tokens + s)
            if ids is not None:
                block["input_ids"] = ids[s : s + rows]
            self._append(torch, block)
        self._num_tokens += n

    def _check_ids(self, torch: Any, input_ids: Any, shape: tuple[int, ...]) -> Any:
        t = torch.from_numpy(np.asarray(input_ids)) if not torch.is_tensor(input_ids) else input_ids
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"Expected integer `input_ids`, got dtype {t.dtype}.")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"Expected `input_ids` of the token shape {shape}, got {tuple(t.shape)}."
            )
        t = t.detach().reshape(-1).cpu()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > np.iinfo(np.int32).max):
            raise ValueError(
                f"Expected `input_ids` in [0, 2**31), got values in [{int(t.min())}, "
                f"{int(t.max())}]."
            )
        return t.to(torch.int32)

    def _topk(self, torch: Any, z: Any, offset: int) -> dict[str, Any]:
        """The stored tensors of one block of rows ``z`` ``[n, V]`` (on the CPU)."""
        cdtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        x = z.to(cdtype)
        bad = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1) | torch.isneginf(x).all(-1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            what = (
                "a NaN"
                if bool(torch.isnan(x[row]).any())
                else "a +inf"
                if bool(torch.isposinf(x[row]).any())
                else "only -inf"
            )
            raise ValueError(
                f"Expected finite logits (-inf marks an excluded id) with at least one > -inf "
                f"per token, got {what} logit{'s' if what == 'only -inf' else ''} in token "
                f"{offset + row}."
            )
        # x − max(x) first (exact for the ids near the top, rounded relative to the
        # difference otherwise), then / T: the errors scale with the log-probs, not with the
        # logits' offset, and no temperature can overflow to +inf (the largest is 0; a
        # difference beyond the dtype's range becomes -inf, which it rounds to)
        x = x - x.amax(-1, keepdim=True)
        if self.temperature != 1.0:
            t = torch.tensor(self.temperature, dtype=cdtype)
            if not 0.0 < float(t) < math.inf:
                raise ValueError(
                    f"Expected `temperature` within {str(cdtype).rsplit('.', 1)[-1]}'s range "
                    f"(the logits are computed in it), got {self.temperature!r}, which rounds "
                    f"to {float(t)!r} there."
                )
            x = x / t.to(x.device)
        lse = torch.logsumexp(x, dim=-1)
        values, ids = x.topk(self.k, dim=-1)
        # the rest of the vocabulary summed directly: 1 − Σp of the top k would cancel
        tail = torch.logsumexp(x.scatter(1, ids, -math.inf), dim=-1) - lse
        return {
            "indices": ids.to(torch.int32).cpu(),
            "log_probs": (values - lse[:, None]).to(getattr(torch, self.dtype)).cpu(),
            "tail_log_prob": tail.to(torch.float32).cpu(),
        }

    def _append(self, torch: Any, block: dict[str, Any]) -> None:
        size = self._shard_size()
        if self._buf is None:  # torch.empty: pages become resident only as they are filled
            self._buf = {
                name: torch.empty((size, *t.shape[1:]), dtype=t.dtype) for name, t in block.items()
            }
        done, n = 0, block["indices"].shape[0]
        while done < n:
            take = min(size - self._buffered, n - done)
            for name, t in block.items():
                self._buf[name][self._buffered : self._buffered + take] = t[done : done + take]
            self._buffered += take
            done += take
            if self._buffered == size:
                self._flush(torch)

    def _flush(self, torch: Any) -> None:
        if not self._buffered or self._buf is None:
            return
        st = _safetensors_torch()
        tensors = {name: t[: self._buffered] for name, t in self._buf.items()}
        start = self._shards[-1]["stop"] if self._shards else 0
        stop = start + self._buffered
        self._buffered = 0
        if not self.staging.exists():
            os.mkdir(self.staging)
        name = _shard_name(len(self._shards))
        try:
            st.save_file(
                tensors,
                str(self.staging / name),
                metadata={"format": FORMAT, "start": str(start), "stop": str(stop)},
            )
        except OSError:
            raise
        except Exception as e:  # safetensors' own SafetensorError, e.g. a full disk
            raise _write_error(e, self.staging / name) from None
        # safetensors creates its files 0600; the mode the umask gives (that of the directory,
        # made by mkdir, less the execute bits), as for any file the user writes
        os.chmod(self.staging / name, os.stat(self.staging).st_mode & 0o666)
        self._shards.append({"file": name, "start": start, "stop": stop})

    def close(self) -> Path:
        """Write the last shard and the manifest, and move the directory into place; returns
        its path. On any failure nothing is left behind."""
        if self._state != "open":
            raise ValueError(f"Expected an open writer, got one that is {self._state}.")
        try:
            if self.vocab_size is None:
                raise ValueError(
                    "Expected at least one block of logits, or `vocab_size`, before close: the "
                    "manifest needs the vocabulary size."
                )
            shape = (self._num_tokens,) if self._token_shape is None else self._token_shape
            if math.prod(shape) != self._num_tokens:
                raise ValueError(
                    f"Expected `token_shape` {shape} to hold the {self._num_tokens} tokens written."
                )
            torch = _torch()
            self._flush(torch)
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "teacher": self._teacher,
                "vocab_size": self.vocab_size,
                "k": self.k,
                "temperature": self.temperature,
                "dtype": self.dtype,
                "num_tokens": self._num_tokens,
                "token_shape": list(shape),
                "input_ids": bool(self._input_ids),
                "shards": self._shards,
                "kldiv_version": __version__,
            }
            if not self.staging.exists():
                os.mkdir(self.staging)
            (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            # rename() replaces an empty directory at path (POSIX) and fails on a full one
            os.rename(self.staging, self.path)
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return self.path

    def abort(self) -> None:
        """Discard everything written: the hidden directory is removed, ``path`` untouched."""
        if self._state == "open":
            self._state = "aborted"
        self._buf = None
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> TopKWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()


def save(
    path: str | os.PathLike[str],
    logits: Any,
    k: int,
    *,
    temperature: float = 1.0,
    dtype: StoredDtype = "float32",
    shard_tokens: int | None = None,
    teacher: Mapping[str, Any] | None = None,
    input_ids: Any = None,
) -> Path:
    """Store the top ``k`` of in-memory ``logits`` ``[..., V]`` (NumPy or torch) in a new
    directory ``path``; see :class:`TopKWriter` for the arguments and the module doc for the
    format. ``input_ids``: optional, the token shape ``[...]``. The manifest's ``token_shape``
    is ``logits.shape[:-1]``. Returns ``path``."""
    shape = getattr(logits, "shape", None)
    if shape is None or len(shape) == 0:
        raise ValueError(f"Expected `logits` of shape [..., V], got {type(logits).__name__}.")
    with TopKWriter(
        path,
        k,
        vocab_size=None,
        temperature=temperature,
        dtype=dtype,
        shard_tokens=shard_tokens,
        teacher=teacher,
        token_shape=tuple(int(d) for d in shape[:-1]),
    ) as writer:
        writer.add(logits, input_ids)
    return writer.path


def _manifest_error(path: Path, problem: str) -> ValueError:
    return ValueError(f"Expected a kldiv top-k directory at `path`, got {path}: {problem}.")


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the top-k directory ``path``, checked: the fields the module doc lists,
    of the right types, and shards that cover ``[0, num_tokens)`` in order. A missing or
    corrupt manifest raises ``ValueError``."""
    root = Path(path)
    if not root.is_dir():
        raise _manifest_error(root, "no such directory")
    try:
        text = (root / MANIFEST).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _manifest_error(root, f"no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _manifest_error(root, f"cannot read {MANIFEST} ({e})") from None
    try:
        m = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _manifest_error(root, f"{MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _manifest_error(root, f"{MANIFEST} does not say format {FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise _manifest_error(
            root,
            f"format_version {m.get('format_version')!r}; this kldiv reads {FORMAT_VERSION}",
        )

    def is_int(x: Any, low: int = 0) -> bool:
        return type(x) is int and x >= low

    checks = {
        "vocab_size": is_int(m.get("vocab_size"), 1),
        "k": is_int(m.get("k"), 1)
        and (not is_int(m.get("vocab_size"), 1) or m["k"] <= m["vocab_size"]),
        "temperature": type(m.get("temperature")) in (int, float)
        and 0 < m["temperature"] < math.inf,
        "dtype": m.get("dtype") in DTYPES,
        "num_tokens": is_int(m.get("num_tokens")),
        "token_shape": isinstance(m.get("token_shape"), list)
        and all(is_int(d) for d in m["token_shape"])
        and math.prod(m["token_shape"]) == m.get("num_tokens"),
        "input_ids": type(m.get("input_ids")) is bool,
        "teacher": isinstance(m.get("teacher"), dict),
        "shards": isinstance(m.get("shards"), list),
    }
    for field, ok in checks.items():
        if not ok:
            raise _manifest_error(root, f"its field {field!r} is missing or invalid")
    at = 0
    files: set[str] = set()
    for i, s in enumerate(m["shards"]):
        if not (
            isinstance(s, dict)
            and isinstance(s.get("file"), str)
            and Path(s["file"]).name == s["file"]
            and s["file"] not in ("", ".", "..")
            and is_int(s.get("start"))
            and is_int(s.get("stop"))
            and s["start"] == at
            and s["stop"] > at
        ):
            raise _manifest_error(root, f"shard {i} of {MANIFEST} is malformed or out of order")
        if s["file"] in files:
            raise _manifest_error(root, f"shard {i} of {MANIFEST} repeats the file {s['file']}")
        files.add(s["file"])
        at = s["stop"]
    if at != m["num_tokens"]:
        raise _manifest_error(
            root, f"its shards hold {at} tokens, its num_tokens says {m['num_tokens']}"
        )
    return m


def _token_range(m: dict[str, Any], start: int | None, stop: int | None) -> tuple[int, int]:
    n = m["num_tokens"]
    lo = 0 if start is None else start
    hi = n if stop is None else stop
    for name, value in (("start", lo), ("stop", hi)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"Expected `{name}` to be an int or None, got {value!r}.")
    if not 0 <= lo <= hi <= n:
        raise ValueError(
            f"Expected 0 ≤ `start` ≤ `stop` ≤ {n} (the stored tokens), got start={start!r}, "
            f"stop={stop!r}."
        )
    return int(lo), int(hi)


def _read_rows(
    root: Path, m: dict[str, Any], lo: int, hi: int, names: tuple[str, ...]
) -> dict[str, Any]:
    """The rows ``[lo, hi)`` of the tensors ``names``, concatenated from the shards that overlap
    them (the others are not opened)."""
    torch = _torch()
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError(
            'kldiv.topk needs the safetensors package: pip install "kldiv[torch,cli]"'
        ) from None
    k, dtype = m["k"], getattr(torch, m["dtype"])
    want = {
        "indices": (torch.int32, (k,)),
        "log_probs": (dtype, (k,)),
        "tail_log_prob": (torch.float32, ()),
        "input_ids": (torch.int32, ()),
    }
    parts: dict[str, list[Any]] = {name: [] for name in names}
    for s in m["shards"]:
        if s["stop"] <= lo or s["start"] >= hi:
            continue
        file = root / s["file"]
        a, b = max(lo, s["start"]) - s["start"], min(hi, s["stop"]) - s["start"]
        try:
            with safe_open(str(file), framework="pt") as f:
                # the writer records each shard's range: a shard swapped with another, or
                # copied from another store, is refused rather than read as these tokens
                meta = f.metadata() or {}
                said = (meta.get("format"), meta.get("start"), meta.get("stop"))
                if said != (FORMAT, str(s["start"]), str(s["stop"])):
                    what = (
                        f"holds tokens [{said[1]}, {said[2]})"
                        if said[0] == FORMAT
                        else f"is not a {FORMAT} shard (its metadata says format {said[0]!r})"
                    )
                    raise _manifest_error(
                        root,
                        f"{s['file']} {what}, the manifest says tokens [{s['start']}, {s['stop']})",
                    )
                for name in names:
                    sl = f.get_slice(name)
                    dt, tail_shape = want[name]
                    shape = tuple(sl.get_shape())
                    if shape != (s["stop"] - s["start"], *tail_shape):
                        raise _manifest_error(
                            root,
                            f"{s['file']} holds {name} of shape {shape}, the manifest says "
                            f"{(s['stop'] - s['start'], *tail_shape)}",
                        )
                    t = sl[a:b]
                    if t.dtype != dt:
                        raise _manifest_error(
                            root, f"{s['file']} holds {name} as {t.dtype}, expected {dt}"
                        )
                    parts[name].append(t)
        except FileNotFoundError:
            raise _manifest_error(root, f"its shard {s['file']} is missing") from None
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError on a bad file
            text = str(e).strip().splitlines()
            raise _manifest_error(
                root, f"its shard {s['file']} is not readable ({text[0] if text else e})"
            ) from None
    out = {}
    for name in names:
        dt, tail_shape = want[name]
        out[name] = (
            torch.cat(parts[name]) if parts[name] else torch.empty((0, *tail_shape), dtype=dt)
        )
    return out


def load(
    path: str | os.PathLike[str],
    start: int | None = None,
    stop: int | None = None,
    *,
    tail: TailPolicy,
    temperature: float | None = None,
    device: Any = None,
    check: bool = False,
) -> TopKTeacher:
    """The stored tokens ``[start, stop)`` of the top-k directory ``path`` (default: all) as a
    :class:`kldiv.torch.TopKTeacher` with ``indices`` int32 ``[n, K]``, ``log_probs`` ``[n, K]``
    in the stored dtype and ``tail_log_prob`` float32 ``[n]``, ``n = stop − start``, flat in
    token order (reshape with the manifest's ``token_shape`` when a range is whole rows of it).

    ``tail`` (required): the policy, ``"tail_bucket"`` (the mass outside the ids is one more
    outcome; the stored ``tail_log_prob`` is its teacher probability, accurate however small)
    or ``"renormalize"``; see :mod:`kldiv.torch.topk`. ``temperature``: when given, must equal
    the temperature the teacher was stored at (a guard against distilling at another one;
    the stored values cannot be re-tempered for ``"tail_bucket"``; compared to a relative
    1e-6). ``device``: where the
    tensors go (default CPU). ``check``: passed to the teacher (validate the data when it is
    used). Only the shards that overlap the range are opened, each memory-mapped, and only the
    range's rows are read. A missing or corrupt manifest or shard, or a range outside
    ``[0, num_tokens]``, raises ``ValueError``.

    Temperature: the returned ``log_probs`` and ``tail_log_prob`` are those of
    ``softmax(logits / T_s)``, ``T_s`` the temperature the store was written at (the
    manifest's ``temperature``), whatever ``temperature`` is passed here: loading never
    re-tempers. :class:`~kldiv.torch.DistillationLoss`'s own ``temperature=T`` then applies on
    top of that: with ``"renormalize"`` it divides the loaded log-probs by ``T`` again (the
    teacher becomes ``softmax(logits / (T_s·T))`` over its ids, the student
    ``softmax(student_logits / T)``), and with ``"tail_bucket"`` any ``T ≠ 1`` raises. So
    temper once: store at ``T_s = 1`` and pass ``T`` to the loss (``"renormalize"`` only), or
    store at ``T_s = T``, keep the loss at ``temperature=1`` and divide the student logits by
    ``T`` yourself. (The teacher does not carry ``T_s``, so the loss cannot check this.)
    """
    from .torch.topk import TopKTeacher

    root = Path(path)
    m = read_manifest(root)
    if temperature is not None:
        t = _check_temperature(temperature)
        if not math.isclose(t, m["temperature"], rel_tol=1e-6):
            raise ValueError(
                f"Expected `temperature` to match the stored teacher's {m['temperature']!r}, "
                f"got {t!r}: its log-probs are those of softmax(logits / "
                f"{m['temperature']!r})."
            )
    lo, hi = _token_range(m, start, stop)
    rows = _read_rows(root, m, lo, hi, ("indices", "log_probs", "tail_log_prob"))
    ids = rows["indices"]
    # [n, K] integer work: an id outside the vocabulary is a corrupt file, not a data rule that
    # the teacher would turn into NaN losses much later
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= m["vocab_size"]):
        raise _manifest_error(
            root,
            f"its shards hold ids in [{int(ids.min())}, {int(ids.max())}] for tokens "
            f"[{lo}, {hi}), outside the vocabulary [0, {m['vocab_size']})",
        )
    if device is not None:
        rows = {name: t.to(device) for name, t in rows.items()}
    return TopKTeacher(
        rows["indices"],
        rows["log_probs"],
        tail=tail,
        check=check,
        tail_log_prob=rows["tail_log_prob"],
    )


def load_input_ids(
    path: str | os.PathLike[str], start: int | None = None, stop: int | None = None
) -> torch.Tensor:
    """The stored input ids of the tokens ``[start, stop)`` of ``path``, int32 ``[n]`` (the
    input token at each position, whose next-token distribution the teacher row is). Raises
    ``ValueError`` when the directory holds none."""
    root = Path(path)
    m = read_manifest(root)
    if not m["input_ids"]:
        raise ValueError(
            f"Expected a top-k directory with input ids, got {root}, which holds none (they are "
            "stored when the writer is given them, e.g. by kldiv teacher-topk --model)."
        )
    lo, hi = _token_range(m, start, stop)
    ids: torch.Tensor = _read_rows(root, m, lo, hi, ("input_ids",))["input_ids"]
    return ids
