"""The kldiv command: compare (every format, every error path, through main() and a
subprocess), the demo's training run, and info."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
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
            "a.npy: No tokens to report on",
        ),
        ([f"{t}/empty.npy", f"{t}/empty.npy"], "empty.npy: has shape (0, 6), no tokens"),
        ([f"{t}/novocab.npy", f"{t}/novocab.npy"], "novocab.npy: has no categories"),
        ([f"{t}/comp.npz", f"{t}/comp.npz"], "comp.npz: member x.npy is not a valid array"),
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


def test_demo_out_is_checked_before_training(tmp_path):
    (tmp_path / "afile").write_text("x")
    code, out, err = run(["demo", "--out", str(tmp_path / "afile")])
    assert code == 2 and "cannot create the output directory" in err
    assert "Distillation on real data" in out and "test acc" not in out  # no training happened


def test_bad_form_is_an_argparse_error(tmp_path):
    with pytest.raises(SystemExit) as exc, redirect_stderr(io.StringIO()):
        cli.main(["compare", "a.npy", "b.npy", "--form", "softmax"])
    assert exc.value.code == 2


def test_compare_through_a_subprocess(tmp_path, rng):
    a, b = logits_pair(rng, (5, 7))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    ok = subprocess.run(
        [sys.executable, "-m", "kldiv.cli", "compare", "a.npy", "b.npy", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    check_report(json.loads(ok.stdout), a, b)
    bad = subprocess.run(
        [sys.executable, "-m", "kldiv.cli", "compare", "a.npy", "missing.npy"],
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
    triton_line = next(ln for ln in out.splitlines() if "Triton kernels" in ln)
    assert ("available" in triton_line) == torch.cuda.is_available()
    # the test environment has a C compiler: the CPU kernel is built (or found in the cache)
    kernel_line = next(ln for ln in out.splitlines() if "CPU kernel" in ln)
    assert "KL and reverse KL: compiled (" in kernel_line and kernel_line.endswith(".so)")


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
    assert rows[0] == "kind,variant,median_s,first_call_s,peak_extra_mib,kldiv_speedup"
    assert len(rows) == 1 + 2 * 2


def test_bench_errors_are_one_line(tmp_path):
    (tmp_path / "taken").mkdir()
    for args, message in [
        (["--kinds", "kld"], "--kinds: unknown 'kld'"),
        (["--variants", "jax"], "--variants: unknown 'jax'"),
        (["--device", "cuda:99"], "--device cuda:99: no such CUDA device here"),
        (["--device", "tpu"], "--device tpu: expected auto, cpu or cuda[:index]"),
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
            "kldiv.cli",
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
        [sys.executable, "-m", "kldiv.cli", "bench", "--variants", "jax"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == (
        "kldiv bench: error: --variants: unknown 'jax'; expected some of eager, compile, liger, kldiv, tensor"
    )
