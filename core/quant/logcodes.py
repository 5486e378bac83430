"""Logarithmic codes: log2 / log√2 and BitLog2 codes, levels, tables and counts.

Conventions (docs/methods.md, Conventions; the uniform affine one is in ``affine.py``):

* Logarithmic, ``b`` bits, scale ``Δ`` (the largest representable value), step ``t`` (1 for log2,
  1/2 for log√2): ``c = round(-log2(x / Δ) / t)``; codes ``c ≥ 2^b`` and ``x ≤ 0`` map to the
  special zero code ``2^b``; otherwise ``c = clamp(c, 0, 2^b - 1)`` and ``x̂ = Δ·2^(-c·t)``.
  The rounding is evaluated exactly as comparisons of ``r = x / Δ`` with the float32 midpoints
  ``T_j = 2^(-t·(j - 1/2))`` (``c`` = the number of ``T_j ≥ r``), and values come from a float32
  level table: the same compares and gathers run in ONNX, so exported models match bit for bit.
  So a ``b``-bit log quantizer has ``2^b + 1`` output values (RepQ-ViT's 4-bit log√2 has 17).
  With ``fit_bits=True`` it has exactly ``2^b`` (BitLog2's Sqrt2_16): codes clamp to
  ``0..2^b - 2`` and zero takes code ``2^b - 1``.
  For integer arithmetic a non-zero level is a shift and a √2 factor: ``2^(-t·c) = 2^(-⌈t·c⌉)·√2^h``
  (``h = 1`` for odd log√2 codes; ``log_shifts``).
* BitLog2 (integer log2 of an attention probability ``x ∈ [0, 1]``, docs/methods.md, BitLog2), variant
  ``(M, half)``: ``n = clamp(floor(x·M), 0, M - 1)``; ``n = 0`` is the zero code; else ``k`` = the
  MSB index of ``n`` and (half variants) ``h`` = the bit below it. Integer level ``D = 2^k
  (+ h·2^(k-1))``, value ``x̂ = D / δ`` with an integer ``δ`` (stored as the scale). Codes are level
  indices: 0 = zero, single: ``c = k + 1``, half: ``c = 1`` for ``k = 0`` else ``2k + h``; decoding
  a code back to ``(k, h)`` is ``bitlog2_shifts``. The same code is ``#{j : n ≥ D_j}`` over the
  non-zero levels (``bitlog2_codes_by_compare``, the form the ONNX exporter runs).
"""

from __future__ import annotations

import functools
import math

import torch

from .spec import _LOG_STEP, BITLOG2_VARIANTS, QuantSpec, _bitlog2_max_code


def log_step(spec: QuantSpec) -> float:
    """The exponent step ``t`` of a log scheme: 1 for log2, 1/2 for log√2 (code ``c`` stands for
    ``Δ·2^(-t·c)``)."""
    if spec.scheme not in _LOG_STEP:
        raise ValueError(f"log_step takes a log2/log_sqrt2 spec, got {spec.scheme!r}")
    return _LOG_STEP[spec.scheme]


