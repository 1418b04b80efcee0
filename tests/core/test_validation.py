"""Every validation error: its type and its message."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch

import kldiv

P = np.array([[0.25, 0.75], [0.5, 0.5]])
Q = np.array([[0.5, 0.5], [0.1, 0.9]])


def raises(exc, pattern):
    return pytest.raises(exc, match=re.escape(pattern))


def test_batchmean_is_refused_with_the_mapping():
    with raises(
        ValueError, "Expected `reduction` to be one of 'mean', 'sum', 'none', got 'batchmean'"
    ):
        kldiv.kl_div(P, Q, reduction="batchmean")
    with raises(ValueError, "what PyTorch calls 'batchmean'"):
        kldiv.kl_div(P, Q, reduction="batchmean")
    with raises(ValueError, "never over classes"):
        kldiv.kl_div(P, Q, reduction="sum_over_batch_size")


def test_form():
    with raises(
        ValueError, "Expected `form` for p to be one of 'probs', 'logits', 'log_probs', got 'prob'"
    ):
        kldiv.kl_div(P, Q, form="prob")
    with raises(ValueError, "Expected `form` for q to be one of"):
        kldiv.kl_div(P, Q, form=("probs", "softmax"))
    with raises(ValueError, "'log_probs' are log-softmax outputs"):
        kldiv.kl_div(P, Q, form="from_logits")
    with raises(ValueError, "or a pair of them, got ('probs', 'probs', 'probs')"):
        kldiv.kl_div(P, Q, form=("probs", "probs", "probs"))


def test_axis():
    with raises(ValueError, "Expected `axis` to be in [-2, 1] for 2-d inputs, got 2"):
        kldiv.kl_div(P, Q, axis=2)
    with raises(TypeError, "Expected `axis` to be an int, got float"):
        kldiv.kl_div(P, Q, axis=1.0)
    with raises(ValueError, "at least 1 dimension (the category axis), got 0-d arrays"):
        kldiv.kl_div(np.float64(0.3), np.float64(0.4))


def test_shapes():
    with raises(ValueError, "same number of categories along axis -1, got 2 and 3"):
        kldiv.kl_div(P, np.ones((2, 3)) / 3)
    with raises(ValueError, "Expected the shapes of `p` and `q` to be broadcastable"):
        kldiv.kl_div(np.ones((3, 2)) / 2, np.ones((4, 2)) / 2)
    with raises(ValueError, "Expected at least one category along axis -1, got shape (2, 0)"):
        kldiv.kl_div(np.ones((2, 0)), np.ones((2, 0)))


def test_dtypes():
    with raises(TypeError, "Expected `p` to have a real floating dtype"):
        kldiv.kl_div(np.array([[0, 1]]), Q)
    with raises(
        TypeError,
        "Expected `q` to have a real floating dtype (float16, bfloat16, float32, float64), got complex128",
    ):
        kldiv.kl_div(P, Q.astype(complex))
    with raises(TypeError, "got bool"):
        kldiv.kl_div(P, Q > 0.3)
    with raises(TypeError, "got int64"):
        kldiv.kl_div(torch.tensor(P), torch.tensor([[0, 1], [1, 0]]))


def test_mixed_frameworks():
    with raises(
        TypeError,
        "Expected all array arguments to come from one framework, got `p` is a numpy array, `q` is a torch array",
    ):
        kldiv.kl_div(P, torch.tensor(Q))
    with raises(TypeError, "`mask` is a torch array"):
        kldiv.kl_div(P, Q, mask=torch.tensor([True, False]))
    with raises(
        TypeError, "Expected an array (NumPy, PyTorch or JAX), a Python number or a list, got str"
    ):
        kldiv.kl_div("abc", Q)


def test_mask_and_weight():
    with raises(
        TypeError,
        "Expected `mask` to be a boolean array or an integer array of 0 and 1 (True or 1 keeps "
        "an entry), got dtype float64. For real-valued weights use `weight=`.",
    ):
        kldiv.kl_div(P, Q, mask=np.array([1.0, 0.0]))
    with raises(ValueError, "Expected `mask` to be broadcastable to the batch shape (2,)"):
        kldiv.kl_div(P, Q, mask=np.array([True, False, True]))
    with raises(ValueError, "got shape (2, 2)"):
        kldiv.kl_div(P, Q, weight=np.ones((2, 2)))
    with raises(TypeError, "Expected `weight` to have a real floating dtype"):
        kldiv.kl_div(P, Q, weight=np.array([1, 2]))


def test_num_items():
    with raises(ValueError, "Expected `num_items` only with reduction='mean', got reduction='sum'"):
        kldiv.kl_div(P, Q, reduction="sum", num_items=4)
    with raises(ValueError, "Expected `num_items` to be finite and > 0, got 0"):
        kldiv.kl_div(P, Q, num_items=0)
    with raises(TypeError, "Expected `num_items` to be a number or a 0-d array, got bool"):
        kldiv.kl_div(P, Q, num_items=True)
    with raises(ValueError, "Expected `num_items` to be a scalar or a 0-d array, got shape (2,)"):
        kldiv.kl_div(P, Q, num_items=np.array([1.0, 2.0]))
    with raises(TypeError, "Expected `num_items` to be a number or a 0-d array, got list"):
        kldiv.kl_div(P, Q, num_items=[4])
    with raises(TypeError, "Expected `num_items` to be a number or a 0-d array, got str"):
        kldiv.kl_div(P, Q, num_items="4")


def test_temperature():
    with raises(ValueError, "Expected `temperature` to be finite and > 0, got 0"):
        kldiv.kl_div(P, Q, form="logits", temperature=0)
    with raises(ValueError, "got -1.0"):
        kldiv.kl_div(P, Q, form="logits", temperature=-1.0)
    with raises(
        ValueError,
        "Expected `form='logits'` for both sides when `temperature` is not 1, got form=('log_probs', 'logits')",
    ):
        kldiv.kl_div(P, Q, form=("log_probs", "logits"), temperature=2.0)
    with raises(TypeError, "Expected `temperature` to be a positive float"):
        kldiv.kl_div(P, Q, form="logits", temperature="2")


def test_beta_alpha_and_kind():
    with raises(ValueError, "Expected `beta` to be in [0, 1], got 1.5"):
        kldiv.js_div(P, Q, beta=1.5)
    with raises(ValueError, "Expected `alpha` to be in [0, 1], got -0.1"):
        kldiv.skew_kl_div(P, Q, alpha=-0.1)
    with raises(TypeError, "Expected `alpha` to be a Python float in [0, 1]"):
        kldiv.skew_reverse_kl_div(P, Q, alpha=None)
    with raises(ValueError, "Expected `kind` to be one of 'kl', 'reverse_kl', 'js'"):
        kldiv.divergence(P, Q, "jsd")
    with pytest.raises(TypeError, match="beta"):
        kldiv.divergence(P, Q, "kl", beta=0.2)  # beta belongs to js only


def test_check_probs():
    bad = np.array([[0.25, 0.75], [0.5, 0.6], [-0.1, 1.1]])
    good = np.full((3, 2), 0.5)
    with raises(
        ValueError,
        "`p` (form='probs') is not a valid distribution at batch index (1,): its probabilities do not sum to 1",
    ):
        kldiv.kl_div(bad[:2], good[:2], check=True)
    with raises(ValueError, "at batch index (2,): it has negative probabilities"):
        kldiv.kl_div(bad, good, check=True)
    with raises(
        ValueError,
        "`q` (form='probs') is not a valid distribution at batch index (0,): it contains NaN",
    ):
        kldiv.kl_div(good, np.array([[np.nan, 1], [0.5, 0.5], [0.5, 0.5]]), check=True)
    # Masked-out rows are not checked; valid inputs pass.
    kldiv.kl_div(bad, good, mask=np.array([True, False, False]), check=True)
    kldiv.kl_div(good, good, check=True)


def test_check_log_probs_and_logits():
    lp = np.log(np.array([[0.25, 0.75], [0.5, 0.5]]))
    with raises(
        ValueError,
        "`p` (form='log_probs') is not a valid distribution at batch index (1,): it has log-probabilities > 0",
    ):
        kldiv.kl_div(np.array([[-1.0, -0.5], [0.1, -3.0]]), lp, form="log_probs", check=True)
    with raises(
        ValueError, "at batch index (0,): its probabilities (exp of log_probs) do not sum to 1"
    ):
        kldiv.kl_div(np.array([[-1.0, -1.0], [-0.1, -3.0]]), lp, form="log_probs", check=True)
    with raises(
        ValueError,
        "`q` (form='logits') is not a valid distribution at batch index (1,): all its logits are -inf",
    ):
        kldiv.kl_div(lp, np.array([[0.0, 1.0], [-np.inf, -np.inf]]), form="logits", check=True)
    with raises(ValueError, "it has a +inf logit"):
        kldiv.kl_div(lp, np.array([[0.0, np.inf], [0.0, 1.0]]), form="logits", check=True)
    kldiv.kl_div(lp, lp, form="log_probs", check=True)
    kldiv.kl_div(lp, np.array([[-np.inf, 0.0], [3.0, 1.0]]), form="logits", check=True)


def test_check_names_multi_dimensional_index_and_half_tolerance():
    p = np.full((2, 3, 4), 0.25)
    p[1, 2, 0] = 0.3
    with raises(ValueError, "at batch index (1, 2)"):
        kldiv.kl_div(p, np.full((2, 3, 4), 0.25), check=True)
    # float16 probabilities carry rounding of ~1e-3: they must pass the check.
    half = (np.ones((2, 7)) / 7).astype(np.float16)
    kldiv.kl_div(half, half, check=True)


def test_check_accepts_bfloat16_on_every_backend(xp):
    # NumPy's bfloat16 comes from ml_dtypes, which NumPy's finfo rejects: the tolerance for
    # half types must not depend on finfo (it used to raise AttributeError there).
    b = xp.asarray(np.ones((2, 7)) / 7, "bfloat16")
    assert xp.to_numpy(kldiv.kl_div(b, b, check=True)) == 0.0
    bad = xp.asarray(np.full((2, 7), 0.2), "bfloat16")
    with raises(ValueError, "sum to 1"):
        kldiv.kl_div(bad, b, check=True)


def test_check_refuses_to_run_traced():
    import jax
    import jax.numpy as jnp

    lp = jnp.log(jnp.asarray(P))
    with raises(ValueError, "`check=True` reads the data and cannot run under jax.jit"):
        jax.jit(lambda a, b: kldiv.kl_div(a, b, form="log_probs", check=True))(lp, lp)


def test_integer_labels_hear_about_the_dtype_not_the_shape():
    logits = np.zeros((4, 10))
    labels = np.array([1, 2, 3, 4])
    with raises(TypeError, "Expected `q` to have a real floating dtype"):
        kldiv.kl_div(logits, labels, form="logits")
    with raises(TypeError, "integer class labels are not a distribution"):
        kldiv.kl_div(logits, labels, form="logits")


def test_scalar_options_accept_numpy_scalars_and_check_must_be_bool():
    a = np.array([[0.0, 1.0], [2.0, 0.5]])
    expected = kldiv.kl_div(a / 2, a.T / 2, form="logits")
    got = kldiv.kl_div(a, a.T, form="logits", temperature=np.int64(2))
    np.testing.assert_allclose(got, expected, rtol=1e-14)
    kldiv.js_div(P, Q, beta=np.float32(0.25))
    with raises(TypeError, "Expected `check` to be True or False, got 'no'"):
        kldiv.kl_div(P, Q, check="no")


def test_check_with_a_broadcast_argument_and_a_mask():
    p = np.array([[0.5, 0.5]])  # one distribution broadcast against three
    q = np.array([[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]])
    kldiv.kl_div(p, q, mask=np.array([True, True, False]), check=True)
    bad_q = q.copy()
    bad_q[1] = [0.2, 0.9]
    with raises(ValueError, "`q` (form='probs') is not a valid distribution at batch index (1,)"):
        kldiv.kl_div(p, bad_q, mask=np.array([True, True, False]), check=True)
    bad_q[1] = [0.2, 0.8]
    bad_q[2] = [0.2, 0.9]  # masked out: not checked
    kldiv.kl_div(p, bad_q, mask=np.array([True, True, False]), check=True)


@pytest.mark.parametrize("dtype, categories", [("float16", 32000), ("float32", 131072)])
def test_check_tolerance_does_not_grow_loose_with_the_vocabulary(dtype, categories):
    good = np.full((1, categories), 1.0 / categories)
    kldiv.kl_div(good.astype(dtype), good.astype(dtype), check=True)
    off = good * 1.02  # sums to 1.02: 2% of the mass is invented
    with raises(ValueError, "its probabilities do not sum to 1"):
        kldiv.kl_div(off.astype(dtype), good.astype(dtype), check=True)
    lp = np.log(good)
    kldiv.kl_div(lp.astype(dtype), lp.astype(dtype), form="log_probs", check=True)
    with raises(ValueError, "do not sum to 1"):
        kldiv.kl_div((lp + 0.02).astype(dtype), lp.astype(dtype), form="log_probs", check=True)


def test_check_runs_on_torch_and_jax():
    import jax.numpy as jnp

    bad = np.array([[0.25, 0.75], [0.5, 0.6]])
    for conv in (torch.tensor, jnp.asarray):
        kldiv.kl_div(conv(P), conv(Q), check=True)
        with raises(ValueError, "at batch index (1,): its probabilities do not sum to 1"):
            kldiv.kl_div(conv(bad), conv(Q), check=True)


def test_check_under_torch_compile_says_why_it_cannot_run():
    torch._dynamo.reset()
    for fullgraph in (False, True):
        compiled = torch.compile(lambda a, b: kldiv.kl_div(a, b, check=True), fullgraph=fullgraph)
        with pytest.raises(Exception, match="cannot run under jax.jit, vmap or torch.compile"):
            compiled(torch.tensor(P), torch.tensor(Q))


def test_jax_array_with_a_numpy_mask_is_refused():
    import jax.numpy as jnp

    with raises(TypeError, "`p` is a jax array, `mask` is a numpy array"):
        kldiv.kl_div(jnp.asarray(P), jnp.asarray(Q), mask=np.array([True, False]))


# --- integer masks (Hugging Face's attention_mask) ---------------------------------------------

INT_MASK_DTYPES = ["int64", "int32", "uint8"]
FAMILY = [
    kldiv.kl_div,
    kldiv.reverse_kl_div,
    kldiv.js_div,
    kldiv.skew_kl_div,
    kldiv.skew_reverse_kl_div,
    kldiv.symmetric_kl_div,
    kldiv.tv_distance,
]
KEEP = np.array([[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 0, 0]])  # a (B, T) attention_mask


def _logits(rng):
    return rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 5))


@pytest.mark.parametrize("dtype", INT_MASK_DTYPES)
def test_integer_mask_equals_bool_mask_in_the_family(xp, rng, dtype):
    a, b = _logits(rng)
    a[KEEP == 0] = np.nan  # padding may hold garbage, with an integer mask too
    for fn in FAMILY:
        for reduction in ("mean", "none"):
            got, want = (
                xp.to_numpy(
                    fn(xp.asarray(a), xp.asarray(b), form="logits", reduction=reduction, mask=m)
                )
                for m in (xp.asarray(KEEP, dtype), xp.asarray(KEEP.astype(bool)))
            )
            np.testing.assert_array_equal(got, want, err_msg=fn.__name__)
    # broadcast from the right, as bool masks are
    t_only = KEEP[0]
    np.testing.assert_array_equal(
        xp.to_numpy(
            kldiv.kl_div(
                xp.asarray(b), xp.asarray(b[::-1]), form="logits", mask=xp.asarray(t_only, dtype)
            )
        ),
        xp.to_numpy(
            kldiv.kl_div(
                xp.asarray(b),
                xp.asarray(b[::-1]),
                form="logits",
                mask=xp.asarray(t_only.astype(bool)),
            )
        ),
    )


@pytest.mark.parametrize("dtype", INT_MASK_DTYPES)
def test_integer_mask_gradients_equal_bool_mask_gradients(ad, rng, dtype):
    a, b = _logits(rng)
    for fn in (kldiv.kl_div, kldiv.js_div, kldiv.tv_distance):
        grads = [
            ad.grad(
                lambda p, q, m=m, fn=fn: fn(p, q, form="logits", mask=m),
                ad.asarray(a),
                ad.asarray(b),
            )
            for m in (ad.asarray(KEEP, dtype), ad.asarray(KEEP.astype(bool)))
        ]
        for g_int, g_bool in zip(*grads, strict=True):
            np.testing.assert_array_equal(g_int, g_bool)


@pytest.mark.parametrize("dtype", INT_MASK_DTYPES)
def test_integer_mask_in_kl_estimate(xp, rng, dtype):
    from kldiv.estimators import kl_estimate

    lp, lq = rng.normal(size=(2, 3, 4)) - 2
    lp[KEEP == 0] = -np.inf  # padding, which the mask drops before any exp
    for est in ("k1", "k2", "k3"):
        got, want = (
            xp.to_numpy(kl_estimate(xp.asarray(lp), xp.asarray(lq), estimator=est, mask=m))
            for m in (xp.asarray(KEEP, dtype), xp.asarray(KEEP.astype(bool)))
        )
        np.testing.assert_array_equal(got, want)
    if xp.name != "numpy":
        grads = [
            xp.grad(lambda p, q, m=m: kl_estimate(p, q, mask=m), xp.asarray(lp), xp.asarray(lq))
            for m in (xp.asarray(KEEP, dtype), xp.asarray(KEEP.astype(bool)))
        ]
        for g_int, g_bool in zip(*grads, strict=True):
            np.testing.assert_array_equal(g_int, g_bool)


@pytest.mark.parametrize("dtype", INT_MASK_DTYPES)
def test_integer_mask_in_the_torch_modules(rng, dtype):
    from kldiv.torch import Divergence, KLDivergence, TVDistance

    a, b = (torch.tensor(x) for x in _logits(rng))
    keep = torch.tensor(KEEP).to(getattr(torch, dtype))
    for module in (KLDivergence(form="logits"), TVDistance(form="logits"), Divergence("js")):
        if module.kind == "js":
            a_, b_ = a.softmax(-1), b.softmax(-1)
        else:
            a_, b_ = a, b
        grads = []
        for m in (keep, keep.bool()):
            q = b_.clone().requires_grad_(True)
            value = module(a_, q, mask=m)
            value.backward()
            grads.append((value.detach(), q.grad))
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", INT_MASK_DTYPES)
@pytest.mark.parametrize("fast_path", [True, False])
def test_integer_mask_in_distillation_loss(rng, dtype, fast_path):
    from kldiv.torch import DistillationLoss

    s, t = (torch.tensor(x, dtype=torch.float32) for x in _logits(rng))
    keep = torch.tensor(KEEP).to(getattr(torch, dtype))
    labels = torch.tensor(rng.integers(0, 5, size=KEEP.shape))
    loss = DistillationLoss(fast_path=fast_path)
    results = []
    for kw in (
        {"mask": keep},
        {"mask": keep.bool()},
        {"labels": torch.where(keep.bool(), labels, -100)},
    ):
        x = s.clone().requires_grad_(True)
        value = loss(x, t, **kw)
        value.backward()
        results.append((value.detach(), x.grad))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    torch.testing.assert_close(results[0], results[2])
    # with labels too: kept where the label is not ignore_index and the mask is 1
    labels[0, 0] = -100
    both = loss(s, t, labels=labels, mask=keep)
    torch.testing.assert_close(both, loss(s, t, mask=keep.bool() & (labels != -100)))


def test_integer_mask_in_fused_linear_and_parallel_losses(rng):
    from kldiv.torch import FusedLinearDistillationLoss
    from kldiv.torch.parallel import (
        ParallelDistillationLoss,
        ParallelFusedLinearDistillationLoss,
    )

    h, w = torch.tensor(rng.normal(size=(3, 4, 6))), torch.tensor(rng.normal(size=(5, 6)))
    t = torch.tensor(rng.normal(size=(3, 4, 5)))
    s = h @ w.T
    keep = torch.tensor(KEEP)
    for loss in (FusedLinearDistillationLoss(), ParallelFusedLinearDistillationLoss()):
        torch.testing.assert_close(loss(h, w, t, mask=keep), loss(h, w, t, mask=keep.bool()))
    par = ParallelDistillationLoss()
    torch.testing.assert_close(par(s, t, mask=keep), par(s, t, mask=keep.bool()))
    torch.testing.assert_close(par(s, t, mask=keep), kldiv.kl_div(t, s, form="logits", mask=keep))
    bad = keep.clone()
    bad[2, 1] = -1
    for call in (
        lambda: FusedLinearDistillationLoss()(h, w, t, mask=bad),
        lambda: ParallelFusedLinearDistillationLoss()(h, w, t, mask=bad),
        lambda: par(s, t, mask=bad),
        lambda: ParallelDistillationLoss(validate=False)(s, t, mask=bad),
    ):
        with raises(
            ValueError, "Expected `mask` to hold only 0 and 1 (or booleans), got -1 at index (2, 1)"
        ):
            call()


@pytest.mark.parametrize("value", [2, -1])
def test_integer_mask_with_other_values_names_the_first(xp, value):
    from kldiv.estimators import kl_estimate
    from kldiv.torch import DistillationLoss, KLDivergence

    mask = KEEP.copy()
    mask[1, 3] = value
    mask[2, 2] = value  # a later one: the message names the first, in C order
    a = np.zeros((3, 4, 5))
    msg = f"Expected `mask` to hold only 0 and 1 (or booleans), got {value} at index (1, 3)."
    dtype = "int64"
    with raises(ValueError, msg):
        kldiv.kl_div(xp.asarray(a), xp.asarray(a), form="logits", mask=xp.asarray(mask, dtype))
    with raises(ValueError, msg):
        kl_estimate(xp.asarray(a[..., 0]), xp.asarray(a[..., 0]), mask=xp.asarray(mask, dtype))
    if xp.name == "torch":
        ta, tm = torch.tensor(a), torch.tensor(mask)
        with raises(ValueError, msg):
            KLDivergence(form="logits")(ta, ta, mask=tm)
        for fast_path in (True, False):
            with raises(ValueError, msg):
                DistillationLoss(fast_path=fast_path)(ta.float(), ta.float(), mask=tm)
    if value == 2:  # unsigned: only too-large values exist
        with raises(ValueError, msg):
            kldiv.kl_div(
                xp.asarray(a), xp.asarray(a), form="logits", mask=xp.asarray(mask, "uint8")
            )


def test_float_masks_point_only_to_arguments_that_exist():
    from kldiv.estimators import kl_estimate
    from kldiv.torch import DistillationLoss

    with raises(TypeError, "got dtype float64. For real-valued weights use `weight=`."):
        kldiv.kl_div(P, Q, mask=np.array([1.0, 0.0]))
    with raises(TypeError, "got dtype float64. Convert it explicitly, e.g. `mask > 0`"):
        kl_estimate(np.zeros(2), np.zeros(2), mask=np.array([1.0, 0.0]))
    with raises(TypeError, "got dtype float32. Convert it explicitly, e.g. `mask > 0`"):
        DistillationLoss()(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(2))
    # a boolean mask passed as labels would silently keep every token (True != -100)
    with raises(TypeError, "Expected `labels` to hold token ids"):
        DistillationLoss()(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, dtype=bool))
    with raises(ValueError, "Expected `mask` of the token shape (2,), got (3,)"):
        DistillationLoss()(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(3, dtype=int))


def test_integer_mask_under_jax_jit_is_mask_not_equal_zero():
    import jax
    import jax.numpy as jnp

    a, b = jnp.asarray(np.eye(4)[:3] + 0.1), jnp.asarray(np.ones((3, 4)))
    fn = jax.jit(lambda p, q, m: kldiv.kl_div(p, q, form="logits", reduction="none", mask=m))
    # against the boolean mask under jit too: XLA may sum a row in another order than the
    # eager call (1 ulp), which is not what this test is about
    want = fn(a, b, jnp.asarray([True, False, True]))
    eager = kldiv.kl_div(
        a, b, form="logits", reduction="none", mask=jnp.asarray([True, False, True])
    )
    np.testing.assert_allclose(want, eager, rtol=4 * np.finfo(np.float64).eps, atol=0)
    np.testing.assert_array_equal(fn(a, b, jnp.asarray([1, 0, 1])), want)
    # traced: nothing value-dependent runs, and any non-zero value keeps the distribution
    np.testing.assert_array_equal(fn(a, b, jnp.asarray([2, 0, -1])), want)
    grad = jax.grad(lambda q, m: kldiv.kl_div(a, q, form="logits", mask=m))
    np.testing.assert_array_equal(
        jax.jit(grad)(b, jnp.asarray([1, 0, 1])), grad(b, jnp.asarray([True, False, True]))
    )
    with raises(ValueError, "got 2 at index (0,)"):  # eager: checked
        kldiv.kl_div(a, b, form="logits", mask=jnp.asarray([2, 0, 1]))


def test_integer_mask_under_torch_compile_fullgraph():
    from kldiv.torch import DistillationLoss

    torch._dynamo.reset()
    loss = DistillationLoss()

    def both(s, t, m):
        return kldiv.kl_div(t, s, form="logits", mask=m), loss(s, t, mask=m)

    compiled = torch.compile(both, fullgraph=True)
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    keep = torch.tensor([1, 0, 1])
    for got, want in zip(compiled(s, t, keep), both(s, t, keep.bool()), strict=True):
        torch.testing.assert_close(got, want)
    # traced: the value check does not run and any non-zero value keeps the token
    for got, want in zip(
        compiled(s, t, torch.tensor([2, 0, 1])), both(s, t, keep.bool()), strict=True
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fast_path", [True, False])
def test_integer_mask_under_torch_func_vmap_and_on_meta_tensors(fast_path):
    """Under ``torch.func.vmap`` values cannot be read (reading one raises), and meta or fake
    tensors have none: an integer mask is then ``mask != 0`` with no value check, as under
    ``torch.compile``. The default fast path steps aside for the core there (the C kernel
    reads raw memory: on fake tensors it crashed the process)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kldiv.torch import DistillationLoss

    s, t = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    keep = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]])
    loss = DistillationLoss(fast_path=fast_path)

    def per_sample(s1, t1, m1):
        return kldiv.kl_div(t1, s1, form="logits", mask=m1), loss(s1, t1, mask=m1)

    got = torch.func.vmap(per_sample)(s, t, keep)
    for i in range(4):
        want = per_sample(s[i], t[i], keep[i].bool())
        torch.testing.assert_close((got[0][i], got[1][i]), want)
    grad = torch.func.vmap(torch.func.grad(lambda s1, t1, m1: per_sample(s1, t1, m1)[0]))
    want = torch.stack(
        [
            torch.func.grad(lambda s1, i=i: per_sample(s1, t[i], keep[i].bool())[0])(s[i])
            for i in range(4)
        ]
    )
    torch.testing.assert_close(grad(s, t, keep), want)
    meta = kldiv.kl_div(
        t.to("meta"), s.to("meta"), form="logits", reduction="none", mask=keep.to("meta")
    )
    assert meta.shape == (4, 3) and meta.device.type == "meta"
    with FakeTensorMode() as mode:
        fs, ft = mode.from_tensor(s), mode.from_tensor(t)
        fake = loss(fs, ft, mask=mode.from_tensor(keep))
    assert fake.shape == () and fake.dtype == torch.float32


