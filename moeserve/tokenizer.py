"""The tokenizer of a checkpoint: HF ``tokenizer.json`` (fast ``tokenizers`` backend) plus its chat template.

Reads, from the checkpoint directory:
- ``tokenizer.json`` (required): vocabulary, pre-tokenizer, decoder, added/special tokens;
- ``tokenizer_config.json``: bos/eos/pad/unk tokens, ``chat_template``
  (a string, or a list of ``{"name", "template"}`` from which "default" is taken);
- ``chat_template.jinja``: a chat template file, which takes priority over the config's, as in transformers;
- ``generation_config.json`` (else ``config.json``): ``eos_token_id`` (int or list), merged into the stop ids.

Semantics follow transformers (>= 5) so prompts tokenise identically: whether ``encode`` adds BOS/EOS is
decided by tokenizer.json's post-processor; ``add_bos_token``/``add_eos_token`` in tokenizer_config.json are
ignored when tokenizer.json exists, as transformers does.
``clean_up_tokenization_spaces`` is not applied (the target checkpoints turn it off; it would also make
decoding non-incremental).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders

from moeserve.loader.checkpoint import CheckpointError, checkpoint_dir, read_json

_NAMED_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


class Tokenizer:
    """Encode, decode and render chat prompts for one checkpoint. Immutable after construction."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        self._tok = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self.bos_token_id = self._token_id("bos_token")
        eos = {self._token_id("eos_token"), *extra_eos_token_ids}
        self.eos_token_ids: frozenset[int] = frozenset(i for i in eos if i is not None)
        self.pad_token_id = self._token_id("pad_token")
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._template: jinja2.Template | None = None
        # Built on first use, per skip_special_tokens setting (False, True): see token_bytes().
        self._token_bytes: list[list[bytes] | None] = [None, None]
        self._is_byte_level = isinstance(backend.decoder, decoders.ByteLevel)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of the HF checkpoint directory ``path`` (no network access)."""
        p = checkpoint_dir(path)
        file = p / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(
                f"{p} has no tokenizer.json; moeserve needs a fast tokenizer (save one with transformers: "
                "AutoTokenizer.from_pretrained(...).save_pretrained(dir))"
            )
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{file} could not be loaded: {e}") from None
        config = _read_optional_json(p / "tokenizer_config.json")
        special = {key: _token_content(config.get(key)) for key in _NAMED_TOKENS}
        return cls(
            backend,
            special_tokens=special,
            chat_template=_find_chat_template(p, config),
            extra_eos_token_ids=_generation_eos_ids(p),
        )

    # ---- token ids ---------------------------------------------------------------------------------------

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own end-of-sequence id (``eos_token_ids`` also holds the generation config's)."""
        return self._token_id("eos_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the checkpoint's BOS/EOS rules apply."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. A trailing incomplete UTF-8 sequence decodes to U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, skip_special_tokens: bool = True) -> list[bytes] | None:
        """The bytes each token id decodes to, when decoding is byte-level (GPT-2 style BPE); else None.

        For a byte-level tokenizer ``decode(ids)`` is ``b"".join(table[i] for i in ids).decode("utf-8",
        "replace")`` for ids in ``range(len(table))``, which lets text be decoded incrementally without
        decoding token windows again. Ids the vocabulary lacks, and special tokens when skipped, map to b"".
        Built on first use per setting (a few tenths of a second for a 150k vocabulary) and shared: do not
        modify it.
        """
        if not self._is_byte_level:
            return None
        table = self._token_bytes[skip_special_tokens]
        if table is None:
            table = _byte_level_table(self._tok, skip_special_tokens)
            self._token_bytes[skip_special_tokens] = table
        return table

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Vocabulary strings of ``ids`` (None for an id outside the vocabulary)."""
        return [self._tok.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ---- chat --------------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render ``messages`` (``{"role", "content", ...}`` dicts) into the prompt text.

        ``content`` may be a string or a list of ``{"type": "text", "text": ...}`` parts (joined with
        newlines). Keys whose value is None are dropped. ``template_kwargs`` (e.g. ``enable_thinking``) reach
        the template.
        """
        if self.chat_template is None:
            raise ValueError(
                "this model's tokenizer has no chat template, so chat messages cannot be turned into a "
                "prompt; send plain text to the completions API (/v1/completions) instead"
            )
        if not messages:
            raise ValueError("cannot render an empty conversation: give at least one message")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        variables = {**self.special_tokens, **template_kwargs}
        return self._template.render(
            messages=[_normalize_message(m, i) for i, m in enumerate(messages)],
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )

    # ---- internals ---------------------------------------------------------------------------------------

    def _token_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self._tok.token_to_id(token)


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable alphabet, character -> byte (the mapping GPT-2 introduced).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7F-0xA0, 0xAD) take
    the code points 256, 257, ... in byte order. This is the alphabet of ``tokenizers``' ByteLevel
    pre-tokenizer and decoder. Built once and shared: do not modify it.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    alphabet = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in printable)
    alphabet.update((chr(256 + i), b) for i, b in enumerate(shifted))
    return alphabet


