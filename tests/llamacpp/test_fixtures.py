"""kldiv against the real llama.cpp, through the fixtures of
tests/fixtures/make_llamacpp_fixtures.py (its docstring says how to regenerate them): a tiny
random Llama, its float32 and Q4_0 GGUF, llama.cpp's base file and the statistics it printed."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from kldiv.llamacpp import ParityStats, read_base, write_base
from kldiv.metrics import TokenStats

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "llamacpp"
pytestmark = pytest.mark.skipif(
    not (FIX / "llamacpp.json").exists(),
    reason="no llama.cpp fixtures (tests/fixtures/make_llamacpp_fixtures.py makes them)",
)


def doc():
    return json.loads((FIX / "llamacpp.json").read_text())


def logits(name):
    return np.load(FIX / f"logits_{name}.npy")


def test_write_base_reproduces_llama_cpp_bytes(tmp_path):
    """llama.cpp's base file, rewritten by kldiv from the same float32 logits (of the float32
    GGUF, dumped by the fixture script as llama-perplexity evaluates them)."""
    ours = tmp_path / "ours.kld"
    with read_base(FIX / "llama_base.kld") as base:
        write_base(ours, np.array(base.tokens), logits("gguf_f32"))
    assert ours.read_bytes() == (FIX / "llama_base.kld").read_bytes()


def test_hf_model_against_llama_cpp_base_file():
    """The float32 transformers model on the file's windows: the KL that the storage allows.

    Per token, KL(stored‖model) ≤ −log(1 − (V − 1)·e^-16) (the mass the 16-nat window drops,
    at most V − 1 entries each below e^-16 of the top one) + 2·(ε + d)², ε = scale/2 the grid's
    rounding of a log-probability and d the largest difference between the transformers and
    the GGUF float32 logits of the row (two implementations of the same float32 model)."""
    hf, gg = logits("hf_f32"), logits("gguf_f32")
    with read_base(FIX / "llama_base.kld") as base:
        V = base.n_vocab
        trunc = -math.log1p(-(V - 1) * math.exp(-16))
        for c in range(base.n_chunk):
            stats = TokenStats()
            stats.update(base.log_probs(c), hf[c], labels=base.labels[c])
            d = np.abs(hf[c] - gg[c]).max(axis=-1)
            bound = trunc + 2 * (base.records(c).scale / 2 + d) ** 2
            assert (stats.values("kl") <= bound).all()
            assert stats.report().top1_agreement == 1.0


def norm(label):
    return re.sub(r"\s+", " ", label.strip())


def parity_values(rep):
    v = {
        "Mean PPL(Q)": rep.ppl_cand,
        "Mean PPL(base)": rep.ppl_base,
        "Cor(ln(PPL(Q)), ln(PPL(base)))": (100 * rep.ln_ppl_correlation,),
        "Mean ln(PPL(Q)/PPL(base))": rep.ln_ppl_ratio,
        "Mean PPL(Q)/PPL(base)": rep.ppl_ratio,
        "Mean PPL(Q)-PPL(base)": rep.ppl_diff,
        "Mean KLD": rep.kld_mean,
        "Mean Δp": tuple(100 * x for x in rep.dp_mean),
        "RMS Δp": tuple(100 * x for x in rep.dp_rms),
        "Same top p": tuple(100 * x for x in rep.same_top),
    }
    names = {"max": "Maximum", "min": "Minimum", "median": "Median"}
    for k, x in rep.kld_percentiles.items():
        v[f"{names.get(k, k + '%')} KLD"] = (x,)
    for k, x in rep.dp_percentiles.items():
        v[f"{names.get(k, k + '%')} Δp"] = (100 * x,)
    return v


@pytest.mark.parametrize(
    "base_file, key", [("llama_base", "llama_base_scored"), ("kldiv_base", "kldiv_base_scored")]
)
def test_parity_mode_reproduces_printed_statistics(base_file, key):
    """ParityStats on the base file and the Q4_0 GGUF's logits gives every statistic that
    llama-perplexity --kl-divergence printed, to the printed precision: within half a unit of
    the last printed digit, plus 1e-9 relative for sums taken in another order."""
    printed = {norm(k): v for k, v in doc()[key]["stats"].items()}
    q = logits("gguf_q4_0")
    par = ParityStats()
    with read_base(FIX / f"{base_file}.kld") as base:
        for c in range(base.n_chunk):
            par.update(base.records(c), q[c], base.labels[c])
    ours = parity_values(par.report())
    assert set(printed) <= set(ours), set(printed) - set(ours)
    for label, strings in printed.items():
        for s, x in zip(strings, ours[label], strict=False):
            decimals = len(s.partition(".")[2])
            tol = 0.5 * 10.0**-decimals + 1e-9 * abs(x)
            assert abs(float(s) - x) <= tol, (label, s, x)


def test_kldiv_base_scores_like_llama_cpp_base():
    """A base file written by kldiv from the transformers model, scored by llama.cpp, gives
    the statistics llama.cpp's own base file gives, up to the difference of the two references:
    two float32 implementations of one model, whose logits differ by up to 2e-3 (a KL of 1e-7
    between them), which moves the mean KL against the Q4_0 model by 4e-4 of its value (the
    exact KLs, from the logits, show the same). Bounds: for order statistics (percentiles,
    maximum, minimum), the largest per-token difference of the value between the two files
    (order statistics move by at most that); for the rest 2e-3 of the value; plus two units of
    the last printed digit."""
    a = {norm(k): v for k, v in doc()["llama_base_scored"]["stats"].items()}
    b = {norm(k): v for k, v in doc()["kldiv_base_scored"]["stats"].items()}
    assert a.keys() == b.keys() and len(a) == 34
    hf, gg, q = logits("hf_f32"), logits("gguf_f32"), logits("gguf_q4_0")
    assert np.abs(hf - gg).max() <= 2e-3
    exact, per_token = [], []
    for ref, name in ((gg, "llama_base"), (hf, "kldiv_base")):
        stats = TokenStats()
        stats.update(ref.reshape(-1, ref.shape[-1]), q.reshape(-1, q.shape[-1]))
        exact.append(stats.report().kl_mean)
        par = ParityStats()
        with read_base(FIX / f"{name}.kld") as base:
            for c in range(base.n_chunk):
                par.update(base.records(c), q[c], base.labels[c])
        per_token.append(par.values())
    assert abs(exact[0] - exact[1]) <= 4.5e-4 * exact[0]
    sup_kl = float(np.abs(per_token[0].kld - per_token[1].kld).max())
    sup_dp = 100 * float(np.abs(per_token[0].p_diff - per_token[1].p_diff).max())
    for label in a:
        x, y = float(a[label][0]), float(b[label][0])
        unit = 10.0 ** -len(a[label][0].partition(".")[2])
        if label.startswith("Mean") or label.startswith(("RMS", "Same", "Cor")):
            tol = 2e-3 * abs(x)
        else:
            tol = sup_kl if label.endswith("KLD") else sup_dp
        assert abs(x - y) <= tol + 2 * unit, (label, a[label], b[label], tol)
