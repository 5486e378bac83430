"""Named recipes: a frozen, validated, JSON round-trippable declaration of a pass pipeline.

A recipe is a *composition*: a base pipeline (``base_passes``), named ``Stage``\\ s inserted
before or after a pass *named* in it (or appended), and per-pass option overrides. Options keep
the pass's own names::

    get_recipe("repq-qwt-w4a4", comp_weight_bits=8)          # QwTCompensate.comp_weight_bits
    get_recipe("repq-qwt-w4a4", **{"calibrate.max_images": 64})  # a name several passes share
    get_recipe("w4a4", a_bits=6)                              # a field of the recipe itself

A name resolves to the recipe's own field first, then to the one pass of the pipeline that has an
option of that name (``pass.option`` when several do). ``None`` means "none" (no magic 0).

A new method is a few lines: its passes registered with ``register_pass``, then e.g.::

    register_recipe("mymethod-w4a4", RepQRecipe, "…", w_bits=4, a_bits=4,
                    stages=(Stage(MyPass(), after="repq_reparam"),))
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .errors import ConfigError
from .passes import (
    AllocateGroups,
    AnnotateAPHQ,
    AnnotateRepQ,
    AnnotateUniform,
    BitLog2Attention,
    BlockReconstruct,
    Calibrate,
    GroupQuant,
    InsertQuantizers,
    MixedPrecision,
    MLPReconstruct,
    QwTCompensate,
    ReparameterizeLayerNorm,
)
from .pipeline import Pass, pass_from_config
from .quant import PerAxis, PerTensor, QuantSpec, estimator_from_name

_RECIPES: dict[str, tuple[type["Recipe"], dict, str]] = {}
_RECIPE_CLASSES: dict[str, type["Recipe"]] = {}


def register_recipe(name: str, cls: type["Recipe"], description: str, **defaults: Any) -> None:
    """Register ``name`` as ``cls(name=name, **defaults)`` (validated now, so a bad default fails
    at import, not at a user's first call)."""
    if name in _RECIPES:
        raise ConfigError(f"recipe {name!r} is already registered")
    _RECIPE_CLASSES[cls.__name__] = cls
    cls(name=name, **defaults).build_passes()
    _RECIPES[name] = (cls, defaults, description)


def list_recipes() -> dict[str, str]:
    """``{name: description}`` of every registered recipe."""
    return {k: v[2] for k, v in _RECIPES.items()}


# ------------------------------------------------------------------------------------------
# Composition helpers
# ------------------------------------------------------------------------------------------


def _index(passes: list[Pass], name: str, what: str) -> int:
    names = [p.name for p in passes]
    if names.count(name) != 1:
        raise ConfigError(f"{what}: the pipeline {names} has {names.count(name)} passes named {name!r}; "
                          f"anchor on a pass that occurs exactly once")
    return names.index(name)


def insert_pass(passes: list[Pass], new: Pass, *, after: str | None = None, before: str | None = None) -> list[Pass]:
    """A copy of ``passes`` with ``new`` right after (or before) the pass named ``after``
    (``before``); at the end when neither is given."""
    if after is not None and before is not None:
        raise ConfigError(f"stage {new.name!r}: give after= or before=, not both")
    out = list(passes)
    if after is not None:
        out.insert(_index(out, after, f"stage {new.name!r}") + 1, new)
    elif before is not None:
        out.insert(_index(out, before, f"stage {new.name!r}"), new)
    else:
        out.append(new)
    return out


def configure_pass(passes: list[Pass], name: str, **options: Any) -> list[Pass]:
    """A copy of ``passes`` with the options of the pass named ``name`` replaced (validated by the
    pass's own constructor)."""
    out = list(passes)
    i = _index(out, name, f"options for {name!r}")
    known = {f.name for f in fields(out[i])}
    bad = sorted(set(options) - known)
    if bad:
        raise ConfigError(f"pass {name!r} has no option {bad[0]!r}; its options: {sorted(known)}")
    out[i] = dataclasses.replace(out[i], **options)
    return out


@dataclass(frozen=True)
class Stage:
    """A pass a recipe adds to its base pipeline: right after the pass named ``after``, right
    before the one named ``before``, or at the end."""

    pass_: Pass
    after: str | None = None
    before: str | None = None

    def to_dict(self) -> dict:
        return {"pass": self.pass_.name, "config": self.pass_.config(), "after": self.after, "before": self.before}

    @staticmethod
    def from_dict(d: dict) -> "Stage":
        return Stage(pass_from_config(d["pass"], d["config"]), after=d.get("after"), before=d.get("before"))


# ------------------------------------------------------------------------------------------
# Option values from strings (CLI --set key=value)
# ------------------------------------------------------------------------------------------


def _type_names(annotation: Any) -> set[str]:
    """The base type names an annotation (or its string form) admits: ``"int | None"`` → {int, None}."""
    if isinstance(annotation, str):
        return {t.strip().split("[")[0] for t in annotation.split("|")}
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return set().union(*(_type_names(a) for a in typing.get_args(annotation)))
    if annotation is type(None):
        return {"None"}
    return {getattr(typing.get_origin(annotation) or annotation, "__name__", str(annotation))}


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Convert a CLI string to the option's type (``none`` → None where the option admits it)."""
    if not isinstance(value, str):
        return tuple(value) if isinstance(value, list) else value
    kinds = _type_names(annotation)
    if "None" in kinds and value.lower() in ("none", "null"):
        return None
    if "bool" in kinds:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"option {name!r} takes true/false, got {value!r}")
    try:
        if "int" in kinds:
            return int(value)
        if "float" in kinds:
            return float(value)
    except ValueError:
        raise ConfigError(f"option {name!r} takes a number{' or none' if 'None' in kinds else ''}, got {value!r}") from None
    if "tuple" in kinds:
        return tuple(v for v in value.split(",") if v)
    return value


