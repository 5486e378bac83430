"""Dynamic activation quantization in the quantizer core (``Dynamic`` granularity): the invariants
(one token at b bits = per-token min/max quantization exactly; one token = per tensor; an image's codes
do not depend on its batch), the spec's validation and JSON round trip, and the ``FakeQuantize``
states (calibrated from the start, nothing observed, straight-through gradients)."""

from __future__ import annotations

import pytest
import torch

from fxquant.core.errors import ConfigError
from fxquant.core.quant import (
    Dynamic,
    FakeQuantize,
    Granularity,
    MinMax,
    PctMSE,
    PerAxis,
    PerTensor,
    QuantSpec,
    dequantize,
    dynamic_qparams,
    fake_quantize,
    quantize,
)
from fxquant.core.quant.observers import make_observer
from fxquant.core.testing import calibrated_quantizer
from fxquant.kernels.int_linear import per_token_qparams


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    """Activations with a per-token offset and spread, so that every token's range differs."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * (0.2 + torch.rand(*shape[:-1], 1, generator=g) * 3) \
        + torch.randn(*shape[:-1], 1, generator=g)


def _dyn(level: str = "token", group_size: int = 0, bits: int = 4, symmetric: bool = False) -> FakeQuantize:
    fq = FakeQuantize(QuantSpec(bits=bits, symmetric=symmetric, granularity=Dynamic(level, group_size)), label="dyn")
    fq.fake_quant_enabled = True
    return fq


def _minmax_row(row: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min/max uniform quantization of one float32 row, written out from the convention
    (docs/methods.md, Conventions): the range widened to contain 0, ``s = (hi - lo)/(2^b - 1)``,
    ``z = clamp(-round(lo/s), 0, 2^b - 1)``, ``x̂ = (clamp(round(x/s) + z, 0, 2^b - 1) - z)·s``."""
    qmax = 2**bits - 1
    lo = torch.clamp(row.min(), max=0.0)
    hi = torch.clamp(row.max(), min=0.0)
    s = torch.clamp((hi - lo) / float(qmax), min=torch.finfo(torch.float32).tiny)
    z = torch.clamp(-torch.round(lo / s), 0, qmax)
    return (torch.clamp(torch.round(row / s) + z, 0, qmax) - z) * s


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_token_equals_hand_written_minmax_quantization_exactly(bits):
    """All tokens at b bits with one channel group: each token quantized by its own [min, max], bit
    for bit; ``group_size = C`` (one group) is the same function as ``group_size = 0``."""
    x = _x(3, 5, 24, seed=bits)
    with torch.no_grad():
        got = _dyn("token", 0, bits)(x)
        one_group = _dyn("token", 24, bits)(x)
    ref = torch.stack([_minmax_row(row, bits) for row in x.reshape(-1, 24)]).reshape(x.shape)
    assert torch.equal(got, ref)
    assert torch.equal(one_group, ref)
    assert len({tuple(r.unique().tolist()) for r in got.reshape(-1, 24)}) == 15  # every token its own grid


def test_token_groups_equal_per_group_minmax_exactly():
    """Token groups of g channels: each (token, group) block quantized by its own [min, max]."""
    x = _x(2, 4, 32, seed=3)
    with torch.no_grad():
        got = _dyn("token", 8, 4)(x)
    blocks = x.reshape(-1, 8)  # row-major: each token's 4 groups in channel order
    ref = torch.stack([_minmax_row(b, 4) for b in blocks]).reshape(x.shape)
    assert torch.equal(got, ref)
    scale, zp = dynamic_qparams(x, _dyn("token", 8).spec)
    assert scale.shape == zp.shape == (2, 4, 4)


@pytest.mark.parametrize("symmetric", [False, True])
def test_one_token_is_per_tensor(symmetric):
    """A tensor of one token, and level "tensor" on one image, equal the static per-tensor min/max
    quantizer calibrated on that same tensor (the observer's [min, max] through the same rule)."""
    x = _x(1, 1, 40, seed=7)
    static = calibrated_quantizer(QuantSpec(bits=4, symmetric=symmetric, granularity=PerTensor(), estimator=MinMax()), x)
    with torch.no_grad():
        ref = static(x)
        assert torch.equal(_dyn("token", 0, 4, symmetric)(x), ref)
        assert torch.equal(_dyn("tensor", 0, 4, symmetric)(x), ref)
        image = _x(1, 6, 40, seed=8)  # one image of several tokens: level "tensor" is per tensor
        static_image = calibrated_quantizer(static.spec, image)
        assert torch.equal(_dyn("tensor", 0, 4, symmetric)(image), static_image(image))


@pytest.mark.parametrize("level,group_size", [("token", 0), ("token", 8), ("tensor", 0)])
def test_results_do_not_depend_on_the_batch(level, group_size):
    """Each image is quantized from itself alone: a batch quantized at once equals each image
    quantized alone, and replacing the other images changes nothing, bit for bit."""
    fq = _dyn(level, group_size, 4)
    x = _x(5, 7, 16, seed=11)
    with torch.no_grad():
        batch = fq(x)
        for i in range(5):
            assert torch.equal(batch[i:i + 1], fq(x[i:i + 1]))
        other = x.clone()
        other[1:] = _x(4, 7, 16, seed=12) * 10  # very different neighbours
        assert torch.equal(fq(other)[0], batch[0])
    # the parameters are per image (or token, group): the other images are in no reduction
    scale, _ = dynamic_qparams(x, fq.spec)
    assert scale.shape[0] == 5 and len(scale.reshape(5, -1)[:, 0].unique()) == 5


def test_symmetric_per_token_equals_the_kernels_per_token_rule():
    """Symmetric dynamic per-token parameters are the integer kernels' ``per_token_qparams`` (absmax)."""
    x = _x(9, 20, seed=4)
    scale, zp = dynamic_qparams(x, QuantSpec(bits=8, symmetric=True, granularity=Dynamic("token")))
    ref_s, ref_z = per_token_qparams(x, 8)
    assert torch.equal(scale.reshape(-1), ref_s) and torch.equal(zp.reshape(-1), ref_z)


