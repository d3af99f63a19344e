"""LoRA adapters below the engine: the request naming one (``request.py``), reading a PEFT adapter directory into
host tensors (``peft.py``) and the bookkeeping of device slots and the host cache (``slots.py``).

This package imports no engine, entrypoint or ``LLM`` code; writing an adapter into the kernel's slot pool
(``nanovllm/kernels/lora``) is the engine's job.
"""
