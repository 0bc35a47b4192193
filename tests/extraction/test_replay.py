"""Per-sample gradients by a replayed forward pass (``curvlab.extraction.replay``).

The diagonal of parameters without a layer rule (raw parameters, tied weights, recurrent
weights; every parameter of ``DiagonalFisher``) comes from per-sample gradients of a
replay where the model treats its samples independently: the same numbers as the per-row
backward passes (dense float64 ``torch.func`` references), at a cost linear in the batch.
Where the replay is not the recorded function (samples that interact, dropout, a module
registered twice) the exact per-row path answers, and the model is left as it was.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.extraction import hooks
from tests import reference_any as ref
from tests.curvature.test_right_numbers import _in_order, _setup, _twice
from tests.zoo import case

DTYPE = torch.float64
# raw parameters, tied weights, recurrent weights, token rows, attention
REPLAYED = ("gpt_char", "gpt_char_tied", "lstm", "gru", "transformer_plain", "mlp", "mixer")


def _reference_diagonal(fisher_type: str, model, loss_fn, x, y, c) -> Tensor:
    build = ref.ggn if fisher_type == "exact" else ref.empirical_fisher
    return torch.diagonal(_in_order(build(model, loss_fn, x, y), c, model))


def _count_row_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the per-row backward passes to the parameters (``_row_chunks`` without a
    grouping of rows into samples)."""
    calls: list[int] = []
    original = hooks._row_chunks

    def counting(outputs, inputs, columns, valid, group=None):
        if group is None and any(isinstance(t, nn.Parameter) for t in inputs):
            calls.append(1)
        return original(outputs, inputs, columns, valid, group)

    monkeypatch.setattr(hooks, "_row_chunks", counting)
    return calls


def _answers(monkeypatch: pytest.MonkeyPatch, name: str) -> list[bool]:
    """Records, per call of ``hooks.<name>`` (a route that may decline with ``None``),
    whether it answered (``True``) or declined (``False``)."""
    answers: list[bool] = []
    original = getattr(hooks, name)

    def spying(*args, **kwargs):
        found = original(*args, **kwargs)
        answers.append(found is not None)
        return found

    monkeypatch.setattr(hooks, name, spying)
    return answers


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
@pytest.mark.parametrize("name", REPLAYED)
def test_replayed_diagonal_is_exact_without_per_row_passes(name, fisher_type, monkeypatch):
    model, loss_fn, x, y = _setup(case(name))
    rows = _count_row_passes(monkeypatch)
    c = curvlab.DiagonalFisher(model, loss_fn, fisher_type=fisher_type, engine="hooks")
    c.update(x, y)
    expected = _reference_diagonal(fisher_type, model, loss_fn, x, y, c)
    torch.testing.assert_close(c.diagonal(), expected, rtol=1e-8, atol=1e-12)
    assert not rows, "the replay should have served every parameter"


@pytest.mark.parametrize("name", ["gpt_char_tied", "lstm", "transformer_plain"])
def test_kfac_diagonal_blocks_come_from_the_replay(name, monkeypatch) -> None:
    model, loss_fn, x, y = _setup(case(name))
    rows = _count_row_passes(monkeypatch)
    kfac = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    kfac.update(x, y)
    diagonal = curvlab.DiagonalFisher(model, loss_fn, engine="hooks")
    monkeypatch.undo()
    diagonal.update(x, y)
    kinds = kfac.coverage()
    got, want = dict(zip(kfac.params, kfac.diagonal().split([p.numel() for p in kfac.params]))), {}
    start = 0
    for p in diagonal.params:
        want[id(p)] = diagonal.diagonal()[start : start + p.numel()]
        start += p.numel()
    names = dict(zip(map(id, kfac.params), kinds))
    for p, d in got.items():
        if kinds[names[id(p)]] == "diagonal":
            torch.testing.assert_close(d, want[id(p)], rtol=1e-8, atol=1e-12)
    assert not rows


class _BatchCentred(nn.Module):
    """Samples interact (the batch mean): a per-sample replay is not this function."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.b = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x)) * self.scale
        return self.b(h - h.mean(dim=0, keepdim=True))


class _DictInput(nn.Module):
    """Takes a dict batch; a raw parameter added to the input."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(0.1 * torch.randn(3))
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.b(torch.tanh(self.a(batch["x"] + self.shift) * batch["gain"]))


