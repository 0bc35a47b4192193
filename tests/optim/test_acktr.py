"""ACKTR: the trust-region step against a dense float64 reference, checkpoints, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvlab
from tests.extraction.test_policies import KINDS, _problem, reference_fisher


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("lr", [1e-3, 10.0])  # unclipped, clipped by the trust region
@pytest.mark.parametrize("kind", KINDS)
def test_one_step_is_the_trust_region_natural_gradient(kind: str, lr: float) -> None:
    model, policy, x, targets = _problem(kind, n=6)
    damping, max_kl = 1e-3, 1e-4
    fisher = reference_fisher(kind, model, x, "mean")
    before = _flat(model.parameters()).detach().clone()
    old = model(x).detach()
    loss = policy(model(x), targets)
    g = _flat(torch.autograd.grad(loss, list(model.parameters())))
    natural = torch.linalg.solve(fisher + damping * torch.eye(len(g), dtype=g.dtype), g)
    eta = min(lr, math.sqrt(2 * max_kl / float(natural @ g)))

    curvature = curvlab.ExactFisher(model, policy, fisher_type="exact")
    opt = curvlab.ACKTR(
        model, policy, curvature, lr=lr, max_kl=max_kl, damping=damping, momentum=0.0
    )
    opt.zero_grad()
    opt.backward(policy(model(x), targets))
    opt.step()
    delta = _flat(model.parameters()).detach() - before
    torch.testing.assert_close(delta, -eta * natural)
    predicted = 0.5 * eta**2 * float(natural @ g)
    torch.testing.assert_close(float(opt.last["predicted_kl"]), predicted)
    assert predicted <= max_kl * (1 + 1e-9)
    assert (float(opt.last["clip"]) < 1) == (lr == 10.0)
    if lr == 10.0:  # the measured mean KL is the predicted one, to second order
        measured = float(policy.kl(old, model(x)).mean().detach())
        assert abs(measured - 0.5 * float(delta @ fisher @ delta)) < 0.1 * measured


def _natural_step(kind, model, policy, x, targets, lr, max_kl, damping):
    """``(η ĝ, g)`` of the reference at the model's current parameters."""
    fisher = reference_fisher(kind, model, x, "mean")
    g = _flat(torch.autograd.grad(policy(model(x), targets), list(model.parameters())))
    natural = torch.linalg.solve(fisher + damping * torch.eye(len(g), dtype=g.dtype), g)
    return min(lr, math.sqrt(2 * max_kl / float(natural @ g))) * natural


def test_momentum_carries_the_previous_steps() -> None:
    kind, lr, max_kl, damping, mu = "categorical", 10.0, 1e-4, 1e-3, 0.5
    model, policy, x, targets = _problem(kind, n=6)
    curvature = curvlab.ExactFisher(model, policy, fisher_type="exact")
    opt = curvlab.ACKTR(
        model,
        policy,
        curvature,
        lr=lr,
        max_kl=max_kl,
        damping=damping,
        momentum=mu,
        ema_decay=0.0,
        invert_every=1,
    )
    previous = None
    for _ in range(3):
        before = _flat(model.parameters()).detach().clone()
        fresh = _natural_step(kind, model, policy, x, targets, lr, max_kl, damping)
        expected = -fresh if previous is None else mu * previous - fresh
        opt.step(lambda: policy(model(x), targets))
        previous = _flat(model.parameters()).detach() - before
        torch.testing.assert_close(previous, expected)


def test_state_dict_round_trip_continues_identically() -> None:
    def build():
        model, policy, x, targets = _problem("gaussian_shared", n=8)
        return model, policy, x, targets, curvlab.ACKTR(model, policy, invert_every=2)

    def train(model, policy, x, targets, opt, steps: int, seed: int) -> None:
        torch.manual_seed(seed)
        for _ in range(steps):
            opt.step(lambda: policy(model(x), targets))

    model_a, policy_a, x, targets, opt_a = build()
    train(model_a, policy_a, x, targets, opt_a, 3, seed=1)
    state = opt_a.state_dict()
    model_b, policy_b, _, _, opt_b = build()
    model_b.load_state_dict(model_a.state_dict())
    opt_b.load_state_dict(state)
    assert opt_b.steps == 3
    train(model_a, policy_a, x, targets, opt_a, 2, seed=2)
    train(model_b, policy_b, x, targets, opt_b, 2, seed=2)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_default_kfac_learns_a_bandit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    policy = curvlab.CategoricalPolicy()
    reward = torch.tensor([0.0, 1.0, 0.2])
    states = torch.randn(64, 2)
    with curvlab.ACKTR(model, policy) as opt:
        for _ in range(30):
            with torch.no_grad():
                actions = policy.sample_actions(model(states))[:, 0].long()
            advantages = reward[actions] - reward[actions].mean()
            targets = policy.pack(actions, advantages)
            opt.step(lambda targets=targets: policy(model(states), targets))
    assert float(model(states).detach().softmax(-1)[:, 1].mean()) > 0.9


def test_errors_name_the_argument() -> None:
    model, policy, _, _ = _problem("categorical")
    with pytest.raises(ValueError, match="lr must be finite and > 0"):
        curvlab.ACKTR(model, policy, lr=0.0)
    with pytest.raises(ValueError, match="max_kl must be finite and > 0"):
        curvlab.ACKTR(model, policy, max_kl=float("nan"))
    with pytest.raises(TypeError, match="max_kl must be a float"):
        curvlab.ACKTR(model, policy, max_kl="small")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\)"):
        curvlab.ACKTR(model, policy, momentum=1.0)
    with pytest.raises(TypeError, match=r"curvature must be a curvlab\.Curvature"):
        curvlab.ACKTR(model, policy, curvature="kfac")  # type: ignore[arg-type]
    other = curvlab.KFAC(nn.Sequential(nn.Linear(4, 3)), policy)
    with pytest.raises(ValueError, match="another model or loss"):
        curvlab.ACKTR(model, policy, curvature=other)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        curvlab.ACKTR("net", policy)  # type: ignore[arg-type]
    opt = curvlab.ACKTR(model, policy)
    with pytest.raises(ValueError, match="not an ACKTR state"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    with pytest.raises(RuntimeError, match="no curvature yet"):
        opt.step()
