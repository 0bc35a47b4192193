"""The Fisher of policy distributions (curvlab.extraction.policies) in every backend.

References are float64 and independent of curvlab: scores come from ``torch.distributions``
differentiated with ``torch.func``; the categorical Fisher is the exact expectation by
enumerating the actions, the Gaussian one the closed form ``Jᵀ diag(1/σ², 2) J``; both
are also checked against the Hessian of the state-averaged KL.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Normal, kl_divergence
from torch.func import functional_call, hessian, jacrev

import curvlab
from curvlab.extraction.policies import (
    CategoricalPolicy,
    GaussianPolicy,
    PolicyLoss,
    StateIndependentLogStd,
)

ACTIONS, DIM, INPUTS = 3, 2, 4


def _model(kind: str, hidden: bool = True) -> nn.Module:
    width = {"categorical": ACTIONS, "gaussian": 2 * DIM, "gaussian_shared": DIM}[kind]
    layers: list[nn.Module] = (
        [nn.Linear(INPUTS, 5), nn.Tanh(), nn.Linear(5, width)]
        if hidden
        else [nn.Linear(INPUTS, width)]
    )
    if kind == "gaussian_shared":
        layers.append(StateIndependentLogStd(DIM, init=-0.3))
    return nn.Sequential(*layers).double()


def _problem(kind: str, n: int = 5, reduction: str = "mean", hidden: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    model = _model(kind, hidden)
    policy: PolicyLoss = (
        CategoricalPolicy(reduction) if kind == "categorical" else GaussianPolicy(reduction)
    )
    x = torch.randn(n, INPUTS, dtype=torch.float64)
    with torch.no_grad():
        actions = policy.sample_actions(model(x))
    targets = policy.pack(actions, torch.randn(n, dtype=torch.float64))
    return model, policy, x, targets


def _distribution(kind: str, f: Tensor) -> torch.distributions.Distribution:
    if kind == "categorical":
        return Categorical(logits=f)
    mean, log_std = f[..., :DIM], f[..., DIM:]
    return torch.distributions.Independent(Normal(mean, log_std.exp()), 1)


def _flat_fn(model: nn.Module):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def forward(theta: Tensor, x: Tensor) -> Tensor:
        parts = [t.reshape(s) for t, s in zip(theta.split(sizes), shapes)]
        return functional_call(model, dict(zip(names, parts)), (x,))

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return forward, theta


def _score(kind: str, forward, theta: Tensor, xn: Tensor, a: Tensor) -> Tensor:
    """``∇_θ log π(a | s_n)`` through ``torch.distributions``."""
    return jacrev(lambda t: _distribution(kind, forward(t, xn[None])[0]).log_prob(a))(theta)


def reference_fisher(kind: str, model: nn.Module, x: Tensor, reduction: str) -> Tensor:
    """``R Σ_n E_{a∼π}[∇log π ∇log πᵀ]`` (categorical: enumeration; Gaussian: closed form)."""
    forward, theta = _flat_fn(model)
    r = 1.0 / x.shape[0] if reduction == "mean" else 1.0
    total = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for xn in x:
        if kind == "categorical":
            probs = forward(theta, xn[None])[0].softmax(-1)
            for a in range(ACTIONS):
                g = _score(kind, forward, theta, xn, torch.tensor(a))
                total += probs[a] * torch.outer(g, g)
        else:
            jac = jacrev(lambda t, xn=xn: forward(t, xn[None])[0])(theta)  # [2D, P]
            log_std = forward(theta, xn[None])[0, DIM:]
            m = torch.cat([torch.exp(-2 * log_std), torch.full((DIM,), 2.0, dtype=x.dtype)])
            total += jac.T @ (m[:, None] * jac)
    return r * total


def kl_hessian(kind: str, model: nn.Module, x: Tensor, reduction: str) -> Tensor:
    """``∇²_θ' R Σ_n KL(π_θ(·|s_n) ‖ π_θ'(·|s_n))`` at ``θ' = θ``."""
    forward, theta = _flat_fn(model)
    old = forward(theta, x).detach()
    r = 1.0 / x.shape[0] if reduction == "mean" else 1.0

    def kl(t: Tensor) -> Tensor:
        return r * kl_divergence(_distribution(kind, old), _distribution(kind, forward(t, x))).sum()

    return hessian(kl)(theta)


