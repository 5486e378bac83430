"""Low-bit weights with trainable low-rank adapters (OQFV and its baselines, docs/methods.md, OQFV) and a
new classifier head for a downstream task: the graph side of ``fxquant finetune``.

* ``replace_head``: every classifier head (``match.head_layers``: the Linear(s) from which the
  output is reached without another Linear, Conv or matmul) becomes a new ``nn.Linear`` with
  ``num_classes`` outputs (PyTorch's default init, drawn from the seeded generator).
* ``lora_quantize``: every Linear inside a transformer block (``match.find_blocks``: q/k/v or
  qkv, attention output, fc1, fc2; not the patch embedding, not the head), refined by FQN globs,
  becomes a ``fxquant.core.quant.LoRALinear``: ``y = x·Q(W')ᵀ + s·(x·Aᵀ)·Bᵀ + b`` with the frozen
  per-tensor ``bits``-bit weight quantizer of OQFV (``SigmaClip(num_std)`` range, min-max grid:
  ``zero_point_domain="float"``) and trainable ``A``, ``B`` of rank ``rank``. Initialisation
  (``init``): ``qlora``, ``loftq`` (``loftq_iters`` steps), ``oqfv`` (one LoftQ step, then one
  AdamW step on the logit MSE between the quantized and the float graph over ``oqfv_images``
  class-stratified calibration images), or ``fp`` (LoRA on the float weights: the upper bound).

OQFV's step under ``torch.distributed``: every rank draws the same stratified sample, computes
the float targets and the gradient of its interleaved share, and the gradients are summed across
ranks before the (identical) AdamW step, so the step equals the single-process one. Memory: the
sampled images and their float logits (``oqfv_images × (image + classes)`` floats); nothing else
is cached.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from fxquant.core import distributed, match
from fxquant.core.calibration import stratified_indices
from fxquant.core.errors import ConfigError, PassError
from fxquant.core.graph import logits_of
from fxquant.core.pipeline import SHAPES, Pass, PassContext, PassResult, register_pass
from fxquant.core.quant import LoRALinear, PerTensor, QuantSpec, SigmaClip, fake_quantize, loftq
from fxquant.core.quant.observers import exact_distribution_qparams

from .insert import _set_module

LORA_INITS = ("qlora", "loftq", "oqfv", "fp")


@register_pass
@dataclass(frozen=True)
class ReplaceHead(Pass):
    """Replace every classifier head by a new Linear with ``num_classes`` outputs (PyTorch's default init, seeded)."""

    name: ClassVar[str] = "replace_head"
    provides: ClassVar[tuple[str, ...]] = ("head_replaced",)
    num_classes: int = 0

    def __post_init__(self):
        if self.num_classes < 1:
            raise ConfigError(f"replace_head needs num_classes >= 1, got {self.num_classes}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modules = match.modules_of(gm)
        heads = [n for n in match.head_layers(gm, modules) if n.op == "call_module"]
        if not heads:
            raise PassError("replace_head: found no classifier head (a Linear from which the output is reached without "
                            "another Linear, Conv or matmul)")
        for node in heads:
            old = modules[node.target]
            new = nn.Linear(old.in_features, self.num_classes, bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
            _set_module(gm, node.target, new)
        names = [str(n.target) for n in heads]
        return PassResult(gm, summary=f"{len(heads)} head(s) -> {self.num_classes} classes: {', '.join(names)}",
                          record={"heads": names, "num_classes": self.num_classes})


def lora_weight_spec(bits: int, num_std: float = 2.0) -> QuantSpec:
    """OQFV's weight quantizer: per-tensor, clip to ``μ ± num_std·σ``, min-max grid on the clipped range."""
    return QuantSpec(bits=bits, granularity=PerTensor(), estimator=SigmaClip(num_std), zero_point_domain="float")


def _quantize_on(spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor):
    return lambda w: fake_quantize(w, scale, zero_point, spec)


def _quantize_exact(spec: QuantSpec):
    def q(w: torch.Tensor) -> torch.Tensor:
        scale, zp = exact_distribution_qparams(w, spec, weight=True)
        return fake_quantize(w, scale, zp, spec)
    return q


@register_pass
@dataclass(frozen=True)
class LoRAQuantize(Pass):
    """Encoder Linears → frozen low-bit weight + trainable low-rank (LoRA) adapters, initialised by OQFV, LoftQ, QLoRA or FP.

    Args:
        init: ``qlora``, ``loftq``, ``oqfv`` or ``fp``.
        bits: weight bits (2..8; ignored by ``fp``).
        rank: adapter rank r.
        num_std: the clipping range ``μ ± num_std·σ``.
        loftq_iters: LoftQ's alternating steps (``oqfv`` always takes one).
        loftq_grid: ``refit`` (the reference: every step re-fits the quantizer's range to ``W - BA``)
            or ``fixed`` (the range of ``W`` for every step: each step is then an exact block
            coordinate descent, so ``‖W - Q - BA‖`` cannot increase; with ``refit`` it can, measured
            on the CIFAR ViT's attention projections).
        scaling: ``s`` in ``s·B·A`` (1 as OQFV; peft's ``lora_alpha / r``).
        layers: FQN globs choosing among the encoder Linears (empty: all of them).
        skip: FQN globs of Linears to leave alone.
        oqfv_images, oqfv_lr, oqfv_weight_decay: OQFV's logit-MSE step (128 images, AdamW 1e-3 / 1e-4).
        batch_size: micro-batch of that step (the gradient is accumulated: the step is the same).
    """

    name: ClassVar[str] = "lora_quantize"
    requires: ClassVar[tuple[str, ...]] = (SHAPES,)
    provides: ClassVar[tuple[str, ...]] = ("lora",)
    init: str = "oqfv"
    bits: int = 2
    rank: int = 32
    num_std: float = 2.0
    loftq_iters: int = 5
    loftq_grid: str = "refit"
    scaling: float = 1.0
    layers: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    oqfv_images: int = 128
    oqfv_lr: float = 1e-3
    oqfv_weight_decay: float = 1e-4
    batch_size: int = 32

    def __post_init__(self):
        if self.init not in LORA_INITS:
            raise ConfigError(f"lora_quantize: init must be one of {list(LORA_INITS)}, got {self.init!r}")
        if self.loftq_grid not in ("refit", "fixed"):
            raise ConfigError(f"lora_quantize: loftq_grid must be 'refit' or 'fixed', got {self.loftq_grid!r}")
        if self.rank < 1 or self.loftq_iters < 1 or self.oqfv_images < 1 or self.batch_size < 1:
            raise ConfigError("lora_quantize: rank, loftq_iters, oqfv_images and batch_size must be >= 1")
        if self.init != "fp":
            lora_weight_spec(self.bits, self.num_std)  # validates bits and num_std

    @property
    def spec(self) -> QuantSpec | None:
        return None if self.init == "fp" else lora_weight_spec(self.bits, self.num_std)

    # -- selection ---------------------------------------------------------------------------
    def targets(self, gm: fx.GraphModule, ctx: PassContext) -> list[str]:
        """FQNs of the Linears to adapt, in graph order."""
        modules = match.modules_of(gm)
        blocks = match.find_blocks(gm, modules)
        if not blocks:
            raise PassError("lora_quantize: found no transformer block (one attention + an MLP) to adapt; "
                            "check the capture (fxquant.trace) or pass layers=('<fqn glob>',)")
        inside = {n for b in blocks for n in b.nodes}
        out = []
        for n in gm.graph.nodes:
            if n not in inside or n.op != "call_module" or match.op_kind(n, modules) != "linear":
                continue
            fqn = str(n.target)
            if self.layers and not any(fnmatch.fnmatchcase(fqn, g) for g in self.layers):
                continue
            if any(fnmatch.fnmatchcase(fqn, g) for g in self.skip):
                continue
            mod = modules[fqn]
            if type(mod) is not nn.Linear:
                raise PassError(f"lora_quantize: '{fqn}' is a {type(mod).__name__}, not a float nn.Linear; run lora_quantize "
                                f"on the float graph (before insert_quantizers) or skip it with skip=('{fqn}',)")
            if fqn not in out:
                out.append(fqn)
        if not out:
            raise PassError(f"lora_quantize: no encoder Linear matched layers={list(self.layers)} skip={list(self.skip)}")
        return out

    # -- the pass ------------------------------------------------------------------------------
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        fqns = self.targets(gm, ctx)
        spec = self.spec
        if ctx.replay:  # structure only: the artifact's tensors fill in W', the quantizer and A, B
            for fqn in fqns:
                lora = LoRALinear.from_linear(gm.get_submodule(fqn), self.rank, spec, scaling=self.scaling, label=fqn)
                lora.weight_fake_quant.fake_quant_enabled = spec is not None
                _set_module(gm, fqn, lora)
            return PassResult(gm, summary=f"replayed {len(fqns)} LoRA layers", record=ctx.record())

        sample = targets = None
        if self.init == "oqfv":
            if self.oqfv_images < distributed.world_size():
                raise PassError(f"lora_quantize (oqfv): {self.oqfv_images} images cannot be shared by "
                                f"{distributed.world_size()} processes; use oqfv_images >= the world size")
            sample = self._stratified_sample(ctx)
            targets = self._float_logits(gm, sample)
        quantize = _quantize_exact(spec) if spec is not None else None
        init_error: dict[str, float] = {}
        loftq_errors: dict[str, list[float]] = {}
        for fqn in tqdm(fqns, desc=f"lora_quantize ({self.init})", disable=not ctx.progress, leave=False):
            linear = gm.get_submodule(fqn)
            w = linear.weight.detach().float()
            lora = LoRALinear.from_linear(linear, self.rank, spec, scaling=self.scaling, label=fqn)
            if spec is not None:
                base, grid = w, None
                if self.loftq_grid == "fixed":
                    grid = exact_distribution_qparams(w, spec, weight=True)
                    quantize = _quantize_on(spec, *grid)
                if self.init in ("loftq", "oqfv"):
                    base, b, a, errs = loftq(w, quantize, self.rank, 1 if self.init == "oqfv" else self.loftq_iters)
                    root = self.scaling ** 0.5
                    lora.lora_B.weight.data.copy_(b / root)
                    lora.lora_A.weight.data.copy_(a / root)
                    loftq_errors[fqn] = [round(e, 6) for e in errs]
                lora.weight = nn.Parameter(base.to(linear.weight.dtype), requires_grad=False)
                if grid is None:
                    lora.weight_fake_quant.calibrate_from(lora.weight)
                else:
                    lora.weight_fake_quant.set_qparams(*grid)
                lora.weight_fake_quant.fake_quant_enabled = True
            _set_module(gm, fqn, lora)
            with torch.no_grad():
                init_error[fqn] = round(float((w - lora.merged_weight()).norm() / w.norm().clamp(min=1e-30)), 6)
        # init_error: ‖W − Q − s·B·A‖ / ‖W‖ per layer after the quantize/SVD part (before OQFV's step)
        record = {"layers": fqns, "init_error": init_error, "trainable_params": _adapter_params(gm)}
        if loftq_errors:
            record["loftq_errors"] = loftq_errors
        if self.init == "oqfv":
            record["oqfv"] = self._oqfv_step(gm, sample, targets, ctx)
        mean_err = sum(init_error.values()) / len(init_error)
        summary = (f"{len(fqns)} Linears -> {'float' if spec is None else f'{self.bits}-bit'} + rank-{self.rank} LoRA "
                   f"({self.init}); mean ‖W - Q - sBA‖/‖W‖ = {mean_err:.4f}")
        if "oqfv" in record:
            summary += f"; OQFV logit MSE {record['oqfv']['mse_before']:.4g} -> {record['oqfv']['mse_after']:.4g}"
        return PassResult(gm, summary=summary, record=record)

    # -- OQFV ----------------------------------------------------------------------------------
    def _stratified_sample(self, ctx: PassContext) -> torch.Tensor:
        calib = ctx.require_calib(self.name)
        if calib.is_loop:
            raise PassError("lora_quantize (oqfv) needs calib as (images, labels) batches for its class-stratified "
                            "sample, not a forward_loop callable")
        batches = calib.batches()
        if iter(batches) is batches:
            raise PassError("lora_quantize (oqfv) reads the calibration data twice (labels, then the sampled images): "
                            "pass a list of batches or a DataLoader, not a one-shot generator")
        labels = []
        for batch in batches:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)):
                raise PassError("lora_quantize (oqfv) draws a class-stratified sample: calibration batches must be "
                                "(images, labels) tuples (e.g. a DataLoader over a labelled dataset)")
            labels.append(torch.as_tensor(batch[1]).flatten())
        labels = torch.cat(labels)
        if labels.numel() < self.oqfv_images:
            raise PassError(f"lora_quantize (oqfv) samples {self.oqfv_images} images but the calibration data holds "
                            f"{labels.numel()}; pass more labelled images or set oqfv_images")
        chosen = stratified_indices(labels, self.oqfv_images, ctx.seed)
        wanted, images, seen = set(chosen), [], 0
        for batch in batches:
            x = batch[0]
            idx = [i for i in range(x.shape[0]) if seen + i in wanted]
            if idx:
                images.append(x[idx])
            seen += x.shape[0]
        return torch.cat(images)

    def _float_logits(self, gm: fx.GraphModule, sample: torch.Tensor) -> torch.Tensor:
        """This rank's share of the float graph's logits (rows ``rank::world`` of the sample)."""
        mine = distributed.shard(sample)
        with torch.no_grad():
            return torch.cat([logits_of(gm(x)) for x in mine.split(self.batch_size)]) if len(mine) else torch.empty(0)

    def _oqfv_step(self, gm: fx.GraphModule, sample: torch.Tensor, targets: torch.Tensor, ctx: PassContext) -> dict:
        params = [p for m in gm.modules() if isinstance(m, LoRALinear) for p in (m.lora_A.weight, m.lora_B.weight)]
        mine = distributed.shard(sample)
        total = sample.shape[0] * targets.shape[-1]  # elements of the whole sample's logits (every rank has a share)
        # only A and B take gradients in this step; the other flags are restored after it
        frozen = [p for p in gm.parameters() if p.requires_grad and not any(p is q for q in params)]
        for p in frozen:
            p.requires_grad_(False)

        def sq_error_sum(grad: bool) -> torch.Tensor:
            acc = torch.zeros((), dtype=torch.float64)
            with torch.set_grad_enabled(grad):
                for x, t in zip(mine.split(self.batch_size), targets.split(self.batch_size)):
                    err = ((logits_of(gm(x)) - t) ** 2).sum()
                    if grad:
                        (err / total).backward()
                    acc += err.detach().double()
            return distributed.all_reduce_sum(acc)

        for p in params:
            p.grad = None
        before = sq_error_sum(grad=True).item() / total
        for p in params:
            distributed.all_reduce_sum(p.grad)
        opt = torch.optim.AdamW(params, lr=self.oqfv_lr, weight_decay=self.oqfv_weight_decay)
        with torch.enable_grad():
            opt.step()
        for p in params:
            p.grad = None
        after = sq_error_sum(grad=False).item() / total
        for p in frozen:
            p.requires_grad_(True)
        return {"images": int(sample.shape[0]), "mse_before": before, "mse_after": after}


def _adapter_params(gm: nn.Module) -> int:
    return sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in gm.modules() if isinstance(m, LoRALinear))


def lora_layers(gm: nn.Module) -> dict[str, LoRALinear]:
    """The ``LoRALinear`` layers of a graph by FQN."""
    return {n: m for n, m in gm.named_modules() if isinstance(m, LoRALinear)}


__all__ = ["ReplaceHead", "LoRAQuantize", "LORA_INITS", "lora_weight_spec", "lora_layers"]
