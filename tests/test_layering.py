"""The package's layers: a package imports only packages below it, and no two packages import each other.

The order (README, "Layout") from the bottom: the foundation modules, kernels and distributed, layers, step, models,
platforms, compile, engine, the user API (``llm``, ``cli``, ``precompile``, ``detokenizer``, ``workers``, the
package itself), tools, entrypoints (the server), ``serve`` (its ``python -m`` entry). Imports inside functions
count too. Packages of one layer never import each other; the single modules of the foundation and API layers may,
but no two units (package or module) import each other.
"""
import ast
from pathlib import Path

import nanovllm

PACKAGE = Path(nanovllm.__file__).parent
LAYERS = [
    ("nanovllm.logger", "nanovllm.paths", "nanovllm.version", "nanovllm.config", "nanovllm.sampling_params",
     "nanovllm.traced"),
    ("nanovllm.kernels", "nanovllm.distributed"),
    ("nanovllm.layers",),
    ("nanovllm.step",),
    ("nanovllm.models",),
    ("nanovllm.platforms",),
    ("nanovllm.compile",),
    ("nanovllm.engine",),
    ("nanovllm.parallel",),
    ("nanovllm.llm", "nanovllm.cli", "nanovllm.precompile", "nanovllm.detokenizer", "nanovllm.multimodal",
     "nanovllm.prompts", "nanovllm"),
    ("nanovllm.tools",),
    ("nanovllm.entrypoints",),
    ("nanovllm.serve",),
]


def unit_of(module: str) -> tuple[int, str]:
    """(layer index, the unit it belongs to: a package or a foundation/API module) of a nanovllm module."""
    best = None
    for i, units in enumerate(LAYERS):
        for unit in units:
            if module == unit or module.startswith(unit + "."):
                if best is None or len(unit) > len(best[1]):
                    best = (i, unit)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and the README's layout"
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every nanovllm module ``path`` imports, at any depth of its code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "nanovllm"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nanovllm":
            out |= {node.module + "." + a.name if (PACKAGE.parent / (node.module + "." + a.name).replace(".", "/")
                                                   ).with_suffix(".py").exists() else node.module
                    for a in node.names}
    return out


_MODULE_LAYERS = (0, 9)  # layers of single modules, which may import each other


def violations() -> list[str]:
    found, edges = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        my_layer, my_unit = unit_of(me)
        for target in imports_of(path):
            layer, unit = unit_of(target)
            if layer > my_layer:
                found.append(f"{me} imports {target}, a layer above it ({unit} over {my_unit})")
            elif layer == my_layer and unit != my_unit and layer not in _MODULE_LAYERS:
                found.append(f"{me} imports {target}, beside it in one layer ({my_unit} and {unit})")
            if unit != my_unit and unit != "nanovllm":  # importing any submodule runs the package's __init__
                edges.add((my_unit, unit))
    found += [f"{a} and {b} import each other" for a, b in sorted(edges) if (b, a) in edges and a < b]
    return found


def test_no_package_imports_up_the_layers_or_sideways():
    assert violations() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    bad = PACKAGE / "kernels" / "_layering_probe.py"
    bad.write_text("from nanovllm.engine import engine\n")
    try:
        assert any("_layering_probe imports nanovllm.engine" in v for v in violations())
    finally:
        bad.unlink()

