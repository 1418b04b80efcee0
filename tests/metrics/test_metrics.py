"""kldiv.metrics: every statistic against an independent float64 computation, merging, zero
support, ignore_index, validation messages, JSON and the text table."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import array_api_compat.numpy
import ml_dtypes
import numpy as np
import pytest
import torch
from reference import kl as ref_kl
from reference import log_softmax_row

from kldiv import _math, metrics
from kldiv.metrics import PERCENTILES, KLReport, TokenStats, blocks

# --------------------------------------------------------------------------------------------
# The independent computation: per-token values with math.log/math.fsum on float64 rows, and
# the statistics written out from their definitions.


def row_log_probs(row, form: str) -> list[float]:
    row = [float(v) for v in row]
    if form == "logits":
        return log_softmax_row(row)
    if form == "log_probs":
        return row
    return [math.log(v) if v > 0 else -math.inf for v in row]


def token_values(ref, cand, form=("logits", "logits"), labels=None, ignore_index=-100):
    """Per-token (kl, top1, dp, nll_ref, nll_cand) of 2-D inputs, ignored tokens dropped."""
    if isinstance(form, str):
        form = (form, form)
    ref, cand = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    out = {k: [] for k in ("kl", "top1", "dp", "nll_ref", "nll_cand")}
    for i in range(ref.shape[0]):
        if labels is not None and labels[i] == ignore_index:
            continue
        lp, lq = row_log_probs(ref[i], form[0]), row_log_probs(cand[i], form[1])
        p = [math.exp(v) for v in lp]
        q = [math.exp(v) for v in lq]
        out["kl"].append(ref_kl(p, q) if min(lp) > -700 else kl_from_logs(lp, lq))
        out["top1"].append(int(np.argmax(ref[i])) == int(np.argmax(cand[i])))
        if labels is not None:
            y = int(labels[i])
            out["dp"].append(q[y] - p[y])
            out["nll_ref"].append(-lp[y])
            out["nll_cand"].append(-lq[y])
    return out


def kl_from_logs(lp, lq) -> float:
    """Σ p·(lp − lq) from log-probabilities, where p may underflow (p > 0 iff lp > -inf)."""
    terms = []
    for a, b in zip(lp, lq, strict=True):
        if a == -math.inf:
            continue
        if b == -math.inf:
            return math.inf
        terms.append(math.exp(a) * (a - b))
    return math.fsum(terms)


def type7(sorted_values: list[float], q: float) -> float:
    """Hyndman & Fan type 7 (NumPy's default): linear between order statistics."""
    n = len(sorted_values)
    h = (n - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, n - 1)
    a, b = sorted_values[lo], sorted_values[hi]
    if h == lo:
        return a
    if b == math.inf:
        return math.inf
    return a + (h - lo) * (b - a)


def mean_stderr(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    if any(math.isinf(x) for x in xs):
        return math.inf, math.inf
    mean = math.fsum(xs) / n
    if n < 2:
        return mean, math.inf
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var) / math.sqrt(n)


def close(a, b, rtol=1e-11, atol=1e-14) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= atol + rtol * abs(b)


def assert_report_matches(r: KLReport, v: dict, num_ignored: int = 0) -> None:
    kl = v["kl"]
    n = len(kl)
    assert r.num_tokens == n and r.num_ignored == num_ignored
    mean, stderr = mean_stderr(kl)
    assert close(r.kl_mean, mean), (r.kl_mean, mean)
    assert close(r.kl_stderr, stderr, rtol=1e-9), (r.kl_stderr, stderr)
    assert close(r.kl_max, max(kl))
    assert r.kl_num_inf == sum(k == math.inf for k in kl)
    s = sorted(kl)
    assert list(r.kl_percentiles) == list(PERCENTILES)
    for q in PERCENTILES:
        assert close(r.kl_percentiles[q], type7(s, q)), q
    f = sum(v["top1"]) / n
    assert r.top1_agreement == f
    assert close(r.top1_agreement_stderr, math.sqrt(f * (1 - f) / n))
    if not v["dp"]:
        assert not r.has_labels and r.dp_mean is None and r.ppl_ratio is None
        return
    dp = v["dp"]
    dp_mean, dp_stderr = mean_stderr(dp)
    assert close(r.dp_mean, dp_mean, atol=1e-15)
    assert close(r.dp_stderr, dp_stderr, rtol=1e-9)
    assert close(r.dp_rms, math.sqrt(math.fsum(d * d for d in dp) / n))
    assert r.dp_min == pytest.approx(min(dp), abs=1e-15)
    assert r.dp_max == pytest.approx(max(dp), abs=1e-15)
    sd = sorted(dp)
    for q in PERCENTILES:
        assert close(r.dp_percentiles[q], type7(sd, q), atol=1e-15), q
    nr, nc = math.fsum(v["nll_ref"]) / n, math.fsum(v["nll_cand"]) / n
    assert close(r.ppl_ref, math.exp(nr))
    assert close(r.ppl_cand, math.exp(nc))
    assert close(r.ppl_ratio, math.exp(nc - nr))
    assert close(r.ln_ppl_ratio, nc - nr, atol=1e-13)
    d = [c - a for a, c in zip(v["nll_ref"], v["nll_cand"], strict=True)]
    assert close(r.ln_ppl_ratio_stderr, mean_stderr(d)[1], rtol=1e-9)


def assert_no_nan(r: KLReport) -> None:
    for key, value in r.to_dict().items():
        items = value.values() if isinstance(value, dict) else [value]
        for x in items:
            assert not (isinstance(x, float) and math.isnan(x)), key


def logits_pair(rng, shape, noise=0.5, dtype=np.float32):
    ref = rng.normal(scale=2.0, size=shape)
    cand = ref + rng.normal(scale=noise, size=shape)
    return ref.astype(dtype), cand.astype(dtype)


def log_softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def raises(exc, pattern):
    return pytest.raises(exc, match=re.escape(pattern))


# --------------------------------------------------------------------------------------------
# Statistics


def test_every_statistic_matches_a_float64_reference(rng):
    ref, cand = logits_pair(rng, (3, 9, 11), noise=1.5)  # top-1 agreement ~50 %
    labels = rng.integers(0, 11, size=(3, 9))
    stats = TokenStats()
    stats.update(ref, cand, labels=labels)
    r = stats.report()
    v = token_values(ref.reshape(-1, 11), cand.reshape(-1, 11), labels=labels.reshape(-1))
    assert 0 < r.top1_agreement < 1  # both branches of the agreement count are exercised
    assert_report_matches(r, v)
    np.testing.assert_allclose(stats.values("kl"), v["kl"], rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(stats.values("dp"), v["dp"], rtol=1e-11, atol=1e-15)
    np.testing.assert_array_equal(stats.values("top1"), v["top1"])
    assert_no_nan(r)


def test_without_labels_the_label_statistics_are_none(rng):
    ref, cand = logits_pair(rng, (17, 5))
    stats = TokenStats()
    stats.update(ref, cand)
    r = stats.report()
    assert_report_matches(r, token_values(ref, cand))
    assert not r.has_labels and stats.has_labels is False and stats.vocab_size == 5


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1001])
def test_percentiles_are_numpys_default_bit_for_bit(rng, n):
    ref, cand = logits_pair(rng, (n, 4), noise=1.0)
    stats = TokenStats()
    stats.update(ref, cand, labels=rng.integers(0, 4, size=n))
    r = stats.report()
    for name, got in (("kl", r.kl_percentiles), ("dp", r.dp_percentiles)):
        values = stats.values(name)
        assert got == {q: float(np.percentile(values, q)) for q in PERCENTILES}
    assert r.kl_percentiles[50.0] == float(np.median(stats.values("kl")))


