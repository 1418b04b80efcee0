"""Run by tests/keras/test_keras.py in a fresh process per Keras backend (KERAS_BACKEND must be set
before keras is imported): every kldiv.keras loss against the core, serialisation, and a real
model.fit with a loss and the sparsity regularizer. Prints one line per check; exits non-zero
on the first failure."""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np

import kldiv
import kldiv.keras as kk

backend = keras.backend.backend()
# tests/keras/test_keras.py passes its test's seed (conftest), which its replay command reproduces
SEED = int(sys.argv[1]) if len(sys.argv) > 1 else 0
rng = np.random.default_rng(SEED)
checks = 0


def check(cond: bool, what: str) -> None:
    global checks
    if not cond:
        print(f"FAIL [{backend}] {what}")
        sys.exit(1)
    checks += 1


def as_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


# 1. every loss equals the core (float64 NumPy) per sample, with Keras' reduction on top
logits_p = rng.normal(size=(6, 7)).astype("float32")
logits_q = rng.normal(size=(6, 7)).astype("float32")
probs_p = np.exp(logits_p) / np.exp(logits_p).sum(-1, keepdims=True)
params = {"js": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
classes = {
    "kl": kk.KLDivergence,
    "reverse_kl": kk.ReverseKLDivergence,
    "js": kk.JSDivergence,
    "skew_kl": kk.SkewKLDivergence,
    "skew_reverse_kl": kk.SkewReverseKLDivergence,
    "symmetric_kl": kk.SymmetricKLDivergence,
    "tv": kk.TVDistance,
}
weights = rng.random(6).astype("float32")
for kind, cls in classes.items():
    for form, a in ((("probs", "logits"), probs_p), ("logits", logits_p)):
        kw = dict(params.get(kind, {}), form=form)
        if form == "logits":
            kw["temperature"] = 2.0
            kw["softcap"] = [1.5, 2.5]  # (teacher, student); the reference is the core's
        ref = np.asarray(
            kldiv.divergence(
                a.astype(np.float64), logits_q.astype(np.float64), kind, reduction="none", **kw
            )
        )
        loss = cls(**kw)
        got = as_np(loss(a, logits_q))
        check(abs(got - ref.mean()) <= 1e-5 * (1 + abs(ref.mean())), f"{kind} {form} mean")
        got_w = as_np(loss(a, logits_q, sample_weight=weights))
        check(
            abs(got_w - (ref * weights).mean()) <= 1e-5 * (1 + abs(ref.mean())), f"{kind} weighted"
        )
        none = as_np(cls(reduction=None, **kw)(a, logits_q))
        check(np.allclose(none, ref, rtol=1e-5, atol=1e-6), f"{kind} {form} per sample")
        cfg = loss.get_config()
        again = cls.from_config(cfg)
        check(again.get_config() == cfg, f"{kind} config round trip")
        by_name = kk.Divergence(kind, **kw)
        check(abs(as_np(by_name(a, logits_q)) - got) <= 1e-6, f"{kind} by name")

# the soft-capped reference above is the core's: check the core's own map here, by hand
capped = np.asarray(
    kldiv.kl_div(
        logits_p.astype(np.float64), logits_q.astype(np.float64), form="logits",
        softcap=(1.5, 2.5), reduction="none",
    )
)  # fmt: skip
by_hand = np.asarray(
    kldiv.kl_div(
        1.5 * np.tanh(logits_p.astype(np.float64) / 1.5),
        2.5 * np.tanh(logits_q.astype(np.float64) / 2.5),
        form="logits",
        reduction="none",
    )
)
check(np.allclose(capped, by_hand, rtol=1e-6), "softcap is the composition")

# zero support stays exact: +inf where the candidate has no mass (Keras' own loss clips)
p0 = np.array([[0.5, 0.5, 0.0]], dtype="float32")
q0 = np.array([[1.0, 0.0, 0.0]], dtype="float32")
check(math.isinf(float(as_np(kk.KLDivergence()(p0, q0)))), "inf where q = 0 < p")
check(math.isfinite(float(as_np(keras.losses.KLDivergence()(p0, q0)))), "Keras' own is finite")

# kldiv.compat.keras_kl_divergence reproduces Keras' own function on this backend
from kldiv import compat  # noqa: E402

yt = rng.dirichlet(np.ones(7), size=6).astype("float32")
yp = rng.dirichlet(np.ones(7), size=6).astype("float32")
yp[0, :3] = 0.0
ours = as_np(
    compat.keras_kl_divergence(keras.ops.convert_to_tensor(yt), keras.ops.convert_to_tensor(yp))
)
theirs = as_np(keras.losses.kl_divergence(yt, yp))
check(np.allclose(ours, theirs, rtol=1e-6, atol=1e-7), "compat.keras_kl_divergence parity")

if backend == "tensorflow":
    # The TensorFlow idiom, by the real TensorFlow: values and gradients
    import tensorflow as tf

    a = tf.constant(rng.normal(size=(5, 9)))
    b = tf.constant(rng.normal(size=(5, 9)))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([a, b])
        pa = tf.nn.softmax(a)
        ref = tf.nn.softmax_cross_entropy_with_logits(labels=pa, logits=b) - (
            tf.nn.softmax_cross_entropy_with_logits(labels=pa, logits=a)
        )
        ours = compat.tf_kl_from_logits(a, b)
        core = kldiv.kl_div(a, b, form="logits", reduction="none")
    check(isinstance(ours, tf.Tensor) and isinstance(core, tf.Tensor), "TF in, TF out")
    check(np.allclose(ours.numpy(), ref.numpy(), rtol=1e-12, atol=1e-14), "tf idiom parity")
    check(np.allclose(core.numpy(), ref.numpy(), rtol=1e-10, atol=1e-12), "core equals TF")
    for x in (a, b):
        g_ref, g_ours, g_core = (tape.gradient(v, x).numpy() for v in (ref, ours, core))
        check(np.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-12), "tf idiom gradient")
        check(np.allclose(g_core, g_ref, rtol=1e-9, atol=1e-12), "core gradient equals TF")

    # symbolic batch dimension (a custom train_step or any tf.function): every reduction
    sig = [tf.TensorSpec([None, 9], tf.float64)] * 2
    for red in ("mean", "sum"):
        f = tf.function(
            lambda x, y, r=red: kldiv.kl_div(x, y, form="logits", reduction=r), input_signature=sig
        )
        eager = kldiv.kl_div(a.numpy(), b.numpy(), form="logits", reduction=red)
        check(np.allclose(f(a, b).numpy(), np.asarray(eager), rtol=1e-12), f"tf.function {red}")
    # a tf.Variable is read, not rejected
    var = tf.Variable(b)
    check(
        np.allclose(
            kldiv.kl_div(a, var, form="logits", reduction="none").numpy(), core.numpy(), rtol=1e-12
        ),
        "tf.Variable input",
    )

    # TensorFlow Probability as a second reference: Categorical and a few closed forms
    import tensorflow_probability as tfp

    from kldiv import distributions as D

    tfd = tfp.distributions
    la = rng.normal(size=(4, 6))
    lb = rng.normal(size=(4, 6))
    la[0, 2] = -np.inf  # zero probability in P: its term is 0
    ref = tfd.kl_divergence(tfd.Categorical(logits=la), tfd.Categorical(logits=lb)).numpy()
    core = np.asarray(kldiv.kl_div(la, lb, form="logits", reduction="none"))
    check(np.allclose(core, ref, rtol=1e-10, atol=1e-12), "core equals TFP Categorical")
    u = lambda: rng.uniform(0.5, 3.0, size=5)  # noqa: E731
    pairs = [
        (
            D.normal_kl,
            (u(), u(), u(), u()),
            lambda a, b, c, d: (tfd.Normal(a, b), tfd.Normal(c, d)),
        ),
        (D.gamma_kl, (u(), u(), u(), u()), lambda a, b, c, d: (tfd.Gamma(a, b), tfd.Gamma(c, d))),
        (D.beta_kl, (u(), u(), u(), u()), lambda a, b, c, d: (tfd.Beta(a, b), tfd.Beta(c, d))),
        (
            D.laplace_kl,
            (u(), u(), u(), u()),
            lambda a, b, c, d: (tfd.Laplace(a, b), tfd.Laplace(c, d)),
        ),
        (
            D.gumbel_kl,
            (u(), u(), u(), u()),
            lambda a, b, c, d: (tfd.Gumbel(a, b), tfd.Gumbel(c, d)),
        ),
        (D.exponential_kl, (u(), u()), lambda a, b: (tfd.Exponential(a), tfd.Exponential(b))),
    ]
    for fn, args, make in pairs:
        ref = tfd.kl_divergence(*make(*args)).numpy()
        check(
            np.allclose(np.asarray(fn(*args)), ref, rtol=1e-9, atol=1e-12), f"{fn.__name__} vs TFP"
        )
        # on TensorFlow tensors the special functions (lgamma, digamma) must be TensorFlow's:
        # SciPy's values are right but the tape cannot see them, and gradients came out wrong
        params = [tf.Variable(a) for a in args]
        with tf.GradientTape(persistent=True) as tape:
            ours = tf.reduce_sum(fn(*params))
            theirs = tf.reduce_sum(tfd.kl_divergence(*make(*params)))
        got, want = tape.gradient(ours, params), tape.gradient(theirs, params)
        check(
            all(
                np.allclose(g.numpy(), r.numpy(), rtol=1e-9, atol=1e-12)
                for g, r in zip(got, want, strict=True)
            ),
            f"{fn.__name__} gradient on TensorFlow tensors vs TFP",
        )

