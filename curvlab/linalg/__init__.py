"""Pure-torch linear algebra for Kronecker-factored curvature and matrix-free estimators
(concepts/kronecker.md#k-fac-for-linear-layers; concepts/block_tridiagonal.md#the-math;
concepts/recurrent.md#the-series-model;
concepts/kronecker.md#kronecker-identities; concepts/matrix_free.md#estimators-and-their-errors).

Layout convention: parameters are flattened row-major (``W.flatten()``); a layer's K-FAC
block is ``torch.kron(G, A)`` with ``G`` the ``[d_out, d_out]`` output-gradient factor and
``A`` the ``[d_in, d_in]`` input factor, and
``torch.kron(G, A) @ V.flatten() == (G @ V @ A.T).flatten()`` for ``V`` ``[d_out, d_in]``.
All functions keep the inputs' device and dtype (factorizations of float16/bfloat16 run in
float32; failed float32 factorizations are retried in float64).
"""

from ._checks import LinAlgError
from .cholesky import cholesky_factor, cholesky_solve, damped_cholesky
from .damping import factored_damping, pi_correction
from .eigen import (
    GeneralizedEigen,
    SymmetricEigen,
    generalized_symeig,
    kron_eigen_damped_solve,
    kron_eigen_diagonal_damped_solve,
    kron_eigen_matvec,
    symeig,
)
from .estimators import (
    Estimate,
    SpectralDensity,
    conjugate_gradient,
    diagonal_estimate,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    lanczos_eigenvalues,
    spectral_density,
)
from .kron import (
    commutation_matrix,
    kron_cholesky_solve,
    kron_dense,
    kron_frobenius_norm,
    kron_logdet,
    kron_matvec,
    kron_trace,
)
from .kron_series import (
    SERIES_CLIP,
    SeriesBasis,
    series_basis,
    series_dense,
    series_diagonal,
    series_frobenius_norm,
    series_matvec,
    series_solve,
    series_zeta,
)
from .kron_sum import KronSumInverse, kron_sum_solve
from .low_rank import DiagonalPlusLowRank, low_rank_sum, low_rank_update
from .polar import orthogonalize

__all__ = [
    "SERIES_CLIP",
    "DiagonalPlusLowRank",
    "Estimate",
    "GeneralizedEigen",
    "KronSumInverse",
    "LinAlgError",
    "SeriesBasis",
    "SpectralDensity",
    "SymmetricEigen",
    "cholesky_factor",
    "cholesky_solve",
    "commutation_matrix",
    "conjugate_gradient",
    "damped_cholesky",
    "diagonal_estimate",
    "factored_damping",
    "generalized_symeig",
    "hutchinson_trace",
    "hutchpp_trace",
    "kron_cholesky_solve",
    "kron_dense",
    "kron_eigen_damped_solve",
    "kron_eigen_diagonal_damped_solve",
    "kron_eigen_matvec",
    "kron_frobenius_norm",
    "kron_logdet",
    "kron_matvec",
    "kron_sum_solve",
    "kron_trace",
    "lanczos",
    "lanczos_eigenvalues",
    "low_rank_sum",
    "low_rank_update",
    "orthogonalize",
    "pi_correction",
    "series_basis",
    "series_dense",
    "series_diagonal",
    "series_frobenius_norm",
    "series_matvec",
    "series_solve",
    "series_zeta",
    "spectral_density",
    "symeig",
]
