"""``ExactFisher``: the full Fisher / GGN matrix, exactly or as a Monte-Carlo estimate."""

from __future__ import annotations

import operator

from curvlab.curvature.dense.base import DenseCurvature
from curvlab.curvature.registry import register


@register("exact_fisher")
class ExactFisher(DenseCurvature):
    """The full ``[P, P]`` Fisher of the loss as it is reduced (concepts/fisher_types.md).

    ``fisher_type="exact"`` is the true Fisher (= the GGN for the supported losses),
    from the exact loss-Hessian square root; ``"mc"`` its Monte-Carlo estimate
    with ``mc_samples`` labels drawn from the model per input. Includes every
    cross-layer block; meant for small models and as the reference of ablations.
    """

    #: the types whose columns estimate the true Fisher (:attr:`FisherType.true_fisher
    #: <curvlab.FisherType.true_fisher>`): ``"exact"``, ``"mc"`` and registered ones
    fisher_types = operator.attrgetter("true_fisher")

    def _partition(self) -> list[tuple[int, int]]:
        return [(0, len(self.params))]
