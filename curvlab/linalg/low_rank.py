"""A symmetric matrix kept as a diagonal plus a low-rank part: ``M = diag(d) + U diag(s) Uᵀ``
(concepts/kronecker.md#vocabulary-sized-output-layers).

The output factor ``G`` of a vocabulary-sized layer is a sum of outer products of the
backpropagated columns, ``Σ g gᵀ``; each batch adds a matrix of rank at most its number of
columns. :func:`low_rank_update` adds such a batch and compresses the low-rank part back
to ``rank`` columns by a thin eigendecomposition (a QR of ``U`` and the eigenpairs of the
small ``R diag(s) Rᵀ``); :func:`low_rank_sum` adds several such matrices (the processes'
factors of a distributed sum) and compresses the same way. The discarded eigenpairs'
diagonal moves into ``d``, so the diagonal of ``M`` stays exact. Solves with ``M + μ I``
use the Woodbury identity in ``O(n·r²)``; an ``[n, n]`` matrix is never formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import LinAlgError, _fmt, working_dtype

__all__ = ["DiagonalPlusLowRank", "low_rank_sum", "low_rank_update"]


class DiagonalPlusLowRank(NamedTuple):
    """``M = diag(d) + U diag(s) Uᵀ``: ``d`` ``[n]``, ``U`` ``[n, r]``, ``s`` ``[r]``.

    After :func:`low_rank_update`, ``U`` has orthonormal columns (zero columns with
    ``s = 0`` pad it to exactly ``r``).
    """

    d: Tensor
    U: Tensor
    s: Tensor

    @property
    def size(self) -> int:
        """``n``."""
        return int(self.d.shape[0])

    def scaled(self, c: float) -> DiagonalPlusLowRank:
        """``c · M``."""
        return DiagonalPlusLowRank(self.d * c, self.U, self.s * c)

    def __truediv__(self, c: float) -> DiagonalPlusLowRank:
        """``M / c`` (a declared running sum divided by its normaliser)."""
        return self.scaled(1.0 / c)

    def to(self, dtype: torch.dtype) -> DiagonalPlusLowRank:
        """The three tensors in ``dtype``."""
        return DiagonalPlusLowRank(self.d.to(dtype), self.U.to(dtype), self.s.to(dtype))

    def diagonal(self) -> Tensor:
        """``diag(M)`` ``[n]``."""
        return self.d + (self.U.square() * self.s).sum(dim=1)

    def trace(self) -> Tensor:
        """``tr(M)``."""
        return self.diagonal().sum()

    def frobenius_norm(self) -> Tensor:
        """``‖M‖_F`` from ``‖D‖² + 2 Σ_i s_i Σ_v d_v U_vi² + ‖(UᵀU) ∘ (s sᵀ)‖`` terms, in
        ``O(n·r²)``."""
        gram = self.U.mT @ self.U  # [r, r]
        cross = (self.d[:, None] * self.U.square()).sum(dim=0) @ self.s
        low = (gram * self.s[:, None]) @ (gram * self.s[:, None])
        total = self.d.square().sum() + 2 * cross + torch.trace(low)
        return total.clamp(min=0).sqrt()

    def matmul(self, V: Tensor) -> Tensor:
        """``M @ V`` for ``V`` ``[n, m]``."""
        return self.d[:, None] * V + self.U @ (self.s[:, None] * (self.U.mT @ V))

    def to_dense(self) -> Tensor:
        """``M`` as an ``[n, n]`` matrix (small ``n`` only: tests and references)."""
        return torch.diag(self.d) + (self.U * self.s) @ self.U.mT

    def capacitances(self, shifts: Tensor) -> Tensor:
        """Per shift ``μ_j`` the inverse of ``I + diag(s) Uᵀ (D + μ_j)⁻¹ U`` ``[m, r, r]``:
        what :meth:`shifted_solve` needs, cached by a caller that solves repeatedly."""
        w = self._shifted_diagonal_inverse(shifts)  # [n, m]
        eye = torch.eye(self.U.shape[1], dtype=self.U.dtype, device=self.U.device)
        out = []
        for j in range(w.shape[1]):  # one [n, r] product per shift: O(n·r²) each
            gram = self.U.mT @ (w[:, j : j + 1] * self.U)
            out.append(torch.linalg.inv(eye + self.s[:, None] * gram))
        return torch.stack(out) if out else eye.new_zeros(0, *eye.shape)

    def shifted_solve(
        self, B: Tensor, shifts: Tensor, capacitances: Tensor | None = None
    ) -> Tensor:
        """Column ``j`` of the result is ``(M + μ_j I)⁻¹ B[:, j]`` (Woodbury), ``B`` ``[n, m]``,
        ``shifts`` ``[m]`` with ``d + μ_j > 0``.

        ``(D_μ + U S Uᵀ)⁻¹ = D_μ⁻¹ − D_μ⁻¹ U (I + S Uᵀ D_μ⁻¹ U)⁻¹ S Uᵀ D_μ⁻¹``, which needs no
        inverse of ``S`` (its padding zeros are harmless).
        """
        if B.ndim != 2 or B.shape[0] != self.size or shifts.shape != (B.shape[1],):
            raise ValueError(
                f"shifted_solve: B must be [{self.size}, m] and shifts [m], got "
                f"{_fmt(B.shape)} and {_fmt(shifts.shape)}"
            )
        w = self._shifted_diagonal_inverse(shifts)  # [n, m]
        caps = self.capacitances(shifts) if capacitances is None else capacitances
        y = w * B  # D_μ⁻¹ B
        inner = self.s[:, None] * (self.U.mT @ y)  # [r, m]: S Uᵀ D_μ⁻¹ B
        inner = torch.einsum("jrs,sj->rj", caps, inner)
        return y - w * (self.U @ inner)

    def _shifted_diagonal_inverse(self, shifts: Tensor) -> Tensor:
        denom = self.d[:, None] + shifts[None, :]
        if not bool((denom > 0).all()):
            raise LinAlgError(
                "DiagonalPlusLowRank: d + μ is not positive (smallest "
                f"{float(denom.min()):.3g}); use damping > 0."
            )
        return 1.0 / denom


def low_rank_update(
    M: DiagonalPlusLowRank | None, columns: Tensor, weight: float | Tensor, rank: int
) -> DiagonalPlusLowRank:
    """``M + C diag(w) Cᵀ`` (``M = None``: zero) for ``columns`` ``C`` ``[n, k]`` and
    ``weight`` ``w`` (a number for every column, or one per column ``[k]``), compressed to
    ``rank`` columns.

    The low-rank part ``[U, C] diag(s, w) [U, C]ᵀ`` is eigendecomposed thinly
    (``[U, C] = Q R``, ``R diag(s, w) Rᵀ = W diag(e) Wᵀ``); the ``rank`` eigenpairs of
    largest ``|e|`` are kept as ``U = Q W``, and the others' diagonal ``Σ e_i (QW)_{·i}²`` is
    added to ``d``, so ``diag(M)`` stays exact. What is discarded is the off-diagonal part of
    ``Σ_dropped e_i (QW)_{·i} (QW)_{·i}ᵀ``, of Frobenius norm at most ``‖e_dropped‖₂``
    (nothing when the columns of ``[U, C]`` with a non-zero weight number at most
    ``rank``). Work ``O(n·(rank + k)²)``; runs in float32 at least.
    """
    if columns.ndim != 2:
        raise ValueError(f"low_rank_update: columns must be [n, k], got {_fmt(columns.shape)}")
    if rank < 1:
        raise ValueError(f"low_rank_update: rank must be ≥ 1, got {rank}")
    n, k, dtype = columns.shape[0], columns.shape[1], columns.dtype
    wd = working_dtype(dtype)
    if isinstance(weight, Tensor):
        if weight.shape != (k,):
            raise ValueError(
                f"low_rank_update: weight must be a number or [{k}] (one per column), got "
                f"{_fmt(weight.shape)}"
            )
        weights = weight.to(device=columns.device, dtype=wd)
    else:
        weights = columns.new_full((k,), float(weight), dtype=wd)
    if M is None:
        d = columns.new_zeros(n, dtype=wd)
        U, s = columns.new_zeros(n, 0, dtype=wd), columns.new_zeros(0, dtype=wd)
    else:
        if M.size != n:
            raise ValueError(f"low_rank_update: columns have {n} rows, M is [{M.size}, {M.size}]")
        keep = M.s != 0  # padding columns carry nothing
        d, U, s = M.d.to(wd), M.U[:, keep].to(wd), M.s[keep].to(wd)
    U = torch.cat([U, columns.to(wd)], dim=1)
    s = torch.cat([s, weights])
    return _compress(d, U, s, rank, dtype)


def low_rank_sum(parts: Sequence[DiagonalPlusLowRank], rank: int) -> DiagonalPlusLowRank:
    """``Σ_p M_p`` of ``parts`` (all ``[n, n]``, in this order), compressed to ``rank``
    columns as :func:`low_rank_update` compresses: the diagonals add exactly, the low-rank
    parts ``Σ_p U_p diag(s_p) U_pᵀ`` (their padding columns, ``s = 0``, left out) are
    eigendecomposed thinly and the ``rank`` eigenpairs of largest magnitude kept, the
    diagonal of the others moved into ``d``.

    So ``diag`` of the result is ``Σ_p diag(M_p)``; the result is ``Σ_p M_p`` exactly when
    the parts' non-padding columns number at most ``rank``, otherwise it differs from it by
    the off-diagonal part of the discarded eigenpairs, whose Frobenius norm is at most the
    2-norm of the discarded eigenvalues. The same parts in the same order give the same
    bits (a distributed sum relies on that). Work ``O(n·(Σ_p r_p)²)``.
    """
    if not parts:
        raise ValueError("low_rank_sum: parts is empty")
    if rank < 1:
        raise ValueError(f"low_rank_sum: rank must be ≥ 1, got {rank}")
    n, dtype = parts[0].size, parts[0].d.dtype
    for i, part in enumerate(parts):
        if part.size != n or part.U.shape[0] != n or part.U.shape[1] != part.s.shape[0]:
            raise ValueError(
                f"low_rank_sum: part {i} has d {_fmt(part.d.shape)}, U {_fmt(part.U.shape)} "
                f"and s {_fmt(part.s.shape)}; expected d [{n}], U [{n}, r] and s [r]"
            )
    wd = working_dtype(dtype)
    d = parts[0].d.to(wd)
    for part in parts[1:]:
        d = d + part.d.to(wd)
    keep = [part.s != 0 for part in parts]
    U = torch.cat([part.U[:, k].to(wd) for part, k in zip(parts, keep)], dim=1)
    s = torch.cat([part.s[k].to(wd) for part, k in zip(parts, keep)])
    return _compress(d, U, s, rank, dtype)


def _compress(
    d: Tensor, U: Tensor, s: Tensor, rank: int, dtype: torch.dtype
) -> DiagonalPlusLowRank:
    """``diag(d) + U diag(s) Uᵀ`` (working dtype) with the low-rank part brought to exactly
    ``rank`` columns (see :func:`low_rank_update`), returned in ``dtype``."""
    n = d.shape[0]
    if U.shape[1] > 0:
        Q, R = torch.linalg.qr(U)  # [n, m], [m, m]
        small = R @ (s[:, None] * R.mT)
        e, W = torch.linalg.eigh((small + small.mT) / 2)
        order = torch.argsort(e.abs(), descending=True, stable=True)
        kept, dropped = order[:rank], order[rank:]
        B = Q @ W
        if dropped.numel():
            d = d + (B[:, dropped].square() * e[dropped]).sum(dim=1)
        U, s = B[:, kept], e[kept]
    pad = rank - U.shape[1]
    if pad > 0:
        U = torch.cat([U, U.new_zeros(n, pad)], dim=1)
        s = torch.cat([s, s.new_zeros(pad)])
    return DiagonalPlusLowRank(d.to(dtype), U.to(dtype), s.to(dtype))
