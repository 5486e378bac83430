"""What the CPU that runs an exported model does with int8 dot products.

x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) have no int8 dot-product instruction that
accumulates exactly: onnxruntime's fused ``MatMulIntegerToFloat`` and OpenVINO's CPU plugin
multiply u8×s8 byte pairs with ``vpmaddubsw``, whose int16 pair sums saturate, so their int8 GEMMs
can differ from fxquant's integer arithmetic by more than a rounding step (measured on an AVX2-only
AMD EPYC, CIFAR ViT W8A8, 200 images: onnxruntime max |Δlogit| 0.18 / mean 0.022 fused against
0.042 / 0.0028 with its graph optimizations off; OpenVINO max 1.8). With VNNI (``vpdpbusd``) or AMX
the int32 accumulation is exact.

The workaround (NNCF's ``OverflowFix``) is 7-bit weights, for which no pair sum can overflow
(2·255·64 < 2^15): recipe option ``overflow_fix`` (``annotate_uniform``). The overflow that costs
accuracy is in the patch embedding, whose input codes spread over the whole range: CIFAR ViT
``w8a8-sym`` in OpenVINO on the AVX2-only EPYC, all 10,000 test images, 65.41 % top-1 against 69.09
fake-quant; with 7-bit stem weights (``overflow_fix="stem"``, the default of ``w8a8-sym``, ``w8a8-ov``
and ``repq-w8a8-sym``) 68.89 against 69.05; 7-bit weights everywhere (``"all"``) 68.99 against 69.03.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU flags of this machine (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def int8_dot_exact() -> bool:
    """Whether x86 runtimes' int8 GEMMs accumulate exactly on this machine: not x86, or an x86 CPU
    with VNNI or AMX (module docstring)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    return any(f in cpu_flags() for f in EXACT_INT8_FLAGS)


INT8_SATURATION_NOTE = ("this CPU has no VNNI/AMX: onnxruntime's and OpenVINO's int8 GEMMs sum byte pairs into saturating "
                        "int16 (vpmaddubsw), so the exported model's logits can differ from fxquant's by more than a "
                        "rounding step here (recipes w8a8-sym, w8a8-ov and repq-w8a8-sym keep 7-bit stem weights against it: "
                        "--set overflow_fix=stem|all); on a VNNI/AMX CPU they agree (see fxquant.export.cpu). "
                        "Without VNNI/AMX int8 is also slower than FP32 (CIFAR ViT in OpenVINO on an AVX2-only EPYC, "
                        "batch 32: int8 77-92 ms, FP32 45 ms; docs/results.md): time both before deploying int8 there")


__all__ = ["cpu_flags", "int8_dot_exact", "EXACT_INT8_FLAGS", "INT8_SATURATION_NOTE"]
