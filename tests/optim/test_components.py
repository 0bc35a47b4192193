"""The pieces of ``NaturalGradient``, each on its own (curvlab.optim.components, .damping)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.optim.components import (
    InversionSchedule,
    KLClip,
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
    clip = KLClip(bound=1.0, lr=0.1)  # lr²·25 = 0.25 < 1: unchanged
    torch.testing.assert_close(clip(natural, grads)[0], natural[0])
    tight = KLClip(bound=0.01, lr=0.1)  # ν = sqrt(0.01 / 0.25) = 0.2
    torch.testing.assert_close(tight(natural, grads)[0], 0.2 * natural[0])
    with pytest.raises(ValueError, match="kl_clip"):
        KLClip(bound=0.0)


def test_damping_policies() -> None:
    assert Damping(0.1).at(7) == 0.1
    assert Damping(lambda step: 1.0 / (step + 1)).at(3) == 0.25
    with pytest.raises(ValueError, match="damping"):
        Damping(lambda step: math.nan).at(0)
    with pytest.raises(TypeError, match="damping"):
        Damping("0.1")  # type: ignore[arg-type]
    lm = Damping(LevenbergMarquardt(initial=1.0, interval=2))
    assert lm.adaptation_due(0) and not lm.adaptation_due(1) and not Damping(0.1).adaptation_due(0)
    lm.adapt(0.9)  # a good model: λ shrinks
    assert lm.at(0) < 1.0
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
