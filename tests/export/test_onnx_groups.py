"""ONNX export of IGQ-ViT group quantizers: contiguous channel groups (``PerGroup``) export as
per-channel QuantizeLinear → DequantizeLinear with each block's parameters repeated over its
channels, bit-exact in onnxruntime (codes and values); instance-aware groups (``InstanceGroups``)
have no QDQ form and are refused with an error naming the quantizer. The whole-model check
(``igq-w4a4`` with ``group_mode="contiguous"`` on the CIFAR ViT) is in test_onnx_qdq.py."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import fxquant
from fxquant.core.errors import ConfigError
from fxquant.core.quant import InstanceGroups, MinMax, PctMSE, PerGroup, QuantSpec, code_offset, quantize
from fxquant.core.testing import QuantizerOnly, calibrated_quantizer, toy_calib, toy_vit
from fxquant.export import run_onnx, to_onnx


def _run_with_codes(path, x):
    """Run the exported model with the QuantizeLinear output added as a graph output: (values, codes)."""
    model = onnx.load(str(path))
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q) == 1
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(q[0].output[0]))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out, codes = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out), torch.from_numpy(codes.astype(np.int64)), q[0], model


@pytest.mark.parametrize("act_dtype", ["int8", "uint8"])
@pytest.mark.parametrize("spec,shape", [
    (QuantSpec(bits=4, granularity=PerGroup(8), estimator=PctMSE()), (64, 50, 64)),
    (QuantSpec(bits=4, granularity=PerGroup(16), symmetric=True), (64, 50, 64)),
    (QuantSpec(bits=8, granularity=PerGroup(8)), (64, 50, 64)),
    (QuantSpec(bits=3, granularity=PerGroup(4, axis=1)), (16, 32, 6, 6)),  # groups on an inner axis
], ids=lambda v: v.short() if isinstance(v, QuantSpec) else "x".join(map(str, v)))
def test_contiguous_group_quantizer_is_bit_exact_in_onnxruntime(spec, shape, act_dtype, tmp_path):
    g = torch.Generator().manual_seed(0)
    axis = spec.granularity.axis % len(shape)
    spread = torch.linspace(0.05, 6.0, shape[axis]).reshape([-1 if d == axis else 1 for d in range(len(shape))])
    x = torch.randn(*shape, generator=g) * spread + 0.3 * spread  # groups of very different ranges
    fq = calibrated_quantizer(spec, x)
    blocks = shape[axis] // spec.granularity.group_size
    assert fq.scale.numel() == blocks and len(set(fq.scale.flatten().tolist())) == blocks
    gm = fxquant.compile(QuantizerOnly(fq), recipe="fp32", example_inputs=(x[:2],), progress=False)
    res = to_onnx(gm, (x[:2],), tmp_path / "g.onnx", act_dtype=act_dtype)
    got, codes, qnode, model = _run_with_codes(res.path, x)  # batch 64/16: the exported batch is dynamic

    assert {a.name: a.i for a in qnode.attribute}["axis"] % len(shape) == axis
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scales = torch.from_numpy(inits[qnode.input[1]].copy())
    assert torch.equal(scales, fq.scale.flatten().repeat_interleave(spec.granularity.group_size))

    offset = code_offset(spec) if act_dtype == "int8" or spec.symmetric else 0
    with torch.no_grad():
        ref = fq(x)
        ref_codes = quantize(x, fq.scale, fq.zero_point, spec).to(torch.int64) - offset
    assert torch.equal(codes, ref_codes)  # the integer codes, bit for bit
    assert torch.equal(got, ref)  # and the dequantized values (same float ops: (q - z) * s)


def test_instance_groups_of_one_export_per_tensor(tmp_path):
    x = torch.randn(8, 50, 32, generator=torch.Generator().manual_seed(1))
    fq = calibrated_quantizer(QuantSpec(bits=4, granularity=InstanceGroups(1), estimator=MinMax()), x)
    gm = fxquant.compile(QuantizerOnly(fq), recipe="fp32", example_inputs=(x[:2],), progress=False)
    res = to_onnx(gm, (x[:2],), tmp_path / "g1.onnx")
    with torch.no_grad():
        assert torch.equal(run_onnx(res.path, (x,)), fq(x))


def test_instance_groups_are_refused_with_the_reason(tmp_path):
    x = toy_calib()[0]
    q = fxquant.compile(toy_vit(), recipe="igq-w4a4", calib=toy_calib(), progress=False)  # group_mode="instance"
    msg = ("ONNX export: activation quantizer 'block_q_in0' has instance-aware groups (asym4/igroups8@-1/Percentile, "
           "InstanceGroups): each input instance assigns every channel (or attention row) to one of 8 "
           "(scale, zero point) pairs by its own min/max range (a data-dependent argmin + gather), and QuantizeLinear "
           "takes only static per-tensor, per-axis or per-block scales, so there is no QDQ form. For ONNX compile with "
           "group_mode='contiguous' (fixed channel blocks, exported as per-channel QDQ); to keep instance groups, run "
           "the model with fxquant (fake-quant, or lowered to the Triton kernels) instead of ONNX")
    with pytest.raises(ConfigError, match=re.escape(msg)):
        to_onnx(q, (x[:2],), tmp_path / "i.onnx")


def test_lowered_instance_groups_are_refused_naming_the_layer(tmp_path):
    """``LoweredGroupedLinear`` with instance-aware groups has no QDQ form either (its contiguous
    form exports like the fake-quant model: test_export_handlers.py)."""
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    opts = dict(recipe="igq-w4a4", calib=toy_calib(), progress=False)
    inst = fxquant.compile(toy_vit(), lower=True, **opts)
    with pytest.raises(ConfigError, match=r"activation quantizer 'block\.q \(input\)' has instance-aware groups .*"
                                          r"group_mode='contiguous'"):
        to_onnx(inst, (x[:2],), tmp_path / "inst.onnx")
