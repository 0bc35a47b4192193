"""Checkpoints written by an earlier curvlab still load and continue identically.

``tests/fixtures/checkpoints_format2.pt`` was written (by ``tests/fixtures/make_checkpoints.py``)
before the preconditioner was split into pieces and the Kronecker backends into their own
classes; it is never regenerated. Each record holds a model, a ``NaturalGradient`` state
after three steps and the natural gradient of the fourth step.
"""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.make_checkpoints import CONFIGS, PATH, build, train_step

RECORDS = torch.load(PATH, weights_only=True)


@pytest.mark.parametrize("label", [c[0] for c in CONFIGS])
def test_an_old_checkpoint_continues_identically(label: str) -> None:
    record = RECORDS[label]
    model, loss_fn, precond, batches = build(label)
    model.load_state_dict(record["model"])
    precond.load_state_dict(record["precond"])
    torch.manual_seed(1)
    natural = train_step(model, loss_fn, precond, *batches[3])
    for got, expected in zip(natural, record["next"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
