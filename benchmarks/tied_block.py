"""How close K-FAC's block of a tied embedding/head weight is to the exact Fisher's.

Two tiny character models, float64, the embedding tied to the output head (width 16,
vocabulary 33: the 32 most frequent characters of the optimizer race's corpus, the
standard library's help texts, and one token for the rest), 8 windows of 16 characters
per batch, cross-entropy per token:

* ``mlp``: embedding, ``Linear(16, 16)`` and tanh, the head — each token on its own;
* ``transformer``: the optimizer race's ``CharTransformer`` with one block (attention
  couples the tokens of a window).

For the parameters of the tied weight and the head's bias: the relative Frobenius distance
``‖B − F‖_F / ‖F‖_F`` of ``KFAC(tied="kronecker")``'s block ``G_h ⊗ A_h + D_e ⊗ B_e``, of
that block's head term ``G_h ⊗ A_h`` alone and of ``KFAC(tied="diagonal")``'s block (the
Fisher's diagonal) to the exact Fisher's block ``F`` (``curvlab.ExactFisher``, the dense
GGN), with K-FAC's exact and one-sample Monte-Carlo Fisher types, at GPT-2's
initialisation of the tied weight (normal, std 0.02) and at std 0.3. Usage:
``python -m benchmarks.tied_block [--batches 2]``. Prints a table; never asserts.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from torch import Tensor, nn

import curvlab
from benchmarks.common import machine
from benchmarks.optimizer_race import CharTransformer, corpus

VOCAB, CONTEXT, WIDTH, SEQUENCES = 33, 16, 16, 8
STDS = (0.02, 0.3)
FISHER_TYPES = ("exact", "mc")


class TokenMLP(nn.Module):
    """Each token on its own: embedding, ``Linear`` + tanh, the head; ``[N·T, V]`` logits."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.tok(idx)))).reshape(-1, VOCAB)


def _tokens() -> Tensor:
    text = corpus()
    common = [c for c, _ in Counter(text).most_common(VOCAB - 1)]
    index = {c: i for i, c in enumerate(common)}
    return torch.tensor([index.get(c, VOCAB - 1) for c in text], dtype=torch.long)


def _batch(ids: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - CONTEXT - 1, (SEQUENCES,), generator=g)
    chunk = ids[starts[:, None] + torch.arange(CONTEXT + 1)]
    return chunk[:, :-1], chunk[:, 1:].reshape(-1)


def _model(kind: str, std: float) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        model: nn.Module = TokenMLP().double()
    else:
        model = CharTransformer(VOCAB, CONTEXT, width=WIDTH, heads=2, layers=1).double()
    model.head.weight = model.tok.weight
    with torch.no_grad():
        model.tok.weight.normal_(0.0, std)
    return model


def _block(c: curvlab.Curvature, names: list[str]) -> Tensor:
    dense = c.to_dense()
    idx: list[int] = []
    for name in names:
        i = c.param_names.index(name)
        start = sum(p.numel() for p in c.params[:i])
        idx += range(start, start + c.params[i].numel())
    return dense[idx][:, idx]


def distances(kind: str, std: float, batches: int) -> dict[str, tuple[float, float, float]]:
    """Per Fisher type ``(kronecker sum, its head term, diagonal)`` for one model and scale."""
    model, loss_fn = _model(kind, std), nn.CrossEntropyLoss()
    ids = _tokens()
    exact = curvlab.ExactFisher(model, loss_fn)
    joint = {t: curvlab.KFAC(model, loss_fn, fisher_type=t) for t in FISHER_TYPES}
    diagonal = {
        t: curvlab.KFAC(model, loss_fn, fisher_type=t, tied="diagonal") for t in FISHER_TYPES
    }
    torch.manual_seed(0)
    for b in range(batches):
        backends = [exact, *joint.values(), *diagonal.values()]
        curvlab.extract(model, loss_fn, *_batch(ids, b), backends)
    names = ["tok.weight", "head.bias"]
    target = _block(exact, names)
    norm = torch.linalg.matrix_norm(target)

    def rel(block: Tensor) -> float:
        return float(torch.linalg.matrix_norm(block - target) / norm)

    out = {}
    for t in FISHER_TYPES:
        c = joint[t]
        k = [layer.name for layer in c.layers].index("head")
        f = c.factors()[k]
        perm = curvlab.extraction.layers.parameter_order(c.layers[k].module)
        head = torch.kron(f.G, f.A)[perm][:, perm]
        out[t] = (rel(_block(c, names)), rel(head), rel(_block(diagonal[t], names)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2)
    args = parser.parse_args()
    print(
        f"tied char models: vocab {VOCAB}, width {WIDTH}, context {CONTEXT}, "
        f"{args.batches} batches of {SEQUENCES} windows; {machine()}"
    )
    print("| model | init std | Fisher type | Kronecker sum | head term alone | diagonal |")
    print("|---|---|---|---|---|---|")
    for kind in ("mlp", "transformer"):
        for std in STDS:
            start = time.perf_counter()
            for t, (joint, head, diag) in distances(kind, std, args.batches).items():
                print(f"| {kind} | {std} | {t} | {joint:.3f} | {head:.3f} | {diag:.3f} |")
            print(f"({kind}, std {std}: {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
