"""LoRA adapters, above the models and below the engine: the request naming one (``request.py``), reading a PEFT
adapter directory into host tensors (``peft.py``), the bookkeeping of device slots and the host cache
(``slots.py``) and the device pool on a model's projections that the kernel reads (``pool.py``).

This package imports no engine, entrypoint or ``LLM`` code; deciding when an adapter enters a slot is the engine's.
"""
