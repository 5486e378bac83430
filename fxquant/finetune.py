"""Few-shot fine-tuning of low-bit LoRA models (OQFV and its baselines, docs/methods.md, OQFV): ``fxquant finetune``.

One run: load the model, build the task (``fxquant.core.data.load_fewshot``: VTAB-1k's train800val200
protocol on CIFAR-10 or its 4-way rotation task), compile ``[replace_head] → lora_quantize`` with
``fxquant.compile`` (the training images are the calibration data of OQFV's step), then train the
adapters ``A``, ``B`` and the classifier (everything else frozen) with OQFV's defaults: AdamW
(lr 1e-3, weight decay 1e-4, none on biases), a cosine schedule without warm-up, cross-entropy,
batch 64, seed 0. Top-1 on the test set before any training (``top1_init``), after the last epoch
(``top1``) and with the adapters of the epoch of best validation accuracy (``top1_best_val``: model
selection on the 200 validation images; the saved model is the last epoch's).

Under ``torchrun --nproc_per_node N`` the same function runs data-parallel: DDP (gloo on CPU,
NCCL on GPU) with a ``DistributedSampler`` of the same seed, each process taking ``batch/N``
images of every global batch, so the global batches, the averaged gradients and thus the
result equal the single-process run up to float summation order (the tests bound the
difference); evaluation is sharded and the counts are summed across processes.

Outputs (``out``): ``checkpoint.safetensors`` (the trainable tensors, after every epoch), the
fxquant artifact ``model/`` (safetensors + JSON, loadable with ``fxquant.artifact.load``), and for
Hugging Face models ``peft/base`` (the base model with the quantized weights, ``save_pretrained``)
+ ``peft/adapter`` (``adapter_config.json`` + ``adapter_model.safetensors``, written by peft), so
``PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(base), adapter)`` computes
what fxquant's model computes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import fx, nn
from tqdm.auto import tqdm

from .api import compile, report
from .artifact import save as save_artifact
from .core import distributed
from .core.data import FewShotTask, load_fewshot
from .core.digest import tensors_digest
from .core.errors import ConfigError
from .core.graph import is_hf_model, logits_of
from .core.match import head_layers, modules_of
from .core.models import ModelInfo, load_model
from .passes import LoRAQuantize, ReplaceHead
from .passes.lora import LORA_INITS, lora_layers


@dataclass
class FinetuneConfig:
    """Options of one fine-tuning run (the CLI flags; defaults from docs/methods.md, OQFV)."""

    model: str = "cifar-vit"
    task: str = "cifar10"
    init: str = "oqfv"
    bits: int = 2
    rank: int = 32
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    train_images: int = 800
    val_images: int = 200
    test_images: int | None = None
    oqfv_images: int = 128
    oqfv_lr: float = 1e-3
    loftq_iters: int = 5
    loftq_grid: str = "refit"
    eval_batch_size: int = 500

    def __post_init__(self):
        if self.init not in LORA_INITS:
            raise ConfigError(f"--init must be one of {list(LORA_INITS)}, got {self.init!r}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigError("--epochs must be >= 0 and --batch-size >= 1")

    def passes(self, info: ModelInfo, task: FewShotTask) -> list:
        head = [ReplaceHead(task.num_classes)] if task.num_classes != info.num_classes or task.name != info.dataset else []
        return head + [LoRAQuantize(init=self.init, bits=self.bits, rank=self.rank, loftq_iters=self.loftq_iters,
                                    loftq_grid=self.loftq_grid, oqfv_images=self.oqfv_images, oqfv_lr=self.oqfv_lr)]


def sharded_top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500) -> float:
    """Top-1 in percent; each process evaluates its interleaved share and the counts are summed."""
    idx = distributed.shard(torch.arange(images.shape[0]))
    counts = torch.zeros(2, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for chunk in idx.split(batch_size):
            pred = logits_of(model(images[chunk])).argmax(dim=-1)
            counts += torch.tensor([float((pred == labels[chunk]).sum()), float(len(chunk))], dtype=torch.float64)
    distributed.all_reduce_sum(counts)
    return 100.0 * counts[0].item() / max(counts[1].item(), 1.0)


def trainable_parameters(gm: fx.GraphModule) -> dict[str, nn.Parameter]:
    """Freeze everything but the LoRA factors and the classifier head(s); returns those by name."""
    heads = {str(n.target) for n in head_layers(gm, modules_of(gm)) if n.op == "call_module"}
    keep = {f"{fqn}.lora_A.weight" for fqn in lora_layers(gm)} | {f"{fqn}.lora_B.weight" for fqn in lora_layers(gm)}
    keep |= {f"{h}.{p}" for h in heads for p, _ in gm.get_submodule(h).named_parameters()}
    out = {}
    for name, p in gm.named_parameters():
        p.requires_grad_(name in keep)
        if name in keep:
            out[name] = p
    return out


def _cosine(total_steps: int):
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def finetune(cfg: FinetuneConfig, *, out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run one fine-tuning experiment (module docstring); returns the result record (the CLI's ``--json``)."""
    t_start = time.perf_counter()
    world, rank = distributed.world_size(), distributed.rank()
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} must divide by the {world} processes (each takes batch/N images)")
    if cfg.train_images % world:
        raise ConfigError(f"--train-images {cfg.train_images} must divide by the {world} processes, or DistributedSampler "
                          f"pads the data with repeats and the run differs from the single-process one")
    show = progress and distributed.is_main()
    info = load_model(cfg.model)
    task = load_fewshot(info, cfg.task, train=cfg.train_images, val=cfg.val_images, test=cfg.test_images,
                        embedded=info.spec == "embedded")
    (xtr, ytr), (xva, yva), (xte, yte) = task.train, task.val, task.test
    calib = [(xtr[i:i + cfg.batch_size], ytr[i:i + cfg.batch_size]) for i in range(0, len(ytr), cfg.batch_size)]
    torch.manual_seed(cfg.seed)
    gm = compile(info.model, passes=cfg.passes(info, task), calib=calib, example_inputs=(xtr[:2],), seed=cfg.seed,
                 progress=show)
    t_init = time.perf_counter() - t_start
    params = trainable_parameters(gm)
    n_trainable = sum(p.numel() for p in params.values())
    top1_init = sharded_top1(gm, xte, yte, batch_size=cfg.eval_batch_size)
    val_init = sharded_top1(gm, xva, yva, batch_size=cfg.eval_batch_size) if len(yva) else None

    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]  # biases
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    dataset = torch.utils.data.TensorDataset(xtr, ytr)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size // world, sampler=sampler)
    total_steps = cfg.epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(total_steps))
    model: nn.Module = gm
    if world > 1:
        model = nn.parallel.DistributedDataParallel(gm, broadcast_buffers=False)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)

    losses: list[float] = []
    val_history: list[float] = []
    best_val, best_epoch, best_state = -1.0, 0, None
    t_train = time.perf_counter()
    bar = tqdm(total=total_steps, desc=f"finetune {cfg.init} {cfg.task}", disable=not show)
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(logits_of(model(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            # the global batch's mean loss (each process holds the mean of an equal share)
            losses.append(distributed.all_reduce_sum(loss.detach().double().clone()).item() / world)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}", val=f"{val_history[-1]:.1f}" if val_history else "-")
        if len(yva):
            val_history.append(sharded_top1(gm, xva, yva, batch_size=cfg.eval_batch_size))
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}" if losses else "-", val=f"{val_history[-1]:.1f}")
            if val_history[-1] > best_val:  # the first epoch of the best validation accuracy
                best_val, best_epoch = val_history[-1], epoch + 1
                best_state = {k: v.detach().clone() for k, v in params.items()}
        if out_dir is not None and distributed.is_main():
            save_file({k: v.detach().contiguous() for k, v in params.items()}, str(out_dir / "checkpoint.safetensors"),
                      metadata={"epoch": str(epoch + 1), "init": cfg.init, "task": cfg.task})
    bar.close()
    seconds_train = time.perf_counter() - t_train
    gm.eval()
    top1 = sharded_top1(gm, xte, yte, batch_size=cfg.eval_batch_size)
    top1_best_val = None
    if best_state is not None:  # model selection on the validation split (VTAB's use of val200): test it, then restore
        final_state = {k: v.detach().clone() for k, v in params.items()}
        with torch.no_grad():
            for k, v in best_state.items():
                params[k].copy_(v)
            top1_best_val = sharded_top1(gm, xte, yte, batch_size=cfg.eval_batch_size)
            for k, v in final_state.items():
                params[k].copy_(v)
    lora_record = report(gm)["lora_quantize"].record
    result = {
        "model": cfg.model, "task": cfg.task, "init": cfg.init, "bits": None if cfg.init == "fp" else cfg.bits,
        "rank": cfg.rank, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
        "top1_init": top1_init, "top1": top1, "val_top1_init": val_init, "val_top1": val_history,
        "best_val_epoch": best_epoch or None, "top1_best_val": top1_best_val,
        "trainable_params": n_trainable, "adapter_params": lora_record["trainable_params"],
        "seconds": None, "seconds_init": t_init, "seconds_train": seconds_train,
        "train_images": len(ytr), "val_images": len(yva), "test_images": len(yte), "num_classes": task.num_classes,
        "world_size": world, "losses": losses, "trainable_digest": tensors_digest(params),
        "lora_layers": len(lora_record["layers"]),
        "init_error_mean": sum(lora_record["init_error"].values()) / len(lora_record["init_error"]),
        "oqfv": lora_record.get("oqfv"), "config": asdict(cfg), "data": task.source,
    }
    if out_dir is not None and distributed.is_main():
        save_artifact(gm, out_dir / "model", model_spec=cfg.model, extra={"finetune": {k: v for k, v in result.items()
                                                                                       if k != "losses"}})
        if is_hf_model(info.model):
            base, adapter = save_peft_adapter(gm, info.model, out_dir / "peft", rank=cfg.rank)
            result["peft"] = {"base": str(base), "adapter": str(adapter)}
    distributed.barrier()
    result["seconds"] = time.perf_counter() - t_start
    return result


def save_peft_adapter(gm: fx.GraphModule, hf_model: nn.Module, out_dir: str | Path, *, rank: int) -> tuple[Path, Path]:
    """Write ``gm``'s adapters in peft's format for the Hugging Face model it was compiled from:
    ``out_dir/base`` = ``hf_model`` with every adapted Linear's weight replaced by its frozen
    quantized weight ``Q(W')`` and the (possibly resized) trained classifier, saved with
    ``save_pretrained``; ``out_dir/adapter`` = a peft ``LoraConfig`` (``r``, ``lora_alpha = s·r``,
    the adapted Linears as ``target_modules``, the classifier in ``modules_to_save``) with the
    trained ``A``, ``B``, saved by peft. Returns ``(base, adapter)``."""
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    loras = lora_layers(gm)
    heads = [str(n.target) for n in head_layers(gm, modules_of(gm)) if n.op == "call_module"]
    base = copy.deepcopy(hf_model).eval()
    missing = [f for f in loras if not _has_submodule(base, f)] + [h for h in heads if not _has_submodule(base, h)]
    if missing:
        raise ConfigError(f"the graph's layers {missing[:4]} have no module of that name in the Hugging Face model; "
                          f"peft adapters need the model's own module names")
    with torch.no_grad():
        for fqn, m in loras.items():
            base.get_submodule(fqn).weight.copy_(m.base_weight())
        for h in heads:
            trained = gm.get_submodule(h)
            parent, _, leaf = h.rpartition(".")
            new = nn.Linear(trained.in_features, trained.out_features, bias=trained.bias is not None)
            new.load_state_dict(trained.state_dict())
            setattr(base.get_submodule(parent) if parent else base, leaf, new)
    base.config.num_labels = gm.get_submodule(heads[0]).out_features
    base_dir, adapter_dir = out_dir / "base", out_dir / "adapter"
    base.save_pretrained(base_dir)
    base.name_or_path = str(base_dir.resolve())
    scaling = next(iter(loras.values())).scaling
    cfg = LoraConfig(r=rank, lora_alpha=rank * scaling, target_modules=list(loras), lora_dropout=0.0, bias="none",
                     modules_to_save=heads, init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for fqn, m in loras.items():
            layer = peft_model.base_model.model.get_submodule(fqn)
            layer.lora_A["default"].weight.copy_(m.lora_A.weight)
            layer.lora_B["default"].weight.copy_(m.lora_B.weight)
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def _has_submodule(model: nn.Module, fqn: str) -> bool:
    try:
        model.get_submodule(fqn)
        return True
    except AttributeError:
        return False


__all__ = ["FinetuneConfig", "finetune", "sharded_top1", "trainable_parameters", "save_peft_adapter", "tensors_digest"]
