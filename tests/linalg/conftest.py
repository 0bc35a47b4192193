"""Single-threaded BLAS/OpenMP for the linalg tests.

The tests mix torch (OpenMP threads that spin-wait after each op) and numpy/scipy (OpenBLAS
threads). On a small machine the two pools oversubscribe the cores and tiny dense ops become
100× slower; the matrices here are at most 256×256, so one thread is fastest.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _single_threaded() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        yield
    else:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(previous)