def test_distillation_masks_and_labels_must_be_tensors_on_the_logits_device():
    from kldiv.torch import DistillationLoss, FusedLinearDistillationLoss, TopKTeacher
    from kldiv.torch.parallel import ParallelDistillationLoss

    s, t = torch.randn(3, 5), torch.randn(3, 5)
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    top = TopKTeacher(*reversed(torch.topk(t.log_softmax(-1), 2)), tail="renormalize")
    # (call, the error type): the parallel loss shares every rank's complaint as one
    # ValueError on all ranks, so that no rank is left waiting in a collective
    calls = [
        (lambda **kw: DistillationLoss()(s, t, **kw), TypeError),
        (lambda **kw: DistillationLoss()(s, top, **kw), TypeError),
        (lambda **kw: FusedLinearDistillationLoss()(h, w, t, **kw), TypeError),
        (lambda **kw: ParallelDistillationLoss()(s, t, **kw), ValueError),
    ]
    for call, error in calls:
        for name, value in [
            ("mask", np.array([1, 0, 1])),
            ("labels", np.array([1, 2, 3])),
            ("mask", [True, False, True]),
        ]:
            with raises(error, f"Expected `{name}` to be a torch.Tensor, got"):
                call(**{name: value})
        with raises(ValueError, "Expected `mask` on the logits' device cpu, got meta"):
            call(mask=torch.ones(3, dtype=torch.bool, device="meta"))


