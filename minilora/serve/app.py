"""`minilora serve`: an OpenAI-compatible HTTP server where every request picks its adapter.

The routes are those clients of OpenAI and vLLM call: chat and text completions (streamed as
server-sent events or not), the model list, health, and vLLM's run-time adapter loading. Each
request is validated here and answered by the scheduler in engine.py, which decodes the
requests of every adapter in one batch. Every error a client can cause is an OpenAI-shaped JSON
body with its HTTP status: {"error": {"message", "type", "param", "code"}}.

The server runs on a user's machine next to a browser, so it answers only what a page of its
own origin (or an origin named with --cors-origin) may ask: every POST must carry a JSON content
type (a cross-site form or a no-cors fetch cannot), a Host header must name this server (DNS
rebinding sends the attacker's name), and a cross-origin POST is refused.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from minilora.adapters.folder import load_adapter
from minilora.core.errors import ConfigError, MessageError, MiniloraError, MissingExtra
from minilora.data.messages import ROLES, check_messages
from minilora.decoding.sampling import GENERATION_CONFIG, read_generation_config, sampling_problems
from minilora.decoding.sampling import SamplingParams as Sampling
from minilora.lora.config import check_adapter_name
from minilora.lora.named import set_active
from minilora.serve.engine import MAX_TOP_LOGPROBS, Engine, Event, Request, SamplingParams

try:
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import ClientDisconnect
except ImportError:  # the serve extra is missing; create_app says so
    FastAPI = None  # type: ignore[assignment,misc]

MAX_BODY = 1 << 20  # bytes of a request body; a chat prompt of the context's length is far less
MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_N = 16  # most choices one request may ask for (each takes a row of the batch)
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on the completions route's logprobs
MAX_FOLDER_ENTRIES = 1000  # files an adapter folder may hold (each is checked)
PAGE = Path(__file__).resolve().parents[1] / "assets" / "chat.html"

# Fields of OpenAI's API this server does not implement, with the values that ask for nothing
# (clients often send them so); any other value is refused, naming the field.
NO_OP = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},),
    "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",),
    "parallel_tool_calls": (), "functions": ([],), "function_call": ("none",),
    "store": (False,), "metadata": (), "user": (), "service_tier": ("auto",),
    "prediction": (), "modalities": (["text"],), "audio": (), "reasoning_effort": (),
    "web_search_options": (), "best_of": (1,), "echo": (False,), "suffix": ("",),
}
CHAT_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens",
               "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
               "n", "logprobs", "top_logprobs", "ignore_eos"}
COMPLETION_FIELDS = {"model", "prompt", "stream", "stream_options", "max_tokens", "temperature",
                     "top_p", "top_k", "min_p", "seed", "stop", "n", "logprobs", "ignore_eos"}
# generation_config.json's sampling settings this server applies as defaults (vLLM's
# --generation-config auto reads these, and max_new_tokens)
SERVED_SAMPLING = ("temperature", "top_p", "top_k", "min_p")
MAX_TEMPERATURE = 2  # OpenAI's range for temperature: 0 to 2


class APIError(Exception):
    """An error answered to the client: HTTP status, OpenAI's type and code, a message."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 type: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = (
            status, message, code, type, param)
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param,
                "code": self.code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status,
                            headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


def _forbidden(message: str, param: str | None = None, code: str = "forbidden") -> APIError:
    return APIError(403, message, code=code, type="permission_error", param=param)


@dataclass
class ServeState:
    """What the routes share: the engine, the served names, the settings.

    adapters: every adapter a request may name -> the folder it was read from (an evicted one
        is read from there again); pinned: those given at start-up (never unloaded).
    adapter_dir: where run-time loading may read; None: run-time loading and unloading are off.
    allowed_hosts: Host names answered besides this machine's addresses and localhost ("*":
        any); cors_origins: origins whose pages may call the API.
    max_queue: most requests waiting for a row (None: no limit); past it a 503.
    defaults: sampling defaults from the model's generation_config.json (OpenAI names).
    """

    engine: Engine
    tokenizer: Any
    base_name: str
    adapters: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    adapter_dir: Path | None = None
    check_fingerprint: bool = True
    created: int = field(default_factory=lambda: int(time.time()))
    pinned: set[str] | None = None  # None: every adapter given in `adapters`
    allowed_hosts: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    max_queue: int | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    loading: set[str] = field(default_factory=set)  # names being loaded now
    # base fingerprints already checked against the served base, which never changes: an
    # evicted adapter read back is not hashed against the whole base again
    verified: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.pinned is None:
            self.pinned = set(self.adapters)


