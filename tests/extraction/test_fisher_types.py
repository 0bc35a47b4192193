"""The typed seams of extraction: ``FisherType`` and the engine table (issue #24 item 3).

* every Fisher type parses from its string and from itself; unknown values are refused by
  the parser, every request and every backend constructor, naming the owner and the
  allowed values;
* each type's output columns (its :class:`~curvlab.extraction.fisher_types.ColumnRule`)
  against float64 ``torch.func`` references: the loss Hessian w.r.t. the outputs
  (``"exact"``), the loss gradient (``"empirical"``), the exact matrix in expectation
  (``"mc"``, statistical tolerance);
* a Fisher type defined here, outside the library (:meth:`FisherType.register`), used
  end to end by the backends through the hooks engine; BackPACK refuses it with a reason;
* an engine defined here, added with :func:`register_engine`: selected where it says it
  is preferred, refused with its own reason where it is unable, and removed afterwards;
* no library module branches on a Fisher type's name.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev

import curvlab
from curvlab.extraction import (
    ENGINE_TABLE,
    Batch,
    BatchResult,
    ColumnRule,
    FactorRows,
    FisherType,
    KroneckerStatistics,
    ParameterDiagonal,
    check_engine,
    choose_engine,
    engine_settings,
    register_engine,
    select_engine,
)
from curvlab.extraction.backpack_engine import BackpackEngine
from curvlab.extraction.fisher_types import FISHER_TYPES
from curvlab.extraction.hooks import HooksEngine
from curvlab.extraction.losses import batch_scale, output_matrix_sqrt
from tests.curvature.backend_info import BACKENDS, MLP_CE

DTYPE = torch.float64
UNKNOWN_VALUES = ["kfac", "EXACT", "Exact", "exact ", "", "ggn", None, 1]


# --- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize("member", list(FisherType), ids=str)
def test_every_member_parses_from_its_string_and_from_itself(member: FisherType) -> None:
    assert FisherType.parse(member.value, "Owner") is member
    assert FisherType.parse(member, "Owner") is member
    assert FisherType(member.value) is member
    assert member == member.value and str(member) == member.value and f"{member}" == member.value
    assert hash(member) == hash(member.value)  # dict keys by string or member alike
    assert member in FisherType.known() and member.value in FISHER_TYPES


def test_built_in_types_are_exactly_the_documented_three() -> None:
    assert FISHER_TYPES == ("exact", "mc", "empirical")
    assert FisherType.known() == tuple(FisherType)


@pytest.mark.parametrize("value", UNKNOWN_VALUES, ids=repr)
def test_parse_refuses_unknown_values_naming_owner_and_choices(value: object) -> None:
    expected = f"Owner: unknown fisher_type {value!r}; choose one of {list(FISHER_TYPES)}."
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        FisherType.parse(value, "Owner")


@pytest.mark.parametrize(
    ("allowed", "choices"),
    [
        (("exact", "mc"), ["exact", "mc"]),
        ((FisherType.EMPIRICAL,), ["empirical"]),
        (lambda t: t.true_fisher, ["exact", "mc"]),
        (lambda t: not t.sampled, ["exact", "empirical"]),
    ],
    ids=["values", "members", "true-fisher", "deterministic"],
)
def test_parse_refuses_known_types_outside_allowed(allowed, choices) -> None:
    for member in FisherType:
        if member.value in choices:
            assert FisherType.parse(member.value, "Owner", allowed) is member
            continue
        expected = f"Owner: unknown fisher_type {member.value!r}; choose one of {choices}."
        with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
            FisherType.parse(member, "Owner", allowed)


_REQUESTS = {
    "FactorRows": lambda t: FactorRows(t, ()),
    "ParameterDiagonal": lambda t: ParameterDiagonal(t, ()),
    "KroneckerStatistics": lambda t: KroneckerStatistics(t, ()),
}


@pytest.mark.parametrize("request_name", list(_REQUESTS))
@pytest.mark.parametrize("value", ["kfac", "EXACT", None], ids=repr)
def test_requests_refuse_unknown_types(request_name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{request_name}: unknown fisher_type {value!r};"):
        _REQUESTS[request_name](value)
    assert _REQUESTS[request_name]("mc").fisher_type is FisherType.MC  # converted once


def _backend_rows() -> list:
    """One row per backend of the contract table that takes ``fisher_type``."""
    seen: dict[str, object] = {}
    for info in BACKENDS:
        if info.fisher_types and info.name not in seen:
            seen[info.name] = info
    return list(seen.values())


BACKEND_ROWS = _backend_rows()


@pytest.mark.parametrize("info", BACKEND_ROWS, ids=lambda i: i.name)
@pytest.mark.parametrize("value", [*UNKNOWN_VALUES, *FISHER_TYPES], ids=repr)
def test_every_backend_refuses_unknown_types(info, value: object) -> None:
    """No backend computes a type it does not know (or does not take) as another one."""
    if value in info.fisher_types:
        curvature = info.build(MLP_CE, fisher_type=value)[0]
        assert curvature.fisher_type is FisherType(value)
        return
    owner = info.cls.__name__
    expected = f"{owner}: unknown fisher_type {value!r}; choose one of {list(info.fisher_types)}."
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        info.build(MLP_CE, fisher_type=value)


def test_backends_without_the_argument_are_listed() -> None:
    """The rows skipped above have no ``fisher_type`` argument at all."""
    skipped = {i.name for i in BACKENDS} - {i.name for i in BACKEND_ROWS}
    assert skipped == {"empirical_fisher"}
    for info in BACKENDS:
        assert info.accepts("fisher_type") == (info.name not in skipped)


@pytest.mark.parametrize("value", UNKNOWN_VALUES, ids=repr)
def test_matrix_free_ggn_refuses_unknown_types(value: object) -> None:
    model, loss_fn = MLP_CE.build()
    with pytest.raises(ValueError, match=rf"^MatrixFreeGGN: unknown fisher_type {value!r};"):
        curvlab.MatrixFreeGGN(model, loss_fn, fisher_type=value)


# --- the column rules against float64 references ---------------------------------------

N, C = 5, 4


def _loss_case(name: str) -> tuple[nn.Module, Tensor, Tensor]:
    """``(loss_fn, outputs [N, C], targets)`` in float64, seeded."""
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(N, C, generator=gen, dtype=DTYPE)
    kind, reduction, *rest = name.split("-")
    if kind == "mse":
        return nn.MSELoss(reduction=reduction), f, torch.randn(N, C, generator=gen, dtype=DTYPE)
    if kind == "bce":
        return (
            nn.BCEWithLogitsLoss(reduction=reduction),
            f,
            torch.rand(N, C, generator=gen).to(DTYPE),
        )
    y = torch.randint(0, C, (N,), generator=gen)
    if not rest:
        return nn.CrossEntropyLoss(reduction=reduction), f, y
    # rows 1 and 3 are ignored: the default ignore_index (-100), or a class index (2)
    ignore = -100 if rest == ["ignore"] else 2
    y = torch.where(y == 2, 0, y) if ignore == 2 else y
    y[1] = y[3] = ignore
    return nn.CrossEntropyLoss(reduction=reduction, ignore_index=ignore), f, y


LOSS_CASES = [
    "mse-mean",
    "mse-sum",
    "ce-mean",
    "ce-sum",
    "ce-mean-ignore",
    "ce-sum-ignore2",
    "bce-mean",
    "bce-sum",
]


def _row_blocks(columns: Tensor) -> Tensor:
    """``Σ_k u_k[n] u_k[n]ᵀ`` per row: ``[N, C, C]`` from columns ``[K, N, C]``."""
    return torch.einsum("kna,knb->nab", columns, columns)


def _columns(fisher_type: FisherType, name: str, mc_samples: int = 1) -> tuple[Tensor, ...]:
    loss_fn, f, y = _loss_case(name)
    scale = batch_scale(loss_fn, f, y)
    return fisher_type.columns(loss_fn, f, y, scale, mc_samples), loss_fn, f, y


def _output_hessian_blocks(loss_fn: nn.Module, f: Tensor, y: Tensor) -> Tensor:
    """The reduced loss's Hessian w.r.t. the outputs, ``[N, C, C]`` per row; asserts that
    rows do not couple (the blocks off the diagonal vanish)."""
    h = hessian(lambda out: loss_fn(out, y))(f)  # [N, C, N, C]
    rows = torch.arange(N)
    blocks = h[rows, :, rows, :]
    off = h.clone()
    off[rows, :, rows, :] = 0
    assert off.abs().max() == 0
    return blocks


@pytest.mark.parametrize("name", LOSS_CASES)
def test_exact_columns_square_to_the_output_hessian(name: str) -> None:
    cols, loss_fn, f, y = _columns(FisherType.EXACT, name)
    assert cols.dtype == DTYPE and cols.shape == (C, N, C)
    reference = _output_hessian_blocks(loss_fn, f, y)
    torch.testing.assert_close(_row_blocks(cols), reference, rtol=1e-12, atol=1e-14)
    if "ignore" in name:
        assert reference[[1, 3]].abs().max() == 0 and cols[:, [1, 3]].abs().max() == 0


@pytest.mark.parametrize("name", LOSS_CASES)
def test_empirical_columns_are_the_output_gradient(name: str) -> None:
    """``Σ u uᵀ = R ∇ℓ_n ∇ℓ_nᵀ`` with ``g = ∇_f L = R ∇ℓ_n``: ``g gᵀ / R``."""
    cols, loss_fn, f, y = _columns(FisherType.EMPIRICAL, name)
    assert cols.shape == (1, N, C)
    g = grad(lambda out: loss_fn(out, y))(f)  # [N, C]
    inv_reduction = batch_scale(loss_fn, f, y).inv_reduction
    reference = torch.einsum("na,nb->nab", g, g) * inv_reduction
    torch.testing.assert_close(_row_blocks(cols), reference, rtol=1e-12, atol=1e-14)
    # the column itself is ±g·sqrt(1/R) (the sign is the engines' to choose)
    torch.testing.assert_close(cols[0].abs(), (g * math.sqrt(inv_reduction)).abs())


@pytest.mark.parametrize("name", LOSS_CASES)
def test_mc_columns_approach_the_exact_matrix_in_expectation(name: str) -> None:
    draws = 20_000
    torch.manual_seed(0)
    cols, loss_fn, f, y = _columns(FisherType.MC, name, mc_samples=draws)
    assert cols.shape == (draws, N, C)
    exact = _output_hessian_blocks(loss_fn, f, y)
    # each draw's term M·u_m u_mᵀ; their mean is Σ_m u_m u_mᵀ
    terms = draws * torch.einsum("mna,mnb->mnab", cols, cols)
    mean = terms.mean(dim=0)
    torch.testing.assert_close(mean, _row_blocks(cols), rtol=1e-10, atol=1e-14)
    standard_error = terms.std(dim=0) / math.sqrt(draws)
    assert ((mean - exact).abs() <= 5 * standard_error + 1e-12).all()
    assert float((mean - exact).norm() / exact.norm()) < 0.05
    if "ignore" in name:
        assert cols[:, [1, 3]].abs().max() == 0


@pytest.mark.parametrize("mc_samples", [1, 7])
def test_rule_flags_match_what_the_columns_are(mc_samples: int) -> None:
    assert [t.sampled for t in FisherType] == [False, True, False]
    assert [t.exact_output_matrix for t in FisherType] == [True, False, False]
    assert [t.true_fisher for t in FisherType] == [True, True, False]
    assert [t.uncorrelated_rows for t in FisherType] == [False, True, False]
    assert [t.draws(mc_samples) for t in FisherType] == [1, mc_samples, 1]
    for t in FisherType:
        cols, *_ = _columns(t, "ce-mean", mc_samples)
        assert cols.shape[0] == {"exact": C, "mc": mc_samples, "empirical": 1}[t.value]


# --- a Fisher type defined outside the library ------------------------------------------


def _diagonal_output_columns(
    loss_fn: nn.Module, f: Tensor, targets: Tensor, r: float, mc_samples: int
) -> Tensor:
    """Columns ``√(r·d_c) e_c`` with ``d`` the diagonal of the exact output matrix: the
    Fisher with each row's output matrix replaced by its diagonal (``[C, N, C]``)."""
    d = output_matrix_sqrt(loss_fn, f).square().sum(dim=0)  # [N, C]
    return torch.diag_embed((d * r).sqrt()).permute(1, 0, 2)


