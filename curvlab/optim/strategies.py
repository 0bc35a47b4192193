"""Distribution strategies of a :class:`~curvlab.NaturalGradient`: how its work is shared.

The preconditioner runs one pipeline per step (agree, average, invert, solve, clip, adapt,
write) and asks its strategy at each point that involves other processes. Three strategies
ship; ``NaturalGradient(distribution=...)`` maps its string options to them in one place,
:func:`make_distribution`:

* :class:`Local` — no communication: every process uses its own batches' curvature (also
  what ``"comm_opt"`` and ``"mem_opt"`` become without a process group of several
  processes);
* :class:`CommOpt` (``"comm_opt"``) — statistic sums all-reduced; the owner of each
  decomposition block decomposes it and broadcasts the decomposition; every process
  preconditions every block (least communication per step);
* :class:`MemOpt` (``"mem_opt"``) — statistic sums all-reduced; the owner keeps its
  decompositions and broadcasts its blocks' preconditioned gradients every step (each
  decomposition held once).

The collectives, the agreements that keep processes in step and the error reports are
:class:`curvlab.optim.distributed.Communicator`'s; the strategies decide which of them run.
A user's strategy subclasses :class:`Distribution` (or one of the three) and is passed as
``NaturalGradient(distribution=MyStrategy())``; the docs page "Distributed K-FAC" lists
what each method must do.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from curvlab.curvature.base import DecompositionBlock, NamedTensor
from curvlab.curvature.distribution import DistributionInterface
from curvlab.optim import distributed
from curvlab.optim.components import graph_used_once, non_finite_gradient


class Distribution(ABC):
    """How a :class:`~curvlab.NaturalGradient` shares its work over processes.

    The preconditioner calls :meth:`bind` once, at construction, then the other methods
    at fixed points of ``backward``, ``step`` and ``close`` (in that order within each).
    Every method is called on every process at the same point, so a method may run
    collectives. One strategy object serves one preconditioner.

    Attributes:
        name: what ``NaturalGradient.distribution`` reports (part of the check that every
            process built the same preconditioner).
        comm: the :class:`~curvlab.optim.distributed.Communicator` (byte counters), or
            ``None`` without communication.
        owners: per decomposition block, the rank that decomposes it (set by :meth:`bind`).
    """

    name: str = "custom"
    comm: distributed.Communicator | None = None

    def __init__(self) -> None:
        self.owners: list[int] = []
        self.interface: DistributionInterface | None = None
        self.blocks: list[DecompositionBlock] = []

    def bind(
        self,
        interface: DistributionInterface,
        blocks: Sequence[DecompositionBlock],
        describe: Callable[[], list[str]],
    ) -> None:
        """Serve the preconditioner of ``interface``'s curvature, whose decomposition
        blocks are ``blocks``; ``describe()`` lists what must agree across processes."""
        if self.interface is not None:
            raise ValueError(
                f"NaturalGradient: the distribution strategy {type(self).__name__} already "
                "serves another preconditioner; build one strategy per NaturalGradient."
            )
        self.interface = interface
        self.blocks = list(blocks)
        self.owners = [0] * len(self.blocks)

    @property
    def bound(self) -> DistributionInterface:
        """The interface given to :meth:`bind` (raises before)."""
        if self.interface is None:
            raise RuntimeError(
                f"{type(self).__name__}: not bound to a preconditioner yet (NaturalGradient "
                "calls bind at construction)."
            )
        return self.interface

    # --- backward ------------------------------------------------------------------------

    @abstractmethod
    def agree_on_backward(self, step: int, backward_calls: int) -> None:
        """Start of every ``backward``: check that every process is in the same one."""

    @abstractmethod
    def screen_loss(self, loss: Tensor) -> bool:
        """On curvature steps: whether ``loss`` may be accumulated now. ``False`` makes
        the preconditioner report (or, under a grad scaler, skip) the non-finite loss."""

    @abstractmethod
    def accumulate(self, loss: Tensor) -> None:
        """Accumulate the statistics of the forward that produced ``loss`` into the
        curvature (:meth:`curvlab.Curvature.accumulate`; errors as
        :class:`~curvlab.optim.components.graph_used_once` words them)."""

    # --- step ----------------------------------------------------------------------------

    @abstractmethod
    def agree_on_step(
        self,
        step: int,
        *,
        backward_calls: int,
        statistics: bool,
        ready: bool,
        closure: bool,
        grads: Sequence[Tensor | None],
        names: Sequence[str],
    ) -> None:
        """Start of every step that is not skipped: check that every process takes the same
        kind of step (arguments as :meth:`Communicator.agree_on_step`)."""

    @abstractmethod
    def reduce_statistics(self) -> None:
        """On curvature steps, before the moving average: make the curvature's accumulated
        statistics those of every process's batches."""

    @abstractmethod
    def share_decompositions(self, damping: float) -> None:
        """After an inversion (or a restored checkpoint), before the first solve with the
        new statistics: compute and share the decompositions as the strategy holds them."""

    @abstractmethod
    def check_gradients(self, grads: Sequence[Tensor], names: Sequence[str]) -> None:
        """Refuse to precondition gradients that are not finite (unless
        :meth:`agree_on_step` did)."""

    @abstractmethod
    def solve(self, grads: list[Tensor], damping: float) -> list[Tensor]:
        """``(C + λI)⁻¹ g`` for every covered parameter, identical on every process."""

    @abstractmethod
    def average_values(self, values: Sequence[float]) -> list[float]:
        """The mean over processes (equal weights) of the Levenberg–Marquardt terms."""

    # --- close ---------------------------------------------------------------------------

    @abstractmethod
    def agree_on_close(self, step: int, backward_calls: int) -> None:
        """The first ``close``: check that every process closes after the same steps."""


