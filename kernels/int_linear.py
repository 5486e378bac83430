"""Integer linear layers: activation quantization and W8A8 / W4A8 / W4A4 GEMMs with fused epilogue.

Integer representation (``fxquant.core.quant.codes``, shared by references, kernels, the lowering pass
and the ONNX exporter): a uniform quantizer's codes ``q`` (``quant.dispatch.quantize``) are stored
*signed*, ``c = q - offset`` with ``offset = 2^(b-1)`` for asymmetric specs (0 for symmetric)
(``code_offset`` / ``to_signed_codes``), so 8-bit codes fit int8 and 4-bit codes fit a signed nibble,
packed two per byte by ``pack_int4(signed=True)`` (k and k+1 in the low and high nibble of one
byte); the zero point moves with them (``z_c = z - offset``). The Triton kernels apply the same
rules in ``tl`` code (``_rint``, the nibble shifts), checked bit for bit against ``to_signed_codes``
/ ``pack_int4`` by the tests. A packed tile ``[R, BK/2]`` is one load; its nibbles are sign-extended
and joined back to the ``[R, BK]`` int8 tile in registers, so W4A8 and W4A4 run the same single
int8 ``tl.dot`` per K step as W8A8 (there is no int4 MMA on Hopper), with half the weight bytes. Then

    y[m, n] = s_a · s_w[n] · Σ_k (a[m,k] - z_a)(w[n,k] - z_w[n]) + bias[n]
            = s_a · s_w[n] · (acc - z_a·Σ_k w[n,k] - z_w[n]·Σ_k a[m,k] + K·z_a·z_w[n]) + bias[n],
    acc = Σ_k a[m,k]·w[n,k]   (int8 × int8 → int32, the tensor-core product)

The correction terms use a row sum of ``a`` (computed in the kernel) and a column sum of ``w``
(precomputed at lowering). int32 holds every term for K ≤ 2^15 at 8 bits.

The story, as in the Triton tutorials: ``int_linear_ref`` (int64, the spec), ``int_linear_float64_ref``
(dequantize, float64 matmul), the kernels ``_act_quant_kernel`` and ``_int_gemm_kernel`` with host
wrappers ``quantize_act`` and ``int_linear``, and ``tools/bench_kernels.py`` timing them on a GPU.
On CPU (no GPU, or in CI) the lowering pass runs the exact integer path ``int_linear_cpu``
(``torch._int_mm``); the Triton kernels are tested there under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch

from fxquant.core.quant import QuantSpec, choose_qparams, code_offset, unpack_int4

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False


# ------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------


def per_token_qparams(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token (per-row) scale of a ``[M, K]`` activation."""
    amax = x.abs().amax(dim=-1)
    scale, zp = choose_qparams(-amax, amax, QuantSpec(bits=bits, symmetric=True))
    return scale, zp


def _vec(v, n: int, dtype) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=dtype)
    return t.reshape(-1).expand(n) if t.numel() == 1 else t.reshape(-1)


def int_linear_ref(a: torch.Tensor, a_scale, a_zp, w: torch.Tensor, w_scale, w_zp, bias=None) -> torch.Tensor:
    """Exact reference: int64 ``Σ (a - z_a)(w - z_w)`` then ``× s_a·s_w + bias`` in float32.
    ``a``: int8 ``[M, K]``; ``w``: int8 ``[N, K]``; scales/zero points scalar or per row/column."""
    m, n = a.shape[0], w.shape[0]
    za = _vec(a_zp, m, torch.int64)[:, None]
    zw = _vec(w_zp, n, torch.int64)[None, :]
    acc = (a.to(torch.int64) @ w.to(torch.int64).T) - za * w.to(torch.int64).sum(1)[None, :] \
        - zw * a.to(torch.int64).sum(1)[:, None] + a.shape[1] * za * zw
    scale = _vec(a_scale, m, torch.float32)[:, None] * _vec(w_scale, n, torch.float32)[None, :]
    out = acc.to(torch.float32) * scale
    return out if bias is None else out + bias.float()[None, :]


