"""``race()``: optimizers from one initialisation, by iteration and by wall-clock.

Every contender starts from the same weights (the model function is called under the
same seed and the initial parameters are checked to be equal) and sees the same
mini-batches in the same order. Wall-clock counts the training steps only (forward,
backward, preconditioning, optimizer step); the full-data evaluations at the logged
steps are not timed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import Tensor, nn

from curvlab.ablation.imports import import_object, is_import_path
from curvlab.ablation.measure import Stopwatch
from curvlab.ablation.reports import dumps, format_value, markdown_table
from curvlab.curvature.registry import available, make
from curvlab.linalg.damping import check_damping
from curvlab.optim.eigenbasis_adam import EigenbasisAdam
from curvlab.optim.kfac_optimizer import KFACOptimizer
from curvlab.optim.natural_gradient import NaturalGradient

Data = tuple[Tensor, Tensor]

#: The optimizers without curvature, exact natural gradient and Martens & Grosse's full
#: K-FAC (``"kfac_optimizer"``: :class:`~curvlab.KFACOptimizer` with its defaults); every
#: registry name (``curvlab.available()``) is a contender too: SGD with momentum
#: preconditioned by ``NaturalGradient`` over that backend.
BASELINES = ("sgd", "adam", "ngd", "kfac_optimizer")
#: Every built-in name of :func:`contender` besides the registry names.
BUILT_IN = ("sgd", "adam", "adamw", "nadamw", "ngd", "kfac_optimizer", "eig_adam")
#: ``Contender.optimizer`` values: torch's SGD (with momentum), Adam, AdamW, NAdamW
#: (``NAdam(decoupled_weight_decay=True)``) and :class:`~curvlab.KFACOptimizer` (its own
#: step size and momentum: ``lr`` is not used) and :class:`~curvlab.EigenbasisAdam` (AdamW in
#: the K-FAC eigenbasis, weight decay ``WEIGHT_DECAY``). Any ``"module:Class"`` import path is
#: one too: a torch.optim-style optimizer class.
OPTIMIZERS = ("sgd", "adam", "adamw", "nadamw", "kfac", "eig_adam")
#: The weight decay of AdamW and NAdamW (torch's AdamW default).
WEIGHT_DECAY = 0.01
#: The registry name of the exact Fisher (exact NGD's preconditioner, the reference).
EXACT = "exact_fisher"


@dataclass(frozen=True)
class Contender:
    """One optimizer of a race.

    Attributes:
        name: its label in tables and plots.
        optimizer: ``"sgd"`` (with ``momentum``), ``"adam"``, ``"adamw"``, ``"nadamw"``
            (both with weight decay ``WEIGHT_DECAY``), ``"kfac"``
            (:class:`~curvlab.KFACOptimizer` with its default settings and ``damping`` as
            its initial λ if given; it computes its own step size and momentum, so ``lr``
            and ``momentum`` are not used and it takes no ``curvature``), ``"eig_adam"``
            (:class:`~curvlab.EigenbasisAdam` at ``lr`` with weight decay ``WEIGHT_DECAY``,
            its own K-FAC factors: it takes no ``curvature``) or the import path
            ``"module:Class"`` of a torch.optim-style optimizer class, built as
            ``Class(params, lr=lr)`` (imported when the contender is made).
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
        if is_import_path(self.optimizer):
            try:
                optimizer_class(self.optimizer)
            except ValueError as err:
                raise ValueError(f"Contender {self.name!r}: {err}") from None
        elif self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"Contender {self.name!r}: optimizer must be one of "
                f"{', '.join(map(repr, OPTIMIZERS))} or a 'module:Class' import path, got "
                f"{self.optimizer!r}."
            )
        if self.optimizer in ("kfac", "eig_adam") and self.curvature is not None:
            owner = "KFACOptimizer" if self.optimizer == "kfac" else "EigenbasisAdam"
            raise ValueError(
                f"Contender {self.name!r}: optimizer {self.optimizer!r} ({owner}) brings its "
                f"own curvature; got curvature={self.curvature!r}."
            )
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(
                f"Contender {self.name!r}: lr must be a positive float, got {self.lr}."
            )
        if self.damping is not None:
            check_damping(self.damping, f"Contender {self.name!r}")
        if self.curvature is not None and self.curvature not in available():
            raise ValueError(
                f"Contender {self.name!r}: unknown curvature backend {self.curvature!r}. "
                f"Valid: {', '.join(available())}."
            )

    @property
    def learning_rate(self) -> float | None:
        """``lr`` where the optimizer uses one; ``None`` for ``"kfac"`` (its own step size)."""
        return None if self.optimizer == "kfac" else self.lr


