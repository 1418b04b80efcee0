"""kldiv.cli.llamacpp: ``kldiv compare BASE.kld CAND``, in-process and through the command
line."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest

from kldiv.cli import UsageError
from kldiv.cli.llamacpp import compare_base, is_base_file
from kldiv.llamacpp import ParityStats, read_base, write_base
from kldiv.metrics import TokenStats

pytestmark = pytest.mark.seeded


def args(ref, cand, **kw):
    a = argparse.Namespace(
        ref=str(ref),
        cand=str(cand),
        form=("logits", "logits"),
        labels=None,
        axis=-1,
        out=None,
        json=True,
        quiet=True,
        parity=True,
    )
    vars(a).update(kw)
    return a


@pytest.fixture
def files(tmp_path, rng):
    tokens = rng.integers(0, 120, (3, 20))
    ref = (rng.standard_normal((3, 20, 120)) * 3).astype(np.float32)
    cand = (ref + 0.3 * rng.standard_normal(ref.shape)).astype(np.float32)
    write_base(tmp_path / "base.kld", tokens, ref)
    np.save(tmp_path / "cand.npy", cand)
    np.save(tmp_path / "scored.npy", cand[:, 10:19])
    return tmp_path, cand


def run(a):
    out = io.StringIO()
    assert compare_base(a, out) == 0
    return out.getvalue()


def test_compare_equals_the_library(files):
    d, cand = files
    doc = json.loads(run(args(d / "base.kld", d / "cand.npy")))
    stats, par = TokenStats(), ParityStats()
    with read_base(d / "base.kld") as base:
        for c in range(3):
            stats.update(base.log_probs(c), cand[c, 10:19], labels=base.labels[c])
            par.update(base.records(c), cand[c, 10:19], base.labels[c])
    want = stats.report().to_dict()
    assert {k: doc[k] for k in want} == want
    assert doc["llama_cpp"]["kld_mean"] == list(par.report().kld_mean)
    assert doc["extended"]["reverse_kl_mean"] is None  # not defined against a base file
    assert 0 < doc["extended"]["acceptance"] < 1
    # only the scored positions: the same report
    doc2 = json.loads(run(args(d / "base.kld", d / "scored.npy")))
    assert doc2 == doc
    text = run(args(d / "base.kld", d / "cand.npy", json=False))
    assert "llama.cpp base file: 3 windows of 20 tokens" in text and "Same top token" in text


def test_is_base_file(files):
    d, _ = files
    assert is_base_file(str(d / "base.kld"))
    assert not is_base_file(str(d / "cand.npy"))
    assert not is_base_file(str(d / "missing"))
    assert not is_base_file(str(d))


def test_compare_errors(files):
    d, cand = files
    np.save(d / "bad.npy", cand[:, :5])
    cases = [
        (args(d / "base.kld", d / "bad.npy"), "bad.npy: has shape (3, 5, 120)"),
        (args(d / "base.kld", d / "cand.npy", labels="x.npy"), "--labels: the base file holds"),
        (args(d / "base.kld", d / "cand.npy", out="o"), "--out: not supported"),
        (args(d / "base.kld", d / "cand.npy", form=("probs", "logits")), "--form: the base"),
        (args(d / "base.kld", d / "cand.npy", form=("logits", "probs")), "--parity needs"),
    ]
    data = (d / "base.kld").read_bytes()
    (d / "cut.kld").write_bytes(data[:-3])
    cases.append((args(d / "cut.kld", d / "cand.npy"), "cut.kld: is truncated"))
    for a, match in cases:
        with pytest.raises(UsageError) as e:
            run(a)
        assert match in str(e.value) and "\n" not in str(e.value)


def test_kldiv_compare_takes_a_base_file(files):
    """Through the command line: ``kldiv compare BASE.kld CAND`` gives the in-process report,
    and ``--parity`` without a base file is a one-line usage error."""
    import subprocess
    import sys

    d, _ = files
    cmd = [sys.executable, "-m", "kldiv", "compare", str(d / "base.kld"), str(d / "cand.npy")]
    done = subprocess.run([*cmd, "--json", "--parity", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(run(args(d / "base.kld", d / "cand.npy")))
    bad = subprocess.run(
        [sys.executable, "-m", "kldiv", "compare", str(d / "cand.npy"), str(d / "cand.npy"),
         "--parity", "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "kldiv compare: error: --parity needs a llama.cpp base file as REF"
    ], bad.stderr


def test_one_form_is_the_candidates(files):
    """``--form log_probs`` names the candidate's form (the base file's side is fixed); a pair
    that gives the reference another form is refused."""
    d, cand = files
    lp = cand - np.log(np.exp(cand.astype(np.float64)).sum(-1, keepdims=True))
    np.save(d / "lp.npy", lp.astype(np.float32))
    with_logits = json.loads(run(args(d / "base.kld", d / "cand.npy", parity=False)))
    one = json.loads(
        run(args(d / "base.kld", d / "lp.npy", form=("log_probs", "log_probs"), parity=False))
    )
    assert one["kl_mean"] == pytest.approx(with_logits["kl_mean"], rel=1e-5)
    with pytest.raises(UsageError, match="--form: the base file's side is fixed"):
        run(args(d / "base.kld", d / "lp.npy", form=("probs", "log_probs"), parity=False))


def test_write_base_takes_the_longest_legal_file_name(tmp_path):
    """The temporary file beside the target stays under the 255-byte name limit."""
    from kldiv.llamacpp import read_base, write_base

    rng = np.random.default_rng(0)
    target = tmp_path / ("é" * 123 + ".kld")  # 250 bytes in UTF-8
    write_base(target, rng.integers(0, 20, size=(1, 8)), rng.normal(size=(1, 8, 20)))
    with read_base(target) as base:
        assert base.n_chunk == 1 and base.n_vocab == 20
    assert [f.name for f in tmp_path.iterdir()] == [target.name]


def test_read_base_refuses_a_fifo_at_once(tmp_path):
    """Opening a FIFO for reading waits for a writer; read_base refuses it without waiting."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "base.kld"
    os.mkfifo(fifo)
    code = f"from kldiv.llamacpp import read_base\nread_base({str(fifo)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "is not a regular file" in done.stderr.splitlines()[-1]


def test_a_base_file_is_only_ever_a_whole_reference(files, capsys):
    from kldiv.cli import main

    d, _ = files
    for argv, message in (
        ([f"{d}/base.kld::x", f"{d}/cand.npy"], "holds one set of windows; drop '::x'"),
        ([f"{d}/cand.npy", f"{d}/base.kld"], "can only be the reference (REF, the first file)"),
    ):
        assert main(["compare", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
