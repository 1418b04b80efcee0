"""The ``kldiv`` command (also ``python -m kldiv``): ``demo``, ``compare``, ``llama-base``,
``teacher-topk``, ``bench`` and ``info``.

Every error a user can cause (a missing or corrupt file, mismatched shapes, invalid values, an
output directory that exists, an optional package that is not installed) prints one line,
``kldiv <command>: error: <file>: <problem>``, and exits with status 2, leaving no partial
output behind. SIGTERM and SIGHUP, like Ctrl-C, remove a partly written output directory; the
status is then 128 + the signal's number.

``compare`` and ``info`` run on the base install. ``demo`` trains with PyTorch and needs
``pip install "kldiv[torch,cli]"`` (``demo --no-train`` runs on the base install); ``bench``
needs ``pip install "kldiv[torch]"``; ``llama-base`` and ``compare --model`` run Hugging Face
models and need ``pip install "kldiv[hf]"`` (see :mod:`kldiv.cli.hf`); ``teacher-topk`` stores
a teacher's top-k log-probabilities for offline distillation (:mod:`kldiv.cli.topk`), from a
Hugging Face model (``kldiv[hf]``) or a logits file (``kldiv[torch,cli]``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import platform
import secrets
import shutil
import signal
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

import kldiv

# The inputs of three worked examples that users meet today: the TensorFlow tutorial's KL
# from softmax cross-entropies, the Keras answer's sparsity regularizer and the MXNet Gluon
# tutorial's KLDivLoss. Their reported numbers are printed beside kldiv's.
TF_LOGITS_P = [[0.05, 0.16, 0.9], [0.8, 4.15, 0.05]]
TF_LOGITS_Q = [[0.7, 0.2, 0.1], [0.15, 0.9, 0.05]]
TF_REPORTED = [0.1879, 0.4534]
MX = {
    1: [0.2, 0.5, 0.2, 0.1],
    2: [0.3, 0.4, 0.1, 0.2],
    3: [0.1, 0.1, 0.1, 0.7],
    4: [0.0, 0.9, 0.0, 0.1],
}
MX_LOGITS_1 = [0.39056206, 1.3068528, 0.39056206, -0.30258512]  # softmax ≈ dist_1
KERAS_TARGET, KERAS_WEIGHT = 0.05, 0.01


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else ("nan" if math.isnan(x) else f"{x:.6f}")


class UsageError(Exception):
    """A problem with the user's input; printed as one line, exit status 2."""


def worked_examples(out: TextIO | None = None) -> int:
    """Print three worked examples from other libraries' docs beside kldiv's values: the
    TensorFlow tutorial's softmax-cross-entropy KL, the MXNet Gluon tutorial's ``KLDivLoss``
    and the Keras answer's sparsity regularizer."""
    out = out or sys.stdout
    w = lambda s="": print(s, file=out)  # noqa: E731
    w("kldiv demo: three worked examples from other libraries' docs, recomputed with kldiv")
    w("(kldiv.kl_div(p, q) is KL(P‖Q) = Σ p·(log p − log q), p the reference, q the model)")
    w()
    w("1. TensorFlow tutorial, KL from softmax cross-entropies: KL(softmax(a)‖softmax(b)) per row")
    kl_tf = kldiv.kl_div(
        np.array(TF_LOGITS_P), np.array(TF_LOGITS_Q), form="logits", reduction="none"
    )
    w(f"   {'row':<5}{'tutorial':<15}{'kldiv':<12}")
    for i, (rep, got) in enumerate(zip(TF_REPORTED, kl_tf, strict=True)):
        w(f"   {i:<5}{rep:<15}{_fmt(float(got)):<12}")
    w("   call: kldiv.kl_div(a, b, form='logits', reduction='none')")
    w()
    w("2. MXNet Gluon tutorial, KLDivLoss. Its kl_divergence(a, b) passes log(a) as the")
    w("   prediction and b as the label, i.e. KL(b‖a), averaged over the 4 categories (the")
    w("   tutorial: 'smaller than the true definition by a factor of the number of categories';")
    w("   MXNet 1.9.1 sums).")
    w(f"   {'compared':<12}{'tutorial says':<38}{'kldiv KL(b‖a)':<16}{'÷ 4 (tutorial)':<16}")
    says = {
        (1, 2): "smaller than 1 & 3",
        (1, 3): "larger than 1 & 2",
        (1, 1): "0",
        (4, 1): "nan (dist_1 has mass where 4 has 0)",
    }
    for (a, b), text in says.items():
        v = float(kldiv.kl_div(np.array(MX[b]), np.array(MX[a])))
        w(f"   {a} vs {b:<7}{text:<38}{_fmt(v):<16}{_fmt(v / 4):<16}")
    v_logits = float(kldiv.kl_div(np.array(MX[2]), np.array(MX_LOGITS_1), form=("probs", "logits")))
    w(f"   from_logits=False (softmax of the network output ≈ dist_1) vs 2: {_fmt(v_logits)}")
    w("   kldiv's answer for '4 vs 1' is +inf, exactly: no epsilon, no NaN. The other direction")
    rev = float(kldiv.kl_div(np.array(MX[4]), np.array(MX[1])))
    w(f"   KL(dist_4‖dist_1) is finite, 0.9·log(0.9/0.5) = {_fmt(rev)} (p = 0 terms count 0).")
    w()
    w("3. Keras answer, sparsity regularizer: 0.01·[KL(0.05‖ρ̂) + KL(0.95‖1−ρ̂)], where ρ̂ are")
    w("   the units' mean activations. Calling a categorical KL twice on scalars is a Bernoulli")
    w("   KL per unit, summed over units; kldiv says so directly:")
    rho_hat = np.array([0.01, 0.05, 0.2, 0.5, 0.9])
    p = np.stack([np.full_like(rho_hat, KERAS_TARGET), 1 - np.full_like(rho_hat, KERAS_TARGET)], -1)
    q = np.stack([rho_hat, 1 - rho_hat], -1)
    ours = KERAS_WEIGHT * float(kldiv.kl_div(p, q, reduction="sum"))
    eps = 1e-7  # keras.backend.epsilon(), the answer's clip
    t = np.clip(KERAS_TARGET, eps, 1)
    keras_formula = KERAS_WEIGHT * float(
        np.sum(t * np.log(t / np.clip(rho_hat, eps, 1)))
        + np.sum((1 - t) * np.log((1 - t) / np.clip(1 - rho_hat, eps, 1)))
    )
    w(f"   ρ̂ = {rho_hat.tolist()}")
    w(f"   the answer's formula (clipped at 1e-7): {keras_formula:.6f}")
    w(f"   kldiv: 0.01·kl_div([ρ, 1−ρ], [ρ̂, 1−ρ̂], reduction='sum') = {ours:.6f}")
    dead = np.array([0.0])
    kl_dead = float(kldiv.kl_div(np.array([[t, 1 - t]]), np.stack([dead, 1 - dead], -1)))
    clipped = float(t * np.log(t / eps) + (1 - t) * np.log(1 - t))
    w(f"   a dead unit (ρ̂ = 0): kldiv {_fmt(kl_dead)} (the target has mass 0.05 where ρ̂ has none);")
    w(f"   the clipped formula turns it into a finite {clipped:.6f} (ρ̂ taken as 1e-7)")
    return 0


