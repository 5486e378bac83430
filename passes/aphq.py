"""APHQ-ViT (Wu et al., CVPR 2025; docs/methods.md, APHQ-ViT) as graph passes: stage (A), MLP reconstruction.

``mlp_reconstruct`` runs on the *float* graph, before any annotation. It finds every MLP from
structure (``match.find_mlps``: Linear → GELU → Linear feeding a residual add, inside a block of
``match.find_blocks``; GELU as ``nn.GELU`` or a ``gelu`` call), replaces GELU by ReLU in the graph
and, block by block and independently, trains that block's ``fc1``/``fc2`` weights and biases (the
rest of the model is frozen) so that the ReLU MLP reproduces the GELU MLP on the FP model's
``fc1`` inputs::

    L        = L_direct + 2·L_clamp
    L_direct = mean((O_relu − O_gelu)² ⊙ Ĥ) / 10
    L_clamp  = the same with the fc2 input clamped to [0, ub]

``Ĥ`` is the Average Perturbation Hessian (``fxquant.core.aph``) of the residual add the MLP
output enters (the block output in ViT/DeiT/HF ViT: a perturbation of the MLP output is the same
perturbation of that add), rescaled to unit RMS. By default the APH perturbs along a seeded random
±1 pattern (``aph_direction="rademacher"``): the paper's all-ones direction is a null direction of
pre-LN transformers (LayerNorm ignores a per-token constant), so in float64 it measures roundoff
(``fxquant.core.aph``). ``ub`` is the ``ub_quantile`` quantile of the
*positive* FP post-GELU values (0.98 in the reference's 4-bit config, 0.99 in its 3-bit config and
in the paper). The reference sums the squared error over tokens (``Σ_tokens mean_{B,C}``); the mean
used here differs by the constant factor N, which Adam's update ignores (up to its ε).

``annotate_aphq`` is stage (B)'s annotation (after ``annotate_uniform``): uniform asymmetric
quantizers *per head* on both operands of both attention matmuls (q, kᵀ, A, v: axis 1 of the
``[B, H, ·, ·]`` operands) in place of per-tensor ones, and no log quantizer. The rest of stage
(B) is composed from existing passes by the ``aphq-*`` recipes: the ``JointGrid`` range estimator
of the quantizer core (joint scale/zero-point grid), ``annotate_repq`` for the 8-bit
patch-embedding input and, when ``a_bits == w_bits``, the LayerNorm reparameterization with a
rounded target zero point followed by a re-search (``repq_reparam(recalibrate=True)``). Stage (C)
is ``passes.block_recon.BlockReconstruct``.

Where stage (B) differs from the reference: the grid candidates are scored by the quantization MSE
of the quantized tensor itself (streamed histograms, so calibration memory does not grow with the
images), not by the MSE of the layer output with alternating weight/activation rounds; the
attention operands use the same joint grid as every activation, not the reference's separate
129-point upper/lower search. Stage (C) then trains the rounding and the activation scales
against the block outputs, which is where the output error is minimised.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from fxquant.core import match
from fxquant.core.aph import APH_DIRECTIONS, average_perturbation_hessian
from fxquant.core.calibration import Calibration
from fxquant.core.errors import ConfigError, PassError
from fxquant.core.graph import extract_subgraph, input_values, subgraph_args
from fxquant.core.meta import INPUT_SPECS, WEIGHT_SPEC, input_specs, set_input_spec
from fxquant.core.pipeline import SHAPES, Pass, PassContext, PassResult, register_pass
from fxquant.core.quant import FakeQuantize, Observer, PerAxis, Percentile, PerTensor, QuantConv2d, QuantLinear, QuantSpec

_PLACE_IT = ("place it before any annotation: passes=[MLPReconstruct(), AnnotateUniform(...), ...] or "
             "Stage(MLPReconstruct(), before='annotate_uniform')")


def _check_float_graph(gm: fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        if INPUT_SPECS in n.meta or WEIGHT_SPEC in n.meta:
            raise PassError(f"mlp_reconstruct runs on the float graph, but node '{n.name}' is already annotated for "
                            f"quantization; {_PLACE_IT}")
    for name, m in gm.named_modules():
        if isinstance(m, (FakeQuantize, QuantLinear, QuantConv2d)):
            raise PassError(f"mlp_reconstruct runs on the float graph, but module '{name}' ({type(m).__name__}) is a "
                            f"quantizer; {_PLACE_IT}")


def find_gelu_mlps(gm: fx.GraphModule, modules: dict) -> list[match.MLPMatch]:
    """The GELU MLPs of ``gm``; a PassError naming the node when a block's GELU is not one."""
    blocks = match.find_blocks(gm, modules)
    if not blocks:
        raise PassError("mlp_reconstruct: found no transformer block (one attention softmax → A·v, a GELU MLP and "
                        ">= 4 Linear layers in one module, match.find_blocks); MLP reconstruction needs a ViT-style "
                        "graph captured with example inputs (shapes)")
    mlps = match.find_mlps(gm, modules, blocks)
    for m in mlps:
        if not m.legal:
            raise PassError(f"mlp_reconstruct: GELU node '{m.act.name}' in block '{m.block.fqn}' is not a "
                            f"Linear → GELU → Linear MLP feeding a residual add: {m.reason}. Only such MLPs can be "
                            f"reconstructed; leave this model out of mlp_reconstruct")
    if not mlps:
        relu = match.find_mlps(gm, modules, blocks, acts=("relu",))
        hint = (" (their MLPs already use ReLU: was mlp_reconstruct run twice?)" if relu
                else "; MLP reconstruction needs Linear → GELU → Linear MLPs")
        raise PassError(f"mlp_reconstruct: no GELU MLP in the {len(blocks)} blocks found "
                        f"({[b.fqn for b in blocks][:4]}{' ...' if len(blocks) > 4 else ''}){hint}")
    return mlps


