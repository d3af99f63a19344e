"""The fused Triton sampler on the GPU: same tokens as the torch reference, and its time against the compiled
reference (the sampler the decode step used before the kernel), with and without the tile skip (``skip=False``
computes the precise noise on every tile; both must give the same tokens).

    python benchmarks/sampler_kernel.py          # prints a table, writes $OUT/sampler_kernel.json

Logits are random bf16 [B, 151,936] (Qwen3's vocabulary), half the rows greedy and half at temperature 0.6.
Times are per call, replayed in a CUDA graph of 20 calls.  First it checks the skip's bound on this GPU's ``log``
against all 2**23 uniforms the kernel can draw.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import graph_us, write_json  # noqa: E402
from nanovllm.kernels.triton_sampler import gumbel_argmax_triton, gumbel_bound_triton  # noqa: E402
from nanovllm.layers.sampler import gumbel_argmax_reference, uniform_from_bits  # noqa: E402


def main():
    vocab, rows = 151936, []
    noise, bound = gumbel_bound_triton(uniform_from_bits(torch.arange(2**23, device="cuda") << 9))
    bound_fails = (bound < noise).sum().item()
    print(f"bound below the kernel's noise for {bound_fails} of 2**23 uniforms")
    compiled = torch.compile(gumbel_argmax_reference, fullgraph=True, dynamic=False)
    print("| batch | rows differing (ref) | skip vs no skip | skip us | no skip us | compiled reference us |\n"
          "|---|---|---|---|---|---|")
    for batch in (2, 8, 32, 64, 128, 256):
        g = torch.Generator(device="cuda").manual_seed(batch)
        logits = (torch.randn(batch, vocab, device="cuda", generator=g) * 3).to(torch.bfloat16)
        temperature = torch.where(torch.arange(batch, device="cuda") % 2 == 0, 0.0, 0.6)
        seeds = torch.randint(0, 2**62, (batch,), device="cuda", generator=g)
        positions = torch.randint(0, 4096, (batch,), device="cuda", generator=g)
        args = (logits, temperature, seeds, positions)
        got = gumbel_argmax_triton(*args)
        differ = (got != gumbel_argmax_reference(*args)).sum().item()
        skip_differ = (got != gumbel_argmax_triton(*args, skip=False)).sum().item()
        kernel_us = graph_us([lambda: gumbel_argmax_triton(*args)] * 20, replays=10)
        plain_us = graph_us([lambda: gumbel_argmax_triton(*args, skip=False)] * 20, replays=10)
        ref_us = graph_us([lambda: compiled(*args)] * 20, replays=10)
        rows.append({"batch": batch, "rows_differing": differ, "skip_vs_no_skip_differing": skip_differ,
                     "kernel_us": round(kernel_us, 1), "no_skip_us": round(plain_us, 1),
                     "compiled_reference_us": round(ref_us, 1)})
        print(f"| {batch} | {differ} | {skip_differ} | {kernel_us:.1f} | {plain_us:.1f} | {ref_us:.1f} |", flush=True)
    write_json("sampler_kernel.json", {"device": torch.cuda.get_device_name(), "vocab": vocab,
                                       "bound_fails": bound_fails, "rows": rows})


if __name__ == "__main__":
    main()
