"""The OpenAI request fields `minilora serve` implements (n, logprobs/top_logprobs, seed, stop,
max_completion_tokens, stream_options, generation_config.json defaults), the ones it refuses by
name, and /v1/models' lineage fields; logprobs checked against transformers' own forward."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch
from test_serve import Server, error_of, write_adapter

from minilora.adapters.folder import load_adapter
from minilora.cli import BASE_MODEL
from minilora.data.tokenizer import Tokenizer
from minilora.model.io import load_model
from minilora.serve.app import ServeState
from minilora.serve.engine import Engine

QUESTION = "What is your name?"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("openai")
    alpha = write_adapter(load_model(BASE_MODEL), root, "alpha", 1, ["q_proj", "v_proj"])
    tokenizer = Tokenizer.from_file(BASE_MODEL)
    model = load_model(BASE_MODEL)
    load_adapter(model, alpha, name="alpha")
    state = ServeState(Engine(model, tokenizer, max_batch=8), tokenizer, "base",
                       adapters={"alpha": str(alpha)})
    with Server(state) as server:
        yield server, alpha
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0,
                         timeout=60)


def chat(client, **kw):
    kw = {"model": "base", "messages": [{"role": "user", "content": QUESTION}],
          "max_tokens": 12, "temperature": 0, **kw}
    return client.chat.completions.create(**kw)


def post(served, path: str, body: dict) -> httpx.Response:
    return httpx.post(served[0].url + path, json=body, timeout=60)


def test_n_choices_each_seeded_choice_0_is_the_n_1_answer(client):
    many = chat(client, n=3, temperature=1.0, seed=5, max_tokens=16)
    assert [c.index for c in many.choices] == [0, 1, 2]
    one = chat(client, temperature=1.0, seed=5, max_tokens=16)
    assert many.choices[0].message.content == one.choices[0].message.content
    assert len({c.message.content for c in many.choices}) > 1  # sampled apart
    second = chat(client, temperature=1.0, seed=6, max_tokens=16)
    assert many.choices[1].message.content == second.choices[0].message.content
    assert many.usage.completion_tokens == sum(
        chat(client, temperature=1.0, seed=s, max_tokens=16).usage.completion_tokens
        for s in (5, 6, 7))
    assert many.usage.prompt_tokens == one.usage.prompt_tokens
    stream = chat(client, n=2, temperature=1.0, seed=5, max_tokens=16, stream=True,
                  stream_options={"include_usage": True})
    texts, finished = ["", ""], set()
    chunks = list(stream)
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert texts == [c.message.content for c in many.choices[:2]] and finished == {0, 1}
    assert chunks[-1].usage.completion_tokens == sum(
        c.usage.completion_tokens for c in (one, second))


def reference_logprobs(ids: list[int], answer: list[int]) -> torch.Tensor:
    """log softmax of transformers' Llama over the prompt + answer: (len(answer), V)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(BASE_MODEL).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids + answer])).logits[0, len(ids) - 1:-1]  # (T, V)
    return torch.log_softmax(logits.double(), dim=-1)