def test_one_token_has_infinite_standard_errors_and_no_nan(rng):
    ref, cand = logits_pair(rng, (1, 6))
    stats = TokenStats()
    stats.update(ref, cand, labels=np.array([2]))
    r = stats.report()
    assert r.num_tokens == 1 and r.kl_mean == r.kl_max == r.kl_percentiles[0.1]
    assert r.kl_stderr == r.dp_stderr == r.ln_ppl_ratio_stderr == math.inf
    assert r.top1_agreement_stderr == 0.0
    assert_no_nan(r)


def test_half_precision_and_float64_inputs_are_computed_in_float64(rng):
    ref, cand = logits_pair(rng, (8, 7), dtype=np.float64)
    for dtype in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
        r16, c16 = ref.astype(dtype), cand.astype(dtype)
        stats = TokenStats()
        stats.update(r16, c16)
        expected = token_values(r16.astype(np.float64), c16.astype(np.float64))["kl"]
        np.testing.assert_allclose(stats.values("kl"), expected, rtol=1e-11, atol=1e-15)


def test_identical_inputs_give_exact_zeros_and_kl_is_never_negative(rng):
    ref, cand = logits_pair(rng, (40, 9), dtype=np.float64)
    stats = TokenStats()
    stats.update(ref, ref)
    assert np.all(stats.values("kl") == 0.0) and not np.signbit(stats.values("kl")).any()
    assert stats.report().top1_agreement == 1.0
    # The same distributions in two forms: equal mathematically, so the float64 sums round
    # around 0 on both sides; negative results are reported as +0.
    stats = TokenStats()
    lp = log_softmax64(ref)
    stats.update(lp, np.exp(lp), form=("log_probs", "probs"))
    kl = stats.values("kl")
    assert np.all(kl >= 0) and not np.signbit(kl).any() and kl.max() < 1e-14
    assert stats.report().kl_percentiles[0.1] >= 0


