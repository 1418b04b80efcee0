"""The numerically sensitive tests over many seeds: `make soak`, or

    .venv/bin/python tests/soak.py [--seeds 50] [--first S] [-n 2] [-k EXPR] [paths] [-- pytest args]

Runs every test marked `seeded` (conftest marks each test that uses the `rng` or `seed`
fixture, is a hypothesis test, or draws from torch's, NumPy's or Python's global generator)
once per base seed S, S + 1, ..., S + seeds - 1, all in one pytest process (or one per xdist
worker with -n), so JAX, PyTorch and TensorFlow are imported once, not once per seed. Each
run gets the seed conftest derives from its base seed and node id, exactly as a plain run with
`KLDIV_TEST_SEED=<base>` does, and hypothesis runs its "soak" profile (random examples, seeded
from the test's seed). The first base seed is drawn at random unless --first is given, and is
printed, so a whole soak can be repeated.

At the end every failure is listed as test id, seed and the command that replays it; the exit
status is 1 if any test failed.

Tests marked `spawns` (tests/torch/test_parallel.py's Gloo ranks, tests/keras/test_keras.py's
per-backend processes, a few seconds to half a minute each) get --spawn-seeds base seeds
(default 5) instead of --seeds.

Run time on 2 CPU cores (-n 2): 10 base seeds with 2 for `spawns` took 15 min (12,472 runs),
so the default 50 (5 for `spawns`) runs for roughly an hour; --seeds 10 --spawn-seeds 2 is a
quicker check.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pytest
from tqdm import tqdm

TESTS = Path(__file__).resolve().parent


class Progress:
    """A pytest plugin: a progress bar over the runs, and the failures with their seeds."""

    def __init__(self) -> None:
        self.bar = tqdm(total=0, unit="test", dynamic_ncols=True, smoothing=0.05)
        self.failures: list[tuple[str, dict, str, str]] = []

    def pytest_collection_finish(self, session) -> None:
        self._total(len(session.items))

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        self._total(len(ids))

    def _total(self, n: int) -> None:
        if n and not self.bar.total:
            self.bar.total = n
            self.bar.refresh()

    def pytest_collectreport(self, report) -> None:
        if report.failed:  # without the terminal plugin nothing else would show it
            tqdm.write(f"collection error in {report.nodeid}:\n{report.longreprtext}")

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)[-500:]
            props = dict(report.user_properties)
            self.failures.append((report.nodeid, props, message, report.longreprtext))
            tqdm.write(f"FAILED {report.nodeid} (seed {props.get('seed')})")
            self.bar.set_postfix(failed=len(self.failures))
        if report.when == "teardown":
            self.bar.update(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=50, help="base seeds per test")
    parser.add_argument("--first", type=int, default=None, help="first base seed (random)")
    parser.add_argument("--spawn-seeds", type=int, default=5, help="base seeds for `spawns`")
    parser.add_argument("-n", "--workers", default="2", help="pytest-xdist workers (0: none)")
    parser.add_argument("-k", default=None, help="only tests matching this pytest -k expression")
    parser.add_argument("--report", type=Path, help="write the failures' tracebacks here")
    parser.add_argument("paths", nargs="*", help="test files or node ids (default: tests/)")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]

    # never 0, conftest's default base seed: the plain suite already runs that one
    first = args.first if args.first is not None else 1 + int.from_bytes(os.urandom(3), "little")
    os.environ["HYPOTHESIS_PROFILE"] = "soak"  # read by conftest; inherited by xdist workers
    os.chdir(TESTS.parent)  # node ids and replay commands are relative to the repository
    spawn_seeds = min(args.spawn_seeds, args.seeds)
    pytest_args = [
        *(args.paths or [str(TESTS)]),
        "-m",
        "seeded",
        f"--kldiv-soak-seeds={args.seeds}",
        f"--kldiv-soak-first={first}",
        f"--kldiv-soak-spawn-seeds={spawn_seeds}",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:terminal",  # the bar instead of dots
        "-o",
        "addopts=--strict-markers",  # pyproject's -ra is the terminal plugin's
        *(["-n", args.workers] if args.workers not in ("0", "") else []),
        *(["-k", args.k] if args.k else []),
        *extra,
    ]
    print(
        f"soak: base seeds {first}..{first + args.seeds - 1} ({spawn_seeds} for `spawns` tests)"
        f", {args.workers} workers; repeat with --first {first}",
        flush=True,
    )
    progress = Progress()
    start = time.monotonic()
    code = pytest.main(pytest_args, plugins=[progress])
    progress.bar.close()
    minutes = (time.monotonic() - start) / 60
    runs = progress.bar.n

    if progress.failures:
        print(f"\n{len(progress.failures)} of {runs} runs failed in {minutes:.1f} min:")
        for nodeid, props, message, _ in progress.failures:
            lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
            print(f"\n{nodeid}\n  seed {props.get('seed')}: {' | '.join(lines)[:300]}")
            print(f"  replay: {props.get('replay', '(no seed recorded)')}")
        if args.report:
            args.report.write_text(
                "\n\n".join(
                    f"{nodeid}\n{props.get('replay')}\n{text}"
                    for nodeid, props, _, text in progress.failures
                )
            )
            print(f"\ntracebacks: {args.report}")
        return 1
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        print(f"\npytest stopped with exit code {int(code)} after {runs} runs")
        return int(code) or 1
    print(f"\nall {runs} runs passed in {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
