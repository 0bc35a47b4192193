"""The pieces a :class:`~curvlab.NaturalGradient` is composed of, each with one job.

* :class:`MovingAverage` — the exponential moving average of a backend's statistics
  (concepts/natural_gradient.md#moving-averages-of-the-statistics);
* :class:`InversionSchedule` — on which steps statistics are taken and decompositions
  refreshed;
* :class:`LearningRate` — the rate the optimizer applies, read at every step;
* :class:`KLClip` — scales a preconditioned gradient so that the step's KL change stays
  below a bound (concepts/natural_gradient.md#kl-clipping);
* :func:`missing_gradient` and :func:`non_finite_gradient` — what is wrong with a gradient
  that cannot be preconditioned (one wording for one process and for several);
* :class:`graph_used_once` — autograd's "backward through the graph a second time" as a
  clear error.

The damping policy (a constant, a schedule or Levenberg–Marquardt adaptation) is
:class:`curvlab.optim.damping.Damping`; the distribution over processes is a strategy of
:mod:`curvlab.optim.strategies` (collectives: :mod:`curvlab.optim.distributed`). Each piece
is a small object with plain state, tested on its own; none knows the backend's type —
statistics are pytrees of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from curvlab import linalg


class MovingAverage:
    """``average ← ε·average + (1 − ε)·batch`` over the tensors of a statistics pytree.

    ``ε = min(1 − 1/u, decay)`` with ``u`` the number of updates so far: a plain average
    of the first updates, then an exponential one. A batch whose structure differs from
    the average's (keys, lengths or shapes — e.g. EKFAC refitted its eigenbasis) restarts
    the average. A structured factor (:class:`~curvlab.linalg.DiagonalPlusLowRank`) mixes
    as a matrix: ``ε·average + (1 − ε)·batch`` recompressed to its rank
    (:func:`~curvlab.linalg.low_rank_sum`: diagonal exact, low-rank part exact while the
    two ranks add up to at most the rank), not factor by factor.

    Attributes:
        value: the current average (``None`` before the first update).
        num_updates: updates since construction (restarts included).
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MovingAverage: decay must lie in [0, 1), got {decay}.")
        self.decay = decay
        self.value: Any = None
        self.num_updates = 0

    def update(self, batch: Any) -> bool:
        """Blend ``batch`` in; ``True`` if the average restarted from it (a new structure)."""
        self.num_updates += 1
        if self.value is None or not same_structure(self.value, batch):
            restarted = self.value is not None
            self.value = batch
            return restarted
        eps = min(1.0 - 1.0 / self.num_updates, self.decay)
        self.value = pytree.tree_map(
            lambda a, b: _mix(a, b, eps), self.value, batch, is_leaf=_is_low_rank
        )
        return False


def _is_low_rank(x: Any) -> bool:
    return isinstance(x, linalg.DiagonalPlusLowRank)


def _mix(average: Any, batch: Any, eps: float) -> Any:
    if isinstance(average, linalg.DiagonalPlusLowRank):
        # the matrices mix, not their factors (U's of two batches are different bases):
        # ε·avg + (1 − ε)·batch recompressed to the rank, diagonal exact (linalg.low_rank_sum)
        if eps == 0.0:
            return batch
        rank = int(average.U.shape[1])
        return linalg.low_rank_sum([average.scaled(eps), batch.scaled(1.0 - eps)], rank)
    return torch.lerp(batch, average, eps) if isinstance(average, Tensor) else average


def same_structure(a: Any, b: Any) -> bool:
    """Whether two pytrees have the same structure, tensor shapes and non-tensor leaves."""
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            if not (isinstance(x, Tensor) and isinstance(y, Tensor) and x.shape == y.shape):
                return False
        elif x != y:
            return False
    return True


@dataclass(frozen=True)
class InversionSchedule:
    """Statistics every ``update_every`` steps, new decompositions every ``invert_every``.

    Steps are counted from 0 by completed ``step()`` calls.
    """

    update_every: int = 1
    invert_every: int = 10

    def __post_init__(self) -> None:
        for name in ("update_every", "invert_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NaturalGradient: {name} must be a positive int, got {value!r}.")

    def statistics_due(self, step: int) -> bool:
        """Whether step ``step`` takes curvature statistics."""
        return step % self.update_every == 0

    def inversion_due(self, step: int) -> bool:
        """Whether step ``step`` refreshes the decompositions from the current average."""
        return step % self.invert_every == 0


Schedule = Callable[[int], float]


