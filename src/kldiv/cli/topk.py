"""``kldiv teacher-topk``: a teacher's top-k log-probabilities, stored for offline distillation
in the format of :mod:`kldiv.topk` (a directory of safetensors shards and a manifest).

Two sources:

``--model DIR --text FILE --ctx N``
    A local Hugging Face causal language model runs on the text: the text (UTF-8, less one
    trailing newline) is tokenized at once as ``kldiv llama-base`` does (BOS first when the
    tokenizer adds one, special-token text as plain text), cut into consecutive windows of
    ``N`` tokens (a remainder shorter than ``N`` is dropped), and the model runs on each window
    from an empty context, ``--batch-size`` windows per forward pass. Every position of every
    window is stored: the teacher's distribution of the token that follows it, with the
    window's input ids (``kldiv.topk.load_input_ids``), so that a student runs on the same
    windows. The manifest's ``token_shape`` is ``[windows, N]``.
``--logits FILE``
    A file of logits (or log-probabilities: the log-softmax makes them the same) in any format
    ``kldiv compare`` reads (``.npy``, ``.npz``, ``.safetensors``, ``.pt``; ``FILE::NAME``
    picks an array), the category axis ``--axis`` (default last), streamed in blocks. The
    manifest's ``token_shape`` is the file's shape without that axis (a file of 0 tokens
    gives an empty store).

Memory stays bounded whatever the number of tokens: one batch of windows' logits (or one
block of the file, a few MiB), and one shard's buffer (``--shard-tokens``), written as soon as
it is full. The shards go into a hidden directory beside ``--out``, renamed into place at the
end: a failed or interrupted run leaves nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

__all__ = ["teacher_topk", "CHUNK_BYTES"]

# Bytes of file data per block for --logits: the writer makes two float32 copies of a block,
# so the working set is a few blocks, small beside a logits file; larger blocks are no faster.
CHUNK_BYTES = 4 << 20


def _check_args(args: argparse.Namespace) -> None:
    from . import UsageError

    if args.k < 1:
        raise UsageError(f"--k {args.k}: expected a positive number of ids per token")
    if not (0 < args.temperature < math.inf):
        raise UsageError(f"--temperature {args.temperature}: expected a finite number > 0")
    if args.shard_tokens is not None and args.shard_tokens < 1:
        raise UsageError(f"--shard-tokens {args.shard_tokens}: expected a positive number")
    if args.model is not None:
        if args.text is None or args.ctx is None:
            raise UsageError("--model needs --text FILE and --ctx N (tokens per window)")
        if args.ctx < 1:
            raise UsageError(f"--ctx {args.ctx}: expected a positive number of tokens")
        if args.batch_size < 1:
            raise UsageError(f"--batch-size {args.batch_size}: expected a positive number")
    else:
        for flag, value in (("--text", args.text), ("--ctx", args.ctx)):
            if value is not None:
                raise UsageError(f"{flag} goes with --model; --logits reads the logits directly")


def teacher_topk(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``kldiv teacher-topk``: see the module doc."""
    from . import HF_EXTRA, HF_PACKAGES, _check_out, _out_path, _require

    out = out or sys.stdout
    if args.model is not None:
        _require((*HF_PACKAGES, ("safetensors", "safetensors")), "kldiv teacher-topk", HF_EXTRA)
    else:
        _require(
            (("torch", "PyTorch"), ("safetensors", "safetensors")),
            "kldiv teacher-topk",
            '"kldiv[torch,cli]"',
        )
    _check_args(args)
    dest = _out_path(args.out)
    _check_out(dest)  # before any work: a bad --out must not cost a long run
    if args.model is not None:
        writer, summary = _from_model(args, dest)
    else:
        writer, summary = _from_logits(args, dest)
    m = _manifest(dest)
    print(
        f"wrote {dest}: {m['num_tokens']} tokens (token shape {tuple(m['token_shape'])}) from "
        f"{summary}, top {m['k']} of V = {m['vocab_size']}, {m['dtype']} log-probs at T = "
        f"{m['temperature']:g}, {len(m['shards'])} shard{'s' * (len(m['shards']) != 1)}; read "
        f"with kldiv.topk.load({str(dest)!r}, tail='tail_bucket')",
        file=out,
    )
    return 0


def _manifest(dest: Path) -> dict[str, Any]:
    from ..topk import read_manifest

    return read_manifest(dest)


def _writer(
    args: argparse.Namespace,
    dest: Path,
    teacher: dict,
    token_shape: tuple,
    vocab_size: int | None = None,
) -> Any:
    from ..topk import TopKWriter

    return TopKWriter(
        dest,
        args.k,
        vocab_size=vocab_size,
        temperature=args.temperature,
        dtype=args.dtype,
        shard_tokens=args.shard_tokens,
        teacher=teacher,
        token_shape=token_shape,
    )


def _bar(args: argparse.Namespace, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc=desc,
        file=sys.stderr,
        disable=args.quiet or None,
        leave=False,
    )


