"""The row specification (``kldiv._spec``) against the float64 core, and every
engine (tensor code, the C kernel, the Triton kernels in the interpreter, the core itself)
against the specification: values and student gradients, on rows with every zero-support
pattern each kind allows, at T = 1 and T = 2.5, for every weight class.

Error bound for the float32 engines: logits shifted by their row maximum span at most R, every
term carries a few ulp of its exp/log and of a log-ratio ≤ 2R, so a value or a gradient entry
is within ``16·(R + 1)·eps32`` of the float64 specification (twice the worst case of that
analysis). The specification against the core, both in float64: ``64·eps64·(R + 1)·V``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kldiv
from kldiv import _spec as spec
from kldiv._kinds import ENGINE_KINDS, params_of
from kldiv.torch._rows import native as native_engine
from kldiv.torch._rows import tensor as tensor_engine

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)
WEIGHTS = {"js": 0.3, "skew_kl": 0.2, "skew_reverse_kl": 0.7}
ENGINES = ["tensor", "c", "triton", "core", "jax"]
SPEC_KINDS = [*ENGINE_KINDS, "symmetric_kl"]  # the JAX engine computes symmetric KL too


def case(rng, kind, n=6, v=40):
    """Teacher and student logits with the zero-support patterns ``kind`` gives meaning to:
    zeros on both sides at one category, the teacher alone (finite unless KL(S‖T) sees q > 0
    there), the student alone (finite unless KL(T‖S) sees p > 0 there), and one row that is
    +inf where the kind has infinite rows."""
    t = rng.normal(scale=2.0, size=(n, v))
    s = rng.normal(scale=2.0, size=(n, v))
    t[:, 0] = s[:, 0] = -np.inf
    t[:3, 1] = -np.inf
    s[2:5, 2] = -np.inf
    if kind == "kl":
        s[1, 1] = -np.inf  # a zero under a zero: still finite
    if kind in ("reverse_kl", "symmetric_kl"):
        t[2, 2] = -np.inf
    return t, s


def infinite_rows(kind, t, s):
    p_pos, q_pos = np.isfinite(t), np.isfinite(s)
    if kind == "kl":
        return (p_pos & ~q_pos).any(-1)
    if kind == "reverse_kl":
        return (q_pos & ~p_pos).any(-1)
    if kind == "symmetric_kl":
        return (p_pos != q_pos).any(-1)
    return np.zeros(t.shape[0], bool)


def spread(*xs):
    out = 0.0
    for x in xs:
        hi = np.where(np.isfinite(x), x, -np.inf).max(-1)
        lo = np.where(np.isfinite(x), x, np.inf).min(-1)
        out = max(out, float((hi - lo).max()))
    return out


@pytest.mark.parametrize("kind", SPEC_KINDS)
def test_the_specification_is_the_core(rng, kind):
    """Value, h_p and h_q equal the float64 core's value and autograd gradients with respect
    to the log-probabilities (``form="log_probs"``), infinite rows included."""
    t, s = case(rng, kind)
    lp = torch.log_softmax(torch.tensor(t), -1).requires_grad_()
    lq = torch.log_softmax(torch.tensor(s), -1).requires_grad_()
    w = WEIGHTS.get(kind, 0.5)
    params = params_of(kind, beta=w, alpha=w)
    core = kldiv.divergence(lp, lq, kind, form="log_probs", reduction="none", **params)
    g_p, g_q = torch.autograd.grad(core.sum(), (lp, lq))
    value, h_p, h_q = spec.rows(kind, lp.detach(), lq.detach(), w)
    inf = infinite_rows(kind, t, s)
    assert np.array_equal(np.isinf(value.numpy()), inf) and (value[torch.tensor(inf)] > 0).all()
    tol = 64 * EPS64 * (spread(t, s) + 1) * t.shape[1]
    finite = torch.tensor(~inf)
    torch.testing.assert_close(value[finite], core.detach()[finite], rtol=0, atol=tol)
    assert torch.isfinite(h_p).all() and torch.isfinite(h_q).all()
    torch.testing.assert_close(h_q, g_q, rtol=0, atol=tol)
    torch.testing.assert_close(h_p, g_p, rtol=0, atol=tol)


@pytest.mark.parametrize("kind", ENGINE_KINDS)
def test_the_specification_is_the_core_at_the_endpoints(rng, kind):
    """Weights 0 and 1: the registry's endpoints (identically 0, or plain KL / reverse KL)."""
    if kind not in WEIGHTS:
        assert params_of(kind) == {}
        return
    t, s = case(rng, "js")
    lp, lq = torch.log_softmax(torch.tensor(t), -1), torch.log_softmax(torch.tensor(s), -1)
    for w in (0.0, 1.0):
        params = params_of(kind, beta=w, alpha=w)
        core = kldiv.divergence(lp, lq, kind, form="log_probs", reduction="none", **params)
        value = spec.rows(kind, lp, lq, w)[0]
        np.testing.assert_allclose(value.numpy(), core.numpy(), rtol=1e-12, atol=1e-12)


