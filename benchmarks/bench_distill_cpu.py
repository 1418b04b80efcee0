"""DistillationLoss's CPU fast path against PyTorch eager and torch.compile.

    python benchmarks/bench_distill_cpu.py [--n 4096] [--v 32000] [--rounds 3] [--iters 5]
                                           [--kinds kl,reverse_kl,js,skew_kl,skew_reverse_kl,tv]

Forward + backward to the student logits from float32 logits, N × V. Anchors: the formula
trainers write (for KL ``F.kl_div(F.log_softmax(s), F.log_softmax(t), log_target=True,
reduction="batchmean")``) in eager mode and under ``torch.compile`` (steady state after
warm-up; its first call, the compilation, is reported separately). Candidate:
``kldiv.torch.DistillationLoss(kind)``; and the floor, the exps any fused forward + backward
needs (2 per element, 3 where a log of a mixture is needed) into a freshly allocated
``[N, V]`` gradient. The method is :mod:`kldiv.cli.benchmark`'s (also behind
``kldiv bench``): a fresh subprocess per measurement, variants alternating over rounds,
median of ``--iters`` after 2 warm-ups; peak extra memory is the rise of the peak resident
set over the resident set once the inputs exist. Results go to
``benchmarks/results/distill_cpu_<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import commit

from kldiv.cli import benchmark


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--kinds", default="kl,reverse_kl,js,skew_kl,skew_reverse_kl,tv")
    ap.add_argument("--variants", default="eager,compile,kldiv,floor")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    res = benchmark.run(
        "cpu",
        args.n,
        args.v,
        "float32",
        tuple(args.kinds.split(",")),
        tuple(args.variants.split(",")),
        args.rounds,
        args.iters,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    res["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    res["commit"] = commit()
    res["one_NV_float32_MiB"] = args.n * args.v * 4 / 2**20
    for entry in res["kinds"].values():
        kl = entry["summary"].get("kldiv", {})
        if "peak_extra_mib" in kl:
            kl["peak_extra_over_one_NV"] = kl["peak_extra_mib"] / res["one_NV_float32_MiB"]
    print(benchmark.table(res))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"distill_cpu_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
