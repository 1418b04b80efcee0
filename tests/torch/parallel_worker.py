"""One rank of the vocab-/data-parallel tests (tests/torch/test_parallel.py starts the ranks).

    python tests/torch/parallel_worker.py RANK WORLD PORT CASES.pt OUT_DIR

Joins a Gloo process group through the TCP store the test holds (its port picked free by
the OS), runs every case of CASES.pt on this rank's slice of the inputs, and saves the
losses, gradient slices, collective counts and error messages to OUT_DIR/rank<RANK>.pt.

A case's ``tweaks`` give what one rank gets wrong, ``{rank: {tweak: value}}``: a setting of
the loss (``"temperature": 2.0``), ``"replace"`` (``{argument: value}``, e.g. a None or a
list), ``"convert"`` (``{argument: one of CONVERT}``, applied to this rank's own value), and
the older shorthands ``rows``, ``dtype``, ``labels`` and ``num_items``.
"""

from __future__ import annotations

import sys
import traceback

import torch
import torch.distributed as dist

from kldiv.torch.parallel import ParallelDistillationLoss, ParallelFusedLinearDistillationLoss

# what a rank can do to one of its arguments (a tweak's "convert")
CONVERT = {
    "numpy": lambda x: x.detach().numpy(),
    "list": lambda x: x.tolist(),
    "float": lambda x: x.double(),
    "float32": lambda x: x.detach().float().requires_grad_(x.requires_grad),
    "meta": lambda x: x.detach().to("meta"),
    "detach": lambda x: x.detach(),
    "requires_grad": lambda x: x.detach().clone().requires_grad_(True),
    "widen": lambda x: torch.cat([x, torch.zeros_like(x[..., :1])], -1),  # one more unit
    "shorten": lambda x: x[:-1],  # one token fewer
}


