"""Dense factor rows (``ExactFisher``, ``BlockDiagonal``, ``EmpiricalFisher``) from
per-sample gradients of a replayed model call.

Where the loss rows stay in their samples and the model call replays, the hooks engine
forms each row's gradient from per-sample gradients (``_replayed_rows``, linear in the
batch); elsewhere it backpropagates every row's columns through the whole batch
(``_row_chunks``, quadratic in the rows). Both must give the Fisher of the float64
``torch.func`` references (``tests/reference_any.py``), whose models emit ``[N_rows, C]``:
the models here emit extra axes (per pixel ``[N, C, H, W]``, per token ``[N, T, V]``,
per position ``[N, T, D]``), so the reference gets the same network with its positions
flattened into rows inside ``forward``.

Each test also checks which path answered: the replay (``per_sample_gradients`` gave the
rows, no per-row backward pass reached the parameters) or the per-row fallback.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.extraction import hooks
from tests import reference_any as ref
from tests.curvature.test_right_numbers import _in_order
from tests.extraction.test_replay import _answers, _BatchCentred, _count_row_passes

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

DTYPE = torch.float64
FISHER_TYPES = ("exact", "mc", "empirical")


class _CausalTokens(nn.Module):
    """Token ids ``[N, T]`` to logits ``[N, T, V]``; each token's logits depend on the
    earlier tokens of its sequence (a running mean), so a sample's rows share gradients."""

    def __init__(self, vocab: int = 5, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.3 * torch.randn(6, width))  # a raw parameter
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.embed(idx) + self.pos[: idx.shape[1]]
        steps = torch.arange(1, idx.shape[1] + 1, dtype=h.dtype).unsqueeze(-1)
        context = h.cumsum(dim=1) / steps
        return self.head(torch.tanh(self.mix(context)) + h)


class _NoTransformsScale(torch.autograd.Function):
    """``x · s`` as an old-style ``autograd.Function`` (no ``setup_context``): autograd
    runs it, :mod:`torch.func` transforms refuse it."""

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x, s = ctx.saved_tensors
        return grad * s, (grad * x).sum_to_size(s.shape)


class _Untransformable(nn.Module):
    """A per-position regressor through an operation :mod:`torch.func` cannot run
    (``plain=False``), or the same function in plain operations (for the reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 4)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.b = nn.Linear(4, 3)
        self.plain = False

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        scaled = h * self.scale if self.plain else _NoTransformsScale.apply(h, self.scale)
        return self.b(scaled)


class _DataDependent(nn.Module):
    """A per-position regressor with ``.item()`` control flow on the batch's values, which
    ``vmap`` cannot batch; replayed sample by sample it takes other branches than the
    recorded batch did."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if x.sum().item() > 0:  # decided on the whole batch
            h = 2.0 * h
        return self.b(h)


@dataclass
class _Case:
    """A model, its loss and a batch; the reference's ``[N_rows, C]`` model (the same
    parameters) and its targets per row."""

    model: nn.Module
    loss_fn: nn.Module
    x: Tensor
    y: Tensor
    reference_model: nn.Module
    reference_y: Tensor
    #: the loss of a batch as the curvature records it
    loss_of: Callable[[nn.Module, nn.Module, Tensor, Tensor], Tensor]


def _plain_loss(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return loss_fn(model(x), y)


def _token_loss(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return loss_fn(model(x).flatten(0, 1), y.flatten())


def _make(name: str, reduction: str, ignore: bool) -> _Case:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "pixels":  # [N, 3, 4, 4] per-pixel logits under CrossEntropyLoss
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 1))
        x = torch.randn(3, 2, 4, 4, generator=gen, dtype=DTYPE)
        y = torch.randint(0, 3, (3, 4, 4), generator=gen)
        if ignore:
            y[0, 1:3, 2] = -100
            y[2, 0, :] = -100
        loss_fn, model = nn.CrossEntropyLoss(reduction=reduction), model.to(DTYPE)
        return _Case(
            model, loss_fn, x, y, ref.RowsInForward(model, True), y.reshape(-1), _plain_loss
        )
    if name == "tokens":  # [N, T, V] logits, flattened to rows for the loss
        model = _CausalTokens().to(DTYPE)
        x = torch.randint(0, 5, (3, 6), generator=gen)
        y = torch.randint(0, 5, (3, 6), generator=gen)
        if ignore:
            y[1, 4:] = -100
            y[0, 0] = -100
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        return _Case(
            model, loss_fn, x, y, ref.RowsInForward(model, False), y.reshape(-1), _token_loss
        )
    assert name == "regressor" and not ignore  # [N, T, 3] under MSELoss
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
    x = torch.randn(3, 5, 2, generator=gen, dtype=DTYPE)
    y = torch.randn(3, 5, 3, generator=gen, dtype=DTYPE)
    loss_fn = nn.MSELoss(reduction=reduction)
    return _Case(
        model, loss_fn, x, y, ref.RowsInForward(model, False), y.reshape(-1, 3), _plain_loss
    )


