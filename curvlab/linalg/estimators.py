"""Matrix-free estimators for a symmetric operator known only through its products
(concepts/matrix_free.md#estimators-and-their-errors).

Every function takes ``matvec``: a callable mapping a ``[dim, K]`` tensor to the
``[dim, K]`` tensor of the operator applied to each column (``K >= 1``; a
:class:`curvlab.Curvature` applied with ``@`` is one, so is ``lambda X: A @ X``).
Probes are drawn from a CPU ``torch.Generator`` seeded with ``seed`` (the global random
stream is not touched), in ``dtype`` on ``device``. Results carry an error estimate
(:class:`Estimate`):

* :func:`hutchinson_trace`, :func:`hutchpp_trace`, :func:`diagonal_estimate`: the
  *standard error* of the stochastic part (the sample standard deviation of the per-probe
  terms over ``√(number of probes)``; ``inf`` with a single probe; ``0`` when the
  deflated remainder vanishes, e.g. an operator of rank below the sketch size);
* :func:`lanczos_eigenvalues`: a *residual bound* per Ritz value, ``|β_m s_{m,i}|`` plus
  the dtype's rounding level ``ε‖T‖``: for a symmetric operator some eigenvalue lies
  within it (it does not say *which* one: a missed eigenvalue above the top Ritz value
  is possible when the start vector is nearly orthogonal to its eigenvector).

:func:`spectral_density` is stochastic Lanczos quadrature: a spectral density for
spectrum plots and ``tr f(A)`` estimates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import LinAlgError

#: ``matvec(X)``: the operator applied to the columns of ``X`` ``[dim, K]``.
MatVec = Callable[[Tensor], Tensor]

__all__ = [
    "Estimate",
    "SpectralDensity",
    "conjugate_gradient",
    "diagonal_estimate",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "lanczos_eigenvalues",
    "spectral_density",
]


@dataclass(frozen=True)
class Estimate:
    """A matrix-free estimate with its error.

    Attributes:
        value: the estimate (0-d for a trace, ``[dim]`` for a diagonal, ``[k]`` for
            eigenvalues, descending).
        error: same shape as ``value``: the standard error of a stochastic estimate
            (trace, diagonal) or the residual bound of a Ritz value (eigenvalues).
        num_matvecs: operator-vector products spent.
    """

    value: Tensor
    error: Tensor
    num_matvecs: int


def _check_count(value: int, name: str, owner: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}.")
    return value


def _probes(
    dim: int, k: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    """``[dim, k]`` Rademacher (±1) probes."""
    signs = torch.randint(0, 2, (dim, k), generator=generator, dtype=torch.int8)
    return (2 * signs - 1).to(dtype=dtype, device=device)


def _apply(matvec: MatVec, X: Tensor, owner: str) -> Tensor:
    out = matvec(X)
    if not isinstance(out, Tensor) or out.shape != X.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"{owner}: matvec must map a [{X.shape[0]}, K] tensor to the same shape, got {shape}."
        )
    return out


def _blocks(total: int, block_size: int) -> list[int]:
    return [min(block_size, total - start) for start in range(0, total, block_size)]


def _std_error(samples: Tensor) -> Tensor:
    """Standard error of the mean over dim 0 (``inf`` for one sample)."""
    m = samples.shape[0]
    if m < 2:
        return torch.full_like(samples[0], math.inf)
    return samples.std(dim=0, correction=1) / math.sqrt(m)


def hutchinson_trace(
    matvec: MatVec,
    dim: int,
    num_matvecs: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    block_size: int = 16,
) -> Estimate:
    """Hutchinson's estimate ``(1/m) Σ zᵢᵀ A zᵢ`` of ``tr(A)`` with ``m`` Rademacher probes.

    Unbiased; its variance is ``2 Σ_{i≠j} A_ij² / m``. ``block_size`` probes share one
    call of ``matvec``. ``error``: the standard error.
    """
    owner = "hutchinson_trace"
    _check_count(dim, "dim", owner)
    _check_count(num_matvecs, "num_matvecs", owner)
    generator = torch.Generator().manual_seed(seed)
    terms = []
    for k in _blocks(num_matvecs, block_size):
        Z = _probes(dim, k, generator, dtype, device)
        terms.append((Z * _apply(matvec, Z, owner)).sum(dim=0).double())
    samples = torch.cat(terms)
    return Estimate(samples.mean().to(dtype), _std_error(samples).to(dtype), num_matvecs)


def _orthonormal_range(Y: Tensor) -> Tensor:
    """An orthonormal basis ``Q`` of the column space of ``Y`` (thin SVD: directions with
    singular values below ``dim · ε · σ_max`` are dropped, so ``Q`` has the numerical rank
    of ``Y`` as its width)."""
    if Y.shape[1] == 0:
        return Y
    U, sigma, _ = torch.linalg.svd(Y.double(), full_matrices=False)
    keep = sigma > sigma.max() * max(Y.shape) * torch.finfo(Y.dtype).eps
    return U[:, keep].to(Y.dtype)


def _sketch(
    matvec: MatVec,
    dim: int,
    num_matvecs: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str,
    owner: str,
) -> tuple[Tensor, Tensor, int]:
    """The Hutch++ split: ``Q`` (orthonormal range of ``A S``), ``A Q`` and the number of
    probes left for the remainder."""
    _check_count(num_matvecs, "num_matvecs", owner, minimum=3)
    sketch = num_matvecs // 3
    # a Gaussian sketch has full rank almost surely (Rademacher columns can coincide)
    S = torch.randn(dim, sketch, generator=generator, dtype=torch.float64)
    S = S.to(dtype=dtype, device=device)
    Q = _orthonormal_range(_apply(matvec, S, owner))
    AQ = _apply(matvec, Q, owner) if Q.shape[1] else Q
    return Q, AQ, num_matvecs - sketch - Q.shape[1]


def hutchpp_trace(
    matvec: MatVec,
    dim: int,
    num_matvecs: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    block_size: int = 16,
) -> Estimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021): ``tr(QᵀAQ)`` exactly on the range
    ``Q`` of ``A S`` (``m/3`` probes), plus Hutchinson on the deflated remainder
    ``(I − QQᵀ)A(I − QQᵀ)`` with the other probes.

    Needs ``num_matvecs >= 3``. Its error decays like ``1/m`` (not ``1/√m``) for operators
    with decaying spectra; ``error`` is the standard error of the remainder's Hutchinson
    term (``0`` when ``A`` has rank below ``m/3``: the sketch captures it exactly).
    """
    owner = "hutchpp_trace"
    _check_count(dim, "dim", owner)
    generator = torch.Generator().manual_seed(seed)
    Q, AQ, left = _sketch(matvec, dim, num_matvecs, generator, dtype, device, owner)
    exact = (Q * AQ).sum().double()
    terms = []
    for k in _blocks(max(left, 0), block_size):
        G = _probes(dim, k, generator, dtype, device)
        G = G - Q @ (Q.T @ G)
        terms.append((G * _apply(matvec, G, owner)).sum(dim=0).double())
    if not terms:
        zero = torch.zeros((), dtype=torch.float64)
        return Estimate(exact.to(dtype), zero.to(dtype), num_matvecs - max(left, 0))
    samples = torch.cat(terms)
    value = exact + samples.mean()
    return Estimate(value.to(dtype), _std_error(samples).to(dtype), num_matvecs)


