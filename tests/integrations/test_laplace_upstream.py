"""laplace-torch's own backend-parametrised tests with curvlab's backends added
(``scripts/laplace_upstream_tests.py --curvlab-only``): every failing cell of curvlab's is
one the script explains, and no explained failure passes (the script checks both ways)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("laplace", reason="the laplace extra: pip install 'curvlab[laplace]'")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "laplace_upstream_tests.py"


@pytest.mark.slow
def test_curvlab_cells_of_laplace_torch_tests_fail_only_as_explained():
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--curvlab-only"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert "UNEXPLAINED FAILURE" not in run.stdout and "EXPECTED FAILURE PASSES" not in run.stdout
    total = next(line for line in run.stdout.splitlines() if line.startswith("total"))
    passed = int(total.split()[1].split("/")[0])
    assert passed > 0, tail  # the cells ran
