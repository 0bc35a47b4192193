"""Cost measurements of an ablation: wall-clock and peak tensor memory, on any device."""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the ``with`` block, on any device.

    Every ATen call made inside the block (autograd's backward and BackPACK's hooks
    included) is seen here; a storage counts from the first op that returns it until the
    last tensor viewing it is freed. Storages that existed before the block (the model,
    the data, gradients updated in place) are not counted. Slower than the code it
    measures: time separately.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # nothing here is compiled: skip torch's dynamo guard, whose import costs seconds
        return False

    def __init__(self) -> None:
        super().__init__()
        self.live = 0  # bytes currently held by storages created inside the block
        self.peak = 0
        self._views: dict[int, list[int]] = {}  # storage address -> [tensors alive, bytes]

    def _release(self, address: int) -> None:
        entry = self._views[address]
        entry[0] -= 1
        if entry[0] == 0:
            del self._views[address]
            self.live -= entry[1]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {_address(t) for t in tree_flatten((args, kwargs))[0] if _is_real_tensor(t)}
        for t in tree_flatten(out)[0]:
            if not _is_real_tensor(t):
                continue
            storage = t.untyped_storage()
            address = storage.data_ptr()
            if address == 0:
                continue
            entry = self._views.get(address)
            if entry is None and address in inputs:
                continue  # an in-place result or a view of a storage made before the block
            if entry is None:
                entry = self._views[address] = [0, storage.nbytes()]
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(t, self._release, address)
        return out


def _is_real_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "meta"


def _address(t: torch.Tensor) -> int:
    return int(t.untyped_storage().data_ptr())


class Stopwatch:
    """Seconds spent inside ``with watch.running(device):`` blocks, summed.

    On CUDA the device is synchronised before reading the clock, so the time is the
    device's, not the launch queue's.
    """

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def running(self, device: torch.device) -> Iterator[None]:
        _synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(device)
            self.seconds += time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
