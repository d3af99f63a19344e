"""The server's command line: ``python -m nanovllm.serve MODEL [flags]`` and ``nanovllm serve MODEL [flags]``.

Server flags (host, port, served model name, API key, the waiting-queue bound, the chat template and its default
kwargs, the reasoning and tool-call parsers, ``--lora-modules``) are this file's; a bad one (a template file that
cannot be read, kwargs that are not a JSON object, an unknown parser, adapters without ``--enable-lora``) exits before
the engine is built, naming the value; every ``LLM(...)`` option is a flag too, derived from ``EngineConfig``
(``nanovllm/cli.py``) with its default, so none is written here.  The engine runs in a process of its own
(``entrypoints/engine_process.py``) and is built (weights, KV cache, compilation), and ``--lora-modules`` loaded
(``lora_models.py``), before the port opens, so a client that reaches ``/health`` finds it ready; if either fails,
the command exits with its error.  Without the ``serve`` extra (FastAPI, uvicorn) the command exits with one line
naming the missing module and the extra to install.
"""
import argparse
import sys

from nanovllm import envs
from nanovllm.cli import add_engine_args, engine_kwargs

DEFAULT_MAX_WAITING_SEQS = 4096
SERVE_MODULES = ("fastapi", "uvicorn", "pydantic", "prometheus_client")  # what the server needs of the `serve` extra


def make_parser(prog: str = "python -m nanovllm.serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible server (/v1/completions, "
                                "/v1/chat/completions, /v1/models, /health, /version, /metrics)")
    p.add_argument("model", help="HF checkpoint directory, or a hub repo id org/name (downloaded: --revision, "
                   "--download-dir); /v1/models lists it as given")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: MODEL as given)")
    p.add_argument("--api-key", default=envs.get("NANOVLLM_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 routes (default: $NANOVLLM_API_KEY, else none)")
    p.add_argument("--max-waiting-seqs", type=int, default=DEFAULT_MAX_WAITING_SEQS,
                   help="sequences that may wait for a batch slot; a request that would pass it gets 503 "
                        f"(default: {DEFAULT_MAX_WAITING_SEQS})")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template file that replaces the checkpoint's")
    p.add_argument("--default-chat-template-kwargs", default=None, metavar="JSON",
                   help="a JSON object of chat template variables for every chat request, under the request's own "
                        "chat_template_kwargs (e.g. '{\"enable_thinking\": false}')")
    p.add_argument("--reasoning-parser", default=None, metavar="NAME",
                   help="take the model's reasoning (<think>...</think>, or GPT-OSS's analysis channel) out of chat "
                        "replies' content into 'reasoning' and 'reasoning_content': qwen3, deepseek_r1 or gpt_oss")
    p.add_argument("--tool-call-parser", default="hermes", metavar="NAME",
                   help="the format of the model's own tool calls, read in chat replies with tool_choice \"auto\": "
                        "hermes (default), qwen3_coder, llama3_json or mistral")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters (PEFT directories) served as models NAME, with --enable-lora; each item "
                        "name=path or a JSON object '{\"name\": ..., \"path\": ...}'")
    p.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    add_engine_args(p)
    return p


def serve(argv=None, prog: str = "python -m nanovllm.serve") -> None:
    args = make_parser(prog).parse_args(argv)
    if args.max_waiting_seqs < 0:
        raise SystemExit(f"--max-waiting-seqs must be >= 0, got {args.max_waiting_seqs}")
    require_serve_extra()
    chat = chat_options(args)
    loras = lora_options(args)
    import uvicorn

    from nanovllm.entrypoints.app import build_app
    from nanovllm.entrypoints.engine_loop import EngineLoop
    from nanovllm.entrypoints.serving import Serving
    from nanovllm.logger import logger
    from nanovllm.prompts import Prompts

    try:
        loop, info = EngineLoop.in_process(args.model, engine_kwargs(args), args.max_waiting_seqs)
    except RuntimeError as e:
        raise SystemExit(f"nanovllm serve: {e}") from None
    try:
        prompts = Prompts(info["model"], info["hf_config"], info["vocab_size"], info["max_model_len"])
        if chat["template"] is not None:
            prompts.use_chat_template(chat["template"])
        serving = Serving(loop, prompts, args.served_model_name or args.model, chat["kwargs"], chat["parser"],
                          chat["tool_parser"], info.get("pooler"), loras)
    except ValueError as e:  # what the server cannot serve (no tokenizer, a bad chat template): named
        loop.shutdown()
        raise SystemExit(f"nanovllm serve: {e}") from None
    except BaseException:
        loop.shutdown()
        raise
    app = build_app(serving, args.api_key)
    logger.info("serving %r on http://%s:%d (API key %s)", serving.model_name, args.host, args.port,
                "required" if args.api_key else "not required")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level, timeout_keep_alive=30)


