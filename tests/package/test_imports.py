"""`import kldiv` imports no framework; the public surface is what __all__ says."""

from __future__ import annotations

import subprocess
import sys

import kldiv


def test_import_kldiv_leaves_frameworks_unimported():
    code = (
        "import sys, kldiv, numpy as np\n"
        "kldiv.kl_div(np.array([0.5, 0.5]), np.array([0.25, 0.75]))\n"
        "import kldiv.distributions, kldiv.estimators\n"
        "kldiv.distributions.normal_kl(0.0, 1.0, 0.5, 2.0)\n"
        "kldiv.estimators.k3(np.zeros(2), np.ones(2))\n"
        "heavy = [m for m in ('torch', 'jax', 'jaxlib', 'tensorflow', 'keras', 'triton', "
        "'scipy') "
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
    from kldiv.divergences import _SHARED_DOC

    for func in kldiv.KINDS.values():
        own = func.__doc__.split(_SHARED_DOC.strip()[:40])[0]  # the function's own part
        assert "‖" in own or "|" in own, func.__name__  # states its formula
        assert ">>>" in own, func.__name__  # has a runnable example
        assert "gradient" in own.lower(), func.__name__  # says what happens to gradients
        assert _SHARED_DOC.strip()[:40] in func.__doc__  # and carries the shared keywords
