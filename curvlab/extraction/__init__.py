"""Extraction: turning a batch into the statistics a backend asked for.

Backends state their needs as requests (:mod:`curvlab.extraction.requests`), each with a
Fisher type (:class:`~curvlab.extraction.fisher_types.FisherType`, which carries its own
output-column rule); an *engine* answers them with plain result objects. The engines are
the entries of one table (:data:`~curvlab.extraction.engines.ENGINE_TABLE`):

* ``"hooks"`` (:mod:`curvlab.extraction.hooks`): plain torch autograd on any
  ``nn.Module`` — custom ``forward``, residual adds, concatenations, attention,
  weight sharing, tied weights;
* recurrent modules' per-time-step statistics come from a replay of their recurrence
  (:mod:`curvlab.extraction.recurrent`), answered by the hooks engine;
* ``"backpack"`` (:mod:`curvlab.extraction.backpack_engine`): BackPACK, for plain
  ``nn.Sequential`` models of supported layers (not subclasses with their own
  ``forward``), where its single backward pass is fastest.

``engine="auto"`` takes the engine preferred for the batch among those that can serve it
(BackPACK where it applies and is faster), else the hooks engine
(:func:`~curvlab.extraction.engines.select_engine`). Both give the same numbers where both
apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torch import Tensor, nn

from curvlab.extraction import hooks
from curvlab.extraction.engines import (
    ENGINE_TABLE,
    check_engine,
    engine_settings,
    register_engine,
    select_engine,
)
from curvlab.extraction.fisher_types import FISHER_TYPES, ColumnRule, FisherType
from curvlab.extraction.losses import batch_scale, has_extra_axes
from curvlab.extraction.replay import ModelReplay
from curvlab.extraction.requests import (
    Batch,
    BatchResult,
    Engine,
    FactorRows,
    KroneckerBatch,
    KroneckerStatistics,
    ParameterDiagonal,
    RecurrentBatch,
    RecurrentStatistics,
    Request,
    check_mc_samples,
)


class Consumer(Protocol):
    """What extraction needs of a backend (every :class:`curvlab.Curvature` is one): its
    model, loss and engine setting, its requests, the modules to record, and a way to
    take a :class:`BatchResult`. Extraction never imports the backends."""

    model: nn.Module
    loss_fn: nn.Module
    engine: str

    def requests(self) -> list[Request]: ...

    def recorded_modules(self) -> list[nn.Module]: ...

    def _consume(self, result: BatchResult) -> None: ...


__all__ = [
    "ENGINE_TABLE",
    "FISHER_TYPES",
    "Batch",
    "BatchResult",
    "ColumnRule",
    "Consumer",
    "Engine",
    "FactorRows",
    "FisherType",
    "KroneckerBatch",
    "KroneckerStatistics",
    "ParameterDiagonal",
    "RecurrentBatch",
    "RecurrentStatistics",
    "Request",
    "check_engine",
    "check_mc_samples",
    "choose_engine",
    "engine_settings",
    "extract",
    "register_engine",
    "select_engine",
    "suspended_hooks",
]


def choose_engine(
    model: nn.Module,
    requests: Sequence[Request],
    engine: str,
    ignored_rows: bool = False,
    extra_axes: bool = False,
    loss_fn: nn.Module | None = None,
) -> str:
    """The name of the engine that serves ``requests`` on ``model`` under setting ``engine``
    (:func:`~curvlab.extraction.engines.select_engine` without a batch at hand).

    ``ignored_rows``: the batch has targets equal to the loss's ``ignore_index``, which
    BackPACK would count; ``extra_axes``: the model output has axes beyond ``[N, C]``
    (tokens, pixels); ``loss_fn``: a :class:`~curvlab.extraction.losses.LikelihoodLoss`
    is served by the hooks engine only. A forced engine that cannot serve them raises a
    ``ValueError`` saying why.
    """
    batch = Batch(model, loss_fn, tuple(requests), extra_axes=extra_axes, ignored_rows=ignored_rows)
    return select_engine(batch, engine).name


def _engine_setting(curvatures: Sequence[Consumer], owner: str) -> str:
    """The one engine setting the curvatures agree on (``"auto"`` unless one forces one)."""
    settings = {c.engine for c in curvatures} - {"auto"}
    if len(settings) > 1:
        raise ValueError(f"{owner}: the curvatures force different engines {sorted(settings)}.")
    return settings.pop() if settings else "auto"


def extract(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: object,
    targets: Tensor,
    curvatures: Sequence[Consumer],
) -> Tensor:
    """One forward and one extraction feeding every curvature in ``curvatures``.

    The union of their requests is answered by one engine (a forced one only when every
    curvature allows it). Parameter gradients (``.grad``) are left exactly as they were.
    Returns the detached loss.
    """
    if not curvatures:
        raise ValueError("extract: pass at least one curvature.")
    for c in curvatures:
        if c.model is not model or c.loss_fn is not loss_fn:
            raise ValueError(
                f"extract: {type(c).__name__} was built for another model or loss function."
            )
    batch = Batch(
        model,
        loss_fn,
        tuple(r for c in curvatures for r in c.requests()),
        inputs=inputs,
        targets=targets,
        modules=tuple({id(m): m for c in curvatures for m in c.recorded_modules()}.values()),
        extra_axes=has_extra_axes(loss_fn, targets),
    )
    # the engine is chosen before the forward pass (an engine may run its own)
    engine = select_engine(batch, _engine_setting(curvatures, "extract"))
    loss, result = engine.run(batch)
    for c in curvatures:
        c._consume(result)
    return loss


def accumulate_recorded(
    curvatures: Sequence[Consumer], recording: hooks.Recording, loss: Tensor
) -> None:
    """Feed ``curvatures`` the batch of ``loss``, recorded by ``recording``.

    The hooks engine backpropagates the Fisher type's columns through the recorded graph.
    Where ``engine="auto"`` prefers another engine that can serve the batch (BackPACK, when
    the recorded model call can be run again), that engine runs the recorded inputs
    again instead: one more forward pass, but for BackPACK one backward instead of one per
    loss row for dense factor rows.
    """
    call, calls = recording.take(loss)
    model, loss_fn = curvatures[0].model, curvatures[0].loss_fn
    inputs = recording.taken_inputs
    taken = recording.taken_call
    scale = batch_scale(loss_fn, call.outputs, call.targets)  # also counts ignored rows
    recorded = hooks.RecordedBatch(
        loss,
        call,
        calls,
        scale,
        None if taken is None else ModelReplay(model, taken.inputs, taken.output, taken.kwargs),
        hooks.batch_size(inputs),
    )
    batch = Batch(
        model,
        loss_fn,
        tuple(r for c in curvatures for r in c.requests()),
        inputs=inputs[0] if inputs is not None and len(inputs) == 1 else None,
        targets=call.targets,
        recorded=recorded,
        extra_axes=call.raw_outputs.dim() != 2,
        ignored_rows=scale.valid is not None,
    )
    engine = select_engine(batch, _engine_setting(curvatures, "accumulate"))
    _, result = engine.run(batch)
    for c in curvatures:
        c._consume(result)


suspended_hooks = hooks.suspended_hooks
