"""Shared pieces of the block-tridiagonal approximations (concepts/block_tridiagonal.md#the-math).

* :class:`ForwardOrder` records the order in which the forward pass calls the layers —
  the chain ``w_1 — w_2 — … — w_ℓ`` of the Gaussian graphical model follows it.
* :func:`chain_completion` is the dense maximum-entropy completion ``F̂`` of prescribed
  diagonal and first off-diagonal blocks: ``F̂_{i,j} = Ψ_i F̂_{i+1,j}`` for ``j > i`` with
  ``Ψ_i = F_{i,i+1} F_{i+1,i+1}⁺``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from curvlab.extraction.hooks import HookOwner, HookSet


class ForwardOrder(HookOwner):
    """Forward pre-hooks recording the call order of ``modules`` in each forward pass.

    ``strict``: every module must be called exactly once per forward. Otherwise a module
    is placed at its first call, and one never called through its own ``forward`` (e.g.
    ``out_proj`` inside ``nn.MultiheadAttention``, which calls it functionally) right after
    its nearest called ancestor (or at the end).

    The hooks hold this object through weak references (a :class:`HookSet`): they are
    removed by :meth:`close` (the curvature holding it closes it) or when it is garbage.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[nn.Module],
        names: Sequence[str],
        owner: str,
        strict: bool = True,
    ) -> None:
        self.names = list(names)
        self.owner = owner
        self.strict = strict
        self.calls: list[int] = []
        self.order: list[int] | None = None
        self._hooks = HookSet(self)
        self._hooks.forward_pre(model, "_begin")
        for index, module in enumerate(modules):
            self._hooks.forward_pre(module, "_called", index)

    def _begin(self, module: nn.Module, args: tuple[object, ...]) -> None:
        self.calls.clear()

    def _called(self, index: int, module: nn.Module, args: tuple[object, ...]) -> None:
        self._record(index)

    def _record(self, index: int) -> None:
        if index in self.calls and not self.strict:
            return
        if index in self.calls:
            raise RuntimeError(
                f"{self.owner}: layer '{self.names[index]}' was called twice in one forward "
                "pass; every layer must be called exactly once to define the chain of layers."
            )
        self.calls.append(index)

    def confirm(self) -> list[int]:
        """The order of the last forward pass, checked against earlier ones."""
        calls = list(self.calls)
        if not self.strict:
            calls = self._complete(calls)
        if sorted(calls) != list(range(len(self.names))):
            raise RuntimeError(
                f"{self.owner}: every layer must be called exactly once per forward pass to "
                f"define the chain of layers (call order seen: {calls})."
            )
        if self.order is not None and calls != self.order:
            raise RuntimeError(
                f"{self.owner}: the layers were called in a different order ({calls}) than "
                f"in earlier batches ({self.order})."
            )
        self.order = calls
        return calls

    def _complete(self, calls: list[int]) -> list[int]:
        """Insert the modules not called through their ``forward`` after their ancestor."""
        order = list(calls)
        for index, name in enumerate(self.names):
            if index in order:
                continue
            parents = [
                i
                for i, other in enumerate(self.names)
                if i in order and (other == "" or name.startswith(other + "."))
            ]
            if parents:
                nearest = max(parents, key=lambda i: len(self.names[i]))
                order.insert(order.index(nearest) + 1, index)
            else:
                order.append(index)
        return order


def chain_completion(diag: Sequence[Tensor], off: Sequence[Tensor]) -> Tensor:
    """Dense ``F̂`` from diagonal blocks ``diag[i]`` and super-diagonal blocks ``off[i]``."""
    n = len(diag)
    # a block singular in exact arithmetic has rounding-level eigenvalues: inverting them
    # would blow the completion up, so they count as zero (cutoff: _cutoff)
    psi = [
        off[i] @ torch.linalg.pinv(diag[i + 1], hermitian=True, rtol=_cutoff(diag[i + 1]))
        for i in range(n - 1)
    ]
    upper: dict[tuple[int, int], Tensor] = {}
    for j in range(n):
        upper[j, j] = diag[j]
        for i in range(j - 1, -1, -1):
            upper[i, j] = psi[i] @ upper[i + 1, j]
    rows = [
        torch.cat([upper[i, j] if j >= i else upper[j, i].T for j in range(n)], dim=1)
        for i in range(n)
    ]
    return torch.cat(rows, dim=0)


def _cutoff(block: Tensor) -> float:
    """The relative eigenvalue cutoff of :func:`chain_completion`'s pseudo-inverses:
    ``eps^0.7`` (1e-11 in float64, 1.4e-5 in float32), above the rounding of a block
    accumulated from many samples (the default ``n·eps`` inverts rounding: a completion
    far from PSD) and below the smallest genuine relative eigenvalues the fuzzer draws
    (``√eps`` drops some and moves the band; tests/curvature/test_fuzz.py)."""
    return float(torch.finfo(block.dtype).eps) ** 0.7
