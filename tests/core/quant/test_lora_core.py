"""The quantizer-core side of OQFV/LoftQ/QLoRA (docs/methods.md, OQFV): the μ ± 2σ min-max weight quantizer
(``SigmaClip`` + ``zero_point_domain="float"``), the rank-r SVD split, LoftQ's alternation and
``LoRALinear``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxquant.core.errors import ConfigError
from fxquant.core.quant import (
    LoRALinear,
    PerTensor,
    QuantSpec,
    SigmaClip,
    estimator_from_name,
    fake_quantize,
    loftq,
    low_rank_split,
)
from fxquant.core.quant.observers import exact_distribution_qparams

SPEC2 = QuantSpec(bits=2, granularity=PerTensor(), estimator=SigmaClip(2.0), zero_point_domain="float")


def q_exact(spec: QuantSpec):
    def q(w):
        return fake_quantize(w, *exact_distribution_qparams(w, spec, weight=True), spec)
    return q


def test_two_bit_quantizer_has_four_levels_and_honours_the_clipping():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * 0.03 + 0.002
    w[0, :5] = torch.tensor([0.5, -0.4, 0.3, 0.25, -0.3])  # outliers far beyond 2σ
    out = q_exact(SPEC2)(w)
    levels = torch.unique(out)
    mu, sd = w.mean(), w.std()
    lo, hi = max(w.min(), mu - 2 * sd), min(w.max(), mu + 2 * sd)
    assert levels.numel() == 4
    assert levels[0].item() == pytest.approx(lo.item(), abs=1e-7) and levels[-1].item() == pytest.approx(hi.item(), abs=1e-7)
    assert torch.allclose(levels.diff(), (hi - lo).expand(3) / 3, atol=1e-7)  # evenly spaced on [lo, hi]
    # the reference rule (OQFV utils_quant.quant_uniform: clip, then round on the min-max grid)
    clipped = w.clamp(lo, hi)
    ref = torch.round((clipped - lo) / (hi - lo) * 3) / 3 * (hi - lo) + lo
    assert (out - ref).abs().max().item() < 1e-6


def test_float_zero_point_domain_is_validated_and_round_trips():
    assert QuantSpec.from_dict(SPEC2.to_dict()) == SPEC2
    assert estimator_from_name("sigma:3") == SigmaClip(3.0)
    with pytest.raises(ConfigError, match="zero_point_domain='float' applies to uniform asymmetric"):
        QuantSpec(bits=4, symmetric=True, zero_point_domain="float")
    with pytest.raises(ConfigError, match="SigmaClip.num_std must be > 0"):
        SigmaClip(0.0)


def test_sigma_clip_of_a_histogram_matches_the_exact_tensor():
    """Activations stream as histograms: the mean and std from bin centres are close to exact."""
    from fxquant.core.quant.observers import Observer

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, generator=g)
    spec = QuantSpec(bits=4, estimator=SigmaClip(2.0), zero_point_domain="float")
    obs = Observer(spec)
    for part in x.split(1024):
        obs.update(part)
    s_hist, z_hist = obs.compute_qparams()
    s_exact, z_exact = exact_distribution_qparams(x, spec, weight=False)
    assert s_hist.item() == pytest.approx(s_exact.item(), rel=2e-3)
    assert z_hist.item() == pytest.approx(z_exact.item(), rel=2e-3)


def test_low_rank_split_equals_peft_loftq_decomposition():
    """fxquant's ``(B, A)`` = peft's ``_low_rank_decomposition`` ``(L, R)`` (LoftQ's SVD step)."""
    peft_loftq = pytest.importorskip("peft.utils.loftq_utils")
    g = torch.Generator().manual_seed(1)
    res = torch.randn(48, 80, generator=g, dtype=torch.float64)
    b, a = low_rank_split(res, 8)
    ref = peft_loftq._low_rank_decomposition(res, reduced_rank=8)
    assert torch.allclose(b, ref["L"], atol=1e-10) and torch.allclose(a, ref["R"], atol=1e-10)


def test_one_loftq_step_equals_peft_step_with_the_same_quantizer():
    """One LoftQ step on a real layer: quantize the weight with OQFV's 2-bit uniform quantizer, then
    peft's decomposition of ``W − Q``. (peft's ``loftq_init`` itself needs bitsandbytes + CUDA and
    quantizes to NF4/int8 only, so the quantizer is matched by passing the same one to both.)"""
    peft_loftq = pytest.importorskip("peft.utils.loftq_utils")
    from fxquant.core.models import load_embedded

    w = load_embedded().model.blocks[0].attn.qkv.weight.detach().float()
    quant = q_exact(SPEC2)
    base, b, a, _ = loftq(w, quant, rank=32, iters=1)
    q = quant(w)
    ref = peft_loftq._low_rank_decomposition(w - q, reduced_rank=32)
    assert torch.equal(base, w)
    assert (b @ a - ref["L"] @ ref["R"]).abs().max().item() < 1e-5


def test_full_rank_adapter_reproduces_the_float_layer_whatever_the_quantizer():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 16, generator=g)
    for iters in (1, 3):
        base, b, a, errs = loftq(w, q_exact(SPEC2), rank=16, iters=iters)
        q = q_exact(SPEC2)(base)
        assert ((w - q - b @ a).norm() / w.norm()).item() < 1e-5
        assert errs[-1] < 1e-5


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(8, 40), cols=st.integers(8, 40), rank=st.integers(1, 6),
       bits=st.integers(2, 4))
def test_loftq_error_cannot_increase_on_a_fixed_grid(seed, rows, cols, rank, bits):
    """With the quantizer's grid fixed (the range of W), each step is exact block coordinate descent
    (nearest grid point, then Eckart–Young), so ‖W − Q − BA‖ is non-increasing."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(1, cols, generator=g)
    spec = SPEC2.with_(bits=bits)
    s, z = exact_distribution_qparams(w, spec, weight=True)
    _, _, _, errs = loftq(w, lambda t: fake_quantize(t, s, z, spec), rank=rank, iters=5)
    for before, after in zip(errs, errs[1:]):
        assert after <= before * (1 + 1e-5) + 1e-7


def test_lora_linear_is_base_plus_scaled_low_rank_and_freezes_the_layer():
    torch.manual_seed(0)
    lin = nn.Linear(12, 20)
    lora = LoRALinear.from_linear(lin, 4, SPEC2, scaling=0.5, label="l")
    lora.weight_fake_quant.calibrate_from(lora.weight)
    lora.weight_fake_quant.fake_quant_enabled = True
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(3, 5, 12)
    expected = x @ lora.merged_weight().T + lin.bias
    assert torch.allclose(lora(x), expected, atol=1e-5)
    with torch.no_grad():  # inference runs one GEMM with the merged weight
        assert torch.allclose(lora(x), expected, atol=1e-5)
    assert not lora.weight.requires_grad and not lora.bias.requires_grad
    assert lora.lora_A.weight.requires_grad and lora.lora_B.weight.requires_grad
    fresh = LoRALinear.from_linear(lin, 4, None)
    assert torch.equal(fresh(x), lin(x))  # B = 0, no quantizer: the float layer
    with pytest.raises(ValueError, match="LoRA rank 13 of 'l' must be in 1..12"):
        LoRALinear.from_linear(lin, 13, SPEC2, label="l")
