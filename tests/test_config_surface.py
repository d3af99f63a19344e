"""The engine's options are written once, in ``EngineConfig``: ``LLM``, the CLIs and the README follow it."""
import argparse
import importlib.util
from pathlib import Path

import pytest

from nanovllm.cli import add_engine_args, engine_kwargs, flag_name, markdown_table
from nanovllm.config import engine_fields

ROOT = Path(__file__).resolve().parent.parent


def test_readme_argument_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "README's LLM argument table is stale: paste `python -m nanovllm.cli`"


def test_every_field_becomes_a_flag_that_reaches_llm():
    p = add_engine_args(argparse.ArgumentParser())
    args = p.parse_args(["--max-num-seqs", "3", "--enforce-eager", "--graph-batch-sizes", "1,2",
                         "--prefill-graph-sizes", "none", "--gpu-memory-utilization", "0.5", "--dtype", "float32",
                         "--num-kvcache-blocks", "9", "--load-format", "dummy"])
    assert engine_kwargs(args) == {"max_num_seqs": 3, "enforce_eager": True, "graph_batch_sizes": [1, 2],
                                   "prefill_graph_sizes": [], "gpu_memory_utilization": 0.5, "dtype": "float32",
                                   "num_kvcache_blocks": 9, "load_format": "dummy"}
    assert engine_kwargs(p.parse_args([])) == {}  # flags not given leave LLM's defaults alone
    flags = {a.option_strings[0] for a in p._actions if a.option_strings}
    assert {flag_name(f.name) for f in engine_fields() if f.name != "model"} <= flags
    with pytest.raises(SystemExit):
        p.parse_args(["--dtype", "int8"])


def test_cli_defaults_are_passed_and_overridable():
    p = add_engine_args(argparse.ArgumentParser(), defaults={"max_model_len": 1024})
    assert engine_kwargs(p.parse_args([])) == {"max_model_len": 1024}
    assert engine_kwargs(p.parse_args(["--max-model-len", "64"])) == {"max_model_len": 64}


@pytest.mark.parametrize("script", ["nanovllm/precompile.py", "example.py", "bench.py"])
def test_command_line_tools_take_every_engine_option(script, capsys):
    """Each tool's --help lists a flag for every EngineConfig field (bench's --bs stands for max_num_seqs)."""
    spec = importlib.util.spec_from_file_location("tool_under_test", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser_help = _help_of(module, capsys)
    for f in engine_fields():
        if f.name == "model" or (script == "bench.py" and f.name == "max_num_seqs"):
            continue
        assert flag_name(f.name) in parser_help, f"{script} lacks {flag_name(f.name)}"


def _help_of(module, capsys) -> str:
    import sys
    argv = sys.argv
    sys.argv = ["tool", "--help"]
    try:
        with pytest.raises(SystemExit):
            module.main()
    finally:
        sys.argv = argv
    return capsys.readouterr().out