def log_shifts(codes: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The level ``2^(-t·c)`` of non-zero log codes as an integer shift and a √2 factor:
    ``2^(-t·c) = 2^(-s)·√2^h`` with ``s = ⌈t·c⌉`` and ``h = 1`` for odd log√2 codes (else 0).
    Returns ``(s, h)`` (int64); the zero code (``c > qmax``) is the caller's to mask."""
    c = codes.to(torch.int64)
    if log_step(spec) == 1.0:
        return c, torch.zeros_like(c)
    h = torch.bitwise_and(c, 1)
    return torch.bitwise_right_shift(c + h, 1), h


def msb_index(n: torch.Tensor) -> torch.Tensor:
    """Index of the most significant set bit of non-negative int32 ``n < 2^16`` (-1 for 0),
    with shifts and compares only (a 4-step binary search)."""
    n = n.to(torch.int32)
    k = torch.zeros_like(n)
    for step in (8, 4, 2, 1):
        up = (torch.bitwise_right_shift(n, k + step) > 0).to(torch.int32)
        k = k + step * up
    return torch.where(n > 0, k, torch.full_like(k, -1))


def bitlog2_input(x: torch.Tensor, variant: str) -> torch.Tensor:
    """``n = clamp(floor(x·M), 0, M - 1)`` as int32 (floor = truncation toward 0 for x ≥ 0)."""
    m, _ = BITLOG2_VARIANTS[variant]
    return torch.clamp(torch.floor(x.float() * m), 0, m - 1).to(torch.int32)


def bitlog2_codes_from_int(n: torch.Tensor, variant: str) -> torch.Tensor:
    """Level-index codes (int32, 0 = zero) of integer inputs ``n``, shifts and compares only."""
    _, half = BITLOG2_VARIANTS[variant]
    k = msb_index(n)
    if not half:
        return torch.where(n > 0, k + 1, torch.zeros_like(k))
    below = torch.bitwise_and(torch.bitwise_right_shift(n, (k - 1).clamp(min=0)), 1)
    c = torch.where(k >= 1, 2 * k + below, torch.ones_like(k))
    return torch.where(n > 0, c, torch.zeros_like(c))


def bitlog2_shifts(codes: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode BitLog2 codes to ``(k, h)`` (int32), ``D = 2^k + h·2^(k-1)``: single variants
    ``k = c - 1``, ``h = 0``; half variants ``k = c >> 1``, ``h = c & 1`` for ``c ≥ 2`` and
    ``(0, 0)`` (D = 1) for ``c = 1``. Code 0 (zero) gives ``(0, 0)`` too: the caller masks it."""
    _, half = BITLOG2_VARIANTS[variant]
    c = codes.to(torch.int32)
    zero = torch.zeros_like(c)
    if not half:
        return (c - 1).clamp(min=0), zero
    two = c >= 2
    return torch.where(two, torch.bitwise_right_shift(c, 1), zero), torch.where(two, torch.bitwise_and(c, 1), zero)


def bitlog2_levels(codes: torch.Tensor, variant: str) -> torch.Tensor:
    """Integer level ``D`` (int32) of BitLog2 codes, shifts only (``bitlog2_shifts``)."""
    k, h = bitlog2_shifts(codes, variant)
    one = torch.ones_like(k)
    d = torch.bitwise_left_shift(one, k) + h * torch.bitwise_left_shift(one, (k - 1).clamp(min=0))
    return torch.where(codes.to(torch.int32) > 0, d, torch.zeros_like(d))


def bitlog2_delta(sum_xd: float, sum_dd: float, sum_xx: float, max_level: int, variant: str) -> int:
    """MSE-optimal integer δ for ``x̂ = D/δ`` from streamed sums (docs/methods.md, BitLog2).

    ``mean((x - D/δ)²)`` is a convex quadratic in ``t = 1/δ`` with minimum ``t* = ΣxD / ΣD²``;
    over integers δ the optimum is one of the two bracketing ``1/t*``, clipped to
    ``[max D, M - 1]`` (so ``x̂ ≤ 1``)."""
    m, _ = BITLOG2_VARIANTS[variant]
    lo, hi = max(1, int(max_level)), m - 1
    if sum_dd <= 0 or sum_xd <= 0:
        return hi

    def loss(d: int) -> float:
        return sum_xx - 2.0 * sum_xd / d + sum_dd / (d * d)

    inv = sum_dd / sum_xd
    cands = {min(max(int(math.floor(inv)), lo), hi), min(max(int(math.ceil(inv)), lo), hi)}
    return min(sorted(cands), key=loss)


def log_thresholds(spec: QuantSpec) -> torch.Tensor:
    """Rounding midpoints ``T_j = 2^(-t·(j - 1/2))``, j = 1..2^b (descending, float32): ``r ≤ T_j``
    means the code of ``r = x/Δ`` is at least ``j``; reaching ``T_{2^b}`` means zero."""
    step = log_step(spec)
    j = torch.arange(1, 2**spec.bits + 1, dtype=torch.float64)
    return torch.exp2(-step * (j - 0.5)).float()


def log_level_table(spec: QuantSpec) -> torch.Tensor:
    """Value of each log code at Δ = 1 (float32), the zero code last: ``x̂ = Δ·table[c]``."""
    step = log_step(spec)
    vals = torch.exp2(-step * torch.arange(spec.qmax + 1, dtype=torch.float32))
    return torch.cat([vals, torch.zeros(spec.zero_code - spec.qmax)])


def bitlog2_level_table(variant: str) -> torch.Tensor:
    """Integer levels ``D`` of every BitLog2 code, ascending (code = index)."""
    return bitlog2_levels(torch.arange(_bitlog2_max_code(variant) + 1), variant)


def bitlog2_compare_levels(variant: str) -> torch.Tensor:
    """The non-zero levels ``D_1 < D_2 < ...`` (float32) that ``bitlog2_codes_by_compare`` counts."""
    return bitlog2_level_table(variant)[1:].float()


def bitlog2_codes_by_compare(n: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``bitlog2_codes_from_int`` by compares (int64): the code of ``n`` is ``#{j : n ≥ D_j}`` over
    ``levels = bitlog2_compare_levels(variant)``. The ONNX exporter's form (``GreaterOrEqual`` +
    ``ReduceSum``, no bit operations); equal to the shift form on every ``n`` in ``[0, M)``."""
    return (n.unsqueeze(-1) >= levels).sum(-1)


def log_code_of_count(count: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The log code of ``r = x / Δ`` from ``count = #{j : r ≤ T_j}`` (module doc): all ``2^b``
    midpoints reached (or ``r ≤ 0``) is the zero code, otherwise ``min(count, qmax)``. fxquant counts
    with ``bucketize``; the ONNX exporter with ``log_count_by_compare``; both end here."""
    return torch.where(count >= 2**spec.bits, torch.full_like(count, spec.zero_code), count.clamp(max=spec.qmax))


def log_count_by_compare(ratio: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``count = #{j : r ≤ T_j}`` by compares (``thresholds = log_thresholds(spec)``): the ONNX
    exporter's form (``LessOrEqual`` + ``ReduceSum``) of ``log_codes``' ``bucketize`` count."""
    return (ratio.unsqueeze(-1) <= thresholds).sum(-1)


def log_codes(ratio: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes (int64) of ``r = x / Δ``: the count of midpoints ``T_j ≥ r``, capped (see module doc);
    the count is ``log_count``'s (equal to ``bucketize`` against the midpoints, tested)."""
    return log_code_of_count(log_count(ratio, spec), spec)


def _on(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    return table if table.device == device else table.to(device)


@functools.lru_cache(maxsize=None)
def _log_tables(spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, V)`` for ``log_count`` and ``fake_quantize_inference``: the midpoints padded as
    ``[NaN, T_1..T_n, NaN]`` (every compare with the pads is false, so the count stays in
    ``[0, n]``) and the level (Δ = 1) of every count ``0..n`` (``log_level_table[log_code_of_count]``)."""
    t = log_thresholds(spec)
    padded = torch.cat([torch.tensor([math.nan]), t, torch.tensor([math.nan])])
    count = torch.arange(t.numel() + 1)
    return padded, log_level_table(spec)[log_code_of_count(count, spec)]


@functools.lru_cache(maxsize=None)
def _log_mantissas(spec: QuantSpec) -> tuple[float, ...] | None:
    """The midpoints as mantissas and exponents (``frexp``): ``T_j`` has exponent ``-⌊(j-1)/p⌋``
    and mantissa ``m_{(j-1) mod p}`` with ``p = 1/t`` levels per octave (log2: 1, log√2: 2), as
    float32 scales by powers of two exactly. Returns ``(m_0, .., m_{p-1})``, or None when the float32
    table does not have that form (midpoints that underflow, e.g. 8-bit log2)."""
    t = log_thresholds(spec)
    per = round(1 / log_step(spec))
    m, e = torch.frexp(t)
    j = torch.arange(t.numel())
    mants = m[:per]
    if not (torch.equal(e, -(j // per).to(e.dtype)) and torch.equal(m, mants[j % per])):
        return None
    return tuple(float(v) for v in mants)


_SMALLEST_NORMAL = float(torch.finfo(torch.float32).smallest_normal)


@functools.lru_cache(maxsize=None)
def _log_mantissa_fields(spec: QuantSpec) -> tuple[int, ...] | None:
    """The 23-bit fraction fields of ``_log_mantissas`` (each in ``[0.5, 1)``): for a normal float32
    ``r = (0.5 + f·2^-24)·2^(E-126)`` (``E`` its biased exponent, ``f`` its fraction field), ``m_r ≤ m_k``
    exactly when ``f ≤ f_k``."""
    mants = _log_mantissas(spec)
    if mants is None:
        return None
    return tuple(int(torch.tensor([m], dtype=torch.float32).view(torch.int32).item()) & 0x7FFFFF for m in mants)


def _log_count_int32(ratio: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """``log_count`` as int32, from the float32 bits of ``r`` (no ``frexp``): with the biased exponent
    ``E`` and fraction field ``f``, ``count = clamp(-p·(E - 126) + #{k : f ≤ f_k}, 0, n)``. ``r`` is
    first clamped to ``[smallest normal, 2]`` (every midpoint is a normal float32 below 2, so the
    count is unchanged: subnormals count ``n`` like 0 does, values above 1 count 0). None when the
    midpoints do not have the mantissa/exponent form."""
    fields = _log_mantissa_fields(spec)
    if fields is None:
        return None
    padded, _ = _log_tables(spec)
    n, p = padded.numel() - 2, len(fields)
    r = ratio.float().nan_to_num(nan=2.0, posinf=2.0, neginf=0.0).clamp_(_SMALLEST_NORMAL, 2.0)
    bits = r.view(torch.int32)
    count = torch.bitwise_right_shift(bits, 23).mul_(-p).add_(126 * p)
    bits.bitwise_and_(0x7FFFFF)
    for f in fields:
        count += bits <= f
    return count.clamp_(0, n)


def log_count(ratio: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``#{j : r ≤ T_j}`` (int64), equal to ``log_codes``' ``bucketize`` count (tested on every
    float32 near each midpoint), without a binary search: the midpoints are ``m_k·2^(-i)``
    (``_log_mantissas``), so with ``r = m_r·2^(e_r)`` the count is ``clamp(-p·e_r + #{k : m_r ≤ m_k},
    0, n)``, read off the float32 bits of ``r`` (``_log_count_int32``). ``r ≤ 0`` counts ``n`` and NaN
    counts 0, as with ``bucketize`` (NaN and ±inf are mapped to values with those counts first).
    Tables without that form fall back to a ``log2`` estimate corrected by two exact compares."""
    count = _log_count_int32(ratio, spec)
    if count is not None:
        return count.long()
    padded, _ = _log_tables(spec)
    n = padded.numel() - 2
    padded = _on(padded, ratio.device)
    r = ratio.float().clamp(min=0)  # every midpoint is ≥ a negative r, as it is ≥ 0
    est = (0.5 - torch.log2(r) / log_step(spec)).floor_().nan_to_num_(nan=0, posinf=n, neginf=0).clamp_(0, n)
    c = est.long()
    c += (torch.take(padded, c + 1) >= r).long()
    c -= (torch.take(padded, c) < r).long()
    return c


@functools.lru_cache(maxsize=None)
def bitlog2_level_by_input(variant: str) -> torch.Tensor:
    """Level ``D`` (float32, exact integers) of every integer BitLog2 input ``n`` in ``[0, M)``:
    ``bitlog2_levels(bitlog2_codes_from_int(n))`` as a table (at most 65,536 entries)."""
    m, _ = BITLOG2_VARIANTS[variant]
    return bitlog2_levels(bitlog2_codes_from_int(torch.arange(m, dtype=torch.int32), variant), variant).float()
