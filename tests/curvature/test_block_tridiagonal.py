"""BlockTridiagonal: the completion is pinned down by two properties of F̂_λ
(concepts/block_tridiagonal.md#the-math).

(a) its inverse — the operator ``solve`` applies — is block-tridiagonal, and (b) F̂_λ
agrees with ``F + λI`` on the diagonal and first off-diagonal layer blocks. The
maximum-entropy completion is the unique matrix with both, so checking them against the
dense exact Fisher tests the construction without re-implementing it (and shows that
conditioning the chain forwards or backwards cannot matter).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab
from tests.cases import CASES, DTYPE

_CASES = [c for c in CASES if c.reduction == "mean" or c.id == "conv1d-ce-sum"]


def _solve_operator(c: curvlab.Curvature, damping: float) -> torch.Tensor:
    eye = torch.eye(c.num_params, dtype=DTYPE)
    columns = []
    for k in range(c.num_params):
        parts = list(eye[k].split([p.numel() for p in c.params]))
        v = [t.reshape(p.shape) for t, p in zip(parts, c.params)]
        columns.append(torch.cat([t.reshape(-1) for t in c.solve(v, damping)]))
    return torch.stack(columns, dim=1)


def _layer_slices(c: curvlab.Curvature) -> list[slice]:
    out, start = [], 0
    for layer in c.layers:
        out.append(slice(start, start + layer.numel))
        start += layer.numel
    return out


@pytest.mark.parametrize("case", _CASES, ids=lambda c: c.id)
def test_solve_is_the_inverse_of_the_tridiagonal_completion(case) -> None:
    model, loss_fn = case.build()
    x, y = case.data(n=6)
    tri = curvlab.BlockTridiagonal(model, loss_fn)
    exact = curvlab.ExactFisher(model, loss_fn)
    curvlab.extract(model, loss_fn, x, y, [tri, exact])
    damping = 0.1
    inverse = _solve_operator(tri, damping)
    torch.testing.assert_close(inverse, inverse.T, rtol=1e-10, atol=1e-10)
    slices = _layer_slices(tri)
    scale = float(inverse.abs().max())
    for i, si in enumerate(slices):
        for j, sj in enumerate(slices):
            if abs(i - j) > 1:  # (a) block-tridiagonal inverse
                assert inverse[si, sj].abs().max() <= 1e-10 * scale
    completion = torch.linalg.inv(inverse)
    target = exact.to_dense() + damping * torch.eye(exact.num_params, dtype=DTYPE)
    for i, si in enumerate(slices):
        for j, sj in enumerate(slices):
            if abs(i - j) <= 1:  # (b) agreement on the tridiagonal blocks
                torch.testing.assert_close(
                    completion[si, sj],
                    target[si, sj],
                    rtol=1e-8,
                    atol=1e-9 * float(target.abs().max()),
                )
    assert torch.linalg.eigvalsh(completion).min() > 0


def test_to_dense_is_the_undamped_completion_and_psd() -> None:
    # least squares with many samples: every layer block is positive definite
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    model = model.to(DTYPE)
    loss_fn = nn.MSELoss()
    x, y = torch.randn(200, 3, dtype=DTYPE), torch.randn(200, 2, dtype=DTYPE)
    tri = curvlab.BlockTridiagonal(model, loss_fn)
    exact = curvlab.ExactFisher(model, loss_fn)
    curvlab.extract(model, loss_fn, x, y, [tri, exact])
    dense = tri.to_dense()
    torch.testing.assert_close(
        dense, torch.linalg.inv(_solve_operator(tri, 0.0)), rtol=1e-6, atol=1e-9
    )
    fisher = exact.to_dense()
    slices = _layer_slices(tri)
    for i, si in enumerate(slices):
        for j, sj in enumerate(slices):
            if abs(i - j) <= 1:
                torch.testing.assert_close(dense[si, sj], fisher[si, sj], rtol=1e-9, atol=1e-12)
    assert torch.linalg.eigvalsh(dense).min() >= -1e-12
    # it is an approximation: the far blocks differ from the exact Fisher's
    assert (dense[slices[0], slices[2]] - fisher[slices[0], slices[2]]).abs().max() > 1e-6


def test_chain_follows_the_forward_order_not_the_registration_order() -> None:
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.last = nn.Linear(4, 3)  # registered first, called last
            self.act = nn.Tanh()
            self.first = nn.Linear(5, 4)

        def forward(self, x):
            return self.last(self.act(self.first(x)))

    torch.manual_seed(0)
    model, loss_fn = Reversed().to(DTYPE), nn.CrossEntropyLoss()
    x, y = torch.randn(6, 5, dtype=DTYPE), torch.randint(0, 3, (6,))
    # BackPACK's second-order extensions need nn.Sequential; the hooks engine does not
    with pytest.raises(ValueError, match=r"module '<model>' \(Reversed\)"):
        curvlab.BlockTridiagonal(model, loss_fn, engine="backpack")
    tri = curvlab.BlockTridiagonal(model, loss_fn)
    exact = curvlab.ExactFisher(model, loss_fn)
    curvlab.extract(model, loss_fn, x, y, [tri, exact])
    assert [layer.name for layer in tri.layers] == ["last", "first"]
    assert tri._order == (1, 0)
    # two layers: the completion is the whole matrix
    torch.testing.assert_close(tri.to_dense(), exact.to_dense(), rtol=1e-9, atol=1e-12)


def test_a_layer_called_twice_is_one_block_placed_at_its_first_call() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3, 2)
            self.lin = nn.Linear(3, 3)
            self.act = nn.Tanh()

        def forward(self, x):
            return self.head(self.act(self.lin(self.act(self.lin(x)))))

    torch.manual_seed(0)
    model, loss_fn = Twice().to(DTYPE), nn.MSELoss()
    x, y = torch.randn(4, 3, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE)
    tri, exact = curvlab.BlockTridiagonal(model, loss_fn), curvlab.ExactFisher(model, loss_fn)
    curvlab.extract(model, loss_fn, x, y, [tri, exact])
    assert tri._order == (1, 0)  # lin (first called) — head
    # two blocks: the completion is the whole matrix, with both calls' contributions
    torch.testing.assert_close(tri.to_dense(), exact.to_dense(), rtol=1e-9, atol=1e-12)


def test_a_single_layer_is_its_own_block() -> None:
    torch.manual_seed(0)
    model, loss_fn = nn.Sequential(nn.Linear(4, 3)).to(DTYPE), nn.MSELoss()
    x, y = torch.randn(20, 4, dtype=DTYPE), torch.randn(20, 3, dtype=DTYPE)
    tri, diag = curvlab.BlockTridiagonal(model, loss_fn), curvlab.BlockDiagonal(model, loss_fn)
    curvlab.extract(model, loss_fn, x, y, [tri, diag])
    v = [torch.randn_like(p) for p in tri.params]
    for a, b in zip(tri.solve(v, 0.1), diag.solve(v, 0.1)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tri.to_dense(), diag.to_dense())
