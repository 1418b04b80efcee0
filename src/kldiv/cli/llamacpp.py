"""``kldiv compare BASE.kld CAND`` and ``kldiv compare BASE.kld --model DIR``: a candidate's
logits scored against a llama.cpp base file.

BASE.kld is a file written by ``llama-perplexity --kl-divergence-base`` (or by
:func:`kldiv.llamacpp.write_base`, or ``kldiv llama-base``); CAND holds the candidate model's
logits for the same windows, ``[n_chunk, n_ctx, V]`` (every position) or
``[n_chunk, n_ctx − 1 − n_ctx/2, V]`` (the scored positions only), in any format ``kldiv
compare`` reads. With ``--model DIR`` instead, a Hugging Face model computes them, window by
window, and nothing is written to disk (:mod:`kldiv.cli.hf`). The windows, streamed one
at a time, give the exact report of :class:`kldiv.metrics.TokenStats` with the base file's
tokens as labels (so perplexities and Δp come for free), the extra statistics of
:mod:`kldiv.metrics.extended` (not the reverse KL: it needs the base's probabilities below its
16-nat window, which the file does not store) and, with ``--parity``, the statistics the way
``llama-perplexity --kl-divergence`` computes them.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

__all__ = ["is_base_file", "compare_base", "score_windows", "extended_text", "parity_text"]


def is_base_file(spec: str) -> bool:
    """Whether ``spec`` names a regular file that starts with llama.cpp's base-file magic."""
    from ..llamacpp import MAGIC

    path = Path(spec.partition("::")[0])
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _num(x: float | None, spec: str = ".6g") -> str:
    if x is None:
        return "undefined"
    if x != x:  # NaN: llama.cpp's formulas can give it (e.g. a correlation of constants)
        return "nan"
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


def extended_text(ext: Any) -> str:
    """The lines of an :class:`~kldiv.metrics.extended.ExtendedReport` (``kldiv compare``)."""
    rows = [("Minimum KL", _num(ext.kl_min))]
    if ext.reverse_kl_mean is not None:
        rows += [
            ("Mean reverse KL", f"{_num(ext.reverse_kl_mean)} ± {_num(ext.reverse_kl_stderr)}"),
            ("Maximum reverse KL", _num(ext.reverse_kl_max)),
            ("Median reverse KL", _num(ext.reverse_kl_percentiles[50.0])),
        ]
    if ext.tv_mean is not None:
        rows += [
            ("Mean total variation", f"{_num(ext.tv_mean)} ± {_num(ext.tv_stderr)}"),
            ("Maximum total variation", _num(ext.tv_max)),
            ("Draft acceptance (1 − TV)", f"{_num(ext.acceptance)} ± {_num(ext.tv_stderr)}"),
        ]
    if ext.dp_quartiles is not None:
        rows += [
            ("PPL(ref) uncertainty", _num(ext.ppl_ref_stderr)),
            ("PPL(cand) uncertainty", _num(ext.ppl_cand_stderr)),
            ("PPL ratio uncertainty", _num(ext.ppl_ratio_stderr)),
            ("PPL(cand) − PPL(ref)", f"{_num(ext.ppl_diff)} ± {_num(ext.ppl_diff_stderr)}"),
            ("Correlation of NLLs", _num(ext.nll_correlation)),
            ("RMS Δp uncertainty", f"{_num(100 * ext.dp_rms_stderr, '.3f')} %"),
            ("75% Δp", f"{_num(100 * ext.dp_quartiles[75.0], '.3f')} %"),
            ("25% Δp", f"{_num(100 * ext.dp_quartiles[25.0], '.3f')} %"),
        ]
    width = max(len(n) for n, _ in rows)
    return "\n".join(f"  {n:<{width}}  {v}" for n, v in rows)


