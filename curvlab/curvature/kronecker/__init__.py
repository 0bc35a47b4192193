"""Kronecker-factored backends, on one base (:mod:`~curvlab.curvature.kronecker.factored`):
``KFAC`` (its other name ``KFC``; every layer of the rule table) with independent blocks,
``BlockTridiagonalKFAC`` with consecutive layers coupled, and ``EKFAC``; K-FAC's damped
inverse is a strategy of :mod:`~curvlab.curvature.kronecker.damping` (``EigenDamping``,
``FactoredDamping``). The math is on the docs page ``concepts/kronecker.md``."""

from curvlab.curvature.kronecker.damping import (
    DAMPING_MODES,
    EigenDamping,
    FactoredDamping,
    KroneckerDamping,
)
from curvlab.curvature.kronecker.ekfac import EKFAC
from curvlab.curvature.kronecker.factored import (
    BlockDiagonalKronecker,
    KroneckerFactored,
    KroneckerFactors,
)
from curvlab.curvature.kronecker.kfac import KFAC, KFC
from curvlab.curvature.kronecker.tridiagonal import BlockTridiagonalKFAC

__all__ = [
    "DAMPING_MODES",
    "EKFAC",
    "KFAC",
    "KFC",
    "BlockDiagonalKronecker",
    "BlockTridiagonalKFAC",
    "EigenDamping",
    "FactoredDamping",
    "KroneckerDamping",
    "KroneckerFactored",
    "KroneckerFactors",
]
