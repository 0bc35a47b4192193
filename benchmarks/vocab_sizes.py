"""Vocabulary-sized output layers: the structured output factor against dense K-FAC.

* ``Linear(64, 50257)`` + cross-entropy on 256 rows: ``KFAC`` (MC, the default) with the
  structured output factor (``output_factor="auto"`` picks it): update + first solve time
  and the bytes of the curvature (state and decompositions, ``memory_estimate()``).
* ``Linear(64, 4096)`` + cross-entropy, batches of 256 rows: the structured layer's
  natural gradient (the last batch's mean gradient, solved with relative damping
  ``λ = ρ · λ_max(G) λ_max(A)``) against dense K-FAC's of the exact type, after 1 and after
  8 batches, and the relative Frobenius error of both against the exact layer block
  ``Σ_n w (diag(p_n) − p_n p_nᵀ) ⊗ ā_n ā_nᵀ`` (computed without forming it).
  The structured factor of the logits layer is the same under ``"mc"`` and ``"exact"``
  (the expectation over the labels); dense K-FAC's exact ``G = Σ_n w (diag(p_n) −
  p_n p_nᵀ)`` is built here in float64 (the hooks engine's exact columns would take
  ``V × N × V`` floats).

Pinned to one thread. Usage: ``taskset -c 0 python -m benchmarks.vocab_sizes`` (about a minute).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

import curvlab
from benchmarks.common import machine

torch.set_num_threads(1)
WIDTH, ROWS = 64, 256


def _head(vocab: int) -> nn.Module:
    torch.manual_seed(0)
    head = nn.Linear(WIDTH, vocab)
    nn.init.normal_(head.weight, std=0.5)  # peaked predictions: logits of std ≈ 4
    return head


def _batch(vocab: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    return torch.randn(ROWS, WIDTH, generator=gen), torch.randint(0, vocab, (ROWS,), generator=gen)


def large_vocabulary(vocab: int = 50257) -> None:
    head = _head(vocab)
    x, y = _batch(vocab, torch.Generator().manual_seed(1))
    kfac = curvlab.KFAC(head, nn.CrossEntropyLoss())
    start = time.perf_counter()
    kfac.update(x, y)
    kfac.solve([p.grad if p.grad is not None else torch.ones_like(p) for p in kfac.params], 1e-3)
    elapsed = time.perf_counter() - start
    est = kfac.memory_estimate()
    print(
        f"Linear({WIDTH}, {vocab}) + CE, {ROWS} rows, KFAC mc, structured G (rank "
        f"{kfac.output_rank}): update + first solve {elapsed:.2f} s; curvature "
        f"{est.factors / 2**20:.1f} MiB state + {est.inverses / 2**20:.1f} MiB decompositions "
        f"(a dense G would take {4 * vocab**2 / 2**30:.1f} GiB, its eigenvectors as much)"
    )


def _dense_exact_g(logits: Tensor) -> Tensor:
    p = logits.double().softmax(dim=1)
    return (torch.diag(p.sum(0)) - p.T @ p) / p.shape[0]


def _frobenius_error(ps: list[Tensor], abars: list[Tensor], G: object, A: Tensor) -> float:
    """``‖B − G ⊗ A‖_F / ‖B‖_F`` for ``B = (1/b) Σ_batches Σ_n (1/N) H_n ⊗ ā_n ā_nᵀ``,
    ``H_n = diag(p_n) − p_n p_nᵀ``, by inner products (never ``[V·D, V·D]``)."""
    P, Ab = torch.cat(ps), torch.cat(abars)  # [R, V], [R, D]
    w = 1.0 / (ROWS * len(ps))
    pp = P @ P.T
    p2 = P @ P.square().T  # [n, m]: Σ_v p_nv p_mv²
    tr_hh = pp - p2 - p2.T + pp.square()
    norm_b2 = w * w * float((tr_hh * (Ab @ Ab.T).square()).sum())
    if isinstance(G, curvlab.linalg.DiagonalPlusLowRank):
        G = G.to(torch.float64)
        g_diag, gp, g_norm = G.diagonal(), G.matmul(P.T).T, float(G.frobenius_norm())
    else:
        g_diag, gp, g_norm = torch.diagonal(G), P @ G, float(torch.linalg.matrix_norm(G))
    tr_hg = P @ g_diag - (gp * P).sum(1)
    inner = w * float((tr_hg * ((Ab @ A) * Ab).sum(1)).sum())
    k2 = g_norm**2 * float(torch.linalg.matrix_norm(A)) ** 2
    return max(norm_b2 - 2 * inner + k2, 0.0) ** 0.5 / norm_b2**0.5


def cosine_against_dense(vocab: int = 4096, batches: int = 8) -> None:
    head = _head(vocab).double()
    gen = torch.Generator().manual_seed(2)
    kfac = curvlab.KFAC(head, nn.CrossEntropyLoss(), output_factor="structured")
    g_dense = torch.zeros(vocab, vocab, dtype=torch.float64)
    ps, abars = [], []
    for b in range(1, batches + 1):
        x, y = _batch(vocab, gen)
        x = x.double()
        start = time.perf_counter()
        kfac.update(x, y)
        update = time.perf_counter() - start
        with torch.no_grad():
            logits = head(x)
        g_dense += _dense_exact_g(logits)
        ps.append(logits.softmax(dim=1))
        abars.append(torch.cat([x, torch.ones(ROWS, 1, dtype=x.dtype)], dim=1))
        if b not in (1, batches):
            continue
        f = kfac.factors()[0]
        G = g_dense / b
        assert torch.allclose(f.G.diagonal(), torch.diagonal(G), rtol=1e-8, atol=1e-14)
        loss = nn.functional.cross_entropy(head(x), y)
        grad, grad_b = (t.detach() for t in torch.autograd.grad(loss, [head.weight, head.bias]))
        mat = torch.cat([grad, grad_b[:, None]], dim=1)  # [V, D+1]
        d_g, q_g = torch.linalg.eigh(G)
        d_a, q_a = torch.linalg.eigh(f.A)
        cells = []
        for rho in (1e-4, 1e-3, 1e-2):
            lam = rho * float(d_g.max() * d_a.max())
            dense = q_g @ ((q_g.T @ mat @ q_a) / (d_g[:, None] * d_a[None, :] + lam)) @ q_a.T
            start = time.perf_counter()
            w, bias = kfac.solve([grad, grad_b], lam)
            solve = time.perf_counter() - start
            ours = torch.cat([w, bias[:, None]], dim=1).detach()
            cos = float((ours * dense).sum() / ours.norm() / dense.norm())
            cells.append(f"ρ={rho:g}: cos {cos:.4f} ({solve:.2f} s)")
        err_s = _frobenius_error(ps, abars, f.G, f.A)
        err_d = _frobenius_error(ps, abars, G, f.A)
        print(
            f"V={vocab}, after {b} batch(es) (update {update:.2f} s): "
            + "; ".join(cells)
            + f"; Frobenius error vs the exact block: structured {err_s:.4f}, dense K-FAC "
            f"{err_d:.4f} (difference {err_s - err_d:+.4f})"
        )


def main() -> None:
    print(machine())
    large_vocabulary()
    cosine_against_dense()


if __name__ == "__main__":
    main()
