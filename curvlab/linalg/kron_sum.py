"""Solves with sums/differences of two Kronecker products (Martens & Grosse 2015 App. B).

concepts/block_tridiagonal.md#the-math / §5.9, rewritten for the row-major convention of
:mod:`curvlab.linalg.kron`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import LinAlgError, _fmt, check_same_dtype_device, check_square, working_dtype
from .eigen import generalized_symeig

__all__ = ["KronSumInverse", "kron_sum_solve"]


@dataclass(frozen=True)
class KronSumInverse:
    """Cached inverse of ``M = torch.kron(A, B) + sign · torch.kron(C, D)`` (row-major).

    Convention (same as ``kron(G, A)`` elsewhere): the first factors ``A``, ``C`` ``[n, n]``
    act on the rows of ``X`` ``[n, m]``, the second factors ``B``, ``D`` ``[m, m]`` on its
    columns: ``M @ X.flatten() == (A X Bᵀ + sign · C X Dᵀ).flatten()``.

    In the column-major notation of concepts/block_tridiagonal.md#the-math (``A_m⊗B_m ± C_m⊗D_m``
    with ``X`` of shape
    ``dim(B_m) × dim(A_m)``) this is ``A = B_m``, ``B = A_m``, ``C = D_m``, ``D = C_m``. For the
    block-tridiagonal Schur complement ``Σ_{i|i+1}`` (§3.2) call
    ``KronSumInverse.from_factors(G_ii, Ā_ii, D_G, C_Ā, sign=-1)``.

    Fields (from the generalized eigenproblems ``C u = s A u`` and ``D u = s B u``):

    * ``U_row`` ``[n, n]``, ``s_row`` ``[n]``: ``U_rowᵀ A U_row = I``,
      ``U_rowᵀ C U_row = diag(s_row)`` (MATH's ``U_2, s_2``);
    * ``U_col`` ``[m, m]``, ``s_col`` ``[m]``: ``U_colᵀ B U_col = I``,
      ``U_colᵀ D U_col = diag(s_col)`` (MATH's ``U_1, s_1``);
    * ``denominator`` ``[n, m]`` ``= 1 1ᵀ + sign · s_row s_colᵀ`` (after the rounding clamp);
    * ``sign``: ``+1`` or ``-1``.
    """

    U_row: Tensor
    s_row: Tensor
    U_col: Tensor
    s_col: Tensor
    denominator: Tensor
    sign: int

    @classmethod
    def from_factors(
        cls,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor,
        sign: int = 1,
        *,
        name: str = "kron sum",
        rounding_tol: float | None = None,
    ) -> KronSumInverse:
        """Precompute the inverse of ``kron(A, B) + sign · kron(C, D)``; ``O(n³ + m³)``.

        ``A`` ``[n, n]`` and ``B`` ``[m, m]`` must be SPD, ``C`` ``[n, n]`` and ``D`` ``[m, m]``
        symmetric. Since ``M = (U_row ⊗ U_col)^{-ᵀ} diag(denominator) (U_row ⊗ U_col)^{-1}``,
        ``M`` is positive definite iff every entry of ``denominator`` is positive; this is
        required. For ``sign=-1`` and PSD ``C``, ``D`` it holds iff all generalized eigenvalues
        satisfy ``s_row s_colᵀ < 1``, e.g. when ``C ≺ A`` and ``D ≺ B``
        (concepts/block_tridiagonal.md#the-math).

        Rounding: entries of ``denominator`` in ``[-tol, tol]`` with
        ``tol = rounding_tol`` (default ``100 · eps`` of the dtype, ≈1.2e-5 in float32,
        2.2e-14 in float64) are treated as positive up to rounding and clamped to ``tol``.

        Raises:
            LinAlgError: ``A`` or ``B`` not PD, non-finite input, or an entry of
                ``denominator`` below ``-tol`` (the operator is indefinite); names ``name``.
            ValueError: bad shapes or ``sign`` not in ``{+1, -1}``.
        """
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got {sign!r}")
        for arg, t in (("A", A), ("B", B), ("C", C), ("D", D)):
            check_square(t, f"{name}: {arg}")
        check_same_dtype_device(A=A, B=B, C=C, D=D)
        if C.shape != A.shape:
            raise ValueError(f"{name}: C has shape {_fmt(C.shape)} but A has {_fmt(A.shape)}")
        if D.shape != B.shape:
            raise ValueError(f"{name}: D has shape {_fmt(D.shape)} but B has {_fmt(B.shape)}")
        s_row, U_row = generalized_symeig(C, A, name=f"{name}: A")
        s_col, U_col = generalized_symeig(D, B, name=f"{name}: B")
        den = 1 + sign * (s_row[:, None] * s_col[None, :])
        tol = (
            100 * torch.finfo(working_dtype(A.dtype)).eps
            if rounding_tol is None
            else float(rounding_tol)
        )
        min_den = float(den.min()) if den.numel() > 0 else 1.0
        if min_den < -tol:
            raise LinAlgError(
                f"{name}: kron(A, B) {'+' if sign > 0 else '-'} kron(C, D) is not positive "
                f"definite: min of 1 {'+' if sign > 0 else '-'} s_row s_colᵀ is {min_den:.3e} "
                f"(generalized eigenvalue ranges: s_row in [{float(s_row.min()):.3e}, "
                f"{float(s_row.max()):.3e}], s_col in [{float(s_col.min()):.3e}, "
                f"{float(s_col.max()):.3e}]). For sign=-1 this means C ⋠ A or D ⋠ B; estimate "
                "cross moments from the same samples as the diagonal factors and damp them."
            )
        den = den.clamp_min(tol)
        return cls(U_row=U_row, s_row=s_row, U_col=U_col, s_col=s_col, denominator=den, sign=sign)

    def solve(self, Y: Tensor) -> Tensor:
        """Return ``X`` ``[..., n, m]`` with ``A X Bᵀ + sign · C X Dᵀ = Y`` (``Y`` ``[..., n, m]``).

        ``X = U_row [(U_rowᵀ Y U_col) ⊘ denominator] U_colᵀ``
        (concepts/block_tridiagonal.md#the-math, row-major).
        """
        n, m = self.denominator.shape
        if Y.ndim < 2 or Y.shape[-2] != n or Y.shape[-1] != m:
            raise ValueError(f"Y has shape {_fmt(Y.shape)}, expected [..., {n}, {m}]")
        return self.U_row @ ((self.U_row.mT @ Y @ self.U_col) / self.denominator) @ self.U_col.mT


def kron_sum_solve(
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    Y: Tensor,
    sign: int = 1,
    *,
    name: str = "kron sum",
) -> Tensor:
    """Solve ``(torch.kron(A, B) + sign · torch.kron(C, D)) X.flatten() = Y.flatten()``.

    Equivalently ``A X Bᵀ + sign · C X Dᵀ = Y`` with ``X``, ``Y`` ``[..., n, m]``, ``A``, ``C``
    ``[n, n]`` (rows), ``B``, ``D`` ``[m, m]`` (columns). One-shot form of
    :meth:`KronSumInverse.from_factors` ``(...).solve(Y)``; see there for requirements and the
    mapping to concepts/block_tridiagonal.md#the-math.
    """
    return KronSumInverse.from_factors(A, B, C, D, sign, name=name).solve(Y)
