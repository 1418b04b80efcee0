"""The three worked examples of `kldiv demo` (the TensorFlow tutorial's softmax-cross-entropy KL,
the Keras answer's sparsity regularizer, the MXNet Gluon tutorial's `KLDivLoss`), with every
expected number derived here."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import numpy as np
import pytest

import kldiv
from kldiv import cli


def softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def hand_kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def test_tensorflow_tutorial_values(xp):
    a = [[0.05, 0.16, 0.9], [0.8, 4.15, 0.05]]
    b = [[0.7, 0.2, 0.1], [0.15, 0.9, 0.05]]
    out = xp.to_numpy(
        kldiv.kl_div(
            xp.asarray(np.array(a)), xp.asarray(np.array(b)), form="logits", reduction="none"
        )
    )
    # The tutorial prints k1 = k2 = [0.1879 0.4534] (TensorFlow, 4 decimals).
    np.testing.assert_array_equal(np.round(out, 4), [0.1879, 0.4534])
    expected = [hand_kl(softmax(ra), softmax(rb)) for ra, rb in zip(a, b, strict=True)]
    np.testing.assert_allclose(out, expected, rtol=1e-13)


def test_tensorflow_cross_entropy_trick_is_the_same_kl(xp):
    # The tutorial's klx: -H(p, p) + H(p, q) with H the softmax cross-entropy, by hand.
    a = [[0.05, 0.16, 0.9], [0.8, 4.15, 0.05]]
    b = [[0.7, 0.2, 0.1], [0.15, 0.9, 0.05]]

    def cross_entropy(p, logits):
        return -sum(pi * math.log(s) for pi, s in zip(p, softmax(logits), strict=True))

    for ra, rb in zip(a, b, strict=True):
        p = softmax(ra)
        klx = -cross_entropy(p, ra) + cross_entropy(p, rb)
        got = float(
            xp.to_numpy(
                kldiv.kl_div(xp.asarray(np.array(ra)), xp.asarray(np.array(rb)), form="logits")
            )
        )
        assert got == pytest.approx(klx, rel=1e-12)


MX1, MX2, MX3, MX4 = (
    [0.2, 0.5, 0.2, 0.1],
    [0.3, 0.4, 0.1, 0.2],
    [0.1, 0.1, 0.1, 0.7],
    [0.0, 0.9, 0.0, 0.1],
)


def test_mxnet_tutorial_facts(xp):
    # MXNet's kl_divergence(a, b) is KL(b‖a) (label b, log-prediction a) over 4 categories.
    def mx(a, b):
        return float(xp.to_numpy(kldiv.kl_div(xp.asarray(np.array(b)), xp.asarray(np.array(a)))))

    d12 = (
        0.3 * math.log(0.3 / 0.2)
        + 0.4 * math.log(0.4 / 0.5)
        + 0.1 * math.log(0.1 / 0.2)
        + 0.2 * math.log(0.2 / 0.1)
    )
    d13 = (
        0.1 * math.log(0.1 / 0.2)
        + 0.1 * math.log(0.1 / 0.5)
        + 0.1 * math.log(0.1 / 0.2)
        + 0.7 * math.log(0.7 / 0.1)
    )
    assert mx(MX1, MX2) == pytest.approx(d12, rel=1e-13)
    assert mx(MX1, MX3) == pytest.approx(d13, rel=1e-13)
    assert mx(MX1, MX2) < mx(MX1, MX3)  # "smaller KL divergence for distributions 1 & 2"
    assert mx(MX1, MX1) == 0.0  # "KL divergence of a distribution with itself is 0"
    # The tutorial gets nan for "4 compared with 1": dist_1 has mass where dist_4 has none, so the
    # exact value is +inf; the other direction is finite.
    assert mx(MX4, MX1) == math.inf
    assert mx(MX1, MX4) == pytest.approx(0.9 * math.log(0.9 / 0.5), rel=1e-13)
    # from_logits=False: softmax of the given output is dist_1 to 8 digits (checked by hand below).
    out = np.array([0.39056206, 1.3068528, 0.39056206, -0.30258512])
    np.testing.assert_allclose(softmax(out), MX1, atol=1e-8)
    v = float(
        xp.to_numpy(
            kldiv.kl_div(xp.asarray(np.array(MX2)), xp.asarray(out), form=("probs", "logits"))
        )
    )
    assert v == pytest.approx(d12, rel=1e-6)


def test_keras_sparsity_regularizer_is_a_bernoulli_kl_per_unit(xp):
    # 0.01·Σ_j [ρ log(ρ/ρ̂_j) + (1−ρ) log((1−ρ)/(1−ρ̂_j))], the answer's two calls spelled out.
    rho, rho_hat = 0.05, np.array([0.01, 0.05, 0.2, 0.5, 0.9])
    expected = 0.01 * sum(
        rho * math.log(rho / r) + (1 - rho) * math.log((1 - rho) / (1 - r)) for r in rho_hat
    )
    p = np.stack([np.full(5, rho), np.full(5, 1 - rho)], -1)
    q = np.stack([rho_hat, 1 - rho_hat], -1)
    got = 0.01 * float(xp.to_numpy(kldiv.kl_div(xp.asarray(p), xp.asarray(q), reduction="sum")))
    assert got == pytest.approx(expected, rel=1e-13)


def test_demo_prints_each_reported_value_beside_kldivs():
    buf = io.StringIO()
    assert cli.worked_examples(out=buf) == 0
    lines = buf.getvalue().splitlines()
    a = [[0.05, 0.16, 0.9], [0.8, 4.15, 0.05]]
    b = [[0.7, 0.2, 0.1], [0.15, 0.9, 0.05]]
    for i, reported in enumerate(["0.1879", "0.4534"]):
        computed = f"{hand_kl(softmax(a[i]), softmax(b[i])):.6f}"  # by hand, not by kldiv
        row = [ln for ln in lines if ln.split()[:1] == [str(i)]]
        assert row and reported in row[0] and computed in row[0], (row, computed)
    d12 = hand_kl(MX2, MX1)
    row12 = next(ln for ln in lines if ln.strip().startswith("1 vs 2"))
    assert f"{d12:.6f}" in row12 and f"{d12 / 4:.6f}" in row12
    row41 = next(ln for ln in lines if ln.strip().startswith("4 vs 1"))
    assert row41.split()[-2:] == ["inf", "inf"]
    rho, rho_hat = 0.05, [0.01, 0.05, 0.2, 0.5, 0.9]
    keras = 0.01 * sum(
        rho * math.log(rho / r) + (1 - rho) * math.log((1 - rho) / (1 - r)) for r in rho_hat
    )
    kl_line = next(ln for ln in lines if "kldiv: 0.01·kl_div" in ln)
    assert kl_line.endswith(f"{keras:.6f}")


def test_main_dispatches_and_info_lists_backends():
    buf = io.StringIO()
    sys_stdout = sys.stdout
    try:
        sys.stdout = buf
        assert cli.main(["info"]) == 0
    finally:
        sys.stdout = sys_stdout
    import jax
    import torch

    text = buf.getvalue()
    assert f"torch             {torch.__version__}" in text
    assert f"jax               {jax.__version__}" in text
    with pytest.raises(SystemExit) as exc:
        cli.main(["bogus"])
    assert exc.value.code == 2


def test_console_script_runs_in_a_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "kldiv", "demo", "--no-train"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "TensorFlow tutorial" in out.stdout and "0.453418" in out.stdout
    assert "MXNet Gluon tutorial, KLDivLoss" in out.stdout
    assert "Keras answer, sparsity regularizer" in out.stdout
    assert "seed" not in out.stdout.lower()
