"""K-FAC's block-tridiagonal inverse (Martens & Grosse 2015 §4.3, App. B;
concepts/block_tridiagonal.md#the-math).

Used by ``KFAC(..., structure="block_tridiagonal")`` (and ``KFC``). Layers are chained in
forward-call order. Two consecutive layers are *coupled* when both see one position per
sample (no weight sharing: ``T = 1``), so that their statistics share the sample axis;
the cross moments are then accumulated from the same samples and columns, with the same
averaging, as the diagonal factors (concepts/block_tridiagonal.md#the-math):

* ``Ā_{k,k+1} = Σ_n ā_k ā_{k+1}ᵀ / N`` (layer inputs, homogeneous), ``[D_in_k, D_in_{k+1}]``;
* ``G_{k,k+1} = Σ_{n,c} g_k g_{k+1}ᵀ`` on the loss's scale, ``[D_out_k, D_out_{k+1}]``.

Elsewhere (e.g. a convolution feeding a linear layer through a flatten) the chain is cut
and the structure falls back to block-diagonal at that boundary. Every layer's diagonal
factors get factored Tikhonov damping (``A + πγI``, ``G + γ/π I``, ``γ = √λ``), used
wherever they appear (in the diagonal blocks, ``Ψ`` and ``Σ``); cross moments are not
damped (concepts/block_tridiagonal.md#the-math). Per maximal coupled run ``1..m`` of layers
(row-major matrices
``V_k`` of shape ``[D_out_k, D_in_k]``):

* ``Ψ_k = Ψ^G_k ⊗ Ψ^A_k`` with ``Ψ^G_k = G_{k,k+1} Ĝ_{k+1}⁻¹``, ``Ψ^A_k = Ā_{k,k+1} Â_{k+1}⁻¹``;
* ``Σ_k = Ĝ_k ⊗ Â_k − (G_{k,k+1} Ĝ_{k+1}⁻¹ G_{k,k+1}ᵀ) ⊗ (Ā_{k,k+1} Â_{k+1}⁻¹ Ā_{k,k+1}ᵀ)``,
  inverted by the generalized-eigen Kronecker-sum solve; ``Σ_m = Ĝ_m ⊗ Â_m``;
* ``u = Ξᵀ Λ Ξ v``: ``W_k = V_k − Ψ^G_k V_{k+1} Ψ^Aᵀ_k``, ``Z_k = Σ_k⁻¹ W_k``,
  ``U_k = Z_k − Ψ^Gᵀ_{k-1} Z_{k-1} Ψ^A_{k-1}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

from curvlab import linalg
from curvlab.extraction import KroneckerBatch


@dataclass
class _Link:
    """The factorisation of one coupled boundary ``k → k+1`` for a given damping."""

    psi_g: Tensor
    psi_a: Tensor
    sigma: linalg.KronSumInverse


class KroneckerChain:
    """Cross-layer statistics and the damped block-tridiagonal inverse of a K-FAC backend."""

    def __init__(self, owner: str, num_layers: int) -> None:
        self.owner = owner
        self.num_layers = num_layers
        self.order: list[int] | None = None  # layers in forward order
        self.coupled: list[bool] | None = None  # boundary order[k] → order[k+1] coupled?
        self.a_sum: list[Tensor | None] = []
        self.a_count = 0
        self.g_sum: list[Tensor | None] = []

    # --- statistics --------------------------------------------------------------------

    def accumulate(self, batches: list[KroneckerBatch], weight: float, order: list[int]) -> None:
        """Add one batch's cross moments of every coupled consecutive pair."""
        coupled = [_shares_samples(batches[i], batches[j]) for i, j in pairwise(order)]
        if self.coupled is None:
            self.order, self.coupled = list(order), coupled
            self.a_sum = [None] * len(coupled)
            self.g_sum = [None] * len(coupled)
        elif coupled != self.coupled or order != self.order:
            raise RuntimeError(
                f"{self.owner}: the chain of layers changed between batches (order {order}, "
                f"coupled boundaries {coupled}); it must stay fixed."
            )
        for k, (i, j) in enumerate(pairwise(order)):
            if not coupled[k]:
                continue
            first, second = batches[i], batches[j]
            assert first.patches is not None and second.patches is not None
            assert first.columns is not None and second.columns is not None
            a = first.patches[:, 0].T @ second.patches[:, 0]
            cols_i = first.columns.reshape(-1, first.columns.shape[-1])
            cols_j = second.columns.reshape(-1, second.columns.shape[-1])
            g = (cols_i.T @ cols_j) * (first.column_scale * weight)
            old_a, old_g = self.a_sum[k], self.g_sum[k]
            self.a_sum[k] = a if old_a is None else old_a + a
            self.g_sum[k] = g if old_g is None else old_g + g
        self.a_count += batches[order[0]].patches.shape[0]  # type: ignore[union-attr]

    def reset(self) -> None:
        self.a_sum = [None] * len(self.a_sum)
        self.g_sum = [None] * len(self.g_sum)
        self.a_count = 0

    def cross(self, normalizer: float) -> list[tuple[Tensor, Tensor] | None]:
        """Per boundary (forward order) ``(Ā_{k,k+1}, G_{k,k+1})`` or ``None`` if cut."""
        out: list[tuple[Tensor, Tensor] | None] = []
        for a, g in zip(self.a_sum, self.g_sum):
            out.append(None if a is None or g is None else (a / self.a_count, g / normalizer))
        return out

    def runs(self) -> list[list[int]]:
        """Maximal coupled runs of layer indices, in forward order."""
        assert self.order is not None and self.coupled is not None
        runs = [[self.order[0]]]
        for k, linked in enumerate(self.coupled):
            nxt = self.order[k + 1]
            if linked:
                runs[-1].append(nxt)
            else:
                runs.append([nxt])
        return runs

    def state(self) -> dict[str, Any]:
        return {
            "order": None if self.order is None else tuple(self.order),
            "coupled": None if self.coupled is None else tuple(self.coupled),
            "a_cross": list(self.a_sum),
            "a_cross_count": self.a_count,
            "g_cross": list(self.g_sum),
        }

    def load(self, state: dict[str, Any], copy: bool) -> None:
        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else (t.clone() if copy else t)

        self.order = None if state["order"] is None else list(state["order"])
        self.coupled = None if state["coupled"] is None else list(state["coupled"])
        self.a_sum = [take(t) for t in state["a_cross"]]
        self.g_sum = [take(t) for t in state["g_cross"]]
        self.a_count = int(state["a_cross_count"])

    # --- the damped inverse ------------------------------------------------------------

    def factorise(
        self,
        factors: list[Any],
        cross: list[tuple[Tensor, Tensor] | None],
        damping: float,
    ) -> tuple[list[tuple[Tensor, Tensor]], dict[int, _Link], list[tuple[Tensor, Tensor]]]:
        """Damped factors ``(Ĝ, Â)``, the links of coupled boundaries (by the first layer's
        index) and, per layer, ``(Ĝ⁻¹, Â⁻¹)`` for the last layer of each run."""
        damped = [linalg.factored_damping(f.G, f.A, damping) for f in factors]
        chol = [
            (
                linalg.cholesky_factor(g, name=f"{self.owner} layer {k} Ĝ", keep_float64=True),
                linalg.cholesky_factor(a, name=f"{self.owner} layer {k} Â", keep_float64=True),
            )
            for k, (g, a) in enumerate(damped)
        ]
        inverses = [
            (torch.cholesky_inverse(cg).to(g.dtype), torch.cholesky_inverse(ca).to(a.dtype))
            for (cg, ca), (g, a) in zip(chol, damped)
        ]
        links: dict[int, _Link] = {}
        assert self.order is not None
        for k, pair in enumerate(cross):
            if pair is None:
                continue
            i, j = self.order[k], self.order[k + 1]
            a_cross, g_cross = pair
            psi_g = linalg.cholesky_solve(chol[j][0], g_cross.T).T  # G_{i,j} Ĝ_j⁻¹
            psi_a = linalg.cholesky_solve(chol[j][1], a_cross.T).T  # Ā_{i,j} Â_j⁻¹
            d_g = psi_g @ g_cross.T
            c_a = psi_a @ a_cross.T
            sigma = linalg.KronSumInverse.from_factors(
                damped[i][0],
                damped[i][1],
                (d_g + d_g.T) / 2,
                (c_a + c_a.T) / 2,
                sign=-1,
                name=f"{self.owner} Σ of layers {i}→{j}",
            )
            links[i] = _Link(psi_g=psi_g, psi_a=psi_a, sigma=sigma)
        return damped, links, inverses

    def solve(
        self,
        mats: list[Tensor],
        links: dict[int, _Link],
        inverses: list[tuple[Tensor, Tensor]],
    ) -> list[Tensor]:
        """``F̂_λ⁻¹`` applied to per-layer matrices ``mats`` (indexed by layer)."""
        out: list[Tensor | None] = [None] * len(mats)
        for run in self.runs():
            # w = Ξ v
            w = [
                mats[i] - links[i].psi_g @ mats[run[k + 1]] @ links[i].psi_a.T
                if k + 1 < len(run)
                else mats[i]
                for k, i in enumerate(run)
            ]
            # z = Λ w
            z = []
            for k, i in enumerate(run):
                if k + 1 < len(run):
                    z.append(links[i].sigma.solve(w[k]))
                else:
                    inv_g, inv_a = inverses[i]
                    z.append(inv_g @ w[k] @ inv_a)
            # u = Ξᵀ z
            for k, i in enumerate(run):
                u = z[k]
                if k > 0:
                    prev = links[run[k - 1]]
                    u = u - prev.psi_g.T @ z[k - 1] @ prev.psi_a
                out[i] = u
        assert all(o is not None for o in out)
        return [o for o in out if o is not None]


def _shares_samples(first: KroneckerBatch, second: KroneckerBatch) -> bool:
    """Both layers see exactly one position per sample and the same samples and columns."""
    if first.patches is None or second.patches is None:
        return False
    if first.columns is None or second.columns is None:
        return False
    return (
        first.patches.shape[1] == 1
        and second.patches.shape[1] == 1
        and first.patches.shape[0] == second.patches.shape[0]
        and first.columns.shape[:3] == second.columns.shape[:3]
    )
