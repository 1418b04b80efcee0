"""float64 references for stored top-k teachers (tests/topk, tests/cli/test_teacher_topk.py),
and the error bounds that those tests use (derived in tests/topk/test_store.py's module doc).

Per token, with float32 logits ``x`` (``|x| ≤ X``, ``L = logsumexp(x)``):

- :func:`eps_of`: ``ε = 2⁻²⁰·(1 + X + |L|) + half_ulp(dtype)·max|lp|``, the largest error of a
  stored log-probability (float32 computation, then rounding to the stored dtype);
- :func:`bound`: the largest change of the per-token divergence when every log-probability of
  the teacher's distribution ``P`` moves by at most ``2ε`` (``P`` normalised after rounding):
  ``2ε·(1 + E_P|log P − log Q|)`` for ``"kl"``, ``2ε`` for ``"reverse_kl"`` (times 1.01 for
  ``e^{2ε} − 1`` against ``2ε``); the student gradient moves by at most ``4.04ε`` in L1 norm.
"""

from __future__ import annotations

import numpy as np
import torch

import kldiv

HALF_ULP = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}


def logsumexp64(x, axis=-1):
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):  # a row of only -inf: log(0) = -inf, as wanted
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def reference_topk(z, k, temperature=1.0):
    """float64: the top-k ids, their log-probs under the full softmax and the tail log-mass."""
    x = np.asarray(z, dtype=np.float64).reshape(-1, np.shape(z)[-1]) / temperature
    lp = x - logsumexp64(x)[:, None]
    ids = np.argsort(-lp, axis=-1, kind="stable")[:, :k]
    rest = lp.copy()
    np.put_along_axis(rest, ids, -np.inf, axis=-1)
    return ids, np.take_along_axis(lp, ids, axis=-1), logsumexp64(rest)


def eps_of(z, dtype, lp):
    """Per token, ε (see the module doc) for logits ``z`` and the log-probs ``lp`` stored."""
    x = np.asarray(z, dtype=np.float64).reshape(-1, np.shape(z)[-1])
    big = np.abs(np.where(np.isfinite(x), x, 0.0)).max(-1)
    return 2.0**-20 * (1 + big + np.abs(logsumexp64(x))) + HALF_ULP[dtype] * np.abs(lp).max(-1)


def distributions(s, ids, top, tail, policy="tail_bucket"):
    """The teacher's exact distribution ``P`` (NumPy) and the student's ``log Q`` (torch,
    differentiable in ``s`` ``[n, V]``) that ``TopKTeacher``'s ``policy`` compares."""
    n, v = s.shape
    ids_t = torch.tensor(ids)
    if policy == "tail_bucket":
        p = np.exp(np.concatenate([top, tail[:, None]], axis=-1))
        lq = torch.log_softmax(s, dim=-1)
        in_k = torch.zeros(n, v, dtype=torch.bool).scatter_(1, ids_t, True)
        rest = torch.logsumexp(torch.where(in_k, -torch.inf, lq), dim=-1, keepdim=True)
        return p, torch.cat([lq.gather(1, ids_t), rest], dim=-1)
    p = np.exp(top - logsumexp64(top)[:, None])
    return p, torch.log_softmax(s.gather(1, ids_t), dim=-1)


def reference_rows(kind, s, ids, top, tail, policy="tail_bucket"):
    """float64 per-token D(P‖Q) through the core, on explicit finite distributions."""
    p, log_q = distributions(s, ids, top, tail, policy)
    return kldiv.divergence(
        torch.tensor(p), log_q, kind, form=("probs", "log_probs"), reduction="none"
    )


def bound(kind, eps, s, ids, top, tail, policy="tail_bucket"):
    """Per token, the bound of the module doc on the divergence's change."""
    if kind == "reverse_kl":
        return 2.02 * eps
    p, log_q = distributions(s.detach(), ids, top, tail, policy)
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.where(p > 0, p * np.abs(np.log(p) - log_q.numpy()), 0.0)
    return 2.02 * eps * (1 + gap.sum(-1))
