"""kldiv.compat against the real packages (PyTorch, Keras 3, optax, SciPy), values and
gradients, with zeros and -inf in the inputs; and the core against SciPy where they agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kldiv
from kldiv import compat

FIXTURES = Path(__file__).parents[1] / "fixtures"


def log_probs(rng, shape, zeros=0.3):
    """Rows of log-probabilities with some -inf entries (zero probability)."""
    x = rng.normal(size=shape)
    x = np.where(rng.random(shape) < zeros, -np.inf, x)
    x[..., 0] = np.where(np.isinf(x).all(-1), 0.0, x[..., 0])
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def same(a, b, rtol=1e-12, atol=1e-14):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_array_equal(np.isposinf(a), np.isposinf(b))
    ok = np.isfinite(b)
    np.testing.assert_allclose(a[ok], b[ok], rtol=rtol, atol=atol)


@pytest.mark.parametrize("reduction", ["none", "mean", "batchmean", "sum"])
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 5)])
def test_torch_kl_div_parity(xp, rng, reduction, log_target, shape):
    inp = log_probs(rng, shape)
    lt = log_probs(rng, shape)
    tgt = lt if log_target else np.exp(lt)
    with pytest.warns(UserWarning) if reduction == "mean" else _nullcontext():
        ref = F.kl_div(
            torch.tensor(inp), torch.tensor(tgt), reduction=reduction, log_target=log_target
        )
    got = compat.torch_kl_div(xp.asarray(inp), xp.asarray(tgt), reduction, log_target)
    same(xp.to_numpy(got), ref.numpy())
    module = torch.nn.KLDivLoss(reduction=reduction, log_target=log_target)
    with pytest.warns(UserWarning) if reduction == "mean" else _nullcontext():
        same(xp.to_numpy(got), module(torch.tensor(inp), torch.tensor(tgt)).numpy())


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_torch_kl_div_gradients_where_finite(rng):
    inp = log_probs(rng, (3, 6), zeros=0.0)
    tgt = np.exp(log_probs(rng, (3, 6), zeros=0.0))
    grads = []
    for fn in (F.kl_div, compat.torch_kl_div):
        a = torch.tensor(inp, requires_grad=True)
        b = torch.tensor(tgt, requires_grad=True)
        fn(a, b, reduction="batchmean").backward()
        grads.append((a.grad, b.grad))
    for x, y in zip(*grads, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_torch_kl_div_target_gradient_at_zero_is_nan_like_torch(ad):
    inp = np.array([[-1.0, -0.5, -2.0]])
    tgt = np.array([[0.0, 0.6, 0.4]])
    a, b = torch.tensor(inp, requires_grad=True), torch.tensor(tgt, requires_grad=True)
    F.kl_div(a, b, reduction="sum").backward()
    got = ad.grad(lambda x, y: compat.torch_kl_div(x, y, "sum"), ad.asarray(inp), ad.asarray(tgt))
    same(got[0], a.grad.numpy())
    same(got[1], b.grad.numpy())  # NaN at the zero target, finite elsewhere


def test_torch_quirks_are_kept_and_the_core_differs():
    inp = torch.tensor([[-np.inf, 0.0]])
    tgt = torch.tensor([[0.0, 1.0]])
    assert torch.isnan(F.kl_div(inp, tgt, reduction="sum"))
    assert torch.isnan(compat.torch_kl_div(inp, tgt, reduction="sum"))
    assert kldiv.kl_div(tgt, inp, form=("probs", "log_probs"), reduction="sum") == 0.0
    # "mean" divides by N·V; the core's mean is per distribution
    x, t = torch.log_softmax(torch.randn(4, 10), -1), torch.softmax(torch.randn(4, 10), -1)
    with pytest.warns(UserWarning):
        torch_mean = F.kl_div(x, t, reduction="mean")
    core = kldiv.kl_div(t, x, form=("probs", "log_probs"))
    torch.testing.assert_close(torch_mean * 10, core)


def test_keras_parity_values_and_the_clip(rng):
    import keras

    p = np.exp(log_probs(rng, (5, 6)))
    q = np.exp(log_probs(rng, (5, 6)))
    ref = np.asarray(keras.losses.kl_divergence(p, q))
    same(np.asarray(compat.keras_kl_divergence(p, q)), ref, rtol=1e-6)
    obj = float(keras.losses.KLDivergence()(p, q))
    assert obj == pytest.approx(float(np.mean(compat.keras_kl_divergence(p, q))), rel=1e-6)
    # where q = 0 < p, Keras is finite (the clip) and the core is +inf
    hole = (q == 0) & (p > 0)
    assert hole.any()
    assert np.isfinite(ref).all()
    assert np.isinf(np.asarray(kldiv.kl_div(p, q, reduction="none"))[hole.any(-1)]).all()


def test_optax_parity_values_and_gradients(rng):
    import jax
    import jax.numpy as jnp
    import optax

    lpred = log_probs(rng, (4, 6))
    lt = log_probs(rng, (4, 6))
    t = np.exp(lt)
    same(
        compat.optax_kl_divergence(jnp.asarray(lpred), jnp.asarray(t)),
        optax.losses.kl_divergence(jnp.asarray(lpred), jnp.asarray(t)),
    )
    same(
        compat.optax_kl_divergence_with_log_targets(jnp.asarray(lpred), jnp.asarray(lt)),
        optax.losses.kl_divergence_with_log_targets(jnp.asarray(lpred), jnp.asarray(lt)),
    )
    fin_pred = log_probs(rng, (4, 6), zeros=0.0)
    for ours, theirs, second in (
        (compat.optax_kl_divergence, optax.losses.kl_divergence, t),
        (
            compat.optax_kl_divergence_with_log_targets,
            optax.losses.kl_divergence_with_log_targets,
            log_probs(rng, (4, 6), zeros=0.0),
        ),
    ):
        g1 = jax.grad(lambda a, b, f=ours: f(a, b).sum(), argnums=(0, 1))(
            jnp.asarray(fin_pred), jnp.asarray(second)
        )
        g2 = jax.grad(lambda a, b, f=theirs: f(a, b).sum(), argnums=(0, 1))(
            jnp.asarray(fin_pred), jnp.asarray(second)
        )
        for x, y in zip(g1, g2, strict=True):
            same(x, y)


def test_scipy_parity(xp, rng):
    from scipy import special, stats

    a = np.abs(rng.normal(size=(40,)))
    b = np.abs(rng.normal(size=(40,)))
    a[::5] = 0.0
    b[::7] = 0.0
    a[3], b[4] = -1.0, -2.0
    a[6] = np.nan
    same(
        xp.to_numpy(compat.scipy_rel_entr(xp.asarray(a), xp.asarray(b))),
        special.rel_entr(a, b),
        rtol=1e-13,  # SciPy's (glibc) log/log1p and XLA's differ by up to ~1.5e-14 relative
        atol=1e-16,
    )
    # SciPy's own branches: near x = y, ratios that overflow or underflow, float32 stays float32
    # 2.22e-308/1e15 and 1e-290/1e20 are subnormal ratios: SciPy's gh-20710 takes log x − log y
    x = np.array([1e300, 2.0, 1e-3, 0.3, 1e-310, 3.0, 0.25, 2.22e-308, 1e-290])
    y = np.array(
        [1e-300, 1e-320, 1e-3 * (1 + 1e-13), 0.7, 1e300, 1e-200, 0.25 * (1 - 1e-9), 1e15, 1e20]
    )
    if xp.name == "jax":  # XLA on CPU flushes subnormals (1e-320, 1e-310, x/y) to zero
        x, y = np.delete(x, [1, 4, 7, 8]), np.delete(y, [1, 4, 7, 8])
    same(
        xp.to_numpy(compat.scipy_rel_entr(xp.asarray(x), xp.asarray(y))),
        special.rel_entr(x, y),
        rtol=1e-14,
        atol=0,
    )
    f32 = compat.scipy_rel_entr(xp.asarray(a, "float32"), xp.asarray(b, "float32"))
    assert xp.dtype_name(f32) == "float32"
    # a Python number takes the other argument's float dtype, as in NumPy 2 and SciPy
    assert xp.dtype_name(compat.scipy_rel_entr(xp.asarray(a, "float32"), 2)) == "float32"
    assert xp.dtype_name(compat.scipy_rel_entr(0.5, xp.asarray(b, "float32"))) == "float32"
    # integers compute in float64, as SciPy does
    ia, ib = np.array([3, 0, 2, 1]), np.array([1, 1, 0, 4])
    ints = compat.scipy_rel_entr(xp.asarray(ia), xp.asarray(ib))
    assert xp.dtype_name(ints) == "float64"
    same(xp.to_numpy(ints), special.rel_entr(ia, ib), rtol=1e-14, atol=0)
    # the core agrees with SciPy wherever the semantics do (normalised inputs)
    p = np.exp(log_probs(rng, (6, 9)))
    q = np.exp(log_probs(rng, (6, 9)))
    core = xp.to_numpy(kldiv.kl_div(xp.asarray(p), xp.asarray(q), reduction="none"))
    same(core, stats.entropy(p, q, axis=-1), rtol=1e-12)
    same(core, special.rel_entr(p, q).sum(-1), rtol=1e-12)
    same(core, special.kl_div(p, q).sum(-1), rtol=1e-10, atol=1e-12)


def test_mxnet_parity_with_recorded_fixtures(xp):
    """Fixtures from the real MXNet 1.9.1 (tests/fixtures/make_mxnet_fixtures.py)."""
    data = json.loads(FIXTURES.joinpath("mxnet_kl_div_loss.json").read_text())
    assert data["mxnet"] == "1.9.1"
    for case in data["cases"]:
        sw = case["sample_weight"]
        got = compat.mxnet_kl_div_loss(
            xp.asarray(np.array(case["pred"])),
            xp.asarray(np.array(case["label"])),
            sample_weight=None if sw is None else xp.asarray(np.array(sw)),
            **case["kwargs"],
        )
        expected = np.array([np.nan if v is None else v for v in case["out"]])
        same(xp.to_numpy(got).ravel(), expected, rtol=1e-12)


def test_mxnet_average_reproduces_the_seed_tutorial():
    # The MXNet tutorial's kl_divergence(a, b) passes log(a) as pred and b as label and reports
    # values "smaller than the true definition by a factor of the number of categories".
    d1 = np.array([[0.2, 0.5, 0.2, 0.1]])
    d2 = np.array([[0.3, 0.4, 0.1, 0.2]])
    by_hand = float(np.sum(d2 * (np.log(d2 + 1e-12) - np.log(d1)))) / 4
    got = compat.mxnet_kl_div_loss(np.log(d1), d2, average=True)
    assert float(got[0]) == pytest.approx(by_hand, rel=1e-14)
    summed = compat.mxnet_kl_div_loss(np.log(d1), d2)  # 1.9.1's default: the sum
    assert float(summed[0]) == pytest.approx(float(kldiv.kl_div(d2, d1)), rel=1e-10)


def test_tf_idiom_equals_the_core_and_can_go_negative_in_float32(rng):
    a = rng.normal(size=(5, 8))
    b = rng.normal(size=(5, 8))
    same(
        compat.tf_kl_from_logits(a, b),
        kldiv.kl_div(a, b, form="logits", reduction="none"),
        rtol=1e-10,
    )
    x = rng.normal(scale=8.0, size=(2000, 64)).astype(np.float32)
    y = x + np.float32(1e-6) * rng.normal(size=x.shape).astype(np.float32)
    assert (compat.tf_kl_from_logits(x, y) < 0).any()  # the cancellation the core avoids


def trl_cases():
    data = json.loads(FIXTURES.joinpath("trl_generalized_jsd.json").read_text())
    for case in data["cases"]:
        t = np.array(case["teacher"])
        t[t <= -1e300] = -np.inf
        lab = None if case["labels"] is None else np.array(case["labels"])
        yield case, np.array(case["student"]), t, lab


def test_trl_parity_with_recorded_fixtures(xp):
    """Fixtures from the real TRL (tests/fixtures/make_trl_fixtures.py)."""
    n = 0
    for case, s, t, lab in trl_cases():
        got = compat.trl_generalized_jsd_loss(
            xp.asarray(s),
            xp.asarray(t),
            labels=None if lab is None else xp.asarray(lab),
            **case["kwargs"],
        )
        expected = np.array([np.nan if v is None else v for v in case["out"]])
        same(xp.to_numpy(got).ravel(), expected, rtol=1e-12, atol=1e-15)
        n += 1
    assert n >= 28


def test_trl_gradients_and_the_core_between_the_endpoints(ad):
    for case, s, t, lab in trl_cases():
        kw = case["kwargs"]
        if case["grad_student"] is None:
            continue
        (g,) = ad.grad(
            lambda x, kw=kw, t=t, lab=lab: compat.trl_generalized_jsd_loss(
                x, ad.asarray(t), labels=None if lab is None else ad.asarray(lab), **kw
            ),
            ad.asarray(s),
        )
        same(g, np.array(case["grad_student"]), rtol=1e-10, atol=1e-14)
        beta = kw.get("beta", 0.5)
        if 0 < beta < 1 and lab is not None and "num_items_in_batch" not in kw:
            # TRL's batchmean with labels is kldiv.js_div's token mean over unmasked tokens
            core = kldiv.js_div(
                ad.asarray(t),
                ad.asarray(s),
                beta=beta,
                form="logits",
                temperature=kw.get("temperature", 1.0),
                mask=ad.asarray(lab != -100),
            )
            assert float(ad.to_numpy(core)) == pytest.approx(case["out"][0], rel=1e-12)


def test_verl_parity_with_recorded_fixtures(ad):
    """Fixtures from the real verl (tests/fixtures/make_verl_fixtures.py): values and the
    gradient with respect to logprob, for every kl_penalty mode."""
    data = json.loads(FIXTURES.joinpath("verl_kl_penalty.json").read_text())
    lp, ref = np.array(data["logprob"]), np.array(data["ref_logprob"])
    modes = set()
    for case in data["cases"]:
        mode = case["mode"]
        got = compat.verl_kl_penalty(ad.asarray(lp), ad.asarray(ref), mode)
        # verl's k3 is e^ℓ − ℓ − 1 term by term, kldiv's expm1(ℓ) − ℓ: same value to ~1e-16
        same(ad.to_numpy(got), np.array(case["out"]), rtol=1e-12, atol=1e-15)
        (g,) = ad.grad(
            lambda x, m=mode: compat.verl_kl_penalty(x, ad.asarray(ref), m).sum(), ad.asarray(lp)
        )
        same(g, np.array(case["grad"]), rtol=1e-12, atol=1e-15)
        modes.add(mode)
    assert {"k1", "k2", "k3", "abs", "low_var_kl", "k3+"} <= modes