def create_app(state: ServeState) -> Any:
    """The FastAPI application over a started (or to be started) engine. It also gives the
    engine the way to read an evicted adapter back (see Engine's ``reload``).

    Raises:
        MissingExtra: when FastAPI is not installed (the `serve` extra).
    """
    if FastAPI is None:
        raise MissingExtra("minilora serve", "serve")
    app = FastAPI(title="minilora serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state  # what every route reads, through _state(request)
    if state.engine.reload is None:
        state.engine.reload = lambda name: _reload(state, name)
    # Starlette types a handler as taking any Exception, though it calls one only with the
    # class it was registered for: a handler of a narrower class is right, hence the ignores.
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, _client_left)
    app.add_exception_handler(Exception, _server_error)
    app.add_api_route("/", _page, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/v1/models", _models, methods=["GET"])
    for path, route, schema in (
            ("/v1/chat/completions", _chat, CHAT_SCHEMA),
            ("/v1/completions", _completions, COMPLETION_SCHEMA),
            ("/v1/load_lora_adapter", _load_lora_adapter, LOAD_SCHEMA),
            ("/v1/unload_lora_adapter", _unload_lora_adapter, UNLOAD_SCHEMA)):
        app.add_api_route(path, route, methods=["POST"], openapi_extra={"requestBody": {
            "required": True, "content": {"application/json": {"schema": schema}}}})
    app.add_middleware(_Guard, state=state)
    if state.cors_origins:  # outside the guard: preflights from them carry no key
        app.add_middleware(CORSMiddleware, allow_origins=state.cors_origins,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def _state(request: HTTPRequest) -> ServeState:
    return request.app.state.serve


# ------------------------------------------------------------------------------------------------
# Who may ask: Host, origin, API key, content type
# ------------------------------------------------------------------------------------------------


class _Guard:
    """ASGI middleware: refuses a request whose Host is not this server's, a cross-origin POST,
    a /v1 request without the API key (when one is set), and a POST that is not JSON."""

    def __init__(self, app: Any, state: ServeState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope["method"], scope["path"], Headers(scope=scope))
            if refusal is not None:
                await refusal.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, method: str, path: str, headers: Any) -> APIError | None:
        state = self.state
        host = headers.get("host")
        if host is not None and not host_allowed(host, state.allowed_hosts):
            return APIError(400, f"Host {host!r} is not a name of this server; start it with "
                            "--allowed-hosts NAME to answer it", code="invalid_host",
                            param="Host")
        origin = headers.get("origin")
        if (method not in ("GET", "HEAD", "OPTIONS") and origin is not None
                and origin not in state.cors_origins and not _same_origin(origin, host)):
            return _forbidden(f"a page at {origin} may not call this server; start it with "
                              f"--cors-origin {origin} to allow it", "Origin")
        if state.api_key is not None and path.startswith("/v1") and not _has_key(
                headers.get("authorization", ""), state.api_key):
            return APIError(401, "Incorrect API key provided: pass it as 'Authorization: "
                            "Bearer KEY'", code="invalid_api_key")
        if method == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return APIError(415, f"Content-Type must be application/json, got "
                                f"{media or 'none'!r}", code="unsupported_media_type",
                                param="Content-Type")
        return None


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Whether a Host header names this server: an IP address (a page can reach one only under
    its own origin), localhost, or a name in `allowed` ("*" allows any)."""
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8000
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    name = name.rstrip(".")
    if "*" in allowed or name in (a.lower() for a in allowed):
        return True
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _same_origin(origin: str, host: str | None) -> bool:
    try:
        netloc = urlsplit(origin).netloc.lower()
    except ValueError:
        return False
    return host is not None and netloc == host.strip().lower()


def _has_key(header: str, key: str) -> bool:
    """'Bearer KEY', the scheme in any case (RFC 7235)."""
    scheme, _, given = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              key.encode())


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


async def _api_error(_: HTTPRequest, err: APIError) -> JSONResponse:
    return err.response()


async def _http_error(_: HTTPRequest, err: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return APIError(err.status_code, str(err.detail), code=code).response()


async def _client_left(_: HTTPRequest, err: Exception) -> JSONResponse:
    # The client stopped sending (or was timed out) mid-body; nobody reads this answer.
    return APIError(408, "the request body did not arrive", code="timeout").response()


async def _server_error(_: HTTPRequest, err: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(err).__name__}: {err}",
                    type="server_error").response()


# ------------------------------------------------------------------------------------------------
# Routes
# ------------------------------------------------------------------------------------------------


async def _page(request: HTTPRequest) -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"),
                        headers={"X-Access": "open: this page needs no API key"})


async def _health(request: HTTPRequest) -> JSONResponse:
    state = _state(request)
    access = ("open: / and /health need no API key; /v1 routes need one"
              if state.api_key is not None else "open: no route needs an API key")
    return JSONResponse({"status": "ok", "running": len(state.engine.rows),
                         "waiting": state.engine.waiting(), "access": access},
                        headers={"X-Access": "open: this route needs no API key"})


async def _models(request: HTTPRequest) -> dict[str, Any]:
    state = _state(request)

    def card(name: str, root: str, parent: str | None) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": state.created,
                "owned_by": "minilora", "root": root, "parent": parent}

    return {"object": "list", "data": [card(state.base_name, state.base_name, None)] + [
        card(name, path, state.base_name) for name, path in state.adapters.items()]}


async def _chat(request: HTTPRequest) -> Any:
    state = _state(request)
    body = await _json_body(request)
    _check_fields(body, CHAT_FIELDS)
    messages = _messages(body.get("messages"))
    # tokenizing a long prompt takes a while: off the event loop, which keeps answering
    ids, _ = await run_in_threadpool(state.tokenizer.encode_chat, messages,
                                     add_generation_prompt=True)
    return await _complete(state, request, body, ids, chat=True)


async def _completions(request: HTTPRequest) -> Any:
    body = await _json_body(request)
    _check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt: expected a non-empty string", "prompt")
    state = _state(request)
    ids = await run_in_threadpool(state.tokenizer.encode, prompt)
    return await _complete(state, request, body, ids, chat=False)


def _runtime_changes(state: ServeState) -> Path:
    if state.adapter_dir is None:
        raise _forbidden("loading and unloading adapters at run time is off: start the server "
                         "with --adapter-dir DIR to allow adapters under DIR")
    return state.adapter_dir


async def _load_lora_adapter(request: HTTPRequest) -> PlainTextResponse:
    state = _state(request)
    _runtime_changes(state)
    body = await _json_body(request)
    _check_fields(body, {"lora_name", "lora_path"})
    path = body.get("lora_path")
    try:
        name = check_adapter_name(body.get("lora_name"))  # the library's rule for a name
    except ConfigError as e:
        raise _bad(f"lora_name: {e}", "lora_name") from None
    if not isinstance(path, str) or not path:
        raise _bad("lora_path: expected the adapter's folder", "lora_path")
    if name in state.adapters or name == state.base_name:
        raise APIError(409, f"The lora adapter '{name}' has already been loaded.",
                       code="conflict", param="lora_name")
    if name in state.loading:
        raise APIError(409, f"The lora adapter '{name}' is being loaded by another request.",
                       code="conflict", param="lora_name")
    state.loading.add(name)  # claimed before the first await: a second load of it gets 409
    try:
        folder = await run_in_threadpool(_allowed_path, state, path)
        await asyncio.wrap_future(state.engine.call(
            lambda: state.engine.add_adapter(name, lambda: _load(state, name, folder))))
        state.adapters[name] = str(folder)
    finally:
        state.loading.discard(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def _unload_lora_adapter(request: HTTPRequest) -> PlainTextResponse:
    state = _state(request)
    _runtime_changes(state)
    body = await _json_body(request)
    _check_fields(body, {"lora_name", "lora_int_id"})
    name = body.get("lora_name")
    if isinstance(name, str) and name in (state.pinned or ()):
        raise _forbidden(f"the adapter '{name}' was given when the server started and stays "
                         "loaded; restart the server without it", "lora_name", "pinned")
    if isinstance(name, str) and name in state.loading:
        raise APIError(409, f"The lora adapter '{name}' is being loaded; unload it after.",
                       code="conflict", param="lora_name")
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


def _check_fields(body: dict[str, Any], implemented: set[str]) -> None:
    """Refuses (400, naming it) a field this server does not implement, unless its value asks
    for nothing (frequency_penalty 0, tools [], response_format text, null, ...)."""
    for key, value in body.items():
        if key in implemented or (key in NO_OP and (value is None or any(
                value == v and type(value) is type(v) for v in NO_OP[key]))):
            continue
        known = "is not supported by this server" if key in NO_OP else "is not a known field"
        raise _bad(f"{key}: {known}", key, "unsupported_parameter")


def _messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages as ChatML's (role, content) pairs; content parts are joined, the
    role "developer" is "system", and the pairs are checked by the library's own check
    (``check_messages``); a problem is a 400 naming the message."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: expected a non-empty list of {role, content} objects", "messages")
    turns = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where}: expected an object, got {type(m).__name__}", where)
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise _bad(f"{where}.{extra[0]}: is not supported by this server", where,
                       "unsupported_parameter")
        role, content = m.get("role"), m.get("content")
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise _bad(f"{where}.content: only text parts are supported", where)
            content = "".join(p["text"] for p in content)
        turns.append({"role": role, "content": content})
    try:
        return list(check_messages(turns, roles=ROLES))
    except MessageError as e:
        raise _bad(str(e), e.field.split(".")[0]) from None


def _sampling_setting(body: dict[str, Any], key: str, default: Any) -> Any:
    """One of the sampling settings the library knows (temperature, top_p, top_k), checked by
    the library's own check (``sampling_problems``) plus this API's range: temperature at most
    2, and top_k -1 meaning off (vLLM's); refused (400) naming the field."""
    value = body.get(key)
    if value is None:
        return default
    if key == "top_k" and value == -1 and type(value) is int:
        return 0
    problems = sampling_problems(**{key: value})
    if not problems and key == "temperature" and value > MAX_TEMPERATURE:
        problems = [f"temperature: expected a number from 0 to {MAX_TEMPERATURE}, got {value!r}"]
    if problems:
        raise _bad(problems[0], key)
    return value if key == "top_k" else float(value)


def _integer(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(f"{key}: expected an integer from {low} to {high}, got {value!r}", key)
    return value


@dataclass
class _Asked:
    """What a request asks beyond the sampling of each choice."""

    n: int
    stream: bool
    usage_in_stream: bool
    logprobs: int | None  # None: off


def _asked(body: dict[str, Any], chat: bool) -> _Asked:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream: expected true or false", "stream")
    options = body.get("stream_options")
    usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options: only allowed when stream is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(
                options.get("include_usage", False), bool):
            raise _bad("stream_options: expected {\"include_usage\": true or false}",
                       "stream_options")
        usage = options.get("include_usage", False)
    n = _integer(body, "n", 1, 1, MAX_N)
    if chat:
        wanted = body.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise _bad("logprobs: expected true or false", "logprobs")
        top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if body.get("top_logprobs") is not None and not wanted:
            raise _bad("top_logprobs: only allowed when logprobs is true", "top_logprobs")
        logprobs = top if wanted else None
    else:
        logprobs = (None if body.get("logprobs") is None
                    else _integer(body, "logprobs", 0, 0, MAX_COMPLETION_LOGPROBS))
    return _Asked(n, stream, usage, logprobs)


def _sampling(state: ServeState, body: dict[str, Any], prompt_tokens: int,
              logprobs: int | None) -> SamplingParams:
    """max_tokens, temperature, top_p, top_k, seed, stop and ignore_eos (vLLM's: the answer
    goes on past the end-of-turn token, to max_tokens or a stop string), checked against the
    context;
    what the request leaves out comes from generation_config.json, else OpenAI's defaults."""
    context = state.engine.context
    room = context - prompt_tokens
    if room < 1:
        raise _bad(f"This model's maximum context length is {context} tokens. However, your "
                   f"prompt has {prompt_tokens} tokens.", "messages", "context_length_exceeded")
    defaults = state.defaults
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else (
        "max_tokens")
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = min(room, defaults.get("max_tokens", room))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _bad(f"{key}: expected an integer >= 1, got {max_tokens!r}", key)
    if max_tokens > room:
        raise _bad(f"This model's maximum context length is {context} tokens. However, you "
                   f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                   f"prompt, {max_tokens} for the completion).", key,
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
    ignore_eos = body.get("ignore_eos")
    ignore_eos = False if ignore_eos is None else ignore_eos  # null: the default, as elsewhere
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos: expected true or false", "ignore_eos")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_sampling_setting(body, "temperature", defaults.get("temperature", 1.0)),
        top_p=_sampling_setting(body, "top_p", defaults.get("top_p", 1.0)),
        top_k=max(_sampling_setting(body, "top_k", defaults.get("top_k", 0)), 0),
        min_p=_sampling_setting(body, "min_p", defaults.get("min_p", 0.0)),
        seed=None if seed is None else seed % 2**63, stop=stop,
        logprobs=logprobs, ignore_eos=ignore_eos)


def served_defaults(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """The sampling defaults a model folder's generation_config.json sets (read by the
    library's one reader, ``read_generation_config``; the keys vLLM's ``--generation-config
    auto`` applies), and the sampling keys it sets that this server does not apply (to be told
    at start-up).

    Raises:
        ConfigError: the file is not a JSON object, or a value is out of its range (this
            API's range included: temperature at most 2).
    """
    config = read_generation_config(folder)
    defaults = {k: v for k, v in config.sampling.items() if k in SERVED_SAMPLING}
    if config.max_new_tokens is not None:
        defaults["max_tokens"] = config.max_new_tokens
    if defaults.get("temperature", 0) > MAX_TEMPERATURE:
        raise ConfigError(f"{folder / GENERATION_CONFIG}: temperature: expected a number from 0 "
                          f"to {MAX_TEMPERATURE}, got {defaults['temperature']!r}")
    off = Sampling()  # the values that change nothing
    ignored = [k for k in ("repetition_penalty",)
               if config.sampling.get(k, getattr(off, k)) != getattr(off, k)]
    return defaults, ignored


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
    """The adapter folder, if it and everything in it really lie under --adapter-dir: the
    folder, each file and each subfolder is resolved (symbolic links followed) and refused
    (403) when its real path leaves the directory."""
    root = _runtime_changes(state).resolve()
    candidate = Path(path) if Path(path).is_absolute() else root / path
    try:
        folder = candidate.resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise _bad(f"lora_path: {e}", "lora_path") from None
    if not folder.is_relative_to(root):
        raise _forbidden(f"lora_path: {path} is outside the allowed --adapter-dir",
                         "lora_path")
    if folder.is_dir():
        seen = 0
        for parent, dirs, files in os.walk(folder):  # links are not followed, only resolved
            for entry in dirs + files:
                seen += 1
                if seen > MAX_FOLDER_ENTRIES:
                    raise _bad(f"lora_path: {path} holds over {MAX_FOLDER_ENTRIES} files; "
                               "an adapter folder holds a few", "lora_path")
                real = (Path(parent) / entry).resolve()
                if not real.is_relative_to(root):
                    inside = (Path(parent) / entry).relative_to(folder)
                    raise _forbidden(f"lora_path: {path}/{inside} leads outside the allowed "
                                     "--adapter-dir", "lora_path")
    return folder


def _load(state: ServeState, name: str, folder: Path) -> None:
    """Loads an adapter into the model (in the engine's thread, between two steps)."""
    if state.engine.is_unloading(name):  # its old weights still answer running requests
        raise APIError(409, f"the adapter '{name}' is still being unloaded (requests that began "
                       "with it are running); try again when they are done", code="conflict",
                       param="lora_name")
    try:
        load_adapter(state.engine.model, folder, name=name,
                     check_fingerprint=state.check_fingerprint, verified=state.verified)
    except MiniloraError as e:
        raise _bad(f"cannot load {name}: {e}", "lora_path") from None
    except OSError as e:
        raise _bad(f"cannot read {name}: {e}", "lora_path") from None
    set_active(state.engine.model, [])  # each request names its own


def _reload(state: ServeState, name: str) -> None:
    """Reads an evicted run-time adapter back from its folder (in the engine's thread); its
    folder is checked again, as a symbolic link in it may have changed."""
    path = state.adapters.get(name)
    if path is None or name in (state.pinned or ()):
        raise ConfigError(f"adapter {name!r} is not loaded")
    _load(state, name, _allowed_path(state, path))


# ------------------------------------------------------------------------------------------------
# Answering
# ------------------------------------------------------------------------------------------------


async def _complete(state: ServeState, http: HTTPRequest, body: dict[str, Any], ids: list[int], *,
                    chat: bool) -> Any:
    """Validates the rest of the body, submits one request per choice, answers (streamed or
    whole). Choice i of a seeded request is sampled with seed + i, so choice 0 is what the
    same request with n = 1 answers."""
    adapter = _adapter_of(state, body.get("model"))
    asked = _asked(body, chat)
    params = _sampling(state, body, len(ids), asked.logprobs)
    if state.max_queue is not None and state.engine.waiting() + asked.n > state.max_queue:
        raise APIError(503, f"the server is busy: {state.engine.waiting()} requests are "
                       "waiting; retry shortly", code="queue_full", type="server_error",
                       headers={"Retry-After": "1"})
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    requests = []
    for i in range(asked.n):
        seed = params.seed if params.seed is None else (params.seed + i) % 2**63
        choice = SamplingParams(**{**params.__dict__, "seed": seed, "stop": list(params.stop)})

        def on_event(event: Event, i: int = i) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (i, event))

        requests.append(Request(ids, adapter, choice, on_event))
    for request in requests:
        state.engine.submit(request)
    answer = _Answer(chat, body["model"], state.tokenizer, asked.n, asked.logprobs is not None)
    if asked.stream:
        return StreamingResponse(answer.stream(events, requests, asked.usage_in_stream),
                                 media_type="text/event-stream")
    try:
        return await answer.collect(events, http)
    finally:
        for request in requests:
            request.cancel()  # a no-op when it finished; frees its row when the client left


class _Answer:
    """OpenAI's response shapes for one request (chat or text completion) of n choices."""

    def __init__(self, chat: bool, model: str, tokenizer: Any, n: int, logprobs: bool) -> None:
        self.chat, self.model, self.tokenizer, self.n = chat, model, tokenizer, n
        self.wants_logprobs = logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.offsets = [0] * n  # text_offset of the next token, per choice (completions)

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""),
                "created": self.created, "model": self.model, "choices": choices}

    @staticmethod
    def _usage(ends: list[Event]) -> dict[str, Any]:
        prompt = ends[0].prompt_tokens
        completion = sum(e.completion_tokens for e in ends)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _token(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _logprobs(self, index: int, events: list[Event]) -> dict[str, Any] | None:
        """OpenAI's logprobs object for the tokens of events (None when none were asked)."""
        entries = [e for event in events for e in event.logprobs]
        if self.chat:
            def one(token: int, logprob: float) -> dict[str, Any]:
                text = self._token(token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
            return {"content": [{**one(e.token, e.logprob),
                                 "top_logprobs": [one(t, lp) for t, lp in e.top]}
                                for e in entries]}
        tokens = [self._token(e.token) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token(t): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}

    async def collect(self, events: asyncio.Queue[tuple[int, Event]],
                      http: HTTPRequest) -> dict[str, Any]:
        got: list[list[Event]] = [[] for _ in range(self.n)]
        ends: dict[int, Event] = {}
        while len(ends) < self.n:
            try:
                i, event = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    raise asyncio.CancelledError from None
                continue
            if event.error is not None:
                raise _engine_error(event.error)
            got[i].append(event)
            if event.finish_reason is not None:
                ends[i] = event
        choices = []
        for i in range(self.n):
            text = "".join(e.text for e in got[i])
            logprobs = self._logprobs(i, got[i]) if self.wants_logprobs else None
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": ends[i].finish_reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs,
                                "finish_reason": ends[i].finish_reason})
        return {**self._envelope(choices, chunk=False),
                "usage": self._usage([ends[i] for i in range(self.n)])}

    def _chunk(self, index: int, event: Event | None, finish: str | None,
               first: bool = False) -> str:
        text = event.text if event is not None else ""
        logprobs = (self._logprobs(index, [event])
                    if event is not None and self.wants_logprobs else None)
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs,
                      "finish_reason": finish}
        return f"data: {json.dumps(self._envelope([choice], chunk=True))}\n\n"

    async def stream(self, events: asyncio.Queue[tuple[int, Event]], requests: list[Request],
                     usage: bool) -> AsyncIterator[str]:
        ends: dict[int, Event] = {}
        try:
            if self.chat:
                for i in range(self.n):
                    yield self._chunk(i, None, None, first=True)
            while len(ends) < self.n:
                i, event = await events.get()
                if event.error is not None:
                    err = _engine_error(event.error)
                    yield f"data: {json.dumps({'error': err.body()})}\n\n"
                    break
                if event.text or event.logprobs:
                    yield self._chunk(i, event, None)
                if event.finish_reason is not None:
                    ends[i] = event
                    yield self._chunk(i, None, event.finish_reason)
            else:
                if usage:
                    tail = {**self._envelope([], chunk=True),
                            "usage": self._usage([ends[i] for i in range(self.n)])}
                    yield f"data: {json.dumps(tail)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client left (or the stream ended): the rows are freed at the next step
            for request in requests:
                request.cancel()


