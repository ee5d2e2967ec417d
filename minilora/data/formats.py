"""The SFT data formats people have, turned into minilora's two: chat messages or plain text.

A record (one JSON object) is one of:

- chat: ``{"conversations" | "messages": [{"role", "content"}, ...]}`` (MiniMind, OpenAI);
- ShareGPT: ``{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...]}``;
- Alpaca: ``{"instruction", "input" (optional), "output", "system" (optional), "history"
  (optional)}``, the input appended to the instruction after a blank line, as Alpaca's own
  prompt does; ``history`` (LLaMA-Factory's multi-turn form) is ``[[instruction, response],
  ...]``, the turns before this one, oldest first;
- text: ``{"text": ...}``.

A record with the keys of two formats (``messages`` beside ``instruction`` or ``text``) is
refused, naming the keys: which one is meant cannot be guessed. An Alpaca record may hold a
``text`` field (tatsu-lab/alpaca's rows hold the prompt written out there): it is not read.

Files hold records as JSON Lines, one JSON array, or (with pyarrow, the ``parquet`` extra) a
Parquet table with one record a row, the form Hugging Face datasets are downloaded in. A JSON
array file is read whole (at most MAX_ARRAY_BYTES) and parsed in one pass; a Parquet file is
read MAX_PARQUET_BATCH rows at a time, and refused before reading when its metadata counts more
than MAX_PARQUET_ROWS rows or a row holds more than MAX_ROW_BYTES of text.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minilora.core.errors import DataError, MissingExtra
from minilora.core.files import read_bounded

FORMATS = ("chat", "sharegpt", "alpaca", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# Bounds of the readers (docs/reliability.md). A JSON Lines file is read a line at a time, each
# line at most 16 MiB (sft.MAX_LINE_BYTES); a JSON array is parsed whole, so its file is bounded;
# a Parquet file compresses (30 million repeated rows fit in 100 KB), so its rows are counted
# from its metadata before anything is read, and read in small batches.
MAX_ARRAY_BYTES = 2 << 30
MAX_PARQUET_ROWS = 10_000_000
MAX_PARQUET_BATCH = 32
MAX_ROW_BYTES = 16 << 20
_CHAT_KEYS = ("conversations", "messages")
_ALPACA_KEYS = ("instruction", "output")


def mixed_formats(obj: dict[str, Any]) -> str | None:
    """What is wrong with a record holding the keys of more than one format (``messages``
    beside ``instruction`` or ``text``, or both chat keys), None when it holds one format's."""
    chat = [k for k in _CHAT_KEYS if k in obj]
    other = [k for k in (*_ALPACA_KEYS, "text") if k in obj]
    if len(chat) > 1 or (chat and other):
        keys = ", ".join(repr(k) for k in chat + other)
        return (f"the keys of more than one format ({keys}); keep one: conversations or "
                "messages (chat), instruction and output (Alpaca), or text")
    return None


def detect(obj: dict[str, Any]) -> str | None:
    """The format of one record (one of FORMATS), None when it is none of them."""
    for key in _CHAT_KEYS:
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
    history = obj.get("history")
    if history is not None and not isinstance(history, list):
        raise fail("expected a list of [instruction, response] pairs", "history")
    for i, pair in enumerate(history or []):  # LLaMA-Factory: the earlier turns, oldest first
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(t, str) for t in pair)):
            raise fail("expected [instruction, response], two strings", f"history[{i}]")
        messages += [{"role": "user", "content": pair[0]},
                     {"role": "assistant", "content": pair[1]}]
    return messages + [{"role": "user", "content": prompt},
                       {"role": "assistant", "content": obj["output"]}]


