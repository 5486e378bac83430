"""The documentation stays true: docs/results.md is what docs/results/*.json renders to
(``tools/results.py --check``), ``--run`` re-measures rows, and the README's layer table is
``tests/test_layers.py``'s ``LAYERS``."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


sys.path.insert(0, str(ROOT / "tools"))  # the tools import their shared helper, tools/_bench.py
results = _load("fxquant_tools_results", ROOT / "tools" / "results.py")


def test_results_md_is_generated_from_the_json():
    assert results.check() == [], "run: python tools/results.py"
    assert results.main(["--check"]) == 0


def test_every_table_states_its_machine_and_has_rows():
    topics = results.load_topics()
    assert {stem for stem, _ in topics} >= {"accuracy_cifar", "aphq", "igq", "oqfv", "mixed_precision", "deployment_cpu", "gpu"}
    for stem, topic in topics:
        assert results.validate(topic) == [], stem
        for table in topic["tables"]:
            assert table["machine"].strip(), f"{stem}:{table['id']}"
            assert table["rows"], f"{stem}:{table['id']}"


def test_check_catches_an_edited_json(tmp_path):
    shutil.copytree(results.RESULTS_DIR, tmp_path / "results")
    out = tmp_path / "results.md"
    results.write(tmp_path / "results", out)
    assert results.check(tmp_path / "results", out) == []
    f = tmp_path / "results" / "accuracy_cifar.json"
    topic = json.loads(f.read_text())
    topic["tables"][0]["rows"][0]["cifar-vit"] = 12.34
    f.write_text(results.dump_topic(topic))
    assert any("is not what" in p for p in results.check(tmp_path / "results", out))
    assert results.main(["--check", "--dir", str(tmp_path / "results"), "--out", str(out)]) == 1


def test_cells_render_as_written():
    col = {"key": "x", "format": ".2f"}
    assert results.format_cell(67.6, col) == "67.60"
    assert results.format_cell(-1.5, col) == "−1.50"
    assert results.format_cell(None, col) == ""
    assert results.format_cell("174*", col) == "174\\*"
    assert results.format_cell("w8a8", {"key": "r", "code": True}) == "`w8a8`"
    assert results.format_cell(394506, {"key": "n", "format": ","}) == "394,506"


def _fake_topic(commands: dict[str, str]) -> dict:
    return {
        "title": "Fake",
        "tables": [{
            "id": "t", "title": "A fake table", "machine": "somewhere else",
            "columns": [{"key": "name", "label": "name"},
                        {"key": "top1", "label": "top-1", "format": ".2f", "field": "top1"},
                        {"key": "delta", "label": "vs FP32", "format": ".2f", "field": "top1 - fp32_top1"},
                        {"key": "a", "label": "A s", "format": ".1f", "field": ["stage_s.A", "missing"]},
                        {"key": "raw", "label": "raw"}],
            "rows": [{"name": "measured", "top1": 1.0, "delta": 0.0, "a": None, "run": commands["measured"]},
                     {"name": "no json", "top1": 2.0, "run": commands["no json"]},
                     {"name": "tool", "raw": "x", "run": {"raw": commands["tool"]}}],
        }],
    }


def test_run_updates_the_rows_it_measures(tmp_path, capsys):
    writer = (f"{shlex.quote(sys.executable)} -c \"import json, sys; json.dump({{'top1': 12.3456, 'fp32_top1': 20.0, "
              f"'stage_s': {{'A': 1.26}}}}, open(sys.argv[1], 'w'))\" {{json}}")
    folder = tmp_path / "results"
    folder.mkdir()
    commands = {"measured": writer, "no json": "python tools/aph_directions.py", "tool": writer + " --tool"}
    (folder / "fake.json").write_text(results.dump_topic(_fake_topic(commands)))
    out = tmp_path / "results.md"

    assert results.run_tables(["fake"], results_dir=folder, out=out) == 0
    printed = capsys.readouterr().out
    table = json.loads((folder / "fake.json").read_text())["tables"][0]
    measured, no_json, tool = table["rows"]
    assert (measured["top1"], measured["delta"], measured["a"]) == (12.35, -7.65, 1.3)
    assert measured["machine"].startswith(results.this_machine() + " (")
    assert no_json["top1"] == 2.0 and "machine" not in no_json
    assert "not re-runnable (writes no JSON): python tools/aph_directions.py" in printed
    assert table["last_run"][0]["output"]["top1"] == 12.3456 and tool["raw"] == "x"
    assert results.check(folder, out) == []
    md = out.read_text()
    assert "| measured | 12.35 | −7.65 | 1.3 |" in md and "machine (when not the table's)" in md


def test_run_rejects_an_unknown_table(tmp_path):
    with pytest.raises(SystemExit, match="unknown table"):
        results.run_tables(["no_such_table"], dry_run=True)


@pytest.mark.slow
def test_run_measures_the_embedded_model(tmp_path):
    """``--run`` on a real ``fxquant eval --json`` command (about 20 s on 2 cores)."""
    folder = tmp_path / "results"
    folder.mkdir()
    cmd = "fxquant eval --model embedded --recipe w8a8 --calib-images 8 --limit 20 --quiet --json {json}"
    topic = _fake_topic({"measured": cmd, "no json": "true", "tool": cmd})
    (folder / "fake.json").write_text(results.dump_topic(topic))
    assert results.run_tables(["fake:t"], results_dir=folder, out=tmp_path / "results.md") == 0
    row = json.loads((folder / "fake.json").read_text())["tables"][0]["rows"][0]
    assert 0 <= row["top1"] <= 100 and -100 <= row["delta"] <= 100 and "machine" in row


# ------------------------------------------------------------------------------------------
# README "Layout": the layer table is tests/test_layers.py's LAYERS
# ------------------------------------------------------------------------------------------


def _short(module: str) -> str:
    return module.removeprefix("fxquant.core.").removeprefix("fxquant.")


def _layout_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1].splitlines()


def test_readme_layer_table_matches_test_layers():
    layers_mod = _load("fxquant_test_layers", ROOT / "tests" / "test_layers.py")
    lines = _layout_block()
    numbered = [(int(m.group(1)), m.group(2).strip(), line) for line in lines
                if (m := re.search(r"(?:^|\s)(\d{1,2})  ([a-z_][a-z_.,| ]*)", line))]
    assert [n for n, _, _ in numbered] == list(range(len(layers_mod.LAYERS)))[::-1], numbered
    for n, text, _ in numbered:
        members, independent = layers_mod.LAYERS[n]
        expected = (" | " if independent else ", ").join(_short(m) for m in members)
        assert text == expected, f"README layer {n}: {text!r}, tests/test_layers.py: {expected!r}"
    for folder, layers in layers_mod.FOLDER_LAYERS.items():
        rows = [line for n, _, line in numbered if n in layers]
        assert any(f"{folder}/" in line for line in rows), f"README: no layer row names the folder {folder}/"
