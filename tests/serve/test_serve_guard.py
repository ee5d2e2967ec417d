"""`minilora serve` as a hostile neighbour sees it, through HTTP: who may change what (Host,
origin, content type, API key, pinned adapters, paths under --adapter-dir), and the bounds
(slow clients, connections, queue, resident adapters, concurrent loads, start-up flags)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from test_serve import Server, error_of, wait_for, write_adapter

from minilora.adapters.folder import load_adapter
from minilora.cli import BASE_MODEL, main
from minilora.cli import serve as cli_serve
from minilora.data.tokenizer import Tokenizer
from minilora.decoding.generation import generate
from minilora.lora.named import set_active
from minilora.model.io import load_model
from minilora.serve.app import ServeState, host_allowed
from minilora.serve.engine import Engine

KEY = "guard-key"
QUESTION = [{"role": "user", "content": "What is your name?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One engine (max 2 resident adapters: "pinned" from start-up plus one run-time slot),
    adapters under --adapter-dir, a folder outside it, and the main server over the engine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("guard")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    maker = load_model(BASE_MODEL)
    pinned = write_adapter(maker, root, "pinned", 1, ["q_proj", "v_proj"])
    for i, name in enumerate(["one", "two", "three"]):
        write_adapter(maker, allowed, name, 10 + i, ["q_proj", "down_proj"])
    write_adapter(maker, outside, "secret", 20, ["q_proj", "down_proj"])
    tokenizer = Tokenizer.from_file(BASE_MODEL)
    model = load_model(BASE_MODEL)
    load_adapter(model, pinned, name="pinned")
    engine = Engine(model, tokenizer, max_batch=4, max_loras=2)
    state = ServeState(engine, tokenizer, "base", adapters={"pinned": str(pinned)},
                       api_key=KEY, adapter_dir=allowed, max_queue=2)
    with Server(state) as server:
        yield server, allowed, outside
    torch.set_num_threads(threads)


def call(url: str, path: str, body=None, *, key: str | None = KEY, method: str = "POST",
         content_type: str | None = "application/json", **headers) -> httpx.Response:
    head = {k.replace("_", "-"): v for k, v in headers.items()}
    if key:
        head["Authorization"] = f"Bearer {key}"
    if content_type:
        head["Content-Type"] = content_type
    content = None if body is None else body if isinstance(body, (bytes, str)) else (
        __import__("json").dumps(body))
    return httpx.request(method, url + path, content=content, headers=head, timeout=60)


def chat_body(model: str = "base", **kw) -> dict:
    return {"model": model, "messages": QUESTION, "max_tokens": 8, "temperature": 0, **kw}


def served_names(url: str) -> list[str]:
    return [m["id"] for m in call(url, "/v1/models", method="GET").json()["data"]]


def side_server(served, **changes) -> Server:
    """Another server over the same engine with some settings changed."""
    state = served[0].state
    fields = dict(engine=state.engine, tokenizer=state.tokenizer, base_name="base",
                  adapters=state.adapters, api_key=state.api_key, adapter_dir=state.adapter_dir,
                  pinned=state.pinned)
    limits = {k: changes.pop(k) for k in ("read_timeout", "keep_alive", "max_connections")
              if k in changes}
    return Server(ServeState(**{**fields, **changes}), own_engine=False, **limits)


# ------------------------------------------------------------------------------------------------
# 1. Who may do what
# ------------------------------------------------------------------------------------------------


def test_a_post_must_be_json_so_a_cross_site_form_or_no_cors_fetch_is_refused(served):
    url = served[0].url
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", None):
        for path, body in (("/v1/chat/completions", chat_body()),
                           ("/v1/unload_lora_adapter", {"lora_name": "pinned"}),
                           ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "one"})):
            refused = call(url, path, body, content_type=content_type)
            assert refused.status_code == 415, (path, content_type, refused.text)
            assert error_of(refused)["code"] == "unsupported_media_type"
    assert "pinned" in served_names(url)
    ok = call(url, "/v1/chat/completions", chat_body(),
              content_type="Application/JSON; charset=utf-8")
    assert ok.status_code == 200, ok.text


def test_a_host_header_not_naming_the_server_is_refused(served):
    url, port = served[0].url, served[0].port
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example",
                 "127.0.0.1.evil.example"):
        refused = call(url, "/v1/models", method="GET", host=host)
        assert refused.status_code == 400 and error_of(refused)["code"] == "invalid_host", host
        assert call(url, "/health", method="GET", host=host).status_code == 400
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}",
                 f"app.localhost:{port}"):
        assert call(url, "/v1/models", method="GET", host=host).status_code == 200, host
    with side_server(served, allowed_hosts=["box.lan"]) as side:
        assert call(side.url, "/v1/models", method="GET", host="box.lan:1").status_code == 200
        assert call(side.url, "/v1/models", method="GET", host="evil.lan").status_code == 400
    assert not host_allowed("evil.example", []) and host_allowed("evil.example", ["*"])


def test_no_cors_unless_an_origin_is_named(served):
    url, port = served[0].url, served[0].port
    evil = "http://evil.example"
    preflight = httpx.options(url + "/v1/chat/completions", headers={
        "Origin": evil, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert "access-control-allow-origin" not in preflight.headers
    listed = call(url, "/v1/models", method="GET", origin=evil)
    assert "access-control-allow-origin" not in listed.headers
    cross = call(url, "/v1/chat/completions", chat_body(), origin=evil)
    assert cross.status_code == 403 and error_of(cross)["param"] == "Origin"
    same = call(url, "/v1/chat/completions", chat_body(), origin=f"http://127.0.0.1:{port}")
    assert same.status_code == 200
    app = "http://app.example"
    with side_server(served, cors_origins=[app]) as side:
        preflight = httpx.options(side.url + "/v1/chat/completions", headers={
            "Origin": app, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == app
        allowed = call(side.url, "/v1/chat/completions", chat_body(), origin=app)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == app
        assert call(side.url, "/v1/chat/completions", chat_body(),
                    origin=evil).status_code == 403


def test_the_bearer_scheme_in_any_case_and_the_open_routes_say_so(served):
    url = served[0].url
    for header in (f"bearer {KEY}", f"BEARER {KEY}", f"Bearer  {KEY}"):
        response = httpx.get(url + "/v1/models", headers={"Authorization": header})
        assert response.status_code == 200, header
    for header in (f"Basic {KEY}", KEY, "Bearer", f"Bearer {KEY}x", ""):
        response = httpx.get(url + "/v1/models", headers={"Authorization": header})
        assert response.status_code == 401, header
    health = httpx.get(url + "/health")
    assert health.status_code == 200 and "/v1 routes need one" in health.json()["access"]
    assert health.headers["x-access"].startswith("open")
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["x-access"].startswith("open")


def test_the_served_set_changes_only_when_enabled_and_never_loses_start_up_adapters(served):
    url = served[0].url
    pinned = call(url, "/v1/unload_lora_adapter", {"lora_name": "pinned"})
    assert pinned.status_code == 403 and error_of(pinned)["code"] == "pinned"
    assert call(url, "/v1/unload_lora_adapter", {"lora_name": "pinned"},
                key=None).status_code == 401
    assert call(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "one"},
                key=None).status_code == 401
    with side_server(served, adapter_dir=None, api_key=None) as fixed:
        for path, body in (("/v1/unload_lora_adapter", {"lora_name": "pinned"}),
                           ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "one"})):
            refused = call(fixed.url, path, body, key=None)
            assert refused.status_code == 403, refused.text
            assert "--adapter-dir" in error_of(refused)["message"]
    assert "pinned" in served_names(url) and "x" not in served_names(url)


def test_paths_under_the_adapter_dir_are_resolved_file_by_file(served):
    server, allowed, outside = served
    url = server.url
    (allowed / "linked").symlink_to(outside / "secret", target_is_directory=True)
    mixed = allowed / "mixed"
    mixed.mkdir()
    (mixed / "adapter_config.json").write_bytes((allowed / "one/adapter_config.json")
                                                .read_bytes())
    (mixed / "adapter_model.safetensors").symlink_to(outside / "secret/adapter_model.safetensors")
    nested = allowed / "nested"
    nested.mkdir()
    (nested / "inner").symlink_to(outside / "secret", target_is_directory=True)
    inside = allowed / "inside"
    inside.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (inside / f).symlink_to(allowed / "one" / f)  # a link that stays inside is fine
    for name, path in (("a", "linked"), ("b", "mixed"), ("c", "nested"),
                       ("d", str(outside / "secret")), ("e", "../outside/secret")):
        refused = call(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        assert refused.status_code == 403, (path, refused.text)
        assert "outside the allowed --adapter-dir" in error_of(refused)["message"]
    crowded = allowed / "crowded"
    crowded.mkdir()
    for i in range(1001):
        (crowded / f"f{i}").touch()
    refused = call(url, "/v1/load_lora_adapter", {"lora_name": "f", "lora_path": "crowded"})
    assert refused.status_code == 400 and "holds over 1000" in error_of(refused)["message"]
    ok = call(url, "/v1/load_lora_adapter", {"lora_name": "inside", "lora_path": "inside"})
    assert ok.status_code == 200, ok.text
    assert call(url, "/v1/unload_lora_adapter", {"lora_name": "inside"}).status_code == 200


# ------------------------------------------------------------------------------------------------
# 2. Bounded under load and abuse
# ------------------------------------------------------------------------------------------------


class SlowTokenizer:
    """The real tokenizer, but encode_chat waits for a gate (a long prompt being tokenized)."""

    def __init__(self, tokenizer, gate: threading.Event) -> None:
        self.tokenizer, self.gate, self.entered = tokenizer, gate, threading.Event()

    def encode_chat(self, *args, **kw):
        self.entered.set()
        assert self.gate.wait(timeout=30)
        return self.tokenizer.encode_chat(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_tokenizing_happens_off_the_event_loop(served):
    gate = threading.Event()
    slow = SlowTokenizer(served[0].state.tokenizer, gate)
    with side_server(served, tokenizer=slow) as side, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(call, side.url, "/v1/chat/completions", chat_body())
        assert slow.entered.wait(timeout=30)
        health = httpx.get(side.url + "/health", timeout=5)  # the loop answers meanwhile
        assert health.status_code == 200
        gate.set()
        assert pending.result().status_code == 200


def raw(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Sends a byte of trickle every 0.2 s; True when the server closes the connection (or
    answers and closes) within `seconds`."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        if trickle:
            try:
                sock.sendall(trickle[:1])
            except OSError:
                return True
            trickle = trickle[1:] or b"X"
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_slow_headers_slow_bodies_and_idle_connections_are_timed_out(served):
    with side_server(served, read_timeout=1.0, keep_alive=1) as side:
        header = raw(side.port)
        assert closed_within(header, 4, b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100)
        body = raw(side.port)
        body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Length: 1000\r\n\r\n{\"model\":")
        assert closed_within(body, 4)
        idle = raw(side.port)
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(0.2)
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        assert closed_within(idle, 4)  # keep-alive 1 s
        huge = raw(side.port)  # a header past h11's 16 KiB
        huge.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000)
        time.sleep(0.2)  # still unfinished past 16 KiB: refused before the rest comes
        with contextlib.suppress(OSError):
            huge.sendall(b"\r\n\r\n")
        huge.settimeout(10)
        assert huge.recv(65536).startswith(b"HTTP/1.1 400")
        huge.close()
        piped = raw(side.port)  # two requests in one send: both answered
        piped.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                      b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        piped.settimeout(10)
        answers = b""
        while (chunk := piped.recv(65536)):
            answers += chunk
        assert answers.count(b"HTTP/1.1 200") == 2
        piped.close()
        fast = raw(side.port)  # a client that sends at once is answered
        fast.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        fast.settimeout(10)
        assert fast.recv(65536).startswith(b"HTTP/1.1 200")
        for s in (header, body, idle, fast):
            s.close()


def test_past_the_connection_cap_a_new_connection_gets_503_and_is_closed(served):
    with side_server(served, max_connections=4, read_timeout=30) as side:
        held = [raw(side.port) for _ in range(4)]
        time.sleep(0.3)
        extra = raw(side.port)
        extra.settimeout(10)
        answer = extra.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer.lower()
        assert b"too_many_connections" in answer
        for s in held:
            s.close()
        extra.close()
        wait_for(lambda: httpx.get(side.url + "/health").status_code == 200, 10)


def hold_engine(engine) -> threading.Event:
    """Blocks the engine between two steps until the returned event is set."""
    gate = threading.Event()
    engine.call(gate.wait)
    wait_for(lambda: engine._calls.qsize() == 0)
    return gate


def test_past_max_queue_a_503_with_retry_after(served):
    url, engine = served[0].url, served[0].state.engine
    gate = hold_engine(engine)
    try:
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(call, url, "/v1/chat/completions", chat_body())
                       for _ in range(2)]
            wait_for(lambda: engine.waiting() == 2)
            busy = call(url, "/v1/chat/completions", chat_body())
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert error_of(busy)["code"] == "queue_full"
            many = call(url, "/v1/chat/completions", chat_body(n=3))
            assert many.status_code == 503
            gate.set()
            assert [f.result().status_code for f in waiting] == [200, 200]
    finally:
        gate.set()


def test_two_concurrent_loads_of_one_new_name_one_wins_the_other_409(served):
    url, engine = served[0].url, served[0].state.engine
    gate = hold_engine(engine)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(call, url, "/v1/load_lora_adapter",
                                {"lora_name": "race", "lora_path": "one"})
            wait_for(lambda: "race" in served[0].state.loading)
            second = call(url, "/v1/load_lora_adapter",
                          {"lora_name": "race", "lora_path": "two"})
            assert second.status_code == 409 and error_of(second)["code"] == "conflict"
            gate.set()
            assert first.result().status_code == 200
    finally:
        gate.set()
    assert served[0].state.adapters["race"].endswith("one")
    assert call(url, "/v1/load_lora_adapter",
                {"lora_name": "race", "lora_path": "two"}).status_code == 409
    assert call(url, "/v1/unload_lora_adapter", {"lora_name": "race"}).status_code == 200


def answer_of(url: str, model: str) -> str:
    reply = call(url, "/v1/chat/completions", chat_body(model, max_tokens=12))
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def test_max_loras_evicts_the_least_recently_used_and_reloads_it_on_demand(served):
    server, allowed, _ = served
    url = server.url
    engine = served[0].state.engine
    names = [f"many{i}" for i in range(12)]  # 12 names over 3 folders, one slot left
    for i, name in enumerate(names):
        loaded = call(url, "/v1/load_lora_adapter",
                      {"lora_name": name, "lora_path": ["one", "two", "three"][i % 3]})
        assert loaded.status_code == 200, loaded.text
        assert len(engine.resident()) <= 2
    assert set(names) <= set(served_names(url))
    assert set(engine.resident()) == {"pinned", names[-1]}
    tokenizer = served[0].state.tokenizer
    reference = load_model(BASE_MODEL)
    ids, _ = tokenizer.encode_chat(QUESTION, add_generation_prompt=True)
    eos = [tokenizer.im_end_id, tokenizer.eos_token_id]
    want = {}
    for folder in ("one", "two"):
        load_adapter(reference, allowed / folder, name=folder)
        set_active(reference, [folder])
        want[folder] = tokenizer.decode(generate(reference, ids, max_new_tokens=12,
                                                 eos_token_id=eos))
    assert want["one"] != want["two"]
    for name, folder in ((names[0], "one"), (names[1], "two"), (names[0], "one")):
        assert answer_of(url, name) == want[folder]  # read back from its folder on demand
        assert name in engine.resident() and len(engine.resident()) <= 2
    for name in names:
        assert call(url, "/v1/unload_lora_adapter", {"lora_name": name}).status_code == 200
    assert engine.resident() == ["pinned"]


def test_an_evicted_adapter_whose_folder_left_fails_alone(served):
    server, allowed, outside = served
    url = server.url
    gone = allowed / "gone"
    gone.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (gone / f).write_bytes((allowed / "one" / f).read_bytes())
    for name, path in (("leaver", "gone"), ("filler", "two")):  # filler evicts leaver
        assert call(url, "/v1/load_lora_adapter",
                    {"lora_name": name, "lora_path": path}).status_code == 200
    for f in gone.iterdir():
        f.unlink()
    (gone / "adapter_model.safetensors").symlink_to(outside / "secret/adapter_model.safetensors")
    refused = call(url, "/v1/chat/completions", chat_body("leaver"))
    assert refused.status_code == 403, refused.text
    assert answer_of(url, "filler")
    for name in ("leaver", "filler"):
        assert call(url, "/v1/unload_lora_adapter", {"lora_name": name}).status_code == 200


# ------------------------------------------------------------------------------------------------
# Start-up: one line each, exit 2, before the model is loaded
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(cli_serve, "load_base", refuse)


def test_start_up_mistakes_are_one_line_and_exit_2(no_model, capsys, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cases = [(["--port", "99999"], "--port 99999: expected a port number from 0 to 65535"),
             (["--port", "-1"], "--port -1"),
             (["--max-batch", "1000000"], "--max-batch: expected 1 to 1024"),
             (["--host", "no-such-host.invalid"], "--host no-such-host.invalid"),
             (["--port", str(port)], "pick another --port"),
             (["--max-queue", "-1"], "--max-queue"),
             (["--read-timeout", "0"], "--read-timeout"),
             (["--prefill-chunk", "-1"], "--prefill-chunk"),
             (["--max-loras", "1", "--adapter", "a=x", "--adapter", "b=y"], "--max-loras 1"),
             (["--max-loras", "1", "--adapter", "a=x", "--adapter-dir", str(tmp_path)],
              "run-time adapters need room"),
             (["--cors-origin", "*"], "--cors-origin *")]
    try:
        for argv, says in cases:
            assert main(["serve", *argv]) == 2, argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and says in err, (argv, err)
            assert "Traceback" not in err
    finally:
        busy.close()


def test_generation_config_defaults_are_read_and_checked(tmp_path):
    from minilora.core.errors import ConfigError
    from minilora.serve.app import served_defaults

    assert served_defaults(tmp_path) == ({}, [])
    (tmp_path / "generation_config.json").write_text(
        '{"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 64, '
        '"repetition_penalty": 1.1, "do_sample": true}')
    assert served_defaults(tmp_path) == (
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 64},
        ["repetition_penalty"])
    (tmp_path / "generation_config.json").write_text('{"temperature": 9}')
    with pytest.raises(ConfigError, match="temperature"):
        served_defaults(tmp_path)


def test_help_names_every_new_flag(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--allowed-hosts", "--cors-origin", "--max-loras", "--max-queue",
                 "--read-timeout", "--keep-alive", "--max-connections", "--generation-config"):
        assert flag in out


# ------------------------------------------------------------------------------------------------
# The same cases from a real browser: a page of another origin, and DNS rebinding
# ------------------------------------------------------------------------------------------------

ATTACK = """<!doctype html><html><body><script>
const api = "http://127.0.0.1:%(port)d";
const results = {};
async function attempt(name, url, init) {
  try { const r = await fetch(url, init); results[name] = init.mode === "no-cors" ? "sent"
          : "read " + r.status + " " + (await r.text()).slice(0, 80); }
  catch (e) { results[name] = "blocked: " + e.name; }
}
(async () => {
  const unload = JSON.stringify({lora_name: "victim"});
  await attempt("no_cors_unload", api + "/v1/unload_lora_adapter",
                {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                 body: unload});
  await attempt("cors_unload", api + "/v1/unload_lora_adapter",
                {method: "POST", headers: {"Content-Type": "application/json"}, body: unload});
  await attempt("cors_models", api + "/v1/models", {});
  document.body.dataset.results = JSON.stringify(results);
})();
</script></body></html>"""


def test_from_a_browser_a_foreign_page_cannot_unload_and_a_rebound_name_is_refused(
        served, tmp_path):
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from selenium.webdriver.support.ui import WebDriverWait
    from test_serve import chromium_driver, free_port

    server, allowed, _ = served
    # the risky setup: no API key, run-time changes on, an adapter loaded at run time
    with side_server(served, api_key=None) as side:
        loaded = call(side.url, "/v1/load_lora_adapter",
                      {"lora_name": "victim", "lora_path": "one"}, key=None)
        assert loaded.status_code == 200, loaded.text
        page = (ATTACK % {"port": side.port}).encode()

        class Evil(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args):
                pass

        evil_port = free_port()
        evil = ThreadingHTTPServer(("127.0.0.1", evil_port), Evil)
        threading.Thread(target=evil.serve_forever, daemon=True).start()
        browser = chromium_driver(tmp_path / "profile",
                                  "--host-resolver-rules=MAP evil.test 127.0.0.1")
        try:
            browser.get(f"http://evil.test:{evil_port}/")  # a site the user happens to visit
            WebDriverWait(browser, 30).until(
                lambda b: b.execute_script("return document.body.dataset.results"))
            results = json.loads(browser.execute_script("return document.body.dataset.results"))
            assert results["no_cors_unload"] == "sent"  # the browser sent it; the server refused
            assert results["cors_unload"].startswith("blocked")  # no CORS: the preflight fails
            assert results["cors_models"].startswith("blocked")
            assert "victim" in served_names(side.url)  # still loaded
            # DNS rebinding: the attacker's name now points at this machine; the server
            # refuses a Host it does not answer to, so the page reads nothing
            browser.get(f"http://evil.test:{side.port}/v1/models")
            assert "invalid_host" in browser.page_source and "victim" not in browser.page_source
            browser.get(f"http://localhost:{side.port}/v1/models")  # the user's own page
            assert "victim" in browser.page_source
        finally:
            browser.quit()
            evil.shutdown()
        assert call(side.url, "/v1/unload_lora_adapter", {"lora_name": "victim"},
                    key=None).status_code == 200


def test_the_command_reads_generation_config_and_says_what_it_does_not_apply(
        monkeypatch, capsys, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(BASE_MODEL, model)
    (model / "generation_config.json").write_text(
        '{"temperature": 0.0, "max_new_tokens": 7, "repetition_penalty": 1.3}')
    seen = {}

    def capture(app, sock, args):
        seen["defaults"] = app.state.serve.defaults
        seen["allowed"] = app.state.serve.allowed_hosts

    monkeypatch.setattr(cli_serve, "run_server", capture)
    assert main(["serve", "--model", str(model), "--port", "0"]) == 0
    assert seen["defaults"] == {"temperature": 0.0, "max_tokens": 7}
    assert socket.gethostname() in seen["allowed"]
    err = capsys.readouterr().err
    assert "repetition_penalty, which this server does not apply" in err
    assert main(["serve", "--model", str(model), "--port", "0",
                 "--generation-config", "none"]) == 0
    assert seen["defaults"] == {}
