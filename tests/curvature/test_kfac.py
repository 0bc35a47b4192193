"""KFAC and KFC: exactness where theory says so, curvlinops agreement, KFC's definition.

References: the dense ``ExactFisher``/``BlockDiagonal`` (themselves checked against a
torch.func reference), curvlinops' ``KFACLinearOperator`` (test-only), and an
independent autograd computation of the KFC factors for Conv1d/Conv3d.
"""

from __future__ import annotations

import pytest
import torch
from curvlinops import KFACLinearOperator
from torch import Tensor, nn

import curvlab
from tests.cases import CASES, DTYPE, LOSSES
from tests.reference import empirical_fisher, flat_params, ggn, unhooked_copy, unhooked_loss

FISHER_TYPES = ["exact", "mc", "empirical"]
_CURVLINOPS_TYPE = {"exact": "type-2", "mc": "mc", "empirical": "empirical"}


def _flat(v: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in v])


def _close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    atol = rtol * max(float(expected.abs().max()), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _targets(loss_cls: type[nn.Module], n: int, c: int, gen: torch.Generator) -> Tensor:
    if loss_cls is nn.CrossEntropyLoss:
        return torch.randint(0, c, (n,), generator=gen)
    if loss_cls is nn.BCEWithLogitsLoss:
        return torch.randint(0, 2, (n, c), generator=gen).to(DTYPE)
    return torch.randn(n, c, generator=gen, dtype=DTYPE)


# --- exactness ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES, ids=lambda case: case.name)
def test_single_linear_layer_batch_of_one_is_exact(loss, reduction) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).to(DTYPE)
    loss_fn = loss.loss_cls(reduction=reduction)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 5, generator=gen, dtype=DTYPE), _targets(loss.loss_cls, 1, 3, gen)
    kfac = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    exact = curvlab.ExactFisher(model, loss_fn)
    curvlab.extract(model, loss_fn, x, y, [kfac, exact])
    _close(kfac.to_dense(), exact.to_dense(), rtol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deep_linear_network_mse_expand_is_exact(reduction) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 2)).to(DTYPE)
    loss_fn = nn.MSELoss(reduction=reduction)
    x, y = torch.randn(9, 4, dtype=DTYPE), torch.randn(9, 2, dtype=DTYPE)
    kfac = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    blocks = curvlab.BlockDiagonal(model, loss_fn)
    curvlab.extract(model, loss_fn, x, y, [kfac, blocks])
    _close(kfac.to_dense(), blocks.to_dense(), rtol=1e-10)


