"""``race()``: optimizers from one initialisation, by iteration and by wall-clock.

Every contender starts from the same weights (the model function is called under the
same seed and the initial parameters are checked to be equal) and sees the same
mini-batches in the same order. Wall-clock counts the training steps only (forward,
backward, preconditioning, optimizer step); the full-data evaluations at the logged
steps are not timed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.ablation.measure import Stopwatch
from curvlab.ablation.reports import dumps, format_value, markdown_table
from curvlab.optim.kfac_optimizer import KFACOptimizer
from curvlab.optim.natural_gradient import NaturalGradient
from curvlab.registry import available, make

Data = tuple[Tensor, Tensor]

#: The optimizers without curvature, exact natural gradient and Martens & Grosse's full
#: K-FAC (``"kfac_optimizer"``: :class:`~curvlab.KFACOptimizer` with its defaults); every
#: registry name (``curvlab.available()``) is a contender too: SGD with momentum
#: preconditioned by ``NaturalGradient`` over that backend.
BASELINES = ("sgd", "adam", "ngd", "kfac_optimizer")
#: ``Contender.optimizer`` values: torch's SGD (with momentum) and Adam, and
#: :class:`~curvlab.KFACOptimizer` (its own step size and momentum: ``lr`` is not used).
OPTIMIZERS = ("sgd", "adam", "kfac")
#: The registry name of the exact Fisher (exact NGD's preconditioner, the reference).
EXACT = "exact_fisher"


@dataclass(frozen=True)
class Contender:
    """One optimizer of a race.

    Attributes:
        name: its label in tables and plots.
        optimizer: ``"sgd"`` (with ``momentum``), ``"adam"`` or ``"kfac"``
            (:class:`~curvlab.KFACOptimizer` with its default settings and ``damping`` as
            its initial λ if given; it computes its own step size and momentum, so ``lr``
            and ``momentum`` are not used and it takes no ``curvature``).
        lr: the learning rate.
        curvature: a registry name: the gradient is preconditioned by
            ``NaturalGradient(make(curvature, model, loss_fn, **curvature_options))``.
        curvature_options: keyword arguments of that backend.
        momentum: SGD's momentum.
        damping: ``λ`` of its ``NaturalGradient`` (``None``: the race's ``damping``).
    """

    name: str
    optimizer: str = "sgd"
    lr: float = 0.1
    curvature: str | None = None
    curvature_options: Mapping[str, Any] = field(default_factory=dict)
    momentum: float = 0.9
    damping: float | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"Contender {self.name!r}: optimizer must be 'sgd', 'adam' or 'kfac', got "
                f"{self.optimizer!r}."
            )
        if self.optimizer == "kfac" and self.curvature is not None:
            raise ValueError(
                f"Contender {self.name!r}: optimizer 'kfac' (KFACOptimizer) brings its own "
                f"curvature; got curvature={self.curvature!r}."
            )
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(
                f"Contender {self.name!r}: lr must be a positive float, got {self.lr}."
            )
        if self.damping is not None and not (self.damping >= 0 and math.isfinite(self.damping)):
            raise ValueError(
                f"Contender {self.name!r}: damping must be finite and >= 0, got {self.damping}."
            )
        if self.curvature is not None and self.curvature not in available():
            raise ValueError(
                f"Contender {self.name!r}: unknown curvature backend {self.curvature!r}. "
                f"Valid: {', '.join(available())}."
            )

    @property
    def learning_rate(self) -> float | None:
        """``lr`` where the optimizer uses one; ``None`` for ``"kfac"`` (its own step size)."""
        return None if self.optimizer == "kfac" else self.lr


def contender(name: str, lr: float) -> Contender:
    """``"sgd"`` (momentum 0.9), ``"adam"``, ``"ngd"`` (exact natural gradient: the exact
    Fisher as the preconditioner of SGD with momentum), ``"kfac_optimizer"``
    (:class:`~curvlab.KFACOptimizer` with its defaults; ``lr`` is not used) or a backend's
    registry name."""
    if name == "sgd":
        return Contender("SGD", "sgd", lr)
    if name == "adam":
        return Contender("Adam", "adam", lr)
    if name == "ngd":
        return Contender("exact NGD", "sgd", lr, curvature="exact_fisher")
    if name == "kfac_optimizer":
        return Contender("KFACOptimizer", "kfac", lr)
    if name in available():
        return Contender(name, "sgd", lr, curvature=name)
    raise ValueError(
        f"Unknown optimizer {name!r}. Valid: {', '.join(BASELINES)}, or a curvature backend: "
        f"{', '.join(available())}."
    )


@dataclass(frozen=True)
class Curve:
    """One contender's log: lists aligned with ``steps`` (the logged iterations)."""

    name: str
    optimizer: str
    curvature: str | None
    lr: float | None  # None for KFACOptimizer, which computes its own step size
    damping: float | None  # λ of its NaturalGradient (KFACOptimizer's adapted λ); else None
    steps: list[int]
    seconds: list[float]  # training wall-clock up to each logged step
    train_loss: list[float]
    val_loss: list[float]
    train_accuracy: list[float] | None  # None for non-classification tasks
    val_accuracy: list[float] | None
    diverged_at: int | None = None  # iteration whose loss became non-finite

    def reached(self, target: float) -> tuple[int, float] | None:
        """``(iteration, seconds)`` of the first logged train loss ≤ ``target``."""
        for step, seconds, loss in zip(self.steps, self.seconds, self.train_loss):
            if loss <= target:
                return step, seconds
        return None


@dataclass(frozen=True)
class RaceResult:
    """The curves of :func:`race`, with the settings they ran under."""

    curves: list[Curve]
    target_loss: float | None
    settings: dict[str, Any]

    def curve(self, name: str) -> Curve:
        for c in self.curves:
            if c.name == name:
                return c
        raise KeyError(f"No contender {name!r}; have {', '.join(c.name for c in self.curves)}.")

    def to_markdown(self) -> str:
        target = self.target_loss
        header = [
            "optimizer",
            "lr",
            "λ",
            "final train loss",
            "final val loss",
            "final val acc.",
            f"iters to {format_value(target)}" if target is not None else "iters to target",
            f"seconds to {format_value(target)}" if target is not None else "seconds to target",
            "ms / iter",
        ]
        rows = []
        for c in self.curves:
            hit = c.reached(target) if target is not None else None
            last = c.steps[-1] if c.steps else 0
            rows.append(
                [
                    c.name,
                    c.lr,
                    c.damping,
                    c.train_loss[-1],
                    c.val_loss[-1],
                    c.val_accuracy[-1] if c.val_accuracy else None,
                    hit[0] if hit else ("diverged" if c.diverged_at is not None else "—"),
                    hit[1] if hit else None,
                    1e3 * c.seconds[-1] / last if last else None,
                ]
            )
        return markdown_table(header, rows)

    def to_json(self) -> str:
        return dumps(self)

    def findings(self) -> list[str]:
        """Plain statements, with numbers, on every approximate natural gradient against
        SGD, Adam and exact NGD (wall-clock to the target loss) and against exact NGD per
        iteration (ratio of training losses at the same logged steps)."""
        exact = [c for c in self.curves if c.curvature == EXACT]
        # SGD, Adam and exact NGD; every other contender is an approximation of the last
        baselines = [
            c for c in self.curves if c.optimizer != "kfac" and c.curvature in (None, EXACT)
        ]
        approximations = [c for c in self.curves if c not in baselines]
        out = []
        target = self.target_loss
        for a in approximations:
            if target is not None:
                out.append(_wall_clock_finding(a, baselines, target))
            for e in exact:
                out.append(_per_iteration_finding(a, e))
            if a.diverged_at is None and baselines:
                out.append(_final_loss_finding(a, baselines))
        return out


def race(
    model_fn: Callable[[], nn.Module],
    loss_fn: nn.Module,
    train: Data,
    val: Data,
    optimizers: Sequence[Contender | str],
    steps: int,
    seed: int = 0,
    *,
    batch_size: int = 128,
    lr: float = 0.1,
    damping: float = 1e-3,
    update_every: int = 1,
    invert_every: int = 10,
    ema_decay: float = 0.95,
    kl_clip: float | None = None,
    eval_every: int = 10,
    target_loss: float | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> RaceResult:
    """Train one fresh model per contender and log losses against iterations and seconds.

    Args:
        model_fn: builds the network (called once per contender under ``seed``).
        loss_fn: the training loss (mean or sum reduction).
        train, val: ``(inputs, targets)``; accuracy is logged when targets are int64
            class labels.
        optimizers: :class:`Contender` s, or names for :func:`contender` with ``lr``.
        steps: training iterations per contender.
        seed: the initialisation and the mini-batch order.
        batch_size: mini-batch size (sampled without replacement, reshuffled each epoch).
        damping, update_every, invert_every, ema_decay, kl_clip: of every
            ``NaturalGradient`` (the same for every backend: the ablation changes one
            axis, the approximation); ``kl_clip`` uses each contender's ``lr``.
        eval_every: log every this many iterations (and at the first and last).
        target_loss: the training loss :meth:`RaceResult.findings` times the contenders to.
        device: where to train.
        progress: show a tqdm progress bar per contender.
    """
    device = torch.device(device)
    contenders = [o if isinstance(o, Contender) else contender(o, lr) for o in optimizers]
    names = [c.name for c in contenders]
    if not contenders or len(set(names)) != len(names):
        raise ValueError(f"race: need distinct contenders, got {names}.")
    for arg, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"race: {arg} must be a positive int, got {value!r}.")
    train = _check_data(train, "train", device)
    val = _check_data(val, "val", device)

    # build everything first: a backend that does not fit the model fails before training
    initial: list[Tensor] | None = None
    runs = []
    for c in contenders:
        torch.manual_seed(seed)
        model = model_fn().to(device)
        params = [p.detach().clone() for p in model.parameters()]
        if initial is None:
            initial = params
        elif len(params) != len(initial) or not all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(params, initial)
        ):
            raise ValueError(
                "race: model_fn gave different initial weights under the same seed; it must "
                "build the model from torch's global RNG only."
            )
        natural = dict(
            damping=damping if c.damping is None else c.damping,
            update_every=update_every,
            invert_every=invert_every,
            ema_decay=ema_decay,
            kl_clip=kl_clip,
        )
        stepper = _stepper(c, model, loss_fn, natural)
        runs.append((c, model, stepper))
    order = _batch_order(len(train[0]), batch_size, steps, seed)
    curves = []
    for c, model, stepper in runs:
        # the same random stream (Monte-Carlo labels) for every contender, wherever it is
        # in the list and whether it runs alone (tune) or in a race
        torch.manual_seed(seed)
        curves.append(_run(c, model, loss_fn, stepper, train, val, order, eval_every, progress))
    settings = {
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "damping": damping,
        "update_every": update_every,
        "invert_every": invert_every,
        "ema_decay": ema_decay,
        "kl_clip": kl_clip,
        "eval_every": eval_every,
        "device": str(device),
        "train_samples": len(train[0]),
        "val_samples": len(val[0]),
    }
    return RaceResult(curves, target_loss, settings)


