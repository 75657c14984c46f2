"""Incremental detokenisation of one request's generated tokens, with stop strings.

Two layers, each with one invariant:

1. Token ids -> complete text, by one of two streams:
   - byte-level tokenizers (GPT-2 style BPE: Qwen, DeepSeek, Llama 3), the common case: each token is a
     fixed byte string (``Tokenizer.token_bytes``), so the bytes go through one incremental UTF-8 decoder and
     no token is decoded twice. A token may end mid-character; the decoder keeps those bytes until the
     character is complete.
   - any other tokenizer: only a window of recent tokens is decoded (the prefix-offset technique): the text
     of ``ids[prefix_offset:]`` minus the text of ``ids[prefix_offset:read_offset]`` is what the newest tokens
     added. Decoding from a few tokens back, rather than the newest token alone, keeps tokenizers whose
     decoders depend on context (SentencePiece's leading-space strip) right. Text ending in U+FFFD is an
     incomplete UTF-8 character and is held until completed.
   Both hold back all new text while the stream ends inside a character.
2. Complete text -> emitted text. With stop strings, the last ``max(len(s)) - 1`` characters are held back:
   they may still be the start of a stop string, and no character, once emitted, is ever retracted. The first
   stop string to be completed (earliest end; on a tie the earliest start) ends the text, OpenAI-style: the
   output stops right before it (or right after it with ``include_stop_str_in_output``).

The concatenation of all updates and ``flush()`` equals ``tokenizer.decode(all_ids)``, cut at the stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded before the first generated one, so that its text is read in context.
PROMPT_CONTEXT_TOKENS = 5


class TokenDecoder(Protocol):
    """What the detokenizer needs of a tokenizer (``moeserve.tokenizer.Tokenizer`` or transformers').

    A tokenizer that also has ``token_bytes(skip_special_tokens) -> list[bytes] | None`` (moeserve's) gets the
    byte-level stream when that returns a table.
    """

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(slots=True, frozen=True)
class DetokenizerUpdate:
    """New text to send to the client, and the stop string that ended the request (None if none did)."""

    text: str
    stop: str | None = None


_NO_UPDATE = DetokenizerUpdate("")


class _TextStream(Protocol):
    """Layer 1: token ids in, complete text out."""

    def add(self, ids: Sequence[int]) -> str:
        """Text the new ids completed (possibly "")."""
        ...

    def finish(self) -> str:
        """Everything held back (an incomplete character decodes to U+FFFD)."""
        ...


class _ByteStream:
    """Byte-level tokenizers: token bytes through one incremental UTF-8 decoder (invalid bytes -> U+FFFD, as
    ``bytes.decode(errors="replace")`` and the tokenizers library both do)."""

    __slots__ = ("_table", "_utf8", "_held")

    def __init__(self, table: list[bytes]) -> None:
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._held = ""  # text decoded while the stream ends inside a character

    def add(self, ids: Sequence[int]) -> str:
        table, n = self._table, len(self._table)
        if len(ids) == 1:
            i = ids[0]
            data = table[i] if 0 <= i < n else b""
        else:
            data = b"".join([table[i] if 0 <= i < n else b"" for i in ids])
        text = self._utf8.decode(data)
        if self._utf8.getstate()[0]:  # bytes of an unfinished character are buffered: hold the text too
            self._held += text
            return ""
        if self._held:
            text, self._held = self._held + text, ""
        return text

    def finish(self) -> str:
        text, self._held = self._held + self._utf8.decode(b"", final=True), ""
        return text


class _WindowStream:
    """Any tokenizer: decode a window of recent tokens and take the text past the already read part."""

    __slots__ = ("_tokenizer", "_skip_special", "_ids", "_prefix_offset", "_read_offset", "_prefix_len")

    def __init__(self, tokenizer: TokenDecoder, skip_special: bool, prompt_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        # The decode window is ids[prefix_offset:]; its first prefix_len chars are taken.
        self._ids: list[int] = self._prompt_context(prompt_token_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_len = len(self._decode(self._ids))

    def add(self, ids: Sequence[int]) -> str:
        self._ids.extend(ids)
        return self._take(final=False)

    def finish(self) -> str:
        return self._take(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt that ends mid-character would let the first generated token rewrite the context's text.
        if context and self._decode(context).endswith(REPLACEMENT_CHAR):
            return []
        return context

    def _take(self, *, final: bool) -> str:
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= self._prefix_len or (text.endswith(REPLACEMENT_CHAR) and not final):
            return ""  # nothing new, or the newest character is still incomplete
        new_text = text[self._prefix_len :]
        # Slide the window: the tokens just read become the context of the next decode.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_len = len(self._decode(self._ids[self._prefix_offset : self._read_offset]))
        return new_text


def _text_stream(
    tokenizer: TokenDecoder, skip_special: bool, prompt_token_ids: Sequence[int]
) -> _TextStream:
    token_bytes = getattr(tokenizer, "token_bytes", None)
    table = token_bytes(skip_special) if token_bytes is not None else None
    if table is not None:
        return _ByteStream(table)  # byte-level decoding needs no prompt context: bytes do not interact
    return _WindowStream(tokenizer, skip_special, prompt_token_ids)


class IncrementalDetokenizer:
    """Turns one request's stream of generated token ids into a stream of text."""

    def __init__(
        self,
        tokenizer: TokenDecoder,
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        prompt_token_ids: Sequence[int] = (),
    ) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self._stop = tuple(dict.fromkeys(stop))
        self._include_stop = include_stop_str_in_output
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._stream = _text_stream(tokenizer, skip_special_tokens, prompt_token_ids)
        # Layer 2 state: complete text not yet emitted (never holds a whole stop string; always "" without
        # stop strings).
        self._pending = ""
        self._emitted: list[str] = []
        self.stop_reason: str | None = None
        self.finished = False

    @property
    def output_text(self) -> str:
        """All text emitted so far."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    def update(self, new_token_ids: Sequence[int]) -> DetokenizerUpdate:
        """Add newly generated tokens; return the text that may now be sent (possibly "").

        After a stop string has been found (``finished``), further tokens are ignored.
        """
        if self.finished:
            return _NO_UPDATE
        text = self._stream.add(new_token_ids)
        if not self._stop:  # the common case: nothing to hold back or search
            if not text:
                return _NO_UPDATE
            self._emitted.append(text)
            return DetokenizerUpdate(text)
        return self._push(text, final=False)

    def flush(self) -> str:
        """The request ended for another reason (EOS, length, abort): emit everything held back."""
        if self.finished:
            return ""
        update = self._push(self._stream.finish(), final=True)
        self.finished = True
        return update.text

    # ---- layer 2: complete text -> emitted text ----------------------------------------------------------

    def _push(self, text: str, *, final: bool) -> DetokenizerUpdate:
        # Occurrences wholly inside the old pending text were looked for already; a new one ends in `text`.
        search_from = max(0, len(self._pending) - self._holdback)
        self._pending += text
        hit = self._first_stop(search_from)
        if hit is not None:
            start, stop = hit
            end = start + len(stop) if self._include_stop else start
            out, self._pending = self._pending[:end], ""
            self.stop_reason, self.finished = stop, True
            return DetokenizerUpdate(self._emit(out), stop)
        keep = 0 if final else min(self._holdback, len(self._pending))
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out) :]
        return DetokenizerUpdate(self._emit(out))

    def _first_stop(self, search_from: int) -> tuple[int, str] | None:
        """(start, stop string) of the occurrence in pending text that ends first, or None."""
        best: tuple[int, int, str] | None = None
        for s in self._stop:
            i = self._pending.find(s, search_from)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        return None if best is None else (best[1], best[2])

    def _emit(self, text: str) -> str:
        if text:
            self._emitted.append(text)
        return text
