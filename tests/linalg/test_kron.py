"""Tests for curvlab.linalg.kron: concepts/kronecker.md#kronecker-identities
(row-major convention)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlab.linalg import (
    LinAlgError,
    cholesky_factor,
    commutation_matrix,
    kron_cholesky_solve,
    kron_dense,
    kron_frobenius_norm,
    kron_logdet,
    kron_matvec,
    kron_trace,
)

from ._helpers import (
    abs_chain,
    assert_rel,
    cond,
    dims,
    dtypes,
    f64,
    gen,
    hsettings,
    kappas,
    product_rtol,
    randn,
    seeds,
    solve_rtol,
    spd,
)


def _abs_scale(G: torch.Tensor, V: torch.Tensor, A: torch.Tensor) -> float:
    """‖|G| |V| |A|ᵀ‖_F: the natural scale of rounding errors in ``G V Aᵀ``."""
    return abs_chain(G, V, A.T)


# §5.4 vec trick, row-major, with rectangular factors and a batch dimension.
@hsettings(120)
@given(seed=seeds, p=dims, n=dims, q=dims, m=dims, batch=st.integers(0, 3), dtype=dtypes)
def test_kron_matvec_row_major(
    seed: int, p: int, n: int, q: int, m: int, batch: int, dtype: torch.dtype
) -> None:
    g = gen(seed)
    G, A = randn(p, n, g=g, dtype=dtype), randn(q, m, g=g, dtype=dtype)
    V = randn(*((batch,) if batch else ()), n, m, g=g, dtype=dtype)
    out = kron_matvec(G, A, V)
    assert out.shape == (*V.shape[:-2], p, q) and out.dtype == dtype
    K = f64(kron_dense(G, A))
    for b in range(batch or 1):
        Vb, ob = (V[b], out[b]) if batch else (V, out)
        ref = (K @ f64(Vb).reshape(-1)).reshape(p, q)
        err = np.linalg.norm(f64(ob) - ref) / max(_abs_scale(G, Vb, A), 1e-300)
        assert err <= product_rtol(dtype)


# §5.4 vec trick, column-major: (A⊗G) vec(V) = vec(G V Aᵀ) with vec(V) = V.T.flatten().
@hsettings(75)
@given(seed=seeds, n=dims, m=dims, dtype=dtypes)
def test_vec_trick_column_major(seed: int, n: int, m: int, dtype: torch.dtype) -> None:
    g = gen(seed)
    G, A, V = randn(n, n, g=g, dtype=dtype), randn(m, m, g=g, dtype=dtype), randn(n, m, g=g)
    V = V.to(dtype)
    lhs = f64(kron_dense(A, G)) @ f64(V.T.reshape(-1))
    rhs = f64(kron_matvec(G, A, V).T.reshape(-1))
    assert np.linalg.norm(lhs - rhs) <= product_rtol(dtype) * _abs_scale(G, V, A)


# §5.4 commutation matrix: K vec(X) = vec(Xᵀ) and K (A⊗G) Kᵀ = G⊗A (exact permutations).
@hsettings(75)
@given(seed=seeds, n=dims, m=dims, dtype=dtypes)
def test_commutation_matrix(seed: int, n: int, m: int, dtype: torch.dtype) -> None:
    g = gen(seed)
    X = randn(n, m, g=g, dtype=dtype)
    K = commutation_matrix(n, m, dtype=dtype)
    assert K.dtype == dtype and K.shape == (n * m, n * m)
    torch.testing.assert_close(K @ K.T, torch.eye(n * m, dtype=dtype), rtol=0, atol=0)
    torch.testing.assert_close(K @ X.T.reshape(-1), X.reshape(-1), rtol=0, atol=0)
    G, A = randn(n, n, g=g, dtype=dtype), randn(m, m, g=g, dtype=dtype)
    torch.testing.assert_close(K @ kron_dense(A, G) @ K.T, kron_dense(G, A), rtol=0, atol=0)


# §5.1 transpose.
@hsettings(60)
@given(seed=seeds, p=dims, n=dims, q=dims, m=dims, dtype=dtypes)
def test_transpose(seed: int, p: int, n: int, q: int, m: int, dtype: torch.dtype) -> None:
    g = gen(seed)
    G, A = randn(p, n, g=g, dtype=dtype), randn(q, m, g=g, dtype=dtype)
    torch.testing.assert_close(kron_dense(G, A).T, kron_dense(G.T, A.T), rtol=0, atol=0)


# §5.2 mixed product, for the dense product and for composed kron_matvec.
@hsettings(90)
@given(seed=seeds, n=dims, m=dims, k=dims, r=dims, dtype=dtypes)
def test_mixed_product(seed: int, n: int, m: int, k: int, r: int, dtype: torch.dtype) -> None:
    g = gen(seed)
    G, C = randn(n, k, g=g, dtype=dtype), randn(k, n, g=g, dtype=dtype)
    A, D = randn(m, r, g=g, dtype=dtype), randn(r, m, g=g, dtype=dtype)
    lhs = kron_dense(G, A) @ kron_dense(C, D)
    rhs = kron_dense(G @ C, A @ D)
    scale = abs_chain(G, C) * abs_chain(A, D)  # = ‖kron(|G||C|, |A||D|)‖_F
    assert np.linalg.norm(f64(lhs) - f64(rhs)) <= product_rtol(dtype) * scale
    V = randn(n, m, g=g, dtype=dtype)
    twice = kron_matvec(G, A, kron_matvec(C, D, V))
    once = kron_matvec(G @ C, A @ D, V)
    scale = abs_chain(G, C, V, D.T, A.T)
    assert np.linalg.norm(f64(twice) - f64(once)) <= 4 * product_rtol(dtype) * scale


# §5.3 inverse: (G⊗A)^{-1} = G^{-1}⊗A^{-1}; kron_cholesky_solve against a dense scipy solve.
@hsettings(120)
@given(seed=seeds, n=dims, m=dims, kG=kappas, kA=kappas, dtype=dtypes)
def test_inverse_and_kron_cholesky_solve(
    seed: int, n: int, m: int, kG: float, kA: float, dtype: torch.dtype
) -> None:
    g = gen(seed)
    G, A, V = spd(n, kG, g, dtype), spd(m, kA, g, dtype), randn(n, m, g=g, dtype=dtype)
    K = np.kron(f64(G), f64(A))
    kappa = cond(K)
    rtol = solve_rtol(dtype, kappa)
    X = kron_cholesky_solve(cholesky_factor(G, name="G"), cholesky_factor(A, name="A"), V)
    assert X.dtype == dtype and X.shape == V.shape
    ref = scipy.linalg.solve(K, f64(V).reshape(-1), assume_a="pos").reshape(n, m)
    # backward error (κ-independent) always; forward error where the tolerance rule of
    # concepts/kronecker.md is informative
    resid = K @ f64(X).reshape(-1) - f64(V).reshape(-1)
    eps = torch.finfo(dtype).eps
    assert np.linalg.norm(resid) <= 10 * (n + m) * eps * np.linalg.norm(K, 2) * np.linalg.norm(
        f64(X)
    )
    if rtol < 0.1:
        assert_rel(X, ref, rtol, "kron_cholesky_solve")
    # the pure identity, inverses taken in the factors' dtype
    inv_kron = torch.kron(torch.linalg.inv(G), torch.linalg.inv(A))
    if rtol < 0.1:
        assert_rel(inv_kron, np.linalg.inv(K), rtol, "inv(G)⊗inv(A)")


# §5.7 trace and Frobenius norm.
@hsettings(75)
@given(seed=seeds, n=dims, m=dims, kG=kappas, kA=kappas, dtype=dtypes)
def test_trace_and_frobenius(
    seed: int, n: int, m: int, kG: float, kA: float, dtype: torch.dtype
) -> None:
    g = gen(seed)
    G, A = spd(n, kG, g, dtype), spd(m, kA, g, dtype)
    K = np.kron(f64(G), f64(A))
    tr = kron_trace(G, A)
    assert tr.dtype == dtype and tr.ndim == 0
    assert_rel(tr, np.trace(K), product_rtol(dtype), "trace")
    R, S = randn(n, m, g=g, dtype=dtype), randn(m, n, g=g, dtype=dtype)  # rectangular
    fro = kron_frobenius_norm(R, S)
    assert fro.dtype == dtype
    assert_rel(fro, np.linalg.norm(np.kron(f64(R), f64(S))), product_rtol(dtype), "Frobenius")


# §5.8 determinant / log-determinant.
@hsettings(90)
@given(seed=seeds, n=dims, m=dims, kG=kappas, kA=kappas, dtype=dtypes)
def test_logdet(seed: int, n: int, m: int, kG: float, kA: float, dtype: torch.dtype) -> None:
    g = gen(seed)
    # random positive scale so that the log-determinant is not ~0 for κ = 1
    G = spd(n, kG, g, dtype) * float(torch.rand(1, generator=g) * 4 + 0.1)
    A = spd(m, kA, g, dtype) * float(torch.rand(1, generator=g) * 4 + 0.1)
    out = kron_logdet(G, A)
    assert out.dtype == dtype and out.ndim == 0
    (sG, ldG), (sA, ldA) = np.linalg.slogdet(f64(G)), np.linalg.slogdet(f64(A))
    assert sG == sA == 1
    ref = m * ldG + n * ldA  # the identity, with float64 LU log-determinants of the factors
    # first-order perturbation of logdet under backward-stable factorizations:
    # |δ logdet G| ≲ c·n·eps·κ(G) (Cholesky in `dtype`; the float64 reference is more accurate)
    eps = torch.finfo(dtype).eps
    # (plus summation error of the n + m logs, ∝ (n + m)·|logdet|)
    tol = 10 * eps * ((n + m) * abs(ref) + n * m * (cond(G) + cond(A)))
    assert abs(float(out) - ref) <= tol
    # the identity against the dense Kronecker product, whose LU is accurate to ~ eps·κ(G⊗A)
    _, ld_dense = np.linalg.slogdet(np.kron(f64(G), f64(A)))
    assert abs(ld_dense - ref) <= 10 * 2.2e-16 * n * m * (abs(ref) + cond(G) * cond(A))
    # det(G⊗A) = det(G)^m det(A)^n for small, well-scaled dims (no over/underflow)
    if n * m <= 16 and dtype == torch.float64:
        det = np.linalg.det(np.kron(f64(G), f64(A)))
        assert np.isclose(det, np.linalg.det(f64(G)) ** m * np.linalg.det(f64(A)) ** n, rtol=1e-10)


def _psd_block_matrix(sizes: list[int], g: torch.Generator) -> torch.Tensor:
    total = sum(sizes)
    rank = int(torch.randint(1, total + 1, (1,), generator=g))
    B = torch.randn(total, rank, generator=g, dtype=torch.float64)
    return B @ B.T  # PSD, possibly singular


# §5.10 the block Khatri–Rao product [G_ij ⊗ A_ij] of PSD block matrices is PSD.
@hsettings(75)
@given(
    seed=seeds,
    g_sizes=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    a_extra=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    dtype=dtypes,
)
def test_block_khatri_rao_psd(
    seed: int, g_sizes: list[int], a_extra: list[int], dtype: torch.dtype
) -> None:
    g = gen(seed)
    a_sizes = a_extra[: len(g_sizes)]
    Gb, Ab = _psd_block_matrix(g_sizes, g).to(dtype), _psd_block_matrix(a_sizes, g).to(dtype)
    go = np.cumsum([0, *g_sizes])
    ao = np.cumsum([0, *a_sizes])
    blocks = [
        [
            kron_dense(
                Gb[go[i] : go[i + 1], go[j] : go[j + 1]], Ab[ao[i] : ao[i + 1], ao[j] : ao[j + 1]]
            )
            for j in range(len(g_sizes))
        ]
        for i in range(len(g_sizes))
    ]
    KR = f64(torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0))
    # It is the principal submatrix of kron(Gb, Ab) on the "diagonal-block" index pairs ...
    idx = np.concatenate(
        [
            (np.arange(go[i], go[i + 1])[:, None] * ao[-1] + np.arange(ao[i], ao[i + 1])).ravel()
            for i in range(len(g_sizes))
        ]
    )
    full = f64(kron_dense(Gb, Ab))
    np.testing.assert_array_equal(KR, full[np.ix_(idx, idx)])
    # ... hence PSD.
    eig = np.linalg.eigvalsh(KR)
    assert eig.min() >= -10 * KR.shape[0] * torch.finfo(dtype).eps * max(eig.max(), 1e-300)


def test_kron_matvec_shape_errors() -> None:
    G, A = torch.zeros(3, 4), torch.zeros(5, 6)
    with pytest.raises(
        ValueError, match=r"V has shape \[4, 5\].*require V of shape \[\.\.\., 4, 6\]"
    ):
        kron_matvec(G, A, torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"G must be a 2-D matrix, got shape \[3\]"):
        kron_matvec(torch.zeros(3), A, torch.zeros(3, 6))
    with pytest.raises(ValueError, match=r"A must be a 2-D matrix"):
        kron_matvec(G, torch.zeros(2, 5, 6), torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"V must have shape"):
        kron_matvec(G, A, torch.zeros(4))
    with pytest.raises(ValueError, match="2-D"):
        kron_dense(torch.zeros(3), A)
    with pytest.raises(ValueError, match="square"):
        kron_trace(G, torch.eye(2))
    with pytest.raises(ValueError, match=r"V has shape"):
        kron_cholesky_solve(torch.eye(3), torch.eye(2), torch.zeros(2, 3))


def test_kron_logdet_not_pd_names_factor() -> None:
    A = torch.diag(torch.tensor([1.0, -1.0]))
    with pytest.raises(LinAlgError, match=r"layer 2: A.*not positive definite"):
        kron_logdet(torch.eye(3), A, name="layer 2")
    with pytest.raises(LinAlgError, match=r"G.*non-finite"):
        kron_logdet(torch.tensor([[float("nan")]]), torch.eye(2))
