"""``BlockDiagonal``: dense per-layer blocks of the Fisher (weight and bias together)."""

from __future__ import annotations

from curvlab.curvature.dense.base import DenseCurvature
from curvlab.curvature.registry import register


@register("block_diagonal")
class BlockDiagonal(DenseCurvature):
    """The Fisher's diagonal layer blocks, dense; cross-layer blocks are zero.

    A layer is a module with trainable parameters; its weight and bias form one block.
    ``fisher_type`` is ``"exact"``, ``"mc"`` (``mc_samples`` sampled labels per input)
    or ``"empirical"`` (observed labels, on the Fisher's scale).
    """

    def _partition(self) -> list[tuple[int, int]]:
        ranges, start = [], 0
        for layer in self.layers:
            ranges.append((start, start + len(layer.params)))
            start += len(layer.params)
        return ranges
