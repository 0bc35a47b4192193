"""Fuzzing (hypothesis): random small models × losses × reductions × batch sizes × dtypes ×
backends × Fisher types × engines.

Every draw must end in one of two ways: the backend's curvature agrees with an
independent float64 reference (``tests/reference_any.py``: dense ``torch.func`` Jacobians,
K-FAC factors from their definition) and is finite, symmetric and PSD, with a finite
``solve``; or curvlab raises one of its own errors (raised in curvlab's code, a
``ValueError``/``TypeError``/``RuntimeError``/``FloatingPointError``) whose message names
the culprit (backend, loss, module or argument). Anything else — a NaN, a mismatch, an
exception from inside PyTorch — fails. Monte-Carlo types get the structural checks only.

Models come from building blocks: ``Sequential`` MLPs, convolutions and embeddings with
norms and residuals, and token models (``TokenModel``) with self-attention from
``nn.Linear`` projections (``tests.zoo.PlainAttention``), a raw position ``nn.Parameter``,
a head tied to the embedding, one ``nn.Linear`` called twice, an unused branch (left out
with ``exclude=`` or refused with an error that says so) and per-token loss rows
``[N·T, C]``. Cross-entropy targets may hold ``ignore_index`` rows; K-FAC's references
then follow concepts/models.md#rows-the-loss-ignores.

Reproducible: derandomized, no example database. The default suite runs
``CURVLAB_FUZZ_EXAMPLES`` (400) examples, ``make test-slow`` a longer search
(``CURVLAB_FUZZ_LONG_EXAMPLES``, 2000). ``--hypothesis-show-statistics`` tallies what the
draws ended in.
"""

from __future__ import annotations

import itertools
import os
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from torch import Tensor, nn

import curvlab
from curvlab.extraction.layers import parameter_order
from tests import reference_any as ref
from tests.curvature.backend_info import BACKENDS
from tests.zoo import PlainAttention

MAX_EXAMPLES = int(os.environ.get("CURVLAB_FUZZ_EXAMPLES", "400"))  # the default suite
LONG_EXAMPLES = int(os.environ.get("CURVLAB_FUZZ_LONG_EXAMPLES", "2000"))  # make test-slow
CURVLAB_DIR = str(Path(curvlab.__file__).parent)
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
# a curvlab error names what is at fault
CULPRIT = re.compile(
    r"(KFAC|KFC|EKFAC|ExactFisher|EmpiricalFisher|BlockDiagonal|BlockTridiagonal|DiagonalFisher"
    r"|CrossEntropyLoss|MSELoss|BCEWithLogitsLoss|module '|layer '|engine=|block |exclude=)"
)

# --- models from building blocks ---------------------------------------------------------


class Residual(nn.Module):
    """``x + tanh(W x)``: not a ``Sequential`` (the hooks engine only)."""

    def __init__(self, width: int, bias: bool) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(self.inner(x))


FAMILIES = ("mlp", "conv1d", "conv2d", "embedding")
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
BLOCKS = {
    # the blocks each family can stack after its first layer
    "mlp": ("tanh", "relu", "sigmoid", "gelu", "linear", "layernorm", "batchnorm", "residual"),
    "conv1d": ("tanh", "relu", "conv", "batchnorm"),
    "conv2d": ("sigmoid", "relu", "conv", "batchnorm"),
    "embedding": ("tanh", "linear", "layernorm", "residual"),
}
VOCAB, TOKENS = 5, 3


