"""kldiv.jax.vocab_parallel_divergence: the vocabulary split over 2 and 4 forced CPU host
devices inside ``jax.shard_map``, the rows over a data-parallel mesh axis, and a 2 × 2 mesh of
both. Every case's value and the gradients with respect to both padded arguments equal the
unsharded core's (``kldiv.divergence`` on the whole, unpadded arrays, and ``jax.grad`` of it),
in float64, for every divergence, two temperatures, masks, weights, ``num_items``, other
forms, ``-inf`` padding to 32 columns (on 4 devices the last slice is all padding), rows whose
slice is all ``-inf`` on one device, +inf rows, NaN rows, ``check_vma=False``, under
``jax.jit``; the example runs on 4 devices. The collectives are counted in the jaxprs. This
process has one device (tests/conftest.py forces one): the path without a vocabulary axis,
half precision, ``shard_map`` outside ``jit``, validation and ``pad_vocab`` are tested here.

Error bound (float64): the sharded computation differs from the core only in the order of the
sums over the vocabulary and in how the row's log-sum-exp is assembled from the slices' (one
more exp and log of numbers within log V of each other). For these rows (V = 23, logits of
order 10, terms of order 1) that is a few·V·eps relative to the sum of the terms' magnitudes,
below 1e-13. The issue asks for 1e-6 relative; the tests check that (``rtol=1e-6``), with
``atol=1e-12`` for entries formed by cancellation (a gradient entry h − p·Σh near 0 has an
absolute error of order eps·|h|, not a relative one). Gradients of padding columns and masked
rows must be exactly 0.
"""

from __future__ import annotations

import doctest
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import kldiv
import kldiv.jax.parallel
from kldiv.jax import pad_vocab, vocab_parallel_divergence

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("jax_parallel_worker.py")
EXAMPLE = ROOT / "examples" / "vocab_parallel_jax.py"
KINDS = ["kl", "reverse_kl", "js", "skew_kl", "skew_reverse_kl", "symmetric_kl", "tv"]
PARAMS = {"js": "beta", "skew_kl": "alpha", "skew_reverse_kl": "alpha"}
N, V = 8, 23
RTOL, ATOL = 1e-6, 1e-12


def params(case: dict) -> dict:
    name = PARAMS.get(case["kind"])
    return {} if name is None else {name: case.get(name, {"beta": 0.5, "alpha": 0.1}[name])}


def inputs(
    rng: np.random.Generator, kind: str = "kl", masked: bool = True, kept: tuple = (3,)
) -> dict:
    """Teacher ``p`` and student ``q`` logits [N, V]: a constant offset the softmax ignores,
    ``-inf`` entries in the teacher (row 3: its first 8 columns, a whole slice on 4 devices),
    entries ``-inf`` on both sides, and masked rows holding NaN."""
    q = rng.normal(scale=2.0, size=(N, V))
    p = rng.normal(scale=2.0, size=(N, V)) + 50.0
    p[rng.random((N, V)) < 0.15] = -np.inf
    p[3, :8] = -np.inf
    both = np.isneginf(p) & (rng.random((N, V)) < 0.5)
    q[both] = -np.inf
    if kind in ("reverse_kl", "symmetric_kl"):  # else q > 0 = p somewhere in most rows: +inf
        q[np.isneginf(p)] = -np.inf
    case = {"p": p, "q": q}
    if masked:
        mask = rng.random(N) > 0.25
        mask[list(kept)] = True
        q[~mask] = np.nan  # dropped rows may hold anything
        case["mask"] = mask
    return case


