"""llama.cpp's KL-divergence base files: read them, write them, and score against them.

``llama-perplexity --kl-divergence-base FILE`` stores a reference model's next-token
log-probabilities; ``llama-perplexity --kl-divergence`` later scores a quantized model against
them. This module reads such a file (to score any model, not only a GGUF one, against it) and
writes one from reference logits computed anywhere (so that a GGUF can be scored against a
reference run elsewhere, e.g. in bfloat16 with transformers).

The file (all values little-endian)::

    8 bytes            the magic  _logits_
    int32              n_ctx      tokens per window
    int32              n_vocab    vocabulary size V
    int32              n_chunk    number of windows
    int32 × n_chunk·n_ctx         the tokens, window after window
    per window, for each scored position t = n_ctx/2, …, n_ctx − 2 (n_ctx − 1 − n_ctx/2 rows):
        float32        scale
        float32        min_log_prob
        uint16 × V     q, the log-probability of each vocabulary entry on a grid
        uint16 × (V mod 2)   padding to a multiple of 4 bytes

Window ``c`` is ``tokens[c]``, evaluated from an empty context, with its first token replaced
by the model's BOS token when the model's vocabulary adds one (the stored tokens keep the
original). The row of position ``t`` holds the distribution of the token at ``t + 1`` given
positions ``0 … t``; the first half of each window is context and is not scored.

Each row quantizes the log-probabilities to 16 bits over a window of at most 16 nats below the
most likely entry: with ``m`` and ``M`` the smallest and largest logits of the row, the bottom
is ``b = max(m, M − 16)``, ``scale = (M − b)/65535``, ``min_log_prob`` is the log-probability
of ``b``, and ``q_v = round((logit_v − b)/scale)`` (0 for every entry at or below ``b``). So a
stored log-probability is ``scale·q_v + min_log_prob``, within ``scale/2 ≤ 1.22e-4`` nats of the
value it stores, and an entry more than 16 nats below the top one is stored at the bottom of the
window: its value is lost.

>>> import numpy as np, tempfile, os
>>> from kldiv.llamacpp import read_base, write_base
>>> rng = np.random.default_rng(0)
>>> tokens = rng.integers(0, 50, size=(2, 8))           # 2 windows of 8 tokens
>>> logits = rng.normal(size=(2, 8, 50)) * 3             # the reference model's outputs
>>> path = os.path.join(tempfile.mkdtemp(), "base.kld")
>>> write_base(path, tokens, logits)
>>> with read_base(path) as base:
...     print(base.n_ctx, base.n_vocab, base.n_chunk, base.positions.tolist())
...     lp = next(base.iter_log_probs())               # window 0, positions 4..6
8 50 2 [4, 5, 6]
>>> exact = logits[0, 4:7] - np.log(np.exp(logits[0, 4:7]).sum(-1, keepdims=True))
>>> lp.shape, bool(np.abs(lp - exact)[np.isfinite(lp)].max() < 1.3e-4)
((3, 50), True)
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

__all__ = [
    "MAGIC",
    "WINDOW_NATS",
    "BaseFileError",
    "QuantizedRows",
    "LlamaBase",
    "read_base",
    "write_base",
    "quantize_rows",
    "decode_rows",
    "ParityStats",
    "ParityReport",
    "ParityTokens",
    "parity_token_values",
]

MAGIC = b"_logits_"
"""The 8 bytes every base file starts with."""

WINDOW_NATS = 16.0
"""The depth of the window each row stores, in nats below the row's most likely entry."""

_HEADER = struct.Struct("<8siii")
_LEVELS = np.float32(65535.0)


class BaseFileError(ValueError):
    """A file that is not a valid base file (foreign, truncated, inconsistent); the message is
    one line that starts with the file's name."""


class QuantizedRows(NamedTuple):
    """The stored form of some rows: ``scale`` and ``min_log_prob`` (float32, one per row) and
    ``q`` (uint16, ``[rows, V]``). A stored log-probability is ``scale·q + min_log_prob``."""

    scale: np.ndarray
    min_log_prob: np.ndarray
    q: np.ndarray


def _unwritable(rows: QuantizedRows, n_vocab: int) -> tuple[int, str, float] | None:
    """The first row whose ``scale`` or ``min_log_prob`` llama.cpp never writes (its index,
    the field, the value), or None."""
    scale = np.asarray(rows.scale, dtype=np.float64)
    mlp = np.asarray(rows.min_log_prob, dtype=np.float64)
    # llama.cpp writes 0 <= scale <= 16/65535 (the window over its levels) and a minimum of at
    # least -16 - log V (the window below the top, minus the log-sum-exp); a little float32
    # slack on both
    bad = ~(np.isfinite(scale) & (scale >= 0) & (scale <= _MAX_SCALE))
    what = "scale"
    if not bad.any():
        floor = -(WINDOW_NATS + math.log(n_vocab)) - 1e-3
        bad = ~(np.isfinite(mlp) & (mlp <= 0) & (mlp >= floor))
        what = "min_log_prob"
    if not bad.any():
        return None
    r = int(np.flatnonzero(bad)[0])
    return r, what, float(scale[r] if what == "scale" else mlp[r])


# --------------------------------------------------------------------------------------------
# The row quantization and its inverse


