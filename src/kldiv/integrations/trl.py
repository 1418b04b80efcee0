"""TRL's distillation trainers with kldiv's losses: the same divergence, computed by kldiv.

Two drop-in subclasses, for TRL ≥ 1.16:

* :class:`KLDivDistillationTrainer` subclasses ``trl.DistillationTrainer`` (on-policy
  distillation: the student generates the completions, the loss is on the completion tokens);
* :class:`KLDivGKDTrainer` subclasses ``trl.experimental.gkd.GKDTrainer`` (generalised
  knowledge distillation: with probability ``lmbda`` the student generates the completions,
  else, with ``seq_kd=True``, the teacher does, else the dataset's completions are used).

Both take the trainer's own arguments unchanged, plus ``fused_linear`` and ``chunk_size``
(keyword-only). Generation, on-policy sampling, ``seq_kd``, gradient accumulation and the
``num_items_in_batch`` normalisation stay TRL's; only the divergence is computed by kldiv:
:class:`~kldiv.torch.FusedLinearDistillationLoss` from the models' last hidden states and LM
heads (the student's ``[B, L, V]`` logits are never materialised) where the heads are
reachable, :class:`~kldiv.torch.DistillationLoss` on logits otherwise. On CPU both run the
chunked C kernel, on CUDA the Triton kernels.

The divergence, per completion token, between the teacher's next-token distribution
``p_t = softmax(z_t / T)`` and the student's ``p_s = softmax(z_s / T)``, is TRL's generalised
Jensen–Shannon divergence with its ``beta`` (see :func:`trl_divergence`):

* ``beta = 0``: KL(p_t‖p_s), the forward KL (mass-covering);
* ``beta = 1``: KL(p_s‖p_t), the reverse KL (mode-seeking);
* ``0 < beta < 1``: β·KL(p_t‖m) + (1 − β)·KL(p_s‖m) with m = β·p_t + (1 − β)·p_s, which is
  ``kldiv.js_div(p_t, p_s, beta=β)``. (That JSD itself tends to 0 at both ends; TRL switches
  to the two KLs there, and so does this module.)

The loss is the mean over the tokens that count (completion tokens; TRL's
``num_items_in_batch``, the global count under gradient accumulation, replaces the
denominator when TRL passes it), 0 when there are none.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

try:
    from trl import DistillationTrainer
    from trl.experimental.gkd import GKDTrainer
except ImportError as err:  # pragma: no cover - depends on the installed TRL
    raise ImportError(
        "kldiv.integrations.trl needs TRL ≥ 1.16 (trl.DistillationTrainer and "
        'trl.experimental.gkd.GKDTrainer): pip install "kldiv[trl]".'
    ) from err

from .._defaults import DistillationKind
from ..torch import DistillationLoss, FusedLinearDistillationLoss

__all__ = ["KLDivDistillationTrainer", "KLDivGKDTrainer", "trl_divergence"]

# DistillationTrainer's multimodal inputs (TRL 1.16), passed through to the model's backbone as
# TRL's own loss does
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def trl_divergence(beta: float) -> dict[str, Any]:
    """kldiv's divergence for TRL's ``beta``, as keyword arguments of
    :class:`~kldiv.torch.DistillationLoss` and :class:`~kldiv.torch.FusedLinearDistillationLoss`.

    ``beta = 0`` gives ``{"divergence": "kl"}`` (KL(teacher‖student), forward), ``beta = 1``
    ``{"divergence": "reverse_kl"}`` (KL(student‖teacher)), and ``0 < beta < 1``
    ``{"divergence": "js", "beta": beta}``: β·KL(teacher‖m) + (1 − β)·KL(student‖m) with
    m = β·teacher + (1 − β)·student. This is what TRL's ``DistillationTrainer`` and
    ``GKDTrainer`` compute for their ``beta``; kldiv's ``"js"`` alone would give 0 at the
    endpoints, where the generalised JSD vanishes.

    >>> from kldiv.integrations.trl import trl_divergence
    >>> trl_divergence(0.0), trl_divergence(1.0), trl_divergence(0.25)
    ({'divergence': 'kl'}, {'divergence': 'reverse_kl'}, {'divergence': 'js', 'beta': 0.25})
    """
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"Expected TRL's `beta` to be a number in [0, 1], got {beta!r}.")
    kind: DistillationKind
    if beta == 0.0:
        kind = "kl"
    elif beta == 1.0:
        kind = "reverse_kl"
    else:
        return {"divergence": "js", "beta": float(beta)}
    return {"divergence": kind}


def _check_options(fused_linear: bool | None, chunk_size: int | None) -> None:
    if not (fused_linear is None or isinstance(fused_linear, bool)):
        raise ValueError(
            f"Expected `fused_linear` to be None, True or False, got {fused_linear!r}."
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"Expected `chunk_size` to be None or an int ≥ 1, got {chunk_size!r}.")


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, or the model under a PEFT wrapper (whose adapters live inside it)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _logit_postprocessing(model: torch.nn.Module) -> tuple[float, float | None]:
    """(scale, softcap) that the model applies to ``head(hidden)`` to get its logits, read from
    its config as TRL 1.16's DistillationTrainer reads them: ``logit_scale`` (Cohere),
    ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1), ``1 / logits_scaling``
    (Granite, MiniCPM3; HyperCLOVA X multiplies), then ``final_logit_softcapping`` (Gemma):
    ``softcap · tanh(scale · z / softcap)``."""
    config = model.config.get_text_config()  # type: ignore[union-attr,operator]
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None)
        if scale is not None:
            break
    scaling = getattr(config, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = scaling if getattr(config, "model_type", None) == "hyperclovax" else 1 / scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))


def _linear_head(model: torch.nn.Module) -> tuple[torch.nn.Linear, float, float | None] | None:
    """``(head, scale, softcap)`` if the model's logits are ``head(last_hidden_state)``
    post-processed as its config declares (:func:`_logit_postprocessing`), the head an
    ``nn.Linear`` itself (not an adapter layer around one); else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear:
        return None
    try:
        scale, softcap = _logit_postprocessing(model)
    except AttributeError:  # no config to read: nothing known about the head's logits
        return None
    return head, scale, softcap