def engine_rows(engine, kind, t, s, temperature, w, monkeypatch):
    """Per-row values and the student gradient (float64) from one engine."""
    params = params_of(kind, beta=w, alpha=w)
    beta, alpha = params.get("beta", 0.5), params.get("alpha", 0.1)
    if engine == "core":
        x = torch.tensor(s, requires_grad=True)
        out = kldiv.divergence(
            torch.tensor(t), x, kind, form="logits", temperature=temperature,
            reduction="none", **params,
        )  # fmt: skip
        (g,) = torch.autograd.grad(out.sum(), x)
        return out.detach(), g
    t32 = torch.tensor(t, dtype=torch.float32)
    s32 = torch.tensor(s, dtype=torch.float32)
    if engine == "jax":
        import jax
        import jax.numpy as jnp

        def f(x):
            return kldiv.divergence(
                jnp.asarray(t, jnp.float32), x, kind, form="logits", temperature=temperature,
                reduction="none", **params,
            )  # fmt: skip

        out, pull = jax.vjp(f, jnp.asarray(s, jnp.float32))
        (g,) = pull(jnp.ones_like(out))
        return torch.tensor(np.asarray(out), dtype=torch.float64), torch.tensor(
            np.asarray(g), dtype=torch.float64
        )
    if engine == "triton":
        from kldiv.torch._rows.triton import ops as triton_ops

        x = s32.clone().requires_grad_()
        out = triton_ops.per_row(kind, x, t32, None, temperature, w)
        (g,) = torch.autograd.grad(out.sum(), x)
        return out.detach().double(), g.double()
    if engine == "tensor":
        monkeypatch.setenv("KLDIV_NATIVE", "0")
    else:
        monkeypatch.delenv("KLDIV_NATIVE", raising=False)
        assert native_engine.usable("kl", torch.device("cpu")), native_engine.status()
    values, grad = tensor_engine.chunked_forward(
        kind, s32, t32, None, temperature, True, beta, alpha=alpha
    )
    return values.double(), grad.double()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind", SPEC_KINDS)
def test_every_engine_computes_the_specification(rng, engine, kind, temperature, monkeypatch):
    if kind == "symmetric_kl" and engine not in ("jax", "core"):
        assert kind not in ENGINE_KINDS  # the torch engines run it as two kinds
        return
    t, s = case(rng, kind)
    w = WEIGHTS.get(kind, 0.5)
    lp = torch.log_softmax(torch.tensor(t) / temperature, -1)
    lq = torch.log_softmax(torch.tensor(s) / temperature, -1)
    value, _, h_q = spec.rows(kind, lp, lq, w)
    want_grad = spec.through_softmax(h_q, lq, temperature)
    got, grad = engine_rows(engine, kind, t, s, temperature, w, monkeypatch)
    inf = torch.tensor(infinite_rows(kind, t, s))
    assert torch.equal(torch.isinf(got), inf) and (got[inf] > 0).all()
    tol = 16 * (spread(t, s) / temperature + 1) * EPS32
    torch.testing.assert_close(got[~inf], value[~inf], rtol=0, atol=tol)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=tol)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind", SPEC_KINDS)
def test_the_jax_engine_gives_the_teacher_its_gradient(rng, kind, temperature):
    """Both sides differentiated on the JAX engine: the teacher's gradient is the
    specification's ``h_p`` through the softmax, finite on every zero-support pattern."""
    import jax
    import jax.numpy as jnp

    t, s = case(rng, kind)
    w = WEIGHTS.get(kind, 0.5)
    params = params_of(kind, beta=w, alpha=w)
    lp = torch.log_softmax(torch.tensor(t) / temperature, -1)
    lq = torch.log_softmax(torch.tensor(s) / temperature, -1)
    _, h_p, h_q = spec.rows(kind, lp, lq, w)

    def loss(a, b):
        v = kldiv.divergence(
            a, b, kind, form="logits", temperature=temperature, reduction="none", **params
        )
        return jnp.sum(jnp.where(jnp.isfinite(v), v, 0.0))

    g_t, g_s = jax.grad(loss, (0, 1))(jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32))
    tol = 16 * (spread(t, s) / temperature + 1) * EPS32
    for got, h, lx in ((g_t, h_p, lp), (g_s, h_q, lq)):
        got = torch.tensor(np.asarray(got), dtype=torch.float64)
        assert torch.isfinite(got).all()
        # rows that are +inf are left out of the loss above, so their gradient is 0
        keep = torch.tensor(~infinite_rows(kind, t, s))[:, None]
        want = torch.where(keep, spec.through_softmax(h, lx, temperature), 0.0)
        torch.testing.assert_close(got, want, rtol=0, atol=tol)


@pytest.mark.parametrize("kind", SPEC_KINDS)
def test_the_plain_formulas_are_the_exact_ones_on_finite_rows(rng, kind):
    """``exact=False`` (no zero-support masks, mixtures from the probabilities) equals the
    exact specification on every row whose plain value is finite, and is non-finite on every
    row with zero support, so an engine that checks its value knows when to switch."""
    t, s = case(rng, kind)
    t[5] = s[5] = rng.normal(size=t.shape[1])  # rows without zero support
    t[4] = rng.normal(size=t.shape[1])
    s[4] = rng.normal(size=t.shape[1])
    w = WEIGHTS.get(kind, 0.5)
    lp, lq = torch.log_softmax(torch.tensor(t), -1), torch.log_softmax(torch.tensor(s), -1)
    exact = spec.rows(kind, lp, lq, w)
    plain = spec.rows(kind, lp, lq, w, exact=False)
    fin = torch.isfinite(plain[0])
    # rows 0-3 have a category that is zero on both sides (case()): 0·inf in the plain
    # formulas of every kind but TV, whose plain formula needs no mask
    want_fin = torch.tensor([kind == "tv"] * 4 + [True, True])
    assert torch.equal(fin, want_fin), fin
    tol = 64 * EPS64 * (spread(t, s) + 1) * t.shape[1]
    torch.testing.assert_close(plain[0][fin], exact[0][fin], rtol=0, atol=tol)
    for a, b in zip(plain[1:], exact[1:], strict=True):
        torch.testing.assert_close(a[fin], b[fin], rtol=0, atol=tol)
    assert plain[0][5] == 0 and exact[0][5] == 0  # a distribution against itself
