"""The compiled CPU kernel (``_cpu_kernel.c`` through ``_cpu_native``) against the core in
float64: values and student gradients of KL and reverse KL, zero support, flagged rows,
strides, threads, half-precision inputs; and its build: cached, and a clean fallback to
tensor code when no compiler works, a cache that verifies what it loads, and $CC flags that
cannot change the kernel's floating-point semantics."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kldiv
from kldiv.torch import DistillationLoss, _cpu, _cpu_native


@pytest.fixture
def calls(monkeypatch):
    """Counts the rows handed to the compiled kernel, so a test can show it ran."""
    seen = []
    real = _cpu_native.rows

    def counted(kind, s, *args):
        seen.append(s.shape[0])
        return real(kind, s, *args)

    monkeypatch.setattr(_cpu_native, "rows", counted)
    return seen


def reference(kind, s, t, keep, temperature, go):
    """The core in float64 on the same float32 inputs: per-row values and the student
    gradient of Σ go·values."""
    s64 = torch.tensor(np.where(np.isnan(s), 0.0, s), dtype=torch.float64, requires_grad=True)
    ref = kldiv.divergence(
        torch.tensor(t, dtype=torch.float64),
        s64,
        kind,
        form="logits",
        temperature=temperature,
        mask=keep,
        reduction="none",
    )
    fin = ref.isfinite()
    (ref.masked_fill(~fin, 0.0) * go).sum().backward()
    return ref.detach(), s64.grad


EPS32 = float(np.finfo(np.float32).eps)


def grad_error_bound(kind, s, t, temperature, go):
    """Per element, a bound on the float32 kernel's student-gradient error in units of a
    few float32 eps (the test allows 4).

    log q_j = s_j/T − lse_s is a difference of terms of size M_j = |s_j/T| + |lse_s| (s/T
    itself rounded by eps·|s_j/T|), so it is off by a few eps·M_j absolutely and q_j = exp(·)
    by as much relatively; likewise log p_j with M'_j from t. KL's gradient (go/T)(q_j − p_j)
    is then off by (go/T)(q_j M_j + p_j M'_j); reverse KL's (go/T) q_j (d_j − R), with
    d_j = log q_j − log p_j and R = Σ q d, by (go/T) q_j (M_j |d_j − R| + M_j + M'_j + E_q[M + M']):
    q_j's relative error times d_j − R, d_j's own, and R's. Float64 values of the float32
    inputs stand in for the exact ones; the final rounding to float32 is the test's eps·|g|.
    """
    s64 = np.where(np.isnan(s), 0.0, s).astype(np.float64) / temperature
    t64 = t.astype(np.float64) / temperature

    def lse(a):
        m = a.max(-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        return m + np.log(np.exp(a - m).sum(-1, keepdims=True))

    ls, lt = lse(s64), lse(t64)
    lq, lp = s64 - ls, t64 - lt
    q, p = np.exp(lq), np.exp(lp)
    with np.errstate(invalid="ignore"):  # −inf logits: their terms are exactly 0
        m_s = np.where(q > 0, np.abs(s64) + np.abs(ls), 0.0)
        m_t = np.where(p > 0, np.abs(t64) + np.abs(lt), 0.0)
        scale = go[:, None] / temperature
        if kind == "kl":
            return scale * (q * m_s + p * m_t)
        d = np.where(q > 0, lq - lp, 0.0)
        r = (q * d).sum(-1, keepdims=True)
        mean_m = (q * (m_s + m_t)).sum(-1, keepdims=True)
        return scale * q * (m_s * np.abs(d - r) + m_s + m_t + mean_m)


def batch(rng, n, v, pattern):
    s = rng.normal(scale=3.0, size=(n, v)).astype(np.float32)
    t = rng.normal(scale=3.0, size=(n, v)).astype(np.float32)
    if pattern in ("teacher", "both") and v > 1:
        t[:, : v // 2][rng.random((n, v // 2)) < 0.4] = -np.inf
    if pattern in ("student", "both") and v > 1:
        s[:, v // 2 :][rng.random((n, v - v // 2)) < 0.4] = -np.inf
    if pattern == "both" and v > 2:
        s[:, 1] = t[:, 1] = -np.inf  # both zero: the term is 0, not NaN
    return s, t


@pytest.mark.parametrize("kind", ["kl", "reverse_kl"])
@pytest.mark.parametrize("shape", [(37, 1271), (6, 1), (5, 7), (4, 8), (3, 9), (3, 600)])
@pytest.mark.parametrize("pattern", ["none", "teacher", "student", "both"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_values_and_gradients_against_the_core(rng, calls, kind, shape, pattern, temperature):
    n, v = shape
    s, t = batch(rng, n, v, pattern)
    keep = torch.tensor(rng.random(n) < 0.8)
    s[~keep.numpy()] = np.nan  # skipped rows are never read
    st = torch.tensor(s, requires_grad=True)
    out = _cpu.per_row(kind, st, torch.tensor(t), keep, temperature)
    assert sum(calls) == n
    go = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    ref, ref_grad = reference(kind, s, t, keep, temperature, go)
    assert torch.equal(out.isposinf(), ref.isposinf()) and not out.isnan().any()
    fin = ref.isfinite()
    torch.testing.assert_close(out.double()[fin], ref[fin], rtol=2e-5, atol=2e-6)
    (out.masked_fill(~fin, 0.0).double() * go).sum().backward()
    assert st.grad.isfinite().all()
    if kind == "reverse_kl":  # at +inf rows the core's gradient convention is its own
        st.grad[~fin] = ref_grad[~fin].float()
    err = (st.grad.double() - ref_grad).abs().numpy()
    bound = grad_error_bound(kind, s, t, temperature, go.numpy())
    rows = (fin & keep).numpy()
    allowed = 4 * EPS32 * bound + EPS32 * ref_grad.abs().numpy()
    # both 0 where q_j = 0 (the term's gradient is exactly 0 then)
    over = err[rows] > allowed[rows]
    assert not over.any(), f"gradient errors over the bound: {err[rows][over]}"
    assert torch.equal(st.grad[~keep], torch.zeros_like(st.grad[~keep]))


@pytest.mark.parametrize("kind", ["kl", "reverse_kl"])
def test_rows_the_kernel_leaves_to_tensor_code_are_flagged_and_exact(kind):
    """+inf, NaN, all −inf on a side, and reverse KL's +inf rows go back to tensor code."""
    inf, nan = float("inf"), float("nan")
    s = torch.tensor(
        [
            [0.0, 1.0, 2.0],
            [inf, 0.0, 1.0],
            [0.0, nan, 1.0],
            [-inf, -inf, -inf],
            [0.5, 0.1, 0.0],
            [0.0, 1.0, 2.0],
        ]
    )
    t = torch.tensor(
        [
            [1.0, 0.0, 2.0],
            [0.0, 1.0, 2.0],
            [0.0, 1.0, 2.0],
            [0.0, 1.0, 2.0],
            [-inf, -inf, -inf],
            [0.0, -inf, 2.0],
        ]
    )
    values, flagged = _cpu_native.rows(kind, s, t, None, 1.0, torch.empty(6, 3))
    expected = [False, True, True, True, True, kind == "reverse_kl"]
    assert flagged.tolist() == expected
    st = s.clone().requires_grad_(True)
    out = DistillationLoss(kind, reduction="none")(st, t)
    s64 = s.double().requires_grad_(True)
    ref = DistillationLoss(kind, reduction="none", fast_path=False)(s64, t.double())
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    fin = ref.isfinite()
    torch.testing.assert_close(out.double()[fin], ref.detach()[fin])
    (out[fin]).sum().backward()
    (ref[fin]).sum().backward()
    torch.testing.assert_close(st.grad.double()[fin], s64.grad[fin], rtol=1e-5, atol=1e-6)


