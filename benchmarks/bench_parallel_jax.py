"""Vocab-parallel divergences on JAX: ``kldiv.jax.vocab_parallel_divergence`` inside
``jax.shard_map`` against gathering the logits and calling the core, side by side.

    python benchmarks/bench_parallel_jax.py [--world 2] [--n 2048] [--v 32000] [--rounds 3]
        [--iters 5] [--kinds kl,js,...] [--variants kldiv,gather] [--out DIR]

The vocabulary is split over ``--world`` devices (forced CPU host devices,
``--xla_force_host_platform_device_count``); every device holds the ``[N, V/world]`` float32
slices of both logits. The step is ``jax.jit(jax.value_and_grad(loss))(s, t)``: forward and
backward to the student's logits ``s``, the teacher ``t`` an argument, as in training. The
variants, both inside ``jax.shard_map`` over a 1-D ``"vocab"`` mesh:

- ``kldiv``: ``vocab_parallel_divergence(t, s, kind, vocab_axis_name="vocab")``: one
  all-gather of ``[4, N]`` statistics and one psum of ``[2, N]`` (the values and the
  student's Σh) in forward, none in backward.
- ``gather``: ``jax.lax.all_gather`` of both slices (``tiled``), then
  ``kldiv.divergence(t, s, kind, form="logits")`` on the full ``[N, V]`` logits on every
  device, and ``jax.lax.pmean`` of the (equal) values over the axis to state that the loss
  is replicated. JAX's backward of the all-gather is a reduce-scatter of the full ``[N, V]``
  gradient: every device computes the whole gradient and keeps its slice of the sum.

Method, as ``bench_core_jax.py``: every measurement runs in a fresh subprocess (compilation
and peak memory are its own), the variants alternate over ``--rounds`` rounds, each run
compiles, warms up twice and reports the median of ``--iters`` timed calls (wall and CPU
time); the figure of merit is the median over rounds, and ratios are gather / kldiv (> 1:
kldiv faster or smaller). Memory, two figures: the rise of the process's peak resident set
over its resident set once the inputs exist (all ``--world`` devices share the process on a
CPU, so this is the sum over devices), and XLA's own per-device figure for the compiled step,
``memory_analysis().temp_size_in_bytes`` (temporaries beyond the arguments and outputs).
Every child checks its value against ``kldiv.divergence`` on the full logits before timing
(float32: rtol 1e-4) and counts the collectives in its jaxpr. Results go to
``benchmarks/results/parallel_jax_<UTC timestamp>.json`` with the machine, the versions and
the commit measured.
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
VARIANTS = ("kldiv", "gather")
DEFAULT_KINDS = ("kl", "js", "tv")
PARAMS = {"js": {"beta": 0.5}, "skew_kl": {"alpha": 0.1}, "skew_reverse_kl": {"alpha": 0.1}}

CHILD = r"""
import json, os, resource, sys, time
world = int(sys.argv[3])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={world}"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import kldiv
from kldiv.jax import vocab_parallel_divergence

kind, variant = sys.argv[1], sys.argv[2]
n, v, iters = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
params = json.loads(sys.argv[7])

def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)

mesh = Mesh(np.array(jax.devices()), ("vocab",))
spec = P(None, "vocab")

def kldiv_local(s, t):
    return vocab_parallel_divergence(t, s, kind, vocab_axis_name="vocab", **params)

def gather_local(s, t):
    s_full = jax.lax.all_gather(s, "vocab", axis=1, tiled=True)
    t_full = jax.lax.all_gather(t, "vocab", axis=1, tiled=True)
    loss = kldiv.divergence(t_full, s_full, kind, form="logits", **params)
    return jax.lax.pmean(loss, "vocab")

local = kldiv_local if variant == "kldiv" else gather_local
loss = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=P())

ks, kt = jax.random.split(jax.random.PRNGKey(0))
sharding = NamedSharding(mesh, spec)
s = jax.device_put(jax.random.normal(ks, (n, v), jnp.float32), sharding)
t = jax.device_put(jax.random.normal(kt, (n, v), jnp.float32) * 2.0, sharding)
jax.block_until_ready((s, t))

COLLECTIVES = {"psum", "psum_invariant", "pmax", "all_gather", "all_gather_invariant",
               "psum_scatter", "reduce_scatter", "all_to_all", "ppermute"}
def collectives(jaxpr):
    found = []
    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name in COLLECTIVES:
                found.append([eqn.primitive.name, list(eqn.invars[0].aval.shape)])
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)
    walk(jaxpr.jaxpr)
    return found

