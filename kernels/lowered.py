"""Runtime modules of lowered graphs: ``LoweredLinear``, ``LoweredPatchConv``, ``LoweredGroupedLinear`` and
``LoweredMatmul``.

``fxquant.passes.lower.LowerToKernels`` creates them from fake-quantized layers; they are defined
here, beside the kernels they dispatch to. On CUDA with Triton they run the Triton kernels of
``int_linear`` / ``grouped_linear`` / ``int_attention`` / ``bitlog2``; elsewhere (CPU, CI) the exact integer CPU paths.
Both give the same integers, so a lowered graph computes the same function on either device up to
the float epilogue.
"""

from __future__ import annotations

import torch
from torch import nn

from fxquant.core.errors import ConfigError
from fxquant.core.quant import (
    FakeQuantize,
    InstanceGroups,
    PerGroup,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    cached_by_version,
    code_offset,
    dynamic_qparams,
    expand_params,
    instance_groups,
    pack_int4,
    to_signed_codes,
    unpack_int4,
)
from fxquant.core.quant.logcodes import bitlog2_input

from .bitlog2 import av_int32_fits, bitlog2_av
from .fused_attention import fused_attention
from .grouped_linear import contiguous_group_idx, grouped_linear, grouped_linear_cpu
from .int_attention import (
    bitlog2_av_from_input,
    bitlog2_av_int,
    int_bmm,
    int_bmm_cpu,
    log_av_from_ratio,
    log_codes_of,
)
from .int_linear import HAS_TRITON, int_linear, int_linear_cpu, quantize_act