def _positive(value: Any, what: str) -> float:
    """``value`` as a float if it is a finite positive number (clear error otherwise)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"NaturalGradient: {what} must be a float, got {type(value).__name__}.")
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"NaturalGradient: {what} must be finite and > 0, got {value}.")
    return float(value)


class LearningRate:
    """The learning rate the optimizer will apply to each preconditioned gradient.

    From one of two sources, read at every step (so learning-rate schedulers work):

    * ``optimizer``: a ``torch.optim.Optimizer``; each parameter's rate is its param
      group's ``lr``, read when asked;
    * ``lr``: a float or a callable ``step -> float``.

    ``lr`` wins when both are given. Without either, the rate is unknown
    (:attr:`known` is ``False``); asking for it then raises.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        names: Sequence[str],
        lr: float | Schedule | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if lr is not None and not callable(lr):
            _positive(lr, "lr")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "NaturalGradient: optimizer must be a torch.optim.Optimizer, got "
                f"{type(optimizer).__name__}."
            )
        self.lr = lr
        self.optimizer = optimizer
        self._groups: list[int] = []
        if optimizer is not None and lr is None:
            group_of = {
                id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]
            }
            missing = [n for p, n in zip(params, names) if id(p) not in group_of]
            if missing:
                raise ValueError(
                    f"NaturalGradient: the optimizer does not update {missing[:5]}"
                    f"{' …' if len(missing) > 5 else ''}, which the curvature covers; give it "
                    "every covered parameter (or exclude those layers from the curvature)."
                )
            self._groups = [group_of[id(p)] for p in params]
        self._count = len(params)

    @property
    def known(self) -> bool:
        return self.lr is not None or self.optimizer is not None

    def describe(self) -> str:
        if self.lr is not None:
            return f"lr={self.lr if not callable(self.lr) else 'schedule'}"
        return "lr=optimizer" if self.optimizer is not None else "lr=None"

    def per_parameter(self, step: int) -> list[float]:
        """Each covered parameter's rate at ``step``."""
        if self.lr is not None:
            value = _positive(self.lr(step) if callable(self.lr) else self.lr, "lr")
            return [value] * self._count
        if self.optimizer is None:
            raise RuntimeError("NaturalGradient: no learning rate known (pass optimizer= or lr=).")
        rates = [
            _positive(group["lr"], "the optimizer's lr") for group in self.optimizer.param_groups
        ]
        return [rates[g] for g in self._groups]


class KLClip:
    """Scale ``ĝ`` by ``ν = min(1, sqrt(bound / |Σᵢ lrᵢ² ⟨ĝᵢ, gᵢ⟩|))`` (Ba et al. 2017;
    kfac-pytorch's default bound is 10⁻³), ``lrᵢ`` the rate applied to parameter ``i``.

    ``bound`` is a float or a callable ``step -> float``. Computed with tensor
    operations: no value is read back to the host.
    """

    def __init__(self, bound: float | Schedule) -> None:
        if not callable(bound):
            _positive(bound, "kl_clip")
        self.bound = bound

    def at(self, step: int) -> float:
        return _positive(self.bound(step) if callable(self.bound) else self.bound, "kl_clip")

    def __call__(
        self, natural: list[Tensor], grads: list[Tensor], lrs: Sequence[float], step: int = 0
    ) -> list[Tensor]:
        inner = torch.stack(
            [
                lr**2 * torch.vdot(n.reshape(-1), g.reshape(-1))
                for n, g, lr in zip(natural, grads, lrs)
            ]
        ).sum()
        quad = inner.abs().clamp(min=torch.finfo(inner.dtype).tiny)
        nu = (self.at(step) / quad).sqrt().clamp(max=1.0)
        return [n * nu for n in natural]


def missing_gradient(name: str) -> str:
    """The problem of a covered parameter without ``.grad``."""
    return f"parameter '{name}' has no gradient; call precond.backward(loss) before step()."


def non_finite_gradient(names: Sequence[str]) -> str:
    """The problem of gradients with NaN/Inf in the parameters ``names`` (up to five named)."""
    shown = f"{list(names[:5])}{' …' if len(names) > 5 else ''}"
    return (
        f"the gradient is not finite in {shown}; the parameters were not changed. Check the "
        "batch for NaN/Inf, lower the learning rate or raise the damping."
    )


class graph_used_once:
    """Turn autograd's "backward through the graph a second time" into a clear error."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: Any, tb: Any) -> None:
        if isinstance(err, RuntimeError) and "second time" in str(err):
            raise RuntimeError(
                "NaturalGradient.backward: this loss was already backpropagated (e.g. by "
                "another preconditioner or a loss.backward() call); build each loss once per "
                "backward, or combine the curvatures in one preconditioner."
            ) from err
