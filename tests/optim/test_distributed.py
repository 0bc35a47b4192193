"""Distributed ``NaturalGradient`` on 2 gloo processes started from pytest (no launcher).

One spawn runs every scenario (starting processes costs seconds, the scenarios are tiny);
each process writes its results to a file and the tests compare them with single-process
references computed here, in float64:

* the curvature after one step on 2 processes × part of the batch equals the full batch's;
* preconditioned gradients, and parameters after three training steps, equal the
  single-process run (rtol 1e-10) and are bit-identical across the processes;
* each process decomposes exactly the blocks :func:`curvlab.optim.distributed.assign_blocks`
  gives it; with ``"comm_opt"`` decompositions travel, with ``"mem_opt"`` gradients;
* ``examples/distributed_kfac.py`` runs under ``python -m torch.distributed.run``;
* faults: a NaN loss or Inf statistics on one process, a failing solve on the owner, a
  damping that differs and a model that differs make every process raise the same error;
* a parameter without gradient on every process is skipped as with one process (as
  ``torch.optim`` skips it); on one process only, every process raises the same error;
* strategy objects (:mod:`curvlab.optim.strategies`) passed as ``distribution=`` — also a
  subclass that assigns the blocks itself — train like the string options.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import curvlab
from curvlab.optim.distributed import assign_blocks
from tests.cases import CASES
from tests.optim.spawn import error_record, init_gloo, result_path, spawn_and_collect

WORLD = 2
STEPS = 3
INVERT_EVERY = 2  # inversions at steps 0 and 2, held decompositions at step 1
LR, DAMPING = 0.1, 0.1
N = 8  # full batch
TIMEOUT_S = 150


@dataclass(frozen=True)
class Scenario:
    name: str
    backend: str
    kwargs: dict[str, Any]
    case: str  # a tests.cases id
    distribution: str = "comm_opt"
    # how gradients are averaged: "ddp" (the curvature gets ddp.module), "ddp_wrapper" (the
    # curvature gets the DDP wrapper itself) or "manual" (sample-weighted all-reduce)
    grads: str = "ddp"
    split: tuple[int, ...] = (4, 4)  # samples per process
    variant: str | None = None  # a fault, or another way of training (see _train)
    damping: float = DAMPING


EXACT = {"fisher_type": "exact"}
TRAINING = [
    Scenario(f"{name}-{dist_}", backend, kw, case, dist_, grads, split)
    for name, backend, kw, case, grads, split in [
        ("kfac-exact", "kfac", EXACT, "mlp-ce-mean", "ddp", (4, 4)),
        ("kfac-factored", "kfac", {**EXACT, "damping_mode": "factored"}, "mlp-ce-mean",
         "ddp_wrapper", (4, 4)),
        ("kfc-conv", "kfc", EXACT, "conv2d-ce-mean", "ddp", (4, 4)),
        # full-rank factors: EKFAC's eigenbasis is unique (up to signs), so comparable
        ("ekfac", "ekfac", EXACT, "mlp-mse-mean", "ddp", (4, 4)),
        ("exact-fisher", "exact_fisher", {}, "mlp-ce-mean", "ddp", (4, 4)),
        ("block-diagonal-sum", "block_diagonal", {}, "mlp-mse-sum", "manual", (3, 5)),
        ("kfac-tridiagonal", "block_tridiagonal_kfac", EXACT, "mlp-ce-mean", "ddp", (4, 4)),
        ("block-tridiagonal", "block_tridiagonal", {}, "mlp-bce-mean", "manual", (5, 3)),
    ]
    for dist_ in ("comm_opt", "mem_opt")
]  # fmt: skip
FAULTS = [
    Scenario("nan-loss", "kfac", EXACT, "mlp-ce-mean", grads="manual", variant="nan_input"),
    Scenario("inf-statistics", "kfac", EXACT, "mlp-ce-mean", grads="manual", variant="inf_sums"),
    Scenario("singular-solve", "kfac", EXACT, "mlp-ce-mean", "mem_opt", "manual", damping=0.0),
    Scenario("damping-differs", "kfac", EXACT, "mlp-ce-mean", grads="manual", variant="damping"),
    Scenario("model-differs", "kfac", EXACT, "mlp-ce-mean", grads="manual", variant="model"),
    Scenario("weights-differ", "kfac", EXACT, "mlp-ce-mean", grads="manual", variant="weights"),
    Scenario("grad-none-on-1", "kfac", EXACT, "mlp-ce-mean", grads="manual",
             variant="grad_none_on_1"),
]  # fmt: skip
GRAD_NONE = "0.bias"  # the parameter the "grad_none" variants leave without gradient
OTHER = [
    Scenario("kfac-lm", "kfac", {**EXACT, "damping_mode": "factored"}, "mlp-ce-mean",
             variant="levenberg_marquardt"),
    Scenario("grad-none-comm_opt", "kfac", EXACT, "mlp-ce-mean", grads="manual",
             variant="grad_none"),
    Scenario("grad-none-mem_opt", "kfac", EXACT, "mlp-ce-mean", "mem_opt", "manual",
             variant="grad_none"),
    Scenario("memopt-object", "kfac", EXACT, "mlp-ce-mean", "mem_opt", variant="object"),
    Scenario("all-blocks-on-1", "kfac", EXACT, "mlp-ce-mean", "comm_opt",
             variant="custom_strategy"),
    Scenario("kfac-resume-comm_opt", "kfac", EXACT, "mlp-ce-mean", variant="resume"),
    Scenario("kfac-resume-mem_opt", "kfac", EXACT, "mlp-ce-mean", "mem_opt", variant="resume"),
]  # fmt: skip
SCENARIOS = TRAINING + FAULTS + OTHER


def _case(name: str):
    return next(c for c in CASES if c.id == name)


def _batches(sc: Scenario) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [_case(sc.case).data(n=N, seed=10 + step) for step in range(STEPS)]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


# --- what every process runs ------------------------------------------------------------


_REFERENCES: dict[str, dict[str, Any]] = {}


def _reference(sc: Scenario) -> dict[str, Any]:
    if sc.name not in _REFERENCES:
        _REFERENCES[sc.name] = _train(sc, rank=None)
    return _REFERENCES[sc.name]


class _AllBlocksOnProcess1(curvlab.optim.CommOpt):
    """A user's strategy: process 1 decomposes every block (the default spreads them)."""

    name = "all_on_1"

    def assign(self, costs, world_size):
        return [1] * len(costs)


