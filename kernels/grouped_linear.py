"""Grouped integer linear layers: activations quantized in channel groups (IGQ-ViT, ``passes/igq.py``).

The input channels of a Linear are split into ``G`` groups, each with its own static quantizer
``(s_g, z_g)``; which group a channel belongs to may differ per input *instance* (per image under
``InstanceGroups``: ``fxquant.core.quant.instance_groups``), or be fixed blocks ``g(c) = c // group_size``
(``PerGroup`` on the channel axis: one instance spanning every row, ``contiguous_group_idx``).
With ``Q`` the signed activation codes, ``W`` the signed weight codes (``fxquant.core.quant.codes``:
``c = q - offset``, zero points move with them, ``z_c = z - offset``) and ``g_i(c)`` the group of
channel ``c`` in the instance ``i`` that row ``n`` belongs to:

    Y[n, o] = Σ_g s_g · s_w[o] · P_g[n, o] + bias[o],
    P_g[n, o] = Σ_{c: g_i(c) = g} (Q[n, c] - z_g)(W[o, c] - z_w[o])
              = acc_g - z_g·Σ_{c∈g} W[o, c] - z_w[o]·Σ_{c∈g} Q[n, c] + |g|·z_g·z_w[o],
    acc_g = Σ_{c∈g} Q[n, c]·W[o, c]   (int8 × int8 → int32, one tensor-core product per group)

The partial sums ``P_g`` are exact integers (int32 holds them for K ≤ 2^15 at 8 bits). The float
epilogue is fixed, so that every implementation gives the same bits: in float32, groups in
increasing ``g`` (empty groups add ``P_g = 0``),

    y = 0;  for g in 0..G-1:  y = y + float(P_g) · (s_g · s_w[o]);   Y = y + bias[o]

(each ``·`` and ``+`` rounded on its own: no fused multiply-add). With ``G = 1`` this is exactly
``int_linear_ref``'s per-tensor epilogue ``float(acc)·(s_a·s_w) + bias``.

Layout of the host API: activation codes ``a`` ``[M, K]`` int8 whose rows come in ``I`` instances
of ``rows_per_instance`` consecutive rows (``M = I·R``; a Linear input ``[B, N, C]`` is ``I = B``,
``R = N``), and a channel→group map ``group_idx`` ``[I, K]``. The Triton kernel works on each
instance's channels *sorted by group*: ``group_segments`` computes, on the host, the permutation
(a stable ``torch.sort`` of each row of ``group_idx``) and the segment offsets of the groups in it.
A program owns a ``BLOCK_M × BLOCK_N`` output tile of one instance; it loops over the groups and,
within a group, over ``BLOCK_K`` blocks of that group's segment, gathering the activation columns
``Q[:, perm[k]]`` and weight columns ``W_g = W[:, perm[k]]`` (int4-packed weights: the byte
``perm[k] // 2`` and its nibble), accumulates ``acc_g`` with ``tl.dot`` and the row sums of ``Q``
and column sums of ``W_g`` alongside (the group's column sums depend on the instance, so they are
summed in the kernel rather than precomputed), applies the correction above in int32 and adds
``float(P_g)·(s_g·s_w)`` to a float32 accumulator. Masks cover ``K``, ``R`` and ``N`` that are not
multiples of the blocks, and segments that are not multiples of ``BLOCK_K``.

The story, as in ``int_linear.py``: ``grouped_linear_ref`` (int64, the spec), ``grouped_linear_float64_ref``
(dequantize, float64 matmul), the kernel ``_grouped_gemm_kernel`` with its host wrapper ``grouped_linear``,
and ``grouped_linear_cpu``, the exact integer path (``torch._int_mm`` per instance and group) that
``kernels.lowered.LoweredGroupedLinear`` runs on CPUs. The kernels are tested under
``TRITON_INTERPRET=1`` against the references (``tests/kernels/test_grouped_linear.py``).
"""

from __future__ import annotations

import torch

from .int_linear import HAS_TRITON, _vec

if HAS_TRITON:
    import triton
    import triton.language as tl


