"""`import kldiv` imports no framework; the public surface is what __all__ says."""

from __future__ import annotations

import subprocess
import sys

import kldiv


def test_import_kldiv_leaves_frameworks_unimported():
    code = (
        "import sys, kldiv, numpy as np\n"
        "kldiv.kl_div(np.array([0.5, 0.5]), np.array([0.25, 0.75]))\n"
        "heavy = [m for m in ('torch', 'jax', 'jaxlib', 'tensorflow', 'keras', 'triton') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import kldiv pulled in: {out.stdout.strip()}"


def test_public_surface():
    for name in kldiv.__all__:
        assert hasattr(kldiv, name), name
    assert set(kldiv.KINDS) == {
        "kl",
        "reverse_kl",
        "js",
        "skew_kl",
        "skew_reverse_kl",
        "symmetric_kl",
        "tv",
    }
    for func in kldiv.KINDS.values():
        doc = func.__doc__
        for needed in ("form", "reduction", "mask", "num_items", "temperature", "Returns", ">>>"):
            assert needed in doc, (func.__name__, needed)
