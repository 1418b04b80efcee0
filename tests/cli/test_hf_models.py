"""``kldiv llama-base`` and ``kldiv compare BASE.kld --model DIR`` on tiny random Llama models
with a BPE tokenizer trained here (nothing downloaded), through subprocesses and main().

Bounds used below, for a row of the base file with ``scale`` (≤ 16/65535) and the model's exact
log-probabilities ``ℓ`` (float64 log-softmax of its float32 logits):

- every stored value within the 16-nat window is ``ℓ_v`` to within ``Δ = scale/2 + ε``:
  ``scale/2`` from rounding to the grid, and ``ε = 2⁻¹⁶`` for llama.cpp's float32 steps of the
  quantizer (a few roundings of values below 32 in magnitude, 2⁻¹⁹ each) and for the float32
  logits of the same model computed in two processes (equal here up to a few ulp);
- the stored row, renormalised (``p'``), against the same model's distribution ``q``: with
  ``m`` the mass of ``q`` on the entries stored below the window (``-inf`` when decoded with
  ``keep_labels=False``) and
  ``q_K`` = ``q`` renormalised on the rest, ``log(p'/q_K)`` lies in ``[−2Δ, 2Δ]``, so
  ``KL(p'‖q) = KL(p'‖q_K) − log(1 − m) ≤ χ²(p'‖q_K) − log(1 − m) ≤ (e^{2Δ} − 1)² − log(1 − m)``;
- ``kldiv compare`` keeps a label stored below the window at the floor (so that perplexities
  stay finite): then ``p' = (1 − β)·p'' + β·δ_label`` with ``p''`` the row above and
  ``β ≤ e^{floor + Δ}/(1 − m)``, and by convexity of the KL the bound gains
  ``β·(−log q_label)``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import blocked
import numpy as np
import pytest
from cli_runs import kldiv_cmd, run

# at collection, as every import that may draw from the global generators
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
import torch  # noqa: E402

import kldiv  # noqa: E402
from kldiv import cli  # noqa: E402
from kldiv.llamacpp import read_base, write_base  # noqa: E402
from kldiv.metrics import TokenStats  # noqa: E402

CTX = 32
VOCAB = 320
EPS = 2.0**-16


def make_text(rng, words=420):
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "an", "el", "or"]
    vocab = ["".join(rng.choice(syll, size=rng.integers(1, 4))) for _ in range(80)]
    p = 1.0 / np.arange(1, len(vocab) + 1)
    out = rng.choice(vocab, size=words, p=p / p.sum())
    return "\n".join(" ".join(out[i : i + 12]) + "." for i in range(0, words, 12)) + "\n"


def make_tokenizer(text, add_bos=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    assert tok.get_vocab_size() == VOCAB
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_model(scale=25.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2 * CTX,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # logits spread over more than 16 nats: rows overflow the base file's window
        model.lm_head.weight.mul_(scale)
    return model


def save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def logits_of(model, windows):
    """float32 logits at the scored positions, one window per forward (as the command)."""
    first = CTX // 2
    with torch.inference_mode():
        return np.stack(
            [
                model(torch.from_numpy(w[None]).long()).logits[0, first : CTX - 1].float().numpy()
                for w in windows
            ]
        )


def log_softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def same_model_bound(base, exact):
    """Per token, the bound of the module's docstring on KL(stored row‖model) for the model
    that wrote the file (``exact``: its float64 log-probabilities on the scored positions)."""
    out = []
    for c in range(base.n_chunk):
        rows, r = base.records(c), np.arange(base.n_scored)
        delta = np.asarray(rows.scale, dtype=np.float64) / 2 + EPS
        dropped = ~np.isfinite(base.log_probs(c, keep_labels=False))
        m = np.where(dropped, np.exp(exact[c]), 0.0).sum(-1)
        label = base.labels[c]
        beta = np.exp(np.asarray(rows.min_log_prob, dtype=np.float64) + delta) / (1 - m)
        extra = np.where(dropped[r, label], beta * -exact[c][r, label], 0.0)
        out.append(np.expm1(2 * delta) ** 2 - np.log1p(-m) + extra)
    return np.concatenate(out)


@pytest.fixture
def models(tmp_path, rng):
    """A reference model, a perturbed copy (each with the tokenizer), and a text."""
    torch.manual_seed(int(rng.integers(2**31)))
    text = make_text(rng)
    (tmp_path / "text.txt").write_text(text)
    tokenizer = make_tokenizer(text)
    ref = make_model()
    cand = make_model()
    cand.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p in cand.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return {
        "text": text,
        "tokenizer": tokenizer,
        "ref": ref,
        "cand": cand,
        "ref_dir": save(ref, tokenizer, tmp_path / "ref"),
        "cand_dir": save(cand, tokenizer, tmp_path / "cand"),
        "tmp": tmp_path,
    }


@pytest.mark.spawns
def test_llama_base_and_compare_model_through_subprocesses(models):
    d, tokenizer, ref = models["tmp"], models["tokenizer"], models["ref"]
    base_path = d / "base.kld"
    made = kldiv_cmd(
        "llama-base", "--model", str(models["ref_dir"]), "--text", str(d / "text.txt"),
        "--ctx", str(CTX), "--out", str(base_path), "--dtype", "float32",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert f"wrote {base_path}" in made.stdout and "llama-perplexity" in made.stdout

    # llama-perplexity's tokenization: the text less its last newline, BOS first, whole windows
    ids = np.asarray(tokenizer(models["text"][:-1])["input_ids"])
    bos = tokenizer.bos_token_id
    assert ids[0] == bos
    n_chunk = len(ids) // CTX
    assert n_chunk >= 2
    with read_base(base_path) as base:
        assert (base.n_ctx, base.n_vocab, base.n_chunk) == (CTX, VOCAB, n_chunk)
        np.testing.assert_array_equal(base.tokens, ids[: n_chunk * CTX].reshape(n_chunk, CTX))
        windows = base.windows(bos)
        logits = logits_of(ref, windows)
        exact = log_softmax64(logits)
        dropped_mass = []
        for c in range(n_chunk):
            rows = base.records(c)
            # keep_labels=False: a label below the window would keep the floor, an upper bound
            stored = base.log_probs(c, keep_labels=False)
            delta = np.asarray(rows.scale, dtype=np.float64)[:, None] / 2 + EPS
            kept = np.isfinite(stored)
            err = np.abs(stored - exact[c])
            assert (err <= delta)[kept].all(), float((err - delta)[kept].max())
            # dropped entries lie at or below the window's floor (16 nats under the top)
            floor = np.asarray(rows.min_log_prob, dtype=np.float64)[:, None]
            assert (exact[c] <= floor + delta)[~kept].all()
            dropped_mass.append(np.where(kept, 0.0, np.exp(exact[c])).sum(-1))
        bound = same_model_bound(base, exact)
        assert np.concatenate(dropped_mass).max() > 0  # the window was exercised
        # the same model against its own base file: only the quantization is left
        same = json.loads(
            run(["compare", str(base_path), "--model", str(models["ref_dir"]), "--json",
                 "--quiet", "--dtype", "float32"])[1]
        )  # fmt: skip
        assert same["num_tokens"] == n_chunk * base.n_scored
        assert 0 <= same["kl_mean"] <= bound.mean() and same["kl_max"] <= bound.max()
        # the top token agrees unless the stored row ties it with another (within scale/2)
        ties = sum(
            int(np.count_nonzero(q == q.max(-1, keepdims=True), axis=-1).max() > 1)
            for q in (np.asarray(base.records(c).q) for c in range(n_chunk))
        )
        assert same["top1_agreement"] >= 1 - ties / same["num_tokens"]

        # a perturbed model: the KL that kldiv.kl_div gives against the stored values
        cand_logits = logits_of(models["cand"], windows)
        want = np.concatenate(
            [
                kldiv.kl_div(base.log_probs(c), cand_logits[c], form="logits", reduction="none")
                for c in range(n_chunk)
            ]
        )
    done = kldiv_cmd(
        "compare", str(base_path), "--model", str(models["cand_dir"]), "--json", "--quiet",
        "--parity",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    # the candidate's float32 logits in two processes differ by a few ulp (|logit| < 2^6):
    # the KL, E_p[log p − log q], moves by at most twice the largest difference
    tol = 2 * 64 * 2.0**-23 * float(np.abs(cand_logits).max())
    assert doc["kl_mean"] > 1e-3
    assert abs(doc["kl_mean"] - want.mean()) <= tol
    assert abs(doc["kl_max"] - want.max()) <= tol
    assert doc["llama_cpp"]["kld_mean"][0] == pytest.approx(want.mean(), rel=0.05)


def test_compare_model_equals_the_file_path(models):
    """--model gives the report that CAND gives with the model's logits saved to a file."""
    d = models["tmp"]
    assert run(["llama-base", "--model", str(models["ref_dir"]), "--text", str(d / "text.txt"),
                "--ctx", str(CTX), "--out", str(d / "b.kld"), "--quiet"])[0] == 0  # fmt: skip
    with read_base(d / "b.kld") as base:
        np.save(d / "cand.npy", logits_of(models["cand"], base.windows(0)))
    code, out, err = run(["compare", str(d / "b.kld"), "--model", str(models["cand_dir"]),
                          "--json", "--quiet", "--batch", "2"])  # fmt: skip
    assert code == 0, err
    code2, out2, _ = run(["compare", str(d / "b.kld"), str(d / "cand.npy"), "--json", "--quiet"])
    a, b = json.loads(out), json.loads(out2)
    assert a.keys() == b.keys()
    # batched and unbatched float32 forward passes agree to a few ulp of the logits
    tol = 2 * 64 * 2.0**-23 * float(np.abs(np.load(d / "cand.npy")).max())
    assert a["num_tokens"] == b["num_tokens"] and abs(a["kl_mean"] - b["kl_mean"]) <= tol
    text = run(["compare", str(d / "b.kld"), "--model", str(models["cand_dir"]), "--quiet"])[1]
    assert f"cand: {models['cand_dir']} (transformers, float32, cpu)" in text


