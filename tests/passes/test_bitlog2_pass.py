"""BitLog2Attention pass and recipes."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant import artifact
from fxquant.core import match
from fxquant.core.errors import ConfigError, PassError
from fxquant.core.quant.spec import BITLOG2_VARIANTS
from fxquant.core.testing import toy_calib, toy_vit
from fxquant.passes import AnnotateUniform, BitLog2Attention, InsertQuantizers


def _attention_quantizer(q):
    mods = dict(q.named_modules())
    return [mods[a.av.args[0].target] for a in match.find_attention(q, mods)]


@pytest.mark.parametrize("scheme", ["single16", "single17", "half16", "half17", "sqrt2_16", "sqrt2_17"])
def test_each_scheme_replaces_the_softmax_quantizer(scheme):
    q = fxquant.compile(toy_vit(), recipe="bitlog2-w4a4", scheme=scheme, calib=toy_calib(), progress=False)
    (fq,) = _attention_quantizer(q)
    levels = 16 if scheme.endswith("16") else 17
    if scheme in BITLOG2_VARIANTS:
        assert fq.spec.scheme == "bitlog2" and fq.spec.bitlog2_variant == scheme
        m, _ = BITLOG2_VARIANTS[scheme]
        delta = fq.scale.item()
        assert delta == int(delta) and 1 <= delta <= m - 1
    else:
        assert fq.spec.scheme == "log_sqrt2" and fq.spec.fit_bits == scheme.endswith("16")
    out = {}
    h = fq.register_forward_hook(lambda m, i, o: out.update(y=o))
    with torch.no_grad():
        q(torch.randn(32, 3, 8, 8))
    h.remove()
    assert out["y"].unique().numel() <= levels
    assert "bitlog2_attention" in [p.name for p in fxquant.report(q).passes]


def test_default_scheme_is_half17_and_unknown_rejected():
    assert fxquant.get_recipe("bitlog2-w4a4").option("scheme") == "half17"
    with pytest.raises(ConfigError, match="unknown scheme 'half18'"):
        fxquant.get_recipe("bitlog2-w4a4", scheme="half18")


def test_must_run_before_quantizers_are_inserted():
    with pytest.raises(PassError, match="before insert_quantizers"):
        fxquant.compile(toy_vit(), passes=[AnnotateUniform(), InsertQuantizers(), BitLog2Attention()],
                        example_inputs=(toy_calib()[0],), progress=False)


def test_bitlog2_artifact_round_trip(tmp_path):
    q = fxquant.compile(toy_vit(), recipe="bitlog2-w4a4", scheme="half16", calib=toy_calib(), progress=False)
    artifact.save(q, tmp_path / "b")
    loaded = artifact.load(tmp_path / "b", model=toy_vit())
    x = toy_calib()[2]
    assert torch.equal(loaded(x), q(x))
