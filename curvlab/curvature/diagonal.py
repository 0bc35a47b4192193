"""``DiagonalFisher``: the diagonal of the Fisher (BackPACK's ``DiagGGN`` analogue).

:class:`DiagonalBlocks` is the shared piece: the diagonal ``d = Σ_b w_b Σ_k V_{b,k}²`` of a
set of parameters' curvature, the squares of the per-row gradients ``V`` (one row per loss
row and output column, MC sample or observed label;
:class:`~curvlab.extraction.requests.ParameterDiagonal`, from per-sample gradients read
off the recorded graph, or of a replayed forward pass, where the samples are independent;
concepts/models.md#extraction-engines). The Kronecker
backends cover the parameters that have no Kronecker rule (normalisation layers, raw
``nn.Parameter``s, recurrent weights, transposed convolutions, tied weights) with it.
Its damped inverse is exact: ``(d + λ)⁻¹``. With ``at_layers=True`` (the Kronecker
backends) normalisation layers take their per-row gradients at the layer instead
(:class:`~curvlab.extraction.requests.DiagonalStatistics`: unit-wise, from the columns
already backpropagated for the Kronecker layers where each loss row is one sample of the
layer, else from each row's columns backpropagated to the layer on their own), which is
far cheaper than one backward pass per loss row to the parameters and as exact
(concepts/models.md#rows-samples-and-exactness). With ``coupled=False`` (``KFAC``,
``KFC``) samples coupled by a train-mode BatchNorm keep per-sample gradients, an
approximation the backend's ``coverage()`` reports.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvlab import linalg
from curvlab.curvature.base import (
    Curvature,
    DecompositionBlock,
    Layer,
    LayerMemory,
    MemoryEstimate,
    RunningSum,
    Vector,
    find_layers,
)
from curvlab.curvature.registry import register
from curvlab.extraction import BatchResult, FisherType, Request, check_mc_samples
from curvlab.extraction import layers as layer_rules
from curvlab.extraction.requests import DiagonalStatistics, ParameterDiagonal


class DiagonalBlocks:
    """Diagonal curvature of ``layers``' parameters (see the module docstring)."""

    def __init__(
        self,
        layers: list[Layer],
        fisher_type: FisherType,
        mc_samples: int,
        owner: str,
        at_layers: bool = False,
        tied: frozenset[int] = frozenset(),
        coupled: bool = True,
    ) -> None:
        self.layers = layers
        self.owner = owner
        self.params = [p for layer in layers for p in layer.params]
        self.names = [n for layer in layers for n in layer.param_names]
        local = [
            layer
            for layer in layers
            if at_layers
            and type(layer.module) in layer_rules.DIAGONAL_RULES
            and not any(id(p) in tied for p in layer.params)
        ]
        self._local = {id(p) for layer in local for p in layer.params}
        rest = tuple(p for p in self.params if id(p) not in self._local)
        self.requests: list[Request] = []
        self._rows = ParameterDiagonal(fisher_type, rest, mc_samples)
        self._stats = DiagonalStatistics(
            fisher_type, tuple(layer.module for layer in local), mc_samples, coupled=coupled
        )
        if rest:
            self.requests.append(self._rows)
        if local:
            self.requests.append(self._stats)
        self.sums: list[Tensor] | None = None

    def __len__(self) -> int:
        return len(self.params)

    def _batch_diagonal(self, result: BatchResult, p: Tensor, name: str) -> Tensor:
        request = self._stats if id(p) in self._local else self._rows
        found = result.diagonals.get(request.key, {}).get(id(p))
        # a layer the forward pass did not call adds nothing (as torch.optim skips it)
        return found if found is not None else layer_rules.statistics_dtype(torch.zeros_like(p))

    def accumulate(self, result: BatchResult, weight: float) -> None:
        batch = [
            self._batch_diagonal(result, p, n) * weight for p, n in zip(self.params, self.names)
        ]
        self.sums = batch if self.sums is None else [a + b for a, b in zip(self.sums, batch)]

    def memory(self) -> dict[str, LayerMemory]:
        """Per parameter the bytes of its diagonal (in the statistics' dtype); no inverse
        is kept (``(d + λ)⁻¹`` is formed per solve)."""
        return {
            f"diagonal of '{name}'": LayerMemory(
                p.numel() * layer_rules.statistics_dtype(p.detach().reshape(-1)[:0]).element_size(),
                0,
            )
            for name, p in zip(self.names, self.params)
        }

    def diagonals(self, normalizer: float) -> list[Tensor]:
        assert self.sums is not None
        return [d / normalizer for d in self.sums]

    def matvec(self, v: Vector, normalizer: float) -> Vector:
        return [d.to(t.dtype) * t for d, t in zip(self.diagonals(normalizer), v)]

    def solve(self, v: Vector, damping: float, normalizer: float) -> Vector:
        out = []
        for d, t, name in zip(self.diagonals(normalizer), v, self.names):
            damped = d + damping
            if not bool((damped > 0).all()):
                raise linalg.LinAlgError(
                    f"{self.owner}.solve: the diagonal block of '{name}' has zero entries; "
                    "use damping > 0."
                )
            out.append((t / damped.to(t.dtype)).to(t.dtype))
        return out

    def to_dense(self, normalizer: float) -> Tensor:
        return torch.diag(torch.cat([d.reshape(-1) for d in self.diagonals(normalizer)]))

    def label(self, i: int) -> str:
        """Parameter ``i``'s name, for messages and distributed sums."""
        return f"'{self.names[i]}'"

    def check_loaded(self) -> None:
        """Loaded sums must be shaped like the parameters (a clear error otherwise)."""
        if self.sums is not None:
            shapes = [tuple(t.shape) for t in self.sums]
            expected = [tuple(p.shape) for p in self.params]
            if shapes != expected:
                raise ValueError(
                    f"{self.owner}: diagonal shapes {shapes} do not match this model's {expected}."
                )


