"""The CPU platform's ``cpu_vectorize`` option (``NANOVLLM_CPU_VECTORIZE``, ``nanovllm/platforms/cpu.py``): on (a
user's default) Inductor's C++ kernels use the CPU's vector instructions, off (this suite's setting,
``tests/conftest.py``: it compiles faster) they are scalar loops.  Either way graph mode gives eager mode's tokens,
and the two settings make separate compile-cache entries."""
import pytest

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams

ENGINE = dict(max_num_seqs=2, kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=128)
VECTOR_TYPE = "at::vec::Vectorized"  # what Inductor's vectorized C++ kernels are written in


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("vectorize"), "qwen3")


@pytest.fixture(scope="module")
def eager_tokens(path):
    llm = LLM(path, enforce_eager=True, **ENGINE)
    try:
        return _generate(llm)
    finally:
        llm.close()


def _generate(llm) -> list:
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    return [o["token_ids"] for o in outs]


def _entries_written_in_vectors(cache_dir) -> list[bool]:
    entries = sorted(p for p in (cache_dir / "compile").iterdir() if p.is_dir())
    return [any(VECTOR_TYPE in f.read_text(errors="ignore") for f in e.rglob("*.cpp")) for e in entries]


def test_vectorized_and_scalar_kernels_give_eager_tokens_from_entries_of_their_own(path, eager_tokens, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path))
    found = []
    for setting in ("1", "0"):
        monkeypatch.setenv("NANOVLLM_CPU_VECTORIZE", setting)
        llm = LLM(path, graph_batch_sizes=[1, 2], **ENGINE)
        try:
            assert llm.engine.runner.mode == "graph"
            assert _generate(llm) == eager_tokens, f"NANOVLLM_CPU_VECTORIZE={setting}"
        finally:
            llm.close()
        found.append(_entries_written_in_vectors(tmp_path))
    assert found[0] == [True], "the default wrote no vector code"
    assert sorted(found[1]) == [False, True], "the scalar setting shared the vectorized entry or wrote vectors"