# ------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A declared pipeline. Subclasses define ``base_passes`` from their fields; ``stages`` and
    ``options`` (``{pass name: {option: value}}``) compose on top of it.

    Attributes:
        name: the registered name.
        calib_images: how many calibration images the caller should provide (the CLI loads them).
        stages: passes added to the base pipeline (``Stage``).
        options: option overrides of passes in the pipeline, under the passes' own option names.
    """

    name: str = "custom"
    calib_images: int = 32
    stages: tuple[Stage, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        if self.calib_images < 0:
            raise ConfigError(f"recipe {self.name!r}: calib_images must be >= 0, got {self.calib_images}")

    def base_passes(self) -> list[Pass]:
        return []

    def finish_passes(self, passes: list[Pass]) -> list[Pass]:
        """Passes a recipe field adds once the stages are in (default: none)."""
        return passes

    def build_passes(self) -> list[Pass]:
        """The pipeline: base passes, stages inserted by anchor name, then the option overrides."""
        passes = self.base_passes()
        for st in self.stages:
            passes = insert_pass(passes, st.pass_, after=st.after, before=st.before)
        passes = self.finish_passes(passes)
        for pass_name, opts in self.options.items():
            if pass_name not in [p.name for p in passes]:
                raise ConfigError(f"recipe {self.name!r}: options for {pass_name!r}, which is not in its pipeline "
                                  f"{[p.name for p in passes]}")
            passes = configure_pass(passes, pass_name, **opts)
        return passes

    def option(self, key: str) -> Any:
        """The value of a recipe field or of a pass option (same names as ``get_recipe`` takes)."""
        field_names = {f.name for f in fields(self)}
        if key in field_names:
            return getattr(self, key)
        p, opt = _resolve_pass_option(self, key)
        return getattr(p, opt)

    def to_dict(self) -> dict:
        d = {"class": type(self).__name__}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "stages":
                v = [s.to_dict() for s in v]
            elif f.name == "options":
                v = {k: {o: list(x) if isinstance(x, tuple) else x for o, x in opts.items()} for k, opts in v.items()}
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        return d

    @staticmethod
    def from_dict(d: dict) -> "Recipe":
        d = dict(d)
        cls_name = d.pop("class")
        if cls_name not in _RECIPE_CLASSES:
            raise ConfigError(f"unknown recipe class {cls_name!r}; known: {sorted(_RECIPE_CLASSES)}")
        cls = _RECIPE_CLASSES[cls_name]
        d["stages"] = tuple(Stage.from_dict(s) for s in d.get("stages", ()))
        d["options"] = {k: {o: tuple(x) if isinstance(x, list) else x for o, x in opts.items()}
                        for k, opts in d.get("options", {}).items()}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _resolve_pass_option(recipe: Recipe, key: str) -> tuple[Pass, str]:
    """The pass of ``recipe``'s pipeline and option that ``key`` (``option`` or ``pass.option``) names."""
    passes = recipe.build_passes()
    pass_name, _, opt = key.rpartition(".")
    candidates = [p for p in passes if (not pass_name or p.name == pass_name) and opt in {f.name for f in fields(p)}]
    if len(candidates) == 1:
        return candidates[0], opt
    own = sorted(f.name for f in fields(recipe) if f.name not in ("name", "stages", "options"))
    pass_opts = sorted(f"{p.name}.{f.name}" for p in passes for f in fields(p))
    if len(candidates) > 1:
        raise ConfigError(f"recipe {recipe.name!r}: option {key!r} belongs to several passes; say which: "
                          f"{[f'{p.name}.{opt}' for p in candidates]}")
    raise ConfigError(f"recipe {recipe.name!r} has no option {key!r}; options: {own}; pass options: {pass_opts}")


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """The recipe registered as ``name`` with options overridden (values may be CLI strings):
    recipe fields by name, pass options by their own name or as ``pass.option``."""
    if name not in _RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {sorted(_RECIPES)}")
    cls, defaults, _ = _RECIPES[name]
    known = {f.name: f for f in fields(cls)}
    kwargs = dict(defaults)
    pass_overrides: dict[str, Any] = {}
    for k, v in overrides.items():
        if k in ("name", "stages", "options"):
            raise ConfigError(f"recipe {name!r}: {k!r} cannot be overridden by name; build a Recipe object instead")
        if k in known:
            kwargs[k] = _coerce(k, known[k].type, v)
        else:
            pass_overrides[k] = v
    recipe = cls(name=name, **kwargs)
    if pass_overrides:
        options = {p: dict(o) for p, o in recipe.options.items()}
        for k, v in pass_overrides.items():
            p, opt = _resolve_pass_option(recipe, k)
            ftype = next(f.type for f in fields(p) if f.name == opt)
            options.setdefault(p.name, {})[opt] = _coerce(k, ftype, v)
        recipe = dataclasses.replace(recipe, options=options)
    recipe.build_passes()  # validate now, with the passes' own error messages
    return recipe


