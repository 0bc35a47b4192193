"""``factor_dtype`` and ``inverse_dtype`` of the K-FAC backends: where each dtype lives,
that results stay in the parameters' dtype, and that float64 factors of a float32 model
match a float64 model's K-FAC."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab


def _setup(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    x = torch.randn(16, 6, dtype=dtype)
    y = torch.randint(0, 3, (16,))
    return model, nn.CrossEntropyLoss(), x, y


@pytest.mark.parametrize("cls", [curvlab.KFAC, curvlab.KFC])
@pytest.mark.parametrize("damping_mode", ["exact", "factored"])
def test_float64_factors_and_inverses_of_a_float32_model(cls, damping_mode) -> None:
    model, loss_fn, x, y = _setup()
    c = cls(
        model,
        loss_fn,
        fisher_type="exact",
        damping_mode=damping_mode,
        factor_dtype=torch.float64,
        inverse_dtype=torch.float64,
    )
    c.update(x, y)
    assert all(f.A.dtype == torch.float64 and f.G.dtype == torch.float64 for f in c.factors())
    reference_model = _setup(torch.float64)[0]
    reference = cls(reference_model, loss_fn, fisher_type="exact", damping_mode=damping_mode)
    reference.update(x.double(), y)
    for f, r in zip(c.factors(), reference.factors()):
        torch.testing.assert_close(f.A, r.A, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(f.G, r.G, rtol=1e-5, atol=1e-7)
    grads = [torch.randn_like(p) for p in c.params]
    solved = c.solve(grads, 1e-3)
    assert all(s.dtype == torch.float32 for s in solved)  # back in the parameters' dtype
    expected = reference.solve([g.double() for g in grads], 1e-3)
    for s, e in zip(solved, expected):
        # the float32 forward rounds the inputs of the statistics; damping 1e-3 amplifies it
        torch.testing.assert_close(s.double(), e, rtol=2e-3, atol=1e-5)


def test_bfloat16_factors_with_float32_inverses() -> None:
    model, loss_fn, x, y = _setup()
    c = curvlab.KFAC(
        model,
        loss_fn,
        fisher_type="exact",
        factor_dtype=torch.bfloat16,
        inverse_dtype=torch.float32,
    )
    c.update(x, y)
    assert all(f.A.dtype == torch.bfloat16 for f in c.factors())
    solved = c.solve([torch.randn_like(p) for p in c.params], 1e-2)
    assert all(s.dtype == torch.float32 and torch.isfinite(s).all() for s in solved)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = curvlab.NaturalGradient(c, optimizer=opt)  # the moving average keeps bf16
    for _ in range(3):
        opt.zero_grad()
        precond.backward(loss_fn(model(x), y))
        precond.step()
        opt.step()
    assert all(f.A.dtype == torch.bfloat16 for f in c.factors())


def test_bad_dtypes_are_refused() -> None:
    model, loss_fn, _, _ = _setup()
    with pytest.raises(ValueError, match="factor_dtype must be one of"):
        curvlab.KFAC(model, loss_fn, factor_dtype=torch.int64)
    with pytest.raises(ValueError, match="inverse_dtype must be one of"):
        curvlab.KFC(model, loss_fn, inverse_dtype="float64")  # type: ignore[arg-type]
