"""Artifacts are safetensors + JSON (no pickle) and load back to the identical model."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

import fxquant
from fxquant import artifact
from fxquant.core.errors import ArtifactError
from fxquant.core.testing import toy_calib, toy_vit


def test_round_trip_identical_outputs(tmp_path, cifar_info, cifar_data):
    calib, x, _ = cifar_data
    q = fxquant.compile(cifar_info.model, recipe="w4a4", calib=[calib], progress=False)
    out = artifact.save(q, tmp_path / "a", model_spec="cifar-vit", example_inputs=(x[:2],))
    assert sorted(p.name for p in out.iterdir()) == ["fxquant.json", "model.safetensors"]
    assert not zipfile.is_zipfile(out / "model.safetensors")  # not a torch.save (pickle) archive
    meta = json.loads((out / "fxquant.json").read_text())
    assert meta["model"] == "cifar-vit" and meta["recipe"]["name"] == "w4a4"
    loaded = artifact.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(x[:50]), q(x[:50]))


def test_round_trip_with_user_model(tmp_path):
    m = toy_vit()
    q = fxquant.compile(m, recipe="w8a8", calib=toy_calib(), progress=False)
    artifact.save(q, tmp_path / "toy")
    with pytest.raises(ArtifactError, match="does not record its float model"):
        artifact.load(tmp_path / "toy")
    loaded = artifact.load(tmp_path / "toy", model=toy_vit())
    x = toy_calib()[0]
    assert torch.equal(loaded(x), q(x))


def test_mismatched_model_is_rejected(tmp_path):
    from fxquant.core.testing import ToyViT

    q = fxquant.compile(toy_vit(), recipe="w8a8", calib=toy_calib(), progress=False)
    artifact.save(q, tmp_path / "toy")
    with pytest.raises(ArtifactError, match=r"(?s)does not match.*'block.fc1.bias': artifact \(32,\) vs model \(48,\)"):
        artifact.load(tmp_path / "toy", model=ToyViT(dim=24).eval())


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not an fxquant artifact"):
        artifact.load(tmp_path)