class LoweredLinear(nn.Module):
    """An integer Linear: ``y = s_a·s_w·Σ(a - z_a)(w - z_w) + bias`` (see ``kernels/int_linear.py``).

    With a dynamic input spec (``Dynamic("token")`` or ``Dynamic("tensor")``, no channel groups) the
    activation parameters are computed from each input by the quantizer core
    (``dynamic_qparams``, the fake quantizer's rule) and passed per row, ``s_a[m]``, ``z_a[m]``: the
    same integer GEMM, with the zero-point correction ``z_a[m]·Σ_k w[n,k]`` per token and the scale
    ``s_a[m]·s_w[n]`` per token and output channel (``int_linear_cpu``, or the Triton GEMM's per-row
    epilogue); ``a_scale``/``a_zp`` then stay unused."""

    def __init__(self, in_features: int, out_features: int, act_spec: QuantSpec, weight_spec: QuantSpec, has_bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_spec, self.weight_spec = act_spec, weight_spec
        self.w_packed = weight_spec.bits <= 4 and in_features % 2 == 0
        k_store = in_features // 2 if self.w_packed else in_features
        self.register_buffer("w_codes", torch.zeros(out_features, k_store, dtype=torch.uint8 if self.w_packed else torch.int8))
        self.register_buffer("w_scale", torch.zeros(out_features))
        self.register_buffer("w_zp", torch.zeros(out_features, dtype=torch.int32))
        self.register_buffer("w_colsum", torch.zeros(out_features, dtype=torch.int32))
        self.register_buffer("a_scale", torch.zeros(()))
        self.register_buffer("a_zp", torch.zeros(()))
        self.register_buffer("bias", torch.zeros(out_features) if has_bias else None)

    @classmethod
    def from_quantized(cls, linear: QuantLinear, act: FakeQuantize) -> "LoweredLinear":
        new = cls(linear.in_features, linear.out_features, act.spec, linear.weight_fake_quant.spec, linear.bias is not None)
        new._fill(linear.weight, linear.weight_fake_quant, act, linear.bias)
        return new

    def _fill(self, weight: torch.Tensor, wq: FakeQuantize, act: FakeQuantize, bias: torch.Tensor | None) -> None:
        """Store the integer form of a fake-quantized layer: the signed codes of ``weight``
        (``[N, ...]``, flattened to ``[N, K]`` in its own order), per-channel weight scales, signed
        zero points and column sums, and the per-tensor input quantizer's parameters."""
        n = self.out_features
        with torch.no_grad():
            codes = to_signed_codes(weight.float(), wq.scale, wq.zero_point, wq.spec).reshape(n, -1)
            self.w_codes = pack_int4(codes, signed=True) if self.w_packed else codes
            self.w_scale = wq.scale.reshape(-1).float().expand(n).clone()
            self.w_zp = (wq.zero_point.reshape(-1).expand(n) - code_offset(wq.spec)).to(torch.int32).clone()
            self.w_colsum = codes.to(torch.int32).sum(1)
            if not self.act_spec.dynamic:  # a dynamic input quantizer stores no parameters
                self.a_scale = act.scale.reshape(()).float().clone()
                self.a_zp = act.zero_point.reshape(()).float().clone()
            if bias is not None:
                self.bias = bias.detach().float().clone()

    def weight_codes(self) -> torch.Tensor:
        return unpack_int4(self.w_codes, signed=True) if self.w_packed else self.w_codes

    def _cpu_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes [N, K] int8, zero points [N], column sums [N])`` for ``int_linear_cpu``, built once
        (unpacked, transposed for ``torch._int_mm``) and recomputed only when ``w_codes`` changes.
        Below 8 bits the weight zero point is folded into the codes, ``w - z_w`` (within ±(2^b - 1),
        so int8 holds it): ``Σ(a - z_a)(w - z_w)`` is then the same integer with ``z_w = 0``, and the
        epilogue skips its ``[M, N]`` rank-one term."""
        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            codes, zp = self.weight_codes(), self.w_zp
            if self.weight_spec.bits < 8 and bool(zp.any()):
                codes = (codes.to(torch.int32) - zp.to(torch.int32)[:, None]).to(torch.int8)
                zp = torch.zeros_like(zp)
            return codes.T.contiguous(), zp, codes.to(torch.int32).sum(1)

        wt, zp, colsum = cached_by_version(self, "_cpu_weight_cache", (self.w_codes, self.w_zp), build)
        return wt.T, zp, colsum

    def _has_w_zp(self) -> bool:
        """Whether any weight zero point is non-zero, read once per change of ``w_zp`` (no host sync
        per forward on CUDA)."""
        return cached_by_version(self, "_w_zp_cache", (self.w_zp,), lambda: bool(self.w_zp.any()))

    def _use_triton(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` runs the Triton kernels: on CUDA tensors (tests patch this to run them
        on CPU tensors under ``TRITON_INTERPRET=1``)."""
        return x.is_cuda and HAS_TRITON

    def dynamic_act_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A dynamic input's ``(scale, zero point)`` per row of ``x.reshape(-1, in_features)`` (``[M]``
        each), from ``x`` in its own shape (a per-image range needs the image dimension)."""
        scale, zp = dynamic_qparams(x, self.act_spec)
        rows = tuple(x.shape[:-1]) + (1,)
        return expand_params(scale, rows).expand(rows).reshape(-1), expand_params(zp, rows).expand(rows).reshape(-1)

    def _dynamic_forward(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Per-row activation parameters: codes by the quantizer core (``to_signed_codes``), then the
        integer GEMM with a per-row epilogue (Triton on CUDA, ``int_linear_cpu`` elsewhere)."""
        s_a, z = self.dynamic_act_params(x)
        a = to_signed_codes(x2.float(), s_a[:, None], z[:, None], self.act_spec)
        z_a = (z - code_offset(self.act_spec)).round().to(torch.int32)
        if self._use_triton(x2):
            return int_linear(a, s_a, z_a, self.w_codes, self.w_scale, self.w_zp, self.bias, k=self.in_features,
                              w_packed=self.w_packed, w_colsum=self.w_colsum, out_dtype=x.dtype, has_w_zp=self._has_w_zp())
        w, w_zp, w_colsum = self._cpu_weight()
        return int_linear_cpu(a, s_a, z_a, w, self.w_scale, w_zp, self.bias, w_colsum=w_colsum).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.act_spec.dynamic:
            y = self._dynamic_forward(x, x2)
        elif self._use_triton(x2):
            pack_a = self.act_spec.bits <= 4 and self.w_packed
            a, s_a, z_a = quantize_act(x2, self.act_spec, self.a_scale, self.a_zp, pack=pack_a)
            y = int_linear(a, s_a, z_a, self.w_codes, self.w_scale, self.w_zp, self.bias, k=self.in_features,
                           a_packed=pack_a, w_packed=self.w_packed, w_colsum=self.w_colsum, out_dtype=x.dtype,
                           has_w_zp=self._has_w_zp())
        else:
            a = to_signed_codes(x2.float(), self.a_scale, self.a_zp, self.act_spec)
            a_zp = (self.a_zp - code_offset(self.act_spec)).round().to(torch.int32)
            w, w_zp, w_colsum = self._cpu_weight()
            y = int_linear_cpu(a, self.a_scale, a_zp, w, self.w_scale, w_zp, self.bias, w_colsum=w_colsum).to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w={self.weight_spec.short()}"
                f"{' (int4 packed)' if self.w_packed else ''}, a={self.act_spec.short()}")


