"""On-device streaming statistics of per-token KL(ref‖cand) as a torchmetrics ``Metric``.

:class:`TokenStatsMetric` is :class:`~kldiv.metrics.TokenStats` for training and evaluation
loops: ``update`` computes the per-token values on the device of the logits, only those
vectors (a few numbers per token) are kept, torchmetrics gathers them across DDP ranks, and
``compute`` hands them to :class:`~kldiv.metrics.TokenStats` for the report. Logits are never
copied to the host.

This module imports torchmetrics (``pip install "kldiv[torchmetrics]"``); ``import kldiv`` and
``import kldiv.torch`` do not import it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat.torch as _xp
import numpy as np
import torch
from torch.nn import Module
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from .. import _check
from .. import _namespace as ns
from .._defaults import Form, FormSpec
from ..divergences import kl_div
from ..metrics import blocks
from ..metrics.report import KLReport
from ..metrics.tokens import IGNORE_INDEX, TokenStats

__all__ = ["TokenStatsMetric"]

_MIXED_LABELS = (
    "Cannot merge statistics with labels and statistics without labels: label statistics "
    "over a subset of the tokens would be misleading."
)

# Rows per step of update() are chosen so that one [rows, V] temporary holds about this many
# elements (64 MiB in float32): large enough that a GPU step is not dominated by launches,
# small enough that the few temporaries of a step stay far below the logits' own size.
# Tests shrink it to exercise step boundaries.
CHUNK_ELEMENTS = 1 << 24

# The per-token states, each a list of 1-D tensors concatenated across ranks by torchmetrics.
# Without labels only "kl", "top1" and "vocab" (one entry per update) receive values.
_STATES = ("kl", "top1", "vocab", "keep", "dp", "nll_ref", "nll_cand")
_LABEL_STATES = ("keep", "dp", "nll_ref", "nll_cand")
# States with a dtype of their own: the vocabulary size of each update and the two flags. The
# others are held in the metric's dtype (float32 unless set_dtype), which a vocabulary size
# must not follow: float16 rounds 50257 to 50272 and 151936 to inf.
_FIXED_DTYPES = {"vocab": torch.int64, "top1": torch.bool, "keep": torch.bool}


class _Report:
    """Carries the report through torchmetrics' compute wrapper, which rebuilds dataclass
    results field by field and so refuses a frozen one such as KLReport."""

    __slots__ = ("report",)

    def __init__(self, report: KLReport) -> None:
        self.report = report


class TokenStatsMetric(Metric):
    """Per-token KL(ref‖cand), top-1 agreement, Δp and perplexities, on the device, for DDP.

    The torchmetrics form of :class:`~kldiv.metrics.TokenStats`: for every token i with
    reference distribution P_i (``ref``) and candidate Q_i (``cand``), :meth:`update` computes
    on the inputs' device

    * k_i = KL(P_i‖Q_i) = Σ_v p_v·(log p_v − log q_v) (direction KL(ref‖cand); terms with
      p_v = 0 count 0, p_v > 0 where q_v = 0 gives +inf, ``-inf`` logits are zero
      probabilities), by :func:`kldiv.kl_div`;
    * whether argmax(ref_i) == argmax(cand_i) (ties to the lowest index on both sides);
    * with ``labels`` y_i: Δp_i = Q_i(y_i) − P_i(y_i) and the negative log-likelihoods
      −log P_i(y_i), −log Q_i(y_i);

    and keeps only these per-token values, as torchmetrics list states that ``compute`` gathers
    across processes (``dist_reduce_fx="cat"``). :meth:`compute` returns the
    :class:`~kldiv.metrics.KLReport` that :meth:`TokenStats.report
    <kldiv.metrics.TokenStats.report>` gives for the same tokens: mean ± standard error, maximum
    and exact percentiles of KL, top-1 agreement, and with labels the Δp statistics and the
    perplexity ratio. Tokens whose label is ``ignore_index`` are excluded from every statistic
    and counted in ``num_ignored``; their rows are not read (they may hold NaN).

    Parameters
    ----------
    form : {"logits", "log_probs", "probs"} or a pair of them
        What ``ref`` and ``cand`` hold (default ``"logits"``); a pair gives them separately,
        e.g. ``("log_probs", "logits")``. The forms of :meth:`TokenStats.update
        <kldiv.metrics.TokenStats.update>`.
    ignore_index : int
        The label value that excludes a token (default -100).
    validate_args : bool
        Check the values as :class:`~kldiv.metrics.TokenStats` does (default True): NaN,
        +inf logits, rows of only -inf logits, probabilities or log-probabilities that are
        negative, positive or not normalised, labels out of ``[0, V)``. This reads one flag per
        update on the host (a device synchronisation). With False nothing is read on the host
        during ``update``; invalid values then give meaningless statistics (or, where they make
        a per-token value NaN, a ``ValueError`` from ``compute``) and an out-of-range label is
        read as label 0. Shape and dtype checks always run (they read no data).
    **kwargs
        Passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``,
        ``compute_on_cpu``, ``dist_sync_fn``, …).

    Notes
    -----
    Precision: each step converts its rows to float32 (float64 for float64 inputs) and
    computes in that dtype, so a float32 per-token KL is within a few float32 roundings of
    :class:`~kldiv.metrics.TokenStats`' float64 value: at most
    (log₂V + 4)·2⁻²³·Σ_v p_v·(1 + |log p_v| + |log q_v|)·(1 + |log p_v − log q_v|) per
    token, an absolute bound (about 3·10⁻⁵ for V = 32000 and entropy 6; about 10⁻⁷ is
    typical), so a per-token KL below about 10⁻⁶ has few correct digits. Float64 inputs
    (``ref.double()``) are computed in float64; ``set_dtype(torch.float64)`` alone changes
    only how the values are stored. Top-1 agreement and counts are exact. The per-token
    values are stored in the metric's dtype (float32 unless :meth:`set_dtype`; float16 turns
    values above 65504 into +inf), the flags as bool and the vocabulary sizes as int64 in
    any case; the statistics are computed from them in float64 by the same code as
    :meth:`TokenStats.report <kldiv.metrics.TokenStats.report>`.

    Memory: with labels four numbers per token in the metric's dtype (KL, Δp, two NLLs) and
    two bool flags (top-1, kept); without, KL and the top-1 flag; on the inputs' device (on
    the host with ``compute_on_cpu=True``). ``update`` works through the tokens in steps, so
    its temporaries stay near :data:`CHUNK_ELEMENTS` elements whatever the batch size.

    Every update passes ``labels`` or none does, and the vocabulary size V stays the same, as
    for :class:`~kldiv.metrics.TokenStats`; ``compute`` checks the same across ranks, and
    ``merge_state`` and ``load_state_dict`` (after ``persistent(True)``) check the states
    they bring in. Each rank should use the same metric dtype (torchmetrics gathers each
    state with one collective). ``compute`` with no tokens raises ``ValueError``, as
    :meth:`TokenStats.report <kldiv.metrics.TokenStats.report>` does; so does
    ``metric(ref, cand)`` (``forward``) on a batch whose tokens are all ignored, and then
    adds nothing: call :meth:`update` in the loop and :meth:`compute` at the end.

    Examples
    --------
    >>> import torch
    >>> from kldiv.torch.metrics import TokenStatsMetric
    >>> metric = TokenStatsMetric(form="logits")
    >>> g = torch.Generator().manual_seed(0)
    >>> for _ in range(3):  # e.g. evaluation batches of [batch, seq, V] logits
    ...     ref = torch.randn(2, 5, 11, generator=g)
    ...     cand = ref + 0.1 * torch.randn(2, 5, 11, generator=g)
    ...     labels = torch.randint(0, 11, (2, 5), generator=g)
    ...     labels[:, 0] = -100  # e.g. prompt tokens
    ...     metric.update(ref, cand, labels)
    >>> report = metric.compute()  # a kldiv.metrics.KLReport, gathered over DDP ranks
    >>> report.num_tokens, report.num_ignored
    (24, 6)
    >>> 0 < report.kl_mean < 0.05 and report.ppl_ratio is not None
    True
    >>> metric.reset()
    """

    is_differentiable = False
    higher_is_better: bool | None = None  # the value is a report, not one number
    full_state_update = False

    kl: list[torch.Tensor]
    top1: list[torch.Tensor]
    vocab: list[torch.Tensor]
    keep: list[torch.Tensor]
    dp: list[torch.Tensor]
    nll_ref: list[torch.Tensor]
    nll_cand: list[torch.Tensor]

    def __init__(
        self,
        form: FormSpec = "logits",
        *,
        ignore_index: int = IGNORE_INDEX,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        forms = _check.check_forms(form)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int | np.integer):
            raise TypeError(f"Expected `ignore_index` to be an int, got {ignore_index!r}.")
        validate_args = _check.check_flag("validate_args", validate_args)
        super().__init__(**kwargs)
        self.forms: tuple[Form, Form] = forms
        self.ignore_index = int(ignore_index)
        self.validate_args = validate_args
        for name in _STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        # this process's updates only; compute() checks the gathered states across ranks
        self._vocab_size: int | None = None
        self._has_labels: bool | None = None

    def __repr__(self) -> str:
        form = self.forms[0] if self.forms[0] == self.forms[1] else self.forms
        return (
            f"TokenStatsMetric(form={form!r}, ignore_index={self.ignore_index}, "
            f"validate_args={self.validate_args})"
        )

    # -------------------------------------------------------------------------------- update
    def update(
        self, ref: torch.Tensor, cand: torch.Tensor, labels: torch.Tensor | None = None
    ) -> None:
        """Add the tokens of one batch: ``ref`` holds the distributions P, ``cand`` Q.

        Parameters
        ----------
        ref, cand : torch.Tensor of shape (..., V)
            The same tokens from the reference and the candidate model, on one device, with a
            real floating dtype (float16, bfloat16, float32, float64) and the same shape. The
            last axis holds the V categories, every other axis indexes tokens. Detached: no
            gradient flows through the metric.
        labels : integer torch.Tensor of the token shape ``ref.shape[:-1]``, optional
            The correct token of each position, for the Δp and perplexity statistics; tokens
            whose label is ``ignore_index`` are excluded from every statistic.

        Raises
        ------
        TypeError
            ``ref``/``cand`` not tensors or not floating, ``labels`` not integer.
        ValueError
            The errors of :meth:`TokenStats.update <kldiv.metrics.TokenStats.update>`, with
            its messages: shapes, no tokens or categories, a vocabulary size or labels presence
            different from earlier updates, labels of the wrong shape, and (with
            ``validate_args``) labels out of range and invalid values. A failed update adds
            nothing.
        """
        for name, x in (("ref", ref), ("cand", cand)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"Expected `{name}` to be a torch.Tensor, got {type(x).__name__} "
                    "(kldiv.metrics.TokenStats takes NumPy and JAX arrays)."
                )
        dtype = ns.compute_dtype(_xp, ("ref", ref), ("cand", cand))  # TypeError: not floating
        blocks.check_pair_shapes(tuple(ref.shape), tuple(cand.shape))
        if ref.device != cand.device:
            raise ValueError(
                f"Expected `ref` and `cand` on the same device, got {ref.device} and {cand.device}."
            )
        shape = tuple(ref.shape)
        vocab, tokens = shape[-1], shape[:-1]
        n = math.prod(tokens)
        if vocab == 0:
            raise ValueError(f"Expected at least one category along axis -1, got shape {shape}.")
        if n == 0:
            raise ValueError(
                f"Expected at least one token, got shape {shape} (no distributions along "
                "the axes other than -1)."
            )
        if self._vocab_size is not None and vocab != self._vocab_size:
            raise ValueError(
                f"Expected {self._vocab_size} categories (as in earlier updates), got {vocab} "
                f"along axis -1 (shape {shape})."
            )
        self._check_labels_presence(labels is not None)

        device = ref.device
        keep = lab = None
        bad_label = torch.zeros((), dtype=torch.bool, device=device)
        if labels is not None:
            keep, lab, bad_label = self._labels(labels, tokens, vocab, device)
        r2 = ref.detach().reshape(n, vocab)
        c2 = cand.detach().reshape(n, vocab)

        rows = min(n, max(1, CHUNK_ELEMENTS // vocab))
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in _STATES}
        codes: list[tuple[torch.Tensor, torch.Tensor]] = []
        acc = _widest(device)
        tols = (
            blocks.tolerances(blocks.dtype_name(ref), vocab),
            blocks.tolerances(blocks.dtype_name(cand), vocab),
        )
        for start in range(0, n, rows):
            xr, xc = r2[start : start + rows], c2[start : start + rows]
            k = None if keep is None else keep[start : start + rows]
            kl = kl_div(xr, xc, form=self.forms, reduction="none", mask=k)
            parts["kl"].append(kl.masked_fill(kl <= 0, 0.0))  # rounding or -0.0: KL ≥ 0
            parts["top1"].append(xr.argmax(-1) == xc.argmax(-1))
            if lab is not None:
                y = lab[start : start + rows, None]
                lp, p = _at_label(xr, y, self.forms[0], dtype)
                lq, q = _at_label(xc, y, self.forms[1], dtype)
                parts["dp"].append(q - p)
                parts["nll_ref"].append(-lp)
                parts["nll_cand"].append(-lq)
            if self.validate_args:
                codes.append(
                    (
                        _bad_rows(xr, self.forms[0], tols[0], acc),
                        _bad_rows(xc, self.forms[1], tols[1], acc),
                    )
                )

        if self.validate_args:
            bad_r = torch.cat([c[0] for c in codes])
            bad_c = torch.cat([c[1] for c in codes])
            bad = (bad_r != 0) | (bad_c != 0)
            if keep is not None:
                bad &= keep
            # one read from the device per update: both flags at once
            flags = torch.stack([bad_label.any(), bad.any()]).tolist()
            if flags[0]:
                raise self._label_error(labels, bad_label, tokens, vocab)
            if flags[-1]:
                raise self._value_error(bad, bad_r, bad_c, r2, c2, keep, tokens, tols, acc)

        self._commit(parts, keep, vocab, device)

    def _commit(
        self,
        parts: dict[str, list[torch.Tensor]],
        keep: torch.Tensor | None,
        vocab: int,
        device: torch.device,
    ) -> None:
        for name in ("kl", "top1", "dp", "nll_ref", "nll_cand"):
            if parts[name]:
                dtype = _FIXED_DTYPES.get(name, self.dtype)
                getattr(self, name).append(torch.cat(parts[name]).to(dtype))
        if keep is not None:
            self.keep.append(keep)
        self.vocab.append(torch.full((1,), vocab, dtype=torch.int64, device=device))
        self._vocab_size = vocab
        self._has_labels = keep is not None

    def _check_labels_presence(self, has_labels: bool) -> None:
        if self._has_labels is None or self._has_labels == has_labels:
            return
        if self._has_labels:
            raise ValueError(
                "Expected `labels` in this update: earlier updates had labels, and label "
                "statistics over a subset of the tokens would be misleading. Pass labels "
                "everywhere (ignore_index excludes tokens) or nowhere."
            )
        raise ValueError(
            "Expected no `labels` in this update: earlier updates had none, and label "
            "statistics over a subset of the tokens would be misleading. Use a separate metric."
        )

    def _labels(
        self, labels: Any, tokens: tuple[int, ...], vocab: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The keep mask, labels safe to index with (ignored and out-of-range ones read 0)
        and the out-of-range mask, flat, on ``device``; no data is read on the host."""
        lab = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
        if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
            raise TypeError(
                "Expected `labels` to be an integer array of token ids, got dtype "
                f"{str(lab.dtype).rsplit('.', 1)[-1]}."
            )
        if tuple(lab.shape) != tokens:
            raise ValueError(
                f"Expected `labels` to have the token shape {tokens} (the shape of `ref` "
                f"without axis -1), got {tuple(lab.shape)}."
            )
        keep, wide = _keep_and_widen(lab.detach().reshape(-1).to(device), self.ignore_index)
        bad = keep & ((wide < 0) | (wide >= vocab))
        safe = torch.where(keep & ~bad, wide, 0)
        return keep, safe, bad

    def _label_error(
        self, labels: Any, bad: torch.Tensor, tokens: tuple[int, ...], vocab: int
    ) -> ValueError:
        i = int(bad.nonzero()[0, 0])
        label = torch.as_tensor(labels).reshape(-1)[i]
        # a uint64 label ≥ 2**63 has no int64 value (and int() of it overflows): its bits do
        value = int(label.view(torch.int64)) % 2**64 if label.dtype == torch.uint64 else int(label)
        return ValueError(
            f"Expected `labels` in [0, {vocab}) or equal to ignore_index={self.ignore_index}, "
            f"got {value} at token index {blocks.token_index(i, tokens)} "
            f"({int(bad.sum())} out of range)."
        )

    def _value_error(
        self,
        bad: torch.Tensor,
        bad_r: torch.Tensor,
        bad_c: torch.Tensor,
        r2: torch.Tensor,
        c2: torch.Tensor,
        keep: torch.Tensor | None,
        tokens: tuple[int, ...],
        tols: tuple[tuple[float, float], tuple[float, float]],
        acc: torch.dtype,
    ) -> ValueError:
        """The message of TokenStats for the first bad token (``ref`` before ``cand``)."""
        i = int(bad.nonzero()[0, 0])
        where = blocks.token_index(i, tokens)
        is_ref = bool(bad_r[i] != 0)
        side, x2, code = ("ref", r2, int(bad_r[i])) if is_ref else ("cand", c2, int(bad_c[i]))
        form = self.forms[0] if is_ref else self.forms[1]
        if code == 1:
            count = int(torch.isnan(x2 if keep is None else x2[keep]).sum())
            hint = (
                " (only tokens with labels == ignore_index may hold NaN)"
                if keep is not None
                else " (pass labels with ignore_index to exclude padding tokens)"
            )
            return ValueError(
                f"`{side}` contains {count} NaN value{'s' if count != 1 else ''}, the first in "
                f"the token at index {where}{hint}."
            )
        tol, tol_lp = tols[0] if is_ref else tols[1]
        row = x2[i].to(acc)
        if form == "logits":
            what = (
                "it has a +inf logit"
                if code == 2
                else "all its logits are -inf (no category has mass)"
            )
        elif form == "log_probs":
            what = (
                "it has log-probabilities > 0"
                if code == 2
                else "its probabilities (exp of log_probs) do not sum to 1 "
                f"(sum {math.exp(float(torch.logsumexp(row, -1))):.9g}, "
                f"tolerance {tol_lp:.1e})"
            )
        else:
            what = (
                "it has negative probabilities"
                if code == 2
                else "its probabilities do not sum to 1 "
                f"(sum {float(row.sum()):.9g}, tolerance {tol:.1e})"
            )
        return ValueError(
            f"`{side}` (form={form!r}) is not a valid distribution at token index {where}: {what}."
        )

    # ------------------------------------------------------------------------------- compute
    def compute(self) -> KLReport:
        """The :class:`~kldiv.metrics.KLReport` of every token so far, on every rank.

        Gathers the per-token values of all ranks (torchmetrics, ``sync_on_compute``), moves
        them to the host and computes the statistics with :meth:`TokenStats.report
        <kldiv.metrics.TokenStats.report>`. Raises ``ValueError`` when there are no tokens
        (``"No tokens to report on: …"``) or when ranks disagree on V or on labels.
        """
        return self._stats().report()

    def _wrap_compute(self, compute: Callable) -> Callable:
        # torchmetrics' wrapper (sync, cache, warnings) runs around a KLReport it cannot see
        wrapped = super()._wrap_compute(lambda: _Report(compute()))
        return functools.wraps(compute)(lambda: wrapped().report)

    def token_stats(self) -> TokenStats:
        """The tokens so far as a :class:`~kldiv.metrics.TokenStats`, gathered like
        :meth:`compute`: for :func:`~kldiv.metrics.extended_report`, ``values()``, or merging
        with statistics computed elsewhere."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
            return self._stats()

    def _stats(self) -> TokenStats:
        """A TokenStats holding the (gathered) per-token values; only these reach the host."""
        kl = _host(self.kl)
        top1 = _host(self.top1, torch.bool)
        vocabs = _host(self.vocab, torch.int64)  # one entry per update, in rank order once gathered
        other = vocabs[vocabs != vocabs[0]] if vocabs.size else vocabs
        if other.size:
            raise ValueError(
                f"Cannot merge statistics over {int(vocabs[0])} and {int(other[0])} "
                "categories: the vocabularies differ."
            )
        kept = _host(self.keep, torch.bool)
        values = {"kl": kl, "top1": top1}
        num_ignored = 0
        if kept.size > 0:
            if kept.size != kl.size:
                raise ValueError(_MIXED_LABELS)
            num_ignored = int(kept.size - np.count_nonzero(kept))
            values = {"kl": kl[kept], "top1": top1[kept]}
            values.update({k: _host(getattr(self, k))[kept] for k in _LABEL_STATES[1:]})
        return TokenStats.from_values(
            values, vocab_size=int(vocabs[0]) if vocabs.size else None, num_ignored=num_ignored
        )

    def reset(self) -> None:
        """Forget every token (the states and the vocabulary size and labels presence)."""
        super().reset()
        self._vocab_size = None
        self._has_labels = None

    # ----------------------------------------------------------------- torchmetrics lifecycle
    # torchmetrics' forward resets the metric, updates and computes on the batch alone, then
    # adds the saved states back: the checks of update() would compare the batch with nothing
    # (the vocabulary size and labels presence are reset too), and a failure in update or
    # compute would leave the metric reset, its tokens lost. This forward never resets: the
    # batch is added by update() against the accumulated tokens, computed alone from the
    # entries it appended, and a failure puts back the state as it was before the call.

    @torch.jit.unused
    def forward(self, *args: Any, **kwargs: Any) -> KLReport:
        """``metric(ref, cand, labels)``: :meth:`update` with the batch, and the batch's own
        report (gathered across ranks only with ``dist_sync_on_step=True``).

        The checks are those of :meth:`update`, against the tokens accumulated so far. A call
        that raises, an invalid batch or one whose tokens are all ignored (it has no report),
        adds nothing.
        """
        if self._is_synced:
            raise TorchMetricsUserError(
                "The Metric shouldn't be synced when performing ``forward``. HINT: Did you "
                "forget to call ``unsync`` ?."
            )
        before = {name: _as_list(getattr(self, name)) for name in self._defaults}
        context = (self._update_count, self._vocab_size, self._has_labels)
        try:
            self.update(*args, **kwargs)
            for name, old in before.items():  # the batch's own entries: update appends
                setattr(self, name, _as_list(getattr(self, name))[len(old) :])
            self._to_sync = self.dist_sync_on_step
            value = self.compute()
        except BaseException:
            for name, old in before.items():
                setattr(self, name, old)
            self._update_count, self._vocab_size, self._has_labels = context
            self._is_synced, self._cache = False, None  # a compute that failed while synced
            raise
        finally:
            self._to_sync = self.sync_on_compute
            self._computed = None  # the batch's report is not the accumulated one
        for name, old in before.items():
            setattr(self, name, old + _as_list(getattr(self, name)))
        self._forward_cache = value  # type: ignore[assignment]  # torchmetrics types it None
        return value

    def _wrap_update(self, update: Callable) -> Callable:
        # torchmetrics counts an update before it runs: a failed one adds nothing, count included
        wrapped = super()._wrap_update(update)

        @functools.wraps(update)
        def counted(*args: Any, **kwargs: Any) -> None:
            count = self._update_count
            try:
                wrapped(*args, **kwargs)
            except BaseException:
                self._update_count = count
                raise

        return counted

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> Module:
        if not self._dtype_convert:  # .to(device), .to(dtype) (floating tensors only), …
            return super()._apply(fn, exclude_state)
        # set_dtype converts every tensor state with Tensor.type: the vocabulary sizes and the
        # flags keep their dtypes (they only follow a change of device)
        skip = [name for name in _FIXED_DTYPES if name not in exclude_state]
        this = super()._apply(fn, [*exclude_state, *skip])
        for name in skip:
            moved = [t.to(fn(t.new_zeros(0)).device) for t in _as_list(getattr(this, name))]
            setattr(this, name, moved)
        return this

    def _sync_dist(
        self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None
    ) -> None:
        # A rank without tokens sends torchmetrics' placeholder for an empty list state, an
        # empty tensor in the metric's dtype: the vocabulary sizes and flags need theirs in
        # their own dtypes (each rank receives into buffers like its own). unsync() restores
        # the states from torchmetrics' copy made before this.
        for name, dtype in _FIXED_DTYPES.items():
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                setattr(self, name, [torch.zeros(0, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # after persistent(True): the vocabulary size and labels presence that update() checks
        # against come from the loaded states, which must be consistent
        before = {name: getattr(self, name) for name in self._defaults}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        try:
            self._adopt_states()
        except ValueError as e:
            for name, old in before.items():
                setattr(self, name, old)
            error_msgs.append(f"{type(self).__name__}: {e}")

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """torchmetrics' ``merge_state``, checked as :meth:`TokenStats.merge
        <kldiv.metrics.TokenStats.merge>` is: ``ValueError`` (and nothing merged) when the
        vocabulary sizes or the labels presence differ."""
        before = {name: _as_list(getattr(self, name)) for name in self._defaults}
        try:
            super().merge_state(incoming_state)
            self._adopt_states()
        except BaseException:
            for name, old in before.items():
                setattr(self, name, old)
            raise

    def _adopt_states(self) -> None:
        """Take the vocabulary size and labels presence from the local states (loaded or
        merged ones), as list states in their dtypes, after checking that they hold one value
        per token in each statistic and one vocabulary size."""
        states = {name: _as_list(getattr(self, name)) for name in self._defaults}
        for name, dtype in _FIXED_DTYPES.items():
            states[name] = [t.to(dtype) for t in states[name]]
        count = {name: sum(int(t.numel()) for t in ts) for name, ts in states.items()}
        n = count["kl"]
        vocab: int | None = None
        has_labels: bool | None = None
        if count["vocab"]:
            sizes = _host(states["vocab"], torch.int64)
            other = sizes[sizes != sizes[0]]
            if other.size:
                raise ValueError(
                    f"Cannot merge statistics over {int(sizes[0])} and {int(other[0])} "
                    "categories: the vocabularies differ."
                )
            if 0 < count["keep"] != n:
                raise ValueError(_MIXED_LABELS)
            vocab, has_labels = int(sizes[0]), count["keep"] > 0
        want = {"top1": n, **{k: n if has_labels else 0 for k in _LABEL_STATES}}
        wrong = sorted(k for k, m in want.items() if count[k] != m)
        if wrong or (vocab is None) != (n == 0) or (vocab is not None and vocab < 1):
            raise ValueError(
                f"Expected states with one value per token in each statistic and a vocabulary "
                f"size ≥ 1 per update, got {count}."
            )
        for name, ts in states.items():
            setattr(self, name, ts)
        self._vocab_size, self._has_labels = vocab, has_labels
        # torchmetrics keeps both as they were: a cached report, and a count of 0 after loading
        # into a fresh metric (compute() would warn that update() was never called)
        self._computed = None
        self._update_count = count["vocab"]  # one vocabulary entry per update


# --------------------------------------------------------------------------------------------
# Per-token values and checks of one step of rows, on the device


def _at_label(
    x: torch.Tensor, y: torch.Tensor, form: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """log P(y) and P(y) of each row, computed in ``dtype``, by TokenStats' formulas."""
    x_y = x.gather(-1, y).squeeze(-1).to(dtype)
    if form == "probs":
        return torch.log(x_y), x_y
    if form == "logits":
        hi = x.amax(-1)
        # (x − max) − log Σ exp(x − max), as TokenStats: the row max is exact in any dtype
        total = (x.to(dtype) - hi.to(dtype)[:, None]).exp_().sum(-1)
        x_y = (x_y - hi.to(dtype)) - torch.log(total)
    return x_y, torch.exp(x_y)


def _bad_rows(
    x: torch.Tensor, form: str, tols: tuple[float, float], acc: torch.dtype
) -> torch.Tensor:
    """Per row: 0 valid, 1 NaN, 2 and 3 the form's two other checks in TokenStats' order."""
    hi = x.amax(-1)  # NaN propagates through amax
    nan = torch.isnan(hi)
    tol, tol_lp = tols
    if form == "logits":
        second, third = hi == math.inf, hi == -math.inf
    elif form == "log_probs":
        second = hi > 0
        third = ~(torch.logsumexp(x.to(acc), -1).abs() <= tol_lp)
    else:
        second = x.amin(-1) < 0
        third = ~((x.to(acc).sum(-1) - 1).abs() <= tol)
    zero = torch.zeros((), dtype=torch.int8, device=x.device)
    code = torch.where(third, torch.full_like(zero, 3), zero)
    code = torch.where(second, torch.full_like(zero, 2), code)
    return torch.where(nan, torch.full_like(zero, 1), code)


def _widest(device: torch.device) -> torch.dtype:
    """The dtype sums of probabilities accumulate in: float64 wherever the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _host(
    state: list[torch.Tensor] | torch.Tensor, dtype: torch.dtype = torch.float64
) -> np.ndarray:
    """A NumPy vector of a list state (a tensor once torchmetrics has gathered it), by default
    float64; flags (``torch.bool``) and vocabulary sizes (``torch.int64``) keep their kind."""
    if isinstance(state, list):
        if not state:
            return torch.zeros(0, dtype=dtype).numpy()
        state = torch.cat([s.reshape(-1) for s in state]) if len(state) > 1 else state[0]
    return state.detach().reshape(-1).to("cpu", dtype).numpy()


def _as_list(state: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """A state as a list of tensors (a loaded or merged state may be one tensor)."""
    return list(state) if isinstance(state, list | tuple) else [state]


def _keep_and_widen(flat: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keep mask (label != ignore_index) and the labels as int64, compared by value.

    Not in the labels' own dtype, where torch wraps the other operand: a uint8 label 156
    would equal -100, an int16 4464 would equal 70000, and a uint8 label could never reach
    V = 300. int64 holds every label value but a uint64 one ≥ 2**63: those are read through
    their bits, as negative int64 values (out of range, like TokenStats says), and compared
    with ignore_index in the same bits.
    """
    if flat.dtype == torch.uint64:
        wide = flat.view(torch.int64)
        bits = ignore_index - 2**64 if ignore_index >= 2**63 else ignore_index
        comparable = 0 <= ignore_index < 2**64
    else:
        wide = flat.to(torch.int64)
        bits = ignore_index
        comparable = -(2**63) <= ignore_index < 2**63
    if not comparable:  # no label can equal it
        return torch.ones_like(wide, dtype=torch.bool), wide
    return wide != bits, wide
