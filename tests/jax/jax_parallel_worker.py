"""One JAX process with forced host devices that runs every vocab-parallel case of
tests/jax/test_jax_parallel.py (which starts it, once per device count).

    python tests/jax/jax_parallel_worker.py DEVICES CASES.pkl OUT.pkl [EXAMPLE.py]

``--xla_force_host_platform_device_count`` must be set before JAX starts, which is why this is
a process of its own. For each case it pads both arguments' vocabulary with ``-inf`` (``0``
for probabilities) to 32 columns, runs ``kldiv.jax.vocab_parallel_divergence`` inside
``jax.shard_map`` on the case's mesh, under ``jax.jit``, takes the value and the gradients
with respect to both padded arguments, and counts the collectives in the jaxprs of the value
and of the gradient. Beside it, the reference: ``kldiv.divergence`` on the whole, unpadded
arrays (no shard_map) and ``jax.grad`` of it, compiled with the cases (eagerly, the core's
``lax.cond`` would recompile for every case). The test compares them. With EXAMPLE.py it then
runs that example on the same devices.
"""

from __future__ import annotations

import os
import pickle
import runpy
import sys
import traceback

DEVICES = int(sys.argv[1])
# XLA's backend optimisations off: they halve the compilation, which is most of this
# process's time, and change no arithmetic (no fast-math either way)
os.environ["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={DEVICES} "
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.extend.core import ClosedJaxpr, Jaxpr  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import kldiv  # noqa: E402
from kldiv.jax import pad_vocab, vocab_parallel_divergence  # noqa: E402

jax.config.update("jax_enable_x64", True)

PARAMS = {"js": "beta", "skew_kl": "alpha", "skew_reverse_kl": "alpha"}
DEFAULTS = {"beta": 0.5, "alpha": 0.1}  # the core's
PADDED = 32  # 23 real columns: on 4 vocab devices the last slice is all padding
COLLECTIVES = {
    "psum",
    "psum_invariant",
    "psum2",
    "pmax",
    "pmin",
    "all_gather",
    "all_gather_invariant",
    "psum_scatter",
    "reduce_scatter",
    "all_to_all",
    "ppermute",
}


def mesh_of(layout: str) -> tuple[Mesh, str | None, str | None]:
    """The mesh of a layout and its (vocab, data) axis names."""
    devices = np.array(jax.devices())
    if layout == "tp":
        return Mesh(devices, ("vocab",)), "vocab", None
    if layout == "dp":  # the vocab axis has size 1: its collectives still run (over one device)
        return Mesh(devices.reshape(DEVICES, 1), ("data", "vocab")), "vocab", "data"
    assert layout == "mesh"
    return Mesh(devices.reshape(2, DEVICES // 2), ("data", "vocab")), "vocab", "data"


def collectives(jaxpr) -> list[tuple[str, tuple, tuple]]:
    """Every collective in a jaxpr and the jaxprs inside it: (primitive, axes, operand shape)."""
    found = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name in COLLECTIVES:
                axes = eqn.params.get("axes", eqn.params.get("axis_name"))
                axes = tuple(axes) if isinstance(axes, tuple | list) else (axes,)
                shape = tuple(eqn.invars[0].aval.shape)
                found.append((eqn.primitive.name, axes, shape))
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    if isinstance(sub, ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, Jaxpr):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return found


def build(case: dict) -> tuple:
    mesh, vocab, data = mesh_of(case["layout"])
    axis = case.get("axis", -1)
    forms = case["form"] if isinstance(case["form"], tuple) else (case["form"],) * 2
    p, q = (
        pad_vocab(jnp.asarray(x), PADDED, axis=axis, value=0.0 if f == "probs" else -np.inf)
        for x, f in zip((case["p"], case["q"]), forms, strict=True)
    )
    ndim = p.ndim
    cat = axis % ndim
    rows = "data" if data else None
    # the vocabulary on `vocab`, the first batch axis on `data`
    spec = [None] * ndim
    spec[cat] = vocab
    spec[0 if cat != 0 else 1] = rows
    arg_spec = P(*spec)
    batch_ndim = ndim - 1
    row_spec = P(rows, *([None] * (batch_ndim - 1)))
    # per-row arguments: sharded like the rows when they have the batch shape, else replicated
    # (a mask broadcast from the right); an array num_items is replicated
    extra_names = [k for k in ("mask", "weight", "num_items") if case.get(k) is not None]
    if case.get("num_items_static"):
        extra_names.remove("num_items")
    extra_vals = [jnp.asarray(case[k]) for k in extra_names]
    extra_specs = tuple(row_spec if np.ndim(v) == batch_ndim else P() for v in extra_vals)
    reduction = case["reduction"]
    out_spec = row_spec if reduction == "none" else P()

    def inner(a, b, *more):
        kw = dict(zip(extra_names, more, strict=True))
        if case.get("num_items_static"):
            kw["num_items"] = case["num_items"]
        return vocab_parallel_divergence(
            a,
            b,
            case["kind"],
            vocab_axis_name=vocab,
            data_axis_name=data,
            form=case["form"],
            axis=axis,
            reduction=reduction,
            temperature=case.get("temperature", 1.0),
            beta=case.get("beta", 0.5),
            alpha=case.get("alpha", 0.1),
            **kw,
        )

    sharded = jax.shard_map(
        inner,
        mesh=mesh,
        in_specs=(arg_spec, arg_spec, *extra_specs),
        out_specs=out_spec,
        check_vma=case.get("check_vma", True),
    )
    upstream = case.get("upstream")

    def loss(a, b, *more):
        out = sharded(a, b, *more)
        return (jnp.sum(out * upstream) if upstream is not None else out * 3.7), out

    step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    args = (p, q, *extra_vals)
    counts = {
        "value_collectives": collectives(jax.make_jaxpr(sharded)(*args)),
        "grad_collectives": collectives(jax.make_jaxpr(step)(*args)),
    }
    if case.get("student_only"):
        grad = jax.grad(loss, argnums=1, has_aux=True)
        counts["student_grad_collectives"] = collectives(jax.make_jaxpr(grad)(*args))

    def reference_loss(a, b, *more):
        kw = dict(zip(extra_names, more, strict=True))
        if case.get("num_items_static"):
            kw["num_items"] = case["num_items"]
        name = PARAMS.get(case["kind"])
        if name is not None:
            kw[name] = case.get(name, DEFAULTS[name])
        out = kldiv.divergence(
            a,
            b,
            case["kind"],
            form=case["form"],
            axis=axis,
            reduction=reduction,
            temperature=case.get("temperature", 1.0),
            **kw,
        )
        return (jnp.sum(out * upstream) if upstream is not None else out * 3.7), out

    reference = jax.value_and_grad(reference_loss, argnums=(0, 1), has_aux=True)

    def outputs(args, whole):
        (_, value), (gp, gq) = step(*args)
        (_, want), (want_p, want_q) = reference(*whole)
        return {
            "value": value,
            "grad_p": gp,
            "grad_q": gq,
            "ref_value": want,
            "ref_grad_p": want_p,
            "ref_grad_q": want_q,
        }

    # the reference: the core on the whole, unpadded arrays, on one device
    whole = (jnp.asarray(case["p"]), jnp.asarray(case["q"]), *extra_vals)
    return outputs, (args, whole), counts


def run_all(cases: list[dict]) -> dict:
    """The cases of each layout under one ``jax.jit`` (a compilation costs about a second on
    CPU, most of it per case, the rest shared; one jit must not mix meshes); a case that
    fails to build is reported alone."""
    out: dict = {}
    for layout in dict.fromkeys(case["layout"] for case in cases):
        built = []
        for case in cases:
            if case["layout"] != layout:
                continue
            try:
                built.append((case["name"], *build(case)))
            except Exception:
                out[case["name"]] = {"crash": traceback.format_exc()}

        @jax.jit
        def every(all_args, built=built):
            return [fn(*args) for (_, fn, _, _), args in zip(built, all_args, strict=True)]

        results = every([args for _, _, args, _ in built])
        for (name, _, _, counts), arrays in zip(built, results, strict=True):
            out[name] = {k: np.asarray(v) for k, v in arrays.items()} | counts
    return out


def main() -> None:
    with open(sys.argv[2], "rb") as f:
        cases = pickle.load(f)
    out = run_all(cases)
    with open(sys.argv[3], "wb") as f:
        pickle.dump(out, f)
    if len(sys.argv) > 4:
        runpy.run_path(sys.argv[4], run_name="__main__")


if __name__ == "__main__":
    main()
