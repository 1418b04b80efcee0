"""Closed forms between discrete families: Bernoulli, categorical, binomial, geometric, Poisson."""

from __future__ import annotations

from types import ModuleType

from .. import _check, _math
from .._defaults import BernoulliForm, FormSpec
from ..divergences import kl_div
from ._common import Array, params_of

# ---------------------------------------------------------------------------------------------
# Discrete families
# ---------------------------------------------------------------------------------------------


def bernoulli_logs(xp: ModuleType, x: Array, form: str) -> tuple[Array, Array, Array | None]:
    """``(log p, log(1 − p), p or None)`` for probabilities or logits."""
    if form == "probs":
        return _math.safe_log(xp, x), _math.safe_log(xp, 1 - x), x
    return _math.log_sigmoid(xp, x), _math.log_sigmoid(xp, -x), None


def bernoulli_kl(
    p: Array,
    q: Array,
    *,
    form: BernoulliForm | tuple[BernoulliForm, BernoulliForm] = "probs",
    check: bool = False,
) -> Array:
    """KL(Bernoulli(p) ‖ Bernoulli(q)) = ``p log(p/q) + (1 − p) log((1 − p)/(1 − q))``.

    The sparse-autoencoder penalty: ``p`` the target activation rate ρ, ``q`` the observed mean
    activation ρ̂ of each unit (sum the result over units). ``form`` is ``"probs"`` (default)
    or ``"logits"``, or a pair for P and Q separately; logits go through a stable
    log-sigmoid, so saturated units keep finite values and gradients. Zero support is exact:
    a term with ``p = 0`` (or ``1 − p = 0``) is 0 with gradient 0; ``q = 0`` where ``p > 0``
    (or ``q = 1`` where ``p < 1``) gives +inf — a dead or saturated unit is infinitely far
    from a target in (0, 1), which Keras' clipping to [1e-7, 1] hides.
    """
    fp, fq = _check.check_forms(form)
    for f in (fp, fq):
        if f not in ("probs", "logits"):
            raise ValueError(f"bernoulli_kl takes form 'probs' or 'logits', got {f!r}.")
    dom = {"probs": "unit", "logits": "logit"}
    xp, (a, b) = params_of((("p", p, dom[fp]), ("q", q, dom[fq])), check)
    lp1, lp0, pp = bernoulli_logs(xp, a, fp)
    lq1, lq0, _ = bernoulli_logs(xp, b, fq)
    return _math.kl_terms(xp, lp1, lq1, pp) + _math.kl_terms(
        xp, lp0, lq0, None if pp is None else 1 - pp
    )


def categorical_kl(
    p: Array,
    q: Array,
    *,
    form: FormSpec = "probs",
    axis: int = -1,
    check: bool = False,
) -> Array:
    """KL between categorical distributions along ``axis``, one value per distribution.

    The core :func:`kldiv.kl_div` with ``reduction="none"`` (see it for forms, masks and
    temperature); here for completeness of the family and for the registry.
    """
    return kl_div(p, q, form=form, axis=axis, reduction="none", check=check)


def binomial_kl(
    total_count: Array, probs_p: Array, probs_q: Array, *, check: bool = False
) -> Array:
    """KL(Bin(n, p) ‖ Bin(n, q)) = ``n · KL(Bernoulli(p) ‖ Bernoulli(q))`` for the same ``n``.

    ``total_count`` may be an integer array. With different counts the KL has no closed form;
    ``kl(Binomial(n_p, p), Binomial(n_q, q))`` computes it exactly as a sum over the support
    of P (+inf where P can reach a count that Q cannot: n_p > n_q with p > 0).
    """
    xp, (n, a, b) = params_of(
        (
            ("total_count", total_count, "count"),
            ("probs_p", probs_p, "unit"),
            ("probs_q", probs_q, "unit"),
        ),
        check,
        counts=("total_count",),
    )
    per_trial = bernoulli_kl(a, b)
    # n = 0 is a point mass at 0 on both sides: KL 0, even where the per-trial KL is inf
    # (made safe before the product, so that its gradient is not 0·inf).
    none = n == 0
    return xp.where(none, 0.0, n * xp.where(none, 0.0, per_trial))


def geometric_kl(probs_p: Array, probs_q: Array, *, check: bool = False) -> Array:
    """KL between geometric distributions of the number of failures before the first success.

    ``log(p/q) + ((1 − p)/p)·log((1 − p)/(1 − q))`` (support {0, 1, 2, ...}, ``probs`` the
    success probability in (0, 1], as in PyTorch). ``p = 1`` is a point mass at 0 and gives
    ``−log q``; ``q = 1`` with ``p < 1`` gives +inf.
    """
    xp, (a, b) = params_of(
        (("probs_p", probs_p, "unit_open_left"), ("probs_q", probs_q, "unit_open_left")), check
    )
    fail_p = 1 - a
    tail = _math.kl_terms(xp, _math.safe_log(xp, fail_p), _math.safe_log(xp, 1 - b), fail_p)
    return xp.log(a) - xp.log(b) + tail / a


def poisson_kl(rate_p: Array, rate_q: Array, *, check: bool = False) -> Array:
    """KL(Poisson(λp) ‖ Poisson(λq)) = ``λp log(λp/λq) + λq − λp``.

    ``λp = 0`` (a point mass at 0) gives ``λq`` with finite gradients; ``λq = 0`` with
    ``λp > 0`` gives +inf.
    """
    xp, (a, b) = params_of((("rate_p", rate_p, "nonneg"), ("rate_q", rate_q, "nonneg")), check)
    return _math.kl_terms(xp, _math.safe_log(xp, a), _math.safe_log(xp, b), a) + (b - a)
