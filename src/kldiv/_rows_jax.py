"""The row engine on JAX: ``D(teacher‖student)`` per row straight from two logit arrays, the
row specification (:mod:`kldiv._spec`) as one ``jax.custom_jvp`` rule per kind.

The core functions on JAX arrays with logits along the last axis come here
(:func:`kldiv.divergence` and the functions of each kind). The value is the specification's,
on the log-softmax that ``jax.nn.log_softmax`` computes; the tangent is the specification's
gradient through the softmax, ``(h − s·Σh)/T`` for each side that has a tangent. That
tangent is computed under ``jax.checkpoint`` from the logits and two numbers per row and side
(the row maximum and the log of the shifted sum of exps): in reverse mode the backward pass
recomputes the exps from the inputs, which the caller holds anyway, instead of the forward
pass writing an ``[N, V]`` residual that the backward pass reads back. On CPU a fresh
``[N, V]`` buffer costs its page faults on every call, so this is what makes
``jax.jit(jax.value_and_grad(kldiv.kl_div))`` faster than the same formula written with
``jax.nn`` (see ``benchmarks/bench_core_jax.py``).

The rule is differentiable (the specification masks every operand before its arithmetic),
so ``jax.jvp``, ``jacfwd``, ``hessian`` and ``vmap`` work, with NaN-free derivatives at zero
support. A side that is not differentiated (a teacher held constant) costs nothing.
"""

from __future__ import annotations

import functools
from typing import Any

from . import _spec

__all__ = ["rows"]


def rows(kind: str, teacher: Any, student: Any, w: float, temperature: float) -> Any:
    """``D(teacher‖student)`` of ``kind`` per row along the last axis of two logit arrays of
    one shape and floating dtype, each divided by ``temperature`` before its log-softmax;
    ``w`` is β for ``"js"``, α for the skew kinds."""
    return _rule()(teacher, student, kind, float(w), float(temperature))


