"""``wina serve``: one WINA checkpoint behind an OpenAI-compatible HTTP API.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat
template), both non-streaming and streaming (server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``), and ``GET /health``. Every generation runs through ``generate.stream_generate``, the loop
``wina generate`` runs, so at temperature 0 the served text is ``wina generate``'s.

Concurrency: the model decodes one request at a time (batch 1, where activation sparsity pays), on one
worker thread, in the order requests arrive; up to ``queue`` more wait their turn, and a request beyond that
is answered 503 at once. A request whose client leaves (mid-stream, or while it waits) is dropped: its
generation stops at the next token. Ctrl-C stops the generation in progress and shuts the server down.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the status OpenAI uses
(400 bad request, 401 bad key, 404 unknown model or route, 503 queue full); none of them stops the server.

Built on Starlette (routing, streaming responses), pydantic (request bodies) and uvicorn (HTTP): the
``serve`` extra, ``pip install 'wina-convert[serve]'``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal, Optional, Union

from .errors import WinaError, one_line
from .generate import CacheSlot, Sampling, Step, chat_ids, context_length, stream_generate

try:
    import uvicorn
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # the CLI prints this in one line (test_serve runs it without uvicorn)
    raise WinaError(f"wina serve needs the serve extra ({e.name or 'a dependency'} is not installed): "
                    "pip install 'wina-convert[serve]'") from e

log = logging.getLogger("wina_convert.serve")

DEFAULT_MAX_TOKENS = 2048
DEFAULT_QUEUE = 16
CHECK_DISCONNECT_S = 0.25  # how often a waiting non-streaming request looks whether its client is still there


# --------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An OpenAI-style error answer: ``status`` and ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return JSONResponse(self.body(), status_code=self.status)


def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404 (no route) and 405 (wrong method), in OpenAI's shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return ApiError(exc.status_code, message, code=code).response()


def _api_error(request: Request, exc: ApiError) -> Response:
    return exc.response()


def _validation_message(error: ValidationError) -> ApiError:
    """The first problem pydantic found, as OpenAI words it (unknown fields: "Unrecognized request argument")."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    param = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {where}", param=param)
    if first["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{where}'.", param=param, code="missing_required_parameter")
    return ApiError(400, f"Invalid value for '{where}': {first['msg']}", param=param, code="invalid_value")


# --------------------------------------------------------------------------- request bodies

