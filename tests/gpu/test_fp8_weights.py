"""FP8 weights on a GPU: tiny checkpoints of several families, quantized at load time (``quantization="fp8"``) or
stored in the block-FP8 layout, against transformers on the dequantized weights (``quant/fp8_oracle.py``, through
``tools/oracle.run``): float32 token-identical, bfloat16 diverging only at near-ties, in eager and graph mode.  The
Triton kernels serve bfloat16 (the FP8 linear and grouped MoE kernels); float32 takes the twins."""
import pytest

from conftest import build_checkpoint

ENGINE = dict(kvcache_block_size=16, graph_batch_sizes=[8], max_model_len=512, max_num_seqs=8,
              num_kvcache_blocks=256)
# hidden 256: two 128-column groups, so the kernels scale partial products per group
SHAPES = dict(hidden_size=256, intermediate_size=512)


@pytest.fixture(scope="module", params=["qwen3", "llama", "qwen3_moe"])
def checkpoint(request, tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp(request.param), request.param, **SHAPES)


@pytest.fixture(scope="module")
def block_checkpoint(tmp_path_factory):
    from nanovllm.quant.fp8_checkpoint import quantize_checkpoint_fp8
    path = build_checkpoint(tmp_path_factory.mktemp("block"), "qwen3_moe", **SHAPES)
    quantize_checkpoint_fp8(path, (128, 128))
    return path


def failures(verdicts, dtype):
    allowed = ("identical",) if dtype == "float32" else ("identical", "near-tie")
    return [v for v in verdicts if v["status"] not in allowed]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graph"])
def test_online_fp8_matches_the_dequantized_oracle(checkpoint, dtype, eager):
    from nanovllm.tools import oracle
    verdicts = oracle.run(checkpoint, dtype, "cuda", 8, 24, 0.1, enforce_eager=eager, quantization="fp8", **ENGINE)
    assert failures(verdicts, dtype) == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_block_fp8_checkpoint_matches_its_dequantized_oracle(block_checkpoint, dtype):
    from nanovllm.tools import oracle
    verdicts = oracle.run(block_checkpoint, dtype, "cuda", 8, 24, 0.1, enforce_eager=False, **ENGINE)
    assert failures(verdicts, dtype) == []
