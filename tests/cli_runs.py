"""Running kldiv's command line from the Hugging Face tests: in this process (:func:`run`,
output captured) or as ``python -m kldiv`` in a subprocess (:func:`kldiv_cmd`), offline and
on one thread (:data:`ENV`)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TRANSFORMERS_OFFLINE="1")


def run(argv):
    """``(exit code, stdout, stderr)`` of ``kldiv.cli.main(argv)`` in this process."""
    from kldiv import cli

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def kldiv_cmd(*argv):
    """``python -m kldiv ARGV`` in a subprocess, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "kldiv", *argv], capture_output=True, text=True, env=ENV, timeout=300
    )
