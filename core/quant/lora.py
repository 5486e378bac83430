"""Low-rank adapters on quantized weights (QLoRA, LoftQ, OQFV; docs/methods.md, OQFV).

A ``LoRALinear`` computes ``y = x·Q(W')ᵀ + s·(x·Aᵀ)·Bᵀ + b`` with a frozen, fake-quantized base
weight ``Q(W')`` (``weight`` = ``W'`` through ``weight_fake_quant``, torch.ao's QAT convention),
trainable ``A`` (``lora_A``, ``[r, in]``) and ``B`` (``lora_B``, ``[out, r]``), and the frozen bias.
Its parameter names follow ``peft`` (``lora_A``/``lora_B``) so that adapters convert one to one.

Initialisations of ``(W', B, A)`` from a float weight ``W`` and a quantizer ``Q``:

* **QLoRA**: ``W' = W``; ``A`` Kaiming-uniform (``a = √5``, as ``nn.Linear`` and peft), ``B = 0``:
  the adapted layer starts as ``Q(W)``.
* **LoftQ** (Li et al., 2023), ``k`` steps: ``R_0 = 0``; step ``t`` quantizes ``W'_t = W − R_{t−1}``
  and takes ``(B_t, A_t)``, the rank-r SVD of ``W − Q(W'_t)`` split as ``B = U√S``, ``A = √S Vᵀ``
  (``R_t = B_t A_t``). The adapted layer starts as ``Q(W'_k) + B_k A_k``, the quantized weight plus
  the best rank-r fix of what quantization lost.
* **OQFV**: one LoftQ step (``W' = W``), then one AdamW step of ``(A, B)`` on the logit MSE against
  the float model (``fxquant.passes.lora``, which owns the data).

With ``r = min(out, in)`` the SVD is exact, so ``Q(W') + BA = W`` whatever ``Q`` does: the
adapted layer equals the float one (tested).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .modules import _WeightQuantized
from .spec import QuantSpec


def low_rank_split(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B = U_r √S_r`` (``[out, r]``) and ``A = √S_r V_rᵀ`` (``[r, in]``): the
    rank-``rank`` truncated SVD of ``residual`` (in float32 at least, as peft's LoftQ; the dtype of
    ``residual`` out)."""
    if residual.dim() != 2:
        raise ValueError(f"low_rank_split needs a 2-D matrix, got shape {tuple(residual.shape)}")
    work = residual if residual.dtype == torch.float64 else residual.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(residual.dtype), (root[:, None] * vh[:rank]).to(residual.dtype)


def loftq(weight: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor], rank: int,
          iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """LoftQ's alternating initialisation (module docstring): ``(W', B, A, errors)`` where
    ``quantize(W')`` is the frozen base, and ``errors[t] = ‖W − Q(W'_t) − B_t A_t‖_F / ‖W‖_F``
    after each step (non-increasing in practice; the tests check it on real layers)."""
    if iters < 1:
        raise ValueError(f"LoftQ needs at least one step, got iters={iters}")
    w = weight.detach().float()
    norm = w.norm().clamp(min=1e-30)
    low_rank = torch.zeros_like(w)
    errors: list[float] = []
    for _ in range(iters):
        base = w - low_rank
        q = quantize(base)
        b, a = low_rank_split(w - q, rank)
        low_rank = b @ a
        errors.append(float((w - q - low_rank).norm() / norm))
    return base, b, a, errors


class LoRALinear(_WeightQuantized, nn.Linear):
    """``nn.Linear`` with a frozen fake-quantized weight and a trainable low-rank branch (module
    docstring). ``weight``/``bias`` keep the float layer's names; ``weight_fake_quant`` is off (the
    identity) for full-precision LoRA."""

    lora_A: nn.Linear
    lora_B: nn.Linear

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, spec: QuantSpec | None, *, scaling: float = 1.0,
                    label: str = "") -> "LoRALinear":
        """A LoRA layer around ``linear``'s parameters (frozen): ``A`` Kaiming-uniform, ``B = 0``
        (QLoRA's start; the caller overwrites them for LoftQ/OQFV). ``spec=None``: no quantization."""
        if not 1 <= rank <= min(linear.in_features, linear.out_features):
            raise ValueError(f"LoRA rank {rank} of '{label}' must be in 1..{min(linear.in_features, linear.out_features)}")
        new = cls.from_float(linear, spec or QuantSpec(), label)
        new.weight.requires_grad_(False)
        if new.bias is not None:
            new.bias.requires_grad_(False)
        dev, dt = linear.weight.device, linear.weight.dtype
        new.lora_A = nn.Linear(linear.in_features, rank, bias=False, device=dev, dtype=dt)
        new.lora_B = nn.Linear(rank, linear.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(new.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(new.lora_B.weight)
        new.rank = rank
        new.scaling = float(scaling)
        new.quantized = spec is not None
        return new

    def base_weight(self) -> torch.Tensor:
        """The frozen weight the layer multiplies by: ``Q(W')`` (``W'`` for full-precision LoRA)."""
        return self.weight_fake_quant(self.weight)

    def merged_weight(self) -> torch.Tensor:
        """``Q(W') + s·B·A``: the one matrix the layer applies."""
        return self.base_weight() + self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (self.lora_A.weight.requires_grad or self.lora_B.weight.requires_grad)):
            # inference: one GEMM with the merged weight (the low-rank branch over every token costs as much
            # memory traffic as the main GEMM on a ViT; peft merges for inference too)
            return F.linear(x, self.merged_weight(), self.bias)
        branch = self.lora_B(self.lora_A(x))
        return F.linear(x, self.base_weight(), self.bias) + (branch if self.scaling == 1.0 else self.scaling * branch)

    def extra_repr(self) -> str:
        q = self.weight_fake_quant.spec.short() if self.quantized else "float"
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, scaling={self.scaling:g}, weight={q}"
