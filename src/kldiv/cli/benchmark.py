"""The distillation benchmark behind ``kldiv bench`` and ``benchmarks/bench_distill_*.py``.

Forward + backward to the student logits, ``[N, V]``, one divergence D(teacher‖student) at a
time, each variant computing the same number:

* ``eager``: the plain PyTorch formula people write (for KL: ``F.kl_div(F.log_softmax(s),
  F.log_softmax(t), log_target=True, reduction="batchmean")``);
* ``compile``: the same function under ``torch.compile`` (steady state; its first call, the
  compilation, is reported separately);
* ``liger``: Liger Kernel, when installed and on CUDA (``LigerKLDIVLoss`` fed by a separate
  ``log_softmax``, ``LigerJSD`` for JSD and, with the arguments swapped, reverse KL);
* ``kldiv``: :class:`kldiv.torch.DistillationLoss` with its automatic dispatch;
* ``core``: the core function, ``kldiv.divergence(t, s, kind, form="logits")`` (the
  headline API, which the row engine serves on torch tensors);
* ``floor``: what any fused forward + backward needs at least, on CPU: ``k`` exps per
  element (2, or 3 where the divergence needs the log of a mixture; the third stands for
  that log) in cache-sized row chunks, written into a freshly allocated ``[N, V]``
  gradient, which is what autograd hands back;
* on JAX, ``jax.jit(jax.value_and_grad(loss))`` of: ``jax`` (the core function on JAX
  arrays), ``jax_composition`` (the same formula over ``jax.nn.log_softmax`` as JAX code
  writes it) and ``optax`` (``optax.losses.kl_divergence_with_log_targets``, KL and reverse
  KL). Their ratios are against ``jax``.

Method: on CPU every measurement runs in a fresh subprocess (peak memory is the rise of the
peak resident set once the inputs exist), variants alternate over rounds; on CUDA timings use
CUDA events after warm-up, and peak memory is ``max_memory_allocated`` above the inputs. The
figure of merit is the median. On CUDA the memory-traffic floor is also reported: a fused
forward + backward must read both logits twice and write one gradient, ``5·N·V·itemsize``
bytes, timed at the copy bandwidth measured on the same device.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from kldiv._defaults import DistillationKind, Kind

# "tensor": kldiv's CPU path with its compiled kernel switched off (KLDIV_NATIVE=0)
VARIANTS = (
    "eager",
    "compile",
    "liger",
    "kldiv",
    "tensor",
    "core",
    "floor",
    "core_log_probs",
    "core_teacher_grad",
    "eager_teacher_grad",
    "definition_log_probs",
    "definition_teacher_grad",
    "kldiv_softcap",
    "eager_softcap",
    "compile_softcap",
    "jax",
    "jax_composition",
    "optax",
)
JAX_VARIANTS = ("jax", "jax_composition", "optax")
# every kind of the family; "symmetric_kl" has no DistillationLoss (variants "kldiv", "tensor")
KINDS = ("kl", "reverse_kl", "js", "skew_kl", "skew_reverse_kl", "tv", "symmetric_kl")
# the parameters every variant uses: DistillationLoss's and the core's defaults
BETA = 0.5
ALPHA = 0.1
# the "*_softcap" variants: Gemma-family soft-capping of both logits, c·tanh(z/c)
SOFTCAP = 30.0
# exps per element of the floor: a third where the divergence needs a log of a mixture
FLOOR_EXPS = {"js": 3, "skew_kl": 3, "skew_reverse_kl": 3}
DTYPES = ("float32", "bfloat16", "float16")


def composition(kind: str, beta: float = BETA, alpha: float = ALPHA) -> Callable[[Any, Any], Any]:
    """The hand-written PyTorch loss for ``kind`` (mean over rows), as trainers write it."""
    import torch
    import torch.nn.functional as F

    def kl(lp: Any, lq: Any) -> Any:  # KL(P‖Q) from log-probabilities
        return F.kl_div(lq, lp, log_target=True, reduction="batchmean")

    def loss(s: Any, t: Any) -> Any:
        ls = F.log_softmax(s.float(), -1)
        lt = F.log_softmax(t.float(), -1)
        if kind == "kl":
            return kl(lt, ls)
        if kind == "reverse_kl":
            return kl(ls, lt)
        if kind == "symmetric_kl":
            return kl(lt, ls) + kl(ls, lt)
        if kind == "js":
            lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
            return beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)
        if kind == "skew_kl":
            return kl(lt, torch.logaddexp(lt + math.log(alpha), ls + math.log1p(-alpha)))
        if kind == "skew_reverse_kl":
            return kl(ls, torch.logaddexp(ls + math.log(alpha), lt + math.log1p(-alpha)))
        if kind == "tv":
            return 0.5 * (ls.exp() - lt.exp()).abs().sum(-1).mean()
        raise ValueError(f"no anchor formula for {kind!r}")

    return loss


def jax_composition(kind: str, beta: float = BETA, alpha: float = ALPHA) -> Callable[..., Any]:
    """The hand-written JAX loss for ``kind`` (mean over rows), as JAX code writes it."""
    import jax
    import jax.numpy as jnp

    def kl(lp: Any, lq: Any) -> Any:
        return jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1))

    def mix(la: Any, lb: Any, w: float) -> Any:
        return jnp.logaddexp(la + math.log(w), lb + math.log1p(-w))

    def loss(s: Any, t: Any) -> Any:
        ls = jax.nn.log_softmax(s.astype(jnp.float32), axis=-1)
        lt = jax.nn.log_softmax(t.astype(jnp.float32), axis=-1)
        if kind == "kl":
            return kl(lt, ls)
        if kind == "reverse_kl":
            return kl(ls, lt)
        if kind == "symmetric_kl":
            return kl(lt, ls) + kl(ls, lt)
        if kind == "js":
            lm = mix(lt, ls, beta)
            return beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)
        if kind == "skew_kl":
            return kl(lt, mix(lt, ls, alpha))
        if kind == "skew_reverse_kl":
            return kl(ls, mix(ls, lt, alpha))
        if kind == "tv":
            return 0.5 * jnp.mean(jnp.sum(jnp.abs(jnp.exp(ls) - jnp.exp(lt)), axis=-1))
        raise ValueError(f"no anchor formula for {kind!r}")

    return loss


def _jax_step(variant: str, kind: str) -> Callable[..., Any] | None:
    import jax

    if variant == "jax":
        import kldiv
        from kldiv._kinds import params_of

        params = params_of(kind, BETA, ALPHA)

        def loss(s: Any, t: Any) -> Any:
            return kldiv.divergence(t, s, cast("Kind", kind), form="logits", **params)

    elif variant == "optax":
        try:
            import optax
        except ImportError:
            return None
        if kind not in ("kl", "reverse_kl"):
            return None
        f = optax.losses.kl_divergence_with_log_targets  # (log_predictions, log_targets)

        def loss(s: Any, t: Any) -> Any:
            ls, lt = jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1)
            return (f(ls, lt) if kind == "kl" else f(lt, ls)).mean()

    else:
        loss = jax_composition(kind)
    return jax.jit(jax.value_and_grad(loss))


def _measure_jax(variant: str, kind: str, n: int, v: int, dtype: str, iters: int) -> dict:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return {"unavailable": "JAX is not installed"}
    step = _jax_step(variant, kind)
    if step is None:
        return {"unavailable": f"{variant} is not installed or has no {kind}"}
    ks, kt = jax.random.split(jax.random.PRNGKey(0))
    s = (2 * jax.random.normal(ks, (n, v), jnp.float32)).astype(dtype)
    t = (2 * jax.random.normal(kt, (n, v), jnp.float32)).astype(dtype)
    jax.block_until_ready((s, t))
    base = _rss_kib()
    times, first, value = [], math.nan, math.nan
    for i in range(2 + iters):
        t0 = time.perf_counter()
        out, grad = jax.block_until_ready(step(s, t))
        dt = time.perf_counter() - t0
        if i == 0:
            first, value = dt, float(out)
        elif i >= 2:
            times.append(dt)
        del out, grad
    import resource

    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"times_s": times, "first_call_s": first, "value": value, "peak_extra_mib": peak}


def floor(kind: str) -> Callable[[Any, Any], Any]:
    """The ``floor`` variant: ``FLOOR_EXPS`` exps per element over row chunks that stay in
    cache (2^18 elements, as kldiv's chunked path), into a fresh ``[N, V]`` gradient that the
    backward returns. Torch's vectorised, multi-threaded exp; no other arithmetic."""
    import torch

    exps = FLOOR_EXPS.get(kind, 2)

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, s: Any, t: Any) -> Any:
            n, v = s.shape
            grad = torch.empty((n, v), dtype=torch.float32, device=s.device)
            rows = max(1, (1 << 18) // max(v, 1))
            buf = torch.empty((min(rows, n), v), dtype=torch.float32, device=s.device)
            for a in range(0, n, rows):
                g, b = grad[a : a + rows], buf[: min(rows, n - a)]
                torch.exp(s[a : a + rows], out=g)
                torch.exp(t[a : a + rows], out=b)
                if exps == 3:
                    torch.exp(b.neg_(), out=b)
                g.add_(b)
            ctx.save_for_backward(grad)
            return grad[:, 0].sum()

        @staticmethod
        def backward(ctx: Any, go: Any) -> Any:
            (grad,) = ctx.saved_tensors
            return grad.mul_(go), None

    return Floor.apply


def liger(kind: str, beta: float = 0.5) -> Callable[[Any, Any], Any] | None:
    """Liger Kernel's loss for ``kind`` fed the way its docs show, or None if unavailable."""
    try:
        import torch.nn.functional as F
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except ImportError:
        return None
    if kind == "js":
        # LigerJSD(log_q = student, log_p = teacher), M = β·P + (1−β)·Q: β weighs the teacher,
        # as kldiv's does
        jsd = LigerJSD(beta=beta)
        return lambda s, t: jsd(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1))
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    if kind == "kl":
        return lambda s, t: kl(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1))
    if kind == "reverse_kl":
        return lambda s, t: kl(F.log_softmax(t.float(), -1), F.log_softmax(s.float(), -1))
    return None


