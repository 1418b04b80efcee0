"""The core functions from logits on JAX, under ``jax.jit(jax.value_and_grad(...))``, against
the plain ``jax.nn`` composition of the same formula and, where it has the divergence, optax.

    python benchmarks/bench_core_jax.py [--n 4096] [--v 32000] [--rounds 3] [--iters 5]
                                        [--kinds kl,reverse_kl,...] [--variants kldiv,...]

Forward + backward to the student logits ``s`` (teacher ``t``), float32, N × V, steady state:
``jax.jit(jax.value_and_grad(loss))(s, t)`` with the teacher an argument, as in training.
Candidate: ``kldiv.divergence(t, s, kind, form="logits")`` (``kl_div``, ``reverse_kl_div``,
``js_div`` with β = 1/2, the skew divergences with α = 0.1, ``symmetric_kl_div``,
``tv_distance``; the defaults). Anchors, each the mean over rows of the same value:

* ``composition``: the formula over ``jax.nn.log_softmax`` as JAX code writes it, the
  mixture of the JS and skew divergences in log space with ``jnp.logaddexp`` (the formulas of
  :func:`kldiv.cli.benchmark.composition`, the PyTorch benchmarks' anchor);
* ``composition_probs``: for the three mixture divergences, the mixture formed from the
  probabilities instead, ``log(β·softmax(t) + (1 − β)·softmax(s))``;
* ``optax``: ``optax.losses.kl_divergence_with_log_targets(log_predictions, log_targets)``
  for KL(t‖s) and, with the arguments exchanged, KL(s‖t).

Method, as ``bench_core_cpu.py``: every measurement runs in a fresh subprocess (compilation
and peak memory are its own), the variants alternate over ``--rounds`` rounds (drift on a
shared machine hits all of them), each run compiles, warms up twice and reports the median of
``--iters`` timed calls; the figure of merit is the median over rounds of those medians, and
within one run only ratios are compared. The CPU time of each call (all threads, user and
system: page faults on fresh buffers included) is recorded too; on a machine shared with
other work it is the steadier figure, since waiting for a core does not count. Peak extra
memory is the rise of the process's peak resident set over its resident set once the inputs
exist. Results go to
``benchmarks/results/core_jax_<UTC timestamp>.json`` with the machine, the versions and the
commit measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import commit, cpu_model

KINDS = ("kl", "reverse_kl", "js", "skew_kl", "skew_reverse_kl", "symmetric_kl", "tv")
VARIANTS = ("kldiv", "composition", "composition_probs", "optax")
MIXTURE_KINDS = ("js", "skew_kl", "skew_reverse_kl")
OPTAX_KINDS = ("kl", "reverse_kl")
BETA = 0.5  # js_div's default
ALPHA = 0.1  # the skew divergences' default

CHILD = r"""
import json, math, resource, sys, time
import jax, jax.numpy as jnp

kind, variant = sys.argv[1], sys.argv[2]
n, v, iters = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
beta, alpha = float(sys.argv[6]), float(sys.argv[7])

def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)

def kl(lp, lq):  # mean over rows of KL(P‖Q) from log-probabilities
    return jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1))

def log_mix(la, lb, w, probs):
    if probs:
        return jnp.log(w * jnp.exp(la) + (1 - w) * jnp.exp(lb))
    return jnp.logaddexp(la + math.log(w), lb + math.log1p(-w))

def composition(s, t, probs=False):
    ls, lt = jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1)
    if kind == "kl":
        return kl(lt, ls)
    if kind == "reverse_kl":
        return kl(ls, lt)
    if kind == "symmetric_kl":
        return kl(lt, ls) + kl(ls, lt)
    if kind == "js":
        lm = log_mix(lt, ls, beta, probs)
        return beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)
    if kind == "skew_kl":
        return kl(lt, log_mix(lt, ls, alpha, probs))
    if kind == "skew_reverse_kl":
        return kl(ls, log_mix(ls, lt, alpha, probs))
    if kind == "tv":
        return 0.5 * jnp.mean(jnp.sum(jnp.abs(jnp.exp(ls) - jnp.exp(lt)), axis=-1))
    raise ValueError(kind)

if variant == "kldiv":
    import kldiv
    params = {"js": {"beta": beta}, "skew_kl": {"alpha": alpha}}
    params["skew_reverse_kl"] = params["skew_kl"]
    loss = lambda s, t: kldiv.divergence(t, s, kind, form="logits", **params.get(kind, {}))
elif variant == "composition":
    loss = composition
elif variant == "composition_probs":
    loss = lambda s, t: composition(s, t, probs=True)
elif variant == "optax":
    import optax
    f = optax.losses.kl_divergence_with_log_targets  # (log_predictions, log_targets)
    if kind == "kl":
        loss = lambda s, t: f(jax.nn.log_softmax(s), jax.nn.log_softmax(t)).mean()
    else:
        loss = lambda s, t: f(jax.nn.log_softmax(t), jax.nn.log_softmax(s)).mean()
else:
    raise ValueError(variant)

