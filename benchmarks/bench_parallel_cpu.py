"""Vocab-parallel KL on Gloo ranks (CPU): ParallelDistillationLoss against the hand-rolled
pattern and against gathering the logits, side by side.

    python benchmarks/bench_parallel_cpu.py [--world 2] [--n 2048] [--v 32000] [--iters 5]
        [--variants kldiv,hand-rolled,gather] [--baseline SRC --rounds 3]

Each variant runs in a fresh launch of ``--world`` ranks, with one intra-op thread per rank.
A rank holds the ``[N, V/world]`` float32 slice of both logits. The step is forward and
backward of the KL(teacher‖student) mean over the N rows. The variants:

- ``kldiv``: ``ParallelDistillationLoss("kl", vocab_group=WORLD)``.
- ``hand-rolled``: what trainers write, done carefully. Upcast the slice to float32, then
  four all-reduces of ``[N]``: the max and the sum of exps, for each side. Then one
  all-reduce of the per-row loss. Getting the gradient right takes two different idioms.
  The loss enters as ``x + (Σ_ranks x − x).detach()``, so each rank gets its own terms'
  gradient. The student's sum of exps goes through an autograd all-reduce, whose backward
  adds every rank's share of its gradient: one more collective in backward. Either idiom in
  the other's place gives wrong gradients, which is the usual bug.
- ``gather``: all-gather both logits and compute the full loss on every rank, with the
  gradient flowing into the rank's own slice only (the naive way).

``--baseline SRC`` (a ``src`` directory of another kldiv tree, e.g. an older commit
unpacked with ``git archive``) also times ``kldiv`` from that tree: ``--rounds`` launches
of each, alternating (this tree first in even rounds, the baseline first in odd ones), in
the same session; reported are the medians of wall and CPU time per step over every
round's steps, and baseline / this.

Per variant: the median step time (wall and the rank's CPU time) on rank 0, the
collectives per forward and backward (counted with torch.profiler), the bytes each rank
hands to collectives (its payload, before the algorithm's own traffic), and each rank's peak
RSS above its inputs. Every
variant's loss and gradient are checked against kldiv's before timing. The results go to
``benchmarks/results/parallel_cpu_<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn

VARIANTS = ("kldiv", "hand-rolled", "gather")


def _global_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks with the gradient of this rank's own terms only. (An autograd
    all-reduce here would add up every rank's copy of the loss's gradient: world times too
    large.)"""
    total = x.detach().clone()
    dist.all_reduce(total)
    return x + (total - x.detach())


