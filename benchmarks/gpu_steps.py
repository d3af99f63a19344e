"""The table of GPU steps (``STEPS``) and the commands each one runs; ``benchmarks/gpu.py`` runs them.

A row names a model, a workload, an engine and flags.  Models: ``default`` (bench.py's random Qwen3-0.6B),
``smollm2`` (SmolLM2-135M-Instruct's real weights, ``nanovllm.tools.default_model``; the GGUF must be installed),
``preset:NAME`` (``nanovllm.tools.synthesize``'s config of NAME), ``peer:NAME`` (``PEERS/configs/NAME.json``),
the last two with dummy weights (``NAME+gptq`` / ``NAME+awq``: the config with an int4 ``quantization_config``),
``fp8:NAME`` (``synthesize NAME --quantize fp8``: a block-FP8 checkpoint on disk, which both engines load as it is)
or ``own`` (the program's own, e.g. inputs_bench.py's Qwen2.5-VL-3B config).
Engines: ``ours``, ``vllm`` (staged per ../shared/peers/README.md into ``Context.site`` and ``.peers``) or ``tests``.
``commands(step, ctx)`` turns a row into the commands of one run (a server's clients run while it serves), each
writing its JSON into its run's folder, its ``$OUT``.  A new GPU comparison is a new row, not a new script.
"""
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.gpu_models import model_dir, vllm_config, vllm_serve_dir, with_tokenizer

VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_FLASHINFER_SAMPLER": "0"}


@dataclass(frozen=True)
class Step:
    name: str
    engine: str  # "ours" | "vllm" | "tests"
    model: str  # "default" | "preset:NAME" | "peer:NAME" | "own" (the program's own)
    workload: str  # a key of WORKLOADS
    flags: tuple[str, ...] = ()
    env: tuple[tuple[str, str | None], ...] = ()  # None unsets the variable
    limit_s: int = 600
    vllm_config: tuple[tuple[str, object], ...] = ()  # config.json fields changed for vLLM only
    client: tuple[str, ...] = ()  # a serve row's extra serve_bench.py flags


BENCH, DUMMY, FP8_KV = ("--bs", "256"), ("--load-format", "dummy"), ("--kv-cache-dtype", "fp8")
FP8, TP2, GPU2 = ("--quantization", "fp8"), ("--tensor-parallel-size", "2"), ("-m", "gpu2")
PROFILE, B16 = ("benchmarks.profile_run",), ("--num-seqs", "32", "--max-output-len", "512")  # B16: batches of 16
B1, V1 = ("--bs", "1", "--num-seqs", "2"), ("--num-seqs", "2", "--max-num-seqs", "1")  # batch 1: ours, vLLM
VLLM_TP, OURS_VLLM = (("VLLM_ENABLE_V1_MULTIPROCESSING", None),), ("ours", "vllm")  # VLLM_TP: ranks as processes
TP_TESTS = "tests/gpu/test_tensor_parallel.py"
MOE_KERNEL = ("benchmarks.moe_kernel", "--tokens", "1,16,64,256,1024,4096")
MOE_SWEEP = ("benchmarks.moe_kernel", "--layers", "2", "--write-table", "--tokens", "1,16,256,1024,4096,16384")
# Qwen3.5-27B: 54 GB of bf16 weights and 154 MB of float32 state per sequence: 64 sequences fit one H100
HYBRID_TESTS = ("tests/gpu/test_hybrid.py", "tests/gpu/test_parity.py")
HYBRID_BS, HYBRID_VLLM_BS = ("--bs", "64", "--num-seqs", "256"), ("--max-num-seqs", "64", "--num-seqs", "256")
# vLLM: Qwen3.5 as its multimodal class without the tower, and its Triton GDN prefill (FlashInfer's is not staged);
# --llm-kwargs is a flag the staged peer_vllm.py needs (docs/BENCHMARKS.md); its server takes the same as flags
_GDN = {"mamba_ssm_cache_dtype": "float32", "additional_config": {"gdn_prefill_backend": "triton"}}  # our state: fp32
GDN_VLLM = ("--llm-kwargs", json.dumps(_GDN))
TEXT_ONLY = ("--llm-kwargs", json.dumps({"language_model_only": True, **_GDN}))
TEXT_ONLY_SERVE = ("--language-model-only", "--mamba-ssm-cache-dtype", "float32", "--additional-config",
                   json.dumps(_GDN["additional_config"]))
