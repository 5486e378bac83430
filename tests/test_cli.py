"""The ``fxquant`` command line on the embedded model (runs without shared/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from fxquant import cli
from fxquant.cli import main

EVAL_KEYS = ["model", "recipe", "top1", "fp32_top1", "test_images", "calib_images", "calib_seconds", "eval_seconds", "seed",
             "processes", "state_digest", "activation_bits"]


def test_recipes_lists_recipes_and_passes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("w8a8", "w6a6", "w4a4", "fp32", "annotate_uniform", "insert_quantizers", "calibrate"):
        assert name in out


def test_eval_json_has_exactly_the_documented_keys(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(["eval", "--model", "embedded", "--recipe", "w8a8", "--limit", "200", "--json", str(path), "--quiet"]) == 0
    res = json.loads(path.read_text())
    assert list(res) == EVAL_KEYS
    assert res["model"] == "embedded" and res["recipe"] == "w8a8" and res["test_images"] == 200 and res["calib_images"] == 32
    assert isinstance(res["top1"], float) and 0 <= res["top1"] <= 100 and abs(res["top1"] - res["fp32_top1"]) < 3
    assert res["seed"] == 0 and res["calib_seconds"] > 0 and res["eval_seconds"] > 0
    assert res["processes"] == 1 and len(res["state_digest"]) == 64
    assert res["activation_bits"]["nominal"] == res["activation_bits"]["with_metadata"] == 8.0  # static: no metadata


def test_quantize_then_eval_artifact(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", "embedded", "--recipe", "w4a4", "--out", str(out), "--quiet",
                 "--calib-images", "16"]) == 0
    direct = tmp_path / "direct.json"
    saved = tmp_path / "saved.json"
    assert main(["eval", "--model", "embedded", "--recipe", "w4a4", "--calib-images", "16", "--limit", "100", "--quiet",
                 "--json", str(direct)]) == 0
    assert main(["eval", "--model", str(out), "--limit", "100", "--quiet", "--json", str(saved)]) == 0
    a, b = json.loads(direct.read_text()), json.loads(saved.read_text())
    assert a["top1"] == b["top1"] and b["recipe"] == "w4a4" and b["calib_images"] == 16


def test_errors_exit_2_with_message(capsys):
    assert main(["eval", "--model", "embedded", "--recipe", "nope", "--quiet"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert main(["eval", "--model", "timm:not_a_model", "--recipe", "w8a8", "--quiet"]) == 2


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "fxquant.cli", "recipes"], capture_output=True, text=True, check=True)
    assert "w4a4" in r.stdout


def test_eval_reads_the_fp32_top1_from_the_cache_unless_told_to_recompute(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["eval", "--model", "embedded", "--recipe", "w8a8", "--limit", "100", "--quiet", "--json"]
    assert main(argv + [str(tmp_path / "a.json")]) == 0
    cache = tmp_path / "cache" / "fp32_top1.json"
    table = json.loads(cache.read_text())
    (key, measured), = table.items()
    assert json.loads((tmp_path / "a.json").read_text())["fp32_top1"] == round(measured, 4)
    cache.write_text(json.dumps({key: 12.5}))  # a planted value proves the second run reads the cache
    assert main(argv + [str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["fp32_top1"] == 12.5
    assert main(argv + [str(tmp_path / "c.json"), "--recompute-fp32"]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["fp32_top1"] == round(measured, 4)
    assert json.loads(cache.read_text())[key] == measured  # and the cache is corrected


# ------------------------------------------------------------------------------------------
# Bad input fails before any work, with the value named (issue 27)
# ------------------------------------------------------------------------------------------


def _exit_2(argv, capsys) -> str:
    """Run the CLI; it must stop with exit status 2 (argparse or fxquant error). Returns stderr."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse rejects a value at parse time
        code = e.code
    assert code == 2
    return capsys.readouterr().err


