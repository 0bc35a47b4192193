"""``EigenbasisAdam``: AdamW in the eigenbasis of the K-FAC factors.

Checked against torch's AdamW (identity eigenbasis), against a dense float64 reference
written out by hand (factors, eigenbases, the moments carried across refreshes), on the
zoo, and for its errors, checkpoints, skipped parameters and hooks.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.optim import eigenbasis_adam
from curvlab.optim.eigenbasis_adam import EigenbasisAdam, rotate_moments
from tests.zoo import ZOO, ZooCase

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

DTYPE = torch.float64


def _batch(n: int = 16, d_in: int = 5, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=DTYPE), torch.randint(
        0, classes, (n,), generator=g
    )


def _mlp(bias: bool = True, norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(5, 4, bias=bias)]
    if norm:
        layers.append(nn.LayerNorm(4))
    layers += [nn.Tanh(), nn.Linear(4, 3, bias=bias)]
    return nn.Sequential(*layers).to(DTYPE)


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        # no bias before a BatchNorm: its gradient would be rounding noise, which Adam
        # normalises to steps of size lr that no two implementations agree on
        nn.Conv2d(2, 3, 3, stride=2, bias=False),
        nn.BatchNorm2d(3),
        nn.Flatten(),
        nn.Linear(12, 3),
    ).to(DTYPE)


def _loop(opt: EigenbasisAdam, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor):
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    opt.backward(loss)
    opt.step()
    return loss.detach()


# --- (a) the identity eigenbasis is AdamW ----------------------------------------------


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (lambda: _mlp(), (5,)),
        (lambda: _mlp(bias=False, norm=True), (5,)),
        (_convnet, (1, 5, 5)),
    ],
    ids=["mlp", "mlp-norm-nobias", "convnet-bn"],
)
@pytest.mark.parametrize(("update_every", "refresh_every"), [(1, 1), (2, 3)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_identity_eigenbasis_is_adamw_step_for_step(
    monkeypatch, build, shape, update_every, refresh_every, weight_decay
) -> None:
    """With eigenvectors forced to the identity every rotation (the gradient's, the
    update's, the moments' at a refresh) is the identity: torch's AdamW, step for step."""
    monkeypatch.setattr(
        eigenbasis_adam,
        "_eigenvectors",
        lambda f: torch.eye(f.shape[0], dtype=f.dtype, device=f.device),
    )
    model = build()
    reference = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    settings = {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": weight_decay}
    opt = EigenbasisAdam(
        model, loss_fn, update_every=update_every, refresh_every=refresh_every, **settings
    )
    assert any(v == "eigenbasis" for v in opt.coverage().values())
    adamw = torch.optim.AdamW(reference.parameters(), foreach=False, **settings)
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        x = torch.randn(8, *shape, generator=g, dtype=DTYPE)
        y = torch.randint(0, 3, (8,), generator=g)
        _loop(opt, model, loss_fn, x, y)
        adamw.zero_grad()
        loss_fn(reference(x), y).backward()
        adamw.step()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15, msg=name)


# --- (b), (c) the dense reference ------------------------------------------------------


