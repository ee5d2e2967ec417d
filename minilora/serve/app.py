"""`minilora serve`: an OpenAI-compatible HTTP server where every request picks its adapter.

The routes are those clients of OpenAI and vLLM call: chat and text completions (streamed as
server-sent events or not), the model list, health, and vLLM's run-time adapter loading. Each
request is validated here and answered by the scheduler in serve_engine.py, which decodes the
requests of every adapter in one batch. Every error a client can cause is an OpenAI-shaped JSON
body with its HTTP status: {"error": {"message", "type", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minilora.adapters.folder import load_adapter
from minilora.core.errors import MiniloraError, MissingExtra
from minilora.lora.named import set_active
from minilora.serve.engine import Engine, Event, Request, SamplingParams

try:
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:  # the serve extra is missing; create_app says so
    FastAPI = None  # type: ignore[assignment,misc]

MAX_BODY = 1 << 20  # bytes of a request body; a chat prompt of the context's length is far less
MAX_STOPS = 4  # OpenAI's limit on stop strings
ROLES = ("system", "user", "assistant")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
PAGE = Path(__file__).resolve().parents[1] / "assets" / "chat.html"


class APIError(Exception):
    """An error answered to the client: HTTP status, OpenAI's type and code, a message."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 type: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = (
            status, message, code, type, param)

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param,
                "code": self.code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


@dataclass
class ServeState:
    """What the routes share: the engine, the served names, the settings."""

    engine: Engine
    tokenizer: Any
    base_name: str
    adapters: dict[str, str] = field(default_factory=dict)  # name -> where it was read from
    api_key: str | None = None
    adapter_dir: Path | None = None
    check_fingerprint: bool = True
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(state: ServeState) -> Any:
    """The FastAPI application over a started (or to be started) engine.

    Raises:
        MissingExtra: when FastAPI is not installed (the `serve` extra).
    """
    if FastAPI is None:
        raise MissingExtra("minilora serve", "serve")
    app = FastAPI(title="minilora serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state  # what every route reads, through _state(request)
    # Starlette types a handler as taking any Exception, though it calls one only with the
    # class it was registered for: a handler of a narrower class is right, hence the ignores.
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _server_error)
    app.middleware("http")(_check_key)
    app.add_api_route("/", _page, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/v1/models", _models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", _chat, methods=["POST"])
    app.add_api_route("/v1/completions", _completions, methods=["POST"])
    app.add_api_route("/v1/load_lora_adapter", _load_lora_adapter, methods=["POST"])
    app.add_api_route("/v1/unload_lora_adapter", _unload_lora_adapter, methods=["POST"])
    return app


def _state(request: HTTPRequest) -> ServeState:
    return request.app.state.serve


# ------------------------------------------------------------------------------------------------
# Errors and the API key
# ------------------------------------------------------------------------------------------------


async def _api_error(_: HTTPRequest, err: APIError) -> JSONResponse:
    return err.response()


async def _http_error(_: HTTPRequest, err: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return APIError(err.status_code, str(err.detail), code=code).response()


async def _server_error(_: HTTPRequest, err: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(err).__name__}: {err}",
                    type="server_error").response()


async def _check_key(request: HTTPRequest, call_next: Any) -> Any:
    key = _state(request).api_key
    if key is not None and request.url.path.startswith("/v1/"):
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return APIError(401, "Incorrect API key provided: pass it as 'Authorization: "
                            "Bearer KEY'", code="invalid_api_key").response()
    return await call_next(request)


# ------------------------------------------------------------------------------------------------
# Routes
# ------------------------------------------------------------------------------------------------


async def _page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


async def _health(request: HTTPRequest) -> dict[str, Any]:
    return {"status": "ok", "running": len(_state(request).engine.rows)}


async def _models(request: HTTPRequest) -> dict[str, Any]:
    state = _state(request)

    def card(name: str, parent: str | None) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": state.created,
                "owned_by": "minilora", "root": state.adapters.get(name, name),
                "parent": parent}

    return {"object": "list", "data": [card(state.base_name, None)] + [
        card(name, state.base_name) for name in state.adapters]}


async def _chat(request: HTTPRequest) -> Any:
    state = _state(request)
    body = await _json_body(request)
    messages = _messages(body.get("messages"))
    ids, _ = state.tokenizer.encode_chat(messages, add_generation_prompt=True)
    return await _complete(state, request, body, ids, chat=True)


