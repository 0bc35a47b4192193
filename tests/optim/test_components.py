"""The pieces of ``NaturalGradient``, each on its own (curvlab.optim.components, .damping)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab import linalg
from curvlab.optim.components import (
    InversionSchedule,
    KLClip,
    LearningRate,
    MovingAverage,
    missing_gradient,
    non_finite_gradient,
    same_structure,
)
from curvlab.optim.damping import Damping, LevenbergMarquardt


def _stats(value: float, n: int = 2) -> dict[str, list[torch.Tensor]]:
    return {"A": [torch.full((n, n), value, dtype=torch.float64)], "G": [torch.ones(1) * value]}


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.floats(-10, 10), min_size=1, max_size=8),
    decay=st.floats(0.0, 0.99),
)
def test_the_moving_average_is_a_plain_then_an_exponential_average(values, decay) -> None:
    average = MovingAverage(decay)
    expected = 0.0
    for u, value in enumerate(values, start=1):
        assert average.update(_stats(value)) is False
        eps = min(1.0 - 1.0 / u, decay)
        expected = eps * expected + (1 - eps) * value
    assert average.num_updates == len(values)
    torch.testing.assert_close(
        average.value["A"][0], torch.full((2, 2), expected, dtype=torch.float64)
    )


def test_the_moving_average_restarts_on_a_new_structure() -> None:
    average = MovingAverage(0.9)
    average.update(_stats(1.0))
    assert average.update(_stats(5.0, n=3)) is True  # e.g. EKFAC's basis changed
    torch.testing.assert_close(average.value["A"][0], torch.full((3, 3), 5.0, dtype=torch.float64))
    assert not same_structure({"basis_id": 1, "S": []}, {"basis_id": 2, "S": []})


def _truncated(low: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` eigenpairs of largest magnitude of a symmetric ``low`` (float64 eigh) and
    the diagonal of the others: what recompressing a low-rank part to ``rank`` keeps and
    moves into ``d``."""
    e, v = torch.linalg.eigh(low)
    order = torch.argsort(e.abs(), descending=True)
    kept = v[:, order[:rank]] @ torch.diag(e[order[:rank]]) @ v[:, order[:rank]].T
    return kept, torch.diagonal(low - kept)


