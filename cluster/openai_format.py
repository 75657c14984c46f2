"""What the server sends back: OpenAI response models, logprob formatting, and one formatter per endpoint.

A formatter is fed the merged engine deltas of a request's choices; it both accumulates the whole response
(non-streaming) and returns the stream event of each delta (streaming), so the two modes cannot drift apart.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from moeserve.outputs import StreamChunk
    from moeserve.sampling_params import SamplingParams
    from moeserve.scheduler.output import TokenLogprobs
    from moeserve.tokenizer import Tokenizer


# -------------------------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # extension: the stop string or token id that ended the choice


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionChunk(BaseModel):
    """A streamed completions event: same object as the response, choices carry text deltas."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moeserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -------------------------------------------------------------------------------------------- logprobs

# JSON has no -inf; OpenAI reports impossible tokens with this floor.
_MIN_LOGPROB = -9999.0


def _clamp(logprob: float) -> float:
    return logprob if logprob >= _MIN_LOGPROB else _MIN_LOGPROB  # also maps NaN to the floor


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    # A token that holds part of a multi-byte character decodes to U+FFFD; `_token_bytes` recovers its bytes.
    return tokenizer.decode([token_id], skip_special_tokens=False)


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_bytes(tokenizer: Tokenizer, token_id: int, text: str) -> list[int]:
    """UTF-8 bytes of one token, exact even when the token is part of a character (OpenAI's `bytes`)."""
    if "\ufffd" in text:
        # Imported here: this module loads without moeserve's runtime (torch); a tokenizer brings it along.
        from moeserve.tokenizer import byte_level_alphabet

        piece = tokenizer.convert_ids_to_tokens([token_id])[0] or ""
        if m := _BYTE_FALLBACK.fullmatch(piece):  # SentencePiece byte-fallback token
            return [int(m.group(1), 16)]
        alphabet = byte_level_alphabet()
        if piece and all(ch in alphabet for ch in piece):  # byte-level BPE token
            return [alphabet[ch] for ch in piece]
    return list(text.encode("utf-8"))


