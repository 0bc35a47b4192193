"""Count aborts at exit of short two-process gloo runs (issue #22, the exit abort).

Each run starts two worker processes (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``,
the ``env://`` rendezvous: process 0 hosts the TCP store), which train a small MLP for a few
steps under ``DistributedDataParallel`` and call ``destroy_process_group()``; the driver
counts the processes that end with ``SIGABRT`` (``terminate called without an active
exception``) or any other failure. The variants separate the suspects::

    python scripts/distributed_exit_stress.py --runs 15 --curvlab   # DDP + NaturalGradient(KFAC)
    python scripts/distributed_exit_stress.py --runs 15             # DDP + SGD only
    python scripts/distributed_exit_stress.py --runs 15 --dynamo    # import torch._dynamo first
    python scripts/distributed_exit_stress.py --runs 15 --curvlab --dynamo
    python scripts/distributed_exit_stress.py --runs 5 --example    # examples/distributed_kfac.py

Every worker is pinned with ``taskset`` to the cores of ``--cpus`` (default ``0``: both
processes share one core, which stands in for a loaded machine) and uses one torch thread.
A worker that aborts prints the Python stacks of its threads (``faulthandler``) to its
stderr; ``--show`` prints the stderr of the first aborting run. Each worker also reports
whether ``torch._dynamo`` was imported by the time it exits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(use_curvlab: bool, dynamo: bool, steps: int) -> None:
    """One process of a run: DDP training for ``steps`` steps, then destroy_process_group."""
    import faulthandler

    faulthandler.enable(all_threads=True)  # SIGABRT: the Python stacks of every thread
    import torch

    if dynamo:
        import torch._dynamo
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    ddp = DistributedDataParallel(model)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = None
    if use_curvlab:
        import curvlab

        precond = curvlab.NaturalGradient(
            curvlab.KFAC(ddp, loss_fn), optimizer=opt, damping=0.1, invert_every=2
        )
    generator = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=generator)
        y = torch.randint(0, 10, (32,), generator=generator)
        opt.zero_grad()
        loss = loss_fn(ddp(x), y)
        if precond is not None:
            precond.backward(loss)
            precond.step()
        else:
            loss.backward()
        opt.step()
    if precond is not None:
        precond.close()
    dist.destroy_process_group()
    print(f"rank {rank}: torch._dynamo imported: {'torch._dynamo' in sys.modules}", flush=True)


def _allow_core_dumps() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


#: stderr of the processes that hung (filled by one_run)
hangs: list[str] = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_pair(
    command: list[str],
    timeout: float,
    cwd: str | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> list[tuple[int, str, str]]:
    """Start ``command`` as the two processes of an ``env://`` gloo run (process 0 hosts the
    store on a free port); their (return code, stdout, stderr). A process that does not exit
    within ``timeout`` seconds gets ``SIGABRT`` (so ``faulthandler`` prints its stacks), then
    is killed; its stderr ends with ``(hung: ...)``. Also used by
    tests/optim/test_distributed_exit.py."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    procs = [
        subprocess.Popen(
            command,
            cwd=cwd or ROOT,
            preexec_fn=preexec_fn,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hang: SIGABRT for the stacks, then kill
            p.send_signal(signal.SIGABRT)
            try:
                stdout, stderr = p.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                stdout, stderr = p.communicate()
            stderr += f"\n(hung: no exit within {timeout:g} s, aborted by the driver)"
        out.append((p.returncode, stdout, stderr))
    return out


def one_run(args: argparse.Namespace) -> list[tuple[int, str, str]]:
    """The two processes of one run of the variant ``args`` selects (see the module
    docstring), pinned to ``args.cpus``."""
    if args.example:
        command = [sys.executable, str(ROOT / "examples" / "distributed_kfac.py")]
    else:
        command = [sys.executable, __file__, "--worker", "--steps", str(args.steps)]
        command += ["--curvlab"] * args.curvlab + ["--dynamo"] * args.dynamo
    if shutil.which("taskset"):
        command = ["taskset", "-c", args.cpus, *command]
    out = run_pair(
        command,
        args.timeout,
        cwd=args.core_dir,
        preexec_fn=_allow_core_dumps if args.core_dir else None,
    )
    hangs.extend(stderr for _, _, stderr in out if "(hung:" in stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--curvlab", action="store_true", help="NaturalGradient(KFAC) too")
    parser.add_argument("--dynamo", action="store_true", help="import torch._dynamo first")
    parser.add_argument("--example", action="store_true", help="run the torchrun example")
    parser.add_argument("--cpus", default="0", help="taskset core list for the workers")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per process")
    parser.add_argument("--core-dir", help="run the workers here with core dumps allowed")
    parser.add_argument("--show", action="store_true", help="print an aborting run's stderr")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.curvlab, args.dynamo, args.steps)
        return
    label = "example" if args.example else ("curvlab" if args.curvlab else "ddp-only")
    label += " + torch._dynamo" if args.dynamo else ""
    aborts = failures = dynamo_loaded = 0
    shown = False
    start = time.perf_counter()
    for _ in range(args.runs):
        for code, stdout, stderr in one_run(args):
            dynamo_loaded += "torch._dynamo imported: True" in stdout
            if "(hung:" in stderr:
                continue
            if code == -signal.SIGABRT or "terminate called" in stderr:
                aborts += 1
                if args.show and not shown:
                    print(stderr, file=sys.stderr)
                    shown = True
            elif code != 0:
                failures += 1
                print(f"failure (return code {code}):\n{stderr[-2000:]}", file=sys.stderr)
    seconds = time.perf_counter() - start
    if args.show and hangs:
        print(hangs[0], file=sys.stderr)
    print(
        f"{label}: {args.runs} runs ({2 * args.runs} processes, cores {args.cpus}), "
        f"{aborts} aborted processes, {len(hangs)} hung processes, {failures} other failures, "
        f"torch._dynamo imported in "
        f"{dynamo_loaded} processes, {seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