def _engine_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):  # e.g. an evicted adapter whose folder is gone
        return error
    if isinstance(error, MiniloraError):  # e.g. an adapter unloaded while the request waited
        return APIError(400, str(error))
    return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error")


# ------------------------------------------------------------------------------------------------
# The request bodies as JSON Schema (the OpenAPI document; the routes check them themselves)
# ------------------------------------------------------------------------------------------------

_MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"type": "string", "enum": ["system", "user", "assistant", "developer"]},
    "content": {"type": "string"}}}
_SAMPLING = {
    "model": {"type": "string"}, "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "max_tokens": {"type": "integer"}, "temperature": {"type": "number"},
    "top_p": {"type": "number"}, "top_k": {"type": "integer"}, "seed": {"type": "integer"},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "n": {"type": "integer"}, "ignore_eos": {"type": "boolean"}}
CHAT_SCHEMA = {"type": "object", "required": ["model", "messages"], "properties": {
    **_SAMPLING, "messages": {"type": "array", "items": _MESSAGE},
    "max_completion_tokens": {"type": "integer"}, "logprobs": {"type": "boolean"},
    "top_logprobs": {"type": "integer"}}}
COMPLETION_SCHEMA = {"type": "object", "required": ["model", "prompt"], "properties": {
    **_SAMPLING, "prompt": {"type": "string"}, "logprobs": {"type": "integer"}}}
LOAD_SCHEMA = {"type": "object", "required": ["lora_name", "lora_path"], "properties": {
    "lora_name": {"type": "string"}, "lora_path": {"type": "string"}}}
UNLOAD_SCHEMA = {"type": "object", "required": ["lora_name"], "properties": {
    "lora_name": {"type": "string"}}}