def test_mc_converges_to_exact() -> None:
    case = next(c for c in CASES if c.id == "conv2d-ce-mean")
    model, loss_fn = case.build()
    x, y = case.data(n=6)
    exact = curvlab.KFC(model, loss_fn, fisher_type="exact")
    exact.update(x, y)
    target = exact.to_dense()
    errors = []
    for m in (1, 30, 1000):
        torch.manual_seed(0)
        mc = curvlab.KFC(model, loss_fn, fisher_type="mc", mc_samples=m)
        mc.update(x, y)
        errors.append(float((mc.to_dense() - target).norm() / target.norm()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1


# --- curvlinops agreement ------------------------------------------------------------------


def _sequence_model() -> nn.Module:
    # the first Linear sees [N, T=4, 3]: weight sharing over 4 positions (expand ≠ reduce)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3))


_XCHECK = {
    "mlp": (CASES[0].model.build, (5,)),
    "sequence": (_sequence_model, (4, 3)),
    "conv2d": (next(c for c in CASES if c.model.name == "conv2d").model.build, (2, 5, 5)),
}


def _curvlinops_factors(model, loss_fn, x, y, fisher_type, approx, mc_samples):
    op = KFACLinearOperator(
        model,
        loss_fn,
        [p for p in model.parameters()],
        [(x, y)],
        check_deterministic=False,
        fisher_type=_CURVLINOPS_TYPE[fisher_type],
        mc_samples=mc_samples,
        kfac_approx=approx,
        separate_weight_and_bias=False,
    )
    op.compute_kronecker_factors()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return [(op._input_covariances[n], op._gradient_covariances[n]) for n in names]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", FISHER_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES, ids=lambda case: case.name)
@pytest.mark.parametrize("arch", list(_XCHECK))
def test_factors_match_curvlinops(arch, loss, reduction, fisher_type, approx) -> None:
    build, shape = _XCHECK[arch]

    def fresh() -> tuple[nn.Module, nn.Module]:  # curvlinops gets its own, un-extended copy
        torch.manual_seed(0)
        return build().to(DTYPE), loss.loss_cls(reduction=reduction)

    model, loss_fn = fresh()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, *shape, generator=gen, dtype=DTYPE), _targets(loss.loss_cls, 6, 3, gen)
    ours = curvlab.KFC(
        model,
        loss_fn,
        fisher_type=fisher_type,
        kfac_approx=approx,
        mc_samples=4000 if fisher_type == "mc" else 1,
    )
    torch.manual_seed(3)
    ours.update(x, y)
    # MC labels differ between the libraries, and curvlinops draws them one backward pass
    # at a time: compare our many-sample MC factor with curvlinops' exact-type factor, which
    # is its expectation.
    ref_type = "exact" if fisher_type == "mc" else fisher_type
    theirs = _curvlinops_factors(*fresh(), x, y, ref_type, approx, 1)
    for f, (a_ref, g_ref) in zip(ours.factors(), theirs):
        _close(f.A, a_ref, rtol=1e-10)
        if fisher_type == "mc":
            err = (f.G - g_ref).norm() / g_ref.norm()
            assert err < 0.1, f"MC G is {err:.3f} (relative Frobenius) from the exact-type G"
        else:
            _close(f.G, g_ref, rtol=1e-9)


# --- KFC's definition for Conv1d / Conv3d, computed independently with autograd ---------


def _kfc_reference(model: nn.Sequential, loss_fn: nn.Module, x: Tensor, y: Tensor, approx: str):
    """A and G of ``model[0]`` (a convolution) from the definitions
    (concepts/kronecker.md#weight-sharing-expand-and-reduce).

    Patches are read off the Jacobian of the conv output w.r.t. its weight
    (``∂s[n, 0, t]/∂W[0] = patch[n, t]``); G comes from ``Jᵀ H J`` of the network output
    w.r.t. the conv output, with H the Hessian of the reduced loss w.r.t. each sample's
    output (so ``Σ_c g_c g_cᵀ = Jᵀ H J``, no square root needed).
    """
    # torch.func cannot run through BackPACK hooks: use un-hooked copies
    model, loss_fn = unhooked_copy(model), unhooked_loss(loss_fn)
    conv, tail = model[0], model[1:]
    n = x.shape[0]
    s = conv(x).detach()  # [N, C_out, *spatial]
    c_out = s.shape[1]
    weight = conv.weight.detach()

    def conv_out(w: Tensor) -> Tensor:
        return conv._conv_forward(x, w, None)

    jw = torch.func.jacrev(conv_out)(weight)  # [N, C_out, *sp, C_out, C_in, *k]
    t = s[0, 0].numel()
    patches = jw[:, 0].reshape(n, t, c_out, -1)[:, :, 0]  # [N, T, C_in·k]
    ones = torch.ones(n, t, 1, dtype=x.dtype)
    if approx == "reduce":
        abar = torch.cat([patches.mean(1, keepdim=True), ones[:, :1]], dim=-1)
        a_ref = torch.einsum("nti,ntj->ij", abar, abar) / n
    else:
        abar = torch.cat([patches, ones], dim=-1)
        a_ref = torch.einsum("nti,ntj->ij", abar, abar) / (n * t)
    out = tail(s)
    hess = torch.func.hessian(lambda f: loss_fn(f, y))(out)  # [N, C, N, C]
    g_ref = torch.zeros(c_out, c_out, dtype=x.dtype)
    for i in range(n):
        j = torch.func.jacrev(lambda si: tail(si.unsqueeze(0))[0])(s[i])  # [C, C_out, *sp]
        j = j.reshape(j.shape[0], c_out, t)
        if approx == "reduce":
            j = j.sum(-1, keepdim=True)
        jhj = torch.einsum("cot,cd,dpt->op", j, hess[i, :, i, :], j)
        g_ref += jhj
    return a_ref.detach(), g_ref.detach()


def _conv_model(dims: int) -> nn.Sequential:
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    out = {1: 3 * 4, 3: 3 * 2 * 3 * 2}[dims]
    return nn.Sequential(
        conv(2, 3, kernel_size=3, stride=2, padding=1, dilation=1 if dims == 3 else 2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(out, 3),
    )


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES, ids=lambda case: case.name)
@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_conv3d_match_kfc_definition(dims, loss, reduction, approx) -> None:
    torch.manual_seed(0)
    model = _conv_model(dims).to(DTYPE)
    loss_fn = loss.loss_cls(reduction=reduction)
    shape = {1: (2, 9), 3: (2, 4, 5, 4)}[dims]
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(3, *shape, generator=gen, dtype=DTYPE), _targets(loss.loss_cls, 3, 3, gen)
    kfc = curvlab.KFC(model, loss_fn, fisher_type="exact", kfac_approx=approx)
    kfc.update(x, y)
    a_ref, g_ref = _kfc_reference(model, loss_fn, x, y, approx)
    factors = kfc.factors()[0]
    _close(factors.A, a_ref, rtol=1e-10)
    _close(factors.G, g_ref, rtol=1e-10)


# --- solves ---------------------------------------------------------------------------------


def _fitted_kfc(damping_mode: str | curvlab.curvature.KroneckerDamping) -> curvlab.KFC:
    case = next(c for c in CASES if c.id == "conv2d-ce-mean")
    model, loss_fn = case.build()
    kfc = curvlab.KFC(model, loss_fn, fisher_type="exact", damping_mode=damping_mode)
    kfc.update(*case.data(n=5))
    return kfc


def _spelled(name: str, spelling: str) -> str | curvlab.curvature.KroneckerDamping:
    """``damping_mode`` as its name or as the strategy object the name stands for."""
    strategy = {
        "exact": curvlab.curvature.EigenDamping,
        "factored": curvlab.curvature.FactoredDamping,
    }
    return name if spelling == "name" else strategy[name]()


@pytest.mark.parametrize("spelling", ["name", "strategy"])
@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_exact_damping_solve_is_the_dense_damped_inverse(damping, spelling) -> None:
    kfc = _fitted_kfc(_spelled("exact", spelling))
    assert kfc.damping_mode == "exact"
    dense = kfc.to_dense()
    v = [torch.randn_like(p) for p in kfc.params]
    expected = torch.linalg.solve(dense + damping * torch.eye(len(dense), dtype=DTYPE), _flat(v))
    _close(_flat(kfc.solve(v, damping)), expected, rtol=1e-8)


@pytest.mark.parametrize("spelling", ["name", "strategy"])
def test_factored_damping_solve_and_pi(spelling) -> None:
    kfc = _fitted_kfc(_spelled("factored", spelling))
    assert kfc.damping_mode == "factored"
    damping = 0.04
    gamma = damping**0.5
    v = [torch.randn_like(p) for p in kfc.params]
    blocks = []
    for f in kfc.factors():
        # π = sqrt((tr A / dim A) / (tr G / dim G)), concepts/kronecker.md#damped-inverse
        pi = ((f.A.trace() / f.A.shape[0]) / (f.G.trace() / f.G.shape[0])).sqrt()
        eye_a, eye_g = torch.eye(f.A.shape[0], dtype=DTYPE), torch.eye(f.G.shape[0], dtype=DTYPE)
        block = torch.kron(f.G + gamma / pi * eye_g, f.A + gamma * pi * eye_a)
        d_out, d_in = f.G.shape[0], f.A.shape[0]
        idx = torch.arange(d_out * d_in).reshape(d_out, d_in)
        perm = torch.cat([idx[:, :-1].reshape(-1), idx[:, -1]])
        blocks.append(block[perm][:, perm])
    expected = torch.linalg.solve(torch.block_diag(*blocks), _flat(v))
    _close(_flat(kfc.solve(v, damping)), expected, rtol=1e-8)


def test_damping_names_are_one_table_of_strategies() -> None:
    table = curvlab.curvature.DAMPING_MODES
    assert {name: type(s) for name, s in table.items()} == {
        "exact": curvlab.curvature.EigenDamping,
        "factored": curvlab.curvature.FactoredDamping,
    }
    assert all(s.name == name for name, s in table.items())


def test_a_user_strategy_serves_every_solve_and_decomposition() -> None:
    """A ``KroneckerDamping`` subclass passed as ``damping_mode`` is the one that solves."""
    calls: list[str] = []

    class Counting(curvlab.curvature.FactoredDamping):
        name = "counting"

        def solve(self, kfac, k, mat, damping):
            calls.append("solve")
            return super().solve(kfac, k, mat, damping)

    counted, plain = _fitted_kfc(Counting()), _fitted_kfc("factored")
    assert counted.damping_mode == "counting"
    v = [torch.randn_like(p) for p in counted.params]
    _close(_flat(counted.solve(v, 0.1)), _flat(plain.solve(v, 0.1)), rtol=1e-12)
    assert calls == ["solve"] * len(counted.layers)


@pytest.mark.parametrize("bad", [1.0, curvlab.curvature.EigenDamping])
def test_a_damping_mode_neither_name_nor_strategy_is_refused(bad) -> None:
    case = next(c for c in CASES if c.id == "mlp-ce-mean")
    with pytest.raises(TypeError, match=r"KFAC: damping_mode must be one of .* strategy, got"):
        curvlab.KFAC(*case.build(), damping_mode=bad)


def test_undamped_solve_of_singular_factor_is_reported() -> None:
    kfc = _fitted_kfc("exact")  # softmax output: the last layer's G is singular
    with pytest.raises(curvlab.linalg.LinAlgError, match=r"layer '3' \(Linear\).*damping > 0"):
        kfc.solve([torch.ones_like(p) for p in kfc.params], 0.0)


def test_decompositions_are_cached_until_the_factors_change(monkeypatch) -> None:
    kfc = _fitted_kfc("exact")
    calls = []
    original = curvlab.linalg.symeig

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(curvlab.linalg, "symeig", counting)
    v = [torch.randn_like(p) for p in kfc.params]
    kfc.solve(v, 0.1)
    kfc.solve(v, 0.2)  # new damping: no new decomposition
    assert len(calls) == 2 * len(kfc.layers)
    case = next(c for c in CASES if c.id == "conv2d-ce-mean")
    kfc.update(*case.data(n=3, seed=9))
    kfc.solve(v, 0.1)
    assert len(calls) == 4 * len(kfc.layers)


# --- layer selection -------------------------------------------------------------------------


class _OwnLinear(nn.Linear):
    """A user's layer type: no rule until one is registered."""


@pytest.mark.parametrize("name", ["kfac", "kfc", "ekfac", "block_tridiagonal_kfac"])
def test_a_registered_rule_gives_kronecker_blocks_in_every_kronecker_backend(name) -> None:
    from curvlab.extraction import layers as layer_rules

    def build(layer_type: type[nn.Linear]) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(layer_type(4, 5), nn.Tanh(), layer_type(5, 3)).to(DTYPE)

    def make(model: nn.Module):
        return curvlab.make(name, model, loss_fn, fisher_type="exact")

    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(8, 4, dtype=DTYPE)
    y = torch.randint(0, 3, (8,))
    if name == "block_tridiagonal_kfac":  # it chains Kronecker blocks only
        with pytest.raises(ValueError, match="have no Kronecker rule"):
            make(build(_OwnLinear))
    else:
        assert set(make(build(_OwnLinear)).coverage().values()) != {"kronecker"}
    layer_rules.register_kronecker_rule(_OwnLinear, layer_rules.KRONECKER_RULES[nn.Linear])
    try:
        own = make(build(_OwnLinear))
        assert set(own.coverage().values()) == {"kronecker"}
        own.update(x, y)
        plain = make(build(nn.Linear))
        plain.update(x, y)
        torch.testing.assert_close(own.to_dense(), plain.to_dense())
    finally:
        del layer_rules.KRONECKER_RULES[_OwnLinear]


def test_exclude_and_layers_take_glob_patterns() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 5), nn.LayerNorm(5), nn.Linear(5, 3)
    ).to(DTYPE)
    loss_fn = nn.CrossEntropyLoss()
    by_pattern = curvlab.KFAC(model, loss_fn, exclude=["[13]"])  # both LayerNorms
    by_name = curvlab.KFAC(model, loss_fn, exclude=["1", "3"])
    assert by_pattern.param_names == by_name.param_names
    assert not any(n.startswith(("1.", "3.")) for n in by_pattern.param_names)
    only_first = curvlab.KFAC(model, loss_fn, layers=["0*"])
    assert only_first.param_names == ["0.weight", "0.bias"]
    with pytest.raises(ValueError, match=r"exclude pattern '\*attn\*' matches no module"):
        curvlab.KFAC(model, loss_fn, exclude=["*attn*"])


