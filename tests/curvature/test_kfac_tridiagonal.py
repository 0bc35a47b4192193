"""K-FAC's block-tridiagonal inverse against a dense evaluation of Ξᵀ Λ Ξ
(concepts/block_tridiagonal.md#the-math)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

import curvlab
from tests.cases import CASES, DTYPE


def _flat(v) -> Tensor:
    return torch.cat([t.reshape(-1) for t in v])


def _perm(d_out: int, d_in: int, bias: bool) -> Tensor:
    idx = torch.arange(d_out * d_in).reshape(d_out, d_in)
    return torch.cat([idx[:, :-1].reshape(-1), idx[:, -1]]) if bias else idx.reshape(-1)


def _deep(loss: str = "ce") -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5),
        nn.Tanh(),
        nn.Linear(5, 4),
        nn.Tanh(),
        nn.Linear(4, 4, bias=False),
        nn.Tanh(),
        nn.Linear(4, 3),
    ).to(DTYPE)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=gen, dtype=DTYPE)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (40,), generator=gen)
    return model, nn.MSELoss(reduction="sum"), x, torch.randn(40, 3, generator=gen, dtype=DTYPE)


def _dense_blocks(kfac: curvlab.KFAC, damping: float | None):
    """Per layer the (damped) diagonal block and per boundary the off-diagonal block, as
    dense matrices in parameter order, from the backend's own statistics."""
    stats = kfac.statistics()
    diag, perms = [], []
    for layer, a, g in zip(kfac.layers, stats["A"], stats["G"]):
        perm = _perm(g.shape[0], a.shape[0], len(layer.params) == 2)
        perms.append(perm)
        if damping is not None:
            gamma = damping**0.5
            pi = ((a.trace() / a.shape[0]) / (g.trace() / g.shape[0])).sqrt()
            a = a + gamma * pi * torch.eye(a.shape[0], dtype=DTYPE)
            g = g + gamma / pi * torch.eye(g.shape[0], dtype=DTYPE)
        diag.append(torch.kron(g, a)[perm][:, perm])
    off = [
        torch.kron(g, a)[perms[k]][:, perms[k + 1]]
        for k, (a, g) in enumerate(zip(stats["A_cross"], stats["G_cross"]))
    ]
    return diag, off


def _xi_lambda_xi(diag: list[Tensor], off: list[Tensor], v: Tensor) -> Tensor:
    """Dense ``Ξᵀ Λ Ξ v`` conditioning the chain on the next layer
    (concepts/block_tridiagonal.md#the-math)."""
    n = len(diag)
    psi = [off[k] @ torch.linalg.inv(diag[k + 1]) for k in range(n - 1)]
    sigma = [diag[k] - psi[k] @ off[k].T for k in range(n - 1)] + [diag[-1]]
    sizes = [len(d) for d in diag]
    parts = list(v.split(sizes))
    w = [parts[k] - psi[k] @ parts[k + 1] for k in range(n - 1)] + [parts[-1]]
    z = [torch.linalg.solve(s, wk) for s, wk in zip(sigma, w)]
    u = [z[0]] + [z[k] - psi[k - 1].T @ z[k - 1] for k in range(1, n)]
    return torch.cat(u)


