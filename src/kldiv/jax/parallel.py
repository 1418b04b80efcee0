"""The divergence family over vocabulary slices, inside ``jax.shard_map``.

When an LM head is sharded by vocabulary over a mesh axis, each device holds ``[..., V_r]``
columns of the logits. :func:`vocab_parallel_divergence` turns the slices of both arguments
into the exact full-vocabulary divergence, the value of ``kldiv.divergence`` on the gathered
logits, and gives each device the gradient of its own slice. It runs inside a function that
``jax.shard_map`` maps over a mesh with a vocabulary axis (and, optionally, a data-parallel
axis), under ``jax.jit`` or not.

How (per row; T the temperature, x a side's logits divided by T):

1. Each device reduces its slice of each ``"logits"`` side to two numbers per row: the
   slice's maximum m_r and ``lz_r = log Σ exp(x − m_r)`` (a slice that is all ``-inf`` in
   that row gives m_r = −inf, and adds nothing).
2. **Collective 1**: one ``all_gather`` of these statistics, ``[2k, ...]`` for k logits sides,
   over the vocabulary axis. Every device then holds the row's global maximum
   M = max_r m_r and ``log S = log Σ_r exp(m_r − M + lz_r)``, and with them its slice of the
   normalised log-probabilities ``(x − M) − log S``. Shifting by the global maximum before
   anything else keeps a large common offset of the logits from costing precision.
3. Each device evaluates the core, ``kldiv.divergence(..., form="log_probs",
   reduction="none")``, on its slice: every divergence of the family is a sum of elementwise
   terms over the vocabulary, so this is the slice's share of each row's value. For the
   gradient it also takes h, the derivative of that share with respect to the slice's
   log-probabilities, through the core's own zero-support rules.
4. **Collective 2**: one ``psum`` over the vocabulary axis of ``[1 + g, ...]``: the row values
   and, for each of the g differentiated logits sides, Σh.
5. The gradient of a logits slice is ``(h − softmax(x)·Σh) / T``: the softmax's chain rule
   with the global Σh, computed in the forward pass and kept for the backward pass, which
   only scales it by the incoming cotangent. The backward pass runs no collective.

Sides given as ``"probs"`` or ``"log_probs"`` need no statistics: with no ``"logits"`` side
collective 1 is skipped. A ``jax.custom_vjp`` carries the rule, and it knows which arguments
are differentiated: a teacher that is not gets no Σh, no gradient computed and no gradient
kept.

With ``data_axis_name`` the ``"mean"`` and ``"sum"`` reductions add one ``psum`` of one or two
numbers over the data axis: the local sum and, for ``"mean"`` without ``num_items``, the local
count of kept rows. The mean is the global sum over the global count, never a mean of
per-device means.

Under ``shard_map(..., check_vma=False)`` JAX hands each device 1/n of the cotangent of an
output it cannot know is replicated, so there the backward pass adds one ``psum`` of the
rows' cotangent (``[...]``, one number per row) over the vocabulary axis (JAX's own backward
of the data axis' ``psum`` is then a ``psum`` too). With the default ``check_vma=True`` the
backward pass runs no collective. ``shard_map`` called outside ``jax.jit`` evaluates the
value alone (JAX does not run this rule there; under ``jax.grad`` it traces instead).

Zero support is the core's: ``-inf`` logits are zero probabilities with zero gradient,
``p > 0`` against ``q = 0`` gives ``+inf`` (with the core's finite gradient), a row that is
``-inf`` everywhere is NaN, and so is a row with a ``+inf`` logit. No epsilon is added.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from .. import _check
from .. import _namespace as ns
from .._defaults import (
    JS_BETA,
    REDUCTION,
    SKEW_ALPHA,
    TEMPERATURE,
    Form,
    FormSpec,
    Kind,
    Reduction,
)
from .._kinds import KIND_NAMES, params_of
from ..divergences import divergence

__all__ = ["vocab_parallel_divergence", "pad_vocab"]

Array = Any
# a mesh axis name, or a tuple of names (the axes that together hold the slices)
AxisName = Hashable

INF = math.inf
# Masked rows are overwritten before any arithmetic with values valid in every form (as in
# the core), so that NaN there reaches neither the statistics, the value nor the gradient.
_MASK_FILL = {"probs": 1.0, "logits": 0.0, "log_probs": 0.0}


@dataclass(frozen=True)
class _Config:
    """What the rows depend on besides the arrays (hashable: a static argument)."""

    kind: Kind
    params: tuple[tuple[str, float], ...]
    forms: tuple[Form, Form]
    temperature: float
    axis_name: Any  # None: the arrays hold the whole vocabulary
    # shard_map(check_vma=False) hands each device 1/n of a replicated output's cotangent,
    # so the backward pass must add the devices' shares
    sum_cotangent: bool = False


def _psum(x: Array, axis_name: Any) -> Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _normalise(cfg: _Config, p: Array, q: Array) -> list[Array]:
    """Both sides as the core's inputs: each ``"logits"`` slice tempered and normalised with
    the whole row's log-sum-exp (collective 1), the other forms as given."""
    sides = [p, q]
    logits = [i for i, f in enumerate(cfg.forms) if f == "logits"]
    if not logits:
        return sides
    t = cfg.temperature
    stats = []
    for i in logits:
        x = sides[i] / t if t != 1.0 else sides[i]
        sides[i] = x
        m = jnp.max(x, axis=-1)
        # a slice that is all -inf in a row: shift by 0, so that its sum is 0 and c = -inf
        # (x − m would be −inf − (−inf) = NaN)
        shift = jnp.where(m == -INF, 0.0, m)
        stats += [m, jnp.log(jnp.sum(jnp.exp(x - shift[..., None]), axis=-1))]
    packed = jnp.stack(stats)
    every = packed[None] if cfg.axis_name is None else jax.lax.all_gather(packed, cfg.axis_name)
    for j, i in enumerate(logits):
        m_all, lz_all = every[:, 2 * j], every[:, 2 * j + 1]
        top = jnp.max(m_all, axis=0)
        # Σ_r e^(m_r − M)·Σ e^(x − m_r): m_r − M is formed before lz_r is added, exactly where
        # the maxima are close. An all -inf slice adds e^−inf = 0; a row that is -inf on every
        # device gets m_r − M = −inf − (−inf) = NaN, as in the core.
        log_s = jnp.log(jnp.sum(jnp.exp((m_all - top) + lz_all), axis=0))
        sides[i] = (sides[i] - top[..., None]) - log_s[..., None]
    return sides


