"""Levenberg–Marquardt adaptation of the damping (Martens & Grosse 2015 §6.5;
concepts/natural_gradient.md#levenberg-marquardt-damping)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class LevenbergMarquardt:
    """``λ`` adapted from the reduction ratio ``ρ = (h(θ+δ) − h(θ)) / (M(δ) − M(0))``.

    Every ``interval`` steps: ``ρ > upper`` (the quadratic model predicted the decrease
    well) shrinks ``λ ← decay·λ``; ``ρ < lower`` (or a non-finite ``ρ``) grows
    ``λ ← λ/decay``; otherwise ``λ`` stays. Defaults: thresholds 1/4 and 3/4,
    ``decay = (19/20)^interval`` with ``interval = 5`` (``T1``), as in the paper.

    Attributes:
        value: the current ``λ``.
    """

    initial: float = 1.0
    interval: int = 5
    decay: float | None = None
    lower: float = 0.25
    upper: float = 0.75
    minimum: float = 1e-8
    maximum: float = 1e8
    value: float = field(init=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.initial) and self.initial > 0):
            raise ValueError(f"LevenbergMarquardt: initial must be > 0, got {self.initial}.")
        if (
            isinstance(self.interval, bool)
            or not isinstance(self.interval, int)
            or self.interval < 1
        ):
            raise ValueError(
                f"LevenbergMarquardt: interval must be a positive int, got {self.interval!r}."
            )
        if self.decay is None:
            self.decay = (19.0 / 20.0) ** self.interval
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"LevenbergMarquardt: decay must lie in (0, 1), got {self.decay}.")
        if not 0.0 <= self.lower < self.upper:
            raise ValueError("LevenbergMarquardt: need 0 <= lower < upper.")
        self.value = float(self.initial)

    def due(self, step: int) -> bool:
        """Whether ``ρ`` is measured at ``step`` (0-based)."""
        return step % self.interval == 0

    def update(self, rho: float) -> float:
        """Adapt ``λ`` to the measured ``ρ``; returns the new value."""
        assert self.decay is not None
        if not math.isfinite(rho) or rho < self.lower:
            self.value /= self.decay
        elif rho > self.upper:
            self.value *= self.decay
        self.value = min(max(self.value, self.minimum), self.maximum)
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
