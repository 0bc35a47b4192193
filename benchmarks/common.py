"""Shared pieces of the benchmarks: the workloads of the Kronecker issue and a timer.

Benchmarks print tables; they never assert timings. Run them with ``make bench``.
"""

from __future__ import annotations

import itertools
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch_size: int
    num_classes: int = 10

    def data(self, device: str = "cpu") -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(self.batch_size, *self.input_shape, generator=gen)
        y = torch.randint(0, self.num_classes, (self.batch_size,), generator=gen)
        return x.to(device), y.to(device)


def json_ready(x: Any) -> Any:
    """``x`` with every non-finite float as ``None`` (JSON has no infinity: a time never
    reached, or a diverged loss, is ``null``) and dict keys as strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return x


def _mlp(*sizes: int, activation: type[nn.Module] = nn.ReLU) -> Callable[[], nn.Module]:
    """A builder of ``Linear`` layers of ``sizes`` with ``activation`` between them."""

    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
        return nn.Sequential(*layers)

    return build


def _convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4096, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


WORKLOADS = [
    Workload("MLP 784-512-256-10, batch 128", _mlp(784, 512, 256, 10), (784,), 128),
    Workload("ConvNet 3x32x32 conv32-conv64-4096-256-10, batch 128", _convnet, (3, 32, 32), 128),
    Workload("MLP 2048-2048-2048-10, batch 256", _mlp(2048, 2048, 2048, 10), (2048,), 256),
]


def median_time(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall-clock seconds of ``fn()`` (CUDA synchronised when in use)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{platform.system()} {cpu}, {torch.get_num_threads()} torch threads{gpu}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )
