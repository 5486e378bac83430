"""Properties of the quantizer primitives (hypothesis) and their exact rules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.core.errors import ConfigError
from fxquant.core.quant import (
    PerAxis,
    PerGroup,
    PerTensor,
    QuantSpec,
    choose_qparams,
    dequantize,
    expand_params,
    fake_quantize,
    grid_values,
    log_step,
    quantize,
    round_ste,
)
from fxquant.core.quant.logcodes import (
    log_code_of_count,
    log_count_by_compare,
    log_level_table,
    log_shifts,
    log_thresholds,
)

bits_st = st.integers(2, 8)
scheme_st = st.sampled_from(["uniform", "log2", "log_sqrt2"])
floats = st.floats(-50, 50, allow_nan=False, width=32)


def _spec(bits, scheme, symmetric):
    return QuantSpec(bits=bits, scheme=scheme, symmetric=symmetric and scheme == "uniform")


@st.composite
def quantizer_case(draw):
    bits = draw(bits_st)
    scheme = draw(scheme_st)
    symmetric = draw(st.booleans())
    spec = _spec(bits, scheme, symmetric)
    lo = draw(st.floats(-20, 0, allow_nan=False, width=32))
    hi = draw(st.floats(0.0625, 20, allow_nan=False, width=32))
    scale, zp = choose_qparams(torch.tensor(lo), torch.tensor(hi), spec)
    x = torch.tensor(draw(st.lists(floats, min_size=1, max_size=64)), dtype=torch.float32)
    if scheme != "uniform":
        x = x.abs()
    return spec, scale, zp, x


@settings(max_examples=200, deadline=None)
@given(quantizer_case())
def test_codes_in_range_and_outputs_on_grid(case):
    spec, scale, zp, x = case
    q = quantize(x, scale, zp, spec)
    assert torch.equal(q, q.round())
    if spec.is_log:
        assert ((q >= 0) & (q <= spec.zero_code)).all()
    else:
        assert ((q >= spec.qmin) & (q <= spec.qmax)).all()
    grid = grid_values(scale.item(), zp.item(), spec)
    xq = fake_quantize(x, scale, zp, spec)
    dist = (xq[:, None] - grid[None, :]).abs().min(dim=1).values
    assert (dist <= 1e-6 * grid.abs().max()).all()


@settings(max_examples=200, deadline=None)
@given(quantizer_case())
def test_fake_quantize_is_idempotent(case):
    spec, scale, zp, x = case
    once = fake_quantize(x, scale, zp, spec)
    assert torch.equal(fake_quantize(once, scale, zp, spec), once)


@settings(max_examples=100, deadline=None)
@given(bits_st, scheme_st, st.booleans(), st.floats(0.0625, 10, allow_nan=False, width=32))
def test_representable_values_round_trip_exactly(bits, scheme, symmetric, hi):
    spec = _spec(bits, scheme, symmetric)
    scale, zp = choose_qparams(torch.tensor(-hi / 3), torch.tensor(hi), spec)
    codes = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float32)
    vals = dequantize(codes, scale, zp, spec)
    if spec.is_log:  # 8-bit log2 reaches 2^-255, below float32's range: those codes underflow to 0
        keep = vals >= torch.finfo(torch.float32).tiny
        codes, vals = codes[keep], vals[keep]
    assert torch.equal(quantize(vals, scale, zp, spec), codes)


@settings(max_examples=200, deadline=None)
@given(quantizer_case())
def test_monotone(case):
    spec, scale, zp, x = case
    xs = x.sort().values
    assert (fake_quantize(xs, scale, zp, spec).diff() >= 0).all()


@pytest.mark.parametrize("bits", range(2, 9))
def test_uniform_level_counts(bits):
    asym = QuantSpec(bits=bits)
    sym = QuantSpec(bits=bits, symmetric=True)
    s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), asym)
    assert grid_values(s.item(), z.item(), asym).numel() == 2**bits
    s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), sym)
    assert z.item() == 0 and math.isclose(s.item(), 3.0 / (2 ** (bits - 1) - 1), rel_tol=1e-6)


def test_asymmetric_formula_matches_methods_doc():
    spec = QuantSpec(bits=4, zero_in_range=False)
    lo, hi = torch.tensor(-0.7), torch.tensor(2.3)
    s, z = choose_qparams(lo, hi, spec)
    assert torch.equal(s, (hi - lo) / 15)  # s = (hi - lo) / (2^b - 1)
    assert torch.equal(z, torch.round(-lo / s))  # z = round(-lo / s)
    x = torch.tensor([-0.7, 0.0, 1.0, 2.3, 9.0])
    q = torch.clamp(torch.round(x / s) + z, 0, 15)
    assert torch.equal(quantize(x, s, z, spec), q)


def test_zero_width_range_does_not_divide_by_zero():
    spec = QuantSpec(bits=8, zero_in_range=False)
    s, z = choose_qparams(torch.tensor(0.0), torch.tensor(0.0), spec)
    assert s.item() > 0 and torch.isfinite(z)
    assert torch.equal(fake_quantize(torch.zeros(4), s, z, spec), torch.zeros(4))


def test_zero_is_exactly_representable_with_zero_in_range():
    spec = QuantSpec(bits=4)
    s, z = choose_qparams(torch.tensor(0.3), torch.tensor(2.0), spec)
    assert fake_quantize(torch.tensor([0.0]), s, z, spec).item() == 0.0


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_log_sqrt2_levels(bits):
    spec = QuantSpec(bits=bits, scheme="log_sqrt2")
    delta = 0.75
    vals = grid_values(delta, 0.0, spec)
    assert vals.numel() == 2**bits + 1  # 2^b codes + the special zero (4-bit: 17)
    expected = sorted([0.0] + [delta * 2 ** (-c / 2) for c in range(2**bits)])
    assert torch.allclose(vals, torch.tensor(expected), rtol=1e-6, atol=0)
    x = torch.tensor([0.0, delta, 5 * delta, delta * 2 ** (-(2**bits)), -1.0])
    y = fake_quantize(x, torch.tensor(delta), torch.tensor(0.0), spec)
    assert y[0] == 0 and y[1] == delta and y[2] == delta  # 0 -> 0, above Δ clips to Δ
    assert y[3] == 0 and y[4] == 0  # below the smallest level and negatives -> 0


def test_log2_levels():
    spec = QuantSpec(bits=3, scheme="log2")
    vals = grid_values(1.0, 0.0, spec)
    assert torch.equal(vals, torch.tensor([0.0] + [2.0**-c for c in range(7, -1, -1)]))


@pytest.mark.parametrize("bits", [1, 9, 0, 16])
def test_bits_outside_2_to_8_rejected(bits):
    with pytest.raises(ConfigError, match=r"bits=.*2\.\.8"):
        QuantSpec(bits=bits)


def test_symmetric_log_rejected():
    with pytest.raises(ConfigError, match="symmetric"):
        QuantSpec(scheme="log_sqrt2", symmetric=True)


def test_granularity_param_shapes():
    assert PerTensor().param_shape((4, 5, 6), weight=False) == (1, 1, 1)
    assert PerAxis(-1).param_shape((4, 5, 6), weight=False) == (1, 1, 6)
    assert PerAxis(0).param_shape((8, 6), weight=True) == (8, 1)
    assert PerGroup(2).param_shape((4, 5, 6), weight=False) == (1, 1, 3)
    assert PerGroup(3).param_shape((8, 6), weight=True) == (8, 2)
    with pytest.raises(ConfigError, match="does not divide"):
        PerGroup(4).param_shape((8, 6), weight=True)


def test_per_group_equals_per_tensor_per_group_slice():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    spec = QuantSpec(bits=4, granularity=PerGroup(4))
    scale = torch.tensor([0.1, 0.3]).view(1, 1, 2)
    zp = torch.tensor([7.0, 8.0]).view(1, 1, 2)
    y = fake_quantize(x, scale, zp, spec)
    for g in range(2):
        part = x[..., 4 * g:4 * g + 4]
        ref = fake_quantize(part, scale[..., g:g + 1], zp[..., g:g + 1], QuantSpec(bits=4))
        assert torch.equal(y[..., 4 * g:4 * g + 4], ref)
    assert expand_params(scale, x.shape).shape == (1, 1, 8)


def test_straight_through_gradient():
    x = torch.tensor([0.12, 0.5, 5.0], requires_grad=True)
    spec = QuantSpec(bits=4)
    s, z = choose_qparams(torch.tensor(0.0), torch.tensor(1.0), spec)
    fake_quantize(x, s, z, spec, ste=True).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0]))  # clipped input gets no gradient
    r = torch.tensor([0.4, 1.6], requires_grad=True)
    round_ste(r).sum().backward()
    assert torch.equal(r.grad, torch.ones(2))


def test_spec_json_round_trip():
    from fxquant.core.quant import OMSE, PctMSE

    for spec in [QuantSpec(bits=4, granularity=PerGroup(32), estimator=PctMSE()),
                 QuantSpec(bits=6, scheme="log_sqrt2", estimator=OMSE(50)), QuantSpec(symmetric=True, granularity=PerAxis(0))]:
        assert QuantSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("scheme,bits", [("log_sqrt2", 4), ("log_sqrt2", 6), ("log2", 3), ("log2", 8)])
def test_log_codes_by_midpoints_equal_the_rounding_formula(scheme, bits):
    """c = #{j : r <= T_j} equals clamp(round(-log2 r / t)) wherever r is not within float
    precision of a midpoint (the midpoints are irrational, so no exact ties exist)."""
    spec = QuantSpec(bits=bits, scheme=scheme)
    r = torch.rand(200_000, generator=torch.Generator().manual_seed(bits)) ** 6 * 1.5
    t = log_step(spec)
    c = torch.round(-torch.log2(r.double()) / t)
    formula = torch.where(c >= 2**bits, torch.full_like(c, spec.zero_code), c.clamp(0, spec.qmax))
    got = quantize(r, torch.tensor(1.0), torch.tensor(0.0), spec).double()
    near = ((r[:, None].double() / log_thresholds(spec).double()[None, :] - 1).abs() < 1e-6).any(dim=1)
    assert torch.equal(got[~near], formula[~near])


def test_log_step():
    assert log_step(QuantSpec(bits=4, scheme="log2")) == 1.0
    assert log_step(QuantSpec(bits=4, scheme="log_sqrt2", fit_bits=True)) == 0.5
    for spec in (QuantSpec(bits=4), QuantSpec(bits=4, scheme="bitlog2", bitlog2_variant="half16")):
        with pytest.raises(ValueError, match="log2/log_sqrt2"):
            log_step(spec)


@pytest.mark.parametrize("scheme", ["log2", "log_sqrt2"])
@pytest.mark.parametrize("bits,fit", [(2, False), (4, False), (4, True), (6, False), (8, False)])
def test_log_shifts_decode_the_level_table(scheme, bits, fit):
    """2^(-t·c) = 2^(-s)·√2^h with s = ⌈t·c⌉ for every non-zero code: the integer paths' decoding
    of a log code names the same level as the float32 table fake quantization gathers from."""
    spec = QuantSpec(bits=bits, scheme=scheme, fit_bits=fit)
    c = torch.arange(spec.qmax + 1)
    s, h = log_shifts(c, spec)
    t = log_step(spec)
    assert torch.equal(s, torch.tensor([math.ceil(t * int(ci)) for ci in c])) and torch.equal(h, ((t * c) != s).long())
    level = torch.exp2(-s.double()) * math.sqrt(2.0) ** h.double()
    normal = level >= torch.finfo(torch.float32).tiny  # 8-bit levels leave float32's normal range
    assert normal.sum() >= min(spec.qmax + 1, 126)
    assert torch.allclose(level[normal], log_level_table(spec)[: spec.qmax + 1].double()[normal], rtol=1e-7, atol=0)


@pytest.mark.parametrize("scheme,bits,fit", [("log2", 3, False), ("log_sqrt2", 4, False), ("log_sqrt2", 4, True),
                                             ("log_sqrt2", 8, False)])
def test_log_count_by_compare_equals_bucketize(scheme, bits, fit):
    """The exporter's compare count gives the codes of ``log_codes`` (bucketize), ties included."""
    spec = QuantSpec(bits=bits, scheme=scheme, fit_bits=fit)
    t = log_thresholds(spec)
    r = torch.cat([torch.rand(5000, generator=torch.Generator().manual_seed(bits)) ** 8 * 1.5, t, t.nextafter(t + 1),
                   t.nextafter(torch.zeros_like(t)), torch.tensor([0.0, -1.0, 2.0, float("inf")])])
    by_bucketize = quantize(r, torch.tensor(1.0), torch.tensor(0.0), spec)
    assert torch.equal(log_code_of_count(log_count_by_compare(r, t), spec).to(by_bucketize.dtype), by_bucketize)


