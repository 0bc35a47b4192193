"""Communication of a distributed :class:`~curvlab.NaturalGradient` over ``torch.distributed``.

KAISA-style data-parallel K-FAC (Pauloski et al. 2021; concepts/natural_gradient.md#kl-clipping),
for any
:class:`~curvlab.Curvature`:

* **statistics**: on curvature steps every process all-reduces the backend's statistic
  sums (:class:`~curvlab.curvature.distribution.DistributionInterface`: sums that add
  over batches, with the sample counts), so every process holds the curvature of the
  union of all processes' batches — weighted by batch size for ``reduction="mean"``, a
  plain sum for ``"sum"``. Symmetric matrices travel as upper triangles; the tensors are
  packed into one flat buffer per dtype (one collective each). The low-rank parts of a
  structured sum (K-FAC's structured output factor) are all-gathered instead, and every
  process recompresses them the same way (one more control all-gather agrees on errors).
* **decompositions**: the backend's decomposition blocks (same interface) are assigned to
  processes by estimated cost (:func:`assign_blocks`); on inversion steps each process
  decomposes its own blocks. With ``"comm_opt"`` the owners broadcast the decompositions
  and every process preconditions every layer; with ``"mem_opt"`` the owner keeps them
  and broadcasts its blocks' preconditioned gradient every step.

* **control**: every control message is one all-gather of :data:`CONTROL_WIDTH` float64
  values headed by the phase (which exchange) and the step, so that processes that are out
  of step are named instead of pairing the wrong collectives. Every ``backward`` starts with
  one (:meth:`Communicator.agree_on_backward`: step counter and backward calls, before the
  curvature's and ``DistributedDataParallel``'s collectives of the iteration), every
  ``step`` too (:meth:`Communicator.agree_on_step`: step counter, backward calls, kind of
  step, errors kept from ``backward`` and the gradients' finiteness of every process), and
  so does ``close`` (:meth:`Communicator.agree_on_close`), so that a process that skipped
  ``backward``, ``step`` or a whole iteration is named on every process.

Everything is sent from and received into tensors on the parameters' device (CPU with
gloo, CUDA with NCCL). :class:`Communicator` counts the bytes it hands to collectives.
An error of ``torch.distributed`` inside a collective (a peer that died, a timeout) is
re-raised as :class:`DistributedFailure` naming the collective and the step.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from curvlab import linalg
from curvlab.curvature.base import TENSOR_STRUCTURES, NamedTensor
from curvlab.optim.components import non_finite_gradient

#: How decompositions are shared (``NaturalGradient(distribution=...)``).
DISTRIBUTIONS = ("comm_opt", "mem_opt", "local")

#: What the byte counters of :class:`Communicator` distinguish.
CATEGORIES = ("statistics", "decompositions", "gradients", "control")

_DTYPES = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.int64,
    torch.int32,
)

#: Float64 values of every control all-gather: the phase, the step, then the message. One
#: width for all: gloo aborts the process when the sizes of paired all-gathers differ.
CONTROL_WIDTH = 10

#: The control exchanges (what the processes are doing), in the header as 1000 + index.
PHASES = (
    "construction",
    "step",
    "decompositions",
    "levenberg_marquardt",
    "backward",
    "close",
    "statistics",
)
_PHASE_BASE = 1000.0

_T = TypeVar("_T")

#: Errors a failing process reports and every process re-raises with the same type.
_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        linalg.LinAlgError,
        FloatingPointError,
        ValueError,
        TypeError,
        NotImplementedError,
        RuntimeError,
    )
}


def active_group(process_group: dist.ProcessGroup | None = None) -> dist.ProcessGroup | None:
    """``process_group`` or, if ``None``, the default group — when ``torch.distributed`` is
    initialised and the group has more than one process; otherwise ``None``."""
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first."
            )
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def assign_blocks(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy longest-processing-time assignment: the owner (rank) of each block.

    Blocks in order of decreasing cost (ties: lower index first) go to the process with
    the least total cost so far (ties: fewer blocks, then lower rank). Deterministic, so
    every process computes the same assignment.
    """
    if world_size < 1:
        raise ValueError(f"assign_blocks: world_size must be >= 1, got {world_size}.")
    owners = [0] * len(costs)
    load = [0.0] * world_size
    count = [0] * world_size
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], count[r], r))
        owners[index] = rank
        load[rank] += costs[index]
        count[rank] += 1
    return owners


