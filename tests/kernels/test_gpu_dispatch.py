"""On a CUDA GPU: the lowered models' own dispatch (Triton kernels chosen by the modules, the fused
attention by default) against the CPU integer path. Skipped without a
GPU; ``tools/gpu_checks.sh`` runs them (``-m gpu``)."""

from __future__ import annotations

import copy

import pytest
import torch

import fxquant
from fxquant.core.testing import toy_calib, toy_vit
from fxquant.kernels.lowered import LoweredAttention, LoweredPatchConv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("recipe", ["w8a8", "w4a4", "bitlog2-w4a4", "repq-w4a4"])
def test_lowered_model_on_cuda_matches_the_cpu_integer_path(recipe):
    low = fxquant.compile(toy_vit(), recipe=recipe, calib=toy_calib(), progress=False, lower=True)
    assert isinstance(low.patch, LoweredPatchConv)
    x = toy_calib()[0]
    with torch.no_grad():
        ref = low(x)
        gpu = copy.deepcopy(low).cuda()
        fused = [m for m in gpu.modules() if isinstance(m, LoweredAttention)]
        assert bool(fused) == (recipe != "repq-w4a4")  # log√2 A stays unfused
        got = gpu(x.cuda()).cpu()
    # same integer codes and sums; float epilogues, the softmax and fused multiply-adds differ by ulps
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