def _require(packages: Sequence[tuple[str, str]], what: str, install: str) -> None:
    """Raise a one-line :class:`UsageError` unless every ``(module, name)`` imports.

    Checked before any output or file exists, so that a missing extra costs nothing."""
    missing = []
    for module, name in packages:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and e.name.split(".")[0] != module:
                missing.append(f"{name} (it does not import: {e})")
            else:
                missing.append(name)
        except Exception as e:  # installed but broken, e.g. a missing shared library
            missing.append(f"{name} (it does not import: {type(e).__name__}: {e})")
    if missing:
        needed = ", ".join(name for _, name in packages)
        raise UsageError(
            f"{what} needs {needed}; missing here: {', '.join(missing)}. Install them with "
            f"pip install {install}"
        )


DEMO_EXTRA = '"kldiv[torch,cli]"'
BENCH_EXTRA = '"kldiv[torch]"'
HF_EXTRA = '"kldiv[hf]"'
HF_PACKAGES = (("torch", "PyTorch"), ("transformers", "transformers"))


def demo(
    out_dir: str = "demo-output",
    train: bool = True,
    out: TextIO | None = None,
    progress: bool | None = None,
) -> int:
    """Three worked examples from other libraries' docs, then a distillation run on
    scikit-learn's digits (PyTorch, scikit-learn and matplotlib: ``kldiv[torch,cli]``)."""
    out = out or sys.stdout
    if train:
        _require(
            (("torch", "PyTorch"), ("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")),
            "the distillation run",
            f"{DEMO_EXTRA} (kldiv demo --no-train prints the worked examples alone)",
        )
        dest = _out_path(out_dir)
        try:  # before any output: a bad --out must fail at once, not after the run
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"{dest}: cannot create the output directory ({e.strerror})") from None
    worked_examples(out)
    if not train:
        return 0
    from . import digits

    print(file=out)
    print(
        "4. Distillation on real data: scikit-learn's 8×8 digits (1,797 images, no download).",
        file=out,
    )
    print(
        f"   A {digits.HIDDEN_TEACHER}-unit teacher, then {digits.HIDDEN_STUDENT}-unit students "
        f"trained on hard labels or distilled at T = {digits.TEMPERATURE:g} with",
        file=out,
    )
    print("   kldiv.kl_div (forward KL), kldiv.reverse_kl_div and kldiv.js_div:", file=out)
    show = sys.stderr.isatty() if progress is None else progress
    results = digits.train(dest, sys.stderr, progress=show)
    print(file=out)
    for line in digits.table(results).splitlines():
        print("   " + line, file=out)
    print(file=out)
    print(
        "   Agreement and KL are on the 540 held-out images (kldiv.metrics.TokenStats).", file=out
    )
    print(
        f"   Figures: {dest / 'distributions.png'} (teacher vs students on one image), ", file=out
    )
    print(f"            {dest / 'loss_curves.png'} (training losses).", file=out)
    return 0


# Per input file and chunk: bounds memory whatever the file size. The working set is about
# nine chunks (both files' blocks in flight and prefetched, and the float64 copies the
# statistics make): at 16 MiB the peak resident set is about 225 MiB, 450 MiB with PyTorch
# imported for .pt input (benchmarks/bench_compare_memory.py); 8 to 32 MiB chunks take the
# same CPU time.
CHUNK_BYTES = 16 << 20


def _open_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from . import readers

    files = []
    try:
        for spec in (args.ref, args.cand):
            files.append(readers.open_array(spec))
        ref, cand = files
        for f in files:
            if f.dtype.kind != "f":
                raise UsageError(
                    f"{f.path}: holds {f.dtype} values; expected floating point {args.form}"
                )
            if not f.shape:
                raise UsageError(f"{f.path}: is a scalar; expected an array of distributions")
        if ref.shape != cand.shape:
            raise UsageError(
                f"{cand.path}: has shape {cand.shape} but {ref.path} has {ref.shape}; "
                "the two files must hold the same tokens"
            )
        ndim = len(ref.shape)
        if not -ndim <= args.axis < ndim:
            raise UsageError(f"--axis {args.axis} is out of range for shape {ref.shape}")
        if ref.shape[args.axis] == 0:
            raise UsageError(f"{ref.path}: has no categories along --axis {args.axis}")
        if math.prod(ref.shape) == 0:
            raise UsageError(f"{ref.path}: has shape {ref.shape}, no tokens to compare")
        labels = None
        if args.labels:
            lab = readers.open_array(args.labels)
            files.append(lab)
            tokens = tuple(d for i, d in enumerate(ref.shape) if i != args.axis % ndim)
            if lab.dtype.kind not in "iu":
                raise UsageError(f"{lab.path}: holds {lab.dtype}; labels must be integer token ids")
            if lab.shape != tokens:
                raise UsageError(
                    f"{lab.path}: has shape {lab.shape}; labels need the token shape {tokens}"
                )
            labels = lab.read_all()
            if getattr(args, "shift_labels", False):
                if not tokens:
                    raise UsageError(
                        f"--shift-labels: {ref.path} holds one token, not a sequence to shift"
                    )
                try:
                    labels = shift_labels(labels)
                except ValueError as e:
                    raise UsageError(f"{lab.path}: {e}") from None
            labels = labels.reshape(-1)
        return ref, cand, labels
    except readers.InputError as e:
        for f in files:
            f.close()
        raise UsageError(str(e)) from None
    except UsageError:
        for f in files:
            f.close()
        raise


