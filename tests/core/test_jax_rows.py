"""The core's JAX rules (``jax.custom_jvp`` rows, mixture and log-softmax in kldiv._math) against
an independent float64 reference, for every divergence and form: values and gradients for both
arguments on random rows and on every zero-support pattern; jit, vmap, forward mode, Hessians;
and that the rules are what runs."""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_divergences import KINDS, PARAMS

import kldiv
from kldiv import _math

INF = math.inf
EPS = float(np.finfo(np.float64).eps)
FORMS = ["probs", "log_probs", "logits"]
V = 6

# --- the reference: NumPy float64, zero support spelled out, no kldiv code ----------------------
#
# KL(A‖B) = Σ_{a_j > 0} a_j·(log a_j − log b_j), +inf if some a_j > 0 = b_j. Its partial
# derivatives are log(a_j/b_j) + 1 for a_j and −a_j/b_j for b_j where a_j > 0, and 0 for both
# where a_j = 0 (the term is absent). The mixture divergences chain through m = w·a + (1 − w)·b.
# Alongside each value and partial derivative the reference returns its magnitude: the sum of
# the absolute values of what is added up to form it, which scales the rounding-error bound.


class Ref:
    def __init__(self, value, gp, gq, value_mag, gp_mag, gq_mag):
        self.value, self.gp, self.gq = value, gp, gq
        self.value_mag, self.gp_mag, self.gq_mag = value_mag, gp_mag, gq_mag


def _kl_parts(a, b):
    """(row values, ∂/∂a, ∂/∂b, and their magnitudes) of KL(A‖B)."""
    on = a > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        la = np.where(on, np.log(np.where(on, a, 1.0)), 0.0)
        lb = np.where(b > 0, np.log(np.where(b > 0, b, 1.0)), -INF)
        terms = np.where(on, a * (la - lb), 0.0)
        da = np.where(on, la - lb + 1.0, 0.0)
        db = np.where(on, -a / np.where(b > 0, b, 1.0), 0.0)
    value = np.where((on & (b == 0)).any(-1), INF, terms.sum(-1))
    da_mag = np.where(on, np.abs(la) + np.abs(lb) + 1.0, 0.0)
    value_mag = (a * da_mag).sum(-1)
    return value, da, db, value_mag, da_mag, np.abs(db)


def reference(kind, p, q, beta=0.5, alpha=0.1):
    if kind in ("kl", "reverse_kl"):
        a, b = (p, q) if kind == "kl" else (q, p)
        v, da, db, vm, dam, dbm = _kl_parts(a, b)
        return Ref(v, da, db, vm, dam, dbm) if kind == "kl" else Ref(v, db, da, vm, dbm, dam)
    if kind == "symmetric_kl":
        v1, da1, db1, vm1, dam1, dbm1 = _kl_parts(p, q)
        v2, da2, db2, vm2, dam2, dbm2 = _kl_parts(q, p)
        return Ref(v1 + v2, da1 + db2, db1 + da2, vm1 + vm2, dam1 + dbm2, dbm1 + dam2)
    if kind == "js":
        m = beta * p + (1 - beta) * q
        v1, da1, db1, vm1, dam1, dbm1 = _kl_parts(p, m)
        v2, da2, db2, vm2, dam2, dbm2 = _kl_parts(q, m)
        dm, dm_mag = beta * db1 + (1 - beta) * db2, beta * dbm1 + (1 - beta) * dbm2
        return Ref(
            beta * v1 + (1 - beta) * v2,
            beta * (da1 + dm),
            (1 - beta) * (da2 + dm),
            vm1 + vm2,
            dam1 + dm_mag,
            dam2 + dm_mag,
        )
    if kind in ("skew_kl", "skew_reverse_kl"):
        a, b = (p, q) if kind == "skew_kl" else (q, p)
        v, da, db, vm, dam, dbm = _kl_parts(a, alpha * a + (1 - alpha) * b)
        ga, gb, gam, gbm = da + alpha * db, (1 - alpha) * db, dam + dbm, dbm
        if kind == "skew_kl":
            return Ref(v, ga, gb, vm, gam, gbm)
        return Ref(v, gb, ga, vm, gbm, gam)
    if kind == "tv":
        g = 0.5 * np.sign(p - q)
        one = np.ones_like(p)
        return Ref(0.5 * np.abs(p - q).sum(-1), g, -g, (p + q).sum(-1), one, one)
    raise ValueError(kind)


