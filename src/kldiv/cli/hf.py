"""Model runs with Hugging Face transformers: ``kldiv llama-base`` and ``kldiv compare BASE.kld
--model DIR`` (the ``kldiv[hf]`` extra: PyTorch, transformers, safetensors).

``kldiv llama-base --model DIR --text FILE --ctx N --out BASE.kld`` writes a llama.cpp
KL-divergence base file from a reference model, on the windows ``llama-perplexity`` cuts from
the same text:

1. the text is the file's bytes as UTF-8, less one trailing newline (as ``-f`` reads it);
2. ``tokens`` = the whole text tokenized at once, with the tokenizer's BOS first when the
   tokenizer adds one (no EOS, which llama.cpp refuses); special-token text in the file
   (``<s>``, ``<|endoftext|>``) is plain text, as ``llama-perplexity`` tokenizes it
   (``parse_special=false``);
3. at least ``2·n_ctx`` tokens, as ``llama-perplexity`` requires; ``n_chunk = len(tokens) //
   n_ctx`` (at most ``--chunks``), the windows are consecutive slices of ``n_ctx`` tokens, the
   remainder is dropped;
4. each window is evaluated from an empty context with its first token replaced by BOS when the
   tokenizer adds one (the file keeps the original tokens);
5. the logits at the scored positions ``n_ctx/2 … n_ctx − 2``, in float32, are quantized row by
   row as llama.cpp does (:func:`kldiv.llamacpp.write_base`).

Memory stays at one batch of windows: the model's logits for ``--batch`` windows (only the
positions from ``n_ctx/2`` on when the model accepts ``logits_to_keep``) and their float32
copy, written out before the next batch runs.

``kldiv compare BASE.kld --model DIR`` runs a model (any quantization transformers loads) on
the file's windows, ``base.windows(bos)``, with the BOS of DIR's tokenizer when it adds one,
and scores its float32 logits at the scored positions against the stored log-probabilities,
window by window, through the same statistics as ``kldiv compare BASE.kld CAND``; no logits
are written to disk.

Both commands refuse, before evaluating anything, windows longer than the model's positions
(``max_position_embeddings`` or ``n_positions`` of its config) and, for ``compare``, a model whose
logits or BOS do not fit the file's vocabulary; a failing forward pass is a one-line error
naming the model and the windows.

transformers and PyTorch are imported inside these commands only; ``kldiv.cli`` checks that they
import before calling here, and without them a command fails with one line naming the
``kldiv[hf]`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

__all__ = [
    "DTYPES",
    "load",
    "embedding_size",
    "bos_token_id",
    "tokenize_text",
    "window_logits",
    "read_text",
    "logits_width",
    "max_positions",
    "check_positions",
    "llama_base",
]

DTYPES = ("auto", "bfloat16", "float16", "float32")
"""The ``--dtype`` choices: ``auto`` (default) is the checkpoint's own dtype (its config's),
which is also what a quantized checkpoint needs."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _device(name: str) -> Any:
    import torch

    from . import UsageError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: expected auto, cpu or cuda[:index]") from None
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise UsageError(f"--device {name}: expected auto, cpu or cuda[:index]")
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
    ):
        raise UsageError(f"--device {name}: no such CUDA device here")
    return dev


