"""``kldiv compare BASE.kld CAND``: a candidate's logits scored against a llama.cpp base file.

BASE.kld is a file written by ``llama-perplexity --kl-divergence-base`` (or by
:func:`kldiv.llamacpp.write_base`); CAND holds the candidate model's logits for the same
windows, ``[n_chunk, n_ctx, V]`` (every position) or ``[n_chunk, n_ctx − 1 − n_ctx/2, V]``
(the scored positions only), in any format ``kldiv compare`` reads. The windows, streamed one
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
from pathlib import Path
from typing import Any, TextIO

import numpy as np

__all__ = ["is_base_file", "compare_base", "extended_text", "parity_text"]


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
    them, plus ``parity``). Problems raise the command's one-line ``UsageError``."""
    from tqdm.auto import tqdm

    from ..llamacpp import BaseFileError, ParityStats, read_base
    from ..metrics import TokenStats
    from ..metrics.extended import extended_report, token_divergences
    from . import UsageError, readers

    out = out or sys.stdout
    for flag, given in (("--labels", args.labels), ("--out", args.out)):
        if given:
            why = (
                "the base file holds the labels (the next token of each position)"
                if flag == "--labels"
                else "not supported with a base file yet; use --json and redirect it"
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
    parity = bool(getattr(args, "parity", False))
    if parity and form_c != "logits":
        raise UsageError("--parity needs the candidate's logits (--form logits)")
    try:
        base = read_base(args.ref)
    except BaseFileError as e:
        raise UsageError(str(e)) from None
    try:
        cand = readers.open_array(args.cand)
    except readers.InputError as e:
        base.close()
        raise UsageError(str(e)) from None
    try:
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
        stats, par = TokenStats(), ParityStats()
        tv = []
        bar = tqdm(
            total=base.num_tokens,
            unit="tok",
            unit_scale=True,
            desc="comparing",
            file=sys.stderr,
            disable=args.quiet or None,
            leave=False,
        )
        windows = cand.rows(-1, rows_per_window)
        for c, block in enumerate(windows):
            if rows_per_window == n_ctx:
                block = block[n_ctx // 2 : n_ctx - 1]
            labels = np.asarray(base.labels[c], dtype=np.int64)
            try:
                ref = base.log_probs(c)
            except BaseFileError as e:
                raise UsageError(str(e)) from None
            try:
                stats.update(
                    ref,
                    block,
                    form=("logits", form_c),
                    labels=labels,
                    token_offset=c * n_scored,
                )
            except ValueError as e:
                raise UsageError(f"{cand.path}: window {c}: {e}") from None
            # No reverse KL: KL(cand‖base) needs the base's probabilities of the entries below
            # its 16-nat window, which the file does not store (it would be +inf or made up).
            tv.append(token_divergences(ref, block, form=("logits", form_c))[1])
            if parity:
                par.update(base.records(c), block, labels)
            bar.update(n_scored)
        bar.close()
        report = stats.report()
        ext = extended_report(stats, None, np.concatenate(tv))
        prep = par.report() if parity else None
    except readers.InputError as e:
        raise UsageError(str(e)) from None
    finally:
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
        f"V = {V}, scored positions {n_ctx // 2}..{n_ctx - 2})  cand: {cand.path}  "
        f"form: {form_c}",
        file=out,
    )
    print(report.to_text(), file=out)
    print(extended_text(ext), file=out)
    if prep is not None:
        print(parity_text(prep), file=out)
    return 0