def swap_gelu_to_relu(gm: fx.GraphModule, acts: list[fx.Node], modules: dict) -> None:
    """Replace each GELU node of ``acts`` by ReLU: an ``nn.GELU`` module by ``nn.ReLU`` at the same
    path (a fresh ``<path>_relu`` module when the GELU module is also called elsewhere), a ``gelu``
    call by ``relu`` at the same level (``aten.relu`` in ATen graphs, else ``F.relu``)."""
    swapped = set(acts)
    for act in acts:
        if act.op == "call_module":
            others = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == act.target and n not in swapped]
            if others:
                target = f"{act.target}_relu".replace(".", "_")
                gm.add_submodule(target, nn.ReLU())
                act.target = target
            else:
                parent, _, leaf = str(act.target).rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, leaf, nn.ReLU())
        else:
            relu = torch.ops.aten.relu.default if isinstance(act.target, torch._ops.OpOverload) else F.relu
            with gm.graph.inserting_before(act):
                new = gm.graph.call_function(relu, (act.args[0],))
            new.meta = dict(act.meta)
            act.replace_all_uses_with(new)
            gm.graph.erase_node(act)
    gm.recompile()


def _activation(gm: fx.GraphModule, act: fx.Node) -> Callable[[torch.Tensor], torch.Tensor]:
    """The FP activation of node ``act`` as a function of its tensor input."""
    if act.op == "call_module":
        return gm.get_submodule(str(act.target))
    extra, kwargs = act.args[1:], dict(act.kwargs)
    return lambda t: act.target(t, *extra, **kwargs)


def _cache_inputs(gm: fx.GraphModule, node: fx.Node, calib: Calibration, max_images: int | None) -> torch.Tensor:
    """The values of ``node`` for the first ``max_images`` calibration images, concatenated."""
    prefix = extract_subgraph(gm, [], [node])
    out = []
    with torch.no_grad():
        for batch in calib.limited(max_images):
            out.append(prefix(*subgraph_args(prefix, input_values(gm, batch))).detach())
    if not out:
        raise PassError("mlp_reconstruct: the calibration data is empty (no batches); pass calib=<batches of images>")
    return torch.cat(out)