def _hand_factors(model: nn.Sequential, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Empirical-Fisher K-FAC factors of the two Linear layers, written out:
    ``A = mean ā āᵀ``, ``G = N Σ_n g_n g_nᵀ`` (``g_n``: sample n's share of the mean loss's
    gradient at the layer output; the empirical Fisher's scale for a mean CE loss)."""
    first, act, second = model[0], model[1], model[2]
    h = first(x)
    h.retain_grad()
    z = act(h)
    out = second(z)
    out.retain_grad()
    nn.functional.cross_entropy(out, y).backward()
    n = x.shape[0]

    def homogeneous(t: Tensor, layer: nn.Linear) -> Tensor:
        return torch.cat([t, torch.ones(n, 1, dtype=DTYPE)], 1) if layer.bias is not None else t

    factors = []
    for inputs, grads, layer in ((x, h.grad, first), (z.detach(), out.grad, second)):
        a = homogeneous(inputs, layer)
        factors.append((a.T @ a / n, n * grads.T @ grads))
    model.zero_grad()
    return factors


def _vec(layer: nn.Linear, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Row-major ``vec([W | b])``."""
    mat = weight if bias is None else torch.cat([weight, bias[:, None]], 1)
    return mat.reshape(-1)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("weight_decay", "factor_decay"), [(0.0, 0.0), (0.05, 0.7)])
def test_matches_a_dense_reference_written_out_by_hand(bias, weight_decay, factor_decay) -> None:
    """Per Linear layer, in float64 with the dense ``[P, P]`` rotation ``Q = Q_G ⊗ Q_A``:
    ``g' = Qᵀ g``, Adam's moments in that basis, ``u = Q (m̂'/(√v̂' + ε))``; the first
    moment is the moving average of the raw gradients expressed in the current basis
    (carried exactly across refreshes, (c)), the second carried by ``(R∘R)ᵀ v`` with
    ``R = Q_oldᵀ Q_new``. The factors (empirical Fisher, averaged with ``factor_decay``)
    are checked against the hand-written ones too. The basis is refreshed every step, on
    a fixed batch, so it changes at every step."""
    model = nn.Sequential(*[m for m in _mlp(bias=bias)])
    reference = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    x, y = _batch()
    lr, (b1, b2), eps = 0.05, (0.9, 0.99), 1e-8
    opt = EigenbasisAdam(
        model,
        curvature=curvlab.KFAC(model, loss_fn, fisher_type="empirical"),
        lr=lr,
        betas=(b1, b2),
        eps=eps,
        weight_decay=weight_decay,
        factor_decay=factor_decay,
        update_every=1,
        refresh_every=1,
    )
    layers = [reference[0], reference[2]]
    average: list[tuple[Tensor, Tensor]] | None = None
    raw_m = [torch.zeros(0)] * 2  # EMA of the raw gradients (parameter space)
    v = [torch.zeros(0)] * 2  # the second moment in the current basis
    basis: list[Tensor | None] = [None, None]
    for t in range(1, 7):
        # the optimizer
        _loop(opt, model, loss_fn, x, y)
        # the reference
        factors = _hand_factors(reference, x, y)
        if average is None:
            average = factors
        else:
            eps_t = min(1 - 1 / t, factor_decay)
            average = [
                (eps_t * a0 + (1 - eps_t) * a, eps_t * g0 + (1 - eps_t) * g)
                for (a0, g0), (a, g) in zip(average, factors)
            ]
        for (a, g), f in zip(average, opt.average.value):
            torch.testing.assert_close(f[0], a)
            torch.testing.assert_close(f[1], g)
        grads = torch.autograd.grad(loss_fn(reference(x), y), list(reference.parameters()))
        per_layer = [grads[: len(grads) // 2], grads[len(grads) // 2 :]]
        with torch.no_grad():
            for i, (layer, (a, g), gs) in enumerate(zip(layers, average, per_layer)):
                q = torch.kron(torch.linalg.eigh(g).eigenvectors, torch.linalg.eigh(a).eigenvectors)
                flat = _vec(layer, gs[0], gs[1] if bias else None)
                if basis[i] is None:
                    raw_m[i] = torch.zeros_like(flat)
                    v[i] = torch.zeros_like(flat)
                else:
                    r = basis[i].T @ q
                    v[i] = (r * r).T @ v[i]
                basis[i] = q
                raw_m[i] = b1 * raw_m[i] + (1 - b1) * flat
                rotated = q.T @ flat
                v[i] = b2 * v[i] + (1 - b2) * rotated**2
                m_hat = q.T @ raw_m[i] / (1 - b1**t)
                v_hat = v[i] / (1 - b2**t)
                u = q @ (m_hat / (v_hat.sqrt() + eps))
                cols = layer.in_features + int(bias)
                mat = u.reshape(layer.out_features, cols)
                for p, d in zip(layer.parameters(), (mat[:, : layer.in_features], mat[:, -1])):
                    p.mul_(1 - lr * weight_decay).sub_(lr * d)
                # (c): the optimizer's first moment is the raw EMA in the new basis
                state = opt.state[model[2 * i].weight]
                q_out, q_in = state["basis_out"], state["basis_in"]
                torch.testing.assert_close(
                    torch.kron(q_out, q_in).T @ raw_m[i], state["exp_avg"].reshape(-1)
                )
        for (name, p), q_ in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(
                p, q_, rtol=1e-7, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_refresh_rotates_the_first_moment_exactly_and_the_second_by_squares() -> None:
    """``rotate_moments`` against the dense Kronecker form, for random orthogonal
    rotations; ``Σ v`` is kept and a permutation carries ``v`` exactly."""
    g = torch.Generator().manual_seed(0)

    def orthogonal(n: int) -> Tensor:
        return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE)).Q

    m = torch.randn(3, 4, generator=g, dtype=DTYPE)
    v = torch.rand(3, 4, generator=g, dtype=DTYPE)
    r_out, r_in = orthogonal(3), orthogonal(4)
    m_new, v_new = rotate_moments(m, v, r_out, r_in)
    dense = torch.kron(r_out, r_in)
    torch.testing.assert_close(m_new.reshape(-1), dense.T @ m.reshape(-1))
    torch.testing.assert_close(v_new.reshape(-1), (dense * dense).T @ v.reshape(-1))
    torch.testing.assert_close(v_new.sum(), v.sum())
    assert (v_new >= 0).all()
    perm_out = torch.eye(3, dtype=DTYPE)[[2, 0, 1]]
    perm_in = -torch.eye(4, dtype=DTYPE)[[1, 0, 3, 2]]  # a permutation with flips
    _, v_perm = rotate_moments(m, v, perm_out, perm_in)
    torch.testing.assert_close(v_perm, perm_out.T @ v @ perm_in.abs())
    m_only, _ = rotate_moments(m, v, r_out, None)  # the input side keeps its basis
    torch.testing.assert_close(m_only, r_out.T @ m)


# --- (d) training ----------------------------------------------------------------------

STEPS = 15


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_trains_every_zoo_model(case: ZooCase) -> None:
    """15 steps on one fixed zoo batch, bases refreshed every 5: the loss falls, every
    parameter and buffer stays finite (MLP, CNN, ResNet with BatchNorm, transformers with
    LayerNorm, character GPTs with tied weights, LSTM/GRU, U-Net, ...)."""
    torch.manual_seed(0)
    x, y = case.make_batch(torch.Generator().manual_seed(0))
    model, loss_fn = case.make_model(), case.loss_fn()
    opt = EigenbasisAdam(model, loss_fn, lr=1e-2, update_every=1, refresh_every=5)
    with torch.no_grad():
        start = float(loss_fn(model(x), y))
    for _ in range(STEPS):
        _loop(opt, model, loss_fn, x, y)
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    assert final < start, f"the loss rose from {start:.4g} to {final:.4g}"
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{name} is not finite"
    assert "eigenbasis" in opt.coverage().values()
    opt.close()


def test_lstm_maps_in_the_eigenbasis_with_recurrent_independent() -> None:
    case = next(c for c in ZOO if c.name == "lstm")
    x, y = case.make_batch(torch.Generator().manual_seed(0))
    model, loss_fn = case.make_model(), case.loss_fn()
    default = EigenbasisAdam(model, loss_fn).coverage()
    assert "diagonal" in default["rnn.weight_ih_l0"]
    opt = EigenbasisAdam(
        model, loss_fn, lr=1e-2, update_every=1, refresh_every=3, recurrent="independent"
    )
    assert opt.coverage()["rnn.weight_hh_l0"] == "eigenbasis"
    start = float(loss_fn(model(x), y).detach())
    for _ in range(STEPS):
        _loop(opt, model, loss_fn, x, y)
    assert float(loss_fn(model(x), y).detach()) < start


def test_coverage_names_every_parameter_and_the_reason() -> None:
    case = next(c for c in ZOO if c.name == "gpt_char_tied")
    model, loss_fn = case.make_model(), case.loss_fn()
    cover = EigenbasisAdam(model, loss_fn).coverage()
    assert list(cover) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert cover["attn.q.weight"] == "eigenbasis"
    assert cover["ln1.weight"].startswith("adamw (") and "diagonal" in cover["ln1.weight"]
    # tied with the head: K-FAC's block is a Kronecker sum, which has no eigenbasis of the
    # form Q_G ⊗ Q_A, so the weight takes AdamW
    assert cover["tok.weight"].startswith("adamw (") and "tied" in cover["tok.weight"]
    assert cover["pos"].startswith("adamw (")


def test_structured_output_factors_take_adamw_and_say_so() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).to(DTYPE)
    loss_fn = nn.CrossEntropyLoss()
    curvature = curvlab.KFAC(model, loss_fn, output_factor={"2": "structured"})
    opt = EigenbasisAdam(model, curvature=curvature, lr=1e-2, update_every=1)
    cover = opt.coverage()
    assert cover["0.weight"] == "eigenbasis"
    assert cover["2.weight"].startswith("adamw (structured output factor")
    x, y = _batch(d_in=4, classes=5)
    for _ in range(3):
        _loop(opt, model, loss_fn, x, y)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # vocabulary-sized outputs: the default curvature leaves the layer out
    big = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, eigenbasis_adam.STRUCTURED_OUTPUT_THRESHOLD))
    cover = EigenbasisAdam(big, loss_fn).coverage()
    assert cover["0.weight"] == "eigenbasis"
    assert "outputs" in cover["1.weight"] and cover["1.weight"].startswith("adamw (")


def test_a_model_without_kronecker_layers_is_plain_adamw() -> None:
    model = nn.Sequential(nn.LayerNorm(3)).to(DTYPE)
    opt = EigenbasisAdam(model, nn.MSELoss())
    assert opt.curvature is None and opt.blocks == []
    assert all(v.startswith("adamw (") for v in opt.coverage().values())
    x = torch.randn(4, 3, dtype=DTYPE)
    _loop(opt, model, nn.MSELoss(), x, torch.zeros(4, 3, dtype=DTYPE))


# --- (e) errors ------------------------------------------------------------------------

ERRORS = [
    ({"lr": -1.0}, "lr"),
    ({"lr": math.nan}, "lr"),
    ({"lr": "fast"}, "lr"),
    ({"betas": (0.9,)}, "betas"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"betas": (-0.1, 0.9)}, "betas"),
    ({"eps": -1e-8}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"weight_decay": math.inf}, "weight_decay"),
    ({"factor_decay": 1.0}, "factor_decay"),
    ({"factor_decay": -0.5}, "factor_decay"),
    ({"update_every": 0}, "update_every"),
    ({"update_every": 2.5}, "update_every"),
    ({"update_every": True}, "update_every"),
    ({"refresh_every": 0}, "refresh_every"),
    ({"refresh_every": None}, "refresh_every"),
    ({"fisher_type": "fast"}, "fisher_type"),
    ({"statistics_fraction": 0.0}, "statistics_fraction"),
    ({"recurrent": "nope"}, "recurrent"),
]


@pytest.mark.parametrize(("kwargs", "argument"), ERRORS, ids=[str(k) for k, _ in ERRORS])
def test_bad_arguments_raise_naming_the_argument(kwargs, argument) -> None:
    with pytest.raises(ValueError, match=argument):
        EigenbasisAdam(_mlp(), nn.CrossEntropyLoss(), **kwargs)


def test_bad_curvature_and_model_raise() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="loss_fn"):
        EigenbasisAdam(model)
    with pytest.raises(TypeError, match="Kronecker-factored"):
        EigenbasisAdam(model, curvature=curvlab.DiagonalFisher(model, loss_fn))
    with pytest.raises(ValueError, match="another model"):
        EigenbasisAdam(model, curvature=curvlab.KFAC(_mlp(), loss_fn))
    with pytest.raises(ValueError, match="loss_fn"):
        EigenbasisAdam(model, nn.CrossEntropyLoss(), curvature=curvlab.KFAC(model, loss_fn))
    with pytest.raises(TypeError, match="model"):
        EigenbasisAdam("model", loss_fn)  # type: ignore[arg-type]
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        EigenbasisAdam(frozen, loss_fn)


def test_a_second_param_group_is_refused() -> None:
    opt = EigenbasisAdam(_mlp(), nn.CrossEntropyLoss())
    with pytest.raises(NotImplementedError, match="one param group"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))]})


def test_a_non_finite_loss_on_a_factor_step_raises() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = EigenbasisAdam(model, loss_fn)
    x, y = _batch()
    with pytest.raises(FloatingPointError, match="not finite"):
        opt.backward(loss_fn(model(x), y) * math.nan)


# --- (f) checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("through_file", [False, True])
def test_state_dict_round_trip_continues_identically(through_file) -> None:
    """Five steps, save; a copy of the model with a new optimizer that loads the state
    takes the next five steps exactly as the original (MC sampling seeded alike)."""
    loss_fn = nn.CrossEntropyLoss()
    model = _mlp(norm=True)
    opt = EigenbasisAdam(model, loss_fn, lr=1e-2, update_every=2, refresh_every=3)
    batches = [_batch(seed=s) for s in range(10)]
    for s in range(5):
        torch.manual_seed(s)
        _loop(opt, model, loss_fn, *batches[s])
    state = opt.state_dict()
    if through_file:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=False)
    twin = copy.deepcopy(model)
    resumed = EigenbasisAdam(twin, loss_fn, lr=1e-2, update_every=2, refresh_every=3)
    resumed.load_state_dict(state)
    assert resumed.steps == 5 and resumed.average.num_updates == opt.average.num_updates
    for s in range(5, 10):
        torch.manual_seed(s)
        _loop(opt, model, loss_fn, *batches[s])
        torch.manual_seed(s)
        _loop(resumed, twin, loss_fn, *batches[s])
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_load_state_dict_refuses_foreign_states() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = EigenbasisAdam(model, loss_fn)
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="eigenbasis"):
        opt.load_state_dict(adamw.state_dict())
    state = opt.state_dict()
    state["eigenbasis"] = {**state["eigenbasis"], "format": 99}
    with pytest.raises(ValueError, match="format"):
        opt.load_state_dict(state)


# --- (g) parameters without gradients ---------------------------------------------------


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 3)
        self.aux = nn.Linear(5, 2)  # never called
        self.spare = nn.Parameter(torch.ones(2))  # never used

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def test_parameters_without_gradient_are_skipped() -> None:
    torch.manual_seed(0)
    model = _WithUnused().to(DTYPE)
    loss_fn = nn.CrossEntropyLoss()
    opt = EigenbasisAdam(model, loss_fn, lr=1e-2, weight_decay=0.1, update_every=1, refresh_every=2)
    assert opt.coverage()["aux.weight"] == "eigenbasis"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = _batch()
    for _ in range(4):
        _loop(opt, model, loss_fn, x, y)
    after = dict(model.named_parameters())
    for name in ("aux.weight", "aux.bias", "spare"):
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
        assert after[name].grad is None
    assert not torch.equal(after["body.weight"], before["body.weight"])
    assert "exp_avg" not in opt.state[model.aux.weight]
    assert "exp_avg" not in opt.state[model.spare]


# --- lifecycle ---------------------------------------------------------------------------


def _hooked(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_close_removes_the_hooks_and_the_context_manager_closes() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    x, y = _batch()
    with EigenbasisAdam(model, loss_fn, update_every=1) as opt:
        _loop(opt, model, loss_fn, x, y)
        loss_fn(model(x), y)  # a recorded forward, never used
        assert _hooked(model)
    assert opt.closed and not _hooked(model)
    with pytest.raises(RuntimeError, match="closed"):
        opt.backward(loss_fn(model(x), y))
    with pytest.raises(RuntimeError, match="closed"):
        opt.step()
    assert opt.state_dict()["eigenbasis"]["steps"] == 1
    copy.deepcopy(model)  # no curvlab state on the model


def test_plain_backward_and_closure_work_and_schedulers_set_the_rate() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    x, y = _batch()
    opt = EigenbasisAdam(model, loss_fn, lr=1e-2, update_every=1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        opt.backward(loss)
        return loss

    first = opt.step(closure)
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    opt.zero_grad()
    loss_fn(model(x), y).backward()  # plain backward: no factors this step
    opt.step()
    assert opt.average.num_updates == 1
    assert first is not None and torch.isfinite(first)


def test_exported_from_curvlab() -> None:
    assert curvlab.EigenbasisAdam is EigenbasisAdam
    assert curvlab.optim.EigenbasisAdam is EigenbasisAdam


# --- the race's contender ----------------------------------------------------------------


def test_the_race_contender_is_eigenbasis_adam_with_weight_decay() -> None:
    """``eig-adam`` of benchmarks/optimizer_race.py takes EigenbasisAdam's steps (weight
    decay 0.01), and each of its search spaces has at most five settings."""
    from benchmarks.optimizer_race import CONTENDERS, WORKLOAD_SETTINGS

    contender = CONTENDERS["eig-adam"]
    spaces = [contender.settings] + [
        s["eig-adam"] for s in WORKLOAD_SETTINGS.values() if "eig-adam" in s
    ]
    assert all(1 <= len(space) <= 5 for space in spaces)
    model, loss_fn = _mlp(norm=True), nn.CrossEntropyLoss()
    reference = copy.deepcopy(model)
    step = contender.make(model, loss_fn, {"lr": 1e-2, "update_every": 1})
    opt = EigenbasisAdam(reference, loss_fn, lr=1e-2, update_every=1, weight_decay=0.01)
    for s in range(3):
        x, y = _batch(seed=s)
        torch.manual_seed(s)
        step(x, y)
        torch.manual_seed(s)
        _loop(opt, reference, loss_fn, x, y)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
