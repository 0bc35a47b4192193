"""
K-FAC and EKFAC on a ResNet with BatchNorm and on a small transformer
=====================================================================

The Kronecker backends work on any ``nn.Module``: here a residual network with
BatchNorm (in train mode) and a transformer whose attention is built from ``nn.Linear``
projections, both on scikit-learn's digits. Layers with a Kronecker rule (``Linear``,
``Conv2d``, ``Embedding``) get ``G ⊗ A`` blocks; every other trainable parameter
(BatchNorm's and LayerNorm's affine parameters, the position embedding) gets a diagonal
block of the same Fisher type, so the whole model is preconditioned. The docs page
"Layers and models" explains how the statistics are extracted.
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

import curvlab

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
y = torch.tensor(y)
train_x, train_y = X[:1024], y[:1024]


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = Block(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean(dim=(2, 3)))


class Attention(nn.Module):
    """Single-head self-attention from plain nn.Linear projections."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):  # [N, T, D]
        scores = self.q(x) @ self.k(x).transpose(1, 2) / x.shape[-1] ** 0.5
        return self.o(scores.softmax(dim=-1) @ self.v(x))


class Transformer(nn.Module):
    """The 8 image rows as 8 tokens of 8 pixels."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.position = nn.Parameter(0.02 * torch.randn(8, dim))  # a raw parameter
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = Attention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        h = self.embed(x.reshape(-1, 8, 8)) + self.position
        h = h + self.attention(self.norm1(h))
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(dim=1))


# %%
# Coverage: every trainable parameter sits in some block.
loss_fn = nn.CrossEntropyLoss()
for name, build in (("ResNet", ResNet), ("Transformer", Transformer)):
    kinds = curvlab.KFC(build(), loss_fn).coverage()
    counts = {k: sum(v == k for v in kinds.values()) for k in sorted(set(kinds.values()))}
    print(f"{name}: {len(kinds)} parameter tensors, {counts}")

# %%
# Training: SGD with momentum against natural gradient with K-FAC (KFC) and EKFAC, each
# from the same initialisation and the same batch order.


def train(build, method: str, steps: int = 30, lr: float = 0.05) -> list[float]:
    torch.manual_seed(1)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    precond = None
    if method != "SGD":
        backend = curvlab.make(method, model, loss_fn)
        precond = curvlab.NaturalGradient(backend, optimizer=opt, invert_every=5)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        index = torch.randint(0, len(train_x), (64,), generator=gen)
        opt.zero_grad()
        loss = loss_fn(model(train_x[index]), train_y[index])
        if precond is None:
            loss.backward()
        else:
            precond.backward(loss)
            precond.step()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


results = {}
for name, build in (("ResNet", ResNet), ("Transformer", Transformer)):
    for method in ("SGD", "kfc", "ekfac"):
        curve = train(build, method, lr=0.05 if method == "SGD" else 0.3)
        results[name, method] = curve
        print(f"{name:11s} {method:5s}: loss {curve[0]:.3f} -> {sum(curve[-5:]) / 5:.3f}")

# %%
# The curves (training loss per step).
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for ax, name in zip(axes, ("ResNet", "Transformer")):
    for method in ("SGD", "kfc", "ekfac"):
        ax.plot(results[name, method], label=method)
    ax.set(title=name, xlabel="step", ylabel="training loss", yscale="log")
    ax.legend()
fig.tight_layout()
