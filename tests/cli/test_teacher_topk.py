"""``kldiv teacher-topk``: logits files and tiny random Hugging Face models through the real
command (subprocesses), read back with ``kldiv.topk.load``; the loss and student gradient
against a TopKTeacher built in memory from the same logits; bounded memory on a logits file
far larger than the command's blocks and shards; errors, and no output left by a failed run.

Tolerances follow from the bounds of tests/topk_reference.py: a stored log-prob is off from
the exact one by at most ``ε`` (float32 computation, then the stored dtype's rounding), and the
per-token divergence and its gradient move by the ``bound`` of that module. A TopKTeacher built
in memory (``TopKTeacher.from_logits``: float32 log-probs, tail ``1 − Σp``) has its own ``ε``:
the float32 term, plus ``K·2⁻²⁴ / p_tail`` for its tail, whose absolute error is that of a sum
of K float32 probabilities; two teachers are within the sum of their bounds.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr

import blocked
import numpy as np
import pytest
from cli_runs import ENV, kldiv_cmd, run

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
safetensors = pytest.importorskip("safetensors")
import torch  # noqa: E402
from topk_reference import bound, eps_of, logsumexp64, reference_topk  # noqa: E402

import kldiv.topk as kt  # noqa: E402
from kldiv import cli  # noqa: E402
from kldiv.torch import DistillationLoss, TopKTeacher  # noqa: E402


def rows_and_grad(kind, s, teacher):
    s = s.detach().clone().requires_grad_(True)
    rows = DistillationLoss(kind, reduction="none")(s, teacher)
    rows.sum().backward()
    return rows.detach().numpy(), s.grad.numpy()


@pytest.mark.spawns
def test_logits_file_round_trip_gives_the_in_memory_loss_and_gradient(tmp_path, rng):
    k, v = 8, 64
    z = (2.0 * rng.standard_normal((3, 20, v))).astype(np.float32)
    np.save(tmp_path / "logits.npy", z)
    done = kldiv_cmd(
        "teacher-topk", "--logits", str(tmp_path / "logits.npy"), "--k", str(k), "--dtype",
        "float16", "--shard-tokens", "16", "--out", str(tmp_path / "t"), "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {tmp_path / 't'}: 60 tokens (token shape (3, 20))")
    m = kt.read_manifest(tmp_path / "t")
    assert (m["k"], m["vocab_size"], m["dtype"], m["token_shape"]) == (k, v, "float16", [3, 20])
    assert m["teacher"]["source"] == "logits" and m["teacher"]["logits"].endswith("logits.npy")
    assert len(m["shards"]) == 4

    flat = z.reshape(-1, v)
    ids, top, tail = reference_topk(flat, k)
    eps_stored = eps_of(flat, "float16", top)
    eps_memory = eps_of(flat, "float32", top) + k * 2.0**-24 / np.exp(tail)
    s = torch.tensor(rng.standard_normal((60, v)))
    for policy, kinds in (("tail_bucket", ("kl", "reverse_kl")), ("renormalize", ("kl",))):
        stored = kt.load(tmp_path / "t", tail=policy, check=True)
        memory = TopKTeacher.from_logits(torch.from_numpy(flat), k, tail=policy, check=True)
        assert torch.equal(stored.indices.long(), memory.indices)
        for kind in kinds:
            got, grad = rows_and_grad(kind, s, stored)
            want, want_grad = rows_and_grad(kind, s, memory)
            tol = bound(kind, eps_stored, s, ids, top, tail, policy) + bound(
                kind, eps_memory, s, ids, top, tail, policy
            )
            assert (np.abs(got - want) <= tol).all(), (policy, kind)
            diff = np.abs(grad - want_grad).sum(-1)
            assert (diff <= 4.04 * (eps_stored + eps_memory)).all(), (policy, kind)
    # a range across shard boundaries is the same rows as the whole
    part = kt.load(tmp_path / "t", 10, 40, tail="tail_bucket")
    whole = kt.load(tmp_path / "t", tail="tail_bucket")
    assert torch.equal(part.log_probs, whole.log_probs[10:40])


# --- Hugging Face model ----------------------------------------------------------------------

VOCAB, CTX = 120, 16


def make_model_dir(tmp_path, rng):
    """A tiny random Llama and a BPE tokenizer trained here on a made-up text (nothing
    downloaded), saved to one directory; and the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo"]
    words = ["".join(rng.choice(syll, size=rng.integers(1, 4))) for _ in range(40)]
    text = " ".join(rng.choice(words, size=200)) + "\n"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(int(rng.integers(2**31)))
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=CTX,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # spread logits: confident rows, small tails
    d = tmp_path / "model"
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    (tmp_path / "text.txt").write_text(text)
    return d, model, tokenizer, text


