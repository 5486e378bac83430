"""Top-1 evaluation and the quantization-error metrics reported by tools and tests."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .batches import call_model
from .graph import logits_of


def top1(model: nn.Module, batches: Iterable[tuple[Any, torch.Tensor]], *, total: int | None = None,
         progress: bool = True, desc: str = "eval") -> float:
    """Top-1 accuracy in percent over ``(inputs, labels)`` batches (inputs: a tensor or a dict of
    model keyword arguments, as ``fxquant.batches``).

    Under ``torch.distributed`` batch ``i`` is evaluated by rank ``i % W`` and the integer counts
    are summed across ranks, so every rank returns the single-process figure exactly."""
    correct = seen = 0
    world, me = distributed.world_size(), distributed.rank()
    model.eval()
    with torch.no_grad(), tqdm(total=total, desc=desc, unit="img", disable=not progress or not distributed.is_main(),
                               leave=False) as bar:
        for i, (x, y) in enumerate(batches):
            if i % world != me:
                continue
            pred = logits_of(call_model(model, x)).argmax(dim=-1)
            correct += int((pred == y).sum())
            seen += len(y)
            bar.update(len(y) * world)
    if world > 1:
        counts = distributed.all_reduce_sum(torch.tensor([correct, seen], dtype=torch.int64))
        correct, seen = int(counts[0]), int(counts[1])
    if seen == 0:
        raise ValueError("evaluation set is empty")
    return 100.0 * correct / seen


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σ ref² / Σ (ref - test)²)`` in dB."""
    ref = reference.double()
    noise = (ref - test.double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


def compare_outputs(fp: nn.Module, q: nn.Module, inputs: tuple, ) -> dict[str, float]:
    with torch.no_grad():
        a = logits_of(fp(*inputs))
        b = logits_of(q(*inputs))
    return {"sqnr_db": sqnr_db(a, b), "max_abs_diff": (a - b).abs().max().item(),
            "rel_err": ((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item()}

