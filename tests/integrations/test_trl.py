"""kldiv.integrations.trl against the real TRL: the kldiv trainers' losses and gradients are
TRL's trainers' own, on tiny randomly initialised Llama models built here (nothing is
downloaded), for β at both KL endpoints and inside, several temperatures, prompt tokens
ignored (-100), with and without the fused hidden-state loss, and on the student-generated
(on-policy) path.

Tolerances. GKDTrainer computes its loss in the models' dtype: with float64 models both losses
are float64 sums of V = 100 terms per token, equal to ~1e-15 relative; 1e-9 leaves room.
DistillationTrainer (TRL 1.16, ``kernels/chunked_divergence.py``) projects the hidden states
in float32 whatever the models' dtype, so against it the difference is TRL's float32
rounding: hidden states and heads rounded to float32 (u = 2^-24 ≈ 6e-8) and a 32-term
float32 dot product per logit move each logit by ≲ √H·u·|z| ≈ 4e-7·|z|, and a per-token
divergence by ≲ ‖∂D/∂z‖₁·max|δz| — up to ~3e-6 relative for the small losses here (β = 0.3,
T = 2 gives 2.2e-6), hence 1e-5. That the divergence itself is exact is checked separately, at
1e-9, against TRL's own formula (``GKDTrainer.generalized_jsd_loss``, which DistillationTrainer
documents as the same generalised JSD) evaluated in float64 on the float64 logits.
"""

from __future__ import annotations

import copy
import random
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
datasets = pytest.importorskip("datasets")

from trl import DistillationConfig, DistillationTrainer  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from kldiv.integrations.trl import (  # noqa: E402
    KLDivDistillationTrainer,
    KLDivGKDTrainer,
    trl_divergence,
)

V = 100  # vocabulary: 3 special tokens and w3..w99
EXACT = 1e-9  # float64 against float64 (see the module docstring)
TRL_FP32 = 1e-5  # against DistillationTrainer's float32 kernel (see the module docstring)


@pytest.fixture(autouse=True)
def _keep_global_rngs(seed):
    """Every draw here is seeded explicitly (models, batches, generation), so these tests do
    not depend on the suite's seed; TRL's trainers and the generation reseed and advance the
    global generators, which are put back as the suite's seed fixture left them."""
    state = torch.get_rng_state(), np.random.get_state(), random.getstate()  # noqa: NPY002
    yield
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])  # noqa: NPY002
    random.setstate(state[2])


def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def model(seed, dtype=torch.float64, **extra):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
        # peakier distributions than the default 0.02, so that the divergences are O(1)
        initializer_range=0.2,
        **extra,
    )
    return transformers.LlamaForCausalLM(config).to(dtype)


def gkd(
    cls, tmp_path, beta, *, temperature=0.9, lmbda=0.0, seq_kd=False, dtype=torch.float64, **kw
):
    args = GKDConfig(
        output_dir=str(tmp_path / cls.__name__),
        report_to="none",
        use_cpu=True,
        bf16=False,
        beta=beta,
        temperature=temperature,
        lmbda=lmbda,
        seq_kd=seq_kd,
        max_new_tokens=3,
        per_device_train_batch_size=2,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
    )
    return cls(
        model=model(0, dtype),
        teacher_model=model(1, dtype),
        args=args,
        processing_class=tokenizer(),
        train_dataset=datasets.Dataset.from_dict({"input_ids": [[3]] * 2}),
        data_collator=gkd_collate,
        **kw,
    )


