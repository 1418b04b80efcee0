"""The numerically delicate primitives, and the only place where zero support is handled.

Every divergence in kldiv is a few lines over these functions. They share one rule: a zero
probability is represented exactly (``0`` in probability space, ``-inf`` in log space), never
clipped, and no epsilon is added. Each function uses the *double-where* pattern: the unsafe
positions are replaced by harmless values *before* the unsafe operation (so the backward pass
never evaluates ``0 * inf`` or ``0 / 0``), and the exact answer is put back *after* it. A single
``where`` around ``log`` is not enough: its value is right but its gradient is NaN, because
autograd still differentiates the branch that was not selected.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from types import ModuleType
from typing import Any

from . import _namespace as ns

__all__ = [
    "safe_log",
    "log_softmax",
    "log_mix",
    "kl_terms",
    "kl_rows",
    "expm1_minus",
    "softplus",
    "log_sigmoid",
    "xlogy",
]

INF = math.inf


def safe_log(xp: ModuleType, x: Any) -> Any:
    """``log(x)`` with ``log(0) = -inf`` and a zero (not NaN) gradient at ``x = 0``.

    Negative ``x`` still gives NaN: a negative probability is an error, not a zero.
    """
    zero = x == 0
    return xp.where(zero, -INF, xp.log(xp.where(zero, 1.0, x)))


def expm1_minus(xp: ModuleType, t: Any) -> Any:
    """``e^t − 1 − t`` (≥ 0), the shape of every scale-ratio KL (``r − 1 − log r`` with
    ``r = e^t``). Through ``expm1`` it is 0 exactly at ``t = 0`` and keeps its absolute accuracy
    near there, where ``r − 1 − log r`` would cancel to rounding noise."""
    return xp.expm1(t) - t


def softplus(xp: ModuleType, x: Any) -> Any:
    """``log(1 + e^x)`` without overflow for large ``x`` or loss of accuracy for very negative
    ``x``; ``softplus(-inf) = 0``, ``softplus(inf) = inf``."""
    # -|x| written with where: abs has derivative 0 (torch) or 1 (JAX) at 0, either of which
    # would give softplus'(0) ≠ ½.
    return xp.where(x > 0, x, 0.0) + xp.log1p(xp.exp(xp.where(x > 0, -x, x)))


def log_sigmoid(xp: ModuleType, x: Any) -> Any:
    """``log σ(x) = −softplus(−x)``: the log-probability of a Bernoulli with logit ``x``."""
    return -softplus(xp, -x)


def xlogy(xp: ModuleType, x: Any, y: Any) -> Any:
    """``x·log y``, defined as 0 where ``x = 0`` even at ``y = 0`` or ``y = inf``.

    Gradients: ``log y`` for ``x`` and ``x/y`` for ``y`` wherever ``log y`` is finite (so at
    ``x = 0 < y`` the gradient for ``x`` is ``log y``, as it must be: a Beta(1, 1) log-density
    still depends on its concentrations); 0 at the points ``x = 0``, ``y ∈ {0, inf}``.
    """
    dead = (x == 0) & ((y == 0) | (y == INF))
    return xp.where(dead, 0.0, x * xp.log(xp.where(dead, 1.0, y)))


def log_softmax(xp: ModuleType, x: Any, axis: int) -> Any:
    """Stable log-softmax along ``axis``; ``-inf`` logits give ``-inf`` with zero gradient.

    Uses the framework's fused kernel where one exists (PyTorch, JAX); otherwise the max-shifted
    Array API composition below, which is exact for logits up to ±1e30 in float32 and beyond,
    since only differences from the row maximum are exponentiated. Those differences must be
    representable: in float32, logits 3e38 apart overflow to a difference of -inf, so that
    category reads as probability exactly 0 (the true one is e^-6e38).

    On JAX the value is ``jax.nn.log_softmax``'s and the derivative a custom rule,
    ``dy = dx − Σ softmax(x)·dx`` with ``softmax(x) = e^y`` taken from the output, so that the
    backward pass keeps no array of its own.
    """
    if ns.backend_name(xp) == "jax":
        return _jax_rules().log_softmax(x, axis)
    native = ns.native_log_softmax(xp)
    if native is not None:
        return native(x, axis)
    m = xp.max(x, axis=axis, keepdims=True)
    # A row whose max is -inf (all categories masked) would give -inf - -inf = NaN below; shift
    # by 0 instead so the row stays -inf - log(0) and the caller's mask decides what it means.
    m = ns.stop_gradient(xp, xp.where(xp.isfinite(m), m, 0.0))
    shifted = x - m
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))


def log_mix(
    xp: ModuleType, la: Any, lb: Any, w: float, pa: Any | None = None, pb: Any | None = None
) -> Any:
    """``log(w·exp(la) + (1−w)·exp(lb))``: the log-probabilities of the mixture w·A + (1−w)·B.

    With ``hi``/``lo`` the larger/smaller of ``la``, ``lb`` and ``d = lo − hi ≤ 0``, this is
    ``hi + log1p(w_lo·expm1(d))``, which returns ``la`` *exactly* when ``la == lb`` (a mixture
    of a distribution with itself is itself; the logaddexp form rounds, and a KL against it
    comes out slightly negative). ``log1p`` loses accuracy as its argument nears −1, i.e. when
    the larger component has a tiny weight (``1 − w`` rounds to 1 for ``w = 1e-173``, giving
    −inf for ``log w``), so there ``hi + log(w_hi + w_lo·exp(d))`` is used instead.

    The larger component is chosen with ``where``, not ``maximum``: at ties ``maximum`` splits
    the gradient evenly between its arguments, which is wrong unless ``w = 1/2``. Where both
    components are zero the result is ``-inf`` with zero gradient (``logaddexp`` gives NaN).

    ``pa``/``pb`` are the probabilities when known exactly (the ``"probs"`` form). Then the
    mixture is also formed linearly, ``m = pb + w·(pa − pb)`` (exact where ``pa == pb``),
    because its gradient must reach entries that are exactly 0: ``∂ log m/∂pb = (1−w)/m`` is
    finite there, while through ``log pb`` it would be ``0·inf``, i.e. cut to 0. Where the
    linear mixture underflows (``w·pa`` below the smallest subnormal) the log-space value is
    kept, so no term turns infinite.

    On PyTorch it is an autograd Function (:mod:`kldiv._math_torch`) whose value is this
    composition and whose derivatives are the responsibilities ``∂/∂la = w·e^la/m`` and
    ``∂/∂lb = (1 − w)·e^lb/m`` (0 where both components are 0; with ``pa``/``pb``, ``w/m`` and
    ``(1 − w)/m`` where the linear mixture is positive), written out; under ``torch.compile``
    the composition runs, for the compiler to fuse.

    On JAX this is a ``jax.custom_jvp`` rule whose value is this composition and whose
    derivatives are
    the responsibilities ``∂/∂la = w·e^la/m = σ(la − lb + log(w/(1 − w)))`` and
    ``∂/∂lb = 1 − ∂/∂la`` (both 0 where both components are 0; with ``pa``/``pb``,
    ``w/m`` and ``(1 − w)/m`` where the linear mixture is positive).
    """
    if w == 0.0:
        return lb
    if w == 1.0:
        return la
    if ns.backend_name(xp) == "jax":
        rules = _jax_rules()
        if pa is None and pb is None:
            return rules.log_mix(la, lb, w)
        pa = xp.exp(la) if pa is None else pa
        pb = xp.exp(lb) if pb is None else pb
        return rules.log_mix_given_p(la, lb, pa, pb, w)
    if ns.backend_name(xp) == "torch" and not _torch_compiling():
        # Under torch.compile the composition is fused by the compiler instead.
        from ._math_torch import log_mix_function

        if (pa is None) != (pb is None):  # one side's probabilities known: form the other's
            pa = xp.exp(la) if pa is None else pa
            pb = xp.exp(lb) if pb is None else pb
        return log_mix_function().apply(la, lb, w, pa, pb)
    return log_mix_composition(xp, la, lb, w, pa, pb)


def log_mix_composition(
    xp: ModuleType, la: Any, lb: Any, w: float, pa: Any | None = None, pb: Any | None = None
) -> Any:
    """:func:`log_mix` for 0 < w < 1 as a composition of Array API functions: its value on
    every framework, and its derivatives where no rule of its own is written."""
    a_hi = la >= lb
    dead = a_hi & (la == -INF)
    hi = xp.where(dead, 0.0, xp.where(a_hi, la, lb))
    d = xp.where(dead, 0.0, xp.where(a_hi, lb, la)) - hi
    # Weights multiply arrays inside where: where(c, 0.9, 0.1) would be float64 in NumPy and
    # float32 in PyTorch whatever the inputs.
    e = xp.expm1(d)
    x = xp.where(a_hi, (1.0 - w) * e, w * e)
    far = x < -0.5
    # log(w_hi + w_lo·e^d) with the weights' logs taken in Python: w itself may underflow in
    # float32 (w = 1e-46), its logarithm does not.
    lw, l1w = math.log(w), math.log1p(-w)
    direct = xp.where(a_hi, _log_add_exp(xp, lw, l1w + d), _log_add_exp(xp, l1w, lw + d))
    near = xp.log1p(xp.where(far, 0.0, x))  # double where: log1p(-1) must not reach autograd
    lm = xp.where(dead, -INF, hi + xp.where(far, direct, near))
    if pa is None and pb is None:
        return lm
    pa = xp.exp(la) if pa is None else pa
    pb = xp.exp(lb) if pb is None else pb
    m = pb + w * (pa - pb)
    pos = m > 0
    return xp.where(pos, xp.log(xp.where(pos, m, 1.0)), lm)


def _log_add_exp(xp: ModuleType, c: float, y: Any) -> Any:
    """``log(e^c + e^y)`` for a finite Python float ``c`` and a finite array ``y``."""
    m = xp.where(y > c, y, c)
    return m + xp.log(xp.exp(c - m) + xp.exp(y - m))


def kl_terms(xp: ModuleType, lp: Any, lq: Any, p: Any | None = None) -> Any:
    """Elementwise ``p·(log p − log q)``, the summand of KL(P‖Q), from log-probabilities.

    ``p`` may be passed when it is known exactly (the ``"probs"`` form) so that ``exp(lp)`` is
    not recomputed. Exact zero support:

    * ``p = 0`` (``lp = -inf``): the term is ``0`` whatever ``q`` is, and its gradient with
      respect to both ``p`` and ``q`` is ``0`` (``torch.nn.functional.kl_div`` gives NaN there);
    * ``p > 0`` and ``q = 0``: the term is ``+inf``, even when ``exp(lp)`` underflows;
    * otherwise ``p·(lp − lq)``, with gradients ``lp − lq + 1`` for ``p`` (through ``lp``) and
      ``−p`` for ``log q``.

    NaN inputs propagate to NaN outputs.
    """
    p_zero = lp == -INF
    q_zero = lq == -INF
    live = ~(p_zero | q_zero)
    lp_s = xp.where(live, lp, 0.0)
    lq_s = xp.where(live, lq, 0.0)
    p_s = xp.exp(lp_s) if p is None else xp.where(live, p, 0.0)
    # Each where keeps one array operand so the result keeps the input dtype (two Python
    # scalars would make NumPy return float64).
    terms = xp.where(live, p_s * (lp_s - lq_s), 0.0)
    return xp.where(q_zero & ~p_zero, INF, terms)


def kl_rows(xp: ModuleType, lp: Any, lq: Any, p: Any | None, axis: int) -> Any:
    """``Σ_axis kl_terms(lp, lq, p)``: per-distribution KL with the semantics of :func:`kl_terms`.

    On PyTorch this runs as one autograd function with an analytic backward: the forward works
    in place on temporaries and only ``lp``, ``lq`` (and ``p``) are saved, which the
    log-softmax before it saves anyway. Composed from ``where`` calls, autograd would keep
    every mask and intermediate alive, costing twice the time and 1.6x the memory of the
    plain PyTorch formula on ``[4096, 32000]`` logits. Values and first-order gradients equal
    the composition's wherever the value is finite (the tests compare them on every
    zero-support case); second derivatives at p = 0 are the analytic limit where the
    composition's are 0.

    On JAX it is a ``jax.custom_jvp`` rule for the same reason: the tangent
    ``Σ [p·(lp − lq + 1)·dlp − p·dlq]`` (with ``p``: ``Σ [(lp − lq)·dp + p·dlp − p·dlq]``),
    every factor 0 where ``p = 0`` and the ``lp − lq`` factors 0 where ``q = 0``. The factor of
    ``dlq`` is ``−p`` also where ``p > 0 = q``, as in ``KLRows``: on +inf rows the gradient is
    finite, and that factor is −p where the composition's is 0.
    """
    backend = ns.backend_name(xp)
    if backend == "torch" and not _torch_compiling():
        # Under torch.compile the composition below is fused by the compiler instead.
        fn = _torch_kl_rows()
        ax = axis % lp.ndim
        if p is None:
            return fn.apply(lp, lq, ax)
        return fn.apply(lp, lq, ax, p)
    if backend == "jax":
        rules = _jax_rules()
        if p is None:
            return rules.kl_rows(lp, lq, axis)
        return rules.kl_rows_given_p(lp, lq, p, axis)
    return xp.sum(kl_terms(xp, lp, lq, p), axis=axis)


def _torch_compiling() -> bool:
    import torch

    return bool(torch.compiler.is_compiling())


@functools.cache
def _torch_kl_rows() -> Any:
    import torch

    class KLRows(torch.autograd.Function):
        """Row sums of p·(log p − log q); p is exp(lp) unless given (the "probs" form).

        Written in the setup_context form with a generated vmap rule and a jvp, so that
        torch.func (grad, vmap, jacrev, jvp, hessian) composes with it. The saved tensors are
        the inputs themselves, broadcast only inside the formulas, so that double backward
        stays connected to them when ``p`` and ``q`` have different shapes.
        """

        generate_vmap_rule = True

        @staticmethod
        def forward(lp: Any, lq: Any, axis: int, p: Any = None) -> Any:
            diff = lp - lq
            # Where p = 0 the product below is 0·(±inf or NaN) = NaN; the exact term there is
            # 0, or +inf when p > 0 underflowed to 0 while q = 0 (diff = +inf).
            q_zero = diff == INF
            prob = torch.exp(lp) if p is None else p
            terms = diff.mul_(prob)
            p_zero = prob == 0
            terms.masked_fill_(p_zero, 0.0).masked_fill_(q_zero.logical_and_(p_zero), INF)
            return terms.sum(axis)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
            lp, lq, axis, p = inputs
            ctx.axis = axis
            ctx.save_for_backward(lp, lq, p)
            ctx.save_for_forward(lp, lq, p)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            lp, lq, p = ctx.saved_tensors
            g = grad.unsqueeze(ctx.axis)
            # In place on fresh temporaries saves [N, V] allocations; under create_graph
            # (double backward) the same formulas run out of place so autograd can record them.
            ip = not torch.is_grad_enabled()
            mul = torch.Tensor.mul_ if ip else torch.mul
            fill = torch.Tensor.masked_fill_ if ip else torch.masked_fill
            given = p is not None
            need_lp, need_lq = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            need_p = given and ctx.needs_input_grad[3]
            grad_lp = grad_lq = grad_p = None
            if need_lq:  # -p·g: already 0 where p = 0
                # exp(lp) can take g in place only if it already has the broadcast shape.
                if given:
                    scaled = p * g
                elif lp.shape == torch.broadcast_shapes(lp.shape, lq.shape, g.shape):
                    scaled = mul(torch.exp(lp), g)
                else:
                    scaled = torch.exp(lp) * g
                grad_lq = mul(scaled, -1.0)
            if need_lp or need_p:
                # Where p = 0 or q = 0, lp - lq is ±inf or NaN; zero it (as the where-composition
                # does) so that a row dropped after the fact (cotangent 0) gets 0, not inf·0.
                dead = (lp == -INF) | (lq == -INF)
                diff = fill(lp - lq, dead, 0.0)
                if given:
                    grad_p = mul(diff, g) if need_p else None
                    grad_lp = p * g if need_lp else None
                else:
                    grad_lp = mul(fill(mul(diff + 1.0, torch.exp(lp)), dead, 0.0), g)
            # Gradients have the broadcast shape; autograd sums them back to each input's shape.
            return grad_lp, grad_lq, None, grad_p

        @staticmethod
        def jvp(ctx: Any, lp_t: Any, lq_t: Any, _axis_t: Any, p_t: Any = None) -> Any:
            lp, lq, p = ctx.saved_tensors
            dead = (lp == -INF) | (lq == -INF)
            prob = torch.exp(lp) if p is None else p
            diff = torch.masked_fill(lp - lq, dead, 0.0)
            out = 0.0
            if lq_t is not None:
                out = out - prob * lq_t
            if p is None:
                if lp_t is not None:
                    out = out + torch.masked_fill(prob * (diff + 1.0), dead, 0.0) * lp_t
            else:
                if lp_t is not None:
                    out = out + prob * lp_t
                if p_t is not None:
                    out = out + diff * p_t
            if isinstance(out, float):
                return torch.zeros_like(torch.sum(lp - lq, ctx.axis))
            return torch.sum(out, ctx.axis)

    return KLRows


@functools.cache
def _jax_rules() -> Any:
    """:func:`log_softmax`, :func:`kl_rows` and :func:`log_mix` for JAX, as ``jax.custom_jvp``
    functions with the same values and zero-support rules as the compositions above.

    Differentiated through their ``where`` compositions, XLA keeps every mask and intermediate
    of both sides of each ``where`` for the backward pass, and on CPU each such ``[N, V]``
    temporary is fresh memory on every call (page faults, ~0.2 s per 500 MiB). Here each rule
    is a forward formula plus one tangent factor per argument, so ``jax.jit(jax.grad(...))``
    compiles to a graph no larger than the plain ``jax.nn`` formula's. The tangent rules are
    linear in the tangents, so forward mode (``jax.jvp``, ``jacfwd``, ``hessian``) works as
    well as reverse mode; they are written in differentiable JAX without ``0·inf`` anywhere, so
    higher derivatives (differentiating the rules) stay NaN-free too. Tangents that are
    symbolically zero (an argument not differentiated, e.g. the teacher) cost nothing.
    """
    import jax
    import jax.numpy as jnp
    from jax.custom_derivatives import SymbolicZero

    def nonzero(t: Any) -> bool:
        return not isinstance(t, SymbolicZero)

    def total(out: Any, parts: list[Any], reduce: Callable[[Any], Any] | None) -> Any:
        if not parts:
            return jnp.zeros_like(out)
        t = functools.reduce(lambda a, b: a + b, parts)
        t = t if reduce is None else reduce(t)
        return jnp.broadcast_to(t, out.shape).astype(out.dtype)

    # log-softmax: jax.nn's value; the tangent from the output, x_t − Σ softmax·x_t, so the
    # backward pass needs y (kept anyway) rather than a saved exp(x − max) of its own.

    @functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
    def log_softmax(x: Any, axis: int) -> Any:
        return jax.nn.log_softmax(x, axis=axis)

    @log_softmax.defjvp
    def _log_softmax_jvp(axis: int, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
        (x,), (x_t,) = primals, tangents
        y = log_softmax(x, axis)
        return y, x_t - jnp.sum(jnp.exp(y) * x_t, axis=axis, keepdims=True)

    # KL rows: Σ p·(lp − lq) with p = 0 → 0 and p > 0 = q → +inf.

    def kl_value(lp: Any, lq: Any, prob: Any, axis: int) -> Any:
        # Σ p·(lp − lq) as the plain formula has it. Its zero-support terms are NaN (p = 0:
        # 0·(−inf − lq) or 0·(−inf + inf); p = 0 after underflow against q = 0: 0·inf), p > 0 = q
        # gives +inf as it should, and every other term is the composition's to the bit. So only
        # where a row came out NaN does the where form run, under a cond: on CPU its selects
        # are a loop fusion of their own that writes an [N, V] temporary, which rows without
        # zero support (the common case) do not pay for. The primal is not differentiated (the
        # rules below are), so one where per case will do: p = 0 → 0 (whatever q), else
        # q = 0 → +inf (even where exp(lp) underflowed to 0). NaN inputs stay NaN.
        fast = jnp.sum(prob * (lp - lq), axis=axis)

        def exact() -> Any:
            terms = jnp.where(lp == -INF, 0.0, jnp.where(lq == -INF, INF, prob * (lp - lq)))
            return jnp.sum(terms, axis=axis)

        return jax.lax.cond(jnp.any(jnp.isnan(fast)), exact, lambda: fast)

    def live_diff(lp: Any, lq: Any) -> tuple[Any, Any]:
        # Double where (its derivative is NaN-free), the operands masked before subtracting:
        # `lp − lq` itself is the value's (above), and a subexpression shared between the
        # value and a tangent is an [N, V] temporary on CPU.
        live = (lp != -INF) & (lq != -INF)
        return live, jnp.where(live, lp, 0.0) - jnp.where(live, lq, 0.0)

    @functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
    def kl_rows(lp: Any, lq: Any, axis: int) -> Any:
        return kl_value(lp, lq, jnp.exp(lp), axis)

    @functools.partial(kl_rows.defjvp, symbolic_zeros=True)
    def _kl_rows_jvp(axis: int, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
        lp, lq = primals
        lp_t, lq_t = tangents
        out = kl_rows(lp, lq, axis)
        prob = jnp.exp(lp)
        parts = []
        if nonzero(lp_t):  # p·(lp − lq + 1), 0 where p = 0 or q = 0
            live, diff = live_diff(lp, lq)
            parts.append(jnp.where(live, prob * (diff + 1.0), 0.0) * lp_t)
        if nonzero(lq_t):
            # −p: 0 where p = 0. Not masked where p > 0 = q (a +inf row), as on torch: the
            # mask would keep log q alive for the backward pass, a fifth more time.
            parts.append(-prob * lq_t)
        return out, total(out, parts, lambda t: jnp.sum(t, axis=axis))

    @functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
    def kl_rows_given_p(lp: Any, lq: Any, p: Any, axis: int) -> Any:
        return kl_value(lp, lq, p, axis)

    @functools.partial(kl_rows_given_p.defjvp, symbolic_zeros=True)
    def _kl_rows_given_p_jvp(axis: int, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
        lp, lq, p = primals
        lp_t, lq_t, p_t = tangents
        out = kl_rows_given_p(lp, lq, p, axis)
        parts = []
        if nonzero(p_t):  # lp − lq, 0 where p = 0 or q = 0
            parts.append(live_diff(lp, lq)[1] * p_t)
        if nonzero(lp_t):
            parts.append(p * lp_t)
        if nonzero(lq_t):
            parts.append(-p * lq_t)
        return out, total(out, parts, lambda t: jnp.sum(t, axis=axis))

    # Mixture: log(w·e^la + (1 − w)·e^lb).

    def mix_value(la: Any, lb: Any, w: float, pa: Any = None, pb: Any = None) -> Any:
        # The composition's value (the primal is not differentiated, so its where calls cost
        # no backward memory): it is good to about 1.5 ulp of the result, where the shorter
        # hi + log1p(e^(lo − hi)) over la + log w, lb + log(1 − w) loses up to ~1000 ulp of
        # a result near 0 (rounding of the shifted components).
        return log_mix_composition(jnp, la, lb, w, pa, pb)

    def responsibilities(la: Any, lb: Any, w: float, off: Any = None) -> tuple[Any, Any]:
        """Builders of ∂lm/∂la = w·e^la/m = σ(la − lb + log w − log(1 − w)) and
        ∂lm/∂lb = 1 − that, from the components alone (the backward pass need not keep the
        mixture); 0 for a component that is 0, 0 for both where both are (and where
        ``off``)."""
        dead = (la == -INF) & (lb == -INF)
        dead = dead if off is None else dead | off
        z = jnp.where(dead, 0.0, la - lb) + (math.log(w) - math.log1p(-w))

        def factor(zz: Any) -> Any:
            return jnp.where(dead, 0.0, jax.nn.sigmoid(zz))

        return (lambda: factor(z)), (lambda: factor(-z))

    @functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
    def log_mix(la: Any, lb: Any, w: float) -> Any:
        return mix_value(la, lb, w)

    @functools.partial(log_mix.defjvp, symbolic_zeros=True)
    def _log_mix_jvp(w: float, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
        la, lb = primals
        la_t, lb_t = tangents
        lm = log_mix(la, lb, w)
        ra, rb = responsibilities(la, lb, w)
        parts = []
        if nonzero(la_t):
            parts.append(ra() * la_t)
        if nonzero(lb_t):
            parts.append(rb() * lb_t)
        return lm, total(lm, parts, None)

    def linear_mix(pa: Any, pb: Any, w: float) -> tuple[Any, Any]:
        m = pb + w * (pa - pb)
        pos = m > 0
        return pos, jnp.where(pos, m, 1.0)

    @functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
    def log_mix_given_p(la: Any, lb: Any, pa: Any, pb: Any, w: float) -> Any:
        pos, m = linear_mix(pa, pb, w)
        return mix_value(la, lb, w, pa, pb)

    @functools.partial(log_mix_given_p.defjvp, symbolic_zeros=True)
    def _log_mix_given_p_jvp(w: float, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
        la, lb, pa, pb = primals
        la_t, lb_t, pa_t, pb_t = tangents
        out = log_mix_given_p(la, lb, pa, pb, w)
        pos, m = linear_mix(pa, pb, w)
        # where the linear mixture is positive pa and pb move it (d log m = dm/m); where it
        # underflowed the log-space value is used, moved by la and lb
        inv = jnp.where(pos, 1.0 / m, 0.0)
        parts = []
        if nonzero(pa_t):
            parts.append(w * inv * pa_t)
        if nonzero(pb_t):
            parts.append((1.0 - w) * inv * pb_t)
        if nonzero(la_t) or nonzero(lb_t):
            ra, rb = responsibilities(la, lb, w, off=pos)
            if nonzero(la_t):
                parts.append(ra() * la_t)
            if nonzero(lb_t):
                parts.append(rb() * lb_t)
        return out, total(out, parts, None)

    return types.SimpleNamespace(
        log_softmax=log_softmax,
        kl_rows=kl_rows,
        kl_rows_given_p=kl_rows_given_p,
        log_mix=log_mix,
        log_mix_given_p=log_mix_given_p,
    )
