"""``AnnotateUniform``: decide which tensors get which uniform quantizer (writes specs, no surgery).

Weights of every Linear/Conv (per output channel by default) and activations at the input of
every Linear, of the patch-embedding conv, and both operands of both attention matmuls
(q, kᵀ, softmax output A, v). Layers are selected by kind and FQN glob (``skip=("head",)``);
the stem and classifier head can be kept at 8 bits (``head_stem_8bit``) or in floating point
(``head_stem_float``: what the transformer-quantization platform's ``--head_stem_8bit`` does, since
its quantizers return their input unchanged at 8 bits). ``overflow_fix`` keeps 8-bit weights of the
stem (or of every layer) within 7 bits, for x86 CPUs whose int8 GEMMs saturate (``OVERFLOW_FIX``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import fx

from fxquant.core import match
from fxquant.core.errors import ConfigError
from fxquant.core.meta import ROLE, set_input_spec, set_weight_spec
from fxquant.core.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.core.quant import PctMSE, PerAxis, PerTensor, QuantSpec

LAYER_KINDS = ("linear", "conv")
ATTENTION_MATMULS = ("qk", "av")
# x86 CPUs without VNNI/AMX multiply u8 activations by s8 weights with vpmaddubsw, which sums each
# pair of products into a saturating int16: with 8-bit weights (|w| <= 128) two products reach
# 2·255·128 = 65280 > 32767. 7-bit weights (|w| <= 64: 2·255·64 = 32640) cannot overflow. "stem"
# fixes the patch embedding only (NNCF's default, OverflowFix.FIRST_LAYER): its input is the raw
# image, whose codes spread over the whole 8-bit range, and it is where the overflow costs accuracy
# (CIFAR ViT w8a8-sym in OpenVINO on an AVX2-only CPU: 64.65 % top-1 on 2,000 images against 67.90
# fake-quant; stem weights halved: 67.55 against 67.60); "all" fixes every layer.
OVERFLOW_FIX = ("none", "stem", "all")
OVERFLOW_SAFE_WEIGHT_BITS = 7


def _skipped(fqn: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(fqn, g) or fnmatch.fnmatchcase(fqn, g + ".*") for g in globs)


@register_pass
@dataclass(frozen=True)
class AnnotateUniform(Pass):
    """Annotate uniform weight/activation quantizers.

    Args:
        weight: weight quantizer spec (per output channel by default).
        act: activation quantizer spec (per tensor by default).
        layer_act: spec of Linear/Conv inputs when it differs from ``act`` (which then applies to
            the attention matmul operands only), e.g. the platform's per-channel Linear inputs.
        conv_act: spec of Conv inputs when it differs from ``layer_act`` (or ``act``), e.g. dynamic
            token groups on Linear inputs, which have no meaning on an image's pixel rows.
        head_stem_8bit: patch embedding and classifier head(s) at 8 bits (weights and inputs).
        head_stem_float: patch embedding and classifier head(s) left in floating point.
        quantize_attention: quantize q, kᵀ, softmax output and v at the attention matmuls.
        attention_matmuls: which attention matmuls get quantized operands: ``"qk"`` (q·kᵀ) and/or
            ``"av"`` (softmax·v). ``("qk",)`` is NNCF's transformer scheme (A·v stays in float).
        layer_kinds: which layer kinds to quantize (``"linear"``, ``"conv"``).
        skip: FQN globs of modules to leave in floating point (``"head"``, ``"blocks.0.*"``).
        overflow_fix: ``"stem"`` or ``"all"``: weights of more than 7 bits of the patch embedding
            (or of every layer) quantized at 7 bits, so that int8 GEMMs that sum pairs of u8×s8
            products into int16 (x86 without VNNI: ``fxquant.export.cpu``) cannot saturate;
            ``"none"``: as annotated.
    """

    name = "annotate_uniform"
    provides = ("annotated",)

    weight: QuantSpec = field(default_factory=lambda: QuantSpec(bits=8, granularity=PerAxis(0), estimator=PctMSE()))
    act: QuantSpec = field(default_factory=lambda: QuantSpec(bits=8, granularity=PerTensor(), estimator=PctMSE()))
    layer_act: QuantSpec | None = None
    conv_act: QuantSpec | None = None
    head_stem_8bit: bool = False
    head_stem_float: bool = False
    quantize_attention: bool = True
    attention_matmuls: tuple[str, ...] = ("qk", "av")
    layer_kinds: tuple[str, ...] = LAYER_KINDS
    skip: tuple[str, ...] = ()
    overflow_fix: str = "none"

    def __post_init__(self):
        if self.overflow_fix not in OVERFLOW_FIX:
            raise ConfigError(f"annotate_uniform: overflow_fix must be one of {list(OVERFLOW_FIX)}, got {self.overflow_fix!r}")
        bad = [k for k in self.layer_kinds if k not in LAYER_KINDS]
        if bad:
            raise ConfigError(f"annotate_uniform: unknown layer kinds {bad}; known: {list(LAYER_KINDS)}")
        if self.head_stem_8bit and self.head_stem_float:
            raise ConfigError("annotate_uniform: head_stem_8bit and head_stem_float exclude each other; pick one")
        bad = [m for m in self.attention_matmuls if m not in ATTENTION_MATMULS]
        if bad or not self.attention_matmuls:
            raise ConfigError(f"annotate_uniform: attention_matmuls takes a non-empty subset of {list(ATTENTION_MATMULS)}, "
                              f"got {list(self.attention_matmuls)}; use quantize_attention=False for none")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modules = match.modules_of(gm)
        stems = set(match.stem_layers(gm, modules))
        heads = set(match.head_layers(gm, modules))
        n_layers = n_attn = n_skipped = 0
        for node in gm.graph.nodes:
            kind = match.op_kind(node, modules)
            if kind not in LAYER_KINDS or node.op != "call_module":
                continue
            if kind not in self.layer_kinds or _skipped(match.node_fqn(node), self.skip):
                n_skipped += 1
                continue
            w, a = self.weight, (self.conv_act if kind == "conv" and self.conv_act is not None else self.layer_act or self.act)
            role = "stem" if node in stems else "head" if node in heads else kind
            if self.head_stem_float and role in ("stem", "head"):
                n_skipped += 1
                continue
            if self.head_stem_8bit and role in ("stem", "head"):
                w, a = w.with_(bits=8), a.with_(bits=8)
            if (self.overflow_fix == "all" or (self.overflow_fix == "stem" and role == "stem")) \
                    and w.bits > OVERFLOW_SAFE_WEIGHT_BITS:
                w = w.with_(bits=OVERFLOW_SAFE_WEIGHT_BITS)
            set_weight_spec(node, w)
            set_input_spec(node, 0, a)
            node.meta[ROLE] = role
            n_layers += 1
        if self.quantize_attention:
            for att in match.find_attention(gm, modules):
                if _skipped(match.node_fqn(att.softmax), self.skip):
                    n_skipped += 1
                    continue
                for mm, role in ((att.qk, "attn.qk"), (att.av, "attn.av")):
                    if role[len("attn."):] not in self.attention_matmuls:
                        continue
                    set_input_spec(mm, 0, self.act)
                    set_input_spec(mm, 1, self.act)
                    mm.meta[ROLE] = role
                n_attn += 1
        summary = f"{n_layers} layers, {n_attn} attention blocks annotated; {n_skipped} skipped; " \
                  f"w={self.weight.short()} a={self.act.short()}" + (" (stem/head 8-bit)" if self.head_stem_8bit else "") \
                  + (" (stem/head float)" if self.head_stem_float else "") \
                  + (f" (overflow fix: {self.overflow_fix} weights <= 7 bits)" if self.overflow_fix != "none" else "")
        return PassResult(gm, modified=False, summary=summary, record={"layers": n_layers, "attention": n_attn})
