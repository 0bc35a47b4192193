"""``KFAC(tied="kronecker")``: a weight tied between an ``nn.Embedding`` and an ``nn.Linear``
head is one block ``G_h ⊗ A_h + D_e ⊗ B_e`` on the head's ``[W | b]`` (the head's K-FAC
factors plus the embedding's diagonal input factor and output-gradient factor, zero on the
bias coordinate), solved as a sum of two Kronecker products
(concepts/kronecker.md#tied-embedding-and-output-head)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.curvature.distribution import DistributionInterface as ops
from curvlab.curvature.kronecker.factored import TIED_KRONECKER_SUM
from tests import reference_any as ra

VOCAB, DIM, N, T = 7, 5, 4, 6
DTYPE = torch.float64
FISHER = ("exact", "mc", "empirical")
MODES = ("exact", "factored")


class TiedLM(nn.Module):
    """Tokens → embedding → a tanh layer → a head tied to the embedding, per-token logits
    ``[N·T, V]``."""

    def __init__(self, bias: bool = True, std: float = 0.3, tie: bool = True) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        nn.init.normal_(self.tok.weight, std=std)
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=bias)
        if tie:
            self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.tok(idx)))
        return self.head(h).reshape(-1, VOCAB)


def _model(bias: bool = True, std: float = 0.3, seed: int = 0) -> TiedLM:
    torch.manual_seed(seed)
    return TiedLM(bias=bias, std=std).to(DTYPE)


def _untied(model: TiedLM) -> TiedLM:
    """The same network with the head's weight an independent copy of the embedding's."""
    twin = copy.deepcopy(model)
    twin.head.weight = nn.Parameter(model.tok.weight.detach().clone())
    return twin


def _data(seed: int = 0, n: int = N) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, T), generator=g)
    y = torch.randint(0, VOCAB, (n * T,), generator=g)
    return x, y


def _joint_index(c: curvlab.KFAC) -> int:
    return next(k for k, layer in enumerate(c.layers) if layer.name == "head")


def _flat(v: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in v])


def _close(actual: Tensor, expected: Tensor, rtol: float = 1e-10) -> None:
    atol = rtol * max(float(expected.abs().max()), 1e-12)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# --- (a) the block is its definition ----------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("fisher_type", FISHER)
def test_joint_block_is_the_sum_of_the_untied_layers_kronecker_blocks(
    fisher_type: str, bias: bool
) -> None:
    """The joint block equals ``kron(G_h, A_h) + kron(D_e, B_e)`` with each term the
    Kronecker block of the same network with the weight untied (same statistics: same
    forward, same sampled labels), added on the shared weight."""
    model = _model(bias)
    x, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    joint = curvlab.KFAC(model, loss_fn, fisher_type=fisher_type)
    assert joint.coverage()["tok.weight"] == TIED_KRONECKER_SUM
    if bias:
        assert joint.coverage()["head.bias"] == TIED_KRONECKER_SUM
    torch.manual_seed(1)
    joint.update(x, y)
    twin = _untied(model)
    separate = curvlab.KFAC(twin, loss_fn, fisher_type=fisher_type, tied="diagonal")
    torch.manual_seed(1)
    separate.update(x, y)
    names = separate.param_names
    dense = separate.to_dense()
    emb = slice(0, VOCAB * DIM)
    assert names[0] == "tok.weight"
    head_start = sum(p.numel() for p in separate.params[: names.index("head.weight")])
    head = list(range(head_start, head_start + VOCAB * DIM + (VOCAB if bias else 0)))
    expected = dense[head][:, head].clone()
    expected[emb, emb] += dense[emb, emb]
    _close(joint._dense_layer(_joint_index(joint)), expected, rtol=1e-12)
    # and against the float64 factors from their definition (exact Fisher)
    if fisher_type == "exact":
        factors = ra.kfac_reference(
            model, loss_fn, x, y, [model.head, model.tok], sqrt="curvlinops"
        )
        full = ra.kfac_dense(model, factors)
        order = [n for n, _ in ra.flat_params(model)]
        starts = {
            n: sum(p.numel() for _, p in ra.flat_params(model)[: order.index(n)]) for n in order
        }
        idx = list(range(starts["tok.weight"], starts["tok.weight"] + VOCAB * DIM))
        if bias:
            idx += list(range(starts["head.bias"], starts["head.bias"] + VOCAB))
        _close(joint._dense_layer(_joint_index(joint)), full[idx][:, idx], rtol=1e-12)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_closed_forms_of_the_joint_block(bias: bool) -> None:
    model = _model(bias)
    c = curvlab.KFAC(model, nn.CrossEntropyLoss(), fisher_type="exact")
    c.update(*_data())
    dense = c.to_dense()
    _close(c.trace(), torch.trace(dense))
    _close(c.diagonal(), torch.diagonal(dense))
    _close(c.frobenius_norm(), torch.linalg.matrix_norm(dense))
    _close(c.logdet(0.1), torch.linalg.slogdet(dense + 0.1 * torch.eye(len(dense), dtype=DTYPE))[1])
    v = [torch.randn_like(p) for p in c.params]
    _close(_flat(c.matvec(v)), dense @ _flat(v))


# --- (b) closer to the exact Fisher than the diagonal -----------------------------------


def _tied_block(c: curvlab.Curvature, dense: Tensor, names: list[str]) -> Tensor:
    idx: list[int] = []
    for name in names:
        i = c.param_names.index(name)
        start = sum(p.numel() for p in c.params[:i])
        idx += range(start, start + c.params[i].numel())
    return dense[idx][:, idx]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_joint_block_is_closer_to_the_exact_fisher_than_the_diagonal(bias: bool) -> None:
    """At GPT-like small initialisation (std 0.02) the Kronecker sum is much closer, in
    relative Frobenius distance, to the exact Fisher's tied block than the diagonal."""
    model = _model(bias, std=0.02)
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data(n=16)
    names = ["tok.weight", "head.bias"] if bias else ["tok.weight"]
    exact = curvlab.ExactFisher(model, loss_fn)
    joint = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    diagonal = curvlab.KFAC(model, loss_fn, fisher_type="exact", tied="diagonal")
    curvlab.extract(model, loss_fn, x, y, [exact, joint, diagonal])
    target = _tied_block(exact, exact.to_dense(), names)
    _close(target, _tied_block(exact, ra.ggn(model, loss_fn, x, y), names), rtol=1e-9)

    def distance(c: curvlab.Curvature) -> float:
        block = _tied_block(c, c.to_dense(), names)
        return float(torch.linalg.matrix_norm(block - target) / torch.linalg.matrix_norm(target))

    d_joint, d_diag = distance(joint), distance(diagonal)
    assert d_joint < 0.5 * d_diag, (d_joint, d_diag)
    assert d_joint < 0.3


