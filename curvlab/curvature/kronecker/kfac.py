"""``KFAC`` (Linear layers; Martens & Grosse 2015) and ``KFC`` (+ convolutions; G&M 2016).

Each layer is one block ``kron(G, A)`` on the row-major homogeneous weight matrix
``[W | b]`` (concepts/kronecker.md#notation-and-the-vec-convention;
concepts/kronecker.md#k-fac-for-linear-layers), permuted into the ``[vec(W), b]`` parameter order:

* ``A = Σ ā āᵀ / count``: layer inputs with the homogeneous 1; expand averages over
  samples and weight-sharing positions (``count = N·T``), reduce over samples of the
  position-averaged input (concepts/kronecker.md#weight-sharing-expand-and-reduce). Independent of
  the loss's reduction.
* ``G = Σ g gᵀ`` on the loss's scale: ``g`` are the loss-Hessian square-root columns
  backpropagated to the layer output (``"exact"``), their Monte-Carlo version (``"mc"``)
  or the observed-label output gradients (``"empirical"``); expand sums the outer products
  over positions, reduce sums ``g`` over positions first. For convolutions, expand is KFC.

These are curvlinops' ``KFACLinearOperator`` factors with ``separate_weight_and_bias=False``.
The factors are computed from a :class:`~curvlab.extraction.KroneckerStatistics` request;
a layer's memory is two small matrices, never per-sample gradients.

**Coverage.** Every trainable parameter is covered by default: layers with a Kronecker
rule (``Linear``, ``ConvNd``, ``Embedding`` — see ``supported_layers``) get a Kronecker
block; every other parameter (normalisation layers, raw ``nn.Parameter``s, recurrent
weights, transposed convolutions, parameters shared between modules, the projections of
``nn.MultiheadAttention``, which it calls functionally) gets a diagonal block of the same
Fisher type (:class:`~curvlab.curvature.diagonal.DiagonalBlocks`), placed after the
Kronecker layers in ``params``. ``strict=True`` refuses such parameters instead;
``coverage()`` tells which parameter sits in which kind of block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from curvlab import linalg
from curvlab.curvature.base import (
    Curvature,
    DecompositionBlock,
    Layer,
    NamedTensor,
    Vector,
    find_layers,
)
from curvlab.curvature.chain import ForwardOrder, chain_completion
from curvlab.curvature.diagonal import DiagonalBlocks
from curvlab.curvature.kronecker.tridiagonal import KroneckerChain, _Link
from curvlab.extraction import (
    BatchResult,
    KroneckerBatch,
    KroneckerStatistics,
    Request,
    check_fisher_type,
    check_mc_samples,
)
from curvlab.extraction import layers as layer_rules
from curvlab.registry import register

DAMPING_MODES = ("exact", "factored")
STRUCTURES = ("block_diagonal", "block_tridiagonal")
LayerSpec = str | nn.Module


class KroneckerFactors(NamedTuple):
    """A layer's factors: the block is ``kron(G, A)`` on the row-major ``[W | b]`` matrix."""

    A: Tensor  # [D_in(+1), D_in(+1)]
    G: Tensor  # [D_out, D_out]


class _LayerEigen(NamedTuple):
    G: linalg.SymmetricEigen
    A: linalg.SymmetricEigen


