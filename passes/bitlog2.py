"""BitLog2 (jiho264/BitLog2; docs/methods.md, BitLog2): RepQ-ViT with the softmax-output quantizer replaced
by an integer log2 quantizer, as an annotation pass.

``BitLog2Attention(scheme=...)`` rewrites the spec of the softmax → A·v edge (run it after the
uniform/RepQ annotation and before ``insert_quantizers``). Schemes:

===========  =================================================================  ======
scheme       quantizer                                                          levels
===========  =================================================================  ======
single16     BitLog2 Single, M = 32768: ``D = 2^k``                             16
single17     BitLog2 Single, M = 65536                                          17
half16       BitLog2 Half, M = 256: ``D = 2^k + h·2^(k-1)``                     16
half17       BitLog2 Half, M = 384 (the paper's best)                           17
sqrt2_17     RepQ-ViT's log√2 (2^b + 1 levels)                                  17
sqrt2_16     log√2 with codes clamped to 0..2^b-2, zero inside the code range    16
===========  =================================================================  ======
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from fxquant.core import match
from fxquant.core.errors import ConfigError, PassError
from fxquant.core.meta import input_specs, set_input_spec
from fxquant.core.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.core.quant import FakeQuantize, PctMSE, QuantSpec
from fxquant.core.quant.spec import BITLOG2_VARIANTS

SCHEMES = tuple(BITLOG2_VARIANTS) + ("sqrt2_17", "sqrt2_16")


def softmax_spec(scheme: str, bits: int = 4) -> QuantSpec:
    """The quantizer spec of a BitLog2 scheme name."""
    if scheme in BITLOG2_VARIANTS:
        return QuantSpec(bits=4, scheme="bitlog2", bitlog2_variant=scheme)
    if scheme in ("sqrt2_17", "sqrt2_16"):
        return QuantSpec(bits=bits, scheme="log_sqrt2", estimator=PctMSE(), fit_bits=scheme == "sqrt2_16")
    raise ConfigError(f"unknown BitLog2 scheme {scheme!r}; known: {list(SCHEMES)}")


@register_pass
@dataclass(frozen=True)
class BitLog2Attention(Pass):
    """Quantize every attention map (softmax → A·v) with BitLog2's integer log2 levels (``scheme``, default half17)."""

    name = "bitlog2_attention"
    requires = ("annotated",)
    provides = ("bitlog2_annotated",)

    scheme: str = "half17"

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ConfigError(f"bitlog2_attention: unknown scheme {self.scheme!r}; known: {list(SCHEMES)}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modules = match.modules_of(gm)
        n = 0
        for att in match.find_attention(gm, modules):
            src = att.av.args[0]
            if src.op == "call_module" and isinstance(modules.get(src.target), FakeQuantize):
                raise PassError(f"bitlog2_attention: '{att.av.name}' already has a quantizer ('{src.target}'); "
                                f"run bitlog2_attention before insert_quantizers")
            spec = input_specs(att.av).get(0)
            if spec is None:
                continue
            set_input_spec(att.av, 0, softmax_spec(self.scheme, spec.bits))
            n += 1
        if n == 0:
            raise PassError("bitlog2_attention: found no quantized softmax -> A·v edge; run annotate_uniform first "
                            "(with quantize_attention=True) on a model with visible attention")
        return PassResult(gm, modified=False, summary=f"{n} attention maps -> {self.scheme}", record={"attention": n})