def int_linear_float64_ref(a, a_scale, a_zp, w, w_scale, w_zp, bias=None) -> torch.Tensor:
    """Float64 reference: dequantize both operands, matmul."""
    m, n = a.shape[0], w.shape[0]
    da = (a.double() - _vec(a_zp, m, torch.float64)[:, None]) * _vec(a_scale, m, torch.float64)[:, None]
    dw = (w.double() - _vec(w_zp, n, torch.float64)[:, None]) * _vec(w_scale, n, torch.float64)[:, None]
    out = da @ dw.T
    return out if bias is None else out + bias.double()[None, :]


def int_linear_cpu(a: torch.Tensor, a_scale, a_zp, w: torch.Tensor, w_scale, w_zp, bias=None,
                   w_colsum: torch.Tensor | None = None) -> torch.Tensor:
    """Exact integer path for CPUs: ``torch._int_mm`` (int8 × int8 → int32, oneDNN's VNNI GEMM) +
    the epilogue, in place. The zero-point terms are ``[M, 1]``/``[1, N]`` vectors (no ``[M, N]``
    products), the weight-zero-point term is skipped when every ``z_w`` is 0 (symmetric weights),
    and the scale is the same ``s_a·s_w`` product as ``int_linear_ref``'s, so the result equals it."""
    m, n, k = a.shape[0], w.shape[0], a.shape[1]
    acc = torch._int_mm(a.contiguous(), w.T.contiguous())
    za = _vec(a_zp, m, torch.int32)[:, None]
    zw = _vec(w_zp, n, torch.int32)[None, :]
    colsum = (w.to(torch.int32).sum(1) if w_colsum is None else w_colsum.to(torch.int32))[None, :]
    if torch.as_tensor(a_zp).numel() == 1:  # per-tensor activation zero point: one [1, N] correction
        acc.sub_(za[:1] * colsum - k * za[:1] * zw)
    else:
        acc.sub_(za * colsum).add_(k * za * zw)
    if bool(zw.any()):  # asymmetric weights: the [M, N] rank-1 term, in one pass
        acc.addr_(a.to(torch.int32).sum(1), zw[0], alpha=-1)
    sa = _vec(a_scale, m, torch.float32)
    sw = _vec(w_scale, n, torch.float32)[None, :]
    scale = sa[:1, None] * sw if torch.as_tensor(a_scale).numel() == 1 else sa[:, None] * sw
    out = acc.to(torch.float32).mul_(scale)
    return out if bias is None else out.add_(bias.float()[None, :])


