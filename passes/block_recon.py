"""Block reconstruction (APHQ-ViT stage (C), docs/methods.md, APHQ-ViT; BRECQ/QDrop family) as a graph pass.

After calibration, each *region* of the quantized graph is trained, in graph order, to reproduce
the float model's output of that region:

* regions: every transformer block (``match.find_blocks``, the finder QwT uses) and, for every
  weight-quantized layer outside those blocks, the largest enclosing module region that holds no
  block (``match.module_region``): the patch embedding, Swin's PatchMerging, the classifier head;
* per region, ``max_images`` calibration images are cached once: the region input computed by the
  already reconstructed quantized prefix (``X_q``), the float one (``X_fp``, all quantizers off)
  and the float region output ``O`` (the target);
* AdaRound on every enabled uniform weight quantizer of the region
  (``fxquant.core.quant.AdaRoundWeight``: ``floor(W/s) + h(α)``, rectified sigmoid ζ = 1.1, γ = -0.1,
  ``α`` initialised so that ``h(α) = frac(W/s)``), Adam at ``alpha_lr``;
* the region's enabled uniform activation quantizers learn their scales (LSQ gradient through
  the straight-through rounding), Adam at ``scale_lr``, cosine-annealed to 0;
* QDrop: the region input mixes ``X_q`` and ``X_fp`` per element (``X_q`` with probability
  ``drop_prob``), and every activation quantizer of the region keeps its quantized value with
  probability ``drop_prob`` (``FakeQuantize.drop_prob``);
* loss ``L = 2·mean((Ô - O)² ⊙ Ĥ)/L₀ + λ·Σ(1 - |2h(α) - 1|^β)`` with ``Ĥ`` the region output's
  Average Perturbation Hessian (``fxquant.core.aph``, rescaled to mean 1 as in the reference),
  ``L₀`` the first iteration's reconstruction term ("normalisation trick"), ``λ = 0.01`` and ``β``
  annealed linearly 20 → 2 after a warm-up of 20 % of the iterations without the round loss. The
  region that produces the logits uses ``KL(softmax(O) ‖ softmax(Ô))`` instead;
* after the region's last iteration its weights are hard-rounded (``α ≥ 0``) and written back on
  the quantization grid: the layers keep their ordinary ``FakeQuantize``, which reproduces those
  weights exactly, so the model exports and lowers like any other fake-quant model.

Quantizers that are off stay off and are not trained: with every quantizer off the pass leaves the
model unchanged. Regions are trained on the region's own cached inputs; the next region's ``X_q``
is computed with the previous regions already hard-rounded.

Memory: the cache of one region at a time, ``max_images × (|X_q| + |X_fp| + |O|)`` floats; for
the CIFAR ViT (65 tokens × 128 channels) 3 × 33,280 B per image, 102 MB for 1,024 images. The APH
is one ``[N, C]`` tensor per region.

Targets come from the graph with its quantizers off. After ``mlp_reconstruct`` that is the ReLU
float model (the reference trains towards the GELU model's outputs, which the pipeline no longer
holds); the two differ by the MLP reconstruction error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from fxquant.core import match
from fxquant.core.aph import APH_DIRECTIONS, average_perturbation_hessian, logits_node
from fxquant.core.calibration import Calibration
from fxquant.core.errors import ConfigError, PassError
from fxquant.core.graph import extract_subgraph, input_values, subgraph_args
from fxquant.core.pipeline import SHAPES, Pass, PassContext, PassResult, register_pass
from fxquant.core.quant import AdaRoundWeight, FakeQuantize, QuantConv2d, QuantLinear, quantizer_state

WEIGHT_LAYERS = (QuantLinear, QuantConv2d)


def find_regions(gm: fx.GraphModule, modules: dict | None = None) -> list[match.Block]:
    """Reconstruction regions in graph order (see module docstring): the transformer blocks, then
    for each weight-quantized layer outside them the largest enclosing single-output module region
    that overlaps no other region."""
    modules = modules if modules is not None else match.modules_of(gm)
    regions = list(match.find_blocks(gm, modules))
    covered = {n for r in regions for n in r.nodes}
    for node in gm.graph.nodes:
        if node in covered or node.op != "call_module" or not isinstance(modules.get(node.target), WEIGHT_LAYERS):
            continue
        best = None
        fqns = [f for f, _ in match.module_stack(node)]
        if str(node.target) not in fqns:
            fqns.append(str(node.target))
        for fqn in reversed(fqns):  # innermost first, growing while the region stays disjoint from the others
            if not fqn:
                break
            r = match.module_region(gm, fqn)
            if r is None:
                continue
            if covered & set(r.nodes):
                break
            best = r
        if best is None:
            raise PassError(f"block_reconstruct: layer '{node.name}' ({node.target}) is in no single-output module "
                            f"region; pass regions=('<fqn glob>', ...)")
        regions.append(best)
        covered |= set(best.nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(regions, key=lambda r: order[r.output])


def _region_quantizers(r: match.Block, modules: dict) -> tuple[list[fx.Node], list[FakeQuantize]]:
    """(weight-layer nodes with an enabled uniform weight quantizer, enabled uniform activation quantizers)."""
    layers, acts = [], []
    for n in r.nodes:
        mod = modules.get(n.target) if n.op == "call_module" else None
        if isinstance(mod, WEIGHT_LAYERS):
            fq = mod.weight_fake_quant
            if fq.fake_quant_enabled and fq.spec.scheme == "uniform":
                layers.append(n)
        elif isinstance(mod, FakeQuantize) and not mod.weight and mod.fake_quant_enabled and mod.spec.scheme == "uniform":
            if mod not in acts:
                acts.append(mod)
    return layers, acts


@dataclass
class _RegionCache:
    """One region's cached data for ``max_images`` images: the region input from the quantized and
    the float prefix, its other inputs (``(value, per_image)``: per-image tensors are indexed with
    the batch, constants passed as they are) and the float region output."""

    x_q: torch.Tensor
    x_fp: torch.Tensor
    rest: list[tuple[Any, bool]]
    y: torch.Tensor


def beta_schedule(it: int, iters: int, warmup: float, start: float, end: float) -> float | None:
    """AdaRound's β at iteration ``it``: None during the warm-up (no round loss), then linear from
    ``start`` to ``end``."""
    begin = warmup * iters
    if it < begin:
        return None
    rel = (it - begin) / max(iters - begin, 1)
    return end + (start - end) * max(0.0, 1.0 - rel)


@register_pass
@dataclass(frozen=True)
class BlockReconstruct(Pass):
    """APHQ-ViT (C): AdaRound + learned activation scales + QDrop per block, APH-weighted loss.

    See the module docstring. Reproducible: batches, QDrop masks and APH directions are drawn
    from generators seeded by ``ctx.seed`` and the region index.

    Args:
        iters: Adam steps per region (paper and reference: 20000; the default is a CPU budget).
            0: nothing is trained (the calibrated round-to-nearest model is returned).
        batch_size: images per step (reference 32).
        max_images: images cached per region (reference 1024; None: all).
        alpha_lr: Adam learning rate of the rounding variables (reference: Adam's default 1e-3).
        scale_lr: Adam learning rate of the activation scales (reference 4e-5), cosine to 0.
        round_weight: λ of the rounding regulariser (reference 0.01).
        beta_start, beta_end, warmup: β annealing (reference 20 → 2 after 20 % warm-up).
        drop_prob: QDrop probability of keeping the quantized value (reference 0.5).
        learn_act_scales: train the activation scales (False: AdaRound only).
        use_aph: weight the output loss by the APH (False: plain MSE).
        aph_images: images for each region's APH (None: all the cached ones).
        aph_direction: ``"rademacher"`` (default) or ``"ones"`` (the paper's; zero in pre-LN
            transformers, see ``fxquant.core.aph``).
        normalize_loss: divide the reconstruction term by its first-iteration value.
        regions: FQN globs of the region modules (default: found from structure).
    """

    name = "block_reconstruct"
    requires = ("calibrated", SHAPES)
    provides = ("block_reconstructed",)

    iters: int = 250
    batch_size: int = 32
    max_images: int | None = 1024
    alpha_lr: float = 1e-3
    scale_lr: float = 4e-5
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    drop_prob: float = 0.5
    learn_act_scales: bool = True
    use_aph: bool = True
    aph_images: int | None = 128
    aph_direction: str = "rademacher"
    normalize_loss: bool = True
    regions: tuple[str, ...] = ()

    def __post_init__(self):
        checks = [
            (self.iters >= 0, f"iters must be >= 0, got {self.iters}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.max_images is None or self.max_images >= 1, f"max_images must be >= 1 or None, got {self.max_images}"),
            (self.alpha_lr >= 0 and self.scale_lr >= 0, f"learning rates must be >= 0, got {self.alpha_lr}, {self.scale_lr}"),
            (self.round_weight >= 0, f"round_weight must be >= 0, got {self.round_weight}"),
            (self.beta_start >= self.beta_end > 0, f"need beta_start >= beta_end > 0, got {self.beta_start}, {self.beta_end}"),
            (0.0 <= self.warmup < 1.0, f"warmup must be in [0, 1), got {self.warmup}"),
            (0.0 <= self.drop_prob <= 1.0, f"drop_prob must be in [0, 1], got {self.drop_prob}"),
            (self.aph_images is None or self.aph_images >= 1, f"aph_images must be >= 1 or None, got {self.aph_images}"),
            (self.aph_direction in APH_DIRECTIONS, f"aph_direction must be one of {APH_DIRECTIONS}, got {self.aph_direction!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"block_reconstruct: {msg}")

    def _regions(self, gm: fx.GraphModule, modules: dict) -> list[match.Block]:
        if not self.regions:
            return find_regions(gm, modules)
        out = []
        for fqn in match.modules_matching(gm, self.regions):
            r = match.module_region(gm, fqn)
            if r is None:
                raise PassError(f"block_reconstruct: module '{fqn}' (matched by regions={self.regions}) is not a "
                                f"single-output region; pick modules whose value leaves through one node")
            out.append(r)
        return out

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.replay or self.iters == 0:  # weights and scales come from the saved tensors / nothing to train
            return PassResult(gm, modified=False, summary="replayed (weights from artifact)" if ctx.replay
                              else "iters=0: round-to-nearest kept", record=ctx.record() if ctx.replay else {})
        calib = ctx.require_calib(self.name)
        if calib.is_loop:
            raise PassError("block_reconstruct needs calib as an iterable of batches (it caches each region's inputs "
                            "itself), not a forward_loop callable")
        modules = match.modules_of(gm)
        regions = self._regions(gm, modules)
        if not regions:
            raise PassError("block_reconstruct: found no region to reconstruct (no transformer block and no "
                            "weight-quantized layer); run it after insert_quantizers and calibrate")
        logits = logits_node(gm)
        records: dict[str, dict] = {}
        t_start = time.perf_counter()
        for idx, region in enumerate(tqdm(regions, desc="block_reconstruct", disable=not ctx.progress, leave=False)):
            records[region.fqn] = self._reconstruct(gm, region, region.output is logits, calib, ctx, idx, modules)
        trained = [r for r in records.values() if r.get("iters")]
        summary = (f"{len(trained)}/{len(regions)} regions, {self.iters} iters each, {time.perf_counter() - t_start:.1f} s; "
                   + ", ".join(f"{k}: {v['loss_first']:.3g}→{v['loss_last']:.3g}" for k, v in records.items() if v.get("iters")))
        return PassResult(gm, modified=False, summary=summary, record={"regions": records})

    def _aph(self, gm: fx.GraphModule, region: match.Block, calib: Calibration, ctx: PassContext, idx: int,
             shape: tuple[int, ...]) -> torch.Tensor:
        with quantizer_state(gm, fake_quant=False):
            h = average_perturbation_hessian(gm, region.output, calib, max_images=self.aph_images,
                                             direction=self.aph_direction, seed=ctx.seed * 1_000_003 + idx,
                                             progress=ctx.progress)
        if tuple(h.shape) != shape:
            raise PassError(f"block_reconstruct: the APH of '{region.output.name}' has shape {tuple(h.shape)}, the region "
                            f"output {shape}; set use_aph=False for this model")
        mean = h.mean()
        return (h / mean).float() if mean > 0 else torch.ones(shape)

    def _cache(self, gm: fx.GraphModule, region: match.Block, calib: Calibration) -> tuple[fx.GraphModule, _RegionCache]:
        """The region's subgraph and its cached inputs and float targets."""
        inputs = [region.input, *region.extra_inputs]
        prefix = extract_subgraph(gm, [], inputs)
        body = extract_subgraph(gm, inputs, [region.output])
        x_q, fp_args, ys = [], [], []
        with torch.no_grad():
            for batch in calib.limited(self.max_images):
                values = input_values(gm, batch)
                xq = prefix(*subgraph_args(prefix, values))
                with quantizer_state(gm, fake_quant=False):
                    xf = prefix(*subgraph_args(prefix, values))
                    values.update(zip((n.name for n in inputs), xf if isinstance(xf, tuple) else (xf,)))
                    args = subgraph_args(body, values)
                    ys.append(body(*args))
                # only the region input differs between the quantized and float runs; its other inputs
                # (masks, graph inputs) are taken from the float run
                x_q.append(xq[0] if isinstance(xq, tuple) else xq)
                fp_args.append(args)
        if not ys:
            raise PassError("block_reconstruct: the calibration data is empty (no batches)")
        sizes = [y.shape[0] for y in ys]
        rest = []
        for col in list(zip(*fp_args))[1:]:
            per_image = all(isinstance(c, torch.Tensor) and c.dim() > 0 and c.shape[0] == b for c, b in zip(col, sizes))
            rest.append((torch.cat(col), True) if per_image else (col[0], False))
        return body, _RegionCache(torch.cat(x_q), torch.cat([a[0] for a in fp_args]), rest, torch.cat(ys))

    def _reconstruct(self, gm: fx.GraphModule, region: match.Block, is_logits: bool, calib: Calibration, ctx: PassContext,
                     idx: int, modules: dict) -> dict:
        layer_nodes, acts = _region_quantizers(region, modules)
        if not layer_nodes and not acts:
            return {"iters": 0, "reason": "no enabled uniform quantizer"}
        t0 = time.perf_counter()
        body, cache = self._cache(gm, region, calib)
        n = cache.y.shape[0]
        t_cache = time.perf_counter()
        h_hat = None
        if self.use_aph and not is_logits:
            h_hat = self._aph(gm, region, calib, ctx, idx, tuple(cache.y.shape[1:]))
        t_aph = time.perf_counter()

        layers = [modules[str(nd.target)] for nd in layer_nodes]
        originals = [layer.weight_fake_quant for layer in layers]
        rounders = [AdaRoundWeight(fq, layer.weight) for fq, layer in zip(originals, layers)]
        for layer, ar in zip(layers, rounders):
            layer.weight_fake_quant = ar
        scales = [q.scale for q in acts] if self.learn_act_scales else []
        for s in scales:
            s.requires_grad_(True)
        for q in acts:
            q.drop_prob = self.drop_prob
        opt_w = torch.optim.Adam([ar.alpha for ar in rounders], lr=self.alpha_lr) if rounders else None
        opt_a = torch.optim.Adam(scales, lr=self.scale_lr) if scales else None
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=self.iters, eta_min=0.0) if opt_a else None
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + idx)
        l0 = None
        first = last = None
        bar = tqdm(range(self.iters), desc=f"block_reconstruct {region.fqn}", disable=not ctx.progress, leave=False)
        try:
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.manual_seed(ctx.seed * 1_000_003 + idx)  # QDrop masks of the quantizers (torch.rand_like)
                for it in bar:
                    sel = torch.randperm(n, generator=gen)[:self.batch_size]
                    xq, xf = cache.x_q[sel], cache.x_fp[sel]
                    if self.drop_prob < 1.0:
                        keep_q = torch.rand(xq.shape, generator=gen) < self.drop_prob
                        x = torch.where(keep_q, xq, xf)
                    else:
                        x = xq
                    rest = [v[sel] if per_image else v for v, per_image in cache.rest]
                    out = body(x, *rest)
                    y = cache.y[sel]
                    if is_logits:
                        rec = F.kl_div(F.log_softmax(out, dim=-1), F.softmax(y, dim=-1), reduction="batchmean")
                    else:
                        err = (out - y) ** 2
                        rec = (err * h_hat).mean() if h_hat is not None else err.mean()
                    if l0 is None:
                        l0 = rec.item() if self.normalize_loss and rec.item() > 0 else 1.0
                    loss = 2.0 * rec / l0
                    beta = beta_schedule(it, self.iters, self.warmup, self.beta_start, self.beta_end)
                    round_loss = (self.round_weight * sum(ar.regularizer(beta) for ar in rounders)
                                  if beta is not None and rounders else None)
                    total = loss + round_loss if round_loss is not None else loss
                    for opt in (opt_w, opt_a):
                        if opt is not None:
                            opt.zero_grad(set_to_none=True)
                    total.backward()
                    for opt in (opt_w, opt_a):
                        if opt is not None:
                            opt.step()
                    if sched is not None:
                        sched.step()
                    with torch.no_grad():
                        for s in scales:
                            s.clamp_(min=torch.finfo(s.dtype).tiny)
                    if first is None:
                        first = rec.item()
                    if it % 10 == 0 or it == self.iters - 1:
                        last = rec.item()
                        bar.set_postfix(rec=f"{last:.4g}", round=f"{round_loss.item() if round_loss is not None else 0:.4g}",
                                        beta="-" if beta is None else f"{beta:.1f}")
        finally:
            flipped = total_w = 0
            with torch.no_grad():
                for layer, ar, fq in zip(layers, rounders, originals):
                    hard = ar.hardened(layer.weight)
                    rtn = fq(layer.weight) if fq.fake_quant_enabled else layer.weight
                    flipped += int((hard != rtn).sum())
                    total_w += hard.numel()
                    layer.weight.copy_(hard)
                    layer.weight_fake_quant = fq
            for s in scales:
                s.requires_grad_(False)
            for q in acts:
                q.drop_prob = 0.0
        t_end = time.perf_counter()
        return {"iters": self.iters, "images": n, "layers": [nd.name for nd in layer_nodes], "act_quantizers": len(acts),
                "loss": "kl" if is_logits else ("aph_mse" if h_hat is not None else "mse"),
                "loss_first": first, "loss_last": last, "rounding_flipped": flipped / max(total_w, 1),
                "seconds": {"cache": round(t_cache - t0, 3), "aph": round(t_aph - t_cache, 3),
                            "train": round(t_end - t_aph, 3)}}