# the multi-turn chat workload (serve_bench.py --multi-turn), both servers with prefix caching on (ours always is;
# vLLM's hybrid models need it asked for, and GDN layers only cache in align mode: ../shared/ANCHORS-WAVE5.md sec. 1)
MULTITURN = ("--multi-turn", "64,4", "--system-len", "2000", "--turn-len", "100", "--reply-len", "64")
PREFIX_VLLM = ("--enable-prefix-caching",)
HYBRID_PREFIX_VLLM = PREFIX_VLLM + ("--mamba-cache-mode", "align")
HYBRID_SERVE = ("--max-num-seqs", "64", "--max-model-len", "4096")  # 64 sequences of 154 MB state fit one H100
# Gemma 3's long prompts (100 to 16k tokens, 256 out, 64 sequences at once; vLLM's LLM(...) is made at 4096 otherwise)
LONG = ("--num-seqs", "64", "--max-input-len", "16384", "--max-output-len", "256")
LONG_VLLM = ("--max-num-seqs", "64", "--llm-kwargs", json.dumps({"max_model_len": 16640}))
COMPACT_JSON = '{"backend": "xgrammar", "disable_any_whitespace": true}'  # as ours compiles JSON (offline_bench.py)
STEPS = [
    Step("bench-ours", "ours", "default", "bench", BENCH), Step("bench-vllm", "vllm", "default", "bench"),
    *[Step(f"bench-{tag}-{who}", who, "default", "bench", (BENCH if who == "ours" else ()) + flags)
      for tag, flags in (("fp8kv", FP8_KV), ("fp8", FP8)) for who in OURS_VLLM],
    Step("eager-ours", "ours", "default", "bench", BENCH + ("--enforce-eager",)),
    Step("pre-hopper-ours", "ours", "default", "bench", BENCH, env=(("NANOVLLM_HOPPER_FEATURES", "0"),)),
    *[Step(f"batch1{tag}-{who}", who, f"peer:qwen3-8b{q}", "bench", (B1 if who == "ours" else V1) + flags)
      for tag, q, flags in (("", "", ()), ("-fp8", "", FP8), ("-gptq", "+gptq", ()), ("-awq", "+awq", ()))
      for who in OURS_VLLM],
    *[Step(f"moe-{w}", w, "preset:qwen3-30b-a3b", "bench", BENCH if w == "ours" else ()) for w in OURS_VLLM],
    Step("moe-fp8kv-ours", "ours", "preset:qwen3-30b-a3b", "bench", BENCH + FP8_KV),
    Step("moe-fp8kv-vllm", "vllm", "preset:qwen3-30b-a3b", "bench", FP8_KV),
    *[Step(f"profile-batch1-{tag}", "ours", f"peer:qwen3-8b{q}", "module", PROFILE + ("--at", "1") + B1 + flags)
      for tag, q, flags in (("fp8", "", FP8), ("gptq", "+gptq", ()))],
    Step("moe-fp8-ours", "ours", "preset:qwen3-30b-a3b", "bench", BENCH + FP8),
    Step("moe-fp8-vllm", "vllm", "preset:qwen3-30b-a3b", "bench", FP8),
    Step("moe-blockfp8-ours", "ours", "fp8:qwen3-30b-a3b", "bench", BENCH),  # the same checkpoint in both
    Step("moe-blockfp8-vllm", "vllm", "fp8:qwen3-30b-a3b", "bench"),
    *[Step(f"profile-moe-blockfp8{tag}", "ours", "fp8:qwen3-30b-a3b", "module", PROFILE + ("--at", "256", "--prefill")
           + tp) for tag, tp in (("", ()), ("-tp2", TP2))],
    *[Step(f"profile-{tag}-vllm", "vllm", model, "module", PROFILE + ("--engine", "vllm"))
      for tag, model in (("moe-blockfp8", "fp8:qwen3-30b-a3b"), ("moe-gptq", "preset:qwen3-30b-a3b+gptq"))],
    Step("count-experts-blockfp8", "ours", "fp8:qwen3-30b-a3b", "module", PROFILE + ("--count-experts",)),
    Step("moe-fp8-fp8kv-ours", "ours", "preset:qwen3-30b-a3b", "bench", BENCH + FP8 + FP8_KV),
    Step("moe-fp8-fp8kv-vllm", "vllm", "preset:qwen3-30b-a3b", "bench", FP8 + FP8_KV),
    *[Step(f"moe-gptq-{w}", w, "preset:qwen3-30b-a3b+gptq", "bench", BENCH if w == "ours" else ()) for w in OURS_VLLM],
    Step("moe-gptq-b16-ours", "ours", "preset:qwen3-30b-a3b+gptq", "bench", ("--bs", "16") + B16),  # batches of 16
    Step("moe-gptq-b16-vllm", "vllm", "preset:qwen3-30b-a3b+gptq", "bench", ("--max-num-seqs", "16") + B16),
    Step("mixtral-gptq-ours", "ours", "preset:mixtral-8x7b+gptq", "bench", BENCH),
    Step("mixtral-gptq-vllm", "vllm", "preset:mixtral-8x7b+gptq", "bench"),
    Step("dense32b-fp8-ours", "ours", "peer:qwen3-32b", "bench", BENCH + FP8),
    Step("dense32b-fp8-vllm", "vllm", "peer:qwen3-32b", "bench", FP8),
    Step("minicpm-ours", "ours", "preset:minicpm4-0.5b", "bench", BENCH),
    # vLLM refuses model_type "minicpm" without remote code; as "llama" it resolves its own MiniCPM class
    Step("minicpm-vllm", "vllm", "preset:minicpm4-0.5b", "bench", vllm_config=(("model_type", "llama"),)),
    Step("vl-ours", "ours", "own", "vl"), Step("vl-vllm", "vllm", "own", "vl"),
    Step("vl-eager-ours", "ours", "own", "vl", ("--enforce-eager",)),
    Step("serve-ours", "ours", "default", "serve"), Step("serve-vllm", "vllm", "default", "serve"),
    Step("serve-json-ours", "ours", "default", "serve", client=("--structured-share", "0.5")),
    Step("serve-json-vllm", "vllm", "default", "serve", ("--structured-outputs-config", COMPACT_JSON),
         client=("--structured-share", "0.5")),
    Step("multiturn-small-ours", "ours", "default", "multiturn", client=MULTITURN),
    Step("multiturn-small-vllm", "vllm", "default", "multiturn", PREFIX_VLLM, client=MULTITURN),
    Step("multiturn-ours", "ours", "preset:qwen3.5-27b", "multiturn", DUMMY + HYBRID_SERVE, client=MULTITURN),
    Step("multiturn-vllm", "vllm", "preset:qwen3.5-27b", "multiturn",
         HYBRID_SERVE + TEXT_ONLY_SERVE + HYBRID_PREFIX_VLLM, client=MULTITURN),
    # speculative decoding on real weights: ours off and on in one process, vLLM's modes in a process each
    Step("spec-ours", "ours", "smollm2", "speculative"),
    Step("spec-off-vllm", "vllm", "smollm2", "speculative", ("--modes", "off")),
    Step("spec-on-vllm", "vllm", "smollm2", "speculative", ("--modes", "on")),
    # a draft model's costs: bench.py's Qwen3-0.6B drafting for Qwen3-8B's config, dummy weights, every step verifying
    Step("spec-draft-ours", "ours", "peer:qwen3-8b", "speculative",
         ("--draft", "default", "--always-propose", "--temperature", "0", "--requests", "16")),
    Step("json-ours", "ours", "default", "structured"), Step("json-vllm", "vllm", "default", "structured"),
    Step("bench-reppen-ours", "ours", "default", "bench", BENCH + ("--repetition-penalty", "1.1")),
    Step("offload-ours", "ours", "preset:mixtral-8x7b", "offload"),
    Step("offload-vllm", "vllm", "preset:mixtral-8x7b", "offload", ("--cpu-offload-gb", "80")),
    Step("offload-gptq-ours", "ours", "preset:mixtral-8x7b+gptq", "offload"),
    Step("offload-gptq-vllm", "vllm", "preset:mixtral-8x7b+gptq", "offload", ("--cpu-offload-gb", "20")),
    Step("tp-ours", "ours", "peer:qwen3-32b", "bench", BENCH + TP2),
    Step("tp-vllm", "vllm", "peer:qwen3-32b", "bench", ("--tp", "2"), env=VLLM_TP),
    Step("tp1-ours", "ours", "peer:qwen3-32b", "bench", BENCH),
    Step("tp-moe-fp8-ours", "ours", "preset:qwen3-30b-a3b", "bench", BENCH + FP8 + TP2),
    Step("tp-moe-fp8-vllm", "vllm", "preset:qwen3-30b-a3b", "bench", FP8 + ("--tp", "2"), env=VLLM_TP),
    Step("tp-moe-blockfp8-ours", "ours", "fp8:qwen3-30b-a3b", "bench", BENCH + TP2),  # the same checkpoint in both
    Step("tp-moe-blockfp8-vllm", "vllm", "fp8:qwen3-30b-a3b", "bench", ("--tp", "2"), env=VLLM_TP),
    Step("tp4-ours", "ours", "peer:qwen3-32b", "bench", BENCH + ("--tensor-parallel-size", "4")),
    Step("tp4-vllm", "vllm", "peer:qwen3-32b", "bench", ("--tp", "4"), env=VLLM_TP),
    Step("serve-tp-ours", "ours", "peer:qwen3-32b", "serve", DUMMY + TP2),
    Step("serve-tp-vllm", "vllm", "peer:qwen3-32b", "serve", TP2),
    Step("profile-tp", "ours", "peer:qwen3-32b", "module", PROFILE + ("--at", "256,128,64", "--prefill") + TP2),
    Step("hybrid27b-ours", "ours", "preset:qwen3.5-27b", "bench", HYBRID_BS),
    Step("hybrid27b-vllm", "vllm", "preset:qwen3.5-27b", "bench", HYBRID_VLLM_BS + TEXT_ONLY),
    Step("hybrid35b-fp8-ours", "ours", "preset:qwen3.5-35b-a3b", "bench", BENCH + FP8),
    Step("hybrid35b-fp8-vllm", "vllm", "preset:qwen3.5-35b-a3b", "bench", FP8 + TEXT_ONLY),
    Step("hybrid80b-fp8-tp2-ours", "ours", "preset:qwen3-next-80b-a3b", "bench", BENCH + FP8 + TP2),
    Step("hybrid80b-fp8-tp2-vllm", "vllm", "preset:qwen3-next-80b-a3b", "bench", FP8 + ("--tp", "2") + GDN_VLLM,
         env=VLLM_TP),
    *[Step(f"profile-{tag}", "ours", f"preset:{name}", "module", PROFILE + ("--at", *flags)) for tag, name, flags in (
        ("hybrid35b", "qwen3.5-35b-a3b", ("256", "--prefill", *FP8)), ("gemma4", "gemma4-text", ("256",)),
        ("gemma3-27b", "gemma3-27b", ("256,64", "--prefill")), ("mixtral", "mixtral-8x7b+gptq", ("256", "--prefill")),
        ("moe-gptq", "qwen3-30b-a3b+gptq", ("256,128,64,32",)),
        ("hybrid27b", "qwen3.5-27b", ("64", "--prefill", *HYBRID_BS[:2])),
        ("hybrid80b-tp2", "qwen3-next-80b-a3b", ("256", *FP8, *TP2)))],
    # pooling on bench's Qwen3-0.6B: Qwen3-Embedding-0.6B's shape, and as a Qwen3-Reranker-0.6B (yes/no head)
    *[Step(f"{w}-{who}", who, "default", w) for w in ("embed", "rerank") for who in OURS_VLLM],
    # sliding windows: GPT-OSS with bf16 experts (no MXFP4) or MXFP4 ones as published, Gemma 3, Gemma 4
    *[Step(f"{tag}-{who}", who, f"preset:{name}", "bench", BENCH if who == "ours" else ())
      for tag, name in (("gptoss20b", "gpt-oss-20b"), ("gptoss20b-mxfp4", "gpt-oss-20b+mxfp4"),
                        ("gptoss120b-mxfp4", "gpt-oss-120b+mxfp4"), ("gemma3-27b", "gemma3-27b"),
                        ("gemma4", "gemma4-text-uniform")) for who in OURS_VLLM],
    *[Step(f"gemma3-27b-long-{who}", who, "preset:gemma3-27b", "bench", LONG + flags) for who, flags in
      (("ours", ("--bs", "64", "--max-model-len", "16640")), ("vllm", LONG_VLLM))],
    # multi-LoRA (inputs_bench.py lora), Qwen3-8B: 8 rank-16 adapters, batch 1, 64 in 8 slots; base: no adapters
    *[Step(f"lora{tag}-{who}", who, "peer:qwen3-8b", "module",
           ("benchmarks.inputs_bench", "lora", "--engine", "nanovllm" if who == "ours" else "vllm", *flags))
      for tag, flags in (("", ()), ("-b1", ("--bs", "1", "--num-seqs", "4")), ("-swap", ("--adapters", "64")))
      for who in OURS_VLLM],
    Step("lora-base-ours", "ours", "peer:qwen3-8b", "module", ("benchmarks.inputs_bench", "lora", "--adapters", "0")),
    Step("lora-b1-base-ours", "ours", "peer:qwen3-8b", "module",
         ("benchmarks.inputs_bench", "lora", "--adapters", "0", "--bs", "1", "--num-seqs", "4")),
    Step("parity-lora", "tests", "own", "pytest", ("-m", "gpu", "tests/gpu/test_lora.py")),
    Step("parity-windows", "tests", "own", "pytest", ("-m", "gpu", "-k", "gemma or gpt_oss or window or sink or mxfp4",
                                                      "tests/gpu")),
    Step("parity-hybrid", "tests", "own", "pytest", ("-m", "gpu", "-k", "hybrid or qwen3_next or qwen3_5", *HYBRID_TESTS)),
    Step("startup-ours", "ours", "default", "startup", BENCH),
    Step("parity", "tests", "own", "pytest", ("-m", "gpu", "tests/gpu")),
    *[Step(f"parity-{tag}", "tests", "own", "pytest", ("-m", "gpu", f"tests/gpu/test_{name}.py"))
      for tag, name in (("fp8kv", "kv_fp8"), ("fp8", "fp8_weights"), ("int4", "int4_weights"))],
    Step("parity-pre-hopper", "tests", "own", "pytest", ("-m", "gpu", "tests/gpu"),
         env=(("NANOVLLM_HOPPER_FEATURES", "0"),)),
    # two GPUs, each row's limit inside one device call (a hung test leaves the call time to report)
    Step("parity-tp", "tests", "own", "pytest", ("-m", "gpu2", "-k", "transformers", TP_TESTS), limit_s=420),
    Step("parity-tp-engine", "tests", "own", "pytest", ("-m", "gpu2", "-k", "not transformers", TP_TESTS),
         limit_s=450),
    Step("parity-tp-cli", "tests", "own", "pytest", GPU2 + ("tests/gpu/test_tensor_parallel_cli.py",), limit_s=400),
    Step("parity-allreduce", "tests", "own", "pytest", GPU2 + ("tests/gpu/test_symmetric_all_reduce.py",), limit_s=120),
    Step("parity-tp-failures", "tests", "own", "pytest", ("-m", "gpu2", "tests/gpu/test_tensor_parallel_failures.py"),
         limit_s=300),
    Step("parity-mixed", "tests", "own", "pytest", ("-m", "gpu", "tests/gpu/test_mixed_prefill.py"), limit_s=300),
    Step("kernels", "ours", "own", "module", ("benchmarks.kernel_bench",)),
    Step("kernels-lora", "ours", "own", "module", ("benchmarks.kernel_bench", "--lora")),
    Step("delta-sweep", "ours", "own", "module", ("benchmarks.kernel_bench", "--delta")),
    Step("moe-kernel", "ours", "own", "module", MOE_KERNEL),
    Step("moe-kernel-fp8", "ours", "own", "module", MOE_KERNEL + ("--fp8",)),
    Step("moe-kernel-blockfp8", "ours", "own", "module", MOE_SWEEP + ("--fp8", "--group", "128")),
    *[Step(f"moe-kernel-w8a8{tag}", "ours", "own", "module", MOE_SWEEP + ("--fp8", "--group", "128", "--modes",
           "w8a8", "--shape", f"qwen3-30b-a3b{tag}")) for tag in ("", "-tp2")],  # -tp2: one rank's experts at TP=2
    *[Step(f"matmul-fp8-{tag}", "ours", "own", "module", ("benchmarks.matmul_sweep", "--fp8", "--preset", *flags))
      for tag, flags in (*[(f"30b{t}", ("qwen3-30b-a3b", "--group", "128", "--shapes", "qkv,o", "--buckets",  # block
                                        "2,8,16,32,64,96,128,192,256", "--tp", tp))
                           for t, tp in (("", "1"), ("-tp2", "2"))],
                         ("8b", ("qwen3-8b", "--buckets", "2,8,16,64")))],  # quantization="fp8": a scale per row
    Step("moe-kernel-int4", "ours", "own", "module", MOE_SWEEP + ("--int4",)),
    Step("moe-kernel-mixtral-int4", "ours", "own", "module", MOE_SWEEP + ("--int4", "--shape", "mixtral")),
    *[Step(f"moe-kernel-mxfp4{tag}", "ours", "own", "module", ("benchmarks.moe_kernel", "--layers", "2",
           "--write-table", "--tokens", "1,16,64,256,1024", "--mxfp4", "--modes", "mxfp4", "--shape", shape))
      for tag, shape in (("", "gpt-oss-20b"), ("-120b", "gpt-oss-120b"))],
    Step("int4-kernel", "ours", "own", "module",
         ("benchmarks.kernel_bench", "--int4", "--rows", "1,16,64,256", "--tokens", "16,256")),
    Step("moe-kernel-mixtral", "ours", "own", "module", MOE_KERNEL + ("--shape", "mixtral")),
    Step("profile", "ours", "own", "module", PROFILE + ("--prefill",)),
]
BY_NAME = {s.name: s for s in STEPS}


