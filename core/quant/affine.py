"""Uniform affine quantization: rounding, choosing (scale, zero point) from a range, and the
in-place round-and-clamp of ``fake_quantize_inference`` and ``codes.to_signed_codes``.

Conventions (docs/methods.md, Conventions; the logarithmic schemes' are in ``logcodes.py``):

* Uniform affine, ``b`` bits: ``q = clamp(round(x / s) + z, qmin, qmax)``, ``x̂ = (q - z)·s``.
  Asymmetric codes are unsigned ``[0, 2^b - 1]`` with an integer zero point ``z``; symmetric codes
  are signed ``[-2^(b-1), 2^(b-1) - 1]`` with ``z = 0`` and ``s = amax / (2^(b-1) - 1)``.
  ``round`` is round-half-to-even (``torch.round``), the rule of ONNX ``QuantizeLinear``.

``choose_qparams`` also gives the log schemes' scale (``Δ = hi``).
"""

from __future__ import annotations

import torch

from .spec import QuantSpec


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even with a straight-through gradient (identity in the backward pass)."""
    return x + (torch.round(x) - x).detach()


def _round(x: torch.Tensor, ste: bool) -> torch.Tensor:
    return round_ste(x) if ste else torch.round(x)


def choose_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map the range ``[lo, hi]`` onto ``spec``'s code range.

    Uniform asymmetric: ``s = (hi - lo) / (qmax - qmin)``, ``z = qmin - round(lo / s)``
    (= RepQ's ``round(-lo / s)`` for unsigned codes). Uniform symmetric: ``s = max(|lo|, |hi|) / qmax``,
    ``z = 0``. Log schemes: ``Δ = hi``, ``z = 0``. A zero-width range gets the smallest positive
    scale instead of dividing by zero (docs/methods.md, RepQ-ViT).
    """
    lo = lo.float()
    hi = hi.float()
    tiny = torch.finfo(torch.float32).tiny
    if spec.scheme == "bitlog2":
        raise ValueError("BitLog2's δ is not chosen from a range; use bitlog2_delta() (closed form)")
    if spec.is_log:
        return hi.clamp(min=tiny), torch.zeros_like(hi)
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return (amax / spec.qmax).clamp(min=tiny), torch.zeros_like(amax)
    if spec.zero_point_domain == "float":
        return ((hi - lo) / float(spec.qmax - spec.qmin)).clamp(min=tiny), lo.clone()
    if spec.zero_in_range:
        lo = lo.clamp(max=0.0)
        hi = hi.clamp(min=0.0)
    scale = ((hi - lo) / float(spec.qmax - spec.qmin)).clamp(min=tiny)
    zero_point = spec.qmin - torch.round(lo / scale)
    if spec.zero_in_range:
        zero_point = zero_point.clamp(spec.qmin, spec.qmax)
    return scale, zero_point


def round_clamp_centered(y: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``round_clamp_centered_`` out of place, in ops ``torch.onnx.export`` writes as ``Round`` and
    ``Clip`` (the float export forms of per-axis and dynamic quantizers: then ``·s``)."""
    return torch.clamp(torch.round(y), spec.qmin - z, spec.qmax - z)


def round_clamp_centered_(y: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """In place: ``y = x/s`` rounded and clamped to ``[qmin - z, qmax - z]``, which is
    ``quantize(x) - z`` exactly for an integer zero point ``z`` (broadcast against ``y``): every term
    is an integer-valued float, and a quotient so large that ``+ z`` would round is clamped either
    way. Shared by ``fake_quantize_inference`` (then ``·s``) and ``codes.to_signed_codes`` (then
    ``+ z - offset``)."""
    y.round_()
    if z.numel() == 1 and z.device.type == "cpu":  # scalar bounds: a cheaper clamp, no device sync on CPU
        zf = float(z)
        return y.clamp_(spec.qmin - zf, spec.qmax - zf)
    return y.clamp_(min=(spec.qmin - z).to(y.dtype), max=(spec.qmax - z).to(y.dtype))