DIAGONAL_OUTPUT = ColumnRule(
    _diagonal_output_columns, sampled=False, exact=False, true_fisher=False
)


@pytest.fixture
def diagonal_output() -> Iterator[FisherType]:
    """The type ``"diagonal_output"``, registered for one test and removed afterwards."""
    fisher_type = FisherType.register("diagonal_output", DIAGONAL_OUTPUT)
    try:
        yield fisher_type
    finally:
        FisherType.unregister("diagonal_output")
    with pytest.raises(ValueError, match="unknown fisher_type 'diagonal_output'"):
        FisherType.parse("diagonal_output", "Owner")


def test_registered_type_parses_and_pickles(diagonal_output: FisherType) -> None:
    import copy
    import pickle

    assert FisherType("diagonal_output") is diagonal_output
    assert FisherType.parse("diagonal_output", "Owner") is diagonal_output
    assert isinstance(diagonal_output, FisherType) and diagonal_output == "diagonal_output"
    assert pickle.loads(pickle.dumps(diagonal_output)) is diagonal_output
    assert copy.deepcopy(diagonal_output) is diagonal_output
    assert FisherType.known()[-1] is diagonal_output
    assert list(FisherType) == [FisherType.EXACT, FisherType.MC, FisherType.EMPIRICAL]
    expected = "['exact', 'mc', 'empirical', 'diagonal_output']"
    with pytest.raises(ValueError, match=re.escape(f"choose one of {expected}")):
        FisherType.parse("kfac", "Owner")