def _maps(
    teacher: tuple[Any, float, float | None] | None, student: tuple[Any, float, float | None]
) -> dict[str, Any]:
    """The fused loss's ``softcap``/``logit_scale`` pairs from the heads' post-processing (a
    teacher given as logits has its own already applied: None)."""
    t_scale, t_cap = (1.0, None) if teacher is None else teacher[1:]
    return {"logit_scale": (t_scale, student[1]), "softcap": (t_cap, student[2])}


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """A plain tensor from an FSDP2 ``DTensor`` (gathered once; its backward scatters)."""
    if t is None:
        return None
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    if dtensor is not None and isinstance(t, dtensor):
        return t.full_tensor()
    return t


def _num_items(num_items: Any, device: torch.device) -> Any:
    return num_items.to(device) if isinstance(num_items, torch.Tensor) else num_items


class KLDivGKDTrainer(GKDTrainer):
    """``trl.experimental.gkd.GKDTrainer`` with the loss computed by kldiv.

    Constructor: ``GKDTrainer``'s arguments (``model``, ``teacher_model``, ``args`` a
    ``GKDConfig``, ...), plus keyword-only ``fused_linear`` and ``chunk_size``. Generation is
    GKDTrainer's: with probability ``args.lmbda`` the batch's completions are replaced by the
    student's samples (at ``args.temperature``), else with ``args.seq_kd`` by the teacher's.

    The loss, as TRL's ``compute_loss`` defines it: the logits at position i predict token
    i + 1, so for ``input_ids`` ``[B, L]`` the loss runs over the ``B × (L − 1)`` positions whose
    shifted label ``labels[:, 1:]`` is not -100 (prompt and padding tokens are -100), with the
    divergence of :func:`trl_divergence` for ``args.beta`` (β = 0: KL(teacher‖student);
    β = 1: KL(student‖teacher)) at temperature 1 — GKDTrainer's ``temperature`` is its
    sampling temperature, not applied to the loss — averaged over those positions (or divided
    by ``num_items_in_batch`` when the Trainer passes it).

    ``fused_linear``: ``None`` (default) uses :class:`~kldiv.torch.FusedLinearDistillationLoss`
    when the student's LM head is an ``nn.Linear`` (the logit scale and softcap its config
    declares are applied inside the fused loss, and checked once against its forward) and
    its ``forward`` takes ``logits_to_keep`` (Hugging Face causal LMs do): the student runs
    with ``logits_to_keep=1, output_hidden_states=True`` through its (possibly distributed)
    wrapper, so only ``[B, 1, V]`` logits are made, and the loss reads the last hidden states
    and the head's weight. The teacher is read the same way when its head qualifies too (its
    logits are then not materialised either), else, or when its head and declared
    post-processing do not reproduce its forward's logits, through its logits. ``False`` always uses
    :class:`~kldiv.torch.DistillationLoss` on the full logits; ``True`` raises where the fused
    loss cannot be used. When ``compute_loss`` is asked for the model's outputs (evaluation),
    the logits are computed, as the caller needs them. ``chunk_size``: tokens per chunk of the
    fused loss (default ``⌊2^22 / V⌋``).
    """

    def __init__(
        self,
        *args: Any,
        fused_linear: bool | None = None,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        _check_options(fused_linear, chunk_size)
        super().__init__(*args, **kwargs)
        self.kldiv_fused_linear = fused_linear
        self.kldiv_chunk_size = chunk_size
        self._kldiv_checked: set[int] = set()
        self._kldiv_unfusable: set[int] = set()

    def _kldiv_head(
        self, model: torch.nn.Module, required: bool
    ) -> tuple[torch.nn.Linear, float, float | None] | None:
        """The head for the fused loss and its post-processing, or None (with the reason
        raised if ``required``)."""
        if self.kldiv_fused_linear is False:
            return None
        head = _linear_head(model)
        takes_logits_to_keep = (
            "logits_to_keep" in inspect.signature(_base_model(model).forward).parameters
        )
        if head is None or not takes_logits_to_keep:
            if required:
                raise ValueError(
                    f"fused_linear=True needs a model whose logits are `lm_head(last hidden "
                    f"state)` (an nn.Linear head, with the logit scale and softcap its config "
                    f"declares) and whose forward takes `logits_to_keep`; "
                    f"{type(model).__name__} does not qualify. Pass fused_linear=None to fall "
                    f"back to the logits."
                )
            return None
        return head

    def _kldiv_hidden(
        self,
        model: torch.nn.Module,
        unwrapped: torch.nn.Module,
        head_map: tuple[torch.nn.Linear, float, float | None],
        inputs: Any,
        strict: bool = True,
    ) -> torch.Tensor | None:
        """The last hidden states ``[B, L, H]``, through ``model`` (the wrapper, so that data
        parallel hooks run), computing the logits of the last position only."""
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            logits_to_keep=1,
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = out.hidden_states[-1]
        if id(unwrapped) not in self._kldiv_checked:
            # once per model: the head applied to the last hidden state must give the model's
            # own last logits, or the fused loss would train on something else
            head, scale, softcap = head_map
            with torch.no_grad():
                ours = head(hidden[:, -1:].to(head.weight.dtype)).float() * scale
                if softcap is not None:
                    ours = softcap * torch.tanh(ours / softcap)
                theirs = out.logits[:, -1:].float()
                tol = 1e-2 if hidden.dtype in (torch.float16, torch.bfloat16) else 1e-4
                bad = (ours - theirs).abs().max() > tol * (1 + theirs.abs().max())
            if bool(bad):
                if not strict:  # a teacher: read through its logits instead
                    self._kldiv_unfusable.add(id(unwrapped))
                    return None
                raise ValueError(
                    f"{type(unwrapped).__name__}: the LM head applied to the last hidden state "
                    "does not reproduce the model's logits (post-processing that the config "
                    "does not declare?). Pass fused_linear=False."
                )
            self._kldiv_checked.add(id(unwrapped))
        return hidden

    def compute_loss(
        self,
        model: Any,
        inputs: Any,
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        labels = inputs["labels"][:, 1:]
        kw = trl_divergence(self.beta)
        self.teacher_model.eval()
        student = self.accelerator.unwrap_model(model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        s_head = (
            None if return_outputs else self._kldiv_head(student, bool(self.kldiv_fused_linear))
        )
        if s_head is None:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            with torch.no_grad():
                t_logits = self.teacher_model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).logits
            logits = outputs.logits
            loss = DistillationLoss(**kw)(
                logits[:, :-1],
                t_logits[:, :-1],
                labels,
                _num_items(num_items_in_batch, logits.device),
            )
            return (loss, outputs) if return_outputs else loss

        s_hidden = self._kldiv_hidden(model, student, s_head, inputs)
        assert s_hidden is not None  # strict: raised otherwise
        hidden = s_hidden[:, :-1]
        weight, bias = _full(s_head[0].weight), _full(s_head[0].bias)
        assert weight is not None
        # a teacher whose head does not qualify gives its logits (without a gradient)
        t_head = None
        if id(teacher) not in self._kldiv_unfusable:
            t_head = self._kldiv_head(teacher, required=False)
        teacher_kw: dict[str, Any] = {}
        with torch.no_grad():
            t_hidden = None
            if t_head is not None:
                t_hidden = self._kldiv_hidden(
                    self.teacher_model, teacher, t_head, inputs, strict=False
                )
            if t_hidden is None:
                t_head = None
            if t_head is not None and t_hidden is not None:
                t_hidden = t_hidden[:, :-1]
                t_weight, t_bias = _full(t_head[0].weight), _full(t_head[0].bias)
                assert t_weight is not None
                teacher_kw = {
                    "teacher_hidden": t_hidden.to(t_weight.dtype),
                    "teacher_weight": t_weight.detach(),
                    "teacher_bias": None if t_bias is None else t_bias.detach(),
                }
            else:
                t_logits = self.teacher_model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).logits
                teacher_kw = {"teacher_logits": t_logits[:, :-1]}
        loss = FusedLinearDistillationLoss(
            **kw, **_maps(t_head, s_head), chunk_size=self.kldiv_chunk_size
        )(
            hidden.to(weight.dtype),
            weight,
            labels=labels,
            num_items=_num_items(num_items_in_batch, hidden.device),
            student_bias=bias,
            **teacher_kw,
        )
        return loss


class KLDivDistillationTrainer(DistillationTrainer):
    """``trl.DistillationTrainer`` with the loss computed by kldiv.

    Constructor: ``DistillationTrainer``'s arguments (``model``, ``teacher_model``, ``args`` a
    ``DistillationConfig``, ...), plus keyword-only ``fused_linear`` and ``chunk_size``.
    Generation (the student samples the completions, on-policy), batching and the loss's
    normalisation are DistillationTrainer's: only its loss step (``_compute_loss``, called by
    its ``compute_loss`` inside its data-parallel forward redirection) is replaced.

    The loss: over the completion tokens (``completion_mask``, times ``tool_mask`` in
    multi-turn tool runs), the divergence of :func:`trl_divergence` for ``args.beta`` (β = 0:
    KL(teacher‖student); β = 1: KL(student‖teacher), DistillationTrainer's default) between
    ``softmax(z / T)`` of both models' logits, ``T = args.temperature`` (DistillationTrainer
    applies its sampling temperature to the loss too), averaged over those tokens, or divided
    by TRL's global token count under gradient accumulation. The logits are those the
    models' own forward would give: ``lm_head(h)``, scaled and softcapped as their configs
    declare (``logit_scale``, ``final_logit_softcapping``, ...), as TRL's loss does.

    ``fused_linear``: ``None`` (default) uses :class:`~kldiv.torch.FusedLinearDistillationLoss`
    from both models' last hidden states and LM heads when both heads are plain
    ``nn.Linear`` (the logit scale and softcap their configs declare applied inside the fused
    loss, as TRL applies them; no ``[B, L, V]`` logits for either model);
    otherwise the logits of the completion tokens are made from the hidden states (``[N, V]``
    for N such tokens) and :class:`~kldiv.torch.DistillationLoss` computes the divergence.
    ``False`` always does the latter; ``True`` raises where the fused loss cannot be used.
    ``chunk_size``: tokens per chunk of the fused loss (default ``⌊2^22 / V⌋``).

    The per-token student entropy that TRL logs as ``entropy`` would need another pass over
    the vocabulary and is not computed: it is logged as ``None``.
    """

    def __init__(
        self,
        *args: Any,
        fused_linear: bool | None = None,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        _check_options(fused_linear, chunk_size)
        missing = [
            name
            for name in ("_compute_loss", "_get_last_hidden_state")
            if not callable(getattr(DistillationTrainer, name, None))
        ]
        if missing:  # pragma: no cover - depends on the installed TRL
            raise ImportError(
                f"This TRL's DistillationTrainer has no {', '.join(missing)}, which "
                "KLDivDistillationTrainer replaces or uses; it is tested with TRL 1.16."
            )
        super().__init__(*args, **kwargs)
        self.kldiv_fused_linear = fused_linear
        self.kldiv_chunk_size = chunk_size

    def _compute_loss(
        self, unwrapped_student: Any, inputs: Any, num_items_in_batch: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}

        # TRL's own helper: the backbone's hidden states aligned with the completion tokens
        # [B, K, H] (position i predicts completion token i), for PEFT and VLMs alike
        s_hidden = self._get_last_hidden_state(
            unwrapped_student, input_ids, attention_mask, logits_to_keep, **multimodal
        )
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            # through the teacher's wrapper, so that sharded parameters are gathered (as TRL)
            t_hidden = self._forward_redirection(
                self.teacher_model,
                unwrapped_teacher,
                self._get_last_hidden_state,
                unwrapped_teacher,
                input_ids,
                attention_mask,
                logits_to_keep,
                **multimodal,
            )
        s_head = unwrapped_student.get_output_embeddings()
        t_head = unwrapped_teacher.get_output_embeddings()
        device = s_head.weight.device
        if t_head.weight.device != device:
            raise ValueError(
                f"The student's LM head is on {device} but the teacher's is on "
                f"{t_head.weight.device}. Place both on the same device in their `device_map`."
            )
        s_hidden, t_hidden, loss_mask = (
            s_hidden.to(device),
            t_hidden.to(device),
            loss_mask.to(device),
        )
        valid = loss_mask != 0
        num_items = _num_items(num_items_in_batch, device)
        kw = trl_divergence(self.beta)
        s_weight, s_bias = _full(s_head.weight), _full(s_head.bias)
        t_weight, t_bias = _full(t_head.weight), _full(t_head.bias)
        assert s_weight is not None and t_weight is not None

        s_linear, t_linear = _linear_head(unwrapped_student), _linear_head(unwrapped_teacher)
        fused = self.kldiv_fused_linear is not False and None not in (s_linear, t_linear)
        if self.kldiv_fused_linear and not fused:
            raise ValueError(
                "fused_linear=True needs both models' logits to be `lm_head(last hidden state)` "
                "(nn.Linear heads, with the logit scale and softcap their configs declare). "
                "Pass fused_linear=None to fall back to the completion tokens' logits."
            )
        if fused:
            assert s_linear is not None
            loss = FusedLinearDistillationLoss(
                **kw,
                **_maps(t_linear, s_linear),
                temperature=self.temperature,
                chunk_size=self.kldiv_chunk_size,
            )(
                s_hidden.to(s_weight.dtype),
                s_weight,
                num_items=num_items,
                mask=valid,
                student_bias=s_bias,
                teacher_hidden=t_hidden.to(t_weight.dtype),
                teacher_weight=t_weight.detach(),
                teacher_bias=None if t_bias is None else t_bias.detach(),
            )
        else:
            # only the completion tokens' logits, [N, V], post-processed as the models do
            s_logits = self._kldiv_logits(unwrapped_student, s_hidden[valid], s_weight, s_bias)
            with torch.no_grad():
                t_logits = self._kldiv_logits(unwrapped_teacher, t_hidden[valid], t_weight, t_bias)
            loss = DistillationLoss(**kw, temperature=self.temperature)(
                s_logits, t_logits, num_items=num_items
            )
        # TRL logs sum(entropy) / n_valid as `entropy`; NaN makes its logger record None
        entropy_sum = torch.full((), math.nan, device=device)
        return loss, entropy_sum, valid.sum()

    @staticmethod
    def _kldiv_logits(
        model: torch.nn.Module,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        z = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias)
        scale, softcap = _logit_postprocessing(model)
        if scale != 1.0:
            z = z * scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return z
