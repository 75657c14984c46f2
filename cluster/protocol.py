"""OpenAI API requests: models, validation into OpenAI-shaped errors, conversion to SamplingParams.

(What the server sends back, responses, stream chunks and logprobs, is in `openai_format`.)

Requests are parsed strictly (a string where a number belongs is an error, not coerced) and unknown fields are
ignored, as OpenAI clients send extras; a few fields that would silently change the meaning of a request if
ignored (`echo`, `best_of` != n, `suffix`) are refused with a message saying so.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from moeserve.cluster.engine_client import EngineOverloaded, EngineUnavailable
from moeserve.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams

# -------------------------------------------------------------------------------------------- errors

logger = logging.getLogger(__name__)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo


class APIError(Exception):
    """An error to send to the client as `ErrorResponse` with `status_code`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=self.info)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


RETRY_AFTER_S = 5  # what 503 and 429 tell clients to wait (the worker group restarts, the queue drains)


def to_api_error(exc: BaseException) -> APIError:
    """The OpenAI-shaped error for an exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineUnavailable):
        return APIError(
            503,
            f"the engine is restarting, retry shortly: {exc}",
            type="service_unavailable_error",
            code="engine_unavailable",
        )
    if isinstance(exc, EngineOverloaded):
        return APIError(
            429,
            f"the engine is overloaded, retry later: {exc}",
            type="rate_limit_error",
            code="engine_overloaded",
        )
    logger.exception("request failed", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


# What a field accepts, for fields whose type errors pydantic would report once per union member.
_ACCEPTS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of {'type': 'text', 'text': ...} parts",
}


def _is_field_name(part: int | str) -> bool:
    # pydantic also puts union members ('str', 'list[int]', 'TextPart') and validator tags in locations.
    if isinstance(part, int):
        return True
    return part.isidentifier() and not part[0].isupper() and part not in ("str", "int", "float", "bool")


def _from_validation_error(exc: ValidationError) -> APIError:
    """The first problem of a pydantic error, as a 400 whose `param` is the top-level field."""
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return bad_request(
            f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
        )
    loc = [part for part in err["loc"] if _is_field_name(part)]
    if not loc:
        return bad_request("the request body must be a JSON object")
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if err["type"] == "missing":
        message = f"'{path}' is required"
    elif err["type"].endswith("_type") and loc[-1] in _ACCEPTS:
        message = f"'{path}' must be {_ACCEPTS[loc[-1]]}"
    elif err["type"] == "too_short":
        message = f"'{path}' must not be empty"
    elif err["type"] == "value_error":
        message = f"'{path}': {err['msg'].removeprefix('Value error, ')}"
    else:
        got = repr(err.get("input"))
        got = got if len(got) <= 80 else got[:77] + "..."
        message = f"'{path}': {err['msg'][0].lower()}{err['msg'][1:]}; got {got}"
    return bad_request(message, param=str(loc[0]))


RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_request(model: type[RequestT], body: bytes) -> RequestT:
    """Validate a JSON body into `model`; raises APIError(400) naming the offending field."""
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _from_validation_error(exc) from None


# -------------------------------------------------------------------------------------------- requests

_STRICT = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = _STRICT
    model: str
    temperature: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # extension; 0 or -1 = off
    min_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    # Signed 64-bit, so that seed + i of the i-th of n samples stays in the sampler's seed range.
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # extension
    skip_special_tokens: bool = True  # extension
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError(
                "echo=true is not supported (the prompt is not returned); remove it or set false"
            )
        return v

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is not None and (v == "" or (isinstance(v, list) and not all(v))):
            raise ValueError("stop strings must be non-empty")
        return v

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. `logprobs` is the number of alternatives per token (completions style)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions; null = rest of context
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: Any) -> Any:
        if not v or (isinstance(v, list) and any(not p for p in v)):
            raise ValueError("must not be empty (nor contain an empty prompt)")
        if isinstance(v, list) and any(
            isinstance(t, int) and t < 0 for p in v for t in (p if isinstance(p, list) else [p])
        ):
            raise ValueError("token ids must be >= 0")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported (no fill-in-the-middle); remove it")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if v is not None and v != n:
            raise ValueError(f"best_of={v} is not supported; only best_of equal to n ({n}) is")
        return v


class TextPart(BaseModel):
    model_config = _STRICT
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs content")
        for part in self.content if isinstance(self.content, list) else ():
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part of type '{part.type}' is not supported; only text parts are")
        return self

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template expects it (text parts joined, 'developer' spoken as 'system')."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(p.text or "" for p in content)
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": content,
        }
        for key in ("name", "tool_call_id", "tool_calls"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions. `logprobs` is a flag; `top_logprobs` the number of alternatives."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs=true")
        return v

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# -------------------------------------------------------------------------------------------- conversion


def check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(
            404,
            f"The model '{requested}' does not exist; this server serves '{served}'",
            param="model",
            code="model_not_found",
        )


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int, prompt_param: str) -> int:
    """Tokens the request may generate: `requested`, or the rest of the context when None."""
    if prompt_len >= max_model_len:
        raise bad_request(
            f"the prompt has {prompt_len} tokens but this model's context is {max_model_len} "
            "tokens, which leaves no room to generate; shorten the prompt",
            param=prompt_param,
        )
    room = max_model_len - prompt_len
    if requested is None:
        return room
    if requested > room:
        raise bad_request(
            f"max_tokens={requested} plus the prompt's {prompt_len} tokens exceeds this model's "
            f"context of {max_model_len} tokens; use max_tokens <= {room}",
            param="max_tokens",
        )
    return requested


def to_sampling_params(
    req: CompletionRequest | ChatCompletionRequest, *, max_tokens: int | None = None
) -> SamplingParams:
    """SamplingParams of a request (n as requested); `max_tokens` overrides the request's (resolved) value."""
    num_logprobs = req.num_logprobs if isinstance(req, ChatCompletionRequest) else req.logprobs
    requested = req.max_new_tokens if isinstance(req, ChatCompletionRequest) else req.max_tokens
    fields = {
        "n": req.n,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "seed": req.seed,
        "max_tokens": max_tokens if max_tokens is not None else requested,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "ignore_eos": req.ignore_eos,
        "logprobs": num_logprobs,
        "skip_special_tokens": req.skip_special_tokens,
    }
    given = {k: v for k, v in fields.items() if v is not None or k == "logprobs"}
    try:
        return SamplingParams(**given)
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        raise bad_request(str(exc), param=name if name in fields else None) from None


def per_choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of the index-th of n engine requests: n=1, and seed + index when a seed is given."""
    seed = None if params.seed is None else params.seed + index
    return dataclasses.replace(params, n=1, seed=seed)
