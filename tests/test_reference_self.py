"""Sanity checks of the torch.func reference (``tests/reference.py``) on its own.

The curvature tests trust ``tests.reference``; these tests tie each of its pieces to a
second, differently computed quantity: the GGN to the Fisher by exact enumeration of
the labels and to Jacobian-vector products of the full batch, the empirical Fisher to
per-sample autograd gradients, the reduction factor and the loss Hessians to closed
forms, the losses to the likelihoods they are the negative log of.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp

from tests import reference as ref
from tests.cases import CASES, Case, case_id

# torch's forward-mode AD scripts its jvp decompositions on first use (torch internals)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

N = 4
ONE_PER_LOSS = [
    case
    for case in CASES
    if (case.model.name, case.loss.name, case.reduction)
    in {("mlp", "ce", "mean"), ("conv1d", "mse", "sum"), ("mlp", "bce", "mean")}
]


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10) -> None:
    atol = 1e-12 * max(float(expected.abs().max()), 1e-300)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _setup(case: Case, n: int = N):
    model, loss_fn = case.build()
    X, y = case.data(n)
    names = [name for name, _ in ref.flat_params(model)]
    params = tuple(p.detach() for _, p in ref.flat_params(model))

    def forward(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, ps)), (X,))

    return model, loss_fn, X, y, params, forward


def _random_vector(params: tuple[torch.Tensor, ...], seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params)


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def test_flat_params_follows_named_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    model[0].bias.requires_grad_(False)
    names = [name for name, _ in ref.flat_params(model)]
    assert names == ["0.weight", "2.weight", "2.bias"]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ggn_equals_fisher_by_label_enumeration(case: Case) -> None:
    """For these losses (canonical links) the GGN is the Fisher (concepts/fisher_types.md)."""
    model, loss_fn = case.build()
    X, y = case.data(N)
    G = ref.ggn(model, loss_fn, X, y)
    F = ref.fisher_via_label_expectation(model, loss_fn, X)
    assert G.shape == (sum(p.numel() for p in model.parameters()),) * 2
    assert_matches(G, F)
    torch.testing.assert_close(G, G.T, rtol=0, atol=1e-14 * float(G.abs().max()))
    assert float(torch.linalg.eigvalsh(G).min()) >= -1e-12 * float(G.abs().max())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ggn_matvec_and_quadratic_form_match_jvp(case: Case) -> None:
    """``G v = Jᵀ (∇²_f L) J v`` with full-batch JVP/VJP and the full output Hessian."""
    model, loss_fn, X, y, params, forward = _setup(case)
    G = ref.ggn(model, loss_fn, X, y)
    loss = type(loss_fn)(reduction=loss_fn.reduction)
    grad_loss = jacrev(lambda f: loss(f, y))
    for seed in range(2):
        v = _random_vector(params, seed)
        f, Jv = jvp(forward, params, v)
        _, HJv = jvp(grad_loss, (f,), (Jv,))  # full [N, C] x [N, C] Hessian applied
        _, pullback = vjp(forward, *params)
        Gv = _flat(pullback(HJv))
        vflat = _flat(v)
        assert_matches(G @ vflat, Gv, rtol=1e-9)
        quad = float((Jv * HJv).sum())
        assert math.isclose(float(vflat @ G @ vflat), quad, rel_tol=1e-9)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_per_sample_jacobians_match_batched_jacobian(case: Case) -> None:
    """Each sample's Jacobian, run alone, equals its rows of the full-batch Jacobian."""
    _, _, X, _, params, forward = _setup(case)
    J = ref.per_sample_jacobians(case.build()[0], X)
    full = jacrev(forward, argnums=tuple(range(len(params))))(*params)  # ([N, C, *p.shape],)
    n, c = J.shape[:2]
    assert_matches(J, torch.cat([j.reshape(n, c, -1) for j in full], dim=2))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sum_of_b_n_is_gradient_of_reduced_loss(case: Case) -> None:
    model, loss_fn = case.build()
    X, y = case.data(N)
    J = ref.per_sample_jacobians(model, X)
    b = torch.einsum("ncp,nc->np", J, ref.output_gradients(loss_fn, model(X), y))
    loss = loss_fn(model(X), y)
    grad = _flat(torch.autograd.grad(loss, [p for _, p in ref.flat_params(model)]))
    assert_matches(b.sum(0), grad)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_empirical_fisher_from_per_sample_losses(case: Case) -> None:
    """``EF = R Σ_n ∇ℓ_n ∇ℓ_nᵀ`` with ``∇ℓ_n`` from autograd on sample n alone."""
    model, loss_fn = case.build()
    X, y = case.data(N)
    params = [p for _, p in ref.flat_params(model)]
    per_sample = type(loss_fn)(reduction="sum")
    grads = torch.stack(
        [
            _flat(torch.autograd.grad(per_sample(model(X[i : i + 1]), y[i : i + 1]), params))
            for i in range(N)
        ]
    )
    R = ref.reduction_factor(loss_fn, model(X))
    assert_matches(ref.empirical_fisher(model, loss_fn, X, y), R * grads.T @ grads)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reduction_factor(case: Case) -> None:
    """``L = R Σ_n ℓ_n``, and R is 1/N (CE mean), 1/(N·C) (MSE/BCE mean), 1 (sum)."""
    model, loss_fn = case.build()
    X, y = case.data(N)
    with torch.no_grad():
        out = model(X)
        per_sample = type(loss_fn)(reduction="sum")
        total = sum(float(per_sample(out[i : i + 1], y[i : i + 1])) for i in range(N))
        R = ref.reduction_factor(loss_fn, out)
        assert math.isclose(float(loss_fn(out, y)), R * total, rel_tol=1e-12)
    c = out.shape[1]
    expected = {
        ("ce", "mean"): 1 / N,
        ("mse", "mean"): 1 / (N * c),
        ("bce", "mean"): 1 / (N * c),
    }.get((case.loss.name, case.reduction), 1.0)
    assert R == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("case", [c for c in CASES if c.model.name == "mlp"], ids=case_id)
