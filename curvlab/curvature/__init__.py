"""Curvature backends: one module per backend, all implementing ``Curvature``."""

from curvlab.curvature.base import Curvature, DecompositionBlock, Layer, NamedTensor
from curvlab.curvature.block_diagonal import BlockDiagonal
from curvlab.curvature.block_tridiagonal import BlockTridiagonal
from curvlab.curvature.diagonal import DiagonalFisher
from curvlab.curvature.ekfac import EKFAC
from curvlab.curvature.empirical import EmpiricalFisher
from curvlab.curvature.exact import ExactFisher
from curvlab.curvature.kfac import KFAC, KFC, KroneckerFactors

__all__ = [
    "EKFAC",
    "KFAC",
    "KFC",
    "BlockDiagonal",
    "BlockTridiagonal",
    "Curvature",
    "DecompositionBlock",
    "DiagonalFisher",
    "EmpiricalFisher",
    "ExactFisher",
    "KroneckerFactors",
    "Layer",
    "NamedTensor",
]