class Local(Distribution):
    """No communication: every process preconditions with its own batches' curvature.

    Non-finite losses, statistics and gradients raise at once, on this process."""

    name = "local"

    def agree_on_backward(self, step: int, backward_calls: int) -> None:
        return None

    def screen_loss(self, loss: Tensor) -> bool:
        return bool(torch.isfinite(loss))  # curvature steps only: one host read

    def accumulate(self, loss: Tensor) -> None:
        with graph_used_once():
            self.bound.curvature.accumulate(loss, check_finite=True)

    def agree_on_step(
        self,
        step: int,
        *,
        backward_calls: int,
        statistics: bool,
        ready: bool,
        closure: bool,
        grads: Sequence[Tensor | None],
        names: Sequence[str],
    ) -> None:
        return None

    def reduce_statistics(self) -> None:
        return None

    def share_decompositions(self, damping: float) -> None:
        return None  # the curvature decomposes what its solve needs

    def check_gradients(self, grads: Sequence[Tensor], names: Sequence[str]) -> None:
        """One host read; raises ``FloatingPointError`` naming the parameters."""
        norms = torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads])
        if not bool(torch.isfinite(norms).all()):
            bad = [name for name, n in zip(names, norms.tolist()) if not math.isfinite(n)]
            raise FloatingPointError(f"NaturalGradient.step: {non_finite_gradient(bad)}")

    def solve(self, grads: list[Tensor], damping: float) -> list[Tensor]:
        return self.bound.curvature.solve(grads, damping)

    def average_values(self, values: Sequence[float]) -> list[float]:
        return list(values)

    def agree_on_close(self, step: int, backward_calls: int) -> None:
        return None


