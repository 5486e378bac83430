"""Quantizer-core pieces of APHQ-ViT stages (B) and (C): the JointGrid estimator, AdaRound's
rounding, QDrop and learned activation scales in ``FakeQuantize``."""

from __future__ import annotations

import pytest
import torch

from fxquant.core.errors import CalibrationError, ConfigError
from fxquant.core.quant import (
    AdaRoundWeight,
    FakeQuantize,
    JointGrid,
    MinMax,
    PctMSE,
    PerAxis,
    QuantSpec,
    adaround_fake_quantize,
    adaround_init,
    adaround_regularizer,
    estimator_from_name,
    fake_quantize,
    rectified_sigmoid,
)
from fxquant.core.quant.observers import exact_distribution_qparams
from fxquant.core.quant.range_search import Distribution, _candidates


def _mse(w, spec):
    s, z = exact_distribution_qparams(w, spec, weight=True)
    return ((fake_quantize(w, s, z, spec) - w) ** 2).mean(dim=1), s, z


# ------------------------------------------------------------------------------ JointGrid


def test_joint_grid_candidates_are_integer_zero_points_centred_on_half_range():
    x = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    dist = Distribution.exact(x)
    from fxquant.core.quant import choose_qparams

    for bits, n_zp in ((4, 16), (3, 8), (2, 4)):
        spec = QuantSpec(bits=bits, estimator=JointGrid())
        cands = _candidates(dist, spec)
        assert len(cands) == 1 + (128 // n_zp) * n_zp  # the "+1" min-max pair, then scales × zero points
        params = [choose_qparams(lo, hi, spec) for lo, hi in cands[1:]]
        zps = sorted({float(z) for _, z in params})
        assert zps == [float(2 ** (bits - 1) - n_zp // 2 + j) for j in range(n_zp)]
        widths = sorted({round(float(s) * (2**bits - 1), 4) for s, _ in params})
        lo_w = float(torch.quantile(x.double(), 0.9) - torch.quantile(x.double(), 0.1))
        assert widths[0] == pytest.approx(lo_w, abs=1e-3) and widths[-1] == pytest.approx(float(x.max() - x.min()), abs=1e-3)


def test_joint_grid_is_never_worse_than_min_max_and_beats_it_on_heavy_tails():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 256, generator=g) * torch.rand(16, 1, generator=g)
    w[:, 0] *= 8  # one outlier per row
    grid, _, z = _mse(w, QuantSpec(bits=4, granularity=PerAxis(0), estimator=JointGrid()))
    minmax, _, _ = _mse(w, QuantSpec(bits=4, granularity=PerAxis(0), estimator=MinMax()))
    assert (grid <= minmax + 1e-12).all()
    assert grid.mean() < 0.9 * minmax.mean()  # measured 0.87
    assert torch.equal(z, z.round())


def test_joint_grid_symmetric_and_names():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    _, _, z = _mse(w, QuantSpec(bits=4, symmetric=True, granularity=PerAxis(0), estimator=JointGrid()))
    assert (z == 0).all()
    assert estimator_from_name("grid") == JointGrid() and estimator_from_name("grid:64") == JointGrid(64)
    assert JointGrid.from_dict(JointGrid(64).to_dict()) == JointGrid(64)
    with pytest.raises(ConfigError, match="JointGrid needs 0 <= lo_q < hi_q <= 1"):
        JointGrid(lo_q=0.9, hi_q=0.1)
    with pytest.raises(ConfigError, match="scheme 'log_sqrt2' needs another estimator"):
        QuantSpec(bits=4, scheme="log_sqrt2", estimator=JointGrid())


# ------------------------------------------------------------------------------ AdaRound


def _weight_quantizer(w, bits=4):
    fq = FakeQuantize(QuantSpec(bits=bits, granularity=PerAxis(0), estimator=PctMSE()), weight=True, label="w")
    fq.calibrate_from(w)
    fq.fake_quant_enabled = True
    return fq


def test_adaround_starts_at_round_to_nearest_and_the_exact_value():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    fq = _weight_quantizer(w)
    alpha = adaround_init(w, fq.scale)
    frac = w / fq.scale - torch.floor(w / fq.scale)
    assert torch.allclose(rectified_sigmoid(alpha), frac, atol=1e-5)
    hard = adaround_fake_quantize(w, fq.scale, fq.zero_point, fq.spec, alpha, hard=True)
    away_from_ties = (frac - 0.5).abs() > 1e-4
    assert torch.equal(hard[away_from_ties], fq(w)[away_from_ties])
    soft = adaround_fake_quantize(w, fq.scale, fq.zero_point, fq.spec, alpha)
    pos = w / fq.scale + fq.zero_point
    inside = (pos >= 0) & (pos <= 15)  # not clipped by the code range
    assert torch.allclose(soft[inside], w[inside], atol=1e-5)


def test_hard_rounded_weights_lie_on_the_grid_whatever_alpha():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    fq = _weight_quantizer(w, bits=3)
    ar = AdaRoundWeight(fq, w)
    with torch.no_grad():
        ar.alpha.copy_(torch.randn(ar.alpha.shape, generator=torch.Generator().manual_seed(5)) * 3)
    hard = ar.hardened(w)
    assert torch.equal(fq(hard), hard)  # the ordinary quantizer reproduces them exactly
    codes = hard / fq.scale + fq.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    codes = codes.round()
    assert codes.min() >= 0 and codes.max() <= 7
    # every weight is rounded down or up, never further
    assert (((hard - w).abs() <= fq.scale * 1.0001) | (codes == 0) | (codes == 7)).all()


def test_adaround_regularizer_and_gradient():
    alpha = torch.tensor([-20.0, 20.0, 0.0], requires_grad=True)
    reg = adaround_regularizer(alpha, beta=2.0)
    assert reg.item() == pytest.approx(1.0, abs=1e-6)  # only the undecided middle element costs
    reg.backward()
    # h saturates at 0/1 (no pull left), and at h = 0.5 the β = 2 term is flat
    assert alpha.grad[2] == 0 and alpha.grad[:2].abs().max() == 0
    w = torch.randn(4, 8)
    ar = AdaRoundWeight(_weight_quantizer(w), w)
    ar(w).sum().backward()
    assert ar.alpha.grad is not None and ar.alpha.grad.abs().sum() > 0
    with pytest.raises(CalibrationError, match="needs the calibrated weight quantizer 'x'"):
        AdaRoundWeight(FakeQuantize(QuantSpec(bits=4), weight=True, label="x"), w)


# ------------------------------------------------------------------------------ QDrop and learned scales


def _act_quantizer(x, bits=4):
    fq = FakeQuantize(QuantSpec(bits=bits), label="a")
    fq.set_qparams(torch.tensor(0.1), torch.tensor(8.0))
    fq.fake_quant_enabled = True
    return fq


def test_qdrop_mixes_quantized_and_float_values_reproducibly():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(6))
    fq = _act_quantizer(x)
    xq = fq(x)
    fq.drop_prob = 1.0
    assert torch.equal(fq(x), xq)
    fq.drop_prob = 0.5
    torch.manual_seed(0)
    a = fq(x)
    torch.manual_seed(0)
    assert torch.equal(a, fq(x))
    from_q = (a == xq) & (xq != x)
    from_fp = (a == x) & (xq != x)
    assert (from_q | from_fp | (xq == x)).all()
    assert 0.4 < from_q.float().mean() / (from_q | from_fp).float().mean() < 0.6


def test_a_scale_that_requires_grad_gets_the_lsq_gradient():
    x = torch.randn(256, generator=torch.Generator().manual_seed(7))
    fq = _act_quantizer(x)
    fq.scale.requires_grad_(True)
    fq(x).pow(2).sum().backward()
    assert fq.scale.grad is not None and fq.scale.grad.abs() > 0