@register("kfac")
class KFAC(Curvature):
    """Kronecker-factored approximate curvature, one ``kron(G, A)`` block per layer.

    Args:
        model: the network; ``nn.Linear`` layers are approximated (``KFC`` adds convolutions).
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` (mean or sum).
        fisher_type: ``"mc"`` (default, Martens & Grosse's sampled labels), ``"exact"``
            (the loss Hessian's square root: K-FAC of the exact Fisher/GGN) or
            ``"empirical"`` (observed labels).
        mc_samples: sampled labels per input for ``"mc"``.
        kfac_approx: ``"expand"`` (positions sharing a weight act like extra samples; KFC
            for convolutions) or ``"reduce"`` (positions are averaged/summed first).
        damping_mode: how ``solve`` damps: ``"exact"`` applies ``(kron(G, A) + λI)⁻¹``
            exactly in the factors' eigenbases; ``"factored"`` applies
            ``(G + γ/π I)⁻¹ ⊗ (A + πγ I)⁻¹`` with ``γ = √λ`` and π the trace-norm
            correction (concepts/kronecker.md#damped-inverse), the damped inverse Martens & Grosse
            use. Default:
            ``"exact"`` for the block-diagonal structure, ``"factored"`` (the only one
            defined) for the block-tridiagonal one.
        structure: ``"block_diagonal"`` (one independent block per layer) or
            ``"block_tridiagonal"`` — consecutive layers (in forward order) coupled
            through cross-layer statistics so that the inverse is block-tridiagonal
            (Martens & Grosse 2015 §4.3, :mod:`curvlab.curvature.kronecker.tridiagonal`).
            ``matvec``/``to_dense`` of this structure are dense (small models).
        layers: only these modules (objects or names from ``model.named_modules()``).
        exclude: modules to leave out; their parameters are not in ``params``.
        strict: refuse (``ValueError`` naming the module and the reason) any trainable
            parameter without a Kronecker block instead of giving it a diagonal block.
        engine: ``"auto"``, ``"hooks"`` or ``"backpack"`` (see :class:`~curvlab.Curvature`).
        separate_bias: weight and bias in separate blocks, ``G ⊗ A_w`` and ``G ⊗ [a]``
            (curvlinops' ``separate_weight_and_bias``, what laplace-torch's ``Kron``
            uses): the joint ``A`` with its weight–bias cross entries set to zero, so its
            eigenvalues are ``A_w``'s and the homogeneous corner ``a``.
        statistics_fraction: Kronecker factors from this share of each batch (its first
            samples; ``G`` rescaled to the whole batch), as Martens & Grosse do to cut the
            cost of the statistics. The gradient still uses the whole batch.
    """

    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Embedding)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        damping_mode: str | None = None,
        layers: Sequence[LayerSpec] | None = None,
        exclude: Sequence[LayerSpec] | None = None,
        structure: str = "block_diagonal",
        strict: bool = False,
        engine: str = "auto",
        statistics_fraction: float = 1.0,
        separate_bias: bool = False,
    ) -> None:
        owner = type(self).__name__
        if separate_bias and structure == "block_tridiagonal":
            raise ValueError(
                f"{owner}: separate_bias=True is defined for the block-diagonal structure only."
            )
        self.separate_bias = bool(separate_bias)
        if not 0.0 < statistics_fraction <= 1.0:
            raise ValueError(
                f"{owner}: statistics_fraction must lie in (0, 1], got {statistics_fraction}."
            )
        self.statistics_fraction = float(statistics_fraction)
        check_fisher_type(fisher_type, ("exact", "mc", "empirical"), owner)
        check_mc_samples(mc_samples, owner)
        tridiagonal = structure == "block_tridiagonal"
        if damping_mode is None:
            damping_mode = "factored" if tridiagonal else "exact"
        for value, allowed, arg in (
            (kfac_approx, layer_rules.KFAC_APPROXES, "kfac_approx"),
            (damping_mode, DAMPING_MODES, "damping_mode"),
            (structure, STRUCTURES, "structure"),
        ):
            if value not in allowed:
                raise ValueError(f"{owner}: unknown {arg} {value!r}; choose one of {allowed}.")
        if tridiagonal and damping_mode != "factored":
            raise ValueError(
                f"{owner}: structure='block_tridiagonal' uses factored damping of the diagonal "
                "factors (concepts/block_tridiagonal.md#the-math); damping_mode='exact' is not "
                "defined for it."
            )
        self.structure = structure
        if tridiagonal:
            self._keep_raw = True  # cross moments need the per-sample patches and columns
        self.fisher_type = fisher_type
        self.mc_samples = mc_samples
        self.kfac_approx = kfac_approx
        self.damping_mode = damping_mode
        self._layer_choice = (layers, exclude)
        self.strict = strict
        self._diagonal_blocks: DiagonalBlocks | None = None
        super().__init__(model, loss_fn, engine=engine)
        if tridiagonal and len(self._diag()):
            raise ValueError(
                f"{owner}: structure='block_tridiagonal' chains Kronecker blocks only; "
                f"{self._diag().names} have no Kronecker rule. Exclude their modules."
            )
        self._a_sum: list[Tensor] | None = None
        self._owned = False  # whether the sums may be updated in place (see _add_factors)
        self._a_count = [0] * len(self.layers)
        self._g_sum: list[Tensor] | None = None
        self._eigen: list[_LayerEigen | None] | None = None  # per layer, computed lazily
        self._inverses: tuple[float, list[tuple[Tensor, Tensor] | None]] | None = None
        self._chain: KroneckerChain | None = None
        self._chain_cache: tuple[float, Any, Any] | None = None
        if tridiagonal:
            self._forward = ForwardOrder(
                self.model,
                [layer.module for layer in self.layers],
                [layer.name for layer in self.layers],
                owner=owner,
            )
            self._chain = KroneckerChain(owner, len(self.layers))

    # --- layer selection --------------------------------------------------------------

    def _select_layers(self, model: nn.Module) -> list[Layer]:
        owner = type(self).__name__
        include, exclude = self._layer_choice
        chosen = _resolve(model, include, "layers", owner) if include is not None else None
        skipped = _resolve(model, exclude, "exclude", owner) if exclude is not None else set()
        kronecker, diagonal = [], []
        uses: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        self._tied = {key for key, count in uses.items() if count > 1}
        for layer in find_layers(model):
            key = id(layer.module)
            if key in skipped or (chosen is not None and key not in chosen):
                continue
            reason = self._no_kronecker_reason(model, layer)
            if reason is None:
                kronecker.append(layer)
            elif self.strict:
                raise ValueError(
                    f"{owner}: module '{layer.name}' ({type(layer.module).__name__}) has "
                    f"trainable parameters without a Kronecker block: {reason}. Pass "
                    f"exclude=['{layer.name}'] to leave it out, or strict=False to give it "
                    "a diagonal block."
                )
            else:
                diagonal.append(layer)
        if not kronecker and not diagonal:
            raise ValueError(f"{owner}: no layer selected (check layers=/exclude=).")
        self._diagonal_blocks = DiagonalBlocks(
            diagonal,
            self.fisher_type,
            self.mc_samples,
            owner,
            at_layers=True,
            tied=frozenset(self._tied),
        )
        return kronecker

    def _no_kronecker_reason(self, model: nn.Module, layer: Layer) -> str | None:
        """Why ``layer`` gets no Kronecker block, or ``None`` when it gets one."""
        module = layer.module
        for name, parent in model.named_modules():
            if isinstance(parent, nn.MultiheadAttention) and layer.name.startswith(name + "."):
                return (
                    "nn.MultiheadAttention calls its projections functionally, so their "
                    "outputs' gradients cannot be observed"
                )
        rule = layer_rules.rule_for(module)
        if rule is None or not isinstance(module, self.supported_layers):
            supported = ", ".join(cls.__name__ for cls in self.supported_layers)
            return f"{type(self).__name__} has Kronecker rules for {supported} only"
        rule.check(module)
        weight = getattr(module, "weight", None)
        if weight is None or not any(p is weight for p in layer.params):
            return "its weight is frozen or shared with another module (tied)"
        if any(id(p) in self._tied for p in layer.params):
            return "a parameter of it is shared with another module (tied weights)"
        bias = getattr(module, "bias", None)
        if layer_rules.has_trainable_bias(module) and not any(p is bias for p in layer.params):
            return "its bias is shared with another module (tied)"
        return None

    def _diag(self) -> DiagonalBlocks:
        assert self._diagonal_blocks is not None
        return self._diagonal_blocks

    def _other_layers(self) -> list[Layer]:
        return self._diag().layers

    def _block_kind(self, layer: Layer) -> str:
        return "kronecker" if any(layer is k for k in self.layers) else "diagonal"

    # --- statistics -------------------------------------------------------------------

    #: Whether the extensions also keep per-sample patches and columns (EKFAC, and the
    #: block-tridiagonal structure's cross moments).
    _keep_raw: bool = False

    def _requests(self) -> list[Request]:
        requests: list[Request] = []
        if self.layers:
            requests.append(self._kronecker_request())
        if len(self._diag()):
            requests.extend(self._diag().requests)
        return requests

    def _kronecker_request(self) -> KroneckerStatistics:
        return KroneckerStatistics(
            self.fisher_type,
            tuple(layer.module for layer in self.layers),
            kfac_approx=self.kfac_approx,
            mc_samples=self.mc_samples,
            keep_raw=self._keep_raw,
            sample_fraction=self.statistics_fraction,
        )

    def _accumulate(self, result: BatchResult, weight: float) -> None:
        if len(self._diag()):
            self._diag().accumulate(result, weight)
        if not self.layers:
            return
        batches = self._layer_batches(result)
        self._add_factors(batches, weight)
        if self._chain is not None:
            self._chain.accumulate(batches, weight, self._forward.confirm())

    def _layer_batches(self, result: BatchResult) -> list[KroneckerBatch]:
        request = self._kronecker_request()
        return [result.kronecker_batch(request, layer.module, layer.name) for layer in self.layers]

    def _add_factors(self, batches: list[KroneckerBatch], weight: float) -> None:
        if self._a_sum is None or self._g_sum is None:
            # Adopt the first batch's tensors without copying. A may be shared with other
            # backends of the same extract() and loaded statistics belong to the caller, so
            # nothing is modified in place until owned (copy-on-write); G is a fresh product.
            self._a_sum = [b.a_sum for b in batches]
            self._g_sum = [b.g * weight for b in batches]
            self._a_count = [b.count for b in batches]
            self._owned = False
            return
        for k, batch in enumerate(batches):
            if self._owned:
                self._a_sum[k].add_(batch.a_sum)
                self._g_sum[k].add_(batch.g, alpha=weight)
            else:
                self._a_sum[k] = self._a_sum[k] + batch.a_sum
                self._g_sum[k] = self._g_sum[k] + weight * batch.g
            self._a_count[k] += batch.count
        self._owned = True

    def _reset(self) -> None:
        self._a_sum = self._g_sum = None
        self._a_count = [0] * len(self.layers)
        self._diag().reset()
        if self._chain is not None:
            self._chain.reset()

    def _statistics(self) -> dict[str, Any]:
        factors = self.factors()
        stats: dict[str, Any] = {"A": [f.A for f in factors], "G": [f.G for f in factors]}
        if len(self._diag()):
            stats["diagonal"] = self._diag().diagonals(self._normalizer)
        if self._chain is not None:
            cross = self._chain.cross(self._normalizer)
            stats["A_cross"] = [None if c is None else c[0] for c in cross]
            stats["G_cross"] = [None if c is None else c[1] for c in cross]
        return stats

    def _load_statistics(self, stats: dict[str, Any]) -> None:
        self._adopt(stats["A"], [1] * len(self.layers), stats["G"])
        if len(self._diag()):
            self._diag().adopt(list(stats["diagonal"]))
        if self._chain is not None:
            state = self._chain.state()
            state.update(a_cross=stats["A_cross"], g_cross=stats["G_cross"], a_cross_count=1)
            self._chain.load(state, copy=False)

    def _invalidate(self) -> None:
        self._eigen = None
        self._inverses = None
        self._chain_cache = None

    def factors(self) -> list[KroneckerFactors]:
        """Per layer ``(A, G)``, normalised as described in the module docstring."""
        self._check_ready("factors")
        return [self._factor(k) for k in range(len(self.layers))]

    def _factor(self, k: int) -> KroneckerFactors:
        assert self._a_sum is not None and self._g_sum is not None
        a = self._a_sum[k] / self._a_count[k]
        if self.separate_bias and layer_rules.has_trainable_bias(self.layers[k].module):
            cross = torch.ones_like(a, dtype=torch.bool)
            cross[:-1, :-1] = False
            cross[-1, -1] = False
            a = a.masked_fill(cross, 0.0)  # separate blocks: no weight–bias cross terms
        return KroneckerFactors(A=a, G=self._g_sum[k] / self._normalizer)

    def _layer_eigen(self, k: int) -> _LayerEigen:
        if self._eigen is None:
            self._eigen = [None] * len(self.layers)
        eig = self._eigen[k]
        if eig is None:
            f = self._factor(k)
            eig = _LayerEigen(
                G=_psd_eig(f.G, f"{self._layer_label(k)} G"),
                A=_psd_eig(f.A, f"{self._layer_label(k)} A"),
            )
            self._eigen[k] = eig
            self.num_decompositions += 1
        return eig

    # --- products ----------------------------------------------------------------------

    def _per_layer(self, v: Vector) -> list[tuple[Layer, list[Tensor]]]:
        """The Kronecker layers' parts of ``v`` (the diagonal tail: :meth:`_tail`)."""
        out, start = [], 0
        for layer in self.layers:
            stop = start + len(layer.params)
            out.append((layer, v[start:stop]))
            start = stop
        return out

    def _tail(self, v: Vector) -> Vector:
        """The entries of ``v`` for the diagonal blocks (after the Kronecker layers)."""
        return list(v[len(v) - len(self._diag()) :])

    def _matvec(self, v: Vector) -> Vector:
        if self._chain is not None:  # F̂ has dense off-tridiagonal blocks: dense product
            x = self._flatten(v)
            return self._unflatten(self._to_dense().to(x.dtype) @ x)
        result: Vector = []
        for (layer, parts), f in zip(self._per_layer(v), self.factors()):
            mat = _as_matrix(layer, parts).to(f.G.dtype)
            out = linalg.kron_matvec(f.G, f.A, mat).to(parts[0].dtype)
            result.extend(layer_rules.from_matrix(layer.module, out))
        if len(self._diag()):
            result.extend(self._diag().matvec(self._tail(v), self._normalizer))
        return result

    def _solve(self, v: Vector, damping: float) -> Vector:
        result: Vector = []
        if self._chain is not None:
            return self._solve_chain(v, damping)
        for k, (_, parts) in enumerate(self._per_layer(v)):
            result.extend(self._solve_layer(k, parts, damping))
        if len(self._diag()):
            result.extend(self._diag().solve(self._tail(v), damping, self._normalizer))
        return result

    def _solve_layer(self, k: int, parts: list[Tensor], damping: float) -> list[Tensor]:
        """The block-diagonal damped solve of layer ``k`` (``parts``: its parameters)."""
        layer = self.layers[k]
        if self.damping_mode == "factored":
            # (G + γ/π I)⁻¹ V (A + πγ I)⁻¹: two matmuls per layer
            inv_g, inv_a = self._layer_inverses(k, damping)
            out = inv_g @ _as_matrix(layer, parts).to(inv_g.dtype) @ inv_a
            return layer_rules.from_matrix(layer.module, out.to(parts[0].dtype))
        eig = self._layer_eigen(k)
        mat = _as_matrix(layer, parts).to(eig.G.eigenvalues.dtype)
        if damping == 0.0:
            self._check_invertible(k, eig.G, eig.A)
        out = linalg.kron_eigen_damped_solve(eig.G, eig.A, mat, damping)
        return layer_rules.from_matrix(layer.module, out.to(parts[0].dtype))

    def _solve_chain(self, v: Vector, damping: float) -> Vector:
        assert self._chain is not None
        _, links, inverses = self._chain_factorisation(damping)
        parts = self._per_layer(v)
        mats = [_as_matrix(layer, p).to(inverses[0][0].dtype) for layer, p in parts]
        result: Vector = []
        for (layer, p), out in zip(parts, self._chain.solve(mats, links, inverses)):
            result.extend(layer_rules.from_matrix(layer.module, out.to(p[0].dtype)))
        return result

    def _chain_factorisation(self, damping: float) -> tuple[float, Any, Any]:
        """``(damping, links, inverses)`` of the block-tridiagonal structure, cached."""
        assert self._chain is not None
        if self._chain_cache is None or self._chain_cache[0] != damping:
            _, links, inverses = self._chain.factorise(
                self.factors(), self._chain.cross(self._normalizer), damping
            )
            self._chain_cache = (damping, links, inverses)
            self.num_decompositions += 1
        return self._chain_cache

    def _layer_inverses(self, k: int, damping: float) -> tuple[Tensor, Tensor]:
        if self._inverses is None or self._inverses[0] != damping:
            self._inverses = (damping, [None] * len(self.layers))
        cached = self._inverses[1][k]
        if cached is None:
            f = self._factor(k)
            damped_g, damped_a = linalg.factored_damping(f.G, f.A, damping)
            label = self._layer_label(k)
            cached = (
                _spd_inverse(damped_g, f"{label} G + γ/π I"),
                _spd_inverse(damped_a, f"{label} A + πγ I"),
            )
            self._inverses[1][k] = cached
            self.num_decompositions += 1
        return cached

    def _check_invertible(
        self, k: int, eig_g: linalg.SymmetricEigen, eig_a: linalg.SymmetricEigen
    ) -> None:
        smallest = eig_g.eigenvalues[0] * eig_a.eigenvalues[0]
        largest = eig_g.eigenvalues[-1] * eig_a.eigenvalues[-1]
        tiny = torch.finfo(eig_g.eigenvalues.dtype).eps * largest
        if not bool(smallest > tiny):
            raise linalg.LinAlgError(
                f"{type(self).__name__}.solve: {self._layer_label(k)} kron(G, A) is singular "
                f"(smallest eigenvalue {float(smallest):.3g}); use damping > 0."
            )

    def _to_dense(self) -> Tensor:
        blocks = []
        perms = [layer_rules.parameter_order(layer.module) for layer in self.layers]
        for perm, f in zip(perms, self.factors()):
            block = linalg.kron_dense(f.G, f.A)
            blocks.append(block[perm][:, perm])
        if len(self._diag()):
            blocks.append(self._diag().to_dense(self._normalizer))
        if self._chain is None:
            return torch.block_diag(*blocks)
        # the Gaussian-chain completion of each coupled run (concepts/block_tridiagonal.md#the-math)
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

    # --- closed forms of the block-diagonal structure (concepts/kronecker.md#kronecker-identities);
    # the block-tridiagonal completion falls back to its dense matrix

    def _layer_spectra(self) -> list[Tensor]:
        """Per Kronecker layer, the eigenvalues ``d_G d_Aᵀ`` ``[D_out, D_in]``."""
        return [
            torch.outer(e.G.eigenvalues, e.A.eigenvalues)
            for e in (self._layer_eigen(k) for k in range(len(self.layers)))
        ]

    def _tail_diagonal(self) -> list[Tensor]:
        if not len(self._diag()):
            return []
        return [d.reshape(-1) for d in self._diag().diagonals(self._normalizer)]

    def _trace(self) -> Tensor:
        if self._chain is not None:
            return super()._trace()
        parts = [torch.trace(f.G) * torch.trace(f.A) for f in self.factors()]
        parts += [d.sum() for d in self._tail_diagonal()]
        return torch.stack(parts).sum()

    def _diagonal(self) -> Tensor:
        if self._chain is not None:
            return super()._diagonal()
        parts = []
        for layer, f in zip(self.layers, self.factors()):
            grid = torch.outer(torch.diagonal(f.G), torch.diagonal(f.A)).reshape(-1)
            parts.append(grid[layer_rules.parameter_order(layer.module).to(grid.device)])
        return torch.cat(parts + self._tail_diagonal())

    def _frobenius_norm(self) -> Tensor:
        if self._chain is not None:
            return super()._frobenius_norm()
        squares = [
            torch.linalg.matrix_norm(f.G) ** 2 * torch.linalg.matrix_norm(f.A) ** 2
            for f in self.factors()
        ]
        squares += [d.square().sum() for d in self._tail_diagonal()]
        return torch.stack(squares).sum().sqrt()

    def _logdet(self, damping: float) -> Tensor:
        if self._chain is not None:
            return super()._logdet(damping)
        values = [s.reshape(-1) for s in self._layer_spectra()] + self._tail_diagonal()
        return torch.log(torch.cat(values).double() + damping).sum()

    def _eigenvalues(self, k: int | None) -> Tensor:
        if self._chain is not None:
            return super()._eigenvalues(k)
        values = [s.reshape(-1) for s in self._layer_spectra()] + self._tail_diagonal()
        return torch.sort(torch.cat(values), descending=True).values

    def _layer_label(self, k: int) -> str:
        layer = self.layers[k]
        return f"layer '{layer.name}' ({type(layer.module).__name__})"

    # --- distribution ----------------------------------------------------------------------

    def _sums(self) -> list[NamedTensor]:
        sums = []
        for k, (a, g) in enumerate(zip(self._a_sum or [], self._g_sum or [])):
            label = self._layer_label(k)
            sums.append(NamedTensor(f"{label} A", a, "symmetric"))
            sums.append(NamedTensor(f"{label} G", g, "symmetric"))
        if self._chain is not None:
            for k, (a_cross, g_cross) in enumerate(zip(self._chain.a_sum, self._chain.g_sum)):
                if a_cross is not None and g_cross is not None:
                    sums.append(NamedTensor(f"cross-layer boundary {k} A", a_cross))
                    sums.append(NamedTensor(f"cross-layer boundary {k} G", g_cross))
        if len(self._diag()):
            sums.extend(self._diag().named_sums())
        return sums

    def _load_sums(self, sums: list[Tensor]) -> None:
        if len(self._diag()):
            self._diag().adopt(sums[len(sums) - len(self._diag()) :])
            sums = sums[: len(sums) - len(self._diag())]
        count = len(self.layers)
        a_sum, g_sum = sums[0 : 2 * count : 2], sums[1 : 2 * count : 2]
        self._adopt(a_sum, list(self._a_count), g_sum)
        if self._chain is not None:
            cross = iter(sums[2 * count :])
            for k, a in enumerate(self._chain.a_sum):
                if a is not None:
                    self._chain.a_sum[k], self._chain.g_sum[k] = next(cross), next(cross)

    def _counts(self) -> list[float]:
        counts = [float(c) for c in self._a_count]
        if self._chain is not None:
            counts.append(float(self._chain.a_count))
        return counts

    def _load_counts(self, counts: list[float]) -> None:
        count = len(self.layers)
        self._a_count = [round(c) for c in counts[:count]]
        if self._chain is not None:
            self._chain.a_count = round(counts[count])

    def _decomposition_blocks(self) -> list[DecompositionBlock]:
        sizes = [layer_rules.weight_matrix_shape(layer.module) for layer in self.layers]
        if self._chain is not None:  # coupled layers are factorised together
            return [
                DecompositionBlock(
                    index=0,
                    name=f"{type(self).__name__} block-tridiagonal chain (all layers)",
                    param_indices=tuple(range(len(self.params))),
                    cost=float(sum(d_out**3 + d_in**3 for d_out, d_in in sizes)),
                )
            ]
        blocks, start = [], 0
        for k, (layer, (d_out, d_in)) in enumerate(zip(self.layers, sizes)):
            stop = start + len(layer.params)
            blocks.append(
                DecompositionBlock(
                    index=k,
                    name=self._layer_label(k),
                    param_indices=tuple(range(start, stop)),
                    cost=self._layer_cost(d_out, d_in),
                )
            )
            start = stop
        if len(self._diag()):
            blocks.append(
                DecompositionBlock(
                    index=len(blocks),
                    name=f"{type(self).__name__} diagonal blocks",
                    param_indices=tuple(range(start, len(self.params))),
                    cost=float(sum(p.numel() for p in self._diag().params)),
                )
            )
        return blocks

    def _is_diagonal_block(self, index: int) -> bool:
        return self._chain is None and index == len(self.layers)

    def _layer_cost(self, d_out: int, d_in: int) -> float:
        """Eigen- or Cholesky decompositions of ``G`` and ``A``: ``O(d_out³ + d_in³)``."""
        return float(d_out**3 + d_in**3)

    def _decompose(self, index: int, damping: float) -> None:
        if self._is_diagonal_block(index):
            return  # nothing to factorise: (d + λ)⁻¹
        if self._chain is not None:
            self._chain_factorisation(damping)
        elif self.damping_mode == "factored":
            self._layer_inverses(index, damping)
        else:
            self._layer_eigen(index)

    def _export_decomposition(self, index: int, damping: float) -> list[NamedTensor]:
        if self._is_diagonal_block(index):
            return []
        label = self._layer_label(index)
        if self._chain is not None:
            return self._export_chain(damping)
        if self.damping_mode == "factored":
            if self._inverses is None or self._inverses[0] != damping:
                raise RuntimeError(f"{type(self).__name__}: {label} is not decomposed yet.")
            pair = self._inverses[1][index]
            if pair is None:
                raise RuntimeError(f"{type(self).__name__}: {label} is not decomposed yet.")
            return [
                NamedTensor(f"{label} (G + γ/π I)⁻¹", pair[0], "symmetric"),
                NamedTensor(f"{label} (A + πγ I)⁻¹", pair[1], "symmetric"),
            ]
        eig = None if self._eigen is None else self._eigen[index]
        if eig is None:
            raise RuntimeError(f"{type(self).__name__}: {label} is not decomposed yet.")
        return [
            NamedTensor(f"{label} G eigenvalues", eig.G.eigenvalues),
            NamedTensor(f"{label} G eigenvectors", eig.G.eigenvectors),
            NamedTensor(f"{label} A eigenvalues", eig.A.eigenvalues),
            NamedTensor(f"{label} A eigenvectors", eig.A.eigenvectors),
        ]

    def _import_decomposition(self, index: int, damping: float, tensors: list[Tensor]) -> None:
        if self._is_diagonal_block(index):
            return
        if self._chain is not None:
            self._import_chain(damping, tensors)
        elif self.damping_mode == "factored":
            if self._inverses is None or self._inverses[0] != damping:
                self._inverses = (damping, [None] * len(self.layers))
            self._inverses[1][index] = (tensors[0], tensors[1])
        else:
            if self._eigen is None:
                self._eigen = [None] * len(self.layers)
            self._eigen[index] = _LayerEigen(
                G=linalg.SymmetricEigen(tensors[0], tensors[1]),
                A=linalg.SymmetricEigen(tensors[2], tensors[3]),
            )

    def _export_chain(self, damping: float) -> list[NamedTensor]:
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

    def _import_chain(self, damping: float, tensors: list[Tensor]) -> None:
        assert self._chain is not None and self._chain.order is not None
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
        if self._chain is not None:
            return self._solve_chain(v, damping)
        if self._is_diagonal_block(index):
            return self._diag().solve(v, damping, self._normalizer)
        return self._solve_layer(index, v, damping)

    # --- state ---------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "a_sum": self._a_sum,
            "a_count": list(self._a_count),
            "g_sum": self._g_sum,
        }
        if self._chain is not None:
            state["chain"] = self._chain.state()
        if len(self._diag()):
            state["diagonal"] = self._diag().sums
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        a_sum, g_sum = state["a_sum"], state["g_sum"]
        if a_sum is not None:
            a_sum, g_sum = [t.clone() for t in a_sum], [t.clone() for t in g_sum]
        self._adopt(a_sum, list(state["a_count"]), g_sum)
        if len(self._diag()):
            sums = state.get("diagonal")
            self._diag().adopt(None if sums is None else [t.clone() for t in sums])
        if self._chain is not None:
            self._chain.load(state["chain"], copy=True)
            self._forward.order = self._chain.order

    def _adopt(
        self, a_sum: list[Tensor] | None, a_count: list[int], g_sum: list[Tensor] | None
    ) -> None:
        """Take the sums over (validated, not copied, never updated in place)."""
        if a_sum is not None and g_sum is not None:
            expected = [layer_rules.weight_matrix_shape(layer.module) for layer in self.layers]
            got = [(g.shape[0], a.shape[0]) for a, g in zip(a_sum, g_sum)]
            if got != expected:
                raise ValueError(
                    f"{type(self).__name__}: factor sizes {got} do not match this model's "
                    f"layers {expected}."
                )
        self._a_sum, self._g_sum, self._a_count = a_sum, g_sum, a_count
        self._owned = False


