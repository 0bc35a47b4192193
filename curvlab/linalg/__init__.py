"""Pure-torch linear algebra for Kronecker-factored curvature
(concepts/kronecker.md#k-fac-for-linear-layers; concepts/block_tridiagonal.md#the-math;
concepts/kronecker.md#kronecker-identities).

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
    kron_eigen_matvec,
    symeig,
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
from .kron_sum import KronSumInverse, kron_sum_solve
from .polar import orthogonalize

__all__ = [
    "GeneralizedEigen",
    "KronSumInverse",
    "LinAlgError",
    "SymmetricEigen",
    "cholesky_factor",
    "cholesky_solve",
    "commutation_matrix",
    "damped_cholesky",
    "factored_damping",
    "generalized_symeig",
    "kron_cholesky_solve",
    "kron_dense",
    "kron_eigen_damped_solve",
    "kron_eigen_matvec",
    "kron_frobenius_norm",
    "kron_logdet",
    "kron_matvec",
    "kron_sum_solve",
    "kron_trace",
    "orthogonalize",
    "pi_correction",
    "symeig",
]
