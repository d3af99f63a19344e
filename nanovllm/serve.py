"""``python -m nanovllm.serve MODEL [flags]``: the OpenAI-compatible server (``nanovllm/entrypoints/``)."""
from nanovllm.entrypoints.cli import serve

if __name__ == "__main__":
    serve()
