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
    replayed: list[int] = []
    original = hooks._replayed_squares

    def counting(*args, **kwargs):
        found = original(*args, **kwargs)
        replayed.append(found is not None)
        return found

    monkeypatch.setattr(hooks, "_replayed_squares", counting)
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
