"""The kldiv command: compare (every format, every error path, through main() and a
subprocess), the demo's training run, bench, info, --version and `python -m kldiv`, and each
command where its optional packages are missing (tests/package/test_wheel.py: on real installs)."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import blocked
import jax
import numpy as np
import pytest

# Imported at collection: scikit-learn's first import draws from Python's `random`, which the
# conftest would otherwise pin on test_demo_trains_and_writes_figures (the demo seeds its own).
import sklearn.datasets  # noqa: F401
import torch

from kldiv import cli


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def logits_pair(rng, shape=(3, 40, 30)):
    a = rng.normal(scale=2.0, size=shape).astype(np.float32)
    b = (a + rng.normal(scale=0.5, size=shape)).astype(np.float32)
    return a, b


def reference_kl(a, b):
    """Per-token KL(softmax a ‖ softmax b) in float64, written out."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    return (np.exp(la) * (la - lb)).sum(-1).reshape(-1), la, lb


def check_report(rep, a, b, labels=None):
    kl, la, lb = reference_kl(a, b)
    kl = np.maximum(kl, 0.0)
    assert rep["num_tokens"] == kl.size
    assert rep["kl_mean"] == pytest.approx(kl.mean(), rel=1e-12)
    assert rep["kl_stderr"] == pytest.approx(kl.std(ddof=1) / np.sqrt(kl.size), rel=1e-9)
    assert rep["kl_max"] == pytest.approx(kl.max(), rel=1e-12)
    for key, q in (("99", 99.0), ("50", 50.0), ("0.1", 0.1)):
        assert rep["kl_percentiles"][key] == pytest.approx(np.percentile(kl, q), rel=1e-12)
    top = (a.reshape(-1, a.shape[-1]).argmax(-1) == b.reshape(-1, b.shape[-1]).argmax(-1)).mean()
    assert rep["top1_agreement"] == pytest.approx(top, rel=1e-15)
    if labels is not None:
        y = labels.reshape(-1)
        rows = np.arange(y.size)
        lp, lq = la.reshape(-1, la.shape[-1])[rows, y], lb.reshape(-1, lb.shape[-1])[rows, y]
        assert rep["ppl_ratio"] == pytest.approx(np.exp(np.mean(lp) - np.mean(lq)), rel=1e-10)
        assert rep["dp_mean"] == pytest.approx(np.mean(np.exp(lq) - np.exp(lp)), abs=1e-12)


def save(path: Path, fmt: str, arrays: dict[str, np.ndarray]) -> str:
    if fmt == "npy":
        ((_, a),) = arrays.items()
        np.save(path.with_suffix(".npy"), a)
        return str(path.with_suffix(".npy"))
    if fmt == "npz":
        np.savez_compressed(path.with_suffix(".npz"), **arrays)
        return str(path.with_suffix(".npz"))
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(
            {k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path) + ".safetensors"
        )
        return str(path) + ".safetensors"
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, str(path) + ".pt")
    return str(path) + ".pt"


@pytest.mark.parametrize("fmt", ["npy", "npz", "safetensors", "pt"])
def test_compare_every_format_equals_float64(tmp_path, rng, fmt, monkeypatch):
    monkeypatch.setattr(cli, "CHUNK_BYTES", 4 * 30 * 7)  # 7 tokens per chunk: many chunks
    a, b = logits_pair(rng)
    if fmt in ("safetensors",):
        a, b = a.reshape(-1, 30), b.reshape(-1, 30)
    ref = save(tmp_path / "ref", fmt, {"logits": a})
    cand = save(tmp_path / "cand", fmt, {"logits": b})
    code, out, err = run(["compare", ref, cand, "--json", "--quiet"])
    assert code == 0, err
    check_report(json.loads(out), a, b)