def test_forms_give_the_same_statistics(rng):
    ref, cand = logits_pair(rng, (30, 8), dtype=np.float64)
    labels = rng.integers(0, 8, size=30)
    lp, lq = log_softmax64(ref), log_softmax64(cand)
    inputs = {
        "logits": (ref, cand),
        "log_probs": (lp, lq),
        "probs": (np.exp(lp), np.exp(lq)),
        ("log_probs", "logits"): (lp, cand),
        ("probs", "log_probs"): (np.exp(lp), lq),
    }
    reports = {}
    for form, (a, b) in inputs.items():
        stats = TokenStats()
        stats.update(a, b, form=form, labels=labels)
        reports[form] = stats.report().to_dict()
    base = reports.pop("logits")
    for form, rep in reports.items():
        for key, value in base.items():
            if isinstance(value, dict):
                for q, x in value.items():
                    assert rep[key][q] == pytest.approx(x, rel=1e-9, abs=1e-15), (form, key, q)
            else:
                assert rep[key] == pytest.approx(value, rel=1e-9, abs=1e-15), (form, key)


def test_axis_other_than_last_flattens_the_remaining_axes(rng):
    ref, cand = logits_pair(rng, (4, 6, 5))  # tokens (4, 5), categories on axis 1
    labels = rng.integers(0, 6, size=(4, 5))
    moved = TokenStats()
    moved.update(ref, cand, axis=1, labels=labels)
    last = TokenStats()
    last.update(np.moveaxis(ref, 1, -1), np.moveaxis(cand, 1, -1), labels=labels)
    assert moved.report() == last.report()
    np.testing.assert_array_equal(moved.values("kl"), last.values("kl"))


# --------------------------------------------------------------------------------------------
# Merging and blocks


def test_merge_of_uneven_chunks_equals_one_pass_exactly(rng, monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 3 * 13)  # blocks of 3 rows
    ref, cand = logits_pair(rng, (50, 13))
    labels = rng.integers(0, 13, size=50)
    labels[rng.random(50) < 0.2] = -100
    one = TokenStats()
    one.update(ref, cand, labels=labels)
    cuts = [0, 1, 2, 9, 10, 31, 50]
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        s = TokenStats()
        s.update(ref[a:b], cand[a:b], labels=labels[a:b])
        parts.append(s)
    merged = parts[0].merge(*parts[1:])
    assert merged.report() == one.report()
    for name in ("kl", "top1", "dp", "nll_ref", "nll_cand"):
        np.testing.assert_array_equal(merged.values(name), one.values(name))
    # Order does not matter: statistics are computed from sorted values.
    assert parts[-1].merge(*reversed(parts[:-1])).report() == one.report()
    # Nested merges, empty accumulators and sequential updates on one object agree too.
    nested = parts[0].merge(parts[1].merge(TokenStats(), parts[2]), TokenStats()).merge(*parts[3:])
    assert nested.report() == one.report()
    seq = TokenStats()
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        seq.update(ref[a:b], cand[a:b], labels=labels[a:b])
    assert seq.report() == one.report() and seq.num_ignored == one.num_ignored
    # merge leaves its operands alone
    assert parts[0].num_tokens == int(np.count_nonzero(labels[:1] != -100))


def test_block_size_does_not_change_per_token_values(rng, monkeypatch):
    ref, cand = logits_pair(rng, (23, 7))
    labels = rng.integers(0, 7, size=23)
    results = []
    for rows in (1, 4, 23, 100):
        monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", rows * 7)
        s = TokenStats()
        s.update(ref, cand, labels=labels)
        results.append(s)
    for s in results[1:]:
        for name in ("kl", "top1", "dp", "nll_ref", "nll_cand"):
            np.testing.assert_array_equal(s.values(name), results[0].values(name))


# --------------------------------------------------------------------------------------------
# Zero support


def test_shared_minus_inf_logits_are_zero_probabilities(rng):
    ref, cand = logits_pair(rng, (12, 8), dtype=np.float64)
    ref[:, [1, 5]] = -np.inf  # a masked vocabulary entry in both models
    cand[:, [1, 5]] = -np.inf
    ref[3, 6] = -np.inf  # ref-only zero: that term counts 0
    stats = TokenStats()
    stats.update(ref, cand, labels=np.full(12, 2))
    r = stats.report()
    v = token_values(ref, cand, labels=np.full(12, 2))
    assert_report_matches(r, v)
    kept = [0, 2, 3, 4, 6, 7]
    np.testing.assert_allclose(
        stats.values("kl")[:3], token_values(ref[:3, kept], cand[:3, kept])["kl"], rtol=1e-12
    )
    assert r.kl_num_inf == 0 and math.isfinite(r.kl_mean)


def test_candidate_zero_where_reference_has_mass_gives_infinite_tokens(rng):
    ref, cand = logits_pair(rng, (20, 6), dtype=np.float64)
    cand[[2, 7, 11], 4] = -np.inf
    labels = rng.integers(0, 6, size=20)
    labels[[2, 7]] = 4  # the label itself has candidate probability 0
    stats = TokenStats()
    stats.update(ref, cand, labels=labels)
    kl = stats.values("kl")
    assert np.isinf(kl[[2, 7, 11]]).all() and np.isfinite(np.delete(kl, [2, 7, 11])).all()
    r = stats.report()
    assert r.kl_num_inf == 3 and r.kl_mean == r.kl_stderr == r.kl_max == math.inf
    assert r.kl_percentiles[99.9] == math.inf and r.kl_percentiles[90.0] == math.inf
    assert math.isfinite(r.kl_percentiles[50.0]) and math.isfinite(r.kl_percentiles[0.1])
    assert r.ppl_cand == math.inf and math.isfinite(r.ppl_ref)
    assert r.ppl_ratio == r.ln_ppl_ratio == r.ln_ppl_ratio_stderr == math.inf
    assert_report_matches(r, token_values(ref, cand, labels=labels))
    assert_no_nan(r)
    d = r.to_dict()
    assert d["kl_mean"] == "inf" and d["kl_percentiles"]["99.9"] == "inf"


