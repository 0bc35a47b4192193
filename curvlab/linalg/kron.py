"""Kronecker products in PyTorch's row-major layout
(concepts/kronecker.md#notation-and-the-vec-convention; concepts/kronecker.md#kronecker-identities).

Convention used throughout :mod:`curvlab.linalg`: parameters are flattened row-major
(``W.flatten()``), a layer's weight matrix ``V`` has shape ``[d_out, d_in]`` and its K-FAC block
is ``torch.kron(G, A)`` with ``G`` ``[d_out, d_out]`` (output-gradient factor) and ``A``
``[d_in, d_in]`` (input factor), so that

    ``torch.kron(G, A) @ V.flatten() == (G @ V @ A.T).flatten()``
    (concepts/kronecker.md#notation-and-the-vec-convention;
    concepts/kronecker.md#kronecker-identities).

In the column-major notation of Martens & Grosse the same block is written ``A ⊗ G``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import _fmt, check_same_dtype_device, check_square, working_dtype
from .cholesky import cholesky_factor

__all__ = [
    "commutation_matrix",
    "kron_cholesky_solve",
    "kron_dense",
    "kron_frobenius_norm",
    "kron_logdet",
    "kron_matvec",
    "kron_trace",
]


def kron_matvec(G: Tensor, A: Tensor, V: Tensor) -> Tensor:
    """Apply ``torch.kron(G, A)`` to ``V`` in matrix form: return ``G @ V @ A.T``.

    Args:
        G: ``[p, n]`` row factor (the output-gradient factor; square in K-FAC, rectangular
            allowed, e.g. for the block-tridiagonal ``Ψ`` factors of
            concepts/block_tridiagonal.md#the-math).
        A: ``[q, m]`` column factor (the input factor), or a diagonal factor given as its
            diagonal ``[m]`` (then ``V @ diag(A)``, never forming the matrix).
        V: ``[n, m]`` or batched ``[..., n, m]``.

    Returns:
        ``[..., p, q]`` tensor equal to ``(torch.kron(G, A) @ V.flatten()).reshape(p, q)``
        for each matrix in the batch (concepts/kronecker.md#kronecker-identities, row-major).

    Raises:
        ValueError: if the shapes are incompatible (the message names the argument).
    """
    if G.ndim != 2:
        raise ValueError(f"G must be a 2-D matrix, got shape {_fmt(G.shape)}")
    if A.ndim not in (1, 2):
        raise ValueError(f"A must be a 2-D matrix (or a diagonal [m]), got shape {_fmt(A.shape)}")
    if V.ndim < 2:
        raise ValueError(f"V must have shape [..., n, m], got shape {_fmt(V.shape)}")
    if V.shape[-2] != G.shape[1] or V.shape[-1] != A.shape[-1]:
        raise ValueError(
            f"V has shape {_fmt(V.shape)} but G {_fmt(G.shape)} and A {_fmt(A.shape)} "
            f"require V of shape [..., {G.shape[1]}, {A.shape[-1]}]"
        )
    if A.ndim == 1:
        return (G @ V) * A
    return G @ V @ A.mT


def kron_dense(G: Tensor, A: Tensor) -> Tensor:
    """Dense Kronecker product ``torch.kron(G, A)``.

    With the row-major convention this is the dense K-FAC block ``[p*q, n*m]`` acting on
    ``V.flatten()`` for ``V`` of shape ``[n, m]``
    (concepts/kronecker.md#notation-and-the-vec-convention). Intended for ``to_dense``
    code and tests; it costs ``O((nm)^2)`` memory.

    Equal to ``torch.kron(G, A)`` but computed by broadcasting, because in torch ≤ 2.13
    ``torch.kron`` raises "view size is not compatible with input tensor's size and stride"
    for some non-contiguous inputs (e.g. one transposed argument, even a transposed
    ``[1, n]`` vector that ``.contiguous()`` leaves alone; pytorch/pytorch#54135, #185650).
    """
    if G.ndim != 2 or A.ndim != 2:
        raise ValueError(
            f"G and A must be 2-D matrices, got shapes {_fmt(G.shape)} and {_fmt(A.shape)}"
        )
    p, n = G.shape
    q, m = A.shape
    return (G[:, None, :, None] * A[None, :, None, :]).reshape(p * q, n * m)


def commutation_matrix(
    m: int, n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """Commutation matrix ``K_{m,n}`` (``[m*n, m*n]``) with ``K vec(X) = vec(X.T)``
    (concepts/kronecker.md#notation-and-the-vec-convention).

    ``vec`` is column-major: for ``X`` of shape ``[m, n]``, ``vec(X) = X.T.flatten()``, so
    equivalently ``K @ X.T.flatten() == X.flatten()``: ``K`` converts column-major to row-major
    vectorization. For ``A`` ``[a, a]``, ``G`` ``[g, g]`` and ``K = K_{g,a}``:
    ``K @ kron(A, G) @ K.T == kron(G, A)``.
    """
    if m < 0 or n < 0:
        raise ValueError(f"m and n must be non-negative, got m={m}, n={n}")
    K = torch.zeros(m * n, m * n, dtype=dtype, device=device)
    i = torch.arange(m, device=K.device).repeat_interleave(n)
    j = torch.arange(n, device=K.device).repeat(m)
    K[i * n + j, j * m + i] = 1
    return K


def kron_cholesky_solve(L_G: Tensor, L_A: Tensor, V: Tensor) -> Tensor:
    """Solve ``torch.kron(G, A) x = V.flatten()`` from Cholesky factors: ``G^{-1} V A^{-1}``.

    This is the block-diagonal K-FAC update of concepts/kronecker.md#block-diagonal-inverse (with
    the damped factors of
    §2.3.2 it is the factored-Tikhonov update). ``L_G`` ``[n, n]`` and ``L_A`` ``[m, m]`` are
    lower Cholesky factors (``G = L_G L_Gᵀ``, see :func:`cholesky_factor`); ``V`` is
    ``[..., n, m]``. The result has ``V``'s shape and dtype.
    """
    check_square(L_G, "L_G")
    check_square(L_A, "L_A")
    if V.ndim < 2 or V.shape[-2] != L_G.shape[0] or V.shape[-1] != L_A.shape[0]:
        raise ValueError(
            f"V has shape {_fmt(V.shape)} but L_G {_fmt(L_G.shape)} and L_A {_fmt(L_A.shape)} "
            f"require V of shape [..., {L_G.shape[0]}, {L_A.shape[0]}]"
        )
    dtype = V.dtype
    wd = working_dtype(torch.promote_types(torch.promote_types(L_G.dtype, L_A.dtype), dtype))
    X = torch.cholesky_solve(V.to(wd), L_G.to(wd))  # G^{-1} V
    X = torch.cholesky_solve(X.mT, L_A.to(wd)).mT  # (A^{-1} (G^{-1} V)ᵀ)ᵀ = G^{-1} V A^{-1}
    return X.to(dtype)


def kron_trace(G: Tensor, A: Tensor) -> Tensor:
    """``tr(kron(G, A)) = tr(G) · tr(A)`` for square ``G``, ``A``
    (concepts/kronecker.md#kronecker-identities); 0-d tensor."""
    check_square(G, "G")
    check_square(A, "A")
    return torch.trace(G) * torch.trace(A)


def kron_frobenius_norm(G: Tensor, A: Tensor) -> Tensor:
    """``‖kron(G, A)‖_F = ‖G‖_F · ‖A‖_F`` (concepts/kronecker.md#kronecker-identities); 0-d tensor.
    Any 2-D shapes."""
    if G.ndim != 2 or A.ndim != 2:
        raise ValueError(
            f"G and A must be 2-D matrices, got shapes {_fmt(G.shape)} and {_fmt(A.shape)}"
        )
    return torch.linalg.matrix_norm(G) * torch.linalg.matrix_norm(A)


def kron_logdet(G: Tensor, A: Tensor, *, name: str = "kron(G, A)") -> Tensor:
    """``logdet(kron(G, A)) = dim(A)·logdet(G) + dim(G)·logdet(A)``
    (concepts/kronecker.md#kronecker-identities).

    ``G`` and ``A`` must be symmetric positive definite; each log-determinant is computed as
    ``2 Σ log diag(L)`` from a Cholesky factor (with the float64 retry of
    :func:`cholesky_factor`, the sum accumulated in float64 when a retry happened).

    Returns:
        0-d tensor in the dtype of ``G``.

    Raises:
        LinAlgError: if a factor is not positive definite or not finite; the message
            names ``f"{name}: G"`` or ``f"{name}: A"``.
    """
    check_square(G, "G")
    check_square(A, "A")
    check_same_dtype_device(G=G, A=A)
    L_G = cholesky_factor(G, name=f"{name}: G", keep_float64=True)
    L_A = cholesky_factor(A, name=f"{name}: A", keep_float64=True)
    logdet_G = 2 * torch.log(torch.diagonal(L_G)).sum()
    logdet_A = 2 * torch.log(torch.diagonal(L_A)).sum()
    out = A.shape[0] * logdet_G + G.shape[0] * logdet_A
    return out.to(G.dtype)