def step_for(variant: str, kind: str) -> Callable[[Any, Any], Any] | None:
    if variant.endswith("_softcap"):
        return _softcapped(variant.removesuffix("_softcap"), kind)
    if variant in ("kldiv", "tensor"):
        from kldiv.torch import DistillationLoss

        if kind == "symmetric_kl":
            return None
        # the caller checked `kind` against KINDS
        loss = DistillationLoss(cast("DistillationKind", kind), beta=BETA, alpha=ALPHA)
        return loss if variant == "kldiv" else _without_native(loss)
    if variant == "core":
        import kldiv
        from kldiv._kinds import params_of

        params = params_of(kind, BETA, ALPHA)
        return lambda s, t: kldiv.divergence(t, s, cast("Kind", kind), form="logits", **params)
    if variant == "core_log_probs":  # the log-softmaxes in the step, as in "eager"
        import torch

        import kldiv
        from kldiv._kinds import params_of

        params = params_of(kind, BETA, ALPHA)
        return lambda s, t: kldiv.divergence(
            torch.log_softmax(t, -1), torch.log_softmax(s, -1), cast("Kind", kind),
            form="log_probs", **params,
        )  # fmt: skip
    if variant.startswith("definition_"):  # the same call through the core's definition
        from kldiv.torch._rows.dispatch import core_only

        engine = step_for(variant.replace("definition_", "core_"), kind)
        assert engine is not None

        def definition(s: Any, t: Any) -> Any:
            with core_only():
                return engine(s, t)

        return definition
    if variant in ("core_teacher_grad", "eager_teacher_grad"):  # both sides get a gradient
        inner = step_for(variant.split("_")[0], kind)
        assert inner is not None  # "core" and "eager" exist for every kind
        return lambda s, t: inner(s, t.detach().requires_grad_())
    if variant == "floor":
        return floor(kind)
    if variant == "compile":
        import torch

        return torch.compile(composition(kind))
    if variant == "liger":
        return liger(kind)
    return composition(kind)


