"""Distribution strategies (curvlab.optim.strategies) in one process: the choice of the
strategy, the order in which ``NaturalGradient`` asks it, and ``Local`` against the
default. Two processes (``CommOpt``, ``MemOpt``, a user's subclass, parameters without
gradient): tests/optim/test_distributed.py; failures: test_distributed_faults.py."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

import curvlab
from curvlab.optim import CommOpt, Distribution, Local, MemOpt
from curvlab.optim.strategies import make_distribution
from tests.cases import CASES

MLP_CE = next(c for c in CASES if c.id == "mlp-ce-mean")


class RecordingLocal(Local):
    """``Local`` that records which of its methods the preconditioner calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def agree_on_backward(self, step: int, backward_calls: int) -> None:
        self.calls.append("agree_on_backward")

    def screen_loss(self, loss: Tensor) -> bool:
        self.calls.append("screen_loss")
        return super().screen_loss(loss)

    def accumulate(self, loss: Tensor) -> None:
        self.calls.append("accumulate")
        super().accumulate(loss)

    def agree_on_step(self, step: int, **kwargs: object) -> None:  # type: ignore[override]
        self.calls.append("agree_on_step")

    def reduce_statistics(self) -> None:
        self.calls.append("reduce_statistics")

    def share_decompositions(self, damping: float) -> None:
        self.calls.append("share_decompositions")

    def check_gradients(self, grads: Sequence[Tensor], names: Sequence[str]) -> None:
        self.calls.append("check_gradients")
        super().check_gradients(grads, names)

    def solve(self, grads: list[Tensor], damping: float) -> list[Tensor]:
        self.calls.append("solve")
        return super().solve(grads, damping)

    def average_values(self, values: Sequence[float]) -> list[float]:
        self.calls.append("average_values")
        return super().average_values(values)

    def agree_on_close(self, step: int, backward_calls: int) -> None:
        self.calls.append("agree_on_close")


def _train(
    distribution: str | Distribution,
    steps: int = 4,
    damping: float | curvlab.LevenbergMarquardt = 0.1,
) -> list[Tensor]:
    model, loss_fn = MLP_CE.build(seed=0)
    precond = curvlab.NaturalGradient(
        curvlab.KFAC(model, loss_fn),
        damping=damping,
        distribution=distribution,
        invert_every=2,
        lr=0.1,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, y = MLP_CE.data(n=8, seed=step)
        opt.zero_grad()
        precond.backward(loss_fn(model(x), y))
        precond.step(lambda x=x, y=y: loss_fn(model(x), y))
        opt.step()
    precond.close()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("option", ["local", "comm_opt", "mem_opt"])
def test_without_a_process_group_every_option_is_local(option: str) -> None:
    strategy = make_distribution(option)
    assert isinstance(strategy, Local) and strategy.name == "local" and strategy.comm is None


def test_a_local_strategy_object_trains_like_the_default() -> None:
    default = _train("comm_opt")
    local = _train(Local())
    assert all(torch.equal(a, b) for a, b in zip(default, local))


def test_the_step_asks_its_strategy_in_pipeline_order() -> None:
    """agree → average (reduce) → invert (share) → solve → adapt (average ρ terms); the
    decompositions are shared on inversion steps only (invert_every=2)."""
    strategy = RecordingLocal()
    lm = curvlab.LevenbergMarquardt(initial=0.1, interval=2)
    _train(strategy, steps=2, damping=lm)
    per_step = ["agree_on_backward", "screen_loss", "accumulate", "agree_on_step"]
    per_step += ["reduce_statistics"]
    assert strategy.calls == [
        *per_step,
        "share_decompositions",  # step 0 inverts
        "check_gradients",
        "solve",
        "average_values",  # Levenberg–Marquardt is due at step 0
        *per_step,
        "check_gradients",  # step 1 holds the decompositions
        "solve",
        "agree_on_close",
    ]


def test_strategy_choice_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="unknown distribution 'everywhere'"):
        make_distribution("everywhere")
    with pytest.raises(TypeError, match="distribution must be one of"):
        make_distribution(3)  # type: ignore[arg-type]
    group = object()
    with pytest.raises(ValueError, match="process_group= is for the string options"):
        make_distribution(Local(), group)  # type: ignore[arg-type]
    for cls in (CommOpt, MemOpt):
        with pytest.raises(ValueError, match=r"needs torch\.distributed initialised"):
            cls()
    model, loss_fn = MLP_CE.build()
    strategy = Local()
    curvlab.NaturalGradient(curvlab.KFAC(model, loss_fn), distribution=strategy, kl_clip=None)
    with pytest.raises(ValueError, match="already serves another preconditioner"):
        curvlab.NaturalGradient(curvlab.KFAC(model, loss_fn), distribution=strategy, kl_clip=None)


def test_kfac_optimizer_is_not_referenced_by_its_preconditioner() -> None:
    """The preconditioner reads the optimizer's Levenberg–Marquardt λ through a damping
    object, not a callback: with the optimizer gone, the preconditioner keeps it alive by
    nothing (and still steps, with the λ + η of its last inversion)."""
    model, loss_fn = MLP_CE.build(seed=0)
    opt = curvlab.KFACOptimizer(model, loss_fn, invert_every=2)
    for step in range(3):
        x, y = MLP_CE.data(n=8, seed=step)
        opt.step(lambda x=x, y=y: loss_fn(model(x), y))
    precond, lm = opt.precond, opt.lm
    assert precond.damping_policy.policy.source is lm  # type: ignore[union-attr]
    assert precond.current_damping() == pytest.approx(precond.damping_policy.held)
    gone = weakref.ref(opt)
    del opt
    gc.collect()
    assert gone() is None
    x, y = MLP_CE.data(n=8, seed=9)
    precond.backward(loss_fn(model(x), y))
    precond.step()
    precond.close()
