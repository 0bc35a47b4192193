"""The hooks engine: curvature statistics on plain torch autograd, for any ``nn.Module``.

A :class:`Recording` installs forward hooks on the Kronecker layers and on the loss
module while it is active. Each call of a layer is recorded with its input and its output
(a node of the autograd graph); each call of the loss with the model output it received.
Given the loss that will be backpropagated, :meth:`Recording.take` picks the loss call
that produced it and the layer calls of *that* forward (the ones in the loss's graph), so
a validation forward run in between, or another call of the loss function, cannot leak
into the statistics.

:func:`compute` then backpropagates the loss's output-space columns (see
:mod:`curvlab.extraction.losses`):

* to every recorded layer output — the ``g`` of the Kronecker statistics. The ``K``
  columns go through one batched vector-Jacobian product (``is_grads_batched``); the
  backward stops at the earliest layer output, so no weight gradient is ever formed;
* to parameters, one column per loss row — the factor rows of dense blocks.

Layer inputs become patches with the rules of :mod:`curvlab.extraction.layers`. A layer
called several times in one forward (weight sharing) contributes every call, the calls
acting as extra positions (expand) or extra rows (reduce); see
concepts/models.md#kronecker-rules-and-coverage. Parameters shared by several modules (tied
weights) are served by factor rows: gradients w.r.t. the one shared tensor, summing every use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.extraction import layers
from curvlab.extraction.losses import BatchScale, batch_scale, loss_rows, output_columns
from curvlab.extraction.requests import (
    BatchResult,
    DiagonalStatistics,
    FactorRows,
    KroneckerBatch,
    KroneckerStatistics,
    Request,
)

#: At most this many entries (columns × rows × parameters) per batched product.
_CHUNK_ELEMENTS = 1 << 26


@dataclass(eq=False)
class LayerCall:
    """One call of a recorded layer: its first input (detached) and its output."""

    module: nn.Module
    input: Tensor
    output: Tensor


@dataclass(eq=False)
class ModelCall:
    """One call of the whole model: its positional inputs and its output."""

    inputs: tuple[Any, ...]
    output: Any


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


class Recording:
    """Forward hooks on ``modules`` and ``loss_fn`` that record calls while active.

    Use as a context manager (hooks are installed on enter and removed on exit; the
    records stay until :meth:`take` consumes them or :meth:`clear`). Calls made with
    gradients disabled are not recorded.
    """

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
        self._handles: list[Any] = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Recording:
        if not self._handles:
            self._handles.append(
                self.loss_fn.register_forward_hook(self._record_loss, with_kwargs=True)
            )
            for module in self.modules:
                self._handles.append(module.register_forward_hook(self._record_layer))
            if self.model is not None:
                self._handles.append(self.model.register_forward_hook(self._record_model))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        self.calls = []
        self.losses = []
        self.model_calls = []

    def _record_model(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad:
            self.model_calls.append(ModelCall(args, output))

    def model_inputs(self, outputs: Tensor) -> tuple[Any, ...] | None:
        """The inputs of the recorded model call whose output is ``outputs``, if any."""
        for call in self.model_calls:
            if call.output is outputs:
                return call.inputs
        return None

    def _record_layer(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        if not output.requires_grad or not args or not isinstance(args[0], Tensor):
            return
        self.calls.append(LayerCall(module, args[0].detach(), output))

    def _record_loss(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], loss: Any
    ) -> None:
        if not torch.is_grad_enabled() or not isinstance(loss, Tensor) or not loss.requires_grad:
            return
        values = list(args) + [kwargs[k] for k in ("input", "target") if k in kwargs]
        if (
            len(values) >= 2
            and all(isinstance(v, Tensor) for v in values[:2])
            and values[0].dim() > 0
        ):
            rows, targets = loss_rows(self.loss_fn, values[0], values[1].detach())
            self.losses.append(LossCall(rows, targets, loss, values[0]))

    def take(self, loss: Tensor) -> tuple[LossCall, list[LayerCall]]:
        """The loss call that produced ``loss`` and the layer calls of its forward pass.

        Both are removed from the records. Raises a ``RuntimeError`` naming ``owner`` when
        ``loss`` does not come from a recorded call of the loss module.
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
                "its steps), and pass the loss_fn's output (or an expression of it)."
            )
        if len(match) > 1:
            raise RuntimeError(
                f"{self.owner}: the loss combines {len(match)} calls of loss_fn; the "
                "curvature is defined for one call (one batch) per backward."
            )
        call = match[0]
        self.losses = [c for c in self.losses if c is not call]
        nodes = _graph_nodes(call.loss)
        mine = [c for c in self.calls if c.output.grad_fn in nodes]
        taken = {id(c) for c in mine}
        self.calls = [c for c in self.calls if id(c) not in taken]
        self.taken_inputs = self.model_inputs(call.raw_outputs)
        self.model_calls = [c for c in self.model_calls if c.output is not call.raw_outputs]
        return call, mine


