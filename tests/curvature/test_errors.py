"""Bad input gets a clear error naming the module, shape or argument at fault."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab
from curvlab.linalg import LinAlgError
from tests.cases import CASES

MLP_CE = next(c for c in CASES if c.id == "mlp-ce-mean")


def _mlp_ce():
    model, loss_fn = MLP_CE.build()
    return model, loss_fn, *MLP_CE.data(n=4)


@pytest.mark.parametrize(
    ("loss_fn", "match"),
    [
        (nn.NLLLoss(), "Unsupported loss function NLLLoss.*CrossEntropyLoss, MSELoss"),
        (nn.CrossEntropyLoss(reduction="none"), "reduction='none'"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), "pos_weight"),
        (nn.CrossEntropyLoss(weight=torch.ones(3)), "weights"),
    ],
)
def test_unsupported_loss_is_named(loss_fn, match) -> None:
    model, _ = MLP_CE.build()
    with pytest.raises(ValueError, match=match):
        curvlab.ExactFisher(model, loss_fn)


@pytest.mark.parametrize("backend", ["exact_fisher", "empirical_fisher", "block_diagonal"])
def test_unsupported_module_is_named(backend) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"engine='backpack'.*module '1' \(LayerNorm\) is not"):
        curvlab.make(backend, model, nn.MSELoss(), engine="backpack")
    curvlab.make(backend, model, nn.MSELoss())  # the hooks engine covers it


def test_custom_container_is_rejected_for_second_order_types() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = Functional()
    with pytest.raises(ValueError, match=r"module '<model>' \(Functional\).*nn.Sequential"):
        curvlab.ExactFisher(model, nn.MSELoss(), engine="backpack")
    curvlab.ExactFisher(model, nn.MSELoss())  # the hooks engine covers it


def test_parameters_next_to_children_are_rejected() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2))
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) * self.scale

    with pytest.raises(ValueError, match="holds parameters and children"):
        curvlab.ExactFisher(Mixed(), nn.MSELoss(), engine="backpack")
    curvlab.ExactFisher(Mixed(), nn.MSELoss())  # the hooks engine covers it


@pytest.mark.parametrize(
    ("backend", "kwargs", "match"),
    [
        ("exact_fisher", {"fisher_type": "empirical"}, "ExactFisher: unknown fisher_type"),
        ("block_diagonal", {"fisher_type": "kfac"}, "choose one of"),
        ("block_diagonal", {"fisher_type": "mc", "mc_samples": 0}, "mc_samples"),
        ("exact_fisher", {"fisher_type": "mc", "mc_samples": 1.5}, "mc_samples"),
    ],
)
def test_bad_options(backend, kwargs, match) -> None:
    model, loss_fn = MLP_CE.build()
    with pytest.raises(ValueError, match=match):
        curvlab.make(backend, model, loss_fn, **kwargs)


def test_unknown_backend_lists_the_valid_names() -> None:
    model, loss_fn = MLP_CE.build()
    with pytest.raises(ValueError, match=r"Did you mean 'block_diagonal'.*exact_fisher"):
        curvlab.make("block_diagonl", model, loss_fn)


def test_model_without_parameters() -> None:
    with pytest.raises(ValueError, match="no trainable parameters"):
        curvlab.ExactFisher(nn.Sequential(nn.Tanh()), nn.MSELoss())


@pytest.mark.parametrize(
    ("targets", "match"),
    [
        (torch.zeros(4, 3), r"class indices of shape \[4\]"),
        (torch.zeros(4, dtype=torch.float64), r"\(int64\), got shape \(4,\) and dtype"),
    ],
)
def test_bad_targets_are_named(targets, match) -> None:
    model, loss_fn, x, _ = _mlp_ce()
    c = curvlab.ExactFisher(model, loss_fn)
    with pytest.raises(ValueError, match=match):
        c.update(x, targets)


def test_bad_output_shape_is_named() -> None:
    model = nn.Sequential(nn.Conv1d(2, 3, 3))
    c = curvlab.ExactFisher(model, nn.MSELoss())
    with pytest.raises(ValueError, match=r"output must have shape \[N, C\], got \(4, 3, 3\)"):
        c.update(torch.randn(4, 2, 5), torch.randn(4, 3, 3))


def test_non_finite_loss_is_reported() -> None:
    model, loss_fn, x, y = _mlp_ce()
    c = curvlab.ExactFisher(model, loss_fn)
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        c.update(x, y)


def test_bad_vectors_are_named() -> None:
    model, loss_fn, x, y = _mlp_ce()
    c = curvlab.BlockDiagonal(model, loss_fn)
    c.update(x, y)
    good = [torch.zeros_like(p) for p in c.params]
    with pytest.raises(ValueError, match="expected 4 tensors"):
        c.matvec(good[:3])
    with pytest.raises(ValueError, match=r"entry for '0.bias' must have shape \(4,\)"):
        c.matvec([good[0], torch.zeros(5), *good[2:]])
    with pytest.raises(TypeError, match="list of 4 tensors"):
        c.matvec(torch.zeros(c.num_params))
    with pytest.raises(ValueError, match="damping must be finite and >= 0"):
        c.solve(good, -1.0)
    with pytest.raises(ValueError, match="damping must be finite"):
        c.solve(good, float("nan"))


def test_use_before_update() -> None:
    model, loss_fn, _, _ = _mlp_ce()
    c = curvlab.ExactFisher(model, loss_fn)
    with pytest.raises(RuntimeError, match=r"ExactFisher.matvec: no curvature accumulated"):
        c.matvec([torch.zeros_like(p) for p in c.params])
    with pytest.raises(TypeError, match="pass the loss"):
        c.accumulate()


def test_accumulate_of_an_unrecorded_forward_is_reported() -> None:
    model, loss_fn, x, y = _mlp_ce()
    c = curvlab.ExactFisher(model, loss_fn)
    with pytest.raises(RuntimeError, match="nothing recorded"):
        c.accumulate(loss_fn(model(x), y))
    with c.recording():
        recorded = loss_fn(model(x), y)
    unrecorded = loss_fn(model(x), y)
    with pytest.raises(RuntimeError, match="does not come from a call of its loss_fn recorded"):
        c.accumulate(unrecorded)
    c.accumulate(recorded)
    with pytest.raises(RuntimeError, match="does not come from a call of its loss_fn recorded"):
        c.accumulate(recorded)  # consumed: a loss is accumulated once


def test_singular_undamped_solve_names_the_block() -> None:
    # softmax outputs: the last layer's Fisher block is singular
    # (concepts/kronecker.md#k-fac-for-linear-layers pitfall)
    model, loss_fn, x, y = _mlp_ce()
    c = curvlab.BlockDiagonal(model, loss_fn)
    c.update(x[:1], y[:1])
    with pytest.raises(LinAlgError, match=r"BlockDiagonal block 0 \(0.weight .. 0.bias\)"):
        c.solve([torch.ones_like(p) for p in c.params], 0.0)


def test_state_of_another_backend_is_rejected() -> None:
    model, loss_fn, x, y = _mlp_ce()
    a = curvlab.ExactFisher(model, loss_fn)
    a.update(x, y)
    b = curvlab.BlockDiagonal(model, loss_fn)
    with pytest.raises(ValueError, match="belongs to 'ExactFisher'"):
        b.load_state_dict(a.state_dict())
    other_model = nn.Sequential(nn.Linear(5, 2)).double()
    c = curvlab.ExactFisher(other_model, loss_fn)
    with pytest.raises(ValueError, match="block shapes"):
        c.load_state_dict(a.state_dict())


@pytest.mark.parametrize("engine", ["hooks", "backpack"])
@pytest.mark.parametrize("bad", [3, -3])
def test_class_index_out_of_range_is_named(engine, bad) -> None:
    # used to surface as PyTorch's IndexError from inside the loss (a device-side assert on CUDA)
    model, loss_fn, x, _ = _mlp_ce()
    c = curvlab.ExactFisher(model, loss_fn, engine=engine)
    with pytest.raises(ValueError, match=rf"targets must be class indices in \[0, 3\).*is {bad}\."):
        c.update(x, torch.tensor([0, 1, bad, 2]))
    assert c.num_batches == 0
    if engine == "hooks":  # ignored targets are not out of range (BackPACK refuses them)
        c.update(x, torch.tensor([0, loss_fn.ignore_index, 2, 1]))
        assert c.num_samples == 3


def test_backpack_names_the_module_it_cannot_serve_for_kronecker_backends() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"engine='backpack'.*module '1' \(LayerNorm\) needs"):
        curvlab.KFAC(model, nn.MSELoss(), engine="backpack")
