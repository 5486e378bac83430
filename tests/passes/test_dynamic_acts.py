"""Dynamic activation quantization through the pipeline (``--set a_dynamic=token``): the uniform
recipe's options, calibration that fits only what is static, per-image results in a whole model,
artifacts, lowering (per-token Linear inputs on the integer GEMM; token groups refused) and the CIFAR
ViT against static W4A4."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant import artifact
from fxquant.core.errors import ConfigError
from fxquant.core.quant import Dynamic, FakeQuantize, MinMax, QuantLinear, code_offset, dynamic_qparams, to_signed_codes
from fxquant.core.testing import toy_calib, toy_vit
from fxquant.kernels.int_linear import int_linear_ref
from fxquant.kernels.lowered import LoweredLinear, LoweredPatchConv


def _act_quantizers(gm) -> list[FakeQuantize]:
    return [m for m in gm.modules() if isinstance(m, FakeQuantize) and not m.weight]


def test_recipe_options_from_strings_and_their_errors():
    r = fxquant.get_recipe("w4a4", a_dynamic="token", a_group_size="8")  # CLI strings (--set)
    spec, layer = r.act_spec(), r.layer_act_spec()
    assert spec.granularity == Dynamic("token") and isinstance(spec.estimator, MinMax) and spec.bits == 4
    assert layer == spec.with_(granularity=Dynamic("token", 8))  # groups on the Linear inputs only
    assert fxquant.get_recipe("w4a4", a_dynamic="token").layer_act_spec() is None
    assert fxquant.get_recipe("w8a8", a_dynamic="tensor").act_spec().granularity == Dynamic("tensor")
    assert not fxquant.get_recipe("w4a4").act_spec().dynamic  # default: static, calibrated
    with pytest.raises(ConfigError, match=r"a_dynamic must be one of \['none', 'tensor', 'token'\], got 'channel'"):
        fxquant.get_recipe("w4a4", a_dynamic="channel")
    with pytest.raises(ConfigError, match="a_group_size=8.*needs a_dynamic=token"):
        fxquant.get_recipe("w4a4", a_group_size="8")
    with pytest.raises(ConfigError, match="a_dynamic applies to the uniform recipes"):
        fxquant.get_recipe("repq-w4a4", a_dynamic="token")


def test_toy_vit_dynamic_tokens_need_no_calibration_data():
    """Every activation quantizer dynamic and on; weights calibrated; no calibration data needed, and
    calibration data changes nothing (there is nothing to fit)."""
    x = torch.cat(toy_calib())
    q = fxquant.compile(toy_vit(), recipe="w4a4", a_dynamic="token", example_inputs=(x[:2],), progress=False)
    acts = _act_quantizers(q)
    assert len(acts) == 10  # the inputs of the patch conv and 7 Linears (q, k, v share one), 4 attention operands
    assert all(a.spec.dynamic and a.fake_quant_enabled and a.scale.numel() == 0 for a in acts)
    assert "dynamic (ranges per input" in fxquant.report(q)["calibrate"].summary
    q2 = fxquant.compile(toy_vit(), recipe="w4a4", a_dynamic="token", calib=toy_calib(), progress=False)
    with torch.no_grad():
        y, y2, y_fp = q(x), q2(x), toy_vit()(x)
    assert torch.equal(y, y2)
    assert 0 < (y - y_fp).abs().max() < y_fp.abs().max()  # quantized: different from float, but close to it


@pytest.mark.parametrize("a_dynamic", ["token", "tensor"])
def test_each_image_is_quantized_alone_in_a_whole_model(a_dynamic):
    """An image's logits do not depend on the other images of its batch: changing them leaves its
    logits bit for bit equal (same batch shape), and a batch of one gives the same within fp32
    rounding of the float ops (GEMMs of another shape)."""
    q = fxquant.compile(toy_vit(), recipe="w4a4", a_dynamic=a_dynamic, example_inputs=(toy_calib()[0][:2],),
                        progress=False)
    x = torch.cat(toy_calib())
    other = x.clone()
    other[1:] = torch.randn(other[1:].shape, generator=torch.Generator().manual_seed(9)) * 5
    with torch.no_grad():
        y, y_other = q(x), q(other)
        alone = torch.cat([q(x[i:i + 1]) for i in range(4)])
    assert torch.equal(y[0], y_other[0]) and not torch.equal(y[1], y_other[1])
    assert torch.allclose(alone, y[:4], rtol=1e-4, atol=1e-4 * y.abs().max().item())


def test_token_groups_on_linear_inputs_and_artifact_round_trip(tmp_path):
    """Token groups quantize the Linear inputs (their channels); the patch conv's input and the attention
    operands, whose last axis holds pixels or keys, stay per token. An artifact rebuilds it bit for bit."""
    q = fxquant.compile(toy_vit(), recipe="w4a4", a_dynamic="token", a_group_size=4, calib=toy_calib(), progress=False)
    grans = sorted(str(a.spec.granularity) for a in _act_quantizers(q))
    assert grans.count(str(Dynamic("token", 4))) == 5 and grans.count(str(Dynamic("token"))) == 5
    assert all(a.spec.granularity == Dynamic("token") for n, a in q.named_modules()
               if isinstance(a, FakeQuantize) and not a.weight and ("patch" in n or "matmul" in n))
    artifact.save(q, tmp_path / "d")
    loaded = artifact.load(tmp_path / "d", model=toy_vit())
    assert sorted(str(a.spec.granularity) for a in _act_quantizers(loaded)) == grans
    assert all(a.fake_quant_enabled for a in _act_quantizers(loaded))
    x = torch.cat(toy_calib())
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


@pytest.mark.parametrize("recipe,a_dynamic", [("w8a8", "token"), ("w4a4", "token"), ("w4a4", "tensor")])
def test_dynamic_linears_lower_and_equal_fake_quant(recipe, a_dynamic, tmp_path):
    """Per-token (per-image) Linear inputs lower to LoweredLinear with per-row activation parameters:
    each layer equals the int64 reference on the fake quantizer's own codes exactly, and the
    fake-quant layer within fp32 rounding; the patch conv and attention matmuls stay fake-quantized
    with the reason; an artifact rebuilds the lowered model (replay)."""
    fq = fxquant.compile(toy_vit(), recipe=recipe, a_dynamic=a_dynamic, calib=toy_calib(), progress=False)
    low = fxquant.compile(toy_vit(), recipe=recipe, a_dynamic=a_dynamic, calib=toy_calib(), progress=False, lower=True)
    lowered = {n: m for n, m in low.named_modules() if isinstance(m, LoweredLinear)}
    assert sorted(lowered) == sorted(["block.q", "block.k", "block.v", "block.proj", "block.fc1", "block.fc2", "head"])
    assert not any(isinstance(m, LoweredPatchConv) for m in low.modules())
    rec = fxquant.report(low)["lower_to_kernels"].record
    assert "dynamic input ranges" in rec["kept"]["patch"] and len(rec["lowered_matmuls"]) == 0
    assert sum("dynamic (per-input) ranges" in why for why in rec["kept"].values()) == 2
    seen, hooks = {}, []
    for name in lowered:
        node = next(n for n in fq.graph.nodes if n.op == "call_module" and n.target == name)
        act = fq.get_submodule(node.args[0].target)
        hooks.append(act.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, {}).update(x=i[0])))
        hooks.append(fq.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen[name].update(y=o)))
    x = torch.cat(toy_calib())
    with torch.no_grad():
        y_fq = fq(x)
    for h in hooks:
        h.remove()
    for name, io in seen.items():
        mod, layer = lowered[name], fq.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        with torch.no_grad():
            got = mod(io["x"])
        # exact: codes and per-row parameters of the fake quantizer, int64 GEMM, the same float epilogue
        x2 = io["x"].reshape(-1, mod.in_features)
        s, z = (p.expand(*io["x"].shape[:-1], 1).reshape(-1) for p in dynamic_qparams(io["x"], mod.act_spec))
        a = to_signed_codes(x2, s[:, None], z[:, None], mod.act_spec)
        wq = layer.weight_fake_quant
        w = to_signed_codes(layer.weight.detach(), wq.scale, wq.zero_point, wq.spec)
        ref = int_linear_ref(a, s, z - code_offset(mod.act_spec), w, wq.scale.reshape(-1),
                             wq.zero_point.reshape(-1) - code_offset(wq.spec), layer.bias)
        assert torch.equal(got.reshape(-1, mod.out_features), ref), name
        assert torch.allclose(got, io["y"], rtol=1e-5, atol=1e-5 * io["y"].abs().max().item()), name
    with torch.no_grad():
        y_low = low(x)
    assert torch.allclose(y_low, y_fq, rtol=1e-4, atol=1e-4 * y_fq.abs().max().item())
    artifact.save(low, tmp_path / "l")
    loaded = artifact.load(tmp_path / "l", model=toy_vit())
    assert isinstance(loaded.get_submodule("block.fc1"), LoweredLinear)
    with torch.no_grad():
        assert torch.equal(loaded(x), y_low)


def test_dynamic_token_groups_cannot_be_lowered_yet():
    with pytest.raises(ConfigError, match=r"'block\.q' has dynamic token-group activations.*cannot be lowered yet"):
        fxquant.compile(toy_vit(), recipe="w4a4", a_dynamic="token", a_group_size=4, calib=toy_calib(), progress=False,
                        lower=True)


def test_cifar_vit_dynamic_tokens_top1_near_static_w4a4(cifar_info, cifar_data, cifar_compiled):
    """On the 500 fixture images, W4A4 with per-token dynamic activations runs and its top-1 is within
    a few points of static W4A4's (both computed here; 4.4 s on 2 cores, the static model shared with other tests)."""
    _, x, y = cifar_data
    static = cifar_compiled("w4a4")
    dynamic = cifar_compiled("w4a4", a_dynamic="token")
    assert all(a.spec.granularity == Dynamic("token") for a in _act_quantizers(dynamic))
    with torch.no_grad():
        acc_static = (static(x).argmax(1) == y).float().mean().item()
        acc_dynamic = (dynamic(x).argmax(1) == y).float().mean().item()
    assert acc_dynamic >= acc_static - 0.05, (acc_static, acc_dynamic)
