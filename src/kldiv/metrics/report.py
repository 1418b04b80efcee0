"""The report of :class:`~kldiv.metrics.TokenStats`: :class:`KLReport`, its text and JSON forms,
and the summary statistics (exact percentiles, mean and standard error) of sorted per-token
values."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

PERCENTILES: tuple[float, ...] = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
"""The percentiles every report holds, in the order the text table prints them."""

# --------------------------------------------------------------------------------------------
# The report


def _json_float(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return "inf" if x > 0 else "-inf"


def _from_json_float(x: Any) -> float | None:
    if x is None:
        return None
    if isinstance(x, str):
        if x not in ("inf", "-inf"):
            raise ValueError(f"Expected a number, null, 'inf' or '-inf', got {x!r}.")
        return math.inf if x == "inf" else -math.inf
    return float(x)


def _pct_key(q: float) -> str:
    return f"{q:g}"


@dataclass(frozen=True)
class KLReport:
    """Statistics of per-token KL(ref‖cand) over ``num_tokens`` tokens (plain Python numbers).

    Built by :meth:`TokenStats.report`. Tokens whose label is ``ignore_index`` are excluded from
    *every* statistic (and counted in ``num_ignored``); without labels every token counts.

    KL statistics (nats), from the per-token values k_i = KL(P_i‖Q_i), i = 1..n:

    * ``kl_mean`` = Σ k_i / n and ``kl_stderr`` = std(k, ddof=1) / √n, the standard error of
      the mean. ``kl_stderr`` is +inf when it cannot be estimated: fewer than 2 tokens, or an
      infinite k_i (then ``kl_mean`` is +inf too, exactly, and ``kl_num_inf`` counts them).
    * ``kl_max`` and ``kl_percentiles``: ``{q: value}`` for q in :data:`PERCENTILES` (50 is the
      median), exact order statistics with NumPy's default definition (``method="linear"``,
      Hyndman & Fan type 7: the value at sorted position (n − 1)·q/100, linearly interpolated;
      equal to ``np.percentile(k, q)`` wherever that is not NaN). Between a finite and an
      infinite neighbour the interpolated value is +inf (NumPy gives NaN for some of these).
    * Per-token KL is ≥ 0 mathematically; a value that float64 rounding makes slightly negative
      (identical or nearly identical rows) is reported as 0.

    Top-1 agreement: f = fraction of tokens where argmax(ref) == argmax(cand) (ties resolved to
    the lowest index on both sides), ``top1_agreement_stderr`` = √(f·(1 − f)/n).

    With labels (the correct next token y_i; all ``None`` without labels), p_i = P_i(y_i),
    q_i = Q_i(y_i):

    * Δp_i = q_i − p_i (probability, not percent): ``dp_mean``, ``dp_stderr`` (as for KL),
      ``dp_rms`` = √(Σ Δp_i² / n), ``dp_min``, ``dp_max``, ``dp_percentiles``;
    * ``ppl_ref`` = exp(mean(−log p_i)), ``ppl_cand`` = exp(mean(−log q_i)),
      ``ln_ppl_ratio`` = mean(−log q_i) − mean(−log p_i) and ``ppl_ratio`` = exp(ln_ppl_ratio)
      = PPL(cand)/PPL(ref), computed from the mean NLLs, so it stays finite where both
      perplexities overflow; ``ln_ppl_ratio_stderr`` = std(log p_i − log q_i, ddof=1)/√n, the
      standard error of ``ln_ppl_ratio`` (paired: it accounts for the correlation of the two
      models, which makes it much smaller than either NLL's own standard error).
      A model that gives some label probability 0 has PPL +inf; then ``ln_ppl_ratio`` is ±inf
      (``ppl_ratio`` +inf or 0) and its standard error +inf, or, when both models do, all three
      are ``None`` (undefined). With fewer than 2 tokens the standard error is +inf.

    No field is ever NaN. :meth:`to_dict` gives a JSON-serialisable mapping (infinities as the
    strings ``"inf"``/``"-inf"``, undefined values as ``null``, percentile keys as strings such
    as ``"99.9"``); :meth:`from_dict` inverts it; :meth:`to_text` formats a table.
    """

    num_tokens: int
    num_ignored: int
    kl_mean: float
    kl_stderr: float
    kl_max: float
    kl_num_inf: int
    kl_percentiles: dict[float, float]
    top1_agreement: float
    top1_agreement_stderr: float
    dp_mean: float | None = None
    dp_stderr: float | None = None
    dp_rms: float | None = None
    dp_min: float | None = None
    dp_max: float | None = None
    dp_percentiles: dict[float, float] | None = None
    ppl_ref: float | None = None
    ppl_cand: float | None = None
    ppl_ratio: float | None = None
    ln_ppl_ratio: float | None = None
    ln_ppl_ratio_stderr: float | None = None

    @property
    def has_labels(self) -> bool:
        return self.dp_mean is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: ``json.dumps(report.to_dict())`` works (no NaN, no inf)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict):
                out[f.name] = {_pct_key(q): _json_float(x) for q, x in v.items()}
            elif isinstance(v, float):
                out[f.name] = _json_float(v)
            else:
                out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KLReport:
        """Inverse of :meth:`to_dict` (also accepts its JSON round trip)."""
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            v = data[f.name]
            if f.name.endswith("percentiles"):
                kw[f.name] = (
                    None if v is None else {float(q): _from_json_float(x) for q, x in v.items()}
                )
            elif f.name in ("num_tokens", "num_ignored", "kl_num_inf"):
                kw[f.name] = int(v)
            else:
                kw[f.name] = _from_json_float(v)
        return cls(**kw)

    def to_text(self) -> str:
        """A readable table of every statistic (what ``kldiv compare`` prints)."""
        return _format(self)

    def __str__(self) -> str:
        return self.to_text()


def _num(x: float | None, spec: str = ".6g") -> str:
    if x is None:
        return "undefined"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


def _pct(x: float | None, spec: str = ".3f") -> str:
    return "undefined" if x is None else f"{_num(100.0 * x, spec)} %"


def _format(r: KLReport) -> str:
    head = f"KL(ref‖cand) over {r.num_tokens} tokens"
    if r.num_ignored:
        head += f" ({r.num_ignored} excluded by ignore_index)"
    rows: list[tuple[str, str]] = [
        ("Mean KL", f"{_num(r.kl_mean)} ± {_num(r.kl_stderr)}"),
        ("Maximum KL", _num(r.kl_max)),
    ]
    rows += [(f"{_pct_key(q)}% KL", _num(v)) for q, v in r.kl_percentiles.items()]
    rows.append(("Tokens with KL = inf", str(r.kl_num_inf)))
    rows.append(("Same top-1", f"{_pct(r.top1_agreement)} ± {_pct(r.top1_agreement_stderr)}"))
    if r.has_labels:
        rows += [
            ("PPL(ref)", _num(r.ppl_ref)),
            ("PPL(cand)", _num(r.ppl_cand)),
            ("PPL(cand)/PPL(ref)", _num(r.ppl_ratio)),
            ("ln(PPL ratio)", f"{_num(r.ln_ppl_ratio)} ± {_num(r.ln_ppl_ratio_stderr)}"),
            ("Mean Δp", f"{_pct(r.dp_mean)} ± {_pct(r.dp_stderr)}"),
            ("RMS Δp", _pct(r.dp_rms)),
            ("Maximum Δp", _pct(r.dp_max)),
        ]
        assert r.dp_percentiles is not None
        rows += [(f"{_pct_key(q)}% Δp", _pct(v)) for q, v in r.dp_percentiles.items()]
        rows.append(("Minimum Δp", _pct(r.dp_min)))
    width = max(len(name) for name, _ in rows)
    units = "(KL in nats"
    units += "; Δp = cand − ref probability of the label, in %)" if r.has_labels else ")"
    lines = [head, units]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Statistics of sorted per-token values


def percentiles(s: np.ndarray) -> dict[float, float]:
    """NumPy's default (linear) percentiles of the sorted ``s``, with +inf where it gives NaN."""
    n = s.size
    vi = (n - 1) * (np.asarray(PERCENTILES) / 100)
    lo = np.floor(vi).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    t = vi - lo
    a, b = s[lo], s[hi]
    with np.errstate(invalid="ignore"):  # inf - inf: replaced below
        d = b - a
        v = np.where(t >= 0.5, b - d * (1 - t), a + d * t)  # numpy's _lerp, bit for bit
    # s is sorted, finite or +inf: a NaN or inf above means b = +inf; the exact value is +inf
    # unless t = 0 (then a itself, which 0·inf made NaN).
    v = np.where(t == 0, a, np.where(b == math.inf, math.inf, v))
    return {q: float(x) for q, x in zip(PERCENTILES, v, strict=True)}


def mean_stderr(s: np.ndarray) -> tuple[float, float]:
    """Mean and ddof=1 standard error of the mean; (±inf, inf) with infinite values.

    Finite values are summed scaled by a power of two (exact) that brings the largest near 1:
    n values near 1e308 would otherwise overflow the sum (and their squares the variance)
    although their mean is finite."""
    n = s.size
    if not np.isfinite(s[0]) or not np.isfinite(s[-1]):  # sorted: infinities at the ends
        return float(s[-1] if s[-1] == math.inf else s[0]), math.inf
    _, e = math.frexp(float(max(abs(s[0]), abs(s[-1]))))
    scaled = np.ldexp(s, -e)
    mean = math.ldexp(float(np.mean(scaled)), e)
    if n < 2:
        return mean, math.inf
    return mean, _ldexp(float(np.std(scaled, ddof=1)), e) / math.sqrt(n)


def _ldexp(x: float, e: int) -> float:
    try:
        return math.ldexp(x, e)
    except OverflowError:  # a spread wider than the float range: the honest answer is inf
        return math.inf


def exp_or_inf(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
