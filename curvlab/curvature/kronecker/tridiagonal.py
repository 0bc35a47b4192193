"""K-FAC's block-tridiagonal inverse (Martens & Grosse 2015 §4.3, App. B;
concepts/block_tridiagonal.md#the-math).

:class:`BlockTridiagonalKFAC` (registry name ``"block_tridiagonal_kfac"``) holds the factors
of every layer and a :class:`KroneckerChain` of the cross moments and the damped inverse.
Layers are chained in forward-call order. Two consecutive layers are *coupled* when both
see one position per sample (no weight sharing: ``T = 1``), so that their statistics share
the sample axis;
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

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from curvlab import linalg
from curvlab.curvature.base import (
    DecompositionBlock,
    NamedTensor,
    RunningCount,
    RunningSum,
    StateTag,
    Vector,
)
from curvlab.curvature.chain import ForwardOrder, chain_completion
from curvlab.curvature.kronecker.factored import KroneckerFactored, LayerSpec, _as_matrix
from curvlab.curvature.registry import register
from curvlab.extraction import KroneckerBatch
from curvlab.extraction import layers as layer_rules


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
        self.order: tuple[int, ...] | None = None  # layers in forward order
        self.coupled: tuple[bool, ...] | None = None  # boundary order[k] → order[k+1] coupled?
        # per boundary (None where cut; None before the first batch): Σ ā_k ā_{k+1}ᵀ over
        # a_count samples and Σ_b w_b Σ g_k g_{k+1}ᵀ
        self.a_sum: list[Tensor | None] | None = None
        self.a_count = 0
        self.g_sum: list[Tensor | None] | None = None

    # --- statistics --------------------------------------------------------------------

    def accumulate(self, batches: list[KroneckerBatch], weight: float, order: list[int]) -> None:
        """Add one batch's cross moments of every coupled consecutive pair."""
        coupled = tuple(_shares_samples(batches[i], batches[j]) for i, j in pairwise(order))
        if self.coupled is None:
            self.order, self.coupled = tuple(order), coupled
        elif coupled != self.coupled or tuple(order) != self.order:
            raise RuntimeError(
                f"{self.owner}: the chain of layers changed between batches (order {order}, "
                f"coupled boundaries {coupled}); it must stay fixed."
            )
        if self.a_sum is None or self.g_sum is None:
            self.a_sum, self.g_sum = [None] * len(coupled), [None] * len(coupled)
        count = None
        for k, (i, j) in enumerate(pairwise(order)):
            if not coupled[k]:
                continue
            first, second = batches[i], batches[j]
            assert first.patches is not None and second.patches is not None
            assert first.columns is not None and second.columns is not None
            # the samples whose inputs entered the diagonal factors (rows the loss ignores
            # do not; concepts/models.md#rows-the-loss-ignores)
            kept = _kept_samples(first) & _kept_samples(second)
            a = first.patches[kept, 0].T @ second.patches[kept, 0]
            cols_i = first.columns.reshape(-1, first.columns.shape[-1])
            cols_j = second.columns.reshape(-1, second.columns.shape[-1])
            g = (cols_i.T @ cols_j) * (first.column_scale * weight)
            old_a, old_g = self.a_sum[k], self.g_sum[k]
            self.a_sum[k] = a if old_a is None else old_a + a
            self.g_sum[k] = g if old_g is None else old_g + g
            count = int(kept.sum()) if count is None else count
        if count is None:
            count = batches[order[0]].patches.shape[0]  # type: ignore[union-attr]
        self.a_count += count

    def cross(self, normalizer: float) -> list[tuple[Tensor, Tensor] | None]:
        """Per boundary (forward order) ``(Ā_{k,k+1}, G_{k,k+1})`` or ``None`` if cut."""
        out: list[tuple[Tensor, Tensor] | None] = []
        for a, g in zip(self.a_sum or [], self.g_sum or []):
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


