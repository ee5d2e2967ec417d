"""`minilora train --answer-tokens`: the rows of exactly the tokens the training answers use
train (the end-of-turn token left out), written into the run's config, and refused with --full
in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import chat_rows, run_cli, tiny_base_folder
from minilora.data.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base_folder(tmp_path_factory.mktemp("answer_tokens"), repeat=1)


run = run_cli


def test_the_answers_token_rows_train_and_are_written_into_the_config(workdir, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    code, _, err = run(["train", "--model", str(workdir / "base"), "--data",
                        str(workdir / "train.jsonl"), "--out", str(out), "--batch-size", "4",
                        "--r", "2", "--max-steps", "1", "--answer-tokens"], capsys)
    assert code == 0, err
    tokenizer = Tokenizer.from_file(str(workdir / "base"))
    # the formula: every token of the assistant replies as the chat template renders them,
    # less the tokens that end a turn
    expected: set[int] = set()
    for row in chat_rows(repeat=1):
        messages = row["conversations"]
        ids, mask = tokenizer.encode_chat(messages)
        expected |= {t for t, m in zip(ids, mask, strict=True) if m}
    expected -= set(tokenizer.stop_token_ids)
    config = json.loads((out / "config.json").read_text())
    assert config["answer_tokens"] is True
    assert config["trainable_tokens"] == sorted(expected)
    assert len(expected) > 3
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["trainable_token_indices"] == sorted(expected)


def test_answer_tokens_with_full_is_one_line(workdir, tmp_path, capsys):
    out = tmp_path / "full"
    code, _, err = run(["train", "--model", str(workdir / "base"), "--data",
                        str(workdir / "train.jsonl"), "--out", str(out), "--full",
                        "--answer-tokens", "--max-steps", "1"], capsys)
    assert code == 2
    assert "answer" in err and "--full" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
