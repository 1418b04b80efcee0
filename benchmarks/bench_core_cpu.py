"""kldiv's core KL from logits against the usual PyTorch composition, on the CPU.

    python benchmarks/bench_core_cpu.py [--n 4096] [--v 32000] [--rounds 3] [--iters 7]

Anchor: ``F.kl_div(F.log_softmax(s), F.log_softmax(t), log_target=True,
reduction="batchmean")``; candidate: ``kldiv.kl_div(t, s, form="logits")`` (teacher t, student
s, same value). Forward + backward to the student logits, float32.

Method: every measurement runs in a fresh subprocess (so peak memory is its own), variants
alternate over ``--rounds`` rounds (so drift on a shared machine hits both), each run does 2
warm-up iterations and reports the median of ``--iters`` timed ones. Peak memory is the rise
of the process's peak resident set (``ru_maxrss``) over its resident set once the inputs
exist: everything forward and backward allocate, the student gradient included, for both.
Results go to ``benchmarks/results/core_cpu_<UTC timestamp>.json`` with the machine, versions
and the commit measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from _common import commit, cpu_model

VARIANTS = ("torch_composition", "kldiv")

CHILD = r"""
import json, resource, sys, time
import torch, torch.nn.functional as F
import kldiv

variant, n, v, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
s = torch.randn(n, v, requires_grad=True)
t = torch.randn(n, v)

def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)

if variant == "torch_composition":
    def step():
        ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
        return F.kl_div(ls, lt, log_target=True, reduction="batchmean")
else:
    def step():
        return kldiv.kl_div(t, s, form="logits")

base = rss_kib()
times, value = [], None
for i in range(2 + iters):
    s.grad = None
    t0 = time.perf_counter()
    loss = step()
    loss.backward()
    if i >= 2:
        times.append(time.perf_counter() - t0)
    value = loss.item()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"times_s": times, "peak_extra_mib": (peak - base) / 1024, "value": value}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    import numpy
    import torch

    import kldiv

    runs: dict[str, list[dict]] = {k: [] for k in VARIANTS}
    total = args.rounds * len(VARIANTS)
    done = 0
    for r in range(args.rounds):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            done += 1
            print(f"[{done}/{total}] round {r + 1}: {variant} ...", flush=True)
            out = subprocess.run(
                [sys.executable, "-c", CHILD, variant, str(args.n), str(args.v), str(args.iters)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))

    summary = {}
    for variant, rs in runs.items():
        summary[variant] = {
            "median_s": statistics.median(statistics.median(r["times_s"]) for r in rs),
            "peak_extra_mib": statistics.median(r["peak_extra_mib"] for r in rs),
            "value": rs[0]["value"],
        }
    anchor, cand = summary["torch_composition"], summary["kldiv"]
    ratios = {
        "time_kldiv_over_anchor": cand["median_s"] / anchor["median_s"],
        "peak_memory_kldiv_over_anchor": cand["peak_extra_mib"] / anchor["peak_extra_mib"],
    }
    one_nv_mib = args.n * args.v * 4 / 2**20
    result = {
        "benchmark": "core kl_div from float32 logits, forward+backward, CPU",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "shape": {"N": args.n, "V": args.v, "dtype": "float32", "one_NV_float32_MiB": one_nv_mib},
        "machine": {
            "cpu": cpu_model(),
            "cores_visible": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "commit": commit(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "kldiv": kldiv.__version__,
        },
        "method": "fresh subprocess per run; 2 warm-up + median of iters; rounds alternate order",
        "rounds": args.rounds,
        "iters": args.iters,
        "summary": summary,
        "ratios": ratios,
        "raw": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = result["date"][:16].replace(":", "-")  # one file per run: results never overwrite
    path = args.out / f"core_cpu_{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"\nN={args.n} V={args.v} float32, forward+backward on {cpu_model()},"
        f" torch {torch.__version__}"
    )
    print(f"{'variant':<20}{'median s':>10}{'peak extra MiB':>16}{'value':>12}")
    for variant, s in summary.items():
        print(f"{variant:<20}{s['median_s']:>10.3f}{s['peak_extra_mib']:>16.0f}{s['value']:>12.6f}")
    print(
        f"time ratio kldiv/anchor: {ratios['time_kldiv_over_anchor']:.3f}   "
        f"peak-memory ratio: {ratios['peak_memory_kldiv_over_anchor']:.3f}   (goal: both <= 1.2)"
    )
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