def _graph_nodes(t: Tensor) -> set[Any]:
    """Every autograd node ``t`` depends on."""
    seen: set[Any] = set()
    stack = [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return seen


def _vjp(outputs: Tensor, inputs: Sequence[Tensor], columns: Tensor) -> list[Tensor | None]:
    """``[K, *input.shape]`` vector-Jacobian products of ``columns`` ``[K, *outputs.shape]``.

    ``None`` for inputs the outputs do not depend on. The graph is kept.
    """
    if not inputs:
        return []
    columns = columns.to(outputs.dtype)
    k = columns.shape[0]
    if k == 1:
        grads = torch.autograd.grad(
            outputs, list(inputs), columns[0], retain_graph=True, allow_unused=True
        )
        return [None if g is None else g.unsqueeze(0) for g in grads]
    per_column = outputs.numel() + sum(t.numel() for t in inputs)
    step = max(1, _CHUNK_ELEMENTS // max(per_column, 1))
    chunks: list[tuple[Tensor | None, ...]] = []
    for start in range(0, k, step):
        chunks.append(
            torch.autograd.grad(
                outputs,
                list(inputs),
                columns[start : start + step],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        )
    out: list[Tensor | None] = []
    for i in range(len(inputs)):
        parts = [c[i] for c in chunks]
        out.append(None if parts[0] is None else torch.cat(parts))  # type: ignore[arg-type]
    return out


def _per_row(columns: Tensor, valid: Tensor | None) -> Tensor:
    """``[K·N', N, C]``: each column split into one column per (counted) loss row."""
    _, n, c = columns.shape
    eye = torch.eye(n, dtype=columns.dtype, device=columns.device)
    split = columns.unsqueeze(2) * eye.unsqueeze(0).unsqueeze(-1)  # [K, N(row), N, C]
    if valid is not None:
        split = split[:, valid]
    return split.reshape(-1, n, c)


def compute(
    loss_fn: nn.Module,
    call: LossCall,
    layer_calls: Sequence[LayerCall],
    requests: Sequence[Request],
    scale: BatchScale | None = None,
) -> BatchResult:
    """Answer ``requests`` for the batch of ``call`` (see the module docstring).

    ``scale``: the batch's :class:`BatchScale` if already computed.
    """
    if scale is None:
        scale = batch_scale(loss_fn, call.outputs, call.targets)
    result = BatchResult(scale=scale, engine="hooks")
    columns: dict[tuple[str, int], Tensor] = {}

    def columns_for(key: tuple[str, int]) -> Tensor:
        if key not in columns:
            columns[key] = output_columns(
                loss_fn, call.outputs, call.targets, key[0], scale, mc_samples=key[1]
            )
        return columns[key]

    local = [r for r in requests if isinstance(r, (KroneckerStatistics, DiagonalStatistics))]
    for key in dict.fromkeys(r.columns_key for r in local):
        group = [r for r in local if r.columns_key == key]
        wanted = {id(m) for r in group for m in r.modules}
        calls = [c for c in layer_calls if id(c.module) in wanted]
        grads = _vjp(call.outputs, [c.output for c in calls], columns_for(key))
        used = [(c, g) for c, g in zip(calls, grads) if g is not None]
        for request in group:
            if isinstance(request, DiagonalStatistics):
                diag_store = result.diagonals.setdefault(request.key, {})
                for module in request.modules:
                    for c, g in used:
                        if c.module is module:
                            _add_diagonal(diag_store, module, c, g)
                continue
            store = result.kronecker.setdefault(request.key, {})
            for module in request.modules:
                mine = [(c, g) for c, g in used if c.module is module]
                if mine:
                    store[id(module)] = _kronecker_batch(module, mine, request)
    dense = [r for r in requests if isinstance(r, FactorRows)]
    for key in dict.fromkeys(r.key for r in dense):
        params = list({id(p): p for r in dense if r.key == key for p in r.params}.values())
        per_row = _per_row(columns_for(key), scale.valid)
        grads = _vjp(call.outputs, params, per_row)
        rows_store = result.rows.setdefault(key, {})
        for p, maybe in zip(params, grads):
            # None: the loss does not depend on p, its rows are zero
            rows = per_row.new_zeros(per_row.shape[0], p.numel()) if maybe is None else maybe
            rows_store[id(p)] = layers.statistics_dtype(rows.reshape(per_row.shape[0], p.numel()))
    return result


def _add_diagonal(
    store: dict[int, Tensor], module: nn.Module, call: LayerCall, grad: Tensor
) -> None:
    """Add one call's ``Σ_{k,n} g²`` of the per-sample gradients at ``module``."""
    rule = layers.DIAGONAL_RULES[type(module)]
    with torch.no_grad():
        per_sample = rule(
            module, layers.statistics_dtype(call.input), layers.statistics_dtype(grad)
        )
        for param, g in per_sample.items():
            square = g.square().sum(dim=(0, 1))
            if id(param) in store:
                square = square + store[id(param)]
            store[id(param)] = square


def _kronecker_batch(
    module: nn.Module, calls: list[tuple[LayerCall, Tensor]], request: KroneckerStatistics
) -> KroneckerBatch:
    """The statistics of ``module`` over its calls (weight sharing: summed)."""
    a_sum: Tensor | None = None
    g_sum: Tensor | None = None
    count = 0
    patches, cols = [], []
    with torch.no_grad():
        for call, grad in calls:
            x = (
                call.input
                if not call.input.is_floating_point()
                else layers.statistics_dtype(call.input)
            )
            grad = layers.statistics_dtype(grad)
            scale = 1.0
            if request.sample_fraction < 1.0 and x.dim() > 0 and x.shape[0] > 1:
                n_all = x.shape[0]
                m = max(1, math.ceil(request.sample_fraction * n_all))
                x, grad, scale = x[:m], grad[:, :m], n_all / m
            a, n = layers.input_factor_sum(module, x, request.kfac_approx)
            g = layers.output_factor(module, grad, request.kfac_approx)
            if scale != 1.0:
                g = g * scale
            a_sum = a if a_sum is None else a_sum + a
            g_sum = g if g_sum is None else g_sum + g
            count += n
            if request.keep_raw:
                patches.append(layers.layer_patches(module, x))
                cols.append(layers.layer_columns(module, grad))
    assert a_sum is not None and g_sum is not None
    raw_patches = raw_cols = None
    if request.keep_raw:
        if len({p.shape[0] for p in patches}) != 1:
            raise RuntimeError(
                f"layer {type(module).__name__} was called on batches of different sizes in one "
                "forward; per-sample statistics (EKFAC, block-tridiagonal) need one size."
            )
        raw_patches = torch.cat(patches, dim=1)
        raw_cols = torch.cat(cols, dim=2)
    return KroneckerBatch(
        a_sum=a_sum, count=count, g=g_sum, patches=raw_patches, columns=raw_cols, column_scale=1.0
    )


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


__all__ = ["LayerCall", "LossCall", "ModelCall", "Recording", "compute", "suspended_hooks"]
