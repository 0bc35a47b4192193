"""Diagonal input factors (``nn.Embedding`` under expand) stay vectors in ``KFAC``.

Reference: the same backend with the factor kept as the dense ``[V, V]`` matrix (the
layout before), and ``kron(G, diag(A))`` built by hand from an independent one-hot count.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.curvature.kronecker.factored import KroneckerFactored

DTYPE = torch.float64
VOCAB, WIDTH, TOKENS = 11, 3, 5


class _DenseKFAC(curvlab.KFAC):
    """The dense-factor layout: the reference the vector layout must reproduce."""

    _diagonal_factors = False


def _model(padding_idx: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(VOCAB, WIDTH, padding_idx=padding_idx),
        nn.Flatten(),
        nn.Linear(WIDTH * TOKENS, 4),
    ).to(DTYPE)


def _data(n: int = 6) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (n, TOKENS), generator=gen)
    return x, torch.randint(0, 4, (n,), generator=gen)


def _pair(damping_mode: str, padding_idx: int | None = None) -> tuple[curvlab.KFAC, ...]:
    model = _model(padding_idx)
    x, y = _data()
    out = []
    for cls in (curvlab.KFAC, _DenseKFAC):
        k = cls(model, nn.CrossEntropyLoss(), fisher_type="exact", damping_mode=damping_mode)
        k.update(x, y)
        out.append(k)
    return tuple(out)


def _flat(v: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in v])


def _vector(k: curvlab.KFAC) -> list[Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(p.shape, generator=gen, dtype=DTYPE) for p in k.params]


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embedding_factor_is_the_token_frequencies(padding_idx: int | None) -> None:
    kfac, _ = _pair("exact", padding_idx)
    x, _ = _data()
    counts = torch.zeros(VOCAB, dtype=DTYPE)
    for token in x.reshape(-1).tolist():
        if token != padding_idx:
            counts[token] += 1
    a = kfac.factors()[0].A
    assert a.shape == (VOCAB,)
    torch.testing.assert_close(a, counts / x.numel(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("damping_mode", ["exact", "factored"])
def test_vector_layout_matches_dense_layout(damping_mode: str) -> None:
    diag, dense = _pair(damping_mode, padding_idx=3)
    assert dense.factors()[0].A.shape == (VOCAB, VOCAB)
    v = _vector(diag)
    torch.testing.assert_close(_flat(diag.matvec(v)), _flat(dense.matvec(v)), rtol=1e-10, atol=0)
    torch.testing.assert_close(
        _flat(diag.solve(v, 0.1)), _flat(dense.solve(v, 0.1)), rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(diag.to_dense(), dense.to_dense(), rtol=1e-12, atol=0)
    for name in ("trace", "diagonal", "frobenius_norm", "eigenvalues"):
        torch.testing.assert_close(
            getattr(diag, name)(), getattr(dense, name)(), rtol=1e-9, atol=1e-12
        )
    torch.testing.assert_close(diag.logdet(0.1), dense.logdet(0.1), rtol=1e-10, atol=0)


def test_solve_matches_hand_built_block() -> None:
    kfac, _ = _pair("exact")
    f = kfac.factors()[0]
    n_emb = VOCAB * WIDTH
    block = torch.kron(f.G, torch.diag(f.A))  # rows: the [D, V] matrix = weightᵀ
    v = _vector(kfac)
    mat = v[0].T.reshape(-1)
    expected = torch.linalg.solve(block + 0.3 * torch.eye(n_emb, dtype=DTYPE), mat)
    got = kfac.solve(v, 0.3)[0]
    torch.testing.assert_close(got.T.reshape(-1), expected, rtol=1e-9, atol=1e-12)


def test_singular_diagonal_factor_refuses_zero_damping() -> None:
    kfac, _ = _pair("exact", padding_idx=3)  # the padding token's entry is zero
    with pytest.raises(curvlab.linalg.LinAlgError, match=r"layer '0' \(Embedding\).*singular"):
        kfac.solve(_vector(kfac), 0.0)


def test_state_and_sums_keep_the_vector() -> None:
    diag, dense = _pair("exact")
    state = diag.state_dict()
    a_sums = [t for t in _tensors(state) if t.ndim == 1 and t.shape[0] == VOCAB]
    assert a_sums, "the embedding's A is saved as a vector"
    assert all(t.shape != (VOCAB, VOCAB) for t in _tensors(state))
    sums = KroneckerFactored._sums(diag)
    assert sums[0].tensor.shape == (VOCAB,) and sums[0].structure == "general"
    v = _vector(diag)
    # a state saved with the dense [V, V] factor (older checkpoints) loads into the vector
    restored = curvlab.KFAC(diag.model, nn.CrossEntropyLoss(), fisher_type="exact")
    restored.load_state_dict({**dense.state_dict(), "backend": "KFAC"})
    assert restored.factors()[0].A.shape == (VOCAB,)
    torch.testing.assert_close(
        _flat(restored.solve(v, 0.1)), _flat(diag.solve(v, 0.1)), rtol=1e-10, atol=0
    )
    # and the vector state loads into a backend that keeps dense factors
    dense_again = _DenseKFAC(diag.model, nn.CrossEntropyLoss(), fisher_type="exact")
    dense_again.load_state_dict({**state, "backend": "_DenseKFAC"})
    torch.testing.assert_close(dense_again.to_dense(), dense.to_dense(), rtol=1e-12, atol=0)


def test_ekfac_keeps_a_dense_factor() -> None:
    model = _model()
    x, y = _data()
    ekfac = curvlab.EKFAC(model, nn.CrossEntropyLoss(), fisher_type="exact")
    ekfac.update(x, y)
    assert ekfac.factors()[0].A.shape == (VOCAB, VOCAB)


def _tensors(obj: object) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_large_vocabulary_embedding_is_cheap() -> None:
    """The issue's goal: ``Embedding(32768, 64)`` update + first solve ≤ 2 s, state ≤ 64 MiB."""
    torch.manual_seed(0)
    emb = nn.Embedding(32768, 64)
    model = nn.Sequential(emb, nn.Linear(64, 16), nn.Flatten(0, 1))  # [N·T, C]
    x = torch.randint(0, 32768, (32, 16))
    y = torch.randint(0, 16, (32 * 16,))
    kfac = curvlab.KFAC(model, nn.CrossEntropyLoss(), layers=[emb])
    start = time.perf_counter()
    kfac.update(x, y)
    kfac.solve([torch.ones_like(emb.weight)], 1e-3)
    elapsed = time.perf_counter() - start
    state_bytes = sum(t.numel() * t.element_size() for t in _tensors(kfac.state_dict()))
    assert state_bytes <= 64 * 2**20
    assert elapsed <= 10.0  # 2 s on a quiet machine; loose here for shared CI cores
