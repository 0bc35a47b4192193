"""Factored Tikhonov damping (Martens & Grosse 2015 §6.3; concepts/kronecker.md#damped-inverse;
concepts/block_tridiagonal.md#the-math)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_finite, check_same_dtype_device, check_scalar, check_square

__all__ = ["check_damping", "factored_damping", "pi_correction"]


def check_damping(value: object, owner: str, name: str = "damping") -> float:
    """``value`` as a float if it is a real number, finite and ``>= 0``; otherwise a
    ``TypeError`` (not a number) or ``ValueError`` worded ``"{owner}: {name} must ..."``.

    The one check of a damping value (``λ`` of a solve, of a preconditioner, of a noisy
    natural gradient); ``owner`` names the call (e.g. ``"KFAC.solve"``), ``name`` the
    argument.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a float, got {type(value).__name__}.")
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"{owner}: {name} must be finite and >= 0, got {value}.")
    return float(value)


def pi_correction(G: Tensor, A: Tensor) -> Tensor:
    """Trace-norm π of factored Tikhonov damping (concepts/kronecker.md#damped-inverse).

    ``π = sqrt( (tr(A) / dim A) / (tr(G) / dim G) )`` for the K-FAC block ``kron(G, A)``
    (``G`` output-gradient factor, ``A`` input factor, dims including a homogeneous bias
    coordinate). Either factor may be given as its diagonal ``[m]`` (only the traces enter:
    a structured ``G`` passes ``G.diagonal()`` and never forms ``[m, m]``). It minimizes the
    trace norm of the damping error term ``γ (π·(G⊗I) + π^{-1}·(I⊗A))`` (row-major form of
    §2.3.2).

    Zero traces: if ``tr(A) == 0`` or ``tr(G) == 0`` (e.g. a factor that is still all zeros)
    the formula degenerates to 0 or ∞; this function then returns **π = 1** (plain
    ``γ`` on both factors), documented fallback.

    Returns:
        0-d tensor with ``G``'s dtype and device.

    Raises:
        LinAlgError: a factor is non-finite.
        ValueError: a trace is negative (a factor is not PSD), or bad shapes.
    """
    _check_factor(G, "G")
    _check_factor(A, "A")
    check_same_dtype_device(G=G, A=A)
    check_finite(G, "G")
    check_finite(A, "A")
    mean_G = (G.sum() if G.ndim == 1 else torch.trace(G)) / G.shape[0]
    mean_A = (A.sum() if A.ndim == 1 else torch.trace(A)) / A.shape[0]
    if bool(mean_G < 0) or bool(mean_A < 0):
        raise ValueError(
            "pi_correction needs PSD factors, but a trace is negative: "
            f"tr(G)/dim G = {float(mean_G):.3e}, tr(A)/dim A = {float(mean_A):.3e}"
        )
    # sqrt(a)/sqrt(g) instead of sqrt(a/g) avoids premature overflow/underflow.
    pi = torch.sqrt(mean_A) / torch.sqrt(mean_G)
    ok = (mean_A > 0) & (mean_G > 0) & torch.isfinite(pi)
    return torch.where(ok, pi, torch.ones_like(pi))


def factored_damping(
    G: Tensor, A: Tensor, damping: float | Tensor, *, pi: float | Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Damped factors ``(G + (γ/π) I, A + π γ I)`` with ``γ = sqrt(damping)``.

    Convention: ``damping`` is the overall Tikhonov strength ``λ`` (``λ = γ²``), so that
    ``kron(G + (γ/π)I, A + πγI) = kron(G, A) + λ I + γ (π^{-1}·kron(I, A) + π·kron(G, I))
    ≈ kron(G, A) + λ I`` (concepts/kronecker.md#damped-inverse, written for the row-major ``kron(G,
    A)``;
    Martens & Grosse damp ``Ā + πγI`` and ``G + (γ/π)I`` — the same thing).

    Args:
        G: ``[n, n]`` PSD output-gradient factor.
        A: ``[m, m]`` PSD input factor, or a diagonal one as its diagonal ``[m]`` (damped
            as a vector, concepts/kronecker.md#diagonal-input-factors).
        damping: ``λ ≥ 0`` (float or scalar tensor).
        pi: override π (e.g. ``1.0`` for no correction, or the π of another layer as in the
            block-tridiagonal case, concepts/block_tridiagonal.md#the-math); default
            :func:`pi_correction` ``(G, A)``.

    Returns:
        ``(G_damped, A_damped)`` with the input dtype and device.
    """
    check_square(G, "G")
    _check_factor(A, "A")
    check_same_dtype_device(G=G, A=A)
    lam = check_scalar(damping, G)
    gamma = torch.sqrt(lam) if isinstance(lam, Tensor) else math.sqrt(lam)
    p: float | Tensor
    if pi is None:
        p = pi_correction(G, A)
    else:
        p = check_scalar(pi, G, name="pi")
        if (p == 0.0) if not isinstance(p, Tensor) else (p.device.type == "cpu" and p == 0):
            raise ValueError("pi must be positive, got 0")
    eye_G = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    if A.ndim == 1:
        return G + (gamma / p) * eye_G, A + p * gamma
    eye_A = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return G + (gamma / p) * eye_G, A + (p * gamma) * eye_A


def _check_factor(A: Tensor, name: str) -> None:
    """A square matrix, or a diagonal factor given as a vector ``[m]``."""
    if A.ndim != 1:
        check_square(A, name)
