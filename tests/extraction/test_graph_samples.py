"""Per-sample gradients read off the recorded graph (``curvlab.extraction.graph_samples``).

The diagonal of parameters without a layer rule (a tied embedding/head weight, the head's
bias, a raw position parameter, every parameter of ``DiagonalFisher``) comes from the
recorded graph: matrix products and embeddings from the inputs autograd saved, other
uses by a masked backward from the nearest batched outputs. The numbers are those of the
dense float64 ``torch.func`` references (exact, empirical; mean and sum reductions; token
rows ``[N·T, V]``; ignored targets; a padding index), with neither a replay of the model
nor a backward pass per loss row; for ``"mc"`` they equal the replay's on the same draws.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.extraction import graph_samples, hooks
from tests import reference_any as ref
from tests.curvature.test_right_numbers import _in_order, _setup
from tests.zoo import case

DTYPE = torch.float64
# tied weights, raw position parameters, token rows, attention, plain layers
SERVED = ("gpt_char", "gpt_char_tied", "transformer_plain", "mlp", "mixer")


def _with_reduction(loss_fn: nn.Module, reduction: str) -> nn.Module:
    loss_fn.reduction = reduction
    return loss_fn


def _reference_diagonal(fisher_type: str, model, loss_fn, x, y, c) -> Tensor:
    build = ref.ggn if fisher_type == "exact" else ref.empirical_fisher
    return torch.diagonal(_in_order(build(model, loss_fn, x, y), c, model))


def _count_other_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every answer of the replay and every per-row backward to parameters."""
    used: list[str] = []
    replayed, rows = hooks._replayed_squares, hooks._row_chunks

    def replay(*args, **kwargs):
        used.append("replay")
        return replayed(*args, **kwargs)

    def row_chunks(outputs, inputs, columns, valid, group=None):
        if group is None and any(isinstance(t, nn.Parameter) for t in inputs):
            used.append("rows")
        return rows(outputs, inputs, columns, valid, group)

    monkeypatch.setattr(hooks, "_replayed_squares", replay)
    monkeypatch.setattr(hooks, "_row_chunks", row_chunks)
    return used


class PaddedTied(nn.Module):
    """Tokens with a padding index, the embedding tied to a head with a bias, a raw
    position parameter, a LayerNorm and a hidden ``nn.Linear`` without bias."""

    def __init__(self, vocab: int = 6, d: int = 4, t: int = 3) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(0.2 * torch.randn(t, d))
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        h = self.tok(idx) + self.pos[: idx.shape[1]]
        h = h + torch.tanh(self.mix(self.norm(h)))
        return self.head(h).reshape(-1, self.head.out_features)


def _padded_setup() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = PaddedTied().to(DTYPE)
    x = torch.randint(0, 6, (5, 3))
    x[0, 2] = x[3, 0] = 0  # padding tokens
    y = torch.randint(0, 6, (15,))
    y[4] = y[9] = -100  # ignored rows
    return model, nn.CrossEntropyLoss(), x, y


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
@pytest.mark.parametrize("name", SERVED)
def test_graph_diagonal_is_exact_without_replay_or_row_passes(
    name, fisher_type, reduction, monkeypatch
):
    model, loss_fn, x, y = _setup(case(name))
    loss_fn = _with_reduction(loss_fn, reduction)
    used = _count_other_paths(monkeypatch)
    c = curvlab.DiagonalFisher(model, loss_fn, fisher_type=fisher_type, engine="hooks")
    c.update(x, y)
    expected = _reference_diagonal(fisher_type, model, loss_fn, x, y, c)
    torch.testing.assert_close(c.diagonal(), expected, rtol=1e-8, atol=1e-12)
    assert not used, f"the graph should have served every parameter, not {used}"


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_padding_index_tied_head_and_ignored_rows_are_exact(fisher_type, monkeypatch):
    model, loss_fn, x, y = _padded_setup()
    used = _count_other_paths(monkeypatch)
    c = curvlab.DiagonalFisher(model, loss_fn, fisher_type=fisher_type, engine="hooks")
    c.update(x, y)
    expected = _reference_diagonal(fisher_type, model, loss_fn, x, y, c)
    torch.testing.assert_close(c.diagonal(), expected, rtol=1e-8, atol=1e-12)
    assert not used