# --- (c) solves ---------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fisher_type", FISHER)
def test_solve_is_the_inverse_of_the_damped_operator(
    fisher_type: str, mode: str, bias: bool
) -> None:
    model = _model(bias)
    c = curvlab.KFAC(model, nn.CrossEntropyLoss(), fisher_type=fisher_type, damping_mode=mode)
    torch.manual_seed(2)
    c.update(*_data())
    k, lam = _joint_index(c), 1e-2
    size = sum(p.numel() for p in c.layers[k].params)
    if mode == "exact":
        damped = c._dense_layer(k) + lam * torch.eye(size, dtype=DTYPE)
    else:  # (G + γ/π I) ⊗ (A + πγ I) + D_e ⊗ B_e
        f = c._factor(k)
        d_e, b_e = c._partner_factors(k)
        g, a = curvlab.linalg.factored_damping(f.G, f.A, lam)
        perm = curvlab.extraction.layers.parameter_order(c.layers[k].module)
        damped = (torch.kron(g, a) + torch.kron(torch.diag(d_e), b_e))[perm][:, perm]
    v = [torch.randn_like(p) for p in c.layers[k].params]
    _close(_flat(c._solve_layer(k, v, lam)), torch.linalg.solve(damped, _flat(v)), rtol=1e-9)
    if mode == "exact":  # solve((C + λI) v) = v on the whole operator
        w = [torch.randn_like(p) for p in c.params]
        cw = [a + lam * b for a, b in zip(c.matvec(w), w)]
        _close(_flat(c.solve(cw, lam)), _flat(w), rtol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_solve_in_float32_is_close_to_float64(mode: str) -> None:
    c32 = curvlab.KFAC(_model().float(), nn.CrossEntropyLoss(), damping_mode=mode)
    c64 = curvlab.KFAC(_model(), nn.CrossEntropyLoss(), damping_mode=mode)
    for c in (c32, c64):
        torch.manual_seed(0)
        c.update(*_data())
    v = [torch.randn_like(p) for p in c64.params]
    expected = _flat(c64.solve(v, 1e-2))
    actual = _flat(c32.solve([t.float() for t in v], 1e-2)).double()
    assert float(torch.linalg.vector_norm(actual - expected)) < 1e-4 * float(
        torch.linalg.vector_norm(expected)
    )


def test_a_conjugate_gradient_solve_that_stops_short_says_so(monkeypatch) -> None:
    """Exact damping solves the joint block by CG; cut to one iteration, the solve still
    returns its iterate but warns with the layer and the residual (never silently)."""
    from curvlab.curvature.kronecker import kfac as kfac_module

    c = curvlab.KFAC(_model(), nn.CrossEntropyLoss(), fisher_type="exact")
    c.update(*_data())
    k = _joint_index(c)
    v = [torch.randn_like(p) for p in c.layers[k].params]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no warning
        c._solve_layer(k, v, 1e-3)
    monkeypatch.setattr(kfac_module, "TIED_CG_MAX_ITERATIONS", 1)
    with pytest.warns(RuntimeWarning, match=r"layer 'head'.*1 conjugate-gradient iterations"):
        out = c._solve_layer(k, v, 1e-3)
    assert all(torch.isfinite(t).all() for t in out)


# --- (d) what is refused or left diagonal ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_zero_damping_is_refused_naming_the_layer(mode: str) -> None:
    c = curvlab.KFAC(_model(), nn.CrossEntropyLoss(), damping_mode=mode)
    c.update(*_data())
    with pytest.raises(curvlab.linalg.LinAlgError, match=r"layer 'head'.*'tok'.*damping > 0"):
        c.solve([torch.ones_like(p) for p in c.params], 0.0)


def test_bad_tied_value_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"unknown tied 'joint'.*'kronecker', 'diagonal'"):
        curvlab.KFAC(_model(), nn.CrossEntropyLoss(), tied="joint")