@pytest.mark.spawns
def test_model_through_the_cli(tmp_path, rng):
    d, model, tokenizer, text = make_model_dir(tmp_path, rng)
    k = 6
    done = kldiv_cmd(
        "teacher-topk", "--model", str(d), "--text", str(tmp_path / "text.txt"), "--ctx",
        str(CTX), "--k", str(k), "--batch-size", "2", "--shard-tokens", "20", "--model-dtype",
        "float32", "--out", str(tmp_path / "t"), "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # the whole text at once, BOS first (the text less its trailing newline), whole windows
    ids = np.asarray(tokenizer(text[:-1])["input_ids"])
    assert ids[0] == tokenizer.bos_token_id
    n_win = len(ids) // CTX
    windows = ids[: n_win * CTX].reshape(n_win, CTX)
    m = kt.read_manifest(tmp_path / "t")
    assert m["token_shape"] == [n_win, CTX] and m["input_ids"] is True
    assert m["vocab_size"] == model.config.vocab_size and m["k"] == k
    teacher = m["teacher"]
    assert teacher["source"] == "model" and teacher["model"] == str(d.resolve())
    assert (teacher["ctx"], teacher["bos_token_id"]) == (CTX, tokenizer.bos_token_id)
    assert teacher["dropped_tokens"] == len(ids) - n_win * CTX
    stored_ids = kt.load_input_ids(tmp_path / "t").numpy()
    np.testing.assert_array_equal(stored_ids, windows.reshape(-1))

    with torch.inference_mode():
        logits = torch.cat(
            [model(torch.from_numpy(windows[i : i + 2])).logits for i in range(0, n_win, 2)]
        ).reshape(-1, m["vocab_size"])
    z = logits.double().numpy()
    ref_ids, top, tail = reference_topk(z, k)
    lp = z - logsumexp64(z)[:, None]
    t = kt.load(tmp_path / "t", tail="tail_bucket", check=True)
    got_ids = t.indices.long().numpy()
    # the same model in two processes: float32 logits equal up to a few ulp, so within ε plus
    # 2⁻¹⁶ (as in test_hf_models); ids may swap only between values that close
    tol = eps_of(z, "float32", top) + 2.0**-16
    stored = t.log_probs.double().numpy()
    assert (np.abs(stored - np.take_along_axis(lp, got_ids, -1)) <= tol[:, None]).all()
    assert (np.abs(stored - top) <= tol[:, None]).all()  # the k largest, in order
    assert (np.abs(t.tail_log_prob.double().numpy() - tail) <= tol).all()
    assert (got_ids == ref_ids).mean() > 0.99


# --- memory ------------------------------------------------------------------------------------

# Peak resident memory of the command itself: VmHWM (Linux) after main() less VmHWM after the
# imports it needs, in a fresh interpreter.
MEASURE = """
import json, sys
def hwm():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:"))
import torch, safetensors.torch, tqdm.auto
import kldiv.cli, kldiv.cli.readers, kldiv.cli.topk, kldiv.topk
torch.logsumexp(torch.zeros(4, 4), -1).topk(2)
base = hwm()
code = kldiv.cli.main(sys.argv[1:])
print(json.dumps({"code": code, "base": base, "peak": hwm()}))
"""


@pytest.mark.spawns
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_stays_bounded_on_a_file_larger_than_blocks_and_shards(tmp_path, rng):
    """A 256 MiB float32 logits file (65,536 tokens × V = 1,024) through 4 MiB blocks and
    shards of 4,096 tokens: the command's peak grows by less than 64 MiB, a quarter of the
    file (reading it whole would need all 256 MiB, and its float32 copies as much again).
    Measured: ~26 MiB (a block, the writer's two float32 copies of it, one shard's buffer)."""
    n, v, k = 65536, 1024, 16
    path = tmp_path / "big.npy"
    a = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, v))
    for i in range(0, n, 8192):
        a[i : i + 8192] = 3.0 * rng.standard_normal((8192, v), dtype=np.float32)
    a.flush()
    del a
    assert path.stat().st_size > 256 << 20
    out = tmp_path / "t"
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, "teacher-topk", "--logits", str(path), "--k", str(k),
         "--shard-tokens", "4096", "--out", str(out), "--quiet"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.splitlines()[-1])
    assert r["code"] == 0
    grew = r["peak"] - r["base"]
    assert grew < 64 << 20, f"peak grew by {grew / 2**20:.1f} MiB"
    m = kt.read_manifest(out)
    assert m["num_tokens"] == n and len(m["shards"]) == n // 4096
    # and what it wrote is right, e.g. on a range across a shard boundary
    rows = np.load(path, mmap_mode="r")[4090:4100]
    ids, top, tail = reference_topk(rows, k)
    t = kt.load(out, 4090, 4100, tail="tail_bucket")
    np.testing.assert_array_equal(t.indices.numpy(), ids)
    assert (
        np.abs(t.log_probs.double().numpy() - top) <= eps_of(rows, "float32", top)[:, None]
    ).all()


