"""Artifacts are safetensors + JSON (no pickle) and load back to the identical model."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fxquant
from fxquant import artifact
from fxquant.core.digest import state_digest
from fxquant.core.errors import ArtifactError, ArtifactWarning
from fxquant.core.meta import PIPELINE
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


# ------------------------------------------------------------------------------------------
# Atomic saves and verified loads (issue 27)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_pair():
    """Two different compiled toy models (W8A8, W4A4): the old and the new artifact of a folder."""
    return (fxquant.compile(toy_vit(), recipe="w8a8", calib=toy_calib(), progress=False),
            fxquant.compile(toy_vit(), recipe="w4a4", calib=toy_calib(), progress=False))


def _digest_of(path) -> str:
    return state_digest(artifact.load(path, model=toy_vit()))


def _flip_bit(path, tensor: str) -> None:
    """Flip the lowest bit of ``tensor``'s first byte in a safetensors file, as disk corruption would."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start, _ = json.loads(raw[8:8 + n])[tensor]["data_offsets"]
    raw[8 + n + start] ^= 1
    path.write_bytes(bytes(raw))


def _edit_meta(path, edit) -> None:
    meta = json.loads((path / artifact.META).read_text())
    edit(meta)
    (path / artifact.META).write_text(json.dumps(meta, indent=2))


def test_saved_digests_cover_the_state_and_a_round_trip_keeps_it(tmp_path, toy_pair):
    q = toy_pair[0]
    out = artifact.save(q, tmp_path / "a")
    meta = json.loads((out / "fxquant.json").read_text())
    assert meta["format_version"] == artifact.FORMAT_VERSION == 2
    assert meta["digests"]["state"] == state_digest(q) == _digest_of(out)
    assert set(meta["digests"]["tensors"]) == set(q.state_dict()) and set(meta["digests"]["sections"]) == set(artifact.DIGESTED)


def test_an_interrupted_save_leaves_the_old_or_the_new_artifact_never_a_mix(tmp_path, toy_pair, monkeypatch):
    """A kill at any file boundary of a save over an existing artifact: a copy of the folder taken
    there loads as the old artifact or the new one (between the two renames, the old one is
    beside the folder and load says where)."""
    old, new = toy_pair
    out = tmp_path / "work" / "a"
    artifact.save(old, out)
    snaps = []

    def snapshot(label: str) -> None:
        snaps.append(shutil.copytree(out.parent, tmp_path / "snap" / f"{len(snaps):02d}-{label}"))

    def boundary(name: str):
        real = getattr(artifact, name)

        def wrapped(*args, **kwargs):
            snapshot(f"before-{name}")
            real(*args, **kwargs)
            snapshot(f"after-{name}")
        return wrapped

    for name in ("_write_weights", "_write_text", "_rename"):
        monkeypatch.setattr(artifact, name, boundary(name))
    artifact.save(new, out)
    snapshot("done")
    assert len(snaps) == 9  # 2 files and 2 renames, before and after each, and the end
    digests = {state_digest(old): "old", state_digest(new): "new"}
    seen = []
    for snap in snaps:
        if (snap / "a").exists():
            seen.append(digests[_digest_of(snap / "a")])
        else:
            with pytest.raises(ArtifactError, match=r"\.a\.old-\d+' beside it holds the artifact that an interrupted save "
                                                    r"moved aside: rename it back"):
                artifact.load(snap / "a", model=toy_vit())
            aside, = snap.glob(".a.old-*")
            seen.append(digests[_digest_of(aside)] + " (aside)")
    assert seen == ["old"] * 5 + ["old (aside)"] * 2 + ["new"] * 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["a"]  # no temporary folder left


