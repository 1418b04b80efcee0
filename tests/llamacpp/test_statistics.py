"""The statistics: llama.cpp's parity mode (kldiv.llamacpp.ParityStats) against an independent
element-by-element implementation of its conventions written here, and the exact extra
statistics (kldiv.metrics.extended) against independent float64 computations."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from reference import kl as ref_kl
from reference import log_softmax_row
from reference import tv as ref_tv

from kldiv.llamacpp import ParityStats, parity_token_values, quantize_rows
from kldiv.metrics import TokenStats
from kldiv.metrics.extended import extended_report, token_divergences

pytestmark = pytest.mark.seeded

F32 = np.float32
EPS64 = float(np.finfo(np.float64).eps)


# --------------------------------------------------------------------------------------------
# llama.cpp's conventions, one value at a time


def ref_parity_row(scale, mn, q, x, tok):
    """(kld, Δp, nll, nll_base, same_top) of one row, as `--kl-divergence` computes them:
    float32 arithmetic, exp rounded to float32, sums in float64, entries of the base at or
    below −16 left out of the KL, first maxima."""
    x = [F32(v) for v in x]
    top = max(x)
    imax = x.index(top)
    s = 0.0
    for v in x:
        s += float(F32(math.exp(float(F32(v - top)))))
    lse = F32(math.log(s))
    shift = F32(top + lse)
    nll = F32(shift - x[tok])
    base = [F32(F32(F32(scale) * F32(k)) + F32(mn)) for k in q]
    nll_base = -base[tok]
    kld = 0.0
    for b, v in zip(base, x, strict=True):
        if b > F32(-16):
            pb = F32(math.exp(float(b)))
            kld += float(F32(pb * F32(F32(b - v) + shift)))
    same = imax == base.index(max(base))
    dp = F32(F32(math.exp(float(-nll))) - F32(math.exp(float(-nll_base))))
    return kld, float(dp), float(nll), float(nll_base), same


def ref_mean_unc(s, s2, n):
    f = s / n
    df = s2 / n - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def ref_percentile(sorted_f32, fraction):
    p = F32(fraction) * F32(len(sorted_f32) - 1)
    i = int(p)
    p = F32(p - F32(i))
    return float(F32(F32(1) - p) * sorted_f32[i] + p * sorted_f32[min(i + 1, len(sorted_f32) - 1)])


def data(rng, n_rows, n_vocab, noise):
    ref = (rng.standard_normal((n_rows, n_vocab)) * 3).astype(np.float32)
    cand = (ref + noise * rng.standard_normal((n_rows, n_vocab))).astype(np.float32)
    labels = rng.integers(0, n_vocab, n_rows)
    return ref, cand, labels


def test_parity_token_values_follow_llama_cpp(rng):
    ref, cand, labels = data(rng, 40, 33, 0.3)
    ref[3] = 0.5  # a flat base row (scale 0)
    cand[4, 7] = cand[4].max() + 1  # a clear candidate top
    rows = quantize_rows(ref)
    got = parity_token_values(rows, cand, labels)
    for r in range(40):
        kld, dp, nll, nll_b, same = ref_parity_row(
            rows.scale[r], rows.min_log_prob[r], rows.q[r].tolist(), cand[r], labels[r]
        )
        # the KL terms are the same float32 values; only the order of the float64 sum differs
        terms = 33 * (abs(kld) + 1.0)
        assert abs(got.kld[r] - kld) <= 33 * EPS64 * terms
        assert (float(got.p_diff[r]), float(got.nll[r]), float(got.nll_base[r])) == (dp, nll, nll_b)
        assert bool(got.same_top[r]) == same


@pytest.mark.parametrize("n_rows", [150, 9, 11])
def test_parity_report_follows_llama_cpp(rng, n_rows):
    ref, cand, labels = data(rng, n_rows, 29, 0.2)
    rows = quantize_rows(ref)
    stats = ParityStats()
    half = n_rows // 2
    for sl in (slice(0, half), slice(half, n_rows)):
        sub = type(rows)(rows.scale[sl], rows.min_log_prob[sl], rows.q[sl])
        stats.update(sub, cand[sl], labels[sl])
    rep = stats.report()
    vals = [
        ref_parity_row(rows.scale[r], rows.min_log_prob[r], rows.q[r].tolist(), cand[r], labels[r])
        for r in range(n_rows)
    ]
    kld = [v[0] for v in vals]
    dp = [F32(v[1]) for v in vals]
    nll = [F32(v[2]) for v in vals]
    nb = [F32(v[3]) for v in vals]
    n = n_rows
    s_nll, s_nll2 = sum(map(float, nll)), sum(float(F32(a * a)) for a in nll)
    s_b, s_b2 = sum(map(float, nb)), sum(float(F32(a * a)) for a in nb)
    s_nb = sum(float(F32(a * b)) for a, b in zip(nll, nb, strict=True))
    lp, lpb = ref_mean_unc(s_nll, s_nll2, n), ref_mean_unc(s_b, s_b2, n)
    cov = 0.0 if n < 10 else (s_nb / n - (s_nll / n) * (s_b / n)) / (n - 1)
    dp2 = [float(F32(d * d)) for d in dp]
    mse = ref_mean_unc(sum(dp2), sum(d * d for d in dp2), n)
    same = sum(v[4] for v in vals) / n
    want = {
        "ppl_cand": (math.exp(lp[0]), math.exp(lp[0]) * lp[1]),
        "ppl_base": (math.exp(lpb[0]), math.exp(lpb[0]) * lpb[1]),
        "ln_ppl_ratio": (lp[0] - lpb[0], math.sqrt(lp[1] ** 2 + lpb[1] ** 2 - 2 * cov)),
        "kld_mean": ref_mean_unc(sum(kld), sum(k * k for k in kld), n),
        "dp_mean": ref_mean_unc(sum(map(float, dp)), sum(dp2), n),
        "dp_rms": (math.sqrt(mse[0]), 0.5 / math.sqrt(mse[0]) * mse[1]),
        "same_top": (same, math.sqrt(same * (1 - same) / (n - 1))),
    }
    # Bound: every sum differs from the sequential one only in order, by at most
    # n·eps64·Σ|x|; a variance E[x²] − E[x]² loses up to that relative to E[x²]. 1e-9 relative
    # (or 1e-12 absolute) is far above n·eps64 = 3e-14 times the cancellation E[x²]/var here.
    for name, (value, unc) in want.items():
        got = getattr(rep, name)
        assert got[0] == pytest.approx(value, rel=1e-9, abs=1e-12), name
        assert got[1] == pytest.approx(unc, rel=1e-9, abs=1e-12), name
    if n <= 10:
        assert rep.kld_mean[1] == 0 and rep.ppl_cand[1] == 0  # llama.cpp's rule: no uncertainty
    ks = sorted(F32(k) for k in kld)
    ds = sorted(dp)
    for key, frac in (("99.9", 0.999), ("90.0", 0.9), ("1.0", 0.01)):
        assert rep.kld_percentiles[key] == pytest.approx(ref_percentile(ks, frac), abs=1e-7)
    for key, frac in (("75.0", 0.75), ("25.0", 0.25), ("5.0", 0.05)):
        assert rep.dp_percentiles[key] == ref_percentile(ds, frac)
    mid = ds[n // 2] if n % 2 else F32(F32(0.5) * (ds[n // 2] + ds[n // 2 - 1]))
    assert rep.dp_percentiles["median"] == float(mid)
    assert rep.kld_percentiles["min"] == pytest.approx(float(ks[0]), abs=1e-7)
    assert rep.dp_percentiles["max"] == float(ds[-1])
    assert rep.num_tokens == n == stats.count


def test_parity_checks_shapes(rng):
    ref, cand, labels = data(rng, 4, 6, 0.1)
    with pytest.raises(ValueError, match="candidate logits of shape"):
        parity_token_values(quantize_rows(ref), cand[:, :5], labels)
    with pytest.raises(ValueError, match="call update"):
        ParityStats().report()


# --------------------------------------------------------------------------------------------
# The exact extra statistics


def test_extended_report_against_float64(rng):
    ref, cand, labels = data(rng, 120, 17, 0.4)
    ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
    stats = TokenStats()
    rkl, tv = [], []
    for sl in (slice(0, 50), slice(50, 120)):
        stats.update(ref64[sl], cand64[sl], labels=labels[sl])
        a, b = token_divergences(ref64[sl], cand64[sl])
        rkl.append(a)
        tv.append(b)
    ext = extended_report(stats, np.concatenate(rkl), np.concatenate(tv))
    # independent per-token values: float64 rows, math.log/fsum (tests/reference.py)
    P = [[math.exp(v) for v in log_softmax_row(r)] for r in ref64.tolist()]
    Q = [[math.exp(v) for v in log_softmax_row(r)] for r in cand64.tolist()]
    kl = [ref_kl(p, q) for p, q in zip(P, Q, strict=True)]
    rk = [ref_kl(q, p) for p, q in zip(P, Q, strict=True)]
    tvs = [ref_tv(p, q) for p, q in zip(P, Q, strict=True)]
    nr = [-math.log(p[y]) for p, y in zip(P, labels, strict=True)]
    nc = [-math.log(q[y]) for q, y in zip(Q, labels, strict=True)]
    dp = [q[y] - p[y] for p, q, y in zip(P, Q, labels, strict=True)]
    n = len(kl)
    # Bound: per-token values agree to ~V·eps64 relative (sums of 17 terms), and every
    # statistic is a smooth function of means of them: 1e-9 relative is ample.
    tol = {"rel": 1e-9, "abs": 1e-12}
    assert ext.kl_min == pytest.approx(min(kl), **tol)
    assert ext.reverse_kl_mean == pytest.approx(statistics.fmean(rk), **tol)
    assert ext.reverse_kl_stderr == pytest.approx(statistics.stdev(rk) / math.sqrt(n), **tol)
    assert ext.reverse_kl_max == pytest.approx(max(rk), **tol)
    assert ext.tv_mean == pytest.approx(statistics.fmean(tvs), **tol)
    assert ext.acceptance == pytest.approx(
        statistics.fmean(
            math.fsum(min(a, b) for a, b in zip(p, q, strict=True))
            for p, q in zip(P, Q, strict=True)
        ),
        **tol,
    )
    s = sorted(dp)
    for qq in (25.0, 75.0):
        pos = (n - 1) * qq / 100
        lo = math.floor(pos)
        want = s[lo] + (s[min(lo + 1, n - 1)] - s[lo]) * (pos - lo)
        assert ext.dp_quartiles[qq] == pytest.approx(want, **tol)
    sq = [d * d for d in dp]
    rms = math.sqrt(statistics.fmean(sq))
    assert ext.dp_rms_stderr == pytest.approx(
        statistics.stdev(sq) / math.sqrt(n) / (2 * rms), **tol
    )
    mr, mc = statistics.fmean(nr), statistics.fmean(nc)
    se_r, se_c = statistics.stdev(nr) / math.sqrt(n), statistics.stdev(nc) / math.sqrt(n)
    assert ext.ppl_ref_stderr == pytest.approx(math.exp(mr) * se_r, **tol)
    assert ext.ppl_cand_stderr == pytest.approx(math.exp(mc) * se_c, **tol)
    diff = [c - r for c, r in zip(nc, nr, strict=True)]
    assert ext.ppl_ratio_stderr == pytest.approx(
        math.exp(mc - mr) * statistics.stdev(diff) / math.sqrt(n), **tol
    )
    cov = math.fsum((a - mc) * (b - mr) for a, b in zip(nc, nr, strict=True)) / (n - 1)
    assert ext.nll_correlation == pytest.approx(
        cov / (statistics.stdev(nr) * statistics.stdev(nc)), **tol
    )
    assert ext.ppl_diff == pytest.approx(math.exp(mc) - math.exp(mr), **tol)
    var = (math.exp(mc) * se_c) ** 2 + (math.exp(mr) * se_r) ** 2
    var -= 2 * math.exp(mc) * math.exp(mr) * cov / n
    assert ext.ppl_diff_stderr == pytest.approx(math.sqrt(var), **tol)


def test_extended_report_edge_cases():
    ref = np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    stats = TokenStats()
    stats.update(ref, ref, labels=np.array([0, 1]))
    ext = extended_report(stats)
    assert ext.kl_min == 0.0 and ext.reverse_kl_mean is None
    assert ext.dp_rms_stderr == 0.0 and ext.ppl_diff == 0.0
    # zero support: cand has mass where ref has none -> reverse KL +inf
    r = np.array([[0.0, -np.inf]])
    c = np.array([[0.0, 0.0]])
    rk, tv = token_divergences(r, c)
    assert rk[0] == math.inf and tv[0] == pytest.approx(0.5)
    one = TokenStats()
    one.update(r, c)
    e1 = extended_report(one, rk, tv)
    assert e1.reverse_kl_mean == math.inf and e1.tv_stderr == math.inf
    with pytest.raises(ValueError, match="Expected 1 per-token values of `tv`"):
        extended_report(one, rk, np.zeros(2))
