"""``curvlab.ablation.race``: identical starts, aligned logs, divergence, findings, tuning."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from curvlab.ablation import Contender, Curve, RaceResult, contender, race, tune
from curvlab.ablation.races import _batch_order


def _task(n: int = 96, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    y = (x[:, :classes].argmax(dim=1)).long()
    return (x[: n * 3 // 4], y[: n * 3 // 4]), (x[n * 3 // 4 :], y[n * 3 // 4 :])


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_every_contender_starts_from_the_same_weights_and_logs_aligned_curves() -> None:
    train, val = _task()
    result = race(
        _mlp, nn.CrossEntropyLoss(), train, val, ["sgd", "adam", "ngd", "kfac"], steps=6,
        seed=1, batch_size=16, lr=0.05, eval_every=2, target_loss=10.0,
    )  # fmt: skip
    assert [c.name for c in result.curves] == ["SGD", "Adam", "exact NGD", "kfac"]
    first = {c.train_loss[0] for c in result.curves}
    assert len(first) == 1  # the same initial loss: the same initial weights
    for c in result.curves:
        assert c.steps == [0, 2, 4, 6]
        assert len(c.seconds) == len(c.train_loss) == len(c.val_loss) == len(c.val_accuracy) == 4
        assert c.seconds[0] == 0.0 and all(b >= a for a, b in zip(c.seconds, c.seconds[1:]))
        assert all(0.0 <= acc <= 1.0 for acc in c.train_accuracy + c.val_accuracy)
        assert c.diverged_at is None
        assert c.reached(10.0) == (0, 0.0)
    assert result.settings["train_samples"] == 72 and result.settings["val_samples"] == 24


def test_the_logged_loss_is_the_full_data_loss() -> None:
    train, val = _task()
    result = race(_mlp, nn.CrossEntropyLoss(), train, val, ["sgd"], steps=1, seed=3, eval_every=1)
    torch.manual_seed(3)
    model = _mlp()
    with torch.no_grad():
        train_loss = float(nn.CrossEntropyLoss()(model(train[0]), train[1]))
        val_loss = float(nn.CrossEntropyLoss()(model(val[0]), val[1]))
    assert result.curves[0].train_loss[0] == pytest.approx(train_loss, rel=1e-6)
    assert result.curves[0].val_loss[0] == pytest.approx(val_loss, rel=1e-6)


def test_sgd_in_the_race_matches_a_hand_written_loop() -> None:
    train, val = _task()
    result = race(
        _mlp, nn.CrossEntropyLoss(), train, val, [Contender("SGD", "sgd", 0.1, momentum=0.0)],
        steps=4, seed=0, batch_size=72, eval_every=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):  # batch = the whole training set, so the order does not matter
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(train[0]), train[1]).backward()
        opt.step()
    expected = float(nn.CrossEntropyLoss()(model(train[0]), train[1]).detach())
    assert result.curves[0].train_loss[-1] == pytest.approx(expected, rel=1e-5)


def test_a_diverging_contender_is_recorded_not_raised() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=generator)
    result = race(
        _mlp, nn.MSELoss(), (x[:30], x[:30, :3]), (x[30:], x[30:, :3]),
        [Contender("wild", "sgd", 1e12), Contender("ngd", "sgd", 1e12, curvature="kfac")],
        steps=20, seed=0, eval_every=1, target_loss=0.1,
    )  # fmt: skip
    for c in result.curves:
        assert c.diverged_at is not None and c.diverged_at <= 20
        assert c.steps[-1] < 20
    assert "diverged" in result.to_markdown()
    assert json.loads(result.to_json())["curves"][0]["diverged_at"] is not None
    wild, ngd = result.curves
    assert result.findings() == [
        f"wild: diverged at iteration {wild.diverged_at}",
        f"ngd: diverged at iteration {ngd.diverged_at}",
    ]


def test_non_classification_targets_log_no_accuracy() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=generator)
    result = race(
        lambda: nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 6)), nn.MSELoss(),
        (x[:30], x[:30]), (x[30:], x[30:]), ["sgd", "kfac"], steps=3, seed=0, eval_every=1,
    )  # fmt: skip
    assert all(c.train_accuracy is None and c.val_accuracy is None for c in result.curves)
    assert "—" in result.to_markdown()


def _curve(name, curvature, losses, seconds) -> Curve:
    steps = list(range(0, 10 * len(losses), 10))
    return Curve(name, "sgd", curvature, 0.1, None, steps, seconds, losses, losses, None, None)


def test_findings_are_one_line_per_contender_with_numbers() -> None:
    result = RaceResult(
        [
            _curve("SGD", None, [2.0, 1.0, 0.5, 0.2], [0.0, 1.0, 2.0, 3.0]),
            _curve("exact NGD", "exact_fisher", [2.0, 0.4, 0.05, 0.01], [0.0, 5.0, 10.0, 15.0]),
            _curve("kfac", "kfac", [2.0, 0.8, 0.08, 0.02], [0.0, 1.0, 2.0, 3.0]),
        ],
        target_loss=0.1,
        settings={},
    )
    # ratios to exact NGD at iterations 10, 20, 30: SGD 2.5, 10, 20; kfac 2.0, 1.6, 2.0
    assert result.findings() == [
        "SGD: train loss 0.1 not reached in 30 iterations; final 0.2; median 10× exact NGD's "
        "loss per iteration",
        "exact NGD: train loss 0.1 at iteration 20 (10.00 s); final 0.01",
        "kfac: train loss 0.1 at iteration 20 (2.00 s); final 0.02; median 2.00× exact NGD's "
        "loss per iteration",
    ]
    without_exact = RaceResult(result.curves[::2], target_loss=None, settings={})
    assert without_exact.findings() == ["SGD: final 0.2", "kfac: final 0.02"]
    fast = _curve("fast", None, [2.0, 0.05, 0.01, 0.001], [0.0, 0.001, 0.002, 0.003])
    (line,) = RaceResult([fast], target_loss=0.1, settings={}).findings()
    assert line == "fast: train loss 0.1 at iteration 10 (0.001 s); final 0.001"


def test_model_fn_must_be_deterministic_under_the_seed() -> None:
    train, val = _task()
    counter = iter(range(100))

    def drifting() -> nn.Module:
        torch.manual_seed(next(counter))
        return _mlp()

    with pytest.raises(ValueError, match="different initial weights"):
        race(drifting, nn.CrossEntropyLoss(), train, val, ["sgd", "adam"], steps=1)


def test_bad_contenders_fail_before_any_training() -> None:
    train, val = _task()
    with pytest.raises(
        ValueError,
        match="Valid: sgd, adam, adamw, nadamw, ngd, kfac_optimizer, eig_adam, a curvature",
    ):
        contender("lbfgs", 0.1)
    with pytest.raises(ValueError, match="optimizer must be one of 'sgd', 'adam', 'adamw'"):
        Contender("x", "rmsprop")
    with pytest.raises(
        ValueError, match=r"cannot import module 'no_such_package\.optim' \(ModuleNotFoundError"
    ):
        contender("no_such_package.optim:Fast", 0.1)
    with pytest.raises(ValueError, match=r"module 'torch\.optim' has no 'Fastest'"):
        Contender("x", "torch.optim:Fastest")
    with pytest.raises(ValueError, match=r"not a torch\.optim-style optimizer class"):
        contender("torch.nn:Linear", 0.1)
    with pytest.raises(ValueError, match="is not an import path"):
        contender("torch.optim:", 0.1)
    with pytest.raises(ValueError, match="brings its own curvature"):
        Contender("x", "kfac", curvature="kfac")
    with pytest.raises(ValueError, match=r"'eig_adam' \(EigenbasisAdam\) brings its own"):
        Contender("x", "eig_adam", curvature="kfac")
    with pytest.raises(ValueError, match="lr must be a positive float"):
        Contender("x", "sgd", lr=-1.0)
    with pytest.raises(ValueError, match="distinct contenders"):
        race(_mlp, nn.CrossEntropyLoss(), train, val, ["sgd", "sgd"], steps=1)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        race(_mlp, nn.CrossEntropyLoss(), train, val, ["sgd"], steps=0)
    with pytest.raises(ValueError, match=r"same \(non-zero\) number of samples"):
        race(_mlp, nn.CrossEntropyLoss(), (train[0], train[1][:3]), val, ["sgd"], steps=1)


def test_tune_picks_the_lowest_late_training_loss_of_the_grid() -> None:
    train, val = _task()
    best, scores = tune(
        _mlp, nn.CrossEntropyLoss(), train, val, contender("kfac", 1.0), lrs=(1e-4, 0.1),
        steps=8, dampings=(1e-2, 1e12), eval_every=2,
    )  # fmt: skip
    assert (best.lr, best.damping, best.name) == (0.1, 1e-2, "kfac")
    assert set(scores) == {"lr=0.0001, λ=0.01", "lr=0.0001, λ=1e+12", "lr=0.1, λ=0.01",
                           "lr=0.1, λ=1e+12"}  # fmt: skip
    assert scores["lr=0.1, λ=0.01"] == min(scores.values())
    (curve,) = race(_mlp, nn.CrossEntropyLoss(), train, val, [best], steps=8, eval_every=2).curves
    late = [loss for step, loss in zip(curve.steps, curve.train_loss) if step >= 6]
    assert scores["lr=0.1, λ=0.01"] == pytest.approx(sum(late) / len(late))
    assert curve.damping == 1e-2


def test_the_kfac_optimizer_contender_is_kfac_optimizer_with_its_defaults() -> None:
    """The race's ``kfac_optimizer`` is exactly ``KFACOptimizer(model, loss_fn)`` stepped on
    the race's batches; its λ column is its λ at the end (adapted, or kept where the
    reduction ratio lay between its thresholds)."""
    import curvlab

    train, val = _task()
    options = dict(steps=6, seed=1, batch_size=16, eval_every=3)
    (curve,) = race(_mlp, nn.CrossEntropyLoss(), train, val, ["kfac_optimizer"], **options).curves
    torch.manual_seed(1)
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = curvlab.KFACOptimizer(model, loss_fn)
    torch.manual_seed(1)
    for index in _batch_order(len(train[0]), 16, 6, 1):
        x, y = train[0][index], train[1][index]
        opt.step(lambda x=x, y=y: loss_fn(model(x), y))
    with torch.no_grad():
        final = float(loss_fn(model(train[0]), train[1]))
    assert curve.name == "KFACOptimizer" and curve.optimizer == "kfac"
    assert curve.lr is None  # it uses no learning rate: the record says so
    assert curve.train_loss[-1] == pytest.approx(final, rel=1e-6)
    assert curve.damping == opt.lm.value  # its (Levenberg–Marquardt) λ at the end


def test_a_contenders_run_does_not_depend_on_the_others() -> None:
    train, val = _task()
    options = dict(steps=5, seed=2, batch_size=16, eval_every=1)
    alone = race(_mlp, nn.CrossEntropyLoss(), train, val, ["kfac"], **options)
    behind = race(_mlp, nn.CrossEntropyLoss(), train, val, ["sgd", "ekfac", "kfac"], **options)
    # kfac samples Monte-Carlo labels: the same stream either way
    assert behind.curve("kfac").train_loss == alone.curve("kfac").train_loss


def _hand_loop(opt_fn, steps: int = 3) -> float:
    train, _ = _task()
    torch.manual_seed(0)
    model = _mlp()
    opt = opt_fn(model.parameters())
    for _ in range(steps):  # batch = the whole training set
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(train[0]), train[1]).backward()
        opt.step()
    return float(nn.CrossEntropyLoss()(model(train[0]), train[1]).detach())


@pytest.mark.parametrize(
    ("name", "lr", "label", "opt_fn"),
    [
        ("adamw", 0.01, "AdamW", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01)),
        (
            "nadamw",
            0.01,
            "NAdamW",
            lambda p: torch.optim.NAdam(p, lr=0.01, weight_decay=0.01, decoupled_weight_decay=True),
        ),
        # a class by import path; lr=None: the class's own default (RMSprop's 0.01)
        ("torch.optim:RMSprop", None, "RMSprop", lambda p: torch.optim.RMSprop(p, lr=0.01)),
    ],
)
def test_first_order_contenders_are_the_torch_optimizers(name, lr, label, opt_fn) -> None:
    train, val = _task()
    c = contender(name, lr)
    assert c.name == label and c.curvature is None and c.lr == 0.01
    result = race(_mlp, nn.CrossEntropyLoss(), train, val, [c], steps=3, batch_size=72,
                  eval_every=3)  # fmt: skip
    assert result.curves[0].train_loss[-1] == pytest.approx(_hand_loop(opt_fn), rel=1e-5)
    assert result.curves[0].optimizer == name


def test_an_optimizer_that_needs_a_closure_gets_one() -> None:
    train, val = _task()
    result = race(
        _mlp, nn.CrossEntropyLoss(), train, val, [contender("torch.optim:LBFGS", 0.5)],
        steps=3, batch_size=72, eval_every=1,
    )  # fmt: skip
    (curve,) = result.curves
    assert curve.name == "LBFGS" and curve.diverged_at is None
    assert curve.train_loss[-1] < curve.train_loss[0]


def test_eigenbasis_adam_in_the_race_matches_a_hand_written_loop() -> None:
    """``eig_adam`` is :class:`curvlab.EigenbasisAdam` at the contender's lr with weight
    decay ``WEIGHT_DECAY``, stepping on the race's batches (the same order)."""
    from curvlab import EigenbasisAdam
    from curvlab.ablation.races import WEIGHT_DECAY

    train, val = _task()
    c = contender("eig-adam", None)
    assert (c.name, c.optimizer, c.lr) == ("EigenbasisAdam", "eig_adam", 3e-3)  # its default
    c = contender("eig-adam", 0.01)
    result = race(
        _mlp, nn.CrossEntropyLoss(), train, val, [c], steps=4, seed=0, batch_size=16,
        eval_every=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = EigenbasisAdam(model, loss_fn, lr=0.01, weight_decay=WEIGHT_DECAY)
    torch.manual_seed(0)  # the race reseeds before each contender's run (Monte-Carlo labels)
    for idx in _batch_order(len(train[0]), 16, 4, seed=0):
        opt.zero_grad()
        opt.backward(loss_fn(model(train[0][idx]), train[1][idx]))
        opt.step()
    with torch.no_grad():
        loss = float(loss_fn(model(train[0]), train[1]))
    assert result.curves[0].train_loss[-1] == pytest.approx(loss, rel=1e-6)
    assert result.curves[0].train_loss[-1] < result.curves[0].train_loss[0]
