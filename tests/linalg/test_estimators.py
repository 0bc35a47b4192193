"""Property tests of the matrix-free estimators on random symmetric matrices
(concepts/matrix_free.md#estimators-and-their-errors), against dense torch.linalg."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlab import linalg
from tests.linalg._helpers import gen, hsettings, random_orthogonal, seeds


def _psd(dim: int, rank: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` with ``rank`` distinct positive eigenvalues in (0.1, 10) and zeros."""
    g = gen(seed)
    values = torch.zeros(dim, dtype=torch.float64)
    values[:rank] = 0.1 + 9.9 * torch.rand(rank, generator=g, dtype=torch.float64)
    Q = random_orthogonal(dim, g)
    return ((Q * values) @ Q.T).to(dtype)


def _mv(A: torch.Tensor):
    return lambda X: A @ X


dims = st.integers(min_value=2, max_value=40)


@given(seed=seeds, dim=dims, rank_fraction=st.floats(0.05, 1.0))
@hsettings(30)
def test_hutchinson_is_within_its_standard_error(seed: int, dim: int, rank_fraction: float) -> None:
    A = _psd(dim, max(1, int(rank_fraction * dim)), seed)
    est = linalg.hutchinson_trace(_mv(A), dim, 200, seed=seed)
    # |z| > 6 has probability < 1e-8 per example for the (nearly normal) mean of 200 probes
    assert abs(float(est.value - torch.trace(A))) <= 6 * float(est.error) + 1e-10
    assert est.num_matvecs == 200


@given(seed=seeds, dim=dims)
@hsettings(20)
def test_hutchinson_is_exact_on_diagonal_matrices(seed: int, dim: int) -> None:
    """``zᵀDz = tr D`` for Rademacher ``z``: every probe is exact, the error is 0."""
    D = torch.diag(torch.rand(dim, generator=gen(seed), dtype=torch.float64))
    est = linalg.hutchinson_trace(_mv(D), dim, 5, seed=seed)
    torch.testing.assert_close(est.value, torch.trace(D))
    assert float(est.error) < 1e-12


@given(seed=seeds, dim=dims, rank=st.integers(1, 12))
@hsettings(30)
def test_hutchpp_and_diagpp_are_exact_below_the_sketch_rank(seed: int, dim: int, rank: int) -> None:
    rank = min(rank, dim)
    A = _psd(dim, rank, seed)
    m = 3 * rank + 6  # sketch of m/3 > rank columns
    trace = linalg.hutchpp_trace(_mv(A), dim, m, seed=seed)
    torch.testing.assert_close(trace.value, torch.trace(A), rtol=1e-10, atol=1e-10)
    assert float(trace.error) <= 1e-8
    diag = linalg.diagonal_estimate(_mv(A), dim, m, method="diag++", seed=seed)
    torch.testing.assert_close(diag.value, A.diagonal(), rtol=1e-9, atol=1e-9)


@given(seed=seeds, dim=dims)
@hsettings(20)
def test_hutchpp_converges_and_stays_within_its_error(seed: int, dim: int) -> None:
    A = _psd(dim, dim, seed)
    est = linalg.hutchpp_trace(_mv(A), dim, 150, seed=seed)
    assert abs(float(est.value - torch.trace(A))) <= 6 * float(est.error) + 1e-9


@pytest.mark.parametrize("method", ["hutchinson", "diag++"])
@given(seed=seeds, dim=dims)
@hsettings(15)
def test_diagonal_estimates_converge(method: str, seed: int, dim: int) -> None:
    A = _psd(dim, dim, seed)
    est = linalg.diagonal_estimate(_mv(A), dim, 300, method=method, seed=seed)
    inside = (est.value - A.diagonal()).abs() <= 6 * est.error + 1e-9
    assert bool(inside.all())
    scale = float(A.diagonal().abs().max())
    assert float((est.value - A.diagonal()).abs().max()) <= 0.5 * scale


@given(seed=seeds, dim=dims, rank=st.integers(1, 10), k=st.integers(1, 5))
@hsettings(30)
def test_lanczos_matches_eigvalsh_on_exact_rank(seed: int, dim: int, rank: int, k: int) -> None:
    """Rank ``r`` with distinct eigenvalues: the Krylov space is invariant after ``r + 1``
    steps and the top ``k ≤ r`` Ritz values are the eigenvalues; the bounds hold and are at
    rounding level, amplified by the Krylov basis' conditioning where eigenvalues cluster
    (seed 34784, dim 39, rank 6: four of six eigenvalues in [8.6, 9.9] give a last residual
    of 1e-6 while the Ritz values are exact to 1e-13)."""
    rank = min(rank, dim)
    k = min(k, rank)
    A = _psd(dim, rank, seed)
    est = linalg.lanczos_eigenvalues(_mv(A), dim, k, num_steps=min(dim, rank + 1), seed=seed)
    expected = torch.linalg.eigvalsh(A).flip(0)[:k]
    torch.testing.assert_close(est.value, expected, rtol=1e-8, atol=1e-9)
    # containment up to eigvalsh's own rounding (both sides are exact to ~1e-15 relative)
    slack = 1e-12 * float(expected[0])
    assert bool(((est.value - expected).abs() <= est.error + slack).all())
    assert float(est.error.max()) <= 1e-4 * float(expected[0])
    assert est.num_matvecs <= rank + 1