CASES = [
    (name, reduction, ignore)
    for name in ("pixels", "tokens", "regressor")
    for reduction in ("mean", "sum")
    for ignore in ((False, True) if name != "regressor" else (False,))
]


def _backends(fisher_type: str) -> list[tuple[str, dict[str, object]]]:
    """The dense backends of ``fisher_type`` (``ExactFisher`` has no empirical type; that
    is ``EmpiricalFisher``) and their options."""
    found: list[tuple[str, dict[str, object]]] = [
        ("block_diagonal", {"fisher_type": fisher_type}),
        ("empirical_fisher", {})
        if fisher_type == "empirical"
        else ("exact_fisher", {"fisher_type": fisher_type}),
    ]
    if fisher_type == "mc":
        for _, options in found:
            options["mc_samples"] = 3
    return found


def _accumulate(c: curvlab.Curvature, case: _Case) -> None:
    with c.recording():
        loss = case.loss_of(case.model, case.loss_fn, case.x, case.y)
    c.accumulate(loss)


def _layer_mask(c: curvlab.Curvature) -> Tensor:
    """The layer blocks of a ``BlockDiagonal`` in ``c.params``' order."""
    mask = torch.zeros(c.num_params, c.num_params, dtype=torch.bool)
    start = 0
    for layer in c.layers:
        mask[start : start + layer.numel, start : start + layer.numel] = True
        start += layer.numel
    assert start == c.num_params
    return mask


def _close(actual: Tensor, expected: Tensor) -> None:
    atol = 1e-10 * max(float(expected.abs().max()), 1e-12)
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=atol)


def _spy_replay(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per call of ``per_sample_gradients`` by the dense rows, whether it gave
    the rows (``True``) or declined (``None`` result: ``False``)."""
    return _answers(monkeypatch, "per_sample_gradients")


def _without_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hooks, "_replayed_rows", lambda *args: None)


@pytest.mark.parametrize("fisher_type", FISHER_TYPES)
@pytest.mark.parametrize(("name", "reduction", "ignore"), CASES)
def test_replayed_rows_give_the_reference_fisher(
    name: str, reduction: str, ignore: bool, fisher_type: str, monkeypatch
) -> None:
    case = _make(name, reduction, ignore)
    if fisher_type != "mc":
        build = ref.ggn if fisher_type == "exact" else ref.empirical_fisher
        full = build(case.reference_model, case.loss_fn, case.x, case.reference_y)
    for backend, options in _backends(fisher_type):
        with monkeypatch.context() as patch:
            row_passes, replays = _count_row_passes(patch), _spy_replay(patch)
            torch.manual_seed(5)
            c = curvlab.make(backend, case.model, case.loss_fn, engine="hooks", **options)
            _accumulate(c, case)
            got = c.to_dense()
        assert replays and all(replays), f"{backend}: the replay should give the rows"
        assert not row_passes, f"{backend}: no per-row backward pass should reach the params"
        if fisher_type == "mc":
            # the same draws through the per-row passes of the whole batch
            with monkeypatch.context() as patch:
                _without_replay(patch)
                row_passes = _count_row_passes(patch)
                torch.manual_seed(5)
                fallback = curvlab.make(
                    backend, case.model, case.loss_fn, engine="hooks", **options
                )
                _accumulate(fallback, case)
            assert row_passes
            _close(got, fallback.to_dense())
            continue
        expected = _in_order(full, c, case.model)
        if backend == "block_diagonal":
            expected = expected * _layer_mask(c)
        _close(got, expected)


@pytest.mark.parametrize("name", ["pixels", "tokens"])
def test_replayed_mc_rows_estimate_the_reference_fisher(name: str, monkeypatch) -> None:
    """``"mc"``: with many draws the replayed rows' Fisher approaches the exact one (the
    draws are random, so the test above pins them to the per-row passes' with the same
    draws; this one pins their distribution)."""
    case = _make(name, "mean", True)
    replays = _spy_replay(monkeypatch)
    torch.manual_seed(0)
    c = curvlab.ExactFisher(case.model, case.loss_fn, fisher_type="mc", mc_samples=200)
    _accumulate(c, case)
    assert replays and all(replays)
    full = ref.ggn(case.reference_model, case.loss_fn, case.x, case.reference_y)
    expected = _in_order(full, c, case.model)
    error = torch.linalg.matrix_norm(c.to_dense() - expected) / torch.linalg.matrix_norm(expected)
    assert float(error) < 0.1  # 0.04 here; the error falls like 1/sqrt(mc_samples)


class _Shifted(nn.Module):
    """``inner`` with its output rows moved to the next sample (``roll`` over the batch):
    the reference's model for a loss taken on the rolled output."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x).roll(1, dims=0)


