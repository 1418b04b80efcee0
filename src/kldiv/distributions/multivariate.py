"""Closed forms between multivariate normals (full covariance, low-rank plus diagonal, and
each against the other) and between Wishart distributions."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from .. import _namespace as ns
from ._common import Array, host, params_of
from ._special import mv_digamma, mv_gammaln

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


def _check_lowrank(name: str, m: Array, w: Array, d: Array, k: int) -> None:
    if w.ndim < 2 or w.shape[-2] != k or d.shape[-1:] != (k,) or m.shape[-1] != k:
        raise ValueError(
            f"Expected loc_{name} (..., {k}), cov_factor_{name} (..., {k}, r) and "
            f"cov_diag_{name} (..., {k}); got {tuple(m.shape)}, {tuple(w.shape)}, "
            f"{tuple(d.shape)}."
        )


def lowrank_mvn_mvn_kl(
    loc_p: Array,
    cov_factor_p: Array,
    cov_diag_p: Array,
    loc_q: Array,
    scale_tril_q: Array,
    *,
    check: bool = False,
) -> Array:
    """KL(N(μp, WWᵀ + diag(d)) ‖ N(μq, LqLqᵀ)): a low-rank-plus-diagonal P, a full Q.

    ``½(tr(Σq⁻¹Σp) + ‖Lq⁻¹(μp − μq)‖² − k + log|Σq| − log|Σp|)`` with
    ``tr(Σq⁻¹Σp) = ‖Lq⁻¹W‖²_F + ‖Lq⁻¹ diag(√d)‖²_F`` (two triangular solves) and ``log|Σp|``
    by the matrix determinant lemma through the r×r capacitance ``I + Wᵀ D⁻¹ W``. Shapes as in
    :func:`lowrank_mvn_kl` for P and :func:`mvn_kl` for Q.
    """
    xp, (mp, wp, dp, mq, lq) = params_of(
        (
            ("loc_p", loc_p, "real"),
            ("cov_factor_p", cov_factor_p, "real"),
            ("cov_diag_p", cov_diag_p, "positive"),
            ("loc_q", loc_q, "real"),
            ("scale_tril_q", scale_tril_q, "real"),
        ),
        check,
    )
    k = mp.shape[-1]
    _check_lowrank("p", mp, wp, dp, k)
    check_square("scale_tril_q", lq, k)
    if mq.shape[-1] != k:
        raise ValueError(f"P and Q must have the same dimension, got {k} and {mq.shape[-1]}.")
    if check:
        check_tril("scale_tril_q", lq)
    sp = ns.special(xp)
    lq = xp.tril(lq)
    _, _, logdet_p = woodbury(xp, sp, wp, dp)
    eye = xp.eye(k, dtype=dp.dtype, device=ns.device_of(dp))
    m_w = sp.solve_tril(lq, wp)
    m_d = sp.solve_tril(lq, eye * xp.sqrt(dp)[..., None, :])
    z = sp.solve_tril(lq, (mp - mq)[..., None])[..., 0]
    trace = xp.sum(m_w * m_w, axis=(-2, -1)) + xp.sum(m_d * m_d, axis=(-2, -1))
    logdet_q = 2 * xp.sum(xp.log(diag(xp, lq)), axis=-1)
    return 0.5 * (trace + xp.sum(z * z, axis=-1) - k + logdet_q - logdet_p)


def mvn_lowrank_mvn_kl(
    loc_p: Array,
    scale_tril_p: Array,
    loc_q: Array,
    cov_factor_q: Array,
    cov_diag_q: Array,
    *,
    check: bool = False,
) -> Array:
    """KL(N(μp, LpLpᵀ) ‖ N(μq, WWᵀ + diag(d))): a full P, a low-rank-plus-diagonal Q.

    The Woodbury identity gives ``Σq⁻¹ = D⁻¹ − A Lc⁻ᵀ Lc⁻¹ Aᵀ`` with ``A = D⁻¹W`` and
    ``LcLcᵀ = I + WᵀD⁻¹W``, so ``tr(Σq⁻¹ LpLpᵀ) = ‖D^{−½}Lp‖²_F − ‖Lc⁻¹AᵀLp‖²_F`` and the
    Mahalanobis term likewise; ``log|Σq|`` by the matrix determinant lemma. O(k²r) with no
    k×k inverse.
    """
    xp, (mp, lp, mq, wq, dq) = params_of(
        (
            ("loc_p", loc_p, "real"),
            ("scale_tril_p", scale_tril_p, "real"),
            ("loc_q", loc_q, "real"),
            ("cov_factor_q", cov_factor_q, "real"),
            ("cov_diag_q", cov_diag_q, "positive"),
        ),
        check,
    )
    k = mp.shape[-1]
    check_square("scale_tril_p", lp, k)
    _check_lowrank("q", mq, wq, dq, k)
    if check:
        check_tril("scale_tril_p", lp)
    sp = ns.special(xp)
    lp = xp.tril(lp)
    aq, lcq, logdet_q = woodbury(xp, sp, wq, dq)
    at = mT(xp, aq)
    b1 = sp.solve_tril(lcq, at @ lp)
    trace = xp.sum(lp * lp / dq[..., None], axis=(-2, -1)) - xp.sum(b1 * b1, axis=(-2, -1))
    delta = mp - mq
    b2 = sp.solve_tril(lcq, at @ delta[..., None])
    maha = xp.sum(delta * delta / dq, axis=-1) - xp.sum(b2 * b2, axis=(-2, -1))
    logdet_p = 2 * xp.sum(xp.log(diag(xp, lp)), axis=-1)
    return 0.5 * (trace + maha - k + logdet_q - logdet_p)


def wishart_kl(
    df_p: Array, scale_tril_p: Array, df_q: Array, scale_tril_q: Array, *, check: bool = False
) -> Array:
    """KL(W_k(np, Vp) ‖ W_k(nq, Vq)) between Wishart distributions of k×k matrices, given the
    degrees of freedom (> k − 1) and the Cholesky factors ``V = LLᵀ`` of the scale matrices.

    ``(np − nq)/2·ψ_k(np/2) + nq/2·(log|Vq| − log|Vp|) + np/2·(tr(Vq⁻¹Vp) − k)
    + log Γ_k(nq/2) − log Γ_k(np/2)``, with the multivariate gamma and digamma functions
    ``log Γ_k(a) = k(k − 1)/4·log π + Σ_{i<k} lnΓ(a − i/2)`` and ``ψ_k`` its derivative. It
    follows from the log-density and ``E[X] = nV``, ``E[log|X|] = ψ_k(n/2) + k log 2 + log|V|``
    (e.g. Bishop, *Pattern Recognition and Machine Learning*, (B.78)–(B.81)); the trace is
    ``‖Lq⁻¹Lp‖²_F`` (a triangular solve). Degrees of freedom of shape ``batch``, factors
    ``(*batch, k, k)``.
    """
    xp, (np_, lp, nq, lq) = params_of(
        (
            ("df_p", df_p, "positive"),
            ("scale_tril_p", scale_tril_p, "real"),
            ("df_q", df_q, "positive"),
            ("scale_tril_q", scale_tril_q, "real"),
        ),
        check,
    )
    k = lp.shape[-1]
    check_square("scale_tril_p", lp, k)
    check_square("scale_tril_q", lq, k)
    if check:
        check_tril("scale_tril_p", lp)
        check_tril("scale_tril_q", lq)
        if not (host(np_) > k - 1).all() or not (host(nq) > k - 1).all():
            raise ValueError(f"Expected `df_p` and `df_q` to be > k − 1 = {k - 1}.")
    sp = ns.special(xp)
    lp, lq = xp.tril(lp), xp.tril(lq)
    m = sp.solve_tril(lq, lp)
    trace = xp.sum(m * m, axis=(-2, -1))
    half_logdet_q = xp.sum(xp.log(diag(xp, lq)), axis=-1)
    half_logdet_p = xp.sum(xp.log(diag(xp, lp)), axis=-1)
    return (
        (np_ - nq) / 2 * mv_digamma(xp, sp, np_ / 2, k)
        + nq * (half_logdet_q - half_logdet_p)
        + np_ / 2 * (trace - k)
        + mv_gammaln(xp, sp, nq / 2, k)
        - mv_gammaln(xp, sp, np_ / 2, k)
    )
