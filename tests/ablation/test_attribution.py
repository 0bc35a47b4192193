"""``curvlab.ablation.attribution`` and ``curvlab ablate --task influence``: the linear
datamodeling score of influence scores across approximations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvlab.ablation.attribution import (
    AttributionResult,
    adam_fit,
    compare_attributions,
    linear_datamodeling_score,
    per_example_losses,
    retrained_outcomes,
)
from curvlab.ablation.cli import main


def _lds_case(seed: int, subsets: int = 12, train: int = 20, queries: int = 5):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(queries, train, generator=g, dtype=torch.float64)
    masks = torch.rand(subsets, train, generator=g) < 0.5
    return scores, masks


def test_predictions_that_are_the_outcomes_score_one_and_reversed_minus_one() -> None:
    scores, masks = _lds_case(0)
    outcomes = (masks.double() @ scores.T).float()
    assert linear_datamodeling_score(scores, masks, outcomes)[0] == pytest.approx(1.0)
    assert linear_datamodeling_score(scores, masks, -outcomes)[0] == pytest.approx(-1.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 10.0), st.floats(-5.0, 5.0))
def test_lds_is_invariant_to_monotone_maps_of_the_outcomes(seed, scale, shift) -> None:
    """Spearman uses ranks only: a positive affine (or any increasing) map of the outcomes
    changes nothing."""
    scores, masks = _lds_case(seed)
    outcomes = torch.randn(
        masks.shape[0], scores.shape[0], generator=torch.Generator().manual_seed(seed)
    )
    base = linear_datamodeling_score(scores, masks, outcomes)
    mapped = linear_datamodeling_score(scores, masks, torch.exp(scale * outcomes + shift))
    assert mapped == pytest.approx(base)


def test_constant_queries_are_left_out_and_bad_shapes_are_named() -> None:
    scores, masks = _lds_case(1)
    outcomes = (masks.double() @ scores.T).float()
    outcomes[:, 0] = 3.0  # a query whose loss never changes: no ranking to compare
    mean, _ = linear_datamodeling_score(scores, masks, outcomes)
    assert mean == pytest.approx(1.0)
    with pytest.raises(
        ValueError, match=r"need scores \[Q, N\], masks \[K, N\], outcomes \[K, Q\]"
    ):
        linear_datamodeling_score(scores, masks, outcomes.T)


def _problem(n: int = 48, queries: int = 6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + queries, 5, generator=g)
    y = (x[:, 0] + 0.3 * torch.randn(n + queries, generator=g) > 0).long()

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))

    return build, nn.CrossEntropyLoss(), (x[:n], y[:n]), (x[n:], y[n:])


def test_retrained_outcomes_are_the_mean_query_loss_of_models_fitted_on_each_half() -> None:
    build, loss_fn, train, query = _problem()
    fit = adam_fit(loss_fn, epochs=2)
    masks, outcomes = retrained_outcomes(build, loss_fn, train, query, 3, 2, fit, seed=4)
    assert masks.shape == (3, 48) and (masks.sum(dim=1) == 24).all()
    # the outcome of the second half, recomputed from its definition
    keep = masks[1].nonzero().flatten()
    g = torch.Generator().manual_seed(5)
    torch.randperm(48, generator=g)  # the first half's draw
    assert torch.equal(torch.randperm(48, generator=g)[:24].sort().values, keep)
    runs = []
    for s in range(2):
        torch.manual_seed(4 + 1000 * 2 + s)
        model = fit(build(), (train[0][keep], train[1][keep]), 4 + 1000 * 2 + s)
        runs.append(per_example_losses(model, loss_fn, query))
    torch.testing.assert_close(outcomes[1], torch.stack(runs).mean(dim=0))


def test_every_method_gets_a_row_and_a_failing_one_keeps_its_error() -> None:
    build, loss_fn, train, query = _problem()
    result = compare_attributions(
        build, loss_fn, train, query, ["identity", "kfac", "exact_fisher", "no_such_backend"],
        subsets=6, seeds=1, fit=adam_fit(loss_fn, epochs=3), batch_size=16,
    )  # fmt: skip
    rows = {r["method"]: r for r in result.rows}
    assert list(rows) == ["identity", "kfac", "exact_fisher", "no_such_backend"]
    for name in ("identity", "kfac", "exact_fisher"):
        assert math.isfinite(rows[name]["lds"]) and rows[name]["error"] is None
        assert -1.0 <= rows[name]["lds"] <= 1.0
    assert math.isnan(rows["no_such_backend"]["lds"])
    assert "no_such_backend" in rows["no_such_backend"]["error"]
    assert result.best_per_second()["method"] in ("identity", "kfac", "exact_fisher")
    assert "| kfac |" in result.to_markdown()
    assert json.loads(result.to_json())["settings"]["subsets"] == 6


def test_best_per_second_is_on_the_lds_time_front() -> None:
    def row(method: str, lds: float, seconds: float) -> dict:
        return {"method": method, "lds": lds, "seconds": seconds}

    result = AttributionResult({}, [row("a", 0.5, 1.0), row("b", 0.4, 2.0), row("c", 0.6, 10.0)])
    # b is dominated (slower and worse than a); a has the most LDS per second on the front
    assert result.best_per_second()["method"] == "a"


def test_ablate_task_influence_writes_its_table_and_figure(tmp_path, capsys) -> None:
    out = tmp_path / "influence"
    code = main(
        ["ablate", "--task", "influence", "--model", "mlp", "--subsets", "4",
         "--retrain-seeds", "1", "--train-size", "60", "--queries", "8", "--epochs", "2",
         "--backends", "identity,kfac", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"summary.md", "results.json", "influence.png"}
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["results"]] == ["identity", "kfac"]
    assert results["settings"]["train"] == 60 and results["settings"]["queries"] == 8
    assert "| identity |" in (out / "summary.md").read_text()


def test_ablate_task_influence_names_an_unknown_approximation(tmp_path, capsys) -> None:
    code = main(
        ["ablate", "--task", "influence", "--backends", "kfac,nope", "--out", str(tmp_path / "x")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "identity" in err