@dataclass(frozen=True)
class _Stepper:
    """One contender's training step on a batch ``(x, y)`` (returns the loss) and its
    damping ``λ`` now (``None`` without one)."""

    step: Callable[[Tensor, Tensor], Tensor]
    damping: Callable[[], float | None]


def _stepper(
    c: Contender, model: nn.Module, loss_fn: nn.Module, natural: dict[str, Any]
) -> _Stepper:
    """Build ``c``'s optimizer for ``model`` (``natural``: its NaturalGradient's settings)."""
    if c.optimizer == "kfac":
        kfac = (
            KFACOptimizer(model, loss_fn)
            if c.damping is None
            else KFACOptimizer(model, loss_fn, damping=c.damping)
        )

        def kfac_step(x: Tensor, y: Tensor) -> Tensor:
            return kfac.step(lambda: loss_fn(model(x), y))

        return _Stepper(kfac_step, lambda: kfac.lm.value)
    precond = (
        NaturalGradient(
            make(c.curvature, model, loss_fn, **dict(c.curvature_options)), lr=c.lr, **natural
        )
        if c.curvature is not None
        else None
    )
    opt: torch.optim.Optimizer
    if c.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum)

    def step(x: Tensor, y: Tensor) -> Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        if precond is None:
            loss.backward()
        else:
            precond.backward(loss)
            precond.step()
        opt.step()
        return loss

    return _Stepper(step, lambda: None if precond is None else precond.current_damping())