def completion_logprobs(
    tokenizer: Tokenizer, entries: Sequence[TokenLogprobs], num_top: int, text_offset: int
) -> CompletionLogprobs:
    """Completions-style logprobs of consecutive tokens starting at character `text_offset` of the text.

    top_logprobs[i] holds the `num_top` most likely tokens and always the sampled one (so up to num_top + 1).
    """
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for e in entries:
        token = _token_text(tokenizer, e.token_id)
        top = {_token_text(tokenizer, t): _clamp(lp) for t, lp in e.top[:num_top]}
        top.setdefault(token, _clamp(e.logprob))
        out.tokens.append(token)
        out.token_logprobs.append(_clamp(e.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out


def chat_logprobs(
    tokenizer: Tokenizer, entries: Sequence[TokenLogprobs], num_top: int
) -> list[ChatTokenLogprob]:
    """Chat-style logprobs: one entry per token with its UTF-8 bytes and the `num_top` alternatives."""

    def entry(token_id: int, logprob: float) -> TopLogprob:
        token = _token_text(tokenizer, token_id)
        return TopLogprob(
            token=token, logprob=_clamp(logprob), bytes=_token_bytes(tokenizer, token_id, token)
        )

    out = []
    for e in entries:
        head = entry(e.token_id, e.logprob)
        tops = [entry(t, lp) for t, lp in e.top[:num_top]]
        out.append(
            ChatTokenLogprob(token=head.token, logprob=head.logprob, bytes=head.bytes, top_logprobs=tops)
        )
    return out


# -------------------------------------------------------------------------------------------- formatters


@dataclass(slots=True)
class Job:
    """One engine request of an HTTP request: choice `index`, sample of prompt `prompt_index`."""

    index: int
    prompt_index: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(slots=True)
class _Choice:
    text: list[str] = field(default_factory=list)
    text_len: int = 0  # characters so far: the text_offset of the next token
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    completion_lp: CompletionLogprobs | None = None
    chat_lp: list[ChatTokenLogprob] = field(default_factory=list)


class Formatter:
    """Shared bookkeeping: per-choice text, token counts, finish reasons and usage."""

    def __init__(
        self, tokenizer: Tokenizer, response_id: str, model: str, jobs: list[Job], num_logprobs: int | None
    ) -> None:
        self.tokenizer = tokenizer
        self.id = response_id
        self.model = model
        self.jobs = jobs
        self.num_logprobs = num_logprobs
        self.created = int(time.time())
        self.choices = [_Choice() for _ in jobs]

    def preamble(self) -> list[BaseModel]:
        """Stream events sent before any token."""
        return []

    def add(self, pos: int, chunk: StreamChunk) -> BaseModel | None:
        """Take job `pos`'s next delta; returns its stream event (None when it carries nothing to show)."""
        c = self.choices[pos]
        c.text.append(chunk.text)
        c.text_len += len(chunk.text)
        c.num_tokens = max(c.num_tokens + len(chunk.token_ids), chunk.num_output_tokens)
        c.num_cached_tokens = max(c.num_cached_tokens, chunk.num_cached_tokens)
        if chunk.finish_reason is not None:
            c.finish_reason, c.stop_reason = chunk.finish_reason, chunk.stop_reason
        return self._event(pos, chunk)

    def _event(self, pos: int, chunk: StreamChunk) -> BaseModel | None:
        raise NotImplementedError

    def _show(self, chunk: StreamChunk) -> bool:
        has_logprobs = self.num_logprobs is not None and bool(chunk.logprobs)
        return bool(chunk.text) or chunk.finish_reason is not None or has_logprobs

    def usage(self) -> UsageInfo:
        """A prompt counts once however many samples it has; its cached tokens are its first sample's."""
        prompt = cached = 0
        seen: set[int] = set()
        for job, c in zip(self.jobs, self.choices):
            if job.prompt_index not in seen:
                seen.add(job.prompt_index)
                prompt += len(job.prompt_token_ids)
                cached += c.num_cached_tokens
        completion = sum(c.num_tokens for c in self.choices)
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def response(self) -> BaseModel:
        raise NotImplementedError

    def usage_chunk(self) -> BaseModel:
        raise NotImplementedError


class CompletionFormatter(Formatter):
    """/v1/completions: `num_logprobs` is the request's `logprobs` (alternatives per token) or None."""

    def _logprobs(self, pos: int, chunk: StreamChunk, text_offset: int) -> CompletionLogprobs | None:
        if self.num_logprobs is None or chunk.logprobs is None:
            return None
        lp = completion_logprobs(self.tokenizer, chunk.logprobs, self.num_logprobs, text_offset)
        acc = self.choices[pos].completion_lp
        if acc is None:
            self.choices[pos].completion_lp = lp.model_copy(deep=True)
        else:
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(acc, name).extend(getattr(lp, name))
        return lp

    def _event(self, pos: int, chunk: StreamChunk) -> BaseModel | None:
        c = self.choices[pos]
        lp = self._logprobs(pos, chunk, c.text_len - len(chunk.text))
        if not self._show(chunk):
            return None
        choice = CompletionChoice(
            index=self.jobs[pos].index,
            text=chunk.text,
            logprobs=lp,
            finish_reason=chunk.finish_reason,
            stop_reason=chunk.stop_reason,
        )
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def response(self) -> CompletionResponse:
        choices = [
            CompletionChoice(
                index=job.index,
                text="".join(c.text),
                logprobs=c.completion_lp,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for job, c in zip(self.jobs, self.choices)
        ]
        choices.sort(key=lambda ch: ch.index)
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage()
        )

    def usage_chunk(self) -> CompletionChunk:
        return CompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage()
        )


class ChatFormatter(Formatter):
    """/v1/chat/completions: `num_logprobs` is top_logprobs (0 when only logprobs=true), None when off."""

    def preamble(self) -> list[BaseModel]:
        # OpenAI opens each choice with the assistant role and empty content.
        return [self._chunk(job.index, DeltaMessage(role="assistant", content="")) for job in self.jobs]

    def _chunk(
        self,
        index: int,
        delta: DeltaMessage,
        logprobs: ChatChoiceLogprobs | None = None,
        finish_reason: str | None = None,
        stop_reason: int | str | None = None,
    ) -> ChatCompletionChunk:
        choice = ChatStreamChoice(
            index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason, stop_reason=stop_reason
        )
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def _event(self, pos: int, chunk: StreamChunk) -> BaseModel | None:
        lp = None
        if self.num_logprobs is not None and chunk.logprobs is not None:
            entries = chat_logprobs(self.tokenizer, chunk.logprobs, self.num_logprobs)
            self.choices[pos].chat_lp.extend(entries)
            lp = ChatChoiceLogprobs(content=entries)
        if not self._show(chunk):
            return None
        return self._chunk(
            self.jobs[pos].index, DeltaMessage(content=chunk.text), lp, chunk.finish_reason, chunk.stop_reason
        )

    def response(self) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=job.index,
                message=ChatResponseMessage(content="".join(c.text)),
                logprobs=ChatChoiceLogprobs(content=c.chat_lp) if self.num_logprobs is not None else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for job, c in zip(self.jobs, self.choices)
        ]
        choices.sort(key=lambda ch: ch.index)
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage()
        )

    def usage_chunk(self) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage()
        )
