"""The one home of fxquant's quantizer math.

Every rounding rule, clamp, scale formula and code→value mapping used anywhere in fxquant (fake
quantization, calibration search, reparameterization, integer kernels' references, ONNX export)
is defined here and imported from here. Nothing else rounds.

Conventions (METHODS.md §0):

* Uniform affine, ``b`` bits: ``q = clamp(round(x / s) + z, qmin, qmax)``, ``x̂ = (q - z)·s``.
  Asymmetric codes are unsigned ``[0, 2^b - 1]`` with an integer zero point ``z``; symmetric codes
  are signed ``[-2^(b-1), 2^(b-1) - 1]`` with ``z = 0`` and ``s = amax / (2^(b-1) - 1)``.
  ``round`` is round-half-to-even (``torch.round``), the rule of ONNX ``QuantizeLinear``.
* Logarithmic, ``b`` bits, scale ``Δ`` (the largest representable value), step ``t`` (1 for log2,
  1/2 for log√2): ``c = round(-log2(x / Δ) / t)``; codes ``c ≥ 2^b`` and ``x ≤ 0`` map to the
  special zero code ``2^b``; otherwise ``c = clamp(c, 0, 2^b - 1)`` and ``x̂ = Δ·2^(-c·t)``.
  The rounding is evaluated exactly as comparisons of ``r = x / Δ`` with the float32 midpoints
  ``T_j = 2^(-t·(j - 1/2))`` (``c`` = the number of ``T_j ≥ r``), and values come from a float32
  level table: the same compares and gathers run in ONNX, so exported models match bit for bit.
  So a ``b``-bit log quantizer has ``2^b + 1`` output values (RepQ-ViT's 4-bit log√2 has 17).
  With ``fit_bits=True`` it has exactly ``2^b`` (BitLog2's Sqrt2_16): codes clamp to
  ``0..2^b - 2`` and zero takes code ``2^b - 1``.
  For integer arithmetic a non-zero level is a shift and a √2 factor: ``2^(-t·c) = 2^(-⌈t·c⌉)·√2^h``
  (``h = 1`` for odd log√2 codes; ``log_shifts``).
* BitLog2 (integer log2 of an attention probability ``x ∈ [0, 1]``, METHODS.md §2), variant
  ``(M, half)``: ``n = clamp(floor(x·M), 0, M - 1)``; ``n = 0`` is the zero code; else ``k`` = the
  MSB index of ``n`` and (half variants) ``h`` = the bit below it. Integer level ``D = 2^k
  (+ h·2^(k-1))``, value ``x̂ = D / δ`` with an integer ``δ`` (stored as the scale). Codes are level
  indices: 0 = zero, single: ``c = k + 1``, half: ``c = 1`` for ``k = 0`` else ``2k + h``; decoding
  a code back to ``(k, h)`` is ``bitlog2_shifts``. The same code is ``#{j : n ≥ D_j}`` over the
  non-zero levels (``bitlog2_codes_by_compare``, the form the ONNX exporter runs).

How codes are *stored* (signed offset, int4 packing) is ``fxquant.core.quant.codes``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch

from ..errors import ConfigError
from .granularity import Granularity, InstanceGroups, PerAxis, PerTensor

Scheme = Literal["uniform", "log2", "log_sqrt2"]
SCHEMES: tuple[str, ...] = ("uniform", "log2", "log_sqrt2", "bitlog2")
_LOG_STEP = {"log2": 1.0, "log_sqrt2": 0.5}
# BitLog2 variants: name -> (M, half). "16" variants have 16 levels (truly 4-bit), "17" have 17.
BITLOG2_VARIANTS: dict[str, tuple[int, bool]] = {
    "single16": (32768, False), "single17": (65536, False), "half16": (256, True), "half17": (384, True)}
MIN_BITS, MAX_BITS = 2, 8


# --------------------------------------------------------------------------------------------
# Range estimators (what range to quantize). The search itself lives in estimators.py; these are
# the frozen configs that name it.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimator:
    """Base class of range estimators."""

    def to_dict(self) -> dict:
        d = {"type": type(self).__name__}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @staticmethod
    def from_dict(d: dict) -> "Estimator":
        kinds = {c.__name__: c for c in (MinMax, Percentile, PctMSE, OMSE, JointGrid, SigmaClip)}
        d = dict(d)
        kind = d.pop("type")
        if kind not in kinds:
            raise ConfigError(f"unknown range estimator {kind!r}; known: {sorted(kinds)}")
        return kinds[kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class MinMax(Estimator):
    """Range = observed [min, max] (exact running extrema)."""


@dataclass(frozen=True)
class Percentile(Estimator):
    """Range = [Q(1 - p), Q(p)] with linear-interpolated quantiles."""

    p: float = 0.9999

    def __post_init__(self):
        if not 0.5 < self.p <= 1.0:
            raise ConfigError(f"Percentile.p must be in (0.5, 1], got {self.p}")


@dataclass(frozen=True)
class PctMSE(Estimator):
    """RepQ-ViT's search: for each ``p`` take [Q(1-p), Q(p)] and keep the one with the smallest
    mean squared quantization error (strict ``<``: the earlier ``p`` wins ties)."""

    percentiles: tuple[float, ...] = (0.999, 0.9999, 0.99999)

    def __post_init__(self):
        if not self.percentiles or any(not 0.5 < p <= 1.0 for p in self.percentiles):
            raise ConfigError(f"PctMSE.percentiles must be non-empty values in (0.5, 1], got {self.percentiles}")


@dataclass(frozen=True)
class OMSE(Estimator):
    """Optimal-MSE clipping: shrink [min, max] by ``alpha`` on a grid of ``grid`` values in
    (0, 1] and keep the range with the smallest mean squared error (Choukroun et al., 2019)."""

    grid: int = 100

    def __post_init__(self):
        if self.grid < 1:
            raise ConfigError(f"OMSE.grid must be >= 1, got {self.grid}")


@dataclass(frozen=True)
class JointGrid(Estimator):
    """APHQ-ViT's joint (scale, zero point) grid (METHODS.md §4 stage B): ``num_zp = min(max_zp, 2^b)``
    integer zero points centred on ``2^(b-1)`` times ``candidates // num_zp`` scales whose range
    width ``s·(2^b - 1)`` runs linearly from ``Q(hi_q) - Q(lo_q)`` to ``max - min``, plus the min-max
    pair; the pair with the smallest mean squared quantization error wins (first wins ties).
    Symmetric specs have one zero point (0), so all ``candidates`` go to scales."""

    candidates: int = 128
    max_zp: int = 16
    lo_q: float = 0.1
    hi_q: float = 0.9

    def __post_init__(self):
        if self.candidates < 1 or self.max_zp < 1:
            raise ConfigError(f"JointGrid.candidates and max_zp must be >= 1, got {self.candidates}, {self.max_zp}")
        if not 0.0 <= self.lo_q < self.hi_q <= 1.0:
            raise ConfigError(f"JointGrid needs 0 <= lo_q < hi_q <= 1, got lo_q={self.lo_q}, hi_q={self.hi_q}")


@dataclass(frozen=True)
class SigmaClip(Estimator):
    """Range = the mean ± ``num_std`` standard deviations (Bessel-corrected, ``torch.std``),
    intersected with [min, max]: clipping to ``μ ± kσ`` and then taking the min-max range of the
    clipped values, as OQFV, LoftQ and QLoRA's uniform baselines quantize weights (METHODS.md §6)."""

    num_std: float = 2.0

    def __post_init__(self):
        if not self.num_std > 0:
            raise ConfigError(f"SigmaClip.num_std must be > 0, got {self.num_std}")


