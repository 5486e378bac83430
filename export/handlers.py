"""One export handler per runtime module kind (as onnxruntime's quantizer registers one per op type).

``prepare_for_export`` replaces every fxquant module through the handler registered for its type
(``register_export_handler``, looked up along the MRO by ``export_handler``); a kind without one is
an error naming the module, so a new runtime module cannot be exported silently wrong. The
handlers build the export-ready modules of ``modules``:

* **lowered graphs** (``compile(..., lower=True)``): a ``LoweredLinear`` already holds the signed
  weight codes and its input quantizer; it becomes the same ``Q→DQ(x)``, ``DQ(W)`` → ``MatMul``
  (a ``LoweredPatchConv``: ``Q→DQ(x)``, ``DQ(W)`` → ``Conv``, its codes back in ``[O, C, kh, kw]``). A
  ``LoweredGroupedLinear`` (IGQ) does too, its input quantizer exported as a grouped
  ``FakeQuantize`` is (``modules``: contiguous groups per channel, instance-aware groups refused). A
  ``LoweredMatmul`` becomes ``matmul`` of its two operand quantizers, and a fused
  ``LoweredAttention`` its two matmuls around a ``Softmax`` again. A ``LoweredLinear`` with a dynamic
  (per-token) input gets the ``ExportDynamicActQuant`` a dynamic ``FakeQuantize`` gets.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from fxquant.core.errors import ConfigError
from fxquant.core.quant import (
    AdaRoundWeight,
    CompensationLinear,
    FakeQuantize,
    QuantConv2d,
    QuantLinear,
)
from fxquant.kernels.lowered import LoweredAttention, LoweredGroupedLinear, LoweredLinear, LoweredMatmul, LoweredPatchConv

from .modules import (
    ExportActQuant,
    ExportAttention,
    ExportCompensation,
    ExportConv2d,
    ExportDynamicActQuant,
    ExportLinear,
    ExportMatmul,
    _ExportWeight,
)

ExportHandler = Callable[[nn.Module, str, str], "nn.Module | None"]
EXPORT_HANDLERS: dict[type, ExportHandler] = {}


def register_export_handler(module_type: type) -> Callable[[ExportHandler], ExportHandler]:
    """Register ``handler(module, qualified name, act_dtype) -> export module`` for ``module_type``
    (and its subclasses). Returning None keeps the module as it is."""

    def deco(fn: ExportHandler) -> ExportHandler:
        EXPORT_HANDLERS[module_type] = fn
        return fn

    return deco


def export_handler(mod: nn.Module) -> ExportHandler | None:
    for cls in type(mod).__mro__:
        if cls in EXPORT_HANDLERS:
            return EXPORT_HANDLERS[cls]
    return None


@register_export_handler(FakeQuantize)
def _export_fake_quant(mod: FakeQuantize, name: str, act_dtype: str) -> nn.Module | None:
    if mod.weight:  # a weight quantizer is exported by the layer that owns it
        return None
    if not mod.fake_quant_enabled:
        raise ConfigError(f"ONNX export: quantizer '{name}' is disabled; export a calibrated model")
    if mod.spec.dynamic:  # ranges per input: computed in the graph
        return ExportDynamicActQuant.from_fake_quant(mod)
    return ExportActQuant.from_fake_quant(mod, act_dtype)


@register_export_handler(QuantLinear)
def _export_quant_linear(mod: QuantLinear, name: str, act_dtype: str) -> nn.Module:
    return ExportLinear(_ExportWeight.from_fake_quant(mod.weight, mod.weight_fake_quant), mod.bias)


@register_export_handler(AdaRoundWeight)
def _export_adaround(mod: AdaRoundWeight, name: str, act_dtype: str) -> nn.Module:
    # training-time only: block_reconstruct hardens the weights and puts the FakeQuantize back
    raise ConfigError(f"ONNX export: '{name}' is an AdaRound weight quantizer, which exists only while "
                      f"block_reconstruct trains; export the model that fxquant.compile returned")


@register_export_handler(QuantConv2d)
def _export_quant_conv(mod: QuantConv2d, name: str, act_dtype: str) -> nn.Module:
    return ExportConv2d(mod)


@register_export_handler(CompensationLinear)
def _export_compensation(mod: CompensationLinear, name: str, act_dtype: str) -> nn.Module:
    return ExportCompensation(mod)


@register_export_handler(LoweredLinear)
def _export_lowered_linear(mod: LoweredLinear, name: str, act_dtype: str) -> nn.Module:
    # the lowered layer already holds the signed integer codes QDQ needs; a dynamic input computes its ranges
    act = (ExportDynamicActQuant(mod.act_spec, f"{name} (input)") if mod.act_spec.dynamic
           else ExportActQuant(mod.act_spec, mod.a_scale, mod.a_zp, f"{name} (input)", act_dtype))
    w = _ExportWeight(mod.weight_codes(), mod.w_scale, mod.w_zp, name)
    return ExportLinear(w, mod.bias, act)


@register_export_handler(LoweredPatchConv)
def _export_lowered_patch_conv(mod: LoweredPatchConv, name: str, act_dtype: str) -> nn.Module:
    # the [O, K] codes back in the convolution's [O, C, kh, kw] layout: the fake-quant conv's QDQ form
    # (lowering keeps convolutions with dynamic inputs in fake quantization: their input is static here)
    act = ExportActQuant(mod.act_spec, mod.a_scale, mod.a_zp, f"{name} (input)", act_dtype)
    codes = mod.weight_codes().reshape(mod.out_channels, mod.in_channels, *mod.kernel_size)
    return ExportConv2d(w=_ExportWeight(codes, mod.w_scale, mod.w_zp, name), bias=mod.bias, stride=mod.kernel_size, act=act)


@register_export_handler(LoweredGroupedLinear)
def _export_lowered_grouped_linear(mod: LoweredGroupedLinear, name: str, act_dtype: str) -> nn.Module:
    # contiguous groups: the [C/g] block parameters, exported per channel like a PerGroup FakeQuantize;
    # instance-aware groups: ExportActQuant refuses them with the reason
    scale, zp = mod.act_params(1)
    act = ExportActQuant(mod.act_spec, scale, zp, f"{name} (input)", act_dtype)
    return ExportLinear(_ExportWeight(mod.weight_codes(), mod.w_scale, mod.w_zp, name), mod.bias, act)


@register_export_handler(LoweredMatmul)
def _export_lowered_matmul(mod: LoweredMatmul, name: str, act_dtype: str) -> nn.Module:
    return ExportMatmul(ExportActQuant(mod.a_spec, mod.a_scale, mod.a_zp, f"{name} (first operand)", act_dtype),
                        ExportActQuant(mod.b_spec, mod.b_scale, mod.b_zp, f"{name} (second operand)", act_dtype))


@register_export_handler(LoweredAttention)
def _export_lowered_attention(mod: LoweredAttention, name: str, act_dtype: str) -> nn.Module:
    return ExportAttention(_export_lowered_matmul(mod.qk, f"{name}.qk", act_dtype),
                           _export_lowered_matmul(mod.av, f"{name}.av", act_dtype), mod.score_op)


def _is_fxquant_module(mod: nn.Module) -> bool:
    return type(mod).__module__.split(".")[0] == "fxquant"
