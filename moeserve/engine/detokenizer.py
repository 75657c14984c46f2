"""Incremental detokenisation of one request's generated tokens, with stop strings.

Two layers, each with one invariant:

1. Token ids -> complete text. Only a window of recent tokens is decoded (the prefix-offset technique): the
   text of ``ids[prefix_offset:]`` minus the text of ``ids[prefix_offset:read_offset]`` is what the newest
   tokens added. Decoding from a few tokens back, rather than the newest token alone, keeps tokenizers whose
   decoders depend on context (SentencePiece's leading-space strip) right. Text ending in U+FFFD is an
   incomplete UTF-8 character (a byte-level token may end mid-character) and is held until completed.
2. Complete text -> emitted text. With stop strings, the last ``max(len(s)) - 1`` characters are held back:
   they may still be the start of a stop string, and no character, once emitted, is ever retracted. The first
   stop string to be completed (earliest end; on a tie the earliest start) ends the text, OpenAI-style: the
   output stops right before it (or right after it with ``include_stop_str_in_output``).

The concatenation of all updates and ``flush()`` equals ``tokenizer.decode(all_ids)``, cut at the stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded before the first generated one, so that its text is read in context.
PROMPT_CONTEXT_TOKENS = 5


class TokenDecoder(Protocol):
    """What the detokenizer needs of a tokenizer (``moeserve.tokenizer.Tokenizer`` or transformers')."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(slots=True, frozen=True)
class DetokenizerUpdate:
    """New text to send to the client, and the stop string that ended the request (None if none did)."""

    text: str
    stop: str | None = None


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
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = tuple(dict.fromkeys(stop))
        self._include_stop = include_stop_str_in_output
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        # Layer 1 state: the decode window is ids[prefix_offset:]; its first prefix_len chars are taken.
        self._ids: list[int] = self._prompt_context(prompt_token_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_len = len(self._decode(self._ids))
        # Layer 2 state: complete text not yet emitted (never holds a whole stop string).
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
            return DetokenizerUpdate("")
        self._ids.extend(new_token_ids)
        return self._push(self._take_complete_text(final=False), final=False)

    def flush(self) -> str:
        """The request ended for another reason (EOS, length, abort): emit everything held back."""
        if self.finished:
            return ""
        update = self._push(self._take_complete_text(final=True), final=True)
        self.finished = True
        return update.text

    # ---- layer 1: ids -> complete text -------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt that ends mid-character would let the first generated token rewrite the context's text.
        if context and self._decode(context).endswith(REPLACEMENT_CHAR):
            return []
        return context

    def _take_complete_text(self, *, final: bool) -> str:
        window = self._ids[self._prefix_offset :]
        text = self._decode(window)
        if len(text) <= self._prefix_len or (text.endswith(REPLACEMENT_CHAR) and not final):
            return ""  # nothing new, or the newest character is still incomplete
        new_text = text[self._prefix_len :]
        # Slide the window: the tokens just read become the context of the next decode.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_len = len(self._decode(self._ids[self._prefix_offset : self._read_offset]))
        return new_text

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
