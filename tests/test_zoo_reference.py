"""Self tests of the architecture zoo (``tests/zoo.py``) and its any-model reference
(``tests/reference_any.py``).

The reference is tied to quantities computed differently: its ``jacrev`` Jacobian to
row-by-row autograd on the model, its GGN / empirical Fisher / K-FAC factors to
curvlinops' operators where their conventions coincide, its K-FAC to the GGN where
K-FAC is exact (one row, one layer), its unfolded patches to the layers' own outputs.
Conventions where curvlinops differs from the reference are pinned down explicitly.
"""

from __future__ import annotations

import pytest
import torch
from curvlinops import EFLinearOperator, GGNLinearOperator, KFACLinearOperator
from torch import Tensor, nn

from tests import reference_any as ra
from tests.zoo import ZOO, ZooCase, case

# torch's forward-mode AD scripts its jvp decompositions on first use (torch internals)
# and has no vmap rule for CPU flash attention's backward (transformer_layer's jacrev)
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]

SEQUENTIAL_MLPS = ["mlp", "mlp_mse", "mlp_bce"]
# cases with one output row per sample and no coupling between samples: there the
# symmetric Hessian square root of the reference and curvlinops' closed-form one give
# the same K-FAC factors (see test_kfac_sqrt_convention_matters_for_coupled_rows)
KFAC_AGREES = [
    *SEQUENTIAL_MLPS,
    "frozen_bias",
    "cnn",
    "resnet_bn_eval",
    "mixer",
    "transformer_plain",
    "transformer_layer",
]


def setup(c: ZooCase, seed: int = 0) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    X, y = c.make_batch(torch.Generator().manual_seed(seed))
    return c.make_model(), c.loss_fn(), X, y


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for _, p in ra.flat_params(model))


def assert_matches(actual: Tensor, expected: Tensor, rtol: float = 1e-8) -> None:
    atol = 1e-12 * max(float(expected.abs().max()), 1e-300)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def dense(op) -> Tensor:
    """The dense matrix of a curvlinops operator."""
    return op @ torch.eye(op.shape[1], dtype=torch.float64)


def kfac_modules(model: nn.Module, X: Tensor) -> list[nn.Module]:
    """Linear/Conv2d modules with trainable parameters that run as modules (curvlinops' set)."""
    candidates = [
        m
        for m in model.modules()
        if type(m) in (nn.Linear, nn.Conv2d) and any(p.requires_grad for p in m.parameters())
    ]
    io = ra.layer_io(model, X, candidates)
    return [m for m in candidates if io[m]]


def curvlinops_kfac(model, loss_fn, X, y, modules, fisher_type, kfac_approx):
    """curvlinops' K-FAC on ``modules`` with weight and bias joint, factors computed once."""
    ids = {id(p) for m in modules for p in m.parameters()}
    params = [p for _, p in ra.flat_params(model) if id(p) in ids]
    op = KFACLinearOperator(
        model,
        loss_fn,
        params,
        [(X, y)],
        fisher_type=fisher_type,
        kfac_approx=kfac_approx,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()  # the deterministic check would accumulate twice
    return op


CURVLINOPS_FISHER = {"exact": "type-2", "empirical": "empirical"}


# --- the zoo itself ---------------------------------------------------------------------


@pytest.mark.parametrize("c", ZOO, ids=lambda c: c.name)
def test_zoo_case_builds(c: ZooCase) -> None:
    model, loss_fn, X, y = setup(c)
    twin = c.make_model()
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), f"{c.name}: make_model is not deterministic ({name})"
    f = model(X)
    assert f.ndim == 2 and f.dtype == torch.float64
    assert f.shape[0] == (y.shape[0])
    if not isinstance(loss_fn, nn.CrossEntropyLoss):
        assert y.shape == f.shape
    assert torch.isfinite(loss_fn(f, y))
    assert 0 < num_params(model) < 600
    if c.sequential:
        assert isinstance(model, nn.Sequential)


def test_case_lookup() -> None:
    assert case("gpt_char_tied").name == "gpt_char_tied"
    with pytest.raises(KeyError):
        case("no such case")


# --- the Jacobian, GGN and empirical Fisher --------------------------------------------


def autograd_jacobian(model: nn.Module, X: Tensor) -> Tensor:
    """``[N_rows·C, P]`` row by row with ``torch.autograd.grad`` on an unhooked copy."""
    plain = ra.unhooked_copy(model)
    params = [p for _, p in ra.flat_params(plain)]
    f = plain(X).reshape(-1)
    rows = []
    for fi in f:
        grads = torch.autograd.grad(fi, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    torch.zeros(p.numel(), dtype=f.dtype) if g is None else g.reshape(-1)
                    for g, p in zip(grads, params)
                ]
            )
        )
    return torch.stack(rows)


@pytest.mark.parametrize("c", ZOO, ids=lambda c: c.name)
def test_jacobian_matches_autograd(c: ZooCase) -> None:
    model, _, X, _ = setup(c)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    J = ra.jacobian(model, X)
    for k, v in model.state_dict().items():  # the reference works on a copy
        assert torch.equal(v, before[k]), k
    assert J.shape == (ra.outputs(model, X).numel(), num_params(model))
    assert_matches(J, autograd_jacobian(model, X))


