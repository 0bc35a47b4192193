"""``curvlab ablate --contenders``, ``--model module:factory``, ``--loss``, ``--data`` with
a validation set, and the one-line-per-contender findings: tiny runs and input errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import curvlab.ablation.cli as cli
from curvlab.ablation.cli import main

TINY = ["--steps", "4", "--eval-every", "2", "--batch-size", "16", "--quality-samples", "16",
        "--backends", "kfac", "--no-progress"]  # fmt: skip
FACTORIES = "tests.ablation.factories"


def _npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _small(path, n: int = 48, features: int = 5, classes: int = 3, **extra) -> str:
    rng = np.random.default_rng(0)
    return _npz(path, X=rng.random((n, features)), y=np.arange(n) % classes, **extra)


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    """One run with every kind of contender (built-in, new, import path) on tiny data."""
    tmp = tmp_path_factory.mktemp("selected")
    out = tmp / "run"
    contenders = "sgd,adamw,nadamw,ngd,kfac-optimizer,eig-adam,torch.optim:RMSprop"
    code = main(["ablate", *TINY, "--model", "mlp", "--data", _small(tmp / "d.npz"),
                 "--contenders", contenders, "--lr", "sgd=0.05", "--out", str(out)])  # fmt: skip
    assert code == 0
    return json.loads((out / "results.json").read_text()), (out / "summary.md").read_text()


def test_contenders_choose_who_races_then_the_backends(selected) -> None:
    results, _ = selected
    names = [c["name"] for c in results["race"]["curves"]]
    assert names == [
        "SGD", "AdamW", "NAdamW", "exact NGD", "KFACOptimizer", "EigenbasisAdam", "RMSprop",
        "kfac",
    ]  # fmt: skip
    settings = results["settings"]
    assert settings["contenders"] == [
        "sgd", "adamw", "nadamw", "ngd", "kfac-optimizer", "eig-adam", "torch.optim:RMSprop",
    ]  # fmt: skip
    # --lr sets a group; the others keep their defaults; a class its own default lr
    assert settings["learning_rates"]["SGD"] == 0.05
    assert settings["learning_rates"]["AdamW"] == settings["learning_rates"]["NAdamW"] == 0.01
    assert settings["learning_rates"]["RMSprop"] == 0.01  # torch.optim.RMSprop's default
    assert settings["learning_rates"]["EigenbasisAdam"] == 0.01  # the group eig_adam's
    optimizers = {c["name"]: c["optimizer"] for c in results["race"]["curves"]}
    assert optimizers["RMSprop"] == "torch.optim:RMSprop" and optimizers["NAdamW"] == "nadamw"


def test_the_findings_are_one_short_line_per_contender(selected) -> None:
    results, summary = selected
    names = [c["name"] for c in results["race"]["curves"]]
    findings = summary.split("**Findings.**")[1].split("**Race.**")[0]
    headline, *rest = [line for line in findings.strip().splitlines() if line]
    assert headline.startswith(("To train loss", "No optimizer reached")) and "lowest final" in (
        headline
    )
    assert [line.split(":")[0] for line in rest] == [f"- {n}" for n in names]
    for line in rest:
        assert len(line) < 160, line
        assert re.search(r"(train loss 0\.1 (at iteration \d+ \(|not reached in 4 iter))", line)
        assert re.search(r"; final \d", line) or "diverged" in line
        if "exact NGD:" not in line and "diverged" not in line:
            assert re.search(r"; median [\d.]+× exact NGD's loss per iteration$", line), line
    assert results["findings"] == [line[2:] for line in rest]
    # the tables stay
    assert "| RMSprop | 0.01 |" in summary and "| NAdamW |" in summary
    assert "**Approximation quality.**" in summary
    assert "NAdamW: `torch.optim.NAdam(decoupled_weight_decay=True)`" in summary
    assert "RMSprop is `torch.optim:RMSprop` with its defaults besides lr" in summary


def test_a_class_by_import_path_takes_its_lr_from_the_lr_option(tmp_path) -> None:
    out = tmp_path / "run"
    assert main(["ablate", *TINY, "--model", "mlp", "--data", _small(tmp_path / "d.npz"),
                 "--contenders", "sgd,torch.optim:RMSprop", "--steps", "2",
                 "--lr", "torch.optim:RMSprop=0.003", "--out", str(out)]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["learning_rates"] == {"SGD": 0.1, "RMSprop": 0.003, "kfac": 0.1}
    assert [c["name"] for c in results["race"]["curves"]] == ["SGD", "RMSprop", "kfac"]


def test_a_third_party_optimizer_by_import_path(tmp_path) -> None:
    pytest.importorskip("pytorch_optimizer", reason="an optional third-party optimizer")
    out = tmp_path / "run"
    data = _small(tmp_path / "d.npz")
    assert main(["ablate", *TINY, "--model", "mlp", "--data", data, "--contenders",
                 "adam,pytorch_optimizer:SOAP", "--out", str(out)]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert [c["name"] for c in results["race"]["curves"]] == ["Adam", "SOAP", "kfac"]


def test_third_party_optimizers_are_imported_only_when_named() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from curvlab.ablation.cli import _contenders, _contender_names\n"
        "_contenders(['kfac'], {}, None, {}, _contender_names('sgd,adamw,nadamw'))\n"
        "assert 'pytorch_optimizer' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("contenders", "message"),
    [
        ("sgd,lbfgs", r"--contenders: unknown contender 'lbfgs'\. Valid: sgd, adam, adamw"),
        ("sgd,kfc", r"'kfc' is a curvature backend: .* --backends kfc"),
        ("", "--contenders: none given"),
        ("no_such_pkg.optim:Fast", r"'no_such_pkg\.optim:Fast': cannot import module"),
        ("torch.optim:Fastest", r"'torch\.optim:Fastest': module 'torch\.optim' has no"),
        ("torch.nn:Linear", r"'torch\.nn:Linear' is not a torch\.optim-style optimizer class"),
        (f"{FACTORIES}:NeedsBetas", r"NeedsBetas' has no default learning rate; give one"),
    ],
)
def test_a_bad_contender_is_named_before_any_work(
    tmp_path, capsys, monkeypatch, contenders, message
) -> None:
    def never(*args, **kwargs):
        raise AssertionError("trained before the error")

    monkeypatch.setattr(cli, "race", never)
    monkeypatch.setattr(cli, "load_dataset", never)
    out = tmp_path / "never"
    assert main(["ablate", "--contenders", contenders, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()


def test_a_class_that_does_not_build_is_named_before_any_training(
    tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(cli, "race", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "never"
    spec = f"{FACTORIES}:NeedsBetas"
    args = ["ablate", "--model", "mlp", "--data", _small(tmp_path / "d.npz"), "--contenders",
            spec, "--lr", f"{spec}=0.1", "--out", str(out)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Contender 'NeedsBetas'" in err and "missing 1 required positional argument" in err
    assert not out.exists()


def test_lr_groups_include_the_new_optimizers_and_import_paths(capsys) -> None:
    from curvlab.ablation.cli import _learning_rates

    assert _learning_rates("adamw=0.02,nadamw=0.03") == {"adamw": 0.02, "nadamw": 0.03}
    assert _learning_rates("torch.optim:RMSprop=0.5", ["torch.optim:RMSprop"]) == {
        "torch.optim:RMSprop": 0.5
    }
    assert _learning_rates("0.2", ["a:B"])["a:B"] == 0.2
    with pytest.raises(ValueError, match=r"unknown group 'kfac-optimizer' \(KFACOptimizer uses"):
        _learning_rates("kfac-optimizer=0.1")
    with pytest.raises(ValueError, match=r"unknown group 'kfc' \(every natural gradient is in"):
        _learning_rates("kfc=0.1")


# --- --model module:factory ----------------------------------------------------------------


def test_a_users_model_factory_gets_the_input_shape_and_the_class_count(tmp_path) -> None:
    out = tmp_path / "run"
    assert main(["ablate", *TINY, "--model", f"{FACTORIES}:tiny_mlp", "--contenders",
                 "sgd,ngd", "--out", str(out)]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    assert settings["model"] == f"{FACTORIES}:tiny_mlp" and settings["loss"] == "ce"
    assert settings["num_params"] == 64 * 6 + 6 + 6 * 10 + 10  # (8, 8) digits, 10 classes
    curves = results["race"]["curves"]
    assert all(c["val_accuracy"] is not None for c in curves)
    # the target: a tenth of the shared initial training loss, two digits
    initial = curves[0]["train_loss"][0]
    assert results["race"]["target_loss"] == float(f"{initial / 10:.2g}")
    summary = (out / "summary.md").read_text()
    assert f"`{FACTORIES}:tiny_mlp` (460 parameters, ce loss)" in summary


def test_a_factory_without_arguments_and_the_reconstruction_losses(tmp_path) -> None:
    out = tmp_path / "fixed"
    assert main(["ablate", *TINY, "--steps", "2", "--model", f"{FACTORIES}:fixed_digits_mlp",
                 "--contenders", "adam", "--out", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "results.json").read_text())["settings"]["num_params"] == 650
    # the digits have class labels only, and this file no y: mse and bce reconstruct X
    pixels = _npz(tmp_path / "x.npz", X=np.random.default_rng(0).random((30, 4)))
    for loss, data, size in (("mse", "digits", 64), ("bce", pixels, 4)):
        out = tmp_path / loss
        assert main(["ablate", *TINY, "--steps", "2", "--model", f"{FACTORIES}:tiny_mlp",
                     "--loss", loss, "--data", data, "--contenders", "adam",
                     "--out", str(out)]) == 0  # fmt: skip
        results = json.loads((out / "results.json").read_text())
        assert results["settings"]["loss"] == loss
        assert results["settings"]["num_params"] == size * 6 + 6 + 6 * size + size
        assert all(c["val_accuracy"] is None for c in results["race"]["curves"])


def test_regression_targets_from_a_file_infer_mse(tmp_path) -> None:
    rng = np.random.default_rng(1)
    X = rng.random((40, 4))
    data = _npz(tmp_path / "reg.npz", X=X, y=X @ np.array([1.0, -2.0, 0.5, 0.0]))
    out = tmp_path / "run"
    assert main(["ablate", *TINY, "--model", f"{FACTORIES}:tiny_mlp", "--data", data,
                 "--contenders", "sgd", "--out", str(out)]) == 0  # fmt: skip
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["loss"] == "mse" and settings["num_params"] == 4 * 6 + 6 + 6 + 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet"], r"unknown model 'resnet'\. Valid: convnet, mlp, autoencoder"),
        (["--model", "no_such_pkg:net"], r"--model: 'no_such_pkg:net': cannot import module"),
        (["--model", f"{FACTORIES}:nothing"], r"module 'tests\.ablation\.factories' has no"),
        (["--model", f"{FACTORIES}:NOT_CALLABLE"], "3 is not callable"),
        (["--model", f"{FACTORIES}:not_a_module"], r"returned str, not an nn\.Module"),
        (["--model", f"{FACTORIES}:broken"], r"raised RuntimeError: the factory's own bug"),
        (["--model", f"{FACTORIES}:too_many"], r"must take \(input_shape, num_outputs\) or no"),
        (["--model", f"{FACTORIES}:three_outputs"], r"logits with C >= 10 classes.*got \[2, 3\]"),
        (
            ["--model", f"{FACTORIES}:three_outputs", "--loss", "mse"],
            r"its output must be \[N, 64\] .*got \[2, 3\]",
        ),
        (["--model", "autoencoder", "--loss", "ce"], "the built-in model 'autoencoder' trains"),
    ],
)
def test_a_bad_model_is_named_before_any_training(
    tmp_path, capsys, monkeypatch, args, message
) -> None:
    monkeypatch.setattr(cli, "race", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "never"
    assert main(["ablate", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()


def test_a_loss_that_does_not_fit_the_data_says_so(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    data = _npz(tmp_path / "reg.npz", X=rng.random((10, 3)), y=rng.random(10) * 5)
    for loss, message in (("ce", "y must hold integer class labels"), ("bce", r"in \[0, 1\]")):
        out = tmp_path / "never"
        args = ["ablate", "--model", f"{FACTORIES}:tiny_mlp", "--data", data, "--loss", loss]
        assert main([*args, "--out", str(out)]) == 2
        assert re.search(message, capsys.readouterr().err)
        assert not out.exists()


# --- --data file.npz -----------------------------------------------------------------------


def test_a_files_own_validation_set_replaces_the_split(tmp_path) -> None:
    rng = np.random.default_rng(0)
    data = _small(tmp_path / "d.npz", n=40, X_val=rng.random((7, 5)), y_val=np.arange(7) % 3)
    out = tmp_path / "run"
    assert main(["ablate", *TINY, "--model", "mlp", "--data", data, "--contenders", "sgd",
                 "--out", str(out)]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    assert settings["train_samples"] == 40 and settings["val_samples"] == 7
    assert settings["validation"] == "given" and settings["data"] == "d"
    assert "40 training / 7 validation samples, the file's own" in (out / "summary.md").read_text()


def test_without_a_validation_set_val_fraction_splits(tmp_path) -> None:
    out = tmp_path / "run"
    assert main(["ablate", *TINY, "--steps", "2", "--model", "mlp", "--data",
                 _small(tmp_path / "d.npz", n=40), "--val-fraction", "0.25", "--contenders",
                 "sgd", "--out", str(out)]) == 0  # fmt: skip
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert (settings["train_samples"], settings["val_samples"]) == (30, 10)
    assert settings["validation"] == 0.25


_X = np.random.default_rng(0).random((12, 5))
_Y = np.arange(12) % 3


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": _X}, r"missing array\(s\) y; the file has X"),
        ({"x": _X, "y": _Y}, r"array 'x': names are case-sensitive; did you mean 'X'\?"),
        ({"X": _X, "y": _Y[:10]}, "X has 12 samples but y has 10 labels"),
        ({"X": _X.astype(str), "y": _Y}, "X must be real numbers, got dtype <U"),
        ({"X": _X, "y": _Y + 0.5}, "y must hold integer class labels, got dtype float64"),
        ({"X": _X, "y": _Y, "X_val": _X[:3]}, "X_val without y_val; give both"),
        ({"X": _X, "y": _Y, "y_val": _Y[:3]}, "y_val without X_val; give both"),
        (
            {"X": _X, "y": _Y, "X_val": _X[:3, :4], "y_val": _Y[:3]},
            r"X_val has samples of shape \(4,\) but X has \(5,\)",
        ),
        (
            {"X": _X, "y": _Y, "X_val": _X[:3], "y_val": _Y[:2]},
            "X_val has 3 samples but y_val has 2 labels",
        ),
        ({"X": _X, "y": _Y, "X_val": _X[:3], "y_val": -_Y[1:4]}, "labels must be >= 0"),
    ],
    ids=[
        "no-y",
        "case",
        "lengths",
        "strings",
        "float-labels",
        "X_val-alone",
        "y_val-alone",
        "val-shape",
        "val-lengths",
        "val-labels",
    ],
)
def test_a_bad_data_file_is_named_with_what_is_wrong(
    tmp_path, capsys, monkeypatch, arrays, message
) -> None:
    monkeypatch.setattr(cli, "race", lambda *a, **k: pytest.fail("trained"))
    path = _npz(tmp_path / "data.npz", **arrays)
    out = tmp_path / "never"
    assert main(["ablate", "--model", "mlp", "--data", path, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert path in err and re.search(message, err), err
    assert not out.exists()


def test_a_class_named_like_a_built_in_is_labelled_by_its_path() -> None:
    from curvlab.ablation.cli import _contenders

    names = [c.name for c in _contenders(["kfc"], {}, None, {}, ["sgd", "torch.optim:SGD"])]
    assert names == ["SGD", "torch.optim:SGD", "kfc"]