def test_llama_base_options(models):
    """--chunks, --batch, bfloat16, and a tokenizer that adds no BOS (windows kept as they are)."""
    d = models["tmp"]
    base_args = ["llama-base", "--text", str(d / "text.txt"), "--ctx", str(CTX), "--quiet"]
    code, _, err = run([*base_args, "--model", str(models["ref_dir"]), "--out",
                        str(d / "two.kld"), "--chunks", "2", "--batch", "2"])  # fmt: skip
    assert code == 0, err
    code, _, err = run([*base_args, "--model", str(models["ref_dir"]), "--out",
                        str(d / "one.kld")])  # fmt: skip
    assert code == 0, err
    with read_base(d / "two.kld") as two, read_base(d / "one.kld") as one:
        assert two.n_chunk == 2 and one.n_chunk > 2
        np.testing.assert_array_equal(two.tokens, one.tokens[:2])
        for c in range(2):  # batched: the same up to a grid step and float32 noise
            a, b = two.log_probs(c, below_window="floor"), one.log_probs(c, below_window="floor")
            steps = np.asarray(one.records(c).scale, dtype=np.float64)[:, None]
            assert (np.abs(a - b) <= steps + 2 * EPS).all()

    bf = d / "bf16.kld"
    code, _, err = run([*base_args, "--model", str(models["ref_dir"]), "--out", str(bf),
                        "--dtype", "bfloat16", "--chunks", "1"])  # fmt: skip
    assert code == 0, err
    with read_base(bf) as base:
        got = logits_of(copy.deepcopy(models["ref"]).to(torch.bfloat16), base.windows(0))[0]
        lp = base.log_probs(0, keep_labels=False)
        kept = np.isfinite(lp)
        # bfloat16 logits computed by two matrix products of different shapes may round to
        # neighbouring bfloat16 values: one step, 2^-8 of |logit|, on each side of a difference
        delta = np.asarray(base.records(0).scale, dtype=np.float64)[:, None] / 2 + EPS
        delta = delta + 2 * 2.0**-8 * np.abs(got).max()
        assert (np.abs(lp - log_softmax64(got)) <= delta)[kept].all()

    no_bos = make_tokenizer(models["text"], add_bos=False)
    save(models["ref"], no_bos, d / "nobos")
    code, _, err = run([*base_args, "--model", str(d / "nobos"), "--out", str(d / "nb.kld"),
                        "--chunks", "2"])  # fmt: skip
    assert code == 0, err
    ids = np.asarray(no_bos(models["text"][:-1])["input_ids"])
    with read_base(d / "nb.kld") as base:
        assert base.tokens[0, 0] != 0
        np.testing.assert_array_equal(base.tokens, ids[: 2 * CTX].reshape(2, CTX))
        exact = log_softmax64(logits_of(models["ref"], base.windows(None)))
        for c in range(2):
            lp, rows = base.log_probs(c, keep_labels=False), base.records(c)
            kept = np.isfinite(lp)
            delta = np.asarray(rows.scale, dtype=np.float64)[:, None] / 2 + EPS
            assert (np.abs(lp - exact[c]) <= delta)[kept].all()


