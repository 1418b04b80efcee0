"""`kldiv compare` on hostile input, through the command in a subprocess: files that are not
regular files, OS errors on every path it is given, tensors it cannot read, headers that
promise more than the file holds, and signals while it writes --out.

Every failure must be one line on stderr, ``kldiv compare: error: <the file at fault>: ...``,
exit status 2, nothing on stdout and nothing left on disk. Every run has a timeout, so that an
input that blocks fails the test instead of hanging the suite."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.spawns

TIMEOUT = 60  # seconds; a run that blocks fails here instead of hanging the suite


def compare(*args, cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kldiv", "compare", *map(str, args), "--quiet"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_error(proc: subprocess.CompletedProcess, culprit: str, *needles: str) -> None:
    """One line on stderr that names ``culprit`` first, exit 2, nothing on stdout."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"kldiv compare: error: {culprit}: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))  # hidden entries too: a leftover .OUT.xxxxxxxx counts


def pair(tmp_path: Path, rng, shape=(6, 50)) -> tuple[np.ndarray, np.ndarray]:
    a = rng.normal(scale=2.0, size=shape).astype(np.float32)
    b = (a + rng.normal(scale=0.5, size=shape)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "labels.npy", rng.integers(0, shape[-1], shape[:-1]))
    return a, b


