"""The integer representation of quantizer codes: signed storage and 4-bit packing.

``dispatch.quantize`` says which integer code a value gets; this module says how those integers are
stored, for the integer kernels (``fxquant.kernels``), the lowering pass and the ONNX exporter
alike. It is the only copy of these rules.

* **Signed codes.** A uniform quantizer's codes ``q`` (``dispatch.quantize``) are stored signed,
  ``c = q - offset`` with ``offset = 2^(b-1)`` for asymmetric specs and 0 for symmetric ones
  (``code_offset``), so 8-bit codes fit int8 and 4-bit codes a signed nibble; the zero point moves
  with them (``z_c = z - offset``). ``to_signed_codes`` gives ``c`` as int8.
* **int4 packing.** Two 4-bit codes per byte along the last dimension, the even index in the low
  nibble and the odd index in the high nibble; an odd length is padded with a 0 code. Signed codes
  ``[-8, 7]`` are stored as their two's-complement nibbles (sign-extended on unpacking), unsigned
  codes ``[0, 15]`` (BitLog2's 16-level variants) as they are. The Triton kernels read and write
  this byte layout.
"""

from __future__ import annotations

import torch

from .affine import round_clamp_centered_
from .dispatch import quantize
from .spec import QuantSpec

INT4_RANGE = {True: (-8, 7), False: (0, 15)}  # signed -> (lowest, highest) code a nibble holds


def code_offset(spec: QuantSpec) -> int:
    """What is subtracted from a spec's codes to store them signed (``2^(b-1)`` asymmetric, 0 symmetric)."""
    return 0 if spec.symmetric else 2 ** (spec.bits - 1)


def to_signed_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Signed integer codes (int8) of ``x`` under ``spec`` (the rounding rule of ``dispatch.quantize``).

    For per-tensor integer zero points (every lowered activation) the codes are computed in place as
    ``round_clamp_centered_(x/s, z) + (z - offset)``, which is ``quantize(x) - offset`` exactly."""
    if (spec.scheme == "uniform" and spec.zero_point_domain == "int" and scale.numel() == 1 and zero_point.numel() == 1
            and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)):
        z = zero_point.reshape(())
        y = round_clamp_centered_(x / scale.reshape(()), z, spec)
        return y.add_(float(z) - code_offset(spec)).to(torch.int8)
    return (quantize(x, scale, zero_point, spec) - code_offset(spec)).to(torch.int8)


def pack_int4(codes: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dimension (uint8 ``[..., ceil(n/2)]``): the even
    index in the low nibble, an odd tail padded with 0. ``signed``: codes in ``[-8, 7]``, else ``[0, 15]``."""
    lo, hi = INT4_RANGE[signed]
    if codes.numel() and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"pack_int4(signed={signed}) needs codes in [{lo}, {hi}]")
    c = codes.to(torch.int16) & 0xF
    if c.shape[-1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, n: int | None = None, *, signed: bool) -> torch.Tensor:
    """Inverse of ``pack_int4``: the first ``n`` codes (default ``2·packed.shape[-1]``) of each row,
    as int8 (sign-extended when ``signed``)."""
    width = 2 * packed.shape[-1]
    n = width if n is None else n
    if not width - 1 <= n <= width:
        raise ValueError(f"unpack_int4: {packed.shape[-1]} bytes hold {width - 1} or {width} codes, not {n}")
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    if signed:
        lo = torch.where(lo >= 8, lo - 16, lo)
        hi = torch.where(hi >= 8, hi - 16, hi)
    return torch.stack([lo, hi], dim=-1).flatten(-2)[..., :n].to(torch.int8)