def test_other_sharing_keeps_a_diagonal_block() -> None:
    """Three modules sharing the weight, two ``nn.Linear`` sharing one, and reduce: the
    shared weight keeps its diagonal block (the joint block is for one embedding and one
    head under expand)."""
    three = _model()
    three.extra = nn.Linear(DIM, VOCAB, bias=False).to(DTYPE)
    three.extra.weight = three.tok.weight
    c = curvlab.KFAC(three, nn.CrossEntropyLoss())
    assert c.coverage()["tok.weight"] == "diagonal"
    lin = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).to(DTYPE)
    lin[2].weight = lin[0].weight
    assert curvlab.KFAC(lin, nn.MSELoss()).coverage()["0.weight"] == "diagonal"
    reduce = curvlab.KFAC(_model(), nn.CrossEntropyLoss(), kfac_approx="reduce")
    assert reduce.coverage()["tok.weight"] == "diagonal"
    # backends without the Kronecker sum keep the diagonal block
    assert curvlab.EKFAC(_model(), nn.CrossEntropyLoss()).coverage()["tok.weight"] == "diagonal"


def test_eigenbasis_users_are_refused_clearly() -> None:
    c = curvlab.KFAC(_model(), nn.CrossEntropyLoss())
    c.update(*_data())
    with pytest.raises(NotImplementedError, match=r"layer 'head'.*Kronecker sum.*tied='diagonal'"):
        c._layer_eigen(_joint_index(c))


# --- (e) state, memory ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip(mode: str) -> None:
    model = _model()
    c = curvlab.KFAC(model, nn.CrossEntropyLoss(), damping_mode=mode)
    c.update(*_data())
    c.update(*_data(seed=1))
    state = c.state_dict()
    assert state["statistics"]["sums"]["tied_A"][_joint_index(c)] is not None
    fresh = curvlab.KFAC(model, nn.CrossEntropyLoss(), damping_mode=mode)
    fresh.load_state_dict(state)
    _close(fresh.to_dense(), c.to_dense(), rtol=1e-14)
    v = [torch.randn_like(p) for p in c.params]
    _close(_flat(fresh.solve(v, 0.1)), _flat(c.solve(v, 0.1)), rtol=1e-12)


def test_a_state_saved_before_tied_sums_existed_loads() -> None:
    """A checkpoint without the tied embedding sums loads into a model without a tied
    pair; into one with a tied pair it is refused (its layers differ)."""
    untied = _untied(_model())
    c = curvlab.KFAC(untied, nn.CrossEntropyLoss())
    c.update(*_data())
    state = c.state_dict()
    stats = state["statistics"]
    old = {
        **state,
        "statistics": {
            **stats,
            "sums": {k: v for k, v in stats["sums"].items() if not k.startswith("tied")},
            "counts": {k: v for k, v in stats["counts"].items() if not k.startswith("tied")},
        },
    }
    fresh = curvlab.KFAC(untied, nn.CrossEntropyLoss())
    fresh.load_state_dict(old)
    _close(fresh.to_dense(), c.to_dense(), rtol=1e-14)
    diagonal = curvlab.KFAC(_model(), nn.CrossEntropyLoss(), tied="diagonal")
    diagonal.update(*_data())
    state = diagonal.state_dict()
    stats = state["statistics"]
    old = {
        **state,
        "statistics": {
            **stats,
            "sums": {k: v for k, v in stats["sums"].items() if not k.startswith("tied")},
            "counts": {k: v for k, v in stats["counts"].items() if not k.startswith("tied")},
        },
    }
    with pytest.raises(ValueError, match="do not match"):
        curvlab.KFAC(_model(), nn.CrossEntropyLoss()).load_state_dict(old)


