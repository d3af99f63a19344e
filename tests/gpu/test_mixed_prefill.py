"""``mixed_prefill`` on CUDA: decoding sequences riding in prefill steps give the tokens they give without it, and
transformers' for the greedy prompts (the CPU test's ``check_same_tokens``, tests/test_mixed_prefill.py), in graph
mode with the compiled kernels (a rider's row goes to the decode attention kernel inside a prefill step), on one
GPU and at two ranks (``gpu2``).
"""
import pytest

from test_mixed_prefill import check_same_tokens, model  # noqa: F401 (``model``: the module's checkpoint fixture)


def test_riders_give_the_same_tokens_in_graph_mode(model):
    check_same_tokens(model, device="auto", enforce_eager=False, graph_batch_sizes=[8], max_num_seqs=8)


@pytest.mark.gpu2
def test_riders_give_the_same_tokens_at_two_ranks(model):
    check_same_tokens(model, device="auto", enforce_eager=False, graph_batch_sizes=[8], max_num_seqs=8,
                      tensor_parallel_size=2)
