"""Defaults and option names, defined once and imported by the core and every framework shell."""

from __future__ import annotations

from typing import Final, Literal, TypeAlias, get_args

# Each set of option names is written once, as a Literal type for the public signatures (type
# checkers and IDEs see the options); the tuples that the runtime validation checks against
# (users without a type checker still get the ValueErrors) are derived from it with get_args,
# here or beside their public name (estimators.ESTIMATORS, torch.topk.TAIL_POLICIES).

Form: TypeAlias = Literal["probs", "logits", "log_probs"]
# `form=`: one form for both arguments, or a (form of p, form of q) pair
FormSpec: TypeAlias = Form | tuple[Form, Form]
Reduction: TypeAlias = Literal["mean", "sum", "none"]
# the divergence family, by name (kldiv.divergence, the torch and keras shells)
Kind: TypeAlias = Literal[
    "kl", "reverse_kl", "js", "skew_kl", "skew_reverse_kl", "symmetric_kl", "tv"
]
# the kinds the distillation losses and the row engines compute (all but "symmetric_kl");
# their registry is kldiv._kinds
DistillationKind: TypeAlias = Literal["kl", "reverse_kl", "js", "skew_kl", "skew_reverse_kl", "tv"]
# DistillationLoss(fast_path=): True (choose per call), False (the core) or one path, forced
FastPath: TypeAlias = Literal["triton", "chunked"]
# TopKTeacher(tail=): what the mass outside the stored ids means
TailPolicy: TypeAlias = Literal["tail_bucket", "renormalize"]
# kldiv.estimators
Estimator: TypeAlias = Literal["k1", "k2", "k3"]
# kldiv.distributions.bernoulli_kl and the Bernoulli distribution
BernoulliForm: TypeAlias = Literal["probs", "logits"]
# kldiv.metrics.TokenStats.values(): per-token statistics, without and with labels
PlainStatistic: TypeAlias = Literal["kl", "top1"]
LabelStatistic: TypeAlias = Literal["dp", "nll_ref", "nll_cand"]
Statistic: TypeAlias = Literal[PlainStatistic, LabelStatistic]

# Other libraries' options, reproduced by kldiv.compat (and the keras shells' reduction).
TorchReduction: TypeAlias = Literal["mean", "batchmean", "sum", "none"]
TrlReduction: TypeAlias = Literal["batchmean", "sum", "mean", "none"]
VerlKLPenalty: TypeAlias = Literal[
    "kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3",
    "kl+", "k1+", "abs+", "mse+", "k2+", "low_var_kl+", "k3+",
]  # fmt: skip
KerasReduction: TypeAlias = Literal[
    "sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none"
]

FORMS: Final[tuple[Form, ...]] = get_args(Form)
REDUCTIONS: Final[tuple[Reduction, ...]] = get_args(Reduction)
FAST_PATHS: Final[tuple[bool | FastPath, ...]] = (True, False, *get_args(FastPath))

FORM: Final[Form] = "probs"
AXIS = -1
REDUCTION: Final[Reduction] = "mean"
TEMPERATURE = 1.0
JS_BETA = 0.5
SKEW_ALPHA = 0.1
