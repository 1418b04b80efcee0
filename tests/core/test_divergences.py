"""Values of the divergence family against the float64 reference, on NumPy, PyTorch and JAX."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref

import kldiv

KINDS = list(kldiv.KINDS)
PARAMS = {"js": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.25}}
FORM_PAIRS = [
    ("probs", "probs"),
    ("logits", "logits"),
    ("log_probs", "log_probs"),
    ("log_probs", "logits"),
    ("probs", "logits"),
]


def random_probs(rng, shape, zeros=0.0):
    x = rng.gamma(0.7, size=shape)
    if zeros:
        x = np.where(rng.random(shape) < zeros, 0.0, x)
        x[..., 0] += x.sum(-1) == 0  # keep every row a distribution
    return x / x.sum(-1, keepdims=True)


def encode(probs, form, rng):
    """The same distribution in the requested form; logits get an arbitrary per-row shift."""
    with np.errstate(divide="ignore"):
        logp = np.log(probs)
    if form == "probs":
        return probs
    if form == "log_probs":
        return logp
    return logp + rng.normal(size=probs.shape[:-1] + (1,)) * 3


def pair(rng, shape, p_zeros=0.3, q_zeros=0.0):
    """p with zeros; q zero only where p is (finite KL) unless q_zeros > 0."""
    p = random_probs(rng, shape, p_zeros)
    q = random_probs(rng, shape)
    if q_zeros:
        q = np.where(rng.random(shape) < q_zeros, 0.0, q)
        q[..., -1] += q.sum(-1) == 0
        q = q / q.sum(-1, keepdims=True)
    return p, q


def assert_close(actual, expected, rtol=1e-10, atol=1e-12):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected))
    fin = np.isfinite(expected)
    assert np.isfinite(actual[fin]).all()
    np.testing.assert_allclose(actual[fin], expected[fin], rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("forms", FORM_PAIRS, ids="-".join)
def test_matches_float64_reference(xp, rng, kind, forms):
    p, q = pair(rng, (4, 3, 7), p_zeros=0.3, q_zeros=0.15)
    a, b = encode(p, forms[0], rng), encode(q, forms[1], rng)
    params = PARAMS.get(kind, {})
    out = kldiv.divergence(
        xp.asarray(a), xp.asarray(b), kind, form=forms, reduction="none", **params
    )
    assert xp.dtype_name(out) == "float64"
    assert_close(xp.to_numpy(out), ref.reference(kind, a, b, form=forms, **params))


@pytest.mark.parametrize("kind", KINDS)
def test_float32_close_to_reference(xp, rng, kind):
    p, q = pair(rng, (6, 50), p_zeros=0.2)
    a, b = encode(p, "logits", rng).astype(np.float32), encode(q, "logits", rng).astype(np.float32)
    out = kldiv.divergence(xp.asarray(a), xp.asarray(b), kind, form="logits", reduction="none")
    assert xp.dtype_name(out) == "float32"
    assert_close(xp.to_numpy(out), ref.reference(kind, a, b, form="logits"), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_computed_and_returned_in_float32(xp, rng, dtype):
    # NumPy's bfloat16 is ml_dtypes' (what JAX uses). 4096 categories: a float16 accumulator
    # would be off by ~1e-3 relative, a float32 one by ~1e-7.
    p, q = pair(rng, (3, 4096), p_zeros=0.1)
    a_half, b_half = (
        xp.asarray(encode(p, "logits", rng), dtype),
        xp.asarray(encode(q, "logits", rng), dtype),
    )
    out = kldiv.kl_div(a_half, b_half, form="logits", reduction="none")
    assert xp.dtype_name(out) == "float32"
    expected = ref.reference("kl", xp.to_numpy(a_half), xp.to_numpy(b_half), form="logits")
    assert_close(xp.to_numpy(out), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_reductions_mask_weight_num_items(xp, rng, kind):
    p, q = pair(rng, (5, 4, 6))
    per = ref.reference(kind, p, q)
    mask = rng.random((5, 4)) < 0.6
    mask[0, 0] = True
    weight = rng.random((4,))  # broadcasts over the leading batch axis
    P, Q = xp.asarray(p), xp.asarray(q)
    f = kldiv.KINDS[kind]
    assert_close(xp.to_numpy(f(P, Q)), per.mean())
    assert_close(xp.to_numpy(f(P, Q, reduction="sum")), per.sum())
    assert_close(xp.to_numpy(f(P, Q, mask=xp.asarray(mask))), per[mask].mean())
    assert_close(xp.to_numpy(f(P, Q, weight=xp.asarray(weight))), (per * weight).mean())
    assert_close(
        xp.to_numpy(f(P, Q, mask=xp.asarray(mask), weight=xp.asarray(weight), reduction="none")),
        np.where(mask, per * weight, 0.0),
    )
    assert_close(xp.to_numpy(f(P, Q, mask=xp.asarray(mask), num_items=7)), per[mask].sum() / 7)
    assert_close(xp.to_numpy(f(P, Q, num_items=xp.asarray(np.float64(40.0)))), per.sum() / 40)


def test_masked_rows_may_hold_garbage(xp, rng):
    p, q = pair(rng, (4, 5))
    p[1] = np.nan
    q[2] = -1.0
    mask = np.array([True, False, False, True])
    out = kldiv.kl_div(xp.asarray(p), xp.asarray(q), mask=xp.asarray(mask), reduction="none")
    expected = np.zeros(4)
    expected[mask] = ref.reference("kl", p[mask], q[mask])
    assert_close(xp.to_numpy(out), expected)


def test_all_masked_and_empty_batches_give_zero(xp, rng):
    p, q = pair(rng, (3, 4))
    none = xp.asarray(np.zeros(3, dtype=bool))
    for kind in KINDS:
        f = kldiv.KINDS[kind]
        assert xp.to_numpy(f(xp.asarray(p), xp.asarray(q), mask=none)) == 0.0
        empty = xp.asarray(np.zeros((0, 4)))
        assert xp.to_numpy(f(empty, empty)) == 0.0
        assert xp.to_numpy(f(empty, empty, reduction="sum")) == 0.0
        assert xp.to_numpy(f(empty, empty, reduction="none")).shape == (0,)


def test_zero_support_exact(xp):
    p = xp.asarray([[0.0, 0.9, 0.0, 0.1]])
    q = xp.asarray([[0.2, 0.5, 0.2, 0.1]])
    # KL(p‖q) skips p = 0 terms: 0.9·log(0.9/0.5) + 0.1·log(1) (hand derivation).
    expected = 0.9 * math.log(0.9 / 0.5)
    assert xp.to_numpy(kldiv.kl_div(p, q)) == pytest.approx(expected, rel=1e-14)
    assert xp.to_numpy(kldiv.kl_div(q, p)) == math.inf
    assert xp.to_numpy(kldiv.reverse_kl_div(p, q)) == math.inf
    assert xp.to_numpy(kldiv.symmetric_kl_div(p, q)) == math.inf
    # Both zero at the same category: 0·log(0/0) = 0.
    both = xp.asarray([[0.0, 1.0]])
    assert xp.to_numpy(kldiv.kl_div(both, both)) == 0.0


def test_neg_inf_logits_are_zero_probabilities(xp):
    inf = math.inf
    a = xp.asarray([[-inf, 1.0, 2.0]])
    b = xp.asarray([[0.0, -inf, 3.0]])
    c = xp.asarray([[5.0, 1.0, 2.0]])
    # softmax(a) = [0, 1/(1+e), e/(1+e)] and softmax(b) has a zero where a does not.
    assert xp.to_numpy(kldiv.kl_div(a, b, form="logits")) == math.inf
    pa = [0.0, 1 / (1 + math.e), math.e / (1 + math.e)]
    z = math.exp(5) + math.e + math.e**2
    pc = [math.exp(5) / z, math.e / z, math.e**2 / z]
    expected = sum(x * math.log(x / y) for x, y in zip(pa, pc, strict=True) if x > 0)
    assert xp.to_numpy(kldiv.kl_div(a, c, form="logits")) == pytest.approx(expected, rel=1e-12)
    for kind in KINDS:
        out = xp.to_numpy(kldiv.divergence(a, c, kind, form="logits"))
        assert not np.isnan(out)


def test_underflowed_probability_against_zero_is_inf(xp):
    # exp(-200) underflows to 0 in float32, but p > 0 = q mathematically: KL = +inf, not NaN/0.
    a = xp.asarray(np.array([[0.0, -200.0]], dtype=np.float32))
    b = xp.asarray(np.array([[0.0, -np.inf]], dtype=np.float32))
    assert xp.to_numpy(kldiv.kl_div(a, b, form="logits")) == math.inf
    assert xp.to_numpy(kldiv.kl_div(a, b, form=("log_probs", "logits"))) == math.inf


def test_extreme_logits_float32(xp):
    # softmax([1e30, -1e30, 0]) = [1, 0, 0] and softmax(0, 0, 0) is uniform: KL = log 3.
    a = xp.asarray(np.array([[1e30, -1e30, 0.0]], dtype=np.float32))
    b = xp.asarray(np.zeros((1, 3), dtype=np.float32))
    assert xp.to_numpy(kldiv.kl_div(a, b, form="logits")) == pytest.approx(math.log(3), rel=1e-6)
    # Reverse: log softmax(a) = [0, -2e30, -1e30] is finite, so the exact value is finite too:
    # (1/3)·Σ(log(1/3) - log a_j) = -log 3 + 1e30.
    assert xp.to_numpy(kldiv.kl_div(b, a, form="logits")) == pytest.approx(1e30, rel=1e-6)
    for kind in KINDS:
        assert not np.isnan(xp.to_numpy(kldiv.divergence(a, b, kind, form="logits")))


def test_temperature(xp, rng):
    a, b = rng.normal(size=(3, 5)) * 4, rng.normal(size=(3, 5)) * 4
    for kind in ("kl", "js", "tv"):
        out = kldiv.divergence(
            xp.asarray(a), xp.asarray(b), kind, form="logits", temperature=2.5, reduction="none"
        )
        assert_close(xp.to_numpy(out), ref.reference(kind, a, b, form="logits", temperature=2.5))


@pytest.mark.parametrize("axis", [0, 1, -2])
def test_axis(xp, rng, axis):
    p, q = pair(rng, (3, 4, 5))
    pm, qm = np.moveaxis(p, -1, axis), np.moveaxis(q, -1, axis)
    out = kldiv.js_div(xp.asarray(pm), xp.asarray(qm), axis=axis, reduction="none")
    assert_close(xp.to_numpy(out), ref.reference("js", p, q, beta=0.5))
    mask = rng.random((3, 4)) < 0.5
    masked = kldiv.kl_div(
        xp.asarray(pm), xp.asarray(qm), axis=axis, mask=xp.asarray(mask), reduction="none"
    )
    assert_close(xp.to_numpy(masked), np.where(mask, ref.reference("kl", p, q), 0.0))


def test_broadcasting_against_a_single_distribution(xp, rng):
    p, q = pair(rng, (6, 5))
    prior = q[0]
    out = kldiv.kl_div(xp.asarray(p), xp.asarray(prior), reduction="none")
    assert_close(xp.to_numpy(out), ref.reference("kl", p, np.broadcast_to(prior, p.shape)))
    out = kldiv.kl_div(xp.asarray(p[:1]), xp.asarray(q), reduction="none")
    assert out.shape == (6,)


def test_one_dimensional_input_gives_a_0d_result(xp, rng):
    p, q = pair(rng, (5,))
    out = kldiv.kl_div(xp.asarray(p), xp.asarray(q), reduction="none")
    assert tuple(out.shape) == ()
    assert_close(xp.to_numpy(out), ref.reference("kl", p, q))


def test_odd_shape(xp, rng):
    p, q = pair(rng, (37, 1271), p_zeros=0.05)
    a, b = encode(p, "logits", rng), encode(q, "logits", rng)
    out = kldiv.kl_div(xp.asarray(a), xp.asarray(b), form="logits", reduction="none")
    assert_close(xp.to_numpy(out), ref.reference("kl", a, b, form="logits"), rtol=1e-9)


def test_single_category_is_zero(xp):
    one = xp.asarray(np.ones((3, 1)))
    for kind in KINDS:
        assert xp.to_numpy(kldiv.divergence(one, one, kind)) == 0.0


def test_returns_the_callers_framework(xp, rng):
    p, q = pair(rng, (2, 3))
    out = kldiv.kl_div(xp.asarray(p), xp.asarray(q))
    module = type(out).__module__
    assert {"numpy": "numpy", "torch": "torch", "jax": "jax"}[xp.name] in module


def test_lists_and_scalars_are_accepted_as_numpy():
    out = kldiv.kl_div([0.5, 0.5], [0.25, 0.75])
    assert isinstance(out, np.ndarray)
    assert float(out) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), rel=1e-14)


# --- metamorphic properties ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_of_a_distribution_with_itself_is_zero(xp, rng, kind):
    p, _ = pair(rng, (4, 9), p_zeros=0.3)
    out = xp.to_numpy(kldiv.divergence(xp.asarray(p), xp.asarray(p), kind, reduction="none"))
    np.testing.assert_allclose(out, 0.0, atol=1e-15)


@pytest.mark.parametrize("kind", KINDS)
def test_non_negative_and_bounded(xp, rng, kind):
    p, q = pair(rng, (30, 8), p_zeros=0.3, q_zeros=0.2)
    out = xp.to_numpy(kldiv.divergence(xp.asarray(p), xp.asarray(q), kind, reduction="none"))
    assert (out >= 0).all()
    if kind == "js":
        assert (out <= math.log(2) + 1e-12).all()
    if kind == "tv":
        assert (out <= 1 + 1e-12).all()
        kl = xp.to_numpy(kldiv.kl_div(xp.asarray(p), xp.asarray(q), reduction="none"))
        assert (out <= np.sqrt(kl / 2) + 1e-12).all()  # Pinsker's inequality


@pytest.mark.parametrize("kind", KINDS)
def test_logit_shift_and_category_permutation_invariance(xp, rng, kind):
    a, b = rng.normal(size=(4, 6)) * 3, rng.normal(size=(4, 6)) * 3
    base = xp.to_numpy(
        kldiv.divergence(xp.asarray(a), xp.asarray(b), kind, form="logits", reduction="none")
    )
    shifted = kldiv.divergence(
        xp.asarray(a + 17.0), xp.asarray(b - 5.0), kind, form="logits", reduction="none"
    )
    np.testing.assert_allclose(xp.to_numpy(shifted), base, rtol=1e-11, atol=1e-13)
    perm = rng.permutation(6)
    permuted = kldiv.divergence(
        xp.asarray(a[:, perm]), xp.asarray(b[:, perm]), kind, form="logits", reduction="none"
    )
    np.testing.assert_allclose(xp.to_numpy(permuted), base, rtol=1e-11, atol=1e-13)


def test_family_identities(xp, rng):
    p, q = pair(rng, (10, 7), p_zeros=0.2, q_zeros=0.2)
    P, Q = xp.asarray(p), xp.asarray(q)
    n = xp.to_numpy
    kw = {"reduction": "none"}
    np.testing.assert_array_equal(n(kldiv.reverse_kl_div(P, Q, **kw)), n(kldiv.kl_div(Q, P, **kw)))
    np.testing.assert_allclose(
        n(kldiv.js_div(P, Q, beta=0.3, **kw)),
        n(kldiv.js_div(Q, P, beta=0.7, **kw)),
        rtol=1e-12,
        atol=1e-15,
    )
    np.testing.assert_array_equal(
        n(kldiv.skew_kl_div(P, Q, alpha=0.0, **kw)), n(kldiv.kl_div(P, Q, **kw))
    )
    np.testing.assert_array_equal(n(kldiv.skew_kl_div(P, Q, alpha=1.0, **kw)), 0.0)
    np.testing.assert_array_equal(
        n(kldiv.skew_reverse_kl_div(P, Q, alpha=0.0, **kw)), n(kldiv.kl_div(Q, P, **kw))
    )
    np.testing.assert_array_equal(
        n(kldiv.symmetric_kl_div(P, Q, **kw)),
        n(kldiv.kl_div(P, Q, **kw)) + n(kldiv.kl_div(Q, P, **kw)),
    )
    for beta in (0.0, 1.0):
        np.testing.assert_array_equal(n(kldiv.js_div(P, Q, beta=beta, **kw)), 0.0)
    # The endpoints are short-circuits in the code; their neighbours go through the full
    # formula and must approach the same values (continuity in alpha and beta).
    kl = n(kldiv.kl_div(P, Q, **kw))
    skew = n(kldiv.skew_kl_div(P, Q, reduction="none", alpha=1e-12))
    fin = np.isfinite(kl)
    # d/dalpha KL(p || (1-alpha) q + alpha p) at 0 is 1 - sum p^2/q, so the gap from KL is
    # about alpha * |1 - sum p^2/q| per row; small q makes that large, hence a per-row bound.
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.abs(1.0 - np.where(p > 0, p * p / q, 0.0).sum(axis=-1))
    bound = 4 * 1e-12 * slope[fin] + 1e-12 * (1 + np.abs(kl[fin]))
    assert (np.abs(skew[fin] - kl[fin]) <= bound).all(), (skew[fin] - kl[fin], bound)
    # Where KL is +inf, skew KL stays finite and within its bound -log(alpha) (≈ 27.6).
    assert np.isfinite(skew).all() and (skew <= -math.log(1e-12) + 1e-9).all()
    np.testing.assert_allclose(
        n(kldiv.skew_kl_div(P, Q, reduction="none", alpha=1 - 1e-12)), 0.0, atol=1e-9
    )
    for beta in (1e-12, 1 - 1e-12):
        np.testing.assert_allclose(n(kldiv.js_div(P, Q, beta=beta, **kw)), 0.0, atol=1e-9)


def test_js_is_continuous_at_the_endpoints(xp):
    # Disjoint supports: beta·KL(P‖M) = beta·log(1/beta) → 0 as beta → 0 (hand derivation:
    # M = beta·P + (1-beta)·Q, so P's mass sees m = beta·p and Q's mass m = (1-beta)·q).
    P, Q = xp.asarray([1.0, 0.0]), xp.asarray([0.0, 1.0])
    for beta in (1e-3, 1e-9, 1 - 1e-6):
        expected = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert xp.to_numpy(kldiv.js_div(P, Q, beta=beta)) == pytest.approx(expected, rel=1e-9)


def test_mixture_weights_at_the_extremes_stay_accurate(xp):
    # p = [1, 0], q = [1/2, 1/2]: skew KL(P ‖ aP + (1-a)Q) = log(1 / (a + (1-a)/2)) and the
    # reverse one KL(Q ‖ aQ + (1-a)P) = ½·log(1/a) + ½·log(½ / (a/2 + 1 - a)) (hand derivation).
    p, q = xp.asarray([1.0, 0.0]), xp.asarray([0.5, 0.5])
    for a in (1e-300, 1e-173, 1e-9, 0.3, 1 - 1e-9):
        fwd = xp.to_numpy(kldiv.skew_kl_div(p, q, alpha=a))
        assert fwd == pytest.approx(-math.log(a + (1 - a) / 2), rel=1e-12, abs=1e-15)
        rev = xp.to_numpy(kldiv.skew_reverse_kl_div(p, q, alpha=a))
        expected = 0.5 * -math.log(a) + 0.5 * math.log(0.5 / (a / 2 + 1 - a))
        assert rev == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_num_items_array_keeps_the_result_dtype(xp, rng):
    p, q = pair(rng, (4, 5))
    P, Q = xp.asarray(p.astype(np.float32)), xp.asarray(q.astype(np.float32))
    for count in (np.float64(3.0), np.int64(3)):
        out = kldiv.kl_div(P, Q, num_items=xp.asarray(np.asarray(count)))
        assert xp.dtype_name(out) == "float32"
        assert tuple(out.shape) == ()
        assert_close(xp.to_numpy(out), ref.reference("kl", p, q).sum() / 3, rtol=1e-5, atol=1e-7)


def test_tiny_mixture_weights_in_float32(xp):
    # w = 1e-46 is 0 in float32, but log(w) ≈ -105.9 is not: skew KL(P ‖ wP + (1-w)Q) with Q
    # missing half of P's mass is 0.5·log(1/w) + 0.5·log(0.5/(w/2 + (1-w))) ≈ 52.61 (by hand).
    p, q = xp.asarray(np.float32([0.5, 0.5])), xp.asarray(np.float32([1.0, 0.0]))
    w = 1e-46
    expected = 0.5 * -math.log(w) + 0.5 * math.log(0.5 / (1 - w))
    assert xp.to_numpy(kldiv.skew_kl_div(p, q, alpha=w)) == pytest.approx(expected, rel=1e-6)
    js = xp.to_numpy(kldiv.js_div(p, q, beta=w))
    assert 0.0 <= js <= 1e-40