step = jax.jit(jax.value_and_grad(loss))
forward = collectives(jax.make_jaxpr(loss)(s, t))
both = collectives(jax.make_jaxpr(jax.value_and_grad(loss))(s, t))
compiled = step.lower(s, t).compile()
analysis = compiled.memory_analysis()
temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
base = rss_kib()
t0 = time.perf_counter()
value, grad = jax.block_until_ready(step(s, t))
first_s = time.perf_counter() - t0
want = float(jax.jit(lambda s, t: kldiv.divergence(t, s, kind, form="logits", **params))(
    s, t))
got = float(value)
if not abs(got - want) <= 1e-4 * abs(want) + 1e-6:
    raise SystemExit(f"{variant} {kind}: {got} != kldiv {want}")
del value, grad
times, cpu = [], []
for i in range(2 + iters):
    t0, c0 = time.perf_counter(), time.process_time()
    value, grad = jax.block_until_ready(step(s, t))
    if i >= 2:
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    del value, grad
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({
    "times_s": times, "cpu_s": cpu, "first_call_s": first_s,
    "peak_extra_mib": (peak - base) / 1024,
    "xla_temp_mib_per_device": None if temp is None else temp / 2**20,
    "value": got, "collectives_forward": forward, "collectives_forward_backward": both,
}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--kinds", default=",".join(DEFAULT_KINDS))
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
    if args.v % args.world:
        ap.error(f"--v {args.v} must be a multiple of --world {args.world}")

    import jax
    import jaxlib
    import numpy

    import kldiv

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    runs: dict[str, dict[str, list[dict]]] = {k: {} for k in kinds}
    plan = [(k, x) for k in kinds for x in variants]
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
                    str(args.world),
                    str(args.n),
                    str(args.v),
                    str(args.iters),
                    json.dumps(PARAMS.get(kind, {})),
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
                "xla_temp_mib_per_device": rs[0]["xla_temp_mib_per_device"],
                "value": rs[0]["value"],
                "collectives_forward": rs[0]["collectives_forward"],
                "collectives_forward_backward": rs[0]["collectives_forward_backward"],
            }
            for variant, rs in by_variant.items()
        }
        ratios = {}
        if "kldiv" in summary and "gather" in summary:
            mine, other = summary["kldiv"], summary["gather"]
            for key in ("median_s", "median_cpu_s", "peak_extra_mib", "xla_temp_mib_per_device"):
                if mine[key] and other[key] is not None:
                    ratios[f"gather_over_kldiv_{key}"] = other[key] / mine[key]
        results[kind] = {"summary": summary, "ratios": ratios, "raw": by_variant}

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {
        "benchmark": "vocab-parallel divergences on JAX CPU host devices, jit(value_and_grad)",
        "date": stamp,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "shape": {"N": args.n, "V": args.v, "world": args.world, "dtype": "float32"},
        "slice_float32_MiB": args.n * args.v // args.world * 4 / 2**20,
        "params": PARAMS,
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
            "numpy": numpy.__version__,
            "kldiv": kldiv.__version__,
        },
        "method": (
            "fresh subprocess per run with --world forced CPU host devices; compile + 2 warm-up "
            "+ median of iters; rounds alternate order; ratios are gather / kldiv (> 1: kldiv "
            "faster or smaller); peak_extra_mib is the whole process (all devices), "
            "xla_temp_mib_per_device XLA's temporaries of the compiled step per device"
        ),
        "rounds": args.rounds,
        "iters": args.iters,
        "kinds": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"parallel_jax_{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"\nN={args.n} V={args.v} float32 over {args.world} CPU host devices, "
        f"jit(value_and_grad), {cpu_model()}, jax {jax.__version__}"
    )
    print("wall median (CPU median) per step; peak extra RSS; XLA temp per device")
    for kind, entry in results.items():
        for variant, s in entry["summary"].items():
            temp = s["xla_temp_mib_per_device"]
            print(
                f"{kind:<17}{variant:<8}{s['median_s']:>9.3f} s ({s['median_cpu_s']:6.3f})"
                f"{s['peak_extra_mib']:>10.0f} MiB"
                + (f"{temp:>10.0f} MiB" if temp is not None else f"{'-':>14}")
            )
        r = entry["ratios"]
        if r:
            print(
                f"{'':<17}gather / kldiv: time {r['gather_over_kldiv_median_s']:.2f}, "
                f"memory {r.get('gather_over_kldiv_peak_extra_mib', float('nan')):.2f}"
            )
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
