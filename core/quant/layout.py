"""Parameter layout helpers: quantization parameters are stored in their granularity's parameter
shape (``granularity.py``); ``expand_params`` broadcasts them against a tensor and ``to_rows``
reshapes a tensor to one row per parameter block.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError


def expand_params(p: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Broadcast a parameter tensor stored in granularity layout against a tensor of ``shape``
    (repeats per-group parameters along their axis; leaves size-1 dimensions to broadcasting)."""
    if p.dim() == 0:
        return p
    if p.dim() != len(shape):
        raise ConfigError(f"quantization parameters of shape {tuple(p.shape)} do not fit a tensor of shape {tuple(shape)}")
    for d, (ps, s) in enumerate(zip(p.shape, shape)):
        if ps != 1 and ps != s:
            if s % ps:
                raise ConfigError(f"quantization parameters of shape {tuple(p.shape)} do not fit a tensor of "
                                  f"shape {tuple(shape)}")
            p = p.repeat_interleave(s // ps, dim=d)
    return p


def to_rows(x: torch.Tensor, param_shape: tuple[int, ...]) -> torch.Tensor:
    """Reshape ``x`` to ``[P, M]``: one row per quantization-parameter block (P = prod(param_shape)),
    in the row-major order of ``param_shape``."""
    inter, p_dims, b_dims = [], [], []
    for d, (ps, s) in enumerate(zip(param_shape, x.shape)):
        inter += [ps, s // ps]
        p_dims.append(2 * d)
        b_dims.append(2 * d + 1)
    return x.reshape(inter).permute(p_dims + b_dims).reshape(math.prod(param_shape), -1)
