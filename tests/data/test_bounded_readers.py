"""Readers and templates of round three (docs/reliability.md, "The bounds"): what must still
read right once bounded. The refusals themselves are catalogue cases in test_reliability.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from helpers import CHATS, chat_rows, write_jsonl
from minilora.core.errors import DataError
from minilora.data import chat_template
from minilora.data.chat_template import ChatTemplateError, render
from minilora.data.sft import load_jsonl


def test_a_json_array_after_5000_spaces_is_read_as_an_array(tok, tmp_path: Path) -> None:
    rows = chat_rows(repeat=2)
    (tmp_path / "a.json").write_text(" " * 5000 + "\n" + json.dumps(rows, indent=2))
    write_jsonl(tmp_path / "a.jsonl", rows)
    array, lines = load_jsonl(tmp_path / "a.json", tok, 64), load_jsonl(tmp_path / "a.jsonl",
                                                                           tok, 64)
    assert [s.input_ids for s in array.samples] == [s.input_ids for s in lines.samples]


def test_array_items_are_named_by_their_own_line_when_counted_once(tok, tmp_path: Path) -> None:
    """Line numbers come from one pass now: the third item's fault is still on its own line."""
    items = [json.dumps({"conversations": CHATS[1]}), json.dumps({"conversations": CHATS[3]}),
             json.dumps({"conversations": [{"role": "bot", "content": "hi"}]})]
    (tmp_path / "a.json").write_text("[\n" + ",\n\n".join(items) + "\n]\n")
    with pytest.raises(DataError, match=r"a\.json:6: field 'conversations\[0\]\.role'"):
        load_jsonl(tmp_path / "a.json", tok, 64)


def test_alpaca_history_becomes_the_turns_before(tok, tmp_path: Path) -> None:
    """LLaMA-Factory's history: the same tokens as the conversation written out in full."""
    record = {"system": "Be brief.", "instruction": "And 4 and 4?", "output": "4 + 4 = 8.",
              "history": [["Add 2 and 3.", "2 + 3 = 5."]]}
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": "2 + 3 = 5."},
            {"role": "user", "content": "And 4 and 4?"},
            {"role": "assistant", "content": "4 + 4 = 8."}]
    write_jsonl(tmp_path / "alpaca.jsonl", [record])
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    ours = load_jsonl(tmp_path / "alpaca.jsonl", tok, 256).samples[0]
    want = load_jsonl(tmp_path / "chat.jsonl", tok, 256).samples[0]
    assert ours.input_ids == want.input_ids and ours.labels == want.labels


def test_an_alpaca_record_with_its_prompt_in_text_is_read_as_alpaca(tok, tmp_path: Path
                                                                    ) -> None:
    """tatsu-lab/alpaca's rows hold the prompt written out in "text": not ambiguous."""
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Hello",
                                        "text": "### Instruction: Hi ### Response: Hello"}])
    dataset = load_jsonl(tmp_path / "a.jsonl", tok, 64)
    assert dataset.stats.formats[str(tmp_path / "a.jsonl")] == {"alpaca": 1}


def test_nothing_is_raised_after_a_render_returns(monkeypatch) -> None:
    """The watchdog stops a render past its deadline, in whichever thread renders; once a
    render has returned (stopped or not), nothing arrives in its thread later."""
    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.05)
    hang = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    errors: list[str] = []

    def renders() -> None:
        try:
            for _ in range(3):
                with pytest.raises(ChatTemplateError, match="ran past 0.05 seconds"):
                    render(hang, [])
                assert render("{{ messages | length }}", [1, 2]) == "2"
            deadline = time.monotonic() + 0.3  # well past any deadline a render had
            while time.monotonic() < deadline:
                pass
        except BaseException as err:  # noqa: BLE001 (a stray _TooSlow would land here)
            errors.append(repr(err))

    threads = [threading.Thread(target=renders) for _ in range(3)]
    for t in threads:
        t.start()
    renders()
    for t in threads:
        t.join()
    assert errors == []


def test_the_time_bound_stops_a_template_without_output(monkeypatch) -> None:
    """Two nested loops that yield nothing: only the trace on the template's lines sees them."""
    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.1)
    source = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="ran past 0.1 seconds"):
        render(source, [], origin="t.jinja")


@pytest.mark.parametrize("source", [
    "{{ 'ab' * 40000000 }}",  # refused before it is built
    "{{ messages | length * 'x' * 100000000 }}",
    "{{ 'x'.ljust(100000000) }}",  # a method's count
    "{{ '{:>999999999}'.format(1) }}",  # a width in a format string
    "{{ 2 ** 10000000 }}",  # an integer of ten million bits
    "{% set ns = namespace(s='x') %}{% for i in range(30) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}{{ ns.s | length }}",  # + doubling
    "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",  # the output itself
])
def test_values_past_the_size_bound_are_refused(source: str) -> None:
    with pytest.raises(ChatTemplateError, match=r"and was stopped|made an integer"):
        render(source, [{"role": "user", "content": "hi"}])
