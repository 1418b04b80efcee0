"""kldiv.keras on all three Keras backends (TensorFlow, JAX, PyTorch), each in its own process
because Keras fixes its backend at import; plus construction errors in this process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("keras_backend_check.py")


@pytest.mark.spawns
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_losses_regularizer_and_fit_on_each_backend(backend, seed):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    # the test's own seed (conftest), so its replay command replays the subprocess too
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(seed)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"OK {backend}" in out.stdout


def test_tf_tensors_stay_tensorflow_whatever_the_keras_backend():
    # this process runs Keras on JAX (conftest): a TF tensor must not silently become JAX; it
    # is computed by TensorFlow itself (kldiv._namespace_tf), whatever Keras' backend
    import numpy as np
    import tensorflow as tf

    import kldiv

    p, q = np.array([[0.5, 0.5]]), np.array([[0.9, 0.1]])
    got = kldiv.kl_div(tf.constant(p), tf.constant(q))
    assert isinstance(got, tf.Tensor) and got.dtype == tf.float64
    np.testing.assert_allclose(got, kldiv.kl_div(p, q), rtol=1e-15)


def test_construction_errors():
    import kldiv.keras as kk

    with pytest.raises(ValueError, match="Unknown divergence 'kld'"):
        kk.Divergence("kld")
    with pytest.raises(ValueError, match="temperature"):
        kk.KLDivergence(temperature=2.0)  # probs form
    with pytest.raises(ValueError, match=r"`beta` to be in \[0, 1\]"):
        kk.JSDivergence(beta=2.0)
    with pytest.raises(TypeError, match="takes no keywords \\['beta'\\]"):
        kk.KLDivergence(beta=0.2)
    with pytest.raises(ValueError, match=r"`target` to be in \[0, 1\]"):
        kk.KLSparsityRegularizer(target=1.5)
    with pytest.raises(ValueError, match="`weight` to be a finite float >= 0"):
        kk.KLSparsityRegularizer(weight=-1.0)