def gkd_batch():
    """Two sequences of 10 tokens: prompts of 4 tokens (labels -100), the second left-padded
    by 2 (attention 0, labels -100), and prompts for on-policy generation."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, V, (2, 10), generator=g)
    attention = torch.ones_like(ids)
    attention[1, :2] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[attention == 0] = -100
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": labels,
        "prompts": ids[:, :4],
        "prompt_attention_mask": attention[:, :4],
    }


def gkd_collate(_examples):
    return gkd_batch()


def dist(
    cls, tmp_path, beta, temperature, *, dtype=torch.float64, student=None, teacher=None, **kw
):
    args = DistillationConfig(
        output_dir=str(tmp_path / cls.__name__),
        report_to="none",
        use_cpu=True,
        bf16=False,
        beta=beta,
        temperature=temperature,
        max_completion_length=3,
        per_device_train_batch_size=2,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        seed=3,
    )
    return cls(
        model=student if student is not None else model(0, dtype),
        teacher_model=teacher if teacher is not None else model(1, dtype),
        args=args,
        processing_class=tokenizer(),
        train_dataset=datasets.Dataset.from_dict({"prompt": ["w3 w4 w5", "w6 w7"]}),
        **kw,
    )


def dist_batch():
    """DistillationTrainer's inputs after generation: left-padded prompts of 5 tokens and
    completions of 4, the second cut after its EOS (completion_mask 0)."""
    g = torch.Generator().manual_seed(8)
    prompt = torch.randint(3, V, (2, 5), generator=g)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[0, :2] = 0
    completion = torch.randint(3, V, (2, 4), generator=g)
    completion_mask = torch.ones_like(completion)
    completion_mask[1, 3] = 0
    return {
        "prompt_ids": prompt,
        "prompt_mask": prompt_mask,
        "completion_ids": completion,
        "completion_mask": completion_mask,
    }


def loss_and_grads(trainer, inputs, **kw):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, dict(inputs), **kw)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]


def assert_close(a, b, rtol):
    """|a − b| ≤ rtol·max|b|, for a loss or a list of gradients (normalised by the largest
    entry, since single entries can be 0)."""
    for x, y in zip(a, b, strict=True) if isinstance(a, list) else [(a, b)]:
        x, y = x.double(), y.double()
        err = (x - y).abs().max().item()
        assert err <= rtol * y.abs().max().item(), (err, y.abs().max().item())


def test_import_kldiv_leaves_trl_unimported():
    code = (
        "import sys, kldiv, kldiv.integrations; print('trl' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_trl_divergence_maps_beta_onto_kldiv():
    assert trl_divergence(0) == {"divergence": "kl"}
    assert trl_divergence(1.0) == {"divergence": "reverse_kl"}
    assert trl_divergence(0.3) == {"divergence": "js", "beta": 0.3}
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="beta"):
            trl_divergence(bad)


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "logits"])
@pytest.mark.parametrize(("beta", "temperature"), [(0.0, 0.9), (0.3, 0.5), (0.5, 1.0), (1.0, 2.0)])
def test_gkd_loss_and_gradients_equal_trl(tmp_path, beta, temperature, fused):
    ref = gkd(GKDTrainer, tmp_path, beta, temperature=temperature)
    ours = gkd(KLDivGKDTrainer, tmp_path, beta, temperature=temperature, fused_linear=fused)
    batch = gkd_batch()
    for num_items in (None, torch.tensor(7)):  # the Trainer's global count, when it passes one
        want, want_grads = loss_and_grads(ref, batch, num_items_in_batch=num_items)
        got, got_grads = loss_and_grads(ours, batch, num_items_in_batch=num_items)
        assert want > 0.01
        assert_close(got, want, EXACT)
        assert_close(got_grads, want_grads, EXACT)


def test_gkd_fused_path_makes_only_last_position_logits(tmp_path):
    trainer = gkd(KLDivGKDTrainer, tmp_path, 0.5)
    shapes = []
    for m in (trainer.model, trainer.teacher_model):
        m.lm_head.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    trainer.compute_loss(trainer.model, gkd_batch())
    # student, its one-time check, teacher, its check: [B, 1, V] each, never [B, L, V]
    assert set(shapes) == {(2, 1, V)}
    _, outputs = trainer.compute_loss(trainer.model, gkd_batch(), return_outputs=True)
    assert outputs.logits.shape == (2, 10, V)  # asked for the outputs: the logits are made


def test_gkd_mixed_heads_equal_trl(tmp_path):
    """A teacher whose config declares a softcap that its forward does not apply (Llama
    ignores ``final_logit_softcapping``) fails the one-time check and is read through its
    logits (the model's forward is what GKDTrainer uses) while the student stays fused; such
    a student is refused under fused_linear=True."""
    capped = {"final_logit_softcapping": 3.0}
    ref = gkd(GKDTrainer, tmp_path, 0.3)
    ref.teacher_model = model(1, **capped)
    ours = gkd(KLDivGKDTrainer, tmp_path, 0.3, fused_linear=True)
    ours.teacher_model = model(1, **capped)
    want, want_grads = loss_and_grads(ref, gkd_batch())
    got, got_grads = loss_and_grads(ours, gkd_batch())
    assert_close(got, want, EXACT)
    assert_close(got_grads, want_grads, EXACT)
    ours = gkd(KLDivGKDTrainer, tmp_path, 0.3, fused_linear=True)
    ours.model.config.final_logit_softcapping = 3.0
    with pytest.raises(ValueError, match="does not reproduce the model's logits"):
        ours.compute_loss(ours.model, gkd_batch())


def gemma2(seed):
    """A tiny Gemma 2: its forward soft-caps the logits, c·tanh(z/c) with c = 3."""
    torch.manual_seed(seed)
    config = transformers.Gemma2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        final_logit_softcapping=3.0,
        initializer_range=0.2,
    )
    return transformers.Gemma2ForCausalLM(config).to(torch.float64)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_gkd_softcapped_models_fused_equal_trl(tmp_path, beta):
    """Gemma 2 student and teacher: the fused loss applies their soft-capping inside (no
    [B, L, V] logits) and equals GKDTrainer's loss on their forward's logits."""
    ref = gkd(GKDTrainer, tmp_path, beta)
    ref.model, ref.teacher_model = gemma2(0), gemma2(1)
    ours = gkd(KLDivGKDTrainer, tmp_path, beta, fused_linear=True)
    ours.model, ours.teacher_model = gemma2(0), gemma2(1)
    # no left padding: this transformers' Gemma 2 gives NaN on every position of a
    # left-padded float64 row, in both trainers alike
    batch = {**gkd_batch(), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    want, want_grads = loss_and_grads(ref, batch)
    got, got_grads = loss_and_grads(ours, batch)
    assert want.isfinite() and want > 0
    assert_close(got, want, EXACT)
    assert_close(got_grads, want_grads, EXACT)
    shapes = []
    for m in (ours.model, ours.teacher_model):
        m.lm_head.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    ours.compute_loss(ours.model, batch)
    assert set(shapes) == {(2, 1, V)}  # the last position's logits only


def test_gkd_on_policy_training_step_equals_trl(tmp_path):
    """lmbda = 1: every step trains on the student's own samples; with the same seeds both
    trainers sample the same completions, so the steps' losses and gradients agree."""
    results = []
    for cls in (GKDTrainer, KLDivGKDTrainer):
        trainer = gkd(cls, tmp_path, 0.3, lmbda=1.0)
        trainer.current_gradient_accumulation_steps = 1  # set by train(), which is not run here
        random.seed(0)
        torch.manual_seed(0)
        loss = trainer.training_step(trainer.model, gkd_batch())
        results.append((loss, [p.grad.clone() for p in trainer.model.parameters()]))
    (want, want_grads), (got, got_grads) = results
    assert_close(got, want, EXACT)
    assert_close(got_grads, want_grads, EXACT)


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "logits"])
@pytest.mark.parametrize(
    ("beta", "temperature"), [(0.0, 1.0), (0.3, 2.0), (0.5, 0.7), (1.0, 1.0), (1.0, 0.5)]
)
def test_distillation_loss_and_gradients_equal_trl(tmp_path, beta, temperature, fused):
    ref = dist(DistillationTrainer, tmp_path, beta, temperature)
    ours = dist(KLDivDistillationTrainer, tmp_path, beta, temperature, fused_linear=fused)
    batch = dist_batch()
    want, want_grads = loss_and_grads(ref, batch)
    got, got_grads = loss_and_grads(ours, batch)
    assert want > 0.01
    assert_close(got, want, TRL_FP32)
    assert_close(got_grads, want_grads, TRL_FP32)

    # the divergence exactly: TRL's generalised JSD in float64 on the completion logits
    # (position P − 1 + i predicts completion token i), through the float64 student
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    p, k = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    student = copy.deepcopy(ours.model)
    student.zero_grad(set_to_none=True)
    s_logits = student(input_ids=ids, attention_mask=attention).logits[:, p - 1 : p + k - 1]
    with torch.no_grad():
        t_logits = ours.teacher_model(input_ids=ids, attention_mask=attention).logits
    labels = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    exact = GKDTrainer.generalized_jsd_loss(
        s_logits, t_logits[:, p - 1 : p + k - 1], labels, beta=beta, temperature=temperature
    )
    exact.backward()
    assert_close(got, exact.detach(), EXACT)
    assert_close(got_grads, [q.grad for q in student.parameters()], EXACT)