@dataclass(frozen=True)
class FloatRecipe(Recipe):
    """No quantization: the captured float graph."""

    calib_images: int = 0


@dataclass(frozen=True)
class UniformRecipe(Recipe):
    """Uniform affine quantization of weights (per output channel) and activations (per tensor):
    ``annotate_uniform → insert_quantizers → calibrate``.

    Range estimators by name: ``minmax``, ``percentile[:p]``, ``pctmse`` (RepQ-ViT's search),
    ``omse[:grid]``. ``calibrate`` options (``order``, ``max_images``) are pass options.
    """

    w_bits: int = 8
    a_bits: int = 8
    w_symmetric: bool = False
    a_symmetric: bool = False
    w_estimator: str = "pctmse"
    a_estimator: str = "pctmse"
    head_stem_8bit: bool = False
    quantize_attention: bool = True
    attention_matmuls: tuple[str, ...] = ("qk", "av")
    skip: tuple[str, ...] = ()
    bit_budget: int | None = None

    def __post_init__(self):
        super().__post_init__()
        self.weight_spec(), self.act_spec()  # validate early, with the spec's error messages
        AnnotateUniform(attention_matmuls=self.attention_matmuls)  # and the option, with the pass's message
        if self.bit_budget is not None:
            MixedPrecision(bit_budget=self.bit_budget)  # validates the budget

    def finish_passes(self, passes: list[Pass]) -> list[Pass]:
        """With ``bit_budget`` (mixed precision): ``mixed_precision`` after every annotation pass and
        stage, just before ``insert_quantizers``."""
        if self.bit_budget is None:
            return passes
        return insert_pass(passes, MixedPrecision(bit_budget=self.bit_budget), before="insert_quantizers")

    def weight_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.w_bits, symmetric=self.w_symmetric, granularity=PerAxis(0),
                         estimator=estimator_from_name(self.w_estimator))

    def act_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.a_bits, symmetric=self.a_symmetric, granularity=PerTensor(),
                         estimator=estimator_from_name(self.a_estimator))

    def base_passes(self) -> list[Pass]:
        return [
            AnnotateUniform(weight=self.weight_spec(), act=self.act_spec(), head_stem_8bit=self.head_stem_8bit,
                            quantize_attention=self.quantize_attention, attention_matmuls=self.attention_matmuls,
                            skip=self.skip),
            InsertQuantizers(),
            Calibrate(),
        ]


