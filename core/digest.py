"""Content digests of tensors: equal digests mean bit-identical tensors (artifacts, caches, the
distributed checks)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the named tensors' bytes (sorted names): equal digests = bit-identical tensors."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def state_digest(model: nn.Module) -> str:
    """``tensors_digest`` of the model's state dict: every quantizer's scale and zero point and
    every weight a pass rewrote (RepQ's reparameterized LayerNorm/Linear, QwT's compensation), so
    two quantized models with equal digests are bit-identical."""
    return tensors_digest(dict(model.state_dict()))


__all__ = ["tensors_digest", "state_digest"]