def parity_text(rep: Any) -> str:
    """A :class:`~kldiv.llamacpp.ParityReport` at the precision llama.cpp prints."""

    def pm(pair: tuple[float, float], spec: str = ".6f", scale: float = 1.0) -> str:
        return f"{_num(scale * pair[0], spec)} ± {_num(scale * pair[1], spec)}"

    lines = [
        f"llama.cpp's conventions, over {rep.num_tokens} tokens (see kldiv.llamacpp.ParityStats)",
        f"  PPL(cand)                {pm(rep.ppl_cand)}",
        f"  PPL(base)                {pm(rep.ppl_base)}",
        f"  Correlation of ln PPLs   {_num(100 * rep.ln_ppl_correlation, '.2f')} %",
        f"  ln(PPL(cand)/PPL(base))  {pm(rep.ln_ppl_ratio)}",
        f"  PPL(cand)/PPL(base)      {pm(rep.ppl_ratio)}",
        f"  PPL(cand) − PPL(base)    {pm(rep.ppl_diff)}",
        f"  Mean KL                  {pm(rep.kld_mean)}",
    ]
    lines += [f"  KL {k:<21} {_num(v, '.6f')}" for k, v in rep.kld_percentiles.items()]
    lines.append(f"  Mean Δp                  {pm(rep.dp_mean, '.3f', 100)} %")
    lines += [f"  Δp {k:<21} {_num(100 * v, '.3f')} %" for k, v in rep.dp_percentiles.items()]
    lines.append(f"  RMS Δp                   {pm(rep.dp_rms, '.3f', 100)} %")
    lines.append(f"  Same top token           {pm(rep.same_top, '.3f', 100)} %")
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    """JSON without NaN or inf (as the report's to_dict): infinities as "inf"/"-inf", NaN as
    null, float keys as "99.9", pairs as lists."""
    if isinstance(x, dict):
        return {(f"{k:g}" if isinstance(k, float) else str(k)): _jsonable(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    if isinstance(x, float | np.floating):
        v = float(x)
        if v != v:
            return None
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(x, np.integer | np.bool_):
        return x.item()
    return x


def compare_base(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``kldiv compare`` with a base file as REF (``args`` as ``kldiv compare`` parses
    them, plus ``parity``): the candidate's logits come from CAND, a file, or, with ``model``,
    from a Hugging Face model run on the file's windows (:mod:`kldiv.cli.hf`). Problems raise
    the command's one-line ``UsageError``."""
    from ..llamacpp import BaseFileError, read_base
    from . import UsageError, readers

    out = out or sys.stdout
    model_dir = getattr(args, "model", None)
    for flag, given in (
        ("--labels", args.labels),
        ("--shift-labels", getattr(args, "shift_labels", False)),
        ("--out", args.out),
    ):
        if given:
            why = (
                "not supported with a base file yet; use --json and redirect it"
                if flag == "--out"
                else "the base file holds the labels (the next token of each position)"
            )
            raise UsageError(f"{flag}: {why}")
    if args.axis not in (-1, 2):
        raise UsageError("--axis: the candidate's vocabulary axis must be the last one")
    # one form (--form log_probs) reaches here as the pair (log_probs, log_probs): it is the
    # candidate's; a pair naming another form for the reference is refused
    form_r, form_c = tuple(args.form)
    if form_r not in ("logits", form_c):
        raise UsageError(
            "--form: the base file's side is fixed (stored log-probabilities); give the "
            "candidate's form alone, e.g. --form log_probs"
        )
    if model_dir is not None and form_c != "logits":
        raise UsageError("--form: a model given by --model gives logits")
    parity = bool(getattr(args, "parity", False))
    if parity and form_c != "logits":
        raise UsageError("--parity needs the candidate's logits (--form logits)")
    try:
        base = read_base(args.ref)
    except BaseFileError as e:
        raise UsageError(str(e)) from None
    cand = None
    try:
        n_ctx, V = base.n_ctx, base.n_vocab
        if model_dir is not None:
            blocks, source = _model_blocks(base, args)
        else:
            try:
                cand = readers.open_array(args.cand)
            except readers.InputError as e:
                raise UsageError(str(e)) from None
            blocks, source = _file_blocks(base, cand), str(cand.path)
        report, ext, prep = score_windows(base, blocks, source, form_c, parity, args.quiet)
    except readers.InputError as e:
        raise UsageError(str(e)) from None
    finally:
        if cand is not None:
            cand.close()
        base.close()
    if args.json:
        doc = report.to_dict()
        doc["extended"] = _jsonable(vars(ext))
        if prep is not None:
            doc["llama_cpp"] = _jsonable(vars(prep))
        print(json.dumps(doc, indent=2), file=out)
        return 0
    print(
        f"ref: {base.path} (llama.cpp base file: {base.n_chunk} windows of {n_ctx} tokens, "
        f"V = {V}, scored positions {n_ctx // 2}..{n_ctx - 2})  cand: {source}  "
        f"form: {form_c}",
        file=out,
    )
    print(report.to_text(), file=out)
    print(extended_text(ext), file=out)
    if prep is not None:
        print(parity_text(prep), file=out)
    return 0


def _file_blocks(base: Any, cand: Any) -> Iterator[np.ndarray]:
    """The candidate's rows at the scored positions of each window, from a file."""
    from . import UsageError

    n_ctx, n_scored, V = base.n_ctx, base.n_scored, base.n_vocab
    shapes = ((base.n_chunk, n_ctx, V), (base.n_chunk, n_scored, V))
    if cand.shape not in shapes:
        raise UsageError(
            f"{cand.path}: has shape {cand.shape}; {base.path} needs the candidate's outputs "
            f"on its windows, shape {shapes[0]} (every position) or {shapes[1]} (the "
            f"scored positions {n_ctx // 2}..{n_ctx - 2})"
        )
    if cand.dtype.kind != "f":
        raise UsageError(f"{cand.path}: holds {cand.dtype}; expected floating point values")
    rows_per_window = cand.shape[1]

    def blocks() -> Iterator[np.ndarray]:
        for block in cand.rows(-1, rows_per_window):
            yield block[n_ctx // 2 : n_ctx - 1] if rows_per_window == n_ctx else block

    return blocks()


def _model_blocks(base: Any, args: argparse.Namespace) -> tuple[Iterator[np.ndarray], str]:
    """The candidate's float32 logits at the scored positions of each window, from a Hugging
    Face model run on ``base.windows(bos)``; ``bos`` is the BOS of the model's tokenizer when
    it adds one."""
    from . import UsageError, hf

    if args.batch < 1:
        raise UsageError(f"--batch {args.batch}: expected a positive number of windows")
    tokenizer, model, device = hf.load(args.model, args.dtype, args.device, args.quiet)
    # before evaluating anything: the vocabulary, BOS included, and the positions
    width = hf.logits_width(model)
    if width is not None and width != base.n_vocab:
        raise UsageError(
            f"{args.model}: the model gives {width} logits per position, {base.path} stores "
            f"{base.n_vocab}: the file comes from another vocabulary"
        )
    bos = hf.bos_token_id(tokenizer)
    if bos is not None and not 0 <= bos < base.n_vocab:
        raise UsageError(
            f"{args.model}: the tokenizer's BOS is token {bos}, outside the {base.n_vocab} "
            f"tokens of {base.path}: the file comes from another vocabulary"
        )
    hf.check_positions(args.model, model, base.n_ctx, str(base.path))
    first = int(base.tokens[0, 0])
    if bos is not None and first != bos:
        print(
            f"kldiv compare: warning: {args.model}: the tokenizer adds BOS {bos}, but "
            f"{base.path} starts with token {first}, not BOS: it may come from another "
            "tokenizer, or from a model that adds no BOS; each window is evaluated with BOS "
            "first",
            file=sys.stderr,
        )
    windows = base.windows(bos)
    size = hf.embedding_size(model)
    if size is not None and int(windows.max()) >= size:
        raise UsageError(
            f"{args.model}: {base.path} holds token {int(windows.max())}, outside the model's "
            f"{size} embeddings: the file comes from another vocabulary"
        )

    def blocks() -> Iterator[np.ndarray]:
        for rows in hf.window_logits(model, windows, device, args.batch, name=args.model):
            if rows.shape[-1] != base.n_vocab:
                raise UsageError(
                    f"{args.model}: the model gives {rows.shape[-1]} logits per position, "
                    f"{base.path} stores {base.n_vocab}: the file comes from another vocabulary"
                )
            yield rows

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return blocks(), f"{args.model} (transformers, {dtype}, {device})"


def score_windows(
    base: Any, blocks: Iterable[Any], source: str, form: Any, parity: bool, quiet: bool
) -> tuple[Any, Any, Any]:
    """Score the candidate's rows of each window (``blocks``: one ``[n_scored, V]`` array per
    window, in order, from a file or a model) against the base file's stored log-probabilities:
    the :class:`~kldiv.metrics.TokenStats` report, the extended report and, with ``parity``,
    llama.cpp's statistics (else None). ``source`` names the candidate in error messages."""
    from tqdm.auto import tqdm

    from ..llamacpp import BaseFileError, ParityStats
    from ..metrics import TokenStats
    from ..metrics.extended import extended_report, token_divergences
    from . import UsageError

    n_scored = base.n_scored
    stats, par = TokenStats(), ParityStats()
    tv = []
    bar = tqdm(
        total=base.num_tokens,
        unit="tok",
        unit_scale=True,
        desc="comparing",
        file=sys.stderr,
        disable=quiet or None,
        leave=False,
    )
    for c, block in enumerate(blocks):
        labels = np.asarray(base.labels[c], dtype=np.int64)
        try:
            ref = base.log_probs(c)
        except BaseFileError as e:
            raise UsageError(str(e)) from None
        try:
            stats.update(
                ref,
                block,
                form=("logits", form),
                labels=labels,
                token_offset=c * n_scored,
            )
        except ValueError as e:
            raise UsageError(f"{source}: window {c}: {e}") from None
        # No reverse KL: KL(cand‖base) needs the base's probabilities of the entries below
        # its 16-nat window, which the file does not store (it would be +inf or made up).
        tv.append(token_divergences(ref, block, form=("logits", form))[1])
        if parity:
            par.update(base.records(c), block, labels)
        bar.update(n_scored)
    bar.close()
    report = stats.report()
    ext = extended_report(stats, None, np.concatenate(tv))
    return report, ext, (par.report() if parity else None)
