"""The serving scheduler: requests for different adapters decoded in one batch, joining and
leaving between steps, each answered exactly as `generate` answers it alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import add_random_adapter
from minilora.cli import BASE_MODEL
from minilora.data.tokenizer import Tokenizer
from minilora.decoding.generation import generate
from minilora.lora.named import set_active
from minilora.model.io import load_model
from minilora.model.kv_cache import KVCache
from minilora.serve.engine import Engine, Event, Request, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["What is your name?", "Add 12 and 30.", "Reverse the word minilora.",
             "Upper-case the word serving, please, and then tell me who made you."]


@pytest.fixture(scope="module")
def served():
    model = load_model(BASE_MODEL)
    tokenizer = Tokenizer.from_file(BASE_MODEL)
    add_random_adapter(model, "alpha", 1, ["q_proj", "v_proj", "down_proj"])
    add_random_adapter(model, "beta", 2, "all-linear")
    set_active(model, [])
    return model.eval(), tokenizer


def prompt(tokenizer, question: str) -> list[int]:
    ids, _ = tokenizer.encode_chat([{"role": "user", "content": question}],
                                   add_generation_prompt=True)
    return ids


def reference(model, tokenizer, ids, adapter, max_tokens, **sampling) -> str:
    """What `minilora generate` answers: the single-sequence path, the adapter set active."""
    set_active(model, [] if adapter is None else [adapter])
    try:
        eos = [tokenizer.im_end_id, tokenizer.eos_token_id]
        tokens = generate(model, ids, max_new_tokens=max_tokens, eos_token_id=eos, **sampling)
    finally:
        set_active(model, [])
    return tokenizer.decode(tokens)


class Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def done(self) -> Event | None:
        ends = [e for e in self.events if e.finish_reason or e.error]
        assert len(ends) <= 1
        return ends[0] if ends else None


def submit(engine, tokenizer, question, adapter, max_tokens=24, **params) -> Collector:
    out = Collector()
    engine.submit(Request(prompt(tokenizer, question), adapter,
                          SamplingParams(max_tokens=max_tokens, **params), out))
    return out


def run_until_done(engine, collectors, limit=400) -> None:
    for _ in range(limit):
        if all(c.done for c in collectors):
            return
        engine.step()
    raise AssertionError("the engine did not finish every request")


# 6: the timeline packs and grows mid-answer; chunk 4: prompts fed 4 tokens a step inside the
# decode forward (chunked prefill), beside rows that decode
@pytest.mark.parametrize("slots,chunk", [(256, None), (6, None), (256, 4), (6, 4), (256, 64)])
def test_greedy_answers_equal_generate_whatever_else_is_in_the_batch(served, slots, chunk):
    model, tokenizer = served
    engine = Engine(model, tokenizer, max_batch=8, prefill_chunk=chunk)
    engine.cache = KVCache(model.config, 8, slots)
    cases = [(q, a) for q in QUESTIONS for a in (None, "alpha", "beta")]
    expected = {c: reference(model, tokenizer, prompt(tokenizer, c[0]), c[1], 24) for c in cases}
    # the adapters matter: otherwise equality would prove little
    assert len({expected[(q, a)] for q in QUESTIONS[:1] for a in (None, "alpha", "beta")}) == 3
    collectors = {}
    for i, case in enumerate(cases):  # requests join while others are mid-answer
        collectors[case] = submit(engine, tokenizer, *case)
        for _ in range(i % 3):
            engine.step()
    run_until_done(engine, list(collectors.values()))
    for case, c in collectors.items():
        assert c.text == expected[case], case
        assert c.done.finish_reason in ("stop", "length")
        assert c.done.prompt_tokens == len(prompt(tokenizer, case[0]))
    assert engine.rows == []


def test_more_requests_than_rows_wait_their_turn(served):
    model, tokenizer = served
    engine = Engine(model, tokenizer, max_batch=2)
    collectors = [submit(engine, tokenizer, q, "alpha", max_tokens=6) for q in QUESTIONS]
    engine.step()
    assert len(engine.rows) <= 2 and engine._waiting.qsize() == 2
    run_until_done(engine, collectors)
    for q, c in zip(QUESTIONS, collectors, strict=True):
        assert c.text == reference(model, tokenizer, prompt(tokenizer, q), "alpha", 6)


@pytest.mark.parametrize("chunk", [None, 5])
def test_seeded_sampling_does_not_depend_on_the_batch(served, chunk):
    model, tokenizer = served
    q = QUESTIONS[3]
    want = reference(model, tokenizer, prompt(tokenizer, q), "beta", 16, temperature=0.9,
                     top_p=0.9, seed=7)
    alone = Engine(model, tokenizer, prefill_chunk=chunk)
    c1 = submit(alone, tokenizer, q, "beta", 16, temperature=0.9, top_p=0.9, seed=7)
    run_until_done(alone, [c1])
    crowded = Engine(model, tokenizer, prefill_chunk=chunk)
    others = [submit(crowded, tokenizer, x, None, 16, temperature=1.0, seed=i)
              for i, x in enumerate(QUESTIONS)]
    c2 = submit(crowded, tokenizer, q, "beta", 16, temperature=0.9, top_p=0.9, seed=7)
    run_until_done(crowded, others + [c2])
    assert c1.text == c2.text == want


def test_stop_strings_and_max_tokens(served):
    model, tokenizer = served
    q = QUESTIONS[3]
    full = reference(model, tokenizer, prompt(tokenizer, q), None, 24)
    stop = full[5:8]  # a string the answer reaches
    engine = Engine(model, tokenizer)
    stopped = submit(engine, tokenizer, q, None, 24, stop=["never said", stop])
    short = submit(engine, tokenizer, q, None, 3)
    run_until_done(engine, [stopped, short])
    assert stopped.text == full[: full.index(stop)]
    assert stopped.done.finish_reason == "stop"
    assert short.done.finish_reason == "length" and short.done.completion_tokens == 3
    assert short.text == reference(model, tokenizer, prompt(tokenizer, q), None, 3)


def test_a_cancelled_request_leaves_at_the_next_step_the_others_go_on(served):
    model, tokenizer = served
    engine = Engine(model, tokenizer)
    keep = submit(engine, tokenizer, QUESTIONS[0], "alpha", 20)
    gone = Collector()
    request = Request(prompt(tokenizer, QUESTIONS[1]), "beta", SamplingParams(max_tokens=20),
                      gone)
    engine.submit(request)
    engine.step()
    engine.step()
    assert len(engine.rows) == 2
    request.cancel()
    seen = len(gone.events)
    engine.step()
    assert len(engine.rows) == 1 and len(gone.events) == seen
    run_until_done(engine, [keep])
    assert keep.text == reference(model, tokenizer, prompt(tokenizer, QUESTIONS[0]), "alpha", 20)


def test_a_failing_request_fails_alone(served):
    model, tokenizer = served
    engine = Engine(model, tokenizer)
    good = submit(engine, tokenizer, QUESTIONS[0], "beta", 8)
    engine.step()
    bad = submit(engine, tokenizer, QUESTIONS[1], "no-such-adapter", 8)
    run_until_done(engine, [good, bad])
    assert bad.done.error is not None and "no-such-adapter" in str(bad.done.error)
    assert good.text == reference(model, tokenizer, prompt(tokenizer, QUESTIONS[0]), "beta", 8)


def test_unload_waits_for_the_requests_that_use_the_adapter(served):
    model, tokenizer = served
    add_random_adapter(model, "gamma", 3, "all-linear")
    set_active(model, [])
    engine = Engine(model, tokenizer)
    want = reference(model, tokenizer, prompt(tokenizer, QUESTIONS[2]), "gamma", 12)
    c = submit(engine, tokenizer, QUESTIONS[2], "gamma", 12)
    engine.step()
    assert c.done is None and len(want) > 8  # still running: its answer is a long one
    engine.call(lambda: engine.unload("gamma"))
    engine.step()
    assert "gamma" in model.model.layers[0].self_attn.o_proj.lora_A
    run_until_done(engine, [c])
    engine.step()
    assert c.text == want
    assert "gamma" not in model.model.layers[0].self_attn.o_proj.lora_A


def test_sampling_params_are_checked_all_at_once():
    with pytest.raises(ValueError) as err:
        SamplingParams(max_tokens=0, temperature=-1, top_p=0, stop=[""])
    for word in ("max_tokens", "temperature", "top_p", "stop"):
        assert word in str(err.value)


def test_position_ids_rotate_each_row_at_its_own_positions():
    from helpers import tiny_model
    from minilora.model.kv_cache import KVCache

    model = tiny_model(50).eval()
    ids = torch.tensor([[5, 9, 3, 7, 11]])
    plain = model(ids).logits
    assert torch.equal(model(ids, position_ids=torch.arange(5)[None]).logits, plain)
    # two rows, the second shifted: with the same positions its logits are unchanged
    cache = KVCache(model.config, 1, 5)
    model(ids[:, :4], past_key_values=cache)
    last = model(ids[:, 4:], past_key_values=cache, position_ids=torch.tensor([[4]])).logits
    torch.testing.assert_close(last[0, -1], plain[0, -1])
    # only distances matter (RoPE): shifted positions give the same logits, a gap does not
    shifted = model(ids, position_ids=torch.arange(3, 8)[None]).logits
    torch.testing.assert_close(shifted, plain)
    gap = model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 9]])).logits
    assert not torch.allclose(gap[0, -1], plain[0, -1])


def test_the_chat_templates_end_of_turn_ends_an_answer(tmp_path):
    # a Llama-3 vocabulary has no <|im_end|>: the engine stops at the template's <|eot_id|>, as
    # generate and chat do (tokenizer.stop_token_ids)
    import importlib.util

    from helpers import tiny_model

    # the templates' tokenizers live beside the data room's tests (imported by path: this file
    # may run without that folder on sys.path)
    path = Path(__file__).resolve().parents[1] / "data" / "test_chat_template.py"
    spec = importlib.util.spec_from_file_location("chat_template_tests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    write_tokenizer = module.write_tokenizer

    tokenizer = Tokenizer.from_file(write_tokenizer(tmp_path / "llama3", "llama3"))
    eot = tokenizer.token_to_id("<|eot_id|>")
    assert eot is not None and tokenizer.token_to_id("<|im_end|>") is None
    model = tiny_model(tokenizer.vocab_size).eval()

    class SaysEot(torch.nn.Module):  # a head whose every next token is <|eot_id|>
        def forward(self, h):
            logits = torch.zeros(*h.shape[:-1], tokenizer.vocab_size, dtype=h.dtype)
            logits[..., eot] = 1.0
            return logits

    model.lm_head = SaysEot()
    engine = Engine(model, tokenizer)
    out = submit(engine, tokenizer, QUESTIONS[0], None, 10)
    run_until_done(engine, [out])
    assert out.done.finish_reason == "stop"
    assert out.done.completion_tokens <= 1 and out.text == ""


def test_max_loras_one_slot_requests_for_two_adapters_take_turns(served, tmp_path):
    from minilora.adapters.folder import load_adapter, save_adapter

    model, tokenizer = served
    for name in ("alpha", "beta"):
        save_adapter(model, tmp_path / name, name=name)
    fresh = load_model(BASE_MODEL).eval()

    def reload(name: str) -> None:
        load_adapter(fresh, tmp_path / name, name=name)
        set_active(fresh, [])

    engine = Engine(fresh, tokenizer, max_batch=4, max_loras=1, reload=reload)
    engine.add_adapter("alpha", lambda: reload("alpha"))
    # one joining batch: beta evicts the idle alpha, so the alpha requests must wait for it
    order = [("beta", 0), ("alpha", 1), ("beta", 2), ("alpha", 3)]
    collectors = [submit(engine, tokenizer, QUESTIONS[q], a, max_tokens=6) for a, q in order]
    for _ in range(200):
        if all(c.done for c in collectors):
            break
        engine.step()
        assert len(engine.resident()) <= 1
    for (adapter, q), c in zip(order, collectors, strict=True):
        assert c.done.error is None, c.done.error
        assert c.text == reference(model, tokenizer, prompt(tokenizer, QUESTIONS[q]), adapter, 6)


@pytest.mark.parametrize("chunk", [None, 4])
def test_an_adapter_with_lora_on_the_embedding_is_served_in_a_mixed_batch(chunk):
    """LoRA on the embedding routes rows too: each answer equals `generate` alone."""
    from minilora.lora.injection import inject_lora
    from minilora.lora.layer import LoraConfig

    model = load_model(BASE_MODEL).eval()
    tokenizer = Tokenizer.from_file(BASE_MODEL)
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=["embed_tokens", "q_proj"]), "emb")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the embedding's A starts at zero: give it something to add
        a = model.model.embed_tokens.lora_A["emb"].weight
        a.copy_(torch.randn(a.shape, generator=g) * 0.05)
    set_active(model, [])
    cases = [(q, a) for q in QUESTIONS[:2] for a in (None, "emb")]
    expected = {c: reference(model, tokenizer, prompt(tokenizer, c[0]), c[1], 12) for c in cases}
    assert expected[(QUESTIONS[0], None)] != expected[(QUESTIONS[0], "emb")]
    engine = Engine(model, tokenizer, max_batch=4, prefill_chunk=chunk)
    collectors = {c: submit(engine, tokenizer, *c, max_tokens=12) for c in cases}
    run_until_done(engine, list(collectors.values()))
    for case, c in collectors.items():
        assert c.text == expected[case], case


@pytest.mark.parametrize("chunk", [None, 4])
def test_ignore_eos_decodes_past_the_end_of_turn_to_max_tokens(served, chunk):
    """vLLM's ignore_eos: the answer that ended at its end-of-turn token goes on to max_tokens
    (what the serving benchmarks ask, so that every row decodes the same number of tokens)."""
    model, tokenizer = served
    q = QUESTIONS[0]
    ended = Engine(model, tokenizer, prefill_chunk=chunk)
    stops = submit(ended, tokenizer, q, "alpha", 60)
    run_until_done(ended, [stops])
    assert stops.done.finish_reason == "stop"  # the premise: this answer ends on its own
    n = stops.done.completion_tokens + 6
    engine = Engine(model, tokenizer, prefill_chunk=chunk)
    going = submit(engine, tokenizer, q, "alpha", n, ignore_eos=True, logprobs=0)
    beside = submit(engine, tokenizer, q, "alpha", 60)  # the same question, ending as before
    run_until_done(engine, [going, beside])
    assert going.done.finish_reason == "length" and going.done.completion_tokens == n
    assert going.text.startswith(stops.text)
    assert sum(len(e.logprobs) for e in going.events) == n  # the end token's included
    assert beside.text == stops.text and beside.done.finish_reason == "stop"
