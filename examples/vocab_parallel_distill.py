"""Vocab-parallel distillation on CPU: the student's and teacher's LM heads are split by
vocabulary over the ranks, as tensor parallelism splits them, and each rank trains its own
slice of the student's head.

    torchrun --standalone --nproc_per_node 2 examples/vocab_parallel_distill.py

Every rank computes only its ``[N, V/world]`` slice of the logits; ``ParallelDistillationLoss``
turns the slices into the exact full-vocabulary KL(teacher‖student), with three small
collectives per step and none in backward. At the end, rank 0 gathers the slices and checks
the loss against ``DistillationLoss`` on the full logits.

On GPUs the same code runs with ``backend="nccl"`` and every tensor on
``torch.device("cuda", local_rank)``. The collectives are the same, and they move a few
floats per token rather than logits. In a real model the vocab group is the tensor-parallel
group, ``mpu.get_tensor_model_parallel_group()`` in Megatron, for instance. The data-parallel
group goes to ``data_group=`` so that means are taken over every token of every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kldiv.torch import DistillationLoss
from kldiv.torch.parallel import ParallelDistillationLoss

TOKENS, HIDDEN, VOCAB, STEPS = 64, 32, 1000, 30


def main() -> None:
    dist.init_process_group("gloo")  # torchrun's environment says who and where
    rank, world = dist.get_rank(), dist.get_world_size()
    # this rank's rows of both LM heads (the last rank takes the remainder: uneven is fine)
    per = VOCAB // world
    lo, hi = rank * per, VOCAB if rank == world - 1 else (rank + 1) * per

    g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    hidden = torch.randn(TOKENS, HIDDEN, generator=g)
    teacher_head = torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5
    student_head = torch.zeros(VOCAB, HIDDEN)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    labels[:8] = -100  # prompt tokens: skipped

    weight = torch.nn.Parameter(student_head[lo:hi].clone())  # this rank's slice only
    teacher_logits = hidden @ teacher_head[lo:hi].T
    loss_fn = ParallelDistillationLoss(
        "kl", temperature=2.0, vocab_group=dist.group.WORLD, vocab_size=VOCAB
    )
    opt = torch.optim.SGD([weight], lr=20.0)
    for step in range(STEPS):
        loss = loss_fn(hidden @ weight.T, teacher_logits, labels)
        opt.zero_grad()
        loss.backward()  # this rank's slice of the gradient; no communication
        opt.step()
        if rank == 0 and step % 10 == 0:
            print(f"step {step:2d}  KL(teacher‖student) = {loss.item():.4f}")

    # the check: gather the student's slices and compare with the single-process loss
    slices = [torch.empty(0)] * world
    dist.all_gather_object(slices, weight.detach())
    full = torch.cat(slices)
    ours = loss_fn(hidden @ weight.detach().T, teacher_logits, labels)
    if rank == 0:
        single = DistillationLoss("kl", temperature=2.0)(
            hidden @ full.T, hidden @ teacher_head.T, labels
        )
        print(f"final: vocab-parallel {ours.item():.6f}, single process {single.item():.6f}")
        torch.testing.assert_close(ours, single, rtol=1e-5, atol=1e-6)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