def test_output_hessians_closed_form(case: Case) -> None:
    """CE: ``R(diag p − p pᵀ)``; MSE: ``2R I`` (the factor 2); BCE: ``R diag(σ(1−σ))``."""
    model, loss_fn = case.build()
    X, y = case.data(N)
    with torch.no_grad():
        out = model(X)
    R = ref.reduction_factor(loss_fn, out)
    H = ref.output_hessians(loss_fn, out, y)
    if case.loss.name == "ce":
        p = out.softmax(dim=1)
        expected = torch.diag_embed(p) - torch.einsum("nc,nd->ncd", p, p)
    elif case.loss.name == "mse":
        expected = 2.0 * torch.eye(out.shape[1], dtype=out.dtype).expand_as(H)
    else:
        s = out.sigmoid()
        expected = torch.diag_embed(s * (1 - s))
    assert_matches(H, R * expected)
    # the Fisher's label moments are the per-sample loss Hessians (Fisher = GGN)
    assert_matches(ref.label_gradient_moments(loss_fn, out), expected)


@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
def test_per_sample_loss_is_a_negative_log_likelihood(loss_name: str) -> None:
    """ℓ(f, ỹ) = −log p(ỹ|f) + const with the distributions the reference enumerates.

    CE ↔ Categorical(logits=f); BCE ↔ Π Bernoulli(logits=f_c); MSE(sum) ↔ N(f, ½ I)
    (this is why the MSE Fisher is 2I per sample, not I).
    """
    gen = torch.Generator().manual_seed(0)
    c = 3
    dist = torch.distributions
    for _ in range(3):
        f1, f2 = torch.randn(2, c, generator=gen, dtype=torch.float64)
        if loss_name == "ce":
            label = torch.randint(0, c, (), generator=gen)
            for f in (f1, f2):
                nll = -dist.Categorical(logits=f).log_prob(label)
                ce = nn.CrossEntropyLoss(reduction="sum")(f[None], label[None])
                assert math.isclose(float(nll), float(ce), rel_tol=1e-12)
        elif loss_name == "bce":
            label = torch.randint(0, 2, (c,), generator=gen).double()
            for f in (f1, f2):
                nll = -dist.Bernoulli(logits=f).log_prob(label).sum()
                bce = nn.BCEWithLogitsLoss(reduction="sum")(f, label)
                assert math.isclose(float(nll), float(bce), rel_tol=1e-12)
        else:
            label = torch.randn(c, generator=gen, dtype=torch.float64)
            consts = [
                float(
                    -dist.Normal(f, math.sqrt(0.5)).log_prob(label).sum()
                    - nn.MSELoss(reduction="sum")(f, label)
                )
                for f in (f1, f2)
            ]
            assert math.isclose(consts[0], consts[1], rel_tol=1e-12)


