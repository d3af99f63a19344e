"""Peer for expert offload: vLLM 0.26 with ``cpu_offload_gb`` on a config with dummy weights, the device budget
capped as ``offload_bench.py`` caps ours, decode tokens/s at the same batch sizes, prompt and output lengths.

    env PYTHONPATH=/tmp/site VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 \\
        python3 benchmarks/peer_offload.py --model DIR [--budget-gb 16] [--cpu-offload-gb 80] [--batch-sizes 1,16]

Runs with ``VLLM_USE_V2_MODEL_RUNNER=0`` unless told otherwise: the V2 model runner never installs vLLM's
offloader, so ``cpu_offload_gb`` does nothing there (vllm-project/vllm#51396).  Whether it really offloaded is
checked, not assumed: the weights' bytes on the device after start-up (the engine runs in this process, so
``torch.cuda.memory_allocated`` sees them, the KV cache aside) must be below the checkpoint's parameter bytes; the
JSON says ``offloaded`` true or false.  Eager mode (``enforce_eager``): every step streams the offloaded weights
over PCIe, which CUDA graphs cannot hide.  Per batch size: random token-id prompts, one greedy pass of one token
(the prefill) and one of ``--max-tokens``; decode tok/s is the extra tokens over the extra time.  Writes
``peer_offload.json`` to ``--out`` (default ``$OUT`` or .).  Needs no nanovllm import: it runs under vLLM's path.
"""
import argparse
import json
import os
import random
import time


def param_bytes(config: dict) -> int:
    """Bytes of a Mixtral-style checkpoint's parameters in 16-bit: embeddings, attention, experts, norms, head."""
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    dim = config.get("head_dim") or h // heads
    experts, vocab = config.get("num_local_experts", 1), config["vocab_size"]
    attn = h * heads * dim * 2 + h * kv * dim * 2
    per_layer = attn + experts * 3 * h * inter + experts * h + 2 * h
    return 2 * (layers * per_layer + 2 * vocab * h + h)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a directory with config.json (weights drawn: load_format=dummy)")
    ap.add_argument("--budget-gb", type=float, default=16.0)
    ap.add_argument("--cpu-offload-gb", type=float, default=80.0)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--v2-runner", action="store_true", help="leave vLLM's model-runner choice as it is")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    if not a.v2_runner:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    import torch
    from vllm import LLM, SamplingParams
    total = torch.cuda.get_device_properties(0).total_memory
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    t = time.perf_counter()
    llm = LLM(a.model, load_format="dummy", skip_tokenizer_init=True, enforce_eager=True, seed=0,
              max_model_len=512, max_num_seqs=max(sizes), cpu_offload_gb=a.cpu_offload_gb,
              gpu_memory_utilization=min(1.0, a.budget_gb * 2**30 / total))
    init_s = time.perf_counter() - t
    with open(os.path.join(a.model, "config.json")) as f:
        config = json.load(f)
    model_bytes = param_bytes(config)
    free, _ = torch.cuda.mem_get_info()
    allocated = torch.cuda.memory_allocated()
    rng = random.Random(0)
    rows = []
    for bs in sizes:
        prompts = [{"prompt_token_ids": [rng.randrange(3, config["vocab_size"]) for _ in range(a.prompt_len)]}
                   for _ in range(bs)]
        timing = {}
        for n in (1, a.max_tokens):
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            timing[n] = (time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs))
        extra_s = timing[a.max_tokens][0] - timing[1][0]
        extra_tokens = timing[a.max_tokens][1] - timing[1][1]
        steps = a.max_tokens - 1
        rows.append(dict(batch=bs, decode_tok_s=round(extra_tokens / extra_s, 3),
                         decode_step_ms=round(1000 * extra_s / steps, 2), prefill_s=round(timing[1][0], 3)))
        print(json.dumps(rows[-1]), flush=True)
    import vllm
    res = dict(peer=f"vllm-{vllm.__version__}", model=a.model, v2_runner_allowed=a.v2_runner,
               cpu_offload_gb=a.cpu_offload_gb, budget_gb=a.budget_gb, init_s=round(init_s, 1),
               model_param_bytes=model_bytes, cuda_allocated_bytes=allocated, cuda_free_bytes=free,
               offloaded=allocated < model_bytes, gpu=torch.cuda.get_device_name(0), rows=rows)
    print(json.dumps(res), flush=True)
    with open(os.path.join(a.out, "peer_offload.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
