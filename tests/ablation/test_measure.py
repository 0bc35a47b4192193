"""Cost measurements and figures of ``curvlab.ablation``."""

from __future__ import annotations

import pytest
import torch

from curvlab.ablation import Curve, PeakTensorMemory, RaceResult, Stopwatch, plot_loss


def test_peak_tensor_memory_counts_storages_alive_together() -> None:
    with PeakTensorMemory() as memory:
        a = torch.zeros(1000, dtype=torch.float64)  # 8000 bytes
        b = a + 1  # another 8000: both alive
        view = b[:10]  # a view allocates no storage
        del a, b
        c = torch.zeros(250, dtype=torch.float32)  # 1000 bytes, after a's storage was freed
    assert memory.peak == 16000
    assert memory.live == 8000 + 1000  # b's storage lives on through the view, and c
    del view, c


def test_peak_tensor_memory_ignores_tensors_made_before() -> None:
    big = torch.zeros(10_000)
    with PeakTensorMemory() as memory:
        big.mul_(2.0)  # in place: the storage existed before the block
    assert memory.peak == 0


def test_stopwatch_sums_its_blocks() -> None:
    watch = Stopwatch()
    for _ in range(2):
        with watch.running(torch.device("cpu")):
            torch.randn(64, 64) @ torch.randn(64, 64)
    first = watch.seconds
    assert first > 0.0
    with watch.running(torch.device("cpu")):
        pass
    assert watch.seconds >= first


def test_plot_loss_names_the_valid_axes() -> None:
    curve = Curve("SGD", "sgd", None, 0.1, None, [0, 1], [0.0, 0.1], [1.0, 0.5], [1.0, 0.6],
                  None, None)  # fmt: skip
    result = RaceResult([curve], target_loss=0.5, settings={})
    with pytest.raises(ValueError, match="x must be one of iterations, seconds, got 'time'"):
        plot_loss(result, "time")
    fig = plot_loss(result, "seconds")
    assert fig.axes[0].get_xlabel() == "wall-clock seconds"
