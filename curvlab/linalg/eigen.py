"""Symmetric (generalized) eigendecompositions and Kronecker eigenbasis operations.

concepts/kronecker.md#damped-inverse (exactly damped inverse), §3.3 (generalized eigenproblems),
§5.5, §5.6.
Row-major convention of :mod:`curvlab.linalg.kron`: the operator is ``torch.kron(G, A)``
acting on ``V.flatten()``, ``V`` of shape ``[..., dim G, dim A]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import (
    LinAlgError,
    _fmt,
    check_finite,
    check_same_dtype_device,
    check_scalar,
    check_square,
    working_dtype,
)
from .cholesky import cholesky_factor

__all__ = [
    "GeneralizedEigen",
    "SymmetricEigen",
    "generalized_symeig",
    "kron_eigen_damped_solve",
    "kron_eigen_diagonal_damped_solve",
    "kron_eigen_matvec",
    "symeig",
]


class SymmetricEigen(NamedTuple):
    """Eigendecomposition ``M = Q diag(d) Qᵀ``; unpacks as ``(eigenvalues, eigenvectors)``.

    ``eigenvalues`` ``[n]`` ascending, ``eigenvectors`` ``[n, n]`` orthonormal columns.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor


class GeneralizedEigen(NamedTuple):
    """Solution of ``C u = s A u``; unpacks as ``(eigenvalues, eigenvectors)``.

    ``eigenvalues`` ``s`` ``[n]`` ascending, ``eigenvectors`` ``U`` ``[n, n]`` with
    ``Uᵀ A U = I`` and ``Uᵀ C U = diag(s)`` (concepts/block_tridiagonal.md#the-math).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor


def _try_eigh(M: Tensor) -> tuple[Tensor, Tensor] | None:
    try:
        d, Q = torch.linalg.eigh(M)
    except torch.linalg.LinAlgError:
        return None
    if not (bool(torch.isfinite(d).all()) and bool(torch.isfinite(Q).all())):
        return None
    return d, Q


def _symeig_work(M: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """eigh of the symmetrized ``M`` in its working dtype, retried in float64; no cast back."""
    wd = working_dtype(M.dtype)
    Mw = M.to(wd)
    Mw = (Mw + Mw.mT) / 2
    res = _try_eigh(Mw)
    if res is None and wd != torch.float64:
        res = _try_eigh(Mw.to(torch.float64))
    if res is None:
        raise LinAlgError(
            f"Symmetric eigendecomposition of {name} (shape {_fmt(M.shape)}, dtype {M.dtype}) "
            "failed to converge, also in float64."
        )
    return res


def symeig(M: Tensor, *, name: str = "matrix") -> SymmetricEigen:
    """Eigendecomposition of a symmetric (typically PSD) matrix ``M`` ``[n, n]``.

    ``M`` is symmetrized as ``(M + Mᵀ)/2`` and decomposed with ``torch.linalg.eigh``
    (float16/bfloat16 in float32). If ``eigh`` fails to converge or returns non-finite
    values in a precision below float64, it is retried in float64. Results are cast back to
    ``M``'s dtype. Eigenvalues are *not* clamped: tiny negative values from rounding are
    possible for PSD input.

    Raises:
        LinAlgError: non-finite ``M``, or no convergence also in float64 (names ``name``).
    """
    check_square(M, name)
    check_finite(M, name)
    d, Q = _symeig_work(M, name)
    return SymmetricEigen(d.to(M.dtype), Q.to(M.dtype))


def _check_eig(eig: tuple[Tensor, Tensor], name: str) -> tuple[Tensor, Tensor]:
    if len(eig) != 2:
        raise ValueError(f"{name} must be an (eigenvalues, eigenvectors) pair")
    d, Q = eig
    if d.ndim != 1 or Q.ndim != 2 or Q.shape != (d.shape[0], d.shape[0]):
        raise ValueError(
            f"{name} must hold eigenvalues [n] and eigenvectors [n, n], got shapes "
            f"{_fmt(d.shape)} and {_fmt(Q.shape)}"
        )
    return d, Q


def _eig_operands(
    eig_G: tuple[Tensor, Tensor], eig_A: tuple[Tensor, Tensor], V: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    d_G, Q_G = _check_eig(eig_G, "eig_G")
    d_A, Q_A = _check_eig(eig_A, "eig_A")
    n, m = d_G.shape[0], d_A.shape[0]
    if V.ndim < 2 or V.shape[-2] != n or V.shape[-1] != m:
        raise ValueError(
            f"V has shape {_fmt(V.shape)} but eig_G (dim {n}) and eig_A (dim {m}) require "
            f"V of shape [..., {n}, {m}]"
        )
    return d_G, Q_G, d_A, Q_A


def kron_eigen_matvec(
    eig_G: tuple[Tensor, Tensor],
    eig_A: tuple[Tensor, Tensor],
    V: Tensor,
    *,
    power: float = 1.0,
) -> Tensor:
    """Apply ``kron(G, A)^power`` to ``V`` ``[..., n, m]`` from eigendecompositions.

    With ``G = Q_G diag(d_G) Q_Gᵀ`` and ``A = Q_A diag(d_A) Q_Aᵀ`` (e.g. from :func:`symeig`),
    returns ``Q_G [(Q_Gᵀ V Q_A) ⊙ (d_G d_Aᵀ)^power] Q_Aᵀ``
    (concepts/kronecker.md#kronecker-identities, row-major).
    For non-integer ``power`` the eigenvalue products must be non-negative (and positive
    for negative powers); they are not clamped.
    """
    d_G, Q_G, d_A, Q_A = _eig_operands(eig_G, eig_A, V)
    scale = d_G[:, None] * d_A[None, :]
    if power != 1:
        scale = scale**power
    return Q_G @ ((Q_G.mT @ V @ Q_A) * scale) @ Q_A.mT


def kron_eigen_damped_solve(
    eig_G: tuple[Tensor, Tensor],
    eig_A: tuple[Tensor, Tensor],
    V: Tensor,
    damping: float | Tensor,
) -> Tensor:
    """Exactly damped inverse: ``(kron(G, A) + λ I)^{-1} V.flatten()`` in matrix form.

    Returns ``Q_G [(Q_Gᵀ V Q_A) ⊘ (d_G d_Aᵀ + λ)] Q_Aᵀ`` (concepts/kronecker.md#damped-inverse;
    concepts/kronecker.md#kronecker-identities; row-major, so
    the ``G`` eigenbasis acts on the rows of ``V`` ``[..., dim G, dim A]``). ``damping`` ``λ``
    is a finite non-negative scalar (a float, or a 1-element tensor, which is validated only on
    the CPU so that the per-step solve never synchronizes a GPU). The eigenvalues are used as
    given: for PSD factors with ``λ = 0`` the result is unbounded where ``d_G d_Aᵀ`` is
    (numerically) zero.
    """
    d_G, Q_G, d_A, Q_A = _eig_operands(eig_G, eig_A, V)
    lam = check_scalar(damping, d_G)
    denom = d_G[:, None] * d_A[None, :] + lam
    return Q_G @ ((Q_G.mT @ V @ Q_A) / denom) @ Q_A.mT


def kron_eigen_diagonal_damped_solve(
    eig_G: tuple[Tensor, Tensor], a: Tensor, V: Tensor, damping: float | Tensor
) -> Tensor:
    """:func:`kron_eigen_damped_solve` for a *diagonal* ``A = diag(a)``, given as ``a`` ``[m]``:
    ``Q_G [(Q_Gᵀ V) ⊘ (d_G aᵀ + λ)]`` in ``O(n²m)`` time and ``O(nm)`` memory, never forming
    an ``[m, m]`` matrix (concepts/kronecker.md#diagonal-input-factors). ``a``'s entries are
    its eigenvalues, its eigenvectors the identity."""
    d_G, Q_G = _check_eig(eig_G, "eig_G")
    if a.ndim != 1:
        raise ValueError(f"a must be a diagonal [m], got shape {_fmt(a.shape)}")
    n, m = d_G.shape[0], a.shape[0]
    if V.ndim < 2 or V.shape[-2] != n or V.shape[-1] != m:
        raise ValueError(
            f"V has shape {_fmt(V.shape)} but eig_G (dim {n}) and a (dim {m}) require "
            f"V of shape [..., {n}, {m}]"
        )
    lam = check_scalar(damping, d_G)
    denom = d_G[:, None] * a[None, :] + lam
    return Q_G @ ((Q_G.mT @ V) / denom)


def generalized_symeig(C: Tensor, A: Tensor, *, name: str = "A") -> GeneralizedEigen:
    """Symmetric-definite generalized eigenproblem ``C u = s A u``
    (concepts/block_tridiagonal.md#the-math).

    ``A`` ``[n, n]`` SPD, ``C`` ``[n, n]`` symmetric (symmetrized as ``(C + Cᵀ)/2``). With
    ``A = L Lᵀ`` (Cholesky), ``L^{-1} C L^{-ᵀ} = Q diag(s) Qᵀ`` and ``U = L^{-ᵀ} Q``, computed
    with triangular solves (no explicit inverse), so that ``Uᵀ A U = I`` and
    ``Uᵀ C U = diag(s)``. If the Cholesky factorization of ``A`` needs the float64 retry
    (see :func:`cholesky_factor`), the whole computation runs in float64; results are cast
    back to the input dtype.

    Raises:
        LinAlgError: non-finite input, ``A`` not positive definite (names ``name``), or
            non-convergence of the eigensolver.
    """
    check_square(A, name)
    check_square(C, "C")
    if C.shape != A.shape:
        raise ValueError(f"C has shape {_fmt(C.shape)} but {name} has shape {_fmt(A.shape)}")
    check_same_dtype_device(C=C, A=A)
    check_finite(C, f"C (generalized eigenproblem with {name})")
    L = cholesky_factor(A, name=name, keep_float64=True)
    wd = working_dtype(L.dtype)
    L = L.to(wd)
    Cw = C.to(wd)
    Cw = (Cw + Cw.mT) / 2
    X = torch.linalg.solve_triangular(L, Cw, upper=False)  # L^{-1} C
    M = torch.linalg.solve_triangular(L, X.mT, upper=False)  # L^{-1} C L^{-T}
    s, Q = _symeig_work(M, f"L^-1 C L^-T (generalized eigenproblem with {name})")
    U = torch.linalg.solve_triangular(L.mT.to(Q.dtype), Q, upper=True)  # L^{-T} Q
    return GeneralizedEigen(s.to(A.dtype), U.to(A.dtype))