def test_distillation_global_token_count_equals_trl(tmp_path):
    """Under training, TRL divides by its count of generated tokens (``num_items_in_batch`` in
    the inputs), not by the micro-batch's."""
    batch = {**dist_batch(), "num_items_in_batch": torch.tensor(13.0)}
    ref = dist(DistillationTrainer, tmp_path, 0.5, 1.0)
    ours = dist(KLDivDistillationTrainer, tmp_path, 0.5, 1.0)
    want, want_grads = loss_and_grads(ref, batch)
    got, got_grads = loss_and_grads(ours, batch)
    assert_close(got, want, TRL_FP32)
    assert_close(got_grads, want_grads, TRL_FP32)
    plain, _ = loss_and_grads(ours, dist_batch())
    assert_close(got * 13, plain * 7, EXACT)  # 7 completion tokens in dist_batch


def test_distillation_scaled_and_softcapped_logits_equal_trl(tmp_path):
    """A config that declares a logit scale and a softcap: TRL applies them to lm_head's
    output, and so does the kldiv trainer, inside the fused loss or on the logits path."""
    extra = {"logit_scale": 0.5, "final_logit_softcapping": 3.0}
    ref = dist(DistillationTrainer, tmp_path, 0.3, 1.5, student=model(0, **extra))
    ours = dist(KLDivDistillationTrainer, tmp_path, 0.3, 1.5, student=model(0, **extra))
    want, want_grads = loss_and_grads(ref, dist_batch())
    got, got_grads = loss_and_grads(ours, dist_batch())
    assert_close(got, want, TRL_FP32)
    assert_close(got_grads, want_grads, TRL_FP32)
    for fused in (True, False):
        ours = dist(
            KLDivDistillationTrainer,
            tmp_path,
            0.3,
            1.5,
            student=model(0, **extra),
            fused_linear=fused,
        )
        got, got_grads = loss_and_grads(ours, dist_batch())
        assert_close(got, want, TRL_FP32)
        assert_close(got_grads, want_grads, TRL_FP32)


