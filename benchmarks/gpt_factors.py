"""K-FAC factor time against a gradient on a GPT-like model, curvlab beside curvlinops.

A causal character transformer (the optimizer race's blocks: pre-LayerNorm, attention
from plain ``nn.Linear`` projections, a raw position parameter) of width 128 with 4
blocks, context 64, a 96-character vocabulary, the embedding tied to the output head,
batches of 8 sequences (512 tokens), cross-entropy per token. The tied weight starts as
GPT-2's (normal, std 0.02): with ``nn.Embedding``'s N(0, 1) the tied head's logits of a
token's own embedding are ~128, the softmax is saturated, the MC labels are certain and
their gradients ~1e-27, whose denormal arithmetic made every MC backward ~10× slower on
x86 CPUs (both libraries alike).

* curvlab: ``KFAC(model, loss_fn, fisher_type="mc")``, every parameter covered: Kronecker
  blocks for the 16 ``nn.Linear`` layers of the blocks, one Kronecker-sum block for the
  tied embedding/head weight and the head's bias (``tied="kronecker"``, the default:
  the head's factors and the embedding's; concepts/kronecker.md), diagonal blocks for
  the LayerNorms and the position parameter (per-sample gradients read off the recorded
  graph, their columns' gradients taken in the Kronecker layers' backward pass:
  concepts/models.md); ``update`` = forward, backward, statistics.
* curvlinops 3.0.1: ``KFACLinearOperator`` with the MC Fisher (one sample) on the
  parameters it supports here, the ``nn.Linear`` layers' weights and biases (not the tied
  embedding/head, the norms or the position parameter), the ``[N·T, V]`` token rows as
  its data points like curvlab's, ``check_deterministic=False``;
  ``compute_kronecker_factors()`` after the constructor (the factors are computed lazily
  in curvlinops 3): one forward with hooks and one backward of the sampled loss.

Each is reported as a ratio to one forward + backward pass of the same batch, timed
interleaved (gradient, curvlab, curvlinops per round; the minimum over rounds), so a
loaded machine slows all three alike; by the wall clock and by this thread's CPU clock
(``time.thread_time``, which a loaded machine inflates less; one torch thread). Usage:
``python -m benchmarks.gpt_factors [--rounds 5] [--threads 1]``. Prints a table; never
asserts.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

import curvlab
from benchmarks.common import machine
from benchmarks.optimizer_race import CharTransformer

VOCAB, CONTEXT, WIDTH, LAYERS, SEQUENCES = 96, 64, 128, 4, 8


def gpt_like() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = CharTransformer(VOCAB, CONTEXT, width=WIDTH, heads=4, layers=LAYERS)
    model.head.weight = model.tok.weight  # tied embedding and output head
    with torch.no_grad():  # GPT-2's initialisation of the tied weight (see the docstring)
        model.tok.weight.normal_(0.0, 0.02)
    x = torch.randint(0, VOCAB, (SEQUENCES, CONTEXT))
    y = torch.randint(0, VOCAB, (SEQUENCES * CONTEXT,))
    return model, x, y


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """``(wall seconds, this thread's CPU seconds)`` of one call."""
    start, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - start, time.thread_time() - cpu


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, x, y = gpt_like()
    loss_fn = nn.CrossEntropyLoss()
    curvature = curvlab.KFAC(model, loss_fn, fisher_type="mc")
    coverage = curvature.coverage()

    def gradient() -> None:
        model.zero_grad()
        loss_fn(model(x), y).backward()

    def ours() -> None:
        curvature.reset()
        curvature.update(x, y)

    cells: dict[str, Callable[[], object]] = {"forward+backward": gradient, "curvlab KFAC": ours}
    linear_params = [
        p for m in model.modules() if type(m) is nn.Linear and m is not model.head
        for p in m.parameters()
    ]  # fmt: skip
    try:
        from curvlinops import KFACLinearOperator

        def theirs() -> None:
            op = KFACLinearOperator(
                model, loss_fn, linear_params, [(x, y)], check_deterministic=False,
                fisher_type="mc", mc_samples=1,
            )  # fmt: skip
            op.compute_kronecker_factors()  # lazy in curvlinops 3

        cells["curvlinops KFAC (Linear layers only)"] = theirs
    except ImportError:
        print("curvlinops is not installed: only curvlab is timed")
    for fn in cells.values():  # warm-up
        fn()
    best = dict.fromkeys(cells, float("inf"))
    best_cpu = dict.fromkeys(cells, float("inf"))
    for _ in range(args.rounds):
        for name, fn in cells.items():
            wall, cpu = _timed(fn)
            best[name] = min(best[name], wall)
            best_cpu[name] = min(best_cpu[name], cpu)
    base, base_cpu = best["forward+backward"], best_cpu["forward+backward"]
    covered = sum(p.numel() for p in curvature.params)
    theirs_count = sum(p.numel() for p in linear_params)
    print(machine())
    print(
        f"GPT-like: width {WIDTH}, {LAYERS} blocks, context {CONTEXT}, vocab {VOCAB} (tied), "
        f"{SEQUENCES} sequences; {args.threads} thread(s), min of {args.rounds} rounds"
    )
    print(f"curvlab covers {covered} parameters ({_kinds(coverage)}); curvlinops {theirs_count}")
    print("| what | ms | × forward+backward | CPU ms | × (CPU clock) |\n|---|---|---|---|---|")
    ratios = {}
    for name, seconds in best.items():
        ratios[name] = seconds / base
        cpu = best_cpu[name]
        print(
            f"| {name} | {seconds * 1e3:.1f} | {seconds / base:.2f}× "
            f"| {cpu * 1e3:.1f} | {cpu / base_cpu:.2f}× |"
        )
    if len(best) == 3:
        ours_ratio, their_ratio = list(ratios.values())[1:]
        print(f"curvlab's ratio / curvlinops' ratio: {ours_ratio / their_ratio:.2f}")
    return ratios


def _kinds(coverage: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for kind in coverage.values():
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.items()) + " parameter tensors"


if __name__ == "__main__":
    main()
