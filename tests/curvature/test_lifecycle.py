"""Nothing curvlab puts on a model outlives the object that put it there.

The rules (concepts/models.md#lifecycle-hooks-recordings-copies): the hooks of a curvature
(its recording, the call-order hooks of the block-tridiagonal backends) hold it through
weak references and go with it; ``close()`` and the context managers remove them at once;
a recording holds no graph past the pass it used; ``copy.deepcopy(model)`` works at any
time and the copy carries none of curvlab's hooks. Checked for every registered backend,
``BlockTridiagonalKFAC``, ``NaturalGradient`` and ``KFACOptimizer``.
"""

from __future__ import annotations

import copy
import gc
import pickle
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.extraction.hooks import Recording

#: Every module dict a forward hook or pre-hook (or its side entries) lives in.
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)

BACKENDS = curvlab.available()


def _make(name: str, model: nn.Module, loss_fn: nn.Module) -> curvlab.Curvature:
    return curvlab.make(name, model, loss_fn)


def _setup(seed: int = 0) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    return model, nn.CrossEntropyLoss(), x, y


def _hooks(*modules: nn.Module) -> int:
    """Forward hooks and pre-hooks (with their side entries) on ``modules`` and below."""
    return sum(
        len(getattr(m, name)) for root in modules for m in root.modules() for name in HOOK_DICTS
    )


def _records(c: curvlab.Curvature) -> int:
    recording = c._recording
    if recording is None:
        return 0
    return len(recording.calls) + len(recording.losses) + len(recording.model_calls)


# --- rebuilt every iteration: nothing piles up ------------------------------------------