def diagonal_estimate(
    matvec: MatVec,
    dim: int,
    num_matvecs: int,
    *,
    method: str = "diag++",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    block_size: int = 16,
) -> Estimate:
    """Estimate ``diag(A)`` (``[dim]``) from ``num_matvecs`` products.

    ``method="hutchinson"`` (Bekas, Kokiopoulou & Saad 2007): ``(1/m) Σ zᵢ ⊙ A zᵢ`` with
    Rademacher probes, unbiased. ``"diag++"`` (Baston & Nakatsukasa 2022): the diagonal of
    ``QQᵀA`` exactly (``Q`` the range of ``A S``, ``m/3`` probes), plus Hutchinson on
    ``(I − QQᵀ)A`` with the remaining probes; far more accurate for decaying spectra.
    ``error``: per-entry standard error of the Hutchinson part.
    """
    owner = "diagonal_estimate"
    _check_count(dim, "dim", owner)
    if method not in ("hutchinson", "diag++"):
        raise ValueError(f"{owner}: method must be 'hutchinson' or 'diag++', got {method!r}.")
    generator = torch.Generator().manual_seed(seed)
    if method == "hutchinson":
        _check_count(num_matvecs, "num_matvecs", owner)
        Q = torch.zeros(dim, 0, dtype=dtype, device=device)
        base = torch.zeros(dim, dtype=torch.float64, device=device)
        left = num_matvecs
    else:
        Q, AQ, left = _sketch(matvec, dim, num_matvecs, generator, dtype, device, owner)
        base = (Q * AQ).sum(dim=1).double()  # diag(Q (AQ)ᵀ) = diag(QQᵀA) for symmetric A
    terms = []
    for k in _blocks(max(left, 0), block_size):
        Z = _probes(dim, k, generator, dtype, device)
        AZ = _apply(matvec, Z, owner)
        AZ = AZ - Q @ (Q.T @ AZ)
        terms.append((Z * AZ).double().T)
    if not terms:
        return Estimate(base.to(dtype), torch.zeros_like(base).to(dtype), num_matvecs - left)
    samples = torch.cat(terms)  # [m, dim]
    value = base + samples.mean(dim=0)
    return Estimate(value.to(dtype), _std_error(samples).to(dtype), num_matvecs)


