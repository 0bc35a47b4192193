"""The exact natural gradient as the per-iteration reference for K-FAC (issue #21).

Which of K-FAC's approximations costs the steps? Every run trains the model of a race
workload (:mod:`benchmarks.optimizer_race`: ``autoencoder``, ``convnet``; same data, batch
sampler, evaluation batches and target) with update *directions* from one source, and
one *step-size rule* for all of them, so the comparison is about the direction:

directions (``--variants``):

* ``exact``: the exact natural gradient of the batch, ``−(G + λI)⁻¹ g`` with ``G`` the
  batch's exact GGN (= Fisher for the race's losses), matrix-free
  (:class:`curvlab.MatrixFreeGGN`: products without a ``P × P`` matrix, conjugate
  gradients to ``--cg-tol``);
* ``blockdiag``: the same with ``G`` restricted to its per-layer diagonal blocks (one block
  per module that owns parameters, as K-FAC's), also matrix-free: one batched product of
  ``L`` columns (each the vector on one layer) per CG iteration;
* ``kfac-fresh``: K-FAC (``curvlab.KFC``, MC Fisher, one sample) from the current batch
  only (no moving average, inverses every step), damped exactly (``damping_mode="exact"``:
  ``(G⊗A + λI)⁻¹``, the same damping as ``exact``);
* ``kfac-fresh-factored``: the same with the factored (π) Tikhonov damping;
* ``kfac``: KFACOptimizer's statistics and damping: MC Fisher on a quarter of the batch,
  moving average 0.95, inverses every 20 steps, factored damping;
* ``kfac-orth``, ``exact-orth``: the ``kfac`` / ``exact`` direction with each weight
  matrix's part replaced by its polar factor (``curvlab.linalg.orthogonalize``, bf16, as
  ``KFACOptimizer(orthogonalize=True)``);

step-size rules (the suffix of a variant; none = ``quadratic``):

* ``quadratic``: one ``(α, μ)`` for the network minimising the local quadratic model
  ``gᵀδ + ½ δᵀ(G + λI)δ`` over ``δ = αΔ + μδ₀`` (``G`` the batch's exact GGN, products
  by :func:`curvlab.optim.quadratic.ggn_gram`), as ``KFACOptimizer(step_sizes="global")``;
* ``/layer``: one ``(α_l, μ_l)`` per layer (``KFACOptimizer``'s default per-layer trust
  region, its groups from :func:`curvlab.optim.kfac_optimizer.step_groups`);
* ``/fixed``: ``δ = lr·Δ + β δ₀`` with a fixed ``--lr`` and ``--beta`` (SGD with
  heavy-ball momentum on the direction).

The damping ``λ`` is the same for every direction and rule: fixed per workload
(``--damping``; ``--damping-rule fixed``), or adapted by Levenberg–Marquardt from the
reduction ratio ``ρ`` of the quadratic model every 5 steps, starting at ``--damping``
(``--damping-rule lm``, as ``KFACOptimizer``, with its guard: ``λ`` grows while the model
predicts a decrease larger than the loss); the direction is computed with the current
``λ`` (``kfac`` holds it between its inversions, as ``KFACOptimizer``).

Per iteration (every ``--cosine-every`` steps for the non-exact directions, as the
reference costs a CG solve) it logs, at the run's own iterate and batch, the cosine
between the direction ``Δ`` (before step sizes) and the exact natural gradient ``Δ*``,
overall and per layer, and the cosine in the metric of ``C = G + λI``,
``−gᵀΔ / (‖Δ‖_C ‖Δ*‖_C)``, whose square is the fraction of the exact direction's
decrease of the quadratic model that ``Δ`` reaches with its best step length. The loss
is the race's measured loss (evaluated every ``--eval-every`` steps); runs stop at the
race's target (``--target``) or after ``--steps``.

Usage::

    python -m benchmarks.ng_reference [--workloads autoencoder convnet] [--variants ...]
        [--steps autoencoder=60 convnet=30] [--damping autoencoder=1e-3 convnet=1e-2]
        [--cosine-every 2] [--out ng.json]

Prints a markdown table per workload and writes every run (curves, cosines, CG
iterations) as JSON. CPU times are the thread's (``time.thread_time``), one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import curvlab
from benchmarks.common import json_ready
from curvlab import linalg
from curvlab.optim.damping import Damping, LevenbergMarquardt
from curvlab.optim.kfac_optimizer import step_groups
from curvlab.optim.quadratic import CapturedCall, evaluate_capturing, ggn_gram

Vector = list[Tensor]

#: the race's targets (NAdamW's loss at 80 % of its budget, docs/benchmarks.md, the
#: reduced run of 2026-12-05 on the CPU clock)
TARGETS = {"autoencoder": 0.1249, "convnet": 0.002232}
DAMPING = {"autoencoder": 1e-3, "convnet": 1e-2}
STEPS = {"autoencoder": 60, "convnet": 30}
DIRECTIONS = (
    "exact",
    "exact-orth",
    "blockdiag",
    "kfac-fresh",
    "kfac-fresh-factored",
    "kfac",
    "kfac-orth",
)  # from the reference to KFACOptimizer's proposal
RULES = ("quadratic", "layer", "fixed")
DEFAULT_VARIANTS = (
    "exact",
    "exact/layer",
    "exact/fixed",
    "exact-orth",
    "blockdiag",
    "kfac-fresh",
    "kfac-fresh-factored",
    "kfac",
    "kfac/layer",
    "kfac/fixed",
    "kfac-orth",
    "kfac-orth/layer",
)


def parse_variant(variant: str) -> tuple[str, str]:
    """``"kfac-orth/layer"`` -> ``("kfac-orth", "layer")``; no suffix: ``"quadratic"``."""
    direction, _, rule = variant.partition("/")
    rule = rule or "quadratic"
    if direction not in DIRECTIONS:
        raise ValueError(
            f"variant {variant!r}: unknown direction {direction!r}; one of {DIRECTIONS}"
        )
    if rule not in RULES:
        raise ValueError(f"variant {variant!r}: unknown step-size rule {rule!r}; one of {RULES}")
    return direction, rule


# --------------------------------------------------------------------------- vectors


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum(torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)))


def cosine(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    na, nb = math.sqrt(dot(a, a)), math.sqrt(dot(b, b))
    return dot(a, b) / (na * nb) if na > 0 and nb > 0 else float("nan")


def flatten(v: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in v])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> Vector:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def layer_groups(names: Sequence[str]) -> list[list[int]]:
    """Indices of ``names`` per module that owns them (K-FAC's blocks), in order."""
    return step_groups(names, len(names))


def layer_name(names: Sequence[str], group: Sequence[int]) -> str:
    return names[group[0]].rpartition(".")[0] or names[group[0]]


# --------------------------------------------------------------------------- exact NG


class ExactNaturalGradient:
    """``(G + λI)⁻¹ g`` of one batch, matrix-free; ``block_diagonal``: ``G``'s per-layer
    diagonal blocks only. ``params``/``names`` fix the order of the vectors (the
    operator's own order is mapped to it)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        names: Sequence[str],
        damping: float,
        cg_tol: float,
        cg_max_iter: int,
    ) -> None:
        self.operator = curvlab.MatrixFreeGGN(model, loss_fn, fisher_type="exact")
        index = {n: i for i, n in enumerate(self.operator.param_names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(f"ExactNaturalGradient: parameters not covered: {missing}")
        self.order = [index[n] for n in names]  # ours -> the operator's
        self.names = list(names)
        self.groups = layer_groups(names)
        self.damping, self.cg_tol, self.cg_max_iter = damping, cg_tol, cg_max_iter
        self.last_cg: tuple[int, float] = (0, 0.0)

    def _to_operator(self, v: Sequence[Tensor]) -> Vector:
        out: list[Tensor | None] = [None] * len(v)
        for ours, theirs in enumerate(self.order):
            out[theirs] = v[ours]
        return [t for t in out if t is not None]

    def _from_operator(self, v: Sequence[Tensor]) -> Vector:
        return [v[theirs] for theirs in self.order]

    def solve(self, x: Tensor, y: Tensor, grads: Sequence[Tensor], block_diagonal: bool) -> Vector:
        """``(G + λI)⁻¹ g`` (or the block-diagonal ``G``'s) on the batch ``(x, y)``."""
        op = self.operator
        op.reset()
        op.update(x, y, progress=False)
        b = flatten(self._to_operator(grads))
        like = self._to_operator(grads)
        if block_diagonal:
            masks = self._masks(like)

            def matvec(columns: Tensor) -> Tensor:  # [P, k] -> [P, k]
                outs = []
                for j in range(columns.shape[1]):
                    spread = masks * columns[:, j : j + 1]  # [P, L]: the vector per layer
                    product = op @ spread
                    assert isinstance(product, Tensor)  # a tensor in, a tensor out
                    outs.append((product * masks).sum(dim=1))
                return torch.stack(outs, dim=1)

        else:

            def matvec(columns: Tensor) -> Tensor:
                product = op @ columns
                assert isinstance(product, Tensor)  # a tensor in, a tensor out
                return product

        solution, iterations, residual = linalg.conjugate_gradient(
            matvec, b, damping=self.damping, tol=self.cg_tol, max_iter=self.cg_max_iter
        )
        self.last_cg = (iterations, residual)
        return self._from_operator(unflatten(solution, like))

    def _masks(self, like: Sequence[Tensor]) -> Tensor:
        """``[P, L]``: column ``l`` is 1 on layer ``l``'s parameters (operator order)."""
        sizes = [t.numel() for t in like]
        masks = torch.zeros(sum(sizes), len(self.groups), dtype=like[0].dtype)
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        for column, group in enumerate(self.groups):
            for ours in group:
                theirs = self.order[ours]
                masks[offsets[theirs] : offsets[theirs + 1], column] = 1.0
        return masks


# --------------------------------------------------------------------------- K-FAC


def kfac_preconditioner(
    model: nn.Module, loss_fn: nn.Module, direction: str, damping: Callable[[], float]
) -> curvlab.NaturalGradient:
    """K-FAC's natural gradient as ``direction`` asks (damping ``λ = damping()`` at each
    step; ``kfac`` reads it at its inversions only, as ``KFACOptimizer``; no KL clip)."""
    hold = not direction.startswith("kfac-fresh")
    policy = Damping(lambda step: damping(), hold=hold)
    if direction.startswith("kfac-fresh"):
        mode = "factored" if direction == "kfac-fresh-factored" else "exact"
        curvature = curvlab.KFC(model, loss_fn, fisher_type="mc", damping_mode=mode)
        invert_every, ema_decay = 1, 0.0
    else:  # KFACOptimizer's default statistics and damping
        curvature = curvlab.KFC(
            model, loss_fn, fisher_type="mc", damping_mode="factored", statistics_fraction=0.25
        )
        invert_every, ema_decay = 20, 0.95
    return curvlab.NaturalGradient(
        curvature,
        damping=policy,
        update_every=1,
        invert_every=invert_every,
        ema_decay=ema_decay,
        kl_clip=None,
        distribution="local",
    )


# --------------------------------------------------------------------------- one run


@dataclass
class RunConfig:
    variant: str
    damping: float
    steps: int
    target: float
    cosine_every: int
    eval_every: int
    lr: float
    beta: float
    cg_tol: float
    cg_max_iter: int
    seed: int = 0
    damping_rule: str = "fixed"  # or "lm"


@dataclass
class RunResult:
    variant: str
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, measured loss)
    cosines: list[dict[str, Any]] = field(default_factory=list)
    coefficients: list[list[float]] = field(default_factory=list)
    dampings: list[float] = field(default_factory=list)  # λ of each step
    batch_losses: list[float] = field(default_factory=list)  # the training batch's loss
    steps_to_target: int | None = None
    cpu_seconds: float = 0.0  # the run's own steps (direction + step size), one thread
    reference_seconds: float = 0.0  # the exact reference solves for the cosines
    steps: int = 0
    diverged_at: int | None = None
    error: str | None = None


def orthogonalized(direction: Vector, matrices: Sequence[bool]) -> Vector:
    return [
        linalg.orthogonalize(d, dtype=torch.bfloat16) if m else d
        for d, m in zip(direction, matrices)
    ]


def quadratic_coefficients(
    model: nn.Module,
    loss_fn: nn.Module,
    call: CapturedCall,
    params: Sequence[nn.Parameter],
    grads: Sequence[Tensor],
    vectors: list[list[Tensor | None]],
    damping: float,
) -> Tensor:
    """The minimiser ``c`` of ``gᵀδ + ½δᵀ(G + λI)δ`` over ``δ = Σ cᵢ vᵢ`` (float64)."""
    terms = quadratic_terms(model, loss_fn, call, params, grads, vectors)
    return model_minimum(*terms, damping)[0]


def model_minimum(
    gram: Tensor, inner: Tensor, linear: Tensor, damping: float
) -> tuple[Tensor, float]:
    """The coefficients minimising the model with ``C = G + λI`` on the span (``gram``:
    ``vᵢᵀGvⱼ``, ``inner``: ``vᵢᵀvⱼ``, ``linear``: ``gᵀvᵢ``) and the predicted change
    ``gᵀδ + ½δᵀGδ`` (without the λ term, as ``KFACOptimizer``'s ρ)."""
    curvature = gram + damping * inner
    coeffs = -torch.linalg.pinv(curvature, hermitian=True, rtol=1e-12) @ linear
    return coeffs, float(coeffs @ linear + 0.5 * coeffs @ gram @ coeffs)


def quadratic_terms(
    model: nn.Module,
    loss_fn: nn.Module,
    call: CapturedCall,
    params: Sequence[nn.Parameter],
    grads: Sequence[Tensor],
    vectors: list[list[Tensor | None]],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(vᵢᵀGvⱼ, vᵢᵀvⱼ, gᵀvᵢ)`` in float64, ``G`` the exact GGN of ``call``'s batch."""
    gram = ggn_gram(model, loss_fn, call, params, vectors).double()
    k = len(vectors)
    inner = torch.zeros(k, k, dtype=torch.float64)
    linear = torch.zeros(k, dtype=torch.float64)
    for a in range(k):
        va = vectors[a]
        linear[a] = sum(dot([grads[i]], [x]) for i, x in enumerate(va) if x is not None)
        for b in range(a, k):
            vb = vectors[b]
            value = sum(dot([x], [z]) for x, z in zip(va, vb) if x is not None and z is not None)
            inner[a, b] = inner[b, a] = value
    return gram, inner, linear


def combination(
    coeffs: Tensor, vectors: list[list[Tensor | None]], index: int, like: Tensor
) -> Tensor:
    """``Σ_k c_k v_k`` for parameter ``index`` (a ``None`` entry is zero)."""
    total = torch.zeros_like(like)
    for c, vector in zip(coeffs, vectors):
        piece = vector[index]
        if piece is not None:
            total = total + c * piece
    return total


def measured_loss(
    model: nn.Module, loss_fn: nn.Module, batches: list[tuple[Tensor, Tensor]]
) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        value = sum(float(loss_fn(model(x), y)) for x, y in batches) / len(batches)
    model.train(was)
    return value


def run(
    build: Callable[[], nn.Module],
    loss_fn: nn.Module,
    sample: Callable[[torch.Generator], tuple[Tensor, Tensor]],
    evaluation: list[tuple[Tensor, Tensor]],
    config: RunConfig,
    log: Callable[[str], None] = lambda _: None,
) -> RunResult:
    """Train one variant; every variant of a seed starts from the same initialisation and
    sees the same batches."""
    direction_kind, rule = parse_variant(config.variant)
    torch.manual_seed(config.seed)
    model = build()
    generator = torch.Generator().manual_seed(config.seed)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    groups = layer_groups(names)
    matrices = [
        p.dim() >= 2 and not isinstance(model.get_submodule(n.rpartition(".")[0]), nn.Embedding)
        for n, p in zip(names, params)
    ]
    rule_groups = (
        step_groups(names, 16, [p.dim() >= 2 for p in params])
        if rule == "layer"
        else [list(range(len(params)))]
    )
    reference = ExactNaturalGradient(
        model, loss_fn, names, config.damping, config.cg_tol, config.cg_max_iter
    )
    if config.damping_rule not in ("fixed", "lm"):
        raise ValueError(f"damping_rule must be 'fixed' or 'lm', got {config.damping_rule!r}")
    lm = (
        LevenbergMarquardt(initial=config.damping, interval=5)
        if config.damping_rule == "lm" and rule != "fixed"
        else None
    )

    def current_damping() -> float:
        return lm.value if lm is not None else config.damping

    precond = None
    if direction_kind.startswith("kfac"):
        precond = kfac_preconditioner(model, loss_fn, direction_kind, current_damping)
        order = {n: i for i, n in enumerate(precond.curvature.param_names)}
        uncovered = [n for n in names if n not in order]
        if uncovered:
            raise ValueError(f"{config.variant}: K-FAC does not cover {uncovered}")
    result = RunResult(config.variant)
    result.curve.append((0, measured_loss(model, loss_fn, evaluation)))
    previous: Vector | None = None
    for step in range(1, config.steps + 1):
        x, y = sample(generator)
        start = time.thread_time()
        lam = reference.damping = current_damping()

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            return loss_fn(model(x), y)

        with torch.enable_grad():
            loss, call = evaluate_capturing(model, loss_fn, closure, "ng_reference")
        exact_direction: Vector | None = None
        if precond is not None:
            for p in params:
                p.grad = None
            precond.backward(loss)
            grads = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
            precond.step()
            proposal = [-p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
            for p in params:
                p.grad = None
        else:
            grads = [g.detach() for g in torch.autograd.grad(loss, params)]
            natural = reference.solve(x, y, grads, block_diagonal=direction_kind == "blockdiag")
            proposal = [-t for t in natural]
            if direction_kind.startswith("exact"):
                exact_direction = proposal
                cg = reference.last_cg
        if direction_kind.endswith("-orth"):
            proposal = orthogonalized(proposal, matrices)
        # the step
        adapt = lm is not None and lm.due(step - 1)
        change = float("nan")
        with torch.no_grad():
            if rule == "fixed":
                delta = [config.lr * d for d in proposal]
                if previous is not None:
                    delta = [d + config.beta * p0 for d, p0 in zip(delta, previous)]
                coeffs = [config.lr]
            else:
                directions = [proposal] + ([previous] if previous is not None else [])
                vectors: list[list[Tensor | None]] = [
                    [v[i] if i in set(group) else None for i in range(len(params))]
                    for v in directions
                    for group in rule_groups
                ]
                terms = quadratic_terms(model, loss_fn, call, params, grads, vectors)
                c64, change = model_minimum(*terms, lam)
                # the losses are ≥ 0: a model predicting a larger decrease is wrong that far
                # out; raise λ until it does not (KFACOptimizer's guard; the direction keeps
                # the λ it was computed with)
                while lm is not None and -change > float(loss.detach()) and lm.value < lm.maximum:
                    c64, change = model_minimum(*terms, lm.grow())
                c = c64.to(params[0].dtype)
                delta = [combination(c, vectors, i, p) for i, p in enumerate(params)]
                coeffs = c.tolist()
            for p, d in zip(params, delta):
                p.add_(d)
            if adapt and lm is not None:  # ρ on the same batch, as KFACOptimizer
                lm.observe(float(loss.detach()), float(loss_fn(model(x), y)), change)
        previous = delta
        result.cpu_seconds += time.thread_time() - start
        result.dampings.append(lam)
        result.batch_losses.append(float(loss.detach()))
        result.coefficients.append([float(v) for v in coeffs])
        result.steps = step
        # the reference at this iterate and batch (parameters before the step)
        if exact_direction is not None or (step - 1) % config.cosine_every == 0:
            with torch.no_grad():
                for p, d in zip(params, delta):
                    p.sub_(d)  # back to the iterate the direction was computed at
            ref_start = time.thread_time()
            if exact_direction is None:
                reference.damping = lam
                exact_direction = [-t for t in reference.solve(x, y, grads, block_diagonal=False)]
                cg = reference.last_cg
            raw = proposal
            entry = _cosines(
                model,
                loss_fn,
                call,
                params,
                grads,
                raw,
                exact_direction,
                groups,
                names,
                lam,
            )
            entry.update(step=step, cg_iterations=cg[0], cg_residual=cg[1])
            result.cosines.append(entry)
            if not direction_kind.startswith("exact"):
                result.reference_seconds += time.thread_time() - ref_start
            with torch.no_grad():
                for p, d in zip(params, delta):
                    p.add_(d)
        if step % config.eval_every == 0 or step == config.steps:
            value = measured_loss(model, loss_fn, evaluation)
            result.curve.append((step, value))
            if not math.isfinite(value):
                result.diverged_at = step
                break
            if value <= config.target:
                result.steps_to_target = step
                break
    if precond is not None:
        precond.close()
    log(_summary_line(result))
    return result


def _cosines(
    model: nn.Module,
    loss_fn: nn.Module,
    call: CapturedCall,
    params: Sequence[nn.Parameter],
    grads: Sequence[Tensor],
    direction: Vector,
    exact: Vector,
    groups: list[list[int]],
    names: Sequence[str],
    damping: float,
) -> dict[str, Any]:
    """Euclidean cosines (overall, per layer) of ``direction`` with ``exact``, and the
    cosine in the metric of ``C = G + λI``: ``−gᵀΔ / (‖Δ‖_C ‖Δ*‖_C)``, with
    ``‖Δ*‖_C² = −gᵀΔ*`` for the exact ``Δ* = −C⁻¹g``."""
    with torch.no_grad():
        gram = ggn_gram(model, loss_fn, call, params, [list(direction)]).double()
        norm_c = float(gram[0, 0]) + damping * dot(direction, direction)
        exact_norm_c = -dot(grads, exact)
        metric = (
            -dot(grads, direction) / math.sqrt(norm_c * exact_norm_c)
            if norm_c > 0 and exact_norm_c > 0
            else float("nan")
        )
        return {
            "cosine": cosine(direction, exact),
            "cosine_c": metric,
            "layers": {
                layer_name(names, g): cosine([direction[i] for i in g], [exact[i] for i in g])
                for g in groups
            },
        }


def _summary_line(r: RunResult) -> str:
    cos = [c["cosine"] for c in r.cosines]
    mean = sum(cos) / len(cos) if cos else float("nan")
    reached = f"target at step {r.steps_to_target}" if r.steps_to_target else "target not reached"
    return (
        f"  {r.variant}: {r.steps} steps, loss {r.curve[-1][1]:.4g}, {reached}, "
        f"mean cosine {mean:.3f}, {1000 * r.cpu_seconds / max(r.steps, 1):.0f} ms/step"
    )


# --------------------------------------------------------------------------- reporting


def summarise(r: RunResult) -> dict[str, Any]:
    def mean(values: list[float]) -> float | None:
        values = [v for v in values if math.isfinite(v)]
        return sum(values) / len(values) if values else None

    cos = [c["cosine"] for c in r.cosines]
    cos_c = [c["cosine_c"] for c in r.cosines]
    layers: dict[str, list[float]] = {}
    for c in r.cosines:
        for name, value in c["layers"].items():
            layers.setdefault(name, []).append(value)
    return {
        "steps_to_target": r.steps_to_target,
        "final_loss": r.curve[-1][1],
        "best_loss": min(v for _, v in r.curve),
        "steps": r.steps,
        "ms_per_step": 1000 * r.cpu_seconds / max(r.steps, 1),
        "mean_cosine": mean(cos),
        "mean_cosine_c": mean(cos_c),
        "first_cosine": cos[0] if cos else None,
        "last_cosine": cos[-1] if cos else None,
        "layer_cosines": {k: mean(v) for k, v in layers.items()},
        "cg_iterations": mean([float(c["cg_iterations"]) for c in r.cosines]),
        "diverged_at": r.diverged_at,
        "error": r.error,
    }


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


def table(workload: dict[str, Any]) -> list[str]:
    runs = workload["runs"]
    layer_names = next(
        (
            list(r["summary"]["layer_cosines"])
            for r in runs.values()
            if r["summary"]["layer_cosines"]
        ),
        [],
    )
    middle = min(10, workload["max_steps"])  # a step every run reaches unless it stops early
    lines = [
        f"| variant | steps to target | loss at step {middle} | loss at end (step) "
        "| batch loss, last 5 steps | mean cos | mean cos_C "
        "| per-layer mean cos (" + ", ".join(layer_names) + ") | λ at end | ms / step "
        "| CG its |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, entry in runs.items():
        s = entry["summary"]
        if s["error"]:
            lines.append(f"| {variant} | **error** {s['error']} |" + " |" * 9)
            continue
        layers = " / ".join(_fmt(s["layer_cosines"].get(n), ".2f") for n in layer_names)
        reached = "—" if s["steps_to_target"] is None else str(s["steps_to_target"])
        note = f" (diverged at {s['diverged_at']})" if s["diverged_at"] else ""
        at_middle = dict((int(k), v) for k, v in entry["curve"]).get(middle)
        if at_middle is None and s["steps_to_target"] is not None:
            mid = "(reached)"
        else:
            mid = _fmt(at_middle, ".4g")
        batch = [v for v in entry.get("batch_losses", []) if v is not None][-5:]
        dampings = entry.get("dampings") or [workload["damping"]]
        lines.append(
            f"| {variant} | {reached} | {mid} | {_fmt(s['final_loss'], '.4g')} "
            f"({s['steps']}){note} | {_fmt(sum(batch) / len(batch) if batch else None, '.3g')} | "
            f"{_fmt(s['mean_cosine'])} | {_fmt(s['mean_cosine_c'])} | {layers} | "
            f"{_fmt(dampings[-1], '.2g')} | {s['ms_per_step']:.0f} | "
            f"{_fmt(s['cg_iterations'], '.0f')} |"
        )
    return lines


def parse_per_workload(items: list[str], defaults: dict[str, float]) -> dict[str, float]:
    """``--damping 1e-3`` (all) and/or ``--damping convnet=1e-2``."""
    out = dict(defaults)
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
            if key not in defaults:
                raise SystemExit(f"unknown workload {key!r} in {item!r}")
            out[key] = float(value)
        else:
            out = dict.fromkeys(out, float(item))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks import optimizer_race
    from benchmarks.common import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--variants", nargs="*", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--steps", nargs="*", default=[], help="N or WORKLOAD=N (max steps)")
    parser.add_argument("--damping", nargs="*", default=[], help="λ or WORKLOAD=λ")
    parser.add_argument("--target", nargs="*", default=[], help="loss or WORKLOAD=loss")
    parser.add_argument("--batch", type=int, default=0, help="batch size (0: the race's)")
    parser.add_argument("--cosine-every", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.1, help="the /fixed rule's rate")
    parser.add_argument("--beta", type=float, default=0.9, help="the /fixed rule's momentum")
    parser.add_argument("--cg-tol", type=float, default=1e-3)
    parser.add_argument("--cg-max-iter", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--damping-rule",
        choices=("fixed", "lm"),
        default="fixed",
        help="fixed λ, or Levenberg–Marquardt from --damping (not for the /fixed rule)",
    )
    parser.add_argument("--out", default="")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--merge", nargs="*", default=[], help="print the tables of these JSON outputs, run nothing"
    )
    args = parser.parse_args(argv)
    if args.merge:
        merged = merge(args.merge)
        print_tables(merged)
        if args.out:
            _write(merged, args.out)
        return merged
    for variant in args.variants:
        parse_variant(variant)
    torch.set_num_threads(1)
    steps = {k: int(v) for k, v in parse_per_workload(args.steps, dict(STEPS)).items()}
    damping = parse_per_workload(args.damping, DAMPING)
    targets = parse_per_workload(args.target, TARGETS)

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    document: dict[str, Any] = {"machine": machine(), "args": vars(args), "workloads": {}}
    for key in args.workloads:
        workload = optimizer_race.WORKLOADS[key]()
        sample = workload.batch
        if args.batch:
            sample = _resized(workload.batch, args.batch)
        log(f"{workload.title}: λ {damping[key]:g}, {steps[key]} steps, target {targets[key]:g}")
        runs: dict[str, Any] = {}
        for variant in args.variants:
            config = RunConfig(
                variant,
                damping[key],
                steps[key],
                targets[key],
                args.cosine_every,
                args.eval_every,
                args.lr,
                args.beta,
                args.cg_tol,
                args.cg_max_iter,
                args.seed,
                args.damping_rule,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # CG stops are logged
                try:
                    result = run(
                        workload.build, workload.loss_fn, sample, workload.evaluation, config, log
                    )
                except Exception as error:  # reported, never dropped
                    result = RunResult(variant, error=f"{type(error).__name__}: {error}")
                    result.curve.append((0, float("nan")))
                    log(f"  {variant}: ERROR {result.error}")
            runs[variant] = {"summary": summarise(result), **vars(result)}
            document["workloads"][key] = {
                "title": workload.title,
                "damping": damping[key],
                "target": targets[key],
                "max_steps": steps[key],
                "batch": args.batch or None,
                "seed": args.seed,
                "damping_rule": args.damping_rule,
                "runs": runs,
            }
            if args.out:  # after every run: a long run cut off keeps what it finished
                _write(document, args.out)
        print_tables(document)
    if args.out:
        print(f"\nWrote {args.out}")
    return document


def _write(document: dict[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(json_ready(document), f, indent=1, allow_nan=False)


def print_tables(document: dict[str, Any]) -> None:
    for key, workload in document["workloads"].items():
        print(f"\n### {key}: {workload['title']}\n")
        batch = f"; batch {workload['batch']}" if workload.get("batch") else ""
        rule = workload.get("damping_rule", "fixed")
        lam = "λ" if rule == "fixed" else "λ₀ (Levenberg–Marquardt)"
        print(
            f"Machine: {document['machine']}; {lam} = {workload['damping']:g}; target "
            f"{workload['target']:g} (the race's); at most {workload['max_steps']} steps; "
            f"seed {workload.get('seed', 0)}{batch}\n"
        )
        print("\n".join(table(workload)))


def merge(paths: Sequence[str]) -> dict[str, Any]:
    """One document from the JSON files of several invocations (runs of the same workload
    side by side, in the order given)."""
    merged: dict[str, Any] = {"machine": "", "workloads": {}}
    for path in paths:
        with open(path) as f:
            document = json.load(f)
        merged["machine"] = merged["machine"] or document["machine"]
        for key, workload in document["workloads"].items():
            into = merged["workloads"].setdefault(key, {**workload, "runs": {}})
            into["max_steps"] = max(into["max_steps"], workload["max_steps"])
            into["runs"].update(workload["runs"])
    for workload in merged["workloads"].values():  # directions, then rules, in their order
        workload["runs"] = dict(sorted(workload["runs"].items(), key=lambda kv: _rank(kv[0])))
    return merged


def _rank(variant: str) -> tuple[int, int]:
    direction, rule = parse_variant(variant)
    return DIRECTIONS.index(direction), RULES.index(rule)


def _resized(
    sample: Callable[[torch.Generator], tuple[Tensor, Tensor]], size: int
) -> Callable[[torch.Generator], tuple[Tensor, Tensor]]:
    def batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = sample(generator)
        return x[:size], y[:size]

    return batch


if __name__ == "__main__":
    main()