@register("kfc")
class KFC(KFAC):
    """K-FAC with convolutions (Grosse & Martens 2016): ``nn.Linear`` and ``nn.Conv1d/2d/3d``.

    For a convolution, ``kfac_approx="expand"`` is KFC: ``A = Ω/|T|`` from the unfolded input
    patches and ``G = |T|·Γ`` from the per-location output gradients
    (concepts/kronecker.md#convolutions-kfc). Stride,
    padding (zeros) and dilation are supported; grouped convolutions raise a clear error.
    Arguments as for :class:`KFAC`.
    """

    supported_layers = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _resolve(model: nn.Module, specs: Sequence[LayerSpec], arg: str, owner: str) -> set[int]:
    by_name = dict(model.named_modules())
    members = {id(m) for m in by_name.values()}
    ids = set()
    for spec in specs:
        if isinstance(spec, str):
            if spec not in by_name:
                raise ValueError(
                    f"{owner}: {arg} names unknown module {spec!r}; modules with parameters: "
                    f"{[layer.name for layer in find_layers(model)]}."
                )
            ids.add(id(by_name[spec]))
        elif isinstance(spec, nn.Module) and id(spec) in members:
            ids.add(id(spec))
        else:
            raise ValueError(f"{owner}: {arg} entry {spec!r} is not a module of the model.")
    return ids


def _psd_eig(M: Tensor, name: str) -> linalg.SymmetricEigen:
    # The factors are PSD by construction; negative eigenvalues are rounding and are clamped.
    d, q = linalg.symeig(M, name=name)
    return linalg.SymmetricEigen(d.clamp(min=0.0), q)


def _spd_inverse(M: Tensor, name: str) -> Tensor:
    """``M⁻¹`` of a (damped) SPD factor via Cholesky (float64 retry, clear error)."""
    chol = linalg.cholesky_factor(M, name=name, keep_float64=True)
    return torch.cholesky_inverse(chol).to(M.dtype)


def _as_matrix(layer: Layer, parts: list[Tensor]) -> Tensor:
    bias = parts[1] if len(parts) > 1 else None
    return layer_rules.to_matrix(layer.module, parts[0], bias)
