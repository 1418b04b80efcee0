"""TokenStats.from_values: the statistics of values TokenStats produced round-trip exactly,
the value domains are those TokenStats.update can produce (probability rows up to their
normalisation tolerance included), and inconsistent arguments raise one-line errors that
name the argument."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from kldiv.metrics import TokenStats

NAMES = ("kl", "top1", "dp", "nll_ref", "nll_cand")


def values_of(stats: TokenStats, labels: bool = True) -> dict[str, np.ndarray]:
    return {k: stats.values(k) for k in (NAMES if labels else NAMES[:2])}


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "no-labels"])
def test_values_of_token_stats_round_trip(rng, labels):
    ref = rng.normal(size=(3, 5, 7))
    cand = ref + rng.normal(size=ref.shape)
    cand[0, 0, 0] = -np.inf  # KL = +inf for that token
    stats = TokenStats()
    lab = rng.integers(0, 7, (3, 5))
    lab[0, 1] = lab[2, 2] = -100
    stats.update(ref, cand, labels=lab if labels else None)
    got = TokenStats.from_values(
        values_of(stats, labels), vocab_size=7, num_ignored=stats.num_ignored
    )
    assert got.report() == stats.report()
    assert (got.vocab_size, got.has_labels, got.num_ignored) == (7, labels, stats.num_ignored)
    # 0/1 numbers for top1, and integer KL, are values TokenStats can hold too
    vals = values_of(stats, labels) | {"top1": stats.values("top1").astype(np.float32)}
    again = TokenStats.from_values(vals, vocab_size=7, num_ignored=stats.num_ignored)
    assert again.report() == stats.report()


def test_probabilities_within_their_tolerance_of_one_are_accepted():
    """A label probability of 1 + 2⁻⁷ passes as bfloat16 probabilities (tolerance 4·2⁻⁷): a
    negative NLL and a Δp above 1 are values TokenStats produces."""
    ref = np.array([[1 + 2.0**-7, 0.0], [0.0, 1.0]], dtype=ml_dtypes.bfloat16)
    cand = np.array([[1.0, 0.0], [1 + 2.0**-7, 0.0]], dtype=ml_dtypes.bfloat16)
    stats = TokenStats()
    stats.update(ref, cand, form="probs", labels=np.array([0, 0]))
    vals = values_of(stats)
    assert vals["nll_ref"][0] < 0 and vals["dp"][1] > 1 and vals["kl"][1] == math.inf
    assert TokenStats.from_values(vals, vocab_size=2).report() == stats.report()


def good(n: int = 3) -> dict[str, np.ndarray]:
    return {
        "kl": np.array([0.0, 0.5, np.inf])[:n],
        "top1": np.array([True, False, True])[:n],
        "dp": np.array([-1.0, 0.25, 1.0])[:n],
        "nll_ref": np.array([0.0, 1.0, np.inf])[:n],
        "nll_cand": np.array([2.0, 0.0, 0.5])[:n],
    }


def with_(name: str, value) -> dict:
    return good() | {name: value}


BAD = {
    # (values, keyword arguments) -> (exception type, the start of its message)
    "values not a dict": ([("kl", [0.0])], {}, TypeError, "Expected `values` to be a dict"),
    "vocab 0": (good(), {"vocab_size": 0}, ValueError, "Expected `vocab_size` to be a positive"),
    "vocab -3": (good(), {"vocab_size": -3}, ValueError, "Expected `vocab_size` to be a positive"),
    "vocab 2.7": (good(), {"vocab_size": 2.7}, TypeError, "Expected `vocab_size` to be an int"),
    "vocab True": (good(), {"vocab_size": True}, TypeError, "Expected `vocab_size` to be an int"),
    "vocab str": (good(), {"vocab_size": "7"}, TypeError, "Expected `vocab_size` to be an int"),
    "ignored -1": (good(), {"num_ignored": -1}, ValueError, "Expected `num_ignored` to be a non"),
    "ignored 1.5": (good(), {"num_ignored": 1.5}, TypeError, "Expected `num_ignored` to be an int"),
    "ignored True": (good(), {"num_ignored": True}, TypeError, "Expected `num_ignored` to be an"),
    "2-D": (with_("kl", np.zeros((3, 1))), {}, ValueError, "Expected `values['kl']` to be 1-D"),
    "0-D": (with_("dp", np.float64(0.1)), {}, ValueError, "Expected `values['dp']` to be 1-D"),
    "strings": (with_("kl", np.array(["a", "b", "c"])), {}, TypeError, "Expected `values['kl']`"),
    "complex": (with_("nll_ref", np.zeros(3, complex)), {}, TypeError, "Expected `values['nll_"),
    "bool kl": (with_("kl", np.zeros(3, bool)), {}, TypeError, "Expected `values['kl']` to be a"),
    "object": (with_("top1", np.array([1, None, 0])), {}, TypeError, "Expected `values['top1']`"),
    "negative kl": (with_("kl", [0.0, -0.5, 1.0]), {}, ValueError, "Expected `values['kl']` to"),
    "NaN kl": (with_("kl", [0.0, np.nan, 1.0]), {}, ValueError, "Expected `values['kl']` to hold"),
    "top1 2": (with_("top1", [0, 2, 1]), {}, ValueError, "Expected `values['top1']` to hold"),
    "top1 0.5": (with_("top1", [0, 0.5, 1]), {}, ValueError, "Expected `values['top1']` to hold"),
    "dp 1.5": (with_("dp", [0.0, 1.5, 0.0]), {}, ValueError, "Expected `values['dp']` to hold"),
    "dp NaN": (with_("dp", [0.0, np.nan, 0.0]), {}, ValueError, "Expected `values['dp']` to"),
    "dp -inf": (with_("dp", [0.0, -np.inf, 0.0]), {}, ValueError, "Expected `values['dp']` to"),
    "nll -1": (with_("nll_ref", [0.0, -1.0, 0.0]), {}, ValueError, "Expected `values['nll_ref']`"),
    "nll -inf": (with_("nll_cand", [0, -np.inf, 0]), {}, ValueError, "Expected `values['nll_cand"),
    "nll NaN": (with_("nll_cand", [0, np.nan, 0]), {}, ValueError, "Expected `values['nll_cand']"),
    "lengths": (with_("dp", [0.0, 0.1]), {}, ValueError, "Expected `values` of one length"),
    "names": ({"kl": [0.0], "top1": [True], "dp": [0.0]}, {}, ValueError, "Expected `values` to"),
    "no vocab": (good(), {"vocab_size": None}, ValueError, "`vocab_size` is needed"),
    "ignored without labels": (
        {"kl": [0.0], "top1": [True]},
        {"num_ignored": 2},
        ValueError,
        "`num_ignored` counts ignored labels",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_inconsistent_arguments_raise_one_line_errors(case):
    values, kw, kind, start = BAD[case]
    kw = {"vocab_size": 7} | kw
    with pytest.raises(kind) as e:
        TokenStats.from_values(values, **kw)
    message = str(e.value)
    assert message.startswith(start), message
    assert "\n" not in message


def test_the_first_bad_value_and_the_count_are_named():
    with pytest.raises(ValueError) as e:
        TokenStats.from_values(with_("kl", [0.0, -0.5, np.nan]), vocab_size=7)
    assert str(e.value) == (
        "Expected `values['kl']` to hold KL divergences ≥ 0 or +inf, got -0.5 at index 1 "
        "(2 such values)."
    )


def test_no_tokens_and_tensors():
    empty = TokenStats.from_values({"kl": [], "top1": []}, vocab_size=None)
    assert (empty.num_tokens, empty.vocab_size, empty.has_labels) == (0, None, None)
    # all ignored: a vocabulary, labels and no kept token
    vals = {k: np.zeros(0) for k in NAMES}
    ignored = TokenStats.from_values(vals, vocab_size=5, num_ignored=4)
    assert (ignored.num_tokens, ignored.num_ignored, ignored.has_labels) == (0, 4, True)
    # tensors, and NumPy integer counts
    vals = {k: torch.from_numpy(np.asarray(v)) for k, v in good().items()}
    stats = TokenStats.from_values(vals, vocab_size=np.int64(7), num_ignored=np.int32(1))
    assert (stats.num_tokens, stats.vocab_size, stats.num_ignored) == (3, 7, 1)
