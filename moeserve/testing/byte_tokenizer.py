"""A byte-level tokenizer in HF layout, for tests and the demo model (nothing is downloaded).

Token ``b`` (0..255) is the byte ``b``; the special tokens follow. Any UTF-8 text that does not contain a
special token's spelling round-trips exactly through encode -> decode. A single token may end in the middle of
a multi-byte character, as tokens of real byte-level BPE vocabularies do; the detokenizer must cope.
Both ``moeserve.tokenizer.Tokenizer`` and transformers' ``AutoTokenizer`` load the files written here.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from moeserve.tokenizer import byte_level_alphabet

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN)

NUM_BYTES = 256
BOS_TOKEN_ID = NUM_BYTES + SPECIAL_TOKENS.index(BOS_TOKEN)
EOS_TOKEN_ID = NUM_BYTES + SPECIAL_TOKENS.index(EOS_TOKEN)
IM_START_TOKEN_ID = NUM_BYTES + SPECIAL_TOKENS.index(IM_START_TOKEN)
IM_END_TOKEN_ID = NUM_BYTES + SPECIAL_TOKENS.index(IM_END_TOKEN)
PAD_TOKEN_ID = NUM_BYTES + SPECIAL_TOKENS.index(PAD_TOKEN)
BYTE_VOCAB_SIZE = NUM_BYTES + len(SPECIAL_TOKENS)
MODEL_MAX_LENGTH = 4096

# One turn per message, then the assistant header when a reply is wanted.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_byte_tokenizer() -> HFTokenizer:
    """A ``tokenizers.Tokenizer`` with ids 0..255 = bytes and the special tokens after them."""
    tok = HFTokenizer(models.BPE(vocab=dict(byte_level_alphabet()), merges=[]))
    # No regex split and no prefix space: the text is cut into bytes exactly as given.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert alphabet_matches(tok), "byte alphabet differs from tokenizers' ByteLevel alphabet"
    return tok


def alphabet_matches(tok: HFTokenizer) -> bool:
    return set(pre_tokenizers.ByteLevel.alphabet()) == set(byte_level_alphabet()) and all(
        tok.token_to_id(t) == NUM_BYTES + i for i, t in enumerate(SPECIAL_TOKENS)
    )


def write_byte_tokenizer(path: str | Path, chat_template: str | None = DEFAULT_CHAT_TEMPLATE) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into directory ``path``.

    ``chat_template=None`` writes a tokenizer without a chat template (a base model).
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    build_byte_tokenizer().save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    added = {
        str(NUM_BYTES + i): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_json(out / "tokenizer_config.json", config)
    special["additional_special_tokens"] = [IM_START_TOKEN, IM_END_TOKEN]
    _write_json(out / "special_tokens_map.json", special)


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
