"""Command-line flags derived from ``EngineConfig``'s fields, so that no CLI writes the engine's options by hand.

``add_engine_args(parser)`` adds one ``--flag-name`` per user-settable field (its help and default come from
the field); ``engine_kwargs(args)`` returns the ``LLM(...)`` keyword arguments of the flags that were given.
A flag that is not given is not passed, so ``LLM``'s own default applies.  Bools are switches
(``--enforce-eager``); list fields take comma-separated ints, and ``none`` for an empty list.
``python -m nanovllm.cli`` prints the README's argument table, ``python -m nanovllm.cli env`` the table of
environment variables (``nanovllm/envs.py``, docs/ENVIRONMENT.md).
"""
import argparse
import typing

from nanovllm.config import engine_fields


def _int_list(text: str) -> list[int]:
    if text.strip().lower() == "none":
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints or 'none', got {text!r}") from None


def _scalar_type(annotation):
    """int, float or str for a field annotated ``int``, ``float | None`` and so on."""
    if isinstance(annotation, str):  # postponed annotations
        annotation = eval(annotation, vars(typing))  # noqa: S307 - our own dataclass's annotations
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return args[0] if args[0] in (int, float, str, bool) else str


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("model",),
                    defaults: dict | None = None) -> argparse.ArgumentParser:
    """Add a flag for each ``EngineConfig`` field not in ``skip``; ``defaults`` overrides what a CLI defaults to
    (shown in its help and passed even when the flag is not given)."""
    defaults = defaults or {}
    group = parser.add_argument_group("engine options (LLM(...) arguments)")
    for f in engine_fields():
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        help_text = f.metadata.get("help", "").replace("`", "") + f" (default: {default})"
        kwargs = {"dest": f.name, "help": help_text,
                  "default": default if f.name in defaults else argparse.SUPPRESS}
        if "list_of" in f.metadata:
            kwargs["type"] = _int_list
        elif _scalar_type(f.type) is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _scalar_type(f.type)
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        group.add_argument(flag_name(f.name), **kwargs)
    return parser


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The ``LLM(...)`` keyword arguments among ``args`` (every engine flag that was given or has a CLI default)."""
    names = {f.name for f in engine_fields()} - {"model"}
    return {name: value for name, value in vars(args).items() if name in names}


def markdown_table() -> str:
    """The README's table of ``LLM(...)`` arguments (a test keeps the README equal to it)."""
    import dataclasses
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    for f in engine_fields():
        default = "" if f.default is dataclasses.MISSING else f"`{f.default!r}`"
        rows.append(f"| `{f.name}` | {default} | {f.metadata.get('help', '')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    from nanovllm import envs
    print(envs.markdown_table() if sys.argv[1:] == ["env"] else markdown_table())
