"""--eval-tasks: task accuracy at every evaluation of a run (metrics.jsonl, the plot), equal to
scoring the model the run ends with; bad task files refused before anything is written."""

from __future__ import annotations

import json

import pytest

from helpers import chat_rows, fit, tiny_model, write_jsonl
from minilora.core.errors import ConfigError
from minilora.data import tasks
from minilora.decoding.chat import chat_answerer
from minilora.training.config import TrainConfig
from minilora.training.datasets import load_datasets
from minilora.training.loop import train

QUESTIONS = [
    {"task": "name", "messages": [{"role": "user", "content": "What is your name?"}],
     "expected": "Mini", "match": "contains"},
    {"task": "name", "messages": [{"role": "user", "content": "Who made you?"}],
     "expected": "minilora", "match": "contains"},
    {"task": "sums", "messages": [{"role": "user", "content": "Add 2 and 3."}],
     "expected": "5", "match": "contains"},
]


def test_each_evaluation_scores_the_tasks(tmp_path, tok):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=8))
    task_file = write_jsonl(tmp_path / "tasks.jsonl", QUESTIONS)
    out = tmp_path / "out"
    config = TrainConfig(data=str(data), out_dir=str(out), max_steps=30, batch_size=8,
                         max_seq_len=64, lora_r=4, lr=5e-3, eval_every=10,
                         eval_tasks=[str(task_file)])
    model = tiny_model(tok.vocab_size)
    result = fit_with_tokenizer(model, tok, config)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "task/name" in r]
    assert [r["step"] for r in scored] == [10, 20, 30]
    assert all(set(r) == {"step", "task/name", "task/sums"} for r in scored)  # no eval_loss
    # the last record is what scoring the trained model gives, outside the run
    report = tasks.score(tasks.load_samples(task_file), chat_answerer(
        model.eval(), tok, max_new_tokens=48, eos_token_id=tok.stop_token_ids))
    assert scored[-1]["task/name"] == report.accuracy("name")
    assert scored[-1]["task/sums"] == report.accuracy("sums")
    assert [e["step"] for e in result.evals] == [10, 20, 30]
    assert (out / "loss.png").exists()
    assert not (out / "best").exists()  # best/ follows the eval loss, and there is none


def fit_with_tokenizer(model, tok, config):
    train_set, eval_set = load_datasets(config, tok)
    return train(model, train_set, config, eval_set, tokenizer=tok)


def test_eval_tasks_without_a_tokenizer_is_a_config_error(tmp_path, tok):
    task_file = write_jsonl(tmp_path / "tasks.jsonl", QUESTIONS)
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    config = TrainConfig(data=str(data), out_dir=str(tmp_path / "out"), max_steps=1,
                         eval_tasks=str(task_file))
    with pytest.raises(ConfigError, match="eval_tasks"):
        fit(tiny_model(tok.vocab_size), tok, config)
    assert not (tmp_path / "out").exists()


def test_a_bad_task_file_is_one_line_and_nothing_written(tmp_path, capsys):
    from minilora.cli import main

    bad = write_jsonl(tmp_path / "tasks.jsonl", [QUESTIONS[0], {"task": "x", "expected": "y"}])
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "out"),
                 "--eval-tasks", str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and f"{bad}:2" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
