"""An independent float64 reference: plain Python loops, math.log and math.fsum, no kldiv code.

Each function takes one distribution per row as lists of floats and returns one value per row,
following the textbook definitions with the conventions 0·log(0/q) = 0 and p·log(p/0) = +inf.
"""

from __future__ import annotations

import math

import numpy as np


def log_softmax_row(x: list[float]) -> list[float]:
    m = max(x)
    if m == -math.inf:
        return [math.nan] * len(x)
    s = math.fsum(math.exp(v - m) for v in x)
    return [v - m - math.log(s) for v in x]


def to_probs(row, form: str, temperature: float = 1.0) -> list[float]:
    row = [float(v) for v in row]
    if form == "probs":
        return row
    if form == "log_probs":
        return [math.exp(v) for v in row]
    return [math.exp(v) for v in log_softmax_row([v / temperature for v in row])]


def kl(p: list[float], q: list[float]) -> float:
    terms = []
    for a, b in zip(p, q, strict=True):
        if a == 0:
            continue
        if b == 0:
            return math.inf
        terms.append(a * math.log(a / b))
    return math.fsum(terms)


def js(p, q, beta: float = 0.5) -> float:
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q, strict=True)]
    left = beta * kl(p, m) if beta > 0 else 0.0
    right = (1 - beta) * kl(q, m) if beta < 1 else 0.0
    return left + right


def skew(p, q, alpha: float = 0.1) -> float:
    return kl(p, [alpha * a + (1 - alpha) * b for a, b in zip(p, q, strict=True)])


def tv(p, q) -> float:
    return 0.5 * math.fsum(abs(a - b) for a, b in zip(p, q, strict=True))


ROW_FUNCS = {
    "kl": lambda p, q, **k: kl(p, q),
    "reverse_kl": lambda p, q, **k: kl(q, p),
    "js": lambda p, q, beta=0.5, **k: js(p, q, beta),
    "skew_kl": lambda p, q, alpha=0.1, **k: skew(p, q, alpha),
    "skew_reverse_kl": lambda p, q, alpha=0.1, **k: skew(q, p, alpha),
    "symmetric_kl": lambda p, q, **k: kl(p, q) + kl(q, p),
    "tv": lambda p, q, **k: tv(p, q),
}


def reference(kind, p, q, form=("probs", "probs"), axis=-1, temperature=1.0, **params):
    """Per-distribution reference values (batch shape) for NumPy inputs of any rank."""
    if isinstance(form, str):
        form = (form, form)
    p, q = np.broadcast_arrays(np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64))
    p2 = np.moveaxis(p, axis, -1)
    q2 = np.moveaxis(q, axis, -1)
    batch = p2.shape[:-1]
    out = np.empty(batch, dtype=np.float64)
    for idx in np.ndindex(*batch):
        pr = to_probs(p2[idx], form[0], temperature)
        qr = to_probs(q2[idx], form[1], temperature)
        out[idx] = ROW_FUNCS[kind](pr, qr, **params)
    return out