def test_percentile_between_finite_and_infinite_neighbours():
    # 4 tokens, one infinite: the 90th percentile sits at position 2.7, between a finite and an
    # infinite value (NumPy's lerp makes that NaN), the 50th at 1.5 between two finite ones.
    p = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    q = np.array([[0.5, 0.5], [0.25, 0.75], [0.75, 0.25], [1.0, 0.0]])
    stats = TokenStats()
    stats.update(p, q, form="probs")
    r = stats.report()
    finite = sorted(stats.values("kl")[:3])
    assert r.kl_percentiles[90.0] == math.inf and r.kl_percentiles[99.0] == math.inf
    assert r.kl_percentiles[50.0] == pytest.approx(type7([*finite, math.inf], 50.0), rel=1e-15)
    assert r.kl_max == math.inf and r.kl_num_inf == 1
    with np.errstate(invalid="ignore"):
        assert np.isnan(np.percentile(stats.values("kl"), 95.0))  # why we do not call it


def test_probability_underflow_against_a_zero_is_still_infinite():
    # ref gives the last category e^-800 > 0 (0.0 in float64); cand gives it exactly 0.
    ref = np.array([[0.0, 0.0, -800.0], [0.0, 0.0, -800.0]])
    cand = np.array([[0.0, 0.0, -np.inf], [0.0, 0.0, -900.0]])
    stats = TokenStats()
    stats.update(ref, cand, labels=np.array([2, 2]))
    kl = stats.values("kl")
    assert kl[0] == math.inf and kl[1] == pytest.approx(math.exp(-800) * 100, abs=1e-300)
    r = stats.report()
    # Mean NLLs: ref ≈ 800.7 (finite, but e^800.7 overflows), cand = inf (probability 0).
    assert r.ppl_ref == math.inf and r.ppl_cand == math.inf
    assert r.ppl_ratio == math.inf and r.ln_ppl_ratio_stderr == math.inf
    assert_no_nan(r)


def test_perplexity_ratio_is_computed_from_the_mean_nlls_not_the_perplexities():
    # Both models give every label probability ~e^-800: each PPL overflows, the ratio does not.
    ref = np.array([[0.0, -800.0], [0.0, -801.0]])
    cand = np.array([[0.0, -800.5], [0.0, -801.0]])
    stats = TokenStats()
    stats.update(ref, cand, labels=np.array([1, 1]))
    r = stats.report()
    assert r.ppl_ref == r.ppl_cand == math.inf
    assert r.ppl_ratio == pytest.approx(math.exp(0.25), rel=1e-12)
    assert r.ln_ppl_ratio == pytest.approx(0.25, rel=1e-12)
    assert r.ln_ppl_ratio_stderr == pytest.approx(0.25, rel=1e-12)  # std of (0.5, 0) / √2


def test_both_models_giving_a_label_probability_zero_make_the_ratio_undefined():
    ref = np.array([[0.0, 0.0, -np.inf], [0.0, 1.0, 2.0]])
    stats = TokenStats()
    stats.update(ref, ref.copy(), labels=np.array([2, 0]))
    r = stats.report()
    assert r.ppl_ref == r.ppl_cand == math.inf
    assert r.ppl_ratio is None and r.ln_ppl_ratio is None and r.ln_ppl_ratio_stderr is None
    assert r.kl_mean == 0.0 and r.dp_mean == 0.0
    assert_no_nan(r)
    assert "PPL(cand)/PPL(ref)    undefined" in r.to_text()
    assert json.loads(json.dumps(r.to_dict()))["ppl_ratio"] is None


def test_zero_probabilities_in_the_probs_form(rng):
    p = rng.dirichlet(np.ones(7), size=15)
    q = rng.dirichlet(np.ones(7), size=15)
    p[p < 0.1] = 0.0
    p /= p.sum(axis=-1, keepdims=True)
    q[0, np.argmax(p[0])] = 0.0
    q[0] /= q[0].sum()
    stats = TokenStats()
    labels = np.argmin(p, axis=-1)  # p(label) = 0: nll_ref = inf
    stats.update(p, q, form="probs", labels=labels)
    r = stats.report()
    assert_report_matches(r, token_values(p, q, form="probs", labels=labels))
    assert r.kl_num_inf == 1 and r.ppl_ref == math.inf and r.ppl_ratio == 0.0
    assert r.ln_ppl_ratio == -math.inf and r.to_dict()["ln_ppl_ratio"] == "-inf"
    assert_no_nan(r)


