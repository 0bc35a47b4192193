"""Plan curvature memory before building a model: ``memory_estimate()`` on the ``meta`` device.

Two models at their real sizes, written here (curvlab never imports torchvision):

* a GPT-2-small-shaped language model (124M parameters: vocabulary 50257, context 1024,
  width 768, 12 blocks, 12 heads), with the token embedding tied to the output head
  (as GPT-2) or untied (a separate ``Linear(768, 50257)`` head);
* a ResNet-50-shaped image classifier (25.6M parameters: bottleneck blocks [3, 4, 6, 3],
  1000 classes).

Nothing is allocated: the parameters live on ``meta``. Usage:
``python -m benchmarks.memory_plan`` (a few seconds). Prints one table per model and backend.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import curvlab


class GPTBlock(nn.Module):
    """Pre-norm transformer block with GPT-2's layer shapes (causal attention written out)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(n, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(att.transpose(1, 2).reshape(n, t, d))
        return x + self.mlp_proj(nn.functional.gelu(self.c_fc(self.ln_2(x))))


class GPT2Small(nn.Module):
    """GPT-2 small's shapes; ``tied``: the head reuses the token embedding's weight."""

    def __init__(self, vocab: int = 50257, context: int = 1024, width: int = 768, depth: int = 12,
                 heads: int = 12, tied: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(GPTBlock(width, heads) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.blocks(self.wte(idx) + self.wpe(pos))
        return self.head(self.ln_f(x)).flatten(0, 1)  # [N·T, V]


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck: 1×1, 3×3 (stride), 1×1 ×4, BatchNorm after each."""

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )  # fmt: skip
        self.short = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.short(x))


def resnet50(classes: int = 1000) -> nn.Module:
    """ResNet-50's shapes: a 7×7 stem, four stages of [3, 4, 6, 3] bottlenecks, a linear head."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]  # fmt: skip
    c_in = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for b in range(blocks):
            layers.append(Bottleneck(c_in, width, 2 if b == 0 and stage > 0 else 1))
            c_in = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    return nn.Sequential(*layers)


def plan(name: str, build: object, backends: dict[str, object], top: int = 4) -> None:
    with torch.device("meta"):
        model = build()  # type: ignore[operator]
    params = sum(p.numel() for p in model.parameters())
    for label, make in backends.items():
        estimate = make(model)  # type: ignore[operator]
        print(f"\n{name} ({params / 1e6:.1f}M parameters), {label}:")
        print(estimate.memory_estimate().table(top=top))


def main() -> None:
    ce = nn.CrossEntropyLoss()
    kfac = {"KFAC": lambda m: curvlab.KFAC(m, ce), "EKFAC": lambda m: curvlab.EKFAC(m, ce)}
    plan("GPT-2 small, tied head", GPT2Small, {"KFAC": kfac["KFAC"]})
    untied = {
        "KFAC (output_factor='auto': structured head)": kfac["KFAC"],
        "KFAC (output_factor='dense')": lambda m: curvlab.KFAC(m, ce, output_factor="dense"),
    }
    plan("GPT-2 small, untied head", lambda: GPT2Small(tied=False), untied)
    plan("ResNet-50", resnet50, kfac)


if __name__ == "__main__":
    main()
