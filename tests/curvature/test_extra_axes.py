"""Outputs with extra axes — per token ``[N, C, T]`` / ``[N, T, D]`` and per pixel
``[N, C, H, W]`` — as the loss takes them, without flattening inside the model.

Every position is a loss row (curvlinops' convention), so each backend must give the
same curvature as for the same network with its positions flattened into rows inside
``forward``. Both the one-pass ``update`` and the training loop (``NaturalGradient``)
are checked, and ``update(loader)``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import curvlab
from tests.reference_any import RowsInForward

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

LAYOUTS = ["ce_tokens", "ce_pixels", "mse_tokens", "bce_tokens"]


def _network(layout: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """A model whose output has extra axes, its loss and a batch."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if layout == "ce_pixels":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 1))
        x = torch.randn(3, 2, 4, 4, generator=gen)
        return model.double(), nn.CrossEntropyLoss(), x.double(), torch.randint(0, 3, (3, 4, 4))
    embed = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))  # [N, T, 2] -> [N, T, 3]
    x = torch.randn(3, 5, 2, generator=gen).double()
    if layout == "ce_tokens":  # classes on dimension 1, as CrossEntropyLoss takes them

        class Tokens(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = embed

            def forward(self, inputs: Tensor) -> Tensor:
                return self.net(inputs).transpose(1, 2)  # [N, C, T]

        return Tokens().double(), nn.CrossEntropyLoss(), x, torch.randint(0, 3, (3, 5))
    if layout == "mse_tokens":
        return embed.double(), nn.MSELoss(), x, torch.randn(3, 5, 3, generator=gen).double()
    y = torch.randint(0, 2, (3, 5, 3), generator=gen).double()
    return embed.double(), nn.BCEWithLogitsLoss(), x, y


def _flat_targets(loss_fn: nn.Module, y: Tensor) -> Tensor:
    return y.reshape(-1) if isinstance(loss_fn, nn.CrossEntropyLoss) else y.reshape(-1, y.shape[-1])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", curvlab.available())
def test_extra_axes_equal_rows_flattened_in_the_model(name: str, layout: str) -> None:
    model, loss_fn, x, y = _network(layout)
    rows = RowsInForward(model, isinstance(loss_fn, nn.CrossEntropyLoss))
    torch.manual_seed(3)  # the default Fisher types (MC ones too): the same draws per row
    direct = curvlab.make(name, model, loss_fn)
    direct.update(x, y)
    torch.manual_seed(3)
    flat = curvlab.make(name, rows, loss_fn)
    flat.update(x, _flat_targets(loss_fn, y))
    torch.testing.assert_close(direct.to_dense(), flat.to_dense(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_loop_and_loader_with_extra_axes(layout: str) -> None:
    model, loss_fn, x, y = _network(layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    precond = curvlab.NaturalGradient(curvlab.KFC(model, loss_fn), optimizer=opt)
    with torch.no_grad():
        start = float(loss_fn(model(x), y))
    for _ in range(10):
        opt.zero_grad()
        precond.backward(loss_fn(model(x), y))
        precond.step()
        opt.step()
    with torch.no_grad():
        assert float(loss_fn(model(x), y)) < start
    kfac = curvlab.KFC(model, loss_fn, fisher_type="exact")
    kfac.update([(x[:2], y[:2]), (x[2:], y[2:])])  # a loader of two batches
    whole = curvlab.KFC(model, loss_fn, fisher_type="exact")
    whole.update(x, y)
    torch.testing.assert_close(kfac.to_dense(), whole.to_dense(), rtol=1e-10, atol=1e-12)
    optimizer = curvlab.KFACOptimizer(model, loss_fn)
    first = float(optimizer.step(lambda: loss_fn(model(x), y)))
    for _ in range(9):
        last = float(optimizer.step(lambda: loss_fn(model(x), y)))
    assert last < first