class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Body(BaseModel):
    """What both endpoints accept. Fields OpenAI defines that this server cannot honour are accepted at
    their default values only (``_unsupported``); any other field is an error."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**64)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[_StreamOptions] = None
    n: int = 1
    user: Optional[str] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ApiError(400, "stop takes up to 16 non-empty strings", param="stop", code="invalid_value")
        return stops

    def _unsupported(self) -> dict[str, bool]:
        """field -> whether it asks for something this server does not do."""
        return {"n": self.n != 1, "presence_penalty": self.presence_penalty != 0,
                "frequency_penalty": self.frequency_penalty != 0, "logit_bias": bool(self.logit_bias)}

    def check_supported(self) -> None:
        for name, asked in self._unsupported().items():
            if asked:
                raise ApiError(400, f"'{name}' is not supported by wina serve (leave it at its default)", param=name,
                               code="unsupported_parameter")

    def completion_tokens_asked(self) -> Optional[int]:
        return self.max_tokens

class CompletionBody(_Body):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def _unsupported(self) -> dict[str, bool]:
        return {**super()._unsupported(), "echo": self.echo, "logprobs": self.logprobs is not None,
                "best_of": self.best_of not in (None, 1), "suffix": bool(self.suffix)}

class _TextPart(BaseModel):
    type: Literal["text"]
    text: str

class _Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[_TextPart]]] = None
    name: Optional[str] = None

    def as_template_message(self) -> dict[str, str]:
        """role and content for a chat template (text parts joined; OpenAI's "developer" is the system role)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}

class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None

    def _unsupported(self) -> dict[str, bool]:
        return {**super()._unsupported(), "logprobs": self.logprobs, "top_logprobs": self.top_logprobs is not None,
                "response_format": (self.response_format or {"type": "text"}).get("type") != "text",
                "tools": bool(self.tools), "tool_choice": self.tool_choice not in (None, "none", "auto")}

    def completion_tokens_asked(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens



async def _parse(request: Request, body_type: type) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
    try:
        body = body_type.model_validate(data)
    except ValidationError as e:
        raise _validation_message(e) from None
    body.check_supported()
    return body


# --------------------------------------------------------------------------- the model and its queue

@dataclass
class ServedModel:
    """The loaded model and what requests are checked against. Two tokenizers: ``encoder`` turns requests
    into ids on the server's event loop, ``decoder`` turns tokens into text on the worker (a fast tokenizer
    must not be used by two threads at once)."""

    id: str
    model: Any
    encoder: Any
    decoder: Any
    max_tokens: int = DEFAULT_MAX_TOKENS
    created: int = field(default_factory=lambda: int(time.time()))
    cache: CacheSlot = field(default_factory=CacheSlot)

    @property
    def context(self) -> int:
        return context_length(self.model)

    @property
    def sparsity(self) -> float | None:
        control = getattr(self.model, "wina", None)
        return getattr(control, "sparsity", None)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.id:
            raise ApiError(404, f"The model '{name}' does not exist: this server serves '{self.id}'", param="model",
                           code="model_not_found")

    def completion_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # one prompt in a list
        if isinstance(prompt, str):
            return list(self.encoder(prompt)["input_ids"])
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            vocab = len(self.encoder)
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
            return list(prompt)
        raise ApiError(400, "wina serve takes one prompt per request", param="prompt", code="invalid_value")

    def chat_ids(self, body: ChatBody) -> list[int]:
        try:
            return chat_ids(self.encoder, [m.as_template_message() for m in body.messages])
        except WinaError as e:
            raise ApiError(400, one_line(e), param="messages") from None

    def completion_budget(self, prompt_tokens: int, asked: int | None) -> int:
        """The tokens a request may generate: what it asked (1 to ``max_tokens``, and room in the context),
        or as many as fit when it did not ask."""
        if prompt_tokens == 0:
            raise ApiError(400, "The prompt is empty", param="prompt", code="invalid_value")
        room = self.context - prompt_tokens
        if asked is None:
            if room < 1:
                raise self._too_long(prompt_tokens, 1)
            return min(self.max_tokens, room)
        if not 1 <= asked <= self.max_tokens:
            raise ApiError(400, f"max_tokens must be between 1 and {self.max_tokens} (this server's --max-tokens), "
                                f"got {asked}", param="max_tokens", code="invalid_value")
        if asked > room:
            raise self._too_long(prompt_tokens, asked)
        return asked

    def _too_long(self, prompt_tokens: int, asked: int) -> ApiError:
        return ApiError(400, f"This model's maximum context length is {self.context} tokens. However, you requested "
                             f"{prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, {asked} for the completion). "
                             f"Please reduce the prompt or the completion length.", param="messages",
                        code="context_length_exceeded")


@dataclass
class Outcome:
    """How a generation ended: the last item a request's queue receives."""

    finish_reason: str  # "stop", "length", "cancelled" (the client left or the server stops), "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class Job:
    """One admitted request: what to generate, and where its steps go (an asyncio queue on the event loop)."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    endpoint: str
    steps: "asyncio.Queue[Step | Outcome]"
    loop: asyncio.AbstractEventLoop
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: Step | Outcome) -> None:
        try:
            self.loop.call_soon_threadsafe(self.steps.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancel.set()


class DecodeQueue:
    """Runs jobs one at a time, in arrival order, on one worker thread; at most ``depth`` wait behind the
    running one, a job beyond that is refused with 503."""

    def __init__(self, served: ServedModel, depth: int = DEFAULT_QUEUE):
        self.served = served
        self.depth = depth
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wina-decode")
        self._lock = threading.Lock()
        self._jobs: list[Job] = []  # admitted and not finished, in arrival order
        self.running: Job | None = None

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"running": int(self.running is not None), "waiting": len(self._jobs) - int(self.running is not None)}

    def submit(self, job: Job) -> None:
        with self._lock:
            if len(self._jobs) > self.depth:
                raise ApiError(503, f"The server is busy: {len(self._jobs)} requests are running or waiting "
                                    f"(--queue {self.depth}). Retry later.", type="server_error", code="queue_full")
            self._jobs.append(job)
        self._executor.submit(self._run, job)

    def cancel_all(self) -> None:
        with self._lock:
            for job in self._jobs:
                job.cancel.set()

    def close(self) -> None:
        """Stop the generation in progress, drop the waiting ones, and wait for the worker."""
        self.cancel_all()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: Job) -> None:
        with self._lock:
            self.running = job
        produced, started, first = 0, time.perf_counter(), None
        outcome = Outcome("cancelled", len(job.prompt), 0)
        try:
            if not job.cancel.is_set():
                steps = stream_generate(self.served.model, self.served.decoder, job.prompt, job.max_tokens,
                                        sampling=job.sampling, stop=job.stop, cache=self.served.cache)
                try:
                    for step in steps:
                        first = first or time.perf_counter()
                        produced += 1
                        job.emit(step)
                        if step.finish_reason is not None:
                            outcome = Outcome(step.finish_reason, len(job.prompt), produced)
                        elif job.cancel.is_set():
                            break
                finally:
                    steps.close()
                outcome.completion_tokens = produced
        except Exception as e:  # noqa: BLE001 - the request fails, the server goes on
            outcome = Outcome("error", len(job.prompt), produced, error=f"{type(e).__name__}: {one_line(e)}")
        finally:
            self._log(job, outcome, started, first)  # before the answer, so a client that has it finds the line
            with self._lock:
                self.running = None
                self._jobs.remove(job)
            job.emit(outcome)

    def _log(self, job: Job, outcome: Outcome, started: float, first: float | None) -> None:
        if outcome.error is not None:
            log.error("%s failed after %d tokens: %s", job.endpoint, outcome.completion_tokens, outcome.error)
            return
        done = time.perf_counter()
        later = outcome.completion_tokens - 1
        rate = later / (done - first) if first is not None and later > 0 and done > first else 0.0
        sparsity = self.served.sparsity
        log.info("%s: %d tokens in, %d out, %.1f tok/s (first token %.2f s), sparsity %s, %s", job.endpoint,
                 outcome.prompt_tokens, outcome.completion_tokens, rate, (first or done) - started,
                 "-" if sparsity is None else f"{sparsity:.2f}", outcome.finish_reason)


# --------------------------------------------------------------------------- responses

def _chunk(kind: str, rid: str, created: int, model: str, text: str | None, finish: str | None, first: bool,
           usage_field: bool) -> dict[str, Any]:
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    if usage_field:
        body["usage"] = None
    return body


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _whole(kind: str, rid: str, created: int, model: str, text: str, outcome: Outcome) -> dict[str, Any]:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": outcome.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": outcome.finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": outcome.usage()}


class Handlers:
    """The routes, over one ``ServedModel`` and its ``DecodeQueue``."""

    def __init__(self, served: ServedModel, queue: DecodeQueue):
        self.served = served
        self.queue = queue

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.served.id, **self.queue.status()})

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.served.id, "object": "model", "created": self.served.created, "owned_by": "wina-convert"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self.served.check_model(request.path_params["name"])
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        body = await _parse(request, CompletionBody)
        self.served.check_model(body.model)
        return await self._answer(request, "completion", body, self.served.completion_ids(body.prompt))

    async def chat(self, request: Request) -> Response:
        body = await _parse(request, ChatBody)
        self.served.check_model(body.model)
        return await self._answer(request, "chat", body, self.served.chat_ids(body))

    async def _answer(self, request: Request, kind: str, body: Any, prompt: list[int]) -> Response:
        max_tokens = self.served.completion_budget(len(prompt), body.completion_tokens_asked())
        job = Job(prompt, max_tokens, Sampling(body.temperature, body.top_p, body.seed), body.stops(),
                  request.url.path, asyncio.Queue(), asyncio.get_running_loop())
        self.queue.submit(job)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(job, kind, rid, created, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, job, kind, rid, created)

    async def _collect(self, request: Request, job: Job, kind: str, rid: str, created: int) -> Response:
        pieces: list[str] = []
        checked = time.monotonic()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.steps.get(), timeout=CHECK_DISCONNECT_S)
                except asyncio.TimeoutError:
                    item = None
                if time.monotonic() - checked >= CHECK_DISCONNECT_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        job.cancel.set()  # nobody to answer: stop (or never start) the generation
                        return Response(status_code=499)
                if isinstance(item, Step):
                    pieces.append(item.text)
                elif isinstance(item, Outcome):
                    break
        finally:
            job.cancel.set()  # a no-op once finished; stops the generation if this handler was cancelled
        if item.finish_reason == "error":
            raise ApiError(500, f"The generation failed: {item.error}", type="server_error", code="generation_failed")
        if item.finish_reason == "cancelled":
            raise ApiError(503, "The server is shutting down", type="server_error", code="shutting_down")
        return JSONResponse(_whole(kind, rid, created, self.served.id, "".join(pieces), item))

    async def _stream(self, job: Job, kind: str, rid: str, created: int, usage: bool) -> AsyncIterator[str]:
        model = self.served.id
        try:
            if kind == "chat":
                yield _sse(_chunk(kind, rid, created, model, "", None, True, usage))
            while True:
                item = await job.steps.get()
                if isinstance(item, Outcome):
                    break
                if item.text or item.finish_reason:
                    yield _sse(_chunk(kind, rid, created, model, item.text if item.text else None, item.finish_reason,
                                      False, usage))
            if item.finish_reason == "error":
                yield _sse(ApiError(500, f"The generation failed: {item.error}", type="server_error",
                                    code="generation_failed").body())
                return
            if item.finish_reason == "cancelled":
                return  # the server is stopping: the stream ends without [DONE]
            if usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                            "created": created, "model": model, "choices": [], "usage": item.usage()})
            yield _sse("[DONE]")
        finally:
            job.cancel.set()  # the client left (the response was cancelled) or the stream is over


class _ApiKey:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer KEY``."""

    def __init__(self, app: Any, key: str):
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "Incorrect API key provided: send 'Authorization: Bearer KEY' with the key "
                                      "given to wina serve --api-key", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(served: ServedModel, queue: DecodeQueue, *, api_key: str | None = None) -> Any:
    """The ASGI application: the routes, OpenAI-style errors, and the key check when ``api_key`` is set."""
    h = Handlers(served, queue)
    routes = [
        Route("/health", h.health, methods=["GET"]),
        Route("/v1/models", h.models, methods=["GET"]),
        Route("/v1/models/{name:path}", h.model, methods=["GET"]),
        Route("/v1/completions", h.completions, methods=["POST"]),
        Route("/v1/chat/completions", h.chat, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={ApiError: _api_error, HTTPException: _http_error})
    return _ApiKey(app, api_key) if api_key else app


# --------------------------------------------------------------------------- running it

def model_id(checkpoint: str | Path) -> str:
    """What clients call the model: a local checkpoint's directory name, or the Hub id as given."""
    path = Path(str(checkpoint)).expanduser()
    return path.resolve().name if path.is_dir() else str(checkpoint)


def load_served(checkpoint: str | Path, *, sparsity: float | None = None, device: str = "cpu", dtype: str | None = None,
                max_tokens: int = DEFAULT_MAX_TOKENS) -> ServedModel:
    """Load ``checkpoint`` through ``wina_convert.load`` (its defaults, as ``wina generate``) and its tokenizer."""
    from transformers import AutoTokenizer

    from .progress import quiet_transformers
    from .runtime.load import load

    if max_tokens < 1:
        raise WinaError(f"--max-tokens must be at least 1, got {max_tokens}")
    model = load(checkpoint, sparsity=sparsity, device=device, dtype=dtype)
    with quiet_transformers():
        encoder = AutoTokenizer.from_pretrained(model.name_or_path)
        decoder = AutoTokenizer.from_pretrained(model.name_or_path)
    return ServedModel(model_id(checkpoint), model, encoder, decoder, max_tokens=max_tokens)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as e:
        raise WinaError(f"cannot listen on {host}:{port}: {e.strerror or one_line(e)}") from None


def _log_to_stderr(quiet: bool) -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def serve(checkpoint: str | Path, *, host: str = "127.0.0.1", port: int = 8000, sparsity: float | None = None,
          device: str = "cpu", dtype: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS, queue: int = DEFAULT_QUEUE,
          api_key: str | None = None, quiet: bool = False) -> None:
    """Serve ``checkpoint`` on ``host:port`` until Ctrl-C (or SIGTERM); see the module docstring."""
    if queue < 0:
        raise WinaError(f"--queue must be at least 0, got {queue}")
    _log_to_stderr(quiet)
    served = load_served(checkpoint, sparsity=sparsity, device=device, dtype=dtype, max_tokens=max_tokens)
    decode = DecodeQueue(served, depth=queue)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(create_app(served, decode, api_key=api_key), log_config=None, access_log=False,
                            lifespan="off", timeout_graceful_shutdown=5, log_level="warning")
    server = _Server(config, on_exit=decode.cancel_all)
    sparsity_shown = "-" if served.sparsity is None else f"{served.sparsity:.2f}"
    log.info("serving %s (sparsity %s, %s) at http://%s:%d/v1, Ctrl-C to stop", served.id, sparsity_shown,
             next(served.model.parameters()).device, shown, bound)
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who can reach it can use the model", host)
    try:
        server.run(sockets=[sock])
    finally:
        decode.close()
        sock.close()


class _Server(uvicorn.Server):
    """uvicorn's server, which also stops the generation in progress when asked to exit (Ctrl-C), so that
    an open stream does not hold the shutdown up."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)
