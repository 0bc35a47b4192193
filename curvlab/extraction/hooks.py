"""The hooks engine: curvature statistics on plain torch autograd, for any ``nn.Module``.

A :class:`Recording` installs forward hooks on the Kronecker layers and on the loss
module while it is active. Each call of a layer is recorded with its input and its output
(a node of the autograd graph); each call of the loss with the model output it received.
Given the loss that will be backpropagated, :meth:`Recording.take` picks the loss call
that produced it and the layer calls of *that* forward (the ones in the loss's graph), so
a validation forward run in between, or another call of the loss function, cannot leak
into the statistics. The hooks hold the recording through weak references
(:class:`HookSet`): they go when it is closed or garbage, hold no graph past the pass that is
taken, and copies of the model carry none of them
(concepts/models.md#lifecycle-hooks-recordings-copies).

:func:`compute` then backpropagates the loss's output-space columns (see
:mod:`curvlab.extraction.losses`):

* to every recorded layer output — the ``g`` of the Kronecker statistics. The ``K``
  columns go through one batched vector-Jacobian product
  (:func:`~curvlab.extraction.graph_samples.batched_grad`); the
  backward stops at the earliest layer output, so no weight gradient is ever formed;
* to parameters, one column per loss row — the factor rows of dense blocks.

Layer inputs become patches with the rules of :mod:`curvlab.extraction.layers`. A layer
called several times in one forward (weight sharing) contributes every call, the calls
acting as extra positions (expand) or extra rows (reduce); see
concepts/models.md#kronecker-rules-and-coverage. Parameters shared by several modules (tied
weights) are served by factor rows: gradients w.r.t. the one shared tensor, summing every use.
"""

from __future__ import annotations

import copy
import functools
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, SupportsIndex

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.utils.hooks import RemovableHandle

from curvlab.extraction import graph_samples, layers, losses, recurrent
from curvlab.extraction.fisher_types import FisherType
from curvlab.extraction.losses import BatchScale, batch_scale, loss_rows
from curvlab.extraction.replay import (
    ModelReplay,
    only_through,
    per_sample_gradients,
    per_sample_squares,
    sample_count,
)
from curvlab.extraction.requests import (
    Batch,
    BatchResult,
    DiagonalStatistics,
    FactorRows,
    KroneckerBatch,
    KroneckerStatistics,
    ParameterDiagonal,
    RecurrentBatch,
    RecurrentStatistics,
    Request,
)

#: At most this many entries (columns × rows × parameters) per batched product.
_CHUNK_ELEMENTS = 1 << 26
#: What gradients are taken with respect to: tensors, or outputs of autograd nodes.
Input = Tensor | GradientEdge


@dataclass(eq=False)
class LayerCall:
    """One call of a recorded layer: its first input (detached) and its output."""

    module: nn.Module
    input: Tensor
    output: Tensor
    seq: int = 0  # when it was recorded (the recording's counter)

    def nodes(self) -> set[Any]:
        """The autograd nodes of its outputs."""
        return {self.output.grad_fn}


@dataclass(eq=False)
class RecurrentCall(LayerCall):
    """One call of a recurrent module (``nn.RNN``/``nn.LSTM``/``nn.GRU``): ``input`` and the
    initial state ``hx`` as passed, ``output`` its output sequence and ``states`` its
    ``h_n`` (and ``c_n``)."""

    hx: Any = None
    states: tuple[Tensor, ...] = ()

    def nodes(self) -> set[Any]:
        return {t.grad_fn for t in (self.output, *self.states)}

    @property
    def outputs(self) -> tuple[Tensor, ...]:
        return (self.output, *self.states)


@dataclass(eq=False)
class ModelCall:
    """One call of the whole model: its positional and keyword inputs and its output."""

    inputs: tuple[Any, ...]
    output: Any
    seq: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class LossCall:
    """One call of the loss module: the model output it received and the loss it gave.

    ``outputs``/``targets`` are the ``[R, C]`` rows the loss treats independently (a view
    of the model output: per-token and per-pixel positions become rows,
    :func:`~curvlab.extraction.losses.loss_rows`); ``raw_outputs`` is the tensor the loss
    received.
    """

    outputs: Tensor
    targets: Tensor
    loss: Tensor
    raw_outputs: Tensor
    seq: int = 0


# --- hooks owned by an object ------------------------------------------------------------

#: The hook dicts of a module (with their side dicts) that curvlab's hooks live in.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)
#: Key of the :class:`_CopyCleanup` in a ``copy.deepcopy`` memo (whose other keys are ints).
_COPY_CLEANUP = "curvlab.extraction.hooks._CopyCleanup"


class _OwnedHook:
    """A module hook calling ``owner.<method>(*bound, *hook_args)`` through a weak
    reference (see :class:`HookSet`). Copies of the module leave it out: ``copy.deepcopy``
    drops it from the copy (:class:`_CopyCleanup`), pickling stores a :class:`_DroppedHook`."""

    __slots__ = ("bound", "handle", "method", "owner")

    def __init__(self, owner: object, method: str, bound: tuple[Any, ...]) -> None:
        self.owner = weakref.ref(owner)
        self.method = method
        self.bound = bound
        self.handle: RemovableHandle | None = None

    def __call__(self, *args: Any) -> Any:
        owner = self.owner()
        if owner is None:  # the owner's finalizer normally removed the hook already
            if self.handle is not None:
                self.handle.remove()
            return None
        return getattr(owner, self.method)(*self.bound, *args)

    def __deepcopy__(self, memo: dict[Any, Any]) -> _DroppedHook:
        handle = self.handle
        main = None if handle is None else handle.hooks_dict_ref()
        if handle is not None and main is not None and id(main) in memo:
            # a copy of the module: its copy of the hook dict is being filled (deepcopy puts
            # it in the memo first); the stand-in returned here is taken out of it, and of
            # the side dicts, when the whole copy is done (_CopyCleanup)
            cleanup = _copy_cleanup(memo)
            cleanup.entries.append((memo[id(main)], handle.id))
            for ref in handle.extra_dict_ref:
                side = ref()
                if side is not None and handle.id in side:  # bools: copied here, found later
                    cleanup.entries.append((copy.deepcopy(side, memo), handle.id))
        return _DroppedHook()

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        return (_DroppedHook, ())


class _DroppedHook:
    """Stands in for a curvlab hook in a copy of a module: does nothing and, if still there
    when called (an unpickled module), removes itself from the module."""

    def __call__(self, module: nn.Module, *args: Any) -> None:
        for name in ("_forward_hooks", "_forward_pre_hooks"):
            hooks = getattr(module, name, None) or {}
            for key in [k for k, v in hooks.items() if v is self]:
                for side in _HOOK_DICTS:
                    getattr(module, side, {}).pop(key, None)


class _CopyCleanup:
    """Kept in a ``copy.deepcopy`` memo; when the copy is done (its memo is dropped), it
    removes the stand-ins of curvlab's hooks from the copied hook dicts and gives the
    copied hook owners their hooks on the copied modules (:meth:`HookSet.__deepcopy__`)."""

    def __init__(self) -> None:
        self.entries: list[tuple[dict[Any, Any], int]] = []
        self.later: list[Callable[[], None]] = []

    def __del__(self) -> None:
        for hooks, key in self.entries:
            hooks.pop(key, None)
        for action in self.later:
            try:
                action()
            except Exception:  # a copy that failed half-way: nothing to hook
                pass


def _copy_cleanup(memo: dict[Any, Any]) -> _CopyCleanup:
    cleanup = memo.get(_COPY_CLEANUP)
    if cleanup is None:
        cleanup = memo[_COPY_CLEANUP] = _CopyCleanup()
    return cleanup


