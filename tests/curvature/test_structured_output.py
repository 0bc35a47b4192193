"""The structured output factor ``G = diag(d) + U S Uᵀ`` of vocabulary-sized layers.

References: the same ``KFAC`` with a dense ``G`` (at full rank the two are the same
operator), the softmax identity ``Σ g gᵀ = diag(Σ p) − PᵀP`` checked in float64, and
``linalg.DiagonalPlusLowRank`` against its dense matrix.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import curvlab
from curvlab import linalg
from curvlab.curvature.kronecker.factored import (
    STRUCTURED_OUTPUT_THRESHOLD,
    TIED_KRONECKER_SUM,
    TIED_STRUCTURED_DIAGONAL,
)

DTYPE = torch.float64
VOCAB = 12


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, VOCAB)).to(DTYPE)


def _data(n: int = 7, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=DTYPE), torch.randint(
        0, VOCAB, (n,), generator=gen
    )


def _flat(v: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in v])


def _pair(fisher_type: str, damping_mode: str, rank: int = VOCAB) -> tuple[curvlab.KFAC, ...]:
    model = _model()
    x, y = _data()
    out = []
    for mode in ("dense", "structured"):
        torch.manual_seed(3)  # the same MC draws
        k = curvlab.KFAC(
            model,
            nn.CrossEntropyLoss(),
            fisher_type=fisher_type,
            damping_mode=damping_mode,
            output_factor={"2": mode},
            output_rank=rank,
        )
        k.update(x, y)
        k.update(x[:3], y[:3])
        out.append(k)
    return tuple(out)


@pytest.mark.parametrize("damping_mode", ["exact", "factored"])
@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_full_rank_structure_is_dense_kfac(fisher_type: str, damping_mode: str) -> None:
    dense, structured = _pair(fisher_type, damping_mode)
    assert isinstance(structured.factors()[1].G, linalg.DiagonalPlusLowRank)
    gen = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, generator=gen, dtype=DTYPE) for p in dense.params]
    for damping in (0.1, 1e-3):
        torch.testing.assert_close(
            _flat(structured.solve(v, damping)),
            _flat(dense.solve(v, damping)),
            rtol=1e-8,
            atol=1e-10,
        )
    torch.testing.assert_close(
        _flat(structured.matvec(v)), _flat(dense.matvec(v)), rtol=1e-10, atol=1e-14
    )
    torch.testing.assert_close(structured.to_dense(), dense.to_dense(), rtol=1e-10, atol=1e-14)
    for name in ("trace", "diagonal", "frobenius_norm"):
        torch.testing.assert_close(
            getattr(structured, name)(), getattr(dense, name)(), rtol=1e-10, atol=1e-14
        )


def test_mc_structure_is_the_expected_factor() -> None:
    """Under ``"mc"`` the structured factor of the logits layer is the expectation over the
    sampled labels, which is the exact type's factor."""
    _, structured = _pair("mc", "exact")
    exact, _ = _pair("exact", "exact")
    torch.testing.assert_close(
        structured.factors()[1].G.to_dense(), exact.factors()[1].G, rtol=1e-10, atol=1e-14
    )


def test_low_rank_keeps_the_diagonal_and_stays_close() -> None:
    dense, structured = _pair("exact", "exact", rank=3)
    g_dense, g_low = dense.factors()[1].G, structured.factors()[1].G
    assert g_low.U.shape == (VOCAB, 3)
    torch.testing.assert_close(g_low.diagonal(), torch.diagonal(g_dense), rtol=1e-10, atol=1e-14)
    error = torch.linalg.matrix_norm(g_low.to_dense() - g_dense) / torch.linalg.matrix_norm(g_dense)
    assert float(error) < 0.3


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 9),
    batches=st.lists(
        st.tuples(st.integers(1, 6), st.sampled_from([1.0, -0.3, 0.5])), min_size=1, max_size=4
    ),
    rank=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_low_rank_update_identities(
    n: int, batches: list[tuple[int, float]], rank: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    M, dense = None, torch.zeros(n, n, dtype=DTYPE)
    for k, w in batches:
        cols = torch.randn(n, k, generator=gen, dtype=DTYPE)
        M = linalg.low_rank_update(M, cols, w, rank)
        dense += w * cols @ cols.T
    assert M is not None and M.U.shape == (n, rank)
    torch.testing.assert_close(M.diagonal(), torch.diagonal(dense), rtol=1e-9, atol=1e-10)
    if sum(k for k, _ in batches) <= rank:  # nothing discarded
        torch.testing.assert_close(M.to_dense(), dense, rtol=1e-9, atol=1e-10)
    full = M.to_dense()
    torch.testing.assert_close(
        M.frobenius_norm(), torch.linalg.matrix_norm(full), rtol=1e-9, atol=1e-10
    )
    B = torch.randn(n, 3, generator=gen, dtype=DTYPE)
    torch.testing.assert_close(M.matmul(B), full @ B, rtol=1e-9, atol=1e-10)
    shift = float(torch.linalg.eigvalsh(full).min().abs()) + 0.5 + float(M.d.abs().max())
    shifts = torch.tensor([shift, 2 * shift, 3 * shift], dtype=DTYPE)
    got = M.shifted_solve(B, shifts)
    for j in range(3):
        expected = torch.linalg.solve(full + shifts[j] * torch.eye(n, dtype=DTYPE), B[:, j])
        torch.testing.assert_close(got[:, j], expected, rtol=1e-7, atol=1e-9)


def test_softmax_identity() -> None:
    """The exact columns' outer products sum to ``diag(Σ p) − PᵀP`` (per row and scale)."""
    from curvlab.extraction.fisher_types import FisherType
    from curvlab.extraction.losses import batch_scale, softmax_output_factor

    logits = torch.randn(5, VOCAB, dtype=DTYPE)
    y = torch.randint(0, VOCAB, (5,))
    scale = batch_scale(nn.CrossEntropyLoss(), logits, y)
    cols = FisherType.EXACT.columns(nn.CrossEntropyLoss(), logits, y, scale)  # [C, N, C]
    flat = cols.reshape(-1, VOCAB)
    d, p = softmax_output_factor(logits, scale)
    torch.testing.assert_close(torch.diag(d) - p @ p.T, flat.T @ flat, rtol=1e-10, atol=1e-14)


def test_auto_picks_structured_above_the_threshold() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, STRUCTURED_OUTPUT_THRESHOLD))
    kfac = curvlab.KFAC(model, nn.CrossEntropyLoss())
    assert kfac._structured == [False, True]
    layers = kfac.memory_estimate().layers
    r = kfac.output_rank
    head = layers["layer '1' (Linear)"]
    assert head.factors == 4 * (9 * 9 + STRUCTURED_OUTPUT_THRESHOLD * (1 + r) + r)
    dense = curvlab.KFAC(model, nn.CrossEntropyLoss(), output_factor="dense")
    assert dense._structured == [False, False]