def _slice_rows(cfg: _Config, a: Array, b: Array) -> Array:
    """The slice's share of each row's divergence: the core on its log-probabilities."""
    fa, fb = ("log_probs" if f == "logits" else f for f in cfg.forms)
    return divergence(a, b, cfg.kind, form=(fa, fb), reduction="none", **dict(cfg.params))


def _rows_value(cfg: _Config, p: Array, q: Array) -> Array:
    """Per-row divergence ``[...]`` (the same on every device of the vocabulary axis) from
    the slices ``[..., V_r]`` of both arguments."""
    a, b = _normalise(cfg, p, q)
    return _psum(_slice_rows(cfg, a, b), cfg.axis_name)  # collective 2


_rows = jax.custom_vjp(_rows_value, nondiff_argnums=(0,))


def _rows_fwd(cfg: _Config, p: Any, q: Any) -> tuple[Array, tuple[Array | None, Array | None]]:
    # p and q are CustomVJPPrimal (symbolic zeros): .perturbed says which are differentiated
    args = _normalise(cfg, p.value, q.value)
    want = [i for i, x in enumerate((p, q)) if x.perturbed]

    def share(*diff: Array) -> Array:
        full = list(args)
        for i, d in zip(want, diff, strict=True):
            full[i] = d
        return _slice_rows(cfg, *full)

    if want:
        local, pull = jax.vjp(share, *(args[i] for i in want))
        hs = pull(jnp.ones_like(local))
    else:
        local, hs = share(), ()
    logits = [j for j, i in enumerate(want) if cfg.forms[i] == "logits"]
    sums = [jnp.sum(hs[j], axis=-1) for j in logits]
    if sums:  # collective 2: the values and each differentiated logits side's Σh
        total = _psum(jnp.stack([local, *sums]), cfg.axis_name)
        value, sums = total[0], [total[1 + k] for k in range(len(sums))]
    else:  # collective 2: the values alone
        value = _psum(local, cfg.axis_name)
    grads: list[Array | None] = [None, None]
    for j, i in enumerate(want):
        g = hs[j]
        if cfg.forms[i] == "logits":
            # the softmax's chain rule with the whole row's Σh; exp(−inf) = 0 keeps a zero
            # probability's gradient 0
            g = g - jnp.exp(args[i]) * sums[logits.index(j)][..., None]
            if cfg.temperature != 1.0:
                g = g / cfg.temperature
        grads[i] = g
    return value, (grads[0], grads[1])