@pytest.mark.parametrize("fisher_type", ["exact", "mc"])
@pytest.mark.parametrize("name", ["gpt_char_tied", "padded"])
def test_kfac_diagonal_blocks_match_the_diagonal_fisher(name, fisher_type, monkeypatch):
    """K-FAC's diagonal blocks (tied weight, head bias, position parameter) take their
    per-sample gradients from the Kronecker layers' own backward pass."""
    model, loss_fn, x, y = _padded_setup() if name == "padded" else _setup(case(name))
    used = _count_other_paths(monkeypatch)
    kfac = curvlab.KFAC(model, loss_fn, fisher_type=fisher_type)
    torch.manual_seed(1)
    kfac.update(x, y)
    assert not used
    diagonal = curvlab.DiagonalFisher(model, loss_fn, fisher_type=fisher_type, engine="hooks")
    torch.manual_seed(1)  # the same draws: the diagonal blocks' columns are the same
    diagonal.update(x, y)
    kinds = kfac.coverage()
    sizes = [p.numel() for p in diagonal.params]
    want = dict(zip(map(id, diagonal.params), diagonal.diagonal().split(sizes)))
    got = kfac.diagonal().split([p.numel() for p in kfac.params])
    checked = 0
    for p, d, kind in zip(kfac.params, got, kinds.values()):
        if kind == "diagonal":
            torch.testing.assert_close(d, want[id(p)], rtol=1e-8, atol=1e-14)
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", ["gpt_char_tied", "transformer_plain", "padded"])
def test_mc_squares_equal_the_replays_on_the_same_draws(name, reduction, monkeypatch):
    model, loss_fn, x, y = _padded_setup() if name == "padded" else _setup(case(name))
    loss_fn = _with_reduction(loss_fn, reduction)
    graph = curvlab.DiagonalFisher(model, loss_fn, fisher_type="mc", mc_samples=3, engine="hooks")
    torch.manual_seed(2)
    graph.update(x, y)
    monkeypatch.setattr(hooks, "_graph_plan", lambda *args: None)
    used = _count_other_paths(monkeypatch)
    replay = curvlab.DiagonalFisher(model, loss_fn, fisher_type="mc", mc_samples=3, engine="hooks")
    torch.manual_seed(2)
    replay.update(x, y)
    assert used == ["replay"]
    torch.testing.assert_close(graph.diagonal(), replay.diagonal(), rtol=1e-10, atol=1e-14)


def test_a_position_parameter_with_as_many_positions_as_samples_is_looked_past():
    """``pos[:T]`` is ``[T, D]`` with ``T = N``: its slice looks batched, the probe finds
    every sample's rows there, and the plan takes the sum with the embeddings instead."""
    model, loss_fn, x, y = _setup(case("gpt_char"))
    assert x.shape[0] == x.shape[1]
    out = model(x)
    call = hooks.LossCall(out, y, loss_fn(out, y), out)
    hooks._PROBED.clear()
    planned = hooks._graph_plan(call, [model.pos], None, x.shape[0])
    assert planned is not None
    (use,) = planned[0].uses[id(model.pos)]
    assert use.kind == "broadcast"  # its slice of the sum, summed over the batch
    assert [type(e.node).__name__ for e in use.edges] == ["AddBackward0"]


def test_the_probe_verdict_is_kept_per_graph_structure(monkeypatch):
    """A later batch of the same shapes takes the kept verdict without probing, and its
    numbers stay exact; a batch of another size is probed again."""
    model, loss_fn, _, _ = _setup(case("gpt_char_tied"))
    hooks._PROBED.clear()
    probes: list[int] = []
    original = hooks._rows_stay_each

    def counting(*args, **kwargs):
        probes.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(hooks, "_rows_stay_each", counting)
    # the first batch is probed twice (its position slice [T, D] with T = N is looked past)
    for seed, batch, expect in [(0, 4, 2), (1, 4, 2), (2, 3, 3)]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 7, (batch, 4), generator=g)
        y = torch.randint(0, 7, (batch * 4,), generator=g)
        c = curvlab.DiagonalFisher(model, loss_fn, engine="hooks")
        c.update(x, y)
        expected = _reference_diagonal("exact", model, loss_fn, x, y, c)
        torch.testing.assert_close(c.diagonal(), expected, rtol=1e-8, atol=1e-12)
        assert len(probes) == expect


