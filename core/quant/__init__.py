"""Quantizer core: granularity objects, specs and the quantize/dequantize primitives (the only
place rounding rules live), the integer storage of codes (signed offset, int4 packing), streaming
observers, range estimators and fake-quant modules.

The one home of fxquant's quantizer math: every rounding rule, clamp, scale formula and code→value
mapping used anywhere in fxquant (fake quantization, calibration search, reparameterization,
integer kernels' references, ONNX export) is defined in this package and imported from it. Nothing
else rounds. One concern per module:

* ``spec``: ``QuantSpec`` and the constants of its code range (schemes, bits, BitLog2 variants);
* ``estimators``: the range-estimator configs; ``range_search``: the search they name;
* ``layout``: parameters in granularity layout; ``group_params``: parameters decided per input
  (IGQ-ViT's instance groups, dynamic per-token ranges);
* ``affine``: uniform rounding and (scale, zero point) from a range; ``logcodes``: log2/log√2 and
  BitLog2 codes; ``dispatch``: ``quantize``/``dequantize``/``fake_quantize`` for every scheme;
* ``codes``: how codes are stored; ``adaround``: learned rounding; ``observers``, ``modules``,
  ``lora``: calibration observers, fake-quant modules, low-rank compensation.
"""

from .adaround import adaround_fake_quantize, adaround_init, adaround_regularizer, rectified_sigmoid
from .affine import choose_qparams, round_clamp_centered, round_ste
from .codes import code_offset, pack_int4, to_signed_codes, unpack_int4
from .dispatch import dequantize, fake_quantize, grid_values, quantize
from .estimators import OMSE, Estimator, JointGrid, MinMax, PctMSE, Percentile, SigmaClip, estimator_from_name
from .granularity import DYNAMIC_LEVELS, Dynamic, Granularity, InstanceGroups, PerAxis, PerGroup, PerTensor
from .group_params import dynamic_qparams, dynamic_ranges, group_ranges, instance_groups, resolve_params, slice_ranges
from .layout import expand_params
from .logcodes import log_step
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
from .spec import QuantSpec

__all__ = [
    "cached_by_version", "version_key", "quantizer_state",
    "Granularity", "PerTensor", "PerAxis", "PerGroup", "InstanceGroups", "Dynamic", "DYNAMIC_LEVELS",
    "QuantSpec", "Estimator", "MinMax", "Percentile", "PctMSE", "OMSE", "JointGrid", "SigmaClip",
    "choose_qparams", "estimator_from_name", "quantize", "dequantize", "fake_quantize", "expand_params", "grid_values",
    "log_step", "round_ste", "round_clamp_centered",
    "instance_groups", "resolve_params", "slice_ranges", "group_ranges", "dynamic_ranges", "dynamic_qparams",
    "code_offset", "to_signed_codes", "pack_int4", "unpack_int4",
    "rectified_sigmoid", "adaround_init", "adaround_fake_quantize", "adaround_regularizer",
    "Observer", "FakeQuantize", "AdaRoundWeight", "QuantLinear", "QuantConv2d", "quantizers", "CompensationLinear",
    "COMPUTE_DTYPES", "LoRALinear", "loftq", "low_rank_split",
]
