"""kldiv.torch.metrics.TokenStatsMetric: the torchmetrics metric against TokenStats on the same
tokens (every form, float32, bfloat16 and float64, -inf logits, ignored labels holding NaN,
several updates of different batch shapes across step boundaries), reset, compute before any
update, the validation messages, and 2 Gloo ranks against one process.

    python tests/torch/test_torchmetrics.py RANK WORLD PORT CASES.pt OUT_DIR

runs one rank of the Gloo test (test_two_gloo_ranks_equal_one_process starts them).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kldiv.metrics import KLReport, TokenStats

V = 17
SHAPES = [(2, 3), (5,), (1, 1, 4)]  # the token shapes of successive updates

# --------------------------------------------------------------------------------------------
# Data, and the error bound the comparisons use


def to_form(logits: np.ndarray, form: str) -> np.ndarray:
    """Float64 logits as the given form (exact zero probabilities where a logit is -inf)."""
    if form == "logits":
        return logits
    m = np.max(logits, axis=-1, keepdims=True)
    lp = logits - m - np.log(np.sum(np.exp(logits - m), axis=-1, keepdims=True))
    return lp if form == "log_probs" else np.exp(lp)


def batch(rng: np.random.Generator, tokens: tuple[int, ...], forms, dtype, labels=True):
    """One update's ``ref``, ``cand`` and ``labels`` (or None): -inf logits shared by both
    models (terms that count 0), one token where only ``cand`` has a zero (KL = +inf), and
    with labels about a quarter of the tokens ignored, their rows NaN."""
    r = rng.normal(scale=3.0, size=(*tokens, V))
    c = r + rng.normal(scale=1.0, size=r.shape)
    shared = rng.random(r.shape) < 0.2
    shared[..., 0] = False  # every row keeps mass on both sides
    r[shared] = c[shared] = -np.inf
    flat_r, flat_c = r.reshape(-1, V), c.reshape(-1, V)
    flat_c[-1, 0] = -np.inf  # p > 0 = q: KL(ref‖cand) = +inf for the last token
    # labels on categories both models give mass to (finite perplexities)
    both = np.isfinite(flat_r) & np.isfinite(flat_c)
    lab = np.array([rng.choice(np.flatnonzero(row)) for row in both])
    if labels:
        ignored = rng.random(lab.size) < 0.25
        ignored[0], ignored[-1] = True, False  # one ignored at least; keep the +inf token
        lab[ignored] = -100
        flat_r[ignored] = np.nan  # ignored tokens are not read: they may hold anything
        flat_c[ignored & (rng.random(lab.size) < 0.5)] = np.nan
    ref = torch.from_numpy(to_form(r, forms[0])).to(dtype)
    cand = torch.from_numpy(to_form(c, forms[1])).to(dtype)
    return ref, cand, (torch.from_numpy(lab.reshape(tokens)) if labels else None)


def log_probs(x: torch.Tensor, form: str) -> np.ndarray:
    """Float64 log-probabilities of what the metric was given (after rounding to its dtype)."""
    a = x.double().numpy().reshape(-1, V)
    if form == "probs":
        with np.errstate(divide="ignore"):
            return np.log(a)
    return to_form(a, "log_probs") if form == "logits" else a


def bounds(batches, forms, eps: float) -> dict[str, np.ndarray]:
    """Per kept token, how far the metric's values may be from TokenStats' float64 ones.

    The metric computes in float32 (or float64) with unit roundoff ≤ eps. A log-probability
    (x − max) − log Σ exp(x − max) is off by at most eps·(2|lp| + log₂V + 3): |x − max| and
    log Σ are each ≤ |lp| and rounded once, the sum of V exps carries log₂V + 1 roundings.
    The kernels' KL, Σ p·(lp − lq) or Σ p·(b − a) − log z_t + log z_s with shifted logits
    |b − a| ≤ |lp − lq| + |lp| + |lq|, then is within c·Σ_v p·(1 + |lp| + |lq|)·(1 + |lp − lq|)
    with c = 2·(log₂V + 4)·eps, which also covers the error of p = exp(lp) (relative
    eps·(1 + |δlp|)) times |lp − lq|, the sum's log₂V roundings and the final rounding to the
    stored dtype. At the label y: nll within c·(1 + |lp_y|), Δp = q_y − p_y within
    c·(p_y·(1 + |lp_y|) + q_y·(1 + |lq_y|)). Tokens with KL = +inf must be +inf exactly.
    """
    c = 2 * (math.log2(V) + 4) * eps
    out: dict[str, list[np.ndarray]] = {"kl": [], "dp": [], "nll_ref": [], "nll_cand": []}
    for ref, cand, labels in batches:
        lp, lq = log_probs(ref, forms[0]), log_probs(cand, forms[1])
        keep = np.ones(lp.shape[0], bool) if labels is None else labels.numpy().reshape(-1) != -100
        lp, lq = lp[keep], lq[keep]
        p = np.exp(lp)
        with np.errstate(invalid="ignore"):
            mass = np.where(p > 0, p * (1 + abs(lp) + abs(lq)) * (1 + abs(lp - lq)), 0.0)
        out["kl"].append(c * mass.sum(-1))
        if labels is not None:
            y = labels.numpy().reshape(-1)[keep]
            ly_p, ly_q = lp[np.arange(y.size), y], lq[np.arange(y.size), y]
            out["nll_ref"].append(c * (1 + abs(ly_p)))
            out["nll_cand"].append(c * (1 + abs(ly_q)))
            out["dp"].append(c * (np.exp(ly_p) * (1 + abs(ly_p)) + np.exp(ly_q) * (1 + abs(ly_q))))
    return {k: np.concatenate(v) for k, v in out.items() if v}


def assert_values_close(got: TokenStats, want: TokenStats, tol: dict[str, np.ndarray]) -> None:
    """Per token, in update order: top-1 exactly, the rest within the bound (inf exactly)."""
    np.testing.assert_array_equal(got.values("top1"), want.values("top1"))
    for name, t in tol.items():
        g, w = got.values(name), want.values(name)
        assert g.shape == w.shape, name
        inf = np.isinf(w)
        np.testing.assert_array_equal(g[inf], w[inf], err_msg=name)
        err = np.abs(g[~inf] - w[~inf])
        assert (err <= t[~inf]).all(), (name, float(np.max(err / t[~inf])))


def assert_report_close(got: KLReport, want: KLReport, tol: dict[str, np.ndarray]) -> None:
    """The report from values each within t_i of the reference's: counts and top-1 exactly;
    means, order statistics (1-Lipschitz in the largest change) and standard errors (std is
    1-Lipschitz in the l2 norm, so se moves by ≤ max t·√(n/(n−1))/√n ≤ max t for n ≥ 2)
    within max t; a perplexity exp(mean nll) within a relative 2·max t (exp's slope, with room
    for the factor e^t ≈ 1); the log ratio, a difference of two means, within the sum."""
    exact = ["num_tokens", "num_ignored", "kl_num_inf", "top1_agreement", "top1_agreement_stderr"]
    for name in exact:
        assert getattr(got, name) == getattr(want, name), name
    assert got.has_labels == want.has_labels

    def close(name, a, b, atol=0.0, rtol=0.0):
        if b is None or math.isinf(b):
            assert a == b, name
        else:
            assert abs(a - b) <= atol + rtol * abs(b), (name, a, b, atol + rtol * abs(b))

    t_kl = float(tol["kl"].max())
    for name in ("kl_mean", "kl_stderr", "kl_max"):
        close(name, getattr(got, name), getattr(want, name), atol=t_kl)
    for q, v in want.kl_percentiles.items():
        close(f"kl {q}%", got.kl_percentiles[q], v, atol=t_kl)
    if not want.has_labels:
        return
    t_dp = float(tol["dp"].max())
    for name in ("dp_mean", "dp_stderr", "dp_rms", "dp_min", "dp_max"):
        close(name, getattr(got, name), getattr(want, name), atol=t_dp)
    for q, v in want.dp_percentiles.items():
        close(f"dp {q}%", got.dp_percentiles[q], v, atol=t_dp)
    t_r, t_c = float(tol["nll_ref"].max()), float(tol["nll_cand"].max())
    close("ppl_ref", got.ppl_ref, want.ppl_ref, rtol=2 * t_r)
    close("ppl_cand", got.ppl_cand, want.ppl_cand, rtol=2 * t_c)
    close("ln_ppl_ratio", got.ln_ppl_ratio, want.ln_ppl_ratio, atol=t_r + t_c)
    close("ppl_ratio", got.ppl_ratio, want.ppl_ratio, rtol=2 * (t_r + t_c))
    close("ln_ppl_ratio_stderr", got.ln_ppl_ratio_stderr, want.ln_ppl_ratio_stderr, atol=t_r + t_c)


def reference(batches, forms) -> TokenStats:
    stats = TokenStats()
    for ref, cand, labels in batches:
        stats.update(ref, cand, form=forms, labels=labels)
    return stats


# --------------------------------------------------------------------------------------------
# Against TokenStats


@pytest.fixture
def small_steps(monkeypatch):
    """Steps of 3 rows: the updates of 6, 5 and 4 tokens cross step boundaries."""
    from kldiv.torch import metrics

    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 3 * V)


CASES = [
    # (forms, input dtype, stored dtype): float32 work for all but the float64/float64 case
    (("logits", "logits"), torch.float32, None),
    (("logits", "logits"), torch.bfloat16, None),
    (("logits", "logits"), torch.float64, torch.float64),
    (("log_probs", "log_probs"), torch.float64, None),
    (("probs", "probs"), torch.float64, None),
    (("log_probs", "logits"), torch.float64, torch.float64),
]


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "no-labels"])
@pytest.mark.parametrize(("forms", "dtype", "store"), CASES, ids=lambda x: str(x))
def test_equals_token_stats_on_the_same_tokens(rng, small_steps, forms, dtype, store, labels):
    from kldiv.torch.metrics import TokenStatsMetric

    batches = [batch(rng, s, forms, dtype, labels) for s in SHAPES]
    metric = TokenStatsMetric(form=forms if forms[0] != forms[1] else forms[0])
    if store is not None:
        metric.set_dtype(store)
    for ref, cand, lab in batches:
        metric.update(ref, cand, lab)
    want = reference(batches, forms)
    precise = dtype == torch.float64 and store == torch.float64
    tol = bounds(batches, forms, 2.0**-53 if precise else 2.0**-24)
    assert_values_close(metric.token_stats(), want, tol)
    report = metric.compute()
    assert isinstance(report, KLReport)
    assert_report_close(report, want.report(), tol)
    assert report.kl_num_inf == 3 and report.num_ignored == want.num_ignored
    assert want.num_ignored >= 3 if labels else want.num_ignored == 0  # ≥ 1 per update


# CUDA where there is one (benchmarks/gpu_session.sh runs this file on a GPU)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_states_stay_on_the_device_and_equal_token_stats(rng, dtype):
    from kldiv.torch.metrics import TokenStatsMetric

    forms = ("logits", "logits")
    batches = [batch(rng, s, forms, dtype) for s in SHAPES]
    metric = TokenStatsMetric().to(DEVICE)
    for ref, cand, lab in batches:
        metric.update(ref.to(DEVICE), cand.to(DEVICE), lab.to(DEVICE))
    assert all(s.device.type == DEVICE for s in metric.kl + metric.dp)
    want = reference(batches, forms)
    tol = bounds(batches, forms, 2.0**-24)
    assert_values_close(metric.token_stats(), want, tol)
    assert_report_close(metric.compute(), want.report(), tol)


def test_per_token_values_do_not_depend_on_the_step_size(rng, monkeypatch):
    from kldiv.torch import metrics

    ref, cand, lab = batch(rng, (4, 5), ("logits", "logits"), torch.float32)
    got = []
    for rows in (1, 3, 20):
        monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", rows * V)
        m = metrics.TokenStatsMetric()
        m.update(ref, cand, lab)
        got.append(m.token_stats())
    for name in ("kl", "top1", "dp", "nll_ref", "nll_cand"):
        for s in got[1:]:
            np.testing.assert_array_equal(s.values(name), got[0].values(name))


def test_forward_returns_the_batch_report_and_accumulates(rng):
    from kldiv.torch.metrics import TokenStatsMetric

    batches = [batch(rng, s, ("logits", "logits"), torch.float32) for s in SHAPES[:2]]
    metric, alone = TokenStatsMetric(), TokenStatsMetric()
    first = metric(*batches[0])
    alone.update(*batches[0])
    assert first == alone.compute()
    metric(*batches[1])
    alone.update(*batches[1])
    assert metric.compute() == alone.compute()


def test_a_label_probability_zero_makes_the_perplexity_infinite_as_in_token_stats():
    from kldiv.torch.metrics import TokenStatsMetric

    ref = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0]])
    cand = torch.tensor([[0.5, -math.inf, 2.0], [1.0, 0.5, -1.0]])
    labels = torch.tensor([1, 0])  # cand gives the first label probability 0
    metric = TokenStatsMetric()
    metric.update(ref, cand, labels)
    stats = TokenStats()
    stats.update(ref, cand, labels=labels)
    got, want = metric.compute(), stats.report()
    assert got.ppl_cand == want.ppl_cand == math.inf
    assert got.ln_ppl_ratio == want.ln_ppl_ratio == math.inf
    assert got.kl_num_inf == want.kl_num_inf == 1


def test_identical_inputs_give_exact_zeros(rng):
    from kldiv.torch.metrics import TokenStatsMetric

    x = torch.from_numpy(rng.normal(size=(6, V))).float()
    metric = TokenStatsMetric()
    metric.update(x, x.clone(), torch.arange(6))
    r = metric.compute()
    assert r.kl_max == 0.0 and r.top1_agreement == 1.0 and r.dp_max == r.dp_min == 0.0
    assert r.ln_ppl_ratio == 0.0 and r.ppl_ratio == 1.0


# --------------------------------------------------------------------------------------------
# State: reset, compute before update, pickling


def test_reset_forgets_everything(rng):
    from kldiv.torch.metrics import TokenStatsMetric

    a = batch(rng, (3, 2), ("logits", "logits"), torch.float32)
    b = batch(rng, (3, 2), ("logits", "logits"), torch.float32, labels=False)
    metric = TokenStatsMetric()
    metric.update(*a)
    metric.compute()
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' warning
        with pytest.raises(ValueError, match=r"^No tokens to report on: call update\(\) first\.$"):
            metric.compute()
    metric.update(b[0][..., :5], b[1][..., :5])  # another V and no labels: a fresh start
    fresh = TokenStatsMetric()
    fresh.update(b[0][..., :5], b[1][..., :5])
    assert metric.compute() == fresh.compute()


def test_compute_without_tokens_raises_as_token_stats_does():
    from kldiv.torch.metrics import TokenStatsMetric

    metric = TokenStatsMetric()
    with pytest.warns(UserWarning), pytest.raises(ValueError) as got:
        metric.compute()
    with pytest.raises(ValueError) as want:
        TokenStats().report()
    assert str(got.value) == str(want.value)
    x = torch.zeros(2, 4, 3)
    labels = torch.full((2, 4), -7)
    metric = TokenStatsMetric(ignore_index=-7)
    metric.update(x, x, labels)
    stats = TokenStats()
    stats.update(x, x, labels=labels, ignore_index=-7)
    with pytest.raises(ValueError) as got:
        metric.compute()
    with pytest.raises(ValueError) as want:
        stats.report()
    assert (
        str(got.value)
        == str(want.value)
        == ("No tokens to report on: all 8 tokens seen had labels == ignore_index.")
    )


def test_states_are_per_token_vectors_on_the_inputs_device(rng):
    from kldiv.torch.metrics import TokenStatsMetric

    ref, cand, lab = batch(rng, (2, 3), ("logits", "logits"), torch.float32)
    metric = TokenStatsMetric()
    metric.update(ref, cand, lab)
    for name in ("kl", "top1", "keep", "dp", "nll_ref", "nll_cand"):
        (state,) = getattr(metric, name)
        dtype = torch.bool if name in ("top1", "keep") else torch.float32
        assert state.shape == (6,) and state.dtype == dtype and state.device == ref.device
    assert metric.vocab[0].dtype == torch.int64 and metric.vocab[0].tolist() == [V]
    assert repr(metric) == "TokenStatsMetric(form='logits', ignore_index=-100, validate_args=True)"


def test_pickled_metric_keeps_accumulating(rng):
    import pickle

    from kldiv.torch.metrics import TokenStatsMetric

    a, b = (batch(rng, (2, 2), ("logits", "logits"), torch.float32) for _ in range(2))
    metric = TokenStatsMetric()
    metric.update(*a)
    copy = pickle.loads(pickle.dumps(metric))
    for m in (metric, copy):
        m.update(*b)
    assert copy.compute() == metric.compute()


# --------------------------------------------------------------------------------------------
# Validation: TokenStats' messages


def error_of(fn):
    with pytest.raises((TypeError, ValueError)) as e:
        fn()
    return e.type, str(e.value)


def good(n=2, v=4):
    return torch.zeros(n, v), torch.zeros(n, v)


BAD = {
    "int ref": ((torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 4)), {}),
    "0-d": ((torch.tensor(1.0), torch.tensor(1.0)), {}),
    "shapes": ((torch.zeros(2, 4), torch.zeros(2, 5)), {}),
    "no categories": ((torch.zeros(2, 0), torch.zeros(2, 0)), {}),
    "no tokens": ((torch.zeros(0, 4), torch.zeros(0, 4)), {}),
    "float labels": (good(), {"labels": torch.zeros(2)}),
    "bool labels": (good(), {"labels": torch.zeros(2, dtype=torch.bool)}),
    "label shape": (good(), {"labels": torch.zeros(3, dtype=torch.int64)}),
    "label range": (good(), {"labels": torch.tensor([1, 4])}),
    "negative label": (good(), {"labels": torch.tensor([-1, -100])}),
    "nan": ((torch.tensor([[0.0, 1.0], [math.nan, math.nan]]), torch.zeros(2, 2)), {}),
    "nan with labels": (
        (torch.zeros(3, 2), torch.tensor([[0.0, 1.0], [math.nan, 0.0], [0.0, math.nan]])),
        {"labels": torch.tensor([0, 1, 1])},
    ),
    "+inf logit": ((torch.zeros(2, 3), torch.tensor([[0.0, 1.0, 2.0], [0.0, math.inf, 0.0]])), {}),
    "all -inf": ((torch.tensor([[0.0, 1.0], [-math.inf, -math.inf]]), torch.zeros(2, 2)), {}),
}
BAD_FORMS = {
    "negative probs": ("probs", torch.tensor([[0.5, 0.5], [1.5, -0.5]])),
    "probs sum": ("probs", torch.tensor([[0.5, 0.5], [0.5, 0.6]])),
    "log_probs > 0": ("log_probs", torch.tensor([[-0.1, 0.1], [0.0, -math.inf]])),
    "log_probs sum": ("log_probs", torch.tensor([[math.log(0.5)] * 2, [math.log(0.6)] * 2])),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_inputs_raise_token_stats_messages(case):
    from kldiv.torch.metrics import TokenStatsMetric

    args, kw = BAD[case]
    metric = TokenStatsMetric()
    got = error_of(lambda: metric.update(*args, **kw))
    want = error_of(lambda: TokenStats().update(*args, **kw))
    assert got == want
    assert not metric.kl and not metric.keep  # a failed update adds nothing


@pytest.mark.parametrize("case", list(BAD_FORMS))
def test_invalid_distributions_raise_token_stats_messages(case):
    from kldiv.torch.metrics import TokenStatsMetric

    form, x = BAD_FORMS[case]
    ok = torch.full_like(x, 0.5) if form == "probs" else torch.full_like(x, math.log(0.5))
    for args in ((x, ok), (ok, x)):
        got = error_of(lambda a=args: TokenStatsMetric(form).update(*a))
        want = error_of(lambda a=args: TokenStats().update(*a, form=form))
        assert got == want


def test_consistency_between_updates_and_other_errors():
    from kldiv.torch.metrics import TokenStatsMetric

    x = torch.zeros(2, 4)
    metric = TokenStatsMetric()
    metric.update(x, x)
    stats = TokenStats()
    stats.update(x, x)
    for args, kw in (((torch.zeros(2, 5),) * 2, {}), ((x, x), {"labels": torch.tensor([0, 1])})):
        got = error_of(lambda a=args, k=kw: metric.update(*a, **k))
        kind, message = error_of(lambda a=args, k=kw: stats.update(*a, **k))
        assert got == (kind, message.replace("a separate TokenStats", "a separate metric"))
    metric = TokenStatsMetric()
    metric.update(x, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^Expected `labels` in this update: earlier updates"):
        metric.update(x, x)
    with pytest.raises(TypeError, match=r"^Expected `ref` to be a torch.Tensor, got ndarray"):
        metric.update(np.zeros((2, 4)), x)
    with pytest.raises(ValueError, match=r"^Expected `form`"):
        TokenStatsMetric("logit")
    with pytest.raises(TypeError, match=r"^Expected `ignore_index` to be an int, got 1.5\.$"):
        TokenStatsMetric(ignore_index=1.5)


def test_without_validation_nothing_is_checked_and_valid_inputs_agree(rng):
    from kldiv.torch.metrics import TokenStatsMetric

    ref, cand, lab = batch(rng, (3, 4), ("logits", "logits"), torch.float32)
    checked, unchecked = TokenStatsMetric(), TokenStatsMetric(validate_args=False)
    for m in (checked, unchecked):
        m.update(ref, cand, lab)
    assert checked.compute() == unchecked.compute()
    lab = lab.clone()
    lab[lab != -100] = V + 3  # out of range: read as 0, no error and no device assert
    unchecked.update(ref, cand, lab)


def test_docstring_example_runs():
    import doctest

    from kldiv.torch import metrics

    result = doctest.testmod(metrics, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


def test_import_kldiv_torch_does_not_import_torchmetrics():
    code = "import sys, kldiv, kldiv.torch, kldiv.metrics; assert 'torchmetrics' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# Labels compared by value, whatever their dtype


def assert_same_tokens(got: TokenStats, want: TokenStats) -> None:
    """The same kept and ignored tokens, with the values within float32 rounding."""
    assert (got.num_tokens, got.num_ignored) == (want.num_tokens, want.num_ignored)
    assert got.vocab_size == want.vocab_size
    np.testing.assert_array_equal(got.values("top1"), want.values("top1"))
    for name in ("kl", "dp", "nll_ref", "nll_cand"):
        np.testing.assert_allclose(got.values(name), want.values(name), rtol=1e-5, atol=1e-5)


def labelled(rng, v: int, labels: np.ndarray):
    ref = torch.from_numpy(rng.normal(size=(labels.size, v))).float()
    return ref, ref + 0.1 * torch.from_numpy(rng.normal(size=ref.shape)).float()


NARROW = {
    # labels, V, ignore_index: a comparison in the labels' own dtype wraps the other operand
    "uint8 156 is not -100": (np.array([156, 0, 155], np.uint8), 300, -100),
    "uint8 vs V=300": (np.array([255, 299 - 44, 7], np.uint8), 300, -100),
    "int16 vs V=40000": (np.array([30000, 4464, 1], np.int16), 40000, -100),
    "int16 4464 is not 70000": (np.array([4464, 4, 5], np.int16), 5000, 70000),
    "uint16": (np.array([65535, 3, 2], np.uint16), 70000, -100),
    "uint64 ignore_index 2**64-1": (np.array([2**64 - 1, 3, 2], np.uint64), 5, 2**64 - 1),
    "ignore_index beyond int64": (np.array([4, 3, 2]), 5, 2**70),
}


@pytest.mark.parametrize("validate", [True, False], ids=["validate", "no-validate"])
@pytest.mark.parametrize("case", list(NARROW))
def test_narrow_labels_are_compared_by_value_as_token_stats_does(rng, case, validate):
    from kldiv.torch.metrics import TokenStatsMetric

    labels, v, ignore = NARROW[case]
    ref, cand = labelled(rng, v, labels)
    lab = torch.from_numpy(labels)
    metric = TokenStatsMetric(ignore_index=ignore, validate_args=validate)
    metric.update(ref, cand, lab)
    want = TokenStats()
    want.update(ref, cand, labels=lab, ignore_index=ignore)
    assert_same_tokens(metric.token_stats(), want)
    assert metric.compute() == metric.token_stats().report()


def test_uint64_labels_beyond_int64_are_out_of_range_as_in_token_stats(rng):
    from kldiv.torch.metrics import TokenStatsMetric

    ref, cand = labelled(rng, 4, np.zeros(3))
    for big in (2**64 - 100, 2**63):  # -100 and -2**63 in int64 bits
        lab = torch.from_numpy(np.array([1, big, 2], np.uint64))
        got = error_of(lambda lab=lab: TokenStatsMetric().update(ref, cand, lab))
        want = error_of(lambda lab=lab: TokenStats().update(ref, cand, labels=lab))
        assert got == want and f"got {big} at token index (1,)" in got[1]
        unchecked = TokenStatsMetric(validate_args=False)  # read as label 0, not ignored
        unchecked.update(ref, cand, lab)
        assert unchecked.token_stats().num_ignored == 0


# --------------------------------------------------------------------------------------------
# forward, load_state_dict, merge_state and set_dtype keep the accumulated tokens consistent


def two_updates(rng, v=30):
    """A metric after two updates of 20 labelled tokens each, and its report."""
    from kldiv.torch.metrics import TokenStatsMetric

    metric = TokenStatsMetric()
    for _ in range(2):
        ref = torch.from_numpy(rng.normal(size=(4, 5, v))).float()
        metric.update(ref, ref + 0.1, torch.from_numpy(rng.integers(0, v, (4, 5))))
    return metric, metric.compute()


FAILING_FORWARDS = {
    # the batch raises in update (checked against the accumulated tokens) or in compute
    "all ignored": (torch.zeros(2, 3, 30), torch.zeros(2, 3, 30), torch.full((2, 3), -100)),
    "NaN": (torch.full((2, 30), math.nan), torch.zeros(2, 30), torch.zeros(2, dtype=torch.long)),
    "another V": (torch.zeros(2, 20), torch.zeros(2, 20), torch.zeros(2, dtype=torch.long)),
    "no labels": (torch.zeros(2, 30), torch.zeros(2, 30), None),
    "label range": (torch.zeros(2, 30), torch.zeros(2, 30), torch.tensor([0, 30])),
}


@pytest.mark.parametrize("case", list(FAILING_FORWARDS))
def test_a_failed_forward_keeps_the_accumulated_tokens(rng, case):
    metric, before = two_updates(rng)
    count = metric.update_count
    with pytest.raises(ValueError) as e:
        metric(*FAILING_FORWARDS[case])
    if case == "another V":
        assert str(e.value).startswith("Expected 30 categories (as in earlier updates), got 20")
    assert metric.compute() == before and before.num_tokens == 40
    assert metric.update_count == count
    assert metric._to_sync == metric.sync_on_compute and not metric._is_synced
    ok = torch.zeros(3, 30), torch.zeros(3, 30), torch.tensor([1, -100, 2])
    batch_report = metric(*ok)  # later calls work as before
    assert batch_report.num_tokens == 2 and batch_report.num_ignored == 1
    assert metric.compute().num_tokens == 42 and metric.update_count == count + 1


def test_a_failed_update_is_not_counted(rng):
    metric, _ = two_updates(rng)
    with pytest.raises(ValueError):
        metric.update(torch.zeros(2, 20), torch.zeros(2, 20), torch.zeros(2, dtype=torch.long))
    assert metric.update_count == 2


def test_forward_with_dist_sync_on_step_and_compute_on_cpu_accumulates(rng):
    from kldiv.torch.metrics import TokenStatsMetric

    batches = [batch(rng, s, ("logits", "logits"), torch.float32) for s in SHAPES]
    metric = TokenStatsMetric(dist_sync_on_step=True, compute_on_cpu=True)
    alone = TokenStatsMetric()
    for b in batches:
        one = TokenStatsMetric()
        one.update(*b)
        assert metric(*b) == one.compute()
        alone.update(*b)
    assert metric.compute() == alone.compute()


def test_load_state_dict_restores_the_checks(rng):
    from kldiv.torch.metrics import TokenStatsMetric

    metric, before = two_updates(rng)
    metric.persistent(True)
    loaded = TokenStatsMetric()
    loaded.load_state_dict(metric.state_dict())
    assert loaded.compute() == before
    x20, x30 = torch.zeros(2, 20), torch.zeros(2, 30)
    with pytest.raises(ValueError, match=r"^Expected 30 categories \(as in earlier updates\)"):
        loaded.update(x20, x20, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^Expected `labels` in this update"):
        loaded.update(x30, x30)
    with pytest.raises(ValueError, match=r"^Expected 30 categories"):
        loaded(x20, x20, torch.zeros(2, dtype=torch.long))
    assert loaded.compute() == before
    # inconsistent states are refused, and the metric is left as it was
    bad = metric.state_dict()
    bad["vocab"] = [torch.tensor([30]), torch.tensor([20])]
    with pytest.raises(RuntimeError, match="the vocabularies differ"):
        loaded.load_state_dict(bad)
    bad = metric.state_dict()
    bad["keep"] = bad["keep"][:1]
    with pytest.raises(RuntimeError, match="with labels and statistics without labels"):
        loaded.load_state_dict(bad)
    assert loaded.compute() == before
    empty = TokenStatsMetric()
    empty.persistent(True)
    loaded.load_state_dict(empty.state_dict())  # an empty metric: any V and labels again
    loaded.update(x20, x20)
    assert loaded.compute().num_tokens == 2


def test_merge_state_checks_like_token_stats_merge(rng):
    from kldiv.torch.metrics import TokenStatsMetric

    metric, before = two_updates(rng)
    for other_args in ((torch.zeros(2, 20), torch.zeros(2, 20)), (torch.zeros(2, 30),) * 2):
        other = TokenStatsMetric()
        other.update(*other_args)
        with pytest.raises(ValueError, match="^Cannot merge statistics"):
            metric.merge_state(other)
        assert metric.compute() == before
    other, _ = two_updates(rng)
    metric.merge_state(other)
    assert metric.compute().num_tokens == 80


@pytest.mark.parametrize("v", [50257, 151936])
def test_set_dtype_to_half_keeps_the_vocabulary_size(rng, v):
    from kldiv.torch.metrics import TokenStatsMetric

    x = torch.from_numpy(rng.normal(size=(2, v))).float()
    labels = torch.tensor([0, v - 1])
    metric = TokenStatsMetric()
    metric.update(x, x + 0.01, labels)
    metric.set_dtype(torch.float16)  # converts the stored values, not the bookkeeping
    metric.update(x, x + 0.01, labels)
    metric.set_dtype(torch.bfloat16)
    metric.update(x, x + 0.01, labels)
    assert [t.dtype for t in metric.kl] == [torch.bfloat16] * 3
    assert [t.dtype for t in metric.vocab] == [torch.int64] * 3
    assert [t.dtype for t in metric.top1 + metric.keep] == [torch.bool] * 6
    stats = metric.token_stats()
    assert stats.vocab_size == v and stats.num_tokens == 6
    assert metric.compute().top1_agreement == 1.0


@pytest.mark.parametrize("store", [None, torch.bfloat16, torch.float16])
def test_values_at_the_edges_of_their_domains_reach_the_report(store):
    """bfloat16 probabilities may sum to 1 + 4·2⁻⁷: a label probability 1 + 2⁻⁷ gives a
    negative NLL and Δp > 1, which TokenStats.from_values accepts in compute()."""
    from kldiv.torch.metrics import TokenStatsMetric

    ref = torch.tensor([[1 + 2.0**-7, 0.0], [0.0, 1.0]], dtype=torch.bfloat16)
    cand = torch.tensor([[1.0, 0.0], [1 + 2.0**-7, 0.0]], dtype=torch.bfloat16)
    metric = TokenStatsMetric("probs")
    if store is not None:
        metric.set_dtype(store)
    metric.update(ref, cand, torch.tensor([0, 0]))
    stats = TokenStats()
    stats.update(ref, cand, form="probs", labels=torch.tensor([0, 0]))
    got, want = metric.compute(), stats.report()
    assert got.dp_max == want.dp_max == 1 + 2.0**-7 and got.kl_num_inf == 1


def test_without_validation_nan_values_fail_in_compute():
    from kldiv.torch.metrics import TokenStatsMetric

    metric = TokenStatsMetric(validate_args=False)
    metric.update(torch.tensor([[0.0, math.nan]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"^Expected `values\['kl'\]` to hold KL divergences"):
        metric.compute()


def test_float64_inputs_resolve_tiny_kl_that_float32_cannot(rng):
    """The float32 error is absolute (bounds() above): a per-token KL of ~1e-9 has no correct
    digit from float32 logits; the same numbers as float64 inputs are computed in float64
    (stored in float32 by default, relative 2⁻²⁴), and set_dtype(torch.float64) alone does
    not help."""
    from kldiv.torch.metrics import TokenStatsMetric

    # float32 numbers, so that both kinds of input hold the same distributions
    ref = torch.from_numpy(3 * rng.normal(size=(64, V))).float().double()
    cand = (ref + 1e-4 * torch.from_numpy(rng.normal(size=ref.shape))).float().double()
    want = TokenStats()
    want.update(ref, cand)
    w = want.values("kl")
    assert 1e-10 < np.median(w) < 1e-8

    def kl(r, c, store=None):
        m = TokenStatsMetric()
        if store is not None:
            m.set_dtype(store)
        m.update(r, c)
        return m.token_stats().values("kl")

    for store in (None, torch.float64):
        assert np.max(np.abs(kl(ref, cand, store) - w) / w) < 1e-3
        err = np.abs(kl(ref.float(), cand.float(), store) - w)
        assert np.max(err / w) > 1  # not even the first digit for some tokens
        tol = bounds([(ref.float(), cand.float(), None)], ("logits", "logits"), 2.0**-24)["kl"]
        assert (err <= tol).all()  # but within the absolute bound


# --------------------------------------------------------------------------------------------
# Two Gloo ranks


def rank_main(rank: int, world: int, port: int, cases_path: str, out: str) -> None:
    """One rank: for each case, update with this rank's batches, then compute and gather."""
    import torch.distributed as dist

    from kldiv.torch.metrics import TokenStatsMetric

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    results = {}
    for name, case in torch.load(cases_path, weights_only=False).items():
        metric = TokenStatsMetric(form=case["form"])
        for ref, cand, labels in case["ranks"][rank]:
            metric.update(ref, cand, labels)
        try:
            report = metric.compute()
            stats = metric.token_stats()
            results[name] = {
                "report": report.to_dict(),
                "values": {k: stats.values(k) for k in ("kl", "top1", "dp", "nll_ref", "nll_cand")},
                "local": len(metric.kl),  # the rank's own states are back after compute
            }
        except ValueError as e:
            results[name] = {"error": str(e)}
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def launch(world: int, tmp: Path, cases: dict, timeout: float = 90) -> list[dict]:
    """Every rank's results (reports and error strings, hence trusted) of every case."""
    import gloo  # here: this file is also the ranks' script, run without tests/ on the path

    return gloo.launch(__file__, world, tmp, cases, timeout, trusted=True)


