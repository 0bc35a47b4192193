"""Cholesky factorization with a float64 retry and clear errors
(concepts/kronecker.md#block-diagonal-inverse; concepts/kronecker.md#damped-inverse;
concepts/block_tridiagonal.md#the-math)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import (
    LinAlgError,
    _fmt,
    check_finite,
    check_scalar,
    check_square,
    working_dtype,
)

__all__ = ["cholesky_factor", "cholesky_solve", "damped_cholesky"]


def _try_cholesky(M: Tensor) -> tuple[Tensor | None, int]:
    """Return ``(L, 0)`` on success, ``(None, info)`` on failure (``info`` = failing minor)."""
    L, info = torch.linalg.cholesky_ex(M)
    code = int(info)
    if code != 0:
        return None, code
    if not bool(torch.isfinite(L).all()):
        return None, -1
    return L, 0


def cholesky_factor(M: Tensor, *, name: str = "matrix", keep_float64: bool = False) -> Tensor:
    """Lower Cholesky factor ``L`` of a symmetric positive definite ``M`` (``M = L Lᵀ``).

    Only the lower triangle of ``M`` is read. float16/bfloat16 inputs are factorized in
    float32. If the factorization fails (``cholesky_ex`` reports a non-positive pivot) or
    produces non-finite entries in a precision below float64, it is retried in float64.

    Args:
        M: ``[n, n]`` SPD matrix.
        name: how the matrix is called in error messages (e.g. ``"layer 3: A"``).
        keep_float64: if a float64 retry happened, return the float64 factor instead of
            casting it back. By default the factor always has ``M``'s dtype (the float64
            result cast back, which is accurate enough to be used in ``M``'s precision).

    Raises:
        LinAlgError: ``M`` is not finite, or not positive definite also in float64
            (the message names ``name`` and the failing leading minor).
        ValueError / TypeError: ``M`` is not a square floating-point matrix.
    """
    check_square(M, name)
    check_finite(M, name)
    wd = working_dtype(M.dtype)
    L, info = _try_cholesky(M.to(wd))
    if L is not None:
        return L.to(M.dtype)
    if wd != torch.float64:
        L, info = _try_cholesky(M.to(torch.float64))
        if L is not None:
            return L if keep_float64 else L.to(M.dtype)
    reason = (
        f"the leading minor of order {info} is not positive definite"
        if info > 0
        else "the factor has non-finite entries"
    )
    raise LinAlgError(
        f"Cholesky factorization of {name} (shape {_fmt(M.shape)}, dtype {M.dtype}) failed, "
        f"also in float64: {reason}. The matrix is not (numerically) positive definite; "
        "increase the damping or check the statistics that produced it."
    )


def damped_cholesky(
    M: Tensor, damping: float | Tensor, *, name: str = "matrix", keep_float64: bool = False
) -> Tensor:
    """Lower Cholesky factor of ``M + damping·I`` (see :func:`cholesky_factor`).

    ``damping`` must be a finite non-negative scalar (float or 1-element tensor).
    """
    check_square(M, name)
    lam = check_scalar(damping, M)
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    return cholesky_factor(M + lam * eye, name=name, keep_float64=keep_float64)


def cholesky_solve(L: Tensor, B: Tensor) -> Tensor:
    """Solve ``M X = B`` with ``M = L Lᵀ`` given the lower Cholesky factor ``L`` ``[n, n]``.

    ``B`` is ``[n]``, ``[n, k]`` or batched ``[..., n, k]``. The solve runs in the promoted
    dtype of ``L`` and ``B`` (so a float64 ``L`` kept by ``keep_float64=True`` is used at full
    precision) and the result has ``B``'s dtype and shape.
    """
    check_square(L, "L")
    if B.ndim < 1 or B.shape[-1 if B.ndim == 1 else -2] != L.shape[0]:
        raise ValueError(
            f"B has shape {_fmt(B.shape)} but L {_fmt(L.shape)} requires B of shape "
            f"[{L.shape[0]}] or [..., {L.shape[0]}, k]"
        )
    if L.device != B.device:
        raise ValueError(f"L is on {L.device} but B is on {B.device}")
    wd = working_dtype(torch.promote_types(L.dtype, B.dtype))
    if B.ndim == 1:
        X = torch.cholesky_solve(B.to(wd).unsqueeze(-1), L.to(wd)).squeeze(-1)
    else:
        X = torch.cholesky_solve(B.to(wd), L.to(wd))
    return X.to(B.dtype)