@dataclass
class Command:
    argv: list[str]
    env: dict[str, str | None] = field(default_factory=dict)  # added to the runner's environment; None unsets
    background: str = ""  # a server's URL: the next commands start once its /health answers
    label: str = "run"


@dataclass
class Context:
    """Where a run happens: its folder, our source tree, vLLM's staging; ``dry``: models named, not written."""
    run_dir: Path
    tree: Path
    peers: Path
    site: Path
    tokenizer: str | None = None
    dry: bool = False
    port: int = 8000  # a server's (serve steps run at once on ports of their own)


def commands(step: Step, ctx: Context) -> list[Command]:
    """The commands of one run of ``step``."""
    py, vllm = sys.executable, step.engine == "vllm"
    env = dict(VLLM_ENV, PYTHONPATH=str(ctx.site)) if vllm else {"PYTHONPATH": str(ctx.tree)}
    env.update(dict(step.env))
    out = str(ctx.run_dir)
    tok = ["--tokenizer", ctx.tokenizer] if ctx.tokenizer else []
    if step.workload == "bench" and vllm:
        return [Command([py, str(ctx.peers / "peer_vllm.py"), *vllm_config(step, ctx), *step.flags, "--out", out],
                        env)]
    model = ["--model", model_dir(step, ctx), *DUMMY] if step.model.startswith(("preset:", "peer:")) else \
        ["--model", model_dir(step, ctx)] if step.model.startswith("fp8:") else []
    if step.workload == "bench":
        return [Command([py, "bench.py", *model, *step.flags, "--json", f"{out}/bench.json"], env)]
    if step.workload == "startup":  # a fresh compile cache: the first process starts cold, the second warm
        model = ["--model", model_dir(step, ctx)]
        env.update(NANOVLLM_CACHE_DIR=f"/tmp/nanovllm-startup-{time.time_ns()}",
                   PYTHONPYCACHEPREFIX="/tmp/nanovllm-pycache", PYTHONDONTWRITEBYTECODE=None)
        return [Command([py, "bench.py", *model, *step.flags, "--json", f"{out}/{phase}.json"], env, label=phase)
                for phase in ("cold", "warm")]
    if step.workload == "vl":
        engine = "vllm" if vllm else "nanovllm"
        return [Command([py, "-m", "benchmarks.inputs_bench", "vl", "--engine", engine, *tok, *step.flags], env)]
    if step.workload == "offload":
        engine = ["--engine", "vllm"] if vllm else []
        return [Command([py, "-m", "benchmarks.offload_bench", *engine, *model, "--budget-gb", "16",
                         "--experts-on-device", "1", "--batch-sizes", "1,16", "--max-tokens", "32", *step.flags], env)]
    if step.workload in ("serve", "multiturn"):
        return serve_commands(step, ctx, env)
    if step.workload in ("structured", "speculative", "embed", "rerank"):  # structured: xgrammar, vLLM's staged one, for ours too
        env["PYTHONPATH"] = str(ctx.site) if vllm else f"{ctx.tree}:{ctx.site}"
        engine = "vllm" if vllm else "nanovllm"
        dummy = list(DUMMY) if step.workload == "speculative" and step.model.startswith(("preset:", "peer:")) else []
        return [Command([py, "-m", "benchmarks.offline_bench", step.workload, "--engine", engine, "--model",
                         with_tokenizer(model_dir(step, ctx), ctx), *dummy, *step.flags], env)]
    if step.workload == "pytest":
        # Each test's name as it starts, written at once: a run cut off by a time limit still shows where it was.
        env.update(TRITON_INTERPRET="0", PYTHONUNBUFFERED="1",
                   **({"TOKENIZER": ctx.tokenizer} if ctx.tokenizer else {}))
        return [Command([py, "-m", "pytest", "-v", "--durations=5", *step.flags], env)]
    if step.workload == "module":  # a preset or peer model comes after the module's own flags
        return [Command([py, "-m", *step.flags, *model], env)]
    raise ValueError(f"step {step.name!r} has an unknown workload {step.workload!r}")


