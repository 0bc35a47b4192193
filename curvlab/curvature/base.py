"""The ``Curvature`` interface every backend implements (docs/api.rst).

Public methods validate their arguments once and dispatch to small private hooks
(``_accumulate``, ``_matvec``, ``_solve``, ``_to_dense``); nothing outside a backend's
module knows which backend it holds.

**One accumulated state.** A backend declares what it accumulates once, in its class
attribute :attr:`Curvature.running_state`: its running sums (:class:`RunningSum`), the
counters that normalise some of them (:class:`RunningCount`) and what it fixes when
accumulating that does not add (:class:`StateTag`). Everything that reads or writes the
accumulated state is derived from that declaration here: ``reset``, ``statistics`` and
``load_statistics`` (what a moving average mixes), ``state_dict`` and
``load_state_dict`` (checkpoints; :func:`migrate_state` translates older layouts) and the
distributed sums.

Accumulation over several batches gives the curvature of their union: batch ``b``
enters with weight ``w_b = 1/R_b`` (its share of the union's reduction) and, for
``reduction="mean"``, the sum is divided by ``Σ_b w_b``; for ``"sum"`` the batch
curvatures simply add (``w_b = 1``, no division).

Distribution is not on this public face: the distributed sums (``_sums``/``_load_sums``,
``_counts``/``_load_counts``) come from the declaration — tensors add entry by entry, a
structured value (K-FAC's ``DiagonalPlusLowRank`` output factor) travels as the parts its
sum's :class:`StructuredSum` names and is recombined from them — and a backend with its own
factorisations takes part through the hooks ``_decomposition_blocks``, ``_decompose``,
``_export_decomposition``, ``_import_decomposition`` and ``_solve_block`` (all with working
defaults), which :class:`curvlab.curvature.distribution.DistributionInterface` validates and
calls for a distributed preconditioner.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from curvlab import extraction
from curvlab.extraction import hooks
from curvlab.extraction.losses import batch_scale, check_loss
from curvlab.extraction.requests import (
    BatchResult,
    DiagonalStatistics,
    KroneckerStatistics,
    RecurrentStatistics,
    Request,
    validate_request,
)
from curvlab.linalg.damping import check_damping
from curvlab.linalg.low_rank import DiagonalPlusLowRank, low_rank_sum

Vector = list[Tensor]

#: How a :class:`NamedTensor` is determined by part of its entries.
TENSOR_STRUCTURES = ("general", "symmetric", "lower_triangular")

#: How the processes' copies of a :class:`NamedTensor` combine in a distributed sum.
REDUCTIONS = ("sum", "gather")


@dataclass(frozen=True)
class NamedTensor:
    """A tensor with a name for error messages and the structure that determines it.

    ``structure``: ``"general"`` (every entry counts), ``"symmetric"`` (``[n, n]`` with
    ``M = Mᵀ``: the upper triangle determines it) or ``"lower_triangular"`` (``[n, n]``,
    zero above the diagonal, e.g. a Cholesky factor). Communication sends only the
    entries that determine the tensor.

    ``reduction`` (for the distributed sums, :data:`REDUCTIONS`): ``"sum"`` — the tensors
    of the processes add; ``"gather"`` — every process's tensor is kept, stacked in rank
    order into ``[processes, *shape]`` (a part of a structured sum, which its
    :class:`StructuredSum` combines).
    """

    name: str
    tensor: Tensor
    structure: str = "general"
    reduction: str = "sum"

    def __post_init__(self) -> None:
        if self.structure not in TENSOR_STRUCTURES:
            raise ValueError(
                f"NamedTensor '{self.name}': unknown structure {self.structure!r}; choose one "
                f"of {TENSOR_STRUCTURES}."
            )
        if self.reduction not in REDUCTIONS:
            raise ValueError(
                f"NamedTensor '{self.name}': unknown reduction {self.reduction!r}; choose one "
                f"of {REDUCTIONS}."
            )
        if self.structure != "general" and (
            self.tensor.ndim != 2 or self.tensor.shape[0] != self.tensor.shape[1]
        ):
            raise ValueError(
                f"NamedTensor '{self.name}': a {self.structure} tensor must be square [n, n], "
                f"got shape {tuple(self.tensor.shape)}."
            )


@dataclass(frozen=True)
class DecompositionBlock:
    """A unit of decomposition work of a curvature (see :meth:`Curvature.decomposition_blocks`).

    Attributes:
        index: position in ``decomposition_blocks()``.
        name: what the block is, for messages (e.g. ``"layer '0' (Linear)"``).
        param_indices: the entries of ``params`` that the block's solve reads and writes,
            in increasing order; the blocks of a backend partition ``range(len(params))``.
        cost: estimated flops of decomposing the block (``Σ n³`` over the matrices it
            factorises; for a block without a factorisation, one solve's flops). Only
            ratios matter: blocks are assigned to processes by this cost.
    """

    index: int
    name: str
    param_indices: tuple[int, ...]
    cost: float


class LayerMemory(NamedTuple):
    """Bytes one layer (or one parameter's diagonal block) of a curvature holds.

    ``factors``: the accumulated statistics that ``state_dict()`` carries (Kronecker
    factors, diagonals, refitted scalings); ``inverses``: what the first ``solve`` computes
    and keeps (eigendecompositions, damped inverses, eigenbases).
    """

    factors: int
    inverses: int


@dataclass(frozen=True)
class MemoryEstimate:
    """What :meth:`Curvature.memory_estimate` returns: bytes per layer, from shapes alone.

    ``layers`` maps a layer's label (``"layer 'head' (Linear)"``) or a parameter with a
    diagonal block (``"diagonal of 'norm.weight'"``) to its :class:`LayerMemory`.
    """

    layers: dict[str, LayerMemory]

    @property
    def factors(self) -> int:
        """Bytes of all statistics."""
        return sum(m.factors for m in self.layers.values())

    @property
    def inverses(self) -> int:
        """Bytes of all decompositions."""
        return sum(m.inverses for m in self.layers.values())

    @property
    def total(self) -> int:
        """``factors + inverses``."""
        return self.factors + self.inverses

    def table(self, top: int | None = None) -> str:
        """A text table in MiB, the largest layers first (``top``: only that many rows)."""
        rows = sorted(self.layers.items(), key=lambda kv: -(kv[1].factors + kv[1].inverses))
        if top is not None:
            rows = rows[:top]
        width = max([len(name) for name, _ in rows] + [5])
        mib = 2.0**20
        lines = [f"{'layer':<{width}}  {'factors MiB':>12}  {'inverses MiB':>12}"]
        for name, m in rows:
            lines.append(f"{name:<{width}}  {m.factors / mib:>12.2f}  {m.inverses / mib:>12.2f}")
        lines.append(
            f"{'total':<{width}}  {self.factors / mib:>12.2f}  {self.inverses / mib:>12.2f}"
        )
        return "\n".join(lines)


#: ``reduce(entries)``: the tensors of ``entries`` reduced over processes as their
#: ``reduction`` says — summed, or gathered into ``[processes, *shape]`` (a collective).
ProcessReducer = Callable[[list[NamedTensor]], list[Tensor]]


@dataclass(frozen=True)
class Layer:
    """A block of the curvature: one module and its trainable parameters (weight, bias)."""

    name: str
    module: nn.Module
    params: tuple[nn.Parameter, ...]
    param_names: tuple[str, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def find_layers(model: nn.Module) -> list[Layer]:
    """Modules owning trainable parameters, in registration order, with their parameters.

    A parameter shared by several modules (tied weights) belongs to the first module that
    registers it, so every parameter appears once (the order of ``model.parameters()``).
    """
    layers = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = []
        for n, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                own.append((n, p))
        if own:
            prefix = f"{name}." if name else ""
            layers.append(
                Layer(
                    name=name,
                    module=module,
                    params=tuple(p for _, p in own),
                    param_names=tuple(prefix + n for n, _ in own),
                )
            )
    return layers


@dataclass(frozen=True)
class StructuredSum:
    """How the structured entries of a :class:`RunningSum` (values that are not tensors)
    add over processes, declared with the sum (``RunningSum(structured=...)``).

    A structured value travels as tensor parts: :attr:`parts` gives them with how each
    combines (``"sum"``: added over processes; ``"gather"``: every process's copy, stacked
    in rank order, :data:`REDUCTIONS`) and :attr:`combine` rebuilds the sum of the
    processes' values from the reduced parts. Every process combines the same reduced
    parts in the same order, so every process gets the same value.

    Attributes:
        kind: the type of the structured values.
        parts: ``value -> [(suffix, tensor, reduction), ...]``, the same suffixes, shapes
            and dtypes on every process (the suffix names the part in messages).
        combine: ``(value, reduced) -> value``: ``reduced[i]`` is part ``i`` summed over
            the processes (``"sum"``) or the ``[processes, *shape]`` stack of every
            process's part (``"gather"``); ``value`` is this process's own, for its layout.
    """

    kind: type
    parts: Callable[[Any], list[tuple[str, Tensor, str]]]
    combine: Callable[[Any, list[Tensor]], Any]


def _low_rank_parts(value: DiagonalPlusLowRank) -> list[tuple[str, Tensor, str]]:
    return [("diagonal", value.d, "sum"), ("U", value.U, "gather"), ("s", value.s, "gather")]


def _low_rank_combine(value: DiagonalPlusLowRank, reduced: list[Tensor]) -> DiagonalPlusLowRank:
    d, Us, ss = reduced
    n, rank = value.U.shape
    if Us.ndim != 3 or Us.shape[1:] != (n, rank) or ss.shape != (Us.shape[0], rank):
        raise ValueError(
            f"a DiagonalPlusLowRank [{n}, {n}] of rank {rank} needs the gathered U as "
            f"[processes, {n}, {rank}] and s as [processes, {rank}], got {tuple(Us.shape)} and "
            f"{tuple(ss.shape)}"
        )
    zero = d.new_zeros(n)
    parts = [DiagonalPlusLowRank(d if p == 0 else zero, Us[p], ss[p]) for p in range(Us.shape[0])]
    return low_rank_sum(parts, rank)


#: The distributed sum of a :class:`~curvlab.linalg.DiagonalPlusLowRank` (K-FAC's
#: structured output factor ``G = diag(d) + U diag(s) Uᵀ``): the diagonals ``d`` are
#: all-reduced, every process's ``U`` and ``s`` are all-gathered, and the low-rank parts
#: ``Σ_p U_p diag(s_p) U_pᵀ`` are recompressed to the factor's rank
#: (:func:`~curvlab.linalg.low_rank_sum`, as accumulation compresses each batch). The
#: diagonal is exact; the low-rank part is exact while the processes' ranks add up to at
#: most the factor's rank, otherwise its eigenpairs of largest magnitude are kept and the
#: others' diagonal moved into ``d`` (docs/distributed.md, "Structured output factors").
LOW_RANK_SUM = StructuredSum(DiagonalPlusLowRank, _low_rank_parts, _low_rank_combine)


@dataclass(frozen=True)
class RunningSum:
    """A running sum ``Σ_b w_b X_b`` that a backend accumulates (see
    :attr:`Curvature.running_state`).

    Attributes:
        name: its key in ``statistics()`` and in ``state_dict()["statistics"]["sums"]``.
        attr: the backend attribute holding it; a dotted path reaches into a part of the
            backend (``"_diag.sums"``). Its value is ``None`` (nothing accumulated), a
            tensor, or a list whose entries are tensors, ``None`` (a position without a
            sum, e.g. a cut chain boundary) or structured values that support ``/`` by a
            number (:class:`~curvlab.linalg.DiagonalPlusLowRank`).
        per: what ``statistics()`` divides it by: ``"weight"`` — the union's weight sum for
            a mean-reduced loss, 1 for a sum — or the ``name`` of a :class:`RunningCount` of
            the same declaration (a count, or one per list entry; a zero count divides as 1).
        symmetric: its matrices are symmetric (distribution sends one triangle).
        structured: how its structured entries (of ``structured.kind``) add over processes
            (:class:`StructuredSum`, e.g. :data:`LOW_RANK_SUM`); ``None``: its entries are
            tensors, summed entry by entry, and a structured entry is refused there.
        label: the name of a backend method that names list entry ``i`` (e.g.
            ``"_layer_label"``), for messages and the names of the distributed sums.
        legacy: where the sum sat in the ``state_dict`` layout before declarations (a
            dotted key path in ``state_dict()["statistics"]``), for :func:`migrate_state`.
    """

    name: str
    attr: str
    per: str = "weight"
    symmetric: bool = False
    label: str | None = None
    legacy: str | None = None
    structured: StructuredSum | None = None


@dataclass(frozen=True)
class RunningCount:
    """A counter that adds over batches (an ``int`` or a list of them, e.g. K-FAC's
    per-layer sample counts); a :class:`RunningSum` may be divided by it. ``name``,
    ``attr`` and ``legacy`` as for :class:`RunningSum`."""

    name: str
    attr: str
    legacy: str | None = None


@dataclass(frozen=True)
class StateTag:
    """Accumulated state that does not add over batches (EKFAC's eigenbasis, the forward
    order of a chain): saved in checkpoints with the sums, kept by ``reset()`` (a backend
    that refits it does so in its ``_reset``). With ``in_statistics`` it is also an entry of
    ``statistics()``, and ``load_statistics`` refuses statistics whose entry differs from
    the backend's (they were taken in another eigenbasis, say). ``copy``: loading a
    checkpoint copies its tensors (``False``: data held by reference, e.g. the batches of
    a matrix-free operator; a list is still a new list). ``name``, ``attr`` and ``legacy``
    as for :class:`RunningSum`."""

    name: str
    attr: str
    in_statistics: bool = False
    copy: bool = True
    legacy: str | None = None
    #: its value where a layout-1 checkpoint has no ``legacy`` entry
    default: Any = None


Declared = RunningSum | RunningCount | StateTag

#: Version of the layout of :meth:`Curvature.state_dict` (1: per-backend keys, before
#: declared state; :func:`migrate_state` translates it).
STATE_LAYOUT = 2


def _refuse_compiled(model: nn.Module, owner: str) -> None:
    """A ``torch.compile``d model (or submodule) gets a clear error: its compiled graph
    hides the layer inputs and outputs that the curvature's hooks record, so its
    statistics would be silently missing (concepts/models.md#compiled-models)."""
    for name, module in model.named_modules():
        if type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod"):
            where = f"submodule {name!r}" if name else "the model"
            raise TypeError(
                f"{owner}: {where} is a torch.compile()d module (OptimizedModule). curvlab "
                "records layer inputs and outputs with module hooks, which a compiled graph "
                "does not run. Give curvlab the eager module (the one you passed to "
                "torch.compile, also `compiled._orig_mod`) and run the forward passes that "
                "take curvature through it; the compiled module may serve the others."
            )


class Curvature(abc.ABC):
    """A curvature approximation of a model's loss (Fisher, GGN or a structured surrogate).

    Args:
        model: the network; every module that owns trainable parameters forms a layer. A
            ``DistributedDataParallel`` (or ``DataParallel``) wrapper is unwrapped: the
            curvature covers ``model.module`` (layer and parameter names are its names).
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` (mean or sum).
        engine: how statistics are extracted: ``"auto"`` (BackPACK where it applies and is
            faster, else plain autograd hooks), ``"hooks"`` or ``"backpack"``.

    Attributes:
        params: the covered parameters, in the order of every parameter-space vector.
        layers: the blocks (module + its parameters), in the same order.

    **Lifecycle** (concepts/models.md#lifecycle-hooks-recordings-copies): the hooks a
    curvature puts on the model and the loss (its :meth:`recording`, the call-order hooks
    of the block-tridiagonal backends) hold it through weak references, so dropping the
    last reference to the curvature removes them; :meth:`close` (or leaving
    ``with curvlab.KFAC(model, loss_fn) as c:``) removes them at once. A closed curvature
    refuses new batches (:meth:`recording`, :meth:`accumulate`, :meth:`update` raise a
    ``RuntimeError``); what it accumulated stays usable (``solve``, ``matvec``,
    ``statistics``, ``state_dict``, ...). ``copy.deepcopy(model)`` works at any time and
    the copy carries none of these hooks.
    """

    #: Name under which the backend is registered (``curvlab.make(name, ...)``).
    name: ClassVar[str] = ""

    #: What the backend accumulates, declared once: its running sums, the counters that
    #: normalise some of them and the tags fixed while accumulating (see the module
    #: docstring). A subclass extends its parent's tuple.
    running_state: ClassVar[tuple[Declared, ...]] = ()

    def __init__(self, model: nn.Module, loss_fn: nn.Module, engine: str = "auto") -> None:
        """Validate the model, loss and engine; no backend hook runs here. The backend
        then sets its own attributes and calls :meth:`_cover` with its layers and
        requests."""
        owner = type(self).__name__
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module  # the wrapper replicates and averages; the layers are inside
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}."
            )
        _refuse_compiled(model, owner)
        check_loss(loss_fn)
        extraction.check_engine(engine, owner)
        self.model = model
        self.loss_fn = loss_fn
        self.engine = engine
        self.layers: list[Layer] = []
        self._other: list[Layer] = []
        self.params: list[nn.Parameter] = []
        self.param_names: list[str] = []
        self._request_list: list[Request] = []
        self._recording: hooks.Recording | None = None
        self._closed = False  # see close()
        self.num_batches = 0
        self.num_samples = 0
        self._weight_sum = 0.0
        self._hold = False  # see hold_decompositions()
        # whether the declared sums may be updated in place: False after any load (the
        # tensors belong to the caller), set by a backend once it made its own copies
        self._sums_owned = False
        # sums tensors over processes (DistributionInterface.set_process_reducer)
        self._process_reducer: ProcessReducer | None = None
        #: Blocks decomposed by this object so far (in ``decompose`` or lazily in ``solve``).
        self.num_decompositions = 0

    def _cover(
        self,
        layers: Sequence[Layer],
        requests: Sequence[Request],
        other_layers: Sequence[Layer] = (),
    ) -> None:
        """Fix what the backend covers: ``layers`` (its blocks), ``other_layers`` (covered
        outside them, after them in ``params``, e.g. a Kronecker backend's diagonal blocks)
        and the ``requests`` it takes from every batch. Every backend calls it once, at
        the end of its construction; it validates the requests and an explicit engine."""
        owner = type(self).__name__
        if not layers and not other_layers:
            raise ValueError(f"{owner}: the model has no trainable parameters.")
        self.layers = list(layers)
        self._other = list(other_layers)
        everything = [*self.layers, *self._other]
        self.params = [p for layer in everything for p in layer.params]
        self.param_names = [n for layer in everything for n in layer.param_names]
        self._request_list = list(requests)
        for request in self._request_list:
            validate_request(request, owner)
        if self.engine != "auto":
            extraction.choose_engine(
                self.model, self._request_list, self.engine, loss_fn=self.loss_fn
            )  # why not, now

    # --- hooks for backends ----------------------------------------------------------

    @abc.abstractmethod
    def _accumulate(self, result: BatchResult, weight: float) -> None:
        """Add ``weight`` × this batch's curvature statistics to the running sums."""

    @abc.abstractmethod
    def _matvec(self, v: Vector) -> Vector: ...

    @abc.abstractmethod
    def _solve(self, v: Vector, damping: float) -> Vector: ...

    @abc.abstractmethod
    def _to_dense(self) -> Tensor: ...

    def _invalidate(self) -> None:
        """Drop caches (decompositions) after the statistics changed."""

    def _reset(self) -> None:
        """Forget the accumulated state: every declared sum becomes ``None`` and every
        counter zero (tags stay). A backend that refits a tag at a reset extends this."""
        for item in self.running_state:
            if isinstance(item, RunningSum):
                self._set_declared(item, None)
            elif isinstance(item, RunningCount):
                self._set_declared(item, _counts_like(self._get_declared(item), 0))

    def _check_loaded_sums(self) -> None:
        """Validate sums just loaded (``load_statistics``, ``load_state_dict``, distributed
        sums) against the model, and bring them into the backend's layout. Default:
        nothing to check."""

    # --- the declared state: every reader and writer -------------------------------------

    def _declared(self, kind: type) -> list[Any]:
        return [item for item in self.running_state if isinstance(item, kind)]

    def _resolve(self, path: str) -> Any:
        """The attribute at a dotted ``path`` from the backend (``"_diag.sums"``)."""
        found: Any = self
        for part in path.split("."):
            found = getattr(found, part)
        return found

    def _get_declared(self, item: Declared) -> Any:
        return self._resolve(item.attr)

    def _set_declared(self, item: Declared, value: Any) -> None:
        owner: Any = self
        *path, last = item.attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, last, value)

    def _divisor(self, total: RunningSum) -> Any:
        """What ``total`` is divided by in ``statistics()``: a number or one per entry."""
        if total.per == "weight":
            return self._normalizer
        counts = [c for c in self._declared(RunningCount) if c.name == total.per]
        if not counts:
            raise TypeError(
                f"{type(self).__name__}.running_state: the sum '{total.name}' is divided by "
                f"'{total.per}', which is not a declared RunningCount."
            )
        value = self._get_declared(counts[0])
        return [max(c, 1) for c in value] if isinstance(value, list) else max(value, 1)

    def _statistics(self) -> dict[str, Any]:
        """The declared sums divided by their normalisers (and the tags in statistics);
        a sum that holds nothing is left out."""
        stats: dict[str, Any] = {}
        for item in self.running_state:
            if isinstance(item, RunningSum):
                value = self._get_declared(item)
                if value is not None:
                    stats[item.name] = _divide(value, self._divisor(item))
            elif isinstance(item, StateTag) and item.in_statistics:
                stats[item.name] = self._get_declared(item)
        return stats

    def _load_statistics(self, stats: dict[str, Any]) -> None:
        """Make ``stats`` (from :meth:`_statistics`) the state, as one unit-weight batch:
        the sums are taken over (not copied), every counter becomes 1."""
        owner = f"{type(self).__name__}.load_statistics"
        if not isinstance(stats, dict):
            raise TypeError(f"{owner}: expected the dict of statistics(), got {type(stats)}.")
        names = {item.name for item in self.running_state}
        unknown = sorted(set(stats) - names)
        if unknown:
            raise ValueError(
                f"{owner}: unknown entries {unknown}; this backend's statistics are "
                f"{sorted(names)}."
            )
        for tag in self._declared(StateTag):
            if tag.in_statistics and stats.get(tag.name) != self._get_declared(tag):
                raise ValueError(
                    f"{owner}: the statistics were taken with another {tag.name} "
                    f"({stats.get(tag.name)!r}, current {self._get_declared(tag)!r})."
                )
        for total in self._declared(RunningSum):
            value = stats.get(total.name)
            self._set_declared(total, list(value) if isinstance(value, list) else value)
        for count in self._declared(RunningCount):
            self._set_declared(count, _counts_like(self._get_declared(count), 1))
        self._sums_owned = False
        self._check_loaded_sums()

    def _state(self) -> dict[str, Any]:
        """The declared state as a checkpoint holds it (tensors not copied)."""
        return {
            "sums": {s.name: self._get_declared(s) for s in self._declared(RunningSum)},
            "counts": {c.name: self._get_declared(c) for c in self._declared(RunningCount)},
            "tags": {t.name: self._get_declared(t) for t in self._declared(StateTag)},
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`_state` (copying every tensor)."""
        owner = f"{type(self).__name__}.load_state_dict"
        for group, kind in (("sums", RunningSum), ("counts", RunningCount), ("tags", StateTag)):
            saved = state.get(group)
            declared = self._declared(kind)
            if not isinstance(saved, dict) or set(saved) != {d.name for d in declared}:
                got = sorted(saved) if isinstance(saved, dict) else saved
                raise ValueError(
                    f"{owner}: the state's {group} {got} are not this backend's "
                    f"{sorted(d.name for d in declared)}."
                )
            for item in declared:
                value = saved[item.name]
                if isinstance(item, StateTag) and not item.copy:
                    value = list(value) if isinstance(value, list) else value
                elif isinstance(item, RunningCount) and value is None:  # see migrate_state
                    value = _counts_like(self._get_declared(item), 0)
                else:
                    value = _clone_tree(value)
                self._set_declared(item, value)
        self._sums_owned = False
        self._check_loaded_sums()

    def _sum_entries(self, total: RunningSum) -> list[tuple[int | None, str, Any]]:
        """``(index, name, value)`` of every entry of ``total`` that holds a sum."""
        value = self._get_declared(total)
        if value is None:
            return []
        if not isinstance(value, list):
            return [(None, total.name, value)]
        label = self._resolve(total.label) if total.label is not None else None
        return [
            (i, f"{label(i)} {total.name}" if label else f"{total.name}[{i}]", entry)
            for i, entry in enumerate(value)
            if entry is not None
        ]

    def _sums(self, only: Sequence[str] | None = None) -> list[NamedTensor]:
        """The declared sums (those named in ``only``, if given), entry by entry, as they
        add over processes (distribution): a tensor entry as itself, reduction ``"sum"``; a
        structured entry as the parts its declared :class:`StructuredSum` gives."""
        out = []
        for total in self._declared(RunningSum):
            if only is not None and total.name not in only:
                continue
            for _, name, entry in self._sum_entries(total):
                if isinstance(entry, Tensor):
                    square = entry.ndim == 2 and entry.shape[0] == entry.shape[1]
                    structure = "symmetric" if total.symmetric and square else "general"
                    out.append(NamedTensor(name, entry, structure))
                    continue
                way = self._structured_sum(total, name, entry)
                for suffix, part, reduction in way.parts(entry):
                    out.append(NamedTensor(f"{name} {suffix}", part, reduction=reduction))
        return out

    def _structured_sum(self, total: RunningSum, name: str, entry: Any) -> StructuredSum:
        """The declared way ``entry`` (not a tensor) of ``total`` adds over processes."""
        way = total.structured
        if way is None or not isinstance(entry, way.kind):
            declared = "none" if way is None else way.kind.__name__
            raise NotImplementedError(
                f"{type(self).__name__}: {name} is a structured value "
                f"({type(entry).__name__}) and the sum '{total.name}' declares no way to add "
                f"it over processes (RunningSum.structured: {declared})."
            )
        return way

    def _reduced_sums(self, sums: list[Tensor]) -> dict[str, Any]:
        """The declared sums made from ``sums`` (shaped like :meth:`_sums`, reduced over
        processes: structured entries combined from their parts), by name; nothing is
        set, so an error leaves the state as it was."""
        remaining = list(sums)
        values: dict[str, Any] = {}
        for total in self._declared(RunningSum):
            value = self._get_declared(total)
            entries = self._sum_entries(total)
            if not entries:
                values[total.name] = list(value) if isinstance(value, list) else value
                continue
            new = list(value) if isinstance(value, list) else [value]
            for i, name, entry in entries:
                if isinstance(entry, Tensor):
                    new[i or 0] = remaining.pop(0)
                    continue
                way = self._structured_sum(total, name, entry)
                count = len(way.parts(entry))
                taken, remaining = remaining[:count], remaining[count:]
                try:
                    new[i or 0] = way.combine(entry, taken)
                except ValueError as err:
                    raise ValueError(f"{type(self).__name__}: {name}: {err}") from err
            values[total.name] = new if isinstance(value, list) else new[0]
        return values

    def _load_sums(self, sums: list[Tensor]) -> None:
        """Make ``sums`` (shaped like :meth:`_sums`, e.g. reduced over processes) the
        declared sums; the counters are loaded by :meth:`_load_counts`."""
        self._set_sums(self._reduced_sums(sums))

    def _set_sums(self, values: dict[str, Any]) -> None:
        """Make ``values`` (from :meth:`_reduced_sums`) the declared sums."""
        for total in self._declared(RunningSum):
            self._set_declared(total, values[total.name])
        self._sums_owned = False
        self._check_loaded_sums()

    def _counts(self) -> list[float]:
        """The declared counters, flattened (distribution)."""
        out: list[float] = []
        for count in self._declared(RunningCount):
            value = self._get_declared(count)
            out.extend(float(c) for c in (value if isinstance(value, list) else [value]))
        return out

    def _load_counts(self, counts: list[float]) -> None:
        """Set the counters of :meth:`_counts` to (reduced) values."""
        remaining = list(counts)
        for count in self._declared(RunningCount):
            value = self._get_declared(count)
            if isinstance(value, list):
                taken, remaining = remaining[: len(value)], remaining[len(value) :]
                self._set_declared(count, [round(c) for c in taken])
            else:
                self._set_declared(count, round(remaining.pop(0)))

    def _decomposition_blocks(self) -> list[DecompositionBlock]:
        """Default: one block, every parameter, cost of a dense factorisation."""
        return [
            DecompositionBlock(
                index=0,
                name=f"{type(self).__name__} (all parameters)",
                param_indices=tuple(range(len(self.params))),
                cost=float(self.num_params) ** 3,
            )
        ]

    def _decompose(self, index: int, damping: float) -> None:
        """Compute and cache block ``index``'s decomposition for ``damping`` unless cached
        (adding 1 to ``num_decompositions`` when computed). Default: nothing to precompute
        (``solve`` does all the work), so nothing is shared between processes."""

    def _export_decomposition(self, index: int, damping: float) -> list[NamedTensor]:
        """The cached decomposition of block ``index`` for ``damping`` as tensors."""
        return []

    def _import_decomposition(self, index: int, damping: float, tensors: list[Tensor]) -> None:
        """Cache ``tensors`` (from another process's ``_export_decomposition``) as block
        ``index``'s decomposition for ``damping``."""

    def _solve_block(self, index: int, v: Vector, damping: float) -> Vector:
        """``solve`` restricted to block ``index`` (``v``: its parameters' entries)."""
        return self._solve(v, damping)

    def _block_kind(self, layer: Layer) -> str:
        """What kind of block ``layer``'s parameters sit in (see :meth:`coverage`)."""
        return self.name or type(self).__name__

    # --- public API ------------------------------------------------------------------

    def requests(self) -> list[Request]:
        """What this backend needs from each batch (plain data; see
        :mod:`curvlab.extraction.requests`)."""
        return list(self._request_list)

    def recorded_modules(self) -> list[nn.Module]:
        """The modules whose calls the hooks engine records for this backend."""
        found = {
            id(m): m
            for r in self.requests()
            if isinstance(r, (KroneckerStatistics, DiagonalStatistics, RecurrentStatistics))
            for m in r.modules
        }
        return list(found.values())

    def coverage(self) -> dict[str, str]:
        """``{parameter name: kind of block}`` for every covered parameter, in ``params``
        order (e.g. ``"kronecker"``, ``"diagonal"``, ``"block_diagonal"``)."""
        out: dict[str, str] = {}
        for layer in [*self.layers, *self._other]:
            kind = self._block_kind(layer)
            out.update({name: kind for name in layer.param_names})
        return out

    def update(
        self, inputs: Any, targets: Tensor | None = None, *, progress: bool = True
    ) -> Tensor:
        """Accumulate one batch (``update(inputs, targets)``) or a whole data set
        (``update(loader)``: any iterable of ``(inputs, targets)`` pairs, e.g. a
        ``DataLoader``; ``inputs`` may be a dict, passed to the model as one argument).
        Returns the (detached) loss of the last batch.

        ``p.grad`` of the model's parameters is left untouched. ``progress``: a tqdm bar
        over the batches of a data set.
        """
        self._check_open("update")
        with self._not_recording():
            return self._update(inputs, targets, progress)

    def _update(self, inputs: Any, targets: Tensor | None, progress: bool) -> Tensor:
        if targets is not None:
            return extraction.extract(self.model, self.loss_fn, inputs, targets, [self])
        if isinstance(inputs, Tensor):
            raise TypeError(
                f"{type(self).__name__}.update: pass targets with a tensor batch, "
                "update(inputs, targets), or an iterable of (inputs, targets) batches."
            )
        batches = inputs
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"{type(self).__name__}.update", leave=False)
        loss: Tensor | None = None
        for index, batch in enumerate(batches):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(
                    f"{type(self).__name__}.update: batch {index} of the data set is not an "
                    f"(inputs, targets) pair (got {type(batch).__name__})."
                )
            loss = extraction.extract(self.model, self.loss_fn, batch[0], batch[1], [self])
        if loss is None:
            raise ValueError(f"{type(self).__name__}.update: the data set has no batches.")
        return loss

    def recording(self) -> hooks.Recording:
        """Context manager recording the forward passes run inside it, for :meth:`accumulate`::

            with curvature.recording():
                loss = loss_fn(model(inputs), targets)
            curvature.accumulate(loss)   # the Fisher-type backward passes, .grad untouched
            loss.backward()

        Only forward passes with gradients enabled are recorded; :meth:`accumulate` uses
        the one that produced its loss and drops the passes recorded before it; at most
        ``hooks.Recording.max_forwards`` passes whose loss is not accumulated are kept
        (concepts/models.md#lifecycle-hooks-recordings-copies).
        """
        self._check_open("recording")
        if self._recording is None:
            self._recording = hooks.Recording(
                self.loss_fn, self.recorded_modules(), type(self).__name__, self.model
            )
        return self._recording

    def accumulate(self, loss: Tensor | None = None, *, check_finite: bool = True) -> None:
        """Accumulate the batch that produced ``loss`` (recorded by :meth:`recording`).

        Backpropagates the Fisher type's output-space columns from the model output that
        ``loss_fn`` received (plain autograd; ``p.grad`` is untouched and the graph is
        kept for the caller's own ``loss.backward()``). ``check_finite=False`` skips the
        loss check (a distributed preconditioner reports non-finite statistics on every
        process instead of raising on one).

        The recorded calls of that forward pass, and every pass recorded before it, are
        dropped (the recording holds no graph of a used batch).
        """
        owner = f"{type(self).__name__}.accumulate"
        self._check_open("accumulate")
        if loss is None:
            raise TypeError(
                f"{owner}: pass the loss, e.g. `with c.recording(): loss = loss_fn(model(x), "
                "y)` then `c.accumulate(loss)`."
            )
        if self._recording is None:
            raise RuntimeError(
                f"{owner}: nothing recorded; run the forward pass inside "
                "`with curvature.recording():` first."
            )
        if check_finite and not bool(torch.isfinite(loss.detach()).all()):
            self.check_batch(loss)  # e.g. an empty batch (a mean over no rows): its own error
            raise FloatingPointError(f"{owner}: the loss is not finite; no curvature taken.")
        recording = self._recording
        try:
            with recording.paused():  # an engine's replay of the batch is not a new pass
                extraction.accumulate_recorded([self], recording, loss)
        finally:
            recording.taken_inputs = recording.taken_call = None

    def check_batch(self, loss: Tensor) -> None:
        """Raise the validation error of the recorded batch that produced ``loss`` (e.g.
        ``the batch is empty``), if it has one; nothing otherwise, also when the batch is
        not found. For a clearer error than a non-finite loss (the mean over an empty
        batch is NaN)."""
        for call in self._recording.losses if self._recording is not None else []:
            if call.loss is loss:
                batch_scale(self.loss_fn, call.outputs, call.targets)

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Remove every hook this curvature put on the model and the loss, and drop its
        recorded calls (idempotent).

        Afterwards :meth:`recording`, :meth:`accumulate` and :meth:`update` raise a
        ``RuntimeError``; the accumulated curvature stays usable. Without ``close`` the
        hooks go when the curvature is garbage collected.
        """
        self._closed = True
        self._close()

    def _close(self) -> None:
        """Release what the backend put on the model. Default: close every
        :class:`~curvlab.extraction.hooks.HookOwner` among the attributes (the recording,
        a call-order tracker); backends holding other hooks extend this."""
        for value in list(vars(self).values()):
            if isinstance(value, hooks.HookOwner):
                value.close()
        self._recording = None

    def __enter__(self) -> Curvature:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise RuntimeError(
                f"{type(self).__name__}.{op}: the curvature is closed (close() removed its "
                "hooks from the model); build a new one to take more batches. What it "
                "accumulated (solve, matvec, statistics, state_dict, ...) is still usable."
            )

    def _not_recording(self) -> Any:
        """Context manager: the recording (if any) records nothing inside."""
        if self._recording is None:
            return contextlib.nullcontext()
        return self._recording.paused()

    def _consume(self, result: BatchResult) -> None:
        scale = result.scale
        weight = scale.inv_reduction if self._normalized else 1.0
        self._accumulate(result, weight)
        self._weight_sum += weight
        self.num_batches += 1
        self.num_samples += scale.num_samples
        self._statistics_changed()

    def _statistics_changed(self) -> None:
        if not self._hold:
            self._invalidate()

    def reset(self) -> None:
        """Forget every accumulated batch."""
        self._reset()
        self.num_batches = 0
        self.num_samples = 0
        self._weight_sum = 0.0
        self._statistics_changed()

    def statistics(self) -> dict[str, Any]:
        """The accumulated curvature as normalised statistics (new tensors).

        A dict whose tensor entries (or lists of tensors) are linear in the data, so a
        weighted average of two results is the statistics of the weighted mixture — the
        arithmetic an exponential moving average needs, for any backend. Other entries
        (e.g. the id of an eigenbasis) must be equal for two results to be mixed.
        """
        self._check_ready("statistics")
        return self._statistics()

    def load_statistics(self, stats: dict[str, Any]) -> None:
        """Make ``stats`` (from :meth:`statistics`, possibly averaged) the accumulated state.

        The backend takes the tensors over without copying; the caller must not modify
        them afterwards (the backend itself never updates them in place).
        """
        self._load_statistics(stats)
        self.num_batches = max(self.num_batches, 1)
        self._weight_sum = 1.0
        self._statistics_changed()

    def hold_decompositions(self, hold: bool = True) -> None:
        """With ``hold``, cached decompositions (eigen/Cholesky factors) survive changes of
        the statistics until :meth:`refresh` — how a preconditioner amortises inversions
        (``invert_every``). A new ``damping`` still refactorises where the factorisation
        depends on it (dense backends)."""
        self._hold = hold

    def refresh(self) -> None:
        """Drop cached decompositions; the next ``solve`` recomputes them."""
        self._invalidate()

    def matvec(self, v: Sequence[Tensor]) -> Vector:
        """``C v`` for a parameter-space vector ``v`` (list of tensors shaped like ``params``)."""
        return self._matvec(self._check_vector(v, "matvec"))

    def solve(self, v: Sequence[Tensor], damping: float) -> Vector:
        """``(C + damping·I)⁻¹ v``, or the backend's documented damped inverse."""
        damping = self._check_damping(damping, "solve")
        return self._solve(self._check_vector(v, "solve"), damping)

    # --- the operator interface ----------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)``, ``P`` the number of covered parameter entries."""
        return (self.num_params, self.num_params)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (that of every vector and matrix of the operator)."""
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device (where every product runs)."""
        return self.params[0].device

    def __matmul__(self, v: Tensor | Sequence[Tensor]) -> Tensor | Vector:
        """``C @ v`` for a flat ``[P]`` or ``[P, K]`` tensor (same shape back) or a list of
        tensors shaped like ``params`` (a list back)."""
        return _apply_flat(self, v, self.matvec, "@")

    def inverse(self, damping: float) -> DampedInverse:
        """The damped inverse of :meth:`solve` as an operator (``@``, ``to_scipy``)."""
        return DampedInverse(self, self._check_damping(damping, "inverse"))

    def to_scipy(self, dtype: Any = None) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` of ``C`` (float64 with
        ``dtype=numpy.float64``; products run in torch on the parameters' device)."""
        return _scipy_operator(self, lambda x: self @ x, dtype)

    def trace(self) -> Tensor:
        """``tr(C)`` (0-d tensor); closed forms for the block structures."""
        self._check_ready("trace")
        return self._trace()

    def diagonal(self) -> Tensor:
        """``diag(C)`` as a flat ``[P]`` tensor in ``params`` order."""
        self._check_ready("diagonal")
        return self._diagonal()

    def frobenius_norm(self) -> Tensor:
        """``‖C‖_F`` (0-d tensor)."""
        self._check_ready("frobenius_norm")
        return self._frobenius_norm()

    def logdet(self, damping: float) -> Tensor:
        """``log det(C + damping·I)`` (0-d tensor, float64 accumulation)."""
        self._check_ready("logdet")
        return self._logdet(self._check_damping(damping, "logdet"))

    def eigenvalues(self, k: int | None = None) -> Tensor:
        """The ``k`` largest eigenvalues of ``C``, descending (all with ``k=None``)."""
        self._check_ready("eigenvalues")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"{type(self).__name__}.eigenvalues: k must be a positive int.")
        values = self._eigenvalues(k)
        return values if k is None else values[:k]

    # defaults through the dense matrix (small models); backends override with closed forms
    # (docs page concepts/kronecker.md#kronecker-identities)

    def _trace(self) -> Tensor:
        return torch.trace(self._to_dense())

    def _diagonal(self) -> Tensor:
        return torch.diagonal(self._to_dense()).clone()

    def _frobenius_norm(self) -> Tensor:
        return torch.linalg.matrix_norm(self._to_dense())

    def _logdet(self, damping: float) -> Tensor:
        dense = self._to_dense().double()
        sym = (dense + dense.T) / 2 + damping * torch.eye(
            len(dense), dtype=dense.dtype, device=dense.device
        )
        return torch.linalg.slogdet(sym).logabsdet

    def _eigenvalues(self, k: int | None) -> Tensor:
        return top_symmetric_eigenvalues(self._to_dense(), k)

    def to_dense(self) -> Tensor:
        """The approximation as a dense ``[P, P]`` matrix in ``params`` order (row-major)."""
        self._check_ready("to_dense")
        return self._to_dense()

    def memory_estimate(self) -> MemoryEstimate:
        """Bytes per layer of the statistics and of the decompositions a solve keeps,
        computed from the parameters' shapes and dtypes alone: no batch needed, and the
        model may live on the ``meta`` device (``torch.device("meta")``), so that a model too
        large for this machine can be planned before it is built for real. Matches the
        tensors the backend holds after ``update`` and ``solve``.

        Raises:
            NotImplementedError: for a backend without an estimate (it names the ones with).
        """
        return self._memory_estimate()

    def _memory_estimate(self) -> MemoryEstimate:
        raise NotImplementedError(
            f"{type(self).__name__}.memory_estimate is not available; the Kronecker backends "
            "(KFAC, KFC, EKFAC) and DiagonalFisher have it."
        )

    def state_dict(self) -> dict[str, Any]:
        """Accumulated statistics and counters (tensors are not copied): the declared
        state (:attr:`running_state`) in layout :data:`STATE_LAYOUT`."""
        return {
            "backend": type(self).__name__,
            "layout": STATE_LAYOUT,
            "num_batches": self.num_batches,
            "num_samples": self.num_samples,
            "weight_sum": self._weight_sum,
            "statistics": self._state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict()`` returned (for the same backend and model), also
        from an earlier curvlab (:func:`migrate_state`)."""
        state = migrate_state(state, type(self).running_state)
        if state.get("backend") != type(self).__name__:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state belongs to "
                f"{state.get('backend')!r}."
            )
        self._load_state(state["statistics"])
        self.num_batches = int(state["num_batches"])
        self.num_samples = int(state["num_samples"])
        self._weight_sum = float(state["weight_sum"])
        self._statistics_changed()

    def _check_damping(self, damping: float, op: str) -> float:
        return check_damping(damping, f"{type(self).__name__}.{op}")

    # --- helpers shared by backends -------------------------------------------------

    @property
    def _normalized(self) -> bool:
        return bool(self.loss_fn.reduction == "mean")

    @property
    def _normalizer(self) -> float:
        """Divide the weighted sums by this to get the union's curvature."""
        return self._weight_sum if self._normalized else 1.0

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def _check_ready(self, op: str) -> None:
        if self.num_batches == 0:
            raise RuntimeError(
                f"{type(self).__name__}.{op}: no curvature accumulated yet; call update() "
                "or accumulate() first."
            )

    def _check_vector(self, v: Sequence[Tensor], op: str) -> Vector:
        owner = f"{type(self).__name__}.{op}"
        self._check_ready(op)
        if isinstance(v, Tensor) or not isinstance(v, (list, tuple)):
            raise TypeError(
                f"{owner}: expected a list of {len(self.params)} tensors shaped like the "
                f"parameters, got {type(v).__name__}."
            )
        if len(v) != len(self.params):
            raise ValueError(
                f"{owner}: expected {len(self.params)} tensors (one per parameter), got {len(v)}."
            )
        for t, p, name in zip(v, self.params, self.param_names):
            if not isinstance(t, Tensor) or t.shape != p.shape:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"{owner}: entry for '{name}' must have shape {tuple(p.shape)}, got {shape}."
                )
            if t.device != p.device:
                raise ValueError(
                    f"{owner}: entry for '{name}' is on {t.device}, parameters are on {p.device}."
                )
            if t.dtype != p.dtype:
                raise TypeError(
                    f"{owner}: entry for '{name}' is {t.dtype}, the parameter is {p.dtype}; "
                    "pass vectors in the parameters' dtype (a flat tensor given to `@` is "
                    "converted)."
                )
        return list(v)

    def _flatten(self, v: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in v])

    def _unflatten(self, x: Tensor) -> Vector:
        out, start = [], 0
        for p in self.params:
            out.append(x[start : start + p.numel()].reshape(p.shape))
            start += p.numel()
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={len(self.layers)}, params={self.num_params}, "
            f"batches={self.num_batches})"
        )


def _divide(value: Any, divisor: Any) -> Any:
    """A declared sum (a tensor or a list of entries) divided by a number or, entry by
    entry, by a list of numbers; ``None`` entries stay ``None``."""
    if not isinstance(value, list):
        return value / divisor
    divisors = divisor if isinstance(divisor, list) else [divisor] * len(value)
    return [None if v is None else v / d for v, d in zip(value, divisors, strict=True)]


def _counts_like(value: Any, fill: int) -> Any:
    """A counter shaped like ``value`` (an int or a list of ints) filled with ``fill``."""
    return [fill] * len(value) if isinstance(value, list) else fill


def _clone_tree(tree: Any) -> Any:
    """``tree`` with every tensor cloned (lists, tuples, named tuples and dicts rebuilt)."""
    if isinstance(tree, Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_clone_tree(v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone_tree(v) for v in tree)
    return tree


class DampedInverse:
    """``curvature.solve(·, damping)`` as an operator: ``@`` on ``[P]``/``[P, K]`` tensors
    and parameter lists, ``to_scipy()``."""

    def __init__(self, curvature: Curvature, damping: float) -> None:
        self.curvature = curvature
        self.damping = damping
        self.shape = curvature.shape

    def __matmul__(self, v: Tensor | Sequence[Tensor]) -> Tensor | Vector:
        return _apply_flat(
            self.curvature, v, lambda x: self.curvature.solve(x, self.damping), "inverse @"
        )

    def to_scipy(self, dtype: Any = None) -> Any:
        return _scipy_operator(self.curvature, lambda x: self @ x, dtype)


def _apply_flat(
    c: Curvature, v: Tensor | Sequence[Tensor], apply: Callable[[Vector], Vector], op: str
) -> Tensor | Vector:
    """Apply a parameter-list map to a flat ``[P]``/``[P, K]`` tensor or a parameter list."""
    if not isinstance(v, Tensor):
        return apply(list(v))
    owner = f"{type(c).__name__}.__matmul__ ({op})"
    if v.dim() not in (1, 2) or v.shape[0] != c.num_params:
        raise ValueError(
            f"{owner}: expected [{c.num_params}] or [{c.num_params}, K], got {tuple(v.shape)}."
        )
    columns = v.unsqueeze(1) if v.dim() == 1 else v
    out = []
    for j in range(columns.shape[1]):
        parts = c._unflatten(columns[:, j].to(device=c.device, dtype=c.dtype))
        out.append(c._flatten(apply(parts)))
    result = torch.stack(out, dim=1).to(v.dtype)
    return result.squeeze(1) if v.dim() == 1 else result


def _scipy_operator(c: Curvature, apply: Callable[[Tensor], Any], dtype: Any) -> Any:
    import numpy as np
    from scipy.sparse.linalg import LinearOperator

    target = np.dtype(dtype) if dtype is not None else np.dtype(str(c.dtype).split(".")[-1])

    def matvec(x: Any) -> Any:
        t = torch.as_tensor(np.asarray(x), dtype=c.dtype, device=c.device)
        return np.asarray(
            apply(t.reshape(t.shape[0], -1)).detach().cpu().double().numpy(), dtype=target
        ).reshape(np.shape(x))

    return LinearOperator(c.shape, matvec=matvec, rmatvec=matvec, matmat=matvec, dtype=target)


def top_symmetric_eigenvalues(matrix: Tensor, k: int | None) -> Tensor:
    """Eigenvalues of a symmetric matrix, descending: all (``k=None``) or the ``k`` largest.

    float64 throughout (float32 ``eigh`` can fail to converge); for a matrix much larger
    than ``k``, Lanczos (scipy's ``eigsh``, reproducible start) instead of a full ``eigh``.
    """
    dense = matrix.detach().double()
    dense = (dense + dense.T) / 2
    n = len(dense)
    if k is None or n <= max(4 * k, 256):
        values = torch.linalg.eigvalsh(dense).flip(0)
        return (values if k is None else values[:k]).to(matrix.dtype)
    import numpy as np
    from scipy.sparse.linalg import eigsh

    start = np.random.default_rng(0).standard_normal(n)
    top = eigsh(dense.cpu().numpy(), k=k, which="LA", v0=start, return_eigenvectors=False)
    return torch.as_tensor(np.sort(top)[::-1].copy(), dtype=matrix.dtype, device=matrix.device)


def migrate_state(
    state: dict[str, Any], declared: Sequence[Declared] | None = None
) -> dict[str, Any]:
    """A :meth:`Curvature.state_dict` written by an earlier curvlab, in today's layout (the
    one place old checkpoints are translated; today's states pass through unchanged).

    * Format-2 checkpoints of a block-tridiagonal K-FAC, built then as
      ``KFAC``/``KFC(structure="block_tridiagonal")``, name ``"KFAC"``/``"KFC"`` as their
      backend; their statistics carry the cross-layer ``"chain"``. They are
      ``BlockTridiagonalKFAC``'s.
    * Layout 1 (no ``"layout"`` entry: per-backend keys) is read through the ``legacy``
      key paths of the backend's declaration ``declared`` (its
      :attr:`Curvature.running_state`); a missing legacy entry held nothing (``None``).
      K-FAC's recurrent lag sums of layout 1 (``"recurrent_lag"``, a dict by layer of
      ``[a_lag, lag_count, g_lag, sequences]``, and the statistics loaded into it,
      ``"recurrent_lag_loaded"``: ``(A1, G1, T)``) become its per-layer lag sums; loaded
      lag statistics are exact where the checkpoint was taken after ``load_statistics``
      without further batches (as a ``NaturalGradient`` saves it).
    """
    statistics = state.get("statistics")
    chained = isinstance(statistics, dict) and "chain" in statistics
    if state.get("backend") in ("KFAC", "KFC") and chained:
        state = {**state, "backend": "BlockTridiagonalKFAC"}
    if state.get("layout", 1) == STATE_LAYOUT or declared is None:
        return state
    if not isinstance(statistics, dict):
        raise ValueError(
            f"load_state_dict: the state's statistics are a {type(statistics).__name__}, "
            "not a dict; is this the result of a curvature's state_dict()?"
        )
    old = _legacy_lag_sums(statistics)
    groups: dict[str, dict[str, Any]] = {"sums": {}, "counts": {}, "tags": {}}
    for item in declared:
        group = {RunningSum: "sums", RunningCount: "counts", StateTag: "tags"}[type(item)]
        # a missing counter stays None: loading makes it zero (its length is the backend's)
        value = _legacy_lookup(old, item.legacy) if item.legacy is not None else None
        if isinstance(item, StateTag) and value is None:
            value = item.default
        groups[group][item.name] = value
    return {**state, "layout": STATE_LAYOUT, "statistics": groups}


def _legacy_lookup(tree: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _legacy_lag_sums(statistics: dict[str, Any]) -> dict[str, Any]:
    """Layout-1 K-FAC lag sums as per-layer lists (see :func:`migrate_state`)."""
    lag, loaded = statistics.get("recurrent_lag") or {}, statistics.get("recurrent_lag_loaded")
    if not lag and not loaded:
        return statistics
    layers = len(statistics["a_sum"]) if statistics.get("a_sum") is not None else 0
    lag_a: list[Any] = [None] * layers
    lag_g: list[Any] = [None] * layers
    steps: list[Any] = [None] * layers
    sequences = [0] * layers
    for k, (a_lag, lag_count, g_lag, seq) in lag.items():
        k = int(k)
        lag_a[k], lag_g[k], sequences[k] = a_lag, g_lag, int(seq)
        steps[k] = a_lag.new_tensor(float(lag_count))
    for k, (a1, g1, t) in (loaded or {}).items():
        k = int(k)  # loaded statistics won: one unit-weight batch, one sequence
        lag_a[k], steps[k], sequences[k] = a1 * (t - 1.0), t - 1.0, 1
        lag_g[k] = g1 * (t - 1.0) / t
    return {
        **statistics,
        "lag_A": lag_a,
        "lag_G": lag_g,
        "lag_steps": steps,
        "lag_sequences": sequences,
    }
