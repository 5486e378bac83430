"""IGQ-ViT (Moon et al., CVPR 2024; docs/methods.md, IGQ-ViT): group quantization of activations.

``GroupQuant`` (``group_quant``) re-annotates, after ``annotate_uniform``, the input of every
Linear and (optionally) the softmax output of every attention:

* ``mode="instance"`` (IGQ-ViT): ``InstanceGroups(G)``. Per input instance (an image), each
  channel is assigned to the narrowest group quantizer whose range covers the channel's own
  ``[min, max]`` over the tokens (``quant.instance_groups``: the paper says "nearest range"; nearest
  in squared distance clips channels whose range is lopsided, and doubled the KL to the float
  predictions on the CIFAR ViT); the softmax output gets ``InstanceGroups(G, axis=-2,
  instance_dims=2)``: per (image, head), each attention *row* is assigned to a group by its range
  over the keys. The group (scale, zero point) pairs are **static**: calibrated once by k-means
  over the per-instance ranges of the calibration data (``quant.range_search.kmeans_ranges``),
  then each group's range from its members' ranges (0.01/0.99 quantiles; the envelope for a
  classifier head's ``[B, C]`` input, one value per channel), only the assignment is recomputed per
  instance. Our reading of the paper: the quantizers are
  "group-specific" and calibrated, and the paper's cost analysis counts the assignment as the
  dynamic part; docs/methods.md (IGQ-ViT) lists this as unverified (no official code). Cost at inference: a
  min/max reduction of the input per instance and ``G`` comparisons per channel (row),
  then a GEMM whose partial sums per group are rescaled: ``Y = Σ_g s_g (Q_g − z_g) W_gᵀ`` with
  ``W_g`` the weight columns of the channels in group ``g`` (``kernels.grouped_linear``).
  For A·v the per-row scales factor out of the product, so row groups cost no extra GEMM work.
* ``mode="contiguous"`` (the transformer-quantization platform's grouping): ``PerGroup(C // G)``
  on each Linear input, channel blocks ``[0, C/G)``, ``[C/G, 2C/G)``, … with static parameters
  from the recipe's range estimator; ``C % G`` must be 0. Attention rows are left as annotated.

A Linear input whose spec is finer than per tensor when ``group_quant`` runs (RepQ-ViT's
per-channel LayerNorm sites, after ``annotate_repq``) is kept: ``repq-igq-w4a4`` folds those and
groups the rest.

``AllocateGroups`` (``allocate_groups``) then chooses ``G`` per quantizer (IGQ-ViT's group size
allocation): for every group quantizer and candidate ``G`` it calibrates that quantizer alone at
``G`` (weights quantized, other activations float: what a parallel ``calibrate`` sees, so a
candidate equal to the calibrated ``G`` gets the same parameters) and measures the discrepancy
``KL(p_fp ‖ p_q)`` between the float model's predictions and those of the model in which the
weights and only that activation quantizer are on, on ``max_images`` calibration images; a
multiple-choice knapsack (exact dynamic programme) then minimises the summed discrepancy under a
bit-operation budget equal to every quantizer at ``budget_groups`` (8). The BOPs that depend on
``G`` are the group rescales (``G`` 32-bit multiply-adds per output of a grouped Linear) and, for
attention rows, the assignment (``G`` 32-bit compares per row); the integer GEMM BOPs
(``MACs·b_w·b_a``) do not depend on ``G`` and are reported, not budgeted.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from fxquant.core import match
from fxquant.core.batches import call_model
from fxquant.core.calibration import Calibration
from fxquant.core.errors import ConfigError, PassError
from fxquant.core.graph import logits_of
from fxquant.core.knapsack import knapsack_units, solve_allocation
from fxquant.core.meta import ROLE, input_specs, set_input_spec
from fxquant.core.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.core.quant import (
    FakeQuantize,
    InstanceGroups,
    MinMax,
    Percentile,
    PerGroup,
    PerTensor,
    QuantSpec,
    quantizer_state,
    quantizers,
)

from .calibrate import act_quantizers, observe

GROUP_MODES = ("instance", "contiguous")
BOP_ACC_BITS = 32  # a group rescale is one 32-bit multiply-add per output; a row assignment one 32-bit compare


def _selected(fqn: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(fqn, g) or fnmatch.fnmatchcase(fqn, g + ".*") for g in globs)


# a group's range: the 0.99 quantile of its members' per-instance maxima (and 0.01 of the minima)
GROUP_RANGE = Percentile(0.99)


def channel_group_spec(spec: QuantSpec, num_groups: int, mode: str, channels: int, where: str, *,
                       tokens: bool = True) -> QuantSpec:
    """``spec`` with ``num_groups`` channel groups on the last axis (``mode`` instance/contiguous).
    ``tokens=False`` (a classifier head's ``[B, C]`` input: one value per channel and instance) takes
    each group's full envelope: there a 0.99 quantile would clip the largest values outright."""
    if mode == "instance":
        return spec.with_(granularity=InstanceGroups(num_groups), estimator=GROUP_RANGE if tokens else MinMax())
    if channels % num_groups:
        raise ConfigError(f"{where}: {channels} channels do not split into {num_groups} contiguous groups "
                          f"(C % G must be 0); pick G dividing {channels} or use mode='instance'")
    return spec.with_(granularity=PerGroup(channels // num_groups, axis=-1))


def row_group_spec(spec: QuantSpec, num_groups: int) -> QuantSpec:
    """Instance-aware groups of attention rows (per image and head, ranges over the keys)."""
    return spec.with_(scheme="uniform", symmetric=False, granularity=InstanceGroups(num_groups, axis=-2, instance_dims=2),
                      estimator=GROUP_RANGE, fit_bits=False, bitlog2_variant="", zero_in_range=True, integer_zero_point=True)


@register_pass
@dataclass(frozen=True)
class GroupQuant(Pass):
    """IGQ-ViT: G static group quantizers on every Linear input (instance-aware or contiguous) and on attention rows.

    Args:
        num_groups: G, the number of groups per quantizer (1 = layer-wise).
        mode: ``"instance"`` (IGQ-ViT: channels assigned to groups per input instance) or
            ``"contiguous"`` (fixed channel blocks, ``C % G == 0``).
        attention_rows: instance mode only: row groups on every softmax output (A of A·v).
        layers: FQN globs of the Linears to group (default: every Linear whose input quantizer is
            per tensor; a finer spec from an earlier pass, e.g. RepQ-ViT's per-channel LayerNorm
            sites, is kept, so ``group_quant`` after ``annotate_repq`` groups the other inputs).
        skip: FQN globs left as annotated.
        stem_input_bits: bits of the patch-embedding input (the pixels), as RepQ-ViT keeps it;
            None leaves it as annotated.
    """

    name = "group_quant"
    requires = ("annotated",)
    num_groups: int = 8
    mode: str = "instance"
    attention_rows: bool = True
    layers: tuple[str, ...] = ("*",)
    skip: tuple[str, ...] = ()
    stem_input_bits: int | None = 8

    def __post_init__(self):
        if self.mode not in GROUP_MODES:
            raise ConfigError(f"group_quant: mode must be one of {list(GROUP_MODES)}, got {self.mode!r}")
        if self.num_groups < 1:
            raise ConfigError(f"group_quant: num_groups must be >= 1, got {self.num_groups}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modules = match.modules_of(gm)
        stems = set(match.stem_layers(gm, modules))
        heads = set(match.head_layers(gm, modules))
        n_lin = n_rows = n_kept = 0
        for node in gm.graph.nodes:
            spec = input_specs(node).get(0)
            if spec is None or node.op != "call_module":
                continue
            mod = modules[node.target]
            fqn = match.node_fqn(node)
            if node in stems:
                if self.stem_input_bits is not None and isinstance(mod, (nn.Conv2d, nn.Linear)):
                    set_input_spec(node, 0, spec.with_(bits=self.stem_input_bits))
                continue
            if not isinstance(mod, nn.Linear) or not _selected(fqn, self.layers) or _selected(fqn, self.skip):
                continue
            if spec.scheme != "uniform":
                raise PassError(f"group_quant: the input of '{fqn}' has a {spec.scheme!r} quantizer; group quantization "
                                f"is uniform (run group_quant right after annotate_uniform)")
            if not isinstance(spec.granularity, PerTensor):  # another method's finer spec (RepQ's LN sites): keep it
                n_kept += 1
                continue
            set_input_spec(node, 0, channel_group_spec(spec, self.num_groups, self.mode, mod.in_features,
                                                       f"group_quant: Linear '{fqn}'", tokens=node not in heads))
            n_lin += 1
        if self.attention_rows and self.mode == "instance":
            for att in match.find_attention(gm, modules):
                spec = input_specs(att.av).get(0)
                if spec is None or _selected(match.node_fqn(att.softmax), self.skip):
                    continue
                set_input_spec(att.av, 0, row_group_spec(spec, self.num_groups))
                att.av.meta.setdefault(ROLE, "attn.av")
                n_rows += 1
        if n_lin == 0:
            raise PassError("group_quant: no Linear input quantizer to group; run annotate_uniform first "
                            f"(layers={list(self.layers)}, skip={list(self.skip)})")
        return PassResult(gm, modified=False,
                          summary=f"{n_lin} Linear inputs in {self.num_groups} {self.mode} groups"
                                  + (f", {n_rows} attention maps in row groups" if n_rows else "")
                                  + (f"; {n_kept} Linear inputs with a finer spec kept" if n_kept else ""),
                          record={"linear_inputs": n_lin, "attention_rows": n_rows, "kept": n_kept, "num_groups": self.num_groups,
                                  "mode": self.mode})


# ---------------------------------------------------------------------------------------------
# Group size allocation
# ---------------------------------------------------------------------------------------------


def group_quantizers(gm: fx.GraphModule) -> list[tuple[str, FakeQuantize]]:
    """Activation quantizers with channel/row groups (``InstanceGroups`` or ``PerGroup``)."""
    return [(n, q) for n, q in act_quantizers(gm) if isinstance(q.spec.granularity, (InstanceGroups, PerGroup))]


def with_groups(spec: QuantSpec, num_groups: int, channels: int) -> QuantSpec:
    """``spec`` regrouped into ``num_groups`` groups (same mode and axis)."""
    g = spec.granularity
    if isinstance(g, InstanceGroups):
        return spec.with_(granularity=InstanceGroups(num_groups, axis=g.axis, instance_dims=g.instance_dims))
    if channels % num_groups:
        raise ConfigError(f"{channels} channels do not split into {num_groups} contiguous groups")
    return spec.with_(granularity=PerGroup(channels // num_groups, axis=g.axis))


def _linear_out_features(gm: fx.GraphModule, qname: str) -> int:
    """Summed ``out_features`` of the Linears reading quantizer ``qname`` (HF's q/k/v share one)."""
    modules = match.modules_of(gm)
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == qname), None)
    if node is None:
        return 0
    return sum(modules[u.target].out_features for u in node.users
               if u.op == "call_module" and isinstance(modules.get(u.target), nn.Linear))


@register_pass
@dataclass(frozen=True)
class AllocateGroups(Pass):
    """IGQ-ViT: the group count G of each quantizer (measured KL, exact knapsack) under the BOPs of a uniform G.

    Args:
        candidates: group counts to choose from per quantizer (contiguous mode: those dividing C).
        budget_groups: the budget is the BOPs of every group quantizer at this G (8 in the paper).
        max_images: calibration images for the per-quantizer calibration and discrepancy.
        max_budget_units: the DP's resolution (``knapsack_units``); coarser costs are rounded *up*,
            so the budget holds and the uniform allocation stays feasible.
    """

    name = "allocate_groups"
    requires = ("calibrated",)
    candidates: tuple[int, ...] = (1, 2, 4, 8, 16)
    budget_groups: int = 8
    max_images: int | None = 32
    max_budget_units: int = 200_000

    def __post_init__(self):
        try:
            cands = tuple(sorted({int(c) for c in self.candidates}))
        except (TypeError, ValueError):
            cands = ()
        if not cands or cands[0] < 1:
            raise ConfigError(f"allocate_groups: candidates must be group counts >= 1, got {self.candidates}")
        object.__setattr__(self, "candidates", cands)  # "1,2,4" from the command line arrives as strings
        if self.budget_groups not in cands:
            raise ConfigError(f"allocate_groups: budget_groups={self.budget_groups} must be one of the candidates {list(cands)} "
                              f"(the uniform allocation is then always within budget)")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites = group_quantizers(gm)
        if not sites:
            raise PassError("allocate_groups: no group quantizers in the graph; run group_quant before calibrate")
        if ctx.replay:
            chosen = ctx.record().get("groups", {})
            for name, q in sites:
                if name in chosen:
                    q.spec = with_groups(q.spec, int(chosen[name]), self._channels(q))
            return PassResult(gm, modified=False, summary="replayed (group counts from artifact)", record=ctx.record())
        calib = ctx.require_calib(self.name)
        batches = list(calib.limited(self.max_images))
        shapes = self._input_shapes(gm, [q for _, q in sites], batches[0])
        everything = [m for _, m in quantizers(gm)]
        saved = {id(q): (q.spec, q.scale, q.zero_point) for q in everything}
        data = Calibration(batches, progress=False)
        try:
            with quantizer_state(everything, fake_quant=False) as enabled:
                with torch.no_grad():
                    fp = [F.log_softmax(logits_of(call_model(gm, b)).float(), dim=-1) for b in batches]
                for q in everything:  # weights quantized from here on, as when calibrate observes activations
                    q.fake_quant_enabled = q.weight and enabled[q]
                items, table = [], []
                for name, q in tqdm(sites, desc="allocate groups", disable=not ctx.progress, leave=False):
                    channels = self._channels(q)
                    instance = isinstance(q.spec.granularity, InstanceGroups)
                    cands = [g for g in self.candidates if instance or channels % g == 0]
                    if self.budget_groups not in cands:
                        raise ConfigError(f"allocate_groups: quantizer '{name}' cannot take the budget's G = "
                                          f"{self.budget_groups} ({channels} channels)")
                    if instance:  # the per-instance ranges do not depend on G: observe once, cluster per candidate
                        observe(gm, [q], data, None)
                        ranges = q.observer
                    per_g = []
                    for g in cands:
                        q.spec = with_groups(saved[id(q)][0], g, channels)
                        if instance:
                            q.set_qparams(*ranges.compute_qparams(num_groups=g))
                        else:
                            observe(gm, [q], data, None)
                            q.compute_qparams()
                        q.fake_quant_enabled = True
                        with torch.no_grad():
                            kl = sum(F.kl_div(F.log_softmax(logits_of(call_model(gm, b)).float(), dim=-1), f, log_target=True,
                                              reduction="sum").item() for b, f in zip(batches, fp))
                        per_g.append((g, kl / sum(f.shape[0] for f in fp), q.scale.clone(), q.zero_point.clone(), q.spec))
                        q.fake_quant_enabled = False
                    q.observer = None
                    items.append((name, q, channels, per_g))
                    table.append({"quantizer": name, "kl": {str(g): round(v, 6) for g, v, *_ in per_g}})
        finally:  # flags are restored by quantizer_state; specs and parameters here
            for q in everything:
                q.spec, q.scale, q.zero_point = saved[id(q)]
        # BOPs that depend on G, per instance: outputs × G rescales (Linear) or rows × G compares (A)
        unit = [self._rescale_outputs(gm, name, q, shapes[id(q)]) for name, q, _, _ in items]
        costs = [[u * g * BOP_ACC_BITS for g, *_ in per_g] for u, (_, _, _, per_g) in zip(unit, items)]
        budget = sum(u * self.budget_groups * BOP_ACC_BITS for u in unit)
        coarse, coarse_budget = knapsack_units(costs, [[g for g, *_ in per_g].index(self.budget_groups)
                                                       for *_, per_g in items], self.max_budget_units)
        choice = solve_allocation(coarse, [[v for _, v, *_ in per_g] for *_, per_g in items], coarse_budget,
                                  what="allocate_groups (BOP budget of the group counts)")
        chosen, used = {}, 0
        for (name, q, _, per_g), j, row in zip(items, choice, costs):
            g, _, scale, zp, spec = per_g[j]
            q.spec = spec
            q.set_qparams(scale, zp)
            q.fake_quant_enabled = True
            chosen[name] = g
            used += row[j]
        assert used <= budget, (used, budget)
        for row, (name, g) in zip(table, chosen.items()):
            row["groups"] = g
        hist = {g: list(chosen.values()).count(g) for g in sorted(set(chosen.values()))}
        return PassResult(gm, modified=False,
                          summary=f"{len(chosen)} quantizers; G histogram {hist}; group BOPs {used:.3g} of budget "
                                  f"{budget:.3g} (G = {self.budget_groups} everywhere)",
                          record={"groups": chosen, "group_bops": used, "budget_bops": budget, "table": table})

    @staticmethod
    def _channels(q: FakeQuantize) -> int:
        """Channels of a contiguous-group quantizer's input (group size × calibrated groups); 0 for
        instance-aware groups, whose candidates do not depend on it."""
        g = q.spec.granularity
        return g.group_size * q.scale.shape[-1] if isinstance(g, PerGroup) else 0

    def _input_shapes(self, gm: fx.GraphModule, qs: list[FakeQuantize], batch) -> dict[int, tuple[int, ...]]:
        shapes: dict[int, tuple[int, ...]] = {}

        def record(mod, inputs, _out) -> None:  # a hook that returns a value would replace the output
            shapes.setdefault(id(mod), tuple(inputs[0].shape))

        hooks = [q.register_forward_hook(record) for q in qs]
        try:
            with torch.no_grad():
                call_model(gm, batch)
        finally:
            for h in hooks:
                h.remove()
        missing = [q.label for q in qs if id(q) not in shapes]
        if missing:
            raise PassError(f"allocate_groups: the calibration data never reached quantizer(s) {missing}")
        return shapes

    @staticmethod
    def _rescale_outputs(gm: fx.GraphModule, name: str, q: FakeQuantize, shape: tuple[int, ...]) -> int:
        """Per instance: outputs of the grouped Linear (each needs ``G`` rescales), or rows of A."""
        g = q.spec.granularity
        per_instance = math.prod(shape[1:])
        if isinstance(g, InstanceGroups) and g.axis in (-2, len(shape) - 2):
            return per_instance // shape[-1]  # rows of A (per image, all heads)
        out = _linear_out_features(gm, name) or shape[-1]
        return per_instance // shape[-1] * out


__all__ = ["GroupQuant", "AllocateGroups",
           "group_quantizers", "channel_group_spec", "row_group_spec"]
