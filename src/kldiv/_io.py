"""Array files read in row chunks with bounded memory, for ``kldiv compare``.

Formats: ``.npy`` (memory-mapped; pages are handed back to the kernel after each chunk, so the
resident set stays at one chunk however large the file), ``.npz`` (members read sequentially
from the zip stream, compressed or not), ``.safetensors`` (sliced through ``safe_open``) and
``.pt``/``.pth`` (``torch.load(mmap=True, weights_only=True)``). A file holding several arrays
takes ``FILE::NAME`` to say which one. ``.safetensors`` needs the safetensors package
(``kldiv[cli]``) and ``.pt`` needs PyTorch (``kldiv[torch]``); NumPy formats need nothing extra.

Every failure is an :class:`InputError` whose message starts with the file's name, ready to be
printed as a one-line error.
"""

from __future__ import annotations

import mmap
import os
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

__all__ = ["InputError", "ArrayFile", "open_array", "SUFFIXES"]

SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth")


class InputError(Exception):
    """A problem with an input file, phrased for the user."""


def _read_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the .npy stream ``f``, left at the data."""
    version = np.lib.format.read_magic(f)
    read = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy version {version}")
    return read(f)


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


class ArrayFile:
    """One array in a file: ``shape``, ``dtype`` and ``rows(axis, chunk)``, which yields
    ``[rows, V]`` blocks with the category ``axis`` last, in order, each a fresh array."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: DTypeLike) -> None:
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def rows(self, axis: int, chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def read_all(self) -> np.ndarray:
        """The whole array (for small inputs such as labels)."""
        blocks = list(self.rows(-1, max(1, 1 << 20)))
        lead = self.shape[:-1] if self.shape else ()
        return (
            np.concatenate(blocks).reshape(*lead, *self.shape[-1:])
            if blocks
            else np.empty(self.shape, self.dtype)
        )

    def close(self) -> None:
        pass


def _moved(a: Any, axis: int) -> Any:
    """``a`` viewed as ``[tokens, V]`` with ``axis`` last."""
    a = a if axis in (-1, a.ndim - 1) else np.moveaxis(a, axis, -1)
    return a.reshape(-1, a.shape[-1]) if a.ndim != 2 else a


def _row_blocks(view: Any, chunk: int, copy: Any) -> Iterator[Any]:
    """Contiguous ``[rows, V]`` copies of a strided ``[..., V]`` view, in C order of the token
    axes, each at most ``chunk`` rows: reshaping the whole moved view would copy it at once."""
    if view.ndim <= 2:
        view = view.reshape(-1, view.shape[-1]) if view.ndim == 1 else view
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


class _Npy(ArrayFile):
    def __init__(self, path: Path) -> None:
        try:
            f = open(path, "rb")  # noqa: SIM115 - kept open for the mapping's lifetime
        except OSError as e:
            raise InputError(f"{path}: cannot open ({e.strerror})") from None
        try:
            shape, fortran, dtype = _read_header(f)
            offset = f.tell()
        except (ValueError, OSError, SyntaxError) as e:
            f.close()
            raise InputError(f"{path}: not a valid .npy file ({e})") from None
        super().__init__(path, shape, dtype)
        if dtype.hasobject:
            f.close()
            raise InputError(f"{path}: holds Python objects, not numbers")
        size = os.fstat(f.fileno()).st_size
        if offset + self.nbytes > size:
            f.close()
            raise InputError(
                f"{path}: truncated: the header promises {self.nbytes} bytes of data, "
                f"the file has {size - offset}"
            )
        self._file, self._offset, self._fortran = f, offset, fortran
        self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.nbytes else None

    def _array(self) -> np.ndarray:
        if self._map is None:
            return np.empty(self.shape, self.dtype)
        flat = np.frombuffer(self._map, self.dtype, int(np.prod(self.shape)), self._offset)
        return flat.reshape(self.shape, order="F" if self._fortran else "C")

    def rows(self, axis: int, chunk: int) -> Iterator[np.ndarray]:
        a = self._array()
        if axis not in (-1, a.ndim - 1) or not a.flags.c_contiguous:
            # strided reads (a category axis that is not last): bounded copies, and every
            # block's pages handed back, since a strided block touches the whole mapping
            for block in _row_blocks(np.moveaxis(a, axis, -1), chunk, np.array):
                if self._map is not None:
                    self._map.madvise(mmap.MADV_DONTNEED)
                yield block
            return
        view = _moved(a, axis)
        contiguous = view.flags.c_contiguous
        page = mmap.PAGESIZE
        for start in range(0, view.shape[0], chunk):
            block = np.array(view[start : start + chunk])
            if self._map is not None:
                if contiguous:  # hand back exactly the pages this block came from
                    lo = self._offset + start * view.shape[1] * self.dtype.itemsize
                    hi = lo + block.nbytes
                    lo -= lo % page
                    self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                else:  # a strided read touched the whole mapping
                    self._map.madvise(mmap.MADV_DONTNEED)
            yield block

    def close(self) -> None:
        # Views into the map must be gone before it can close; the ones handed out are copies.
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # pragma: no cover - a caller still holds a view
                pass
        self._file.close()


class _NpzMember(ArrayFile):
    def __init__(self, path: Path, key: str | None) -> None:
        try:
            self._zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise InputError(f"{path}: not a valid .npz file ({e})") from None
        names = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]
        self._member = _only(path, names, key) + ".npy"
        try:
            with self._zip.open(self._member) as f:
                shape, fortran, dtype = _read_header(f)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as e:
            self._zip.close()
            raise InputError(f"{path}: member {self._member} is not a valid array ({e})") from None
        if fortran:
            raise InputError(f"{path}: member {self._member} is Fortran-ordered; save it C-ordered")
        super().__init__(path, shape, dtype)

    def rows(self, axis: int, chunk: int) -> Iterator[np.ndarray]:
        if axis not in (-1, len(self.shape) - 1):
            # the zip stream can only be read forwards: a strided axis needs the whole array
            yield from _moved(self._load(), axis)[None]  # one block
            return
        v = self.shape[-1] if self.shape else 1
        n = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        try:
            with self._zip.open(self._member) as f:
                _read_header(f)
                for start in range(0, n, chunk):
                    rows = min(chunk, n - start)
                    buf = f.read(rows * v * self.dtype.itemsize)
                    if len(buf) != rows * v * self.dtype.itemsize:
                        raise InputError(f"{self.path}: member {self._member} is truncated")
                    yield np.frombuffer(buf, self.dtype).reshape(rows, v).copy()
        except (OSError, zipfile.BadZipFile, EOFError, zlib.error, ValueError) as e:
            raise InputError(f"{self.path}: cannot read {self._member} ({e})") from None

    def _load(self) -> np.ndarray:
        with self._zip.open(self._member) as f:
            return np.lib.format.read_array(f)

    def close(self) -> None:
        self._zip.close()


