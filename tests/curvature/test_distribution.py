"""``DistributionInterface`` (curvlab.curvature.distribution), in one process, for every backend.

* statistic sums add up to the union: ``sums(X) + sums(Y)`` loaded into a backend gives
  the curvature of ``X ∪ Y`` (what the all-reduce over processes relies on);
* decomposition blocks partition the parameters; solving block by block is ``solve``;
* a decomposition exported by one backend and imported by another (same statistics)
  gives the same ``solve`` without any decomposition on the importing side.
"""

from __future__ import annotations

import pytest
import torch

import curvlab
from curvlab.curvature.base import NamedTensor
from curvlab.curvature.distribution import DistributionInterface as ops
from tests.cases import CASES, case_id
from tests.curvature.backend_info import BACKENDS, MLP_ONLY, Kronecker
from tests.curvature.test_contract import _build, _close, _flat, _random_vector

DETERMINISTIC = [row for row in BACKENDS if row.deterministic] + [
    Kronecker("kfac", {"fisher_type": "exact", "damping_mode": "factored"}, supports=MLP_ONLY),
    Kronecker("kfc", {"fisher_type": "empirical", "damping_mode": "factored"}),
]
# a mean and a sum reduction; convolutions for the backends with their own conv factors
CASES_USED = [c for c in CASES if c.id in {"mlp-ce-mean", "mlp-mse-sum", "conv1d-ce-sum"}]
CONV_BACKENDS = {"kfc", "ekfac"}


def _pairs(rows, cases):
    return [
        pytest.param(row, case, id=f"{row.id}-{case_id(case)}")
        for row in rows
        for case in cases
        if row.supports_case(case)
        and (case.model.name.startswith("mlp") or row.name in CONV_BACKENDS)
    ]


@pytest.mark.parametrize(
    ("row", "case"),
    _pairs([r for r in DETERMINISTIC if r.additive_statistics], CASES_USED),
)
def test_statistic_sums_add_up_to_the_union(row, case) -> None:
    (x1, y1), (x2, y2) = case.data(n=3, seed=1), case.data(n=5, seed=2)
    first, second, union, target = (_build(row, case)[0] for _ in range(4))
    first.update(x1, y1)
    second.update(x2, y2)
    union.update(x1, y1)
    union.update(x2, y2)
    target.update(x2, y2)  # some other state, replaced below
    a, b = ops(first).statistic_sums(), ops(second).statistic_sums()
    assert [e.name for e in a] == [e.name for e in b]
    assert a[-1].name == "counts" and a[-1].tensor.dtype == torch.float64
    for e in a:
        if e.structure == "symmetric":
            torch.testing.assert_close(e.tensor, e.tensor.T, rtol=1e-12, atol=1e-14)
    ops(target).load_statistic_sums([ea.tensor + eb.tensor for ea, eb in zip(a, b)])
    assert target.num_samples == union.num_samples == 8
    _close(target.to_dense(), union.to_dense())
    v = _random_vector(target, seed=3)
    _close(_flat(target.solve(v, 0.1)), _flat(union.solve(v, 0.1)))


@pytest.mark.parametrize(("row", "case"), _pairs(DETERMINISTIC, CASES_USED))
def test_blocks_partition_the_parameters_and_solve_block_is_solve(row, case) -> None:
    c = _build(row, case)[0]
    c.update(*case.data(n=6))
    blocks = ops(c).decomposition_blocks()
    assert [b.index for b in blocks] == list(range(len(blocks)))
    covered = sorted(i for b in blocks for i in b.param_indices)
    assert covered == list(range(len(c.params)))
    assert all(b.cost > 0 for b in blocks)
    v = _random_vector(c, seed=4)
    expected = c.solve(v, 0.2)
    for b in blocks:
        got = ops(c).solve_block(b, [v[i] for i in b.param_indices], 0.2)
        for i, t in zip(b.param_indices, got):
            _close(t, expected[i], rtol=1e-12)


@pytest.mark.parametrize(("row", "case"), _pairs(DETERMINISTIC, CASES_USED))
def test_imported_decompositions_solve_like_the_exporter(row, case) -> None:
    source, target = _build(row, case)[0], _build(row, case)[0]
    x, y = case.data(n=6)
    source.update(x, y)
    target.update(x, y)
    damping = 0.3
    for b in ops(source).decomposition_blocks():
        ops(source).decompose(b, damping)
        ops(source).decompose(b, damping)  # cached: not recomputed
        exported = ops(source).export_decomposition(b, damping)
        assert all(isinstance(e, NamedTensor) for e in exported)
        ops(target).import_decomposition(b, damping, [e.tensor.clone() for e in exported])
    # EKFAC and the diagonal fix everything when the statistics are taken
    expected_count = (
        0 if row.name in ("ekfac", "diagonal") else len(ops(source).decomposition_blocks())
    )
    assert source.num_decompositions == expected_count
    v = _random_vector(source, seed=5)
    assert torch.equal(_flat(target.solve(v, damping)), _flat(source.solve(v, damping)))
    assert target.num_decompositions == 0  # nothing computed on the importing side
    assert source.num_decompositions == expected_count


def test_interface_errors_name_the_argument() -> None:
    case = next(c for c in CASES if c.id == "mlp-ce-mean")
    model, loss_fn = case.build()
    c = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    with pytest.raises(RuntimeError, match="statistic_sums: no curvature accumulated"):
        ops(c).statistic_sums()
    c.update(*case.data())
    with pytest.raises(ValueError, match="unknown block 7; this backend has 2 block"):
        ops(c).decompose(7, 0.1)
    other = curvlab.ExactFisher(model, loss_fn)
    with pytest.raises(ValueError, match="belongs to another backend"):
        ops(c).decompose(ops(other).decomposition_blocks()[0], 0.1)
    with pytest.raises(ValueError, match="damping must be finite"):
        ops(c).decompose(0, -1.0)
    with pytest.raises(RuntimeError, match="not decomposed yet"):
        ops(c).export_decomposition(0, 0.1)
    with pytest.raises(ValueError, match="expected a list of 2 tensors"):
        ops(c).solve_block(0, [torch.zeros(4, 5, dtype=torch.float64)], 0.1)
    with pytest.raises(ValueError, match=r"'0.weight' must have shape \(4, 5\)"):
        ops(c).solve_block(0, [torch.zeros(5, 4), torch.zeros(4)], 0.1)
    sums = [e.tensor for e in ops(c).statistic_sums()]
    with pytest.raises(ValueError, match="expected 5 tensors, got 4"):
        ops(c).load_statistic_sums(sums[:-1])
    with pytest.raises(ValueError, match="'counts' must have shape"):
        ops(c).load_statistic_sums([*sums[:-1], torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(ValueError, match="unknown structure 'upper'"):
        NamedTensor("M", torch.eye(2), "upper")
    with pytest.raises(ValueError, match="must be square"):
        NamedTensor("M", torch.zeros(2, 3), "symmetric")
    with pytest.raises(TypeError, match="reduce must be callable"):
        ops(c).set_process_reducer(3)  # type: ignore[arg-type]