def _positive_quantile(xs: torch.Tensor, fc1: nn.Module, act: Callable, q: float, chunk: int) -> tuple[float, float]:
    """``(Q_q, max)`` of the positive values of ``act(fc1(x))`` over the cached inputs, streamed
    chunk by chunk through the project's histogram observer (power-of-two aligned bins; the
    quantile is exact to within one bin, at most 2·max/16384)."""
    obs = Observer(QuantSpec(estimator=Percentile()))
    with torch.no_grad():
        for i in range(0, xs.shape[0], chunk):
            h = act(fc1(xs[i:i + chunk]))
            pos = h[h > 0]
            if pos.numel():
                obs.update(pos)
    if obs.empty:
        return 0.0, 0.0
    return float(obs.distribution().quantile(q)[0]), float(obs.vmax[0])


@register_pass
@dataclass(frozen=True)
class MLPReconstruct(Pass):
    """APHQ-ViT (A): GELU → ReLU with fc1/fc2 retrained per block on the FP model's MLP inputs.

    See the module docstring for the loss. Per block: the block's fc1 inputs are cached for
    ``max_images`` calibration images (the pass's memory: for the CIFAR ViT, 65 tokens × 128
    channels × 4 B = 33,280 B per image, 34.1 MB for 1,024 images; the FP targets are recomputed
    per batch, not stored); ``ub`` is streamed from those inputs; the APH is computed on the first
    ``aph_images`` images (float64 tail, ``fxquant.core.aph``); then ``iters`` Adam steps (lr
    ``lr``, cosine to 0) on batches of ``batch_size`` images drawn without replacement from the
    cache by a generator seeded from ``ctx.seed`` and the block index, so a run is bit-reproducible.
    Every block trains on FP (GELU) inputs; the trained weights and the swap are applied at the
    end. Replaying an artifact only swaps GELU → ReLU; the weights come from the saved tensors.

    Args:
        iters: Adam steps per block (the paper and reference: 20000; the default 400 is a CPU budget:
            about 70 s for the 6-block CIFAR ViT on 2 cores, 0.024 s per step).
            0: the plain GELU → ReLU swap (nothing is computed).
        lr: Adam learning rate (reference 4e-5), cosine-annealed to 0 over ``iters``.
        batch_size: images per step (reference 32).
        max_images: calibration images cached per block (reference 1024; None: all).
        ub_quantile: quantile of the positive FP post-GELU values that bounds L_clamp (reference
            4-bit config 0.98; 3-bit config and paper 0.99).
        clamp_weight: weight of L_clamp (reference 2).
        aph_images: images for the APH (None: all the cached ones).
        aph_direction: ``"rademacher"`` (default: perturbation along a seeded random ±1 pattern,
            ``|H·r|``) or ``"ones"`` (the paper's ``|H·1|``, which is exactly zero in pre-LN
            transformers in exact arithmetic, so its float64 value is roundoff noise: see
            ``fxquant.core.aph``).
        use_aph: weight the loss by the APH (False: Ĥ = 1, plain MSE).
    """

    name = "mlp_reconstruct"
    requires = (SHAPES,)
    provides = ("mlp_reconstructed",)

    iters: int = 400
    lr: float = 4e-5
    batch_size: int = 32
    max_images: int | None = 1024
    ub_quantile: float = 0.98
    clamp_weight: float = 2.0
    aph_images: int | None = 128
    aph_direction: str = "rademacher"
    use_aph: bool = True

    def __post_init__(self):
        checks = [
            (self.iters >= 0, f"iters must be >= 0, got {self.iters}"),
            (self.lr >= 0, f"lr must be >= 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.max_images is None or self.max_images >= 1, f"max_images must be >= 1 or None, got {self.max_images}"),
            (0.0 < self.ub_quantile <= 1.0, f"ub_quantile must be in (0, 1] (reference 0.98 or 0.99), got {self.ub_quantile}"),
            (self.clamp_weight >= 0, f"clamp_weight must be >= 0, got {self.clamp_weight}"),
            (self.aph_images is None or self.aph_images >= 1, f"aph_images must be >= 1 or None, got {self.aph_images}"),
            (self.aph_direction in APH_DIRECTIONS, f"aph_direction must be one of {APH_DIRECTIONS}, got {self.aph_direction!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"mlp_reconstruct: {msg}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        _check_float_graph(gm)
        modules = match.modules_of(gm)
        mlps = find_gelu_mlps(gm, modules)
        acts = [m.act for m in mlps]
        if ctx.replay:
            swap_gelu_to_relu(gm, acts, modules)
            return PassResult(gm, summary=f"replayed the GELU→ReLU swap of {len(mlps)} MLPs", record=ctx.record())
        blocks: dict[str, dict] = {}
        if self.iters > 0:
            calib = ctx.require_calib(self.name)
            if calib.is_loop:
                raise PassError("mlp_reconstruct needs calib as an iterable of batches (it caches each block's MLP "
                                "inputs itself), not a forward_loop callable")
            trained = []
            for idx, m in enumerate(mlps):
                rec, params = self._reconstruct(gm, m, calib, ctx, idx)
                blocks[m.block.fqn] = rec
                trained.append(params)
            with torch.no_grad():
                for m, params in zip(mlps, trained):
                    for node, src in zip((m.fc1, m.fc2), params):
                        dst = gm.get_submodule(str(node.target))
                        dst.weight.copy_(src.weight)
                        if dst.bias is not None:
                            dst.bias.copy_(src.bias)
        swap_gelu_to_relu(gm, acts, modules)
        if blocks:
            first = sum(r["loss_first"] for r in blocks.values()) / len(blocks)
            last = sum(r["loss_last"] for r in blocks.values()) / len(blocks)
            summary = (f"{len(mlps)} MLPs GELU→ReLU, {self.iters} iters each; mean loss {first:.4g} → {last:.4g}; "
                       "ub " + ", ".join(f"{r['ub']:.3g}" for r in blocks.values()))
        else:
            summary = f"{len(mlps)} MLPs GELU→ReLU (iters=0: plain swap)"
        return PassResult(gm, summary=summary, record={"swapped": [a.name for a in acts], "blocks": blocks})

    def _reconstruct(self, gm: fx.GraphModule, m: match.MLPMatch, calib: Calibration, ctx: PassContext,
                     idx: int) -> tuple[dict, tuple[nn.Linear, nn.Linear]]:
        """Train a copy of one block's fc1/fc2; returns its record and the trained copies."""
        t0 = time.perf_counter()
        fc1_fp, fc2_fp = gm.get_submodule(str(m.fc1.target)), gm.get_submodule(str(m.fc2.target))
        act = _activation(gm, m.act)
        xs = _cache_inputs(gm, m.fc1.args[0], calib, self.max_images)
        ub, fp_max = _positive_quantile(xs, fc1_fp, act, self.ub_quantile, self.batch_size)
        t_cache = time.perf_counter()
        with torch.no_grad():
            out_shape = tuple(fc2_fp(act(fc1_fp(xs[:1]))).shape[1:])
        if self.use_aph:
            h = average_perturbation_hessian(gm, m.residual, calib, max_images=self.aph_images, direction=self.aph_direction,
                                             seed=ctx.seed, progress=ctx.progress)
            if tuple(h.shape) != out_shape:
                raise PassError(f"mlp_reconstruct: the APH of '{m.residual.name}' has shape {tuple(h.shape)} but the MLP "
                                f"output of '{m.fc2.name}' has {out_shape}; set use_aph=False for this model")
            rms = h.pow(2).mean().sqrt()
            h_hat = (h / rms).float() if rms > 0 else torch.ones(out_shape)
            aph_rms = float(rms)
        else:
            h_hat, aph_rms = torch.ones(out_shape), None
        t_aph = time.perf_counter()
        fc1, fc2 = copy.deepcopy(fc1_fp), copy.deepcopy(fc2_fp)
        params = [p for mod in (fc1, fc2) for p in mod.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.iters, eta_min=0.0)
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + idx)
        n = xs.shape[0]
        losses = []
        bar = tqdm(range(self.iters), desc=f"mlp_reconstruct {m.block.fqn}", disable=not ctx.progress, leave=False)
        with torch.enable_grad():
            for it in bar:
                x = xs[torch.randperm(n, generator=gen)[:self.batch_size]]
                with torch.no_grad():
                    target = fc2_fp(act(fc1_fp(x)))
                pre = fc1(x)
                direct = ((fc2(torch.relu(pre)) - target) ** 2 * h_hat).mean() / 10
                clamped = ((fc2(pre.clamp(0.0, ub)) - target) ** 2 * h_hat).mean() / 10
                loss = direct + self.clamp_weight * clamped
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if it == 0 or it == self.iters - 1 or it % 10 == 0:
                    losses.append(loss.item())
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", it=it)
        for p in params:
            p.requires_grad_(False)
        t_end = time.perf_counter()
        rec = {"fc1": m.fc1.name, "fc2": m.fc2.name, "act": m.act.name, "residual": m.residual.name, "images": n,
               "ub": ub, "fp_max": fp_max, "aph_rms": aph_rms, "loss_first": losses[0], "loss_last": losses[-1],
               "seconds": {"cache": round(t_cache - t0, 3), "aph": round(t_aph - t_cache, 3),
                           "train": round(t_end - t_aph, 3)}}
        return rec, (fc1, fc2)


@register_pass
@dataclass(frozen=True)
class AnnotateAPHQ(Pass):
    """APHQ-ViT (B) attention quantizers: uniform, asymmetric, one scale per head on q, kᵀ, A and v.

    Rewrites the specs ``annotate_uniform`` put on the attention matmul operands: same bits and
    estimator, ``PerAxis(1)`` (the head axis of ``[B, H, N, d]`` operands), uniform (a log scheme
    chosen by an earlier pass is replaced). An operand that is not 4-D with more than one head
    (e.g. a ``[B·H, N, d]`` layout) keeps a per-tensor quantizer; the record lists those.

    Args:
        per_head: one scale per head (False: per tensor, the paper's text).
    """

    name = "annotate_aphq"
    requires = ("annotated", SHAPES)
    provides = ("aphq_annotated",)

    per_head: bool = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modules = match.modules_of(gm)
        n_head, per_tensor = 0, []
        for att in match.find_attention(gm, modules):
            operand_specs = [*input_specs(att.qk).values(), *input_specs(att.av).values()]
            ref = next((s for s in operand_specs if s.scheme == "uniform"), None)
            for mm in (att.qk, att.av):
                for arg, spec in sorted(input_specs(mm).items()):
                    shape = match.tensor_shape(mm.args[arg]) if isinstance(mm.args[arg], fx.Node) else None
                    if spec.scheme != "uniform":  # e.g. annotate_repq's log√2 softmax output
                        if ref is None:
                            raise PassError(f"annotate_aphq: attention matmul '{mm.name}' has no uniform operand spec to "
                                            f"copy; run annotate_uniform(quantize_attention=True) first")
                        spec = ref.with_(bits=spec.bits)
                    if self.per_head and shape is not None and len(shape) == 4 and shape[1] > 1:
                        set_input_spec(mm, arg, spec.with_(granularity=PerAxis(1)))
                        n_head += 1
                    else:
                        set_input_spec(mm, arg, spec.with_(granularity=PerTensor()))
                        per_tensor.append(f"{mm.name}:{arg}")
        return PassResult(gm, modified=False,
                          summary=f"{n_head} attention operands per head, {len(per_tensor)} per tensor",
                          record={"per_head": n_head, "per_tensor": per_tensor})
