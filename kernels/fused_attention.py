"""Fused lowered attention: ``q·kᵀ`` (int8) → softmax → A's codes → ``A·v`` (int8) in one kernel.

The unfused lowered attention runs three kernels and writes the ``N×N`` scores and the ``N×N``
codes to global memory (``int_attention.int_bmm``, ``torch.softmax``, ``bitlog2.bitlog2_av`` or
``int_bmm`` again). Here one program owns a (batch·head, block of query rows) and streams the keys
twice, FlashAttention-style, keeping only ``[BLOCK_R, BLOCK_K]`` tiles in registers:

1. **Row statistics.** For each key block, the integer scores
   ``S_int = Σ_d (q - z_q)(k - z_k) = q·kᵀ - z_q·Σk - z_k·Σq + d·z_q·z_k`` (one int8 ``tl.dot``, the
   same expression and float epilogue ``S = f32(S_int)·s_q·s_k`` as ``int_bmm``; then the graph's
   scalar ``·c`` or ``/c`` if it scales the scores before the softmax), then the online softmax
   running max ``m`` and sum ``l = Σ exp(S - m)``.
2. **Codes and A·v.** The scores again, ``p = exp(S - m) / l``, and A's quantizer on ``p``:

   * **BitLog2** (``KIND_BITLOG2``): ``n = floor(p·M)`` → MSB code → integer level ``D``
     (``bitlog2._code`` / ``bitlog2._level``), and ``Σ_j D_j·(v_j - z_v)`` as int8 GEMMs of
     the 7-bit digit planes of ``D`` (``bitlog2.level_planes``); ``A·v = (s_v/δ)·Σ``;
   * **uniform** (``KIND_UNIFORM``): signed codes ``a = clamp(rint(p / s_A) + z_A) - offset``
     (``int_linear._rint``: round half to even after a correctly rounded divide, the rule of
     ``dispatch.quantize``), ``Σ_j (a_j - z_a)(v_j - z_v)`` by one int8 ``tl.dot`` plus the
     zero-point sums; ``A·v = s_A·s_v·Σ``.

Keys beyond ``N`` (the last, partial block) get ``S = -inf``, hence ``p = 0``; their codes are
forced to contribute nothing. RepQ-ViT's log2/log√2 A quantizer is not fused (it runs unfused).

**Exactness.** The integer parts (scores, codes → sums) are the unfused path's: the tests store
the codes the kernel formed (``return_codes=True``) and check that its ``A·v`` equals the integer
reference on them bit for bit, and that its scores equal ``int_bmm``'s. The softmax is float:
the fused kernel sums ``exp`` in another order (online, by blocks) than ``torch.softmax``, so a
probability lying within a few ulps of a code boundary may take the neighbouring code; the tests
bound such flips to probabilities within 1e-5 (relative) of a boundary.

``fused_attention_ref`` is the unfused reference (integer ``q·kᵀ``, float64-free: the same fp32
scores, ``torch.softmax``, the quantizer core's codes, integer ``A·v``); ``fused_attention`` the
host wrapper.
"""

from __future__ import annotations

import torch

from fxquant.core.quant import QuantSpec, code_offset, to_signed_codes
from fxquant.core.quant.logcodes import bitlog2_codes_from_int, bitlog2_input, bitlog2_level_table
from fxquant.core.quant.spec import BITLOG2_VARIANTS

from .int_attention import int_bmm_cpu

try:
    import triton
    import triton.language as tl

    from .bitlog2 import _code, _level, av_int32_fits, level_planes
    from .int_linear import _rint

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton is a dependency on Linux
    HAS_TRITON = False

KIND_UNIFORM, KIND_BITLOG2 = 0, 1


# ------------------------------------------------------------------------------------------
# Reference (the unfused lowered path, on CPU)
# ------------------------------------------------------------------------------------------


