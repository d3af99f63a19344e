"""The causal-LM bodies of Llama/Qwen2/Qwen3 ``*ForSequenceClassification`` checkpoints (transformers' layout).

Such a checkpoint stores the body under ``model.`` and a classifier head ``score.weight`` [num_labels, H], but no
``lm_head.weight``.  The engine runs the body as it runs the causal LM's (pooling requests, in the same graphs);
its LM head is tied to the embeddings so that loading needs no ``lm_head.weight`` and holds no extra copy (its
logits mean nothing: these checkpoints score, they do not generate).  ``score.weight`` is left to the loader's
unused tensors; ``scoring.ClassifierHead`` reads it and applies it on the host.
"""
from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.models.qwen2 import Qwen2ForCausalLM
from nanovllm.models.qwen3 import Qwen3ForCausalLM


class _ClassifierBody:
    def __init__(self, hf_config: dict):
        super().__init__(dict(hf_config, tie_word_embeddings=True))


class Qwen3ForSequenceClassification(_ClassifierBody, Qwen3ForCausalLM):
    pass


class Qwen2ForSequenceClassification(_ClassifierBody, Qwen2ForCausalLM):
    pass


class LlamaForSequenceClassification(_ClassifierBody, LlamaForCausalLM):
    pass