def _version(v: str) -> tuple[int, int]:
    parts = [int(x) for x in re.findall(r"\d+", v)[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def _accelerate_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("accelerate") is not None
    except (ImportError, ValueError):
        return False


def _load_kwargs(dtype: str, dev: Any) -> dict[str, Any]:
    """The keyword arguments of ``from_pretrained``: the dtype, nothing downloaded, and, for a
    CUDA device when accelerate is installed, ``device_map`` (the weights go straight to the GPU,
    as quantized checkpoints need). Without accelerate the model loads on the CPU and
    :func:`load` moves it: ``device_map`` needs accelerate, which ``kldiv[hf]`` does not bring."""
    import torch
    import transformers

    # transformers 4.56 renamed torch_dtype to dtype
    key = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"
    kwargs: dict[str, Any] = {key: dtype if dtype == "auto" else getattr(torch, dtype)}
    kwargs["local_files_only"] = True
    if dev.type == "cuda" and _accelerate_installed():
        kwargs["device_map"] = str(dev)
    return kwargs


def load(model_dir: str, dtype: str, device: str, quiet: bool) -> tuple[Any, Any, Any]:
    """The tokenizer and ``AutoModelForCausalLM`` of a local directory, in eval mode, and the
    device the input ids go to. Nothing is downloaded (``local_files_only``). Problems raise
    the command's one-line ``UsageError``."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import UsageError

    path = Path(model_dir)
    if not path.exists():
        raise UsageError(f"{path}: no such directory; --model takes a local model directory")
    if not path.is_dir():
        raise UsageError(f"{path}: is not a directory; --model takes a local model directory")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    dev = _device(device)
    if quiet:
        transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ...
        raise UsageError(f"{path}: cannot load a tokenizer ({_first_line(e)})") from None
    kwargs = _load_kwargs(dtype, dev)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        raise UsageError(
            f"{path}: cannot load a causal language model ({_first_line(e)})"
        ) from None
    model.eval()
    emb = _embeddings(model)
    where = emb.weight.device if emb is not None else dev
    if where.type != dev.type:
        try:
            model.to(dev)
        except Exception as e:  # e.g. a quantized model that cannot move
            raise UsageError(f"{path}: cannot move the model to {dev} ({_first_line(e)})") from None
        where = dev
    return tokenizer, model, where


def _embeddings(model: Any) -> Any:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return emb if hasattr(emb, "weight") else None


def embedding_size(model: Any) -> int | None:
    """How many token ids the model embeds (None when it does not say)."""
    emb = _embeddings(model)
    return None if emb is None else int(emb.weight.shape[0])


def logits_width(model: Any) -> int | None:
    """How many logits the model gives per position (its output layer's size, else its
    config's ``vocab_size``), or None when it does not say."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    width = getattr(head, "out_features", None)
    if isinstance(width, int) and width > 0:
        return width
    weight = getattr(head, "weight", None)
    if weight is not None and len(weight.shape) == 2:
        return int(weight.shape[0])
    size = getattr(_text_config(model), "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def _text_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    get = getattr(config, "get_text_config", None)
    if callable(get):
        with contextlib.suppress(Exception):
            return get()
    return config


def max_positions(model: Any) -> tuple[int, str] | None:
    """The number of positions the model takes and the config field that says so
    (``max_position_embeddings`` or ``n_positions``), or None when its config has neither."""
    config = _text_config(model)
    for name in ("max_position_embeddings", "n_positions"):
        n = getattr(config, name, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n, name
    return None


def check_positions(model_dir: str, model: Any, n_ctx: int, what: str) -> None:
    """Refuse windows of ``n_ctx`` tokens beyond the model's positions (``what`` names where
    ``n_ctx`` comes from, for the message)."""
    from . import UsageError

    limit = max_positions(model)
    if limit is not None and n_ctx > limit[0]:
        raise UsageError(
            f"{model_dir}: {what} gives windows of {n_ctx} tokens, beyond the model's "
            f"{limit[0]} positions ({limit[1]} of its config)"
        )


def bos_token_id(tokenizer: Any) -> int | None:
    """The tokenizer's BOS id when it adds one (``tokenizer(text).input_ids`` starts with it),
    else ``None``: what llama.cpp puts first in every window."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if len(ids) and int(ids[0]) == int(bos) else None


def tokenize_text(tokenizer: Any, text: str) -> np.ndarray:
    """The token ids of the whole text, BOS first when the tokenizer adds one, no other special
    token, and special-token text (``<s>``, ``</s>``, ``<|endoftext|>``) tokenized as plain
    text: ``common_tokenize(text, add_special=true, parse_special=false)`` of
    ``llama-perplexity``."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)[
        "input_ids"
    ]
    bos = bos_token_id(tokenizer)
    out = np.asarray(ids, dtype=np.int64).reshape(-1)
    if bos is not None:
        out = np.concatenate([np.array([bos], dtype=np.int64), out])
    return out


def _keep_kwargs(model: Any, keep: int) -> dict[str, int]:
    """Ask the model for the logits of the last ``keep`` positions only, when it can."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    for name in ("logits_to_keep", "num_logits_to_keep"):  # transformers >= 4.50, then 4.45
        if name in params:
            return {name: keep}
    return {}


def window_logits(
    model: Any,
    windows: np.ndarray,
    device: Any,
    batch: int,
    on_window: Callable[[], None] | None = None,
    name: str = "the model",
    all_positions: bool = False,
) -> Iterator[np.ndarray]:
    """Yield, for each window in order, the model's float32 logits at the scored positions
    ``n_ctx/2 … n_ctx − 2``, ``[n_scored, V]`` (with ``all_positions``: at every position,
    ``[n_ctx, V]``). ``batch`` windows run per forward pass (equal lengths: no padding, no
    attention mask); only one batch of logits exists at a time. A failing forward pass raises
    the command's one-line ``UsageError`` naming ``name`` (the model directory) and the
    windows."""
    import torch

    from . import UsageError

    n_chunk, n_ctx = windows.shape
    first, stop = (0, n_ctx) if all_positions else (n_ctx // 2, n_ctx - 1)
    keep = n_ctx - first  # positions first .. n_ctx - 1
    extra = {} if all_positions else _keep_kwargs(model, keep)
    for i in range(0, n_chunk, batch):
        j = min(i + batch, n_chunk) - 1
        try:
            ids = torch.from_numpy(np.ascontiguousarray(windows[i : j + 1])).to(device)
            with torch.inference_mode():
                out = model(input_ids=ids, use_cache=False, **extra).logits
                rows = out[:, -keep:][:, : stop - first].float().cpu().numpy()
            del out
        # whatever the model's code raises (shape, index, CUDA and memory errors) ends the
        # command with one line; torch.OutOfMemoryError is a RuntimeError
        except (RuntimeError, IndexError, ValueError, TypeError, AssertionError) as e:
            where = f"window {i}" if i == j else f"windows {i}..{j}"
            hint = ""
            if "out of memory" in str(e).lower():
                hint = "; try " + ("--batch 1, " if batch > 1 else "") + "a smaller --ctx"
            raise UsageError(
                f"{name}: the forward pass failed on {where} of {n_ctx} tokens "
                f"({_first_line(e)}){hint}"
            ) from None
        for r in rows:
            yield r
            if on_window is not None:
                on_window()


def read_text(path: Path) -> str:
    """The text of ``path`` as ``llama-perplexity -f`` reads it: UTF-8, less one trailing
    newline. Problems raise the command's one-line ``UsageError``."""
    from . import UsageError

    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory; --text takes a text file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: is not UTF-8 text (byte {e.start})") from None
    return text[:-1] if text.endswith("\n") else text  # llama.cpp's -f drops one newline


def _check_new_file(dest: Path) -> None:
    from . import UsageError

    if os.path.lexists(dest):
        raise UsageError(
            f"{dest}: already exists; kldiv never overwrites results, pass a new --out"
        )
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{parent}: the parent of --out is not a writable directory")


@contextlib.contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A hidden directory beside ``dest`` to write into, removed on any failure and on the
    signals ``kldiv`` handles (Ctrl-C, SIGTERM, SIGHUP); the caller renames its file to
    ``dest``."""
    from . import UsageError, removed_on_signal

    parent = dest.parent if str(dest.parent) else Path(".")
    tmp = parent / f".{dest.name[:200]}.{secrets.token_hex(4)}"
    with removed_on_signal(tmp):
        try:
            os.mkdir(tmp)
        except OSError as e:
            raise UsageError(f"{parent}: cannot write there ({e.strerror})") from None
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def llama_base(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``kldiv llama-base``: a llama.cpp base file from a Hugging Face reference model."""
    out = out or sys.stdout
    from tqdm.auto import tqdm

    from ..llamacpp import write_base
    from . import UsageError

    if args.ctx < 3:
        raise UsageError(f"--ctx {args.ctx}: expected at least 3 tokens per window")
    if args.batch < 1:
        raise UsageError(f"--batch {args.batch}: expected a positive number of windows")
    if args.chunks is not None and args.chunks < 1:
        raise UsageError(f"--chunks {args.chunks}: expected a positive number of windows")
    if not args.out.strip():
        raise UsageError("--out: expected a file name, got an empty string")
    dest = Path(args.out)
    _check_new_file(dest)  # before any work: a bad --out must not cost a long run
    text = read_text(Path(args.text))
    tokenizer, model, device = load(args.model, args.dtype, args.device, args.quiet)
    n_ctx = args.ctx
    check_positions(args.model, model, n_ctx, f"--ctx {n_ctx}")
    tokens = tokenize_text(tokenizer, text)
    if len(tokens) < 2 * n_ctx:  # llama-perplexity: "you need at least 2*n_ctx tokens"
        raise UsageError(
            f"{args.text}: {len(tokens)} tokens; llama-perplexity needs at least 2·n_ctx = "
            f"{2 * n_ctx} tokens for --ctx {n_ctx}"
        )
    n_chunk = len(tokens) // n_ctx
    if args.chunks is not None:
        n_chunk = min(n_chunk, args.chunks)
    stored = tokens[: n_chunk * n_ctx].reshape(n_chunk, n_ctx)
    windows = stored.copy()
    bos = bos_token_id(tokenizer)
    if bos is not None:
        windows[:, 0] = bos
    size = embedding_size(model)
    if size is not None and int(windows.max()) >= size:
        raise UsageError(
            f"{args.model}: the tokenizer gives id {int(windows.max())}, outside the model's "
            f"{size} embeddings"
        )
    bar = tqdm(
        total=n_chunk * n_ctx,
        unit="tok",
        unit_scale=True,
        desc="evaluating",
        file=sys.stderr,
        disable=args.quiet or None,
        leave=False,
    )
    logits = window_logits(
        model, windows, device, args.batch, lambda: bar.update(n_ctx), name=args.model
    )
    with _staging(dest) as tmp:
        # a short name inside the staging directory: write_base adds its own temporary name
        # beside it, which a long --out would push past the 255 bytes of a file name
        staged = tmp / "base.kld"
        try:
            write_base(staged, stored, logits)
        except ValueError as e:  # e.g. NaN logits from a broken checkpoint
            raise UsageError(f"{args.model}: {' '.join(str(e).splitlines())}") from None
        except OSError as e:
            raise UsageError(f"{dest}: cannot write the base file ({e.strerror})") from None
        try:
            os.replace(staged, dest)
        except OSError as e:
            raise UsageError(f"{dest}: cannot write the base file ({e.strerror})") from None
    bar.close()
    n_scored = n_ctx - 1 - n_ctx // 2
    print(
        f"wrote {dest}: {n_chunk} windows of {n_ctx} tokens ({n_chunk * n_scored} scored), "
        f"V = {_vocab(dest)}, "
        f"BOS {bos if bos is not None else 'not added'}; score a GGUF with: llama-perplexity -m "
        f"MODEL.gguf --kl-divergence-base {dest} --kl-divergence -c {n_ctx}",
        file=out,
    )
    return 0


def _vocab(path: Path) -> int:
    from ..llamacpp import read_base

    with read_base(path, check_tokens=False) as base:
        return base.n_vocab