def make_cases(devices: int, rng: np.random.Generator) -> list[dict]:
    """2 devices: every divergence and each feature over the vocabulary (``"tp"``), then the
    data-parallel reductions with the rows over 2 devices (``"dp"``: a vocabulary axis of
    size 1). 4 devices: every divergence with the last slice all padding (``"tp"``), and on a
    2 × 2 mesh of both axes (``"mesh"``) three of them and the data-parallel reductions. Each case costs a compilation:
    the list covers each feature once or twice, not every combination."""
    cases = []

    def add(layout: str, name: str, kind: str, reduction: str = "mean", **case) -> None:
        case.setdefault("form", "logits")
        cases.append(
            {"name": f"{layout}-{name}", "layout": layout, "kind": kind, "reduction": reduction}
            | case
        )

    def data_layout(layout: str) -> None:
        add(layout, "js-sum", "js", "sum", temperature=1.5, **inputs(rng, "js"))
        up = rng.random(N)
        add(layout, "tv-none", "tv", "none", upstream=up, **inputs(rng, "tv"))
        add(layout, "num-items", "kl", num_items=np.float64(13.0), **inputs(rng))
        shard = inputs(rng)
        shard["mask"][N // 2 :] = False  # a data shard with no row kept
        shard["q"][N // 2 :] = np.nan
        add(layout, "masked-data-shard", "skew_kl", **shard)
        add(layout, "unchecked-vma", "reverse_kl", check_vma=False, **inputs(rng, "reverse_kl"))

    # every kind at both temperatures: T = 1 on 2 devices and 2.5 on 4 for half of them,
    # the other way round for the rest
    temperatures = {kind: (1.0, 2.5)[(i + (devices == 4)) % 2] for i, kind in enumerate(KINDS)}
    for kind in KINDS:
        t = temperatures[kind]
        kw = {"temperature": t, "beta": 0.3, "alpha": 0.2, "student_only": True}
        add("tp", f"{kind}-T{t}", kind, **kw, **inputs(rng, kind))
        if devices == 4 and kind in ("kl", "js", "tv"):
            add("mesh", f"{kind}-T{t}", kind, **kw, **inputs(rng, kind))
    if devices == 4:
        data_layout("mesh")
        return cases

    add("tp", "kl-sum", "kl", "sum", **inputs(rng))
    add("tp", "js-none", "js", "none", temperature=1.5, upstream=rng.random(N), **inputs(rng))
    add("tp", "num-items", "reverse_kl", num_items=17.0, num_items_static=True, **inputs(rng))
    add("tp", "num-items-array", "kl", num_items=np.float64(5.5), **inputs(rng))
    add("tp", "weight", "skew_kl", weight=rng.random(N), **inputs(rng))
    add("tp", "unchecked-vma", "kl", check_vma=False, **inputs(rng))
    infinite = inputs(rng, kept=(3, 5))
    live = np.flatnonzero(~np.isneginf(infinite["p"][5]))
    infinite["q"][5, live[:2]] = -np.inf  # p > 0 = q: KL(P‖Q) = +inf, a finite gradient
    add("tp", "infinite-row", "kl", "none", upstream=np.ones(N), **infinite)
    for kind, name, w in (
        ("js", "beta", 0.0),
        ("js", "beta", 1.0),
        ("skew_kl", "alpha", 0.0),
        ("skew_reverse_kl", "alpha", 1.0),
    ):
        add("tp", f"{kind}-{name}{w}", kind, **{name: w}, **inputs(rng, kind))
    given = inputs(rng)
    probs = np.exp(given["p"] - given["p"].max(-1, keepdims=True))
    given["p"] = probs / probs.sum(-1, keepdims=True)
    add("tp", "probs-logits", "kl", form=("probs", "logits"), **given)
    given = inputs(rng, "js")
    for side in ("p", "q"):
        x = given[side]
        top = x.max(-1, keepdims=True)
        given[side] = x - top - np.log(np.sum(np.exp(x - top), -1, keepdims=True))
    add("tp", "log-probs", "js", form="log_probs", **given)
    nan = inputs(rng, masked=False)
    nan["q"][2, 4] = np.inf  # a +inf logit: NaN row, as in the core
    nan["p"][6] = -np.inf  # nothing left of the row: NaN, as in the core
    add("tp", "nan-rows", "kl", "none", upstream=np.ones(N), **nan)
    cube = inputs(rng, "symmetric_kl", masked=False)
    add(
        "tp",
        "category-axis-1",
        "symmetric_kl",
        "none",
        axis=1,
        temperature=0.7,
        # [N, V] → [2, V, 4]: rows (i, j) = row 4·i + j
        p=cube["p"].reshape(2, 4, V).transpose(0, 2, 1),
        q=cube["q"].reshape(2, 4, V).transpose(0, 2, 1),
        mask=np.array([1, 0, 1, 1], dtype=np.int32),  # broadcast from the right
        upstream=rng.random((2, 4)),
    )
    f32 = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in inputs(rng).items()}
    add("tp", "float32", "kl", temperature=2.0, **f32)
    data_layout("dp")
    nothing = inputs(rng)
    nothing["mask"][:] = False
    add("dp", "all-masked", "kl", **nothing)
    return cases


def launch(devices: int, tmp: Path, cases: list[dict], example: bool) -> dict:
    with open(tmp / "cases.pkl", "wb") as f:
        pickle.dump(cases, f)
    cmd = [sys.executable, str(WORKER), str(devices), str(tmp / "cases.pkl"), str(tmp / "out.pkl")]
    if example:
        cmd.append(str(EXAMPLE))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp / "out.pkl", "rb") as f:
        results = pickle.load(f)
    results["stdout"] = done.stdout
    return results


