"""Training-data attribution with influence functions (concepts/influence.md).

``Influence(curvature, task, damping)`` turns any backend's damped inverse into scores
``−∇ℓ_qᵀ (C + λI)⁻¹ ∇ℓ_z``: pairwise (``[queries, train]``), self-influence and per
module, streamed over loaders; :class:`InfluenceScores` keeps them with their settings.
"""

from curvlab.influence.analyzer import Influence
from curvlab.influence.scores import InfluenceScores
from curvlab.influence.task import LossTask, Task

__all__ = ["Influence", "InfluenceScores", "LossTask", "Task"]
