"""``resolve_model(model, revision, download_dir)``: a checkpoint directory for ``LLM(model)``, local or from the hub.

* ``model`` an existing directory: returned unchanged (``revision`` and ``download_dir`` are not used).
* ``model`` a hub repo id (``org/name``, not a directory here): ``huggingface_hub.snapshot_download`` fetches the
  files in ``ALLOW_PATTERNS`` (config, generation config, tokenizer and chat template, processor configs,
  sentence-transformers' pooling config, ``*.safetensors`` and their index; never ``*.bin``, ``*.pt``, ``*.gguf``)
  at ``revision`` (branch, tag or commit; default ``main``) into ``download_dir`` (default: the hub cache,
  ``$HF_HUB_CACHE``), with huggingface_hub's own progress bars, and the snapshot directory is returned.
  ``weights=False`` (``load_format="dummy"``) fetches everything but the weights.  ``HF_HUB_OFFLINE=1``: no request
  is made, and the snapshot already in the cache is returned.
* Errors name what is missing: ``ValueError`` for a repo or revision the hub does not have (repo id, revision), for
  an id that is neither a directory nor a plausible repo id (the path); ``FileNotFoundError`` for a snapshot without
  ``config.json`` or without ``*.safetensors`` (repo id, revision, file), or nothing (complete) in the cache while
  offline or the hub unreachable (repo id, revision, cache directory).
"""
import glob
import os
import re

WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
ALLOW_PATTERNS = [
    "config.json", "generation_config.json",
    # tokenizer: fast, sentencepiece, BPE and WordPiece files, tiktoken
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "*.tiktoken",
    # chat templates
    "chat_template.jinja", "chat_template.json", "additional_chat_templates/*.jinja",
    # vision-language processors
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    # sentence-transformers
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json",
    *WEIGHT_PATTERNS,
]
# the hub's rule: one namespace and one name of letters, digits, '-', '_', '.', neither starting nor ending with
# '-' or '.', no '--' or '..' (huggingface_hub.utils.validate_repo_id), at most 96 characters in all
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_PART}/{_PART}")


def looks_like_repo_id(model: str) -> bool:
    """Whether ``model`` is a plausible hub repo id ``org/name``."""
    return (len(model) <= 96 and _REPO_ID.fullmatch(model) is not None
            and "--" not in model and ".." not in model)


def resolve_model(model: str, revision: str | None = None, download_dir: str | None = None, *,
                  weights: bool = True) -> str:
    """The local checkpoint directory for ``model`` (see the module docstring)."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a checkpoint directory or a hub repo id, got {type(model).__name__}")
    model = os.fspath(model)
    for name, value in (("revision", revision), ("download_dir", download_dir)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
    if os.path.isdir(model):
        return model
    if not looks_like_repo_id(model):
        raise FileNotFoundError(f"model directory not found: {model!r} (nor is it a hub repo id of the form "
                                f"'org/name')")
    download_dir = os.fspath(download_dir) if download_dir is not None else None
    path = _download(model, revision, download_dir, weights)
    _check_snapshot(path, model, revision, weights)
    return path


def _where(repo_id: str, revision: str | None) -> str:
    return f"hub repo {repo_id!r} at revision {revision or 'main'!r}"


def _download(repo_id: str, revision: str | None, download_dir: str | None, weights: bool) -> str:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    try:
        from huggingface_hub.errors import IncompleteSnapshotError
    except ImportError:  # older huggingface_hub releases have no such check
        IncompleteSnapshotError = LocalEntryNotFoundError
    patterns = ALLOW_PATTERNS if weights else [p for p in ALLOW_PATTERNS if p not in WEIGHT_PATTERNS]
    where = _where(repo_id, revision)
    cache = download_dir or constants.HF_HUB_CACHE
    not_here = f"{repo_id!r} is no local directory, and "
    try:
        # no tqdm_class: huggingface_hub's bars, shown unless HF_HUB_DISABLE_PROGRESS_BARS is set
        return huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=download_dir,
                                                 allow_patterns=patterns)
    except RevisionNotFoundError:
        raise ValueError(f"{not_here}the hub has no revision {revision or 'main'!r} of {repo_id!r} (a branch, "
                         f"tag or commit hash)") from None
    except GatedRepoError as e:
        raise ValueError(f"{not_here}{where} is gated: accept its terms on the hub and log in "
                         f"(`hf auth login` or $HF_TOKEN) ({type(e).__name__})") from e
    except RepositoryNotFoundError as e:
        raise ValueError(f"{not_here}the hub has no model repo {repo_id!r} (or it is private: log in with "
                         f"`hf auth login` or set $HF_TOKEN) ({type(e).__name__})") from e
    except IncompleteSnapshotError as e:  # a subclass of LocalEntryNotFoundError where it exists
        raise FileNotFoundError(f"{where}: the snapshot cached in {cache!r} lacks files and the hub cannot be "
                                f"reached ({'HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else 'offline'}): "
                                f"{e}") from None
    except LocalEntryNotFoundError as e:
        why, fix = (("HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE or download it first") if constants.HF_HUB_OFFLINE
                    else (f"the hub ({constants.ENDPOINT}) cannot be reached", "check the connection"))
        raise FileNotFoundError(f"{not_here}{why}, and no snapshot of {where} is cached in {cache!r}: {fix} "
                                f"({type(e).__name__})") from e
    except EntryNotFoundError as e:  # a file the hub listed but would not serve
        raise FileNotFoundError(f"{where}: a file it lists could not be fetched: {e}") from e


def _check_snapshot(path: str, repo_id: str, revision: str | None, weights: bool) -> None:
    where = _where(repo_id, revision)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{where} has no config.json, so it is no transformers checkpoint "
                                f"(downloaded to {path!r})")
    if weights and not glob.glob(os.path.join(path, "*.safetensors")):
        raise FileNotFoundError(f"{where} has no *.safetensors weights (nanovllm reads only safetensors, and does "
                                f"not download *.bin, *.pt or *.gguf; load_format='dummy' needs only config.json) "
                                f"(downloaded to {path!r})")