def test_fast_kl_equals_math_kl_rows_on_a_zero_support_grid(rng):
    # log-probabilities -inf (zero), -800 (p underflows to 0 but is > 0), tiny, ordinary
    grid = np.array([-np.inf, -800.0, -700.0, -2.0, -0.5])
    lp = rng.choice(grid, size=(300, 6))
    lq = rng.choice(grid, size=(300, 6))
    p = np.exp(lp)
    got = blocks.kl_block(lp, lq, p, np.empty_like(lp))
    want = _math.kl_rows(array_api_compat.numpy, lp, lq, p, -1)
    want[want <= 0] = 0.0
    np.testing.assert_array_equal(got, want)
    assert np.isinf(got).any() and (got == 0).any()


# --------------------------------------------------------------------------------------------
# ignore_index


def test_ignored_tokens_are_excluded_from_every_statistic(rng, monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 4 * 5)
    ref, cand = logits_pair(rng, (2, 11, 5))
    labels = rng.integers(0, 5, size=(2, 11))
    labels[0, :3] = -100
    labels[1, 7] = -100
    ref[0, 0] = np.nan  # ignored rows are never read
    cand[1, 7] = np.inf
    stats = TokenStats()
    stats.update(ref, cand, labels=labels)
    keep = labels != -100
    kept = TokenStats()
    kept.update(ref[keep], cand[keep], labels=labels[keep])
    assert stats.report() == KLReport(**{**kept.report().__dict__, "num_ignored": 4})
    assert stats.num_tokens == 18 and stats.num_ignored == 4
    assert "(4 excluded by ignore_index)" in stats.report().to_text()


def test_custom_ignore_index_and_an_all_ignored_chunk(rng):
    ref, cand = logits_pair(rng, (6, 4))
    stats = TokenStats()
    stats.update(ref, cand, labels=np.full(6, 7), ignore_index=7)
    assert stats.num_tokens == 0 and stats.num_ignored == 6
    with raises(ValueError, "No tokens to report on: all 6 tokens seen had labels == ignore_index"):
        stats.report()
    stats.update(ref, cand, labels=np.array([0, 1, 2, 3, 7, 7]), ignore_index=7)
    assert stats.num_tokens == 4 and stats.num_ignored == 8
    with raises(ValueError, "Expected `labels` in [0, 4) or equal to ignore_index=-100, got 7"):
        stats.update(ref, cand, labels=np.array([0, 1, 2, 3, -100, 7]))  # 7 is not ignored now
    with raises(ValueError, "Expected `labels` in [0, 4) or equal to ignore_index=7, got -100"):
        stats.update(ref, cand, labels=np.array([0, 1, 2, 3, -100, 7]), ignore_index=7)
    assert stats.num_tokens == 4


# --------------------------------------------------------------------------------------------
# Validation


P2 = np.array([[0.25, 0.75], [0.5, 0.5]])


def test_shape_dtype_and_form_errors():
    s = TokenStats()
    with raises(ValueError, "Expected `ref` and `cand` to have the same shape"):
        s.update(np.zeros((2, 5)), np.zeros((2, 6)))
    with raises(ValueError, "got (2, 5) and (3, 5)"):
        s.update(np.zeros((2, 5)), np.zeros((3, 5)))
    with raises(ValueError, "got (2, 5) and (5,)"):  # no broadcasting
        s.update(np.zeros((2, 5)), np.zeros(5))
    with raises(TypeError, "Expected `ref` to have a real floating dtype"):
        s.update(np.zeros((2, 5), dtype=np.int64), np.zeros((2, 5)))
    with raises(TypeError, "Expected `cand` to have a real floating dtype"):
        s.update(np.zeros((2, 5)), np.zeros((2, 5), dtype=bool))
    with raises(ValueError, "Expected `form` for p to be one of 'probs', 'logits', 'log_probs'"):
        s.update(P2, P2, form="softmax")
    with raises(ValueError, "Expected `axis` to be in [-2, 1] for 2-d inputs, got 2"):
        s.update(P2, P2, axis=2)
    with raises(ValueError, "at least 1 dimension (the category axis), got shapes () and ()"):
        s.update(np.float64(0.5), np.float64(0.5))
    with raises(ValueError, "Expected at least one token, got shape (0, 5)"):
        s.update(np.zeros((0, 5)), np.zeros((0, 5)))
    with raises(ValueError, "Expected at least one category along axis -1, got shape (3, 0)"):
        s.update(np.zeros((3, 0)), np.zeros((3, 0)))
    with raises(TypeError, "Expected `ignore_index` to be an int, got True"):
        s.update(P2, P2, labels=np.array([0, 1]), ignore_index=True)
    assert s.num_tokens == 0 and s.vocab_size is None


def test_nan_is_reported_with_argument_count_and_position():
    ref = np.zeros((3, 4), dtype=np.float32)
    cand = np.zeros((3, 4), dtype=np.float32)
    cand[1, [0, 2]] = np.nan
    cand[2, 3] = np.nan
    with raises(ValueError, "`cand` contains 3 NaN values, the first in the token at index (1,)"):
        TokenStats().update(ref, cand)
    with raises(ValueError, "`ref` contains 1 NaN value, the first in the token at index (0, 1)"):
        r3 = np.zeros((2, 2, 4))
        r3[0, 1, 0] = np.nan
        TokenStats().update(r3, np.zeros((2, 2, 4)), form="log_probs")
    with raises(ValueError, "pass labels with ignore_index to exclude padding tokens"):
        TokenStats().update(ref, cand)


