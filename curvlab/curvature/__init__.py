"""Curvature backends: one module per backend, all implementing ``Curvature``."""

from curvlab.curvature.base import (
    LOW_RANK_SUM,
    Curvature,
    DecompositionBlock,
    Layer,
    LayerMemory,
    MemoryEstimate,
    NamedTensor,
    RunningCount,
    RunningSum,
    StateTag,
    StructuredSum,
    find_layers,
)
from curvlab.curvature.dense.block_diagonal import BlockDiagonal
from curvlab.curvature.dense.block_tridiagonal import BlockTridiagonal
from curvlab.curvature.dense.empirical import EmpiricalFisher
from curvlab.curvature.dense.exact import ExactFisher
from curvlab.curvature.diagonal import DiagonalFisher
from curvlab.curvature.kronecker import (
    DAMPING_MODES,
    EKFAC,
    KFAC,
    KFC,
    BlockTridiagonalKFAC,
    EigenDamping,
    FactoredDamping,
    KroneckerDamping,
    KroneckerFactored,
    KroneckerFactors,
)
from curvlab.curvature.matrix_free import MatrixFreeGGN, MatrixFreeHessian

__all__ = [
    "DAMPING_MODES",
    "EKFAC",
    "KFAC",
    "KFC",
    "LOW_RANK_SUM",
    "BlockDiagonal",
    "BlockTridiagonal",
    "BlockTridiagonalKFAC",
    "Curvature",
    "DecompositionBlock",
    "DiagonalFisher",
    "EigenDamping",
    "EmpiricalFisher",
    "ExactFisher",
    "FactoredDamping",
    "KroneckerDamping",
    "KroneckerFactored",
    "KroneckerFactors",
    "Layer",
    "LayerMemory",
    "MatrixFreeGGN",
    "MatrixFreeHessian",
    "MemoryEstimate",
    "NamedTensor",
    "RunningCount",
    "RunningSum",
    "StateTag",
    "StructuredSum",
    "find_layers",
]
