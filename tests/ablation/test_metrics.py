"""``curvlab.ablation.quality`` on cases whose answer is known, its report and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import curvlab
from curvlab.ablation import QualityRow, quality
from tests.cases import CASES, LOSSES, REDUCTIONS, case_id


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_the_exact_fisher_against_itself_has_no_error(case) -> None:
    model, loss_fn = case.build()
    report = quality(model, loss_fn, case.data(n=6), ["exact_fisher"], damping=1e-2, top_k=4)
    row = report.row("exact_fisher")
    assert row.covered_params == report.num_params
    assert row.matrix_error < 1e-12
    assert row.direction_error < 1e-10
    assert row.direction_cosine == pytest.approx(1.0, abs=1e-12)
    assert row.eigenvalue_error < 1e-12
    assert all(error < 1e-12 for error in row.block_errors.values())
    assert row.top_eigenvalues == pytest.approx(report.reference_eigenvalues, rel=1e-10)
    assert row.peak_memory_bytes > 0 and row.extract_seconds > 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: loss.name)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_kfac_on_one_linear_layer_with_one_sample_is_exact(loss, reduction, bias) -> None:
    # one sample: the Jacobian is I ⊗ aᵀ, so F = G ⊗ A exactly
    # (concepts/block_tridiagonal.md#the-math)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3, bias=bias)).double()
    loss_fn = loss.loss_cls(reduction=reduction)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 5, dtype=torch.float64, generator=generator)
    kfac = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    report = quality(model, loss_fn, (x, loss.targets(1, generator)), {"K-FAC": kfac}, 1e-3)
    row = report.row("K-FAC")
    assert row.matrix_error < 1e-12
    assert row.direction_error < 1e-9
    assert row.direction_cosine == pytest.approx(1.0, abs=1e-12)
    assert row.eigenvalue_error < 1e-12


def _convnet() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """Conv2d ('0') → sigmoid → flatten → Linear ('3'), cross-entropy, float64."""
    (case,) = [c for c in CASES if case_id(c) == "conv2d-ce-mean"]
    model, loss_fn = case.build()
    return model, loss_fn, *case.data(n=12)


def test_partial_coverage_compares_covered_blocks_and_keeps_plain_gradients() -> None:
    model, loss_fn, x, y = _convnet()
    kfac = curvlab.KFAC(model, loss_fn, exclude=["0"])  # the convolution
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    report = quality(model, loss_fn, batches, {"kfac": kfac, "kfc": "kfc"}, 1e-3)
    kfac, kfc = report.row("kfac"), report.row("kfc")
    linear = model[3]
    assert kfac.covered_params == linear.weight.numel() + linear.bias.numel()
    assert kfc.covered_params == report.num_params
    assert set(kfac.block_errors) == {"3"} and set(kfc.block_errors) == {"0", "3"}
    # the direction keeps the plain gradient on the convolutions: far from the exact NGD
    assert kfac.direction_cosine < kfc.direction_cosine
    assert report.num_samples == 12


def test_two_batches_give_the_curvature_of_their_union() -> None:
    model, loss_fn, x, y = _convnet()
    whole = quality(model, loss_fn, (x, y), ["block_diagonal"], 1e-3)
    halves = quality(model, loss_fn, [(x[:7], y[:7]), (x[7:], y[7:])], ["block_diagonal"], 1e-3)
    assert halves.reference_eigenvalues == pytest.approx(whole.reference_eigenvalues, rel=1e-10)
    assert halves.row("block_diagonal").direction_cosine == pytest.approx(
        whole.row("block_diagonal").direction_cosine, abs=1e-10
    )


def test_report_renders_markdown_and_json() -> None:
    model, loss_fn, x, y = _convnet()
    report = quality(model, loss_fn, (x, y), ["kfc", "block_diagonal"], 1e-3, top_k=3)
    text = report.to_markdown()
    assert "exact Fisher (reference)" in text and "| kfc |" in text and "layer 0" in text
    data = json.loads(report.to_json())
    assert {r["backend"] for r in data["rows"]} == {"kfc", "block_diagonal"}
    assert set(data["rows"][0]) == set(QualityRow.__dataclass_fields__)
    assert len(data["reference_eigenvalues"]) == 3


def test_bad_arguments_name_what_is_wrong() -> None:
    model, loss_fn, x, y = _convnet()
    with pytest.raises(ValueError, match="Available: block_diagonal"):
        quality(model, loss_fn, (x, y), ["kfca"], 1e-3)
    with pytest.raises(ValueError, match="damping must be a positive float"):
        quality(model, loss_fn, (x, y), ["kfc"], 0.0)
    with pytest.raises(TypeError, match="non-empty list"):
        quality(model, loss_fn, (x, y), [], 1e-3)
    with pytest.raises(ValueError, match="same number of samples"):
        quality(model, loss_fn, (x, y[:3]), ["kfc"], 1e-3)
    other = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="built on another model"):
        quality(model, loss_fn, (x, y), [curvlab.KFAC(other, loss_fn)], 1e-3)
    with pytest.raises(ValueError, match="appears twice"):
        quality(model, loss_fn, (x, y), ["kfc", curvlab.KFC(model, loss_fn)], 1e-3)
