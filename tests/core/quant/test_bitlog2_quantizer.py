"""BitLog2 quantizer: level counts, shift-only codes equal the float log2 definition on every
integer input, closed-form δ equals brute force, streaming δ equals one-shot δ."""

from __future__ import annotations

import math

import pytest
import torch

from fxquant.core.errors import ConfigError
from fxquant.core.quant import QuantSpec, fake_quantize, grid_values
from fxquant.core.quant.logcodes import (
    bitlog2_codes_by_compare,
    bitlog2_codes_from_int,
    bitlog2_compare_levels,
    bitlog2_input,
    bitlog2_levels,
    bitlog2_shifts,
    msb_index,
)
from fxquant.core.quant.observers import BitLog2Observer
from fxquant.core.quant.spec import BITLOG2_VARIANTS

LEVELS = {"single16": 16, "single17": 17, "half16": 16, "half17": 17}


@pytest.mark.parametrize("variant", list(BITLOG2_VARIANTS))
def test_level_counts_and_values(variant):
    spec = QuantSpec(bits=4, scheme="bitlog2", bitlog2_variant=variant)
    levels = grid_values(1.0, 0.0, spec)  # with δ = 1 the values are the integer levels D
    assert levels.numel() == LEVELS[variant]
    m, half = BITLOG2_VARIANTS[variant]
    if half:
        expected = sorted({0, 1} | {2**k + h * 2 ** (k - 1) for k in range(1, 16) for h in (0, 1) if 2**k + h * 2 ** (k - 1) < m
                                    and (2**k + (2 ** (k - 1) if h else 0)) <= m - 1})
    else:
        expected = [0] + [2**k for k in range(16) if 2**k <= m - 1]
    assert levels.tolist() == [float(v) for v in expected]


def test_sqrt2_16_and_17_level_counts():
    assert grid_values(1.0, 0.0, QuantSpec(bits=4, scheme="log_sqrt2")).numel() == 17
    s16 = QuantSpec(bits=4, scheme="log_sqrt2", fit_bits=True)
    assert grid_values(1.0, 0.0, s16).numel() == 16 and s16.zero_code == 15 and s16.qmax == 14


def test_msb_index_on_every_16_bit_integer():
    n = torch.arange(0, 2**16, dtype=torch.int32)
    ref = torch.tensor([-1] + [math.floor(math.log2(i)) for i in range(1, 2**16)], dtype=torch.int32)
    assert torch.equal(msb_index(n), ref)


@pytest.mark.parametrize("variant", list(BITLOG2_VARIANTS))
def test_shift_codes_equal_float_log2_definition_on_all_inputs(variant):
    m, half = BITLOG2_VARIANTS[variant]
    n = torch.arange(0, m, dtype=torch.int32)  # all 2^15 / 2^16 / 256 / 384 inputs
    nd = n.double()
    k = torch.floor(torch.log2(nd.clamp(min=1)))  # float definition
    d_single = torch.exp2(k)
    h = (nd >= 1.5 * d_single) & (k >= 1)
    d_float = d_single + (h.double() * d_single / 2 if half else 0)
    d_float = torch.where(n > 0, d_float, torch.zeros_like(d_float))
    d_shift = bitlog2_levels(bitlog2_codes_from_int(n, variant), variant)
    assert torch.equal(d_shift.double(), d_float)


def test_input_is_floor_of_x_times_m_clamped():
    x = torch.tensor([0.0, 1e-9, 0.5, 0.99999, 1.0, 1.5])
    assert bitlog2_input(x, "half17").tolist() == [0, 0, 192, 383, 383, 383]


def _brute_force_delta(x: torch.Tensor, variant: str) -> int:
    m, _ = BITLOG2_VARIANTS[variant]
    d = bitlog2_levels(bitlog2_codes_from_int(bitlog2_input(x, variant), variant), variant).double()
    deltas = torch.arange(max(1, int(d.max())), m, dtype=torch.float64)
    xd = x.double().flatten()
    best, best_loss = None, None
    for chunk in torch.split(deltas, 4096):
        loss = ((xd[None, :] - d.flatten()[None, :] / chunk[:, None]) ** 2).mean(dim=1)
        i = int(loss.argmin())
        if best_loss is None or loss[i] < best_loss:
            best, best_loss = int(chunk[i]), loss[i]
    return best


