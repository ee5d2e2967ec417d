"""The server's OpenAPI document fuzzed with schemathesis: requests that fit the documented
bodies and requests that break them, sent through HTTP to a live server. None may get a 5xx
or hang, every refusal is an OpenAI-shaped JSON error, and the server still answers after."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from test_serve import Server, write_adapter

from minilora.adapters.folder import load_adapter
from minilora.cli import BASE_MODEL
from minilora.data.tokenizer import Tokenizer
from minilora.model.io import load_model
from minilora.serve.app import ServeState, create_app
from minilora.serve.engine import Engine

schemathesis = pytest.importorskip("schemathesis")  # in the test extra: make test installs it
from schemathesis import GenerationMode  # noqa: E402

KEY = "fuzz-key"
EXAMPLES = 40  # per mode: a bounded run (about 10 s), not an exhaustive one


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """A server with a short context (every generated max_tokens is cheap or refused), an API
    key, run-time loading under a folder holding one adapter, and the schema it documents."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fuzz")
    (root / "allowed").mkdir()
    maker = load_model(BASE_MODEL)
    alpha = write_adapter(maker, root, "alpha", 1, ["q_proj"])
    write_adapter(maker, root / "allowed", "late", 2, ["v_proj"])
    tokenizer = Tokenizer.from_file(BASE_MODEL)
    model = load_model(BASE_MODEL)
    load_adapter(model, alpha, name="alpha")
    state = ServeState(Engine(model, tokenizer, max_batch=8, context=48, max_loras=3),
                       tokenizer, "base", adapters={"alpha": str(alpha)}, api_key=KEY,
                       adapter_dir=root / "allowed", max_queue=64)
    with Server(state) as server:
        schema = schemathesis.openapi.from_dict(create_app(state).openapi())
        yield server, schema
    torch.set_num_threads(threads)


def check(server: Server, case) -> int:
    response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                         timeout=30)  # a hang fails here
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"], response.text
    return response.status_code


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_5xx_or_hangs(fuzzed, mode):
    server, schema = fuzzed
    strategy = schema.as_strategy(generation_mode=mode)
    statuses: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case) -> None:
        statuses.append(check(server, case))

    run()
    assert len(statuses) >= EXAMPLES // 2 and any(400 <= s < 500 for s in statuses)
    assert server.state.engine.rows == []  # nothing left running
    health = __import__("httpx").get(server.url + "/health")
    assert health.status_code == 200


def test_the_schema_documents_every_route(fuzzed):
    _, schema = fuzzed
    paths = {op.ok().path for op in schema.get_all_operations()}
    assert paths == {"/", "/health", "/v1/models", "/v1/chat/completions", "/v1/completions",
                     "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