class DistributedFailure(RuntimeError):
    """Raised on every process when the processes disagree (model structure, damping, step),
    and on the survivors when a collective fails (a process died or the timeout passed)."""


def _timeout_advice() -> str:
    return (
        "Collectives wait for the process group's timeout: set it with "
        "torch.distributed.init_process_group(timeout=datetime.timedelta(seconds=...)) "
        "(default 10 minutes for NCCL, 30 minutes for gloo)."
    )


class Communicator:
    """The collectives of a distributed preconditioner over one process group.

    Attributes:
        rank, world_size: of this process in ``group``.
        device: where control tensors and received buffers are allocated (the
            parameters' device: CPU for gloo, CUDA for NCCL).
        bytes: per category (:data:`CATEGORIES`), the bytes of the buffers this process
            handed to collectives (for an all-reduce its buffer; for a broadcast the
            buffer sent or received). Network traffic depends on the algorithm: a ring
            all-reduce moves about ``2(w−1)/w`` times the buffer per process.
        collectives: per category, the number of collective calls.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group = group
        self.device = device  # where control tensors and received buffers live
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bytes = dict.fromkeys(CATEGORIES, 0)
        self.collectives = dict.fromkeys(CATEGORIES, 0)
        self._indices: dict[tuple[str, int, str], tuple[Tensor, Tensor]] = {}
        self.step = -1  # of the last agree_on_step (-1: before the first step)
        self.pending: Exception | None = None  # kept by deferred(), raised at the next step
        # a collective failed or the processes were found out of step: the group can no
        # longer pair this process's collectives with the others' (close() stays local)
        self.broken = False

    def reset_counters(self) -> None:
        """Zero :attr:`bytes` and :attr:`collectives`."""
        self.bytes = dict.fromkeys(CATEGORIES, 0)
        self.collectives = dict.fromkeys(CATEGORIES, 0)

    def _count(self, category: str, buffer: Tensor) -> None:
        self.bytes[category] += buffer.numel() * buffer.element_size()
        self.collectives[category] += 1

    # --- packing -------------------------------------------------------------------------

    def _triangle(self, structure: str, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (structure, n, str(device))
        if key not in self._indices:
            if structure == "symmetric":
                rows, cols = torch.triu_indices(n, n, device=device)
            else:
                rows, cols = torch.tril_indices(n, n, device=device)
            self._indices[key] = (rows, cols)
        return self._indices[key]

    def pack(self, entry: NamedTensor) -> Tensor:
        """The entries that determine ``entry`` as a flat vector (a triangle for symmetric
        and lower-triangular matrices, everything otherwise)."""
        t = entry.tensor
        if entry.structure == "general":
            return t.reshape(-1)
        rows, cols = self._triangle(entry.structure, t.shape[0], t.device)
        return t[rows, cols]

    def unpack(self, flat: Tensor, shape: Sequence[int], structure: str) -> Tensor:
        """Inverse of :meth:`pack`: a symmetric matrix gets its lower triangle mirrored."""
        if structure == "general":
            return flat.reshape(tuple(shape))
        n = shape[0]
        rows, cols = self._triangle(structure, n, flat.device)
        out = flat.new_zeros(n, n)
        out[rows, cols] = flat
        if structure == "symmetric":
            out[cols, rows] = flat
        return out

    def _buckets(self, entries: Sequence[NamedTensor]) -> dict[torch.dtype, list[int]]:
        """Entry indices grouped by dtype, dtypes in order of first appearance."""
        buckets: dict[torch.dtype, list[int]] = {}
        for i, e in enumerate(entries):
            buckets.setdefault(e.tensor.dtype, []).append(i)
        return buckets

    # --- collectives ---------------------------------------------------------------------

    def reduce_entries(self, entries: Sequence[NamedTensor], category: str) -> list[Tensor]:
        """Every entry reduced over the processes as its ``reduction`` says (new tensors,
        identical on every process): ``"sum"`` entries summed (:meth:`all_reduce_sum`),
        ``"gather"`` entries all-gathered into ``[processes, *shape]`` in rank order
        (:meth:`all_gather_entries`). One collective per dtype and kind.

        Every process must pass entries with the same names, shapes, dtypes, structures
        and reductions in the same order.
        """
        summed = [i for i, e in enumerate(entries) if e.reduction == "sum"]
        gathered = [i for i, e in enumerate(entries) if e.reduction == "gather"]
        out: list[Tensor | None] = [None] * len(entries)
        for i, t in zip(summed, self.all_reduce_sum([entries[i] for i in summed], category)):
            out[i] = t
        if gathered:
            parts = self.all_gather_entries([entries[i] for i in gathered], category)
            for i, t in zip(gathered, parts):
                out[i] = t
        return [t for t in out if t is not None]

    def all_gather_entries(self, entries: Sequence[NamedTensor], category: str) -> list[Tensor]:
        """Every entry of every process, stacked in rank order into ``[processes, *shape]``
        (new tensors, identical on every process; one all-gather per dtype, counted as the
        buffer this process sends). Every process must pass entries with the same names,
        shapes, dtypes and structures in the same order."""
        out: list[Tensor | None] = [None] * len(entries)
        for indices in self._buckets(entries).values():
            packed = [self.pack(entries[i]) for i in indices]
            buffer = torch.cat(packed)
            received = [torch.empty_like(buffer) for _ in range(self.world_size)]
            self._count(category, buffer)
            self._collective(
                f"{category} all-gather (step {self.step})",
                dist.all_gather,
                received,
                buffer,
                group=self.group,
            )
            split = [r.split([p.numel() for p in packed]) for r in received]
            for k, i in enumerate(indices):
                e = entries[i]
                out[i] = torch.stack(
                    [self.unpack(parts[k], e.tensor.shape, e.structure) for parts in split]
                )
        return [t for t in out if t is not None]

    def all_reduce_sum(self, entries: Sequence[NamedTensor], category: str) -> list[Tensor]:
        """Every entry summed over the processes (new tensors, identical on every process).

        Every process must pass entries with the same names, shapes, dtypes and
        structures in the same order; ``"gather"`` entries go through
        :meth:`reduce_entries`.
        """
        gathered = [e.name for e in entries if e.reduction != "sum"]
        if gathered:
            raise ValueError(
                f"Communicator.all_reduce_sum: {gathered} are not summed (reduction "
                "'gather'); reduce the entries with reduce_entries."
            )
        out: list[Tensor | None] = [None] * len(entries)
        for indices in self._buckets(entries).values():
            packed = [self.pack(entries[i]) for i in indices]
            buffer = torch.cat(packed)
            self._count(category, buffer)
            self._collective(
                f"{category} all-reduce (step {self.step})",
                dist.all_reduce,
                buffer,
                op=dist.ReduceOp.SUM,
                group=self.group,
            )
            for i, part in zip(indices, buffer.split([p.numel() for p in packed])):
                e = entries[i]
                out[i] = self.unpack(part, e.tensor.shape, e.structure)
        return [t for t in out if t is not None]

    def broadcast_entries(
        self, groups: Sequence[Sequence[NamedTensor]] | None, src: int, category: str
    ) -> list[list[Tensor]]:
        """Groups of tensors (given on ``src`` only, e.g. one group per block) on every
        process, ``src`` included: it gets the packed-and-unpacked copy too, so that every
        process holds identical tensors.

        Group sizes, shapes, dtypes and structures travel in a small int64 header first
        (two control broadcasts, read back to the host), then one buffer per dtype.
        """
        device = self.device
        header: list[int] = []
        entries: list[NamedTensor] = []
        if self.rank == src:
            assert groups is not None
            entries = [e for g in groups for e in g]
            header = [len(groups), *(len(g) for g in groups)]
            for e in entries:
                t = e.tensor
                header += [_DTYPES.index(t.dtype), TENSOR_STRUCTURES.index(e.structure), t.ndim]
                header += list(t.shape)
        length = torch.tensor([len(header)], dtype=torch.int64, device=device)
        self._broadcast(length, src, "control")
        if self.rank == src:
            head = torch.tensor(header, dtype=torch.int64, device=device)
        else:
            head = torch.zeros(int(length.item()), dtype=torch.int64, device=device)
        self._broadcast(head, src, "control")
        values = header if self.rank == src else head.tolist()
        sizes_of_groups = values[1 : 1 + values[0]]
        specs: list[tuple[torch.dtype, str, list[int]]] = []
        pos = 1 + values[0]
        for _ in range(sum(sizes_of_groups)):
            dtype, structure, ndim = values[pos], values[pos + 1], values[pos + 2]
            shape = values[pos + 3 : pos + 3 + ndim]
            specs.append((_DTYPES[dtype], TENSOR_STRUCTURES[structure], shape))
            pos += 3 + ndim
        out: list[Tensor | None] = [None] * len(specs)
        buckets: dict[torch.dtype, list[int]] = {}
        for i, (dtype, _, _) in enumerate(specs):
            buckets.setdefault(dtype, []).append(i)
        for dtype, indices in buckets.items():
            sizes = [_packed_size(specs[i][1], specs[i][2]) for i in indices]
            if self.rank == src:
                buffer = torch.cat([self.pack(entries[i]) for i in indices])
            else:
                buffer = torch.empty(sum(sizes), dtype=dtype, device=device)
            self._broadcast(buffer, src, category)
            for i, part in zip(indices, buffer.split(sizes)):
                out[i] = self.unpack(part, specs[i][2], specs[i][1])
        tensors = [t for t in out if t is not None]
        grouped, start = [], 0
        for size in sizes_of_groups:
            grouped.append(tensors[start : start + size])
            start += size
        return grouped

    def broadcast(self, buffer: Tensor, src: int, category: str) -> None:
        """``buffer`` of ``src`` into ``buffer`` of every process (shapes known to all)."""
        self._broadcast(buffer, src, category)

    def _broadcast(self, buffer: Tensor, src: int, category: str) -> None:
        self._count(category, buffer)
        what = f"{category} broadcast from process {src} (step {self.step})"
        self._collective(what, dist.broadcast, buffer, group=self.group, group_src=src)

    def gather_values(self, values: Sequence[float], phase: str) -> list[list[float]]:
        """``values`` of every process (one control all-gather, read back to the host).

        Every process must be in the same ``phase`` (one of :data:`PHASES`) of the same
        step; otherwise every process raises :class:`DistributedFailure` naming them.
        """
        rows = self._gather_control(self._control_buffer(phase, values), phase)
        return [row[2 : 2 + len(values)] for row in rows]

    def _control_buffer(
        self, phase: str, values: Sequence[float], tail: Tensor | None = None
    ) -> Tensor:
        """``[phase code, step, *values, *tail]``, zero-padded to :data:`CONTROL_WIDTH`."""
        head = [_PHASE_BASE + PHASES.index(phase), float(self.step), *map(float, values)]
        parts = [torch.tensor(head, dtype=torch.float64, device=self.device)]
        if tail is not None:
            parts.append(tail.to(torch.float64).reshape(-1))
        size = sum(p.numel() for p in parts)
        if size > CONTROL_WIDTH:
            raise ValueError(f"a control message holds {CONTROL_WIDTH} values, not {size}.")
        parts.append(torch.zeros(CONTROL_WIDTH - size, dtype=torch.float64, device=self.device))
        return torch.cat(parts)

    def _gather_control(self, mine: Tensor, phase: str) -> list[list[float]]:
        """The control buffers of every process; raises if their headers differ."""
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._count("control", mine)
        what = f"control all-gather ({_describe([_PHASE_BASE + PHASES.index(phase), self.step])})"
        self._collective(what, dist.all_gather, gathered, mine, group=self.group)
        rows = torch.stack(gathered).tolist()
        if any(row[:2] != rows[0][:2] for row in rows):
            raise self._out_of_step(rows, [])
        return rows

    def _out_of_step(self, rows: list[list[float]], differing: Sequence[int]) -> DistributedFailure:
        self.broken = True
        where = ", ".join(
            f"process {rank} is {_describe(row, differing)}" for rank, row in enumerate(rows)
        )
        hint = _skipped(rows)
        return DistributedFailure(
            f"NaturalGradient: the processes are out of step: {where}.{hint} Every process "
            "must call backward() and step() equally often and in the same order, and build, "
            "load and close the same preconditioners (a process that skips one pairs the "
            "later collectives with the wrong ones). Every process raises this error."
        )

    def _collective(self, what: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)``; an error of ``torch.distributed`` (a peer that died, a
        timeout) becomes a :class:`DistributedFailure` naming the collective."""
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:  # gloo raises RuntimeError, NCCL DistBackendError
            self.broken = True
            raise DistributedFailure(
                f"NaturalGradient: the {what} failed on process {self.rank} of "
                f"{self.world_size}: {err} Another process probably died (its output says "
                "why) or diverged (it runs other collectives: out of step, or it left the "
                f"training loop). {_timeout_advice()}"
            ) from err

    def broadcast_message(self, message: str | None, src: int) -> str:
        """A string from ``src`` (pickled; for error reports only)."""
        box = [message]
        self.collectives["control"] += 1
        what = f"error report from process {src} (step {self.step})"
        self._collective(what, dist.broadcast_object_list, box, group=self.group, group_src=src)
        return str(box[0])

    # --- agreement -----------------------------------------------------------------------

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Keep an error raised inside (e.g. by the curvature update in ``backward``) for the
        next :meth:`agree_on_step`, which raises it on every process, instead of raising it
        on this process alone while the others wait in a collective. A
        :class:`DistributedFailure` (a collective failed) is raised at once."""
        try:
            yield
        except DistributedFailure:
            raise
        except Exception as err:  # reported on every process at the next step
            if self.pending is None:
                self.pending = err

    def agree_on_backward(self, step: int, *, backward_calls: int) -> None:
        """The first collective of every ``backward`` (one control all-gather, one host read),
        before the curvature's statistics and ``DistributedDataParallel``'s gradients.

        Every process must be in ``backward`` of the same ``step`` after as many
        ``backward_calls`` since the last step; a process that skipped ``step()`` (it is in
        ``backward`` while the others are in ``step``), ``backward()`` (the reverse), or a
        whole iteration (it is in ``close`` while the others start another ``backward``)
        makes every process raise :class:`DistributedFailure` naming it — instead of
        pairing DDP's all-reduce with another collective, which gloo does not survive.
        """
        self.step = step
        rows = self._gather_control(self._control_buffer("backward", [backward_calls]), "backward")
        if any(row[2] != rows[0][2] for row in rows):
            raise self._out_of_step(rows, [2])

    def agree_on_close(self, step: int, *, backward_calls: int) -> None:
        """The collective of ``close``: every process must close after the same number of
        steps (and ``backward`` calls since the last step), else every process raises
        :class:`DistributedFailure` — a process that skipped a whole iteration closes while
        the others start one more, and is named here instead of at the gloo timeout."""
        self.step = step
        rows = self._gather_control(self._control_buffer("close", [backward_calls]), "close")
        if any(row[2] != rows[0][2] for row in rows):
            raise self._out_of_step(rows, [2])

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
        bad_losses: Tensor | None = None,
    ) -> None:
        """The first collective of every step (one control all-gather, one host read).

        Every process must be at the same ``step``, after as many ``backward_calls``, with
        the same kind of step (curvature ``statistics`` to all-reduce, a curvature to
        precondition with — ``ready`` —, a Levenberg-Marquardt ``closure`` to evaluate),
        else every process raises :class:`DistributedFailure` naming what each process is
        doing. Then an error kept by :meth:`deferred` on any process, parameters without a
        gradient that differ across processes, and a non-finite gradient (checked here, on
        the device, with the same host read), are raised on every process
        (:meth:`raise_reported`) — the latter two unless a process counted non-finite losses
        (``bad_losses``, a device tensor): the statistics all-reduce that follows reports
        those on every process. Parameters without a gradient on every process are skipped
        by the preconditioner, as ``torch.optim`` skips them.
        """
        self.step = step
        error, self.pending = self.pending, None
        present = [(n, g) for n, g in zip(names, grads) if g is not None]
        missing = [n for n, g in zip(names, grads) if g is None]
        missing_digest = 0.0  # which parameters lack a gradient, in 48 bits (exact in float64)
        if missing:
            digest = hashlib.sha256("\n".join(missing).encode()).digest()
            missing_digest = float(int.from_bytes(digest[:6], "big"))
        norms = None
        finite = torch.ones(1, dtype=torch.float64, device=self.device)
        if present:
            norms = torch.stack(
                [torch.linalg.vector_norm(g.detach()).to(torch.float64) for _, g in present]
            )
            finite = torch.isfinite(norms).all().reshape(1)
        if bad_losses is not None:
            finite = torch.cat([finite.double(), bad_losses.reshape(1).to(finite.device)])
        values = [backward_calls, statistics, ready, closure, error is not None, missing_digest]
        rows = self._gather_control(self._control_buffer("step", values, finite), "step")
        differing = [i for i in range(2, 6) if any(row[i] != rows[0][i] for row in rows)]
        if differing:
            raise self._out_of_step(rows, differing)
        self.raise_reported(
            error, [r for r, row in enumerate(rows) if row[6]], "NaturalGradient.backward"
        )
        if not (backward_calls and ready):
            return  # the same on every process: the preconditioner raises its own error
        if any(row[9] for row in rows):
            return  # non-finite losses: reported after the statistics all-reduce
        failed = [r for r, row in enumerate(rows) if row[7] != rows[0][7]]
        problem: Exception | None = None
        if self.rank in failed:
            shown = f"{missing[:5]}{' …' if len(missing) > 5 else ''}" if missing else "none"
            problem = RuntimeError(
                f"the parameters without a gradient differ across processes (here: {shown}; "
                "process 0 differs). Every process must leave the same parameters without "
                "gradient (they are skipped, as torch.optim skips them); otherwise the "
                "processes' parameters drift apart."
            )
        self.raise_reported(problem, failed, "NaturalGradient.step")
        failed = [r for r, row in enumerate(rows) if not row[8]]
        if self.rank in failed:
            assert norms is not None
            bad = [n for (n, _), v in zip(present, norms.tolist()) if not math.isfinite(v)]
            problem = FloatingPointError(non_finite_gradient(bad))
        self.raise_reported(problem, failed, "NaturalGradient.step")

    def raise_reported(self, error: BaseException | None, failed: Sequence[int], what: str) -> None:
        """Raise on every process the error of the first process in ``failed`` (a list all
        processes agree on); nothing happens if it is empty."""
        if not failed:
            return
        src = failed[0]
        report = f"{type(error).__name__}\n{error}" if self.rank == src else None
        kind, _, message = self.broadcast_message(report, src).partition("\n")
        cls = _ERRORS.get(kind, RuntimeError)
        where = f"process {src} of {self.world_size}"
        if len(failed) > 1:
            where = (
                f"processes {', '.join(map(str, failed))} of {self.world_size} (the error of "
                f"process {src})"
            )
        full = f"{what} failed on {where} (every process raises this error): {message}"
        raise cls(full) from error

    def check_same(self, description: Sequence[str], what: str) -> None:
        """Raise :class:`DistributedFailure` on every process unless every process passes the
        same ``description`` (compared by a hash; on a mismatch the descriptions are
        gathered to name the first difference)."""
        digest = hashlib.sha256("\n".join(description).encode()).digest()
        mine = int.from_bytes(digest[:6], "big")  # 48 bits: exact in float64
        hashes = [int(h) for (h,) in self.gather_values([float(mine)], "construction")]
        if len(set(hashes)) == 1:
            return
        everyone: list[list[str] | None] = [None] * self.world_size
        self.collectives["control"] += 1
        name = "all-gather of the model descriptions (construction)"
        self._collective(name, dist.all_gather_object, everyone, list(description), self.group)
        reference = everyone[0] or []
        for rank, other in enumerate(everyone):
            other = other or []
            if other == reference:
                continue
            for i in range(max(len(other), len(reference))):
                mine_line = other[i] if i < len(other) else "<nothing>"
                ref_line = reference[i] if i < len(reference) else "<nothing>"
                if mine_line != ref_line:
                    raise DistributedFailure(
                        f"{what}: process {rank} has {mine_line!r} where process 0 has "
                        f"{ref_line!r}. Every process must build the same model and curvature "
                        "(same layers, parameter shapes and values — wrap the model in "
                        "DistributedDataParallel or broadcast it — backend and options)."
                    )
        raise DistributedFailure(f"{what}: the processes differ.")  # pragma: no cover


def _describe(row: Sequence[float], differing: Sequence[int] = ()) -> str:
    """What a process is doing, from the header (and the step record) of its control
    message; ``differing``: the fields of the step record to mention."""
    index = round(row[0] - _PHASE_BASE)
    if not (0 <= index < len(PHASES) and row[0] == _PHASE_BASE + index):
        return f"in an unknown exchange (header {row[0]:g}, {row[1]:g})"
    phase, step = PHASES[index], round(row[1])
    if phase == "construction":
        return "building a NaturalGradient"
    if phase == "decompositions":
        return f"sharing the decompositions of step {step}"
    if phase == "statistics":
        return f"combining the structured statistics of step {step}"
    if phase == "levenberg_marquardt":
        return f"averaging the Levenberg-Marquardt terms of step {step}"
    calls = round(row[2]) if len(row) > 2 else 0
    plural = "" if calls == 1 else "s"
    if phase == "backward":
        return f"starting backward() call {calls + 1} of step {step}"
    if phase == "close":
        text = f"closing the preconditioner after {step} step{'' if step == 1 else 's'}"
        return text + (f" and {calls} more backward call{plural}" if calls else "")
    text = f"starting step {step}"
    if len(row) > 2:
        text += f" after {calls} backward call{plural}"
    extras = {
        3: ("with curvature statistics", "without curvature statistics"),
        4: ("with a curvature", "without a curvature yet"),
        5: ("with a Levenberg-Marquardt closure", "without a closure"),
    }
    for i in differing:
        if i in extras:
            text += " " + extras[i][0 if row[i] else 1]
    return text


def _state(row: Sequence[float]) -> tuple[str, int, int]:
    """(phase, step, backward calls) of a control message's header and first value."""
    index = round(row[0] - _PHASE_BASE)
    phase = PHASES[index] if 0 <= index < len(PHASES) else "unknown"
    return phase, round(row[1]), round(row[2]) if len(row) > 2 else 0