def test_bad_arguments_fail_at_parse_time(tmp_path, capsys, monkeypatch):
    eval_ = ["eval", "--model", "embedded", "--recipe", "w8a8", "--quiet"]
    t0 = time.perf_counter()
    assert "argument --limit: must be at least 1, got 0" in _exit_2(eval_ + ["--limit", "0"], capsys)
    assert "argument --limit: must be at least 1, got -3" in _exit_2(eval_ + ["--limit", "-3"], capsys)
    assert "argument --calib-images: must be 0 or more, got -1" in _exit_2(eval_ + ["--calib-images", "-1"], capsys)
    assert "argument --images: must be at least 1, got 0" in _exit_2(
        ["sensitivity", "--model", "embedded", "--recipe", "w8a8", "--images", "0"], capsys)
    err = _exit_2(eval_ + ["--json", str(tmp_path / "missing" / "r.json")], capsys)
    assert f"argument --json: the folder '{tmp_path / 'missing'}' of '{tmp_path / 'missing' / 'r.json'}' does not exist" in err
    assert f"argument --json: '{tmp_path}' is a folder; give a file path" in _exit_2(eval_ + ["--json", str(tmp_path)], capsys)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes anywhere: emulate the folder's permissions
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked)
    err = _exit_2(["platform", "--model", "embedded", "--json", str(locked / "r.json")], capsys)
    assert f"argument --json: '{locked / 'r.json'}' cannot be written" in err
    assert time.perf_counter() - t0 < 5  # nothing was loaded


def test_bad_values_fail_before_calibration(tmp_path, capsys, monkeypatch):
    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(cli, "fx_compile", no_calibration)
    eval_ = ["eval", "--model", "embedded", "--recipe", "w4a4", "--quiet"]
    assert "--set a_bits is given twice (a_bits=6 and a_bits=5); give each option once" in _exit_2(
        eval_ + ["--set", "a_bits=6", "--set", "a_bits= 5"], capsys)
    assert "--calib-images 0 gives recipe 'w4a4' no calibration data; it calibrates on 32 images by default" in _exit_2(
        eval_ + ["--calib-images", "0"], capsys)
    (tmp_path / "empty").mkdir()
    err = _exit_2(eval_ + ["--data", str(tmp_path / "empty")], capsys)
    assert f"--data {tmp_path / 'empty'}: Couldn't find any class folder" in err
    images = tmp_path / "images"
    for c in range(10):
        (images / f"c{c}").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(images / f"c{c}" / "0.png")
    (images / "c7" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    err = _exit_2(eval_ + ["--data", str(images), "--calib-images", "4"], capsys)
    assert f"'{images / 'c7' / 'broken.jpg'}' (UnidentifiedImageError" in err
    (tmp_path / "file").write_text("x")
    quantize = ["quantize", "--model", "embedded", "--recipe", "w8a8", "--quiet", "--out"]
    assert f"'{tmp_path / 'file'}' is a file; an artifact is a folder" in _exit_2(quantize + [str(tmp_path / "file")], capsys)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    err = _exit_2(quantize + [str(tmp_path / "mine")], capsys)
    assert f"'{tmp_path / 'mine'}' is not empty and is not an fxquant artifact (it holds 'notes.txt')" in err and "--force" in err


def test_quantize_force_and_eval_of_an_edited_artifact(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("replaced")
    assert main(["quantize", "--model", "embedded", "--recipe", "w8a8", "--calib-images", "4", "--out", str(out), "--force",
                 "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["fxquant.json", "model.safetensors"]
    meta = json.loads((out / "fxquant.json").read_text())
    meta["pipeline"][0]["config"]["act"]["bits"] = 4
    (out / "fxquant.json").write_text(json.dumps(meta))
    capsys.readouterr()
    err = _exit_2(["eval", "--model", str(out), "--limit", "20", "--quiet"], capsys)
    assert "was changed after it was saved:\n  fxquant.json: section 'pipeline' differs from the saved one " \
           "(changed pipeline[0] (annotate_uniform))" in err and "fxquant eval --no-verify" in err
    assert main(["eval", "--model", str(out), "--limit", "20", "--quiet", "--no-verify"]) == 0


def test_recipes_lists_options_with_defaults_that_round_trip(capsys):
    from fxquant.recipes import get_recipe, list_recipes

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "module docstring" not in out and "``" not in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "w_bits=4, a_bits=4, w_symmetric=false" in lines["w4a4"]
    assert "calib_images=32, bitlog2_attention.scheme=half17" in out
    for name in list_recipes():  # every listed default, given back with --set, is the recipe's own
        ref = get_recipe(name)
        for option in cli.recipe_options(name):
            key, value = option.split("=", 1)
            got = get_recipe(name, **{key: "" if value == "''" else value})
            assert [p.config() for p in got.build_passes()] == [p.config() for p in ref.build_passes()], option
