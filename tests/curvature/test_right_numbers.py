"""Right numbers on every model, against dense float64 references (``tests/reference_any.py``).

* EKFAC's correction is ``diag(Qᵀ F_l Q)`` of each layer's Fisher block, also with several
  loss rows per layer sample (token and pixel losses) and samples coupled by BatchNorm in
  train mode: it comes from per-row gradients (concepts/models.md#rows-samples-and-exactness);
* rows the loss ignores leave K-FAC's input factor where rows map to the layer's samples or
  positions: the batch equals the batch without them (concepts/models.md#rows-the-loss-ignores);
* the diagonal blocks of normalisation layers inside the Kronecker backends are the
  Fisher's diagonal (approximate only for KFAC/KFC under a train-mode BatchNorm, and said so);
* a layer used twice in an ``nn.Sequential``, and ``nn.Sequential`` subclasses with their
  own ``forward`` (which ``engine="auto"`` keeps from BackPACK).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.curvature.kronecker.factored import APPROXIMATE_DIAGONAL
from curvlab.extraction import backpack_engine, choose_engine, hooks
from curvlab.extraction import layers as layer_rules
from tests import reference_any as ref
from tests.zoo import ZOO, PlainAttention, ZooCase, case

DTYPE = torch.float64
# loss rows that are not the layers' samples, or samples coupled by BatchNorm (train mode)
MULTI_ROW = ("gpt_char", "gpt_char_tied", "transformer_plain", "resnet_bn_train", "unet")
# zoo models with normalisation layers (diagonal blocks taken at the layer) or other
# diagonal blocks
WITH_DIAGONAL_BLOCKS = (
    "resnet_bn_train",
    "resnet_bn_eval",
    "transformer_layer",
    "transformer_plain",
    "gpt_char",
    "gpt_char_tied",
    "mixer",
    "unet",
)
# one loss row per sample and nothing coupling the samples: no row is backpropagated alone
ONE_ROW_PER_SAMPLE = (
    "mlp", "cnn", "resnet_bn_eval", "transformer_plain", "mixer", "shared_layer",
    "ignore_index", "mlp_mse", "mlp_bce", "lstm",
)  # fmt: skip


def _setup(c: ZooCase, seed: int = 0) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    model, loss_fn = c.make_model(), c.loss_fn()
    x, y = c.make_batch(torch.Generator().manual_seed(seed))
    return model, loss_fn, x, y


def _close(actual: Tensor, expected: Tensor, rtol: float = 1e-8) -> None:
    atol = rtol * max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-12)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _reference(fisher_type: str, model, loss_fn, x, y) -> Tensor:
    build = ref.ggn if fisher_type == "exact" else ref.empirical_fisher
    return build(model, loss_fn, x, y)


def _in_order(matrix: Tensor, c: curvlab.Curvature, model: nn.Module) -> Tensor:
    """``matrix`` (the reference's parameter order) in ``c.params``' order."""
    start, where = 0, {}
    for _, p in ref.flat_params(model):
        where[id(p)] = torch.arange(start, start + p.numel())
        start += p.numel()
    index = torch.cat([where[id(p)] for p in c.params])
    return matrix[index.unsqueeze(1), index.unsqueeze(0)]


def _layer_blocks(c: curvlab.Curvature, full: Tensor) -> list[Tensor]:
    """Each Kronecker layer's block of ``full`` (``c``'s order) in row-major ``[W | b]``."""
    blocks, start = [], 0
    for layer in c.layers:
        block = full[start : start + layer.numel, start : start + layer.numel]
        inverse = torch.argsort(layer_rules.parameter_order(layer.module))
        blocks.append(block[inverse][:, inverse])
        start += layer.numel
    return blocks


def _check_ekfac(ekfac: curvlab.EKFAC, full: Tensor) -> None:
    """``S* = diag(Qᵀ F_l Q)`` per layer; the trace of each block is the Fisher block's."""
    for (q_g, q_a), s, block in zip(
        ekfac.eigenbasis(), ekfac.scalings(), _layer_blocks(ekfac, full)
    ):
        q = torch.kron(q_g, q_a)
        _close(s.reshape(-1), torch.diagonal(q.T @ block @ q))
        _close(s.sum(), torch.trace(block))