def test_samples_that_interact_stay_exact(monkeypatch) -> None:
    """The replay refuses a model whose samples interact; the graph's per-sample
    gradients look past the batch mean (the probe finds the rows of several samples at
    ``h * scale``) to the model output, or the per-row passes answer: exact either way."""
    torch.manual_seed(0)
    model, loss_fn = _BatchCentred().to(DTYPE), nn.CrossEntropyLoss()
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randint(0, 3, (6,))
    replayed = _answers(monkeypatch, "_replayed_squares")
    c = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    c.update(x, y)
    assert not any(replayed), "the replay is not this function"
    full = _in_order(ref.ggn(model, loss_fn, x, y), c, model)
    index = next(i for i, p in enumerate(c.params) if p is model.scale)
    start = sum(p.numel() for p in c.params[:index])
    torch.testing.assert_close(
        c.diagonal()[start : start + 4], torch.diagonal(full)[start : start + 4], rtol=1e-8, atol=0
    )


def test_dict_batches_are_replayed_per_sample(monkeypatch) -> None:
    torch.manual_seed(0)
    model, loss_fn = _DictInput().to(DTYPE), nn.CrossEntropyLoss()
    x, gain = torch.randn(5, 3, dtype=DTYPE), torch.rand(5, 1, dtype=DTYPE) + 0.5
    y = torch.randint(0, 3, (5,))
    rows = _count_row_passes(monkeypatch)
    c = curvlab.DiagonalFisher(model, loss_fn, engine="hooks")
    with c.recording():
        loss = loss_fn(model({"x": x, "gain": gain}), y)
    c.accumulate(loss)
    assert not rows

    class Flat(nn.Module):  # the same function of one tensor, for the reference
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, z: Tensor) -> Tensor:
            return self.inner({"x": z[:, :3], "gain": z[:, 3:]})

    flat = Flat()
    expected = torch.diagonal(ref.ggn(flat, loss_fn, torch.cat([x, gain], dim=1), y))
    torch.testing.assert_close(c.diagonal(), expected, rtol=1e-8, atol=1e-12)


def test_the_replay_leaves_the_model_as_it_was() -> None:
    """Parameters keep their identity and values (also a module registered twice, whose
    parameters ``functional_call`` would swap twice), no hook stays behind."""
    model, loss_fn = _twice(), nn.CrossEntropyLoss()
    x, y = torch.randn(6, 4, dtype=DTYPE), torch.randint(0, 3, (6,))
    before = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    c = curvlab.DiagonalFisher(model, loss_fn, engine="hooks")
    c.update(x, y)
    expected = torch.diagonal(_in_order(ref.ggn(model, loss_fn, x, y), c, model))
    torch.testing.assert_close(c.diagonal(), expected, rtol=1e-8, atol=1e-12)
    for (name, p, value), (name2, p2) in zip(before, model.named_parameters()):
        assert name == name2 and p is p2 and torch.equal(p.detach(), value)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_mc_diagonal_from_the_replay_is_unbiased() -> None:
    """``"mc"``: a sample's rows share its draws' gradient; averaged over many draws the
    diagonal approaches the exact one (token rows, tied weights)."""
    model, loss_fn, x, y = _setup(case("gpt_char_tied"))
    exact = curvlab.DiagonalFisher(model, loss_fn, engine="hooks")
    exact.update(x, y)
    mc = curvlab.DiagonalFisher(model, loss_fn, fisher_type="mc", mc_samples=400, engine="hooks")
    torch.manual_seed(0)
    mc.update(x, y)
    err = torch.linalg.vector_norm(mc.diagonal() - exact.diagonal())
    assert float(err / torch.linalg.vector_norm(exact.diagonal())) < 0.1


# --- recurrent modules: a batchable replay of PyTorch's fused kernels -------------------

RNN_TYPES = (nn.RNN, nn.LSTM, nn.GRU)


class _Recurrent(nn.Module):
    """A recurrent module and a linear head; ``rows="sample"``: the head on the last step
    (one loss row per sample), ``"step"``: the head on every step (``T`` rows a sample)."""

    def __init__(self, cls: type[nn.RNNBase], batch_first: bool, rows: str = "sample") -> None:
        super().__init__()
        self.batch_first, self.rows = batch_first, rows
        self.rnn = cls(3, 4, batch_first=batch_first)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        out = out if self.batch_first else out.transpose(0, 1)  # [N, T, H]
        if self.rows == "sample":
            return self.head(out[:, -1])
        return self.head(out).reshape(-1, 3)


def _recurrent_setup(cls, batch_first, rows="sample", reduction="mean", n=5, steps=4):
    torch.manual_seed(0)
    model = _Recurrent(cls, batch_first, rows).to(DTYPE)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, steps, 3, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (n if rows == "sample" else n * steps,), generator=gen)
    return model, nn.CrossEntropyLoss(reduction=reduction), x, y