# --- every suggested argument exists -------------------------------------------------------------


def _suggested(message: str) -> set[str]:
    """Keywords a message tells the user to pass (``name=``), comparisons excluded."""
    return set(re.findall(r"\b([a-z_][a-z0-9_]*)=(?!=)", message))


def _parameters(*callables) -> set[str]:
    return {name for c in callables for name in inspect.signature(c).parameters}


def _suggestion_cases():
    from kldiv import distributions as D
    from kldiv.estimators import kl_estimate
    from kldiv.torch import DistillationLoss, KLDivergence
    from kldiv.torch.fused_linear import FusedLinearDistillationLoss
    from kldiv.torch.parallel import ParallelDistillationLoss
    from kldiv.torch.parallel import ParallelFusedLinearDistillationLoss as PFL
    from kldiv.torch.topk import TopKTeacher, topk_distillation_rows

    z2, t23 = np.zeros(2), torch.zeros(2, 3)
    teacher = TopKTeacher(torch.tensor([[0]]), torch.tensor([[-1.0]]), tail="tail_bucket")
    DL = (DistillationLoss, DistillationLoss.forward)
    return [
        # (call that raises, the callables whose arguments the message may suggest)
        (lambda: kldiv.kl_div(P, Q, mask=np.ones(2)), (kldiv.kl_div,)),
        (lambda: kldiv.js_div(P, Q, mask=np.ones(2)), (kldiv.js_div,)),
        (lambda: kl_estimate(z2, z2, mask=np.ones(2)), (kl_estimate,)),
        (lambda: KLDivergence()(P, Q, mask=np.ones(2)), (KLDivergence, KLDivergence.forward)),
        (lambda: DistillationLoss()(t23, t23, mask=torch.ones(2)), DL),
        (lambda: DistillationLoss()(t23, t23, torch.ones(2, dtype=bool)), DL),
        (lambda: DistillationLoss()(t23, t23, mask=torch.tensor([2, 1])), DL),
        (lambda: kldiv.kl_div(P, Q, reduction="sum", num_items=2), (kldiv.kl_div,)),
        (lambda: kldiv.kl_div(P, Q, temperature=2.0), (kldiv.kl_div,)),
        (lambda: DistillationLoss(fast_path="chunked")(t23.double(), t23), DL),
        (
            lambda: DistillationLoss(fast_path="triton")(torch.zeros(1, 4), teacher),
            DL,
        ),
        (
            lambda: topk_distillation_rows("kl", torch.zeros(1, 4), teacher, temperature=2.0),
            (topk_distillation_rows, TopKTeacher),
        ),
        (
            lambda: FusedLinearDistillationLoss()(
                torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, 4), mask=torch.ones(2)
            ),
            (FusedLinearDistillationLoss, FusedLinearDistillationLoss.forward),
        ),
        (
            lambda: ParallelDistillationLoss()(t23, t23, mask=torch.ones(2)),
            (ParallelDistillationLoss, ParallelDistillationLoss.forward),
        ),
        (
            lambda: PFL(validate=False)(t23, torch.zeros(4, 2), torch.zeros(2, 4)),
            (PFL, PFL.forward),
        ),
        (lambda: D.kl(D.Cauchy(0.0, 1.0), D.Normal(0.0, 1.0)), (D.kl,)),
        (lambda: D.Normal(0.0, 1.0).sample(2, key=0), (D.Normal.sample,)),
    ]