def quantize_rows(logits: ArrayLike) -> QuantizedRows:
    """Quantize rows of logits as ``llama-perplexity --kl-divergence-base`` does.

    ``logits`` (``[..., V]``, any real floating dtype; log-probabilities work too, since a
    log-softmax ignores a shift) is first rounded to float32, the precision llama.cpp's logits
    have, and every step then runs in llama.cpp's precision: float32 arithmetic, the sum of the
    exponentials accumulated in float64 and its logarithm rounded to float32, rounding to the
    nearest integer with ties to even. The result matches the bytes llama.cpp writes for the
    same float32 logits (the exponentials' last bit may differ between math libraries, which
    moves ``min_log_prob`` by one float32 step in rare rows; ``scale`` and ``q`` do not depend
    on it).

    ``-inf`` logits are allowed (stored at the bottom of the window); NaN, ``+inf`` and rows
    with no finite logit raise ``ValueError``.

    Returns
    -------
    QuantizedRows
        ``scale``, ``min_log_prob`` of shape ``logits.shape[:-1]`` and ``q`` of the shape of
        ``logits``.
    """
    x = np.asarray(logits)
    if x.dtype.kind != "f":
        raise TypeError(f"Expected floating-point logits, got dtype {x.dtype}.")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"Expected logits of shape [..., V] with V >= 1, got {x.shape}.")
    x = np.ascontiguousarray(x, dtype=np.float32)
    top = np.max(x, axis=-1)
    if np.isnan(top).any():  # max propagates NaN
        raise ValueError("Expected logits without NaN.")
    if (top == np.inf).any():
        raise ValueError("Expected logits without +inf.")
    if (top == -np.inf).any():
        raise ValueError("Expected every row to have a finite logit (a row is all -inf).")
    bottom = np.maximum(np.min(x, axis=-1), top - np.float32(WINDOW_NATS))
    with np.errstate(under="ignore", over="ignore"):
        # exp of each float32 difference, rounded to float32 (as expf returns it), summed in
        # float64; the logarithm is then rounded to float32.
        e = np.exp((x - top[..., None]).astype(np.float64)).astype(np.float32)
    lse = np.log(np.sum(e, axis=-1, dtype=np.float64)).astype(np.float32)
    min_log_prob = (bottom - top) - lse
    scale = (top - bottom) / _LEVELS
    q = np.zeros(x.shape, dtype=np.uint16)
    live = scale > 0
    if live.any():
        with np.errstate(divide="ignore"):
            inv = np.float32(1.0) / scale
        above = (x > bottom[..., None]) & live[..., None]
        with np.errstate(invalid="ignore", over="ignore"):
            steps = np.rint(inv[..., None] * (x - bottom[..., None]))
        # as C converts the int to uint16: modulo 2^16 (never reached: steps <= 65535)
        q[above] = steps[above].astype(np.int64).astype(np.uint16)
    return QuantizedRows(scale.astype(np.float32), min_log_prob.astype(np.float32), q)


def decode_rows(
    rows: QuantizedRows,
    *,
    dtype: DTypeLike = np.float64,
    below_window: Literal["zero", "floor"] = "zero",
    keep: ArrayLike | None = None,
) -> np.ndarray:
    """The stored log-probabilities ``scale·q + min_log_prob`` of some rows, ``[rows, V]``.

    The values are not normalised exactly (the grid moves each by up to ``scale/2``, and
    ``"zero"`` drops the entries below the window): compare them as logits, e.g.
    ``TokenStats.update(ref, cand, form=("logits", "logits"))``, whose log-softmax renormalises.

    Parameters
    ----------
    rows : QuantizedRows
        As :meth:`LlamaBase.records` returns them, or :func:`quantize_rows`.
    dtype : float64 (default) or float32
        float64 gives ``scale·q + min_log_prob`` exactly (the product of a float32 and a 16-bit
        integer, plus a float32, fits in 53 bits whenever ``scale`` ≥ 2^-30). float32 computes
        it as llama.cpp's scoring does: the product rounded to float32, then the sum.
    below_window : {"zero", "floor"}
        What an entry stored at the bottom of a full 16-nat window (``q = 0`` in a row whose
        window spans 16 nats) becomes. ``"zero"`` (default): ``-inf``, a probability of 0;
        its true value is somewhere below ``e^-16`` times the top entry's probability and is
        not stored. ``"floor"``: ``min_log_prob``, the bottom of the window, as llama.cpp
        decodes it (over a vocabulary of 10^5 entries such floors add up to about 1 % of the
        top entry's probability, a mass the reference model did not give). Rows whose window
        is narrower than 16 nats store their smallest entries exactly and are not affected.
    keep : integer array of one index per row, optional
        With ``"zero"``, entries that keep their stored value anyway: typically each row's
        label (the token that followed), so that its probability stays positive, at worst the
        window's floor (an upper bound), instead of 0, which would make its negative
        log-likelihood, and so the perplexity, infinite. One entry at the floor weighs at most
        ``e^-16`` of the top entry's probability in a KL.

    """
    scale = np.asarray(rows.scale)
    mlp = np.asarray(rows.min_log_prob)
    q = np.asarray(rows.q)
    dt = np.dtype(dtype)
    if dt == np.float64:
        out = scale.astype(np.float64)[..., None] * q + mlp.astype(np.float64)[..., None]
    elif dt == np.float32:
        out = scale.astype(np.float32)[..., None] * q.astype(np.float32)
        out += mlp.astype(np.float32)[..., None]
    else:
        raise ValueError(f"Expected `dtype` to be float64 or float32, got {dt}.")
    if below_window == "zero":
        full = _full_window(scale)
        if full.any():
            drop = (q == 0) & full[..., None]
            if keep is not None:
                k = np.asarray(keep).astype(np.intp).reshape(q.shape[:-1])
                np.put_along_axis(drop, k[..., None], False, axis=-1)
            out[drop] = -np.inf
    elif below_window != "floor":
        raise ValueError(
            f"Expected `below_window` to be one of 'zero', 'floor', got {below_window!r}."
        )
    return out


