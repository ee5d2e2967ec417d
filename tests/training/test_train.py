"""training/loop.py: the loop on a tiny model (hidden 32, 2 layers), a few steps each, CPU fp32."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import chat_rows, fit, tiny_model, write_jsonl
from minilora.adapters.state import adapter_state_dict
from minilora.core.errors import CheckpointError, ConfigError, OutputError, TrainError
from minilora.data.sft import IGNORE_INDEX, JsonlDataset, Sample, load_jsonl
from minilora.lora.injection import inject_lora, lora_parameters, mark_trainable
from minilora.lora.layer import lora_modules
from minilora.training import checkpoint
from minilora.training import loop as train_module
from minilora.training.checkpoint import latest_checkpoint
from minilora.training.datasets import BatchPlan, load_datasets
from minilora.training.loop import TrainConfig, evaluate, lr_at, train
from minilora.training.precision import autocast_dtype, native_bf16

TESTS = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return {
        "train": str(write_jsonl(folder / "train.jsonl", chat_rows(repeat=4))),  # 24 chats
        "eval": str(write_jsonl(folder / "eval.jsonl", chat_rows("messages"))),
    }


def config(files, out: Path, **changes) -> TrainConfig:
    base = dict(data=files["train"], out_dir=str(out), lora_r=4, lora_alpha=8.0, batch_size=4,
                lr=1e-2, max_seq_len=64, amp_dtype="float32", log_every=1, seed=0, max_steps=6)
    return TrainConfig(**{**base, **changes})


def adapter(out: Path, name: str = "adapter") -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / name / "adapter_model.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=tol), (k, (a[k] - b[k]).abs().max())


def losses(result) -> list[float]:
    return [loss for _, loss in result.losses]


def test_lora_run_lowers_the_loss_and_touches_only_lora(tok, files, tmp_path):
    model = tiny_model(tok.vocab_size)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config(files, tmp_path / "run", max_steps=24, eval_data=files["eval"], eval_every=8)
    result = fit(model, tok, cfg)

    first, last = losses(result)[:3], losses(result)[-3:]
    assert sum(last) < 0.7 * sum(first)
    assert [e["step"] for e in result.evals] == [8, 16, 24]
    assert result.evals[-1]["eval_loss"] < result.evals[0]["eval_loss"]
    assert result.best_eval_loss == min(e["eval_loss"] for e in result.evals)
    assert math.isclose(result.evals[0]["eval_ppl"], math.exp(result.evals[0]["eval_loss"]))
    after = model.state_dict()
    assert lora_modules(model)
    for k, v in base.items():  # the base weights are frozen
        assert torch.equal(after[k], v), k
    out = tmp_path / "run"
    assert_close(adapter(out), adapter_state_dict(model), 0)  # in-memory names -> file keys
    assert (out / "best" / "adapter_config.json").exists() and (out / "loss.png").exists()
    saved = TrainConfig.from_json(out / "config.json")  # what ran: "auto" resolved
    assert saved.device == "cpu" and saved.amp_dtype in ("float32", "bfloat16")
    assert saved == dataclasses.replace(cfg, device="cpu", amp_dtype=saved.amp_dtype)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 25))
    assert [r["step"] for r in records if "eval_loss" in r] == [8, 16, 24]
    assert result.output_dir == out / "adapter" and result.checkpoint_dir == latest_checkpoint(
        out / "checkpoints")


def test_full_training_updates_every_weight(tok, files, tmp_path):
    model = tiny_model(tok.vocab_size)
    before = {k: v.clone() for k, v in model.named_parameters()}
    result = fit(model, tok, config(files, tmp_path / "run", full=True, lr=1e-3, max_steps=3))
    assert not lora_modules(model)
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), name
    assert result.output_dir == tmp_path / "run" / "model"
    assert any(result.output_dir.iterdir())


def test_stop_and_resume_equals_an_uninterrupted_run(tok, files, tmp_path):
    # Dropout on, an epoch boundary crossed (6 steps an epoch), evals on both sides of the stop.
    changes = dict(max_steps=9, lora_dropout=0.1, warmup_steps=2, save_every=2,
                   eval_data=files["eval"], eval_every=3)
    whole = fit(tiny_model(tok.vocab_size), tok, config(files, tmp_path / "a", **changes))
    part1 = fit(tiny_model(tok.vocab_size), tok,
                  config(files, tmp_path / "b", stop_after=4, **changes))
    assert part1.steps == 4 and [s for s, _ in part1.losses] == [1, 2, 3, 4]
    part2 = fit(tiny_model(tok.vocab_size), tok,
                  config(files, tmp_path / "b", resume=True, **changes))

    assert [s for s, _ in part2.losses] == [5, 6, 7, 8, 9]
    assert losses(part1) + losses(part2) == pytest.approx(losses(whole), abs=1e-6, rel=0)
    assert [e["eval_loss"] for e in part1.evals + part2.evals] == pytest.approx(
        [e["eval_loss"] for e in whole.evals], abs=1e-6, rel=0)
    assert part2.best_eval_loss == pytest.approx(whole.best_eval_loss, abs=1e-6)
    assert_close(adapter(tmp_path / "b"), adapter(tmp_path / "a"), 1e-6)
    assert_close(adapter(tmp_path / "b", "best"), adapter(tmp_path / "a", "best"), 1e-6)
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in
                     (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]


def test_resume_refuses_another_config_and_fresh_runs_keep_unfinished_ones(tok, files, tmp_path):
    out = tmp_path / "run"
    fit(tiny_model(tok.vocab_size), tok, config(files, out, stop_after=2))
    with pytest.raises(CheckpointError, match=r"lr: 0\.01 in the checkpoint, 0\.02 now"):
        fit(tiny_model(tok.vocab_size), tok, config(files, out, lr=2e-2, resume=True))
    with pytest.raises(CheckpointError, match="batch_size: 4 in the checkpoint, 2 now"):
        fit(tiny_model(tok.vocab_size), tok, config(files, out, batch_size=2, resume=True))
    with pytest.raises(CheckpointError, match="unfinished run: pass resume=True"):
        fit(tiny_model(tok.vocab_size), tok, config(files, out))
    other_base = tiny_model(tok.vocab_size, seed=1)
    with pytest.raises(CheckpointError, match="another base model"):
        fit(other_base, tok, config(files, out, resume=True))


def test_torn_or_damaged_checkpoints_are_never_loaded(tok, files, tmp_path):
    out = tmp_path / "run"
    fit(tiny_model(tok.vocab_size), tok, config(files, out, stop_after=2))
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt.name == "step-00000002"
    # A crash in the middle of a save leaves only a temporary folder: it is not a checkpoint.
    torn = out / "checkpoints" / ".tmp-step-00000004-123"
    torn.mkdir()
    (torn / "state.pt").write_bytes(b"partial")
    assert latest_checkpoint(out / "checkpoints") == ckpt
    blob = bytearray((ckpt / "trainable.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (ckpt / "trainable.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="checksum"):
        fit(tiny_model(tok.vocab_size), tok, config(files, out, resume=True))


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tok, files, tmp_path,
                                                                 monkeypatch):
    out = tmp_path / "run"
    writes = []

    def fill_up(path, payload):
        if path.parent.name.startswith(".step-"):  # replace_folder's temporary folder
            writes.append(path.name)
        if len(writes) > 3:  # the disk fills up in the middle of the second checkpoint
            raise OSError(28, "No space left on device")
        real_write(path, payload)

    real_write = checkpoint.atomic_write
    monkeypatch.setattr(checkpoint, "atomic_write", fill_up)
    with pytest.raises(OSError, match="No space left"):
        fit(tiny_model(tok.vocab_size), tok, config(files, out, save_every=2))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    monkeypatch.undo()
    resumed = fit(tiny_model(tok.vocab_size), tok, config(files, out, resume=True))
    assert [s for s, _ in resumed.losses] == [3, 4, 5, 6]


def test_a_global_batch_with_no_trained_token_is_a_zero_loss_step(tok, tmp_path):
    # load_jsonl drops such rows; a hand-built dataset can still hold them (was 0 / 0).
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    samples = [Sample(ids, [IGNORE_INDEX] * len(ids)) for _ in range(4)]
    dataset = JsonlDataset(samples, pad_id=0, max_seq_len=64)
    result = train(tiny_model(tok.vocab_size), dataset,
                   config({"train": None}, tmp_path, batch_size=2, max_steps=2))
    assert losses(result) == [0.0, 0.0] and result.skipped_steps == 0
    assert all(not t.any() for k, t in adapter(tmp_path).items() if "lora_B" in k)


def test_an_error_ends_the_process_group_and_the_progress_bar(tok, files, tmp_path,
                                                             monkeypatch):
    import torch.distributed as dist

    def start(device_name, group=False):  # a process group of one, begun by train() itself
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                world_size=1)
        return 0, 1, torch.device("cpu"), True

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    closed = []
    real_close = train_module.RunLog.close
    monkeypatch.setattr(train_module, "start_distributed", start)
    monkeypatch.setattr(train_module.RunLog, "close",
                        lambda self: (closed.append(True), real_close(self)))
    monkeypatch.setattr(train_module, "lr_at", fail)  # inside the loop, the bar running
    try:
        with pytest.raises(RuntimeError, match="boom"):
            fit(tiny_model(tok.vocab_size), tok, config(files, tmp_path / "run"))
        assert not dist.is_initialized()
        assert closed
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_fresh_run_does_not_report_an_earlier_runs_best(tok, files, tmp_path, monkeypatch):
    first = fit(tiny_model(tok.vocab_size), tok,
                  config(files, tmp_path, max_steps=2, eval_data=files["eval"]))
    assert first.best_dir == tmp_path / "best"
    with pytest.raises(OutputError, match=r"holds an earlier run \(adapter, best, checkpoints, "
                                          r"metrics\.jsonl\): pass overwrite=True"):
        fit(tiny_model(tok.vocab_size), tok, config(files, tmp_path, max_steps=2))
    assert (tmp_path / "best").exists()  # refused: nothing of the earlier run removed
    (tmp_path / "loss.png").write_bytes(b"the earlier run's plot")
    monkeypatch.setattr(train_module, "plot_losses", lambda out: None)  # as without matplotlib
    again = fit(tiny_model(tok.vocab_size), tok,
                  config(files, tmp_path, max_steps=2, overwrite=True))
    assert again.best_dir is None and not (tmp_path / "best").exists()
    assert not (tmp_path / "loss.png").exists()  # no plot rather than the earlier run's


def test_accumulation_equals_one_larger_batch(tok, files, tmp_path):
    small = fit(tiny_model(tok.vocab_size), tok,
                  config(files, tmp_path / "a", batch_size=2, accumulation_steps=3, max_steps=4))
    large = fit(tiny_model(tok.vocab_size), tok,
                  config(files, tmp_path / "b", batch_size=6, max_steps=4))
    assert losses(small) == pytest.approx(losses(large), abs=1e-5, rel=0)
    assert_close(adapter(tmp_path / "a"), adapter(tmp_path / "b"), 1e-5)


@pytest.mark.parametrize("changes", [{"pack": True, "batch_size": 2}, {"amp_dtype": "bfloat16"}],
                         ids=["packed", "bf16-autocast"])
def test_packed_rows_and_bf16_autocast_train(tok, files, tmp_path, changes):
    result = fit(tiny_model(tok.vocab_size), tok,
                   config(files, tmp_path / "run", max_steps=3, **changes))
    assert result.steps == 3 and all(math.isfinite(x) for x in losses(result))
    assert all(t.dtype == torch.float32 for t in adapter(tmp_path / "run").values())


WORKER = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from helpers import fit, tiny_model
from minilora.data.tokenizer import Tokenizer
from minilora.training.loop import TrainConfig, train
tok = Tokenizer.from_file(sys.argv[2])
fit(tiny_model(tok.vocab_size), tok, TrainConfig.from_json(sys.argv[3]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_with_the_same_global_batch(tok, files, tmp_path):
    tok_dir = tok.save(tmp_path / "tok")
    # The processes recompute their blocks (activation checkpointing), the single one does not:
    # the same numbers either way.
    ddp = config(files, tmp_path / "ddp", batch_size=2, accumulation_steps=2, max_steps=4,
                 activation_checkpointing=True)
    ddp.save_json(tmp_path / "ddp.json")
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(TESTS), str(tok_dir), str(tmp_path / "ddp.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs

    single = fit(tiny_model(tok.vocab_size), tok,
                   config(files, tmp_path / "one", batch_size=4, accumulation_steps=2,
                          max_steps=4))
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["loss"] for r in records] == pytest.approx(losses(single), abs=1e-5, rel=0)
    assert_close(adapter(tmp_path / "ddp"), adapter(tmp_path / "one"), 1e-5)


def test_evaluate_is_the_token_weighted_mean_whatever_the_batching(tok, files):
    model = tiny_model(tok.vocab_size).train()
    dataset = load_jsonl(files["eval"], tok, 64)
    by_two, whole = evaluate(model, dataset, 2), evaluate(model, dataset, len(dataset))
    with torch.no_grad():
        per_sample = [(model(b.input_ids, labels=b.labels).loss.item(), b.trained_tokens)
                      for b in (dataset.collate([i]) for i in range(len(dataset)))]
    expected = sum(loss * n for loss, n in per_sample) / sum(n for _, n in per_sample)
    assert by_two["eval_loss"] == pytest.approx(expected, abs=1e-5)
    assert whole["eval_loss"] == pytest.approx(expected, abs=1e-5)
    assert by_two["eval_ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert by_two["eval_tokens"] == dataset.stats.trained_tokens
    assert model.training  # put back


def poison(model, bad_calls):
    """Make the forward calls numbered in bad_calls (from 0) return a NaN loss."""
    calls = [0]

    def hook(module, args, output):
        calls[0] += 1
        if calls[0] - 1 in bad_calls:
            return dataclasses.replace(output, loss=output.loss * float("nan"))
        return output

    model.register_forward_hook(hook)


def test_non_finite_steps_are_skipped_then_stop_the_run(tok, files, tmp_path):
    model = tiny_model(tok.vocab_size)
    poison(model, {1})
    result = fit(model, tok, config(files, tmp_path / "a", max_steps=4, grad_clip=0.0))
    assert result.skipped_steps == 1
    assert math.isnan(result.losses[1][1]) and all(math.isfinite(x) for x in losses(result)[2:])
    assert all(torch.isfinite(t).all() for t in adapter(tmp_path / "a").values())

    model = tiny_model(tok.vocab_size)
    poison(model, set(range(2, 100)))
    with pytest.raises(TrainError, match="stopped at step 5: 3 steps in a row"):
        fit(model, tok, config(files, tmp_path / "b", max_steps=8, max_bad_steps=3))


def test_config_round_trips_and_names_bad_fields(tmp_path):
    cfg = TrainConfig(data="d.jsonl", lora_targets=["q_proj", "v_proj"], max_steps=10, lr=3e-4)
    cfg.save_json(tmp_path / "c.json")
    assert TrainConfig.from_json(tmp_path / "c.json") == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


@pytest.mark.parametrize("field, value, expected", [
    ("lora_r", 0, "lora_r: expected an integer >= 1"),
    ("lora_alpha", -1.0, "lora_alpha must be > 0"),
    ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\)"),
    ("max_seq_len", 0, "max_seq_len: expected an integer >= 1"),
    ("batch_size", True, "batch_size: expected int"),
    ("lr", 0.0, "lr: expected a finite number > 0"),
    ("amp_dtype", "fp8", "amp_dtype: expected one of"),
    ("full", "yes", "full: expected bool"),
    ("lora_targets", 3, "lora_targets: expected"),
])
def test_config_validation(field, value, expected):
    with pytest.raises(ValueError, match=expected):
        TrainConfig(**{field: value})


def test_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 104) for s in range(104)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[54] == pytest.approx(0.55) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_dtype_auto_follows_the_hardware():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if native_bf16(cpu) else None)
    assert autocast_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        autocast_dtype("float16", cpu)


def test_a_fresh_run_over_a_finished_one_checkpoints_its_own_state(tok, files, tmp_path):
    out = tmp_path / "run"
    fit(tiny_model(tok.vocab_size), tok, config(files, out, lr=1e-2))
    fit(tiny_model(tok.vocab_size), tok, config(files, out, lr=2e-2, overwrite=True))
    state = torch.load(latest_checkpoint(out / "checkpoints") / "state.pt", weights_only=True)
    assert state["config"]["lr"] == 2e-2


def test_resume_without_a_checkpoint_is_a_fresh_run_that_keeps_a_finished_one(tok, files,
                                                                              tmp_path):
    import shutil

    out = tmp_path / "run"
    fit(tiny_model(tok.vocab_size), tok, config(files, out, max_steps=2))
    shutil.rmtree(out / "checkpoints")  # a finished run whose checkpoints were cleaned away
    before = {p.name: p.read_bytes() for p in (out / "adapter").iterdir()}
    metrics = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(OutputError, match="holds an earlier run"):
        fit(tiny_model(tok.vocab_size), tok, config(files, out, max_steps=2, resume=True))
    assert {p.name: p.read_bytes() for p in (out / "adapter").iterdir()} == before
    assert (out / "metrics.jsonl").read_bytes() == metrics


# ---------------------------------------------------------------------------------------------
# The config alone, the checkpoint module alone, the command line's words
# ---------------------------------------------------------------------------------------------


def test_a_config_with_several_bad_fields_names_them_all_in_one_error():
    with pytest.raises(ConfigError) as caught:
        TrainConfig(lr=0.0, batch_size=0, full="yes", amp_dtype="fp8", lora_alpha=-1.0,
                    device="banana")
    err = caught.value
    assert list(err.fields) == ["full", "lora_alpha", "batch_size", "lr", "amp_dtype", "device"]
    for text in ("TrainConfig.full: expected bool", "TrainConfig.lora_alpha must be > 0",
                 "TrainConfig.batch_size: expected an integer >= 1",
                 "TrainConfig.lr: expected a finite number > 0",
                 "TrainConfig.amp_dtype: expected one of", "TrainConfig.device: unknown device"):
        assert text in str(err), text


def test_several_bad_lora_fields_are_each_named_under_the_train_config_name():
    # LoraConfig checks them all at once; TrainConfig names each under its own field
    with pytest.raises(ConfigError) as caught:
        TrainConfig(lora_alpha=0.0, lora_dropout=1.0, lora_targets=[], lora_init="xavier",
                    lora_exclude="all-linear")
    err = caught.value
    assert list(err.fields) == ["lora_alpha", "lora_dropout", "lora_targets", "lora_exclude",
                                "lora_init"]
    for text in ("TrainConfig.lora_alpha must be > 0, got 0.0",
                 "TrainConfig.lora_dropout must be in [0, 1), got 1.0",
                 "TrainConfig.lora_targets is empty; name at least one module suffix",
                 "TrainConfig.lora_exclude cannot be 'all-linear'",
                 "TrainConfig.lora_init must be one of ('gaussian', 'kaiming', 'pissa')"):
        assert text in str(err), text
    assert "LoraConfig" not in str(err)


def test_the_config_module_imports_no_torch():
    code = ("import sys; import minilora.training.config, minilora.core.checks; "
            "from minilora.cli.main import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_bad_train_setting_is_answered_before_torch_loads(tmp_path):
    # Every bad field named in one line, exit 2, and torch never imported: the answer comes in
    # a fraction of a second, not after the second and 230 MB torch takes.
    code = ("import sys; from minilora.cli.main import main; "
            "code = main(['train', '--lr', '0', '--r', '0', '--data', 'x.jsonl']); "
            "assert code == 2, code; assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--lr" in done.stderr and "--r" in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())


def test_an_old_config_with_dtype_still_loads(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"data": "d.jsonl", "dtype": "float32"}))
    assert TrainConfig.from_json(tmp_path / "old.json").amp_dtype == "float32"


def checkpoint_parts(tok, files, cfg):
    """A LoRA model, its optimizer and a batch plan, as train() builds them."""
    torch.manual_seed(cfg.seed)
    model = tiny_model(tok.vocab_size)
    inject_lora(model, cfg.lora_config())
    mark_trainable(model)
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    plan = BatchPlan(load_datasets(cfg, tok)[0], cfg, rank=0, world=1)
    return model, params, optimizer, plan


def test_the_checkpoint_resumes_exactly_what_it_saved(tok, files, tmp_path):
    cfg = config(files, tmp_path / "run")
    model, params, optimizer, plan = checkpoint_parts(tok, files, cfg)
    for p in params:  # one optimizer step, so that the optimizer has state to save
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = checkpoint.RunState(step=3, skipped=1, bad_in_a_row=0, best_eval_loss=2.5)
    folder = tmp_path / "run" / checkpoint.CHECKPOINTS
    saved = checkpoint.save_checkpoint(folder, model, optimizer, None, cfg, plan, state)
    assert saved == checkpoint.latest_checkpoint(folder) == folder / "step-00000003"

    other_cfg = dataclasses.replace(cfg, seed=7)  # another LoRA init, overwritten by the load
    other, other_params, other_optimizer, _ = checkpoint_parts(tok, files, other_cfg)
    loaded = checkpoint.load_checkpoint(folder, other, other_optimizer, None, cfg, plan)
    assert loaded == state
    for a, b in zip(params, other_params, strict=True):
        assert torch.equal(a, b)
    want, got = optimizer.state_dict(), other_optimizer.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for key, state_of in want["state"].items():
        for name, value in state_of.items():
            torch.testing.assert_close(got["state"][key][name], value, rtol=0, atol=0)

    with pytest.raises(CheckpointError, match=r"lr: 0\.01 in the checkpoint, 0\.5 now"):
        checkpoint.load_checkpoint(folder, other, other_optimizer, None,
                                   dataclasses.replace(cfg, lr=0.5), plan)


def checkpoint_at_step_one(tok, files, tmp_path):
    """A LoRA run's parts and the checkpoint it saved at step 1: (cfg, model, optimizer, plan,
    checkpoints folder, checkpoint path)."""
    cfg = config(files, tmp_path / "run")
    model, _, optimizer, plan = checkpoint_parts(tok, files, cfg)
    folder = tmp_path / "run" / checkpoint.CHECKPOINTS
    path = checkpoint.save_checkpoint(folder, model, optimizer, None, cfg, plan,
                                      checkpoint.RunState(step=1))
    return cfg, model, optimizer, plan, folder, path


def test_a_checkpoint_written_with_dtype_resumes_under_amp_dtype(tok, files, tmp_path):
    cfg, model, optimizer, plan, folder, path = checkpoint_at_step_one(tok, files, tmp_path)
    state = torch.load(path / "state.pt", weights_only=True)
    state["config"]["dtype"] = state["config"].pop("amp_dtype")  # as an older minilora wrote
    rewrite_state(path, state)
    assert checkpoint.load_checkpoint(folder, model, optimizer, None, cfg, plan).step == 1


def test_a_checkpoint_from_before_named_adapters_and_new_fields_resumes(tok, files, tmp_path):
    # As the minilora before this layout wrote it: the default adapter's weights under
    # <path>.lora_A.weight, and a config without the fields added since (use_dora, ...).
    import hashlib

    from safetensors.torch import load_file, save_file

    cfg, model, optimizer, plan, folder, path = checkpoint_at_step_one(tok, files, tmp_path)
    saved = load_file(path / "trainable.safetensors")
    assert any(".lora_A.default.weight" in n for n in saved)
    save_file({n.replace(".default.weight", ".weight"): t for n, t in saved.items()},
              path / "trainable.safetensors")
    state = torch.load(path / "state.pt", weights_only=True)
    for added in ("use_dora", "replay", "replay_ratio", "quantize"):
        state["config"].pop(added)
    state["trainable_sha256"] = hashlib.sha256(
        (path / "trainable.safetensors").read_bytes()).hexdigest()
    rewrite_state(path, state, "trainable.safetensors")
    fresh, _, fresh_optimizer, _ = checkpoint_parts(tok, files, cfg)
    with torch.no_grad():
        for p in fresh_optimizer.param_groups[0]["params"]:
            p.zero_()
    assert checkpoint.load_checkpoint(folder, fresh, fresh_optimizer, None, cfg, plan).step == 1
    want = checkpoint.trainable(model)
    for name, value in checkpoint.trainable(fresh).items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0)


def rewrite_state(path: Path, state: dict, *also: str) -> None:
    import hashlib

    torch.save(state, path / "state.pt")
    manifest = json.loads((path / "manifest.json").read_text())
    for name in ("state.pt", *also):
        manifest["files"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture()
def base_dir(tok, tmp_path):
    from minilora.model.io import save_model

    save_model(tiny_model(tok.vocab_size), tmp_path / "base")
    tok.save(tmp_path / "base")
    return tmp_path / "base"


def cli(argv, capsys):
    from minilora.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_errors_name_every_bad_flag_and_no_library_word(files, base_dir, tmp_path,
                                                            capsys):
    code, err = cli(["train", "--model", base_dir, "--data", files["train"], "--out",
                     tmp_path / "out", "--lr", "0", "--batch-size", "0", "--alpha", "-1",
                     "--amp-dtype", "fp8"], capsys)
    assert code == 2
    assert err.splitlines() == [
        "minilora train: error: --alpha must be > 0, got -1.0; --batch-size: expected an "
        "integer >= 1, got 0; --lr: expected a finite number > 0, got 0.0; --amp-dtype: "
        "expected one of ('auto', 'float32', 'bfloat16', 'float16'), got 'fp8'"]
    assert not (tmp_path / "out").exists()


def test_the_old_dtype_flag_still_works_with_a_note(files, base_dir, tmp_path, capsys):
    code, err = cli(["train", "--model", base_dir, "--data", files["train"], "--out",
                     tmp_path / "out", "--dtype", "float32", "--max-steps", "1",
                     "--batch-size", "4", "--max-seq-len", "64", "--r", "2"], capsys)
    assert code == 0, err
    assert err.splitlines()[0] == "minilora train: note: --dtype is now --amp-dtype"
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["amp_dtype"] == "float32" and "dtype" not in saved


def test_an_unfinished_run_is_named_in_the_command_lines_words(files, base_dir, tmp_path,
                                                               capsys):
    argv = ["train", "--model", base_dir, "--data", files["train"], "--out", tmp_path / "out",
            "--max-steps", "3", "--batch-size", "4", "--max-seq-len", "64", "--r", "2"]
    assert cli(argv + ["--stop-after", "1"], capsys)[0] == 0
    code, err = cli(argv, capsys)
    assert code == 2
    assert err.splitlines()[-1].endswith(
        "step-00000001 holds an unfinished run: pass --resume to continue it, or train into "
        "another --out")
    assert "resume=True" not in err


def test_the_loss_plot_skips_a_line_torn_by_a_killed_run(tmp_path):
    # A resumed run appends to the metrics.jsonl a killed one left with a torn last line: the
    # plot at the end draws what is whole instead of failing the finished run with a traceback.
    from minilora.training.run_log import plot_losses

    lines = [json.dumps({"step": 1, "loss": 2.0}), '{"step": 2, "lo',
             json.dumps({"step": 2, "loss": 1.5}), "[" * 100_000,
             json.dumps({"step": 3, "loss": None, "eval_loss": 1.2})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    png = plot_losses(tmp_path)
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradient_sync_leaves_none_where_no_process_had_a_gradient(tmp_path):
    # A parameter no process gave a gradient (an unused expert of a model without MiniMind's
    # zero-gradient trick) keeps None, as in one process: AdamW then skips it, where a zero
    # gradient would still move it through momentum and weight decay.
    import torch.distributed as dist

    from minilora.training.distributed import sync_gradients

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
        used.grad = torch.tensor([1.0, 2.0, 3.0])
        loss = sync_gradients([used, unused], torch.tensor(0.5), world=2)  # the path of N > 1
        assert unused.grad is None
        assert used.grad.tolist() == [1.0, 2.0, 3.0] and float(loss) == 0.5
    finally:
        dist.destroy_process_group()


def test_a_pissa_run_writes_an_adapter_for_the_original_base(tok, files, base_dir, tmp_path):
    # PiSSA trains over the residual of the base's top-r SVD; what the run writes is the plain
    # LoRA (rank 2r) that gives the same model on the original base, which is what chat, merge
    # and PEFT load (the residual base is never written).
    from minilora.adapters.folder import load_adapter
    from minilora.model.io import load_model

    cfg = config(files, tmp_path / "run", lora_init="pissa", model=str(base_dir),
                 eval_data=files["train"], eval_every=3)
    trained = load_model(base_dir)
    fit(trained, tok, cfg)
    ids = torch.tensor([tok.encode("The quick brown fox")])
    want = trained.eval()(ids).logits
    for saved in ("adapter", "best"):
        model = load_model(base_dir)
        config_read = load_adapter(model, tmp_path / "run" / saved)  # the fingerprint fits
        assert config_read.r == 2 * cfg.lora_r and config_read.init != "pissa"
        torch.testing.assert_close(model.eval()(ids).logits, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.equal(load_model(base_dir)(ids).logits, want)  # it did learn something
