"""Curvature backends: one module per backend, all implementing ``Curvature``."""

from curvlab.curvature.base import Curvature, Layer
from curvlab.curvature.block_diagonal import BlockDiagonal
from curvlab.curvature.empirical import EmpiricalFisher
from curvlab.curvature.exact import ExactFisher

__all__ = ["BlockDiagonal", "Curvature", "EmpiricalFisher", "ExactFisher", "Layer"]
