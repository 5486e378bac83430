"""BitLog2 attention kernels: softmax fused with the integer log2 code, and the integer A·v.

The story, as in the Triton tutorials:

1. **Reference** (plain PyTorch, integer arithmetic; the spec and the CPU path):
   ``bitlog2_codes_ref`` = softmax → ``n = floor(p·M)`` → MSB code (``fxquant.core.quant.logcodes``,
   the only copy of the rule); ``bitlog2_av_ref`` = ``Σ_j (v_j << k_j) + h_j·(v_j << (k_j - 1))``
   on integer ``v`` (int64 accumulator), i.e. ``Σ_j D_j·v_j`` with shifts only, ``(k, h)`` decoded
   from the codes by ``logcodes.bitlog2_shifts``. Packed codes use ``fxquant.core.quant.codes``'
   ``pack_int4(signed=False)`` layout (even index in the low nibble, odd tail padded with 0).
2. **Kernels**: ``_softmax_codes_kernel`` (one program per attention row: max, exp, sum, then the
   code of each probability, written as int8 codes or packed two 4-bit codes per byte for the
   16-level schemes) and ``_bitlog2_av_kernel`` (one program per (row block, head-dim block): the
   levels ``D`` of a code tile split into 7-bit digit planes ``D = D_0 + 2^7·D_1 [+ 2^14·D_2]``,
   each plane an int8 operand of a tensor-core ``tl.dot`` with int8 ``v``, so ``D·v`` is two (half
   variants) or three (single variants) int8 GEMMs, with no ``[R, K, d]`` shift tensor). They
   restate the rules in ``tl`` code; the tests hold them bit-exact to the references.
3. **Host wrappers** check dtypes/shapes and launch; ``tests/kernels/test_bitlog2.py`` compares
   them with the references under ``TRITON_INTERPRET=1`` on CPU, ``tools/bench_bitlog2.py``
   times them on a GPU.

The 1/δ and v's scale stay outside: ``A·v ≈ (s_v / δ)·(Σ_j D_j·(q_v,j - z_v))``.
"""

from __future__ import annotations

import torch

from fxquant.core.quant.logcodes import (
    bitlog2_codes_from_int,
    bitlog2_input,
    bitlog2_level_table,
    bitlog2_levels,
    bitlog2_shifts,
)
from fxquant.core.quant.spec import BITLOG2_VARIANTS

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton is a dependency on Linux
    HAS_TRITON = False


# ------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------


def bitlog2_codes_ref(x: torch.Tensor, variant: str, *, from_logits: bool = True) -> torch.Tensor:
    """Codes (int32) of ``softmax(x, -1)`` (or of probabilities ``x`` when ``from_logits=False``)."""
    p = torch.softmax(x.float(), dim=-1) if from_logits else x.float()
    return bitlog2_codes_from_int(bitlog2_input(p, variant), variant)


def bitlog2_av_ref(codes: torch.Tensor, v: torch.Tensor, variant: str) -> torch.Tensor:
    """``Σ_j D_j·v_j`` with shifts only: codes ``[..., N, N]``, integer ``v`` ``[..., N, d]`` → int64."""
    if v.is_floating_point():
        raise TypeError("bitlog2_av_ref takes integer v (quantized values minus zero point)")
    k, h = bitlog2_shifts(codes, variant)
    nz = (codes > 0).unsqueeze(-1)
    vv = v.to(torch.int64).unsqueeze(-3)  # [..., 1, N, d]
    k_, h_ = k.to(torch.int64).unsqueeze(-1), h.to(torch.int64).unsqueeze(-1)
    term = (vv << k_) + h_ * (vv << (k_ - 1).clamp(min=0))
    return torch.where(nz, term, torch.zeros_like(term)).sum(dim=-2)


def bitlog2_av_float64_ref(codes: torch.Tensor, v: torch.Tensor, variant: str) -> torch.Tensor:
    """Float64 ``D @ v`` (independent of the shift formulation)."""
    d = bitlog2_levels(codes, variant).double()
    return d @ v.double()


