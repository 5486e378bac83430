"""Integer attention matmuls: ``q·kᵀ`` and ``A·v`` on quantized operands.

Three operand kinds meet in a quantized attention block:

* **uniform × uniform** (``q·kᵀ``, and ``A·v`` when A has a uniform quantizer):
  ``out = s_a·s_b·Σ_k (a - z_a)(b - z_b)`` with integer codes and zero points. ``int_bmm`` is a
  batched Triton GEMM (int8 × int8 → int32 ``tl.dot``, zero-point correction, scales and output
  cast fused in the epilogue); ``int_bmm_cpu`` is the exact CPU path (an integer ``matmul`` of the
  zero-point-shifted codes); ``int_bmm_ref`` / ``int_bmm_float64_ref`` are the references.
* **log2 / log√2 A × uniform v** (RepQ-ViT's post-softmax quantizer): a code ``c`` stands for
  ``Δ·2^(-t·c)`` (t = 1 or 1/2, ``logcodes.log_step``) = ``Δ·2^(-⌈t·c⌉)·√2^h`` (``h = 1`` for odd
  log√2 codes, ``logcodes.log_shifts``). With ``E`` the largest shift, the even and odd codes give
  two integer accumulators of shifted values, ``acc_p = Σ_j [c_j ≡ p] (v_j << (E - ⌈t·c_j⌉))``, and
  ``A·v = Δ·s_v·2^(-E)·(acc_0 + √2·acc_1)`` (log2: ``acc_1 = 0``). ``log_av_int`` computes the
  accumulators (int64; the ``1 << shift`` weights make the products exact shifts), ``log_av``
  applies the float epilogue, ``log_av_float64_ref`` is the float reference.
* **BitLog2 A × uniform v**: ``Σ_j D_j·(v_j - z_v)`` with the integer levels ``D`` of
  ``fxquant.core.quant.logcodes`` and ``A·v = (s_v/δ)·Σ``; the Triton kernel is
  ``fxquant.kernels.bitlog2.bitlog2_av``; ``bitlog2_av_int`` is the CPU path.

No rounding or code rule lives here: codes come from ``fxquant.core.quant.dispatch.quantize``
(through ``fxquant.core.quant.codes.to_signed_codes``) and levels from the decoders and tables of
``fxquant.core.quant.logcodes``.
"""

from __future__ import annotations

import functools
import math

import torch

from fxquant.core.quant import QuantSpec, log_step, quantize
from fxquant.core.quant.logcodes import (
    bitlog2_codes_from_int,
    bitlog2_input,
    bitlog2_level_by_input,
    bitlog2_level_table,
    log_code_of_count,
    log_codes,
    log_count,
    log_shifts,
)
from fxquant.core.quant.spec import BITLOG2_VARIANTS

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton is a dependency on Linux
    HAS_TRITON = False

# Largest shift a log code may need for the integer path: 2^-32 relative levels and below would
# need wider accumulators (8-bit log2/log√2 spans 2^-254 / 2^-127); such quantizers stay in float.
MAX_LOG_SHIFT = 32


# ------------------------------------------------------------------------------------------
# uniform × uniform
# ------------------------------------------------------------------------------------------


def _acc_dtype(k: int, bits_a: int, bits_b: int) -> torch.dtype:
    """int32 unless ``K·2^bits_a·2^bits_b`` could overflow it."""
    return torch.int32 if k * 2 ** (bits_a + bits_b) < 2**31 else torch.int64


def int_bmm_ref(a: torch.Tensor, a_zp, b: torch.Tensor, b_zp) -> torch.Tensor:
    """``(a - z_a) @ (b - z_b)`` in int64 for integer ``a [..., M, K]``, ``b [..., K, N]``."""
    return torch.matmul(a.to(torch.int64) - int(a_zp), b.to(torch.int64) - int(b_zp))


def int_bmm_float64_ref(a, a_scale, a_zp, b, b_scale, b_zp) -> torch.Tensor:
    """Float64 product of the dequantized operands."""
    da = (a.double() - float(a_zp)) * float(a_scale)
    db = (b.double() - float(b_zp)) * float(b_scale)
    return da @ db


