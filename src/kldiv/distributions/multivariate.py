"""Closed forms between multivariate normals: full covariance and low-rank plus diagonal."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from .. import _namespace as ns
from ._common import Array, host, params_of

# ---------------------------------------------------------------------------------------------
# Multivariate normals
# ---------------------------------------------------------------------------------------------


def mT(xp: ModuleType, a: Array) -> Array:
    return xp.matrix_transpose(a) if hasattr(xp, "matrix_transpose") else xp.swapaxes(a, -1, -2)


def diag(xp: ModuleType, a: Array) -> Array:
    return xp.linalg.diagonal(a) if hasattr(xp, "linalg") else xp.diagonal(a, axis1=-2, axis2=-1)


def mvn_kl(
    loc_p: Array, scale_tril_p: Array, loc_q: Array, scale_tril_q: Array, *, check: bool = False
) -> Array:
    """KL(N(μp, LpLpᵀ) ‖ N(μq, LqLqᵀ)) from Cholesky factors, without an explicit inverse.

    ``½(‖Lq⁻¹Lp‖²_F + ‖Lq⁻¹(μp − μq)‖² − k) + Σ log diag Lq − Σ log diag Lp``, each ``Lq⁻¹·``
    a triangular solve. Locations ``(..., k)``, factors ``(..., k, k)`` lower triangular with
    a positive diagonal (what ``cholesky`` returns); batch axes broadcast. Gradients flow to
    all four arguments through the solves.
    """
    xp, (mp, lp, mq, lq) = params_of(
        (
            ("loc_p", loc_p, "real"),
            ("scale_tril_p", scale_tril_p, "real"),
            ("loc_q", loc_q, "real"),
            ("scale_tril_q", scale_tril_q, "real"),
        ),
        check,
    )
    check_square("scale_tril_p", lp, mp.shape[-1])
    check_square("scale_tril_q", lq, mq.shape[-1])
    if mp.shape[-1] != mq.shape[-1]:
        raise ValueError(
            f"P and Q must have the same dimension, got {mp.shape[-1]} and {mq.shape[-1]}."
        )
    if check:
        check_tril("scale_tril_p", lp)
        check_tril("scale_tril_q", lq)
    sp = ns.special(xp)
    k = mp.shape[-1]
    lp, lq = xp.tril(lp), xp.tril(lq)  # only the lower triangles are read, on every backend
    m = sp.solve_tril(lq, lp)
    z = sp.solve_tril(lq, (mp - mq)[..., None])[..., 0]
    logdet = xp.sum(xp.log(diag(xp, lq)), axis=-1) - xp.sum(xp.log(diag(xp, lp)), axis=-1)
    return 0.5 * (xp.sum(m * m, axis=(-2, -1)) + xp.sum(z * z, axis=-1) - k) + logdet


def check_ordered(low: tuple[str, Array], high: tuple[str, Array]) -> None:
    if not (host(low[1]) < host(high[1])).all():
        raise ValueError(f"Expected `{low[0]}` < `{high[0]}` everywhere in the batch.")


def check_tril(name: str, a: Array) -> None:
    """A Cholesky factor: lower triangular (only that part is read) with a positive diagonal."""
    h = host(a)
    k = h.shape[-1]
    if np.any(np.triu(h, 1) != 0):
        raise ValueError(
            f"Expected `{name}` to be lower triangular (a Cholesky factor); it has nonzero "
            "entries above the diagonal. Pass np.linalg.cholesky(cov), not cov."
        )
    diag = h[..., np.arange(k), np.arange(k)]
    if not (diag > 0).all():
        raise ValueError(f"Expected `{name}` to have a positive diagonal, got {diag.min()!r}.")


def check_square(name: str, a: Array, k: int) -> None:
    if a.ndim < 2 or a.shape[-1] != k or a.shape[-2] != k:
        raise ValueError(
            f"Expected `{name}` to have shape (..., {k}, {k}) to match its location, "
            f"got {tuple(a.shape)}."
        )


def woodbury(xp: ModuleType, sp: Any, w: Array, d: Array) -> tuple[Array, Array, Array]:
    """For Σ = W Wᵀ + diag(d): ``(A, Lc, logdet Σ)`` with A = D⁻¹W and Lc Lcᵀ = I + Wᵀ D⁻¹ W."""
    a = w / d[..., None]
    r = w.shape[-1]
    eye = xp.eye(r, dtype=w.dtype, device=ns.device_of(w))
    lc = sp.cholesky(eye + mT(xp, w) @ a)
    logdet = xp.sum(xp.log(d), axis=-1) + 2 * xp.sum(xp.log(diag(xp, lc)), axis=-1)
    return a, lc, logdet


def lowrank_mvn_kl(
    loc_p: Array,
    cov_factor_p: Array,
    cov_diag_p: Array,
    loc_q: Array,
    cov_factor_q: Array,
    cov_diag_q: Array,
    *,
    check: bool = False,
) -> Array:
    """KL between low-rank-plus-diagonal Gaussians, Σ = W Wᵀ + diag(d), in O(k·r²).

    The trace, Mahalanobis and log-determinant terms of :func:`mvn_kl` are evaluated with the
    Woodbury identity and the matrix determinant lemma through the r×r capacitance matrix
    ``I + Wᵀ D⁻¹ W``, never forming a k×k matrix. Locations ``(..., k)``, factors
    ``(..., k, r)`` (the ranks of P and Q may differ), diagonals ``(..., k)`` and > 0.
    """
    xp, (mp, wp, dp, mq, wq, dq) = params_of(
        (
            ("loc_p", loc_p, "real"),
            ("cov_factor_p", cov_factor_p, "real"),
            ("cov_diag_p", cov_diag_p, "positive"),
            ("loc_q", loc_q, "real"),
            ("cov_factor_q", cov_factor_q, "real"),
            ("cov_diag_q", cov_diag_q, "positive"),
        ),
        check,
    )
    sp = ns.special(xp)
    k = mp.shape[-1]
    for name, w, d, m in (("p", wp, dp, mp), ("q", wq, dq, mq)):
        if w.ndim < 2 or w.shape[-2] != k or d.shape[-1:] != (k,) or m.shape[-1] != k:
            raise ValueError(
                f"Expected loc_{name} (..., {k}), cov_factor_{name} (..., {k}, r) and "
                f"cov_diag_{name} (..., {k}); got {tuple(m.shape)}, {tuple(w.shape)}, "
                f"{tuple(d.shape)}."
            )
    aq, lcq, logdet_q = woodbury(xp, sp, wq, dq)
    _, _, logdet_p = woodbury(xp, sp, wp, dp)
    at = mT(xp, aq)  # (..., r, k)
    # tr(Σq⁻¹ Dp) = Σ dp/dq − ‖Lc⁻¹ Aᵀ Dp^{1/2}‖²
    b1 = sp.solve_tril(lcq, at * xp.sqrt(dp)[..., None, :])
    tr_d = xp.sum(dp / dq, axis=-1) - xp.sum(b1 * b1, axis=(-2, -1))
    # tr(Σq⁻¹ Wp Wpᵀ) = ‖Dq^{-1/2} Wp‖² − ‖Lc⁻¹ Aᵀ Wp‖²
    b2 = sp.solve_tril(lcq, at @ wp)
    tr_w = xp.sum(wp * wp / dq[..., None], axis=(-2, -1)) - xp.sum(b2 * b2, axis=(-2, -1))
    # δᵀ Σq⁻¹ δ = Σ δ²/dq − ‖Lc⁻¹ Aᵀ δ‖²
    delta = mp - mq
    b3 = sp.solve_tril(lcq, at @ delta[..., None])
    maha = xp.sum(delta * delta / dq, axis=-1) - xp.sum(b3 * b3, axis=(-2, -1))
    return 0.5 * (tr_d + tr_w + maha - k + logdet_q - logdet_p)
