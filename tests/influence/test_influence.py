"""Influence scores against independent float64 references.

The reference of a score is ``−g_qᵀ (F + λI)⁻¹ g_z`` with ``g`` the gradient of the
example's own loss (``loss_fn`` on that example alone, one autograd call per example) and
``F`` either the dense GGN built with ``torch.func`` Jacobians (tests/reference.py, no
curvlab) or, for a structured backend, its own ``to_dense()``; the solve is a dense
float64 ``torch.linalg.solve``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.influence import Influence, InfluenceScores, LossTask, Task
from tests import reference, zoo

DAMPING = 1e-2


def _data(case: zoo.ZooCase, batches: int = 3, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [case.make_batch(generator) for _ in range(batches)]


def _cat(loader: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    return torch.cat([x for x, _ in loader]), torch.cat([y for _, y in loader])


def _example_grads(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, order: list[str] | None = None
) -> Tensor:
    """``[N, P]``: ``∇ℓ_n`` of ``loss_fn`` on example ``n`` alone (plain autograd), the
    parameters in ``order`` (names; default ``model.named_parameters()``)."""
    plain = reference.unhooked_copy(model)
    loss = reference.unhooked_loss(loss_fn)
    named = dict(reference.flat_params(plain))
    params = [named[name] for name in (order or list(named))]
    rows = []
    for n in range(len(X)):
        out = plain(X[n : n + 1])
        target = y[n : n + 1]
        if out.shape[0] != 1:  # per-token rows [T, C], targets [1, T]
            target = target.reshape(out.shape[0], *y.shape[2:])
        g = torch.autograd.grad(loss(out, target), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


def _dense_scores(F: Tensor, g_q: Tensor, g_z: Tensor, damping: float = DAMPING) -> Tensor:
    eye = torch.eye(len(F), dtype=F.dtype)
    return -g_q @ torch.linalg.solve(F + damping * eye, g_z.T)


MODELS = {
    "mlp_ce": ("mlp", None),
    "mlp_mse_sum": ("mlp_mse", None),
    "mlp_mse_mean": ("mlp_mse", lambda: nn.MSELoss()),
    "cnn_ce": ("cnn", None),
}


def _build(key: str) -> tuple[nn.Module, nn.Module, zoo.ZooCase]:
    name, loss = MODELS[key]
    case = zoo.case(name)
    return case.make_model(), (loss or case.loss_fn)(), case


@pytest.mark.parametrize("key", list(MODELS))
def test_exact_backend_equals_dense_ggn_reference(key: str) -> None:
    model, loss_fn, case = _build(key)
    train = _data(case)
    X, y = _cat(train)
    Xq, yq = case.make_batch(torch.Generator().manual_seed(7))
    F = reference.ggn(model, loss_fn, X, y)  # torch.func Jacobians, no curvlab
    expected = _dense_scores(
        F, _example_grads(model, loss_fn, Xq, yq), _example_grads(model, loss_fn, X, y)
    )

    exact = curvlab.make("exact_fisher", model, loss_fn, fisher_type="exact")
    influence = Influence(exact, damping=DAMPING, progress=False).fit(train)
    scores = influence.pairwise((Xq, yq), train, per_module=True)
    torch.testing.assert_close(scores.scores, expected, rtol=1e-8, atol=1e-12)
    assert scores.modules is not None
    torch.testing.assert_close(sum(scores.modules.values()), expected, rtol=1e-8, atol=1e-12)
    own = influence.self_influence(train)
    torch.testing.assert_close(
        own.scores,
        torch.diagonal(_dense_scores(F, *[_example_grads(model, loss_fn, X, y)] * 2)),
        rtol=1e-8,
        atol=1e-12,
    )
    assert bool((own.scores <= 0).all())


BACKENDS = {
    "exact": ("exact_fisher", {"fisher_type": "exact"}),
    "diagonal": ("diagonal", {"fisher_type": "exact"}),
    "block_diagonal": ("block_diagonal", {"fisher_type": "exact"}),
    "kfac": ("kfac", {"fisher_type": "exact"}),
    "kfac_factored": ("kfac", {"fisher_type": "exact", "damping_mode": "factored"}),
    "ekfac": ("ekfac", {"fisher_type": "exact"}),
}


def _own_reference(c: curvlab.Curvature, g_q: Tensor, g_z: Tensor, name: str) -> Tensor:
    """The backend's damped inverse as a dense matrix: ``to_dense`` (+ λI) for the exact
    damped backends; for factored damping, the solve's own matrix column by column."""
    if name != "kfac_factored":
        return _dense_scores(c.to_dense(), g_q, g_z)
    inverse = c.inverse(DAMPING) @ torch.eye(c.num_params, dtype=g_q.dtype)
    return -g_q @ inverse @ g_z.T


