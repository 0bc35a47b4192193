"""curvlab: modular curvature approximations and natural-gradient preconditioning for PyTorch.

Every approximation implements :class:`curvlab.Curvature`; build one directly
(``curvlab.ExactFisher(model, loss_fn)``) or by name (``curvlab.make("block_diagonal",
model, loss_fn)``), feed it batches with ``update`` (or several at once with
:func:`curvlab.extract`) and use ``matvec``, ``solve`` and ``to_dense``.
"""

from typing import TYPE_CHECKING

from curvlab import influence, linalg
from curvlab.curvature import (
    EKFAC,
    KFAC,
    KFC,
    BlockDiagonal,
    BlockTridiagonal,
    BlockTridiagonalKFAC,
    Curvature,
    DecompositionBlock,
    DiagonalFisher,
    EmpiricalFisher,
    ExactFisher,
    KroneckerFactors,
    Layer,
    MatrixFreeGGN,
    MatrixFreeHessian,
    NamedTensor,
)
from curvlab.curvature.registry import available, make, register
from curvlab.extraction import FISHER_TYPES, FisherType, extract
from curvlab.extraction.policies import (
    CategoricalPolicy,
    GaussianPolicy,
    PolicyLoss,
    StateIndependentLogStd,
)
from curvlab.optim import (
    ACKTR,
    EigenbasisAdam,
    KFACOptimizer,
    LevenbergMarquardt,
    NaturalGradient,
    NoisyKFAC,
    distributed,
    load_checkpoint,
    save_checkpoint,
)

__version__ = "0.1.0"

__all__ = [
    "ACKTR",
    "EKFAC",
    "FISHER_TYPES",
    "KFAC",
    "KFC",
    "BlockDiagonal",
    "BlockTridiagonal",
    "BlockTridiagonalKFAC",
    "CategoricalPolicy",
    "Curvature",
    "DecompositionBlock",
    "DiagonalFisher",
    "EigenbasisAdam",
    "EmpiricalFisher",
    "ExactFisher",
    "FisherType",
    "GaussianPolicy",
    "KFACOptimizer",
    "KroneckerFactors",
    "Layer",
    "LevenbergMarquardt",
    "MatrixFreeGGN",
    "MatrixFreeHessian",
    "NamedTensor",
    "NaturalGradient",
    "NoisyKFAC",
    "PolicyLoss",
    "StateIndependentLogStd",
    "ablation",
    "available",
    "distributed",
    "extract",
    "influence",
    "linalg",
    "load_checkpoint",
    "make",
    "register",
    "save_checkpoint",
]


if TYPE_CHECKING:
    from curvlab import ablation
else:

    def __getattr__(name: str) -> object:
        # the research harness loads on first use only (its figures and data need the
        # ablate extra: pip install 'curvlab[ablate]')
        if name == "ablation":
            import importlib

            return importlib.import_module("curvlab.ablation")
        raise AttributeError(f"module 'curvlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (``__all__``), not the subpackages and helpers behind them."""
    return sorted([*__all__, "__version__"])


del TYPE_CHECKING
