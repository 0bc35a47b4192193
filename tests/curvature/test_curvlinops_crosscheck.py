"""Cross-check of the dense backends against curvlinops 3.0.1 (a test-only dependency).

concepts/conventions.md fixes curvlab's conventions to curvlinops' definitions, so no conversion is
applied: ``GGNLinearOperator`` (curvlinops/ggn.py) applies ``Jᵀ (∇²_f L) J`` with ``L``
the loss module's own reduction, and ``EFLinearOperator`` (curvlinops/
gradient_moments.py, ``make_batch_ef_matrix_product``) rescales the output gradients
of the reduced loss by ``N`` (CE, mean), ``N·C`` (other losses, mean) or ``1`` (sum),
i.e. ``EF = R Σ_n ∇ℓ_n ∇ℓ_nᵀ``, our convention. Over several batches curvlinops weighs
each batch's matrix by ``N_b / N`` for ``"mean"`` (``CurvatureLinearOperator.
_get_normalization_factor`` in curvlinops/_torch_base.py) and by 1 for ``"sum"``,
which is again the curvature of the union.

The operators are torch ``PyTorchLinearOperator``s in 3.0.1; ``op @ torch.eye(P)``
materialises them in the order of the ``params`` list, each parameter row-major.
"""

from __future__ import annotations

import pytest
import torch

curvlinops = pytest.importorskip("curvlinops")

# torch's forward-mode AD (inside curvlinops' GGN product) scripts its decompositions
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

import curvlab  # noqa: E402
from tests.cases import CASES, Case, case_id  # noqa: E402

CROSSCHECK_CASES = [
    case
    for case in CASES
    if case.model.name == "mlp"
    or (case.model.name == "conv2d" and case.loss.name == "ce")
    or (case.model.name == "conv1d" and case.reduction == "mean" and case.loss.name != "ce")
]
OPERATORS = {
    "exact": (curvlinops.GGNLinearOperator, lambda m, lf: curvlab.ExactFisher(m, lf)),
    "empirical": (curvlinops.EFLinearOperator, lambda m, lf: curvlab.EmpiricalFisher(m, lf)),
}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6) -> None:
    atol = 1e-10 * max(float(expected.abs().max()), 1e-300)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def curvlinops_dense(
    operator: type, model: torch.nn.Module, loss_fn: torch.nn.Module, batches: list
) -> torch.Tensor:
    """``operator`` on ``batches`` (a list of ``(X, y)``), materialised as ``[P, P]``."""
    params = [p for p in model.parameters() if p.requires_grad]
    op = operator(model, loss_fn, params, batches, check_deterministic=True)
    num_params = sum(p.numel() for p in params)
    dense = op @ torch.eye(num_params, dtype=params[0].dtype)
    assert isinstance(dense, torch.Tensor) and dense.shape == (num_params, num_params)
    return dense


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("case", CROSSCHECK_CASES, ids=case_id)
def test_matches_curvlinops(case: Case, kind: str) -> None:
    operator, make = OPERATORS[kind]
    model, loss_fn = case.build()
    X, y = case.data(4)
    # curvlinops first: it runs on the plain model, before BackPACK's ``extend``
    expected = curvlinops_dense(operator, model, loss_fn, [(X, y)])
    c = make(model, loss_fn)
    assert c.params == [p for p in model.parameters() if p.requires_grad]
    c.update(X, y)
    assert_matches(c.to_dense(), expected)


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize(
    "case", [c for c in CROSSCHECK_CASES if c.model.name == "mlp"], ids=case_id
)
def test_matches_curvlinops_over_unequal_batches(case: Case, kind: str) -> None:
    """curvlinops' data-set curvature over batches of 3 and 5 = curvlab's accumulation."""
    operator, make = OPERATORS[kind]
    model, loss_fn = case.build()
    X, y = case.data(8)
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    expected = curvlinops_dense(operator, model, loss_fn, batches)
    c = make(model, loss_fn)
    for Xb, yb in batches:
        c.update(Xb, yb)
    assert_matches(c.to_dense(), expected)