@pytest.mark.parametrize("key", ["mlp_ce", "mlp_mse_mean", "cnn_ce"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backend_scores_equal_its_own_dense_solve(backend: str, key: str) -> None:
    model, loss_fn, case = _build(key)
    train = _data(case)
    X, y = _cat(train)
    Xq, yq = case.make_batch(torch.Generator().manual_seed(7))
    name, kwargs = BACKENDS[backend]
    c = curvlab.make(name, model, loss_fn, **kwargs)
    influence = Influence(c, damping=DAMPING, progress=False).fit(train)
    g_q, g_z = _example_grads(model, loss_fn, Xq, yq), _example_grads(model, loss_fn, X, y)
    expected = _own_reference(c, g_q, g_z, backend)
    pairwise = influence.pairwise((Xq, yq), train, per_module=True)
    torch.testing.assert_close(pairwise.scores, expected, rtol=1e-8, atol=1e-12)
    own = influence.self_influence(train, per_module=True)
    expected_self = torch.diagonal(_own_reference(c, g_z, g_z, backend))
    torch.testing.assert_close(own.scores, expected_self, rtol=1e-8, atol=1e-12)
    assert own.modules is not None and set(own.modules) == {"0", "2"} | (
        {"4"} if key == "cnn_ce" else set()
    )
    torch.testing.assert_close(sum(own.modules.values()), own.scores, rtol=1e-10, atol=1e-12)
    uses_eigenbasis = backend in ("kfac", "ekfac")
    assert pairwise.settings["eigenbasis"] is uses_eigenbasis


class TokenTask(Task):
    """Per-token model: ``forward`` returns ``[N·T, C]`` rows, targets ``[N, T]``."""

    def __init__(self, loss_fn: nn.Module) -> None:
        self.loss_fn = loss_fn

    def compute_train_loss(self, batch, model) -> Tensor:
        x, y = batch
        return sum(self.loss_fn(model(x[n : n + 1]), y[n]) for n in range(len(x)))


@pytest.mark.parametrize("case_name", ["gpt_char_tied", "resnet_bn_eval", "transformer_plain"])
@pytest.mark.parametrize("backend", ["kfac", "ekfac", "diagonal"])
def test_every_parameter_of_zoo_models(case_name: str, backend: str) -> None:
    """Embeddings, tied weights, norms, attention: every covered parameter has a gradient
    and the scores equal the backend's dense solve."""
    case = zoo.case(case_name)
    model, loss_fn = case.make_model().eval(), case.loss_fn()
    train = _data(case, batches=2)
    if case_name.startswith("gpt"):  # per-token targets per example: [N, T]
        train = [(x, y.reshape(len(x), -1)) for x, y in train]
    X, y = _cat(train)
    c = curvlab.make(backend, model, loss_fn, fisher_type="exact")
    influence = Influence(c, damping=DAMPING, progress=False)
    influence.fit([(x, y.reshape(-1)) for x, y in train])
    assert set(c.coverage()) == {n for n, p in model.named_parameters() if p.requires_grad}
    g = _example_grads(model, loss_fn, X, y, order=c.param_names)
    expected = torch.diagonal(_dense_scores(c.to_dense(), g, g))
    scores = influence.self_influence(train).scores
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-12)
    pairwise = Influence(c, TokenTask(loss_fn), damping=DAMPING, progress=False)
    if case_name.startswith("gpt"):  # a Task of one's own gives the same numbers
        torch.testing.assert_close(
            pairwise.pairwise(train[0], train).scores,
            _dense_scores(c.to_dense(), g[: len(train[0][0])], g),
            rtol=1e-8,
            atol=1e-12,
        )


def test_low_rank_queries_report_their_error() -> None:
    model, loss_fn, case = _build("mlp_ce")
    train = _data(case)
    c = curvlab.make("kfac", model, loss_fn, fisher_type="exact")
    influence = Influence(c, damping=DAMPING, progress=False).fit(train)
    query = case.make_batch(torch.Generator().manual_seed(7))
    full = influence.pairwise(query, train)
    same = influence.pairwise(query, train, query_rank=5)  # full rank of [5, 4] and [3, 5]
    torch.testing.assert_close(same.scores, full.scores, rtol=1e-10, atol=1e-12)
    assert same.settings["query_error"] == pytest.approx(0.0, abs=1e-12)
    low = influence.pairwise(query, train, query_rank=1)
    # the reported error is ‖H − H₁‖_F / ‖H‖_F over the preconditioned query gradients,
    # each layer's as its [W | b] matrix
    grads = influence.precondition(influence.query_gradients(query))
    num = den = 0.0
    for weight, bias in zip(grads[::2], grads[1::2]):
        s = torch.linalg.svdvals(torch.cat([weight, bias[..., None]], dim=-1))
        num += float((s[:, 1:] ** 2).sum())
        den += float((s**2).sum())
    assert low.settings["query_rank"] == 1
    assert low.settings["query_error"] == pytest.approx((num / den) ** 0.5, rel=1e-10)
    # the factored scores use the rank-1 factors; the vmap path the same approximation
    unfactored = Influence(c, damping=DAMPING, factored=False, progress=False)
    again = unfactored.pairwise(query, train, query_rank=1)
    assert low.settings["factored"] and not again.settings["factored"]
    torch.testing.assert_close(low.scores, again.scores, rtol=1e-9, atol=1e-12)
    assert 0.0 < low.settings["query_error"] < 1.0
    assert not torch.allclose(low.scores, full.scores)


def test_query_chunks_and_score_dtypes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))  # float32
    loss_fn = nn.CrossEntropyLoss()
    train = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(2)]
    queries = [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(2)]
    c = curvlab.KFAC(model, loss_fn, fisher_type="exact", factor_dtype=torch.float64)
    c.update(train)
    reference_scores = Influence(c, damping=DAMPING, score_dtype=torch.float64, progress=False)
    expected = reference_scores.pairwise(queries, train).scores
    assert expected.dtype == torch.float64 and expected.shape == (10, 32)
    for dtype, rtol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
        got = Influence(c, damping=DAMPING, score_dtype=dtype, progress=False).pairwise(
            queries, train, query_batch_size=3
        )
        assert got.scores.dtype == dtype and got.settings["query_batch_size"] == 3
        scale = float(expected.abs().max())
        torch.testing.assert_close(got.scores.double(), expected, rtol=rtol, atol=rtol * scale)


