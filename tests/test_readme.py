"""The README's "Python API" code runs as written: every ```python block of that section, in
order, in one namespace, in a temporary folder as the working directory.

The ONNX export (``torch.onnx.export``, about 20 s on 2 CPU cores) is what makes the whole section
slow: the default test records the ``fxquant.export.to_onnx`` call instead of making it (the
exporter is tested in ``tests/export/``), the ``slow`` one runs every line for real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch import fx

import fxquant

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_blocks() -> list[str]:
    text = README.read_text()
    section = re.search(r"^## Python API\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Python API' section"
    return re.findall(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)


def _run_blocks() -> dict:
    namespace: dict = {"__name__": "__readme__"}
    for i, code in enumerate(python_api_blocks()):
        exec(compile(code, f"README.md (Python API, block {i + 1})", "exec"), namespace)
    return namespace


def test_python_api_section_runs_as_written(tmp_path, monkeypatch):
    assert len(python_api_blocks()) >= 2
    exports = []
    monkeypatch.setattr(fxquant.export, "to_onnx", lambda *args, **kwargs: exports.append((args, kwargs)))
    monkeypatch.chdir(tmp_path)
    ns = _run_blocks()
    assert (tmp_path / "out" / "fxquant.json").exists()
    (model, example_inputs, path), = [args for args, _ in exports]
    assert isinstance(model, fx.GraphModule) and model is ns["qmodel"] and path == "m.onnx"
    assert all(isinstance(ns[k], fx.GraphModule) for k in ("q6", "qp", "ql"))


@pytest.mark.slow
def test_python_api_section_runs_as_written_with_the_onnx_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run_blocks()
    assert (tmp_path / "m.onnx").stat().st_size > 0
