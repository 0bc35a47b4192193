"""Kronecker-factor extraction for one batch, against a plain forward+backward and the peers.

For every workload it times (median of repeated runs, same process, same data):

* a plain forward+backward of an un-extended copy of the model (the unit of the ratios);
* curvlab ``KFC.update`` for the exact (type-2) and the MC (1 sample) Fisher, with the
  engine ``engine="auto"`` picks and with each engine forced (``hooks``, ``backpack``);
* BackPACK ``KFLR`` (exact) and ``KFAC`` (MC) — note: for convolutions BackPACK's factors
  are not KFC (G is summed over locations before the outer product, concepts/fisher_types.md);
* curvlinops ``KFACLinearOperator.compute_kronecker_factors`` (type-2 and MC);
* ASDL (asdfghjkl) ``fisher_exact`` / ``fisher_mc`` with ``kron`` shapes.

Usage: ``python -m benchmarks.kfac_extraction [--device cuda] [--repeats 7]``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import curvlab
from benchmarks.common import WORKLOADS, Workload, machine, median_time


def _plain(w: Workload, device: str):
    torch.manual_seed(0)
    model = w.build().to(device)
    loss_fn = nn.CrossEntropyLoss()
    x, y = w.data(device)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    return run


def _curvlab(engine: str):
    def make(w: Workload, device: str, fisher_type: str):
        torch.manual_seed(0)
        model = w.build().to(device)
        loss_fn = nn.CrossEntropyLoss()
        x, y = w.data(device)
        kfc = curvlab.KFC(model, loss_fn, fisher_type=fisher_type, engine=engine)

        def run() -> None:
            kfc.reset()
            kfc.update(x, y)

        return run

    return make


def _backpack(w: Workload, device: str, fisher_type: str):
    from backpack import backpack, extend
    from backpack.extensions import KFAC, KFLR

    torch.manual_seed(0)
    model = extend(w.build().to(device))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = w.data(device)
    ext = KFLR() if fisher_type == "exact" else KFAC()

    def run() -> None:
        model.zero_grad(set_to_none=True)
        with backpack(ext):
            loss_fn(model(x), y).backward()

    return run


def _curvlinops(w: Workload, device: str, fisher_type: str):
    from curvlinops import KFACLinearOperator

    torch.manual_seed(0)
    model = w.build().to(device)
    x, y = w.data(device)
    params = list(model.parameters())

    def run() -> None:
        op = KFACLinearOperator(
            model,
            nn.CrossEntropyLoss(),
            params,
            [(x, y)],
            check_deterministic=False,
            fisher_type="type-2" if fisher_type == "exact" else "mc",
            separate_weight_and_bias=False,
        )
        op.compute_kronecker_factors()

    return run


def _asdl(w: Workload, device: str, fisher_type: str):
    import torch.nn.functional as F
    from asdl import FisherConfig, get_fisher_maker

    torch.manual_seed(0)
    model = w.build().to(device)
    x, y = w.data(device)
    config = FisherConfig(
        fisher_type="fisher_exact" if fisher_type == "exact" else "fisher_mc",
        fisher_shapes=["kron"],
        loss_type="cross_entropy",
        data_size=w.batch_size,
    )
    maker = get_fisher_maker(model, config)

    def run() -> None:
        dummy = maker.setup_model_call(model, x)
        maker.setup_loss_call(F.cross_entropy, dummy, y)
        maker.forward_and_backward()

    return run


TOOLS = {
    "curvlab KFC": _curvlab("auto"),
    "curvlab KFC hooks": _curvlab("hooks"),
    "curvlab KFC backpack": _curvlab("backpack"),
    "BackPACK KFLR/KFAC": _backpack,
    "curvlinops KFAC": _curvlinops,
    "ASDL kron": _asdl,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workloads", type=int, nargs="*", default=None)
    args = parser.parse_args()
    chosen = [WORKLOADS[i] for i in args.workloads] if args.workloads else WORKLOADS
    print(f"Machine: {machine()}\n")
    print("| workload | Fisher | fwd+bwd (ms) | " + " | ".join(TOOLS) + " |")
    print("|---|---|---|" + "---|" * len(TOOLS))
    for w in chosen:
        base = median_time(_plain(w, args.device), repeats=args.repeats)
        for fisher_type in ("exact", "mc"):
            cells = []
            for make in TOOLS.values():
                try:
                    t = median_time(make(w, args.device, fisher_type), repeats=args.repeats)
                    cells.append(f"{t / base:.2f}× ({1e3 * t:.0f} ms)")
                except Exception as err:  # a peer that cannot run a workload is reported
                    cells.append(f"n/a ({type(err).__name__})")
            print(f"| {w.name} | {fisher_type} | {1e3 * base:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