def report(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def reference_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-token KL(softmax a ‖ softmax b) in float64, written out; and both log-softmaxes."""
    la = a.astype(np.float64) - np.logaddexp.reduce(a.astype(np.float64), axis=-1, keepdims=True)
    lb = b.astype(np.float64) - np.logaddexp.reduce(b.astype(np.float64), axis=-1, keepdims=True)
    return np.maximum((np.exp(la) * (la - lb)).sum(-1), 0.0), la, lb


# Both sides compute in float64 from the same float32 values, so they differ only by rounding:
# a per-token KL sums V = 50 terms p·(log p − log q) of size up to ~10 into a value of ~0.1,
# a relative error of about V·eps·10 / 0.1 ≈ 1e-13.
REL = 1e-12


def check_report(rep: dict, a: np.ndarray, b: np.ndarray, axis: int = -1) -> None:
    kl, _, _ = reference_kl(np.moveaxis(a, axis, -1), np.moveaxis(b, axis, -1))
    kl = kl.reshape(-1)
    assert rep["num_tokens"] == kl.size
    assert rep["kl_mean"] == pytest.approx(kl.mean(), rel=REL)
    assert rep["kl_max"] == pytest.approx(kl.max(), rel=REL)
    assert rep["kl_percentiles"]["50"] == pytest.approx(np.percentile(kl, 50), rel=REL)
    top = np.moveaxis(a, axis, -1).argmax(-1) == np.moveaxis(b, axis, -1).argmax(-1)
    assert rep["top1_agreement"] == pytest.approx(top.mean(), rel=1e-15)


# --- 1. files that are not regular files -----------------------------------------------------


@pytest.fixture
def not_regular(tmp_path, monkeypatch):
    """A FIFO, a socket, a directory and a device, each named like an array file."""
    monkeypatch.chdir(tmp_path)  # a socket's path must be short: bind it by a relative name
    os.mkfifo("fifo.npy")
    os.mkdir("dir.npy")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock.npy")
    yield {"fifo.npy": "a FIFO", "dir.npy": "a directory", "sock.npy": "a socket"} | {
        os.devnull: "a character device"
    }
    sock.close()


@pytest.mark.parametrize("role", ["ref", "cand", "labels"])
def test_files_that_are_not_regular_are_refused_without_blocking(tmp_path, rng, not_regular, role):
    pair(tmp_path, rng)
    before = listing(tmp_path)
    for name, what in not_regular.items():
        args = {
            "ref": [name, "b.npy"],
            "cand": ["a.npy", name],
            "labels": ["a.npy", "b.npy", "--labels", name],
        }[role]
        # a FIFO opened for reading would block until a writer comes: the timeout catches that
        proc = compare(*args, "--out", "rep", cwd=tmp_path)
        assert_error(proc, name, f"is {what}")
        assert listing(tmp_path) == before


# --- 2. OS errors on every path --------------------------------------------------------------


def os_error_cases(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(a path, the error it gives, the file named at fault) that fail whoever runs them; a
    permission case is added where it means something (root passes every permission check)."""
    os.symlink("loop.npy", tmp_path / "loop.npy")
    cases = [
        ("x" * 300 + ".npy", "File name too long", "x" * 300 + ".npy"),
        ("a.npy/x.npy", "Not a directory", "a.npy/x.npy"),  # a path through a regular file
        ("loop.npy", "Too many levels of symbolic links", "loop.npy"),
    ]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        np.save(locked / "c.npy", np.zeros((6, 50), np.float32))
        locked.chmod(0)
        cases.append(("locked/c.npy", "Permission denied", "locked/c.npy"))
    return cases


def test_os_errors_on_inputs_and_labels_name_the_file(tmp_path, rng):
    pair(tmp_path, rng)
    cases = os_error_cases(tmp_path)
    before = listing(tmp_path)
    try:
        for bad, error, culprit in cases:
            for args in (
                [bad, "b.npy"],
                ["a.npy", bad],
                ["a.npy", "b.npy", "--labels", bad],
            ):
                proc = compare(*args, "--out", "rep", cwd=tmp_path)
                assert_error(proc, culprit, f"cannot open ({error})")
                assert listing(tmp_path) == before
    finally:
        if (tmp_path / "locked").exists():
            (tmp_path / "locked").chmod(0o700)


def test_os_errors_on_out_name_the_directory(tmp_path, rng):
    pair(tmp_path, rng)
    cases = [
        ("x" * 300, "x" * 300, "cannot be used as --out (File name too long)"),
        ("a.npy/rep", "a.npy", "the parent of --out is not a writable directory"),
    ]
    if os.geteuid() != 0:
        (tmp_path / "readonly").mkdir(mode=0o500)
        cases.append(
            ("readonly/rep", "readonly", "the parent of --out is not a writable directory")
        )
    before = listing(tmp_path)
    for out, culprit, message in cases:
        proc = compare("a.npy", "b.npy", "--out", out, cwd=tmp_path)
        assert_error(proc, culprit, message)
        assert listing(tmp_path) == before


def test_out_name_near_the_length_limit_is_written(tmp_path, rng):
    # the hidden working directory beside --out gets a longer name than --out itself
    a, b = pair(tmp_path, rng)
    out = "r" * 250
    proc = compare("a.npy", "b.npy", "--out", out, "--json", cwd=tmp_path)
    rep = report(proc)
    assert json.loads((tmp_path / out / "report.json").read_text()) == rep
    assert rep["num_tokens"] == a.shape[0]
    assert listing(tmp_path) == sorted(["a.npy", "b.npy", "labels.npy", out])


# --- 3. tensors that cannot be read, and one distribution with a 0-d label -------------------


def test_sparse_and_nested_pt_are_one_line_errors(tmp_path, rng):
    a, _ = pair(tmp_path, rng)
    dense = torch.from_numpy(a)
    torch.save(dense.to_sparse(), tmp_path / "coo.pt")
    with warnings.catch_warnings():  # "sparse CSR is in beta", "nested is a prototype"
        warnings.simplefilter("ignore", UserWarning)
        torch.save(dense.to_sparse_csr(), tmp_path / "csr.pt")
        nested = torch.nested.nested_tensor([dense[:2], dense[2:5]])
    torch.save(nested, tmp_path / "nested.pt")
    for name, message in [
        ("coo.pt", "holds a torch.sparse_coo tensor"),
        ("csr.pt", "holds a torch.sparse_csr tensor"),
        ("nested.pt", "holds a nested tensor"),
    ]:
        assert_error(compare("a.npy", name, cwd=tmp_path), name, message)


def save_as(path: Path, fmt: str, x: np.ndarray) -> str:
    """``x`` saved as ``path`` in format ``fmt``; returns the file name."""
    name = f"{path.name}.{fmt}"
    if fmt == "npz":
        np.savez_compressed(path.with_name(name), x=x)
    elif fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file({"x": x}, str(path.with_name(name)))
    else:
        torch.save(torch.from_numpy(x), path.with_name(name))
    return name


@pytest.mark.parametrize("fmt", ["npy", "npz", "safetensors", "pt"])
def test_one_distribution_with_a_0d_label(tmp_path, rng, fmt):
    a = rng.normal(scale=2.0, size=50).astype(np.float32)
    b = (a + rng.normal(scale=0.5, size=50)).astype(np.float32)
    y = np.array(int(rng.integers(0, 50)))
    if fmt == "npy":
        for name, x in (("a", a), ("b", b), ("y", y)):
            np.save(tmp_path / f"{name}.npy", x)
        names = ["a.npy", "b.npy", "y.npy"]
    else:
        names = [save_as(tmp_path / n, fmt, x) for n, x in (("a", a), ("b", b), ("y", y))]
    rep = report(compare(names[0], names[1], "--labels", names[2], "--json", cwd=tmp_path))
    check_report(rep, a, b)
    _, la, lb = reference_kl(a, b)
    assert rep["ppl_ratio"] == pytest.approx(float(np.exp(la[y] - lb[y])), rel=REL)


# --- 3b. .npz members with a category axis that is not last ----------------------------------


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def write_npz(path: Path, data: bytes, compression: int) -> None:
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("x.npy", data)


def corrupt_deflate(path: Path) -> None:
    """Zero 64 bytes in the middle of the first member's compressed data, far past its header."""
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[26:28], "little"), int.from_bytes(raw[28:30], "little")
    size = int.from_bytes(raw[18:22], "little")
    middle = 30 + name_len + extra_len + size // 2
    raw[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(raw))


