"""A zoo of realistic architectures at tiny widths, for dense float64 references.

Every model's ``forward`` returns a 2-D ``[N_rows, C]`` output, so a standard loss
applies directly: per-token or per-pixel models flatten their outputs to
``[N·T, C]`` inside ``forward`` and their batches carry matching ``[N·T]`` targets.
Each ``make_model`` seeds its own construction (``torch.manual_seed(0)`` inside), so
two calls give identical weights; models and floating-point inputs are float64,
dropout is 0 everywhere, and every case has fewer than 600 trainable parameters, so
dense ``[P, P]`` references stay cheap.

``sequential`` marks plain ``nn.Sequential`` models; ``curvlinops_ok`` marks cases
whose dense GGN curvlinops' ``GGNLinearOperator`` reproduces (checked in
``tests/test_zoo_reference.py``); ``slow`` marks cases whose references take long.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

DTYPE = torch.float64
N = 4  # samples per batch
C = 3  # classes / outputs of the classifiers
T = 4  # tokens per sequence
VOCAB = 7  # characters of the GPT-like models


@dataclass(frozen=True)
class ZooCase:
    """One architecture: a model factory, a seeded batch factory, a loss factory."""

    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], tuple[Tensor, Tensor]]
    loss_fn: Callable[[], nn.Module]
    sequential: bool = False
    curvlinops_ok: bool = False
    slow: bool = False


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Wrap ``build`` so that it runs under ``torch.manual_seed(0)`` and yields float64.

    The global RNG state is restored afterwards, so building a model does not perturb
    the caller's random stream.
    """

    def make() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build().to(DTYPE)

    return make


# --- batches -----------------------------------------------------------------------------