@given(seed=seeds, dim=st.integers(5, 40))
@hsettings(30)
def test_lanczos_residual_bounds_hold(seed: int, dim: int) -> None:
    """Few steps on a full-rank matrix (indefinite too): an eigenvalue lies within the
    bound of every Ritz value."""
    g = gen(seed)
    Q = random_orthogonal(dim, g)
    values = torch.randn(dim, generator=g, dtype=torch.float64)
    A = (Q * values) @ Q.T
    est = linalg.lanczos_eigenvalues(_mv(A), dim, 3, num_steps=5, seed=seed)
    gaps = (est.value.unsqueeze(1) - values.unsqueeze(0)).abs().min(dim=1).values
    assert bool((gaps <= est.error * (1 + 1e-8) + 1e-10).all())


@given(seed=seeds, dim=dims)
@hsettings(20)
def test_spectral_density_quadrature(seed: int, dim: int) -> None:
    """Weights sum to 1 per probe; ``tr(A)`` from the quadrature is Hutchinson's estimate
    (unbiased, within its error); the smoothed density integrates to 1."""
    A = _psd(dim, dim, seed)
    density = linalg.spectral_density(_mv(A), dim, num_probes=30, num_steps=8, seed=seed)
    torch.testing.assert_close(
        density.weights.sum(dim=1), torch.ones(30, dtype=torch.float64), rtol=1e-10, atol=1e-10
    )
    ones = density.trace_function(torch.ones_like)
    torch.testing.assert_close(ones.value, torch.tensor(float(dim), dtype=torch.float64))
    trace = density.trace_function(lambda t: t)
    assert abs(float(trace.value - torch.trace(A))) <= 6 * float(trace.error) + 1e-9
    grid = density.grid(2000, margin=1.0)
    mass = float(torch.trapezoid(density.density(grid), grid))
    assert abs(mass - 1.0) < 1e-3


@given(seed=seeds, dim=dims)
@hsettings(20)
def test_slq_is_exact_with_a_full_krylov_space(seed: int, dim: int) -> None:
    """With ``dim`` steps every node is an eigenvalue and ``tr log(A + I)`` is exact up to
    the probes' sampling (each probe's quadrature is exact: ``zᵀ f(A) z / ‖z‖²``)."""
    A = _psd(dim, dim, seed)
    density = linalg.spectral_density(_mv(A), dim, num_probes=3, num_steps=dim, seed=seed)
    values = torch.linalg.eigvalsh(A)
    used = density.nodes[density.weights > 1e-10]
    gaps = (used.unsqueeze(1) - values.unsqueeze(0)).abs().min(dim=1).values
    assert float(gaps.max()) < 1e-8


@given(seed=seeds, dim=dims, damping=st.floats(1e-3, 1.0))
@hsettings(30)
def test_conjugate_gradient_solves_damped_systems(seed: int, dim: int, damping: float) -> None:
    A = _psd(dim, max(1, dim // 2), seed)
    b = torch.randn(dim, generator=gen(seed + 1), dtype=torch.float64)
    x, iterations, residual = linalg.conjugate_gradient(_mv(A), b, damping=damping, tol=1e-10)
    expected = torch.linalg.solve(A + damping * torch.eye(dim, dtype=A.dtype), b)
    torch.testing.assert_close(x, expected, rtol=1e-7, atol=1e-7 * float(expected.abs().max()))
    assert residual <= 1e-10 and iterations <= 2 * dim


def test_conjugate_gradient_refuses_an_indefinite_operator() -> None:
    A = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    with pytest.raises(linalg.LinAlgError, match="not positive definite"):
        linalg.conjugate_gradient(_mv(A), torch.ones(3, dtype=torch.float64), damping=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_estimators_keep_the_dtype(dtype: torch.dtype) -> None:
    A = _psd(20, 5, 0, dtype)
    for est in (
        linalg.hutchinson_trace(_mv(A), 20, 6, dtype=dtype),
        linalg.hutchpp_trace(_mv(A), 20, 18, dtype=dtype),
        linalg.diagonal_estimate(_mv(A), 20, 18, dtype=dtype),
        linalg.lanczos_eigenvalues(_mv(A), 20, 2, dtype=dtype),
    ):
        assert est.value.dtype == dtype and est.error.dtype == dtype
    assert math.isinf(float(linalg.hutchinson_trace(_mv(A), 20, 1, dtype=dtype).error))


def test_clear_errors() -> None:
    A = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_matvecs must be an int >= 3"):
        linalg.hutchpp_trace(_mv(A), 4, 2)
    with pytest.raises(ValueError, match="num_matvecs"):
        linalg.hutchinson_trace(_mv(A), 4, 0)
    with pytest.raises(ValueError, match="method"):
        linalg.diagonal_estimate(_mv(A), 4, 6, method="xdiag")
    with pytest.raises(ValueError, match="k=5 exceeds"):
        linalg.lanczos_eigenvalues(_mv(A), 4, 5)
    with pytest.raises(ValueError, match="matvec must map"):
        linalg.hutchinson_trace(lambda X: X[:2], 4, 3)
