"""Time per training step, amortised: natural-gradient K-FAC against plain SGD and ASDL.

For each workload of the Kronecker issue (cross-entropy, batch as listed), the median
over repeated blocks of ``steps`` consecutive steps (default 20, i.e. curvature every
step and two inversions at ``invert_every=10``) of:

* plain SGD with momentum (forward, backward, ``opt.step``) — the unit of the ratios;
* curvlab ``NaturalGradient(KFC(fisher_type="mc", damping_mode=...))`` + the same SGD, for
  exact damping (eigenbases, four matmuls per layer and step) and factored damping
  (cached damped inverse factors, two matmuls);
* ASDL (asdfghjkl 0.1a4, the bench extra's) ``KfacGradientMaker`` (``fisher_mc``, the same
  intervals and damping) + SGD.

Usage: ``python -m benchmarks.training_step [--device cuda] [--workloads 0 1]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

import curvlab
from benchmarks.common import WORKLOADS, Workload, machine, median_time

DAMPING, UPDATE_EVERY, INVERT_EVERY, LR = 0.1, 1, 10, 1e-4


def _sgd(w: Workload, device: str, steps: int) -> Callable[[], None]:
    torch.manual_seed(0)
    model = w.build().to(device)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    x, y = w.data(device)

    def run() -> None:
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    return run


def _curvlab(w: Workload, device: str, steps: int, damping_mode: str) -> Callable[[], None]:
    torch.manual_seed(0)
    model = w.build().to(device)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    precond = curvlab.NaturalGradient(
        curvlab.KFC(model, loss_fn, fisher_type="mc", damping_mode=damping_mode),
        damping=DAMPING,
        update_every=UPDATE_EVERY,
        invert_every=INVERT_EVERY,
        kl_clip=None,  # as ASDL's KfacGradientMaker: no clipping
    )
    x, y = w.data(device)

    def run() -> None:
        for _ in range(steps):
            opt.zero_grad()
            precond.backward(loss_fn(model(x), y))
            precond.step()
            opt.step()

    return run


def _asdl(w: Workload, device: str, steps: int) -> Callable[[], None]:
    import torch.nn.functional as F
    from asdl import KfacGradientMaker, PreconditioningConfig

    torch.manual_seed(0)
    model = w.build().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    config = PreconditioningConfig(
        data_size=w.batch_size,
        damping=DAMPING,
        curvature_upd_interval=UPDATE_EVERY,
        preconditioner_upd_interval=INVERT_EVERY,
    )
    maker = KfacGradientMaker(model, config)
    x, y = w.data(device)

    def run() -> None:
        for _ in range(steps):
            opt.zero_grad()
            dummy = maker.setup_model_call(model, x)
            maker.setup_loss_call(F.cross_entropy, dummy, y)
            maker.forward_and_backward()
            opt.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", type=int, nargs="*", default=[0, 1])
    args = parser.parse_args()
    print(f"Machine: {machine()}\n")
    print(
        "| workload | SGD step (ms) | curvlab KFC, exact damping "
        "| curvlab KFC, factored damping | ASDL KfacGradientMaker |"
    )
    print("|---|---|---|---|---|")
    for i in args.workloads:
        w = WORKLOADS[i]
        base = median_time(_sgd(w, args.device, args.steps), repeats=args.repeats, warmup=1)
        cells = []
        makers = [
            lambda w=w: _curvlab(w, args.device, args.steps, "exact"),
            lambda w=w: _curvlab(w, args.device, args.steps, "factored"),
            lambda w=w: _asdl(w, args.device, args.steps),
        ]
        for make in makers:
            t = median_time(make(), repeats=args.repeats, warmup=1)
            cells.append(f"{t / base:.2f}× ({1e3 * t / args.steps:.1f} ms)")
        print(f"| {w.name} | {1e3 * base / args.steps:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
