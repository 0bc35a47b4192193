"""Tests for curvlab.linalg.damping: concepts/kronecker.md#damped-inverse (factored Tikhonov)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlab.linalg import (
    LinAlgError,
    commutation_matrix,
    factored_damping,
    kron_dense,
    pi_correction,
)

from ._helpers import (
    assert_rel,
    dims,
    dtypes,
    f64,
    gen,
    hsettings,
    kappas,
    product_rtol,
    seeds,
    spd,
)

lams = st.sampled_from([1e-4, 1e-2, 1.0, 150.0])
scales = st.sampled_from([1e-3, 1.0, 1e3])


# §5.11 (row-major): kron(G + γ/π I, A + πγ I) = kron(G, A) + γ(π G⊗I + π^{-1} I⊗A) + γ² I.
@hsettings(90)
@given(seed=seeds, n=dims, m=dims, kG=kappas, kA=kappas, sG=scales, lam=lams, dtype=dtypes)
def test_factored_damping_expansion(
    seed: int, n: int, m: int, kG: float, kA: float, sG: float, lam: float, dtype: torch.dtype
) -> None:
    g = gen(seed)
    G, A = spd(n, kG, g, dtype) * sG, spd(m, kA, g, dtype)
    Gd, Ad = factored_damping(G, A, lam)
    assert Gd.dtype == dtype and Ad.dtype == dtype
    pi = float(pi_correction(G, A))
    gamma = math.sqrt(lam)
    In, Im = np.eye(n), np.eye(m)
    Gn, An = f64(G), f64(A)
    np.testing.assert_allclose(
        f64(Gd) - Gn,
        gamma / pi * In,
        atol=10 * product_rtol(dtype) * (np.abs(Gn).max() + gamma / pi),
    )
    np.testing.assert_allclose(
        f64(Ad) - An,
        pi * gamma * Im,
        atol=10 * product_rtol(dtype) * (np.abs(An).max() + gamma * pi),
    )
    lhs = f64(kron_dense(Gd, Ad))
    rhs = (
        np.kron(Gn, An)
        + gamma * (pi * np.kron(Gn, Im) + np.kron(In, An) / pi)
        + lam * np.eye(n * m)
    )
    assert_rel(lhs, rhs, 10 * product_rtol(dtype), "factored damping expansion (row-major)")
    # the papers' column-major statement, converted with the commutation matrix K_{n,m}:
    # (A+πγI)⊗(G+(γ/π)I) = A⊗G + γ(π I⊗G + π^{-1} A⊗I) + γ²I and K (A'⊗G') Kᵀ = G'⊗A'.
    K = f64(commutation_matrix(n, m))
    col = (
        np.kron(An, Gn)
        + gamma * (pi * np.kron(Im, Gn) + np.kron(An, In) / pi)
        + lam * np.eye(n * m)
    )
    assert_rel(K @ col @ K.T, rhs, 1e-12, "column-major form")


# π minimizes the trace norm of the error term γ(π G⊗I + π^{-1} I⊗A)
# (concepts/kronecker.md#damped-inverse).
@hsettings(60)
@given(seed=seeds, n=st.integers(1, 8), m=st.integers(1, 8), kG=kappas, sG=scales)
def test_pi_minimizes_trace_norm(seed: int, n: int, m: int, kG: float, sG: float) -> None:
    g = gen(seed)
    G, A = spd(n, kG, g) * sG, spd(m, 1e2, g)
    pi = float(pi_correction(G, A))

    def trace_norm(p: float) -> float:
        E = p * np.kron(f64(G), np.eye(m)) + np.kron(np.eye(n), f64(A)) / p
        return float(np.linalg.norm(E, "nuc"))

    # for PSD factors the trace norm is π·dim(A)·tr(G) + π^{-1}·dim(G)·tr(A)
    closed = pi * m * float(torch.trace(G)) + n * float(torch.trace(A)) / pi
    assert math.isclose(trace_norm(pi), closed, rel_tol=1e-10)
    for f in (0.5, 0.9, 1.1, 2.0):
        assert trace_norm(pi) <= trace_norm(pi * f) * (1 + 1e-12)


def test_pi_correction_hand_example() -> None:
    G = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))  # tr/dim = 2
    A = 8 * torch.eye(3, dtype=torch.float64)  # tr/dim = 8
    pi = pi_correction(G, A)
    assert pi.dtype == torch.float64 and pi.ndim == 0
    assert float(pi) == 2.0  # sqrt(8 / 2)
    Gd, Ad = factored_damping(G, A, 4.0)  # γ = 2: G + (γ/π) I = G + I, A + πγ I = A + 4 I
    torch.testing.assert_close(Gd, torch.diag(torch.tensor([2.0, 4.0], dtype=torch.float64)))
    torch.testing.assert_close(Ad, 12 * torch.eye(3, dtype=torch.float64))


def test_pi_override_and_zero_damping() -> None:
    G, A = torch.eye(2), 4 * torch.eye(3)
    Gd, Ad = factored_damping(G, A, 9.0, pi=1.0)
    torch.testing.assert_close(Gd, 4 * torch.eye(2))
    torch.testing.assert_close(Ad, 7 * torch.eye(3))
    Gd, Ad = factored_damping(G, A, 0.0)
    assert torch.equal(Gd, G) and torch.equal(Ad, A)
    with pytest.raises(ValueError, match="pi must be positive"):
        factored_damping(G, A, 1.0, pi=0.0)
    with pytest.raises(ValueError, match="pi must be positive"):
        factored_damping(G, A, 1.0, pi=torch.tensor(0.0))
    Gt, At = factored_damping(G, A, torch.tensor(9.0), pi=torch.tensor(1.0))
    torch.testing.assert_close(Gt, 4 * torch.eye(2))
    torch.testing.assert_close(At, 7 * torch.eye(3))
    with pytest.raises(ValueError, match="damping must be finite and non-negative"):
        factored_damping(G, A, -1.0)


@pytest.mark.parametrize("diagonal", ["G", "A", "both"])
def test_pi_correction_of_diagonals_equals_the_dense_factors(diagonal: str) -> None:
    """A factor given as its diagonal ``[m]`` gives the π of ``diag`` of it (only the traces
    enter), so a structured ``G`` never forms ``[m, m]``."""
    g = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    a = torch.tensor([8.0, 2.0], dtype=torch.float64)
    dense = pi_correction(torch.diag(g), torch.diag(a))
    G = g if diagonal in ("G", "both") else torch.diag(g)
    A = a if diagonal in ("A", "both") else torch.diag(a)
    torch.testing.assert_close(pi_correction(G, A), dense, rtol=0, atol=0)


def test_pi_correction_zero_trace_falls_back_to_one() -> None:
    Z2, Z3 = torch.zeros(2, 2), torch.zeros(3, 3)
    assert float(pi_correction(Z2, torch.eye(3))) == 1.0
    assert float(pi_correction(torch.eye(2), Z3)) == 1.0
    assert float(pi_correction(Z2, Z3)) == 1.0
    Gd, Ad = factored_damping(Z2, Z3, 4.0)
    torch.testing.assert_close(Gd, 2 * torch.eye(2))
    torch.testing.assert_close(Ad, 2 * torch.eye(3))


def test_pi_correction_errors() -> None:
    with pytest.raises(ValueError, match="trace is negative"):
        pi_correction(-torch.eye(2), torch.eye(3))
    with pytest.raises(LinAlgError, match=r"A contains non-finite"):
        pi_correction(torch.eye(2), torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match=r"same dtype and device"):
        pi_correction(torch.eye(2), torch.eye(3, dtype=torch.float64))