# ------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _rint(x):
        """Round half to even (fxquant's rule; ``torch.round``)."""
        f = tl.floor(x)
        d = x - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))

    @triton.jit
    def _act_quant_kernel(x_ptr, out_ptr, scale_ptr, zp_ptr, n_cols, x_stride, out_stride,
                          QMIN: tl.constexpr, QMAX: tl.constexpr, OFFSET: tl.constexpr, PER_TOKEN: tl.constexpr,
                          PACK4: tl.constexpr, BLOCK: tl.constexpr):
        """One row per program: (per token: absmax scale) → codes → signed int8 or packed int4."""
        row = tl.program_id(0)
        if PER_TOKEN:
            cols = tl.arange(0, BLOCK)
            xr = tl.load(x_ptr + row * x_stride + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            amax = tl.max(tl.abs(xr), axis=0)
            scale = tl.maximum(amax / QMAX, 1.1754943508222875e-38)
            tl.store(scale_ptr + row, scale)
            zp = 0.0
        else:
            scale = tl.load(scale_ptr)
            zp = tl.load(zp_ptr)
        if PACK4:
            half = tl.arange(0, BLOCK // 2)
            ev, od = 2 * half, 2 * half + 1
            xe = tl.load(x_ptr + row * x_stride + ev, mask=ev < n_cols, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + row * x_stride + od, mask=od < n_cols, other=0.0).to(tl.float32)
            qe = tl.minimum(tl.maximum(_rint(tl.math.div_rn(xe, scale)) + zp, QMIN), QMAX) - OFFSET
            qo = tl.minimum(tl.maximum(_rint(tl.math.div_rn(xo, scale)) + zp, QMIN), QMAX) - OFFSET
            byte = (qe.to(tl.int32) & 0xF) | ((qo.to(tl.int32) & 0xF) << 4)
            tl.store(out_ptr + row * out_stride + half, byte.to(tl.uint8), mask=ev < n_cols)
        else:
            cols = tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * x_stride + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, scale)) + zp, QMIN), QMAX) - OFFSET
            tl.store(out_ptr + row * out_stride + cols, q.to(tl.int8), mask=cols < n_cols)

    @triton.jit
    def _unpack_int4_rows(p, ROWS: tl.constexpr, COLS: tl.constexpr):
        """A ``[ROWS, COLS // 2]`` tile of ``pack_int4(signed=True)`` bytes → the ``[ROWS, COLS]`` int8
        codes in their natural order, in registers: each nibble sign-extended (``(n ^ 8) - 8``), joined
        as (even, odd) and flattened, so that one ``tl.dot`` takes them."""
        p = p.to(tl.int32)
        lo = (((p & 0xF) ^ 8) - 8).to(tl.int8)
        hi = ((((p >> 4) & 0xF) ^ 8) - 8).to(tl.int8)
        return tl.reshape(tl.join(lo, hi), (ROWS, COLS))

    @triton.jit
    def _int_gemm_kernel(a_ptr, w_ptr, c_ptr, a_scale_ptr, a_zp_ptr, w_scale_ptr, w_zp_ptr, w_colsum_ptr, bias_ptr,
                         M, N, K, stride_am, stride_wn, stride_cm,
                         A_PACKED: tl.constexpr, W_PACKED: tl.constexpr, A_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_W_ZP: tl.constexpr, OUT_FP16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """C = epilogue(A·Wᵀ): int8/int4 operands, int32 accumulation, fused zero-point correction,
        scales, bias and output cast. Every operand tile is one load; packed int4 tiles (two codes
        per byte, ``pack_int4``'s interleaved layout) are unpacked to int8 in registers
        (``_unpack_int4_rows``), so int8 and int4 operands alike meet in a single int8 ``tl.dot`` per
        K step (Hopper has no int4 MMA; there are no split dots). Row sums of A (for the weight zero
        points) only when there are any."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
        pid_n = (pid % (GROUP_M * num_n)) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        arow = tl.zeros((BLOCK_M,), dtype=tl.int32)
        rk = tl.arange(0, BLOCK_K)
        half = tl.arange(0, BLOCK_K // 2)
        for k0 in range(0, K, BLOCK_K):
            if A_PACKED:  # K is even, so byte j of the tile is in range iff its even code is
                pa = tl.load(a_ptr + rm[:, None] * stride_am + (k0 // 2 + half)[None, :],
                             mask=(rm[:, None] < M) & ((k0 + 2 * half) < K)[None, :], other=0)
                a = _unpack_int4_rows(pa, BLOCK_M, BLOCK_K)
            else:
                kk = k0 + rk
                a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
            if W_PACKED:
                pw = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 // 2 + half)[None, :],
                             mask=(rn[:, None] < N) & ((k0 + 2 * half) < K)[None, :], other=0)
                w = tl.trans(_unpack_int4_rows(pw, BLOCK_N, BLOCK_K))
            else:
                kk = k0 + rk
                w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
            acc += tl.dot(a, w, out_dtype=tl.int32)
            if HAS_W_ZP:
                arow += tl.sum(a.to(tl.int32), axis=1)
        if A_PER_ROW:
            s_a = tl.load(a_scale_ptr + rm, mask=rm < M, other=0.0)
            z_a = tl.load(a_zp_ptr + rm, mask=rm < M, other=0).to(tl.int32)
        else:
            s_a = tl.load(a_scale_ptr + rm * 0)
            z_a = tl.load(a_zp_ptr + rm * 0).to(tl.int32)
        s_w = tl.load(w_scale_ptr + rn, mask=rn < N, other=0.0)
        z_w = tl.load(w_zp_ptr + rn, mask=rn < N, other=0).to(tl.int32)
        colsum = tl.load(w_colsum_ptr + rn, mask=rn < N, other=0)
        acc = acc - z_a[:, None] * colsum[None, :] - z_w[None, :] * arow[:, None] + K * z_a[:, None] * z_w[None, :]
        out = acc.to(tl.float32) * (s_a[:, None] * s_w[None, :])
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
        cmask = (rm[:, None] < M) & (rn[None, :] < N)
        if OUT_FP16:
            tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], out.to(tl.float16), mask=cmask)
        else:
            tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], out, mask=cmask)

    def get_cuda_autotune_config() -> list:
        """Tile candidates for Hopper/Ampere-class GPUs on ViT shapes (M = batch·tokens from ~200 to
        ~13k, N/K in 384…3072). int8 tensor cores want BLOCK_K >= 64; deeper pipelines (4–5 stages)
        for the K = 3072 GEMMs, narrow M tiles for the memory-bound small-batch GEMMs."""
        out = []
        for bm, bn, bk, w, s in [(128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 4),
                                 (128, 128, 64, 4, 4), (128, 256, 64, 8, 4), (64, 256, 128, 4, 4), (128, 64, 128, 4, 4),
                                 (64, 128, 128, 4, 4), (64, 128, 256, 4, 3), (64, 64, 128, 4, 5), (32, 64, 128, 4, 5),
                                 (32, 128, 256, 4, 4), (16, 64, 256, 4, 4), (16, 128, 128, 4, 5)]:
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s))
        return out

    def known_good_gemm_config(m: int, n: int, k: int) -> triton.Config:
        """One config per shape class, for ``FXQUANT_AUTOTUNE=0`` (GPU tests compile one kernel per
        shape instead of every candidate): small M is memory-bound (narrow M tile, wide K), large M
        compute-bound (the Triton matmul tutorial's 128×256 int8 tile)."""
        if m <= 32:
            bm, bn, bk, w, s = 16, 64, 256, 4, 4
        elif m <= 256:
            bm, bn, bk, w, s = 64, 128, 128, 4, 4
        elif m <= 2048:
            bm, bn, bk, w, s = 128, 128, 128, 8, 4
        else:
            bm, bn, bk, w, s = 128, 256, 128, 8, 3
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": min(bn, max(16, triton.next_power_of_2(n))),
                              "BLOCK_K": min(bk, max(32, triton.next_power_of_2(k))), "GROUP_M": 8}, num_warps=w, num_stages=s)

    _int_gemm_tuned = triton.autotune(configs=get_cuda_autotune_config(), key=["M", "N", "K", "A_PACKED", "W_PACKED"])(
        _int_gemm_kernel)