def test_an_unserved_use_refuses_the_plan():
    """A parameter used in an operation the plan does not know and with no batched output
    above it before the loss (a scale applied to the loss rows) is not served."""
    torch.manual_seed(0)
    scale = nn.Parameter(torch.ones((), dtype=DTYPE))
    rows = nn.Linear(3, 2).to(DTYPE)(torch.randn(4, 3, dtype=DTYPE)).sum() * scale
    assert graph_samples.plan(rows.reshape(1, 1), [scale], 4) is None


def test_a_fused_lstm_kernel_is_left_to_the_replay():
    """The LSTM's fused kernel has no batching rule: a masked backward through it would run
    the whole batch once per sample (seconds on the race's row-LSTM, where the replay,
    which unrolls it, takes tens of milliseconds), so the plan refuses its weights."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    out, _ = lstm(torch.randn(5, 6, 3))
    rows = out[:, -1]
    names, stack = set(), [rows.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node.name() not in names:
            names.add(node.name())
            stack.extend(n for n, _ in node.next_functions)
    assert any("rnn" in name.lower() for name in names), names  # the fused kernel is used
    assert graph_samples.plan(rows, list(lstm.parameters()), 5) is None


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "per-sample"])
@pytest.mark.parametrize(
    "name", ["gpt_char", "gpt_char_tied", "transformer_plain", "mixer", "shared_layer", "padded"]
)
def test_weight_squares_by_either_route_are_exact(name, gram, monkeypatch):
    """The squares of a matrix product's weight from the Gram matrices of its rows' output
    gradients (``Σ_{t,s} (Σ_c g_t g_s) ⊗ (x_t x_s)``; a weight used twice has both uses'
    rows) equal the per-sample gradients' squared, and the dense reference (token rows,
    ignored targets, a padding index)."""
    model, loss_fn, x, y = _padded_setup() if name == "padded" else _setup(case(name))
    monkeypatch.setattr(graph_samples, "_gram_is_cheaper", lambda *args: gram)
    routes: list[bool] = []
    original = graph_samples._gram_route

    def spy(plan, uses, p, columns):
        found = original(plan, uses, p, columns)
        routes.append(found)
        return found

    monkeypatch.setattr(graph_samples, "_gram_route", spy)
    used = _count_other_paths(monkeypatch)
    c = curvlab.DiagonalFisher(model, loss_fn, fisher_type="exact", engine="hooks")
    c.update(x, y)
    expected = _reference_diagonal("exact", model, loss_fn, x, y, c)
    torch.testing.assert_close(c.diagonal(), expected, rtol=1e-8, atol=1e-12)
    assert not used
    assert any(routes) == gram


def test_the_gram_route_is_taken_where_it_is_cheaper():
    """Exact columns of few tokens (the real-size LM: 96 classes × 16 tokens per sample)
    take the Gram route; one sampled column of 128 tokens does not."""
    assert graph_samples._gram_is_cheaper(96 * 16, 8, 16, 256, 64)
    assert graph_samples._gram_is_cheaper(96 * 16, 8, 16, 96, 64)
    assert not graph_samples._gram_is_cheaper(1, 8, 128, 256, 64)
    assert not graph_samples._gram_is_cheaper(96 * 128, 8, 128, 256, 64)  # M² > M·D_in


class NormsAndBroadcasts(nn.Module):
    """Token rows through LayerNorms (one over the last dim, one without bias over the last
    two, one called twice) and parameters broadcast along the batch and token axes: a
    class token expanded and concatenated, a position parameter sliced and added, a
    per-channel shift subtracted with ``alpha``, a scaled offset added through a product."""

    def __init__(self, vocab: int = 6, d: int = 4, t: int = 3) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.cls = nn.Parameter(0.3 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.3 * torch.randn(t + 2, d))
        self.shift = nn.Parameter(0.3 * torch.randn(d))
        self.offset = nn.Parameter(0.3 * torch.randn(1, d))
        self.norm = nn.LayerNorm(d)
        self.block = nn.LayerNorm((t + 1, d), bias=False)
        self.twice = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        n, t = idx.shape
        h = torch.cat([self.cls.expand(n, -1, -1), self.tok(idx)], dim=1)  # [N, T + 1, D]
        h = h + self.pos[: t + 1]
        h = torch.sub(h, self.shift, alpha=2.0)
        h = self.block(torch.tanh(self.norm(h)))
        h = h + torch.tanh(self.mix(self.twice(h))) + self.offset * 3.0
        h = self.twice(h)
        return self.head(h[:, 1:]).reshape(-1, self.head.out_features)


def _norms_setup() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = NormsAndBroadcasts().to(DTYPE)
    with torch.no_grad():  # affine parameters away from their initial ones and zeros
        for m in (model.norm, model.block, model.twice):
            m.weight.add_(0.3 * torch.randn_like(m.weight))
            if m.bias is not None:
                m.bias.add_(0.3 * torch.randn_like(m.bias))
    x = torch.randint(0, 6, (5, 3))
    x[0] = torch.tensor([0, 2, 2])  # a padding token, a token twice
    x[1, 0] = 0
    y = torch.randint(0, 6, (15,))
    y[4] = y[9] = -100  # ignored rows
    return model, nn.CrossEntropyLoss(), x, y


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_layer_norms_and_broadcast_parameters_are_exact(fisher_type, reduction, monkeypatch):
    """LayerNorm weights from the normalised inputs their nodes saved (``Σ_t g_t ∘ x̂_t``),
    biases from the output gradients, and parameters broadcast onto the batch from each
    sample's slice of the output gradient summed over the broadcast dimensions, with no
    masked backward; an embedding's squares from the gradients summed per token of a
    sample (a token twice, a padding index): the dense reference's numbers."""
    model, loss_fn, x, y = _norms_setup()
    loss_fn = _with_reduction(loss_fn, reduction)
    out = model(x)
    plan = graph_samples.plan(out, list(model.parameters()), x.shape[0])
    assert plan is not None
    kinds = {
        name: sorted({u.kind for u in plan.uses[id(p)]}) for name, p in model.named_parameters()
    }
    for m in ("norm", "block", "twice"):
        assert kinds[f"{m}.weight"] == ["scale"]
    assert kinds["norm.bias"] == kinds["twice.bias"] == ["bias"]
    for name in ("cls", "pos", "shift", "offset"):
        assert kinds[name] == ["broadcast"], name
    assert len(plan.uses[id(model.twice.weight)]) == 2
    assert [u.kind for u in plan.uses[id(model.tok.weight)]] == ["embedding"]
    masked: list[int] = []
    original = graph_samples._masked_backward
    monkeypatch.setattr(
        graph_samples, "_masked_backward", lambda *a: masked.append(1) or original(*a)
    )
    used = _count_other_paths(monkeypatch)
    c = curvlab.DiagonalFisher(model, loss_fn, fisher_type=fisher_type, engine="hooks")
    c.update(x, y)
    expected = _reference_diagonal(fisher_type, model, loss_fn, x, y, c)
    torch.testing.assert_close(c.diagonal(), expected, rtol=1e-8, atol=1e-12)
    assert not used and not masked


