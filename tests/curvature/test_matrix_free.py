"""MatrixFreeGGN / MatrixFreeHessian against independent float64 references
(concepts/matrix_free.md): the dense torch.func GGN, empirical Fisher and Hessian of
tests/reference.py, a Monte-Carlo Fisher from the same sampled labels, and curvlinops'
operators (a test-only cross-check)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian

import curvlab
from curvlab.extraction.losses import sample_targets
from curvlab.linalg import LinAlgError
from tests import reference as ref
from tests.zoo import ZOO, ZooCase, case

# every zoo case (each well under 2 s): BatchNorm in training mode couples the samples,
# the fused attention of nn.TransformerEncoderLayer has no forward-mode AD
CASES = [c.name for c in ZOO]


@pytest.fixture(autouse=True)
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _setup(c: ZooCase, reduction: str | None = None, seed: int = 0):
    model, loss_fn = c.make_model(), c.loss_fn()
    if reduction is not None:
        loss_fn.reduction = reduction
    x, y = c.make_batch(torch.Generator().manual_seed(seed))
    return model, loss_fn, x, y


def _order(op: curvlab.Curvature, model: nn.Module) -> Tensor:
    """Indices of ``op.params``' entries in the reference's flat parameter order."""
    start, where = 0, {}
    for _, p in ref.flat_params(model):
        where[id(p)] = torch.arange(start, start + p.numel())
        start += p.numel()
    return torch.cat([where[id(p)] for p in op.params])


def _in_op_order(matrix: Tensor, op: curvlab.Curvature, model: nn.Module) -> Tensor:
    index = _order(op, model)
    return matrix[index.unsqueeze(1), index.unsqueeze(0)]


def _close(actual: Tensor, expected: Tensor, rtol: float = 1e-10) -> None:
    atol = rtol * max(float(expected.abs().max()), 1e-12)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _unflattener(model: nn.Module):
    named = ref.flat_params(model)

    def parts(theta: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for name, p in named:
            out[name] = theta[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        return out

    return torch.cat([p.detach().reshape(-1) for _, p in named]), parts


def _dense_ggn(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``Jᵀ (∇²_f L) J`` ``[P, P]`` with ``J`` the Jacobian of the whole batch's output rows
    (``torch.func.jacrev``; any model, batch-coupling BatchNorm included)."""
    flat, parts = _unflattener(model)
    plain = ref.unhooked_copy(model)
    buffers = dict(plain.named_buffers())

    def rows(theta: Tensor) -> Tensor:
        return functional_call(
            plain, ({**parts(theta), **{k: b.clone() for k, b in buffers.items()}}), (x,)
        )

    J = torch.func.jacrev(rows)(flat)  # [R, C, P]
    with torch.no_grad():
        outputs = rows(flat)
    H = ref.output_hessians(loss_fn, outputs, y)  # [R, C, C]
    return torch.einsum("rcp,rcd,rdq->pq", J, H, J)


def _dense_hessian(
    model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, via: str = "torch.func"
) -> Tensor:
    """``∇²_θ L`` ``[P, P]`` on the flat parameter vector: ``torch.func.hessian``
    (forward-over-reverse), or ``torch.autograd.functional.hessian`` (plain double
    backward) with ``via="autograd"``."""
    flat, parts = _unflattener(model)
    plain = ref.unhooked_copy(model)

    def loss_of(theta: Tensor) -> Tensor:
        return loss_fn(functional_call(plain, parts(theta), (x,)), y)

    if via == "autograd":
        return torch.autograd.functional.hessian(loss_of, flat)
    return hessian(loss_of)(flat)


# --- exactness against the dense references -------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_ggn_equals_dense_reference(name: str) -> None:
    model, loss_fn, x, y = _setup(case(name))
    op = curvlab.MatrixFreeGGN(model, loss_fn)
    op.update(x, y)
    expected = _in_op_order(_dense_ggn(model, loss_fn, x, y), op, model)
    _close(op.to_dense(), expected)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", ["mlp", "mlp_mse", "mlp_bce"])
