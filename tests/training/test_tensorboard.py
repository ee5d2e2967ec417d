"""--log-to tensorboard: every scalar of metrics.jsonl is in the event files, as TensorBoard's
own reader reads them; without the package, one line naming the extra and nothing written."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import chat_rows, fit, tiny_model, write_jsonl
from minilora.training.config import TrainConfig

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the tensorboard extra is not installed")


def test_every_logged_scalar_is_in_the_event_files(tmp_path, tok):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=4))
    held_out = write_jsonl(tmp_path / "eval.jsonl", chat_rows())
    out = tmp_path / "out"
    config = TrainConfig(data=str(data), eval_data=str(held_out), out_dir=str(out), max_steps=4,
                         batch_size=4, max_seq_len=64, lora_r=2, log_every=1, eval_every=2,
                         log_to="tensorboard")
    fit(tiny_model(tok.vocab_size), tok, config)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reader = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    reader.Reload()
    tags = set(reader.Tags()["scalars"])
    logged = {(k, r["step"]): v for r in records for k, v in r.items()
              if k != "step" and isinstance(v, (int, float))}
    assert {"loss", "lr", "tokens_per_s", "eval_loss", "eval_ppl"} <= {k for k, _ in logged}
    assert tags == {k for k, _ in logged}
    read = {(tag, e.step): e.value for tag in tags for e in reader.Scalars(tag)}
    assert read.keys() == logged.keys()
    for key, value in logged.items():
        assert read[key] == pytest.approx(value, rel=1e-6), key  # stored as float32


def test_without_the_package_one_line_names_the_extra(tmp_path, capsys, monkeypatch):
    from minilora.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "out"),
                 "--log-to", "tensorboard"])
    err = capsys.readouterr().err
    assert code == 2
    from minilora.core.errors import install_command

    assert err.strip().splitlines() == [
        "minilora train: error: --log-to tensorboard needs the optional extra: "
        + install_command("tensorboard")]
    assert not (tmp_path / "out").exists()


def test_an_unknown_sink_is_refused(tmp_path, capsys):
    from minilora.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "out"),
                 "--log-to", "wandb"])
    err = capsys.readouterr().err
    assert code == 2 and "--log-to" in err and "'wandb'" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
