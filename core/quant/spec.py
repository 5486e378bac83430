"""``QuantSpec``: what one quantizer does (bits, scheme, granularity, range estimator, zero-point
rules), frozen, validated and JSON round-trippable; and the constants that define its code range:
the schemes, the bit widths, the log steps and the BitLog2 variant table.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from ..errors import ConfigError
from .estimators import Estimator, JointGrid, MinMax, Percentile
from .granularity import Dynamic, Granularity, InstanceGroups, PerAxis, PerTensor

Scheme = Literal["uniform", "log2", "log_sqrt2"]
SCHEMES: tuple[str, ...] = ("uniform", "log2", "log_sqrt2", "bitlog2")
_LOG_STEP = {"log2": 1.0, "log_sqrt2": 0.5}
# BitLog2 variants: name -> (M, half). "16" variants have 16 levels (truly 4-bit), "17" have 17.
BITLOG2_VARIANTS: dict[str, tuple[int, bool]] = {
    "single16": (32768, False), "single17": (65536, False), "half16": (256, True), "half17": (384, True)}
MIN_BITS, MAX_BITS = 2, 8


def _bitlog2_max_code(variant: str) -> int:
    m, half = BITLOG2_VARIANTS[variant]
    k = (m - 1).bit_length() - 1
    return 2 * k + int((m - 1) >= 3 * 2 ** (k - 1)) if half else k + 1


@dataclass(frozen=True)
class QuantSpec:
    """What one quantizer does: frozen, validated, JSON round-trippable.

    Args:
        bits: 2..8.
        scheme: ``"uniform"`` (affine), ``"log2"`` or ``"log_sqrt2"`` (for non-negative inputs
            such as softmax output).
        symmetric: uniform only; signed codes with zero point 0.
        granularity: ``PerTensor()``, ``PerAxis(axis)``, ``PerGroup(size, axis)``, ``InstanceGroups(G)``
            or ``Dynamic(level, group_size)`` (ranges from each input at run time: ``dynamic``).
        estimator: range estimator used at calibration (``Dynamic`` specs: ``MinMax``, at run time).
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
        if isinstance(self.granularity, Dynamic):
            if self.scheme != "uniform":
                raise ConfigError(f"Dynamic (run-time range) quantizers are uniform; got scheme {self.scheme!r}")
            if not isinstance(self.estimator, MinMax):
                raise ConfigError(f"Dynamic quantizers take each input's own [min, max] at run time: the estimator must be "
                                  f"MinMax (there is no calibration distribution to search), got {type(self.estimator).__name__}")
            if self.zero_point_domain != "int" or not self.integer_zero_point:
                raise ConfigError("Dynamic quantizers use the integer zero point of affine.choose_qparams "
                                  "(zero_point_domain='int', integer_zero_point=True)")
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

    @property
    def dynamic(self) -> bool:
        """Whether the ranges are computed from each input at run time (``Dynamic``): nothing to calibrate."""
        return isinstance(self.granularity, Dynamic)

    def check_weight(self, where: str) -> None:
        """Refuse a spec that weights cannot take, naming ``where`` (a node or quantizer): a
        ``Dynamic`` one computes its ranges from each input at run time."""
        if self.dynamic:
            raise ConfigError(f"{where}: {self.short()} computes its ranges from each input at run time, which applies "
                              f"to activations only; weights are static (PerAxis(0) or PerGroup)")

    def metadata_bits_per_element(self, shape: tuple[int, ...], *, scale_bits: int = 16,
                                  zero_point_bits: int = 8) -> float:
        """Bits per quantized element that travel with the codes of one input of ``shape`` besides
        the codes themselves: for a ``Dynamic`` spec the scale (``scale_bits``, fp16 by default) and,
        asymmetric, the zero point (``zero_point_bits``) of each image, token or token group, spread
        over the elements that share them; 0 for static specs, whose parameters are stored once per
        model whatever the input."""
        g = self.granularity
        if not isinstance(g, Dynamic) or not shape:
            return 0.0
        per_set = scale_bits + (0 if self.symmetric else zero_point_bits)
        if g.level == "tensor":
            shared = 1
            for d in shape[1:]:
                shared *= d
        else:
            shared = g.group_size or shape[-1]
        return per_set / max(1, shared)

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
        if isinstance(g, Dynamic):
            gs = f"dyn-{g.level}" + (f"-g{g.group_size}" if g.group_size else "")
        else:
            gs = "tensor" if isinstance(g, PerTensor) else f"axis{g.axis}" if isinstance(g, PerAxis) else (
                f"igroups{g.num_groups}@{g.axis}" if isinstance(g, InstanceGroups) else f"group{g.group_size}")
        kind = {"uniform": "sym" if self.symmetric else "asym"}.get(self.scheme, self.scheme)
        fzp = "_fzp" if self.zero_point_domain == "float" else ""
        kind = self.bitlog2_variant or (kind + ("_fit" if self.fit_bits else "") + fzp)
        return f"{kind}{self.bits}/{gs}/{type(self.estimator).__name__}"