class ProcessGroupDistribution(Distribution):
    """Data-parallel K-FAC over a ``torch.distributed`` process group (KAISA-style).

    Every process all-reduces the statistic sums on curvature steps (so it averages the
    curvature of every process's batches); the decomposition blocks are assigned to owners
    by :meth:`assign`; the owners decompose their blocks on inversion steps. Subclasses
    say how the decompositions reach the solve (:class:`CommOpt`, :class:`MemOpt`).
    Control messages keep the processes in step and raise every error on every process
    (:class:`~curvlab.optim.distributed.Communicator`).

    Args:
        process_group: the group; ``None``: the default group. ``torch.distributed``
            must be initialised with more than one process in it.
    """

    comm: distributed.Communicator | None

    def __init__(self, process_group: torch.distributed.ProcessGroup | None = None) -> None:
        super().__init__()
        group = distributed.active_group(process_group)
        if group is None:
            raise ValueError(
                f"{type(self).__name__}: needs torch.distributed initialised with more than "
                "one process in the group; with one process use Local() (or the string "
                "options, which fall back to it)."
            )
        self.group = group
        self.comm = None
        self._bad_losses: Tensor | None = None  # non-finite losses of this step, not yet read

    @property
    def communicator(self) -> distributed.Communicator:
        if self.comm is None:
            raise RuntimeError(f"{type(self).__name__}: not bound to a preconditioner yet.")
        return self.comm

    def assign(self, costs: Sequence[float], world_size: int) -> list[int]:
        """The owner of each block (every process must compute the same): greedy longest
        processing time, :func:`~curvlab.optim.distributed.assign_blocks`."""
        return distributed.assign_blocks(costs, world_size)

    def bind(
        self,
        interface: DistributionInterface,
        blocks: Sequence[DecompositionBlock],
        describe: Callable[[], list[str]],
    ) -> None:
        super().bind(interface, blocks, describe)
        comm = distributed.Communicator(self.group, interface.curvature.params[0].device)
        self.comm = comm
        owners = self.assign([b.cost for b in self.blocks], comm.world_size)
        if len(owners) != len(self.blocks) or not all(
            isinstance(o, int) and 0 <= o < comm.world_size for o in owners
        ):
            raise ValueError(
                f"{type(self).__name__}.assign: expected one rank in [0, {comm.world_size}) per "
                f"block ({len(self.blocks)} blocks), got {owners!r}."
            )
        self.owners = list(owners)
        comm.check_same(
            [*describe(), f"owners {self.owners}"],
            "NaturalGradient: the model differs across processes",
        )
        interface.set_process_reducer(lambda e: comm.reduce_entries(e, "statistics"))

    def owned(self, rank: int) -> list[DecompositionBlock]:
        """The blocks ``rank`` decomposes, in order."""
        return [b for b, o in zip(self.blocks, self.owners) if o == rank]

    # --- backward ------------------------------------------------------------------------

    def agree_on_backward(self, step: int, backward_calls: int) -> None:
        """The first collective of the iteration: before the curvature's and DDP's."""
        if backward_calls == 0:  # a new step: nothing recorded (a skipped or loaded step)
            self._bad_losses = None
        self.communicator.agree_on_backward(step, backward_calls=backward_calls)

    def screen_loss(self, loss: Tensor) -> bool:
        """Always ``True``: every process must reach the all-reduce (and DDP's); a
        non-finite loss is counted on the device and reported by the step's statistics
        all-reduce on every process."""
        bad = (~torch.isfinite(loss.detach())).to(torch.float64).reshape(1)
        self._bad_losses = bad if self._bad_losses is None else self._bad_losses + bad
        return True

    def accumulate(self, loss: Tensor) -> None:
        """An error is kept for the next step's agreement, which raises it everywhere."""
        with self.communicator.deferred(), graph_used_once():
            self.bound.curvature.accumulate(loss, check_finite=False)

    # --- step ----------------------------------------------------------------------------

    def agree_on_step(
        self,
        step: int,
        *,
        backward_calls: int,
        statistics: bool,
        ready: bool,
        closure: bool,
        grads: Sequence[Tensor | None],
        names: Sequence[str],
    ) -> None:
        """Also raises, on every process, an error kept from ``backward`` and a missing or
        non-finite gradient of any process."""
        self.communicator.agree_on_step(
            step,
            backward_calls=backward_calls,
            statistics=statistics,
            ready=ready,
            closure=closure,
            grads=grads,
            names=names,
            bad_losses=self._bad_losses,
        )

    def reduce_statistics(self) -> None:
        """Reduce the statistic sums over processes (summed; the parts of a structured sum
        all-gathered); every process checks the same result. Where structured sums are
        combined (a recompression, which could fail), one control all-gather agrees on the
        outcome, so that an error is raised on every process."""
        comm, interface = self.communicator, self.bound
        bad = self._bad_losses
        self._bad_losses = None
        if bad is None:
            bad = torch.zeros(1, dtype=torch.float64, device=comm.device)
        sums = interface.statistic_sums()
        entries = [*sums, NamedTensor("non-finite losses", bad)]
        reduced = comm.reduce_entries(entries, "statistics")
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
        if not interface.combines_parts(sums):  # the same on every process
            interface.load_statistic_sums(reduced[:-1])
            return
        error: Exception | None = None
        try:
            interface.load_statistic_sums(reduced[:-1])  # unchanged if it raises
        except Exception as err:  # reported on every process below
            error = err
        rows = comm.gather_values([1.0 if error is not None else 0.0], "statistics")
        failed = [rank for rank, (flag,) in enumerate(rows) if flag]
        comm.raise_reported(error, failed, "NaturalGradient.step: combining the statistics")

    def share_decompositions(self, damping: float) -> None:
        """The owners decompose their blocks; every process checks that none failed and
        that the damping agrees."""
        comm, interface = self.communicator, self.bound
        error: Exception | None = None
        try:
            for block in self.owned(comm.rank):
                interface.decompose(block, damping)
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

    def check_gradients(self, grads: Sequence[Tensor], names: Sequence[str]) -> None:
        return None  # agree_on_step checked every process's gradients

    def average_values(self, values: Sequence[float]) -> list[float]:
        rows = self.communicator.gather_values(values, "levenberg_marquardt")
        return [sum(column) / len(rows) for column in zip(*rows)]

    # --- close ---------------------------------------------------------------------------

    def agree_on_close(self, step: int, backward_calls: int) -> None:
        """Stays local once a collective failed or the processes were out of step."""
        comm = self.communicator
        if not comm.broken:
            comm.agree_on_close(step, backward_calls=backward_calls)


