"""What the README's "Layout" section claims about imports, checked on the source.

The section's ``layers`` block lists the layers from the bottom, one line per layer, each line a list of units: a
package (a path ending in ``/``) or a single module (``.py``); an unindented line followed by indented ones names
the directory that the indented units lie in. A module of the checked tree (nanovllm/, benchmarks/ and the
repository's top-level scripts) imports only units of its own layer or below; two packages of one layer never
import each other; and no modules import each other in a circle, directly or through others, counting imports
inside functions (a circle inside one package too). A unit named in the block that does not exist is allowed (the
block may name one before it lands); a module that exists and lies in no unit fails.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("nanovllm", "benchmarks")  # packages whose every module is checked, with the top-level scripts


def readme_layers(readme: str) -> list[list[str]]:
    """The units of each layer, from the bottom, as repository paths, read from the ``layers`` block of the
    README's "## Layout" section."""
    section = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert section, 'the README has no "## Layout" section'
    block = re.search(r"^```layers\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, 'the README\'s "Layout" section has no ```layers block'
    lines = [ln.split("#")[0].rstrip() for ln in block.group(1).splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    layers, directory = [], ""
    for i, line in enumerate(lines):
        indented = line.startswith(" ")
        if not indented and i + 1 < len(lines) and lines[i + 1].startswith(" "):
            directory = line.strip()
            assert directory.endswith("/") and " " not in directory, f"not a directory: {line!r}"
            continue
        units = [(directory if indented else "") + u for u in line.split()]
        bad = [u for u in units if not u.endswith(("/", ".py"))]
        assert not bad, f"layers block: {bad} are neither a package (ending in /) nor a module (.py)"
        layers.append(units)
    return layers


def modules(root: Path) -> dict[str, Path]:
    """Every importable module under ``root`` by dotted name: the checked tree's, and tests/'s under both the
    names ``tests.x`` and ``x`` (tests/ is on sys.path when pytest runs, and scripts that add it import so)."""
    out = {}
    files = [p for top in CHECKED for p in (root / top).rglob("*.py")] + list(root.glob("*.py"))
    for path in files + list((root / "tests").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        out[".".join(parts)] = path
        if parts[0] == "tests" and len(parts) > 1:
            out.setdefault(".".join(parts[1:]), path)
    return out


def checked(root: Path, known: dict[str, Path]) -> list[Path]:
    return sorted({p for p in known.values() if p.relative_to(root).parts[0] != "tests"})


def resolve(name: str, known: dict[str, Path]) -> Path | None:
    """The file that importing ``name`` (a module, or a name inside one) runs last: its longest known prefix."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return known[".".join(parts[:n])]
    return None


def imports_of(path: Path, root: Path, known: dict[str, Path]) -> set[Path]:
    """The files of the repository that ``path`` imports, at any depth of its code (inside functions too)."""
    package = list(path.relative_to(root).parts[:-1])  # the package a relative import starts from
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            names += [f"{base}.{a.name}" for a in node.names]
    found = {resolve(n, known) for n in names}
    return {p for p in found if p is not None and p != path}


def unit_of(path: Path, root: Path, layers: list[list[str]]) -> tuple[int, str]:
    """(layer index, unit) of a file: the unit equal to its path, else the longest package holding it."""
    rel = path.relative_to(root).as_posix()
    hits = [(len(u), i, u) for i, units in enumerate(layers) for u in units
            if rel == u or (u.endswith("/") and rel.startswith(u))]
    assert hits, f"{rel} is in no layer: add it to the README's layers block (## Layout)"
    _, i, unit = max(hits)
    return i, unit


def violations(root: Path, layers: list[list[str]]) -> list[str]:
    known = modules(root)
    found = []
    for path in checked(root, known):
        my_layer, my_unit = unit_of(path, root, layers)
        for target in imports_of(path, root, known):
            layer, unit = unit_of(target, root, layers)
            rel, trel = path.relative_to(root).as_posix(), target.relative_to(root).as_posix()
            if layer > my_layer:
                found.append(f"{rel} imports {trel}, a layer above it ({unit} over {my_unit})")
            elif layer == my_layer and unit != my_unit and unit.endswith("/") and my_unit.endswith("/"):
                found.append(f"{rel} imports {trel}, beside it in one layer ({my_unit} and {unit})")
    return found


def circles(root: Path) -> list[tuple[str, ...]]:
    """Each set of modules that import each other, directly or through others (Tarjan's strongly connected
    components of the import graph with more than one module), as sorted repository paths."""
    known = modules(root)
    graph = {p: imports_of(p, root, known) for p in checked(root, known)}
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                out.append(tuple(sorted(p.relative_to(root).as_posix() for p in component)))

    for v in graph:
        if v not in index:
            visit(v)
    return sorted(out)


def readme_violations() -> list[str]:
    return violations(ROOT, readme_layers((ROOT / "README.md").read_text()))


def test_every_import_goes_down_the_readmes_layers():
    assert readme_violations() == []


def test_no_modules_import_each_other_in_a_circle():
    assert circles(ROOT) == []


# The checks on a small tree of their own, written under tmp_path.
PROBE_README = """# probe

## Layout

```layers
# from the bottom
nanovllm/
  config.py paths.py
  kernels/ distributed/
  engine/
  llm.py __init__.py
  not_yet/
benchmarks/
bench.py
tests/
```

## Next
"""


def probe_tree(tmp_path: Path, files: dict[str, str]) -> tuple[Path, list[list[str]]]:
    base = {"nanovllm/__init__.py": "from nanovllm.llm import LLM\n", "nanovllm/llm.py": "import nanovllm.engine\n",
            "nanovllm/config.py": "from nanovllm import paths\n", "nanovllm/paths.py": "import os\n",
            "nanovllm/kernels/__init__.py": "", "nanovllm/distributed/__init__.py": "",
            "nanovllm/engine/__init__.py": "", "nanovllm/engine/engine.py": "from nanovllm.kernels import ops\n",
            "nanovllm/kernels/ops.py": "import torch\n", "benchmarks/__init__.py": "",
            "benchmarks/common.py": "from nanovllm import LLM\n", "bench.py": "from benchmarks.common import x\n",
            "tests/conftest.py": "import pytest\n", "README.md": PROBE_README}
    for name, text in {**base, **files}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path, readme_layers((tmp_path / "README.md").read_text())


def test_the_readme_block_reads_as_layers_from_the_bottom():
    assert readme_layers(PROBE_README) == [
        ["nanovllm/config.py", "nanovllm/paths.py"], ["nanovllm/kernels/", "nanovllm/distributed/"],
        ["nanovllm/engine/"], ["nanovllm/llm.py", "nanovllm/__init__.py"], ["nanovllm/not_yet/"], ["benchmarks/"],
        ["bench.py"], ["tests/"]]


def test_a_sound_tree_passes_though_the_block_names_a_unit_not_there_yet(tmp_path):
    root, layers = probe_tree(tmp_path, {})
    assert violations(root, layers) == [] and circles(root) == []


@pytest.mark.parametrize("name, text, message", [
    ("nanovllm/kernels/probe.py", "def f():\n    from nanovllm.engine import engine\n",
     "nanovllm/kernels/probe.py imports nanovllm/engine/engine.py, a layer above it"),
    ("nanovllm/kernels/probe.py", "import nanovllm.distributed\n", "beside it in one layer"),
    ("nanovllm/paths.py", "from nanovllm import LLM\n", "nanovllm/paths.py imports nanovllm/__init__.py"),
    ("benchmarks/probe.py", "from conftest import build_checkpoint\n", "imports tests/conftest.py, a layer above"),
    ("benchmarks/probe.py", "from bench import workload\n", "imports bench.py, a layer above"),
])
def test_the_check_catches_an_import_against_the_layers(tmp_path, name, text, message):
    root, layers = probe_tree(tmp_path, {name: text})
    assert any(message in v for v in violations(root, layers)), violations(root, layers)


def test_a_module_in_no_layer_fails(tmp_path):
    root, layers = probe_tree(tmp_path, {"nanovllm/stray.py": ""})
    with pytest.raises(AssertionError, match="nanovllm/stray.py is in no layer"):
        violations(root, layers)


def test_the_check_finds_a_circle_inside_a_package_through_a_function_level_import(tmp_path):
    root, _ = probe_tree(tmp_path, {"nanovllm/engine/a.py": "from nanovllm.engine.b import B\n",
                                    "nanovllm/engine/b.py": "def f():\n    from nanovllm.engine import c\n",
                                    "nanovllm/engine/c.py": "from . import a\n"})
    assert circles(root) == [("nanovllm/engine/a.py", "nanovllm/engine/b.py", "nanovllm/engine/c.py")]