def encode(probs, form, shift):
    with np.errstate(divide="ignore"):
        logp = np.log(probs)
    return {"probs": probs, "log_probs": logp, "logits": logp + shift}[form]


def chain(form, probs, g, g_mag):
    """∂/∂x and its magnitude from ∂/∂p for p = x, exp(x) or softmax(x)."""
    if form == "probs":
        return g, g_mag
    if form == "log_probs":
        return probs * g, probs * g_mag
    inner = (probs * g).sum(-1, keepdims=True)
    return probs * (g - inner), probs * (g_mag + (probs * g_mag).sum(-1, keepdims=True))


# Tolerance. kldiv and the reference reach each value and gradient entry through at most ~32
# correctly rounded operations (log-softmax, mixture, exp, log; each within 2 ulp in XLA and
# NumPy) on quantities no larger than the magnitudes above, then sum V = 6 entries, so their
# difference is below 32 · 2 · 6 · eps ≈ 400 eps times the magnitude: 512 eps is the bound used.
# Logits also carry their per-row shift (|shift| ≤ ~10) through the log-softmax, whose rounding
# adds eps·|shift| to every log-probability: the magnitudes are scaled by 1 + |shift| there.
def tolerance(mag):
    return 512 * EPS * (np.asarray(mag) + 1e-300)


def assert_matches(actual, expected, mag, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected), err_msg=what)
    fin = np.isfinite(expected)
    assert np.isfinite(actual[fin]).all(), what
    err = np.abs(actual[fin] - expected[fin])
    bound = np.broadcast_to(tolerance(mag), expected.shape)[fin]
    assert (err <= bound).all(), (what, err.max(), (err / bound).max())


# --- test data -----------------------------------------------------------------------------------


def random_rows(rng, n):
    p = rng.gamma(0.8, size=(n, V)) + 1e-3
    q = rng.gamma(0.8, size=(n, V)) + 1e-3
    return p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)


