"""`minilora train --modules-to-save / --trainable-tokens`: a run trains and saves them, a resume
carries them, and a bad choice is one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_cli, tiny_base_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base_folder(tmp_path_factory.mktemp("saved_tokens"), repeat=2)


run = run_cli


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
    code, out, err = run(["info", str(adapter)], capsys)
    assert code == 0, err
    assert "modules to save   ['model.norm']" in out and "trainable tokens  [5, 9]" in out
    assert "their parameters  96" in out  # 2 rows of 32 and the norm's 32, apart from LoRA's

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
    (("--trainable-tokens", "100000"), "token ids [100000] are outside the vocabulary of "
                                       "model.embed_tokens"),
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


@pytest.mark.parametrize("extra", [("--modules-to-save", "lm_head"),
                                   ("--trainable-tokens", "5", "9")])
def test_merge_writes_a_model_that_computes_what_the_adapter_did(workdir, tmp_path, capsys,
                                                                 extra):
    from minilora.adapters.folder import load_adapter
    from minilora.model.io import load_model

    run_dir = tmp_path / "run"
    code, _, err = run(train_args(workdir, run_dir, "--max-steps", "1", *extra), capsys)
    assert code == 0, err
    code, _, err = run(["merge", "--model", str(workdir / "base"), "--adapter",
                        str(run_dir / "adapter"), "--out", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    x = torch.tensor([[5, 9, 3, 4, 5, 6, 9]])
    adapted = load_model(workdir / "base")
    load_adapter(adapted, run_dir / "adapter")
    merged = load_model(tmp_path / "merged")
    with torch.no_grad():
        want, got = adapted(x).logits, merged(x).logits
        assert not torch.allclose(want, load_model(workdir / "base")(x).logits, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setting, why", [({"full": True}, "--full trains every weight"),
                                          ({"fsdp": True}, "not with --fsdp"),
                                          ({"quantize": "nf4"}, "not with --quantize")])
def test_the_extras_are_refused_where_whole_modules_are_sharded_or_quantized(setting, why):
    from minilora.core.errors import ConfigError
    from minilora.training.config import TrainConfig

    with pytest.raises(ConfigError, match=why):
        TrainConfig(data="x.jsonl", modules_to_save=["lm_head"], **setting)
    with pytest.raises(ConfigError, match=why):
        TrainConfig(data="x.jsonl", trainable_tokens=[3], **setting)
    config = TrainConfig(data="x.jsonl", modules_to_save=["lm_head"], trainable_tokens=[3])
    assert TrainConfig.from_dict(config.to_dict()).lora_config().trainable_token_indices == [3]