def _distribution(sc: Scenario, rank: int | None) -> str | curvlab.optim.Distribution:
    if rank is None:
        return "local"
    if sc.variant == "object":
        return curvlab.optim.MemOpt()
    if sc.variant == "custom_strategy":
        return _AllBlocksOnProcess1()
    return sc.distribution


def _train(sc: Scenario, rank: int | None) -> dict[str, Any]:
    """Three steps of SGD on natural gradients; ``rank=None``: the single-process reference
    on the full batch."""
    case = _case(sc.case)
    model, loss_fn = case.build(seed=0)
    if rank is not None and sc.variant == "weights" and rank == 1:
        with torch.no_grad():
            model[0].weight[0, 0] += 1.0  # another initialisation, no DDP to broadcast it
    if rank is not None and sc.variant == "model":
        if rank == 1:
            model[2] = nn.Linear(4, 3, bias=False).to(torch.float64)
    forward: nn.Module = model
    target: nn.Module = model
    if rank is not None and sc.grads.startswith("ddp"):
        forward = DistributedDataParallel(model)
        target = forward if sc.grads == "ddp_wrapper" else model
    damping: Any = sc.damping + (0.1 if sc.variant == "damping" and rank == 1 else 0.0)
    if sc.variant == "levenberg_marquardt":
        damping = curvlab.LevenbergMarquardt(initial=1.0, interval=1)

    def build() -> curvlab.NaturalGradient:
        backend = curvlab.make(sc.backend, target, loss_fn, **sc.kwargs)
        return curvlab.NaturalGradient(
            backend,
            damping=damping,
            invert_every=INVERT_EVERY,
            lr=LR,
            distribution=_distribution(sc, rank),
            kl_clip=None,
        )

    precond = build()
    backend = precond.curvature
    if sc.variant == "inf_sums" and rank == 1:
        sums = backend._sums

        def poisoned():
            out = sums()
            out[0].tensor[0, 0] = float("inf")
            return out

        backend._sums = poisoned  # type: ignore[method-assign]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    start = 0 if rank is None else sum(sc.split[:rank])
    stop = N if rank is None else start + sc.split[rank]
    result: dict[str, Any] = {"natural": []}
    for step, (x, y) in enumerate(_batches(sc)):
        x, y = x[start:stop], y[start:stop]
        if sc.variant == "nan_input" and rank == 1:
            x = x.clone()
            x[0, 0] = float("nan")
        if sc.variant == "resume" and step == 1:  # a checkpoint taken between inversions
            state = copy.deepcopy(precond.state_dict())
            precond = build()
            precond.load_state_dict(state)
            backend = precond.curvature
        opt.zero_grad()
        precond.backward(loss_fn(forward(x), y))
        if rank is not None and sc.grads == "manual":
            share = 1.0 if loss_fn.reduction == "sum" else (stop - start) / N
            for p in model.parameters():
                p.grad.mul_(share)
                dist.all_reduce(p.grad)
        if sc.variant == "grad_none" or (sc.variant == "grad_none_on_1" and rank == 1):
            model.get_parameter(GRAD_NONE).grad = None  # e.g. a module this step did not use
        precond.step(lambda x=x, y=y: loss_fn(model(x), y))
        if step == 0:
            result["dense"] = backend.to_dense()
        result["natural"].append(
            _flat(p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters())
        )
        result["grad_none"] = model.get_parameter(GRAD_NONE).grad is None
        opt.step()
    result["params"] = _flat(model.parameters())
    result["decompositions"] = backend.num_decompositions
    result["owners"] = precond.owners
    result["costs"] = [b.cost for b in precond.blocks]
    result["bytes"] = dict(precond.comm.bytes) if precond.comm is not None else {}
    result["damping"] = precond.current_damping()
    result["distribution"] = precond.distribution
    return result


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    init_gloo(rank, store_path, WORLD, timeout_s=60)
    results: dict[str, Any] = {}
    try:
        for sc in SCENARIOS:
            try:
                results[sc.name] = _train(sc, rank)
            except Exception as err:
                results[sc.name] = error_record(err)
    finally:
        torch.save(results, result_path(out_dir, rank))
        dist.destroy_process_group()