def widths(v: int, parts: int) -> list[int]:
    """An uneven split of ``v`` columns (the first slices one wider)."""
    return [v // parts + (i < v % parts) for i in range(parts)]


def place(case: dict, rank: int, world: int) -> dict:
    """Which rows and columns of the full inputs ``rank`` holds, and the index of its vocab
    and data groups (None: no such group) under the case's layout."""
    n, v = case["student"].shape if "student" in case else case["logits_shape"]
    layout = case["layout"]
    tp = {"tp": world, "dp": 1, "mesh": 2}[layout]
    dp = world // tp
    vi, di = rank % tp, rank // tp
    cols = [0, *torch.tensor(case.get("widths", widths(v, tp))).cumsum(0).tolist()]
    rows = [0, *torch.tensor(case.get("row_split", widths(n, dp))).cumsum(0).tolist()]
    return {
        "rows": slice(rows[di], rows[di + 1]),
        "cols": slice(cols[vi], cols[vi + 1]),
        "vocab": None if tp == 1 else di,  # the vocab group of the ranks holding these rows
        "data": None if dp == 1 else vi,
    }


def groups(world: int) -> dict:
    """Every group the layouts use, created in the same order on every rank."""
    out = {("tp", None): dist.group.WORLD, ("dp", None): dist.group.WORLD}
    if world == 4:
        out[("vocab", 0)] = dist.new_group([0, 1])
        out[("vocab", 1)] = dist.new_group([2, 3])
        out[("data", 0)] = dist.new_group([0, 2])
        out[("data", 1)] = dist.new_group([1, 3])
    return out


def collectives(prof: torch.profiler.profile) -> int:
    return sum(1 for e in prof.events() if e.name.startswith("c10d::"))


def options(case: dict, tweaks: dict) -> dict:
    """The loss's settings: the case's, with this rank's tweaks to them."""
    opts = {
        "divergence": case["kind"],
        "temperature": case["temperature"],
        "beta": case.get("beta", 0.5),
        "alpha": case.get("alpha", 0.1),
        "reduction": case["reduction"],
        "ignore_index": -100,
        "scale_by_temperature_squared": False,
        "vocab_size": case.get("vocab_size"),
        "validate": case.get("validate", True),
        "shift_labels": case.get("shift_labels", False),
        "softcap": case.get("softcap"),
        "logit_scale": case.get("logit_scale"),
    }
    return {k: tweaks.get(k, v) for k, v in opts.items()}


def arguments(args: dict, tweaks: dict) -> dict:
    """The forward's keyword arguments, with this rank's replaced or converted ones."""
    args = {**args, **tweaks.get("replace", {})}
    for name, how in tweaks.get("convert", {}).items():
        args[name] = CONVERT[how](args[name])
    return args


def run_case(case: dict, rank: int, world: int, all_groups: dict) -> dict:
    where = place(case, rank, world)
    layout = case["layout"]
    if layout == "tp":
        vocab_group, data_group = all_groups[("tp", None)], None
    elif layout == "dp":
        vocab_group, data_group = None, all_groups[("dp", None)]
    else:
        vocab_group = all_groups[("vocab", where["vocab"])]
        data_group = all_groups[("data", where["data"])]
    tweaks = case.get("tweaks", {}).get(rank, {})
    if "hidden" in case:
        return run_fused_case(case, where, tweaks, vocab_group, data_group)
    s = case["student"][where["rows"], where["cols"]].clone().requires_grad_(True)
    t = case["teacher"][where["rows"], where["cols"]].clone()
    labels = case["labels"][where["rows"]]
    num_items = case.get("num_items")
    for tweak, value in tweaks.items():
        if tweak == "rows":
            s = s[:value].detach().requires_grad_(True)
            t, labels = t[:value], labels[:value]
        if tweak == "dtype":
            s = s.detach().to(value).requires_grad_(True)
            t = t.to(value)
        if tweak == "labels":
            labels = labels[:value]
        if tweak == "num_items":
            num_items = value
    loss_fn = ParallelDistillationLoss(
        vocab_group=vocab_group, data_group=data_group, **options(case, tweaks)
    )
    args = {"student_logits": s, "teacher_logits": t, "labels": labels, "num_items": num_items}
    if "mask" in case:
        args["mask"] = case["mask"][where["rows"]]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        try:
            loss = loss_fn(**arguments(args, tweaks))
        except ValueError as e:
            return {"error": str(e)}
    forward = collectives(prof)
    weights = case.get("upstream")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        if weights is not None:  # reduction "none": this rank's rows of the upstream weights
            (loss * weights[where["rows"]]).sum().backward()
        else:
            (loss * 3.7).backward()  # grad_output ≠ 1
    return {
        "loss": loss.detach(),
        "grad": s.grad,
        "forward_collectives": forward,
        "backward_collectives": collectives(prof),
    }


def run_fused_case(case: dict, where: dict, tweaks: dict, vocab_group, data_group) -> dict:
    """ParallelFusedLinearDistillationLoss: this rank's tokens of the hidden states and its
    vocabulary rows of both LM heads (or its slice of the teacher's logits)."""
    rows, cols = where["rows"], where["cols"]
    hidden = case["hidden"][rows].clone().requires_grad_(True)
    weight = case["weight"][cols].clone().requires_grad_(True)
    bias = case["bias"][cols].clone().requires_grad_(True)
    args = {
        "student_hidden": hidden,
        "student_weight": weight,
        "student_bias": bias,
        "labels": case["labels"][rows],
        "num_items": case.get("num_items"),
    }
    if "teacher_weight" in case:
        args["teacher_hidden"] = case["teacher_hidden"][rows]
        args["teacher_weight"] = case["teacher_weight"][cols]
    else:
        args["teacher_logits"] = case["teacher"][rows, cols]
    if "mask" in case:
        args["mask"] = case["mask"][rows]
    loss_fn = ParallelFusedLinearDistillationLoss(
        vocab_group=vocab_group, data_group=data_group, chunk_size=3, **options(case, tweaks)
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        try:
            loss = loss_fn(**arguments(args, tweaks))
        except ValueError as e:
            return {"error": str(e)}
    forward = collectives(prof)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        if case["reduction"] == "none":
            (loss * case["upstream"][rows]).sum().backward()
        else:
            (loss * 3.7).backward()
    return {
        "loss": loss.detach(),
        "grads": (hidden.grad, weight.grad, bias.grad),
        "forward_collectives": forward,
        "backward_collectives": collectives(prof),
    }


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    all_groups = groups(world)
    cases = torch.load(sys.argv[4])
    out = {}
    for case in cases:
        print(f"case {case['name']}", flush=True)  # where a hang happened, if one does
        try:
            out[case["name"]] = run_case(case, rank, world, all_groups)
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            out[case["name"]] = {"crash": traceback.format_exc()}
    torch.save(out, f"{sys.argv[5]}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
