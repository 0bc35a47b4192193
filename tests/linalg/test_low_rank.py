"""``linalg.low_rank_sum`` and per-column weights of ``low_rank_update``, against float64
dense references (the sum of the parts' matrices, and its best rank-``r`` low-rank part from
``torch.linalg.eigh``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlab import linalg
from tests.linalg._helpers import gen, hsettings, seeds

DTYPE = torch.float64


def _part(n: int, columns: int, rank: int, weight: float, g: torch.Generator):
    """A compressed ``diag(d) + weight · C Cᵀ`` with ``C`` ``[n, columns]``."""
    d = torch.rand(n, generator=g, dtype=DTYPE)
    cols = torch.randn(n, columns, generator=g, dtype=DTYPE)
    zero = linalg.DiagonalPlusLowRank(d, torch.zeros(n, rank, dtype=DTYPE), torch.zeros(rank))
    return linalg.low_rank_update(zero._replace(s=zero.s.to(DTYPE)), cols, weight, rank)


def _low(M: linalg.DiagonalPlusLowRank) -> torch.Tensor:
    return (M.U * M.s) @ M.U.T


@hsettings(30)
@given(
    n=st.integers(2, 10),
    parts=st.lists(
        st.tuples(st.integers(1, 4), st.sampled_from([1.0, -0.4, 0.7])), min_size=1, max_size=4
    ),
    rank=st.integers(1, 8),
    seed=seeds,
)
def test_low_rank_sum_is_the_best_rank_r_part_of_the_sum(n, parts, rank, seed) -> None:
    """``d = Σ d_p + diag(L − L_r)`` and ``U S Uᵀ = L_r`` with ``L = Σ_p U_p S_p U_pᵀ``; exact
    (``L_r = L``) when the parts' columns fit; the error is at most ``‖e_dropped‖₂``."""
    g = gen(seed)
    ms = [_part(n, k, min(k, rank), w, g) for k, w in parts]
    total = linalg.low_rank_sum(ms, rank)
    assert total.U.shape == (n, rank) and total.s.shape == (rank,)
    low = sum(_low(m) for m in ms)
    exact = sum(m.to_dense() for m in ms)
    e, v = torch.linalg.eigh(low)
    order = torch.argsort(e.abs(), descending=True)
    keep = order[:rank]
    kept = (v[:, keep] * e[keep]) @ v[:, keep].T
    dropped = e[order[rank:]]
    torch.testing.assert_close(total.diagonal(), torch.diagonal(exact), rtol=1e-10, atol=1e-12)
    smallest_kept = e[order[min(rank, n) - 1]].abs()
    gap = smallest_kept - (dropped.abs().max() if dropped.numel() else 0.0)
    if float(gap) > 1e-6 * float(e.abs().max().clamp(min=1e-30)):  # L_r is unique
        torch.testing.assert_close(_low(total), kept, rtol=1e-8, atol=1e-10)
    error = torch.linalg.matrix_norm(total.to_dense() - exact)
    assert float(error) <= float(torch.linalg.vector_norm(dropped)) + 1e-10
    if sum(min(k, rank) for k, _ in parts) <= rank:
        torch.testing.assert_close(total.to_dense(), exact, rtol=1e-10, atol=1e-12)


def test_low_rank_sum_is_deterministic_and_one_part_is_itself() -> None:
    g = gen(0)
    a, b = _part(9, 3, 4, -0.5, g), _part(9, 4, 4, 1.0, g)
    first, again = linalg.low_rank_sum([a, b], 4), linalg.low_rank_sum([a, b], 4)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    same = linalg.low_rank_sum([a], 4)
    torch.testing.assert_close(same.to_dense(), a.to_dense(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_sum_keeps_the_parts_dtype(dtype) -> None:
    g = gen(1)
    parts = [_part(6, 2, 3, 1.0, g).to(dtype) for _ in range(2)]
    total = linalg.low_rank_sum(parts, 3)
    assert all(t.dtype == dtype for t in total)
    reference = sum(p.to(DTYPE).to_dense() for p in parts)
    torch.testing.assert_close(
        total.to(DTYPE).diagonal(), torch.diagonal(reference), rtol=2e-2, atol=1e-2
    )


def test_per_column_weights_are_one_weight_per_column() -> None:
    g = gen(2)
    cols = torch.randn(7, 3, generator=g, dtype=DTYPE)
    w = torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE)
    M = linalg.low_rank_update(None, cols, w, 3)
    torch.testing.assert_close(M.to_dense(), (cols * w) @ cols.T, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match=r"weight must be a number or \[3\]"):
        linalg.low_rank_update(None, cols, w[:2], 3)


def test_low_rank_sum_refuses_bad_parts() -> None:
    g = gen(3)
    with pytest.raises(ValueError, match="parts is empty"):
        linalg.low_rank_sum([], 2)
    with pytest.raises(ValueError, match="rank must be"):
        linalg.low_rank_sum([_part(4, 1, 1, 1.0, g)], 0)
    with pytest.raises(ValueError, match=r"part 1 has d \[5\]"):
        linalg.low_rank_sum([_part(4, 1, 1, 1.0, g), _part(5, 1, 1, 1.0, g)], 2)
