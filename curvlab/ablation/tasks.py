"""The task of ``curvlab ablate``: a model (a built-in name or a user's ``module:factory``),
its loss (``ce``, ``mse`` or ``bce``) and the training and validation (inputs, targets).

A user's factory is called with ``(input_shape, num_outputs)`` — one sample's shape of
``X`` as stored (e.g. ``(8, 8)`` for the digits) and the number of classes (``ce``) or of
target values per sample (``mse``, ``bce``) — or with no arguments if it takes none, and
must return an ``nn.Module`` built from torch's global RNG only. Its model receives ``X``
as stored, and must return ``[N, num_outputs]``: logits for ``ce`` and ``bce``, values for
``mse``.

Targets: ``ce``: the class labels ``y``. ``mse``, ``bce``: ``y`` of a file that has
regression targets (flattened to ``[N, D]``); else (a file of ``X`` alone, or a data set of
class labels such as the digits) ``X`` itself, flattened (a reconstruction, as the
built-in autoencoder). ``bce`` targets must lie in ``[0, 1]``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.ablation.data import (
    MODELS,
    Dataset,
    build_model,
    loss_and_targets,
    model_inputs,
)
from curvlab.ablation.imports import import_object, is_import_path

#: The losses of ``--loss``: cross-entropy on class labels, mean squared error, and binary
#: cross-entropy on logits (``BCEWithLogitsLoss``; targets in [0, 1]).
LOSSES: dict[str, Callable[[], nn.Module]] = {
    "ce": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce": nn.BCEWithLogitsLoss,
}
#: The loss each built-in model trains with.
BUILT_IN_LOSS = {"convnet": "ce", "mlp": "ce", "autoencoder": "mse"}


@dataclass(frozen=True)
class Task:
    """What a race trains: ``build()`` makes a fresh model (from torch's global RNG),
    ``loss_fn`` scores it, on ``train`` and ``val`` ``(inputs, targets)``."""

    model: str  # a built-in name or the factory's import path
    loss: str  # "ce", "mse" or "bce"
    loss_fn: nn.Module
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    input_shape: tuple[int, ...]  # one sample's inputs
    num_outputs: int  # classes (ce) or target values per sample (mse, bce)
    reconstruction: bool  # the targets are the inputs
    validation_given: bool  # the data's own validation set, not a split
    build: Callable[[], nn.Module]


def model_factory(spec: str) -> Callable[..., Any] | None:
    """``None`` for a built-in model name; the callable ``module:factory`` names (imported
    now). Raises ``ValueError`` for anything else."""
    if spec in MODELS:
        return None
    if not is_import_path(spec):
        raise ValueError(
            f"--model: unknown model {spec!r}. Valid: {', '.join(MODELS)}, or your own as "
            "'package.module:factory' (a callable returning an nn.Module)."
        )
    try:
        factory = import_object(spec)
    except ValueError as err:
        raise ValueError(f"--model: {err}") from None
    if not callable(factory):
        raise ValueError(f"--model {spec}: {factory!r} is not callable.")
    return factory


def check_loss(model: str, loss: str | None) -> str | None:
    """The loss of ``model``: a built-in model's own (a different ``loss`` is an error);
    for a user's model ``loss``, or ``None``: inferred from the data by :func:`make_task`."""
    if loss is not None and loss not in LOSSES:
        raise ValueError(f"--loss: unknown loss {loss!r}. Valid: {', '.join(LOSSES)}.")
    own = BUILT_IN_LOSS.get(model)
    if own is not None and loss is not None and loss != own:
        raise ValueError(
            f"--loss {loss}: the built-in model {model!r} trains with {own}; for another "
            "loss bring your own model (--model package.module:factory)."
        )
    return own or loss


def labels_mode(model: str, loss: str | None) -> bool | None:
    """What ``y`` of a data file must be for ``model`` and ``loss`` (the ``labels``
    argument of :func:`~curvlab.ablation.load_dataset`)."""
    if loss == "ce":
        return True
    if loss is None:
        return None  # a user's model with no --loss: integer y are labels, floats targets
    return False


def make_task(
    model: str,
    factory: Callable[..., Any] | None,
    loss: str | None,
    dataset: Dataset,
    val_fraction: float,
    seed: int,
) -> Task:
    """The task of ``model`` (``factory``: from :func:`model_factory`) with ``loss``
    (from :func:`check_loss`) on ``dataset``: its own validation set, else a seeded split
    with ``val_fraction``. Builds the model once and runs it on two samples, so a model
    that does not fit the data or the loss fails here, before any training."""
    if dataset.validation is not None:
        train, val = Dataset(dataset.name, dataset.X, dataset.y), dataset.validation
    else:
        train, val = dataset.split(val_fraction, seed)
    if factory is None:
        kind = BUILT_IN_LOSS[model]
        inputs, val_inputs = model_inputs(model, train.X), model_inputs(model, val.X)
        loss_fn, targets = loss_and_targets(model, inputs, train.y)
        _, val_targets = loss_and_targets(model, val_inputs, val.y)
        shape = tuple(inputs.shape[1:])
        classes = dataset.num_classes if kind == "ce" else 0
        outputs = classes if kind == "ce" else int(targets.shape[1])
        reconstruction = kind != "ce"

        def build() -> nn.Module:
            return build_model(model, shape, classes)

    else:
        kind = loss or ("ce" if dataset.has_labels else "mse")
        loss_fn = LOSSES[kind]()
        inputs, val_inputs = train.X, val.X
        shape = tuple(inputs.shape[1:])
        if kind == "ce":
            if not train.has_labels:
                raise ValueError(
                    f"--loss ce needs integer class labels y; {dataset.name} has "
                    f"{'no y' if train.y is None else 'real-valued targets y'}."
                )
            assert train.y is not None and val.y is not None
            targets, val_targets = train.y, val.y
            outputs = dataset.num_classes
            reconstruction = False
        else:
            reconstruction = train.y is None or train.has_labels
            targets, val_targets = (
                _flat(train.X if reconstruction else train.y),
                _flat(val.X if reconstruction else val.y),
            )
            outputs = int(targets.shape[1])
            if kind == "bce":
                _check_probabilities(targets, val_targets, dataset.name, reconstruction)
        num_outputs = outputs

        def build() -> nn.Module:
            return _call_factory(factory, model, shape, num_outputs)

    task = Task(
        model=model,
        loss=kind,
        loss_fn=loss_fn,
        train=(inputs, targets),
        val=(val_inputs, val_targets),
        input_shape=shape,
        num_outputs=outputs,
        reconstruction=reconstruction,
        validation_given=dataset.validation is not None,
        build=build,
    )
    _probe(task, seed)
    return task


def _flat(t: Tensor | None) -> Tensor:
    assert t is not None
    return t.reshape(len(t), -1).float()


def _check_probabilities(targets: Tensor, val_targets: Tensor, name: str, x: bool) -> None:
    low = float(min(targets.min(), val_targets.min()))
    high = float(max(targets.max(), val_targets.max()))
    if low < 0.0 or high > 1.0:
        what = "X (the reconstruction targets)" if x else "y"
        raise ValueError(
            f"--loss bce needs targets in [0, 1]; {what} of {name} lie in [{low:g}, {high:g}]."
        )


def _call_factory(
    factory: Callable[..., Any], spec: str, input_shape: tuple[int, ...], num_outputs: int
) -> nn.Module:
    """``factory(input_shape, num_outputs)``, or ``factory()`` if it takes no arguments."""
    args: tuple[Any, ...] = (input_shape, num_outputs)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: try the documented call
        signature = None
    if signature is not None:
        try:
            signature.bind(*args)
        except TypeError:
            try:
                signature.bind()
                args = ()
            except TypeError:
                raise ValueError(
                    f"--model {spec}: the factory must take (input_shape, num_outputs) or no "
                    f"arguments; its signature is {signature}."
                ) from None
    try:
        model = factory(*args)
    except Exception as err:  # the user's code: one line naming it
        call = f"{spec}{args}" if args else f"{spec}()"
        raise ValueError(f"--model: {call} raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec} returned {type(model).__name__}, not an nn.Module.")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"--model {spec}: the model has no trainable parameters.")
    return model


