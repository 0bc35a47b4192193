"""Distributed sums of K-FAC's structured output factor ``G = diag(d) + U diag(s) Uᵀ`` on 2
gloo processes (issue #23 item 2).

One spawn runs every scenario; each process writes its results and the tests compare them
with single-process references computed here in float64 (``KFAC`` on every batch, with a
structured and with a dense ``G``):

* the statistics reduced by the ``CommOpt`` strategy, for a structured-only and a mixed
  model (structured head + dense layers), ``reduction="mean"`` and ``"sum"``, an output
  rank that holds every batch's columns and one that truncates: the dense parts and the
  structured diagonal equal the single process's; the structured low-rank part equals it
  while the ranks fit, otherwise it is exactly the documented recompression of the
  processes' parts (the best rank-``r`` part of their sum, the rest's diagonal moved into
  ``d``) and within the documented error bound of the exact factor;
* every process ends with the same factor, bit for bit;
* ``NaturalGradient`` (``comm_opt``, ``mem_opt``) trains a model with a structured head
  like one process;
* a recompression that fails on one process raises the same error on every process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import curvlab
from curvlab import linalg
from curvlab.curvature.base import NamedTensor
from curvlab.curvature.distribution import DistributionInterface, reduce_locally
from tests.optim.spawn import error_record, init_gloo, result_path, spawn_and_collect

WORLD = 2
TIMEOUT_S = 150
DTYPE = torch.float64
D_IN, HIDDEN, VOCAB = 5, 6, 30
#: rows of each process's batches: 5 + 7 = 12 columns of the softmax factor in all
ROWS = ((3, 2), (4, 3))
FITS, TRUNCATES = 16, 4  # output ranks: all 12 columns fit (< VOCAB), or truncated


@dataclass(frozen=True)
class Config:
    model: str  # "structured": one Linear head; "mixed": Linear, Tanh, structured head
    reduction: str
    rank: int

    @property
    def name(self) -> str:
        return f"{self.model}-{self.reduction}-rank{self.rank}"


CONFIGS = [
    Config(model, reduction, rank)
    for model in ("structured", "mixed")
    for reduction in ("mean", "sum")
    for rank in (FITS, TRUNCATES)
]
TRAIN_STEPS, TRAIN_ROWS, TRAIN_RANK = 3, 4, 24  # 3 steps × 8 columns: the average fits too


def _model(kind: str) -> tuple[nn.Module, str]:
    """The model and the name of its structured head."""
    torch.manual_seed(0)
    if kind == "structured":
        return nn.Sequential(nn.Linear(D_IN, VOCAB)).to(DTYPE), "0"
    layers = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, VOCAB))
    return layers.to(DTYPE), "2"


def _batch(rows: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, D_IN, generator=gen, dtype=DTYPE)
    return x, torch.randint(0, VOCAB, (rows,), generator=gen)


def _batches(rank: int) -> list[tuple[Tensor, Tensor]]:
    return [_batch(rows, seed=100 * rank + i) for i, rows in enumerate(ROWS[rank])]


def _kfac(model: nn.Module, head: str, cfg: Config, output: str = "structured") -> curvlab.KFAC:
    return curvlab.KFAC(
        model,
        nn.CrossEntropyLoss(reduction=cfg.reduction),
        fisher_type="exact",
        output_factor={head: output},
        output_rank=cfg.rank,
    )


def _low_rank_parts(G: linalg.DiagonalPlusLowRank) -> dict[str, Tensor]:
    return {"d": G.d.clone(), "U": G.U.clone(), "s": G.s.clone()}


# --- what every process runs ------------------------------------------------------------


def _reduce(cfg: Config, rank: int) -> dict[str, Any]:
    """Accumulate this process's batches, then reduce them as a distributed NaturalGradient
    does (the CommOpt strategy's reduce_statistics)."""
    model, head = _model(cfg.model)
    kfac = _kfac(model, head, cfg)
    for x, y in _batches(rank):
        kfac.update(x, y)
    structured = kfac._structured.index(True)
    local = _low_rank_parts(kfac._g_sum[structured])
    interface = DistributionInterface(kfac)
    strategy = curvlab.optim.CommOpt()
    strategy.bind(interface, interface.decomposition_blocks(), lambda: [cfg.name])
    strategy.reduce_statistics()
    assert strategy.comm is not None
    return {
        "local": local,
        "reduced": _low_rank_parts(kfac._g_sum[structured]),
        "factors": [(f.A, f.G.to_dense() if structured == k else f.G)
                    for k, f in enumerate(kfac.factors())],
        "num_samples": kfac.num_samples,
        "dense": kfac.to_dense(),
        "bytes": dict(strategy.comm.bytes),
    }  # fmt: skip


def _train(distribution: str, rank: int | None) -> dict[str, Any]:
    """Three NaturalGradient steps of the mixed model with a structured head; ``rank=None``:
    the single process on the full batches. Gradients: sample-weighted all-reduce."""
    cfg = Config("mixed", "mean", TRAIN_RANK)
    model, head = _model(cfg.model)
    precond = curvlab.NaturalGradient(
        _kfac(model, head, cfg),
        damping=0.1,
        invert_every=2,
        lr=0.1,
        distribution=distribution if rank is not None else "local",
        kl_clip=None,
    )
    loss_fn = precond.curvature.loss_fn
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result: dict[str, Any] = {"natural": []}
    for step in range(TRAIN_STEPS):
        x, y = _batch(WORLD * TRAIN_ROWS, seed=50 + step)
        if rank is not None:
            share = slice(rank * TRAIN_ROWS, (rank + 1) * TRAIN_ROWS)
            x, y = x[share], y[share]
        opt.zero_grad()
        precond.backward(loss_fn(model(x), y))
        if rank is not None:
            for p in model.parameters():
                p.grad.mul_(1.0 / WORLD)
                dist.all_reduce(p.grad)
        precond.step()
        result["natural"].append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        opt.step()
    G = precond.curvature.factors()[1].G
    assert isinstance(G, linalg.DiagonalPlusLowRank)
    result["G"] = G.to_dense()
    result["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    result["bytes"] = dict(precond.comm.bytes) if precond.comm is not None else {}
    precond.close()
    return result


def _failing_combination(rank: int) -> dict[str, Any]:
    """Process 1's recompression fails: every process must raise its error."""
    cfg = Config("mixed", "mean", TRUNCATES)
    model, head = _model(cfg.model)
    kfac = _kfac(model, head, cfg)
    for x, y in _batches(rank):
        kfac.update(x, y)
    if rank == 1:

        def broken(sums):
            raise linalg.LinAlgError("eigh did not converge (injected)")

        kfac._reduced_sums = broken  # type: ignore[method-assign]
    interface = DistributionInterface(kfac)
    strategy = curvlab.optim.CommOpt()
    strategy.bind(interface, interface.decomposition_blocks(), lambda: ["failing"])
    before = kfac._g_sum[1].d.clone()
    try:
        strategy.reduce_statistics()
    except Exception as err:
        record = error_record(err)
        record["unchanged"] = rank == 0 or torch.equal(kfac._g_sum[1].d, before)
        return record
    return {"unchanged": None}


def _refused_sum(rank: int) -> dict[str, Any]:
    """``all_reduce_sum`` refuses a gathered entry before any collective (no hang)."""
    from curvlab.optim.distributed import Communicator

    comm = Communicator(dist.group.WORLD, torch.device("cpu"))
    entry = NamedTensor("G U", torch.full((3, 2), float(rank)), reduction="gather")
    try:
        comm.all_reduce_sum([entry], "statistics")
    except ValueError as err:
        refused = str(err)
    gathered = comm.reduce_entries(
        [entry, NamedTensor("d", torch.full((3,), float(rank + 1)))], "statistics"
    )
    return {"refused": refused, "gathered": gathered, "collectives": dict(comm.collectives)}


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    init_gloo(rank, store_path, WORLD, timeout_s=60)
    results: dict[str, Any] = {}
    scenarios = {cfg.name: (lambda cfg=cfg: _reduce(cfg, rank)) for cfg in CONFIGS}
    scenarios.update({f"train-{d}": (lambda d=d: _train(d, rank)) for d in ("comm_opt", "mem_opt")})
    scenarios["failing-combination"] = lambda: _failing_combination(rank)
    scenarios["refused-sum"] = lambda: _refused_sum(rank)
    try:
        for name, run in scenarios.items():
            try:
                results[name] = run()
            except Exception as err:
                results[name] = error_record(err)
    finally:
        torch.save(results, result_path(out_dir, rank))
        dist.destroy_process_group()


# --- the tests ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict[str, Any]]:
    return spawn_and_collect(_worker, tmp_path_factory.mktemp("structured"), WORLD, TIMEOUT_S)


def _ok(runs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    results = [r[name] for r in runs]
    for rank, res in enumerate(results):
        assert "error" not in res, f"process {rank} failed in {name}:\n{res.get('traceback')}"
    return results


def _close(actual: Tensor, expected: Tensor, rtol: float = 1e-10) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-12)


def _single(cfg: Config, output: str, ranks: tuple[int, ...] = (0, 1)) -> curvlab.KFAC:
    """One process accumulating the batches of ``ranks``, in rank order."""
    model, head = _model(cfg.model)
    kfac = _kfac(model, head, cfg, output)
    for rank in ranks:
        for x, y in _batches(rank):
            kfac.update(x, y)
    return kfac


def _dense(parts: dict[str, Tensor]) -> Tensor:
    return torch.diag(parts["d"]) + (parts["U"] * parts["s"]) @ parts["U"].T


def _raw_g(kfac: curvlab.KFAC) -> Tensor:
    """The head's (the last layer's) unnormalised ``G`` sum as a matrix."""
    g = kfac._g_sum[-1]
    return g.to_dense() if isinstance(g, linalg.DiagonalPlusLowRank) else g


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_every_process_ends_with_the_same_factor(runs, cfg: Config) -> None:
    first, second = _ok(runs, cfg.name)
    for key in ("d", "U", "s"):
        assert torch.equal(first["reduced"][key], second["reduced"][key])
    assert torch.equal(first["dense"], second["dense"])
    sent = first["bytes"]["statistics"]
    assert sent > 0 and first["bytes"] == second["bytes"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_the_reduced_factors_are_those_of_one_process(runs, cfg: Config) -> None:
    """Dense factors and the structured diagonal: as one process on every batch. The
    structured low-rank part too while the processes' ranks fit (5 + 7 ≤ 16 columns)."""
    results = _ok(runs, cfg.name)
    single, dense = _single(cfg, "structured"), _single(cfg, "dense")
    head = single._structured.index(True)
    for res in results:
        assert res["num_samples"] == single.num_samples == sum(map(sum, ROWS))
        for k, ((a, g), f, exact) in enumerate(zip(res["factors"], single.factors(),
                                                  dense.factors())):  # fmt: skip
            _close(a, f.A)
            if k != head:
                _close(g, f.G)
                continue
            _close(torch.diagonal(g), torch.diagonal(exact.G))  # exact in every regime
            if cfg.rank == FITS:
                _close(g, f.G.to_dense())
                _close(g, exact.G)
        if cfg.rank == FITS:
            _close(res["dense"], single.to_dense())


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.rank == TRUNCATES], ids=lambda c: c.name)
def test_a_truncated_sum_is_the_documented_recompression(runs, cfg: Config) -> None:
    """Past the rank: ``d = Σ_p d_p + diag(L − L_r)`` and ``U S Uᵀ = L_r``, with
    ``L = Σ_p U_p S_p U_pᵀ`` and ``L_r`` its ``r`` eigenpairs of largest magnitude (float64
    eigh here); the distance to the exact factor of every batch is at most the processes'
    own truncation errors plus ``‖e_dropped(L)‖₂``."""
    results = _ok(runs, cfg.name)
    local = [res["local"] for res in results]
    low = sum((p["U"] * p["s"]) @ p["U"].T for p in local)
    e, v = torch.linalg.eigh(low)
    order = torch.argsort(e.abs(), descending=True)
    kept_idx, dropped = order[: cfg.rank], e[order[cfg.rank :]]
    kept = (v[:, kept_idx] * e[kept_idx]) @ v[:, kept_idx].T
    assert float(dropped.abs().max()) > 1e-6 * float(e.abs().max())  # something truncated
    reduced = results[0]["reduced"]
    _close(reduced["d"], sum(p["d"] for p in local) + torch.diagonal(low - kept), rtol=1e-9)
    _close((reduced["U"] * reduced["s"]) @ reduced["U"].T, kept, rtol=1e-9)
    exact = _raw_g(_single(cfg, "dense"))
    own = sum(
        torch.linalg.matrix_norm(_dense(p) - _raw_g(_single(cfg, "dense", (rank,))))
        for rank, p in enumerate(local)
    )
    error = torch.linalg.matrix_norm(_dense(reduced) - exact)
    bound = own + torch.linalg.vector_norm(dropped)
    assert float(error) <= float(bound) * (1 + 1e-9)
    _close(torch.diagonal(_dense(reduced)), torch.diagonal(exact))


@pytest.mark.parametrize("distribution", ["comm_opt", "mem_opt"])
def test_natural_gradient_with_a_structured_head_trains_like_one_process(
    runs, distribution: str
) -> None:
    results = _ok(runs, f"train-{distribution}")
    reference = _train(distribution, rank=None)
    for res in results:
        _close(res["G"], reference["G"], rtol=1e-8)
        for got, expected in zip(res["natural"], reference["natural"]):
            _close(got, expected, rtol=1e-8)
        _close(res["params"], reference["params"], rtol=1e-8)
    assert torch.equal(results[0]["params"], results[1]["params"])
    assert torch.equal(results[0]["G"], results[1]["G"])
    assert results[0]["bytes"]["statistics"] > 0


def test_a_recompression_that_fails_on_one_process_raises_on_every_process(runs) -> None:
    results = [r["failing-combination"] for r in runs]
    assert all("error" in res for res in results), results
    assert results[0]["error"] == results[1]["error"] == "LinAlgError"
    assert results[0]["message"] == results[1]["message"]
    assert "combining the statistics failed on process 1 of 2" in results[0]["message"]
    assert "injected" in results[0]["message"]
    assert results[1]["unchanged"]  # the failing process kept its own statistics


def test_the_communicator_gathers_in_rank_order_and_refuses_to_sum_a_gathered_entry(runs):
    for res in _ok(runs, "refused-sum"):
        assert "['G U'] are not summed (reduction 'gather')" in res["refused"]
        assert "reduce_entries" in res["refused"]
        U, d = res["gathered"]
        assert torch.equal(U, torch.arange(WORLD, dtype=U.dtype)[:, None, None].expand(WORLD, 3, 2))
        assert torch.equal(d, torch.full((3,), 3.0))
        assert res["collectives"]["statistics"] == 2  # one all-reduce, one all-gather


# --- in one process ---------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_statistic_sums_of_a_structured_factor_reduce_to_the_union(cfg: Config) -> None:
    """``reduce_locally`` (what the collectives compute) of two backends' statistic sums,
    loaded into a third: the dense parts and counters of the union; the structured factor as
    ``linalg.low_rank_sum`` of the two."""
    first, second = _single(cfg, "structured", (0,)), _single(cfg, "structured", (1,))
    target, union = _single(cfg, "structured", (1,)), _single(cfg, "structured")
    a, b = (
        DistributionInterface(first).statistic_sums(),
        DistributionInterface(second).statistic_sums(),
    )
    head = union._structured.index(True)
    label = union._layer_label(head)
    names = {e.name: e.reduction for e in a}
    assert names[f"{label} G diagonal"] == "sum"
    assert names[f"{label} G U"] == names[f"{label} G s"] == "gather"
    assert f"{label} G" not in names
    DistributionInterface(target).load_statistic_sums(reduce_locally([a, b]))
    assert target.num_samples == union.num_samples
    expected = linalg.low_rank_sum([first._g_sum[head], second._g_sum[head]], cfg.rank)
    assert all(torch.equal(x, y) for x, y in zip(target._g_sum[head], expected))
    for k, (got, ref) in enumerate(zip(target.factors(), union.factors())):
        _close(got.A, ref.A)
        if k != head:
            _close(got.G, ref.G)
        elif cfg.rank == FITS:
            _close(got.G.to_dense(), ref.G.to_dense())


def test_loading_structured_sums_checks_the_gathered_shapes() -> None:
    cfg = Config("mixed", "mean", TRUNCATES)
    kfac = _single(cfg, "structured", (0,))
    ops = DistributionInterface(kfac)
    sums = ops.statistic_sums()
    reduced = reduce_locally([sums, sums])
    at = [e.name for e in sums].index("layer '2' (Linear) G U")
    bad = list(reduced)
    bad[at] = reduced[at][0]  # not stacked
    with pytest.raises(ValueError, match=r"'layer '2' \(Linear\) G U' is gathered: it must have "
                       r"shape \(processes, 30, 4\), got \(30, 4\)"):  # fmt: skip
        ops.load_statistic_sums(bad)
    before = kfac._g_sum[1]
    bad[at] = reduced[at][:, :, :3]  # another rank
    with pytest.raises(ValueError, match="is gathered"):
        ops.load_statistic_sums(bad)
    assert kfac._g_sum[1] is before  # nothing loaded
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        NamedTensor("x", torch.ones(2), reduction="max")


def test_a_structured_value_without_a_declared_sum_is_refused() -> None:
    """A backend whose declaration gives no StructuredSum for a structured entry."""
    from curvlab.curvature.base import RunningSum

    cfg = Config("mixed", "mean", TRUNCATES)
    kfac = _single(cfg, "structured", (0,))
    plain = tuple(
        RunningSum(d.name, d.attr, symmetric=d.symmetric, label=d.label, legacy=d.legacy)
        if isinstance(d, RunningSum) and d.name == "G"
        else d
        for d in type(kfac).running_state
    )
    kfac.running_state = plain  # type: ignore[misc]
    with pytest.raises(NotImplementedError, match=r"layer '2' \(Linear\) G is a structured value "
                       r"\(DiagonalPlusLowRank\) and the sum 'G' declares no way"):  # fmt: skip
        DistributionInterface(kfac).statistic_sums()
