"""The package as users install it: an sdist and a wheel built from this tree, installed into
clean virtual environments (no system site packages, nothing from the test environment).

* with ``[torch]``: ``import kldiv``, a DistillationLoss forward and backward that runs on
  the C kernel compiled from the source shipped in the wheel, ``kldiv compare``,
  ``python -m kldiv --version``, and ``kldiv demo`` refusing in one line without ``[cli]``;
* the base install alone: ``kldiv compare`` and ``kldiv info`` work, ``kldiv bench`` and
  ``kldiv demo`` refuse in one line, naming the extra to install.

These are real installs. PyTorch is pinned to the version of the test environment (the CPU
build that `make test` installs, found on the local wheel cache or index), so that pip never
pulls a multi-GB CUDA build. Takes about a minute, most of it installing PyTorch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _version() -> str:
    scope: dict[str, str] = {}
    exec((REPO / "src" / "kldiv" / "_version.py").read_text(), scope)
    return scope["__version__"]


VERSION = _version()


def _env(tmp: Path) -> dict[str, str]:
    """The environment of every command here: nothing that could reach the test environment's
    packages, and a fresh cache, so that the C kernel is compiled from the installed source."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
    }
    env.update(PYTHONNOUSERSITE="1", KLDIV_CACHE_DIR=str(tmp / "kernel-cache"))
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300):
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """An sdist and a wheel built by `python -m build` (isolated: the build requirements of
    pyproject.toml come from the package index, as on a user's machine; the wheel is built
    from the sdist, so a file missing from the sdist is missing from the wheel too).

    The build runs on a copy of the tree: building in place would rewrite src/*.egg-info
    under the feet of the test processes that read it."""
    tmp = tmp_path_factory.mktemp("dist")
    tree = tmp / "tree"
    tree.mkdir()
    for item in REPO.iterdir():
        if item.is_file():
            shutil.copy2(item, tree / item.name)
    shutil.copytree(
        REPO / "src",
        tree / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"),
    )
    out = tmp / "out"
    proc = _run([sys.executable, "-m", "build", "--outdir", out, tree], tmp, _env(tmp), 600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,) = out.glob("kldiv-*.tar.gz")
    (wheel,) = out.glob("kldiv-*.whl")
    return {"sdist": sdist, "wheel": wheel}


