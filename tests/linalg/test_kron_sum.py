"""Tests for curvlab.linalg.kron_sum: concepts/block_tridiagonal.md#the-math / §5.9 (solves with A⊗B
± C⊗D)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlab.linalg import KronSumInverse, LinAlgError, kron_sum_solve

from ._helpers import (
    assert_rel,
    cond,
    contraction,
    dims,
    dtypes,
    f64,
    gen,
    hsettings,
    kappas,
    randn,
    resid_ok,
    seeds,
    solve_rtol,
    spd,
    sqrtm_spd,
)


def _factors(
    n: int, m: int, kA: float, kB: float, sign: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 A, B SPD; for sign=-1, C = A^{1/2} R1 A^{1/2}, D = B^{1/2} R2 B^{1/2}, ‖R‖ ≤ 0.9
    (so the difference is PD); for sign=+1, C, D PSD with random condition and scale."""
    A, B = spd(n, kA, g), spd(m, kB, g)
    if sign == -1:
        SA, SB = sqrtm_spd(A), sqrtm_spd(B)
        C, D = SA @ contraction(n, g) @ SA, SB @ contraction(m, g) @ SB
    else:
        C = spd(n, 1e2, g) * float(torch.rand(1, generator=g) * 3)
        D = spd(m, 1e3, g) * float(torch.rand(1, generator=g) * 3)
    return A, B, (C + C.T) / 2, (D + D.T) / 2


# §5.9: (A⊗B ± C⊗D)^{-1} vec(Y), row-major: A X Bᵀ ± C X Dᵀ = Y.
@hsettings(120)
@given(
    seed=seeds,
    n=dims,
    m=dims,
    kA=kappas,
    kB=kappas,
    sign=st.sampled_from([1, -1]),
    batch=st.integers(0, 2),
    dtype=dtypes,
)
def test_kron_sum_solve_matches_dense(
    seed: int, n: int, m: int, kA: float, kB: float, sign: int, batch: int, dtype: torch.dtype
) -> None:
    g = gen(seed)
    A, B, C, D = (t.to(dtype) for t in _factors(n, m, kA, kB, sign, g))
    Y = randn(*((batch,) if batch else ()), n, m, g=g, dtype=dtype)
    X = kron_sum_solve(A, B, C, D, Y, sign)
    assert X.dtype == dtype and X.shape == Y.shape
    M = np.kron(f64(A), f64(B)) + sign * np.kron(f64(C), f64(D))  # exact in float64
    assert np.linalg.eigvalsh(M).min() > 0  # the generator gives a PD operator
    # The eigenbasis transform U_row ⊗ U_col has condition number (κ(A)κ(B))^{1/2} and enters
    # twice, so the algorithm's error follows max(κ(M), κ(A)κ(B)) rather than κ(M) alone
    # (for sign=+1, C⊗D can make M much better conditioned than A⊗B).
    rtol = solve_rtol(dtype, max(cond(M), cond(A) * cond(B)))
    for b in range(batch or 1):
        Xb, Yb = (X[b], Y[b]) if batch else (X, Y)
        ref = scipy.linalg.solve(M, f64(Yb).reshape(-1), assume_a="pos").reshape(n, m)
        # in the matrix form: A X Bᵀ ± C X Dᵀ = Y
        lhs = f64(A) @ ref @ f64(B).T + sign * f64(C) @ ref @ f64(D).T
        np.testing.assert_allclose(lhs, f64(Yb), atol=1e-8 * np.abs(f64(Yb)).max())
        # backward error grows with the conditioning of the generalized eigenvectors
        assert resid_ok(M, f64(Xb), f64(Yb), dtype, c=10 * (n + m) * cond(A) * cond(B))
        if rtol < 0.1:
            assert_rel(Xb, ref, rtol, f"kron sum solve (sign {sign:+d})")


@hsettings(45)
@given(seed=seeds, n=dims, m=dims, sign=st.sampled_from([1, -1]))
def test_kron_sum_inverse_fields_and_reuse(seed: int, n: int, m: int, sign: int) -> None:
    g = gen(seed)
    A, B, C, D = _factors(n, m, 1e2, 1e2, sign, g)
    inv = KronSumInverse.from_factors(A, B, C, D, sign, name="Σ_1|2")
    assert inv.sign == sign and inv.denominator.shape == (n, m)
    # U_rowᵀ A U_row = I, U_rowᵀ C U_row = diag(s_row); likewise for the column pair
    for U, s, P, Q in ((inv.U_row, inv.s_row, A, C), (inv.U_col, inv.s_col, B, D)):
        np.testing.assert_allclose(f64(U.T @ P @ U), np.eye(P.shape[0]), atol=1e-10)
        np.testing.assert_allclose(f64(U.T @ Q @ U), np.diag(f64(s)), atol=1e-10)
    expected_den = 1 + sign * np.outer(f64(inv.s_row), f64(inv.s_col))
    np.testing.assert_allclose(f64(inv.denominator), expected_den, rtol=1e-14)
    if sign == -1:
        assert f64(inv.denominator).min() >= 1 - 0.81 - 1e-10  # |s| ≤ 0.9 by construction
    Y = randn(3, n, m, g=g)
    batched = inv.solve(Y)
    for b in range(3):
        torch.testing.assert_close(batched[b], inv.solve(Y[b]), rtol=1e-12, atol=1e-12)


