"""The PyTorch autograd rule of log_mix (kldiv._math_torch) against the composition it
replaces, differentiated by autograd: the same values bit for bit, and first derivatives,
second derivatives (create_graph), forward mode and torch.func transforms equal to float64
rounding on a grid with every zero-support case (-inf components, ties, both zero, tiny and
near-1 weights, given probabilities with exact zeros).

Error bound: both sides compute the same derivatives in float64 by different formulas (the
rule's responsibilities exp(la + log w − lm) against the chain rule through the composition's
expm1/log1p branches), each within a few ulp of the exact value; entries are at most 1 in
magnitude (responsibilities) or w/m, (1 − w)/m, so rtol = 1e-12 with atol = 1e-12 holds with
a wide margin and still fails on any formula error (which moves results at the 1e-3 level).
One exception: with the probabilities given, the composition's derivative with respect to pb
is g/m − w·g/m, which cancels as w → 1 and is only good to about eps/(1 − w) relative (1e-9
at w = 1 − 1e-7; the rule's (1 − w)·g/m is not), so the relative tolerance there is
16·eps/(1 − w)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kldiv import _math

RTOL = ATOL = 1e-12
GRID = [-math.inf, -800.0, -30.0, -2.0, -0.7, -0.7, 0.0]  # -0.7 twice: ties are common
WEIGHTS = [1e-30, 0.1, 0.5, 0.9, 1 - 1e-7]


def _inputs(seed: int, given: bool) -> tuple[torch.Tensor, ...]:
    rng = np.random.default_rng(seed)
    la = torch.tensor(rng.choice(GRID, size=(40, 7)), dtype=torch.float64)
    lb = torch.tensor(rng.choice(GRID, size=(40, 7)), dtype=torch.float64)
    lb[:5] = la[:5]  # whole rows of ties
    if not given:
        return la, lb
    return la, lb, torch.exp(la), torch.exp(lb)


def _composition(la, lb, w, pa=None, pb=None):
    return _math.log_mix_composition(torch, la, lb, w, pa, pb)


def _rule(la, lb, w, pa=None, pb=None):
    return _math.log_mix(torch, la, lb, w, pa, pb)


def _close(got, want, w=0.5):
    rtol = max(RTOL, 16 * np.finfo(np.float64).eps / (1 - w))
    torch.testing.assert_close(got, want, rtol=rtol, atol=ATOL, equal_nan=False)


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("w", WEIGHTS)
def test_values_are_the_composition_and_gradients_match(w, given):
    args = [x.clone().requires_grad_() for x in _inputs(7, given)]
    ref_args = [x.detach().clone().requires_grad_() for x in args]
    got, want = _rule(*args[:2], w, *args[2:]), _composition(*ref_args[:2], w, *ref_args[2:])
    assert got.grad_fn is not None and "LogMix" in type(got.grad_fn).__name__
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same formula, bit for bit
    cot = torch.linspace(-1.0, 2.0, got.numel(), dtype=torch.float64).reshape(got.shape)
    grads = torch.autograd.grad(got, args, cot)
    ref = torch.autograd.grad(want, ref_args, cot)
    for g, r in zip(grads, ref, strict=True):
        assert torch.isfinite(g).all()
        _close(g, r, w)


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("w", [0.1, 0.5, 0.9])
def test_second_derivatives_match_the_composition(w, given):
    # away from -inf, where the composition's own second derivatives are defined
    rng = np.random.default_rng(3)
    la = torch.tensor(rng.normal(size=(6, 5)), dtype=torch.float64)
    lb = torch.tensor(rng.normal(size=(6, 5)), dtype=torch.float64)
    lb[0] = la[0]
    base = [la, lb] + ([torch.exp(la), torch.exp(lb)] if given else [])
    vec = [torch.tensor(rng.normal(size=(6, 5))) for _ in base]

    def hvp(fn):
        args = [x.clone().requires_grad_() for x in base]
        value = (fn(*args[:2], w, *args[2:]) * torch.arange(30.0).reshape(6, 5)).sum()
        grads = torch.autograd.grad(value, args, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vec, strict=True))
        return torch.autograd.grad(dot, args)

    for g, r in zip(hvp(_rule), hvp(_composition), strict=True):
        assert torch.isfinite(g).all()
        _close(g, r)


@pytest.mark.parametrize("w", [1e-30, 0.3, 1 - 1e-7])
def test_torch_func_transforms_match_the_composition(w):
    from torch.func import jacfwd, jacrev, vmap

    la, lb = _inputs(11, False)
    la, lb = la[:6], lb[:6]

    def rule_row(a, b):
        return _rule(a, b, w)

    def comp_row(a, b):
        return _composition(a, b, w)

    for transform in (jacrev, jacfwd):
        got = vmap(transform(rule_row, argnums=(0, 1)))(la, lb)
        want = vmap(transform(comp_row, argnums=(0, 1)))(la, lb)
        for g, r in zip(got, want, strict=True):
            assert torch.isfinite(g).all()
            _close(g, r)


def test_forward_mode_with_dual_numbers_matches_the_composition():
    import torch.autograd.forward_ad as fwAD

    la, lb, pa, pb = _inputs(5, True)
    tangents = [torch.linspace(-1, 1, la.numel(), dtype=torch.float64).reshape(la.shape)] * 4
    outs = []
    for fn in (_rule, _composition):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(x, t) for x, t in zip((la, lb, pa, pb), tangents, strict=True)]
            outs.append(fwAD.unpack_dual(fn(duals[0], duals[1], 0.25, duals[2], duals[3])).tangent)
    assert torch.isfinite(outs[0]).all()
    _close(outs[0], outs[1])


def test_one_side_given_forms_the_other_and_broadcasts():
    # P given as probabilities, Q as log-probabilities of another batch shape
    la = torch.tensor([[-math.inf, -1.0, -0.5]], dtype=torch.float64, requires_grad=True)
    pa = torch.exp(la.detach()).requires_grad_()
    lb = torch.tensor([[-2.0, -math.inf, -0.5], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    lb.requires_grad_()
    got = _rule(la, lb, 0.3, pa, None)
    ref_la, ref_pa, ref_lb = (x.detach().clone().requires_grad_() for x in (la, pa, lb))
    want = _composition(ref_la, ref_lb, 0.3, ref_pa, torch.exp(ref_lb))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    grads = torch.autograd.grad(got.sum(), (la, pa, lb))
    ref = torch.autograd.grad(want.sum(), (ref_la, ref_pa, ref_lb))
    for g, r in zip(grads, ref, strict=True):
        assert g.shape == r.shape
        _close(g, r)
