"""``tools/_bench.py``, the helper the scripts in ``tools/`` share: interleaved rounds (order, best
round, errors), timers, recipe arguments through the CLI's ``--set`` parser, tables and ``--json``
files with the machine facts. ``tools/`` is no package: ``_bench`` is loaded from its file."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import sys
import traceback
from pathlib import Path

import pytest
import torch

import fxquant.cli
from fxquant.core.errors import FxQuantError

TOOLS = Path(__file__).resolve().parents[1] / "tools"
_spec = importlib.util.spec_from_file_location("_bench", TOOLS / "_bench.py")
_bench = importlib.util.module_from_spec(_spec)
sys.modules["_bench"] = _bench  # dataclasses look their module up by name
_spec.loader.exec_module(_bench)


def test_interleaved_rounds_runs_every_variant_once_per_round_in_order():
    calls = []
    times = {"a": [5.0, 3.0, 4.0], "b": [1.0, 2.0, 0.5], "c": [7.0, 7.0, 6.5]}

    def measure(key):
        calls.append(key)
        return times[key][sum(k == key for k in calls) - 1]

    res = _bench.interleaved_rounds({k: (lambda k=k: measure(k)) for k in ("a", "b", "c")}, rounds=3)
    assert calls == ["a", "b", "c"] * 3
    assert res.results == times
    assert res.best() == {"a": 3.0, "b": 0.5, "c": 6.5}  # each variant's best round
    assert res.best(max) == {"a": 5.0, "b": 2.0, "c": 7.0}
    assert len(res.loads) == 3 and not res.failed


def test_interleaved_rounds_keeps_tuple_keys_in_mapping_order():
    calls = []
    measures = {(v, b): (lambda v=v, b=b: calls.append((v, b)) or float(b)) for v in ("x", "y") for b in (1, 32)}
    res = _bench.interleaved_rounds(measures, rounds=2)
    assert calls == [("x", 1), ("x", 32), ("y", 1), ("y", 32)] * 2
    assert res.best() == {("x", 1): 1.0, ("x", 32): 32.0, ("y", 1): 1.0, ("y", 32): 32.0}


def test_interleaved_rounds_drops_a_failing_variant_after_on_error():
    calls, errors = [], []

    def flaky():
        calls.append("flaky")
        if len([c for c in calls if c == "flaky"]) == 2:
            raise RuntimeError("boom")
        return 1.0

    def on_error(key, e):
        errors.append((key, str(e), "RuntimeError: boom" in traceback.format_exc()))

    res = _bench.interleaved_rounds({"ok": lambda: calls.append("ok") or 2.0, "flaky": flaky}, rounds=3, on_error=on_error)
    assert calls == ["ok", "flaky", "ok", "flaky", "ok"]
    assert errors == [("flaky", "boom", True)]
    assert res.failed == {"flaky": "RuntimeError: boom"}
    assert res.results == {"ok": [2.0, 2.0, 2.0], "flaky": [1.0]}
    with pytest.raises(RuntimeError, match="boom"):  # without on_error it propagates
        calls.clear()
        _bench.interleaved_rounds({"flaky": flaky}, rounds=3)


def test_median_ms_warms_up_and_runs_under_inference_mode():
    seen = []
    ms = _bench.median_ms(lambda: seen.append(torch.is_inference_mode_enabled()), warmup=2, reps=5)
    assert len(seen) == 7 and all(seen) and ms >= 0
    seen.clear()
    _bench.median_ms(lambda: seen.append(torch.is_inference_mode_enabled()), warmup=0, reps=1, inference=False)
    assert seen == [False]
    assert _bench.call_ms(seen.append, 3) >= 0 and seen[-1] == 3
    calls = []
    assert _bench.kernel_ms(lambda: calls.append(1), "cpu") >= 0 and len(calls) == 4  # 1 warm-up + 3 timed


def test_recipe_arguments_go_through_the_cli_parser(monkeypatch):
    seen = []
    monkeypatch.setattr(fxquant.cli, "parse_overrides", lambda pairs: seen.append(pairs) or {"via": "cli"})
    assert _bench.parse_overrides(["a=1"]) == {"via": "cli"} and seen == [["a=1"]]  # the CLI's own parser
    monkeypatch.undo()
    assert _bench.parse_recipe_arg("w4a4:a_bits=6") == ("w4a4", {"a_bits": "6"})
    assert _bench.parse_recipe_arg("w8a8") == ("w8a8", {})
    assert _bench.parse_recipe_arg("w8a8-sym:attention_matmuls=qk; a_bits = 7") == (
        "w8a8-sym", {"attention_matmuls": "qk", "a_bits": "7"})
    assert _bench.parse_overrides(["iters=1000", "lr=1e-3"]) == {"iters": "1000", "lr": "1e-3"}
    assert _bench.parse_overrides(None) == {}
    with pytest.raises(FxQuantError, match="key=value"):
        _bench.parse_recipe_arg("w4a4:a_bits")
    seen = []
    real = fxquant.cli.parse_overrides
    monkeypatch.setattr(fxquant.cli, "parse_overrides", lambda pairs: seen.append(pairs) or real(pairs))
    assert _bench.parse_recipe_arg("w4a4:a_bits=6;w_bits=3") == ("w4a4", {"a_bits": "6", "w_bits": "3"})
    assert seen == [["a_bits=6", "w_bits=3"]]
    assert _bench.recipe_from_arg("w4a4:a_bits=6").a_bits == 6


def test_write_json_adds_the_machine_facts_to_a_dict(tmp_path):
    path = tmp_path / "out.json"
    _bench.write_json(path, {"rows": [1, 2]})
    data = json.loads(path.read_text())
    assert list(data) == ["rows", "machine"] and data["rows"] == [1, 2]
    cpu = data["machine"]["cpu"]
    assert set(cpu) == {"model", "flags", "cpus", "cpus_usable", "torch_threads", "load_avg"}
    assert isinstance(cpu["model"], str) and set(cpu["flags"]) <= set(_bench.CPU_FLAGS) and len(cpu["load_avg"]) == 3
    assert cpu["torch_threads"] == torch.get_num_threads() and data["machine"]["torch"] == torch.__version__
    _bench.write_json(path, {"machine": "given"}, newline=True)  # one already there is kept
    assert path.read_text().endswith("}\n") and json.loads(path.read_text()) == {"machine": "given"}
    _bench.write_json(path, [{"a": 1}])  # a list of rows is written as it is
    assert json.loads(path.read_text()) == [{"a": 1}]
    _bench.write_json(None, {"a": 1})  # no --json: nothing
    _bench.write_json(path, {"d": object()}, default=str, indent=1)
    assert json.loads(path.read_text())["d"].startswith("<object")


def test_cpu_facts_line_and_flags():
    facts = _bench.cpu_facts()
    line = _bench.cpu_line(facts)
    assert line.startswith("CPU: ") and facts["model"] in line and "load" in line
    flags = _bench.cpu_flags()
    assert flags in ("unknown", "no AVX2") or set(flags.split()) == set(facts["flags"])


def test_table_matches_the_tools_former_format_strings():
    t = _bench.Table([("recipe", "16s"), ("form", "6s"), ("img/s", "8.1f"), ("vs fp32", "8.2f")])  # bench_eval
    assert t.header() == f"{'recipe':16s} {'form':6s} {'img/s':>8s} {'vs fp32':>8s}"
    assert t.row("w8a8", "lower", 123.45, 0.5) == f"{'w8a8':16s} {'lower':6s} {123.45:8.1f} {0.5:8.2f}"
    assert t.row("w8a8", "lower", 123.45, None) == f"{'w8a8':16s} {'lower':6s} {123.45:8.1f} {'-':>8s}"
    e2e = _bench.Table([("variant", "28s"), ("dtype", ">7"), ("ms", "9.3f"), ("cos", "7.4f")], indent="    ")
    assert e2e.header() == f"    {'variant':28s} {'dtype':>7} {'ms':>9} {'cos':>7}"
    assert e2e.row("fp16-eager", "float16", 1.5, math.nan) == f"    {'fp16-eager':28s} {'float16':>7} {1.5:9.3f} {'-':>7}"
    att = _bench.Table([("batch", "6d"), ("op", ">6"), ("int/fp16", "7.2f", "x")])  # a suffix widens the header
    assert att.header() == f"{'batch':>6} {'op':>6} {'int/fp16':>8}"
    assert att.row(8, "A·v", 1.234) == f"{8:6d} {'A·v':>6} {1.234:7.2f}x"
    assert att.row(8, "A·v") == f"{8:6d} {'A·v':>6}"  # fewer values: the first columns
    assert _bench.fmt(float("inf"), "9.2f") == f"{'-':>9}" and _bench.fmt("ok", ">5") == "   ok"
    table = _bench.text_table(("a", "bb"), [("xyz", "1"), ("q", "22")])
    assert table.splitlines() == ["a    bb", "---  --", "xyz  1 ", "q    22"]


def test_every_tool_imports_only_what_bench_defines():
    scripts = sorted(p for p in TOOLS.glob("*.py") if p.name != "_bench.py")
    assert not (TOOLS / "_device.py").exists()  # merged into _bench
    for path in scripts:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("_bench", "_device", "bench_kernels"):
                assert node.module == "_bench", f"{path.name} imports from {node.module}"
                for alias in node.names:
                    assert hasattr(_bench, alias.name), f"{path.name}: _bench has no {alias.name}"
