"""``curvlab.optim.quadratic``: exact GGN products by reverse-over-reverse, against the
dense exact Fisher on the model zoo, and a re-evaluation without side effects."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.optim.quadratic import CapturedCall, evaluate_capturing, ggn_gram
from tests.cases import CASES
from tests.zoo import ZOO, ZooCase

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def _vectors(params: list[nn.Parameter], k: int, seed: int = 3) -> list[list[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params] for _ in range(k)]


def _expected(dense: Tensor, vectors: list[list[Tensor]]) -> Tensor:
    stacked = torch.stack([torch.cat([t.flatten() for t in v]) for v in vectors])
    return stacked @ dense @ stacked.T


def _assert_gram(gram: Tensor, expected: Tensor) -> None:
    atol = 1e-12 * float(expected.abs().max())
    torch.testing.assert_close(gram, expected, rtol=1e-10, atol=atol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ggn_gram_matches_the_dense_exact_fisher(case) -> None:
    model, loss_fn = case.build()
    x, y = case.data(n=5)
    exact = curvlab.ExactFisher(model, loss_fn)  # extends the model: hooks must be suspended
    exact.update(x, y)
    vectors = _vectors(exact.params, 3)
    _, call = evaluate_capturing(model, loss_fn, lambda: loss_fn(model(x), y), "test")
    gram = ggn_gram(model, loss_fn, call, exact.params, vectors)
    _assert_gram(gram, _expected(exact.to_dense(), vectors))


@pytest.mark.parametrize("k", [2, 5], ids=["one-pass-each", "batched"])
@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_zoo_quadratic_model_equals_exact_fisher(case: ZooCase, k: int) -> None:
    """``vᵀFv`` of the quadratic model is ``ExactFisher``'s on every zoo model (float64),
    including fused attention, RNNs, train-mode BatchNorm and ignored rows; with a pass
    per vector and with one batched pass for many (a per-layer model's vectors)."""
    model, loss_fn = case.make_model(), case.loss_fn()
    x, y = case.make_batch(torch.Generator().manual_seed(0))
    buffers = [b.clone() for b in model.buffers()]
    exact = curvlab.ExactFisher(model, loss_fn)
    exact.update(x, y)
    for b, saved in zip(model.buffers(), buffers):  # the reference's forward is undone
        b.copy_(saved)
    vectors = _vectors(exact.params, k)
    _, call = evaluate_capturing(model, loss_fn, lambda: loss_fn(model(x), y), "test")
    before = [b.clone() for b in model.buffers()]
    gram = ggn_gram(model, loss_fn, call, exact.params, vectors)
    _assert_gram(gram, _expected(exact.to_dense(), vectors))
    for b, saved in zip(model.buffers(), before):  # BatchNorm statistics untouched
        assert torch.equal(b, saved)


class _DictModel(nn.Module):
    """Takes a dict batch and a keyword argument, as ``model(**batch)`` users do."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, batch: dict[str, Tensor], *, scale: Tensor) -> Tensor:
        return self.out(torch.tanh(self.a(batch["x"]) + self.b(batch["z"]) * scale))


def test_kwargs_and_dict_batches_are_captured_whole() -> None:
    torch.manual_seed(0)
    model = _DictModel().double()
    loss_fn = nn.CrossEntropyLoss()
    batch = {"x": torch.randn(6, 3, dtype=torch.float64), "z": torch.randn(6, 2).double()}
    scale = torch.tensor(0.5, dtype=torch.float64)  # a 0-d tensor: never sliced
    y = torch.randint(0, 3, (6,))
    params = list(model.parameters())
    loss, call = evaluate_capturing(
        model, loss_fn, lambda: loss_fn(model(batch, scale=scale), y), "test"
    )
    assert call.batch_size == 6 and loss.ndim == 0
    vectors = _vectors(params, 2)

    def dense(x: dict[str, Tensor], targets: Tensor) -> Tensor:
        def f(*ps: Tensor) -> Tensor:
            names = [n for n, _ in model.named_parameters()]
            out = torch.func.functional_call(model, dict(zip(names, ps)), (x,), {"scale": scale})
            return out

        jac = torch.autograd.functional.jacobian(f, tuple(p.detach() for p in params))
        J = torch.cat([j.reshape(len(targets) * 3, -1) for j in jac], dim=1)
        p = f(*params).softmax(-1).detach()
        H = torch.block_diag(*[torch.diag(r) - torch.outer(r, r) for r in p]) / len(targets)
        return J.T @ H @ J

    _assert_gram(
        ggn_gram(model, loss_fn, call, params, vectors), _expected(dense(batch, y), vectors)
    )
    first = {k: v[:4] for k, v in batch.items()}
    _assert_gram(
        ggn_gram(model, loss_fn, call, params, vectors, num_samples=4),
        _expected(dense(first, y[:4]), vectors),
    )


def test_ignored_rows_are_not_counted() -> None:
    """``ignore_index`` rows are no part of the loss, so none of its curvature."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    loss_fn = nn.CrossEntropyLoss(ignore_index=-1)
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    y[[1, 4, 7]] = -1
    keep = y != -1
    params = list(model.parameters())
    vectors = _vectors(params, 2)
    _, full = evaluate_capturing(model, loss_fn, lambda: loss_fn(model(x), y), "test")
    _, kept = evaluate_capturing(model, loss_fn, lambda: loss_fn(model(x[keep]), y[keep]), "test")
    _assert_gram(
        ggn_gram(model, loss_fn, full, params, vectors),
        ggn_gram(model, loss_fn, kept, params, vectors),
    )


@pytest.mark.parametrize("layout", ["tokens", "pixels"])
def test_outputs_with_extra_axes(layout: str) -> None:
    """``[N, C, T]`` (per token, classes on dim 1 as CrossEntropyLoss takes them) and
    ``[N, C, H, W]`` (per pixel) outputs: their rows are the positions."""
    torch.manual_seed(0)
    if layout == "tokens":
        model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 1))
        x, y = torch.randn(3, 2, 5), torch.randint(0, 3, (3, 5))
    else:
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 1))
        x, y = torch.randn(3, 2, 4, 4), torch.randint(0, 3, (3, 4, 4))
    model, x = model.double(), x.double()
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    vectors = _vectors(params, 2)
    _, call = evaluate_capturing(model, loss_fn, lambda: loss_fn(model(x), y), "test")
    gram = ggn_gram(model, loss_fn, call, params, vectors)

    class Rows(nn.Module):  # the same model with its positions flattened into rows
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, inputs: Tensor) -> Tensor:
            out = self.inner(inputs)
            return out.movedim(1, -1).reshape(-1, out.shape[1])

    flat = Rows()
    exact = curvlab.ExactFisher(flat, loss_fn)
    exact.update(x, y.reshape(-1))
    _assert_gram(gram, _expected(exact.to_dense(), vectors))


