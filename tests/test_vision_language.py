"""Qwen2.5-VL, Qwen3-VL and Qwen3.5 (its tower before the hybrid decoder): greedy float32 tokens equal
transformers' on a batch that mixes prompts with images of different sizes, two images in one prompt, a text-only
prompt and a token-id prompt, in eager mode (prefill chunked through the middle of images) and in graph mode; the
prefix cache never shares KV between different images behind equal placeholders; bad image input raises a clear
error and the engine keeps working; Qwen3.5 at two ranks too."""
import pytest

from vl_checkpoints import IMAGE_PAD, build_vl_checkpoint, hf_greedy_vl, picture

PH = "<|vision_start|><|image_pad|><|vision_end|>"
MAX_NEW = 10
FAMILIES = ["qwen2_5_vl", "qwen3_vl", "qwen3_5"]


def mixed_prompts():
    return [
        {"prompt": f"Describe {PH} in a few words.", "multi_modal_data": {"image": picture(120, 90, 1)}},
        "A plain text prompt about the sea",
        {"prompt": f"Compare {PH} with {PH}, please.",
         "multi_modal_data": {"image": [picture(200, 150, 2), picture(64, 64, 3)]}},
        [151644, 872, 198, 9707, 0],  # token ids
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def vl_model(request, tmp_path_factory):
    return request.param, build_vl_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def make_llm(path, **kw):
    from nanovllm import LLM
    kw = {"enforce_eager": True, "dtype": "float32", "device": "cpu", "max_model_len": 1024, **kw}
    return LLM(path, **kw)


def greedy():
    from nanovllm import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def oracle(vl_model):
    family, path = vl_model
    llm = make_llm(path)
    refs = hf_greedy_vl(path, mixed_prompts(), MAX_NEW, llm)
    return llm, refs


def test_eager_matches_transformers_with_prefill_chunked_inside_images(vl_model, oracle):
    _, path = vl_model
    llm, refs = oracle
    got = [o["token_ids"] for o in llm.generate(mixed_prompts(), greedy(), use_tqdm=False)]
    assert got == refs
    chunked = make_llm(path, max_num_batched_tokens=24)  # every image's tokens span several prefill steps
    assert [o["token_ids"] for o in chunked.generate(mixed_prompts(), greedy(), use_tqdm=False)] == refs


@pytest.mark.slow
def test_graph_mode_matches_transformers(vl_model, oracle):
    _, path = vl_model
    _, refs = oracle
    llm = make_llm(path, enforce_eager=False, max_num_seqs=4, graph_batch_sizes=[2, 4])
    assert llm.engine.describe()["mode"] == "graph"
    assert [o["token_ids"] for o in llm.generate(mixed_prompts(), greedy(), use_tqdm=False)] == refs


@pytest.mark.slow
def test_prefix_cache_tells_images_apart_behind_equal_placeholders(vl_model, oracle):
    _, path = vl_model
    llm, _ = oracle
    text = f"{PH} " + "and a long question about the picture " * 30
    first = {"prompt": text, "multi_modal_data": {"image": picture(96, 96, 10)}}
    other = {"prompt": text, "multi_modal_data": {"image": picture(96, 96, 11)}}  # same size, same tokens
    ids_first, im_first = llm.encode_request(first)
    ids_other, im_other = llm.encode_request(other)
    assert ids_first == ids_other and im_first.hashes != im_other.hashes
    block = llm.config.kvcache_block_size
    assert len(ids_first) > 2 * block, "the prompt must fill blocks that could be shared"
    bm = llm.engine.block_manager
    llm.generate([first], greedy(), use_tqdm=False)
    hits = bm.cache_hit_tokens
    out_other = llm.generate([other], greedy(), use_tqdm=False)[0]["token_ids"]
    assert bm.cache_hit_tokens == hits, "a different image behind the same placeholders hit the prefix cache"
    assert out_other == hf_greedy_vl(path, [other], MAX_NEW, llm)[0]
    llm.generate([first], greedy(), use_tqdm=False)  # the same image again does hit
    assert bm.cache_hit_tokens > hits


def test_chat_with_image_parts_equals_the_placeholder_prompt(vl_model, oracle):
    llm, _ = oracle
    img = picture(80, 60, 5)
    messages = [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": "What is this?"}]}]
    ids = llm.apply_chat_template([{"role": "user", "content": PH + "What is this?"}])
    expected = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": img}}, greedy(), use_tqdm=False)
    assert llm.chat(messages, greedy(), use_tqdm=False)[0]["token_ids"] == expected[0]["token_ids"]


def test_bad_images_name_the_problem_and_the_engine_goes_on(vl_model, oracle, tmp_path):
    _, path = vl_model
    llm, refs = oracle
    img = picture(64, 64, 1)
    with pytest.raises(ValueError, match=r"prompt 0 has 2 image placeholder\(s\).*but 1 image"):
        llm.generate({"prompt": f"{PH}{PH}", "multi_modal_data": {"image": img}}, greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt 0 has 0 image placeholder"):
        llm.generate({"prompt": "no placeholder", "multi_modal_data": {"image": img}}, greedy(), use_tqdm=False)
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(ValueError, match=r"prompt 1: image 0 cannot be read"):
        llm.generate(["fine", {"prompt": PH, "multi_modal_data": {"image": str(bad)}}], greedy(), use_tqdm=False)
    short = make_llm(path, max_model_len=64)
    with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens, more than max_model_len=64"):
        short.generate({"prompt": PH, "multi_modal_data": {"image": picture(256, 256, 1)}}, greedy(), use_tqdm=False)
    got = [o["token_ids"] for o in llm.generate(mixed_prompts(), greedy(), use_tqdm=False)]
    assert got == refs


def test_images_for_a_text_only_model_are_refused(tiny_model):
    _, path = tiny_model
    llm = make_llm(path, max_model_len=256)
    with pytest.raises(ValueError, match="is not a vision-language model"):
        llm.generate({"prompt_token_ids": [1, 2, 3], "multi_modal_data": {"image": picture(32, 32, 0)}}, greedy(),
                     use_tqdm=False)
    assert len(llm.generate({"prompt_token_ids": [1, 2, 3]}, greedy(), use_tqdm=False)[0]["token_ids"]) == MAX_NEW


def test_image_tokens_are_expanded_per_image_size(vl_model, oracle):
    llm, _ = oracle
    ids, images = llm.encode_request(mixed_prompts()[2])
    merge = llm.engine.runner.model.merge_size
    counts = [t * h * w // merge ** 2 for t, h, w in images.grid_thw]
    assert counts[0] != counts[1] and [n for _, n in images.spans] == counts
    assert sum(i == IMAGE_PAD for i in ids) == sum(counts)
    assert images.rope_delta < 0  # an image's tokens take fewer positions than tokens


@pytest.mark.slow
def test_qwen3_5_at_two_ranks_matches_transformers(tmp_path):
    """Every rank holds the whole tower and encodes the mirrored requests' images itself; the decoder is split."""
    path = build_vl_checkpoint(tmp_path, "qwen3_5")
    llm = make_llm(path, tensor_parallel_size=2, max_num_seqs=4)
    try:
        model = llm.engine.runner.model  # rank 0's: half the linear-attention heads, the whole tower
        assert model.linear.num_v_heads == 2 and model.visual.blocks[0].attn.qkv.weight.shape == (3 * 64, 64)
        want = hf_greedy_vl(path, mixed_prompts(), MAX_NEW, llm)
        assert [o["token_ids"] for o in llm.generate(mixed_prompts(), greedy(), use_tqdm=False)] == want
    finally:
        llm.close()
