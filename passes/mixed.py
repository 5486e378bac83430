"""Mixed precision: per-layer bit widths under a model-size budget, chosen from measured sensitivities.

``mixed_precision`` runs after the annotation passes (uniform, RepQ-ViT, BitLog2, APHQ) and before
``insert_quantizers``: it only rewrites the ``bits`` of the annotated uniform specs, so everything
after it (insertion, calibration, RepQ's reparameterization, QwT, lowering, ONNX export, artifacts)
treats the chosen widths like any other spec.

* **Items.** Every weight spec (one per Linear/Conv; size = its parameter count) and every
  activation quantizer as ``insert_quantizers`` will create it (producer + spec; size = elements per
  image of the quantized tensor), uniform or log (RepQ-ViT's log√2 softmax). BitLog2 specs are
  4-bit by definition: they stay, and need ``bit_budget=4``. QwT's compensation layers (added
  later, fp16 or 8-bit) are outside the budget.
* **Sensitivity table.** For each candidate width ``b``: a copy of the graph with every uniform spec
  at ``b`` is inserted and calibrated (parallel, on at most ``max_images`` calibration images);
  then for each item alone: its quantizer on, all others off, the KL divergence of the float
  predictions to the model's on the same images.
* **Choice.** The budget is ``bit_budget`` bits per parameter for the weights (parameter-weighted
  mean ≤ B) and per element for the activations (element-weighted mean ≤ B): two independent
  multiple-choice knapsacks, each minimising the sum of the items' KL (the additive approximation
  of HAWQ-style searches), solved exactly by dynamic programming (``fxquant.core.knapsack``;
  costs coarsened upward so the budget always holds). ``bit_budget`` must be one of the
  candidates: the uniform model of that width is then always a feasible choice, so the search can
  only lower the summed KL.
* Replayed from the record (the chosen width per item) when an artifact is loaded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

from torch import fx
from tqdm.auto import tqdm

from fxquant.core import match
from fxquant.core.errors import ConfigError, PassError
from fxquant.core.knapsack import knapsack_units, solve_allocation
from fxquant.core.layer_sensitivity import isolated_kl
from fxquant.core.meta import QUANTIZER, input_specs, set_input_spec, set_weight_spec, weight_spec
from fxquant.core.pipeline import SHAPES, Pass, PassContext, PassManager, PassResult, register_pass
from fxquant.core.quant import FakeQuantize

from .calibrate import Calibrate
from .insert import InsertQuantizers

MAX_UNITS = 20_000


def _numel(node: fx.Node) -> int:
    shape = match.tensor_shape(node)
    if shape is None:
        raise PassError(f"mixed_precision: node '{node.name}' has no recorded shape; compile with example inputs")
    n = 1
    for s in shape[1:]:
        n *= max(int(s), 1)
    return n


@register_pass
@dataclass(frozen=True)
class MixedPrecision(Pass):
    """Per-layer weight and activation widths with mean bits ≤ ``bit_budget``, from measured KL (two exact knapsacks)."""

    name: ClassVar[str] = "mixed_precision"
    requires: ClassVar[tuple[str, ...]] = ("annotated", SHAPES)
    provides: ClassVar[tuple[str, ...]] = ("mixed_precision",)
    bit_budget: int = 4
    candidates: tuple[int, ...] = (2, 3, 4, 6, 8)
    max_images: int = 32

    def __post_init__(self):
        if self.bit_budget not in self.candidates:
            raise ConfigError(f"mixed_precision: bit_budget={self.bit_budget} must be one of the candidate widths "
                              f"{list(self.candidates)} (the size of the uniform model of that width)")
        if any(not 2 <= b <= 8 for b in self.candidates):
            raise ConfigError(f"mixed_precision: candidate widths must be in 2..8, got {list(self.candidates)}")

    # -- items -----------------------------------------------------------------------------------
    def _items(self, gm: fx.GraphModule) -> tuple[list[tuple], list[tuple]]:
        """``(weights, activations)`` to choose widths for: weights ``(node, size)``, activations
        ``(producer, spec, [(consumer, arg)], size)``. Uniform and log specs are searched; a BitLog2
        spec (4 bits by definition) must sit at the budget, or the uniform model is not the reference."""
        weights, groups = [], {}
        for node in gm.graph.nodes:
            spec = weight_spec(node)
            if spec is not None and node.op == "call_module":
                weights.append((node, gm.get_submodule(node.target).weight.numel()))
            for arg, spec in sorted(input_specs(node).items()):
                groups.setdefault((node.args[arg], spec), []).append((node, arg))
        acts = []
        for (src, spec), uses in groups.items():
            if spec.scheme == "bitlog2":
                if spec.bits != self.bit_budget:
                    raise PassError(f"mixed_precision: '{uses[0][0].name}' input {uses[0][1]} is BitLog2 (4 bits, fixed); "
                                    f"use bit_budget=4 with BitLog2 attention")
                continue
            acts.append((src, spec, uses, _numel(src)))
        return weights, acts

    def _apply(self, weights, acts, w_bits: list[int], a_bits: list[int]) -> None:
        for (node, _), b in zip(weights, w_bits):
            set_weight_spec(node, weight_spec(node).with_(bits=b))
        for (_, spec, uses, _), b in zip(acts, a_bits):
            for node, arg in uses:
                set_input_spec(node, arg, spec.with_(bits=b))

    # -- the pass --------------------------------------------------------------------------------
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        weights, acts = self._items(gm)
        if not weights and not acts:
            raise PassError("mixed_precision: nothing is annotated with a uniform spec; run it after annotate_uniform")
        if ctx.replay:
            rec = ctx.record()
            self._apply(weights, acts, rec["weight_bits"], rec["act_bits"])
            return PassResult(gm, summary="replayed bit widths", record=rec)
        calib = ctx.require_calib(self.name)
        kl_w, kl_a = self._sensitivities(gm, weights, acts, ctx, calib)
        w_bits = self._solve([s for _, s in weights], kl_w)
        a_bits = self._solve([s for *_, s in acts], kl_a)
        self._apply(weights, acts, w_bits, a_bits)
        w_total = sum(s for _, s in weights)
        a_total = sum(s for *_, s in acts)
        mean_w = sum(b * s for b, (_, s) in zip(w_bits, weights)) / max(w_total, 1)
        mean_a = sum(b * s for b, (*_, s) in zip(a_bits, acts)) / max(a_total, 1)
        record = {
            "bit_budget": self.bit_budget, "candidates": list(self.candidates),
            "weight_bits": w_bits, "act_bits": a_bits,
            "weights": {str(n.target): b for (n, _), b in zip(weights, w_bits)},
            "activations": {f"{src.name}->{uses[0][0].name}": b for (src, _, uses, _), b in zip(acts, a_bits)},
            "mean_weight_bits": round(mean_w, 4), "mean_act_bits": round(mean_a, 4),
            "kl_weights": kl_w, "kl_acts": kl_a,
        }
        hist = {b: w_bits.count(b) for b in self.candidates}
        return PassResult(gm, summary=f"budget {self.bit_budget} bits: weights {hist} (mean {mean_w:.2f}), activations "
                                      f"{ {b: a_bits.count(b) for b in self.candidates} } (mean {mean_a:.2f})", record=record)

    def _solve(self, sizes: list[int], kl: list[list[float]]) -> list[int]:
        if not sizes:
            return []
        costs = [[s * b for b in self.candidates] for s in sizes]
        uniform = [self.candidates.index(self.bit_budget)] * len(sizes)
        units, budget = knapsack_units(costs, uniform, MAX_UNITS)
        picks = solve_allocation(units, kl, budget, what="mixed_precision (bit budget)")
        return [self.candidates[j] for j in picks]

    def _sensitivities(self, gm, weights, acts, ctx, calib) -> tuple[list[list[float]], list[list[float]]]:
        images = [b[0] if isinstance(b, (tuple, list)) else b for b in calib.limited(self.max_images)]
        kl_w = [[0.0] * len(self.candidates) for _ in weights]
        kl_a = [[0.0] * len(self.candidates) for _ in acts]
        for j, bits in enumerate(tqdm(self.candidates, desc="mixed_precision", disable=not ctx.progress, leave=False)):
            trial = copy.deepcopy(gm)
            names = {n.name: n for n in trial.graph.nodes}
            t_w = [(names[n.name], s) for n, s in weights]
            t_a = [(names[src.name], spec, [(names[u.name], a) for u, a in uses], s) for src, spec, uses, s in acts]
            self._apply(t_w, t_a, [bits] * len(t_w), [bits] * len(t_a))
            trial, _ = PassManager([InsertQuantizers(), Calibrate(max_images=self.max_images)]).run(trial, ctx.nested())
            modules = dict(trial.named_modules())
            w_q = [modules[str(n.target)].weight_fake_quant for n, _ in t_w]  # every weight spec became a Quant* layer
            by_use = {}
            for n in trial.graph.nodes:
                if n.op == "call_module" and isinstance(modules.get(n.target), FakeQuantize) and QUANTIZER in n.meta:
                    for use in n.meta[QUANTIZER]["uses"]:
                        by_use[tuple(use)] = modules[n.target]
            a_q = [by_use[(uses[0][0].name, uses[0][1])] for _, _, uses, _ in t_a]
            _, effects = isolated_kl(trial, [[q] for q in w_q + a_q], images)
            kls = [kl for kl, _ in effects]
            for row, kl in zip(kl_w + kl_a, kls):  # weights first, then activations, as the groups
                row[j] = kl
        return kl_w, kl_a


__all__ = ["MixedPrecision"]