# --- errors ------------------------------------------------------------------------------------


def test_errors_are_one_line_and_leave_nothing(tmp_path, rng):
    z = rng.standard_normal((40, 12)).astype(np.float32)
    np.save(tmp_path / "ok.npy", z)
    bad = z.copy()
    bad[33, 4] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    np.save(tmp_path / "int.npy", np.zeros((4, 12), np.int32))
    (tmp_path / "exists").mkdir()
    (tmp_path / "text.txt").write_text("ka lo mi\n")
    out = str(tmp_path / "out")
    ok = str(tmp_path / "ok.npy")
    cases = [
        (["--logits", ok, "--k", "13", "--out", out], "--k 13: .*ok.npy holds only 12 logits"),
        (["--logits", ok, "--k", "0", "--out", out], "--k 0: expected a positive number"),
        (["--logits", ok, "--k", "2", "--out", str(tmp_path / "exists")], "already exists"),
        (["--logits", ok, "--k", "2", "--out", out, "--temperature", "0"], "--temperature 0"),
        (["--logits", ok, "--k", "2", "--out", out, "--ctx", "4"], "--ctx goes with --model"),
        (["--logits", ok, "--k", "2", "--out", out, "--axis", "2"], "--axis 2 is out of range"),
        (["--logits", str(tmp_path / "no.npy"), "--k", "2", "--out", out], "no.npy: no such file"),
        (["--logits", str(tmp_path / "int.npy"), "--k", "2", "--out", out], "holds int32 values"),
        (
            [
                "--logits",
                str(tmp_path / "nan.npy"),
                "--k",
                "2",
                "--out",
                out,
                "--shard-tokens",
                "8",
            ],
            r"nan.npy: .*got a NaN logit in token 33\.",
        ),
        (
            ["--model", str(tmp_path / "none"), "--k", "2", "--out", out],
            "needs --text FILE and --ctx",
        ),
        (
            [
                "--model",
                str(tmp_path / "none"),
                "--text",
                str(tmp_path / "text.txt"),
                "--ctx",
                "4",
                "--k",
                "2",
                "--out",
                out,
            ],
            "none: no such directory",
        ),
    ]
    for argv, match in cases:
        code, stdout, err = run(["teacher-topk", *argv])
        assert code == 2 and stdout == "", argv
        assert err.startswith("kldiv teacher-topk: error: ") and err.count("\n") == 1, err
        assert re.search(match, err), (match, err)
    # the NaN run wrote four shards before failing: all gone, no hidden directory either
    assert sorted(os.listdir(tmp_path)) == ["exists", "int.npy", "nan.npy", "ok.npy", "text.txt"]
    with pytest.raises(SystemExit) as e, redirect_stderr(io.StringIO()) as err:
        cli.main(["teacher-topk", "--k", "2", "--out", out])
    assert (
        e.value.code == 2 and "one of the arguments --model --logits is required" in err.getvalue()
    )


