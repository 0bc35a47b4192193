"""Shared machinery of the dense backends: dense blocks over contiguous parameter ranges.

A dense backend partitions the flat parameter vector into contiguous ranges (the
whole vector for the full Fisher, one range per layer for the block-diagonal one)
and keeps one dense symmetric block per range, built from the factor rows of a
:class:`~curvlab.extraction.FactorRows` request as ``Σ_b w_b V_bᵀ V_b``. Blocks are
assembled parameter pair by parameter pair from the per-parameter rows, so no
concatenated ``[K, P]`` matrix is ever materialised. ``solve`` goes through a Cholesky
factor of each damped block, cached until the statistics or the damping change.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from curvlab import linalg
from curvlab.curvature.base import (
    Curvature,
    Declared,
    DecompositionBlock,
    NamedTensor,
    RunningSum,
    Vector,
    find_layers,
    top_symmetric_eigenvalues,
)
from curvlab.extraction import BatchResult, FactorRows, FisherType, check_mc_samples


class DenseCurvature(Curvature):
    """Dense symmetric blocks on contiguous ranges of the flat parameter vector."""

    #: Fisher types the backend accepts: their values, or a test of the type (``None``:
    #: every known type, registered ones included; :class:`~curvlab.FisherType`).
    fisher_types: tuple[str, ...] | Callable[[FisherType], bool] | None = None

    running_state: ClassVar[tuple[Declared, ...]] = (
        RunningSum("blocks", "_blocks", symmetric=True, label="_block_name", legacy="blocks"),
    )

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        fisher_type: str = "exact",
        mc_samples: int = 1,
        engine: str = "auto",
    ) -> None:
        super().__init__(model, loss_fn, engine=engine)
        owner = type(self).__name__
        self.fisher_type = FisherType.parse(fisher_type, owner, type(self).fisher_types)
        check_mc_samples(mc_samples, owner)
        self.mc_samples = mc_samples
        layers = find_layers(self.model)
        params = tuple(p for layer in layers for p in layer.params)
        self._cover(layers, [FactorRows(self.fisher_type, params, mc_samples)])
        offsets = [0]
        for p in self.params:
            offsets.append(offsets[-1] + p.numel())
        self._offsets = offsets
        self._ranges: list[tuple[int, int]] = self._partition()
        self._blocks: list[Tensor] | None = None
        self._cholesky: tuple[float, list[Tensor | None]] | None = None  # lazily per block

    @abc.abstractmethod
    def _partition(self) -> list[tuple[int, int]]:
        """Contiguous parameter-index ranges ``[start, stop)`` forming the blocks."""

    def _rows(self, result: BatchResult) -> list[Tensor]:
        """This batch's factor rows ``[K, p.numel()]`` per parameter."""
        request = self.requests()[0]
        assert isinstance(request, FactorRows)
        return [result.factor_rows(request, p, n) for p, n in zip(self.params, self.param_names)]

    def _accumulate(self, result: BatchResult, weight: float) -> None:
        rows = self._rows(result)
        if self._blocks is None:
            self._blocks = [self._zeros(start, stop, rows[0]) for start, stop in self._ranges]
        elif not self._sums_owned:
            self._blocks = [b.clone() for b in self._blocks]
        self._sums_owned = True
        for block, (start, stop) in zip(self._blocks, self._ranges):
            base = self._offsets[start]
            for i in range(start, stop):
                si = slice(self._offsets[i] - base, self._offsets[i + 1] - base)
                for j in range(i, stop):
                    sj = slice(self._offsets[j] - base, self._offsets[j + 1] - base)
                    block[si, sj].addmm_(rows[i].T, rows[j], alpha=weight)
                    if j != i:
                        block[sj, si] = block[si, sj].T

    def _zeros(self, start: int, stop: int, like: Tensor) -> Tensor:
        size = self._offsets[stop] - self._offsets[start]
        return torch.zeros(size, size, dtype=like.dtype, device=like.device)

    def _invalidate(self) -> None:
        self._cholesky = None

    def blocks(self) -> list[Tensor]:
        """The dense blocks (normalised: the union's curvature), in ``params`` order."""
        self._check_ready("blocks")
        assert self._blocks is not None
        return [b / self._normalizer for b in self._blocks]

    def _matvec(self, v: Vector) -> Vector:
        x = self._flatten(v)
        out = torch.cat(
            [
                block.to(x.dtype) @ x[self._offsets[a] : self._offsets[b]]
                for block, (a, b) in zip(self.blocks(), self._ranges)
            ]
        )
        return self._unflatten(out)

    def _solve(self, v: Vector, damping: float) -> Vector:
        factors = [self._block_cholesky(k, damping) for k in range(len(self._ranges))]
        x = self._flatten(v)
        out = torch.cat(
            [
                linalg.cholesky_solve(chol, x[self._offsets[a] : self._offsets[b]])
                for chol, (a, b) in zip(factors, self._ranges)
            ]
        )
        return self._unflatten(out.to(x.dtype))

    def _block_cholesky(self, k: int, damping: float) -> Tensor:
        """Lower Cholesky factor of block ``k`` + ``damping·I``, cached per damping."""
        if self._cholesky is None or self._cholesky[0] != damping:
            self._cholesky = (damping, [None] * len(self._ranges))
        chol = self._cholesky[1][k]
        if chol is None:
            assert self._blocks is not None
            block = self._blocks[k] / self._normalizer
            chol = linalg.damped_cholesky(
                block, damping, name=self._block_name(k), keep_float64=True
            )
            self._cholesky[1][k] = chol
            self.num_decompositions += 1
        return chol

    # --- distribution: one block per dense block (range) -----------------------------------

    def _decomposition_blocks(self) -> list[DecompositionBlock]:
        blocks = []
        for k, (a, b) in enumerate(self._ranges):
            size = self._offsets[b] - self._offsets[a]
            blocks.append(
                DecompositionBlock(
                    index=k,
                    name=self._block_name(k),
                    param_indices=tuple(range(a, b)),
                    cost=float(size) ** 3,
                )
            )
        return blocks

    def _decompose(self, index: int, damping: float) -> None:
        self._block_cholesky(index, damping)

    def _export_decomposition(self, index: int, damping: float) -> list[NamedTensor]:
        chol = None
        if self._cholesky is not None and self._cholesky[0] == damping:
            chol = self._cholesky[1][index]
        if chol is None:
            raise RuntimeError(f"{self._block_name(index)} is not decomposed yet.")
        return [NamedTensor(f"{self._block_name(index)} Cholesky factor", chol, "lower_triangular")]

    def _import_decomposition(self, index: int, damping: float, tensors: list[Tensor]) -> None:
        if self._cholesky is None or self._cholesky[0] != damping:
            self._cholesky = (damping, [None] * len(self._ranges))
        self._cholesky[1][index] = tensors[0]

    def _solve_block(self, index: int, v: Vector, damping: float) -> Vector:
        chol = self._block_cholesky(index, damping)
        x = torch.cat([t.reshape(-1) for t in v])
        out = linalg.cholesky_solve(chol, x).to(x.dtype)
        parts, start = [], 0
        for t in v:
            parts.append(out[start : start + t.numel()].reshape(t.shape))
            start += t.numel()
        return parts

    def _block_name(self, k: int) -> str:
        start, stop = self._ranges[k]
        names = self.param_names[start:stop]
        return f"{type(self).__name__} block {k} ({names[0]} .. {names[-1]})"

    # --- closed forms over the blocks (the dense matrix is block-diagonal) ------------------

    def _trace(self) -> Tensor:
        return sum((torch.trace(b) for b in self.blocks()), torch.zeros((), dtype=self.dtype))

    def _diagonal(self) -> Tensor:
        return torch.cat([torch.diagonal(b) for b in self.blocks()])

    def _frobenius_norm(self) -> Tensor:
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.matrix_norm(b) for b in self.blocks()])
        )

    def _logdet(self, damping: float) -> Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for b in self.blocks():
            b = b.double()
            eye = torch.eye(len(b), dtype=b.dtype, device=b.device)
            total = total + torch.linalg.slogdet((b + b.T) / 2 + damping * eye).logabsdet.cpu()
        return total

    def _eigenvalues(self, k: int | None) -> Tensor:
        values = torch.cat([top_symmetric_eigenvalues(b, k) for b in self.blocks()])
        return torch.sort(values, descending=True).values

    def _to_dense(self) -> Tensor:
        blocks = self.blocks()
        dense = torch.zeros(
            self.num_params, self.num_params, dtype=blocks[0].dtype, device=blocks[0].device
        )
        for block, (a, b) in zip(blocks, self._ranges):
            lo, hi = self._offsets[a], self._offsets[b]
            dense[lo:hi, lo:hi] = block
        return dense

    def _check_loaded_sums(self) -> None:
        """Loaded blocks must match this model's ranges (a clear error otherwise)."""
        if self._blocks is not None:
            expected = [self._offsets[b] - self._offsets[a] for a, b in self._ranges]
            shapes = [tuple(t.shape) for t in self._blocks]
            if shapes != [(n, n) for n in expected]:
                raise ValueError(
                    f"{type(self).__name__}: block shapes {shapes} do not match this "
                    f"model's {[(n, n) for n in expected]}."
                )