def _full_window(scale: np.ndarray) -> np.ndarray:
    """Rows whose window spans the full 16 nats, i.e. whose bottom was clipped.

    65535·scale is then 16 up to float32 rounding of ``M − (M − 16)`` (a few ulp of the logits'
    magnitude); a row whose own span is within 2^-8 nats of 16 counts as full."""
    return np.asarray(scale, dtype=np.float64) * 65535.0 >= WINDOW_NATS - 2.0**-8


# --------------------------------------------------------------------------------------------
# Reading


# a row (scale, minimum, n_vocab uint16) must stay below 2^31 bytes, as llama.cpp's int sizes
_MAX_VOCAB = (2**31 - 1 - 8) // 2
_MAX_SCALE = WINDOW_NATS / 65535 * (1 + 1e-5)


def _checked_rows(rows: QuantizedRows, n_scored: int, window: int) -> QuantizedRows:
    """Stored rows handed to :func:`write_base`, checked as :func:`read_base` checks a file's:
    ``q`` unsigned 16-bit ``[n_scored, V]``, one ``scale`` and ``min_log_prob`` per row, in the
    ranges llama.cpp writes."""
    q = np.asarray(rows.q)
    scale, mlp = np.asarray(rows.scale), np.asarray(rows.min_log_prob)
    if q.ndim != 2 or q.shape[0] != n_scored or q.shape[1] < 1:
        raise ValueError(
            f"Expected {n_scored} stored rows [{n_scored}, V] for window {window}, got q of "
            f"shape {q.shape}."
        )
    if q.dtype != np.uint16:
        raise TypeError(f"Expected q of dtype uint16 in window {window}, got {q.dtype}.")
    for name, x in (("scale", scale), ("min_log_prob", mlp)):
        if x.shape != (n_scored,) or x.dtype.kind != "f":
            raise ValueError(
                f"Expected `{name}` of window {window} to be {n_scored} floats, got "
                f"{x.dtype} of shape {x.shape}."
            )
    found = _unwritable(QuantizedRows(scale, mlp, q), q.shape[1])
    if found is not None:
        r, what, value = found
        raise ValueError(
            f"Window {window}, row {r}: {what} = {value!r} is outside what llama.cpp writes."
        )
    return QuantizedRows(scale, mlp, q)


def _row_dtype(n_vocab: int) -> np.dtype:
    pad = n_vocab % 2
    fields: list[Any] = [("scale", "<f4"), ("min_log_prob", "<f4"), ("q", "<u2", (n_vocab,))]
    if pad:
        fields.append(("pad", "<u2", (pad,)))
    return np.dtype(fields)


