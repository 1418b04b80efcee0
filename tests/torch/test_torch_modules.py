"""kldiv.torch modules: thin shells whose signatures cannot drift from the functions."""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import numpy as np
import pytest
import torch

import kldiv
import kldiv.torch as kt
from kldiv.divergences import KINDS

MODULES = {
    "kl": kt.KLDivergence,
    "reverse_kl": kt.ReverseKLDivergence,
    "js": kt.JSDivergence,
    "skew_kl": kt.SkewKLDivergence,
    "skew_reverse_kl": kt.SkewReverseKLDivergence,
    "symmetric_kl": kt.SymmetricKLDivergence,
    "tv": kt.TVDistance,
}
PER_CALL = ("mask", "weight", "num_items")


def test_every_kind_has_a_module_and_the_public_surface_lists_them():
    assert set(MODULES) == set(KINDS)
    names = {c.__name__ for c in MODULES.values()} | {
        "Divergence",
        "DistillationLoss",
        "FusedLinearDistillationLoss",
        "TopKTeacher",
    }
    assert set(kt.__all__) == names


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_signature_parity_with_the_function(kind):
    fn = inspect.signature(KINDS[kind]).parameters
    init = inspect.signature(MODULES[kind]).parameters
    fwd = inspect.signature(MODULES[kind].forward).parameters
    module = MODULES[kind]()
    fn_kw = {k: v.default for k, v in fn.items() if k not in ("p", "q")}
    config = {k: fn_kw[k] for k in fn_kw if k not in PER_CALL}
    # configuration: the function's keywords minus the per-call data, same defaults
    assert {k: getattr(module, k) for k in config} == config
    assert set(init) - {"kw"} <= set(config)
    # per call: forward takes exactly the data keywords, defaulting to None
    assert list(fwd)[1:3] == ["p", "q"]
    assert {k: v.default for k, v in fwd.items() if k not in ("self", "p", "q")} == {
        k: None for k in PER_CALL
    }


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("form", ["probs", "logits", ("log_probs", "logits")], ids=str)
def test_module_equals_function_values_and_gradients(rng, kind, form):
    forms = (form, form) if isinstance(form, str) else form
    a = rng.normal(size=(3, 4, 6))
    b = rng.normal(size=(3, 4, 6))

    def enc(x, f):
        t = torch.tensor(x)
        if f == "probs":
            return torch.softmax(t, -1)
        if f == "log_probs":
            return torch.log_softmax(t, -1)
        return t

    params = {"js": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
    kw = dict(params.get(kind, {}), form=form, reduction="sum")
    if forms == ("logits", "logits"):
        kw["temperature"] = 1.5
    mask = torch.tensor(rng.random((3, 4)) < 0.7)
    weight = torch.tensor(rng.random((3, 4)))
    out = {}
    for name, call in (
        ("module", lambda p, q: MODULES[kind](**kw)(p, q, mask=mask, weight=weight)),
        ("function", lambda p, q: KINDS[kind](p, q, mask=mask, weight=weight, **kw)),
        ("by name", lambda p, q: kt.Divergence(kind, **kw)(p, q, mask=mask, weight=weight)),
    ):
        p = enc(a, forms[0]).requires_grad_(True)
        q = enc(b, forms[1]).requires_grad_(True)
        v = call(p, q)
        v.backward()
        out[name] = (v.detach(), p.grad, q.grad)
    for name in ("module", "by name"):
        for x, y in zip(out[name], out["function"], strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_repr_pickle_copy_and_state_dict():
    m = kt.JSDivergence(form="logits", beta=0.3, temperature=2.0, reduction="sum")
    assert repr(m) == "JSDivergence(form='logits', reduction='sum', temperature=2.0, beta=0.3)"
    assert repr(kt.KLDivergence()) == "KLDivergence(form='probs', reduction='mean')"
    assert repr(kt.Divergence("tv")) == "Divergence(kind='tv', form='probs', reduction='mean')"
    t, s = torch.randn(2, 5), torch.randn(2, 5)
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert type(clone) is kt.JSDivergence and repr(clone) == repr(m)
        torch.testing.assert_close(clone(t, s), m(t, s))
    assert m.state_dict() == {}
    buf = io.BytesIO()
    torch.save(torch.nn.Sequential(m).state_dict(), buf)
    fresh = torch.nn.Sequential(kt.JSDivergence(form="logits", beta=0.3, temperature=2.0))
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert list(m.parameters()) == [] and list(m.buffers()) == []


def test_configuration_errors_at_construction():
    with pytest.raises(ValueError, match="batchmean"):
        kt.KLDivergence(reduction="batchmean")
    with pytest.raises(ValueError, match="form"):
        kt.KLDivergence(form="softmax")
    with pytest.raises(ValueError, match="temperature"):
        kt.KLDivergence(form="probs", temperature=2.0)
    with pytest.raises(ValueError, match=r"`beta` to be in \[0, 1\]"):
        kt.JSDivergence(beta=1.5)
    with pytest.raises(TypeError, match="unexpected keywords \\['beta'\\]"):
        kt.KLDivergence(beta=0.3)
    with pytest.raises(ValueError, match="Unknown divergence 'kld'"):
        kt.Divergence("kld")
    with pytest.raises(TypeError, match="`axis` to be an int"):
        kt.KLDivergence(axis=1.0)


def test_torch_compile_fullgraph_and_device_agnostic():
    m = kt.ReverseKLDivergence(form="logits", temperature=2.0)
    t, s = torch.randn(4, 7), torch.randn(4, 7)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(t, s), m(t, s))
    np.testing.assert_allclose(
        float(m(t, s)), float(kldiv.kl_div(s / 2, t / 2, form="logits")), rtol=1e-6
    )


def test_compile_with_changing_temperature():
    # a temperature schedule: automatic dynamic turns the float into a SymFloat on the second
    # value, which the validation must be able to trace
    t, s = torch.randn(4, 7), torch.randn(4, 7)
    torch._dynamo.reset()
    for temperature in (2.0, 3.0, 4.0):
        m = kt.KLDivergence(form="logits", temperature=temperature)
        torch.testing.assert_close(torch.compile(m, fullgraph=True)(t, s), m(t, s))
    f = torch.compile(
        lambda a, b, T: kldiv.kl_div(a, b, form="logits", temperature=T), fullgraph=True
    )
    for temperature in (2.0, 3.0):
        torch.testing.assert_close(
            f(t, s, temperature), kldiv.kl_div(t, s, form="logits", temperature=temperature)
        )