@pytest.mark.parametrize("c", ZOO, ids=lambda c: c.name)
def test_ggn_symmetric_psd_and_ef_psd(c: ZooCase) -> None:
    model, loss_fn, X, y = setup(c)
    for matrix in (ra.ggn(model, loss_fn, X, y), ra.empirical_fisher(model, loss_fn, X, y)):
        assert_matches(matrix, matrix.T, rtol=1e-12)
        eigs = torch.linalg.eigvalsh(matrix)
        assert eigs.min() >= -1e-12 * eigs.abs().max()


@pytest.mark.parametrize("c", [c for c in ZOO if c.curvlinops_ok], ids=lambda c: c.name)
def test_ggn_matches_curvlinops(c: ZooCase) -> None:
    model, loss_fn, X, y = setup(c)
    params = [p for _, p in ra.flat_params(model)]
    expected = dense(GGNLinearOperator(model, loss_fn, params, [(X, y)]))
    assert_matches(ra.ggn(model, loss_fn, X, y), expected)


@pytest.mark.parametrize(
    "c", [c for c in ZOO if c.curvlinops_ok and c.name != "ignore_index"], ids=lambda c: c.name
)
def test_empirical_fisher_matches_curvlinops(c: ZooCase) -> None:
    model, loss_fn, X, y = setup(c)
    params = [p for _, p in ra.flat_params(model)]
    expected = dense(EFLinearOperator(model, loss_fn, params, [(X, y)]))
    assert_matches(ra.empirical_fisher(model, loss_fn, X, y), expected)


def test_ignored_rows_change_nothing() -> None:
    model, loss_fn, X, y = setup(case("ignore_index"))
    keep = y != -100
    assert 0 < int(keep.sum()) < len(y)
    for matrix in (ra.ggn, ra.empirical_fisher):
        assert_matches(matrix(model, loss_fn, X, y), matrix(model, loss_fn, X[keep], y[keep]))
    assert ra.reduction_factor(loss_fn, ra.outputs(model, X), y) == 1 / int(keep.sum())


def test_curvlinops_ef_scales_ignored_rows_in() -> None:
    """curvlinops' EF uses R = 1/N_rows (ignored rows counted): it is N_rows/N_valid × ours."""
    model, loss_fn, X, y = setup(case("ignore_index"))
    params = [p for _, p in ra.flat_params(model)]
    theirs = dense(EFLinearOperator(model, loss_fn, params, [(X, y)]))
    ratio = len(y) / int((y != -100).sum())
    assert_matches(theirs, ratio * ra.empirical_fisher(model, loss_fn, X, y))


# --- layer inputs/outputs and patches ------------------------------------------------


def _layer_cases() -> list[tuple[str, nn.Module, Tensor]]:
    """(label, model, X) for patch checks: zoo convs/linears plus a strided, dilated Conv1d."""
    out = []
    for name in ("cnn", "unet", "resnet_bn_eval", "gpt_char", "mixer", "shared_layer"):
        model, _, X, _ = setup(case(name))
        out.append((name, model, X))
    torch.manual_seed(0)
    conv1d = nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2), nn.Flatten()
    ).double()
    out.append(("conv1d", conv1d, torch.randn(3, 2, 9, dtype=torch.float64)))
    return out


LAYER_CASES = _layer_cases()