def test_register_refuses_taken_values_and_non_rules() -> None:
    with pytest.raises(ValueError, match="a Fisher type 'exact' already exists"):
        FisherType.register("exact", DIAGONAL_OUTPUT)
    with pytest.raises(ValueError, match="value must be a non-empty str"):
        FisherType.register("", DIAGONAL_OUTPUT)
    with pytest.raises(TypeError, match="rule must be a ColumnRule, got function"):
        FisherType.register("diagonal_output", _diagonal_output_columns)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'mc' is not a registered Fisher type"):
        FisherType.unregister("mc")
    with pytest.raises(ValueError, match="'diagonal_output' is not a registered Fisher type"):
        FisherType.unregister("diagonal_output")
    assert FisherType.known() == tuple(FisherType)


def _model_and_data(loss: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
    x = torch.randn(6, 5, dtype=DTYPE)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (6,))
    return model, nn.MSELoss(reduction="sum"), x, torch.randn(6, 3, dtype=DTYPE)


def _diagonal_output_fisher(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``Σ_n J_nᵀ diag(H_nn) J_n``, ``H`` the reduced loss's Hessian w.r.t. the outputs and
    ``J_n`` ``[C, P]`` row ``n``'s Jacobian: ``[P, P]`` (float64, torch.func)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    f = model(x).detach()
    jac = jacrev(lambda ps: functional_call(model, ps, (x,)))(params)
    J = torch.cat([jac[n].reshape(*f.shape, -1) for n in names], dim=-1)  # [N, C, P]
    h = hessian(lambda out: loss_fn(out, y))(f)
    rows = torch.arange(f.shape[0])
    d = torch.diagonal(h[rows, :, rows, :], dim1=-2, dim2=-1)  # [N, C]
    return torch.einsum("ncp,nc,ncq->pq", J, d, J)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_registered_type_end_to_end_through_the_hooks_engine(
    diagonal_output: FisherType, loss: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dense, diagonal, matrix-free and Kronecker backends take the new type unchanged, and
    ``engine="auto"`` never hands it to BackPACK."""

    def no_backpack(self, batch):  # type: ignore[no-untyped-def]
        raise AssertionError("BackPACK ran a Fisher type it has no extension for")

    monkeypatch.setattr(BackpackEngine, "run", no_backpack)
    model, loss_fn, x, y = _model_and_data(loss)
    reference = _diagonal_output_fisher(model, loss_fn, x, y)

    blocks = curvlab.BlockDiagonal(model, loss_fn, fisher_type="diagonal_output")
    diagonal = curvlab.DiagonalFisher(model, loss_fn, fisher_type="diagonal_output")
    matrix_free = curvlab.MatrixFreeGGN(model, loss_fn, fisher_type="diagonal_output")
    assert blocks.fisher_type is diagonal_output
    assert choose_engine(model, blocks.requests(), "auto") == "hooks"
    for c in (blocks, diagonal, matrix_free):
        c.update(x, y)
    sizes = [sum(p.numel() for p in layer.params) for layer in blocks.layers]
    mask = torch.block_diag(*[torch.ones(s, s, dtype=torch.bool) for s in sizes])
    tol = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(blocks.to_dense(), reference * mask, **tol)
    torch.testing.assert_close(diagonal.diagonal(), reference.diagonal(), **tol)
    torch.testing.assert_close(matrix_free.to_dense(), reference, **tol)
    # it is a different matrix from the exact Fisher wherever the output matrix is not
    # diagonal (cross-entropy), and the same where it is (MSE: 2·I)
    exact = curvlab.ExactFisher(model, loss_fn, fisher_type="exact", engine="hooks")
    exact.update(x, y)
    differs = float((exact.to_dense() - reference).norm() / reference.norm())
    assert differs > 1e-2 if loss == "ce" else differs < 1e-12
    # Kronecker statistics from the hooks engine: on MSE the same as the exact type's
    kfac = curvlab.KFAC(model, loss_fn, fisher_type="diagonal_output")
    kfac_exact = curvlab.KFAC(model, loss_fn, fisher_type="exact", engine="hooks")
    kfac.update(x, y)
    kfac_exact.update(x, y)
    gap = float((kfac.to_dense() - kfac_exact.to_dense()).norm() / kfac_exact.to_dense().norm())
    assert gap > 1e-2 if loss == "ce" else gap < 1e-12


def test_exact_fisher_takes_true_fisher_types_only(diagonal_output: FisherType) -> None:
    """``ExactFisher`` is the true Fisher or an estimate of it; a registered type that is
    neither is refused like ``"empirical"``."""
    model, loss_fn, _, _ = _model_and_data("ce")
    for value in ("empirical", "diagonal_output"):
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"ExactFisher: unknown fisher_type {value!r}; choose one of ['exact', 'mc']"
            ),
        ):
            curvlab.ExactFisher(model, loss_fn, fisher_type=value)
    true_rule = ColumnRule(_diagonal_output_columns, sampled=False, exact=False, true_fisher=True)
    FisherType.register("true_probe", true_rule)
    try:
        assert (
            curvlab.ExactFisher(model, loss_fn, fisher_type="true_probe").fisher_type
            == "true_probe"
        )
    finally:
        FisherType.unregister("true_probe")


def test_backpack_refuses_a_type_missing_from_its_table(diagonal_output: FisherType) -> None:
    model, loss_fn, x, y = _model_and_data("ce")
    reason = "BackPACK has no extension for the 'diagonal_output' Fisher type"
    with pytest.raises(
        ValueError, match=re.escape(f"engine='backpack' cannot serve this model: {reason}")
    ):
        curvlab.BlockDiagonal(model, loss_fn, fisher_type="diagonal_output", engine="backpack")
    with pytest.raises(ValueError, match=re.escape(reason)):
        curvlab.KFAC(model, loss_fn, fisher_type="diagonal_output", engine="backpack")
    # the control: BackPACK serves (and is preferred for) the built-in types on this model
    for t in FisherType:
        assert (
            choose_engine(model, [FactorRows(t, tuple(model.parameters()))], "auto") == "backpack"
        )
    forced_hooks = curvlab.BlockDiagonal(
        model, loss_fn, fisher_type="diagonal_output", engine="hooks"
    )
    auto = curvlab.BlockDiagonal(model, loss_fn, fisher_type="diagonal_output")
    for c in (forced_hooks, auto):
        c.update(x, y)
    torch.testing.assert_close(auto.to_dense(), forced_hooks.to_dense(), rtol=0, atol=0)


# --- an engine defined outside the library ----------------------------------------------


class ProbeEngine:
    """A test engine: the hooks engine's numbers, for ``MSELoss`` only, counting its runs."""

    name = "probe"
    reason = "the probe engine serves MSELoss only"

    def __init__(self, prefer: bool) -> None:
        self.prefer = prefer
        self.runs = 0

    def unable_reason(self, batch: Batch) -> str | None:
        return None if isinstance(batch.loss_fn, nn.MSELoss) else self.reason

    def preferred(self, batch: Batch) -> bool:
        return self.prefer

    def run(self, batch: Batch) -> tuple[Tensor, BatchResult]:
        self.runs += 1
        return HooksEngine().run(batch)


class CustomForward(nn.Module):
    """Two layers with a ``forward`` of their own: BackPACK cannot serve it."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 4)
        self.second = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(torch.tanh(self.first(x)))


@pytest.fixture
def engine_table() -> Iterator[dict]:
    """The engine table, restored after the test whatever it registered."""
    saved = dict(ENGINE_TABLE)
    try:
        yield ENGINE_TABLE
    finally:
        ENGINE_TABLE.clear()
        ENGINE_TABLE.update(saved)
    assert engine_settings() == ("auto", "hooks", "backpack")


def _custom_data(loss: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = CustomForward().to(DTYPE)
    x = torch.randn(6, 5, dtype=DTYPE)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (6,))
    return model, nn.MSELoss(), x, torch.randn(6, 3, dtype=DTYPE)


@pytest.mark.parametrize("prefer", [True, False], ids=["preferred", "not-preferred"])
def test_registered_engine_is_chosen_where_preferred(engine_table, prefer: bool) -> None:
    probe = register_engine(ProbeEngine(prefer))
    assert engine_table["probe"] is probe and engine_settings()[-1] == "probe"
    model, loss_fn, x, y = _custom_data("mse")
    c = curvlab.BlockDiagonal(model, loss_fn)
    assert choose_engine(model, c.requests(), "auto", loss_fn=loss_fn) == (
        "probe" if prefer else "hooks"
    )
    c.update(x, y)
    assert probe.runs == (1 if prefer else 0)
    forced = curvlab.BlockDiagonal(model, loss_fn, engine="probe")  # a setting like the others
    forced.update(x, y)
    assert probe.runs == (2 if prefer else 1)
    reference = curvlab.BlockDiagonal(model, loss_fn, engine="hooks")
    reference.update(x, y)
    torch.testing.assert_close(c.to_dense(), reference.to_dense(), rtol=0, atol=0)
    torch.testing.assert_close(forced.to_dense(), reference.to_dense(), rtol=0, atol=0)


def test_registered_engine_refuses_with_its_own_reason(engine_table) -> None:
    probe = register_engine(ProbeEngine(prefer=True))
    model, loss_fn, x, y = _custom_data("ce")
    expected = f"engine='probe' cannot serve this model: {ProbeEngine.reason}."
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        curvlab.BlockDiagonal(model, loss_fn, engine="probe")
    # "auto" passes it by (and says why when no engine can serve a batch)
    c = curvlab.BlockDiagonal(model, loss_fn)
    assert choose_engine(model, c.requests(), "auto", loss_fn=loss_fn) == "hooks"
    c.update(x, y)
    assert probe.runs == 0
    batch = Batch(model, loss_fn, tuple(c.requests()))
    engine_table.pop("hooks")
    with pytest.raises(ValueError, match=re.escape(f"probe: {ProbeEngine.reason}")) as err:
        select_engine(batch, "auto")
    assert "backpack: module '<model>' (CustomForward) is a custom container" in str(err.value)


def test_first_preferred_engine_in_table_order_wins(engine_table) -> None:
    """BackPACK (earlier in the table) is preferred for dense factor rows of a plain
    ``nn.Sequential``; a later engine that is also preferred does not replace it."""
    probe = register_engine(ProbeEngine(prefer=True))
    model, loss_fn, x, y = _model_and_data("mse")
    c = curvlab.BlockDiagonal(model, loss_fn)
    assert choose_engine(model, c.requests(), "auto", loss_fn=loss_fn) == "backpack"
    c.update(x, y)
    assert probe.runs == 0


def test_register_engine_refuses_bad_engines(engine_table) -> None:
    with pytest.raises(ValueError, match="an engine needs a name other than 'auto', got 'auto'"):
        register_engine(type("Auto", (ProbeEngine,), {"name": "auto"})(prefer=False))
    with pytest.raises(ValueError, match="an engine named 'hooks' is already registered"):
        register_engine(HooksEngine())

    class NoRun:
        name = "norun"

        def unable_reason(self, batch: Batch) -> str | None:
            return None

        def preferred(self, batch: Batch) -> bool:
            return False

    with pytest.raises(TypeError, match=r"engine 'norun' has no method run\(\)"):
        register_engine(NoRun())  # type: ignore[arg-type]
    assert set(engine_table) == {"hooks", "backpack"}


def test_unregistered_engine_names_are_refused() -> None:
    """Nothing registered by another test is left in the table."""
    assert engine_settings() == ("auto", "hooks", "backpack")
    with pytest.raises(ValueError, match=re.escape("X: unknown engine 'probe'; choose one of")):
        check_engine("probe", "X")


# --- no library module branches on a Fisher type's name -----------------------------------

LIBRARY = Path(curvlab.__file__).parent


def _names_a_fisher_type(node: ast.expr) -> bool:
    """``"exact"``-like constants (alone or in a tuple/list/set) or ``FisherType.X``."""
    if isinstance(node, ast.Constant):
        return node.value in FISHER_TYPES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_a_fisher_type(e) for e in node.elts)
    return (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "FisherType"
    )


def _fisher_type_comparisons(source: str, label: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        text = ast.get_source_segment(source, node) or ""
        if any(_names_a_fisher_type(o) for o in operands) and "fisher" in text.lower():
            found.append(f"{label}:{node.lineno}: {text}")
    return found


def test_the_scan_sees_comparisons_of_fisher_type_names() -> None:
    source = (
        'if self.fisher_type == "mc": pass\n'
        "if t is FisherType.EMPIRICAL: pass\n"
        'if fisher_type in ("exact", "mc"): pass\n'
        'if damping_mode == "exact": pass\n'  # another setting's "exact"
    )
    assert [hit.split(":")[1] for hit in _fisher_type_comparisons(source, "x")] == ["1", "2", "3"]


def test_no_library_module_compares_fisher_type_names() -> None:
    """The type's rule is asked, never its name (the enum's own module aside)."""
    modules = [p for p in LIBRARY.rglob("*.py") if p.name != "fisher_types.py"]
    assert len(modules) > 50
    found = [
        hit
        for p in modules
        for hit in _fisher_type_comparisons(p.read_text(), str(p.relative_to(LIBRARY.parent)))
    ]
    assert found == []