ks, kt = jax.random.split(jax.random.PRNGKey(0))
s = jax.random.normal(ks, (n, v), jnp.float32)
t = jax.random.normal(kt, (n, v), jnp.float32) * 2.0
jax.block_until_ready((s, t))
step = jax.jit(jax.value_and_grad(loss))
base = rss_kib()
t0 = time.perf_counter()
value, grad = jax.block_until_ready(step(s, t))
first_s = time.perf_counter() - t0
del value, grad
times, cpu = [], []
for i in range(2 + iters):
    t0, c0 = time.perf_counter(), time.process_time()
    value, grad = jax.block_until_ready(step(s, t))
    if i >= 2:
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out = float(value)
    del value, grad
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = {"times_s": times, "cpu_s": cpu, "first_call_s": first_s}
print(json.dumps(dict(res, peak_extra_mib=(peak - base) / 1024, value=out)))
"""


def applies(kind: str, variant: str) -> bool:
    if variant == "composition_probs":
        return kind in MIXTURE_KINDS
    if variant == "optax":
        return kind in OPTAX_KINDS
    return True


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    kinds = tuple(args.kinds.split(","))
    variants = tuple(args.variants.split(","))
    for k in kinds:
        if k not in KINDS:
            ap.error(f"unknown kind {k!r}; choose from {', '.join(KINDS)}")
    for x in variants:
        if x not in VARIANTS:
            ap.error(f"unknown variant {x!r}; choose from {', '.join(VARIANTS)}")

    import jax
    import jaxlib
    import numpy

    import kldiv

    try:
        import optax

        optax_version = optax.__version__
    except ImportError:
        optax_version = None
        variants = tuple(x for x in variants if x != "optax")

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    runs: dict[str, dict[str, list[dict]]] = {k: {} for k in kinds}
    plan = [(k, x) for k in kinds for x in variants if applies(k, x)]
    done = 0
    for r in range(args.rounds):
        for kind, variant in plan if r % 2 == 0 else plan[::-1]:
            done += 1
            print(f"[{done}/{args.rounds * len(plan)}] round {r + 1}: {kind} {variant}", flush=True)
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    kind,
                    variant,
                    str(args.n),
                    str(args.v),
                    str(args.iters),
                    str(BETA),
                    str(ALPHA),
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            if out.returncode != 0:
                raise SystemExit(f"{kind} {variant} failed:\n{out.stderr[-3000:]}")
            record = json.loads(out.stdout.strip().splitlines()[-1])
            runs[kind].setdefault(variant, []).append(record)

    results = {}
    for kind, by_variant in runs.items():
        summary = {
            variant: {
                "median_s": statistics.median(statistics.median(r["times_s"]) for r in rs),
                "median_cpu_s": statistics.median(statistics.median(r["cpu_s"]) for r in rs),
                "first_call_s": statistics.median(r["first_call_s"] for r in rs),
                "peak_extra_mib": statistics.median(r["peak_extra_mib"] for r in rs),
                "value": rs[0]["value"],
            }
            for variant, rs in by_variant.items()
        }
        ratios = {}
        for key, suffix in (("median_s", ""), ("median_cpu_s", "_cpu")):
            anchors = {x: s[key] for x, s in summary.items() if x != "kldiv"}
            if "kldiv" not in summary or not anchors:
                continue
            best = min(anchors, key=anchors.__getitem__)
            for x, t in anchors.items():
                ratios[f"{x}_over_kldiv{suffix}"] = t / summary["kldiv"][key]
            ratios[f"fastest_anchor{suffix}"] = best
            ratios[f"fastest_anchor_over_kldiv{suffix}"] = anchors[best] / summary["kldiv"][key]
        results[kind] = {"summary": summary, "ratios": ratios, "raw": by_variant}

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {
        "benchmark": "core divergences from float32 logits on JAX, jit(value_and_grad), CPU",
        "date": stamp,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "shape": {"N": args.n, "V": args.v, "dtype": "float32"},
        "one_NV_float32_MiB": args.n * args.v * 4 / 2**20,
        "params": {"js_beta": BETA, "skew_alpha": ALPHA},
        "machine": {
            "cpu": cpu_model(),
            "cores_visible": os.cpu_count(),
            "platform": platform.platform(),
            "jax_backend": jax.default_backend(),
            "load_average_at_end": load,
        },
        "commit": commit(),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "optax": optax_version,
            "numpy": numpy.__version__,
            "kldiv": kldiv.__version__,
        },
        "method": (
            "fresh subprocess per run; compile + 2 warm-up + median of iters; rounds alternate "
            "order; ratios are anchor time / kldiv time (> 1: kldiv faster)"
        ),
        "rounds": args.rounds,
        "iters": args.iters,
        "kinds": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"core_jax_{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"\nN={args.n} V={args.v} float32, jit(value_and_grad), {cpu_model()},"
        f" jax {jax.__version__}"
    )
    cols = [x for x in VARIANTS if x in variants]
    print("wall-clock median (CPU-time median) per call; ratio: fastest anchor / kldiv")
    print(
        f"{'kind':<17}" + "".join(f"{x:>20}" for x in cols) + f"{'wall ratio':>30}{'cpu ratio':>12}"
    )
    for kind, entry in results.items():
        cells = ""
        for x in cols:
            s = entry["summary"].get(x)
            cells += f"{s['median_s']:>10.2f} ({s['median_cpu_s']:5.2f})" if s else f"{'-':>20}"
        r = entry["ratios"]
        if r:
            wall = f"{r['fastest_anchor_over_kldiv']:.3f} ({r['fastest_anchor']})"
            tail = f"{wall:>30}{r['fastest_anchor_over_kldiv_cpu']:>12.3f}"
        else:
            tail = ""
        print(f"{kind:<17}{cells}{tail}")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