def _softcapped(base: str, kind: str) -> Callable[[Any, Any], Any] | None:
    """``base`` ("kldiv", "eager" or "compile") on soft-capped logits: kldiv's loss maps them
    itself (inside the C kernel on CPU); the anchors cap both ``[N, V]`` logits first, as
    trainers do."""
    import torch

    if base == "kldiv":
        from kldiv.torch import DistillationLoss

        if kind == "symmetric_kl":
            return None
        kind_ = cast("DistillationKind", kind)
        return DistillationLoss(kind_, beta=BETA, alpha=ALPHA, softcap=SOFTCAP)
    inner = composition(kind)

    def capped(s: Any, t: Any) -> Any:
        return inner(SOFTCAP * torch.tanh(s / SOFTCAP), SOFTCAP * torch.tanh(t / SOFTCAP))

    return torch.compile(capped) if base == "compile" else capped


def _without_native(loss: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def step(s: Any, t: Any) -> Any:
        saved = os.environ.get("KLDIV_NATIVE")
        os.environ["KLDIV_NATIVE"] = "0"
        try:
            return loss(s, t)  # the CPU path's gradient is computed here, in the forward
        finally:
            if saved is None:
                del os.environ["KLDIV_NATIVE"]
            else:
                os.environ["KLDIV_NATIVE"] = saved

    return step


def _inputs(n: int, v: int, dtype: str, device: str) -> tuple[Any, Any]:
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    # in place: a transient second [N, V] here would set the peak that CPU runs measure
    s = torch.randn(n, v, generator=g).mul_(2).to(device=device, dtype=getattr(torch, dtype))
    t = torch.randn(n, v, generator=g).mul_(2).to(device=device, dtype=getattr(torch, dtype))
    return s.requires_grad_(True), t


def _rss_kib() -> int:
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def measure(
    variant: str, kind: str, n: int, v: int, dtype: str, device: str, iters: int
) -> dict[str, Any]:
    """One variant in this process: times of ``iters`` steps after two warm-ups, the first
    call, the value, and peak extra memory (MiB)."""
    if variant in JAX_VARIANTS:
        return _measure_jax(variant, kind, n, v, dtype, iters)
    import torch

    step = step_for(variant, kind)
    if step is None:
        return {"unavailable": f"{variant} is not installed or has no {kind}"}
    s, t = _inputs(n, v, dtype, device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib()
    times, first, value = [], math.nan, math.nan
    for i in range(2 + iters):
        s.grad = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        loss = step(s, t)
        loss.backward()
        if cuda:
            end.record()
            torch.cuda.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            dt = time.perf_counter() - t0
        if i == 0:
            first = time.perf_counter() - t0
            value = float(loss)
        elif i >= 2:
            times.append(dt)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        import resource

        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"times_s": times, "first_call_s": first, "value": value, "peak_extra_mib": peak}


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted)."""
    import torch

    x = torch.empty(2**28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 4 * 10 / (start.elapsed_time(end) / 1e3)


def _child(variant: str, kind: str, n: int, v: int, dtype: str, device: str, iters: int) -> dict:
    code = (
        "import json, sys, torch; torch.set_num_threads(int(sys.argv[8]));"
        "from kldiv.cli.benchmark import measure;"
        "print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),"
        " sys.argv[5], sys.argv[6], int(sys.argv[7]))))"
    )
    import torch

    argv = [variant, kind, str(n), str(v), dtype, device, str(iters), str(torch.get_num_threads())]
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or ["no output"]
        return {"unavailable": f"{variant} failed: {lines[-1]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def environment(device: str) -> dict[str, Any]:
    import torch

    import kldiv

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kldiv": kldiv.__version__,
    }
    for name in ("triton", "liger_kernel", "jax", "jaxlib", "optax"):
        try:
            from importlib.metadata import version

            versions[name] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001 - absent or unversioned: simply not reported
            pass
    machine = {
        "platform": platform.platform(),
        "cores_visible": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        from pathlib import Path

        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                machine["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(device)
    return {"machine": machine, "versions": versions}


def run(
    device: str,
    n: int,
    v: int,
    dtype: str,
    kinds: tuple[str, ...],
    variants: tuple[str, ...],
    rounds: int,
    iters: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every variant × kind, alternating the order over rounds; returns the raw runs and a
    summary with the ratios ``variant median / kldiv median`` (> 1: kldiv is faster)."""
    cuda = device.startswith("cuda")
    result: dict[str, Any] = {
        "benchmark": "distillation loss, forward + backward to the student logits",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device,
        "shape": {"N": n, "V": v},
        "dtype": dtype,
        "rounds": rounds,
        "iters": iters,
        **environment(device),
        "kinds": {},
    }
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    if cuda:
        bw = copy_bandwidth(device)
        result["copy_bandwidth_GBps"] = bw / 1e9
        result["traffic_floor_s"] = 5 * n * v * itemsize / bw
    for kind in kinds:
        runs: dict[str, list[dict]] = {k: [] for k in variants}
        for r in range(rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                if cuda:
                    res = measure(variant, kind, n, v, dtype, device, iters)
                else:
                    res = _child(variant, kind, n, v, dtype, device, iters)
                runs[variant].append(res)
                if progress is not None:
                    progress(f"{kind} {variant} round {r + 1}")
        summary: dict[str, Any] = {}
        for variant, rs in runs.items():
            ok = [x for x in rs if "times_s" in x]
            if not ok:
                summary[variant] = {"unavailable": rs[0].get("unavailable", "failed")}
                continue
            summary[variant] = {
                "median_s": statistics.median(statistics.median(x["times_s"]) for x in ok),
                "first_call_s": statistics.median(x["first_call_s"] for x in ok),
                "peak_extra_mib": statistics.median(x["peak_extra_mib"] for x in ok),
                "value": ok[0]["value"],
            }
        # the reference: DistillationLoss, or the core function where there is none; on
        # JAX the core function on JAX arrays
        ref_name = "kldiv" if "median_s" in summary.get("kldiv", {}) else "core"
        ref = summary.get(ref_name, {}).get("median_s")
        jax_ref = summary.get("jax", {}).get("median_s")
        floor_s = summary.get("floor", {}).get("median_s")
        for variant in variants:
            m = summary[variant].get("median_s")
            base, base_name = (jax_ref, "jax") if variant in JAX_VARIANTS else (ref, ref_name)
            if variant.endswith("_softcap"):  # against kldiv on the same soft-capped logits
                base_name = "kldiv_softcap"
                base = summary.get(base_name, {}).get("median_s")
            if base and m and variant != base_name:
                summary[variant]["kldiv_speedup"] = m / base
            if floor_s and m and variant not in ("floor", "eager", "compile", "liger"):
                summary[variant]["over_floor"] = m / floor_s
        if ref and cuda:
            summary[ref_name]["over_traffic_floor"] = ref / result["traffic_floor_s"]
        result["kinds"][kind] = {"summary": summary, "runs": runs}
    return result


def table(result: dict[str, Any]) -> str:
    """The summary as a fixed-width text table."""
    head = (
        f"{'kind':<16}{'variant':<16}{'median ms':>11}{'first s':>9}{'peak MiB':>10}"
        f"{'kldiv ×':>9}{'÷ floor':>9}"
    )
    lines = [head, "-" * len(head)]
    for kind, entry in result["kinds"].items():
        for variant, s in entry["summary"].items():
            if "unavailable" in s:
                lines.append(f"{kind:<16}{variant:<16}  {s['unavailable']}")
                continue
            ratio, over = s.get("kldiv_speedup"), s.get("over_floor")
            lines.append(
                f"{kind:<16}{variant:<16}{s['median_s'] * 1e3:>11.2f}{s['first_call_s']:>9.2f}"
                f"{s['peak_extra_mib']:>10.1f}{'' if ratio is None else f'{ratio:.2f}':>9}"
                f"{'' if over is None else f'{over:.2f}':>9}"
            )
    lines.append(
        "kldiv ×: the variant's median time over kldiv's (> 1: kldiv is faster; the core "
        "function's where there is no DistillationLoss kind, and the jax variant's for the "
        "JAX anchors); ÷ floor: over the floor's"
    )
    if "traffic_floor_s" in result:
        lines.append(
            f"memory-traffic floor (5·N·V·itemsize at {result['copy_bandwidth_GBps']:.0f} GB/s "
            f"copy bandwidth): {result['traffic_floor_s'] * 1e3:.2f} ms"
        )
    return "\n".join(lines)


def csv_rows(result: dict[str, Any]) -> list[list[Any]]:
    rows = [
        [
            "kind",
            "variant",
            "median_s",
            "first_call_s",
            "peak_extra_mib",
            "kldiv_speedup",
            "over_floor",
        ]
    ]
    for kind, entry in result["kinds"].items():
        for variant, s in entry["summary"].items():
            rows.append(
                [
                    kind,
                    variant,
                    s.get("median_s", ""),
                    s.get("first_call_s", ""),
                    s.get("peak_extra_mib", ""),
                    s.get("kldiv_speedup", ""),
                    s.get("over_floor", ""),
                ]
            )
    return rows