def _skipped(rows: Sequence[Sequence[float]]) -> str:
    """What the processes that differ from the most common state skipped, for a training
    loop of one ``backward`` per ``step`` (``""`` when it cannot be told)."""
    states = [_state(row) for row in rows]
    common = max(states, key=states.count)
    hints = []
    for rank, state in enumerate(states):
        if state == common:
            continue
        (phase, step, calls), (other, other_step, other_calls) = state, common
        others = "the others" if len(rows) > 2 else f"process {states.index(common)}"
        if step != other_step and {phase, other} <= {"backward", "step", "close"}:
            verb = "is" if len(rows) == 2 else "are"
            hints.append(
                f"process {rank} is at step {step} where {others} {verb} at step "
                f"{other_step} (another checkpoint, or it skipped or repeated steps)"
            )
        elif {phase, other} == {"backward", "step"} and calls == other_calls:
            if phase == "step" and calls == 0:
                hints.append(f"process {rank} skipped backward() before step {step}")
            elif phase == "backward" and calls > 0:
                hints.append(f"process {rank} skipped step() {step} (it calls backward() again)")
            elif phase == "backward":
                hints.append(f"{others} skipped backward() before step {step}")
            else:
                hints.append(f"{others} skipped step() {step} (calling backward() again)")
        elif {phase, other} == {"backward", "close"} and step == other_step:
            if phase == "close":
                hints.append(
                    f"process {rank} skipped a whole iteration: it closes after {step} "
                    f"steps while {others} start{'s' if len(rows) == 2 else ''} another one"
                )
            else:
                hints.append(
                    f"process {rank} runs one iteration more than {others} (or {others} "
                    "skipped one)"
                )
    hints = list(dict.fromkeys(hints))
    return (" Likely: " + "; ".join(hints) + ".") if hints else ""


def _packed_size(structure: str, shape: Sequence[int]) -> int:
    if structure == "general":
        size = 1
        for d in shape:
            size *= d
        return size
    n = shape[0]
    return n * (n + 1) // 2
