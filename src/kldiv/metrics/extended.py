"""Statistics beyond :class:`~kldiv.metrics.KLReport`, computed exactly from a
:class:`~kldiv.metrics.TokenStats`' per-token values: the ones llama.cpp's ``--kl-divergence``
prints that the report lacks, and the reverse KL and the total variation (whose complement is
the acceptance rate of speculative decoding with the candidate as the draft model).

Every quantity is a plain float64 computation on the stored per-token values; the standard
errors of functions of means (a perplexity, a root-mean-square) follow from the standard
error of the mean by the delta method, with ddof = 1 throughout, as in the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .report import mean_stderr, percentiles
from .tokens import TokenStats

__all__ = ["ExtendedReport", "extended_report", "token_divergences"]

QUARTILES = (25.0, 75.0)


@dataclass(frozen=True)
class ExtendedReport:
    """What :func:`extended_report` adds to :meth:`TokenStats.report` (plain Python numbers).

    Always:

    * ``kl_min``: the smallest per-token KL(ref‖cand).

    With the per-token reverse KL and total variation (see :func:`token_divergences`),
    ``None`` otherwise:

    * ``reverse_kl_mean`` ± ``reverse_kl_stderr``, ``reverse_kl_max`` and
      ``reverse_kl_percentiles`` of KL(cand‖ref) (same definitions as the KL fields of the
      report);
    * ``tv_mean`` ± ``tv_stderr``, ``tv_max``, ``tv_percentiles`` of the total variation
      ½·Σ|p − q|, and ``acceptance`` = 1 − ``tv_mean``: the expected fraction of tokens a
      speculative decoder accepts when the candidate drafts for the reference (per token
      Σ min(p, q) = 1 − TV); its standard error is ``tv_stderr``.

    With labels (``None`` without):

    * ``dp_quartiles``: ``{25.0: …, 75.0: …}`` percentiles of Δp (linear, as in the report);
    * ``dp_rms_stderr``: the standard error of ``dp_rms`` = √m with m = mean(Δp²):
      se(m)/(2√m), se(m) = std(Δp², ddof=1)/√n (0 when every Δp is 0);
    * ``ppl_ref_stderr``, ``ppl_cand_stderr``: PPL·se(mean NLL);
    * ``ppl_ratio_stderr``: ratio·se(ln ratio), the report's paired ``ln_ppl_ratio_stderr``;
    * ``nll_correlation``: the Pearson correlation of the two models' per-token NLLs (``None``
      when one of them is constant or infinite);
    * ``ppl_diff`` = PPL(cand) − PPL(ref) and ``ppl_diff_stderr``
      = √(se_c² + se_r² − 2·PPL_c·PPL_r·cov(nll_c, nll_r)/n).

    Standard errors are +inf with fewer than 2 tokens or with an infinite value involved.
    """

    kl_min: float
    reverse_kl_mean: float | None = None
    reverse_kl_stderr: float | None = None
    reverse_kl_max: float | None = None
    reverse_kl_percentiles: dict[float, float] | None = None
    tv_mean: float | None = None
    tv_stderr: float | None = None
    tv_max: float | None = None
    tv_percentiles: dict[float, float] | None = None
    acceptance: float | None = None
    dp_quartiles: dict[float, float] | None = None
    dp_rms_stderr: float | None = None
    ppl_ref_stderr: float | None = None
    ppl_cand_stderr: float | None = None
    ppl_ratio_stderr: float | None = None
    nll_correlation: float | None = None
    ppl_diff: float | None = None
    ppl_diff_stderr: float | None = None


def token_divergences(
    ref: Any, cand: Any, *, form: Any = "logits", axis: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """Per-token reverse KL(cand‖ref) and total variation ½·Σ|p − q|, float64, token shape.

    The same inputs as :meth:`TokenStats.update` (``ref`` the distributions P, ``cand`` Q),
    computed in float64 by :func:`kldiv.reverse_kl_div` and :func:`kldiv.tv_distance` with
    their exact zero support (a token where ``cand`` has mass and ``ref`` none has reverse KL
    +inf). Feed the same tokens, in the same order, as to the ``TokenStats`` passed to
    :func:`extended_report` (without the ignored ones).
    """
    from .. import reverse_kl_div, tv_distance
    from .blocks import to_numpy

    r = to_numpy(ref).astype(np.float64)
    c = to_numpy(cand).astype(np.float64)
    rkl = np.asarray(reverse_kl_div(r, c, form=form, axis=axis, reduction="none"))
    tv = np.asarray(tv_distance(r, c, form=form, axis=axis, reduction="none"))
    return np.maximum(rkl, 0.0), np.clip(tv, 0.0, 1.0)


def extended_report(
    stats: TokenStats,
    reverse_kl: Any | None = None,
    tv: Any | None = None,
) -> ExtendedReport:
    """The statistics of :class:`ExtendedReport` for the tokens accumulated in ``stats``.

    ``reverse_kl`` and ``tv``: per-token values of the same tokens (any shape, flattened in
    order; e.g. concatenated outputs of :func:`token_divergences`), or ``None``.
    """
    kl = stats.values("kl")
    n = kl.size
    if n == 0:
        raise ValueError("No tokens to report on: call update() first.")
    kw: dict[str, Any] = {"kl_min": float(np.min(kl))}
    for name, values in (("reverse_kl", reverse_kl), ("tv", tv)):
        if values is None:
            continue
        v = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
        if v.size != n:
            raise ValueError(
                f"Expected {n} per-token values of `{name}` (one per accumulated token), got "
                f"{v.size}."
            )
        mean, se = mean_stderr(v)
        kw.update(
            {
                f"{name}_mean": mean,
                f"{name}_stderr": se,
                f"{name}_max": float(v[-1]),
                f"{name}_percentiles": percentiles(v),
            }
        )
        if name == "tv":
            kw["acceptance"] = 1.0 - mean
    if stats.has_labels:
        kw.update(_label_extras(stats))
    return ExtendedReport(**kw)


def _se(x: np.ndarray) -> float:
    """Standard error of the mean of ``x`` (ddof = 1), +inf when it cannot be estimated."""
    if x.size < 2 or not np.isfinite(x).all():
        return math.inf
    return float(np.std(x, ddof=1)) / math.sqrt(x.size)


def _label_extras(stats: TokenStats) -> dict[str, Any]:
    dp = stats.values("dp")
    nr, nc = stats.values("nll_ref"), stats.values("nll_cand")
    n = dp.size
    q = np.percentile(dp, QUARTILES)  # Δp is finite: plain NumPy percentiles are exact
    sq = dp * dp
    rms = math.sqrt(float(np.mean(sq)))
    se_sq = _se(sq)
    rms_se = 0.0 if rms == 0 and se_sq == 0 else (se_sq / (2 * rms) if rms else math.inf)
    out: dict[str, Any] = {
        "dp_quartiles": {k: float(v) for k, v in zip(QUARTILES, q, strict=True)},
        "dp_rms_stderr": rms_se,
    }
    finite = bool(np.isfinite(nr).all() and np.isfinite(nc).all())
    mr, mc = float(np.mean(nr)), float(np.mean(nc))
    ppl_r, ppl_c = _exp(mr), _exp(mc)
    se_r, se_c = _se(nr), _se(nc)
    out["ppl_ref_stderr"] = ppl_r * se_r if math.isfinite(ppl_r) else math.inf
    out["ppl_cand_stderr"] = ppl_c * se_c if math.isfinite(ppl_c) else math.inf
    ln_se = _se(nc - nr) if finite else math.inf
    ratio = _exp(mc - mr) if finite else None
    out["ppl_ratio_stderr"] = (
        None if ratio is None else (ratio * ln_se if math.isfinite(ratio) else math.inf)
    )
    corr = None
    cov = math.nan
    if finite and n >= 2:
        cov = float(np.cov(nc, nr, ddof=1)[0, 1])
        sr, sc = float(np.std(nr, ddof=1)), float(np.std(nc, ddof=1))
        if sr > 0 and sc > 0:
            corr = max(-1.0, min(1.0, cov / (sr * sc)))
    out["nll_correlation"] = corr
    out["ppl_diff"] = ppl_c - ppl_r if math.isfinite(ppl_c) or math.isfinite(ppl_r) else None
    if finite and n >= 2 and math.isfinite(ppl_c) and math.isfinite(ppl_r):
        var = (ppl_c * se_c) ** 2 + (ppl_r * se_r) ** 2 - 2 * ppl_c * ppl_r * cov / n
        out["ppl_diff_stderr"] = math.sqrt(max(var, 0.0))
    else:
        out["ppl_diff_stderr"] = math.inf
    return out


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