def _probe(task: Task, seed: int) -> None:
    """Build the model and run it on two training samples with the loss."""
    torch.manual_seed(seed)
    model = task.build()
    x, y = task.train[0][:2], task.train[1][:2]
    fits = f"inputs {tuple(x.shape[1:])} per sample, --loss {task.loss}"
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:
        raise ValueError(
            f"--model {task.model}: the forward pass failed on the data ({fits}): "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(out, Tensor):
        bad = True
    elif task.loss == "ce":
        bad = out.dim() != 2 or len(out) != len(x) or out.shape[1] < task.num_outputs
    else:
        bad = tuple(out.shape) != (len(x), task.num_outputs)
    if bad:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        want = (
            f"[N, {task.num_outputs}]"
            if task.loss != "ce"
            else f"[N, C] logits with C >= {task.num_outputs} classes"
        )
        raise ValueError(f"--model {task.model}: its output must be {want} ({fits}); got {got}.")
    try:
        with torch.no_grad():
            value = float(task.loss_fn(out, y))
    except Exception as err:
        raise ValueError(
            f"--model {task.model}: its output {tuple(out.shape)} does not fit the targets "
            f"{tuple(y.shape)} ({fits}): {type(err).__name__}: {err}"
        ) from err
    if not math.isfinite(value):
        raise ValueError(f"--model {task.model}: its initial loss is {value} ({fits}).")