# 2. the regularizer: Σ_units KL(Bernoulli(ρ)‖Bernoulli(ρ̂)) · weight, ρ̂ the batch mean
act = rng.uniform(0.01, 0.3, size=(16, 5)).astype("float32")
rho_hat = act.astype(np.float64).mean(0)
rho = 0.05
by_hand = 0.01 * np.sum(rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat)))
reg = kk.KLSparsityRegularizer(target=0.05, weight=0.01)
# Keras's own L2 activity regularizer says whether this Keras divides activity losses by the
# batch size (3.14+); called directly on a batch, the regularizer returns B times the penalty
# there, so that the loss Keras adds is the penalty itself
l2 = keras.layers.Activation("linear", activity_regularizer=keras.regularizers.L2(1.0))
l2(keras.ops.ones((4, 1)))
divides = abs(float(as_np(sum(l2.losses))) - 1.0) < 1e-6  # L2 of four ones is 4; 4/4 = 1
scale = len(act) if divides else 1
check(
    abs(float(as_np(reg(keras.ops.convert_to_tensor(act)))) - scale * by_hand) <= 1e-6 * scale,
    "regularizer value",
)
dead = act.copy()
dead[:, 2] = 0.0
check(math.isinf(float(as_np(reg(keras.ops.convert_to_tensor(dead))))), "dead unit is inf")
check(
    kk.KLSparsityRegularizer.from_config(reg.get_config()).get_config() == reg.get_config(),
    "regularizer config",
)


