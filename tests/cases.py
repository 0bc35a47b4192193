"""The case table of the curvature tests: models × losses × reductions.

Every case is tiny and float64 so dense references are exact up to rounding. Each
row says how to build the model, the loss and a seeded batch; ``CASES`` is the
product used to parametrise tests, ``case_id`` names them readably.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

NUM_OUTPUTS = 3
DTYPE = torch.float64


def _mlp(bias: bool) -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, NUM_OUTPUTS, bias=bias)
    )


def _conv1d() -> nn.Module:
    # input [N, 2, 7] -> conv (stride 2, padding 1) -> [N, 3, 4]
    return nn.Sequential(
        nn.Conv1d(2, 3, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, NUM_OUTPUTS),
    )


def _conv2d() -> nn.Module:
    # input [N, 2, 5, 5] -> conv (stride 2, padding 1) -> [N, 2, 3, 3]
    return nn.Sequential(
        nn.Conv2d(2, 2, kernel_size=3, stride=2, padding=1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(18, NUM_OUTPUTS),
    )


@dataclass(frozen=True)
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one sample's shape


@dataclass(frozen=True)
class LossCase:
    name: str
    loss_cls: type[nn.Module]

    def targets(self, n: int, generator: torch.Generator) -> Tensor:
        if self.loss_cls is nn.CrossEntropyLoss:
            return torch.randint(0, NUM_OUTPUTS, (n,), generator=generator)
        if self.loss_cls is nn.BCEWithLogitsLoss:
            return torch.randint(0, 2, (n, NUM_OUTPUTS), generator=generator).to(DTYPE)
        return torch.randn(n, NUM_OUTPUTS, generator=generator, dtype=DTYPE)


MODELS = [
    ModelCase("mlp", lambda: _mlp(bias=True), (5,)),
    ModelCase("mlp_nobias", lambda: _mlp(bias=False), (5,)),
    ModelCase("conv1d", _conv1d, (2, 7)),
    ModelCase("conv2d", _conv2d, (2, 5, 5)),
]
LOSSES = [
    LossCase("ce", nn.CrossEntropyLoss),
    LossCase("mse", nn.MSELoss),
    LossCase("bce", nn.BCEWithLogitsLoss),
]
REDUCTIONS = ["mean", "sum"]


@dataclass(frozen=True)
class Case:
    model: ModelCase
    loss: LossCase
    reduction: str

    @property
    def id(self) -> str:
        return f"{self.model.name}-{self.loss.name}-{self.reduction}"

    def build(self, seed: int = 0) -> tuple[nn.Module, nn.Module]:
        """A fresh float64 model (seeded) and its loss function."""
        torch.manual_seed(seed)
        model = self.model.build().to(DTYPE)
        return model, self.loss.loss_cls(reduction=self.reduction)

    def data(self, n: int = 4, seed: int = 1) -> tuple[Tensor, Tensor]:
        """A seeded batch ``(inputs, targets)`` of ``n`` samples."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, *self.model.input_shape, generator=gen, dtype=DTYPE)
        return x, self.loss.targets(n, gen)


CASES = [Case(m, loss, r) for m in MODELS for loss in LOSSES for r in REDUCTIONS]


def case_id(case: Case) -> str:
    return case.id