# --- 1. EKFAC's correction from per-row gradients ----------------------------------------


@pytest.mark.parametrize(
    ("fisher_type", "kfac_approx"),
    [("exact", "expand"), ("exact", "reduce"), ("empirical", "expand")],
)
@pytest.mark.parametrize("c", ZOO, ids=lambda c: c.name)
def test_ekfac_correction_is_the_fisher_block_in_its_eigenbasis(
    c: ZooCase, fisher_type: str, kfac_approx: str
) -> None:
    model, loss_fn, x, y = _setup(c)
    ekfac = curvlab.EKFAC(model, loss_fn, fisher_type=fisher_type, kfac_approx=kfac_approx)
    ekfac.update(x, y)
    full = _in_order(_reference(fisher_type, model, loss_fn, x, y), ekfac, model)
    _check_ekfac(ekfac, full)
    # every diagonal block is exact too, so the whole trace is the Fisher's
    _close(ekfac.trace(), torch.trace(full))


def test_one_layer_language_model_block_trace() -> None:
    """The issue's example: a one-layer LM's EKFAC block trace is the Fisher block's
    (it was 36.23 against 22.51 when the rows' columns were squared together)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5)).to(DTYPE)

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, idx: Tensor) -> Tensor:
            h = self.net[0](idx).cumsum(dim=1)  # each token sees the ones before it
            return self.net[1](h).reshape(-1, 5)

    lm, loss_fn = Tokens(), nn.CrossEntropyLoss()
    idx = torch.randint(0, 5, (3, 6))
    y = torch.randint(0, 5, (18,))
    ekfac = curvlab.EKFAC(lm, loss_fn, fisher_type="exact")
    ekfac.update(idx, y)
    _check_ekfac(ekfac, _in_order(ref.ggn(lm, loss_fn, idx, y), ekfac, lm))


class _TokensInTheBatch(nn.Module):
    """A per-token layer on tokens flattened into the batch (``[N·T, D]``, as many layer
    samples as loss rows), then causal attention across them: rows are not samples."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.attn = PlainAttention(4, heads=2, causal=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        h = torch.tanh(self.embed(x.reshape(n * t, 3))).reshape(n, t, 4)
        return self.head(self.attn(h)).reshape(n * t, 3)


