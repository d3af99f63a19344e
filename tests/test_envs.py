"""Every environment variable is declared once, in ``nanovllm/envs.py``: the package reads none of its own anywhere
else, docs/ENVIRONMENT.md's table is generated from the declarations, a bad value names the variable and the value,
and the process-wide settings nanovllm changes are recorded for the start-up line."""
import ast
import re
from pathlib import Path

import pytest

import nanovllm
from nanovllm import envs

PACKAGE = Path(nanovllm.__file__).parent
ROOT = PACKAGE.parent
ENV_MODULE = PACKAGE / "envs.py"


def _code_strings(tree: ast.AST) -> list[str]:
    """The string constants of a module, but for docstrings, f-string parts (messages) and the names passed to
    ``envs.get``/``envs.is_set``."""
    skip = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    skip |= {id(node.args[0]) for node in ast.walk(tree) if isinstance(node, ast.Call) and node.args
             and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "is_set")
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "envs"}
    skip |= {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in skip]


def _reads_the_environment(tree: ast.AST) -> bool:
    return any((isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"))
               or (isinstance(node, ast.Name) and node.id in ("environ", "getenv"))
               for node in ast.walk(tree))


def test_no_module_but_envs_reads_a_nanovllm_variable():
    """A module that touches the environment must not name a NANOVLLM_ variable in its code (directly or through a
    constant): it asks ``envs.get`` instead."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == ENV_MODULE:
            continue
        tree = ast.parse(path.read_text())
        names = sorted({m for s in _code_strings(tree) for m in re.findall(r"NANOVLLM_[A-Z0-9_]+", s)})
        if names and _reads_the_environment(tree):
            offenders.append(f"{path.relative_to(ROOT)} reads {', '.join(names)}")
    assert offenders == [], "read these through nanovllm/envs.py: " + "; ".join(offenders)


def test_every_nanovllm_variable_the_package_mentions_is_declared():
    mentioned = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in re.findall(r"NANOVLLM_[A-Z0-9_]*[A-Z0-9]", path.read_text()):
            mentioned.setdefault(name, path.relative_to(ROOT))
    undeclared = {name: str(where) for name, where in mentioned.items() if name not in envs.VARIABLES}
    assert undeclared == {}


def test_docs_list_exactly_the_declared_variables():
    assert "docs/ENVIRONMENT.md" in (ROOT / "README.md").read_text(), "the README no longer links the variables' page"
    section = (ROOT / "docs" / "ENVIRONMENT.md").read_text()
    assert envs.markdown_table() in section, "docs/ENVIRONMENT.md's table is stale: paste `python -m nanovllm.cli env`"
    listed = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", section, flags=re.M))
    assert listed == {name for name in envs.VARIABLES if name.startswith("NANOVLLM_")}


def test_unset_or_empty_gives_the_default():
    for name, var in envs.VARIABLES.items():
        assert envs.get(name, {}) == var.default_value()
        assert envs.get(name, {name: ""}) == var.default_value()
    assert envs.get("NANOVLLM_CACHE_DIR", {}) == Path.home() / ".cache" / "nanovllm"


@pytest.mark.parametrize("name,raw,value", [
    ("NANOVLLM_LOG_LEVEL", "debug", "DEBUG"), ("NANOVLLM_CACHE_DIR", "~/x", Path.home() / "x"),
    ("NANOVLLM_DISABLE_COMPILE_CACHE", "1", True), ("NANOVLLM_DISABLE_COMPILE_CACHE", "0", False),
    ("NANOVLLM_TP_TIMEOUT_S", "2.5", 2.5), ("NANOVLLM_API_KEY", "k", "k"), ("NANOVLLM_PDL", "0", False),
    ("TRITON_INTERPRET", "true", True), ("TRITON_INTERPRET", "0", False),
])
def test_a_value_is_parsed(name, raw, value):
    assert envs.get(name, {name: raw}) == value


@pytest.mark.parametrize("name,raw", [
    ("NANOVLLM_LOG_LEVEL", "LOUD"), ("NANOVLLM_DISABLE_COMPILE_CACHE", "yes"), ("NANOVLLM_TP_TIMEOUT_S", "0"),
    ("NANOVLLM_TP_TIMEOUT_S", "-1"), ("NANOVLLM_TP_TIMEOUT_S", "soon"), ("NANOVLLM_KERNELS", "triton"),
    ("NANOVLLM_MPS_COMPILE", "yes"),
])
def test_a_bad_value_names_the_variable_and_the_value(name, raw):
    with pytest.raises(ValueError, match=re.escape(f"{name}={raw!r}")):
        envs.get(name, {name: raw})


def test_an_undeclared_name_is_refused():
    with pytest.raises(KeyError, match="NANOVLLM_NOPE"):
        envs.get("NANOVLLM_NOPE")


def test_the_callers_read_through_envs(monkeypatch, tmp_path):
    from nanovllm.compile.cache import cache_disabled
    from nanovllm.entrypoints.cli import make_parser
    from nanovllm.paths import cache_root
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOVLLM_DISABLE_COMPILE_CACHE", "1")
    monkeypatch.setenv("NANOVLLM_API_KEY", "secret")
    assert cache_root() == tmp_path and cache_disabled()
    assert make_parser().parse_args(["m"]).api_key == "secret"
    monkeypatch.setenv("NANOVLLM_DISABLE_COMPILE_CACHE", "on")
    with pytest.raises(ValueError, match="NANOVLLM_DISABLE_COMPILE_CACHE='on'"):
        cache_disabled()


def test_process_settings_are_recorded(monkeypatch):
    monkeypatch.setattr(envs, "_process_settings", {})
    envs.note_process_setting("NCCL_NVLS_ENABLE", "0")
    envs.note_process_setting("x.limit", 12)
    envs.note_process_setting("NCCL_NVLS_ENABLE", "0")
    assert envs.process_settings() == {"NCCL_NVLS_ENABLE": "0", "x.limit": "12"}
    envs.process_settings()["y"] = "1"  # a copy: callers cannot change the record
    assert "y" not in envs.process_settings()


def test_inductors_pdl_switch_is_recorded_when_nanovllm_changes_it(monkeypatch):
    import torch
    from torch._inductor import config

    from nanovllm.kernels import pdl
    if not hasattr(config.triton, "enable_pdl"):
        pytest.skip("this torch has no Inductor PDL switch")
    monkeypatch.setattr(envs, "_process_settings", {})
    monkeypatch.setattr(config.triton, "enable_pdl", False)
    monkeypatch.delenv("TORCHINDUCTOR_ENABLE_PDL", raising=False)
    assert not pdl.configure_inductor(torch.device("cpu"))  # no change: nothing recorded
    assert envs.process_settings() == {}
    monkeypatch.setattr(pdl, "pdl_enabled", lambda device: True)  # as on a Hopper GPU
    monkeypatch.setenv("TORCHINDUCTOR_ENABLE_PDL", "0")  # the user's own choice is left alone
    assert not pdl.configure_inductor(torch.device("cpu")) and envs.process_settings() == {}
    monkeypatch.delenv("TORCHINDUCTOR_ENABLE_PDL")
    assert pdl.configure_inductor(torch.device("cpu"))
    assert envs.process_settings() == {"torch._inductor.config.triton.enable_pdl": "True"}
