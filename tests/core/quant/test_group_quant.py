"""Group quantization in the quantizer core (IGQ-ViT, docs/methods.md, IGQ-ViT): the invariants G = 1 is
layer-wise, G = C is per-channel, channel permutations commute with a grouped Linear; the
assignment rule; k-means group ranges; spec validation with pinned messages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxquant.core.errors import ConfigError
from fxquant.core.quant import (
    InstanceGroups,
    MinMax,
    PctMSE,
    PerAxis,
    PerGroup,
    PerTensor,
    QuantSpec,
    choose_qparams,
    fake_quantize,
    instance_groups,
)
from fxquant.core.quant.observers import GroupRangeObserver
from fxquant.core.quant.range_search import kmeans_ranges
from fxquant.core.testing import calibrated_quantizer


def _acts(seed: int = 0, b: int = 3, n: int = 7, c: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, c)[torch.randperm(c, generator=g)]
    return torch.randn(b, n, c, generator=g) * scales + 0.3 * torch.randn(c, generator=g)


def test_one_instance_group_is_layer_wise():
    x = _acts()
    scale, zp = choose_qparams(x.min(), x.max(), QuantSpec(bits=4))
    one = QuantSpec(bits=4, granularity=InstanceGroups(1), estimator=MinMax())
    assert torch.equal(fake_quantize(x, scale.reshape(1), zp.reshape(1), one), fake_quantize(x, scale, zp, QuantSpec(bits=4)))


def test_one_instance_group_per_channel_is_per_channel():
    """G = C groups with each channel's own range: every channel picks its own quantizer (one
    instance; channel scales a factor 1.5 apart, so no narrower group covers a channel)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 50, 12, generator=g) * (1.5 ** torch.arange(12.0))[torch.randperm(12, generator=g)]
    per_channel = QuantSpec(bits=4, granularity=PerAxis(-1))
    scale, zp = choose_qparams(x.amin(dim=(0, 1)), x.amax(dim=(0, 1)), per_channel)
    groups = QuantSpec(bits=4, granularity=InstanceGroups(x.shape[-1]), estimator=MinMax())
    want = fake_quantize(x, scale.reshape(1, 1, -1), zp.reshape(1, 1, -1), per_channel)
    # one instance: its channel ranges are exactly the per-channel ranges
    assert torch.equal(fake_quantize(x, scale, zp, groups), want)
    assert torch.equal(instance_groups(x, scale, zp, groups).flatten(), torch.arange(x.shape[-1]))


@pytest.mark.parametrize("g", [1, 3, 12])
def test_contiguous_groups_one_and_c_are_per_tensor_and_per_channel(g):
    x = _acts()
    got = calibrated_quantizer(QuantSpec(bits=4, granularity=PerGroup(12 // g)), x)
    limit = PerTensor() if g == 1 else PerAxis(-1) if g == 12 else PerGroup(12 // g)
    ref = calibrated_quantizer(QuantSpec(bits=4, granularity=limit), x)
    assert torch.equal(got(x), ref(x))


def test_contiguous_groups_must_divide_channels():
    with pytest.raises(ConfigError, match=r"PerGroup\(group_size=5\) does not divide dimension 2 of size 12"):
        PerGroup(5).param_shape((2, 3, 12), weight=False)


@pytest.mark.parametrize("num_groups", [1, 4, 12])
def test_permuting_channels_with_weight_columns_leaves_output_unchanged(num_groups):
    x = _acts(seed=1)
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    fq = calibrated_quantizer(QuantSpec(bits=4, granularity=InstanceGroups(num_groups), estimator=MinMax()), x)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    y = F.linear(fq(x), w)
    y_perm = F.linear(fq(x[..., perm]), w[:, perm])
    torch.testing.assert_close(y_perm, y, rtol=1e-6, atol=1e-6)


def test_assignment_prefers_the_narrowest_covering_group():
    spec = QuantSpec(bits=4, granularity=InstanceGroups(2), estimator=MinMax())
    scale, zp = choose_qparams(torch.tensor([-0.5, -3.0]), torch.tensor([0.6, 3.0]), spec)
    x = torch.tensor([[[-0.1, 0.2], [2.9, 0.5]]])  # channel 0 spans [-0.1, 2.9], channel 1 [0.2, 0.5]
    assert instance_groups(x, scale, zp, spec).flatten().tolist() == [1, 0]
    # not covered by any group: the one that clips least
    assert instance_groups(torch.tensor([[[9.0], [-9.0]]]), scale, zp, spec).flatten().tolist() == [1]


def test_attention_rows_are_grouped_per_image_and_head():
    a = torch.softmax(torch.randn(2, 3, 5, 5) * 3, dim=-1)
    spec = QuantSpec(bits=4, granularity=InstanceGroups(4, axis=-2, instance_dims=2), estimator=MinMax())
    fq = calibrated_quantizer(spec, a)
    idx = instance_groups(a, fq.scale, fq.zero_point, spec)
    assert idx.shape == (2, 3, 5, 1)
    assert fq.scale.shape == (4,)
    assert (fq(a) - a).abs().max() <= fq.scale.max() / 2 + 1e-6


def test_kmeans_ranges_deterministic_and_separate_outliers():
    g = torch.Generator().manual_seed(0)
    bulk = torch.stack([-torch.rand(200, generator=g), torch.rand(200, generator=g)], 1)
    outl = torch.stack([-40 - torch.rand(10, generator=g), 40 + torch.rand(10, generator=g)], 1)
    pts = torch.cat([bulk, outl])
    lo, hi = kmeans_ranges(pts, 3, estimator=MinMax())
    lo2, hi2 = kmeans_ranges(pts, 3, estimator=MinMax())
    assert torch.equal(lo, lo2) and torch.equal(hi, hi2)
    assert (hi - lo).argsort().tolist() == [0, 1, 2]  # narrowest first
    assert hi[-1] == outl[:, 1].max() and lo[-1] == outl[:, 0].min()  # the outliers' own envelope
    assert hi[:2].max() <= 1.0


def test_group_observer_merges_exactly():
    spec = QuantSpec(bits=4, granularity=InstanceGroups(3), estimator=MinMax())
    x1, x2 = _acts(seed=4), _acts(seed=5)
    whole = GroupRangeObserver(spec)
    whole.update(torch.cat([x1, x2]))
    a, b = GroupRangeObserver(spec), GroupRangeObserver(spec)
    a.update(x1)
    b.update(x2)
    merged = a.merge(b)
    for t, u in zip(whole.compute_qparams(), merged.compute_qparams()):
        assert torch.equal(t, u)
    assert merged.state_bytes() == 8 * 2 * 3 * 12  # (min, max) float32 per channel and image


def test_instance_groups_spec_validation_and_json():
    spec = QuantSpec(bits=4, granularity=InstanceGroups(8, axis=-2, instance_dims=2), estimator=MinMax())
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert "igroups8@-2" in spec.short()
    with pytest.raises(ConfigError, match="InstanceGroups quantizers are uniform"):
        QuantSpec(bits=4, scheme="log2", granularity=InstanceGroups(8), estimator=MinMax())
    with pytest.raises(ConfigError, match="then MinMax \\(envelope\\) or Percentile\\(p\\)"):
        QuantSpec(bits=4, granularity=InstanceGroups(8), estimator=PctMSE())
    with pytest.raises(ConfigError, match="groups activation channels per input instance; weights use"):
        InstanceGroups(4).param_shape((3, 4), weight=True)
    with pytest.raises(ConfigError, match="num_groups must be >= 1"):
        InstanceGroups(0)