# ------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _msb(n):
        """MSB index of 0 < n < 2^16 by a 4-step shift/compare search (-1 for n = 0)."""
        k = tl.zeros_like(n)
        for step in tl.static_range(4):
            s = 8 >> step
            k += s * ((n >> (k + s)) > 0).to(tl.int32)
        return tl.where(n > 0, k, -1)

    @triton.jit
    def _code(p, M: tl.constexpr, HALF: tl.constexpr):
        n = tl.minimum(tl.maximum(tl.floor(p * M), 0.0), M - 1).to(tl.int32)
        k = _msb(n)
        if HALF:
            below = (n >> tl.maximum(k - 1, 0)) & 1
            c = tl.where(k >= 1, 2 * k + below, 1)
        else:
            c = k + 1
        return tl.where(n > 0, c, 0)

    @triton.jit
    def _softmax_codes_kernel(x_ptr, out_ptr, n_cols, x_row_stride, out_row_stride,
                              M: tl.constexpr, HALF: tl.constexpr, FROM_LOGITS: tl.constexpr,
                              PACK: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        x_row = x_ptr + row * x_row_stride
        cols = tl.arange(0, BLOCK)
        if FROM_LOGITS:
            x = tl.load(x_row + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
            row_max = tl.max(x, axis=0)
            denom = tl.sum(tl.exp(x - row_max), axis=0)
        else:
            row_max = 0.0
            denom = 1.0
        if PACK:
            half_cols = tl.arange(0, BLOCK // 2)
            ev, od = 2 * half_cols, 2 * half_cols + 1
            xe = tl.load(x_row + ev, mask=ev < n_cols, other=-float("inf")).to(tl.float32)
            xo = tl.load(x_row + od, mask=od < n_cols, other=-float("inf")).to(tl.float32)
            if FROM_LOGITS:
                pe = tl.exp(xe - row_max) / denom
                po = tl.exp(xo - row_max) / denom
            else:
                pe = tl.where(ev < n_cols, xe, 0.0)
                po = tl.where(od < n_cols, xo, 0.0)
            ce = tl.where(ev < n_cols, _code(pe, M, HALF), 0)
            co = tl.where(od < n_cols, _code(po, M, HALF), 0)
            byte = (ce | (co << 4)).to(tl.uint8)
            tl.store(out_ptr + row * out_row_stride + half_cols, byte, mask=ev < n_cols)
        else:
            xx = tl.load(x_row + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
            if FROM_LOGITS:
                p = tl.exp(xx - row_max) / denom
            else:
                p = tl.where(cols < n_cols, xx, 0.0)
            c = _code(p, M, HALF)
            tl.store(out_ptr + row * out_row_stride + cols, c.to(tl.int8), mask=cols < n_cols)

    @triton.jit
    def _level(code, HALF: tl.constexpr):
        """The integer level ``D`` of a code (int32): ``2^k + h·2^(k-1)``, 0 for the zero code."""
        if HALF:
            k = tl.where(code >= 2, code >> 1, 0)
            h = tl.where(code >= 2, code & 1, 0)
            d = (1 << k) + h * ((1 << k) >> 1)
        else:
            d = 1 << tl.maximum(code - 1, 0)
        return tl.where(code > 0, d, 0)

    @triton.jit
    def _bitlog2_av_kernel(c_ptr, v_ptr, out_ptr, n_keys, head_dim, v_zp,
                           c_stride_b, c_stride_r, v_stride_b, v_stride_r, o_stride_b, o_stride_r,
                           HALF: tl.constexpr, PACKED: tl.constexpr, PLANES: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """One (batch·head, row block, head-dim block) per program: ``Σ_j D_j·(v_j - z_v)`` as int8
        tensor-core GEMMs. The levels are split into 7-bit digit planes, ``D = Σ_p 2^(7p)·D_p`` with
        ``D_p ∈ [0, 127]`` (int8), so ``D·v = Σ_p 2^(7p)·(D_p·v)``: ``PLANES`` int8 ``tl.dot``s per key
        block (2 for the half variants, whose levels stay below 2^14; 3 for the single ones), and the
        zero point by the row sums of ``D``."""
        bh = tl.program_id(0)
        rb = tl.program_id(1)
        db = tl.program_id(2)
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        dims = db * BLOCK_D + tl.arange(0, BLOCK_D)
        acc0 = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.int32)
        acc1 = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.int32)
        acc2 = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.int32)
        dsum = tl.zeros((BLOCK_R,), dtype=tl.int32)
        for k0 in range(0, n_keys, BLOCK_K):
            keys = k0 + tl.arange(0, BLOCK_K)
            if PACKED:  # pack_int4(signed=False): key 2j in the low nibble of byte j, 2j+1 in the high one
                half = tl.arange(0, BLOCK_K // 2)
                byte = tl.load(c_ptr + bh * c_stride_b + rows[:, None] * c_stride_r + (k0 // 2 + half)[None, :],
                               mask=(rows[:, None] < n_keys) & ((k0 + 2 * half) < n_keys)[None, :], other=0).to(tl.int32)
                code = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_R, BLOCK_K))
                code = tl.where(keys[None, :] < n_keys, code, 0)
            else:
                code = tl.load(c_ptr + bh * c_stride_b + rows[:, None] * c_stride_r + keys[None, :],
                               mask=(rows[:, None] < n_keys) & (keys[None, :] < n_keys), other=0).to(tl.int32)
            d = _level(code, HALF)
            v = tl.load(v_ptr + bh * v_stride_b + keys[:, None] * v_stride_r + dims[None, :],
                        mask=(keys[:, None] < n_keys) & (dims[None, :] < head_dim), other=0)
            acc0 += tl.dot((d & 127).to(tl.int8), v, out_dtype=tl.int32)
            acc1 += tl.dot(((d >> 7) & 127).to(tl.int8), v, out_dtype=tl.int32)
            if PLANES == 3:
                acc2 += tl.dot((d >> 14).to(tl.int8), v, out_dtype=tl.int32)
            dsum += tl.sum(d, axis=1)
        acc = acc0 + (acc1 << 7) + (acc2 << 14) - v_zp * dsum[:, None]
        tl.store(out_ptr + bh * o_stride_b + rows[:, None] * o_stride_r + dims[None, :], acc,
                 mask=(rows[:, None] < n_keys) & (dims[None, :] < head_dim))


def level_planes(variant: str) -> int:
    """How many 7-bit digit planes (int8 GEMMs) hold the variant's largest level."""
    top = int(bitlog2_level_table(variant).max())
    return max(1, -(-top.bit_length() // 7))


def av_int32_fits(n_keys: int, variant: str, v_zp: int = 0) -> bool:
    """Whether the int32 accumulators of ``Σ_j D_j·(v_j - z_v)`` over ``n_keys`` keys (int8 ``v``,
    zero point ``v_zp``) cannot overflow: every partial sum is at most ``N·max D·(128 + |z_v|)``."""
    return n_keys * int(bitlog2_level_table(variant).max()) * (128 + abs(int(v_zp))) < 2**31


def _check_variant(variant: str) -> tuple[int, bool]:
    if variant not in BITLOG2_VARIANTS:
        raise ValueError(f"unknown BitLog2 variant {variant!r}; known: {sorted(BITLOG2_VARIANTS)}")
    return BITLOG2_VARIANTS[variant]


def softmax_bitlog2_codes(x: torch.Tensor, variant: str, *, pack: bool | None = None,
                          from_logits: bool = True) -> torch.Tensor:
    """Triton: codes of ``softmax(x, -1)`` for ``x`` of shape ``[..., N]``.

    Returns int8 codes ``[..., N]``, or (``pack=True``, default for the 16-level variants)
    uint8 ``[..., ceil(N/2)]`` with two codes per byte."""
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    m, half = _check_variant(variant)
    pack = variant.endswith("16") if pack is None else pack
    if pack and not variant.endswith("16"):
        raise ValueError(f"{variant} has 17 levels; only the 16-level variants pack into 4 bits")
    if not x.is_floating_point():
        raise TypeError("softmax_bitlog2_codes takes floating-point scores")
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    rows = x2.shape[0]
    out_cols = (n + 1) // 2 if pack else n
    out = torch.empty(rows, out_cols, dtype=torch.uint8 if pack else torch.int8, device=x.device)
    block = max(2, triton.next_power_of_2(n))
    _softmax_codes_kernel[(rows,)](x2, out, n, x2.stride(0), out.stride(0), M=m, HALF=half,
                                   FROM_LOGITS=from_logits, PACK=pack, BLOCK=block)
    return out.reshape(*x.shape[:-1], out_cols)


def bitlog2_av(codes: torch.Tensor, v: torch.Tensor, variant: str, *, v_zp: int = 0, packed: bool | None = None,
               blocks: tuple[int, int, int] = (16, 32, 32)) -> torch.Tensor:
    """Triton: ``Σ_j D_j·(v_j - z_v)`` in int32 for codes ``[B, N, N]`` (or packed ``[B, N, ceil(N/2)]``)
    and integer ``v`` ``[B, N, d]`` (leading dims are flattened into B), on int8 tensor cores.

    ``v`` is int8 (the signed codes of v's quantizer) with its signed zero point ``v_zp``; any other
    integer tensor whose values span at most 256 consecutive integers is shifted into int8 first
    (``v_zp`` then adds to the shift). ``blocks`` = ``(BLOCK_R, BLOCK_K, BLOCK_D)``, each ≥ 16."""
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    _, half = _check_variant(variant)
    if v.is_floating_point():
        raise TypeError("bitlog2_av takes integer v (signed codes, with v_zp, or values minus zero point)")
    n, d = v.shape[-2], v.shape[-1]
    packed = codes.dtype == torch.uint8 if packed is None else packed
    expect = (n + 1) // 2 if packed else n
    if codes.shape[-1] != expect or codes.shape[-2] != n:
        raise ValueError(f"codes of shape {tuple(codes.shape)} do not fit v of shape {tuple(v.shape)} (packed={packed})")
    if v.dtype != torch.int8:  # e.g. values minus zero point in [-255, 255]: re-centre into int8
        lo, hi = (int(v.min()), int(v.max())) if v.numel() else (0, 0)
        if hi - lo > 255:
            raise ValueError(f"bitlog2_av: v spans [{lo}, {hi}], more than the 256 values of int8 codes")
        shift = lo + 128
        v, v_zp = (v.to(torch.int32) - shift).to(torch.int8), int(v_zp) - shift
    if not av_int32_fits(n, variant, v_zp):
        raise ValueError(f"bitlog2_av: {n} keys × level {int(bitlog2_level_table(variant).max())} × (128 + |{v_zp}|) could "
                         "overflow the int32 accumulator; use bitlog2_av_int (int64) for this shape")
    lead = v.shape[:-2]
    c3 = codes.reshape(-1, n, codes.shape[-1]).contiguous()
    v3 = v.reshape(-1, n, d).contiguous()
    out = torch.empty(v3.shape[0], n, d, dtype=torch.int32, device=v.device)
    block_r, block_k, block_d = blocks
    grid = (v3.shape[0], triton.cdiv(n, block_r), triton.cdiv(d, block_d))
    _bitlog2_av_kernel[grid](c3, v3, out, n, d, int(v_zp), c3.stride(0), c3.stride(1), v3.stride(0), v3.stride(1),
                             out.stride(0), out.stride(1), HALF=half, PACKED=packed, PLANES=level_planes(variant),
                             BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d)
    return out.reshape(*lead, n, d)
