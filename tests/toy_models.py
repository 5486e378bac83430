"""Tiny hand-built models shared by pass tests (STYLE: toy architectures in one place)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ToyBlock(nn.Module):
    """Pre-LN block with separate q/k/v Linears on one LayerNorm output (HF style), plain
    matmul/softmax attention, and an MLP; residual adds around both."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        h = self.norm1(x)
        q = self.q(h).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        k = self.k(h).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        v = self.v(h).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        a = torch.softmax((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5, dim=-1)
        o = (a @ v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(o)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ToyViT(nn.Module):
    """Patch-embedding conv → ToyBlock → LayerNorm → class token → head."""

    def __init__(self, dim: int = 16, classes: int = 5, head_bias: bool = True):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.block = ToyBlock(dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes, bias=head_bias)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = self.norm(self.block(x))
        return self.head(x[:, 0])


def toy_vit() -> ToyViT:
    torch.manual_seed(0)
    return ToyViT().eval()


def toy_calib(n: int = 3, batch: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n)]


class LNTwoLinears(nn.Module):
    """LayerNorm whose output feeds two Linears (the RepQ-ViT exactness toy)."""

    def __init__(self, dim: int = 12, out: int = 5):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.a = nn.Linear(dim, out)
        self.b = nn.Linear(dim, out, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return self.a(h) + self.b(h)


class PostLNBlock(nn.Module):
    """Post-LN (BERT-style): the LayerNorm output feeds the next Linear *and* a residual add."""

    def __init__(self, dim: int = 12):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x):
        h = self.norm(x + self.fc(x))
        return h + self.fc2(h)


def outlier_ln_two_linears(seed: int = 0) -> LNTwoLinears:
    """LNTwoLinears with strongly varying per-channel LayerNorm affine (post-LN outliers)."""
    g = torch.Generator().manual_seed(seed)
    m = LNTwoLinears()
    with torch.no_grad():
        m.norm.weight.copy_(torch.exp(torch.randn(12, generator=g)) * torch.tensor([1.0] * 10 + [20.0, 35.0]))
        m.norm.bias.copy_(torch.randn(12, generator=g))
        for lin in (m.a, m.b):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.3)
        m.a.bias.copy_(torch.randn(5, generator=g))
    return m.eval()