def expected_collectives(case: dict, devices: int, grad: int) -> list[tuple]:
    """(primitive, axes, operand shape) of every collective: on the vocabulary axis one
    all_gather of [2k, rows] (k logits sides) and one psum of [1 + g, rows] (g the
    differentiated logits sides; [rows] when g = 0); on the data axis one psum of the sum (and the count, for a
    mean without num_items). ``grad``: how many arguments are differentiated (2, 1: the
    student, 0: the value alone). The backward pass adds none, except under
    ``shard_map(check_vma=False)``: one psum of the rows' cotangent [rows] on the vocabulary
    axis, and JAX's own transpose of the data axis' psum (a psum of the same size). (psum is ``psum_invariant`` in a jaxpr under check_vma; both count as "psum".)"""
    forms = case["form"] if isinstance(case["form"], tuple) else (case["form"],) * 2
    data = case["layout"] != "tp"
    dp = {"tp": 1, "dp": devices, "mesh": 2}[case["layout"]]
    p = np.asarray(case["p"])
    batch = [int(n) for n in np.delete(p.shape, case.get("axis", -1))]
    batch[0] //= dp
    k = forms.count("logits")
    g = [0, forms[1] == "logits", k][grad]
    found = []
    if k:
        found.append(("all_gather", ("vocab",), (2 * k, *batch)))
    # without a gradient the row values alone: [rows], not stacked
    found.append(("psum", ("vocab",), (1 + g, *batch) if g else tuple(batch)))
    if data and case["reduction"] != "none":
        counted = case["reduction"] == "mean" and case.get("num_items") is None
        found.append(("psum", ("data",), (2,) if counted else ()))
    if grad and not case.get("check_vma", True):
        found.append(("psum", ("vocab",), tuple(batch)))
        if found[-2][1] == ("data",):  # JAX transposes psum to psum there
            found.append(found[-2])
    return sorted(found)


def named(found: list[tuple]) -> list[tuple]:
    return sorted(("psum" if n == "psum_invariant" else n, a, s) for n, a, s in found)


def unpad(case: dict, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    axis = case.get("axis", -1)
    g = np.moveaxis(g, axis, -1)
    return np.moveaxis(g[..., :V], -1, axis), g[..., V:]


def check(case: dict, got: dict, devices: int) -> None:
    name = case["name"]
    assert "crash" not in got, f"{name}:\n{got.get('crash')}"
    value, gp, gq = got["ref_value"], got["ref_grad_p"], got["ref_grad_q"]
    f32 = np.asarray(case["p"]).dtype == np.float32
    # float32: the same bound with eps = 1.2e-7 (inputs rounded once, sums of 23 terms)
    tol = {"rtol": 1e-5, "atol": 1e-6} if f32 else {"rtol": RTOL, "atol": ATOL}
    np.testing.assert_allclose(got["value"], value, equal_nan=True, **tol, err_msg=name)
    # a NaN row (a +inf logit, or nothing left of a distribution) is NaN as in the core; its
    # gradient is unspecified (the core's has NaN on one side or both), and must stay there
    nan_rows = np.isnan(value) if case["reduction"] == "none" else np.zeros((), bool)
    for side, want, mine in (("p", gp, got["grad_p"]), ("q", gq, got["grad_q"])):
        real, pad = unpad(case, mine)
        if nan_rows.any():
            assert case.get("axis", -1) == -1
            real, want, pad = real[~nan_rows], want[~nan_rows], pad[~nan_rows]
        assert (pad == 0).all(), f"{name}: padding gets a gradient"
        np.testing.assert_allclose(real, want, **tol, err_msg=f"{name} ∂{side}")
        assert np.isfinite(real).all(), f"{name}: ∂{side} not finite"
        if case.get("mask") is not None and case.get("axis", -1) == -1:
            dropped = ~(np.asarray(case["mask"]) != 0)
            assert (unpad(case, mine)[0][dropped] == 0).all(), f"{name}: dropped rows' gradient"
    assert nan_rows.sum() == (2 if name.endswith("nan-rows") else 0), name
    for key, grad in (("value_collectives", 0), ("grad_collectives", 2)):
        assert named(got[key]) == expected_collectives(case, devices, grad), (
            name,
            key,
            got[key],
        )
    if case.get("student_only"):  # the teacher not differentiated: no Σh of its own
        assert named(got["student_grad_collectives"]) == expected_collectives(case, devices, 1), (
            name,
            got["student_grad_collectives"],
        )


@pytest.mark.spawns
@pytest.mark.parametrize("devices", [2, 4])
def test_sharded_equals_the_unsharded_core(devices, tmp_path, rng):
    """One JAX process with ``devices`` host devices runs every case (and, on 4, the example);
    each case's value and gradients against the unsharded core, and its collectives."""
    cases = make_cases(devices, rng)
    results = launch(devices, tmp_path, cases, example=devices == 4)
    for case in cases:
        check(case, results[case["name"]], devices)
    if devices == 4:
        assert "vocab-parallel" in results["stdout"], results["stdout"][-2000:]


# --- one device: the same code path without a mesh, validation, padding ------------------------


def test_without_a_vocab_axis_it_is_the_core(rng):
    """``vocab_axis_name=None``: the same code path with no collective, equal to the core."""
    data = {kind: inputs(rng, kind) for kind in ("kl", "js")}

    def both(p, q, mask, kind):
        kw = {"form": "logits", "mask": mask, "temperature": 1.5, "beta": 0.3}
        kw = {k: v for k, v in kw.items() if k != "beta" or kind == "js"}

        def ours(p, q):
            return vocab_parallel_divergence(p, q, kind, vocab_axis_name=None, **kw)

        def core(p, q):
            return kldiv.divergence(p, q, kind, **kw)

        return [jax.value_and_grad(f, (0, 1))(p, q) for f in (ours, core)]

    # one compilation for every kind (each costs about a second)
    out = jax.jit(
        lambda d: {k: both(*v, k) for k, v in d.items()},
    )({k: tuple(jnp.asarray(c[x]) for x in ("p", "q", "mask")) for k, c in data.items()})
    for kind, ((value, grads), (want, want_grads)) in out.items():
        assert value.dtype == want.dtype == jnp.float64
        np.testing.assert_allclose(value, want, rtol=RTOL, atol=ATOL, err_msg=kind)
        for a, b in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=kind)


