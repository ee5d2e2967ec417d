"""minilora.data.sft: jsonl reading, the assistant-only loss mask, errors, collate and packing."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from helpers import CHATS, TEXTS, chat_rows, write_jsonl
from minilora.data import sft as data
from minilora.data.sft import IGNORE_INDEX, DataError, batch_indices, collate, load_jsonl


def trained_spans(sample):
    """The runs of consecutive trained positions, as lists of token ids."""
    spans, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_mask_trains_exactly_the_assistant_replies(tok, tmp_path):
    chat = CHATS[2]  # user, assistant, user, assistant
    path = write_jsonl(tmp_path / "one.jsonl", [{"conversations": chat}])
    (sample,) = load_jsonl(path, tok, 512).samples
    ids, mask = tok.encode_chat(chat)
    assert sample.input_ids == ids
    assert sample.labels == [IGNORE_INDEX] + [t if m else IGNORE_INDEX for t, m in
                                              zip(ids[1:], mask[1:], strict=True)]
    replies = [m["content"] for m in chat if m["role"] == "assistant"]
    spans = trained_spans(sample)
    assert [tok.decode(s, skip_special_tokens=False) for s in spans] == [
        r + "<|im_end|>" for r in replies
    ]
    assert all(s[-1] == tok.im_end_id for s in spans)
    untrained = tok.decode(
        [t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab == IGNORE_INDEX],
        skip_special_tokens=False,
    )
    for m in chat:
        if m["role"] != "assistant":
            assert m["content"] in untrained


def test_conversations_and_messages_read_the_same(tok, tmp_path):
    a = load_jsonl(write_jsonl(tmp_path / "a.jsonl", chat_rows("conversations")), tok, 512)
    b = load_jsonl(write_jsonl(tmp_path / "b.jsonl", chat_rows("messages")), tok, 512)
    assert [s.input_ids for s in a.samples] == [s.input_ids for s in b.samples]
    assert [s.labels for s in a.samples] == [s.labels for s in b.samples]
    assert a.stats.samples == len(CHATS) and a.stats.dropped_untrained == 0


def test_plain_text_trains_every_token_but_the_first(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    ds = load_jsonl(path, tok, 512)
    for text, s in zip(TEXTS, ds.samples, strict=True):
        body = tok.encode(text)
        specials = [i for i in (tok.bos_token_id,) if i is not None]
        assert s.input_ids[: len(specials) + len(body)] == specials + body
        assert s.labels[0] == IGNORE_INDEX and s.labels[1:] == s.input_ids[1:]


def test_truncation_cuts_and_drops_samples_left_untrained(tok, tmp_path):
    long_prompt = {"role": "user", "content": "word " * 200}
    chats = CHATS + [[long_prompt, {"role": "assistant", "content": "ok"}]]
    ds = load_jsonl(write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in chats]), tok, 40)
    masks = [tok.encode_chat(c)[1] for c in chats]
    kept = [c for c, m in zip(chats, masks, strict=True) if any(m[1:40])]
    assert len(kept) < len(chats)  # the long prompt at least
    assert ds.stats.dropped_untrained == len(chats) - len(kept)
    assert ds.stats.truncated == sum(len(m) > 40 for m in masks)
    assert ds.stats.samples == len(ds) == len(kept)
    for chat, sample in zip(kept, ds.samples, strict=True):
        assert sample.input_ids == tok.encode_chat(chat)[0][:40]


def test_every_sample_truncated_away_is_an_error(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "word " * 50},
                          {"role": "assistant", "content": "ok"}]}]
    with pytest.raises(DataError, match=r"no sample has a trained token.*max_seq_len=8"):
        load_jsonl(write_jsonl(tmp_path / "d.jsonl", rows), tok, 8)


GOOD = {"conversations": CHATS[1]}
BAD_LINES = {
    "not json": ('{"conversations": [', None, "not valid JSON"),
    "not an object": ("[1, 2]", None, "expected a JSON object"),
    "no conversations": ({"turns": []}, None,
                         "no 'conversations', 'messages', 'instruction' or 'text'"),
    "conversations not a list": ({"conversations": "hi"}, "conversations", "non-empty list"),
    "empty conversation": ({"messages": []}, "messages", "an empty list"),
    "turn not an object": ({"messages": ["hi"]}, "messages[0]", "expected an object"),
    "missing role": ({"messages": [{"content": "hi"}]}, "messages[0].role", "missing"),
    "unknown role": (
        {"conversations": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
        "conversations[1].role",
        "unknown role 'bot'; expected one of system, user, assistant",
    ),
    "content not a string": (
        {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "expected a string"
    ),
    "content a list": (
        {"messages": [{"role": "assistant", "content": [{"type": "text"}]}]},
        "messages[0].content",
        "a list, expected a string",
    ),
    "text not a string": ({"text": None}, "text", "a null, expected a string"),
    "not utf-8": (b'{"text": "caf\xe9"}', None, "not UTF-8"),
    "lone surrogate": (
        r'{"messages": [{"role": "assistant", "content": "a\ud800"}]}',
        "messages[0].content",
        r"unpaired surrogate \ud800 at character 1",
    ),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, None, "nested too deeply"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_line_names_file_line_and_field(tok, tmp_path, case):
    bad, field, expected = BAD_LINES[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(DataError) as info:
        load_jsonl(path, tok, 512)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 3, field)
    assert str(err).startswith(f"{path}:3: ")
    assert expected in str(err)
    if field:
        assert f"field '{field}'" in str(err)


def test_overlong_line_is_refused_without_reading_it(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 300)
    path = write_jsonl(tmp_path / "long.jsonl", [GOOD, {"text": "x" * 500}, {"text": "ok"}])
    with pytest.raises(DataError, match=r"long\.jsonl:2: line longer than 300 bytes"):
        load_jsonl(path, tok, 512)
    ds = load_jsonl(path, tok, 512, skip_bad=True)
    assert (ds.stats.skipped_bad, len(ds)) == (1, 2)  # the line after it is read whole


def test_skip_bad_skips_and_counts(tok, tmp_path):
    rows = [GOOD] + [BAD_LINES[c][0] for c in ("not json", "unknown role", "not utf-8")] + [GOOD]
    ds = load_jsonl(write_jsonl(tmp_path / "mixed.jsonl", rows), tok, 512, skip_bad=True)
    assert len(ds) == 2
    assert (ds.stats.lines, ds.stats.skipped_bad) == (5, 3)
    assert [e.split(": ")[0] for e in ds.stats.errors] == [
        f"{tmp_path / 'mixed.jsonl'}:{n}" for n in (2, 3, 4)
    ]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty", "the file is empty"),
        ("blank lines", "the file is empty"),
        ("no assistant", "no conversation has an assistant turn"),
        ("missing", "file not found"),
        ("folder", "is a folder"),
        ("all bad", r"no valid line \(2 skipped\)"),
    ],
)
def test_file_level_errors_even_with_skip_bad(tok, tmp_path, case, expected):
    path = tmp_path / "f.jsonl"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "blank lines":
        path.write_bytes(b"\n  \n\n")
    elif case == "no assistant":
        write_jsonl(path, [{"messages": [{"role": "user", "content": "hi"}]}] * 2)
    elif case == "folder":
        path.mkdir()
    elif case == "all bad":
        write_jsonl(path, ["{", "[]"])
    with pytest.raises(DataError, match=expected) as info:
        load_jsonl(path, tok, 512, skip_bad=True)
    assert str(info.value).startswith(str(path))


def test_collate_pads_to_the_longest_sample(tok, tmp_path):
    ds = load_jsonl(write_jsonl(tmp_path / "d.jsonl", chat_rows()), tok, 512)
    picked = [0, 3, 4]
    lengths = [len(ds[i].input_ids) for i in picked]
    batch = ds.collate(picked)
    assert batch.input_ids.shape == (3, max(lengths)) and max(lengths) < 512
    assert batch.tokens == sum(lengths)
    assert batch.trained_tokens == int((batch.labels != IGNORE_INDEX).sum())
    for row, n in enumerate(lengths):
        assert batch.input_ids[row, n:].eq(ds.pad_id).all()
        assert batch.labels[row, n:].eq(IGNORE_INDEX).all()
        assert batch.input_ids[row, :n].tolist() == ds[picked[row]].input_ids


def trained_pairs(rows):
    """(previous token, trained label) pairs: what a loss actually trains."""
    return Counter(
        (r.input_ids[i - 1], r.labels[i])
        for r in rows
        for i in range(1, len(r.labels))
        if r.labels[i] != IGNORE_INDEX
    )


def split_segments(rows):
    """The samples of packed rows, cut apart again by their segment numbers."""
    out = []
    for r in rows:
        for seg in sorted(set(r.segments)):
            at = [i for i, g in enumerate(r.segments) if g == seg]
            assert at == list(range(at[0], at[-1] + 1))  # a sample is one contiguous run
            out.append(([r.input_ids[i] for i in at], [r.labels[i] for i in at]))
    return out


@pytest.mark.parametrize("max_seq_len", [16, 29, 64])
def test_packing_keeps_every_sample_whole(tok, tmp_path, max_seq_len):
    rows = chat_rows(repeat=3) + [{"text": t} for t in TEXTS]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    plain = load_jsonl(path, tok, max_seq_len)
    packed = load_jsonl(path, tok, max_seq_len, pack=True)
    assert packed.packed and packed.stats == plain.stats
    assert len(packed.samples) <= len(plain.samples)
    if max_seq_len == 64:  # room for several samples a row (shorter rows hold one each)
        assert len(packed.samples) < len(plain.samples)
    assert all(len(r.input_ids) <= max_seq_len for r in packed.samples)
    assert all(len(r.segments) == len(r.input_ids) for r in packed.samples)
    assert sorted(split_segments(packed.samples)) == sorted(
        (s.input_ids, s.labels) for s in plain.samples)


def test_packing_never_trains_across_a_sample_boundary():
    a = data.Sample([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = data.Sample([8, 9], [IGNORE_INDEX, 9])
    (row,) = data.pack_samples([a, b], 8)
    assert row.input_ids == [5, 6, 7, 8, 9]
    assert row.labels == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]  # 7 -> 8 is not trained
    assert row.segments == [1, 1, 1, 2, 2]


def test_packing_is_first_fit_and_splits_nothing():
    long = data.Sample(list(range(6)), [IGNORE_INDEX] + list(range(1, 6)))
    mid = data.Sample([30, 31, 32, 33], [IGNORE_INDEX, 31, 32, 33])
    short = data.Sample([40, 41], [IGNORE_INDEX, 41])
    rows = data.pack_samples([long, mid, short], 8)
    assert [r.input_ids for r in rows] == [list(range(6)) + [40, 41], [30, 31, 32, 33]]
    assert rows[0].segments == [1] * 6 + [2, 2]
    batch = data.collate(rows, pad_id=0)
    assert batch.segment_ids.tolist() == [[1] * 6 + [2, 2], [1, 1, 1, 1, 0, 0, 0, 0]]
    assert data.collate([long], pad_id=0).segment_ids is None  # unpacked rows carry none


def test_batch_order_is_deterministic_and_resumable():
    first = batch_indices(23, 4, seed=1, epoch=0)
    assert first == batch_indices(23, 4, seed=1, epoch=0)
    assert first != batch_indices(23, 4, seed=1, epoch=1)
    assert first != batch_indices(23, 4, seed=2, epoch=0)
    assert len(first) == 5 and all(len(b) == 4 for b in first)
    flat = [i for b in first for i in b]
    assert len(set(flat)) == 20 and set(flat) <= set(range(23))


def test_collate_of_hand_made_samples():
    batch = collate([data.Sample([1, 2], [IGNORE_INDEX, 2]), data.Sample([3], [IGNORE_INDEX])], 0)
    assert batch.input_ids.tolist() == [[1, 2], [3, 0]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 2], [IGNORE_INDEX, IGNORE_INDEX]]
    assert (batch.tokens, batch.trained_tokens) == (3, 1)


@pytest.mark.parametrize("name", ["pipe.json", "pipe.parquet"])
def test_a_fifo_is_refused_before_any_reader_opens_it(tok, tmp_path, name):
    import os
    import threading

    fifo = tmp_path / name
    os.mkfifo(fifo)
    caught: list[BaseException] = []

    def load() -> None:
        try:
            load_jsonl(fifo, tok, 64)
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            caught.append(err)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(20)  # opening a FIFO for reading blocks until a writer comes
    if reader.is_alive():  # release the blocked reader: a writer that opens and closes
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(20)
        pytest.fail(f"{name}: opened and blocked instead of refused")
    assert len(caught) == 1 and isinstance(caught[0], DataError)
    assert "is not a regular file" in str(caught[0]) and name in str(caught[0])


# The same bad conversation through the three readers that take one: each names the same field.
BAD_CONVERSATIONS = [
    ("hi", "messages"),
    (["hi"], "messages[0]"),
    ([{"role": "user"}], "messages[0]"),  # the eval reader wants exactly role and content
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": "a\ud800"}], "messages[0].content"),
]


@pytest.mark.parametrize("turns,field", BAD_CONVERSATIONS)
def test_data_tasks_and_tokenizer_name_the_same_field(tok, tmp_path, turns, field):
    from minilora.data.tasks import TaskError, parse_sample

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": turns}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_jsonl(path, tok, 512)
    data_field = info.value.field
    with pytest.raises(TaskError, match=re.escape(f"field {field!r}")):
        parse_sample({"task": "t", "messages": turns, "expected": "x", "match": "exact"})
    with pytest.raises(ValueError, match=re.escape(data_field)):
        tok.encode_chat(turns)
    assert data_field.startswith(field)