# --------------------------------------------------------------------------------------------
# Quantizer spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSpec:
    """What one quantizer does: frozen, validated, JSON round-trippable.

    Args:
        bits: 2..8.
        scheme: ``"uniform"`` (affine), ``"log2"`` or ``"log_sqrt2"`` (for non-negative inputs
            such as softmax output).
        symmetric: uniform only; signed codes with zero point 0.
        granularity: ``PerTensor()``, ``PerAxis(axis)`` or ``PerGroup(size, axis)``.
        estimator: range estimator used at calibration.
        zero_in_range: uniform asymmetric only; widen the range to include 0 so the zero point is a
            valid code (deployable). RepQ-ViT's per-channel post-LayerNorm quantizers use False.
        integer_zero_point: uniform asymmetric only; False keeps a fractional zero point (only
            produced by bit-faithful RepQ-ViT reparameterization; not deployable).
        zero_point_domain: uniform asymmetric only. ``"int"`` (default): the integer code ``z``
            that represents 0, ``x̂ = (q - z)·s``. ``"float"`` (torchao's ``ZeroPointDomain.FLOAT``,
            the min-max grid of OQFV/LoftQ/QLoRA's uniform quantizers): ``zero_point`` holds the
            float value ``m`` of the lowest code, ``q = clamp(round((x - m) / s) + qmin)``,
            ``x̂ = (q - qmin)·s + m``; the grid spans exactly ``[lo, hi]`` and need not contain 0
            (``zero_in_range`` does not apply). ONNX QDQ and the integer kernels take int zero points only.
        fit_bits: log2/log√2 only; exactly ``2^b`` levels with zero inside the code range.
        bitlog2_variant: ``scheme="bitlog2"`` only: single16, single17, half16 or half17 (4 bits).
            Its scale δ comes from the closed-form MSE solution, whatever the estimator.
    """

    bits: int = 8
    scheme: Scheme = "uniform"
    symmetric: bool = False
    granularity: Granularity = field(default_factory=PerTensor)
    estimator: Estimator = field(default_factory=MinMax)
    zero_in_range: bool = True
    integer_zero_point: bool = True
    zero_point_domain: Literal["int", "float"] = "int"
    fit_bits: bool = False
    bitlog2_variant: str = ""

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(
                f"bits={self.bits!r} is not supported: fxquant quantizes to {MIN_BITS}..{MAX_BITS} bits; "
                f"leave a tensor in floating point by skipping its layer instead"
            )
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown quantizer scheme {self.scheme!r}; known: {list(SCHEMES)}")
        if self.scheme != "uniform" and self.symmetric:
            raise ConfigError(f"scheme {self.scheme!r} quantizes non-negative values; symmetric=True applies to 'uniform' only")
        if self.fit_bits and self.scheme not in _LOG_STEP:
            raise ConfigError("fit_bits applies to the 'log2' and 'log_sqrt2' schemes only")
        if self.scheme == "bitlog2":
            if self.bitlog2_variant not in BITLOG2_VARIANTS:
                raise ConfigError(f"bitlog2_variant must be one of {sorted(BITLOG2_VARIANTS)}, got {self.bitlog2_variant!r}")
            if self.bits != 4:
                raise ConfigError(f"BitLog2 variants are 4-bit quantizers; got bits={self.bits}")
        elif self.bitlog2_variant:
            raise ConfigError("bitlog2_variant applies to scheme='bitlog2' only")
        if not isinstance(self.granularity, Granularity):
            raise ConfigError(f"granularity must be PerTensor(), PerAxis(axis) or PerGroup(size), got {self.granularity!r}")
        if not isinstance(self.estimator, Estimator):
            raise ConfigError(f"estimator must be MinMax(), Percentile(p), PctMSE(), OMSE(), JointGrid() or SigmaClip(), "
                              f"got {self.estimator!r}")
        if isinstance(self.granularity, InstanceGroups):
            if self.scheme != "uniform":
                raise ConfigError(f"InstanceGroups quantizers are uniform (IGQ-ViT); got scheme {self.scheme!r}")
            if not isinstance(self.estimator, (MinMax, Percentile)):
                raise ConfigError("InstanceGroups quantizers take their group ranges from k-means over per-instance "
                                  "[min, max] ranges, then MinMax (envelope) or Percentile(p) over each group's "
                                  f"members; got {type(self.estimator).__name__}")
        if self.zero_point_domain not in ("int", "float"):
            raise ConfigError(f"zero_point_domain must be 'int' or 'float', got {self.zero_point_domain!r}")
        if self.zero_point_domain == "float" and (self.scheme != "uniform" or self.symmetric
                                                  or isinstance(self.granularity, InstanceGroups)):
            raise ConfigError("zero_point_domain='float' applies to uniform asymmetric per-tensor/axis/group quantizers only")
        if isinstance(self.estimator, JointGrid) and self.scheme != "uniform":
            raise ConfigError(f"the JointGrid estimator searches uniform (scale, zero point) pairs; scheme {self.scheme!r} "
                              f"needs another estimator (PctMSE)")

    @property
    def qmin(self) -> int:
        if self.scheme != "uniform":
            return 0
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest code (uniform) or largest non-zero log code."""
        if self.scheme == "bitlog2":
            return _bitlog2_max_code(self.bitlog2_variant)
        if self.scheme != "uniform":
            return 2**self.bits - 2 if self.fit_bits else 2**self.bits - 1
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def zero_code(self) -> int:
        """Log schemes: the code that decodes to 0."""
        if self.scheme == "bitlog2":
            return 0
        return 2**self.bits - 1 if self.fit_bits else 2**self.bits

    @property
    def is_log(self) -> bool:
        return self.scheme != "uniform"

    def with_(self, **changes) -> "QuantSpec":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "scheme": self.scheme,
            "symmetric": self.symmetric,
            "granularity": self.granularity.to_dict(),
            "estimator": self.estimator.to_dict(),
            "zero_in_range": self.zero_in_range,
            "integer_zero_point": self.integer_zero_point,
            "zero_point_domain": self.zero_point_domain,
            "fit_bits": self.fit_bits,
            "bitlog2_variant": self.bitlog2_variant,
        }

    @staticmethod
    def from_dict(d: dict) -> "QuantSpec":
        d = dict(d)
        d["granularity"] = Granularity.from_dict(d["granularity"])
        d["estimator"] = Estimator.from_dict(d["estimator"])
        return QuantSpec(**d)

    def short(self) -> str:
        g = self.granularity
        gs = "tensor" if isinstance(g, PerTensor) else f"axis{g.axis}" if isinstance(g, PerAxis) else (
            f"igroups{g.num_groups}@{g.axis}" if isinstance(g, InstanceGroups) else f"group{g.group_size}")
        kind = {"uniform": "sym" if self.symmetric else "asym"}.get(self.scheme, self.scheme)
        fzp = "_fzp" if self.zero_point_domain == "float" else ""
        kind = self.bitlog2_variant or (kind + ("_fit" if self.fit_bits else "") + fzp)
        return f"{kind}{self.bits}/{gs}/{type(self.estimator).__name__}"


# --------------------------------------------------------------------------------------------
# Parameter layout helpers
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Rounding
# --------------------------------------------------------------------------------------------


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even with a straight-through gradient (identity in the backward pass)."""
    return x + (torch.round(x) - x).detach()


