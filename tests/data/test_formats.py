"""Alpaca, ShareGPT, JSON arrays, Parquet and data folders read as the same samples as the chat
jsonl written out by hand; bad records name file, line and field."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import tiny_model, write_jsonl
from minilora.cli import main
from minilora.core.errors import DataError, MissingExtra
from minilora.data.sft import load_jsonl
from minilora.model.io import save_model

ALPACA = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5."},
    {"instruction": "Reverse the word.", "input": "cat", "output": "tac",
     "system": "You are terse."},
]
# The same conversations by hand: the input after a blank line, the system first.
ALPACA_AS_CHAT = [
    [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "2 + 3 = 5."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Reverse the word.\n\ncat"},
     {"role": "assistant", "content": "tac"}],
]
SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be kind."},
                       {"from": "human", "value": "Who made you?"},
                       {"from": "gpt", "value": "The minilora team made me."}]},
    {"conversations": [{"from": "human", "value": "Say hello."},
                       {"from": "gpt", "value": "Hello!"}]},
]
SHAREGPT_AS_CHAT = [
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Who made you?"},
     {"role": "assistant", "content": "The minilora team made me."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
]


def rows_of(dataset) -> list[tuple[list[int], list[int]]]:
    return [(s.input_ids, s.labels) for s in dataset.samples]


def reference(tok, tmp_path: Path, chats: list[list[dict]]) -> list:
    path = write_jsonl(tmp_path / "reference.jsonl", [{"conversations": c} for c in chats])
    return rows_of(load_jsonl(path, tok, 512))


@pytest.mark.parametrize("layout", ["jsonl", "json-array", "parquet"])
@pytest.mark.parametrize("name", ["alpaca", "sharegpt"])
def test_formats_read_as_the_chats_they_mean(tok, tmp_path: Path, name: str, layout: str):
    records, chats = (ALPACA, ALPACA_AS_CHAT) if name == "alpaca" else (SHAREGPT, SHAREGPT_AS_CHAT)
    if layout == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", records)
    elif layout == "json-array":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        keys = list(dict.fromkeys(k for r in records for k in r))  # from_pylist: row 0's only
        pq.write_table(pa.table({k: [r.get(k) for r in records] for k in keys}), path)
    dataset = load_jsonl(path, tok, 512)
    assert rows_of(dataset) == reference(tok, tmp_path, chats)
    assert dataset.stats.formats == {str(path): {name: len(records)}}


def test_folder_reads_every_file_in_name_order(tok, tmp_path: Path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", SHAREGPT)
    (folder / "a.json").write_text(json.dumps(ALPACA), encoding="utf-8")
    (folder / "notes.txt").write_text("not data", encoding="utf-8")
    dataset = load_jsonl(folder, tok, 512)
    assert rows_of(dataset) == reference(tok, tmp_path, ALPACA_AS_CHAT + SHAREGPT_AS_CHAT)
    assert list(dataset.stats.formats) == [str(folder / "a.json"), str(folder / "b.jsonl")]


def test_a_folder_file_with_nothing_left_is_named_even_after_a_good_one(tok, tmp_path: Path):
    # Each file of a folder is checked on its own: b.jsonl keeps no sample (every line bad,
    # skipped), which an earlier good file must not hide.
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(ALPACA), encoding="utf-8")
    (folder / "b.jsonl").write_text("{not json\n[1]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.jsonl: no valid line \(2 skipped\)"):
        load_jsonl(folder, tok, 512, skip_bad=True)


@pytest.mark.parametrize("records, field, message", [
    ([ALPACA[0], {"instruction": "x"}], "output", "needs instruction and output"),
    ([SHAREGPT[1], {"conversations": [{"from": "bot", "value": "x"}]}],
     "conversations[0].from", "unknown speaker 'bot'"),
    ([ALPACA[0], {"instruction": "x", "output": 3}], "output", "expected a string"),
])
def test_bad_record_in_an_array_names_file_line_and_field(tok, tmp_path: Path, records, field,
                                                          message):
    path = tmp_path / "d.json"
    text = json.dumps(records, indent=1)
    path.write_text(text, encoding="utf-8")
    # the second item opens on the second line that is just " {"
    line = [i for i, x in enumerate(text.splitlines(), 1) if x == " {"][1]
    with pytest.raises(DataError, match=message) as info:
        load_jsonl(path, tok, 512)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), line, field)


def test_broken_json_array_names_its_line(tok, tmp_path: Path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"text": "a"},\n {"text": oops}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_jsonl(path, tok, 512)
    assert info.value.line == 3


def test_parquet_without_pyarrow_names_the_extra(tok, tmp_path: Path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    # the hint for an install, or (here, in a clone's editable install) the clone's command
    hint = r"pip install ('minilora\[parquet\]'|-e '\.\[parquet\]')"
    with pytest.raises(MissingExtra, match=hint):
        load_jsonl(path, tok, 512)


def test_cli_trains_on_a_folder_and_prints_each_detected_format(tok, tmp_path: Path, capsys):
    save_model(tiny_model(tok.vocab_size), tmp_path / "base")
    tok.save(tmp_path / "base")
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "1-alpaca.jsonl", ALPACA * 4)
    (folder / "2-sharegpt.json").write_text(json.dumps(SHAREGPT * 4), encoding="utf-8")
    code = main(["train", "--model", str(tmp_path / "base"), "--data", str(folder), "--out",
                 str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "4"])
    assert code == 0
    err = capsys.readouterr().err
    assert f"data: {folder / '1-alpaca.jsonl'}: alpaca (8 records)" in err
    assert f"data: {folder / '2-sharegpt.json'}: sharegpt (8 records)" in err
