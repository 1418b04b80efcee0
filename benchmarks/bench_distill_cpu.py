"""DistillationLoss's CPU fast path against PyTorch eager and torch.compile.

    python benchmarks/bench_distill_cpu.py [--n 4096] [--v 32000] [--rounds 3] [--iters 5]

Forward + backward to the student logits from float32 logits, N × V, KL(teacher‖student)
("kl") and the reverse KL. Anchors: ``F.kl_div(F.log_softmax(s), F.log_softmax(t),
log_target=True, reduction="batchmean")`` in eager mode and under ``torch.compile`` (steady
state after warm-up; its first-call compile time is reported separately), and for the reverse
KL the same with the arguments swapped. Candidate: ``kldiv.torch.DistillationLoss(kind)``.
Same method as bench_core_cpu.py: a fresh subprocess per measurement, variants alternating
over rounds, median of ``--iters`` after 2 warm-ups; peak extra memory is the rise of the
peak resident set over the resident set once the inputs exist. Results go to
``benchmarks/results/distill_cpu_<UTC timestamp>.json``.
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

VARIANTS = ("eager", "compile", "kldiv")

CHILD = r"""
import json, resource, sys, time
import torch, torch.nn.functional as F
from kldiv.torch import DistillationLoss

variant, kind = sys.argv[1], sys.argv[2]
n, v, iters = (int(a) for a in sys.argv[3:6])
torch.manual_seed(0)
s = torch.randn(n, v, requires_grad=True)
t = torch.randn(n, v)

def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)

def composition(s, t):
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if kind == "kl":
        return F.kl_div(ls, lt, log_target=True, reduction="batchmean")
    return F.kl_div(lt, ls, log_target=True, reduction="batchmean")

if variant == "eager":
    step = composition
elif variant == "compile":
    step = torch.compile(composition)
else:
    step = DistillationLoss(kind)

base = rss_kib()
times, first = [], None
for i in range(2 + iters):
    s.grad = None
    t0 = time.perf_counter()
    loss = step(s, t)
    loss.backward()
    dt = time.perf_counter() - t0
    if i == 0:
        first = dt
    if i >= 2:
        times.append(dt)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"times_s": times, "first_call_s": first, "peak_extra_mib": (peak - base) / 1024,
                  "value": loss.item()}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--kinds", default="kl,reverse_kl")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    import torch

    import kldiv

    result = {
        "benchmark": "DistillationLoss CPU fast path vs eager and torch.compile, fwd+bwd, float32",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "shape": {"N": args.n, "V": args.v, "one_NV_float32_MiB": args.n * args.v * 4 / 2**20},
        "machine": {"cpu": cpu_model(), "cores_visible": len(os.sched_getaffinity(0)),
                    "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
        "commit": commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "kldiv": kldiv.__version__},
        "kinds": {},
    }  # fmt: skip
    for kind in args.kinds.split(","):
        runs: dict[str, list[dict]] = {k: [] for k in VARIANTS}
        for r in range(args.rounds):
            for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, variant, kind, str(args.n), str(args.v),
                     str(args.iters)], capture_output=True, text=True, check=True,
                )  # fmt: skip
                runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
                median = statistics.median(runs[variant][-1]["times_s"])
                print(f"{kind} round {r + 1} {variant}: {median:.3f} s", flush=True)
        summary = {
            k: {
                "median_s": statistics.median(statistics.median(x["times_s"]) for x in rs),
                "first_call_s": statistics.median(x["first_call_s"] for x in rs),
                "peak_extra_mib": statistics.median(x["peak_extra_mib"] for x in rs),
                "value": rs[0]["value"],
            }
            for k, rs in runs.items()
        }
        summary["speedup_vs_eager"] = summary["eager"]["median_s"] / summary["kldiv"]["median_s"]
        summary["speedup_vs_compile"] = (
            summary["compile"]["median_s"] / summary["kldiv"]["median_s"]
        )
        summary["kldiv_peak_extra_over_one_NV"] = summary["kldiv"]["peak_extra_mib"] / (
            args.n * args.v * 4 / 2**20
        )
        summary["runs"] = runs
        result["kinds"][kind] = summary
        print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"distill_cpu_{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
