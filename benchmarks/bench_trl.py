"""Peak memory of one TRL distillation step, TRL's loss against kldiv's, on CPU.

    python benchmarks/bench_trl.py [--v 32000] [--batch 4] [--prompt 16] [--completion 512]
                                   [--hidden 64] [--beta 0.5] [--threads N] [--note TEXT]

One ``compute_loss`` + ``backward`` step of each trainer on the same inputs, at a shape where
the ``[B, L, V]`` logits dominate: a tiny Llama body (1 layer, ``--hidden`` wide) for student
and teacher, V = ``--v``, ``--batch`` sequences of ``--prompt`` prompt tokens (ignored) and
``--completion`` completion tokens (B × completion = 2048 loss tokens by default), float32:

* ``gkd_trl``: ``trl.experimental.gkd.GKDTrainer`` (student and teacher ``[B, L, V]`` logits,
  log-softmax, mixture and elementwise KL terms, all materialised);
* ``gkd_kldiv``: ``KLDivGKDTrainer`` (default: fused loss from hidden states and heads);
* ``gkd_kldiv_logits``: ``KLDivGKDTrainer(fused_linear=False)`` (the models' logits, kldiv's
  chunked ``DistillationLoss``);
* ``distillation_trl``: ``trl.DistillationTrainer`` (TRL's own chunked kernel; on CPU its
  torch fallback with ``[min(N, 4096), 32768]`` float32 tiles);
* ``distillation_kldiv``: ``KLDivDistillationTrainer`` (fused loss).

Each variant runs in its own child process (one warm-up step, then one timed step); its peak
resident set is read from ``os.wait4``'s ``ru_maxrss``. ``floor`` children build the same
trainer and inputs and stop before the step: ``peak − floor`` is the step's own memory.
(tracemalloc does not see PyTorch's allocations, and PyTorch keeps no CPU allocator
statistics.) The children's losses are recorded too: the TRL and kldiv losses of a trainer
agree (to float32 rounding). Results go to ``benchmarks/results/trl_cpu_<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import commit, cpu_model

HERE = Path(__file__).resolve().parent
VARIANTS = ["gkd_trl", "gkd_kldiv", "gkd_kldiv_logits", "distillation_trl", "distillation_kldiv"]


def build(variant: str, a: argparse.Namespace, out_dir: str):
    """The trainer and one batch of inputs for ``variant`` (in the child)."""
    import datasets
    import tokenizers
    import torch
    import transformers

    def model(seed: int):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(
            vocab_size=a.v,
            hidden_size=a.hidden,
            intermediate_size=2 * a.hidden,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=a.prompt + a.completion + 8,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
            tie_word_embeddings=False,
            initializer_range=0.2,
        )
        return transformers.LlamaForCausalLM(config)

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 100)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left",
    )  # fmt: skip
    common = dict(
        output_dir=out_dir, report_to="none", use_cpu=True, bf16=False, beta=a.beta,
        per_device_train_batch_size=a.batch, save_strategy="no",
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    if variant.startswith("gkd"):
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        from kldiv.integrations.trl import KLDivGKDTrainer

        cls, kw = {
            "gkd_trl": (GKDTrainer, {}),
            "gkd_kldiv": (KLDivGKDTrainer, {}),
            "gkd_kldiv_logits": (KLDivGKDTrainer, {"fused_linear": False}),
        }[variant]
        trainer = cls(
            model=model(0), teacher_model=model(1), args=GKDConfig(**common, lmbda=0.0),
            processing_class=tokenizer, data_collator=lambda x: x,
            train_dataset=datasets.Dataset.from_dict({"input_ids": [[3]]}), **kw,
        )  # fmt: skip
        # L = prompt + completion + 1 tokens: after the causal shift, B × completion loss tokens
        ids = torch.randint(3, a.v, (a.batch, a.prompt + a.completion + 1), generator=g)
        labels = ids.clone()
        labels[:, : a.prompt + 1] = -100
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    else:
        from trl import DistillationConfig, DistillationTrainer

        from kldiv.integrations.trl import KLDivDistillationTrainer

        cls = DistillationTrainer if variant == "distillation_trl" else KLDivDistillationTrainer
        trainer = cls(
            model=model(0), teacher_model=model(1),
            args=DistillationConfig(**common, temperature=1.0), processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_dict({"prompt": ["w3"]}),
        )  # fmt: skip
        prompt = torch.randint(3, a.v, (a.batch, a.prompt), generator=g)
        completion = torch.randint(3, a.v, (a.batch, a.completion), generator=g)
        inputs = {
            "prompt_ids": prompt,
            "prompt_mask": torch.ones_like(prompt),
            "completion_ids": completion,
            "completion_mask": torch.ones_like(completion),
        }
    return trainer, inputs


def child(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        trainer, inputs = build(a.variant, a, d)
        result = {"variant": a.variant, "floor": a.floor}
        if not a.floor:
            times = []
            for _ in range(2):  # warm-up, then the timed step
                trainer.model.zero_grad(set_to_none=True)
                t = time.perf_counter()
                loss = trainer.compute_loss(trainer.model, dict(inputs))
                loss.backward()
                times.append(time.perf_counter() - t)
            result.update(loss=loss.item(), step_s=times[-1])
    print(json.dumps(result))


def run_child(a: argparse.Namespace, variant: str, floor: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, *child_args(a)]
    if floor:
        cmd.append("--floor")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if status != 0:
        raise RuntimeError(f"{variant} failed:\n{stderr[-3000:]}")
    out = json.loads(stdout.strip().splitlines()[-1])
    out["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # KiB on Linux
    return out


def child_args(a: argparse.Namespace) -> list[str]:
    return [
        f"--v={a.v}", f"--batch={a.batch}", f"--prompt={a.prompt}",
        f"--completion={a.completion}", f"--hidden={a.hidden}", f"--beta={a.beta}",
        f"--threads={a.threads}",
    ]  # fmt: skip


def versions() -> dict:
    import torch
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--completion", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--note", default="")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        a.variant = a.child
        child(a)
        return

    rows = []
    for variant in a.variants.split(","):
        floor = run_child(a, variant, floor=True)
        step = run_child(a, variant, floor=False)
        row = {
            "variant": variant,
            "peak_rss_mib": step["peak_rss_mib"],
            "floor_rss_mib": floor["peak_rss_mib"],
            "step_mib": round(step["peak_rss_mib"] - floor["peak_rss_mib"], 1),
            "step_s": round(step["step_s"], 3),
            "loss": step["loss"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r["variant"]: r for r in rows}
    ratios = {}
    for trl_v, ours in (
        ("gkd_trl", "gkd_kldiv"),
        ("gkd_trl", "gkd_kldiv_logits"),
        ("distillation_trl", "distillation_kldiv"),
    ):
        if trl_v in by and ours in by and by[ours]["step_mib"] > 0:
            ratios[f"{trl_v}/{ours}"] = round(by[trl_v]["step_mib"] / by[ours]["step_mib"], 2)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    record = {
        "benchmark": "trl_cpu",
        "utc": stamp,
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "commit": commit(),
        "shape": {
            "V": a.v,
            "batch": a.batch,
            "prompt": a.prompt,
            "completion": a.completion,
            "loss_tokens": a.batch * a.completion,
            "hidden": a.hidden,
            "layers": 1,
            "dtype": "float32",
            "beta": a.beta,
            "threads": a.threads,
        },  # fmt: skip
        "results": rows,
        "step_memory_ratio_trl_over_kldiv": ratios,
        "note": a.note,
    }
    out = HERE / "results" / f"trl_cpu_{stamp}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