class CommOpt(ProcessGroupDistribution):
    """``"comm_opt"``: the owners broadcast their decompositions on inversion steps; every
    process preconditions every block itself (no communication on the other steps)."""

    name = "comm_opt"

    def share_decompositions(self, damping: float) -> None:
        super().share_decompositions(damping)
        comm, interface = self.communicator, self.bound
        for src in range(comm.world_size):
            owned = self.owned(src)
            if not owned:
                continue
            exported = None
            if src == comm.rank:
                exported = [interface.export_decomposition(b, damping) for b in owned]
            received = comm.broadcast_entries(exported, src, "decompositions")
            for block, tensors in zip(owned, received):
                interface.import_decomposition(block, damping, tensors)

    def solve(self, grads: list[Tensor], damping: float) -> list[Tensor]:
        return self.bound.curvature.solve(grads, damping)


class MemOpt(ProcessGroupDistribution):
    """``"mem_opt"``: the owners keep their decompositions and broadcast their blocks'
    preconditioned gradients every step (each decomposition held on one process)."""

    name = "mem_opt"

    def solve(self, grads: list[Tensor], damping: float) -> list[Tensor]:
        """Each owner solves its blocks and broadcasts the result (one buffer per dtype
        and owner; the owner's status rides along, one host read per step)."""
        comm, interface = self.communicator, self.bound
        natural: list[Tensor | None] = [None] * len(grads)
        error: Exception | None = None
        statuses = []
        for src in range(comm.world_size):
            owned = self.owned(src)
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
                        for t in interface.solve_block(
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


#: The strategy of each string option of ``NaturalGradient(distribution=...)``.
STRATEGIES: dict[str, type[ProcessGroupDistribution]] = {"comm_opt": CommOpt, "mem_opt": MemOpt}


def make_distribution(
    distribution: str | Distribution,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> Distribution:
    """The strategy for ``NaturalGradient(distribution=..., process_group=...)``.

    A :class:`Distribution` object is used as it is (it brings its own group). A string
    (:data:`~curvlab.optim.distributed.DISTRIBUTIONS`) becomes :class:`Local` when it is
    ``"local"`` or when there is no process group of several processes (``process_group``,
    or the default group when ``torch.distributed`` is initialised), else :class:`CommOpt`
    or :class:`MemOpt` over that group.
    """
    if isinstance(distribution, Distribution):
        if process_group is not None:
            raise ValueError(
                "NaturalGradient: process_group= is for the string options; a strategy "
                f"object ({type(distribution).__name__}) takes its group itself, e.g. "
                "CommOpt(process_group=group)."
            )
        return distribution
    if not isinstance(distribution, str):
        raise TypeError(
            "NaturalGradient: distribution must be one of "
            f"{distributed.DISTRIBUTIONS} or a curvlab.optim.Distribution, got "
            f"{type(distribution).__name__}."
        )
    if distribution not in distributed.DISTRIBUTIONS:
        raise ValueError(
            f"NaturalGradient: unknown distribution {distribution!r}; choose one of "
            f"{distributed.DISTRIBUTIONS} or pass a curvlab.optim.Distribution."
        )
    group = None if distribution == "local" else distributed.active_group(process_group)
    if group is None:
        return Local()
    return STRATEGIES[distribution](group)