@pytest.mark.spawns
def test_two_gloo_ranks_equal_one_process(rng, tmp_path):
    """Each rank updates with its share of the tokens (uneven, in different batch shapes; in
    one case a rank has none); compute() on every rank equals TokenStats over all tokens
    within the bound above, and a single-process metric over all tokens exactly (per-token
    values do not depend on the batch, and the report is order-independent)."""
    from kldiv.torch.metrics import TokenStatsMetric

    forms = ("logits", "logits")
    labelled = [batch(rng, s, forms, torch.float32) for s in SHAPES]
    plain = [batch(rng, s, forms, torch.float32, labels=False) for s in SHAPES[:2]]
    lp = ("log_probs", "log_probs")
    logp = [batch(rng, s, lp, torch.float64) for s in SHAPES[1:]]
    cases = {
        "labels": {"form": "logits", "ranks": [labelled[:2], labelled[2:]]},
        "no labels": {"form": "logits", "ranks": [plain[1:], plain[:1]]},
        "log_probs": {"form": "log_probs", "ranks": [logp[:1], logp[1:]]},
        "idle rank": {"form": "logits", "ranks": [labelled, []]},
        "labels on one rank": {"form": "logits", "ranks": [labelled[:1], plain[:1]]},
        "two vocabularies": {
            "form": "logits",
            "ranks": [plain[:1], [tuple(x[..., :5] if x is not None else x for x in plain[1])]],
        },
    }
    results = launch(2, tmp_path, cases)
    for name, case in cases.items():
        order = case["ranks"][0] + case["ranks"][1]
        if name in ("labels on one rank", "two vocabularies"):
            merged = [
                reference(rank_batches, (case["form"],) * 2) for rank_batches in case["ranks"]
            ]
            with pytest.raises(ValueError) as want:
                merged[0].merge(merged[1])
            for r in range(2):
                assert results[r][name] == {"error": str(want.value)}, (name, r)
            continue
        fs = (case["form"],) * 2
        want = reference(order, fs)
        tol = bounds(order, fs, 2.0**-24)
        single = TokenStatsMetric(form=case["form"])
        for b in order:
            single.update(*b)
        for r in range(2):
            got = results[r][name]
            report = KLReport.from_dict(got["report"])
            assert report == single.compute(), (name, r)
            assert_report_close(report, want.report(), tol)
            for k, v in got["values"].items():  # gathered in rank order: rank 0's tokens first
                np.testing.assert_array_equal(v, single.token_stats().values(k), err_msg=name)
            assert got["local"] == len(case["ranks"][r]), (name, r)


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
