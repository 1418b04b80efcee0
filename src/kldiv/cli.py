"""The ``kldiv`` command: ``kldiv demo`` and ``kldiv info``."""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import sys
from collections.abc import Sequence

import numpy as np

import kldiv

# The seed texts' inputs (shared/seeds): a TensorFlow tutorial, a Keras answer, an MXNet
# tutorial. Their reported numbers are printed beside kldiv's.
TF_LOGITS_P = [[0.05, 0.16, 0.9], [0.8, 4.15, 0.05]]
TF_LOGITS_Q = [[0.7, 0.2, 0.1], [0.15, 0.9, 0.05]]
TF_REPORTED = [0.1879, 0.4534]
MX = {
    1: [0.2, 0.5, 0.2, 0.1],
    2: [0.3, 0.4, 0.1, 0.2],
    3: [0.1, 0.1, 0.1, 0.7],
    4: [0.0, 0.9, 0.0, 0.1],
}
MX_LOGITS_1 = [0.39056206, 1.3068528, 0.39056206, -0.30258512]  # softmax ≈ dist_1
KERAS_TARGET, KERAS_WEIGHT = 0.05, 0.01


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else ("nan" if math.isnan(x) else f"{x:.6f}")


def demo(out=None) -> int:
    out = out or sys.stdout
    w = lambda s="": print(s, file=out)  # noqa: E731
    w("kldiv demo: the worked examples of the three seed texts, recomputed with kldiv")
    w("(kldiv.kl_div(p, q) is KL(P‖Q) = Σ p·(log p − log q), p the reference, q the model)")
    w()
    w("1. TensorFlow tutorial: KL(softmax(a)‖softmax(b)) per row, from logits")
    kl_tf = kldiv.kl_div(
        np.array(TF_LOGITS_P), np.array(TF_LOGITS_Q), form="logits", reduction="none"
    )
    w(f"   {'row':<5}{'text reports':<15}{'kldiv':<12}")
    for i, (rep, got) in enumerate(zip(TF_REPORTED, kl_tf, strict=True)):
        w(f"   {i:<5}{rep:<15}{_fmt(float(got)):<12}")
    w("   call: kldiv.kl_div(a, b, form='logits', reduction='none')")
    w()
    w("2. MXNet Gluon KLDivLoss tutorial. Its kl_divergence(a, b) passes log(a) as the prediction")
    w("   and b as the label, i.e. KL(b‖a), averaged over the 4 categories (the text: 'smaller")
    w("   than the true definition by a factor of the number of categories').")
    w(f"   {'compared':<12}{'text says':<38}{'kldiv KL(b‖a)':<16}{'÷ 4 (MXNet mean)':<16}")
    says = {
        (1, 2): "smaller than 1 & 3",
        (1, 3): "larger than 1 & 2",
        (1, 1): "0",
        (4, 1): "nan (dist_1 has mass where 4 has 0)",
    }
    for (a, b), text in says.items():
        v = float(kldiv.kl_div(np.array(MX[b]), np.array(MX[a])))
        w(f"   {a} vs {b:<7}{text:<38}{_fmt(v):<16}{_fmt(v / 4):<16}")
    v_logits = float(kldiv.kl_div(np.array(MX[2]), np.array(MX_LOGITS_1), form=("probs", "logits")))
    w(f"   from_logits=False (softmax of the network output ≈ dist_1) vs 2: {_fmt(v_logits)}")
    w("   kldiv's answer for '4 vs 1' is +inf, exactly: no epsilon, no NaN. The other direction")
    rev = float(kldiv.kl_div(np.array(MX[4]), np.array(MX[1])))
    w(f"   KL(dist_4‖dist_1) is finite, 0.9·log(0.9/0.5) = {_fmt(rev)} (p = 0 terms count 0).")
    w()
    w("3. Keras sparse-autoencoder regularizer: 0.01·[KL(0.05‖ρ̂) + KL(0.95‖1−ρ̂)], where ρ̂ are")
    w("   the units' mean activations. Calling a categorical KL twice on scalars is a Bernoulli")
    w("   KL per unit, summed over units; kldiv says so directly:")
    rho_hat = np.array([0.01, 0.05, 0.2, 0.5, 0.9])
    p = np.stack([np.full_like(rho_hat, KERAS_TARGET), 1 - np.full_like(rho_hat, KERAS_TARGET)], -1)
    q = np.stack([rho_hat, 1 - rho_hat], -1)
    ours = KERAS_WEIGHT * float(kldiv.kl_div(p, q, reduction="sum"))
    eps = 1e-7  # keras.backend.epsilon(), the text's clip
    t = np.clip(KERAS_TARGET, eps, 1)
    keras_formula = KERAS_WEIGHT * float(
        np.sum(t * np.log(t / np.clip(rho_hat, eps, 1)))
        + np.sum((1 - t) * np.log((1 - t) / np.clip(1 - rho_hat, eps, 1)))
    )
    w(f"   ρ̂ = {rho_hat.tolist()}")
    w(f"   the text's formula (clipped at 1e-7): {keras_formula:.6f}")
    w(f"   kldiv: 0.01·kl_div([ρ, 1−ρ], [ρ̂, 1−ρ̂], reduction='sum') = {ours:.6f}")
    dead = np.array([0.0])
    kl_dead = float(kldiv.kl_div(np.array([[t, 1 - t]]), np.stack([dead, 1 - dead], -1)))
    clipped = float(t * np.log(t / eps) + (1 - t) * np.log(1 - t))
    w(f"   a dead unit (ρ̂ = 0): kldiv {_fmt(kl_dead)} (the target has mass 0.05 where ρ̂ has none);")
    w(f"   the clipped formula turns it into a finite {clipped:.6f} (ρ̂ taken as 1e-7)")
    return 0


def info(out=None) -> int:
    out = out or sys.stdout
    print(
        f"kldiv {kldiv.__version__} on Python {platform.python_version()} ({platform.machine()})",
        file=out,
    )
    for name in ("numpy", "array_api_compat", "torch", "jax"):
        try:
            mod = importlib.import_module(name)
            extra = ""
            if name == "torch":
                extra = f" (CUDA available: {mod.cuda.is_available()})"
            if name == "jax":
                extra = f" (devices: {', '.join(str(d) for d in mod.devices())})"
            print(f"  {name:<17} {getattr(mod, '__version__', '?')}{extra}", file=out)
        except ImportError:
            print(f"  {name:<17} not installed", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kldiv", description="The Kullback–Leibler divergence family, exact and explicit."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="recompute the seed texts' worked examples")
    sub.add_parser("info", help="versions and backends detected")
    args = parser.parse_args(argv)
    return {"demo": demo, "info": info}[args.command]()


if __name__ == "__main__":
    raise SystemExit(main())