def _round(x: torch.Tensor, ste: bool) -> torch.Tensor:
    return round_ste(x) if ste else torch.round(x)


# --------------------------------------------------------------------------------------------
# Choosing parameters from a range
# --------------------------------------------------------------------------------------------


def choose_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map the range ``[lo, hi]`` onto ``spec``'s code range.

    Uniform asymmetric: ``s = (hi - lo) / (qmax - qmin)``, ``z = qmin - round(lo / s)``
    (= RepQ's ``round(-lo / s)`` for unsigned codes). Uniform symmetric: ``s = max(|lo|, |hi|) / qmax``,
    ``z = 0``. Log schemes: ``Δ = hi``, ``z = 0``. A zero-width range gets the smallest positive
    scale instead of dividing by zero (METHODS.md §1 pitfall (e)).
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


# --------------------------------------------------------------------------------------------
# Instance-aware groups (IGQ-ViT): per-instance assignment of slices to static group quantizers
# --------------------------------------------------------------------------------------------


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


def resolve_params(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters that broadcast against ``x``: for ``InstanceGroups`` the assigned group's
    ``(s, z)`` per instance and slice (gathered from the ``[G]`` parameters); otherwise unchanged."""
    if not isinstance(spec.granularity, InstanceGroups) or scale.dim() == x.dim():
        return scale, zero_point
    idx = instance_groups(x, scale, zero_point, spec)
    return scale[idx], zero_point[idx]


# --------------------------------------------------------------------------------------------
# Quantize / dequantize
# --------------------------------------------------------------------------------------------


def log_step(spec: QuantSpec) -> float:
    """The exponent step ``t`` of a log scheme: 1 for log2, 1/2 for log√2 (code ``c`` stands for
    ``Δ·2^(-t·c)``)."""
    if spec.scheme not in _LOG_STEP:
        raise ValueError(f"log_step takes a log2/log_sqrt2 spec, got {spec.scheme!r}")
    return _LOG_STEP[spec.scheme]


def log_shifts(codes: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The level ``2^(-t·c)`` of non-zero log codes as an integer shift and a √2 factor:
    ``2^(-t·c) = 2^(-s)·√2^h`` with ``s = ⌈t·c⌉`` and ``h = 1`` for odd log√2 codes (else 0).
    Returns ``(s, h)`` (int64); the zero code (``c > qmax``) is the caller's to mask."""
    c = codes.to(torch.int64)
    if log_step(spec) == 1.0:
        return c, torch.zeros_like(c)
    h = torch.bitwise_and(c, 1)
    return torch.bitwise_right_shift(c + h, 1), h


def _bitlog2_max_code(variant: str) -> int:
    m, half = BITLOG2_VARIANTS[variant]
    k = (m - 1).bit_length() - 1
    return 2 * k + int((m - 1) >= 3 * 2 ** (k - 1)) if half else k + 1


def msb_index(n: torch.Tensor) -> torch.Tensor:
    """Index of the most significant set bit of non-negative int32 ``n < 2^16`` (-1 for 0),
    with shifts and compares only (a 4-step binary search)."""
    n = n.to(torch.int32)
    k = torch.zeros_like(n)
    for step in (8, 4, 2, 1):
        up = (torch.bitwise_right_shift(n, k + step) > 0).to(torch.int32)
        k = k + step * up
    return torch.where(n > 0, k, torch.full_like(k, -1))


def bitlog2_input(x: torch.Tensor, variant: str) -> torch.Tensor:
    """``n = clamp(floor(x·M), 0, M - 1)`` as int32 (floor = truncation toward 0 for x ≥ 0)."""
    m, _ = BITLOG2_VARIANTS[variant]
    return torch.clamp(torch.floor(x.float() * m), 0, m - 1).to(torch.int32)


def bitlog2_codes_from_int(n: torch.Tensor, variant: str) -> torch.Tensor:
    """Level-index codes (int32, 0 = zero) of integer inputs ``n``, shifts and compares only."""
    _, half = BITLOG2_VARIANTS[variant]
    k = msb_index(n)
    if not half:
        return torch.where(n > 0, k + 1, torch.zeros_like(k))
    below = torch.bitwise_and(torch.bitwise_right_shift(n, (k - 1).clamp(min=0)), 1)
    c = torch.where(k >= 1, 2 * k + below, torch.ones_like(k))
    return torch.where(n > 0, c, torch.zeros_like(c))


def bitlog2_shifts(codes: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode BitLog2 codes to ``(k, h)`` (int32), ``D = 2^k + h·2^(k-1)``: single variants
    ``k = c - 1``, ``h = 0``; half variants ``k = c >> 1``, ``h = c & 1`` for ``c ≥ 2`` and
    ``(0, 0)`` (D = 1) for ``c = 1``. Code 0 (zero) gives ``(0, 0)`` too: the caller masks it."""
    _, half = BITLOG2_VARIANTS[variant]
    c = codes.to(torch.int32)
    zero = torch.zeros_like(c)
    if not half:
        return (c - 1).clamp(min=0), zero
    two = c >= 2
    return torch.where(two, torch.bitwise_right_shift(c, 1), zero), torch.where(two, torch.bitwise_and(c, 1), zero)


def bitlog2_levels(codes: torch.Tensor, variant: str) -> torch.Tensor:
    """Integer level ``D`` (int32) of BitLog2 codes, shifts only (``bitlog2_shifts``)."""
    k, h = bitlog2_shifts(codes, variant)
    one = torch.ones_like(k)
    d = torch.bitwise_left_shift(one, k) + h * torch.bitwise_left_shift(one, (k - 1).clamp(min=0))
    return torch.where(codes.to(torch.int32) > 0, d, torch.zeros_like(d))


def bitlog2_delta(sum_xd: float, sum_dd: float, sum_xx: float, max_level: int, variant: str) -> int:
    """MSE-optimal integer δ for ``x̂ = D/δ`` from streamed sums (METHODS.md §2).

    ``mean((x - D/δ)²)`` is a convex quadratic in ``t = 1/δ`` with minimum ``t* = ΣxD / ΣD²``;
    over integers δ the optimum is one of the two bracketing ``1/t*``, clipped to
    ``[max D, M - 1]`` (so ``x̂ ≤ 1``)."""
    m, _ = BITLOG2_VARIANTS[variant]
    lo, hi = max(1, int(max_level)), m - 1
    if sum_dd <= 0 or sum_xd <= 0:
        return hi

    def loss(d: int) -> float:
        return sum_xx - 2.0 * sum_xd / d + sum_dd / (d * d)

    inv = sum_dd / sum_xd
    cands = {min(max(int(math.floor(inv)), lo), hi), min(max(int(math.ceil(inv)), lo), hi)}
    return min(sorted(cands), key=loss)


def log_thresholds(spec: QuantSpec) -> torch.Tensor:
    """Rounding midpoints ``T_j = 2^(-t·(j - 1/2))``, j = 1..2^b (descending, float32): ``r ≤ T_j``
    means the code of ``r = x/Δ`` is at least ``j``; reaching ``T_{2^b}`` means zero."""
    step = log_step(spec)
    j = torch.arange(1, 2**spec.bits + 1, dtype=torch.float64)
    return torch.exp2(-step * (j - 0.5)).float()


def log_level_table(spec: QuantSpec) -> torch.Tensor:
    """Value of each log code at Δ = 1 (float32), the zero code last: ``x̂ = Δ·table[c]``."""
    step = log_step(spec)
    vals = torch.exp2(-step * torch.arange(spec.qmax + 1, dtype=torch.float32))
    return torch.cat([vals, torch.zeros(spec.zero_code - spec.qmax)])


def bitlog2_level_table(variant: str) -> torch.Tensor:
    """Integer levels ``D`` of every BitLog2 code, ascending (code = index)."""
    return bitlog2_levels(torch.arange(_bitlog2_max_code(variant) + 1), variant)


def bitlog2_compare_levels(variant: str) -> torch.Tensor:
    """The non-zero levels ``D_1 < D_2 < ...`` (float32) that ``bitlog2_codes_by_compare`` counts."""
    return bitlog2_level_table(variant)[1:].float()


def bitlog2_codes_by_compare(n: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``bitlog2_codes_from_int`` by compares (int64): the code of ``n`` is ``#{j : n ≥ D_j}`` over
    ``levels = bitlog2_compare_levels(variant)``. The ONNX exporter's form (``GreaterOrEqual`` +
    ``ReduceSum``, no bit operations); equal to the shift form on every ``n`` in ``[0, M)``."""
    return (n.unsqueeze(-1) >= levels).sum(-1)


def log_code_of_count(count: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The log code of ``r = x / Δ`` from ``count = #{j : r ≤ T_j}`` (module doc): all ``2^b``
    midpoints reached (or ``r ≤ 0``) is the zero code, otherwise ``min(count, qmax)``. fxquant counts
    with ``bucketize``; the ONNX exporter with ``log_count_by_compare``; both end here."""
    return torch.where(count >= 2**spec.bits, torch.full_like(count, spec.zero_code), count.clamp(max=spec.qmax))


def log_count_by_compare(ratio: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``count = #{j : r ≤ T_j}`` by compares (``thresholds = log_thresholds(spec)``): the ONNX
    exporter's form (``LessOrEqual`` + ``ReduceSum``) of ``log_codes``' ``bucketize`` count."""
    return (ratio.unsqueeze(-1) <= thresholds).sum(-1)


def log_codes(ratio: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes (int64) of ``r = x / Δ``: the count of midpoints ``T_j ≥ r``, capped (see module doc);
    the count is ``log_count``'s (equal to ``bucketize`` against the midpoints, tested)."""
    return log_code_of_count(log_count(ratio, spec), spec)


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
    ``fake_quantize_inference``: the same values bit for bit, in fewer passes over ``x``."""
    tracked = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)
    if not (ste or tracked or isinstance(spec.granularity, InstanceGroups)):
        return fake_quantize_inference(x, scale, zero_point, spec)
    scale, zero_point = resolve_params(x, scale, zero_point, spec)
    out = dequantize(quantize(x, scale, zero_point, spec, ste=ste), scale, zero_point, spec)
    if ste and spec.is_log:  # log codes are piecewise constant: pass the gradient straight through
        out = x + (out - x).detach()
    return out


@functools.lru_cache(maxsize=None)
def _log_tables(spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, V)`` for ``log_count`` and ``fake_quantize_inference``: the midpoints padded as
    ``[NaN, T_1..T_n, NaN]`` (every compare with the pads is false, so the count stays in
    ``[0, n]``) and the level (Δ = 1) of every count ``0..n`` (``log_level_table[log_code_of_count]``)."""
    t = log_thresholds(spec)
    padded = torch.cat([torch.tensor([math.nan]), t, torch.tensor([math.nan])])
    count = torch.arange(t.numel() + 1)
    return padded, log_level_table(spec)[log_code_of_count(count, spec)]


@functools.lru_cache(maxsize=None)
def _log_mantissas(spec: QuantSpec) -> tuple[float, ...] | None:
    """The midpoints as mantissas and exponents (``frexp``): ``T_j`` has exponent ``-⌊(j-1)/p⌋``
    and mantissa ``m_{(j-1) mod p}`` with ``p = 1/t`` levels per octave (log2: 1, log√2: 2), as
    float32 scales by powers of two exactly. Returns ``(m_0, .., m_{p-1})``, or None when the float32
    table does not have that form (midpoints that underflow, e.g. 8-bit log2)."""
    t = log_thresholds(spec)
    per = round(1 / log_step(spec))
    m, e = torch.frexp(t)
    j = torch.arange(t.numel())
    mants = m[:per]
    if not (torch.equal(e, -(j // per).to(e.dtype)) and torch.equal(m, mants[j % per])):
        return None
    return tuple(float(v) for v in mants)


_SMALLEST_NORMAL = float(torch.finfo(torch.float32).smallest_normal)


@functools.lru_cache(maxsize=None)
def _log_mantissa_fields(spec: QuantSpec) -> tuple[int, ...] | None:
    """The 23-bit fraction fields of ``_log_mantissas`` (each in ``[0.5, 1)``): for a normal float32
    ``r = (0.5 + f·2^-24)·2^(E-126)`` (``E`` its biased exponent, ``f`` its fraction field), ``m_r ≤ m_k``
    exactly when ``f ≤ f_k``."""
    mants = _log_mantissas(spec)
    if mants is None:
        return None
    return tuple(int(torch.tensor([m], dtype=torch.float32).view(torch.int32).item()) & 0x7FFFFF for m in mants)


def _log_count_int32(ratio: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """``log_count`` as int32, from the float32 bits of ``r`` (no ``frexp``): with the biased exponent
    ``E`` and fraction field ``f``, ``count = clamp(-p·(E - 126) + #{k : f ≤ f_k}, 0, n)``. ``r`` is
    first clamped to ``[smallest normal, 2]`` (every midpoint is a normal float32 below 2, so the
    count is unchanged: subnormals count ``n`` like 0 does, values above 1 count 0). None when the
    midpoints do not have the mantissa/exponent form."""
    fields = _log_mantissa_fields(spec)
    if fields is None:
        return None
    padded, _ = _log_tables(spec)
    n, p = padded.numel() - 2, len(fields)
    r = ratio.float().nan_to_num(nan=2.0, posinf=2.0, neginf=0.0).clamp_(_SMALLEST_NORMAL, 2.0)
    bits = r.view(torch.int32)
    count = torch.bitwise_right_shift(bits, 23).mul_(-p).add_(126 * p)
    bits.bitwise_and_(0x7FFFFF)
    for f in fields:
        count += bits <= f
    return count.clamp_(0, n)


def log_count(ratio: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``#{j : r ≤ T_j}`` (int64), equal to ``log_codes``' ``bucketize`` count (tested on every
    float32 near each midpoint), without a binary search: the midpoints are ``m_k·2^(-i)``
    (``_log_mantissas``), so with ``r = m_r·2^(e_r)`` the count is ``clamp(-p·e_r + #{k : m_r ≤ m_k},
    0, n)``, read off the float32 bits of ``r`` (``_log_count_int32``). ``r ≤ 0`` counts ``n`` and NaN
    counts 0, as with ``bucketize`` (NaN and ±inf are mapped to values with those counts first).
    Tables without that form fall back to a ``log2`` estimate corrected by two exact compares."""
    count = _log_count_int32(ratio, spec)
    if count is not None:
        return count.long()
    padded, _ = _log_tables(spec)
    n = padded.numel() - 2
    padded = _on(padded, ratio.device)
    r = ratio.float().clamp(min=0)  # every midpoint is ≥ a negative r, as it is ≥ 0
    est = (0.5 - torch.log2(r) / log_step(spec)).floor_().nan_to_num_(nan=0, posinf=n, neginf=0).clamp_(0, n)
    c = est.long()
    c += (torch.take(padded, c + 1) >= r).long()
    c -= (torch.take(padded, c) < r).long()
    return c


@functools.lru_cache(maxsize=None)
def bitlog2_level_by_input(variant: str) -> torch.Tensor:
    """Level ``D`` (float32, exact integers) of every integer BitLog2 input ``n`` in ``[0, M)``:
    ``bitlog2_levels(bitlog2_codes_from_int(n))`` as a table (at most 65,536 entries)."""
    m, _ = BITLOG2_VARIANTS[variant]
    return bitlog2_levels(bitlog2_codes_from_int(torch.arange(m, dtype=torch.int32), variant), variant).float()


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


def _on(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    return table if table.device == device else table.to(device)


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


# --------------------------------------------------------------------------------------------
# AdaRound (Nagel et al., 2020): learned up/down rounding of weights
# --------------------------------------------------------------------------------------------

ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """``h(α) = clamp(σ(α)·(ζ - γ) + γ, 0, 1)`` with ζ = 1.1, γ = -0.1: the soft rounding offset."""
    return (torch.sigmoid(alpha) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA).clamp(0.0, 1.0)


def adaround_init(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``α`` with ``h(α) = frac(w / s)``: soft rounding starts at the exact value ``w / s``, and
    hard rounding (``α ≥ 0``) starts as round-to-nearest (ties up)."""
    x = w / expand_params(scale, w.shape)
    frac = (x - torch.floor(x)).clamp(0.0, 1.0)
    return -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (frac - ADAROUND_GAMMA) - 1.0)


def adaround_fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec,
                           alpha: torch.Tensor, *, hard: bool = False) -> torch.Tensor:
    """Uniform fake quantization with rounding ``floor(w / s) + h``: ``h = h(α)`` (soft, differentiable
    in ``α``) or ``h = [α ≥ 0]`` (hard: the codes are integers and the result lies on the grid, so
    ``fake_quantize`` of it returns it unchanged). ``w`` is a constant; codes clamp as in ``quantize``."""
    if spec.scheme != "uniform":
        raise ConfigError(f"AdaRound learns uniform rounding; got a {spec.scheme!r} weight quantizer")
    s = expand_params(scale, w.shape)
    z = expand_params(zero_point, w.shape)
    h = (alpha >= 0).to(w.dtype) if hard else rectified_sigmoid(alpha)
    q = torch.clamp(torch.floor(w.detach() / s) + h + z, spec.qmin, spec.qmax)
    return (q - z) * s


def adaround_regularizer(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """``Σ 1 - |2h(α) - 1|^β``: zero when every offset is 0 or 1; β is annealed from large (only
    offsets near 0/1 are pulled) to small (all are pulled)."""
    return (1.0 - (2.0 * rectified_sigmoid(alpha) - 1.0).abs().pow(beta)).sum()


def grid_values(scale: float, zero_point: float, spec: QuantSpec) -> torch.Tensor:
    """Every value a per-tensor quantizer can output, ascending."""
    codes = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float32)
    if spec.is_log and spec.scheme != "bitlog2":
        codes = torch.cat([codes, torch.tensor([float(spec.zero_code)])])
    vals = dequantize(codes, torch.tensor(scale), torch.tensor(zero_point), spec)
    return torch.unique(vals)


ESTIMATOR_NAMES = ("minmax", "percentile[:p]", "pctmse", "omse[:grid]", "grid[:candidates]", "sigma[:num_std]")


def estimator_from_name(name: str | Estimator) -> Estimator:
    """Parse ``"minmax"``, ``"percentile"``/``"percentile:0.999"``, ``"pctmse"``, ``"omse"``/``"omse:200"``,
    ``"grid"``/``"grid:128"`` (APHQ-ViT's joint scale/zero-point grid), ``"sigma"``/``"sigma:3"`` (μ ± kσ clipping)."""
    if isinstance(name, Estimator):
        return name
    kind, _, arg = str(name).lower().partition(":")
    try:
        if kind == "minmax" and not arg:
            return MinMax()
        if kind == "percentile":
            return Percentile(float(arg)) if arg else Percentile()
        if kind == "pctmse" and not arg:
            return PctMSE()
        if kind == "omse":
            return OMSE(int(arg)) if arg else OMSE()
        if kind == "grid":
            return JointGrid(int(arg)) if arg else JointGrid()
        if kind == "sigma":
            return SigmaClip(float(arg)) if arg else SigmaClip()
    except ValueError:
        pass
    raise ConfigError(f"unknown range estimator {name!r}; use one of {list(ESTIMATOR_NAMES)}")