def _sample_labels(loss_fn: nn.Module, out: torch.Tensor, k: int, gen: torch.Generator):
    """``k`` label draws per sample from p(·|f): ``[k, N]`` (CE) or ``[k, N, C]``."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        p = out.softmax(dim=1)
        return torch.multinomial(p, k, replacement=True, generator=gen).T
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return torch.bernoulli(out.sigmoid().expand(k, *out.shape), generator=gen)
    noise = torch.randn(k, *out.shape, generator=gen, dtype=out.dtype)
    return out + math.sqrt(0.5) * noise


@pytest.mark.parametrize("case", ONE_PER_LOSS, ids=case_id)
def test_mc_single_sample_variance_by_sampling(case: Case) -> None:
    """``E‖F̂_1 − F‖²_F`` (enumeration / Gaussian moments) against 20000 sampled draws."""
    model, loss_fn = case.build()
    X, _ = case.data(N)
    with torch.no_grad():
        out = model(X)
    J = ref.per_sample_jacobians(model, X)
    R = ref.reduction_factor(loss_fn, out)
    k = 20000
    labels = _sample_labels(loss_fn, out, k, torch.Generator().manual_seed(0))
    per_sample = type(loss_fn)(reduction="none")
    with torch.enable_grad():
        f = out.expand(k, *out.shape).clone().requires_grad_(True)
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            losses = per_sample(f.reshape(-1, out.shape[1]), labels.reshape(-1))
        else:
            losses = per_sample(f, labels)
        (g,) = torch.autograd.grad(losses.sum(), f)  # [k, N, C]: ∇_f ℓ(f_n, ỹ_kn)
    moments = ref.label_gradient_moments(loss_fn, out)  # [N, C, C]
    A = R * (torch.einsum("knc,knd->kncd", g, g) - moments)  # zero-mean per draw
    K = torch.einsum("ncp,mdp->nmcd", J, J)  # J_n J_mᵀ
    # ‖Σ_n J_nᵀ A_n J_n‖²_F = Σ_{n,m} tr(A_n K_nm A_m K_mn)
    sq = torch.einsum("knab,nmbc,kmcd,mnda->k", A, K, A, K)
    V = ref.mc_single_sample_variance(model, loss_fn, X)
    assert float(sq.mean()) == pytest.approx(V, rel=0.1)
    # and the sampled moments average to the enumerated/closed-form ones
    sampled = torch.einsum("knc,knd->ncd", g, g) / k
    torch.testing.assert_close(sampled, moments, rtol=0.1, atol=0.05 * float(moments.max()))


def test_block_diagonal() -> None:
    dense = torch.arange(36, dtype=torch.float64).reshape(6, 6)
    out = ref.block_diagonal(dense, [2, 3, 1])
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[:2, :2] = mask[2:5, 2:5] = mask[5:, 5:] = True
    assert torch.equal(out[mask], dense[mask])
    assert torch.equal(out[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    with pytest.raises(ValueError):
        ref.block_diagonal(dense, [2, 3])


def test_reference_ignores_module_hooks() -> None:
    """A hooked (e.g. BackPACK-extended) model gives the same reference as a plain one."""
    case = CASES[0]
    model, loss_fn = case.build()
    X, y = case.data(N)
    before = ref.ggn(model, loss_fn, X, y)

    def poison(module: nn.Module, inputs, output):
        return output * 2.0

    def keep_io(module: nn.Module, inputs, output) -> None:
        module.kept_output = output  # a non-leaf tensor on the module, like BackPACK's

    model[0].register_forward_hook(poison)
    model[0].register_forward_hook(keep_io)
    model(X)  # grad enabled: the module now holds a non-leaf tensor (not deep-copyable)
    assert torch.equal(ref.ggn(model, loss_fn, X, y), before)
    assert torch.equal(
        ref.empirical_fisher(model, loss_fn, X, y),
        ref.empirical_fisher(case.build()[0], loss_fn, X, y),
    )
