"""Shared pieces of the block-tridiagonal approximations (concepts/block_tridiagonal.md#the-math).

* :class:`ForwardOrder` records the order in which the forward pass calls the layers —
  the chain ``w_1 — w_2 — … — w_ℓ`` of the Gaussian graphical model follows it.
* :func:`chain_completion` is the dense maximum-entropy completion ``F̂`` of prescribed
  diagonal and first off-diagonal blocks: ``F̂_{i,j} = Ψ_i F̂_{i+1,j}`` for ``j > i`` with
  ``Ψ_i = F_{i,i+1} F_{i+1,i+1}⁺``, built positive semi-definite also from singular blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from curvlab.extraction.hooks import HookOwner, HookSet


class ForwardOrder(HookOwner):
    """Forward pre-hooks recording the call order of ``modules`` in each forward pass.

    ``strict``: every module must be called exactly once per forward. Otherwise a module
    is placed at its first call, and one never called through its own ``forward`` (e.g.
    ``out_proj`` inside ``nn.MultiheadAttention``, which calls it functionally) right after
    its nearest called ancestor (or at the end).

    The hooks hold this object through weak references (a :class:`HookSet`): they are
    removed by :meth:`close` (the curvature holding it closes it) or when it is garbage.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[nn.Module],
        names: Sequence[str],
        owner: str,
        strict: bool = True,
    ) -> None:
        self.names = list(names)
        self.owner = owner
        self.strict = strict
        self.calls: list[int] = []
        self.order: list[int] | None = None
        self._hooks = HookSet(self)
        self._hooks.forward_pre(model, "_begin")
        for index, module in enumerate(modules):
            self._hooks.forward_pre(module, "_called", index)

    def _begin(self, module: nn.Module, args: tuple[object, ...]) -> None:
        self.calls.clear()

    def _called(self, index: int, module: nn.Module, args: tuple[object, ...]) -> None:
        self._record(index)

    def _record(self, index: int) -> None:
        if index in self.calls and not self.strict:
            return
        if index in self.calls:
            raise RuntimeError(
                f"{self.owner}: layer '{self.names[index]}' was called twice in one forward "
                "pass; every layer must be called exactly once to define the chain of layers."
            )
        self.calls.append(index)

    def confirm(self) -> list[int]:
        """The order of the last forward pass, checked against earlier ones."""
        calls = list(self.calls)
        if not self.strict:
            calls = self._complete(calls)
        if sorted(calls) != list(range(len(self.names))):
            raise RuntimeError(
                f"{self.owner}: every layer must be called exactly once per forward pass to "
                f"define the chain of layers (call order seen: {calls})."
            )
        if self.order is not None and calls != self.order:
            raise RuntimeError(
                f"{self.owner}: the layers were called in a different order ({calls}) than "
                f"in earlier batches ({self.order})."
            )
        self.order = calls
        return calls

    def _complete(self, calls: list[int]) -> list[int]:
        """Insert the modules not called through their ``forward`` after their ancestor."""
        order = list(calls)
        for index, name in enumerate(self.names):
            if index in order:
                continue
            parents = [
                i
                for i, other in enumerate(self.names)
                if i in order and (other == "" or name.startswith(other + "."))
            ]
            if parents:
                nearest = max(parents, key=lambda i: len(self.names[i]))
                order.insert(order.index(nearest) + 1, index)
            else:
                order.append(index)
        return order


def chain_completion(diag: Sequence[Tensor], off: Sequence[Tensor]) -> Tensor:
    """Dense ``F̂`` from diagonal blocks ``diag[i]`` and super-diagonal blocks ``off[i]``.

    ``F̂`` is built as the covariance of the Gaussian chain, ``w_ℓ ~ N(0, F_{ℓ,ℓ})`` and
    ``w_i = Ψ_i w_{i+1} + ε_i`` with ``ε_i ~ N(0, Σ_i)`` (concepts/block_tridiagonal.md#the-math),
    in the factored form ``F̂ = B Bᵀ``: it is positive semi-definite by construction, also when
    blocks are singular in exact arithmetic (one sequence, attention), where forming
    ``Σ_i = F_{i,i} − Ψ_i F_{i+1,i}`` by subtraction is not. ``Ψ_i`` and a square root of
    ``Σ_i`` come from a least-squares regression of layer ``i`` on layer ``i+1`` within a
    square root of the pair's joint block (:func:`_regression`).
    """
    n = len(diag)
    if n == 0:
        return torch.zeros(0, 0)
    dtype = diag[0].dtype
    # float64 arithmetic: the roots' rounding stays far below the cutoff set by ``dtype``
    eps = float(torch.finfo(dtype).eps)
    diag = [d.double() for d in diag]
    off = [o.double() for o in off]
    # rows[i]: block row i of B, [n_i, sources]. Built from the last layer up, so that each
    # regression sees the covariance its successor actually has in F̂ rather than
    # F_{i+1,i+1}: their rounding-level difference would be amplified by Ψ_i along weakly
    # excited directions
    rows = [_psd_root(diag[-1]).T]
    for i in range(n - 2, -1, -1):
        successor = rows[0] @ rows[0].T
        psi_i, residual = _regression(diag[i], off[i], successor, eps)
        rows = [torch.cat([psi_i @ rows[0], residual.T], dim=1)] + [
            torch.cat([r, r.new_zeros(r.shape[0], residual.shape[0])], dim=1) for r in rows
        ]
    factor = torch.cat(rows, dim=0)
    return (factor @ factor.T).to(dtype)


def _psd_root(block: Tensor) -> Tensor:
    """``R`` with ``RᵀR = block`` (eigenvalues below zero, rounding, count as zero)."""
    values, vectors = torch.linalg.eigh((block + block.T) / 2)
    return values.clamp(min=0).sqrt().unsqueeze(1) * vectors.T


def _regression(upper: Tensor, cross: Tensor, lower: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``Ψ`` and a square root of ``Σ`` for the pair ``[[upper, cross], [crossᵀ, lower]]``.

    With ``C = [C_u, C_l]`` a square root of the joint block (its rows act as samples),
    ``Ψᵀ`` is the least-squares solution of ``C_l Ψᵀ ≈ C_u`` and the residual
    ``C_u − C_l Ψᵀ`` is a square root of ``Σ`` (a Gram matrix: never indefinite). Directions
    of ``C_l`` with singular values below ``eps^0.35`` of the joint's largest (``eps`` of
    the blocks' own dtype; eigenvalues below ``eps^0.7``) are rounding, not variance, and
    are left out: above the rounding of blocks accumulated from many samples, below the
    smallest genuine relative eigenvalues the fuzzer draws (tests/curvature/test_fuzz.py).
    """
    size = upper.shape[0]
    joint = torch.cat([torch.cat([upper, cross], 1), torch.cat([cross.T, lower], 1)], 0)
    root = _psd_root(joint)
    c_upper, c_lower = root[:, :size], root[:, size:]
    u, s, vh = torch.linalg.svd(c_lower, full_matrices=False)
    # root's rows are orthogonal (√λ_i v_iᵀ): its spectral norm is its largest row norm
    scale = float(torch.linalg.vector_norm(root, dim=1).max()) if root.numel() else 0.0
    cutoff = eps**0.35 * scale
    keep = s > cutoff
    u, s, vh = u[:, keep], s[keep], vh[keep]
    coefficients = u.T @ c_upper  # [k, n_u]
    psi = (vh.T @ (coefficients / s.unsqueeze(1))).T  # [n_u, n_l]
    residual = c_upper - u @ coefficients
    return psi, residual
