"""Distributed K-FAC on one machine: bytes communicated and decomposition time, 1 vs 2 processes.

For the MLP workloads (cross-entropy, one-sample MC Fisher, KFC with exact damping, i.e.
eigendecompositions of every factor), the global batch is split over the processes (gloo,
one torch thread per process). Per process and per configuration:

* bytes handed to collectives (``Communicator.bytes``): the statistics all-reduce of one
  curvature step (upper triangles; the full matrices for comparison), the decomposition
  broadcasts of one inversion (``comm_opt``), the preconditioned-gradient broadcasts of
  one step (``mem_opt``) and control messages;
* the time of the process's own decompositions (``decompose`` of the blocks it owns,
  after ``refresh``), and of the whole decomposition phase of an inversion step, measured
  as the median time of a step that inverts minus that of a step that does not (no
  curvature taken in either) — this includes waiting for the slowest process and the
  broadcasts.

Usage: ``python -m benchmarks.distributed [--repeats 5] [--workloads 0 2]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import curvlab
from benchmarks.common import WORKLOADS, machine
from curvlab.curvature.distribution import DistributionInterface

DAMPING = 0.1
NEVER = 10**9


def _measure(workload: int, rank: int, world: int, distribution: str, repeats: int) -> dict:
    w = WORKLOADS[workload]
    torch.manual_seed(0)
    model = w.build()
    loss_fn = nn.CrossEntropyLoss()
    x, y = w.data()
    share = w.batch_size // world
    x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]

    def preconditioner(invert_every: int) -> curvlab.NaturalGradient:
        # statistics at step 0 only; then every step inverts (invert_every=1) or none does
        backend = curvlab.KFC(model, loss_fn, fisher_type="mc")
        return curvlab.NaturalGradient(
            backend,
            damping=DAMPING,
            update_every=NEVER,
            invert_every=invert_every,
            distribution=distribution,
            kl_clip=None,  # cost only
        )

    def step(precond: curvlab.NaturalGradient) -> None:
        model.zero_grad()
        precond.backward(loss_fn(model(x), y))
        precond.step()

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    inverting, plain = preconditioner(1), preconditioner(NEVER)
    step(plain)
    step(inverting)  # step 0: statistics all-reduce and the first inversion
    out: dict[str, Any] = {"owners": inverting.owners}
    comm = inverting.comm
    sums = DistributionInterface(inverting.curvature).statistic_sums()
    out["full_bytes"] = sum(e.tensor.numel() * e.tensor.element_size() for e in sums)
    if comm is not None:
        out["first_step"] = dict(comm.bytes)
        comm.reset_counters()
        step(inverting)  # an inversion step without statistics
        out["inversion_step"] = dict(comm.bytes)
    curvature = inverting.curvature
    own = [b for b, o in zip(inverting.blocks, inverting.owners) if o == rank]
    timings: dict[str, list[float]] = {"own": [], "invert": [], "plain": []}
    for _ in range(repeats):
        curvature.refresh()
        barrier()
        start = time.perf_counter()
        for block in own:
            DistributionInterface(curvature).decompose(block, DAMPING)
        timings["own"].append(time.perf_counter() - start)
        for name, precond in (("invert", inverting), ("plain", plain)):
            barrier()
            start = time.perf_counter()
            step(precond)
            timings[name].append(time.perf_counter() - start)
    out.update({k: statistics.median(v) for k, v in timings.items()})
    return out


def _eigh_time(world: int, n: int = 1537, repeats: int = 3) -> float:
    """Median seconds of one ``n × n`` eigendecomposition while every process runs one:
    how much two processes slow each other down on this machine."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    a = a @ a.T
    times = []
    for _ in range(repeats):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        torch.linalg.eigh(a)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, jobs: list, queue: Any) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    queue.put(("eigh", rank, _eigh_time(world)))
    for job in jobs:
        queue.put((job, rank, _measure(*job[:1], rank, world, *job[1:])))
    dist.destroy_process_group()


def _run(world: int, jobs: list) -> dict:
    """``{(job, rank): result}`` from ``world`` processes (one process: in this one)."""
    if world == 1:
        torch.set_num_threads(1)
        results = {("eigh", 0): _eigh_time(1)}
        results.update({(job, 0): _measure(job[0], 0, 1, *job[1:]) for job in jobs})
        return results
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, jobs, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(world * (len(jobs) + 1)):
        job, rank, res = queue.get()
        results[(job, rank)] = res
    for p in procs:
        p.join()
    return results


def _size(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workloads", type=int, nargs="*", default=[0, 2])
    args = parser.parse_args()
    configs = [(1, "local")] + [(2, d) for d in ("comm_opt", "mem_opt")]
    results: dict = {}
    for world in (1, 2):
        jobs = [(i, d, args.repeats) for i in args.workloads for n, d in configs if n == world]
        results.update({(world, *k): v for k, v in _run(world, jobs).items()})
    print(f"Machine: {machine()}; one torch thread per process, gloo")
    alone, together = results[(1, "eigh", 0)], max(results[(2, "eigh", r)] for r in range(2))
    print(
        f"A 1537×1537 eigendecomposition takes {1e3 * alone:.0f} ms in one process and "
        f"{1e3 * together:.0f} ms when two processes run one each ({together / alone:.2f}×).\n"
    )
    print(
        "| workload | processes | distribution | blocks per process "
        "| statistics all-reduce per curvature step (full matrices) "
        "| decompositions broadcast per inversion | gradients broadcast per step "
        "| control per inversion step | own decompositions per process (ms) "
        "| decomposition phase (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i in args.workloads:
        for world, distribution in configs:
            ranks = [results[(world, (i, distribution, args.repeats), r)] for r in range(world)]
            first = ranks[0]
            blocks = [first["owners"].count(r) for r in range(world)]
            own = ", ".join(f"{1e3 * r['own']:.0f}" for r in ranks)
            phase = max(r["invert"] - r["plain"] for r in ranks)
            if world == 1:
                stats = decomp = grads = control = "—"
            else:
                stats = f"{_size(first['first_step']['statistics'])} ({_size(first['full_bytes'])})"
                decomp = _size(first["inversion_step"]["decompositions"])
                grads = _size(first["inversion_step"]["gradients"])
                control = _size(first["inversion_step"]["control"])
            print(
                f"| {WORKLOADS[i].name} | {world} | {distribution} | {blocks} | {stats} "
                f"| {decomp} | {grads} | {control} | {own} | {1e3 * phase:.0f} |"
            )


if __name__ == "__main__":
    main()
