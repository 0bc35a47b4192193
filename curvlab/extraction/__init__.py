"""Extraction: turning a batch into the statistics a backend asked for.

Backends state their needs as requests (:mod:`curvlab.extraction.requests`); an *engine*
answers them with plain result objects:

* ``"hooks"`` (:mod:`curvlab.extraction.hooks`): plain torch autograd on any
  ``nn.Module`` — custom ``forward``, residual adds, concatenations, attention,
  weight sharing, tied weights;
* recurrent modules' per-time-step statistics come from a replay of their recurrence
  (:mod:`curvlab.extraction.recurrent`), answered by the hooks engine;
* ``"backpack"`` (:mod:`curvlab.extraction.backpack_engine`): BackPACK, for plain
  ``nn.Sequential`` models of supported layers (not subclasses with their own
  ``forward``), where its single backward pass is fastest.

``engine="auto"`` takes BackPACK where it applies and is faster (see :func:`choose_engine`),
else the hooks engine. Both give the same numbers where both apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from curvlab.extraction import backpack_engine, hooks
from curvlab.extraction.losses import (
    FISHER_TYPES,
    LikelihoodLoss,
    batch_scale,
    has_extra_axes,
    loss_rows,
)
from curvlab.extraction.replay import ModelReplay, replayable
from curvlab.extraction.requests import (
    BatchResult,
    FactorRows,
    KroneckerBatch,
    KroneckerStatistics,
    ParameterDiagonal,
    RecurrentBatch,
    RecurrentStatistics,
    Request,
    check_fisher_type,
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


#: Settings of ``engine=``: BackPACK where it applies and is faster, or one forced.
ENGINES: tuple[str, ...] = ("auto", "hooks", "backpack")

__all__ = [
    "ENGINES",
    "FISHER_TYPES",
    "BatchResult",
    "Consumer",
    "FactorRows",
    "KroneckerBatch",
    "KroneckerStatistics",
    "ParameterDiagonal",
    "RecurrentBatch",
    "RecurrentStatistics",
    "Request",
    "check_engine",
    "check_fisher_type",
    "check_mc_samples",
    "choose_engine",
    "extract",
    "suspended_hooks",
]


def check_engine(engine: str, owner: str) -> None:
    """Raise a ``ValueError`` naming ``owner`` unless ``engine`` is one of :data:`ENGINES`."""
    if engine not in ENGINES:
        raise ValueError(f"{owner}: unknown engine {engine!r}; choose one of {list(ENGINES)}.")


def _backpack_is_faster(requests: Sequence[Request]) -> bool:
    """Where BackPACK's one backward beats the hooks engine (``benchmarks/kfac_extraction``,
    docs/benchmarks.md): dense factor rows (its per-sample Jacobian products are fused
    into the backward pass) and the exact Fisher's Kronecker statistics of convolutional
    networks. Monte-Carlo and empirical Kronecker statistics, and the exact ones of
    fully-connected networks, are faster with the hooks engine, which backpropagates the
    columns to the layer outputs only and never forms weight gradients."""
    convolutional = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    for r in requests:
        if isinstance(r, KroneckerStatistics):
            if r.fisher_type != "exact":
                return False
            if not any(isinstance(m, convolutional) for m in r.modules):
                return False
    return True


def choose_engine(
    model: nn.Module,
    requests: Sequence[Request],
    engine: str,
    ignored_rows: bool = False,
    extra_axes: bool = False,
    loss_fn: nn.Module | None = None,
) -> str:
    """``"hooks"`` or ``"backpack"`` for ``requests`` on ``model`` under setting ``engine``.

    ``ignored_rows``: the batch has targets equal to the loss's ``ignore_index``, which
    BackPACK would count; ``extra_axes``: the model output has axes beyond ``[N, C]``
    (tokens, pixels); ``loss_fn``: a :class:`~curvlab.extraction.losses.LikelihoodLoss`
    is served by the hooks engine only. ``engine="backpack"`` raises a ``ValueError``
    saying why BackPACK cannot serve them.
    """
    if engine == "hooks":
        return "hooks"
    reason = backpack_engine.unsupported_reason(model, requests)
    if reason is None and isinstance(loss_fn, LikelihoodLoss):
        reason = f"BackPACK knows torch's own losses only, not {type(loss_fn).__name__}"
    if reason is None and ignored_rows:
        reason = "BackPACK counts targets equal to ignore_index as part of the loss"
    if reason is None and extra_axes:
        reason = "curvlab's BackPACK engine takes [N, C] outputs only, not extra axes"
    if engine == "backpack":
        if reason is not None:
            raise ValueError(f"engine='backpack' cannot serve this model: {reason}.")
        return "backpack"
    if reason is None and _backpack_is_faster(requests):
        return "backpack"
    return "hooks"


def _engine_setting(curvatures: Sequence[Consumer], owner: str) -> str:
    """The one engine setting the curvatures agree on (``"auto"`` unless one forces one)."""
    settings = {c.engine for c in curvatures} - {"auto"}
    if len(settings) > 1:
        raise ValueError(f"{owner}: the curvatures force different engines {sorted(settings)}.")
    return settings.pop() if settings else "auto"


def _check_finite(loss: Tensor) -> None:
    if not bool(torch.isfinite(loss.detach()).all()):
        raise FloatingPointError(f"The loss is not finite ({loss.detach()}); no curvature taken.")


def extract(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Any,
    targets: Tensor,
    curvatures: Sequence[Consumer],
) -> Tensor:
    """One forward and one extraction feeding every curvature in ``curvatures``.

    The union of their requests is answered by one engine (``"backpack"`` only when every
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
    requests = [r for c in curvatures for r in c.requests()]
    setting = _engine_setting(curvatures, "extract")
    # the engine is chosen before the forward pass (BackPACK runs its own): one look at
    # the targets for ignore_index, which BackPACK would count
    ignored = (
        setting != "hooks"
        and isinstance(loss_fn, nn.CrossEntropyLoss)
        and bool((torch.as_tensor(targets) == loss_fn.ignore_index).any())
    )
    extra = has_extra_axes(loss_fn, targets)
    engine = choose_engine(model, requests, setting, ignored, extra, loss_fn)
    if engine == "backpack":
        loss, result = backpack_engine.run(model, loss_fn, inputs, targets, requests)
    else:
        modules = list({id(m): m for c in curvatures for m in c.recorded_modules()}.values())
        with hooks.Recording(loss_fn, modules, owner="extract") as recording:
            outputs = model(inputs)
            # clear errors before PyTorch's
            scale = batch_scale(loss_fn, *loss_rows(loss_fn, outputs, targets))
            graph_loss = loss_fn(outputs, targets)
        _check_finite(graph_loss)
        call, calls = recording.take(graph_loss)
        replay = ModelReplay(model, (inputs,), outputs) if isinstance(outputs, Tensor) else None
        result = hooks.compute(
            loss_fn,
            call,
            calls,
            requests,
            scale=scale,
            batch_size=_batch_size((inputs,)),
            replay=replay,
        )
        loss = graph_loss.detach()
    for c in curvatures:
        c._consume(result)
    return loss


def accumulate_recorded(
    curvatures: Sequence[Consumer], recording: hooks.Recording, loss: Tensor
) -> None:
    """Feed ``curvatures`` the batch of ``loss``, recorded by ``recording``.

    The hooks engine backpropagates the Fisher type's columns through the recorded graph.
    Where ``engine="auto"`` prefers BackPACK (:func:`choose_engine`) and the model can be
    replayed (:func:`replayable`), its recorded inputs are run again under BackPACK
    instead: one more forward pass, but one backward instead of one per loss row for
    dense factor rows.
    """
    call, calls = recording.take(loss)
    model, loss_fn = curvatures[0].model, curvatures[0].loss_fn
    requests = [r for c in curvatures for r in c.requests()]
    setting = _engine_setting(curvatures, "accumulate")
    inputs = recording.taken_inputs
    scale = batch_scale(loss_fn, call.outputs, call.targets)  # also counts ignored rows
    finite = bool(torch.isfinite(loss.detach()).all())
    engine = "hooks"
    if finite and inputs is not None and len(inputs) == 1 and replayable(model):
        extra = call.raw_outputs.dim() != 2
        engine = choose_engine(model, requests, setting, scale.valid is not None, extra, loss_fn)
    if engine == "backpack" and inputs is not None:
        _, result = backpack_engine.run(model, loss_fn, inputs[0], call.targets, requests)
    else:
        taken = recording.taken_call
        replay = (
            None if taken is None else ModelReplay(model, taken.inputs, taken.output, taken.kwargs)
        )
        result = hooks.compute(
            loss_fn,
            call,
            calls,
            requests,
            scale=scale,
            batch_size=_batch_size(inputs),
            replay=replay,
        )
    for c in curvatures:
        c._consume(result)


def _batch_size(inputs: tuple[Any, ...] | None) -> int | None:
    """The leading size of a model call's first positional input, if it is a tensor."""
    if not inputs or not isinstance(inputs[0], Tensor) or inputs[0].dim() == 0:
        return None
    return int(inputs[0].shape[0])


suspended_hooks = hooks.suspended_hooks
