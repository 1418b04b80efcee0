"""DistillationLoss's Triton kernels on a GPU against PyTorch eager, torch.compile and Liger
Kernel, at the shapes of the distillation issue; results to benchmarks/results/.

    python benchmarks/bench_distill_gpu.py [--n 8192] [--v 128256,151936] [--dtype bfloat16]
                                           [--kinds kl,reverse_kl,js] [--rounds 3] [--iters 10]

The method is :mod:`kldiv.cli.benchmark`'s (also behind ``kldiv bench``): CUDA-event timings of
forward + backward after warm-up, medians over alternating rounds, peak memory above the
inputs from ``torch.cuda.max_memory_allocated``, and the memory-traffic floor
``5·N·V·itemsize`` bytes at the copy bandwidth measured on the same GPU. Liger Kernel is
timed when importable (carry its wheel to the device machine). Small shapes (N ≤ 1024,
V ≤ 32000) are run too: there kldiv must never be slower than eager.
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
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--v", default="128256,151936")
    ap.add_argument("--dtype", default="bfloat16", choices=benchmark.DTYPES)
    ap.add_argument("--kinds", default="kl,reverse_kl,js")
    ap.add_argument("--variants", default="eager,compile,liger,kldiv")
    ap.add_argument("--small", default="1024x32000,256x8192", help="extra NxV shapes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_distill_gpu.py: no CUDA device here", file=sys.stderr)
        return 2
    shapes = [(args.n, int(v)) for v in args.v.split(",")]
    shapes += [tuple(int(x) for x in s.split("x")) for s in args.small.split(",") if s]
    runs = []
    for n, v in shapes:
        res = benchmark.run(
            "cuda",
            n,
            v,
            args.dtype,
            tuple(args.kinds.split(",")),
            tuple(args.variants.split(",")),
            args.rounds,
            args.iters,
            progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
        print(f"N={n} V={v} {args.dtype}")
        print(benchmark.table(res), flush=True)
        runs.append(res)
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit(),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"distill_gpu_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
