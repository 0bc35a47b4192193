"""Do ``KFACOptimizer``'s defaults work across problems? Its initial λ and quadratic subset.

Trains ``KFACOptimizer(model, loss_fn, **setting)`` on four small real-data problems and
prints the full-data training loss after a few step counts, or the step at which the run
failed (a non-finite loss, or a factor that is no longer positive definite because the
weights blew up). Settings: the initial damping ``λ₀`` and the quadratic model's subset
(``quadratic_min_rows=1``: a quarter of the batch, no floor).

* digits MLP 64-128-64-10 (tanh, ReLU), cross-entropy, batch 128;
* digits ConvNet (two 3×3 convolutions, 16 and 32 channels), cross-entropy, batch 128;
* digits autoencoder 64-64-64 (tanh), MSE, batch 128;
* MNIST deep autoencoder 784-500-250-30-250-500-784 (tanh), BCE with logits, batch 500
  (the wall-clock race's problem, :mod:`benchmarks.autoencoder_race`).

Usage: ``python -m benchmarks.kfac_defaults [--seeds 0 1] [--threads 2]``. Losses only, no
timings: the machine's load does not change the table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import curvlab
from benchmarks.autoencoder_race import deep_autoencoder, mnist
from benchmarks.common import machine
from curvlab.linalg import LinAlgError

#: (label, KFACOptimizer keyword arguments); the first is today's default.
SETTINGS: list[tuple[str, dict]] = [
    ("defaults (λ₀ = 0.01, quadratic subset ≥ 128)", {}),
    ("λ₀ = 1", {"damping": 1.0}),
    ("λ₀ = 0.1", {"damping": 0.1}),
    ("λ₀ = 0.001", {"damping": 0.001}),
    ("λ₀ = 1, quarter-batch quadratic (before)", {"damping": 1.0, "quadratic_min_rows": 1}),
    ("λ₀ = 0.01, quarter-batch quadratic", {"quadratic_min_rows": 1}),
]


@dataclass
class Problem:
    name: str
    model: Callable[[], nn.Module]
    loss_fn: nn.Module
    inputs: Tensor
    targets: Tensor
    batch: int
    report_at: tuple[int, ...]


def problems() -> list[Problem]:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32)
    y = torch.tensor(labels)

    def mlp() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def convnet() -> nn.Module:
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 64, 10),
        )

    def small_autoencoder() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))

    images = mnist()
    return [
        Problem("digits MLP, CE", mlp, nn.CrossEntropyLoss(), x, y, 128, (10, 50, 250)),
        Problem("digits ConvNet, CE", convnet, nn.CrossEntropyLoss(), x, y, 128, (10, 50, 250)),
        Problem(
            "digits autoencoder, MSE", small_autoencoder, nn.MSELoss(), x, x, 128, (10, 50, 250)
        ),
        Problem(
            "MNIST deep autoencoder, BCE",
            deep_autoencoder,
            nn.BCEWithLogitsLoss(),
            images,
            images,
            500,
            (10, 50, 120),
        ),
    ]


def train(problem: Problem, setting: dict, seed: int) -> list[str]:
    torch.manual_seed(seed)
    model, loss_fn = problem.model(), problem.loss_fn
    opt = curvlab.KFACOptimizer(model, loss_fn, **setting)
    order = torch.Generator().manual_seed(seed + 1)
    cells = []
    for step in range(1, max(problem.report_at) + 1):
        index = torch.randint(0, len(problem.inputs), (problem.batch,), generator=order)
        x, t = problem.inputs[index], problem.targets[index]
        try:
            opt.step(lambda x=x, t=t: loss_fn(model(x), t))
        except (FloatingPointError, LinAlgError):
            return [*cells, f"failed at step {step}"]
        if step in problem.report_at:
            with torch.no_grad():
                loss = float(loss_fn(model(problem.inputs), problem.targets))
            cells.append(f"{loss:.3g}" if loss == loss and loss < 1e6 else f"{loss:.1e}")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Machine: {machine()}; seeds {args.seeds}\n")
    for problem in problems():
        steps = ", ".join(str(s) for s in problem.report_at)
        print(f"\n**{problem.name}**, training loss after {steps} steps (one row per seed)\n")
        print("| setting | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
        print("|---|" + "---|" * len(args.seeds))
        for label, setting in SETTINGS:
            runs = [" / ".join(train(problem, setting, seed)) for seed in args.seeds]
            print(f"| {label} | " + " | ".join(runs) + " |", flush=True)


if __name__ == "__main__":
    main()
