"""``Prompts``: a checkpoint's prompts turned into what the engine takes, with no engine behind it.

It holds the tokenizer (``None`` when the checkpoint has none) and, for vision-language checkpoints, the image
preprocessing (``multimodal.ImagePrompts``).  ``LLM`` uses one beside its engine; the server's front process
builds its own from what the engine process reports (``entrypoints/engine_process.py``), so that prompts are
tokenized and checked where the requests arrive.

* ``encode_prompt``: a str is tokenized, a token-id list checked against the vocabulary; empty, too long
  (``max_model_len``) or out-of-vocabulary prompts raise ``TypeError``/``ValueError`` naming prompt ``index``.
* ``encode_request``: (token ids, ``ImageInputs`` or None) of a str, a token-id list or a dict prompt with
  ``multi_modal_data``.
* ``apply_chat_template``: one conversation's token ids, ready for the assistant's reply, the tools (OpenAI function
  tools) rendered when given, ``chat_template_kwargs`` as template variables (a ``TEMPLATE_ARGUMENTS`` key: a
  ``ValueError`` naming it).  ``use_chat_template``: a Jinja text replaces the checkpoint's template.
"""
import os

from nanovllm.logger import logger
from nanovllm.models.registry import resolve_model_class
from nanovllm.multimodal import ImagePrompts

# ``tokenizer.apply_chat_template``'s own arguments and the template's ``messages``: not chat_template_kwargs
TEMPLATE_ARGUMENTS = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})


class Prompts:
    def __init__(self, model_dir: str, hf_config: dict, vocab_size: int, max_model_len: int):
        self.model, self.vocab_size, self.max_model_len = model_dir, vocab_size, max_model_len
        self.hf_config = hf_config
        self.tokenizer = load_tokenizer(model_dir)
        # a config with a vision tower we do not run (Gemma 3's, Gemma 4's) is text-only here
        self.text_only = "vision_config" in hf_config and not hasattr(resolve_model_class(hf_config), "encode_images")
        takes_images = "vision_config" in hf_config and not self.text_only
        self.images = ImagePrompts(model_dir, hf_config, self.tokenizer) if takes_images else None

    def encode_request(self, prompt, index: int = 0):
        """(token ids, ``ImageInputs`` or None) of a prompt: a str, a token-id list, or a dict with ``prompt`` (or
        ``prompt_token_ids``) and ``multi_modal_data`` (``nanovllm/multimodal.py``).  Raises as ``encode_prompt``,
        and ``ValueError`` for images a text-only model cannot take, or placeholders that don't match them."""
        if not isinstance(prompt, dict):
            return self.encode_prompt(prompt, index), None
        if self.images is None:
            if (prompt.get("multi_modal_data") or {}).get("image") is not None:
                why = (f"{resolve_model_class(self.hf_config).__name__}: its vision tower is not supported"
                       if self.text_only else "its config has no vision_config")
                raise ValueError(f"prompt {index} has images but {self.model!r} is not a vision-language model "
                                 f"({why})")
            return self.encode_prompt(prompt.get("prompt", prompt.get("prompt_token_ids")), index), None
        ids, image_inputs = self.images.encode(prompt, index)
        ids = self.encode_prompt(ids, index)  # the vocabulary and max_model_len checks, image tokens included
        return ids, image_inputs

    def encode_prompt(self, prompt, index: int = 0) -> list[int]:
        """A prompt's token ids: a str is tokenized, a list of ints checked against the vocabulary.  Raises
        ``TypeError``/``ValueError`` naming prompt ``index`` and the bad value (empty, too long, bad id)."""
        vocab, limit = self.vocab_size, self.max_model_len
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is text but {self.model!r} has no tokenizer; "
                                 f"pass token-id lists instead")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            # per element only in C (map, min, max): bench's 143k prompt tokens are checked in a few ms
            if not all(issubclass(t, int) and t is not bool for t in set(map(type, ids))):
                raise TypeError(f"prompt {index} must be a str or a list of int token ids")
            if ids and (min(ids) < 0 or max(ids) >= vocab):
                bad = next(t for t in ids if not 0 <= t < vocab)
                raise ValueError(f"prompt {index} has token id {bad} outside the vocabulary [0, {vocab})")
        else:
            raise TypeError(f"prompt {index} must be a str or a list of int token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        if len(ids) > limit:
            raise ValueError(f"prompt {index} has {len(ids)} tokens, more than max_model_len={limit}")
        return ids

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            chat_template_kwargs: dict | None = None) -> list[int]:
        """The token ids of one conversation through the checkpoint's chat template, ready for the assistant's
        reply; ``tools`` (OpenAI function tools) are passed to the template as transformers' ``tools``, and
        ``chat_template_kwargs`` as template variables.  Raises ``ValueError`` if there is no tokenizer or no
        template, or a kwarg is one of ``TEMPLATE_ARGUMENTS``."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.model!r} has no chat template (tokenizer_config.json "
                             f"'chat_template' or chat_template.jinja)")
        kwargs = dict(chat_template_kwargs or {})
        clash = sorted(TEMPLATE_ARGUMENTS.intersection(kwargs))
        if clash:
            raise ValueError(f"chat_template_kwargs may not set {clash}: apply_chat_template sets them itself")
        text = self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=True, **kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template writes any BOS itself

    def use_chat_template(self, template: str) -> None:
        """Render chats with ``template`` (Jinja text) instead of the checkpoint's; needs a tokenizer."""
        if self.tokenizer is None:
            raise ValueError(f"a chat template needs a tokenizer, and {self.model!r} has none")
        if not isinstance(template, str) or not template.strip():
            raise ValueError(f"the chat template must be non-empty Jinja text, got {template!r}")
        self.tokenizer.chat_template = template


def load_tokenizer(model_dir: str):
    """The checkpoint's transformers tokenizer, or ``None`` (with a warning) when it has no tokenizer files."""
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        logger.warning("no tokenizer in %s: only token-id prompts work and outputs carry no text", model_dir)
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)