def shift_labels(input_ids: np.ndarray, ignore_index: int = -100) -> np.ndarray:
    """The labels of causal language modelling from the input ids: the label of position ``i``
    is the id at ``i + 1`` along the last axis (the sequence); the last position of each
    sequence has none and gets ``ignore_index``, so it is left out of every statistic.
    Unsigned ids at or above 2**63 (which int64 cannot hold) raise ``ValueError``."""
    ids = np.asarray(input_ids)
    if ids.dtype.kind == "u" and ids.ndim:
        # compared in the ids' own dtype: a cast to int64 would wrap them to negative numbers
        big = np.argwhere(ids[..., 1:] > np.iinfo(np.int64).max)
        if big.size:
            at = tuple(int(i) for i in big[0])
            at = at[:-1] + (at[-1] + 1,)
            raise ValueError(f"Expected input ids below 2**63, got {ids[at]} at index {at}.")
    ids = ids.astype(np.int64)
    out = np.full(ids.shape, ignore_index, dtype=np.int64)
    out[..., :-1] = ids[..., 1:]
    return out


def _sequence_length(shape: tuple[int, ...], axis: int) -> int:
    """The length of the last token axis (the sequence) of arrays of ``shape`` whose category
    axis is ``axis``: the flattened tokens run along it."""
    tokens = [d for i, d in enumerate(shape) if i != axis]
    return tokens[-1] if tokens else 1


# The check of label alignment: the mean log-likelihood gain, in nats, and the significance
# (in standard errors) that a neighbouring alignment must show over the given one, on at least
# this many tokens of the first block.
ALIGN_GAIN, ALIGN_SIGMAS, ALIGN_MIN_TOKENS = 1.0, 5.0, 16