def zero_support_rows():
    """One row per pattern: p = 0, q = 0 (a +inf KL row), both, one-hot (all but one -inf
    logit), disjoint supports, identical rows."""
    p = np.array(
        [
            [0.0, 0.3, 0.0, 0.2, 0.4, 0.1],  # p = 0 where q > 0
            [0.1, 0.3, 0.2, 0.2, 0.1, 0.1],  # q = 0 where p > 0: KL(P‖Q) = +inf
            [0.0, 0.5, 0.0, 0.25, 0.25, 0.0],  # p = q = 0 in the same places
            [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  # one-hot p
            [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],  # disjoint from q
            [0.2, 0.1, 0.3, 0.1, 0.2, 0.1],  # p = q
        ]
    )
    q = np.array(
        [
            [0.1, 0.2, 0.3, 0.1, 0.2, 0.1],
            [0.0, 0.4, 0.0, 0.3, 0.2, 0.1],
            [0.0, 0.2, 0.0, 0.3, 0.5, 0.0],
            [0.1, 0.2, 0.3, 0.1, 0.2, 0.1],
            [0.0, 0.0, 0.25, 0.25, 0.25, 0.25],
            [0.2, 0.1, 0.3, 0.1, 0.2, 0.1],
        ]
    )
    return p, q


def cases(rng):
    p, q = random_rows(rng, 5)
    pz, qz = zero_support_rows()
    return np.concatenate([p, pz]), np.concatenate([q, qz])


def kldiv_rows(kind, a, b, forms, **kw):
    params = PARAMS.get(kind, {})
    return kldiv.divergence(a, b, kind, form=forms, **params, **kw)


# --- values and gradients against the reference --------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", FORMS)
def test_values_and_gradients_match_the_float64_reference(rng, kind, form):
    p, q = cases(rng)
    shift_p, shift_q = rng.normal(size=(len(p), 1)) * 3, rng.normal(size=(len(q), 1)) * 3
    a, b = jnp.asarray(encode(p, form, shift_p)), jnp.asarray(encode(q, form, shift_q))
    ref = reference(kind, p, q, **PARAMS.get(kind, {}))
    scale_p = 1 + np.abs(shift_p) if form == "logits" else 1.0
    scale_q = 1 + np.abs(shift_q) if form == "logits" else 1.0

    out = kldiv_rows(kind, a, b, form, reduction="none")
    assert out.dtype == jnp.float64
    value_mag = ref.value_mag * np.maximum(scale_p, scale_q).ravel()
    assert_matches(out, ref.value, value_mag, f"{kind} {form} value")

    # The gradient of Σ_rows w_row·D_row, with weights 0 on +inf rows: every finite row's
    # gradient is checked, and +inf rows must still pass their (zero) cotangent through.
    finite = np.isfinite(ref.value)
    weights = np.where(finite, np.linspace(0.5, 1.5, len(p)), 0.0)
    ga, gb = jax.grad(
        lambda x, y: jnp.sum(kldiv_rows(kind, x, y, form, reduction="none") * weights), (0, 1)
    )(a, b)
    assert np.isfinite(np.asarray(ga)).all() and np.isfinite(np.asarray(gb)).all(), kind
    rows = np.broadcast_to(finite[:, None], p.shape)
    if kind == "tv" and form == "logits":
        # |p − q| has no derivative at p = q > 0, and two softmaxes of shifted logits meet
        # there only to rounding, with either sign: those entries' gradients are arbitrary
        ties = (p == q) & (p > 0)
        rows = rows & ~(ties | ties.any(-1, keepdims=True))
    w = weights[:, None]

    def on_finite_rows(x):
        return np.where(rows, x, 0.0) * w

    exp_a, mag_a = chain(form, p, on_finite_rows(ref.gp), on_finite_rows(ref.gp_mag))
    exp_b, mag_b = chain(form, q, on_finite_rows(ref.gq), on_finite_rows(ref.gq_mag))
    for got, exp, mag, name in (
        (ga, exp_a, mag_a * scale_p, "p"),
        (gb, exp_b, mag_b * scale_q, "q"),
    ):
        assert_matches(
            np.where(rows, got, 0.0), np.where(rows, exp, 0.0), mag, f"{kind} {form} ∂{name}"
        )


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "symmetric_kl"])
@pytest.mark.parametrize("form", FORMS)
def test_gradient_is_exactly_zero_at_a_zero_probability(kind, form):
    """Terms whose first argument is 0 are absent: their gradient for both arguments is exactly
    0 (in the logits form: for the -inf logit of the zero argument)."""
    pz, qz = zero_support_rows()
    if kind == "kl":  # row 0: p = 0 in columns 0 and 2, q > 0 everywhere
        p, q, zero_p, zero_q = pz[:1], qz[:1], pz[0] == 0, np.zeros(V, bool)
    elif kind == "reverse_kl":  # KL(Q‖P) with q = 0 where p > 0
        p, q, zero_p, zero_q = qz[:1], pz[:1], np.zeros(V, bool), pz[0] == 0
    else:  # row 2: p = q = 0 in the same columns
        p, q = pz[2:3], qz[2:3]
        zero_p = zero_q = pz[2] == 0
    a, b = jnp.asarray(encode(p, form, 0.0)), jnp.asarray(encode(q, form, 0.0))
    assert math.isfinite(float(kldiv_rows(kind, a, b, form)))
    ga, gb = jax.grad(lambda x, y: kldiv_rows(kind, x, y, form), (0, 1))(a, b)
    ga, gb = np.asarray(ga)[0], np.asarray(gb)[0]
    assert np.isfinite(ga).all() and np.isfinite(gb).all()
    zero_a = zero_p | (zero_q if form != "logits" else False)
    zero_b = zero_q | (zero_p if form != "logits" else False)
    assert (ga[zero_a] == 0).all(), ga
    assert (gb[zero_b] == 0).all(), gb


