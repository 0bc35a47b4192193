"""Costs at realistic sizes, as ratios to one forward + backward pass of the same batch.

* ``DiagonalFisher`` (MC and exact) on the optimizer race's character transformer (two
  blocks, width 64, raw position parameter) at 128 tokens per sequence, for 2 and 8
  sequences: its diagonal of the raw parameter comes from per-sample gradients of a
  replayed forward pass, so the ratio stays flat in the batch;
* ``KFAC`` (MC) on the same model, tied embedding and output head included;
* ``KFAC`` (MC) on the MNIST-rows LSTM of the race (its LSTM weights in diagonal blocks);
* ``KFC`` (MC) on a ViT-like classifier with a raw class token and position parameter.

Usage: ``python -m benchmarks.real_sizes [--repeats 3] [--threads 1] [--clock cpu]
[--only diagonal|exact] [--exact-tokens 16 32] [--exact-sequences 2 8]``. Prints one line
per cell. ``--clock cpu`` times with the process's CPU time (``time.process_time``), which
a shared machine's load disturbs less than the wall clock (with one thread, it is the work
done). ``--only exact`` runs the exact diagonal's cells alone: per token count, the
sequence counts given, and how much the ratio grows from the first to the last.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

import curvlab
from benchmarks.common import machine
from benchmarks.optimizer_race import Block, CharTransformer, RowLSTM


class TinyViT(nn.Module):
    """A ViT-like classifier: 4×4-pixel patches of a 28×28 image, a raw class token and
    raw position parameters, two blocks of width 64 (the race's causal blocks), a head on
    the class token."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(16, width)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(50, width))
        self.blocks = nn.Sequential(Block(width, 4), Block(width, 4))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        patches = x.reshape(n, 7, 4, 7, 4).permute(0, 1, 3, 2, 4).reshape(n, 49, 16)
        h = torch.cat([self.cls.expand(n, -1, -1), self.embed(patches)], dim=1) + self.pos
        return self.head(self.blocks(h)[:, -1])


#: the clock of every cell: ``time.perf_counter`` (wall) or ``time.process_time`` (CPU)
_CLOCK: list[Callable[[], float]] = [time.perf_counter]


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    clock = _CLOCK[0]
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def _lm(sequences: int, context: int, tied: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = CharTransformer(96, context)
    if tied:
        model.head.weight = model.tok.weight
    x = torch.randint(0, 96, (sequences, context))
    y = torch.randint(0, 96, (sequences * context,))
    return model, x, y


def _lstm(batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return RowLSTM(), torch.randn(batch, 784), torch.randint(0, 10, (batch,))


def _vit() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return TinyViT(), torch.randn(32, 784), torch.randint(0, 10, (32,))


def cell(
    label: str,
    build: Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]],
    backend: str,
    repeats: int,
    **options: object,
) -> float:
    model, x, y = build()
    loss_fn = nn.CrossEntropyLoss()

    def gradient() -> None:
        model.zero_grad()
        loss_fn(model(x), y).backward()

    curvature = curvlab.make(backend, model, loss_fn, **options)

    def update() -> None:
        curvature.reset()
        curvature.update(x, y)

    base = _best_of(gradient, max(repeats, 10))  # cheap, and noisier than the update
    cost = _best_of(update, repeats)
    ratio = cost / base
    print(
        f"{label:<58} {cost * 1e3:9.1f} ms  {ratio:6.2f}× forward+backward ({base * 1e3:.1f} ms)",
        flush=True,
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--only", choices=("diagonal", "exact"), default=None)
    parser.add_argument("--exact-tokens", type=int, nargs="+", default=[16])
    parser.add_argument("--exact-sequences", type=int, nargs="+", default=[2, 8])
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    print(machine(), f"({args.clock} clock, best of {args.repeats} after a warm-up)")
    r = args.repeats
    if args.only != "exact":
        for n in (2, 8):
            cell(
                f"DiagonalFisher mc, LM 2×64, {n} seq × 128 tokens",
                lambda n=n: _lm(n, 128, False),
                "diagonal",
                r,
                fisher_type="mc",
            )
    sequences = args.exact_sequences
    for t in args.exact_tokens:
        exact = [
            cell(
                f"DiagonalFisher exact, LM 2×64, {n} seq × {t} tokens",
                lambda n=n, t=t: _lm(n, t, False),
                "diagonal",
                r,
                fisher_type="exact",
            )
            for n in sequences
        ]
        if len(exact) > 1:
            print(
                f"exact type, {t} tokens: the ratio grows {exact[-1] / exact[0]:.2f}× from "
                f"{sequences[0]} to {sequences[-1]} sequences"
            )
    if args.only is not None:
        return
    cell(
        "KFAC mc, LM 2×64 tied head, 8 seq × 128 tokens",
        lambda: _lm(8, 128, True),
        "kfac",
        r,
        fisher_type="mc",
    )
    cell("KFAC mc, MNIST-rows LSTM, batch 128", lambda: _lstm(128), "kfac", r, fisher_type="mc")
    cell(
        "KFC mc, ViT-like (raw class and position params), batch 32",
        _vit,
        "kfc",
        r,
        fisher_type="mc",
    )


if __name__ == "__main__":
    main()