@pytest.mark.parametrize(
    ("form", "row", "message"),
    [
        ("probs", [0.5, 0.6], "its probabilities do not sum to 1 (sum 1.1, tolerance"),
        ("probs", [1.5, -0.5], "it has negative probabilities"),
        ("probs", [np.inf, 0.0], "its probabilities do not sum to 1 (sum inf"),
        ("log_probs", [0.1, -3.0], "it has log-probabilities > 0"),
        ("log_probs", [-1.0, -1.0], "(exp of log_probs) do not sum to 1 (sum 0.73"),
        ("log_probs", [-np.inf, -np.inf], "(exp of log_probs) do not sum to 1 (sum 0,"),
        ("logits", [np.inf, 0.0], "it has a +inf logit"),
        ("logits", [-np.inf, -np.inf], "all its logits are -inf (no category has mass)"),
    ],
)
def test_invalid_values_name_argument_form_and_token(form, row, message):
    good = {"probs": [0.5, 0.5], "log_probs": [-math.log(2)] * 2, "logits": [0.0, 1.0]}[form]
    bad = np.array([[good, good, good], [good, row, good]])
    with raises(
        ValueError, f"`cand` (form={form!r}) is not a valid distribution at token index (1, 1): "
    ):
        TokenStats().update(np.array([[good] * 3] * 2), bad, form=form)
    with raises(ValueError, message):
        TokenStats().update(bad, np.array([[good] * 3] * 2), form=form)


def test_probs_tolerance_follows_the_input_dtype():
    # float32 softmax output (rounding up to a few eps32 off 1) passes; the same 1e-5 error in
    # float64 does not: the tolerance is the core's (kldiv._check).
    x = np.random.default_rng(0).normal(size=(64, 1000))
    p32 = torch.softmax(torch.from_numpy(x).float(), dim=-1).numpy()
    TokenStats().update(p32, p32, form="probs")
    off = np.full((1, 4), 0.25)
    off[0, 0] += 1e-5
    with raises(ValueError, "do not sum to 1 (sum 1.00001, tolerance 1.8e-15)"):
        TokenStats().update(off, off, form="probs")


def test_label_errors(rng):
    ref, cand = logits_pair(rng, (2, 3, 5))
    s = TokenStats()
    with raises(
        TypeError, "Expected `labels` to be an integer array of token ids, got dtype float64"
    ):
        s.update(ref, cand, labels=np.zeros((2, 3)))
    with raises(
        ValueError,
        "Expected `labels` to have the token shape (2, 3) (the shape of `ref` without axis -1), "
        "got (6,)",
    ):
        s.update(ref, cand, labels=np.zeros(6, dtype=np.int64))
    labels = np.zeros((2, 3), dtype=np.int32)
    labels[1, 0], labels[1, 2] = 5, -1
    with raises(
        ValueError,
        "Expected `labels` in [0, 5) or equal to ignore_index=-100, got 5 at token index (1, 0) "
        "(2 out of range)",
    ):
        s.update(ref, cand, labels=labels)
    assert s.num_tokens == 0


def test_consistency_errors_between_updates_and_merges(rng):
    ref, cand = logits_pair(rng, (4, 5))
    labelled, plain, other_vocab = TokenStats(), TokenStats(), TokenStats()
    labelled.update(ref, cand, labels=np.arange(4))
    plain.update(ref, cand)
    other_vocab.update(ref[:, :4], cand[:, :4])
    with raises(ValueError, "Expected `labels` in this update: earlier updates had labels"):
        labelled.update(ref, cand)
    with raises(ValueError, "Expected no `labels` in this update: earlier updates had none"):
        plain.update(ref, cand, labels=np.arange(4))
    with raises(ValueError, "Expected 5 categories (as in earlier updates), got 4 along axis -1"):
        plain.update(ref[:, :4], cand[:, :4])
    with raises(ValueError, "Cannot merge statistics with labels and statistics without labels"):
        labelled.merge(plain)
    with raises(ValueError, "Cannot merge statistics over 5 and 4 categories"):
        plain.merge(other_vocab)
    with raises(TypeError, "Expected TokenStats to merge, got dict"):
        plain.merge({})
    with raises(ValueError, "Expected `name` to be one of 'kl', 'top1', 'dp'"):
        plain.values("kl_mean")
    with raises(ValueError, "No tokens to report on: call update() first"):
        TokenStats().report()
    assert TokenStats().merge(TokenStats()).num_tokens == 0