def _venv(path: Path, env: dict[str, str], *requirements: str) -> Path:
    """A clean virtual environment with ``requirements`` installed; returns its bin/.

    Created without pip and filled by the test environment's pip (``pip --python``): the
    same install, without bootstrapping a pip into every environment. ``--no-compile``:
    bytecode is written on first import instead, for the few modules a check imports."""
    proc = _run([sys.executable, "-m", "venv", "--without-pip", path], path.parent, env)
    assert proc.returncode == 0, proc.stderr
    bindir = path / "bin"
    pip = [sys.executable, "-m", "pip", "--python", bindir / "python", "install"]
    proc = _run([*pip, "--no-compile", "--no-input", *requirements], path.parent, env, 900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return bindir


def _reference_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row KL(softmax a ‖ softmax b) in float64, written out."""
    la = a - a.max(-1, keepdims=True)
    la = la - np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb = lb - np.log(np.exp(lb).sum(-1, keepdims=True))
    return (np.exp(la) * (la - lb)).sum(-1)


def _inputs(work: Path) -> np.ndarray:
    """Writes a.npy and b.npy (logits, 12 tokens × 7 categories); returns their per-token KL."""
    a = np.sin(np.arange(84.0)).reshape(12, 7).astype(np.float32)
    b = np.cos(np.arange(84.0)).reshape(12, 7).astype(np.float32)
    np.save(work / "a.npy", a)
    np.save(work / "b.npy", b)
    return _reference_kl(a.astype(np.float64), b.astype(np.float64))


def _check_compare(bindir: Path, work: Path, env: dict[str, str]) -> None:
    """`kldiv compare` prints the report; with --out it writes report.json and says, in one
    line, that the figure needs kldiv[cli] (no matplotlib in these environments)."""
    kl = _inputs(work)
    proc = _run([bindir / "kldiv", "compare", "a.npy", "b.npy", "--json"], work, env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    report = json.loads(proc.stdout)
    assert report["num_tokens"] == 12
    assert report["kl_mean"] == pytest.approx(kl.mean(), rel=1e-12)
    assert report["kl_max"] == pytest.approx(kl.max(), rel=1e-12)
    proc = _run([bindir / "kldiv", "compare", "a.npy", "b.npy", "--out", "rep"], work, env)
    assert proc.returncode == 0, proc.stderr
    assert "Mean KL" in proc.stdout and "wrote rep/report.json" in proc.stdout
    assert sorted(p.name for p in (work / "rep").iterdir()) == ["report.json"]
    written = json.loads((work / "rep" / "report.json").read_text())
    assert written["kl_mean"] == pytest.approx(kl.mean(), rel=1e-12)
    note = proc.stderr.strip().splitlines()
    assert len(note) == 1 and note[0].startswith("kldiv compare: note: "), proc.stderr
    assert 'pip install "kldiv[cli]"' in note[0]
    shutil.rmtree(work / "rep")


def _check_refusal(bindir: Path, work: Path, env: dict[str, str], argv, *needles) -> None:
    """``kldiv ARGV`` exits with status 2 and one line naming the extra, and creates nothing."""
    before = sorted(p.name for p in work.iterdir())
    proc = _run([bindir / "kldiv", *argv], work, env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kldiv {argv[0]}: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert sorted(p.name for p in work.iterdir()) == before


def test_the_wheel_and_sdist_carry_the_kernel_source_and_typing_marker(dist):
    names = set(zipfile.ZipFile(dist["wheel"]).namelist())
    for path in ("kldiv/torch/_rows/native.c", "kldiv/py.typed", "kldiv/__main__.py"):
        assert path in names, path
    assert dist["wheel"].name == f"kldiv-{VERSION}-py3-none-any.whl"
    info = f"kldiv-{VERSION}.dist-info"
    entry_points = zipfile.ZipFile(dist["wheel"]).read(f"{info}/entry_points.txt").decode()
    assert "kldiv = kldiv.cli:main" in entry_points
    with tarfile.open(dist["sdist"]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    for path in ("src/kldiv/torch/_rows/native.c", "src/kldiv/py.typed", "pyproject.toml"):
        assert path in members, path


# Run in the [torch] environment: DistillationLoss on the compiled kernel, counted at its
# launcher (the same hook tests/torch/rows/test_native.py uses), against the core in float64.
KERNEL_CHECK = """
import json, sys

import kldiv

assert "torch" not in sys.modules, "import kldiv imported PyTorch"
import torch
from kldiv.torch import DistillationLoss
from kldiv.torch._rows import native as native_engine

rows = []
launch = native_engine.rows
def counted(kind, student, *args, **kwargs):
    rows.append(student.shape[0])
    return launch(kind, student, *args, **kwargs)
native_engine.rows = counted

g = torch.Generator().manual_seed(0)
student = torch.randn(32, 300, generator=g, requires_grad=True)
teacher = torch.randn(32, 300, generator=g)
loss = DistillationLoss("kl", temperature=2.0)(student, teacher)
loss.backward()
s64 = student.detach().double().requires_grad_(True)
ref = kldiv.kl_div(teacher.double(), s64, form="logits", temperature=2.0)
ref.backward()
print(json.dumps({
    "rows": rows,
    "status": native_engine.status(),
    "source": str(native_engine.SOURCE),
    "loss": loss.item(),
    "ref": ref.item(),
    "grad_err": (student.grad.double() - s64.grad).abs().max().item(),
    "grad_max": s64.grad.abs().max().item(),
}))
"""


def test_the_torch_extra_runs_the_c_kernel_and_the_cli(dist, tmp_path):
    env = _env(tmp_path)
    torch_pin = f"torch=={version('torch')}"  # the CPU build of the test environment
    bindir = _venv(tmp_path / "venv", env, f"{dist['wheel']}[torch]", torch_pin)
    work = tmp_path / "work"
    work.mkdir()

    proc = _run([bindir / "python", "-c", KERNEL_CHECK], work, env)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["rows"] == [32], got  # every row went through the C kernel, in one launch
    # compiled now, from the source the wheel installed, into this test's fresh cache
    assert got["status"].startswith(f"compiled ({tmp_path / 'kernel-cache'}"), got["status"]
    assert Path(got["source"]).is_relative_to(tmp_path / "venv"), got["source"]
    # float32 logits, float64 reference: the float32 rounding of 300 terms bounds the error
    assert got["loss"] == pytest.approx(got["ref"], rel=1e-5)
    assert got["grad_err"] <= 1e-5 * got["grad_max"], got

    _check_compare(bindir, work, env)
    proc = _run([bindir / "python", "-m", "kldiv", "--version"], work, env)
    assert proc.returncode == 0 and proc.stdout == f"kldiv {VERSION}\n", proc
    _check_refusal(
        bindir,
        work,
        env,
        ["demo"],
        "missing here: scikit-learn, matplotlib",
        'pip install "kldiv[torch,cli]"',
    )
    assert not (work / "demo-output").exists()


def test_the_base_install_compares_and_names_the_extras_it_lacks(dist, tmp_path):
    env = _env(tmp_path)
    bindir = _venv(tmp_path / "venv", env, str(dist["wheel"]))
    work = tmp_path / "work"
    work.mkdir()

    proc = _run([bindir / "python", "-c", "import torch"], work, env)
    assert proc.returncode == 1 and "No module named 'torch'" in proc.stderr  # a clean venv
    _check_compare(bindir, work, env)
    _check_refusal(bindir, work, env, ["bench", "--out", "b"], 'pip install "kldiv[torch]"')
    _check_refusal(
        bindir, work, env, ["demo"], "missing here: PyTorch", 'pip install "kldiv[torch,cli]"'
    )
    (work / "a.safetensors").write_bytes(b"")
    _check_refusal(
        bindir, work, env, ["compare", "a.safetensors", "b.npy"], 'pip install "kldiv[cli]"'
    )
    proc = _run([bindir / "kldiv", "info"], work, env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"kldiv {VERSION} on Python ")
    for dist_name in ("torch", "jax", "keras", "scipy", "matplotlib", "safetensors"):
        line = next(ln for ln in lines if ln.split()[:1] == [dist_name])
        assert "not installed" in line, line
    assert 'DistillationLoss: needs PyTorch, pip install "kldiv[torch]"' in lines
