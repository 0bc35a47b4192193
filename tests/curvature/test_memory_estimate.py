"""``memory_estimate()``: bytes from shapes equal the bytes the backend then holds, and the
estimate of a model on the ``meta`` device equals that of the same model built for real."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.curvature import LayerMemory, MemoryEstimate

N, TOKENS, VOCAB, CLASSES = 6, 3, 20, 5


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Embedding(VOCAB, 4),
        nn.Flatten(),
        nn.Linear(4 * TOKENS, 7),
        nn.LayerNorm(7),
        nn.Tanh(),
        nn.Linear(7, CLASSES, bias=False),
    )


BACKENDS: dict[str, Callable[[nn.Module], curvlab.Curvature]] = {
    "kfac": lambda m: curvlab.KFAC(m, nn.CrossEntropyLoss()),
    "kfac-factored": lambda m: curvlab.KFAC(m, nn.CrossEntropyLoss(), damping_mode="factored"),
    "kfac-dtypes": lambda m: curvlab.KFAC(
        m, nn.CrossEntropyLoss(), factor_dtype=torch.float64, inverse_dtype=torch.float16
    ),
    "kfac-reduce": lambda m: curvlab.KFAC(m, nn.CrossEntropyLoss(), kfac_approx="reduce"),
    "ekfac": lambda m: curvlab.EKFAC(m, nn.CrossEntropyLoss()),
    "diagonal": lambda m: curvlab.DiagonalFisher(m, nn.CrossEntropyLoss()),
}


def _bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_bytes(v) for v in obj)
    return 0


def _decompositions(c: curvlab.Curvature) -> int:
    """Bytes of what the backend keeps for its solves (read from its private caches)."""
    if isinstance(c, curvlab.EKFAC):
        return _bytes(c._basis)
    if isinstance(c, curvlab.KFAC):
        return _bytes(c._eigen) + _bytes(c._inverses[1] if c._inverses else None)
    return 0


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_estimate_matches_the_state(backend: str) -> None:
    torch.manual_seed(0)
    c = BACKENDS[backend](_model())
    estimate = c.memory_estimate()
    c.update(torch.randint(0, VOCAB, (N, TOKENS)), torch.randint(0, CLASSES, (N,)))
    c.solve([torch.ones_like(p) for p in c.params], 0.1)
    state = _bytes(c.state_dict())
    if isinstance(c, curvlab.EKFAC):  # its state carries the eigenbasis too
        assert state == estimate.total
    else:
        assert state == estimate.factors
    assert _decompositions(c) == estimate.inverses
    assert estimate.total == estimate.factors + estimate.inverses


def test_per_layer_bytes_of_kfac() -> None:
    c = curvlab.KFAC(_model(), nn.CrossEntropyLoss())
    c.update(torch.randint(0, VOCAB, (N, TOKENS)), torch.randint(0, CLASSES, (N,)))
    c.solve([torch.ones_like(p) for p in c.params], 0.1)
    layers = c.memory_estimate().layers
    assert c._a_sum is not None and c._g_sum is not None and c._eigen is not None
    for k in range(len(c.layers)):
        expected = LayerMemory(_bytes([c._a_sum[k], c._g_sum[k]]), _bytes(c._eigen[k]))
        assert layers[c._layer_label(k)] == expected
    assert layers["diagonal of '3.weight'"] == LayerMemory(7 * 4, 0)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_meta_model_gives_the_same_estimate(backend: str) -> None:
    with torch.device("meta"):
        meta = BACKENDS[backend](_model()).memory_estimate()
    real = BACKENDS[backend](_model()).memory_estimate()
    assert meta == real
    assert isinstance(meta, MemoryEstimate) and meta.total > 0
    assert "layer '0' (Embedding)" in meta.table() or backend == "diagonal"


def test_backend_without_estimate_says_which_have_one() -> None:
    c = curvlab.ExactFisher(_model(), nn.CrossEntropyLoss())
    with pytest.raises(NotImplementedError, match=r"ExactFisher.*KFAC, KFC, EKFAC"):
        c.memory_estimate()