def contender(name: str, lr: float | None) -> Contender:
    """``"sgd"`` (momentum 0.9), ``"adam"``, ``"adamw"``, ``"nadamw"`` (AdamW and
    ``NAdam(decoupled_weight_decay=True)``, weight decay ``WEIGHT_DECAY``), ``"ngd"`` (exact
    natural gradient: the exact Fisher as the preconditioner of SGD with momentum),
    ``"kfac_optimizer"`` (:class:`~curvlab.KFACOptimizer` with its defaults; ``lr`` is not
    used), ``"eig_adam"`` (:class:`~curvlab.EigenbasisAdam`), a backend's registry name, or
    ``"module:Class"``: a torch.optim-style optimizer class, imported now (labelled by its
    class name). Hyphens count as underscores
    (``"kfac-optimizer"``). ``lr=None``: a ``module:Class``'s (and ``EigenbasisAdam``'s) own
    default ``lr``, else 0.1."""
    if is_import_path(name):
        cls = optimizer_class(name)
        lr = lr if lr is not None else default_lr(cls)
        return Contender(getattr(cls, "__name__", name), name.strip(), 0.1 if lr is None else lr)
    key = name.strip().replace("-", "_")
    if lr is None:
        lr = (default_lr(EigenbasisAdam) if key == "eig_adam" else None) or 0.1
    if key == "sgd":
        return Contender("SGD", "sgd", lr)
    if key == "adam":
        return Contender("Adam", "adam", lr)
    if key == "adamw":
        return Contender("AdamW", "adamw", lr)
    if key == "nadamw":
        return Contender("NAdamW", "nadamw", lr)
    if key == "ngd":
        return Contender("exact NGD", "sgd", lr, curvature=EXACT)
    if key == "kfac_optimizer":
        return Contender("KFACOptimizer", "kfac", lr)
    if key == "eig_adam":
        return Contender("EigenbasisAdam", "eig_adam", lr)
    if key in available():
        return Contender(key, "sgd", lr, curvature=key)
    raise ValueError(
        f"Unknown optimizer {name!r}. Valid: {', '.join(BUILT_IN)}, a curvature backend "
        f"({', '.join(available())}), or a torch.optim-style class as 'module:Class' "
        "(e.g. 'torch.optim:RMSprop')."
    )


def optimizer_class(spec: str) -> Any:
    """The optimizer class ``"module:Class"`` names, imported now; ``ValueError`` naming
    ``spec`` if it cannot be imported or is not a torch.optim-style class (one with
    ``step`` and ``zero_grad``)."""
    cls = import_object(spec)
    if not (
        isinstance(cls, type)
        and callable(getattr(cls, "step", None))
        and callable(getattr(cls, "zero_grad", None))
    ):
        raise ValueError(
            f"{spec!r} is not a torch.optim-style optimizer class (a class with step() and "
            f"zero_grad(), built as Class(params, lr=...)); got {cls!r}."
        )
    return cls


def default_lr(cls: Any) -> float | None:
    """The default of ``cls``'s ``lr`` argument, if it is a positive number."""
    try:
        parameter = inspect.signature(cls).parameters.get("lr")
    except (TypeError, ValueError):
        return None
    value = None if parameter is None else parameter.default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value > 0 and math.isfinite(value) else None


