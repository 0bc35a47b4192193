"""The backend table of the contract tests, in the style of torch.optim's ``OptimizerInfo``.

One :class:`BackendInfo` per backend configuration (``BACKENDS``): registry name,
constructor kwargs and the capability flags the contract tests branch on.
:func:`error_inputs` lists, per row, bad inputs with the exception they must raise and a
regex the message must match — the argument, module or shape at fault (torch.optim's
``optim_error_inputs_func``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import curvlab
from curvlab import registry
from tests.cases import CASES, Case

ALL_FISHER_TYPES = ("exact", "mc", "empirical")
MLP_ONLY = frozenset({"mlp", "mlp_nobias"})


@dataclass(frozen=True)
class BackendInfo:
    """One backend configuration and what the contract may assume of it.

    Attributes:
        name: registry name (``curvlab.make(name, ...)``).
        kwargs: constructor keyword arguments.
        fisher_types: the ``fisher_type`` values its constructor accepts (``()``: it has
            no such argument).
        deterministic: two updates on the same batch give the same curvature (no
            Monte-Carlo labels).
        additive_statistics: the state of the union of two batch sets is the sum of their
            states (EKFAC's diagonal lives in the eigenbasis of its first batch, so it is
            additive only for a fixed basis; test_ekfac.py checks that).
        tikhonov_solve: ``solve(v, λ)`` is ``(C + λI)⁻¹ v``; ``False`` for the
            block-tridiagonal completions of the damped blocks, a documented damped
            inverse of their own (test_block_tridiagonal.py, test_kfac_tridiagonal.py).
        supports: the model families of ``tests.cases`` it covers (``None``: all).
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    fisher_types: tuple[str, ...] = ALL_FISHER_TYPES
    deterministic: bool = True
    additive_statistics: bool = True
    tikhonov_solve: bool = True
    supports: frozenset[str] | None = None

    @property
    def id(self) -> str:
        return self.name + "".join(f"-{v}" for v in self.kwargs.values())

    @property
    def cls(self) -> type[curvlab.Curvature]:
        return registry.get(self.name)

    def supports_case(self, case: Case) -> bool:
        return self.supports is None or case.model.name in self.supports

    def build(self, case: Case, seed: int = 0, **overrides: Any):  # type: ignore[no-untyped-def]
        """``(curvature, model, loss_fn)`` for ``case``; ``overrides`` replace kwargs."""
        model, loss_fn = case.build(seed)
        return _make(self, model, loss_fn, **overrides), model, loss_fn

    def accepts(self, argument: str) -> bool:
        """Whether the backend's constructor takes ``argument``."""
        return argument in inspect.signature(self.cls.__init__).parameters


_DENSE_FULL = ("exact", "mc")  # ExactFisher: the true Fisher and its Monte-Carlo estimate

BACKENDS: list[BackendInfo] = [
    BackendInfo("exact_fisher", fisher_types=_DENSE_FULL),
    BackendInfo(
        "exact_fisher",
        {"fisher_type": "mc", "mc_samples": 3},
        fisher_types=_DENSE_FULL,
        deterministic=False,
    ),
    BackendInfo("empirical_fisher", fisher_types=()),
    BackendInfo("block_diagonal"),
    BackendInfo("block_diagonal", {"fisher_type": "mc", "mc_samples": 2}, deterministic=False),
    BackendInfo("block_diagonal", {"fisher_type": "empirical"}),
    BackendInfo("kfac", {"fisher_type": "exact"}),  # convolutions: diagonal blocks
    BackendInfo(
        "kfac", {"fisher_type": "mc", "mc_samples": 2}, deterministic=False, supports=MLP_ONLY
    ),
    BackendInfo("diagonal"),
    BackendInfo("diagonal", {"fisher_type": "mc", "mc_samples": 2}, deterministic=False),
    BackendInfo("diagonal", {"fisher_type": "empirical"}),
    BackendInfo("kfc", {"fisher_type": "empirical"}),
    BackendInfo("kfc", {"fisher_type": "exact", "kfac_approx": "reduce"}),
    BackendInfo("kfc", {"fisher_type": "mc"}, deterministic=False),
    BackendInfo("block_tridiagonal", tikhonov_solve=False),
    BackendInfo("block_tridiagonal", {"fisher_type": "empirical"}, tikhonov_solve=False),
    BackendInfo(
        "kfac",
        {"fisher_type": "exact", "structure": "block_tridiagonal"},
        tikhonov_solve=False,
        supports=MLP_ONLY,
    ),
    BackendInfo(
        "kfc",
        {"fisher_type": "mc", "structure": "block_tridiagonal"},
        deterministic=False,
        tikhonov_solve=False,
    ),
    BackendInfo("ekfac", {"fisher_type": "exact"}, additive_statistics=False),
    BackendInfo(
        "ekfac", {"fisher_type": "empirical", "kfac_approx": "reduce"}, additive_statistics=False
    ),
]