def patch_conv_mismatch(conv: nn.Conv2d) -> str:
    """Why ``conv`` is not a patch embedding (stride = kernel, no padding, dilation 1, one group,
    zero padding mode), or ``""`` when it is one, i.e. a Linear over non-overlapping patches."""
    if tuple(conv.stride) != tuple(conv.kernel_size):
        return f"convolution is not a patch embedding (stride {tuple(conv.stride)} != kernel {tuple(conv.kernel_size)})"
    if conv.padding != "valid" and (isinstance(conv.padding, str) or any(p != 0 for p in conv.padding)):
        return f"convolution is not a patch embedding (padding {conv.padding})"
    if any(d != 1 for d in conv.dilation):
        return f"convolution is not a patch embedding (dilation {tuple(conv.dilation)})"
    if conv.groups != 1:
        return f"convolution is not a patch embedding ({conv.groups} groups)"
    if conv.padding_mode != "zeros":
        return f"convolution is not a patch embedding (padding mode {conv.padding_mode})"
    return ""


class LoweredPatchConv(LoweredLinear):
    """An integer patch-embedding convolution: a ``LoweredLinear`` over non-overlapping patches.

    A ``Conv2d`` with ``stride = kernel = (kh, kw)``, no padding, dilation 1 and one group maps
    ``x [B, C, H, W]`` to ``y [B, O, H', W']`` with ``H' = ⌊H/kh⌋``, ``W' = ⌊W/kw⌋`` (the remainder
    rows and columns are dropped, as ``Conv2d`` drops them)::

        y[b, o, i, j] = bias_o + Σ_{c,u,v} W[o, c, u, v] · x[b, c, i·kh + u, j·kw + v]

    which is a Linear with ``K = C·kh·kw`` inputs over the patch rows
    ``P[(b, i, j), (c, u, v)] = x[b, c, i·kh + u, j·kw + v]`` and the weight
    ``W.reshape(O, K)`` (same ``(c, u, v)`` order). The input quantizer is per tensor, so quantizing
    ``x`` and unfolding commute, and ``y = s_a·s_w·Σ(a - z_a)(w - z_w) + bias`` runs on
    ``LoweredLinear``'s integer path (``kernels/int_linear.py``: the Triton kernels on CUDA, the
    exact ``torch._int_mm`` path elsewhere). The patches are gathered with one reshape/permute copy
    (no ``F.unfold``); the output is contiguous NCHW in ``x``'s dtype, like ``Conv2d``'s."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], act_spec: QuantSpec,
                 weight_spec: QuantSpec, has_bias: bool, label: str = ""):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(in_channels * kh * kw, out_channels, act_spec, weight_spec, has_bias)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.label = label

    @classmethod
    def from_quantized(cls, conv: QuantConv2d, act: FakeQuantize, label: str = "") -> "LoweredPatchConv":
        why = patch_conv_mismatch(conv)
        if why:
            raise ConfigError(f"'{label or type(conv).__name__}': {why}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, act.spec, conv.weight_fake_quant.spec,
                  conv.bias is not None, label)
        new._fill(conv.weight, conv.weight_fake_quant, act, conv.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        xb = x.unsqueeze(0) if unbatched else x
        kh, kw = self.kernel_size
        name = f"patch convolution '{self.label}'" if self.label else "LoweredPatchConv"
        if xb.dim() != 4 or xb.shape[1] != self.in_channels:
            raise ValueError(f"{name} expects [B, {self.in_channels}, H, W] input, got {tuple(x.shape)}")
        b, c, h, w = xb.shape
        hp, wp = h // kh, w // kw
        if hp == 0 or wp == 0:
            raise ValueError(f"{name}: input {h}x{w} is smaller than the {kh}x{kw} kernel")
        # [B, C, H'·kh, W'·kw] → [B, H', W', C, kh, kw] → [B·H'·W', K]: the one copy
        patches = (xb[:, :, :hp * kh, :wp * kw].reshape(b, c, hp, kh, wp, kw).permute(0, 2, 4, 1, 3, 5)
                   .reshape(b * hp * wp, self.in_features))
        y = super().forward(patches).reshape(b, hp, wp, self.out_features).permute(0, 3, 1, 2).contiguous()
        return y[0] if unbatched else y

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={self.kernel_size}, " + super().extra_repr()


def act_num_groups(act_spec: QuantSpec, in_features: int) -> int:
    """The number of channel groups of a grouped Linear input quantizer (``InstanceGroups`` or
    ``PerGroup`` on the channel axis)."""
    g = act_spec.granularity
    if isinstance(g, InstanceGroups):
        return g.num_groups
    if isinstance(g, PerGroup):
        if in_features % g.group_size:
            raise ConfigError(f"PerGroup(group_size={g.group_size}) does not divide {in_features} input channels")
        return in_features // g.group_size
    raise ConfigError(f"input quantizer {act_spec.short()} has no channel groups")


class LoweredGroupedLinear(nn.Module):
    """An integer Linear whose input is quantized in channel groups (IGQ-ViT; ``kernels/grouped_linear.py``):
    ``y = Σ_g s_g·s_w·Σ_{c∈g}(a - z_g)(w - z_w) + bias``.

    ``InstanceGroups(G)`` inputs: per instance (the first ``instance_dims`` dimensions of the input),
    each channel goes to the group ``fxquant.core.quant.instance_groups`` picks; ``PerGroup(g)`` inputs:
    fixed channel blocks ``c // g``. Codes come from the quantizer core (``to_signed_codes`` with the
    per-channel parameters gathered from the ``[G]`` group parameters), so they are the codes the
    fake quantizer rounds to. Weights are stored like ``LoweredLinear``'s (int4 packed two per byte
    for ≤ 4 bits and an even K); the Triton kernel gathers their nibbles directly."""

    def __init__(self, in_features: int, out_features: int, act_spec: QuantSpec, weight_spec: QuantSpec, has_bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_spec, self.weight_spec = act_spec, weight_spec
        self.num_groups = act_num_groups(act_spec, in_features)
        self.w_packed = weight_spec.bits <= 4 and in_features % 2 == 0
        k_store = in_features // 2 if self.w_packed else in_features
        self.register_buffer("w_codes", torch.zeros(out_features, k_store, dtype=torch.uint8 if self.w_packed else torch.int8))
        self.register_buffer("w_scale", torch.zeros(out_features))
        self.register_buffer("w_zp", torch.zeros(out_features, dtype=torch.int32))
        # the input quantizer's group parameters, flattened to [G] (its own zero points, unsigned for asymmetric specs)
        self.register_buffer("g_scale", torch.zeros(self.num_groups))
        self.register_buffer("g_zp", torch.zeros(self.num_groups))
        self.register_buffer("bias", torch.zeros(out_features) if has_bias else None)

    @classmethod
    def from_quantized(cls, linear: QuantLinear, act: FakeQuantize) -> "LoweredGroupedLinear":
        wq = linear.weight_fake_quant
        new = cls(linear.in_features, linear.out_features, act.spec, wq.spec, linear.bias is not None)
        if act.scale.numel() != new.num_groups or act.zero_point.numel() != new.num_groups:
            raise ConfigError(f"grouped input quantizer {act.spec.short()} holds {act.scale.numel()} scales, "
                              f"expected {new.num_groups} groups")
        with torch.no_grad():
            codes = to_signed_codes(linear.weight.float(), wq.scale, wq.zero_point, wq.spec)
            new.w_codes = pack_int4(codes, signed=True) if new.w_packed else codes
            new.w_scale = wq.scale.reshape(-1).float().expand(linear.out_features).clone()
            new.w_zp = (wq.zero_point.reshape(-1).expand(linear.out_features) - code_offset(wq.spec)).to(torch.int32).clone()
            new.g_scale = act.scale.reshape(-1).float().clone()
            new.g_zp = act.zero_point.reshape(-1).float().clone()
            if linear.bias is not None:
                new.bias = linear.bias.detach().float().clone()
        return new

    def weight_codes(self) -> torch.Tensor:
        return unpack_int4(self.w_codes, signed=True) if self.w_packed else self.w_codes

    def act_params(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The input quantizer's ``(scale, zero point)`` in its own layout for a ``ndim``-D input:
        ``[G]`` for ``InstanceGroups``, ``[1, ..., 1, G]`` for ``PerGroup`` (e.g. for an exporter)."""
        if isinstance(self.act_spec.granularity, InstanceGroups):
            return self.g_scale, self.g_zp
        shape = (1,) * (ndim - 1) + (self.num_groups,)
        return self.g_scale.reshape(shape), self.g_zp.reshape(shape)

    def act_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Signed int8 codes ``[M, K]`` of ``x``, the channel→group map ``[instances, K]`` and the rows
        per instance, by the quantizer core's rules (the fake quantizer's codes)."""
        xf = x.float()
        k = self.in_features
        m = xf.numel() // k
        spec = self.act_spec
        scale, zp = self.act_params(xf.dim())
        if isinstance(spec.granularity, InstanceGroups):
            # resolve_params' gather, keeping the group map: x's shape with the statistics dims of size 1
            idx = instance_groups(xf, scale, zp, spec)
            codes = to_signed_codes(xf, scale[idx], zp[idx], spec)
            group_idx = idx.reshape(-1, k)
        else:  # PerGroup on the channel axis: fixed blocks c // group_size, one instance
            codes = to_signed_codes(xf, scale, zp, spec)
            group_idx = contiguous_group_idx(k, k // self.num_groups, device=x.device)
        return codes.reshape(m, k), group_idx, m // group_idx.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        a, group_idx, rows = self.act_codes(x)
        g_zp = (self.g_zp - code_offset(self.act_spec)).round().to(torch.int32)
        if a.is_cuda and HAS_TRITON:
            y = grouped_linear(a, group_idx, rows, self.g_scale, g_zp, self.w_codes, self.w_scale, self.w_zp, self.bias,
                               k=self.in_features, w_packed=self.w_packed, out_dtype=x.dtype)
        else:
            y = grouped_linear_cpu(a, group_idx, rows, self.g_scale, g_zp, self.weight_codes(), self.w_scale, self.w_zp,
                                   self.bias).to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        g = self.act_spec.granularity
        kind = "instance" if isinstance(g, InstanceGroups) else "contiguous"
        return (f"in={self.in_features}, out={self.out_features}, w={self.weight_spec.short()}"
                f"{' (int4 packed)' if self.w_packed else ''}, a={self.act_spec.short()}, {self.num_groups} {kind} groups")


class LoweredMatmul(nn.Module):
    """An integer attention matmul ``a @ b`` on quantized operands (``kernels/int_attention.py``).

    ``kind`` follows ``a``'s quantizer: ``"uniform"`` (q·kᵀ, or A·v with a uniform A: integer
    GEMM), ``"log"`` (RepQ-ViT's log2/log√2 A: shift accumulators) or ``"bitlog2"`` (integer
    levels D). ``b`` is always uniform, per tensor, with an integer zero point."""

    def __init__(self, a_spec: QuantSpec, b_spec: QuantSpec):
        super().__init__()
        self.a_spec, self.b_spec = a_spec, b_spec
        self.kind = "uniform" if a_spec.scheme == "uniform" else ("bitlog2" if a_spec.scheme == "bitlog2" else "log")
        for name in ("a_scale", "a_zp", "b_scale", "b_zp"):
            self.register_buffer(name, torch.zeros(()))

    @classmethod
    def from_quantizers(cls, a_fq: FakeQuantize, b_fq: FakeQuantize) -> "LoweredMatmul":
        new = cls(a_fq.spec, b_fq.spec)
        with torch.no_grad():
            for side, fq in (("a", a_fq), ("b", b_fq)):
                setattr(new, f"{side}_scale", fq.scale.reshape(()).float().clone())
                setattr(new, f"{side}_zp", fq.zero_point.reshape(()).float().clone())
        return new

    def host_params(self) -> dict[str, float | int]:
        """The quantizer parameters as Python numbers (scales, zero points, signed zero points ``za``/``zb``,
        ``b_scale/a_scale`` in fp32 as the epilogue divides them), read from the device once and again
        only when a buffer changes (keyed by storage and version): no host sync per forward on CUDA."""
        bufs = (self.a_scale, self.a_zp, self.b_scale, self.b_zp)

        def read() -> dict[str, float | int]:
            a_scale, a_zp, b_scale, b_zp = (float(b.item()) for b in bufs)
            return {"a_scale": a_scale, "a_zp": a_zp, "b_scale": b_scale, "b_zp": b_zp,
                    "za": int(a_zp) - code_offset(self.a_spec) if self.a_spec.scheme == "uniform" else 0,
                    "zb": int(b_zp) - code_offset(self.b_spec),
                    "b_over_a": float((self.b_scale.detach().cpu() / self.a_scale.detach().cpu()).item())}

        return cached_by_version(self, "_host_cache", bufs, read)

    def _signed(self, x: torch.Tensor, side: str) -> tuple[torch.Tensor, int]:
        """int8 codes of one uniform operand and its signed zero point."""
        spec = self.a_spec if side == "a" else self.b_spec
        scale, zp = getattr(self, f"{side}_scale"), getattr(self, f"{side}_zp")
        return to_signed_codes(x.float(), scale, zp, spec), self.host_params()["za" if side == "a" else "zb"]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        vb, zb = self._signed(b, "b")
        gpu = a.is_cuda and HAS_TRITON
        if self.kind == "uniform":
            va, za = self._signed(a, "a")
            if gpu:
                lead = torch.broadcast_shapes(va.shape[:-2], vb.shape[:-2])
                hp = self.host_params()
                return int_bmm(va.expand(*lead, *va.shape[-2:]), hp["a_scale"], za, vb.expand(*lead, *vb.shape[-2:]),
                               hp["b_scale"], zb, out_dtype=a.dtype)
            return int_bmm_cpu(va, self.a_scale, za, vb, self.b_scale, zb,
                               bits=(self.a_spec.bits, self.b_spec.bits)).to(a.dtype)
        v = vb.to(torch.int32) - zb
        variant = self.a_spec.bitlog2_variant
        if self.kind == "bitlog2" and not gpu:  # levels straight from the integer inputs (one gather)
            acc = bitlog2_av_from_input(bitlog2_input(a, variant), v, variant)
            return (acc.to(torch.float32) * (self.b_scale / self.a_scale)).to(a.dtype)
        if self.kind == "log":  # per-count weights, no codes (one gather each)
            return log_av_from_ratio(a.float() / self.a_scale, self.a_scale, v, self.b_scale, self.a_spec).to(a.dtype)
        codes = log_codes_of(a, self.a_scale, self.a_spec)
        if (gpu and codes.shape[-1] == codes.shape[-2] and codes.shape[:-2] == vb.shape[:-2]
                and av_int32_fits(codes.shape[-1], variant, zb)):
            acc = bitlog2_av(codes.to(torch.int8), vb, variant, v_zp=zb, packed=False)
        else:
            acc = bitlog2_av_int(codes, v, variant)
        return (acc.to(torch.float32) * self.host_params()["b_over_a"]).to(a.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, a={self.a_spec.short()}, b={self.b_spec.short()}"


class LoweredAttention(nn.Module):
    """A lowered attention core ``softmax(q·kᵀ)·v`` whose two matmuls are ``LoweredMatmul``s with
    a uniform ``q·kᵀ`` and a uniform or BitLog2 ``A`` (``kernels/fused_attention.py``).

    On CUDA with Triton it runs the fused kernel (scores, softmax, A's codes and the integer A·v in
    one pass, no ``N×N`` tensor in memory); elsewhere, or when the operands do not fit it, it runs
    the two ``LoweredMatmul``s and ``torch.softmax`` exactly as the unfused graph did. ``backend``:
    ``"auto"`` (that rule), ``"triton"`` (the fused kernel wherever Triton runs, e.g. under
    ``TRITON_INTERPRET=1`` in the tests) or ``"unfused"``."""

    BACKENDS = ("auto", "triton", "unfused")
    SCORE_OPS = (None, "mul", "div")

    def __init__(self, qk: LoweredMatmul, av: LoweredMatmul, score_op: str | None = None, backend: str = "auto"):
        super().__init__()
        if qk.kind != "uniform" or av.kind not in ("uniform", "bitlog2"):
            raise ConfigError(f"LoweredAttention fuses a uniform q·kᵀ with a uniform or BitLog2 A·v, got "
                              f"{qk.kind} and {av.kind}")
        if score_op not in self.SCORE_OPS:
            raise ConfigError(f"LoweredAttention score_op must be one of {list(self.SCORE_OPS)}, got {score_op!r}")
        self.qk, self.av = qk, av
        self.score_op = score_op  # the graph's scalar multiply/divide of the scores before the softmax
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in self.BACKENDS:
            raise ConfigError(f"LoweredAttention backend must be one of {list(self.BACKENDS)}, got {value!r}")
        self._backend = value

    def _fusable(self, q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, scale) -> bool:
        if self.backend == "unfused" or not HAS_TRITON or (self.backend == "auto" and not q.is_cuda):
            return False
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            return False
        n = q.shape[-2]
        return (q.dim() >= 3 and q.shape[:-2] == kt.shape[:-2] == v.shape[:-2] and kt.shape[-2:] == (q.shape[-1], n)
                and v.shape[-2] == n
                and (self.av.kind != "bitlog2" or av_int32_fits(n, self.av.a_spec.bitlog2_variant, self.av.host_params()["zb"])))

    def forward(self, q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, scale=None) -> torch.Tensor:
        if not self._fusable(q, kt, v, scale):
            s = self.qk(q, kt)
            s = s * scale if self.score_op == "mul" else s / scale if self.score_op == "div" else s
            return self.av(torch.softmax(s, dim=-1), v)
        qc, zq = self.qk._signed(q, "a")
        kc, zk = self.qk._signed(kt, "b")
        vc, zv = self.av._signed(v, "b")
        qk, av = self.qk.host_params(), self.av.host_params()  # Python numbers: no host sync per call
        if self.av.kind == "bitlog2":  # A·v = (s_v/δ)·Σ D·(v - z_v), as LoweredMatmul's epilogue
            out_scale = av["b_over_a"]
        else:
            out_scale = av["a_scale"] * av["b_scale"]
        c = None if self.score_op is None else float(scale)
        return fused_attention(qc, zq, kc.transpose(-1, -2), zk, vc, zv, qk["a_scale"] * qk["b_scale"],
                               self.av.a_spec, av["a_scale"], av["a_zp"], out_scale,
                               score_mul=c if self.score_op == "mul" else None, score_div=c if self.score_op == "div" else None,
                               out_dtype=torch.float16 if q.dtype == torch.float16 else torch.float32).to(q.dtype)

    def extra_repr(self) -> str:
        return f"A={self.av.a_spec.short()}, scores {self.score_op or 'unscaled'}, backend={self.backend}"