def test_memory_estimate_of_a_structured_layer_matches() -> None:
    model = _model()
    x, y = _data()
    for mode in ("exact", "factored"):
        k = curvlab.KFAC(
            model,
            nn.CrossEntropyLoss(),
            output_factor="structured",
            output_rank=4,
            damping_mode=mode,
        )
        k.update(x, y)
        k.solve([torch.ones_like(p) for p in k.params], 0.1)
        est = k.memory_estimate()
        sums = k.state_dict()["statistics"]["sums"]
        held = sum(t.numel() * t.element_size() for t in sums["A"])
        held += sum(sum(t.numel() * t.element_size() for t in g) for g in sums["G"])
        assert held == est.factors
        cache = sum(
            sum(
                t.numel() * t.element_size()
                for t in (c[1] if isinstance(c[1], Tensor) else [*c[1]])
            )
            + c[2].numel() * c[2].element_size()
            for c in k._structured_cache.values()
        )
        assert cache == est.inverses


def test_checkpoint_round_trip() -> None:
    _, structured = _pair("exact", "exact", rank=4)
    state = structured.state_dict()
    again = curvlab.KFAC(
        _model(),
        nn.CrossEntropyLoss(),
        fisher_type="exact",
        output_factor={"2": "structured"},
        output_rank=4,
    )
    again.load_state_dict(state)
    v = [torch.ones_like(p) for p in again.params]
    torch.testing.assert_close(_flat(again.solve(v, 0.1)), _flat(structured.solve(v, 0.1)))
    dense = curvlab.KFAC(
        _model(), nn.CrossEntropyLoss(), fisher_type="exact", output_factor="dense"
    )
    with pytest.raises(ValueError, match=r"layer '2' \(Linear\) keeps a dense output factor"):
        dense.load_state_dict(state)


def test_refusals_name_the_layer() -> None:
    model = _model()
    with pytest.raises(
        ValueError,
        match=r"EKFAC: layer '2' \(Linear\) has output_factor='structured'.*exclude=\['2'\]",
    ):
        curvlab.EKFAC(model, nn.CrossEntropyLoss(), output_factor={"2": "structured"})
    with torch.device("meta"):
        big = nn.Sequential(nn.Linear(4, STRUCTURED_OUTPUT_THRESHOLD))
    with pytest.raises(ValueError, match=r"EKFAC: layer '0' \(Linear\) has 8192 outputs.*'dense'"):
        curvlab.EKFAC(big, nn.CrossEntropyLoss())
    assert curvlab.EKFAC(big, nn.CrossEntropyLoss(), output_factor="dense")._structured == [False]
    with pytest.raises(ValueError, match="unknown output_factor 'low'"):
        curvlab.KFAC(model, nn.CrossEntropyLoss(), output_factor="low")
    _, structured = _pair("exact", "exact")
    with pytest.raises(
        NotImplementedError, match=r"layer '2' \(Linear\) has a structured output factor"
    ):
        structured.logdet(0.1)
    with pytest.raises(curvlab.linalg.LinAlgError, match="damping > 0"):
        structured.solve([torch.ones_like(p) for p in structured.params], 0.0)


def test_tied_head_has_one_diagonal_block() -> None:
    """With ``tied="diagonal"`` a head tied to the embedding is one parameter with one
    diagonal block (O(V·D)); naming it for a structured output factor is refused. With
    ``tied="kronecker"`` a structured output factor leaves the tied weight in a diagonal
    block, and coverage() says why."""
    emb = nn.Embedding(VOCAB, 4)
    head = nn.Linear(4, VOCAB, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(4, 4), head, nn.Flatten(0, 1))
    with pytest.raises(ValueError, match=r"output_factor names module '2'.*tied"):
        curvlab.KFAC(
            model, nn.CrossEntropyLoss(), output_factor={"2": "structured"}, tied="diagonal"
        )
    kfac = curvlab.KFAC(model, nn.CrossEntropyLoss(), tied="diagonal")
    assert kfac.coverage()["0.weight"] == "diagonal"
    joint = curvlab.KFAC(model, nn.CrossEntropyLoss())
    assert joint.coverage()["0.weight"] == TIED_KRONECKER_SUM
    fallback = curvlab.KFAC(model, nn.CrossEntropyLoss(), output_factor={"2": "structured"})
    assert fallback.coverage()["0.weight"] == TIED_STRUCTURED_DIAGONAL
    assert fallback.params == kfac.params