def _rows_bwd(
    cfg: _Config, res: tuple[Array | None, Array | None], ct: Array
) -> tuple[Array | None, Array | None]:
    if cfg.sum_cotangent:
        ct = jax.lax.psum(ct, cfg.axis_name)
    gp, gq = (None if g is None else ct[..., None] * g for g in res)
    return gp, gq


_rows.defvjp(_rows_fwd, _rows_bwd, symbolic_zeros=True)


def vocab_parallel_divergence(
    p: Array,
    q: Array,
    kind: Kind = "kl",
    *,
    vocab_axis_name: AxisName | None,
    data_axis_name: AxisName | None = None,
    form: FormSpec = "logits",
    axis: int = -1,
    reduction: Reduction = REDUCTION,
    mask: Array | None = None,
    weight: Array | None = None,
    num_items: Any = None,
    temperature: float = TEMPERATURE,
    beta: float = JS_BETA,
    alpha: float = SKEW_ALPHA,
) -> Array:
    """The divergence ``kind`` between ``p`` and ``q`` from this device's slices of their
    category axis, for use inside ``jax.shard_map``; equal to ``kldiv.divergence(p, q, kind,
    ...)`` on the gathered arrays.

    ``kind`` is one of ``"kl"`` (KL(P‖Q)), ``"reverse_kl"``, ``"js"`` (with ``beta``),
    ``"skew_kl"`` and ``"skew_reverse_kl"`` (with ``alpha``), ``"symmetric_kl"`` and ``"tv"``,
    as for :func:`kldiv.divergence`, with ``p`` the teacher (target) and ``q`` the student
    (model). ``beta`` is used only by ``"js"``, ``alpha`` only by the skew kinds.

    Parameters
    ----------
    p, q : jax.Array
        This device's slices ``[..., V_r]`` of both arguments along ``axis``: the same rows on
        every device of ``vocab_axis_name``, the devices' slices in the order of that axis
        making up the vocabulary. Each device gets the gradient of its own slice, for both
        arguments (a teacher that is not differentiated costs nothing for it).
    vocab_axis_name : mesh axis name, tuple of names, or None
        The ``shard_map`` mesh axis (or axes) over which the vocabulary is split. Required;
        ``None`` means the arrays hold the whole vocabulary (no collective on it: the same
        code path, to check a setup on one device).
    data_axis_name : mesh axis name, tuple of names, or None
        A mesh axis over which the *rows* are split. ``"mean"`` and ``"sum"`` then reduce over
        the rows of every device of that axis (one ``psum`` of the local sum and count: the
        global mean, never a mean of means), and ``num_items``, if given, is the global
        denominator. ``"none"`` returns this device's rows and runs no collective on it.
    form : {"logits", "log_probs", "probs"} or a pair of them
        What the slices hold; **default ``"logits"``** (the core's default is ``"probs"``).
        ``"logits"`` get the whole row's log-softmax; ``"log_probs"`` and ``"probs"`` slices
        are taken as already normalised over the whole vocabulary (nothing checks that).
    axis : int
        The category axis (default -1).
    reduction, mask, weight, num_items, temperature
        As for :func:`kldiv.divergence`: ``mask`` (bool or 0/1 integers) and ``weight`` are per
        row, broadcastable to the local batch shape, masked rows may hold anything (NaN
        included) and get a zero gradient; ``temperature`` divides logits (both sides must be
        ``"logits"``) and never multiplies the result by ``temperature**2``.

    Returns
    -------
    jax.Array
        ``"mean"``/``"sum"``: a 0-d array, the same on every device of both axes. ``"none"``:
        this device's rows (the batch shape), the same on every device of the vocabulary axis.
        float32 for half-precision inputs, else the promoted input dtype.

    Collectives per call, on the vocabulary axis: one ``all_gather`` of ``[2k, ...]`` (k the
    number of ``"logits"`` sides; none when k = 0) and one ``psum`` of ``[1 + g, ...]`` (g the
    number of differentiated ``"logits"`` sides; g = 0 when nothing is differentiated). On the
    data axis, for ``"mean"`` and ``"sum"``: one ``psum`` of one or two numbers. None in the
    backward pass, under the default ``shard_map(check_vma=True)``; with ``check_vma=False``
    the backward pass sums the rows' cotangent over the vocabulary axis (one ``psum`` of one
    number per row), since JAX then hands each device a share of it.

    Uneven splits: pad both arguments' category axis with ``-inf`` logits (or ``-inf``
    log-probabilities, or ``0`` probabilities) to a multiple of the axis size, for instance
    with :func:`pad_vocab`. Padded entries are zero probabilities on both sides: they add 0
    to every divergence of the family and get a zero gradient. A device whose whole slice is
    ``-inf`` for a row is fine; a row that is ``-inf`` everywhere is NaN, as in the core.

    Zero support, gradients and precision are the core's: ``-inf`` logits are zero
    probabilities with zero gradient, ``p > 0`` against ``q = 0`` is ``+inf`` with a finite
    gradient, a ``+inf`` logit makes its row NaN, and no epsilon is added anywhere.

    >>> import jax, jax.numpy as jnp, kldiv
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> from kldiv.jax import vocab_parallel_divergence
    >>> mesh = Mesh(jax.devices()[:1], ("vocab",))
    >>> t = jnp.array([[2.0, 0.5, -1.0, 0.0]]); s = jnp.array([[1.0, 1.0, 0.0, -2.0]])
    >>> loss = jax.jit(jax.shard_map(
    ...     lambda t, s: vocab_parallel_divergence(t, s, "js", vocab_axis_name="vocab"),
    ...     mesh=mesh, in_specs=(P(None, "vocab"), P(None, "vocab")), out_specs=P()))
    >>> bool(jnp.allclose(loss(t, s), kldiv.js_div(t, s, form="logits")))
    True
    """
    if kind not in KIND_NAMES:
        raise ValueError(
            f"Expected `kind` to be one of {', '.join(map(repr, KIND_NAMES))}, got {kind!r}."
        )
    params = params_of(kind, beta, alpha)
    for name, value in params.items():
        params[name] = _check.check_unit_interval(name, value)
    forms = _check.check_forms(form)
    reduction = _check.check_reduction(reduction)
    num_items = _check.check_num_items(num_items, reduction)
    t = _check.check_temperature(temperature, forms)
    if vocab_axis_name is not None and vocab_axis_name == data_axis_name:
        raise ValueError(
            f"Expected different mesh axes for the vocabulary and the rows, got "
            f"vocab_axis_name=data_axis_name={vocab_axis_name!r}."
        )
    p, q = jnp.asarray(p), jnp.asarray(q)
    dtype = ns.compute_dtype(jnp, ("p", p), ("q", q))
    ax, batch, _ = _check.distribution_shape(p, q, axis)
    keep = None
    if mask is not None:
        mask = _check.as_mask("mask", jnp.asarray(mask), batch, weights_hint="`weight=`")
        keep = mask[..., None]
    if weight is not None:
        weight = jnp.asarray(weight)
        _check.check_row_array("weight", weight, batch, jnp, "weight")
        weight = weight.astype(dtype)
    if num_items is not None and not isinstance(num_items, float):
        num_items = jnp.asarray(num_items).astype(dtype)

    ndim = len(batch) + 1
    full = (*batch, p.shape[ax - ndim])  # the category counts agree (checked)
    sides = []
    for x, f in zip((p, q), forms, strict=True):
        x = jnp.moveaxis(jnp.reshape(x, (1,) * (ndim - x.ndim) + x.shape), ax, -1)
        x = jnp.broadcast_to(x.astype(dtype), full)
        if keep is not None:
            x = jnp.where(keep, x, _MASK_FILL[f])
        sides.append(x)
    unchecked = vocab_axis_name is not None and not any(_varies(x, vocab_axis_name) for x in sides)
    cfg = _Config(kind, tuple(params.items()), forms, t, vocab_axis_name, unchecked)
    try:
        values = _rows(cfg, *sides)
    except NotImplementedError:
        # shard_map outside jit evaluates values only, and refuses a custom_vjp with
        # symbolic zeros: the value is all it needs (differentiation traces a jaxpr instead)
        values = _rows_value(cfg, *sides)

    if weight is not None:
        values = values * weight
    if mask is not None:
        values = jnp.where(mask, values, 0.0)
    if reduction == "none":
        return jnp.broadcast_to(values, batch)
    total = jnp.sum(values)
    if reduction == "sum" or num_items is not None:
        if data_axis_name is not None:
            total = jax.lax.psum(total, data_axis_name)
        return total if reduction == "sum" else total / num_items
    if mask is None:
        count = jnp.asarray(math.prod(batch), dtype=total.dtype)
    else:
        count = jnp.sum(jnp.broadcast_to(mask, batch).astype(total.dtype))
    if data_axis_name is not None:
        total, count = jax.lax.psum(jnp.stack([total, count]), data_axis_name)
    return total / jnp.where(count > 0, count, 1.0)


