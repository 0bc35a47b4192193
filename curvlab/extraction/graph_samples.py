"""Per-sample gradients of parameters from the recorded graph itself, without a replay.

The diagonal of the Fisher of a parameter no layer rule serves (a raw ``nn.Parameter``, a
weight tied between an embedding and an output head, the head's bias) needs the squares
of per-sample gradients. Where the parameter enters the batch through a few operations,
those gradients follow from the recorded autograd graph and the gradients at the
operations' outputs, which one batched backward pass of the loss's columns gives (it
stops there; no weight gradient is formed):

* a matrix product with the parameter as its weight (``nn.Linear``'s ``addmm``/``mm``,
  also on ``[N·T, D]`` token rows): sample ``n``'s gradient ``Σ_r g_r x_rᵀ`` over its rows,
  with ``x`` the input the graph saved; its bias: ``Σ_r g_r``;
* an embedding lookup: sample ``n``'s output gradients added into the rows of its indices;
* a LayerNorm's or GroupNorm's weight and bias (``y = x̂ ∘ w + b``): ``Σ_r g_r ∘ x̂_r``
  with ``x̂`` from the input, mean and reciprocal deviation the graph saved, and ``Σ_r g_r``;
* any other use (a position parameter broadcast onto the batch): the nearest outputs
  above it that carry the batch on their leading axis (the *frontier*). Where they add
  or expand tensors without the batch axis (``h + pos[:T]``, ``cls.expand(N, 1, D)``),
  sample ``n``'s gradient there is its slice of the output gradient summed over the
  broadcast dimensions, backpropagated to the parameter through the few operations in
  between for all samples at once; elsewhere each sample's slice of the frontier's
  gradients is backpropagated on its own (one batched backward of ``N`` masked columns).

A use of a weight tied between several operations adds up per sample before squaring.
The squares are summed over the columns by :class:`SquareSums`, for a weight used only in
matrix products from the Gram matrices of its rows' output gradients where that is
cheaper, and for an embedding per token of a sample.
The rows of each sample must reach the operations' outputs at that sample's slice only;
the caller checks it with a probe (:func:`curvlab.extraction.hooks._rows_stay`), and the
plan is refused (``None``) wherever a use is of another kind than these, the frontier is
not a clean cut between the parameter and the loss, the cut crosses a fused recurrent
kernel (no batching rule), or the masked backward would cost
more than a replay (:mod:`curvlab.extraction.replay`) of the whole model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

#: At most this many entries per per-sample chunk (columns × samples × parameter entries).
_CHUNK_ELEMENTS = 1 << 25
#: Fused recurrent kernels (``MkldnnRnnLayerBackward0``, ``CudnnRnnBackward0``, ...) have no
#: batching rule: a batched backward through them runs the whole batch's kernel once per
#: masked column (``N`` times), where the replay, which unrolls them, is linear in the batch.
_UNBATCHED_KERNELS = ("rnn",)
#: A frontier use is refused when ``N`` × its outputs' entries (the masked backward of one
#: column) exceed this; the replay, linear in the batch, is then the cheaper route.
_FRONTIER_ELEMENTS = 1 << 26


@dataclass(eq=False)
class _Use:
    """One way a parameter enters the batch. ``kind``: ``"weight"`` (``out = x @ Wᵀ``, ``x``
    the saved input ``[R', D_in]``), ``"bias"`` (added to every row of ``out``),
    ``"scale"`` (``out = x̂ ∘ w + b`` per row, ``saved`` = ``x̂``: a LayerNorm's weight),
    ``"channel_scale"``/``"channel_bias"`` (the same per channel of ``[N, C, ...]``: a
    GroupNorm's),
    ``"embedding"`` (``out = W[indices]``), ``"frontier"`` (``edges``: the nearest batched
    outputs above it), ``"broadcast"`` (a frontier whose outputs add or expand a tensor
    without the batch axis: ``operands``, per such input its edge below, ``None`` for
    the parameter itself, its factor and shape)."""

    kind: str
    edges: list[GradientEdge]
    saved: Tensor | None = None
    padding_idx: int | None = None
    operands: list[tuple[int, GradientEdge | None, float, tuple[int, ...]]] = field(
        default_factory=list
    )


@dataclass(eq=False)
class SamplePlan:
    """Where each parameter's per-sample gradients come from (module docstring)."""

    samples: int
    uses: dict[int, list[_Use]] = field(default_factory=dict)
    params: dict[int, Tensor] = field(default_factory=dict)
    edges: list[GradientEdge] = field(default_factory=list)
    #: the nodes whose outputs are frontier edges
    frontier_nodes: set[Any] = field(default_factory=set)
    #: every node of the graph, in a walk that depends on its structure alone
    order: list[Any] = field(default_factory=list)

    def signature(self) -> tuple[Any, ...]:
        """The structure of the graph (:func:`_signature`)."""
        return _signature(self.order)

    def _slot(self, edge: GradientEdge) -> int:
        for i, known in enumerate(self.edges):
            if known.node is edge.node and known.output_nr == edge.output_nr:
                return i
        self.edges.append(edge)
        return len(self.edges) - 1

    def squares(self, grads: Sequence[Tensor | None]) -> dict[int, Tensor]:
        """``{id(p): Σ_{c,n} g_{c,n}²}``: the squared per-sample gradients of the ``C``
        columns whose gradients at :attr:`edges` are ``grads`` (``[C, *edge shape]``,
        ``None`` where no row reaches an edge), summed over columns and samples."""
        sums = self.accumulator()
        sums.add(grads)
        return sums.result()

    def accumulator(self) -> SquareSums:
        """A running :meth:`squares` over several chunks of columns (:class:`SquareSums`)."""
        return SquareSums(self)

    def _weight_rows(
        self, uses: list[_Use], grads: Sequence[Tensor | None], columns: int, p: Tensor
    ) -> Tensor:
        """``[C, N, M, D_out]``: the output gradients of every row of every sample at the
        weight uses of ``p`` (``M`` = the rows of a sample over all its uses, in order;
        zeros where no loss row reaches a use)."""
        n, parts = self.samples, []
        for use in uses:
            g = grads[self._slot(use.edges[0])]
            assert use.saved is not None
            if g is None:
                g = p.new_zeros(columns, use.saved.shape[0], p.shape[0])
            parts.append(g.reshape(g.shape[0], n, -1, g.shape[-1]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _weight_inputs(self, uses: list[_Use], dtype: torch.dtype) -> Tensor:
        """``[N, M, D_in]``: the inputs of the rows of :meth:`_weight_rows`."""
        n, parts = self.samples, []
        for use in uses:
            assert use.saved is not None
            parts.append(use.saved.reshape(n, -1, use.saved.shape[-1]).to(dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _per_sample(
        self, use: _Use, p: Tensor, grads: Sequence[Tensor | None], start: int, stop: int
    ) -> Tensor | None:
        """``[C, stop − start, *p.shape]``: the use's gradients of samples ``start:stop``."""
        n = self.samples
        found = [grads[self._slot(e)] for e in use.edges]
        if all(g is None for g in found):
            return None
        if use.kind == "frontier":
            return _masked_backward(use.edges, found, p, n, start, stop)
        if use.kind == "broadcast":
            return _broadcast_backward(use, found, p, start, stop)
        (g,) = found
        assert g is not None
        c = g.shape[0]
        if use.kind in ("bias", "scale"):  # [C, n', m, *p.shape]: summed over the rows
            rows = g.reshape(c, n, -1, *p.shape)[:, start:stop]
            if use.kind == "bias":
                return rows.sum(dim=2)
            assert use.saved is not None
            x_hat = use.saved.reshape(n, -1, *p.shape)[start:stop].to(g.dtype)
            return (rows * x_hat).sum(dim=2)
        if use.kind in ("channel_bias", "channel_scale"):  # [C, n', channels, positions]
            rows = g.reshape(c, n, p.shape[0], -1)[:, start:stop]
            if use.kind == "channel_bias":
                return rows.sum(dim=-1)
            assert use.saved is not None
            x_hat = use.saved.reshape(n, p.shape[0], -1)[start:stop].to(g.dtype)
            return (rows * x_hat).sum(dim=-1)
        rows = g.reshape(c, n, -1, g.shape[-1])[:, start:stop]  # [C, n', m, D_out]
        assert use.saved is not None
        if use.kind == "weight":
            x = use.saved.reshape(n, -1, use.saved.shape[-1])[start:stop].to(g.dtype)
            return torch.einsum("cnmo,nmi->cnoi", rows, x)
        # embedding: each sample's output gradients added into the rows of its indices
        indices = use.saved.reshape(n, -1)[start:stop]  # [n', m]
        count, vocab = stop - start, p.shape[0]
        flat = indices + vocab * torch.arange(count, device=indices.device).unsqueeze(1)
        out = g.new_zeros(c, count * vocab, g.shape[-1])
        out.index_add_(1, flat.reshape(-1), rows.reshape(c, -1, g.shape[-1]))
        out = out.reshape(c, count, vocab, g.shape[-1])
        if use.padding_idx is not None:
            out[:, :, use.padding_idx] = 0
        return out


class SquareSums:
    """The squares of :meth:`SamplePlan.squares`, summed over chunks of columns.

    A weight used only in matrix products (``out = x @ Wᵀ``, its ``M`` rows per sample
    ``x_t``, output gradients ``g_{c,t}``) has the per-sample gradients
    ``G_c = Σ_t g_{c,t} x_tᵀ``, whose squares sum to
    ``Σ_c G_c² = Σ_{t,s} (Σ_c g_{c,t} ∘ g_{c,s}) ⊗ (x_t ∘ x_s)`` per sample. Where that is
    cheaper (few rows per sample against the layer's widths, many columns: ``C·M²·D_out``
    for the Gram matrices ``Σ_c g_{c,t} g_{c,s}``, kept over the chunks, and one
    ``M²·D_out·D_in`` product per sample at the end, against ``C·M·D_out·D_in`` for the
    per-sample gradients and as many entries squared), the Gram route is taken: the
    same sums, without forming a ``[D_out, D_in]`` gradient per column and sample
    (:func:`_gram_is_cheaper`). Where each column reaches one row of a sample at most
    (checked on the chunk's gradients: the layers above a causal model's last attention
    see one loss row's column at that row alone), ``G_c² = g_c² ⊗ x_t²`` sums to one
    product of the rows' squares.
    """

    def __init__(self, plan: SamplePlan) -> None:
        self.plan = plan
        self.totals: dict[int, Tensor] = {}
        #: per weight on the Gram route, ``[N, D_out, M, M]``
        self.grams: dict[int, Tensor] = {}
        self.gram_route: dict[int, bool] = {}
        #: weights some of whose columns reached several rows of a sample
        self.several_rows: set[int] = set()

    def add(self, grads: Sequence[Tensor | None]) -> None:
        """Add the squares of the columns whose gradients at the plan's edges are
        ``grads`` (as for :meth:`SamplePlan.squares`)."""
        plan = self.plan
        columns = next((g.shape[0] for g in grads if g is not None), 0)
        for key, uses in plan.uses.items():
            p = plan.params[key]
            if key not in self.gram_route:
                self.gram_route[key] = _gram_route(plan, uses, p, columns)
            if key not in self.several_rows and _weights_only(uses, p):
                if all(grads[plan._slot(u.edges[0])] is None for u in uses):
                    continue
                rows = plan._weight_rows(uses, grads, columns, p)  # [C, N, M, D_out]
                squared = rows.square()
                if int((squared.sum(dim=-1) > 0).sum(dim=2).max()) <= 1:
                    # one row per column and sample: G_c = g_c x_tᵀ, G_c² = g_c² ⊗ x_t²
                    x = plan._weight_inputs(uses, rows.dtype)  # [N, M, D_in]
                    per_row = squared.sum(dim=0).reshape(-1, rows.shape[-1])
                    square = per_row.t() @ x.square().reshape(-1, x.shape[-1])
                    self.totals[key] = square + self.totals.get(key, 0)
                    continue
                self.several_rows.add(key)
            if self.gram_route[key]:
                if all(grads[plan._slot(u.edges[0])] is None for u in uses):
                    continue
                rows = plan._weight_rows(uses, grads, columns, p)  # [C, N, M, D_out]
                # [N, D_out, C, M] with the rows of a column contiguous: a batch of
                # matrices the products take as they are (a copy with the columns moved
                # last is several times slower than this transpose of small blocks)
                per_output = rows.transpose(2, 3).contiguous().permute(1, 2, 0, 3)
                gram = per_output.transpose(-1, -2) @ per_output  # [N, D_out, M, M]
                self.grams[key] = gram + self.grams[key] if key in self.grams else gram
                continue
            if len(uses) == 1 and uses[0].kind == "embedding":
                g = grads[plan._slot(uses[0].edges[0])]
                if g is not None:
                    square = _embedding_squares(uses[0], g, p, plan.samples)
                    self.totals[key] = square + self.totals.get(key, 0)
                continue
            step = max(1, _CHUNK_ELEMENTS // max(columns * p.numel(), 1))
            for start in range(0, plan.samples, step):
                stop = min(start + step, plan.samples)
                part: Tensor | None = None
                for use in uses:
                    found = plan._per_sample(use, p, grads, start, stop)
                    if found is not None:
                        part = found if part is None else part + found
                if part is None:
                    continue
                square = part.square().sum(dim=(0, 1))
                self.totals[key] = square + self.totals[key] if key in self.totals else square

    def result(self) -> dict[int, Tensor]:
        """``{id(p): Σ g²}`` over every chunk added (parameters no row reached left out)."""
        out = dict(self.totals)
        for key, gram in self.grams.items():
            x = self.plan._weight_inputs(self.plan.uses[key], gram.dtype)  # [N, M, D_in]
            n, d_out, m, _ = gram.shape
            d_in = x.shape[-1]
            step = max(1, _CHUNK_ELEMENTS // max(m * m * d_in, 1))
            total = gram.new_zeros(d_out, d_in)
            for start in range(0, n, step):
                xs = x[start : start + step]
                pairs = (xs.unsqueeze(2) * xs.unsqueeze(1)).reshape(-1, d_in)  # [n'·M·M, D_in]
                grams = gram[start : start + step].transpose(0, 1).reshape(d_out, -1)
                total = total + grams @ pairs
            out[key] = total + out[key] if key in out else total
        return out


def _embedding_squares(use: _Use, g: Tensor, p: Tensor, samples: int) -> Tensor:
    """``Σ_{c,n} g_{c,n}²`` of an embedding's per-sample gradients (its only use): each
    sample's output gradients summed over the positions of the same token, in place of
    the token's first position, squared, and added into the token's row (``C·N·M·D``
    entries, where the per-sample gradients have ``C·N·V·D``)."""
    assert use.saved is not None
    c, width = g.shape[0], g.shape[-1]
    indices = use.saved.reshape(samples, -1)  # [N, M]
    m = indices.shape[1]
    same = indices.unsqueeze(2) == indices.unsqueeze(1)  # [N, M, M]
    first = same.to(torch.uint8).argmax(dim=2)  # the first position of each token
    offsets = m * torch.arange(samples, device=indices.device).unsqueeze(1)
    summed = g.new_zeros(c, samples * m, width)
    summed.index_add_(1, (first + offsets).reshape(-1), g.reshape(c, -1, width))
    squares = summed.square().sum(dim=0)  # [N·M, D], zero but at first positions
    total = g.new_zeros(p.shape[0], width)
    total.index_add_(0, indices.reshape(-1), squares)
    if use.padding_idx is not None:
        total[use.padding_idx] = 0
    return total


def _weights_only(uses: list[_Use], p: Tensor) -> bool:
    """Whether every use of ``p`` is a matrix product with ``p`` as its weight."""
    return (
        bool(uses)
        and p.dim() == 2
        and all(u.kind == "weight" and u.saved is not None for u in uses)
    )


def _gram_route(plan: SamplePlan, uses: list[_Use], p: Tensor, columns: int) -> bool:
    """Whether ``p``'s squares take the Gram route of :class:`SquareSums`: every use a
    matrix product with ``p`` as its weight, and that route the cheaper one."""
    if not _weights_only(uses, p):
        return False
    n = plan.samples
    rows = sum(u.saved.shape[0] for u in uses if u.saved is not None) // n
    d_out, d_in = p.shape
    return _gram_is_cheaper(columns, n, rows, d_out, d_in)


def _gram_is_cheaper(columns: int, samples: int, rows: int, d_out: int, d_in: int) -> bool:
    """The Gram route's cost (``C·N·M²·D_out`` for the Gram matrices, ``N·M²·D_out·D_in``
    once for the product with the inputs' pairs) against the per-sample gradients'
    (``C·N·M·D_out·D_in`` for the products, and squaring and summing ``C·N·D_out·D_in``
    entries, which moves memory: counted as 4 products), each within the memory of a
    chunk."""
    pairs = samples * rows * rows
    if pairs * max(d_out, d_in) > _CHUNK_ELEMENTS:
        return False
    gram = columns * pairs * d_out + pairs * d_out * d_in
    direct = columns * samples * d_out * d_in * (rows + 4)
    return gram < direct


def _masked_backward(
    edges: list[GradientEdge],
    grads: list[Tensor | None],
    p: Tensor,
    n: int,
    start: int,
    stop: int,
) -> Tensor:
    """Each sample's slice of the frontier gradients backpropagated to ``p`` on its own:
    ``[C, stop − start, *p.shape]``."""
    count = stop - start
    outputs, cotangents = [], []
    for edge, g in zip(edges, grads):
        if g is None:
            continue
        c = g.shape[0]
        mask = torch.zeros(count, n, dtype=g.dtype, device=g.device)
        own = torch.arange(count, device=g.device)
        mask[own, own + start] = 1
        per_sample = g.reshape(c, 1, n, -1) * mask.reshape(1, count, n, 1)
        outputs.append(edge)
        cotangents.append(per_sample.reshape(c * count, *g.shape[1:]))
    (found,) = batched_grad(outputs, [p], cotangents)
    if found is None:
        found = torch.zeros(cotangents[0].shape[0], *p.shape, dtype=p.dtype, device=p.device)
    return found.reshape(-1, count, *p.shape)


def batched_grad(
    outputs: Sequence[Tensor | GradientEdge],
    inputs: Sequence[Tensor | GradientEdge],
    cotangents: Sequence[Tensor],
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` of the ``K`` cotangents stacked on dim 0 of each entry of
    ``cotangents``: per input ``[K, *input shape]``, ``None`` where the outputs do not
    depend on it. The graph is kept.

    Batched by :func:`torch.func.vmap` over the backward, whose batching rules cover the
    backward kernels of GELU, LayerNorm, softmax and masked fills that the
    ``is_grads_batched`` path (the legacy ``vmap``) runs once per column; where it fails
    (an operation it cannot batch), by ``is_grads_batched``, with the same numbers."""
    outs: Any = list(outputs)
    ins: Any = list(inputs)
    unused: list[bool] = []

    def one(*column: Tensor) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(outs, ins, list(column), retain_graph=True, allow_unused=True)
        unused[:] = [g is None for g in grads]
        return tuple(column[0].new_zeros(()) if g is None else g for g in grads)

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")
            found = torch.func.vmap(one)(*cotangents)
    except Exception:  # an operation torch.func.vmap cannot batch: the legacy vmap
        return torch.autograd.grad(
            outs,
            ins,
            list(cotangents),
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    return tuple(None if u else g for g, u in zip(found, unused))


def edge_numel(edge: Tensor | GradientEdge) -> int:
    """The number of entries of a tensor or of the output a gradient edge stands for."""
    if isinstance(edge, Tensor):
        return edge.numel()
    return math.prod(_shape(edge.node, edge.output_nr) or ())


def _shape(node: Any, output_nr: int) -> tuple[int, ...] | None:
    try:
        return tuple(node._input_metadata[output_nr].shape)
    except (AttributeError, IndexError, RuntimeError, TypeError):  # nested tensors, ...
        return None


def _outputs(node: Any) -> list[GradientEdge] | None:
    """Every output of ``node`` as a gradient edge (``None`` if their shapes are unknown)."""
    try:
        count = len(node._input_metadata)
    except (AttributeError, RuntimeError, TypeError):
        return None
    return [GradientEdge(node, i) for i in range(count)]


def _parents(root: Any) -> tuple[dict[Any, list[tuple[Any, int]]], list[Any]]:
    """``({node: [(consumer, slot)]}, nodes)`` over the graph of ``root``:
    ``consumer.next_functions[slot]`` is ``node``; ``nodes`` in the order of a walk that
    depends on the graph's structure alone."""
    parents: dict[Any, list[tuple[Any, int]]] = {}
    seen: set[Any] = set()
    order: list[Any] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        order.append(node)
        for slot, (nxt, _) in enumerate(node.next_functions):
            if nxt is not None:
                parents.setdefault(nxt, []).append((node, slot))
                stack.append(nxt)
    return parents, order


def _signature(order: list[Any]) -> tuple[Any, ...]:
    """The graph's structure: per node (in ``order``) its kind, its outputs' shapes and
    which nodes it feeds on (equal for the graphs of the same model on same-shaped
    batches)."""
    index = {node: i for i, node in enumerate(order)}
    entries = []
    for node in order:
        try:
            shapes = tuple(tuple(m.shape) for m in node._input_metadata)
        except (AttributeError, RuntimeError, TypeError):
            shapes = None
        nexts = tuple(index.get(nxt, -1) for nxt, _ in node.next_functions)
        entries.append((type(node).__name__, shapes, nexts))
    return tuple(entries)


def plan(
    rows: Tensor,
    params: Sequence[Tensor],
    samples: int,
    not_batched: set[Any] | frozenset[Any] = frozenset(),
) -> SamplePlan | None:
    """Where the per-sample gradients of ``params`` come from in the graph of the loss
    rows ``rows`` (``samples`` samples on the leading axis of the batch), or ``None`` where
    one use of a parameter is not served (module docstring). Parameters the rows do not
    reach have no uses (zero gradients).

    ``not_batched``: nodes whose outputs are not taken for the batch's frontier although
    their leading size is ``samples`` (the probe found rows of several samples there)."""
    if rows.grad_fn is None or samples < 1:
        return None
    parents, order = _parents(rows.grad_fn)
    accumulators = {id(n.variable): n for n in parents if hasattr(n, "variable")}
    found = SamplePlan(samples, order=order)
    for p in params:
        key = id(p)
        found.params[key] = p
        acc = accumulators.get(key)
        if acc is None:
            continue
        uses: list[_Use] = []
        for consumer, slot in parents.get(acc, []):
            use = _known_use(consumer, slot, p, parents, samples)
            if use is None:
                cut = _frontier(acc, consumer, parents, samples, not_batched)
                if cut is None:
                    return None
                frontier, walked = cut
                operands = _broadcast_operands(frontier, acc, walked)
                if operands is None:
                    # the masked backward of one column: N × the outputs' entries
                    if samples * sum(edge_numel(e) for e in frontier) > _FRONTIER_ELEMENTS:
                        return None
                    use = _Use("frontier", frontier)
                else:
                    use = _Use("broadcast", frontier, operands=operands)
                found.frontier_nodes.update(e.node for e in frontier)
            uses.extend(use if isinstance(use, list) else [use])
        for use in uses:
            for edge in use.edges:
                found._slot(edge)
        found.uses[key] = uses
    return found


def _known_use(
    consumer: Any,
    slot: int,
    p: Tensor,
    parents: dict[Any, list[tuple[Any, int]]],
    samples: int,
) -> _Use | list[_Use] | None:
    """``p``'s use at ``consumer`` (input ``slot``) as a weight, bias or embedding, or
    ``None``."""
    name = type(consumer).__name__
    if name == "TBackward0" and p.dim() == 2:  # W.t() into matrix products
        uses = []
        for product, index in parents.get(consumer, []):
            use = _weight_use(product, index, samples)
            if use is None:
                return None
            uses.append(use)
        return uses
    if name == "AddmmBackward0" and slot == 0 and p.dim() == 1:
        if _scalar(consumer, "_saved_beta") != 1:
            return None
        edge = GradientEdge(consumer, 0)
        if not _batched_rows(edge, samples, p.shape[0]):
            return None
        return _Use("bias", [edge])
    if name == "NativeLayerNormBackward0" and slot in (1, 2):
        return _layer_norm_use(consumer, slot, p, samples)
    if name == "NativeGroupNormBackward0" and slot in (1, 2):
        return _group_norm_use(consumer, slot, p, samples)
    if name == "EmbeddingBackward0" and p.dim() == 2:
        if getattr(consumer, "_saved_sparse", True) or getattr(
            consumer, "_saved_scale_grad_by_freq", True
        ):
            return None
        indices = consumer._saved_indices
        edge = GradientEdge(consumer, 0)
        shape = _shape(consumer, 0)
        if shape is None or indices.dim() == 0 or tuple(shape[:-1]) != tuple(indices.shape):
            return None
        if indices.shape[0] % samples:
            return None
        padding = int(getattr(consumer, "_saved_padding_idx", -1))
        return _Use("embedding", [edge], indices, padding if 0 <= padding < p.shape[0] else None)
    return None


def _layer_norm_use(node: Any, slot: int, p: Tensor, samples: int) -> _Use | None:
    """``p`` as a LayerNorm's weight (``slot`` 1: ``y = x̂ ∘ w + b``, ``x̂`` from the input,
    mean and reciprocal deviation the node saved) or bias (``slot`` 2), over rows
    ``[m·N, *normalized shape]``, or ``None``."""
    edge = GradientEdge(node, 0)
    shape = _shape(node, 0)
    normalized = tuple(getattr(node, "_saved_normalized_shape", ()) or ())
    if shape is None or not normalized or tuple(p.shape) != normalized:
        return None
    if len(shape) <= len(normalized) or shape[0] % samples:
        return None
    if tuple(shape[len(shape) - len(normalized) :]) != normalized:
        return None
    if slot == 2:
        return _Use("bias", [edge])
    x = getattr(node, "_saved_input", None)
    mean = getattr(node, "_saved_result1", None)
    rstd = getattr(node, "_saved_result2", None)
    if not all(isinstance(t, Tensor) for t in (x, mean, rstd)):
        return None
    assert isinstance(x, Tensor) and isinstance(mean, Tensor) and isinstance(rstd, Tensor)
    if tuple(x.shape) != tuple(shape):
        return None
    with torch.no_grad():
        x_hat = (x.detach() - mean.detach()) * rstd.detach()
    return _Use("scale", [edge], x_hat)


def _group_norm_use(node: Any, slot: int, p: Tensor, samples: int) -> _Use | None:
    """``p`` as a GroupNorm's per-channel weight (``slot`` 1, ``x̂`` from the input and the
    per-group mean and reciprocal deviation the node saved) or bias (``slot`` 2), over
    ``[N, C, *positions]``, or ``None``."""
    edge = GradientEdge(node, 0)
    shape = _shape(node, 0)
    if shape is None or len(shape) < 2 or shape[0] != samples or p.dim() != 1:
        return None
    if shape[1] != p.shape[0]:
        return None
    if slot == 2:
        return _Use("channel_bias", [edge])
    x = getattr(node, "_saved_input", None)
    mean = getattr(node, "_saved_result1", None)
    rstd = getattr(node, "_saved_result2", None)
    groups = getattr(node, "_saved_group", None)
    if not all(isinstance(t, Tensor) for t in (x, mean, rstd)) or not isinstance(groups, int):
        return None
    assert isinstance(x, Tensor) and isinstance(mean, Tensor) and isinstance(rstd, Tensor)
    if tuple(x.shape) != tuple(shape) or mean.numel() != samples * groups:
        return None
    with torch.no_grad():
        grouped = x.detach().reshape(samples, groups, -1)
        centred = grouped - mean.detach().reshape(samples, groups, 1)
        x_hat = (centred * rstd.detach().reshape(samples, groups, 1)).reshape(x.shape)
    return _Use("channel_scale", [edge], x_hat)


def _weight_use(product: Any, index: int, samples: int) -> _Use | None:
    """``out = x @ Wᵀ`` at ``product`` (``addmm`` with ``mat2 = Wᵀ`` in slot 2, ``mm`` with
    it in slot 1), or ``None``."""
    name = type(product).__name__
    if name == "AddmmBackward0" and index == 2 and _scalar(product, "_saved_alpha") == 1:
        x = getattr(product, "_saved_mat1", None)
    elif name == "MmBackward0" and index == 1:
        x = getattr(product, "_saved_self", None)
    else:
        return None
    edge = GradientEdge(product, 0)
    if not isinstance(x, Tensor) or x.dim() != 2 or not _batched_rows(edge, samples, None):
        return None
    shape = _shape(product, 0)
    if shape is None or shape[0] != x.shape[0]:
        return None
    return _Use("weight", [edge], x.detach())


def _scalar(node: Any, name: str) -> float | None:
    value = getattr(node, name, None)
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _batched_rows(edge: GradientEdge, samples: int, width: int | None) -> bool:
    """A 2-d output ``[m·N, width]`` (rows sample-major, checked by the caller's probe)."""
    shape = _shape(edge.node, edge.output_nr)
    if shape is None or len(shape) != 2 or shape[0] % samples:
        return False
    return width is None or shape[1] == width


def _frontier(
    acc: Any,
    consumer: Any,
    parents: dict[Any, list[tuple[Any, int]]],
    samples: int,
    not_batched: set[Any] | frozenset[Any],
) -> tuple[list[GradientEdge], set[Any]] | None:
    """The nearest outputs above ``consumer`` whose leading axis is the batch (``samples``),
    as gradient edges, and the nodes walked below them; ``None`` where the walk reaches
    the loss first or a frontier output reaches the parameter again past the walked
    operations (no clean cut)."""
    walked: set[Any] = {acc}
    frontier: list[Any] = []
    stack = [consumer]
    while stack:
        node = stack.pop()
        if node in walked or node in frontier:
            continue
        outputs = _outputs(node)
        if outputs is None or _unbatched(node):
            return None
        shapes = [_shape(node, i) for i in range(len(outputs))]
        batched = all(s is not None and len(s) > 0 and s[0] == samples for s in shapes)
        if shapes and batched and node not in not_batched:
            frontier.append(node)
            continue
        walked.add(node)
        above = parents.get(node, [])
        if not above:  # the loss rows themselves, without the batch axis
            return None
        stack.extend(up for up, _ in above)
    # every path from a frontier output down to the parameter stays among the walked nodes
    for node in frontier:
        stack = [nxt for nxt, _ in node.next_functions if nxt is not None]
        seen: set[Any] = set()
        while stack:
            below = stack.pop()
            if below in seen:
                continue
            seen.add(below)
            if below is acc:
                continue
            if below not in walked and _reaches(below, acc):
                return None
            if below in walked:
                stack.extend(nxt for nxt, _ in below.next_functions if nxt is not None)
    edges = [edge for node in frontier for edge in _outputs(node) or []]
    return edges, walked


#: Frontier operations whose inputs without the batch axis take a sample's output gradient
#: summed over their broadcast dimensions: the factor of each input slot (``None``: the
#: node's saved ``alpha``, negated for a subtraction).
_BROADCASTS: dict[str, tuple[float | None, ...]] = {
    "AddBackward0": (1.0, None),
    "SubBackward0": (1.0, None),
    "ExpandBackward0": (1.0,),
}


def _broadcast_operands(
    edges: list[GradientEdge], acc: Any, walked: set[Any]
) -> list[tuple[int, GradientEdge | None, float, tuple[int, ...]]] | None:
    """Where every frontier output adds or expands tensors without the batch axis that
    lead to the parameter (``walked``): per such input ``(i, edge below, factor, shape)``
    (``i`` the frontier edge, ``None`` below for the parameter itself), else ``None``.

    Sample ``n``'s gradient at such an input is its slice of the output gradient summed
    over the dimensions the input is broadcast along, which the masked backward of
    :func:`_masked_backward` would give after ``N`` times the work."""
    found: list[tuple[int, GradientEdge | None, float, tuple[int, ...]]] = []
    for i, edge in enumerate(edges):
        node = edge.node
        factors = _BROADCASTS.get(type(node).__name__)
        out = _shape(node, edge.output_nr)
        if factors is None or out is None or not out or len(node.next_functions) != len(factors):
            return None
        for slot, (below, output_nr) in enumerate(node.next_functions):
            if below is None or (below is not acc and below not in walked):
                continue  # the batched input (the cut is clean: it does not reach the parameter)
            shape = _shape(below, output_nr)
            if shape is None or len(shape) > len(out):
                return None
            padded = (1,) * (len(out) - len(shape)) + tuple(shape)
            if padded[0] != 1 or any(a not in (1, b) for a, b in zip(padded, out)):
                return None
            factor = factors[slot]
            if factor is None:
                alpha = _scalar(node, "_saved_alpha")
                if alpha is None:
                    return None
                factor = -alpha if type(node).__name__ == "SubBackward0" else alpha
            found.append(
                (i, None if below is acc else GradientEdge(below, output_nr), factor, shape)
            )
    return found if found else None


def _broadcast_backward(
    use: _Use, grads: list[Tensor | None], p: Tensor, start: int, stop: int
) -> Tensor | None:
    """``[C, stop − start, *p.shape]``: the gradients of samples ``start:stop`` of a
    ``"broadcast"`` use (:func:`_broadcast_operands`), its inputs' per-sample gradients
    backpropagated to ``p`` through the few operations in between at once."""
    count = stop - start
    direct: Tensor | None = None
    outputs: list[GradientEdge] = []
    cotangents: list[Tensor] = []
    columns = 0
    for i, below, factor, shape in use.operands:
        g = grads[i]
        if g is None:
            continue
        columns = g.shape[0]
        part = g[:, start:stop]  # [C, n', *out[1:]]
        rest = part.shape[2:]
        padded = (1,) * (len(rest) + 1 - len(shape)) + tuple(shape)
        dims = [2 + j for j, (a, b) in enumerate(zip(padded[1:], rest)) if a == 1 and b != 1]
        if dims:
            part = part.sum(dim=dims, keepdim=True)
        part = part.reshape(columns * count, *shape)
        if factor != 1:
            part = part * factor
        if below is None:
            direct = part if direct is None else direct + part
        else:
            outputs.append(below)
            cotangents.append(part)
    if not columns:
        return None
    total = direct
    if outputs:
        (found,) = batched_grad(outputs, [p], cotangents)
        if found is not None:
            total = found if total is None else total + found
    if total is None:
        total = torch.zeros(columns * count, *p.shape, dtype=p.dtype, device=p.device)
    return total.reshape(columns, count, *p.shape)


def _unbatched(node: Any) -> bool:
    """Whether ``node``'s backward has no batching rule (``_UNBATCHED_KERNELS``)."""
    name = node.name().lower() if hasattr(node, "name") else ""
    return any(kernel in name for kernel in _UNBATCHED_KERNELS)


def _reaches(start: Any, target: Any) -> bool:
    """Whether ``target`` is below ``start`` in the graph."""
    seen: set[Any] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        if node is target:
            return True
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return False


__all__ = ["SamplePlan", "SquareSums", "batched_grad", "edge_numel", "plan"]