# ------------------------------------------------------------------------------------------
# Group maps
# ------------------------------------------------------------------------------------------


def contiguous_group_idx(k: int, group_size: int, device=None) -> torch.Tensor:
    """The channel→group map of contiguous groups (``PerGroup(group_size)``): ``[1, K]``, ``c // group_size``."""
    if group_size < 1 or k % group_size:
        raise ValueError(f"group size {group_size} does not divide {k} channels")
    return (torch.arange(k, device=device) // group_size).reshape(1, k)


def _check(a: torch.Tensor, group_idx: torch.Tensor, rows_per_instance: int, num_groups: int, k: int) -> int:
    """Validate the grouped-GEMM operands; returns the number of instances."""
    if a.dim() != 2 or group_idx.dim() != 2:
        raise ValueError(f"grouped linear takes a [M, K] and group_idx [instances, K], got {tuple(a.shape)} and "
                         f"{tuple(group_idx.shape)}")
    m = a.shape[0]
    if rows_per_instance < 1 or m % rows_per_instance:
        raise ValueError(f"{m} rows do not split into instances of {rows_per_instance} rows")
    inst = m // rows_per_instance
    if tuple(group_idx.shape) != (inst, k):
        raise ValueError(f"group_idx must have shape [{inst}, {k}] ({m} rows / {rows_per_instance} per instance, "
                         f"K = {k}), got {tuple(group_idx.shape)}")
    if group_idx.dtype.is_floating_point or group_idx.dtype == torch.bool:
        raise ValueError(f"group_idx must hold integer group indices, got {group_idx.dtype}")
    if group_idx.numel() and (int(group_idx.min()) < 0 or int(group_idx.max()) >= num_groups):
        raise ValueError(f"group indices must lie in [0, {num_groups}), got [{int(group_idx.min())}, {int(group_idx.max())}]")
    return inst


def group_segments(group_idx: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per instance, the channels sorted by group and where each group's run starts.

    Returns ``perm`` ``[I, K]`` (int32: a stable ``torch.sort`` of each row of ``group_idx``, so
    channels keep their order inside a group) and ``seg`` ``[I, G + 1]`` (int32): group ``g`` of
    instance ``i`` is ``perm[i, seg[i, g]:seg[i, g + 1]]`` (empty when the two are equal)."""
    gi = group_idx.to(torch.int64)
    perm = torch.sort(gi, dim=1, stable=True).indices
    counts = torch.zeros(gi.shape[0], num_groups, dtype=torch.int64, device=gi.device)
    counts.scatter_add_(1, gi, torch.ones_like(gi))
    seg = torch.cat([torch.zeros_like(counts[:, :1]), counts.cumsum(1)], dim=1)
    return perm.to(torch.int32).contiguous(), seg.to(torch.int32).contiguous()


def _operands(a, group_idx, rows_per_instance: int, g_scale, g_zp, w_scale, w_zp, n: int, int_dtype: torch.dtype):
    """Checked operands of the integer paths: ``(instances, s_g, z_g, s_w, z_w)``, scales float32
    and zero points ``int_dtype``, the weight ones expanded to ``n`` rows."""
    s_g = torch.as_tensor(g_scale, dtype=torch.float32).reshape(-1)
    z_g = torch.as_tensor(g_zp).reshape(-1).to(int_dtype)
    inst = _check(a, group_idx, rows_per_instance, s_g.numel(), a.shape[1])
    return inst, s_g, z_g, _vec(w_scale, n, torch.float32), _vec(w_zp, n, int_dtype)


# ------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------


def grouped_linear_ref(a: torch.Tensor, group_idx: torch.Tensor, rows_per_instance: int, g_scale, g_zp,
                       w: torch.Tensor, w_scale, w_zp, bias=None) -> torch.Tensor:
    """Exact reference: per instance and group the int64 ``P_g = Σ_{c∈g} (a - z_g)(w - z_w)``, then the
    module docstring's float32 epilogue (groups in increasing order, ``+ bias`` last).
    ``a``: int8 ``[M, K]``; ``group_idx``: ``[M / rows_per_instance, K]``; ``g_scale``/``g_zp``: ``[G]``
    (signed-code zero points); ``w``: int8 ``[N, K]``; ``w_scale``/``w_zp``: scalar or per row."""
    m, n = a.shape[0], w.shape[0]
    inst, s_g, z_g, s_w, z_w = _operands(a, group_idx, rows_per_instance, g_scale, g_zp, w_scale, w_zp, n, torch.int64)
    wz = w.to(torch.int64) - z_w[:, None]
    out = torch.empty(m, n, dtype=torch.float32)
    for i in range(inst):
        rows = slice(i * rows_per_instance, (i + 1) * rows_per_instance)
        y = torch.zeros(rows_per_instance, n, dtype=torch.float32)
        for g in range(s_g.numel()):
            sel = group_idx[i] == g
            p = (a[rows][:, sel].to(torch.int64) - z_g[g]) @ wz[:, sel].T
            y = y + p.to(torch.float32) * (s_g[g] * s_w)[None, :]
        out[rows] = y
    return out if bias is None else out + bias.float()[None, :]


def grouped_linear_float64_ref(a: torch.Tensor, group_idx: torch.Tensor, rows_per_instance: int, g_scale, g_zp,
                               w: torch.Tensor, w_scale, w_zp, bias=None) -> torch.Tensor:
    """Float64 reference: dequantize every activation code with its (instance, channel) group's
    ``(s_g, z_g)`` and the weights per row, matmul."""
    m, k = a.shape
    n = w.shape[0]
    s_g = torch.as_tensor(g_scale, dtype=torch.float64).reshape(-1)
    z_g = torch.as_tensor(g_zp, dtype=torch.float64).reshape(-1)
    _check(a, group_idx, rows_per_instance, s_g.numel(), k)
    gi = group_idx.long().repeat_interleave(rows_per_instance, dim=0)  # [M, K]
    da = (a.double() - z_g[gi]) * s_g[gi]
    dw = (w.double() - _vec(w_zp, n, torch.float64)[:, None]) * _vec(w_scale, n, torch.float64)[:, None]
    out = da @ dw.T
    return out if bias is None else out + bias.double()[None, :]


def grouped_linear_cpu(a: torch.Tensor, group_idx: torch.Tensor, rows_per_instance: int, g_scale, g_zp,
                       w: torch.Tensor, w_scale, w_zp, bias=None) -> torch.Tensor:
    """Exact integer path for CPUs (no Triton): per instance, channels sorted by group
    (``group_segments``), one ``torch._int_mm`` (int8 × int8 → int32) per non-empty group on the
    gathered columns, the int32 zero-point correction, and the module docstring's float32 epilogue.
    Same arguments as ``grouped_linear_ref`` (unpacked int8 weights); equal to it bit for bit."""
    m, n = a.shape[0], w.shape[0]
    inst, s_g, z_g, s_w, z_w = _operands(a, group_idx, rows_per_instance, g_scale, g_zp, w_scale, w_zp, n, torch.int32)
    sgw = s_g[:, None] * s_w[None, :]  # [G, N]: s_g·s_w, rounded once as in the reference
    perm, seg = group_segments(group_idx.cpu(), s_g.numel())
    perm, seg = perm.long(), seg.tolist()
    has_wzp = bool(z_w.any())
    out = torch.empty(m, n, dtype=torch.float32)
    for i in range(inst):
        a_i = a[i * rows_per_instance:(i + 1) * rows_per_instance][:, perm[i]]
        w_i = w[:, perm[i]]
        y = torch.zeros(rows_per_instance, n, dtype=torch.float32)
        for g in range(s_g.numel()):
            lo, hi = seg[i][g], seg[i][g + 1]
            if hi == lo:
                continue  # P_g = 0: adding 0 leaves y as it is
            ag, wg = a_i[:, lo:hi].contiguous(), w_i[:, lo:hi]
            acc = torch._int_mm(ag, wg.T.contiguous())
            acc = acc - z_g[g] * wg.to(torch.int32).sum(1)[None, :] + (hi - lo) * z_g[g] * z_w[None, :]
            if has_wzp:
                acc = acc - z_w[None, :] * ag.to(torch.int32).sum(1)[:, None]
            y = y + acc.to(torch.float32) * sgw[g][None, :]
        out[i * rows_per_instance:(i + 1) * rows_per_instance] = y
    return out if bias is None else out + bias.float()[None, :]


# ------------------------------------------------------------------------------------------
# Triton kernel
# ------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _grouped_gemm_kernel(a_ptr, w_ptr, c_ptr, perm_ptr, seg_ptr, g_scale_ptr, g_zp_ptr, w_scale_ptr, w_zp_ptr, bias_ptr,
                             R, N, K, G, stride_am, stride_wn, stride_cm,
                             W_PACKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_W_ZP: tl.constexpr, OUT_FP16: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One ``BLOCK_M × BLOCK_N`` tile of one instance (grid: row blocks of the instance, column
        blocks, instances). For each group: gathered int8 tiles of the group's channel segment meet in
        ``tl.dot`` (int32), the row sums of A and column sums of W_g ride along, the int32 zero-point
        correction gives ``P_g`` and ``float(P_g)·(s_g·s_w)`` is added to the float32 tile."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        inst = tl.program_id(2)
        rr = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row inside the instance
        rm = inst * R + rr
        mmask = rr < R
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rk = tl.arange(0, BLOCK_K)
        s_w = tl.load(w_scale_ptr + rn, mask=nmask, other=0.0)
        z_w = tl.load(w_zp_ptr + rn, mask=nmask, other=0)
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, G):
            start = tl.load(seg_ptr + inst * (G + 1) + g)
            end = tl.load(seg_ptr + inst * (G + 1) + g + 1)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            arow = tl.zeros((BLOCK_M,), dtype=tl.int32)
            wcol = tl.zeros((BLOCK_N,), dtype=tl.int32)
            for k0 in range(start, end, BLOCK_K):
                kk = k0 + rk
                kmask = kk < end
                ch = tl.load(perm_ptr + inst * K + kk, mask=kmask, other=0)
                a = tl.load(a_ptr + rm[:, None] * stride_am + ch[None, :], mask=mmask[:, None] & kmask[None, :], other=0)
                wmask = kmask[:, None] & nmask[None, :]
                if W_PACKED:
                    pw = tl.load(w_ptr + rn[None, :] * stride_wn + (ch // 2)[:, None], mask=wmask, other=0).to(tl.int32)
                    nib = (pw >> ((ch & 1) * 4)[:, None]) & 0xF
                    w = tl.where(nib >= 8, nib - 16, nib).to(tl.int8)
                else:
                    w = tl.load(w_ptr + rn[None, :] * stride_wn + ch[:, None], mask=wmask, other=0)
                acc += tl.dot(a, w, out_dtype=tl.int32)
                wcol += tl.sum(w.to(tl.int32), axis=0)
                if HAS_W_ZP:
                    arow += tl.sum(a.to(tl.int32), axis=1)
            z_g = tl.load(g_zp_ptr + g)
            s_g = tl.load(g_scale_ptr + g)
            acc = acc - z_g * wcol[None, :] + (end - start) * z_g * z_w[None, :]
            if HAS_W_ZP:
                acc = acc - z_w[None, :] * arow[:, None]
            out = out + acc.to(tl.float32) * (s_g * s_w)[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + rn, mask=nmask, other=0.0)[None, :]
        cmask = mmask[:, None] & nmask[None, :]
        if OUT_FP16:
            tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], out.to(tl.float16), mask=cmask)
        else:
            tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], out, mask=cmask)

    def get_cuda_autotune_config() -> list:
        """Tile candidates. Group segments are short (K/G channels, e.g. 48 to 192), so BLOCK_K is
        32 or 64 (int8 tensor cores need >= 32) to waste little on each segment's masked tail."""
        out = []
        for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 4),
                                 (128, 128, 32, 8, 3), (64, 64, 32, 4, 4), (32, 64, 32, 4, 4)]:
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s))
        return out

    _grouped_gemm_tuned = triton.autotune(configs=get_cuda_autotune_config(), key=["R", "N", "K", "G", "W_PACKED"])(
        _grouped_gemm_kernel)


