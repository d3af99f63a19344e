"""Embedding settings, vLLM's names: ``PoolerConfig`` (how an engine pools) and ``PoolingParams`` (one request's).

* Pooling types: ``LAST``, the final normed hidden state of a prompt's last token (causal LMs' default, as
  Qwen3-Embedding pools), and ``MEAN``, their mean over every prompt token.  Any other type (vLLM's ``ALL``,
  ``CLS``, ``STEP``; sentence-transformers' max, weighted mean...) is refused by name.
* ``resolve_pooler(model_dir, override)``: the engine's ``PoolerConfig``: ``override`` (``LLM(pooler_config=...)``,
  a dict or its JSON text with ``pooling_type`` and ``normalize``) over the checkpoint's sentence-transformers
  ``modules.json`` (its Pooling module's ``config.json`` mode; normalize iff it lists a Normalize module) over the
  default, LAST and normalize.  An override naming an unsupported type raises ``ValueError`` at once; a checkpoint
  declaring one keeps it (``generate`` is unaffected) and ``PoolingParams.resolve`` refuses it.
* ``PoolingParams(dimensions, normalize, pooling_type)``: None follows the engine's pooler; ``dimensions`` keeps
  the first d values (Matryoshka) before normalising, allowed only where config.json declares ``is_matryoshka``
  or ``matryoshka_dimensions`` (then one of those), vLLM's rule; ``pooling_type`` per request is nanovllm's own.
* ``classifier_from_token`` ``[no, yes]`` (``pooler_config``'s, else config.json's): a yes/no reranker (scoring.py).
"""
import json
import os
from dataclasses import dataclass, replace

POOLING_TYPES = ("LAST", "MEAN")
_MODES = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS",
          "pooling_mode_max_tokens": "MAX", "pooling_mode_mean_sqrt_len_tokens": "MEAN_SQRT_LEN",
          "pooling_mode_weightedmean_tokens": "WEIGHTEDMEAN"}  # sentence-transformers' Pooling config keys
_OVERRIDE_KEYS = ("pooling_type", "normalize", "classifier_from_token")


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: str = "LAST"
    normalize: bool = True
    source: str = "the default of causal language models"  # where ``pooling_type`` comes from, for errors
    classifier_from_token: tuple[str, str] | None = None  # (no, yes) tokens of a yes/no reranker (scoring.py)

    def check(self) -> None:
        """Raise ``ValueError`` naming the type and where it came from unless nanovllm pools that way."""
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling type {self.pooling_type!r} ({self.source}) is not supported: nanovllm pools "
                             f"LAST or MEAN; choose one with pooler_config={{\"pooling_type\": \"LAST\"}}")


def parse_override(value) -> dict:
    """The ``pooler_config`` option (None, a dict or its JSON text) as checked keyword arguments of PoolerConfig."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"pooler_config is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise TypeError(f"pooler_config must be a dict (or its JSON text), got {type(value).__name__}")
    unknown = sorted(set(value) - set(_OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"pooler_config: unknown key(s) {', '.join(map(repr, unknown))}; nanovllm takes "
                         f"{', '.join(map(repr, _OVERRIDE_KEYS))}")
    out = {}
    if "pooling_type" in value:
        out["pooling_type"] = check_type(value["pooling_type"], "pooler_config's pooling_type")
        out["source"] = "from pooler_config"
    if "normalize" in value:
        if not isinstance(value["normalize"], bool):
            raise TypeError(f"pooler_config's normalize must be a bool, got {value['normalize']!r}")
        out["normalize"] = value["normalize"]
    if "classifier_from_token" in value:
        out["classifier_from_token"] = check_tokens(value["classifier_from_token"], "pooler_config's")
    return out


def check_tokens(value, where: str) -> tuple[str, str]:
    """``classifier_from_token`` as a (no, yes) tuple of two token strings, else ``ValueError`` naming ``where``."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(t, str) and t for t in value)):
        raise ValueError(f"{where} classifier_from_token must be a list of two tokens, [no, yes] "
                         f"(as [\"no\", \"yes\"]), got {value!r}")
    return tuple(value)


