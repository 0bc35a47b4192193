"""Dense backends: blocks of the Fisher stored as dense matrices (small models, ablations).

``ExactFisher`` and ``EmpiricalFisher`` (the full matrix), ``BlockDiagonal`` (per-layer
blocks) and ``BlockTridiagonal`` (the chain completion of the tridiagonal blocks), all on
:class:`~curvlab.curvature.dense.base.DenseCurvature`.
"""

from curvlab.curvature.dense.base import DenseCurvature
from curvlab.curvature.dense.block_diagonal import BlockDiagonal
from curvlab.curvature.dense.block_tridiagonal import BlockTridiagonal
from curvlab.curvature.dense.empirical import EmpiricalFisher
from curvlab.curvature.dense.exact import ExactFisher

__all__ = ["BlockDiagonal", "BlockTridiagonal", "DenseCurvature", "EmpiricalFisher", "ExactFisher"]
