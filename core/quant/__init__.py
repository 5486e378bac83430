"""Quantizer core: granularity objects, specs and the quantize/dequantize primitives (the only
place rounding rules live), the integer storage of codes (signed offset, int4 packing), streaming
observers, range estimators and fake-quant modules."""

from .codes import code_offset, pack_int4, to_signed_codes, unpack_int4
from .granularity import Granularity, InstanceGroups, PerAxis, PerGroup, PerTensor
from .lora import LoRALinear, loftq, low_rank_split
from .modules import (
    COMPUTE_DTYPES,
    AdaRoundWeight,
    CompensationLinear,
    FakeQuantize,
    QuantConv2d,
    QuantLinear,
    cached_by_version,
    quantizer_state,
    quantizers,
    version_key,
)
from .observers import Observer
from .primitives import (
    OMSE,
    Estimator,
    JointGrid,
    MinMax,
    PctMSE,
    Percentile,
    QuantSpec,
    SigmaClip,
    adaround_fake_quantize,
    adaround_init,
    adaround_regularizer,
    choose_qparams,
    dequantize,
    estimator_from_name,
    expand_params,
    fake_quantize,
    grid_values,
    group_ranges,
    instance_groups,
    log_step,
    quantize,
    rectified_sigmoid,
    resolve_params,
    round_ste,
    slice_ranges,
)

__all__ = [
    "cached_by_version", "version_key", "quantizer_state",
    "Granularity", "PerTensor", "PerAxis", "PerGroup", "InstanceGroups",
    "QuantSpec", "Estimator", "MinMax", "Percentile", "PctMSE", "OMSE", "JointGrid", "SigmaClip",
    "choose_qparams", "estimator_from_name", "quantize", "dequantize", "fake_quantize", "expand_params", "grid_values",
    "log_step", "round_ste",
    "instance_groups", "resolve_params", "slice_ranges", "group_ranges",
    "code_offset", "to_signed_codes", "pack_int4", "unpack_int4",
    "rectified_sigmoid", "adaround_init", "adaround_fake_quantize", "adaround_regularizer",
    "Observer", "FakeQuantize", "AdaRoundWeight", "QuantLinear", "QuantConv2d", "quantizers", "CompensationLinear",
    "COMPUTE_DTYPES", "LoRALinear", "loftq", "low_rank_split",
]
