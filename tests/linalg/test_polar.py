"""``linalg.orthogonalize``: the quintic Newton–Schulz polar factor keeps the singular
vectors and flattens the singular values (hypothesis over shapes and conditioning)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg import orthogonalize


def _matrix(rows: int, cols: int, log_condition: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    k = min(rows, cols)
    sigma = torch.logspace(0, -log_condition, k, dtype=torch.float64)
    return u[:, :k] @ torch.diag(sigma) @ v[:, :k].T


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    log_condition=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_singular_vectors_kept_and_values_flattened(rows, cols, log_condition, seed) -> None:
    g = _matrix(rows, cols, log_condition, seed)
    out = orthogonalize(g)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    projected = u.T @ out @ vh.T  # diagonal if the singular vectors are kept
    off = projected - torch.diag(torch.diagonal(projected))
    assert float(off.abs().max()) < 1e-8
    values = torch.diagonal(projected)
    assert float(values.min()) > 0.3 and float(values.max()) < 1.3, values
    assert out.shape == g.shape and out.dtype == g.dtype


def test_a_bfloat16_iteration_is_close() -> None:
    g = _matrix(40, 60, 1.0, seed=3).float()
    exact = orthogonalize(g)
    cheap = orthogonalize(g, dtype=torch.bfloat16)
    assert cheap.dtype == torch.float32
    assert float((cheap - exact).norm() / exact.norm()) < 0.05


def test_shapes_dtypes_and_zero() -> None:
    conv = torch.randn(4, 3, 3, 3)
    out = orthogonalize(conv)
    assert out.shape == conv.shape
    values = torch.linalg.svdvals(out.reshape(4, -1))  # [out, in·k·k], all four near one
    assert float(values.min()) > 0.6 and float(values.max()) < 1.25, values
    half = orthogonalize(torch.randn(5, 3).to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert torch.equal(orthogonalize(torch.zeros(3, 4)), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="needs a matrix"):
        orthogonalize(torch.randn(3))