def test_one_device_mesh_half_precision_and_eager(rng):
    mesh = Mesh(np.array(jax.devices()[:1]), ("vocab",))
    case = inputs(rng, masked=False)
    p, q = (jnp.asarray(case[k], dtype=jnp.bfloat16) for k in ("p", "q"))
    sharded = jax.shard_map(
        lambda a, b: vocab_parallel_divergence(a, b, "kl", vocab_axis_name="vocab"),
        mesh=mesh,
        in_specs=(P(None, "vocab"), P(None, "vocab")),
        out_specs=P(),
    )
    out, want = jax.jit(lambda p, q: (sharded(p, q), kldiv.kl_div(p, q, form="logits")))(p, q)
    assert out.dtype == want.dtype == jnp.float32  # half precision is computed in float32
    np.testing.assert_allclose(out, want, rtol=1e-5)  # float32: eps·V relative, V = 23
    # shard_map outside jit runs the value alone (JAX refuses a custom_vjp with symbolic
    # zeros there); the same number
    p, q = (jnp.asarray(case[k][:2, :6]) for k in ("p", "q"))
    np.testing.assert_allclose(sharded(p, q), kldiv.kl_div(p, q, form="logits"), rtol=RTOL)


def test_validation():
    x = jnp.zeros((2, 4))

    def call(*args, **kw):
        kw.setdefault("vocab_axis_name", None)
        return vocab_parallel_divergence(*args, **kw)

    with pytest.raises(ValueError, match="Expected `kind` to be one of"):
        call(x, x, "jensen")
    with pytest.raises(ValueError, match="'batchmean'"):
        call(x, x, reduction="batchmean")
    with pytest.raises(ValueError, match="`temperature` is not 1"):
        call(x, x, form="probs", temperature=2.0)
    with pytest.raises(ValueError, match="`beta` to be in"):
        call(x, x, "js", beta=1.5)
    with pytest.raises(ValueError, match="only with reduction='mean'"):
        call(x, x, reduction="sum", num_items=3.0)
    with pytest.raises(ValueError, match="different mesh axes"):
        call(x, x, vocab_axis_name="a", data_axis_name="a")
    with pytest.raises(TypeError, match="real floating dtype"):
        call(jnp.zeros((2, 4), jnp.int32), x)
    with pytest.raises(TypeError, match="weight="):
        call(x, x, mask=jnp.ones(2))
    with pytest.raises(ValueError, match="same number of categories"):
        call(x, jnp.zeros((2, 5)))
    with pytest.raises(TypeError, match="vocab_axis_name"):
        vocab_parallel_divergence(x, x)  # required: forgetting it would normalise per slice


def test_pad_vocab():
    x = jnp.arange(10.0).reshape(2, 5)
    y = pad_vocab(x, 4)
    assert y.shape == (2, 8) and bool(jnp.all(y[:, 5:] == -jnp.inf))
    assert pad_vocab(x, 5) is x or pad_vocab(x, 5).shape == (2, 5)
    z = pad_vocab(x, 3, axis=0, value=0.0)
    assert z.shape == (3, 5) and bool(jnp.all(z[2] == 0))
    with pytest.raises(ValueError, match="num_shards"):
        pad_vocab(x, 0)
    grad = jax.grad(lambda x: jnp.sum(pad_vocab(x, 4)[:, :5] ** 2))(x)
    np.testing.assert_array_equal(grad, 2 * x)  # gradients reach x's own entries


def test_docstring_examples():
    result = doctest.testmod(kldiv.jax.parallel, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0