@dataclass(frozen=True)
class RepQRecipe(UniformRecipe):
    """RepQ-ViT (METHODS.md §1) on the uniform pipeline: ``annotate_repq`` after
    ``annotate_uniform`` (per-channel post-LayerNorm activation scales, log√2 softmax output,
    8-bit patch-embedding input), sequential calibration as in RepQ-ViT's reference (each quantizer
    sees already-quantized inputs), then ``repq_reparam`` folds the scales into the LayerNorm and
    the next Linear(s)."""

    def base_passes(self) -> list[Pass]:
        passes = insert_pass(super().base_passes(), AnnotateRepQ(), after="annotate_uniform")
        passes = configure_pass(passes, "calibrate", order="sequential")
        return insert_pass(passes, ReparameterizeLayerNorm())


@dataclass(frozen=True)
class APHQRecipe(UniformRecipe):
    """APHQ-ViT (METHODS.md §4) from passes:

    (A) ``mlp_reconstruct`` on the float graph (``reconstruct_mlp``; ``mr_iters`` steps per block);
    (B) ``annotate_uniform`` with the ``JointGrid`` estimator (``grid``) for weights (per row,
    asymmetric) and activations, ``annotate_repq`` (8-bit patch-embedding input; per-channel
    post-LayerNorm scales only when ``a_bits == w_bits``; no log quantizer), ``annotate_aphq``
    (per-head attention quantizers), ``calibrate`` in parallel on 128 images, ``repq_reparam``
    with a rounded target zero point and a re-search;
    (C) ``block_reconstruct`` (AdaRound, learned activation scales, QDrop, APH-weighted loss) on
    all 1024 images, ``iters`` steps per region (the paper: 20000).
    """

    calib_images: int = 1024
    w_estimator: str = "grid"
    a_estimator: str = "grid"
    iters: int = 250
    mr_iters: int = 400
    reconstruct_mlp: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.iters < 0 or self.mr_iters < 0:
            raise ConfigError(f"recipe {self.name!r}: iters and mr_iters must be >= 0, got {self.iters}, {self.mr_iters}")

    def base_passes(self) -> list[Pass]:
        reparam = self.w_bits == self.a_bits
        passes = insert_pass(super().base_passes(), AnnotateRepQ(reparameterize=reparam, log_softmax=False),
                             after="annotate_uniform")
        passes = insert_pass(passes, AnnotateAPHQ(), after="annotate_repq")
        passes = configure_pass(passes, "calibrate", order="parallel", max_images=128)
        passes = insert_pass(passes, ReparameterizeLayerNorm(recalibrate=True, max_images=128))
        passes = insert_pass(passes, BlockReconstruct(iters=self.iters))
        if self.reconstruct_mlp:
            mr = MLPReconstruct(iters=self.mr_iters, ub_quantile=0.99 if self.w_bits <= 3 else 0.98)
            passes = insert_pass(passes, mr, before="annotate_uniform")
        return passes