def _varies(x: Array, axis_name: Any) -> bool:
    """Whether ``x`` is typed as varying over ``axis_name``: True for a slice inside
    ``shard_map(check_vma=True)`` (the default), False with ``check_vma=False``, where no
    value carries that type."""
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    aval = jax.typeof(x)
    # the type's varying axes: `manual_axis_type.varying` in current JAX, `vma` before
    kind = getattr(aval, "manual_axis_type", None)
    varying = kind.varying if kind is not None else getattr(aval, "vma", frozenset())
    return all(name in varying for name in names)


def pad_vocab(x: Array, num_shards: int, *, axis: int = -1, value: float = -INF) -> Array:
    """``x`` with its category axis padded at the end to a multiple of ``num_shards``.

    The default ``value=-inf`` suits logits and log-probabilities (a zero probability); pad
    probabilities with ``value=0.0``. Pad both arguments of a divergence the same way: the
    padded entries are then zero probabilities on both sides, which add 0 to every divergence
    of the family and get a zero gradient. Gradients flow back to ``x``'s own entries.

    >>> import jax.numpy as jnp
    >>> from kldiv.jax import pad_vocab
    >>> pad_vocab(jnp.zeros((2, 5)), 4).shape
    (2, 8)
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"Expected `num_shards` to be a positive int, got {num_shards!r}.")
    x = jnp.asarray(x)
    ax = _check.check_axis(axis, x.ndim)
    extra = -x.shape[ax] % num_shards
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[ax] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)