# ------------------------------------------------------------- the fast inference form is exact


def _adversarial(scale: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random values plus exact rounding ties (k + 1/2)·s, grid points, clip edges, zeros, outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    flat = x.view(-1)
    s = float(scale.reshape(-1)[0])
    ties = (torch.randint(-300, 300, (flat.numel() // 4,), generator=g).float() + 0.5) * s
    flat[: ties.numel()] = ties
    flat[ties.numel(): 2 * ties.numel()] = torch.randint(-300, 300, (ties.numel(),), generator=g).float() * s
    flat[-8:] = torch.tensor([0.0, -0.0, 1e30, -1e30, 1e-30, 3.4e38, -3.4e38, 1.0])
    return x


@pytest.mark.parametrize("scheme,symmetric", [("uniform", True), ("uniform", False), ("log2", False),
                                              ("log_sqrt2", False), ("bitlog2", False)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inference_fake_quantize_equals_the_reference_composition_bit_for_bit(scheme, bits, symmetric, dtype):
    from fxquant.core.quant.dispatch import fake_quantize_inference

    grans = [PerTensor(), PerAxis(-1), PerGroup(4)] if scheme == "uniform" else [PerTensor()]
    for i, gran in enumerate(grans):
        extra = {"bitlog2_variant": "half16"} if scheme == "bitlog2" else {}
        spec = QuantSpec(bits=bits if scheme != "bitlog2" else 4, scheme=scheme, symmetric=symmetric, granularity=gran,
                         **extra)
        shape = (3, 5, 16)
        pshape = gran.param_shape(shape, weight=False)
        g = torch.Generator().manual_seed(i)
        if scheme == "bitlog2":
            scale, zp = torch.tensor(200.0), torch.tensor(0.0)
            x = torch.rand(shape, generator=g)
            x.view(-1)[:20] = torch.arange(20) / 256.0  # exact level boundaries
        else:
            lo = -torch.rand(pshape, generator=g) * 4 - 0.1
            hi = torch.rand(pshape, generator=g) * 4 + 0.1
            scale, zp = choose_qparams(lo, hi, spec)
            x = _adversarial(scale, shape, i)
            if spec.is_log:
                x = x.abs()
        x = x.to(dtype)
        ref = dequantize(quantize(x, scale, zp, spec), scale, zp, spec)
        fast = fake_quantize_inference(x, scale, zp, spec)
        assert fast.dtype == ref.dtype and torch.equal(fast, ref), (spec.short(), dtype)
        assert torch.equal(fake_quantize(x, scale, zp, spec), ref)


@pytest.mark.parametrize("scheme", ["log2", "log_sqrt2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_log_count_equals_bucketize_on_every_float_near_each_midpoint(scheme, bits):
    from fxquant.core.quant.logcodes import log_count, log_thresholds

    spec = QuantSpec(bits=bits, scheme=scheme)
    t = log_thresholds(spec)
    near = (t.view(torch.int32)[:, None] + torch.arange(-3000, 3001, dtype=torch.int32)[None, :]).view(torch.float32)
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, -1.0, math.inf, -math.inf, math.nan, 1e-45, 3.4e38, 1.0, 2.0])
    r = torch.cat([near.flatten(), torch.rand(100_000, generator=g) * 1.5, torch.rand(1000, generator=g) * 1e-30, special])
    expect = t.numel() - torch.bucketize(r, t.flip(0))
    assert torch.equal(log_count(r, spec), expect)


def test_weight_quantizer_cache_follows_weight_and_parameter_changes():
    from fxquant.core.quant import FakeQuantize

    spec = QuantSpec(bits=4, symmetric=True, granularity=PerAxis(0))
    w = torch.nn.Parameter(torch.randn(6, 8))
    fq = FakeQuantize(spec, weight=True)
    fq.calibrate_from(w.detach())
    fq.fake_quant_enabled = True
    with torch.no_grad():
        first = fq(w)
        assert fq(w) is first  # cached
        assert torch.equal(first, dequantize(quantize(w, fq.scale, fq.zero_point, spec), fq.scale, fq.zero_point, spec))
        w.mul_(2)  # in-place change: recomputed
        assert torch.equal(fq(w), dequantize(quantize(w, fq.scale, fq.zero_point, spec), fq.scale, fq.zero_point, spec))
        fq.set_qparams(fq.scale * 2, fq.zero_point)  # new parameters: recomputed
        assert torch.equal(fq(w), dequantize(quantize(w, fq.scale, fq.zero_point, spec), fq.scale, fq.zero_point, spec))
    out = fq(w)  # with gradients: the straight-through path, never the cache
    assert out.requires_grad and out is not fq._weight_cache[1]


def test_weight_quantizer_under_inference_mode_with_inference_weights():
    from fxquant.core.quant import FakeQuantize

    spec = QuantSpec(bits=8, symmetric=True, granularity=PerAxis(0))
    with torch.inference_mode():
        w = torch.randn(4, 8)  # an inference tensor: no version counter, never cached
        fq = FakeQuantize(spec, weight=True)
        fq.calibrate_from(w)
        fq.fake_quant_enabled = True
        expect = dequantize(quantize(w, fq.scale, fq.zero_point, spec), fq.scale, fq.zero_point, spec)
        assert torch.equal(fq(w), expect) and fq._weight_cache is None
