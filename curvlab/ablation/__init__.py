"""Research ablations: approximation quality against the exact Fisher and optimizer races.

* :func:`quality` — every backend against :class:`~curvlab.ExactFisher` on the same data.
* :func:`race` — SGD, Adam, AdamW, NAdamW, any torch.optim-style class, exact natural
  gradient, ``KFACOptimizer`` and one ``NaturalGradient`` per backend from one
  initialisation, by iteration and by wall-clock.
* :func:`plot_race`, :func:`plot_loss`, :func:`plot_quality` — the figures.
* :func:`compare_attributions` — the linear datamodeling score of influence scores with
  each approximation (``curvlab ablate --task influence``), :func:`plot_attribution`.
* :func:`load_dataset`, :func:`build_model` — the data and networks of ``curvlab ablate``
  (which also takes a user's ``.npz`` and ``module:factory`` model).
"""

from curvlab.ablation.attribution import (
    AttributionResult,
    compare_attributions,
    linear_datamodeling_score,
    plot_attribution,
)
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
    "AttributionResult",
    "Contender",
    "Curve",
    "Dataset",
    "PeakTensorMemory",
    "QualityReport",
    "QualityRow",
    "RaceResult",
    "Stopwatch",
    "build_model",
    "compare_attributions",
    "contender",
    "linear_datamodeling_score",
    "load_dataset",
    "loss_and_targets",
    "model_inputs",
    "plot_attribution",
    "plot_loss",
    "plot_quality",
    "plot_race",
    "quality",
    "race",
    "tune",
]
