"""``quality()``: how well each curvature approximation matches the exact Fisher.

Every backend is measured against :class:`~curvlab.ExactFisher` (``fisher_type="exact"``)
on the same data. Matrix metrics are taken over the parameters the backend covers (a
K-FAC that only covers ``nn.Linear`` layers is compared on those); the natural-gradient
direction uses the plain gradient for the parameters it does not cover, exactly as
:class:`~curvlab.NaturalGradient` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.ablation.measure import PeakTensorMemory, Stopwatch
from curvlab.ablation.reports import dumps, markdown_table
from curvlab.curvature.base import Curvature, top_symmetric_eigenvalues
from curvlab.curvature.dense.exact import ExactFisher
from curvlab.curvature.registry import make

Batch = tuple[Tensor, Tensor]
Backends = Mapping[str, str | Curvature] | Sequence[str | Curvature]


@dataclass(frozen=True)
class QualityRow:
    """One backend against the exact Fisher ``F`` (damped natural gradient ``u* = (F+λI)⁻¹g``).

    Attributes:
        backend: the label of the backend.
        covered_params: parameters the backend approximates (of ``num_params``).
        matrix_error: ``‖C − F‖_F / ‖F‖_F`` over the covered parameters.
        block_errors: per layer (by module name), the same on its diagonal block.
        direction_error: ``‖u − u*‖ / ‖u*‖`` with ``u`` the backend's damped natural gradient.
        direction_cosine: ``cos(u, u*)``.
        eigenvalue_error: ``‖λ_C − λ_F‖ / ‖λ_F‖`` over the ``k`` largest eigenvalues.
        top_eigenvalues: the backend's ``k`` largest eigenvalues, descending.
        extract_seconds: statistics from all batches (forward + BackPACK backward).
        solve_seconds: the first damped solve, decompositions included.
        peak_memory_bytes: peak tensor storage allocated by extraction plus that solve.
    """

    backend: str
    covered_params: int
    matrix_error: float
    block_errors: dict[str, float]
    direction_error: float
    direction_cosine: float
    eigenvalue_error: float
    top_eigenvalues: list[float]
    extract_seconds: float
    solve_seconds: float
    peak_memory_bytes: int


@dataclass(frozen=True)
class QualityReport:
    """The rows of :func:`quality` and the exact Fisher's own figures."""

    rows: list[QualityRow]
    damping: float
    num_samples: int
    num_params: int
    reference_eigenvalues: list[float]
    reference_extract_seconds: float
    reference_solve_seconds: float
    reference_peak_memory_bytes: int

    def row(self, backend: str) -> QualityRow:
        for r in self.rows:
            if r.backend == backend:
                return r
        raise KeyError(f"No row {backend!r}; rows: {', '.join(r.backend for r in self.rows)}.")

    def to_markdown(self) -> str:
        """The summary table, then the per-layer block errors."""
        header = [
            "backend",
            "params covered",
            "‖C−F‖/‖F‖",
            "direction error",
            "cosine",
            "top-eig. error",
            "extract s",
            "solve s",
            "peak MiB",
        ]
        rows: list[list[Any]] = [
            [
                "exact Fisher (reference)",
                f"{self.num_params}/{self.num_params}",
                0.0,
                0.0,
                1.0,
                0.0,
                self.reference_extract_seconds,
                self.reference_solve_seconds,
                self.reference_peak_memory_bytes / 2**20,
            ]
        ]
        rows += [
            [
                r.backend,
                f"{r.covered_params}/{self.num_params}",
                r.matrix_error,
                r.direction_error,
                r.direction_cosine,
                r.eigenvalue_error,
                r.extract_seconds,
                r.solve_seconds,
                r.peak_memory_bytes / 2**20,
            ]
            for r in self.rows
        ]
        layers = sorted({name for r in self.rows for name in r.block_errors}, key=_natural)
        blocks = markdown_table(
            ["backend", *(f"layer {name}" for name in layers)],
            [[r.backend, *(r.block_errors.get(n) for n in layers)] for r in self.rows],
        )
        return (
            f"Against the exact Fisher on {self.num_samples} samples, damping λ = "
            f"{self.damping:g}, {len(self.reference_eigenvalues)} top eigenvalues.\n\n"
            + markdown_table(header, rows)
            + "\n\nRelative error of each layer's diagonal block:\n\n"
            + blocks
        )

    def to_json(self) -> str:
        return dumps(self)


