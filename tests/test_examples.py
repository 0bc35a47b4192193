"""Every tutorial script in ``examples/`` runs to completion (each in its own process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if "distributed" not in p.name)
# over 15 s each on 2 cores: run by `make test-slow` (CI), and by `make docs`, which executes
# every tutorial too
SLOW = {
    "plot_acktr_cartpole.py",  # tests/test_example_acktr.py runs a short version
    "plot_any_model.py",
    "plot_ablation.py",
    "plot_laplace.py",
    "plot_spectrum.py",
    "plot_natural_gradient_training.py",
    "plot_noisy_kfac.py",
}


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in SLOW else [])
        for p in EXAMPLES
    ],
)
def test_example_runs(script: Path) -> None:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout}\n{done.stderr}"