class Scaled(nn.Module):
    """A per-channel scale multiplied onto the batch: no broadcast sum, a masked backward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lin(x) * self.scale))


def test_a_parameter_multiplied_onto_the_batch_keeps_the_masked_backward(monkeypatch):
    torch.manual_seed(0)
    model, loss_fn = Scaled().to(DTYPE), nn.CrossEntropyLoss()
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.tensor([0, 2, -100, 1, 2])
    plan = graph_samples.plan(model(x), [model.scale], 5)
    assert plan is not None
    assert [u.kind for u in plan.uses[id(model.scale)]] == ["frontier"]
    used = _count_other_paths(monkeypatch)
    c = curvlab.DiagonalFisher(model, loss_fn, fisher_type="exact", engine="hooks")
    c.update(x, y)
    expected = _reference_diagonal("exact", model, loss_fn, x, y, c)
    torch.testing.assert_close(c.diagonal(), expected, rtol=1e-8, atol=1e-12)
    assert not used


class GroupNormed(nn.Module):
    """Convolutions with GroupNorms (one without affine parameters) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.plain = nn.GroupNorm(4, 4, affine=False)
        self.head = nn.Linear(4 * 5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.norm(self.conv(x)))
        return self.head(self.plain(h).flatten(1))


def test_group_norm_weights_come_from_the_saved_statistics(monkeypatch):
    torch.manual_seed(0)
    model, loss_fn = GroupNormed().to(DTYPE), nn.CrossEntropyLoss()
    with torch.no_grad():
        model.norm.weight.add_(0.3 * torch.randn(4, dtype=DTYPE))
        model.norm.bias.add_(0.3 * torch.randn(4, dtype=DTYPE))
    x, y = torch.randn(6, 2, 5, dtype=DTYPE), torch.tensor([0, 2, -100, 1, 2, 0])
    plan = graph_samples.plan(model(x), [model.norm.weight, model.norm.bias], 6)
    assert plan is not None
    assert [u.kind for u in plan.uses[id(model.norm.weight)]] == ["channel_scale"]
    assert [u.kind for u in plan.uses[id(model.norm.bias)]] == ["channel_bias"]
    used = _count_other_paths(monkeypatch)
    c = curvlab.DiagonalFisher(model, loss_fn, fisher_type="exact", engine="hooks")
    c.update(x, y)
    expected = _reference_diagonal("exact", model, loss_fn, x, y, c)
    torch.testing.assert_close(c.diagonal(), expected, rtol=1e-8, atol=1e-12)
    assert not used


