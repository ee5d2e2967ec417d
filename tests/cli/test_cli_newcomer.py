"""A newcomer's path, round three: Ctrl-C keeps the steps done, sampling defaults, an adapter
that finds its base, flags that mean one thing, nothing accepted silently."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import chat_rows, tiny_model, tiny_tokenizer, write_jsonl
from minilora.cli import main
from minilora.model.io import save_model
from minilora.training import loop as train_module

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("newcomer")
    tokenizer = tiny_tokenizer()
    save_model(tiny_model(tokenizer.vocab_size), root / "base")
    tokenizer.save(root / "base")
    write_jsonl(root / "train.jsonl", chat_rows(repeat=4))
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
            "--dropout", "0.1", *extra]


@pytest.fixture(scope="module")
def uninterrupted(workdir: Path) -> dict:
    out = workdir / "whole"
    assert main(train_args(workdir, out, "--max-steps", "6")) == 0
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(folder: Path, expected: dict) -> None:
    got = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and bool((got[key] == tensor).all()), key


@pytest.mark.parametrize("how", ["raised", "signal"])
def test_ctrl_c_keeps_the_step_it_stopped_at_and_resume_is_exact(
        workdir: Path, tmp_path: Path, uninterrupted: dict, capsys, monkeypatch,
        how: str) -> None:
    # No --save-every: before, an interrupted run kept nothing and started over.
    real = train_module._step
    calls = []

    def step(run_, at, *args, **kwargs):
        calls.append(at)
        if at == 2 and how == "signal":  # Ctrl-C in the middle of step 3: step 3 finishes
            os.kill(os.getpid(), signal.SIGINT)
        result = real(run_, at, *args, **kwargs)
        if at == 2 and how == "raised":  # a KeyboardInterrupt between steps
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(train_module, "_step", step)
    out = tmp_path / "run"
    code, _, err = run(train_args(workdir, out, "--max-steps", "6"), capsys)
    assert code == 130, err
    assert calls == [0, 1, 2]
    assert f"kept {out / 'checkpoints' / 'step-00000003'}" in err
    assert not (out / "adapter").exists()
    monkeypatch.setattr(train_module, "_step", real)
    code, stdout, err = run(["train", "--resume", "--out", str(out)], capsys)
    assert code == 0, err
    assert "resumed at step 3, trained 3 steps" in stdout
    assert_same_adapter(out, uninterrupted)  # bit for bit