def test_error_messages_suggest_only_arguments_that_exist():
    for call, callables in _suggestion_cases():
        with pytest.raises((TypeError, ValueError, NotImplementedError)) as info:
            call()
        missing = _suggested(str(info.value)) - _parameters(*callables)
        assert not missing, f"{info.value!s} suggests {missing}, not arguments of {callables}"


# --- one validation in front of every distillation path ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_distillation_losses_refuse_non_floating_logits_on_every_path(dtype):
    from kldiv.torch import DistillationLoss, FusedLinearDistillationLoss

    good = torch.randn(3, 5)
    bad = torch.ones(3, 5, dtype=dtype)
    for fast_path in (True, False, "chunked"):
        loss = DistillationLoss(fast_path=fast_path)
        for args, name in (((good, bad), "teacher_logits"), ((bad, good), "student_logits")):
            with raises(TypeError, f"Expected `{name}` to have a real floating dtype"):
                loss(*args)
    with raises(TypeError, "Expected `teacher_logits` to have a real floating dtype"):
        FusedLinearDistillationLoss()(torch.randn(3, 4), torch.randn(5, 4), bad)
    with raises(TypeError, "Expected `student_logits` to be a torch.Tensor, got ndarray"):
        DistillationLoss()(np.zeros((3, 5), np.float32), good)
    with raises(TypeError, "Expected `teacher_logits` to be a torch.Tensor, got NoneType"):
        DistillationLoss()(good, None)
    with raises(TypeError, "Expected `student_hidden` to be a torch.Tensor, got list"):
        FusedLinearDistillationLoss()([[0.0] * 4], torch.randn(5, 4), good[:1])


@pytest.mark.parametrize("value", [0, 1, 1.0, "auto", None])
def test_fast_path_takes_only_its_documented_values(value):
    from kldiv.torch import DistillationLoss

    # 0 and 1 equal False and True; before, they passed and acted as a forced "chunked"
    with raises(ValueError, "Expected `fast_path` to be True, False, 'triton' or 'chunked'"):
        DistillationLoss(fast_path=value)
