"""Quantize, dequantize and fake-quantize for every scheme: the functions that branch on
``spec.scheme`` and compose the uniform affine rules (``affine.py``), the log2/log√2 and BitLog2
codes (``logcodes.py``), instance-group parameters (``group_params.py``) and the parameter layout
(``layout.py``).

How codes are *stored* (signed offset, int4 packing) is ``fxquant.core.quant.codes``.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .affine import _round, round_clamp_centered_
from .granularity import Dynamic, InstanceGroups
from .group_params import resolve_params
from .layout import expand_params
from .logcodes import (
    _log_count_int32,
    _log_tables,
    _on,
    bitlog2_codes_from_int,
    bitlog2_input,
    bitlog2_level_by_input,
    bitlog2_levels,
    log_codes,
    log_count,
    log_level_table,
)
from .spec import QuantSpec


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec, *,
             ste: bool = False) -> torch.Tensor:
    """Integer codes (as a float tensor holding integers) of ``x``; parameters in granularity layout.
    (``ste`` applies to uniform rounding; log and BitLog2 codes are piecewise constant.)"""
    if spec.scheme == "bitlog2":
        return bitlog2_codes_from_int(bitlog2_input(x, spec.bitlog2_variant), spec.bitlog2_variant).to(x.dtype)
    scale, zero_point = resolve_params(x, scale, zero_point, spec)
    scale = expand_params(scale, x.shape)
    if spec.is_log:
        return log_codes(x / scale, spec).to(x.dtype)
    zero_point = expand_params(zero_point, x.shape)
    if spec.zero_point_domain == "float":
        return torch.clamp(_round((x - zero_point) / scale, ste) + spec.qmin, spec.qmin, spec.qmax)
    return torch.clamp(_round(x / scale, ste) + zero_point, spec.qmin, spec.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Values of integer codes ``q`` (inverse of ``quantize`` on the grid). Instance-group
    parameters must already be resolved against the input (``resolve_params``): codes alone do
    not say which group a slice was assigned to."""
    if isinstance(spec.granularity, InstanceGroups) and scale.dim() != q.dim():
        raise ConfigError("dequantize of InstanceGroups codes needs the per-slice parameters from resolve_params(x, ...)")
    if isinstance(spec.granularity, Dynamic) and scale.numel() == 0:
        raise ConfigError("dequantize of Dynamic codes needs the parameters of the input they came from "
                          "(resolve_params(x, ...) or dynamic_qparams(x, spec))")
    scale = expand_params(scale, q.shape)
    if spec.scheme == "bitlog2":
        return bitlog2_levels(q, spec.bitlog2_variant).to(q.dtype) / scale
    if spec.is_log:
        return scale * log_level_table(spec).to(q.device)[q.long()]
    zero_point = expand_params(zero_point, q.shape)
    if spec.zero_point_domain == "float":
        return (q - spec.qmin) * scale + zero_point
    return (q - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec, *,
                  ste: bool = False) -> torch.Tensor:
    """``dequantize(quantize(x))``; with ``ste=True`` gradients pass straight through the rounding
    (and are zero where the input is clipped). Without ``ste`` (inference) the common schemes take
    ``fake_quantize_inference``: the same values bit for bit, in fewer passes over ``x``. A ``Dynamic``
    spec takes its parameters from ``x`` first (``resolve_params``), then quantizes as a static one."""
    if isinstance(spec.granularity, Dynamic):
        scale, zero_point = resolve_params(x, scale, zero_point, spec)
    tracked = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)
    if not (ste or tracked or isinstance(spec.granularity, InstanceGroups)):
        return fake_quantize_inference(x, scale, zero_point, spec)
    scale, zero_point = resolve_params(x, scale, zero_point, spec)
    out = dequantize(quantize(x, scale, zero_point, spec, ste=ste), scale, zero_point, spec)
    if ste and spec.is_log:  # log codes are piecewise constant: pass the gradient straight through
        out = x + (out - x).detach()
    return out


def fake_quantize_inference(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                            spec: QuantSpec) -> torch.Tensor:
    """``dequantize(quantize(x))`` without gradients, equal to it bit for bit, in fewer passes:

    * uniform, integer zero point: ``round_clamp_centered_(x/s, z)·s``, in place after the division;
    * log2 / log√2: the level is a function of the count ``#{j : r ≤ T_j}`` alone: ``log_count``
      (read off the float32 bits of ``r``, instead of ``bucketize``'s binary search), then one
      int32-indexed gather from a per-spec table;
    * BitLog2: the level is a function of the integer input ``n`` alone: one gather from the ``M``
      levels (at most 65,536 floats), then ``/ δ``.
    Other forms (float zero point) take the reference composition."""
    if isinstance(spec.granularity, InstanceGroups):
        raise ConfigError("fake_quantize_inference: InstanceGroups parameters need resolve_params; use fake_quantize")
    if isinstance(spec.granularity, Dynamic):
        scale, zero_point = resolve_params(x, scale, zero_point, spec)
    if spec.scheme == "bitlog2":
        table = _on(bitlog2_level_by_input(spec.bitlog2_variant), x.device)
        return torch.take(table, bitlog2_input(x, spec.bitlog2_variant).long()).to(x.dtype) / expand_params(scale, x.shape)
    s = expand_params(scale, x.shape)
    if spec.is_log:
        table = _on(_log_tables(spec)[1], x.device)
        count = _log_count_int32(x / s, spec)
        if count is None:
            return s * torch.take(table, log_count(x / s, spec))
        return table.index_select(0, count.reshape(-1)).reshape(x.shape).mul_(s)  # int32 index: no int64 copy
    if spec.zero_point_domain == "float":
        return dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec)
    return round_clamp_centered_(x / s, expand_params(zero_point, x.shape), spec).mul_(s)


def grid_values(scale: float, zero_point: float, spec: QuantSpec) -> torch.Tensor:
    """Every value a per-tensor quantizer can output, ascending."""
    codes = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float32)
    if spec.is_log and spec.scheme != "bitlog2":
        codes = torch.cat([codes, torch.tensor([float(spec.zero_code)])])
    vals = dequantize(codes, torch.tensor(scale), torch.tensor(zero_point), spec)
    return torch.unique(vals)
