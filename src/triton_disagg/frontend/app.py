"""The OpenAI-compatible HTTP API, in front of the `llm` model of one Triton server.

Routes: POST /v1/completions and /v1/chat/completions (streamed as server-sent
events or not), GET /v1/models, GET /health (ready to serve: Triton and `llm`
are ready and the router has a decode worker to route to, so a request sent
now is served), GET /live (the process answers), GET /metrics (Prometheus).
A server-side condition (no worker routable, a worker lost past the
migration limit, Triton unreachable) is answered 503 with `Retry-After`.
With API keys set, /v1/* needs `Authorization: Bearer <key>`; the probes and
metrics stay open, as load balancers and scrapers expect. Nothing of Triton's
own API (model control, repository, shared memory) is reachable through here.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from triton_disagg.frontend.config import FrontendConfig
from triton_disagg.frontend.metrics import FrontendMetrics, RequestTimer
from triton_disagg.frontend.prompt import ServedModel
from triton_disagg.frontend.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    new_id,
    now_s,
    usage,
)
from triton_disagg.frontend.size_limit import BodySizeLimit
from triton_disagg.frontend.triton_llm import Delta, GenerateParams, TritonLLM

logger = logging.getLogger(__name__)

#: Seconds a client is told to wait before retrying a 503.
RETRY_AFTER_S = 1
COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"


def create_app(config: FrontendConfig, llm: TritonLLM | None = None, model: ServedModel | None = None) -> FastAPI:
    """The ASGI app. `llm` and `model` default to ones built from `config` at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        first = llm or TritonLLM(config.triton_url)
        opened = [] if llm is not None else [first]
        backends: dict[str, _Backend] = {}
        app.state.backends = backends
        try:
            served = model or await _resolve_model(config, first)
            backends[served.name] = _Backend(served, first)
            for name, url in config.more_models:
                opened.append(other := TritonLLM(url))
                backends[name] = _Backend(await _resolve_model(config, other, name), other)
            for name, backend in backends.items():
                logger.info("serving %r from %s (context window %d tokens)", name, backend.llm.url, backend.model.max_model_len)
            yield
        finally:
            for opened_llm in opened:
                await opened_llm.close()

    app = FastAPI(title="triton-disagg", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.metrics = FrontendMetrics()
    app.add_middleware(BodySizeLimit, max_body_bytes=config.max_body_bytes)
    _add_error_handlers(app)
    authorized = [Depends(_check_api_key)]

    @app.get("/live")
    async def live() -> dict:
        return {"status": "live"}

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Ready when a request for any model listed would be served now."""
        backends: dict[str, _Backend] = request.app.state.backends
        for name, backend in backends.items():
            about = f" (model {name!r})" if len(backends) > 1 else ""
            if not await backend.llm.is_ready():
                detail = f"Triton or its llm model is not ready{about}"
            elif not await backend.llm.num_routable_decode_workers():
                detail = f"no decode worker is routable (none loaded yet, or all being replaced){about}"
            else:
                continue
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            return JSONResponse({"status": "unavailable", "detail": detail}, status_code=503, headers=headers)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=authorized)
    async def list_models(request: Request) -> dict:
        return {"object": "list", "data": [_model_card(b.model) for b in request.app.state.backends.values()]}

    @app.get("/v1/models/{name:path}", dependencies=authorized)
    async def get_model(name: str, request: Request) -> dict:
        return _model_card(_backend_for(request, name).model)

    @app.post(COMPLETIONS, dependencies=authorized)
    async def completions(request: Request) -> Response:
        timer, body, backend = await _begin(request, CompletionRequest)
        served = backend.model
        num_prompt_tokens = await _count_tokens(served, body.prompt_text)
        max_tokens = body.max_tokens
        if max_tokens is None:  # OpenAI's default, cut to what the context window leaves
            max_tokens = max(1, min(DEFAULT_COMPLETION_MAX_TOKENS, served.max_model_len - num_prompt_tokens))
        max_tokens = served.check_fits(num_prompt_tokens, max_tokens, "prompt")
        params = _generate_params(body, body.prompt_text, max_tokens, echo=body.echo)
        return await _generate(request, backend.llm, COMPLETIONS, body, params, _CompletionShape(served.name), timer)

    @app.post(CHAT_COMPLETIONS, dependencies=authorized)
    async def chat_completions(request: Request) -> Response:
        timer, body, backend = await _begin(request, ChatCompletionRequest)
        served = backend.model
        prompt, num_prompt_tokens = await _render_chat(served, body.chat_messages())
        max_tokens = served.check_fits(num_prompt_tokens, body.requested_max_tokens, "messages")
        params = _generate_params(body, prompt, max_tokens, add_special_tokens=False)
        return await _generate(request, backend.llm, CHAT_COMPLETIONS, body, params, _ChatShape(served.name), timer)

    return app


@dataclass(slots=True, frozen=True)
class _Backend:
    """A model the frontend serves and the `llm` model of the Triton server that runs it."""

    model: ServedModel
    llm: TritonLLM


async def _begin(request: Request, model: type[BaseModel]):
    """Start timing a generation request, parse its body and find its model: (timer, body, backend)."""
    timer = RequestTimer(request.app.state.metrics)  # TTFT counts from here: parsing and tokenizing included
    body = await _parse(request, model)
    return timer, body, _backend_for(request, body.model)


#: Prompts longer than this (characters) are tokenized on a thread, not on the event loop.
_TOKENIZE_INLINE_MAX_CHARS = 8192


async def _count_tokens(served: ServedModel, text: str) -> int:
    return await _off_loop_if_long(len(text), served.count_tokens, text)


async def _render_chat(served: ServedModel, messages: list[dict[str, str]]) -> tuple[str, int]:
    """The chat prompt and its token count (without the tokenizer's BOS: the template writes its own)."""

    def render() -> tuple[str, int]:
        prompt = served.chat_template.render(messages)
        return prompt, served.count_tokens(prompt, add_special_tokens=False)

    return await _off_loop_if_long(sum(len(m["content"]) for m in messages), render)


async def _off_loop_if_long(num_chars: int, fn, *args):
    """fn(*args), on a worker thread when the text it works on is over _TOKENIZE_INLINE_MAX_CHARS."""
    if num_chars <= _TOKENIZE_INLINE_MAX_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


async def _parse(request: Request, model: type[BaseModel]):
    """The JSON body as `model`, whatever the Content-Type (curl's default is a form type). Raises OpenAIError."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


async def _resolve_model(config: FrontendConfig, llm: TritonLLM, name: str | None = None) -> ServedModel:
    """The served model: from config.model_path, else from the `llm` model's parameters (waiting for Triton).

    With `name` (a model of config.more_models), always from its `llm` model's parameters.
    """
    path, max_model_len = (None, None) if name is not None else (config.model_path, config.max_model_len)
    if path is None:
        parameters = await _wait_for_llm(config, llm)
        if not parameters.get("model_path"):
            raise ValueError("the llm model names no model_path; pass --model-path to the frontend")
        path = parameters["model_path"]
        max_model_len = max_model_len or int(parameters.get("max_model_len") or 0) or None
        max_tokens_limit = int(parameters.get("max_tokens_limit") or 0) or None
    else:
        max_tokens_limit = None  # the llm model's limit still applies; its refusal is a 400 too
    return ServedModel.from_checkpoint(name or config.served_model_name or _name_of(path), path, max_model_len, max_tokens_limit)


async def _wait_for_llm(config: FrontendConfig, llm: TritonLLM) -> dict[str, str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.startup_timeout_s
    while not await llm.is_ready():
        if loop.time() > deadline:
            raise RuntimeError(f"Triton at {llm.url} has no ready llm model after {config.startup_timeout_s:.0f} s")
        await asyncio.sleep(0.5)
    return await llm.model_parameters()


def _name_of(path) -> str:
    return Path(path).resolve().name


async def _check_api_key(request: Request) -> None:
    keys = request.app.state.config.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise OpenAIError(401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
    # Every key is compared, in constant time each, so the time taken does not tell which one matched.
    if not [key for key in keys if hmac.compare_digest(token.encode(), key.encode())]:
        raise OpenAIError(401, "the API key is not valid", code="invalid_api_key")


def _backend_for(request: Request, name: str) -> _Backend:
    """The backend serving model `name`; OpenAIError 404 naming the served models when there is none."""
    backends: dict[str, _Backend] = request.app.state.backends
    backend = backends.get(name)
    if backend is None:
        served = ", ".join(f"`{n}`" for n in backends)
        raise OpenAIError(404, f"the model `{name}` does not exist; this server serves {served}", param="model", code="model_not_found")
    return backend


def _model_card(served: ServedModel) -> dict:
    return {"id": served.name, "object": "model", "created": served.created_s, "owned_by": "triton-disagg", "max_model_len": served.max_model_len}


def _generate_params(body, prompt: str, max_tokens: int, echo: bool = False, add_special_tokens: bool = True) -> GenerateParams:
    return GenerateParams(
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=tuple(body.stop_sequences),
        ignore_eos=body.ignore_eos,
        echo=echo,
        add_special_tokens=add_special_tokens,
    )


@dataclass(slots=True)
class _CompletionShape:
    """Response bodies of /v1/completions."""

    model: str
    object_name = "text_completion"
    chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    def choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, text: str, finish_reason: str | None) -> dict:
        return self.choice(text, finish_reason)

    def first_chunk_choice(self) -> dict | None:
        return None


@dataclass(slots=True)
class _ChatShape:
    """Response bodies of /v1/chat/completions."""

    model: str
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def choice(self, text: str, finish_reason: str | None) -> dict:
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, text: str, finish_reason: str | None) -> dict:
        delta = {} if finish_reason is not None and not text else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def first_chunk_choice(self) -> dict | None:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class _Generation:
    """One request's generation and its bookkeeping: the in-flight gauge, timing, and how it ended.

    `release` runs once however the request ends (answered, failed, client
    gone, or the stream never started because the client left first): it
    cancels the Triton call if still open and takes the request out of flight;
    a generation neither answered nor failed by then was cancelled by its client.
    """

    def __init__(self, request: Request, llm: TritonLLM, endpoint: str, params: GenerateParams, timer: RequestTimer) -> None:
        self.metrics: FrontendMetrics = request.app.state.metrics
        self.endpoint = endpoint
        self.timer = timer
        self.deltas = llm.generate(params)
        #: Answered, or answered with an error; not cancelled by the client.
        self.is_ended = False
        self._is_released = False
        self.metrics.in_flight.labels(endpoint).inc()

    async def next(self) -> Delta:
        delta = await anext(self.deltas)
        if delta.finish_reason == "abort":
            raise OpenAIError(503, "the server aborted the request (its worker was stopped); retry it", type="service_unavailable")
        self.timer.on_tokens(delta.num_output_tokens)
        return delta

    def answered(self, last: Delta) -> None:
        self.is_ended = True
        self.timer.finish(last.finish_reason, last.num_input_tokens)
        self.metrics.requests.labels(self.endpoint, "200").inc()

    def failed(self, error: OpenAIError) -> None:
        self.is_ended = True
        self.metrics.errors.labels(self.endpoint, error.type).inc()
        self.metrics.requests.labels(self.endpoint, str(error.status_code)).inc()

    async def release(self) -> None:
        if self._is_released:
            return
        self._is_released = True
        self.metrics.in_flight.labels(self.endpoint).dec()
        if not self.is_ended:
            self.metrics.finished.labels("cancelled").inc()
            self.metrics.requests.labels(self.endpoint, "499").inc()
        await self.deltas.aclose()


async def _generate(request: Request, llm: TritonLLM, endpoint: str, body, params: GenerateParams, shape, timer: RequestTimer) -> Response:
    """Run one generation on `llm`; answer it whole, or stream it as server-sent events."""
    generation = _Generation(request, llm, endpoint, params, timer)
    is_streaming = False
    try:
        # Wait for the first delta before answering, so an error at the start gets its own status.
        first = await _until_disconnected(request, generation.next())
        if body.stream:
            is_streaming = True  # the response owns the generation from here
            return StreamingResponse(
                _events(request, body, shape, first, generation),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
                # Runs even when the client left before the body started, which skips _events' finally.
                background=BackgroundTask(generation.release),
            )
        last, text = await _until_disconnected(request, _collect(first, generation))
    except _ClientGone:
        return Response(status_code=499)
    except Exception:
        generation.is_ended = True  # the error handlers answer and count it
        raise
    finally:
        if not is_streaming:
            await generation.release()
    generation.answered(last)
    return JSONResponse(
        {
            "id": new_id(shape.id_prefix),
            "object": shape.object_name,
            "created": now_s(),
            "model": shape.model,
            "choices": [shape.choice(text, last.finish_reason)],
            "usage": usage(last.num_input_tokens, last.num_output_tokens),
        }
    )


async def _collect(first: Delta, generation: _Generation) -> tuple[Delta, str]:
    parts, last = [first.text], first
    while last.finish_reason is None:
        last = await generation.next()
        parts.append(last.text)
    return last, "".join(parts)


async def _until_disconnected(request: Request, awaitable):
    """The awaitable's result; raises _ClientGone (with the awaitable cancelled) if the client disconnects first."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise _ClientGone
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(request: Request, body, shape, first: Delta, generation: _Generation):
    """Server-sent events: chunks of text, the finish reason, usage if asked, then [DONE]."""
    chunk_id, created = new_id(shape.id_prefix), now_s()

    def event(choices: list[dict], **extra) -> bytes:
        payload = {"id": chunk_id, "object": shape.chunk_object_name, "created": created, "model": shape.model}
        return f"data: {json.dumps(payload | {'choices': choices} | extra, ensure_ascii=False)}\n\n".encode()

    delta = first
    try:
        if (opening := shape.first_chunk_choice()) is not None:
            yield event([opening])
        while True:
            if delta.text or delta.finish_reason is not None:
                yield event([shape.chunk_choice(delta.text, delta.finish_reason)])
            if delta.finish_reason is not None:
                break
            delta = await generation.next()
        if body.include_usage:
            yield event([], usage=usage(delta.num_input_tokens, delta.num_output_tokens))
        yield b"data: [DONE]\n\n"
        generation.answered(delta)
    except Exception as e:  # the status line is sent already: the error goes in the stream
        error = e if isinstance(e, OpenAIError) else OpenAIError(500, f"the stream failed: {type(e).__name__}: {e}", type="server_error")
        if not isinstance(e, OpenAIError):
            logger.exception("stream failed")
        generation.failed(error)
        yield f"data: {json.dumps(error.body())}\n\n".encode()
        yield b"data: [DONE]\n\n"
    finally:
        await generation.release()


def _add_error_handlers(app: FastAPI) -> None:
    def answer(request: Request, error: OpenAIError) -> JSONResponse:
        # The route's template, not the raw path: scanners' 404s must not add series.
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        metrics: FrontendMetrics = request.app.state.metrics
        metrics.errors.labels(endpoint, error.type).inc()
        metrics.requests.labels(endpoint, str(error.status_code)).inc()
        headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else None
        if error.status_code == 503:
            headers = {"Retry-After": str(RETRY_AFTER_S)}
        return JSONResponse(error.body(), status_code=error.status_code, headers=headers)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        return answer(request, error)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request failed", exc_info=error)
        return answer(request, OpenAIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {error.detail}"
        return answer(request, OpenAIError(error.status_code, message, type=kind))


_UNION_TAGS = {"str", "int", "float", "bool"}


def _validation_error(problems: list[dict]) -> OpenAIError:
    """The first problem pydantic found, as a 400 naming the field."""
    problem = problems[0]
    location = [str(part) for part in problem.get("loc", ())]
    # Drop the type tags pydantic adds inside unions ("str", "list[str]").
    param = ".".join(part for part in location if part not in _UNION_TAGS and not part.startswith(("list[", "function-")))
    message = problem["msg"].removeprefix("Value error, ")
    if problem.get("type") == "missing":
        message = f"{param} is required"
    elif message.startswith(("is ", "must ")):  # our validators' messages continue the field's name
        message = f"{param} {message}"
    elif param:
        message = f"{param}: {message}"
    return OpenAIError(400, message, param=param or None)