def exact_float_dtype(k: int, max_a: int, max_b: int) -> torch.dtype | None:
    """The float type whose matmul of integer operands (``|a| ≤ max_a``, ``|b| ≤ max_b``, ``K = k``)
    is exact: every partial sum is an integer below ``k·max_a·max_b``, exact in float32 under 2^24
    and in float64 under 2^53 whatever the summation order (so BLAS may block and vectorise as it
    likes). None when neither is exact."""
    bound = k * max_a * max_b
    return torch.float32 if bound < 2**24 else torch.float64 if bound < 2**53 else None


def int_bmm_cpu(a: torch.Tensor, a_scale, a_zp, b: torch.Tensor, b_scale, b_zp, *,
                bits: tuple[int, int] = (8, 8)) -> torch.Tensor:
    """Exact integer path: the matmul of the zero-point-shifted codes in float32/float64 BLAS where
    that is exact (``exact_float_dtype``; integer matmul otherwise), then ``s_a·s_b`` (fp32)."""
    # a signed b-bit code minus its (in-range) zero point is below 2^b in magnitude
    dt = exact_float_dtype(a.shape[-1], 2 ** bits[0], 2 ** bits[1]) or _acc_dtype(a.shape[-1], *bits)
    acc = torch.matmul(a.to(dt) - int(a_zp), b.to(dt) - int(b_zp))
    return acc.to(torch.float32) * (float(a_scale) * float(b_scale))


