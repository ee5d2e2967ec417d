"""A newcomer's path, round three: Ctrl-C keeps the steps done, sampling defaults, an adapter
that finds its base, flags that mean one thing, nothing accepted silently."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import chat_rows, run_cli, tiny_base_folder, tiny_model, tiny_tokenizer, write_jsonl
from minilora.cli import main
from minilora.model.io import save_model
from minilora.training import loop as train_module

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base_folder(tmp_path_factory.mktemp("newcomer"), repeat=4)


run = run_cli


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


# ---------------------------------------------------------------------------------------------
# Sampling: a folder's generation_config.json, min_p, sampled scoring
# ---------------------------------------------------------------------------------------------

def test_min_p_keeps_the_tokens_the_formula_keeps() -> None:
    # min_p (Nguyen et al. 2024, transformers' MinPLogitsWarper): after temperature, keep token i
    # iff p_i >= min_p * max_j p_j, then renormalise. Written out here, and checked against
    # transformers' warper on the same logits.
    import torch
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    from minilora.decoding.generation import sampling_probs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g) * 3
    for temperature, min_p in ((1.0, 0.1), (0.7, 0.05), (1.3, 0.3)):
        p = torch.softmax(logits.double() / temperature, -1)
        keep = p >= min_p * p.max()
        expected = torch.where(keep, p, torch.zeros_like(p))
        expected = expected / expected.sum()
        got = sampling_probs(logits, temperature=temperature, min_p=min_p)
        assert torch.equal(got > 0, keep)
        assert torch.allclose(got.double(), expected, atol=1e-6, rtol=0)
        scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
        scores = MinPLogitsWarper(min_p)(None, scores)
        assert torch.allclose(got, scores.softmax(-1)[0], atol=1e-6, rtol=0)
    # after top-p, as transformers orders them
    scores = TopPLogitsWarper(0.9)(None, logits[None].clone())
    scores = MinPLogitsWarper(0.2)(None, scores)
    got = sampling_probs(logits, temperature=1.0, top_p=0.9, min_p=0.2)
    assert torch.allclose(got, scores.softmax(-1)[0], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def tuned_base(workdir: Path) -> Path:
    """The tiny base with a generation_config.json, as a model's authors ship one."""
    import shutil

    folder = workdir / "tuned"
    shutil.copytree(workdir / "base", folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "min_p": 0.05,
         "max_new_tokens": 7, "bos_token_id": 1}))
    return folder


def recorded(monkeypatch, module) -> list[dict]:
    """Replaces module.stream_generate with one that records its settings and says 'ok'."""
    calls: list[dict] = []

    def fake(model, ids, **kw):
        calls.append(kw)
        return iter([])

    monkeypatch.setattr(module, "stream_generate", fake)
    return calls


def test_generate_and_chat_take_the_folders_sampling_for_what_is_left_out(
        tuned_base: Path, capsys, monkeypatch) -> None:
    import io
    import sys

    import minilora.decoding.chat
    import minilora.decoding.generation

    calls = recorded(monkeypatch, minilora.decoding.generation)
    code, _, err = run(["generate", "--model", str(tuned_base), "hi"], capsys)
    assert code == 0, err
    assert {k: calls[-1][k] for k in ("temperature", "top_p", "min_p", "top_k")} == {
        "temperature": 0.6, "top_p": 0.9, "min_p": 0.05, "top_k": 0}
    assert calls[-1]["max_new_tokens"] == 256  # lengths stay the command's
    assert (f"sampling: temperature 0.6, top_p 0.9, min_p 0.05 (from "
            f"{tuned_base / 'generation_config.json'}") in err
    code, _, err = run(["generate", "--model", str(tuned_base), "--temperature", "0",
                        "--min-p", "0.2", "hi"], capsys)
    assert code == 0, err
    assert calls[-1]["temperature"] == 0 and calls[-1]["min_p"] == 0.2  # a flag given wins
    assert calls[-1]["top_p"] == 0.9

    calls = recorded(monkeypatch, minilora.decoding.chat)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    code, _, err = run(["chat", "--model", str(tuned_base), "--top-k", "5"], capsys)
    assert code == 0, err
    assert {k: calls[-1][k] for k in ("temperature", "top_p", "min_p", "top_k")} == {
        "temperature": 0.6, "top_p": 0.9, "min_p": 0.05, "top_k": 5}


