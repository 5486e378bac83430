"""Named recipes: a frozen, validated, JSON round-trippable config that builds a list of passes.

``get_recipe("w4a4", calib_images=64)`` returns the ``w4a4`` recipe with one field changed;
``list_recipes()`` names them all. Later methods register their recipes with ``register_recipe``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

from .errors import ConfigError
from .pipeline import Pass
from .quant import PerAxis, PerTensor, QuantSpec, estimator_from_name

_RECIPES: dict[str, tuple[type["Recipe"], dict, str]] = {}
_RECIPE_CLASSES: dict[str, type["Recipe"]] = {}


def register_recipe(name: str, cls: type["Recipe"], description: str, **defaults: Any) -> None:
    """Register ``name`` as ``cls(name=name, **defaults)``."""
    if name in _RECIPES:
        raise ConfigError(f"recipe {name!r} is already registered")
    _RECIPES[name] = (cls, defaults, description)
    _RECIPE_CLASSES[cls.__name__] = cls


def list_recipes() -> dict[str, str]:
    """``{name: description}`` of every registered recipe."""
    return {k: v[2] for k, v in _RECIPES.items()}


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Convert a CLI string (``--set key=value``) to the field's type."""
    if not isinstance(value, str):
        return tuple(value) if isinstance(value, list) else value
    typ = str(f.type)
    if typ == "bool":
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"option {f.name!r} takes true/false, got {value!r}")
    if typ == "int":
        return int(value)
    if typ == "float":
        return float(value)
    if typ.startswith("tuple"):
        return tuple(v for v in value.split(",") if v)
    return value


def get_recipe(name: str, **overrides: Any) -> "Recipe":
    """The recipe registered as ``name``, with fields overridden (values may be strings)."""
    if name not in _RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {sorted(_RECIPES)}")
    cls, defaults, _ = _RECIPES[name]
    known = {f.name: f for f in fields(cls)}
    kwargs = dict(defaults)
    for k, v in overrides.items():
        if k not in known or k == "name":
            raise ConfigError(f"recipe {name!r} has no option {k!r}; options: {sorted(set(known) - {'name'})}")
        try:
            kwargs[k] = _coerce(known[k], v)
        except ValueError as e:
            raise ConfigError(f"recipe {name!r}: bad value {v!r} for {k!r}: {e}") from None
    return cls(name=name, **kwargs)


@dataclass(frozen=True)
class Recipe:
    """Base recipe: a name, the number of calibration images, and ``build_passes``."""

    kind: ClassVar[str] = "recipe"
    name: str = "custom"
    calib_images: int = 32

    def __post_init__(self):
        if self.calib_images < 0:
            raise ConfigError(f"recipe {self.name!r}: calib_images must be >= 0, got {self.calib_images}")

    def build_passes(self) -> list[Pass]:
        return []

    def to_dict(self) -> dict:
        d = {"class": type(self).__name__}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @staticmethod
    def from_dict(d: dict) -> "Recipe":
        d = dict(d)
        cls_name = d.pop("class")
        if cls_name not in _RECIPE_CLASSES:
            raise ConfigError(f"unknown recipe class {cls_name!r}; known: {sorted(_RECIPE_CLASSES)}")
        cls = _RECIPE_CLASSES[cls_name]
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class FloatRecipe(Recipe):
    """No quantization: the captured float graph."""

    calib_images: int = 0


@dataclass(frozen=True)
class UniformRecipe(Recipe):
    """Uniform affine quantization of weights (per output channel) and activations (per tensor).

    Range estimators by name: ``minmax``, ``percentile[:p]``, ``pctmse`` (RepQ-ViT's search),
    ``omse[:grid]``.
    """

    w_bits: int = 8
    a_bits: int = 8
    w_symmetric: bool = False
    a_symmetric: bool = False
    w_estimator: str = "pctmse"
    a_estimator: str = "pctmse"
    head_stem_8bit: bool = False
    quantize_attention: bool = True
    skip: tuple[str, ...] = ()
    calib_order: str = "parallel"
    quant_calib_images: int = 0  # images for quantizer calibration; 0 = all calib_images

    def __post_init__(self):
        super().__post_init__()
        if self.calib_order not in ("parallel", "sequential"):
            raise ConfigError(f"recipe {self.name!r}: calib_order must be 'parallel' or 'sequential', got {self.calib_order!r}")
        self.weight_spec(), self.act_spec()  # validate early, with the spec's error messages

    def weight_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.w_bits, symmetric=self.w_symmetric, granularity=PerAxis(0),
                         estimator=estimator_from_name(self.w_estimator))

    def act_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.a_bits, symmetric=self.a_symmetric, granularity=PerTensor(),
                         estimator=estimator_from_name(self.a_estimator))

    def build_passes(self) -> list[Pass]:
        from .passes import AnnotateUniform, Calibrate, InsertQuantizers

        return [
            AnnotateUniform(weight=self.weight_spec(), act=self.act_spec(), head_stem_8bit=self.head_stem_8bit,
                            quantize_attention=self.quantize_attention, skip=self.skip),
            InsertQuantizers(),
            Calibrate(order=self.calib_order, max_images=self.quant_calib_images or None),
        ]