if HAS_TRITON:

    @triton.jit
    def _int_bmm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, scale, a_zp, b_zp,
                        stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn, stride_cb, stride_cm,
                        OUT_FP16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One (batch, M tile, N tile) per program: int8 tiles, int32 ``tl.dot``, row/column sums
        for the zero-point correction, one float multiply in the epilogue. Strided operands, so
        ``kᵀ`` and head-split views need no copy."""
        bid = tl.program_id(0)
        pid = tl.program_id(1)
        num_n = tl.cdiv(N, BLOCK_N)
        rm = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_base = a_ptr + bid * stride_ab
        b_base = b_ptr + bid * stride_bb
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        arow = tl.zeros((BLOCK_M,), dtype=tl.int32)
        bcol = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(a_base + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
            b = tl.load(b_base + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                        mask=(kk[:, None] < K) & (rn[None, :] < N), other=0)
            acc += tl.dot(a, b, out_dtype=tl.int32)
            arow += tl.sum(a.to(tl.int32), axis=1)
            bcol += tl.sum(b.to(tl.int32), axis=0)
        acc = acc - a_zp * bcol[None, :] - b_zp * arow[:, None] + K * a_zp * b_zp
        out = acc.to(tl.float32) * scale
        cmask = (rm[:, None] < M) & (rn[None, :] < N)
        ptrs = c_ptr + bid * stride_cb + rm[:, None] * stride_cm + rn[None, :]
        if OUT_FP16:
            tl.store(ptrs, out.to(tl.float16), mask=cmask)
        else:
            tl.store(ptrs, out, mask=cmask)

    def get_bmm_autotune_config() -> list:
        """Tiles for attention shapes (M, N = tokens ≈ 50–600, K = head dim 32–128 or tokens)."""
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                         (64, 64, 64, 4, 4), (64, 64, 32, 4, 5), (32, 64, 64, 4, 5)]]

    _int_bmm_tuned = triton.autotune(configs=get_bmm_autotune_config(), key=["M", "N", "K"])(_int_bmm_kernel)


def int_bmm(a: torch.Tensor, a_scale, a_zp, b: torch.Tensor, b_scale, b_zp, *, out_dtype: torch.dtype = torch.float32,
            blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Triton: ``s_a·s_b·(a - z_a) @ (b - z_b)`` for int8 ``a [..., M, K]``, ``b [..., K, N]``
    (same leading dims; any strides in the last two). ``blocks`` fixes ``(BLOCK_M, BLOCK_N,
    BLOCK_K)``; by default CUDA autotunes and the interpreter uses (16, 16, 16)."""
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int_bmm takes int8 codes, got {a.dtype} and {b.dtype}")
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"int_bmm: shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply")
    lead, (m, k), n = a.shape[:-2], a.shape[-2:], b.shape[-1]
    a3, b3 = a.reshape(-1, m, k), b.reshape(-1, k, n)
    c = torch.empty(a3.shape[0], m, n, dtype=out_dtype, device=a.device)
    args = (a3, b3, c, m, n, k, float(a_scale) * float(b_scale), int(a_zp), int(b_zp),
            a3.stride(0), a3.stride(1), a3.stride(2), b3.stride(0), b3.stride(1), b3.stride(2), c.stride(0), c.stride(1))
    if blocks is None and a.device.type == "cuda":
        grid = lambda meta: (a3.shape[0], triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        _int_bmm_tuned[grid](*args, OUT_FP16=out_dtype == torch.float16)
    else:
        bm, bn, bk = blocks or (16, 16, 16)
        grid = (a3.shape[0], triton.cdiv(m, bm) * triton.cdiv(n, bn))
        _int_bmm_kernel[grid](*args, OUT_FP16=out_dtype == torch.float16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return c.reshape(*lead, m, n)


# ------------------------------------------------------------------------------------------
# log2 / log√2 A × uniform v
# ------------------------------------------------------------------------------------------


def log_max_shift(spec: QuantSpec) -> int:
    """``E``: the shift of the smallest non-zero level, ``⌈t·qmax⌉`` (log2: ``qmax``; log√2:
    ``⌈qmax/2⌉``), from ``logcodes.log_shifts``."""
    if spec.scheme not in ("log2", "log_sqrt2"):
        raise ValueError(f"log_max_shift takes a log2/log_sqrt2 spec, got {spec.scheme}")
    return int(log_shifts(torch.tensor(spec.qmax), spec)[0])


def exact_level_matmul(levels: torch.Tensor, index: torch.Tensor, v: torch.Tensor, max_level: int) -> torch.Tensor:
    """``Σ_j levels[index_j]·v_j`` (int64) for integer ``v`` (``|v| < 2^9``) and integer levels
    below ``max_level``: the per-element levels gathered from their table, summed in float32/float64
    BLAS where that is exact (``exact_float_dtype``), int64 otherwise."""
    dt = exact_float_dtype(v.shape[-2], max_level, 2**9) or torch.int64
    a = torch.take(levels.to(device=index.device, dtype=dt), index.to(torch.int64))
    return torch.matmul(a, v.to(dt)).to(torch.int64)


@functools.lru_cache(maxsize=None)
def _log_weight_tables(spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code integer weights ``2^(E - s)`` of the even (no √2) and odd (√2) levels, 0 elsewhere
    and for the zero code: ``log_av_int``'s sums, looked up instead of recomputed per element."""
    e = log_max_shift(spec)
    c = torch.arange(spec.zero_code + 1, dtype=torch.int64)
    s, h = log_shifts(c, spec)  # 2^(-t·c) = 2^(-s)·√2^h
    weight = torch.where(c <= spec.qmax, torch.bitwise_left_shift(torch.ones_like(c), (e - s).clamp(min=0)),
                         torch.zeros_like(c))
    odd = h.bool()
    return torch.where(odd, 0, weight), torch.where(odd, weight, 0)


def log_av_int(codes: torch.Tensor, v: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer accumulators ``(acc_0, acc_1)`` (int64) of ``Σ_j 2^(E - t·c_j)·v_j`` split by the
    parity of the √2 factor: codes ``[..., M, N]``, integer ``v [..., N, d]`` (values minus zero
    point). The zero code contributes nothing. ``A·v = Δ·s_v·2^(-E)·(acc_0 + √2·acc_1)``."""
    if v.is_floating_point():
        raise TypeError("log_av_int takes integer v (quantized values minus zero point)")
    e = log_max_shift(spec)
    if e > MAX_LOG_SHIFT:
        raise ValueError(f"{spec.short()}: levels down to 2^-{e} need shifts beyond {MAX_LOG_SHIFT} bits")
    # the sums run in float BLAS, exact because every partial sum is an integer below
    # N·2^E·2^9 (exact_float_dtype: float32 when that is below 2^24, else float64); int64 beyond,
    # which CUDA's matmul does not have
    if exact_float_dtype(v.shape[-2], 2**e, 2**9) is None and v.device.type != "cpu":
        raise ValueError(f"log_av_int: {v.shape[-2]} keys × 2^{e} levels exceed float64's exact integers")
    even, odd = _log_weight_tables(spec)
    return exact_level_matmul(even, codes, v, 2**e), exact_level_matmul(odd, codes, v, 2**e)


def log_av(codes: torch.Tensor, log_scale, v: torch.Tensor, v_scale, spec: QuantSpec) -> torch.Tensor:
    """``A·v`` (fp32) from log codes of A (scale ``Δ``) and integer ``v`` (scale ``s_v``)."""
    return _log_av_scaled(*log_av_int(codes, v, spec), log_scale, v_scale, spec)


def _log_av_scaled(acc0: torch.Tensor, acc1: torch.Tensor, log_scale, v_scale, spec: QuantSpec) -> torch.Tensor:
    """``Δ·s_v·2^(-E)·(acc_0 + √2·acc_1)`` in float64, returned as float32."""
    total = acc0.double() + math.sqrt(2.0) * acc1.double()
    return (total * (float(log_scale) * float(v_scale) * 2.0 ** -log_max_shift(spec))).float()


def log_av_from_ratio(ratio: torch.Tensor, log_scale, v: torch.Tensor, v_scale, spec: QuantSpec) -> torch.Tensor:
    """``log_av(log_codes(ratio), ...)`` from ``r = A/Δ`` directly: the per-code weights composed
    with ``log_code_of_count`` into per-count tables and looked up at ``log_count(r)``, so no codes
    are formed."""
    if v.is_floating_point():
        raise TypeError("log_av_from_ratio takes integer v (quantized values minus zero point)")
    e = log_max_shift(spec)
    if e > MAX_LOG_SHIFT or exact_float_dtype(v.shape[-2], 2**e, 2**9) is None:
        return log_av(log_codes(ratio, spec), log_scale, v, v_scale, spec)
    count = log_count(ratio, spec)
    by_count = log_code_of_count(torch.arange(2**spec.bits + 1), spec)
    even, odd = (t[by_count] for t in _log_weight_tables(spec))
    return _log_av_scaled(exact_level_matmul(even, count, v, 2**e), exact_level_matmul(odd, count, v, 2**e),
                          log_scale, v_scale, spec)


def log_av_float64_ref(codes: torch.Tensor, log_scale, v: torch.Tensor, v_scale, spec: QuantSpec) -> torch.Tensor:
    """Float64 ``Â @ v̂`` with ``Â = Δ·2^(-t·c)`` (zero code → 0), independent of the shifts."""
    step = log_step(spec)
    c = codes.double()
    a = torch.where(codes <= spec.qmax, torch.exp2(-step * c), torch.zeros_like(c)) * float(log_scale)
    return a @ (v.double() * float(v_scale))


# ------------------------------------------------------------------------------------------
# BitLog2 A × uniform v
# ------------------------------------------------------------------------------------------


def bitlog2_av_int(codes: torch.Tensor, v: torch.Tensor, variant: str) -> torch.Tensor:
    """CPU path of ``Σ_j D_j·v_j`` (int64) with the integer levels ``D`` of the codes; the same
    sums as ``fxquant.kernels.bitlog2.bitlog2_av_ref`` without its ``[M, N, d]`` shift tensor."""
    if v.is_floating_point():
        raise TypeError("bitlog2_av_int takes integer v (quantized values minus zero point)")
    return exact_level_matmul(bitlog2_level_table(variant), codes, v, BITLOG2_VARIANTS[variant][0])


def bitlog2_av_from_input(n: torch.Tensor, v: torch.Tensor, variant: str) -> torch.Tensor:
    """``bitlog2_av_int(bitlog2_codes_from_int(n), v)`` from the integer BitLog2 inputs ``n``
    (``bitlog2_input``) directly: each ``n``'s level looked up in ``bitlog2_level_by_input``
    (one gather instead of the shift-and-compare code arithmetic), the same exact float BLAS sums."""
    if v.is_floating_point():
        raise TypeError("bitlog2_av_from_input takes integer v (quantized values minus zero point)")
    return exact_level_matmul(bitlog2_level_by_input(variant), n, v, BITLOG2_VARIANTS[variant][0])


def log_codes_of(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes (int64) of ``x`` under a per-tensor log or BitLog2 quantizer (the rule of
    ``quant.dispatch.quantize``, without its round trip through a float tensor)."""
    if scale.numel() != 1:
        return quantize(x.float(), scale, torch.zeros_like(scale), spec).to(torch.int64)
    if spec.scheme == "bitlog2":
        return bitlog2_codes_from_int(bitlog2_input(x, spec.bitlog2_variant), spec.bitlog2_variant).to(torch.int64)
    return log_codes(x.float() / scale.reshape(()), spec)
