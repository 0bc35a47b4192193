"""The distribution interface of a backend: what a distributed preconditioner needs.

Two groups of operations, on any :class:`~curvlab.Curvature`:

* **statistic sums** — the accumulated state as sums that add over batches, so that
  summing them over processes gives the curvature of the union of every process's
  batches (:meth:`DistributionInterface.statistic_sums`, ``load_statistic_sums``);
* **decomposition blocks** — the units of factorisation work (one per layer for the
  block-diagonal Kronecker backends and ``BlockDiagonal``, one for a full or chained
  matrix) that can be decomposed on one process, exported, imported on the others, or
  solved with on their own.

This is an extension interface, not part of a backend's public face. The statistic sums
come from what a backend declares it accumulates
(:attr:`~curvlab.Curvature.running_state`; the base class's ``_sums``, ``_load_sums``,
``_counts``, ``_load_counts``), so a backend writer implements none of them; the
decomposition hooks (``_decomposition_blocks``, ``_decompose``, ``_export_decomposition``,
``_import_decomposition``, ``_solve_block``) have working defaults that a backend with its
own factorisations overrides — see the docs page "Distributed K-FAC" and the
``plot_new_backend`` tutorial. :class:`~curvlab.NaturalGradient` reaches them through
:class:`DistributionInterface`, which validates every argument first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvlab.curvature.base import (
    Curvature,
    DecompositionBlock,
    NamedTensor,
    ProcessReducer,
    Vector,
)


class DistributionInterface:
    """The distribution operations of one backend (validated calls of its hooks).

    Args:
        curvature: the backend.
    """

    def __init__(self, curvature: Curvature) -> None:
        if not isinstance(curvature, Curvature):
            raise TypeError(
                "DistributionInterface: expected a curvlab.Curvature, got "
                f"{type(curvature).__name__}."
            )
        self.curvature = curvature
        self._blocks = curvature._decomposition_blocks()  # fixed at construction

    # --- statistic sums ------------------------------------------------------------------

    def statistic_sums(self) -> list[NamedTensor]:
        """The accumulated state as sums that add over batches (new or shared tensors).

        Accumulating batch sets ``X`` and ``Y`` separately and adding the results entry by
        entry gives the accumulation of ``X ∪ Y`` (the union convention of
        :mod:`curvlab.curvature.base`); reducing them over processes therefore gives the
        curvature of every process's batches together. Each entry says how
        (``NamedTensor.reduction``): ``"sum"`` entries add; ``"gather"`` entries are the
        parts of a structured sum (K-FAC's structured output factor: its ``U`` and ``s``)
        that every process needs from every other, stacked in rank order — what the
        sum's :class:`~curvlab.curvature.StructuredSum` then combines
        (:func:`reduce_locally` does it all in one process). The last entry, ``"counts"``,
        is a float64 vector of the counters (weight sum, samples, batches, then the
        backend's own). Tensors are on the parameters' device; symmetric sums are marked
        so that only their upper triangle needs sending.
        """
        c = self.curvature
        c._check_ready("statistic_sums")
        counters = [c._weight_sum, float(c.num_samples), float(c.num_batches)]
        counts = torch.tensor(
            counters + [float(n) for n in c._counts()],
            dtype=torch.float64,
            device=c.params[0].device,
        )
        return [*c._sums(), NamedTensor("counts", counts)]

    def load_statistic_sums(self, sums: Sequence[Tensor]) -> None:
        """Make ``sums`` — shaped like :meth:`statistic_sums` and reduced as its entries say
        (summed, or a ``"gather"`` entry stacked ``[processes, *shape]``), e.g. over
        processes — the accumulated state. Structured sums are combined first (their
        low-rank parts recompressed), so an error there leaves the state unchanged. Reads
        the counters back to the host (one synchronisation).
        """
        c = self.curvature
        expected = self.statistic_sums()
        owner = f"{type(c).__name__}.load_statistic_sums"
        if len(sums) != len(expected):
            raise ValueError(f"{owner}: expected {len(expected)} tensors, got {len(sums)}.")
        for t, ref in zip(sums, expected):
            shape = tuple(ref.tensor.shape)
            if not isinstance(t, Tensor):
                raise ValueError(f"{owner}: '{ref.name}' must be a tensor, got {type(t).__name__}.")
            if ref.reduction == "gather":
                if t.ndim != len(shape) + 1 or tuple(t.shape[1:]) != shape or t.shape[0] < 1:
                    raise ValueError(
                        f"{owner}: '{ref.name}' is gathered: it must have shape "
                        f"(processes, {', '.join(map(str, shape))}), got {tuple(t.shape)}."
                    )
            elif t.shape != ref.tensor.shape:
                raise ValueError(
                    f"{owner}: '{ref.name}' must have shape {shape}, got {tuple(t.shape)}."
                )
        values = c._reduced_sums(list(sums[:-1]))
        counts = [float(n) for n in sums[-1].tolist()]
        c._weight_sum = counts[0]
        c.num_samples = round(counts[1])
        c.num_batches = round(counts[2])
        c._load_counts(counts[3:])
        c._set_sums(values)
        c._statistics_changed()

    def set_process_reducer(self, reduce: ProcessReducer | None) -> None:
        """Let accumulation use ``reduce`` (tensors summed over processes, a collective that
        every process calls at the same point); ``None``: a single process.

        A distributed :class:`~curvlab.NaturalGradient` sets it. Backends whose
        accumulation itself needs quantities of the union of all processes' batches use
        it (``EKFAC`` fits its eigenbasis from the all-reduced factors); the others ignore it.
        """
        c = self.curvature
        if reduce is not None and not callable(reduce):
            raise TypeError(f"{type(c).__name__}.set_process_reducer: reduce must be callable.")
        c._process_reducer = reduce

    @staticmethod
    def combines_parts(entries: Sequence[NamedTensor]) -> bool:
        """Whether ``entries`` (of :meth:`statistic_sums`) hold parts of a structured sum:
        :meth:`load_statistic_sums` then does more than copy (it recompresses, which a
        distributed strategy checks on every process)."""
        return any(e.reduction == "gather" for e in entries)

    # --- decomposition blocks --------------------------------------------------------------

    def decomposition_blocks(self) -> list[DecompositionBlock]:
        """The units of decomposition work, each covering some parameters (a partition).

        One per layer for the block-diagonal Kronecker backends and ``BlockDiagonal``; one
        block for a full matrix (``ExactFisher``, ``EmpiricalFisher``) or a chained structure
        (block-tridiagonal). Fixed at construction.
        """
        return list(self._blocks)

    def decompose(self, block: DecompositionBlock | int, damping: float) -> None:
        """Compute and cache ``block``'s decomposition (eigenbases, Cholesky factors) that
        ``solve(·, damping)`` needs; nothing happens if it is cached. Each computed block
        adds 1 to the backend's ``num_decompositions`` (as do the ones ``solve`` computes
        lazily)."""
        index = self._check_block(block, "decompose")
        self.curvature._decompose(index, self.curvature._check_damping(damping, "decompose"))

    def export_decomposition(
        self, block: DecompositionBlock | int, damping: float
    ) -> list[NamedTensor]:
        """``block``'s cached decomposition for ``damping`` (after :meth:`decompose`) as
        named tensors, to be sent to processes that call :meth:`import_decomposition`."""
        c = self.curvature
        index = self._check_block(block, "export_decomposition")
        return c._export_decomposition(index, c._check_damping(damping, "export"))

    def import_decomposition(
        self, block: DecompositionBlock | int, damping: float, tensors: Sequence[Tensor]
    ) -> None:
        """Cache ``tensors`` — what :meth:`export_decomposition` returned on another process
        with the same statistics — as ``block``'s decomposition for ``damping``."""
        c = self.curvature
        owner = f"{type(c).__name__}.import_decomposition"
        index = self._check_block(block, "import_decomposition")
        if isinstance(tensors, Tensor) or not all(isinstance(t, Tensor) for t in tensors):
            raise TypeError(f"{owner}: tensors must be a list of tensors.")
        c._import_decomposition(index, c._check_damping(damping, "import"), list(tensors))

    def solve_block(
        self, block: DecompositionBlock | int, v: Sequence[Tensor], damping: float
    ) -> Vector:
        """``solve`` restricted to ``block``: ``v`` holds the entries of its parameters
        (``params[i]`` for ``i in block.param_indices``), the result likewise."""
        c = self.curvature
        owner = f"{type(c).__name__}.solve_block"
        index = self._check_block(block, "solve_block")
        c._check_ready("solve_block")
        indices = self._blocks[index].param_indices
        if isinstance(v, Tensor) or not isinstance(v, (list, tuple)) or len(v) != len(indices):
            raise ValueError(
                f"{owner}: expected a list of {len(indices)} tensors (the block's parameters)."
            )
        for t, i in zip(v, indices):
            if not isinstance(t, Tensor) or t.shape != c.params[i].shape:
                raise ValueError(
                    f"{owner}: entry for '{c.param_names[i]}' must have shape "
                    f"{tuple(c.params[i].shape)}."
                )
        return c._solve_block(index, list(v), c._check_damping(damping, "solve_block"))

    def _check_block(self, block: DecompositionBlock | int, op: str) -> int:
        owner = f"{type(self.curvature).__name__}.{op}"
        blocks = self._blocks
        index = block.index if isinstance(block, DecompositionBlock) else block
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(blocks):
            raise ValueError(
                f"{owner}: unknown block {block!r}; this backend has {len(blocks)} block(s)."
            )
        if isinstance(block, DecompositionBlock) and block != blocks[index]:
            raise ValueError(f"{owner}: block {block.name!r} belongs to another backend.")
        return index


def reduce_locally(per_process: Sequence[Sequence[NamedTensor]]) -> list[Tensor]:
    """What reducing ``per_process`` (one :meth:`DistributionInterface.statistic_sums` list
    per process, in rank order) over processes gives, computed in one process: ``"sum"``
    entries added in rank order, ``"gather"`` entries stacked ``[processes, *shape]``.
    For tests, and for combining the statistics of several backends by hand."""
    if not per_process:
        raise ValueError("reduce_locally: per_process is empty.")
    first = per_process[0]
    for rank, entries in enumerate(per_process):
        if [(e.name, e.reduction, e.tensor.shape) for e in entries] != [
            (e.name, e.reduction, e.tensor.shape) for e in first
        ]:
            raise ValueError(
                f"reduce_locally: the entries of process {rank} differ from process 0's "
                "(names, reductions or shapes)."
            )
    out = []
    for i, entry in enumerate(first):
        tensors = [entries[i].tensor for entries in per_process]
        if entry.reduction == "gather":
            out.append(torch.stack(tensors))
        else:
            total = tensors[0]
            for t in tensors[1:]:
                total = total + t
            out.append(total)
    return out