class _SafeTensors(ArrayFile):
    def __init__(self, path: Path, key: str | None) -> None:
        try:
            from safetensors import safe_open
        except ImportError:
            raise InputError(
                f"{path}: reading .safetensors needs the safetensors package, not installed "
                'here: pip install "kldiv[cli]"'
            ) from None
        try:
            self._handle = safe_open(str(path), framework="numpy")
            self._f = self._handle.__enter__()
            names = list(self._f.keys())
        except Exception as e:  # safetensors raises its own SafetensorError
            raise InputError(f"{path}: not a valid .safetensors file ({e})") from None
        self._key = _only(path, names, key)
        sl = self._f.get_slice(self._key)
        dtype_name = sl.get_dtype()
        self._bf16 = dtype_name == "BF16"
        dtypes: dict[str, DTypeLike] = {
            "F64": np.float64,
            "F32": np.float32,
            "F16": np.float16,
            "BF16": np.float32,
        }
        dtypes |= {"I64": np.int64, "I32": np.int32, "I16": np.int16, "U8": np.uint8}
        if dtype_name not in dtypes:
            raise InputError(f"{path}: tensor {self._key!r} has unsupported dtype {dtype_name}")
        super().__init__(path, tuple(sl.get_shape()), dtypes[dtype_name])
        if self._bf16:  # NumPy cannot hold bfloat16: read through torch, widen exactly
            from safetensors import safe_open as _so

            self._handle.__exit__(None, None, None)
            try:
                self._handle = _so(str(path), framework="pt")
            except Exception as e:
                raise InputError(f"{path}: bfloat16 tensors need PyTorch to read ({e})") from None
            self._f = self._handle.__enter__()

    def rows(self, axis: int, chunk: int) -> Iterator[np.ndarray]:
        sl = self._f.get_slice(self._key)
        nd = len(self.shape)
        if nd < 2:
            yield _moved(self._to_numpy(sl[:]), axis)
            return
        ax = axis % nd
        # Slices along the outermost token axis (the first axis that is not the category
        # axis), so blocks come in the C order of the token axes, whatever ``axis`` is; each
        # block is read alone, moved to [..., V] and flattened to rows.
        j = 1 if ax == 0 else 0
        inner = int(np.prod([d for k, d in enumerate(self.shape) if k not in (ax, j)]))
        per = max(1, chunk // max(1, inner))
        n = self.shape[j]
        for start in range(0, n, per):  # safetensors rejects slices past the end
            index = (slice(None),) * j + (slice(start, min(n, start + per)),)
            yield _moved(self._to_numpy(sl[index]), ax).copy()

    def _to_numpy(self, x: Any) -> np.ndarray:
        if self._bf16:
            return x.float().numpy()
        return np.asarray(x)

    def close(self) -> None:
        self._handle.__exit__(None, None, None)


class _Torch(ArrayFile):
    def __init__(self, path: Path, key: str | None) -> None:
        try:
            import torch
        except ImportError:
            raise InputError(
                f"{path}: reading .pt files needs PyTorch, not installed here: "
                'pip install "kldiv[torch]"'
            ) from None
        try:
            try:
                obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # the legacy (non-zip) format cannot be memory-mapped: read it whole
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds here (pickle, zip, runtime)
            raise InputError(
                f"{path}: not a readable PyTorch file ({type(e).__name__}: {e})"
            ) from None
        if isinstance(obj, dict):
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            obj = tensors[_only(path, list(tensors), key)]
        if not isinstance(obj, torch.Tensor):
            raise InputError(f"{path}: holds a {type(obj).__name__}, not a tensor")
        self._t = obj.detach()
        # NumPy has no bfloat16: such tensors are read as float32, which holds them exactly
        wide = torch.float32 if obj.dtype == torch.bfloat16 else obj.dtype
        try:
            dtype = torch.empty(0, dtype=wide).numpy().dtype
        except TypeError:
            raise InputError(f"{path}: holds {obj.dtype}, which NumPy cannot represent") from None
        super().__init__(path, tuple(obj.shape), dtype)

    def rows(self, axis: int, chunk: int) -> Iterator[np.ndarray]:
        import torch

        t = self._t if axis in (-1, self._t.ndim - 1) else torch.movedim(self._t, axis, -1)

        def copy(block: Any) -> np.ndarray:
            block = block.float() if block.dtype == torch.bfloat16 else block
            return block.contiguous().numpy().copy()

        yield from _row_blocks(t, chunk, copy)


def open_array(spec: str) -> ArrayFile:
    """Open ``FILE`` or ``FILE::NAME`` for chunked reading; raises :class:`InputError`."""
    path, key = _split(spec)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an array file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if key is not None:
            raise InputError(f"{path}: a .npy file holds one array; drop '::{key}'")
        return _Npy(path)
    if suffix == ".npz":
        return _NpzMember(path, key)
    if suffix == ".safetensors":
        return _SafeTensors(path, key)
    if suffix in (".pt", ".pth"):
        return _Torch(path, key)
    raise InputError(f"{path}: unknown file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")