def test_a_failed_update_adds_nothing(rng, monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 2 * 5)
    ref, cand = logits_pair(rng, (9, 5))
    stats = TokenStats()
    stats.update(ref, cand, labels=np.zeros(9, dtype=np.int64))
    before = stats.report()
    cand[7, 1] = np.nan  # in the fourth block: three blocks were computed before the error
    with raises(ValueError, "`cand` contains 1 NaN value, the first in the token at index (7,)"):
        stats.update(ref, cand, labels=np.zeros(9, dtype=np.int64))
    assert stats.report() == before and stats.num_tokens == 9


# --------------------------------------------------------------------------------------------
# Report: JSON, text, frameworks


def test_json_round_trip(rng):
    ref, cand = logits_pair(rng, (10, 4), dtype=np.float64)
    cand[3, 0] = -np.inf
    for labels in (None, np.array([0, 1, 2, 0, 1, 2, 3, 3, 0, -100])):
        stats = TokenStats()
        stats.update(ref, cand, labels=labels)
        r = stats.report()
        text = json.dumps(r.to_dict(), allow_nan=False)  # no NaN/inf literals
        back = json.loads(text)
        assert back == r.to_dict()
        assert KLReport.from_dict(back) == r
        assert set(back["kl_percentiles"]) == {
            "99.9",
            "99",
            "95",
            "90",
            "50",
            "10",
            "5",
            "1",
            "0.1",
        }
    assert back["kl_mean"] == "inf" and back["ppl_cand"] == "inf" and back["num_ignored"] == 1
    nones = {"ppl_ratio": None, "ln_ppl_ratio": None, "ln_ppl_ratio_stderr": None}
    undefined = KLReport.from_dict({**back, **nones})
    assert json.loads(json.dumps(undefined.to_dict()))["ppl_ratio"] is None
    with raises(ValueError, "Expected a number, null, 'inf' or '-inf', got 'nan'"):
        KLReport.from_dict({**back, "kl_max": "nan"})


def test_text_table_contains_the_key_numbers(rng):
    ref, cand = logits_pair(rng, (25, 6))
    stats = TokenStats()
    stats.update(ref, cand, labels=rng.integers(0, 6, size=25))
    r = stats.report()
    text = r.to_text()
    assert str(r) == text and text.startswith("KL(ref‖cand) over 25 tokens\n")
    assert f"{r.kl_mean:.6g} ± {r.kl_stderr:.6g}" in text
    assert f"{r.kl_max:.6g}" in text and f"{r.kl_percentiles[99.0]:.6g}" in text
    assert f"{r.kl_percentiles[50.0]:.6g}" in text
    assert f"{100 * r.top1_agreement:.3f} % ± {100 * r.top1_agreement_stderr:.3f} %" in text
    assert f"{r.ppl_ratio:.6g}" in text and f"{r.ppl_ref:.6g}" in text
    assert f"{r.ln_ppl_ratio:.6g} ± {r.ln_ppl_ratio_stderr:.6g}" in text
    assert f"{100 * r.dp_rms:.3f} %" in text and f"{100 * r.dp_mean:.3f} %" in text
    for label in ("Mean KL", "Maximum KL", "99.9% KL", "0.1% KL", "Same top-1", "RMS Δp"):
        assert label in text
    assert "Δp" not in TokenStats.merge(TokenStats(), _plain(ref, cand)).report().to_text()


def _plain(ref, cand) -> TokenStats:
    s = TokenStats()
    s.update(ref, cand)
    return s


def test_torch_tensors_and_bfloat16_are_accepted(rng):
    ref, cand = logits_pair(rng, (2, 5, 7))
    labels = rng.integers(0, 7, size=(2, 5))
    a, b = TokenStats(), TokenStats()
    a.update(torch.from_numpy(ref), torch.from_numpy(cand), labels=torch.from_numpy(labels))
    b.update(ref, cand, labels=labels)
    assert a.report() == b.report()
    bf_ref, bf_cand = torch.from_numpy(ref).bfloat16(), torch.from_numpy(cand).bfloat16()
    c, d = TokenStats(), TokenStats()
    c.update(bf_ref, bf_cand)
    d.update(bf_ref.float().numpy(), bf_cand.float().numpy())
    assert c.report() == d.report()


