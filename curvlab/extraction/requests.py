"""What a backend asks of a batch, and the plain objects an engine answers with.

A backend states its needs as *requests* (:class:`FactorRows` for dense blocks,
:class:`KroneckerStatistics` for Kronecker-factored layers); an engine runs the forward
and backward passes and returns a :class:`BatchResult`. Requests are plain data: they
name parameters and modules, Fisher type and options, never an engine. Results are plain
tensors keyed by the request; nothing is stored on ``Parameter`` or module objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from curvlab.extraction.fisher_types import FisherType
from curvlab.extraction.losses import BatchScale

__all__ = [
    "Batch",
    "BatchResult",
    "DiagonalStatistics",
    "Engine",
    "FactorRows",
    "KroneckerBatch",
    "KroneckerStatistics",
    "ParameterDiagonal",
    "RecurrentBatch",
    "RecurrentStatistics",
    "Request",
    "check_mc_samples",
]


def check_mc_samples(mc_samples: int, owner: str) -> None:
    """Raise a ``ValueError`` unless ``mc_samples`` is a positive integer."""
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"{owner}: mc_samples must be a positive integer, got {mc_samples!r}.")


class _FisherTyped:
    """A request's ``fisher_type``: a :class:`FisherType` or its string, converted (and
    refused with a ``ValueError`` if unknown) when the request is built."""

    fisher_type: FisherType

    def __post_init__(self) -> None:
        member = FisherType.parse(self.fisher_type, type(self).__name__)
        object.__setattr__(self, "fisher_type", member)


@dataclass(frozen=True, eq=False)
class FactorRows(_FisherTyped):
    """Per parameter ``p``, rows ``V_p`` ``[K, p.numel()]`` with ``V_pᵀ V_q`` the batch's
    curvature block between ``p`` and ``q`` on the loss's scale (``K``: one row per loss
    row and output column, MC sample or observed label)."""

    fisher_type: FisherType
    params: tuple[nn.Parameter, ...]
    mc_samples: int = 1

    @property
    def key(self) -> tuple[FisherType, int]:
        return (self.fisher_type, self.fisher_type.draws(self.mc_samples))


@dataclass(frozen=True, eq=False)
class KroneckerStatistics(_FisherTyped):
    """Per module, its Kronecker statistics (:class:`KroneckerBatch`) for ``fisher_type``.

    ``keep_raw``: also the homogeneous input patches and output columns of the batch.
    """

    fisher_type: FisherType
    modules: tuple[nn.Module, ...]
    kfac_approx: str = "expand"
    mc_samples: int = 1
    keep_raw: bool = False
    #: statistics from the first ``⌈fraction·N⌉`` samples of the batch (Martens & Grosse
    #: estimate the factors on a subset); ``G`` is rescaled by ``N/m`` to the whole batch
    sample_fraction: float = 1.0
    #: also the per-row weight gradients (:attr:`KroneckerBatch.row_grads`) of the layers
    #: whose per-sample patches and columns cannot give them (see there), exact also where
    #: samples are coupled; on the whole batch, whatever ``sample_fraction``
    per_row: bool = False
    #: the modules whose output factor is delivered in low-rank form
    #: (:attr:`KroneckerBatch.g_low_rank`) instead of the ``[D_out, D_out]`` matrix
    low_rank_output: tuple[nn.Module, ...] = ()

    @property
    def columns_key(self) -> tuple[FisherType, int]:
        """Requests with the same key share the backpropagated columns (and MC draws)."""
        return (self.fisher_type, self.fisher_type.draws(self.mc_samples))

    @property
    def key(self) -> tuple[Any, ...]:
        return (
            *self.columns_key,
            self.kfac_approx,
            self.keep_raw,
            self.sample_fraction,
            self.per_row,
            tuple(id(m) for m in self.low_rank_output),
        )


@dataclass(frozen=True, eq=False)
class DiagonalStatistics(_FisherTyped):
    """Per parameter of ``modules``, ``Σ_{k,r} (∂ℓ/∂θ)_{k,r}²``: the diagonal of the Fisher
    from per-row gradients formed *at the layer* (its recorded input and the output
    gradients of each loss row's columns), for layers with a diagonal rule
    (:data:`curvlab.extraction.layers.DIAGONAL_RULES`: normalisation layers).

    Where each loss row is one sample of the layer and nothing couples the samples after
    it, the per-sample gradients of the columns backpropagated for the Kronecker layers
    are the per-row gradients (cheap). Elsewhere — several loss rows per sample (token or
    pixel losses), or samples coupled after the layer (BatchNorm in train mode) — each
    row's columns are backpropagated to the layer on their own, which is exact
    (concepts/models.md#rows-samples-and-exactness). With ``coupled=False`` coupled samples
    keep the cheap per-sample gradients (an approximation the backend reports). For
    ``"mc"`` the draws of different rows are independent with zero mean, so without
    coupling the per-sample squares are an unbiased estimate and are kept.
    """

    fisher_type: FisherType
    modules: tuple[nn.Module, ...]
    mc_samples: int = 1
    #: exact per-row gradients also where the samples are coupled after the layer
    coupled: bool = True

    @property
    def columns_key(self) -> tuple[FisherType, int]:
        return (self.fisher_type, self.fisher_type.draws(self.mc_samples))

    @property
    def key(self) -> tuple[FisherType, int, bool]:
        return (*self.columns_key, self.coupled)


@dataclass(frozen=True, eq=False)
class ParameterDiagonal(_FisherTyped):
    """Per parameter, ``Σ_{k,r} (∂ℓ/∂θ)_{k,r}²`` over the loss rows ``r`` and output
    columns ``k``: the diagonal of the Fisher of parameters that no layer rule serves (raw
    parameters, tied weights, recurrent weights), as the squares of
    :class:`FactorRows` would give it, without forming the rows.

    The hooks engine takes per-sample gradients from the recorded graph where it serves
    every use of the parameters (:mod:`curvlab.extraction.graph_samples`), else from a
    replay of the model's forward pass where the model treats its samples independently
    (both linear in the batch; :mod:`curvlab.extraction.replay`), else one backward pass
    per loss row. For ``"mc"``
    the columns of a sample's rows are summed first: the draws of different rows are
    independent with zero mean, so the per-sample squares are an unbiased estimate.
    """

    fisher_type: FisherType
    params: tuple[nn.Parameter, ...]
    mc_samples: int = 1

    @property
    def columns_key(self) -> tuple[FisherType, int]:
        return (self.fisher_type, self.fisher_type.draws(self.mc_samples))

    @property
    def key(self) -> tuple[str, FisherType, int]:
        return ("parameters", *self.columns_key)

    def rows(self) -> FactorRows:
        """The factor rows whose squares this is (for engines that form rows)."""
        return FactorRows(self.fisher_type, self.params, self.mc_samples)


@dataclass(frozen=True, eq=False)
class RecurrentStatistics(_FisherTyped):
    """Per recurrent module (``nn.RNN``/``nn.LSTM``/``nn.GRU``) of ``modules``, the sums of
    each of its affine maps (:class:`RecurrentBatch`, keyed by the map's block name such as
    ``"ih_l0"``; concepts/recurrent.md). ``lagged``: also the lag-one sums of the series
    model. Served by the hooks engine (:mod:`curvlab.extraction.recurrent`).
    """

    fisher_type: FisherType
    modules: tuple[nn.Module, ...]
    mc_samples: int = 1
    lagged: bool = False
    sample_fraction: float = 1.0
    #: the modules' names in the model, for error messages (``modules``' order)
    names: tuple[str, ...] = ()

    @property
    def columns_key(self) -> tuple[FisherType, int]:
        return (self.fisher_type, self.fisher_type.draws(self.mc_samples))

    def name_of(self, module: nn.Module) -> str:
        """``module``'s name in the model (its type's name if not given)."""
        for m, name in zip(self.modules, self.names):
            if m is module:
                return name
        return type(module).__name__

    @property
    def key(self) -> tuple[str, FisherType, int, bool, float]:
        return ("recurrent", *self.columns_key, self.lagged, self.sample_fraction)


Request = (
    FactorRows | KroneckerStatistics | DiagonalStatistics | ParameterDiagonal | RecurrentStatistics
)


@dataclass(frozen=True)
class KroneckerBatch:
    """One batch's statistics of one layer: ``A = a_sum / count``, ``G`` on the loss's scale.

    ``patches`` ``[N, T, D_in]`` and ``columns`` ``[K, N, T, D_out]`` are set when the
    request kept them; ``column_scale`` brings ``Σ columns²`` onto the loss's scale.
    ``kept`` ``[N, T]`` (bool) marks the patches that entered ``a_sum`` when rows the loss
    ignores were left out (``None``: all did; concepts/models.md#rows-the-loss-ignores).

    ``row_grads`` ``[K', D_out, D_in]``: the per-row gradients of the homogeneous weight
    matrix, one per loss row and column (``column_scale`` applies to their squares), set
    for a ``per_row`` request where the per-sample ones are not per-row: several loss rows
    per layer sample, or samples coupled after the layer (then ``patches`` and
    ``columns`` are not kept; concepts/models.md#rows-samples-and-exactness). Where it is
    ``None`` the per-sample gradients ``Σ_t g_{k,n,t} ā_{n,t}ᵀ`` of ``patches`` and
    ``columns`` are the per-row ones (one loss row per sample; for ``"mc"`` an unbiased
    estimate of them when several rows share a sample).
    """

    a_sum: Tensor
    count: int
    g: Tensor
    patches: Tensor | None = None
    columns: Tensor | None = None
    column_scale: float = 1.0
    kept: Tensor | None = None
    row_grads: Tensor | None = None
    #: for a module of ``KroneckerStatistics.low_rank_output``: ``(d, C, sign)`` with the
    #: batch's ``G = diag(d) + sign · C Cᵀ`` (``d`` ``[D_out]``, ``C`` ``[D_out, M]``); ``g``
    #: is then an empty ``[0, 0]`` tensor (concepts/kronecker.md#vocabulary-sized-output-layers)
    g_low_rank: tuple[Tensor, Tensor, float] | None = None


@dataclass(frozen=True)
class RecurrentBatch:
    """One batch's sums of one affine map of a recurrent module (concepts/recurrent.md).

    ``kron``: the independent-time-steps statistics (``a_sum`` over samples and steps,
    ``count = N·T``, ``g`` over columns, samples and steps); ``a_lag`` = ``Σ ā_t ā_{t+1}ᵀ``
    and ``g_lag`` = ``Σ g_t g_{t+1}ᵀ`` over the ``lag_count = N·(T-1)`` consecutive pairs
    (zero unless the request was ``lagged``); ``sequences``: ``N``.
    """

    kron: KroneckerBatch
    a_lag: Tensor
    g_lag: Tensor
    lag_count: int
    sequences: int


@dataclass
class BatchResult:
    """What one extraction delivered: the batch's scale and the answer to each request."""

    scale: BatchScale
    engine: str = ""
    rows: dict[tuple[Any, ...], dict[int, Tensor]] = field(default_factory=dict)
    kronecker: dict[tuple[Any, ...], dict[int, KroneckerBatch]] = field(default_factory=dict)
    diagonals: dict[tuple[Any, ...], dict[int, Tensor]] = field(default_factory=dict)
    #: per request key and recurrent module, its maps' sums by block name
    recurrent: dict[tuple[Any, ...], dict[int, dict[str, RecurrentBatch]]] = field(
        default_factory=dict
    )

    def factor_rows(self, request: FactorRows, param: Tensor, name: str) -> Tensor:
        """``[K, param.numel()]`` rows of ``param`` for ``request``."""
        found = self.rows.get(request.key, {}).get(id(param))
        if found is None:
            raise RuntimeError(
                f"No factor rows for parameter '{name}' ({request.fisher_type} Fisher) in this "
                "batch: the parameter took no part in the loss that was backpropagated."
            )
        return found

    def kronecker_batch(
        self, request: KroneckerStatistics, module: nn.Module, name: str
    ) -> KroneckerBatch:
        """The Kronecker statistics of ``module`` for ``request``."""
        found = self.kronecker.get(request.key, {}).get(id(module))
        if found is None:
            raise RuntimeError(
                f"No Kronecker statistics for layer '{name}' ({type(module).__name__}) in this "
                "batch: the layer was not called (through its forward) in the forward pass "
                "that produced the loss. A module the forward does not use (e.g. an "
                f"auxiliary head) can be left out with exclude=['{name}']; layers called "
                "functionally (e.g. the projections inside nn.MultiheadAttention) cannot get "
                "Kronecker blocks."
            )
        return found


@dataclass(eq=False)
class Batch:
    """One batch whose requests an :class:`Engine` answers.

    Either a *fresh* batch — the engine runs the forward pass ``model(inputs)`` itself —
    or a *recorded* one: the forward pass already ran under a recording of the hooks
    engine (``recorded``: a :class:`curvlab.extraction.hooks.RecordedBatch`); an engine
    that needs a forward pass of its own then runs ``model(inputs)`` again with the
    recorded call's one positional input (``None`` when it had several or none).
    """

    model: nn.Module
    #: ``None`` only when an engine is chosen without a batch (:func:`choose_engine`)
    loss_fn: nn.Module | None
    requests: tuple[Request, ...]
    inputs: Any = None
    targets: Tensor | None = None
    #: the modules the backends record (their calls in the forward pass)
    modules: tuple[nn.Module, ...] = ()
    recorded: Any = None
    #: the model output has axes beyond ``[N, C]`` (tokens, pixels)
    extra_axes: bool = False
    #: some targets equal the loss's ``ignore_index`` (``None``: not looked at yet)
    ignored_rows: bool | None = None

    def has_ignored_rows(self) -> bool:
        """Whether some targets equal the loss's ``ignore_index``: one look at the targets
        (a host synchronisation), only when an engine asks."""
        if self.ignored_rows is None:
            self.ignored_rows = (
                isinstance(self.loss_fn, nn.CrossEntropyLoss)
                and self.targets is not None
                and bool((torch.as_tensor(self.targets) == self.loss_fn.ignore_index).any())
            )
        return self.ignored_rows


class Engine(Protocol):
    """An extraction engine: answers a :class:`Batch`'s requests with a :class:`BatchResult`.

    The engines ``engine=`` can name are the entries of
    :data:`curvlab.extraction.engines.ENGINE_TABLE`.
    """

    #: the name ``engine=`` takes
    name: str

    def unable_reason(self, batch: Batch) -> str | None:
        """Why this engine cannot serve ``batch`` (shown in errors), or ``None`` if it can.
        Called before any forward pass; it must not run the model."""
        ...

    def preferred(self, batch: Batch) -> bool:
        """Whether ``engine="auto"`` should take this engine for ``batch`` (when it can serve
        it) over the first engine of the table that can."""
        ...

    def run(self, batch: Batch) -> tuple[Tensor, BatchResult]:
        """The batch's detached loss and the answer to its requests; parameter gradients
        (``.grad``) are left as they were."""
        ...


def validate_request(request: Any, owner: str) -> None:
    """Raise a ``TypeError``/``ValueError`` naming ``owner`` for a malformed request."""
    if not isinstance(
        request,
        (
            FactorRows,
            KroneckerStatistics,
            DiagonalStatistics,
            ParameterDiagonal,
            RecurrentStatistics,
        ),
    ):
        raise TypeError(f"{owner}: unknown request {request!r}.")
    check_mc_samples(request.mc_samples, owner)
