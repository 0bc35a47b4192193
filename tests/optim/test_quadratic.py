"""``curvlab.optim.quadratic``: exact GGN products by JVPs against the dense exact Fisher."""

from __future__ import annotations

import pytest
import torch

import curvlab
from curvlab.optim.quadratic import evaluate_capturing_inputs, ggn_gram
from tests.cases import CASES


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ggn_gram_matches_the_dense_exact_fisher(case) -> None:
    model, loss_fn = case.build()
    x, y = case.data(n=5)
    exact = curvlab.ExactFisher(model, loss_fn)  # extends the model: hooks must be suspended
    exact.update(x, y)
    gen = torch.Generator().manual_seed(3)
    vectors = [
        [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in exact.params] for _ in range(3)
    ]
    gram = ggn_gram(model, loss_fn, x, exact.params, vectors)
    stacked = torch.stack([torch.cat([t.flatten() for t in v]) for v in vectors])
    expected = stacked @ exact.to_dense() @ stacked.T
    torch.testing.assert_close(gram, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))


def test_evaluate_capturing_inputs() -> None:
    model, loss_fn = CASES[0].build()
    x, y = CASES[0].data()
    loss, inputs = evaluate_capturing_inputs(model, lambda: loss_fn(model(x), y), "test")
    assert torch.equal(inputs, x) and loss.ndim == 0
    with pytest.raises(RuntimeError, match="test: the closure did not call the model"):
        evaluate_capturing_inputs(model, lambda: torch.tensor(0.0), "test")
