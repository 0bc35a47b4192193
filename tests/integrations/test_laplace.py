"""curvlab as a laplace-torch backend: agreement with laplace-torch's own curvlinops
backends (log marginal likelihood and predictive, float64) and fits on models those
backends do not support."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace", reason="the laplace extra: pip install 'curvlab[laplace]'")

from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN  # noqa: E402

from curvlab.integrations.laplace import CurvlabEF, CurvlabGGN  # noqa: E402
from tests.zoo import ZOO  # noqa: E402

DTYPE = torch.float64


def _classification():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    x, y = torch.randn(24, 4, dtype=DTYPE), torch.randint(0, 3, (24,))
    return model, DataLoader(TensorDataset(x, y), batch_size=8), x


def _regression():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DTYPE)
    x = torch.randn(24, 3, dtype=DTYPE)
    y = torch.randn(24, 2, dtype=DTYPE)
    return model, DataLoader(TensorDataset(x, y), batch_size=8), x


PAIRS = [(CurvlabGGN, CurvlinopsGGN), (CurvlabEF, CurvlinopsEF)]


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=["ggn", "ef"])
def test_agrees_with_laplace_torch_curvlinops_backend(ours, theirs, likelihood, structure):
    make = _classification if likelihood == "classification" else _regression
    results = []
    for backend in (ours, theirs):
        model, loader, x = make()
        la = Laplace(
            model,
            likelihood,
            subset_of_weights="all",
            hessian_structure=structure,
            backend=backend,
        )
        la.fit(loader)
        la.prior_precision = 0.5
        predictive = (
            la(x[:5], pred_type="glm", link_approx="probit")
            if (likelihood == "classification")
            else la(x[:5], pred_type="glm")
        )
        results.append((la.log_marginal_likelihood().detach(), predictive))
    (lml, pred), (ref_lml, ref_pred) = results
    torch.testing.assert_close(lml, ref_lml, rtol=1e-6, atol=1e-8)
    if isinstance(pred, tuple):
        for a, b in zip(pred, ref_pred):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    else:
        torch.testing.assert_close(pred, ref_pred, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["resnet_bn_eval", "transformer_plain", "transformer_layer"])
def test_kron_laplace_fits_models_beyond_sequential(name):
    case = next(c for c in ZOO if c.name == name)
    model = case.make_model()
    x, y = case.make_batch(torch.Generator().manual_seed(0))
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="kron",
        backend=CurvlabGGN,
    )
    la.fit(DataLoader(TensorDataset(x, y), batch_size=len(y)))
    la.optimize_prior_precision(method="marglik", n_steps=20)
    assert torch.isfinite(la.log_marginal_likelihood())
    probs = la(x, pred_type="glm", link_approx="probit")
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(x), dtype=probs.dtype))


def test_last_layer_laplace_is_refused_clearly():
    model, loader, _ = _classification()
    la = Laplace(model, "classification", subset_of_weights="last_layer",
                 hessian_structure="kron", backend=CurvlabGGN)  # fmt: skip
    with pytest.raises(NotImplementedError, match="last-layer and subnetwork"):
        la.fit(loader)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", [CurvlabGGN, CurvlabEF])
def test_low_precision_model_gets_curvature_in_its_dtype(backend, dtype, structure):
    # laplace-torch keeps H in the model's dtype (its test_dtype); curvlab accumulates in
    # float32 and hands the result back in the parameters' dtype
    torch.manual_seed(0)
    model = nn.Linear(3, 3, dtype=dtype)
    x, y = torch.randn(10, 3, dtype=dtype), torch.randn(10, 3, dtype=dtype)
    curv = backend(model, "regression")
    loss, h = curv.kron(x, y, N=10) if structure == "kron" else getattr(curv, structure)(x, y)
    assert loss.dtype == dtype
    factors = [f for block in h.kfacs for f in block] if structure == "kron" else [h]
    assert all(f.dtype == dtype for f in factors)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_inputs_that_require_grad_give_the_same_curvature(structure):
    # enable_backprop: laplace-torch's inputs may require grad; every layer still counts
    model, loader, _ = _classification()
    x, y = loader.dataset.tensors
    curv = CurvlabGGN(model, "classification")
    fit = (lambda x: curv.kron(x, y, N=len(y))) if structure == "kron" else (
        lambda x: getattr(curv, structure)(x, y))  # fmt: skip
    (loss, h), (ref_loss, ref_h) = fit(x.clone().requires_grad_()), fit(x)
    torch.testing.assert_close(loss, ref_loss)
    if structure == "kron":
        h, ref_h = h.to_matrix(), ref_h.to_matrix()
    torch.testing.assert_close(h, ref_h)


class _DictModel(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, data):
        return self.net(data["features"])


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_dict_inputs_are_passed_to_the_model_whole(structure):
    model, loader, _ = _classification()
    x, y = loader.dataset.tensors
    dict_loader = DataLoader([{"features": xi, "target": yi} for xi, yi in zip(x, y)], batch_size=8)
    results = []
    for m, data, keys in (
        (_DictModel(model), dict_loader, {"dict_key_x": "features", "dict_key_y": "target"}),
        (model, loader, {}),
    ):
        la = Laplace(m, "classification", subset_of_weights="all", hessian_structure=structure,
                     backend=CurvlabGGN, **keys)  # fmt: skip
        la.fit(data)
        results.append(la.log_marginal_likelihood().detach())
    torch.testing.assert_close(results[0], results[1])
