"""FusedLinearDistillationLoss on CPU: peak memory and time against materialising the logits.

    python benchmarks/bench_fused_linear_cpu.py [--h 256] [--v 32000] [--n 1024,2048,4096]

Forward + backward of KL(teacher‖student) from the student's hidden states [N, H] and LM head
[V, H] (float32), the teacher given as logits [N, V]. Anchor: ``DistillationLoss`` on
``hidden @ W.T`` (the logits materialised, autograd through the matmul). Each measurement runs
in a fresh subprocess; peak extra memory is the rise of the peak resident set over the
resident set once the inputs exist (the teacher logits included in the inputs). The issue's
goal on CPU: memory independent of N·V beyond the chunk. Results go to
``benchmarks/results/fused_linear_cpu_<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import commit, cpu_model

CHILD = r"""
import json, resource, sys, time, torch
from kldiv.torch import DistillationLoss, FusedLinearDistillationLoss
variant, n, h, v = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
hidden = torch.randn(n, h, generator=g).requires_grad_(True)
weight = torch.randn(v, h, generator=g).div_(h**0.5).requires_grad_(True)
teacher = torch.randn(n, v, generator=g).mul_(2)  # in place: no transient second [N, V]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
if variant == "fused":
    fn = FusedLinearDistillationLoss("kl")
    step = lambda: fn(hidden, weight, teacher)
else:
    fn = DistillationLoss("kl")
    step = lambda: fn(hidden @ weight.T, teacher)
base = rss()
times = []
for i in range(3):
    hidden.grad = weight.grad = None
    t0 = time.perf_counter(); loss = step(); loss.backward(); times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"times_s": times[1:], "peak_extra_mib": peak - base, "value": loss.item()}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--n", default="1024,2048,4096")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    import torch

    import kldiv

    rows = []
    for n in (int(x) for x in args.n.split(",")):
        for variant in ("materialised", "fused"):
            argv = [sys.executable, "-c", CHILD, variant, str(n), str(args.h), str(args.v)]
            out = subprocess.run(argv, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r |= {"variant": variant, "N": n, "one_NV_float32_MiB": n * args.v * 4 / 2**20}
            rows.append(r)
            print(
                f"N={n:5d} {variant:12s} {statistics.median(r['times_s']):7.3f} s  "
                f"peak extra {r['peak_extra_mib']:7.1f} MiB  (one [N, V] float32: "
                f"{r['one_NV_float32_MiB']:.0f} MiB)",
                flush=True,
            )
    result = {
        "benchmark": "FusedLinearDistillationLoss vs materialised logits, CPU, fwd+bwd, kl",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "shape": {"H": args.h, "V": args.v},
        "commit": commit(),
        "machine": {"cpu": cpu_model(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "kldiv": kldiv.__version__},
        "runs": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fused_linear_cpu_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
