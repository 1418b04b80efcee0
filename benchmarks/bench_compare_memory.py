"""Peak memory of ``kldiv compare`` on two large files, in every input format.

    python benchmarks/bench_compare_memory.py [--gb 2.0] [--v 32000] [--formats npy,pt,...]
                                              [--rounds 1] [--dir D] [--keep] [--kldiv-src S]
                                              [--note TEXT]

Two float32 ``[N, V]`` logit arrays of ``--gb`` GB each (``ref``, and ``cand`` = ``ref`` +
noise; N = gb·1e9 / (4·V)) are written once as ``.npy``, then copied in blocks into the other
formats: ``.npz`` with a stored member (``np.savez``), ``.npz`` with a deflated member
(``np.savez_compressed``), ``.safetensors`` and ``.pt`` (``torch.save``). The files are
written by a child process, so that this process stays small. Then, for each format, one child
runs exactly ``python -m kldiv compare REF CAND --json --quiet``, and its peak resident set is
read from ``os.wait4``'s ``ru_maxrss`` for that child (resident mapped file pages count, as
they do for the kernel). A child starts as a copy of this process, so its peak can be no lower
than this process's own resident set (recorded as ``parent_rss_mib``). The floor is a child
that imports what ``compare`` imports and reads nothing (``floor``; with PyTorch for ``.pt``).
The files are read from the page cache (they were just written). Every format's report must
agree with the ``.npy`` one. ``--kldiv-src`` runs another kldiv (e.g. an older checkout's
``src``) for a before/after comparison. Results go to
``benchmarks/results/compare_memory_<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from _common import commit, cpu_model

FORMATS = {  # name: file suffix
    "npy": ".npy",
    "npz": ".npz",
    "npz_deflated": "_deflated.npz",
    "safetensors": ".safetensors",
    "pt": ".pt",
}
BLOCK_ROWS = 256  # rows per block when writing: the writer's memory stays small too


def generate(d: Path, gb: float, v: int, formats: list[str]) -> int:
    """Write ref and cand in every format (skipping files that exist with the right size)."""
    import numpy as np

    n = int(gb * 1e9 / (4 * v))
    noise = np.random.default_rng(1)
    for stem in ("ref", "cand"):
        path = d / f"{stem}.npy"
        if path.exists() and np.load(path, mmap_mode="r").shape == (n, v):
            continue
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, v))
        gen = np.random.default_rng(0)  # the same ref logits for both files
        for i in range(0, n, BLOCK_ROWS):
            x = gen.normal(scale=3.0, size=(min(BLOCK_ROWS, n - i), v)).astype(np.float32)
            if stem == "cand":
                x += noise.normal(scale=0.3, size=x.shape).astype(np.float32)
            out[i : i + BLOCK_ROWS] = x
        out.flush()
        del out
    for stem in ("ref", "cand"):
        src = np.load(d / f"{stem}.npy", mmap_mode="r")
        for fmt in formats:
            path = d / f"{stem}{FORMATS[fmt]}"
            if fmt == "npy" or path.exists():
                continue
            tmp = path.with_name(path.name + ".part")
            if fmt in ("npz", "npz_deflated"):
                how = zipfile.ZIP_STORED if fmt == "npz" else zipfile.ZIP_DEFLATED
                with (
                    zipfile.ZipFile(tmp, "w", how) as z,
                    z.open("x.npy", "w", force_zip64=True) as f,
                ):
                    np.lib.format.write_array_header_2_0(
                        f, {"descr": "<f4", "fortran_order": False, "shape": (n, v)}
                    )
                    for i in range(0, n, BLOCK_ROWS):
                        f.write(np.ascontiguousarray(src[i : i + BLOCK_ROWS]).tobytes())
            elif fmt == "safetensors":
                header = {"x": {"dtype": "F32", "shape": [n, v], "data_offsets": [0, 4 * n * v]}}
                text = json.dumps(header).encode()
                text += b" " * (-len(text) % 8)
                with open(tmp, "wb") as f:
                    f.write(len(text).to_bytes(8, "little") + text)
                    for i in range(0, n, BLOCK_ROWS):
                        f.write(np.ascontiguousarray(src[i : i + BLOCK_ROWS]).tobytes())
            else:
                import torch

                torch.save(torch.from_numpy(np.array(src)), tmp)
            tmp.rename(path)
    return n


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str, str]:
    """(seconds, peak RSS MiB, stdout, stderr) of one child, its rusage read by wait4."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}): {stderr}")
    return seconds, usage.ru_maxrss / 1024, stdout, stderr  # ru_maxrss is in KiB on Linux


