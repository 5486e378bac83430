"""Model specs understood by the CLI and ``fxquant.core.models.load_model``.

==========================  ================================================================
spec                        model
==========================  ================================================================
``cifar-vit``               the reference timm ViT trained on CIFAR-10 (``shared/models/vit_cifar10``;
                            the package's embedded fp16 copy when that folder is absent)
``cifar-vit-outliers``      the same function with planted post-LayerNorm channel outliers
                            (``shared/models/vit_cifar10_outliers``)
``embedded``                always the embedded copy (what ``fxquant demo`` uses)
``timm:<name>``             ``timm.create_model(name)``: random init unless ``pretrained=True``
``hf:cifar-vit``            the CIFAR ViT converted to a Hugging Face ``ViTForImageClassification``
                            (``timm_vit_to_hf``; equal logits); ``hf:cifar-vit-outliers`` likewise
``hf:<folder or hub id>``   ``AutoModelForImageClassification.from_pretrained`` (a local folder, or a
                            hub id already in the Hugging Face cache)
``<folder>``                ``config.json`` (``architecture`` + ``model_kwargs``) + ``model.safetensors``
==========================  ================================================================

``shared/`` is found through ``$FXQUANT_SHARED``, then ``./shared``, ``../shared`` and the folder
beside the source checkout.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import ConfigError

ASSETS = Path(__file__).resolve().parent / "_assets"
EMBEDDED_MODEL = ASSETS / "vit_cifar10_fp16.safetensors"
EMBEDDED_CONFIG = ASSETS / "vit_cifar10_config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def shared_dir() -> Path | None:
    """The read-only ``shared/`` folder holding models and data, if present."""
    cands = []
    if os.environ.get("FXQUANT_SHARED"):
        cands.append(Path(os.environ["FXQUANT_SHARED"]))
    cands += [Path.cwd() / "shared", Path.cwd().parent / "shared", Path(__file__).resolve().parents[2] / "shared"]
    for c in cands:
        if (c / "models").is_dir() or (c / "data").is_dir():
            return c.resolve()
    return None


# the transformer-quantization platform's ``--name`` choices (``fxquant platform``) -> timm model names
PLATFORM_NAMES = {
    f"{family}_{size}": f"{family}_{size}_patch{4 if family == 'swin' else 16}_{'window7_' if family == 'swin' else ''}224"
    for family in ("vit", "deit", "swin") for size in ("tiny", "small", "base")
}


@dataclass
class ModelInfo:
    """A loaded model with what evaluation needs to feed it."""

    spec: str
    model: nn.Module
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    dataset: str | None  # "cifar10", "imagenet" or None
    source: str
    fp32_top1_reference: float | None = None
    data_config: dict = field(default_factory=dict)

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return (torch.randn(batch, *self.input_size, generator=g),)


def _build_from_config(cfg: dict) -> nn.Module:
    arch = cfg.get("architecture", "")
    if not arch.startswith("timm."):
        raise ConfigError(f"config.json names architecture {arch!r}; "
                          f"fxquant builds timm architectures ('timm.models....') from folders")
    mod_name, _, cls_name = arch.rpartition(".")
    cls = getattr(importlib.import_module(mod_name), cls_name)
    return cls(**cfg["model_kwargs"])


def _from_folder(spec: str, folder: Path, source: str) -> ModelInfo:
    cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.exists() or not w_path.exists():
        raise ConfigError(f"model folder '{folder}' needs config.json and model.safetensors "
                          f"(the layout of shared/models/vit_cifar10)")
    cfg = json.loads(cfg_path.read_text())
    return _with_weights(spec, cfg, load_file(str(w_path)), source)


def _with_weights(spec: str, cfg: dict, state: dict, source: str) -> ModelInfo:
    model = _build_from_config(cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ConfigError(f"weights of '{spec}' do not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    inp = cfg.get("input", {})
    size = tuple(inp.get("size", (3, 224, 224)))
    classes = cfg.get("classes")
    num_classes = cfg.get("model_kwargs", {}).get("num_classes", len(classes) if classes else 1000)
    dataset = "cifar10" if num_classes == 10 and size[1:] == (32, 32) else "imagenet" if num_classes == 1000 else None
    return ModelInfo(spec, model, size, tuple(inp.get("mean", IMAGENET_MEAN)), tuple(inp.get("std", IMAGENET_STD)),
                     num_classes, dataset, source, cfg.get("test_top1_fp32"))


def load_embedded() -> ModelInfo:
    """The reference CIFAR-10 ViT shipped inside the package (fp16 weights, loaded as fp32)."""
    cfg = json.loads(EMBEDDED_CONFIG.read_text())
    return _with_weights("embedded", cfg, load_file(str(EMBEDDED_MODEL)), f"embedded ({EMBEDDED_MODEL.name})")


def load_model(spec: str, *, pretrained: bool = False) -> ModelInfo:
    """Load a model by spec (see module docstring)."""
    if spec == "embedded":
        return load_embedded()
    if spec in ("cifar-vit", "cifar-vit-outliers"):
        folder_name = "vit_cifar10" if spec == "cifar-vit" else "vit_cifar10_outliers"
        shared = shared_dir()
        folder = shared / "models" / folder_name if shared else None
        if folder is not None and folder.is_dir():
            return _from_folder(spec, folder, str(folder))
        if spec == "cifar-vit":
            info = load_embedded()
            info.spec = spec
            return info
        raise ConfigError(f"'{spec}' needs shared/models/{folder_name}; "
                          f"set FXQUANT_SHARED to the folder holding models/ and data/")
    if spec.startswith("timm:"):
        name = spec[len("timm:"):]
        if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
            raise ConfigError(f"timm has no model {name!r} (timm.list_models() lists them)")
        try:
            model = timm.create_model(name, pretrained=pretrained).eval()
        except Exception as e:
            raise ConfigError(f"could not create timm model {name!r} (pretrained={pretrained}): {e}. Without network access, "
                              f"pretrained weights must already be in the Hugging Face cache") from e
        dc = timm.data.resolve_data_config({}, model=model)
        return ModelInfo(spec, model, tuple(dc["input_size"]), tuple(dc["mean"]), tuple(dc["std"]),
                         getattr(model, "num_classes", 1000), "imagenet" if getattr(model, "num_classes", 0) == 1000 else None,
                         f"timm ({'pretrained' if pretrained else 'random init'})", data_config=dc)
    if spec.startswith("hf:"):
        return _load_hf(spec, spec[len("hf:"):], pretrained=pretrained)
    path = Path(spec)
    if path.is_dir():
        return _from_folder(spec, path, str(path.resolve()))
    raise ConfigError(
        f"unknown model spec {spec!r}; use cifar-vit, cifar-vit-outliers, embedded, timm:<name>, hf:cifar-vit, "
        f"hf:<folder or hub id>, or a folder with config.json + model.safetensors"
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face ViT
# ---------------------------------------------------------------------------------------------

# timm ViT key -> Hugging Face ViTForImageClassification key, for transformers 5.x and 4.x layouts
# ("{i}" = block index; "qkv" is split into three)
_HF_VIT_KEYS = {
    "5": {"blocks.{i}.norm1": "vit.layers.{i}.layernorm_before", "blocks.{i}.norm2": "vit.layers.{i}.layernorm_after",
          "blocks.{i}.attn.qkv": ("vit.layers.{i}.attention.q_proj", "vit.layers.{i}.attention.k_proj",
                                  "vit.layers.{i}.attention.v_proj"),
          "blocks.{i}.attn.proj": "vit.layers.{i}.attention.o_proj", "blocks.{i}.mlp.fc1": "vit.layers.{i}.mlp.fc1",
          "blocks.{i}.mlp.fc2": "vit.layers.{i}.mlp.fc2"},
    "4": {"blocks.{i}.norm1": "vit.encoder.layer.{i}.layernorm_before",
          "blocks.{i}.norm2": "vit.encoder.layer.{i}.layernorm_after",
          "blocks.{i}.attn.qkv": ("vit.encoder.layer.{i}.attention.attention.query",
                                  "vit.encoder.layer.{i}.attention.attention.key",
                                  "vit.encoder.layer.{i}.attention.attention.value"),
          "blocks.{i}.attn.proj": "vit.encoder.layer.{i}.attention.output.dense",
          "blocks.{i}.mlp.fc1": "vit.encoder.layer.{i}.intermediate.dense",
          "blocks.{i}.mlp.fc2": "vit.encoder.layer.{i}.output.dense"},
}
_HF_VIT_FIXED = {"patch_embed.proj": "vit.embeddings.patch_embeddings.projection", "norm": "vit.layernorm",
                 "head": "classifier"}


def timm_vit_to_hf(model: nn.Module) -> nn.Module:
    """A Hugging Face ``ViTForImageClassification`` computing the same function as a timm
    ``VisionTransformer`` with a class token, token pooling, exact GELU, ``qkv`` bias and no
    LayerScale (the CIFAR ViT; plain ViT-S/B/L): the fused ``qkv`` is split into query/key/value,
    ``layer_norm_eps`` = timm's 1e-6. The tests check equal logits."""
    from transformers import ViTConfig, ViTForImageClassification

    if not isinstance(model, VisionTransformer) or model.cls_token is None or model.global_pool != "token" \
            or model.num_prefix_tokens != 1 or not isinstance(model.patch_embed.proj, nn.Conv2d):
        raise ConfigError("timm_vit_to_hf converts a timm VisionTransformer with one class token, global_pool='token' and a "
                          "Conv2d patch embedding (ViTForImageClassification's architecture)")
    blk = model.blocks[0]
    if not isinstance(blk.ls1, nn.Identity) or blk.attn.qkv.bias is None or not isinstance(blk.mlp.act, nn.GELU):
        raise ConfigError("timm_vit_to_hf: the blocks must have qkv bias, exact GELU and no LayerScale")
    img = model.patch_embed.img_size
    cfg = ViTConfig(image_size=img[0], patch_size=model.patch_embed.patch_size[0],
                    num_channels=model.patch_embed.proj.in_channels,
                    hidden_size=model.embed_dim, num_hidden_layers=len(model.blocks), num_attention_heads=blk.attn.num_heads,
                    intermediate_size=blk.mlp.fc1.out_features, hidden_act="gelu", layer_norm_eps=blk.norm1.eps,
                    qkv_bias=True, num_labels=model.num_classes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = ViTForImageClassification(cfg)
    target = hf.state_dict()
    src = model.state_dict()
    layout = "5" if any(k.startswith("vit.layers.") for k in target) else "4"
    out = {"vit.embeddings.cls_token": src["cls_token"], "vit.embeddings.position_embeddings": src["pos_embed"]}
    names = dict(_HF_VIT_FIXED)
    for i in range(len(model.blocks)):
        for t, h in _HF_VIT_KEYS[layout].items():
            names[t.format(i=i)] = tuple(x.format(i=i) for x in h) if isinstance(h, tuple) else h.format(i=i)
    for t, h in names.items():
        for p in ("weight", "bias"):
            if isinstance(h, tuple):
                for part, name in zip(src[f"{t}.{p}"].chunk(3, dim=0), h):
                    out[f"{name}.{p}"] = part
            else:
                out[f"{h}.{p}"] = src[f"{t}.{p}"]
    missing, unexpected = sorted(set(target) - set(out)), sorted(set(out) - set(target))
    if missing or unexpected:
        raise ConfigError(f"timm_vit_to_hf: key mismatch with transformers' ViT "
                          f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    hf.load_state_dict({k: v.clone() for k, v in out.items()})
    return hf.eval()


def _load_hf(spec: str, name: str, *, pretrained: bool) -> ModelInfo:
    if name in ("cifar-vit", "cifar-vit-outliers"):
        info = load_model(name)
        return ModelInfo(spec, timm_vit_to_hf(info.model), info.input_size, info.mean, info.std, info.num_classes,
                         info.dataset, f"{info.source} converted to transformers' ViTForImageClassification",
                         info.fp32_top1_reference)
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    local = Path(name).is_dir()
    try:
        model = AutoModelForImageClassification.from_pretrained(name, local_files_only=not pretrained or local).eval()
    except Exception as e:
        raise ConfigError(f"could not load the Hugging Face model {name!r}: {e}. Without network access it must be a local "
                          f"folder or already in the Hugging Face cache") from e
    try:
        proc = AutoImageProcessor.from_pretrained(name, local_files_only=True)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except Exception:  # no processor config: ImageNet statistics
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    size = model.config.image_size
    n = model.config.num_labels
    return ModelInfo(spec, model, (model.config.num_channels, size, size), mean, std, n,
                     "cifar10" if n == 10 and size == 32 else "imagenet" if n == 1000 else None, f"transformers ({name})")
