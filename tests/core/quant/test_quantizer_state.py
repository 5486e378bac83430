"""``quantizer_state``: the one "these quantizers off (or observing), then restore" rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxquant.core.quant import FakeQuantize, QuantSpec, quantizer_state


def _quantizers(n: int = 3) -> nn.Sequential:
    seq = nn.Sequential(*[FakeQuantize(QuantSpec(bits=8), label=f"q{i}") for i in range(n)])
    for i, q in enumerate(seq):
        q.fake_quant_enabled, q.observer_enabled = bool(i % 2), i == 2
    return seq


def test_sets_and_restores_both_flags():
    seq = _quantizers()
    before = [(q.fake_quant_enabled, q.observer_enabled) for q in seq]
    with quantizer_state(seq, fake_quant=False, observe=True) as was:
        assert all(not q.fake_quant_enabled and q.observer_enabled for q in seq)
        assert [was[q] for q in seq] == [b[0] for b in before]  # the callers' "as compiled" flags
    assert [(q.fake_quant_enabled, q.observer_enabled) for q in seq] == before


def test_none_leaves_a_flag_alone_and_an_iterable_selects_quantizers():
    seq = _quantizers()
    with quantizer_state([seq[0]], fake_quant=True):
        assert seq[0].fake_quant_enabled and seq[0].observer_enabled is False and not seq[2].fake_quant_enabled
    assert not seq[0].fake_quant_enabled


def test_restores_after_an_exception_and_changes_inside():
    seq = _quantizers()
    before = [(q.fake_quant_enabled, q.observer_enabled) for q in seq]
    with pytest.raises(RuntimeError), quantizer_state(seq, fake_quant=False):
        seq[1].fake_quant_enabled = True  # a caller switching one quantizer back on
        raise RuntimeError("inside")
    assert [(q.fake_quant_enabled, q.observer_enabled) for q in seq] == before
    assert torch.equal(seq[0].scale, torch.empty(0))  # parameters are not its business
