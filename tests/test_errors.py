"""Bad input gets errors that name the node or module and say what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant.core.errors import CalibrationError, ConfigError, PassError
from fxquant.core.testing import toy_calib, toy_vit


class _LogNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.log(self.fc1(x)))  # log of negative values -> NaN


def test_nan_in_calibration_batch_names_first_node():
    batches = toy_calib()
    batches[1] = batches[1].clone()
    batches[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"batch 1 produced NaN/Inf, first at node 'x' \(placeholder"):
        fxquant.compile(toy_vit(), recipe="w8a8", calib=batches, progress=False)


def test_nan_produced_inside_the_model_names_that_node():
    torch.manual_seed(0)
    with pytest.raises(CalibrationError, match=r"first at node 'log' \(call_function log\)"):
        fxquant.compile(_LogNet(), recipe="w8a8", calib=[torch.randn(8, 4)], progress=False)


def test_empty_calibration():
    with pytest.raises(CalibrationError, match="empty"):
        fxquant.compile(toy_vit(), recipe="w8a8", calib=[], example_inputs=(torch.randn(1, 3, 8, 8),), progress=False)
    with pytest.raises(CalibrationError, match="empty"):
        fxquant.compile(toy_vit(), recipe="w8a8", calib=torch.empty(0, 3, 8, 8), example_inputs=(torch.randn(1, 3, 8, 8),),
                        progress=False)


def test_forward_loop_that_never_runs_the_model():
    with pytest.raises(CalibrationError, match="never called the model"):
        fxquant.compile(toy_vit(), recipe="w8a8", calib=lambda m: None, example_inputs=(torch.randn(1, 3, 8, 8),), progress=False)


def test_forward_loop_calibrates():
    batches = toy_calib()

    def loop(model):
        for b in batches:
            model(b)

    a = fxquant.compile(toy_vit(), recipe="w8a8", calib=loop, example_inputs=(batches[0],), progress=False)
    b = fxquant.compile(toy_vit(), recipe="w8a8", calib=batches, progress=False)
    assert torch.equal(a(batches[0]), b(batches[0]))


def test_missing_calibration_data():
    with pytest.raises(PassError, match="needs calibration data"):
        fxquant.compile(toy_vit(), recipe="w8a8", example_inputs=(torch.randn(1, 3, 8, 8),), progress=False)


def test_bad_batch_type():
    with pytest.raises(CalibrationError, match="batch must be a tensor"):
        fxquant.compile(toy_vit(), recipe="w8a8", calib=["not a tensor"], example_inputs=(torch.randn(1, 3, 8, 8),),
                        progress=False)


def test_bits_outside_range_via_recipe():
    with pytest.raises(ConfigError, match=r"bits=1 is not supported.*2\.\.8"):
        fxquant.compile(toy_vit(), recipe="w4a4", a_bits=1)


def test_uncalibrated_enabled_quantizer_says_what_to_do():
    from fxquant.core.quant import FakeQuantize, QuantSpec

    fq = FakeQuantize(QuantSpec(), label="blocks_0_attn_qkv_in0")
    fq.fake_quant_enabled = True
    with pytest.raises(CalibrationError, match="'blocks_0_attn_qkv_in0' is enabled but has no scale; run calibration"):
        fq(torch.randn(3))


@pytest.mark.parametrize("batch, message", [
    (torch.randn(4, 1, 8, 8), r"shape \[4, 1, 8, 8\] vs \[1, 3, 8, 8\] \(channels 1 vs 3\)"),
    (torch.randn(4, 3, 16, 16), r"shape \[4, 3, 16, 16\] vs \[1, 3, 8, 8\] \(sizes after the batch dimension \[3, 16, 16\] "
                                r"vs \[3, 8, 8\]\)"),
    (torch.randn(4, 3, 8), r"3 dimensions \[4, 3, 8\] vs 4 \[1, 3, 8, 8\]"),
    (torch.randn(4, 3, 8, 8, dtype=torch.float64), r"dtype float64 vs float32"),
    (torch.randn(4, 3, 8, 8, device="meta"), r"device meta vs cpu"),
    ((torch.randn(4, 1, 8, 8), torch.zeros(4)), r"shape \[4, 1, 8, 8\] vs \[1, 3, 8, 8\] \(channels 1 vs 3\)"),
], ids=["channels", "size", "ndim", "dtype", "device", "tuple"])
def test_calibration_batch_unlike_the_example_input_is_named(batch, message):
    with pytest.raises(CalibrationError, match=r"calibration batch 0 does not match the example input the model was captured "
                                               rf"with: {message}\. Make the calibration batches like the example input"):
        fxquant.compile(toy_vit(), recipe="w8a8", calib=[batch], example_inputs=(torch.randn(1, 3, 8, 8),), progress=False)


def test_streamed_calibration_batches_are_checked_when_the_first_arrives():
    """A generator or DataLoader is not iterated an extra time: its first batch is checked as it streams."""
    seen = []

    def batches():
        for b in [torch.randn(4, 3, 16, 16)] * 3:
            seen.append(b)
            yield b

    with pytest.raises(CalibrationError, match=r"calibration batch 0 does not match .*\[3, 16, 16\] vs \[3, 8, 8\]"):
        fxquant.compile(toy_vit(), recipe="w8a8", calib=batches(), example_inputs=(torch.randn(1, 3, 8, 8),), progress=False)
    assert len(seen) == 1
    loader = torch.utils.data.DataLoader(torch.randn(8, 3, 8, 8, dtype=torch.float64), batch_size=4)
    with pytest.raises(CalibrationError, match="dtype float64 vs float32"):
        fxquant.compile(toy_vit(), recipe="w8a8", calib=loader, example_inputs=(torch.randn(1, 3, 8, 8),), progress=False)


def test_matching_batches_compile_as_before():
    """The check changes nothing for good batches: same state as without example_inputs."""
    from fxquant.core.digest import state_digest

    calib = toy_calib()
    a = fxquant.compile(toy_vit(), recipe="w8a8", calib=calib, example_inputs=(calib[0][:1],), progress=False)
    b = fxquant.compile(toy_vit(), recipe="w8a8", calib=calib, progress=False)
    assert state_digest(a) == state_digest(b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused_up_front(dtype):
    with pytest.raises(ConfigError, match=rf"the model holds {str(dtype)[6:]} tensors \(e.g. 'patch.weight'\); "
                                          r"fxquant.compile quantizes float32 models .*pass model.float\(\)"):
        fxquant.compile(toy_vit().to(dtype), recipe="w8a8", calib=[b.to(dtype) for b in toy_calib()], progress=False)