def score_outer(kind: str, model: nn.Module, x: Tensor, actions: Tensor, r: float) -> Tensor:
    """``R Σ_n ∇log π(a_n|s_n) ∇log π(a_n|s_n)ᵀ`` at the given actions."""
    forward, theta = _flat_fn(model)
    total = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for xn, an in zip(x, actions):
        a = an[0].long() if kind == "categorical" else an
        g = _score(kind, forward, theta, xn, a)
        total += torch.outer(g, g)
    return r * total


KINDS = ["categorical", "gaussian", "gaussian_shared"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", KINDS)
def test_exact_fisher_matches_reference_and_kl_hessian(kind: str, reduction: str) -> None:
    model, policy, x, targets = _problem(kind, reduction=reduction)
    expected = reference_fisher(kind, model, x, reduction)
    torch.testing.assert_close(kl_hessian(kind, model, x, reduction), expected)
    c = curvlab.ExactFisher(model, policy, fisher_type="exact")
    c.update(x, targets)
    torch.testing.assert_close(c.to_dense(), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_structured_backends_are_the_reference_restricted(kind: str) -> None:
    model, policy, x, targets = _problem(kind)
    expected = reference_fisher(kind, model, x, "mean")
    diag = curvlab.DiagonalFisher(model, policy, fisher_type="exact")
    diag.update(x, targets)
    torch.testing.assert_close(diag.diagonal(), expected.diagonal())
    blocks = curvlab.BlockDiagonal(model, policy, fisher_type="exact")
    blocks.update(x, targets)
    dense = blocks.to_dense()
    mask = dense != 0
    torch.testing.assert_close(dense, torch.where(mask, expected, torch.zeros_like(expected)))
    assert mask.sum() > 0


@pytest.mark.parametrize("backend", ["KFAC", "EKFAC"])
@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_kronecker_backends_are_exact_for_one_state(kind: str, backend: str) -> None:
    # one state, one layer: A = ā āᵀ and G = M, so kron(G, A) is that state's Fisher
    model, policy, x, targets = _problem(kind, n=1, hidden=False)
    c = getattr(curvlab, backend)(model, policy, fisher_type="exact")
    c.update(x, targets)
    torch.testing.assert_close(c.to_dense(), reference_fisher(kind, model, x, "mean"))


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
@pytest.mark.parametrize("kind", KINDS)
def test_matrix_free_ggn_multiplies_by_the_reference(kind: str, fisher_type: str) -> None:
    model, policy, x, targets = _problem(kind)
    if fisher_type == "exact":
        expected = reference_fisher(kind, model, x, "mean")
    else:
        expected = score_outer(kind, model, x, policy.unpack(targets)[0], 1.0 / x.shape[0])
    c = curvlab.MatrixFreeGGN(model, policy, fisher_type=fisher_type)
    c.update(x, targets)
    v = torch.randn(expected.shape[0], 2, dtype=torch.float64)
    torch.testing.assert_close(c @ v, expected @ v)


@pytest.mark.parametrize("kind", KINDS)
def test_mc_fisher_converges_to_the_reference(kind: str) -> None:
    model, policy, x, targets = _problem(kind, n=3)
    expected = reference_fisher(kind, model, x, "mean")
    torch.manual_seed(1)
    c = curvlab.ExactFisher(model, policy, fisher_type="mc", mc_samples=20_000)
    c.update(x, targets)
    error = (c.to_dense() - expected).norm() / expected.norm()
    assert error < 0.05, error


@pytest.mark.parametrize("kind", KINDS)
def test_empirical_fisher_is_the_score_outer_product_at_the_taken_actions(kind: str) -> None:
    model, policy, x, targets = _problem(kind)
    actions, _ = policy.unpack(targets)
    expected = score_outer(kind, model, x, actions, 1.0 / x.shape[0])
    c = curvlab.EmpiricalFisher(model, policy)
    c.update(x, targets)
    torch.testing.assert_close(c.to_dense(), expected)
    # the advantages enter the loss, not the Fisher
    other = curvlab.EmpiricalFisher(model, policy)
    other.update(x, policy.pack(actions, 10 * torch.randn(x.shape[0], dtype=torch.float64)))
    torch.testing.assert_close(other.to_dense(), expected)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_the_advantage_weighted_log_likelihood(kind: str, reduction: str) -> None:
    model, policy, x, targets = _problem(kind, reduction=reduction)
    actions, advantages = policy.unpack(targets)
    f = model(x)
    a = actions[:, 0].long() if kind == "categorical" else actions
    terms = -advantages * _distribution(kind, f).log_prob(a)
    expected = terms.mean() if reduction == "mean" else terms.sum()
    torch.testing.assert_close(policy(f, targets), expected)
    torch.testing.assert_close(type(policy)("none")(f, targets), terms)
    dist = _distribution(kind, f.detach())
    torch.testing.assert_close(policy.entropy(f.detach()), dist.entropy())
    g = model(x).detach() + 0.1 * torch.randn_like(f)
    torch.testing.assert_close(
        policy.kl(f.detach(), g), kl_divergence(dist, _distribution(kind, g))
    )


def test_multi_dimensional_gaussian_actions_pack_and_score() -> None:
    policy = GaussianPolicy()
    f = torch.randn(4, 2 * DIM, dtype=torch.float64, requires_grad=True)
    actions = policy.sample_actions(f.detach())
    assert actions.shape == (4, DIM)
    assert policy.sample_actions(f.detach(), 7).shape == (7, 4, DIM)
    (grad,) = torch.autograd.grad(policy.log_prob(f, actions).sum(), f)
    torch.testing.assert_close(policy.score(f.detach(), actions), grad)


def test_policies_train_with_natural_gradient_and_kfac_optimizer() -> None:
    model, policy, x, targets = _problem("categorical", n=16)
    precond = curvlab.NaturalGradient(curvlab.KFAC(model, policy), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        precond.backward(policy(model(x), targets))
        precond.step()
        opt.step()
    kfac_opt = curvlab.KFACOptimizer(model, policy)
    loss = kfac_opt.step(lambda: policy(model(x), targets))
    assert torch.isfinite(loss)


def test_errors_name_the_problem() -> None:
    policy = CategoricalPolicy()
    f = torch.randn(3, ACTIONS)
    with pytest.raises(ValueError, match=r"shape \[3, 2\]"):
        policy(f, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="floating"):
        policy(f, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="integers in \\[0, 3\\)"):
        curvlab.extraction.batch_scale(
            policy, f, policy.pack(torch.tensor([0, 3, 1]), torch.ones(3))
        )
    with pytest.raises(ValueError, match="integers"):
        curvlab.extraction.batch_scale(
            policy, f, policy.pack(torch.tensor([0.5, 1.0, 1.0]), torch.ones(3))
        )
    with pytest.raises(ValueError, match="advantages' length"):
        policy.pack(torch.tensor([0, 1]), torch.ones(3))
    with pytest.raises(ValueError, match=r"advantages must have shape \[N\]"):
        policy.pack(torch.tensor([0, 1]), torch.ones(2, 1))
    with pytest.raises(ValueError, match="mean, then log-std"):
        GaussianPolicy()(torch.randn(3, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none'"):
        CategoricalPolicy("max")
    with pytest.raises(ValueError, match="reduction='none'"):
        curvlab.KFAC(nn.Sequential(nn.Linear(2, ACTIONS)), CategoricalPolicy("none"))
    with pytest.raises(ValueError, match="expected 2"):
        StateIndependentLogStd(2)(torch.randn(3, 3))
    with pytest.raises(ValueError, match="dim must be"):
        StateIndependentLogStd(0)
    with pytest.raises(ValueError, match="BackPACK knows torch's own losses only"):
        curvlab.KFAC(nn.Sequential(nn.Linear(2, ACTIONS)), policy, engine="backpack")
