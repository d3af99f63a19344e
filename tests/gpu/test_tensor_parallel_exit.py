"""A program that builds a TP=2 engine on two CUDA devices (NCCL), generates and falls off its end without
``llm.close()`` exits with status 0, with no "terminate called" in its stderr, leaving no process, within
``FACTOR`` times the end of the same script that calls ``close()`` plus one interpreter's start and exit (both
measured in the test), in graph and eager mode (``tests/tp_exit_helpers.py``; the CPU twin is
``tests/test_tp_exit.py``).  Before ``LLM``'s exit hook, the graph-mode script waited 30 s in NCCL's abort (the
peers' exit hook left the group while the engine's CUDA graphs held it) and died with SIGABRT.  Marked ``gpu2``
and skipped, saying so, with fewer than two devices (tests/gpu/conftest.py):

    python -m pytest -q -m gpu2 tests/gpu/test_tensor_parallel_exit.py
"""
import pytest

from conftest import build_checkpoint
from tp_exit_helpers import check_exits_cleanly

pytestmark = pytest.mark.gpu2

ENGINE = dict(device="cuda", kvcache_block_size=16, graph_batch_sizes=[8], max_num_seqs=8, max_model_len=512,
              num_kvcache_blocks=256)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_a_script_that_ends_without_closing_exits_0_without_an_abort(tmp_path, model, mode, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path / "cache"))  # the scripts inherit it
    check_exits_cleanly(tmp_path, model, dict(ENGINE, enforce_eager=mode == "eager"))
