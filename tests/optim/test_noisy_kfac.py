"""NoisyKFAC against closed forms: Bayesian linear regression's exact posterior, the stated
Kronecker covariance (sampled and dense), log-determinant, KL and the ELBO."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvlab
from curvlab.optim.noisy import NoisyKFAC


def _regression(n: int, d: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    return x, x @ w.T + 0.7 * torch.randn(n, c, generator=g, dtype=torch.float64)


def _exact_posterior(
    x: torch.Tensor, y: torch.Tensor, tau: float, bias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of ``[vec(W), b]`` for ``y = W x + b + N(0, ½)`` and the prior
    ``N(0, τ⁻¹ I)``: each output row ``[w_c, b_c]`` has precision ``2 X̄ᵀX̄ + τ I``."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) if bias else x
    cov_row = torch.linalg.inv(2 * xb.T @ xb + tau * torch.eye(xb.shape[1], dtype=x.dtype))
    rows = [cov_row @ (2 * xb.T @ y[:, c]) for c in range(y.shape[1])]  # [w_c, b_c]
    d, c = x.shape[1], y.shape[1]
    mean_w = torch.stack([r[:d] for r in rows]).reshape(-1)
    mean = torch.cat([mean_w, torch.stack([r[d] for r in rows])]) if bias else mean_w
    # covariance in [vec(W), b] order: entry of w_{c,i} is c·d + i, of b_c is c·d·... + c
    size = len(mean)
    cov = torch.zeros(size, size, dtype=x.dtype)
    for row in range(c):
        index = [row * d + i for i in range(d)] + ([c * d + row] if bias else [])
        cov[torch.tensor(index)[:, None], torch.tensor(index)[None, :]] = cov_row
    return mean, cov


def _log_evidence(x: torch.Tensor, y: torch.Tensor, tau: float, bias: bool) -> float:
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) if bias else x
    cov = torch.eye(len(x), dtype=x.dtype) / 2 + xb @ xb.T / tau
    dist = torch.distributions.MultivariateNormal(torch.zeros(len(x), dtype=x.dtype), cov)
    return float(sum(dist.log_prob(y[:, c]) for c in range(y.shape[1])))


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize(
    ("out_features", "bias", "reduction"),
    [(1, True, "mean"), (1, False, "sum"), (3, True, "mean")],
)
def test_bayesian_linear_regression_matches_the_exact_posterior(
    out_features: int, bias: bool, reduction: str
) -> None:
    """With the Gaussian likelihood and ``fisher_type="exact"`` the Fisher of a linear layer
    is exactly ``kron(2I, A)`` (it does not depend on the weights), so the exactly damped
    posterior covariance *is* the exact one: rtol 1e-10 (float64 rounding). The mean is
    stochastic (the gradient is taken at weight samples): with ``lr = 1/k`` it is the
    average of ``K`` per-step solutions ``μ* + noise`` whose covariance is at most ``Σ``,
    so its error is within 5 posterior standard deviations / √K."""
    torch.manual_seed(0)
    n, d, tau, steps = 40, 3, 2.0, 100
    x, y = _regression(n, d, out_features)
    model = nn.Linear(d, out_features, bias=bias).double()
    loss_fn = nn.MSELoss(reduction=reduction)
    opt = NoisyKFAC(
        model,
        loss_fn,
        dataset_size=n,
        lr=1.0,
        prior_precision=tau,
        damping=0.0,
        fisher_type="exact",
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))
    for _ in range(steps):
        opt.step(lambda: loss_fn(model(x), y))
        schedule.step()
    mean, cov = _exact_posterior(x, y, tau, bias)
    torch.testing.assert_close(opt.covariance(), cov, rtol=1e-10, atol=1e-13)
    error = (_flat(opt.mean()) - mean).abs() / cov.diagonal().sqrt()
    assert float(error.max()) < 5 / math.sqrt(steps)
    # the ELBO at the exact posterior is the log evidence (Monte-Carlo estimate of E_q)
    elbo = float(opt.elbo(x, y, num_samples=400))
    assert elbo == pytest.approx(_log_evidence(x, y, tau, bias), abs=0.1)


@pytest.mark.parametrize(
    ("reduction", "damping_mode"), [("mean", "exact"), ("sum", "exact"), ("mean", "factored")]
)
def test_first_step_is_the_stated_update(reduction: str, damping_mode: str) -> None:
    """The first step is taken at the mean (no covariance yet), so it is deterministic:
    ``μ₁ = μ₀ − α (F + γ_ex I)⁻¹ (∇ℓ̄(μ₀) + γ_in μ₀)`` with ``ℓ̄`` the average negative
    log-likelihood per example (``Σ_c (y_c − f_c)²``), ``F = kron(2I, X̄ᵀX̄/N)`` its Fisher,
    ``γ_in = λτ/N``, ``γ_ex = γ_in + damping`` (``"factored"``: ``F + γI`` replaced by
    ``kron(G + √γ/π I, A + π√γ I)``); dense float64 reference."""
    n, d, c, tau, kl_weight, damping, lr = 30, 3, 2, 3.0, 0.5, 0.2, 0.7
    x, y = _regression(n, d, c)
    torch.manual_seed(0)
    model = nn.Linear(d, c).double()
    loss_fn = nn.MSELoss(reduction=reduction)
    mu0 = _flat([p.detach().clone() for p in model.parameters()])
    opt = NoisyKFAC(
        model,
        loss_fn,
        dataset_size=n,
        lr=lr,
        prior_precision=tau,
        kl_weight=kl_weight,
        damping=damping,
        fisher_type="exact",
        damping_mode=damping_mode,
    )
    opt.step(lambda: loss_fn(model(x), y))
    xb = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    rows = torch.arange(c * (d + 1)).reshape(c, d + 1)
    perm = torch.cat([rows[:, :-1].reshape(-1), rows[:, -1]])
    factor_g, factor_a = 2 * torch.eye(c, dtype=x.dtype), xb.T @ xb / n

    def damped(gamma: float) -> torch.Tensor:
        if damping_mode == "exact":
            dense = torch.kron(factor_g, factor_a) + gamma * torch.eye(c * (d + 1), dtype=x.dtype)
        else:
            pi = math.sqrt((float(factor_a.trace()) / (d + 1)) / 2.0)
            dense = torch.kron(
                factor_g + math.sqrt(gamma) / pi * torch.eye(c, dtype=x.dtype),
                factor_a + pi * math.sqrt(gamma) * torch.eye(d + 1, dtype=x.dtype),
            )
        return dense[perm][:, perm]

    w, b = mu0[: c * d].reshape(c, d), mu0[c * d :]
    residual = x @ w.T + b - y  # ∇ of Σ_n Σ_c (f − y)² / N
    grad = torch.cat([(2 * residual.T @ x / n).reshape(-1), 2 * residual.sum(0) / n])
    gamma_in = kl_weight * tau / n
    expected = mu0 - lr * torch.linalg.solve(damped(gamma_in + damping), grad + gamma_in * mu0)
    torch.testing.assert_close(_flat(opt.mean()), expected, rtol=1e-10, atol=1e-12)
    cov = kl_weight / n * torch.linalg.inv(damped(gamma_in))
    torch.testing.assert_close(opt.covariance(), cov, rtol=1e-10, atol=1e-13)


def test_elbo_below_the_evidence_before_fitting() -> None:
    """The ELBO bounds the log evidence; far from the posterior (the prior-sized
    covariance before any statistics, the initial mean) the gap is large."""
    torch.manual_seed(0)
    x, y = _regression(40, 3, 1)
    model = nn.Linear(3, 1).double()
    opt = NoisyKFAC(model, nn.MSELoss(), dataset_size=40, lr=1.0, prior_precision=2.0)
    assert float(opt.elbo(x, y, num_samples=50)) < _log_evidence(x, y, 2.0, True) - 10


def _classifier(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return model, x, y


def _trained(damping_mode: str, steps: int = 5, conv: bool = False) -> tuple[NoisyKFAC, nn.Module]:
    model, x, y = _classifier()
    if conv:  # KFC's factors: the matrix [W.reshape(out, -1) | b], as for a Linear
        x = torch.randn(64, 2, 5, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
        y = (x.sum((1, 2)) > 0).long()
        model = nn.Sequential(nn.Conv1d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2))
        model = model.double()
    loss_fn = nn.CrossEntropyLoss()
    opt = NoisyKFAC(
        model,
        loss_fn,
        dataset_size=64,
        lr=0.5,
        prior_precision=1.0,
        damping_mode=damping_mode,
        generator=torch.Generator().manual_seed(1),
    )
    for _ in range(steps):
        opt.step(lambda: loss_fn(model(x), y))
    return opt, model


def _stated_covariance(opt: NoisyKFAC, damping_mode: str) -> torch.Tensor:
    """``(λ/N)`` times the inverse posterior precision from the factors, built densely
    (permuted from the row-major ``[W | b]`` to ``[vec(W), b]``)."""
    gamma = opt.kl_weight * opt.prior_precision / opt.dataset_size
    blocks = []
    for f in opt.factors():
        ia, ig = torch.eye(len(f.A), dtype=f.A.dtype), torch.eye(len(f.G), dtype=f.G.dtype)
        if damping_mode == "exact":
            precision = torch.kron(f.G, f.A) + gamma * torch.kron(ig, ia)
        else:
            pi = math.sqrt((float(f.A.trace()) / len(f.A)) / (float(f.G.trace()) / len(f.G)))
            damped_g = f.G + math.sqrt(gamma) / pi * ig
            damped_a = f.A + pi * math.sqrt(gamma) * ia
            precision = torch.kron(damped_g, damped_a)
        d_in = len(f.A)
        rows = torch.arange(len(f.G) * d_in).reshape(len(f.G), d_in)
        perm = torch.cat([rows[:, :-1].reshape(-1), rows[:, -1]])  # every layer has a bias
        cov = torch.linalg.inv(precision)[perm][:, perm]
        blocks.append(opt.kl_weight / opt.dataset_size * cov)
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "conv"])
@pytest.mark.parametrize("damping_mode", ["exact", "factored"])
def test_covariance_logdet_and_kl_against_dense(damping_mode: str, conv: bool) -> None:
    opt, _ = _trained(damping_mode, conv=conv)
    cov = _stated_covariance(opt, damping_mode)
    torch.testing.assert_close(opt.covariance(), cov, rtol=1e-10, atol=1e-12)
    assert float(opt.logdet()) == pytest.approx(float(torch.logdet(cov)), rel=1e-10)
    mean = _flat(opt.mean())
    q = torch.distributions.MultivariateNormal(mean, cov)
    prior = torch.distributions.MultivariateNormal(
        torch.zeros_like(mean), torch.eye(len(mean), dtype=mean.dtype) / opt.prior_precision
    )
    reference = float(torch.distributions.kl_divergence(q, prior))
    assert float(opt.kl()) == pytest.approx(reference, rel=1e-10)


@pytest.mark.parametrize("damping_mode", ["exact", "factored"])
def test_samples_have_the_stated_kronecker_covariance(damping_mode: str) -> None:
    """Empirical mean and covariance of ``sampled()`` draws against ``μ`` and the stated
    covariance, entry by entry within 5 standard errors
    (``sqrt((Σ_ii Σ_jj + Σ_ij²)/S)`` for a covariance entry, ``sqrt(Σ_ii/S)`` for the mean)."""
    opt, model = _trained(damping_mode)
    cov = _stated_covariance(opt, damping_mode)
    mean = _flat(opt.mean())
    count = 6000
    draws = []
    for _ in range(count):
        with opt.sampled() as w:
            draws.append(_flat(w))
    assert torch.equal(_flat([p.detach() for p in model.parameters()]), mean)  # restored
    samples = torch.stack(draws)
    var = cov.diagonal()
    assert bool(((samples.mean(0) - mean).abs() <= 5 * (var / count).sqrt()).all())
    empirical = torch.cov(samples.T)
    stderr = ((var[:, None] * var[None, :] + cov**2) / count).sqrt()
    assert bool(((empirical - cov).abs() <= 5 * stderr).all())


def test_training_raises_the_elbo_on_a_classification_problem() -> None:
    model, x, y = _classifier()
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    opt = NoisyKFAC(model, loss_fn, dataset_size=64, lr=0.3, prior_precision=1.0)
    opt.step(lambda: loss_fn(model(x), y))  # statistics, so that q is the posterior's form
    before = float(opt.elbo(x, y, num_samples=100))
    for _ in range(60):
        opt.step(lambda: loss_fn(model(x), y))
    after = float(opt.elbo(x, y, num_samples=100))
    assert after > before + 5.0  # from ≈ −N log 2 (chance) towards a fitted model
    probs = opt.predictive_samples(x, num_samples=20).softmax(-1).mean(0)
    assert float((probs.argmax(1) == y).double().mean()) > 0.9
    # a heavier KL weight is a stronger pull to the prior: a larger posterior covariance
    heavy = NoisyKFAC(model, loss_fn, dataset_size=64, lr=0.3, prior_precision=1.0, kl_weight=4.0)
    heavy.step(lambda: loss_fn(model(x), y))
    assert float(heavy.logdet()) > float(opt.logdet())


def test_sampled_restores_the_mean_after_an_error() -> None:
    opt, model = _trained("exact", steps=1)
    before = _flat([p.detach().clone() for p in model.parameters()])
    with pytest.raises(KeyError), opt.sampled():
        assert not torch.equal(_flat([p.detach() for p in model.parameters()]), before)
        raise KeyError("inside")
    assert torch.equal(_flat([p.detach() for p in model.parameters()]), before)


def test_state_dict_resumes_the_same_run() -> None:
    model, x, y = _classifier()
    twin = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    loss_fn = nn.CrossEntropyLoss()

    def build(net: nn.Module) -> NoisyKFAC:
        return NoisyKFAC(net, loss_fn, dataset_size=64, lr=0.5, invert_every=2)

    opt = build(model)
    for _ in range(3):
        opt.step(lambda: loss_fn(model(x), y))
    twin.load_state_dict(model.state_dict())
    resumed = build(twin)
    resumed.load_state_dict(opt.state_dict())
    torch.testing.assert_close(resumed.logdet(), opt.logdet(), rtol=1e-12, atol=0)
    torch.manual_seed(5)
    opt.step(lambda: loss_fn(model(x), y))
    torch.manual_seed(5)
    resumed.step(lambda: loss_fn(twin(x), y))
    torch.testing.assert_close(_flat(resumed.mean()), _flat(opt.mean()))


def test_exported_from_curvlab() -> None:
    assert curvlab.NoisyKFAC is NoisyKFAC


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset_size": 0}, "dataset_size"),
        ({"dataset_size": 2.5}, "dataset_size"),
        ({"dataset_size": True}, "dataset_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"prior_precision": -1.0}, "prior_precision"),
        ({"kl_weight": 0.0}, "kl_weight"),
        ({"damping": -1e-3}, "damping"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"update_every": 0}, "update_every"),
        ({"invert_every": 1.5}, "invert_every"),
        ({"damping_mode": "eigen"}, "damping_mode"),
        ({"fisher_type": "bogus"}, "fisher_type"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    model, _, _ = _classifier()
    args = {"dataset_size": 64, "lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        NoisyKFAC(model, nn.CrossEntropyLoss(), **args)


def test_layer_without_kronecker_rule_is_named() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"module '1'.*exclude=\['1'\]"):
        NoisyKFAC(model, nn.CrossEntropyLoss(), dataset_size=8, lr=0.1)
    kept = NoisyKFAC(model, nn.CrossEntropyLoss(), dataset_size=8, lr=0.1, exclude=["1"])
    assert kept.num_params == 4 * 4 + 2 * 5


def test_bad_calls() -> None:
    model, x, y = _classifier()
    loss_fn = nn.CrossEntropyLoss()
    opt = NoisyKFAC(model, loss_fn, dataset_size=64, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="loss_fn"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    with pytest.raises(FloatingPointError, match="not finite"):
        opt.step(lambda: loss_fn(model(x), y) * float("nan"))
    for call in (
        lambda: opt.predictive_samples(x, num_samples=0),
        lambda: opt.elbo(x, y, num_samples=-1),
    ):
        with pytest.raises(ValueError, match="num_samples"):
            call()
