"""LowerToKernels: structure, per-layer equivalence with fake quantization, survival of RepQ and
QwT, artifacts, and the lowered CIFAR ViT against its fake-quant version."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant import artifact
from fxquant.core.errors import ConfigError
from fxquant.core.quant import QuantConv2d, QuantLinear
from fxquant.core.testing import toy_calib, toy_vit
from fxquant.kernels.lowered import LoweredAttention, LoweredLinear, LoweredMatmul, LoweredPatchConv
from fxquant.passes import LowerToKernels


def test_toy_lowering_structure_and_report():
    q = fxquant.compile(toy_vit(), recipe="w8a8", calib=toy_calib(), progress=False, lower=True)
    lowered = [n for n, m in q.named_modules() if isinstance(m, LoweredLinear) and not isinstance(m, LoweredPatchConv)]
    assert sorted(lowered) == sorted(["block.q", "block.k", "block.v", "block.proj", "block.fc1", "block.fc2", "head"])
    assert isinstance(q.patch, LoweredPatchConv) and q.patch.kernel_size == (4, 4) and q.patch.in_features == 48
    assert not any(isinstance(m, (QuantLinear, QuantConv2d)) for m in q.modules())
    rec = fxquant.report(q)["lower_to_kernels"].record
    assert rec["kept"] == {} and rec["patch_convs"] == ["patch"] and "patch" in rec["lowered"]
    assert "7 Linears, 1 patch convolution and 2 attention matmuls" in fxquant.report(q)["lower_to_kernels"].summary
    # the patch conv reads the image itself (its input quantizer is gone into the lowered module)
    (patch,) = [n for n in q.graph.nodes if n.op == "call_module" and n.target == "patch"]
    assert patch.args[0].op == "placeholder"
    mms = {n: m for n, m in q.named_modules() if isinstance(m, LoweredMatmul)}
    assert len(mms) == 2 and {m.kind for m in mms.values()} == {"uniform"} and len(rec["lowered_matmuls"]) == 2
    assert not any(n.op == "call_function" and "matmul" in str(n.target) for n in q.graph.nodes)
    q.graph.lint()


def _matmul_io(fq: torch.fx.GraphModule, x: torch.Tensor) -> list[dict]:
    """Inputs of the two quantizers and the output of every quantized attention matmul of ``fq``."""
    from fxquant.core.quant import FakeQuantize

    mods = dict(fq.named_modules())
    seen, hooks = [], []
    for n in fq.graph.nodes:
        if n.op == "call_function" and "matmul" in str(n.target) and all(
                a.op == "call_module" and isinstance(mods[a.target], FakeQuantize) for a in n.args[:2]):
            rec: dict = {"name": n.name}
            seen.append(rec)
            for key, a in zip("ab", n.args[:2]):
                def hook(m, i, o, rec=rec, key=key):
                    rec.update({key: i[0], key + "q": o})

                hooks.append(mods[a.target].register_forward_hook(hook))
    with torch.no_grad():
        fq(x)
    for h in hooks:
        h.remove()
    for rec in seen:
        rec["y"] = rec["aq"] @ rec["bq"]
    return seen


@pytest.mark.parametrize("recipe,kind", [("w8a8", "uniform"), ("w4a4", "uniform"), ("repq-w4a4", "log"),
                                         ("repq-w6a6", "log"), ("bitlog2-w4a4", "bitlog2")])
def test_each_lowered_matmul_equals_its_fake_quant_matmul(recipe, kind):
    fq = fxquant.compile(toy_vit(), recipe=recipe, calib=toy_calib(), progress=False)
    low = fxquant.compile(toy_vit(), recipe=recipe, calib=toy_calib(), progress=False,
                          lower=LowerToKernels(fuse_attention=False))
    ios = _matmul_io(fq, toy_calib()[0])
    assert len(ios) == 2
    kinds = []
    for io in ios:
        mod = low.get_submodule(f"lowered_matmuls.{io['name']}")
        kinds.append(mod.kind)
        with torch.no_grad():
            got = mod(io["a"], io["b"])
        # integer accumulation vs float matmul of dequantized values: equal within fp32 rounding
        assert torch.allclose(got, io["y"], rtol=1e-5, atol=1e-5 * io["y"].abs().max().item()), io["name"]
    assert kinds == ["uniform", kind]


@pytest.mark.parametrize("recipe", ["w8a8", "w4a4", "bitlog2-w4a4"])
def test_attention_fuses_and_the_fused_kernel_equals_the_unfused_path(recipe, tmp_path):
    """q·kᵀ → ·1/√d → softmax → A·v becomes one LoweredAttention (uniform or BitLog2 A); its Triton
    kernel (forced on CPU tensors, TRITON_INTERPRET=1) gives the unfused integer path's output;
    a saved artifact reloads fused and bit-identical."""
    low = fxquant.compile(toy_vit(), recipe=recipe, calib=toy_calib(), progress=False, lower=True)
    rec = fxquant.report(low)["lower_to_kernels"].record
    (att,) = [m for m in low.modules() if isinstance(m, LoweredAttention)]
    assert rec["fused_attention"] == ["lowered_attention.lowered_matmuls_matmul_1"] and att.score_op == "mul"
    assert not any(n.target in (torch.softmax, torch.nn.functional.softmax) for n in low.graph.nodes)
    x = toy_calib()[0][:4]
    with torch.no_grad():
        y_auto = low(x)  # CPU: the unfused modules inside LoweredAttention
        att.backend = "unfused"
        y_unfused = low(x)
        att.backend = "triton"
        y_fused = low(x)
    assert torch.equal(y_auto, y_unfused)
    # the same codes (no probability at a boundary on these images), so the same function up to the
    # fp32 epilogue of A·v (int32 sums × s_A·s_v vs the unfused fp32 product) feeding the head
    assert torch.allclose(y_fused, y_unfused, rtol=1e-5, atol=1e-5 * y_unfused.abs().max().item())
    att.backend = "auto"
    artifact.save(low, tmp_path / "l")
    loaded = artifact.load(tmp_path / "l", model=toy_vit())
    assert any(isinstance(m, LoweredAttention) for m in loaded.modules()) and torch.equal(loaded(x), low(x))


def test_attention_fusion_is_optional_and_log_attention_stays_unfused():
    rep = fxquant.compile(toy_vit(), recipe="repq-w4a4", calib=toy_calib(), progress=False, lower=True)
    assert fxquant.report(rep)["lower_to_kernels"].record["fused_attention"] == []  # log√2 A: LoweredMatmul
    off = fxquant.compile(toy_vit(), recipe="w8a8", calib=toy_calib(), progress=False,
                          lower=LowerToKernels(fuse_attention=False))
    assert not any(isinstance(m, LoweredAttention) for m in off.modules())
    assert sum(isinstance(m, LoweredMatmul) for m in off.modules()) == 2


def test_8bit_log_softmax_stays_in_float_with_reason():
    q = fxquant.compile(toy_vit(), recipe="repq-w8a8", calib=toy_calib(), progress=False, lower=True)
    rec = fxquant.report(q)["lower_to_kernels"].record
    assert len(rec["lowered_matmuls"]) == 1  # q·kᵀ
    (why,) = [v for k, v in rec["kept"].items() if "matmul" in k]
    assert "2^-128" in why and "shift" in why


@pytest.mark.parametrize("recipe", ["w8a8", "w4a4", "repq-w4a4"])
def test_each_lowered_layer_equals_its_fake_quant_layer(recipe):
    fq = fxquant.compile(toy_vit(), recipe=recipe, calib=toy_calib(), progress=False)
    low = fxquant.compile(toy_vit(), recipe=recipe, calib=toy_calib(), progress=False, lower=True)
    seen, hooks = {}, []
    for name, mod in low.named_modules():
        if isinstance(mod, LoweredLinear):
            node = next(n for n in fq.graph.nodes if n.op == "call_module" and n.target == name)
            act = fq.get_submodule(node.args[0].target)
            hooks.append(act.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, {}).update(x=i[0])))
            hooks.append(fq.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen[name].update(y=o)))
    with torch.no_grad():
        y_fq = fq(toy_calib()[0])
    for h in hooks:
        h.remove()
    assert len(seen) == 8 and isinstance(low.get_submodule("patch"), LoweredPatchConv)  # 7 Linears + the patch conv
    for name, io in seen.items():
        with torch.no_grad():
            got = low.get_submodule(name)(io["x"])
        # integer accumulation vs float matmul (patch conv: Conv2d) of dequantized values: equal within fp32 rounding
        assert torch.allclose(got, io["y"], rtol=1e-5, atol=1e-5 * io["y"].abs().max().item()), name
    with torch.no_grad():
        y_low = low(toy_calib()[0])
    # the whole model: the same codes everywhere (no rounding boundary crossed on these images), fp32 rounding
    assert torch.allclose(y_low, y_fq, rtol=1e-5, atol=1e-5 * y_fq.abs().max().item())
    if recipe.startswith("repq"):
        assert fxquant.report(low)["repq_reparam"].record["sites"]  # folded weights were lowered


def test_qwt_and_repq_survive_lowering(tmp_path):
    q = fxquant.compile(toy_vit(), recipe="repq-qwt-w4a4", calib=toy_calib(), progress=False, lower=True)
    assert any(type(m).__name__ == "CompensationLinear" for m in q.modules())
    assert "qwt.block" in fxquant.report(q)["lower_to_kernels"].record["kept"]
    artifact.save(q, tmp_path / "l")
    loaded = artifact.load(tmp_path / "l", model=toy_vit())
    assert isinstance(loaded.get_submodule("patch"), LoweredPatchConv)  # rebuilt from shapes + specs (replay)
    x = toy_calib()[0]
    assert torch.equal(loaded(x), q(x))


def test_nothing_to_lower_is_an_error():
    with pytest.raises(ConfigError, match="no Linear or attention matmul could be lowered"):
        fxquant.compile(toy_vit(), recipe="w8a8", calib=toy_calib(), progress=False, lower=True, skip=("*",))


def test_overlapping_conv_is_kept_with_reason():
    """A convolution that is not a patch embedding (stride 2 < kernel 4: overlapping windows) stays
    fake-quantized, with the reason in the pass record; the Linears are lowered all the same."""
    model = toy_vit()
    torch.manual_seed(0)
    model.patch = torch.nn.Conv2d(3, 16, 4, 2)
    q = fxquant.compile(model, recipe="w8a8", calib=toy_calib(), progress=False, lower=True)
    rec = fxquant.report(q)["lower_to_kernels"].record
    assert rec["kept"] == {"patch": "convolution is not a patch embedding (stride (2, 2) != kernel (4, 4))"}
    assert rec["patch_convs"] == [] and "patch" not in rec["lowered"] and len(rec["lowered"]) == 7
    assert type(q.patch) is QuantConv2d and not any(isinstance(m, LoweredPatchConv) for m in q.modules())


# slow on the 2-core AVX2 CI machine; the toy-ViT lowering tests above and tests/kernels cover it by default
@pytest.mark.slow
def test_lowered_cifar_vit_matches_fake_quant(cifar_info, cifar_data, cifar_w8a8):
    calib, x, y = cifar_data
    low = fxquant.compile(cifar_info.model, recipe="w8a8", calib=[calib], progress=False, lower=True)
    # the 4x4 stride-4 patch embedding runs on the integer kernels too
    assert isinstance(low.get_submodule("patch_embed.proj"), LoweredPatchConv)
    assert fxquant.report(low)["lower_to_kernels"].record["patch_convs"] == ["patch_embed.proj"]
    with torch.no_grad():
        a, b = cifar_w8a8(x), low(x)
    assert (a.argmax(1) == b.argmax(1)).float().mean().item() >= 0.99
    acc_fq = (a.argmax(1) == y).float().mean().item()
    acc_low = (b.argmax(1) == y).float().mean().item()
    assert abs(acc_fq - acc_low) <= 0.004  # 500 images: at most 2 predictions net (10k-image figure in the note)
    # every block's attention fused (timm scales q before q·kᵀ: no score op; its no-mask calls folded);
    # block 0's fused Triton kernel (interpreter) on real activations gives the unfused output
    fused = [m for m in low.modules() if isinstance(m, LoweredAttention)]
    assert len(fused) == 6 and all(m.score_op is None for m in fused)
    seen = {}
    hook = fused[0].register_forward_hook(lambda m, i, o: seen.update(args=i, out=o))
    with torch.no_grad():
        low(x[:2])
        hook.remove()
        fused[0].backend = "triton"
        got = fused[0](*seen["args"])
        fused[0].backend = "auto"
    assert torch.allclose(got, seen["out"], rtol=1e-5, atol=1e-5 * seen["out"].abs().max().item())


def test_cli_eval_lower_json(tmp_path):
    import json

    from fxquant.cli import main

    out = tmp_path / "l.json"
    args = ["eval", "--model", "embedded", "--recipe", "w8a8", "--limit", "100", "--lower", "--quiet", "--json", str(out)]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["lowered"] is True and res["test_images"] == 100


def _mlp() -> torch.nn.Module:
    """LayerNorm (uneven per-channel gains, so channel ranges differ) → Linear → GELU → Linear."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 8))
    with torch.no_grad():
        m[0].weight.copy_(torch.linspace(0.1, 3.0, 16)[torch.randperm(16)])
        m[0].bias.copy_(torch.randn(16) * 0.5)
    return m.eval()