def versions() -> dict[str, str]:
    import numpy
    import safetensors
    import torch

    import kldiv

    return {
        "python": platform.python_version(),
        "kldiv": kldiv.__version__,
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gb", type=float, default=2.0, help="size of each file")
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--rounds", type=int, default=1, help="runs per format (median time)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kldiv-bench-mem")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--kldiv-src", type=Path, help="run the kldiv package found in this directory")
    ap.add_argument("--note", default="", help="what this run is, kept in the results")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)  # the child
    args = ap.parse_args()
    formats = args.formats.split(",")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        ap.error(f"unknown formats {unknown}; expected some of {', '.join(FORMATS)}")
    if args.generate:
        generate(args.dir, args.gb, args.v, formats)
        return 0

    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"writing 2 × {args.gb} GB in each of {', '.join(formats)} to {args.dir} ...", flush=True)
    t0 = time.perf_counter()
    gen = [sys.executable, __file__, "--generate", "--dir", str(args.dir), "--gb", str(args.gb)]
    subprocess.run([*gen, "--v", str(args.v), "--formats", args.formats], check=True)
    print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    n = int(args.gb * 1e9 / (4 * args.v))

    env = dict(os.environ)
    if args.kldiv_src is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(args.kldiv_src.resolve()), *filter(None, [env.get("PYTHONPATH")])]
        )
    imports = "import kldiv.cli, kldiv.metrics, kldiv.cli.readers, tqdm"
    floors = {
        "numpy": run([sys.executable, "-c", imports], env)[1],
        "torch": run([sys.executable, "-c", imports + ", torch"], env)[1],
    }
    results: dict[str, dict] = {}
    reports = {}
    for fmt in formats:
        ref, cand = (args.dir / f"{stem}{FORMATS[fmt]}" for stem in ("ref", "cand"))
        cmd = [sys.executable, "-m", "kldiv", "compare", str(ref), str(cand), "--json", "--quiet"]
        runs = []
        for _ in range(args.rounds):
            seconds, rss, out, _err = run(cmd, env)
            runs.append({"seconds": seconds, "peak_rss_mib": rss})
            reports[fmt] = json.loads(out)
        results[fmt] = {
            "command": shlex.join(cmd),
            "bytes_per_file": ref.stat().st_size,
            "runs": runs,
            "median_seconds": statistics.median(r["seconds"] for r in runs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "floor_rss_mib": floors["torch" if fmt == "pt" else "numpy"],
        }
        r = results[fmt]
        print(
            f"{fmt:<13} {r['bytes_per_file'] / 1e9:5.2f} GB/file {r['median_seconds']:6.1f} s  "
            f"peak RSS {r['peak_rss_mib']:7.1f} MiB (floor {r['floor_rss_mib']:.0f} MiB)",
            flush=True,
        )
    first = reports[formats[0]]
    agree = {
        fmt: all(
            abs(rep[k] - first[k]) <= 1e-12 * abs(first[k])
            for k in ("kl_mean", "kl_max", "top1_agreement")
        )
        and rep["num_tokens"] == first["num_tokens"]
        for fmt, rep in reports.items()
    }

    parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before imports
    result = {
        "benchmark": "peak resident memory of kldiv compare on two float32 [N, V] logit files "
        "per input format, page cache warm",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "kldiv_src": str(args.kldiv_src) if args.kldiv_src else "installed",
        "note": args.note,
        "shape": {"N": n, "V": args.v, "dtype": "float32"},
        "machine": {
            "cpu": cpu_model(),
            "cores_visible": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_average_at_end": os.getloadavg(),
        },
        "commit": commit(),
        "versions": versions(),
        "parent_rss_mib": parent_rss,
        "floor_rss_mib": floors,
        "formats": results,
        "reports_agree_with_" + formats[0]: agree,
        "kl_mean": {fmt: rep["kl_mean"] for fmt, rep in reports.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"compare_memory_{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"reports agree: {agree}")
    print(f"wrote {path}")
    if not args.keep:
        for fmt in formats:
            for stem in ("ref", "cand"):
                (args.dir / f"{stem}{FORMATS[fmt]}").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
