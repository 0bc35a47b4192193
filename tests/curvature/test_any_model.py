"""Every backend and Fisher type on the model zoo, against float64 references.

The references (``tests/reference_any.py``) are independent: dense Jacobians of the whole
batch from ``torch.func`` for the exact and empirical Fisher, and K-FAC's factors from
their definition on per-sample, per-position layer quantities. The zoo
(``tests/zoo.py``) holds ResNets with BatchNorm (train and eval), transformers from
``nn.TransformerEncoderLayer`` and from plain ``nn.Linear``, GPT-like character models
(with and without tied weights), LSTM and GRU classifiers, a U-Net, an MLP-Mixer, a layer
called twice, a frozen bias and ``ignore_index`` targets.
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.extraction import choose_engine
from tests import reference_any as ref
from tests.zoo import ZOO, ZooCase

FISHER = ("exact", "empirical")
# rows of the output are the samples and nothing couples samples (BatchNorm in train mode
# does): the per-sample decompositions (EKFAC's S*) reproduce the Fisher's block
PER_SAMPLE_ROWS = {
    "mlp", "cnn", "resnet_bn_eval", "transformer_layer", "transformer_plain", "lstm", "gru",
    "mixer", "mlp_mse", "mlp_bce", "shared_layer", "frozen_bias", "ignore_index",
}  # fmt: skip


def _setup(case: ZooCase, seed: int = 0) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    model, loss_fn = case.make_model(), case.loss_fn()
    x, y = case.make_batch(torch.Generator().manual_seed(seed))
    return model, loss_fn, x, y


def _close(actual: Tensor, expected: Tensor, rtol: float = 1e-8) -> None:
    atol = rtol * max(float(expected.abs().max()), 1e-12)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _reference(fisher_type: str, model, loss_fn, x, y) -> Tensor:
    build = ref.ggn if fisher_type == "exact" else ref.empirical_fisher
    return build(model, loss_fn, x, y)


def _offsets(c: curvlab.Curvature, model: nn.Module) -> Tensor:
    """Indices of ``c.params``' entries in the reference's flat parameter order."""
    start, where = 0, {}
    for _, p in ref.flat_params(model):
        where[id(p)] = torch.arange(start, start + p.numel())
        start += p.numel()
    return torch.cat([where[id(p)] for p in c.params])


def _in_curvature_order(matrix: Tensor, c: curvlab.Curvature, model: nn.Module) -> Tensor:
    index = _offsets(c, model)
    return matrix[index.unsqueeze(1), index.unsqueeze(0)]


def _block_mask(c: curvlab.Curvature, groups: list[list[nn.Parameter]]) -> Tensor:
    sizes = {id(p): p.numel() for p in c.params}
    mask = torch.zeros(c.num_params, c.num_params, dtype=torch.bool)
    position, start = {}, 0
    for p in c.params:
        position[id(p)] = start
        start += sizes[id(p)]
    for group in groups:
        index = torch.cat(
            [torch.arange(position[id(p)], position[id(p)] + p.numel()) for p in group]
        )
        mask[index.unsqueeze(1), index.unsqueeze(0)] = True
    return mask


@pytest.mark.parametrize("fisher_type", FISHER)
@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_dense_backends_equal_the_reference(case: ZooCase, fisher_type: str) -> None:
    model, loss_fn, x, y = _setup(case)
    expected = _reference(fisher_type, model, loss_fn, x, y)
    full_cls = curvlab.ExactFisher if fisher_type == "exact" else curvlab.EmpiricalFisher
    full = full_cls(model, loss_fn)
    blocks = curvlab.BlockDiagonal(model, loss_fn, fisher_type=fisher_type)
    diagonal = curvlab.DiagonalFisher(model, loss_fn, fisher_type=fisher_type)
    tri = curvlab.BlockTridiagonal(model, loss_fn, fisher_type=fisher_type)
    curvlab.extract(model, loss_fn, x, y, [full, blocks, diagonal, tri])
    # every trainable parameter, once (tied weights too), in the order of model.parameters()
    assert full.params == [p for _, p in ref.flat_params(model)]
    _close(full.to_dense(), expected)
    mask = _block_mask(blocks, [list(layer.params) for layer in blocks.layers])
    _close(blocks.to_dense(), expected * mask)
    _close(diagonal.to_dense(), torch.diag(torch.diagonal(expected)))
    # the tridiagonal completion agrees with F on the diagonal and chained blocks
    order = [tri.layers[i] for i in tri._order]
    chained = [list(a.params) + list(b.params) for a, b in itertools.pairwise(order)]
    mask = _block_mask(tri, chained or [list(order[0].params)])
    _close(tri.to_dense() * mask, expected * mask, rtol=1e-7)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", FISHER)
@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_kronecker_backends_equal_their_definition(
    case: ZooCase, fisher_type: str, kfac_approx: str
) -> None:
    model, loss_fn, x, y = _setup(case)
    kfc = curvlab.KFC(model, loss_fn, fisher_type=fisher_type, kfac_approx=kfac_approx)
    kfc.update(x, y)
    coverage = kfc.coverage()
    assert set(coverage) == {n for n, _ in ref.flat_params(model)}  # 100 % covered
    # a tied embedding/head weight's block adds the embedding's kron (tied="kronecker")
    names = [layer.name for layer in kfc.layers] + [e.name for e in kfc._partners.values()]
    # rows the loss ignores are no part of the batch, A included (independent samples):
    # the reference of the batch without them (concepts/models.md#rows-the-loss-ignores)
    keep = ref.valid_rows(loss_fn, y, len(y))
    rx, ry = (x, y) if bool(keep.all()) else (x[keep], y[keep])
    factors = ref.kfac_reference(
        model, loss_fn, rx, ry, names, fisher_type, kfac_approx, sqrt="curvlinops"
    )
    for layer, f in zip(kfc.layers, kfc.factors()):
        a, g = factors[layer.name]
        _close(torch.diag(f.A) if f.A.ndim == 1 else f.A, a)  # a diagonal A: its vector
        _close(f.G, g, rtol=1e-7)
    # the dense matrix: Kronecker blocks in parameter order, then the diagonal blocks
    expected = _in_curvature_order(ref.kfac_dense(model, factors), kfc, model)
    tail = [p for layer in kfc._other for p in layer.params]
    actual = kfc.to_dense()
    if tail:
        full = _in_curvature_order(_reference(fisher_type, model, loss_fn, x, y), kfc, model)
        start = kfc.num_params - sum(p.numel() for p in tail)
        diag = torch.diagonal(full)[start:]
        expected[start:, start:] = torch.diag(diag)
        if case.name not in PER_SAMPLE_ROWS:
            # normalisation layers take per-sample gradients at the layer, which treats
            # the samples there as independent (as K-FAC does): exact only where rows are
            # samples and nothing couples them; elsewhere only the other parameters are
            at_layer = torch.cat([
                torch.full((p.numel(),), id(p) in kfc._diag()._local) for p in tail
            ])  # fmt: skip
            assert bool((torch.diagonal(actual)[start:][at_layer] >= 0).all())
            keep = torch.ones(kfc.num_params, dtype=torch.bool)
            keep[start:] = ~at_layer
            actual, expected = actual[keep][:, keep], expected[keep][:, keep]
    _close(actual, expected, rtol=1e-7)


@pytest.mark.parametrize(
    "case", [c for c in ZOO if c.name in PER_SAMPLE_ROWS], ids=lambda c: c.name
)
def test_ekfac_diagonal_is_the_fisher_in_its_eigenbasis(case: ZooCase) -> None:
    """``S* = diag(Qᵀ F_l Q)`` for each Kronecker layer's exact Fisher block ``F_l``."""
    model, loss_fn, x, y = _setup(case)
    ekfac = curvlab.EKFAC(model, loss_fn, fisher_type="exact")
    ekfac.update(x, y)
    full = _in_curvature_order(ref.ggn(model, loss_fn, x, y), ekfac, model)
    start = 0
    for layer, (q_g, q_a), s in zip(ekfac.layers, ekfac.eigenbasis(), ekfac.scalings()):
        perm = curvlab.extraction.layers.parameter_order(layer.module)
        block = full[start : start + layer.numel, start : start + layer.numel]
        inverse = torch.argsort(perm)
        block = block[inverse][:, inverse]  # parameter order -> row-major [W | b] order
        q = torch.kron(q_g, q_a)
        _close(s.reshape(-1), torch.diagonal(q.T @ block @ q), rtol=1e-7)
        start += layer.numel


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_natural_gradient_lowers_the_loss(case: ZooCase) -> None:
    model, loss_fn, x, y = _setup(case)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = curvlab.NaturalGradient(
        curvlab.KFC(model, loss_fn), damping=0.1, kl_clip=1e-2, optimizer=opt
    )
    with torch.no_grad():
        start = float(loss_fn(model(x), y))
    torch.manual_seed(0)
    for _ in range(5):
        opt.zero_grad()
        precond.backward(loss_fn(model(x), y))
        precond.step()
        opt.step()
    with torch.no_grad():
        end = float(loss_fn(model(x), y))
    assert end < start, f"{case.name}: loss {start:.4f} -> {end:.4f}"