@pytest.mark.parametrize(("columns", "rank"), [(2, 6), (3, 4)])
def test_the_moving_average_mixes_a_structured_factor_as_a_matrix(columns, rank) -> None:
    """``ε·avg + (1 − ε)·batch`` of ``D + U S Uᵀ`` matrices whose ``U`` are different bases:
    the matrices mix (not the factors), recompressed to the rank — exact while the ranks
    fit (2 + 2 ≤ 6), else the best rank-``r`` low-rank part, diagonal exact."""
    n, decay = 7, 0.6
    gen = torch.Generator().manual_seed(0)
    average = MovingAverage(decay)
    d_ref, low_ref = torch.zeros(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    zeros = (torch.zeros(n, rank, dtype=torch.float64), torch.zeros(rank, dtype=torch.float64))
    for u in range(1, 4):
        d = torch.rand(n, generator=gen, dtype=torch.float64)
        cols = torch.randn(n, columns, generator=gen, dtype=torch.float64)
        batch = linalg.low_rank_update(linalg.DiagonalPlusLowRank(d, *zeros), cols, -0.5, rank)
        eps = min(1.0 - 1.0 / u, decay)
        low = eps * low_ref + (1 - eps) * (batch.U * batch.s) @ batch.U.T
        low_ref, moved = _truncated(low, rank)
        d_ref = eps * d_ref + (1 - eps) * batch.d + moved
        average.update({"G": [batch]})
        got = average.value["G"][0]
        assert isinstance(got, linalg.DiagonalPlusLowRank) and got.U.shape == (n, rank)
        torch.testing.assert_close(got.d, d_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close((got.U * got.s) @ got.U.T, low_ref, rtol=1e-10, atol=1e-12)
        if 2 * columns <= rank:  # nothing dropped: the exact mix
            assert float(moved.abs().max()) < 1e-12


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_the_moving_average_refuses_a_bad_decay(decay) -> None:
    with pytest.raises(ValueError, match="decay"):
        MovingAverage(decay)


def test_the_inversion_schedule() -> None:
    schedule = InversionSchedule(update_every=2, invert_every=3)
    assert [schedule.statistics_due(k) for k in range(5)] == [True, False, True, False, True]
    assert [schedule.inversion_due(k) for k in range(5)] == [True, False, False, True, False]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="update_every"):
            InversionSchedule(update_every=bad)  # type: ignore[arg-type]


def test_kl_clipping_bounds_the_step_and_never_grows_it() -> None:
    natural = [torch.tensor([3.0, 4.0])]
    grads = [torch.tensor([3.0, 4.0])]  # ⟨ĝ, g⟩ = 25
    clip = KLClip(bound=1.0)  # lr²·25 = 0.25 < 1: unchanged
    torch.testing.assert_close(clip(natural, grads, [0.1])[0], natural[0])
    tight = KLClip(bound=0.01)  # ν = sqrt(0.01 / 0.25) = 0.2
    torch.testing.assert_close(tight(natural, grads, [0.1])[0], 0.2 * natural[0])
    scheduled = KLClip(bound=lambda step: 0.01 * (step + 1))  # a callable of the step
    torch.testing.assert_close(
        scheduled(natural, grads, [0.1], step=3)[0], (0.04 / 0.25) ** 0.5 * natural[0]
    )
    # per-parameter rates: Σ lrᵢ² ⟨ĝᵢ, gᵢ⟩ = 0.01·25 + 0.04·25 = 1.25
    two = [natural[0], natural[0]]
    torch.testing.assert_close(
        KLClip(bound=0.05)(two, [grads[0], grads[0]], [0.1, 0.2])[1], 0.2 * natural[0]
    )
    for bad in (0.0, float("nan"), -1.0):
        with pytest.raises(ValueError, match="kl_clip"):
            KLClip(bound=bad)
    with pytest.raises(ValueError, match="kl_clip"):
        scheduled_bad = KLClip(bound=lambda step: 0.0)
        scheduled_bad(natural, grads, [0.1])


def test_learning_rate_is_read_from_the_optimizer_at_every_step() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    rate = LearningRate([a, b], ["a", "b"], optimizer=opt)
    assert rate.known and rate.per_parameter(0) == [0.1, 0.2]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    scheduler.step()
    assert rate.per_parameter(1) == [0.05, 0.1]
    assert LearningRate([a, b], ["a", "b"], lr=lambda k: 1.0 / (k + 1)).per_parameter(3) == [
        0.25,
        0.25,
    ]
    assert not LearningRate([a], ["a"]).known
    with pytest.raises(ValueError, match=r"does not update \['b'\]"):
        LearningRate([a, b], ["a", "b"], optimizer=torch.optim.SGD([a], lr=0.1))
    with pytest.raises(ValueError, match="lr must be finite"):
        LearningRate([a], ["a"], lr=float("inf"))
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        LearningRate([a], ["a"], optimizer="sgd")  # type: ignore[arg-type]


def test_damping_policies() -> None:
    assert Damping(0.1).at(7) == 0.1
    assert Damping(lambda step: 1.0 / (step + 1)).at(3) == 0.25
    with pytest.raises(ValueError, match="damping"):
        Damping(lambda step: math.nan).at(0)
    with pytest.raises(TypeError, match="damping"):
        Damping("0.1")  # type: ignore[arg-type]
    lm = Damping(LevenbergMarquardt(initial=1.0, interval=2))
    assert lm.adaptation_due(0) and not lm.adaptation_due(1) and not Damping(0.1).adaptation_due(0)
    assert lm.observe(1.0, 0.1, -1.0) == pytest.approx(0.9)  # a good model: λ shrinks
    assert lm.at(0) < 1.0
    with pytest.raises(TypeError, match="only a LevenbergMarquardt damping adapts"):
        Damping(0.1).observe(1.0, 0.1, -1.0)
    state = lm.state_dict()
    other = Damping(LevenbergMarquardt(initial=1.0, interval=2))
    other.load_state_dict(state)
    assert other.at(0) == lm.at(0) and Damping(0.1).state_dict() is None


def test_gradient_problems_name_the_parameters() -> None:
    assert missing_gradient("0.weight") == (
        "parameter '0.weight' has no gradient; call precond.backward(loss) before step()."
    )
    names = [f"layer{i}.weight" for i in range(7)]
    message = non_finite_gradient(names)
    assert message.startswith(f"the gradient is not finite in {names[:5]} …;")
    assert "layer5" not in message
    assert "…" not in non_finite_gradient(names[:2])


def _damping_sites() -> dict[str, object]:
    """Every place a damping value is checked: each builds (or calls) with ``damping``."""
    import curvlab
    from curvlab.ablation.races import Contender

    def model() -> tuple[torch.nn.Module, torch.nn.Module]:
        return torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.nn.CrossEntropyLoss()

    def solve(damping: object) -> None:
        curvature = curvlab.KFAC(*model())
        curvature.update(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
        curvature.solve([torch.zeros_like(p) for p in curvature.params], damping)  # type: ignore[arg-type]

    return {
        "NaturalGradient": lambda d: curvlab.NaturalGradient(
            curvlab.KFAC(*model()), damping=d, kl_clip=None
        ),
        "NaturalGradient schedule": lambda d: Damping(lambda step: d).at(0),
        "NoisyKFAC": lambda d: curvlab.NoisyKFAC(*model(), dataset_size=10, lr=0.1, damping=d),
        "KFAC.solve": solve,
        "Contender 'kfac'": lambda d: Contender("kfac", damping=d),
    }


@pytest.mark.parametrize(
    ("damping", "error", "wording"),
    [
        (-1.0, ValueError, "damping must be finite and >= 0, got -1.0"),
        (math.nan, ValueError, "damping must be finite and >= 0, got nan"),
        (math.inf, ValueError, "damping must be finite and >= 0, got inf"),
        ("0.1", TypeError, "damping must be a float, got str"),
        (True, TypeError, "damping must be a float, got bool"),
    ],
)
@pytest.mark.parametrize("site", list(_damping_sites()))
def test_one_damping_check_names_the_call_and_the_argument(
    site: str, damping: object, error: type[Exception], wording: str
) -> None:
    """One function (curvlab.linalg.damping.check_damping) checks every damping value: the
    same rule and wording everywhere, prefixed by the call that got it."""
    owner = site.removesuffix(" schedule")
    with pytest.raises(error, match=f"^{owner}: {wording}"):
        _damping_sites()[site](damping)  # type: ignore[operator]
    _damping_sites()[site](0.1)  # type: ignore[operator]  # a valid one passes