def test_compare_model_scores_a_file_with_its_bos(models):
    """A base file from elsewhere: the windows get the tokenizer's BOS; a file whose first token
    is not that BOS gets a warning (another tokenizer, or a model without BOS)."""
    d, ref = models["tmp"], models["ref"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, VOCAB, size=(2, CTX))
    tokens[0, 0] = 0
    windows = tokens.copy()
    windows[:, 0] = 0
    write_base(d / "x.kld", tokens, logits_of(ref, windows))
    code, out, err = run(["compare", str(d / "x.kld"), "--model", str(models["ref_dir"]),
                          "--json", "--quiet"])  # fmt: skip
    assert code == 0 and "warning" not in err, err
    with read_base(d / "x.kld") as base:
        bound = same_model_bound(base, log_softmax64(logits_of(ref, windows)))
    assert json.loads(out)["kl_max"] <= bound.max()
    tokens[0, 0] = 5
    write_base(d / "y.kld", tokens, logits_of(ref, windows))
    code, out, err = run(["compare", str(d / "y.kld"), "--model", str(models["ref_dir"]),
                          "--json", "--quiet"])  # fmt: skip
    assert code == 0 and "tokenizer adds BOS 0" in err and "starts with token 5" in err
    assert json.loads(out)["kl_max"] <= bound.max()  # evaluated with BOS first all the same