def test_empty_big_endian_and_longdouble_files_and_a_tiny_temperature(tmp_path, rng):
    z = rng.standard_normal((6, 9))
    files = {
        "empty": np.zeros((0, 40), np.float32),
        "empty2": np.zeros((2, 0, 40), np.float32),
        "big": z.astype(">f4"),
        "ld": z.astype(np.longdouble),
        "f64": z,
    }
    for name, a in files.items():
        np.save(tmp_path / f"{name}.npy", a)
        code, stdout, err = run(
            ["teacher-topk", "--logits", str(tmp_path / f"{name}.npy"), "--k", "3", "--quiet",
             "--out", str(tmp_path / f"o-{name}")]
        )  # fmt: skip
        assert code == 0 and stdout.startswith("wrote ") and err == "", (name, err)
    for name, shape in (("empty", [0]), ("empty2", [2, 0])):
        m = kt.read_manifest(tmp_path / f"o-{name}")
        assert (m["num_tokens"], m["token_shape"], m["vocab_size"]) == (0, shape, 40)
    want = kt.load(kt.save(tmp_path / "mem", z.astype(np.float32), 3), tail="tail_bucket")
    got = kt.load(tmp_path / "o-big", tail="tail_bucket")
    assert torch.equal(got.indices, want.indices) and torch.equal(got.log_probs, want.log_probs)
    want = kt.load(tmp_path / "o-f64", tail="tail_bucket")
    got = kt.load(tmp_path / "o-ld", tail="tail_bucket")
    assert torch.equal(got.indices, want.indices) and torch.equal(got.log_probs, want.log_probs)
    # logits / 1e-45 would overflow: (z − max z) / T does not, the teacher is one-hot
    argv = ["--logits", str(tmp_path / "big.npy"), "--k", "2", "--quiet"]
    code, _, err = run(
        ["teacher-topk", *argv, "--temperature", "1e-45", "--out", str(tmp_path / "c")]
    )
    assert code == 0 and err == ""
    assert (kt.load(tmp_path / "c", tail="tail_bucket").log_probs[:, 0] == 0).all()


def test_a_failed_shard_write_is_one_line_and_leaves_nothing(tmp_path, rng, monkeypatch):
    import safetensors.torch

    def fail(tensors, filename, metadata=None):
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: File too large (os error 27)"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    np.save(tmp_path / "z.npy", rng.standard_normal((20, 7)).astype(np.float32))
    for shard in ("8", "100"):  # a full shard while streaming, the last one at close
        argv = ["--logits", str(tmp_path / "z.npy"), "--k", "2", "--shard-tokens", shard]
        code, stdout, err = run(["teacher-topk", *argv, "--quiet", "--out", str(tmp_path / "o")])
        assert code == 2 and stdout == "" and err.count("\n") == 1, err
        assert err.startswith("kldiv teacher-topk: error: ") and "File too large" in err
        assert f"{tmp_path / 'o'}: cannot write the shards (File too large)" in err
        assert sorted(os.listdir(tmp_path)) == ["z.npy"]


@pytest.mark.spawns
def test_a_file_size_limit_is_one_line_and_leaves_nothing(tmp_path, rng):
    np.save(tmp_path / "z.npy", rng.standard_normal((2000, 50)).astype(np.float32))
    argv = ["teacher-topk", "--logits", "z.npy", "--k", "20", "--out", "o", "--quiet"]
    # the limit is set by a small Python that then becomes the command (exec), not by a
    # preexec_fn: forking this process, which has JAX's threads, is what JAX warns against
    limited = (
        "import os, resource, sys; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100 << 10, 100 << 10)); "
        "os.execv(sys.executable, [sys.executable, '-m', 'kldiv', *sys.argv[1:]])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", limited, *argv, "--shard-tokens", "1000"],
        cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert "o: cannot write the shards (File too large)" in proc.stderr, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["z.npy"]


@pytest.mark.spawns
def test_without_safetensors_the_command_names_the_extra(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 4), np.float32))
    script = blocked.PRELUDE + "raise SystemExit(main(sys.argv[2:]))\n"
    argv = ["teacher-topk", "--logits", "a.npy", "--k", "2", "--out", "t"]
    proc = subprocess.run(
        [sys.executable, "-c", script, "safetensors", *argv],
        cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("kldiv teacher-topk: error: ") and proc.stderr.count("\n") == 1
    assert "needs PyTorch, safetensors; missing here: safetensors" in proc.stderr
    assert proc.stderr.rstrip().endswith('pip install "kldiv[torch,cli]"')
    assert sorted(os.listdir(tmp_path)) == ["a.npy"]
