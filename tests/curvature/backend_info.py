"""The backend table of the contract tests, in the style of torch.optim's ``OptimizerInfo``.

One :class:`BackendInfo` per backend configuration (``BACKENDS``): registry name,
constructor kwargs, the capability flags the contract tests branch on and the error
inputs of its family (torch.optim's ``optim_error_inputs_func``).

:func:`error_inputs` lists, per row, bad inputs (:class:`ErrorInput`: torch.optim's
``ErrorOptimizerInput``) with the exception they must raise, a regex the message must
match — the argument, module or shape at fault — and the phase of a backend's life that
raises it (``error_on``: ``"construction"``, ``"update"`` or ``"solve"``; the phases
before it must succeed). The inputs every backend shares come from
:func:`shared_error_inputs`; each family adds its own: :func:`dense_error_inputs`,
:func:`diagonal_error_inputs`, :func:`kronecker_error_inputs`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

import curvlab
from curvlab.curvature import registry
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
        error_inputs_func: its family's error inputs (:func:`dense_error_inputs`,
            :func:`diagonal_error_inputs` or :func:`kronecker_error_inputs`), which
            :func:`error_inputs` adds to the shared ones.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    fisher_types: tuple[str, ...] = ALL_FISHER_TYPES
    deterministic: bool = True
    additive_statistics: bool = True
    tikhonov_solve: bool = True
    supports: frozenset[str] | None = None
    error_inputs_func: Callable[[BackendInfo], list[ErrorInput]] = field(kw_only=True)

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


# --- error inputs ------------------------------------------------------------------------

#: The phases of a backend's life, in order: built, fed batches (or a state), queried.
Phase = Literal["construction", "update", "solve"]
PHASES: tuple[Phase, ...] = ("construction", "update", "solve")

_CASE = {c.id: c for c in CASES}
MLP_CE = _CASE["mlp-ce-mean"]  # Linear(5, 4) -> Tanh -> Linear(4, 3): params 0.weight .. 2.bias
MLP_MSE = _CASE["mlp-mse-mean"]
UNSUPPORTED_LOSSES: list[tuple[str, nn.Module, str]] = [
    ("NLLLoss", nn.NLLLoss(), "Unsupported loss function NLLLoss.*CrossEntropyLoss, MSELoss"),
    ("reduction='none'", nn.CrossEntropyLoss(reduction="none"), "reduction='none'"),
    ("label_smoothing", nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing"),
    ("pos_weight", nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), "pos_weight"),
    ("class weights", nn.CrossEntropyLoss(weight=torch.ones(3)), "weights"),
]


def _one_batch(c: curvlab.Curvature) -> object:
    """The default update phase: one batch of ``MLP_CE``."""
    return c.update(*MLP_CE.data(n=4))


@dataclass(frozen=True)
class ErrorInput:
    """A bad input and the phase that must reject it (torch.optim's ``ErrorOptimizerInput``).

    The phases run in order — ``construct()``, then ``update(c)``, then ``use(c)`` — and
    stop at ``error_on``, which must raise ``error`` with a message matching ``match``
    (``re.search``); the phases before it must succeed.

    Attributes:
        construct: builds the backend (mostly the row's backend on ``MLP_CE``).
        update: feeds it (default: one batch of ``MLP_CE``; ``None``: no update, e.g. a
            query before any batch).
        use: queries it (``matvec``, ``solve``, ``logdet``, ...); ``error_on="solve"`` only.
    """

    description: str
    error_on: Phase
    error: type[Exception]
    match: str
    construct: Callable[[], curvlab.Curvature]
    update: Callable[[curvlab.Curvature], object] | None = _one_batch
    use: Callable[[curvlab.Curvature], object] | None = None

    def __post_init__(self) -> None:
        assert self.error_on in PHASES, self.error_on
        assert (self.use is not None) == (self.error_on == "solve"), self.description
        assert self.error_on != "update" or self.update is not None, self.description


def _make(info: BackendInfo, model: nn.Module, loss_fn: nn.Module, **overrides: Any) -> Any:
    return curvlab.make(info.name, model, loss_fn, **{**info.kwargs, **overrides})


def _fresh(info: BackendInfo, **overrides: Any) -> curvlab.Curvature:
    return info.build(MLP_CE, **overrides)[0]


def _zeros(c: curvlab.Curvature) -> list[torch.Tensor]:
    return [torch.zeros_like(p) for p in c.params]


def _owner(info: BackendInfo) -> str:
    """Messages name the registered class, which ``make()`` builds."""
    return info.cls.__name__


def _foreign_state(info: BackendInfo) -> dict[str, Any]:
    other = "diagonal" if info.name != "diagonal" else "exact_fisher"
    model, loss_fn = MLP_CE.build()
    c = curvlab.make(other, model, loss_fn)
    c.update(*MLP_CE.data(n=4))
    return c.state_dict()


def _load_altered_statistics(
    alter: Callable[[dict[str, Any]], dict[str, Any]],
) -> Callable[[curvlab.Curvature], object]:
    """An update phase: one batch, then ``load_statistics`` of its altered statistics."""

    def update(c: curvlab.Curvature) -> object:
        _one_batch(c)
        return c.load_statistics(alter(dict(c.statistics())))

    return update


def _singular_curvature(info: BackendInfo, match: str) -> ErrorInput:
    """An undamped solve of a curvature with zero directions: ``Linear(5, 4)`` whose ReLU
    never fires (bias -100), so its parameters and the next layer's weight get no
    curvature. Each family names the singular block its own way (``match``)."""

    def construct() -> curvlab.Curvature:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).to(torch.float64)
        with torch.no_grad():
            model[0].bias.fill_(-100.0)
        return _make(info, model, nn.CrossEntropyLoss())

    return ErrorInput(
        "an undamped solve of a singular curvature",
        "solve",
        curvlab.linalg.LinAlgError,
        match,
        construct,
        use=lambda c: c.solve([torch.ones_like(p) for p in c.params], 0.0),
    )


def error_inputs(info: BackendInfo) -> list[ErrorInput]:
    """Bad inputs for ``info``'s backend: the shared ones and its family's."""
    return shared_error_inputs(info) + info.error_inputs_func(info)


def shared_error_inputs(info: BackendInfo) -> list[ErrorInput]:
    """What every backend must reject, with the same message."""
    owner = _owner(info)
    x, y = MLP_CE.data(n=4)
    out: list[ErrorInput] = []

    def construction(description: str, construct: Callable[[], Any], error: type, match: str):
        out.append(ErrorInput(description, "construction", error, match, construct, None))

    def update(
        description: str,
        call: Callable[[curvlab.Curvature], object],
        error: type[Exception],
        match: str,
        construct: Callable[[], curvlab.Curvature] | None = None,
    ) -> None:
        build = construct or (lambda: _fresh(info))
        out.append(ErrorInput(description, "update", error, match, build, call))

    def solve(
        description: str,
        call: Callable[[curvlab.Curvature], object],
        error: type[Exception],
        match: str,
        updated: bool = True,
    ) -> None:
        out.append(
            ErrorInput(
                description,
                "solve",
                error,
                match,
                lambda: _fresh(info),
                _one_batch if updated else None,
                call,
            )
        )

    # --- construction: arguments, model and loss
    if info.fisher_types:
        bad = next((t for t in ALL_FISHER_TYPES if t not in info.fisher_types), "kfac")
        construction(
            f"fisher_type={bad!r}",
            lambda: _fresh(info, fisher_type=bad),
            ValueError,
            rf"{owner}: unknown fisher_type '{bad}'; choose one of",
        )
    if info.kwargs.get("fisher_type") == "mc":
        for value in (0, 1.5, True):
            construction(
                f"mc_samples={value!r}",
                lambda value=value: _fresh(info, mc_samples=value),
                ValueError,
                rf"{owner}: mc_samples must be a positive integer, got {value!r}",
            )
    construction(
        "engine='gpu'",
        lambda: _fresh(info, engine="gpu"),
        ValueError,
        rf"{owner}: unknown engine 'gpu'; choose one of \['auto', 'hooks', 'backpack'\]",
    )
    construction(
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
    for label, loss_fn, match in UNSUPPORTED_LOSSES:
        construction(
            f"a loss with {label}",
            lambda loss_fn=loss_fn: _make(info, MLP_CE.build()[0], loss_fn),
            ValueError,
            match,
        )
    construction(
        "a model without parameters",
        lambda: _make(info, nn.Sequential(nn.Tanh()), nn.MSELoss()),
        ValueError,
        rf"{owner}: (the model has no trainable parameters|no layer selected)",
    )

    # --- update: batches and states
    update(
        "targets that are not class indices",
        lambda c: c.update(x, torch.zeros(4, 3)),
        ValueError,
        r"CrossEntropyLoss: targets must be class indices of shape \[4\]",
    )
    update(
        "float class indices",
        lambda c: c.update(x, torch.zeros(4, dtype=torch.float64)),
        ValueError,
        r"\(int64\), got shape \(4,\) and dtype torch.float64",
    )
    update(
        "a class index out of range",
        lambda c: c.update(x, torch.tensor([0, 1, 7, 2])),
        ValueError,
        r"CrossEntropyLoss: targets must be class indices in \[0, 3\).*the first is 7",
    )
    update(
        "regression targets of the wrong shape",
        lambda c: c.update(MLP_MSE.data(n=4)[0], torch.zeros(4, 2)),
        ValueError,
        r"MSELoss: targets must have the output's shape \(4, 3\), got \(4, 2\)",
        construct=lambda: info.build(MLP_MSE)[0],
    )
    update(
        "targets that do not match an output with extra axes",
        lambda c: c.update(torch.randn(4, 3, 5, dtype=torch.float64), torch.randint(0, 3, (4,))),
        ValueError,
        r"CrossEntropyLoss: an output of shape \(4, 3, 3\) \(classes on dimension 1, one row "
        r"per position\) needs class-index targets of shape \(4, 3\), got \(4,\)",
        construct=lambda: _make(info, nn.Linear(5, 3).double(), nn.CrossEntropyLoss()),
    )
    update(
        "an empty batch",
        lambda c: c.update(x[:0], y[:0]),
        ValueError,
        r"CrossEntropyLoss: the batch is empty \(0 rows\)",
    )
    x_nan = x.clone()
    x_nan[0, 0] = float("nan")
    update(
        "a non-finite input (loss)",
        lambda c: c.update(x_nan, y),
        FloatingPointError,
        "loss is not finite",
    )
    x_mse, y_mse = MLP_MSE.data(n=4)
    y_mse[1, 2] = float("inf")
    update(
        "a non-finite target (loss)",
        lambda c: c.update(x_mse, y_mse),
        FloatingPointError,
        "loss is not finite",
        construct=lambda: info.build(MLP_MSE)[0],
    )
    update(
        "a tensor batch without targets",
        lambda c: c.update(x),
        TypeError,
        rf"{owner}.update: pass targets with a tensor batch",
    )
    update(
        "a data set whose batch is not a pair",
        lambda c: c.update([x], progress=False),
        ValueError,
        rf"{owner}.update: batch 0 of the data set is not an \(inputs, targets\) pair",
    )
    update(
        "accumulate without a loss",
        lambda c: c.accumulate(),
        TypeError,
        rf"{owner}.accumulate: pass the loss",
    )
    update(
        "the state of another backend",
        lambda c: c.load_state_dict(_foreign_state(info)),
        ValueError,
        rf"{owner}.load_state_dict: the state belongs to '(DiagonalFisher|ExactFisher)'",
    )

    # --- solve: queries before any batch, vectors and damping
    for op, call in (
        ("matvec", lambda c: c.matvec(_zeros(c))),
        ("solve", lambda c: c.solve(_zeros(c), 0.1)),
        ("to_dense", lambda c: c.to_dense()),
        ("trace", lambda c: c.trace()),
    ):
        solve(
            f"{op} before update",
            call,
            RuntimeError,
            rf"{owner}.{op}: no curvature accumulated yet",
            updated=False,
        )

    def vector_op(
        op: str, make: Callable[[list[torch.Tensor]], object]
    ) -> Callable[[curvlab.Curvature], object]:
        def call(c: curvlab.Curvature) -> object:
            v = make(_zeros(c))
            return c.matvec(v) if op == "matvec" else c.solve(v, 0.1)  # type: ignore[arg-type]

        return call

    for op in ("matvec", "solve"):
        solve(
            f"{op} of too few tensors",
            vector_op(op, lambda v: v[:3]),
            ValueError,
            rf"{owner}.{op}: expected 4 tensors \(one per parameter\), got 3",
        )
        solve(
            f"{op} of a wrongly shaped entry",
            vector_op(op, lambda v: [v[0], torch.zeros(5), *v[2:]]),
            ValueError,
            rf"{owner}.{op}: entry for '0.bias' must have shape \(4,\), got \(5,\)",
        )
        solve(
            f"{op} of a flat tensor",
            vector_op(op, lambda v: torch.cat([t.reshape(-1) for t in v])),
            TypeError,
            rf"{owner}.{op}: expected a list of 4 tensors shaped like the parameters",
        )
        solve(
            f"{op} of a vector in another dtype than the parameters",
            vector_op(op, lambda v: [t.float() for t in v]),
            TypeError,
            rf"{owner}.{op}: entry for '0.weight' is torch.float32, the parameter is torch.float64",
        )
        solve(
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
        solve(
            f"solve with damping={damping!r}",
            lambda c, damping=damping: c.solve(_zeros(c), damping),
            error,
            rf"{owner}.solve: {match}",
        )
    solve(
        "logdet with negative damping",
        lambda c: c.logdet(-0.5),
        ValueError,
        rf"{owner}.logdet: damping must be finite and >= 0, got -0.5",
    )
    solve(
        "inverse with negative damping",
        lambda c: c.inverse(-0.5),
        ValueError,
        rf"{owner}.inverse: damping must be finite and >= 0, got -0.5",
    )
    solve(
        "eigenvalues(k=0)",
        lambda c: c.eigenvalues(0),
        ValueError,
        rf"{owner}.eigenvalues: k must be a positive int",
    )
    solve(
        "@ of a flat tensor of the wrong length",
        lambda c: c @ torch.zeros(40, dtype=torch.float64),
        ValueError,
        rf"{owner}.__matmul__ \(@\): expected \[39\] or \[39, K\], got \(40,\)",
    )
    return out


def dense_error_inputs(info: BackendInfo) -> list[ErrorInput]:
    """Dense blocks (exact and empirical Fisher, block-diagonal, block-tridiagonal)."""
    owner = _owner(info)
    return [
        ErrorInput(
            "statistics whose blocks have other shapes",
            "update",
            ValueError,
            rf"{owner}: block shapes \[.*\] do not match this model's "
            r"\[\((39, 39|24, 24\), \(15, 15)\)\]",
            lambda: _fresh(info),
            _load_altered_statistics(lambda s: {**s, "blocks": [b[:-1, :-1] for b in s["blocks"]]}),
        ),
        _singular_curvature(
            info, rf"Cholesky factorization of {owner} block \d.*failed, also in float64"
        ),
    ]


def diagonal_error_inputs(info: BackendInfo) -> list[ErrorInput]:
    """The diagonal Fisher."""
    owner = _owner(info)
    return [
        ErrorInput(
            "statistics whose diagonals have other shapes",
            "update",
            ValueError,
            rf"{owner}: diagonal shapes \[\(5, 4\), \(4,\), \(4, 3\), \(3,\)\] do not match "
            r"this model's \[\(4, 5\), \(4,\), \(3, 4\), \(3,\)\]",
            lambda: _fresh(info),
            _load_altered_statistics(
                lambda s: {**s, "diagonal": [d.mT if d.dim() == 2 else d for d in s["diagonal"]]}
            ),
        ),
        _singular_curvature(
            info,
            rf"{owner}.solve: the diagonal block of '0.weight' has zero entries; "
            r"use damping > 0",
        ),
    ]


def kronecker_error_inputs(info: BackendInfo) -> list[ErrorInput]:
    """The Kronecker-factored backends (K-FAC, KFC, EKFAC, their block-tridiagonal
    structure): the options of the factors and of the layer selection."""
    owner = _owner(info)
    tridiagonal = info.name == "block_tridiagonal_kfac"
    out: list[ErrorInput] = []

    def construction(description: str, construct: Callable[[], Any], match: str) -> None:
        out.append(ErrorInput(description, "construction", ValueError, match, construct, None))

    for argument in ("kfac_approx", "damping_mode"):
        if info.accepts(argument):
            construction(
                f"{argument}='bogus'",
                lambda argument=argument: _fresh(info, **{argument: "bogus"}),
                rf"{owner}: (unknown {argument} 'bogus'; choose one of"
                rf"|.*{argument}='bogus' is not)",
            )
    if info.accepts("damping_mode"):
        out.append(
            ErrorInput(
                "damping_mode=1.0 (neither a name nor a strategy)",
                "construction",
                TypeError,
                rf"{owner}: damping_mode must be one of \('exact', 'factored'\) or a "
                r"KroneckerDamping strategy, got float",
                lambda: _fresh(info, damping_mode=1.0),
                None,
            )
        )
    if tridiagonal:
        construction(
            "a LayerNorm (no Kronecker rule) in the block-tridiagonal chain",
            lambda: _make(
                info,
                nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)),
                nn.MSELoss(),
            ),
            rf"{owner}: the block-tridiagonal structure chains Kronecker blocks only; "
            r"\['1.weight', '1.bias'\] have no Kronecker rule",
        )
    if info.accepts("refit_every"):
        construction(
            "refit_every=0",
            lambda: _fresh(info, refit_every=0),
            rf"{owner}: refit_every must be a positive int or None, got 0",
        )
    if info.accepts("statistics_fraction"):
        construction(
            "statistics_fraction=0",
            lambda: _fresh(info, statistics_fraction=0.0),
            rf"{owner}: statistics_fraction must lie in \(0, 1\], got 0.0",
        )
    if info.accepts("factor_dtype"):
        construction(
            "factor_dtype=torch.int64",
            lambda: _fresh(info, factor_dtype=torch.int64),
            rf"{owner}: factor_dtype must be one of .* or None, got torch.int64",
        )
    construction(
        "strict=True with a LayerNorm",
        lambda: _make(
            info,
            nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)),
            nn.MSELoss(),
            strict=True,
        ),
        rf"{owner}: module '1' \(LayerNorm\) has trainable parameters without a Kronecker "
        r"block.*exclude=\['1'\]",
    )
    construction(
        "layers= naming a module the model lacks",
        lambda: _fresh(info, layers=["9"]),
        rf"{owner}: layers names unknown module '9'; modules with parameters: \['0', '2'\]",
    )
    construction(
        "exclude= with a pattern matching no module",
        lambda: _fresh(info, exclude=["block.*"]),
        rf"{owner}: exclude pattern 'block.\*' matches no module",
    )
    out.append(
        ErrorInput(
            "statistics whose factors belong to other layers",
            "update",
            ValueError,
            rf"{owner}: factor sizes \[\(3, 5\), \(4, 6\)\] do not match this model's layers "
            r"\[\(4, 6\), \(3, 5\)\]",
            lambda: _fresh(info),
            _load_altered_statistics(lambda s: {**s, "A": s["A"][::-1], "G": s["G"][::-1]}),
        )
    )
    out.append(
        _singular_curvature(
            info,
            rf"{owner}.solve: layer '0' \(Linear\).*use damping > 0"
            rf"|Cholesky factorization of {owner} layer 0 .* failed, also in float64",
        )
    )
    return out


# --- the table: one constructor per backend family, with that family's error inputs

Dense = functools.partial(BackendInfo, error_inputs_func=dense_error_inputs)
Diagonal = functools.partial(BackendInfo, error_inputs_func=diagonal_error_inputs)
Kronecker = functools.partial(BackendInfo, error_inputs_func=kronecker_error_inputs)

_DENSE_FULL = ("exact", "mc")  # ExactFisher: the true Fisher and its Monte-Carlo estimate

BACKENDS: list[BackendInfo] = [
    Dense("exact_fisher", fisher_types=_DENSE_FULL),
    Dense(
        "exact_fisher",
        {"fisher_type": "mc", "mc_samples": 3},
        fisher_types=_DENSE_FULL,
        deterministic=False,
    ),
    Dense("empirical_fisher", fisher_types=()),
    Dense("block_diagonal"),
    Dense("block_diagonal", {"fisher_type": "mc", "mc_samples": 2}, deterministic=False),
    Dense("block_diagonal", {"fisher_type": "empirical"}),
    Kronecker("kfac", {"fisher_type": "exact"}),  # convolutions: diagonal blocks
    Kronecker(
        "kfac", {"fisher_type": "mc", "mc_samples": 2}, deterministic=False, supports=MLP_ONLY
    ),
    Diagonal("diagonal"),
    Diagonal("diagonal", {"fisher_type": "mc", "mc_samples": 2}, deterministic=False),
    Diagonal("diagonal", {"fisher_type": "empirical"}),
    Kronecker("kfc", {"fisher_type": "empirical"}),
    Kronecker("kfc", {"fisher_type": "exact", "kfac_approx": "reduce"}),
    Kronecker("kfc", {"fisher_type": "mc"}, deterministic=False),
    Dense("block_tridiagonal", tikhonov_solve=False),
    Dense("block_tridiagonal", {"fisher_type": "empirical"}, tikhonov_solve=False),
    Kronecker(
        "block_tridiagonal_kfac", {"fisher_type": "exact"}, tikhonov_solve=False, supports=MLP_ONLY
    ),
    Kronecker(
        "block_tridiagonal_kfac", {"fisher_type": "mc"}, deterministic=False, tikhonov_solve=False
    ),
    Kronecker("ekfac", {"fisher_type": "exact"}, additive_statistics=False),
    Kronecker(
        "ekfac", {"fisher_type": "empirical", "kfac_approx": "reduce"}, additive_statistics=False
    ),
]
