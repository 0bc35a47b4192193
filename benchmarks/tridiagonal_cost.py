"""Per-step preconditioning cost: K-FAC block-tridiagonal against block-diagonal.

On the MLP workloads (cross-entropy, one-sample MC Fisher, factored damping for both), after
the statistics are accumulated and the damped decompositions cached (``solve`` called once),
the median time of one ``solve`` of a gradient — the work done every step — and, separately,
of the factorisation redone at an inversion step.

Usage: ``python -m benchmarks.tridiagonal_cost [--repeats 20]``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import curvlab
from benchmarks.common import WORKLOADS, machine, median_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"Machine: {machine()}\n")
    print(
        "| workload | block-diagonal solve (ms) | block-tridiagonal solve (ms) | ratio "
        "| block-diagonal refactorisation + solve (ms) "
        "| block-tridiagonal refactorisation + solve (ms) |"
    )
    print("|---|---|---|---|---|---|")
    for w in (WORKLOADS[0], WORKLOADS[2]):
        torch.manual_seed(0)
        model = w.build()
        loss_fn = nn.CrossEntropyLoss()
        x, y = w.data()
        diag = curvlab.KFAC(model, loss_fn, damping_mode="factored")
        tri = curvlab.BlockTridiagonalKFAC(model, loss_fn)
        diag.update(x, y)
        tri.update(x, y)
        grads = [torch.randn_like(p) for p in diag.params]
        cells = []
        for c in (diag, tri):
            c.solve(grads, 1e-3)  # factorise once: what every further step reuses
            cells.append(median_time(lambda c=c, g=grads: c.solve(g, 1e-3), repeats=args.repeats))
        factor = []
        for c in (diag, tri):

            def refactorise(c=c, g=grads) -> None:
                c.refresh()
                c.solve(g, 1e-3)

            factor.append(median_time(refactorise, repeats=max(3, args.repeats // 4)))
        print(
            f"| {w.name} | {1e3 * cells[0]:.2f} | {1e3 * cells[1]:.2f} | "
            f"{cells[1] / cells[0]:.2f}× | {1e3 * factor[0]:.1f} | {1e3 * factor[1]:.1f} |"
        )


if __name__ == "__main__":
    main()
