"""Parameters decided per input at run time: instance-aware groups (IGQ-ViT, docs/methods.md, IGQ-ViT),
the per-instance assignment of slices to static group quantizers, and dynamic ranges (``Dynamic``: each
image's, token's or token-group's own ``[min, max]``); ``resolve_params`` gives either as parameters
that broadcast against the input.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .affine import choose_qparams
from .granularity import Dynamic, InstanceGroups
from .spec import QuantSpec


def slice_ranges(x: torch.Tensor, g: InstanceGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-instance ``[min, max]`` of every slice along ``g.axis`` (float32, ``x``'s shape with the
    statistics dimensions kept as size 1)."""
    dims = g.stat_dims(x.dim())
    xf = x.detach().float()
    if not dims:
        return xf, xf
    return xf.amin(dim=dims, keepdim=True), xf.amax(dim=dims, keepdim=True)


def group_ranges(scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The value range ``[(qmin - z)·s, (qmax - z)·s]`` of each group quantizer (``[G]`` each)."""
    return (spec.qmin - zero_point) * scale, (spec.qmax - zero_point) * scale


def instance_groups(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """IGQ-ViT's group assignment (int64, ``x``'s shape with the statistics dimensions of size 1):
    each slice goes to the *narrowest group whose range covers* the slice's own range in this
    instance, ``[min, max] ⊆ [l_g - s_g/2, u_g + s_g/2]`` (a value within half a step outside the
    grid is off by no more than rounding); when no group covers it, to the group that clips it
    least, ``relu(l_g - s_g/2 - min) + relu(max - u_g - s_g/2)`` (ties: the lower group index). This is the
    assignment with the smallest quantization step that does not clip, which the nearest-range rule
    ``(min - l_g)² + (max - u_g)²`` is not: it sends a slice ``[-0.1, 2.9]`` to a group
    ``[-0.5, 0.6]`` rather than ``[-3, 3]``. Cost at inference: one min/max reduction over ``x``
    and ``G`` comparisons per slice."""
    g = spec.granularity
    if not isinstance(g, InstanceGroups):
        raise ConfigError(f"instance_groups needs an InstanceGroups spec, got {spec.short()}")
    if scale.dim() != 1 or scale.numel() != g.num_groups:
        raise ConfigError(f"instance-group quantizer parameters must have shape [{g.num_groups}], got {tuple(scale.shape)}")
    mn, mx = slice_ranges(x, g)
    lo, hi = group_ranges(scale.float(), zero_point.float(), spec)
    half = scale.float() / 2
    clip = torch.relu(lo - half - mn.unsqueeze(-1)) + torch.relu(mx.unsqueeze(-1) - hi - half)
    width = hi - lo
    score = torch.where(clip > 0, clip + width.max() + 1.0, width.expand_as(clip))
    return score.argmin(dim=-1)


def dynamic_ranges(x: torch.Tensor, g: Dynamic) -> tuple[torch.Tensor, torch.Tensor]:
    """Each input's own ``[min, max]`` in ``g``'s parameter layout for ``x`` (``g.param_shape``), float32,
    detached (a straight-through estimator: gradients do not flow through the range). Per image
    (``level="tensor"``: over all but the first dimension), per token (over the last dimension), or
    per token and contiguous channel group. Plain reductions and reshapes, so that the ONNX exporter
    writes them as ``ReduceMin``/``ReduceMax`` with a dynamic batch."""
    xf = x.detach().float()
    if g.level == "tensor":
        if xf.dim() <= 1:  # no instance dimension: one range for the whole tensor
            return xf.amin().reshape((1,) * xf.dim()), xf.amax().reshape((1,) * xf.dim())
        flat = xf.flatten(1)
        shape = (-1,) + (1,) * (xf.dim() - 1)
        return flat.amin(1).reshape(shape), flat.amax(1).reshape(shape)
    if g.group_size:
        g.param_shape(tuple(xf.shape), weight=False)  # the group size must divide C: a ConfigError naming both
        grouped = xf.unflatten(-1, (-1, g.group_size))
        return grouped.amin(-1), grouped.amax(-1)
    return xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)


def dynamic_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero point)`` of a ``Dynamic`` spec for this input: ``dynamic_ranges`` through the rule
    calibrated ranges use (``affine.choose_qparams``: asymmetric with an integer zero point, 0 in
    range as the spec says; symmetric from ``max(|min|, |max|)``), in the parameter layout."""
    if not isinstance(spec.granularity, Dynamic):
        raise ConfigError(f"dynamic_qparams needs a Dynamic spec, got {spec.short()}")
    return choose_qparams(*dynamic_ranges(x, spec.granularity), spec)


def resolve_params(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters that broadcast against ``x``: for ``InstanceGroups`` the assigned group's
    ``(s, z)`` per instance and slice (gathered from the ``[G]`` parameters); for ``Dynamic`` specs
    without parameters (a ``FakeQuantize`` stores none) ``x``'s own (``dynamic_qparams``); otherwise,
    and for parameters already resolved against ``x``, unchanged."""
    if isinstance(spec.granularity, Dynamic):
        return dynamic_qparams(x, spec) if scale.numel() == 0 else (scale, zero_point)
    if not isinstance(spec.granularity, InstanceGroups) or scale.dim() == x.dim():
        return scale, zero_point
    idx = instance_groups(x, scale, zero_point, spec)
    return scale[idx], zero_point[idx]