def test_p_underflowing_against_q_zero_is_still_infinite(calls):
    # p = e^-300·… is 0 in float32, but it is positive: KL(p‖q) with q = 0 there is +inf
    s = torch.tensor([[0.0, 0.0, -float("inf")]])
    t = torch.tensor([[-300.0, 0.0, 0.0]])
    assert DistillationLoss("kl", reduction="none")(s, t).item() == float("inf")
    assert calls == [1]


@pytest.mark.parametrize("kind", ["kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 3.0])
def test_huge_logits_and_subnormal_probabilities(kind, temperature, calls):
    """|s/T| near 1e20: the row maximum must shift to exactly 0 (a fused multiply-add there
    left its rounding error, e^(1e4), NaN); and a subnormal p (e^-88) against a log-ratio of
    3e38 contributes 1.8, so exp must not flush subnormals to 0."""
    far = -3e38 * min(temperature, 1.0)  # -3e38 once divided by T (not -inf)
    s = torch.tensor([[1e20, 5e19, 0.0, 1.0], [0.0, far, 0.0, far]])
    t = torch.tensor([[1e20, 5e19, 0.0, 1.0], [0.0, -88.0 * temperature, -1e3, -1e3]])
    if kind == "reverse_kl":
        s, t = t, s
    st = s.clone().requires_grad_(True)
    out = DistillationLoss(kind, reduction="none", temperature=temperature)(st, t)
    out.sum().backward()
    assert calls == [2]
    s64 = s.double().requires_grad_(True)
    ref = DistillationLoss(kind, reduction="none", temperature=temperature, fast_path=False)(
        s64, t.double()
    )
    ref.sum().backward()
    assert ref[1] > 1.0  # the subnormal term is what makes this row's value
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-6)
    assert st.grad.isfinite().all()
    torch.testing.assert_close(st.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


def test_concurrent_callers_with_different_row_counts(rng, monkeypatch):
    """Python threads sharing the pool while their row counts (and so their range counts)
    differ: each gets its own rows' values."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(_cpu_native, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(sys, "getswitchinterval", sys.getswitchinterval)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    inputs = [tuple(torch.tensor(x) for x in batch(rng, n, 40, "none")) for n in range(1, 9)]
    want = [_cpu_native.rows("kl", s, t, None, 1.0, None)[0] for s, t in inputs]
    errors = []

    def work(i):
        try:
            for _ in range(200):
                got = _cpu_native.rows("kl", *inputs[i], None, 1.0, None)[0]
                assert torch.equal(got, want[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:3]


@pytest.mark.parametrize("kind", ["kl", "reverse_kl"])
def test_strides_broadcast_teacher_and_half_precision(rng, kind, calls):
    s, t = batch(rng, 12, 257, "teacher")
    wide = torch.tensor(rng.normal(size=(12, 300)).astype(np.float32))
    wide[:, :257] = torch.tensor(s)
    student = wide[:, :257].requires_grad_(True)  # row stride 300
    teacher = torch.tensor(t[:1]).expand(12, 257)  # row stride 0
    out = DistillationLoss(kind, reduction="sum", temperature=1.5)(student, teacher)
    out.backward()
    ref = DistillationLoss(kind, reduction="sum", temperature=1.5, fast_path=False)
    s64 = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    expected = ref(s64, torch.tensor(t[:1], dtype=torch.float64).expand(12, 257))
    expected.backward()
    torch.testing.assert_close(out.double(), expected.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    # bfloat16 logits: converted a chunk at a time, then the same kernel
    calls.clear()
    sb = torch.tensor(s).bfloat16().requires_grad_(True)
    tb = torch.tensor(t).bfloat16()
    got = DistillationLoss(kind, reduction="none")(sb, tb)
    assert calls and got.dtype == torch.float32
    got.sum().backward()
    s64 = sb.detach().double().requires_grad_(True)
    want = DistillationLoss(kind, reduction="none", fast_path=False)(s64, tb.double())
    want.sum().backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(sb.grad.double(), s64.grad, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl"])
def test_threads_split_rows_without_changing_a_bit(rng, kind, monkeypatch):
    s, t = batch(rng, 40, 2000, "both")
    s, t = torch.tensor(s), torch.tensor(t)
    keep = torch.tensor(rng.random(40) < 0.7)
    g1, g2 = torch.empty(40, 2000), torch.empty(40, 2000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # three ranges, uneven
    v1, f1 = _cpu_native.rows(kind, s, t, keep, 1.3, g1)
    assert 40 * 2000 >= _cpu_native._PARALLEL_MIN
    monkeypatch.setattr(_cpu_native, "_PARALLEL_MIN", 1 << 62)  # one range
    v2, f2 = _cpu_native.rows(kind, s, t, keep, 1.3, g2)
    assert torch.equal(f1, f2)
    ok = ~f1
    assert torch.equal(v1[ok], v2[ok]) and torch.equal(g1[ok], g2[ok])


def test_evaluation_without_a_gradient(rng, calls):
    s, t = batch(rng, 9, 100, "teacher")
    out = DistillationLoss("reverse_kl", reduction="none")(torch.tensor(s), torch.tensor(t))
    ref, _ = reference("reverse_kl", s, t, None, 1.0, torch.ones(9, dtype=torch.float64))
    fin = ref.isfinite()
    assert calls == [9] and torch.equal(out.isinf(), ~fin)
    torch.testing.assert_close(out.double()[fin], ref[fin], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_kldiv_native_off_selects_tensor_code(rng, calls, monkeypatch, value):
    monkeypatch.setenv("KLDIV_NATIVE", value)
    s, t = batch(rng, 4, 50, "none")
    DistillationLoss("kl")(torch.tensor(s), torch.tensor(t))
    assert calls == [] and "KLDIV_NATIVE=0" in _cpu_native.status()


def _python(code: str, env: dict[str, str], *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = """
import json, torch
from kldiv.torch import DistillationLoss, _cpu_native
torch.manual_seed(0)
s, t = torch.randn(5, 33), torch.randn(5, 33)
fast = DistillationLoss("kl")(s, t).item()
core = DistillationLoss("kl", fast_path=False)(s.double(), t.double()).item()
print(json.dumps({"fast": fast, "core": core, "status": _cpu_native.status(),
                  "path": str(_cpu_native._state.get("path"))}))
"""


def test_the_build_is_cached_and_a_missing_compiler_falls_back(tmp_path):
    env = {"KLDIV_CACHE_DIR": str(tmp_path / "cache")}
    first = _python(PROBE, env)
    assert first["status"].startswith("compiled")
    built = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert built == [os.path.basename(first["path"])]  # no build leftovers
    stamp = os.stat(first["path"]).st_mtime_ns
    second = _python(PROBE, env)
    assert second["path"] == first["path"] and os.stat(first["path"]).st_mtime_ns == stamp
    assert second["fast"] == first["fast"]
    # no working compiler: the same loss from tensor code, and `status` says why
    broken = _python(PROBE, {**env, "KLDIV_CACHE_DIR": str(tmp_path / "other"), "CC": "false"})
    assert broken["status"].startswith("unavailable (") and "tensor code" in broken["status"]
    for r in (first, broken):
        assert abs(r["fast"] - r["core"]) <= 2e-6 * abs(r["core"])
    # a cache that cannot be written (here: a file where the directory should be) builds in
    # a private directory, loads, and leaves nothing behind; CC may carry arguments
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    tmp = tmp_path / "tmp"  # its own, so other tests' private builds cannot show up in it
    tmp.mkdir()
    env = {"KLDIV_CACHE_DIR": str(blocked / "kldiv"), "CC": "cc -DUNUSED=1", "TMPDIR": str(tmp)}
    private = _python(PROBE, env)
    assert private["status"].startswith("compiled (") and private["fast"] == first["fast"]
    assert not os.path.exists(private["path"]) and os.listdir(tmp) == []
    # a corrupt library under the cache's name is rebuilt, not trusted
    Path(first["path"]).write_bytes(b"garbage")
    again = _python(PROBE, env)
    assert again["status"].startswith("compiled (") and again["fast"] == first["fast"]


def test_a_forked_child_runs_the_kernel(rng):
    """A child forked after the parent ran the thread pool gets a fresh pool (the parent's
    threads do not exist in it)."""
    s, t = (torch.tensor(x) for x in batch(rng, 64, 2048, "none"))
    loss = DistillationLoss("kl")
    parent = loss(s, t).item()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.write(write, repr(loss(s, t).item()).encode())
        finally:
            os._exit(0)
    os.close(write)
    for _ in range(600):  # a hung child fails the test instead of hanging the suite
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish in 60 s")
    with os.fdopen(read) as f:
        child = float(f.read())
    assert child == parent


# The losses of the logits saved in argv[1], from a fresh interpreter: a library that kills the
# process it is loaded into (SIGBUS from a truncated file) fails the test instead of pytest.
LOSSES = """
import json, sys
import numpy as np, torch
from kldiv.torch import DistillationLoss, _cpu_native
native = []
launch = _cpu_native.rows
def counted(kind, s, *args):
    native.append(kind)
    return launch(kind, s, *args)
_cpu_native.rows = counted
data = np.load(sys.argv[1])
s, t = torch.from_numpy(data["s"]), torch.from_numpy(data["t"])
out = {k: DistillationLoss(k, reduction="none")(s, t).tolist() for k in ("kl", "reverse_kl")}
print(json.dumps({**out, "native": native, "status": _cpu_native.status(),
                  "path": str(_cpu_native._state.get("path")),
                  "flushes_subnormals": sys.float_info.min / 4 == 0}))
"""


def edge_logits(rng, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Float32 logits with -inf on either side and both, equal rows, and a subnormal
    probability that carries the value, saved to ``path`` for :data:`LOSSES`."""
    s, t = batch(rng, 12, 67, "both")
    s[0] = t[0] = 0.0
    # p = e^-88 (subnormal in float32) against a log-ratio of 3e38: a term of 1.8, which
    # a build that flushes subnormals to zero would lose; row 2 is the same for reverse KL
    s[1], t[1] = 0.0, -1e3
    s[1, 1::2] = -3e38
    t[1, :2] = (0.0, -88.0)
    s[2], t[2] = t[1], s[1]
    np.savez(path, s=s, t=t)
    return s, t


def assert_matches_the_core(s, t, got):
    """Both divergences against the core in float64, with the tolerance of the tests above."""
    t64, s64 = t.astype(np.float64), s.astype(np.float64)
    for kind, fn in (("kl", kldiv.kl_div), ("reverse_kl", kldiv.reverse_kl_div)):
        ref = torch.as_tensor(fn(t64, s64, form="logits", reduction="none"))
        out = torch.tensor(got[kind], dtype=torch.float64)
        assert torch.equal(out.isposinf(), ref.isposinf()) and not out.isnan().any(), kind
        fin = ref.isfinite()
        torch.testing.assert_close(out[fin], ref[fin], rtol=2e-5, atol=2e-6)
    assert not got["flushes_subnormals"]


def cached(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A library the launcher built and installed, with this environment's $CC."""
    cache = tmp_path_factory.mktemp("genuine")
    code = "from kldiv.torch import _cpu_native; _cpu_native.kernel(); "
    code += "import json; print(json.dumps(str(_cpu_native._state.get('path'))))"
    path = Path(_python(code, {"KLDIV_CACHE_DIR": str(cache)}))
    assert path.parent == cache and path.name == f"{path.name.rsplit('_', 1)[0]}_{sha256(path)}.so"
    return path


def foreign_library(tmp_path: Path) -> Path:
    """A valid shared library that is not the kernel."""
    src = tmp_path / "foreign.c"
    src.write_text("int f(void) { return 1; }\n")
    out = tmp_path / "foreign.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(out), str(src)], check=True, timeout=120)
    return out


@pytest.mark.parametrize(
    "damage",
    ["truncated", "foreign", "foreign_under_its_hash", "garbage_under_its_hash", "symlink"],
)
def test_a_cached_library_that_is_not_the_kernel_is_rebuilt(rng, tmp_path, genuine, damage):
    """Loading a truncated library killed the process (SIGBUS), and a foreign one raised
    `undefined symbol` on every call: a cached file is loaded only when it is a regular file
    whose SHA-256 is the one in its name and which exports the kernel."""
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / genuine.name
    if damage == "truncated":
        target.write_bytes(genuine.read_bytes()[: genuine.stat().st_size // 2])
    elif damage == "foreign":
        shutil.copy(foreign_library(tmp_path), target)
    elif damage == "foreign_under_its_hash":  # passes the hash check, lacks the symbol
        foreign = foreign_library(tmp_path)
        key = genuine.name.rsplit("_", 1)[0]
        shutil.copy(foreign, cache / f"{key}_{sha256(foreign)}.so")
    elif damage == "garbage_under_its_hash":  # not a library: it was taken for a noexec cache
        junk = tmp_path / "junk"
        junk.write_bytes(b"garbage")
        key = genuine.name.rsplit("_", 1)[0]
        shutil.copy(junk, cache / f"{key}_{sha256(junk)}.so")
    else:
        elsewhere = tmp_path / "elsewhere.so"
        shutil.copy(genuine, elsewhere)
        target.symlink_to(elsewhere)
    s, t = edge_logits(rng, tmp_path / "logits.npz")
    got = _python(LOSSES, {"KLDIV_CACHE_DIR": str(cache)}, str(tmp_path / "logits.npz"))
    assert got["status"] == f"compiled ({target})" and "kl" in got["native"]
    assert_matches_the_core(s, t, got)
    assert cached(cache) == [genuine.name] and not target.is_symlink()
    assert sha256(target) == sha256(genuine)


@pytest.mark.parametrize(
    ("cc", "reason"),
    [
        ('cc "-O2', "cannot be parsed"),  # shlex.split raised ValueError out of the loss
        ("true", "wrote no library"),
        ("cc -Dkldiv_cpu_rows=renamed", "does not export kldiv_cpu_rows"),
    ],
)
def test_an_unusable_compiler_falls_back_to_tensor_code(rng, tmp_path, cc, reason):
    s, t = edge_logits(rng, tmp_path / "logits.npz")
    env = {"KLDIV_CACHE_DIR": str(tmp_path / "cache"), "CC": cc}
    got = _python(LOSSES, env, str(tmp_path / "logits.npz"))
    assert got["status"].startswith("unavailable (") and reason in got["status"]
    assert got["native"] == []
    assert_matches_the_core(s, t, got)
    assert not (tmp_path / "cache").exists() or cached(tmp_path / "cache") == []


def test_fast_math_flags_in_cc_change_nothing(rng, tmp_path):
    """CC="gcc -ffast-math" changed KL (0.9353 against 0.9226) and, through crtfastmath.o,
    made the whole process flush subnormals to zero. The build overrides such flags, so the
    values are the plain build's, bit for bit."""
    s, t = edge_logits(rng, tmp_path / "logits.npz")
    data = str(tmp_path / "logits.npz")
    plain = _python(LOSSES, {"KLDIV_CACHE_DIR": str(tmp_path / "plain"), "CC": "cc"}, data)
    assert plain["status"].startswith("compiled (") and "kl" in plain["native"]
    assert_matches_the_core(s, t, plain)
    # the reported flag, then the rest at once (any one of them left in force would show)
    for flags in (
        "-ffast-math",
        "-Ofast -funsafe-math-optimizations -ffinite-math-only -fno-signed-zeros"
        " -mpc32 -mfpmath=387",
    ):
        env = {"KLDIV_CACHE_DIR": str(tmp_path / "fast"), "CC": f"cc {flags}"}
        got = _python(LOSSES, env, data)
        assert got["status"].startswith("compiled (") and got["native"] == plain["native"]
        assert not got["flushes_subnormals"], flags
        assert (got["kl"], got["reverse_kl"]) == (plain["kl"], plain["reverse_kl"]), flags
    # one library per effective command line
    assert len(cached(tmp_path / "fast")) == 2


def test_a_cache_that_cannot_hold_the_library_builds_elsewhere(rng, tmp_path, genuine):
    s, t = edge_logits(rng, tmp_path / "logits.npz")
    data = str(tmp_path / "logits.npz")
    # a missing cache directory is created
    nested = tmp_path / "missing" / "kldiv"
    got = _python(LOSSES, {"KLDIV_CACHE_DIR": str(nested)}, data)
    assert got["status"] == f"compiled ({nested / genuine.name})"
    assert_matches_the_core(s, t, got)
    # a directory where the library should go: a private build, loaded, then removed
    blocked = tmp_path / "blocked"
    (blocked / genuine.name).mkdir(parents=True)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    got = _python(LOSSES, {"KLDIV_CACHE_DIR": str(blocked), "TMPDIR": str(tmp)}, data)
    assert got["status"].startswith("compiled (") and not os.path.exists(got["path"])
    assert got["path"].startswith(str(tmp)) and os.listdir(tmp) == []
    assert_matches_the_core(s, t, got)
    # a cache path below a regular file cannot be created, by root either (a permission bit
    # would not stop root, who runs CI): a private build again
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    got = _python(LOSSES, {"KLDIV_CACHE_DIR": str(afile / "kldiv"), "TMPDIR": str(tmp)}, data)
    assert got["status"].startswith("compiled (") and got["path"].startswith(str(tmp))
    assert os.listdir(tmp) == [] and afile.read_text() == "not a directory"
    assert_matches_the_core(s, t, got)


def test_concurrent_builds_install_one_whole_file(rng, tmp_path):
    """Processes building into one empty cache at once each load a whole library (built into
    a temporary file, renamed into place) and leave one file behind."""
    s, t = edge_logits(rng, tmp_path / "logits.npz")
    env = {**os.environ, "KLDIV_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-c", textwrap.dedent(LOSSES), str(tmp_path / "logits.npz")]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    for got in results:
        assert got["status"].startswith("compiled (") and got["path"] == results[0]["path"]
        assert (got["kl"], got["reverse_kl"]) == (results[0]["kl"], results[0]["reverse_kl"])
    assert_matches_the_core(s, t, results[0])
    assert cached(tmp_path / "cache") == [os.path.basename(results[0]["path"])]


def test_a_hung_compiler_times_out_and_leaves_nothing_running(rng, tmp_path):
    """A compiler that answers --version but never finishes the build (its children holding
    the output pipes open): killed with its whole process group after the timeout."""
    marker = f"3127.{os.getpid()}"  # sleep's argument, to find this run's survivors
    script = (
        f'if [ "$1" = --version ]; then echo hung-cc 1; else sleep {marker} & sleep {marker}; fi'
    )
    env = {"KLDIV_CACHE_DIR": str(tmp_path / "cache"), "CC": shlex.join(["sh", "-c", script, "cc"])}
    s, t = edge_logits(rng, tmp_path / "logits.npz")
    code = "from kldiv.torch import _cpu_native\n_cpu_native._TIMEOUT = 2.0\n" + LOSSES
    start = time.monotonic()
    got = _python(code, env, str(tmp_path / "logits.npz"))
    assert time.monotonic() - start < 60
    assert "did not compile _cpu_kernel.c in 2 s" in got["status"] and got["native"] == []
    assert_matches_the_core(s, t, got)
    survivors = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes() == f"sleep\0{marker}\0".encode():
                survivors.append(cmdline.parent.name)
        except OSError:
            pass
    assert not survivors