def test_compare_labels_forms_and_outputs(tmp_path, rng):
    a, b = logits_pair(rng)
    labels = rng.integers(0, 30, a.shape[:-1])
    np.save(tmp_path / "ref.npy", a)
    la = a - np.log(np.exp(a.astype(np.float64)).sum(-1, keepdims=True))
    np.save(
        tmp_path / "cand_lp.npy", (b - np.log(np.exp(b.astype(np.float64)).sum(-1, keepdims=True)))
    )
    np.save(tmp_path / "labels.npy", labels)
    dest = tmp_path / "report"
    code, out, err = run(
        [
            "compare",
            str(tmp_path / "ref.npy"),
            str(tmp_path / "cand_lp.npy"),
            "--form",
            "logits,log_probs",
            "--labels",
            str(tmp_path / "labels.npy"),
            "--out",
            str(dest),
            "--quiet",
        ]
    )
    assert code == 0, err
    assert "Mean KL" in out and "PPL(cand)/PPL(ref)" in out
    assert sorted(p.name for p in dest.iterdir()) == ["kl_histogram.png", "report.json"]
    assert (dest / "kl_histogram.png").read_bytes()[:4] == b"\x89PNG"
    check_report(json.loads((dest / "report.json").read_text()), a, b, labels)
    assert la.shape == a.shape
    # the category axis elsewhere: the same numbers
    np.save(tmp_path / "ref_t.npy", np.moveaxis(a, -1, 0))
    np.save(tmp_path / "cand_t.npy", np.moveaxis(b, -1, 0))
    code, out, _ = run(
        [
            "compare",
            str(tmp_path / "ref_t.npy"),
            str(tmp_path / "cand_t.npy"),
            "--axis",
            "0",
            "--json",
            "--quiet",
        ]
    )
    assert code == 0
    check_report(json.loads(out), a, b)


def test_compare_zero_support_is_infinite_not_nan(tmp_path):
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = np.array([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]])
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "q.npy", q)
    code, out, _ = run(
        [
            "compare",
            str(tmp_path / "p.npy"),
            str(tmp_path / "q.npy"),
            "--form",
            "probs",
            "--json",
            "--quiet",
        ]
    )
    rep = json.loads(out)
    assert code == 0 and rep["kl_num_inf"] == 1 and rep["kl_max"] == "inf"
    assert rep["kl_mean"] == "inf" and rep["top1_agreement"] == 1.0  # ties go to index 0


def error_cases(tmp_path, rng):
    a, b = logits_pair(rng, (4, 6))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "short.npy", b[:3])
    np.save(tmp_path / "ints.npy", np.zeros((4, 6), dtype=np.int64))
    bad_probs = np.full((4, 6), 0.2)
    np.save(tmp_path / "badp.npy", bad_probs)
    np.save(tmp_path / "goodp.npy", np.full((4, 6), 1 / 6))
    nan = b.copy()
    nan[2, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "corrupt.npy").write_bytes(b"not an npy file at all")
    raw = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "trunc.npy").write_bytes(raw[: len(raw) - 10])
    (tmp_path / "x.csv").write_text("1,2\n")
    np.savez(tmp_path / "two.npz", x=a, y=b)
    np.save(tmp_path / "labels_bad.npy", np.zeros((5,), dtype=np.int64))
    np.save(tmp_path / "labels_oob.npy", np.full((4,), 6, dtype=np.int64))
    (tmp_path / "exists").mkdir()
    np.save(tmp_path / "labels_none.npy", np.full((4,), -100, dtype=np.int64))
    np.save(tmp_path / "empty.npy", np.zeros((0, 6), dtype=np.float32))
    np.save(tmp_path / "novocab.npy", np.zeros((4, 0), dtype=np.float32))
    import zipfile

    with zipfile.ZipFile(tmp_path / "comp.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", b"\x93NUMPY" + b"garbage" * 50)
    t = str(tmp_path)
    return [
        ([f"{t}/missing.npy", f"{t}/b.npy"], "missing.npy: no such file"),
        ([f"{t}/corrupt.npy", f"{t}/b.npy"], "corrupt.npy: not a valid .npy file"),
        ([f"{t}/a.npy", f"{t}/trunc.npy"], "trunc.npy: truncated"),
        ([f"{t}/a.npy", f"{t}/short.npy"], "short.npy: has shape (3, 6) but"),
        ([f"{t}/a.npy", f"{t}/ints.npy"], "ints.npy: holds int64 values"),
        ([f"{t}/x.csv", f"{t}/b.npy"], "x.csv: unknown file type '.csv'"),
        ([f"{t}/two.npz", f"{t}/b.npy"], "two.npz: holds 2 arrays (x, y); name one"),
        ([f"{t}/two.npz::z", f"{t}/b.npy"], "two.npz: has no array named 'z'"),
        ([f"{t}/a.npy", f"{t}/nan.npy"], "nan.npy: `cand` contains 1 NaN value"),
        (
            [f"{t}/badp.npy", f"{t}/goodp.npy", "--form", "probs"],
            "badp.npy: `ref` (form='probs') is not a valid distribution at token index (0,): its probabilities do not sum to 1",
        ),
        (
            [f"{t}/a.npy", f"{t}/b.npy", "--labels", f"{t}/labels_bad.npy"],
            "labels_bad.npy: has shape (5,); labels need the token shape (4,)",
        ),
        (
            [f"{t}/a.npy", f"{t}/b.npy", "--labels", f"{t}/labels_oob.npy"],
            "labels_oob.npy: Expected `labels` in [0, 6)",
        ),
        ([f"{t}/a.npy", f"{t}/b.npy", "--axis", "2"], "--axis 2 is out of range for shape (4, 6)"),
        ([f"{t}/a.npy", f"{t}/b.npy", "--out", f"{t}/exists"], "exists: already exists"),
        ([f"{t}", f"{t}/b.npy"], "is a directory"),
        (
            [f"{t}/a.npy", f"{t}/b.npy", "--labels", f"{t}/labels_none.npy"],
            "labels_none.npy: No tokens to report on: all 4 tokens seen had labels == ignore_index",
        ),
        ([f"{t}/empty.npy", f"{t}/empty.npy"], "empty.npy: has shape (0, 6), no tokens"),
        ([f"{t}/novocab.npy", f"{t}/novocab.npy"], "novocab.npy: has no categories"),
        ([f"{t}/comp.npz", f"{t}/comp.npz"], "comp.npz: member x.npy is not a valid array"),
        ([f"{t}/a.npy", f"{t}/b.npy", "--out", ""], "--out: expected a directory name"),
        (
            [f"{t}/a.npy", f"{t}/b.npy", "--out", f"{t}/nodir/report"],
            "nodir: the parent of --out is not a writable directory",
        ),
    ]


