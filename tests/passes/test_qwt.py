"""QwT: block partitioning from structure, the closed-form invariants, streaming, rewrite, options."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fxquant
from fxquant import artifact
from fxquant.core import match
from fxquant.core.graph import propagate_shapes
from fxquant.core.pipeline import Pass, PassResult
from fxquant.core.quant import CompensationLinear, FakeQuantize, QuantSpec
from fxquant.core.testing import family_model, hf_vit, toy_calib, toy_vit
from fxquant.passes import AnnotateUniform, Calibrate, InsertQuantizers, QwTCompensate
from fxquant.passes.qwt import LinearRegressionAccumulator


def _blocks(model, x):
    gm = fxquant.trace(model, (x,))
    propagate_shapes(gm, (x,))
    return match.find_blocks(gm)


def test_blocks_found_from_structure_cifar_vit(cifar_info):
    blocks = _blocks(cifar_info.model, torch.randn(2, 3, 32, 32))
    assert [b.fqn for b in blocks] == [f"blocks.{i}" for i in range(6)]
    assert blocks[0].input.name == "norm_pre" and all(b.input is a.output for a, b in zip(blocks, blocks[1:]))


@pytest.mark.parametrize("reduced", [pytest.param(True, id="swin-64px"),
                                     pytest.param(False, id="swin-224px", marks=pytest.mark.slow)])
def test_blocks_found_swin_and_hf(reduced):
    swin_model, res = family_model("swin_tiny_patch4_window7_224", reduced)
    swin = _blocks(swin_model, torch.randn(1, 3, res, res))
    assert [b.fqn for b in swin] == [f"layers.{i}.blocks.{j}" for i, n in enumerate((2, 2, 6, 2)) for j in range(n)]
    hf = _blocks(hf_vit(), torch.randn(2, 3, 32, 32))
    assert len(hf) == 2 and all(b.fqn.endswith(f"layers.{i}") for i, b in enumerate(hf))
    assert all(len(b.extra_inputs) >= 1 for b in hf)  # the shared attention mask enters from outside


def test_accumulator_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 7, generator=g)
    y = x @ torch.randn(7, 3, generator=g) + 0.1 * torch.randn(1000, 3, generator=g) + 2.0
    one = LinearRegressionAccumulator(7, 3)
    one.update(x, y)
    parts = [LinearRegressionAccumulator(7, 3) for _ in range(4)]
    for p, xs, ys in zip(parts, x.split(250), y.split(250)):
        p.update(xs, ys)
    merged = parts[0].merge(parts[1]).merge(parts[2]).merge(parts[3])
    streamed = LinearRegressionAccumulator(7, 3)
    for xs, ys in zip(x.split(137), y.split(137)):
        streamed.update(xs, ys)
    w1, b1, r1 = one.solve()
    for other in (merged, streamed):
        w2, b2, r2 = other.solve()
        assert torch.allclose(w1, w2, rtol=1e-10, atol=1e-12) and torch.allclose(b1, b2, rtol=1e-10, atol=1e-12)
        assert abs(r1 - r2) < 1e-12
    ref = torch.linalg.lstsq(torch.cat([x, torch.ones(1000, 1)], 1).double(), y.double()).solution
    assert torch.allclose(w1, ref[:-1].T, atol=1e-9) and torch.allclose(b1, ref[-1], atol=1e-9)
    assert 0.9 < r1 < 1.0


@dataclass(frozen=True)
class _QuantizersOff(Pass):
    name = "test_quantizers_off"

    def run(self, gm, ctx):
        for m in gm.modules():
            if isinstance(m, FakeQuantize):
                m.fake_quant_enabled = False
        return PassResult(gm, modified=False)


def test_quantizers_disabled_gives_zero_compensation():
    passes = [AnnotateUniform(), InsertQuantizers(), Calibrate(), _QuantizersOff(), QwTCompensate()]
    q = fxquant.compile(toy_vit(), passes=passes, calib=toy_calib(), progress=False)
    rec = fxquant.report(q)["qwt"].record
    assert rec["applied"] == [] and rec["r2"] == {"block": 0.0}
    assert rec["solution"]["block"]["w_max"] == 0.0 and rec["solution"]["block"]["b_max"] == 0.0  # exactly: ΔY = 0


class _AffineError(FakeQuantize):
    """A 'quantizer' whose error is exactly affine: x -> x·M + c when enabled."""

    def __init__(self, dim):
        super().__init__(QuantSpec())
        g = torch.Generator().manual_seed(1)
        self.register_buffer("m", torch.eye(dim) + 0.2 * torch.randn(dim, dim, generator=g))
        self.register_buffer("c", torch.randn(dim, generator=g))

    def forward(self, x):
        return x @ self.m + self.c if self.fake_quant_enabled else x


class _AffineBlock(nn.Module):
    def __init__(self, dim=6):
        super().__init__()
        self.err = _AffineError(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc(self.err(x))


class _AffineNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = _AffineBlock()

    def forward(self, x):
        return self.blk(x) * 2


@dataclass(frozen=True)
class _Calibrated(Pass):
    name = "test_calibrated"
    provides = ("calibrated",)

    def run(self, gm, ctx):
        for m in gm.modules():
            if isinstance(m, _AffineError):
                m.fake_quant_enabled = True
        return PassResult(gm, modified=False)


def test_affine_error_is_recovered_exactly():
    torch.manual_seed(0)
    model = _AffineNet().eval()
    calib = [torch.randn(16, 5, 6) for _ in range(3)]
    q = fxquant.compile(model, passes=[_Calibrated(), QwTCompensate(blocks=("blk",), comp_dtype="float32")], calib=calib,
                        progress=False)
    rec = fxquant.report(q)["qwt"].record
    assert rec["applied"] == ["blk"] and abs(rec["r2"]["blk"] - 1.0) < 1e-9
    x = torch.randn(4, 5, 6)
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), atol=1e-5)  # quantized block + compensation == float block


# slow on the 2-core AVX2 CI machine; the toy streaming tests above run by default
@pytest.mark.slow
def test_streaming_matches_single_batch_end_to_end(cifar_info, cifar_data, cifar_compiled):
    calib = cifar_data[0][:16]  # 16 images: the point is one batch vs four, not the sample size
    one = fxquant.compile(cifar_info.model, recipe="repq-qwt-w4a4", calib=[calib], progress=False)
    four = fxquant.compile(cifar_info.model, recipe="repq-qwt-w4a4", calib=list(calib.split(4)), progress=False)
    for name in ("qwt.blocks_0", "qwt.blocks_5"):
        w1, w4 = one.get_submodule(name).weight.float(), four.get_submodule(name).weight.float()
        # float64 accumulation; only the fp32 forward passes at different batch sizes differ (and fp16 storage)
        assert torch.allclose(w1, w4, rtol=1e-2, atol=1e-3 * w1.abs().max().item())


def test_rewrite_structure_and_options():
    q = fxquant.compile(toy_vit(), recipe="repq-qwt-w4a4", calib=toy_calib(), progress=False)
    comp = q.get_submodule("qwt.block")
    assert isinstance(comp, CompensationLinear) and comp.weight.dtype == torch.float16
    cnode = next(n for n in q.graph.nodes if n.op == "call_module" and n.target == "qwt.block")
    (add,) = cnode.users
    (blk,) = match.find_blocks(q)  # the compensated block: comp reads its input, the add is its output
    assert cnode.args[0] is blk.input and blk.output is add and add.args[1] is cnode
    assert [u.op for u in add.users] == ["call_module"] and next(iter(add.users)).target == "norm"
    q8 = fxquant.compile(toy_vit(), recipe="repq-qwt-w4a4", calib=toy_calib(), progress=False, comp_weight_bits=8,
                         comp_dtype="float32")
    c8 = q8.get_submodule("qwt.block")
    wq = c8.weight_fake_quant(c8.weight)
    assert c8.weight.dtype == torch.float32 and all(row.unique().numel() <= 256 for row in wq)
    skip = fxquant.compile(toy_vit(), recipe="repq-qwt-w4a4", calib=toy_calib(), progress=False, start_block=1)
    assert fxquant.report(skip)["qwt"].record["applied"] == []


def test_qwt_artifact_round_trip_and_bitlog2_composition(tmp_path):
    q = fxquant.compile(toy_vit(), recipe="bitlog2-qwt-w4a4", calib=toy_calib(), progress=False)
    names = [p.name for p in fxquant.report(q).passes]
    assert names == ["annotate_uniform", "annotate_repq", "bitlog2_attention", "insert_quantizers", "calibrate",
                     "repq_reparam", "qwt"]
    artifact.save(q, tmp_path / "q")
    loaded = artifact.load(tmp_path / "q", model=toy_vit())
    x = toy_calib()[0]
    assert torch.equal(loaded(x), q(x))


def test_qwt_needs_batches_not_a_loop():
    from fxquant.core.errors import PassError

    with pytest.raises(PassError, match="iterable of batches"):
        fxquant.compile(toy_vit(), recipe="repq-qwt-w4a4", calib=lambda m: m(toy_calib()[0]),
                        example_inputs=(toy_calib()[0],), progress=False)
