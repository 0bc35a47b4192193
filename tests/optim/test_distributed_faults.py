"""Failures of a distributed ``NaturalGradient`` on 2 gloo processes (issue #15, items 4-5).

One spawn runs every scenario, in order, on a process group with a short timeout
(:data:`GROUP_TIMEOUT_S`): a regression that leaves a process waiting fails the time limit
of its scenario instead of hanging the suite. Each scenario must end with the same error on
both processes, quickly, with the processes still in step (the next scenario trains
normally); the last one kills a process.

* a process that skips ``step()`` (on a curvature or a non-curvature step), skips
  ``backward()``, or resumes from another checkpoint: ``DistributedFailure`` naming which
  process is at which step;
* the same under ``DistributedDataParallel`` (issue #22), and a process that skips a whole
  iteration, found by the collective ``close()``: ``DistributedFailure`` naming it on every
  process within a second (before DDP's all-reduce, which gloo would pair with the wrong
  collective until the timeout);
* an empty batch, an error in the curvature update or a non-finite gradient on one process:
  that process's error, raised on every process and naming it;
* a process that dies: the survivor raises ``DistributedFailure`` naming the collective.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import curvlab
from tests.cases import CASES
from tests.optim.spawn import error_record, init_gloo, result_path, spawn_and_collect

WORLD = 2
GROUP_TIMEOUT_S = 10  # what a process that waits for a dead or diverged one pays
FAST_S = 5.0  # every scenario must fail within this (well below GROUP_TIMEOUT_S)
ITERATIONS = 4
N = 8  # samples per process and iteration


@dataclass(frozen=True)
class Fault:
    name: str
    variant: str | None  # what rank 1 does differently (see _train)
    distribution: str = "comm_opt"
    update_every: int = 1
    ddp: bool = False
    # the iteration rank 1 misbehaves at; under DDP after the second forward, which rebuilds
    # DDP's buckets with a broadcast before any preconditioner call (see docs/distributed.md)
    at: int = 1


FAULTS = [
    Fault("warm-up", None),  # lazy imports and first connections: not timed
    Fault("skip-step", "skip_step"),
    Fault("skip-non-curvature-step", "skip_step", update_every=2),
    Fault("skip-backward", "skip_backward"),
    Fault("ddp-skip-step", "skip_step", ddp=True, at=2),
    Fault("ddp-skip-backward", "skip_backward", ddp=True, at=2),
    Fault("ddp-skip-iteration", "skip_iteration", ddp=True, at=2),
    Fault("other-checkpoint", "checkpoint"),
    Fault("empty-batch", "empty_batch", ddp=True),
    Fault("accumulate-fails", "accumulate_fails"),
    Fault("nonfinite-gradient-comm_opt", "nan_gradient"),
    Fault("nonfinite-gradient-mem_opt", "nan_gradient", "mem_opt"),
    Fault("still-in-step", None),  # after every fault above, training works
    Fault("ddp-still-in-step", None, ddp=True),
    Fault("dead-process", "exit"),  # last: rank 1 is gone afterwards
]


def _case():
    return next(c for c in CASES if c.id == "mlp-ce-mean")


def _train(sc: Fault, rank: int, die: Callable[[], None]) -> dict[str, Any]:
    """A few natural-gradient steps; rank 1 misbehaves at iteration 1 as ``sc.variant`` says.
    Gradients are not averaged (except with DDP): only the preconditioner communicates."""
    model, loss_fn = _case().build(seed=0)
    forward = DistributedDataParallel(model) if sc.ddp else model
    backend = curvlab.make("kfac", model, loss_fn, fisher_type="exact")
    precond = curvlab.NaturalGradient(
        backend,
        damping=0.1,
        update_every=sc.update_every,
        invert_every=3,
        distribution=sc.distribution,
        kl_clip=None,
    )
    odd = rank == 1
    if sc.variant == "accumulate_fails" and odd:
        accumulate = backend.accumulate

        def failing(loss, **kwargs):
            if precond.steps == 1:
                raise RuntimeError("injected failure in the curvature update")
            accumulate(loss, **kwargs)

        backend.accumulate = failing  # type: ignore[method-assign]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    states = []
    for it in range(ITERATIONS):
        if sc.variant == "skip_iteration" and odd and it == sc.at:
            continue  # no forward, backward or step: found by close()
        if sc.variant == "checkpoint" and it == 2:  # rank 1 resumes from an older checkpoint
            precond.load_state_dict(states[0] if odd else states[1])
        x, y = _case().data(n=N, seed=100 * rank + it)
        if sc.variant == "empty_batch" and odd and it == 1:
            x, y = x[:0], y[:0]
        opt.zero_grad()
        if not (sc.variant == "skip_backward" and odd and it == sc.at):
            precond.backward(loss_fn(forward(x), y))
        if sc.variant == "exit" and odd and it == sc.at:
            die()
        if sc.variant == "nan_gradient" and odd and it == sc.at:
            model[0].weight.grad[0, 0] = float("nan")
        if not (sc.variant == "skip_step" and odd and it == sc.at):
            precond.step()
        opt.step()
        states.append(copy.deepcopy(precond.state_dict()))
    precond.close()  # a collective: every process closes after as many steps
    return {"steps": precond.steps, "closed": precond.closed}


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    init_gloo(rank, store_path, WORLD, timeout_s=GROUP_TIMEOUT_S)
    results: dict[str, Any] = {}
    path = result_path(out_dir, rank)

    def die() -> None:  # a process that crashes: no error, no clean shutdown
        torch.save(results, path)
        os._exit(0)

    try:
        for sc in FAULTS:
            dist.barrier()  # the clock starts when both processes do
            start = time.perf_counter()
            try:
                results[sc.name] = _train(sc, rank, die)
            except Exception as err:
                results[sc.name] = error_record(err)
            results[sc.name]["seconds"] = time.perf_counter() - start
    finally:
        torch.save(results, path)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("faults")
    return spawn_and_collect(_worker, tmp, WORLD, 60 + GROUP_TIMEOUT_S * len(FAULTS))


def _same_error(runs, name: str, within_s: float = FAST_S) -> tuple[str, str]:
    results = [r.get(name, {"error": None, "message": "(no result)"}) for r in runs]
    for rank, res in enumerate(results):
        assert "error" in res, f"{name}: process {rank} did not raise"
        assert res["seconds"] < within_s, f"{name}: process {rank} took {res['seconds']:.1f} s"
    assert results[0]["error"] == results[1]["error"], [r["message"] for r in results]
    assert results[0]["message"] == results[1]["message"]
    return results[0]["error"], results[0]["message"]


def _within_a_second_of_a_clean_run(runs) -> float:
    """A scenario that fails must end less than a second after a run without fault would
    (both start at a barrier; the clean run does every iteration and closes)."""
    return max(r["ddp-still-in-step"]["seconds"] for r in runs) + 1.0


@pytest.mark.slow  # the spawn: about 20 s
@pytest.mark.parametrize(
    ("name", "step"), [("skip-step", 1), ("skip-non-curvature-step", 1), ("ddp-skip-step", 2)]
)
def test_a_process_that_skips_a_step_is_named_on_every_process(runs, name, step) -> None:
    kind, message = _same_error(runs, name, _within_a_second_of_a_clean_run(runs))
    assert kind == "DistributedFailure"
    assert "the processes are out of step" in message
    assert f"process 0 is starting step {step} after 1 backward call," in message
    assert f"process 1 is starting backward() call 2 of step {step}" in message
    assert f"Likely: process 1 skipped step() {step} (it calls backward() again)" in message


@pytest.mark.slow  # the spawn: about 20 s
@pytest.mark.parametrize(("name", "step"), [("skip-backward", 1), ("ddp-skip-backward", 2)])
def test_a_process_that_skips_backward_is_named_on_every_process(runs, name, step) -> None:
    kind, message = _same_error(runs, name, _within_a_second_of_a_clean_run(runs))
    assert kind == "DistributedFailure"
    assert f"process 0 is starting backward() call 1 of step {step}" in message
    assert f"process 1 is starting step {step} after 0 backward calls" in message
    assert f"Likely: process 1 skipped backward() before step {step}" in message


@pytest.mark.slow  # the spawn: about 20 s
def test_a_process_that_skips_a_whole_iteration_is_named_by_close(runs) -> None:
    kind, message = _same_error(runs, "ddp-skip-iteration", _within_a_second_of_a_clean_run(runs))
    assert kind == "DistributedFailure"
    assert "process 0 is starting backward() call 1 of step 3" in message
    assert "process 1 is closing the preconditioner after 3 steps" in message
    assert "Likely: process 1 skipped a whole iteration" in message


@pytest.mark.slow  # the spawn: about 20 s
def test_processes_at_different_steps_are_named(runs) -> None:
    kind, message = _same_error(runs, "other-checkpoint")
    assert kind == "DistributedFailure"
    assert "process 0 is starting backward() call 1 of step 2," in message
    assert "process 1 is starting backward() call 1 of step 1" in message


@pytest.mark.slow  # the spawn: about 20 s
def test_an_empty_batch_on_one_process_raises_the_same_error_everywhere(runs) -> None:
    kind, message = _same_error(runs, "empty-batch")
    assert kind == "ValueError"
    assert message.startswith("NaturalGradient.backward failed on process 1 of 2")
    assert "the batch is empty (0 rows)" in message


@pytest.mark.slow  # the spawn: about 20 s
def test_an_error_in_one_process_curvature_update_raises_everywhere(runs) -> None:
    kind, message = _same_error(runs, "accumulate-fails")
    assert kind == "RuntimeError"
    assert "failed on process 1 of 2" in message
    assert "injected failure in the curvature update" in message


@pytest.mark.slow  # the spawn: about 20 s
@pytest.mark.parametrize("distribution", ["comm_opt", "mem_opt"])
def test_a_nonfinite_gradient_on_one_process_raises_everywhere(runs, distribution) -> None:
    kind, message = _same_error(runs, f"nonfinite-gradient-{distribution}")
    assert kind == "FloatingPointError"
    assert "NaturalGradient.step failed on process 1 of 2" in message
    assert "the gradient is not finite in ['0.weight']" in message


@pytest.mark.slow  # the spawn: about 20 s
@pytest.mark.parametrize("name", ["still-in-step", "ddp-still-in-step"])
def test_the_processes_stay_in_step_after_reported_failures(runs, name) -> None:
    for rank, r in enumerate(runs):
        res = r[name]
        assert "error" not in res, f"process {rank}: {res.get('traceback')}"
        assert res["steps"] == ITERATIONS
        assert res["closed"]  # the collective close() agreed


@pytest.mark.slow  # the spawn: about 20 s
def test_a_dead_process_is_reported_by_the_survivor(runs) -> None:
    res = runs[0]["dead-process"]
    assert res.get("error") == "DistributedFailure", res.get("traceback")
    assert res["seconds"] < FAST_S
    message = res["message"]
    assert "control all-gather (starting step 1) failed on process 0 of 2" in message
    assert "probably died" in message
    assert "init_process_group(timeout=" in message
    assert "dead-process" not in runs[1]  # it died before reporting


def test_an_empty_batch_on_one_process_is_named() -> None:
    """Without distribution: ``update``, ``accumulate`` and ``NaturalGradient`` name the
    empty batch (a mean over no rows is NaN: not reported as a non-finite loss)."""
    model, loss_fn = _case().build(seed=0)
    x, y = _case().data(n=4, seed=0)
    x, y = x[:0], y[:0]
    backend = curvlab.make("kfac", model, loss_fn)
    empty = r"CrossEntropyLoss: the batch is empty \(0 rows\); no curvature can be taken"
    with pytest.raises(ValueError, match=empty):
        backend.update(x, y)
    with backend.recording():
        loss = loss_fn(model(x), y)
    with pytest.raises(ValueError, match=empty):
        backend.accumulate(loss)
    precond = curvlab.NaturalGradient(curvlab.make("kfac", model, loss_fn), kl_clip=None)
    with pytest.raises(ValueError, match=empty):
        precond.backward(loss_fn(model(x), y))