@pytest.mark.parametrize("vmap_fails", [False, True], ids=["func-vmap", "legacy-vmap"])
def test_batched_grad_equals_the_legacy_batched_backward(vmap_fails, monkeypatch):
    """The columns' gradients at tensors and node outputs (``None`` where unused) are those
    of ``is_grads_batched``, also where ``torch.func.vmap`` fails and it takes over."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=DTYPE, requires_grad=True)
    unused = torch.randn(2, dtype=DTYPE, requires_grad=True)
    h = nn.functional.gelu(nn.functional.layer_norm(x, (3,)))
    out = (h.softmax(-1) * h).masked_fill(h > 1.0, 0.0)
    edge = torch.autograd.graph.get_gradient_edge(h)
    columns = torch.randn(5, 4, 3, dtype=DTYPE)
    want = torch.autograd.grad(
        [out],
        [x, edge, unused],
        [columns],
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=True,
    )
    if vmap_fails:

        def broken(*args, **kwargs):
            raise RuntimeError("no batching rule")

        monkeypatch.setattr(torch.func, "vmap", broken)
    got = graph_samples.batched_grad([out], [x, edge, unused], [columns])
    assert got[2] is None
    for g, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["gpt_char", "mlp", "shared_layer"])
def test_weights_whose_columns_reach_one_row_take_the_rows_squares(name, monkeypatch):
    """A weight each column reaches at one row of a sample at most (every weight of an MLP;
    the head and the layers above a causal model's attention, whose rows' columns stay at
    their row) sums ``g² ⊗ x²`` over the rows; the others keep the Gram matrices or the
    per-sample gradients. Both exact."""
    model, loss_fn, x, y = _setup(case(name))
    several: list[set[int]] = []
    original = graph_samples.SquareSums.result

    def spy(self):
        several.append(set(self.several_rows))
        return original(self)

    monkeypatch.setattr(graph_samples.SquareSums, "result", spy)
    c = curvlab.DiagonalFisher(model, loss_fn, fisher_type="exact", engine="hooks")
    c.update(x, y)
    expected = _reference_diagonal("exact", model, loss_fn, x, y, c)
    torch.testing.assert_close(c.diagonal(), expected, rtol=1e-8, atol=1e-12)
    (found,) = several
    weights = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    one_row = {n for n, p in weights.items() if id(p) not in found}
    if name == "gpt_char":
        assert "head.weight" in one_row and len(one_row) < len(weights)
    elif name == "mlp":
        assert one_row == set(weights)
    else:  # the shared layer's two uses: two rows of each sample
        assert "head.weight" in one_row and "lin.weight" not in one_row
