"""Mixed precision and compiled models beside ``NaturalGradient``: a ``GradScaler``
overflow skips the step (as ``scaler.step`` does) and takes no curvature; a
``torch.compile``d model is refused with an error that says what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab

pytestmark = [
    pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),
]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)


@pytest.mark.parametrize("overflow", ["gradient", "loss"])
def test_an_overflowing_scaled_step_is_skipped(overflow: str) -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    precond = curvlab.NaturalGradient(
        curvlab.KFAC(model, loss_fn), optimizer=opt, grad_scaler=scaler
    )

    def train_step(inject: bool) -> None:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        handle = None
        if inject and overflow == "gradient":  # an fp16 overflow in one layer's gradient
            handle = model[0].weight.register_hook(lambda g: g * float("inf"))
        if inject and overflow == "loss":
            loss = loss * float("inf")
        precond.backward(scaler.scale(loss))
        if handle is not None:
            handle.remove()
        precond.step()
        scaler.step(opt)
        scaler.update()

    train_step(inject=False)
    assert precond.steps == 1 and precond.num_updates == 1
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    train_step(inject=True)  # no error
    assert precond.skipped_steps == 1
    assert precond.steps == 1 and precond.num_updates == 1  # no curvature taken from it
    assert scaler.get_scale() < scale  # the scaler lowered its scale
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)  # scaler.step skipped the optimizer
    train_step(inject=False)  # and training goes on
    assert precond.steps == 2 and precond.num_updates == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_scaled_step_equals_the_unscaled_one() -> None:
    """With a scaler, the natural gradient is that of the unscaled loss (it unscales
    first, so the KL clip sees true gradients) and the curvature ignores the scale."""
    results = []
    for scaled in (False, True):
        model, loss_fn = _mlp(), nn.CrossEntropyLoss()
        x, y = _batch()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=scaled)
        precond = curvlab.NaturalGradient(
            curvlab.KFAC(model, loss_fn, fisher_type="exact"),
            optimizer=opt,
            grad_scaler=scaler,
            kl_clip=1e-4,  # active: it would see 2⁸-times gradients without unscaling
        )
        opt.zero_grad()
        precond.backward(scaler.scale(loss_fn(model(x), y)))
        precond.step()
        results.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_grad_scaler_needs_the_optimizer() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="grad_scaler needs optimizer="):
        curvlab.NaturalGradient(
            curvlab.KFAC(model, loss_fn), lr=0.1, grad_scaler=torch.amp.GradScaler("cpu")
        )


def test_clipping_without_a_learning_rate_is_refused() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"need\(s\) the learning rate.*optimizer=opt"):
        curvlab.NaturalGradient(curvlab.KFAC(model, loss_fn))
    curvlab.NaturalGradient(curvlab.KFAC(model, loss_fn), kl_clip=None)  # no clip: fine


def test_a_scheduler_changes_the_clipped_step() -> None:
    """The learning rate is read from the optimizer at every step."""
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    precond = curvlab.NaturalGradient(
        curvlab.KFAC(model, loss_fn, fisher_type="exact"), optimizer=opt, kl_clip=1e-6
    )
    norms = []
    for _ in range(2):
        opt.zero_grad()
        precond.backward(loss_fn(model(x), y))
        precond.step()
        norms.append(
            float(
                sum(opt.param_groups[0]["lr"] ** 2 * (p.grad**2).sum() for p in model.parameters())
            )
        )
        scheduler.step()  # no optimizer step: the same point, a ten times smaller rate
    # a clipped step: ν ∝ 1/lr, so lr·ĝ keeps its length when the rate drops
    torch.testing.assert_close(torch.tensor(norms[1]), torch.tensor(norms[0]), rtol=0.05, atol=0)


def test_a_compiled_model_is_refused_with_what_to_do() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    compiled = torch.compile(model)
    with pytest.raises(TypeError, match=r"torch\.compile.*_orig_mod"):
        curvlab.KFAC(compiled, loss_fn)
    outer = nn.Sequential(compiled)
    with pytest.raises(TypeError, match=r"submodule '0' is a torch\.compile"):
        curvlab.KFACOptimizer(outer, loss_fn)
    curvlab.KFAC(model, loss_fn)  # the eager module is fine
