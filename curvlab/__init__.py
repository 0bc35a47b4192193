"""curvlab: modular curvature approximations and natural-gradient preconditioning for PyTorch.

Every approximation implements :class:`curvlab.Curvature`; build one directly
(``curvlab.ExactFisher(model, loss_fn)``) or by name (``curvlab.make("block_diagonal",
model, loss_fn)``), feed it batches with ``update`` (or several at once with
:func:`curvlab.extract`) and use ``matvec``, ``solve`` and ``to_dense``.
"""

from curvlab import ablation, distributed, linalg
from curvlab.curvature import (
    EKFAC,
    KFAC,
    KFC,
    BlockDiagonal,
    BlockTridiagonal,
    Curvature,
    DecompositionBlock,
    DiagonalFisher,
    EmpiricalFisher,
    ExactFisher,
    KroneckerFactors,
    Layer,
    NamedTensor,
)
from curvlab.damping import LevenbergMarquardt
from curvlab.extraction import FISHER_TYPES, extract
from curvlab.optim import KFACOptimizer
from curvlab.preconditioner import NaturalGradient
from curvlab.registry import available, make, register

__version__ = "0.1.0"

__all__ = [
    "EKFAC",
    "FISHER_TYPES",
    "KFAC",
    "KFC",
    "BlockDiagonal",
    "BlockTridiagonal",
    "Curvature",
    "DecompositionBlock",
    "DiagonalFisher",
    "EmpiricalFisher",
    "ExactFisher",
    "KFACOptimizer",
    "KroneckerFactors",
    "Layer",
    "LevenbergMarquardt",
    "NamedTensor",
    "NaturalGradient",
    "ablation",
    "available",
    "distributed",
    "extract",
    "linalg",
    "make",
    "register",
]
