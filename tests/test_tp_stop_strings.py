"""A stop string ends a request offline at N = 2 as at N = 1: ``generate`` aborts it through the mirrored engine,
so rank 1 aborts it at the same step, and the ranks stay in step for the next call (two CPU ranks, gloo)."""
from nanovllm import LLM, SamplingParams
from serve_helpers import build_text_checkpoint

ENGINE = dict(enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=256, max_num_seqs=4,
              device="cpu")
PROMPTS = ["The quick brown fox", "Numbers like 12345"]


def texts(llm, params) -> list[str]:
    return [o["text"] for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_a_stop_string_at_two_ranks_gives_one_ranks_text_and_keeps_them_in_step(tmp_path):
    model = build_text_checkpoint(tmp_path)[0]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with LLM(model, **ENGINE) as one:
        want = texts(one, greedy)
        stop = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[want[0][4:7]])
        want_stopped = texts(one, stop)
    assert len(want_stopped[0]) < len(want[0])  # the stop string cut the first request short
    with LLM(model, tensor_parallel_size=2, **ENGINE) as two:
        assert texts(two, stop) == want_stopped
        assert texts(two, greedy) == want