def hand_rolled(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    s, t = s.float() / temperature, t.float() / temperature
    m_s = s.detach().amax(-1, keepdim=True)
    dist.all_reduce(m_s, op=dist.ReduceOp.MAX)
    m_t = t.amax(-1, keepdim=True)
    dist.all_reduce(m_t, op=dist.ReduceOp.MAX)
    # z_s: every rank's loss terms depend on it, so its gradient must be summed over the
    # ranks in backward (an autograd all-reduce); z_t needs no gradient
    z_s = dnn.all_reduce((s - m_s).exp().sum(-1, keepdim=True))
    z_t = (t - m_t).exp().sum(-1, keepdim=True)
    dist.all_reduce(z_t)
    ls = s - m_s - z_s.log()
    lt = t - m_t - z_t.log()
    return _global_sum((lt.exp() * (lt - ls)).sum(-1)).mean()


def gathered(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    from kldiv.torch import DistillationLoss

    world, rank = dist.get_world_size(), dist.get_rank()
    parts_s = [torch.empty_like(s) for _ in range(world)]
    parts_t = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts_s, s.detach())
    dist.all_gather(parts_t, t)
    parts_s[rank] = s  # the gradient reaches this rank's own slice, from its own copy
    return DistillationLoss("kl", fast_path=False)(torch.cat(parts_s, -1), torch.cat(parts_t, -1))


def step_fn(variant: str):
    if variant == "kldiv":
        from kldiv.torch.parallel import ParallelDistillationLoss

        loss = ParallelDistillationLoss("kl", vocab_group=dist.group.WORLD)
        return lambda s, t: loss(s, t)
    return hand_rolled if variant == "hand-rolled" else gathered


# which argument of each collective holds what this rank contributes
_PAYLOAD = {
    "all_reduce": 0,
    "all_gather": 1,
    "all_gather_into_tensor": 1,
    "reduce_scatter": 1,
    "reduce_scatter_tensor": 1,
    "broadcast": 0,
    "reduce": 0,
    "scatter": 1,
}
_SENT = {"bytes": 0}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return sum(_nbytes(y) for y in x or ())


def _count_payload() -> None:
    """Wraps torch.distributed's collectives to add up the bytes each rank hands them (the
    real collectives still run; the profiler counts the calls independently)."""
    for name, arg in _PAYLOAD.items():
        real = getattr(dist, name)

        def spy(*args, _real=real, _arg=arg, **kwargs):
            if len(args) > _arg:
                _SENT["bytes"] += _nbytes(args[_arg])
            return _real(*args, **kwargs)

        setattr(dist, name, spy)


def profile_step(step, s, t) -> dict:
    out = {}
    for phase in ("forward", "backward"):
        _SENT["bytes"] = 0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            if phase == "forward":
                loss = step(s, t)
            else:
                loss.backward()
        events = [e for e in prof.events() if e.name.startswith("c10d::")]
        out[phase] = {
            "collectives": len(events),
            "bytes_in": _SENT["bytes"],
            "names": sorted({e.name for e in events}),
        }
    s.grad = None
    return out


def worker(rank: int, world: int, port: int, variant: str, n: int, v: int, iters: int) -> dict:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    _count_payload()
    # each rank draws its own slice (a seed per rank), in place: no transient full-size
    # tensor may set the peak that is measured below
    g = torch.Generator().manual_seed(rank)
    width = (rank + 1) * v // world - rank * v // world
    s = torch.randn(n, width, generator=g).mul_(2).requires_grad_(True)
    t = torch.randn(n, width, generator=g).mul_(2)
    step = step_fn(variant)
    import kldiv.torch.parallel  # noqa: F401 - imported before the baseline, as every module

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu = [], []
    for _ in range(2 + iters):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        step(s, t).backward()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        s.grad = None
    # before the profiler (its buffers) and the check (a second gradient) add their own
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    counts = profile_step(step, s, t)
    # correctness: this variant's loss and gradient slice against kldiv's
    loss = step(s, t)
    loss.backward()
    grad = s.grad.clone()
    s.grad = None
    from kldiv.torch.parallel import ParallelDistillationLoss

    ref = ParallelDistillationLoss("kl", vocab_group=dist.group.WORLD)(s, t)
    ref.backward()
    agrees = bool(
        torch.allclose(loss.detach(), ref.detach(), rtol=1e-4, atol=1e-6)
        and torch.allclose(grad, s.grad, rtol=1e-3, atol=1e-9)
    )
    s.grad = None
    import kldiv

    result = {
        "kldiv": kldiv.__file__,
        "times_s": times[2:],
        "cpu_s": cpu[2:],
        "agrees_with_kldiv": agrees,
        "value": float(loss.detach()),
        "peak_extra_mib": peak,
        **counts,
    }
    dist.barrier()
    dist.destroy_process_group()
    return result


def launch(
    variant: str, world: int, n: int, v: int, iters: int, src: str | None = None
) -> list[dict]:
    """One launch of ``world`` ranks; ``src``: import kldiv from there (PYTHONPATH)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                str(r),
                str(world),
                str(store.port),
                variant,
                str(n),
                str(v),
                str(iters),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    out = []
    for r, p in enumerate(procs):
        stdout, stderr = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"{variant} rank {r} failed:\n{stderr[-3000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def against(args: argparse.Namespace) -> dict:
    """``kldiv`` from this tree and from ``args.baseline``, alternating launches."""
    trees = {"this": None, "baseline": args.baseline}
    runs: dict[str, list] = {name: [] for name in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for name in order:
            ranks = launch("kldiv", args.world, args.n, args.v, args.iters, trees[name])
            runs[name].append({"load_average": os.getloadavg(), "ranks": ranks})
            r0 = ranks[0]
            print(
                f"round {r} {name:<9} wall {statistics.median(r0['times_s']) * 1e3:8.1f} ms"
                f"  cpu {statistics.median(r0['cpu_s']) * 1e3:8.1f} ms  ({r0['kldiv']})"
            )
    summary = {}
    for name, rs in runs.items():
        wall = [x for run in rs for x in run["ranks"][0]["times_s"]]
        cpu = [x for run in rs for x in run["ranks"][0]["cpu_s"]]
        summary[name] = {
            "median_s": statistics.median(wall),
            "median_cpu_s": statistics.median(cpu),
        }
    ratio = {
        key: summary["baseline"][key] / summary["this"][key] for key in ("median_s", "median_cpu_s")
    }
    print(
        f"baseline / this: wall {ratio['median_s']:.2f}x, cpu {ratio['median_cpu_s']:.2f}x "
        f"(this {summary['this']['median_s'] * 1e3:.1f} ms, baseline "
        f"{summary['baseline']['median_s'] * 1e3:.1f} ms)"
    )
    return {"baseline_src": args.baseline, "summary": summary, "ratio": ratio, "runs": runs}


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        rank, world, port, variant, n, v, iters = sys.argv[2:9]
        res = worker(int(rank), int(world), int(port), variant, int(n), int(v), int(iters))
        print(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--baseline", default=None, help="src directory of the tree to compare")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    result = {
        "benchmark": "vocab-parallel KL, forward + backward, Gloo ranks on one CPU",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "world": args.world,
        "shape": {"N": args.n, "V": args.v},
        "dtype": "float32",
        "machine": {"platform": platform.platform(), "cores": len(os.sched_getaffinity(0))},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "commit": _commit(),
        "load_average_before": os.getloadavg(),
        "variants": {},
    }
    print(
        f"{'variant':<12}{'median ms':>10}{'fwd coll':>9}{'bwd coll':>9}{'KiB sent/rank':>15}"
        f"{'peak MiB':>10}  agrees"
    )
    for variant in args.variants.split(","):
        ranks = launch(variant, args.world, args.n, args.v, args.iters)
        r0 = ranks[0]
        sent = (r0["forward"]["bytes_in"] + r0["backward"]["bytes_in"]) / 1024
        summary = {
            "median_s": statistics.median(r0["times_s"]),
            "median_cpu_s": statistics.median(r0["cpu_s"]),
            "forward_collectives": r0["forward"]["collectives"],
            "backward_collectives": r0["backward"]["collectives"],
            "kib_sent_per_rank": sent,
            "peak_extra_mib": max(r["peak_extra_mib"] for r in ranks),
            "agrees_with_kldiv": all(r["agrees_with_kldiv"] for r in ranks),
        }
        result["variants"][variant] = {"summary": summary, "ranks": ranks}
        print(
            f"{variant:<12}{summary['median_s'] * 1e3:>10.1f}{summary['forward_collectives']:>9}"
            f"{summary['backward_collectives']:>9}{sent:>15.1f}{summary['peak_extra_mib']:>10.1f}"
            f"  {summary['agrees_with_kldiv']}"
        )
    if args.baseline:
        result["against_baseline"] = against(args)
    result["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"parallel_cpu_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
