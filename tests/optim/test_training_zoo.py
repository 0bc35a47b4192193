"""Training every zoo model with curvature, with the defaults (issue: "train any model").

Each optimizer takes 15 steps on one fixed zoo batch; the loss must fall and every
parameter and buffer stay finite. The zoo (``tests/zoo.py``) holds train-mode BatchNorm,
``nn.TransformerEncoderLayer`` (fused attention), LSTM/GRU, a U-Net, tied weights,
shared layers and ignored rows.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import curvlab
from tests.zoo import ZOO, ZooCase

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

STEPS = 15


def _setup(case: ZooCase) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    x, y = case.make_batch(torch.Generator().manual_seed(0))
    return case.make_model(), case.loss_fn(), x, y


def _assert_trained(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, start: float):
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    assert final < start, f"the loss rose from {start:.4g} to {final:.4g}"
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{name} is not finite"


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_kfac_optimizer_defaults_train_every_zoo_model(case: ZooCase) -> None:
    model, loss_fn, x, y = _setup(case)
    opt = curvlab.KFACOptimizer(model, loss_fn)
    start = float(opt.step(lambda: loss_fn(model(x), y)))
    for _ in range(STEPS - 1):
        opt.step(lambda: loss_fn(model(x), y))
    _assert_trained(model, loss_fn, x, y, start)


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", [curvlab.KFAC, curvlab.KFC])
def test_the_documented_loop_with_defaults_trains_every_zoo_model(backend, case: ZooCase) -> None:
    """``NaturalGradient(backend(model, loss_fn), optimizer=opt)`` beside SGD's usual
    ``lr=0.1, momentum=0.9``, nothing tuned."""
    model, loss_fn, x, y = _setup(case)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    precond = curvlab.NaturalGradient(backend(model, loss_fn), optimizer=opt)
    with torch.no_grad():
        start = float(loss_fn(model(x), y))
    for _ in range(STEPS):
        opt.zero_grad()
        precond.backward(loss_fn(model(x), y))
        precond.step()
        opt.step()
    _assert_trained(model, loss_fn, x, y, start)


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_levenberg_marquardt_closure_trains_every_zoo_model(case: ZooCase) -> None:
    """``NaturalGradient`` with Levenberg–Marquardt damping: its ``ρ`` re-evaluates the
    closure and needs exact curvature products on every architecture."""
    model, loss_fn, x, y = _setup(case)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lm = curvlab.LevenbergMarquardt(initial=0.1, interval=1)
    precond = curvlab.NaturalGradient(curvlab.KFC(model, loss_fn), damping=lm, optimizer=opt)
    with torch.no_grad():
        start = float(loss_fn(model(x), y))
    for _ in range(STEPS):
        opt.zero_grad()
        precond.backward(loss_fn(model(x), y))
        precond.step(lambda: loss_fn(model(x), y))
        opt.step()
    assert lm.value != 0.1  # ρ was measured and λ adapted
    _assert_trained(model, loss_fn, x, y, start)


class _KeywordModel(nn.Module):
    """Called as ``model(**batch, scale=...)``, as Hugging Face-style loops do."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor, z: Tensor, scale: float = 1.0) -> Tensor:
        return self.out(torch.tanh(self.a(x) + self.b(z) * scale))


@pytest.mark.parametrize("name", curvlab.available())
def test_keyword_and_dict_batches_train(name: str) -> None:
    torch.manual_seed(0)
    model, loss_fn = _KeywordModel(), nn.CrossEntropyLoss()
    batch = {"x": torch.randn(16, 3), "z": torch.randn(16, 2)}
    y = torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    precond = curvlab.NaturalGradient(curvlab.make(name, model, loss_fn), optimizer=opt)
    with torch.no_grad():
        start = float(loss_fn(model(**batch, scale=0.5), y))
    for _ in range(STEPS):
        opt.zero_grad()
        precond.backward(loss_fn(model(**batch, scale=0.5), y))
        precond.step()
        opt.step()
    with torch.no_grad():
        assert float(loss_fn(model(**batch, scale=0.5), y)) < start


def test_kfac_optimizer_takes_keyword_batches() -> None:
    torch.manual_seed(0)
    model, loss_fn = _KeywordModel(), nn.CrossEntropyLoss()
    batch = {"x": torch.randn(16, 3), "z": torch.randn(16, 2)}
    y = torch.randint(0, 3, (16,))
    opt = curvlab.KFACOptimizer(model, loss_fn)
    first = float(opt.step(lambda: loss_fn(model(**batch, scale=0.5), y)))
    for _ in range(STEPS - 1):
        opt.step(lambda: loss_fn(model(**batch, scale=0.5), y))
    with torch.no_grad():
        assert float(loss_fn(model(**batch, scale=0.5), y)) < first


@pytest.mark.parametrize("orthogonalize", [True, "mix"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet_bn_train", "gpt_char", "lstm"])
def test_kfac_optimizer_with_orthogonalized_directions_trains(name: str, orthogonalize) -> None:
    """Polar directions, alone or beside the proposals (``"mix"``: a BatchNorm layer's
    polar direction is its proposal, a singular model the pseudo-inverse handles)."""
    from tests.zoo import case

    model, loss_fn, x, y = _setup(case(name))
    opt = curvlab.KFACOptimizer(model, loss_fn, orthogonalize=orthogonalize)
    start = float(opt.step(lambda: loss_fn(model(x), y)))
    for _ in range(STEPS - 1):
        opt.step(lambda: loss_fn(model(x), y))
    _assert_trained(model, loss_fn, x, y, start)