def _natural_gradient_step(name: str) -> Callable[[nn.Module, nn.Module, Tensor, Tensor], None]:
    def step(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        precond = curvlab.NaturalGradient(_make(name, model, loss_fn), optimizer=opt)
        opt.zero_grad()
        precond.backward(loss_fn(model(x), y))
        precond.step()
        opt.step()

    return step


def _kfac_optimizer_step(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> None:
    opt = curvlab.KFACOptimizer(model, loss_fn, quadratic_min_rows=8)
    opt.step(lambda: loss_fn(model(x), y))


STEPS = [pytest.param(_natural_gradient_step(name), id=name) for name in BACKENDS] + [
    pytest.param(_kfac_optimizer_step, id="kfac_optimizer")
]


@pytest.mark.slow
@pytest.mark.parametrize("train_step", STEPS)
def test_300_rebuilt_preconditioners_leave_nothing_behind(
    train_step: Callable[[nn.Module, nn.Module, Tensor, Tensor], None],
) -> None:
    """A preconditioner rebuilt every iteration (a sweep, a re-run notebook cell) leaves no
    hooks, no objects and no slowdown behind (leaked hooks made every later step slower:
    the last steps took about three times as long as the first).

    A step takes a few milliseconds, so the time is this thread's CPU time with torch on one
    thread (other processes do not count, and neither do intra-op worker threads spinning
    while they wait for a core: on a loaded 2-core CI box the process's CPU time made a
    step look 2.4x slower) and the windows of 20 steps are compared by their fastest step:
    a leak slows every later step, while a busy machine (shared caches, a garbage
    collection inside a step) only slows some; the medians failed under load."""
    model, loss_fn, x, y = _setup()
    times = []
    objects = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(300):
            start = time.thread_time()
            train_step(model, loss_fn, x, y)
            times.append(time.thread_time() - start)
            if i == 19:
                gc.collect()
                objects = len(gc.get_objects())
    finally:
        torch.set_num_threads(threads)
    gc.collect()
    assert _hooks(model, loss_fn) == 0
    assert len(gc.get_objects()) - objects < 2000
    ratio = min(times[-20:]) / min(times[:20])
    assert ratio < 2.0, f"the last steps took {ratio:.2f}× as long as the first"


@pytest.mark.parametrize("name", BACKENDS)
def test_a_dropped_curvature_takes_its_hooks_along(name: str) -> None:
    model, loss_fn, x, y = _setup()
    c = _make(name, model, loss_fn)
    recording = c.recording()
    recording.__enter__()  # left armed, as a preconditioner leaves it between steps
    loss_fn(model(x), y)
    assert _hooks(model, loss_fn) > 0
    del c, recording
    gc.collect()
    assert _hooks(model, loss_fn) == 0


def test_deleting_a_block_tridiagonal_removes_its_pre_hooks() -> None:
    model, loss_fn, x, y = _setup()
    for make in (curvlab.BlockTridiagonal, curvlab.BlockTridiagonalKFAC):
        c = make(model, loss_fn)
        c.update(x, y)
        assert sum(len(m._forward_pre_hooks) for m in model.modules()) > 0
        del c  # no reference cycle: gone without a collection
        assert _hooks(model, loss_fn) == 0


# --- close() and context managers --------------------------------------------------------


@pytest.mark.parametrize("name", BACKENDS)
def test_close_removes_everything_twice_and_a_closed_curvature_refuses_batches(
    name: str,
) -> None:
    model, loss_fn, x, y = _setup()
    c = _make(name, model, loss_fn)
    c.update(x, y)
    with c.recording():
        loss = loss_fn(model(x), y)
    c.close()
    assert _hooks(model, loss_fn) == 0 and _records(c) == 0 and c.closed
    c.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        c.recording()
    with pytest.raises(RuntimeError, match="closed"):
        c.accumulate(loss)
    with pytest.raises(RuntimeError, match="closed"):
        c.update(x, y)
    # what it accumulated stays usable
    grads = [torch.ones_like(p) for p in c.params]
    assert all(torch.isfinite(t).all() for t in c.solve(grads, 0.1))
    assert c.num_batches == 1


@pytest.mark.parametrize("name", BACKENDS)
def test_a_curvature_as_a_context_manager(name: str) -> None:
    model, loss_fn, x, y = _setup()
    with _make(name, model, loss_fn) as c:
        with c.recording():
            loss = loss_fn(model(x), y)
        c.accumulate(loss)
        c.recording().__enter__()
        assert _hooks(model, loss_fn) > 0
    assert c.closed and _hooks(model, loss_fn) == 0
    assert c.to_dense().shape == (c.num_params, c.num_params)


def test_natural_gradient_closes_its_curvature() -> None:
    model, loss_fn, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    curvature = curvlab.KFAC(model, loss_fn)
    with curvlab.NaturalGradient(curvature, optimizer=opt) as precond:
        for _ in range(3):
            opt.zero_grad()
            precond.backward(loss_fn(model(x), y))
            precond.step()
            opt.step()
        assert _hooks(model, loss_fn) > 0  # armed for the next step
    assert precond.closed and curvature.closed
    assert _hooks(model, loss_fn) == 0 and _records(curvature) == 0
    precond.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        precond.backward(loss_fn(model(x), y))
    with pytest.raises(RuntimeError, match="closed"):
        precond.step()
    assert precond.state_dict()["steps"] == 3  # still readable
    with pytest.raises(RuntimeError, match="closed"):  # a closed curvature arms nothing
        curvlab.NaturalGradient(curvature, optimizer=opt)


def test_kfac_optimizer_close_and_context_manager() -> None:
    model, loss_fn, x, y = _setup()
    with curvlab.KFACOptimizer(model, loss_fn, quadratic_min_rows=8) as opt:
        for _ in range(2):
            opt.step(lambda: loss_fn(model(x), y))
        assert _hooks(model, loss_fn) > 0
    assert _hooks(model, loss_fn) == 0 and opt.precond.closed
    opt.close()
    with pytest.raises(RuntimeError, match="closed"):
        opt.step(lambda: loss_fn(model(x), y))


# --- recordings hold no graph past their step ---------------------------------------------


@pytest.mark.parametrize("name", BACKENDS)
def test_a_step_and_an_accumulate_drop_their_records(name: str) -> None:
    model, loss_fn, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = curvlab.NaturalGradient(_make(name, model, loss_fn), optimizer=opt)
    opt.zero_grad()
    precond.backward(loss_fn(model(x), y))
    loss_fn(model(x), y)  # a grad-enabled forward never backpropagated
    precond.step()
    assert _records(precond.curvature) == 0
    c = _make(name, model, loss_fn)
    with c.recording():
        loss = loss_fn(model(x), y)
    assert _records(c) > 0
    c.accumulate(loss)
    assert _records(c) == 0 and c._recording is not None and c._recording.taken_inputs is None
    with c.recording(), torch.no_grad():  # a validation pass records nothing
        loss_fn(model(x), y)
    assert _records(c) == 0


@pytest.mark.parametrize("name", ["kfac", "exact_fisher"])
def test_forwards_never_backpropagated_do_not_pile_up(name: str) -> None:
    model, loss_fn, x, y = _setup()
    c = _make(name, model, loss_fn)
    with c.recording():
        for _ in range(50):
            loss = loss_fn(model(x), y)
    recording = c._recording
    assert recording is not None
    kept = Recording.max_forwards
    assert len(recording.model_calls) <= kept and len(recording.losses) <= kept
    assert len(recording.calls) <= kept * len(c.recorded_modules())
    c.accumulate(loss)  # the latest pass is there, complete
    reference = _make(name, model, loss_fn)
    reference.update(x, y)
    if name == "exact_fisher":
        torch.testing.assert_close(c.to_dense(), reference.to_dense())


def test_passes_are_taken_in_order_and_an_incomplete_one_is_refused() -> None:
    model, loss_fn, x, y = _setup()
    x2, y2 = torch.randn(16, 4), torch.randint(0, 3, (16,))
    c = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    with c.recording():  # two pending passes, taken in the order they ran
        out_a, out_b = model(x), model(x2)
        loss_a, loss_b = loss_fn(out_a, y), loss_fn(out_b, y2)
    c.accumulate(loss_a)
    c.accumulate(loss_b)
    reference = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    reference.update(x, y)
    reference.update(x2, y2)
    torch.testing.assert_close(c.to_dense(), reference.to_dense())
    with c.recording():  # taken out of order: the older pass is dropped, not used half
        loss_a, loss_b = loss_fn(model(x), y), loss_fn(model(x2), y2)
    c.accumulate(loss_b)
    with pytest.raises(RuntimeError, match="does not come from a call"):
        c.accumulate(loss_a)
    with c.recording():  # a pass that fell out of the kept window
        early = model(x)
        for _ in range(Recording.max_forwards):
            model(x2)
        late_loss = loss_fn(early, y)
    with pytest.raises(RuntimeError, match="forward pass were dropped"):
        c.accumulate(late_loss)


# --- copies ------------------------------------------------------------------------------


def _armed_preconditioner(
    name: str, model: nn.Module, loss_fn: nn.Module
) -> tuple[Any, torch.optim.Optimizer]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if name == "kfac_optimizer":
        return curvlab.KFACOptimizer(model, loss_fn, quadratic_min_rows=8), opt
    return curvlab.NaturalGradient(_make(name, model, loss_fn), optimizer=opt), opt


@pytest.mark.parametrize("name", [*BACKENDS, "kfac_optimizer"])
def test_deepcopy_after_a_recorded_forward(name: str) -> None:
    """A copy taken right after a grad-enabled forward (an EMA or a best-model copy, after
    a validation pass) works, carries no hooks, does not record into the original, and
    trains on its own; the original's step goes on unaffected."""
    model, loss_fn, x, y = _setup()
    precond, opt = _armed_preconditioner(name, model, loss_fn)
    armed = _hooks(model, loss_fn)
    assert armed > 0
    loss = loss_fn(model(x), y)  # recorded, with its graph
    clone, clone_loss_fn = copy.deepcopy((model, loss_fn))
    assert _hooks(clone, clone_loss_fn) == 0
    assert _hooks(model, loss_fn) == armed
    curvature = precond.precond.curvature if name == "kfac_optimizer" else precond.curvature
    before = _records(curvature)
    clone_loss_fn(clone(x), y)  # the copy is not recorded
    assert _records(curvature) == before
    # the original's step
    if name == "kfac_optimizer":
        precond.step(lambda: loss_fn(model(x), y))
    else:
        opt.zero_grad()
        precond.backward(loss)
        precond.step()
        opt.step()
    # the copy trains normally under its own preconditioner
    other, other_opt = _armed_preconditioner(name, clone, clone_loss_fn)
    with torch.no_grad():
        first = float(clone_loss_fn(clone(x), y))
    for _ in range(5):
        if name == "kfac_optimizer":
            other.step(lambda: clone_loss_fn(clone(x), y))
        else:
            other_opt.zero_grad()
            other.backward(clone_loss_fn(clone(x), y))
            other.step()
            other_opt.step()
    with torch.no_grad():
        assert float(clone_loss_fn(clone(x), y)) < first
    assert _hooks(model, loss_fn) == armed  # the copy's preconditioner is on the copy only


def test_deepcopy_of_a_curvature_hooks_the_copied_model() -> None:
    model, loss_fn, x, y = _setup()
    c = curvlab.BlockTridiagonal(model, loss_fn)
    with c.recording():
        loss = loss_fn(model(x), y)
    twin = copy.deepcopy(c)  # with a pending record: the copy starts without records
    assert _records(twin) == 0 and twin.model is not model
    assert _hooks(twin.model, twin.loss_fn) == _hooks(model, loss_fn) > 0
    c.accumulate(loss)
    with twin.recording():
        twin_loss = twin.loss_fn(twin.model(x), y)
    twin.accumulate(twin_loss)
    torch.testing.assert_close(twin.to_dense(), c.to_dense())
    del twin
    gc.collect()
    assert _hooks(model, loss_fn) > 0  # the original's hooks stay


def test_a_pickled_model_drops_the_hooks() -> None:
    model, loss_fn, x, y = _setup()
    precond, _ = _armed_preconditioner("kfac", model, loss_fn)
    loss_fn(model(x), y)
    clone = pickle.loads(pickle.dumps(model))
    clone(x)  # stand-ins remove themselves at the first call
    assert _hooks(clone) == 0
    assert _hooks(model) > 0
    precond.close()