@dataclass(frozen=True)
class IGQRecipe(UniformRecipe):
    """IGQ-ViT (METHODS.md §5): uniform per-row weights, then ``group_quant`` puts ``num_groups``
    instance-aware groups (``group_mode="instance"``; ``"contiguous"`` for fixed channel blocks)
    on every Linear input and (instance mode) on the rows of every attention map, with an 8-bit
    patch-embedding input as RepQ-ViT; parallel calibration on 32 images (k-means group ranges);
    with ``allocate`` the ``allocate_groups`` pass then picks G per quantizer from
    ``candidates`` under the BOP budget of G = ``num_groups`` everywhere."""

    num_groups: int = 8
    group_mode: str = "instance"
    attention_rows: bool = True
    allocate: bool = False
    candidates: tuple[int, ...] = (1, 2, 4, 8, 16)

    def base_passes(self) -> list[Pass]:
        passes = insert_pass(super().base_passes(), GroupQuant(num_groups=self.num_groups, mode=self.group_mode,
                                                               attention_rows=self.attention_rows),
                             after="annotate_uniform")
        if self.allocate:
            passes = insert_pass(passes, AllocateGroups(candidates=self.candidates,
                                                        budget_groups=self.num_groups), after="calibrate")
        return passes


HEAD_STEM_MODES = ("quantized", "int8", "float")


@dataclass(frozen=True)
class PlatformRecipe(Recipe):
    """The transformer-quantization platform's defaults (METHODS.md §5; ``fxquant platform``):
    ``n_bits`` weights and activations with the percentile range ``[Q(eps), Q(1 - eps)]``, 32
    calibration images (the first 32 of its loader), parallel calibration, attention matmul
    operands per tensor.

    * ``channel_wise``: weights per output row **and** Linear inputs per channel (dim -1); off:
      both per tensor.
    * ``n_groups`` > 1 without ``channel_wise``: Linear inputs in ``n_groups`` groups
      (``group_mode``: ``"contiguous"``, the platform's channel blocks with ``C % G == 0``, or
      ``"instance"``, IGQ-ViT's). With ``channel_wise`` the Linear inputs are already per channel
      (the finest grouping, G = C) and ``n_groups`` has no effect.
    * ``head_stem``: ``"float"`` is what the platform's ``--head_stem_8bit`` does (its quantizers
      return the input unchanged at 8 bits), ``"int8"`` quantizes them at 8 bits, ``"quantized"``
      at ``n_bits``.
    """

    calib_images: int = 32
    n_bits: int = 4
    n_groups: int = 8
    channel_wise: bool = True
    head_stem: str = "float"
    eps: float = 1e-3
    group_mode: str = "contiguous"
    quantize_attention: bool = True
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        self.weight_spec()  # validate n_bits early, with the spec's error message
        if self.head_stem not in HEAD_STEM_MODES:
            raise ConfigError(f"recipe {self.name!r}: head_stem must be one of {list(HEAD_STEM_MODES)}, got {self.head_stem!r}")
        if not 0.0 < self.eps < 0.5:
            raise ConfigError(f"recipe {self.name!r}: eps must be in (0, 0.5), got {self.eps}")
        if self.n_groups < 1:
            raise ConfigError(f"recipe {self.name!r}: n_groups must be >= 1, got {self.n_groups}")

    def _spec(self, granularity) -> QuantSpec:
        return QuantSpec(bits=self.n_bits, granularity=granularity, estimator=estimator_from_name(f"percentile:{1 - self.eps}"))

    def weight_spec(self) -> QuantSpec:
        return self._spec(PerAxis(0) if self.channel_wise else PerTensor())

    def act_spec(self) -> QuantSpec:
        return self._spec(PerTensor())

    def base_passes(self) -> list[Pass]:
        layer_act = self._spec(PerAxis(-1)) if self.channel_wise else None
        passes = [
            AnnotateUniform(weight=self.weight_spec(), act=self.act_spec(), layer_act=layer_act,
                            head_stem_8bit=self.head_stem == "int8", head_stem_float=self.head_stem == "float",
                            quantize_attention=self.quantize_attention, skip=self.skip),
            InsertQuantizers(),
            Calibrate(),
        ]
        if self.n_groups > 1 and not self.channel_wise:
            passes = insert_pass(passes, GroupQuant(num_groups=self.n_groups, mode=self.group_mode, attention_rows=False,
                                                    stem_input_bits=None), after="annotate_uniform")
        return passes


