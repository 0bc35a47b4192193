"""K-FAC for recurrent layers on a character LSTM (concepts/recurrent.md; docs/benchmarks.md).

A character-level LSTM language model (embedding 32 → LSTM 64 → linear) on the text corpus
of the optimizer race (:func:`benchmarks.optimizer_race.corpus`), context 32, batch 16,
trained by Adam and by SGD with momentum preconditioned by :class:`curvlab.NaturalGradient`
of ``KFAC(recurrent=...)`` for ``"diagonal"``, ``"independent"`` and ``"series"`` (the
embedding and the head get K-FAC blocks in all three). Each contender runs the same
batches for a fixed wall-clock budget on one thread; the table gives the evaluation loss
(nats per character on 32 fixed windows) per iteration and per second.

    taskset -c 0 python -m benchmarks.rnn_kfac [--seconds 30]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import curvlab
from benchmarks.optimizer_race import _natural_gradient, corpus

CONTEXT, BATCH = 32, 16
Step = Callable[[Tensor, Tensor], Tensor]


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = nn.LSTM(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(idx))
        return self.head(out).reshape(-1, self.head.out_features)


def _adam(model: nn.Module, loss_fn: nn.Module) -> Step:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def step(x: Tensor, y: Tensor) -> Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _kfac(recurrent: str) -> Callable[[nn.Module, nn.Module], Step]:
    """NaturalGradient(KFAC(recurrent=...)) beside SGD momentum 0.9, as the optimizer race."""
    make = _natural_gradient(lambda m, loss_fn: curvlab.KFAC(m, loss_fn, recurrent=recurrent))
    setting = {"lr": 0.1, "damping": 1e-2, "invert_every": 10}
    return lambda model, loss_fn: make(model, loss_fn, setting)


CONTENDERS: dict[str, Callable[[nn.Module, nn.Module], Step]] = {
    "Adam": _adam,
    "K-FAC, LSTM diagonal": _kfac("diagonal"),
    "K-FAC, LSTM independent": _kfac("independent"),
    "K-FAC, LSTM series": _kfac("series"),
}


def main(seconds: float = 30.0, marks: tuple[int, ...] = (25, 50, 100, 200)) -> None:
    torch.set_num_threads(1)
    text = corpus()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    offsets = torch.arange(CONTEXT + 1)

    def windows(starts: Tensor) -> tuple[Tensor, Tensor]:
        chunk = ids[starts[:, None] + offsets]
        return chunk[:, :-1], chunk[:, 1:].reshape(-1)

    eval_x, eval_y = windows(torch.linspace(0, len(ids) - CONTEXT - 2, 32).long())
    loss_fn = nn.CrossEntropyLoss()
    print(
        f"char LSTM, {len(vocab)} symbols, context {CONTEXT}, batch {BATCH}, {seconds:.0f} s each"
    )
    header = " | ".join(f"it {m}" for m in marks)
    print(f"| contender | s/it | {header} | at 10 s | at {seconds:.0f} s |")
    for name, make in CONTENDERS.items():
        torch.manual_seed(0)
        model = CharLSTM(len(vocab))
        step = make(model, loss_fn)
        gen = torch.Generator().manual_seed(1)
        at_iter: dict[int, float] = {}
        at_time: dict[float, float] = {}
        elapsed, it = 0.0, 0
        while elapsed < seconds:
            x, y = windows(torch.randint(0, len(ids) - CONTEXT - 1, (BATCH,), generator=gen))
            start = time.perf_counter()
            step(x, y)
            elapsed += time.perf_counter() - start
            it += 1
            checkpoints = [m for m in marks if m == it]
            timed = [s for s in (10.0, seconds) if s not in at_time and elapsed >= s]
            if checkpoints or timed:
                with torch.no_grad():
                    value = float(loss_fn(model(eval_x), eval_y))
                for m in checkpoints:
                    at_iter[m] = value
                for s in timed:
                    at_time[s] = value
        per_it = elapsed / it
        cells = " | ".join(f"{at_iter[m]:.3f}" if m in at_iter else "–" for m in marks)
        timed_cells = " | ".join(f"{at_time.get(s, float('nan')):.3f}" for s in (10.0, seconds))
        print(f"| {name} | {per_it:.3f} | {cells} | {timed_cells} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    main(parser.parse_args().seconds)