def test_errors_are_one_line(models):
    d = models["tmp"]
    m = str(models["ref_dir"])
    v50 = np.ones((1, CTX), dtype=np.int64)
    v50[0, 0] = 0  # the tokenizer's BOS
    write_base(d / "v50.kld", v50, np.zeros((1, CTX, 50)))
    ok = d / "ok.kld"
    assert run(["llama-base", "--model", m, "--text", str(d / "text.txt"), "--ctx", str(CTX),
                "--out", str(ok), "--quiet", "--chunks", "1"])[0] == 0  # fmt: skip
    (d / "short.txt").write_text("ka lo\n")
    (d / "bad.txt").write_bytes(b"\xff\xfe")
    (d / "empty.kld").write_bytes(b"")
    base = ["llama-base", "--model", m, "--text", str(d / "text.txt"), "--quiet"]
    cases = [
        (["compare", str(ok), "--quiet"], "compare", "expected exactly one candidate"),
        (["compare", str(ok), str(ok), "--model", m], "compare", "expected exactly one"),
        (["compare", str(d / "text.txt"), "--model", m], "compare", "--model needs a llama.cpp"),
        (["compare", str(ok), "--model", str(d / "nope")], "compare", "nope: no such directory"),
        (["compare", str(ok), "--model", str(d / "text.txt")], "compare",
         "text.txt: is not a directory"),
        (["compare", str(d / "missing.kld"), "--model", m], "compare", "missing.kld: no such file"),
        (["compare", str(d / "empty.kld"), "--model", m], "compare", "empty.kld: is empty"),
        (["compare", str(d), "--model", m], "compare", "is a directory"),
        (["compare", str(ok), "--model", str(d)], "compare", "cannot load a tokenizer"),
        (["compare", str(ok), "--model", m, "--form", "probs"], "compare", "gives logits"),
        (["compare", str(ok), "--model", m, "--batch", "0"], "compare", "--batch 0"),
        (["compare", str(ok), "--model", m, "--device", "tpu"], "compare", "--device tpu"),
        (["compare", str(d / "v50.kld"), "--model", m, "--quiet"], "compare",
         "the model gives 320 logits per position, ", "stores 50"),
        ([*base, "--ctx", "2", "--out", str(d / "a.kld")], "llama-base", "--ctx 2"),
        ([*base, "--ctx", str(CTX), "--out", str(ok)], "llama-base", "already exists"),
        ([*base, "--ctx", "4096", "--out", str(d / "a.kld")], "llama-base",
         "--ctx 4096 gives windows of 4096 tokens, beyond the model's 64 positions",
         "max_position_embeddings"),
        (["llama-base", "--model", m, "--text", str(d / "short.txt"), "--ctx", "8",
          "--out", str(d / "a.kld")], "llama-base", "needs at least 2·n_ctx = 16 tokens"),
        (["llama-base", "--model", m, "--text", str(d / "bad.txt"), "--ctx", "8",
          "--out", str(d / "a.kld")], "llama-base", "bad.txt: is not UTF-8"),
        (["llama-base", "--model", m, "--text", str(d / "short.txt"), "--ctx", "8",
          "--out", str(d / "no" / "a.kld")], "llama-base", "not a writable directory"),
    ]  # fmt: skip
    before = sorted(p.name for p in d.iterdir())
    for argv, command, *needles in cases:
        code, out, err = run(argv)
        lines = err.strip().splitlines()
        assert code == 2 and out == "", (argv, out, err)
        assert len(lines) == 1 and lines[0].startswith(f"kldiv {command}: error: "), (argv, err)
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
    assert sorted(p.name for p in d.iterdir()) == before  # nothing written, nothing left


