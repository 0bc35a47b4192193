"""Per-time-step statistics of ``nn.RNN``/``nn.LSTM``/``nn.GRU`` for Kronecker factors
(Martens, Ba & Johnson 2018; concepts/recurrent.md).

A recurrent layer ``l`` in direction ``d`` applies two affine maps at every time step ``t``:
the input-to-hidden map ``i_t = W_ih x_t + b_ih`` and the hidden-to-hidden map
``h'_t = W_hh h_{t-1} + b_hh`` (``[gates·H]`` each, the gates stacked in PyTorch's order:
LSTM ``i, f, g, o``; GRU ``r, z, n``). Each map is a weight shared over the time steps,
:class:`RecurrentAffine`, and gets a Kronecker block from

* its inputs ``ā_t = [x_t, 1]`` (or ``[h_{t-1}, 1]``; the 1 only with a bias), and
* the gradients ``g_t`` of the loss columns with respect to its output at step ``t`` (all
  gates as one output block). For ``nn.RNN`` and ``nn.LSTM`` both maps feed the same gate
  pre-activations, so ``g_t`` is the same for both; for ``nn.GRU`` the hidden map's
  ``n``-gate rows are multiplied by the reset gate first, so its ``g_t`` differs there.

PyTorch's fused kernels do not expose these quantities, so :func:`replay` runs the
recorded call again with plain torch operations (an unrolled cell with PyTorch's
equations) and backpropagates the columns of the module's outputs (``output``, ``h_n``
and, for an LSTM, ``c_n``) through it. :func:`statistics` turns them into the sums of the
independent-time-steps factors and the lag-one sums of the series model.

:func:`unrolled_forward` is the module's whole forward pass with plain torch operations
(the same function, gradients included), for the per-sample replay of
:mod:`curvlab.extraction.replay`: ``torch.func.vmap`` batches it over the samples, where
it runs the fused kernels one sample at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.extraction import layers
from curvlab.extraction.requests import KroneckerBatch, RecurrentBatch

__all__ = [
    "RECURRENCE_TOLERANCE",
    "RECURRENT_TYPES",
    "RecurrentAffine",
    "Replay",
    "affine_maps",
    "check_recurrent",
    "replay",
    "statistics",
    "unrolled_forward",
]

#: The recurrent modules whose affine maps get Kronecker blocks.
RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.RNN, nn.LSTM, nn.GRU)

#: How closely the replay must reproduce the recorded outputs (relative to their largest
#: entry), by the outputs' dtype: rounding of a different evaluation order only, which the
#: recurrence carries from step to step. In float32, an LSTM of the optimizer race
#: (docs/benchmarks.md; 28 steps, weights of norm ~60 after training) gave its fused
#: kernel 1.2e-4 from the float64 function and the unrolled one 5e-5 (1.3e-4 apart);
#: dropout or another function differs by far more.
RECURRENCE_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}


class RecurrentAffine(nn.Module):
    """One affine map of a recurrent module as a layer of its own: ``weight`` ``[gates·H,
    D]`` and ``bias`` ``[gates·H]`` are the module's ``weight_{kind}_l{layer}{_reverse}``
    and ``bias_{kind}_l{layer}{_reverse}`` (the same tensors, not copies).

    It is never called and is not part of the model: a view that lets the Kronecker
    machinery treat the map like an ``nn.Linear`` applied at every time step.
    """

    rnn: nn.RNNBase  # the module it belongs to (a reference, not a submodule)

    def __init__(self, rnn: nn.RNNBase, layer: int, direction: int, kind: str) -> None:
        super().__init__()
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        self.__dict__["rnn"] = rnn  # a reference, not a submodule
        self.layer, self.direction, self.kind = layer, direction, kind
        self.suffix = suffix
        self.weight = getattr(rnn, f"weight_{kind}{suffix}")
        self.bias = getattr(rnn, f"bias_{kind}{suffix}") if rnn.bias else None

    @property
    def block(self) -> str:
        """``"ih_l0"``, ``"hh_l1_reverse"``, …: the suffix of its parameters' names."""
        return f"{self.kind}{self.suffix}"

    def parameter_names(self) -> tuple[str, ...]:
        names = (f"weight_{self.block}",)
        return names + ((f"bias_{self.block}",) if self.bias is not None else ())

    def forward(self, *args: Any) -> Tensor:
        raise RuntimeError("RecurrentAffine is a view of a recurrent module's map; not callable.")