class LlamaBase:
    """An open base file; made by :func:`read_base`. Memory-mapped: nothing but the header
    and the tokens is read until asked for, and the pages of a decoded window are handed back
    to the kernel, so the resident memory stays at one window however large the file.

    Attributes
    ----------
    path : Path
    n_ctx, n_vocab, n_chunk : int
        Tokens per window, vocabulary size, number of windows.
    tokens : int32 array ``[n_chunk, n_ctx]``
        The stored tokens (read-only), the first of each window as stored, not replaced by BOS.
    positions : int array
        The scored positions ``n_ctx/2, …, n_ctx − 2`` of every window (``n_scored`` of them).
    labels : int32 array ``[n_chunk, n_scored]``
        The token each scored row predicts: ``tokens[:, positions + 1]``.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: Path, n_ctx: int, n_vocab: int, n_chunk: int, data: Any) -> None:
        self.path = path
        self.n_ctx, self.n_vocab, self.n_chunk = n_ctx, n_vocab, n_chunk
        self._map = data
        self._row = _row_dtype(n_vocab)
        self.tokens: np.ndarray = np.ndarray(
            (n_chunk, n_ctx), dtype="<i4", buffer=data, offset=_HEADER.size
        )
        self._rows_offset = _HEADER.size + 4 * n_chunk * n_ctx
        self.positions = np.arange(n_ctx // 2, n_ctx - 1)
        self.labels: np.ndarray = self.tokens[:, n_ctx // 2 + 1 :]

    @property
    def n_scored(self) -> int:
        """Scored positions per window: ``n_ctx − 1 − n_ctx/2``."""
        return int(self.positions.size)

    @property
    def num_tokens(self) -> int:
        """Scored tokens in the file: ``n_chunk · n_scored``."""
        return self.n_chunk * self.n_scored

    def __len__(self) -> int:
        return self.n_chunk

    def __repr__(self) -> str:
        return (
            f"LlamaBase({str(self.path)!r}, n_ctx={self.n_ctx}, n_vocab={self.n_vocab}, "
            f"n_chunk={self.n_chunk})"
        )

    def __enter__(self) -> LlamaBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the file. The mapping itself goes when the last array that views it
        (``tokens``, ``labels``, :meth:`records`) does: unmapping under a live view would
        crash the process, so it is never done explicitly. Decoded log-probabilities are
        copies and do not keep it."""
        self._map = None

    def windows(self, bos_token_id: int | None) -> np.ndarray:
        """The token windows llama.cpp evaluated, a fresh int64 ``[n_chunk, n_ctx]`` array.

        ``bos_token_id``: the model's BOS token when its vocabulary adds one (llama.cpp puts it
        first in every window), else ``None``. The file does not record it. When the model
        adds BOS, llama.cpp's own tokenization also put it first in the text, so it is
        ``tokens[0, 0]`` of a file llama.cpp wrote.

        A causal model that reads window ``c`` and returns logits for every position gives,
        at :attr:`positions`, the distributions this file stores for window ``c``.
        """
        out = np.array(self.tokens, dtype=np.int64)
        if bos_token_id is not None:
            if isinstance(bos_token_id, bool) or not isinstance(bos_token_id, int | np.integer):
                raise TypeError(f"Expected `bos_token_id` to be an int, got {bos_token_id!r}.")
            if not 0 <= bos_token_id < self.n_vocab:
                raise ValueError(
                    f"Expected `bos_token_id` in [0, {self.n_vocab}), got {bos_token_id}."
                )
            out[:, 0] = bos_token_id
        return out

    def _chunk_index(self, chunk: int) -> int:
        if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer):
            raise TypeError(f"Expected `chunk` to be an int, got {chunk!r}.")
        c = int(chunk)
        if not -self.n_chunk <= c < self.n_chunk:
            raise IndexError(f"chunk {c} is out of range for a file of {self.n_chunk} windows")
        return c % self.n_chunk

    def _chunk_view(self, c: int) -> np.ndarray:
        if self._map is None:
            raise ValueError(f"{self.path}: the base file is closed")
        return np.ndarray(
            (self.n_scored,),
            dtype=self._row,
            buffer=self._map,
            offset=self._rows_offset + c * self.n_scored * self._row.itemsize,
        )

    def records(self, chunk: int) -> QuantizedRows:
        """The stored rows of window ``chunk`` as they are in the file (read-only views)."""
        v = self._chunk_view(self._chunk_index(chunk))
        return QuantizedRows(v["scale"], v["min_log_prob"], v["q"])

    def log_probs(
        self,
        chunk: int,
        *,
        dtype: DTypeLike = np.float64,
        below_window: Literal["zero", "floor"] = "zero",
        keep_labels: bool = True,
    ) -> np.ndarray:
        """The decoded log-probabilities of window ``chunk``, a fresh ``[n_scored, V]`` array
        (see :func:`decode_rows` for ``dtype`` and ``below_window``). With ``keep_labels``
        (default), the entry of each row's label (:attr:`labels`) keeps its stored value under
        ``below_window="zero"`` (``keep`` of :func:`decode_rows`), so that label statistics
        stay finite.

        Raises :class:`BaseFileError` when a stored row cannot come from llama.cpp (a scale
        that is negative or not finite, a ``min_log_prob`` that is not finite or above 0)."""
        c = self._chunk_index(chunk)
        rows = self.records(c)
        self._check_rows(c, rows)
        keep = self.labels[c] if keep_labels else None
        out = decode_rows(rows, dtype=dtype, below_window=below_window, keep=keep)
        self._release(c)
        return out

    def iter_log_probs(
        self,
        *,
        dtype: DTypeLike = np.float64,
        below_window: Literal["zero", "floor"] = "zero",
        keep_labels: bool = True,
    ) -> Iterator[np.ndarray]:
        """Yield :meth:`log_probs` of each window in order: ``n_chunk`` arrays of shape
        ``[n_scored, V]``; one window in memory at a time."""
        for c in range(self.n_chunk):
            yield self.log_probs(c, dtype=dtype, below_window=below_window, keep_labels=keep_labels)

    def iter_records(self) -> Iterator[QuantizedRows]:
        """Yield :meth:`records` of each window in order (for :func:`write_base`, which copies
        them unchanged)."""
        for c in range(self.n_chunk):
            yield self.records(c)

    def _check_rows(self, c: int, rows: QuantizedRows) -> None:
        found = _unwritable(rows, self.n_vocab)
        if found is not None:
            r, what, value = found
            raise BaseFileError(
                f"{self.path}: window {c}, position {int(self.positions[r])} stores {what} = "
                f"{value!r}, which llama.cpp never writes; the file is corrupt or not a base file"
            )

    def _release(self, c: int) -> None:
        if not isinstance(self._map, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = self._rows_offset + c * self.n_scored * self._row.itemsize
        hi = lo + self.n_scored * self._row.itemsize
        lo -= lo % mmap.PAGESIZE
        try:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):  # advice only
            pass


