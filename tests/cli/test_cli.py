"""The command line on a tiny model in a temporary folder: train, chat, merge, info, convert."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import chat_rows, tiny_model, tiny_tokenizer, write_jsonl
from minilora.cli.main import build_parser, main
from minilora.model.io import load_model, save_model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer.vocab_size)
    save_model(model, root / "base")
    tokenizer.save(root / "base")
    write_jsonl(root / "train.jsonl", chat_rows(repeat=4))
    write_jsonl(root / "tasks.jsonl", [
        {"task": "name", "messages": [{"role": "user", "content": "What is your name?"}],
         "expected": "Mini", "match": "contains"},
    ])
    return root


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits on its own for bad arguments and --help
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(workdir: Path) -> Path:
    out = workdir / "run"
    code = main(["train", "--model", str(workdir / "base"), "--data", str(workdir / "train.jsonl"),
                 "--out", str(out), "--max-steps", "6", "--batch-size", "4", "--lr", "1e-2",
                 "--r", "4", "--targets", "q_proj,v_proj", "--seed", "1",
                 "--tasks", str(workdir / "tasks.jsonl")])
    assert code == 0
    return out


def test_train_writes_adapter_metrics_and_config(trained: Path) -> None:
    assert (trained / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((trained / "config.json").read_text())
    assert config["lora_r"] == 4 and config["lora_targets"] == ["q_proj", "v_proj"]
    assert config["max_steps"] == 6
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in x for x in lines)


def expected_reply(workdir: Path, adapter: Path, question: str, max_new_tokens: int) -> str:
    from minilora.adapters.folder import load_adapter
    from minilora.data.tokenizer import Tokenizer
    from minilora.decoding.generation import generate

    model = load_model(workdir / "base")
    load_adapter(model, adapter)
    tok = Tokenizer.from_file(workdir / "base")
    ids, _ = tok.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)
    return tok.decode(generate(model.eval(), ids, max_new_tokens=max_new_tokens,
                               eos_token_id=[tok.im_end_id, tok.eos_token_id]))


@pytest.mark.parametrize("sub", ["adapter", ""], ids=["adapter-folder", "run-folder"])
def test_chat_with_adapter_answers_one_turn(workdir: Path, trained: Path, capsys, sub: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`--adapter runs/<name>` (the run's folder) means the adapter that run wrote."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is your name?\n"))
    code, out, err = run(["chat", "--model", str(workdir / "base"), "--adapter",
                          str(trained / sub), "--max-new-tokens", "8"], capsys)
    assert code == 0, err
    expected = expected_reply(workdir, trained / "adapter", "What is your name?", 8)
    assert out == expected + "\n"


def test_generate_matches_library_generate(workdir: Path, trained: Path, capsys) -> None:
    code, out, err = run(["generate", "--model", str(workdir / "base"), "--adapter",
                          str(trained / "adapter"), "--max-new-tokens", "10",
                          "What is your name?"], capsys)
    assert code == 0, err
    expected = expected_reply(workdir, trained / "adapter", "What is your name?", 10)
    assert out == expected + "\n"


def test_merge_equals_adapter_and_transformers_loads_it(workdir: Path, trained: Path,
                                                       capsys) -> None:
    from transformers import AutoModelForCausalLM

    from minilora.adapters.folder import load_adapter

    merged = workdir / "merged"
    code, _, err = run(["merge", "--model", str(workdir / "base"), "--adapter",
                        str(trained / "adapter"), "--out", str(merged)], capsys)
    assert code == 0, err
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with_adapter = load_model(workdir / "base")
    load_adapter(with_adapter, trained / "adapter")
    expected = with_adapter(ids).logits
    ours = load_model(merged)(ids).logits
    theirs = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, expected, rtol=1e-4, atol=1e-4)
    assert (merged / "tokenizer.json").is_file()


def test_convert_both_ways_round_trips(workdir: Path, trained: Path, capsys) -> None:
    from safetensors.torch import load_file

    pth = workdir / "lora.pth"
    back = workdir / "back"
    base = ["--model", str(workdir / "base")]
    # MiniMind's format holds square layers only: q_proj is, v_proj (GQA) is not
    square = workdir / "square"
    code, _, err = run(["train", *base, "--data", str(workdir / "train.jsonl"), "--out",
                        str(square), "--max-steps", "2", "--targets", "square"], capsys)
    assert code == 0, err
    code, _, err = run(["convert", *base, str(square / "adapter"), str(pth)], capsys)
    assert code == 0, err
    raw = torch.load(pth, weights_only=True)
    assert raw and all(".lora.A.weight" in k or ".lora.B.weight" in k for k in raw)
    code, _, err = run(["convert", *base, str(pth), str(back)], capsys)
    assert code == 0, err
    a = load_file(square / "adapter" / "adapter_model.safetensors")
    b = load_file(back / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    # MiniMind's scale is 1: B carries the alpha / r factor after the round trip
    for key in a:
        if "lora_A" in key:
            torch.testing.assert_close(a[key], b[key])


def test_info_describes_model_and_adapter(workdir: Path, trained: Path, capsys) -> None:
    code, out, err = run(["info", "--json", str(trained / "adapter")], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["r"] == 4 and info["base fingerprint"].startswith("sha256:")
    assert info["lora parameters"] == sum(
        4 * (i + o) for i, o in [(32, 32), (32, 16)]) * 2  # q (32->32), v (32->16), 2 layers
    code, out, err = run(["info", "--json", str(workdir / "base")], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["parameters"] == sum(p.numel() for p in load_model(workdir / "base").parameters())


@pytest.mark.parametrize("argv, says", [
    (["train", "--r", "x"], "--r"),
    (["train", "--r", "0", "--data", "{data}", "--model", "{base}"], "--r: expected"),
    (["train", "--data", "{missing}", "--model", "{base}"], "missing.jsonl"),
    (["train", "--amp-dtype", "float64", "--data", "{data}", "--model", "{base}"],
     "--amp-dtype: expected one of"),
    (["chat", "--model", "{missing}"], "missing.jsonl"),
    (["generate", "--model", "{base}", "--adapter", "{missing}", "hi"], "missing.jsonl"),
    (["info", "{missing}"], "missing.jsonl"),
    (["merge", "--model", "{base}", "--out", "{out}"], "--adapter"),
    (["nonsense"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(workdir: Path, capsys, argv: list[str],
                                         says: str) -> None:
    names = {"data": workdir / "train.jsonl", "base": workdir / "base",
             "missing": workdir / "missing.jsonl", "out": workdir / "unused"}
    argv = [a.format(**names) for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert says in err
    assert "Traceback" not in err


def test_every_argument_has_help() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"minilora {name} {action.option_strings or action.dest}"


def test_train_flags_take_their_help_from_the_config_fields() -> None:
    import dataclasses

    from minilora.training.loop import TrainConfig

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    helps = {a.dest: a.help for a in subparsers.choices["train"]._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"], f.name  # one line of doc per field
        if f.name != "device":  # the library sets it; no flag
            assert helps[f.name].startswith(f.metadata["help"]), f.name


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "minilora", "--version"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0 and done.stdout.startswith("minilora ")


def test_bare_pth_takes_config_and_merge_convert_need_no_tokenizer(
        workdir: Path, trained: Path, tmp_path: Path, capsys) -> None:
    """MiniMind's layout: weights alone in out/, no config.json, tokenizer.json elsewhere."""
    from minilora.adapters.folder import load_adapter, save_adapter
    from minilora.lora.injection import inject_lora
    from minilora.lora.layer import LoraConfig

    (tmp_path / "out").mkdir()
    pth = tmp_path / "out" / "full_sft_32.pth"
    torch.save(load_model(workdir / "base").state_dict(), pth)
    config = str(workdir / "base" / "config.json")
    code, _, err = run(["info", str(pth)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "rms_norm_eps" in err and "--model-config" in err
    code, out, err = run(["info", "--json", str(pth), "--config", config], capsys)
    assert code == 0, err
    assert json.loads(out)["model_type"] == "llama"

    merged = tmp_path / "merged"
    code, _, err = run(["merge", "--model", str(pth), "--config", config, "--adapter",
                        str(trained / "adapter"), "--out", str(merged)], capsys)
    assert code == 0, err
    assert "no tokenizer found" in err and not (merged / "tokenizer.json").exists()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    expected = load_model(workdir / "base")
    load_adapter(expected, trained / "adapter")
    torch.testing.assert_close(load_model(merged)(ids).logits, expected(ids).logits,
                               rtol=1e-5, atol=1e-5)

    square = load_model(workdir / "base")
    inject_lora(square, LoraConfig(r=2, targets="square"))
    lora_pth = save_adapter(square, tmp_path / "out" / "lora_identity_32.pth", format="minimind")
    code, _, err = run(["convert", "--model", str(pth), "--config", config, str(lora_pth),
                        str(tmp_path / "folder")], capsys)
    assert code == 0, err
    assert (tmp_path / "folder" / "adapter_config.json").is_file()
    code, _, err = run(["combine", "--model", str(pth), "--config", config,
                        f"a={trained / 'adapter'}", f"b={tmp_path / 'folder'}",
                        "--weights", "1", "1", "--out", str(tmp_path / "both")], capsys)
    assert code == 0, err
    assert (tmp_path / "both" / "adapter_config.json").is_file()


def test_info_on_a_killed_or_damaged_run_folder(trained: Path, tmp_path: Path, capsys) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 7, "lo')  # the torn last line a killed run leaves
    code, out, err = run(["info", "--json", str(run_dir)], capsys)
    assert code == 0, err
    assert json.loads(out)["last step"] == 6
    for text, says in (('{"lr": 0.01,', "config.json"), ("[1, 2]", "expected a JSON object")):
        (run_dir / "config.json").write_text(text, encoding="utf-8")
        code, out, err = run(["info", str(run_dir)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert says in err and "Traceback" not in err
