"""One layer at a time: which layers' quantization costs the most (``fxquant sensitivity``,
``mixed_precision``'s per-item costs).

With every quantizer off except one layer's (a Linear/Conv with its weight quantizer and the
quantizers of its inputs, or an attention matmul with its operands' quantizers;
``granularity="block"`` groups a transformer block's layers), the KL divergence of the float
predictions to the model's and the top-1 drop on held-out images. The quantizers keep the
parameters the recipe calibrated: for parallel-calibrated recipes these are exactly the
one-layer-quantized model's; for sequentially calibrated ones (RepQ) they saw the upstream layers
quantized, a close approximation.

Not to be confused with ``aph`` (APHQ-ViT's Hessian approximations, the "sensitivity" that weights
its reconstruction loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from . import match
from .graph import ensure_shapes, logits_of
from .quant import FakeQuantize, QuantConv2d, QuantLinear, quantizer_state


def layer_groups(gm: fx.GraphModule, granularity: str = "layer", example_inputs: tuple = ()) -> dict[str, list[FakeQuantize]]:
    """The quantizers of each layer: a Linear/Conv's weight quantizer and its inputs' quantizers,
    or an attention matmul's operand quantizers (named ``<module>:q·k`` / ``<module>:A·v``;
    ``granularity="block"``: per transformer block,
    with everything outside blocks, e.g. the patch embedding and the head, as its own layers)."""
    if granularity not in ("layer", "block"):
        raise ValueError(f"granularity must be 'layer' or 'block', got {granularity!r}")
    modules = match.modules_of(gm)
    groups: dict[str, list[FakeQuantize]] = {}
    owner: dict[str, str] = {}
    roles = {}
    for a in match.find_attention(gm, modules):
        roles[a.qk], roles[a.av] = "q·k", "A·v"
    if granularity == "block":
        if example_inputs:
            ensure_shapes(gm, example_inputs)
        for b in match.find_blocks(gm, modules):
            for n in b.nodes:
                owner[n.name] = b.fqn
    for n in gm.graph.nodes:
        kind = match.op_kind(n, modules)
        if kind not in ("linear", "conv", "matmul"):
            continue
        qs = [modules[a.target] for a in n.all_input_nodes
              if match.op_kind(a, modules) == "quantize" and modules[a.target].calibrated]
        mod = modules.get(n.target) if n.op == "call_module" else None
        if isinstance(mod, (QuantLinear, QuantConv2d)) and mod.weight_fake_quant.calibrated:
            qs.append(mod.weight_fake_quant)
        if not qs:
            continue
        name = owner.get(n.name) or (str(n.target) if n.op == "call_module" else f"{match.node_fqn(n)}:{roles.get(n, n.name)}")
        bucket = groups.setdefault(name, [])
        bucket += [q for q in qs if all(q is not b for b in bucket)]
    return groups


@dataclass
class Sensitivity:
    layer: str
    kl: float  # mean KL(p_float ‖ p_layer-quantized) per image
    top1: float
    top1_drop: float
    quantizers: int


def isolated_kl(gm: fx.GraphModule, groups: list[list[FakeQuantize]], batches: list[torch.Tensor], *,
                progress: bool = False, desc: str = "sensitivity") -> tuple[torch.Tensor, list[tuple[float, torch.Tensor]]]:
    """Every quantizer off except one group's at a time (each as it was compiled: a disabled
    quantizer stays off): the float model's predictions ``[N]`` and, per group, the mean KL of the
    float predictions to the model's and its predictions. Flags are restored."""
    out = []
    with quantizer_state(gm) as flags, torch.no_grad():
        gm.eval()

        def run() -> torch.Tensor:
            return torch.cat([logits_of(gm(x)) for x in batches]).double()

        for q in flags:
            q.fake_quant_enabled = False
        ref = run()
        ref_logp = F.log_softmax(ref, dim=-1)
        for qs in tqdm(groups, desc=desc, disable=not progress, leave=False):
            for q in qs:
                q.fake_quant_enabled = flags[q]
            logits = run()
            for q in qs:
                q.fake_quant_enabled = False
            kl = F.kl_div(F.log_softmax(logits, dim=-1), ref_logp, log_target=True, reduction="batchmean")
            out.append((float(kl), logits.argmax(-1)))
    return ref.argmax(-1), out


def layer_sensitivity(gm: fx.GraphModule, images: torch.Tensor, labels: torch.Tensor, *, granularity: str = "layer",
                      batch_size: int = 250, progress: bool = True) -> list[Sensitivity]:
    """Per layer (or block), quantize only it: KL to the float predictions and top-1 drop on
    ``images``; most sensitive first (by KL)."""
    groups = layer_groups(gm, granularity, example_inputs=(images[:2],))
    ref, effects = isolated_kl(gm, list(groups.values()), list(images.split(batch_size)), progress=progress)
    top1_fp = 100.0 * float((ref == labels).double().mean())
    out = []
    for (name, qs), (kl, pred) in zip(groups.items(), effects):
        acc = 100.0 * float((pred == labels).double().mean())
        out.append(Sensitivity(name, kl, acc, top1_fp - acc, len(qs)))
    return sorted(out, key=lambda s: -s.kl)


def sensitivity_table(rows: list[Sensitivity], top: int | None = None) -> str:
    rows = rows[:top] if top else rows
    head = ("rank", "layer", "KL", "top1 %", "drop", "quantizers")
    body = [(str(i + 1), r.layer, f"{r.kl:.5f}", f"{r.top1:.2f}", f"{r.top1_drop:+.2f}", str(r.quantizers))
            for i, r in enumerate(rows)]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [head, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


__all__ = ["layer_groups", "Sensitivity", "isolated_kl", "layer_sensitivity", "sensitivity_table"]
