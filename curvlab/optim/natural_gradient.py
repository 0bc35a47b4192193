"""``NaturalGradient``: a natural-gradient preconditioner over any :class:`Curvature`.

A training loop stays a training loop::

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    precond = curvlab.NaturalGradient(curvlab.KFC(model, loss_fn), optimizer=opt)
    for x, y in loader:
        opt.zero_grad()
        precond.backward(loss_fn(model(x), y))  # plain backward (+ curvature when due)
        precond.step()                          # p.grad <- (C + λI)⁻¹ p.grad, in place
        opt.step()

Per step ``k`` (counted by ``step()``):

* **statistics** every ``update_every`` steps: the curvature records the forward passes
  of the step (:meth:`Curvature.recording`, armed by the preconditioner), ``backward``
  accumulates the statistics of the forward that produced its loss
  (:meth:`Curvature.accumulate`) and then runs ``loss.backward()``; several ``backward``
  calls before one ``step``
  (gradient accumulation) give the curvature of their union. ``step`` then blends the
  step's normalised statistics into an exponential moving average with
  ``ε = min(1 − 1/u, ema_decay)``, ``u`` the number of curvature updates so far (a plain
  average at first, concepts/natural_gradient.md#moving-averages-of-the-statistics). The blend is a
  map over the tensors of
  :meth:`Curvature.statistics`; the preconditioner never looks at the backend's type.
* **inversion** every ``invert_every`` steps: the current average becomes the backend's
  statistics and its decompositions are recomputed at the next solve; in between, the
  backend solves with the statistics of the last inversion (``hold_decompositions``).
* **every step**: each covered ``p.grad`` is replaced by ``solve(grads, damping)``.
  Parameters the curvature does not cover (e.g. excluded layers) keep their plain gradient.

Everything stays on the parameters' device; no value is read back to the host inside
``step`` (KL clipping is computed with tensor operations). ``backward`` on curvature steps
checks that the loss is finite (one scalar read back), and the decompositions on
inversion steps check theirs. Statistics are computed in
the parameters' dtype (float32 or float64), also under autocast.

**Distributed** (``torch.distributed`` initialised with more than one process, or
``process_group=``; :mod:`curvlab.optim.strategies`, docs page "Distributed K-FAC"): every
process feeds its own batch; on curvature steps the statistic sums are all-reduced, so
every process averages the curvature of the union of all batches; on inversion steps the
decomposition blocks are spread over the processes by cost and shared (``"comm_opt"``:
the owners broadcast the decompositions; ``"mem_opt"``: the owners broadcast their blocks'
preconditioned gradients every step). Gradients are not communicated here: wrap the
model in ``DistributedDataParallel`` (or average ``p.grad`` yourself) so that every
process holds the same gradient. Non-finite losses or statistics on any process make
every process raise the same error in ``step``; a model that differs across processes is
reported at construction.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState
from torch.utils._pytree import tree_map, tree_map_only

from curvlab.curvature.base import Curvature
from curvlab.curvature.distribution import DistributionInterface
from curvlab.optim import distributed
from curvlab.optim.components import (
    InversionSchedule,
    KLClip,
    LearningRate,
    MovingAverage,
    graph_used_once,
    missing_gradient,
)
from curvlab.optim.damping import Damping, DampingSchedule, LevenbergMarquardt
from curvlab.optim.quadratic import evaluate_capturing, ggn_gram
from curvlab.optim.strategies import Distribution, make_distribution


class NaturalGradient:
    """Replaces gradients by natural gradients ``(C + λI)⁻¹ g`` of any ``Curvature``.

    Args:
        curvature: the backend; its ``solve`` defines the damped inverse.
        damping: ``λ`` — a float, a callable ``step -> float`` (a schedule), or a
            :class:`~curvlab.LevenbergMarquardt`, adapted whenever ``step(closure)`` gets a
            closure on one of its due steps: ``ρ`` is measured for the plain step
            ``δ = −lr·ĝ`` on the closure's batch, against ``M(δ) − M(0) = gᵀδ + ½δᵀFδ``
            with the exact Fisher (:mod:`curvlab.optim.quadratic`). This reads scalars back
            to the host on those steps only. The default 0.1 is the smallest of
            {10⁻³, 10⁻², 3·10⁻², 0.1} with which the documented loop (SGD, lr 0.1, momentum
            0.9) trained every model of the test zoo
            (concepts/natural_gradient.md#defaults-of-the-preconditioner-and-why).
            A :class:`~curvlab.optim.damping.Damping` policy object is used as it is (e.g.
            ``Damping(schedule, hold=True)``: ``λ`` read on inversion steps only).
        update_every: take curvature statistics every this many steps.
        invert_every: refresh the decompositions every this many steps.
        ema_decay: decay of the moving average of the statistics (0: the last step only).
        kl_clip: scale the preconditioned gradient by
            ``ν = min(1, sqrt(kl_clip / |Σᵢ lrᵢ² ⟨ĝᵢ, gᵢ⟩|))`` (Ba et al. 2017;
            concepts/natural_gradient.md#kl-clipping); a float, a callable ``step -> float``
            or ``None`` (no clipping). On by default (10⁻³, as kfac-pytorch): an unclipped
            natural gradient at a first-order learning rate diverges on most models.
        optimizer: the optimizer that applies the preconditioned gradients; each
            parameter's learning rate is read from its param group at every step, so
            learning-rate schedulers work. Needed by ``kl_clip`` and by
            Levenberg–Marquardt damping, unless ``lr`` is given.
        lr: instead of ``optimizer``, the learning rate: a float or a callable
            ``step -> float``.
        grad_scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop (needs
            ``optimizer``). ``step`` then unscales the optimizer's gradients itself (unless
            ``scaler.unscale_(optimizer)`` already ran) and, when they overflowed, skips the
            step as ``scaler.step`` will: no preconditioning, and the step's curvature is
            discarded (:attr:`skipped_steps` counts these).
        process_group: the ``torch.distributed`` group to work over; ``None``: the default
            group if ``torch.distributed`` is initialised. With one process (or none),
            everything is local and results are those of a single process.
        distribution: with several processes, ``"comm_opt"`` (default; the owner of a
            block decomposes it and broadcasts the decomposition, every process
            preconditions everything: least communication per step), ``"mem_opt"`` (the
            owner keeps the decomposition and broadcasts its blocks' preconditioned
            gradient every step: decompositions held once) or ``"local"`` (no
            communication: every process uses its own batches' curvature); or a strategy
            object (:mod:`curvlab.optim.strategies`: ``Local()``, ``CommOpt(group)``,
            ``MemOpt(group)`` or a subclass of ``Distribution``), which brings its own group.

    With several processes every process must construct the same model, backend and
    preconditioner (checked at construction), call ``backward`` and ``step`` on the same
    steps, and use the same ``damping`` (a float, a schedule of the step, or a
    :class:`~curvlab.LevenbergMarquardt` — whose ``ρ`` terms are averaged over processes).

    The preconditioner is composed of small pieces (:mod:`curvlab.optim.components`): a
    :class:`~curvlab.optim.components.MovingAverage` of the statistics, an
    :class:`~curvlab.optim.components.InversionSchedule`, a
    :class:`~curvlab.optim.damping.Damping` policy and an optional
    :class:`~curvlab.optim.components.KLClip`; distribution is a strategy object
    (:mod:`curvlab.optim.strategies`), which ``step`` asks at each point that involves
    other processes.

    Between steps that take curvature the curvature's recording is armed (hooks on the
    model and the loss); ``step`` drops what it recorded. :meth:`close` (or leaving
    ``with NaturalGradient(...) as precond:``) removes the hooks and closes the curvature;
    dropping the last reference to the preconditioner and its curvature removes them too.

    Attributes:
        average, schedule, damping_policy, clip: the pieces (``clip`` is ``None`` without
            ``kl_clip``).
        strategy: the :class:`~curvlab.optim.strategies.Distribution` (``distribution``
            is its name; ``comm`` and ``owners`` are its communicator and block owners).
        blocks: the curvature's decomposition blocks.
    """

    def __init__(
        self,
        curvature: Curvature,
        damping: float | DampingSchedule | LevenbergMarquardt | Damping = 0.1,
        update_every: int = 1,
        invert_every: int = 10,
        ema_decay: float = 0.95,
        kl_clip: float | Callable[[int], float] | None = 1e-3,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float | Callable[[int], float] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        distribution: str | Distribution = "comm_opt",
    ) -> None:
        if not isinstance(curvature, Curvature):
            raise TypeError(
                f"NaturalGradient: curvature must be a curvlab.Curvature, got "
                f"{type(curvature).__name__}."
            )
        self.schedule = InversionSchedule(update_every, invert_every)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"NaturalGradient: ema_decay must lie in [0, 1), got {ema_decay}.")
        self.average = MovingAverage(ema_decay)
        self.clip = None if kl_clip is None else KLClip(kl_clip)
        self.damping_policy = damping if isinstance(damping, Damping) else Damping(damping)
        self.learning_rate = LearningRate(curvature.params, curvature.param_names, lr, optimizer)
        if not self.learning_rate.known:
            needs = [
                name
                for name, used in (
                    (f"kl_clip={kl_clip}", kl_clip is not None),
                    (
                        "Levenberg–Marquardt damping",
                        isinstance(self.damping_policy.policy, LevenbergMarquardt),
                    ),
                )
                if used
            ]
            if needs:
                raise ValueError(
                    f"NaturalGradient: {' and '.join(needs)} need(s) the learning rate the "
                    "optimizer applies: pass optimizer=opt (its rate is read at every step) or "
                    "lr=...; or kl_clip=None to turn clipping off."
                )
        if grad_scaler is not None and optimizer is None:
            raise ValueError(
                "NaturalGradient: grad_scaler needs optimizer= (the gradients it unscales)."
            )
        self.grad_scaler = grad_scaler
        self.skipped_steps = 0  # steps skipped because the scaled gradients overflowed
        self.strategy = make_distribution(distribution, process_group)
        self.curvature = curvature
        self.steps = 0  # completed step() calls
        self._inverted: dict[str, Any] | None = None  # statistics of the last inversion
        self._gathering = False  # statistics of the current step are being accumulated
        curvature.hold_decompositions(True)
        interface = DistributionInterface(curvature)
        self.blocks = interface.decomposition_blocks()
        self.strategy.bind(interface, self.blocks, self._signature)
        self._decompositions_due = True  # share decompositions at the next solve
        self._backward_done = False  # backward() ran since the last step()
        self._loss_overflowed = False  # grad_scaler: a non-finite loss since the last step()
        self._backward_calls = 0  # since the last step(); compared across processes
        self._arm_recording()

    def _arm_recording(self) -> None:
        """Record the forward passes of the coming step if it takes curvature statistics."""
        recording = self.curvature.recording()
        recording.__exit__(None, None, None)
        recording.clear()
        if self.curvature_due:
            recording.__enter__()

    def _signature(self) -> list[str]:
        """What must agree across processes: settings, parameters, blocks."""
        c = self.curvature
        options = {
            k: v
            for k, v in sorted(vars(c).items())
            if not k.startswith(("_", "num_")) and isinstance(v, (str, int, float, bool))
        }
        loss = c.loss_fn
        lines = [
            f"backend {type(c).__name__} {options}",
            f"loss {type(loss).__name__} reduction={getattr(loss, 'reduction', None)}",
            f"update_every={self.update_every} invert_every={self.invert_every} "
            f"ema_decay={self.ema_decay} kl_clip={self.kl_clip} {self.learning_rate.describe()}",
            f"distribution {self.distribution}",
        ]
        lines += [
            f"parameter {n} {tuple(p.shape)} {p.dtype}" for n, p in zip(c.param_names, c.params)
        ]
        lines += [f"block {b.name} {b.param_indices} cost {b.cost}" for b in self.blocks]
        # the values too: ranks that start from different weights (no DDP broadcast) would
        # drift apart silently (one transfer of 2 numbers per parameter, at construction)
        with torch.no_grad():
            moments = torch.stack(
                [torch.stack([p.double().sum(), p.double().square().sum()]) for p in c.params]
            ).tolist()
        lines += [
            f"values of parameter {n}: sum {m[0]:.17g}, sum of squares {m[1]:.17g}"
            for n, m in zip(c.param_names, moments)
        ]
        return lines

    # --- the training-loop API -----------------------------------------------------------

    @property
    def curvature_due(self) -> bool:
        """Whether the current step takes curvature statistics."""
        return self.schedule.statistics_due(self.steps)

    @property
    def damping(self) -> float | DampingSchedule | LevenbergMarquardt:
        """The damping policy as given (a float, a schedule or Levenberg–Marquardt)."""
        return self.damping_policy.policy

    @property
    def update_every(self) -> int:
        return self.schedule.update_every

    @property
    def invert_every(self) -> int:
        return self.schedule.invert_every

    @property
    def ema_decay(self) -> float:
        return self.average.decay

    @property
    def kl_clip(self) -> float | Callable[[int], float] | None:
        return None if self.clip is None else self.clip.bound

    @property
    def lr(self) -> float | Callable[[int], float] | None:
        """The learning rate as given (``None`` when it is read from the optimizer)."""
        return self.learning_rate.lr

    @property
    def num_updates(self) -> int:
        """Curvature updates blended into the moving average."""
        return self.average.num_updates

    @property
    def distribution(self) -> str:
        """The name of the distribution strategy (``"local"``, ``"comm_opt"``, ``"mem_opt"``
        or a user strategy's :attr:`~curvlab.optim.strategies.Distribution.name`)."""
        return self.strategy.name

    @property
    def comm(self) -> distributed.Communicator | None:
        """The strategy's :class:`~curvlab.optim.distributed.Communicator` (byte
        counters), or ``None`` without communication."""
        return self.strategy.comm

    @property
    def owners(self) -> list[int]:
        """Per decomposition block, the rank that decomposes it (all 0 without
        distribution)."""
        return self.strategy.owners

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, after accumulating its batch's curvature when due.

        ``loss`` must come from the curvature's ``loss_fn`` applied to ``model``'s output.
        """
        self._check_open("backward")
        # the first collective of the iteration: before the curvature's and DDP's
        self.strategy.agree_on_backward(self.steps, self._backward_calls)
        self._backward_done = True
        self._backward_calls += 1
        if not self.curvature_due:
            _backward(loss)
            return
        if not self.strategy.screen_loss(loss):
            if self.grad_scaler is not None:  # an fp16 overflow: step() skips this step
                self._loss_overflowed = True
                _backward(loss)
                return
            self.curvature.check_batch(loss)  # e.g. an empty batch: its own error
            raise FloatingPointError(
                f"NaturalGradient.backward: the loss is not finite ({float(loss.detach())}); no "
                "curvature taken. Lower the learning rate or raise the damping."
            )
        if not self._gathering:
            self.curvature.reset()
            self._gathering = True
        self.strategy.accumulate(loss)
        _backward(loss)

    def current_damping(self) -> float:
        """``λ`` of the current step (evaluates a schedule; a held damping: the value of
        the last inversion)."""
        return self.damping_policy.at(self.steps)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> None:
        """Blend new statistics, invert when due, precondition every covered ``p.grad``.

        ``closure`` (re-evaluating the loss on the current batch, without ``backward``)
        is only used to adapt a :class:`~curvlab.LevenbergMarquardt` damping. The steps:
        agree (every process takes the same kind of step), average (the statistics),
        invert (when due), solve, clip, adapt (the damping), write (``p.grad``).
        """
        self._check_open("step")
        if self.grad_scaler is not None and self._overflowed():
            self._skip()  # every process alike: DDP gives them the same gradients
            return
        adapt = closure is not None and self.damping_policy.adaptation_due(self.steps)
        self._agree(adapt)
        restarted = self._average()
        damping = self._invert(restarted)
        grads, used = self._gradients()
        natural = self.strategy.solve(grads, damping)
        natural = self._clip(natural, grads)
        if adapt:
            assert closure is not None
            self._adapt(closure, grads, natural)
        self._write(grads, natural, used)

    def _agree(self, adapt: bool) -> None:
        """Check that every process takes the same kind of step, and that this one can be
        taken (a curvature, a ``backward`` since the last step)."""
        self.strategy.agree_on_step(
            self.steps,
            backward_calls=self._backward_calls,
            statistics=self._gathering,
            ready=self.average.value is not None or self._gathering,
            closure=adapt,
            grads=[p.grad for p in self.curvature.params],
            names=self.curvature.param_names,
        )
        if self.average.value is None and not self._gathering:
            raise RuntimeError(
                "NaturalGradient.step: no curvature yet; call precond.backward(loss) in the "
                "first step (it gathers statistics when curvature_due)."
            )
        if not self._backward_done:
            raise RuntimeError(
                "NaturalGradient.step: no precond.backward(loss) since the last step(); the "
                "gradients were already preconditioned. Call backward once before each step."
            )

    def _average(self) -> bool:
        """Blend the statistics gathered this step (over every process) into the moving
        average; whether the average restarted (e.g. EKFAC refitted its basis)."""
        if not self._gathering:
            return False
        self._gathering = False
        self.strategy.reduce_statistics()
        return self.average.update(self.curvature.statistics())

    def _invert(self, restarted: bool) -> float:
        """Make the curvature's statistics the average when an inversion is due (else the
        held ones), share the decompositions when they changed; the step's ``λ``."""
        # a restarted average cannot be mixed with the held statistics either: invert now
        inverting = restarted or self.schedule.inversion_due(self.steps) or self._inverted is None
        if inverting:
            self._inverted = self.average.value
            self.curvature.load_statistics(self._inverted)
            self.curvature.refresh()
            self._decompositions_due = True
        else:  # the held statistics, whose decompositions are held
            assert self._inverted is not None
            self.curvature.load_statistics(self._inverted)
        damping = self.damping_policy.at(self.steps, inverting=inverting)
        if self._decompositions_due:
            self.strategy.share_decompositions(damping)
            self._decompositions_due = False
        return damping

    def _gradients(self) -> tuple[list[Tensor], list[bool]]:
        """Every covered gradient (zero for a parameter without one, which is skipped as
        ``torch.optim`` skips it: its ``.grad`` stays ``None``), and which had one."""
        params = self.curvature.params
        used = [p.grad is not None for p in params]
        if not any(used):
            raise RuntimeError(
                f"NaturalGradient.step: {missing_gradient(self.curvature.param_names[0])}"
            )
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self.strategy.check_gradients(grads, self.curvature.param_names)
        return grads, used

    def _clip(self, natural: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """KL clipping (``natural`` as it is without ``kl_clip``)."""
        if self.clip is None:
            return natural
        return self.clip(natural, grads, self.learning_rate.per_parameter(self.steps), self.steps)

    def _adapt(
        self,
        closure: Callable[[], Tensor],
        grads: list[Tensor],
        natural: list[Tensor],
    ) -> None:
        """Adapt a Levenberg–Marquardt ``λ`` to ``ρ`` of the plain step ``δ = −lr·ĝ`` on
        the closure's batch (concepts/natural_gradient.md#levenberg-marquardt-damping);
        with several processes, ``ρ`` of the union of their batches (equal weights)."""
        lrs = self.learning_rate.per_parameter(self.steps)
        terms = self.strategy.average_values(self._reduction_terms(closure, grads, natural, lrs))
        self.damping_policy.observe(*terms)

    def _reduction_terms(
        self,
        closure: Callable[[], Tensor],
        grads: list[Tensor],
        natural: list[Tensor],
        lrs: list[float],
    ) -> list[float]:
        """``h(θ)``, ``h(θ + δ)`` and ``M(δ) − M(0) = gᵀδ + ½δᵀFδ`` (exact Fisher) of the
        plain step ``δ = −lr·ĝ`` on the closure's batch."""
        model, params = self.curvature.model, self.curvature.params
        loss_fn = self.curvature.loss_fn
        loss, call = evaluate_capturing(model, loss_fn, closure, "NaturalGradient.step")
        before = float(loss)
        delta = [-lr * n for lr, n in zip(lrs, natural)]
        saved = [p.detach().clone() for p in params]
        try:
            for p, d in zip(params, delta):
                p.add_(d)
            after = float(closure())
        finally:
            for p, s in zip(params, saved):
                p.copy_(s)
        quad = ggn_gram(model, loss_fn, call, params, [delta])
        change = float(sum((g * d).sum() for g, d in zip(grads, delta)) + 0.5 * quad[0, 0])
        return [before, after, change]

    def _write(self, grads: list[Tensor], natural: list[Tensor], used: list[bool]) -> None:
        """``p.grad ← natural`` where the parameter had a gradient; the step is done."""
        for g, n, present in zip(grads, natural, used):
            if present:
                g.copy_(n)
        self.steps += 1
        self._backward_done = False
        self._backward_calls = 0
        self._arm_recording()

    def _overflowed(self) -> bool:
        """Unscale the optimizer's gradients (once) and say whether they overflowed."""
        scaler, optimizer = self.grad_scaler, self.learning_rate.optimizer
        assert scaler is not None and optimizer is not None
        if self._loss_overflowed:
            return True
        if not scaler.is_enabled():
            return False
        stage = scaler._per_optimizer_states[id(optimizer)]["stage"]
        if stage is not OptState.UNSCALED:
            scaler.unscale_(optimizer)
        grads = [p.grad for p in self.curvature.params if p.grad is not None]
        if not grads:
            return False
        norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
        return not bool(torch.isfinite(norms).all())  # one host read, as scaler.step's

    def _skip(self) -> None:
        """Leave an overflowing step to the scaler: no preconditioning, no curvature."""
        self._gathering = False
        self.curvature.reset()
        self._loss_overflowed = False
        self._backward_done = False
        self._backward_calls = 0
        self.skipped_steps += 1
        self._arm_recording()

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` (or the curvature's ``close``) was called."""
        return self.curvature.closed

    def close(self) -> None:
        """Remove every hook and recording on the model and the loss (idempotent).

        Distributed, the first ``close`` is a collective: every process must close after
        the same number of steps, else every process raises
        :class:`~curvlab.optim.distributed.DistributedFailure` naming the process that
        skipped an iteration (the hooks are removed all the same). It stays local after a
        ``DistributedFailure`` and when a ``with`` block is left by an exception.

        Closes the curvature too: the preconditioner armed its recording, and a
        preconditioner without it could not take statistics. Afterwards ``backward`` and
        ``step`` raise a ``RuntimeError`` (so do the curvature's ``recording``,
        ``accumulate`` and ``update``); ``state_dict`` and the curvature's accumulated
        statistics stay usable. ``with NaturalGradient(...) as precond:`` closes on exit.
        Without ``close``, the hooks go when the preconditioner and its curvature are
        garbage collected (concepts/models.md#lifecycle-hooks-recordings-copies).
        """
        if self.closed:
            return
        try:
            self.strategy.agree_on_close(self.steps, self._backward_calls)
        finally:
            self.curvature.close()

    def __enter__(self) -> NaturalGradient:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is None:
            self.close()
        else:  # the other processes may be elsewhere: no collective
            self.curvature.close()

    def _check_open(self, op: str) -> None:
        if self.curvature.closed:
            raise RuntimeError(
                f"NaturalGradient.{op}: the preconditioner is closed (close() removed its "
                "curvature's hooks from the model); build a new one to continue, e.g. from "
                "a new curvature and this one's state_dict()."
            )

    # --- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically (tensors are not copied).

        Carries ``"format"`` (the version of this layout) and ``"checksum"`` (CRC32 of
        every tensor's bytes), which :meth:`load_state_dict` checks. Write it to a file with
        :func:`curvlab.save_checkpoint` (atomic) and read it with
        :func:`curvlab.load_checkpoint` (clear errors for truncated or foreign files).
        """
        state = {
            "format": STATE_FORMAT,
            "steps": self.steps,
            "num_updates": self.average.num_updates,
            "average": self.average.value,
            "inverted": self._inverted,
            "curvature": self.curvature.state_dict() if self._inverted is not None else None,
            "damping": self.damping_policy.state_dict(),
        }
        state["checksum"] = _checksum(state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result into a preconditioner over the same model.

        Everything is validated first (keys, format, checksum, backend, shapes); floating
        tensors are converted to the parameters' dtype and device. A load that fails
        leaves the preconditioner exactly as it was.
        """
        owner = "NaturalGradient.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(
                f"{owner}: expected a dict from state_dict(), got {type(state).__name__}."
            )
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"{owner}: the state lacks {missing}; is it a NaturalGradient state?")
        version = state.get("format", 1)
        if version not in (1, STATE_FORMAT):
            raise ValueError(
                f"{owner}: state format {version!r} is not supported (this version reads 1 "
                f"and {STATE_FORMAT})."
            )
        if "checksum" in state and _checksum(state) != state["checksum"]:
            raise ValueError(
                f"{owner}: the checksum does not match the tensors; the checkpoint is corrupt."
            )
        p0 = self.curvature.params[0]
        state = tree_map_only(  # floating tensors to the parameters' dtype, all to their device
            Tensor,
            lambda t: t.to(p0.device, p0.dtype if t.is_floating_point() else t.dtype),
            state,
        )
        backup = self.state_dict()
        try:
            self._load(state)
        except Exception:
            self._load(_clone(backup))  # leave everything as it was
            raise

    def _load(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.average.num_updates = int(state["num_updates"])
        self.average.value = _clone(state["average"])
        self._inverted = _clone(state["inverted"])
        self._gathering = False
        self._arm_recording()
        self.damping_policy.load_state_dict(state.get("damping"))
        if state["curvature"] is not None:
            self.curvature.load_state_dict(state["curvature"])
        if self._inverted is not None:
            self.curvature.load_statistics(_clone(self._inverted))
            self.curvature.refresh()
        self._decompositions_due = True
        self._backward_done = False
        self._loss_overflowed = False
        self._backward_calls = 0


#: Version of the layout of :meth:`NaturalGradient.state_dict` (1: without format/checksum).
STATE_FORMAT = 2
_STATE_KEYS = ("steps", "num_updates", "average", "inverted", "curvature", "damping")


def _tensors(tree: Any) -> list[Tensor]:
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) if k != "checksum" for t in _tensors(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return [tree] if isinstance(tree, Tensor) else []


def _checksum(state: dict[str, Any]) -> int:
    """CRC32 over the bytes of every tensor of ``state`` (in a fixed order)."""
    crc = 0
    for t in _tensors(state):
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        crc = zlib.crc32(data, crc)
    return crc


def _backward(loss: Tensor) -> None:
    with graph_used_once():
        loss.backward()


def _clone(tree: Any) -> Any:
    return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, tree)
