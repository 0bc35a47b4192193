"""The series model's algebra (curvlab.linalg.kron_series) against dense float64 sums."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab import linalg

DTYPE = torch.float64


@given(x=st.floats(-0.999, 0.999), steps=st.integers(1, 12))
@settings(max_examples=60, deadline=None)
def test_zeta_is_the_weighted_sum(x: float, steps: int) -> None:
    direct = sum((steps - abs(d)) * x ** abs(d) for d in range(-(steps - 1), steps))
    got = float(linalg.series_zeta(torch.tensor([x], dtype=DTYPE), steps))
    assert got == pytest.approx(direct, rel=1e-9, abs=1e-9)


def test_zeta_near_one_is_continuous() -> None:
    x = torch.tensor([1.0 - 1e-6, 1.0], dtype=DTYPE)
    torch.testing.assert_close(
        linalg.series_zeta(x, 7), torch.full_like(x, 49.0), rtol=1e-4, atol=0
    )


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=gen, dtype=DTYPE)
    return m @ m.T + n * torch.eye(n, dtype=DTYPE)


def _lag(b0: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    m = torch.randn(b0.shape, generator=gen, dtype=DTYPE)
    return scale * b0 @ (m + m.T) @ b0 / (4 * torch.linalg.matrix_norm(b0, 2) * b0.shape[0])


def test_operations_match_the_dense_block() -> None:
    gen = torch.Generator().manual_seed(0)
    g0, a0 = _spd(3, gen), _spd(4, gen)
    g1, a1 = _lag(g0, 0.5, gen), _lag(a0, 0.5, gen)
    basis = linalg.series_basis(g0, g1, a0, a1, 5)
    dense = linalg.series_dense(basis)
    v = torch.randn(3, 4, generator=gen, dtype=DTYPE)
    torch.testing.assert_close(linalg.series_matvec(basis, v).reshape(-1), dense @ v.reshape(-1))
    torch.testing.assert_close(
        linalg.series_solve(basis, v).reshape(-1), torch.linalg.solve(dense, v.reshape(-1))
    )
    torch.testing.assert_close(linalg.series_diagonal(basis).reshape(-1), torch.diagonal(dense))
    torch.testing.assert_close(linalg.series_frobenius_norm(basis), torch.linalg.matrix_norm(dense))


def test_no_lag_is_the_independent_block() -> None:
    gen = torch.Generator().manual_seed(1)
    g0, a0 = _spd(3, gen), _spd(2, gen)
    zero_g, zero_a = torch.zeros_like(g0), torch.zeros_like(a0)
    basis = linalg.series_basis(g0, zero_g, a0, zero_a, 6)
    torch.testing.assert_close(linalg.series_dense(basis), torch.kron(g0, a0))


def test_lag_eigenvalues_are_clipped() -> None:
    """A perfectly correlated direction (ψ = 1) is clipped to 1 - SERIES_CLIP."""
    g0 = torch.eye(2, dtype=DTYPE)
    a0 = torch.eye(1, dtype=DTYPE)
    basis = linalg.series_basis(g0, g0.clone(), a0, a0.clone(), 4)
    psi = torch.tensor((1 - linalg.SERIES_CLIP) ** 2, dtype=DTYPE)
    torch.testing.assert_close(basis.z, linalg.series_zeta(psi, 4).expand(2, 1) / 4)
