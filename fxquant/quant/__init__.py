"""Quantizer core: granularity objects, specs and the quantize/dequantize primitives (the only
place rounding rules live), the integer storage of codes (signed offset, int4 packing), streaming
observers, range estimators and fake-quant modules."""

from .codes import code_offset, pack_int4, to_signed_codes, unpack_int4
from .granularity import Granularity, PerAxis, PerGroup, PerTensor
from .modules import COMPUTE_DTYPES, CompensationLinear, FakeQuantize, QuantConv2d, QuantLinear, quantizers
from .observers import Observer
from .primitives import (
    OMSE,
    Estimator,
    MinMax,
    PctMSE,
    Percentile,
    QuantSpec,
    choose_qparams,
    dequantize,
    estimator_from_name,
    expand_params,
    fake_quantize,
    grid_values,
    log_step,
    quantize,
    round_ste,
)

__all__ = [
    "Granularity", "PerTensor", "PerAxis", "PerGroup",
    "QuantSpec", "Estimator", "MinMax", "Percentile", "PctMSE", "OMSE",
    "choose_qparams", "estimator_from_name", "quantize", "dequantize", "fake_quantize", "expand_params", "grid_values",
    "log_step", "round_ste", "code_offset", "to_signed_codes", "pack_int4", "unpack_int4",
    "Observer", "FakeQuantize", "QuantLinear", "QuantConv2d", "quantizers", "CompensationLinear", "COMPUTE_DTYPES",
]