def _run(
    c: Contender,
    model: nn.Module,
    loss_fn: nn.Module,
    stepper: _Stepper,
    train: Data,
    val: Data,
    order: list[Tensor],
    eval_every: int,
    progress: bool,
) -> Curve:
    device = train[0].device
    classify = train[1].dtype == torch.int64
    log: dict[str, list[Any]] = {k: [] for k in ("steps", "seconds", "tl", "vl", "ta", "va")}
    clock = Stopwatch()
    steps = len(order)
    diverged_at = None

    def record(step: int) -> bool:
        tl, ta = _evaluate(model, loss_fn, train, classify)
        vl, va = _evaluate(model, loss_fn, val, classify)
        for key, value in zip(log, (step, clock.seconds, tl, vl, ta, va)):
            log[key].append(value)
        return math.isfinite(tl)

    record(0)
    bar = _progress(c.name, steps, progress)
    for step in range(1, steps + 1):
        index = order[step - 1]
        x, y = train[0][index], train[1][index]
        try:
            with clock.running(device):
                stepper.step(x, y)
        except FloatingPointError:  # NaturalGradient refuses a non-finite loss
            diverged_at = step
            break
        if bar is not None:
            bar.update(1)
        if (step % eval_every == 0 or step == steps) and not record(step):
            diverged_at = step
            break
    if bar is not None:
        bar.close()
    return Curve(
        name=c.name,
        optimizer=c.optimizer,
        curvature=c.curvature,
        lr=c.learning_rate,
        damping=stepper.damping(),
        steps=log["steps"],
        seconds=log["seconds"],
        train_loss=log["tl"],
        val_loss=log["vl"],
        train_accuracy=log["ta"] if classify else None,
        val_accuracy=log["va"] if classify else None,
        diverged_at=diverged_at,
    )


