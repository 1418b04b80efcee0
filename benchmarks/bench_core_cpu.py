"""The core functions from logits on torch (the headline API) against PyTorch eager,
torch.compile and the floor, on the CPU.

    python benchmarks/bench_core_cpu.py [--n 4096] [--v 32000] [--rounds 3] [--iters 5]
                                        [--kinds kl,js,...] [--variants eager,compile,core,floor]

``--variants eager,core_log_probs,definition_log_probs,eager_teacher_grad,core_teacher_grad,
definition_teacher_grad`` measures the two other inputs the engine takes on CPU:
log-probabilities (the step computes both log-softmaxes, as the eager formula does) and a
teacher that needs a gradient too, each also through the core's definition alone (what
they ran before the engine took them).

Forward + backward to the student logits from float32 logits, N × V. Candidate:
``kldiv.divergence(t, s, kind, form="logits")`` (teacher t, student s: ``kl_div``,
``reverse_kl_div``, ``js_div``, ... by name), which the row engine serves. Anchors: the
formula trainers write (for KL ``F.kl_div(F.log_softmax(s), F.log_softmax(t),
log_target=True, reduction="batchmean")``) in eager mode and under ``torch.compile`` (steady
state; its first call, the compilation, is reported separately), and the floor: the exps any
fused forward + backward needs (2 per element, 3 where a log of a mixture is needed) into a
freshly allocated ``[N, V]`` gradient. The method is :mod:`kldiv.cli.benchmark`'s (also behind
``kldiv bench``): a fresh subprocess per measurement, variants alternating over rounds,
median of ``--iters`` after 2 warm-ups; peak extra memory is the rise of the peak resident
set over the resident set once the inputs exist. Results go to
``benchmarks/results/core_cpu_<UTC timestamp>.json``.
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
    ap.add_argument("--kinds", default=",".join(benchmark.KINDS))
    ap.add_argument("--variants", default="eager,compile,core,floor")
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
    res["benchmark"] = "core functions from logits on torch, forward + backward to the student"
    res["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    res["commit"] = commit()
    # each candidate against its eager anchor (the log-softmaxes are in both steps of
    # "core_log_probs" and "eager"; both sides need a gradient in the "teacher_grad" pair) and
    # against the definition (the core without the row engine), which ran it before
    ratios = {
        "eager": {"core": "eager", "core_log_probs": "eager",
                  "core_teacher_grad": "eager_teacher_grad"},
        "definition": {"core_log_probs": "definition_log_probs",
                       "core_teacher_grad": "definition_teacher_grad"},
    }  # fmt: skip
    for name, pairs in ratios.items():
        key = f"{name}_over_core"
        for entry in res["kinds"].values():
            s = entry["summary"]
            for cand, anchor in pairs.items():
                a, c = s.get(anchor, {}).get("median_s"), s.get(cand, {}).get("median_s")
                if a and c:
                    s[cand][key] = a / c
    print(benchmark.table(res))
    for name, pairs in ratios.items():
        key = f"{name}_over_core"
        for cand in pairs:
            done = {k: e["summary"][cand] for k, e in res["kinds"].items() if cand in e["summary"]}
            if any(key in x for x in done.values()):
                print(f"{cand} × {name}:", ", ".join(
                    f"{k} {x[key]:.2f}" for k, x in done.items() if key in x
                ))  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"core_cpu_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
