"""The damping ``λ`` of a natural-gradient step: the :class:`Damping` policy (a constant, a
schedule, or Levenberg–Marquardt adaptation — Martens & Grosse 2015 §6.5;
concepts/natural_gradient.md#levenberg-marquardt-damping).

How a backend applies ``λ`` to its blocks (exactly, or factored as ``A + πγI``,
``G + γ/π I``) is linear algebra: :mod:`curvlab.linalg.damping`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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
        if not math.isfinite(rho) or rho < self.lower:
            return self.grow()
        if rho > self.upper:
            assert self.decay is not None
            self.value *= self.decay
        self.value = min(max(self.value, self.minimum), self.maximum)
        return self.value

    def grow(self) -> float:
        """``λ ← λ/decay`` (at most ``maximum``), as for a poor ``ρ``; returns the new value."""
        assert self.decay is not None
        self.value = min(max(self.value / self.decay, self.minimum), self.maximum)
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


DampingSchedule = Callable[[int], float]


class Damping:
    """The damping ``λ`` of every step, from one of three policies.

    * a float: constant;
    * a callable ``step -> float``: a schedule (evaluated and checked each step);
    * a :class:`LevenbergMarquardt`: adapted from the reduction ratio ``ρ`` measured on its
      due steps (:meth:`adaptation_due`, :meth:`adapt`).
    """

    def __init__(self, policy: float | DampingSchedule | LevenbergMarquardt) -> None:
        if not callable(policy) and not isinstance(policy, LevenbergMarquardt):
            check_damping(policy)
        self.policy = policy

    def at(self, step: int) -> float:
        """``λ`` at ``step``."""
        if isinstance(self.policy, LevenbergMarquardt):
            return self.policy.value
        if callable(self.policy):
            return check_damping(self.policy(step))
        return float(self.policy)

    def adaptation_due(self, step: int) -> bool:
        """Whether ``ρ`` should be measured at ``step`` (Levenberg–Marquardt only)."""
        return isinstance(self.policy, LevenbergMarquardt) and self.policy.due(step)

    def adapt(self, rho: float) -> None:
        """Adapt a Levenberg–Marquardt ``λ`` to the measured ``ρ``."""
        assert isinstance(self.policy, LevenbergMarquardt)
        self.policy.update(rho)

    def state_dict(self) -> dict[str, float] | None:
        """The adapted state (``None`` unless Levenberg–Marquardt)."""
        if isinstance(self.policy, LevenbergMarquardt):
            return self.policy.state_dict()
        return None

    def load_state_dict(self, state: dict[str, float] | None) -> None:
        if isinstance(self.policy, LevenbergMarquardt) and state is not None:
            self.policy.load_state_dict(state)


def check_damping(value: Any) -> float:
    """``value`` as a float if it is a finite, non-negative number (clear error otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"NaturalGradient: damping must be a float, got {type(value).__name__}.")
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"NaturalGradient: damping must be finite and >= 0, got {value}.")
    return float(value)