def check_type(value, what: str) -> str:
    """``value`` as an upper-case pooling type nanovllm supports, else ``TypeError``/``ValueError`` naming ``what``."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {value!r}")
    if value.upper() not in POOLING_TYPES:
        raise ValueError(f"{what} {value!r} is not supported: nanovllm pools {' or '.join(POOLING_TYPES)}")
    return value.upper()


def read_sentence_transformers(model_dir: str) -> dict:
    """PoolerConfig keyword arguments from a sentence-transformers ``modules.json`` in ``model_dir`` (none without)."""
    path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        modules = json.load(f)
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    out = {"normalize": "Normalize" in kinds}
    if "Pooling" in kinds:
        where = modules[kinds.index("Pooling")].get("path", "")
        config = os.path.join(model_dir, where, "config.json")
        if os.path.isfile(config):
            with open(config) as f:
                flags = json.load(f)
            modes = [name for key, name in _MODES.items() if flags.get(key)]
            if modes:
                name = os.path.join(where, "config.json")
                out.update(pooling_type="+".join(modes), source=f"from the checkpoint's {name}")
    return out


def resolve_pooler(model_dir: str, override=None) -> PoolerConfig:
    """The engine's ``PoolerConfig`` (module docstring)."""
    return PoolerConfig(**{**read_sentence_transformers(model_dir), **_read_config(model_dir),
                           **parse_override(override)})


def _read_config(model_dir: str) -> dict:
    """``classifier_from_token`` of the checkpoint's config.json (as vLLM's ``hf_overrides`` put it), if any."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        tokens = json.load(f).get("classifier_from_token")
    return {} if tokens is None else {"classifier_from_token": check_tokens(tokens, "config.json's")}


@dataclass(frozen=True)
class PoolingParams:
    """One embedding request's settings (module docstring); made by the caller, resolved by the engine."""
    dimensions: int | None = None
    normalize: bool | None = None
    pooling_type: str | None = None

    def __post_init__(self):
        if self.dimensions is not None and (not isinstance(self.dimensions, int) or isinstance(self.dimensions, bool)
                                            or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive int, got {self.dimensions!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be a bool, got {self.normalize!r}")
        if self.pooling_type is not None:
            object.__setattr__(self, "pooling_type", check_type(self.pooling_type, "pooling_type"))

    def resolve(self, pooler: PoolerConfig, hf_config: dict, model: str = "this model") -> "PoolingParams":
        """These settings with the engine's pooler filling what they leave unset; ``ValueError`` for an unsupported
        pooling type or ``dimensions`` the checkpoint does not offer (vLLM's messages)."""
        if self.pooling_type is None:
            pooler.check()
        if self.dimensions is not None:
            text = hf_config.get("text_config") or hf_config
            offered = text.get("matryoshka_dimensions") or hf_config.get("matryoshka_dimensions")
            if not (offered or text.get("is_matryoshka") or hf_config.get("is_matryoshka")):
                raise ValueError(f"Model {model!r} does not support matryoshka representation, changing output "
                                 f"dimensions will lead to poor results (dimensions={self.dimensions})")
            if offered and self.dimensions not in offered:
                raise ValueError(f"Model {model!r} only supports {offered} matryoshka dimensions, using other "
                                 f"output dimensions will lead to poor results (dimensions={self.dimensions})")
            if self.dimensions > text.get("hidden_size", self.dimensions):
                raise ValueError(f"dimensions={self.dimensions} exceeds the model's hidden size "
                                 f"{text['hidden_size']}")
        return replace(self, pooling_type=self.pooling_type or pooler.pooling_type,
                       normalize=pooler.normalize if self.normalize is None else self.normalize)
