"""Dense backends on per-pixel outputs: cost against the number of output rows per batch.

A small convolutional segmenter (``Conv2d(3, 8, 3) → ReLU → Conv2d(8, 4, 3)``, padding 1,
on 3×16×16 images) gives per-pixel logits ``[N, 4, 16, 16]`` under
``nn.CrossEntropyLoss``: 256 loss rows per image. ``ExactFisher`` (``fisher_type="exact"``)
accumulates the full Fisher of 14 images, fed in batches of 1, 2 and 7 images; its time
and peak resident memory should grow with the number of images only, not with the batch
they come in. Beside it, curvlinops' ``GGNLinearOperator`` (the exact Fisher = GGN of
this loss) multiplied with the ``[P, P]`` identity over the same batches, where
curvlinops is installed.

Each cell runs in its own process, so its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own; it includes the model, the
data and the interpreter with torch (about 0.3–0.4 GB). Times are the best of
``--repeats`` runs after a warm-up; CPU time of the process is printed beside the wall
time, as the machine may be shared.

Usage: ``python -m benchmarks.dense_rows [--repeats 2]``. Prints one line per cell.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import machine

IMAGES = 14
BATCHES = (1, 2, 7)


def segmenter() -> nn.Module:
    """Per-pixel classifier: ``[N, 3, 16, 16]`` → logits ``[N, 4, 16, 16]``."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))


def data(batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 14 images and their per-pixel labels, in batches of ``batch``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(IMAGES, 3, 16, 16, generator=generator)
    y = torch.randint(0, 4, (IMAGES, 16, 16), generator=generator)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, IMAGES, batch)]


def _curvlab(batch: int) -> Callable[[], torch.Tensor]:
    import curvlab

    torch.manual_seed(0)
    model, loss_fn = segmenter(), nn.CrossEntropyLoss()
    batches = data(batch)

    def run() -> torch.Tensor:
        fisher = curvlab.make("exact_fisher", model, loss_fn, fisher_type="exact")
        for x, y in batches:
            fisher.update(x, y)
        return fisher.to_dense()

    return run


def _curvlinops(batch: int) -> Callable[[], torch.Tensor]:
    from curvlinops import GGNLinearOperator

    torch.manual_seed(0)
    model, loss_fn = segmenter(), nn.CrossEntropyLoss()
    batches = data(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    size = sum(p.numel() for p in params)

    def run() -> torch.Tensor:
        ggn = GGNLinearOperator(model, loss_fn, params, batches, check_deterministic=False)
        return ggn @ torch.eye(size)

    return run


def measure(library: str, batch: int, repeats: int) -> dict[str, float]:
    """One cell, in this process: best wall time, its CPU time, peak resident memory."""
    torch.set_num_threads(1)
    run = (_curvlab if library == "curvlab" else _curvlinops)(batch)
    run()  # warm-up
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"wall_s": best[0], "cpu_s": best[1], "peak_gb": peak_kib * 1024 / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cell", nargs=2, metavar=("LIBRARY", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(measure(args.cell[0], int(args.cell[1]), args.repeats)))
        return
    torch.set_num_threads(1)
    print(machine(), "(each cell: 1 torch thread, its own process)")
    try:
        import curvlinops  # noqa: F401

        libraries = ["curvlab", "curvlinops"]
    except ImportError:
        libraries = ["curvlab"]
    for library in libraries:
        for batch in args.batches:
            command = [sys.executable, "-m", "benchmarks.dense_rows", "--cell", library]
            command += [str(batch), "--repeats", str(args.repeats)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            cell = json.loads(done.stdout.strip().splitlines()[-1])
            label = f"{library} exact Fisher, {IMAGES} images in batches of {batch}"
            print(
                f"{label:<52} {cell['wall_s']:7.2f} s wall  {cell['cpu_s']:7.2f} s CPU  "
                f"peak {cell['peak_gb']:.2f} GB",
                flush=True,
            )


if __name__ == "__main__":
    main()
