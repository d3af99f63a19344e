#!/usr/bin/env bash
# Programmatic dependent launch, measured: kernel exactness with PDL on, then bench.py --bs 256 with PDL off,
# on (default), on without the matmul's L2 weight prefetch, and on for our kernels only (Inductor's off), each a
# fresh process with the compile cache off (every variant compiles cold), then bf16 parity at bench settings.
# Logs and JSON to $OUT.
#
#     bash benchmarks/pdl_ab.sh       # on the GPU machine, from the repository root
source benchmarks/gpu_steps.sh
export NANOVLLM_DISABLE_COMPILE_CACHE=1
nvidia-smi --query-gpu=name --format=csv,noheader
python -c "import torch, triton; from torch._inductor import config; print('torch', torch.__version__, 'triton', \
triton.__version__, 'inductor enable_pdl:', getattr(config.triton, 'enable_pdl', 'absent'))"
step checks 150 python benchmarks/gpu_checks.py
bench() { step "bench_$1" 200 env "${@:2}" python bench.py --bs 256 --repeat 2 --json "$OUT/bench_$1.json"; }
bench pdl_off NANOVLLM_PDL=0
bench pdl_on NANOVLLM_PDL=1
bench pdl_no_prefetch NANOVLLM_PDL=1 NANOVLLM_MATMUL_PREFETCH=0
bench pdl_ours_only NANOVLLM_PDL=1 TORCHINDUCTOR_ENABLE_PDL=0
step parity 240 python benchmarks/gpu_parity.py --bench-only