def test_underflowed_probability_against_zero_is_still_inf_with_finite_gradients():
    # exp(-800) underflows to 0 in float64 while the logit is finite: p > 0 = q, KL = +inf.
    a = jnp.asarray([[0.0, -800.0, -1.0]])
    b = jnp.asarray([[0.0, -INF, -1.0]])
    assert float(kldiv.kl_div(a, b, form="log_probs")) == INF
    ga, gb = jax.grad(lambda x, y: kldiv.kl_div(x, y, form="logits"), (0, 1))(a, b)
    assert np.isfinite(np.asarray(ga)).all() and np.isfinite(np.asarray(gb)).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_half_and_single_precision_logits(rng, kind, dtype):
    """Half inputs are computed in float32 (and single ones stay there); the gradient comes back
    in the input's dtype. The reference is taken from the logits *as rounded to that dtype*, so
    the only errors are float32 arithmetic (the float64 bound above with float32's eps) and, for
    the gradient, one rounding to the input dtype (half its eps, relative)."""
    dt = jnp.dtype(dtype)
    p, q = cases(rng)
    a = jnp.asarray(encode(p, "logits", 0.0)).astype(dt)
    b = jnp.asarray(encode(q, "logits", 0.0)).astype(dt)

    def softmax64(x):
        x = np.asarray(x, np.float64)
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    pr, qr = softmax64(a), softmax64(b)
    ref = reference(kind, pr, qr, **PARAMS.get(kind, {}))
    eps32 = float(np.finfo(np.float32).eps)
    out = kldiv_rows(kind, a, b, "logits", reduction="none")
    assert out.dtype == jnp.float32
    out = np.asarray(out, np.float64)
    np.testing.assert_array_equal(np.isposinf(out), np.isposinf(ref.value))
    fin = np.isfinite(ref.value)
    err = np.abs(out[fin] - ref.value[fin])
    assert (err <= 512 * eps32 * (ref.value_mag[fin] + 1e-30)).all(), (kind, dtype, err.max())

    weights = np.where(fin, np.linspace(0.5, 1.5, len(p)), 0.0)
    ga, gb = jax.grad(
        lambda x, y: jnp.sum(kldiv_rows(kind, x, y, "logits", reduction="none") * weights),
        (0, 1),
    )(a, b)
    assert ga.dtype == dt and gb.dtype == dt
    rows = np.broadcast_to(fin[:, None], p.shape)
    if kind == "tv":
        # |p − q| has no derivative at p = q (see above); here p and q are equal only to the
        # float32 rounding of the softmax, so ties are entries within that rounding
        ties = (np.abs(pr - qr) <= 512 * eps32 * (pr + qr)) & (pr > 0)
        rows = rows & ~(ties | ties.any(-1, keepdims=True))
    w = weights[:, None]
    for got, probs, g, g_mag in ((ga, pr, ref.gp, ref.gp_mag), (gb, qr, ref.gq, ref.gq_mag)):
        exp, mag = chain(
            "logits", probs, np.where(rows, g, 0.0) * w, np.where(rows, g_mag, 0.0) * w
        )
        got = np.asarray(got, np.float64)
        assert np.isfinite(got).all(), (kind, dtype)
        bound = 512 * eps32 * mag + float(jnp.finfo(dt).eps) * np.abs(exp) + 1e-30
        assert (np.abs(np.where(rows, got, 0.0) - np.where(rows, exp, 0.0)) <= bound).all(), (
            kind,
            dtype,
        )


def test_rows_take_the_exact_path_only_where_a_row_has_zero_support(rng):
    """kl_rows sums p·(lp − lq) as is and redoes the sum with the zero-support rules only when a
    row came out NaN: a batch with one such row and a batch with none both match the
    reference, every row of them."""
    p, q = random_rows(rng, 4)
    pz, qz = zero_support_rows()
    with np.errstate(divide="ignore"):
        for a, b in ((p, q), (np.concatenate([p, pz[:1]]), np.concatenate([q, qz[:1]]))):
            lp, lq = jnp.asarray(np.log(a)), jnp.asarray(np.log(b))
            ref = reference("kl", a, b)
            for fn in (
                lambda x, y: _math.kl_rows(jnp, x, y, None, -1),
                jax.jit(lambda x, y: _math.kl_rows(jnp, x, y, None, -1)),
            ):
                out = np.asarray(fn(lp, lq))
                assert np.isfinite(out).all()
                assert_matches(out, ref.value, ref.value_mag, "kl rows")


# --- the rules against the Array API composition they replace ------------------------------------


def generic_namespace():
    """jax.numpy under a name that is not "jax": kldiv._math then takes its generic Array API
    path (the where compositions), differentiated by JAX's autodiff."""
    mod = types.ModuleType("arrayapi_reference")
    mod.__getattr__ = lambda name: getattr(jnp, name)  # type: ignore[method-assign]
    return mod