# BackPACK counts targets equal to ignore_index: the ignore_index case needs the hooks engine
SEQUENTIAL = [c for c in ZOO if c.sequential and c.name != "ignore_index"]


@pytest.mark.parametrize("fisher_type", FISHER)
@pytest.mark.parametrize("case", SEQUENTIAL, ids=lambda c: c.name)
def test_both_engines_agree_where_both_apply(case: ZooCase, fisher_type: str) -> None:
    model, loss_fn, x, y = _setup(case)
    results = []
    for engine in ("hooks", "backpack"):
        backends = [
            curvlab.ExactFisher(model, loss_fn, engine=engine)
            if fisher_type == "exact"
            else curvlab.EmpiricalFisher(model, loss_fn, engine=engine),
            curvlab.KFC(model, loss_fn, fisher_type=fisher_type, engine=engine),
            curvlab.KFC(model, loss_fn, fisher_type=fisher_type, kfac_approx="reduce",
                        engine=engine),
        ]  # fmt: skip
        curvlab.extract(model, loss_fn, x, y, backends)
        results.append([c.to_dense() for c in backends])
    for a, b in zip(*results):
        _close(a, b, rtol=1e-10)


def test_auto_takes_backpack_only_where_it_applies() -> None:
    seq = next(c for c in ZOO if c.name == "mlp")
    model, loss_fn, _, _ = _setup(seq)
    exact = curvlab.ExactFisher(model, loss_fn)
    assert choose_engine(model, exact.requests(), "auto") == "backpack"
    for fisher_type in ("mc", "empirical", "exact"):  # fully connected: hooks are faster
        kfac = curvlab.KFAC(model, loss_fn, fisher_type=fisher_type)
        assert choose_engine(model, kfac.requests(), "auto") == "hooks"
    cnn = next(c for c in ZOO if c.name == "cnn")
    model, loss_fn, _, _ = _setup(cnn)
    kfc = curvlab.KFC(model, loss_fn, fisher_type="exact")
    assert choose_engine(model, kfc.requests(), "auto") == "backpack"
    resnet = next(c for c in ZOO if c.name == "resnet_bn_train")
    model, loss_fn, _, _ = _setup(resnet)
    assert choose_engine(model, curvlab.ExactFisher(model, loss_fn).requests(), "auto") == "hooks"
    with pytest.raises(ValueError, match="engine='backpack' cannot serve this model"):
        curvlab.KFC(model, loss_fn, engine="backpack")