def read_base(path: str | os.PathLike[str], *, check_tokens: bool = True) -> LlamaBase:
    """Open a llama.cpp KL-divergence base file (``llama-perplexity --kl-divergence-base``).

    The header is checked against the file's size before anything else is read, and, with
    ``check_tokens`` (default), every token against the vocabulary size, so that a foreign or
    truncated file fails here with a one-line :class:`BaseFileError` (a ``ValueError``) that
    names the file and what is wrong. The rows are then read lazily, window by window (see
    :class:`LlamaBase`).
    """
    p = Path(path)
    try:
        # non-blocking, so that a FIFO or a device is refused below instead of waiting for a
        # writer; on a regular file the flag changes nothing
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
    except FileNotFoundError:
        raise BaseFileError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise BaseFileError(f"{p}: is a directory, not a base file") from None
    except OSError as e:
        raise BaseFileError(f"{p}: cannot open ({e.strerror})") from None
    with f:
        st = os.fstat(f.fileno())
        import stat as _stat

        if not _stat.S_ISREG(st.st_mode):
            raise BaseFileError(f"{p}: is not a regular file")
        size = st.st_size
        head = f.read(_HEADER.size)
        if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
            shown = head[: len(MAGIC)]
            raise BaseFileError(
                f"{p}: is not a llama.cpp KL-divergence base file (it starts with {shown!r}, "
                f"not {MAGIC!r})"
            )
        if len(head) < _HEADER.size:
            raise BaseFileError(
                f"{p}: is truncated: {size} bytes, shorter than the {_HEADER.size}-byte header"
            )
        _, n_ctx, n_vocab, n_chunk = _HEADER.unpack(head)
        if n_ctx < 3 or n_vocab < 1 or n_chunk < 1:
            raise BaseFileError(
                f"{p}: has an invalid header (n_ctx={n_ctx}, n_vocab={n_vocab}, "
                f"n_chunk={n_chunk}; expected n_ctx >= 3, n_vocab >= 1, n_chunk >= 1)"
            )
        if n_vocab > _MAX_VOCAB:
            raise BaseFileError(
                f"{p}: has an invalid header (n_vocab={n_vocab}; a row of the file holds at "
                f"most {_MAX_VOCAB} entries)"
            )
        n_scored = n_ctx - 1 - n_ctx // 2
        row = _row_dtype(n_vocab).itemsize
        tokens_end = _HEADER.size + 4 * n_chunk * n_ctx
        expected = tokens_end + n_chunk * n_scored * row  # Python ints: no overflow
        where = f"n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk}"
        if size < expected:
            if size < tokens_end:
                got = "the tokens are cut short"
            else:
                done = (size - tokens_end) // (n_scored * row)
                got = f"{done} of {n_chunk} windows are complete"
            raise BaseFileError(
                f"{p}: is truncated: its header ({where}) needs {expected} bytes, the file has "
                f"{size} ({got})"
            )
        if size > expected:
            raise BaseFileError(
                f"{p}: has {size - expected} bytes after the last window; its header ({where}) "
                f"gives {expected} bytes, so it is not a base file or not the one the header "
                "describes"
            )
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    base = LlamaBase(p, n_ctx, n_vocab, n_chunk, data)
    if check_tokens:
        bad = (base.tokens < 0) | (base.tokens >= n_vocab)
        if bad.any():
            c, t = (int(i) for i in np.argwhere(bad)[0])
            count, token = int(np.count_nonzero(bad)), int(base.tokens[c, t])
            base.close()
            raise BaseFileError(
                f"{p}: token {token} at window {c}, position {t} is outside "
                f"the vocabulary [0, {n_vocab}) ({count} such tokens); the file is corrupt or "
                "not a base file"
            )
    return base


# --------------------------------------------------------------------------------------------
# Writing


