"""A tiny checkpoint with a real (tiny) tokenizer for the text-level tests: stop strings, streaming, chat.

``build_text_checkpoint(dir)`` writes conftest's random tiny Qwen3 (vocab 384) plus a byte-level BPE tokenizer of
exactly 384 tokens trained on a few sentences, with ChatML special tokens and chat template (EOS ``<|im_end|>``).
With so few merges, most non-ASCII characters are split into one token per UTF-8 byte.

The weights are random except for a planted chain: the embedding of each token of ``CHAIN`` points along its own
hidden direction, far larger than anything the layers add, and the LM head row of the next token of the chain
reads that direction.  So wherever the last token is a chain token, the greedy next token is the following one,
and after the chat template's generation prompt (which ends with the chain's first token) the model answers
``CHAIN_TEXT`` and then EOS, whatever came before.
"""
from pathlib import Path

import torch

from conftest import build_checkpoint

CHAIN_TEXT = "Zoë: ☃𝄞 fine! Paris"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = ("The quick brown fox jumps over the lazy dog. A server streams tokens to every client that asks.\n"
           "Hello world, this is a tiny tokenizer for tests. Numbers like 12345 and 67890 appear here and there.\n"
           "Stop strings end a completion; logprobs report how likely each token was. Paris is in France.\n")


def build_tokenizer(out_dir) -> "object":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS * 3], trainer)
    assert tok.get_vocab_size() == 384
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def build_text_checkpoint(out_dir) -> tuple[str, list[int]]:
    """(checkpoint dir, the chain's token ids: the generation prompt's last token, CHAIN_TEXT's tokens, EOS)."""
    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    chain = [tok.encode(prompt)[-1]] + tok.encode(CHAIN_TEXT) + [eos]
    assert len(set(chain)) == len(chain) and tok.decode(chain[1:], skip_special_tokens=True) == CHAIN_TEXT
    build_checkpoint(out_dir, "qwen3", eos_token_id=eos, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    _plant_chain(out_dir, chain)
    return str(out_dir), chain


def _plant_chain(out_dir: Path, chain: list[int]) -> None:
    from safetensors.torch import load_file, save_file
    path = out_dir / "model.safetensors"
    weights = load_file(path)
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    hidden = embed.shape[1]
    assert len(chain) <= hidden
    for i, (token, following) in enumerate(zip(chain, chain[1:])):
        direction = torch.zeros(hidden)
        direction[i] = 1.0
        embed[token] = 50.0 * direction  # dwarfs the layers' additions: the final norm sees ~ this direction
        head[following] = 3.0 * direction  # logit ~ 3 * sqrt(hidden) = 24 where the chain is the last token
    save_file(weights, path, metadata={"format": "pt"})
