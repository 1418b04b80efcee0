"""Defaults and option names, defined once and imported by the core and every framework shell."""

from __future__ import annotations

FORMS = ("probs", "logits", "log_probs")
REDUCTIONS = ("mean", "sum", "none")

FORM = "probs"
AXIS = -1
REDUCTION = "mean"
TEMPERATURE = 1.0
JS_BETA = 0.5
SKEW_ALPHA = 0.1

# The extra keyword each kind takes, with its default (for shells that dispatch by name).
KIND_PARAMS = {
    "js": {"beta": JS_BETA},
    "skew_kl": {"alpha": SKEW_ALPHA},
    "skew_reverse_kl": {"alpha": SKEW_ALPHA},
}