@pytest.mark.parametrize("fisher_type", ["exact", "mc", "empirical"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_solve_equals_the_dense_xi_lambda_xi(loss, fisher_type) -> None:
    model, loss_fn, x, y = _deep(loss)
    kfac = curvlab.BlockTridiagonalKFAC(model, loss_fn, fisher_type=fisher_type)
    kfac.update(x, y)
    assert len(kfac._chain.runs()) == 1
    damping = 0.05
    diag, off = _dense_blocks(kfac, damping)
    v = [torch.randn_like(p) for p in kfac.params]
    expected = _xi_lambda_xi(diag, off, _flat(v))
    torch.testing.assert_close(_flat(kfac.solve(v, damping)), expected, rtol=1e-10, atol=1e-12)
    # conditioning the chain the other way round gives the same F̂⁻¹
    # (concepts/block_tridiagonal.md#the-math)
    sizes = [len(d) for d in diag]
    reordered = torch.cat(list(_flat(v).split(sizes))[::-1])
    backwards = _xi_lambda_xi(diag[::-1], [o.T for o in off[::-1]], reordered)
    torch.testing.assert_close(
        torch.cat(list(backwards.split(sizes[::-1]))[::-1]), expected, rtol=1e-9, atol=1e-12
    )


def test_completion_agrees_on_the_tridiagonal_blocks_and_is_psd() -> None:
    model, loss_fn, x, y = _deep("mse")
    kfac = curvlab.BlockTridiagonalKFAC(model, loss_fn, fisher_type="exact")
    kfac.update(x, y)
    dense = kfac.to_dense()
    diag, off = _dense_blocks(kfac, None)
    starts = [0]
    for d in diag:
        starts.append(starts[-1] + len(d))
    block = [slice(a, b) for a, b in itertools.pairwise(starts)]
    for k, d in enumerate(diag):
        torch.testing.assert_close(dense[block[k], block[k]], d, rtol=1e-10, atol=1e-12)
    for k, o in enumerate(off):
        torch.testing.assert_close(dense[block[k], block[k + 1]], o, rtol=1e-8, atol=1e-12)
    assert torch.linalg.eigvalsh(dense).min() >= -1e-10 * float(dense.abs().max())
    v = [torch.randn_like(p) for p in kfac.params]
    torch.testing.assert_close(_flat(kfac.matvec(v)), dense @ _flat(v))


def test_conv_to_linear_boundary_falls_back_to_block_diagonal() -> None:
    case = next(c for c in CASES if c.id == "conv2d-ce-mean")
    model, loss_fn = case.build()
    x, y = case.data(n=6)
    tri = curvlab.BlockTridiagonalKFAC(model, loss_fn, fisher_type="exact")
    diag = curvlab.KFC(model, loss_fn, fisher_type="exact", damping_mode="factored")
    curvlab.extract(model, loss_fn, x, y, [tri, diag])
    assert tri._chain.runs() == [[0], [1]]  # the conv sees 9 positions per sample
    assert tri.statistics()["A_cross"] == [None]
    v = [torch.randn_like(p) for p in tri.params]
    torch.testing.assert_close(_flat(tri.solve(v, 0.1)), _flat(diag.solve(v, 0.1)))
    torch.testing.assert_close(tri.to_dense(), diag.to_dense())


def test_kfac_has_no_structure_switch_and_the_registry_builds_the_class() -> None:
    model, loss_fn, _, _ = _deep()
    with pytest.raises(TypeError, match="structure"):
        curvlab.KFAC(model, loss_fn, structure="block_tridiagonal")  # type: ignore[call-arg]
    built = curvlab.make("block_tridiagonal_kfac", model, loss_fn)
    assert type(built) is curvlab.BlockTridiagonalKFAC
    assert not isinstance(built, curvlab.KFAC)


@pytest.mark.parametrize(
    "option",
    [
        {"damping_mode": "exact"},
        {"separate_bias": True},
        {"recurrent": "series"},
        {"output_factor": "dense"},
        {"factor_dtype": torch.float64},
        {"inverse_dtype": torch.float64},
    ],
    ids=lambda option: next(iter(option)),
)
def test_block_diagonal_options_are_not_its_arguments(option: dict) -> None:
    """The chain damps its dense factors the factored way; K-FAC's block-diagonal options
    are no arguments of it (a TypeError naming the argument, as for any function)."""
    model, loss_fn, _, _ = _deep()
    with pytest.raises(TypeError, match=next(iter(option))):
        curvlab.BlockTridiagonalKFAC(model, loss_fn, **option)


@pytest.mark.parametrize("written_by", ["KFAC", "KFC"])
def test_a_format2_state_of_kfac_with_the_chain_loads_into_the_class(written_by: str) -> None:
    """Before ``BlockTridiagonalKFAC`` was reached by its own name, its states named the
    class that built it, ``KFAC``/``KFC``; ``migrate_state`` reads them as its own. A plain
    K-FAC state (no chain) is still refused."""
    model, loss_fn, x, y = _deep()
    fitted = curvlab.BlockTridiagonalKFAC(model, loss_fn, fisher_type="exact")
    fitted.update(x, y)
    state = fitted.state_dict()
    sums, counts, tags = (state["statistics"][k] for k in ("sums", "counts", "tags"))
    old = {  # the layout of those states: per-backend keys, no "layout" entry
        **{k: v for k, v in state.items() if k != "layout"},
        "backend": written_by,
        "statistics": {
            "a_sum": sums["A"],
            "a_count": counts["a_count"],
            "g_sum": sums["G"],
            "chain": {
                "order": tags["order"],
                "coupled": tags["coupled"],
                "a_cross": sums["A_cross"],
                "a_cross_count": counts["a_cross_count"],
                "g_cross": sums["G_cross"],
            },
        },
    }
    loaded = curvlab.BlockTridiagonalKFAC(model, loss_fn, fisher_type="exact")
    loaded.load_state_dict(old)
    v = [torch.randn_like(p) for p in fitted.params]
    torch.testing.assert_close(_flat(loaded.solve(v, 0.1)), _flat(fitted.solve(v, 0.1)))
    plain = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    plain.update(x, y)
    with pytest.raises(ValueError, match="the state belongs to 'KFAC'"):
        loaded.load_state_dict(plain.state_dict())