class _BatchCentred(nn.Module):
    """Per-token logits with the batch mean subtracted in between: samples are coupled by
    an operation the engine cannot name (found by the exact sample check)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(dim=0, keepdim=True)).reshape(-1, 3)


@pytest.mark.parametrize("make", [_TokensInTheBatch, _BatchCentred], ids=lambda m: m.__name__)
def test_ekfac_is_exact_where_rows_mix_across_layer_samples(make) -> None:
    torch.manual_seed(0)
    model, loss_fn = make().to(DTYPE), nn.CrossEntropyLoss()
    x, y = torch.randn(4, 5, 3, dtype=DTYPE), torch.randint(0, 3, (20,))
    for fisher_type in ("exact", "empirical"):
        ekfac = curvlab.EKFAC(model, loss_fn, fisher_type=fisher_type)
        ekfac.update(x, y)
        full = _in_order(_reference(fisher_type, model, loss_fn, x, y), ekfac, model)
        _check_ekfac(ekfac, full)


class _NoRowsAlone(Exception):
    pass


def _forbid_rows_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise _NoRowsAlone

    monkeypatch.setattr(hooks, "_row_chunks", refuse)


@pytest.mark.parametrize("name", ONE_ROW_PER_SAMPLE)
def test_one_row_per_sample_takes_no_per_row_backward(name: str, monkeypatch) -> None:
    """The common case costs what it did: the columns of all rows go back together."""
    _forbid_rows_alone(monkeypatch)
    model, loss_fn, x, y = _setup(case(name))
    for fisher_type in ("exact", "mc"):
        for backend in ("ekfac", "kfc"):
            curvlab.make(backend, model, loss_fn, fisher_type=fisher_type).update(x, y)


def test_mc_statistics_of_independent_samples_take_no_per_row_backward(monkeypatch) -> None:
    """``"mc"``: the draws of different rows have zero mean, so without coupling the
    per-sample squares are unbiased, also with several rows per sample."""
    _forbid_rows_alone(monkeypatch)
    model, loss_fn, x, y = _setup(case("gpt_char"))
    for backend in ("ekfac", "kfc"):
        curvlab.make(backend, model, loss_fn, fisher_type="mc").update(x, y)


def test_mc_correction_under_batchnorm_is_unbiased() -> None:
    """``"mc"`` with samples coupled by a train-mode BatchNorm goes row by row too: with
    many draws the correction approaches the exact one (per-sample squares overshoot
    the trace by up to 3×)."""
    model, loss_fn, x, y = _setup(case("resnet_bn_train"))
    exact = curvlab.EKFAC(model, loss_fn, fisher_type="exact")
    exact.update(x, y)
    torch.manual_seed(0)
    mc = curvlab.EKFAC(model, loss_fn, fisher_type="mc", mc_samples=2000)
    mc.update(x, y)
    for s_mc, s_exact in zip(mc.scalings(), exact.scalings()):
        assert abs(float(s_mc.sum() / s_exact.sum()) - 1.0) < 0.05


# --- 2. rows the loss ignores ------------------------------------------------------------


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(DTYPE)


KRONECKER_BACKENDS = [
    ("kfac", {}),
    ("kfc", {"kfac_approx": "reduce"}),
    ("ekfac", {}),
    ("block_tridiagonal_kfac", {"exclude": ["2"]}),  # not the LayerNorm
]


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
@pytest.mark.parametrize(("name", "options"), KRONECKER_BACKENDS, ids=lambda v: str(v))
def test_ignored_rows_are_no_part_of_the_batch(name: str, options: dict, fisher_type: str):
    model, loss_fn = _classifier(), nn.CrossEntropyLoss(ignore_index=-100)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (20,), generator=gen)
    ignored = y.clone()
    ignored[::3] = -100  # 7 of 20 rows (35 %)
    keep = ignored != -100
    with_ignored = curvlab.make(name, model, loss_fn, fisher_type=fisher_type, **options)
    with_ignored.update(x, ignored)
    without = curvlab.make(name, model, loss_fn, fisher_type=fisher_type, **options)
    without.update(x[keep], y[keep])
    _close(with_ignored.to_dense(), without.to_dense(), rtol=1e-10)
    if name not in ("ekfac", "block_tridiagonal_kfac"):
        for a, b in zip(with_ignored.factors(), without.factors()):
            _close(a.A, b.A, rtol=1e-12)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("backend", ["kfc", "ekfac"])
def test_padding_targets_are_a_padding_mask(backend: str, kfac_approx: str) -> None:
    """Right-padded sequences of a causal LM whose padding targets are ``ignore_index``:
    the curvature of the batch cut before the padding (per-token layers leave the padded
    positions out of ``A``; no gradient reaches them)."""
    model, _, x, y = _setup(case("gpt_char"))
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    n, t = x.shape
    padded = y.reshape(n, t).clone()
    padded[:, t - 1 :] = -100
    for fisher_type in ("exact", "empirical"):
        full = curvlab.make(
            backend, model, loss_fn, fisher_type=fisher_type, kfac_approx=kfac_approx
        )
        full.update(x, padded.reshape(-1))
        cut = curvlab.make(
            backend, model, loss_fn, fisher_type=fisher_type, kfac_approx=kfac_approx
        )
        cut.update(x[:, : t - 1], y.reshape(n, t)[:, : t - 1].reshape(-1))
        _close(full.to_dense(), cut.to_dense(), rtol=1e-10)


def test_padding_of_different_lengths_leaves_a() -> None:
    """Sequences padded to different lengths: ``A`` of each per-token layer is the mean of
    ``ā āᵀ`` over the positions whose targets count."""
    model, _, x, y = _setup(case("gpt_char"))
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    n, t = x.shape
    lengths = torch.tensor([t, 1, 3, 2])
    counted = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)  # [N, T]
    y = y.reshape(n, t).masked_fill(~counted, -100).reshape(-1)
    kfc = curvlab.KFC(model, loss_fn, fisher_type="exact")
    kfc.update(x, y)
    inputs = ref.layer_io(model, x, [layer.module for layer in kfc.layers])
    for layer, f in zip(kfc.layers, kfc.factors()):
        ((a, _),) = inputs[layer.module]
        if isinstance(layer.module, nn.Embedding):
            a = nn.functional.one_hot(a, layer.module.num_embeddings).to(DTYPE)
        else:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        a = a[counted]
        expected = a.T @ a / len(a)
        if isinstance(layer.module, nn.Embedding):  # one-hot: kept as its diagonal
            _close(torch.diag(torch.diagonal(expected)), expected, rtol=1e-12)
            expected = torch.diagonal(expected)
        _close(f.A, expected, rtol=1e-12)


# --- 3. diagonal blocks of normalisation layers ------------------------------------------


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
@pytest.mark.parametrize("backend", ["kfac", "kfc", "ekfac"])
@pytest.mark.parametrize("name", WITH_DIAGONAL_BLOCKS)
def test_diagonal_blocks_are_the_fisher_diagonal(name: str, backend: str, fisher_type: str):
    model, loss_fn, x, y = _setup(case(name))
    c = curvlab.make(backend, model, loss_fn, fisher_type=fisher_type)
    c.update(x, y)
    full = _in_order(_reference(fisher_type, model, loss_fn, x, y), c, model)
    start = sum(layer.numel for layer in c.layers)
    actual, expected = torch.diagonal(c.to_dense())[start:], torch.diagonal(full)[start:]
    coverage = c.coverage()
    approximate = torch.cat([
        torch.full((p.numel(),), coverage[n] == APPROXIMATE_DIAGONAL)
        for p, n in zip(c.params, c.param_names)
    ])[start:]  # fmt: skip
    if name == "resnet_bn_train" and backend != "ekfac":
        # per-sample gradients of samples the BatchNorm couples: said so, and positive
        bn = {n for n in coverage if ".bn" in n}
        assert {coverage[n] for n in bn} == {APPROXIMATE_DIAGONAL}
        assert bool((actual[approximate] > 0).all())
    else:
        assert not bool(approximate.any())
    _close(actual[~approximate], expected[~approximate])


def test_a_normalisation_layer_used_twice_adds_its_gradients_before_squaring() -> None:
    torch.manual_seed(0)
    norm = nn.LayerNorm(4)
    model = nn.Sequential(nn.Linear(3, 4), norm, nn.Tanh(), nn.Linear(4, 4), norm, nn.Linear(4, 3))
    model = model.to(DTYPE)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randint(0, 3, (6,))
    for backend in ("kfac", "ekfac"):
        c = curvlab.make(backend, model, loss_fn, fisher_type="exact")
        c.update(x, y)
        full = _in_order(ref.ggn(model, loss_fn, x, y), c, model)
        start = sum(layer.numel for layer in c.layers)
        _close(torch.diagonal(c.to_dense())[start:], torch.diagonal(full)[start:])


# --- 4. a layer used twice in an nn.Sequential -------------------------------------------


def _twice() -> nn.Module:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    return nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_a_layer_used_twice_in_a_sequential(fisher_type: str) -> None:
    model, loss_fn = _twice(), nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (6,), generator=gen)
    expected = _reference(fisher_type, model, loss_fn, x, y)
    dense = {
        "exact_fisher" if fisher_type == "exact" else "empirical_fisher": lambda f: f,
        "block_diagonal": None,
        "diagonal": lambda f: torch.diag(torch.diagonal(f)),
    }
    for name, view in dense.items():
        options = {} if name == "empirical_fisher" else {"fisher_type": fisher_type}
        c = curvlab.make(name, model, loss_fn, **options)
        assert c.params == [p for _, p in ref.flat_params(model)]
        with c.recording():  # the recorded path as well as update()
            loss = loss_fn(model(x), y)
        c.accumulate(loss)
        full = _in_order(expected, c, model)
        if view is None:  # the shared layer's block and the head's
            mask = torch.zeros_like(full, dtype=torch.bool)
            start = 0
            for layer in c.layers:
                mask[start : start + layer.numel, start : start + layer.numel] = True
                start += layer.numel
            _close(c.to_dense(), full * mask)
        else:
            _close(c.to_dense(), view(full))
    for approx in ("expand", "reduce"):
        kfc = curvlab.KFC(model, loss_fn, fisher_type=fisher_type, kfac_approx=approx)
        assert set(kfc.coverage().values()) == {"kronecker"}  # one layer called twice
        kfc.update(x, y)
        names = [layer.name for layer in kfc.layers]
        factors = ref.kfac_reference(model, loss_fn, x, y, names, fisher_type, approx)
        _close(kfc.to_dense(), _in_order(ref.kfac_dense(model, factors), kfc, model))
    ekfac = curvlab.EKFAC(model, loss_fn, fisher_type=fisher_type)
    ekfac.update(x, y)
    _check_ekfac(ekfac, _in_order(expected, ekfac, model))


# --- 5. nn.Sequential subclasses ----------------------------------------------------------


class _Scaled(nn.Sequential):
    """An ``nn.Sequential`` whose own ``forward`` does more than run its children."""

    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * super().forward(x) + 0.5


class _Plain(nn.Sequential):
    """A subclass that keeps ``nn.Sequential.forward``."""


def _layers() -> list[nn.Module]:
    return [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)]


@pytest.mark.parametrize("name", curvlab.curvature.registry.available())
def test_sequential_subclass_with_its_own_forward(name: str) -> None:
    torch.manual_seed(0)
    model, loss_fn = _Scaled(*_layers()).to(DTYPE), nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (8,), generator=gen)
    reason = backpack_engine.unsupported_reason(
        model, curvlab.make(name, model, loss_fn).requests()
    )
    assert reason is not None and "subclasses nn.Sequential with its own forward" in reason
    with pytest.raises(ValueError, match="its own forward"):
        curvlab.make(name, model, loss_fn, engine="backpack")
    fisher = {} if name == "empirical_fisher" else {"fisher_type": "exact"}
    auto = curvlab.make(name, model, loss_fn, **fisher)
    assert choose_engine(model, auto.requests(), "auto") == "hooks"
    auto.update(x, y)
    forced = curvlab.make(name, model, loss_fn, engine="hooks", **fisher)
    forced.update(x, y)
    _close(auto.to_dense(), forced.to_dense(), rtol=1e-12)
    if name in ("exact_fisher", "diagonal"):
        expected = _in_order(ref.ggn(model, loss_fn, x, y), auto, model)
        if name == "diagonal":
            expected = torch.diag(torch.diagonal(expected))
        _close(auto.to_dense(), expected)
    if name == "ekfac":
        _check_ekfac(auto, _in_order(ref.ggn(model, loss_fn, x, y), auto, model))


def test_sequential_subclass_without_its_own_forward_may_take_backpack() -> None:
    model, loss_fn = _Plain(*_layers()).to(DTYPE), nn.CrossEntropyLoss()
    requests = curvlab.ExactFisher(model, loss_fn).requests()
    assert backpack_engine.unsupported_reason(model, requests) is None
    assert choose_engine(model, requests, "auto") == "backpack"


class _ClassesOnDimensionOne(nn.Module):
    """The character model with ``[N, V, T]`` logits (the loss makes the rows)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, idx: Tensor) -> Tensor:
        n, t = idx.shape
        return self.lm(idx).reshape(n, t, -1).transpose(1, 2)


