"""`minilora train --modules-to-save / --trainable-tokens`: a run trains and saves them, a resume
carries them, and a bad choice is one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import chat_rows, tiny_model, tiny_tokenizer, write_jsonl
from minilora.cli import main
from minilora.model.io import save_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("saved_tokens")
    tokenizer = tiny_tokenizer()
    save_model(tiny_model(tokenizer.vocab_size), root / "base")
    tokenizer.save(root / "base")
    write_jsonl(root / "train.jsonl", chat_rows(repeat=2))
    return root


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def train_args(workdir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(workdir / "base"), "--data", str(workdir / "train.jsonl"),
            "--out", str(out), "--batch-size", "4", "--r", "2", "--seed", "0",
            "--targets", "q_proj,v_proj", "--lr", "1e-2", *extra]


def test_a_run_trains_and_saves_the_copies_and_rows_and_resumes_them(workdir, tmp_path, capsys):
    extra = ("--modules-to-save", "model.norm", "--trainable-tokens", "5", "9")
    code, _, err = run(train_args(workdir, tmp_path / "whole", "--max-steps", "2", *extra), capsys)
    assert code == 0, err
    adapter = tmp_path / "whole" / "adapter"
    sd = load_file(adapter / "adapter_model.safetensors")
    rows = sd["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    norm = sd["base_model.model.model.norm.weight"]
    base = load_file(workdir / "base" / "model.safetensors")
    assert rows.shape == (2, 32)
    assert not torch.equal(rows, base["model.embed_tokens.weight"][[5, 9]])
    assert not torch.equal(norm, base["model.norm.weight"])  # trained, not the base's copy
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.norm"]
    assert config["trainable_token_indices"] == [5, 9]

    # stopped after step 1 and resumed: the same adapter, bit for bit
    split = tmp_path / "split"
    code, _, err = run(train_args(workdir, split, "--max-steps", "2", "--stop-after", "1",
                                  *extra), capsys)
    assert code == 0, err
    code, _, err = run(train_args(workdir, split, "--max-steps", "2", "--resume", *extra), capsys)
    assert code == 0, err
    again = load_file(split / "adapter" / "adapter_model.safetensors")
    assert again.keys() == sd.keys()
    for key, tensor in sd.items():
        assert torch.equal(again[key], tensor), key


@pytest.mark.parametrize("extra, message", [
    (("--modules-to-save", "no_such"), "modules to save: 'no_such' matches no module"),
    (("--modules-to-save", "q_proj"), "is, holds or sits in a LoRA layer"),
    (("--trainable-tokens", "100000"), "token ids [100000] of 'model.embed_tokens' are outside "
                                       "the vocabulary"),
    (("--trainable-tokens", "-3"), "--trainable-tokens must be token ids >= 0, got [-3]"),
    (("--trainable-tokens", "hello"), "argument --trainable-tokens: expected token ids "
                                      "(integers), got 'hello'"),
])
def test_a_bad_choice_is_one_line_and_nothing_is_written(workdir, tmp_path, capsys, extra,
                                                         message):
    out = tmp_path / "run"
    code, _, err = run(train_args(workdir, out, "--max-steps", "1", *extra), capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("minilora train: error: ") and message in last, last
    assert not (out / "adapter").exists()