def _bitlog2(scheme: str = "half17") -> Stage:
    """BitLog2 attention maps: replaces the attention-map quantizer chosen by ``annotate_repq``."""
    return Stage(BitLog2Attention(scheme=scheme), after="annotate_repq")


def _qwt() -> tuple[Stage, ...]:
    """QwT compensation after every block, regressed on all the recipe's calibration images."""
    return (Stage(QwTCompensate(max_images=None)),)


# QwT recipes: quantizers calibrate on the first 32 images, the regression on all 512
_QWT_CALIB = {"calib_images": 512, "options": {"calibrate": {"max_images": 32}}}

register_recipe("fp32", FloatRecipe, "no quantization (the captured float graph)")
register_recipe("aphq-mr", FloatRecipe, "APHQ-ViT stage A only: MLP reconstruction (GELU→ReLU, fc1/fc2 retrained per block "
                "with the APH-weighted loss) on 1024 images, no quantization (the quantized recipes: aphq-w4a4/w3a3)",
                calib_images=1024, stages=(Stage(MLPReconstruct()),))
register_recipe("w8a8", UniformRecipe, "uniform W8A8: symmetric per-channel weights, asymmetric per-tensor activations (PctMSE)",
                w_bits=8, a_bits=8, w_symmetric=True)
register_recipe("w8a8-sym", UniformRecipe, "uniform W8A8 with symmetric activations too: the Q/DQ pattern OpenVINO's CPU "
                "plugin runs wholly in int8, attention matmuls included (tools/bench_cpu.py)",
                w_bits=8, a_bits=8, w_symmetric=True, a_symmetric=True)
register_recipe("w8a8-ov", UniformRecipe, "uniform W8A8 for OpenVINO's CPU plugin: symmetric activations, q·kᵀ quantized and "
                "softmax·v left in float (NNCF's transformer scheme); export with --format openvino (tools/bench_cpu.py)",
                w_bits=8, a_bits=8, w_symmetric=True, a_symmetric=True, attention_matmuls=("qk",))
register_recipe("w6a6", UniformRecipe, "uniform W6A6: asymmetric per-channel weights and per-tensor activations (PctMSE)",
                w_bits=6, a_bits=6)
register_recipe("w4a4", UniformRecipe, "uniform W4A4: asymmetric per-channel weights and per-tensor activations (PctMSE)",
                w_bits=4, a_bits=4)

register_recipe("aphq-w4a4", APHQRecipe, "APHQ-ViT W4A4: MLP reconstruction + joint-grid calibration with per-head attention "
                "quantizers and LayerNorm reparameterization + AdaRound/QDrop block reconstruction with the APH loss "
                "(--set iters=N per block; paper 20000)", w_bits=4, a_bits=4)
register_recipe("aphq-w3a3", APHQRecipe, "APHQ-ViT W3A3 (as aphq-w4a4 at 3 bits; ub quantile 0.99)", w_bits=3, a_bits=3)
register_recipe("aphq-bitlog2-w4a4", APHQRecipe, "APHQ-ViT W4A4 with BitLog2 (half17) attention maps in place of the per-head "
                "uniform A quantizer", w_bits=4, a_bits=4, stages=(Stage(BitLog2Attention(), after="annotate_aphq"),))