@dataclass(frozen=True)
class ModelSpec:
    family: str
    width: int
    blocks: tuple[str, ...]
    bias: bool
    kernel: int  # convolutions
    stride: int
    padding: int
    batchnorm_train: bool
    num_outputs: int

    def input(self, n: int, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
        if self.family == "embedding":
            return torch.randint(0, VOCAB, (n, TOKENS), generator=gen)
        shape = {"mlp": (3,), "conv1d": (2, 5), "conv2d": (2, 4, 4)}[self.family]
        return torch.randn(n, *shape, generator=gen, dtype=dtype)

    def build(self, dtype: torch.dtype, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        w, bias = self.width, self.bias
        conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d}.get(self.family)
        norm = {"conv2d": nn.BatchNorm2d}.get(self.family, nn.BatchNorm1d)
        layers: list[nn.Module]
        if self.family == "mlp":
            layers = [nn.Linear(3, w, bias=bias)]
        elif self.family == "embedding":
            layers = [nn.Embedding(VOCAB, w)]
        else:
            assert conv is not None
            layers = [conv(2, w, self.kernel, stride=self.stride, padding=self.padding, bias=bias)]
        for block in self.blocks:
            if block in ACTIVATIONS:
                layers.append(ACTIVATIONS[block]())
            elif block == "linear":
                layers.append(nn.Linear(w, w, bias=bias))
            elif block == "conv":
                assert conv is not None
                layers.append(conv(w, w, 1, bias=bias))
            elif block == "layernorm":
                layers.append(nn.LayerNorm(w))
            elif block == "batchnorm":
                layers.append(norm(w))
            else:
                layers.append(Residual(w, bias))
        layers.append(nn.Flatten())
        features = nn.Sequential(*layers).eval()
        with torch.no_grad():
            width = features(self.input(2, torch.float32, torch.Generator())).shape[1]
        model = nn.Sequential(*layers, nn.Linear(width, self.num_outputs, bias=bias))
        for m in model.modules():
            if isinstance(m, NORM_LAYERS):  # not the identity at initialisation
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
        model = model.to(dtype).eval()
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.train(self.batchnorm_train)
        return model

    @property
    def couples_samples(self) -> bool:
        return self.batchnorm_train and "batchnorm" in self.blocks

    rows_per_sample = 1  # loss rows per sample
    exclude: tuple[str, ...] = ()  # what the user passes as exclude=
    unused = False  # a parameterised submodule the forward never calls


# --- token models: attention, raw parameters, tied and shared layers, unused branches -----

TOKEN_BLOCKS = ("attention", "layernorm", "shared", "mlp")


class TokenModel(nn.Module):
    """Embedding (+ raw position ``nn.Parameter``), residual blocks over ``[N, T, D]`` and a
    head (tied to the embedding or not) on every token (``[N·T, C]``) or on the mean token.

    ``shared`` applies one ``nn.Linear`` twice; ``unused`` is a Linear no forward calls.
    """

    def __init__(self, spec: TokenSpec) -> None:
        super().__init__()
        d = spec.width
        self.tok = nn.Embedding(VOCAB, d)
        nn.init.normal_(self.tok.weight, std=0.5)
        self.pos = nn.Parameter(0.3 * torch.randn(TOKENS, d)) if spec.pos else None
        self.blocks = nn.ModuleList()
        for block in spec.blocks:
            if block == "attention":
                self.blocks.append(PlainAttention(d, spec.heads, causal=spec.causal))
            elif block == "layernorm":
                self.blocks.append(nn.LayerNorm(d))
            else:  # "shared" (called twice in forward) and "mlp" (once)
                self.blocks.append(nn.Linear(d, d, bias=spec.bias))
        self.kinds = spec.blocks
        if spec.unused:
            self.unused = nn.Linear(d, d)
        self.head = nn.Linear(d, spec.num_outputs, bias=spec.bias)
        if spec.tied:
            self.head.weight = self.tok.weight
        self.per_token = spec.per_token

    def forward(self, idx: Tensor) -> Tensor:
        h = self.tok(idx)
        if self.pos is not None:
            h = h + self.pos[: idx.shape[1]]
        for kind, block in zip(self.kinds, self.blocks):
            if kind == "layernorm":
                h = block(h)
            elif kind == "shared":
                h = h + torch.tanh(block(torch.tanh(block(h))))
            elif kind == "mlp":
                h = h + torch.tanh(block(h))
            else:
                h = h + block(h)
        if not self.per_token:
            h = h.mean(dim=1)
        out = self.head(h)
        return out.reshape(-1, out.shape[-1])


@dataclass(frozen=True)
class TokenSpec:
    width: int
    heads: int
    causal: bool
    blocks: tuple[str, ...]
    bias: bool
    pos: bool
    tied: bool
    per_token: bool
    unused: bool
    exclude_unused: bool
    outputs: int  # the head's width when it is not tied

    family = "tokens"
    couples_samples = False

    @property
    def num_outputs(self) -> int:
        return VOCAB if self.tied else self.outputs

    @property
    def rows_per_sample(self) -> int:
        return TOKENS if self.per_token else 1

    @property
    def exclude(self) -> tuple[str, ...]:
        return ("unused",) if self.unused and self.exclude_unused else ()

    def input(self, n: int, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
        return torch.randint(0, VOCAB, (n, TOKENS), generator=gen)

    def build(self, dtype: torch.dtype, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = TokenModel(self)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):  # not the identity at initialisation
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
        return model.to(dtype).eval()


@st.composite
def token_specs(draw: st.DrawFn) -> TokenSpec:
    width = draw(st.sampled_from((2, 4)))
    unused = draw(st.booleans())
    blocks = tuple(draw(st.lists(st.sampled_from(TOKEN_BLOCKS), min_size=1, max_size=2)))
    bias, tied = draw(st.booleans()), draw(st.booleans())
    return TokenSpec(
        width=width,
        heads=draw(st.sampled_from((1, 2))),
        causal=draw(st.booleans()),
        blocks=blocks,
        bias=bias,
        pos=draw(st.booleans()),
        tied=tied,
        per_token=draw(st.booleans()),
        unused=unused,
        exclude_unused=unused and draw(st.booleans()),
        outputs=draw(st.integers(1, 3)),
    )


@st.composite
def model_specs(draw: st.DrawFn, batch_size: int) -> ModelSpec | TokenSpec:
    # the token models hold most of the new building blocks: drawn as often as the rest
    family = draw(st.sampled_from((*FAMILIES, *("tokens",) * len(FAMILIES))))
    if family == "tokens":
        return draw(token_specs())
    blocks = tuple(draw(st.lists(st.sampled_from(BLOCKS[family]), max_size=3)))
    kernel = draw(st.integers(1, 3))
    return ModelSpec(
        family=family,
        width=draw(st.integers(1, 3)),
        blocks=blocks,
        bias=draw(st.booleans()),
        kernel=kernel,
        stride=draw(st.integers(1, 2)),
        padding=draw(st.integers(0, kernel - 1)),
        # BatchNorm in train mode needs more than one value per channel
        batchnorm_train=batch_size > 1 and draw(st.booleans()),
        num_outputs=draw(st.integers(1, 3)),
    )


# --- backends ----------------------------------------------------------------------------

FISHER_TYPES = {info.name: info.fisher_types for info in BACKENDS}
KRONECKER = ("kfac", "kfc", "ekfac", "block_tridiagonal_kfac")


@dataclass(frozen=True)
class BackendSpec:
    name: str
    kwargs: tuple[tuple[str, object], ...]

    @property
    def options(self) -> dict[str, object]:
        return dict(self.kwargs)

    @property
    def fisher_type(self) -> str:
        default = "empirical" if self.name == "empirical_fisher" else "exact"
        return str(self.options.get("fisher_type", default))


@st.composite
def backend_specs(draw: st.DrawFn, family: str = "mlp") -> BackendSpec:
    names = sorted(curvlab.available())
    name = draw(st.sampled_from(names))
    kwargs: dict[str, object] = {"engine": draw(st.sampled_from(("auto", "hooks", "backpack")))}
    if FISHER_TYPES[name]:
        kwargs["fisher_type"] = draw(st.sampled_from(FISHER_TYPES[name]))
        if kwargs["fisher_type"] == "mc":
            kwargs["mc_samples"] = draw(st.integers(1, 3))
    if name in KRONECKER:
        kwargs["kfac_approx"] = draw(st.sampled_from(("expand", "reduce")))
    return BackendSpec(name, tuple(kwargs.items()))


# --- checks ------------------------------------------------------------------------------


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-7 if dtype == torch.float64 else 2e-3


def _close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    actual, expected = actual.double(), expected.double()
    atol = tol * max(float(expected.abs().max()), 1e-12)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def _assert_curvlab_error(error: BaseException) -> None:
    """``error`` was raised by curvlab's own code, of a documented type, naming the culprit."""
    frames = traceback.extract_tb(error.__traceback__)
    where = frames[-1].filename if frames else "?"
    detail = f"{type(error).__name__} raised in {where}: {error}"
    assert isinstance(error, (ValueError, TypeError, RuntimeError, FloatingPointError)), detail
    assert where.startswith(CURVLAB_DIR), f"not a curvlab error: {detail}"
    assert CULPRIT.search(str(error)), f"the message names no culprit: {detail}"


def _in_order(matrix: Tensor, c: curvlab.Curvature, model: nn.Module) -> Tensor:
    """``matrix`` (reference parameter order) in the order of ``c.params``."""
    start, where = 0, {}
    for _, p in ref.flat_params(model):
        where[id(p)] = torch.arange(start, start + p.numel())
        start += p.numel()
    index = torch.cat([where[id(p)] for p in c.params])
    return matrix[index.unsqueeze(1), index.unsqueeze(0)]


def _mask(c: curvlab.Curvature, groups: list[list[nn.Parameter]]) -> Tensor:
    position, start = {}, 0
    for p in c.params:
        position[id(p)] = torch.arange(start, start + p.numel())
        start += p.numel()
    mask = torch.zeros(c.num_params, c.num_params, dtype=torch.bool)
    for group in groups:
        index = torch.cat([position[id(p)] for p in group])
        mask[index.unsqueeze(1), index.unsqueeze(0)] = True
    return mask


def _norm_params(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters()}


def _per_token_input_factors(
    model: nn.Module,
    x: Tensor,
    factors: dict[str, tuple[Tensor, Tensor]],
    valid: Tensor,
    approx: str,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``factors`` with each ``A`` over the valid ``[N, T]`` positions only."""
    modules = [model.get_submodule(name) for name in factors]
    calls = ref.layer_io(model, x, modules)
    result = {}
    for (name, (_, g_factor)), module in zip(factors.items(), modules):
        weight, bias = ref._trainable(module)
        a_sum, count = 0.0, 0
        for inp, out in calls[module]:
            a, _ = ref._positions(module, inp, out)
            a = ref._homogeneous(a, weight, bias)  # [N, T, D]
            if approx == "reduce":  # the mean over a sample's valid positions
                keep = valid.any(dim=1)
                mask = valid.to(a.dtype).unsqueeze(-1)
                a = ((a * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1))[keep]
            else:
                a = a[valid]
            a_sum = a_sum + a.T @ a
            count += a.shape[0]
        result[name] = (a_sum / count, g_factor)
    return result


def _check_against_reference(
    c: curvlab.Curvature,
    backend: BackendSpec,
    spec: ModelSpec,
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    dense: Tensor,
    tol: float,
) -> None:
    fisher_type, name = backend.fisher_type, backend.name
    full_fn = ref.ggn if fisher_type == "exact" else ref.empirical_fisher
    full = _in_order(full_fn(model, loss_fn, x, y), c, model)
    if name in ("exact_fisher", "empirical_fisher"):
        _close(dense, full, tol, name)
    elif name == "block_diagonal":
        _close(dense, full * _mask(c, [list(layer.params) for layer in c.layers]), tol, name)
    elif name == "diagonal":
        _close(dense, torch.diag(torch.diagonal(full)), tol, name)
    elif name == "block_tridiagonal":
        # the completion agrees with F on the diagonal blocks and on the chained pairs
        order = [c.layers[i] for i in getattr(c, "_order", range(len(c.layers)))]
        groups = [list(layer.params) for layer in c.layers]
        if hasattr(c, "_order"):
            groups += [list(a.params) + list(b.params) for a, b in itertools.pairwise(order)]
        mask = _mask(c, groups)
        # with blocks singular in exact arithmetic (one sequence, attention) the completion
        # is ill-conditioned: a direction of relative variance r in layer i+1 is either left
        # out (moving the band by up to √r·‖F‖) or kept (amplifying rounding by eps/r); the
        # cutoff at r = eps^0.7 bounds both at about eps^0.35 (3.6e-6 in float64), its
        # docstring in curvlab/curvature/chain.py
        # (at the model's precision: the statistics may be held in float64, their rounding is
        # the float32 model's)
        model_dtype = next(model.parameters()).dtype
        eps = max(torch.finfo(dense.dtype).eps, torch.finfo(model_dtype).eps)
        band_tol = max(tol, eps**0.35)
        _close(dense * mask, full * mask, band_tol, name)
    elif name in ("kfac", "kfc"):
        approx = str(backend.options["kfac_approx"])
        # a tied embedding/head block adds the embedding's kron (tied="kronecker")
        names = [layer.name for layer in c.layers] + [e.name for e in c._partners.values()]
        valid = ref.valid_rows(loss_fn, y, len(y))
        if not names:  # no Kronecker layer: every parameter has a diagonal block
            factors = {}
        elif bool(valid.all()):
            factors = ref.kfac_reference(
                model, loss_fn, x, y, names, fisher_type, approx, sqrt="curvlinops"
            )
        elif spec.couples_samples:
            return  # the batch without the ignored rows is another batch: structure only
        elif spec.rows_per_sample == 1:
            # rows are samples: the curvature of the batch without the ignored rows
            # (concepts/models.md#rows-the-loss-ignores)
            factors = ref.kfac_reference(
                model, loss_fn, x[valid], y[valid], names, fisher_type, approx, sqrt="curvlinops"
            )
        else:
            # one row per token: every Kronecker layer of a TokenModel is per-token, so its
            # A leaves out the ignored positions; G sees no gradient from them anyway
            factors = ref.kfac_reference(
                model, loss_fn, x, y, names, fisher_type, approx, sqrt="curvlinops"
            )
            factors = _per_token_input_factors(model, x, factors, valid.view(x.shape), approx)
        expected = _in_order(ref.kfac_dense(model, factors), c, model)
        coverage = c.coverage()
        diagonal = torch.cat([
            torch.full((p.numel(),), coverage[n] == "diagonal")
            for p, n in zip(c.params, c.param_names)
        ])  # fmt: skip
        expected[diagonal] = 0.0
        expected[diagonal, diagonal] = torch.diagonal(full)[diagonal]
        keep = torch.ones(c.num_params, dtype=torch.bool)
        if spec.couples_samples:
            # normalisation layers' diagonal blocks take per-sample gradients at the layer
            # (samples treated as independent, as K-FAC does): exact only without coupling
            norms = _norm_params(model)
            at_layer = torch.cat([
                torch.full((p.numel(),), id(p) in norms) for p in c.params
            ])  # fmt: skip
            keep &= ~at_layer
        _close(dense[keep][:, keep], expected[keep][:, keep], tol, name)
    elif name == "ekfac" and fisher_type == "exact" and backend.options["kfac_approx"] == "expand":
        if spec.couples_samples:
            return
        start = 0
        for layer, (q_g, q_a), s in zip(c.layers, c.eigenbasis(), c.scalings()):
            inverse = torch.argsort(parameter_order(layer.module))
            block = full[start : start + layer.numel, start : start + layer.numel]
            block = block[inverse][:, inverse]  # parameter order -> row-major [W | b]
            q = torch.kron(q_g.double(), q_a.double())
            _close(s.reshape(-1), torch.diagonal(q.T @ block @ q), tol, f"EKFAC S* {layer.name}")
            start += layer.numel


def _targets(loss_fn: nn.Module, n: int, c: int, dtype: torch.dtype, gen: torch.Generator):
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return torch.randint(0, c, (n,), generator=gen)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return torch.randint(0, 2, (n, c), generator=gen).to(dtype)
    return torch.randn(n, c, generator=gen, dtype=dtype)


TIKHONOV = {info.name for info in BACKENDS if info.tikhonov_solve}
LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


@st.composite
def scenarios(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    batch_size = draw(st.integers(1, 4))
    spec = draw(model_specs(batch_size))
    return (
        spec,
        draw(st.sampled_from(LOSSES)),
        draw(st.sampled_from(("mean", "sum"))),
        batch_size,
        draw(st.sampled_from((torch.float32, torch.float64))),
        draw(backend_specs(spec.family)),
        draw(st.integers(0, 3)),  # seed
        draw(st.integers(0, 2)),  # rows the loss ignores (cross-entropy only)
    )


def _event(text: str) -> None:
    """Tally ``text`` in ``--hypothesis-show-statistics`` (regression tests call it too)."""
    if currently_in_test_context():
        event(text)


def _ignore_rows(y: Tensor, ignored: int, gen: torch.Generator) -> Tensor:
    """``y`` with ``ignored`` of its rows (never all of them) set to ``ignore_index``."""
    ignored = min(ignored, len(y) - 1)
    if ignored > 0:
        y = y.clone()
        y[torch.randperm(len(y), generator=gen)[:ignored]] = -100
    return y


def _check_unused_is_skipped(
    c: curvlab.Curvature,
    backend: BackendSpec,
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    seed: int,
    dense: Tensor,
) -> None:
    """K-FAC/KFC with a branch the forward never calls: its rows and columns are zero and
    the rest equals the same backend with the branch excluded (same draws)."""
    without = curvlab.make(backend.name, model, loss_fn, exclude=["unused"], **backend.options)
    torch.manual_seed(seed)
    without.update(x, y)
    kept = [c.param_names.index(n) for n in without.param_names]
    sizes = torch.tensor([0] + [p.numel() for p in c.params]).cumsum(0)
    index = torch.cat([torch.arange(int(sizes[i]), int(sizes[i + 1])) for i in kept])
    _close(dense[index][:, index], without.to_dense(), _tolerance(dense.dtype), "unused skipped")
    unused = torch.ones(dense.shape[0], dtype=torch.bool)
    unused[index] = False
    assert bool((dense[unused] == 0).all()), f"{backend.name}: unused branch not zero"
    _event(f"tokens: {backend.name} skipped the unused branch")


def run_scenario(
    spec: ModelSpec | TokenSpec,
    loss_cls: type[nn.Module],
    reduction: str,
    n: int,
    dtype: torch.dtype,
    backend: BackendSpec,
    seed: int,
    ignored: int = 0,
) -> None:
    """One fuzz example (also what a regression test calls)."""
    model = spec.build(dtype, seed)
    loss_fn = loss_cls(reduction=reduction)
    gen = torch.Generator().manual_seed(seed)
    x = spec.input(n, dtype, gen)
    y = _targets(loss_fn, n * spec.rows_per_sample, spec.num_outputs, dtype, gen)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        y = _ignore_rows(y, ignored, gen)
    options = dict(backend.options)
    if spec.exclude and backend.name in KRONECKER:  # the dense backends take no exclude=
        options["exclude"] = list(spec.exclude)
    try:
        c = curvlab.make(backend.name, model, loss_fn, **options)
        torch.manual_seed(seed)
        c.update(x, y)
        dense = c.to_dense()
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in c.params]
        mv = c.matvec(v)
        solved = c.solve(v, 0.1)
    except Exception as error:
        _assert_curvlab_error(error)
        _event(f"{spec.family}: curvlab error {str(error)[:50]}")
        if "was not called" in str(error) and spec.unused and not spec.exclude:
            # the unused branch: the message tells the user what to pass
            assert "exclude=['unused']" in str(error), str(error)
        return
    if spec.unused and not spec.exclude and backend.name in KRONECKER:
        # only the backends with per-sample statistics (EKFAC, the block-tridiagonal
        # K-FAC) need every layer called; K-FAC/KFC skip the unused branch as torch.optim
        # does: zero blocks there, and the rest as with the branch excluded
        per_sample = backend.name in ("ekfac", "block_tridiagonal_kfac")
        assert not per_sample, f"{backend.name}: unused layer not refused"
        _check_unused_is_skipped(c, backend, model, loss_fn, x, y, seed, dense)
        return
    if "exclude" in options:
        assert not any(n.startswith("unused.") for n in c.param_names), c.param_names
    tol = _tolerance(dtype)
    what = f"{backend.name} {backend.options}"
    assert dense.shape == (c.num_params, c.num_params) and dense.dtype == dtype, what
    assert bool(torch.isfinite(dense).all()), f"{what}: non-finite curvature"
    flat_v = torch.cat([t.reshape(-1) for t in v])
    flat_solved = torch.cat([t.reshape(-1) for t in solved])
    assert bool(torch.isfinite(flat_solved).all()), f"{what}: non-finite solve"
    _close(dense, dense.T, tol, f"{what} symmetric")
    d64 = dense.double()
    eigs = torch.linalg.eigvalsh((d64 + d64.T) / 2)
    assert float(eigs.min()) >= -tol * max(float(eigs.max()), 1.0), f"{what}: not PSD {eigs}"
    _close(torch.cat([t.reshape(-1) for t in mv]), dense @ flat_v, tol, f"{what} matvec")
    if backend.name in TIKHONOV:
        damped = d64 + 0.1 * torch.eye(c.num_params, dtype=torch.float64)
        _close(damped @ flat_solved.double(), flat_v, 10 * tol, f"{what} solve")
    if backend.fisher_type != "mc":
        _check_against_reference(c, backend, spec, model, loss_fn, x, y, d64, tol)
    ignores = bool((y == -100).any()) if isinstance(loss_fn, nn.CrossEntropyLoss) else False
    _event(f"{spec.family}: checked {backend.name}{' with ignored rows' if ignores else ''}")


def _profile(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@_profile(MAX_EXAMPLES)
@given(scenarios())
def test_every_backend_matches_its_reference_or_names_the_culprit(scenario) -> None:
    run_scenario(*scenario)


@pytest.mark.slow
@_profile(LONG_EXAMPLES)
@given(scenarios())
def test_long_fuzz_every_backend_matches_its_reference_or_names_the_culprit(scenario) -> None:
    # `make test-slow`: the same search, longer (CURVLAB_FUZZ_LONG_EXAMPLES)
    run_scenario(*scenario)


# --- regressions found by fuzzing ------------------------------------------------------------


def _embedding_model(dtype: torch.dtype, padding_idx: int | None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(VOCAB, 2, padding_idx=padding_idx), nn.Flatten(), nn.Linear(2 * TOKENS, 3)
    )
    return model.to(dtype)


@pytest.mark.parametrize(
    ("dtype", "padding_idx"), [(torch.float64, None), (torch.float32, 0)], ids=["float64", "pad"]
)
def test_auto_engine_leaves_embeddings_backpack_cannot_serve_to_the_hooks(
    dtype: torch.dtype, padding_idx: int | None
) -> None:
    # engine="auto" took BackPACK, whose embedding derivatives build their one-hot inputs in
    # the default dtype ("expected scalar type Float but found Double") and refuse padding_idx
    model, loss_fn = _embedding_model(dtype, padding_idx), nn.CrossEntropyLoss()
    x, y = torch.randint(0, VOCAB, (4, TOKENS)), torch.tensor([0, 1, 2, 0])
    auto = curvlab.ExactFisher(model, loss_fn)
    auto.update(x, y)
    _close(auto.to_dense(), ref.ggn(model, loss_fn, x, y), _tolerance(dtype), "ExactFisher")
    with pytest.raises(ValueError, match=r"engine='backpack'.*module '0' \(Embedding\)"):
        curvlab.ExactFisher(model, loss_fn, engine="backpack")


def test_minimal_float64_embedding_scenario() -> None:
    spec = ModelSpec("embedding", 1, (), False, 1, 1, 0, False, 1)
    backend = BackendSpec("block_diagonal", (("engine", "auto"), ("fisher_type", "exact")))
    run_scenario(spec, nn.CrossEntropyLoss, "mean", 1, torch.float64, backend, 0)


@pytest.mark.parametrize("backend", ["empirical_fisher", "exact_fisher"])
def test_auto_engine_leaves_batchnorm_in_training_mode_to_the_hooks(backend: str) -> None:
    # engine="auto" took BackPACK for a Sequential with BatchNorm in train mode: the empirical
    # Fisher came out wrong (per-sample gradients that ignore the coupling, only a warning)
    # and the exact one failed inside BackPACK
    spec = ModelSpec("conv1d", 1, ("batchnorm",), False, 1, 1, 0, True, 1)
    run_scenario(spec, nn.MSELoss, "mean", 2, torch.float64, BackendSpec(backend, ()), 0)
    model, loss_fn = spec.build(torch.float64, 0), nn.MSELoss()
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm1d\) is in training mode"):
        curvlab.make(backend, model, loss_fn, engine="backpack")


def test_block_tridiagonal_completion_of_singular_blocks_is_psd() -> None:
    """Found by the fuzzer: blocks singular in exact arithmetic (one sequence, attention)
    have rounding-level eigenvalues, which the completion's pseudo-inverse must not
    invert."""
    spec = TokenSpec(
        width=2, heads=1, causal=False, blocks=("attention",), bias=False, pos=False,
        tied=False, per_token=True, unused=False, exclude_unused=False, outputs=1,
    )  # fmt: skip
    model, loss_fn = spec.build(torch.float64, 2), nn.MSELoss()
    gen = torch.Generator().manual_seed(2)
    x = spec.input(1, torch.float64, gen)  # one sequence of 3 tokens: [1, 3]
    y = torch.randn(TOKENS, 1, generator=gen, dtype=torch.float64)
    c = curvlab.BlockTridiagonal(model, loss_fn)
    c.update(x, y)
    dense = c.to_dense()
    eigs = torch.linalg.eigvalsh(dense)  # observed: min -38.4, max 40.0
    assert float(eigs.min()) >= -1e-7 * float(eigs.max())
    # the completion agrees with F on the diagonal and chained blocks (observed: 7e-4 off)
    full = _in_order(ref.ggn(model, loss_fn, x, y), c, model)
    order = [c.layers[i] for i in c._order]
    mask = _mask(c, [list(a.params) + list(b.params) for a, b in itertools.pairwise(order)])
    _close(dense * mask, full * mask, 1e-7, "BlockTridiagonal band")


def test_ekfac_eigenbasis_without_kronecker_layers() -> None:
    """Found by the fuzzer: no Kronecker layer at all gives an empty eigenbasis."""
    model = nn.Sequential(nn.LayerNorm(3)).double()
    c = curvlab.EKFAC(model, nn.CrossEntropyLoss())
    c.update(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 2]))
    assert c.scalings() == []
    assert c.eigenbasis() == []