def test_quantize_dequantize_and_straight_through_gradient():
    spec = QuantSpec(bits=4, granularity=Dynamic("token"))
    x = _x(2, 3, 8, seed=2)
    q = quantize(x, torch.empty(0), torch.empty(0), spec)  # parameters from x
    assert q.min() >= 0 and q.max() <= 15 and torch.equal(q, q.round())
    scale, zp = dynamic_qparams(x, spec)
    assert torch.equal(dequantize(q, scale, zp, spec), fake_quantize(x, torch.empty(0), torch.empty(0), spec))
    with pytest.raises(ConfigError, match="parameters of the input"):
        dequantize(q, torch.empty(0), torch.empty(0), spec)
    # STE: the gradient passes through the rounding (d/dx of round(x/s)·s = s⁻¹·s, within fp32 rounding of 1)
    # strictly inside each token's range; a token's min and max sit on the clamp's bounds, where torch.clamp
    # passes no gradient (as for a static quantizer's extreme codes)
    xg = x.clone().requires_grad_(True)
    fq = _dyn("token", 0, 4)
    out = fq(xg)
    out.sum().backward()
    inside = (x > x.amin(-1, keepdim=True)) & (x < x.amax(-1, keepdim=True))
    assert inside.sum() == 36
    assert torch.allclose(xg.grad[inside], torch.ones_like(x)[inside], rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(out.detach(), fq(x))  # the same values as inference


def test_fake_quantize_is_calibrated_from_the_start_and_observes_nothing():
    fq = FakeQuantize(QuantSpec(bits=8, granularity=Dynamic("token")), label="d")
    assert fq.calibrated and fq.scale.numel() == 0
    fq.observer_enabled = True
    fq.fake_quant_enabled = True
    x = _x(2, 3, 8)
    with torch.no_grad():
        y = fq(x)
    assert fq.observer is None and not torch.equal(y, x)
    fq.compute_qparams()  # nothing to fit: a no-op, still no stored parameters
    assert fq.scale.numel() == 0 and "per call" in repr(fq)
    with pytest.raises(ConfigError, match="stores none"):
        fq.set_qparams(torch.ones(1), torch.zeros(1))
    with pytest.raises(ConfigError, match="nothing to observe"):
        make_observer(fq.spec)


def test_spec_validation_errors():
    with pytest.raises(ConfigError, match="MinMax"):
        QuantSpec(bits=4, granularity=Dynamic("token"), estimator=PctMSE())
    with pytest.raises(ConfigError, match="uniform"):
        QuantSpec(bits=4, scheme="log_sqrt2", granularity=Dynamic("token"))
    with pytest.raises(ConfigError, match=r"level must be one of \['tensor', 'token'\]"):
        Dynamic("channel")
    with pytest.raises(ConfigError, match="level='token'"):
        Dynamic("tensor", 8)
    with pytest.raises(ConfigError, match=">= 0"):
        Dynamic("token", -1)
    spec = QuantSpec(bits=4, granularity=Dynamic("token", 5))
    with pytest.raises(ConfigError, match="group_size=5.*24 channels.*divides 24"):
        dynamic_qparams(_x(2, 24), spec)
    # weights are static: refused by the module, the granularity and the annotation
    with pytest.raises(ConfigError, match="activations only"):
        FakeQuantize(spec, weight=True, label="w")
    with pytest.raises(ConfigError, match="weights are static"):
        Dynamic("token").param_shape((4, 8), weight=True)
    from torch import fx

    from fxquant.core.meta import set_weight_spec

    node = fx.Graph().placeholder("x")
    with pytest.raises(ConfigError, match="activations only"):
        set_weight_spec(node, spec)


@pytest.mark.parametrize("granularity", [Dynamic(), Dynamic("token", 32), Dynamic("tensor")])
def test_spec_json_round_trip(granularity):
    spec = QuantSpec(bits=6, symmetric=True, granularity=granularity)
    d = spec.to_dict()
    assert d["granularity"]["type"] == "Dynamic"
    back = QuantSpec.from_dict(d)
    assert back == spec and back.dynamic and Granularity.from_dict(granularity.to_dict()) == granularity
    assert not QuantSpec(granularity=PerAxis(-1)).dynamic
    assert spec.short().startswith("sym6/dyn-")


def test_param_shapes():
    assert Dynamic("token").param_shape((2, 5, 16), weight=False) == (2, 5, 1)
    assert Dynamic("token", 4).param_shape((2, 5, 16), weight=False) == (2, 5, 4)
    assert Dynamic("tensor").param_shape((2, 5, 16), weight=False) == (2, 1, 1)
    assert Dynamic("tensor").param_shape((2, 3, 8, 8), weight=False) == (2, 1, 1, 1)
    for g in (Dynamic("token"), Dynamic("token", 4), Dynamic("tensor")):
        s, z = dynamic_qparams(_x(2, 5, 16), QuantSpec(bits=8, granularity=g))
        assert s.shape == z.shape == g.param_shape((2, 5, 16), weight=False)


def test_metadata_bits_per_element_counts_the_scales_dynamic_ranges_carry():
    """Honest size: a dynamic spec's per-image/token/group scale (fp16) and zero point (8 bits)
    spread over the elements sharing them; nothing for static specs; symmetric specs carry no zero
    point."""
    from fxquant.core.quant import Dynamic, MinMax, PerTensor, QuantSpec

    shape = (2, 65, 128)
    token = QuantSpec(bits=4, granularity=Dynamic("token"), estimator=MinMax())
    assert token.metadata_bits_per_element(shape) == 24 / 128
    assert token.with_(granularity=Dynamic("token", 32)).metadata_bits_per_element(shape) == 24 / 32
    assert token.with_(granularity=Dynamic("tensor")).metadata_bits_per_element(shape) == 24 / (65 * 128)
    assert token.with_(symmetric=True).metadata_bits_per_element(shape) == 16 / 128
    assert token.metadata_bits_per_element(shape, scale_bits=32, zero_point_bits=32) == 64 / 128
    assert QuantSpec(bits=4, granularity=PerTensor()).metadata_bits_per_element(shape) == 0.0


def test_activation_bits_of_a_model_weights_every_quantizer_by_its_elements():
    """``activation_bits``: nominal and with-metadata mean bits over every enabled activation
    quantizer, weighted by element count; equal for static recipes, above nominal by each
    quantizer's metadata share for dynamic ones (checked against a hook count)."""
    import fxquant
    from fxquant.core.evaluate import activation_bits
    from fxquant.core.quant import FakeQuantize
    from fxquant.core.testing import toy_calib, toy_vit

    calib = toy_calib()
    static = fxquant.compile(toy_vit(), recipe="w4a4", calib=calib, progress=False)
    bits = activation_bits(static, calib[0])
    assert bits["nominal"] == bits["with_metadata"] == 4.0
    dyn = fxquant.compile(toy_vit(), recipe="w4a4", a_dynamic="token", calib=calib, progress=False)
    seen = []

    def record(mod, args, _out):
        seen.append((args[0].numel(), mod.spec.metadata_bits_per_element(tuple(args[0].shape))))

    hooks = [m.register_forward_hook(record) for m in dyn.modules() if isinstance(m, FakeQuantize) and not m.weight]
    with torch.no_grad():
        dyn(calib[0])
    for h in hooks:
        h.remove()
    n = sum(k for k, _ in seen)
    expected = 4.0 + sum(k * b for k, b in seen) / n
    got = activation_bits(dyn, calib[0])
    assert got["elements"] == n and got["nominal"] == 4.0
    assert got["with_metadata"] == pytest.approx(expected, abs=1e-4) and got["with_metadata"] > 4.0
    assert activation_bits(toy_vit(), calib[0]) == {}