def _class_batch(shape: tuple[int, ...]) -> Callable[[torch.Generator], tuple[Tensor, Tensor]]:
    """Gaussian inputs of ``[N, *shape]`` with ``N`` class labels in ``[0, C)``."""

    def make(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        X = torch.randn(N, *shape, generator=generator, dtype=DTYPE)
        y = torch.randint(0, C, (N,), generator=generator)
        return X, y

    return make


def _regression_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    X = torch.randn(N, 4, generator=generator, dtype=DTYPE)
    y = torch.randn(N, C, generator=generator, dtype=DTYPE)
    return X, y


def _binary_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    X = torch.randn(N, 4, generator=generator, dtype=DTYPE)
    y = torch.randint(0, 2, (N, C), generator=generator).to(DTYPE)
    return X, y


def _ignore_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Like the ``mlp`` batch with 6 samples, two of whose labels are ``-100``."""
    X = torch.randn(6, 4, generator=generator, dtype=DTYPE)
    y = torch.randint(0, C, (6,), generator=generator)
    y[1] = -100
    y[4] = -100
    return X, y


def _char_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Token sequences ``[N, T]`` and next-token targets flattened to ``[N·T]``."""
    seq = torch.randint(0, VOCAB, (N, T + 1), generator=generator)
    return seq[:, :-1], seq[:, 1:].reshape(-1)


def _pixel_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Images ``[N, 1, 4, 4]`` with a 2-class label per pixel, flattened to ``[N·16]``."""
    X = torch.randn(N, 1, 4, 4, generator=generator, dtype=DTYPE)
    y = torch.randint(0, 2, (N * 16,), generator=generator)
    return X, y


# --- models --------------------------------------------------------------------------


def _mlp(num_out: int = C) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, num_out))


def _cnn() -> nn.Module:
    # [N, 1, 6, 6] -> [N, 2, 6, 6] -> [N, 2, 2, 2] -> [N, 8] -> [N, 3]
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3, stride=2),
        nn.Flatten(),
        nn.Linear(8, C),
    )


class BasicBlock(nn.Module):
    """conv-BN-relu-conv-BN plus the identity, then relu (ResNet's basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


class TinyResNet(nn.Module):
    """Conv stem, one basic block, global average pool, linear head; input [N, 1, 4, 4]."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.block = BasicBlock(channels)
        self.head = nn.Linear(channels, C)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(torch.relu(self.stem(x)))
        return self.head(h.mean(dim=(2, 3)))


def _resnet_train() -> nn.Module:
    return TinyResNet().train()


def _resnet_eval() -> nn.Module:
    """The ResNet in eval mode, its BatchNorm running statistics made non-trivial."""
    model = TinyResNet()
    generator = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(2.0 * torch.randn(8, 1, 4, 4, generator=generator) + 0.5)
    return model.eval()


class TransformerLayerNet(nn.Module):
    """Linear embedding of [N, T, 3] to d_model 8, one ``nn.TransformerEncoderLayer``."""

    def __init__(self, d_model: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d_model)
        self.layer = nn.TransformerEncoderLayer(
            d_model=d_model, nhead=2, dim_feedforward=8, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(d_model, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(self.embed(x)).mean(dim=1))


class PlainAttention(nn.Module):
    """Multi-head self-attention from plain ``nn.Linear`` q, k, v, o projections."""

    def __init__(self, d: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.causal = causal

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        h, dh = self.heads, d // self.heads

        def split(z: Tensor) -> Tensor:  # [N, T, D] -> [N, H, T, Dh]
            return z.reshape(n, t, h, dh).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) / dh**0.5  # [N, H, T, T]
        if self.causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, t, d)
        return self.o(out)


class PlainTransformer(nn.Module):
    """Pre-LN transformer block from plain modules plus a raw position ``nn.Parameter``."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.pos = nn.Parameter(0.1 * torch.randn(T, d))
        self.ln1 = nn.LayerNorm(d)
        self.attn = PlainAttention(d, heads=2)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.head = nn.Linear(d, C)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos
        h = h + self.attn(self.ln1(h))
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(dim=1))


class GPTChar(nn.Module):
    """A one-block causal character model; per-token logits flattened to [N·T, VOCAB]."""

    def __init__(self, d: int = 6, tied: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        nn.init.normal_(self.tok.weight, std=0.3)  # keeps the tied head's logits moderate
        self.pos = nn.Parameter(0.1 * torch.randn(T, d))
        self.ln1 = nn.LayerNorm(d)
        self.attn = PlainAttention(d, heads=2, causal=True)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        h = self.tok(idx) + self.pos[: idx.shape[1]]
        h = h + self.attn(self.ln1(h))
        logits = self.head(self.ln_f(h))  # [N, T, VOCAB], the head on [N, T, D]
        return logits.reshape(-1, logits.shape[-1])


class RNNClassifier(nn.Module):
    """An ``nn.LSTM``/``nn.GRU`` over [N, T, 3], linear head on the last time step."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(3, 5, batch_first=True)
        self.head = nn.Linear(5, C)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TinyUNet(nn.Module):
    """Down conv, max-pool, middle conv, transposed-conv up, skip concat, output conv.

    Input [N, 1, 4, 4]; per-pixel 2-class logits flattened to [N·16, 2].
    """

    def __init__(self, ch: int = 3) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, ch, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Conv2d(ch, ch, 3, padding=1)
        self.up = nn.ConvTranspose2d(ch, ch, 2, stride=2)
        self.out = nn.Conv2d(2 * ch, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        d = torch.relu(self.down(x))  # [N, ch, 4, 4]
        m = torch.relu(self.mid(self.pool(d)))  # [N, ch, 2, 2]
        u = self.up(m)  # [N, ch, 4, 4]
        logits = self.out(torch.cat([u, d], dim=1))  # [N, 2, 4, 4]
        return logits.permute(0, 2, 3, 1).reshape(-1, 2)


class MixerNet(nn.Module):
    """One MLP-Mixer block: token mixing on [N, D, T], channel mixing on [N, T, D]."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.ln1 = nn.LayerNorm(d)
        self.token_mix = nn.Linear(T, T)
        self.ln2 = nn.LayerNorm(d)
        self.channel_mix = nn.Linear(d, d)
        self.head = nn.Linear(d, C)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)  # [N, T, D]
        h = h + self.token_mix(self.ln1(h).transpose(1, 2)).transpose(1, 2)
        h = h + torch.tanh(self.channel_mix(self.ln2(h)))
        return self.head(h.mean(dim=1))


class SharedLayer(nn.Module):
    """The same square ``nn.Linear`` applied twice in one forward, then a head."""

    def __init__(self, d: int = 5) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.head = nn.Linear(d, C)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        h = torch.tanh(self.lin(h))
        return self.head(h)


def _frozen_bias() -> nn.Module:
    model = _mlp()
    model[0].bias.requires_grad_(False)
    return model


# --- the zoo ---------------------------------------------------------------------------

ZOO: list[ZooCase] = [
    ZooCase(
        "mlp",
        _seeded(_mlp),
        _class_batch((4,)),
        nn.CrossEntropyLoss,
        sequential=True,
        curvlinops_ok=True,
    ),
    ZooCase(
        "cnn",
        _seeded(_cnn),
        _class_batch((1, 6, 6)),
        nn.CrossEntropyLoss,
        sequential=True,
        curvlinops_ok=True,
    ),
    # curvlinops: BatchNorm's in-place running-stat update fails under torch.func
    ZooCase(
        "resnet_bn_train",
        _seeded(_resnet_train),
        _class_batch((1, 4, 4)),
        nn.CrossEntropyLoss,
        curvlinops_ok=False,
    ),
    ZooCase(
        "resnet_bn_eval",
        _seeded(_resnet_eval),
        _class_batch((1, 4, 4)),
        nn.CrossEntropyLoss,
        curvlinops_ok=True,
    ),
    # curvlinops: its GGN needs forward-mode AD, which CPU flash attention lacks
    ZooCase(
        "transformer_layer",
        _seeded(TransformerLayerNet),
        _class_batch((T, 3)),
        nn.CrossEntropyLoss,
        curvlinops_ok=False,
    ),
    ZooCase(
        "transformer_plain",
        _seeded(PlainTransformer),
        _class_batch((T, 3)),
        nn.CrossEntropyLoss,
        curvlinops_ok=True,
    ),
    ZooCase("gpt_char", _seeded(GPTChar), _char_batch, nn.CrossEntropyLoss, curvlinops_ok=True),
    ZooCase(
        "gpt_char_tied",
        _seeded(lambda: GPTChar(tied=True)),
        _char_batch,
        nn.CrossEntropyLoss,
        curvlinops_ok=True,
    ),
    ZooCase(
        "lstm",
        _seeded(lambda: RNNClassifier(nn.LSTM)),
        _class_batch((T, 3)),
        nn.CrossEntropyLoss,
        curvlinops_ok=True,
    ),
    ZooCase(
        "gru",
        _seeded(lambda: RNNClassifier(nn.GRU)),
        _class_batch((T, 3)),
        nn.CrossEntropyLoss,
        curvlinops_ok=True,
    ),
    ZooCase("unet", _seeded(TinyUNet), _pixel_batch, nn.CrossEntropyLoss, curvlinops_ok=True),
    ZooCase(
        "mixer", _seeded(MixerNet), _class_batch((T, 3)), nn.CrossEntropyLoss, curvlinops_ok=True
    ),
    ZooCase(
        "mlp_mse",
        _seeded(_mlp),
        _regression_batch,
        lambda: nn.MSELoss(reduction="sum"),
        sequential=True,
        curvlinops_ok=True,
    ),
    ZooCase(
        "mlp_bce",
        _seeded(_mlp),
        _binary_batch,
        nn.BCEWithLogitsLoss,
        sequential=True,
        curvlinops_ok=True,
    ),
    ZooCase(
        "shared_layer",
        _seeded(SharedLayer),
        _class_batch((5,)),
        nn.CrossEntropyLoss,
        curvlinops_ok=True,
    ),
    ZooCase(
        "frozen_bias",
        _seeded(_frozen_bias),
        _class_batch((4,)),
        nn.CrossEntropyLoss,
        sequential=True,
        curvlinops_ok=True,
    ),
    ZooCase(
        "ignore_index",
        _seeded(_mlp),
        _ignore_batch,
        lambda: nn.CrossEntropyLoss(ignore_index=-100),
        sequential=True,
        curvlinops_ok=True,
    ),
]

_BY_NAME = {c.name: c for c in ZOO}
assert len(_BY_NAME) == len(ZOO), "zoo case names must be unique"


def case(name: str) -> ZooCase:
    """The zoo case called ``name``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no zoo case {name!r}; known: {sorted(_BY_NAME)}") from None


if __name__ == "__main__":  # python -m tests.zoo: the table of cases
    for c in ZOO:
        model = c.make_model()
        X, y = c.make_batch(torch.Generator().manual_seed(0))
        P = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"{c.name:18s} P={P:4d} output={tuple(model(X).shape)} "
            f"curvlinops_ok={c.curvlinops_ok} slow={c.slow}"
        )