def test_dropout_masks_and_random_stream() -> None:
    """The re-evaluation sees the closure's dropout masks and leaves the stream alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    loss_fn = nn.MSELoss()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    vectors = _vectors(params, 1)
    state = torch.get_rng_state()
    _, call = evaluate_capturing(model, loss_fn, lambda: loss_fn(model(x), y), "test")
    after_closure = torch.get_rng_state()
    gram = ggn_gram(model, loss_fn, call, params, vectors)
    assert torch.equal(torch.get_rng_state(), after_closure)  # not advanced

    def squared_jvp() -> Tensor:  # MSE(mean): vᵀGv = 2/numel · ‖Jv‖², one forward
        (_, jv) = torch.autograd.functional.jvp(
            lambda *ps: torch.func.functional_call(model, dict(zip(names, ps)), (x,)),
            tuple(p.detach() for p in params),
            tuple(vectors[0]),
        )
        return 2.0 / y.numel() * jv.square().sum()

    torch.set_rng_state(state)  # the closure's masks
    torch.testing.assert_close(gram[0, 0], squared_jvp(), rtol=1e-10, atol=0.0)
    assert not torch.allclose(gram[0, 0], squared_jvp())  # other masks: another number


def test_capture_errors() -> None:
    model, loss_fn = CASES[0].build()
    x, y = CASES[0].data()
    with pytest.raises(RuntimeError, match="test: the closure did not call the model"):
        evaluate_capturing(model, loss_fn, lambda: torch.tensor(0.0), "test")
    with pytest.raises(RuntimeError, match="did not call the loss function"):
        evaluate_capturing(model, loss_fn, lambda: model(x).sum(), "test")
    _, call = evaluate_capturing(model, loss_fn, lambda: loss_fn(model(x), y), "test")
    assert isinstance(call, CapturedCall) and call.subset(10**6) is call
