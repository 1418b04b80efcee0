"""Array files read in row chunks with bounded memory, for ``kldiv compare``.

Formats: ``.npy``, ``.safetensors``, ``.pt``/``.pth`` (``torch.save``'s zip format) and the
uncompressed members of ``.npz`` (``np.savez``) are memory-mapped at the array's offset in the
file, and each chunk's pages are handed back to the kernel once it is copied out, so the
resident set stays at one chunk however large the file. Compressed ``.npz`` members
(``np.savez_compressed``) are decompressed as a stream, chunk by chunk; with a category axis
that is not last, such a member is first decompressed into an unnamed temporary file (in
``TMPDIR``), since a zip stream only reads forwards. A ``.pt`` file in the legacy (pre-1.6)
format, or on a PyTorch that does not say where a tensor's bytes lie, is read through
``torch.load(mmap=True)``, whose pages stay resident once read. A file holding several arrays
takes ``FILE::NAME`` to say which one. ``.safetensors`` needs the safetensors package
(``kldiv[cli]``) and ``.pt`` needs PyTorch (``kldiv[torch]``); NumPy formats need nothing extra.

Before any data is read, a file must be a regular file (a FIFO, device, socket or directory is
refused without a read that could block) and its header's shape and dtype must fit in the
bytes the file holds. Every failure is an :class:`InputError` whose message starts with the
file's name and is one line, ready to be printed as the error.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
import sys
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import DTypeLike

__all__ = ["InputError", "ArrayFile", "open_array", "SUFFIXES"]

SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth")

# What the readers of foreign formats raise on a malformed file, besides OSError.
_MALFORMED = (ValueError, EOFError, SyntaxError, KeyError, struct.error, zlib.error)
_ZIP_ERRORS = (zipfile.BadZipFile, NotImplementedError, RuntimeError, *_MALFORMED)


class InputError(Exception):
    """A problem with an input file, phrased for the user."""


def _reason(e: BaseException) -> str:
    """The first line of a library's message: some span many lines, an error is one."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _read_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the .npy stream ``f``, left at the data."""
    version = np.lib.format.read_magic(f)
    read = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy version {version}")
    shape, fortran, dtype = read(f)
    if any(d < 0 for d in shape):
        raise ValueError(f"its header gives a negative dimension, shape {shape}")
    return shape, fortran, dtype


def _split(spec: str) -> tuple[Path, str | None]:
    path, sep, key = spec.partition("::")
    return Path(path), (key if sep else None)


def _only(path: Path, names: list[str], key: str | None) -> str:
    if key is not None:
        if key not in names:
            raise InputError(f"{path}: has no array named {key!r} (it has: {', '.join(names)})")
        return key
    if len(names) != 1:
        listing = ", ".join(names) if names else "none"
        raise InputError(f"{path}: holds {len(names)} arrays ({listing}); name one as {path}::NAME")
    return names[0]


def _not_regular(mode: int) -> str | None:
    """What a file that is not a regular file is, for the error message."""
    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return what
    return None if stat.S_ISREG(mode) else "not a regular file"


