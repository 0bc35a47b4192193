"""Influence scores with the settings that produced them (``save``/``load``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: Setting values a saved result may hold (loaded back with ``weights_only=True``).
_PLAIN = (str, int, float, bool, type(None))


@dataclass
class InfluenceScores:
    """Scores ``−∇L(q)ᵀ (C + λI)⁻¹ ∇L(z)`` and how they were computed.

    Attributes:
        scores: ``[Q, N]`` (``kind="pairwise"``: query ``q``, training example ``z`` in
            loader order) or ``[N]`` (``kind="self"``: ``q = z``).
        kind: ``"pairwise"`` or ``"self"``.
        modules: per-module scores (same shape as ``scores``; they sum to ``scores``), keyed
            by module name, or ``None`` when not requested.
        settings: backend, damping, dtypes, query rank, query approximation error, ... —
            plain values (``str``, ``int``, ``float``, ``bool``, ``None``).

    Sign: negative scores are *helpful* (up-weighting ``z`` lowers the query's loss),
    positive ones harmful; self-influence is never positive.
    """

    scores: Tensor
    kind: str
    modules: dict[str, Tensor] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("pairwise", "self"):
            raise ValueError(
                f"InfluenceScores: kind must be 'pairwise' or 'self', got {self.kind!r}."
            )
        for key, value in self.settings.items():
            if not isinstance(value, _PLAIN):
                raise TypeError(
                    f"InfluenceScores: setting {key!r} must be a plain value (str, int, "
                    f"float, bool, None), got {type(value).__name__}."
                )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write scores, per-module scores and settings to ``path`` (``torch.save``)."""
        torch.save(
            {
                "format": 1,
                "scores": self.scores.detach().cpu(),
                "kind": self.kind,
                "modules": None
                if self.modules is None
                else {k: v.detach().cpu() for k, v in self.modules.items()},
                "settings": dict(self.settings),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> InfluenceScores:
        """Read what :meth:`save` wrote (tensors on the CPU)."""
        data = torch.load(path, weights_only=True)
        if not isinstance(data, dict) or data.get("format") != 1:
            raise ValueError(f"InfluenceScores.load: {os.fspath(path)!r} is not a saved result.")
        return cls(
            scores=data["scores"],
            kind=data["kind"],
            modules=data["modules"],
            settings=data["settings"],
        )

    def top(self, k: int, query: int = 0, helpful: bool = True) -> Tensor:
        """Indices of the ``k`` most helpful (most negative) or, with ``helpful=False``,
        most harmful training examples for ``query`` (pairwise scores) or overall (self)."""
        row = self.scores[query] if self.kind == "pairwise" else self.scores
        return torch.topk(row.float(), k, largest=not helpful).indices
