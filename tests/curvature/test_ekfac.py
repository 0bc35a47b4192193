"""EKFAC: the refitted diagonal is diag(Qᵀ F Q) of the layer's Fisher block
(concepts/kronecker.md#ekfac)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.curvature.kronecker import ekfac as ekfac_module
from tests.cases import CASES, DTYPE

_CASES = [c for c in CASES if c.reduction == "mean" or c.model.name == "conv1d"]


def _fisher_blocks(case, x, y) -> list[Tensor]:
    model, loss_fn = case.build()
    blocks = curvlab.BlockDiagonal(model, loss_fn, fisher_type="exact")
    blocks.update(x, y)
    return blocks.blocks()


def _in_parameter_order(layer, q: Tensor) -> Tensor:
    """Rows of ``kron(Q_G, Q_A)`` (row-major ``[W | b]``) permuted into ``[vec(W), b]``."""
    d_out = layer.params[0].shape[0]
    d_in = q.shape[0] // d_out
    idx = torch.arange(d_out * d_in).reshape(d_out, d_in)
    perm = (
        idx.reshape(-1)
        if len(layer.params) == 1
        else torch.cat([idx[:, :-1].reshape(-1), idx[:, -1]])
    )
    return q[perm]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", _CASES, ids=lambda c: c.id)
def test_diagonal_is_the_fisher_block_in_the_eigenbasis(case, approx) -> None:
    x, y = case.data(n=5)
    model, loss_fn = case.build()
    ekfac = curvlab.EKFAC(model, loss_fn, fisher_type="exact", kfac_approx=approx)
    ekfac.update(x, y)
    kfac = curvlab.KFC(model, loss_fn, fisher_type="exact", kfac_approx=approx)
    kfac.update(x, y)
    fisher = _fisher_blocks(case, x, y)
    start = 0
    ekfac_dense, kfac_dense = ekfac.to_dense(), kfac.to_dense()
    for layer, (q_g, q_a), s, block in zip(
        ekfac.layers, ekfac.eigenbasis(), ekfac.scalings(), fisher
    ):
        q = _in_parameter_order(layer, torch.kron(q_g, q_a))
        expected = torch.diagonal(q.T @ block @ q).reshape(s.shape)
        torch.testing.assert_close(s, expected, rtol=1e-9, atol=1e-12 * float(block.abs().max()))
        # the Frobenius-optimal diagonal in K-FAC's eigenbasis is never worse than K-FAC's own
        stop = start + layer.numel
        err_ekfac = (ekfac_dense[start:stop, start:stop] - block).norm()
        err_kfac = (kfac_dense[start:stop, start:stop] - block).norm()
        assert err_ekfac <= err_kfac + 1e-12 * block.norm()
        start = stop


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_single_linear_layer_batch_of_one_is_exact(fisher_type) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(DTYPE)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(1, 4, dtype=DTYPE), torch.tensor([2])
    ekfac = curvlab.EKFAC(model, loss_fn, fisher_type=fisher_type)
    dense = curvlab.make(
        "exact_fisher" if fisher_type == "exact" else "empirical_fisher", model, loss_fn
    )
    curvlab.extract(model, loss_fn, x, y, [ekfac, dense])
    torch.testing.assert_close(ekfac.to_dense(), dense.to_dense(), rtol=1e-10, atol=1e-12)


def test_further_batches_refit_in_the_fixed_basis_and_refresh_recomputes_it() -> None:
    case = next(c for c in CASES if c.id == "conv2d-mse-mean")
    x, y = case.data(n=7)
    model, loss_fn = case.build()
    ekfac = curvlab.EKFAC(model, loss_fn, fisher_type="exact")
    ekfac.update(x[:3], y[:3])
    basis = [tuple(t.clone() for t in pair) for pair in ekfac.eigenbasis()]
    ekfac.update(x[3:], y[3:])
    # the basis stays; the diagonal is the union's Fisher block in that basis
    fisher = _fisher_blocks(case, x, y)
    for layer, (q_g, q_a), old, s, block in zip(
        ekfac.layers, ekfac.eigenbasis(), basis, ekfac.scalings(), fisher
    ):
        assert torch.equal(q_g, old[0]) and torch.equal(q_a, old[1])
        q = _in_parameter_order(layer, torch.kron(q_g, q_a))
        torch.testing.assert_close(s, torch.diagonal(q.T @ block @ q).reshape(s.shape))
    ekfac.refresh_basis()
    with pytest.raises(RuntimeError, match="no curvature accumulated"):
        ekfac.scalings()
    kfac = curvlab.KFC(model, loss_fn, fisher_type="exact")
    kfac.update(x, y)
    for (q_g, q_a), f in zip(ekfac._basis, kfac.factors()):
        # the new basis diagonalises the accumulated factors
        off_g, off_a = q_g.T @ f.G @ q_g, q_a.T @ f.A @ q_a
        assert (off_g - torch.diag(torch.diagonal(off_g))).abs().max() < 1e-10
        assert (off_a - torch.diag(torch.diagonal(off_a))).abs().max() < 1e-10


def test_chunked_per_sample_gradients_equal_one_chunk(monkeypatch) -> None:
    case = next(c for c in CASES if c.id == "conv1d-ce-sum")
    x, y = case.data(n=6)
    results = []
    for chunk in (1 << 24, 1):
        monkeypatch.setattr(ekfac_module, "_CHUNK_ELEMENTS", chunk)
        model, loss_fn = case.build()
        ekfac = curvlab.EKFAC(model, loss_fn, fisher_type="exact")
        ekfac.update(x, y)
        results.append(ekfac.scalings())
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_undamped_solve_with_zero_eigenvalues_is_reported() -> None:
    case = next(c for c in CASES if c.id == "mlp-ce-mean")
    model, loss_fn = case.build()
    ekfac = curvlab.EKFAC(model, loss_fn, fisher_type="exact")
    ekfac.update(*case.data(n=2))
    with pytest.raises(curvlab.linalg.LinAlgError, match="use damping > 0"):
        ekfac.solve([torch.ones_like(p) for p in ekfac.params], 0.0)


def test_refit_every_refits_the_basis_from_the_preconditioners_average() -> None:
    case = next(c for c in CASES if c.id == "mlp-ce-mean")
    model, loss_fn = case.build()
    ekfac = curvlab.EKFAC(model, loss_fn, fisher_type="exact", refit_every=3)
    precond = curvlab.NaturalGradient(
        ekfac, damping=1e-2, invert_every=10, ema_decay=0.9, kl_clip=None
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids, held, refitted = [], None, None
    for step in range(7):
        x, y = case.data(n=8, seed=step)
        if step == 3:  # the factors held before this step's reset: the average so far
            held = ekfac.factors()
        opt.zero_grad()
        precond.backward(loss_fn(model(x), y))
        precond.step()  # a new basis restarts the average and inverts at once
        opt.step()
        ids.append(ekfac.statistics()["basis_id"])
        if step == 3:
            refitted = ekfac.eigenbasis()
    assert ids == [1, 1, 1, 2, 2, 2, 3]
    assert held is not None and refitted is not None
    for (q_g, q_a), f in zip(refitted, held):
        off_g, off_a = q_g.T @ f.G @ q_g, q_a.T @ f.A @ q_a
        assert (off_g - torch.diag(torch.diagonal(off_g))).abs().max() < 1e-10
        assert (off_a - torch.diag(torch.diagonal(off_a))).abs().max() < 1e-10


def test_refit_every_must_be_a_positive_int() -> None:
    model, loss_fn = CASES[0].build()
    with pytest.raises(ValueError, match="refit_every must be a positive int or None"):
        curvlab.EKFAC(model, loss_fn, refit_every=0)