@pytest.mark.parametrize("variant", list(BITLOG2_VARIANTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_delta_equals_brute_force(variant, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.softmax(torch.randn(6, 9, generator=g) * (1 + 2 * seed), dim=-1)
    obs = BitLog2Observer(QuantSpec(bits=4, scheme="bitlog2", bitlog2_variant=variant))
    obs.update(x)
    assert obs.delta() == _brute_force_delta(x, variant)


def test_streamed_delta_equals_one_shot():
    spec = QuantSpec(bits=4, scheme="bitlog2", bitlog2_variant="half17")
    g = torch.Generator().manual_seed(3)
    xs = [torch.softmax(torch.randn(4, 4, 20, 20, generator=g) * 2, -1) for _ in range(5)]
    a, b, whole = BitLog2Observer(spec), BitLog2Observer(spec), BitLog2Observer(spec)
    for x in xs[:2]:
        a.update(x)
    for x in xs[2:]:
        b.update(x)
    whole.update(torch.cat(xs))
    assert a.merge(b).delta() == whole.delta() == _brute_force_delta(torch.cat(xs), "half17")


def test_fake_quantize_outputs_levels_over_delta():
    spec = QuantSpec(bits=4, scheme="bitlog2", bitlog2_variant="half16")
    x = torch.softmax(torch.randn(8, 30), -1)
    y = fake_quantize(x, torch.tensor(200.0), torch.tensor(0.0), spec)
    assert y.unique().numel() <= 16
    assert torch.equal(y * 200, (y * 200).round())


def test_bitlog2_spec_validation():
    with pytest.raises(ConfigError, match="bitlog2_variant must be one of"):
        QuantSpec(bits=4, scheme="bitlog2", bitlog2_variant="half18")
    with pytest.raises(ConfigError, match="4-bit"):
        QuantSpec(bits=6, scheme="bitlog2", bitlog2_variant="half17")


@pytest.mark.parametrize("variant", list(BITLOG2_VARIANTS))
def test_compare_form_used_for_onnx_equals_shift_codes_on_all_inputs(variant):
    """The ONNX export computes the code as #levels <= n (``bitlog2_codes_by_compare``, on the
    float32 levels it exports); it equals the MSB/shift code for every n in [0, M)."""
    m, _ = BITLOG2_VARIANTS[variant]
    n = torch.arange(0, m, dtype=torch.int32)
    by_compare = bitlog2_codes_by_compare(n, bitlog2_compare_levels(variant))
    assert torch.equal(by_compare.to(torch.int32), bitlog2_codes_from_int(n, variant))


@pytest.mark.parametrize("variant", list(BITLOG2_VARIANTS))
def test_shift_decoding_inverts_the_code(variant):
    """``bitlog2_shifts`` gives back the (k, h) the code was made from: for every n in [1, M),
    k = MSB index of n and (half variants) h = the bit below it, except that c = 1 is D = 1."""
    m, half = BITLOG2_VARIANTS[variant]
    n = torch.arange(1, m, dtype=torch.int32)
    c = bitlog2_codes_from_int(n, variant)
    k, h = bitlog2_shifts(c, variant)
    msb = torch.tensor([int(v).bit_length() - 1 for v in n])
    below = torch.tensor([(int(v) >> (b - 1)) & 1 if b >= 1 else 0 for v, b in zip(n, msb.tolist())])
    assert torch.equal(k.long(), msb)
    assert torch.equal(h.long(), below if half else torch.zeros_like(below))
    assert torch.equal(bitlog2_levels(c, variant).long(), (1 << msb) + h.long() * (1 << (msb - 1).clamp(min=0)))
    assert bitlog2_levels(torch.zeros(3, dtype=torch.int32), variant).tolist() == [0, 0, 0]