@dataclass(eq=False)
class _HookSpec:
    """One hook of a :class:`HookSet`: where it is, what it calls, and its finalizer."""

    module: nn.Module
    method: str
    bound: tuple[Any, ...]
    pre: bool
    with_kwargs: bool
    finalizer: Any  # weakref.finalize(owner, handle.remove)


class HookSet:
    """Module hooks owned by ``owner``: each calls one of its methods through a weak
    reference, so the hooks never keep their owner alive.

    They are removed by :meth:`remove`, or when the owner is garbage collected (a
    ``weakref.finalize`` per hook). Copies of a module (``copy.deepcopy``, pickling) carry
    none of them; a deep copy of the *owner* (with the modules) gets the same hooks on the
    copied modules, calling the copied owner
    (concepts/models.md#lifecycle-hooks-recordings-copies).
    """

    def __init__(self, owner: object) -> None:
        self._owner: Callable[[], object | None] = weakref.ref(owner)
        self._hooks: list[_HookSpec] = []

    def __len__(self) -> int:
        return len(self._hooks)

    def forward(
        self, module: nn.Module, method: str, *bound: Any, with_kwargs: bool = False
    ) -> None:
        """A forward hook on ``module`` calling ``owner.<method>(*bound, module, args,
        [kwargs,] output)``."""
        self._add(module, method, bound, pre=False, with_kwargs=with_kwargs)

    def forward_pre(self, module: nn.Module, method: str, *bound: Any) -> None:
        """A forward pre-hook on ``module`` calling ``owner.<method>(*bound, module, args)``."""
        self._add(module, method, bound, pre=True, with_kwargs=False)

    def remove(self) -> None:
        """Remove every hook of the set (idempotent)."""
        hooks, self._hooks = self._hooks, []
        for spec in hooks:
            spec.finalizer()  # handle.remove(), once; the finalizer is then dead

    def _add(
        self, module: nn.Module, method: str, bound: tuple[Any, ...], pre: bool, with_kwargs: bool
    ) -> None:
        owner = self._owner()
        if owner is None:
            raise RuntimeError("HookSet: the owner of the hooks is gone.")
        hook = _OwnedHook(owner, method, bound)
        if pre:
            hook.handle = module.register_forward_pre_hook(hook)
        else:
            hook.handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
        finalizer = weakref.finalize(owner, hook.handle.remove)
        finalizer.atexit = False
        self._hooks.append(_HookSpec(module, method, bound, pre, with_kwargs, finalizer))

    def __deepcopy__(self, memo: dict[Any, Any]) -> HookSet:
        owner = self._owner()
        twin = None if owner is None else memo.get(id(owner))
        copied = HookSet.__new__(HookSet)
        copied._owner = self._owner if twin is None else weakref.ref(twin)
        copied._hooks = []
        if twin is not None:  # copied with its owner: the same hooks on the copied modules,
            # added when the whole copy is done (the modules may still be half-copied now)
            later = _copy_cleanup(memo).later
            for spec in self._hooks:
                module = copy.deepcopy(spec.module, memo)
                bound = copy.deepcopy(spec.bound, memo)
                later.append(
                    functools.partial(
                        copied._add, module, spec.method, bound, spec.pre, spec.with_kwargs
                    )
                )
        return copied

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        # pickled: an empty set of the same owner (the owner re-arms what it needs)
        return (_unpickled_hook_set, (self._owner(),))


def _unpickled_hook_set(owner: object) -> HookSet:
    hooks = HookSet.__new__(HookSet)
    hooks._owner = weakref.ref(owner) if owner is not None else lambda: None
    hooks._hooks = []
    return hooks


class HookOwner:
    """Base of the objects that put hooks on modules (a :class:`Recording`, the call-order
    hooks of the block-tridiagonal curvatures): the hooks are a :class:`HookSet` in
    ``self._hooks``; :meth:`close` removes them. A curvature closes every ``HookOwner``
    among its attributes when it is closed."""

    _hooks: HookSet

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        self._hooks.remove()