def test_every_error_is_one_line_exit_2_and_leaves_nothing(tmp_path, rng):
    cases = error_cases(tmp_path, rng)
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in cases:
        out_args = [] if "--out" in args else ["--out", str(tmp_path / "new_report")]
        code, out, err = run(["compare", *args, *out_args, "--quiet"])
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kldiv compare: error: "), err
        assert message in lines[0], (message, lines[0])
        assert out == ""
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no partial output
    assert (tmp_path / "exists").is_dir() and not any((tmp_path / "exists").iterdir())


def test_demo_out_is_checked_before_any_output(tmp_path):
    (tmp_path / "afile").write_text("x")
    for bad, message in [
        (str(tmp_path / "afile"), "afile: cannot create the output directory"),
        ("", "--out: expected a directory name"),
    ]:
        code, out, err = run(["demo", "--out", bad])
        assert code == 2 and out == "", err  # not even the worked examples
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kldiv demo: error: "), err
        assert message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_bad_form_is_an_argparse_error(tmp_path):
    with pytest.raises(SystemExit) as exc, redirect_stderr(io.StringIO()):
        cli.main(["compare", "a.npy", "b.npy", "--form", "softmax"])
    assert exc.value.code == 2


def test_compare_through_a_subprocess(tmp_path, rng):
    a, b = logits_pair(rng, (5, 7))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    ok = subprocess.run(
        [sys.executable, "-m", "kldiv", "compare", "a.npy", "b.npy", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    check_report(json.loads(ok.stdout), a, b)
    bad = subprocess.run(
        [sys.executable, "-m", "kldiv", "compare", "a.npy", "missing.npy"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "kldiv compare: error: missing.npy: no such file"


def test_demo_trains_and_writes_figures(tmp_path):
    buf = io.StringIO()
    assert cli.demo(str(tmp_path / "demo"), out=buf, progress=False) == 0
    text = buf.getvalue()
    rows = {
        ln.split()[0] + (" " + ln.split()[1] if ln.split()[1] in ("labels", "KL") else ""): ln
        for ln in text.splitlines()[-12:]
        if "%" in ln
    }
    assert set(rows) >= {"teacher", "hard labels", "forward KL", "reverse KL", "JSD"}, text
    for name, line in rows.items():
        acc = float(line.split("%")[0].split()[-1])
        assert acc > 85.0, (name, line)  # every model actually learned the digits
    for png in ("distributions.png", "loss_curves.png"):
        assert (tmp_path / "demo" / png).read_bytes()[:4] == b"\x89PNG"


def test_info_reports_tools_and_fused_path():
    code, out, _ = run(["info"])
    assert code == 0
    assert "scipy" in out and "matplotlib" in out and "DistillationLoss paths:" in out
    # every optional package, with its version and the extra that installs it
    from importlib.metadata import version

    lines = out.splitlines()
    for dist, extra in OPTIONAL_DISTS:
        line = next(ln for ln in lines if ln.split()[:1] == [dist])
        assert line.split()[1] == version(dist) and line.endswith(extra), line
    assert f"torch             {torch.__version__}" in out
    triton_line = next(ln for ln in out.splitlines() if "Triton kernels" in ln)
    assert ("available" in triton_line) == torch.cuda.is_available()
    # the test environment has a C compiler: the CPU kernel is built (or found in the cache)
    kernel_line = next(ln for ln in out.splitlines() if "CPU kernel" in ln)
    assert "every divergence: compiled (" in kernel_line and kernel_line.endswith(".so)")


def test_bench_prints_ratios_and_writes_json_and_csv(tmp_path):
    argv = [
        "bench",
        "--device",
        "cpu",
        "--n",
        "16",
        "--v",
        "64",
        "--kinds",
        "kl,js",
        "--variants",
        "eager",
        "--rounds",
        "1",
        "--iters",
        "2",
        "--out",
        str(tmp_path / "b"),
        "--quiet",
    ]
    code, out, err = run(argv)
    assert code == 0, err
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["shape"] == {"N": 16, "V": 64} and result["dtype"] == "float32"
    assert result["versions"]["torch"] == torch.__version__
    for kind in ("kl", "js"):
        s = result["kinds"][kind]["summary"]
        # both variants computed the same loss on the same inputs
        assert s["eager"]["value"] == pytest.approx(s["kldiv"]["value"], rel=1e-5)
        ratio = s["eager"]["median_s"] / s["kldiv"]["median_s"]
        assert s["eager"]["kldiv_speedup"] == pytest.approx(ratio)
        assert len(result["kinds"][kind]["runs"]["kldiv"][0]["times_s"]) == 2
        assert f"{ratio:.2f}" in next(
            ln for ln in out.splitlines() if ln.startswith(f"{kind} ") and "eager" in ln
        )
    rows = (tmp_path / "b" / "bench.csv").read_text().splitlines()
    assert rows[0] == ("kind,variant,median_s,first_call_s,peak_extra_mib,kldiv_speedup,over_floor")
    assert len(rows) == 1 + 2 * 2


def test_bench_times_jax_against_its_own_anchors(tmp_path):
    """The JAX variants compute the same loss as each other (and as DistillationLoss on
    torch, from other random inputs: only the JAX values are compared), and their ratios are
    against the core function on JAX."""
    argv = ["bench", "--device", "cpu", "--n", "8", "--v", "32", "--kinds", "kl,js"]
    argv += ["--variants", "jax,jax_composition,optax", "--rounds", "1", "--iters", "1"]
    code, out, err = run([*argv, "--out", str(tmp_path / "b"), "--quiet"])
    assert code == 0, err
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["versions"]["jax"] == jax.__version__
    for kind in ("kl", "js"):
        s = result["kinds"][kind]["summary"]
        assert s["jax_composition"]["value"] == pytest.approx(s["jax"]["value"], rel=1e-5)
        ratio = s["jax_composition"]["median_s"] / s["jax"]["median_s"]
        assert s["jax_composition"]["kldiv_speedup"] == pytest.approx(ratio)
    kl = result["kinds"]["kl"]["summary"]
    assert kl["optax"]["value"] == pytest.approx(kl["jax"]["value"], rel=1e-5)
    assert "has no js" in result["kinds"]["js"]["summary"]["optax"]["unavailable"]


def test_bench_errors_are_one_line(tmp_path):
    (tmp_path / "taken").mkdir()
    for args, message in [
        (["--kinds", "kld"], "--kinds: unknown 'kld'"),
        (["--variants", "jaxx"], "--variants: unknown 'jaxx'"),
        (["--device", "cuda:99"], "--device cuda:99: no such CUDA device here"),
        (["--device", "tpu"], "--device tpu: expected auto, cpu or cuda[:index]"),
        (["--device", "cpu:1"], "--device cpu:1: expected auto, cpu or cuda[:index]"),
        (["--out", ""], "--out: expected a directory name"),
        (["--out", str(tmp_path / "taken")], "taken: already exists"),
        (["--n", "0"], "must be positive"),
        # checked before the (long) run, not after it
        (
            ["--out", str(tmp_path / "nodir" / "b")],
            "the parent of --out is not a writable directory",
        ),
    ]:
        code, out, err = run(["bench", *args, "--quiet"])
        assert code == 2 and out == "", (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kldiv bench: error: "), err
        assert message in err, (message, err)


@pytest.mark.parametrize("fmt", ["npy", "pt", "safetensors"])
def test_compare_middle_category_axis_streams_in_blocks(tmp_path, rng, fmt, monkeypatch):
    a, b = logits_pair(rng, (3, 5, 30))
    # chunks smaller than one batch entry
    monkeypatch.setattr(cli, "CHUNK_BYTES", 4 * 30 * 2)
    # categories in the middle, (batch, V, tokens), and first, (V, batch, tokens)
    for axis in (1, 0):
        ref = save(
            tmp_path / f"ref{axis}", fmt, {"x": np.ascontiguousarray(np.moveaxis(a, -1, axis))}
        )
        cand = save(
            tmp_path / f"cand{axis}", fmt, {"x": np.ascontiguousarray(np.moveaxis(b, -1, axis))}
        )
        code, out, err = run(["compare", ref, cand, "--axis", str(axis), "--json", "--quiet"])
        assert code == 0, err
        check_report(json.loads(out), a, b)


def test_bench_through_a_subprocess(tmp_path):
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "kldiv",
            "bench",
            "--device",
            "cpu",
            "--n",
            "8",
            "--v",
            "32",
            "--kinds",
            "kl",
            "--variants",
            "eager",
            "--rounds",
            "1",
            "--iters",
            "1",
            "--json",
            "--quiet",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert set(result["kinds"]["kl"]["summary"]) == {"eager", "kldiv"}
    bad = subprocess.run(
        [sys.executable, "-m", "kldiv", "bench", "--variants", "numba"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == (
        "kldiv bench: error: --variants: unknown 'numba'; expected some of eager, compile, "
        "liger, kldiv, tensor, core, floor, core_log_probs, core_teacher_grad, "
        "eager_teacher_grad, definition_log_probs, definition_teacher_grad, kldiv_softcap, "
        "eager_softcap, compile_softcap, jax, jax_composition, optax"
    )


# (distribution name, what `kldiv info` names as its source), in the order info lists them
OPTIONAL_DISTS = [
    ("torch", "kldiv[torch]"),
    ("jax", "kldiv[jax]"),
    ("keras", "kldiv[keras]"),
    ("scipy", "kldiv[numpy]"),
    ("matplotlib", "kldiv[cli]"),
    ("safetensors", "kldiv[cli]"),
    ("scikit-learn", "kldiv[cli]"),
    ("triton", "with PyTorch's CUDA builds"),
]

# `kldiv ARGV...` where the named packages cannot be imported (tests/blocked.py)
WITHOUT = blocked.PRELUDE + "raise SystemExit(main(sys.argv[2:]))\n"


def kldiv_without(packages, argv, cwd):
    return subprocess.run(
        [sys.executable, "-c", WITHOUT, ",".join(packages), *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_line_error(proc, command, *needles):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kldiv {command}: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    ("blocked", "missing"),
    [(["torch"], "PyTorch"), (["sklearn", "matplotlib"], "scikit-learn, matplotlib")],
)
def test_demo_without_its_extras_is_one_line_and_creates_nothing(tmp_path, blocked, missing):
    proc = kldiv_without(blocked, ["demo"], tmp_path)
    one_line_error(proc, "demo", f"missing here: {missing}", 'pip install "kldiv[torch,cli]"')
    assert "--no-train" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no demo-output/


def test_demo_no_train_needs_no_extra(tmp_path):
    proc = kldiv_without(["torch", "sklearn", "matplotlib"], ["demo", "--no-train"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "TensorFlow tutorial" in proc.stdout and "0.453418" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_bench_without_torch_is_one_line_and_creates_nothing(tmp_path):
    proc = kldiv_without(["torch"], ["bench", "--out", str(tmp_path / "b")], tmp_path)
    one_line_error(proc, "bench", "needs PyTorch", 'pip install "kldiv[torch]"')
    assert list(tmp_path.iterdir()) == []


def save_pair(tmp_path, shape=(6, 9)):
    a = np.linspace(-2.0, 2.0, math.prod(shape)).reshape(shape).astype(np.float32)
    b = np.flip(a, -1).copy()
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    return a, b


def test_compare_without_matplotlib_still_writes_the_report(tmp_path):
    a, b = save_pair(tmp_path)
    for extra in ([], ["--json"]):
        dest = tmp_path / f"rep{len(extra)}"
        proc = kldiv_without(
            ["matplotlib"], ["compare", "a.npy", "b.npy", "--out", dest.name, *extra], tmp_path
        )
        assert proc.returncode == 0, proc.stderr
        assert sorted(p.name for p in dest.iterdir()) == ["report.json"]
        check_report(json.loads((dest / "report.json").read_text()), a, b)
        note = proc.stderr.strip().splitlines()
        assert len(note) == 1 and note[0].startswith("kldiv compare: note: "), proc.stderr
        assert "histogram" in note[0] and 'pip install "kldiv[cli]"' in note[0]
        if extra:  # stdout stays one JSON document
            check_report(json.loads(proc.stdout), a, b)
        else:
            assert "Mean KL" in proc.stdout
            assert proc.stdout.strip().splitlines()[-1] == f"wrote {dest.name}/report.json"


# matplotlib that imports but cannot plot (a broken backend or font cache): importing pyplot
# raises, as it does on such installs
BROKEN_PYPLOT = """
import sys


class Broken:
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib.pyplot":
            raise RuntimeError("the backend cannot start")
        return None


sys.meta_path.insert(0, Broken())
from kldiv.cli import main

raise SystemExit(main(sys.argv[1:]))
"""


def test_compare_keeps_the_report_when_plotting_fails(tmp_path):
    a, b = save_pair(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", BROKEN_PYPLOT, "compare", "a.npy", "b.npy", "--out", "rep"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["report.json"]
    check_report(json.loads((tmp_path / "rep" / "report.json").read_text()), a, b)
    note = proc.stderr.strip().splitlines()
    assert len(note) == 1 and note[0].startswith("kldiv compare: note: "), proc.stderr
    assert "RuntimeError: the backend cannot start" in note[0]
    assert proc.stdout.strip().splitlines()[-1] == "wrote rep/report.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npy", "rep"]


def test_compare_without_safetensors_or_torch_names_the_extra(tmp_path):
    save_pair(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"")  # never opened: the package check comes first
    (tmp_path / "a.pt").write_bytes(b"")
    proc = kldiv_without(["safetensors"], ["compare", "a.safetensors", "b.npy"], tmp_path)
    one_line_error(proc, "compare", "a.safetensors: ", 'pip install "kldiv[cli]"')
    proc = kldiv_without(["torch"], ["compare", "a.npy", "a.pt"], tmp_path)
    one_line_error(proc, "compare", "a.pt: ", 'pip install "kldiv[torch]"')


def test_info_without_the_extras_says_what_is_missing(tmp_path):
    blocked = ["torch", "jax", "keras", "scipy", "matplotlib", "safetensors", "sklearn", "triton"]
    proc = kldiv_without(blocked, ["info"], tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    for dist, extra in OPTIONAL_DISTS:
        line = next(ln for ln in lines if ln.split()[:1] == [dist])
        assert "not installed" in line and line.endswith(extra), line
    assert 'DistillationLoss: needs PyTorch, pip install "kldiv[torch]"' in lines
    # the CPU paths are listed only where PyTorch imports
    assert not any("CPU kernel" in ln or "chunked CPU path" in ln for ln in lines)


def test_info_names_the_keras_backend_and_whether_it_is_there(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    proc = kldiv_without([], ["info"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "backend jax (from KERAS_BACKEND), installed" in proc.stdout
    # Keras installed without the backend it would load: it would not import
    proc = kldiv_without(["torch", "jax"], ["info"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "backend jax (from KERAS_BACKEND), NOT installed" in proc.stdout


def test_version_from_python_m_and_the_console_script(tmp_path):
    import kldiv

    script = Path(sys.executable).with_name("kldiv")
    for cmd in ([sys.executable, "-m", "kldiv", "--version"], [str(script), "--version"]):
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout == f"kldiv {kldiv.__version__}\n", proc


def test_help_speaks_of_the_worked_examples_and_the_extras():
    proc = subprocess.run(
        [sys.executable, "-m", "kldiv", "--help"], capture_output=True, text=True, check=True
    )
    assert "worked examples" in proc.stdout and "seed" not in proc.stdout.lower()
    assert "kldiv[torch,cli]" in proc.stdout and "kldiv[torch]" in proc.stdout