@dataclass(frozen=True)
class LanczosResult:
    """``T = tridiag(beta, alpha, beta)`` with ``Qᵀ A Q = T``; ``basis`` ``[dim, m]`` (or
    ``None`` when not kept); ``residual`` = the last ``β_m``, the norm of the part of
    ``A q_m`` outside the Krylov space (tiny when it became invariant and the run stopped
    early)."""

    alpha: Tensor
    beta: Tensor
    residual: Tensor
    basis: Tensor | None


def lanczos(
    matvec: MatVec,
    start: Tensor,
    num_steps: int,
    *,
    keep_basis: bool = False,
) -> LanczosResult:
    """``num_steps`` Lanczos steps from ``start`` ``[dim]``, with full reorthogonalization
    (two Gram–Schmidt passes; memory ``dim × num_steps``). Stops early when the Krylov
    space becomes invariant (``β < √ε · ‖T‖``)."""
    owner = "lanczos"
    dim = start.shape[0]
    _check_count(num_steps, "num_steps", owner)
    num_steps = min(num_steps, dim)
    norm = torch.linalg.vector_norm(start)
    if not bool(norm > 0):
        raise ValueError(f"{owner}: start must be a nonzero vector.")
    q = start / norm
    basis = torch.empty(dim, num_steps, dtype=start.dtype, device=start.device)
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    scale = torch.zeros((), dtype=torch.float64)
    tol = math.sqrt(torch.finfo(start.dtype).eps)
    residual = torch.zeros((), dtype=torch.float64)
    for j in range(num_steps):
        basis[:, j] = q
        w = _apply(matvec, q.unsqueeze(1), owner).squeeze(1)
        alpha = torch.dot(q, w)
        w = w - alpha * q - (betas[-1].to(w.dtype) * basis[:, j - 1] if j else 0.0)
        Qj = basis[:, : j + 1]
        for _ in range(2):
            w = w - Qj @ (Qj.T @ w)
        beta = torch.linalg.vector_norm(w).double()
        alphas.append(alpha.double())
        scale = torch.maximum(scale, alpha.double().abs() + beta)
        if not bool(torch.isfinite(beta)):
            raise LinAlgError(f"{owner}: the operator returned non-finite values at step {j}.")
        if bool(beta <= tol * scale) or j == num_steps - 1:
            residual = beta
            break
        betas.append(beta)
        q = w / beta.to(w.dtype)
    m = len(alphas)
    return LanczosResult(
        alpha=torch.stack(alphas),
        beta=torch.stack(betas) if betas else torch.zeros(0, dtype=torch.float64),
        residual=residual,
        basis=basis[:, :m] if keep_basis else None,
    )