@register("block_tridiagonal_kfac")
class BlockTridiagonalKFAC(KroneckerFactored):
    """K-FAC with consecutive layers coupled: a block-tridiagonal inverse (Martens & Grosse
    2015 §4.3; concepts/block_tridiagonal.md#the-math).

    The factors are K-FAC's; the layers are chained in forward order and each coupled
    boundary adds the cross moments ``Ā_{k,k+1}``, ``G_{k,k+1}`` (module docstring). The
    damped inverse uses factored damping of the diagonal factors (the only damping defined
    for it); ``matvec``/``to_dense`` and the spectral quantities use the dense completion
    (small models). Every parameter must sit in a Kronecker block.

    Every layer type of the rule table gets a Kronecker block, as in :class:`~curvlab.KFAC`.
    The arguments are :class:`~curvlab.KFAC`'s, without the block-diagonal options
    (``damping_mode``, ``separate_bias``, ``factor_dtype``, ``inverse_dtype``,
    ``recurrent``, ``output_factor``, ``output_rank``): the chain keeps dense factors in
    the statistics' dtype and damps them the factored way.
    """

    #: K-FAC's factors and the chain's cross moments per boundary (forward order)
    running_state = (
        *KroneckerFactored.running_state,
        RunningSum("A_cross", "_chain.a_sum", per="a_cross_count", legacy="chain.a_cross"),
        RunningSum("G_cross", "_chain.g_sum", legacy="chain.g_cross"),
        RunningCount("a_cross_count", "_chain.a_count", legacy="chain.a_cross_count"),
        StateTag("order", "_chain.order", legacy="chain.order"),
        StateTag("coupled", "_chain.coupled", legacy="chain.coupled"),
    )

    _keep_raw = True  # cross moments need the per-sample patches and columns
    _diagonal_factors = False  # the coupled solve works with dense factors
    _structured_output = False

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        layers: Sequence[LayerSpec] | None = None,
        exclude: Sequence[LayerSpec] | None = None,
        strict: bool = False,
        engine: str = "auto",
        statistics_fraction: float = 1.0,
    ) -> None:
        super().__init__(
            model,
            loss_fn,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            kfac_approx=kfac_approx,
            layers=layers,
            exclude=exclude,
            strict=strict,
            engine=engine,
            statistics_fraction=statistics_fraction,
        )
        owner = type(self).__name__
        if len(self._diag()):
            raise ValueError(
                f"{owner}: the block-tridiagonal structure chains Kronecker blocks only; "
                f"{self._diag().names} have no Kronecker rule. Exclude their modules."
            )
        self._forward = ForwardOrder(
            self.model,
            [layer.module for layer in self.layers],
            [layer.name for layer in self.layers],
            owner=owner,
        )
        self._chain = KroneckerChain(owner, len(self.layers))
        self._chain_cache: tuple[float, Any, Any] | None = None

    # --- statistics -------------------------------------------------------------------

    def _accumulate_layers(self, batches: list[KroneckerBatch], weight: float) -> None:
        super()._accumulate_layers(batches, weight)
        self._chain.accumulate(batches, weight, self._forward.confirm())

    def _check_loaded_sums(self) -> None:
        super()._check_loaded_sums()
        if self._chain.order is not None:  # the loaded chain's order is the forward order
            self._forward.order = list(self._chain.order)

    def _invalidate(self) -> None:
        self._chain_cache = None

    # --- products: the damped inverse is structured, the matrix itself is dense ----------

    def _matvec(self, v: Vector) -> Vector:
        x = self._flatten(v)  # F̂ has dense off-tridiagonal blocks: dense product
        return self._unflatten(self._to_dense().to(x.dtype) @ x)

    def _solve(self, v: Vector, damping: float) -> Vector:
        _, links, inverses = self._factorisation(damping)
        parts = self._per_layer(v)
        mats = [_as_matrix(layer, p).to(inverses[0][0].dtype) for layer, p in parts]
        result: Vector = []
        for (layer, p), out in zip(parts, self._chain.solve(mats, links, inverses)):
            result.extend(layer_rules.from_matrix(layer.module, out.to(p[0].dtype)))
        return result

    def _factorisation(self, damping: float) -> tuple[float, Any, Any]:
        """``(damping, links, inverses)`` of the chain, cached per damping."""
        if self._chain_cache is None or self._chain_cache[0] != damping:
            _, links, inverses = self._chain.factorise(
                self.factors(), self._chain.cross(self._normalizer), damping
            )
            self._chain_cache = (damping, links, inverses)
            self.num_decompositions += 1
        return self._chain_cache

    def _to_dense(self) -> Tensor:
        """The Gaussian-chain completion of each coupled run
        (concepts/block_tridiagonal.md#the-math)."""
        perms = [layer_rules.parameter_order(layer.module) for layer in self.layers]
        blocks = [self._kronecker_block(k) for k in range(len(self.layers))]
        assert self._chain.order is not None
        cross = self._chain.cross(self._normalizer)
        off_by_first = {
            self._chain.order[k]: (self._chain.order[k + 1], pair)
            for k, pair in enumerate(cross)
            if pair is not None
        }
        offsets = [0]
        for layer in self.layers:
            offsets.append(offsets[-1] + layer.numel)
        dense = blocks[0].new_zeros(offsets[-1], offsets[-1])
        for run in self._chain.runs():
            off = []
            for i in run[:-1]:
                j, (a_cross, g_cross) = off_by_first[i]
                off.append(linalg.kron_dense(g_cross, a_cross)[perms[i]][:, perms[j]])
            completed = chain_completion([blocks[i] for i in run], off)
            index = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in run])
            dense[index.unsqueeze(1), index.unsqueeze(0)] = completed
        return dense

    # trace, diagonal, norm, logdet and eigenvalues: Curvature's, from the dense completion

    # --- distribution: the coupled layers are factorised together, as one block ----------

    def _decomposition_blocks(self) -> list[DecompositionBlock]:
        sizes = [layer_rules.weight_matrix_shape(layer.module) for layer in self.layers]
        return [
            DecompositionBlock(
                index=0,
                name=f"{type(self).__name__} block-tridiagonal chain (all layers)",
                param_indices=tuple(range(len(self.params))),
                cost=float(sum(d_out**3 + d_in**3 for d_out, d_in in sizes)),
            )
        ]

    def _decompose(self, index: int, damping: float) -> None:
        self._factorisation(damping)

    def _export_decomposition(self, index: int, damping: float) -> list[NamedTensor]:
        if self._chain_cache is None or self._chain_cache[0] != damping:
            raise RuntimeError(f"{type(self).__name__}: the chain is not decomposed yet.")
        _, links, inverses = self._chain_cache
        out = []
        for k, (inv_g, inv_a) in enumerate(inverses):
            out.append(NamedTensor(f"layer {k} Ĝ⁻¹", inv_g, "symmetric"))
            out.append(NamedTensor(f"layer {k} Â⁻¹", inv_a, "symmetric"))
        for i in sorted(links):
            link, name = links[i], f"link {i}"
            sigma = link.sigma
            out.extend(
                NamedTensor(f"{name} {field}", t)
                for field, t in (
                    ("Ψ_G", link.psi_g),
                    ("Ψ_A", link.psi_a),
                    ("Σ U_row", sigma.U_row),
                    ("Σ s_row", sigma.s_row),
                    ("Σ U_col", sigma.U_col),
                    ("Σ s_col", sigma.s_col),
                    ("Σ denominator", sigma.denominator),
                )
            )
        return out

    def _import_decomposition(self, index: int, damping: float, tensors: list[Tensor]) -> None:
        assert self._chain.order is not None
        assert self._chain.coupled is not None
        count = len(self.layers)
        inverses = [(tensors[2 * k], tensors[2 * k + 1]) for k in range(count)]
        rest = iter(tensors[2 * count :])
        links = {}
        coupled = [self._chain.order[k] for k, c in enumerate(self._chain.coupled) if c]
        for i in sorted(coupled):
            psi_g, psi_a, u_row, s_row, u_col, s_col, den = (next(rest) for _ in range(7))
            sigma = linalg.KronSumInverse(u_row, s_row, u_col, s_col, den, sign=-1)
            links[i] = _Link(psi_g=psi_g, psi_a=psi_a, sigma=sigma)
        self._chain_cache = (damping, links, inverses)

    def _solve_block(self, index: int, v: Vector, damping: float) -> Vector:
        return self._solve(v, damping)


def _kept_samples(batch: KroneckerBatch) -> Tensor:
    """``[N]`` (bool): the samples of a one-position layer whose inputs entered ``A``."""
    assert batch.patches is not None
    if batch.kept is None:
        return torch.ones(batch.patches.shape[0], dtype=torch.bool, device=batch.patches.device)
    return batch.kept[:, 0]


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