# kldiv where the named packages cannot be imported (tests/blocked.py), once per command line
# of the JSON list, each command's stderr ended by a marker line.
WITHOUT = (
    blocked.PRELUDE
    + """
import json

for argv in json.loads(sys.argv[2]):
    code = main(argv)
    print(f"@@ {code}", file=sys.stderr, flush=True)
"""
)


@pytest.mark.spawns
def test_without_transformers_names_the_extra(tmp_path):
    write_base(tmp_path / "b.kld", np.ones((1, 8), dtype=np.int64), np.zeros((1, 8, 5)))
    (tmp_path / "t.txt").write_text("text\n")
    commands = [
        ["compare", "b.kld", "--model", "m"],
        ["llama-base", "--model", "m", "--text", "t.txt", "--ctx", "8", "--out", "o.kld"],
    ]
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT, "transformers", json.dumps(commands)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    runs, lines = [], []
    for line in proc.stderr.splitlines():
        if line.startswith("@@ "):
            runs.append((int(line[3:]), lines))
            lines = []
        else:
            lines.append(line)
    assert len(runs) == len(commands), proc.stderr
    for argv, (code, lines) in zip(commands, runs, strict=True):
        assert code == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"kldiv {argv[0]}: error: ") and "transformers" in lines[0]
        assert 'pip install "kldiv[hf]"' in lines[0]
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["b.kld", "t.txt"]