def fused_attention_ref(q: torch.Tensor, q_zp: int, k: torch.Tensor, k_zp: int, v: torch.Tensor, v_zp: int,
                        score_scale: float, a_spec: QuantSpec, a_scale: float, a_zp: float = 0.0, *,
                        score_mul: float | None = None, score_div: float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_j A_j·(v_j - z_v) as int64 [B, N, dv], A's codes [B, N, N])`` for int8 codes ``q, k``
    ``[B, N, d]``, ``v`` ``[B, N, dv]`` with signed zero points. Scores as ``int_bmm_cpu``
    (``score_scale = s_q·s_k``), ``torch.softmax``, codes by the quantizer core. The codes are the
    BitLog2 codes (int32) or the signed uniform codes (int8); A's own scale (``1/δ`` or ``s_A``)
    and ``s_v`` are left to the caller, as in the kernel's integer result."""
    scores = int_bmm_cpu(q, 1.0, q_zp, k.transpose(-1, -2), score_scale, k_zp)
    if score_mul is not None:
        scores = scores * score_mul
    if score_div is not None:
        scores = scores / score_div
    p = torch.softmax(scores, dim=-1)
    vv = v.to(torch.int64) - int(v_zp)
    if a_spec.scheme == "bitlog2":
        codes = bitlog2_codes_from_int(bitlog2_input(p, a_spec.bitlog2_variant), a_spec.bitlog2_variant)
        levels = bitlog2_level_table(a_spec.bitlog2_variant).to(torch.int64)
        return levels[codes.to(torch.int64)] @ vv, codes
    if a_spec.scheme != "uniform":
        raise ValueError(f"fused attention takes a uniform or BitLog2 A quantizer, got {a_spec.short()}")
    codes = to_signed_codes(p, torch.tensor(float(a_scale)), torch.tensor(float(a_zp)), a_spec)
    za = int(round(float(a_zp))) - code_offset(a_spec)
    return (codes.to(torch.int64) - za) @ vv, codes


# ------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _scores(q, qsum, k_ptrs, kmask, keys, n_keys, q_zp, k_zp, score_scale, score_mul, HEAD_DIM,
                SCORE_OP: tl.constexpr):
        """fp32 scores of one key block: int8 dot + zero-point terms, the graph's scalar multiply or
        divide (its own rounding step, as in the unfused graph), ``-inf`` beyond the last key."""
        kt = tl.load(k_ptrs, mask=kmask, other=0)  # [BLOCK_DH, BLOCK_K] (kᵀ tile)
        s_int = tl.dot(q, kt, out_dtype=tl.int32)
        ksum = tl.sum(kt.to(tl.int32), axis=0)
        s_int = s_int - q_zp * ksum[None, :] - k_zp * qsum[:, None] + HEAD_DIM * q_zp * k_zp
        s = s_int.to(tl.float32) * score_scale
        if SCORE_OP == 1:
            s = s * score_mul
        elif SCORE_OP == 2:
            s = tl.math.div_rn(s, score_mul)
        return tl.where(keys[None, :] < n_keys, s, -float("inf"))

    @triton.jit
    def _fused_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, codes_ptr,
                                n_keys, head_dim, v_dim, q_zp, k_zp, v_zp, score_scale, score_mul,
                                a_scale, a_zp, a_zp_signed, out_scale,
                                sq_b, sq_r, sq_d, sk_b, sk_r, sk_d, sv_b, sv_r, sv_d, so_b, so_r, sc_b, sc_r,
                                SCORE_OP: tl.constexpr, KIND: tl.constexpr, M: tl.constexpr, HALF: tl.constexpr,
                                PLANES: tl.constexpr,
                                QMIN: tl.constexpr, QMAX: tl.constexpr, OFFSET: tl.constexpr,
                                STORE_CODES: tl.constexpr, OUT_FP16: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DH: tl.constexpr,
                                BLOCK_DV: tl.constexpr):
        bh = tl.program_id(0)
        rb = tl.program_id(1)
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        dh = tl.arange(0, BLOCK_DH)
        dv = tl.arange(0, BLOCK_DV)
        q = tl.load(q_ptr + bh * sq_b + rows[:, None] * sq_r + dh[None, :] * sq_d,
                    mask=(rows[:, None] < n_keys) & (dh[None, :] < head_dim), other=0)
        qsum = tl.sum(q.to(tl.int32), axis=1)
        # pass 1: row max and sum of exp, online
        m_i = tl.full((BLOCK_R,), -float("inf"), tl.float32)
        l_i = tl.zeros((BLOCK_R,), tl.float32)
        for k0 in range(0, n_keys, BLOCK_K):
            keys = k0 + tl.arange(0, BLOCK_K)
            k_ptrs = k_ptr + bh * sk_b + keys[None, :] * sk_r + dh[:, None] * sk_d
            kmask = (keys[None, :] < n_keys) & (dh[:, None] < head_dim)
            s = _scores(q, qsum, k_ptrs, kmask, keys, n_keys, q_zp, k_zp, score_scale, score_mul, head_dim, SCORE_OP)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
        # pass 2: probabilities, A's codes, integer A·v
        acc0 = tl.zeros((BLOCK_R, BLOCK_DV), dtype=tl.int32)
        acc1 = tl.zeros((BLOCK_R, BLOCK_DV), dtype=tl.int32)
        acc2 = tl.zeros((BLOCK_R, BLOCK_DV), dtype=tl.int32)
        asum = tl.zeros((BLOCK_R,), dtype=tl.int32)
        vsum = tl.zeros((BLOCK_DV,), dtype=tl.int32)
        for k0 in range(0, n_keys, BLOCK_K):
            keys = k0 + tl.arange(0, BLOCK_K)
            k_ptrs = k_ptr + bh * sk_b + keys[None, :] * sk_r + dh[:, None] * sk_d
            kmask = (keys[None, :] < n_keys) & (dh[:, None] < head_dim)
            s = _scores(q, qsum, k_ptrs, kmask, keys, n_keys, q_zp, k_zp, score_scale, score_mul, head_dim, SCORE_OP)
            p = tl.math.div_rn(tl.exp(s - m_i[:, None]), l_i[:, None])
            valid = keys[None, :] < n_keys
            v = tl.load(v_ptr + bh * sv_b + keys[:, None] * sv_r + dv[None, :] * sv_d,
                        mask=(keys[:, None] < n_keys) & (dv[None, :] < v_dim), other=0)
            if KIND == 1:  # BitLog2: levels D in 7-bit digit planes
                code = tl.where(valid, _code(p, M, HALF), 0)
                d = _level(code, HALF)
                acc0 += tl.dot((d & 127).to(tl.int8), v, out_dtype=tl.int32)
                acc1 += tl.dot(((d >> 7) & 127).to(tl.int8), v, out_dtype=tl.int32)
                if PLANES == 3:
                    acc2 += tl.dot((d >> 14).to(tl.int8), v, out_dtype=tl.int32)
                asum += tl.sum(d, axis=1)
            else:  # uniform: signed codes, zero-point sums over the valid keys only
                qa = tl.minimum(tl.maximum(_rint(tl.math.div_rn(p, a_scale)) + a_zp, QMIN), QMAX)
                code = tl.where(valid, qa - OFFSET, 0.0).to(tl.int32)
                acc0 += tl.dot(code.to(tl.int8), v, out_dtype=tl.int32)
                asum += tl.sum(code, axis=1)
                vsum += tl.sum(v.to(tl.int32), axis=0)
            if STORE_CODES:
                tl.store(codes_ptr + bh * sc_b + rows[:, None] * sc_r + keys[None, :], code.to(tl.int8),
                         mask=(rows[:, None] < n_keys) & valid)
        if KIND == 1:
            acc = acc0 + (acc1 << 7) + (acc2 << 14) - v_zp * asum[:, None]
        else:
            acc = acc0 - a_zp_signed * vsum[None, :] - v_zp * asum[:, None] + n_keys * a_zp_signed * v_zp
        out = acc.to(tl.float32) * out_scale
        optrs = out_ptr + bh * so_b + rows[:, None] * so_r + dv[None, :]
        omask = (rows[:, None] < n_keys) & (dv[None, :] < v_dim)
        if OUT_FP16:
            tl.store(optrs, out.to(tl.float16), mask=omask)
        else:
            tl.store(optrs, out, mask=omask)


