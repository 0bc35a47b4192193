"""How distributed runs end (issue #22, item 4).

* the messages that name a process out of step (built from the control all-gather's rows,
  so checked here without processes);
* the exit abort: ``examples/distributed_kfac.py`` run repeatedly as two gloo processes
  (``env://``, process 0 hosts the store) exits cleanly every time — no ``SIGABRT``
  (``terminate called without an active exception``), no hang at shutdown.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path
from types import ModuleType

import pytest

from curvlab.optim.distributed import _PHASE_BASE, CONTROL_WIDTH, PHASES, _describe, _skipped

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_RUNS = 5
EXAMPLE_TIMEOUT_S = 120


def _row(phase: str, step: int, calls: int) -> list[float]:
    row = [_PHASE_BASE + PHASES.index(phase), float(step), float(calls)]
    return row + [0.0] * (CONTROL_WIDTH - len(row))


@pytest.mark.parametrize(
    ("rows", "says"),
    [
        (
            [_row("step", 1, 1), _row("backward", 1, 1)],
            "process 1 skipped step() 1 (it calls backward() again)",
        ),
        (
            [_row("backward", 1, 1), _row("step", 1, 1)],
            "process 0 skipped step() 1 (calling backward() again)",
        ),
        (
            [_row("backward", 2, 0), _row("step", 2, 0)],
            "process 1 skipped backward() before step 2",
        ),
        (
            [_row("backward", 3, 0), _row("close", 3, 0)],
            "process 1 skipped a whole iteration: it closes after 3 steps while process 0",
        ),
        (
            [_row("close", 3, 0), _row("backward", 3, 0), _row("close", 3, 0)],
            "process 1 runs one iteration more than the others",
        ),
        (
            [_row("backward", 2, 0), _row("backward", 1, 0)],
            "process 1 is at step 1 where process 0 is at step 2",
        ),
    ],
)
def test_the_process_that_skipped_is_named(rows, says) -> None:
    assert says in _skipped(rows)


def test_nothing_is_guessed_when_the_processes_agree_or_cannot_be_told_apart() -> None:
    assert _skipped([_row("step", 1, 1), _row("step", 1, 1)]) == ""
    assert _skipped([_row("construction", 0, 0), _row("decompositions", 0, 0)]) == ""


def test_every_phase_is_described() -> None:
    assert _describe(_row("backward", 2, 0)) == "starting backward() call 1 of step 2"
    assert _describe(_row("close", 1, 0)) == "closing the preconditioner after 1 step"
    assert _describe(_row("close", 3, 2)) == (
        "closing the preconditioner after 3 steps and 2 more backward calls"
    )
    assert _describe(_row("step", 4, 1)) == "starting step 4 after 1 backward call"


def _stress_script() -> ModuleType:
    """scripts/distributed_exit_stress.py, whose ``run_pair`` starts the two processes."""
    path = ROOT / "scripts" / "distributed_exit_stress.py"
    spec = importlib.util.spec_from_file_location("distributed_exit_stress", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_example_once() -> list[tuple[int, str, str]]:
    command = [sys.executable, str(ROOT / "examples" / "distributed_kfac.py")]
    return list(_stress_script().run_pair(command, EXAMPLE_TIMEOUT_S))


@pytest.mark.slow  # five runs of the example: 1-2 minutes
def test_the_example_exits_cleanly_every_time() -> None:
    for run in range(EXAMPLE_RUNS):
        for rank, (code, out, err) in enumerate(_run_example_once()):
            assert code != -signal.SIGABRT and "terminate called" not in err, (
                f"run {run}: process {rank} aborted at exit:\n{err[-3000:]}"
            )
            assert code == 0, f"run {run}: process {rank} exited with {code}:\n{err[-3000:]}"
            if rank == 0:
                assert "parameters identical on every process: True" in out