def write_base(
    path: str | os.PathLike[str],
    tokens: ArrayLike,
    logits: ArrayLike | Iterable[ArrayLike | QuantizedRows],
    *,
    n_vocab: int | None = None,
) -> None:
    """Write a base file that ``llama-perplexity --kl-divergence`` scores a model against.

    Parameters
    ----------
    path : path
        The file to write (replaced if it exists; written to a temporary name in the same
        directory, then renamed, so that a failure leaves no partial file).
    tokens : integer array ``[n_chunk, n_ctx]``
        The windows as llama.cpp should store them. llama.cpp replaces the first token of each
        window by BOS when the model adds one: compute ``logits`` on those windows (see
        :meth:`LlamaBase.windows`). Every token must be in ``[0, V)``.
    logits : array or iterable of per-window arrays
        The reference model's outputs on each window, as an array ``[n_chunk, L, V]`` or an
        iterable (e.g. a generator, for bounded memory) of ``n_chunk`` arrays ``[L, V]``, where
        ``L`` is ``n_ctx`` (every position; the scored ones are taken) or ``n_scored`` (only
        the scored positions ``n_ctx/2 … n_ctx − 2``). Logits or log-probabilities, any real
        floating dtype; each row is quantized by :func:`quantize_rows`. An item may also be
        a :class:`QuantizedRows`, copied unchanged, so that
        ``write_base(out, base.tokens, base.iter_records())`` reproduces a file byte for byte.
    n_vocab : int, optional
        V; taken from ``logits`` when omitted, and required to agree with it.

    Notes
    -----
    llama.cpp needs the file's ``n_ctx`` to fit in its context (pass ``-c n_ctx``) and its
    vocabulary to be the model's; it reports but does not stop on a mismatch, so check both.
    """
    toks = np.asarray(tokens)
    if toks.dtype.kind not in "iu":
        raise TypeError(f"Expected integer token ids, got dtype {toks.dtype}.")
    if toks.ndim != 2 or toks.shape[0] < 1 or toks.shape[1] < 3:
        raise ValueError(
            f"Expected `tokens` of shape [n_chunk, n_ctx] with n_chunk >= 1 and n_ctx >= 3, got "
            f"{toks.shape}."
        )
    n_chunk, n_ctx = (int(d) for d in toks.shape)
    if n_ctx > 2**31 - 1 or n_chunk > 2**31 - 1:
        raise ValueError(f"Expected n_ctx and n_chunk below 2**31, got {toks.shape}.")
    first, n_scored = n_ctx // 2, n_ctx - 1 - n_ctx // 2

    if isinstance(logits, np.ndarray) or hasattr(logits, "__array__") or hasattr(logits, "shape"):
        chunks: Iterable[Any] = _split_chunks(logits, n_chunk)
    else:
        chunks = cast(Iterable[Any], logits)

    p = Path(path)
    # under the 255-byte name limit whatever the target's length: its first 200 bytes, the pid
    stem = os.fsencode(p.name)[:200].decode(errors="ignore")
    tmp = p.with_name(f".{stem}.{os.getpid()}.tmp")
    vocab = n_vocab
    try:
        with open(tmp, "wb") as f:
            written = 0
            header_at = f.tell()
            f.write(b"\0" * _HEADER.size)  # filled in once V is known
            f.write(np.ascontiguousarray(toks, dtype="<i4").tobytes())
            for chunk in chunks:
                if written == n_chunk:
                    raise ValueError(f"Expected {n_chunk} windows of logits, got more.")
                if isinstance(chunk, QuantizedRows):
                    rows = _checked_rows(chunk, n_scored, written)
                else:
                    x = _to_numpy(chunk)
                    if x.ndim != 2 or x.shape[0] not in (n_ctx, n_scored):
                        raise ValueError(
                            f"Expected the logits of window {written} to have shape [{n_ctx} or "
                            f"{n_scored}, V], got {x.shape}."
                        )
                    if x.shape[0] == n_ctx:
                        x = x[first : n_ctx - 1]
                    try:
                        rows = _quantize_blocks(x)
                    except ValueError as e:
                        raise ValueError(f"Window {written}: {e}") from None
                v = int(np.shape(rows.q)[-1])
                if vocab is None:
                    vocab = v
                elif v != vocab:
                    raise ValueError(
                        f"Expected {vocab} vocabulary entries, got {v} in window {written}."
                    )
                out = np.zeros(n_scored, dtype=_row_dtype(vocab))
                out["scale"] = rows.scale
                out["min_log_prob"] = rows.min_log_prob
                out["q"] = rows.q
                f.write(out.tobytes())
                written += 1
            if written != n_chunk:
                raise ValueError(
                    f"Expected {n_chunk} windows of logits (one per row of `tokens`), got "
                    f"{written}."
                )
            assert vocab is not None
            if vocab < 1 or vocab > 2**31 - 1:
                raise ValueError(f"Expected a vocabulary size in [1, 2**31), got {vocab}.")
            bad = (toks < 0) | (toks >= vocab)
            if bad.any():
                c, t = (int(i) for i in np.argwhere(bad)[0])
                raise ValueError(
                    f"Expected token ids in [0, {vocab}), got {int(toks[c, t])} at window {c}, "
                    f"position {t}."
                )
            f.seek(header_at)
            f.write(_HEADER.pack(MAGIC, n_ctx, vocab, n_chunk))
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# Rows per quantization block: about this many elements, so that the float64 temporaries of
# a window of a 128k vocabulary stay near 10 MB instead of a few hundred.
_BLOCK_ELEMENTS = 1 << 20


