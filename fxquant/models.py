"""Model specs understood by the CLI and ``fxquant.models.load_model``.

==========================  ================================================================
spec                        model
==========================  ================================================================
``cifar-vit``               the reference timm ViT trained on CIFAR-10 (``shared/models/vit_cifar10``;
                            the package's embedded fp16 copy when that folder is absent)
``cifar-vit-outliers``      the same function with planted post-LayerNorm channel outliers
                            (``shared/models/vit_cifar10_outliers``)
``embedded``                always the embedded copy (what ``fxquant demo`` uses)
``timm:<name>``             ``timm.create_model(name)``: random init unless ``pretrained=True``
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
    path = Path(spec)
    if path.is_dir():
        return _from_folder(spec, path, str(path.resolve()))
    raise ConfigError(
        f"unknown model spec {spec!r}; use cifar-vit, cifar-vit-outliers, embedded, timm:<name>, or a folder with "
        f"config.json + model.safetensors"
    )
