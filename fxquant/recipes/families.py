"""Recipe families: how each method builds its pass pipeline from a few fields (bits, estimators,
options). The named recipes built from them are in ``table``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..core.errors import ConfigError
from ..core.pipeline import Pass
from ..core.quant import Dynamic, MinMax, PerAxis, PerTensor, QuantSpec, estimator_from_name
from ..passes import (
    AllocateGroups,
    AnnotateAPHQ,
    AnnotateRepQ,
    AnnotateUniform,
    BlockReconstruct,
    Calibrate,
    GroupQuant,
    InsertQuantizers,
    MixedPrecision,
    MLPReconstruct,
    ReparameterizeLayerNorm,
)
from .base import Recipe, configure_pass, insert_pass


@dataclass(frozen=True)
class FloatRecipe(Recipe):
    """No quantization: the captured float graph."""

    calib_images: int = 0


A_DYNAMIC = ("none", "tensor", "token")  # UniformRecipe.a_dynamic: static, or Dynamic(level)


@dataclass(frozen=True)
class UniformRecipe(Recipe):
    """Uniform affine quantization of weights (per output channel) and activations (per tensor):
    ``annotate_uniform → insert_quantizers → calibrate``.

    Range estimators by name: ``minmax``, ``percentile[:p]``, ``pctmse`` (RepQ-ViT's search),
    ``omse[:grid]``. ``calibrate`` options (``order``, ``max_images``) are pass options.
    ``overflow_fix``: ``"stem"``/``"all"`` quantize 8-bit weights of the patch embedding / of every
    layer at 7 bits, so that int8 GEMMs of x86 CPUs without VNNI cannot saturate (``annotate_uniform``).

    ``a_dynamic``: ``"none"`` (static ranges, calibrated with ``a_estimator``), ``"token"`` (each
    token's own ``[min, max]`` at run time; ``a_group_size=g`` > 0: each token's channels in groups
    of ``g``, one range per token and group) or ``"tensor"`` (each image's own range). Dynamic
    ranges apply to every activation quantizer of the recipe (Linear and patch-conv inputs, attention
    operands; token groups to the Linear inputs only: the last axis of kᵀ and of the attention map
    holds keys, an image's its pixels), take the ``MinMax`` rule whatever ``a_estimator`` says, and
    need no calibration data (``QuantSpec.dynamic``; docs/methods.md, Conventions).
    """

    # whether a_dynamic applies: the families that calibrate or rewrite specific activation
    # quantizers (RepQ's folding, APHQ's learned scales, IGQ's groups) keep static ones
    dynamic_acts: ClassVar[bool] = True

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
    overflow_fix: str = "none"
    a_dynamic: str = "none"
    a_group_size: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.a_dynamic not in A_DYNAMIC:
            raise ConfigError(f"recipe {self.name!r}: a_dynamic must be one of {list(A_DYNAMIC)}, got {self.a_dynamic!r}")
        if self.a_dynamic != "none" and not self.dynamic_acts:
            raise ConfigError(f"recipe {self.name!r}: a_dynamic applies to the uniform recipes (w8a8, w6a6, w4a4, ...); "
                              f"{type(self).__name__} calibrates its own activation quantizers")
        if self.a_group_size and self.a_dynamic != "token":
            raise ConfigError(f"recipe {self.name!r}: a_group_size={self.a_group_size} splits each token's channels into "
                              f"groups; it needs a_dynamic=token, got a_dynamic={self.a_dynamic!r}")
        self.weight_spec(), self.act_spec(), self.layer_act_spec()  # validate early, with the spec's error messages
        # and the options, with the pass's messages
        AnnotateUniform(attention_matmuls=self.attention_matmuls, overflow_fix=self.overflow_fix)
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
        """Activation spec of every Linear/conv input and attention operand: per tensor with
        ``a_estimator``, or dynamic (``a_dynamic``; ranges per input, ``MinMax``)."""
        if self.a_dynamic != "none":  # token groups (a_group_size): layer_act_spec(), Linear inputs only
            return QuantSpec(bits=self.a_bits, symmetric=self.a_symmetric, granularity=Dynamic(self.a_dynamic),
                             estimator=MinMax())
        return QuantSpec(bits=self.a_bits, symmetric=self.a_symmetric, granularity=PerTensor(),
                         estimator=estimator_from_name(self.a_estimator))

    def layer_act_spec(self) -> QuantSpec | None:
        """Spec of the Linear inputs when it is not ``act_spec()``: dynamic token groups (``a_group_size``),
        which apply to channels, not to the attention operands' or the image's last axis."""
        if self.a_dynamic == "none" or not self.a_group_size:
            return None
        return self.act_spec().with_(granularity=Dynamic(self.a_dynamic, self.a_group_size))

    def base_passes(self) -> list[Pass]:
        layer_act = self.layer_act_spec()
        return [
            AnnotateUniform(weight=self.weight_spec(), act=self.act_spec(), layer_act=layer_act,
                            conv_act=self.act_spec() if layer_act is not None else None,
                            head_stem_8bit=self.head_stem_8bit, quantize_attention=self.quantize_attention,
                            attention_matmuls=self.attention_matmuls, skip=self.skip, overflow_fix=self.overflow_fix),
            InsertQuantizers(),
            Calibrate(),
        ]


@dataclass(frozen=True)
class RepQRecipe(UniformRecipe):
    """RepQ-ViT (docs/methods.md, RepQ-ViT) on the uniform pipeline: ``annotate_repq`` after
    ``annotate_uniform`` (per-channel post-LayerNorm activation scales, log√2 softmax output,
    8-bit patch-embedding input), sequential calibration as in RepQ-ViT's reference (each quantizer
    sees already-quantized inputs), then ``repq_reparam`` folds the scales into the LayerNorm and
    the next Linear(s)."""

    dynamic_acts: ClassVar[bool] = False

    def base_passes(self) -> list[Pass]:
        passes = insert_pass(super().base_passes(), AnnotateRepQ(), after="annotate_uniform")
        passes = configure_pass(passes, "calibrate", order="sequential")
        return insert_pass(passes, ReparameterizeLayerNorm())


@dataclass(frozen=True)
class APHQRecipe(UniformRecipe):
    """APHQ-ViT (docs/methods.md, APHQ-ViT) from passes:

    (A) ``mlp_reconstruct`` on the float graph (``reconstruct_mlp``; ``mr_iters`` steps per block);
    (B) ``annotate_uniform`` with the ``JointGrid`` estimator (``grid``) for weights (per row,
    asymmetric) and activations, ``annotate_repq`` (8-bit patch-embedding input; per-channel
    post-LayerNorm scales only when ``a_bits == w_bits``; no log quantizer), ``annotate_aphq``
    (per-head attention quantizers), ``calibrate`` in parallel on 128 images, ``repq_reparam``
    with a rounded target zero point and a re-search;
    (C) ``block_reconstruct`` (AdaRound, learned activation scales, QDrop, APH-weighted loss) on
    all 1024 images, ``iters`` steps per region (the paper: 20000).
    """

    dynamic_acts: ClassVar[bool] = False

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
    """IGQ-ViT (docs/methods.md, IGQ-ViT): uniform per-row weights, then ``group_quant`` puts ``num_groups``
    instance-aware groups (``group_mode="instance"``; ``"contiguous"`` for fixed channel blocks)
    on every Linear input and (instance mode) on the rows of every attention map, with an 8-bit
    patch-embedding input as RepQ-ViT; parallel calibration on 32 images (k-means group ranges);
    with ``allocate`` the ``allocate_groups`` pass then picks G per quantizer from
    ``candidates`` under the BOP budget of G = ``num_groups`` everywhere."""

    dynamic_acts: ClassVar[bool] = False

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
    """The transformer-quantization platform's defaults (docs/methods.md, IGQ-ViT; ``fxquant platform``):
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
