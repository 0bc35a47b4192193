"""``curvlab ablate`` end to end on a tiny setting, its outputs and its input errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from curvlab.ablation.cli import main

TINY = ["--steps", "4", "--eval-every", "2", "--batch-size", "32", "--quality-samples", "24"]
FILES = ("summary.md", "results.json", "loss_vs_iter.png", "loss_vs_time.png", "race.png")


def test_ablate_writes_every_output_with_the_documented_schema(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["ablate", *TINY, "--backends", "kfc,block_diagonal", "--out", str(out),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    for name in (*FILES, "quality.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        assert str(path) in printed
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"settings", "race", "findings", "quality", "tuning", "seconds"}
    settings = results["settings"]
    assert settings["model"] == "convnet" and settings["data"] == "digits"
    assert settings["steps"] == 4 and settings["backends"] == ["kfc", "block_diagonal"]
    names = [c["name"] for c in results["race"]["curves"]]
    assert names == ["SGD", "Adam", "exact NGD", "KFACOptimizer", "kfc", "block_diagonal"]
    for curve in results["race"]["curves"]:
        assert curve["steps"] == [0, 2, 4]
        for key in ("seconds", "train_loss", "val_loss", "train_accuracy", "val_accuracy"):
            assert len(curve[key]) == 3, key
    assert [r["backend"] for r in results["quality"]["rows"]] == ["kfc", "block_diagonal"]
    assert results["quality"]["num_samples"] == 24
    assert settings["contenders"] == ["sgd", "adam", "ngd", "kfac-optimizer"]
    # one line per contender, in race order
    assert [f.split(":")[0] for f in results["findings"]] == names
    kfac_line = results["findings"][3]
    assert kfac_line.startswith("KFACOptimizer: train loss 0.1 ")
    assert "final " in kfac_line and kfac_line.endswith("× exact NGD's loss per iteration")
    assert "exact NGD's" not in results["findings"][2]  # no ratio to itself
    summary = (out / "summary.md").read_text()
    assert "**Findings.**" in summary and "| exact NGD |" in summary and "| kfc |" in summary
    assert "| KFACOptimizer | — |" in summary  # no learning rate: its own step size
    assert "KFACOptimizer" not in settings["learning_rates"]


def test_python_dash_m_runs_the_same_command(tmp_path) -> None:
    data = tmp_path / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(data, X=rng.random((60, 5)).astype(np.float32), y=rng.integers(0, 3, 60))
    out = tmp_path / "m"
    proc = subprocess.run(
        [sys.executable, "-m", "curvlab", "ablate", *TINY, "--model", "mlp", "--data", str(data),
         "--backends", "kfac", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Wrote:" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["data"] == "tiny" and results["settings"]["model"] == "mlp"


def test_the_autoencoder_has_no_accuracy(tmp_path) -> None:
    out = tmp_path / "ae"
    assert main(["ablate", *TINY, "--model", "autoencoder", "--backends", "kfac",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert all(c["val_accuracy"] is None for c in results["race"]["curves"])
    assert results["race"]["target_loss"] == 0.03


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backends", "kfac,kfx"], "unknown backend.s. 'kfx'. Valid: block_diagonal"),
        (["--backends", "exact_fisher"], "exact_fisher is the reference"),
        (["--data", "cifar10"], "Unknown dataset 'cifar10'. Valid: digits, mnist"),
        (["--lr", "sgd=0.1,rms=2"], "unknown group 'rms'"),
        (["--lr", "-1"], "must be a positive finite number"),
        (["--ema-decay", "1.5"], r"--ema-decay must lie in \[0, 1\)"),
    ],
)
def test_bad_input_is_named_before_any_work(tmp_path, capsys, args, message) -> None:
    out = tmp_path / "never"
    assert main(["ablate", *args, "--out", str(out)]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not out.exists()


def test_kfac_on_the_convnet_covers_the_convolutions_with_diagonal_blocks(tmp_path) -> None:
    out = tmp_path / "kfac"
    assert main(["ablate", *TINY, "--backends", "kfac", "--out", str(out), "--no-progress"]) == 0
    assert (out / "summary.md").exists()


def test_a_bad_npz_names_what_is_wrong(tmp_path, capsys) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, X=np.zeros((10, 4)), labels=np.zeros(10))
    assert main(["ablate", "--data", str(path), "--out", str(tmp_path / "never")]) == 2
    assert "missing array(s) y" in capsys.readouterr().err


def test_cuda_without_cuda_says_so_first(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["ablate", "--device", "cuda", "--out", str(tmp_path / "never")]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_unknown_model_lists_the_valid_ones(tmp_path, capsys) -> None:
    assert main(["ablate", "--model", "resnet", "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet'. Valid: convnet, mlp, autoencoder, or your own" in err
    assert "package.module:factory" in err


def test_hyperparameters_come_from_the_user_then_the_tuned_table_then_the_defaults() -> None:
    from curvlab.ablation.cli import DEFAULT_DAMPING, DEFAULT_LR, _contenders

    tuned = {"SGD": (0.5, None), "kfc": (0.2, 0.05)}
    given = {c.name: c for c in _contenders(["kfc", "ekfac"], {}, None, tuned)}
    assert given["SGD"].lr == 0.5 and given["Adam"].lr == DEFAULT_LR["adam"]
    assert (given["kfc"].lr, given["kfc"].damping) == (0.2, 0.05)
    assert (given["ekfac"].lr, given["ekfac"].damping) == (DEFAULT_LR["natural"], DEFAULT_DAMPING)
    assert given["exact NGD"].curvature == "exact_fisher" and given["SGD"].damping is None
    given = {c.name: c for c in _contenders(["kfc"], {"natural": 0.7}, 0.3, tuned)}
    assert (given["kfc"].lr, given["kfc"].damping) == (0.7, 0.3) and given["SGD"].lr == 0.5


def _npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


_X = np.random.default_rng(0).random((20, 64))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: _npz(p, X=_X, y=np.zeros(20, dtype=np.int64)), "single class"),
        (lambda p: _npz(p, X=_X, y=np.array([0, 10**9] * 10)), r"1e\+09 outputs"),
        (lambda p: _npz(p, X=_X * 1e39, y=np.arange(20) % 2), "overflows float32"),
        (lambda p: (p.write_bytes(b"PK\x03\x04 truncated"), str(p))[1], "not a readable .npz"),
        (lambda p: (p.write_bytes(b"not an archive at all"), str(p))[1], "not a readable .npz"),
        (
            lambda p: _npz(p, X=np.array([object()] * 20, dtype=object), y=np.arange(20) % 2),
            "not a readable .npz",
        ),
    ],
    ids=["one-class", "huge-label", "float32-overflow", "truncated", "not-npz", "pickled"],
)
def test_bad_data_files_get_one_line_naming_the_culprit(tmp_path, capsys, make, message) -> None:
    path = make(tmp_path / "data.npz")
    out = tmp_path / "never"
    assert main(["ablate", *TINY, "--data", path, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(tmp_path / "data.npz") in err
    import re

    assert re.search(message, err), err
    assert not out.exists()


def test_out_naming_a_file_or_a_path_below_one_is_refused(tmp_path, capsys) -> None:
    existing = tmp_path / "file.txt"
    existing.write_text("keep me")
    for out in (existing, existing / "below"):
        assert main(["ablate", *TINY, "--out", str(out)]) == 2
        assert "is a file, not a folder" in capsys.readouterr().err
    assert existing.read_text() == "keep me"


def test_ctrl_c_stops_cleanly_and_writes_nothing(tmp_path, capsys, monkeypatch) -> None:
    import curvlab.ablation.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "race", interrupted)
    out = tmp_path / "run"
    assert main(["ablate", *TINY, "--out", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; no output written" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("absent", "named"),
    [
        (("sklearn",), "needs scikit-learn (the ablate extra"),
        (("matplotlib",), "needs matplotlib (the ablate extra"),
        (("sklearn", "matplotlib"), "needs scikit-learn and matplotlib (the ablate extra"),
    ],
)
def test_without_the_ablate_extra_the_command_names_the_install(
    tmp_path, capsys, monkeypatch, absent, named
) -> None:
    for module in absent:  # None in sys.modules: the module reads as not installed
        monkeypatch.setitem(sys.modules, module, None)
    assert main(["ablate", "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert named in err
    assert "pip install 'curvlab[ablate]'" in err
    assert not (tmp_path / "never").exists()