def grouped_linear(a: torch.Tensor, group_idx: torch.Tensor, rows_per_instance: int, g_scale: torch.Tensor,
                   g_zp: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor,
                   bias: torch.Tensor | None = None, *, k: int | None = None, w_packed: bool = False,
                   out_dtype: torch.dtype = torch.float32, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Triton: ``Y = Σ_g s_g·s_w·Σ_{c∈g}(a - z_g)(w - z_w) + bias`` with per-instance channel groups.

    ``a``: int8 codes ``[M, K]``, ``M = instances · rows_per_instance``; ``group_idx``: ``[instances, K]``
    group of every channel in every instance (contiguous groups: ``contiguous_group_idx`` with
    ``rows_per_instance = M``); ``g_scale``/``g_zp``: ``[G]`` (signed-code zero points); ``w``: int8
    ``[N, K]`` or int4 packed ``[N, K/2]`` (``w_packed``); ``w_scale``/``w_zp``: per output channel.
    ``blocks`` fixes ``(BLOCK_M, BLOCK_N, BLOCK_K)``; by default CUDA autotunes and the interpreter
    uses (16, 16, 32). Equal to ``grouped_linear_ref`` bit for bit (same integers, same epilogue)."""
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    m = a.shape[0]
    n = w.shape[0]
    k = k if k is not None else a.shape[1]
    if a.shape[1] != k or (w.shape[1] != (k + 1) // 2 if w_packed else w.shape[1] != k):
        raise ValueError(f"inner dimensions differ: a {tuple(a.shape)}, w {tuple(w.shape)} (packed={w_packed}), K={k}")
    if a.dtype != torch.int8:
        raise ValueError(f"grouped_linear takes int8 activation codes, got {a.dtype}")
    dev = a.device
    g_scale = g_scale.reshape(-1).float().to(dev).contiguous()
    g_zp = g_zp.reshape(-1).to(torch.int32).to(dev).contiguous()
    num_groups = g_scale.numel()
    if g_zp.numel() != num_groups:
        raise ValueError(f"{num_groups} group scales but {g_zp.numel()} group zero points")
    inst = _check(a, group_idx, rows_per_instance, num_groups, k)
    perm, seg = group_segments(group_idx.to(dev), num_groups)
    w_scale = w_scale.reshape(-1).float().to(dev).expand(n).contiguous()
    w_zp = w_zp.reshape(-1).to(torch.int32).to(dev).expand(n).contiguous()
    c = torch.empty(m, n, dtype=out_dtype, device=dev)
    a, w = a.contiguous(), w.contiguous()
    bias_t = bias.float().to(dev).contiguous() if bias is not None else c
    r = rows_per_instance
    args = (a, w, c, perm, seg, g_scale, g_zp, w_scale, w_zp, bias_t, r, n, k, num_groups, a.stride(0), w.stride(0), c.stride(0))
    flags = dict(W_PACKED=w_packed, HAS_BIAS=bias is not None, HAS_W_ZP=bool(w_zp.any()), OUT_FP16=out_dtype == torch.float16)
    if m == 0 or n == 0:
        return c
    # enable_fp_fusion=False: the epilogue's multiply-then-add must round like the reference's
    if blocks is None and dev.type == "cuda":
        grid = lambda meta: (triton.cdiv(r, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), inst)  # noqa: E731
        _grouped_gemm_tuned[grid](*args, **flags, enable_fp_fusion=False)
    else:
        bm, bn, bk = blocks or (16, 16, 32)
        grid = (triton.cdiv(r, bm), triton.cdiv(n, bn), inst)
        _grouped_gemm_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, enable_fp_fusion=False)
    return c


__all__ = ["grouped_linear", "grouped_linear_cpu", "grouped_linear_ref", "grouped_linear_float64_ref", "group_segments",
           "contiguous_group_idx"]