def autotune_enabled() -> bool:
    """False when ``FXQUANT_AUTOTUNE=0``: every kernel launches one known-good config per shape class
    instead of autotuning over its candidates (read at each call, so tests may set it)."""
    return os.environ.get("FXQUANT_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def quantize_act(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None,
                 *, per_token: bool = False, pack: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton: signed codes of a ``[M, K]`` activation (int8, or int4 packed two per byte) in one
    pass; per-tensor with the given ``(scale, zero_point)`` or dynamic symmetric per-token.
    Returns ``(codes, scale, signed zero point)``."""
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    if x.dim() != 2:
        raise ValueError(f"quantize_act takes [M, K] activations, got shape {tuple(x.shape)}")
    if per_token and not spec.symmetric:
        raise ValueError("per-token activation quantization is symmetric")
    if pack and spec.bits > 4:
        raise ValueError(f"packing two codes per byte needs bits <= 4, got {spec.bits}")
    m, k = x.shape
    x = x.contiguous()
    off = code_offset(spec)
    out = torch.empty(m, (k + 1) // 2 if pack else k, dtype=torch.uint8 if pack else torch.int8, device=x.device)
    if per_token:
        scale_t = torch.empty(m, dtype=torch.float32, device=x.device)
        zp_t = torch.zeros(m, dtype=torch.float32, device=x.device)
    else:
        if scale is None or zero_point is None or scale.numel() != 1:
            raise ValueError("per-tensor quantize_act needs scalar scale and zero_point")
        scale_t = scale.reshape(1).float().to(x.device).contiguous()
        zp_t = zero_point.reshape(1).float().to(x.device).contiguous()
    block = max(2, triton.next_power_of_2(k))
    _act_quant_kernel[(m,)](x, out, scale_t, zp_t, k, x.stride(0), out.stride(0), QMIN=float(spec.qmin), QMAX=float(spec.qmax),
                            OFFSET=float(off), PER_TOKEN=per_token, PACK4=pack, BLOCK=block)
    return out, scale_t, (zp_t - off).to(torch.int32)


def int_linear(a: torch.Tensor, a_scale: torch.Tensor, a_zp: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
               w_zp: torch.Tensor, bias: torch.Tensor | None = None, *, k: int | None = None, a_packed: bool = False,
               w_packed: bool = False, w_colsum: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
               blocks: tuple[int, int, int] | None = None, has_w_zp: bool | None = None) -> torch.Tensor:
    """Triton: ``y = s_a·s_w·Σ(a - z_a)(w - z_w) + bias`` with int8 or packed-int4 operands.

    ``a``: ``[M, K]`` int8 or ``[M, K/2]`` uint8 packed; ``w``: ``[N, K]`` int8 or ``[N, K/2]`` packed;
    ``a_scale``/``a_zp``: one value or per row; ``w_scale``/``w_zp``: per output channel.
    ``blocks`` fixes ``(BLOCK_M, BLOCK_N, BLOCK_K)``; by default CUDA autotunes and the interpreter
    uses (16, 16, 32). ``has_w_zp``: whether any weight zero point is non-zero, when the caller knows
    (else read from ``w_zp``, a host sync on CUDA)."""
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    m = a.shape[0]
    n = w.shape[0]
    k = k if k is not None else (a.shape[1] * 2 if a_packed else a.shape[1])
    if (w.shape[1] * 2 if w_packed else w.shape[1]) != k or (a.shape[1] * 2 if a_packed else a.shape[1]) != k:
        raise ValueError(f"inner dimensions differ: a {tuple(a.shape)} (packed={a_packed}), "
                         f"w {tuple(w.shape)} (packed={w_packed})")
    if (a_packed or w_packed) and k % 2:
        raise ValueError("packed int4 operands need an even K")
    dev = a.device
    a_scale = a_scale.reshape(-1).float().to(dev).contiguous()
    a_zp = a_zp.reshape(-1).to(torch.int32).to(dev).contiguous()
    per_row = a_scale.numel() > 1
    w_scale = w_scale.reshape(-1).float().to(dev).expand(n).contiguous()
    w_zp = w_zp.reshape(-1).to(torch.int32).to(dev).expand(n).contiguous()
    if w_colsum is None:
        w_colsum = (unpack_int4(w, signed=True) if w_packed else w).to(torch.int32).sum(1)
    w_colsum = w_colsum.to(torch.int32).to(dev).contiguous()
    c = torch.empty(m, n, dtype=out_dtype, device=dev)
    a, w = a.contiguous(), w.contiguous()
    bias_t = bias.float().contiguous() if bias is not None else c
    args = (a, w, c, a_scale, a_zp, w_scale, w_zp, w_colsum, bias_t, m, n, k, a.stride(0), w.stride(0), c.stride(0))
    flags = dict(A_PACKED=a_packed, W_PACKED=w_packed, A_PER_ROW=per_row, HAS_BIAS=bias is not None,
                 HAS_W_ZP=bool(w_zp.any()) if has_w_zp is None else has_w_zp, OUT_FP16=out_dtype == torch.float16)
    # enable_fp_fusion=False: the epilogue's multiply-then-add must round like the reference's
    # (a fused multiply-add rounds once and differs from it in the last bit)
    if blocks is None and dev.type == "cuda" and autotune_enabled():
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _int_gemm_tuned[grid](*args, **flags, enable_fp_fusion=False)
    elif blocks is None and dev.type == "cuda":
        cfg = known_good_gemm_config(m, n, k)
        grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]) * triton.cdiv(n, cfg.kwargs["BLOCK_N"]),)
        _int_gemm_kernel[grid](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                               enable_fp_fusion=False)
    else:
        bm, bn, bk = blocks or (16, 16, 32)
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _int_gemm_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4, enable_fp_fusion=False)
    return c
