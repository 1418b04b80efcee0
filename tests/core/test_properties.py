"""Property tests (hypothesis): bounds, identities and agreement with the reference."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kldiv

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def distributions(draw, min_categories=1, max_categories=6):
    """(p, q): 1-3 rows of probabilities with exact zeros, sharing the category count."""
    rows = draw(st.integers(1, 3))
    cats = draw(st.integers(min_categories, max_categories))
    weights = st.one_of(st.just(0.0), st.floats(1e-6, 1.0))
    out = []
    for _ in range(2):
        x = draw(hnp.arrays(np.float64, (rows, cats), elements=weights))
        x[:, 0] += (x.sum(-1) == 0) * 1.0
        out.append(x / x.sum(-1, keepdims=True))
    return out[0], out[1]


# The endpoints exactly, and weights ≥ 1e-300: below that the reference's products underflow
# (beta·p rounds to 0 and it reports +inf), while kldiv works in log space and stays finite.
unit = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(1e-300, 1.0))


@SETTINGS
@given(distributions(), unit, unit)
def test_all_kinds_match_reference_and_bounds(pq, beta, alpha):
    p, q = pq
    for kind in kldiv.KINDS:
        params = {
            "js": {"beta": beta},
            "skew_kl": {"alpha": alpha},
            "skew_reverse_kl": {"alpha": alpha},
        }
        kw = params.get(kind, {})
        out = kldiv.divergence(p, q, kind, reduction="none", **kw)
        expected = ref.reference(kind, p, q, **kw)
        assert not np.isnan(out).any()
        assert (out >= -1e-15).all(), (kind, out)
        np.testing.assert_array_equal(np.isposinf(out), np.isposinf(expected))
        fin = np.isfinite(expected)
        np.testing.assert_allclose(out[fin], expected[fin], rtol=1e-9, atol=1e-12)
    js = kldiv.js_div(p, q, beta=beta, reduction="none")
    entropy_bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta) if 0 < beta < 1 else 0
    assert (js <= entropy_bound + 1e-12).all()  # JS_beta ≤ H(beta), equality for disjoint supports
    tv = kldiv.tv_distance(p, q, reduction="none")
    kl = kldiv.kl_div(p, q, reduction="none")
    # Pinsker; KL may round to -1 ulp for inputs equal up to rounding, hence the clamp
    assert (tv <= np.sqrt(np.maximum(kl, 0) / 2) + 1e-12).all()


@SETTINGS
@given(distributions(min_categories=2), st.floats(-50, 50), st.floats(0.25, 4.0))
def test_logit_forms_agree_with_probability_forms(pq, shift, temperature):
    p, q = pq
    with np.errstate(divide="ignore"):
        lp, lq = np.log(p), np.log(q)
    direct = kldiv.kl_div(p, q, reduction="none")
    np.testing.assert_allclose(
        kldiv.kl_div(lp, lq, form="log_probs", reduction="none"), direct, rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(
        kldiv.kl_div(lp + shift, lq - shift, form="logits", reduction="none"),
        direct,
        rtol=1e-9,
        atol=1e-12,
    )
    # temperature T on logits x equals plain logits x / T
    tempered = kldiv.kl_div(
        lp * temperature, lq * temperature, form="logits", temperature=temperature, reduction="none"
    )
    np.testing.assert_allclose(tempered, direct, rtol=1e-9, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(distributions(min_categories=2))
def test_torch_matches_numpy_and_gradients_are_finite(pq):
    p, q = pq
    P = torch.tensor(p, requires_grad=True)
    Q = torch.tensor(q, requires_grad=True)
    for kind in kldiv.KINDS:
        out = kldiv.divergence(P, Q, kind, reduction="none")
        expected = kldiv.divergence(p, q, kind, reduction="none")
        np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-14, atol=1e-16)
        fin = torch.isfinite(out)
        if fin.any():
            gp, gq = torch.autograd.grad(out[fin].sum(), (P, Q), allow_unused=True)
            for g in (gp, gq):
                assert g is None or torch.isfinite(g[fin]).all(), kind