class Recording(HookOwner):
    """Forward hooks on ``modules``, ``loss_fn`` and ``model`` that record calls while active.

    Use as a context manager: the hooks are installed on enter and removed on exit, by
    :meth:`close` or when the recording is garbage collected (they hold it through weak
    references, :class:`HookSet`). The records stay after exit until dropped by these rules
    (concepts/models.md#lifecycle-hooks-recordings-copies):

    * only calls made with gradients enabled are recorded (a validation pass under
      ``torch.no_grad()`` records nothing), and nothing inside :meth:`paused`;
    * :meth:`take` consumes the loss call it returns with its layer calls, and drops every
      record older than that forward pass (take the losses of several pending passes in
      the order the passes ran);
    * at most :attr:`max_forwards` forward passes are kept: a pass begins with a call of
      ``model``, and when one more begins the oldest pass's records are dropped, so a
      grad-enabled forward that is never backpropagated does not pile up (without
      ``model`` there is no such bound);
    * a loss call whose graph uses a dropped or taken layer call is dropped too (it could
      not be taken complete);
    * :meth:`clear` and :meth:`close` drop everything.
    """

    #: At most this many forward passes (calls of ``model``) are kept, the latest ones.
    max_forwards = 4

    def __init__(
        self,
        loss_fn: nn.Module,
        modules: Sequence[nn.Module],
        owner: str,
        model: nn.Module | None = None,
    ) -> None:
        self.loss_fn = loss_fn
        self.modules = list(modules)
        self.owner = owner
        self.model = model
        self.calls: list[LayerCall] = []
        self.losses: list[LossCall] = []
        self.model_calls: list[ModelCall] = []
        #: inputs of the model call that produced the last loss :meth:`take` returned
        self.taken_inputs: tuple[Any, ...] | None = None
        #: the model call whose output the last loss :meth:`take` returned depends on
        self.taken_call: ModelCall | None = None
        self._hooks = HookSet(self)
        self._seq = 0  # the seq of the next record
        self._starts: list[int] = []  # seq at which each kept forward pass began
        self._paused = False
        self._window_dropped = False  # layer calls left the window of max_forwards passes

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def __getstate__(self) -> dict[str, Any]:
        # a copy (deepcopy, pickle) starts with no records: they hold this model's graph
        state = dict(vars(self))
        state.update(
            calls=[], losses=[], model_calls=[], taken_inputs=None, taken_call=None, _starts=[]
        )
        state["_window_dropped"] = False
        return state

    def __enter__(self) -> Recording:
        if not self._hooks:
            self._hooks.forward(self.loss_fn, "_record_loss", with_kwargs=True)
            for module in self.modules:
                self._hooks.forward(module, "_record_layer")
            if self.model is not None:
                self._hooks.forward_pre(self.model, "_begin_forward")
                self._hooks.forward(self.model, "_record_model", with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove()

    def close(self) -> None:
        """Remove the hooks and drop every record (idempotent; it may be entered again)."""
        self._hooks.remove()
        self.clear()

    def clear(self) -> None:
        self.calls = []
        self.losses = []
        self.model_calls = []
        self.taken_inputs = None
        self.taken_call = None
        self._starts = []
        self._window_dropped = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside (e.g. the forward pass another engine replays)."""
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq - 1

    def _recording_now(self) -> bool:
        return not self._paused and torch.is_grad_enabled()

    def _begin_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self._recording_now():
            return
        self._starts.append(self._next_seq())
        if len(self._starts) > self.max_forwards:
            before = self._starts[-self.max_forwards]
            self._window_dropped |= any(c.seq < before for c in self.calls)
            self._drop(before=before)

    def _drop(self, before: int, taken: Sequence[LayerCall] = ()) -> None:
        """Drop the records made before ``before`` and the later loss calls whose graph
        uses one of the dropped (or ``taken``) layer calls."""
        gone = {node for c in self.calls if c.seq < before for node in c.nodes()}
        gone.update(node for c in taken for node in c.nodes())
        gone.discard(None)
        self.calls = [c for c in self.calls if c.seq >= before]
        self.model_calls = [c for c in self.model_calls if c.seq >= before]
        self._starts = [s for s in self._starts if s >= before]
        losses = [c for c in self.losses if c.seq >= before]
        if gone and losses:
            losses = [c for c in losses if not gone & _graph_nodes(c.loss)]
        self.losses = losses

    def _record_model(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if self._recording_now() and isinstance(output, Tensor) and output.requires_grad:
            self.model_calls.append(ModelCall(args, output, self._next_seq(), dict(kwargs)))

    def model_inputs(self, outputs: Tensor) -> tuple[Any, ...] | None:
        """The inputs of the recorded model call whose output is ``outputs``, if any."""
        for call in self.model_calls:
            if call.output is outputs:
                return call.inputs
        return None

    def _record_layer(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(module, nn.RNNBase) and isinstance(output, tuple) and self._recording_now():
            seq, state = output
            states = state if isinstance(state, tuple) else (state,)
            if args and isinstance(seq, Tensor) and seq.requires_grad:
                hx = args[1] if len(args) > 1 else None
                self.calls.append(
                    RecurrentCall(module, args[0], seq, self._next_seq(), hx, tuple(states))
                )
            return
        if not self._recording_now() or not isinstance(output, Tensor):
            return
        if not output.requires_grad or not args or not isinstance(args[0], Tensor):
            return
        self.calls.append(LayerCall(module, args[0].detach(), output, self._next_seq()))

    def _record_loss(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], loss: Any
    ) -> None:
        if not self._recording_now() or not isinstance(loss, Tensor) or not loss.requires_grad:
            return
        values = list(args) + [kwargs[k] for k in ("input", "target") if k in kwargs]
        if (
            len(values) >= 2
            and all(isinstance(v, Tensor) for v in values[:2])
            and values[0].dim() > 0
        ):
            rows, targets = loss_rows(self.loss_fn, values[0], values[1].detach())
            self.losses.append(LossCall(rows, targets, loss, values[0], self._next_seq()))

    def take(self, loss: Tensor) -> tuple[LossCall, list[LayerCall]]:
        """The loss call that produced ``loss`` and the layer calls of its forward pass.

        Both are removed from the records, with every record older than that forward pass
        (see the class docstring). Raises a ``RuntimeError`` naming ``owner`` when ``loss``
        does not come from a recorded call of the loss module.
        """
        if not isinstance(loss, Tensor) or loss.grad_fn is None:
            raise RuntimeError(
                f"{self.owner}: the loss must be a tensor with a graph (the output of "
                "loss_fn(model(inputs), targets) with gradients enabled)."
            )
        match = [c for c in self.losses if c.loss is loss]
        if not match:
            nodes = _graph_nodes(loss)
            match = [c for c in self.losses if c.loss.grad_fn in nodes]
        if not match:
            raise RuntimeError(
                f"{self.owner}: the loss does not come from a call of its loss_fn recorded "
                "for this curvature. Run the forward pass and the loss inside "
                "`with curvature.recording():` (a NaturalGradient records for you between "
                "its steps), and pass the loss_fn's output (or an expression of it). A "
                f"recording keeps the last {self.max_forwards} forward passes, and drops "
                "those older than a pass whose loss was accumulated: accumulate losses in "
                "the order of their forward passes."
            )
        if len(match) > 1:
            raise RuntimeError(
                f"{self.owner}: the loss combines {len(match)} calls of loss_fn; the "
                "curvature is defined for one call (one batch) per backward."
            )
        call = match[0]
        nodes = _graph_nodes(call.loss)
        mine = [c for c in self.calls if c.nodes() & nodes]
        if self.modules and not mine and self._window_dropped:
            raise RuntimeError(
                f"{self.owner}: the layer calls of this loss's forward pass were dropped: a "
                f"recording keeps the last {self.max_forwards} forward passes (calls of the "
                "model), and more began between this forward pass and its loss. Compute the "
                "loss right after its forward pass."
            )
        taken = {id(c) for c in mine}
        self.calls = [c for c in self.calls if id(c) not in taken]
        self.losses = [c for c in self.losses if c is not call]
        self.taken_inputs = self.model_inputs(call.raw_outputs)
        self.taken_call = next(
            (c for c in reversed(self.model_calls) if c.output.grad_fn in nodes), None
        )
        self.model_calls = [c for c in self.model_calls if c.output is not call.raw_outputs]
        self._drop(before=min([c.seq for c in mine] + [call.seq]), taken=mine)
        return call, mine


def _graph_nodes(t: Tensor) -> set[Any]:
    """Every autograd node ``t`` depends on."""
    return _reachable([t.grad_fn])


def _reachable(starts: list[Any]) -> set[Any]:
    """The autograd nodes ``starts`` and everything they depend on."""
    seen: set[Any] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return seen


def _grad_inputs(inputs: Sequence[Input]) -> Any:
    """``inputs`` for ``torch.autograd.grad``, which takes tensors and node outputs mixed
    (its annotation asks for one kind)."""
    return list(inputs)


def _vjp(outputs: Tensor, inputs: Sequence[Input], columns: Tensor) -> list[Tensor | None]:
    """``[K, *input.shape]`` vector-Jacobian products of ``columns`` ``[K, *outputs.shape]``.

    ``None`` for inputs the outputs do not depend on. The graph is kept.
    """
    if not inputs:
        return []
    columns = columns.to(outputs.dtype)
    k = columns.shape[0]
    if k == 1:
        grads = torch.autograd.grad(
            outputs, _grad_inputs(inputs), columns[0], retain_graph=True, allow_unused=True
        )
        return [None if g is None else g.unsqueeze(0) for g in grads]
    per_column = outputs.numel() + sum(graph_samples.edge_numel(t) for t in inputs)
    step = max(1, _CHUNK_ELEMENTS // max(per_column, 1))
    chunks: list[tuple[Tensor | None, ...]] = []
    for start in range(0, k, step):
        chunks.append(
            graph_samples.batched_grad([outputs], list(inputs), [columns[start : start + step]])
        )
    out: list[Tensor | None] = []
    for i in range(len(inputs)):
        parts = [c[i] for c in chunks]
        out.append(None if parts[0] is None else torch.cat(parts))  # type: ignore[arg-type]
    return out


def compute(
    loss_fn: nn.Module,
    call: LossCall,
    layer_calls: Sequence[LayerCall],
    requests: Sequence[Request],
    scale: BatchScale | None = None,
    batch_size: int | None = None,
    replay: ModelReplay | None = None,
) -> BatchResult:
    """Answer ``requests`` for the batch of ``call`` (see the module docstring).

    ``scale``: the batch's :class:`BatchScale` if already computed; ``batch_size``: the
    number of samples of the model call (its first input's leading size), if known;
    ``replay``: the model call that produced the loss's input, for per-sample gradients
    of the parameters in :class:`ParameterDiagonal` requests.
    """
    if scale is None:
        scale = batch_scale(loss_fn, call.outputs, call.targets)
    result = BatchResult(scale=scale, engine="hooks")
    columns: dict[tuple[FisherType, int], Tensor] = {}

    def columns_for(key: tuple[FisherType, int]) -> Tensor:
        if key not in columns:
            columns[key] = key[0].columns(loss_fn, call.outputs, call.targets, scale, key[1])
        return columns[key]

    structure = _RowStructure(call, batch_size)
    squared = [r for r in requests if isinstance(r, ParameterDiagonal)]
    squared_params = {
        key: list({id(p): p for r in squared if r.columns_key == key for p in r.params}.values())
        for key in dict.fromkeys(r.columns_key for r in squared)
    }
    # per-sample gradients of the parameter diagonals from the graph (no replay), their
    # columns' gradients taken in the Kronecker layers' backward pass where they share it
    planned = {
        key: _graph_plan(call, params, scale.valid, batch_size)
        for key, params in squared_params.items()
    }
    edge_grads: dict[tuple[FisherType, int], list[Tensor | None]] = {}
    local = [r for r in requests if isinstance(r, (KroneckerStatistics, DiagonalStatistics))]
    for key in dict.fromkeys(r.columns_key for r in local):
        group = [r for r in local if r.columns_key == key]
        # (request, module, its calls, per row?) once per result key and module
        jobs: dict[Any, _Job] = {}
        for request in group:
            for module in request.modules:
                mine = [c for c in layer_calls if c.module is module]
                if mine and (request.key, id(module)) not in jobs:
                    needed = structure.needed(request, mine)
                    jobs[(request.key, id(module))] = (request, module, mine, needed)
        # the columns of all rows together: every Kronecker layer (G), and the layers
        # whose diagonal comes from per-sample gradients
        together = {
            id(c): c
            for request, _, mine, needed in jobs.values()
            if isinstance(request, KroneckerStatistics) or not needed
            for c in mine
        }
        calls = list(together.values())
        shared = planned.get(key)
        extra: list[Input] = []
        if shared is not None and (key[0].uncorrelated_rows or shared[1] == 1):
            extra = list(shared[0].edges)
        inputs: list[Input] = [c.output for c in calls]
        grads = _vjp(call.outputs, inputs + extra, columns_for(key))
        if extra:
            edge_grads[key] = grads[len(calls) :]
        found = {id(c): g for c, g in zip(calls, grads) if g is not None}
        # each row's columns on their own, where the per-sample quantities are not per-row
        row_jobs = {job_key: job for job_key, job in jobs.items() if job[3]}
        coupled = any(structure.coupled(job[2]) for job in row_jobs.values())
        row_results = _per_row_statistics(call, row_jobs, columns_for(key), scale.valid, coupled)
        for job_key, (request, module, mine, needed) in jobs.items():
            used = [(c, found[id(c)]) for c in mine if id(c) in found]
            if isinstance(request, DiagonalStatistics):
                diag_store = result.diagonals.setdefault(request.key, {})
                if needed:
                    diag_store.update(row_results[job_key])
                else:
                    diag_store.update(_per_sample_diagonal(module, used))
            elif used:
                store = result.kronecker.setdefault(request.key, {})
                row_grads = row_results[job_key] if needed else None
                logits = (call.outputs, scale) if isinstance(loss_fn, nn.CrossEntropyLoss) else None
                store[id(module)] = _kronecker_batch(
                    module, used, request, scale.valid, row_grads=row_grads, logits=logits
                )
    for rnn_request in [r for r in requests if isinstance(r, RecurrentStatistics)]:
        rnn_store = result.recurrent.setdefault(rnn_request.key, {})
        for module in rnn_request.modules:
            if id(module) not in rnn_store:
                rnn_calls = [c for c in layer_calls if c.module is module]
                found_rnn = _recurrent_batches(
                    call, rnn_calls, rnn_request, columns_for(rnn_request.columns_key)
                )
                if found_rnn is not None:
                    rnn_store[id(module)] = found_rnn
    dense = [r for r in requests if isinstance(r, FactorRows)]
    for key in dict.fromkeys(r.key for r in dense):
        params = list({id(p): p for r in dense if r.key == key for p in r.params}.values())
        result.rows.setdefault(key, {}).update(
            _factor_rows(call, params, columns_for(key), scale.valid, replay)
        )
    for key, params in squared_params.items():
        found = _parameter_squares(
            call,
            params,
            columns_for(key),
            scale.valid,
            key[0],
            replay,
            planned[key],
            edge_grads.get(key),
        )
        for r in squared:
            if r.columns_key == key:
                result.diagonals.setdefault(r.key, {}).update(
                    {id(p): found[id(p)] for p in r.params}
                )
    return result


def _recurrent_batches(
    call: LossCall, calls: Sequence[LayerCall], request: RecurrentStatistics, columns: Tensor
) -> dict[str, RecurrentBatch] | None:
    """The sums of a recurrent module's maps over its calls in the forward pass (summed),
    or ``None`` if it was not called (:mod:`curvlab.extraction.recurrent`)."""
    total: dict[str, RecurrentBatch] | None = None
    for c in calls:
        assert isinstance(c, RecurrentCall)
        grads = _vjp(call.outputs, list(c.outputs), columns)
        module: nn.RNNBase = c.module  # type: ignore[assignment]
        sums = recurrent.statistics(
            module,
            c.input,
            c.hx,
            c.outputs,
            grads,
            request.lagged,
            request.sample_fraction,
            name=request.name_of(module),
        )
        total = sums if total is None else {k: _add_recurrent(total[k], v) for k, v in sums.items()}
    return total


def _add_recurrent(a: RecurrentBatch, b: RecurrentBatch) -> RecurrentBatch:
    kron = KroneckerBatch(
        a_sum=a.kron.a_sum + b.kron.a_sum, count=a.kron.count + b.kron.count, g=a.kron.g + b.kron.g
    )
    return RecurrentBatch(
        kron,
        a.a_lag + b.a_lag,
        a.g_lag + b.g_lag,
        a.lag_count + b.lag_count,
        a.sequences + b.sequences,
    )


def _parameter_squares(
    call: LossCall,
    params: Sequence[Tensor],
    columns: Tensor,
    valid: Tensor | None,
    fisher_type: FisherType,
    replay: ModelReplay | None,
    planned: tuple[graph_samples.SamplePlan, int] | None = None,
    edge_grads: list[Tensor | None] | None = None,
) -> dict[int, Tensor]:
    """``{id(p): Σ_{k,r} (∂ℓ/∂p)²_{k,r}}`` (shaped like ``p``): from per-sample gradients
    read off the recorded graph where ``planned`` (:func:`_graph_plan`) serves every use
    of the parameters (``edge_grads``: the columns' gradients at its outputs, if already
    taken), else of a replay of the model call where
    that is the same function (both linear in the batch), else from each counted row's
    columns backpropagated on their own."""
    found = None
    if planned is not None:
        found = _graph_squares(call, planned, columns, valid, fisher_type, edge_grads)
    if found is None:
        found = _replayed_squares(call, params, columns, valid, fisher_type, replay)
    if found is None:
        found = {}
        for _, grads in _row_chunks(call.outputs, params, columns, valid):
            for p, g in zip(params, grads):
                if g is not None:
                    square = layers.statistics_dtype(g).square().sum(0)
                    found[id(p)] = square + found[id(p)] if id(p) in found else square
    return {
        id(p): found.get(id(p), layers.statistics_dtype(torch.zeros_like(p))).reshape(p.shape)
        for p in params
    }


#: The probes' verdicts per graph structure (:func:`_graph_plan`), the latest ones.
_PROBED: OrderedDict[tuple[Any, ...], tuple[frozenset[int], int] | None] = OrderedDict()
_PROBED_KEEP = 32


def _graph_plan(
    call: LossCall, params: Sequence[Tensor], valid: Tensor | None, batch_size: int | None
) -> tuple[graph_samples.SamplePlan, int] | None:
    """``(plan, m)``: where the per-sample gradients of ``params`` come from in the recorded
    graph (:func:`~curvlab.extraction.graph_samples.plan`), with ``m`` loss rows per
    sample, or ``None`` where the graph does not serve every use of ``params`` or the loss
    rows leave their samples at the plan's outputs.

    The samples are the model call's (``batch_size``). Whether the rows stay in their
    samples is probed (:func:`_rows_stay_each`: ``2·⌈log₂ N⌉`` columns backpropagated to
    the plan's outputs, several backward passes' worth); the verdict is kept per graph
    structure (node kinds, shapes and connections, the batch's counted rows), so the
    graphs of later batches of the same model take it without probing again. A frontier
    output whose rows mix samples (e.g. a position parameter ``[T, D]`` with ``T = N``) is
    looked past, up to twice.
    """
    if batch_size is None:
        return None
    plan = graph_samples.plan(call.outputs, params, batch_size)
    if plan is None:
        return None
    if not plan.edges:
        return plan, 1
    index = {node: i for i, node in enumerate(plan.order)}
    key = (
        plan.signature(),
        batch_size,
        None if valid is None else tuple(valid.nonzero().flatten().tolist()),
        tuple((index.get(e.node, -1), e.output_nr) for e in plan.edges),
    )
    if key in _PROBED:
        _PROBED.move_to_end(key)
        known = _PROBED[key]
        if known is None:
            return None
        lifted_at, group = known
        if lifted_at:
            plan = graph_samples.plan(
                call.outputs, params, batch_size, {plan.order[i] for i in lifted_at}
            )
        return None if plan is None else (plan, group)
    found = _probe_plan(call, params, valid, batch_size, plan)
    _PROBED[key] = None if found is None else (frozenset(index[n] for n in found[2]), found[1])
    while len(_PROBED) > _PROBED_KEEP:
        _PROBED.popitem(last=False)
    return None if found is None else (found[0], found[1])


def _probe_plan(
    call: LossCall,
    params: Sequence[Tensor],
    valid: Tensor | None,
    batch_size: int,
    plan: graph_samples.SamplePlan | None,
) -> tuple[graph_samples.SamplePlan, int, set[Any]] | None:
    """``(plan, m, nodes looked past)`` once the probe finds every loss row in its sample
    at the plan's outputs, or ``None`` (see :func:`_graph_plan`)."""
    lifted: set[Any] = set()  # frontier nodes whose rows mix samples
    for _ in range(3):
        if plan is None:
            return None
        probed = _rows_stay_each(call.outputs, plan.edges, batch_size, valid)
        if probed is None:
            return None
        group, stays = probed
        mixed = [e.node for e, ok in zip(plan.edges, stays) if not ok]
        if not mixed:
            return plan, group, lifted
        if not plan.frontier_nodes.issuperset(mixed):  # a product's, an embedding's rows
            return None
        lifted.update(mixed)
        plan = graph_samples.plan(call.outputs, params, batch_size, lifted)
    return None


def _graph_squares(
    call: LossCall,
    planned: tuple[graph_samples.SamplePlan, int],
    columns: Tensor,
    valid: Tensor | None,
    fisher_type: FisherType,
    edge_grads: list[Tensor | None] | None = None,
) -> dict[int, Tensor]:
    """The squares of :func:`_parameter_squares` from the per-sample gradients of a
    :func:`_graph_plan`. Each sample's ``m`` loss rows share the columns as in
    :func:`_replayed_squares`: one column per draw where the rows are uncorrelated (or
    ``m = 1``; ``edge_grads``: their gradients at the plan's outputs, if already taken),
    else one per (draw, row of the sample)."""
    plan, group = planned
    if not plan.edges:
        return {}
    if fisher_type.uncorrelated_rows or group == 1:
        if edge_grads is None:
            edge_grads = _vjp(call.outputs, plan.edges, columns)
        chunks: Iterator[list[Tensor | None]] = iter([edge_grads])
    else:
        chunks = (g for _, g in _row_chunks(call.outputs, plan.edges, columns, valid, group))
    sums = plan.accumulator()
    for grads in chunks:
        sums.add([None if g is None else layers.statistics_dtype(g.detach()) for g in grads])
    return sums.result()


def _replayed_squares(
    call: LossCall,
    params: Sequence[Tensor],
    columns: Tensor,
    valid: Tensor | None,
    fisher_type: FisherType,
    replay: ModelReplay | None,
) -> dict[int, Tensor] | None:
    """The squares of :func:`_parameter_squares` from per-sample gradients, or ``None``
    where the replay cannot give them (:func:`_replay_rows_per_sample`)."""
    found = _replay_rows_per_sample(call, params, valid, replay)
    if found is None:
        return None
    output, group = found
    if fisher_type.uncorrelated_rows or group == 1:
        # one column per draw, a sample's rows together (its one row; for sampled labels,
        # unbiased: the draws of different rows are independent with zero mean)
        chunks: Iterator[list[Tensor | None]] = iter([_vjp(call.outputs, [output], columns)])
    else:
        # one column per (draw, row of the sample): each sample's slice is one row's alone
        chunks = (g for _, g in _row_chunks(call.outputs, [output], columns, valid, group))
    total: dict[int, Tensor] = {}
    assert replay is not None
    for (cotangents,) in chunks:
        if cotangents is None:
            return None
        with suspended_hooks(replay.model):  # no recording of the replay, no user hook
            squares = per_sample_squares(replay, params, cotangents.detach())
        if squares is None:
            return None
        for key, square in squares.items():
            square = layers.statistics_dtype(square)
            total[key] = square + total[key] if key in total else square
    return total


def _replay_rows_per_sample(
    call: LossCall,
    params: Sequence[Tensor],
    valid: Tensor | None,
    replay: ModelReplay | None,
) -> tuple[Tensor, int] | None:
    """``(model output, m)`` where per-sample gradients of a replay of the model call can
    stand for per-row ones: every counted loss row ``n·m + j`` depends on sample ``n`` of
    the model output only, and ``params`` reach the loss through that output only. ``None``
    where they cannot: no model call, loss rows that depend on several samples, parameters
    used outside the model (or a model output the loss does not depend on)."""
    if replay is None or not isinstance(replay.output, Tensor) or replay.output.dim() == 0:
        return None
    output = replay.output
    # (a model output outside the loss's graph fails here too: the walk reaches the params)
    if output.grad_fn is None or not only_through(output, call.outputs, params):
        return None
    n = sample_count(replay)
    if n is None or output.shape[0] % n:
        return None
    # the model output as a layer whose samples are the model's
    probe = LayerCall(replay.model, output.new_empty(n), output)
    group = _rows_stay_in_their_samples(call.outputs, [probe], valid)
    return None if group is None else (output, group)


def _factor_rows(
    call: LossCall,
    params: Sequence[Tensor],
    columns: Tensor,
    valid: Tensor | None,
    replay: ModelReplay | None,
) -> dict[int, Tensor]:
    """``{id(p): [K·R', p.numel()]}``: the gradient of every column ``k`` restricted to
    every counted loss row ``r`` on its own (the dense Fisher is ``Σ VᵀV`` over them).

    Where the rows stay in their samples and the model call replays
    (:func:`_replay_rows_per_sample`), they are per-sample gradients of the ``K·m``
    columns ``(k, j)`` of a sample's rows (:func:`~curvlab.extraction.replay.per_sample_gradients`):
    one backward pass per column of a sample, linear in the batch; the rows of ignored
    targets are then zero rows. Elsewhere every row's columns are backpropagated through
    the whole batch (in chunks), whose cost grows with the square of the rows.
    """
    found = _replayed_rows(call, params, columns, valid, replay)
    if found is None:
        found = {}
        for _, grads in _row_chunks(call.outputs, params, columns, valid):
            for p, g in zip(params, grads):
                if g is not None:
                    found.setdefault(id(p), []).append(layers.statistics_dtype(g))
    rows = {key: torch.cat([t.flatten(1) for t in parts]) for key, parts in found.items()}
    if rows:
        size = len(next(iter(rows.values())))
    else:
        size = columns.shape[0] * (columns.shape[1] if valid is None else int(valid.sum()))
    for p in params:
        if id(p) not in rows:  # the loss does not depend on p: its rows are zero
            zeros = torch.zeros(size, p.numel(), dtype=p.dtype, device=p.device)
            rows[id(p)] = layers.statistics_dtype(zeros)
    return rows


def _replayed_rows(
    call: LossCall,
    params: Sequence[Tensor],
    columns: Tensor,
    valid: Tensor | None,
    replay: ModelReplay | None,
) -> dict[int, list[Tensor]] | None:
    """The factor rows of :func:`_factor_rows` from per-sample gradients of a replayed
    model call, in chunks ``[c·N, *p.shape]`` per parameter, or ``None`` where the replay
    cannot give them."""
    found = _replay_rows_per_sample(call, params, valid, replay)
    if found is None:
        return None
    output, group = found
    assert replay is not None
    rows: dict[int, list[Tensor]] = {}
    # one column per (draw, row of the sample): each sample's slice is one row's alone
    for _, (cotangents,) in _row_chunks(call.outputs, [output], columns, valid, group):
        if cotangents is None:
            return None
        with suspended_hooks(replay.model):  # no recording of the replay, no user hook
            grads = per_sample_gradients(replay, params, cotangents.detach())
        if grads is None:
            return None
        for p in params:
            g = grads[id(p)]
            rows.setdefault(id(p), []).append(layers.statistics_dtype(g.flatten(0, 1)))
    return rows


#: one layer's share of a request: (request, layer, its calls, per-row columns needed?)
_Job = tuple[KroneckerStatistics | DiagonalStatistics, nn.Module, list[LayerCall], bool]


class _RowStructure:
    """Whether a layer's per-sample quantities are its per-row ones (see
    concepts/models.md#rows-samples-and-exactness).

    They are when every call of the layer has one sample per loss row (its leading size is
    the number of rows ``R``, and so is the model's batch when known) and no operation
    after the layer couples the samples (batch normalisation with batch statistics). For
    ``"mc"`` the draws of different rows are independent with zero mean, so without
    coupling the per-sample squares are unbiased estimates of the per-row ones.
    """

    def __init__(self, call: LossCall, batch_size: int | None) -> None:
        self.call = call
        self.num_rows = call.outputs.shape[0]
        self.batch_size = batch_size
        self._coupled: set[Any] | None = None

    def coupled(self, calls: Sequence[LayerCall]) -> bool:
        if self._coupled is None:
            self._coupled = _coupled_nodes(self.call.loss)
        return any(c.output.grad_fn in self._coupled for c in calls)

    def one_per_sample(self, calls: Sequence[LayerCall]) -> bool:
        if self.batch_size is not None and self.batch_size != self.num_rows:
            return False
        return all(c.input.dim() > 0 and c.input.shape[0] == self.num_rows for c in calls)

    def needed(
        self, request: KroneckerStatistics | DiagonalStatistics, calls: Sequence[LayerCall]
    ) -> bool:
        """Whether ``request`` needs each row's columns backpropagated on their own for the
        layer of ``calls``. Where samples are coupled, only if the request asks for
        exactness there (``per_row``, ``DiagonalStatistics.coupled``)."""
        if isinstance(request, KroneckerStatistics):
            if not request.per_row:
                return False
            exact_coupled = True
        else:
            exact_coupled = request.coupled
            if len({c.input.shape[0] if c.input.dim() else 0 for c in calls}) > 1:
                return True  # per-sample gradients of the calls cannot be added
        if request.fisher_type.uncorrelated_rows or self.one_per_sample(calls):
            # per-sample quantities are per-row (unbiased for sampled labels) unless samples
            # are coupled
            return exact_coupled and self.coupled(calls)
        return exact_coupled or not self.coupled(calls)


def _coupled_nodes(loss: Tensor) -> set[Any]:
    """The autograd nodes of ``loss``'s graph whose gradient mixes the samples: every node
    feeding an operation that couples them (batch normalisation with batch statistics)."""
    couplers = [node for node in _graph_nodes(loss) if _couples_samples(node)]
    return _reachable([nxt for node in couplers for nxt, _ in node.next_functions])


def _couples_samples(node: Any) -> bool:
    """Batch normalisation with batch statistics: a ``*BatchNorm*`` node whose saved
    ``training`` flag is set, or unknown (the safe side, which costs time, never
    exactness)."""
    if "BatchNorm" not in type(node).__name__:
        return False
    return bool(getattr(node, "_saved_training", True))


def _row_chunks(
    outputs: Tensor,
    inputs: Sequence[Input],
    columns: Tensor,
    valid: Tensor | None,
    group: int | None = None,
) -> Iterator[tuple[int, list[Tensor | None]]]:
    """Each counted loss row's columns backpropagated on their own, to ``inputs``.

    Yields ``(c, grads)``: chunks ``[c, *input.shape]`` of the vector-Jacobian products of
    the ``K·R'`` columns ``(k, r)`` (column ``k`` restricted to row ``r``), ``k``-major,
    ``None`` for inputs the outputs do not depend on. The graph is kept.

    ``group``: the rows ``n·group + j`` of the layer samples ``n`` stay in their sample
    (:func:`_rows_stay_in_their_samples`), so the rows with the same ``j`` go together:
    ``K·group`` columns ``(k, j)``, whose gradients at sample ``n`` are row
    ``n·group + j``'s alone.
    """
    k, r, c = columns.shape
    columns = columns.to(outputs.dtype)
    counted = torch.arange(r, device=columns.device) if valid is None else valid.nonzero()[:, 0]
    m = counted.numel() if group is None else group
    per_column = outputs.numel() + sum(graph_samples.edge_numel(t) for t in inputs)
    step = max(1, _CHUNK_ELEMENTS // max(per_column, 1))
    if group is not None:
        position = torch.arange(r, device=columns.device) % group
        if valid is not None:
            position = position.masked_fill(~valid, -1)
    for start in range(0, k * m, step):
        index = torch.arange(start, min(start + step, k * m), device=columns.device)
        which = index // m
        if group is None:
            row = counted[index % m]
            chunk = columns.new_zeros(index.numel(), r, c)
            chunk[torch.arange(index.numel(), device=columns.device), row] = columns[which, row]
        else:
            mask = position.unsqueeze(0) == (index % m).unsqueeze(1)  # [c, R]
            chunk = columns[which] * mask.unsqueeze(-1).to(columns.dtype)
        yield (
            index.numel(),
            list(graph_samples.batched_grad([outputs], list(inputs), [chunk])),
        )


def _rows_stay_in_their_samples(
    outputs: Tensor, calls: Sequence[LayerCall], valid: Tensor | None
) -> int | None:
    """``m`` when every counted loss row ``r`` reaches the layer calls at sample
    ``r // m`` only (``R = m·N`` rows, ``N`` the calls' one leading size: rows flattened
    sample-major, nothing mixing samples), else ``None``.

    Checked exactly, in one batched product of ``2·⌈log₂ N⌉`` probe columns: probe
    ``(b, v)`` carries random values on the rows whose sample has bit ``b`` equal to
    ``v``; its gradient must vanish at every sample whose bit ``b`` differs. Rows of
    different samples differ in some bit, so any row reaching another sample shows up
    (random values cancel with probability zero); the gradients of unrelated samples are
    exact zeros.
    """
    sizes = {c.input.shape[0] if c.input.dim() else 0 for c in calls}
    if len(sizes) != 1:
        return None
    return _rows_stay(outputs, [call.output for call in calls], sizes.pop(), valid)


def _rows_stay(
    outputs: Tensor, targets: Sequence[Input], n: int, valid: Tensor | None
) -> int | None:
    """:func:`_rows_stay_in_their_samples` for any ``targets`` (tensors or node outputs)
    whose ``N = n`` samples lie sample-major along their entries."""
    found = _rows_stay_each(outputs, targets, n, valid)
    return None if found is None or not all(found[1]) else found[0]


def _rows_stay_each(
    outputs: Tensor, targets: Sequence[Input], n: int, valid: Tensor | None
) -> tuple[int, list[bool]] | None:
    """``(m, [whether the rows stay in their samples at target i])`` (see
    :func:`_rows_stay_in_their_samples`), or ``None`` where ``R`` or a target's size is
    not a multiple of ``n``."""
    r, c = outputs.shape
    if n < 1 or r % n or any(graph_samples.edge_numel(t) % n for t in targets):
        return None
    m, bits = r // n, (n - 1).bit_length()
    if not bits:
        return m, [True] * len(targets)
    device = outputs.device
    sample = torch.arange(r, device=device) // m
    generator = torch.Generator(device=device).manual_seed(0)
    noise = torch.randn(r, c, generator=generator, dtype=outputs.dtype, device=device)
    if valid is not None:
        noise = noise * valid.unsqueeze(1).to(noise.dtype)
    probes, silent = [], []
    for b in range(bits):
        for v in (0, 1):
            probes.append(noise * (((sample >> b) & 1) == v).unsqueeze(1).to(noise.dtype))
            silent.append(((torch.arange(n, device=device) >> b) & 1) != v)
    grads = torch.autograd.grad(
        outputs,
        _grad_inputs(targets),
        torch.stack(probes),
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=True,
    )
    stays = [
        g is None
        or not any(  # (a layer's rows may be m per sample)
            bool((probe.reshape(n, -1)[samples] != 0).any()) for probe, samples in zip(g, silent)
        )
        for g in grads
    ]
    return m, stays


def _per_row_statistics(
    call: LossCall,
    jobs: dict[Any, _Job],
    columns: Tensor,
    valid: Tensor | None,
    coupled: bool,
) -> dict[Any, Any]:
    """Per job, from each row's columns backpropagated on their own: a Kronecker layer's
    per-row weight gradients ``[K·R', D_out, D_in]``, or a diagonal request's
    ``{id(param): Σ_{k,r} g²}`` (the per-row gradients of its calls added first).

    Without coupling (``coupled=False``), rows that stay in their samples share columns
    (:func:`_row_chunks`' ``group``): ``K·m`` backpropagated columns instead of ``K·m·N``,
    and the per-sample gradients of those columns are the per-row ones.
    """
    if not jobs:
        return {}
    targets = list({id(c): c for _, _, mine, _ in jobs.values() for c in mine}.values())
    slot = {id(c): i for i, c in enumerate(targets)}
    with torch.no_grad():
        inputs = {
            id(c): c.input if not c.input.is_floating_point() else layers.statistics_dtype(c.input)
            for c in targets
        }
        patches = {
            id(c): layers.layer_patches(c.module, inputs[id(c)])
            for request, module, mine, _ in jobs.values()
            if isinstance(request, KroneckerStatistics)
            for c in mine
        }
    group = None if coupled else _rows_stay_in_their_samples(call.outputs, targets, valid)
    parts: dict[Any, list[Tensor]] = {job_key: [] for job_key in jobs}
    squares: dict[Any, dict[int, Tensor]] = {job_key: {} for job_key in jobs}
    outputs = [c.output for c in targets]
    for size, grads in _row_chunks(call.outputs, outputs, columns, valid, group):
        with torch.no_grad():
            for i, (request, module, mine, _) in jobs.items():
                pairs = [
                    (c, layers.statistics_dtype(g))
                    for c in mine
                    if (g := grads[slot[id(c)]]) is not None
                ]
                if isinstance(request, KroneckerStatistics):
                    total = None
                    for c, g in pairs:
                        cols = layers.layer_columns(module, g)  # [c, N, T, D_out]
                        if group is None:  # a row's gradient: summed over the samples
                            dw = torch.einsum("knto,nti->koi", cols, patches[id(c)])
                        else:  # one row per (column, sample)
                            dw = torch.einsum("knto,nti->knoi", cols, patches[id(c)])
                            dw = dw.reshape(-1, *dw.shape[2:])
                        total = dw if total is None else total + dw
                    if total is None:  # the loss does not depend on the layer's output
                        d_out, d_in = layers.weight_matrix_shape(module)
                        rows = size if group is None else size * (columns.shape[1] // group)
                        total = columns.new_zeros(rows, d_out, d_in)
                    parts[i].append(total)
                else:
                    row_grads: dict[int, Tensor] = {}
                    for c, g in pairs:
                        rule = layers.DIAGONAL_RULES[type(module)]
                        for param, per_sample in rule(module, inputs[id(c)], g).items():
                            if group is None:  # a row's gradient: summed over the samples
                                per_row = per_sample.sum(dim=1)
                            else:  # one row per (column, sample)
                                per_row = per_sample.reshape(-1, *per_sample.shape[2:])
                            key = id(param)
                            row_grads[key] = (
                                per_row + row_grads[key] if key in row_grads else per_row
                            )
                    for key, g in row_grads.items():
                        square = g.square().sum(dim=0)
                        squares[i][key] = square + squares[i][key] if key in squares[i] else square
    out: dict[Any, Any] = {}
    for i, (request, module, _, _) in jobs.items():
        if isinstance(request, KroneckerStatistics):
            out[i] = layers.statistics_dtype(torch.cat(parts[i]))
        else:
            for param in _diagonal_params(module):
                if id(param) not in squares[i]:  # the loss does not depend on it
                    squares[i][id(param)] = layers.statistics_dtype(torch.zeros_like(param))
            out[i] = squares[i]
    return out


def _diagonal_params(module: nn.Module) -> list[Tensor]:
    """The trainable parameters a diagonal rule serves (a normalisation layer's affine ones)."""
    found = []
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        if isinstance(p, Tensor) and p.requires_grad:
            found.append(p)
    return found


def _per_sample_diagonal(
    module: nn.Module, calls: list[tuple[LayerCall, Tensor]]
) -> dict[int, Tensor]:
    """``{id(param): Σ_{k,n} g²}`` of the per-sample gradients at ``module`` (its calls'
    gradients of a sample added before squaring; one sample size)."""
    rule = layers.DIAGONAL_RULES[type(module)]
    totals: dict[int, Tensor] = {}
    with torch.no_grad():
        for call, grad in calls:
            per_sample = rule(
                module, layers.statistics_dtype(call.input), layers.statistics_dtype(grad)
            )
            for param, g in per_sample.items():
                key = id(param)
                totals[key] = g + totals[key] if key in totals else g
    squares = {key: g.square().sum(dim=(0, 1)) for key, g in totals.items()}
    for param in _diagonal_params(module):
        if id(param) not in squares:  # the loss does not depend on the layer's output
            squares[id(param)] = layers.statistics_dtype(torch.zeros_like(param))
    return squares


def _kronecker_batch(
    module: nn.Module,
    calls: list[tuple[LayerCall, Tensor]],
    request: KroneckerStatistics,
    valid: Tensor | None = None,
    row_grads: Tensor | None = None,
    logits: tuple[Tensor, BatchScale] | None = None,
) -> KroneckerBatch:
    """The statistics of ``module`` over its calls (weight sharing: summed).

    ``valid``: the loss rows that count, whose patches alone enter ``A`` where rows map
    to patches (:func:`~curvlab.extraction.layers.kept_patches`); ``row_grads``: the
    per-row weight gradients, if computed (then no per-sample patches and columns are kept).
    ``logits``: the cross-entropy loss's input and scale, for a module of
    ``request.low_rank_output`` whose output they are (:func:`_low_rank_output_factor`).
    """
    a_sum: Tensor | None = None
    g_sum: Tensor | None = None
    low_rank = any(module is m for m in request.low_rank_output)
    low_d: list[Tensor] = []
    low_cols: list[Tensor] = []
    signs: list[float] = []
    count = 0
    patches, cols, kept = [], [], []
    any_kept = False
    keep_raw = request.keep_raw and row_grads is None
    with torch.no_grad():
        for call, grad in calls:
            x = (
                call.input
                if not call.input.is_floating_point()
                else layers.statistics_dtype(call.input)
            )
            grad = layers.statistics_dtype(grad)
            n_all = x.shape[0] if x.dim() > 0 else 1
            keep = None
            if valid is not None:
                t = layers.num_positions(module, call.output.detach())
                keep = layers.kept_patches(valid, n_all, t)
            scale = 1.0
            if request.sample_fraction < 1.0 and x.dim() > 0 and x.shape[0] > 1:
                m = max(1, math.ceil(request.sample_fraction * n_all))
                x, grad, scale = x[:m], grad[:, :m], n_all / m
                keep = None if keep is None else keep[:m]
            a, n = layers.input_factor_sum(module, x, request.kfac_approx, keep)
            a_sum = a if a_sum is None else a_sum + a
            if low_rank:
                d, c, sign = _low_rank_output_factor(module, call, grad, request, logits)
                signs.append(sign)
                low_d.append(d)
                low_cols.append(c)
            else:
                g = layers.output_factor(module, grad, request.kfac_approx)
                if scale != 1.0:
                    g = g * scale
                g_sum = g if g_sum is None else g_sum + g
            count += n
            if keep_raw:
                patches.append(layers.layer_patches(module, x))
                cols.append(layers.layer_columns(module, grad))
                if valid is not None:  # which patches entered A
                    any_kept = any_kept or keep is not None
                    kept.append(
                        torch.ones(patches[-1].shape[:2], dtype=torch.bool, device=x.device)
                        if keep is None
                        else keep
                    )
    assert a_sum is not None
    g_low_rank = None
    if low_rank:
        if len(low_cols) > 1 and min(signs) < 0:
            raise RuntimeError(
                f"layer {type(module).__name__}: a structured output factor from the logits "
                "needs the layer to be called once per forward pass."
            )
        g_low_rank = (sum(low_d[1:], low_d[0]), torch.cat(low_cols, dim=1), signs[0])
        g_sum = a_sum.new_zeros(0, 0)
    assert g_sum is not None
    raw_patches = raw_cols = raw_kept = None
    if keep_raw:
        if len({p.shape[0] for p in patches}) != 1:
            raise RuntimeError(
                f"layer {type(module).__name__} was called on batches of different sizes in one "
                "forward; per-sample statistics (EKFAC, block-tridiagonal) need one size."
            )
        raw_patches = torch.cat(patches, dim=1)
        raw_cols = torch.cat(cols, dim=2)
        raw_kept = torch.cat(kept, dim=1) if any_kept else None
    return KroneckerBatch(
        a_sum=a_sum,
        count=count,
        g=g_sum,
        patches=raw_patches,
        columns=raw_cols,
        column_scale=1.0,
        kept=raw_kept,
        row_grads=None if row_grads is None else layers.statistics_dtype(row_grads),
        g_low_rank=g_low_rank,
    )


def _low_rank_output_factor(
    module: nn.Module,
    call: LayerCall,
    grad: Tensor,
    request: KroneckerStatistics,
    logits: tuple[Tensor, BatchScale] | None,
) -> tuple[Tensor, Tensor, float]:
    """One call's output factor as ``(d, C, sign)``: ``G = diag(d) + sign · C Cᵀ``.

    Where the call's output *is* the cross-entropy loss's input (the same memory, at most
    reshaped) and the Fisher type is a true Fisher (``"exact"``, ``"mc"``;
    :attr:`~curvlab.extraction.fisher_types.FisherType.true_fisher`): the softmax structure
    ``diag(Σ p) − P Pᵀ`` (:func:`~curvlab.extraction.losses.softmax_output_factor`; for
    ``"mc"`` the expectation of the sampled factor over its labels). Elsewhere: the
    backpropagated columns themselves, ``d = 0`` and ``sign = +1``.
    """
    output = call.output
    if logits is not None and request.fisher_type.true_fisher:
        outputs, scale = logits
        same = (
            output.is_contiguous()
            and outputs.is_contiguous()
            and output.data_ptr() == outputs.data_ptr()
            and output.numel() == outputs.numel()
            and output.shape[-1] == outputs.shape[-1]
        )
        if same:
            d, p = losses.softmax_output_factor(outputs, scale)
            return d, p, -1.0
    cols = layers.output_factor_columns(module, grad, request.kfac_approx)
    return cols.new_zeros(cols.shape[0]), cols, 1.0


class suspended_hooks:
    """Context manager: ``model``'s module hooks (BackPACK's included) are switched off.

    ``torch.func`` transforms must not run through recording hooks; the exact curvature
    products of the quadratic model (``curvlab.optim.quadratic``) run inside this.
    """

    _KINDS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: list[tuple[nn.Module, str, Any]] = []

    def __enter__(self) -> None:
        for module in self.model.modules():
            for kind in self._KINDS:
                hooks = getattr(module, kind)
                self.saved.append((module, kind, hooks.copy()))
                hooks.clear()

    def __exit__(self, *exc: object) -> None:
        for module, kind, hooks in self.saved:
            getattr(module, kind).update(hooks)
        self.saved = []


# --- the engine ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RecordedBatch:
    """A forward pass already run under a :class:`Recording` (:attr:`Batch.recorded`).

    ``loss``: the loss that was taken; ``call``/``calls``: its loss call and layer calls
    (:meth:`Recording.take`); ``scale``: the batch's scale; ``replay``: the model call
    whose output the loss depends on, if recorded; ``batch_size``: its first input's
    leading size, if known.
    """

    loss: Tensor
    call: LossCall
    calls: list[LayerCall]
    scale: BatchScale
    replay: ModelReplay | None = None
    batch_size: int | None = None


def batch_size(inputs: tuple[Any, ...] | None) -> int | None:
    """The leading size of a model call's first positional input, if it is a tensor."""
    if not inputs or not isinstance(inputs[0], Tensor) or inputs[0].dim() == 0:
        return None
    return int(inputs[0].shape[0])


class HooksEngine:
    """The hooks engine (module docstring): plain autograd, every model and request."""

    name = "hooks"

    def unable_reason(self, batch: Batch) -> str | None:
        return None

    def preferred(self, batch: Batch) -> bool:
        return False  # the default: engine="auto" takes it unless another is preferred

    def run(self, batch: Batch) -> tuple[Tensor, BatchResult]:
        loss_fn, targets = batch.loss_fn, batch.targets
        assert loss_fn is not None and targets is not None
        recorded = batch.recorded
        if recorded is None:
            with Recording(loss_fn, list(batch.modules), owner="extract") as recording:
                outputs = batch.model(batch.inputs)
                # clear errors before PyTorch's
                scale = batch_scale(loss_fn, *loss_rows(loss_fn, outputs, targets))
                graph_loss = loss_fn(outputs, targets)
            if not bool(torch.isfinite(graph_loss.detach()).all()):
                raise FloatingPointError(
                    f"The loss is not finite ({graph_loss.detach()}); no curvature taken."
                )
            call, calls = recording.take(graph_loss)
            replay = (
                ModelReplay(batch.model, (batch.inputs,), outputs)
                if isinstance(outputs, Tensor)
                else None
            )
            recorded = RecordedBatch(
                graph_loss, call, calls, scale, replay, batch_size((batch.inputs,))
            )
        assert isinstance(recorded, RecordedBatch)
        result = compute(
            loss_fn,
            recorded.call,
            recorded.calls,
            batch.requests,
            scale=recorded.scale,
            batch_size=recorded.batch_size,
            replay=recorded.replay,
        )
        return recorded.loss.detach(), result


__all__ = [
    "HookOwner",
    "HookSet",
    "HooksEngine",
    "LayerCall",
    "LossCall",
    "ModelCall",
    "RecordedBatch",
    "Recording",
    "compute",
    "suspended_hooks",
]
