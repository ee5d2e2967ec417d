"""The library helpers the command line calls: resolving an adapter path, describing any path,
the chat answer functions; and the commands' help answering without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import chat_rows, tiny_model, tiny_tokenizer, write_jsonl
from minilora.adapters.folder import load_adapter, save_adapter
from minilora.cli import main
from minilora.core.errors import AdapterError, CheckpointError
from minilora.data.tokenizer import Tokenizer
from minilora.decoding.chat import chat_answerer, stream_reply, stream_text
from minilora.lora.injection import inject_lora
from minilora.lora.layer import LoraConfig
from minilora.model.io import load_model, save_model
from minilora.training.describe import describe_path, resolve_adapter_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("describe")
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer.vocab_size)
    save_model(model, root / "base")
    tokenizer.save(root / "base")
    write_jsonl(root / "train.jsonl", chat_rows(repeat=2))
    inject_lora(model, LoraConfig(r=2, targets=["q_proj", "o_proj"]))  # square: MiniMind too
    save_adapter(model, root / "adapter")
    save_adapter(model, root / "lora.pth", format="minimind")
    return root


def train(workdir: Path, out: Path, *extra: str) -> Path:
    assert main(["train", "--model", str(workdir / "base"), "--data",
                 str(workdir / "train.jsonl"), "--out", str(out), "--batch-size", "4",
                 "--r", "2", "--targets", "q_proj,v_proj", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def finished(workdir: Path) -> Path:
    return train(workdir, workdir / "finished", "--max-steps", "2", "--save-every", "1")


@pytest.fixture(scope="module")
def unfinished(workdir: Path) -> Path:
    """A run killed after its checkpoint at step 2 of 4, before it wrote an adapter."""
    import shutil

    run = train(workdir, workdir / "unfinished", "--max-steps", "4", "--save-every", "1",
                "--stop-after", "2")
    shutil.rmtree(run / "adapter")
    return run


def test_a_run_folder_resolves_to_the_adapter_it_wrote(finished: Path, workdir: Path) -> None:
    assert resolve_adapter_path(finished) == finished / "adapter"
    a, b = load_model(workdir / "base"), load_model(workdir / "base")
    load_adapter(a, resolve_adapter_path(finished))
    load_adapter(b, finished / "adapter")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all((sa[k] == sb[k]).all() for k in sa)


def test_an_adapter_folder_and_a_pth_resolve_to_themselves(workdir: Path) -> None:
    for path in (workdir / "adapter", workdir / "lora.pth", workdir / "nothing-here"):
        assert resolve_adapter_path(path) == path
        assert resolve_adapter_path(str(path)) == path


def test_a_checkpoint_is_not_an_adapter_and_says_where_the_runs_adapter_is(
        finished: Path) -> None:
    checkpoint = next((finished / "checkpoints").iterdir())
    with pytest.raises(AdapterError) as caught:
        resolve_adapter_path(checkpoint)
    assert str(caught.value).startswith(f"{checkpoint} is a training checkpoint, not an adapter")
    assert str(finished / "adapter") in str(caught.value)


def test_an_unfinished_run_names_its_latest_checkpoint(unfinished: Path) -> None:
    assert not (unfinished / "adapter").exists()
    with pytest.raises(AdapterError) as caught:
        resolve_adapter_path(unfinished)
    assert f"(its latest checkpoint: {unfinished / 'checkpoints' / 'step-00000002'})" in str(
        caught.value)


def test_a_full_run_wrote_a_model_not_an_adapter(workdir: Path, capsys) -> None:
    run = train(workdir, workdir / "full", "--max-steps", "1", "--full")
    with pytest.raises(AdapterError, match="a full fine-tuning run: it wrote a model"):
        resolve_adapter_path(run)
    capsys.readouterr()
    code = main(["generate", "--model", str(workdir / "base"), "--adapter", str(run), "hi"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"({run / 'model'}), not an adapter" in err


def test_describe_an_adapter_folder_and_a_minimind_pth(workdir: Path) -> None:
    folder = describe_path(workdir / "adapter")
    assert folder["format"] == "PEFT adapter folder"
    assert (folder["r"], folder["targets"], folder["modules"]) == (2, ["o_proj", "q_proj"], 4)
    pth = describe_path(workdir / "lora.pth")
    assert pth["format"].startswith("MiniMind LoRA .pth")
    assert (pth["r"], pth["scaling"], pth["modules"]) == (2, 1.0, 4)
    assert pth["lora parameters"] == folder["lora parameters"]


def test_describe_a_model_folder_and_a_model_pth(workdir: Path, tmp_path: Path) -> None:
    import torch

    info = describe_path(workdir / "base")
    assert info["format"] == "base model"
    assert (info["hidden_size"], info["layers"]) == (32, 2)
    pth = tmp_path / "full_sft_32.pth"  # a bare MiniMind base: not taken for an adapter
    torch.save(load_model(workdir / "base").state_dict(), pth)
    info = describe_path(pth, str(workdir / "base" / "config.json"))
    assert info["format"] == "base model" and info["hidden_size"] == 32


def test_describe_a_run_folder(finished: Path, workdir: Path) -> None:
    info = describe_path(finished)
    assert info["run"] == str(finished) and info["base"] == str(workdir / "base")
    assert info["last step"] == 2
    assert info["checkpoint"] == str(finished / "checkpoints" / "step-00000002")
    assert info["adapter r"] == 2 and info["adapter modules"] == 4


def test_describe_an_unfinished_run_and_its_checkpoint(unfinished: Path) -> None:
    info = describe_path(unfinished)
    assert "adapter r" not in info
    checkpoint = Path(info["checkpoint"])
    assert checkpoint == unfinished / "checkpoints" / "step-00000002"
    info = describe_path(checkpoint)
    assert info["step"] == "2 of 4" and info["r"] == 2
    assert info["resume"] == f"minilora train --resume --out {unfinished}"


def test_describe_a_damaged_checkpoint_is_a_checkpoint_error(finished: Path, tmp_path: Path,
                                                              capsys) -> None:
    import shutil

    checkpoint = tmp_path / "step-00000002"
    shutil.copytree(next((finished / "checkpoints").iterdir()), checkpoint)
    state = checkpoint / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"state.pt: damaged \(checksum mismatch\)"):
        describe_path(checkpoint)
    assert main(["info", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"minilora info: error: {state}: damaged (checksum mismatch)")


def test_describe_nothing_there(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        describe_path(tmp_path / "missing")


def test_a_bad_adapter_name_is_one_line_through_lora_s_check(workdir: Path, capsys) -> None:
    code = main(["generate", "--model", str(workdir / "base"), "--adapter",
                 f"base={workdir / 'adapter'}", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--adapter base={workdir / 'adapter'}: adapter name 'base'" in err


def tiny_lm(workdir: Path):
    return load_model(workdir / "base").eval(), Tokenizer.from_file(workdir / "base")


def test_stream_text_waits_for_whole_characters(workdir: Path) -> None:
    _, tokenizer = tiny_lm(workdir)
    text = "tea \u00e9t\u00e9 \U0001f642 done"
    ids = tokenizer.encode(text)
    # the test means something only if a character is split across tokens
    assert any(tokenizer.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    pieces = list(stream_text(tokenizer, iter(ids)))
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_streamed_reply_is_the_whole_answer(workdir: Path) -> None:
    from minilora.decoding.generation import generate

    model, tokenizer = tiny_lm(workdir)
    messages = [{"role": "user", "content": "What is your name?"}]
    settings = dict(max_new_tokens=12, eos_token_id=tokenizer.stop_token_ids)
    ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
    whole = tokenizer.decode(generate(model, ids, **settings))
    assert whole  # an untrained model: newlines, but 12 tokens of them
    assert "".join(stream_reply(model, tokenizer, messages, **settings)) == whole
    assert chat_answerer(model, tokenizer, **settings)(messages) == whole.strip()


@pytest.mark.parametrize("argv", [
    ["--help"], ["chat", "--help"], ["generate", "--help"], ["eval", "--help"],
    ["merge", "--help"], ["convert", "--help"], ["combine", "--help"], ["serve", "--help"],
    ["info", "--help"], ["info"], ["merge", "--out"], ["eval", "--taks", "x"],
])
def test_help_and_argument_errors_import_nothing_heavy(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from minilora.cli.main import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    print('exit', e.code)\n"
        "print(sorted(m for m in ('torch', 'numpy', 'tokenizers', 'safetensors') "
        "if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == ("exit 0" if "--help" in argv else "exit 2"), done.stderr
    assert lines[-1] == "[]", done.stderr


def test_a_bug_in_a_command_keeps_its_traceback(monkeypatch, capsys) -> None:
    import minilora.cli.info

    def broken(args):
        raise ValueError("a bug, not the user's mistake")

    monkeypatch.setattr(minilora.cli.info, "cmd_info", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["info", "anything"])

    def refused(args):
        raise AdapterError("the user's\nmistake")

    monkeypatch.setattr(minilora.cli.info, "cmd_info", refused)
    assert main(["info", "anything"]) == 2
    assert capsys.readouterr().err == "minilora info: error: the user's mistake\n"