@functools.cache
def _rule() -> Any:
    import jax
    import jax.numpy as jnp
    from jax.custom_derivatives import SymbolicZero

    def stats(x: Any, temperature: float) -> tuple[Any, Any]:
        # the row maximum of the logits and log Σ exp((x − m)/T): the shift comes before the
        # division, so the top entry is exactly 0 whatever rounding XLA gives x/T (a
        # multiply by 1/T, contracted with the subtraction into one FMA, would not cancel a
        # huge maximum exactly)
        m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
        return m, jnp.log(jnp.sum(jnp.exp(scaled(x, m, temperature)), axis=-1, keepdims=True))

    def scaled(x: Any, m: Any, temperature: float) -> Any:
        return (x - m) / temperature if temperature != 1.0 else x - m

    def log_probs(x: Any, temperature: float, m: Any, lz: Any) -> Any:
        return scaled(x, m, temperature) - lz

    def spec_rows(
        kind: str, w: float, temperature: float, t: Any, s: Any, st: Any, grads: tuple, exact: bool
    ) -> tuple[Any, Any, Any, Any, Any]:
        """The value and, for the sides in ``grads`` ("p", "q"), h and Σh, from the logits."""
        lp = log_probs(t, temperature, st[0], st[1])
        lq = log_probs(s, temperature, st[2], st[3])
        value, h_p, h_q = _spec.rows(kind, lp, lq, w, teacher_grad="p" in grads, exact=exact)
        return lp, lq, value, h_p, h_q

    def pass_(
        kind: str, w: float, temperature: float, grads: tuple, exact: bool, t: Any, s: Any, st: Any
    ) -> tuple[Any, ...]:
        # the value and each side's Σh, in one pass over the rows
        _, _, value, h_p, h_q = spec_rows(kind, w, temperature, t, s, st, grads, exact)
        sums = tuple(
            jnp.sum(h, axis=-1, keepdims=True)
            for side, h in (("p", h_p), ("q", h_q))
            if side in grads
        )
        return (value, *sums)

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
    def checked(
        kind: str, w: float, temperature: float, grads: tuple, t: Any, s: Any, st: Any
    ) -> Any:
        # The plain formulas first; where a row of the batch comes out non-finite (zero
        # support, +inf, NaN), the exact formulas recompute everything under a cond whose
        # operands are the inputs, so a batch without such a row pays nothing for them. The
        # flag (1.0 where the exact formulas ran) comes out too, for the tangents.
        fast = pass_(kind, w, temperature, grads, False, t, s, st)
        bad = jnp.logical_not(
            functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in fast])
        )
        value, *sums = jax.lax.cond(
            bad, lambda: pass_(kind, w, temperature, grads, True, t, s, st), lambda: fast
        )
        # a divergence is ≥ 0; rounding of a row that cancels to about 0 may not be (the
        # other engines clamp the same way; NaN stays NaN)
        return (bad.astype(value.dtype), jnp.where(value < 0, 0.0, value), *sums)

    @checked.defjvp
    def _checked_jvp(
        kind: str, w: float, temperature: float, grads: tuple, primals: tuple, tangents: tuple
    ) -> tuple[Any, Any]:
        # Only derivatives of the rule's own tangents (second order) come here. They take the
        # exact formulas: the plain ones have 0·inf partials at zero support, which a zero
        # cotangent would turn into NaN even where the exact branch was taken.
        out = checked(kind, w, temperature, grads, *primals)
        _, tan = jax.jvp(lambda *a: pass_(kind, w, temperature, grads, True, *a), primals, tangents)
        return out, (jnp.zeros_like(out[0]), *tan)

    def first_fast(kind: str, w: float, temperature: float, t: Any, s: Any, grads: tuple) -> Any:
        st = (*stats(t, temperature), *stats(s, temperature))
        bad, *out = checked(kind, w, temperature, grads, t, s, st)
        return st, bad > 0, out

    @functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
    def rule(t: Any, s: Any, kind: str, w: float, temperature: float) -> Any:
        return first_fast(kind, w, temperature, t, s, ())[2][0]

    @functools.partial(jax.checkpoint, static_argnums=(0, 1, 2, 3, 4))
    def tangent(
        kind: str,
        w: float,
        temperature: float,
        side: str,
        exact: bool,
        t: Any,
        s: Any,
        st: Any,
        dx: Any,
    ) -> Any:
        # Σ_j (∂D/∂x_j)·dx_j for one side's logits x (side "q": the student's, "p": the
        # teacher's); st holds both sides' statistics and this side's Σh
        lp, lq, _, h_p, h_q = spec_rows(kind, w, temperature, t, s, st, (side,), exact)
        h, lx = (h_q, lq) if side == "q" else (h_p, lp)
        return jnp.sum(_spec.through_softmax(h, lx, temperature, st[4]) * dx, axis=-1)

    def side_tangent(
        kind: str, w: float, temperature: float, side: str, bad: Any, *args: Any
    ) -> Any:
        # the cond outside the checkpoints: transposed, it is one cond whose branches each
        # recompute and scale, writing the gradient once
        return jax.lax.cond(
            bad,
            lambda: tangent(kind, w, temperature, side, True, *args),
            lambda: tangent(kind, w, temperature, side, False, *args),
        )

    @functools.partial(rule.defjvp, symbolic_zeros=True)
    def _rule_jvp(
        kind: str, w: float, temperature: float, primals: tuple, tangents: tuple
    ) -> tuple[Any, Any]:
        t, s = primals
        dt, ds = tangents
        grads = tuple(side for side, d in (("p", dt), ("q", ds)) if not isinstance(d, SymbolicZero))
        st, bad, (out, *sums) = first_fast(kind, w, temperature, t, s, grads)
        parts = [
            side_tangent(
                kind, w, temperature, side, bad, t, s, (*st, sum_h), dt if side == "p" else ds
            )
            for side, sum_h in zip(grads, sums, strict=True)
        ]
        if not parts:
            return out, jnp.zeros_like(out)
        return out, functools.reduce(lambda a, b: a + b, parts).astype(out.dtype)

    return rule
