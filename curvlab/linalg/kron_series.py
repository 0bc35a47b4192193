"""The temporal Kronecker model of a weight shared over the time steps of a recurrent
network: Martens, Ba & Johnson (2018), option 1 (concepts/recurrent.md#the-series-model).

A weight used at every step ``t = 1..T`` has the gradient ``Σ_t w_t``. Modelling the
per-step contributions ``w_t`` as a stationary linear-Gaussian process whose lag-``d``
covariance is ``V_d = Ψ^d V_0`` (``d ≥ 0``), with ``V_0 = G_0 ⊗ A_0`` and a symmetric lag-one
covariance ``V_1 = G_1 ⊗ A_1``, the block of the weight is

    F = Σ_{d=-(T-1)}^{T-1} (T - |d|) V_{|d|}  =  V_0^{1/2} ζ_T(Ψ̃) V_0^{1/2},

``Ψ̃ = V_0^{-1/2} V_1 V_0^{-1/2}`` and ``ζ_T(x) = Σ_{|d|<T} (T - |d|) x^{|d|}``. Each factor
pair is solved as the generalized eigenproblem ``C u = ψ B u`` (``Uᵀ B U = I``,
``Uᵀ C U = diag(ψ)``), so ``Ψ̃`` has eigenvalues ``ψ_G,i ψ_A,j`` and

    F = (P_G ⊗ P_A) diag(z) (P_G ⊗ P_A)ᵀ,   F⁻¹ = (U_G ⊗ U_A) diag(1/z) (U_G ⊗ U_A)ᵀ,

with ``P = B U = U⁻ᵀ`` and ``z_ij = ζ_T(ψ_G,i ψ_A,j)``.

Scale convention: this module takes ``G_0`` and ``G_1`` **summed over the time steps**
(``G_0 = T · E_t[g_t g_tᵀ]``, the independent-time-steps factor) and divides ``ζ_T`` by
``T``, so that ``Ψ̃ = 0`` gives back ``G_0 ⊗ A_0`` exactly. Layout as in
:mod:`curvlab.linalg`: ``kron(G, A) @ V.flatten() == (G @ V @ A.T).flatten()``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_square
from .eigen import generalized_symeig

__all__ = [
    "SERIES_CLIP",
    "SeriesBasis",
    "series_basis",
    "series_dense",
    "series_diagonal",
    "series_frobenius_norm",
    "series_matvec",
    "series_solve",
    "series_zeta",
]

#: The lag-one eigenvalues ``ψ`` of each factor are clipped to ``[-(1 - c), 1 - c]``: the
#: model is stationary only for ``|ψ| < 1`` (``ζ_T > 0`` there), and estimates from a
#: finite batch can leave that interval.
SERIES_CLIP = 1e-3


class SeriesBasis(NamedTuple):
    """One weight's series block ``F = (P_G ⊗ P_A) diag(z) (P_G ⊗ P_A)ᵀ``.

    ``u_g``/``u_a`` ``[d, d]``: the generalized eigenvectors (``Uᵀ B U = I``); ``p_g``/``p_a``
    their inverse transposes ``B U``; ``z`` ``[d_out, d_in]``: ``ζ_T(ψ_G ψ_Aᵀ) / T``.
    """

    u_g: Tensor
    p_g: Tensor
    u_a: Tensor
    p_a: Tensor
    z: Tensor


def series_zeta(x: Tensor, T: float) -> Tensor:
    """``ζ_T(x) = Σ_{d=-(T-1)}^{T-1} (T - |d|) x^{|d|}`` (elementwise; ``T ≥ 1``), as its closed
    form ``T (1+x)/(1-x) - 2x (1 - x^T)/(1-x)²`` away from ``x = 1`` and ``T²`` at it.

    ``T`` may be a mean sequence length (not an integer); ``x^T`` is then
    ``sign(x)^{round(T)} |x|^T``.
    """
    if T < 1:
        raise ValueError(f"series_zeta: T must be at least 1, got {T}.")
    one = 1.0 - x
    near = one.abs() < 1e-4
    safe = torch.where(near, torch.full_like(x, 0.5), x)
    s = 1.0 - safe
    parity = -1.0 if round(T) % 2 else 1.0  # the sign of x^T for negative x
    xt = torch.where(safe < 0, parity, 1.0) * safe.abs() ** T
    closed = T * (1.0 + safe) / s - 2.0 * safe * (1.0 - xt) / s**2
    # near x = 1: ζ_T(1) = T² minus its derivative T(T²-1)/3 times (1 - x)
    taylor = T * T - T * (T * T - 1.0) / 3.0 * one
    return torch.where(near, taylor, closed)


def series_basis(
    G0: Tensor,
    G1: Tensor,
    A0: Tensor,
    A1: Tensor,
    T: float,
    *,
    clip: float = SERIES_CLIP,
    name: str = "layer",
) -> SeriesBasis:
    """The series block of the zero-lag factors ``G0``, ``A0`` (SPD; damp them first) and
    the lag-one factors ``G1``, ``A1`` (symmetrised here) over ``T`` time steps.

    Scale: ``G0`` and ``G1`` summed over the time steps (module docstring), ``A0`` and
    ``A1`` per step. Raises :class:`~curvlab.linalg.LinAlgError` (naming ``name``) when a
    zero-lag factor is not positive definite.
    """
    for M, label in ((G0, "G0"), (G1, "G1"), (A0, "A0"), (A1, "A1")):
        check_square(M, f"{name} {label}")
    if not 0.0 <= clip < 1.0:
        raise ValueError(f"series_basis: clip must lie in [0, 1), got {clip}.")
    psi_g, u_g = generalized_symeig(G1, G0, name=f"{name} G0")
    psi_a, u_a = generalized_symeig(A1, A0, name=f"{name} A0")
    bound = 1.0 - clip
    psi_g, psi_a = psi_g.clamp(-bound, bound), psi_a.clamp(-bound, bound)
    z = series_zeta(torch.outer(psi_g, psi_a), T) / T
    return SeriesBasis(u_g=u_g, p_g=G0 @ u_g, u_a=u_a, p_a=A0 @ u_a, z=z)


def series_matvec(basis: SeriesBasis, V: Tensor) -> Tensor:
    """``F @ V.flatten()`` as a ``[d_out, d_in]`` matrix: ``P_G (z ∘ (P_Gᵀ V P_A)) P_Aᵀ``."""
    return basis.p_g @ (basis.z * (basis.p_g.mT @ V @ basis.p_a)) @ basis.p_a.mT


def series_solve(basis: SeriesBasis, V: Tensor) -> Tensor:
    """``F⁻¹ @ V.flatten()`` as a ``[d_out, d_in]`` matrix: ``U_G ((U_Gᵀ V U_A) / z) U_Aᵀ``."""
    return basis.u_g @ ((basis.u_g.mT @ V @ basis.u_a) / basis.z) @ basis.u_a.mT


def series_diagonal(basis: SeriesBasis) -> Tensor:
    """The diagonal of ``F`` as a ``[d_out, d_in]`` grid: ``(P_G∘P_G) z (P_A∘P_A)ᵀ``."""
    return basis.p_g.square() @ basis.z @ basis.p_a.square().mT


def series_frobenius_norm(basis: SeriesBasis) -> Tensor:
    """``‖F‖_F``: with ``S = PᵀP``, ``‖F‖²_F = Σ z ∘ (S_G^{∘2} z S_A^{∘2})``."""
    s_g = (basis.p_g.mT @ basis.p_g).square()
    s_a = (basis.p_a.mT @ basis.p_a).square()
    return (basis.z * (s_g @ basis.z @ s_a)).sum().clamp(min=0.0).sqrt()


def series_dense(basis: SeriesBasis) -> Tensor:
    """``F`` as a dense ``[d_out·d_in, d_out·d_in]`` matrix (small layers)."""
    p = torch.kron(basis.p_g, basis.p_a)
    return (p * basis.z.reshape(1, -1)) @ p.mT
