"""Distributed K-FAC with torchrun: data-parallel training on the digits data set.

Every process trains the same network on its own shard of each batch. PyTorch's
``DistributedDataParallel`` averages the gradients; ``curvlab.NaturalGradient`` all-reduces
the K-FAC statistics on curvature steps, spreads the eigendecompositions over the processes
and shares them, so every process applies the same natural gradient.

Run it with (CPU, gloo)::

    torchrun --nproc_per_node=2 examples/distributed_kfac.py

or as ``python examples/distributed_kfac.py``, which starts the two processes itself.
``CURVLAB_DISTRIBUTION=mem_opt`` switches from broadcasting decompositions (``comm_opt``)
to broadcasting preconditioned gradients. On GPUs, use the ``"nccl"`` backend and move
the model to ``cuda:<local rank>``.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import curvlab

DISTRIBUTION = os.environ.get("CURVLAB_DISTRIBUTION", "comm_opt")
EPOCHS, BATCH_PER_PROCESS = 8, 64


def main() -> None:
    dist.init_process_group("gloo")  # torchrun's environment variables tell where to meet
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    train = TensorDataset(X[:1500], y[:1500])
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, seed=0)
    loader = DataLoader(train, batch_size=BATCH_PER_PROCESS, sampler=sampler, drop_last=True)

    torch.manual_seed(0)  # the same initial weights on every process
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    ddp_model = DistributedDataParallel(model)
    loss_fn = nn.CrossEntropyLoss()
    # The curvature may be given the DDP wrapper or ddp_model.module: it covers the module.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    precond = curvlab.NaturalGradient(
        curvlab.KFAC(ddp_model, loss_fn, fisher_type="mc"),
        optimizer=opt,  # its learning rate, read at every step, scales the KL clip
        damping=0.1,
        invert_every=5,
        distribution=DISTRIBUTION,
    )

    steps = 0
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            opt.zero_grad()
            precond.backward(loss_fn(ddp_model(xb), yb))  # DDP averages p.grad
            precond.step()  # statistics all-reduced; natural gradient in p.grad
            opt.step()
            steps += 1
        with torch.no_grad():
            accuracy = (model(X[1500:]).argmax(1) == y[1500:]).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch}: test accuracy {accuracy:.3f}")

    # every process holds the same parameters (bit for bit)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    same = all(torch.equal(everyone[0], other) for other in everyone)
    assert precond.comm is not None
    sent = {k: v / steps for k, v in precond.comm.bytes.items()}
    if rank == 0:
        print(f"{world} processes, distribution {precond.distribution}, {steps} steps")
        print(f"blocks per process: {[precond.owners.count(r) for r in range(world)]}")
        print("bytes per step and process: " + ", ".join(f"{k} {v:.0f}" for k, v in sent.items()))
        print(f"parameters identical on every process: {same}")
    precond.close()  # a collective: names a process that skipped an iteration
    dist.destroy_process_group()
    if not same:
        raise SystemExit("the processes diverged")


def _exit_without_teardown() -> None:
    """End a process whose work succeeded without the interpreter's teardown.

    With ``torch._dynamo`` imported (``DistributedDataParallel`` imports it), the final
    garbage collection of Python's shutdown, after ``destroy_process_group()``, sometimes
    hangs or aborts the process (``terminate called without an active exception``); see
    docs/distributed.md, "Exit". Only reached after ``main`` returned: an error still
    raises, with its traceback and a non-zero exit code.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawned(rank: int, world: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    main()
    _exit_without_teardown()


if __name__ == "__main__":
    if "RANK" in os.environ:  # started by torchrun
        main()
        _exit_without_teardown()
    else:  # plain python: start two processes on this machine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.multiprocessing.spawn(_spawned, args=(2,), nprocs=2)
