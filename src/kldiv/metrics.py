"""Streaming, mergeable statistics of per-token KL(P‖Q) between two models' token distributions.

The report quantisation and distillation work needs: feed a reference model's outputs ``ref``
(the distributions P) and a candidate's ``cand`` (Q) for the same tokens, chunk by chunk, and get
the distribution of the per-token divergence

    KL(P‖Q) = Σ_v p_v·(log p_v − log q_v)        (direction: KL(ref‖cand))

as mean ± standard error, maximum and exact percentiles, the top-1 agreement of the two models
and, with ``labels``, the change in the probability of the correct token and the perplexity
ratio. It is the report llama.cpp's ``--kl-divergence`` prints, computed exactly: every
per-token value is kept (one float64 per token and statistic), so percentiles are exact order
statistics rather than a sketch, and merging partial results (e.g. from several processes)
gives the same report, bit for bit, as one pass over all tokens.

>>> import numpy as np
>>> from kldiv.metrics import TokenStats
>>> ref = np.array([[0.2, 0.5, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
>>> cand = np.array([[0.3, 0.4, 0.1, 0.2], [0.25, 0.25, 0.25, 0.25]])
>>> stats = TokenStats()
>>> stats.update(ref, cand, form="probs")   # streams: call once per chunk
>>> r = stats.report()
>>> r.num_tokens, round(r.kl_mean, 6), round(r.kl_max, 6), r.top1_agreement
(2, 0.049897, 0.099793, 1.0)
>>> a, b = TokenStats(), TokenStats()
>>> a.update(ref[:1], cand[:1], form="probs"); b.update(ref[1:], cand[1:], form="probs")
>>> a.merge(b).report() == r
True
>>> print(r.to_text())  # doctest: +ELLIPSIS
KL(ref‖cand) over 2 tokens
...

Accuracy: every chunk is converted to float64 before the log-softmax and the KL, so per-token
values match a float64 reference whatever the input dtype (float16, bfloat16, float32 or
float64). Zero support is exact, as in :func:`kldiv.kl_div`: terms with p = 0 count 0, p > 0
where q = 0 gives a per-token KL of +inf, and ``-inf`` logits are zero probabilities.

Memory: one float64 per token for the KL and, with labels, three more (Δp and both negative
log-likelihoods), plus one byte for top-1 agreement: about 8 bytes per token per statistic. The
``[N, V]`` input is processed in blocks of rows, so temporaries stay a few MB whatever the size
of the chunk passed to :meth:`TokenStats.update`.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, cast, get_args

import array_api_compat.numpy as _xp
import numpy as np

from . import _check, _math
from . import _namespace as ns
from ._defaults import FormSpec, LabelStatistic, PlainStatistic, Statistic

__all__ = ["TokenStats", "KLReport", "PERCENTILES", "IGNORE_INDEX"]

PERCENTILES: tuple[float, ...] = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
"""The percentiles every report holds, in the order the text table prints them."""

IGNORE_INDEX = -100
"""The label value that marks a token to skip (PyTorch's ``cross_entropy`` default)."""

# Rows per block are chosen so that one float64 [rows, V] buffer holds about this many elements
# (2 MiB; update() keeps four such buffers, reused across blocks). Measured on 2048 x 32000
# float32 logits: 2^17 to 2^18 elements are fastest, 2^15 and 2^20 about 10 % slower; the exp
# dominates either way. Tests shrink it to exercise block boundaries.
_BLOCK_ELEMENTS = 1 << 18

_POOL: Any = None


def _threads() -> int:
    """Worker threads for update(): the cores this process may use, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child inherits the pool object but none of its threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _pool() -> Any:
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="kldiv-metrics")
    return _POOL


_STATS_PLAIN: tuple[PlainStatistic, ...] = get_args(PlainStatistic)
_STATS_LABELS: tuple[LabelStatistic, ...] = get_args(LabelStatistic)

Array = Any


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
            if f.name.endswith("_percentiles"):
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


def _percentiles(s: np.ndarray) -> dict[float, float]:
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


def _mean_stderr(s: np.ndarray) -> tuple[float, float]:
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


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


# --------------------------------------------------------------------------------------------
# Per-token values of one block of rows


class _BadRow(Exception):
    """A block row that fails a value check (mapped to a token index by ``update``)."""

    def __init__(self, row: int, what: str, nan: bool = False):
        super().__init__(what)
        self.row, self.what, self.nan = row, what, nan
        self.side = ""  # set by the caller: "ref" or "cand"


def _first(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def _side(
    xb: np.ndarray,
    form: str,
    tols: tuple[float, float],
    lp: np.ndarray,
    e: np.ndarray,
    want_p: bool,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Float64 log-probabilities of a [rows, V] block, probabilities if wanted, and the argmax.

    ``lp`` and ``e`` are float64 scratch buffers of the block's shape, filled and returned:
    reused across blocks, they cost no allocation (fresh [rows, V] arrays from ``malloc``
    page-fault on first touch, which took more time than the arithmetic). Runs the value checks
    of :func:`kldiv._check.check_values` (``tols``: see ``_tolerances``) on quantities computed
    anyway, and raises ``_BadRow`` for the first bad row.
    """
    x = e if form == "probs" else lp
    np.copyto(x, xb, casting="unsafe")  # dtype checked to be real floating: exact
    top = np.argmax(x, axis=-1)
    hi = np.max(x, axis=-1, keepdims=True)  # NaN propagates through max
    if np.isnan(hi).any():
        raise _BadRow(_first(np.isnan(hi)), "", nan=True)
    tol, tol_lp = tols
    if form == "logits":
        if (hi == math.inf).any():
            raise _BadRow(_first(hi == math.inf), "it has a +inf logit")
        if (hi == -math.inf).any():
            raise _BadRow(_first(hi == -math.inf), "all its logits are -inf (no category has mass)")
        # kldiv._math.log_softmax, in place: x − max, then − log Σ exp. The row max is finite,
        # so -inf logits stay -inf (probability exactly 0). exp(x − max) is reused for
        # p = e/Σe instead of a second exp(lp): the exp dominates the cost.
        with np.errstate(over="ignore"):  # float64 logits ±1e308 apart: that p is 0, as in core
            lp -= hi
        np.exp(lp, out=e)
        total = np.sum(e, axis=-1, keepdims=True)  # ≥ 1: the max contributes exp(0)
        lp -= np.log(total)
        if not want_p:
            return lp, None, top
        e /= total
        return lp, e, top
    if form == "log_probs":
        if (hi > 0).any():
            raise _BadRow(_first(hi > 0), "it has log-probabilities > 0")
        np.exp(lp, out=e)
        with np.errstate(divide="ignore"):  # a row of only -inf: log 0 = -inf, reported below
            lse = np.log(np.sum(e, axis=-1))
        bad = ~(np.abs(lse) <= tol_lp)
        if bad.any():
            r = _first(bad)
            raise _BadRow(
                r,
                "its probabilities (exp of log_probs) do not sum to 1 "
                f"(sum {math.exp(lse[r]):.9g}, tolerance {tol_lp:.1e})",
            )
        return lp, e, top
    lo = np.min(e, axis=-1)
    if (lo < 0).any():
        raise _BadRow(_first(lo < 0), "it has negative probabilities")
    total = np.sum(e, axis=-1)
    bad = ~(np.abs(total - 1) <= tol)
    if bad.any():
        r = _first(bad)
        raise _BadRow(
            r, f"its probabilities do not sum to 1 (sum {total[r]:.9g}, tolerance {tol:.1e})"
        )
    # Plain log: for p ≥ 0 it is kldiv._math.safe_log's value (log 0 = -inf); safe_log's
    # second where only protects gradients, which NumPy has not.
    with np.errstate(divide="ignore"):
        np.log(e, out=lp)
    return lp, e, top


def _kl_block(lp: np.ndarray, lq: np.ndarray, p: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Per-row KL(P‖Q) with the exact zero-support semantics of :func:`kldiv._math.kl_rows`.

    The plain Σ p·(lp − lq) is right for every row without zero support, and a row with any
    zero-support term (p = 0 somewhere, or q = 0 where p underflowed) comes out NaN, through
    0·(±inf) or −inf − (−inf): exactly those rows are recomputed with ``_math.kl_rows``. Rows
    where p > 0 meets q = 0 with no NaN term are +inf, as they should be. This runs in the
    scratch buffer ``d`` instead of the ~8 temporaries of the ``where`` composition, which take
    longer than the exp. Values equal ``_math.kl_rows``'s bit for bit (same terms, same sum).
    """
    with np.errstate(invalid="ignore"):
        np.subtract(lp, lq, out=d)
        d *= p
        kl = np.sum(d, axis=-1)
    nan = np.isnan(kl)
    if nan.any():
        kl[nan] = _math.kl_rows(_xp, lp[nan], lq[nan], p[nan], -1)
    kl[kl <= 0] = 0.0  # rounding (or -0.0); KL ≥ 0
    return kl


def _block_values(
    xr: np.ndarray,
    xc: np.ndarray,
    forms: tuple[str, str],
    tols: tuple[tuple[float, float], tuple[float, float]],
    labels: np.ndarray | None,
    scratch: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per-token values of one block; ``scratch`` is a float64 [4, ≥ rows, V] work buffer."""
    lp_buf, p_buf, lq_buf, q_buf = (s[: xr.shape[0]] for s in scratch)
    try:
        lp, p, top_r = _side(xr, forms[0], tols[0], lp_buf, p_buf, want_p=True)
    except _BadRow as e:
        e.side = "ref"
        raise
    try:
        lq, q, top_c = _side(xc, forms[1], tols[1], lq_buf, q_buf, want_p=False)
    except _BadRow as e:
        e.side = "cand"
        raise
    assert p is not None
    out = {"top1": top_r == top_c}
    if labels is not None:  # before _kl_block overwrites q_buf
        rows = np.arange(labels.size)
        lp_y, lq_y = lp[rows, labels], lq[rows, labels]
        # The same formula on both sides, so that identical inputs give Δp = 0 exactly (the
        # normalised exp that p holds for logits differs from exp(lp) in the last bit).
        p_y = p[rows, labels] if forms[0] == "probs" else np.exp(lp_y)
        # (with form "probs" _side returns q even when not asked for it)
        q_y = cast(np.ndarray, q)[rows, labels] if forms[1] == "probs" else np.exp(lq_y)
        out["dp"] = q_y - p_y
        out["nll_ref"] = -lp_y
        out["nll_cand"] = -lq_y
    out["kl"] = _kl_block(lp, lq, p, q_buf)
    return out


# --------------------------------------------------------------------------------------------
# Input conversion


def _to_numpy(x: Any) -> np.ndarray:
    """A NumPy array from NumPy, PyTorch (any device), JAX or anything ``np.asarray`` takes."""
    if ns.is_torch_array(x):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; float32 holds it exactly
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _dtype_name(x: Any) -> str:
    dtype = getattr(x, "dtype", None)  # not `or`: a NumPy dtype is falsy (it has no fields)
    return str(np.asarray(x).dtype if dtype is None else dtype).rsplit(".", 1)[-1]


def _tolerances(name: str, v: int) -> tuple[float, float]:
    """The value-check tolerances of ``kl_div(check=True)``, (probs, log_probs), for V = ``v``.

    The formulas of ``kldiv._check._tolerance`` and ``check_values``, from the dtype the caller
    passed (a torch bfloat16 tensor reaches NumPy as float32, but was rounded to bfloat16),
    which is known here only by name.
    """
    half = _check._HALF_ROUNDING.get(name)
    eps, tiny = half if half is not None else (float(np.finfo(np.dtype(name)).eps), 0.0)
    tol = 4 * eps + v * (tiny / 2 + float(np.finfo(np.float64).eps))
    # A log-probability rounded to the dtype is off by (eps/2)·|l|, which moves the total mass
    # by up to (eps/2)·H(p) ≤ (eps/2)·log V.
    return tol, tol + eps * math.log(v + 1)


def _token_index(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()


# --------------------------------------------------------------------------------------------
# The accumulator


class TokenStats:
    """Accumulates per-token KL(ref‖cand) and related values; :meth:`report` summarises them.

    Call :meth:`update` once per chunk of tokens (any number of times), then :meth:`report`.
    Partial accumulators (e.g. one per process or per data shard) combine with :meth:`merge`.
    The report does not depend on the order of updates or merges: every statistic is computed
    from the per-token values in sorted order, so ``a.merge(b).report() == b.merge(a).report()
    ==`` the report of one accumulator fed all tokens, exactly.

    Either every update passes ``labels`` or none does (label statistics over a subset of the
    tokens would be easy to misread); mixing raises ``ValueError``, as does a vocabulary size
    that changes between updates.
    """

    def __init__(self) -> None:
        self._chunks: dict[str, list[np.ndarray]] = {k: [] for k in _STATS_PLAIN + _STATS_LABELS}
        self._num_ignored = 0
        self._vocab_size: int | None = None
        self._has_labels: bool | None = None
        # update() may be called from several threads: each one's commit is atomic
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # picklable, e.g. to merge across processes
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------- properties
    @property
    def num_tokens(self) -> int:
        """Tokens accumulated so far (excluding those with ``labels == ignore_index``)."""
        return sum(c.size for c in self._chunks["kl"])

    @property
    def num_ignored(self) -> int:
        """Tokens skipped because their label was ``ignore_index``."""
        return self._num_ignored

    @property
    def vocab_size(self) -> int | None:
        """The number of categories V seen so far (``None`` before the first update)."""
        return self._vocab_size

    @property
    def has_labels(self) -> bool | None:
        """Whether updates carried labels (``None`` before the first update)."""
        return self._has_labels

    def __repr__(self) -> str:
        return (
            f"TokenStats(num_tokens={self.num_tokens}, num_ignored={self._num_ignored}, "
            f"vocab_size={self._vocab_size}, has_labels={self._has_labels})"
        )

    def values(self, name: Statistic = "kl") -> np.ndarray:
        """The stored per-token values, in update order, as one float64 (``"top1"``: bool) array.

        ``name`` is ``"kl"``, ``"top1"``, or with labels ``"dp"``, ``"nll_ref"``, ``"nll_cand"``.
        """
        if name not in self._chunks:
            raise ValueError(
                f"Expected `name` to be one of {', '.join(map(repr, self._chunks))}, got {name!r}."
            )
        chunks = self._chunks[name]
        dtype = bool if name == "top1" else np.float64
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)

    # -------------------------------------------------------------------------------- update
    def update(
        self,
        ref: Array,
        cand: Array,
        *,
        form: FormSpec = "logits",
        labels: Array | None = None,
        axis: int = -1,
        ignore_index: int = IGNORE_INDEX,
        token_offset: int = 0,
    ) -> None:
        """Add the tokens of one chunk: ``ref`` holds the distributions P, ``cand`` Q.

        Parameters
        ----------
        ref, cand : array of shape (..., V)
            The same tokens from the reference and the candidate model: NumPy arrays, PyTorch
            tensors (any device; copied to the host), JAX arrays or anything ``np.asarray``
            accepts, with a real floating dtype (float16, bfloat16, float32, float64). Every
            axis but ``axis`` indexes tokens (flattened in C order); ``axis`` holds the V
            categories. Both must have the same shape (no broadcasting: each token needs its
            own pair of distributions). With ``axis`` the last axis of a C-contiguous array,
            nothing is copied but blocks of rows converted to float64.
        form : {"logits", "log_probs", "probs"} or a pair of them
            What the arrays hold (default ``"logits"``, the usual model output). A pair gives
            ``ref`` and ``cand`` separately, e.g. ``("log_probs", "logits")``. Logits get a
            stable float64 log-softmax; ``-inf`` logits are zero probabilities.
        labels : integer array, shape = the token shape, optional
            The correct token of each position, for the Δp and perplexity statistics. Tokens
            whose label equals ``ignore_index`` are excluded from every statistic, KL and
            top-1 agreement included (padding and prompt tokens), and their ``ref``/``cand``
            rows are not read, so they may hold anything, NaN included.
        axis : int
            The category axis (default -1).
        ignore_index : int
            The label value that excludes a token (default -100).
        token_offset : int
            Position of this chunk's first token in the whole stream, so that error messages
            about a 1-D chunk of tokens give the token's index in the stream (default 0).

        Raises
        ------
        TypeError
            Non-floating ``ref``/``cand``, non-integer ``labels``.
        ValueError
            Shapes that differ, no tokens or no categories, a vocabulary size or labels
            presence different from earlier updates, labels of the wrong shape or out of
            ``[0, V)``, and invalid values: NaN (the count is given), probabilities that are
            negative or do not sum to 1, log-probabilities > 0 or not normalised, +inf logits
            or rows of only -inf logits, with the same tolerances as ``kl_div(check=True)``.
            A failed update adds nothing.

        Notes
        -----
        Tokens whose per-token KL is infinite (``cand`` gives probability 0 where ``ref`` does
        not) are kept; they make the mean +inf and are counted in the report.
        """
        forms = _check.check_forms(form)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int | np.integer):
            raise TypeError(f"Expected `ignore_index` to be an int, got {ignore_index!r}.")
        names = (_dtype_name(ref), _dtype_name(cand))  # before a torch bfloat16 becomes float32
        ref, cand = _to_numpy(ref), _to_numpy(cand)
        ns.compute_dtype(_xp, ("ref", ref), ("cand", cand))  # TypeError for non-floating
        if ref.ndim == 0 or cand.ndim == 0:
            raise ValueError(
                f"Expected `ref` and `cand` to have at least 1 dimension (the category axis), "
                f"got shapes {ref.shape} and {cand.shape}."
            )
        if ref.shape != cand.shape:
            raise ValueError(
                f"Expected `ref` and `cand` to have the same shape (one pair of distributions "
                f"per token), got {ref.shape} and {cand.shape}."
            )
        ax = _check.check_axis(axis, ref.ndim)
        vocab = ref.shape[ax]
        tokens = ref.shape[:ax] + ref.shape[ax + 1 :]
        n = math.prod(tokens)
        if vocab == 0:
            raise ValueError(
                f"Expected at least one category along axis {axis}, got shape {ref.shape}."
            )
        if n == 0:
            raise ValueError(
                f"Expected at least one token, got shape {ref.shape} (no distributions along "
                f"the axes other than {axis})."
            )
        if self._vocab_size is not None and vocab != self._vocab_size:
            raise ValueError(
                f"Expected {self._vocab_size} categories (as in earlier updates), got {vocab} "
                f"along axis {axis} (shape {ref.shape})."
            )
        has_labels = labels is not None
        self._check_labels_presence(has_labels, "this update")

        tols = (_tolerances(names[0], vocab), _tolerances(names[1], vocab))
        keep = flat_labels = None
        if labels is not None:
            flat_labels, keep = _check_labels(labels, tokens, vocab, ignore_index, axis)
        r2 = np.moveaxis(ref, ax, -1).reshape(n, vocab)
        c2 = np.moveaxis(cand, ax, -1).reshape(n, vocab)

        rows = min(n, max(1, _BLOCK_ELEMENTS // vocab))
        starts = list(range(0, n, rows))

        def run(span_starts: list[int]) -> tuple[list[dict[str, np.ndarray]], tuple | None]:
            """Blocks in order on one thread; stops at the first bad row, returned with it."""
            scratch = np.empty((4, rows, vocab), dtype=np.float64)
            done: list[dict[str, np.ndarray]] = []
            for start in span_starts:
                stop = min(n, start + rows)
                idx = None
                xr, xc = r2[start:stop], c2[start:stop]
                lab = None
                if flat_labels is not None:
                    assert keep is not None
                    kb = keep[start:stop]
                    if not kb.all():
                        idx = start + np.flatnonzero(kb)
                        if idx.size == 0:
                            continue
                        xr, xc = r2[idx], c2[idx]
                    lab = flat_labels[start:stop] if idx is None else flat_labels[idx]
                try:
                    done.append(_block_values(xr, xc, forms, tols, lab, scratch))
                except _BadRow as e:
                    return done, (e, int(start + e.row if idx is None else idx[e.row]))
            return done, None

        # NumPy releases the GIL in its ufuncs and reductions, so contiguous runs of blocks on
        # a few threads use the cores; results are put back in token order.
        workers = min(_threads(), len(starts))
        if workers > 1:
            per = -(-len(starts) // workers)
            spans = [starts[i : i + per] for i in range(0, len(starts), per)]
            outcomes = list(_pool().map(run, spans))
        else:
            outcomes = [run(starts)]
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self._chunks}
        for done, bad in outcomes:
            if bad is not None:  # the earliest bad token: spans are in order
                e, token = bad
                x2 = r2 if e.side == "ref" else c2
                span = ""
                if token_offset and len(tokens) == 1:
                    token, tokens = token + token_offset, (token_offset + n,)
                    span = f" among tokens {token_offset}..{token_offset + n - 1}"
                raise _value_error(e, token, tokens, x2, keep, forms, span) from None
            for block in done:
                for k, v in block.items():
                    parts[k].append(v)

        with self._lock:
            if self._vocab_size is not None and vocab != self._vocab_size:
                raise ValueError(
                    f"Expected {self._vocab_size} categories (as in earlier updates), got "
                    f"{vocab} along axis {axis} (shape {ref.shape})."
                )
            self._check_labels_presence(has_labels, "this update")
            for k, v in parts.items():
                if v:
                    self._chunks[k].append(np.concatenate(v) if len(v) > 1 else v[0])
            if keep is not None:
                self._num_ignored += int(n - np.count_nonzero(keep))
            self._vocab_size = vocab
            self._has_labels = has_labels

    def _check_labels_presence(self, has_labels: bool, what: str) -> None:
        if self._has_labels is None or self._has_labels == has_labels:
            return
        if self._has_labels:
            raise ValueError(
                f"Expected `labels` in {what}: earlier updates had labels, and label "
                "statistics over a subset of the tokens would be misleading. Pass labels "
                "everywhere (ignore_index excludes tokens) or nowhere."
            )
        raise ValueError(
            f"Expected no `labels` in {what}: earlier updates had none, and label statistics "
            "over a subset of the tokens would be misleading. Use a separate TokenStats."
        )

    # --------------------------------------------------------------------------------- merge
    def merge(self, *others: TokenStats) -> TokenStats:
        """A new accumulator holding the tokens of ``self`` and ``others``; none is modified.

        The per-token arrays are shared, not copied (they are never modified in place). The
        merged report equals the report of one accumulator fed all the tokens, exactly.
        """
        out = TokenStats()
        for s in (self, *others):
            if not isinstance(s, TokenStats):
                raise TypeError(f"Expected TokenStats to merge, got {type(s).__name__}.")
            if s._vocab_size is None:
                continue
            if out._vocab_size is not None and s._vocab_size != out._vocab_size:
                raise ValueError(
                    f"Cannot merge statistics over {out._vocab_size} and {s._vocab_size} "
                    "categories: the vocabularies differ."
                )
            if out._has_labels is not None and s._has_labels != out._has_labels:
                raise ValueError(
                    "Cannot merge statistics with labels and statistics without labels: label "
                    "statistics over a subset of the tokens would be misleading."
                )
            for k, v in s._chunks.items():
                out._chunks[k].extend(v)
            out._num_ignored += s._num_ignored
            out._vocab_size, out._has_labels = s._vocab_size, s._has_labels
        return out

    # -------------------------------------------------------------------------------- report
    def report(self) -> KLReport:
        """Compute every statistic from the stored per-token values (see :class:`KLReport`)."""
        n = self.num_tokens
        if n == 0:
            why = (
                f"all {self._num_ignored} tokens seen had labels == ignore_index"
                if self._num_ignored
                else "call update() first"
            )
            raise ValueError(f"No tokens to report on: {why}.")
        kl = np.sort(self.values("kl"))
        kl_mean, kl_stderr = _mean_stderr(kl)
        agree = int(np.count_nonzero(self.values("top1")))
        f = agree / n
        kw: dict[str, Any] = {
            "num_tokens": n,
            "num_ignored": self._num_ignored,
            "kl_mean": kl_mean,
            "kl_stderr": kl_stderr,
            "kl_max": float(kl[-1]),
            "kl_num_inf": int(np.count_nonzero(kl == math.inf)),
            "kl_percentiles": _percentiles(kl),
            "top1_agreement": f,
            "top1_agreement_stderr": math.sqrt(f * (1.0 - f) / n),
        }
        if self._has_labels:
            kw.update(self._label_stats())
        return KLReport(**kw)

    def _label_stats(self) -> dict[str, Any]:
        dp = np.sort(self.values("dp"))
        nll_r = np.sort(self.values("nll_ref"))
        nll_c = np.sort(self.values("nll_cand"))
        dp_mean, dp_stderr = _mean_stderr(dp)
        mean_r, _ = _mean_stderr(nll_r)
        mean_c, _ = _mean_stderr(nll_c)
        ln_ratio: float | None
        ratio: float | None
        if math.isinf(mean_r) and math.isinf(mean_c):
            ln_ratio, ratio, ln_stderr = None, None, None
        else:
            ln_ratio = mean_c - mean_r
            ratio = _exp(ln_ratio)
            ln_stderr = math.inf
            if math.isfinite(mean_r) and math.isfinite(mean_c):
                diff = np.sort(self.values("nll_cand") - self.values("nll_ref"))
                ln_stderr = _mean_stderr(diff)[1]
        return {
            "dp_mean": dp_mean,
            "dp_stderr": dp_stderr,
            "dp_rms": math.sqrt(float(np.mean(dp * dp))),
            "dp_min": float(dp[0]),
            "dp_max": float(dp[-1]),
            "dp_percentiles": _percentiles(dp),
            "ppl_ref": _exp(mean_r),
            "ppl_cand": _exp(mean_c),
            "ppl_ratio": ratio,
            "ln_ppl_ratio": ln_ratio,
            "ln_ppl_ratio_stderr": ln_stderr,
        }


def _check_labels(
    labels: Any, tokens: tuple[int, ...], vocab: int, ignore_index: int, axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flat int64 labels and the keep mask (labels != ignore_index), after validation."""
    lab = _to_numpy(labels)
    if lab.dtype.kind not in "iu":
        raise TypeError(
            f"Expected `labels` to be an integer array of token ids, got dtype {lab.dtype}."
        )
    if lab.shape != tokens:
        raise ValueError(
            f"Expected `labels` to have the token shape {tokens} (the shape of `ref` without "
            f"axis {axis}), got {lab.shape}."
        )
    # compared in the labels' own dtype: cast first, a uint64 2**64 - 100 would read as -100
    flat = lab.reshape(-1)
    keep = flat != ignore_index
    bad = keep & ((flat < 0) | (flat >= vocab))
    if bad.any():
        i = _first(bad)
        raise ValueError(
            f"Expected `labels` in [0, {vocab}) or equal to ignore_index={ignore_index}, got "
            f"{int(flat[i])} at token index {_token_index(i, tokens)} "
            f"({int(np.count_nonzero(bad))} out of range)."
        )
    # every kept label is in [0, vocab) now; the ignored ones are never read
    return np.where(keep, flat, 0).astype(np.int64), keep


def _value_error(
    e: _BadRow,
    token: int,
    tokens: tuple[int, ...],
    x2: np.ndarray,
    keep: np.ndarray | None,
    forms: tuple[str, str],
    span: str = "",
) -> ValueError:
    where = _token_index(token, tokens)
    if e.nan:
        count = int(np.count_nonzero(np.isnan(x2 if keep is None else x2[keep])))
        hint = (
            " (only tokens with labels == ignore_index may hold NaN)"
            if keep is not None
            else " (pass labels with ignore_index to exclude padding tokens)"
        )
        return ValueError(
            f"`{e.side}` contains {count} NaN value{'s' if count != 1 else ''}{span}, the first in "
            f"the token at index {where}{hint}."
        )
    form = forms[0] if e.side == "ref" else forms[1]
    return ValueError(
        f"`{e.side}` (form={form!r}) is not a valid distribution at token index {where}: {e.what}."
    )
