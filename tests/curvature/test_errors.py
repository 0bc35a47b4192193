"""Bad input gets a clear error naming the module, shape or argument at fault.

The per-backend cases (constructor options, unsupported losses, bad targets and vectors,
damping, use before update, another backend's state, each family's own options and
states) are the error inputs of the backend table (``backend_info.error_inputs``: a shared
part and one function per backend family), run by ``test_contract.test_error_inputs`` for
every row, each in the phase that must raise it (``error_on``); this file keeps the
scenarios that are not one bad call on one backend.
"""

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


def test_unknown_backend_lists_the_valid_names() -> None:
    model, loss_fn = MLP_CE.build()
    with pytest.raises(ValueError, match=r"Did you mean 'block_diagonal'.*exact_fisher"):
        curvlab.make("block_diagonl", model, loss_fn)


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


def test_state_of_another_model_is_rejected() -> None:
    model, loss_fn, x, y = _mlp_ce()
    a = curvlab.ExactFisher(model, loss_fn)
    a.update(x, y)
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
