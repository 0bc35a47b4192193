"""A short run of the ACKTR tutorial (examples/plot_acktr_cartpole.py; the full one is slow)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium", reason="the rl extra (pip install 'curvlab[rl]')")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "plot_acktr_cartpole.py"


def test_every_method_trains_a_few_batches() -> None:
    spec = importlib.util.spec_from_file_location("plot_acktr_cartpole", SCRIPT)
    assert spec is not None and spec.loader is not None
    tutorial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tutorial)  # defines everything; trains only under __main__
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is the fastest
    try:
        curves = tutorial.main(iterations=3, seeds=(0,), plot=False)
    finally:
        torch.set_num_threads(threads)
    assert set(curves) == {"ACKTR", "Adam PG", "PPO"}
    for curve in curves.values():
        assert curve.shape == (3, 1)
        # a nearly uniform first policy ends episodes within a batch: returns are counted
        assert np.isfinite(curve).all() and (curve >= 8).all() and (curve <= 500).all()