@register("diagonal")
class DiagonalFisher(Curvature):
    """The diagonal of the Fisher: exact (``"exact"``), Monte-Carlo (``"mc"``, ``mc_samples``
    labels per input) or empirical (``"empirical"``), every trainable parameter.

    ``solve`` divides by ``diagonal + λ``. Cheap to store and invert; ignores every
    correlation between parameters.
    """

    running_state = (RunningSum("diagonal", "_diag.sums", label="_diag.label", legacy="sums"),)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        fisher_type: str = "exact",
        mc_samples: int = 1,
        engine: str = "auto",
    ) -> None:
        super().__init__(model, loss_fn, engine=engine)
        owner = type(self).__name__
        self.fisher_type = FisherType.parse(fisher_type, owner)
        check_mc_samples(mc_samples, owner)
        self.mc_samples = mc_samples
        layers = find_layers(self.model)
        self._diag = DiagonalBlocks(layers, self.fisher_type, mc_samples, owner)
        self._cover(layers, self._diag.requests)

    def _blocks(self) -> DiagonalBlocks:
        return self._diag

    def _block_kind(self, layer: Layer) -> str:
        return "diagonal"

    def _memory_estimate(self) -> MemoryEstimate:
        return MemoryEstimate(self._blocks().memory())

    def _accumulate(self, result: BatchResult, weight: float) -> None:
        self._blocks().accumulate(result, weight)

    def _matvec(self, v: Vector) -> Vector:
        return self._blocks().matvec(v, self._normalizer)

    def _solve(self, v: Vector, damping: float) -> Vector:
        return self._blocks().solve(v, damping, self._normalizer)

    def _to_dense(self) -> Tensor:
        return self._blocks().to_dense(self._normalizer)

    def _diagonal(self) -> Tensor:
        return torch.cat([d.reshape(-1) for d in self._blocks().diagonals(self._normalizer)])

    def _trace(self) -> Tensor:
        return self._diagonal().sum()

    def _frobenius_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self._diagonal())

    def _logdet(self, damping: float) -> Tensor:
        return torch.log(self._diagonal().double() + damping).sum()

    def _eigenvalues(self, k: int | None) -> Tensor:
        return torch.sort(self._diagonal(), descending=True).values

    def _check_loaded_sums(self) -> None:
        self._diag.check_loaded()

    def _decomposition_blocks(self) -> list[DecompositionBlock]:
        return [
            DecompositionBlock(
                index=0,
                name=f"{type(self).__name__} (all parameters)",
                param_indices=tuple(range(len(self.params))),
                cost=float(self.num_params),
            )
        ]