def test_npz_members_with_axis_0_blame_the_right_file(tmp_path, rng):
    # categories first, (V, tokens): every block of tokens needs bytes from the whole member
    a, b = pair(tmp_path, rng, shape=(400, 50))
    at, bt = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    np.save(tmp_path / "ref.npy", at)
    np.savez_compressed(tmp_path / "cand.npz", x=bt)
    write_npz(tmp_path / "corrupt.npz", npy_bytes(bt), zipfile.ZIP_DEFLATED)
    corrupt_deflate(tmp_path / "corrupt.npz")
    # the member's header promises all 400 tokens, its data stops half way
    cut = npy_bytes(bt)[: -bt.nbytes // 2]
    write_npz(tmp_path / "trunc.npz", cut, zipfile.ZIP_DEFLATED)
    write_npz(tmp_path / "trunc_stored.npz", cut, zipfile.ZIP_STORED)
    # decompressed to a temporary file, and mapped from there
    check_report(
        report(compare("ref.npy", "cand.npz", "--axis", "0", "--json", cwd=tmp_path)), a, b
    )
    before = listing(tmp_path)
    for bad, message in [
        ("corrupt.npz", "corrupt.npz: "),
        ("trunc.npz", "member x.npy is truncated"),
        ("trunc_stored.npz", "member x.npy is truncated"),
    ]:
        for args in (["ref.npy", bad], [bad, "ref.npy"]):
            proc = compare(*args, "--axis", "0", "--out", "rep", cwd=tmp_path)
            assert_error(proc, bad, message)
        assert listing(tmp_path) == before


# --- 4. headers that promise more than the file holds ----------------------------------------


def npy_with_header(path: Path, shape: tuple, data: bytes) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": shape}
        )
        f.write(data)


