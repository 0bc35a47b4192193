"""The damping ``λ`` of a natural-gradient step: the :class:`Damping` policy (a constant, a
schedule, or Levenberg–Marquardt adaptation — Martens & Grosse 2015 §6.5;
concepts/natural_gradient.md#levenberg-marquardt-damping).

The Levenberg–Marquardt rule lives here once: :meth:`LevenbergMarquardt.observe` turns the
measured and predicted changes of a step into ``ρ`` and adapts ``λ``; both
:class:`~curvlab.NaturalGradient` (``step(closure)``) and :class:`~curvlab.KFACOptimizer`
(its quadratic model) call it.

How a backend applies ``λ`` to its blocks (exactly, or factored as ``A + πγI``,
``G + γ/π I``) is linear algebra: :mod:`curvlab.linalg.damping`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from curvlab.linalg.damping import check_damping


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

    def observe(self, before: float, after: float, predicted_change: float) -> float:
        """Adapt ``λ`` to a step that took the objective from ``before`` to ``after`` where
        the quadratic model predicted ``predicted_change = M(δ) − M(0)``; returns
        ``ρ = (after − before) / predicted_change`` (NaN unless the model predicted a
        decrease, which counts as a poor ``ρ``)."""
        rho = reduction_ratio(before, after, predicted_change)
        self.update(rho)
        return rho

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


def reduction_ratio(before: float, after: float, predicted_change: float) -> float:
    """``ρ = (after − before) / predicted_change``: the share of the decrease the quadratic
    model predicted that the step achieved; NaN unless ``predicted_change < 0``."""
    return (after - before) / predicted_change if predicted_change < 0 else float("nan")


DampingSchedule = Callable[[int], float]


@dataclass(frozen=True)
class OffsetDamping:
    """The schedule ``step -> source.value + offset``: a Levenberg–Marquardt ``λ`` adapted
    elsewhere plus a constant — :class:`~curvlab.KFACOptimizer` preconditions with
    ``λ + η`` (its ℓ2 term ``η``) while its quadratic model adapts ``λ``."""

    source: LevenbergMarquardt
    offset: float = 0.0

    def __call__(self, step: int) -> float:
        return self.source.value + self.offset


class Damping:
    """The damping ``λ`` of every step, from one of three policies.

    * a float: constant;
    * a callable ``step -> float``: a schedule (evaluated and checked each step);
    * a :class:`LevenbergMarquardt`: adapted from the reduction ratio ``ρ`` measured on its
      due steps (:meth:`adaptation_due`, :meth:`observe`).

    With ``hold=True`` the policy is read only on the preconditioner's inversion steps
    (and before its first value) and held in between, so that damped inverses are computed
    once per inversion (Martens & Grosse's ``T3``); :class:`~curvlab.KFACOptimizer` passes
    ``Damping(OffsetDamping(lm, η), hold=True)`` as a ``NaturalGradient``'s ``damping``.

    Attributes:
        policy: as given.
        hold: whether ``λ`` is held between inversions.
        held: the held ``λ`` (``None`` before the first read, or without ``hold``).
    """

    def __init__(
        self, policy: float | DampingSchedule | LevenbergMarquardt, hold: bool = False
    ) -> None:
        if not callable(policy) and not isinstance(policy, LevenbergMarquardt):
            check_damping(policy, "NaturalGradient")
        self.policy = policy
        self.hold = hold
        self.held: float | None = None

    def at(self, step: int, *, inverting: bool = False) -> float:
        """``λ`` at ``step``; a held policy returns its held value unless ``inverting``."""
        if self.hold and self.held is not None and not inverting:
            return self.held
        if isinstance(self.policy, LevenbergMarquardt):
            value = self.policy.value
        elif callable(self.policy):
            value = check_damping(self.policy(step), "NaturalGradient")
        else:
            value = float(self.policy)
        if self.hold:
            self.held = value
        return value

    def adaptation_due(self, step: int) -> bool:
        """Whether ``ρ`` should be measured at ``step`` (Levenberg–Marquardt only)."""
        return isinstance(self.policy, LevenbergMarquardt) and self.policy.due(step)

    def observe(self, before: float, after: float, predicted_change: float) -> float:
        """Adapt a Levenberg–Marquardt ``λ`` (:meth:`LevenbergMarquardt.observe`); ``ρ``."""
        if not isinstance(self.policy, LevenbergMarquardt):
            raise TypeError(
                f"Damping.observe: only a LevenbergMarquardt damping adapts, this one is "
                f"{type(self.policy).__name__}."
            )
        return self.policy.observe(before, after, predicted_change)

    def state_dict(self) -> dict[str, float] | None:
        """The adapted and held state (``None`` without either)."""
        state: dict[str, float] = {}
        if isinstance(self.policy, LevenbergMarquardt):
            state.update(self.policy.state_dict())
        if self.hold and self.held is not None:
            state["held"] = self.held
        return state or None

    def load_state_dict(self, state: dict[str, float] | None) -> None:
        if isinstance(self.policy, LevenbergMarquardt) and state is not None:
            self.policy.load_state_dict(state)
        if self.hold:
            held = None if state is None else state.get("held")
            self.held = None if held is None else float(held)