@pytest.mark.parametrize("given_p", [False, True])
def test_rows_and_mixture_equal_the_generic_composition(rng, given_p):
    gen = generic_namespace()
    p, q = cases(rng)
    with np.errstate(divide="ignore"):
        lp, lq = jnp.asarray(np.log(p)), jnp.asarray(np.log(q))
    for w in (0.3, 0.5, 0.9):
        assert _math.ns.backend_name(gen) == "arrayapi_reference"  # not routed to the rules

        def mix(la, lb, xp, w=w):
            pa, pb = (jnp.exp(la), jnp.exp(lb)) if given_p else (None, None)
            return _math.log_mix(xp, la, lb, w, pa, pb)

        def rows(probs):
            # with the probabilities of the first argument given exactly (the "probs" form)
            given = jnp.asarray(probs) if given_p else None
            return lambda la, lb, xp: _math.kl_rows(xp, la, lb, given, -1)

        for fn, args in ((mix, (lp, lq)), (rows(p), (lp, lq)), (rows(q), (lq, lp))):
            new, old = fn(*args, jnp), fn(*args, gen)
            np.testing.assert_array_equal(np.isinf(new), np.isinf(old))
            fin = np.isfinite(np.asarray(old))
            # The mixture's value is the same composition on both sides; XLA's CPU
            # exp/expm1/log1p round differently from the reference namespace's, which moves
            # a result near 0 by up to ~120 ulp of itself (measured over 200,000 random
            # pairs), hence 512 ulp; any formula error moves it by far more.
            np.testing.assert_allclose(
                np.asarray(new)[fin], np.asarray(old)[fin], rtol=512 * 2.0**-52, atol=1e-15
            )
            cot = jnp.asarray(np.where(fin, rng.normal(size=fin.shape), 0.0))
            g_new = jax.vjp(lambda x, y, f=fn: f(x, y, jnp), *args)[1](cot)
            g_old = jax.vjp(lambda x, y, f=fn: f(x, y, gen), *args)[1](cot)
            for gn, go in zip(g_new, g_old, strict=True):
                gn, go = np.asarray(gn), np.asarray(go)
                assert np.isfinite(gn).all()
                # the rules' gradients equal the composition's on every finite row; on +inf
                # rows (cotangent 0 here) both are 0
                np.testing.assert_allclose(gn, go, rtol=1e-12, atol=1e-15)


def test_mixture_of_a_distribution_with_itself_is_itself(rng):
    p, _ = random_rows(rng, 4)
    with np.errstate(divide="ignore"):
        lp = jnp.asarray(np.log(np.concatenate([p, zero_support_rows()[0]])))
    for w in (1e-300, 0.1, 0.5, 0.9):
        np.testing.assert_array_equal(np.asarray(_math.log_mix(jnp, lp, lp, w)), np.asarray(lp))
    a = jnp.asarray(encode(p, "logits", 0.0))
    for kind in ("js", "skew_kl", "skew_reverse_kl"):
        assert (np.asarray(kldiv_rows(kind, a, a, "logits", reduction="none")) == 0).all()


