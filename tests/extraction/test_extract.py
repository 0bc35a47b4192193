"""``curvlab.extract``: one backward pass feeding several backends."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab
from tests.cases import CASES

_CASES = [c for c in CASES if c.id in {"mlp-mse-mean", "conv2d-ce-mean", "conv1d-bce-sum"}]


@pytest.mark.parametrize("case", _CASES, ids=lambda c: c.id)
def test_extract_equals_separate_updates(case) -> None:
    model, loss_fn = case.build()
    x, y = case.data(n=6)
    kinds = [
        ("exact_fisher", {}),
        ("empirical_fisher", {}),
        ("block_diagonal", {}),
        ("block_diagonal", {"fisher_type": "empirical"}),
    ]
    joint = [curvlab.make(name, model, loss_fn, **kw) for name, kw in kinds]
    loss = curvlab.extract(model, loss_fn, x, y, joint)
    torch.testing.assert_close(loss, loss_fn(model(x), y).detach())
    for (name, kw), c in zip(kinds, joint):
        alone = curvlab.make(name, model, loss_fn, **kw)
        alone.update(x, y)
        torch.testing.assert_close(c.to_dense(), alone.to_dense(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", _CASES, ids=lambda c: c.id)
def test_backends_sharing_one_extension_stay_independent(case) -> None:
    model, loss_fn = case.build()
    kinds = [
        ("kfc", {"fisher_type": "exact"}),
        ("kfc", {"fisher_type": "exact"}),
        ("ekfac", {"fisher_type": "exact"}),
        ("block_diagonal", {}),
    ]
    joint = [curvlab.make(name, model, loss_fn, **kw) for name, kw in kinds]
    alone = [curvlab.make(name, model, loss_fn, **kw) for name, kw in kinds]
    for seed in (1, 2):  # the second batch adds into the first one's statistics in place
        x, y = case.data(n=4, seed=seed)
        curvlab.extract(model, loss_fn, x, y, joint)
        for c in alone:
            c.update(x, y)
    for a, b in zip(joint, alone):
        torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=1e-12, atol=1e-14)


def test_accumulate_after_callers_backward_matches_update() -> None:
    case = next(c for c in CASES if c.id == "mlp-ce-mean")
    model, loss_fn = case.build()
    x, y = case.data(n=5)
    c = curvlab.BlockDiagonal(model, loss_fn)
    with c.recording():
        loss = loss_fn(model(x), y)
    c.accumulate(loss)
    assert all(p.grad is None for p in model.parameters())  # accumulate leaves .grad alone
    loss.backward()
    # the caller's backward produced ordinary gradients as well
    assert all(p.grad is not None for p in model.parameters())
    ref = curvlab.BlockDiagonal(model, loss_fn)
    ref.update(x, y)
    torch.testing.assert_close(c.to_dense(), ref.to_dense(), rtol=1e-12, atol=1e-14)


def test_mc_backends_with_same_samples_share_one_pass() -> None:
    case = next(c for c in CASES if c.id == "mlp-ce-sum")
    model, loss_fn = case.build()
    full = curvlab.ExactFisher(model, loss_fn, fisher_type="mc", mc_samples=4)
    blocks = curvlab.BlockDiagonal(model, loss_fn, fisher_type="mc", mc_samples=4)
    curvlab.extract(model, loss_fn, *case.data(n=5), [full, blocks])
    # same sampled labels: the block-diagonal backend sees exactly the full matrix's blocks
    dense = full.to_dense()
    start = 0
    for layer, block in zip(blocks.layers, blocks.blocks()):
        stop = start + layer.numel
        torch.testing.assert_close(block, dense[start:stop, start:stop], rtol=1e-12, atol=1e-14)
        start = stop


def test_different_mc_samples_need_the_hooks_engine() -> None:
    case = next(c for c in CASES if c.id == "mlp-ce-sum")
    model, loss_fn = case.build()
    a = curvlab.ExactFisher(model, loss_fn, fisher_type="mc", mc_samples=1)
    b = curvlab.BlockDiagonal(model, loss_fn, fisher_type="mc", mc_samples=2)
    curvlab.extract(model, loss_fn, *case.data(), [a, b])  # auto: the hooks engine
    assert a.num_batches == b.num_batches == 1
    a = curvlab.ExactFisher(model, loss_fn, fisher_type="mc", mc_samples=1, engine="backpack")
    b = curvlab.BlockDiagonal(model, loss_fn, fisher_type="mc", mc_samples=2, engine="backpack")
    with pytest.raises(ValueError, match="incompatible BackPACK extensions"):
        curvlab.extract(model, loss_fn, *case.data(), [a, b])


def test_extract_rejects_curvature_of_another_model() -> None:
    case = next(c for c in CASES if c.id == "mlp-ce-sum")
    model, loss_fn = case.build()
    other, _ = case.build()
    c = curvlab.ExactFisher(other, loss_fn)
    with pytest.raises(ValueError, match="another model"):
        curvlab.extract(model, loss_fn, *case.data(), [c])
    with pytest.raises(ValueError, match="at least one"):
        curvlab.extract(model, loss_fn, *case.data(), [])


def test_recorded_batches_replay_under_backpack_only_where_that_is_exact() -> None:
    """accumulate(loss) reruns a Sequential model's recorded input under BackPACK (one
    backward instead of one per row) when auto prefers it; with dropout in training mode
    a second forward would differ, so the recorded graph is used."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    for dropout, expected in ((0.0, "backpack"), (0.5, "hooks")):
        model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(dropout), nn.Tanh(), nn.Linear(5, 3))
        model = model.to(torch.float64)
        loss_fn = nn.CrossEntropyLoss()
        auto = curvlab.ExactFisher(model, loss_fn)
        hooks = curvlab.ExactFisher(model, loss_fn, engine="hooks")
        seen: list[str] = []

        def consume(result, seen=seen, original=auto._consume):  # records the engine used
            seen.append(result.engine)
            original(result)

        auto._consume = consume
        with auto.recording(), hooks.recording():
            loss = loss_fn(model(x), y)
        auto.accumulate(loss)
        hooks.accumulate(loss)
        assert seen == [expected]
        torch.testing.assert_close(auto.to_dense(), hooks.to_dense(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("engine", ["hooks", "backpack"])
def test_inputs_that_require_grad_give_the_same_curvature(engine: str) -> None:
    """An input with requires_grad=True (laplace-torch's enable_backprop) once kept
    BackPACK's hook on the first layer from firing, so its parameters got no rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    loss_fn = nn.MSELoss(reduction="sum")
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    plain = curvlab.ExactFisher(model, loss_fn, engine=engine)
    plain.update(x, y)
    tracked = curvlab.ExactFisher(model, loss_fn, engine=engine)
    tracked.update(x.clone().requires_grad_(True), y)
    torch.testing.assert_close(tracked.to_dense(), plain.to_dense())
