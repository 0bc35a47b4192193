"""The one accumulated state of a backend (``Curvature.running_state``).

A backend declares its running sums, counters and tags once; ``reset``, ``statistics`` /
``load_statistics``, ``state_dict`` / ``load_state_dict`` and the distributed sums are
derived from the declaration in the base class. Checked here: what a new backend has to
write (the tutorial's backend, parsed, not run: ``tests/test_examples.py`` runs it), that
``Curvature.__init__`` runs no hook a backend overrides, that every declaration points at
real attributes, and the derived operations against the declared attributes themselves.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

import curvlab
from curvlab.curvature import registry
from curvlab.curvature.base import (
    Curvature,
    RunningCount,
    RunningSum,
    StateTag,
    find_layers,
    migrate_state,
)
from curvlab.curvature.distribution import DistributionInterface
from curvlab.extraction import FactorRows
from tests.cases import CASES

ROOT = Path(__file__).resolve().parents[2]
CASE = next(c for c in CASES if c.id == "mlp-ce-mean")


def test_a_backend_implements_four_abstract_methods() -> None:
    assert sorted(Curvature.__abstractmethods__) == [
        "_accumulate",
        "_matvec",
        "_solve",
        "_to_dense",
    ]


def test_the_tutorial_backend_needs_at_most_seven_methods() -> None:
    tree = ast.parse((ROOT / "examples" / "plot_new_backend.py").read_text())
    (backend,) = [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name == "LayerwiseScaledIdentity"
    ]
    methods = [node.name for node in backend.body if isinstance(node, ast.FunctionDef)]
    assert len(methods) <= 7, methods
    assert not {"_reset", "_statistics", "_state", "_load_state", "_sums"} & set(methods)
    declared = [
        node
        for node in backend.body
        if isinstance(node, ast.Assign) and node.targets[0].id == "running_state"
    ]
    assert len(declared) == 1


def test_curvature_init_calls_no_method_a_backend_may_override() -> None:
    """Every method of ``Curvature`` is replaced by a recorder; ``__init__`` calls none."""
    called: list[str] = []

    def recorder(name: str):  # type: ignore[no-untyped-def]
        def record(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            called.append(name)

        return record

    names = [
        name
        for name, value in inspect.getmembers(Curvature)
        if inspect.isfunction(value) and name not in ("__init__",) and not name.startswith("__")
    ]
    probe = type("Probe", (Curvature,), {name: recorder(name) for name in names})
    model, loss_fn = CASE.build(0)
    probe(model, loss_fn)
    assert called == []


class _Traces(Curvature):
    """A minimal declared backend: per layer ``Σ_b w_b ‖V_b‖²`` (the trace of the block)
    and a per-layer count of batches, to test ``per`` with a counter and a tag."""

    running_state = (
        RunningSum("traces", "_traces", label="_label"),
        RunningSum("per_batch", "_per_batch", per="batches"),
        RunningCount("batches", "_batches"),
        StateTag("kind", "_kind", in_statistics=True),
    )

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__(model, loss_fn)
        layers = find_layers(self.model)
        self._traces: list[torch.Tensor] | None = None
        self._per_batch: torch.Tensor | None = None
        self._batches = 0
        self._kind = "traces"
        params = tuple(p for layer in layers for p in layer.params)
        self._cover(layers, [FactorRows("exact", params)])

    def _label(self, k: int) -> str:
        return f"layer {k}"

    def _accumulate(self, result, weight):  # type: ignore[no-untyped-def]
        request = self.requests()[0]
        rows = [
            sum(
                result.factor_rows(request, p, n).square().sum()
                for p, n in zip(layer.params, layer.param_names)
            )
            for layer in self.layers
        ]
        batch = [weight * r for r in rows]
        self._traces = (
            batch if self._traces is None else [a + b for a, b in zip(self._traces, batch)]
        )
        total = torch.stack(rows).sum()
        self._per_batch = total if self._per_batch is None else self._per_batch + total
        self._batches += 1

    def _matvec(self, v):  # type: ignore[no-untyped-def]
        return v

    def _solve(self, v, damping):  # type: ignore[no-untyped-def]
        return v

    def _to_dense(self):  # type: ignore[no-untyped-def]
        return torch.eye(self.num_params)


def _fitted(batches: int = 2) -> _Traces:
    model, loss_fn = CASE.build(0)
    c = _Traces(model, loss_fn)
    for seed in range(batches):
        c.update(*CASE.data(n=4, seed=seed))
    return c


def test_statistics_divide_each_sum_by_its_declared_normaliser() -> None:
    c = _fitted()
    stats = c.statistics()
    assert list(stats) == ["traces", "per_batch", "kind"]
    for got, total in zip(stats["traces"], c._traces, strict=True):
        torch.testing.assert_close(got, total / c._weight_sum)
    torch.testing.assert_close(stats["per_batch"], c._per_batch / 2)
    assert stats["kind"] == "traces"


def test_load_statistics_takes_one_unit_weight_batch_and_checks_tags() -> None:
    c, target = _fitted(), _fitted(batches=1)
    target.load_statistics(c.statistics())
    assert target._batches == 1 and target._weight_sum == 1.0
    for a, b in zip(target.statistics()["traces"], c.statistics()["traces"], strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="taken with another kind"):
        target.load_statistics({**c.statistics(), "kind": "other"})
    with pytest.raises(ValueError, match=r"unknown entries \['trace'\]"):
        target.load_statistics({"trace": c.statistics()["traces"]})


def test_state_round_trip_copies_and_is_bit_identical() -> None:
    c = _fitted()
    state = c.state_dict()
    assert state["statistics"]["counts"] == {"batches": 2}
    fresh = _fitted(batches=1)
    fresh.load_state_dict(state)
    for a, b in zip(fresh._traces, c._traces, strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert fresh._batches == 2 and torch.equal(fresh._per_batch, c._per_batch)
    fresh.reset()
    assert fresh._traces is None and fresh._per_batch is None and fresh._batches == 0
    assert fresh._kind == "traces"  # tags stay


def test_distributed_sums_are_the_declared_sums_and_counters() -> None:
    first, second = _fitted(batches=1), _fitted(batches=2)
    sums = DistributionInterface(first).statistic_sums()
    assert [s.name for s in sums] == ["layer 0 traces", "layer 1 traces", "per_batch", "counts"]
    other = DistributionInterface(second).statistic_sums()
    target = _fitted(batches=1)
    DistributionInterface(target).load_statistic_sums(
        [a.tensor + b.tensor for a, b in zip(sums, other)]
    )
    assert target._batches == 3
    for got, a, b in zip(target._traces, first._traces, second._traces, strict=True):
        torch.testing.assert_close(got, a + b)


def test_a_layout1_state_migrates_through_the_legacy_paths() -> None:
    declared = (RunningSum("A", "_a", legacy="factors.a"), RunningCount("n", "_n", legacy="n"))
    old = {"backend": "X", "num_batches": 1, "statistics": {"factors": {"a": [1]}, "n": [3]}}
    new = migrate_state(old, declared)
    assert new["layout"] == 2
    assert new["statistics"] == {"sums": {"A": [1]}, "counts": {"n": [3]}, "tags": {}}
    assert migrate_state(new, declared) is new  # today's layout passes through


@pytest.mark.parametrize("name", registry.available())
def test_every_declaration_points_at_attributes_of_the_backend(name: str) -> None:
    cls = registry.get(name)
    model, loss_fn = CASE.build(0)
    try:
        c = curvlab.make(name, model, loss_fn)
    except ValueError:
        pytest.skip(f"{name} does not cover {CASE.id}")
    names = [item.name for item in cls.running_state]
    assert len(names) == len(set(names)), names
    counts = {item.name for item in cls.running_state if isinstance(item, RunningCount)}
    for item in cls.running_state:
        c._get_declared(item)  # exists
        if isinstance(item, RunningSum):
            assert item.per == "weight" or item.per in counts, item
            if item.label is not None:
                assert callable(c._resolve(item.label))
