"""Every module under nanovllm/ opens with a docstring that states its contract in at most ``MAX_LINES`` lines.

A docstring's length is the line count of its text as written (``ast.get_docstring(..., clean=False)``, stripped).
Measurements and the history of experiments belong in docs/PERFORMANCE.md and git, details of one piece of code in
a comment beside it.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 15


def docstring_offenders(package: Path, max_lines: int = MAX_LINES) -> list[str]:
    """'path: why' for each module under ``package`` with no module docstring or one over ``max_lines`` lines."""
    offenders = []
    for path in sorted(package.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), str(path)), clean=False)
        name = path.relative_to(package.parent).as_posix()
        if doc is None:
            offenders.append(f"{name}: no module docstring")
        elif (lines := len(doc.strip().splitlines())) > max_lines:
            offenders.append(f"{name}: {lines} lines")
    return offenders


def test_every_module_has_a_docstring_of_at_most_15_lines():
    offenders = docstring_offenders(ROOT / "nanovllm")
    assert offenders == [], f"module docstrings missing or over {MAX_LINES} lines:\n" + "\n".join(offenders)


def test_the_check_names_a_long_or_missing_docstring_and_its_count(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "short.py").write_text('"""One line.\n\nThree.\n"""\nx = 1\n')
    (package / "sub" / "long.py").write_text('"""' + "\n".join(f"line {i}" for i in range(16)) + '\n"""\n')
    (package / "sub" / "edge.py").write_text('"""' + "\n".join(f"line {i}" for i in range(15)) + '"""\n')
    (package / "sub" / "late.py").write_text('import os\n"""Not a module docstring."""\n')
    assert docstring_offenders(package) == ["pkg/__init__.py: no module docstring",
                                            "pkg/sub/late.py: no module docstring", "pkg/sub/long.py: 16 lines"]
