"""Stored top-k teachers (kldiv.topk): what the shards hold against float64 references, the
stored tail mass and what it changes in TopKTeacher's "tail_bucket" loss (values and
gradients against an explicit float64 (K+1)-point reference), streaming and range reads across
shard boundaries, staging (a failed write leaves nothing), and the validation messages.

Bounds used below, for float32 logits ``x`` with ``|x| ≤ X`` and ``L = logsumexp(x)``:

- computed in float32, ``log_probs = x_S − L`` and ``tail = logsumexp(x_rest) − L`` each carry
  a few roundings of magnitudes ≤ ``X + |L|``: ``|error| ≤ 2⁻²⁰·(1 + X + |L|)`` (8 half-ulps;
  the writer subtracts the row maximum first, so ``X`` is in fact the row's spread
  ``max x − min x`` and ``|L| ≤ log V``, whatever the logits' offset: see
  test_the_accuracy_does_not_depend_on_the_logits_offset);
- stored in a dtype with ``m`` mantissa bits, a log-prob gains ``≤ 2^−(m+1)·|lp|``: 2⁻¹¹ for
  float16, 2⁻⁸ for bfloat16, 2⁻²⁴ for float32;
- so each stored log-probability is off by at most ``ε`` (per token, the largest of the two
  above), and the teacher's normalised (K+1)-point distribution ``P'`` satisfies
  ``|log P' − log P| ≤ 2ε``. Then, against any student ``Q``:
  ``|KL(P'‖Q) − KL(P‖Q)| ≤ 2ε·(1 + E_P|log P − log Q|)`` (``P' = P(1 + η)``, ``|η| ≤ e^{2ε} − 1``),
  ``|KL(Q‖P') − KL(Q‖P)| ≤ 2ε``, and the student gradient of either moves by at most ``4ε`` in
  L1 norm per token (``∂/∂z_j`` is ``q_j`` times a function of ``log P`` over one bucket and
  the ``Q``-mean of it). ``e^{2ε} − 1`` is taken for ``2ε`` with a 1.01 factor.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from topk_reference import bound, eps_of, reference_rows, reference_topk

import kldiv
import kldiv.topk as kt
from kldiv.torch import DistillationLoss, TopKTeacher


def loss_and_grad(kind, z, teacher):
    z = z.detach().clone().requires_grad_(True)
    rows = DistillationLoss(kind, reduction="none")(z, teacher)
    rows.sum().backward()
    return rows.detach().numpy(), z.grad.numpy()


# --- what is stored ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_stored_values_match_a_float64_reference(tmp_path, rng, dtype):
    z = (3.0 * rng.standard_normal((5, 9, 40))).astype(np.float32)
    z[0, 0, :3] = -np.inf  # excluded ids: probability 0, never in the top k here
    path = kt.save(tmp_path / "t", z, 6, dtype=dtype, shard_tokens=8, teacher={"model": "m"})
    m = kt.read_manifest(path)
    assert (m["format"], m["format_version"], m["k"], m["vocab_size"]) == ("kldiv.topk", 1, 6, 40)
    assert (m["dtype"], m["temperature"], m["num_tokens"], m["token_shape"]) == (
        dtype, 1.0, 45, [5, 9],
    )  # fmt: skip
    assert m["teacher"] == {"model": "m"} and m["input_ids"] is False
    assert [(s["start"], s["stop"]) for s in m["shards"]] == [
        (0, 8), (8, 16), (16, 24), (24, 32), (32, 40), (40, 45),
    ]  # fmt: skip
    t = kt.load(path, tail="tail_bucket")
    ids, top, tail = reference_topk(z, 6)
    assert t.indices.dtype == torch.int32 and t.log_probs.dtype == getattr(torch, dtype)
    assert t.tail_log_prob.dtype == torch.float32 and t.indices.shape == (45, 6)
    np.testing.assert_array_equal(t.indices.numpy(), ids)  # no ties in normal logits
    eps = eps_of(z, dtype, top)
    err = np.abs(t.log_probs.double().numpy() - top)
    assert (err <= eps[:, None]).all(), float((err - eps[:, None]).max())
    # the tail is computed from the full logits and stored in float32, whatever the dtype
    tail_eps = eps_of(z, "float32", tail[:, None])
    assert (np.abs(t.tail_log_prob.double().numpy() - tail) <= tail_eps).all()


def test_temperature_is_applied_before_the_softmax(tmp_path, rng):
    z = (4.0 * rng.standard_normal((30, 25))).astype(np.float32)
    t = kt.load(kt.save(tmp_path / "t", z, 4, temperature=2.5), tail="renormalize")
    ids, top, tail = reference_topk(z, 4, temperature=2.5)
    np.testing.assert_array_equal(t.indices.numpy(), ids)
    eps = eps_of(z / 2.5, "float32", top)
    assert (np.abs(t.log_probs.double().numpy() - top) <= eps[:, None]).all()
    assert (np.abs(t.tail_log_prob.double().numpy() - tail) <= eps).all()
    assert kt.read_manifest(tmp_path / "t")["temperature"] == 2.5
    with pytest.raises(ValueError, match=r"`temperature` to match the stored teacher's 2\.5"):
        kt.load(tmp_path / "t", tail="renormalize", temperature=1.0)
    assert kt.load(tmp_path / "t", tail="renormalize", temperature=2.5).k == 4


def test_k_equal_to_v_stores_an_empty_tail(tmp_path, rng):
    z = rng.standard_normal((4, 6)).astype(np.float32)
    t = kt.load(kt.save(tmp_path / "t", z, 6), tail="tail_bucket", check=True)
    assert torch.isneginf(t.tail_log_prob).all()
    s = torch.tensor(rng.standard_normal((4, 6)), requires_grad=True)
    full = kldiv.kl_div(torch.tensor(z, dtype=torch.float64), s, form="logits")
    got = DistillationLoss()(s, t)
    # the whole vocabulary is stored: the top-k loss is the full KL, up to the float32 storage
    assert abs(float(got.detach()) - float(full.detach())) <= 1e-5


def test_a_confident_teacher_keeps_its_tail_and_the_reverse_kl_stays_accurate(tmp_path, rng):
    """With a tail of ~1e-11, 1 − Σp of float16 values is rounding noise (~1e-3, or 0): the
    reverse KL of the stored tail is finite and within the bound of the float64 reference,
    the one from the rounded values is not."""
    n, v, k = 12, 50, 5
    z = rng.standard_normal((n, v)).astype(np.float32)
    z[:, :k] += 30.0
    t = kt.load(kt.save(tmp_path / "t", z, k, dtype="float16"), tail="tail_bucket", check=True)
    ids, top, tail = reference_topk(z, k)
    assert tail.max() < math.log(1e-9)
    tail_eps = eps_of(z, "float32", tail[:, None])
    assert (np.abs(t.tail_log_prob.double().numpy() - tail) <= tail_eps).all()
    naive = 1.0 - np.exp(t.log_probs.double().numpy()).sum(-1)
    assert (np.abs(naive - np.exp(tail)) > 1e3 * np.exp(tail)).all()

    s = torch.tensor(rng.standard_normal((n, v)))
    ref = reference_rows("reverse_kl", s, ids, top, tail)
    got, _ = loss_and_grad("reverse_kl", s, t)
    eps = eps_of(z, "float16", top)
    assert np.isfinite(got).all()
    assert (np.abs(got - ref.numpy()) <= 2.02 * eps).all()
    rounded = TopKTeacher(t.indices, t.log_probs, tail="tail_bucket")  # 1 − Σp of the values
    worse, _ = loss_and_grad("reverse_kl", s, rounded)
    assert (~np.isfinite(worse) | (np.abs(worse - ref.numpy()) > 100 * eps)).any()


@pytest.mark.parametrize("kind", ["kl", "reverse_kl"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_stored_tail_loss_and_gradient_against_float64_reference(tmp_path, rng, kind, dtype):
    n, v, k = 24, 40, 6
    z = (2.5 * rng.standard_normal((n, v))).astype(np.float32)
    z[: n // 2, :k] += 12.0  # half the tokens confident (tails ~1e-4), half spread out
    t = kt.load(kt.save(tmp_path / "t", z, k, dtype=dtype, shard_tokens=10), tail="tail_bucket")
    ids, top, tail = reference_topk(z, k)
    s = torch.tensor(rng.standard_normal((n, v)), requires_grad=True)
    ref = reference_rows(kind, s, ids, top, tail)
    ref.sum().backward()
    got, grad = loss_and_grad(kind, s, t)
    eps = eps_of(z, dtype, top)
    tol = bound(kind, eps, s, ids, top, tail)
    assert (np.abs(got - ref.detach().numpy()) <= tol).all()
    assert (np.abs(grad - s.grad.numpy()).sum(-1) <= 4.04 * eps).all()


# --- streaming, ranges, staging ---------------------------------------------------------------


def test_streamed_blocks_and_ranges_across_shard_boundaries(tmp_path, rng):
    z = (2.0 * rng.standard_normal((23, 30))).astype(np.float32)
    ids_in = rng.integers(0, 30, size=23)
    with kt.TopKWriter(tmp_path / "s", 4, shard_tokens=7, dtype="float16") as w:
        at = 0
        for size in (3, 10, 1, 0, 9):
            w.add(torch.from_numpy(z[at : at + size]), input_ids=ids_in[at : at + size])
            at += size
        assert w.num_tokens == 23 and not (tmp_path / "s").exists()
    m = kt.read_manifest(tmp_path / "s")
    assert [(s["start"], s["stop"]) for s in m["shards"]] == [(0, 7), (7, 14), (14, 21), (21, 23)]
    assert m["input_ids"] is True and m["token_shape"] == [23]
    whole = kt.save(tmp_path / "w", z, 4, dtype="float16")  # one shard, in memory
    full = kt.load(whole, tail="tail_bucket")
    for lo, hi in [(0, 23), (0, 7), (6, 8), (5, 16), (13, 22), (21, 23), (9, 9), (23, 23)]:
        part = kt.load(tmp_path / "s", lo, hi, tail="tail_bucket")
        assert part.indices.shape == (hi - lo, 4)
        # the same computation on the same rows: equal bit for bit, whatever the blocks
        assert torch.equal(part.indices, full.indices[lo:hi])
        assert torch.equal(part.log_probs, full.log_probs[lo:hi])
        assert torch.equal(part.tail_log_prob, full.tail_log_prob[lo:hi])
        got = kt.load_input_ids(tmp_path / "s", lo, hi)
        assert got.dtype == torch.int32
        np.testing.assert_array_equal(got.numpy(), ids_in[lo:hi])
    # only the shards overlapping the range are opened: without shard 1 ([7, 14)) the others
    # still load, a range that needs it does not
    os.remove(tmp_path / "s" / "shard-00001.safetensors")
    assert kt.load(tmp_path / "s", 0, 7, tail="renormalize").k == 4
    assert kt.load(tmp_path / "s", 14, 23, tail="renormalize").token_shape == (9,)
    with pytest.raises(ValueError, match="its shard shard-00001.safetensors is missing"):
        kt.load(tmp_path / "s", 6, 8, tail="renormalize")


def test_a_failed_write_leaves_nothing_behind(tmp_path, rng):
    z = rng.standard_normal((10, 12)).astype(np.float32)
    bad = z.copy()
    bad[3, 5] = np.nan
    w = kt.TopKWriter(tmp_path / "out", 3, shard_tokens=4)
    w.add(z)  # two shards written into the hidden directory
    assert w.staging.is_dir() and len(list(w.staging.iterdir())) == 2
    with pytest.raises(ValueError, match="got a NaN logit in token 13"):
        w.add(bad)
    assert sorted(os.listdir(tmp_path)) == []
    with pytest.raises(ValueError, match="open writer, got one that is aborted"):
        w.add(z)
    # the context manager discards on an exception of any kind
    with pytest.raises(KeyError), kt.TopKWriter(tmp_path / "out", 3, shard_tokens=4) as w2:
        w2.add(z)
        raise KeyError("stop")
    assert sorted(os.listdir(tmp_path)) == []
    # an existing empty directory may be the destination
    (tmp_path / "empty").mkdir()
    assert kt.load(kt.save(tmp_path / "empty", z, 3), tail="renormalize").k == 3
    assert sorted(os.listdir(tmp_path)) == ["empty"]


@pytest.mark.spawns
def test_import_kldiv_topk_imports_no_framework():
    code = (
        "import sys, kldiv.topk; print(sorted({'torch', 'jax', 'safetensors'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_accuracy_does_not_depend_on_the_logits_offset(tmp_path, rng):
    """The row maximum is subtracted before anything else: a stored log-prob's error scales
    with the log-probs, not with |logits| (at an offset of 1e4, ~3e-4 when it was not)."""
    z = (3.0 * rng.standard_normal((16, 100)) + 1e4).astype(np.float32)
    for temperature in (1.0, 0.7):
        t = kt.load(
            kt.save(tmp_path / str(temperature), z, 5, temperature=temperature), tail="tail_bucket"
        )
        _, top, tail = reference_topk(z, 5, temperature=temperature)
        x = z.astype(np.float64) / temperature
        eps = 2.0**-20 * (1 + x.max(-1) - x.min(-1) + np.log(100))
        assert (np.abs(t.log_probs.double().numpy() - top) <= eps[:, None]).all()
        assert (np.abs(t.tail_log_prob.double().numpy() - tail) <= eps).all()


def test_extreme_temperatures_do_not_overflow(tmp_path):
    z = np.array([[1.0, 3.0, 2.0, -np.inf]], np.float32)
    # (z − max z) / T: the largest is 0, the rest -inf (what float32 rounds them to)
    t = kt.load(kt.save(tmp_path / "cold", z, 2, temperature=1e-45), tail="tail_bucket", check=True)
    assert t.indices[0, 0] == 1 and t.log_probs.tolist() == [[0.0, -math.inf]]  # a tie at -inf
    assert t.tail_log_prob.tolist() == [-math.inf]
    hot = kt.load(kt.save(tmp_path / "hot", z, 2, temperature=1e30), tail="tail_bucket")
    np.testing.assert_allclose(hot.log_probs.numpy(), np.full((1, 2), -math.log(3)), rtol=1e-6)
    for temperature, to in ((1e-46, r"0\.0"), (1e300, "inf")):
        with pytest.raises(
            ValueError,
            match=rf"within float32's range .* got {re.escape(repr(temperature))}, which rounds to {to} there",
        ):
            kt.save(tmp_path / "x", z, 2, temperature=temperature)
    assert (
        kt.load(
            kt.save(tmp_path / "f64", z.astype(np.float64), 2, temperature=1e300),
            tail="renormalize",
        ).k
        == 2
    )


def test_a_float32_temperature_matches_the_stored_one(tmp_path, rng):
    path = kt.save(
        tmp_path / "t", rng.standard_normal((3, 5)).astype(np.float32), 2, temperature=0.7
    )
    assert kt.load(path, tail="renormalize", temperature=np.float32(0.7)).k == 2
    with pytest.raises(
        ValueError, match=r"stored teacher's 0\.7, got 0\.71: .*softmax\(logits / 0\.7\)"
    ):
        kt.load(path, tail="renormalize", temperature=0.71)


def test_empty_foreign_byte_order_and_longdouble_logits(tmp_path, rng):
    for i, shape in enumerate([(0, 40), (2, 0, 40)]):
        path = kt.save(tmp_path / f"empty{i}", np.zeros(shape, np.float32), 3)
        m = kt.read_manifest(path)
        assert (m["num_tokens"], m["token_shape"], m["shards"], m["vocab_size"]) == (
            0,
            list(shape[:-1]),
            [],
            40,
        )
        assert kt.load(path, tail="tail_bucket").indices.shape == (0, 3)
    w = kt.TopKWriter(tmp_path / "none", 3, vocab_size=40)
    assert kt.read_manifest(w.close())["num_tokens"] == 0
    z = rng.standard_normal((4, 9))
    want = kt.load(kt.save(tmp_path / "native", z.astype(np.float32), 3), tail="tail_bucket")
    got = kt.load(kt.save(tmp_path / "big", z.astype(">f4"), 3), tail="tail_bucket")
    assert torch.equal(got.indices, want.indices) and torch.equal(got.log_probs, want.log_probs)
    want = kt.load(kt.save(tmp_path / "f64", z, 3), tail="tail_bucket")
    got = kt.load(kt.save(tmp_path / "ld", z.astype(np.longdouble), 3), tail="tail_bucket")
    assert torch.equal(got.indices, want.indices) and torch.equal(got.log_probs, want.log_probs)
    # one token of shape (): token_shape [] (an empty tuple is not "unset")
    assert kt.read_manifest(kt.save(tmp_path / "one", z[0], 3))["token_shape"] == []


def test_a_failed_shard_write_is_an_oserror_naming_the_file(tmp_path, rng, monkeypatch):
    import safetensors
    import safetensors.torch

    def fail(tensors, filename, metadata=None):
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: File too large (os error 27)"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    w = kt.TopKWriter(tmp_path / "out", 2, shard_tokens=2)
    with pytest.raises(OSError, match="File too large") as e:
        w.add(rng.standard_normal((3, 5)).astype(np.float32))
    assert e.value.errno == 27 and e.value.filename == str(w.staging / "shard-00000.safetensors")
    assert os.listdir(tmp_path) == []


# --- validation -------------------------------------------------------------------------------


def test_writer_and_save_refuse_bad_arguments(tmp_path, rng):
    z = rng.standard_normal((4, 8)).astype(np.float32)
    d = tmp_path / "d"
    cases = [
        (lambda: kt.save(d, z, 9), ValueError, r"`k` ≤ V = 8"),
        (lambda: kt.save(d, z, 0), ValueError, "`k` to be a positive int, got 0"),
        (lambda: kt.TopKWriter(d, 9, vocab_size=8), ValueError, r"`k` ≤ `vocab_size` = 8"),
        (lambda: kt.save(d, z, 2, dtype="float64"), ValueError, "`dtype` to be one of"),
        (lambda: kt.save(d, z, 2, temperature=0.0), ValueError, "`temperature` to be a finite"),
        (lambda: kt.save(d, z, 2, shard_tokens=0), ValueError, "`shard_tokens` to be a posi"),
        (lambda: kt.save(d, z, 2, teacher={"x": object()}), TypeError, "JSON-serialisable"),
        (lambda: kt.save(d, z, 2, teacher=["m"]), TypeError, "`teacher` to be a mapping"),
        (lambda: kt.save(d, z.astype(np.int32), 2), TypeError, "floating `logits`"),
        (lambda: kt.save(d, [[1.0, 2.0]], 1), ValueError, "`logits` of shape"),
        (lambda: kt.save(d, z, 2, input_ids=np.zeros(3, int)), ValueError, "token shape"),
        (lambda: kt.save(d, z, 2, input_ids=-np.ones(4, int)), ValueError, r"\[0, 2\*\*31\)"),
        (lambda: kt.save(d, z, 2, input_ids=np.zeros(4)), TypeError, "integer `input_ids`"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
    bad = z.copy()
    bad[2, 3] = np.inf
    with pytest.raises(ValueError, match=r"got a \+inf logit in token 2\."):
        kt.save(d, bad, 2)
    bad = z.copy()
    bad[1] = -np.inf
    with pytest.raises(ValueError, match=r"got only -inf logits in token 1\."):
        kt.save(d, bad, 2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="new or empty directory, got .*full, which holds files"):
        kt.TopKWriter(tmp_path / "full", 2)
    with pytest.raises(ValueError, match="new or empty directory, got the file"):
        kt.TopKWriter(tmp_path / "full" / "x", 2)
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    with pytest.raises(ValueError, match="new or empty directory, got the symbolic link .*link"):
        kt.TopKWriter(tmp_path / "link", 2)
    os.remove(tmp_path / "link")
    w = kt.TopKWriter(d, 2, token_shape=(3, 2))
    w.add(z[:2])
    with pytest.raises(ValueError, match="V = 8 entries on the last axis, got shape"):
        w.add(np.zeros((1, 5), np.float32))
    w = kt.TopKWriter(d, 2, token_shape=(3, 2))
    w.add(z[:2], input_ids=np.zeros(2, int))
    with pytest.raises(ValueError, match="with every block or with none, got a block without"):
        w.add(z[2:])
    w = kt.TopKWriter(d, 2, token_shape=(3, 2))
    w.add(z)
    with pytest.raises(ValueError, match=r"`token_shape` \(3, 2\) to hold the 4 tokens"):
        w.close()
    with pytest.raises(ValueError, match="at least one block of logits, or `vocab_size`"):
        kt.TopKWriter(d, 2).close()
    assert sorted(os.listdir(tmp_path)) == ["full"]


SHARD0 = {"format": "kldiv.topk", "start": "0", "stop": "4"}  # the metadata of shard 0 below


def corrupt(tmp_path, rng, edit):
    z = rng.standard_normal((10, 8)).astype(np.float32)
    path = kt.save(tmp_path / "t", z, 3, shard_tokens=4)
    m = json.loads((path / "manifest.json").read_text())
    edit(path, m)
    return path


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda p, m: (p / "manifest.json").unlink(), "no manifest.json"),
        (lambda p, m: (p / "manifest.json").write_text("{oops"), "is not valid JSON"),
        (
            lambda p, m: (p / "manifest.json").write_text(json.dumps({**m, "format_version": 9})),
            "format_version 9; this kldiv reads 1",
        ),
        (
            lambda p, m: (p / "manifest.json").write_text(json.dumps({**m, "format": "x"})),
            "does not say format 'kldiv.topk'",
        ),
        (
            lambda p, m: (p / "manifest.json").write_text(json.dumps({**m, "k": 99})),
            "its field 'k' is missing or invalid",
        ),
        (
            lambda p, m: (p / "manifest.json").write_text(json.dumps({**m, "num_tokens": 11})),
            "its field 'token_shape' is missing or invalid",
        ),
        # vocab_size is checked before k is compared with it (no TypeError)
        (
            lambda p, m: (p / "manifest.json").write_text(json.dumps({**m, "vocab_size": None})),
            "its field 'vocab_size' is missing or invalid",
        ),
        (
            lambda p, m: (p / "manifest.json").write_text(json.dumps({**m, "vocab_size": "8"})),
            "its field 'vocab_size' is missing or invalid",
        ),
        # shards of the same size swapped, one listed twice, one from elsewhere
        (
            lambda p, m: (p / "manifest.json").write_text(
                json.dumps(
                    {
                        **m,
                        "shards": [
                            {**m["shards"][0], "file": m["shards"][1]["file"]},
                            {**m["shards"][1], "file": m["shards"][0]["file"]},
                            m["shards"][2],
                        ],
                    }
                )
            ),  # fmt: skip
            r"shard-00001.safetensors holds tokens \[4, 8\), the manifest says tokens \[0, 4\)",
        ),
        (
            lambda p, m: (p / "manifest.json").write_text(
                json.dumps(
                    {
                        **m,
                        "shards": [
                            m["shards"][0],
                            {**m["shards"][1], "file": m["shards"][0]["file"]},
                            m["shards"][2],
                        ],
                    }
                )
            ),  # fmt: skip
            "shard 1 of manifest.json repeats the file shard-00000.safetensors",
        ),
        (
            lambda p, m: save_file(
                {
                    "indices": torch.zeros(4, 3, dtype=torch.int32),
                    "log_probs": torch.full((4, 3), -2.0),
                    "tail_log_prob": torch.full((4,), -1.0),
                },
                str(p / "shard-00000.safetensors"),
            ),
            r"shard-00000.safetensors is not a kldiv.topk shard \(its metadata says format None\)",
        ),
        (
            lambda p, m: (p / "manifest.json").write_text(
                json.dumps({**m, "shards": m["shards"][:1] + m["shards"][2:]})
            ),
            "shard 1 of manifest.json is malformed or out of order",
        ),
        (
            lambda p, m: (p / "manifest.json").write_text(
                json.dumps({**m, "shards": [{**m["shards"][0], "file": "../x"}, *m["shards"][1:]]})
            ),
            "shard 0 of manifest.json is malformed",
        ),
        (
            lambda p, m: (p / "shard-00000.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}"),
            "its shard shard-00000.safetensors is not readable",
        ),
        (
            lambda p, m: save_file(
                {
                    "indices": torch.zeros(4, 2, dtype=torch.int32),
                    "log_probs": torch.zeros(4, 2),
                    "tail_log_prob": torch.zeros(4),
                },
                str(p / "shard-00000.safetensors"),
                metadata=SHARD0,
            ),
            r"holds indices of shape \(4, 2\), the manifest says \(4, 3\)",
        ),
        (
            lambda p, m: save_file(
                {
                    "indices": torch.zeros(4, 3, dtype=torch.int64),
                    "log_probs": torch.zeros(4, 3),
                    "tail_log_prob": torch.zeros(4),
                },
                str(p / "shard-00000.safetensors"),
                metadata=SHARD0,
            ),
            "holds indices as torch.int64, expected torch.int32",
        ),
        (
            lambda p, m: save_file(
                {
                    "indices": torch.full((4, 3), 8, dtype=torch.int32),
                    "log_probs": torch.zeros(4, 3),
                    "tail_log_prob": torch.zeros(4),
                },
                str(p / "shard-00000.safetensors"),
                metadata=SHARD0,
            ),
            # (the smallest id is over every shard's: 0 or 1 with these random top-3s)
            r"ids in \[[01], 8\] for tokens \[0, 10\), outside the vocabulary \[0, 8\)",
        ),
    ],
)
def test_load_refuses_a_missing_or_corrupt_directory(tmp_path, rng, edit, match):
    path = corrupt(tmp_path, rng, edit)
    with pytest.raises(ValueError, match=match):
        kt.load(path, tail="tail_bucket")


def test_load_refuses_bad_ranges_and_arguments(tmp_path, rng):
    path = kt.save(tmp_path / "t", rng.standard_normal((10, 8)).astype(np.float32), 3)
    for start, stop in [(-1, 4), (4, 3), (0, 11), (11, None)]:
        with pytest.raises(ValueError, match=r"0 ≤ `start` ≤ `stop` ≤ 10"):
            kt.load(path, start, stop, tail="tail_bucket")
    with pytest.raises(TypeError, match="`start` to be an int or None, got 1.5"):
        kt.load(path, 1.5, tail="tail_bucket")
    with pytest.raises(ValueError, match="`tail` to be one of"):
        kt.load(path, tail="bucket")
    with pytest.raises(ValueError, match="no such directory"):
        kt.load(tmp_path / "nope", tail="tail_bucket")
    with pytest.raises(ValueError, match="holds none"):
        kt.load_input_ids(path)


# --- the stored tail in TopKTeacher -----------------------------------------------------------


def teacher_case(rng, n=6, v=10, k=3):
    z = rng.standard_normal((n, v))
    ids, top, tail = reference_topk(z, k)
    return torch.tensor(ids), torch.tensor(top), torch.tensor(tail)


def test_topk_teacher_validates_the_stored_tail(rng):
    ids, top, tail = teacher_case(rng)
    with pytest.raises(ValueError, match=r"`tail_log_prob` of the token shape \(6,\)"):
        TopKTeacher(ids, top, tail="tail_bucket", tail_log_prob=tail[:5])
    with pytest.raises(TypeError, match="floating `tail_log_prob`"):
        TopKTeacher(ids, top, tail="tail_bucket", tail_log_prob=tail.long())
    with pytest.raises(TypeError, match="`tail_log_prob` to be a torch tensor or None"):
        TopKTeacher(ids, top, tail="tail_bucket", tail_log_prob=tail.numpy())
    with pytest.raises(ValueError, match="`tail_log_prob` that does not require grad"):
        TopKTeacher(ids, top, tail="tail_bucket", tail_log_prob=tail.clone().requires_grad_())
    t = TopKTeacher(ids[None], top[None], tail="tail_bucket", tail_log_prob=tail[None])
    assert t.flatten().tail_log_prob.shape == (6,) and "stored tail" in repr(t)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda ids, top, tail: tail.__setitem__(2, math.nan), "not NaN .* got nan in row 2"),
        (lambda ids, top, tail: tail.__setitem__(1, 0.5), r"`teacher.tail_log_prob` ≤ 0 .* row 1"),
        (
            # a tail of mass 1 beside the stored top-k (≤ 0 itself, so only the sum breaks)
            lambda ids, top, tail: tail.__setitem__(4, 0.0),
            "and the stored tail to sum to 1 .* in row 4",
        ),
    ],
)
def test_check_names_the_token_whose_stored_tail_breaks_the_rules(rng, edit, match):
    ids, top, tail = teacher_case(rng)
    edit(ids, top, tail)
    s = torch.tensor(rng.standard_normal((6, 10)), requires_grad=True)
    with pytest.raises(ValueError, match=match):
        DistillationLoss()(
            s, TopKTeacher(ids, top, tail="tail_bucket", tail_log_prob=tail, check=True)
        )
    # without check: that token (only) is NaN, in value and gradient
    rows = DistillationLoss(reduction="none")(
        s, TopKTeacher(ids, top, tail="tail_bucket", tail_log_prob=tail)
    )
    rows.sum().backward()
    bad = torch.isnan(rows)
    assert bad.sum() == 1 and torch.isnan(s.grad[bad]).all() and torch.isfinite(s.grad[~bad]).all()


def test_a_finite_stored_tail_where_the_ids_cover_the_vocabulary_is_refused(rng):
    ids, top, tail = teacher_case(rng, v=4, k=4)
    tail[0] = -20.0
    top[0] -= math.log1p(math.exp(-20.0))  # the total still sums to 1
    s = torch.tensor(rng.standard_normal((6, 4)))
    with pytest.raises(ValueError, match="= -inf where the ids cover all 4 vocabulary entries"):
        DistillationLoss()(
            s, TopKTeacher(ids, top, tail="tail_bucket", tail_log_prob=tail, check=True)
        )


def test_masked_tokens_ignore_the_stored_tail_and_renormalize_does_not_read_it(rng):
    ids, top, tail = teacher_case(rng)
    tail[3] = math.nan
    s = torch.tensor(rng.standard_normal((6, 10)))
    labels = torch.zeros(6, dtype=torch.long)
    labels[3] = -100
    t = TopKTeacher(ids, top, tail="tail_bucket", tail_log_prob=tail, check=True)
    rows = DistillationLoss(reduction="none")(s, t, labels)
    assert rows[3] == 0 and torch.isfinite(rows).all()
    r = TopKTeacher(ids, top, tail="renormalize", tail_log_prob=tail, check=True)
    plain = TopKTeacher(ids, top, tail="renormalize", check=True)
    assert torch.equal(
        DistillationLoss(reduction="none")(s, r), DistillationLoss(reduction="none")(s, plain)
    )
