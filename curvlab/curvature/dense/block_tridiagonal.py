"""``BlockTridiagonal``: the Fisher's tridiagonal layer blocks, completed so its inverse is
block-tridiagonal (Martens & Grosse 2015 §4.3; concepts/block_tridiagonal.md#the-math).

Layers are ordered as the forward pass calls them (recorded by forward pre-hooks, which
hold the curvature weakly: ``close()`` or dropping the curvature removes them, and copies
of the model carry none, concepts/models.md#lifecycle-hooks-recordings-copies); the
blocks ``F_{i,i}`` and ``F_{i,i+1}`` are accumulated densely from the factor rows.
The approximation ``F̂`` agrees with ``F`` on those blocks and is the maximum-entropy
completion — a Gaussian chain ``w_1 — w_2 — … — w_ℓ`` over the layers' gradients:

* ``F̂_{i,j} = Ψ_i Ψ_{i+1} ⋯ Ψ_{j-1} F_{j,j}`` for ``j > i`` with ``Ψ_i = F_{i,i+1} F_{i+1,i+1}⁺``;
* ``F̂⁻¹ = Ξᵀ Λ Ξ``: ``Ξ`` block upper-bidiagonal (``I`` on the diagonal, ``−Ψ_i`` above),
  ``Λ = diag(Σ_1⁻¹, …, Σ_ℓ⁻¹)`` with the Schur complements ``Σ_i = F_{i,i} − Ψ_i F_{i+1,i}``,
  ``Σ_ℓ = F_{ℓ,ℓ}``.

**Damping**: ``solve(v, λ)`` applies ``F̂_λ⁻¹``, the same construction from the damped
blocks — ``λI`` is added to every diagonal block ``F_{i,i}`` *before* ``Ψ`` and ``Σ`` are
formed (off-diagonal blocks untouched). ``F̂_λ`` agrees with ``F + λI`` on the tridiagonal
blocks; it is not ``F̂ + λI``. Every ``Σ_i`` is then a Schur complement of a block of
``F + λI`` and positive definite for ``λ > 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvlab import linalg
from curvlab.curvature.base import (
    Curvature,
    DecompositionBlock,
    NamedTensor,
    RunningSum,
    StateTag,
    Vector,
)
from curvlab.curvature.chain import ForwardOrder, chain_completion
from curvlab.curvature.dense.block_diagonal import BlockDiagonal
from curvlab.curvature.registry import register
from curvlab.extraction import BatchResult


@register("block_tridiagonal")
class BlockTridiagonal(BlockDiagonal):
    """Dense block-tridiagonal-inverse approximation of the Fisher (see the module docstring).

    ``fisher_type`` is ``"exact"``, ``"mc"`` or ``"empirical"``, as for
    :class:`BlockDiagonal`. Meant for small models and ablations (dense blocks).
    """

    running_state = (
        *BlockDiagonal.running_state,
        RunningSum("off", "_off", legacy="off"),  # Σ_b w_b F_{i,i+1} (forward order)
        StateTag("order", "_order", legacy="order"),  # layer indices in forward order (a tuple)
    )

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        fisher_type: str = "exact",
        mc_samples: int = 1,
        engine: str = "auto",
    ) -> None:
        super().__init__(
            model, loss_fn, fisher_type=fisher_type, mc_samples=mc_samples, engine=engine
        )
        self._off: list[Tensor] | None = None
        self._forward = ForwardOrder(
            self.model,
            [layer.module for layer in self.layers],
            [layer.name for layer in self.layers],
            owner=type(self).__name__,
            strict=False,
        )
        self._order: tuple[int, ...] | None = None
        self._inverse: tuple[float, list[Tensor], list[Tensor]] | None = None

    # --- statistics -----------------------------------------------------------------------

    def _accumulate(self, result: BatchResult, weight: float) -> None:
        super()._accumulate(result, weight)
        self._order = tuple(self._forward.confirm())
        per_param = self._rows(result)
        rows, start = [], 0
        for layer in self.layers:
            stop = start + len(layer.params)
            rows.append(torch.cat(per_param[start:stop], dim=1))
            start = stop
        pairs = zip(self._order[:-1], self._order[1:])
        off = [weight * rows[i].T @ rows[j] for i, j in pairs]
        if self._off is None:
            self._off = off
        else:
            self._off = [a + b for a, b in zip(self._off, off)]

    def _invalidate(self) -> None:
        super()._invalidate()
        self._inverse = None

    def _chain(self) -> tuple[list[Tensor], list[Tensor]]:
        """Diagonal and super-diagonal blocks in forward order, normalised."""
        assert self._off is not None and self._order is not None
        diag = self.blocks()
        return [diag[i] for i in self._order], [b / self._normalizer for b in self._off]

    # --- products -------------------------------------------------------------------------

    def _completion(self) -> Tensor:
        """``F̂`` in forward order (dense)."""
        return chain_completion(*self._chain())

    def _to_dense(self) -> Tensor:
        assert self._order is not None
        # forward order -> parameter order
        sizes = [self.layers[i].numel for i in self._order]
        starts = [sum(layer.numel for layer in self.layers[:i]) for i in self._order]
        index = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, sizes)])
        dense_fwd = self._completion()
        dense = torch.empty_like(dense_fwd)
        dense[index.unsqueeze(1), index.unsqueeze(0)] = dense_fwd
        return dense

    # the completion keeps the diagonal blocks (trace, diagonal: the block forms) but fills
    # every off-diagonal block: norms and spectra come from the dense matrix
    _frobenius_norm = Curvature._frobenius_norm
    _logdet = Curvature._logdet
    _eigenvalues = Curvature._eigenvalues

    def _matvec(self, v: Vector) -> Vector:
        x = self._flatten(v)
        return self._unflatten(self._to_dense().to(x.dtype) @ x)

    def _split_forward(self, x: Tensor) -> list[Tensor]:
        assert self._order is not None
        chunks = []
        for i in self._order:
            a, b = self._ranges[i]
            chunks.append(x[self._offsets[a] : self._offsets[b]])
        return chunks

    def _factorise(self, damping: float) -> tuple[list[Tensor], list[Tensor]]:
        """``Ψ_i`` and Cholesky factors of ``Σ_i`` from the damped diagonal blocks."""
        if self._inverse is not None and self._inverse[0] == damping:
            return self._inverse[1], self._inverse[2]
        self.num_decompositions += 1
        diag, off = self._chain()
        eye = [torch.eye(len(d), dtype=d.dtype, device=d.device) for d in diag]
        damped = [d + damping * e for d, e in zip(diag, eye)]
        n = len(diag)
        # D_i's Cholesky factor is needed for Ψ_{i-1} (i ≥ 1) and, for the last block, as Σ_ℓ
        chol_next = {
            i: linalg.cholesky_factor(
                damped[i], name=f"BlockTridiagonal block {i}", keep_float64=True
            )
            for i in range(min(1, n - 1), n)
        }
        psi, sigma_chol = [], []
        for i in range(n - 1):
            # Ψ_i = F_{i,i+1} D_{i+1}⁻¹ (solve with D_{i+1}'s Cholesky factor)
            psi_i = linalg.cholesky_solve(chol_next[i + 1], off[i].T).T
            sigma = damped[i] - psi_i @ off[i].T
            sigma_chol.append(
                linalg.cholesky_factor(
                    (sigma + sigma.T) / 2, name=f"BlockTridiagonal Σ_{i}", keep_float64=True
                )
            )
            psi.append(psi_i)
        sigma_chol.append(chol_next[n - 1])
        self._inverse = (damping, psi, sigma_chol)
        return psi, sigma_chol

    def _solve(self, v: Vector, damping: float) -> Vector:
        psi, sigma_chol = self._factorise(damping)
        x = self._flatten(v)
        parts = self._split_forward(x)
        n = len(parts)
        # w = Ξ v; z = Λ w; u = Ξᵀ z (concepts/block_tridiagonal.md#the-math, dense blocks)
        w = [parts[i] - psi[i] @ parts[i + 1] for i in range(n - 1)] + [parts[-1]]
        z = [linalg.cholesky_solve(c, wi) for c, wi in zip(sigma_chol, w)]
        u = [z[0]] + [z[i] - psi[i - 1].T @ z[i - 1] for i in range(1, n)]
        out = torch.empty_like(x)
        assert self._order is not None
        for k, i in enumerate(self._order):
            a, b = self._ranges[i]
            out[self._offsets[a] : self._offsets[b]] = u[k]
        return self._unflatten(out)

    # --- distribution: the chain is factorised as one block ------------------------------

    def _decomposition_blocks(self) -> list[DecompositionBlock]:
        sizes = [layer.numel for layer in self.layers]
        return [
            DecompositionBlock(
                index=0,
                name="BlockTridiagonal chain (all layers)",
                param_indices=tuple(range(len(self.params))),
                cost=float(sum(n**3 for n in sizes)),
            )
        ]

    def _decompose(self, index: int, damping: float) -> None:
        self._factorise(damping)

    def _export_decomposition(self, index: int, damping: float) -> list[NamedTensor]:
        if self._inverse is None or self._inverse[0] != damping:
            raise RuntimeError("BlockTridiagonal: the chain is not decomposed yet.")
        _, psi, sigma_chol = self._inverse
        return [
            *(NamedTensor(f"Ψ_{i}", t) for i, t in enumerate(psi)),
            *(
                NamedTensor(f"Σ_{i} Cholesky factor", t, "lower_triangular")
                for i, t in enumerate(sigma_chol)
            ),
        ]

    def _import_decomposition(self, index: int, damping: float, tensors: list[Tensor]) -> None:
        count = len(self.layers)
        self._inverse = (damping, list(tensors[: count - 1]), list(tensors[count - 1 :]))

    def _solve_block(self, index: int, v: Vector, damping: float) -> Vector:
        return self._solve(v, damping)