def _count_replays(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Per call of the replay's recurrence: whether ``vmap`` batched it over the samples
    (a batched tensor), not one sample at a time."""
    from torch._C._functorch import get_unwrapped, is_batchedtensor, is_functorch_wrapped_tensor

    from curvlab.extraction import replay

    def batched(t: Tensor) -> bool:  # a vmap level among its functorch wrappers
        while is_functorch_wrapped_tensor(t):
            if is_batchedtensor(t):
                return True
            t = get_unwrapped(t)
        return False

    calls: list[bool] = []
    original = replay.unrolled_forward

    def counting(rnn, input, hx=None):
        calls.append(batched(input))
        return original(rnn, input, hx)

    monkeypatch.setattr(replay, "unrolled_forward", counting)
    return calls


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher_type", ["exact", "empirical", "mc"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cls", RNN_TYPES)
def test_recurrent_diagonal_is_replayed_batched_and_exact(
    cls, batch_first, fisher_type, reduction, monkeypatch
) -> None:
    """The diagonal of every parameter of an RNN/LSTM/GRU model comes from one replay
    batched over the samples (no per-row pass, no sample-by-sample recurrence): the float64
    Fisher's diagonal for ``"exact"``/``"empirical"``, and for ``"mc"`` (sampled columns) the
    per-row backward passes through the recorded graph with the same draws."""
    model, loss_fn, x, y = _recurrent_setup(cls, batch_first, reduction=reduction)
    c = curvlab.DiagonalFisher(model, loss_fn, fisher_type=fisher_type, engine="hooks")
    rows, replays = _count_row_passes(monkeypatch), _count_replays(monkeypatch)
    torch.manual_seed(3)
    c.update(x, y)
    monkeypatch.undo()
    assert not rows and replays and all(replays)
    if fisher_type == "mc":
        monkeypatch.setattr(hooks, "_replayed_squares", lambda *args: None)
        per_row = curvlab.DiagonalFisher(model, loss_fn, fisher_type="mc", engine="hooks")
        torch.manual_seed(3)
        per_row.update(x, y)
        expected = per_row.diagonal()
    else:
        expected = _reference_diagonal(fisher_type, model, loss_fn, x, y, c)
    torch.testing.assert_close(c.diagonal(), expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
@pytest.mark.parametrize("cls", RNN_TYPES)
def test_recurrent_token_rows_and_kfac_blocks_from_the_batched_replay(
    cls, fisher_type, monkeypatch
) -> None:
    """A head on every step (``T`` loss rows a sample): ``KFAC``'s diagonal blocks of the
    recurrent weights (its default ``recurrent="diagonal"``) are the float64 Fisher's
    diagonal, from the batched replay."""
    model, loss_fn, x, y = _recurrent_setup(cls, True, rows="step")
    kfac = curvlab.KFAC(model, loss_fn, fisher_type=fisher_type)
    rows, replays = _count_row_passes(monkeypatch), _count_replays(monkeypatch)
    kfac.update(x, y)
    monkeypatch.undo()
    assert not rows and replays and all(replays)
    expected = _reference_diagonal(fisher_type, model, loss_fn, x, y, kfac)
    sizes = [p.numel() for p in kfac.params]
    kinds = kfac.coverage()
    names = {id(p): name for name, p in model.named_parameters()}
    diagonal = [
        (got, want)
        for p, got, want in zip(kfac.params, kfac.diagonal().split(sizes), expected.split(sizes))
        if kinds[names[id(p)]] == "diagonal"
    ]
    assert len(diagonal) == 4
    for got, want in diagonal:
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


def _state(cls, layers_dirs: int, batch: int | None, size: int, cell: int):
    gen = torch.Generator().manual_seed(5)
    shape = (layers_dirs, size) if batch is None else (layers_dirs, batch, size)
    h = torch.randn(*shape, generator=gen, dtype=DTYPE)
    if cls is not nn.LSTM:
        return h
    return h, torch.randn(*shape[:-1], cell, generator=gen, dtype=DTYPE)


def _flat(result) -> Tensor:
    out, state = result
    states = state if isinstance(state, tuple) else (state,)
    return torch.cat([t.reshape(-1) for t in (out, *states)])


#: (module type, options) pairs: several layers, both directions, no biases, relu, proj_size
UNROLLED_CASES = [
    *((cls, {}) for cls in RNN_TYPES),
    *((cls, {"num_layers": 2}) for cls in RNN_TYPES),
    *((cls, {"bidirectional": True}) for cls in RNN_TYPES),
    *((cls, {"num_layers": 2, "bidirectional": True, "bias": False}) for cls in RNN_TYPES),
    (nn.RNN, {"nonlinearity": "relu"}),
    (nn.LSTM, {"proj_size": 2}),
    (nn.LSTM, {"proj_size": 2, "num_layers": 2, "bidirectional": True}),
]


@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(("cls", "options"), UNROLLED_CASES)
def test_unrolled_forward_is_the_module(cls, options, batch_first, initial_state) -> None:
    """``unrolled_forward`` returns what the module returns (batched and unbatched input,
    with and without ``hx``), and its gradients with respect to the input, the initial
    state and every parameter are the module's (float64)."""
    from curvlab.extraction.recurrent import unrolled_forward

    torch.manual_seed(0)
    rnn = cls(3, 4, batch_first=batch_first, **options).to(DTYPE)
    dirs = 2 if rnn.bidirectional else 1
    out_size = rnn.proj_size or 4
    for batch in (5, None):
        shape = (6, 3) if batch is None else ((batch, 6, 3) if batch_first else (6, batch, 3))
        x = torch.randn(*shape, dtype=DTYPE, requires_grad=True)
        hx = _state(cls, rnn.num_layers * dirs, batch, out_size, 4) if initial_state else None
        leaves = [x, *(() if hx is None else hx if isinstance(hx, tuple) else (hx,))]
        for t in leaves[1:]:
            t.requires_grad_(True)
        mine, theirs = _flat(unrolled_forward(rnn, x, hx)), _flat(rnn(x, hx))
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
        cotangent = torch.randn_like(theirs)
        wrt = [*leaves, *rnn.parameters()]
        for a, b in zip(
            torch.autograd.grad(mine, wrt, cotangent), torch.autograd.grad(theirs, wrt, cotangent)
        ):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", RNN_TYPES)
def test_per_sample_gradients_of_a_recurrent_model_under_vmap(cls) -> None:
    """``per_sample_gradients`` of a recurrent model: each sample's gradient on its own,
    the module's ``torch.func.grad`` per sample as the reference."""
    from curvlab.extraction.replay import ModelReplay, per_sample_gradients

    model, _, x, _ = _recurrent_setup(cls, False)
    out = model(x)
    cotangents = torch.randn(2, *out.shape, dtype=DTYPE)
    params = list(model.parameters())
    found = per_sample_gradients(ModelReplay(model, (x,), out), params, cotangents)
    assert found is not None
    names = [name for name, _ in model.named_parameters()]
    for n in range(x.shape[0]):
        for c in range(2):

            def value(p: dict[str, Tensor], n: int = n, c: int = c) -> Tensor:
                f = torch.func.functional_call(model, p, (x[n : n + 1],))
                return (f[0] * cotangents[c, n]).sum()

            grads = torch.func.grad(value)({k: v.detach() for k, v in zip(names, params)})
            for name, p in zip(names, params):
                torch.testing.assert_close(found[id(p)][c, n], grads[name], rtol=1e-10, atol=1e-12)


def test_batchable_recurrences_replaces_only_the_plain_modules_and_restores_them() -> None:
    """Replaced inside: the plain recurrent modules; left alone: a subclass with its own
    ``forward``, a module whose instance ``forward`` was replaced, an LSTM with dropout
    between layers in training mode. Every ``forward`` is the class's again on exit."""
    from curvlab.extraction.replay import batchable_recurrences

    class Own(nn.GRU):
        def forward(self, input, hx=None):  # type: ignore[override]
            return super().forward(input, hx)

    plain, own, patched = nn.LSTM(3, 4), Own(3, 4), nn.RNN(3, 4)
    dropout = nn.LSTM(3, 4, num_layers=2, dropout=0.5)
    patched.forward = patched.forward  # an instance attribute
    model = nn.ModuleList([plain, own, patched, dropout, plain])
    with batchable_recurrences(model) as replaced:
        assert replaced == [plain]
        assert "forward" in plain.__dict__
    assert "forward" not in plain.__dict__ and "forward" in patched.__dict__
    dropout.eval()
    with batchable_recurrences(model) as replaced:
        assert replaced == [plain, dropout]


def test_unrolled_forward_rejects_what_it_does_not_cover() -> None:
    from torch.nn.utils.rnn import pack_padded_sequence

    from curvlab.extraction.recurrent import unrolled_forward

    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True)
    packed = pack_padded_sequence(torch.randn(2, 5, 3), [5, 3], batch_first=True)
    with pytest.raises(ValueError, match=r"LSTM.*PackedSequence"):
        unrolled_forward(lstm, packed)
    with pytest.raises(ValueError, match=r"LSTM.*dropout=0\.5"):
        unrolled_forward(lstm, torch.randn(2, 5, 3))
