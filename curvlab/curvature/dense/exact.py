"""``ExactFisher``: the full Fisher / GGN matrix, exactly or as a Monte-Carlo estimate."""

from __future__ import annotations

from torch import nn

from curvlab.curvature.dense.base import DenseCurvature
from curvlab.registry import register


@register("exact_fisher")
class ExactFisher(DenseCurvature):
    """The full ``[P, P]`` Fisher of the loss as it is reduced (concepts/fisher_types.md).

    ``fisher_type="exact"`` is the true Fisher (= the GGN for the supported losses),
    from BackPACK's exact loss-Hessian square root; ``"mc"`` its Monte-Carlo estimate
    with ``mc_samples`` labels drawn from the model per input. Includes every
    cross-layer block; meant for small models and as the reference of ablations.
    """

    fisher_types = ("exact", "mc")

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        fisher_type: str = "exact",
        mc_samples: int = 1,
        engine: str = "auto",
    ) -> None:
        super().__init__(
            model, loss_fn, fisher_type=fisher_type, mc_samples=mc_samples, engine=engine
        )

    def _partition(self) -> list[tuple[int, int]]:
        return [(0, len(self.params))]