def _quantize_blocks(x: np.ndarray) -> QuantizedRows:
    rows = max(1, _BLOCK_ELEMENTS // max(1, x.shape[-1]))
    if x.shape[0] <= rows:
        return quantize_rows(x)
    parts = [quantize_rows(x[i : i + rows]) for i in range(0, x.shape[0], rows)]
    return QuantizedRows(*(np.concatenate(p) for p in zip(*parts, strict=True)))


def _split_chunks(logits: Any, n_chunk: int) -> Iterator[np.ndarray]:
    shape = tuple(getattr(logits, "shape", np.shape(logits)))
    if len(shape) != 3 or shape[0] != n_chunk:
        raise ValueError(
            f"Expected `logits` of shape [n_chunk={n_chunk}, L, V] or an iterable of per-window "
            f"arrays, got shape {shape}."
        )
    for c in range(n_chunk):
        yield _to_numpy(logits[c])


def _to_numpy(x: Any) -> np.ndarray:
    """A NumPy array from NumPy, PyTorch (any device; bfloat16 widened), JAX, or array-likes."""
    if type(x).__module__.startswith("torch"):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if not x.dtype.is_floating_point:
            return np.asarray(x.numpy())
        return np.asarray(x.float().numpy() if x.dtype.itemsize < 4 else x.numpy())
    return np.asarray(x)


# --------------------------------------------------------------------------------------------
# llama.cpp's statistics, reproduced (parity mode)


class ParityTokens(NamedTuple):
    """Per-token values of :func:`parity_token_values`, in llama.cpp's precision (float32 but
    ``kld``, which it accumulates in float64)."""

    kld: np.ndarray
    p_diff: np.ndarray
    nll: np.ndarray
    nll_base: np.ndarray
    same_top: np.ndarray


def parity_token_values(
    rows: QuantizedRows, cand_logits: ArrayLike, labels: ArrayLike
) -> ParityTokens:
    """Per-token values as ``llama-perplexity --kl-divergence`` computes them.

    ``rows``: the base file's stored rows (:meth:`LlamaBase.records`); ``cand_logits``:
    ``[rows, V]`` candidate logits, rounded to float32 as llama.cpp's are; ``labels``: the
    next token of each row (:attr:`LlamaBase.labels`). Its conventions, kept here on purpose:
    the base log-probabilities are the stored values in float32 arithmetic, not renormalised;
    the KL sums only the entries whose stored log-probability is above −16 (an absolute
    threshold); Δp = p_cand − p_base of the label; the top tokens are the first maximum of the
    candidate's logits and of the stored values. Use :class:`kldiv.metrics.TokenStats` for the
    exact statistics.
    """
    x = np.ascontiguousarray(_to_numpy(cand_logits), dtype=np.float32)
    q = np.asarray(rows.q)
    lab = np.asarray(labels).astype(np.int64)
    if x.shape != q.shape or lab.shape != x.shape[:1]:
        raise ValueError(
            f"Expected candidate logits of shape {q.shape} and labels of shape {q.shape[:1]}, "
            f"got {x.shape} and {lab.shape}."
        )
    n = x.shape[0]
    r = np.arange(n)
    top = np.max(x, axis=-1)
    imax = np.argmax(x, axis=-1)
    with np.errstate(under="ignore", over="ignore"):
        e = np.exp((x - top[:, None]).astype(np.float64)).astype(np.float32)
    lse = np.log(np.sum(e, axis=-1, dtype=np.float64)).astype(np.float32)
    nll = (top + lse) - x[r, lab]
    base = decode_rows(rows, dtype=np.float32, below_window="floor")
    nll_base = -base[r, lab]
    shift = top + lse
    keep = base > np.float32(-WINDOW_NATS)
    with np.errstate(under="ignore", invalid="ignore", over="ignore"):
        pb = np.exp(base.astype(np.float64)).astype(np.float32)
        terms = pb * ((base - x) + shift[:, None])
    kld = np.asarray(np.sum(np.where(keep, terms, np.float32(0)), axis=-1, dtype=np.float64))
    same = imax == np.argmax(base, axis=-1)
    with np.errstate(under="ignore", over="ignore"):
        p_base = np.exp((-nll_base).astype(np.float64)).astype(np.float32)
        p = np.exp((-nll).astype(np.float64)).astype(np.float32)
    return ParityTokens(kld, p - p_base, nll, nll_base, same)


@dataclass(frozen=True)
class ParityReport:
    """The statistics ``llama-perplexity --kl-divergence`` prints, computed its way (see
    :class:`ParityStats`): ``(value, uncertainty)`` pairs, probabilities as fractions (llama.cpp
    prints percent), percentiles keyed by its labels (``"max"``, ``"99.9"``, …, ``"median"``,
    …, ``"min"``)."""

    num_tokens: int
    ppl_cand: tuple[float, float]
    ppl_base: tuple[float, float]
    ln_ppl_correlation: float
    ln_ppl_ratio: tuple[float, float]
    ppl_ratio: tuple[float, float]
    ppl_diff: tuple[float, float]
    kld_mean: tuple[float, float]
    kld_percentiles: dict[str, float]
    dp_mean: tuple[float, float]
    dp_percentiles: dict[str, float]
    dp_rms: tuple[float, float]
    same_top: tuple[float, float]


# The percentiles llama.cpp prints, by its labels' order.
_PARITY_KLD = ("max", "99.9", "99.0", "95.0", "90.0", "median", "10.0", "5.0", "1.0", "0.1", "min")
_PARITY_DP = (
    "max", "99.9", "99.0", "95.0", "90.0", "75.0", "median",
    "25.0", "10.0", "5.0", "1.0", "0.1", "min",
)  # fmt: skip


class ParityStats:
    """Accumulates :func:`parity_token_values` and summarises them with llama.cpp's formulas.

    The conventions of ``llama-perplexity --kl-divergence`` that differ from
    :class:`kldiv.metrics.TokenStats`, reproduced so that the numbers can be checked against
    its output: sums of float32 values in float64 and variances as E[x²] − E[x]² over n − 1;
    uncertainties are 0 for 10 tokens or fewer (and the covariance for fewer than 10); the
    top-token uncertainty is √(f(1 − f)/(n − 1)); the RMS Δp uncertainty comes from the
    uncertainty of the mean of Δp² (delta method); percentiles are interpolated in float32 at
    fraction·(n − 1), the median is the middle value or the float32 mean of the two middle
    ones; and the base side keeps the 16-nat window's storage (see
    :func:`parity_token_values`). llama.cpp prints this summary only for 100 tokens or more.
    """

    def __init__(self) -> None:
        self._parts: list[ParityTokens] = []

    def update(self, rows: QuantizedRows, cand_logits: ArrayLike, labels: ArrayLike) -> None:
        """Add the rows of one window (or any rows): see :func:`parity_token_values`."""
        self._parts.append(parity_token_values(rows, cand_logits, labels))

    @property
    def count(self) -> int:
        """Tokens accumulated."""
        return sum(p.kld.size for p in self._parts)

    def values(self) -> ParityTokens:
        """Every per-token value, in update order."""
        if not self._parts:
            raise ValueError("No tokens: call update() first.")
        return ParityTokens(*(np.concatenate(v) for v in zip(*self._parts, strict=True)))

    def report(self) -> ParityReport:
        """The summary, as llama.cpp computes it."""
        t = self.values()
        n = t.kld.size
        f64 = np.float64
        nll, nll_b = t.nll, t.nll_base
        # llama.cpp squares and multiplies the float32 values in float32, then sums in float64
        s_nll, s_nll2 = float(np.sum(nll, dtype=f64)), float(np.sum(nll * nll, dtype=f64))
        s_b, s_b2 = float(np.sum(nll_b, dtype=f64)), float(np.sum(nll_b * nll_b, dtype=f64))
        s_nb = float(np.sum(nll * nll_b, dtype=f64))
        kld = t.kld
        s_k, s_k2 = float(np.sum(kld)), float(np.sum(kld * kld))
        dp = t.p_diff
        dp2 = (dp * dp).astype(f64)
        s_d, s_d2, s_d4 = float(np.sum(dp, dtype=f64)), float(np.sum(dp2)), float(np.sum(dp2 * dp2))

        log_ppl = _mean_unc(s_nll, s_nll2, n)
        log_ppl_b = _mean_unc(s_b, s_b2, n)
        cov = 0.0 if n < 10 else (s_nb / n - (s_nll / n) * (s_b / n)) / (n - 1)
        ppl, ppl_b = math.exp(log_ppl[0]), math.exp(log_ppl_b[0])
        ppl_unc, ppl_b_unc = ppl * log_ppl[1], ppl_b * log_ppl_b[1]
        denom = log_ppl[1] * log_ppl_b[1]
        cor = cov / denom if denom else math.nan
        lr = log_ppl[0] - log_ppl_b[0]
        lr_unc = _sqrt(log_ppl[1] ** 2 + log_ppl_b[1] ** 2 - 2.0 * cov)
        ratio = math.exp(lr)
        diff_unc = _sqrt(ppl_unc**2 + ppl_b_unc**2 - 2.0 * ppl * ppl_b * cov)
        mse = _mean_unc(s_d2, s_d4, n)
        rms = math.sqrt(mse[0])
        rms_unc = 0.5 / rms * mse[1] if rms else math.nan
        top = float(np.count_nonzero(t.same_top)) / n
        top_unc = _sqrt(top * (1 - top) / (n - 1)) if n > 1 else math.nan
        ks = np.sort(kld.astype(np.float32))
        ds = np.sort(dp)
        return ParityReport(
            num_tokens=n,
            ppl_cand=(ppl, ppl_unc),
            ppl_base=(ppl_b, ppl_b_unc),
            ln_ppl_correlation=cor,
            ln_ppl_ratio=(lr, lr_unc),
            ppl_ratio=(ratio, ratio * lr_unc),
            ppl_diff=(ppl - ppl_b, diff_unc),
            kld_mean=_mean_unc(s_k, s_k2, n),
            kld_percentiles={k: _parity_pct(ks, k) for k in _PARITY_KLD},
            dp_mean=_mean_unc(s_d, s_d2, n),
            dp_percentiles={k: _parity_pct(ds, k) for k in _PARITY_DP},
            dp_rms=(rms, rms_unc),
            same_top=(top, top_unc),
        )


def _mean_unc(s: float, s2: float, n: int) -> tuple[float, float]:
    if n < 1:
        return 0.0, 0.0
    f = s / n
    df = s2 / n - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def _sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else math.nan


def _parity_pct(s: np.ndarray, key: str) -> float:
    """llama.cpp's percentile of the sorted float32 ``s``: float32 interpolation at
    fraction·(n − 1); ``median``, ``min`` and ``max`` as it prints them."""
    n = s.size
    if key == "max":
        return float(s[-1])
    if key == "min":
        return float(s[0])
    if key == "median":
        if n % 2:
            return float(s[n // 2])
        return float(np.float32(0.5) * (s[n // 2] + s[n // 2 - 1]))
    frac = np.float32(float(key) / 100)
    pos = frac * np.float32(n - 1)
    ip = int(pos)
    w = pos - np.float32(ip)
    hi = s[min(ip + 1, n - 1)]
    return float((np.float32(1) - w) * s[ip] + w * hi)
