"""Per-token values of one block of rows: the value checks, the log-probabilities of both
sides, KL with exact zero support, top-1 agreement and the label statistics; the input
conversion; the worker pool that runs blocks in parallel."""

from __future__ import annotations

import math
import os
from typing import Any, cast

import array_api_compat.numpy as _xp
import numpy as np

from .. import _check, _math
from .. import _namespace as ns

# Rows per block are chosen so that one float64 [rows, V] buffer holds about this many elements
# (2 MiB; update() keeps four such buffers, reused across blocks). Measured on 2048 x 32000
# float32 logits: 2^17 to 2^18 elements are fastest, 2^15 and 2^20 about 10 % slower; the exp
# dominates either way. Tests shrink it to exercise block boundaries.
BLOCK_ELEMENTS = 1 << 18

_POOL: Any = None


def threads() -> int:
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


def pool() -> Any:
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="kldiv-metrics")
    return _POOL


# --------------------------------------------------------------------------------------------
# Per-token values of one block of rows


class BadRow(Exception):
    """A block row that fails a value check (mapped to a token index by ``update``)."""

    def __init__(self, row: int, what: str, nan: bool = False):
        super().__init__(what)
        self.row, self.what, self.nan = row, what, nan
        self.side = ""  # set by the caller: "ref" or "cand"


def first(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def side(
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
    of :func:`kldiv._check.check_values` (``tols``: see ``tolerances``) on quantities computed
    anyway, and raises ``BadRow`` for the first bad row.
    """
    x = e if form == "probs" else lp
    np.copyto(x, xb, casting="unsafe")  # dtype checked to be real floating: exact
    top = np.argmax(x, axis=-1)
    hi = np.max(x, axis=-1, keepdims=True)  # NaN propagates through max
    if np.isnan(hi).any():
        raise BadRow(first(np.isnan(hi)), "", nan=True)
    tol, tol_lp = tols
    if form == "logits":
        if (hi == math.inf).any():
            raise BadRow(first(hi == math.inf), "it has a +inf logit")
        if (hi == -math.inf).any():
            raise BadRow(first(hi == -math.inf), "all its logits are -inf (no category has mass)")
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
            raise BadRow(first(hi > 0), "it has log-probabilities > 0")
        np.exp(lp, out=e)
        with np.errstate(divide="ignore"):  # a row of only -inf: log 0 = -inf, reported below
            lse = np.log(np.sum(e, axis=-1))
        bad = ~(np.abs(lse) <= tol_lp)
        if bad.any():
            r = first(bad)
            raise BadRow(
                r,
                "its probabilities (exp of log_probs) do not sum to 1 "
                f"(sum {math.exp(lse[r]):.9g}, tolerance {tol_lp:.1e})",
            )
        return lp, e, top
    lo = np.min(e, axis=-1)
    if (lo < 0).any():
        raise BadRow(first(lo < 0), "it has negative probabilities")
    total = np.sum(e, axis=-1)
    bad = ~(np.abs(total - 1) <= tol)
    if bad.any():
        r = first(bad)
        raise BadRow(
            r, f"its probabilities do not sum to 1 (sum {total[r]:.9g}, tolerance {tol:.1e})"
        )
    # Plain log: for p ≥ 0 it is kldiv._math.safe_log's value (log 0 = -inf); safe_log's
    # second where only protects gradients, which NumPy has not.
    with np.errstate(divide="ignore"):
        np.log(e, out=lp)
    return lp, e, top


def kl_block(lp: np.ndarray, lq: np.ndarray, p: np.ndarray, d: np.ndarray) -> np.ndarray:
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


def block_values(
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
        lp, p, top_r = side(xr, forms[0], tols[0], lp_buf, p_buf, want_p=True)
    except BadRow as e:
        e.side = "ref"
        raise
    try:
        lq, q, top_c = side(xc, forms[1], tols[1], lq_buf, q_buf, want_p=False)
    except BadRow as e:
        e.side = "cand"
        raise
    assert p is not None
    out = {"top1": top_r == top_c}
    if labels is not None:  # before kl_block overwrites q_buf
        rows = np.arange(labels.size)
        lp_y, lq_y = lp[rows, labels], lq[rows, labels]
        # The same formula on both sides, so that identical inputs give Δp = 0 exactly (the
        # normalised exp that p holds for logits differs from exp(lp) in the last bit).
        p_y = p[rows, labels] if forms[0] == "probs" else np.exp(lp_y)
        # (with form "probs" side returns q even when not asked for it)
        q_y = cast(np.ndarray, q)[rows, labels] if forms[1] == "probs" else np.exp(lq_y)
        out["dp"] = q_y - p_y
        out["nll_ref"] = -lp_y
        out["nll_cand"] = -lq_y
    out["kl"] = kl_block(lp, lq, p, q_buf)
    return out


# --------------------------------------------------------------------------------------------
# Input conversion


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy array from NumPy, PyTorch (any device), JAX or anything ``np.asarray`` takes."""
    if ns.is_torch_array(x):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; float32 holds it exactly
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def check_pair_shapes(ref_shape: tuple[int, ...], cand_shape: tuple[int, ...]) -> None:
    """``ValueError`` unless ``ref`` and ``cand`` have one shape with a category axis."""
    if not ref_shape or not cand_shape:
        raise ValueError(
            f"Expected `ref` and `cand` to have at least 1 dimension (the category axis), "
            f"got shapes {ref_shape} and {cand_shape}."
        )
    if ref_shape != cand_shape:
        raise ValueError(
            f"Expected `ref` and `cand` to have the same shape (one pair of distributions "
            f"per token), got {ref_shape} and {cand_shape}."
        )


def dtype_name(x: Any) -> str:
    dtype = getattr(x, "dtype", None)  # not `or`: a NumPy dtype is falsy (it has no fields)
    return str(np.asarray(x).dtype if dtype is None else dtype).rsplit(".", 1)[-1]


def tolerances(name: str, v: int) -> tuple[float, float]:
    """The value-check tolerances of ``kl_div(check=True)``, (probs, log_probs), for V = ``v``.

    The formulas of ``kldiv._check`` (its tolerance) and ``check_values``, from the dtype the caller
    passed (a torch bfloat16 tensor reaches NumPy as float32, but was rounded to bfloat16),
    which is known here only by name.
    """
    half = _check.HALF_ROUNDING.get(name)
    eps, tiny = half if half is not None else (float(np.finfo(np.dtype(name)).eps), 0.0)
    tol = 4 * eps + v * (tiny / 2 + float(np.finfo(np.float64).eps))
    # A log-probability rounded to the dtype is off by (eps/2)·|l|, which moves the total mass
    # by up to (eps/2)·H(p) ≤ (eps/2)·log V.
    return tol, tol + eps * math.log(v + 1)


def token_index(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()
