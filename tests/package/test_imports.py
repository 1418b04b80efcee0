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


def test_kldiv_torch_leaves_dynamo_unimported_and_compiles_on_a_first_call():
    """``import kldiv.torch`` and an eager step do not import ``torch._dynamo`` (about 2 s);
    the functions kept opaque to ``torch.compile`` are made so on their first call, and a
    first call under ``torch.compile`` gives the eager loss and gradients."""
    code = (
        "import sys, torch, kldiv, kldiv.torch\n"
        "from kldiv.torch import DistillationLoss, FusedLinearDistillationLoss\n"
        "g = torch.Generator().manual_seed(0)\n"
        "h, w, t = (torch.randn(*s, generator=g) for s in ((9, 8), (50, 8), (9, 50)))\n"
        "s = torch.randn(9, 50, generator=g, requires_grad=True)\n"
        "DistillationLoss('js')(s, t).backward()\n"
        "kldiv.kl_div(t, s, form='logits').backward()\n"
        "print('torch._dynamo' in sys.modules)\n"
        "loss = FusedLinearDistillationLoss('kl', chunk_size=4)\n"
        "f = torch.compile(lambda h_, w_: loss(h_, w_, t) * 2.0, backend='aot_eager')\n"
        "h2, w2, h1, w1 = (x.clone().requires_grad_() for x in (h, w, h, w))\n"
        "out = f(h2, w2)\n"
        "out.backward()\n"
        "ref = loss(h1, w1, t)\n"
        "ref.backward()\n"
        "torch.testing.assert_close(out, ref * 2.0)\n"
        "torch.testing.assert_close(h2.grad, h1.grad * 2.0)\n"
        "torch.testing.assert_close(w2.grad, w1.grad * 2.0)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "ok"], out.stdout