def make_optimizer(c: Contender, params: Iterable[Tensor]) -> torch.optim.Optimizer:
    """The first-order optimizer of ``c`` (not ``"kfac"``) over ``params``: raises
    ``ValueError`` naming ``c`` when a ``module:Class`` does not build as
    ``Class(params, lr=lr)``."""
    if c.optimizer == "adam":
        return torch.optim.Adam(params, lr=c.lr)
    if c.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=c.lr, weight_decay=WEIGHT_DECAY)
    if c.optimizer == "nadamw":
        return torch.optim.NAdam(
            params, lr=c.lr, weight_decay=WEIGHT_DECAY, decoupled_weight_decay=True
        )
    if c.optimizer == "sgd":
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum)
    if c.optimizer in ("kfac", "eig_adam"):
        raise ValueError(
            f"Contender {c.name!r}: {c.optimizer!r} builds its own curvature, so it needs the "
            "model and the loss (curvlab.ablation.races._stepper), not only the parameters."
        )
    cls = optimizer_class(c.optimizer)
    try:
        opt = cls(params, lr=c.lr)
    except Exception as err:  # the class's own checks: say which contender failed
        raise ValueError(
            f"Contender {c.name!r}: {c.optimizer}(params, lr={c.lr:g}) failed "
            f"({type(err).__name__}: {err})."
        ) from err
    if not (callable(getattr(opt, "step", None)) and callable(getattr(opt, "zero_grad", None))):
        raise ValueError(f"Contender {c.name!r}: {c.optimizer}(...) has no step() or zero_grad().")
    return opt


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
        """One line per contender, in race order: the first logged iteration (and training
        wall-clock) at which its training loss was at most the target, its final training
        loss, and the median ratio of its training loss to exact NGD's at the same logged
        iterations (when exact NGD raced). For example ``"KFACOptimizer: train loss 0.03
        at iteration 35 (0.44 s); final 0.0222; median 0.34× exact NGD's loss per
        iteration"``."""
        exact = next((c for c in self.curves if c.curvature == EXACT), None)
        return [_finding(c, self.target_loss, None if c is exact else exact) for c in self.curves]


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

    step: Callable[[Tensor, Tensor], Any]
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
    if c.optimizer == "eig_adam":
        eig = EigenbasisAdam(model, loss_fn, lr=c.lr, weight_decay=WEIGHT_DECAY)

        def eig_step(x: Tensor, y: Tensor) -> Tensor:
            eig.zero_grad()
            loss = loss_fn(model(x), y)
            eig.backward(loss)
            eig.step()
            return loss

        return _Stepper(eig_step, lambda: None)
    precond = (
        NaturalGradient(
            make(c.curvature, model, loss_fn, **dict(c.curvature_options)), lr=c.lr, **natural
        )
        if c.curvature is not None
        else None
    )
    opt = make_optimizer(c, model.parameters())
    if precond is None and _needs_closure(opt):  # e.g. torch.optim.LBFGS

        def closure_step(x: Tensor, y: Tensor) -> Any:
            def closure() -> Tensor:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            return cast(Any, opt).step(closure)

        return _Stepper(closure_step, lambda: None)

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


def _needs_closure(opt: Any) -> bool:
    """Whether ``opt.step`` requires a closure (no default for its first argument)."""
    try:
        parameters = list(inspect.signature(opt.step).parameters.values())
    except (TypeError, ValueError):
        return False
    return (
        bool(parameters)
        and parameters[0].default is inspect.Parameter.empty
        and (
            parameters[0].kind
            in (parameters[0].POSITIONAL_ONLY, parameters[0].POSITIONAL_OR_KEYWORD)
        )
    )


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


def _finding(c: Curve, target: float | None, exact: Curve | None) -> str:
    last = c.steps[-1] if c.steps else 0
    hit = c.reached(target) if target is not None else None
    parts = []
    if hit is not None:
        parts.append(f"train loss {target:g} at iteration {hit[0]} ({_seconds(hit[1])})")
    elif target is not None and c.diverged_at is None:
        parts.append(f"train loss {target:g} not reached in {last} iterations")
    if c.diverged_at is not None:
        parts.append(f"{'then ' if hit else ''}diverged at iteration {c.diverged_at}")
    elif c.train_loss:
        parts.append(f"final {c.train_loss[-1]:.3g}")
    ratio = _median_ratio(c, exact) if exact is not None else None
    if ratio is not None and exact is not None:
        parts.append(f"median {_times(ratio)} {exact.name}'s loss per iteration")
    return f"{c.name}: " + "; ".join(parts)


def _median_ratio(a: Curve, exact: Curve) -> float | None:
    """The median of ``a``'s training loss over ``exact``'s at their common logged
    iterations (the start left out: every contender starts from the same weights)."""
    common = sorted(set(a.steps) & set(exact.steps) - {0})
    ratios = sorted(
        a.train_loss[a.steps.index(s)] / exact.train_loss[exact.steps.index(s)]
        for s in common
        if exact.train_loss[exact.steps.index(s)] > 0
        and math.isfinite(a.train_loss[a.steps.index(s)])
    )
    return ratios[len(ratios) // 2] if ratios else None


def _times(ratio: float) -> str:
    return f"{ratio:.0f}×" if ratio >= 10 else f"{ratio:.2g}×" if ratio < 0.1 else f"{ratio:.2f}×"


def _seconds(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 0.1 or seconds == 0 else f"{seconds:.2g} s"


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