def _tridiagonal(alpha: Tensor, beta: Tensor) -> Tensor:
    T = torch.diag(alpha)
    if beta.numel():
        T = T + torch.diag(beta, 1) + torch.diag(beta, -1)
    return T


def lanczos_eigenvalues(
    matvec: MatVec,
    dim: int,
    k: int,
    *,
    num_steps: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Estimate:
    """The ``k`` largest eigenvalues (descending) from the Ritz values of ``num_steps``
    Lanczos steps (default ``min(dim, 2k + 30)``) from a Gaussian start.

    ``error[i]`` is the residual bound ``|β_m s_{m,i}|`` (``s`` the eigenvectors of ``T``)
    plus the rounding level ``ε‖T‖`` of the dtype: an eigenvalue of ``A`` lies within it.
    Exact when the operator has at most ``num_steps - 1`` distinct eigenvalues (the Krylov
    space becomes invariant). A single-vector Lanczos sees each distinct eigenvalue once:
    repeated eigenvalues are reported once (a rank-deficient operator's zeros fill the
    tail).
    """
    owner = "lanczos_eigenvalues"
    _check_count(dim, "dim", owner)
    _check_count(k, "k", owner)
    if k > dim:
        raise ValueError(f"{owner}: k={k} exceeds the operator's dimension {dim}.")
    steps = (
        min(dim, 2 * k + 30) if num_steps is None else _check_count(num_steps, "num_steps", owner)
    )
    steps = max(min(steps, dim), k)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(dim, generator=generator, dtype=torch.float64).to(
        dtype=dtype, device=device
    )
    result = lanczos(matvec, start, steps)
    theta, S = torch.linalg.eigh(_tridiagonal(result.alpha, result.beta))
    # |β_m s_{m,i}| plus the rounding level of the products (ε of the dtype times ‖T‖)
    rounding = torch.finfo(dtype).eps * float(theta.abs().max())
    bounds = (result.residual * S[-1, :]).abs() + rounding
    order = torch.argsort(theta, descending=True)
    theta, bounds = theta[order], bounds[order]
    if theta.numel() < k:  # invariant subspace smaller than k: the rest is unresolved
        missing = k - theta.numel()
        theta = torch.cat([theta, torch.full((missing,), math.nan, dtype=theta.dtype)])
        bounds = torch.cat([bounds, torch.full((missing,), math.inf, dtype=bounds.dtype)])
    return Estimate(
        theta[:k].to(dtype=dtype, device=device),
        bounds[:k].to(dtype=dtype, device=device),
        int(result.alpha.numel()),
    )


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature of a ``[dim, dim]`` symmetric operator.

    ``nodes``/``weights`` ``[num_probes, num_steps]`` (float64): probe ``i``'s Gauss
    quadrature, ``Σ_j weights[i, j] f(nodes[i, j]) ≈ zᵢᵀ f(A) zᵢ / ‖zᵢ‖²`` (unused slots of
    a run that stopped early have weight 0). The spectral measure
    ``(1/dim) Σ_λ δ(t − λ)`` is approximated by the average of the probes' measures.
    """

    nodes: Tensor
    weights: Tensor
    dim: int

    def trace_function(self, fn: Callable[[Tensor], Tensor]) -> Estimate:
        """``tr f(A) ≈ dim · mean_i Σ_j weights[i, j] f(nodes[i, j])`` with its standard
        error over the probes (e.g. ``fn=torch.log`` of a damped operator: its log-det)."""
        per_probe = self.dim * (self.weights * fn(self.nodes)).sum(dim=1)
        return Estimate(per_probe.mean(), _std_error(per_probe), int(self.weights.numel()))

    def grid(self, num_points: int = 200, margin: float = 0.05) -> Tensor:
        """``num_points`` equispaced points covering the nodes, widened on both sides by
        ``margin`` times their spread."""
        used = self.nodes[self.weights > 0]
        lo, hi = float(used.min()), float(used.max())
        pad = margin * (hi - lo if hi > lo else max(abs(hi), 1e-12))
        return torch.linspace(lo - pad, hi + pad, num_points, dtype=torch.float64)

    def density(self, grid: Tensor, width: float | None = None) -> Tensor:
        """The density on ``grid`` ``[G]``: the quadrature measures smoothed by a Gaussian
        of standard deviation ``width`` (default: 1 % of the spread of the nodes);
        integrates to 1 over a wide enough grid."""
        if width is None:
            used = self.nodes[self.weights > 0]
            width = 0.01 * max(float(used.max() - used.min()), 1e-12)
        if not width > 0:
            raise ValueError(f"SpectralDensity.density: width must be > 0, got {width}.")
        t = grid.double().reshape(-1, 1, 1)
        kernel = torch.exp(-0.5 * ((t - self.nodes) / width) ** 2) / (
            width * math.sqrt(2 * math.pi)
        )
        return (kernel * self.weights).sum(dim=2).mean(dim=1)


def spectral_density(
    matvec: MatVec,
    dim: int,
    *,
    num_probes: int = 8,
    num_steps: int = 40,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019): ``num_probes``
    Lanczos runs of ``num_steps`` from Rademacher starts; each gives the Gauss quadrature
    ``(θ_j, τ_j = s_{1,j}²)`` of its probe's spectral measure (``θ``/``s`` the eigenvalues
    and eigenvectors of ``T``). Cost: ``num_probes · num_steps`` products."""
    owner = "spectral_density"
    _check_count(dim, "dim", owner)
    _check_count(num_probes, "num_probes", owner)
    _check_count(num_steps, "num_steps", owner)
    steps = min(num_steps, dim)
    generator = torch.Generator().manual_seed(seed)
    nodes = torch.zeros(num_probes, steps, dtype=torch.float64)
    weights = torch.zeros(num_probes, steps, dtype=torch.float64)
    for i in range(num_probes):
        start = _probes(dim, 1, generator, dtype, device).squeeze(1)
        result = lanczos(matvec, start, steps)
        theta, S = torch.linalg.eigh(_tridiagonal(result.alpha, result.beta))
        m = theta.numel()
        nodes[i, :m] = theta.cpu()
        weights[i, :m] = S[0, :].cpu() ** 2
    return SpectralDensity(nodes, weights, dim)


def conjugate_gradient(
    matvec: MatVec,
    b: Tensor,
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iter: int | None = None,
) -> tuple[Tensor, int, float]:
    """Solve ``(A + damping·I) x = b`` (``b`` ``[dim]``) by conjugate gradients.

    Stops when ``‖r‖ <= tol · ‖b‖`` or after ``max_iter`` iterations (default ``dim``).
    Returns ``(x, iterations, relative residual)``. ``A + damping·I`` must be positive
    definite: a direction of non-positive curvature raises a :class:`LinAlgError`.
    """
    owner = "conjugate_gradient"
    dim = b.shape[0]
    limit = dim if max_iter is None else _check_count(max_iter, "max_iter", owner)
    x = torch.zeros_like(b)
    r = b.clone()
    b_norm = float(torch.linalg.vector_norm(b))
    if b_norm == 0.0:
        return x, 0, 0.0
    p = r.clone()
    rr = torch.dot(r, r)
    for it in range(1, limit + 1):
        Ap = _apply(matvec, p.unsqueeze(1), owner).squeeze(1) + damping * p
        curvature = torch.dot(p, Ap)
        if not bool(curvature > 0):
            raise LinAlgError(
                f"{owner}: the operator plus damping={damping} is not positive definite "
                f"(pᵀ(A + damping·I)p = {float(curvature):.3g} at iteration {it}); raise the "
                "damping (an indefinite Hessian needs damping above its most negative "
                "eigenvalue)."
            )
        step = rr / curvature
        x = x + step * p
        r = r - step * Ap
        rr_new = torch.dot(r, r)
        residual = math.sqrt(float(rr_new)) / b_norm
        if residual <= tol:
            return x, it, residual
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, limit, residual
