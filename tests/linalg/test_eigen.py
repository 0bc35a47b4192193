"""Tests for curvlab.linalg.eigen: concepts/kronecker.md#kronecker-identities (powers), §5.5, §5.6,
§3.3 (generalized)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlab.linalg import (
    LinAlgError,
    generalized_symeig,
    kron_dense,
    kron_eigen_damped_solve,
    kron_eigen_matvec,
    kron_matvec,
    symeig,
)

from ._helpers import (
    abs_chain,
    assert_rel,
    cond,
    contraction,
    dims,
    dtypes,
    f64,
    gen,
    hsettings,
    kappas,
    product_rtol,
    randn,
    resid_ok,
    seeds,
    solve_rtol,
    spd,
    sqrtm_spd,
)


@hsettings(90)
@given(seed=seeds, n=dims, kappa=kappas, dtype=dtypes)
def test_symeig(seed: int, n: int, kappa: float, dtype: torch.dtype) -> None:
    g = gen(seed)
    M = spd(n, kappa, g, dtype)
    d, Q = symeig(M, name="M")
    assert d.dtype == dtype and Q.dtype == dtype and d.shape == (n,) and Q.shape == (n, n)
    eps = torch.finfo(dtype).eps
    assert_rel((Q * d) @ Q.T, M, product_rtol(dtype), "reconstruction")
    assert_rel(Q.T @ Q, torch.eye(n, dtype=dtype), product_rtol(dtype), "orthogonality")
    ref = scipy.linalg.eigvalsh(f64(M))
    assert np.abs(f64(d) - ref).max() <= 10 * n * eps * np.abs(ref).max()  # Weyl bound


# §5.5: kron(G, A) = (Q_G⊗Q_A) diag(d_G⊗d_A) (Q_G⊗Q_A)ᵀ, spectrum = all products.
@hsettings(90)
@given(seed=seeds, n=dims, m=dims, kG=kappas, kA=kappas, dtype=dtypes)
def test_kron_eigendecomposition(
    seed: int, n: int, m: int, kG: float, kA: float, dtype: torch.dtype
) -> None:
    g = gen(seed)
    G, A = spd(n, kG, g, dtype), spd(m, kA, g, dtype)
    (dG, QG), (dA, QA) = symeig(G), symeig(A)
    Q = kron_dense(QG, QA)
    d = kron_dense(dG[:, None], dA[:, None]).reshape(-1)
    K = kron_dense(G, A)
    assert_rel((Q * d) @ Q.T, K, product_rtol(dtype), "kron eigen-reconstruction")
    ref = scipy.linalg.eigvalsh(f64(K))
    eps = torch.finfo(dtype).eps
    assert np.abs(np.sort(f64(d)) - ref).max() <= 10 * (n + m) * eps * ref.max()
    V = randn(n, m, g=g, dtype=dtype)
    err = np.linalg.norm(f64(kron_eigen_matvec((dG, QG), (dA, QA), V)) - f64(kron_matvec(G, A, V)))
    assert err <= 10 * product_rtol(dtype) * abs_chain(G, V, A)


# §5.3 powers of SPD Kronecker products: (G⊗A)^p = G^p ⊗ A^p.
@hsettings(90)
@given(
    seed=seeds,
    n=dims,
    m=dims,
    kG=kappas,
    kA=kappas,
    p=st.sampled_from([-1.0, -0.5, 0.5, 2.0]),
    dtype=dtypes,
)
def test_kron_eigen_power(
    seed: int, n: int, m: int, kG: float, kA: float, p: float, dtype: torch.dtype
) -> None:
    g = gen(seed)
    G, A = spd(n, kG, g, dtype), spd(m, kA, g, dtype)
    V = randn(n, m, g=g, dtype=dtype)
    K = np.kron(f64(G), f64(A))
    # driver="evd": scipy's default "evr" (MRRR) loses orthogonality (~1e3·eps) on the tight
    # eigenvalue clusters that κ = 1 produces; "evd" (divide and conquer) does not.
    w, U = scipy.linalg.eigh(K, driver="evd")
    ref_op = (U * w**p) @ U.T
    ref = (ref_op @ f64(V).reshape(-1)).reshape(n, m)
    eG, eA = symeig(G), symeig(A)
    out = kron_eigen_matvec(eG, eA, V, power=p)
    assert out.dtype == dtype
    Gp = (eG.eigenvectors * eG.eigenvalues**p) @ eG.eigenvectors.T
    Ap = (eA.eigenvectors * eA.eigenvalues**p) @ eA.eigenvectors.T
    if p > 0:
        # normwise ‖error‖ ≲ c·eps·‖K‖₂^p ‖V‖·κ^{max(1-p, 0)}, as d(λ^p) = p λ^{p-1} dλ with
        # eigenvalue errors dλ ~ eps·λ_max
        eps = torch.finfo(dtype).eps
        bound = 10 * (n + m) * eps * np.linalg.norm(ref_op, 2) * cond(K) ** max(1 - p, 0.0)
        assert np.linalg.norm(f64(out) - ref) <= bound * np.linalg.norm(f64(V))
        assert np.linalg.norm(f64(kron_dense(Gp, Ap)) - ref_op) <= bound * np.sqrt(n * m)
    else:
        # an inverse power: relative eigenvalue errors |p|·dλ/λ ≤ |p|·eps·κ(K), as for a solve
        rtol = solve_rtol(dtype, cond(K))
        if rtol < 0.1:
            assert_rel(out, ref, rtol, f"(G⊗A)^{p} V")
            assert_rel(kron_dense(Gp, Ap), ref_op, rtol, "G^p ⊗ A^p")


# §5.6 exactly damped inverse via the eigenbases (§2.3.1); λ = 0 is §5.3's inverse.
@hsettings(120)
@given(
    seed=seeds,
    n=dims,
    m=dims,
    kG=kappas,
    kA=kappas,
    lam=st.sampled_from([0.0, 1e-4, 1e-2, 1.0]),
    batch=st.integers(0, 2),
    dtype=dtypes,
)
def test_kron_eigen_damped_solve(
    seed: int, n: int, m: int, kG: float, kA: float, lam: float, batch: int, dtype: torch.dtype
) -> None:
    g = gen(seed)
    G, A = spd(n, kG, g, dtype), spd(m, kA, g, dtype)
    V = randn(*((batch,) if batch else ()), n, m, g=g, dtype=dtype)
    X = kron_eigen_damped_solve(symeig(G), symeig(A), V, lam)
    assert X.dtype == dtype and X.shape == V.shape
    M = np.kron(f64(G), f64(A)) + lam * np.eye(n * m)
    rtol = solve_rtol(dtype, cond(M))
    for b in range(batch or 1):
        Xb, Vb = (X[b], V[b]) if batch else (X, V)
        ref = scipy.linalg.solve(M, f64(Vb).reshape(-1), assume_a="pos").reshape(n, m)
        assert resid_ok(M, f64(Xb), f64(Vb), dtype, c=10 * (n + m))
        if rtol < 0.1:
            assert_rel(Xb, ref, rtol, "damped solve")


# Generalized symmetric-definite eigenproblem C u = s A u (concepts/block_tridiagonal.md#the-math)
# vs scipy.
@hsettings(120)
@given(seed=seeds, n=dims, kA=kappas, psd=st.booleans(), dtype=dtypes)
def test_generalized_symeig(seed: int, n: int, kA: float, psd: bool, dtype: torch.dtype) -> None:
    g = gen(seed)
    A64 = spd(n, kA, g)
    R = contraction(n, g)  # known generalized eigenvalues eig(R) ⊂ [-0.9, 0.9]
    if psd:
        R = R @ R
    S = sqrtm_spd(A64)
    A, C = A64.to(dtype), (S @ R @ S).to(dtype)
    s, U = generalized_symeig(C, A, name="A_i")
    assert s.dtype == dtype and U.dtype == dtype and s.shape == (n,) and U.shape == (n, n)
    ref = scipy.linalg.eigh(f64(C), f64(A), eigvals_only=True)
    eps = torch.finfo(dtype).eps
    kappa = cond(A)
    # eigenvalues of L^{-1} C L^{-T}: the error of forming it is ~ eps·κ(A)·‖R‖
    assert np.abs(f64(s) - ref).max() <= 10 * n * eps * kappa
    assert np.abs(np.sort(scipy.linalg.eigvalsh(f64(R))) - ref).max() <= 10 * n * eps * kappa
    Ud = f64(U)
    atol = 10 * n * eps * kappa
    assert np.abs(Ud.T @ f64(A) @ Ud - np.eye(n)).max() <= atol
    assert np.abs(Ud.T @ f64(C) @ Ud - np.diag(f64(s))).max() <= atol


# ---------------------------------------------------------------------------------------------
# retry paths and errors


def test_symeig_retries_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    real_eigh = torch.linalg.eigh
    calls: list[torch.dtype] = []

    def flaky_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(M.dtype)
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated: failed to converge")
        return real_eigh(M)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    M = spd(5, 1e2, gen(0), torch.float32)
    d, Q = symeig(M)
    assert calls == [torch.float32, torch.float64]
    assert d.dtype == torch.float32 and Q.dtype == torch.float32
    assert_rel((Q * d) @ Q.T, M, 1e-5, "reconstruction after retry")


def test_symeig_retries_on_non_finite_output(monkeypatch: pytest.MonkeyPatch) -> None:
    real_eigh = torch.linalg.eigh

    def nan_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, Q = real_eigh(M)
        if M.dtype == torch.float32:
            d = d * float("nan")
        return d, Q

    monkeypatch.setattr(torch.linalg, "eigh", nan_eigh)
    d, _ = symeig(torch.eye(3))
    assert torch.isfinite(d).all() and d.dtype == torch.float32


def test_symeig_fails_in_float64_names_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise torch.linalg.LinAlgError("simulated")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(LinAlgError, match=r"layer 4: G.*also in float64"):
        symeig(torch.eye(3), name="layer 4: G")


def test_symeig_input_errors() -> None:
    with pytest.raises(LinAlgError, match=r"layer 1: A contains non-finite"):
        symeig(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), name="layer 1: A")
    with pytest.raises(ValueError, match=r"M must be a square 2-D matrix, got shape \[2, 3\]"):
        symeig(torch.zeros(2, 3), name="M")
    with pytest.raises(TypeError, match="floating-point"):
        symeig(torch.eye(2, dtype=torch.int64))


def test_generalized_symeig_errors() -> None:
    C = torch.eye(3)
    with pytest.raises(LinAlgError, match=r"Gbar.*not positive definite"):
        generalized_symeig(C, torch.diag(torch.tensor([1.0, 0.0, 1.0])), name="Gbar")
    with pytest.raises(LinAlgError, match=r"C \(generalized eigenproblem with A\) contains"):
        generalized_symeig(C * float("nan"), torch.eye(3))
    with pytest.raises(ValueError, match=r"C has shape \[2, 2\] but A has shape \[3, 3\]"):
        generalized_symeig(torch.eye(2), torch.eye(3))


def test_eigen_solve_shape_errors() -> None:
    eG, eA = symeig(torch.eye(3)), symeig(torch.eye(2))
    with pytest.raises(ValueError, match=r"V has shape \[2, 3\].*\[\.\.\., 3, 2\]"):
        kron_eigen_damped_solve(eG, eA, torch.zeros(2, 3), 0.1)
    with pytest.raises(ValueError, match=r"eig_A must hold"):
        kron_eigen_matvec(eG, (torch.ones(2), torch.eye(3)), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="damping must be finite and non-negative"):
        kron_eigen_damped_solve(eG, eA, torch.zeros(3, 2), -1.0)


def test_tensor_damping_matches_float() -> None:
    eG, eA = symeig(spd(3, 1e2, gen(0))), symeig(spd(2, 1e2, gen(1)))
    V = randn(3, 2, g=gen(2))
    ref = kron_eigen_damped_solve(eG, eA, V, 0.01)
    for lam in (torch.tensor(0.01), torch.tensor([0.01], dtype=torch.float64)):
        torch.testing.assert_close(kron_eigen_damped_solve(eG, eA, V, lam), ref)
    with pytest.raises(ValueError, match="damping must be finite and non-negative"):
        kron_eigen_damped_solve(eG, eA, V, torch.tensor(-0.01))
    with pytest.raises(ValueError, match="damping must be a scalar"):
        kron_eigen_damped_solve(eG, eA, V, torch.ones(2))
