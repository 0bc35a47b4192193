"""Per-sample gradients of parameters without a layer rule, by replaying the forward pass.

The diagonal of the Fisher of a parameter that no layer rule serves (a raw
``nn.Parameter``, a tied weight, a recurrent layer's weights) needs the gradient of each
loss row's columns on its own. Backpropagating every row's columns through the recorded
graph costs one backward pass per row (quadratic in the batch). Where the model treats its
samples independently, the same numbers come from *per-sample* gradients: the forward
pass of each sample is replayed with :mod:`torch.func` (``vmap`` over the samples of a
``vjp`` of ``functional_call``), and each sample's output gradients are the columns of
its own rows (concepts/models.md#rows-samples-and-exactness). The cost is one more
forward pass and one backward pass per column of a sample, linear in the batch.

PyTorch's fused recurrent kernels (``nn.RNN``/``nn.LSTM``/``nn.GRU``) have no ``vmap``
batching rule, so ``vmap`` would run them one sample at a time; inside the replay they
compute with plain torch operations instead (:func:`batchable_recurrences`), the same
function, batched over the samples.

The replay is used only when it is the same function: the replayed outputs must equal the
recorded ones (so dropout, batch statistics, or a model whose samples interact fall back
to the per-row backward passes, which are exact everywhere), the loss rows must each
depend on one sample of the model output, and the parameters must reach the loss through
the model's output only.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from curvlab.extraction.recurrent import RECURRENCE_TOLERANCE, unrolled_forward

#: At most this many entries (columns × samples × parameter entries) per replayed chunk.
_CHUNK_ELEMENTS = 1 << 25


@dataclass(eq=False)
class ModelReplay:
    """A recorded call of the whole model: ``output = model(*args, **kwargs)``."""

    model: nn.Module
    args: tuple[Any, ...]
    output: Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)


def _locations(
    model: nn.Module, params: Sequence[Tensor]
) -> tuple[dict[str, int], dict[str, Tensor]] | None:
    """Every place ``params`` sit in ``model`` as ``{attribute path: id(param)}``, and the
    other parameters detached ``{attribute path: tensor}``; each module once (a module
    registered twice is one set of attributes; a weight tied between two modules is two).
    ``None`` if one of ``params`` is not in ``model``."""
    wanted = {id(p) for p in params}
    found: dict[str, int] = {}
    others: dict[str, Tensor] = {}
    for prefix, module in model.named_modules():  # each module once
        for name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            path = f"{prefix}.{name}" if prefix else name
            if id(p) in wanted:
                found[path] = id(p)
            else:
                others[path] = p.detach()
    if set(found.values()) != wanted:
        return None
    return found, others


def only_through(output: Tensor, rows: Tensor, params: Sequence[Tensor]) -> bool:
    """Whether ``rows`` reach ``params`` only through ``output`` (no use of a parameter
    between the model and the loss, e.g. a head applied outside the model)."""
    stop = output.grad_fn
    wanted = {id(p) for p in params}
    seen: set[Any] = set()
    stack = [rows.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node is stop or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in wanted:
            return False
        stack.extend(nxt for nxt, _ in node.next_functions)
    return True


def replayable(model: nn.Module) -> bool:
    """Whether a second forward pass of ``model`` gives the same outputs and leaves it as
    it was: no dropout and no BatchNorm running statistics in training mode."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd

    return not any(
        m.training and (isinstance(m, _BatchNorm) or (isinstance(m, _DropoutNd) and m.p > 0))
        for m in model.modules()
    )


def sample_count(replay: ModelReplay) -> int | None:
    """The number of samples of the model call: the leading size of its first tensor
    input (positional, then keyword; inside dicts, lists and tuples too)."""
    for x in tree_flatten((tuple(replay.args), dict(replay.kwargs)))[0]:
        if isinstance(x, Tensor) and x.dim() > 0:
            return int(x.shape[0])
    return None


def per_sample_squares(
    replay: ModelReplay,
    params: Sequence[Tensor],
    cotangents: Tensor,
) -> dict[int, Tensor] | None:
    """``{id(p): Σ_{n,c} (∂⟨cotangents[c, n], f(x_n)⟩/∂p)²}`` over the samples ``n`` of
    the replayed model call, or ``None`` where the replay is not the recorded function.

    ``cotangents`` ``[C, *output.shape]``: per column ``c``, the output gradients of every
    sample (sample ``n``'s slice is that sample's own column). The output's leading axis
    holds the samples, or ``m`` rows per sample, sample-major (a model that flattens its
    tokens into rows). Raises nothing: any failure of the replay (an operation ``vmap``
    cannot batch, randomness) gives ``None``.
    """
    found = _per_sample_pullbacks(replay, params, cotangents, squared=True)
    if found is None:
        return None
    return {key: value.sum(0) for key, value in found.items()}


