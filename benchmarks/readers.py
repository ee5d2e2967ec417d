"""How long the data readers take to turn a file into records, JSON array against JSON Lines.

An Alpaca-style file of N records (instruction, input, output; written with ``indent=4`` as
alpaca_data.json is) is read three ways: as JSON Lines (one record a line), as one JSON array
with the array reader before issue 23 (each item's line number counted from the file's start,
quadratic in the file) and with today's (line numbers counted once, in one pass). Only reading
and parsing are timed, not tokenizing: that is the part that differed.

    python benchmarks/readers.py [--records 13000 26000 52000 104000] [--before-max 52000]

The quadratic reader is only run up to ``--before-max`` records (it takes minutes beyond).

Prints a markdown table (median seconds of ``--repeat`` runs, CPU time of this process).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from minilora.data.formats import array_records
from minilora.data.sft import DataStats, _read_lines


def alpaca_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    words = ("model data train answer question small adapter weight token layer the a of to "
             "and in is for with on").split()

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    return [{"instruction": text(12), "input": text(8) if i % 3 == 0 else "",
             "output": text(50)} for i in range(n)]


def quadratic_array_records(path: Path) -> Iterator[tuple[int, Any]]:
    """The array reader as it was before issue 23: the line of every item counted from the
    start of the file (text.count from 0), which makes the whole read quadratic."""
    text = path.read_text(encoding="utf-8-sig")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1

    def skip(index: int) -> int:
        while index < len(text) and text[index] in " \t\r\n":
            index += 1
        return index

    pos = skip(pos)
    while pos < len(text) and text[pos] != "]":
        item, end = decoder.raw_decode(text, pos)
        yield text.count("\n", 0, pos) + 1, item
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    for line_no, line in _read_lines(path, DataStats(), False):
        yield line_no, json.loads(line)


def timed(read: Callable[[Path], Iterator[tuple[int, Any]]], path: Path, repeat: int
          ) -> tuple[float, int]:
    times, count = [], 0
    for _ in range(repeat):
        start = time.process_time()
        count = sum(1 for _ in read(path))
        times.append(time.process_time() - start)
    return statistics.median(times), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[52000, 104000],
                        help="file sizes to measure, in records")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement")
    parser.add_argument("--before-max", type=int, default=52000,
                        help="largest file (records) the quadratic reader of before is run on")
    args = parser.parse_args()
    print(f"Python {platform.python_version()}, {platform.processor() or platform.machine()}; "
          f"median CPU seconds of {args.repeat} runs\n")
    print("| records | file (MB) | JSON Lines (s) | JSON array before (s) | JSON array now (s) | "
          "before / JSONL | now / JSONL |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.records:
            rows = alpaca_records(n)
            jsonl, array = Path(tmp) / "data.jsonl", Path(tmp) / "data.json"
            jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
            array.write_text(json.dumps(rows, indent=4))
            lines, count_l = timed(jsonl_records, jsonl, args.repeat)
            now, count_n = timed(array_records, array, args.repeat)
            assert count_l == count_n == n
            cells = ["-", "-"]
            if n <= args.before_max:
                before, count_b = timed(quadratic_array_records, array, args.repeat)
                assert count_b == n
                cells = [f"{before:.2f}", f"{before / lines:.0f}x"]
            print(f"| {n} | {array.stat().st_size / 1e6:.1f} | {lines:.2f} | {cells[0]} | "
                  f"{now:.2f} | {cells[1]} | {now / lines:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