def test_kron_sum_matches_math_column_major_form() -> None:
    """concepts/block_tridiagonal.md#the-math: (A_m⊗B_m ± C_m⊗D_m)^{-1} vec(X) (column-major, X: dim
    B_m × dim A_m)
    equals kron_sum_solve(B_m, A_m, D_m, C_m, X) in the row-major convention."""
    g = gen(7)
    for sign in (1, -1):
        Bm, Am, Dm, Cm = _factors(4, 3, 1e2, 1e3, sign, g)  # row pair (B_m, D_m): 4x4
        X = randn(4, 3, g=g)
        M_col = np.kron(f64(Am), f64(Bm)) + sign * np.kron(f64(Cm), f64(Dm))
        vec_x = scipy.linalg.solve(M_col, f64(X).T.reshape(-1))  # vec = column stacking
        ref = vec_x.reshape(3, 4).T
        out = kron_sum_solve(Bm, Am, Dm, Cm, X, sign)
        np.testing.assert_allclose(f64(out), ref, rtol=1e-10, atol=1e-12)
        # MATH's formula U_2[(U_2ᵀ X U_1) ⊘ (11ᵀ ± s_2 s_1ᵀ)]U_1ᵀ with (s_1, U_1) from (C_m, A_m)
        s1, U1 = scipy.linalg.eigh(f64(Cm), f64(Am))
        s2, U2 = scipy.linalg.eigh(f64(Dm), f64(Bm))
        formula = U2 @ ((U2.T @ f64(X) @ U1) / (1 + sign * np.outer(s2, s1))) @ U1.T
        np.testing.assert_allclose(formula, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kron_sum_indefinite_raises(dtype: torch.dtype) -> None:
    g = gen(3)
    A, B = spd(3, 10.0, g), spd(2, 10.0, g)
    SA, SB = sqrtm_spd(A), sqrtm_spd(B)
    C = SA @ torch.diag(torch.tensor([1.5, 0.5, 0.2], dtype=torch.float64)) @ SA  # C ⋠ A
    D = SB @ torch.diag(torch.tensor([0.9, 0.1], dtype=torch.float64)) @ SB
    a, b, c, d = (t.to(dtype) for t in (A, B, C, D))
    with pytest.raises(LinAlgError, match=r"layer 2 Schur.*not positive definite.*-3\.5"):
        KronSumInverse.from_factors(a, b, c, d, sign=-1, name="layer 2 Schur")
    KronSumInverse.from_factors(a, b, c, d, sign=1)  # the plus sign is fine


def test_kron_sum_rounding_clamp() -> None:
    # C = A, D = B: 1 - s_row s_colᵀ = 0 up to rounding -> clamped to rounding_tol, finite solve
    g = gen(5)
    A, B = spd(3, 10.0, g, torch.float32), spd(2, 10.0, g, torch.float32)
    inv = KronSumInverse.from_factors(A, B, A, B, sign=-1)
    tol = 100 * torch.finfo(torch.float32).eps
    assert float(inv.denominator.min()) >= tol
    assert torch.isfinite(inv.solve(torch.ones(3, 2))).all()
    # a custom tolerance: -1e-3 is "negative beyond rounding" only for a tighter tolerance
    with pytest.raises(LinAlgError):
        KronSumInverse.from_factors(A, B, A * 1.001, B, sign=-1, rounding_tol=1e-5)
    inv = KronSumInverse.from_factors(A, B, A * 1.001, B, sign=-1, rounding_tol=1e-2)
    assert float(inv.denominator.min()) == pytest.approx(1e-2)


def test_kron_sum_argument_errors() -> None:
    I2, I3 = torch.eye(2), torch.eye(3)
    with pytest.raises(ValueError, match=r"sign must be \+1 or -1"):
        kron_sum_solve(I2, I3, I2, I3, torch.zeros(2, 3), sign=0)
    with pytest.raises(ValueError, match=r"C has shape \[3, 3\] but A has \[2, 2\]"):
        kron_sum_solve(I2, I3, I3, I3, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"D has shape \[2, 2\] but B has \[3, 3\]"):
        kron_sum_solve(I2, I3, I2, I2, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"Y has shape \[3, 2\], expected \[\.\.\., 2, 3\]"):
        kron_sum_solve(I2, I3, I2, I3, torch.zeros(3, 2))
    with pytest.raises(LinAlgError, match=r"Σ: A.*not positive definite"):
        kron_sum_solve(-I2, I3, I2, I3, torch.zeros(2, 3), name="Σ")
    with pytest.raises(ValueError, match=r"same dtype and device"):
        kron_sum_solve(I2, I3.double(), I2, I3, torch.zeros(2, 3))