def test_distillation_fused_path_never_calls_the_heads(tmp_path):
    trainer = dist(KLDivDistillationTrainer, tmp_path, 1.0, 1.0)
    calls = []
    for m in (trainer.model, trainer.teacher_model):
        m.lm_head.register_forward_hook(lambda *_: calls.append(1))
    trainer.compute_loss(trainer.model, dist_batch()).backward()
    assert calls == []


def test_distillation_on_policy_training_step_equals_trl(tmp_path):
    """A training step from text prompts: the student generates (same seed, same samples),
    then the loss and gradients agree with TRL's."""
    results = []
    for cls in (DistillationTrainer, KLDivDistillationTrainer):
        trainer = dist(cls, tmp_path, 0.5, 1.0)
        trainer.current_gradient_accumulation_steps = 1  # set by train(), which is not run here
        torch.manual_seed(0)
        prompts = [{"prompt": "w3 w4 w5"}, {"prompt": "w6 w7"}]
        loss = trainer.training_step(trainer.model, prompts, None)
        results.append((loss, [p.grad.clone() for p in trainer.model.parameters()]))
    (want, want_grads), (got, got_grads) = results
    assert want > 0.01
    assert_close(got, want, TRL_FP32)
    assert_close(got_grads, want_grads, TRL_FP32)


@pytest.mark.parametrize("which", ["gkd", "distillation"])
def test_train_runs(tmp_path, which):
    """``train()`` for a step, float32 models: on-policy and sequence-level KD generation for
    GKD, on-policy for DistillationTrainer; the loss is logged and the student moves."""
    if which == "gkd":
        trainer = gkd(KLDivGKDTrainer, tmp_path, 0.5, lmbda=0.5, seq_kd=True, dtype=torch.float32)
    else:
        trainer = dist(KLDivDistillationTrainer, tmp_path, 0.5, 1.0, dtype=torch.float32)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and logged[0]["loss"] > 0
    if which == "distillation":
        assert logged[0]["entropy"] is None  # not computed by the kldiv loss (see its doc)
    assert any(
        not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True)
    )


def test_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="fused_linear"):
        gkd(KLDivGKDTrainer, tmp_path, 0.5, fused_linear="yes")
    with pytest.raises(ValueError, match="chunk_size"):
        dist(KLDivDistillationTrainer, tmp_path, 0.5, 1.0, chunk_size=0)