def test_module_docstring_example_runs():
    import doctest

    result = doctest.testmod(metrics, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_lists_and_jax_arrays_are_accepted():
    import jax.numpy as jnp

    p = [[0.25, 0.75], [0.5, 0.5]]
    q = [[0.5, 0.5], [0.1, 0.9]]
    a, b = TokenStats(), TokenStats()
    a.update(p, q, form="probs", labels=[1, 0])
    b.update(jnp.asarray(p), jnp.asarray(q), form="probs", labels=jnp.asarray([1, 0]))
    assert a.report() == b.report()
    np.testing.assert_allclose(a.values("kl"), [ref_kl(p[0], q[0]), ref_kl(p[1], q[1])])


def test_bfloat16_probabilities_get_the_bfloat16_tolerance(rng):
    # Rounded to bfloat16, a softmax output sums to 1 only within ~2^-8 per entry.
    p = torch.softmax(torch.from_numpy(rng.normal(size=(16, 50))), dim=-1).bfloat16()
    assert (p.double().sum(-1) - 1).abs().max() > 1e-4
    for x in (p, p.float().numpy().astype(ml_dtypes.bfloat16)):
        s = TokenStats()
        s.update(x, x, form="probs")
        assert s.report().kl_max == 0.0
    with raises(ValueError, "its probabilities do not sum to 1"):
        TokenStats().update(p.float(), p.float(), form="probs")  # float32 tolerance is tighter


def test_import_kldiv_metrics_imports_no_framework():
    code = (
        "import sys, numpy as np, kldiv.metrics as m\n"
        "s = m.TokenStats(); s.update(np.zeros((2, 3)), np.ones((2, 3))); s.report()\n"
        "print(','.join(x for x in ('torch', 'jax', 'tensorflow', 'keras') if x in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threaded_blocks_give_the_same_values_and_the_first_error(monkeypatch, rng, threads):
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 2 * 5)  # blocks of 2 rows of V = 5
    monkeypatch.setattr(blocks, "threads", lambda: threads)
    ref, cand = rng.normal(size=(21, 5)), rng.normal(size=(21, 5))
    one = TokenStats()
    monkeypatch.setattr(blocks, "threads", lambda: 1)
    one.update(ref, cand)
    monkeypatch.setattr(blocks, "threads", lambda: threads)
    many = TokenStats()
    many.update(ref, cand)
    assert many.report() == one.report()
    np.testing.assert_array_equal(many.values("kl"), one.values("kl"))
    bad = cand.copy()
    bad[19, 2] = np.nan  # in the last thread's span
    bad[5, 1] = np.nan  # in the first: this one must be named
    with pytest.raises(
        ValueError, match=r"contains 2 NaN values, the first in the token at index \(5,\)"
    ):
        TokenStats().update(ref, bad)


FORK_CHECK = """
import multiprocessing as mp
import numpy as np
from kldiv.metrics import TokenStats

def child(ref, cand):
    s = TokenStats()
    s.update(ref, cand)
    return s.report().num_tokens

if __name__ == "__main__":
    rng = np.random.default_rng(0)
    ref, cand = rng.normal(size=(2048, 300)), rng.normal(size=(2048, 300))
    TokenStats().update(ref, cand)  # the parent's thread pool now exists
    with mp.get_context("fork").Pool(1) as pool:
        print(pool.apply_async(child, (ref, cand)).get(timeout=60))
"""


def test_update_works_in_a_forked_child_after_the_pool_started(tmp_path):
    # In its own process: the test workers have JAX's threads running, and forking those is
    # what JAX warns about; the check here is only about kldiv's own pool.
    import subprocess
    import sys

    script = tmp_path / "fork_check.py"
    script.write_text(FORK_CHECK)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2048"


def test_stats_pickle_and_merge_across_processes(rng):
    import pickle

    a, b = TokenStats(), TokenStats()
    ref, cand = rng.normal(size=(10, 6)), rng.normal(size=(10, 6))
    a.update(ref[:4], cand[:4])
    b.update(ref[4:], cand[4:])
    merged = pickle.loads(pickle.dumps(a)).merge(pickle.loads(pickle.dumps(b)))
    one = TokenStats()
    one.update(ref, cand)
    assert merged.report() == one.report()
    merged.update(ref, cand)  # the restored lock works


def test_the_mean_of_huge_finite_kls_is_finite():
    """Ten tokens of KL ≈ 5.7e307 each (a candidate logit of −5.7e307 where the reference
    puts all its mass): their sum overflows float64, their mean (5.7e307) does not."""
    ref = np.tile([0.0, -math.inf], (10, 1))
    cand = np.tile([-5.7e307, 0.0], (10, 1))
    cand[::2, 0] = -5.6e307
    stats = TokenStats()
    stats.update(ref, cand, form="logits")
    r = stats.report()
    # KL = −log q where the reference's mass is: 5.6e307 and 5.7e307, five of each; every
    # deviation from the mean is ±0.05e307, so std(ddof=1) = 0.05e307·√(10/9) and the
    # standard error std/√10 = 0.05e307/3 (a naive variance would square 5.7e307: inf)
    assert r.kl_num_inf == 0 and r.kl_max == 5.7e307
    assert r.kl_mean == pytest.approx(5.65e307, rel=1e-15)
    assert r.kl_stderr == pytest.approx(0.05e307 / 3, rel=1e-12)


@pytest.mark.parametrize("dtype", ["uint64", "uint32", "int64"])
def test_labels_are_checked_in_their_own_dtype(dtype):
    """A uint64 label of 2**64 − 100 is out of range, not ignore_index = −100 after a cast."""
    ref = np.log(np.full((3, 4), 0.25))
    info = np.iinfo(dtype)
    big = info.max - 99 if info.min == 0 else info.max
    labels = np.array([1, big, 2], dtype=dtype)
    stats = TokenStats()
    with pytest.raises(ValueError, match=re.escape(f"got {big} at token index (1,)")):
        stats.update(ref, ref, form="log_probs", labels=labels)
    ok = np.array([1, 3, 2], dtype=dtype)
    stats.update(ref, ref, form="log_probs", labels=ok)
    assert stats.num_tokens == 3 and stats.num_ignored == 0
