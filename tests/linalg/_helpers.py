"""Shared generators and tolerance rules for the curvlab.linalg tests
(concepts/kronecker.md#kronecker-identities)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from hypothesis import settings
from hypothesis import strategies as st

KAPPAS = (1.0, 1e2, 1e4)
DTYPES = (torch.float32, torch.float64)
EPS = {torch.float32: 1.2e-7, torch.float64: 2.2e-16}

seeds = st.integers(min_value=0, max_value=2**32 - 1)
dims = st.integers(min_value=1, max_value=16)
kappas = st.sampled_from(KAPPAS)
dtypes = st.sampled_from(DTYPES)


def hsettings(max_examples: int) -> settings:
    """Hypothesis settings; ``CURVLAB_HYPOTHESIS_SCALE=10`` multiplies the example counts."""
    scale = float(os.environ.get("CURVLAB_HYPOTHESIS_SCALE", "1"))
    return settings(max_examples=max(1, int(max_examples * scale)), deadline=None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def random_orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    """Haar-distributed orthogonal ``[n, n]`` matrix in float64."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


def spectrum(n: int, kappa: float) -> torch.Tensor:
    """``logspace(0, -log10 κ, n)`` (float64); exactly ``[1.]`` for ``n = 1``."""
    return torch.logspace(0, -math.log10(kappa), n, dtype=torch.float64)


def from_spectrum(d: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    Q = random_orthogonal(d.shape[0], g)
    M = (Q * d) @ Q.T
    return (M + M.T) / 2


def spd(
    n: int, kappa: float, g: torch.Generator, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """SPD ``Q diag(logspace(0, -log10 κ, n)) Qᵀ`` with Haar ``Q``, cast to ``dtype``."""
    return from_spectrum(spectrum(n, kappa), g).to(dtype)


def f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).cpu().numpy()


def rel_err(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> float:
    a = f64(actual) if isinstance(actual, torch.Tensor) else np.asarray(actual, dtype=np.float64)
    e = f64(expected) if isinstance(expected, torch.Tensor) else np.asarray(expected, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    denom = np.linalg.norm(e)
    return float(np.linalg.norm(a - e) / (denom if denom > 0 else 1.0))


def assert_rel(actual: object, expected: object, rtol: float, what: str = "") -> None:
    err = rel_err(actual, expected)  # type: ignore[arg-type]
    assert err <= rtol, f"{what}: relative error {err:.3e} > rtol {rtol:.3e}"


def product_rtol(dtype: torch.dtype) -> float:
    """concepts/kronecker.md#kronecker-identities: products, vec trick, trace,
    eigen-reconstruction."""
    return 1e-12 if dtype == torch.float64 else 1e-5


def solve_rtol(dtype: torch.dtype, kappa_op: float) -> float:
    """concepts/kronecker.md#kronecker-identities solve/inverse tolerance, ``max(base, 10·κ_op·ε)``.

    ``base`` is 1e-10 (float64) or 1e-4 (float32); ``κ_op`` is the condition number of the
    operator being inverted and the reference is computed in float64 from the same inputs.
    """
    base = 1e-10 if dtype == torch.float64 else 1e-4
    return max(base, 10 * kappa_op * EPS[dtype])


def cond(M: torch.Tensor | np.ndarray) -> float:
    a = f64(M) if isinstance(M, torch.Tensor) else M
    return float(np.linalg.cond(a)) if a.size else 1.0


def abs_chain(*mats: torch.Tensor | np.ndarray) -> float:
    """‖|M_1| |M_2| ⋯ |M_k|‖_F: the natural scale of rounding errors in ``M_1 M_2 ⋯ M_k``."""
    out = None
    for M in mats:
        a = np.abs(f64(M) if isinstance(M, torch.Tensor) else np.asarray(M, np.float64))
        out = a if out is None else out @ a
    assert out is not None
    return float(np.linalg.norm(out))


def sqrtm_spd(M: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of an SPD float64 matrix."""
    d, Q = torch.linalg.eigh(M.to(torch.float64))
    return (Q * d.clamp_min(0).sqrt()) @ Q.T


def contraction(n: int, g: torch.Generator, bound: float = 0.9) -> torch.Tensor:
    """Symmetric ``R`` ``[n, n]`` (float64) with eigenvalues uniform in ``[-bound, bound]``."""
    u = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * bound
    return from_spectrum(u, g)


def resid_ok(M: np.ndarray, x: np.ndarray, y: np.ndarray, dtype: torch.dtype, c: float) -> bool:
    """Backward-error check ``‖M x − y‖ ≤ c · eps · ‖M‖₂ ‖x‖`` (independent of ``cond(M)``)."""
    eps = torch.finfo(dtype).eps
    r = np.linalg.norm(M @ x.reshape(-1) - y.reshape(-1))
    return bool(r <= c * eps * np.linalg.norm(M, 2) * np.linalg.norm(x))