def chat_options(args) -> dict:
    """``{"template", "kwargs", "parser", "tool_parser"}`` of the chat flags, read and checked; ``SystemExit``
    naming a bad one."""
    import json

    from nanovllm.entrypoints.parsers import reasoning_parser, tool_parser
    from nanovllm.prompts import TEMPLATE_ARGUMENTS
    out = {"template": None, "kwargs": {}, "parser": None, "tool_parser": None}
    if args.chat_template is not None:
        try:
            with open(args.chat_template) as f:
                out["template"] = f.read()
        except OSError as e:
            raise SystemExit(f"nanovllm serve: --chat-template {args.chat_template!r} cannot be read: {e}") from None
        if not out["template"].strip():
            raise SystemExit(f"nanovllm serve: --chat-template {args.chat_template!r} is empty")
    if args.default_chat_template_kwargs is not None:
        try:
            out["kwargs"] = json.loads(args.default_chat_template_kwargs)
        except ValueError as e:
            raise SystemExit(f"nanovllm serve: --default-chat-template-kwargs {args.default_chat_template_kwargs!r} "
                             f"is not JSON: {e}") from None
        if not isinstance(out["kwargs"], dict):
            raise SystemExit(f"nanovllm serve: --default-chat-template-kwargs must be a JSON object, got "
                             f"{args.default_chat_template_kwargs!r}")
        clash = sorted(TEMPLATE_ARGUMENTS.intersection(out["kwargs"]))
        if clash:
            raise SystemExit(f"nanovllm serve: --default-chat-template-kwargs may not set {clash}")
    if args.reasoning_parser is not None:
        try:
            out["parser"] = reasoning_parser(args.reasoning_parser)
        except ValueError as e:
            raise SystemExit(f"nanovllm serve: --reasoning-parser: {e}") from None
    try:
        out["tool_parser"] = tool_parser(args.tool_call_parser)
    except ValueError as e:
        raise SystemExit(f"nanovllm serve: --tool-call-parser: {e}") from None
    return out


def lora_options(args) -> list | None:
    """``--lora-modules`` read and checked (``lora_models.lora_modules``), ``[]`` without it; None without
    ``--enable-lora``.  ``SystemExit`` naming a bad one, or the flag without ``--enable-lora``."""
    from nanovllm.entrypoints.lora_models import lora_modules
    enabled = getattr(args, "enable_lora", False)
    if args.lora_modules and not enabled:
        raise SystemExit("nanovllm serve: --lora-modules needs --enable-lora (the engine serves adapters only with it)")
    try:
        modules = lora_modules(args.lora_modules)
    except ValueError as e:
        raise SystemExit(f"nanovllm serve: {e}") from None
    served = args.served_model_name or args.model
    if any(name == served for name, _, _ in modules):
        raise SystemExit(f"nanovllm serve: --lora-modules names {served!r}, the base model's name")
    return modules if enabled else None


def require_serve_extra() -> None:
    """Exit with one line naming the first missing module of the ``serve`` extra, and how to install it."""
    import importlib
    for name in SERVE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            raise SystemExit(f"nanovllm serve: the server needs the `serve` extra, and module {name!r} is missing: "
                             f'pip install "nanovllm[serve]" (from a checkout: pip install -e ".[serve]")') from None


def main(argv=None) -> None:
    """``nanovllm SUBCOMMAND ...``: ``serve`` is the only one so far."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "serve":
        raise SystemExit("usage: nanovllm serve MODEL [flags]  (nanovllm serve --help lists the flags)")
    serve(argv[1:], prog="nanovllm serve")