def _byte_level_table(backend: HFTokenizer, skip_special_tokens: bool) -> list[bytes]:
    """Bytes of every token id under a ByteLevel decoder (see `Tokenizer.token_bytes`).

    The decoder maps each character of a token's string to its byte; a token with a character outside the
    alphabet (an added token such as "<｜end▁of▁sentence｜>") stands for its own UTF-8 encoding instead.
    Added tokens are decoded like any other token; special ones vanish when skipped.
    """
    # str.translate maps alphabet characters to their bytes as Latin-1 code points; other characters below
    # 256 are pushed out of Latin-1 so that encoding fails for them as for those above.
    to_byte = {ord(c): b for c, b in byte_level_alphabet().items()}
    to_byte.update((c, 0xFFFF) for c in range(256) if c not in to_byte)
    skipped = set()
    if skip_special_tokens:
        skipped = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    # Added tokens may leave gaps above the model's vocabulary: size the table by the largest id.
    size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    table: list[bytes] = []
    for i in range(size):
        token = backend.id_to_token(i)
        if token is None or i in skipped:
            table.append(b"")
            continue
        try:
            table.append(token.translate(to_byte).encode("latin-1"))
        except UnicodeEncodeError:
            table.append(token.encode("utf-8"))
    return table


def _read_optional_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    data = read_json(file)
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _find_chat_template(path: Path, config: dict) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        if len(named) == 1:
            return next(iter(named.values()))
        raise CheckpointError(
            f"{path / 'tokenizer_config.json'} has several chat templates {sorted(map(str, named))} "
            "and none named 'default'"
        )
    raise CheckpointError(f"chat_template in {path / 'tokenizer_config.json'} must be a string or a list")


def _generation_eos_ids(path: Path) -> list[int]:
    """Stop ids from generation_config.json, or config.json when the checkpoint has no generation config."""
    for name in ("generation_config.json", "config.json"):
        data = _read_optional_json(path / name)
        if data:
            value = data.get("eos_token_id")
            if value is None:
                return []
            ids = value if isinstance(value, list) else [value]
            if not all(isinstance(i, int) for i in ids):
                raise CheckpointError(f"{path / name}: eos_token_id must be an int or a list, got {value!r}")
            return ids
    return []


def _normalize_message(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    if not isinstance(message, Mapping) or "role" not in message:
        raise ValueError(f"message {index} must be an object with a 'role', got {message!r}")
    out = {k: v for k, v in message.items() if v is not None}
    content = out.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            is_text = isinstance(part, Mapping) and part.get("type") == "text"
            if not (is_text and isinstance(part.get("text"), str)):
                raise ValueError(
                    f"message {index}: content parts must be {{'type': 'text', 'text': str}}; got {part!r} "
                    "(only text content is supported)"
                )
            texts.append(part["text"])
        out["content"] = "\n".join(texts)
    elif content is not None and not isinstance(content, str):
        raise ValueError(f"message {index}: content must be a string or a list of text parts: {content!r}")
    return out


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox: templates come with checkpoints and are untrusted code."""

    def tojson(x: Any, ensure_ascii=False, indent: int | None = None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which chat templates do not expect.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template has a syntax error at line {e.lineno}: {e.message}") from None