def quality(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Batch | Sequence[Batch],
    backends: Backends,
    damping: float,
    top_k: int = 10,
    backend_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> QualityReport:
    """Measure each backend against the exact Fisher on ``data``.

    Args:
        model, loss_fn: as for any :class:`~curvlab.Curvature` (the exact Fisher must fit
            in memory: ``[P, P]``).
        data: one ``(inputs, targets)`` batch or a list of them (their union is used).
        backends: registry names (``"kfac"``), ``Curvature`` instances on ``model``, or a
            mapping ``label -> name or instance``.
        damping: ``λ > 0`` of the natural-gradient directions.
        top_k: how many of the largest eigenvalues to compare.
        backend_options: keyword arguments per registry name (e.g.
            ``{"kfac": {"fisher_type": "exact"}}``).
    """
    batches = _batches(data)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0:
        raise ValueError(f"quality: damping must be a positive float, got {damping!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"quality: top_k must be a positive int, got {top_k!r}.")
    named = _resolve(model, loss_fn, backends, backend_options or {})

    exact = ExactFisher(model, loss_fn)
    k = min(top_k, exact.num_params)
    gradient = _gradient(model, loss_fn, batches, exact)
    reference = _measure(exact, batches, damping, gradient, k)
    F, u_star = reference.dense, reference.direction
    offsets = _offsets(exact.params)
    eig_cache: dict[tuple[int, ...], Tensor] = {}  # F's top eigenvalues per covered subset

    def reference_top(index: Tensor) -> Tensor:
        key = tuple(index.tolist())
        if key not in eig_cache:
            full = len(index) == len(F)
            eig_cache[key] = (
                reference.top if full else top_symmetric_eigenvalues(F[index][:, index], k)
            )
        return eig_cache[key]

    rows = []
    for label, curvature in named.items():
        index = _index(curvature.params, offsets, label)
        # the same gradient, restricted to the parameters this backend covers
        grads = [reference.gradient[slice(*offsets[id(p)])].view_as(p) for p in curvature.params]
        m = _measure(curvature, batches, damping, grads, k)
        # the optimizer's direction: natural gradient where covered, plain gradient elsewhere
        u = reference.gradient.clone()
        u[index] = m.direction
        C_top = m.top
        rows.append(
            QualityRow(
                backend=label,
                covered_params=len(index),
                matrix_error=_relative(m.dense, F[index][:, index]),
                block_errors=_block_errors(exact, curvature, m.dense, F, offsets),
                direction_error=_relative(u, u_star),
                direction_cosine=float(torch.nn.functional.cosine_similarity(u, u_star, dim=0)),
                eigenvalue_error=_relative(C_top, reference_top(index)),
                top_eigenvalues=C_top.tolist(),
                extract_seconds=m.extract_seconds,
                solve_seconds=m.solve_seconds,
                peak_memory_bytes=m.peak_memory_bytes,
            )
        )
    return QualityReport(
        rows=rows,
        damping=float(damping),
        num_samples=sum(len(x) for x, _ in batches),
        num_params=len(F),
        reference_eigenvalues=reference_top(torch.arange(len(F))).tolist(),
        reference_extract_seconds=reference.extract_seconds,
        reference_solve_seconds=reference.solve_seconds,
        reference_peak_memory_bytes=reference.peak_memory_bytes,
    )


@dataclass
class _Measured:
    dense: Tensor  # [P_c, P_c]
    top: Tensor  # [k], C's largest eigenvalues from its own operator (closed forms)
    gradient: Tensor  # [P_c], the flat gradient of the loss over the data
    direction: Tensor  # [P_c], (C + λI)⁻¹ g
    extract_seconds: float
    solve_seconds: float
    peak_memory_bytes: int


def _measure(
    c: Curvature, batches: list[Batch], damping: float, grads: list[Tensor], k: int
) -> _Measured:
    device = c.params[0].device
    extract, solve = Stopwatch(), Stopwatch()
    c.reset()
    with extract.running(device):
        for x, y in batches:
            c.update(x, y)
    c.refresh()
    with solve.running(device):
        direction = c.solve(grads, damping)
    flat_direction = _flat(direction)
    _check_finite(flat_direction, c, "natural-gradient direction")
    dense = c.to_dense()
    # the backend's own spectrum: factor eigenvalues for the Kronecker structures, block
    # spectra for the dense ones, Lanczos on the operator otherwise — never a P×P eigh
    top = c.eigenvalues(min(k, c.num_params)).detach()
    c.reset()
    c.refresh()
    with PeakTensorMemory() as memory:  # a second pass: the dispatch mode slows it down
        for x, y in batches:
            c.update(x, y)
        c.solve(grads, damping)
    return _Measured(
        dense=dense,
        top=top,
        gradient=_flat(grads),
        direction=flat_direction,
        extract_seconds=extract.seconds,
        solve_seconds=solve.seconds,
        peak_memory_bytes=memory.peak,
    )


def _batches(data: Batch | Sequence[Batch]) -> list[Batch]:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        batches = [data]
    elif isinstance(data, (list, tuple)) and data:
        batches = list(data)
    else:
        raise TypeError(
            "quality: data must be an (inputs, targets) pair of tensors or a non-empty list "
            f"of them, got {type(data).__name__}."
        )
    checked: list[Batch] = []
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"quality: data[{i}] must be an (inputs, targets) pair.")
        x, y = batch
        if not (isinstance(x, Tensor) and isinstance(y, Tensor)) or len(x) != len(y):
            raise ValueError(
                f"quality: data[{i}] must be two tensors with the same number of samples."
            )
        checked.append((x, y))
    return checked


def _resolve(
    model: nn.Module,
    loss_fn: nn.Module,
    backends: Backends,
    options: Mapping[str, Mapping[str, Any]],
) -> dict[str, Curvature]:
    items: list[tuple[str | None, str | Curvature]]
    if isinstance(backends, Mapping):
        items = list(backends.items())
    elif isinstance(backends, (list, tuple)) and backends:
        items = [(None, b) for b in backends]
    else:
        raise TypeError(
            "quality: backends must be a non-empty list of registry names or Curvature "
            f"instances, or a mapping label -> name/instance; got {backends!r}."
        )
    named: dict[str, Curvature] = {}
    for label, spec in items:
        if isinstance(spec, str):
            curvature = make(spec, model, loss_fn, **dict(options.get(spec, {})))
            label = label or spec
        elif isinstance(spec, Curvature):
            if spec.model is not model:
                raise ValueError(
                    f"quality: backend {label or spec.name!r} was built on another model."
                )
            curvature = spec
            label = label or spec.name or type(spec).__name__
        else:
            raise TypeError(
                f"quality: a backend must be a registry name or a Curvature, got {spec!r}."
            )
        if label in named:
            raise ValueError(f"quality: the label {label!r} appears twice.")
        named[label] = curvature
    return named


def _gradient(
    model: nn.Module, loss_fn: nn.Module, batches: list[Batch], c: Curvature
) -> list[Tensor]:
    """Gradient of the loss over the union of the batches, for ``c.params`` (the exact
    Fisher's: every trainable parameter)."""
    total = sum(len(x) for x, _ in batches)
    if loss_fn.reduction == "sum":
        weights = [1.0] * len(batches)
    else:
        weights = [len(x) / total for x, _ in batches]
    grads = [torch.zeros_like(p) for p in c.params]
    for w, (x, y) in zip(weights, batches):
        for g, gb in zip(grads, torch.autograd.grad(loss_fn(model(x), y), c.params)):
            g.add_(gb, alpha=w)
    return grads


def _offsets(params: Sequence[Tensor]) -> dict[int, tuple[int, int]]:
    out, start = {}, 0
    for p in params:
        out[id(p)] = (start, start + p.numel())
        start += p.numel()
    return out


def _index(params: Sequence[Tensor], offsets: dict[int, tuple[int, int]], label: str) -> Tensor:
    try:
        return torch.cat([torch.arange(*offsets[id(p)]) for p in params])
    except KeyError:
        raise ValueError(
            f"quality: backend {label!r} covers a parameter the exact Fisher does not."
        ) from None


def _block_errors(
    exact: Curvature,
    c: Curvature,
    C: Tensor,
    F: Tensor,
    offsets: dict[int, tuple[int, int]],
) -> dict[str, float]:
    position = _offsets(c.params)
    errors = {}
    for layer in exact.layers:
        if not all(id(p) in position for p in layer.params):
            continue
        mine = torch.cat([torch.arange(*position[id(p)]) for p in layer.params])
        ref = torch.cat([torch.arange(*offsets[id(p)]) for p in layer.params])
        errors[layer.name] = _relative(C[mine][:, mine], F[ref][:, ref])
    return errors


def _relative(a: Tensor, b: Tensor) -> float:
    denominator = float(b.norm())
    difference = float((a - b).norm())
    if denominator == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / denominator


def _flat(v: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in v])


def _check_finite(t: Tensor, c: Curvature, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(
            f"quality: {type(c).__name__} gave a non-finite {what}; raise the damping."
        )


def _natural(name: str) -> tuple[tuple[int, str], ...]:
    """Sort key: ``"2" < "10"``, dotted module names part by part."""
    return tuple((int(part), "") if part.isdigit() else (-1, part) for part in name.split("."))
