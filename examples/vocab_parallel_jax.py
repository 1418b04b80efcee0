"""Vocab-parallel distillation in JAX: the student's and teacher's LM heads are split by
vocabulary over the ``"vocab"`` axis of a device mesh and the tokens over its ``"data"``
axis, and ``jax.shard_map`` trains each device's slice of the student's head.

    python examples/vocab_parallel_jax.py

On a CPU this forces 4 host devices (a 2 × 2 mesh) through ``XLA_FLAGS``, unless the
variable is already set. On GPUs or TPUs the same code runs on the accelerators.

Every device computes only its ``[tokens / 2, V / 2]`` block of both logits;
``kldiv.jax.vocab_parallel_divergence`` turns the blocks into the exact KL(teacher‖student)
over the full vocabulary and the mean over every kept token of every device. That takes one
all-gather and one psum of a few numbers per token over ``"vocab"`` and one psum of two
numbers over ``"data"``, and no collective in the backward pass. The vocabulary (1001 words)
does not split evenly: the heads get padding columns whose bias is ``-inf``, so that those
words have probability 0 for both models, add nothing and get no gradient. At the end the
loss is checked against ``kldiv.kl_div`` on the full logits.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import kldiv  # noqa: E402
from kldiv.jax import pad_vocab, vocab_parallel_divergence  # noqa: E402

TOKENS, HIDDEN, VOCAB, STEPS, TEMPERATURE = 64, 32, 1001, 30, 2.0


def main() -> None:
    devices = np.array(jax.devices())
    data = 2 if devices.size % 2 == 0 else 1
    mesh = Mesh(devices.reshape(data, devices.size // data), ("data", "vocab"))

    k_hidden, k_head = jax.random.split(jax.random.key(0))
    hidden = jax.random.normal(k_hidden, (TOKENS, HIDDEN))
    teacher_head = jax.random.normal(k_head, (HIDDEN, VOCAB)) / HIDDEN**0.5
    keep = jnp.arange(TOKENS) >= 8  # prompt tokens: skipped
    # pad the vocabulary to a multiple of the "vocab" axis: -inf logits for the padding
    vocab = mesh.shape["vocab"]
    bias = pad_vocab(jnp.zeros(VOCAB), vocab)
    teacher_head = pad_vocab(teacher_head, vocab, value=0.0)
    student_head = jnp.zeros_like(teacher_head)

    def local_loss(student_w, teacher_w, bias, hidden, keep):
        # this device's tokens and vocabulary columns only
        student = hidden @ student_w + bias
        teacher = hidden @ teacher_w + bias
        return vocab_parallel_divergence(
            teacher,
            student,
            "kl",
            vocab_axis_name="vocab",
            data_axis_name="data",
            mask=keep,
            temperature=TEMPERATURE,
        )

    loss_fn = jax.shard_map(
        local_loss,
        mesh=mesh,
        in_specs=(P(None, "vocab"), P(None, "vocab"), P("vocab"), P("data", None), P("data")),
        out_specs=P(),
    )

    @jax.jit
    def step(w, lr=200.0):
        loss, grad = jax.value_and_grad(loss_fn)(w, teacher_head, bias, hidden, keep)
        return loss, w - lr * grad

    w = student_head
    for i in range(STEPS):
        loss, w = step(w)
        if i % 10 == 0:
            print(f"step {i:2d}  KL(teacher‖student) = {float(loss):.4f}")

    # the check: the same loss from the full logits on one device
    ours = jax.jit(loss_fn)(w, teacher_head, bias, hidden, keep)
    single = kldiv.kl_div(
        hidden @ teacher_head[:, :VOCAB],
        hidden @ w[:, :VOCAB],
        form="logits",
        mask=keep,
        temperature=TEMPERATURE,
    )
    print(f"final: vocab-parallel {float(ours):.6f}, single device {float(single):.6f}")
    np.testing.assert_allclose(float(ours), float(single), rtol=1e-5)
    assert float(ours) < 0.5 * float(step(student_head)[0])  # it learned


if __name__ == "__main__":
    main()