def per_sample_gradients(
    replay: ModelReplay,
    params: Sequence[Tensor],
    cotangents: Tensor,
) -> dict[int, Tensor] | None:
    """``{id(p): [C, N, *p.shape]}``: per column ``c`` and sample ``n`` of the replayed
    model call, the gradient ``∂⟨cotangents[c, n], f(x_n)⟩/∂p`` of that sample alone; or
    ``None`` where the replay is not the recorded function.

    ``cotangents`` as for :func:`per_sample_squares`. The cost is one replayed forward
    pass and one backward pass per column of each sample: linear in the batch, where
    backpropagating every sample's columns through the whole batch's graph is quadratic.
    """
    found = _per_sample_pullbacks(replay, params, cotangents, squared=False)
    if found is None:
        return None
    return {key: value.transpose(0, 1) for key, value in found.items()}


def _per_sample_pullbacks(
    replay: ModelReplay,
    params: Sequence[Tensor],
    cotangents: Tensor,
    squared: bool,
) -> dict[int, Tensor] | None:
    """Per sample ``n`` (leading axis): ``Σ_c g_{c,n}²`` (``squared``) or the gradients
    ``g_{c,n}`` stacked ``[C, *p.shape]`` of :func:`per_sample_gradients`; ``None`` where
    the replay fails or is not the recorded function."""
    model, output = replay.model, replay.output
    if not replayable(model):
        return None
    places = _locations(model, params)
    n = sample_count(replay)
    if places is None or n is None or cotangents.shape[1:] != output.shape:
        return None
    if output.dim() == 0 or output.shape[0] % n:
        return None
    locations, others = places
    per_sample = (output.shape[0] // n, *output.shape[1:])
    cotangents = cotangents.reshape(cotangents.shape[0], n, *per_sample)

    def batched(x: Any) -> bool:
        return isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == n

    inputs = (tuple(replay.args), dict(replay.kwargs))
    leaves, spec = tree_flatten(inputs)
    flags = [batched(x) for x in leaves]
    if not any(flags):
        return None
    in_dims = tree_unflatten([0 if f else None for f in flags], spec)
    primals = {str(id(p)): p.detach() for p in params}
    sizes = sum(p.numel() for p in params) + output[0].numel()
    step = max(1, _CHUNK_ELEMENTS // max(sizes * n, 1))
    cotangents = cotangents.to(output.dtype)
    pull = _squared_pullbacks if squared else _pullbacks

    def one_sample(sample: tuple[tuple[Any, ...], dict[str, Any]], cot: Tensor) -> Any:
        # the sample's inputs with a batch axis of one, as the model expects
        parts, _ = tree_flatten(sample)
        args, kwargs = tree_unflatten(
            [x.unsqueeze(0) if f else x for x, f in zip(parts, flags)], spec
        )

        def forward(p: dict[str, Tensor]) -> Tensor:
            # every use of a parameter takes the primal (the gradients of its uses add up)
            where = {path: p[str(key)] for path, key in locations.items()} | others
            out = torch.func.functional_call(model, where, args, kwargs, tie_weights=False)
            if not isinstance(out, Tensor):
                raise TypeError("the model output is not a tensor")
            return out.reshape(per_sample)

        out, pullback = torch.func.vjp(forward, primals)[:2]
        found: dict[str, Tensor] | None = None
        for start in range(0, cot.shape[0], step):
            part = pull(pullback, cot[start : start + step])
            if found is None:
                found = part
            elif squared:
                found = {k: found[k] + part[k] for k in part}
            else:
                found = {k: torch.cat([found[k], part[k]]) for k in part}
        return out, found

    try:
        # grad mode on: some kernels (mkldnn's LSTM) keep what their backward needs only then
        with warnings.catch_warnings(), torch.enable_grad(), batchable_recurrences(model):
            warnings.filterwarnings("ignore", message="There is a performance drop")
            try:  # all samples in one batched replay
                outs, totals = torch.func.vmap(one_sample, in_dims=(in_dims, 1))(inputs, cotangents)
            except Exception:  # an operation vmap cannot batch (e.g. some RNN kernels)
                outs_list: list[Tensor] = []
                parts: list[dict[str, Tensor]] = []
                for i in range(n):
                    sample = tree_unflatten([x[i] if f else x for x, f in zip(leaves, flags)], spec)
                    out, part = one_sample(sample, cotangents[:, i])
                    outs_list.append(out)
                    parts.append(part)
                outs = torch.stack(outs_list)
                totals = {k: torch.stack([part[k] for part in parts]) for k in parts[0]}
    except Exception:  # any failure means: not replayable, take the exact path
        return None
    reference = output.detach().reshape(n, *per_sample)
    recurrences = any(isinstance(m, nn.RNNBase) for m in model.modules())
    if outs.shape != reference.shape or not _same(outs, reference, recurrences):
        return None
    return {id(p): totals[str(id(p))] for p in params}


#: The forward methods :func:`batchable_recurrences` replaces (not a subclass's own).
_RECURRENT_FORWARDS = (nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward)


@contextmanager
def batchable_recurrences(model: nn.Module) -> Iterator[list[nn.RNNBase]]:
    """Inside: every ``nn.RNN``/``nn.LSTM``/``nn.GRU`` of ``model`` computes its forward
    pass with plain torch operations (:func:`~curvlab.extraction.recurrent.unrolled_forward`,
    the same function), which ``torch.func.vmap`` batches over the samples; PyTorch's fused
    kernels have no batching rule, so ``vmap`` would run them one sample at a time.

    Left as they are: a module with dropout between its layers in training mode (random;
    the replay then fails its check against the recorded output), a subclass that
    overrides ``forward``, a module whose ``forward`` was replaced on the instance. Yields
    the modules replaced; each gets its own ``forward`` back on exit.
    """
    replaced = [
        m
        for m in dict.fromkeys(model.modules())
        if isinstance(m, nn.RNNBase)
        and type(m).forward in _RECURRENT_FORWARDS
        and "forward" not in m.__dict__
        and not (m.training and m.dropout > 0 and m.num_layers > 1)
    ]
    try:
        for m in replaced:
            m.forward = partial(unrolled_forward, m)
        yield replaced
    finally:
        for m in replaced:
            m.__dict__.pop("forward", None)


def _pullbacks(pullback: Any, cotangents: Tensor) -> dict[str, Tensor]:
    """``pullback(cotangents[c])`` stacked over the columns ``c`` per parameter name:
    batched, or one at a time where ``vmap`` cannot batch the backward."""
    if len(cotangents) == 1:  # one column (a sampled label): no batching to do
        (grad,) = pullback(cotangents[0])
        return {k: g.unsqueeze(0) for k, g in grad.items()}
    try:
        (grads,) = torch.func.vmap(pullback)(cotangents)
        return dict(grads)
    except Exception:
        columns = [pullback(column)[0] for column in cotangents]
        return {k: torch.stack([grad[k] for grad in columns]) for k in columns[0]}


def _squared_pullbacks(pullback: Any, cotangents: Tensor) -> dict[str, Tensor]:
    """``Σ_c (pullback(cotangents[c]))²`` per parameter name: batched over the columns,
    or one at a time where ``vmap`` cannot batch the backward."""
    if len(cotangents) == 1:  # one column (a sampled label): no batching to do
        (grad,) = pullback(cotangents[0])
        return {k: g.square() for k, g in grad.items()}
    try:
        (grads,) = torch.func.vmap(pullback)(cotangents)
        return {k: g.square().sum(0) for k, g in grads.items()}
    except Exception:
        total: dict[str, Tensor] = {}
        for column in cotangents:
            (grad,) = pullback(column)
            total = {
                k: total[k] + g.square() if k in total else g.square() for k, g in grad.items()
            }
        return total


def _same(replayed: Tensor, recorded: Tensor, recurrences: bool = False) -> bool:
    """Equal up to the rounding of a different (per-sample) evaluation order; with
    ``recurrences`` (the model has a recurrent module, whose steps carry the rounding
    forward), up to :data:`~curvlab.extraction.recurrent.RECURRENCE_TOLERANCE`."""
    if recurrences:
        tol = RECURRENCE_TOLERANCE.get(recorded.dtype, 1e-3)
    else:
        tol = 1e-10 if recorded.dtype == torch.float64 else 1e-4
    scale = float(recorded.abs().max()) if recorded.numel() else 0.0
    return bool(torch.allclose(replayed.to(recorded.dtype), recorded, rtol=tol, atol=tol * scale))


__all__ = [
    "ModelReplay",
    "batchable_recurrences",
    "only_through",
    "per_sample_gradients",
    "per_sample_squares",
    "replayable",
    "sample_count",
]