def serve_commands(step: Step, ctx: Context, env: dict) -> list[Command]:
    """A server (ours as users start it, or vLLM's OpenAI server, its engine core in its own process) on the step's
    checkpoint, and our client (serve_bench.py): ``serve`` at a light rate and at a medium and a saturating one;
    ``multiturn`` its chat workload with conversations paced (4/s) and then, new ones (another seed), all at once."""
    py, name, url = sys.executable, ["--served-model-name", "qwen3", "--port", str(ctx.port)], \
        f"http://127.0.0.1:{ctx.port}"
    if step.engine == "vllm":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = None
        model = with_tokenizer(vllm_serve_dir(step, ctx), ctx)
        defaults = {"--max-model-len": "4096", "--max-num-seqs": "256", "--seed": "0"}
        server = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *name, *DUMMY,
                  *(x for flag, value in defaults.items() if flag not in step.flags for x in (flag, value))]
    else:
        env["PYTHONPATH"] = f"{ctx.tree}:{ctx.site}"  # fastapi and uvicorn come with the staged vLLM
        server = [py, "-m", "nanovllm.serve", with_tokenizer(model_dir(step, ctx), ctx), *name]
    client = [py, "-m", "benchmarks.serve_bench", "--base-url", url, "--model", "qwen3"]
    if step.workload == "multiturn":  # alone: 4 conversations one request at a time, TTFT without queueing
        runs = [("paced", ["--request-rate", "4", "--seed", "0"]), ("burst", ["--request-rate", "inf", "--seed", "1"]),
                ("alone", ["--max-concurrency", "1", "--multi-turn", "4,4", "--seed", "2"])]
    else:
        runs = [("light", ["--request-rate", "4", "--num-prompts", "128"]),
                ("load", ["--request-rate", "16,inf", "--num-prompts", "256"])]
    return [Command(server + list(step.flags), env, background=url, label="server")] + [
        Command(client + [*step.client, *flags, "--json", f"{label}.json"], {"PYTHONPATH": str(ctx.tree)}, label=label)
        for label, flags in runs]
