"""``kldiv compare`` on large logit files: throughput against merely reading them, peak memory,
and its statistics against a float64 in-memory computation.

    python benchmarks/bench_compare.py [--gb 2.0] [--v 32000] [--rounds 3] [--cold] [--dir D]

Two float32 ``.npy`` files of ``--gb`` GB each (``ref`` logits and ``cand`` = ``ref`` + noise,
N = gb·1e9 / (4·V) tokens) are generated once. Then, alternating over ``--rounds`` rounds,
each in a fresh subprocess: ``read`` reads both files sequentially in 32 MiB ``readinto``
calls and does nothing else (the floor), and ``compare`` runs ``kldiv compare REF CAND --json``.
By default both read from the page cache (the files were just written or read; the machine
has the RAM), so the ratio is compute against memory bandwidth, the strictest form of the
comparison. ``--cold`` drops the page cache before every run (needs root: writes
/proc/sys/vm/drop_caches), so both read from the disk, which is how a 2 GB file is usually met.
Peak memory is each child's own peak resident set (``VmHWM``), which counts mapped file
pages too. Finally the report's statistics are checked against per-token KL
computed in float64 from the whole arrays in memory. Results go to
``benchmarks/results/compare_cpu_<UTC timestamp>.json``.
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
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import commit, cpu_model

# Each child reports its own peak resident set as VmHWM, which belongs to the process's
# address space after exec: ru_maxrss would also count what the parent had resident at fork.
HWM = r"""
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("HWM_KIB " + line.split()[1] + "\n")
"""

READ_CHILD = (
    "import sys\n"
    + HWM
    + r"""
buf = bytearray(32 << 20)
view = memoryview(buf)
total = 0
for path in sys.argv[1:]:
    with open(path, "rb", buffering=0) as f:
        while (n := f.readinto(view)):
            total += n
print(total)
_hwm()
"""
)

COMPARE_CHILD = (
    "import sys\n"
    + HWM
    + r"""
from kldiv.cli import main
code = main(["compare", *sys.argv[1:]])
_hwm()
sys.exit(code)
"""
)


def generate(dirname: Path, gb: float, v: int) -> tuple[Path, Path, int]:
    n = int(gb * 1e9 / (4 * v))
    ref, cand = dirname / "ref.npy", dirname / "cand.npy"
    if ref.exists() and cand.exists():
        shape = np.load(ref, mmap_mode="r").shape
        if shape == (n, v):
            return ref, cand, n
    rng = np.random.default_rng(0)
    a = np.lib.format.open_memmap(ref, mode="w+", dtype=np.float32, shape=(n, v))
    b = np.lib.format.open_memmap(cand, mode="w+", dtype=np.float32, shape=(n, v))
    step = 256
    for i in range(0, n, step):
        x = rng.normal(scale=3.0, size=(min(step, n - i), v)).astype(np.float32)
        a[i : i + step] = x
        b[i : i + step] = x + rng.normal(scale=0.3, size=x.shape).astype(np.float32)
    a.flush()
    b.flush()
    del a, b
    return ref, cand, n


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, stdout) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr}")
    hwm = [ln for ln in proc.stderr.splitlines() if ln.startswith("HWM_KIB ")]
    return seconds, int(hwm[-1].split()[1]) / 1024, proc.stdout


def float64_reference(ref: Path, cand: Path, v: int) -> np.ndarray:
    a = np.load(ref, mmap_mode="r")
    b = np.load(cand, mmap_mode="r")
    out = []
    for i in range(0, a.shape[0], 512):
        x = np.asarray(a[i : i + 512], dtype=np.float64)
        y = np.asarray(b[i : i + 512], dtype=np.float64)
        lx = x - x.max(-1, keepdims=True)
        lx -= np.log(np.exp(lx).sum(-1, keepdims=True))
        ly = y - y.max(-1, keepdims=True)
        ly -= np.log(np.exp(ly).sum(-1, keepdims=True))
        out.append((np.exp(lx) * (lx - ly)).sum(-1))
    return np.maximum(np.concatenate(out), 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gb", type=float, default=2.0, help="size of each file")
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kldiv-bench-compare")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"generating 2 × {args.gb} GB in {args.dir} ...", flush=True)
    ref, cand, n = generate(args.dir, args.gb, args.v)
    cmds = {
        "read": [sys.executable, "-c", READ_CHILD, str(ref), str(cand)],
        "compare": [sys.executable, "-c", COMPARE_CHILD, str(ref), str(cand), "--json", "--quiet"],
    }
    timed(cmds["read"])  # warm the page cache for both variants alike
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    report = None
    for r in range(args.rounds):
        for name in cmds if r % 2 == 0 else list(cmds)[::-1]:
            if args.cold:
                os.sync()
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            seconds, rss, out = timed(cmds[name])
            runs[name].append((seconds, rss))
            if name == "compare":
                report = json.loads(out)
            print(f"round {r + 1}: {name:<8} {seconds:7.2f} s  peak RSS {rss:7.1f} MiB", flush=True)

    kl = float64_reference(ref, cand, args.v)
    checks = {
        "num_tokens": (report["num_tokens"], kl.size),
        "kl_mean": (report["kl_mean"], float(kl.mean())),
        "kl_max": (report["kl_max"], float(kl.max())),
        "kl_p50": (report["kl_percentiles"]["50"], float(np.percentile(kl, 50))),
        "kl_p99.9": (report["kl_percentiles"]["99.9"], float(np.percentile(kl, 99.9))),
    }
    rel = {k: abs(a - b) / abs(b) if b else abs(a - b) for k, (a, b) in checks.items()}
    med = {k: statistics.median(s for s, _ in v) for k, v in runs.items()}
    total_bytes = ref.stat().st_size + cand.stat().st_size
    import numpy
    import torch

    import kldiv

    result = {
        "benchmark": "kldiv compare on two float32 .npy logit files, CPU, page cache "
        + ("dropped before each run (disk reads)" if args.cold else "warm"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "shape": {"N": n, "V": args.v, "dtype": "float32", "bytes_both_files": total_bytes},
        "machine": {
            "cpu": cpu_model(),
            "cores_visible": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        },
        "commit": commit(),
        "versions": {
            "python": platform.python_version(),
            "kldiv": kldiv.__version__,
            "numpy": numpy.__version__,
            "torch": torch.__version__,
        },
        "runs": {k: [{"seconds": s, "peak_rss_mib": m} for s, m in v] for k, v in runs.items()},
        "median_seconds": med,
        "throughput_mb_s": {k: total_bytes / s / 1e6 for k, s in med.items()},
        "ratio_compare_over_read": med["compare"] / med["read"],
        "peak_rss_mib_compare": max(m for _, m in runs["compare"]),
        "relative_error_vs_float64_in_memory": rel,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"compare_cpu_{'cold' if args.cold else 'warm'}_{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "median_seconds",
                    "throughput_mb_s",
                    "ratio_compare_over_read",
                    "peak_rss_mib_compare",
                    "relative_error_vs_float64_in_memory",
                )
            },
            indent=2,
        )
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