# The penalty Keras adds for an activity regularizer is the same at batch 8 and 64 when the
# batch means are (Keras 3.14+ divides activity losses by the batch size; the regularizer is
# a function of the mean already), and so is its derivative with respect to the kernel: as a
# central difference in the kernel's constant c, against the same derivative in float64.
def activity_penalty(batch, c):
    layer = keras.layers.Dense(
        4,
        activation="sigmoid",
        kernel_initializer=keras.initializers.Constant(c),
        activity_regularizer=kk.KLSparsityRegularizer(target=0.05, weight=0.1),
    )
    layer(keras.ops.convert_to_tensor(batch))
    return float(as_np(sum(layer.losses)))


def penalty_by_hand(batch, c):
    rho_b = (1 / (1 + np.exp(-(batch.astype(np.float64) @ np.full((3, 4), c))))).mean(0)
    return 0.1 * np.sum(0.05 * np.log(0.05 / rho_b) + 0.95 * np.log(0.95 / (1 - rho_b)))


small = rng.uniform(-1.0, 1.0, size=(8, 3)).astype("float32")
large = np.tile(small, (8, 1))  # 64 rows, the same batch mean
h = 1e-2
for batch in (small, large):
    got = activity_penalty(batch, 0.1)
    want = penalty_by_hand(small, 0.1)
    check(
        abs(got - want) <= 1e-6 * want, f"activity penalty at batch {len(batch)}: {got} vs {want}"
    )
    slope = (activity_penalty(batch, 0.1 + h) - activity_penalty(batch, 0.1 - h)) / (2 * h)
    exact = (penalty_by_hand(small, 0.1 + h) - penalty_by_hand(small, 0.1 - h)) / (2 * h)
    # both quotients difference the same points (the O(h²) truncation cancels); what is left
    # is the float32 rounding of the two penalties, a few ulp each (16 allowed), over 2h
    bound = 16 * np.finfo(np.float32).eps * want / h
    check(abs(slope - exact) <= bound, f"penalty slope at batch {len(batch)}: {slope} vs {exact}")
for bad in (float("nan"), float("inf"), -1.0):
    try:
        kk.KLSparsityRegularizer(weight=bad)
    except ValueError:
        pass
    else:
        check(False, f"weight={bad} refused")

# 3. a real fit with the loss and the regularizer; save and load the model
keras.utils.set_random_seed(SEED)  # the layers' initial weights
x = rng.normal(size=(128, 8)).astype("float32")
teacher = x @ rng.normal(size=(8, 5)).astype("float32")
y = np.exp(teacher) / np.exp(teacher).sum(-1, keepdims=True)
inp = keras.Input((8,))
h = keras.layers.Dense(6, activation="sigmoid", activity_regularizer=kk.KLSparsityRegularizer())(
    inp
)
# as a bias regularizer the input is the layer's Variable itself (values in (0, 1) here)
biased = keras.layers.Dense(
    3,
    bias_initializer=keras.initializers.Constant(0.2),
    bias_regularizer=kk.KLSparsityRegularizer(),
)
biased.build((None, 8))
expected = 0.01 * 3 * (0.05 * math.log(0.05 / 0.2) + 0.95 * math.log(0.95 / 0.8))
check(abs(float(as_np(sum(biased.losses))) - expected) < 1e-6, "bias_regularizer on a Variable")
out = keras.layers.Dense(5)(h)
model = keras.Model(inp, out)
model.compile(optimizer=keras.optimizers.Adam(0.05), loss=kk.JSDivergence(form=("probs", "logits")))
hist = model.fit(x, y, epochs=8, batch_size=32, verbose=0).history["loss"]
check(all(math.isfinite(v) for v in hist), f"finite losses {hist}")
check(hist[-1] < 0.7 * hist[0], f"loss decreases {hist[0]:.4f} -> {hist[-1]:.4f}")
with tempfile.TemporaryDirectory() as d:
    path = Path(d) / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    check(type(loaded.loss).__name__ == "JSDivergence", "loss restored by load_model")
    check(np.allclose(as_np(loaded(x[:4])), as_np(model(x[:4])), atol=1e-6), "weights restored")
print(f"OK {backend} {checks} checks")
