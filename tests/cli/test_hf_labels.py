"""``kldiv compare --labels``: labels are the next token of each position; ``--shift-labels``
takes input ids instead; labels that look one position off get a warning.

The warning's test (``label_alignment``): over the first block, the reference's log-probability
of each position's label is compared with that of the neighbouring position's label; a mean
gain above 1 nat and above 5 standard errors says the labels are off by one. A reference that
puts 6 nats on the true next token (below) gains about 6 nats on misaligned labels; one with no
skill (random logits) has a gain of mean 0, and 5 standard errors make a false warning a
chance of about 3·10⁻⁷ per direction.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from kldiv import cli
from kldiv.cli import label_alignment, shift_labels
from kldiv.llamacpp import write_base
from kldiv.metrics import TokenStats

B, T, V = 3, 48, 40


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def lm(tmp_path, rng):
    """Input ids and a reference that knows the next token (6 nats of logit on it), a
    candidate near it, and the same shapes with no skill at all."""
    ids = rng.integers(0, V, size=(B, T))
    ref = rng.normal(size=(B, T, V)).astype(np.float32)
    ref[:, :-1][np.arange(B)[:, None], np.arange(T - 1), ids[:, 1:]] += 6.0
    cand = (ref + 0.3 * rng.normal(size=ref.shape)).astype(np.float32)
    np.save(tmp_path / "ref.npy", ref)
    np.save(tmp_path / "cand.npy", cand)
    np.save(tmp_path / "noskill.npy", rng.normal(size=ref.shape).astype(np.float32))
    np.save(tmp_path / "ids.npy", ids)
    manual = np.full_like(ids, -100)
    manual[:, :-1] = ids[:, 1:]
    np.save(tmp_path / "labels.npy", manual)
    return tmp_path, ids, ref, cand, manual


def test_shift_labels_equals_manual_shifting(lm):
    d, ids, ref, cand, manual = lm
    np.testing.assert_array_equal(shift_labels(ids), manual)
    base = ["compare", str(d / "ref.npy"), str(d / "cand.npy"), "--json", "--quiet"]
    code, shifted, err = run([*base, "--labels", str(d / "ids.npy"), "--shift-labels"])
    assert code == 0 and err == "", err
    code, by_hand, err = run([*base, "--labels", str(d / "labels.npy")])
    assert code == 0 and err == "", err
    assert json.loads(shifted) == json.loads(by_hand)
    stats = TokenStats()
    stats.update(ref, cand, labels=manual)
    want = stats.report().to_dict()
    doc = json.loads(shifted)
    assert {k: doc[k] for k in want} == want
    assert doc["num_tokens"] == B * (T - 1)  # the last position of each sequence has no label


def test_unshifted_input_ids_get_a_warning(lm):
    d, *_ = lm
    base = ["compare", str(d / "ref.npy"), str(d / "cand.npy"), "--quiet"]
    code, out, err = run([*base, "--labels", str(d / "ids.npy")])
    assert code == 0 and out  # a warning, not an error: the report is still printed
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kldiv compare: warning: ")
    assert "look like input ids" in lines[0] and "--shift-labels" in lines[0]
    # labels shifted twice: the other direction
    code, _, err = run([*base, "--labels", str(d / "labels.npy"), "--shift-labels"])
    assert code == 0 and "shifted one step too far" in err and "drop --shift-labels" in err
    # a reference with no skill cannot tell: no warning either way
    for labels in ("ids.npy", "labels.npy"):
        code, _, err = run(
            ["compare", str(d / "noskill.npy"), str(d / "cand.npy"), "--quiet", "--labels",
             str(d / labels)]
        )  # fmt: skip
        assert code == 0 and err == "", err


def test_label_alignment_directly(lm, rng):
    _, ids, ref, _, manual = lm
    rows = ref.reshape(-1, V)
    assert label_alignment(rows, "logits", manual.reshape(-1), 0, T) == 0
    assert label_alignment(rows, "logits", ids.reshape(-1), 0, T) == 1
    twice = shift_labels(manual)
    assert label_alignment(rows, "logits", twice.reshape(-1), 0, T) == -1
    # the same on probabilities and log-probabilities
    lp = rows - np.log(np.exp(rows.astype(np.float64)).sum(-1, keepdims=True))
    assert label_alignment(lp, "log_probs", ids.reshape(-1), 0, T) == 1
    assert label_alignment(np.exp(lp), "probs", ids.reshape(-1), 0, T) == 1
    # a block that starts mid-stream: positions counted from `start`
    assert label_alignment(rows[T + 5 :], "logits", ids.reshape(-1), T + 5, T) == 1
    # too few tokens to tell
    assert label_alignment(rows[:10], "logits", ids.reshape(-1), 0, T) == 0
    # every label ignored
    assert label_alignment(rows, "logits", np.full(B * T, -100), 0, T) == 0


def test_shift_labels_errors(lm):
    d, *_ = lm
    np.save(d / "one.npy", np.zeros(V, dtype=np.float32))
    np.save(d / "one_label.npy", np.array(3))
    write_base(d / "b.kld", np.ones((2, 8), dtype=np.int64), np.zeros((2, 8, V)))
    cases = [
        (["compare", str(d / "b.kld"), str(d / "cand.npy"), "--shift-labels"],
         "--shift-labels: the base file holds the labels"),
        (["compare", str(d / "ref.npy"), str(d / "cand.npy"), "--shift-labels"], "needs --labels"),
        (["compare", str(d / "one.npy"), str(d / "one.npy"), "--labels",
          str(d / "one_label.npy"), "--shift-labels"], "one token, not a sequence"),
    ]  # fmt: skip
    for argv, needle in cases:
        code, out, err = run(argv)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith("kldiv compare: error: ") and needle in err, err


def test_shift_labels_of_unsigned_ids(lm):
    """uint64 ids: shifted as int64 ids are; one at or above 2**63 is named as it is, not
    wrapped to a negative number by the cast to int64."""
    d, ids, *_ = lm
    np.save(d / "ids_u64.npy", ids.astype(np.uint64))
    base = ["compare", str(d / "ref.npy"), str(d / "cand.npy"), "--json", "--quiet"]
    code, want, err = run([*base, "--labels", str(d / "ids.npy"), "--shift-labels"])
    assert code == 0, err
    code, got, err = run([*base, "--labels", str(d / "ids_u64.npy"), "--shift-labels"])
    assert code == 0 and json.loads(got) == json.loads(want), err
    big = ids.astype(np.uint64)
    big[1, 3] = 2**63 + 5
    np.save(d / "big.npy", big)
    code, out, err = run([*base, "--labels", str(d / "big.npy"), "--shift-labels"])
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("kldiv compare: error: ") and str(2**63 + 5) in lines[0], err
    assert "at index (1, 3)" in lines[0] and "-" + str(2**63 - 5) not in lines[0]
    # the first id of a sequence is no label: shifted away, whatever its value
    big = ids.astype(np.uint64)
    big[1, 0] = 2**64 - 1
    np.testing.assert_array_equal(shift_labels(big), shift_labels(ids))
    with pytest.raises(ValueError, match=f"got {2**64 - 1} at index"):
        shift_labels(big[:, ::-1])