register_recipe("aphq-qwt-w4a4", APHQRecipe, "APHQ-ViT W4A4 + QwT block compensation after block reconstruction (512 of the "
                "1024 images)", w_bits=4, a_bits=4, stages=(Stage(QwTCompensate(max_images=512), after="block_reconstruct"),))
register_recipe("igq-w4a4", IGQRecipe, "IGQ-ViT W4A4: per-row weights; 8 instance-aware groups on every Linear input and on "
                "attention rows (k-means group ranges on 32 images); --set allocate=true picks G per layer under the BOP "
                "budget of G = 8", w_bits=4, a_bits=4)
register_recipe("igq-w6a6", IGQRecipe, "IGQ-ViT W6A6 (as igq-w4a4 at 6 bits)", w_bits=6, a_bits=6)
register_recipe("igq-qwt-w4a4", IGQRecipe, "IGQ-ViT W4A4 + QwT block compensation (32 + 512 calibration images)",
                w_bits=4, a_bits=4, stages=_qwt(), **_QWT_CALIB)
register_recipe("repq-igq-w4a4", RepQRecipe, "RepQ-ViT W4A4 + IGQ-ViT groups: LayerNorm reparameterization at the post-LN "
                "Linears (qkv, fc1, head), 8 instance-aware groups on the other Linear inputs (proj, fc2) and on attention "
                "rows", w_bits=4, a_bits=4, stages=(Stage(GroupQuant(), after="annotate_repq"),))
register_recipe("platform", PlatformRecipe, "the transformer-quantization platform's defaults (fxquant platform): percentile "
                "[Q(eps), Q(1-eps)], 32 images, --channel_wise per-row weights and per-channel Linear inputs, n_groups "
                "contiguous groups, head/stem float (its --head_stem_8bit)", n_bits=4)
register_recipe("repq-w4a4", RepQRecipe, "RepQ-ViT W4A4: LayerNorm scale reparameterization + log√2 softmax + 8-bit stem input",
                w_bits=4, a_bits=4)
register_recipe("repq-w6a6", RepQRecipe, "RepQ-ViT W6A6: LayerNorm scale reparameterization + log√2 softmax + 8-bit stem input",
                w_bits=6, a_bits=6)
register_recipe("repq-w8a8", RepQRecipe, "RepQ-ViT passes at W8A8 (reparameterization where legal + log√2 softmax)",
                w_bits=8, a_bits=8)
register_recipe("repq-w8a8-sym", RepQRecipe, "RepQ-ViT LayerNorm reparameterization at W8A8 with symmetric weights and "
                "activations and a uniform softmax quantizer: the form OpenVINO's CPU plugin runs wholly in int8 (both "
                "attention matmuls), for models with post-LayerNorm outliers (tools/bench_cpu.py)",
                w_bits=8, a_bits=8, w_symmetric=True, a_symmetric=True, options={"annotate_repq": {"log_softmax": False}})
register_recipe("bitlog2-w4a4", RepQRecipe, "BitLog2 W4A4: RepQ-ViT + integer log2 attention maps (--set scheme=half17|half16|"
                "single17|single16|sqrt2_17|sqrt2_16)", w_bits=4, a_bits=4, stages=(_bitlog2(),))
register_recipe("repq-qwt-w4a4", RepQRecipe, "RepQ-ViT W4A4 + QwT block compensation (32 + 512 calibration images)",
                w_bits=4, a_bits=4, stages=_qwt(), **_QWT_CALIB)
register_recipe("repq-qwt-w6a6", RepQRecipe, "RepQ-ViT W6A6 + QwT block compensation (32 + 512 calibration images)",
                w_bits=6, a_bits=6, stages=_qwt(), **_QWT_CALIB)
register_recipe("bitlog2-qwt-w4a4", RepQRecipe, "BitLog2 (half17) W4A4 + QwT block compensation (32 + 512 calibration images)",
                w_bits=4, a_bits=4, stages=(_bitlog2(), *_qwt()), **_QWT_CALIB)
