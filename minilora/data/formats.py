"""The SFT data formats people have, turned into minilora's two: chat messages or plain text.

A record (one JSON object) is one of:

- chat: ``{"conversations" | "messages": [{"role", "content"}, ...]}`` (MiniMind, OpenAI);
- ShareGPT: ``{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...]}``;
- Alpaca: ``{"instruction", "input" (optional), "output", "system" (optional)}``, the input
  appended to the instruction after a blank line, as Alpaca's own prompt does;
- text: ``{"text": ...}``.

Files hold records as JSON Lines, one JSON array, or (with pyarrow, the ``parquet`` extra) a
Parquet table with one record a row, the form Hugging Face datasets are downloaded in.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minilora.core.errors import DataError, MissingExtra

FORMATS = ("chat", "sharegpt", "alpaca", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def detect(obj: dict[str, Any]) -> str | None:
    """The format of one record (one of FORMATS), None when it is none of them."""
    for key in ("conversations", "messages"):
        turns = obj.get(key)
        if isinstance(turns, list):
            first = next((t for t in turns if isinstance(t, dict)), {})
            return "sharegpt" if "from" in first or "value" in first else "chat"
        if key in obj:
            return "chat"  # a bad value: the chat checks name it
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


def sharegpt_messages(turns: list[Any], fail: Any) -> list[dict[str, Any]]:
    """ShareGPT turns as role/content messages (the values are checked by the chat reader)."""
    messages = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise fail("expected an object with from and value", where)
        for name in ("from", "value"):
            if name not in turn:
                raise fail("missing; expected a string", f"{where}.{name}")
        role = SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise fail(f"unknown speaker {turn['from']!r}; expected one of "
                       f"{', '.join(SHAREGPT_ROLES)}", f"{where}.from")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def alpaca_messages(obj: dict[str, Any], fail: Any) -> list[dict[str, Any]]:
    """An Alpaca record as system (when given), user and assistant messages."""
    for name in ("instruction", "output"):
        if name not in obj:
            raise fail("missing; an Alpaca record needs instruction and output", name)
    for name in ("instruction", "input", "output", "system"):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise fail("expected a string", name)
    prompt = obj["instruction"]
    if obj.get("input"):
        prompt = f"{prompt}\n\n{obj['input']}"
    messages = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
    return messages + [{"role": "user", "content": prompt},
                       {"role": "assistant", "content": obj["output"]}]


def data_files(path: Path) -> list[Path]:
    """``path`` itself, or the data files of a folder in name order.

    Raises:
        DataError: a folder with no .jsonl, .json or .parquet file.
    """
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
    if not files:
        raise DataError(path, f"is a folder with no data file; expected {', '.join(DATA_SUFFIXES)} "
                        "files")
    return files


def is_json_array(path: Path) -> bool:
    """Whether a .json file holds one JSON array (else it is read as JSON Lines)."""
    if path.suffix != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def array_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line where the item starts, item) for each item of a JSON array file.

    Raises:
        DataError: not UTF-8, not valid JSON (with the line of the fault), or not an array.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(path, f"byte {err.start} is not UTF-8; expected UTF-8 text") from None
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1

    def line_at(index: int) -> int:
        return text.count("\n", 0, index) + 1

    def skip(index: int) -> int:
        while index < len(text) and text[index] in " \t\r\n":
            index += 1
        return index

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(path, f"not valid JSON ({err.msg}); expected a JSON array of "
                            "objects", line=line_at(err.pos)) from None
        yield line_at(pos), item
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        raise DataError(path, "expected ',' or ']' between the array's items",
                        line=line_at(pos))


def parquet_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number from 1, row as a dict) for each row of a Parquet file.

    Raises:
        MissingExtra: pyarrow is not installed.
        DataError: a file pyarrow cannot read.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtra("reading Parquet files", "parquet") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow's own error types: a file that is not Parquet
        raise DataError(path, f"cannot read it as Parquet ({err})") from None
    yield from enumerate(table.to_pylist(), 1)