# --- transforms ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_jit_and_vmap_equal_eager(rng, kind):
    p, q = cases(rng)
    a, b = jnp.asarray(encode(p, "logits", 1.0)), jnp.asarray(encode(q, "logits", -2.0))

    def loss(x, y):
        v = kldiv_rows(kind, x, y, "logits", reduction="none")
        return jnp.sum(jnp.where(jnp.isfinite(v), v, 0.0))

    eager = kldiv_rows(kind, a, b, "logits", reduction="none")
    jitted = jax.jit(lambda x, y: kldiv_rows(kind, x, y, "logits", reduction="none"))(a, b)
    mapped = jax.vmap(lambda x, y: kldiv_rows(kind, x, y, "logits"))(a, b)
    for other in (jitted, mapped):
        np.testing.assert_array_equal(np.isinf(other), np.isinf(eager))
        fin = np.isfinite(np.asarray(eager))
        # fusion under jit reorders the rounding: relative 1e-13, and absolute V·16·eps for
        # rows that cancel to about 0 (p = q up to the log-softmax's rounding)
        np.testing.assert_allclose(
            np.asarray(other)[fin], np.asarray(eager)[fin], rtol=1e-13, atol=V * 16 * EPS
        )
    g_eager = jax.grad(loss, (0, 1))(a, b)
    g_jit = jax.jit(jax.grad(loss, (0, 1)))(a, b)
    g_vmap = jax.vmap(jax.grad(lambda x, y: loss(x[None], y[None]), (0, 1)))(a, b)
    for gs in (g_jit, g_vmap):
        for g, e in zip(gs, g_eager, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", FORMS)
def test_forward_mode_equals_reverse_mode(rng, kind, form):
    p, q = random_rows(rng, 3)
    pz, qz = zero_support_rows()
    keep = [0, 2, 3]  # finite for every kind in one direction or the other
    p, q = np.concatenate([p, pz[keep]]), np.concatenate([q, qz[keep]])
    value = reference(kind, p, q, **PARAMS.get(kind, {})).value
    p, q = p[np.isfinite(value)], q[np.isfinite(value)]
    a, b = jnp.asarray(encode(p, form, 0.5)), jnp.asarray(encode(q, form, 0.0))

    def f(x, y):
        return kldiv_rows(kind, x, y, form)

    ta = jnp.asarray(np.where(np.isfinite(np.asarray(a)), rng.normal(size=p.shape), 0.0))
    tb = jnp.asarray(np.where(np.isfinite(np.asarray(b)), rng.normal(size=q.shape), 0.0))
    _, tangent = jax.jvp(f, (a, b), (ta, tb))
    ga, gb = jax.grad(f, (0, 1))(a, b)
    expected = float(jnp.sum(ga * ta) + jnp.sum(gb * tb))
    assert math.isfinite(float(tangent))
    np.testing.assert_allclose(float(tangent), expected, rtol=1e-11, atol=1e-14)
    jf = jax.jacfwd(f, (0, 1))(a, b)
    jr = jax.jacrev(f, (0, 1))(a, b)
    for x, y in zip(jf, jr, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["logits", "log_probs"])
def test_hessian_matches_finite_differences_of_the_gradient(rng, kind, form):
    # Interior points (every probability ≥ 1e-3), where the divergence is smooth (tv: |p − q|
    # is piecewise linear, its Hessian 0 away from p = q). Central differences with h = 1e-5 err
    # by h²/6·|∂³D| + eps·|∇D|/h ≈ 1e-9 here.
    p, q = random_rows(rng, 2)
    a, b = jnp.asarray(encode(p, form, 0.3)), jnp.asarray(encode(q, form, -0.2))
    f = lambda y: kldiv_rows(kind, a, y, form)  # noqa: E731
    h = jax.hessian(f)(b)
    grad = jax.jit(jax.grad(f))  # compiled once for the 2·size calls below
    eps = 1e-5
    fd = np.zeros(h.shape)
    for idx in np.ndindex(*b.shape):
        e = jnp.zeros(b.shape).at[idx].set(eps)
        fd[(...,) + idx] = (np.asarray(grad(b + e)) - np.asarray(grad(b - e))) / (2 * eps)
    h = np.asarray(h)
    np.testing.assert_allclose(h, np.transpose(h, (2, 3, 0, 1)), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_hessian_is_finite_at_zero_support(kind):
    p, q = zero_support_rows()
    value = reference(kind, p, q, **PARAMS.get(kind, {})).value
    rows = np.isfinite(value)
    a = jnp.asarray(encode(p[rows], "logits", 0.0))
    b = jnp.asarray(encode(q[rows], "logits", 0.0))
    for f, x in (
        (lambda y: kldiv_rows(kind, a, y, "logits"), b),
        (lambda x: kldiv_rows(kind, x, b, "logits"), a),
    ):
        assert np.isfinite(np.asarray(jax.hessian(f)(x))).all(), kind


# --- the rules are what runs ---------------------------------------------------------------------

# custom_jvp calls per divergence from log-probabilities or probabilities: one per KL row sum,
# one per mixture; from logits, every kind is one call of the row engine's rule
EXPECTED_RULES = {
    "kl": 1,
    "reverse_kl": 1,
    "js": 3,
    "skew_kl": 2,
    "skew_reverse_kl": 2,
    "symmetric_kl": 2,
    "tv": 0,
}


@pytest.mark.parametrize("form", FORMS)
def test_the_custom_rules_are_used(form):
    a = jnp.asarray(encode(np.full((2, 3), 1 / 3), form, 0.0))
    for kind in KINDS:
        jaxpr = jax.make_jaxpr(lambda x, y, k=kind: kldiv_rows(k, x, y, form))(a, a)
        calls = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "custom_jvp_call"]
        expected = 1 if form == "logits" else EXPECTED_RULES[kind]
        assert len(calls) == expected, (kind, form, len(calls))


def test_kldiv_imports_no_framework():
    import subprocess
    import sys

    code = "import sys, kldiv; print(sorted(m for m in ('jax', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- the JAX row engine (logits along the last axis) on the inputs that broke it -------------

ENGINE_PARAMS = {"js": {"beta": 0.5}, "skew_kl": {"alpha": 0.1}, "skew_reverse_kl": {"alpha": 0.1}}


def generic_core(kind, a, b, **kw):
    """The same call through the generic core (category axis first), the engine's oracle."""
    return kldiv.divergence(a.T, b.T, kind, form="logits", axis=0, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_engine_gradients_are_finite_where_both_sides_underflow_together(kind):
    """A vocabulary padded with a finite -1e9 in float32: both probabilities underflow to 0
    at the same log-probability, where the plain mixture is 0 (its log is repaired) and the
    value is finite; the gradients must be too, and equal the generic core's."""
    p = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    q = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    p[:, -2:] = q[:, -2:] = -1e9
    a, b = jnp.asarray(p), jnp.asarray(q)
    kw = ENGINE_PARAMS.get(kind, {})
    g = jax.grad(lambda x, y: kldiv.divergence(x, y, kind, form="logits", **kw), (0, 1))(a, b)
    want = jax.grad(lambda x, y: generic_core(kind, x, y, **kw), (0, 1))(a, b)
    for got, ref in zip(g, want, strict=True):
        assert np.isfinite(np.asarray(got)).all(), kind
        # float32: the two paths round differently, each within a few ulp of O(1) entries
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=64 * 2.0**-23)


@pytest.mark.parametrize("kind", KINDS)
def test_engine_second_reverse_derivative_is_finite_at_zero_support(kind):
    """grad of grad (reverse over reverse) at a -inf logit equals the generic core's: the
    plain formulas' 0·inf partials must not meet a zero cotangent."""
    a = jnp.asarray([[-np.inf, 0.3, -0.2], [0.1, 0.5, -0.4]])
    b = jnp.asarray([[0.2, -0.1, 0.4], [0.3, -0.6, 0.2]])
    kw = ENGINE_PARAMS.get(kind, {})

    def outer(f):
        def g2(x, y):
            gx, gy = jax.grad(lambda u, v: f(u, v), (0, 1))(x, y)
            return jnp.sum(gx**2) + jnp.sum(gy**2)

        return jax.grad(g2, (0, 1))(a, b)

    got = outer(lambda u, v: kldiv.divergence(u, v, kind, form="logits", reduction="sum", **kw))
    want = outer(lambda u, v: generic_core(kind, u, v, reduction="sum", **kw))
    for x, y in zip(got, want, strict=True):
        assert np.isfinite(np.asarray(x)).all(), kind
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_engine_is_exact_for_huge_logits_at_a_temperature(kind):
    """±1e30 logits at T ≠ 1 under jit: the row maximum is subtracted before the division, so
    the top entry's log-probability is exactly 0 and nothing overflows (a multiply by 1/T
    contracted with the subtraction would leave +inf − +inf)."""
    kw = ENGINE_PARAMS.get(kind, {})
    x = jnp.asarray([[1e30, 0.0], [5.0, 1e30]])
    y = jnp.asarray([[1e30, 1.0], [1e30, 2.0]])
    for t in (0.7, 2.5):
        got = jax.jit(
            lambda u, v, t=t: kldiv.divergence(
                u, v, kind, form="logits", temperature=t, reduction="none", **kw
            )
        )(x, y)  # noqa: E501
        want = generic_core(kind, x, y, temperature=t, reduction="none", **kw)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-300)
        g = jax.jit(
            jax.grad(
                lambda v, t=t: kldiv.divergence(x, v, kind, form="logits", temperature=t, **kw)
            )
        )(y)  # noqa: E501
        assert np.isfinite(np.asarray(g)).all(), (kind, t)


@pytest.mark.parametrize("kind", ["skew_kl", "skew_reverse_kl", "js"])
def test_engine_counts_a_subnormal_weight(kind):
    """A float32-subnormal weight (1e-40) still weighs its component: the mixture is formed
    from the weights' logarithms, so the value matches the generic core's and stays finite."""
    a = jnp.asarray([[0.0, -60.0]], jnp.float32)
    b = jnp.asarray([[-92.0, 0.0]], jnp.float32)
    kw = {"beta" if kind == "js" else "alpha": 1e-40}
    got = kldiv.divergence(a, b, kind, form="logits", **kw)
    want = generic_core(kind, a, b, **kw)
    assert np.isfinite(float(got))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    g = jax.grad(lambda u, v: kldiv.divergence(u, v, kind, form="logits", **kw), (0, 1))(a, b)
    assert all(np.isfinite(np.asarray(x)).all() for x in g)