@pytest.mark.parametrize("backend", ["kfc", "ekfac"])
def test_padding_targets_with_classes_on_dimension_one(backend: str) -> None:
    model, _, x, y = _setup(case("gpt_char"))
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    n, t = x.shape
    y = y.reshape(n, t).clone()
    y[0, 2:] = -100
    y[2, 1:] = -100
    wide = _ClassesOnDimensionOne(model)
    for fisher_type in ("exact", "empirical"):
        flat = curvlab.make(backend, model, loss_fn, fisher_type=fisher_type)
        flat.update(x, y.reshape(-1))
        rows = curvlab.make(backend, wide, loss_fn, fisher_type=fisher_type)
        rows.update(x, y)
        _close(rows.to_dense(), flat.to_dense(), rtol=1e-10)
        if backend == "kfc":
            assert any(  # the padding left A
                not torch.allclose(a.A, b.A) for a, b in zip(flat.factors(), _unmasked(x, y))
            )


def _unmasked(x: Tensor, y: Tensor) -> list:
    """KFC's factors of the same batch with nothing ignored (every input in ``A``)."""
    model, loss_fn, _, _ = _setup(case("gpt_char"))
    kfc = curvlab.KFC(model, loss_fn, fisher_type="exact")
    kfc.update(x, y.clamp(min=0).reshape(-1))
    return kfc.factors()