@pytest.mark.parametrize("label,model,X", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_patches_reproduce_layer_outputs(label: str, model: nn.Module, X: Tensor) -> None:
    modules = [m for m in model.modules() if isinstance(m, ra.KFAC_MODULES)]
    io = ra.layer_io(model, X, modules)
    for module in modules:
        if isinstance(module, nn.Embedding):  # one-hot rows times the weight: a lookup
            W, b = module.weight.detach().T, 0.0
        else:
            W = module.weight.detach().reshape(module.weight.shape[0], -1)
            b = 0.0 if module.bias is None else module.bias.detach()
        for x, s in io[module]:
            a, s_pos = ra._positions(module, x, s)
            assert_matches(a @ W.T + b, s_pos, rtol=1e-12)
    if label == "shared_layer":
        assert len(io[model.lin]) == 2


# --- K-FAC ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn",
    [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum"), nn.BCEWithLogitsLoss()],
    ids=["ce", "mse", "bce"],
)
@pytest.mark.parametrize("bias", [True, False])
def test_kfac_exact_for_one_row_one_layer(loss_fn: nn.Module, bias: bool) -> None:
    """With one output row and one Linear layer, G ⊗ A is the GGN itself."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=bias).double()
    X = torch.randn(1, 4, dtype=torch.float64)
    y = (
        torch.tensor([1])
        if isinstance(loss_fn, nn.CrossEntropyLoss)
        else torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    )
    ggn = ra.ggn(model, loss_fn, X, y)
    for approx in ("expand", "reduce"):
        factors = ra.kfac_reference(model, loss_fn, X, y, [model], kfac_approx=approx)
        assert_matches(ra.kfac_dense(model, {"": factors[""]}), ggn)


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", KFAC_AGREES)
def test_kfac_factors_match_curvlinops(name: str, kfac_approx: str, fisher_type: str) -> None:
    model, loss_fn, X, y = setup(case(name))
    modules = kfac_modules(model, X)
    ours = ra.kfac_reference(model, loss_fn, X, y, modules, fisher_type, kfac_approx)
    op = curvlinops_kfac(model, loss_fn, X, y, modules, CURVLINOPS_FISHER[fisher_type], kfac_approx)
    assert set(ours) == set(op._input_covariances)
    # attention key projections have (numerically) zero reduce-G: compare on a global scale
    g_scale = max(float(G.abs().max()) for _, G in ours.values())
    for layer, (A, G) in ours.items():
        assert_matches(A, op._input_covariances[layer])
        torch.testing.assert_close(
            G, op._gradient_covariances[layer], rtol=1e-8, atol=1e-12 * g_scale
        )
    if name in SEQUENTIAL_MLPS:  # the dense matrix: kfac_dense's [W | b] permutation
        assert_matches(ra.kfac_dense(model, ours), dense(op))


@pytest.mark.parametrize("name", ["gpt_char", "unet", "resnet_bn_train"])
def test_kfac_sqrt_convention_matters_for_coupled_rows(name: str, monkeypatch) -> None:
    """Rows sharing a layer output (tokens, pixels, BatchNorm) make the exact G depend on
    the Hessian square root; with curvlinops' ``diag(√p) − p √pᵀ`` the factors match."""
    model, loss_fn, X, y = setup(case(name))
    f = ra.outputs(model, X)
    p, R = f.softmax(dim=1), ra.reduction_factor(loss_fn, f, y)
    modules = kfac_modules(model, X)
    op = curvlinops_kfac(model, loss_fn, X, y, modules, "type-2", "expand")
    symmetric = ra.kfac_reference(model, loss_fn, X, y, modules)
    gaps = [not torch.allclose(G, op._gradient_covariances[k]) for k, (_, G) in symmetric.items()]
    assert any(gaps)
    monkeypatch.setattr(
        ra,
        "_symmetric_sqrt",
        lambda H: R**0.5 * (torch.diag_embed(p.sqrt()) - torch.einsum("ni,nj->nij", p, p.sqrt())),
    )
    for layer, (A, G) in ra.kfac_reference(model, loss_fn, X, y, modules).items():
        assert_matches(A, op._input_covariances[layer])
        assert_matches(G, op._gradient_covariances[layer])


def test_kfac_multiple_calls_and_ignored_rows_vs_curvlinops() -> None:
    """Pin the two other convention gaps to curvlinops (documented in the report):
    a module called K times gets K × our A there (it sums per-call means), and ignored
    rows keep contributing to its type-2 G while ours drop them."""
    model, loss_fn, X, y = setup(case("shared_layer"))
    ours = ra.kfac_reference(model, loss_fn, X, y, [model.lin, model.head])
    op = curvlinops_kfac(model, loss_fn, X, y, [model.lin, model.head], "type-2", "expand")
    assert_matches(2 * ours["lin"][0], op._input_covariances["lin"])
    assert_matches(ours["lin"][1], op._gradient_covariances["lin"])

    model, loss_fn, X, y = setup(case("ignore_index"))
    keep = y != -100
    ours = ra.kfac_reference(model, loss_fn, X, y)
    dropped = ra.kfac_reference(model, loss_fn, X[keep], y[keep])
    for layer in ours:  # G ignores the ignored rows; A still averages over all inputs
        assert_matches(ours[layer][1], dropped[layer][1])


def test_kfac_reference_refuses_functional_uses() -> None:
    model, loss_fn, X, y = setup(case("transformer_layer"))
    with pytest.raises(ValueError, match="never called"):
        ra.kfac_reference(model, loss_fn, X, y, [model.layer.self_attn.out_proj])
    with pytest.raises(NotImplementedError):
        ra.kfac_reference(model, loss_fn, X, y, [model.layer.norm1])


def test_kfac_dense_tied_weight_lands_on_the_embedding() -> None:
    model, loss_fn, X, y = setup(case("gpt_char_tied"))
    names = [name for name, _ in ra.flat_params(model)]
    assert "head.weight" not in names and "tok.weight" in names
    factors = ra.kfac_reference(model, loss_fn, X, y, [model.head])
    K = ra.kfac_dense(model, factors)
    start = sum(p.numel() for name, p in ra.flat_params(model)[: names.index("tok.weight")])
    stop = start + model.tok.weight.numel()
    A, G = factors["head"]
    d = model.tok.weight.shape[1]  # [W | b] rows: d weight columns then the bias
    assert_matches(
        K[start:stop, start:stop],
        torch.kron(G, A).reshape(7, d + 1, 7, d + 1)[:, :d, :, :d].reshape(7 * d, 7 * d),
    )
