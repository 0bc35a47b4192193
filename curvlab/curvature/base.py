"""The ``Curvature`` interface every backend implements (DESIGN.md "The Curvature interface").

Public methods validate their arguments once and dispatch to small private hooks
(``_accumulate``, ``_matvec``, ``_solve``, ``_to_dense``, ``_state``, ``_load_state``,
``_reset``); nothing outside a backend's module knows which backend it holds.

Accumulation over several batches gives the curvature of their union: batch ``b``
enters with weight ``w_b = 1/R_b`` (its share of the union's reduction) and, for
``reduction="mean"``, the sum is divided by ``Σ_b w_b``; for ``"sum"`` the batch
curvatures simply add (``w_b = 1``, no division).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from backpack.extensions.backprop_extension import BackpropExtension
from torch import Tensor, nn

from curvlab import extraction
from curvlab.extraction import BackwardResult

Vector = list[Tensor]


@dataclass(frozen=True)
class Layer:
    """A block of the curvature: one module and its trainable parameters (weight, bias)."""

    name: str
    module: nn.Module
    params: tuple[nn.Parameter, ...]
    param_names: tuple[str, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def find_layers(model: nn.Module) -> list[Layer]:
    """Modules owning trainable parameters, in registration order, with their parameters."""
    layers = []
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            prefix = f"{name}." if name else ""
            layers.append(
                Layer(
                    name=name,
                    module=module,
                    params=tuple(p for _, p in own),
                    param_names=tuple(prefix + n for n, _ in own),
                )
            )
    return layers


class Curvature(abc.ABC):
    """A curvature approximation of a model's loss (Fisher, GGN or a structured surrogate).

    Args:
        model: the network; every module that owns trainable parameters forms a layer.
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` (mean or sum).

    Attributes:
        params: the covered parameters, in the order of every parameter-space vector.
        layers: the blocks (module + its parameters), in the same order.
    """

    #: Name under which the backend is registered (``curvlab.make(name, ...)``).
    name: ClassVar[str] = ""

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.layers: list[Layer] = self._select_layers(model)
        if not self.layers:
            raise ValueError(f"{type(self).__name__}: the model has no trainable parameters.")
        self.params: list[nn.Parameter] = [p for layer in self.layers for p in layer.params]
        self.param_names: list[str] = [n for layer in self.layers for n in layer.param_names]
        extraction.prepare(
            model,
            loss_fn,
            self.extensions(),
            owner=type(self).__name__,
            covered=[layer.module for layer in self.layers],
        )
        self.num_batches = 0
        self.num_samples = 0
        self._weight_sum = 0.0
        self._hold = False  # see hold_decompositions()

    # --- hooks for backends ----------------------------------------------------------

    def _select_layers(self, model: nn.Module) -> list[Layer]:
        return find_layers(model)

    @abc.abstractmethod
    def _extensions(self) -> list[BackpropExtension]: ...

    @abc.abstractmethod
    def _accumulate(self, result: BackwardResult, weight: float) -> None:
        """Add ``weight`` × this batch's curvature statistics to the running sums."""

    @abc.abstractmethod
    def _reset(self) -> None: ...

    @abc.abstractmethod
    def _matvec(self, v: Vector) -> Vector: ...

    @abc.abstractmethod
    def _solve(self, v: Vector, damping: float) -> Vector: ...

    @abc.abstractmethod
    def _to_dense(self) -> Tensor: ...

    @abc.abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None: ...

    def _invalidate(self) -> None:
        """Drop caches (decompositions) after the statistics changed."""

    @abc.abstractmethod
    def _statistics(self) -> dict[str, Any]:
        """Normalised statistics: tensors (or lists of tensors) linear in the data."""

    @abc.abstractmethod
    def _load_statistics(self, stats: dict[str, Any]) -> None:
        """Set the accumulated state to ``stats`` as if it were one unit-weight batch."""

    def _sampled_label_extensions(self) -> list[BackpropExtension] | None:
        """Extensions that give the same statistics from a backward of the loss at labels
        sampled from the model, or ``None``. ``update``/``extract`` use them (one ordinary
        backward pass) when every backend in the call offers them."""
        return None

    # --- public API ------------------------------------------------------------------

    def extensions(self) -> list[BackpropExtension]:
        """BackPACK extensions this backend needs in the backward pass."""
        return self._extensions()

    def update(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Forward and backward on one batch, then accumulate it. Returns the (detached) loss.

        ``p.grad`` of the model's parameters is left untouched.
        """
        return extraction.extract(self.model, self.loss_fn, inputs, targets, [self])

    def accumulate(self) -> None:
        """Read what BackPACK left after a backward pass the caller ran with ``extensions()``."""
        every = self.model.parameters()  # also clears layers this backend does not cover
        self._consume(extraction.collect(self.loss_fn, every, self.extensions()))

    def _consume(self, result: BackwardResult) -> None:
        scale = result.scale
        weight = scale.inv_reduction if self._normalized else 1.0
        self._accumulate(result, weight)
        self._weight_sum += weight
        self.num_batches += 1
        self.num_samples += scale.num_samples
        self._statistics_changed()

    def _statistics_changed(self) -> None:
        if not self._hold:
            self._invalidate()

    def reset(self) -> None:
        """Forget every accumulated batch."""
        self._reset()
        self.num_batches = 0
        self.num_samples = 0
        self._weight_sum = 0.0
        self._statistics_changed()

    def statistics(self) -> dict[str, Any]:
        """The accumulated curvature as normalised statistics (new tensors).

        A dict whose tensor entries (or lists of tensors) are linear in the data, so a
        weighted average of two results is the statistics of the weighted mixture — the
        arithmetic an exponential moving average needs, for any backend. Other entries
        (e.g. the id of an eigenbasis) must be equal for two results to be mixed.
        """
        self._check_ready("statistics")
        return self._statistics()

    def load_statistics(self, stats: dict[str, Any]) -> None:
        """Make ``stats`` (from :meth:`statistics`, possibly averaged) the accumulated state.

        The backend takes the tensors over without copying; the caller must not modify
        them afterwards (the backend itself never updates them in place).
        """
        self._load_statistics(stats)
        self.num_batches = max(self.num_batches, 1)
        self._weight_sum = 1.0
        self._statistics_changed()

    def hold_decompositions(self, hold: bool = True) -> None:
        """With ``hold``, cached decompositions (eigen/Cholesky factors) survive changes of
        the statistics until :meth:`refresh` — how a preconditioner amortises inversions
        (``invert_every``). A new ``damping`` still refactorises where the factorisation
        depends on it (dense backends)."""
        self._hold = hold

    def refresh(self) -> None:
        """Drop cached decompositions; the next ``solve`` recomputes them."""
        self._invalidate()

    def matvec(self, v: Sequence[Tensor]) -> Vector:
        """``C v`` for a parameter-space vector ``v`` (list of tensors shaped like ``params``)."""
        return self._matvec(self._check_vector(v, "matvec"))

    def solve(self, v: Sequence[Tensor], damping: float) -> Vector:
        """``(C + damping·I)⁻¹ v``, or the backend's documented damped inverse."""
        if isinstance(damping, bool) or not isinstance(damping, (int, float)):
            raise TypeError(f"{type(self).__name__}.solve: damping must be a float.")
        if not damping >= 0.0 or damping == float("inf"):
            raise ValueError(
                f"{type(self).__name__}.solve: damping must be finite and >= 0, got {damping}."
            )
        return self._solve(self._check_vector(v, "solve"), float(damping))

    def to_dense(self) -> Tensor:
        """The approximation as a dense ``[P, P]`` matrix in ``params`` order (row-major)."""
        self._check_ready("to_dense")
        return self._to_dense()

    def state_dict(self) -> dict[str, Any]:
        """Accumulated statistics and counters (tensors are not copied)."""
        return {
            "backend": type(self).__name__,
            "num_batches": self.num_batches,
            "num_samples": self.num_samples,
            "weight_sum": self._weight_sum,
            "statistics": self._state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict()`` returned (for the same backend and model)."""
        if state.get("backend") != type(self).__name__:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state belongs to "
                f"{state.get('backend')!r}."
            )
        self._load_state(state["statistics"])
        self.num_batches = int(state["num_batches"])
        self.num_samples = int(state["num_samples"])
        self._weight_sum = float(state["weight_sum"])
        self._statistics_changed()

    # --- helpers shared by backends -------------------------------------------------

    @property
    def _normalized(self) -> bool:
        return bool(self.loss_fn.reduction == "mean")

    @property
    def _normalizer(self) -> float:
        """Divide the weighted sums by this to get the union's curvature."""
        return self._weight_sum if self._normalized else 1.0

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def _check_ready(self, op: str) -> None:
        if self.num_batches == 0:
            raise RuntimeError(
                f"{type(self).__name__}.{op}: no curvature accumulated yet; call update() "
                "or accumulate() first."
            )

    def _check_vector(self, v: Sequence[Tensor], op: str) -> Vector:
        owner = f"{type(self).__name__}.{op}"
        self._check_ready(op)
        if isinstance(v, Tensor) or not isinstance(v, (list, tuple)):
            raise TypeError(
                f"{owner}: expected a list of {len(self.params)} tensors shaped like the "
                f"parameters, got {type(v).__name__}."
            )
        if len(v) != len(self.params):
            raise ValueError(
                f"{owner}: expected {len(self.params)} tensors (one per parameter), got {len(v)}."
            )
        for t, p, name in zip(v, self.params, self.param_names):
            if not isinstance(t, Tensor) or t.shape != p.shape:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"{owner}: entry for '{name}' must have shape {tuple(p.shape)}, got {shape}."
                )
            if t.device != p.device:
                raise ValueError(
                    f"{owner}: entry for '{name}' is on {t.device}, parameters are on {p.device}."
                )
        return list(v)

    def _flatten(self, v: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in v])

    def _unflatten(self, x: Tensor) -> Vector:
        out, start = [], 0
        for p in self.params:
            out.append(x[start : start + p.numel()].reshape(p.shape))
            start += p.numel()
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={len(self.layers)}, params={self.num_params}, "
            f"batches={self.num_batches})"
        )