def test_save_and_load_keep_scores_and_settings(tmp_path) -> None:
    model, loss_fn, case = _build("mlp_ce")
    train = _data(case)
    c = curvlab.make("ekfac", model, loss_fn, fisher_type="exact")
    result = Influence(c, damping=DAMPING, progress=False).fit(train)
    scores = result.pairwise(train[0], train, per_module=True)
    scores.save(tmp_path / "scores.pt")
    loaded = InfluenceScores.load(tmp_path / "scores.pt")
    torch.testing.assert_close(loaded.scores, scores.scores, rtol=0, atol=0)
    assert loaded.modules is not None and scores.modules is not None
    assert loaded.modules.keys() == scores.modules.keys()
    assert loaded.settings == scores.settings
    assert loaded.settings["backend"] == "EKFAC" and loaded.settings["damping"] == DAMPING
    assert loaded.kind == "pairwise"
    helpful = loaded.top(2, query=0)
    assert helpful.tolist() == torch.argsort(scores.scores[0])[:2].tolist()


def test_pad_mask_leaves_padding_out_of_the_loss() -> None:
    """A masked position changes nothing: same gradient as the example without it."""
    case = zoo.case("gpt_char")
    model, loss_fn = case.make_model(), case.loss_fn()
    x, y = case.make_batch(torch.Generator().manual_seed(0))
    y = y.reshape(len(x), -1)
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[:, -1] = False
    c = curvlab.make("kfac", model, loss_fn, fisher_type="exact")
    masked = Influence(c, LossTask(loss_fn, pad_mask=lambda batch: mask[: len(batch[0])]))
    y_ignored = y.clone()
    y_ignored[:, -1] = -100  # CrossEntropyLoss's ignore_index: the same rows dropped
    plain = Influence(c, LossTask(loss_fn))
    for got, want in zip(masked.train_gradients((x, y)), plain.train_gradients((x, y_ignored))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    unmasked = plain.train_gradients((x, y))
    assert not torch.allclose(unmasked[0], masked.train_gradients((x, y))[0])


def test_clear_errors() -> None:
    model, loss_fn, case = _build("mlp_ce")
    c = curvlab.make("kfac", model, loss_fn)
    with pytest.raises(ValueError, match="damping"):
        Influence(c, damping=0.0)
    with pytest.raises(TypeError, match="task"):
        Influence(c, task=loss_fn)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="curvature"):
        Influence(model)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="score_dtype"):
        Influence(c, score_dtype=torch.int32)
    train = _data(case)
    influence = Influence(c, progress=False).fit(train)
    with pytest.raises(ValueError, match="query_rank"):
        influence.pairwise(train[0], train, query_rank=0)
    bn = zoo.case("resnet_bn_train")
    bn_model = bn.make_model()
    with pytest.raises(RuntimeError, match=r"model\.eval\(\)"):
        Influence(curvlab.make("diagonal", bn_model, bn.loss_fn())).train_gradients(
            bn.make_batch(torch.Generator().manual_seed(0))
        )
    with pytest.raises(ValueError, match="LossTask"):
        LossTask(loss_fn).compute_train_loss(torch.zeros(2, 4), model)
    with pytest.raises(ValueError, match="kind"):
        InfluenceScores(torch.zeros(2), "other")
    with pytest.raises(TypeError, match="plain value"):
        InfluenceScores(torch.zeros(2), "self", settings={"x": torch.zeros(1)})


