"""The ``Curvature`` contract, checked for every registered backend.

One row per backend configuration (``BACKENDS`` of ``backend_info.py``: registry name,
kwargs, capability flags); a backend registered without a row fails
``test_every_backend_has_a_row``. Each property runs on a few cases from the case table so
that every model family and loss is covered; ``test_error_inputs`` runs every row's error
inputs (``error_inputs``: the shared ones and its family's) phase by phase.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import curvlab
from curvlab.curvature.dense.base import DenseCurvature
from curvlab.curvature.kronecker.factored import KroneckerFactored
from tests.cases import CASES, Case
from tests.curvature.backend_info import (
    BACKENDS,
    PHASES,
    BackendInfo,
    ErrorInput,
    dense_error_inputs,
    diagonal_error_inputs,
    error_inputs,
    kronecker_error_inputs,
)

_PICK = {"mlp-ce-mean", "mlp_nobias-bce-mean", "conv1d-ce-sum", "conv2d-mse-sum", "conv2d-bce-sum"}
CONTRACT_CASES = [c for c in CASES if c.id in _PICK]


def _build(info: BackendInfo, case: Case, seed: int = 0):  # type: ignore[no-untyped-def]
    return info.build(case, seed)


def _random_vector(c: curvlab.Curvature, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in c.params]


def _flat(v: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in v])


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9) -> None:
    atol = rtol * max(float(expected.abs().max()), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def test_every_backend_has_a_row() -> None:
    assert {info.name for info in BACKENDS} >= set(curvlab.available())


PAIRS = [
    pytest.param(info, case, id=f"{info.id}-{case.id}")
    for info in BACKENDS
    for case in CONTRACT_CASES
    if info.supports_case(case)
]


def _over(flag: str | None = None):  # type: ignore[no-untyped-def]
    """Parametrise over the (row, case) pairs, only the rows with ``flag`` set if given."""
    pairs = [p for p in PAIRS if flag is None or getattr(p.values[0], flag)]
    return pytest.mark.parametrize(("row", "case"), pairs)


over_backends_and_cases = _over()
over_tikhonov_backends_and_cases = _over("tikhonov_solve")
over_additive_backends_and_cases = _over("additive_statistics")


@over_backends_and_cases
def test_symmetric_psd_and_matvec(row, case: Case) -> None:
    c, _, _ = _build(row, case)
    c.update(*case.data(n=6))
    dense = c.to_dense()
    assert dense.shape == (c.num_params, c.num_params)
    _close(dense, dense.T, rtol=1e-12)
    eigs = torch.linalg.eigvalsh(dense)
    assert eigs.min() >= -1e-10 * max(float(eigs.max()), 1.0)
    v = _random_vector(c, seed=3)
    mv = c.matvec(v)
    assert [t.shape for t in mv] == [p.shape for p in c.params]
    _close(_flat(mv), dense @ _flat(v))


@over_tikhonov_backends_and_cases
def test_solve_inverts_damped_matvec(row, case: Case) -> None:
    c, _, _ = _build(row, case)
    c.update(*case.data(n=6))
    damping = 0.1
    v = _random_vector(c, seed=4)
    rhs = [m + damping * t for m, t in zip(c.matvec(v), v)]
    _close(_flat(c.solve(rhs, damping)), _flat(v), rtol=1e-8)
    # the cached factorisation is reused for the same damping and replaced for another one
    _close(_flat(c.solve(rhs, damping)), _flat(v), rtol=1e-8)
    other = [m + 1.0 * t for m, t in zip(c.matvec(v), v)]
    _close(_flat(c.solve(other, 1.0)), _flat(v), rtol=1e-8)


def _tree_add(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        assert a.get("layout") == b.get("layout")  # the state's layout version does not add
        return {k: a[k] if k == "layout" else _tree_add(a[k], b[k]) for k in a}
    if isinstance(a, list):
        return [_tree_add(x, y) for x, y in zip(a, b, strict=True)]
    if isinstance(a, (str, tuple)) or a is None:  # metadata (names, orders) must agree
        assert a == b
        return a
    return a + b


def _assert_tree_close(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_tree_close(a[k], b[k])
    elif isinstance(a, list):
        for x, y in zip(a, b, strict=True):
            _assert_tree_close(x, y)
    elif isinstance(a, torch.Tensor):
        _close(a, b)
    elif isinstance(a, (str, tuple)) or a is None:
        assert a == b
    else:
        assert a == pytest.approx(b, rel=1e-12)


@over_additive_backends_and_cases
def test_two_half_batches_equal_one_full_batch(row, case: Case) -> None:
    x, y = case.data(n=7)
    halves = [(x[:3], y[:3]), (x[3:], y[3:])]
    split, _, _ = _build(row, case)
    singles = []
    for seed, (xb, yb) in enumerate(halves):
        torch.manual_seed(seed)  # the same Monte-Carlo labels in both computations
        split.update(xb, yb)
        single, _, _ = _build(row, case)
        torch.manual_seed(seed)
        single.update(xb, yb)
        singles.append(single.state_dict())
    assert split.num_samples == 7 and split.num_batches == 2
    # the accumulated statistics are additive: the union's state is the sum of the states
    _assert_tree_close(split.state_dict(), _tree_add(*singles))
    if row.deterministic:  #: the union's curvature is the one of a single pass
        full, _, _ = _build(row, case)
        full.update(x, y)
        _close(split.to_dense(), full.to_dense())


@over_backends_and_cases
def test_state_dict_round_trip(row, case: Case) -> None:
    c, _, _ = _build(row, case)
    c.update(*case.data(n=5))
    state = c.state_dict()
    fresh, _, _ = _build(row, case)
    fresh.load_state_dict(state)
    _close(fresh.to_dense(), c.to_dense(), rtol=0)
    v = _random_vector(c, seed=5)
    _close(_flat(fresh.solve(v, 0.5)), _flat(c.solve(v, 0.5)), rtol=1e-12)
    assert fresh.num_samples == c.num_samples


@over_backends_and_cases
def test_update_keeps_grads_and_reset_forgets(row, case: Case) -> None:
    c, model, _ = _build(row, case)
    before = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), before):
        p.grad = g.clone()
    loss = c.update(*case.data(n=4))
    assert loss.ndim == 0 and not loss.requires_grad
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g)
    assert not any(hasattr(p, "sqrt_ggn_exact") or hasattr(p, "grad_batch") for p in c.params)
    c.reset()
    with pytest.raises(RuntimeError, match="no curvature accumulated"):
        c.to_dense()


# --- the operator interface --------------------------------------------------------------


@over_backends_and_cases
def test_operator_quantities_equal_those_of_the_dense_matrix(row, case: Case) -> None:
    c, _, _ = _build(row, case)
    c.update(*case.data(n=6))
    dense = c.to_dense()
    assert c.shape == tuple(dense.shape) and c.dtype == dense.dtype and c.device == dense.device
    _close(c.trace(), torch.trace(dense))
    _close(c.diagonal(), torch.diagonal(dense))
    _close(c.frobenius_norm(), torch.linalg.matrix_norm(dense))
    sym = (dense + dense.T) / 2
    spectrum = torch.linalg.eigvalsh(sym).flip(0)
    _close(c.eigenvalues(), spectrum, rtol=1e-7)
    _close(c.eigenvalues(3), spectrum[:3], rtol=1e-7)
    damping = 0.3
    eye = torch.eye(len(dense), dtype=dense.dtype)
    _close(c.logdet(damping), torch.linalg.slogdet(sym + damping * eye).logabsdet, rtol=1e-8)


@over_backends_and_cases
def test_matmul_scipy_and_inverse_agree_with_matvec_and_solve(row, case: Case) -> None:
    import numpy as np

    c, _, _ = _build(row, case)
    c.update(*case.data(n=6))
    v = _random_vector(c, seed=3)
    flat = _flat(v)
    expected = _flat(c.matvec(v))
    _close(c @ flat, expected)
    _close(_flat(c @ v), expected)
    block = torch.stack([flat, 2 * flat], dim=1)
    _close(c @ block, torch.stack([expected, 2 * expected], dim=1))
    op = c.to_scipy(np.float64)
    assert op.shape == c.shape
    _close(torch.as_tensor(op @ flat.numpy()), expected)
    inverse = c.inverse(0.5)
    _close(inverse @ flat, _flat(c.solve(v, 0.5)))
    _close(torch.as_tensor(inverse.to_scipy() @ flat.numpy()), _flat(c.solve(v, 0.5)))
    with pytest.raises(ValueError, match=r"expected \[\d+\] or \[\d+, K\]"):
        c @ torch.zeros(c.num_params + 1, dtype=flat.dtype)


def test_update_takes_a_whole_data_set() -> None:
    case = next(c for c in CASES if c.id == "mlp-ce-mean")
    model, loss_fn = case.build()
    x, y = case.data(n=12)
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]
    whole = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    whole.update(loader, progress=False)
    batch = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    batch.update(x, y)
    _close(whole.to_dense(), batch.to_dense())
    with pytest.raises(ValueError, match=r"batch 0 of the data set is not an \(inputs, targets\)"):
        whole.update([x], progress=False)
    with pytest.raises(TypeError, match="pass targets"):
        whole.update(x)


ERROR_CASES = [
    pytest.param(info, error, id=f"{info.id}-{error.description}")
    for info in BACKENDS
    for error in error_inputs(info)
]


@pytest.mark.parametrize(("row", "error"), ERROR_CASES)
def test_error_inputs(row: BackendInfo, error: ErrorInput) -> None:
    """Bad input raises the documented error type, naming the argument, module or shape,
    in the phase the table names (``error_on``); the phases before it succeed."""
    if error.error_on == "construction":
        with pytest.raises(error.error, match=error.match):
            error.construct()
        return
    curvature = error.construct()
    if error.error_on == "update":
        assert error.update is not None
        with pytest.raises(error.error, match=error.match):
            error.update(curvature)
        return
    if error.update is not None:
        error.update(curvature)
    assert error.use is not None
    with pytest.raises(error.error, match=error.match):
        error.use(curvature)


_FAMILIES = {
    dense_error_inputs: DenseCurvature,
    diagonal_error_inputs: curvlab.DiagonalFisher,
    kronecker_error_inputs: KroneckerFactored,
}


@pytest.mark.parametrize("row", BACKENDS, ids=lambda info: info.id)
def test_every_row_has_its_familys_error_inputs_in_every_phase(row: BackendInfo) -> None:
    assert issubclass(row.cls, _FAMILIES[row.error_inputs_func]), row.error_inputs_func
    phases = {error.error_on for error in error_inputs(row)}
    assert phases == set(PHASES)
    descriptions = [error.description for error in error_inputs(row)]
    assert len(descriptions) == len(set(descriptions)), "descriptions name the test ids"
