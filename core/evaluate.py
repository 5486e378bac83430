"""Top-1 evaluation and the quantization-error metrics reported by tools and tests."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .batches import call_model
from .digest import tensors_digest
from .graph import logits_of
from .quant import FakeQuantize


def top1(model: nn.Module, batches: Iterable[tuple[Any, torch.Tensor]], *, total: int | None = None,
         progress: bool = True, desc: str = "eval") -> float:
    """Top-1 accuracy in percent over ``(inputs, labels)`` batches (inputs: a tensor or a dict of
    model keyword arguments, as ``fxquant.core.batches``).

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


def fp32_cache_path() -> Path:
    """Where measured float top-1 figures are kept: ``$FXQUANT_CACHE_DIR/fp32_top1.json`` (default
    ``$XDG_CACHE_HOME/fxquant`` or ``~/.cache/fxquant``)."""
    root = os.environ.get("FXQUANT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fxquant"
    return Path(root) / "fp32_top1.json"


def fp32_top1(model: nn.Module, data: Any, *, batch_size: int | None = None, seed: int = 0, progress: bool = True,
              recompute: bool = False) -> float:
    """The float model's top-1 on ``data`` (``fxquant.core.data.Data``), from the cache when these
    (float weights, data, evaluation size, batch size, seed) were measured before (``recompute``
    measures again and corrects the cache). The key holds the SHA-256 of the float state dict, so
    changed weights are never served. Under ``torch.distributed`` every rank takes rank 0's
    cached value or all measure together."""
    key = tensors_digest(dict(model.state_dict())) + "|" + json.dumps([data.source, data.test_count, batch_size, seed])
    path = fp32_cache_path()
    cached = None
    if not recompute and distributed.is_main():
        try:
            cached = json.loads(path.read_text()).get(key)
        except (OSError, ValueError):
            cached = None
    cached = distributed.all_gather_objects(cached)[0]  # every rank takes rank 0's decision
    if cached is not None:
        return float(cached)
    fp32 = top1(model, data.test_batches(), total=data.test_count, progress=progress, desc="fp32")
    if distributed.is_main():
        try:
            table = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            table = {}
        table[key] = fp32
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table, indent=1))
            tmp.replace(path)  # atomic: concurrent evals never read half a file
        except OSError as e:  # a read-only home must not fail the evaluation
            print(f"note: could not write the FP32 cache {path}: {e}", file=sys.stderr)
    return fp32


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



def activation_bits(model: nn.Module, batch: Any, *, scale_bits: int = 16, zero_point_bits: int = 8) -> dict[str, float]:
    """Mean bits per quantized activation element on one ``batch`` (one forward pass), weighted by
    element count over every enabled activation quantizer: ``nominal`` (the codes' widths) and
    ``with_metadata`` (plus the per-image/token/group scales and zero points dynamic quantizers carry,
    ``QuantSpec.metadata_bits_per_element``), and the ``elements`` counted. Empty dict when the model
    quantizes no activation."""
    totals = {"elements": 0, "code_bits": 0.0, "meta_bits": 0.0}

    def count(mod: FakeQuantize, args: tuple, _out) -> None:
        x = args[0]
        n = x.numel()
        totals["elements"] += n
        totals["code_bits"] += n * mod.spec.bits
        totals["meta_bits"] += n * mod.spec.metadata_bits_per_element(tuple(x.shape), scale_bits=scale_bits,
                                                                      zero_point_bits=zero_point_bits)

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, FakeQuantize) and not m.weight and m.fake_quant_enabled]
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    if not totals["elements"]:
        return {}
    nominal = totals["code_bits"] / totals["elements"]
    return {"nominal": round(nominal, 4), "with_metadata": round(nominal + totals["meta_bits"] / totals["elements"], 4),
            "elements": totals["elements"]}
