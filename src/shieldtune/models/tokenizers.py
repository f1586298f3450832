"""A byte-level tokenizer built in code, for the tiny random test models (nothing downloaded)."""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["byte_tokenizer", "BYTE_VOCAB_SIZE"]

_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
BYTE_VOCAB_SIZE = 256 + len(_SPECIALS)

# A minimal chat template so instruction formatting works on tiny models as on real ones.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@lru_cache(maxsize=1)
def _backend_json() -> str:
    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(byte_map):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIALS)
    return tok.to_str()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + <pad>, <s>, </s>, <unk>) with a chat template.

    Returns:
        A fresh ``PreTrainedTokenizerFast``; pad id 0, bos 1, eos 2, right padding.
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend_json()),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
    )
    tok.chat_template = _CHAT_TEMPLATE
    return tok
