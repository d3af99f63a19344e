"""The OpenAI-compatible HTTP server and its engine loop (``python -m nanovllm.serve``, ``nanovllm serve``).

``engine_loop`` steps the engine in a background thread; ``choices`` turns its per-step deltas into text (stop
strings, incremental detokenization); ``completions`` and ``chat`` are the endpoints, ``app`` wires them into
FastAPI with the API key and error shape; ``metrics`` is the Prometheus registry; ``cli`` the command line.
"""