def fused_attention(q: torch.Tensor, q_zp: int, k: torch.Tensor, k_zp: int, v: torch.Tensor, v_zp: int,
                    score_scale: float, a_spec: QuantSpec, a_scale: float, a_zp: float, out_scale: float, *,
                    score_mul: float | None = None, score_div: float | None = None,
                    out_dtype: torch.dtype = torch.float32, return_codes: bool = False,
                    blocks: tuple[int, int] | None = None):
    """Triton: ``out_scale·Σ_j A_j·(v_j - z_v)`` with ``A`` = A's quantizer applied to
    ``softmax(s_q·s_k·(q - z_q)(k - z_k)ᵀ)``, for int8 codes ``q, k`` ``[..., N, d]`` and ``v``
    ``[..., N, dv]`` (any strides; leading dims flattened) and signed zero points.

    ``a_spec``: BitLog2 (``a_scale`` = δ, ``out_scale`` = s_v/δ) or uniform per tensor
    (``a_scale``/``a_zp`` its scale and unsigned zero point, ``out_scale`` = s_A·s_v).
    ``score_mul`` / ``score_div``: a scalar the graph multiplies or divides the scores by before the
    softmax (e.g. ``1/√d`` after ``q·kᵀ``), applied as its own fp32 step.
    ``return_codes``: also return A's codes (int8 ``[..., N, N]``) as the kernel formed them.
    ``blocks`` = ``(BLOCK_R, BLOCK_K)``; default (16, 16) in the interpreter, (64, 64) with 4 warps on
    CUDA (one config: choosing candidates needs a GPU to time them)."""
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != torch.int8:
            raise TypeError(f"fused_attention takes int8 codes, got {name}: {t.dtype}")
    n, d, dv = q.shape[-2], q.shape[-1], v.shape[-1]
    if k.shape[-2:] != (n, d) or v.shape[-2] != n or not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(f"fused_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         "(self-attention: q and k [..., N, d], v [..., N, dv])")
    if a_spec.scheme == "bitlog2":
        kind, (m, half) = KIND_BITLOG2, BITLOG2_VARIANTS[a_spec.bitlog2_variant]
        if not av_int32_fits(n, a_spec.bitlog2_variant, v_zp):
            raise ValueError(f"fused_attention: {n} keys overflow the int32 accumulator of {a_spec.bitlog2_variant}")
        planes, qmin, qmax, offset = level_planes(a_spec.bitlog2_variant), 0, 0, 0
    elif a_spec.scheme == "uniform":
        kind, m, half, planes = KIND_UNIFORM, 1, False, 1
        qmin, qmax, offset = a_spec.qmin, a_spec.qmax, code_offset(a_spec)
        if a_spec.bits > 8:
            raise ValueError(f"fused_attention: {a_spec.short()} codes do not fit int8")
    else:
        raise ValueError(f"fused_attention takes a uniform or BitLog2 A quantizer, got {a_spec.short()} "
                         "(log2/log√2 A runs unfused: LoweredMatmul)")
    if score_mul is not None and score_div is not None:
        raise ValueError("fused_attention: give score_mul or score_div, not both")
    score_op, score_c = (1, score_mul) if score_mul is not None else (2, score_div) if score_div is not None else (0, 1.0)
    lead = q.shape[:-2]
    q3, k3, v3 = q.reshape(-1, n, d), k.reshape(-1, n, d), v.reshape(-1, n, dv)
    b = q3.shape[0]
    out = torch.empty(b, n, dv, dtype=out_dtype, device=q.device)
    codes = torch.empty(b, n, n, dtype=torch.int8, device=q.device) if return_codes else out
    br, bk = blocks or ((64, 64) if q.is_cuda else (16, 16))
    grid = (b, triton.cdiv(n, br))
    extra = {"num_warps": 4, "num_stages": 2} if q.is_cuda else {}
    _fused_attention_kernel[grid](
        q3, k3, v3, out, codes, n, d, dv, int(q_zp), int(k_zp), int(v_zp), float(score_scale), float(score_c), float(a_scale),
        float(a_zp),
        int(round(float(a_zp))) - offset,
        float(out_scale), q3.stride(0), q3.stride(1), q3.stride(2), k3.stride(0), k3.stride(1), k3.stride(2),
        v3.stride(0), v3.stride(1), v3.stride(2), out.stride(0), out.stride(1), codes.stride(0), codes.stride(1),
        SCORE_OP=score_op, KIND=kind, M=m, HALF=half, PLANES=planes, QMIN=float(qmin), QMAX=float(qmax), OFFSET=float(offset),
        STORE_CODES=return_codes, OUT_FP16=out_dtype == torch.float16, BLOCK_R=br, BLOCK_K=bk,
        BLOCK_DH=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        enable_fp_fusion=False, **extra)
    out = out.reshape(*lead, n, dv)
    return (out, codes.reshape(*lead, n, n)) if return_codes else out
