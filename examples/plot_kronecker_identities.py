"""
The Kronecker identities behind K-FAC, checked numerically
==========================================================

K-FAC is cheap because of a handful of identities (concepts/kronecker.md#kronecker-identities).
Parameters are
flattened row-major, so a layer's block is ``kron(G, A)`` and acts on a weight-shaped
matrix ``V`` as ``G V Aᵀ`` — no ``[P, P]`` matrix is ever formed.
"""

import torch

from curvlab import linalg

torch.manual_seed(0)
dtype = torch.float64


def spd(n: int, cond: float) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=dtype))
    return q @ torch.diag(torch.logspace(0, -torch.log10(torch.tensor(cond)), n, dtype=dtype)) @ q.T


G, A = spd(5, 1e2), spd(7, 1e3)
V = torch.randn(5, 7, dtype=dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# %%
# The vec trick and the exactly damped inverse in the factors' eigenbases.
dense = torch.kron(G, A)
print("vec trick      ", rel(linalg.kron_matvec(G, A, V).flatten(), dense @ V.flatten()))
damping = 1e-2
eig_g, eig_a = linalg.symeig(G), linalg.symeig(A)
solved = linalg.kron_eigen_damped_solve(eig_g, eig_a, V, damping)
expected = torch.linalg.solve(dense + damping * torch.eye(35, dtype=dtype), V.flatten())
print("damped inverse ", rel(solved.flatten(), expected))

# %%
# Factored Tikhonov damping: ``(G + γ/π I) ⊗ (A + πγ I)`` with ``γ = √λ`` is
# ``G⊗A + λI`` plus a cross term; π (trace-norm optimal) keeps that term small.
pi = linalg.pi_correction(G, A)
G_d, A_d = linalg.factored_damping(G, A, damping)
cross = torch.kron(G_d, A_d) - dense - damping * torch.eye(35, dtype=dtype)
print(f"π = {float(pi):.3f}; cross term / ‖G⊗A‖ = {float(cross.norm() / dense.norm()):.3f}")

# %%
# Trace and log-determinant factorise.
print("trace          ", rel(linalg.kron_trace(G, A), torch.trace(dense)))
print("log-determinant", rel(linalg.kron_logdet(G, A), torch.logdet(dense)))

# %%
# The block-tridiagonal K-FAC needs ``(A⊗B − C⊗D)⁻¹``: one generalized
# eigendecomposition per side turns it into an elementwise division
# (concepts/block_tridiagonal.md#the-math).
B = spd(7, 1e2)


def contracted(M: torch.Tensor, norm: float) -> torch.Tensor:
    """``M^½ R M^½`` with a random symmetric ``‖R‖ = norm < 1``, so ``M − it`` stays PD."""
    d, q = torch.linalg.eigh(M)
    root = q @ torch.diag(d.sqrt()) @ q.T
    r = torch.randn(M.shape, dtype=dtype)
    r = (r + r.T) / 2
    return root @ (norm * r / torch.linalg.matrix_norm(r, ord=2)) @ root


C, D = contracted(G, 0.9), contracted(B, 0.9)
op = torch.kron(G, B) - torch.kron(C, D)
x = linalg.kron_sum_solve(G, B, C, D, V, sign=-1)
print("sum solve      ", rel(x.flatten(), torch.linalg.solve(op, V.flatten())))
