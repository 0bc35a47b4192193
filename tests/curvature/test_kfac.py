"""KFAC and KFC: exactness where theory says so, curvlinops agreement, KFC's definition.

References: the dense ``ExactFisher``/``BlockDiagonal`` (themselves checked against a
torch.func reference), curvlinops' ``KFACLinearOperator`` (test-only), and an
independent autograd computation of the KFC factors for Conv1d/Conv3d.
"""

from __future__ import annotations

import pytest
import torch
from curvlinops import KFACLinearOperator
from torch import Tensor, nn

import curvlab
from tests.cases import CASES, DTYPE, LOSSES

FISHER_TYPES = ["exact", "mc", "empirical"]
_CURVLINOPS_TYPE = {"exact": "type-2", "mc": "mc", "empirical": "empirical"}


def _flat(v: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in v])


def _close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    atol = rtol * max(float(expected.abs().max()), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _targets(loss_cls: type[nn.Module], n: int, c: int, gen: torch.Generator) -> Tensor:
    if loss_cls is nn.CrossEntropyLoss:
        return torch.randint(0, c, (n,), generator=gen)
    if loss_cls is nn.BCEWithLogitsLoss:
        return torch.randint(0, 2, (n, c), generator=gen).to(DTYPE)
    return torch.randn(n, c, generator=gen, dtype=DTYPE)


# --- exactness ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES, ids=lambda case: case.name)
def test_single_linear_layer_batch_of_one_is_exact(loss, reduction) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).to(DTYPE)
    loss_fn = loss.loss_cls(reduction=reduction)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 5, generator=gen, dtype=DTYPE), _targets(loss.loss_cls, 1, 3, gen)
    kfac = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    exact = curvlab.ExactFisher(model, loss_fn)
    curvlab.extract(model, loss_fn, x, y, [kfac, exact])
    _close(kfac.to_dense(), exact.to_dense(), rtol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deep_linear_network_mse_expand_is_exact(reduction) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 2)).to(DTYPE)
    loss_fn = nn.MSELoss(reduction=reduction)
    x, y = torch.randn(9, 4, dtype=DTYPE), torch.randn(9, 2, dtype=DTYPE)
    kfac = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    blocks = curvlab.BlockDiagonal(model, loss_fn)
    curvlab.extract(model, loss_fn, x, y, [kfac, blocks])
    _close(kfac.to_dense(), blocks.to_dense(), rtol=1e-10)


def test_mc_converges_to_exact() -> None:
    case = next(c for c in CASES if c.id == "conv2d-ce-mean")
    model, loss_fn = case.build()
    x, y = case.data(n=6)
    exact = curvlab.KFC(model, loss_fn, fisher_type="exact")
    exact.update(x, y)
    target = exact.to_dense()
    errors = []
    for m in (1, 30, 1000):
        torch.manual_seed(0)
        mc = curvlab.KFC(model, loss_fn, fisher_type="mc", mc_samples=m)
        mc.update(x, y)
        errors.append(float((mc.to_dense() - target).norm() / target.norm()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1


# --- curvlinops agreement ------------------------------------------------------------------


def _sequence_model() -> nn.Module:
    # the first Linear sees [N, T=4, 3]: weight sharing over 4 positions (expand ≠ reduce)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3))


_XCHECK = {
    "mlp": (CASES[0].model.build, (5,)),
    "sequence": (_sequence_model, (4, 3)),
    "conv2d": (next(c for c in CASES if c.model.name == "conv2d").model.build, (2, 5, 5)),
}


def _curvlinops_factors(model, loss_fn, x, y, fisher_type, approx, mc_samples):
    op = KFACLinearOperator(
        model,
        loss_fn,
        [p for p in model.parameters()],
        [(x, y)],
        check_deterministic=False,
        fisher_type=_CURVLINOPS_TYPE[fisher_type],
        mc_samples=mc_samples,
        kfac_approx=approx,
        separate_weight_and_bias=False,
    )
    op.compute_kronecker_factors()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return [(op._input_covariances[n], op._gradient_covariances[n]) for n in names]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", FISHER_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES, ids=lambda case: case.name)
@pytest.mark.parametrize("arch", list(_XCHECK))
def test_factors_match_curvlinops(arch, loss, reduction, fisher_type, approx) -> None:
    build, shape = _XCHECK[arch]

    def fresh() -> tuple[nn.Module, nn.Module]:  # curvlinops gets its own, un-extended copy
        torch.manual_seed(0)
        return build().to(DTYPE), loss.loss_cls(reduction=reduction)

    model, loss_fn = fresh()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, *shape, generator=gen, dtype=DTYPE), _targets(loss.loss_cls, 6, 3, gen)
    ours = curvlab.KFC(
        model,
        loss_fn,
        fisher_type=fisher_type,
        kfac_approx=approx,
        mc_samples=4000 if fisher_type == "mc" else 1,
    )
    torch.manual_seed(3)
    ours.update(x, y)
    # MC labels differ between the libraries, and curvlinops draws them one backward pass
    # at a time: compare our many-sample MC factor with curvlinops' exact-type factor, which
    # is its expectation.
    ref_type = "exact" if fisher_type == "mc" else fisher_type
    theirs = _curvlinops_factors(*fresh(), x, y, ref_type, approx, 1)
    for f, (a_ref, g_ref) in zip(ours.factors(), theirs):
        _close(f.A, a_ref, rtol=1e-10)
        if fisher_type == "mc":
            err = (f.G - g_ref).norm() / g_ref.norm()
            assert err < 0.1, f"MC G is {err:.3f} (relative Frobenius) from the exact-type G"
        else:
            _close(f.G, g_ref, rtol=1e-9)
