"""Per-step cost of ``KFACOptimizer`` on the race's deep autoencoder (784-500-250-30-250-500-784).

The amortised time of one step (the mean over blocks of ``invert_every`` consecutive steps,
so one inversion per block), median over ``--repeats`` blocks, on MNIST batches of 500;
``--profile`` adds a cProfile split by part. Used for the paired A/B measurements of
docs/benchmarks.md (run the same command against two checkouts, interleaved).
Usage: ``python -m benchmarks.kfac_step [--threads 2] [--repeats 5] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from torch import nn

import curvlab
from benchmarks.autoencoder_race import deep_autoencoder, mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block", type=int, default=20, help="steps per block (invert_every)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--adam", action="store_true", help="time Adam steps instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = mnist()
    model = deep_autoencoder()
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(1)
    if args.adam:
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(x: torch.Tensor) -> None:
            adam.zero_grad()
            loss_fn(model(x), x).backward()
            adam.step()
    else:
        opt = curvlab.KFACOptimizer(model, loss_fn, invert_every=args.block)

        def step(x: torch.Tensor) -> None:
            opt.step(lambda: loss_fn(model(x), x))

    def block() -> float:
        batches = [
            data[torch.randint(0, len(data), (500,), generator=gen)] for _ in range(args.block)
        ]
        start = time.perf_counter()
        for x in batches:
            step(x)
        return (time.perf_counter() - start) / args.block

    block()  # warm-up (first inversion, allocator)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        block()
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        return
    times = [block() for _ in range(args.repeats)]
    print(f"ms/step {1e3 * statistics.median(times):.2f}")


if __name__ == "__main__":
    main()
