"""Gloo worker processes for the distributed tests: start, wait, collect their results.

A worker is ``worker(rank, store_path, out_dir)``; it writes its results to
``out_dir/rank{rank}.pt`` (see :func:`result_path`), also when it fails.
"""

from __future__ import annotations

import datetime
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def init_gloo(rank: int, store_path: str, world: int, timeout_s: float) -> None:
    """One thread, a gloo group over a file store with the given timeout."""
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group(
        "gloo",
        store=store,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def result_path(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / f"rank{rank}.pt"


def error_record(err: Exception) -> dict[str, Any]:
    """What a scenario that raised records: the error's type, message and traceback."""
    return {"error": type(err).__name__, "message": str(err), "traceback": traceback.format_exc()}


def spawn_and_collect(
    worker: Callable[[int, str, str], None], tmp: Path, world: int, limit_s: float
) -> list[dict[str, Any]]:
    """Run ``world`` workers (spawned, daemon) and return each one's results; fails if one
    is still running after ``limit_s`` seconds (it is killed) or left no results."""
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=worker, args=(rank, str(tmp / "store"), str(tmp)), daemon=True)
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(limit_s)
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"distributed workers {hung} did not finish within {limit_s} s"
    codes = [p.exitcode for p in procs]
    files = [result_path(tmp, rank) for rank in range(world)]
    assert all(f.exists() for f in files), f"workers exited with {codes} without results"
    return [torch.load(f, weights_only=False) for f in files]