def test_coverage_names_every_kind_of_block() -> None:
    model, loss_fn, _, _ = _setup(next(c for c in ZOO if c.name == "transformer_layer"))
    coverage = curvlab.KFC(model, loss_fn).coverage()
    assert {coverage["layer.linear1.weight"], coverage["head.bias"]} == {"kronecker"}
    attention = {k: v for k, v in coverage.items() if "self_attn" in k}
    assert attention and set(attention.values()) == {"diagonal"}  # called functionally
    assert coverage["layer.norm1.weight"] == "diagonal"
    with pytest.raises(ValueError, match=r"'layer.self_attn' \(MultiheadAttention\).*rules for"):
        curvlab.KFC(model, loss_fn, strict=True)
    with pytest.raises(ValueError, match="MultiheadAttention calls its projections functionally"):
        curvlab.KFC(model, loss_fn, strict=True, exclude=["layer.self_attn"])


def test_tied_weights_appear_once_and_get_a_diagonal_block() -> None:
    model, loss_fn, x, y = _setup(next(c for c in ZOO if c.name == "gpt_char_tied"))
    kfac = curvlab.KFAC(model, loss_fn, fisher_type="exact", tied="diagonal")
    assert len({id(p) for p in kfac.params}) == len(kfac.params) == len(list(model.parameters()))
    assert kfac.coverage()["tok.weight"] == "diagonal"
    joint = curvlab.KFAC(model, loss_fn, fisher_type="exact")  # tied="kronecker"
    assert {id(p) for p in joint.params} == {id(p) for p in kfac.params}
    assert joint.coverage()["tok.weight"] == "kronecker sum (tied embedding and head)"
    kfac.update(x, y)
    full = _in_curvature_order(ref.ggn(model, loss_fn, x, y), kfac, model)
    i = kfac.param_names.index("tok.weight")
    start = sum(p.numel() for p in kfac.params[:i])
    stop = start + kfac.params[i].numel()
    _close(torch.diagonal(kfac.to_dense())[start:stop], torch.diagonal(full)[start:stop])


# --- the statistics describe the loss that is backpropagated ---------------------------


