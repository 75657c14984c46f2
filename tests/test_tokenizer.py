"""Tokenizer: encode/decode and chat templates agree with transformers' AutoTokenizer (byte tokenizer)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors
from transformers import AutoTokenizer

from moeserve.loader.checkpoint import CheckpointError
from moeserve.testing.byte_tokenizer import (
    BOS_TOKEN_ID,
    BYTE_VOCAB_SIZE,
    EOS_TOKEN_ID,
    IM_END_TOKEN_ID,
    SPECIAL_TOKENS,
    write_byte_tokenizer,
)
from moeserve.tokenizer import Tokenizer

# Mixed scripts and widths: ASCII, Latin-1, CJK, emoji (4-byte, ZWJ sequence), controls.
ALPHABET = "ab Z09 \n\t\x00\x7f é ß € 世界 🎉 👩‍💻 \u200b"

# Uses every feature a real template leans on: bos_token, raise_exception, tojson, loop controls, namespace.
RICH_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}"
    "{% endif %}"
    "{% if m['role'] == 'system' %}{% set ns.n = ns.n + 1 %}{% continue %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}"
    "systems={{ ns.n }}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ eos_token }}"
)


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("byte_tok")
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def both(tok_dir: Path) -> tuple[Tokenizer, object]:
    return Tokenizer.from_pretrained(tok_dir), AutoTokenizer.from_pretrained(str(tok_dir))


def test_byte_tokenizer_is_one_token_per_byte(both) -> None:
    tok, _ = both
    assert tok.vocab_size == BYTE_VOCAB_SIZE == 256 + len(SPECIAL_TOKENS)
    assert tok.bos_token_id == BOS_TOKEN_ID and tok.eos_token_ids == {EOS_TOKEN_ID}
    assert tok.decode(list(range(128))) == bytes(range(128)).decode("ascii")
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # a token may end mid-character
    rng = random.Random(0)
    for _ in range(50):
        text = random_text(rng, rng.randint(0, 40))
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    im_start = tok.token_to_id("<|im_start|>")
    assert tok.encode("<|im_start|>hi<|im_end|>") == [im_start, 104, 105, IM_END_TOKEN_ID]


def test_encode_decode_match_transformers(both) -> None:
    tok, hf = both
    rng = random.Random(1)
    for _ in range(50):
        text = random_text(rng, rng.randint(0, 30)) + rng.choice(["", "<|im_end|>", "<|eos|>x"])
        for add in (True, False):
            assert tok.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add)
        ids = [rng.randrange(BYTE_VOCAB_SIZE) for _ in range(rng.randint(0, 20))]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief. 世界"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4 🎉"},
        {"role": "user", "content": "and\nmore"},
    ],
]


@pytest.mark.parametrize("template", [None, RICH_TEMPLATE], ids=["default", "rich"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tmp_path: Path, template, add_generation_prompt: bool) -> None:
    if template is None:
        write_byte_tokenizer(tmp_path)
    else:
        write_byte_tokenizer(tmp_path, chat_template=template)
    tok, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in CONVERSATIONS:
        ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours == theirs
    tools = [{"type": "function", "function": {"name": "f", "description": "<é>"}}]
    ours = tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=add_generation_prompt, tools=tools)
    theirs = hf.apply_chat_template(
        CONVERSATIONS[0], tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools
    )
    assert ours == theirs


def test_default_template_text(both) -> None:
    tok, _ = both
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    expected = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert out == expected + "<|im_start|>assistant\n"


def test_content_parts_render_like_string(both) -> None:
    tok, _ = both
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template([{"role": "user", "content": "a\nb"}])
    with pytest.raises(ValueError, match="only text content is supported"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])


def test_template_errors_and_sandbox(tmp_path: Path) -> None:
    write_byte_tokenizer(tmp_path, chat_template=RICH_TEMPLATE)
    tok = Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(jinja2.TemplateError, match="bad role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    write_byte_tokenizer(tmp_path, chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_no_chat_template_suggests_completions(tmp_path: Path) -> None:
    write_byte_tokenizer(tmp_path, chat_template=None)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match=r"no chat template.*completions"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def edit_config(path: Path, **changes) -> None:
    file = path / "tokenizer_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    for key, value in changes.items():
        if value is None:
            del config[key]
    file.write_text(json.dumps(config))


def test_template_list_form_and_jinja_file(tmp_path: Path) -> None:
    write_byte_tokenizer(tmp_path)
    templates = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT{{ messages | length }}"},
    ]
    edit_config(tmp_path, chat_template=templates)
    msg = [{"role": "user", "content": "x"}]
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(msg) == "DEFAULT1"
    assert AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(msg, tokenize=False) == "DEFAULT1"
    (tmp_path / "chat_template.jinja").write_text("FILE{{ messages[0]['content'] }}")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(msg) == "FILEx"
    assert AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(msg, tokenize=False) == "FILEx"


@pytest.mark.parametrize("add_bos,add_eos", [(True, False), (True, True), (False, True)])
def test_bos_eos_follow_tokenizer_json(tmp_path: Path, add_bos: bool, add_eos: bool) -> None:
    write_byte_tokenizer(tmp_path)
    backend = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    single = " ".join([*(["<|bos|>"] if add_bos else []), "$A", *(["<|eos|>"] if add_eos else [])])
    backend.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<|bos|>", BOS_TOKEN_ID), ("<|eos|>", EOS_TOKEN_ID)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    # transformers (>= 5) ignores these flags when tokenizer.json exists; so must we.
    edit_config(tmp_path, add_bos_token=not add_bos, add_eos_token=not add_eos)
    tok, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["x", "hé 🎉"]:
        ours = tok.encode(text)
        assert ours == hf.encode(text)
        assert (ours[:1] == [BOS_TOKEN_ID]) == add_bos and (ours[-1:] == [EOS_TOKEN_ID]) == add_eos
        assert tok.encode(text, add_special_tokens=False) == list(text.encode())


def test_generation_config_eos_ids(tmp_path: Path) -> None:
    write_byte_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END_TOKEN_ID, 5]}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == {EOS_TOKEN_ID, IM_END_TOKEN_ID, 5}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": IM_END_TOKEN_ID}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == {EOS_TOKEN_ID, IM_END_TOKEN_ID}
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == {EOS_TOKEN_ID, 7}


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