@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_each_fisher_type_and_reduction(name: str, reduction: str, fisher_type: str) -> None:
    model, loss_fn, x, y = _setup(case(name), reduction)
    op = curvlab.MatrixFreeGGN(model, loss_fn, fisher_type=fisher_type)
    op.update(x, y)
    build = ref.ggn if fisher_type == "exact" else ref.empirical_fisher
    _close(op.to_dense(), build(model, loss_fn, x, y))


@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("name", ["mlp", "mlp_mse", "mlp_bce"])
def test_mc_fisher_equals_reference_with_the_same_labels(name: str, mc_samples: int) -> None:
    """Batch ``b`` draws its labels under ``torch.manual_seed(seed + b)``; the reference
    draws the same labels and builds ``R Σ_n J_nᵀ (1/M Σ_m ∇ℓ∇ℓᵀ) J_n`` by torch.func."""
    model, loss_fn, x, y = _setup(case(name))
    seed = 7
    op = curvlab.MatrixFreeGGN(model, loss_fn, fisher_type="mc", mc_samples=mc_samples, seed=seed)
    op.update(x, y)
    with torch.no_grad():
        f = model(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        draws = sample_targets(loss_fn, f, num=mc_samples)
    J = ref.per_sample_jacobians(model, x)  # [N, C, P]
    r = ref.reduction_factor(loss_fn, f)
    nll = type(loss_fn)(reduction="sum")
    grads = []
    for m in range(mc_samples):
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            g = torch.func.vmap(torch.func.grad(lambda fn, t: nll(fn[None], t[None])))(f, draws[m])
        else:
            g = torch.func.vmap(torch.func.grad(lambda fn, t: nll(fn, t)))(f, draws[m].to(f.dtype))
        grads.append(torch.einsum("nc,ncp->np", g, J))
    stacked = torch.stack(grads)  # [M, N, P]
    expected = r / mc_samples * torch.einsum("mnp,mnq->pq", stacked, stacked)
    _close(op.to_dense(), expected)


def test_mc_fisher_averages_to_the_exact_fisher() -> None:
    model, loss_fn, x, y = _setup(case("mlp"))
    op = curvlab.MatrixFreeGGN(model, loss_fn, fisher_type="mc", mc_samples=2000)
    op.update(x, y)
    exact = ref.ggn(model, loss_fn, x, y)
    error = torch.linalg.matrix_norm(op.to_dense() - exact) / torch.linalg.matrix_norm(exact)
    assert error < 0.1  # E‖F̂_M − F‖² ∝ 1/M


# gpt_char: torch.func's second derivatives through the causal mask (masked_fill with -inf
# before softmax) are wrong in torch 2.13 (asymmetric; central finite differences of the
# gradient agree with the double backward to 1e-9), so its reference is the double backward
HESSIAN_CASES = [
    ("mlp", "torch.func"),
    ("cnn", "torch.func"),
    ("mlp_mse", "torch.func"),
    ("mlp_bce", "torch.func"),
    ("ignore_index", "torch.func"),
    ("lstm", "torch.func"),
    ("gpt_char", "autograd"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("name", "via"), HESSIAN_CASES, ids=[n for n, _ in HESSIAN_CASES])
def test_hessian_equals_dense_hessian(name: str, via: str, reduction: str) -> None:
    model, loss_fn, x, y = _setup(case(name), reduction)
    op = curvlab.MatrixFreeHessian(model, loss_fn)
    op.update(x, y)
    expected = _in_op_order(_dense_hessian(model, loss_fn, x, y, via), op, model)
    _close(op.to_dense(), expected)


# --- several batches, loaders ------------------------------------------------------------


OPERATORS = {"ggn": curvlab.MatrixFreeGGN, "hessian": curvlab.MatrixFreeHessian}


def _two_batches(c: ZooCase, reduction: str):
    model, loss_fn, x1, y1 = _setup(c, reduction, seed=0)
    x2, y2 = c.make_batch(torch.Generator().manual_seed(1))
    return model, loss_fn, (x1[:3], y1[:3]), (x2, y2)


@pytest.mark.parametrize("feed", ["two_updates", "list", "generator"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_batches_give_the_curvature_of_their_union(kind: str, reduction: str, feed: str) -> None:
    """Batches of different sizes (3 and 4 samples): the union's curvature."""
    model, loss_fn, (x1, y1), (x2, y2) = _two_batches(case("mlp"), reduction)
    op = OPERATORS[kind](model, loss_fn)
    if feed == "two_updates":
        op.update(x1, y1)
        op.update(x2, y2)
    elif feed == "list":
        op.update([(x1, y1), (x2, y2)])
    else:
        op.update(((x, y) for x, y in [(x1, y1), (x2, y2)]), progress=False)
    x, y = torch.cat([x1, x2]), torch.cat([y1, y2])
    if kind == "ggn":
        expected = ref.ggn(model, loss_fn, x, y)
    else:
        expected = _dense_hessian(model, loss_fn, x, y)
    assert op.num_batches == 2 and op.num_samples == 7
    _close(op.to_dense(), expected)


def test_a_dataloader_is_held_and_iterated_at_every_product() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    model, loss_fn, x, y = _setup(case("mlp"))
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=False)  # 3 + 1 samples
    op = curvlab.MatrixFreeGGN(model, loss_fn)
    op.update(loader, progress=False)
    assert op.num_batches == 2 and op.num_samples == 4
    expected = ref.ggn(model, loss_fn, x, y)
    _close(op.to_dense(), expected)
    copy = curvlab.MatrixFreeGGN(model, loss_fn)
    copy.load_state_dict(op.state_dict())
    _close(copy.to_dense(), expected)


def test_a_held_loader_that_changes_length_is_refused() -> None:
    model, loss_fn, x, y = _setup(case("mlp"))
    data = [(x, y)]
    op = curvlab.MatrixFreeGGN(model, loss_fn)
    op.update(data)
    data.append((x, y))
    with pytest.raises(RuntimeError, match="same batches"):
        op.to_dense()


# --- the operator interface ----------------------------------------------------------------


@pytest.fixture
def mlp_ggn() -> tuple[curvlab.MatrixFreeGGN, Tensor]:
    model, loss_fn, x, y = _setup(case("mlp"))
    op = curvlab.MatrixFreeGGN(model, loss_fn, num_matvecs=45)
    op.update(x, y)
    return op, ref.ggn(model, loss_fn, x, y)


def test_products_for_every_vector_layout(mlp_ggn) -> None:
    op, G = mlp_ggn
    V = torch.randn(
        op.num_params, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    _close(op @ V, G @ V)
    _close(op @ V[:, 0], G @ V[:, 0])
    parts = op._unflatten(V[:, 1])
    _close(torch.cat([t.reshape(-1) for t in op @ parts]), G @ V[:, 1])
    _close(torch.cat([t.reshape(-1) for t in op.matvec(parts)]), G @ V[:, 1])
    scipy_op = op.to_scipy()
    np.testing.assert_allclose(scipy_op @ V.numpy(), (G @ V).numpy(), rtol=1e-10, atol=1e-12)


def test_solve_by_conjugate_gradients(mlp_ggn) -> None:
    op, G = mlp_ggn
    b = torch.randn(op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    damping = 1e-2
    x = op._flatten(op.solve(op._unflatten(b), damping))
    expected = torch.linalg.solve(G + damping * torch.eye(op.num_params, dtype=G.dtype), b)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert op.last_cg is not None and op.last_cg[1] <= op.cg_tol
    inverse = op.inverse(damping) @ b
    torch.testing.assert_close(
        inverse, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())
    )


def test_unconverged_solve_warns(mlp_ggn) -> None:
    op, _ = mlp_ggn
    op.cg_max_iter = 2
    b = op._unflatten(torch.ones(op.num_params, dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="conjugate gradients stopped"):
        op.solve(b, 1e-3)


def test_estimators_are_exact_on_a_low_rank_ggn(mlp_ggn) -> None:
    """The mlp's GGN has rank ≤ N(C−1) = 8 < 45/3: Hutch++ and Diag++ capture it exactly
    (error 0), and Lanczos finds its top eigenvalues with zero residual bounds."""
    op, G = mlp_ggn
    trace = op.estimate_trace()
    torch.testing.assert_close(trace.value, torch.trace(G), rtol=1e-8, atol=0.0)
    assert float(trace.error) < 1e-8 * float(torch.trace(G))
    torch.testing.assert_close(op.trace(), torch.trace(G), rtol=1e-8, atol=0.0)
    diag = op.estimate_diagonal()
    torch.testing.assert_close(diag.value, G.diagonal(), rtol=1e-8, atol=1e-10)
    top = torch.linalg.eigvalsh(G).flip(0)[:4]
    eig = op.estimate_eigenvalues(4)
    torch.testing.assert_close(eig.value, top, rtol=1e-8, atol=1e-10)
    assert float(eig.error.max()) < 1e-6 * float(top[0])
    torch.testing.assert_close(op.eigenvalues(4), top, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        op.eigenvalues(), torch.linalg.eigvalsh(G).flip(0), rtol=1e-8, atol=1e-10
    )
    frob = op.frobenius_norm()
    torch.testing.assert_close(frob, torch.linalg.matrix_norm(G), rtol=1e-3, atol=0.0)
    logdet = op.logdet(0.1)
    expected = torch.linalg.slogdet(G + 0.1 * torch.eye(len(G), dtype=G.dtype)).logabsdet
    assert abs(float(logdet - expected)) < 0.1 * abs(float(expected))


def test_stochastic_estimates_are_within_their_errors(mlp_ggn) -> None:
    op, G = mlp_ggn
    est = op.estimate_trace(30, method="hutchinson", seed=3)
    assert abs(float(est.value - torch.trace(G))) <= 5 * float(est.error)
    diag = op.estimate_diagonal(30, method="hutchinson", seed=3)
    assert bool((diag.value - G.diagonal()).abs().le(5 * diag.error + 1e-12).float().mean() > 0.9)
    exact = op.estimate_trace(method="exact")
    torch.testing.assert_close(exact.value, torch.trace(G))


def test_spectral_density_of_the_hessian() -> None:
    model, loss_fn, x, y = _setup(case("mlp"))
    op = curvlab.MatrixFreeHessian(model, loss_fn)
    op.update(x, y)
    H = _dense_hessian(model, loss_fn, x, y)
    density = op.spectral_density(num_probes=4, num_steps=op.num_params)
    grid = density.grid(400, margin=0.5)
    values = density.density(grid)
    mass = float(torch.trapezoid(values, grid))
    assert abs(mass - 1.0) < 1e-3
    # a full Krylov space: every node is an eigenvalue of H
    eigenvalues = torch.linalg.eigvalsh(H)
    used = density.nodes[density.weights > 1e-12]
    distance = (used.unsqueeze(1) - eigenvalues.unsqueeze(0)).abs().min(dim=1).values
    assert float(distance.max()) < 1e-8 * float(eigenvalues.abs().max())


def test_products_are_deterministic_with_dropout_and_leave_the_random_stream() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    op = curvlab.MatrixFreeGGN(model, loss_fn, fisher_type="mc")
    op.update(x, y)
    state = torch.get_rng_state()
    first = op.to_dense()
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(first, op.to_dense(), rtol=0, atol=0)
    torch.testing.assert_close(first, first.T, rtol=1e-12, atol=1e-14)


def test_batchnorm_buffers_are_left_alone() -> None:
    model, loss_fn, x, y = _setup(case("resnet_bn_train"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = curvlab.MatrixFreeGGN(model, loss_fn)
    op.update(x, y)
    dense = op.to_dense()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    _close(dense, _in_op_order(_dense_ggn(model, loss_fn, x, y), op, model))


# --- cross-check against curvlinops (test only) --------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn", "mlp_mse", "mlp_bce"])
@pytest.mark.parametrize("kind", ["ggn", "hessian", "empirical"])
def test_equals_curvlinops(name: str, kind: str) -> None:
    from curvlinops import EFLinearOperator, GGNLinearOperator, HessianLinearOperator

    model, loss_fn, x, y = _setup(case(name))
    params = [p for _, p in ref.flat_params(model)]
    linop = {"ggn": GGNLinearOperator, "hessian": HessianLinearOperator}.get(kind, EFLinearOperator)
    theirs = linop(model, loss_fn, params, [(x, y)], check_deterministic=False)
    if kind == "hessian":
        op: curvlab.Curvature = curvlab.MatrixFreeHessian(model, loss_fn)
    else:
        fisher_type = "exact" if kind == "ggn" else "empirical"
        op = curvlab.MatrixFreeGGN(model, loss_fn, fisher_type=fisher_type)
    op.update(x, y)
    V = torch.randn(
        op.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    _close(op @ V, theirs @ V, rtol=1e-9)


# --- registry, errors -------------------------------------------------------------------------


def test_operators_but_not_registered_backends() -> None:
    """A registered backend takes batch statistics (extract, accumulate, NaturalGradient);
    the matrix-free operators need the batch itself, so they stay out of the registry."""
    assert not {"MatrixFreeGGN", "MatrixFreeHessian"} & {
        curvlab.curvature.registry.get(n).__name__ for n in curvlab.available()
    }
    model, loss_fn, _, _ = _setup(case("mlp"))
    op = curvlab.MatrixFreeGGN(model, loss_fn, fisher_type="empirical", seed=3)
    assert isinstance(op, curvlab.Curvature) and op.fisher_type == "empirical"
    assert set(op.coverage().values()) == {"MatrixFreeGGN"}


def test_clear_errors() -> None:
    model, loss_fn, x, y = _setup(case("mlp"))
    with pytest.raises(ValueError, match="fisher_type"):
        curvlab.MatrixFreeGGN(model, loss_fn, fisher_type="kfac")
    with pytest.raises(ValueError, match="mc_samples"):
        curvlab.MatrixFreeGGN(model, loss_fn, fisher_type="mc", mc_samples=0)
    with pytest.raises(ValueError, match="block_size"):
        curvlab.MatrixFreeGGN(model, loss_fn, block_size=0)
    op = curvlab.MatrixFreeGGN(model, loss_fn)
    with pytest.raises(RuntimeError, match="no curvature accumulated"):
        op.trace()
    with pytest.raises(TypeError, match="pass targets"):
        op.update(x)
    with pytest.raises(ValueError, match="no batches"):
        op.update([])
    with pytest.raises(ValueError, match="not an \\(inputs, targets\\) pair"):
        op.update([x])
    with pytest.raises(ValueError, match="targets"):
        op.update(x, y[:2])
    assert op.num_batches == 0
    op.update(x, y)
    with pytest.raises(TypeError, match="holds batches, not statistics"):
        op.recording()
    with pytest.raises(TypeError, match="holds batches, not statistics"):
        curvlab.extract(model, loss_fn, x, y, [op])
    with pytest.raises(TypeError, match="holds batches, not statistics"):
        op.statistics()
    with pytest.raises(ValueError, match="method"):
        op.estimate_trace(method="xtrace")
    with pytest.raises(ValueError, match=r"expected \[43\]"):
        op @ torch.ones(3, dtype=torch.float64)


def test_indefinite_hessian_solve_raises() -> None:
    model, loss_fn, x, y = _setup(case("mlp"))
    op = curvlab.MatrixFreeHessian(model, loss_fn)
    op.update(x, y)
    lowest = float(torch.linalg.eigvalsh(_dense_hessian(model, loss_fn, x, y))[0])
    assert lowest < 0
    b = op._unflatten(torch.ones(op.num_params, dtype=torch.float64))
    with warnings.catch_warnings(), pytest.raises(LinAlgError, match="not positive definite"):
        warnings.simplefilter("ignore")
        op.solve(b, 0.0)
    op.solve(b, -lowest + 1.0)  # damped past λ_min: positive definite
