"""What a user reads says nothing of the project's history: no issue numbers, no "the seed"
(the project minilora grew from), in any command's --help or in the README."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from minilora.cli.main import build_parser

HISTORY = re.compile(r"\bissue \d+|\bthe seed\b(?! \d)|\bseed's\b(?! range)", re.I)
ROOT = Path(__file__).resolve().parents[2]


def _helps() -> dict[str, str]:
    parser = build_parser(train_args=True)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"minilora": parser.format_help(),
            **{name: p.format_help() for name, p in sub.choices.items()}}


def test_no_history_words_in_any_help_or_the_readme():
    texts = {**_helps(), "README.md": (ROOT / "README.md").read_text(encoding="utf-8")}
    assert len(texts) > 5
    found = {name: HISTORY.findall(text) for name, text in texts.items()}
    assert {name: words for name, words in found.items() if words} == {}