def test_a_forward_in_between_does_not_leak_into_the_statistics() -> None:
    model, loss_fn, x, y = _setup(next(c for c in ZOO if c.name == "transformer_plain"))
    x_val, y_val = ZOO[0].make_batch(torch.Generator().manual_seed(3))
    x_val, y_val = _setup(next(c for c in ZOO if c.name == "transformer_plain"), seed=3)[2:]
    clean = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    clean.update(x, y)
    noisy = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    with noisy.recording():
        loss = loss_fn(model(x), y)
        loss_fn(model(x_val), y_val)  # a validation forward and loss, with grad enabled
    noisy.accumulate(loss)
    _close(noisy.to_dense(), clean.to_dense(), rtol=1e-12)


def test_ignored_targets_give_the_natural_gradient_of_the_loss() -> None:
    model, loss_fn, x, y = _setup(next(c for c in ZOO if c.name == "ignore_index"))
    c = curvlab.ExactFisher(model, loss_fn)
    c.update(x, y)
    grads = torch.autograd.grad(loss_fn(model(x), y), c.params)
    natural = torch.cat([t.reshape(-1) for t in c.solve(list(grads), 0.1)])
    dense = ref.ggn(model, loss_fn, x, y)
    flat = torch.cat([g.reshape(-1) for g in grads])
    expected = torch.linalg.solve(dense + 0.1 * torch.eye(len(dense), dtype=dense.dtype), flat)
    _close(natural, expected)


def test_a_loss_subclass_with_its_own_forward_is_refused() -> None:
    class Smoothed(nn.CrossEntropyLoss):
        def forward(self, input, target):  # type: ignore[override]
            return super().forward(input / 2.0, target)

    with pytest.raises(ValueError, match="Smoothed overrides forward"):
        curvlab.KFAC(nn.Sequential(nn.Linear(3, 2)), Smoothed())


def test_two_models_in_two_threads() -> None:
    results: dict[str, Tensor] = {}
    errors: list[BaseException] = []
    names = ("mlp", "cnn", "resnet_bn_eval", "transformer_plain")
    # models are built in this thread: their seeded initialisation uses the global RNG
    setups = {name: _setup(next(c for c in ZOO if c.name == name)) for name in names}

    def work(name: str) -> None:
        try:
            model, loss_fn, x, y = setups[name]
            for _ in range(3):
                c = curvlab.KFC(model, loss_fn, fisher_type="exact")
                c.update(x, y)
            results[name] = c.to_dense()
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name in names:
        model, loss_fn, x, y = setups[name]
        alone = curvlab.KFC(model, loss_fn, fisher_type="exact")
        alone.update(x, y)
        _close(results[name], alone.to_dense(), rtol=1e-12)


# --- cross-checks against curvlinops, where it supports the model --------------------


@pytest.mark.parametrize("case", [c for c in ZOO if c.curvlinops_ok], ids=lambda c: c.name)
def test_exact_fisher_equals_curvlinops_ggn(case: ZooCase) -> None:
    from curvlinops import GGNLinearOperator

    from tests.test_zoo_reference import dense

    model, loss_fn, x, y = _setup(case)
    params = [p for _, p in ref.flat_params(model)]
    op = GGNLinearOperator(model, loss_fn, params, [(x, y)], check_deterministic=False)
    c = curvlab.ExactFisher(model, loss_fn)
    c.update(x, y)
    _close(c.to_dense(), dense(op))


# curvlinops averages A per call of a layer called twice and counts ignored rows: the
# cases where both conventions coincide (tests/test_zoo_reference.py pins the others)
KFAC_CROSSCHECK = [
    c for c in ZOO if c.curvlinops_ok and c.name not in ("shared_layer", "ignore_index")
]


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", FISHER)
@pytest.mark.parametrize("case", KFAC_CROSSCHECK, ids=lambda c: c.name)
def test_kronecker_factors_equal_curvlinops(
    case: ZooCase, fisher_type: str, kfac_approx: str
) -> None:
    from tests.test_zoo_reference import CURVLINOPS_FISHER, curvlinops_kfac, kfac_modules

    model, loss_fn, x, y = _setup(case)
    modules = kfac_modules(model, x)
    kfc = curvlab.KFC(
        model, loss_fn, fisher_type=fisher_type, kfac_approx=kfac_approx, layers=modules
    )
    kfc.update(x, y)
    op = curvlinops_kfac(model, loss_fn, x, y, modules, CURVLINOPS_FISHER[fisher_type], kfac_approx)
    g_scale = max(float(f.G.abs().max()) for f in kfc.factors())
    for layer, f in zip(kfc.layers, kfc.factors()):
        if layer.name not in op._input_covariances:
            continue  # a tied layer: curvlinops' and curvlab's coverage differ
        _close(f.A, op._input_covariances[layer.name])
        torch.testing.assert_close(
            f.G, op._gradient_covariances[layer.name], rtol=1e-8, atol=1e-12 * g_scale
        )