# --- the tests ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict[str, Any]]:
    """Both processes' results, per scenario name."""
    tmp = tmp_path_factory.mktemp("distributed")
    return spawn_and_collect(_worker, tmp, WORLD, TIMEOUT_S)


def _ok(runs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    results = [r[name] for r in runs]
    for rank, res in enumerate(results):
        assert "error" not in res, f"process {rank} failed in {name}:\n{res.get('traceback')}"
    return results


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sc", TRAINING, ids=lambda s: s.name)
def test_two_processes_train_like_one(runs, sc: Scenario) -> None:
    results = _ok(runs, sc.name)
    reference = _reference(sc)
    for res in results:
        _close(res["dense"], reference["dense"])  # the curvature of the full batch
        for got, expected in zip(res["natural"], reference["natural"]):
            _close(got, expected)
        _close(res["params"], reference["params"])
    # the processes agree bit for bit
    assert torch.equal(results[0]["params"], results[1]["params"])
    assert all(torch.equal(a, b) for a, b in zip(results[0]["natural"], results[1]["natural"]))


@pytest.mark.parametrize("sc", TRAINING, ids=lambda s: s.name)
def test_each_process_decomposes_its_share(runs, sc: Scenario) -> None:
    results = _ok(runs, sc.name)
    owners = assign_blocks(results[0]["costs"], WORLD)
    assert all(res["owners"] == owners for res in results)
    per_block = 0 if sc.backend == "ekfac" else 1  # EKFAC's basis is fixed with the statistics
    inversions = len(range(0, STEPS, INVERT_EVERY))
    for rank, res in enumerate(results):
        assert res["decompositions"] == inversions * per_block * owners.count(rank)
    reference = _reference(sc)
    assert sum(res["decompositions"] for res in results) == reference["decompositions"]
    sent = results[0]["bytes"]
    assert sent["statistics"] > 0
    if sc.distribution == "comm_opt":
        assert sent["gradients"] == 0
        assert (sent["decompositions"] > 0) == (sc.backend != "ekfac")
    else:
        assert sent["decompositions"] == 0 and sent["gradients"] > 0


@pytest.mark.parametrize("sc", OTHER, ids=lambda s: s.name)
def test_adapted_damping_and_checkpoints_agree_with_one_process(runs, sc: Scenario) -> None:
    """Levenberg-Marquardt ρ is averaged over the processes (each sees half the batch);
    a checkpoint taken between inversions resumes with shared decompositions."""
    results = _ok(runs, sc.name)
    reference = _reference(sc)
    for res in results:
        _close(res["params"], reference["params"])
        assert res["damping"] == pytest.approx(reference["damping"], rel=1e-10)
    assert torch.equal(results[0]["params"], results[1]["params"])
    if sc.variant == "levenberg_marquardt":
        assert reference["damping"] != 1.0  # it adapted


def _same_error(runs, name: str) -> tuple[str, str]:
    results = [r[name] for r in runs]
    assert all("error" in res for res in results), f"{name}: not every process raised"
    assert results[0]["error"] == results[1]["error"]
    assert results[0]["message"] == results[1]["message"]
    return results[0]["error"], results[0]["message"]


def test_a_nan_loss_on_one_process_raises_on_every_process(runs) -> None:
    kind, message = _same_error(runs, "nan-loss")
    assert kind == "FloatingPointError"
    assert "loss was not finite in 1 curvature batch(es) over the 2 processes" in message


def test_inf_statistics_on_one_process_raise_on_every_process(runs) -> None:
    kind, message = _same_error(runs, "inf-statistics")
    assert kind == "FloatingPointError"
    assert "not finite (NaN or Inf on at least one process) in: layer '0' (Linear) A" in message


def test_a_failing_solve_on_its_owner_raises_on_every_process(runs) -> None:
    kind, message = _same_error(runs, "singular-solve")
    assert kind == "LinAlgError"
    assert "preconditioning failed on process" in message and "singular" in message


def test_a_damping_that_differs_is_reported(runs) -> None:
    kind, message = _same_error(runs, "damping-differs")
    assert kind == "DistributedFailure"
    assert "damping differs across processes ([0.1, 0.2])" in message


def test_a_model_that_differs_is_reported_at_construction(runs) -> None:
    kind, message = _same_error(runs, "model-differs")
    assert kind == "DistributedFailure"
    assert "the model differs across processes: process 1 has" in message
    assert "where process 0 has 'parameter 2.bias (3,) torch.float64'" in message


def test_ranks_that_start_from_different_weights_are_reported_at_construction(runs) -> None:
    kind, message = _same_error(runs, "weights-differ")
    assert kind == "DistributedFailure"
    assert "process 1 has 'values of parameter 0.weight: sum" in message
    assert "DistributedDataParallel or broadcast it" in message


@pytest.mark.parametrize("name", ["grad-none-comm_opt", "grad-none-mem_opt"])
def test_a_parameter_without_gradient_is_skipped_as_with_one_process(runs, name) -> None:
    """Left without ``.grad`` on every process, a parameter is skipped as ``torch.optim``
    skips it (and as one process does): the same steps as the single-process run."""
    results = _ok(runs, name)
    reference = _reference(next(sc for sc in SCENARIOS if sc.name == name))
    assert reference["grad_none"] and all(res["grad_none"] for res in results)
    for res in results:
        for got, expected in zip(res["natural"], reference["natural"]):
            _close(got, expected)
        _close(res["params"], reference["params"])
    assert torch.equal(results[0]["params"], results[1]["params"])


def test_a_parameter_without_gradient_on_one_process_raises_on_every_process(runs) -> None:
    kind, message = _same_error(runs, "grad-none-on-1")
    assert kind == "RuntimeError"
    assert "the parameters without a gradient differ across processes (here: ['0.bias']" in (
        message
    )


def test_comm_opt_and_mem_opt_take_the_same_steps(runs) -> None:
    for sc in TRAINING:
        if sc.distribution != "comm_opt":
            continue
        comm = _ok(runs, sc.name)[0]
        mem = _ok(runs, sc.name.replace("comm_opt", "mem_opt"))[0]
        for a, b in zip(comm["natural"], mem["natural"]):
            _close(a, b)
        _close(comm["params"], mem["params"])


def test_strategy_objects_train_like_the_string_options(runs) -> None:
    """``distribution=MemOpt()`` and a subclass of ``CommOpt`` with its own block
    assignment (process 1 decomposes everything) train like one process."""
    for name, distribution, owner in (
        ("memopt-object", "mem_opt", None),
        ("all-blocks-on-1", "all_on_1", 1),
    ):
        results = _ok(runs, name)
        reference = _reference(next(sc for sc in SCENARIOS if sc.name == name))
        for res in results:
            assert res["distribution"] == distribution
            _close(res["params"], reference["params"])
        assert torch.equal(results[0]["params"], results[1]["params"])
        if owner is not None:
            assert all(set(res["owners"]) == {owner} for res in results)
            assert results[0]["decompositions"] == 0 and results[1]["decompositions"] > 0


def test_without_a_process_group_nothing_is_distributed() -> None:
    case = _case("mlp-ce-mean")
    model, loss_fn = case.build()
    precond = curvlab.NaturalGradient(
        curvlab.KFAC(model, loss_fn), distribution="mem_opt", kl_clip=None
    )
    assert precond.comm is None and precond.distribution == "local"
    with pytest.raises(ValueError, match="unknown distribution 'everywhere'"):
        curvlab.NaturalGradient(
            curvlab.KFAC(model, loss_fn), distribution="everywhere", kl_clip=None
        )


def test_assign_blocks_is_greedy_longest_processing_time() -> None:
    assert assign_blocks([1.0, 8.0, 3.0, 5.0], 2) == [0, 0, 1, 1]
    assert assign_blocks([0.0, 0.0, 0.0], 2) == [0, 1, 0]  # ties: fewer blocks first
    assert assign_blocks([2.0, 2.0], 1) == [0, 0]
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        assign_blocks([1.0], 0)


def test_the_example_runs_under_torchrun() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(root / "examples" / "distributed_kfac.py")]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout}\n{done.stderr}"
    assert "2 processes, distribution comm_opt" in done.stdout
    assert "parameters identical on every process: True" in done.stdout
    accuracy = float(re.findall(r"test accuracy ([0-9.]+)", done.stdout)[-1])
    assert accuracy > 0.85