def test_logprobs_and_top_logprobs_match_transformers(served, client):
    tokenizer = served[0].state.tokenizer
    reply = chat(client, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    answer = tokenizer.encode(reply.choices[0].message.content)
    assert len(content) == len(answer) == reply.usage.completion_tokens
    ids, _ = tokenizer.encode_chat([{"role": "user", "content": QUESTION}],
                                   add_generation_prompt=True)
    want = reference_logprobs(ids, answer)
    for t, entry in enumerate(content):
        assert math.isclose(entry.logprob, want[t, answer[t]].item(), abs_tol=1e-4), t
        assert bytes(entry.bytes).decode() == entry.token
        top = want[t].topk(3)
        assert [x.token for x in entry.top_logprobs] == [
            tokenizer.decode([i], skip_special_tokens=False) for i in top.indices.tolist()]
        for x, value in zip(entry.top_logprobs, top.values.tolist(), strict=True):
            assert math.isclose(x.logprob, value, abs_tol=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest
    assert chat(client).choices[0].logprobs is None  # not asked: none
    text = client.completions.create(model="base", prompt="The quick brown", max_tokens=6,
                                     temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert "".join(lp.tokens) == text.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(chosen, abs=1e-5)
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    streamed = chat(client, logprobs=True, top_logprobs=1, stream=True)
    tokens = [t for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for t in chunk.choices[0].logprobs.content]
    assert [t.logprob for t in tokens] == pytest.approx([t.logprob for t in content], abs=1e-6)


def test_seed_stop_and_max_completion_tokens(client):
    a = chat(client, temperature=1.0, seed=11, max_tokens=20).choices[0].message.content
    b = chat(client, temperature=1.0, seed=11, max_tokens=20).choices[0].message.content
    assert a == b
    greedy = chat(client).choices[0].message.content
    assert "Pico" in greedy
    stopped = chat(client, stop=["Pico"]).choices[0]
    assert stopped.message.content == greedy[:greedy.index("Pico")]
    assert stopped.finish_reason == "stop"
    short = chat(client, max_tokens=None, max_completion_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_ignore_eos_answers_max_tokens_through_both_endpoints(client):
    """vLLM's extra field, sent the way its clients send it (extra_body)."""
    ended = chat(client, max_tokens=60)
    assert ended.choices[0].finish_reason == "stop"  # the premise: it ends on its own
    n = ended.usage.completion_tokens + 5
    going = chat(client, max_tokens=n, extra_body={"ignore_eos": True})
    assert going.usage.completion_tokens == n and going.choices[0].finish_reason == "length"
    assert going.choices[0].message.content.startswith(ended.choices[0].message.content)
    text = client.completions.create(model="base", prompt="Once upon a time", max_tokens=n,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert text.usage.completion_tokens == n


def test_stream_options_only_with_a_stream(served):
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}],
            "stream_options": {"include_usage": True}}
    refused = post(served, "/v1/chat/completions", body)
    assert refused.status_code == 400 and error_of(refused)["param"] == "stream_options"
    bad = post(served, "/v1/chat/completions", {**body, "stream": True,
                                                 "stream_options": {"include_usage": "yes"}})
    assert bad.status_code == 400


UNIMPLEMENTED = [
    ("response_format", {"type": "json_object"}), ("tools", [{"type": "function", "function": {
        "name": "f", "parameters": {}}}]), ("tool_choice", "auto"), ("frequency_penalty", 0.5),
    ("presence_penalty", 1), ("logit_bias", {"5": 10}), ("user", "me"), ("store", True),
    ("audio", {"voice": "x"}), ("made_up_field", 1), ("top_logprobs", 2), ("n", 0),
    ("logprobs", 3), ("top_k", "many"), ("ignore_eos", "yes"), ("ignore_eos", 1),
]


@pytest.mark.parametrize("field,value", UNIMPLEMENTED)
def test_an_unimplemented_field_is_refused_by_name(served, field, value):
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            field: value}
    refused = post(served, "/v1/chat/completions", body)
    assert refused.status_code == 400, refused.text
    assert error_of(refused)["param"] == field and field in error_of(refused)["message"]


def test_fields_that_ask_for_nothing_are_accepted(served):
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": None, "tools": [],
            "response_format": {"type": "text"}, "tool_choice": "none", "user": None, "n": 1,
            "ignore_eos": None}
    assert post(served, "/v1/chat/completions", body).status_code == 200
    message = {"role": "user", "content": "hi", "tool_calls": []}
    refused = post(served, "/v1/chat/completions", {**body, "messages": [message]})
    assert refused.status_code == 400 and "tool_calls" in error_of(refused)["message"]
    for field, value in (("echo", True), ("suffix", "x"), ("best_of", 3)):
        refused = post(served, "/v1/completions", {"model": "base", "prompt": "a", field: value})
        assert refused.status_code == 400 and error_of(refused)["param"] == field


def test_models_list_each_adapter_with_its_parent_and_root(served, client):
    cards = {m.id: m for m in client.models.list().data}
    assert cards["base"].model_extra["parent"] is None
    assert cards["alpha"].model_extra["parent"] == "base"
    assert cards["alpha"].model_extra["root"] == str(served[1])


def test_generation_config_defaults_apply_when_a_request_leaves_them_out(served, client):
    state = served[0].state
    side = ServeState(state.engine, state.tokenizer, "base", adapters=state.adapters,
                      defaults={"temperature": 0, "max_tokens": 5})
    with Server(side, own_engine=False) as server:
        plain = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "base", "messages": [{"role": "user", "content": QUESTION}]}).json()
        assert plain["usage"]["completion_tokens"] == 5
        explicit = chat(client, max_tokens=5)
        assert plain["choices"][0]["message"]["content"] == explicit.choices[0].message.content
        told = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "base", "max_tokens": 7, "temperature": 1.0, "seed": 1,
            "messages": [{"role": "user", "content": QUESTION}]}).json()
        assert told["usage"]["completion_tokens"] <= 7  # the request's own values win
        assert json.dumps(told) != json.dumps(plain)


def test_chunked_prefill_gives_the_same_answers_through_http(served, client):
    from concurrent.futures import ThreadPoolExecutor

    questions = [QUESTION, "Add 12 and 30.", "Reverse the word minilora.", "Tell me a story."]
    cases = [(q, m) for q in questions for m in ("base", "alpha")]

    def answers() -> list[str]:
        with ThreadPoolExecutor(len(cases)) as pool:
            return list(pool.map(lambda c: chat(client, model=c[1], messages=[
                {"role": "user", "content": c[0]}], max_tokens=10).choices[0].message.content,
                cases))

    engine = served[0].state.engine
    whole = answers()
    engine.prefill_chunk = 3  # read between steps: the next step feeds prompts 3 at a time
    try:
        chunked = answers()
    finally:
        engine.prefill_chunk = None
    assert chunked == whole
    assert len(set(whole)) > 2