def _mlp_data(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)  # instances (images) with different channel ranges
    return [torch.randn(4, 10, 16, generator=g) * (torch.rand(4, 1, 16, generator=g) * 3 + 0.2) for _ in range(n)]


def _grouped_passes(mode: str, lower: bool) -> list:
    from fxquant.core.quant import PerAxis, QuantSpec
    from fxquant.passes import AnnotateUniform, Calibrate, GroupQuant, InsertQuantizers, LowerToKernels

    w4, a4 = QuantSpec(bits=4, granularity=PerAxis(0)), QuantSpec(bits=4)
    return [AnnotateUniform(weight=w4, act=a4), GroupQuant(num_groups=4, mode=mode), InsertQuantizers(), Calibrate()] + (
        [LowerToKernels()] if lower else [])


@pytest.mark.parametrize("mode", ["instance", "contiguous"])
def test_grouped_inputs_lower_to_grouped_linear(mode, tmp_path):
    """IGQ-ViT inputs (InstanceGroups / PerGroup, 4 groups, W4A4) lower to LoweredGroupedLinear, whose
    integer partial sums + float32 epilogue equal the fake-quant layer within fp32 rounding, and
    which an artifact rebuilds (replay)."""
    from fxquant.core.quant import FakeQuantize, InstanceGroups, PerGroup
    from fxquant.kernels.lowered import LoweredGroupedLinear

    fq = fxquant.compile(_mlp(), passes=_grouped_passes(mode, False), calib=_mlp_data(), progress=False)
    low = fxquant.compile(_mlp(), passes=_grouped_passes(mode, True), calib=_mlp_data(), progress=False)
    grouped = {n: m for n, m in low.named_modules() if isinstance(m, LoweredGroupedLinear)}
    assert sorted(grouped) == ["1", "3"] and not any(isinstance(m, (QuantLinear, FakeQuantize)) for m in low.modules())
    kind = InstanceGroups if mode == "instance" else PerGroup
    assert all(isinstance(m.act_spec.granularity, kind) and m.num_groups == 4 for m in grouped.values())
    assert fxquant.report(low)["lower_to_kernels"].record["grouped"] == ["1", "3"]
    x = _mlp_data(1, seed=7)[0]
    seen, hooks = {}, []
    for name in grouped:
        node = next(n for n in fq.graph.nodes if n.op == "call_module" and n.target == name)
        act = fq.get_submodule(node.args[0].target)
        assert isinstance(act.spec.granularity, kind)
        hooks.append(act.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, {}).update(x=i[0])))
        hooks.append(fq.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen[name].update(y=o)))
    with torch.no_grad():
        y_fq = fq(x)
    for h in hooks:
        h.remove()
    for name, io in seen.items():
        with torch.no_grad():
            got = grouped[name](io["x"])
        # exact integer partial sums + float32 epilogue vs float matmul of dequantized values: fp32 rounding
        assert torch.allclose(got, io["y"], rtol=1e-5, atol=1e-5 * io["y"].abs().max().item()), name
    with torch.no_grad():
        y_low = low(x)
    assert torch.allclose(y_low, y_fq, rtol=1e-5, atol=1e-5 * y_fq.abs().max().item())
    artifact.save(low, tmp_path / "g")
    loaded = artifact.load(tmp_path / "g", model=_mlp())
    assert isinstance(loaded.get_submodule("1"), LoweredGroupedLinear)
    with torch.no_grad():
        assert torch.equal(loaded(x), y_low)


def test_lowered_modules_read_their_scalars_once():
    """The lowered modules turn their scalar buffers into Python numbers once (a host sync on CUDA)
    and again only when a buffer changes (load_state_dict, in-place edits)."""
    low = fxquant.compile(toy_vit(), recipe="w8a8", calib=toy_calib(), progress=False,
                          lower=LowerToKernels(fuse_attention=False))
    mm = next(m for m in low.modules() if isinstance(m, LoweredMatmul))
    first = mm.host_params()
    assert mm.host_params() is first and first["b_scale"] == mm.b_scale.item()
    with torch.no_grad():
        mm.b_scale.mul_(2)
    assert mm.host_params() is not first and mm.host_params()["b_scale"] == mm.b_scale.item()
    lin = low.get_submodule("block.fc1")
    assert lin._has_w_zp() is False  # symmetric weights: the kernel skips A's row sums
    with torch.no_grad():
        lin.w_zp[0] = 1
    assert lin._has_w_zp() is True
