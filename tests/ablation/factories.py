"""Model factories for ``curvlab ablate --model tests.ablation.factories:NAME`` in the tests."""

from __future__ import annotations

import math

import torch
from torch import nn


def tiny_mlp(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """``X`` as stored, flattened, through 6 tanh units to ``num_outputs``."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), 6), nn.Tanh(), nn.Linear(6, num_outputs)
    )


def fixed_digits_mlp() -> nn.Module:
    """A factory that takes no arguments: its model is made for the digits (8×8, 10
    classes)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def three_outputs(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Always 3 outputs, whatever the data need."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 3))


def not_a_module(input_shape: tuple[int, ...], num_outputs: int) -> str:
    return "a string"


def broken(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    raise RuntimeError("the factory's own bug")


def too_many(a: int, b: int, c: int) -> nn.Module:
    raise AssertionError("never called")


NOT_CALLABLE = 3


class NeedsBetas(torch.optim.Optimizer):
    """A torch.optim-style class whose constructor insists on an argument the race does
    not pass."""

    def __init__(self, params, lr: float, betas: tuple[float, float]) -> None:
        super().__init__(params, {"lr": lr, "betas": betas})

    def step(self, closure=None):  # pragma: no cover - never built
        return None