# --- error inputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorInput:
    """``call()`` must raise ``error`` with a message matching ``match`` (``re.search``)."""

    description: str
    call: Callable[[], object]
    error: type[Exception]
    match: str


_CASE = {c.id: c for c in CASES}
MLP_CE = _CASE["mlp-ce-mean"]  # Linear(5, 4) -> Tanh -> Linear(4, 3): params 0.weight .. 2.bias
MLP_MSE = _CASE["mlp-mse-mean"]
UNSUPPORTED_LOSSES: list[tuple[nn.Module, str]] = [
    (nn.NLLLoss(), "Unsupported loss function NLLLoss.*CrossEntropyLoss, MSELoss"),
    (nn.CrossEntropyLoss(reduction="none"), "reduction='none'"),
    (nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing"),
    (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), "pos_weight"),
    (nn.CrossEntropyLoss(weight=torch.ones(3)), "weights"),
]


def _make(info: BackendInfo, model: nn.Module, loss_fn: nn.Module, **overrides: Any) -> Any:
    return curvlab.make(info.name, model, loss_fn, **{**info.kwargs, **overrides})


def _fresh(info: BackendInfo, **overrides: Any) -> curvlab.Curvature:
    return info.build(MLP_CE, **overrides)[0]


def _ready(info: BackendInfo) -> curvlab.Curvature:
    c = _fresh(info)
    c.update(*MLP_CE.data(n=4))
    return c


def _zeros(c: curvlab.Curvature) -> list[torch.Tensor]:
    return [torch.zeros_like(p) for p in c.params]


def _update_with_nan_input(info: BackendInfo) -> None:
    x, y = MLP_CE.data(n=4)
    x[0, 0] = float("nan")
    _fresh(info).update(x, y)


def _update_with_nan_target(info: BackendInfo) -> None:
    c, _, _ = info.build(MLP_MSE)
    x, y = MLP_MSE.data(n=4)
    y[1, 2] = float("inf")
    c.update(x, y)


def _foreign_state(info: BackendInfo) -> dict[str, Any]:
    other = "diagonal" if info.name != "diagonal" else "exact_fisher"
    model, loss_fn = MLP_CE.build()
    c = curvlab.make(other, model, loss_fn)
    c.update(*MLP_CE.data(n=4))
    return c.state_dict()