def _batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """The mini-batches of every contender: epochs of a seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, n)
    batches: list[Tensor] = []
    while len(batches) < steps:
        perm = torch.randperm(n, generator=generator)
        batches += [perm[i : i + size] for i in range(0, n - size + 1, size)]
    return batches[:steps]


@torch.no_grad()
def _evaluate(
    model: nn.Module, loss_fn: nn.Module, data: Data, classify: bool
) -> tuple[float, float | None]:
    """Loss on all of ``data`` (as the loss reduces it) and accuracy, in chunks."""
    was_training = model.training
    model.eval()
    x, y = data
    total, correct, chunk = 0.0, 0, 1024
    for i in range(0, len(x), chunk):
        out = model(x[i : i + chunk])
        loss = float(loss_fn(out, y[i : i + chunk]))
        weight = len(out) / len(x) if loss_fn.reduction == "mean" else 1.0
        total += weight * loss
        if classify:
            correct += int((out.argmax(dim=1) == y[i : i + chunk]).sum())
    model.train(was_training)
    return total, (correct / len(x) if classify else None)


def _check_data(data: Data, name: str, device: torch.device) -> Data:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(f"race: {name} must be an (inputs, targets) pair of tensors.")
    x, y = data
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)) or len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"race: {name} must be two tensors with the same (non-zero) number of samples."
        )
    return x.to(device), y.to(device)


def _progress(name: str, total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{name:>18s}", unit="it", leave=True)


def _wall_clock_finding(a: Curve, baselines: list[Curve], target: float) -> str:
    hit = a.reached(target)
    last = a.steps[-1] if a.steps else 0
    parts = []
    for b in baselines:
        other = b.reached(target)
        parts.append(f"{b.name} {_reach(other, b, last)}")
    if hit is None and a.diverged_at is not None:
        return f"{a.name} diverged at iteration {a.diverged_at}; " + "; ".join(parts) + "."
    if hit is None:
        return (
            f"{a.name} did not reach train loss {target:g} within {last} iterations "
            f"(final {a.train_loss[-1]:.3g}); " + "; ".join(parts) + "."
        )
    faster = [b.name for b in baselines if (r := b.reached(target)) is None or hit[1] < r[1]]
    slower = [b.name for b in baselines if b.name not in faster]
    verdict = (
        f"less wall-clock than {', '.join(faster)}" if faster else "not faster than any baseline"
    )
    if faster and slower:
        verdict += f", but not less than {', '.join(slower)}"
    return (
        f"{a.name} reached train loss {target:g} in {hit[1]:.2f} s (iteration {hit[0]}): "
        f"{verdict}. Others: " + "; ".join(parts) + "."
    )


def _final_loss_finding(a: Curve, baselines: list[Curve]) -> str:
    others = "; ".join(
        f"{b.name} diverged" if b.diverged_at is not None else f"{b.name} {b.train_loss[-1]:.3g}"
        for b in baselines
    )
    final = a.train_loss[-1]
    lower = [b.name for b in baselines if b.diverged_at is not None or final < b.train_loss[-1]]
    verdict = f"lower than {', '.join(lower)}" if lower else "not lower than any baseline"
    return (
        f"After {a.steps[-1]} iterations {a.name}'s training loss was {a.train_loss[-1]:.3g} "
        f"({verdict}); {others}."
    )


def _reach(hit: tuple[int, float] | None, c: Curve, last: int) -> str:
    if hit is not None:
        return f"{hit[1]:.2f} s (iteration {hit[0]})"
    if c.diverged_at is not None:
        return f"diverged at iteration {c.diverged_at}"
    return f"not within {c.steps[-1] if c.steps else last} iterations"


def _per_iteration_finding(a: Curve, exact: Curve) -> str:
    common = sorted(set(a.steps) & set(exact.steps) - {0})
    ratios = [
        a.train_loss[a.steps.index(s)] / exact.train_loss[exact.steps.index(s)]
        for s in common
        if exact.train_loss[exact.steps.index(s)] > 0
    ]
    if not ratios:
        return f"{a.name} and {exact.name} share no logged iteration to compare."
    ratios.sort()
    median = ratios[len(ratios) // 2]
    return (
        f"Per iteration, {a.name}'s training loss was a median {median:.2f}× {exact.name}'s "
        f"(from {ratios[0]:.2f}× to {ratios[-1]:.2f}× over {len(ratios)} logged iterations)."
    )


def tune(
    model_fn: Callable[[], nn.Module],
    loss_fn: nn.Module,
    train: Data,
    val: Data,
    candidate: Contender,
    lrs: Sequence[float],
    steps: int,
    seed: int = 0,
    dampings: Sequence[float | None] = (None,),
    **race_options: Any,
) -> tuple[Contender, dict[str, float]]:
    """``candidate`` with the learning rate (and damping) of the grid that reach the lowest
    training loss, and every setting's score.

    The score is the mean logged training loss over the last quarter of the iterations
    (a diverged run scores ``inf``): robust to the spikes of a single final value. The
    same seed, batches and options as :func:`race`, so every contender can be given its
    own best setting from the same grid — a fair race, not a tuned claim.
    """
    if not lrs or not dampings:
        raise ValueError("tune: the grid of learning rates (and dampings) must not be empty.")
    scores: dict[str, float] = {}
    best: tuple[float, Contender] | None = None
    for lr in lrs:
        for damping in dampings:
            label = f"lr={lr:g}" + ("" if damping is None else f", λ={damping:g}")
            trial = replace(candidate, name=f"{candidate.name} {label}", lr=lr, damping=damping)
            curve = race(model_fn, loss_fn, train, val, [trial], steps, seed, **race_options)
            score = _late_loss(curve.curves[0], steps)
            scores[label] = score
            if best is None or score < best[0]:
                best = (score, replace(candidate, lr=lr, damping=damping))
    assert best is not None
    return best[1], scores


def _late_loss(curve: Curve, steps: int) -> float:
    if curve.diverged_at is not None:
        return math.inf
    late = [loss for step, loss in zip(curve.steps, curve.train_loss) if step >= 0.75 * steps]
    late = late or curve.train_loss[-1:]
    return sum(late) / len(late) if all(math.isfinite(v) for v in late) else math.inf