def _write(writer: Any, blocks: Any, bar: Any, source: str) -> None:
    """Feed ``(logits, input_ids)`` blocks to ``writer`` and close it; on any failure (and on
    the signals ``kldiv`` handles) its hidden directory is removed."""
    from . import UsageError, removed_on_signal

    with removed_on_signal(writer.staging):
        try:
            for logits, ids in blocks:
                try:
                    writer.add(logits, ids)  # writes a shard whenever one is full
                except ValueError as e:  # NaN or +inf logits, a vocabulary smaller than --k
                    raise UsageError(f"{source}: {e}") from None
                except OSError as e:  # a full disk, a file size limit, ...
                    raise _write_error(writer, e) from None
                bar.update(int(np.prod(logits.shape[:-1])))
            try:
                writer.close()
            except OSError as e:
                raise _write_error(writer, e) from None
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()


def _write_error(writer: Any, e: OSError) -> Exception:
    from . import UsageError

    return UsageError(f"{writer.path}: cannot write the shards ({e.strerror or e})")


def _from_model(args: argparse.Namespace, dest: Path) -> tuple[Any, str]:
    from . import UsageError, hf

    text = hf.read_text(Path(args.text))
    tokenizer, model, device = hf.load(args.model, args.model_dtype, args.device, args.quiet)
    ctx = args.ctx
    hf.check_positions(args.model, model, ctx, f"--ctx {ctx}")
    tokens = hf.tokenize_text(tokenizer, text)
    n_win = len(tokens) // ctx
    if n_win == 0:
        raise UsageError(f"{args.text}: {len(tokens)} tokens, fewer than one window of --ctx {ctx}")
    windows = tokens[: n_win * ctx].reshape(n_win, ctx)
    size = hf.embedding_size(model)
    if size is not None and int(windows.max()) >= size:
        raise UsageError(
            f"{args.model}: the tokenizer gives id {int(windows.max())}, outside the model's "
            f"{size} embeddings"
        )
    width = hf.logits_width(model)
    if width is not None and args.k > width:
        raise UsageError(f"--k {args.k}: the model gives only {width} logits per position")
    config = getattr(model, "config", None)
    teacher = {
        "source": "model",
        "model": str(Path(args.model).resolve()),
        "revision": getattr(config, "_commit_hash", None),
        "model_type": getattr(config, "model_type", None),
        "model_dtype": str(getattr(model, "dtype", "")).rsplit(".", 1)[-1] or None,
        "text": str(Path(args.text).resolve()),
        "ctx": ctx,
        "bos_token_id": hf.bos_token_id(tokenizer),
        "dropped_tokens": int(len(tokens) - n_win * ctx),
    }
    writer = _writer(args, dest, teacher, (n_win, ctx))
    bar = _bar(args, n_win * ctx, "top-k")
    logits = hf.window_logits(
        model, windows, device, args.batch_size, name=args.model, all_positions=True
    )
    _write(writer, zip(logits, windows, strict=True), bar, args.model)
    dropped = len(tokens) - n_win * ctx
    note = f", {dropped} trailing tokens dropped" if dropped else ""
    return writer, f"{n_win} windows of {args.model}{note}"


def _from_logits(args: argparse.Namespace, dest: Path) -> tuple[Any, str]:
    from . import UsageError, readers

    try:
        f = readers.open_array(args.logits)
    except readers.InputError as e:
        raise UsageError(str(e)) from None
    try:
        if f.dtype.kind != "f":
            raise UsageError(f"{f.path}: holds {f.dtype} values; expected floating point logits")
        ndim = len(f.shape)
        if ndim == 0:
            raise UsageError(f"{f.path}: is a scalar; expected logits of shape [..., V]")
        if not -ndim <= args.axis < ndim:
            raise UsageError(f"--axis {args.axis} is out of range for shape {f.shape}")
        ax = args.axis % ndim
        vocab = f.shape[ax]
        if vocab == 0:
            raise UsageError(f"{f.path}: has no categories along --axis {args.axis}")
        if args.k > vocab:
            raise UsageError(f"--k {args.k}: {f.path} holds only {vocab} logits per token")
        token_shape = tuple(d for i, d in enumerate(f.shape) if i != ax)
        _, _, key = args.logits.partition("::")
        teacher = {"source": "logits", "logits": str(f.path.resolve()), "array": key or None}
        # the vocabulary size is known without a block: a file of 0 tokens is an empty store
        writer = _writer(args, dest, teacher, token_shape, vocab)
        chunk = max(1, CHUNK_BYTES // (vocab * f.dtype.itemsize))
        bar = _bar(args, math.prod(token_shape), "top-k")
        blocks = ((block, None) for block in f.rows(ax, chunk))
        try:
            _write(writer, blocks, bar, str(f.path))
        except readers.InputError as e:  # raised while streaming, e.g. a truncated member
            raise UsageError(str(e)) from None
    finally:
        f.close()
    return writer, str(f.path)
