"""Without the ``serve`` extra, every way of starting the server exits with one line that names the missing module
and the extra to install, before any engine is built (no ``ModuleNotFoundError`` traceback)."""
import runpy
import sys

import pytest

from nanovllm.entrypoints import cli

HINT = 'pip install "nanovllm[serve]"'


@pytest.fixture
def no_uvicorn(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ModuleNotFoundError


def _refused(call) -> str:
    with pytest.raises(SystemExit) as exit_info:
        call()
    message = str(exit_info.value.code)
    assert "\n" not in message
    return message


def test_serve_names_the_missing_module_and_the_extra(no_uvicorn, tmp_path):
    message = _refused(lambda: cli.serve([str(tmp_path)]))
    assert "'uvicorn' is missing" in message and HINT in message and "serve" in message


def test_the_nanovllm_serve_command_says_the_same(no_uvicorn, tmp_path):
    message = _refused(lambda: cli.main(["serve", str(tmp_path)]))
    assert "'uvicorn' is missing" in message and HINT in message


def test_python_m_nanovllm_serve_says_the_same(no_uvicorn, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["nanovllm.serve", str(tmp_path)])
    monkeypatch.delitem(sys.modules, "nanovllm.serve", raising=False)
    message = _refused(lambda: runpy.run_module("nanovllm.serve", run_name="__main__"))
    assert "'uvicorn' is missing" in message and HINT in message


def test_each_module_of_the_extra_is_named(monkeypatch, tmp_path):
    for name in cli.SERVE_MODULES:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, name, None)
            assert f"{name!r} is missing" in _refused(lambda: cli.serve([str(tmp_path)]))
