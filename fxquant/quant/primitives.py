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
  So a ``b``-bit log quantizer has ``2^b + 1`` output values (RepQ-ViT's 4-bit log√2 has 17).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch

from ..errors import ConfigError
from .granularity import Granularity, PerAxis, PerGroup, PerTensor

Scheme = Literal["uniform", "log2", "log_sqrt2"]
SCHEMES: tuple[str, ...] = ("uniform", "log2", "log_sqrt2")
_LOG_STEP = {"log2": 1.0, "log_sqrt2": 0.5}
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
        kinds = {c.__name__: c for c in (MinMax, Percentile, PctMSE, OMSE)}
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
    """

    bits: int = 8
    scheme: Scheme = "uniform"
    symmetric: bool = False
    granularity: Granularity = field(default_factory=PerTensor)
    estimator: Estimator = field(default_factory=MinMax)
    zero_in_range: bool = True
    integer_zero_point: bool = True

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
        if not isinstance(self.granularity, Granularity):
            raise ConfigError(f"granularity must be PerTensor(), PerAxis(axis) or PerGroup(size), got {self.granularity!r}")
        if not isinstance(self.estimator, Estimator):
            raise ConfigError(f"estimator must be MinMax(), Percentile(p), PctMSE() or OMSE(), got {self.estimator!r}")

    @property
    def qmin(self) -> int:
        if self.scheme != "uniform":
            return 0
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        if self.scheme != "uniform":
            return 2**self.bits - 1
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

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
        }

    @staticmethod
    def from_dict(d: dict) -> "QuantSpec":
        d = dict(d)
        d["granularity"] = Granularity.from_dict(d["granularity"])
        d["estimator"] = Estimator.from_dict(d["estimator"])
        return QuantSpec(**d)

    def short(self) -> str:
        g = self.granularity
        gs = "tensor" if isinstance(g, PerTensor) else f"axis{g.axis}" if isinstance(g, PerAxis) else f"group{g.group_size}"
        kind = {"uniform": "sym" if self.symmetric else "asym"}.get(self.scheme, self.scheme)
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
                raise ConfigError(f"quantization parameters of shape {tuple(p.shape)} do not fit a tensor of shape {tuple(shape)}")
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
    if spec.is_log:
        return hi.clamp(min=tiny), torch.zeros_like(hi)
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return (amax / spec.qmax).clamp(min=tiny), torch.zeros_like(amax)
    if spec.zero_in_range:
        lo = lo.clamp(max=0.0)
        hi = hi.clamp(min=0.0)
    scale = ((hi - lo) / float(spec.qmax - spec.qmin)).clamp(min=tiny)
    zero_point = spec.qmin - torch.round(lo / scale)
    if spec.zero_in_range:
        zero_point = zero_point.clamp(spec.qmin, spec.qmax)
    return scale, zero_point


# --------------------------------------------------------------------------------------------
# Quantize / dequantize
# --------------------------------------------------------------------------------------------


def log_zero_code(bits: int) -> int:
    """The special code of a log quantizer that decodes to 0."""
    return 2**bits


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec, *, ste: bool = False) -> torch.Tensor:
    """Integer codes (as a float tensor holding integers) of ``x``; parameters in granularity layout."""
    scale = expand_params(scale, x.shape)
    if spec.is_log:
        step = _LOG_STEP[spec.scheme]
        zero = float(log_zero_code(spec.bits))
        safe = torch.where(x > 0, x, torch.ones_like(x))
        c = _round(-torch.log2(safe / scale) / step, ste)
        is_zero = (x <= 0) | (c >= zero)
        c = torch.clamp(c, 0, spec.qmax)
        return torch.where(is_zero, torch.full_like(c, zero), c)
    zero_point = expand_params(zero_point, x.shape)
    return torch.clamp(_round(x / scale, ste) + zero_point, spec.qmin, spec.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Values of integer codes ``q`` (inverse of ``quantize`` on the grid)."""
    scale = expand_params(scale, q.shape)
    if spec.is_log:
        step = _LOG_STEP[spec.scheme]
        zero = float(log_zero_code(spec.bits))
        val = scale * torch.exp2(-q * step)
        return torch.where(q >= zero, torch.zeros_like(val), val)
    zero_point = expand_params(zero_point, q.shape)
    return (q - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec, *, ste: bool = False) -> torch.Tensor:
    """``dequantize(quantize(x))``; with ``ste=True`` gradients pass straight through the rounding
    (and are zero where the input is clipped)."""
    return dequantize(quantize(x, scale, zero_point, spec, ste=ste), scale, zero_point, spec)


def grid_values(scale: float, zero_point: float, spec: QuantSpec) -> torch.Tensor:
    """Every value a per-tensor quantizer can output, ascending."""
    codes = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float32)
    if spec.is_log:
        codes = torch.cat([codes, torch.tensor([float(log_zero_code(spec.bits))])])
    vals = dequantize(codes, torch.tensor(scale), torch.tensor(zero_point), spec)
    return torch.unique(vals)


ESTIMATOR_NAMES = ("minmax", "percentile[:p]", "pctmse", "omse[:grid]")


def estimator_from_name(name: str | Estimator) -> Estimator:
    """Parse ``"minmax"``, ``"percentile"``/``"percentile:0.999"``, ``"pctmse"``, ``"omse"``/``"omse:200"``."""
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
    except ValueError:
        pass
    raise ConfigError(f"unknown range estimator {name!r}; use one of {list(ESTIMATOR_NAMES)}")