def data_files(path: Path) -> list[Path]:
    """``path`` itself, or the data files of a folder in name order.

    Files of other suffixes (a README) are left out; hidden entries (``.cache``) too.

    Raises:
        DataError: a folder with no .jsonl, .json or .parquet file, or one holding a sub-folder,
            a link to nothing, or a data file that is not a regular file (each would otherwise
            be left out while the rest trains).
    """
    if not path.is_dir():
        return [path]
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        try:
            mode = entry.stat().st_mode
        except FileNotFoundError:
            raise DataError(entry, "is a link to nothing (its target is missing); fix or remove "
                            "it, or pass the files to train on") from None
        if stat.S_ISDIR(mode):
            raise DataError(entry, "is a folder inside the --data folder; sub-folders are not "
                            "read: move its files up, or pass it as --data itself")
        if entry.suffix in DATA_SUFFIXES and not stat.S_ISREG(mode):
            raise DataError(entry, "is not a regular file (a pipe or a device has no end); "
                            f"expected a {entry.suffix} file")
    files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file()
                   and not p.name.startswith("."))
    if not files:
        raise DataError(path, f"is a folder with no data file; expected {', '.join(DATA_SUFFIXES)} "
                        "files")
    return files


def is_json_array(path: Path) -> bool:
    """Whether a .json file holds one JSON array (else it is read as JSON Lines): its first
    character after any whitespace (however much) and a byte-order mark is ``[``."""
    if path.suffix != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(3)
        if head != b"\xef\xbb\xbf":
            f.seek(0)
        while chunk := f.read(1 << 16):
            rest = chunk.lstrip(b" \t\r\n")
            if rest:
                return rest.startswith(b"[")
    return False


def array_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line where the item starts, item) for each item of a JSON array file.

    The text is parsed in one pass: each item's line number counts only the newlines since the
    previous item (counting from the start of the file for each was quadratic).

    Raises:
        DataError: larger than MAX_ARRAY_BYTES, not UTF-8, not valid JSON (with the line of the
            fault), nested too deeply, or not an array.
    """
    try:
        data = read_bounded(path, MAX_ARRAY_BYTES, "a JSON array file (use JSON Lines for more)")
    except OSError as err:
        raise DataError(path, err.strerror or str(err)) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(path, f"byte {err.start} is not UTF-8; expected UTF-8 text") from None
    del data
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    counted_to, line = 0, 1

    def line_at(index: int) -> int:
        nonlocal counted_to, line
        if index >= counted_to:  # items come in order: count only what is new
            line += text.count("\n", counted_to, index)
            counted_to = index
            return line
        return text.count("\n", 0, index) + 1  # an error position before the last item

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
        except RecursionError:
            raise DataError(path, "an item nested too deeply; expected a JSON array of "
                            "objects", line=line_at(pos)) from None
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
    """(row number from 1, row as a dict) for each row of a Parquet file, read in batches of
    MAX_PARQUET_BATCH rows.

    Raises:
        MissingExtra: pyarrow is not installed.
        DataError: a file pyarrow cannot read, more than MAX_PARQUET_ROWS rows (told by its
            metadata, before any row is read), or a row of more than MAX_ROW_BYTES.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtra("reading Parquet files", "parquet") from None
    try:
        file = pq.ParquetFile(path)
    except Exception as err:  # pyarrow's own error types: a file that is not Parquet
        raise DataError(path, f"cannot read it as Parquet ({err})") from None
    rows = file.metadata.num_rows
    if rows > MAX_PARQUET_ROWS:
        raise DataError(path, f"holds {rows} rows, more than {MAX_PARQUET_ROWS} (a Parquet file "
                        "compresses repeated rows; the samples would not fit in memory); split "
                        "it or train on a part")
    number = 0
    try:
        for batch in file.iter_batches(batch_size=MAX_PARQUET_BATCH):
            if batch.nbytes > MAX_PARQUET_BATCH * MAX_ROW_BYTES:
                raise DataError(path, f"rows {number + 1} .. {number + batch.num_rows} hold "
                                f"{batch.nbytes} bytes; expected rows of at most "
                                f"{MAX_ROW_BYTES} bytes each", line=number + 1)
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except DataError:
        raise
    except Exception as err:  # pyarrow's errors for a damaged row group
        raise DataError(path, f"cannot read it as Parquet ({err})", line=number + 1) from None
