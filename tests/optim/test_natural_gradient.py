"""``NaturalGradient``: exactness, every backend, amortisation, checkpoints, training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import curvlab
from curvlab import linalg
from tests.cases import CASES, DTYPE
from tests.curvature.backend_info import BACKENDS

MLP_CE = next(c for c in CASES if c.id == "mlp-ce-mean")


def _flat(v) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in v])


def _grads(model, loss_fn, x, y) -> list[torch.Tensor]:
    return [g.detach() for g in torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))]


def test_exact_fisher_gives_the_damped_natural_gradient() -> None:
    model, loss_fn = MLP_CE.build()
    x, y = MLP_CE.data(n=8)
    damping = 0.05
    precond = curvlab.NaturalGradient(
        curvlab.ExactFisher(model, loss_fn), damping=damping, kl_clip=None
    )
    g = _grads(model, loss_fn, x, y)
    precond.backward(loss_fn(model(x), y))
    precond.step()
    reference = curvlab.ExactFisher(model, loss_fn)
    reference.update(x, y)
    dense = reference.to_dense()
    expected = torch.linalg.solve(dense + damping * torch.eye(len(dense), dtype=DTYPE), _flat(g))
    torch.testing.assert_close(_flat(p.grad for p in model.parameters()), expected)


@pytest.mark.parametrize("row", BACKENDS, ids=lambda row: row.id)
def test_every_backend_gives_its_own_solve(row) -> None:
    case = next(c for c in CASES if c.id == "conv2d-ce-mean") if row.supports is None else MLP_CE
    model, loss_fn = case.build()
    x, y = case.data(n=6)
    backend = curvlab.make(row.name, model, loss_fn, **row.kwargs)
    precond = curvlab.NaturalGradient(backend, damping=0.1, kl_clip=None)
    torch.manual_seed(7)
    precond.backward(loss_fn(model(x), y))
    g = [p.grad.clone() for p in backend.params]
    precond.step()
    natural = [p.grad.clone() for p in backend.params]
    reference = curvlab.make(row.name, model, loss_fn, **row.kwargs)
    torch.manual_seed(7)
    with reference.recording():
        loss = loss_fn(model(x), y)
    reference.accumulate(loss)
    expected = reference.solve(g, 0.1)
    torch.testing.assert_close(_flat(natural), _flat(expected))


def test_kfac_on_one_linear_layer_with_one_sample_is_exact_natural_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(DTYPE)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(1, 4, dtype=DTYPE), torch.tensor([1])
    results = []
    for backend in (
        curvlab.KFAC(model, loss_fn, fisher_type="exact"),
        curvlab.ExactFisher(model, loss_fn),
    ):
        model.zero_grad()
        precond = curvlab.NaturalGradient(backend, damping=1e-3, kl_clip=None)
        precond.backward(loss_fn(model(x), y))
        precond.step()
        results.append(_flat(p.grad for p in model.parameters()))
    torch.testing.assert_close(results[0], results[1], rtol=1e-8, atol=1e-10)


def test_uncovered_parameters_keep_their_plain_gradient() -> None:
    case = next(c for c in CASES if c.id == "conv2d-ce-mean")
    model, loss_fn = case.build()
    x, y = case.data(n=5)
    plain = _grads(model, loss_fn, x, y)
    precond = curvlab.NaturalGradient(
        curvlab.KFAC(model, loss_fn, exclude=["0"]), damping=0.1, kl_clip=None
    )
    precond.backward(loss_fn(model(x), y))
    precond.step()
    conv_weight, conv_bias = model[0].weight, model[0].bias
    torch.testing.assert_close(conv_weight.grad, plain[0])
    torch.testing.assert_close(conv_bias.grad, plain[1])
    assert not torch.allclose(model[3].weight.grad, plain[2])


@pytest.mark.parametrize("dropped", [["0.bias"], ["2.weight", "2.bias"]])
def test_parameters_without_gradient_are_skipped_as_torch_optim_skips_them(dropped) -> None:
    """A covered parameter left without ``.grad`` (a module the step did not use) keeps
    ``grad=None``; the others get the damped natural gradient of the gradient with zeros
    there (dense float64 reference). Distributed, the same: tests/optim/test_distributed.py."""
    model, loss_fn = MLP_CE.build()
    x, y = MLP_CE.data(n=8)
    damping = 0.05
    precond = curvlab.NaturalGradient(
        curvlab.ExactFisher(model, loss_fn), damping=damping, kl_clip=None
    )
    precond.backward(loss_fn(model(x), y))
    for name in dropped:
        model.get_parameter(name).grad = None
    g = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    g = [t.clone() for t in g]
    precond.step()
    reference = curvlab.ExactFisher(model, loss_fn)
    reference.update(x, y)
    dense = reference.to_dense()
    expected = torch.linalg.solve(dense + damping * torch.eye(len(dense), dtype=DTYPE), _flat(g))
    sizes = [p.numel() for p in model.parameters()]
    for (name, p), part in zip(model.named_parameters(), expected.split(sizes)):
        if name in dropped:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad.reshape(-1), part)
    for p in model.parameters():
        p.grad = None
    precond.backward(loss_fn(model(x), y))
    for p in model.parameters():
        p.grad = None  # no gradient at all: nothing to precondition
    with pytest.raises(RuntimeError, match=r"parameter '0\.weight' has no gradient"):
        precond.step()


def test_gradient_accumulation_gives_the_union_curvature() -> None:
    model, loss_fn = MLP_CE.build()
    x, y = MLP_CE.data(n=8)
    precond = curvlab.NaturalGradient(
        curvlab.KFAC(model, loss_fn, fisher_type="exact"), kl_clip=None
    )
    for xb, yb in ((x[:3], y[:3]), (x[3:], y[3:])):
        precond.backward(loss_fn(model(xb), yb) * len(xb) / len(x))
    precond.step()
    single = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    single.update(x, y)
    for ours, ref in zip(precond.curvature.factors(), single.factors()):
        torch.testing.assert_close(ours.A, ref.A)
        torch.testing.assert_close(ours.G, ref.G)


def test_moving_average_and_amortised_inversions(monkeypatch) -> None:
    model, loss_fn = MLP_CE.build()
    backend = curvlab.KFAC(model, loss_fn, fisher_type="exact")
    precond = curvlab.NaturalGradient(
        backend, update_every=2, invert_every=3, ema_decay=0.9, kl_clip=None
    )
    calls = []
    original = linalg.symeig
    monkeypatch.setattr(linalg, "symeig", lambda *a, **k: calls.append(1) or original(*a, **k))
    batches = [MLP_CE.data(n=6, seed=s) for s in range(7)]
    per_step_stats = []
    for step, (x, y) in enumerate(batches):
        model.zero_grad()
        precond.backward(loss_fn(model(x), y))
        if step % 2 == 0:
            per_step_stats.append(curvlab.KFAC(model, loss_fn, fisher_type="exact"))
            per_step_stats[-1].update(x, y)
        precond.step()
    # statistics at steps 0, 2, 4, 6; ε = min(1 − 1/u, 0.9): 0, 1/2, 2/3, 3/4
    expected = per_step_stats[0].factors()[0].G
    for u, c in enumerate(per_step_stats[1:], start=2):
        eps = min(1 - 1 / u, 0.9)
        expected = eps * expected + (1 - eps) * c.factors()[0].G
    torch.testing.assert_close(precond.average.value["G"][0], expected)
    # decompositions only at the inversion steps 0, 3, 6 (two factors per layer)
    assert len(calls) == 3 * 2 * len(backend.layers)


def test_kl_clipping_bounds_the_step() -> None:
    model, loss_fn = MLP_CE.build()
    x, y = MLP_CE.data(n=8)
    free = curvlab.NaturalGradient(
        curvlab.KFAC(model, loss_fn, fisher_type="exact"), damping=1e-3, kl_clip=None
    )
    free.backward(loss_fn(model(x), y))
    g = [p.grad.clone() for p in model.parameters()]
    free.step()
    unclipped = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    kappa, lr = 1e-4, 0.5
    clipped = curvlab.NaturalGradient(
        curvlab.KFAC(model, loss_fn, fisher_type="exact"), damping=1e-3, kl_clip=kappa, lr=lr
    )
    clipped.backward(loss_fn(model(x), y))
    clipped.step()
    quad = abs(lr**2 * float(sum((u * gg).sum() for u, gg in zip(unclipped, g))))
    nu = min(1.0, (kappa / quad) ** 0.5)
    assert nu < 1.0
    torch.testing.assert_close(_flat(p.grad for p in model.parameters()), nu * _flat(unclipped))


def _train(model, loss_fn, precond, opt, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        precond.backward(loss_fn(model(x), y))
        precond.step()
        opt.step()


RESUME_OPTIONS = {
    "kfac": {"fisher_type": "mc"},
    "block_diagonal": {},
    "ekfac": {"fisher_type": "mc", "refit_every": 3},  # refits at the 6th step, after resume
}


@pytest.mark.parametrize("backend", list(RESUME_OPTIONS))
def test_resuming_from_a_checkpoint_is_bit_identical(backend) -> None:
    batches = [MLP_CE.data(n=8, seed=s) for s in range(8)]

    def fresh():
        model, loss_fn = MLP_CE.build()
        kwargs = RESUME_OPTIONS[backend]
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        precond = curvlab.NaturalGradient(
            curvlab.make(backend, model, loss_fn, **kwargs),
            damping=lambda step: 0.1 / (1 + step),
            update_every=2,
            invert_every=3,
            ema_decay=0.8,
            optimizer=opt,  # the default KL clip reads its learning rate
        )
        return model, loss_fn, precond, opt

    torch.manual_seed(0)
    model, loss_fn, precond, opt = fresh()
    _train(model, loss_fn, precond, opt, batches)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(0)
    model, loss_fn, precond, opt = fresh()
    _train(model, loss_fn, precond, opt, batches[:5])
    checkpoint = copy.deepcopy(
        {
            "model": model.state_dict(),
            "precond": precond.state_dict(),
            "opt": opt.state_dict(),
            "rng": torch.get_rng_state(),
        }
    )
    model, loss_fn, precond, opt = fresh()
    model.load_state_dict(checkpoint["model"])
    precond.load_state_dict(checkpoint["precond"])
    opt.load_state_dict(checkpoint["opt"])
    torch.set_rng_state(checkpoint["rng"])
    _train(model, loss_fn, precond, opt, batches[5:])
    for a, b in zip(model.parameters(), uninterrupted):
        assert torch.equal(a.detach(), b)


def test_bad_arguments_and_order() -> None:
    model, loss_fn = MLP_CE.build()
    backend = curvlab.KFAC(model, loss_fn)
    with pytest.raises(TypeError, match=r"curvlab\.Curvature"):
        curvlab.NaturalGradient(model, kl_clip=None)
    for kwargs, match in [
        ({"update_every": 0}, "update_every"),
        ({"invert_every": 1.5}, "invert_every"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"damping": -1.0}, "damping"),
        ({"kl_clip": 0.0}, "kl_clip"),
    ]:
        with pytest.raises(ValueError, match=match):
            curvlab.NaturalGradient(backend, **kwargs)
    precond = curvlab.NaturalGradient(backend, kl_clip=None)
    with pytest.raises(RuntimeError, match="no curvature yet"):
        precond.step()
    bad_schedule = curvlab.NaturalGradient(backend, damping=lambda step: float("nan"), kl_clip=None)
    x, y = MLP_CE.data()
    bad_schedule.backward(loss_fn(model(x), y))
    with pytest.raises(ValueError, match="finite"):
        bad_schedule.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_without_leaving_the_device() -> None:
    model, loss_fn = MLP_CE.build()
    model = model.float().cuda()
    x, y = MLP_CE.data(n=16)
    x, y = x.float().cuda(), y.cuda()
    precond = curvlab.NaturalGradient(curvlab.KFAC(model, loss_fn), damping=1e-2, kl_clip=None)
    for _ in range(3):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        precond.backward(loss)
        precond.step()
    assert all(p.grad.is_cuda and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(
        t.dtype == torch.float32 for t in precond.average.value["A"] + precond.average.value["G"]
    )


def test_kfac_reaches_the_target_loss_in_fewer_iterations_than_sgd_and_adam() -> None:
    """Digits, MLP 64-32-10, batches of 128, seeded. Each optimizer gets its best learning
    rate from a fixed grid; K-FAC (NaturalGradient + SGD with momentum) and the full K-FAC
    recipe (KFACOptimizer, best initial damping of a grid) must each need fewer iterations
    than both to bring the full training loss below 0.1. Iterations, not time."""
    from sklearn.datasets import load_digits

    data, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(data / 16.0, dtype=torch.float32)
    targets = torch.tensor(labels)
    loss_fn = nn.CrossEntropyLoss()

    def iterations_to_target(kind: str, lr: float, target: float = 0.1, limit: int = 300):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        if kind == "kfac_optimizer":  # lr is the initial damping: α, μ come from the model
            kfac_opt = curvlab.KFACOptimizer(model, loss_fn, damping=lr)
        if kind == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        precond = None
        if kind == "kfac":
            kfac = curvlab.KFAC(model, loss_fn, fisher_type="mc")
            precond = curvlab.NaturalGradient(kfac, damping=1e-2, invert_every=5, kl_clip=None)
        order = torch.Generator().manual_seed(1)
        step = 0
        while step < limit:
            perm = torch.randperm(len(inputs), generator=order)
            for start in range(0, len(inputs) - 127, 128):
                idx = perm[start : start + 128]
                step += 1
                if kind == "kfac_optimizer":
                    kfac_opt.step(lambda idx=idx: loss_fn(model(inputs[idx]), targets[idx]))
                else:
                    opt.zero_grad()
                    loss = loss_fn(model(inputs[idx]), targets[idx])
                    if precond is None:
                        loss.backward()
                    else:
                        precond.backward(loss)
                        precond.step()
                    opt.step()
                with torch.no_grad():
                    if float(loss_fn(model(inputs), targets)) < target:
                        return step
        return limit + 1

    grids = {
        "sgd": [0.1, 0.3, 1.0, 3.0],
        "adam": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
        "kfac": [3e-3, 1e-2, 3e-2, 1e-1],
        "kfac_optimizer": [0.1, 1.0],  # initial damping
    }
    best = {kind: min(iterations_to_target(kind, lr) for lr in lrs) for kind, lrs in grids.items()}
    for kfac in ("kfac", "kfac_optimizer"):
        assert best[kfac] < best["adam"] and best[kfac] < best["sgd"], best


def test_levenberg_marquardt_damping_adapts_from_the_closure() -> None:
    # least squares with the exact Fisher: the quadratic model is exact, so ρ = 1 and λ
    # shrinks on every due step; without a closure it stays
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).to(DTYPE)
    loss_fn = nn.MSELoss()
    x, y = torch.randn(20, 5, dtype=DTYPE), torch.randn(20, 3, dtype=DTYPE)
    lm = curvlab.LevenbergMarquardt(initial=1.0, interval=2)
    precond = curvlab.NaturalGradient(
        curvlab.ExactFisher(model, loss_fn), damping=lm, lr=0.5, kl_clip=None
    )
    values = []
    for step in range(5):
        model.zero_grad()
        precond.backward(loss_fn(model(x), y))
        precond.step(closure=(lambda: loss_fn(model(x), y)) if step < 4 else None)
        values.append(lm.value)
    shrink = (19 / 20) ** 2
    assert values == pytest.approx([shrink, shrink, shrink**2, shrink**2, shrink**2])
    assert precond.state_dict()["damping"] == {"value": lm.value}


def test_non_finite_loss_on_a_curvature_step_is_reported() -> None:
    model, loss_fn = MLP_CE.build()
    precond = curvlab.NaturalGradient(curvlab.KFAC(model, loss_fn), kl_clip=None)
    x, y = MLP_CE.data()
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss is not finite"):
        precond.backward(loss_fn(model(x), y))


@pytest.mark.parametrize("backend", ["kfac", "kfc", "block_diagonal", "ekfac"])
def test_statistics_stay_float32_under_bf16_autocast(backend) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    kwargs = {} if backend == "block_diagonal" else {"fisher_type": "exact"}
    stats = []
    for amp in (False, True):
        precond = curvlab.NaturalGradient(
            curvlab.make(backend, model, loss_fn, **kwargs), kl_clip=None
        )
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), y)
        precond.backward(loss)
        precond.step()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        stats.append(precond.average.value)
    for key, reference in stats[0].items():
        if key == "basis_id":
            continue
        for low, full in zip(stats[1][key], reference):
            assert low.dtype == torch.float32
            err = float((low - full).norm() / full.norm())
            assert err < 0.05, f"{key}: bf16 statistics are {err:.3f} from float32"


def test_composes_with_adamw_param_groups_and_weight_decay() -> None:
    model, loss_fn = MLP_CE.build()
    x, y = MLP_CE.data(n=8)
    precond = curvlab.NaturalGradient(
        curvlab.KFAC(model, loss_fn, fisher_type="exact"), damping=0.1, kl_clip=None
    )
    opt = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "lr": 1e-2, "weight_decay": 0.1},
            {"params": model[2].parameters(), "lr": 1e-3, "weight_decay": 0.0},
        ]
    )
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    precond.backward(loss_fn(model(x), y))
    g = [p.grad.clone() for p in model.parameters()]
    precond.step()
    expected = precond.curvature.solve(g, 0.1)
    torch.testing.assert_close(_flat(p.grad for p in model.parameters()), _flat(expected))
    opt.step()
    assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


# --- no silent wrong answers: call order, non-finite gradients, checkpoints -------------


def _ready(backend: str = "kfac", **kw):
    model, loss_fn = MLP_CE.build()
    x, y = MLP_CE.data(n=8)
    precond = curvlab.NaturalGradient(
        curvlab.make(backend, model, loss_fn, **kw), damping=0.1, kl_clip=None
    )
    return model, loss_fn, x, y, precond


def test_step_twice_after_one_backward_is_refused() -> None:
    model, loss_fn, x, y, precond = _ready()
    precond.backward(loss_fn(model(x), y))
    precond.step()
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"no precond\.backward"):
        precond.step()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    assert precond.steps == 1


def test_a_loss_backpropagated_twice_is_named() -> None:
    model, loss_fn, x, y, precond = _ready()
    other = curvlab.NaturalGradient(curvlab.KFAC(model, loss_fn), damping=0.1, kl_clip=None)
    loss = loss_fn(model(x), y)
    precond.backward(loss)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        other.backward(loss)


def test_a_non_finite_gradient_on_a_step_without_curvature_is_refused() -> None:
    model, loss_fn, x, y, _ = _ready()
    precond = curvlab.NaturalGradient(
        curvlab.KFAC(model, loss_fn), damping=0.1, update_every=2, kl_clip=None
    )
    precond.backward(loss_fn(model(x), y))
    precond.step()
    bad = x.clone()
    bad[0, 0] = float("nan")
    precond.backward(loss_fn(model(bad), y))  # no curvature on this step
    with pytest.raises(FloatingPointError, match="gradient is not finite in"):
        precond.step()
    assert precond.steps == 1


def test_a_failing_load_changes_nothing() -> None:
    model, loss_fn, x, y, kfac = _ready("kfac", fisher_type="exact")
    for _ in range(2):
        kfac.backward(loss_fn(model(x), y))
        kfac.step()
    ekfac = curvlab.NaturalGradient(
        curvlab.EKFAC(model, loss_fn, fisher_type="exact"), damping=0.1, kl_clip=None
    )
    for _ in range(7):
        ekfac.backward(loss_fn(model(x), y))
        ekfac.step()
    before = copy.deepcopy(ekfac.state_dict())
    with pytest.raises(ValueError, match="belongs to 'KFAC'"):
        ekfac.load_state_dict(kfac.state_dict())
    assert ekfac.steps == 7
    after = ekfac.state_dict()
    assert after["checksum"] == before["checksum"]


def test_checkpoint_errors_name_what_is_wrong() -> None:
    model, loss_fn, x, y, precond = _ready("kfac", fisher_type="exact")
    precond.backward(loss_fn(model(x), y))
    precond.step()
    state = copy.deepcopy(precond.state_dict())
    missing = {k: v for k, v in state.items() if k != "average"}
    with pytest.raises(ValueError, match=r"lacks \['average'\]"):
        precond.load_state_dict(missing)
    corrupt = copy.deepcopy(state)
    corrupt["average"]["A"][0][0, 0] += 1.0  # a flipped value
    with pytest.raises(ValueError, match="checksum does not match"):
        precond.load_state_dict(corrupt)
    with pytest.raises(ValueError, match="format 99"):
        precond.load_state_dict({**state, "format": 99})


def test_a_float64_checkpoint_loads_into_a_float32_model() -> None:
    model64, loss_fn, x, y, precond64 = _ready("kfac", fisher_type="exact")
    precond64.backward(loss_fn(model64(x), y))
    precond64.step()
    model32 = copy.deepcopy(model64).float()
    precond32 = curvlab.NaturalGradient(
        curvlab.KFAC(model32, loss_fn, fisher_type="exact"), 0.1, kl_clip=None
    )
    precond32.load_state_dict(precond64.state_dict())
    precond32.backward(loss_fn(model32(x.float()), y))
    precond32.step()  # no dtype error in the blend
    assert precond32.average.value["A"][0].dtype == torch.float32
