"""Checkpoint files (curvlab.optim.checkpoint): atomic writes, clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import curvlab
from tests.cases import CASES

MLP_CE = next(c for c in CASES if c.id == "mlp-ce-mean")


def _trained_state() -> dict:
    model, loss_fn = MLP_CE.build()
    precond = curvlab.NaturalGradient(
        curvlab.KFAC(model, loss_fn, fisher_type="exact"), 0.1, kl_clip=None
    )
    x, y = MLP_CE.data(n=8)
    precond.backward(loss_fn(model(x), y))
    precond.step()
    return {"model": model.state_dict(), "precond": precond.state_dict()}


def test_a_checkpoint_round_trips(tmp_path: Path) -> None:
    state = _trained_state()
    curvlab.save_checkpoint(state, tmp_path / "ckpt.pt")
    loaded = curvlab.load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded["precond"]["checksum"] == state["precond"]["checksum"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    curvlab.save_checkpoint({"x": torch.ones(3)}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        curvlab.save_checkpoint({"x": lambda: 0}, path)  # not picklable
    assert torch.equal(curvlab.load_checkpoint(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "pickle"])
def test_an_unreadable_file_names_itself_and_the_cause(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "ckpt.pt"
    curvlab.save_checkpoint(_trained_state(), path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("not a checkpoint")
    else:  # a pickle that weights-only loading refuses (arbitrary objects)
        torch.save({"callback": print}, path)
    with pytest.raises(ValueError, match=rf"{path.name} \(\d+ bytes\) is not a readable torch"):
        curvlab.load_checkpoint(path)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no checkpoint file at .*nothing\.pt"):
        curvlab.load_checkpoint(tmp_path / "nothing.pt")


def test_flipped_bytes_inside_a_tensor_are_caught_by_the_checksum(tmp_path: Path) -> None:
    state = _trained_state()
    path = tmp_path / "ckpt.pt"
    curvlab.save_checkpoint(state, path)
    loaded = curvlab.load_checkpoint(path)
    loaded["precond"]["average"]["A"][0][0, 0] += 1.0  # what a flipped bit does to a value
    model, loss_fn = MLP_CE.build()
    fresh = curvlab.NaturalGradient(
        curvlab.KFAC(model, loss_fn, fisher_type="exact"), 0.1, kl_clip=None
    )
    with pytest.raises(ValueError, match="checksum does not match"):
        fresh.load_state_dict(loaded["precond"])