@dataclass(frozen=True)
class RepQRecipe(UniformRecipe):
    """RepQ-ViT (METHODS.md §1): per-row PctMSE asymmetric weights; per-channel post-LayerNorm
    activation scales folded into the LayerNorm and next Linear; log√2 softmax output; 8-bit
    patch-embedding input; everything else layer-wise PctMSE at ``a_bits``. Calibration is
    sequential, as in RepQ-ViT's reference (each quantizer sees already-quantized inputs)."""

    calib_order: str = "sequential"
    round_target_zero_point: bool = True
    head_site: bool = True
    log_softmax: bool = True
    stem_input_bits: int = 8

    def build_passes(self) -> list[Pass]:
        from .passes import AnnotateRepQ, ReparameterizeLayerNorm

        uniform = super().build_passes()
        annotate, rest = uniform[0], uniform[1:]
        return [annotate,
                AnnotateRepQ(log_softmax=self.log_softmax, stem_input_bits=self.stem_input_bits, head_site=self.head_site),
                *rest,
                ReparameterizeLayerNorm(round_target_zero_point=self.round_target_zero_point)]


@dataclass(frozen=True)
class BitLog2Recipe(RepQRecipe):
    """BitLog2: RepQ-ViT with the attention-map quantizer replaced by an integer log2 quantizer.
    ``scheme``: half17 (default, the paper's best), half16, single17, single16, sqrt2_17, sqrt2_16."""

    scheme: str = "half17"

    def __post_init__(self):
        super().__post_init__()
        from .passes.bitlog2 import SCHEMES

        if self.scheme not in SCHEMES:
            raise ConfigError(f"recipe {self.name!r}: unknown scheme {self.scheme!r}; known: {list(SCHEMES)}")

    def build_passes(self) -> list[Pass]:
        from .passes import BitLog2Attention

        passes = super().build_passes()
        return passes[:2] + [BitLog2Attention(scheme=self.scheme)] + passes[2:]


@dataclass(frozen=True)
class QwTRecipe(BitLog2Recipe):
    """RepQ-ViT (``scheme="sqrt2_17"``, RepQ's own log√2) or BitLog2 (another scheme), then QwT's
    closed-form compensation after every block. The quantizers calibrate on the first
    ``quant_calib_images`` (32) images, the regression on all ``calib_images`` (512)."""

    calib_images: int = 512
    quant_calib_images: int = 32
    scheme: str = "sqrt2_17"
    qwt_start_block: int = 0
    qwt_comp_dtype: str = "float16"
    qwt_comp_weight_bits: int = 0  # 0: floating-point compensation weights

    def build_passes(self) -> list[Pass]:
        from .passes import QwTCompensate

        base = RepQRecipe.build_passes(self) if self.scheme == "sqrt2_17" else BitLog2Recipe.build_passes(self)
        return base + [QwTCompensate(max_images=self.calib_images, start_block=self.qwt_start_block,
                                     comp_dtype=self.qwt_comp_dtype, comp_weight_bits=self.qwt_comp_weight_bits or None)]


register_recipe("fp32", FloatRecipe, "no quantization (the captured float graph)")
register_recipe("w8a8", UniformRecipe, "uniform W8A8: symmetric per-channel weights, asymmetric per-tensor activations (PctMSE)",
                w_bits=8, a_bits=8, w_symmetric=True)
register_recipe("w6a6", UniformRecipe, "uniform W6A6: asymmetric per-channel weights and per-tensor activations (PctMSE)",
                w_bits=6, a_bits=6)
register_recipe("w4a4", UniformRecipe, "uniform W4A4: asymmetric per-channel weights and per-tensor activations (PctMSE)",
                w_bits=4, a_bits=4)

register_recipe("repq-w4a4", RepQRecipe, "RepQ-ViT W4A4: LayerNorm scale reparameterization + log√2 softmax + 8-bit stem input",
                w_bits=4, a_bits=4)
register_recipe("repq-w6a6", RepQRecipe, "RepQ-ViT W6A6: LayerNorm scale reparameterization + log√2 softmax + 8-bit stem input",
                w_bits=6, a_bits=6)
register_recipe("repq-w8a8", RepQRecipe, "RepQ-ViT passes at W8A8 (reparameterization where legal + log√2 softmax)",
                w_bits=8, a_bits=8)
register_recipe("bitlog2-w4a4", BitLog2Recipe, "BitLog2 W4A4: RepQ-ViT + integer log2 attention maps (--set scheme=half17|half16|"
                "single17|single16|sqrt2_17|sqrt2_16)", w_bits=4, a_bits=4)
register_recipe("repq-qwt-w4a4", QwTRecipe, "RepQ-ViT W4A4 + QwT block compensation (32 + 512 calibration images)",
                w_bits=4, a_bits=4)
register_recipe("repq-qwt-w6a6", QwTRecipe, "RepQ-ViT W6A6 + QwT block compensation (32 + 512 calibration images)",
                w_bits=6, a_bits=6)
register_recipe("bitlog2-qwt-w4a4", QwTRecipe, "BitLog2 (half17) W4A4 + QwT block compensation (32 + 512 calibration images)",
                w_bits=4, a_bits=4, scheme="half17")