def _bytes(obj: object) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_bytes(v) for v in obj)
    return 0


@pytest.mark.parametrize("mode", MODES)
def test_memory_estimate_matches_the_state(mode: str) -> None:
    model = _model()
    c = curvlab.KFAC(model, nn.CrossEntropyLoss(), damping_mode=mode)
    estimate = c.memory_estimate()
    c.update(*_data())
    c.solve([torch.ones_like(p) for p in c.params], 0.1)
    assert _bytes(c.state_dict()) == estimate.factors
    joint = [list(inverse[1].__dict__.values()) for inverse in c._joint.values()]
    kept = _bytes(c._eigen) + _bytes(c._inverses[1] if c._inverses else None) + _bytes(joint)
    assert kept == estimate.inverses


@pytest.mark.parametrize("mode", MODES)
def test_distribution_sums_blocks_and_decompositions(mode: str) -> None:
    """The embedding's sums all-reduce with the others (sums of two batches give their
    union), the joint block is one decomposition block, and what one process exports of it
    solves the same elsewhere without a decomposition there."""
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    build = lambda: curvlab.KFAC(model, loss_fn, fisher_type="exact", damping_mode=mode)  # noqa: E731
    first, second, union, target = build(), build(), build(), build()
    (x1, y1), (x2, y2) = _data(seed=1), _data(seed=2)
    first.update(x1, y1)
    second.update(x2, y2)
    union.update(x1, y1)
    union.update(x2, y2)
    target.update(x2, y2)
    a, b = ops(first).statistic_sums(), ops(second).statistic_sums()
    assert any("tied_G" in e.name for e in a)
    ops(target).load_statistic_sums([ea.tensor + eb.tensor for ea, eb in zip(a, b)])
    _close(target.to_dense(), union.to_dense(), rtol=1e-12)
    v = [torch.randn_like(p) for p in union.params]
    expected = union.solve(v, 0.3)
    blocks = ops(union).decomposition_blocks()
    for block in blocks:
        got = ops(union).solve_block(block, [v[i] for i in block.param_indices], 0.3)
        for i, t in zip(block.param_indices, got):
            _close(t, expected[i], rtol=1e-12)
    importer = build()
    importer.load_state_dict(union.state_dict())
    for block in blocks:
        ops(union).decompose(block, 0.3)
        exported = [e.tensor.clone() for e in ops(union).export_decomposition(block, 0.3)]
        ops(importer).import_decomposition(block, 0.3, exported)
    assert torch.equal(_flat(importer.solve(v, 0.3)), _flat(union.solve(v, 0.3)))
    assert importer.num_decompositions == 0


# --- (f) training --------------------------------------------------------------------------


def _char_data(n: int = 16) -> tuple[Tensor, Tensor]:
    """A deterministic character stream: the next token is (token + 1) mod V."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    seq = (start + torch.arange(T + 1)) % VOCAB
    return seq[:, :-1], seq[:, 1:].reshape(-1)


@pytest.mark.parametrize("mode", MODES)
def test_natural_gradient_trains_a_tied_char_lm(mode: str) -> None:
    model = _model(std=0.02)
    loss_fn = nn.CrossEntropyLoss()
    x, y = _char_data()
    curvature = curvlab.KFAC(model, loss_fn, fisher_type="mc", damping_mode=mode)
    assert curvature.coverage()["tok.weight"] == TIED_KRONECKER_SUM
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    precond = curvlab.NaturalGradient(curvature, damping=1e-2, optimizer=opt)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        precond.backward(loss)
        precond.step()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_kfac_optimizer_trains_a_tied_char_lm() -> None:
    model = _model(std=0.02)
    loss_fn = nn.CrossEntropyLoss()
    x, y = _char_data()
    curvature = curvlab.KFC(model, loss_fn, fisher_type="mc", damping_mode="factored")
    assert curvature.coverage()["tok.weight"] == TIED_KRONECKER_SUM
    opt = curvlab.KFACOptimizer(model, loss_fn, damping=1e-1, curvature=curvature)
    losses = [float(opt.step(lambda: loss_fn(model(x), y))) for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
