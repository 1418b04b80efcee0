"""The accumulator :class:`TokenStats`: validation, blocks of rows in parallel, merging, and
the report."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from typing import Any, get_args

import array_api_compat.numpy as _xp
import numpy as np

from .. import _check
from .. import _namespace as ns
from .._defaults import FormSpec, LabelStatistic, PlainStatistic, Statistic
from . import blocks, report
from .report import KLReport

Array = Any

IGNORE_INDEX = -100
"""The label value that marks a token to skip (PyTorch's ``cross_entropy`` default)."""

_STATS_PLAIN: tuple[PlainStatistic, ...] = get_args(PlainStatistic)
_STATS_LABELS: tuple[LabelStatistic, ...] = get_args(LabelStatistic)

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

    @classmethod
    def from_values(
        cls,
        values: Mapping[str, Array],
        *,
        vocab_size: int | None,
        num_ignored: int = 0,
    ) -> TokenStats:
        """Statistics from per-token values computed elsewhere, e.g. on a device by
        :class:`kldiv.torch.metrics.TokenStatsMetric`: ``values`` maps ``"kl"`` and ``"top1"``
        and, for statistics with labels, ``"dp"``, ``"nll_ref"`` and ``"nll_cand"`` to 1-D
        arrays over the same kept tokens (the names of :meth:`values`); ``num_ignored``
        counts the tokens whose label was ``ignore_index``; ``vocab_size`` None only when
        there are no tokens.

        The values must lie where :meth:`update` can put them: KL ≥ 0 or +inf, top-1 bool
        (or 0/1), NLL ≥ 0 or +inf and Δp in [-1, 1], the last two up to the normalisation
        tolerance that ``form="probs"`` inputs are allowed for V = ``vocab_size`` categories
        (a probability may exceed 1 by that much); NaN nowhere. ``TypeError`` for arguments
        of the wrong type (non-numeric arrays, a non-int count), ``ValueError`` otherwise.
        """
        if not isinstance(values, Mapping):
            raise TypeError(
                f"Expected `values` to be a dict of per-token arrays, got {type(values).__name__}."
            )
        names = set(values)
        has_labels = set(_STATS_LABELS) <= names
        want = set(_STATS_PLAIN) | (set(_STATS_LABELS) if has_labels else set())
        if names != want:
            raise ValueError(
                f"Expected `values` to hold {sorted(want)}, got {sorted(names, key=str)}: every "
                "plain statistic, and the label statistics all or none."
            )
        vocab = None if vocab_size is None else _check_count("vocab_size", vocab_size, 1)
        ignored = _check_count("num_ignored", num_ignored, 0)
        arrays: dict[str, np.ndarray] = {k: _per_token_array(k, values[k]) for k in sorted(want)}
        sizes = {a.size for a in arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"Expected `values` of one length, got lengths {sorted(sizes)}.")
        if ignored and not has_labels:
            raise ValueError("`num_ignored` counts ignored labels: the values have none.")
        stats = cls()
        if vocab is None:
            if sizes != {0} or ignored:
                raise ValueError("`vocab_size` is needed for statistics over tokens.")
            return stats
        _check_domains(arrays, vocab)
        stats._vocab_size = vocab
        stats._has_labels = has_labels
        stats._num_ignored = ignored
        for k, a in arrays.items():
            if a.size:
                stats._chunks[k].append(a.astype(bool if k == "top1" else np.float64))
        return stats

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
        names = (
            blocks.dtype_name(ref),
            blocks.dtype_name(cand),
        )  # before a torch bfloat16 becomes float32
        ref, cand = blocks.to_numpy(ref), blocks.to_numpy(cand)
        ns.compute_dtype(_xp, ("ref", ref), ("cand", cand))  # TypeError for non-floating
        blocks.check_pair_shapes(ref.shape, cand.shape)
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

        tols = (blocks.tolerances(names[0], vocab), blocks.tolerances(names[1], vocab))
        keep = flat_labels = None
        if labels is not None:
            flat_labels, keep = _check_labels(labels, tokens, vocab, ignore_index, axis)
        r2 = np.moveaxis(ref, ax, -1).reshape(n, vocab)
        c2 = np.moveaxis(cand, ax, -1).reshape(n, vocab)

        rows = min(n, max(1, blocks.BLOCK_ELEMENTS // vocab))
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
                    done.append(blocks.block_values(xr, xc, forms, tols, lab, scratch))
                except blocks.BadRow as e:
                    return done, (e, int(start + e.row if idx is None else idx[e.row]))
            return done, None

        # NumPy releases the GIL in its ufuncs and reductions, so contiguous runs of blocks on
        # a few threads use the cores; results are put back in token order.
        workers = min(blocks.threads(), len(starts))
        if workers > 1:
            per = -(-len(starts) // workers)
            spans = [starts[i : i + per] for i in range(0, len(starts), per)]
            outcomes = list(blocks.pool().map(run, spans))
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
        kl_mean, kl_stderr = report.mean_stderr(kl)
        agree = int(np.count_nonzero(self.values("top1")))
        f = agree / n
        kw: dict[str, Any] = {
            "num_tokens": n,
            "num_ignored": self._num_ignored,
            "kl_mean": kl_mean,
            "kl_stderr": kl_stderr,
            "kl_max": float(kl[-1]),
            "kl_num_inf": int(np.count_nonzero(kl == math.inf)),
            "kl_percentiles": report.percentiles(kl),
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
        dp_mean, dp_stderr = report.mean_stderr(dp)
        mean_r, _ = report.mean_stderr(nll_r)
        mean_c, _ = report.mean_stderr(nll_c)
        ln_ratio: float | None
        ratio: float | None
        if math.isinf(mean_r) and math.isinf(mean_c):
            ln_ratio, ratio, ln_stderr = None, None, None
        else:
            ln_ratio = mean_c - mean_r
            ratio = report.exp_or_inf(ln_ratio)
            ln_stderr = math.inf
            if math.isfinite(mean_r) and math.isfinite(mean_c):
                diff = np.sort(self.values("nll_cand") - self.values("nll_ref"))
                ln_stderr = report.mean_stderr(diff)[1]
        return {
            "dp_mean": dp_mean,
            "dp_stderr": dp_stderr,
            "dp_rms": math.sqrt(float(np.mean(dp * dp))),
            "dp_min": float(dp[0]),
            "dp_max": float(dp[-1]),
            "dp_percentiles": report.percentiles(dp),
            "ppl_ref": report.exp_or_inf(mean_r),
            "ppl_cand": report.exp_or_inf(mean_c),
            "ppl_ratio": ratio,
            "ln_ppl_ratio": ln_ratio,
            "ln_ppl_ratio_stderr": ln_stderr,
        }


def _check_count(name: str, value: Any, minimum: int) -> int:
    """An int argument of :meth:`TokenStats.from_values` (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"Expected `{name}` to be an int, got {value!r}.")
    if value < minimum:
        what = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"Expected `{name}` to be a {what} int, got {int(value)}.")
    return int(value)


def _per_token_array(name: str, value: Any) -> np.ndarray:
    """One array of ``values``: 1-D and real numeric (``"top1"`` may be bool)."""
    a = blocks.to_numpy(value)
    kinds = "biuf" if name == "top1" else "iuf"
    if a.dtype.kind not in kinds:
        what = "a bool or real numeric" if name == "top1" else "a real numeric"
        raise TypeError(f"Expected `values[{name!r}]` to be {what} array, got dtype {a.dtype}.")
    if a.ndim != 1:
        raise ValueError(
            f"Expected `values[{name!r}]` to be 1-D (one value per token), got shape {a.shape}."
        )
    return a


def _check_domains(arrays: dict[str, np.ndarray], vocab: int) -> None:
    """The per-token values must be ones :meth:`TokenStats.update` can produce (NaN nowhere).

    With ``form="probs"`` a row passes when its sum is within the tolerance τ of 1, so a label
    probability can be up to 1 + τ: NLL ≥ −log(1 + τ), |Δp| ≤ 1 + τ. τ is the largest
    tolerance of any input dtype for ``vocab`` categories, doubled for the rounding of a value
    stored in a narrower dtype (e.g. a metric's bfloat16 states).
    """
    tau = 2 * max(blocks.tolerances(d, vocab)[0] for d in ("float16", "bfloat16", "float32"))
    with np.errstate(invalid="ignore"):
        for name, a in arrays.items():
            if name == "kl":
                bad, what = ~(a >= 0), "KL divergences ≥ 0 or +inf"
            elif name == "top1":
                if a.dtype.kind == "b":
                    continue
                bad, what = ~((a == 0) | (a == 1)), "top-1 agreements (bool, or 0 and 1)"
            elif name == "dp":
                bad, what = ~(np.abs(a) <= 1 + tau), f"Δp in [-1, 1] (±{tau:.1e})"
            else:
                bound = -math.log1p(tau)
                bad, what = ~(a >= bound), f"negative log-likelihoods ≥ 0 ({bound:.1e}) or +inf"
            if bad.any():
                i = blocks.first(bad)
                raise ValueError(
                    f"Expected `values[{name!r}]` to hold {what}, got {a[i].item()!r} at index {i} "
                    f"({int(np.count_nonzero(bad))} such values)."
                )


def _check_labels(
    labels: Any, tokens: tuple[int, ...], vocab: int, ignore_index: int, axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flat int64 labels and the keep mask (labels != ignore_index), after validation."""
    lab = blocks.to_numpy(labels)
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
        i = blocks.first(bad)
        raise ValueError(
            f"Expected `labels` in [0, {vocab}) or equal to ignore_index={ignore_index}, got "
            f"{int(flat[i])} at token index {blocks.token_index(i, tokens)} "
            f"({int(np.count_nonzero(bad))} out of range)."
        )
    # every kept label is in [0, vocab) now; the ignored ones are never read
    return np.where(keep, flat, 0).astype(np.int64), keep


def _value_error(
    e: blocks.BadRow,
    token: int,
    tokens: tuple[int, ...],
    x2: np.ndarray,
    keep: np.ndarray | None,
    forms: tuple[str, str],
    span: str = "",
) -> ValueError:
    where = blocks.token_index(token, tokens)
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
