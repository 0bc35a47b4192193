"""``EmpiricalFisher``: the full empirical Fisher from per-sample gradients."""

from __future__ import annotations

from torch import nn

from curvlab.curvature.dense.base import DenseCurvature
from curvlab.curvature.registry import register


@register("empirical_fisher")
class EmpiricalFisher(DenseCurvature):
    """``EF = R·Σ_n ∇ℓ_n ∇ℓ_nᵀ`` with the observed labels (concepts/conventions.md).

    Built from per-sample gradients of the loss rows, rescaled so it sits on
    the exact Fisher's scale (``R = 1/N`` for CE-mean, ``1/(N·C)`` for MSE/BCE-mean,
    ``1`` for sum); this is curvlinops' ``EFLinearOperator``. It is *not* an estimator
    of the Fisher (concepts/fisher_types.md).
    """

    fisher_types = ("empirical",)

    def __init__(self, model: nn.Module, loss_fn: nn.Module, engine: str = "auto") -> None:
        super().__init__(model, loss_fn, fisher_type="empirical", engine=engine)

    def _partition(self) -> list[tuple[int, int]]:
        return [(0, len(self.params))]
