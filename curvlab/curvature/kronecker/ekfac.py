"""``EKFAC``: K-FAC's eigenbasis with a refitted diagonal (George et al. 2018;
concepts/kronecker.md#ekfac).

Per layer, the Kronecker-factored eigenbasis ``Q = Q_G ⊗ Q_A`` comes from the K-FAC
factors; the diagonal is replaced by the second moments of the per-row gradients
projected onto it, ``S*_{ij} = Σ_{r,c} (Q_Gᵀ DW_{r,c} Q_A)_{ij}²`` on the loss's scale
(``DW_{r,c}`` the weight gradient of loss row ``r``'s column ``c`` alone; ``c`` runs over
loss-Hessian columns, MC samples or the observed label). For a fixed basis this is the
Frobenius-optimal diagonal, ``S* = diag(Qᵀ F Q)`` with ``F`` the layer's Fisher block, so
EKFAC is never farther from ``F`` than K-FAC (whose diagonal in the same basis is
``d_G d_Aᵀ``), and ``Σ S* = tr(F)``.

Where each loss row is one sample of the layer and nothing couples the samples after
it, the per-row gradients are the per-sample ones ``Σ_t g_{n,t,c} ā_{n,t}ᵀ`` of the
columns backpropagated for the factors (no extra backward pass). With several loss rows
per layer sample (token or pixel losses) or coupled samples (BatchNorm in train mode),
the extraction backpropagates each row's columns on their own and delivers the per-row
gradients (``KroneckerStatistics.per_row``;
concepts/models.md#rows-samples-and-exactness). The diagonal blocks of normalisation
layers come from per-row gradients too, also where samples are coupled.

The basis is computed from the factors at the first batch after construction, ``reset()``
or :meth:`EKFAC.refresh_basis`, and stays fixed while further batches add to the factors
and to ``S*`` — George et al.'s amortisation (rare eigendecompositions, cheap diagonal
updates). Without weight sharing (``T = 1``) and one row per sample ``S*`` is formed from
the projected inputs and output columns without materialising per-sample gradients; with
sharing the per-sample gradients are formed in chunks of samples.

With a process reducer (:meth:`~curvlab.Curvature.set_process_reducer`, set by a
distributed preconditioner) the basis fitted at a batch comes from that batch's factors
summed over processes, so every process projects onto the same basis and the ``S*`` sums
add up to the union's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab import linalg
from curvlab.curvature.base import LayerMemory, RunningSum, StateTag
from curvlab.curvature.kronecker.factored import (
    BlockDiagonalKronecker,
    KroneckerFactors,
    LayerSpec,
    _as_matrix,
)
from curvlab.curvature.registry import register
from curvlab.extraction import KroneckerBatch
from curvlab.extraction import layers as layer_rules

#: Per-sample projected gradients are formed for at most this many entries at a time.
_CHUNK_ELEMENTS = 1 << 24


@register("ekfac")
class EKFAC(BlockDiagonalKronecker):
    """Eigenvalue-corrected K-FAC. Arguments as for :class:`KFAC` (which layers: ``KFC``'s).

    ``solve`` applies ``Q [(Qᵀ v) ⊘ (S* + λ)]`` exactly (EKFAC's natural damping, as in
    curvlinops); there is no factored mode.

    Args:
        refit_every: under a preconditioner (``hold_decompositions``), refit the eigenbasis
            at every ``refit_every``-th ``reset()`` (i.e. curvature step) from the factors
            held then — the preconditioner's moving average — instead of keeping the first
            batch's basis for good (George et al. recompute it periodically). ``None``:
            keep it. ``S*`` restarts in the new basis.
        output_factor: ``"auto"`` (default) or ``"dense"``, or a dict from module names to
            them. EKFAC needs ``G``'s eigenvectors, so it has no structured output factor:
            a layer with ``STRUCTURED_OUTPUT_THRESHOLD`` outputs or more, where ``"auto"``
            would pick one, is refused (``ValueError`` naming it) unless it is ``"dense"``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        layers: Sequence[LayerSpec] | None = None,
        exclude: Sequence[LayerSpec] | None = None,
        refit_every: int | None = None,
        strict: bool = False,
        engine: str = "auto",
        output_factor: str | Mapping[str, str] = "auto",
    ) -> None:
        if refit_every is not None and (
            isinstance(refit_every, bool) or not isinstance(refit_every, int) or refit_every < 1
        ):
            raise ValueError(
                f"EKFAC: refit_every must be a positive int or None, got {refit_every!r}."
            )
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
            output_factor=output_factor,
        )
        self._basis: list[tuple[Tensor, Tensor]] | None = None
        self._basis_id = 0
        self._s_sum: list[Tensor] | None = None
        self.refit_every = refit_every
        self._resets_held = 0  # resets under hold_decompositions, for refit_every

    running_state = (
        *BlockDiagonalKronecker.running_state,
        # Σ_b w_b S*_b, [D_out, D_in] per layer, in the eigenbasis of the tag "basis"
        RunningSum("S", "_s_sum", label="_layer_label", legacy="s_sum"),
        # increases with every new basis: statistics of two bases do not mix
        StateTag("basis_id", "_basis_id", in_statistics=True, legacy="basis_id"),
        StateTag("basis", "_basis", legacy="basis"),  # (Q_G, Q_A) per layer
        StateTag("resets_held", "_resets_held", default=0, legacy="resets_held"),
    )

    _keep_raw = True
    _per_row = True
    _diagonal_factors = False  # the eigenbasis of A is a dense [D_in, D_in] matrix
    _structured_output = False  # nor can G's eigenbasis come from a structured G

    def _accumulate_layers(self, batches: list[KroneckerBatch], weight: float) -> None:
        owned = self._sums_owned  # before the factors below make their own copies
        super()._accumulate_layers(batches, weight)
        if self._basis is None:
            self._basis = self._factor_eigenbases(across_processes=True)
            self._basis_id += 1
        moments = [
            weight * _projected_second_moment(batch, q_g, q_a)
            for batch, (q_g, q_a) in zip(batches, self._basis)
        ]
        if self._s_sum is None:
            self._s_sum = moments
        elif owned:
            for total, moment in zip(self._s_sum, moments):
                total.add_(moment)
        else:
            self._s_sum = [total + moment for total, moment in zip(self._s_sum, moments)]

    def _factor_eigenbases(self, across_processes: bool = False) -> list[tuple[Tensor, Tensor]]:
        factors = self._unnormalised_factors()
        if across_processes and self._process_reducer is not None:
            # the union's factor sums: every process then fits the same basis
            summed = self._process_reducer(self._sums(only=("A", "G")))
            count = len(self.layers)
            factors = [KroneckerFactors(A=a, G=g) for a, g in zip(summed[:count], summed[count:])]
        return [
            (
                linalg.symeig(f.G, name=f"{self._layer_label(k)} G").eigenvectors,
                linalg.symeig(f.A, name=f"{self._layer_label(k)} A").eigenvectors,
            )
            for k, f in enumerate(factors)
        ]

    def _unnormalised_factors(self) -> list[KroneckerFactors]:
        # eigenvectors do not depend on the positive normalisation of the factors
        assert self._a_sum is not None and self._g_sum is not None
        return [KroneckerFactors(A=a, G=g) for a, g in zip(self._a_sum, self._g_sum)]

    def refresh_basis(self) -> None:
        """Recompute the eigenbasis from the current factors; ``S*`` restarts empty.

        The factors keep accumulating; the next ``update``/``accumulate`` refits ``S*``.
        """
        self._check_ready("refresh_basis")
        self._basis = self._factor_eigenbases()
        self._basis_id += 1
        self._s_sum = None
        self.num_batches = 0
        self._weight_sum = 0.0
        self._invalidate()

    def _reset(self) -> None:
        if self._hold and self._basis is not None and self.refit_every is not None:
            self._resets_held += 1
            if self._resets_held % self.refit_every == 0:
                # the factors held now are the preconditioner's average, equal on every process
                self._basis = self._factor_eigenbases()
                self._basis_id += 1
        super()._reset()  # S* too
        if not self._hold:  # a preconditioner holding decompositions keeps the basis too
            self._basis = None

    def eigenbasis(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer ``(Q_G, Q_A)``: the orthonormal eigenbases in use."""
        self._check_ready("eigenbasis")
        if not self.layers:  # every parameter in a diagonal block
            return []
        assert self._basis is not None
        return list(self._basis)

    def scalings(self) -> list[Tensor]:
        """Per layer ``S*`` ``[D_out, D_in(+1)]``: the refitted eigenvalues, normalised."""
        self._check_ready("scalings")
        return [s / self._normalizer for s in self._s_sum or []]

    def _apply_layer(self, k: int, parts: list[Tensor], transform: Any) -> list[Tensor]:
        """``Q transform(Qᵀ V Q, S*) Qᵀ`` for layer ``k``'s part ``V`` of a vector."""
        assert self._basis is not None and self._s_sum is not None
        layer, (q_g, q_a) = self.layers[k], self._basis[k]
        s = self._s_sum[k] / self._normalizer
        mat = _as_matrix(layer, parts).to(s.dtype)
        out = q_g @ transform(q_g.T @ mat @ q_a, s) @ q_a.T
        return layer_rules.from_matrix(layer.module, out.to(parts[0].dtype))

    def _layer_memory(self, k: int) -> LayerMemory:
        """The factor sums and ``S*`` ``[D_out, D_in]``; the eigenbasis ``(Q_G, Q_A)``."""
        a_numel, g_numel = self._factor_numel(k)
        d_out, d_in = layer_rules.weight_matrix_shape(self.layers[k].module)
        itemsize = self._factor_itemsize(k)
        return LayerMemory(
            (a_numel + g_numel + d_out * d_in) * itemsize, (a_numel + g_numel) * itemsize
        )

    def _matvec_layer(self, k: int, parts: list[Tensor]) -> list[Tensor]:
        return self._apply_layer(k, parts, lambda x, s: x * s)

    def _solve_layer(self, k: int, parts: list[Tensor], damping: float) -> list[Tensor]:
        if damping == 0.0:
            self._check_invertible_scaling(k)
        return self._apply_layer(k, parts, lambda x, s: x / (s + damping))

    def _dense_layer(self, k: int) -> Tensor:
        (q_g, q_a), s = self.eigenbasis()[k], self.scalings()[k]
        q = torch.kron(q_g, q_a)
        perm = layer_rules.parameter_order(self.layers[k].module)
        return (q @ torch.diag(s.reshape(-1)) @ q.T)[perm][:, perm]

    def _check_invertible_scaling(self, k: int) -> None:
        assert self._s_sum is not None
        s = self._s_sum[k] / self._normalizer
        if not bool(s.min() > torch.finfo(s.dtype).eps * s.max()):
            raise linalg.LinAlgError(
                f"EKFAC.solve: {self._layer_label(k)} has (numerically) zero "
                "eigenvalues; use damping > 0."
            )

    # --- distribution: the basis is fixed when the statistics are taken, so a block has
    # nothing to decompose (Curvature's default); its work is the projection in solve_block

    def _layer_cost(self, d_out: int, d_in: int) -> float:
        """The two-sided projection of one solve: ``O(d_out² d_in + d_out d_in²)``."""
        return float(d_out * d_out * d_in + d_out * d_in * d_in)

    # --- closed forms in the eigenbasis: the spectrum is S* ------------------------------

    def _layer_spectra(self) -> list[Tensor]:
        return self.scalings()

    def _trace(self) -> Tensor:
        parts = [s.sum() for s in self.scalings()] + [d.sum() for d in self._tail_diagonal()]
        return torch.stack(parts).sum()

    def _diagonal(self) -> Tensor:
        parts = []
        for layer, (q_g, q_a), s in zip(self.layers, self.eigenbasis(), self.scalings()):
            # diag(Q diag(s) Qᵀ) for Q = Q_G ⊗ Q_A: (Q_G∘Q_G) S (Q_A∘Q_A)ᵀ
            grid = (q_g.square() @ s @ q_a.square().T).reshape(-1)
            parts.append(grid[layer_rules.parameter_order(layer.module).to(grid.device)])
        return torch.cat(parts + self._tail_diagonal())

    def _frobenius_norm(self) -> Tensor:
        squares = [s.square().sum() for s in self.scalings()]
        squares += [d.square().sum() for d in self._tail_diagonal()]
        return torch.stack(squares).sum().sqrt()


def _projected_second_moment(batch: KroneckerBatch, q_g: Tensor, q_a: Tensor) -> Tensor:
    """``Σ_{r,c} (Q_Gᵀ DW_{r,c} Q_A)²`` of one batch over the per-row gradients, on the
    loss's scale ``[D_out, D_in]``: the extraction's ``row_grads`` where it formed them
    (several loss rows per sample, or coupled samples), else the per-sample gradients of
    the patches and columns, which are then the per-row ones."""
    if batch.row_grads is not None:
        moment = q_g.new_zeros(q_g.shape[0], q_a.shape[0])
        step = max(1, _CHUNK_ELEMENTS // max(1, q_g.shape[0] * q_a.shape[0]))
        for start in range(0, batch.row_grads.shape[0], step):
            grads = batch.row_grads[start : start + step].to(q_g.dtype)
            moment += ((q_g.T @ grads @ q_a) ** 2).sum(dim=0)
        return moment * batch.column_scale
    assert batch.patches is not None and batch.columns is not None
    cols = batch.columns @ q_g  # [K, N, T, D_out]: (Q_Gᵀ g) per column, sample, position
    acts = batch.patches @ q_a  # [N, T, D_in]:     (Q_Aᵀ ā)
    if acts.shape[1] == 1:  # no weight sharing: (Q_GᵀDWQ_A)_ij² = (Q_Gᵀg)_i² (Q_Aᵀā)_j²
        moment = torch.einsum("kno,ni->oi", cols[:, :, 0] ** 2, acts[:, 0] ** 2)
    else:  # sum over positions before squaring (concepts/kronecker.md#ekfac)
        k, n, _, d_out = cols.shape
        step = max(1, _CHUNK_ELEMENTS // max(1, k * d_out * acts.shape[-1]))
        moment = cols.new_zeros(d_out, acts.shape[-1])
        for start in range(0, n, step):
            grads = torch.einsum(
                "knto,nti->knoi", cols[:, start : start + step], acts[start : start + step]
            )
            moment += (grads**2).sum(dim=(0, 1))
    return moment * batch.column_scale
