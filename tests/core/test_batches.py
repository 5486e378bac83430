"""One batch convention (``fxquant.core.batches``): tensors, ``(inputs, labels)`` tuples and dicts of
keyword arguments reach calibration, QwT, evaluation and the NaN locator the same way."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import fxquant
from fxquant.core.batches import batch_args, batch_size, call_model, graph_inputs, slice_batch
from fxquant.core.calibration import locate_nonfinite
from fxquant.core.errors import CalibrationError
from fxquant.core.evaluate import top1
from fxquant.core.testing import hf_vit


class TwoInputs(nn.Module):
    def forward(self, a, b):
        return a - 2 * b


def test_forms_and_slicing():
    x, y = torch.randn(4, 3), torch.arange(4)
    assert batch_args(x) == ((x,), {})
    assert batch_args((x, y))[0][0] is x
    assert batch_args({"a": x}) == ((), {"a": x})
    assert batch_args(({"a": x}, y)) == ((), {"a": x})
    assert [batch_size(b) for b in (x, (x, y), {"a": x, "mask": torch.ones(4, 3)})] == [4, 4, 4]
    cut = slice_batch({"a": x, "scale": torch.tensor(2.0)}, 2)
    assert cut["a"].shape[0] == 2 and cut["scale"].dim() == 0
    assert slice_batch((x, y), 3)[1].tolist() == [0, 1, 2]
    with pytest.raises(CalibrationError, match="batch must be a tensor, an \\(inputs, labels\\) tuple or a dict"):
        batch_args("images")


def test_dict_batches_bind_by_placeholder_name_not_dict_order():
    gm = fx.symbolic_trace(TwoInputs())
    a, b = torch.ones(2), torch.full((2,), 3.0)
    batch = {"b": b, "a": a}  # dict order differs from the forward's
    assert [t is a for t in graph_inputs(gm, batch)] == [True, False]
    assert torch.equal(call_model(gm, batch), a - 2 * b)
    assert torch.equal(fx.Interpreter(gm).run(*graph_inputs(gm, batch)), a - 2 * b)
    with pytest.raises(CalibrationError, match=r"inputs \['a', 'b'\]: missing \['b'\]; no input named \['c'\]"):
        graph_inputs(gm, {"a": a, "c": b})


def test_nan_locator_reads_dict_batches_by_name():
    gm = fx.symbolic_trace(TwoInputs())
    assert locate_nonfinite(gm, {"b": torch.ones(2), "a": torch.ones(2)}) is None
    node, _ = locate_nonfinite(gm, {"b": torch.full((2,), float("inf")), "a": torch.ones(2)})
    assert node == "b"  # the input b; read positionally in dict order, the inf would land in 'a'


def test_hf_model_with_dict_batches_through_repq_and_qwt():
    """A Hugging Face ViT calibrated with ``{"pixel_values": x}`` batches gives exactly the model
    calibrated with the same images as tensors, through RepQ-ViT + QwT (prefix subgraphs, sequential
    calibration), and evaluates with ``(dict, labels)`` batches."""
    model = hf_vit()
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(3)]
    kw = dict(recipe="repq-qwt-w4a4", example_inputs=(images[0][:2],), progress=False, calib_images=12)
    q_tensor = fxquant.compile(model, calib=images, **kw)
    q_dict = fxquant.compile(model, calib=[{"pixel_values": x} for x in images], **kw)
    assert fxquant.report(q_dict)["qwt"].record["applied"]  # QwT ran on the dict batches
    sd_t, sd_d = q_tensor.state_dict(), q_dict.state_dict()
    assert sd_t.keys() == sd_d.keys() and all(torch.equal(sd_t[k], sd_d[k]) for k in sd_t)
    labels = torch.arange(4) % 10
    acc_t = top1(q_tensor, [(x, labels) for x in images], progress=False)
    acc_d = top1(q_dict, [({"pixel_values": x}, labels) for x in images], progress=False)
    assert acc_t == acc_d