def safetensors_with_header(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def test_headers_that_do_not_fit_the_file_are_refused_before_reading(tmp_path, rng):
    a, _ = pair(tmp_path, rng)
    data = a.tobytes()  # 6 × 50 float32
    npy_with_header(tmp_path / "neg.npy", (-1, 50), data)
    npy_with_header(tmp_path / "one_more.npy", (7, 50), data)
    npy_with_header(tmp_path / "huge.npy", (10**12, 50), data)
    npy_with_header(tmp_path / "wraps.npy", (2**62, 2**62), data)  # overflows int64 bytes
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (7, 50)}
    )
    write_npz(tmp_path / "stored.npz", header.getvalue() + data, zipfile.ZIP_STORED)
    write_npz(tmp_path / "deflated.npz", header.getvalue() + data, zipfile.ZIP_DEFLATED)
    entry = {"dtype": "F32", "shape": [6, 50], "data_offsets": [0, len(data)]}
    safetensors_with_header(tmp_path / "cut.safetensors", {"x": entry}, data[:-4])
    safetensors_with_header(
        tmp_path / "shape.safetensors", {"x": {**entry, "shape": [60, 50]}}, data
    )
    (tmp_path / "length.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    torch.save(torch.from_numpy(a), tmp_path / "full.pt")
    with zipfile.ZipFile(tmp_path / "full.pt") as src:  # the same archive, its data cut short
        with zipfile.ZipFile(tmp_path / "cut.pt", "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                record = src.read(info)
                dst.writestr(info.filename, record[:-8] if "/data/" in info.filename else record)
    before = listing(tmp_path)
    for bad, message in [
        ("neg.npy", "negative dimension"),
        ("one_more.npy", "truncated: the header promises 1400 bytes of data, the file has 1200"),
        ("huge.npy", "truncated: the header promises 200000000000000 bytes"),
        ("wraps.npy", "truncated"),
        ("stored.npz", "member x.npy is truncated: its header promises 1400 bytes"),
        ("deflated.npz", "member x.npy is truncated: its header promises 1400 bytes"),
        ("cut.safetensors", "truncated: tensor 'x' ends at byte"),
        ("shape.safetensors", "its shape (60, 50) needs 12000 bytes, its data_offsets give 1200"),
        ("length.safetensors", "header length 1000000000 does not fit"),
        (
            "cut.pt",
            "truncated: the tensor's storage needs 1200 bytes, its record in the file holds 1192",
        ),
    ]:
        assert_error(compare("a.npy", bad, "--out", "rep", cwd=tmp_path), bad, message)
        assert listing(tmp_path) == before


def test_mapped_layouts_read_exactly(tmp_path, rng):
    """Arrays memory-mapped at an offset inside their file, in each layout that has its own
    offsets and strides: a stored .npz member, a .pt whose storage holds the transpose, a .pt
    view into a larger storage, and bfloat16 (.pt and .safetensors) widened to float32; and
    a .pt in the legacy format, which cannot be mapped and is read by torch.load."""
    from safetensors.torch import save_file

    a, b = pair(tmp_path, rng, shape=(3, 7, 50))
    # values that bfloat16 holds exactly
    a16, b16 = (torch.from_numpy(x).to(torch.bfloat16) for x in (a, b))
    for stem, x, x16 in (("a", a, a16), ("b", b, b16)):
        t = torch.from_numpy(x)
        np.savez(tmp_path / f"{stem}_stored.npz", x=x)
        # strides (1, 3, 21): the storage holds the transpose
        torch.save(t.permute(2, 1, 0).contiguous().permute(2, 1, 0), tmp_path / f"{stem}_t.pt")
        torch.save(torch.cat([torch.zeros(1, 7, 50), t])[1:], tmp_path / f"{stem}_view.pt")
        torch.save(x16, tmp_path / f"{stem}_bf16.pt")
        torch.save(t, tmp_path / f"{stem}_legacy.pt", _use_new_zipfile_serialization=False)
        save_file({"x": x16}, str(tmp_path / f"{stem}_bf16.safetensors"))
    wide = a16.float().numpy(), b16.float().numpy()
    cases = [
        ("_stored.npz", (a, b), -1),
        ("_stored.npz", (a, b), 1),
        ("_t.pt", (a, b), 1),
        ("_view.pt", (a, b), -1),
        ("_bf16.pt", wide, -1),
        ("_bf16.safetensors", wide, 1),
        ("_legacy.pt", (a, b), 1),
    ]
    for suffix, (x, y), axis in cases:
        proc = compare(f"a{suffix}", f"b{suffix}", "--axis", axis, "--json", cwd=tmp_path)
        check_report(report(proc), x, y, axis)


# --- 5. signals while writing --out, and the mode of --out ------------------------------------


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["INT", "TERM", "HUP"]
)
def test_signal_while_writing_out_removes_the_partial_directory(tmp_path, rng, signum):
    # 20000 tokens: the histogram and the report take a second or more to write, ample time
    # to see the hidden working directory appear and signal the process inside that window
    pair(tmp_path, rng, shape=(20000, 50))
    before = listing(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kldiv", "compare", "a.npy", "b.npy", "--out", "rep", "--quiet"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not any(n.startswith(".rep.") for n in os.listdir(tmp_path)):
            assert proc.poll() is None, "finished before its working directory was seen"
            assert time.monotonic() < deadline, "no working directory appeared"
            time.sleep(0.002)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signum, (proc.returncode, err)
    assert out == "" and "Traceback" not in err, err
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    ("umask", "dir_mode", "file_mode"),
    [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)],
    ids=["umask022", "umask077"],
)
def test_out_directory_mode_follows_the_umask(tmp_path, rng, umask, dir_mode, file_mode):
    pair(tmp_path, rng)
    cmd = f'umask {umask:03o} && exec "$0" -m kldiv compare a.npy b.npy --out rep --quiet'
    proc = subprocess.run(
        ["sh", "-c", cmd, sys.executable],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((tmp_path / "rep").stat().st_mode) == dir_mode
    for f in (tmp_path / "rep").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == file_mode, f.name


# A run over many small chunks (kldiv.cli.CHUNK_BYTES lowered in a fresh interpreter): the
# reading thread is mid-copy when a later chunk fails
SMALL_CHUNKS = """
import sys
from kldiv import cli

cli.CHUNK_BYTES = 4096
raise SystemExit(cli.main(sys.argv[1:]))
"""


def test_an_error_in_a_later_chunk_stops_the_reading_thread_first(tmp_path, rng):
    """A bad label in the second chunk used to unmap the files under the thread still copying
    the next chunk: a segfault after the error line (6 runs of 6 on 64 MB files)."""
    a, b = pair(tmp_path, rng, shape=(4000, 64))
    labels = rng.integers(0, 64, size=4000)
    labels[100] = 5000  # past the first chunk of 16 rows
    np.save(tmp_path / "labels.npy", labels)
    for _ in range(5):
        proc = subprocess.run(
            [sys.executable, "-c", SMALL_CHUNKS, "compare", "a.npy", "b.npy"]
            + ["--labels", "labels.npy", "--quiet"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert_error(proc, "labels.npy", "got 5000")


def test_a_big_endian_pt_is_read_in_its_byte_order(tmp_path, rng):
    """A .pt saved on a big-endian machine (its archive says so) crashed PyTorch's meta load
    and would have been read as native bytes: it loads byte-swapped, the same report."""
    a, b = pair(tmp_path, rng)
    torch.save(torch.from_numpy(a), tmp_path / "a.pt")
    src = zipfile.ZipFile(tmp_path / "a.pt")
    with zipfile.ZipFile(tmp_path / "big.pt", "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = np.frombuffer(data, dtype="<f4").astype(">f4").tobytes()
            out.writestr(info, data)
    got, want = (compare(f, "b.npy", "--json", cwd=tmp_path) for f in ("big.pt", "a.pt"))
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == json.loads(want.stdout)
    check_report(report(got), a, b)


def test_a_deeply_nested_safetensors_header_is_one_line(tmp_path, rng):
    pair(tmp_path, rng)
    header = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / "deep.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert_error(compare("deep.safetensors", "b.npy", cwd=tmp_path), "deep.safetensors")


def test_a_compressed_member_spills_only_its_array(tmp_path, rng):
    """With --axis 0 a deflated member is decompressed to a temporary file: its array only,
    not whatever follows it in the member (256 MB of zeros here, all written before)."""
    x = rng.normal(size=(6, 50, 33)).astype(np.float32)
    write_npz(tmp_path / "excess.npz", npy_bytes(x) + bytes(256 << 20), zipfile.ZIP_DEFLATED)
    np.save(tmp_path / "x.npy", x)
    # the limit is set in the child itself: a preexec_fn would fork this multithreaded
    # process (JAX's threads), which can deadlock
    limited = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))\n"
        "from kldiv.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", limited, "compare", "excess.npz", "x.npy", "--axis", "0"]
        + ["--json", "--quiet"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    check_report(json.loads(out), x, x, axis=0)
