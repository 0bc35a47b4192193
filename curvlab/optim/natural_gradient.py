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
``process_group=``; :mod:`curvlab.optim.distributed`, docs page "Distributed K-FAC"): every
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

import math
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState
from torch.utils._pytree import tree_map, tree_map_only

from curvlab.curvature.base import Curvature, NamedTensor
from curvlab.curvature.distribution import DistributionInterface
from curvlab.optim import distributed
from curvlab.optim.components import (
    InversionSchedule,
    KLClip,
    LearningRate,
    MovingAverage,
    missing_gradient,
    non_finite_gradient,
)
from curvlab.optim.damping import Damping, DampingSchedule, LevenbergMarquardt
from curvlab.optim.quadratic import evaluate_capturing, ggn_gram


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
            communication: every process uses its own batches' curvature).

    With several processes every process must construct the same model, backend and
    preconditioner (checked at construction), call ``backward`` and ``step`` on the same
    steps, and use the same ``damping`` (a float, a schedule of the step, or a
    :class:`~curvlab.LevenbergMarquardt` — whose ``ρ`` terms are averaged over processes).

    The preconditioner is composed of small pieces (:mod:`curvlab.optim.components`): a
    :class:`~curvlab.optim.components.MovingAverage` of the statistics, an
    :class:`~curvlab.optim.components.InversionSchedule`, a
    :class:`~curvlab.optim.damping.Damping` policy and an optional
    :class:`~curvlab.optim.components.KLClip`; distribution is
    :mod:`curvlab.optim.distributed`'s.

    Between steps that take curvature the curvature's recording is armed (hooks on the
    model and the loss); ``step`` drops what it recorded. :meth:`close` (or leaving
    ``with NaturalGradient(...) as precond:``) removes the hooks and closes the curvature;
    dropping the last reference to the preconditioner and its curvature removes them too.

    Attributes:
        average, schedule, damping_policy, clip: the pieces (``clip`` is ``None`` without
            ``kl_clip``).
        comm: the :class:`curvlab.optim.distributed.Communicator` (byte counters), or ``None``.
        blocks: the curvature's decomposition blocks.
        owners: per block, the rank that decomposes it (all 0 without distribution).
    """

    def __init__(
        self,
        curvature: Curvature,
        damping: float | DampingSchedule | LevenbergMarquardt = 0.1,
        update_every: int = 1,
        invert_every: int = 10,
        ema_decay: float = 0.95,
        kl_clip: float | Callable[[int], float] | None = 1e-3,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float | Callable[[int], float] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        distribution: str = "comm_opt",
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
        self.damping_policy = Damping(damping)
        self.learning_rate = LearningRate(curvature.params, curvature.param_names, lr, optimizer)
        if not self.learning_rate.known:
            needs = [
                name
                for name, used in (
                    (f"kl_clip={kl_clip}", kl_clip is not None),
                    ("Levenberg–Marquardt damping", isinstance(damping, LevenbergMarquardt)),
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
        if distribution not in distributed.DISTRIBUTIONS:
            raise ValueError(
                f"NaturalGradient: unknown distribution {distribution!r}; choose one of "
                f"{distributed.DISTRIBUTIONS}."
            )
        self.curvature = curvature
        self.steps = 0  # completed step() calls
        self._inverted: dict[str, Any] | None = None  # statistics of the last inversion
        self._gathering = False  # statistics of the current step are being accumulated
        curvature.hold_decompositions(True)
        self._interface = DistributionInterface(curvature)
        self.blocks = self._interface.decomposition_blocks()
        self.owners = [0] * len(self.blocks)
        self.comm: distributed.Communicator | None = None
        self.distribution = "local"
        group = None if distribution == "local" else distributed.active_group(process_group)
        if group is not None:
            self.distribution = distribution
            self.comm = distributed.Communicator(group, curvature.params[0].device)
            self.owners = distributed.assign_blocks(
                [b.cost for b in self.blocks], self.comm.world_size
            )
            self.comm.check_same(
                self._signature(), "NaturalGradient: the model differs across processes"
            )
            comm = self.comm
            self._interface.set_process_reducer(lambda e: comm.all_reduce_sum(e, "statistics"))
        self._decompositions_due = True  # distributed: share decompositions at the next step
        self._bad_losses: Tensor | None = None  # distributed: non-finite losses, not yet read
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

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, after accumulating its batch's curvature when due.

        ``loss`` must come from the curvature's ``loss_fn`` applied to ``model``'s output.
        """
        self._check_open("backward")
        if self.comm is not None:  # first collective of the iteration: before DDP's
            self.comm.agree_on_backward(self.steps, backward_calls=self._backward_calls)
        self._backward_done = True
        self._backward_calls += 1
        if not self.curvature_due:
            _backward(loss)
            return
        if self.comm is not None:
            # every process must reach the all-reduce (and DDP's): the check is in step()
            bad = (~torch.isfinite(loss.detach())).to(torch.float64).reshape(1)
            self._bad_losses = bad if self._bad_losses is None else self._bad_losses + bad
        elif not bool(torch.isfinite(loss)):  # curvature steps only: one host sync
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
        # distributed: every process must reach the all-reduce; step() reports the failure
        with distributed.deferred(self.comm), _graph_used_once():
            self.curvature.accumulate(loss, check_finite=self.comm is None)
        _backward(loss)

    def current_damping(self) -> float:
        """``λ`` of the current step (evaluates a schedule)."""
        return self.damping_policy.at(self.steps)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> None:
        """Blend new statistics, invert when due, precondition every covered ``p.grad``.

        ``closure`` (re-evaluating the loss on the current batch, without ``backward``)
        is only used to adapt a :class:`~curvlab.LevenbergMarquardt` damping.
        """
        self._check_open("step")
        if self.grad_scaler is not None and self._overflowed():
            self._skip()  # every process alike: DDP gives them the same gradients
            return
        if self.comm is not None:  # first collective of every step: all in step, no errors
            self.comm.agree_on_step(
                self.steps,
                backward_calls=self._backward_calls,
                statistics=self._gathering,
                ready=self.average.value is not None or self._gathering,
                closure=closure is not None and self.damping_policy.adaptation_due(self.steps),
                grads=[p.grad for p in self.curvature.params],
                names=self.curvature.param_names,
                bad_losses=self._bad_losses,
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
        if self._gathering:
            self._gathering = False
            if self.comm is not None:
                self._all_reduce_statistics(self.comm)
            restarted = self.average.update(self.curvature.statistics())
        else:
            restarted = False
        # a restarted average (e.g. EKFAC refitted its basis) cannot be mixed with the held
        # statistics either: invert now
        if restarted or self.schedule.inversion_due(self.steps) or self._inverted is None:
            self._inverted = self.average.value
            self.curvature.load_statistics(self._inverted)
            self.curvature.refresh()
            self._decompositions_due = True
        else:
            self.curvature.load_statistics(self._inverted)  # decompositions are held
        damping = self.current_damping()
        if self.comm is not None and self._decompositions_due:
            self._share_decompositions(self.comm, damping)
        params = self.curvature.params
        # a parameter without gradient (a module the forward did not use) is skipped, as
        # torch.optim skips it: zero in the solve, its .grad left None
        used = [p.grad is not None for p in params]
        if not any(used):
            raise RuntimeError(
                f"NaturalGradient.step: {missing_gradient(self.curvature.param_names[0])}"
            )
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.comm is None:  # distributed: checked by agree_on_step
            self._check_finite_gradients(grads)
        adapt = closure is not None and self.damping_policy.adaptation_due(self.steps)
        if self.comm is not None and self.distribution == "mem_opt":
            natural = self._solve_by_owners(self.comm, grads, damping)
        else:
            natural = self.curvature.solve(grads, damping)
        if self.clip is not None or adapt:
            lrs = self.learning_rate.per_parameter(self.steps)
        if self.clip is not None:
            natural = self.clip(natural, grads, lrs, self.steps)
        if adapt:
            assert closure is not None
            self.damping_policy.adapt(self._reduction_ratio(closure, grads, natural, lrs))
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
        self._bad_losses = None
        self._backward_done = False
        self._backward_calls = 0
        self.skipped_steps += 1
        self._arm_recording()

    def _check_finite_gradients(self, grads: list[Tensor]) -> None:
        """Refuse to precondition a non-finite gradient (one host synchronisation)."""
        norms = torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads])
        if not bool(torch.isfinite(norms).all()):
            bad = [
                name
                for name, n in zip(self.curvature.param_names, norms.tolist())
                if not math.isfinite(n)
            ]
            raise FloatingPointError(f"NaturalGradient.step: {non_finite_gradient(bad)}")

    def _reduction_ratio(
        self,
        closure: Callable[[], Tensor],
        grads: list[Tensor],
        natural: list[Tensor],
        lrs: list[float],
    ) -> float:
        """``ρ`` of the plain step ``δ = −lr·ĝ`` on the closure's batch
        (concepts/natural_gradient.md#levenberg-marquardt-damping)."""
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
        if self.comm is not None:  # ρ of the union of the processes' batches (equal weights)
            rows = self.comm.gather_values([before, after, change], "levenberg_marquardt")
            before, after, change = (sum(col) / len(rows) for col in zip(*rows))
        return (after - before) / change if change < 0 else float("nan")

    # --- distribution ----------------------------------------------------------------------

    def _all_reduce_statistics(self, comm: distributed.Communicator) -> None:
        """Sum the statistic sums over processes; every process checks the same result."""
        device = self.curvature.params[0].device
        bad = self._bad_losses
        self._bad_losses = None
        if bad is None:
            bad = torch.zeros(1, dtype=torch.float64, device=device)
        sums = self._interface.statistic_sums()
        entries = [*sums, NamedTensor("non-finite losses", bad)]
        reduced = comm.all_reduce_sum(entries, "statistics")
        # one host read: finiteness of every entry and the number of non-finite losses
        status = torch.cat(
            [torch.stack([torch.isfinite(t).all() for t in reduced[:-1]]).double(), reduced[-1]]
        ).tolist()
        world = comm.world_size
        if status[-1] > 0:
            raise FloatingPointError(
                f"NaturalGradient.step: the loss was not finite in {round(status[-1])} "
                f"curvature batch(es) over the {world} processes; no curvature taken (every "
                "process raises this error). Lower the learning rate or raise the damping."
            )
        bad_names = [e.name for e, ok in zip(sums, status[:-1]) if not ok]
        if bad_names:
            shown = ", ".join(bad_names[:6]) + (", ..." if len(bad_names) > 6 else "")
            raise FloatingPointError(
                f"NaturalGradient.step: the curvature statistics summed over the {world} "
                f"processes are not finite (NaN or Inf on at least one process) in: {shown}. "
                "Every process raises this error."
            )
        self._interface.load_statistic_sums(reduced[:-1])

    def _share_decompositions(self, comm: distributed.Communicator, damping: float) -> None:
        """Owners decompose their blocks; with ``"comm_opt"`` they broadcast the results."""
        error: Exception | None = None
        try:
            for block, owner in zip(self.blocks, self.owners):
                if owner == comm.rank:
                    self._interface.decompose(block, damping)
        except Exception as err:  # reported on every process below
            error = err
        rows = comm.gather_values([1.0 if error is not None else 0.0, damping], "decompositions")
        failed = [rank for rank, (flag, _) in enumerate(rows) if flag]
        comm.raise_reported(error, failed, "NaturalGradient.step: a decomposition")
        dampings = [d for _, d in rows]
        if len(set(dampings)) > 1:
            raise distributed.DistributedFailure(
                f"NaturalGradient.step: the damping differs across processes ({dampings}); "
                "every process must use the same damping."
            )
        if self.distribution == "comm_opt":
            for src in range(comm.world_size):
                owned = [b for b, o in zip(self.blocks, self.owners) if o == src]
                if not owned:
                    continue
                exported = None
                if src == comm.rank:
                    exported = [self._interface.export_decomposition(b, damping) for b in owned]
                received = comm.broadcast_entries(exported, src, "decompositions")
                for block, tensors in zip(owned, received):
                    self._interface.import_decomposition(block, damping, tensors)
        self._decompositions_due = False

    def _solve_by_owners(
        self, comm: distributed.Communicator, grads: list[Tensor], damping: float
    ) -> list[Tensor]:
        """``"mem_opt"``: each owner solves its blocks and broadcasts the result."""
        natural: list[Tensor | None] = [None] * len(grads)
        error: Exception | None = None
        statuses = []
        for src in range(comm.world_size):
            owned = [b for b, o in zip(self.blocks, self.owners) if o == src]
            if not owned:
                continue
            indices = [i for b in owned for i in b.param_indices]
            solved = [torch.zeros_like(grads[i]) for i in indices]
            status = 0.0
            if src == comm.rank:
                try:
                    solved = [
                        t
                        for b in owned
                        for t in self._interface.solve_block(
                            b, [grads[i] for i in b.param_indices], damping
                        )
                    ]
                except Exception as err:  # reported on every process below
                    error, status = err, 1.0
            by_dtype: dict[torch.dtype, list[int]] = {}
            for k, i in enumerate(indices):
                by_dtype.setdefault(grads[i].dtype, []).append(k)
            for first, (dtype, ks) in enumerate(by_dtype.items()):
                parts = [solved[k].reshape(-1) for k in ks]
                if first == 0:  # the owner's status rides along in its first buffer
                    parts.append(torch.full((1,), status, dtype=dtype, device=comm.device))
                buffer = torch.cat(parts)
                comm.broadcast(buffer, src, "gradients")
                sizes = [grads[indices[k]].numel() for k in ks]
                if first == 0:
                    statuses.append(buffer[-1:].to(torch.float64))
                    buffer = buffer[:-1]
                for k, part in zip(ks, buffer.split(sizes)):
                    i = indices[k]
                    natural[i] = part.reshape(grads[i].shape)
        srcs = [s for s in range(comm.world_size) if s in self.owners]
        flags = torch.cat(statuses).tolist()  # one host read per step
        comm.raise_reported(
            error, [s for s, f in zip(srcs, flags) if f], "NaturalGradient.step: preconditioning"
        )
        return [n for n in natural if n is not None]

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
            if self.comm is not None and not self.comm.broken:
                self.comm.agree_on_close(self.steps, backward_calls=self._backward_calls)
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
        self._bad_losses = None
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


class _graph_used_once:
    """Turn autograd's "backward through the graph a second time" into a clear error."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: Any, tb: Any) -> None:
        if isinstance(err, RuntimeError) and "second time" in str(err):
            raise RuntimeError(
                "NaturalGradient.backward: this loss was already backpropagated (e.g. by "
                "another preconditioner or a loss.backward() call); build each loss once per "
                "backward, or combine the curvatures in one preconditioner."
            ) from err


def _backward(loss: Tensor) -> None:
    with _graph_used_once():
        loss.backward()


def _clone(tree: Any) -> Any:
    return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, tree)
