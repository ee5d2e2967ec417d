"""A new user's path through the command line: target typos, adapters that name their base,
resume without retyping, Ctrl-C, a rerun of a saved config, the opening block, the small things."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli, tiny_base_folder, tiny_model, tiny_tokenizer, write_jsonl
from minilora.cli import main
from minilora.model.io import save_model
from minilora.training import loop as train_module

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tiny_base_folder(tmp_path_factory.mktemp("userpath"), repeat=4)
    tokenizer = tiny_tokenizer()
    save_model(tiny_model(tokenizer.vocab_size, hidden=48), root / "wide")
    tokenizer.save(root / "wide")
    return root


run = run_cli


def train_args(workdir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(workdir / "base"), "--data", str(workdir / "train.jsonl"),
            "--out", str(out), "--batch-size", "4", "--r", "2", "--seed", "0", *extra]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_target_typo_is_one_line_naming_it_and_the_nearest(workdir: Path, tmp_path: Path,
                                                             capsys) -> None:
    out = tmp_path / "run"
    code, _, err = run(train_args(workdir, out, "--max-steps", "1", "--targets", "q_proj,v_prj"),
                       capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert "'v_prj' (nearest: v_proj" in last and "q_proj'" not in last
    assert len(last) < 300
    assert not (out / "adapter").exists()


@pytest.fixture(scope="module")
def trained(workdir: Path) -> Path:
    out = workdir / "run"
    assert main(train_args(workdir, out, "--max-steps", "4", "--save-every", "1",
                           "--stop-after", "2")) == 0
    return out


def test_resume_needs_only_the_out_folder(trained: Path, capsys) -> None:
    saved = json.loads((trained / "config.json").read_text())
    code, out, err = run(["train", "--resume", "--out", str(trained)], capsys)
    assert code == 0, err
    assert "resumed at step 2, trained 2 steps in" in out
    again = json.loads((trained / "config.json").read_text())
    assert {k: v for k, v in again.items() if k not in ("resume", "stop_after")} == {
        k: v for k, v in saved.items() if k not in ("resume", "stop_after")}
    steps = [json.loads(x)["step"] for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # logged at each end (log_every 10), once each


def test_resume_of_a_folder_without_a_run_says_so(tmp_path: Path, capsys) -> None:
    code, _, err = run(["train", "--resume", "--out", str(tmp_path / "nothing")], capsys)
    assert code == 2
    assert "no run to continue" in err and "Traceback" not in err


def test_adapter_names_its_base_and_peft_loads_it(workdir: Path, trained: Path) -> None:
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(workdir / "base")
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(trained / "adapter"))
    assert model.peft_config["default"].base_model_name_or_path == str(workdir / "base")


def test_adapter_on_another_base_says_so_first(workdir: Path, trained: Path, capsys) -> None:
    code, _, err = run(["generate", "--model", str(workdir / "wide"), "--adapter",
                        str(trained / "adapter"), "--max-new-tokens", "1", "hi"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert f"was trained on another base ({workdir / 'base'}); it does not fit" in lines[0]
    assert lines[0].index("another base") < lines[0].index("keys")


def test_a_rerun_of_a_saved_config_writes_a_new_folder(trained: Path, tmp_path: Path, capsys,
                                                      monkeypatch) -> None:
    before = files_of(trained)
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["train", "--config", str(trained / "config.json"), "--max-steps", "1"],
                         capsys)
    assert code == 0, err
    assert files_of(trained) == before
    (fresh,) = (tmp_path / "runs").iterdir()
    assert (fresh / "adapter" / "adapter_config.json").is_file()


def interrupt_at_step(monkeypatch, at: int):
    """Ctrl-C as the run logs step `at`; returns RunLog.step as it was, to put back."""
    real = train_module.RunLog.step

    def step(self, step, *args, **kwargs):
        if step == at:
            raise KeyboardInterrupt
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(train_module.RunLog, "step", step)
    return real


def test_ctrl_c_names_the_kept_checkpoint_and_the_resume_command(workdir: Path, tmp_path: Path,
                                                                 capsys, monkeypatch) -> None:
    interrupt_at_step(monkeypatch, 3)
    out = tmp_path / "run"
    code, _, err = run(train_args(workdir, out, "--max-steps", "6", "--save-every", "1"), capsys)
    assert code == 130
    assert f"kept {out / 'checkpoints' / 'step-00000003'}" in err  # the step it stopped at
    assert f"Resume with: minilora train --resume --out {out}" in err


def test_ctrl_c_before_any_checkpoint_gives_a_command_that_works(workdir: Path, tmp_path: Path,
                                                                  capsys, monkeypatch) -> None:
    real = train_module._step

    def interrupted_at_once(*args, **kwargs):
        raise KeyboardInterrupt  # in the first step: nothing done, nothing to keep

    monkeypatch.setattr(train_module, "_step", interrupted_at_once)
    out = tmp_path / "run"
    argv = train_args(workdir, out, "--max-steps", "4")
    code, _, err = run(argv, capsys)
    assert code == 130 and not (out / "checkpoints").exists()
    command = err.strip().splitlines()[-1].split("with: ")[-1]
    assert command == f"minilora train --resume --out {out}", err
    monkeypatch.setattr(train_module, "_step", real)
    code, _, err = run([*argv, "--resume"], capsys)  # what it says to run: it starts over
    assert code == 0, err
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_the_run_is_described_before_the_first_step(workdir: Path, tmp_path: Path,
                                                    capsys) -> None:
    out = tmp_path / "run"
    code, _, err = run(train_args(workdir, out, "--max-steps", "1"), capsys)
    assert code == 0
    block = {line.split()[1]: line for line in err.splitlines() if line.startswith("run: ")}
    assert set(block) >= {"device", "precision", "threads", "parameters", "adapted", "steps",
                          "per"}
    # "auto" resolved, with the reason: this machine's CPU flags, read here on their own
    flags = Path("/proc/cpuinfo").read_text(errors="replace")
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert block["precision"].endswith("bfloat16 autocast (this CPU has avx512_bf16/AMX)")
    else:
        assert "float32 (this CPU has no bfloat16 units" in block["precision"]
    assert "14 LoRA modules" in block["adapted"]  # 2 layers x 7 projections
    config = json.loads((out / "config.json").read_text())
    assert config["amp_dtype"] in ("float32", "bfloat16") and config["device"] == "cpu"
    assert config["model"] == str(workdir / "base")


def test_help_and_argument_errors_do_not_import_torch() -> None:
    # torch alone takes about a second to import: help and bad arguments must not wait for it
    code = (
        "import sys\n"
        "from minilora.cli.main import main\n"
        "for argv in (['--help'], ['chat', '--help'], ['chat', '--temprature', '1'],\n"
        "             ['nonsense']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stderr


@pytest.mark.parametrize("argv, near", [
    (["train", "--lrr", "1"], "--lr"),
    (["train", "--max-stpes", "3"], "--max-steps"),
    (["chat", "--temprature", "1"], "--temperature"),
    (["eval", "--taks", "x"], "--tasks"),
])
def test_a_flag_typo_names_the_nearest_flag_of_that_subcommand(argv, near, capsys) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.strip() == (f"minilora {argv[0]}: error: unknown argument {argv[1]}; did you mean "
                           f"{near}? (see `minilora {argv[0]} --help`)")


def test_train_help_shows_every_default(capsys) -> None:
    from minilora.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    train = sub.choices["train"]
    missing = [a.dest for a in train._actions if a.option_strings and a.dest != "help"
               and a.dest not in ("config", "tasks") and "(default: " not in (a.help or "")]
    assert not missing


def test_info_reads_run_and_checkpoint_folders(trained: Path, workdir: Path, capsys) -> None:
    code, out, err = run(["info", "--json", str(trained)], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["base"] == str(workdir / "base")
    assert info["adapter r"] == 2  # the adapter the run wrote, described with it
    checkpoint = Path(info["checkpoint"])
    assert checkpoint.parent == trained / "checkpoints"
    code, out, err = run(["info", "--json", str(checkpoint)], capsys)
    assert code == 0, err
    info = json.loads(out)
    step = int(checkpoint.name.removeprefix("step-"))
    assert info["step"] == f"{step} of 4"
    assert info["resume"] == f"minilora train --resume --out {trained}"


@pytest.mark.parametrize("word", ["exit", "quit", "/quit"])
def test_chat_ends_on_exit_words(workdir: Path, capsys, monkeypatch, word: str) -> None:
    import io

    import minilora.decoding.chat

    calls = []
    monkeypatch.setattr(minilora.decoding.chat, "stream_generate",
                        lambda model, ids, **kw: calls.append(ids) or iter([5, 6]))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"hi\n{word}\nhello again\n"))
    assert main(["chat", "--model", str(workdir / "base")]) == 0
    assert len(calls) == 1


def test_ctrl_c_stops_the_reply_not_the_chat(workdir: Path, capsys, monkeypatch) -> None:
    import io

    import minilora.decoding.chat

    calls = []

    def interrupted(model, ids, **kw):
        calls.append(ids)
        yield 5
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(minilora.decoding.chat, "stream_generate", interrupted)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhello again\n"))
    assert main(["chat", "--model", str(workdir / "base")]) == 0
    assert len(calls) == 2
    assert "[stopped]" in capsys.readouterr().out


def test_eval_tasks_shows_progress(workdir: Path, tmp_path: Path, capsys) -> None:
    questions = [{"task": "name", "messages": [{"role": "user", "content": f"Q{i}?"}],
                  "expected": "Mini", "match": "contains"} for i in range(3)]
    tasks = write_jsonl(tmp_path / "tasks.jsonl", questions)
    code, out, err = run(["eval", "--model", str(workdir / "base"), "--tasks", str(tasks),
                          "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    assert "3/3" in err and "question" in err


@pytest.mark.parametrize("flag, value, low", [("--batch-size", "0", 1),
                                             ("--max-seq-len", "1", 2),
                                             ("--max-new-tokens", "0", 1)])
def test_eval_settings_are_checked_as_flags(flag: str, value: str, low: int, workdir: Path,
                                            capsys) -> None:
    code, _, err = run(["eval", "--model", str(workdir / "base"), "--data",
                        str(workdir / "train.jsonl"), flag, value], capsys)
    assert code == 2
    assert err.strip() == f"minilora eval: error: {flag}: expected an integer >= {low}, got {value}"


def test_eval_json_is_never_written_over_an_input(workdir: Path, tmp_path: Path,
                                                 capsys) -> None:
    data = tmp_path / "val.jsonl"
    data.write_bytes((workdir / "train.jsonl").read_bytes())
    before = data.read_bytes()
    code, _, err = run(["eval", "--model", str(workdir / "base"), "--data", str(data),
                        "--json", str(data)], capsys)
    assert code == 2 and "--json" in err and "--data" in err, err
    assert data.read_bytes() == before  # the user's data is untouched
    report = tmp_path / "report.json"
    code, _, err = run(["eval", "--model", str(workdir / "base"), "--data", str(data),
                        "--json", str(report)], capsys)
    assert code == 0, err
    assert json.loads(report.read_text())["eval_loss"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_preset_sets_its_values_under_the_flags_given(workdir: Path, tmp_path: Path,
                                                      capsys) -> None:
    from minilora.cli.train import PRESETS

    out = tmp_path / "run"
    code, _, err = run(train_args(workdir, out, "--preset", "small-data", "--max-steps", "1"),
                       capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["max_steps"] == 1  # given
    preset = {k: v for k, v in PRESETS["small-data"].items() if k not in ("max_steps",
                                                                          "batch_size")}
    assert {k: config[k] for k in preset} == preset
    assert config["batch_size"] == 4  # given by train_args


def test_replay_mixes_in_ratio_rows_of_another_file(workdir: Path, tmp_path: Path,
                                                    capsys) -> None:
    replay = write_jsonl(tmp_path / "replay.jsonl", [
        {"conversations": [{"role": "user", "content": f"What is {i} plus 1?"},
                           {"role": "assistant", "content": str(i + 1)}]} for i in range(5)])
    out = tmp_path / "run"
    code, _, err = run(train_args(workdir, out, "--max-steps", "1", "--replay", str(replay),
                                  "--replay-ratio", "0.5"), capsys)
    assert code == 0, err
    assert f"data: replay 12 rows of {replay} beside 24 training rows" in err
    assert "run: per step    4 rows" in err
    config = json.loads((out / "config.json").read_text())
    assert (config["replay"], config["replay_ratio"]) == (str(replay), 0.5)


def test_packaging_uses_the_spdx_licence_and_a_setuptools_that_reads_it() -> None:
    import re

    import tomllib

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["license"] == "MIT"  # PEP 639: a string, not a table
    (setuptools,) = [r for r in project["build-system"]["requires"] if "setuptools" in r]
    assert int(re.search(r">=\s*(\d+)", setuptools)[1]) >= 77  # the first to accept it
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "../shared" not in readme and "minilora combine" in readme
    assert "--tasks" in readme and "--config" in readme


def test_a_bare_pth_run_resumes_without_retyping_its_model_config(workdir: Path, tmp_path: Path,
                                                                  capsys) -> None:
    import torch

    from minilora.model.io import load_model

    pth = tmp_path / "full_sft_32.pth"
    torch.save(load_model(workdir / "base").state_dict(), pth)
    out = tmp_path / "run"
    argv = ["train", "--model", str(pth), "--tokenizer", str(workdir / "base"), "--data",
            str(workdir / "train.jsonl"), "--out", str(out), "--batch-size", "4", "--r", "2",
            "--max-steps", "2", "--save-every", "1", "--stop-after", "1"]
    code, _, err = run(argv, capsys)
    assert code == 2  # in train, --config is the settings file: the hint names --model-config
    assert "--model-config FILE" in err and "--config" not in err.replace("--model-config", "")
    code, _, err = run([*argv, "--model-config", str(workdir / "base" / "config.json")], capsys)
    assert code == 0, err
    code, out_text, err = run(["train", "--resume", "--out", str(out)], capsys)
    assert code == 0, err
    assert "resumed at step 1, trained 1 steps in" in out_text


def test_a_rerun_of_a_saved_config_neither_overwrites_nor_resumes(workdir: Path, tmp_path: Path,
                                                                   capsys) -> None:
    first = tmp_path / "first"
    assert main(train_args(workdir, first, "--max-steps", "2", "--save-every", "1",
                           "--stop-after", "1", "--overwrite")) == 0
    saved = json.loads((first / "config.json").read_text())
    assert saved["overwrite"] and saved["stop_after"] == 1
    other = tmp_path / "other"
    assert main(train_args(workdir, other, "--max-steps", "1")) == 0
    before = files_of(other)
    # --overwrite and --stop-after were that command's words: here the folder is refused
    code, _, err = run(["train", "--config", str(first / "config.json"), "--out", str(other)],
                       capsys)
    assert code == 2 and "holds an earlier run" in err
    assert files_of(other) == before
    # and a rerun runs to its end, from step 0, into a new folder
    fresh = tmp_path / "fresh"
    code, out, err = run(["train", "--config", str(first / "config.json"), "--out", str(fresh)],
                         capsys)
    assert code == 0, err
    assert "resumed" not in out and "trained 2 steps" in out
    again = json.loads((fresh / "config.json").read_text())
    assert not again["overwrite"] and not again["resume"] and again["stop_after"] is None
