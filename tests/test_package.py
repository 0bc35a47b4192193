"""The installed package: its public names, what ``import curvlab`` loads, and that type
checkers read its annotations (PEP 561 ``py.typed``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import curvlab

ROOT = Path(__file__).resolve().parents[1]


def test_dir_lists_the_public_names_only() -> None:
    assert dir(curvlab) == sorted([*curvlab.__all__, "__version__"])
    for name in curvlab.__all__:
        assert getattr(curvlab, name) is not None, name
    for helper in ("Any", "TYPE_CHECKING", "importlib", "annotations"):
        assert not hasattr(curvlab, helper), helper


def test_import_curvlab_leaves_the_research_harness_unloaded() -> None:
    """``import curvlab`` needs none of the ``ablate`` extra (scikit-learn, matplotlib)."""
    code = (
        "import sys, curvlab\n"
        "heavy = [m for m in ('curvlab.ablation', 'matplotlib', 'sklearn') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(curvlab.ablation.quality)  # loaded on first use\n"
        "assert 'matplotlib' not in sys.modules and 'sklearn' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# A user's script: the lines marked `# error: CODE` must be reported with that code, every
# other line must type-check, and reveal_type must show curvlab's own annotations.
USER_SCRIPT = """\
import torch
from torch import nn

import curvlab

model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
kfac: curvlab.KFAC = curvlab.KFAC(model, nn.MSELoss(), fisher_type="exact")
kfac.update(torch.randn(8, 3), torch.randn(8, 2))
curvature: curvlab.Curvature = curvlab.make("diagonal", model, nn.MSELoss())
gradient = [torch.zeros_like(p) for p in kfac.params]
step = kfac.solve(gradient, 1e-3)
reveal_type(step)
reveal_type(kfac.factors()[0].A)
reveal_type(curvlab.ablation.quality)
sgd = torch.optim.SGD(model.parameters(), lr=0.1)
preconditioner = curvlab.NaturalGradient(kfac, damping=1e-3, optimizer=sgd)
kfac.solve(step, damping="large")  # error: arg-type
curvlab.no_such_name  # error: attr-defined
"""


@pytest.mark.slow  # builds a wheel and runs mypy over torch's annotations (~20 s)
def test_mypy_reads_the_installed_package(tmp_path: Path) -> None:
    """Build curvlab's wheel, unpack it as a site-packages folder and type-check a user's
    script against it: a package without ``py.typed`` would be skipped (``import-untyped``)
    and every curvlab name would read as ``Any``."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "curvlab", source / "curvlab", ignore=shutil.ignore_patterns("__pycache__")
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(wheels), str(source)],
        check=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("curvlab-*.whl")
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as archive:
        assert "curvlab/py.typed" in archive.namelist()
        archive.extractall(site)
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "", "--cache-dir",
         str(tmp_path / "cache"), "--show-error-codes", "--no-error-summary", script.name],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )  # fmt: skip
    errors = dict(re.findall(r"user_script\.py:(\d+): error: .*\[([\w-]+)\]$", run.stdout, re.M))
    expected = {
        str(number): re.search(r"# error: ([\w-]+)", line).group(1)  # type: ignore[union-attr]
        for number, line in enumerate(USER_SCRIPT.splitlines(), start=1)
        if "# error:" in line
    }
    assert errors == expected, run.stdout + run.stderr
    revealed = re.findall(r'Revealed type is "(.*)"', run.stdout)
    assert re.fullmatch(r"(builtins\.)?list\[torch\._tensor\.Tensor\]", revealed[0]), revealed
    assert revealed[1] == "torch._tensor.Tensor", revealed
    assert "-> curvlab.ablation.metrics.QualityReport" in revealed[2], revealed
