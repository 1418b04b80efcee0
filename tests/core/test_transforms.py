"""jax.jit / vmap / grad and torch.compile(fullgraph=True) agree with eager execution."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_divergences import KINDS, PARAMS, encode, pair

import kldiv


def all_kinds(x, y, mask, **kw):
    """Every divergence in one traced function, so the compiler is paid for once per test."""
    stack = torch.stack if isinstance(x, torch.Tensor) else jnp.stack
    return stack([kldiv.divergence(x, y, k, mask=mask, **PARAMS.get(k, {}), **kw) for k in KINDS])


@pytest.fixture
def logits(rng):
    # Full support: the reverse and symmetric KL would be +inf otherwise, and gradients of an
    # infinite value are not specified (the zero-support cases are tested separately).
    p, q = pair(rng, (6, 9), p_zeros=0.0)
    mask = np.array([True, True, False, True, False, True])
    return encode(p, "logits", rng), encode(q, "logits", rng), mask


def test_jax_jit_matches_eager(logits):
    a, b, mask = map(jnp.asarray, logits)
    fn = functools.partial(all_kinds, form="logits", temperature=1.5)
    eager = fn(a, b, mask)
    jitted = jax.jit(fn)(a, b, mask)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-12)


def test_jax_grad_under_jit_matches_eager(logits):
    a, b, mask = map(jnp.asarray, logits)

    def loss(x, y):
        return jnp.sum(all_kinds(x, y, mask, form="logits"))

    eager = jax.grad(loss, argnums=(0, 1))(a, b)
    jitted = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)
    for e, j in zip(eager, jitted, strict=True):
        assert np.isfinite(np.asarray(j)).all()
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_jax_vmap_matches_batched_call(logits, kind):
    a, b, _ = map(jnp.asarray, logits)
    params = PARAMS.get(kind, {})
    per_row = jax.vmap(lambda x, y: kldiv.divergence(x, y, kind, form="logits", **params))(a, b)
    batched = kldiv.divergence(a, b, kind, form="logits", reduction="none", **params)
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(batched), rtol=1e-13)


def test_jax_vmap_over_an_extra_axis_with_jit(logits):
    a, b, mask = map(jnp.asarray, logits)
    stacked_a, stacked_b = jnp.stack([a, a + 1.0, 2 * a]), jnp.stack([b, b, b - 3.0])
    fn = jax.jit(jax.vmap(lambda x, y: kldiv.kl_div(x, y, form="logits", mask=mask)))
    out = fn(stacked_a, stacked_b)
    expected = [
        kldiv.kl_div(x, y, form="logits", mask=mask)
        for x, y in zip(stacked_a, stacked_b, strict=True)
    ]
    np.testing.assert_allclose(np.asarray(out), np.asarray(jnp.stack(expected)), rtol=1e-12)


def test_torch_compile_fullgraph_matches_eager(logits):
    torch._dynamo.reset()
    a_np, b_np, mask_np = logits
    mask = torch.tensor(mask_np)
    results = []
    for compiled in (False, True):
        a = torch.tensor(a_np, requires_grad=True)
        b = torch.tensor(b_np, requires_grad=True)
        fn = functools.partial(all_kinds, form="logits", temperature=2.0)
        if compiled:
            fn = torch.compile(fn, fullgraph=True)
        out = fn(a, b, mask)
        out.sum().backward()
        results.append((out.detach().numpy(), a.grad.numpy(), b.grad.numpy()))
    for eager, comp in zip(*results, strict=True):
        assert np.isfinite(comp).all()
        np.testing.assert_allclose(comp, eager, rtol=1e-10, atol=1e-13)


def test_torch_compile_fullgraph_probs_float32_with_zeros(rng):
    torch._dynamo.reset()
    p, q = pair(rng, (4, 7), p_zeros=0.3)
    P = torch.tensor(p, dtype=torch.float32)
    Q = torch.tensor(q, dtype=torch.float32, requires_grad=True)

    def fn(x, y):
        return kldiv.kl_div(x, y) + kldiv.js_div(x, y, beta=0.2) + kldiv.tv_distance(x, y)

    eager = fn(P, Q)
    (g_eager,) = torch.autograd.grad(eager, Q)
    compiled = torch.compile(fn, fullgraph=True)(P, Q)
    (g_comp,) = torch.autograd.grad(compiled, Q)
    np.testing.assert_allclose(compiled.item(), eager.item(), rtol=1e-5)
    np.testing.assert_allclose(g_comp.numpy(), g_eager.numpy(), rtol=1e-4, atol=1e-6)


def test_jax_jit_grad_with_zero_support_is_finite_and_matches_eager(rng):
    p, q = pair(rng, (5, 8), p_zeros=0.4)  # q has full support: these values are all finite
    a = jnp.asarray(encode(p, "logits", rng))
    b = jnp.asarray(encode(q, "logits", rng))
    for kind in ("kl", "js", "skew_kl", "skew_reverse_kl", "tv"):
        params = PARAMS.get(kind, {})

        def loss(x, y, k=kind, kw=params):
            return kldiv.divergence(x, y, k, form="logits", **kw)

        eager = jax.grad(loss, argnums=(0, 1))(a, b)
        jitted = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)
        for e, j in zip(eager, jitted, strict=True):
            assert np.isfinite(np.asarray(j)).all(), kind
            np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-11, atol=1e-14)


def test_jax_default_float32_mode_in_a_fresh_process():
    """The suite enables x64; most users do not. Run the family jitted in JAX's default mode."""
    import subprocess
    import sys

    code = """
import jax, jax.numpy as jnp, numpy as np, kldiv
assert not jax.config.jax_enable_x64
a = jax.random.normal(jax.random.PRNGKey(0), (5, 7))
b = jax.random.normal(jax.random.PRNGKey(1), (5, 7)).at[0, 0].set(-jnp.inf)
mask = jnp.array([True, True, False, True, True])
for kind in kldiv.KINDS:
    f = jax.jit(lambda x, y, k=kind: kldiv.divergence(x, y, k, form="logits", mask=mask, num_items=4.0))
    v = f(a, b)
    g = jax.grad(lambda y, k=kind: kldiv.divergence(a, y, k, form="logits", mask=mask))(b)
    assert v.dtype == jnp.float32 and g.dtype == jnp.float32, (kind, v.dtype, g.dtype)
    assert bool(jnp.isfinite(g).all()), kind
    ref = kldiv.divergence(np.asarray(a, np.float64), np.asarray(b, np.float64), kind,
                           form="logits", mask=np.asarray(mask), num_items=4.0)
    np.testing.assert_allclose(float(v), float(ref), rtol=2e-5)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_torch_func_transforms_compose_with_the_custom_backward(rng):
    from torch.func import grad, jacrev, jvp, vmap

    a = torch.tensor(rng.normal(size=(1, 5)))
    b = torch.tensor(rng.normal(size=(3, 5)))
    for kind in KINDS:
        params = PARAMS.get(kind, {})

        def f(x, y, k=kind, kw=params):
            return kldiv.divergence(x, y, k, form="logits", **kw)

        x = a.clone().requires_grad_(True)
        f(x, b).backward()
        np.testing.assert_allclose(grad(f)(a, b).numpy(), x.grad.numpy(), rtol=1e-12)
        per_row = vmap(f)(b, b.flip(0))
        expected = kldiv.divergence(b, b.flip(0), kind, form="logits", reduction="none", **params)
        np.testing.assert_allclose(per_row.numpy(), expected.numpy(), rtol=1e-12)
        assert jacrev(lambda x, k=kind: f(x, b, k))(a).shape == (1, 5)
        tangent = torch.tensor(rng.normal(size=(1, 5)))
        _, t = jvp(lambda x, k=kind: f(x, b, k), (a,), (tangent,))
        np.testing.assert_allclose(t.item(), float((x.grad * tangent).sum()), rtol=1e-9, atol=1e-12)


def test_hessian_with_broadcast_arguments_matches_jax(rng):
    # The custom backward used to save broadcast views, which cut double backward from the
    # inputs whenever p and q had different shapes (a non-PSD Hessian came out).
    a = rng.normal(size=(1, 4))
    b = rng.normal(size=(3, 4))
    for form in ("logits", "probs"):
        A = a if form == "logits" else np.exp(a) / np.exp(a).sum()
        B = b if form == "logits" else np.exp(b) / np.exp(b).sum(-1, keepdims=True)
        for kind in ("kl", "reverse_kl", "js"):
            ht = torch.autograd.functional.hessian(
                lambda x, k=kind, B=B, f=form: kldiv.divergence(x, torch.tensor(B), k, form=f),
                torch.tensor(A),
            )
            hj = jax.hessian(
                lambda x, k=kind, B=B, f=form: kldiv.divergence(x, jnp.asarray(B), k, form=f)
            )(jnp.asarray(A))
            np.testing.assert_allclose(ht.numpy(), np.asarray(hj), rtol=1e-9, atol=1e-12)
        assert torch.autograd.gradgradcheck(
            lambda x, y, f=form: kldiv.kl_div(x, y, form=f),
            (torch.tensor(A, requires_grad=True), torch.tensor(B, requires_grad=True)),
        )