def test_stats_path_is_shared(models):
    """compare --model and TokenStats over the same rows: one statistics path."""
    d = models["tmp"]
    assert run(["llama-base", "--model", str(models["ref_dir"]), "--text", str(d / "text.txt"),
                "--ctx", str(CTX), "--out", str(d / "s.kld"), "--quiet", "--chunks", "2"])[0] == 0  # fmt: skip
    stats = TokenStats()
    with read_base(d / "s.kld") as base:
        cand = logits_of(models["cand"], base.windows(0))
        for c in range(base.n_chunk):
            stats.update(base.log_probs(c), cand[c], labels=base.labels[c])
    doc = json.loads(run(["compare", str(d / "s.kld"), "--model", str(models["cand_dir"]),
                          "--json", "--quiet"])[1])  # fmt: skip
    want = stats.report().to_dict()
    tol = 2 * 64 * 2.0**-23 * float(np.abs(cand).max())
    assert doc["num_tokens"] == want["num_tokens"]
    for key in ("kl_mean", "kl_max", "ppl_cand", "ppl_ref"):
        assert doc[key] == pytest.approx(want[key], abs=tol * max(1.0, abs(want[key])))


def test_special_token_text_is_plain_text(models):
    """llama-perplexity tokenizes with parse_special=false: "<s>" and "</s>" in the text are
    characters, not the BOS and EOS tokens; BOS comes first, added as llama.cpp adds it."""
    d, tokenizer = models["tmp"], models["tokenizer"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    words = models["text"].split(" ")
    words[3] += " <s>"
    words[40] += " </s> <s>"
    text = " ".join(words)
    assert "<s>" in text and "</s>" in text
    (d / "special.txt").write_text(text)
    code, _, err = run(["llama-base", "--model", str(models["ref_dir"]), "--text",
                        str(d / "special.txt"), "--ctx", str(CTX), "--out", str(d / "sp.kld"),
                        "--quiet"])  # fmt: skip
    assert code == 0, err
    with read_base(d / "sp.kld") as base:
        flat = np.asarray(base.tokens).reshape(-1)
    assert flat[0] == bos
    assert not np.isin(flat[1:], [bos, eos]).any()
    # the byte-level tokens spell the text back, special-token text included
    decoded = tokenizer.decode(flat[1:].tolist(), skip_special_tokens=False)
    assert text[:-1].startswith(decoded) and "</s> <s>" in decoded
    # parsing the special tokens would have put BOS and EOS ids in the text
    assert np.isin(tokenizer(text)["input_ids"][1:], [bos, eos]).any()


def test_llama_base_needs_two_windows_of_tokens(models):
    """llama-perplexity refuses fewer than 2·n_ctx tokens; from 2·n_ctx on it cuts windows."""
    d, tokenizer = models["tmp"], models["tokenizer"]
    lines = models["text"].splitlines()
    text = "\n".join(lines[:4]) + "\n"
    n = len(tokenizer(text[:-1])["input_ids"])  # BOS included, as the command counts
    assert 8 <= n <= 2 * CTX
    (d / "few.txt").write_text(text)
    argv = ["llama-base", "--model", str(models["ref_dir"]), "--text", str(d / "few.txt"),
            "--quiet", "--out"]  # fmt: skip
    # n_ctx <= tokens < 2·n_ctx: one window would fit, llama-perplexity still refuses
    ctx = n // 2 + 1
    code, out, err = run([*argv, str(d / "a.kld"), "--ctx", str(ctx)])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert f"{n} tokens; llama-perplexity needs at least 2·n_ctx = {2 * ctx} tokens" in err
    assert not (d / "a.kld").exists()
    ctx = n // 2
    code, _, err = run([*argv, str(d / "b.kld"), "--ctx", str(ctx)])
    assert code == 0, err
    with read_base(d / "b.kld") as base:
        assert (base.n_chunk, base.n_ctx) == (n // ctx, ctx)


def test_long_out_name(models):
    """A file name of 255 bytes, the most a file system takes: the temporary names stay short."""
    d = models["tmp"]
    dest = d / ("x" * 251 + ".kld")
    code, out, err = run(["llama-base", "--model", str(models["ref_dir"]), "--text",
                          str(d / "text.txt"), "--ctx", str(CTX), "--out", str(dest), "--quiet",
                          "--chunks", "1"])  # fmt: skip
    assert code == 0, err
    assert f"wrote {dest}" in out
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []
    with read_base(dest) as base:
        assert base.n_chunk == 1


class Evaluated(Exception):
    """Raised by a patched forward pass: a check that should come first did not."""


def _bos_tokenizer(text, bos_id_offset):
    """The test tokenizer with a BOS added past its vocabulary (id VOCAB + offset)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = copy.deepcopy(make_tokenizer(text, add_bos=False).backend_tokenizer)
    for i in range(bos_id_offset + 1):
        tok.add_special_tokens([f"<bos{i}>"])
    name = f"<bos{bos_id_offset}>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{name} $A", special_tokens=[(name, tok.token_to_id(name))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=name, eos_token="</s>")


def test_vocabulary_and_positions_checked_before_evaluating(models, monkeypatch):
    d, m = models["tmp"], str(models["ref_dir"])
    big_bos = _bos_tokenizer(models["text"], 0)
    assert big_bos.bos_token_id == VOCAB and big_bos("a")["input_ids"][0] == VOCAB
    save(models["ref"], big_bos, d / "bigbos")
    tokens = np.full((1, CTX), 5, dtype=np.int64)
    write_base(d / "v320.kld", tokens, np.zeros((1, CTX, VOCAB)))
    write_base(d / "v50.kld", tokens, np.zeros((1, CTX, 50)))
    long = np.full((1, 2 * CTX + 2), 5, dtype=np.int64)
    write_base(d / "long.kld", long, np.zeros((1, 2 * CTX + 2, VOCAB)))

    def forward(self, *args, **kwargs):
        raise Evaluated

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", forward)
    cases = [
        (["compare", str(d / "v320.kld"), "--model", str(d / "bigbos")],
         f"the tokenizer's BOS is token {VOCAB}, outside the {VOCAB} tokens of", "another vocab"),
        (["compare", str(d / "v50.kld"), "--model", m],
         f"the model gives {VOCAB} logits per position, ", "stores 50"),
        (["compare", str(d / "long.kld"), "--model", m],
         f"gives windows of {2 * CTX + 2} tokens, beyond the model's {2 * CTX} positions"),
        (["llama-base", "--model", m, "--text", str(d / "text.txt"), "--ctx", str(2 * CTX + 1),
          "--out", str(d / "a.kld")], f"--ctx {2 * CTX + 1} gives windows of"),
    ]  # fmt: skip
    before = sorted(p.name for p in d.iterdir())
    for argv, *needles in cases:
        code, out, err = run([*argv, "--quiet"])
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1, (argv, err)
        model = argv[argv.index("--model") + 1]
        assert lines[0].startswith(f"kldiv {argv[0]}: error: {model}: "), lines[0]
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
    assert sorted(p.name for p in d.iterdir()) == before


def test_forward_errors_are_one_line(models, monkeypatch):
    """Whatever the model's forward pass raises (here CUDA's out-of-memory message, and an
    index error) ends the command with one line naming the model and the windows; no file."""
    d, m = models["tmp"], str(models["ref_dir"])
    assert run(["llama-base", "--model", m, "--text", str(d / "text.txt"), "--ctx", str(CTX),
                "--out", str(d / "ok.kld"), "--quiet", "--chunks", "3"])[0] == 0  # fmt: skip
    errors = iter([
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore text"),
        IndexError("index out of range in self"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    ])  # fmt: skip

    def forward(self, *args, **kwargs):
        raise next(errors)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", forward)
    before = sorted(p.name for p in d.iterdir())
    cases = [
        (["llama-base", "--model", m, "--text", str(d / "text.txt"), "--ctx", str(CTX),
          "--out", str(d / "a.kld"), "--batch", "2"],
         f"{m}: the forward pass failed on windows 0..1 of {CTX} tokens (RuntimeError: CUDA out "
         "of memory. Tried to allocate 20.00 GiB); try --batch 1"),
        (["compare", str(d / "ok.kld"), "--model", m],
         f"{m}: the forward pass failed on window 0 of {CTX} tokens (IndexError: index out of "
         "range in self)"),
        (["compare", str(d / "ok.kld"), "--model", m, "--batch", "5"],
         f"the forward pass failed on windows 0..2 of {CTX} tokens"),
    ]  # fmt: skip
    for argv, needle in cases:
        code, out, err = run([*argv, "--quiet"])
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1, (argv, err)
        assert lines[0].startswith(f"kldiv {argv[0]}: error: ") and needle in lines[0], lines[0]
    assert sorted(p.name for p in d.iterdir()) == before


def test_cuda_loading_needs_no_accelerate(models, monkeypatch):
    """device_map needs accelerate, which kldiv[hf] does not bring: without it the model loads
    without device_map and is moved with .to(device). Only the arguments are checked here (no
    GPU claim): torch.cuda is patched to say a device exists, and moving to it then fails."""
    from kldiv.cli import hf

    assert hf._accelerate_installed() == (
        __import__("importlib").util.find_spec("accelerate") is not None
    )
    cuda = torch.device("cuda")
    monkeypatch.setattr(hf, "_accelerate_installed", lambda: False)
    assert "device_map" not in hf._load_kwargs("auto", cuda)
    assert "device_map" not in hf._load_kwargs("float32", torch.device("cpu"))
    monkeypatch.setattr(hf, "_accelerate_installed", lambda: True)
    assert hf._load_kwargs("auto", cuda)["device_map"] == "cuda"
    assert "device_map" not in hf._load_kwargs("auto", torch.device("cpu"))

    monkeypatch.setattr(hf, "_accelerate_installed", lambda: False)
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    d = models["tmp"]
    code, _, err = run(["llama-base", "--model", str(models["ref_dir"]), "--text",
                        str(d / "text.txt"), "--ctx", str(CTX), "--out", str(d / "g.kld"),
                        "--quiet"])  # fmt: skip
    assert len(seen) == 1 and "device_map" not in seen[0]
    if not torch.backends.cuda.is_built():  # a CPU build of PyTorch cannot move there
        assert code == 2 and "cannot move the model to cuda" in err, err
    assert not (d / "g.kld").exists() or code == 0


def test_info_lists_transformers_and_torchmetrics(monkeypatch):
    """kldiv info names both with their versions from the installed metadata, importing
    neither (transformers takes seconds, torchmetrics imports PyTorch)."""
    from importlib import metadata

    imported = []
    real = cli.importlib.import_module

    def import_module(name, *args):
        imported.append(name)
        return real(name, *args)

    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    code, out, _ = run(["info"])
    assert code == 0
    for dist, extra in (("transformers", "kldiv[hf]"), ("torchmetrics", "kldiv[torchmetrics]")):
        line = next(x for x in out.splitlines() if x.split()[:1] == [dist])
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "not installed"
        assert version in line and line.rstrip().endswith(extra), line
        assert dist not in imported