def test_unsupported_layer_is_named_and_can_be_excluded() -> None:
    case = next(c for c in CASES if c.id == "conv2d-ce-mean")
    model, loss_fn = case.build()
    # KFAC covers convolutions (the rule table decides; KFC is the same backend)
    assert set(curvlab.KFAC(model, loss_fn).coverage().values()) == {"kronecker"}
    torch.manual_seed(0)
    normed = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).to(DTYPE)
    with pytest.raises(ValueError, match=r"module '1' \(LayerNorm\).*Linear.*Conv2d.*exclude"):
        curvlab.KFAC(normed, nn.CrossEntropyLoss(), strict=True)
    covered = curvlab.KFAC(normed, nn.CrossEntropyLoss())  # the norm gets a diagonal block
    assert covered.coverage()["1.weight"].startswith("diagonal")
    assert covered.coverage()["0.weight"] == "kronecker"
    kfac = curvlab.KFAC(model, loss_fn, fisher_type="exact", exclude=["0"])
    assert [layer.name for layer in kfac.layers] == ["3"]  # excluded: not even diagonal
    assert kfac.params == list(model[3].parameters())
    kfac.update(*case.data())
    # the excluded conv's BackPACK quantities do not linger on its parameters
    assert not any(k.startswith("curvlab_") for p in model.parameters() for k in vars(p))
    only = curvlab.KFC(model, loss_fn, fisher_type="exact", layers=[model[3]])
    only.update(*case.data())
    torch.testing.assert_close(only.to_dense(), kfac.to_dense())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": ["nope"]}, "unknown module 'nope'"),
        ({"exclude": [nn.Linear(2, 2)]}, "is not a module of the model"),
        ({"layers": ["1"]}, "no layer selected"),
        ({"kfac_approx": "mean"}, "unknown kfac_approx 'mean'"),
        ({"damping_mode": "tikhonov"}, "unknown damping_mode"),
        ({"fisher_type": "type-2"}, "unknown fisher_type"),
    ],
)
def test_bad_kfac_arguments(kwargs, match) -> None:
    case = next(c for c in CASES if c.id == "mlp-ce-mean")
    model, loss_fn = case.build()
    with pytest.raises(ValueError, match=match):
        curvlab.KFAC(model, loss_fn, **kwargs)


