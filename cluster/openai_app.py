"""The OpenAI-compatible HTTP API as a FastAPI app, written against `EngineClient` only.

One HTTP request becomes one engine request per (prompt, choice): n > 1 and batched prompts fan out into
engine requests `<rid>-<i>` whose deltas are merged back into one response or SSE stream, each choice keeping
its `index`. When the client goes away (disconnect seen on the ASGI channel, or the stream cancelled by the
server) every unfinished engine request is aborted, so no GPU time is spent on answers nobody reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeserve.cluster.engine_client import EngineClient
from moeserve.cluster.metrics import CONTENT_TYPE, ServingMetrics
from moeserve.cluster.openai_format import (
    ChatFormatter,
    CompletionFormatter,
    Formatter,
    Job,
    ModelCard,
    ModelList,
)
from moeserve.cluster.protocol import (
    RETRY_AFTER_S,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    bad_request,
    check_model,
    parse_request,
    per_choice_params,
    resolve_max_tokens,
    to_api_error,
    to_sampling_params,
)

logger = logging.getLogger(__name__)

MAX_CHOICES = 256  # prompts x n of one request: a bound on the engine requests one HTTP call can start
_END = object()


class _ClientGone(Exception):
    """The HTTP client disconnected; nothing more can be sent."""


def error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status_code in (429, 503) else None
    return JSONResponse(err.response().model_dump(), status_code=err.status_code, headers=headers)


def _sse(event: BaseModel, exclude: set[str] | None = None) -> str:
    return f"data: {event.model_dump_json(exclude=exclude)}\n\n"


class _Fanout:
    """Runs a request's engine jobs concurrently and yields (job position, StreamChunk) as they arrive.

    Always `close()` it: that stops the producers and aborts every job that has not finished.
    """

    def __init__(
        self, engine: EngineClient, jobs: list[Job], request: Request, metrics: ServingMetrics, arrival: float
    ) -> None:
        self.engine = engine
        self.jobs = jobs
        self.request = request
        # Unbounded, so producers never block on a consumer that is gone; it holds at most max_tokens chunks
        # per job (the engine client coalesces tokens when its consumer falls behind).
        self.queue: asyncio.Queue = asyncio.Queue()
        self.trackers = [metrics.start_request(len(j.prompt_token_ids), arrival) for j in jobs]
        self.finished = [False] * len(jobs)
        self.tasks: list[asyncio.Task] = []
        self.client_gone = False
        self._closer: asyncio.Task | None = None

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._produce(i)) for i in range(len(self.jobs))]
        self.tasks.append(asyncio.create_task(self._watch_disconnect()))

    async def _produce(self, pos: int) -> None:
        job = self.jobs[pos]
        stream = None
        try:
            stream = self.engine.generate(job.request_id, job.prompt_token_ids, job.params)
            async for chunk in stream:
                self.queue.put_nowait((pos, chunk))
                if chunk.finish_reason is not None:
                    break
            self.queue.put_nowait((pos, _END))
        except BaseException as exc:  # handed to the consumer, which turns it into an HTTP error
            self.queue.put_nowait((pos, exc))  # (a cancellation too, so the consumer never waits forever)
            if not isinstance(exc, Exception):
                raise
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _watch_disconnect(self) -> None:
        # The body has been read, so the next ASGI message is the disconnect (it blocks until then).
        message = await self.request.receive()
        if message["type"] == "http.disconnect":
            self.client_gone = True
            self.queue.put_nowait((None, _ClientGone()))  # wakes a consumer waiting for chunks
            # Abort now, even if nobody reads the queue any more (e.g. the stream never started).
            self._closer = asyncio.create_task(self.close())

    async def next(self) -> tuple[int, object] | None:
        """The next chunk as (job position, StreamChunk); None once every job has finished."""
        while not all(self.finished) or self.client_gone:
            if self.client_gone:
                raise _ClientGone()
            pos, item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item, BaseException):  # the engine's stream was cancelled under us
                raise RuntimeError(f"the engine stream of {self.jobs[pos].request_id} was cancelled")
            if item is _END:
                self._finish(pos, "abort")  # ended without a finish_reason: count it as cut short
                continue
            self.trackers[pos].on_tokens(len(item.token_ids))
            if item.finish_reason is not None:
                self._finish(pos, item.finish_reason)
            return pos, item
        return None

    def _finish(self, pos: int, reason: str) -> None:
        if not self.finished[pos]:
            self.finished[pos] = True
            self.trackers[pos].on_finish(reason)

    async def close(self, reason: str = "abort") -> None:
        # Shielded: this runs while the request is being cancelled; the aborts must still reach the engine.
        with anyio.CancelScope(shield=True):
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for pos, job in enumerate(self.jobs):
                if not self.finished[pos]:
                    self._finish(pos, reason)
                    try:
                        await self.engine.abort(job.request_id)
                    except Exception:
                        logger.warning("abort of %s failed", job.request_id, exc_info=True)


class _OpenAIServer:
    def __init__(self, engine: EngineClient, metrics: ServingMetrics, stats_timeout_s: float) -> None:
        self.engine = engine
        self.metrics = metrics
        self.stats_timeout_s = stats_timeout_s
        self.created = int(time.time())

    def models(self) -> ModelList:
        card = ModelCard(
            id=self.engine.model_name, created=self.created, max_model_len=self.engine.max_model_len
        )
        return ModelList(data=[card])

    async def completions(self, request: Request) -> Response:
        arrival = time.perf_counter()
        req = parse_request(CompletionRequest, await request.body())
        check_model(req.model, self.engine.model_name)
        tok = self.engine.tokenizer
        prompt = req.prompt
        if isinstance(prompt, str):
            prompts = [tok.encode(prompt)]
        elif isinstance(prompt[0], str):
            prompts = [tok.encode(p) for p in prompt]
        elif isinstance(prompt[0], int):
            prompts = [list(prompt)]
        else:
            prompts = [list(p) for p in prompt]
        vocab_size = getattr(tok, "vocab_size", None)
        if vocab_size is not None and not isinstance(prompt[0], str):
            # An out-of-range id would fault the embedding lookup on the GPU and take the worker group down.
            if any(t >= vocab_size for ids in prompts for t in ids):
                raise bad_request(f"token ids must be below the vocabulary size {vocab_size}", param="prompt")
        jobs = self._jobs(request, req, prompts, req.max_tokens, "prompt")
        fmt = CompletionFormatter(tok, f"cmpl-{request.state.request_id}", req.model, jobs, req.logprobs)
        return await self._run(request, req, jobs, fmt, arrival)

    async def chat(self, request: Request) -> Response:
        arrival = time.perf_counter()
        req = parse_request(ChatCompletionRequest, await request.body())
        check_model(req.model, self.engine.model_name)
        tok = self.engine.tokenizer
        if not tok.has_chat_template:
            raise APIError(
                400,
                "this model has no chat template, so chat messages cannot be turned into a prompt; "
                "use /v1/completions with plain text",
                param="messages",
            )
        try:
            text = tok.apply_chat_template(
                [m.for_template() for m in req.messages], add_generation_prompt=True
            )
        except Exception as exc:  # the template's own checks (raise_exception) reject some conversations
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        # The template writes the special tokens (BOS, role markers) itself.
        prompts = [tok.encode(text, add_special_tokens=False)]
        jobs = self._jobs(request, req, prompts, req.max_new_tokens, "messages")
        fmt = ChatFormatter(tok, f"chatcmpl-{request.state.request_id}", req.model, jobs, req.num_logprobs)
        return await self._run(request, req, jobs, fmt, arrival)

    def _jobs(
        self,
        request: Request,
        req: CompletionRequest | ChatCompletionRequest,
        prompts: list[list[int]],
        max_tokens: int | None,
        prompt_param: str,
    ) -> list[Job]:
        """Engine jobs: choice p * n + i is sample i of prompt p (OpenAI's order for batched prompts)."""
        if len(prompts) * req.n > MAX_CHOICES:
            raise bad_request(
                f"{len(prompts)} prompts x n={req.n} exceeds {MAX_CHOICES} completions per request",
                param="n",
            )
        jobs = []
        for p, ids in enumerate(prompts):
            if not ids:
                raise bad_request("the prompt encodes to no tokens", param=prompt_param)
            limit = resolve_max_tokens(max_tokens, len(ids), self.engine.max_model_len, prompt_param)
            params = to_sampling_params(req, max_tokens=limit)
            for i in range(req.n):
                index = p * req.n + i
                jobs.append(
                    Job(index, p, f"{request.state.request_id}-{index}", ids, per_choice_params(params, i))
                )
        return jobs

    async def _run(self, request: Request, req, jobs: list[Job], fmt: Formatter, arrival: float) -> Response:
        fanout = _Fanout(self.engine, jobs, request, self.metrics, arrival)
        fanout.start()
        streaming, reason = False, "abort"
        try:
            if not req.stream:
                while (item := await fanout.next()) is not None:
                    fmt.add(*item)
                return Response(fmt.response().model_dump_json(), media_type="application/json")
            # Wait for the first chunk before answering, so that a refused request gets its real status code.
            first = await fanout.next()
            streaming = True
        except _ClientGone:
            return Response(status_code=499)  # nobody will read it
        except BaseException:
            reason = "error"
            raise
        finally:
            if not streaming:
                await fanout.close(reason)
        return StreamingResponse(
            self._stream(fanout, fmt, first, req.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _stream(
        self, fanout: _Fanout, fmt: Formatter, first, include_usage: bool
    ) -> AsyncIterator[str]:
        exclude = None if include_usage else {"usage"}
        error: APIError | None = None
        try:
            for event in fmt.preamble():
                yield _sse(event, exclude)
            item = first
            while item is not None:
                event = fmt.add(*item)
                if event is not None:
                    yield _sse(event, exclude)
                item = await fanout.next()
            if include_usage:
                yield _sse(fmt.usage_chunk())
        except _ClientGone:
            return
        except Exception as exc:
            error = to_api_error(exc)
        finally:
            await fanout.close("error" if error is not None else "abort")
        if error is not None:
            yield _sse(error.response())
        yield "data: [DONE]\n\n"

    async def stats(self) -> dict | None:
        try:
            return await asyncio.wait_for(self.engine.stats(), self.stats_timeout_s)
        except Exception:
            logger.warning("engine stats failed", exc_info=True)
            return None


class _RequestIdMiddleware:
    """Gives every HTTP request an id (the client's `x-request-id`, else a fresh one) and echoes it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1").strip()
        request_id = given[:128] if given else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _auth_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(
                401, "invalid or missing API key; send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    return check


def build_openai_app(
    engine: EngineClient,
    *,
    api_key: str | None = None,
    metrics: ServingMetrics | None = None,
    stats_timeout_s: float = 10.0,
) -> FastAPI:
    """The OpenAI API over `engine`: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

    api_key: when set, /v1/* requires `Authorization: Bearer <api_key>` (/health and /metrics stay open for
    probes and scrapers). metrics: where request metrics are recorded (a fresh ServingMetrics by default).
    """
    server = _OpenAIServer(engine, metrics or ServingMetrics(), stats_timeout_s)
    authorize = _auth_check(api_key)
    app = FastAPI(title="moeserve OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_RequestIdMiddleware)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        await authorize(request)
        return Response(server.models().model_dump_json(), media_type="application/json")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        await authorize(request)
        return await _guard(server.completions(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        await authorize(request)
        return await _guard(server.chat(request))

    @app.get("/health")
    async def health() -> Response:
        if await server.stats() is None:
            info = ErrorInfo(message="the engine does not answer", type="service_unavailable_error")
            return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        server.metrics.update_from_stats(await server.stats())
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    return app


async def _guard(work: Awaitable[Response]) -> Response:
    """Engine and validation errors as OpenAI-shaped responses (unexpected ones are logged as 500s)."""
    try:
        return await work
    except Exception as exc:
        return error_response(to_api_error(exc))