def error_inputs(info: BackendInfo) -> list[ErrorInput]:
    """Bad inputs for ``info``'s backend, each with its exception and message pattern."""
    # messages name the registered class (option checks) or the class make() builds from
    # it (e.g. KFAC(structure="block_tridiagonal") builds a BlockTridiagonalKFAC)
    owner = f"(?:{info.cls.__name__}|{type(_fresh(info)).__name__})"
    x, y = MLP_CE.data(n=4)
    out: list[ErrorInput] = []

    def add(description: str, call: Callable[[], object], error: type[Exception], match: str):
        out.append(ErrorInput(description, call, error, match))

    # --- constructor arguments
    if info.fisher_types:
        bad = next((t for t in ALL_FISHER_TYPES if t not in info.fisher_types), "kfac")
        add(
            f"fisher_type={bad!r}",
            lambda: _fresh(info, fisher_type=bad),
            ValueError,
            rf"{owner}: unknown fisher_type '{bad}'; choose one of",
        )
    if info.kwargs.get("fisher_type") == "mc":
        for value in (0, 1.5, True):
            add(
                f"mc_samples={value!r}",
                lambda value=value: _fresh(info, mc_samples=value),
                ValueError,
                rf"{owner}: mc_samples must be a positive integer, got {value!r}",
            )
    for argument in ("kfac_approx", "damping_mode", "structure"):
        if info.accepts(argument):
            add(
                f"{argument}='bogus'",
                lambda argument=argument: _fresh(info, **{argument: "bogus"}),
                ValueError,
                rf"{owner}: (unknown {argument} 'bogus'; choose one of"
                rf"|.*{argument}='bogus' is not)",
            )
    if info.kwargs.get("structure") == "block_tridiagonal":
        add(
            "damping_mode='exact' with the block-tridiagonal structure",
            lambda: _fresh(info, damping_mode="exact"),
            ValueError,
            rf"{owner}: structure='block_tridiagonal' uses factored damping",
        )
        add(
            "separate_bias with the block-tridiagonal structure",
            lambda: _fresh(info, separate_bias=True),
            ValueError,
            rf"{owner}: separate_bias=True is defined for the block-diagonal structure only",
        )
    if info.accepts("refit_every"):
        add(
            "refit_every=0",
            lambda: _fresh(info, refit_every=0),
            ValueError,
            rf"{owner}: refit_every must be a positive int or None, got 0",
        )
    add(
        "engine='gpu'",
        lambda: _fresh(info, engine="gpu"),
        ValueError,
        rf"{owner}: unknown engine 'gpu'; choose one of \['auto', 'hooks', 'backpack'\]",
    )
    add(
        "engine='backpack' on a LayerNorm",
        lambda: _make(
            info,
            nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)),
            nn.MSELoss(),
            engine="backpack",
        ),
        ValueError,
        r"engine='backpack' cannot serve this model: module '1' \(LayerNorm\)",
    )
    for loss_fn, match in UNSUPPORTED_LOSSES:
        add(
            f"loss {loss_fn!r}",
            lambda loss_fn=loss_fn: _make(info, MLP_CE.build()[0], loss_fn),
            ValueError,
            match,
        )
    add(
        "a model without parameters",
        lambda: _make(info, nn.Sequential(nn.Tanh()), nn.MSELoss()),
        ValueError,
        rf"{owner}: (the model has no trainable parameters|no layer selected)",
    )

    # --- batches
    add(
        "targets that are not class indices",
        lambda: _fresh(info).update(x, torch.zeros(4, 3)),
        ValueError,
        r"CrossEntropyLoss: targets must be class indices of shape \[4\]",
    )
    add(
        "float class indices",
        lambda: _fresh(info).update(x, torch.zeros(4, dtype=torch.float64)),
        ValueError,
        r"\(int64\), got shape \(4,\) and dtype torch.float64",
    )
    add(
        "a class index out of range",
        lambda: _fresh(info).update(x, torch.tensor([0, 1, 7, 2])),
        ValueError,
        r"CrossEntropyLoss: targets must be class indices in \[0, 3\).*the first is 7",
    )
    add(
        "regression targets of the wrong shape",
        lambda: info.build(MLP_MSE)[0].update(MLP_MSE.data(n=4)[0], torch.zeros(4, 2)),
        ValueError,
        r"MSELoss: targets must have the output's shape \(4, 3\), got \(4, 2\)",
    )
    add(
        "targets that do not match an output with extra axes",
        lambda: _make(info, nn.Linear(5, 3).double(), nn.CrossEntropyLoss()).update(
            torch.randn(4, 3, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
        ),
        ValueError,
        r"CrossEntropyLoss: an output of shape \(4, 3, 3\) \(classes on dimension 1, one row "
        r"per position\) needs class-index targets of shape \(4, 3\), got \(4,\)",
    )
    add(
        "an empty batch",
        lambda: _fresh(info).update(x[:0], y[:0]),
        ValueError,
        r"CrossEntropyLoss: the batch is empty \(0 rows\)",
    )
    add(
        "a non-finite input (loss)",
        lambda: _update_with_nan_input(info),
        FloatingPointError,
        "loss is not finite",
    )
    add(
        "a non-finite target (loss)",
        lambda: _update_with_nan_target(info),
        FloatingPointError,
        "loss is not finite",
    )
    add(
        "a tensor batch without targets",
        lambda: _fresh(info).update(x),
        TypeError,
        rf"{owner}.update: pass targets with a tensor batch",
    )
    add(
        "a data set whose batch is not a pair",
        lambda: _fresh(info).update([x], progress=False),
        ValueError,
        rf"{owner}.update: batch 0 of the data set is not an \(inputs, targets\) pair",
    )

    # --- use before update
    for op, call in (
        ("matvec", lambda: (c := _fresh(info)).matvec(_zeros(c))),
        ("solve", lambda: (c := _fresh(info)).solve(_zeros(c), 0.1)),
        ("to_dense", lambda: _fresh(info).to_dense()),
        ("trace", lambda: _fresh(info).trace()),
    ):
        add(
            f"{op} before update",
            call,
            RuntimeError,
            rf"{owner}.{op}: no curvature accumulated yet",
        )
    add(
        "accumulate without a loss",
        lambda: _fresh(info).accumulate(),
        TypeError,
        rf"{owner}.accumulate: pass the loss",
    )

    # --- vectors and damping
    def vector_op(op: str, make: Callable[[list[torch.Tensor]], object]) -> Callable[[], object]:
        def call() -> object:
            c = _ready(info)
            v = make(_zeros(c))
            return c.matvec(v) if op == "matvec" else c.solve(v, 0.1)

        return call

    for op in ("matvec", "solve"):
        add(
            f"{op} of too few tensors",
            vector_op(op, lambda v: v[:3]),
            ValueError,
            rf"{owner}.{op}: expected 4 tensors \(one per parameter\), got 3",
        )
        add(
            f"{op} of a wrongly shaped entry",
            vector_op(op, lambda v: [v[0], torch.zeros(5), *v[2:]]),
            ValueError,
            rf"{owner}.{op}: entry for '0.bias' must have shape \(4,\), got \(5,\)",
        )
        add(
            f"{op} of a flat tensor",
            vector_op(op, lambda v: torch.cat([t.reshape(-1) for t in v])),
            TypeError,
            rf"{owner}.{op}: expected a list of 4 tensors shaped like the parameters",
        )
        add(
            f"{op} of a vector in another dtype than the parameters",
            vector_op(op, lambda v: [t.float() for t in v]),
            TypeError,
            rf"{owner}.{op}: entry for '0.weight' is torch.float32, the parameter is torch.float64",
        )
        add(
            f"{op} of a list holding a non-tensor",
            vector_op(op, lambda v: [*v[:3], 0.0]),
            ValueError,
            rf"{owner}.{op}: entry for '2.bias' must have shape \(3,\), got float",
        )
    for damping, error, match in (
        (-1.0, ValueError, r"damping must be finite and >= 0, got -1.0"),
        (float("nan"), ValueError, r"damping must be finite and >= 0, got nan"),
        (float("inf"), ValueError, r"damping must be finite and >= 0, got inf"),
        ("0.1", TypeError, r"damping must be a float"),
        (True, TypeError, r"damping must be a float"),
    ):
        add(
            f"solve with damping={damping!r}",
            lambda damping=damping: (c := _ready(info)).solve(_zeros(c), damping),
            error,
            rf"{owner}.solve: {match}",
        )
    add(
        "logdet with negative damping",
        lambda: _ready(info).logdet(-0.5),
        ValueError,
        rf"{owner}.logdet: damping must be finite and >= 0, got -0.5",
    )
    add(
        "inverse with negative damping",
        lambda: _ready(info).inverse(-0.5),
        ValueError,
        rf"{owner}.inverse: damping must be finite and >= 0, got -0.5",
    )
    add(
        "eigenvalues(k=0)",
        lambda: _ready(info).eigenvalues(0),
        ValueError,
        rf"{owner}.eigenvalues: k must be a positive int",
    )
    add(
        "@ of a flat tensor of the wrong length",
        lambda: _ready(info) @ torch.zeros(40, dtype=torch.float64),
        ValueError,
        rf"{owner}.__matmul__ \(@\): expected \[39\] or \[39, K\], got \(40,\)",
    )

    # --- state
    add(
        "the state of another backend",
        lambda: _fresh(info).load_state_dict(_foreign_state(info)),
        ValueError,
        rf"{owner}.load_state_dict: the state belongs to '(DiagonalFisher|ExactFisher)'",
    )
    return out