layers.register_kronecker_rule(
    RecurrentAffine,
    layers.KroneckerRule(layers._linear_patches, layers._linear_columns, layers._check_linear),
)


def check_recurrent(module: nn.Module, name: str, owner: str) -> None:
    """Raise a ``ValueError`` naming the module for a configuration the replay does not
    cover: ``proj_size > 0`` (an LSTM with projections)."""
    if getattr(module, "proj_size", 0):
        raise ValueError(
            f"{owner}: module '{name}' ({type(module).__name__}) has proj_size="
            f"{module.proj_size}; Kronecker blocks for recurrent layers cover LSTMs without "
            "projections only. Pass recurrent='diagonal' or exclude=['" + name + "']."
        )


def affine_maps(rnn: nn.RNNBase) -> list[RecurrentAffine]:
    """The module's affine maps in its parameter order (per layer and direction: ``ih``,
    then ``hh``)."""
    dirs = 2 if rnn.bidirectional else 1
    return [
        RecurrentAffine(rnn, layer, d, kind)
        for layer in range(rnn.num_layers)
        for d in range(dirs)
        for kind in ("ih", "hh")
    ]


@dataclass
class Replay:
    """One replayed call. Per map ``block`` (``"ih_l0"`` …): ``inputs[block]`` ``[N, T, D]``
    (time in the sequence's order) and ``pre[block]``: the map's outputs per time step, a
    list of ``T`` tensors ``[N, gates·H]`` that the replayed outputs depend on.
    ``outputs``: the replayed ``(output, h_n[, c_n])``, ``output`` batch-first."""

    inputs: dict[str, Tensor]
    pre: dict[str, list[Tensor]]
    outputs: tuple[Tensor, ...]