def test_model_is_left_untouched() -> None:
    model, loss_fn, case = _build("mlp_ce")
    before = copy.deepcopy(model.state_dict())
    train = _data(case)
    c = curvlab.make("ekfac", model, loss_fn)
    Influence(c, progress=False).fit(train).pairwise(train[0], train)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())


class TokenModel(nn.Module):
    """Embedding and a Linear over the tokens: weight sharing (``T > 1``) in both layers;
    ``[N, T]`` tokens in, ``[N·T, C]`` rows out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(x))).flatten(0, 1)


@pytest.mark.parametrize("backend", ["kfac", "ekfac"])
def test_factored_gradients_with_weight_sharing(backend: str) -> None:
    """Embedding and per-token Linear layers (``T = 4``): the factored path equals the
    backend's dense solve with independent per-example gradients."""
    torch.manual_seed(0)
    model, loss_fn = TokenModel().double(), nn.CrossEntropyLoss()
    train = [(torch.randint(0, 7, (5, 4)), torch.randint(0, 3, (5, 4))) for _ in range(2)]
    c = curvlab.make(backend, model, loss_fn, fisher_type="exact")
    assert set(c.coverage().values()) == {"kronecker"}
    influence = Influence(c, damping=DAMPING, factored=True, progress=False)
    influence.fit([(x, y.reshape(-1)) for x, y in train])
    X, y = _cat(train)
    g = _example_grads(model, loss_fn, X, y, order=c.param_names)
    expected = _dense_scores(c.to_dense(), g[:5], g)
    pairwise = influence.pairwise(train[0], train)
    assert pairwise.settings["factored"] is True
    torch.testing.assert_close(pairwise.scores, expected, rtol=1e-8, atol=1e-12)
    own = influence.self_influence(train, per_module=True)
    assert own.modules is not None and set(own.modules) == {"embed", "head"}
    torch.testing.assert_close(
        own.scores, torch.diagonal(_dense_scores(c.to_dense(), g, g)), rtol=1e-8, atol=1e-12
    )
    low = influence.pairwise(train[0], train, query_rank=1)
    vmapped = Influence(c, damping=DAMPING, factored=False, progress=False)
    torch.testing.assert_close(
        low.scores, vmapped.pairwise(train[0], train, query_rank=1).scores, rtol=1e-9, atol=1e-12
    )


def test_factored_true_refuses_backends_without_it() -> None:
    case = zoo.case("resnet_bn_eval")  # BatchNorm parameters sit in diagonal blocks
    c = curvlab.make("kfac", case.make_model().eval(), case.loss_fn(), fisher_type="exact")
    influence = Influence(c, damping=DAMPING, factored=True, progress=False)
    train = _data(case, batches=1)
    influence.fit(train)
    with pytest.raises(ValueError, match="factored=True"):
        influence.self_influence(train)
    with pytest.raises(TypeError, match="factored"):
        Influence(c, factored="yes")  # type: ignore[arg-type]