async def _completions(request: HTTPRequest) -> Any:
    body = await _json_body(request)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt: expected a non-empty string", "prompt")
    if body.get("echo") or body.get("suffix") or body.get("logprobs"):
        raise _bad("echo, suffix and logprobs are not supported")
    state = _state(request)
    ids = state.tokenizer.encode(prompt)
    return await _complete(state, request, body, ids, chat=False)


async def _load_lora_adapter(request: HTTPRequest) -> PlainTextResponse:
    state = _state(request)
    body = await _json_body(request)
    name, path = body.get("lora_name"), body.get("lora_path")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == "base":
        raise _bad("lora_name: expected letters, digits, '_' or '-' (and not 'base')",
                   "lora_name")
    if not isinstance(path, str) or not path:
        raise _bad("lora_path: expected the adapter's folder", "lora_path")
    if name in state.adapters or name == state.base_name:
        raise _bad(f"The lora adapter '{name}' has already been loaded.", "lora_name")
    folder = _allowed_path(state, path)
    await asyncio.wrap_future(state.engine.call(lambda: _load(state, name, folder)))
    state.adapters[name] = str(folder)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def _unload_lora_adapter(request: HTTPRequest) -> PlainTextResponse:
    state = _state(request)
    body = await _json_body(request)
    name = body.get("lora_name")
    if not isinstance(name, str) or name not in state.adapters:
        raise APIError(404, f"The lora adapter '{name}' cannot be found.",
                       code="model_not_found", param="lora_name")
    del state.adapters[name]  # no new request may use it from now on
    await asyncio.wrap_future(state.engine.call(lambda: state.engine.unload(name)))
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


# ------------------------------------------------------------------------------------------------
# Reading a request
# ------------------------------------------------------------------------------------------------