def test_a_run_adapter_carries_the_base_sampling(tuned_base: Path, workdir: Path,
                                                  tmp_path: Path, capsys, monkeypatch) -> None:
    import minilora.decoding.generation

    out = tmp_path / "run"
    argv = ["train", "--model", str(tuned_base), "--data", str(workdir / "train.jsonl"),
            "--out", str(out), "--batch-size", "4", "--r", "2", "--max-steps", "1"]
    assert run(argv, capsys)[0] == 0
    assert (json.loads((out / "adapter" / "generation_config.json").read_text())
            == json.loads((tuned_base / "generation_config.json").read_text()))
    # the adapter's own file decides over a base without one
    calls = recorded(monkeypatch, minilora.decoding.generation)
    code, _, err = run(["generate", "--model", str(workdir / "base"), "--adapter",
                        str(out / "adapter"), "hi"], capsys)
    assert code == 0, err
    assert calls[-1]["temperature"] == 0.6
    assert str(out / "adapter" / "generation_config.json") in err


@pytest.mark.parametrize("body, message", [
    ({"temperature": -1}, "temperature: expected a number >= 0, got -1"),
    ({"top_p": 0, "min_p": 2}, "top_p: expected a number > 0 and <= 1, got 0; min_p: expected "
                               "a number >= 0 and <= 1, got 2"),
    ([1], 'an array; expected a JSON object such as {"temperature": 0.7, "top_p": 0.9}'),
])
def test_a_bad_generation_config_is_one_line(workdir: Path, tmp_path: Path, body, message,
                                             capsys) -> None:
    import shutil

    folder = tmp_path / "base"
    shutil.copytree(workdir / "base", folder)
    (folder / "generation_config.json").write_text(json.dumps(body))
    code, _, err = run(["generate", "--model", str(folder), "hi"], capsys)
    assert code == 2
    assert err.strip() == (f"minilora generate: error: {folder / 'generation_config.json'}: "
                           f"{message}")


