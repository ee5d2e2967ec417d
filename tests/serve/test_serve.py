"""`minilora serve` through the official `openai` client, against a server on a free localhost
port: chat, streaming, models, per-request adapters (equal to `minilora generate`), run-time
adapter loading, every error status, hostile bodies, a bounded load test."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx  # make test installs the serve extra and httpx: a missing one fails, not skips
import openai
import pytest
import torch
import uvicorn

from helpers import add_random_adapter
from minilora.adapters.folder import load_adapter, save_adapter
from minilora.cli import BASE_MODEL, main
from minilora.cli import serve as cli_serve
from minilora.data.tokenizer import Tokenizer
from minilora.decoding.generation import generate
from minilora.lora.named import delete_adapter, set_active
from minilora.model.io import load_model
from minilora.serve.app import MAX_BODY, APIError, ServeState, _allowed_path, create_app
from minilora.serve.engine import Engine
from minilora.serve.listen import server_config

KEY = "test-key"
QUESTIONS = ["What is your name?", "Add 12 and 30.", "Reverse the word minilora.",
             "Upper-case the word serving."]
# name -> (seed, targets): adapters whose B is not zero, so their answers differ from the base's
ADAPTERS = {"alpha": (1, ["q_proj", "v_proj", "down_proj"]), "beta": (2, "all-linear"),
            "gamma": (3, ["o_proj", "up_proj"]), "delta": (4, ["k_proj", "gate_proj"])}
LATE = "epsilon"  # loaded at run time from --adapter-dir


def write_adapter(model, folder: Path, name: str, seed: int, targets) -> Path:
    add_random_adapter(model, name, seed, targets)
    save_adapter(model, folder / name, name=name)
    delete_adapter(model, name)
    return folder / name


def wait_for(condition, seconds: float = 30) -> None:
    """Polls until condition() holds (a bound on waiting, not a timing claim)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn server (minilora serve's configuration) in a thread over an engine in another;
    with own_engine=False the engine is another server's (started and stopped there)."""

    def __init__(self, state: ServeState, own_engine: bool = True, read_timeout: float = 10.0,
                 keep_alive: int = 5, max_connections: int = 256) -> None:
        self.state, self.own_engine = state, own_engine
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = server_config(create_app(state), read_timeout=read_timeout,
                               keep_alive=keep_alive, max_connections=max_connections,
                               log_level="error", host="127.0.0.1", port=self.port)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        if self.own_engine:
            self.state.engine.start()
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("the test server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.own_engine:
            self.state.engine.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The adapters on disk, the server, and the answers `generate` gives alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds waiting
    root = tmp_path_factory.mktemp("serve")
    adapter_dir = root / "allowed"
    adapter_dir.mkdir()
    maker = load_model(BASE_MODEL)
    paths = {n: write_adapter(maker, root, n, *spec) for n, spec in ADAPTERS.items()}
    paths[LATE] = write_adapter(maker, adapter_dir, LATE, 5, "all-linear")
    with torch.no_grad():  # another base: the same shapes, another fingerprint
        maker.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    write_adapter(maker, adapter_dir, "foreign", 6, ["q_proj"])

    tokenizer = Tokenizer.from_file(BASE_MODEL)
    model = load_model(BASE_MODEL)
    for name in ADAPTERS:
        load_adapter(model, paths[name], name=name)
    state = ServeState(Engine(model, tokenizer, max_batch=32), tokenizer, "base",
                       adapters={n: str(paths[n]) for n in ADAPTERS}, api_key=KEY,
                       adapter_dir=adapter_dir)
    with Server(state) as server:
        yield server, paths, tokenizer, adapter_dir
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(setup):
    return openai.OpenAI(base_url=setup[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def expected(setup):
    """(question, model) -> the greedy answer of `generate` alone (a model of its own)."""
    _, paths, tokenizer, _ = setup
    model = load_model(BASE_MODEL)
    for name, path in paths.items():
        load_adapter(model, path, name=name)
    eos = [tokenizer.im_end_id, tokenizer.eos_token_id]
    out = {}
    for name in ["base", *paths]:
        set_active(model, [] if name == "base" else [name])
        for q in QUESTIONS:
            ids, _ = tokenizer.encode_chat([{"role": "user", "content": q}],
                                           add_generation_prompt=True)
            out[q, name] = tokenizer.decode(generate(model, ids, max_new_tokens=16,
                                                     eos_token_id=eos))
    return out


def ask(client, model: str, question: str, **kw):
    kw = {"temperature": 0, "max_tokens": 16, **kw}
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], **kw)


def post(setup, path: str, body, key: str | None = KEY, content_type="application/json",
         **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content_type:
        headers["Content-Type"] = content_type
    headers.update(kw.pop("headers", {}))
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    return httpx.post(setup[0].url + path, content=body, headers=headers, timeout=60, **kw)


# ------------------------------------------------------------------------------------------------


def test_models_health_and_a_chat_with_the_base(setup, client):
    assert [m.id for m in client.models.list().data] == ["base", *ADAPTERS]
    assert httpx.get(setup[0].url + "/health").json()["status"] == "ok"
    reply = ask(client, "base", "What is your name?", max_tokens=32)
    assert "Pico" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    tokenizer = setup[2]
    ids, _ = tokenizer.encode_chat([{"role": "user", "content": "What is your name?"}],
                                   add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(tokenizer.encode(
        reply.choices[0].message.content))


def test_each_request_gets_its_adapter_exactly_as_minilora_generate(setup, client, capsys):
    _, paths, _, _ = setup
    cases = [(q, m) for q in QUESTIONS[:2] for m in ("base", "alpha", "beta")]
    with ThreadPoolExecutor(len(cases)) as pool:  # all in one batch
        replies = list(pool.map(lambda c: ask(client, c[1], c[0]), cases))
    answers = {c: r.choices[0].message.content for c, r in zip(cases, replies, strict=True)}
    assert len({answers[QUESTIONS[0], m] for m in ("base", "alpha", "beta")}) == 3
    for (q, m), answer in answers.items():
        argv = ["generate", q, "--max-new-tokens", "16", "--temperature", "0"]  # greedy, as ask
        if m != "base":
            argv += ["--adapter", f"{m}={paths[m]}"]
        assert main(argv) == 0
        assert answer + "\n" == capsys.readouterr().out, (q, m)


def test_streaming_equals_the_whole_answer_and_ends_with_done(setup, client, expected):
    stream = ask(client, "gamma", QUESTIONS[3], stream=True,
                 stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected[QUESTIONS[3], "gamma"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    raw = post(setup, "/v1/chat/completions", {
        "model": "gamma", "stream": True, "max_tokens": 4,
        "messages": [{"role": "user", "content": QUESTIONS[3]}]})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_text_completions(setup, client):
    tokenizer = setup[2]
    prompt = "The quick brown"
    reply = client.completions.create(model="base", prompt=prompt, max_tokens=8,
                                      temperature=0)
    model = load_model(BASE_MODEL)
    want = tokenizer.decode(generate(model, tokenizer.encode(prompt), max_new_tokens=8,
                                     eos_token_id=[tokenizer.im_end_id,
                                                   tokenizer.eos_token_id]))
    assert reply.choices[0].text == want
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))


def test_load_and_unload_while_other_requests_stream(setup, client, expected):
    server, paths, tokenizer, adapter_dir = setup
    engine = server.state.engine
    sampling = {"temperature": 1.0, "max_tokens": 120}
    results, started = {}, [threading.Event() for _ in range(3)]

    def stream_alpha(i: int) -> None:
        pieces = []
        for chunk in ask(client, "alpha", QUESTIONS[i], seed=i, stream=True, **sampling):
            pieces.append(chunk.choices[0].delta.content or "")
            started[i].set()
        results[i] = "".join(pieces)

    threads = [threading.Thread(target=stream_alpha, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for event in started:
        assert event.wait(timeout=60)
    loaded = post(setup, "/v1/load_lora_adapter",
                  {"lora_name": LATE, "lora_path": str(paths[LATE])})
    assert loaded.status_code == 200, loaded.text
    assert engine.rows  # the streams were still being decoded when the adapter came in
    assert LATE in [m.id for m in client.models.list().data]
    late = ask(client, LATE, QUESTIONS[0]).choices[0].message.content
    assert late == expected[QUESTIONS[0], LATE]
    gone = post(setup, "/v1/unload_lora_adapter", {"lora_name": LATE})
    assert gone.status_code == 200, gone.text
    with pytest.raises(openai.NotFoundError):
        ask(client, LATE, QUESTIONS[0])
    for t in threads:
        t.join(timeout=60)
    # sampled with a seed: the same answer `generate` samples alone
    model = load_model(BASE_MODEL)
    load_adapter(model, paths["alpha"], name="alpha")
    eos = [tokenizer.im_end_id, tokenizer.eos_token_id]
    for i in range(3):
        ids, _ = tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[i]}],
                                       add_generation_prompt=True)
        want = generate(model, ids, max_new_tokens=120, eos_token_id=eos, temperature=1.0,
                        seed=i)
        assert results[i] == tokenizer.decode(want)
    # a relative lora_path is read under --adapter-dir
    again = post(setup, "/v1/load_lora_adapter", {"lora_name": LATE, "lora_path": LATE})
    assert again.status_code == 200, again.text
    assert post(setup, "/v1/unload_lora_adapter", {"lora_name": LATE}).status_code == 200


def test_an_adapter_still_serving_after_unload_cannot_be_reloaded_until_free(setup):
    server, paths, _, _ = setup
    engine = server.state.engine
    spec = {"lora_name": LATE, "lora_path": LATE}
    assert post(setup, "/v1/load_lora_adapter", spec).status_code == 200
    body = {"model": LATE, "stream": True, "max_tokens": 100, "temperature": 1.0, "seed": 3,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        next(events), next(events)  # the role, then the first token: it is being decoded
        gate = threading.Event()
        engine.call(gate.wait)  # hold the engine between two steps: the row stays running
        wait_for(lambda: engine._calls.qsize() == 0)  # the engine is waiting at the gate
        with ThreadPoolExecutor(2) as pool:
            unload = pool.submit(post, setup, "/v1/unload_lora_adapter", {"lora_name": LATE})
            wait_for(lambda: engine._calls.qsize() == 1)  # the unload waits behind the gate
            load = pool.submit(post, setup, "/v1/load_lora_adapter", spec)
            wait_for(lambda: engine._calls.qsize() == 2)  # and the load behind it
            gate.set()
            assert unload.result().status_code == 200
            busy = load.result()
        assert busy.status_code == 409 and error_of(busy)["code"] == "conflict"
    wait_for(lambda: not engine.is_unloading(LATE))  # the row leaves, then the adapter goes
    assert post(setup, "/v1/load_lora_adapter", spec).status_code == 200
    assert post(setup, "/v1/unload_lora_adapter", {"lora_name": LATE}).status_code == 200


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_every_error_status_through_the_client(setup, client):
    with pytest.raises(openai.NotFoundError) as err:
        ask(client, "no-such-model", "hi")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        ask(openai.OpenAI(base_url=setup[0].url + "/v1", api_key="wrong", max_retries=0),
            "base", "hi")
    with pytest.raises(openai.BadRequestError) as err:  # prompt longer than the context
        ask(client, "base", "word " * 1200)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        ask(client, "base", "hi", max_tokens=5000)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="base", messages=[])
    assert post(setup, "/v1/models", {}, key=None).status_code == 401
    too_big = post(setup, "/v1/chat/completions", b"x" * (MAX_BODY + 1))
    assert too_big.status_code == 413 and error_of(too_big)["code"] == "body_too_large"


def test_run_time_loading_is_confined_to_the_adapter_dir(setup, tmp_path):
    _, paths, tokenizer, adapter_dir = setup
    outside = post(setup, "/v1/load_lora_adapter",
                   {"lora_name": "x", "lora_path": str(paths["alpha"])})
    assert outside.status_code == 403, outside.text
    climbing = post(setup, "/v1/load_lora_adapter",
                    {"lora_name": "x", "lora_path": "../alpha"})
    assert climbing.status_code == 403
    foreign = post(setup, "/v1/load_lora_adapter",
                   {"lora_name": "foreign", "lora_path": "foreign"})
    assert foreign.status_code == 400 and "another base" in error_of(foreign)["message"]
    missing = post(setup, "/v1/load_lora_adapter", {"lora_name": "y", "lora_path": "nothing"})
    assert missing.status_code == 400
    taken = post(setup, "/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": "foreign"})
    assert taken.status_code == 409
    unknown = post(setup, "/v1/unload_lora_adapter", {"lora_name": "zeta"})
    assert unknown.status_code == 404
    refused = ServeState(setup[0].state.engine, tokenizer, "base")  # no --adapter-dir
    with pytest.raises(APIError) as err:
        _allowed_path(refused, str(adapter_dir / LATE))
    assert err.value.status == 403


HOSTILE = [
    (b"not json", 400), (b"", 400), (b"[1, 2]", 400), (b"\xff\xfe{", 400),
    (b"[" * 100000 + b"]" * 100000, 400),
    ({"model": "base"}, 400),
    ({"model": "base", "messages": "hi"}, 400),
    ({"model": "base", "messages": []}, 400),
    ({"model": "base", "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ({"model": "base", "messages": [{"role": "user", "content": 5}]}, 400),
    ({"model": "base", "messages": [{"role": "user"}]}, 400),
    ({"model": "base", "messages": ["hi"]}, 400),
    ({"model": "base", "messages": [{"role": "user", "content": "\ud800"}]}, 400),
    ({"model": 5, "messages": [{"role": "user", "content": "hi"}]}, 400),
    ({"model": "ghost", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ({"model": "base", "max_tokens": -1, "messages": [{"role": "user", "content": "hi"}]}, 400),
    ({"model": "base", "max_tokens": 10**12, "messages": [{"role": "user", "content": "h"}]},
     400),
    ({"model": "base", "max_tokens": "9", "messages": [{"role": "user", "content": "hi"}]}, 400),
    ({"model": "base", "max_tokens": True, "messages": [{"role": "user", "content": "hi"}]},
     400),
    ({"model": "base", "temperature": "hot", "messages": [{"role": "user", "content": "h"}]},
     400),
    ({"model": "base", "temperature": 1e308, "messages": [{"role": "user", "content": "h"}]},
     400),
    ({"model": "base", "top_p": 0, "messages": [{"role": "user", "content": "hi"}]}, 400),
    ({"model": "base", "seed": 1.5, "messages": [{"role": "user", "content": "hi"}]}, 400),
    ({"model": "base", "stop": ["a", "b", "c", "d", "e"],
      "messages": [{"role": "user", "content": "hi"}]}, 400),
    ({"model": "base", "stop": [""], "messages": [{"role": "user", "content": "hi"}]}, 400),
    ({"model": "base", "stream": "yes", "messages": [{"role": "user", "content": "hi"}]}, 400),
    ({"model": "base", "n": 17, "messages": [{"role": "user", "content": "hi"}]}, 400),
    (b'{"model": "base", "messages": [{"role": "user", "content": "' + b"a" * (10 << 20)
     + b'"}]}', 413),
]


def test_hostile_bodies_get_json_errors_and_the_server_still_answers(setup, client, expected):
    for body, status in HOSTILE:
        response = post(setup, "/v1/chat/completions", body)
        assert response.status_code == status, (str(body)[:80], response.text[:200])
        error_of(response)
    for path, body in [("/v1/completions", {"model": "base", "prompt": 7}),
                       ("/v1/completions", {"model": "base", "prompt": ""}),
                       ("/v1/load_lora_adapter", {"lora_name": "../x", "lora_path": "x"}),
                       ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": 3}),
                       ("/v1/unload_lora_adapter", [])]:
        response = post(setup, path, body)
        assert 400 <= response.status_code < 500, (path, body)
        error_of(response)
    assert httpx.get(setup[0].url + "/v1/chat/completions",
                     headers={"Authorization": f"Bearer {KEY}"}).status_code == 405
    assert error_of(httpx.get(setup[0].url + "/nowhere"))["code"] == "not_found"
    reply = ask(client, "delta", QUESTIONS[1])
    assert reply.choices[0].message.content == expected[QUESTIONS[1], "delta"]


def test_a_client_that_leaves_mid_stream_frees_its_row(setup):
    server = setup[0]
    body = {"model": "beta", "stream": True, "max_tokens": 900, "temperature": 2.0, "seed": 1,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert len(server.state.engine.rows) == 1
    for _ in range(200):  # the row goes at the next step; bounded wait, not a timing claim
        if not server.state.engine.rows:
            break
        time.sleep(0.05)
    assert server.state.engine.rows == []


def test_load_32_clients_over_4_adapters_all_answered_correctly(setup, client, expected):
    models = list(ADAPTERS)
    jobs = [(QUESTIONS[(c + r) % 4], models[c % 4]) for c in range(32) for r in range(3)]

    def one_client(c: int) -> list[str]:
        return [ask(client, m, q).choices[0].message.content for q, m in jobs[c * 3:c * 3 + 3]]

    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(one_client, c) for c in range(32)]
        answers = [a for f in futures for a in f.result(timeout=120)]
    assert answers == [expected[job] for job in jobs]
    health = httpx.get(setup[0].url + "/health").json()
    assert (health["status"], health["running"], health["waiting"]) == ("ok", 0, 0)


def test_cli_without_the_serve_extra_names_it(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)  # import uvicorn fails
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[serve]'" in err  # a clone's hint


def test_cli_refuses_a_missing_adapter_dir(capsys, tmp_path):
    assert main(["serve", "--adapter-dir", str(tmp_path / "none")]) == 2
    assert "--adapter-dir" in capsys.readouterr().err


def test_cli_serve_end_to_end(setup, monkeypatch):
    """`minilora serve` as the command line builds it; uvicorn.run is given a real server on a
    free port, which the checks talk to before it is told to stop."""
    _, paths, _, _ = setup
    port = free_port()
    checked = []

    def run_and_check(app, sock, args):
        config = server_config(app, read_timeout=args.read_timeout, keep_alive=args.keep_alive,
                               max_connections=args.max_connections, log_level="error")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            wait_for(lambda: server.started)
            url = f"http://127.0.0.1:{port}"
            local = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            assert [m.id for m in local.models.list().data] == ["base", "alpha"]
            reply = ask(local, "base", "What is your name?", max_tokens=32)
            assert "Pico" in reply.choices[0].message.content
            page = httpx.get(url + "/")
            script = page.text.split("<script>")[1]
            assert page.status_code == 200 and "http" not in script  # no CDN: all in the page
            refused = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "alpha"})
            assert refused.status_code == 403  # no --adapter-dir: the served set is fixed
            refused = httpx.post(url + "/v1/load_lora_adapter",
                                 json={"lora_name": "x", "lora_path": str(paths["beta"])})
            assert refused.status_code == 403  # no --adapter-dir: run-time loading is off
            checked.append(True)
        finally:
            server.should_exit = True
            thread.join(timeout=30)

    monkeypatch.setattr(cli_serve, "run_server", run_and_check)
    assert main(["serve", "--port", str(port), "--adapter", f"alpha={paths['alpha']}",
                 "--max-batch", "4"]) == 0
    assert checked == [True]


def chromium_driver(profile: Path, *extra: str):
    """Debian's chromium, headless, driven by its own chromedriver (nothing downloaded); extra
    command-line flags appended."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("chromium and chromium-driver are not installed (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run",
                 f"--user-data-dir={profile}", *extra):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver),
                            options=options)


def test_chat_page_in_a_headless_browser_shows_base_and_adapter_side_by_side(setup, expected,
                                                                           tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium_driver(tmp_path / "profile")
    try:
        browser.get(setup[0].url + "/")
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("16")
        browser.find_element(By.ID, "prompt").click()  # the key's change event lists models
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "input.model")) == 5)
        for box in browser.find_elements(By.CSS_SELECTOR, "input.model"):
            if box.get_attribute("value") not in ("base", "alpha") and box.is_selected():
                box.click()
        browser.find_element(By.ID, "prompt").send_keys(QUESTIONS[0])
        browser.find_element(By.ID, "send").click()
        answers = {}
        for name in ("base", "alpha"):
            wait.until(lambda b, n=name: b.find_element(By.ID, f"answer-{n}")
                       .get_attribute("data-done") == "1")
            answers[name] = browser.find_element(By.ID, f"answer-{name}").get_attribute(
                "textContent")
        assert answers == {n: expected[QUESTIONS[0], n] for n in ("base", "alpha")}
        assert "Pico" in answers["base"]
        assert len(browser.find_elements(By.CSS_SELECTOR, ".answer")) == 2
    finally:
        browser.quit()