def _shifted_loss(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return loss_fn(model(x).roll(1, dims=0), y)


def _fallback_case(name: str) -> _Case:
    """A model whose rows the replay cannot give, its loss and a batch."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    if name == "batchnorm_train":  # batch statistics couple the samples
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Conv2d(3, 3, 1)
        ).to(DTYPE)
        x = torch.randn(3, 2, 4, 4, generator=gen, dtype=DTYPE)
        y = torch.randint(0, 3, (3, 4, 4), generator=gen)
        loss_fn = nn.CrossEntropyLoss()
        return _Case(
            model, loss_fn, x, y, ref.RowsInForward(model, True), y.reshape(-1), _plain_loss
        )
    if name in ("batch_mean", "rows_of_other_samples"):
        model = _BatchCentred().to(DTYPE) if name == "batch_mean" else _CausalFree().to(DTYPE)
        x = torch.randn(5, 3, generator=gen, dtype=DTYPE)
        y = torch.randint(0, 3, (5,), generator=gen)
        loss_fn = nn.CrossEntropyLoss()
        if name == "batch_mean":  # the model mixes its samples (a batch mean)
            return _Case(model, loss_fn, x, y, model, y, _plain_loss)
        # each loss row depends on another sample of the model output
        return _Case(model, loss_fn, x, y, _Shifted(model), y, _shifted_loss)
    # per-position regressors [N, T, 3] under MSELoss
    x = torch.randn(4, 3, 2, generator=gen, dtype=DTYPE)
    y = torch.randn(4, 3, 3, generator=gen, dtype=DTYPE)
    loss_fn = nn.MSELoss()
    if name == "untransformable":
        model = _Untransformable().to(DTYPE)
        plain = copy.deepcopy(model)
        plain.plain = True
        return _Case(
            model, loss_fn, x, y, ref.RowsInForward(plain, False), y.reshape(-1, 3), _plain_loss
        )
    model = _DataDependent().to(DTYPE)
    x[0] = x[0].abs() + 5.0  # the batch's sum is positive, the other samples' negative
    x[1:] = -x[1:].abs() - 0.1
    return _Case(
        model, loss_fn, x, y, ref.RowsInForward(model, False), y.reshape(-1, 3), _plain_loss
    )


class _CausalFree(nn.Module):
    """A plain classifier ``[N, 3]`` to logits ``[N, 3]`` with a raw parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.b = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)) * self.gain)


FALLBACKS = (
    "batchnorm_train",
    "batch_mean",
    "rows_of_other_samples",
    "untransformable",
    "data_dependent",
)


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
@pytest.mark.parametrize("name", FALLBACKS)
def test_rows_the_replay_cannot_give_come_from_the_exact_per_row_passes(
    name: str, fisher_type: str, monkeypatch
) -> None:
    case = _fallback_case(name)
    build = ref.ggn if fisher_type == "exact" else ref.empirical_fisher
    full = build(case.reference_model, case.loss_fn, case.x, case.reference_y)
    for backend, options in _backends(fisher_type):
        with monkeypatch.context() as patch:
            row_passes, replays = _count_row_passes(patch), _spy_replay(patch)
            c = curvlab.make(backend, case.model, case.loss_fn, engine="hooks", **options)
            _accumulate(c, case)
            got = c.to_dense()
        assert row_passes, f"{backend}: the per-row passes must answer"
        assert not any(replays)
        expected = _in_order(full, c, case.model)
        if backend == "block_diagonal":
            expected = expected * _layer_mask(c)
        _close(got, expected)