# ---------------------------------------------------------------------------------------------
# An adapter knows its base
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def relative_run(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run started with a relative --model, from the folder holding the base."""
    import os as _os

    here = Path.cwd()
    _os.chdir(workdir)
    try:
        assert main(["train", "--model", "base", "--data", "train.jsonl", "--out", "relrun",
                     "--batch-size", "4", "--r", "2", "--max-steps", "2"]) == 0
    finally:
        _os.chdir(here)
    return workdir / "relrun"


def test_the_adapter_records_its_base_as_an_absolute_path(workdir: Path, relative_run: Path
                                                          ) -> None:
    config = json.loads((relative_run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(workdir / "base")
    assert json.loads((relative_run / "config.json").read_text())["model"] == str(
        workdir / "base")


def test_chat_generate_eval_merge_find_the_base_the_adapter_records(
        workdir: Path, relative_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import io
    import sys

    monkeypatch.chdir(tmp_path)  # another folder: nothing relative to the run's
    adapter = str(relative_run / "adapter")
    note = f"base: {workdir / 'base'} (the one the adapter was trained on"
    code, out, err = run(["generate", "--adapter", adapter, "--max-new-tokens", "2", "hi"],
                         capsys)
    assert code == 0 and note in err, err
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    code, out, err = run(["chat", "--adapter", adapter, "--max-new-tokens", "2"], capsys)
    assert code == 0 and note in err, err
    code, out, err = run(["eval", "--adapter", adapter, "--data",
                          str(workdir / "train.jsonl")], capsys)
    assert code == 0 and note in err, err
    code, out, err = run(["merge", "--adapter", str(relative_run), "--out",
                          str(tmp_path / "merged")], capsys)
    assert code == 0 and note in err, err
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_an_adapter_whose_base_is_elsewhere_says_which_base_in_one_line(
        workdir: Path, relative_run: Path, tmp_path: Path, capsys) -> None:
    import shutil

    moved = tmp_path / "adapter"
    shutil.copytree(relative_run / "adapter", moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/nowhere/base"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run(["generate", "--adapter", str(moved), "hi"], capsys)
    assert code == 2
    assert err.strip() == (
        f"minilora generate: error: {moved / 'adapter_config.json'} records its base as "
        "/nowhere/base, which is not on this machine; pass --model PATH (that base, or a "
        "local copy of it)")


def test_an_adapter_on_a_base_of_another_size_is_one_short_line(
        workdir: Path, relative_run: Path, tmp_path: Path, capsys) -> None:
    # a base with 3 layers: the adapter's keys for 2 layers are missing a layer's worth
    tokenizer = tiny_tokenizer()
    save_model(tiny_model(tokenizer.vocab_size, layers=3), tmp_path / "deep")
    tokenizer.save(tmp_path / "deep")
    code, _, err = run(["generate", "--model", str(tmp_path / "deep"), "--adapter",
                        str(relative_run / "adapter"), "hi"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 400, lines
    assert f"was trained on another base ({workdir / 'base'})" in lines[0]
    assert "missing keys [base_model.model.model.layers.2." in lines[0]
    assert "; and 13 more]" in lines[0]
    assert lines[0].endswith(f"; load it on {workdir / 'base'}")


# ---------------------------------------------------------------------------------------------
# One word, one meaning
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("old, new, value", [("--dtype", "--load-dtype", "bfloat16"),
                                             ("--config", "--model-config", None)])
def test_old_spellings_work_with_a_one_line_note(workdir: Path, old: str, new: str, value,
                                                 capsys) -> None:
    value = value or str(workdir / "base" / "config.json")
    code, _, err = run(["generate", "--model", str(workdir / "base"), old, value,
                        "--max-new-tokens", "1", "hi"], capsys)
    assert code == 0, err
    assert err.splitlines()[0] == f"minilora generate: note: {old} is now {new}"
    code, _, err = run(["generate", "--model", str(workdir / "base"), new, value,
                        "--max-new-tokens", "1", "hi"], capsys)
    assert code == 0 and "note" not in err, err


def test_each_flag_name_means_one_thing(capsys) -> None:
    from minilora.cli.common import SHORT
    from minilora.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    meanings: dict[str, set[str]] = {}
    for p in sub.choices.values():
        for action in p._actions:
            if action.option_strings:  # the current name (the first); later ones are old names
                dest = SHORT.get(action.dest, action.dest)  # lora_r is --r's setting
                meanings.setdefault(action.option_strings[0], set()).add(dest)
    assert meanings["--model-config"] == {"model_config"}
    # --dtype is a current name only in export, where it is the written weights' dtype (as
    # llama.cpp's converters say it); elsewhere it is an old name, answered with a note
    assert meanings["--load-dtype"] == {"dtype"} and meanings.get("--dtype") == {"gguf_dtype"}
    assert [name for name, p in sub.choices.items() for a in p._actions
            if a.option_strings[:1] == ["--dtype"]] == ["export"]
    assert meanings["--config"] == {"config"}  # train's run settings, nothing else
    assert {flag for flag, dests in meanings.items() if len(dests) > 1} == set()
    code, out, _ = run(["info", "--help"], capsys)
    assert code == 0 and "--model " not in out and "--model\n" not in out


@pytest.mark.parametrize("typed, near", [("--lora-r", "--r"), ("--learning-rate", "--lr"),
                                         ("--lora-alpha", "--alpha"), ("--output-dir", "--out")])
def test_an_unknown_flag_finds_our_name_for_it(typed: str, near: str, capsys) -> None:
    code, _, err = run(["train", typed, "1"], capsys)
    assert code == 2
    assert err.strip() == (f"minilora train: error: unknown argument {typed}; did you mean "
                           f"{near}? (see `minilora train --help`)")


# ---------------------------------------------------------------------------------------------
# Sampled scoring, and what the before/after table pools
# ---------------------------------------------------------------------------------------------

def task_rows(task: str, n: int, expected: str = "Mini") -> list[dict]:
    return [{"task": task, "messages": [{"role": "user", "content": f"{task} question {i}?"}],
             "expected": expected, "match": "contains"} for i in range(n)]


def test_eval_scores_the_share_of_sampled_answers_that_are_right(
        workdir: Path, tuned_base: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import minilora.decoding.chat

    tasks_file = write_jsonl(tmp_path / "tasks.jsonl", task_rows("name", 3))
    tokenizer = tiny_tokenizer()
    right, wrong = tokenizer.encode(" Mini"), tokenizer.encode(" tac")
    calls = []

    def fake_batch(model, prompts, **kw):
        calls.append((len(prompts), kw))
        return [right, wrong, right, right][: len(prompts)]  # 3 of every 4 right

    monkeypatch.setattr(minilora.decoding.chat, "generate_batch", fake_batch)
    report = tmp_path / "report.json"
    code, out, err = run(["eval", "--model", str(tuned_base), "--tasks", str(tasks_file),
                          "--temperature", "0.8", "--samples", "4", "--json", str(report)],
                         capsys)
    assert code == 0, err
    numbers = json.loads(report.read_text())["tasks"]
    assert numbers["total"] == 12 and numbers["accuracy"] == 0.75
    assert numbers["sampling"]["temperature"] == 0.8 and numbers["sampling"]["samples"] == 4
    assert [n for n, _ in calls] == [4, 4, 4]
    # the temperature given, the rest from the model's generation_config.json
    assert {k: calls[0][1][k] for k in ("temperature", "top_p", "min_p")} == {
        "temperature": 0.8, "top_p": 0.9, "min_p": 0.05}
    assert len({kw["seed"] for _, kw in calls}) == 3  # each question its own draw
    assert "75.0%" in out


def test_eval_samples_without_a_temperature_is_refused(workdir: Path, tmp_path: Path,
                                                       capsys) -> None:
    tasks_file = write_jsonl(tmp_path / "tasks.jsonl", task_rows("name", 1))
    code, _, err = run(["eval", "--model", str(workdir / "base"), "--tasks", str(tasks_file),
                        "--samples", "3"], capsys)
    assert code == 2
    assert err.strip() == ("minilora eval: error: --samples 3 needs --temperature > 0 (greedy "
                           "answers are the same each time)")


def test_base_skills_pool_only_what_the_base_could_do(workdir: Path, tmp_path: Path, capsys,
                                                      monkeypatch) -> None:
    import minilora.decoding.chat

    files = [write_jsonl(tmp_path / f"{t}.jsonl", task_rows(t, 4))
             for t in ("drelvia", "add", "fact")]
    trained = []
    real_train = train_module.train

    def train(*args, **kwargs):
        result = real_train(*args, **kwargs)
        trained.append(True)
        return result

    def answerer(model, tokenizer, **kw):
        def answer(messages):
            question = messages[-1]["content"]
            if question.startswith("drelvia"):  # the task the run teaches: right only after
                return "Mini" if trained else "no idea"
            if question == "fact question 0?" and trained:  # one base answer forgotten
                return "no idea"
            return "Mini"
        return answer

    monkeypatch.setattr(train_module, "train", train)
    monkeypatch.setattr(minilora.decoding.chat, "chat_answerer", answerer)
    code, out, err = run(train_args(workdir, tmp_path / "run", "--max-steps", "1", "--tasks",
                                    *map(str, files)), capsys)
    assert code == 0, err
    rows = {line.split()[0] + (" " + line.split()[1] if line.startswith("base skills") else ""):
            line.split() for line in out.splitlines() if line[:1].isalpha()}
    assert rows["drelvia"][2:4] == ["0.0%", "100.0%"]
    assert rows["base skills"][2:] == ["8", "100.0%", "87.5%", "87.5%"]  # 7 of 8 kept
    assert "base skills: add, fact (the tasks the base answered at least 50% right" in out


def test_train_samples_adds_a_sampled_before_after_table(workdir: Path, tuned_base: Path,
                                                         tmp_path: Path, capsys) -> None:
    tasks_file = write_jsonl(tmp_path / "tasks.jsonl", task_rows("name", 2))
    argv = ["train", "--model", str(tuned_base), "--data", str(workdir / "train.jsonl"),
            "--out", str(tmp_path / "run"), "--batch-size", "4", "--r", "2", "--max-steps", "1",
            "--tasks", str(tasks_file), "--samples", "3"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    head = ("sampled (temperature 0.6, top_p 0.9, min_p 0.05; 3 answers a question, the share "
            "right):")
    assert head in out
    table = out[out.index(head):].splitlines()
    assert table[2].split()[:2] == ["task", "n"] and table[4].split()[:2] == ["name", "6"]


# ---------------------------------------------------------------------------------------------
# Nothing accepted silently
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exclude, message", [
    ("k_prj", "LoRA exclude 'k_prj' (nearest: k_proj, v_proj, q_proj) match no Linear module; "
              "the model's Linear names end in: q_proj, k_proj, v_proj, o_proj, gate_proj, "
              "up_proj, down_proj, lm_head"),
    ("layers\\.9\\..*", "LoRA exclude 'layers\\.9\\..*' matches no Linear module, so it "
                        "excludes nothing; the model's Linear names end in: q_proj, k_proj, "
                        "v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"),
])
def test_an_exclude_that_names_nothing_is_refused(workdir: Path, tmp_path: Path, exclude: str,
                                                  message: str, capsys) -> None:
    out = tmp_path / "run"
    code, _, err = run(train_args(workdir, out, "--max-steps", "1", "--exclude", exclude),
                       capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == f"minilora train: error: {message}"
    assert not (out / "adapter").exists()


def test_the_run_block_names_the_chat_template(workdir: Path, tmp_path: Path, capsys) -> None:
    import shutil

    code, _, err = run(train_args(workdir, tmp_path / "a", "--max-steps", "1"), capsys)
    assert code == 0, err
    assert "run: template    the model's own (MiniMind's ChatML)" in err.splitlines()
    bare = tmp_path / "bare"
    shutil.copytree(workdir / "base", bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    code, _, err = run(["train", "--model", str(bare), "--data", str(workdir / "train.jsonl"),
                        "--out", str(tmp_path / "b"), "--batch-size", "4", "--max-steps", "1"],
                       capsys)
    assert code == 0, err
    assert ("run: template    ChatML, built in (the tokenizer has no chat template of its own; "
            "add chat_template to its tokenizer_config.json to use another)") in err.splitlines()


def test_chat_answers_empty_lines_and_unknown_commands_itself(workdir: Path, capsys,
                                                              monkeypatch) -> None:
    import io
    import sys

    import minilora.decoding.chat

    calls = recorded(monkeypatch, minilora.decoding.chat)
    sent = []
    real_encode = minilora.data.tokenizer.Tokenizer.encode_chat

    def encode_chat(self, messages, **kw):
        sent.append(messages[-1]["content"])
        return real_encode(self, messages, **kw)

    monkeypatch.setattr(minilora.data.tokenizer.Tokenizer, "encode_chat", encode_chat)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n   \n/foo bar\n/help\n//tmp is full\nhi\n"))
    code, _, err = run(["chat", "--model", str(workdir / "base")], capsys)
    assert code == 0, err
    assert sent == ["/tmp is full", "hi"] and len(calls) == 2  # only real messages reach it
    assert err.count("(an empty message is not sent") == 2
    assert "unknown command /foo; /reset: start the conversation over" in err
    assert err.count("/reset: start the conversation over") == 2  # /help too


def test_generate_refuses_an_empty_prompt(workdir: Path, capsys) -> None:
    code, _, err = run(["generate", "--model", str(workdir / "base"), "  "], capsys)
    assert code == 2
    assert err.strip() == ("minilora generate: error: the prompt is empty; give one as the "
                           "argument or on stdin")


# ---------------------------------------------------------------------------------------------
# Tools for what the README advises: a replay file of the base's own answers
# ---------------------------------------------------------------------------------------------

def test_replay_writes_the_bases_own_answers(workdir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "questions.txt").write_text("Who made you?\n\nSay hello.\n")
    tasks_file = write_jsonl(tmp_path / "tasks.jsonl", task_rows("name", 1))
    data = write_jsonl(tmp_path / "chats.jsonl", chat_rows()[:1])  # asked up to its first user
    out = tmp_path / "replay.jsonl"
    # the embedded model (the tiny random bases answer only whitespace)
    code, stdout, err = run(["replay", str(tmp_path / "questions.txt"), str(tasks_file),
                             str(data), "--out", str(out), "--max-new-tokens", "6"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    asked = [r["conversations"][:-1] for r in rows]
    assert asked == [[{"role": "user", "content": "Who made you?"}],
                     [{"role": "user", "content": "Say hello."}],
                     [{"role": "user", "content": "name question 0?"}],
                     chat_rows()[0]["conversations"][:2]]
    assert f"wrote 4 conversations to {out}" in stdout
    # each answer is what `generate` answers the same question with, greedy
    for row in rows[:3]:
        code, text, err = run(["generate", "--temperature", "0", "--max-new-tokens", "6",
                               row["conversations"][0]["content"]], capsys)
        assert code == 0, err
        assert row["conversations"][-1] == {"role": "assistant", "content": text.strip()}
    code, _, err = run(["replay", "--model", str(workdir / "base"),
                        str(tmp_path / "questions.txt"), "--out", str(out)], capsys)
    assert code == 2 and "exists; nothing is overwritten without --overwrite" in err
    # and train takes it
    code, _, err = run(train_args(workdir, tmp_path / "run", "--max-steps", "1", "--replay",
                                  str(out)), capsys)
    assert code == 0, err


def test_a_line_that_is_no_question_is_one_line(workdir: Path, tmp_path: Path, capsys) -> None:
    bad = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}, {"answer": 3}])
    code, _, err = run(["replay", "--model", str(workdir / "base"), str(bad), "--out",
                        str(tmp_path / "r.jsonl")], capsys)
    assert code == 2
    assert err.strip() == (f"minilora replay: error: {bad}:2: no question here (keys found: "
                           "'answer'); expected {\"prompt\": ...}, {\"question\": ...}, a tasks "
                           "record or a chat, ShareGPT or Alpaca record")
    assert not (tmp_path / "r.jsonl").exists()


def test_adapter_per_prompt_without_an_adapter_answers_with_the_base(workdir: Path, capsys,
                                                                     monkeypatch) -> None:
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO('{"prompt": "hi"}\n{"prompt": "Say hello.", '
                                                  '"adapter": "base"}\n'))
    code, out, err = run(["generate", "--model", str(workdir / "base"), "--adapter-per-prompt",
                          "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(r["prompt"], r["adapter"]) for r in lines] == [("hi", None), ("Say hello.", "base")]


# ---------------------------------------------------------------------------------------------
# Docs and messages that match the code
# ---------------------------------------------------------------------------------------------

def test_nf4_counts_the_same_total_as_the_unquantized_run(workdir: Path, tmp_path: Path,
                                                          capsys) -> None:
    pytest.importorskip("bitsandbytes")
    totals = {}
    for kind in ("none", "nf4"):
        extra = [] if kind == "none" else ["--quantize", "nf4"]
        code, _, err = run(train_args(workdir, tmp_path / kind, "--max-steps", "1", *extra),
                           capsys)
        assert code == 0, err
        line = next(x for x in err.splitlines() if x.startswith("run: parameters"))
        totals[kind] = line.split(" trainable of ")[1].split()[0]
        assert "kernels-community" not in err  # bitsandbytes' hub-kernel warning is dropped
    assert totals["nf4"] == totals["none"]


def test_the_docs_and_help_name_no_internal_words(capsys) -> None:
    import re

    from minilora.cli.main import build_parser

    root = Path(__file__).resolve().parents[2]
    texts = {p: p.read_text(encoding="utf-8")
             for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]}
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    texts.update({f"minilora {c} --help": p.format_help() for c, p in sub.choices.items()})
    for where, text in texts.items():
        assert "DESIGN.md" not in str(text), where
        assert not re.search(r"\bissue \d+|\(issue", text), where
    addopts = (root / "pyproject.toml").read_text().split("addopts = ")[1].splitlines()[0]
    assert "-rs" in addopts  # skip reasons shown (a missing browser, GPU or extra)


def test_a_missing_extra_names_the_command_for_this_install(monkeypatch) -> None:
    from minilora.core import errors

    root = Path(errors.__file__).resolve().parents[2]
    assert errors.install_command("qlora") == f"pip install -e '.[qlora]' (in {root})"  # a clone
    monkeypatch.setattr(errors, "__file__", "/site-packages/minilora/core/errors.py")
    assert errors.install_command("qlora") == "pip install 'minilora[qlora]'"


def test_a_refused_resume_says_the_flag(workdir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert run(train_args(workdir, out, "--max-steps", "4", "--stop-after", "1"), capsys)[0] == 0
    code, _, err = run(train_args(workdir, out, "--max-steps", "4"), capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].endswith(
        "holds an unfinished run: pass --resume to continue it, or train into another --out")


def test_a_bad_generation_config_in_the_base_is_refused_before_training(workdir: Path, capsys,
                                                                        tmp_path: Path) -> None:
    """The run copies the base's generation_config.json into its adapter: a bad one is one line
    before the first step, not a failure at the save after the whole run."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(workdir / "base", base)
    (base / "generation_config.json").write_text('{"temperature": -1}')
    code, _, err = run(["train", "--model", str(base), "--data", str(workdir / "train.jsonl"),
                        "--out", str(tmp_path / "out"), "--max-steps", "1"], capsys)
    assert code == 2 and "generation_config.json" in err and "temperature" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoints").exists()