@pytest.mark.parametrize("fail_at", ["_write_weights", "_write_text", "rename aside", "rename in"])
def test_a_failed_save_keeps_the_old_artifact_and_cleans_up(tmp_path, toy_pair, monkeypatch, fail_at):
    old, new = toy_pair
    out = tmp_path / "a"
    artifact.save(old, out)
    calls = []
    real_rename = artifact._rename

    def rename(src, dst):
        calls.append((src, dst))
        if (fail_at == "rename aside" and len(calls) == 1) or (fail_at == "rename in" and len(calls) == 2):
            raise OSError("simulated failure")
        real_rename(src, dst)

    def fail(*args, **kwargs):
        raise OSError("simulated failure")

    monkeypatch.setattr(artifact, "_rename", rename)
    if fail_at.startswith("_write"):
        monkeypatch.setattr(artifact, fail_at, fail)
    with pytest.raises(OSError, match="simulated failure"):
        artifact.save(new, out)
    assert _digest_of(out) == state_digest(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_failed_first_save_leaves_nothing(tmp_path, toy_pair, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("simulated failure")

    monkeypatch.setattr(artifact, "_write_text", fail)
    with pytest.raises(OSError):
        artifact.save(toy_pair[0], tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_file_and_a_folder_that_is_not_an_artifact(tmp_path, toy_pair, monkeypatch):
    q = toy_pair[0]
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArtifactError, match=r"'.*/f' is a file; an artifact is a folder"):
        artifact.save(q, tmp_path / "f")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "fxquant.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"'.*/mine' is not empty and is not an fxquant artifact \(it holds 'notes.txt'\)"
                                            r".*force=True \(--force\)"):
        artifact.save(q, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    artifact.save(q, mine, force=True)
    assert sorted(p.name for p in mine.iterdir()) == ["fxquant.json", "model.safetensors"]
    artifact.save(toy_pair[1], mine)  # an artifact is replaced without force, and so is an empty folder
    assert _digest_of(mine) == state_digest(toy_pair[1])
    (tmp_path / "empty").mkdir()
    artifact.save(q, tmp_path / "empty")
    with monkeypatch.context() as m:
        m.chdir(tmp_path / "empty")
        for here in (".", tmp_path):
            with pytest.raises(ArtifactError, match="is the working folder or one above it; .*into a subfolder"):
                artifact.save(q, here, force=True)
        assert artifact.save(q, "sub") == Path("sub") and _digest_of(tmp_path / "empty" / "sub") == state_digest(q)


@pytest.mark.parametrize("tensor", ["block.fc1.weight", "quantizers.block_fc1_in0.scale", "head.bias"],
                         ids=["weight", "quantizer-scale", "bias"])
def test_a_flipped_bit_in_a_tensor_is_refused_by_name(tmp_path, toy_pair, tensor):
    out = artifact.save(toy_pair[0], tmp_path / "a")
    _flip_bit(out / "model.safetensors", tensor)
    with pytest.raises(ArtifactError, match=rf"(?s)was changed after it was saved:\n  model.safetensors: tensor '{tensor}' "
                                            rf"differs from the saved one.*verify=False"):
        artifact.load(out, model=toy_vit())
    edited = artifact.load(out, model=toy_vit(), verify=False)
    sd, ref = edited.state_dict(), toy_pair[0].state_dict()
    assert [k for k in sd if not torch.equal(sd[k], ref[k])] == [tensor]


def test_a_tensor_reinterpreted_by_a_header_edit_is_refused(tmp_path, toy_pair):
    """Same bytes, another dtype in the safetensors header: still a changed tensor."""
    out = artifact.save(toy_pair[0], tmp_path / "a")
    path = out / "model.safetensors"
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["head.bias"]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    path.write_bytes(bytes(raw[:8]) + text + bytes(raw[8 + n:]))
    with pytest.raises(ArtifactError, match=r"model.safetensors: tensor 'head.bias' differs from the saved one"):
        artifact.load(out, model=toy_vit())


EDITS = {
    "pipeline": (lambda m: m["pipeline"][0]["config"]["act"].update(bits=4),
                 r"section 'pipeline' differs from the saved one \(changed pipeline\[0\] \(annotate_uniform\)\)"),
    "recipe": (lambda m: m["recipe"].update(a_bits=4), r"section 'recipe' differs from the saved one \(changed recipe.a_bits\)"),
    "quantizers": (lambda m: m["quantizers"]["block.fc1.weight_fake_quant"]["spec"].update(bits=4),
                   r"section 'quantizers' differs .*\(changed quantizers\['block.fc1.weight_fake_quant'\]\)"),
    "records": (lambda m: m["records"][2].update(images=1),
                r"section 'records' differs .*\(changed records\[2\] \(calibrate\)\)"),
    "format_version": (lambda m: m.update(format_version=1), r"section 'format_version' differs from the saved one \(now 1\)"),
    "model": (lambda m: m.update(model="cifar-vit"), r"section 'model' differs from the saved one \(now \"cifar-vit\"\)"),
    "example_inputs": (lambda m: m["example_inputs"][0][0].__setitem__(0, 3), r"section 'example_inputs' differs"),
    "capture": (lambda m: m["capture"].pop("method"), r"section 'capture' differs .*\(removed capture.method\)"),
}


@pytest.mark.parametrize("section", list(EDITS))
def test_an_edited_json_section_is_refused_and_loads_unverified(tmp_path, toy_pair, section):
    edit, message = EDITS[section]
    out = artifact.save(toy_pair[0], tmp_path / "a")
    _edit_meta(out, edit)
    with pytest.raises(ArtifactError, match=rf"(?s)artifact '.*/a' was changed after it was saved:\n  fxquant.json: {message}"
                                            r".*fxquant.artifact.load\(path, verify=False\) \(fxquant eval --no-verify\)"):
        artifact.load(out, model=toy_vit())
    edited = artifact.load(out, model=toy_vit(), verify=False)
    if section == "pipeline":
        assert edited.meta[PIPELINE][0]["config"]["act"]["bits"] == 4


def test_an_edited_digest_table_or_swapped_weights_are_refused(tmp_path, toy_pair):
    out = artifact.save(toy_pair[0], tmp_path / "a")
    # an edit with its section digest updated to match: the artifact digest still catches it
    _edit_meta(out, lambda m: (m["recipe"].update(a_bits=4),
                               m["digests"]["sections"].update(recipe=artifact._sha256(m["recipe"])),
                               m["digests"]["entries"]["recipe"].update(a_bits=artifact._sha256(4))))
    with pytest.raises(ArtifactError, match="the 'digests' record was edited"):
        artifact.load(out, model=toy_vit())
    # the same tensors saved with other example inputs: each file is intact, but they come from different saves
    a = artifact.save(toy_pair[0], tmp_path / "b")
    other = artifact.save(toy_pair[0], tmp_path / "c", example_inputs=(toy_calib()[0][:1],))
    shutil.copy(other / "model.safetensors", a / "model.safetensors")
    with pytest.raises(ArtifactError, match=r"model.safetensors and fxquant.json come from different saves"):
        artifact.load(a, model=toy_vit())
    # information outside the digested sections (extra=, report, versions) may be edited
    info = artifact.save(toy_pair[0], tmp_path / "d", extra={"eval": {"top1": 50.0}})
    _edit_meta(info, lambda m: (m["eval"].update(top1=99.0), m.pop("report")))
    assert _digest_of(info) == state_digest(toy_pair[0])
    with pytest.raises(ArtifactError, match=r"extra= may not set \['pipeline'\]"):
        artifact.save(toy_pair[0], tmp_path / "e", extra={"pipeline": []})


def test_format_versions(tmp_path, toy_pair):
    q = toy_pair[0]
    out = artifact.save(q, tmp_path / "a")
    for bad, message in ((0, r"format_version 0 is not a valid artifact version \(this fxquant reads versions 1..2\)"),
                         (3, r"format_version 3 is newer than this fxquant reads \(1..2\); upgrade fxquant"),
                         ("2", r"format_version '2' is not a valid artifact version")):
        _edit_meta(out, lambda m: m.update(format_version=bad))
        with pytest.raises(ArtifactError, match=message):
            artifact.load(out, model=toy_vit(), verify=False)
    # a version-1 artifact (before digests: no 'digests', no digest in the safetensors header) loads, with a warning
    v1 = artifact.save(q, tmp_path / "v1")
    _edit_meta(v1, lambda m: (m.update(format_version=1), m.pop("digests")))
    save_file(load_file(str(v1 / "model.safetensors")), str(v1 / "model.safetensors"), metadata={"format": artifact.FORMAT})
    with pytest.warns(ArtifactWarning, match=r"format-version-1 artifact: it records no digests, so it cannot be verified"):
        assert _digest_of(v1) == state_digest(q)
    # a version-2 artifact without its digests is refused
    _edit_meta(out, lambda m: (m.update(format_version=2), m.pop("digests")))
    with pytest.raises(ArtifactError, match=r"records no digests \('digests' is missing\), so the artifact cannot be verified"):
        artifact.load(out, model=toy_vit())


def test_damaged_files_are_named(tmp_path, toy_pair):
    out = artifact.save(toy_pair[0], tmp_path / "a")
    weights, meta = out / "model.safetensors", out / "fxquant.json"
    good_weights, good_meta = weights.read_bytes(), meta.read_text()
    meta.write_text(good_meta[: len(good_meta) // 2])
    with pytest.raises(ArtifactError, match=r"'.*/a/fxquant.json' is not valid JSON \(.*\): the file is truncated or damaged"):
        artifact.load(out, model=toy_vit())
    meta.write_text(good_meta)
    weights.write_bytes(good_weights[: len(good_weights) - 100])
    with pytest.raises(ArtifactError, match=r"'.*/a/model.safetensors' cannot be read \(.*\): the file is truncated or damaged"):
        artifact.load(out, model=toy_vit(), verify=False)
    weights.unlink()
    with pytest.raises(ArtifactError, match=r"'.*/a/model.safetensors' is missing: the artifact is incomplete"):
        artifact.load(out, model=toy_vit())
    with pytest.raises(ArtifactError, match=r"'.*/nowhere' does not exist"):
        artifact.load(tmp_path / "nowhere")
