"""Kronecker-factored backends: ``KFAC`` (Linear, Embedding), ``KFC`` (+ convolutions),
their block-tridiagonal structure (:mod:`~curvlab.curvature.kronecker.tridiagonal`) and
``EKFAC``. The math is on the docs page ``concepts/kronecker.md``."""

from curvlab.curvature.kronecker.ekfac import EKFAC
from curvlab.curvature.kronecker.kfac import KFAC, KFC, KroneckerFactors

__all__ = ["EKFAC", "KFAC", "KFC", "KroneckerFactors"]
