"""What every benchmark records beside its numbers: the machine and the commit measured."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def commit() -> str:
    """``git describe --always --dirty``: a dirty tree is marked as such."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True
        )
    except OSError:  # no git (e.g. on a device machine that got the tree without it)
        return "unknown"
    return out.stdout.strip() or "unknown"
