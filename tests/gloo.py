"""Launching Gloo ranks for the tests that run torch.distributed for real: each rank is
``python SCRIPT RANK WORLD PORT CASES OUT`` and writes ``OUT/rank{RANK}.pt``."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist


def launch(
    script: Path | str, world: int, tmp: Path, cases: Any, timeout: float, trusted: bool = False
) -> list[Any]:
    """Every rank's results of every case, from one launch of ``world`` Gloo ranks running
    ``script``; fails the test if they do not finish within ``timeout`` seconds (a hang, not
    a slow run), naming each rank's last ``case ...`` line. ``trusted``: the results hold
    more than tensors (``torch.load(weights_only=False)``)."""
    # the ranks read their data from cases.pt: the test's rng alone decides it
    torch.save(cases, tmp / "cases.pt")
    # the OS picks the port; the ranks join this store, so nothing is hard-coded
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    argv = [str(world), str(store.port), str(tmp / "cases.pt"), str(tmp)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        last = [
            (
                [ln for ln in p.stdout.read().splitlines() if ln.startswith("case ")]
                or ["before the first case"]
            )[-1]
            for p in procs
            if p.stdout is not None
        ]
        pytest.fail(f"the ranks hung (killed after {timeout} s); last lines: {last}")
    for r, p in enumerate(procs):
        out = "" if p.stdout is None else p.stdout.read()[-3000:]
        assert p.returncode == 0, f"rank {r} failed:\n{out}"
    return [torch.load(tmp / f"rank{r}.pt", weights_only=not trusted) for r in range(world)]