def label_alignment(
    ref: np.ndarray, form: str, labels: np.ndarray, start: int, seq_len: int
) -> int:
    """Whether the labels of a block of reference rows look one position off.

    ``ref``: ``[rows, V]`` reference rows of the tokens ``start … start + rows − 1`` of the
    stream; ``labels``: the labels of the whole stream (flattened; -100 is ignored);
    ``seq_len``: the length of each sequence in the stream. For each row ``i`` the reference's
    log-probability of the label of ``i`` is compared with that of the label of ``i + 1`` (and
    of ``i − 1``) within the same sequence. A language model gives the token that follows far
    more probability than the current one, so when the label of ``i + 1`` gains more than
    ``ALIGN_GAIN`` nats on average, by more than ``ALIGN_SIGMAS`` standard errors, the labels
    are the input ids (unshifted): returns ``+1``. ``-1`` when the label of ``i − 1`` gains
    (labels shifted twice); ``0`` otherwise, including every case with too few tokens to tell
    (and a reference with no skill, e.g. random logits, which never crosses the threshold but
    by chance)."""
    x = np.asarray(ref, dtype=np.float64)
    n, vocab = x.shape
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if form == "probs":
            lp = np.log(x)
        else:  # logits, or log-probabilities renormalised (a no-op up to rounding)
            top = np.max(x, axis=-1, keepdims=True)
            top = np.where(np.isfinite(top), top, 0.0)
            lp = x - (top + np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True)))
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    g = start + np.arange(n)
    pos = g % max(1, seq_len)
    rows = np.arange(n)

    def logp(idx: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = lab[np.clip(idx, 0, lab.size - 1)]
        ok = ok & (idx >= 0) & (idx < lab.size) & (ids >= 0) & (ids < vocab)
        v = lp[rows, np.where(ok, ids, 0)]
        return v, ok & np.isfinite(v)

    cur, ok_cur = logp(g, np.ones(n, dtype=bool))
    for step, verdict in ((1, 1), (-1, -1)):
        inside = (pos + step >= 0) & (pos + step < seq_len)
        other, ok = logp(g + step, inside)
        ok &= ok_cur
        d = (other - cur)[ok]
        if d.size < ALIGN_MIN_TOKENS:
            continue
        gain = float(d.mean())
        se = float(d.std(ddof=1)) / np.sqrt(d.size)
        if gain > ALIGN_GAIN and gain > ALIGN_SIGMAS * se:
            return verdict
    return 0


def _warn_misaligned(args: argparse.Namespace, ref: np.ndarray, labels: Any, seq_len: int) -> None:
    verdict = label_alignment(ref, args.form[0], labels, 0, seq_len)
    if verdict == 0:
        return
    if verdict > 0:
        why = (
            "the reference gives the label of the NEXT position much more probability than "
            "each position's own label: these look like input ids; labels must be the next "
            "token of each position (pass --shift-labels to shift input ids)"
        )
    else:
        why = (
            "the reference gives the label of the PREVIOUS position much more probability "
            "than each position's own label: the labels look shifted one step too far"
            + (
                " (drop --shift-labels: they were already shifted)"
                if getattr(args, "shift_labels", False)
                else ""
            )
        )
    print(f"kldiv compare: warning: {args.labels}: {why}", file=sys.stderr)


def _histogram(stats: Any, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = stats.values("kl")
    finite = kl[np.isfinite(kl)]
    positive = finite[finite > 0]
    fig, ax = plt.subplots(figsize=(7, 4))
    if positive.size:
        lo, hi = np.log10(positive.min()), np.log10(positive.max())
        bins = np.logspace(lo, hi if hi > lo else lo + 1, 60).tolist()
        ax.hist(positive, bins=bins, color="tab:blue")
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("per-token KL(ref‖cand) [nats]")
    ax.set_ylabel("tokens")
    r = stats.report()
    for q, style in ((50.0, "--"), (99.0, ":")):
        v = r.kl_percentiles[q]
        if v > 0 and math.isfinite(v):
            ax.axvline(v, color="k", linestyle=style, label=f"p{q:g} = {v:.3g}")
    extra = []
    if (finite == 0).any():
        extra.append(f"{int((finite == 0).sum())} tokens at exactly 0 not shown")
    if r.kl_num_inf:
        extra.append(f"{r.kl_num_inf} tokens with KL = +inf not shown")
    ax.set_title(title + ("\n" + "; ".join(extra) if extra else ""), fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _prefetched(blocks: Any) -> Any:
    """Yield from ``blocks`` while a background thread reads the next item: copying a chunk
    out of the page cache then overlaps with the statistics of the previous one."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=1)  # one chunk ahead: memory stays bounded
    done = object()
    stop = threading.Event()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            for item in blocks:
                if stop.is_set():
                    return
                put(item)
            put(done)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # The worker reads mapped files: it must be finished before the caller unmaps them
        # (an error, a signal or Ctrl-C would otherwise close the map under a running copy).
        stop.set()
        worker.join()


def _out_path(value: str) -> Path:
    """--out as a path; an empty value is refused rather than read as "no --out"."""
    if not value.strip():
        raise UsageError("--out: expected a directory name, got an empty string")
    return Path(value)


def _check_out(dest: Path) -> None:
    """--out must be new, in a writable directory."""
    try:
        os.lstat(dest)
    except (FileNotFoundError, NotADirectoryError):
        pass  # new; a parent that is not a directory is reported below
    except OSError as e:  # e.g. a name too long, a directory that cannot be searched
        raise UsageError(f"{dest}: cannot be used as --out ({e.strerror})") from None
    else:
        raise UsageError(
            f"{dest}: already exists; kldiv never overwrites results, pass a new --out"
        )
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{parent}: the parent of --out is not a writable directory")


def _check_ref_file(spec: str) -> None:
    """Name what is wrong with REF when it is no file to read at all (missing, a directory,
    unreadable, empty), before saying it is not a base file."""
    path = Path(spec.partition("::")[0])
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path}: is a directory; --model needs a llama.cpp base file as REF")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{path}: cannot read (permission denied)")
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise UsageError(f"{path}: is empty; --model needs a llama.cpp base file as REF")


def compare(args: argparse.Namespace, out=None) -> int:
    """``kldiv compare REF CAND``: the per-token KL(REF‖CAND) report, streamed; ``kldiv
    compare BASE.kld --model DIR``: a model scored against a llama.cpp base file."""
    from . import llamacpp as base_files

    model = getattr(args, "model", None)
    if (args.cand is None) == (model is None):
        raise UsageError(
            "expected exactly one candidate: a file CAND, or --model DIR (with a llama.cpp "
            "base file as REF)"
        )
    if base_files.is_base_file(args.ref):
        path, sep, key = args.ref.partition("::")
        if sep:
            raise UsageError(
                f"{path}: a llama.cpp base file holds one set of windows; drop '::{key}'"
            )
        if model is not None:
            _require(HF_PACKAGES, "kldiv compare --model", HF_EXTRA)
        return base_files.compare_base(args, out)
    if model is not None:
        _check_ref_file(args.ref)
        raise UsageError("--model needs a llama.cpp base file as REF (its windows are the input)")
    if args.parity:
        raise UsageError("--parity needs a llama.cpp base file as REF")
    if getattr(args, "shift_labels", False) and not args.labels:
        raise UsageError("--shift-labels needs --labels (the input ids)")
    from tqdm.auto import tqdm

    from ..metrics import TokenStats

    out = out or sys.stdout
    dest = _out_path(args.out) if args.out is not None else None
    if dest is not None:  # before any work: a bad --out must not cost a long run
        _check_out(dest)
    from . import readers

    ref, cand, labels = _open_inputs(args)
    stats = TokenStats()
    pairs = None
    try:
        ndim = len(ref.shape)
        vocab = ref.shape[args.axis]
        n = math.prod(ref.shape) // vocab if vocab else 0
        itemsize = max(ref.dtype.itemsize, cand.dtype.itemsize)
        chunk = max(1, CHUNK_BYTES // max(1, vocab * itemsize))
        ax = args.axis % ndim
        bar = tqdm(
            total=n,
            unit="tok",
            unit_scale=True,
            desc="comparing",
            file=sys.stderr,
            disable=args.quiet or None,
            leave=False,
        )
        start = 0
        pairs = _prefetched(zip(ref.rows(ax, chunk), cand.rows(ax, chunk), strict=True))
        for r_block, c_block in pairs:
            rows = r_block.shape[0]
            lab = None if labels is None else labels[start : start + rows]
            if start == 0 and labels is not None:
                _warn_misaligned(args, r_block, labels, _sequence_length(ref.shape, ax))
            try:
                stats.update(
                    r_block, c_block, form=tuple(args.form), labels=lab, token_offset=start
                )
            except ValueError as e:
                msg = str(e)
                path = cand.path if msg.startswith("`cand`") else ref.path
                if "`labels`" in msg and args.labels:
                    path = Path(args.labels)
                raise UsageError(f"{path}: {msg}") from None
            start += rows
            bar.update(rows)
        bar.close()
        try:
            report = stats.report()
        except ValueError as e:  # every token's label is ignore_index
            raise UsageError(f"{args.labels or ref.path}: {e}") from None
    except readers.InputError as e:  # raised while streaming (e.g. a truncated .npz member)
        raise UsageError(str(e)) from None
    except ValueError as e:  # from reading the arrays
        raise UsageError(f"{ref.path}: {e}") from None
    finally:
        if pairs is not None:
            pairs.close()  # stops the reading thread before the files are unmapped
        for f in (ref, cand):
            f.close()
    # --out first: if writing fails, the command fails before printing anything
    figure_problem = None
    if dest is not None:
        title = f"{ref.path.name} vs {cand.path.name}"
        figure_problem = _write_outputs(dest, stats, report, title)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2), file=out)
    else:
        print(f"ref: {ref.path}  cand: {cand.path}  form: {args.form[0]}/{args.form[1]}", file=out)
        print(report.to_text(), file=out)
    if dest is not None:
        if not args.json:
            figure = [] if figure_problem else [dest / "kl_histogram.png"]
            wrote = [dest / "report.json", *figure]
            print("wrote " + " and ".join(map(str, wrote)), file=out)
        if figure_problem:  # on stderr, so that --json output stays one JSON document
            print(
                f"kldiv compare: note: kl_histogram.png not written; {figure_problem}",
                file=sys.stderr,
            )
    return 0


CLI_EXTRA = '"kldiv[cli]"'


def _write_outputs(dest: Path, stats: Any, report: Any, title: str) -> str | None:
    """Write report.json and, when matplotlib works, kl_histogram.png into ``dest``; return
    why the figure is missing (None when it was written). The report never depends on the
    figure: a plotting failure of any kind costs the figure alone."""
    problem: list[str] = []

    def write(tmp: Path) -> None:
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            problem.append(f"the histogram figure needs matplotlib: pip install {CLI_EXTRA}")
            return
        try:
            _histogram(stats, tmp / "kl_histogram.png", f"per-token KL: {title}")
        except OSError:  # a full disk or the like is a failure to write --out, not a plot's
            raise
        except Exception as e:  # a broken font cache or backend must not lose the report
            (tmp / "kl_histogram.png").unlink(missing_ok=True)
            problem.append(f"matplotlib failed: {type(e).__name__}: {e}")

    _atomic_dir(dest, write)
    return problem[0] if problem else None


def _atomic_dir(dest: Path, write: Any) -> None:
    """Write into a fresh hidden sibling directory, then rename: all files or none appear.

    The sibling is removed on any failure, and on SIGINT, SIGTERM and SIGHUP (see main)."""
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{parent}: the parent of --out does not exist")
    # Named before it exists, so that a signal at any point finds it to remove. os.mkdir, not
    # tempfile.mkdtemp (mode 0700): the results get the mode the umask gives, as any directory
    # the user creates. The name is cut so that a --out name near the limit still fits.
    tmp = parent / f".{dest.name[:200]}.{secrets.token_hex(4)}"
    _PARTIAL.append(tmp)  # before it exists: a signal at any point finds it to remove
    try:
        try:
            os.mkdir(tmp)
        except OSError as e:
            raise UsageError(f"{parent}: cannot write there ({e.strerror})") from None
        try:
            write(tmp)
            os.rename(tmp, dest)  # atomic
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UsageError(f"{dest}: cannot write the results ({e.strerror})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        _PARTIAL.remove(tmp)


# Hidden --out directories being written, for the signal handler to remove.
_PARTIAL: list[Path] = []


@contextlib.contextmanager
def removed_on_signal(path: Path) -> Iterator[None]:
    """Within the block, the directory ``path`` (being written; it may not exist yet) is
    removed if SIGINT, SIGTERM or SIGHUP ends ``kldiv`` (see :func:`main`)."""
    _PARTIAL.append(path)
    try:
        yield
    finally:
        _PARTIAL.remove(path)


@contextlib.contextmanager
def _exit_cleanly_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP remove a partial --out directory and end the process at
    once with status 128 + signal number. Not by raising where the program happens to be:
    an exception can land inside a thread pool's start-up or a cleanup handler, and reading
    threads may still hold mapped files (that hung or crashed at exit)."""

    def handler(signum: int, frame: Any) -> None:
        for s in saved:  # a second signal must not interrupt this one's cleanup
            signal.signal(s, signal.SIG_IGN)
        for path in list(_PARTIAL):
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(128 + signum)

    saved: dict[int, Any] = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # SIGHUP does not exist on Windows
        if hasattr(signal, name):
            try:
                saved[getattr(signal, name)] = signal.signal(getattr(signal, name), handler)
            except ValueError:  # not the main thread: signals stay as they are
                break
    try:
        yield
    finally:
        for s, previous in saved.items():
            signal.signal(s, previous)


# What each optional package enables, and the extra that installs it. Triton has no extra:
# PyTorch's CUDA builds for Linux bring it.
OPTIONAL = (
    ("torch", "torch", "kldiv.torch, kldiv bench and demo, .pt input", "kldiv[torch]"),
    ("jax", "jax", "the core on JAX arrays", "kldiv[jax]"),
    ("keras", "keras", "kldiv.keras losses and regularizer", "kldiv[keras]"),
    ("scipy", "scipy", "kldiv.distributions on NumPy arrays", "kldiv[numpy]"),
    ("matplotlib", "matplotlib", "figures of kldiv demo and compare", "kldiv[cli]"),
    ("safetensors", "safetensors", "compare reads .safetensors; kldiv.topk", "kldiv[cli]"),
    ("sklearn", "scikit-learn", "the digits data of kldiv demo", "kldiv[cli]"),
    ("transformers", "transformers", "kldiv llama-base, kldiv compare --model", "kldiv[hf]"),
    ("torchmetrics", "torchmetrics", "kldiv.torch.metrics.TokenStatsMetric", "kldiv[torchmetrics]"),
    ("triton", "triton", "DistillationLoss's GPU kernels", "with PyTorch's CUDA builds"),
)
# Importing these would load a framework (Keras loads its backend, Triton its compiler): the
# version comes from the installed metadata instead, and Keras' backend is reported apart.
# transformers takes seconds to import, torchmetrics imports PyTorch and more.
NOT_IMPORTED = ("keras", "triton", "transformers", "torchmetrics")


def _installed(module: str) -> bool:
    """Whether ``module`` can be found, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # raised by import hooks, or for a half-imported module
        return False


def _version(module: str, dist: str) -> str | None:
    """The installed version of ``dist`` when ``module`` imports (or, for the modules in
    NOT_IMPORTED, is installed), else None."""
    from importlib import metadata

    if module in NOT_IMPORTED:
        if not _installed(module):
            return None
    else:
        try:
            mod = importlib.import_module(module)
        except Exception:  # not installed, or installed but broken: unusable either way
            return None
        if isinstance(getattr(mod, "__version__", None), str):
            return str(mod.__version__)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "(version unknown)"


def _keras_backend() -> tuple[str, str]:
    """The backend Keras will load and where that choice comes from, found the way Keras
    finds it (KERAS_BACKEND, else keras.json under KERAS_HOME or ~/.keras, else TensorFlow)."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"], "KERAS_BACKEND"
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        backend = json.loads((home / "keras.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        backend = None
    if isinstance(backend, str) and backend:
        return backend, str(home / "keras.json")
    return "tensorflow", "Keras' default"


def info(out: TextIO | None = None) -> int:
    """Versions, optional packages and what each enables, devices, and which
    DistillationLoss paths run here."""
    out = out or sys.stdout
    w = lambda s="": print(s, file=out)  # noqa: E731
    w(f"kldiv {kldiv.__version__} on Python {platform.python_version()} ({platform.machine()})")
    w("required:")
    for module, dist in (("numpy", "numpy"), ("array_api_compat", "array-api-compat")):
        w(f"  {dist:<18}{_version(module, dist) or 'not importable'}")
    w(f"  {'tqdm':<18}{_version('tqdm', 'tqdm') or 'not importable'}")
    w("optional (each installed by the extra on the right):")
    found: dict[str, bool] = {}
    for module, dist, use, extra in OPTIONAL:
        version = _version(module, dist)
        found[module] = version is not None
        w(f"  {dist:<18}{version or 'not installed':<16}{use:<46}{extra}")
        if module == "keras" and version is not None:
            backend, source = _keras_backend()
            state = "installed" if _installed(backend) else "NOT installed"
            w(f"  {'':<18}backend {backend} (from {source}), {state}")
    if found["jax"]:
        import jax

        w(f"JAX devices: {', '.join(str(d) for d in jax.devices())}")
    if not found["torch"]:
        w('DistillationLoss: needs PyTorch, pip install "kldiv[torch]"')
        return 0
    import torch

    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    cuda = torch.cuda.is_available() and bool(devices)
    w(f"PyTorch devices: CPU{', CUDA: ' + ', '.join(devices) if cuda else ' (no CUDA device)'}")
    w("DistillationLoss paths:")
    w("  chunked CPU path  available (float32/bfloat16/float16 CPU logits, every divergence)")
    from kldiv.torch._rows import native as native_engine

    w(f"  CPU kernel        every divergence: {native_engine.status()}")
    if cuda and found["triton"]:
        w("  Triton kernels    available (CUDA logits)")
    else:
        why = " and ".join(
            x for x, ok in (("no CUDA device", cuda), ("no Triton", found["triton"])) if not ok
        )
        w(f"  Triton kernels    not used here ({why}); the CPU path or the core runs instead")
    return 0


def bench(args: argparse.Namespace, out=None) -> int:
    """``kldiv bench``: DistillationLoss against the anchors installed here, side by side."""
    out = out or sys.stdout
    _require((("torch", "PyTorch"),), "the benchmark", BENCH_EXTRA)
    import torch
    from tqdm.auto import tqdm

    from . import benchmark

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: expected auto, cpu or cuda[:index]") from None
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise UsageError(f"--device {device}: expected auto, cpu or cuda[:index]")
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
    ):
        raise UsageError(f"--device {device}: no such CUDA device here")
    kinds = tuple(args.kinds.split(","))
    variants = tuple(args.variants.split(","))
    for name, got, allowed in (
        ("--kinds", kinds, benchmark.KINDS),
        ("--variants", variants, benchmark.VARIANTS),
    ):
        bad = [x for x in got if x not in allowed]
        if bad:
            raise UsageError(f"{name}: unknown {bad[0]!r}; expected some of {', '.join(allowed)}")
    if "kldiv" not in variants:
        variants += ("kldiv",)
    gpu = device.startswith("cuda")
    n = args.n if args.n is not None else (8192 if gpu else 4096)
    v = args.v if args.v is not None else (128256 if gpu else 32000)
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    dest = _out_path(args.out) if args.out is not None else None
    if dest is not None:  # before any work: a bad --out must not cost a long run
        _check_out(dest)
    if n < 1 or v < 1 or args.rounds < 1 or args.iters < 1:
        raise UsageError("--n, --v, --rounds and --iters must be positive")
    bar = tqdm(
        total=len(kinds) * len(variants) * args.rounds,
        desc="benchmarking",
        file=sys.stderr,
        disable=args.quiet or None,
        leave=False,
    )
    result = benchmark.run(
        device,
        n,
        v,
        dtype,
        kinds,
        variants,
        args.rounds,
        args.iters,
        progress=lambda _: bar.update(1),
    )
    bar.close()
    result["command"] = "kldiv bench " + " ".join(sys.argv[2:] if args.argv is None else args.argv)
    if args.json:
        print(json.dumps(result, indent=2), file=out)
    else:
        print(
            f"{device} ({result['machine'].get('gpu') or result['machine'].get('cpu', '?')}), "
            f"N={n} V={v} {dtype}, forward+backward, median of {args.iters} × {args.rounds}",
            file=out,
        )
        print(benchmark.table(result), file=out)
    if dest is not None:
        _write_bench(dest, result)
        if not args.json:
            print(f"wrote {dest / 'bench.json'} and {dest / 'bench.csv'}", file=out)
    return 0


def _write_bench(dest: Path, result: dict) -> None:
    import csv

    from . import benchmark

    def write(tmp: Path) -> None:
        (tmp / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        with open(tmp / "bench.csv", "w", newline="") as f:
            csv.writer(f).writerows(benchmark.csv_rows(result))

    _atomic_dir(dest, write)


def _forms(value: str) -> tuple[str, str]:
    parts = value.split(",")
    allowed = ("logits", "log_probs", "probs")
    if len(parts) not in (1, 2) or any(p not in allowed for p in parts):
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(allowed)}, or two separated by a comma, got {value!r}"
        )
    return (parts[0], parts[-1])


def _model_options(p: argparse.ArgumentParser, prefix: str) -> None:
    """--model's companions, for llama-base and compare."""
    if prefix:  # compare: --model is optional there
        p.add_argument(
            "--model",
            help=prefix + "a local Hugging Face model directory (any quantization "
            "transformers loads), run on the base file's windows",
        )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="the model's dtype (default auto: the checkpoint's); logits are scored in float32",
    )
    p.add_argument("--batch", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:i]")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kldiv", description="The Kullback–Leibler divergence family, exact and explicit."
    )
    parser.add_argument("--version", action="version", version=f"kldiv {kldiv.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser(
        "demo",
        help="three worked examples from other libraries' docs, then a distillation run on "
        'real data (needs pip install "kldiv[torch,cli]")',
        description="Recomputes with kldiv the worked examples of the TensorFlow tutorial "
        "(KL from softmax cross-entropies), the MXNet Gluon tutorial (KLDivLoss) and the "
        "Keras answer (a sparsity regularizer), then distils a digits classifier with forward "
        "KL, reverse KL and JSD. The training run needs PyTorch, scikit-learn and matplotlib: "
        'pip install "kldiv[torch,cli]"; --no-train runs on the base install.',
    )
    p_demo.add_argument("--out", default="demo-output", help="where the figures go")
    p_demo.add_argument("--no-train", action="store_true", help="only the worked examples")
    p_cmp = sub.add_parser(
        "compare",
        help="per-token KL(REF‖CAND) between two models' saved outputs",
        description="Streams two files of per-token distributions (.npy memory-mapped, .npz, "
        ".safetensors, .pt; FILE::NAME picks an array) and reports the per-token "
        "KL(REF‖CAND): mean ± standard error, percentiles, max, top-1 agreement and, with "
        "--labels, Δp of the correct token and the perplexity ratio. Runs on the base install; "
        '.safetensors input and the histogram figure need pip install "kldiv[cli]", .pt input '
        'needs "kldiv[torch]". REF may be a llama.cpp base file (llama-perplexity '
        "--kl-divergence-base, or kldiv llama-base); CAND then holds the candidate's logits on "
        "its windows, [n_chunk, n_ctx, V] or [n_chunk, n_ctx − 1 − n_ctx/2, V], or, instead of "
        "CAND, --model DIR runs a Hugging Face model on the windows (nothing written to disk; "
        'pip install "kldiv[hf]").',
    )
    p_cmp.add_argument("ref", help="the reference model's outputs (the distributions P)")
    p_cmp.add_argument(
        "cand",
        nargs="?",
        help="the candidate model's outputs (the distributions Q); or --model instead",
    )
    p_cmp.add_argument(
        "--form",
        type=_forms,
        default=("logits", "logits"),
        help="logits (default), log_probs or probs; 'log_probs,logits' gives each file's",
    )
    p_cmp.add_argument(
        "--labels",
        help="integer token ids of the token shape (.npy, ...): the NEXT token of each position "
        "(the label of position i is token i + 1, as in llama.cpp's base files); -100 leaves "
        "a position out. transformers' causal-LM labels are the input ids, unshifted: pass "
        "those with --shift-labels",
    )
    p_cmp.add_argument(
        "--shift-labels",
        action="store_true",
        help="--labels holds the input ids of causal language modelling: position i is scored "
        "against id i + 1 along the last token axis; the last position of each sequence is "
        "left out",
    )
    p_cmp.add_argument("--axis", type=int, default=-1, help="the category axis (default -1)")
    p_cmp.add_argument(
        "--out",
        help="a new directory for report.json and kl_histogram.png (the figure needs "
        'matplotlib: pip install "kldiv[cli]")',
    )
    p_cmp.add_argument("--json", action="store_true", help="print the report as JSON")
    p_cmp.add_argument("--quiet", action="store_true", help="no progress bar")
    p_cmp.add_argument(
        "--parity",
        action="store_true",
        help="with a llama.cpp base file as REF: also the statistics computed the way "
        "llama-perplexity --kl-divergence computes them",
    )
    _model_options(p_cmp, "with a llama.cpp base file as REF, instead of CAND: ")
    p_base = sub.add_parser(
        "llama-base",
        help="a llama.cpp KL-divergence base file from a Hugging Face reference model "
        '(needs pip install "kldiv[hf]")',
        description="Tokenizes the text as llama-perplexity does (the whole file, less one "
        "trailing newline, BOS first when the tokenizer adds one, special-token text as plain "
        "text; at least 2·--ctx tokens), cuts it into consecutive "
        "windows of --ctx tokens, runs the model on each (its first token replaced by BOS when "
        "the tokenizer adds one) and writes the float32 next-token log-probabilities of the "
        "second half of each window, quantized as llama.cpp does, to a new file that "
        "llama-perplexity --kl-divergence-base FILE --kl-divergence scores a GGUF against. "
        "Memory stays at one batch of windows. Needs PyTorch and transformers: "
        'pip install "kldiv[hf]".',
    )
    p_base.add_argument("--model", required=True, help="a local Hugging Face model directory")
    p_base.add_argument("--text", required=True, help="the text file (UTF-8)")
    p_base.add_argument("--ctx", type=int, required=True, help="tokens per window (llama.cpp's -c)")
    p_base.add_argument("--out", required=True, help="the base file to write (must not exist)")
    p_base.add_argument(
        "--chunks", type=int, help="at most this many windows (llama.cpp's --chunks)"
    )
    _model_options(p_base, "")
    p_base.add_argument("--quiet", action="store_true", help="no progress bar")
    p_topk = sub.add_parser(
        "teacher-topk",
        help="store a teacher's top-k log-probabilities for offline distillation (needs "
        'pip install "kldiv[hf]" with --model, "kldiv[torch,cli]" with --logits)',
        description="Writes a new directory of safetensors shards and a manifest.json (the "
        "format of kldiv.topk, read back with kldiv.topk.load as a TopKTeacher): per token the "
        "ids of the K most probable next tokens, their log-probabilities under the teacher's "
        "full softmax of logits / T, and the exact log-mass of all other ids. From a Hugging "
        "Face model (--model DIR --text FILE --ctx N: the text tokenized as kldiv llama-base "
        "does, cut into consecutive windows of N tokens, every position stored with its input "
        "id) or from a file of logits (--logits FILE: .npy, .npz, .safetensors, .pt; "
        "FILE::NAME picks an array). Memory stays at one batch of logits and one shard; "
        "nothing is left behind by a failed run.",
    )
    src = p_topk.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local Hugging Face causal LM directory (the teacher)")
    src.add_argument("--logits", help="a file of the teacher's logits [..., V]")
    p_topk.add_argument("--k", type=int, required=True, help="ids stored per token")
    p_topk.add_argument("--out", required=True, help="the directory to write (must not exist)")
    p_topk.add_argument("--text", help="with --model: the text file (UTF-8)")
    p_topk.add_argument("--ctx", type=int, help="with --model: tokens per window")
    p_topk.add_argument(
        "--dtype",
        default="float32",
        choices=("float16", "bfloat16", "float32"),
        help="dtype of the stored log-probs (default float32; the tail mass is always float32)",
    )
    p_topk.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="store softmax(logits / T) (default 1)",
    )
    p_topk.add_argument(
        "--shard-tokens", type=int, help="tokens per shard file (default: about 256 MiB each)"
    )
    p_topk.add_argument(
        "--batch-size", type=int, default=1, help="with --model: windows per forward pass"
    )
    p_topk.add_argument(
        "--model-dtype",
        default="auto",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="with --model: the model's dtype (default auto: the checkpoint's)",
    )
    p_topk.add_argument("--device", default="auto", help="with --model: auto, cpu or cuda[:i]")
    p_topk.add_argument(
        "--axis", type=int, default=-1, help="with --logits: the category axis (default -1)"
    )
    p_topk.add_argument("--quiet", action="store_true", help="no progress bar")
    p_bench = sub.add_parser(
        "bench",
        help="time DistillationLoss against PyTorch eager, torch.compile and Liger Kernel "
        '(needs pip install "kldiv[torch]")',
        description="Forward + backward of the distillation loss on random logits on this "
        "device, kldiv beside the anchors that are installed; prints the table of ratios and, "
        "with --out, writes bench.json and bench.csv. Defaults: N=4096, V=32000 float32 on "
        'CPU; N=8192, V=128256 bfloat16 on CUDA. Needs PyTorch: pip install "kldiv[torch]".',
    )
    p_bench.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:i]")
    p_bench.add_argument("--n", type=int, help="rows (tokens)")
    p_bench.add_argument("--v", type=int, help="vocabulary size")
    p_bench.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p_bench.add_argument(
        "--kinds",
        default="kl,reverse_kl,js",
        help="divergences to time: kl, reverse_kl, js, skew_kl, skew_reverse_kl, tv, symmetric_kl",
    )
    p_bench.add_argument(
        "--variants",
        default="eager,compile,liger,kldiv",
        help="eager, compile, liger, kldiv (DistillationLoss; always included), tensor "
        "(DistillationLoss without the C kernel), core (kldiv.divergence), floor (the exps "
        "any fused kernel needs, into a fresh gradient); on JAX: jax (kldiv.divergence on "
        "JAX arrays), jax_composition (the jax.nn formula), optax",
    )
    p_bench.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p_bench.add_argument("--iters", type=int, default=5, help="timed steps per round")
    p_bench.add_argument("--out", help="a new directory for bench.json and bench.csv")
    p_bench.add_argument("--json", action="store_true", help="print the results as JSON")
    p_bench.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser(
        "info",
        help="versions, optional packages and what they enable, devices, DistillationLoss paths",
    )
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)[1:]
    try:
        with _exit_cleanly_on_signals():
            if args.command == "demo":
                return demo(args.out, train=not args.no_train)
            if args.command == "compare":
                return compare(args)
            if args.command == "llama-base":
                _require(HF_PACKAGES, "kldiv llama-base", HF_EXTRA)
                from . import hf

                return hf.llama_base(args)
            if args.command == "teacher-topk":
                from . import topk as teacher_topk

                return teacher_topk.teacher_topk(args)
            if args.command == "bench":
                return bench(args)
            return info()
    except UsageError as e:
        error = str(e)
    except BrokenPipeError:  # `kldiv compare ... | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # one the checks did not foresee (e.g. a full disk under stdout)
        error = f"{e.filename}: {e.strerror}" if e.filename else (e.strerror or str(e))
    except KeyboardInterrupt:  # before the handler is installed or after it is restored
        return 130
    print(f"kldiv {args.command}: error: {' '.join(error.splitlines())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