def _cell(mode: str, i_t: Tensor, hh_t: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, ...]:
    """One step of PyTorch's cell from the two maps' outputs: ``(h_t, c_t)``."""
    if mode == "RNN_TANH":
        return torch.tanh(i_t + hh_t), None  # type: ignore[return-value]
    if mode == "RNN_RELU":
        return torch.relu(i_t + hh_t), None  # type: ignore[return-value]
    if mode == "LSTM":
        i, f, g, o = (i_t + hh_t).chunk(4, dim=-1)
        assert c is not None
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    ir, iz, in_ = i_t.chunk(3, dim=-1)
    hr, hz, hn = hh_t.chunk(3, dim=-1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return (1.0 - z) * n + z * h, None  # type: ignore[return-value]


def replay(rnn: nn.RNNBase, x: Tensor, hx: Any, name: str = "rnn") -> Replay:
    """Run ``rnn`` on ``x`` (its recorded input, as passed) and ``hx`` (``None``, ``h_0`` or
    ``(h_0, c_0)``) with plain torch operations, with the weights detached.

    Raises a ``ValueError`` naming the module for a ``PackedSequence`` or unbatched input.
    """
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(
            f"module '{name}' ({type(rnn).__name__}): Kronecker blocks for recurrent layers "
            "need a batched [N, T, D] (batch_first) or [T, N, D] input tensor, not a "
            "PackedSequence or an unbatched sequence. Pass recurrent='diagonal'."
        )
    mode = rnn.mode
    seq = x.detach() if rnn.batch_first else x.detach().transpose(0, 1)  # [N, T, D]
    n, steps = seq.shape[:2]
    dirs = 2 if rnn.bidirectional else 1
    hidden = rnn.hidden_size
    h0 = c0 = None
    if isinstance(hx, tuple):
        h0, c0 = hx[0].detach(), hx[1].detach()
    elif isinstance(hx, Tensor):
        h0 = hx.detach()
    zeros = seq.new_zeros(rnn.num_layers * dirs, n, hidden)
    h0 = zeros if h0 is None else h0
    c0 = zeros if (c0 is None and mode == "LSTM") else c0
    inputs: dict[str, Tensor] = {}
    pre: dict[str, list[Tensor]] = {}
    last_h, last_c = [], []
    layer_in = seq
    for layer in range(rnn.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih = getattr(rnn, f"weight_ih{sfx}").detach()
            w_hh = getattr(rnn, f"weight_hh{sfx}").detach()
            b_ih = getattr(rnn, f"bias_ih{sfx}").detach() if rnn.bias else None
            b_hh = getattr(rnn, f"bias_hh{sfx}").detach() if rnn.bias else None
            inp = layer_in
            i_all = torch.nn.functional.linear(inp, w_ih, b_ih)  # [N, T, gH]
            if not i_all.requires_grad:  # the first layer: its maps' outputs are the leaves
                i_all.requires_grad_(True)
            i_steps = list(i_all.unbind(1))
            h = h0[layer * dirs + d]
            c = None if c0 is None else c0[layer * dirs + d]
            order = range(steps - 1, -1, -1) if d else range(steps)
            h_prev: list[Tensor] = [h] * steps
            hh_steps: list[Tensor] = [h] * steps
            h_out: list[Tensor] = [h] * steps
            for t in order:
                h_prev[t] = h
                hh_t = torch.nn.functional.linear(h, w_hh, b_hh)
                hh_steps[t] = hh_t if hh_t.requires_grad else hh_t.requires_grad_(True)
                h, c = _cell(mode, i_steps[t], hh_steps[t], h, c)
                h_out[t] = h
            inputs[f"ih{sfx}"] = inp.detach()
            inputs[f"hh{sfx}"] = torch.stack(h_prev, dim=1).detach()
            pre[f"ih{sfx}"] = i_steps
            pre[f"hh{sfx}"] = hh_steps
            outs.append(torch.stack(h_out, dim=1))
            last_h.append(h)
            if c is not None:
                last_c.append(c)
        layer_in = torch.cat(outs, dim=-1) if dirs > 1 else outs[0]
    outputs: tuple[Tensor, ...] = (layer_in, torch.stack(last_h))
    if mode == "LSTM":
        outputs += (torch.stack(last_c),)
    return Replay(inputs, pre, outputs)


def statistics(
    rnn: nn.RNNBase,
    x: Tensor,
    hx: Any,
    recorded: Sequence[Tensor],
    columns: Sequence[Tensor | None],
    lagged: bool,
    sample_fraction: float = 1.0,
    name: str = "rnn",
) -> dict[str, RecurrentBatch]:
    """Per affine map of ``rnn`` (by :attr:`RecurrentAffine.block`), one batch's sums.

    ``recorded``: the call's outputs ``(output, h_n[, c_n])`` as the model produced them;
    ``columns``: per output, its gradients ``[K, *output.shape]`` for the ``K`` loss
    columns (``None``: the loss does not use that output). The replay must reproduce the
    recorded outputs (else a ``ValueError`` naming the module: dropout between layers in
    training mode, say). ``lagged``: also the lag-one sums of the series model.
    ``sample_fraction``: the sums over the first ``⌈fraction·N⌉`` sequences, ``G`` rescaled
    to the whole batch.
    """
    with torch.enable_grad():
        run = replay(rnn, x, hx, name)
        out = run.outputs
        rec = [recorded[0] if rnn.batch_first else recorded[0].transpose(0, 1), *recorded[1:]]
        for mine, theirs in zip(out, rec):
            tol = RECURRENCE_TOLERANCE.get(theirs.dtype, 1e-3)
            scale = float(theirs.detach().abs().max()) if theirs.numel() else 0.0
            if mine.shape != theirs.shape or not torch.allclose(
                mine.detach().to(theirs.dtype), theirs.detach(), rtol=tol, atol=tol * scale
            ):
                raise ValueError(
                    f"module '{name}' ({type(rnn).__name__}): replaying its recurrence with "
                    "plain torch operations does not reproduce its outputs (dropout "
                    "between layers in training mode?); its Kronecker blocks cannot be "
                    "formed. Use model.eval(), dropout=0, or recurrent='diagonal'."
                )
        used = [(o, c) for o, c in zip(out, columns) if c is not None]
        blocks = list(run.pre)
        targets = [p for b in blocks for p in run.pre[b]]
        k = next((c.shape[0] for _, c in used), 0)
        if used:
            cots = []
            for o, c in used:
                c = c.to(o.dtype)
                if o is out[0] and not rnn.batch_first:
                    c = c.transpose(1, 2)  # [K, T, N, ...] -> [K, N, T, ...]
                cots.append(c)
            grads: tuple[Tensor | None, ...] = torch.autograd.grad(
                [o for o, _ in used],
                targets,
                cots,
                allow_unused=True,
                is_grads_batched=True,
            )
        else:
            grads = tuple(None for _ in targets)
    result: dict[str, RecurrentBatch] = {}
    position = 0
    with torch.no_grad():
        for block in blocks:
            steps = len(run.pre[block])
            per_step = grads[position : position + steps]
            position += steps
            ref = run.pre[block][0]
            g = torch.stack(
                [ref.new_zeros(k, *ref.shape) if s is None else s for s in per_step],
                dim=2,
            )  # [K, N, T, gH]
            a = run.inputs[block]  # [N, T, D]
            result[block] = _block_sums(rnn, block, a, g, lagged, sample_fraction)
    return result


def _block_sums(
    rnn: nn.RNNBase, block: str, a: Tensor, g: Tensor, lagged: bool, fraction: float
) -> RecurrentBatch:
    """The sums of one map: ``Σ ā ā ᵀ`` over samples and steps, ``Σ g gᵀ`` over columns,
    samples and steps, and with ``lagged`` ``Σ ā_t ā_{t+1}ᵀ`` and ``Σ g_t g_{t+1}ᵀ``."""
    a, g = layers.statistics_dtype(a), layers.statistics_dtype(g)
    n = a.shape[0]
    scale = 1.0
    if fraction < 1.0 and n > 1:
        m = max(1, math.ceil(fraction * n))
        a, g, scale = a[:m], g[:, :m], n / m
    if rnn.bias:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    steps = a.shape[1]
    flat_a = a.reshape(-1, a.shape[-1])
    flat_g = g.reshape(-1, g.shape[-1])
    kron = KroneckerBatch(
        a_sum=flat_a.T @ flat_a, count=flat_a.shape[0], g=scale * flat_g.T @ flat_g
    )
    if not lagged or steps < 2:
        zero_a = a.new_zeros(a.shape[-1], a.shape[-1])
        zero_g = g.new_zeros(g.shape[-1], g.shape[-1])
        return RecurrentBatch(kron, zero_a, zero_g, 0, a.shape[0])
    a0, a1 = a[:, :-1].reshape(-1, a.shape[-1]), a[:, 1:].reshape(-1, a.shape[-1])
    g0, g1 = g[:, :, :-1].reshape(-1, g.shape[-1]), g[:, :, 1:].reshape(-1, g.shape[-1])
    return RecurrentBatch(kron, a0.T @ a1, scale * g0.T @ g1, a0.shape[0], a.shape[0])


def unrolled_forward(rnn: nn.RNNBase, input: Any, hx: Any = None) -> tuple[Tensor, Any]:
    """``rnn(input, hx)`` computed with plain torch operations, for transforms that cannot
    batch PyTorch's fused recurrent kernels (``torch.func.vmap`` runs those one sample at
    a time): the same function as ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (PyTorch's cell
    equations; batched ``[N, T, D]``/``[T, N, D]`` or unbatched ``[T, D]`` input, several
    layers, both directions, an LSTM's ``proj_size``), returning what the module returns:
    ``(output, h_n)``, for an LSTM ``(output, (h_n, c_n))``.

    Each hidden-to-hidden map (and an LSTM's projection) is applied at every step, so its
    weight's gradient is a sum of per-step outer products. Here the states are computed
    first without a graph, and the weight enters once, through ``ā_{1:T} (W − W̄)ᵀ + b``
    (``W̄`` the detached weight: zero in value, the bias in value), while the recurrence
    runs on ``W̄``: the weight's gradient is then one ``[gH, T] @ [T, D]`` product per
    sequence, which ``vmap`` batches into one matrix product over the samples (instead of
    ``T`` outer products per sample). Gradients with respect to the inputs, the initial
    state and every parameter are those of the module.

    Raises a ``ValueError`` naming the module for a ``PackedSequence``, an input of another
    rank, or dropout between layers in training mode (random, so not this function).
    """
    owner = f"unrolled_forward: module {type(rnn).__name__}"
    if not isinstance(input, Tensor) or input.dim() not in (2, 3):
        rank = f" of rank {input.dim()}" if isinstance(input, Tensor) else ""
        raise ValueError(
            f"{owner} needs an input tensor [N, T, D]/[T, N, D] or an unbatched [T, D] one, "
            f"not {type(input).__name__}{rank} (a PackedSequence is not covered)."
        )
    if rnn.training and rnn.dropout > 0 and rnn.num_layers > 1:
        raise ValueError(
            f"{owner} has dropout={rnn.dropout} between its layers in training mode: random, "
            "not a function of its inputs."
        )
    mode = rnn.mode
    unbatched = input.dim() == 2
    seq = input.unsqueeze(0) if unbatched else (input if rnn.batch_first else input.transpose(0, 1))
    dirs = 2 if rnn.bidirectional else 1
    out_size = rnn.proj_size or rnn.hidden_size
    h0, c0 = (hx if isinstance(hx, tuple) else (hx, None)) if hx is not None else (None, None)
    if unbatched:
        h0 = None if h0 is None else h0.unsqueeze(1)
        c0 = None if c0 is None else c0.unsqueeze(1)
    layers_dirs = rnn.num_layers * dirs
    if h0 is None:
        h0 = seq.new_zeros(layers_dirs, seq.shape[0], out_size)
    if c0 is None and mode == "LSTM":
        c0 = seq.new_zeros(layers_dirs, seq.shape[0], rnn.hidden_size)
    last_h: list[Tensor] = []
    last_c: list[Tensor] = []
    layer_in = seq
    for layer in range(rnn.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            k = layer * dirs + d
            out, h, c = _unrolled_direction(
                rnn, sfx, layer_in, h0[k], None if c0 is None else c0[k], reverse=bool(d)
            )
            outs.append(out)
            last_h.append(h)
            if c is not None:
                last_c.append(c)
        layer_in = torch.cat(outs, dim=-1) if dirs > 1 else outs[0]
    h_n = torch.stack(last_h)
    output = layer_in
    if unbatched:
        output, h_n = output.squeeze(0), h_n.squeeze(1)
    elif not rnn.batch_first:
        output = output.transpose(0, 1)
    if mode != "LSTM":
        return output, h_n
    c_n = torch.stack(last_c)
    return output, (h_n, c_n.squeeze(1) if unbatched else c_n)


def _unrolled_direction(
    rnn: nn.RNNBase, sfx: str, x: Tensor, h: Tensor, c: Tensor | None, reverse: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction of :func:`unrolled_forward` on ``x`` ``[N, T, D]``: the
    output sequence ``[N, T, H_out]`` (in the sequence's order), the last ``h`` and ``c``."""
    mode = rnn.mode
    w_ih = getattr(rnn, f"weight_ih{sfx}")
    w_hh = getattr(rnn, f"weight_hh{sfx}")
    b_ih = getattr(rnn, f"bias_ih{sfx}") if rnn.bias else None
    b_hh = getattr(rnn, f"bias_hh{sfx}") if rnn.bias else None
    w_hr = getattr(rnn, f"weight_hr{sfx}") if rnn.proj_size else None
    steps = x.shape[1]
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    i_all = torch.nn.functional.linear(x, w_ih, b_ih)  # [N, T, gH]: one product over steps
    fixed_hh = w_hh.detach()
    fixed_hr = None if w_hr is None else w_hr.detach()
    # the states without a graph: the inputs of the per-step maps
    values = _recurrence(
        mode,
        i_all.detach(),
        (fixed_hh, None if b_hh is None else b_hh.detach(), None),
        (fixed_hr, None),
        (h.detach(), None if c is None else c.detach()),
        order,
    )
    # every use of W_hh and b_hh in one product: zero in value, but for the bias
    hh_all = torch.nn.functional.linear(torch.stack(values.previous, 1), w_hh - fixed_hh, b_hh)
    hr_all = None
    if w_hr is not None:
        assert fixed_hr is not None
        hr_all = torch.nn.functional.linear(torch.stack(values.unprojected, 1), w_hr - fixed_hr)
    run = _recurrence(mode, i_all, (fixed_hh, None, hh_all), (fixed_hr, hr_all), (h, c), order)
    return torch.stack(run.outputs, 1), run.h, run.c


@dataclass
class _Steps:
    """A run of :func:`_recurrence`, per step ``t`` in the sequence's order: ``previous``
    the state ``h_{t-1}`` the hidden map reads, ``unprojected`` an LSTM's ``o ⊙ tanh(c)``
    before its projection (with ``proj_size``), ``outputs`` ``h_t``; the last ``h`` and
    ``c``."""

    previous: list[Tensor]
    unprojected: list[Tensor]
    outputs: list[Tensor]
    h: Tensor
    c: Tensor | None


def _folded_cell(mode: str, gates: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """:func:`_cell` of RNN and LSTM from the sum ``gates`` of the two maps' outputs, in
    fewer operations (each costs a ``vmap`` dispatch): ``(h_t, c_t)``."""
    if mode == "RNN_TANH":
        return torch.tanh(gates), None
    if mode == "RNN_RELU":
        return torch.relu(gates), None
    assert c is not None
    size = gates.shape[-1] // 4
    input_forget, cell, out = gates.split([2 * size, size, size], dim=-1)
    i, f = torch.sigmoid(input_forget).chunk(2, dim=-1)
    c = torch.addcmul(f * c, i, torch.tanh(cell))
    return torch.sigmoid(out) * torch.tanh(c), c


def _recurrence(
    mode: str,
    i_all: Tensor,
    hidden_map: tuple[Tensor, Tensor | None, Tensor | None],
    projection: tuple[Tensor | None, Tensor | None],
    state: tuple[Tensor, Tensor | None],
    order: range,
) -> _Steps:
    """Steps of the cell over ``order``: ``i_all`` ``[N, T, gH]`` the input map's outputs;
    ``hidden_map`` ``(W_hh, b_hh, offsets [N, T, gH] or None)``: the hidden map is
    ``h W_hhᵀ + b_hh + offsets[:, t]``; ``projection`` ``(W_hr or None, offsets)``
    likewise; ``state`` ``(h_0, c_0)``."""
    w_hh, b_hh, hh_offsets = hidden_map
    w_hr, hr_offsets = projection
    h, c = state
    steps = i_all.shape[1]
    # RNN and LSTM add the two maps before the nonlinearity: the hidden map's bias and
    # offsets join the input map's outputs before the loop, a step is one addmm
    folded = mode != "GRU"
    if folded:
        for extra in (b_hh, hh_offsets):
            i_all = i_all if extra is None else i_all + extra
    # unbind, not indexing: one backward node for all the steps (each index's backward
    # would fill a whole [N, T, gH] gradient per step)
    i_steps = i_all.unbind(1)
    hh_steps = None if hh_offsets is None or folded else hh_offsets.unbind(1)
    hr_steps = None if hr_offsets is None else hr_offsets.unbind(1)
    previous: list[Tensor] = [h] * steps
    unprojected: list[Tensor] = [h] * steps
    outputs: list[Tensor] = [h] * steps
    w_hh_t = w_hh.t()
    for t in order:
        previous[t] = h
        if folded:
            h, c = _folded_cell(mode, torch.addmm(i_steps[t], h, w_hh_t), c)
        else:
            hh_t = torch.nn.functional.linear(h, w_hh, b_hh)
            if hh_steps is not None:
                hh_t = hh_t + hh_steps[t]
            h, c = _cell(mode, i_steps[t], hh_t, h, c)
        if w_hr is not None:
            unprojected[t] = h
            h = torch.nn.functional.linear(h, w_hr)
            if hr_steps is not None:
                h = h + hr_steps[t]
        outputs[t] = h
    return _Steps(previous, unprojected, outputs, h, c)
