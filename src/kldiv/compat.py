"""Other libraries' KL functions, reproduced exactly: argument order, reductions and quirks.

For porting code without changing its numbers, and for the tests that prove kldiv's parity
with the real packages. Every function here runs on NumPy, PyTorch and JAX arrays alike, and
each docstring says how the peer differs from the core (:func:`kldiv.kl_div`); use the core
for new code. Quirks are kept on purpose: a NaN where the peer gives NaN, a clip where the
peer clips.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import numpy as np

from . import _math
from . import _namespace as ns
from ._defaults import TorchReduction, TrlReduction, VerlKLPenalty

Array = Any

__all__ = [
    "torch_kl_div",
    "keras_kl_divergence",
    "mxnet_kl_div_loss",
    "tf_kl_from_logits",
    "optax_kl_divergence",
    "optax_kl_divergence_with_log_targets",
    "scipy_rel_entr",
    "trl_generalized_jsd_loss",
    "verl_kl_penalty",
]

KERAS_EPSILON = 1e-7  # keras.backend.epsilon()
MXNET_EPSILON = 1e-12  # gluon.loss.KLDivLoss: log(label + 1e-12)


def _xp(*arrays: Array) -> tuple[Any, list[Array]]:
    return ns.namespace(*arrays)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _peer(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Reproducing a peer's NaN and inf is the point here: silence NumPy's warnings about it."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if any(ns.is_numpy_array(a) for a in (*args, *kwargs.values())):
            with np.errstate(all="ignore"):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def _reduce_torch(xp: Any, loss: Array, reduction: str, batch: int) -> Array:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return xp.sum(loss)
    if reduction == "mean":
        return xp.mean(loss)
    if reduction == "batchmean":
        return xp.sum(loss) / batch if loss.ndim else xp.sum(loss)
    raise ValueError(
        f"torch_kl_div: reduction must be 'none', 'mean', 'batchmean' or 'sum', got {reduction!r}."
    )


@_peer
def torch_kl_div(
    input: Array, target: Array, reduction: TorchReduction = "mean", log_target: bool = False
) -> Array:
    """``torch.nn.functional.kl_div(input, target, reduction, log_target)``, exactly.

    ``input`` holds the model's log-probabilities, ``target`` the target's probabilities (or
    log-probabilities with ``log_target=True``): the model comes *first*, the reverse of
    :func:`kldiv.kl_div`. Pointwise ``xlogy(target, target) − target·input`` (or
    ``exp(target)·(target − input)``), then:

    * ``"mean"`` (PyTorch's default) divides by the number of *elements* N·V, i.e. the KL
      divided by V as well — not the KL of anything;
    * ``"batchmean"`` divides the sum by ``input.shape[0]`` only: the KL per row for 2-D
      input, but per *sequence*, not per token, for ``(B, T, V)``;
    * ``"sum"``, ``"none"`` as usual.

    Quirks kept: a target of 0 where ``input`` is ``-inf`` gives NaN (``0·inf``), and so does a
    log-target of ``-inf`` there. The core gives 0 for both and ``reduction="mean"`` is the
    per-distribution mean.
    """
    xp, (inp, tgt) = _xp(input, target)
    if log_target:
        loss = xp.exp(tgt) * (tgt - inp)
    else:
        loss = _torch_xlogy(xp, tgt, tgt) - tgt * inp
    return _reduce_torch(xp, loss, reduction, inp.shape[0] if inp.ndim else 1)


def _torch_xlogy(xp: Any, x: Array, y: Array) -> Array:
    """torch.xlogy: 0 where x == 0 (unless y is NaN), with torch's gradients: for ``y`` it is
    ``x/y``, NaN at x = y = 0, as ``F.kl_div``'s target gradient at a zero target is."""
    if ns.backend_name(xp) == "torch":
        import torch

        return torch.xlogy(x, y)
    return xp.where((x == 0) & ~xp.isnan(y), 0.0, x * xp.log(y))


@_peer
def keras_kl_divergence(y_true: Array, y_pred: Array) -> Array:
    """``keras.losses.kl_divergence(y_true, y_pred)`` (Keras 3), exactly.

    Target first, probabilities, summed over the last axis, one value per sample. Both
    arguments are first clipped to ``[1e-7, 1]`` (``keras.backend.epsilon()``), which turns an
    infinite KL (``y_pred = 0`` where ``y_true > 0``) into a finite one (≈ ``y_true·16.1``)
    and gives those positions zero gradient. The ``keras.losses.KLDivergence`` object then
    averages over the batch (``"sum_over_batch_size"``). The core gives +inf.
    """
    xp, (t, p) = _xp(y_true, y_pred)
    if t.dtype != p.dtype:
        t = xp.astype(t, p.dtype)
    t = xp.clip(t, KERAS_EPSILON, 1.0)
    p = xp.clip(p, KERAS_EPSILON, 1.0)
    return xp.sum(t * xp.log(t / p), axis=-1)


@_peer
def mxnet_kl_div_loss(
    pred: Array,
    label: Array,
    from_logits: bool = True,
    axis: int = -1,
    sample_weight: Array | None = None,
    weight: float | None = None,
    batch_axis: int = 0,
    average: bool = False,
) -> Array:
    """MXNet Gluon ``KLDivLoss(from_logits, axis, weight, batch_axis)(pred, label)``.

    Model first: ``pred`` holds log-probabilities when ``from_logits=True`` (the default — the
    name means "already log-softmaxed", not logits), else raw outputs that get a log-softmax
    along ``axis``. Pointwise ``label·(log(label + 1e-12) − pred)``, times ``weight`` and
    ``sample_weight``, then one value per sample over every axis but ``batch_axis``:
    ``average=False`` (the default) *sums* over those axes, which is what MXNet 1.9.1 does
    (checked against the real package: ``tests/fixtures/make_mxnet_fixtures.py``);
    ``average=True`` takes the mean instead, as the Gluon docs, older releases and the Gluon
    ``KLDivLoss`` tutorial do ("smaller than the true definition by a factor of the number of
    categories").

    Quirks kept: the ``1e-12`` inside the log (a label of 0 contributes 0, but ``pred = -inf``
    there gives NaN). The core uses no epsilon and gives 0 there.
    """
    xp, (pr, lb, sw) = _xp(pred, label, sample_weight)
    if not from_logits:
        pr = _math.log_softmax(xp, pr, axis)
    if lb.dtype != pr.dtype:
        lb = xp.astype(lb, pr.dtype)
    loss = lb * (xp.log(lb + MXNET_EPSILON) - pr)
    if weight is not None:
        loss = loss * weight
    if sw is not None:
        loss = loss * sw
    axes = tuple(i for i in range(loss.ndim) if i != batch_axis % loss.ndim)
    return xp.mean(loss, axis=axes) if average else xp.sum(loss, axis=axes)


@_peer
def tf_kl_from_logits(logits_p: Array, logits_q: Array, axis: int = -1) -> Array:
    """KL(softmax(p)‖softmax(q)) by the TensorFlow idiom
    ``softmax_cross_entropy_with_logits(labels=softmax(p), logits=q) −
    softmax_cross_entropy_with_logits(labels=softmax(p), logits=p)``, per row.

    Target first. The difference of two cross-entropies cancels catastrophically when the
    distributions are close (the result can be slightly negative in float32), and a ``-inf``
    logit in ``p`` gives NaN (``0·inf`` inside the cross-entropy). The core computes the sum
    of ``p·(log p − log q)`` directly: exact at zero, never negative beyond rounding.
    """
    xp, (a, b) = _xp(logits_p, logits_q)
    lp = _math.log_softmax(xp, a, axis)
    lq = _math.log_softmax(xp, b, axis)
    p = xp.exp(lp)
    ce_q = -xp.sum(p * lq, axis=axis)
    ce_p = -xp.sum(p * lp, axis=axis)
    return ce_q - ce_p


@_peer
def optax_kl_divergence(log_predictions: Array, targets: Array, axis: int = -1) -> Array:
    """``optax.losses.kl_divergence(log_predictions, targets, axis)``, exactly.

    Model first, as log-probabilities; targets as probabilities; summed over ``axis``, no
    batch reduction. Pointwise ``targets·(where(targets == 0, 0, log targets) −
    log_predictions)``: a target of 0 where the prediction is ``-inf`` gives NaN
    (``0·inf``), and the gradient for ``targets`` at 0 is NaN. The core gives 0 with finite
    gradients.
    """
    xp, (lpred, t) = _xp(log_predictions, targets)
    zero = t == 0
    log_t = xp.where(zero, 0.0, xp.log(t))  # optax's single where: its gradient at 0 is NaN
    return xp.sum(t * (log_t - lpred), axis=axis)


@_peer
def optax_kl_divergence_with_log_targets(
    log_predictions: Array, log_targets: Array, axis: int = -1
) -> Array:
    """``optax.losses.kl_divergence_with_log_targets(log_predictions, log_targets, axis)``.

    Pointwise ``exp(log_targets)·(log_targets − log_predictions)`` summed over ``axis``: NaN
    where both are ``-inf``. The core gives 0.
    """
    xp, (lpred, lt) = _xp(log_predictions, log_targets)
    return xp.sum(xp.exp(lt) * (lt - lpred), axis=axis)


@_peer
def scipy_rel_entr(x: Array, y: Array) -> Array:
    """``scipy.special.rel_entr(x, y)`` (SciPy 1.17), elementwise: ``x·log(x/y)`` for x, y > 0
    (through ``log1p`` near x = y and ``log x − log y`` when x/y over- or underflows, as SciPy
    does); 0 for x = 0, y ≥ 0; +inf otherwise (x > 0 = y, or any negative argument); NaN
    propagates.

    Target first and exact, like the core, but elementwise: sum it over the categories
    yourself, or call ``kldiv.kl_div(x, y, reduction="none")``.
    """
    xp, (a, b) = _xp(x, y)

    # integer and boolean arrays compute in float64 as in SciPy (float32 where JAX lacks x64);
    # a Python number is weak, as in NumPy 2: it takes the other argument's float dtype
    def weak(orig: Any) -> bool:
        return isinstance(orig, int | float) and not hasattr(orig, "dtype")

    pairs = ((a, x), (b, y))
    strong = [v.dtype for v, o in pairs if not weak(o) and xp.isdtype(v.dtype, "real floating")]

    def as_float(v: Array, orig: Any) -> Array:
        if weak(orig) and strong:
            return xp.astype(v, strong[0])
        if xp.isdtype(v.dtype, "real floating"):
            return v
        return xp.astype(v, ns.widest_float(xp))

    a, b = (as_float(v, o) for v, o in pairs)
    if a.dtype != b.dtype:
        dtype = xp.result_type(a, b) if hasattr(xp, "result_type") else a.dtype
        a, b = xp.astype(a, dtype), xp.astype(b, dtype)
    both = (a > 0) & (b > 0)
    sa, sb = xp.where(both, a, 1.0), xp.where(both, b, 1.0)
    r = sa / sb
    # SciPy's branches: log1p((x − y)/y) near x = y (no cancellation), log(x/y) when the ratio
    # is a normal number, log x − log y when it overflows or is subnormal (a subnormal ratio
    # has lost digits: 2.22e-308/1e15 would be off by 1.6e-4, SciPy's gh-20710)
    near = (r > 0.5) & (r < 2.0)
    fine = (r >= xp.finfo(r.dtype).smallest_normal) & (r < float("inf"))
    inner = xp.where(
        near,
        sa * xp.log1p((sa - sb) / sb),
        xp.where(fine, sa * xp.log(xp.where(fine, r, 1.0)), sa * (xp.log(sa) - xp.log(sb))),
    )
    zero = (a == 0) & (b >= 0)
    # constants built like `inner`, so float32 stays float32 (two Python floats would not)
    otherwise = xp.where(zero, xp.zeros_like(inner), xp.full_like(inner, float("inf")))
    out = xp.where(both, inner, otherwise)
    nan = xp.isnan(a) | xp.isnan(b)
    return xp.where(nan, xp.full_like(out, float("nan")), out)


def _log_add_exp(xp: Any, a: Array, b: Array) -> Array:
    """``torch.logsumexp(torch.stack([a, b]), 0)``: -inf where both are -inf."""
    m = xp.where(a > b, a, b)
    finite = xp.isfinite(m)
    m0 = xp.where(finite, m, 0.0)
    return xp.where(finite, m0 + xp.log(xp.exp(a - m0) + xp.exp(b - m0)), m)


@_peer
def trl_generalized_jsd_loss(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: TrlReduction = "batchmean",
    num_items_in_batch: Any = None,
) -> Array:
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (``trl.experimental.gkd``, TRL 1.x), exactly.

    Student first. For 0 < β < 1 it is ``kldiv.js_div(teacher, student, beta=β)`` per token
    (M = β·teacher + (1 − β)·student, the same generalised JSD); the quirks are elsewhere:

    * **endpoints**: β = 0 switches to KL(teacher‖student) and β = 1 to KL(student‖teacher),
      while the generalised JSD itself is 0 at both (the core's ``js_div`` is continuous);
    * **reductions**: ``"batchmean"`` divides by the number of tokens whose label is not -100
      when ``labels`` are given, but by the *batch size* (sequences, not tokens) when they
      are not; ``"mean"`` divides by tokens × vocabulary; ``"none"`` returns the elementwise
      terms (``[tokens, V]`` after masking); ``num_items_in_batch`` overrides the denominator;
    * elementwise ``F.kl_div(log_target=True)`` terms: NaN where both log-probabilities are
      ``-inf`` (masked vocabulary entries).

    Checked against the real TRL by recorded fixtures (``tests/fixtures/make_trl_fixtures.py``).
    """
    xp, (s, t, lab) = _xp(student_logits, teacher_logits, labels)
    ls = _math.log_softmax(xp, s / temperature, -1)
    lt = _math.log_softmax(xp, t / temperature, -1)

    def kl_div_log_target(inp: Array, tgt: Array) -> Array:  # F.kl_div(..., log_target=True)
        return xp.exp(tgt) * (tgt - inp)

    if beta == 0:
        jsd = kl_div_log_target(ls, lt)
    elif beta == 1:
        jsd = kl_div_log_target(lt, ls)
    else:
        mix = _log_add_exp(xp, ls + math.log1p(-beta), lt + math.log(beta))
        jsd = beta * kl_div_log_target(mix, lt) + (1 - beta) * kl_div_log_target(mix, ls)
    count = None
    if lab is not None:
        keep = lab != -100
        jsd = jsd[keep]
        count = xp.sum(xp.astype(keep, jsd.dtype))
    if num_items_in_batch is not None:
        return xp.sum(jsd) / num_items_in_batch
    if reduction == "batchmean":
        denom = xp.where(count > 1, count, 1.0) if count is not None else max(jsd.shape[0], 1)
        return xp.sum(jsd) / denom
    if reduction == "sum":
        return xp.sum(jsd)
    if reduction == "mean":
        return xp.mean(jsd)
    return jsd


@_peer
def verl_kl_penalty(
    logprob: Array, ref_logprob: Array, kl_penalty: VerlKLPenalty = "low_var_kl"
) -> Array:
    """verl's ``core_algos.kl_penalty(logprob, ref_logprob, kl_penalty)`` (verl 0.9), exactly.

    Per-token estimates of KL(policy‖reference) from the sampled tokens' log-probabilities,
    policy first; these are :mod:`kldiv.estimators` with verl's settings:

    * ``"kl"``/``"k1"``: ``logprob − ref_logprob`` (estimator ``k1``);
    * ``"abs"``: ``|logprob − ref_logprob|`` (not an estimator of KL: biased upwards);
    * ``"mse"``/``"k2"``: ``½(logprob − ref_logprob)²`` (``k2``);
    * ``"low_var_kl"``/``"k3"``: ``k3`` with the log-ratio clamped to ±20 and the value to ±10
      (``clamp_log_ratio=20, clamp_value=10``) — biased where the clamps bite;
    * a ``"+"`` suffix (``"k3+"``, ``"k1+"``, ...): the value of that estimator with the
      gradient of an unclamped ``k2``, verl's straight-through (``kl_estimate``'s
      ``grad_estimator="k2"`` is the same except that it clamps both alike).

    No masking (verl masks afterwards). ``kldiv.estimators.kl_estimate`` does the same with
    masking before ``exp`` and a choice of reduction. Checked against the real verl by recorded
    fixtures (``tests/fixtures/make_verl_fixtures.py``).
    """
    from .estimators import kl_estimate

    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    names = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
    xp, (lp, lq) = _xp(logprob, ref_logprob)
    if base == "abs":
        d = lp - lq
        # |d| with torch's gradient 0 at d = 0 (JAX's abs has gradient 1 there)
        value = xp.where(d == 0, 0.0 * d, xp.abs(d))
    elif base in names:
        kw: dict[str, Any] = {"estimator": names[base], "reduction": "none"}
        if names[base] == "k3":
            kw.update(clamp_log_ratio=20.0, clamp_value=10.0)
        value = kl_estimate(lp, lq, **kw)
    else:
        raise NotImplementedError(f"verl_kl_penalty: unknown kl_penalty {kl_penalty!r}.")
    if kl_penalty.endswith("+") and base not in ("mse", "k2"):
        # verl's straight-through: the value above with the gradient of an *unclamped* k2
        # (grad_estimator="k2" in kl_estimate would clamp it along with the value)
        g = 0.5 * (lp - lq) * (lp - lq)
        value = ns.stop_gradient(xp, value) + (g - ns.stop_gradient(xp, g))
    return value
