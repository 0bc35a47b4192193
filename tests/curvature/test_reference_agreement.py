"""The dense backends against the independent torch.func reference (``tests/reference.py``).

Exact, empirical and block-diagonal curvatures must equal the reference to rounding
(float64) on every case of ``tests.cases``; the Monte-Carlo Fisher must converge to
the exact one at the ``1/√M`` rate whose constant the reference computes exactly;
accumulating unequal batches must give the curvature of their union.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import curvlab
from tests import reference as ref
from tests.cases import CASES, Case, case_id

# torch's forward-mode AD (inside torch.func.hessian) scripts its decompositions on first use
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

N = 4  # batch size of the agreement tests
MC_CASES = [  # one per loss, both reductions and three models among them
    case
    for case in CASES
    if (case.model.name, case.loss.name, case.reduction)
    in {("mlp", "ce", "mean"), ("mlp_nobias", "mse", "sum"), ("conv2d", "bce", "mean")}
]
MC_BOUND = 4.0  # ‖F̂_M − F‖ ≤ MC_BOUND·√(V/M); Markov: fails with probability ≤ 1/16
ACCUMULATION_SPLIT = (3, 5)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6) -> None:
    """float64 agreement with a scale-aware absolute floor."""
    atol = 1e-10 * max(float(expected.abs().max()), 1e-300)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@functools.cache
def reference(case: Case, n: int = N) -> dict[str, torch.Tensor]:
    """Reference GGN and empirical Fisher of ``case`` on its seeded batch of ``n``."""
    model, loss_fn = case.build()
    X, y = case.data(n)
    return {
        "exact": ref.ggn(model, loss_fn, X, y),
        "empirical": ref.empirical_fisher(model, loss_fn, X, y),
    }


@functools.cache
def mc_variance(case: Case, n: int = N) -> float:
    model, loss_fn = case.build()
    X, _ = case.data(n)
    return ref.mc_single_sample_variance(model, loss_fn, X)


def check_order(c: curvlab.Curvature, model: torch.nn.Module) -> None:
    """The reference's parameter order is the backend's (else the comparison is moot)."""
    named = ref.flat_params(model)
    assert c.param_names == [name for name, _ in named]
    assert all(p is q for p, (_, q) in zip(c.params, named, strict=True))


def block_sizes(c: curvlab.Curvature) -> list[int]:
    return [layer.numel for layer in c.layers]


def dense_backends(model: torch.nn.Module, loss_fn: torch.nn.Module) -> dict:
    return {
        "exact": curvlab.ExactFisher(model, loss_fn),
        "empirical": curvlab.EmpiricalFisher(model, loss_fn),
        "block_exact": curvlab.BlockDiagonal(model, loss_fn, fisher_type="exact"),
        "block_empirical": curvlab.BlockDiagonal(model, loss_fn, fisher_type="empirical"),
    }


def assert_backends_match(backends: dict, expected: dict[str, torch.Tensor]) -> None:
    sizes = block_sizes(backends["block_exact"])
    for name, c in backends.items():
        fisher_type = name.removeprefix("block_")
        target = expected[fisher_type]
        if name.startswith("block_"):
            target = ref.block_diagonal(target, sizes)
        assert_matches(c.to_dense(), target)


# --- exact, empirical, block-diagonal ------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_exact_fisher_matches_reference_ggn(case: Case) -> None:
    model, loss_fn = case.build()
    X, y = case.data(N)
    c = curvlab.ExactFisher(model, loss_fn, fisher_type="exact")
    check_order(c, model)
    c.update(X, y)
    assert_matches(c.to_dense(), reference(case)["exact"])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_empirical_fisher_matches_reference(case: Case) -> None:
    model, loss_fn = case.build()
    X, y = case.data(N)
    c = curvlab.EmpiricalFisher(model, loss_fn)
    check_order(c, model)
    c.update(X, y)
    assert_matches(c.to_dense(), reference(case)["empirical"])


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_block_diagonal_matches_reference_blocks(case: Case, fisher_type: str) -> None:
    model, loss_fn = case.build()
    X, y = case.data(N)
    c = curvlab.BlockDiagonal(model, loss_fn, fisher_type=fisher_type)
    check_order(c, model)
    # one block per layer, weight and bias together
    assert block_sizes(c) == [
        sum(p.numel() for p in m.parameters(recurse=False))
        for m in model.modules()
        if next(m.parameters(recurse=False), None) is not None
    ]
    c.update(X, y)
    expected = ref.block_diagonal(reference(case)[fisher_type], block_sizes(c))
    assert_matches(c.to_dense(), expected)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_one_extract_feeds_every_dense_backend(case: Case) -> None:
    """``curvlab.extract`` with several backends in one backward pass gives the references."""
    model, loss_fn = case.build()
    X, y = case.data(N)
    backends = dense_backends(model, loss_fn)
    loss = curvlab.extract(model, loss_fn, X, y, list(backends.values()))
    with torch.no_grad():
        assert math.isclose(float(loss), float(loss_fn(model(X), y)), rel_tol=1e-12)
    assert_backends_match(backends, reference(case))


# --- Monte-Carlo Fisher ------------------------------------------------------------------


def _mc_error(case: Case, backend: type, mc_samples: int, seed: int) -> float:
    """Frobenius error of the seeded MC estimate against the (block-diagonal) reference."""
    model, loss_fn = case.build()
    X, y = case.data(N)
    c = backend(model, loss_fn, fisher_type="mc", mc_samples=mc_samples)
    torch.manual_seed(seed)  # BackPACK draws the labels from torch's global generator
    c.update(X, y)
    expected = reference(case)["exact"]
    if backend is curvlab.BlockDiagonal:
        expected = ref.block_diagonal(expected, block_sizes(c))
    return float(torch.linalg.matrix_norm(c.to_dense() - expected))


@pytest.mark.parametrize("backend", [curvlab.ExactFisher, curvlab.BlockDiagonal])
@pytest.mark.parametrize("case", MC_CASES, ids=case_id)
def test_mc_fisher_converges_at_the_monte_carlo_rate(case: Case, backend: type) -> None:
    """``E‖F̂_M − F‖²_F = V/M`` with V computed exactly by the reference (labels
    enumerated for CE/BCE, Gaussian moments for MSE). The block-diagonal error is a
    masked part of the full one, so the same bound holds for it.

    Measured on these cases (seeds 0–2): ``‖F̂_M − F‖/√(V/M)`` between 0.5 and 1.6 for
    M ∈ {1, 10, 1000, 2000}; an estimator with the wrong mean (scale, variance of the
    sampled labels, missing factor 2) fails the M=2000 bound by far.
    """
    V = mc_variance(case)
    norm = float(torch.linalg.matrix_norm(reference(case)["exact"]))
    large = 2000
    err_large = _mc_error(case, backend, large, seed=0)
    bound = MC_BOUND * math.sqrt(V / large)
    assert err_large <= bound, (
        f"relative error {err_large / norm:.3g} at M={large} exceeds "
        f"{bound / norm:.3g} = {MC_BOUND}·√(V/M)/‖F‖"
    )
    # and the error shrinks with M (expected factor 10 from M=10 to M=1000)
    err_10 = _mc_error(case, backend, 10, seed=1)
    err_1000 = _mc_error(case, backend, 1000, seed=1)
    assert err_1000 < err_10 / 2, (err_10, err_1000)


# --- accumulation over batches -------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_accumulating_unequal_batches_gives_the_union(case: Case) -> None:
    """``update`` on 3 + 5 samples equals the reference on all 8 (mean and sum)."""
    n1, n2 = ACCUMULATION_SPLIT
    model, loss_fn = case.build()
    X, y = case.data(n1 + n2)
    backends = dense_backends(model, loss_fn)
    for c in backends.values():
        c.update(X[:n1], y[:n1])
        c.update(X[n1:], y[n1:])
        assert c.num_batches == 2 and c.num_samples == n1 + n2
    assert_backends_match(backends, reference(case, n1 + n2))
