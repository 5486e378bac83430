"""The ``fxquant`` command line on the embedded model (runs without shared/)."""

from __future__ import annotations

import json
import subprocess
import sys

from fxquant.cli import main

EVAL_KEYS = ["model", "recipe", "top1", "fp32_top1", "test_images", "calib_images", "calib_seconds", "eval_seconds", "seed",
             "processes", "state_digest"]


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
