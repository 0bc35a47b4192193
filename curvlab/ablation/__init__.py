"""Research ablations: approximation quality against the exact Fisher and optimizer races.

* :func:`quality` — every backend against :class:`~curvlab.ExactFisher` on the same data.
* :func:`race` — SGD, Adam, AdamW, NAdamW, any torch.optim-style class, exact natural
  gradient, ``KFACOptimizer`` and one ``NaturalGradient`` per backend from one
  initialisation, by iteration and by wall-clock.
* :func:`plot_race`, :func:`plot_loss`, :func:`plot_quality` — the figures.
* :func:`load_dataset`, :func:`build_model` — the data and networks of ``curvlab ablate``
  (which also takes a user's ``.npz`` and ``module:factory`` model).
"""

from curvlab.ablation.data import (
    EMBEDDED_DATASETS,
    MODELS,
    Dataset,
    build_model,
    load_dataset,
    loss_and_targets,
    model_inputs,
)
from curvlab.ablation.measure import PeakTensorMemory, Stopwatch
from curvlab.ablation.metrics import QualityReport, QualityRow, quality
from curvlab.ablation.plots import plot_loss, plot_quality, plot_race
from curvlab.ablation.races import (
    BASELINES,
    Contender,
    Curve,
    RaceResult,
    contender,
    race,
    tune,
)

__all__ = [
    "BASELINES",
    "EMBEDDED_DATASETS",
    "MODELS",
    "Contender",
    "Curve",
    "Dataset",
    "PeakTensorMemory",
    "QualityReport",
    "QualityRow",
    "RaceResult",
    "Stopwatch",
    "build_model",
    "contender",
    "load_dataset",
    "loss_and_targets",
    "model_inputs",
    "plot_loss",
    "plot_quality",
    "plot_race",
    "quality",
    "race",
    "tune",
]
