"""Training-data attribution across curvature approximations: the linear datamodeling
score (LDS) of influence scores (docs/concepts/influence.md, "Which approximation").

For ``K`` random halves ``S_k`` of the training set the model is retrained from scratch
with ``seeds`` seeds; the actual outcome of query ``q`` is its mean loss over the seeds.
An approximation predicts it by ``Σ_{z∈S_k} I(q, z)`` with
``I(q, z) = −∇ℓ_qᵀ (C + λI)⁻¹ ∇ℓ_z`` (a harmful example, ``I > 0``, raises the query loss
when it is kept). The LDS is the Spearman correlation between predictions and outcomes
over the ``K`` subsets, averaged over the queries (Park et al. 2023, TRAK). Every
approximation is scored on the same model, subsets and outcomes, with the damping
``λ = 0.1·tr(C)/P`` (a tenth of the mean eigenvalue, kronfluence's heuristic);
``identity`` is ``C = 0`` (plain gradient similarity).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]

#: The approximation that is no curvature at all: gradient similarity.
IDENTITY = "identity"
#: The influence damping relative to the curvature's mean eigenvalue ``tr(C)/P``.
RELATIVE_DAMPING = 0.1


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors, ties at their average rank
    (``nan`` if one is constant)."""
    from scipy.stats import rankdata

    ra = torch.from_numpy(rankdata(a.detach().double().numpy()))
    rb = torch.from_numpy(rankdata(b.detach().double().numpy()))
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def linear_datamodeling_score(
    scores: Tensor, masks: Tensor, outcomes: Tensor
) -> tuple[float, float]:
    """Mean and standard error over queries of the Spearman correlation between the
    predicted ``Σ_{z∈S_k} scores[q, z]`` and the actual ``outcomes[k, q]``.

    Shapes: ``scores [Q, N]``, ``masks [K, N]`` (bool, ``S_k``), ``outcomes [K, Q]``.
    Queries whose outcomes (or predictions) do not vary are left out.
    """
    if (
        scores.dim() != 2
        or masks.shape[1] != scores.shape[1]
        or outcomes.shape
        != (
            masks.shape[0],
            scores.shape[0],
        )
    ):
        raise ValueError(
            f"linear_datamodeling_score: need scores [Q, N], masks [K, N], outcomes [K, Q]; "
            f"got {tuple(scores.shape)}, {tuple(masks.shape)}, {tuple(outcomes.shape)}."
        )
    predicted = masks.double() @ scores.double().T  # [K, Q]
    values = torch.tensor([spearman(predicted[:, q], outcomes[:, q]) for q in range(len(scores))])
    values = values[torch.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


@dataclass
class AttributionResult:
    """One LDS comparison: per approximation its LDS (± standard error over queries), fit
    and score seconds; ``settings`` say how it was made."""

    settings: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def best_per_second(self) -> dict[str, Any] | None:
        """The approximation with the highest LDS among those no slower than it: the one
        with the highest LDS per unit of time on the Pareto front (``None`` if none)."""
        ranked = [r for r in self.rows if math.isfinite(r["lds"])]
        if not ranked:
            return None
        front = [
            r
            for r in ranked
            if not any(
                o["lds"] > r["lds"] and o["seconds"] <= r["seconds"] for o in ranked if o is not r
            )
        ]
        return max(front, key=lambda r: r["lds"] / max(r["seconds"], 1e-9))

    def to_markdown(self) -> str:
        s = self.settings
        lines = [
            f"LDS of influence scores: {s.get('model', 'model')} on {s.get('data', 'data')} "
            f"({s['num_params']} "
            f"parameters), {s['train']} training / {s['queries']} query examples, "
            f"K = {s['subsets']} random halves × {s['seeds']} retraining seeds, damping "
            f"{RELATIVE_DAMPING:g}·tr(C)/P.",
            "",
            "| approximation | LDS | fit (s) | scores (s) |",
            "|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['method']} | {r['lds']:.3f} ± {r['sem']:.3f} | {r['fit_s']:.2f} | "
                f"{r['score_s']:.2f} |"
            )
        best = self.best_per_second()
        if best is not None:
            top = max(self.rows, key=lambda r: r["lds"] if math.isfinite(r["lds"]) else -2)
            lines += [
                "",
                f"Highest LDS: {top['method']} ({top['lds']:.3f}). Best per second on the "
                f"LDS/time front: {best['method']} ({best['lds']:.3f} in {best['seconds']:.2f} s).",
            ]
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps({"settings": self.settings, "results": self.rows}, indent=2)


def retrained_outcomes(
    build: Callable[[], nn.Module],
    loss_fn: nn.Module,
    train: Batch,
    query: Batch,
    subsets: int,
    seeds: int,
    fit: Callable[[nn.Module, Batch, int], nn.Module],
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """``masks [K, N]`` of ``K`` random halves and ``outcomes [K, Q]``: each query's loss
    averaged over ``seeds`` models trained from scratch on the half (``fit(model, data,
    seed)`` trains in place and returns the model)."""
    n = len(train[0])
    generator = torch.Generator().manual_seed(seed + 1)
    masks = torch.zeros(subsets, n, dtype=torch.bool)
    outcomes = torch.zeros(subsets, len(query[0]))
    for k in range(subsets):
        keep = torch.randperm(n, generator=generator)[: n // 2]
        masks[k, keep] = True
        half = (train[0][keep], train[1][keep])
        losses = []
        for s in range(seeds):
            run_seed = seed + 1000 * (k + 1) + s
            torch.manual_seed(run_seed)
            model = fit(build(), half, run_seed)
            losses.append(per_example_losses(model, loss_fn, query))
        outcomes[k] = torch.stack(losses).mean(dim=0)
        if progress is not None:
            progress(k + 1)
    return masks, outcomes


def per_example_losses(model: nn.Module, loss_fn: nn.Module, data: Batch) -> Tensor:
    """``[Q]``: each example's loss (``loss_fn``'s kind, mean over its outputs)."""
    unreduced = type(loss_fn)(reduction="none")
    model.eval()
    try:
        with torch.no_grad():
            losses = unreduced(model(data[0]), data[1])
    finally:
        model.train()
    return losses.reshape(len(data[0]), -1).mean(dim=1)


def attribution_scores(
    method: str,
    model: nn.Module,
    loss_fn: nn.Module,
    train: Batch,
    query: Batch,
    batch_size: int,
    fit_batch: Callable[[Batch], Batch] | None = None,
    fisher_type: str = "exact",
) -> tuple[Tensor, float, float]:
    """Scores ``[Q, N]`` of one approximation (``identity`` or a registry name), its fit
    and score seconds.

    ``fit_batch`` maps an ``(inputs, targets)`` batch to the one the curvature's ``update``
    takes, where the two differ: a per-token model's ``[N·T, C]`` outputs are fitted
    against flat ``[N·T]`` targets while the influence's examples keep ``[N, T]``
    (``lambda b: (b[0], b[1].reshape(-1))``). ``fisher_type`` is the backend's, where it
    has one (``"exact"``, ``"mc"``, ``"empirical"``)."""
    from curvlab.curvature.registry import make
    from curvlab.influence import Influence

    loader = [
        (train[0][i : i + batch_size], train[1][i : i + batch_size])
        for i in range(0, len(train[0]), batch_size)
    ]
    start = time.perf_counter()
    if method == IDENTITY:
        # the diagonal's parameter list and per-example gradients only; C = 0
        influence = Influence(make("diagonal", model, loss_fn), damping=1.0, progress=False)
        fitted = time.perf_counter()
        g_q = influence.query_gradients(query)
        parts: list[Tensor] = []
        for batch in loader:
            g_z = influence.train_gradients(batch)
            dots = torch.zeros(len(query[0]), len(batch[0]), dtype=g_q[0].dtype)
            for q, z in zip(g_q, g_z):
                dots -= q.flatten(1) @ z.flatten(1).T
            parts.append(dots)
        return torch.cat(parts, dim=1), fitted - start, time.perf_counter() - fitted
    options = {"fisher_type": fisher_type} if "fisher_type" in _parameters(method) else {}
    curvature = make(method, model, loss_fn, **options)
    fit_loader = loader if fit_batch is None else [fit_batch(b) for b in loader]
    influence = Influence(curvature, damping=1.0, progress=False).fit(fit_loader)
    influence.damping = RELATIVE_DAMPING * float(curvature.trace()) / curvature.num_params
    fitted = time.perf_counter()
    scores = influence.pairwise(query, loader).scores
    return scores, fitted - start, time.perf_counter() - fitted


def _parameters(method: str) -> Sequence[str]:
    import inspect

    from curvlab.curvature.registry import get

    return list(inspect.signature(get(method)).parameters)


def compare_attributions(
    build: Callable[[], nn.Module],
    loss_fn: nn.Module,
    train: Batch,
    query: Batch,
    methods: Sequence[str],
    subsets: int,
    seeds: int,
    fit: Callable[[nn.Module, Batch, int], nn.Module],
    seed: int = 0,
    batch_size: int = 256,
    settings: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> AttributionResult:
    """The LDS of every approximation in ``methods`` on one model trained on ``train``
    (``fit``), against ``subsets`` retrained halves × ``seeds``. A method that fails is
    reported with its error, never dropped."""
    torch.manual_seed(seed)
    model = fit(build(), train, seed)
    masks, outcomes = retrained_outcomes(
        build, loss_fn, train, query, subsets, seeds, fit, seed,
        progress=(lambda k: progress(f"retrained {k}/{subsets} halves")) if progress else None,
    )  # fmt: skip
    result = AttributionResult(
        {
            **(settings or {}),
            "num_params": sum(p.numel() for p in model.parameters()),
            "train": len(train[0]),
            "queries": len(query[0]),
            "subsets": subsets,
            "seeds": seeds,
            "seed": seed,
        }
    )
    for method in methods:
        try:
            scores, fit_s, score_s = attribution_scores(
                method, model, loss_fn, train, query, batch_size
            )
        except Exception as error:  # reported, the others still run
            result.rows.append(
                {"method": method, "lds": math.nan, "sem": math.nan, "fit_s": math.nan,
                 "score_s": math.nan, "seconds": math.nan,
                 "error": f"{type(error).__name__}: {error}"}
            )  # fmt: skip
            continue
        mean, sem = linear_datamodeling_score(scores, masks, outcomes)
        result.rows.append(
            {"method": method, "lds": mean, "sem": sem, "fit_s": fit_s, "score_s": score_s,
             "seconds": fit_s + score_s, "error": None}
        )  # fmt: skip
        if progress is not None:
            progress(f"{method}: LDS {mean:.3f} in {fit_s + score_s:.2f} s")
    return result


def plot_attribution(result: AttributionResult) -> Any:
    """LDS against fit + score seconds, one point per approximation."""
    from curvlab.ablation.imports import import_from_ablate_extra

    plt = import_from_ablate_extra("matplotlib.pyplot")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in result.rows:
        if not (math.isfinite(r["lds"]) and math.isfinite(r["seconds"])):
            continue
        ax.errorbar(r["seconds"], r["lds"], yerr=r["sem"], fmt="o", capsize=3)
        ax.annotate(
            r["method"], (r["seconds"], r["lds"]), xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("fit + score seconds")
    ax.set_ylabel("LDS (Spearman, mean over queries)")
    ax.set_title("Influence quality against cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def adam_fit(
    loss_fn: nn.Module,
    epochs: int,
    lr: float = 3e-3,
    weight_decay: float = 1e-3,
    batch_size: int = 64,
) -> Callable[[nn.Module, Batch, int], nn.Module]:
    """A ``fit(model, data, seed)`` for :func:`compare_attributions`: Adam on ``loss_fn``
    over ``epochs`` passes through ``data`` in an order drawn from ``seed``."""

    def fit(model: nn.Module, data: Batch, seed: int) -> nn.Module:
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        order = torch.Generator().manual_seed(seed)
        inputs, targets = data
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(inputs), generator=order)
            for start in range(0, len(inputs), batch_size):
                index = perm[start : start + batch_size]
                opt.zero_grad()
                loss_fn(model(inputs[index]), targets[index]).backward()
                opt.step()
        return model

    return fit
