"""Shared by the closed forms: the array type, constants, parameter conversion and domain checks."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from .. import _namespace as ns

Array = Any

INF = math.inf
EULER_GAMMA = 0.57721566490153286061
LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------
# Parameter handling
# ---------------------------------------------------------------------------------------------

_DOMAINS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]] = {
    "real": (lambda a: np.isfinite(a), "finite"),
    "positive": (lambda a: (a > 0) & (a < np.inf), "> 0 and finite"),
    "nonneg": (lambda a: (a >= 0) & (a < np.inf), ">= 0 and finite"),
    "unit": (lambda a: (a >= 0) & (a <= 1), "in [0, 1]"),
    "unit_open_left": (lambda a: (a > 0) & (a <= 1), "in (0, 1]"),
    "unit_open": (lambda a: (a > 0) & (a < 1), "in (0, 1)"),
    "logit": (lambda a: ~np.isnan(a), "not NaN"),
    "count": (lambda a: (a >= 0) & (a == np.round(a)) & (a < np.inf), "a whole number >= 0"),
    "any": (lambda a: np.ones(np.shape(a), dtype=bool), ""),
}


def host(a: Array) -> np.ndarray:
    if ns.is_torch_array(a):
        return a.detach().to("cpu").double().numpy()
    return np.asarray(a, dtype=np.float64)


def params_of(
    spec: tuple[tuple[str, Any, str], ...], check: bool, counts: tuple[str, ...] = ()
) -> tuple[ModuleType, list[Array]]:
    """``(xp, arrays)`` for ``(name, value, domain)`` triples, cast to one float dtype.

    Python numbers take the dtype of the array arguments (a default ``mean_q=0.0`` must not
    promote float32 to float64); ``counts`` may be integer arrays (a binomial's ``n``).
    """
    names = tuple(n for n, _, _ in spec)
    values = [v for _, v, _ in spec]
    xp, arrays = ns.namespace(*values, names=names)
    given = [(n, a) for (n, v, _), a in zip(spec, values, strict=True) if ns.is_array(v)]
    # counts (a binomial's n, sample values) may be integers; floating ones set the dtype too
    typed = [(n, a) for n, a in given if n not in counts or _is_floating(xp, a)]
    dtype = ns.compute_dtype(xp, *typed) if typed else ns.widest_float(xp)
    device = ns.device_of(given[0][1]) if given else None
    out = []
    for (_, value, _), a in zip(spec, arrays, strict=True):
        if ns.is_array(value):
            out.append(a if a.dtype == dtype else xp.astype(a, dtype))
        else:
            out.append(xp.asarray(value, dtype=dtype, device=device))
    if check:
        for (name, _, domain), a in zip(spec, out, strict=True):
            check_domain(name, a, domain)
    return xp, out


def _is_floating(xp: ModuleType, a: Array) -> bool:
    return ns.is_half(a.dtype) or xp.isdtype(a.dtype, "real floating")


def loc_scale_pair(
    loc_p: Any, scale_p: Any, loc_q: Any, scale_q: Any, check: bool
) -> tuple[ModuleType, list[Array]]:
    """The parameters of two location-scale distributions (the most common signature)."""
    return params_of(
        (
            ("loc_p", loc_p, "real"),
            ("scale_p", scale_p, "positive"),
            ("loc_q", loc_q, "real"),
            ("scale_q", scale_q, "positive"),
        ),
        check,
    )


def check_domain(name: str, a: Array, domain: str) -> None:
    if ns.is_traced(a):
        raise ValueError(
            "check=True needs concrete values; it cannot run under jax.jit, torch.compile or "
            "vmap. "
            "Validate outside the compiled function."
        )
    ok, desc = _DOMAINS[domain]
    good = ok(host(a))
    if not good.all():
        bad = np.argwhere(~good)
        first = tuple(int(i) for i in bad[0]) if good.ndim else ()
        value = host(a)[first] if good.ndim else float(host(a))
        raise ValueError(
            f"Expected `{name}` to be {desc}; {len(bad) if good.ndim else 1} value(s) are not, "
            f"the first at index {first}: {value!r}."
        )