def _open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for reading, if it is a regular file.

    Checked by ``stat`` before opening (opening a FIFO for reading blocks until a writer
    comes), and again on the open descriptor, which is opened non-blocking in case the path
    was replaced in between."""
    try:
        what = _not_regular(os.stat(path).st_mode)
        if what is None:
            fd = os.open(
                path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
            )
            what = _not_regular(os.fstat(fd).st_mode)
            if what is not None:
                os.close(fd)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot open ({e.strerror})") from None
    if what is not None:
        raise InputError(f"{path}: is {what}, not an array file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _size(f: IO[bytes]) -> int:
    return os.fstat(f.fileno()).st_size


class ArrayFile:
    """One array in a file: ``shape``, ``dtype`` and ``rows(axis, chunk)``, which yields
    ``[rows, V]`` blocks with the category ``axis`` last, in order, each a fresh array."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: DTypeLike) -> None:
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        # Python integers: a forged shape must not wrap around and pass a size check
        return math.prod(self.shape) * self.dtype.itemsize

    def rows(self, axis: int, chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def read_all(self) -> np.ndarray:
        """The whole array (for small inputs such as labels)."""
        blocks = list(self.rows(-1, max(1, 1 << 20)))
        if not blocks:
            return np.empty(self.shape, self.dtype)
        return np.concatenate(blocks).reshape(self.shape)

    def close(self) -> None:
        pass


def _moved(a: Any, axis: int) -> Any:
    """``a`` viewed as ``[tokens, V]`` with ``axis`` last (a 0-d array is one 1-wide row)."""
    a = a if axis in (-1, a.ndim - 1) else np.moveaxis(a, axis, -1)
    return a.reshape(-1, a.shape[-1] if a.ndim else 1) if a.ndim != 2 else a


def _row_blocks(view: Any, chunk: int, copy: Any) -> Iterator[Any]:
    """Contiguous ``[rows, V]`` copies of a strided ``[..., V]`` view, in C order of the token
    axes, each at most ``chunk`` rows: reshaping the whole moved view would copy it at once."""
    if view.ndim <= 2:
        view = _moved(view, -1)
        for start in range(0, view.shape[0], chunk):
            yield copy(view[start : start + chunk])
        return
    per = int(np.prod(view.shape[1:-1]))
    if per <= chunk:
        step = max(1, chunk // per)
        for start in range(0, view.shape[0], step):
            block = copy(view[start : start + step])
            yield block.reshape(-1, block.shape[-1])
    else:
        for i in range(view.shape[0]):
            yield from _row_blocks(view[i], chunk, copy)


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as float32, exactly: NumPy has no bfloat16."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class _Mapped(ArrayFile):
    """An array stored at ``offset`` in the open ``file``, memory-mapped.

    Mapped pages count towards the resident set once touched: ``rows`` copies each block out
    and then hands its pages back to the kernel, so the resident set stays at one block."""

    def __init__(
        self,
        path: Path,
        file: IO[bytes],
        shape: tuple[int, ...],
        raw: np.dtype,
        offset: int,
        *,
        strides: tuple[int, ...] | None = None,
        fortran: bool = False,
        widen: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        super().__init__(path, shape, raw if widen is None else widen(np.empty(0, raw)).dtype)
        self._file, self._raw, self._offset, self._widen = file, raw, offset, widen
        self._strides, self._fortran = strides, fortran
        empty = math.prod(shape) == 0
        self._map = None if empty else mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)

    def _array(self) -> np.ndarray:
        if self._map is None:
            return np.empty(self.shape, self._raw)
        return np.ndarray(
            self.shape,
            self._raw,
            buffer=self._map,
            offset=self._offset,
            strides=self._strides,
            order="F" if self._fortran else "C",
        )

    def _copy(self, view: np.ndarray) -> np.ndarray:
        block = np.array(view)
        return block if self._widen is None else self._widen(block)

    def rows(self, axis: int, chunk: int) -> Iterator[np.ndarray]:
        a = self._array()
        if axis not in (-1, a.ndim - 1) or not a.flags.c_contiguous:
            # strided reads (a category axis that is not last): bounded copies, and every
            # block's pages handed back, since a strided block touches the whole mapping
            for block in _row_blocks(np.moveaxis(a, axis, -1), chunk, self._copy):
                if self._map is not None:
                    self._map.madvise(mmap.MADV_DONTNEED)
                yield block
            return
        view = _moved(a, axis)
        page = mmap.PAGESIZE
        for start in range(0, view.shape[0], chunk):
            block = self._copy(view[start : start + chunk])
            if self._map is not None:  # hand back exactly the pages this block came from
                lo = self._offset + start * view.shape[1] * self._raw.itemsize
                hi = lo + view[start : start + chunk].nbytes
                lo -= lo % page
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            yield block

    def close(self) -> None:
        # Views into the map must be gone before it can close; the ones handed out are copies.
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # pragma: no cover - a caller still holds a view
                pass
        self._file.close()


def _npy(path: Path, f: IO[bytes]) -> ArrayFile:
    try:
        shape, fortran, dtype = _read_header(f)
    except (OSError, *_MALFORMED) as e:
        raise InputError(f"{path}: not a valid .npy file ({_reason(e)})") from None
    if dtype.hasobject:
        raise InputError(f"{path}: holds Python objects, not numbers")
    offset, size = f.tell(), _size(f)
    nbytes = math.prod(shape) * dtype.itemsize
    if offset + nbytes > size:
        raise InputError(
            f"{path}: truncated: the header promises {nbytes} bytes of data, "
            f"the file has {size - offset}"
        )
    return _Mapped(path, f, shape, dtype, offset, fortran=fortran)


def _npz(path: Path, f: IO[bytes], key: str | None) -> ArrayFile:
    try:
        zf = zipfile.ZipFile(f)
    except (OSError, *_ZIP_ERRORS) as e:
        raise InputError(f"{path}: not a valid .npz file ({_reason(e)})") from None
    try:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        member = _only(path, names, key) + ".npy"
        info = zf.getinfo(member)
        try:
            with zf.open(info) as s:
                shape, fortran, dtype = _read_header(s)
                header = s.tell()
        except (OSError, *_ZIP_ERRORS) as e:
            raise InputError(
                f"{path}: member {member} is not a valid array ({_reason(e)})"
            ) from None
        if dtype.hasobject:
            raise InputError(f"{path}: member {member} holds Python objects, not numbers")
        if fortran:
            raise InputError(f"{path}: member {member} is Fortran-ordered; save it C-ordered")
        nbytes = math.prod(shape) * dtype.itemsize
        if header + nbytes > info.file_size:
            raise InputError(
                f"{path}: member {member} is truncated: its header promises {nbytes} bytes of "
                f"data, the member holds {info.file_size - header}"
            )
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            data = _member_data(f, info)
            if data is None:
                raise InputError(f"{path}: not a valid .npz file (no local header for {member})")
            offset = data + header
            if offset + nbytes > _size(f):
                raise InputError(
                    f"{path}: truncated: member {member} ends past the end of the file"
                )
            mapped = _Mapped(path, f, shape, dtype, offset)
            zf.close()  # the mapping reads the file itself
            return mapped
        return _NpzStream(path, f, zf, member, shape, dtype)
    except BaseException:
        zf.close()
        raise


def _member_data(f: IO[bytes], info: zipfile.ZipInfo) -> int | None:
    """Where a zip member's bytes start: after its local header, whose name and extra field
    lengths may differ from the central directory's. None if that header is not there."""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


_PIECE = 1 << 20  # bytes per read from a zip stream


class _NpzStream(ArrayFile):
    """A compressed .npz member, decompressed forwards in blocks of rows."""

    def __init__(
        self,
        path: Path,
        file: IO[bytes],
        zf: zipfile.ZipFile,
        member: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
    ) -> None:
        super().__init__(path, shape, dtype)
        self._file, self._zip, self._member = file, zf, member
        self._copy: ArrayFile | None = None

    def rows(self, axis: int, chunk: int) -> Iterator[np.ndarray]:
        if axis not in (-1, len(self.shape) - 1):
            # every block of tokens needs bytes from the whole member, and the zip stream
            # only reads forwards: decompress it once into a file that can be mapped
            if self._copy is None:
                self._copy = self._spill()
            yield from self._copy.rows(axis, chunk)
            return
        v = self.shape[-1] if self.shape else 1
        n = math.prod(self.shape[:-1]) if self.shape else 1
        try:
            with self._zip.open(self._member) as f:
                _read_header(f)
                for start in range(0, n, chunk):
                    block = np.empty((min(chunk, n - start), v), self.dtype)
                    # filled in pieces: one read of the whole block would hold it twice more
                    # (the decompressed pieces and their join)
                    into, got = block.data.cast("B"), 0
                    while got < block.nbytes:
                        piece = f.read(min(_PIECE, block.nbytes - got))
                        if not piece:
                            raise InputError(f"{self.path}: member {self._member} is truncated")
                        into[got : got + len(piece)] = piece
                        got += len(piece)
                    yield block
        except (OSError, *_ZIP_ERRORS) as e:
            raise InputError(f"{self.path}: cannot read {self._member} ({_reason(e)})") from None

    def _spill(self) -> ArrayFile:
        tmp = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the returned reader
        try:
            try:
                with self._zip.open(self._member) as s:
                    _read_header(s)
                    left = self.nbytes  # the array alone: trailing bytes are not copied
                    while left > 0 and (piece := s.read(min(_PIECE, left))):
                        tmp.write(piece)
                        left -= len(piece)
                tmp.flush()
            except (OSError, *_ZIP_ERRORS) as e:
                raise InputError(
                    f"{self.path}: cannot read {self._member} ({_reason(e)})"
                ) from None
            if _size(tmp) < self.nbytes:
                raise InputError(f"{self.path}: member {self._member} is truncated")
            return _Mapped(self.path, tmp, self.shape, self.dtype, 0)
        except BaseException:
            tmp.close()
            raise

    def close(self) -> None:
        if self._copy is not None:
            self._copy.close()
        self._zip.close()
        self._file.close()


# safetensors' dtype names; BF16 is read as its uint16 bit patterns and widened to float32
_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "U8": "u1",
}
_SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors package's own limit


def _safetensors(path: Path, f: IO[bytes], key: str | None) -> ArrayFile:
    try:
        from safetensors import safe_open
    except ImportError:
        raise InputError(
            f"{path}: reading .safetensors needs the safetensors package, not installed "
            'here: pip install "kldiv[cli]"'
        ) from None
    size = _size(f)
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 <= n <= min(size - 8, _SAFETENSORS_MAX_HEADER):
        raise InputError(
            f"{path}: not a valid .safetensors file (its header length "
            f"{'is missing' if n < 0 else f'{n} does not fit in the file of {size} bytes'})"
        )
    try:
        header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: not a valid .safetensors file ({_reason(e)})") from None
    name = _only(path, [k for k in header if k != "__metadata__"], key)
    entry = header[name]
    dtype_name = entry.get("dtype") if isinstance(entry, dict) else None
    if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
        raise InputError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (
        isinstance(shape, list)
        and all(type(d) is int and d >= 0 for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
    ):
        raise InputError(f"{path}: tensor {name!r} has a malformed shape or data_offsets")
    raw = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
    begin, end = offsets
    nbytes = math.prod(shape) * raw.itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
        raise InputError(
            f"{path}: tensor {name!r}: its shape {tuple(shape)} needs {nbytes} bytes, its "
            f"data_offsets give {end - begin}"
        )
    if 8 + n + end > size:
        raise InputError(
            f"{path}: truncated: tensor {name!r} ends at byte {8 + n + end}, the file has {size}"
        )
    try:  # the package's parser is the reference for the rest (offsets in order, no overlap)
        with safe_open(str(path), framework="numpy"):
            pass
    except Exception as e:  # safetensors raises its own SafetensorError
        raise InputError(f"{path}: not a valid .safetensors file ({_reason(e)})") from None
    widen = _bf16_to_f32 if dtype_name == "BF16" else None
    return _Mapped(path, f, tuple(shape), raw, 8 + n + begin, widen=widen)


def _torch(path: Path, f: IO[bytes], key: str | None) -> ArrayFile:
    try:
        import torch
    except ImportError:
        raise InputError(
            f"{path}: reading .pt files needs PyTorch, not installed here: "
            'pip install "kldiv[torch]"'
        ) from None

    def pick(obj: Any) -> Any:
        if isinstance(obj, dict):
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            obj = tensors[_only(path, list(tensors), key)]
        if not isinstance(obj, torch.Tensor):
            raise InputError(f"{path}: holds a {type(obj).__name__}, not a tensor")
        if obj.is_nested:
            raise InputError(f"{path}: holds a nested tensor; save one dense tensor per array")
        if obj.layout != torch.strided:
            raise InputError(f"{path}: holds a {obj.layout} tensor; save it dense (.to_dense())")
        return obj

    zip_format = f.read(4) == b"PK\x03\x04"
    f.seek(0)
    # The mapped path reads the bytes as stored: only for archives in this machine's byte
    # order (PyTorch also crashes byte-swapping a meta storage); others load swapped below.
    if zip_format and _torch_byteorder(f) == sys.byteorder:
        # Loaded onto the meta device, tensors carry shape, strides and dtype but no data, and
        # their storages say where their bytes lie in the file: mapped from there, their pages
        # can be handed back.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = torch.load(f, map_location="meta", weights_only=True)
        except Exception:  # e.g. a nested tensor has no meta form: the load below says so
            loaded = None
        if loaded is not None:
            meta = pick(loaded)
            offset = getattr(meta.untyped_storage(), "_checkpoint_offset", None)
            if isinstance(offset, int):  # older PyTorch does not record it: read below
                return _torch_mapped(path, f, meta, offset)
    f.close()  # torch.load(mmap=True) opens the file by its name
    try:
        with warnings.catch_warnings():  # e.g. "sparse CSR support is in beta": one line
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", mmap=zip_format, weights_only=True)
    except Exception as e:  # torch raises many kinds here (pickle, zip, runtime)
        raise InputError(
            f"{path}: not a readable PyTorch file ({type(e).__name__}: {_reason(e)})"
        ) from None
    obj = pick(loaded)
    return _TorchTensor(path, obj.detach(), _torch_numpy_dtype(path, _wide(obj.dtype)))


def _torch_numpy_dtype(path: Path, dtype: Any) -> np.dtype:
    import torch

    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        raise InputError(f"{path}: holds {dtype}, which NumPy cannot represent") from None


def _torch_byteorder(f: IO[bytes]) -> str | None:
    """The byte order a zip-format .pt records (``<archive>/byteorder``; files from before it
    was recorded are little-endian); None for an unreadable archive, left to torch.load."""
    try:
        with zipfile.ZipFile(f) as z:
            names = [n for n in z.namelist() if n.endswith("/byteorder")]
            order = z.read(names[0]).decode().strip() if names else "little"
    except (OSError, UnicodeDecodeError, *_ZIP_ERRORS):
        order = None
    f.seek(0)
    return order


def _torch_mapped(path: Path, f: IO[bytes], meta: Any, offset: int) -> ArrayFile:
    """The tensor ``meta`` (on the meta device) mapped from its storage at ``offset``."""
    import torch

    bf16 = meta.dtype == torch.bfloat16
    raw = np.dtype("<u2") if bf16 else _torch_numpy_dtype(path, meta.dtype)
    stored = meta.untyped_storage().nbytes()
    record = _record_at(f, offset)
    if record is None:
        raise InputError(f"{path}: the tensor's data is not an uncompressed record of the file")
    if stored > record or offset + stored > _size(f):
        raise InputError(
            f"{path}: truncated: the tensor's storage needs {stored} bytes, its record in the "
            f"file holds {min(record, max(0, _size(f) - offset))}"
        )
    shape, strides = tuple(meta.shape), tuple(s * raw.itemsize for s in meta.stride())
    start = meta.storage_offset() * raw.itemsize
    if 0 not in shape:
        reach = sum((d - 1) * s for d, s in zip(shape, strides, strict=True)) + raw.itemsize
        if start + reach > stored:
            raise InputError(f"{path}: the tensor reaches past the end of its storage")
    widen = _bf16_to_f32 if bf16 else None
    return _Mapped(path, f, shape, raw, offset + start, strides=strides, widen=widen)


def _record_at(f: IO[bytes], offset: int) -> int | None:
    """The size of the uncompressed zip record whose data starts at ``offset``, if any: the
    pickle's sizes are checked against it, since mapped bytes past a record's end would be
    the next record's, read as numbers."""
    try:
        with zipfile.ZipFile(f) as zf:
            before = [i for i in zf.infolist() if i.header_offset < offset]
            info = max(before, key=lambda i: i.header_offset, default=None)
            if info is None or info.compress_type != zipfile.ZIP_STORED:
                return None
            return info.file_size if _member_data(f, info) == offset else None
    except (OSError, *_ZIP_ERRORS):
        return None


def _wide(dtype: Any) -> Any:
    """NumPy has no bfloat16: such tensors are read as float32, which holds them exactly."""
    import torch

    return torch.float32 if dtype == torch.bfloat16 else dtype


class _TorchTensor(ArrayFile):
    """A tensor torch.load returned: memory-mapped by PyTorch or read whole."""

    def __init__(self, path: Path, t: Any, dtype: np.dtype) -> None:
        super().__init__(path, tuple(t.shape), dtype)
        self._t = t

    def rows(self, axis: int, chunk: int) -> Iterator[np.ndarray]:
        import torch

        t = self._t if axis in (-1, self._t.ndim - 1) else torch.movedim(self._t, axis, -1)

        def copy(block: Any) -> np.ndarray:
            return block.to(_wide(block.dtype)).contiguous().numpy().copy()

        yield from _row_blocks(t, chunk, copy)


def open_array(spec: str) -> ArrayFile:
    """Open ``FILE`` or ``FILE::NAME`` for chunked reading; raises :class:`InputError`."""
    path, key = _split(spec)
    f = _open_regular(path)
    try:
        suffix = path.suffix.lower()
        if suffix == ".npy":
            if key is not None:
                raise InputError(f"{path}: a .npy file holds one array; drop '::{key}'")
            return _npy(path, f)
        if suffix == ".npz":
            return _npz(path, f, key)
        if suffix == ".safetensors":
            return _safetensors(path, f, key)
        if suffix in (".pt", ".pth"):
            return _torch(path, f, key)
        from ..llamacpp import MAGIC

        if f.read(len(MAGIC)) == MAGIC:
            raise InputError(
                f"{path}: is a llama.cpp base file, which can only be the reference (REF, the "
                "first file)"
            )
        raise InputError(
            f"{path}: unknown file type {suffix!r}; expected one of {', '.join(SUFFIXES)}"
        )
    except OSError as e:  # a read that failed while checking the header
        f.close()
        raise InputError(f"{path}: cannot read ({e.strerror or _reason(e)})") from None
    except BaseException:
        f.close()
        raise
