"""Same seed and inputs give bit-identical results."""

from __future__ import annotations

import torch

import fxquant


def test_compile_twice_is_bit_identical(cifar_info, cifar_data):
    calib, x, _ = cifar_data
    a = fxquant.compile(cifar_info.model, recipe="w4a4", calib=[calib[:16], calib[16:]], progress=False, seed=3)
    b = fxquant.compile(cifar_info.model, recipe="w4a4", calib=[calib[:16], calib[16:]], progress=False, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(a(x[:100]), b(x[:100]))