async def _json_body(request: HTTPRequest) -> dict[str, Any]:
    """The body as a JSON object, refused past MAX_BODY bytes (413) or when not one (400)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise APIError(413, f"the request body is over {MAX_BODY} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body has no length to check up front
        size += len(chunk)
        if size > MAX_BODY:
            raise APIError(413, f"the request body is over {MAX_BODY} bytes",
                           code="body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, or absurd nesting
        raise _bad(f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages as ChatML's (role, content) pairs; content parts are joined."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: expected a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where}: expected an object, got {type(m).__name__}", where)
        role, content = m.get("role"), m.get("content")
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        if role not in ROLES:
            raise _bad(f"{where}.role: expected one of {list(ROLES)}, got {role!r}", where)
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise _bad(f"{where}.content: only text parts are supported", where)
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"{where}.content: expected a string, got {type(content).__name__}",
                       where)
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(f"{where}.content: not valid Unicode text", where) from None
        out.append({"role": role, "content": content})
    return out


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            low <= value <= high):
        raise _bad(f"{key}: expected a number from {low} to {high}, got {value!r}", key)
    return float(value)


def _sampling(state: ServeState, body: dict[str, Any], prompt_tokens: int) -> SamplingParams:
    """max_tokens, temperature, top_p, seed and stop, checked against the context."""
    context = state.engine.context
    room = context - prompt_tokens
    if room < 1:
        raise _bad(f"This model's maximum context length is {context} tokens. However, your "
                   f"prompt has {prompt_tokens} tokens.", "messages", "context_length_exceeded")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = room
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _bad(f"max_tokens: expected an integer >= 1, got {max_tokens!r}", "max_tokens")
    if max_tokens > room:
        raise _bad(f"This model's maximum context length is {context} tokens. However, you "
                   f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                   f"prompt, {max_tokens} for the completion).", "max_tokens",
                   "context_length_exceeded")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not -2**63 <= seed < 2**64):
        raise _bad(f"seed: expected an integer, got {seed!r}", "seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(
            isinstance(s, str) and s for s in stop):
        raise _bad(f"stop: expected a string or up to {MAX_STOPS} non-empty strings", "stop")
    if body.get("n", 1) != 1:
        raise _bad("n: only 1 is supported", "n")
    return SamplingParams(
        max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1),
        seed=None if seed is None else seed % 2**63, stop=stop)


def _adapter_of(state: ServeState, model: Any) -> str | None:
    if not isinstance(model, str):
        raise _bad("model: expected the name of the base or of an adapter", "model")
    if model == state.base_name:
        return None
    if model not in state.adapters:
        served = [state.base_name, *state.adapters]
        raise APIError(404, f"The model '{model}' does not exist; served: {served}",
                       code="model_not_found", param="model")
    return model


def _allowed_path(state: ServeState, path: str) -> Path:
    """The adapter folder, if it lies under --adapter-dir (403 otherwise: the server was not
    told to read it)."""
    if state.adapter_dir is None:
        raise APIError(403, "loading adapters at run time is off: start the server with "
                       "--adapter-dir DIR to allow adapters under DIR", code="forbidden",
                       type="permission_error")
    root = state.adapter_dir.resolve()
    candidate = Path(path) if Path(path).is_absolute() else root / path
    try:
        folder = candidate.resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise _bad(f"lora_path: {e}", "lora_path") from None
    if not folder.is_relative_to(root):
        raise APIError(403, f"lora_path: {path} is outside the allowed --adapter-dir",
                       code="forbidden", type="permission_error", param="lora_path")
    return folder


def _load(state: ServeState, name: str, folder: Path) -> None:
    """Loads an adapter into the model (in the engine's thread, between two steps)."""
    if state.engine.is_unloading(name):  # its old weights still answer running requests
        raise APIError(409, f"the adapter '{name}' is still being unloaded (requests that began "
                       "with it are running); try again when they are done", code="conflict",
                       param="lora_name")
    try:
        load_adapter(state.engine.model, folder, name=name,
                     check_fingerprint=state.check_fingerprint)
    except MiniloraError as e:
        raise _bad(f"cannot load {name}: {e}", "lora_path") from None
    except OSError as e:
        raise _bad(f"cannot read {name}: {e}", "lora_path") from None
    set_active(state.engine.model, [])  # each request names its own


# ------------------------------------------------------------------------------------------------
# Answering
# ------------------------------------------------------------------------------------------------


async def _complete(state: ServeState, http: HTTPRequest, body: dict[str, Any], ids: list[int], *,
                    chat: bool) -> Any:
    """Validates the rest of the body, submits the request, answers (streamed or whole)."""
    adapter = _adapter_of(state, body.get("model"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream: expected true or false", "stream")
    params = _sampling(state, body, len(ids))
    options = body.get("stream_options") or {}
    usage_in_stream = isinstance(options, dict) and options.get("include_usage") is True
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def on_event(event: Event) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    request = Request(ids, adapter, params, on_event)
    state.engine.submit(request)
    answer = _Answer(chat, body["model"])
    if stream:
        return StreamingResponse(answer.stream(events, request, usage_in_stream),
                                 media_type="text/event-stream")
    try:
        text, end = await answer.collect(events, request, http)
    finally:
        request.cancel()  # a no-op when it finished; frees its row when the client left
    return answer.whole(text, end)


class _Answer:
    """OpenAI's response shapes for one request (chat or text completion)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""),
                "created": self.created, "model": self.model, "choices": choices}

    @staticmethod
    def _usage(end: Event) -> dict[str, Any]:
        return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
                "total_tokens": end.prompt_tokens + end.completion_tokens}

    def whole(self, text: str, end: Event) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": end.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None,
                      "finish_reason": end.finish_reason}
        return {**self._envelope([choice], chunk=False), "usage": self._usage(end)}

    def _chunk(self, text: str | None, finish: str | None, first: bool = False) -> str:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps(self._envelope([choice], chunk=True))}\n\n"

    async def collect(self, events: asyncio.Queue[Event], request: Request,
                      http: HTTPRequest) -> tuple[str, Event]:
        pieces = []
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    raise asyncio.CancelledError from None
                continue
            if event.error is not None:
                raise _engine_error(event.error)
            pieces.append(event.text)
            if event.finish_reason is not None:
                return "".join(pieces), event

    async def stream(self, events: asyncio.Queue[Event], request: Request,
                     usage: bool) -> AsyncIterator[str]:
        try:
            if self.chat:
                yield self._chunk(None, None, first=True)
            while True:
                event = await events.get()
                if event.error is not None:
                    err = _engine_error(event.error)
                    yield f"data: {json.dumps({'error': err.body()})}\n\n"
                    break
                if event.text:
                    yield self._chunk(event.text, None)
                if event.finish_reason is not None:
                    yield self._chunk(None, event.finish_reason)
                    if usage:
                        tail = {**self._envelope([], chunk=True), "usage": self._usage(event)}
                        yield f"data: {json.dumps(tail)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client left (or the stream ended): its row is freed at the next step
            request.cancel()


def _engine_error(error: BaseException) -> APIError:
    if isinstance(error, MiniloraError):  # e.g. an adapter unloaded while the request waited
        return APIError(400, str(error))
    return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error")