def test_grouped_convolution_is_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(36, 3))
    with pytest.raises(ValueError, match="groups=2"):
        curvlab.KFC(model, nn.CrossEntropyLoss())


@pytest.mark.parametrize("fisher_type", FISHER_TYPES)
def test_excluded_layer_of_another_type_is_backpropagated_through(fisher_type) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    model = model.to(DTYPE).eval()
    kfac = curvlab.KFAC(model, nn.CrossEntropyLoss(), fisher_type=fisher_type, exclude=["1"])
    kfac.update(torch.randn(6, 4, dtype=DTYPE), torch.randint(0, 3, (6,)))
    assert [layer.name for layer in kfac.layers] == ["0", "3"]
    assert kfac.num_params == 4 * 5 + 5 + 5 * 3 + 3
    assert not any(
        k.startswith(("curvlab_", "sqrt_ggn")) for p in model.parameters() for k in vars(p)
    )


# --- the two Monte-Carlo routes ---------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES, ids=lambda case: case.name)
def test_one_sample_mc_routes_both_estimate_the_exact_factor(loss, reduction) -> None:
    """The hooks engine (one backward of sampled columns to the layer outputs) and
    BackPACK's sampled square root both average to the exact G."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    loss_fn = loss.loss_cls(reduction=reduction)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(10, 4, generator=gen, dtype=DTYPE), _targets(loss.loss_cls, 10, 3, gen)
    exact = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    exact.update(x, y)
    hooks = curvlab.KFAC(model, loss_fn, fisher_type="mc", engine="hooks")
    square_root = curvlab.KFAC(model, loss_fn, fisher_type="mc", engine="backpack")
    draws = 400
    for _ in range(draws):  # the union of 400 copies of the batch (sum: 400 times the batch)
        hooks.update(x, y)
        square_root.update(x, y)
    copies = draws if reduction == "sum" else 1
    for estimate in (hooks, square_root):
        for f, f_exact in zip(estimate.factors(), exact.factors()):
            _close(f.A, f_exact.A, rtol=1e-10)
            err = float((f.G / copies - f_exact.G).norm() / f_exact.G.norm())
            assert err < 0.1, f"one-sample MC G is {err:.3f} from the exact G"


def test_string_valid_padding_equals_zero_padding() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(3, 2, 6, 6, dtype=DTYPE), torch.randint(0, 3, (3,))
    results = []
    for padding in ("valid", 0):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=padding), nn.Flatten(), nn.Linear(48, 3))
        kfc = curvlab.KFC(model.to(DTYPE), nn.CrossEntropyLoss(), fisher_type="exact")
        kfc.update(x, y)
        results.append(kfc.to_dense())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_factored_inverses_are_cached_per_damping_without_eigendecompositions(monkeypatch) -> None:
    kfc = _fitted_kfc("factored")
    calls = {"cholesky": 0, "eig": 0}
    cholesky, symeig = curvlab.linalg.cholesky_factor, curvlab.linalg.symeig

    def count(kind, fn):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(curvlab.linalg, "cholesky_factor", count("cholesky", cholesky))
    monkeypatch.setattr(curvlab.linalg, "symeig", count("eig", symeig))
    v = [torch.randn_like(p) for p in kfc.params]
    first = kfc.solve(v, 0.1)
    again = kfc.solve(v, 0.1)
    assert calls == {"cholesky": 2 * len(kfc.layers), "eig": 0}
    torch.testing.assert_close(_flat(first), _flat(again), rtol=0, atol=0)
    kfc.solve(v, 0.2)  # a new damping refactorises
    assert calls["cholesky"] == 4 * len(kfc.layers)
    with pytest.raises(curvlab.linalg.LinAlgError, match=r"layer '3' \(Linear\) [GA] "):
        kfc.solve(v, 0.0)  # 5 samples, softmax outputs: the last layer's factors are singular


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_separate_bias_equals_curvlinops_separate_weight_and_bias(kfac_approx) -> None:
    from curvlinops import KFACLinearOperator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(7, 4, dtype=DTYPE), torch.randint(0, 3, (7,))
    kfac = curvlab.KFAC(
        model, loss_fn, fisher_type="exact", kfac_approx=kfac_approx, separate_bias=True
    )
    kfac.update(x, y)
    op = KFACLinearOperator(
        model, loss_fn, list(model.parameters()), [(x, y)], fisher_type="type-2",
        kfac_approx=kfac_approx, separate_weight_and_bias=True, check_deterministic=False,
    )  # fmt: skip
    op.compute_kronecker_factors()
    dense = op @ torch.eye(op.shape[1], dtype=DTYPE)
    _close(kfac.to_dense(), torch.as_tensor(dense), rtol=1e-10)
    # the exact damped inverse of the separate blocks
    v = [torch.randn_like(p) for p in kfac.params]
    flat = torch.cat([t.reshape(-1) for t in v])
    expected = torch.linalg.solve(kfac.to_dense() + 0.1 * torch.eye(len(flat), dtype=DTYPE), flat)
    _close(torch.cat([t.reshape(-1) for t in kfac.solve(v, 0.1)]), expected, rtol=1e-9)


class _WithAuxHead(nn.Module):
    """An auxiliary head (with a LayerNorm) the forward pass never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 2)
        self.aux_norm = nn.LayerNorm(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


def test_an_unused_module_is_skipped_as_torch_optim_skips_it() -> None:
    """A module the forward never calls adds nothing to the curvature: the used layers'
    blocks equal those of the model without it (``exclude=``), its own blocks are zero."""
    torch.manual_seed(0)
    model, loss_fn = _WithAuxHead().to(DTYPE), nn.CrossEntropyLoss()
    x, y = torch.randn(8, 4, dtype=DTYPE), torch.randint(0, 3, (8,))
    full = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    full.update(x, y)
    without = curvlab.KFAC(model, loss_fn, fisher_type="exact", exclude=["aux", "aux_norm"])
    without.update(x, y)
    assert "aux.weight" in full.param_names and "aux.weight" not in without.param_names
    kept = [full.param_names.index(n) for n in without.param_names]
    sizes = [p.numel() for p in full.params]
    starts = torch.tensor([0, *sizes]).cumsum(0)
    index = torch.cat([torch.arange(int(starts[i]), int(starts[i + 1])) for i in kept])
    dense = full.to_dense()
    _close(dense[index][:, index], without.to_dense(), rtol=1e-12)
    unused = torch.ones(dense.shape[0], dtype=torch.bool)
    unused[index] = False
    assert bool((dense[unused] == 0).all())
    v = [torch.randn_like(p) for p in full.params]
    assert all(torch.isfinite(t).all() for t in full.solve(v, 0.1))


def test_backends_with_per_sample_statistics_name_an_unused_module() -> None:
    """EKFAC keeps per-sample statistics of every layer: it names the unused module and the
    ``exclude=`` that leaves it out; with it excluded, the curvature works."""
    torch.manual_seed(0)
    model, loss_fn = _WithAuxHead(), nn.CrossEntropyLoss()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(RuntimeError, match=r"layer 'aux'.*exclude=\['aux'\]"):
        curvlab.EKFAC(model, loss_fn).update(x, y)
    ekfac = curvlab.EKFAC(model, loss_fn, exclude=["aux"])
    ekfac.update(x, y)
    assert "aux.weight" not in ekfac.param_names


@pytest.mark.parametrize("optimizer", ["natural_gradient", "kfac_optimizer"])
def test_training_skips_an_unused_module(optimizer: str) -> None:
    """The optimizers leave an unused module's parameters as they are (``.grad`` None),
    as ``torch.optim`` does, and train the rest."""
    torch.manual_seed(0)
    model, loss_fn = _WithAuxHead(), nn.CrossEntropyLoss()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    aux = [p.detach().clone() for p in (*model.aux.parameters(), *model.aux_norm.parameters())]
    start = float(loss_fn(model(x), y).detach())
    if optimizer == "natural_gradient":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        precond = curvlab.NaturalGradient(curvlab.KFAC(model, loss_fn), optimizer=opt)
        for _ in range(5):
            opt.zero_grad()
            precond.backward(loss_fn(model(x), y))
            precond.step()
            opt.step()
    else:
        kfac_opt = curvlab.KFACOptimizer(model, loss_fn)
        for _ in range(5):
            kfac_opt.step(lambda: loss_fn(model(x), y))
    after = [p for p in (*model.aux.parameters(), *model.aux_norm.parameters())]
    assert all(torch.equal(a, b.detach()) and b.grad is None for a, b in zip(aux, after))
    assert float(loss_fn(model(x), y).detach()) < start


@pytest.mark.parametrize("name", ["kfac", "kfc", "ekfac"])
@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_diagonal_blocks_are_the_fisher_diagonal_of_the_other_parameters(
    name: str, fisher_type: str
) -> None:
    """``diagonal_blocks()`` (the public accessor integrations read) gives the LayerNorm's
    parameters the dense reference Fisher's diagonal, shaped like them; ``factors()``
    covers the rest, so a model of Kronecker layers alone has no diagonal blocks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(6, 4, dtype=DTYPE), torch.randint(0, 3, (6,))
    c = curvlab.make(name, model, loss_fn, fisher_type=fisher_type)
    with pytest.raises(RuntimeError, match=r"diagonal_blocks: no curvature accumulated yet"):
        c.diagonal_blocks()
    c.update(X, y)
    reference = ggn if fisher_type == "exact" else empirical_fisher
    dense = reference(unhooked_copy(model), unhooked_loss(loss_fn), X, y)
    names = [n for n, _ in flat_params(model)]
    offsets = torch.tensor([0] + [p.numel() for _, p in flat_params(model)]).cumsum(0)
    blocks = c.diagonal_blocks()
    assert list(blocks) == ["1.weight", "1.bias"]
    for param_name, diagonal in blocks.items():
        k = names.index(param_name)
        expected = dense.diagonal()[offsets[k] : offsets[k + 1]]
        assert diagonal.shape == model.get_parameter(param_name).shape
        torch.testing.assert_close(diagonal.reshape(-1), expected, rtol=1e-10, atol=1e-12)
    only_linear = nn.Sequential(nn.Linear(4, 3)).double()
    c = curvlab.make(name, only_linear, loss_fn, fisher_type=fisher_type)
    c.update(X, y)
    assert c.diagonal_blocks() == {}
