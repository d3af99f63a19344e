"""Maps a checkpoint's ``config.architectures`` to the class that implements it."""
from nanovllm.models.gemma3 import Gemma3ForCausalLM
from nanovllm.models.gemma4 import Gemma4ForCausalLM
from nanovllm.models.gpt_oss import GptOssForCausalLM
from nanovllm.models.hybrid import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3NextForCausalLM
from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.models.minicpm import MiniCPM4ForCausalLM, MiniCPMForCausalLM
from nanovllm.models.mistral import MistralForCausalLM
from nanovllm.models.mixtral import MixtralForCausalLM
from nanovllm.models.qwen2 import Qwen2ForCausalLM
from nanovllm.models.qwen2_moe import Qwen2MoeForCausalLM
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.models.qwen3_5_vl import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration
from nanovllm.models.qwen3_moe import Qwen3MoeForCausalLM
from nanovllm.models.qwen_vl import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration
from nanovllm.models.seq_cls import (LlamaForSequenceClassification, Qwen2ForSequenceClassification,
                                     Qwen3ForSequenceClassification)

MODEL_REGISTRY = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "MiniCPMForCausalLM": MiniCPMForCausalLM,
    "MiniCPM4ForCausalLM": MiniCPM4ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "Qwen3VLForConditionalGeneration": Qwen3VLForConditionalGeneration,
    "Qwen3NextForCausalLM": Qwen3NextForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForCausalLM,
    "Gemma4ForCausalLM": Gemma4ForCausalLM,
    "Gemma4ForConditionalGeneration": Gemma4ForCausalLM,
    "Qwen3_5ForCausalLM": Qwen3_5ForCausalLM,
    "Qwen3_5ForConditionalGeneration": Qwen3_5ForConditionalGeneration,
    "Qwen3_5MoeForCausalLM": Qwen3_5MoeForCausalLM,
    "Qwen3_5MoeForConditionalGeneration": Qwen3_5MoeForConditionalGeneration,
    # bodies only: the classifier head is scoring.ClassifierHead's (seq_cls.py)
    "Qwen3ForSequenceClassification": Qwen3ForSequenceClassification,
    "Qwen2ForSequenceClassification": Qwen2ForSequenceClassification,
    "LlamaForSequenceClassification": LlamaForSequenceClassification,
}


def resolve_model_class(hf_config: dict):
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"unsupported architecture {archs!r}; supported: {sorted(MODEL_REGISTRY)}")
