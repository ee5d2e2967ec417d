"""Reliability and safety (docs/reliability.md), tested where a user meets them: the command line.

- CASES is the bad-input catalogue, one row each: the exact one-line message, exit code 2, no
  traceback, no file that existed before changed, no temporary file left behind.
- `python -m minilora train` killed with SIGKILL at seeded random moments (some inside checkpoint
  writes) and resumed until done ends with the adapter of an uninterrupted run.
- A NaN / inf loss or gradient skips its step (counted, logged); K in a row stop the run; nothing
  non-finite is saved.
- Pickles with a code payload, planted as an adapter, a checkpoint and a base model, are refused
  and never run.
"""

from __future__ import annotations

import ast
import dataclasses
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minilora.model.io
from helpers import CHATS, chat_rows, fit, tiny_model, write_jsonl
from minilora.adapters.folder import load_adapter
from minilora.adapters.peft import FINGERPRINT_KEY
from minilora.cli import main
from minilora.core.errors import TrainError
from minilora.core.outputs import LOCK_NAME, FolderLock
from minilora.data.sft import MAX_LINE_BYTES, DataError, load_jsonl
from minilora.lora.fingerprint import base_fingerprint
from minilora.lora.layer import lora_modules
from minilora.model.config import YARN_DEFAULTS
from minilora.model.io import load_model, save_model
from minilora.training.checkpoint import latest_checkpoint
from minilora.training.loop import TrainConfig

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
MARKER = "PWNED"  # the file a hostile pickle's payload creates in the case folder


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory, tok) -> Path:
    """Shared, never written by a case: three bases, the data, a trained adapter, a 100 MB line."""
    root = tmp_path_factory.mktemp("work")
    bases = {"base": tiny_model(tok.vocab_size), "other": tiny_model(tok.vocab_size, seed=1),
             "wide": tiny_model(tok.vocab_size, hidden=48)}
    for name, model in bases.items():
        save_model(model, root / name)
        tok.save(root / name)
    write_jsonl(root / "train.jsonl", chat_rows(repeat=4))
    with open(root / "huge.jsonl", "wb") as f:  # a good line, a 100 MB line, a good line
        f.write(json.dumps({"conversations": CHATS[1]}).encode() + b"\n" + b'{"text": "')
        for _ in range(100):
            f.write(b"a" * (1 << 20))
        f.write(b'"}\n' + json.dumps({"conversations": CHATS[3]}).encode() + b"\n")
    assert main(fill(TRAIN, {"work": root, "data": root / "train.jsonl", "dir": root})
                + ["--out", str(root / "run")]) == 0
    yield root
    (root / "huge.jsonl").unlink()  # pytest keeps the last three temporary folders


@pytest.fixture(scope="module")
def names(work: Path) -> dict[str, Any]:
    """Placeholders of the messages that do not depend on the case folder."""
    with safe_open(str(work / "run" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        recorded = f.metadata()[FINGERPRINT_KEY]
    other = load_model(work / "other")
    load_adapter(other, work / "run" / "adapter", check_fingerprint=False)
    return {"work": work, "fp_run": recorded, "fp_other": base_fingerprint(other)}


def fill(argv: list[str], names: dict[str, Any]) -> list[str]:
    return [a.format(**names) for a in argv]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exits
        code = e.code
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------------------------

TRAIN = ["train", "--model", "{work}/base", "--data", "{data}", "--out", "{dir}/out",
         "--max-steps", "2", "--batch-size", "4", "--r", "2", "--max-seq-len", "64",
         "--amp-dtype", "float32", "--seed", "0", "--log-every", "1"]
GENERATE = ["generate", "--model", "{work}/base", "--max-new-tokens", "1", "hi"]
GOOD = {"conversations": CHATS[1]}
# Preference pairs (MiniMind's DPO format): each chat's answer chosen, a wrong one rejected.
PAIRS = [{"chosen": c, "rejected": c[:-1] + [{"role": "assistant", "content": "No."}]}
         for c in CHATS] * 2
DPO = TRAIN + ["--method", "dpo"]
# What a failing train run may print before its error line.
PROGRESS = re.compile(r"(data: |run: |step \d+/\d+ |resume: |eval at step |memory: )")


class Payload:
    """A pickle that runs code when unpickled: it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def hostile(path: Path, marker: Path, **tensors: torch.Tensor) -> Path:
    """Write a torch.save file whose dict holds plain tensors and one code payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**tensors, "payload": Payload(marker)}, path)
    return path


def copy_adapter(d: Path, n: dict) -> Path:
    shutil.copytree(n["work"] / "run" / "adapter", d / "adapter")
    return d / "adapter"


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def train_first(*extra: str) -> Callable[[Path, dict], None]:
    """A setup that runs the case's own training command first (with extra flags)."""

    def setup(d: Path, n: dict) -> None:
        assert main(fill(TRAIN, n) + list(extra)) == 0

    return setup


def one_torchrun_process(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
    """The environment torchrun gives a run of one process (the --fsdp cases)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)


def fsync_fails(where: str) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """A disk that fills up: fsync of a file whose path contains ``where`` raises ENOSPC."""

    def patch(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
        real = os.fsync

        def fsync(fd: int) -> None:
            if where in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    return patch


def writes_fail(where: str) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """A disk that fills up mid-file: writes into a file whose path contains ``where`` raise
    ENOSPC (torch.save into such a file raised a RuntimeError, not an OSError)."""

    class Full:
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

    def patch(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
        real = os.fdopen

        def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
            f = real(fd, *args, **kwargs)
            return Full(f) if where in os.readlink(f"/proc/self/fd/{fd}") else f

        monkeypatch.setattr(os, "fdopen", fdopen)

    return patch


def poisoned(kind: str, calls: Callable[[int], bool]) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """Models loaded by the CLI go bad at the forward calls (from 0) that ``calls`` picks."""

    def patch(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
        real = minilora.model.io.load_model

        def load(*args: Any, **kwargs: Any) -> Any:
            model = real(*args, **kwargs)
            poison(model, kind, calls)
            return model

        monkeypatch.setattr(minilora.model.io, "load_model", load)

    return patch


def resume_completes(d: Path, n: dict, capsys) -> None:
    """After the failure, the same command with --resume finishes from what was kept."""
    code, err = run_cli(fill(TRAIN, n) + ["--max-steps", "4", "--save-every", "1", "--resume"],
                        capsys)
    assert code == 0, err
    assert [p.name for p in (d / "out" / "checkpoints").iterdir()] == ["step-00000004"]


def nothing_saved_is_non_finite(d: Path, n: dict, capsys) -> None:
    saved = list((d / "out").rglob("*.safetensors"))
    assert not (d / "out" / "adapter").exists()
    for file in saved:
        assert all(torch.isfinite(t).all() for t in load_file(file).values()), file


MERGE = ["merge", "--model", "{work}/base"]
EXPORT = ["export", "--model", "{work}/base"]


def write_file(path: Path, data: bytes = b"the user's own file") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def save_minimind(folder: Path, n: dict, **changes: Any) -> None:
    """A tiny current-generation MiniMind model (with the shared tokenizer) in folder."""
    from minilora.data.tokenizer import Tokenizer
    from minilora.model.decoder import CausalLM, ModelConfig

    tok = Tokenizer.from_file(n["work"] / "base")
    config = ModelConfig(model_type="minimind", minimind_generation="minimind3",
                         vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, qk_norm=True, **changes)
    save_model(CausalLM(config), folder)
    tok.save(folder)


def edit_pre_tokenizer(folder: Path, pre: dict) -> None:
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = pre
    (folder / "tokenizer.json").write_text(json.dumps(data))


def copy_base(d: Path, n: dict) -> Path:
    if not (d / "base").exists():
        shutil.copytree(n["work"] / "base", d / "base")
    return d / "base"


def edit_json(path: Path, **changes: Any) -> None:
    """Set fields of a JSON file; the strings "NaN" and "1e999" are written as bare numbers."""
    data = json.loads(path.read_text())
    data.update(changes)
    text = json.dumps(data)
    for bare in ("NaN", "1e999"):
        text = text.replace(f'"{bare}"', bare)
    path.write_text(text)


def edit_config(d: Path, n: dict, **changes: Any) -> None:
    edit_json(copy_base(d, n) / "config.json", **changes)


def edit_adapter_config(folder: Path, **changes: Any) -> None:
    edit_json(folder / "adapter_config.json", **changes)


def edit_adapter_text(folder: Path, alpha: str) -> None:
    """Write lora_alpha as raw JSON text (``"lora_alpha": Infinity``)."""
    data = json.loads((folder / "adapter_config.json").read_text())
    data["lora_alpha"] = "@"
    text = json.dumps(data).replace('"lora_alpha": "@"', alpha)
    (folder / "adapter_config.json").write_text(text)


def rewrite_tensors(path: Path, change: Callable[[dict], None]) -> None:
    """Rewrite a safetensors file with ``change`` applied, keeping its header metadata."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def poison_tensor(path: Path, key: str, value: float) -> None:
    def change(tensors: dict) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value

    rewrite_tensors(path, change)


def retype_tensor(path: Path, key: str, dtype: torch.dtype) -> None:
    rewrite_tensors(path, lambda tensors: tensors.update({key: tensors[key].to(dtype)}))


def plain_torch_file(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def flip_a_bit(path: Path) -> None:
    """One bit flipped in the middle of the file (an exponent bit of some tensor, say)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def edit_state(path: Path, **changes: Any) -> None:
    state = torch.load(path, weights_only=True)
    state.update(changes)
    torch.save(state, path)
    rehash(path)


def swap_digits(path: Path) -> None:
    """The same rows and token count, other content: "2 + 3" becomes "3 + 2" once."""
    text = path.read_text()
    assert "2 + 3 = 5." in text
    path.write_text(text.replace("2 + 3 = 5.", "3 + 2 = 5.", 1))


def fifo_in_place_of(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def hold_lock(d: Path, n: dict) -> None:
    """Another run holds the out folder (this process, through another lock file handle)."""
    n["lock"] = FolderLock(d / "out", "train").acquire()


def release_lock(d: Path, n: dict, capsys: Any) -> None:
    n["lock"].release()


def train_config(d: Path, n: dict, **changes: Any) -> None:
    config = {"data": str(n["work"] / "train.jsonl"), "out_dir": str(d / "out"),
              "max_steps": 1, "batch_size": 4, "max_seq_len": 64, **changes}
    (d / "run.json").write_text(json.dumps(config))


def small_vocab_base(d: Path) -> None:
    """A base whose vocabulary (8) is smaller than the tokenizer's."""
    save_model(tiny_model(8), d / "small")


def nothing_written(d: Path, n: dict, capsys: Any) -> None:
    assert not (d / "out").exists(), "the refused run created its output folder"


@dataclasses.dataclass
class Case:
    """One bad input: what the user runs, and the one line they get back (exit code 2).

    ``argv`` and ``message`` use placeholders: {dir} is the case's own folder, {data} the
    {dir}/data.jsonl that ``rows`` fill, {work} the shared fixtures (never to be changed). A
    message ending in "…" is compared up to there (the rest lists the model's layers or keys).
    """

    id: str
    argv: list[str]
    message: str
    kept: str  # for docs/reliability.md: what stays intact, what to do
    rows: list | None = None  # {data}'s lines; None: good chats
    setup: Callable[[Path, dict], None] | None = None
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None
    may_change: tuple[str, ...] = ()  # files (under {dir}) the failing run may rewrite
    after: Callable[[Path, dict, Any], None] | None = None


CASES = [
    # -- training data --------------------------------------------------------------------
    Case("line-not-json", TRAIN, "{data}:2: not valid JSON (Expecting property name enclosed in "
         "double quotes: line 1 column 2 (char 1)); expected one JSON object per line",
         "nothing written; --skip-bad skips and counts such lines", rows=[GOOD, "{not json"]),
    Case("line-not-an-object", TRAIN, "{data}:2: a JSON list, expected a JSON object",
         "nothing written", rows=[GOOD, [GOOD]]),
    Case("no-conversations-or-messages", TRAIN,
         "{data}:1: no 'conversations', 'messages', 'instruction' or 'text' key (keys found: "
         "'prompt', 'answer'); expected {{\"conversations\": [{{\"role\": ..., \"content\": "
         "...}}, ...]}}, ShareGPT {{\"conversations\": [{{\"from\": ..., \"value\": ...}}]}}, "
         "Alpaca {{\"instruction\": ..., \"output\": ...}} or {{\"text\": ...}}",
         "nothing written",
         rows=[{"prompt": "Hi", "answer": "Hello"}]),
    Case("sharegpt-unknown-speaker", TRAIN,
         "{data}:1: field 'conversations[0].from': unknown speaker 'bot'; expected one of "
         "human, user, gpt, assistant, system", "nothing written",
         rows=[{"conversations": [{"from": "bot", "value": "hi"}]}]),
    Case("alpaca-without-output", TRAIN,
         "{data}:1: field 'output': missing; an Alpaca record needs instruction and output",
         "nothing written", rows=[{"instruction": "Add 2 and 3."}]),
    Case("flag-typo", TRAIN + ["--lrr", "1"],
         "unknown argument --lrr; did you mean --lr? (see `minilora train --help`)",
         "nothing written"),
    Case("resume-without-a-run", ["train", "--resume", "--out", "{dir}/nothing"],
         "--resume: {dir}/nothing/config.json does not exist, so there is no run to continue "
         "in {dir}/nothing; check --out", "nothing written"),
    Case("target-typo", TRAIN + ["--targets", "q_proj,v_prj"],
         "LoRA targets 'v_prj' (nearest: v_proj…", "nothing written (q_proj alone is not "
         "trained)"),
    Case("unknown-role", TRAIN, "{data}:1: field 'conversations[0].role': unknown role 'human'; "
         "expected one of system, user, assistant", "nothing written",
         rows=[{"conversations": [{"role": "human", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello"}]}]),
    Case("content-not-a-string", TRAIN, "{data}:1: field 'messages[1].content': a JSON object, "
         "expected a string", "nothing written",
         rows=[{"messages": [{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": {"text": "Hello"}}]}]),
    Case("empty-file", TRAIN, "{data}: the file is empty; expected one JSON object per line",
         "nothing written", rows=[]),
    Case("no-assistant-turn", TRAIN, "{data}: no conversation has an assistant turn; SFT trains "
         "only the assistant replies, so each conversation needs at least one",
         "nothing written", rows=[{"messages": [{"role": "user", "content": "Hi"}]}] * 3),
    Case("every-sample-truncated-away", TRAIN + ["--max-seq-len", "8"],
         "{data}: no sample has a trained token left after truncation to max_seq_len=8 "
         "(3 dropped); raise max_seq_len or shorten the prompts", "nothing written",
         rows=[{"messages": [{"role": "user", "content": "Please reverse the word cat for me."},
                             {"role": "assistant", "content": "tac"}]}] * 3),
    Case("missing-file", TRAIN + ["--data", "{dir}/missing.jsonl"],
         "{dir}/missing.jsonl: file not found; expected a .jsonl, .json or .parquet file or a "
         "folder of them", "nothing written"),
    Case("folder-without-data-files", TRAIN + ["--data", "{dir}/notes"],
         "{dir}/notes: is a folder with no data file; expected .jsonl, .json, .parquet files",
         "nothing written", setup=lambda d, n: (d / "notes").mkdir()),
    Case("bytes-not-utf8", TRAIN, "{data}:2: byte 13 is not UTF-8 (b'\\xe9'); expected UTF-8 "
         "text", "nothing written; --skip-bad skips and counts such lines",
         rows=[GOOD, b'{"text": "caf\xe9"}']),
    Case("100-mb-line", TRAIN + ["--data", "{work}/huge.jsonl"],
         "{work}/huge.jsonl:2: line longer than 16777216 bytes; expected one JSON object per "
         "line", "nothing written; read in 16 MiB pieces, never whole (test below)"),
    # -- settings -----------------------------------------------------------------------------
    Case("max-seq-len-0", TRAIN + ["--max-seq-len", "0"],
         "--max-seq-len: expected an integer >= 1, got 0", "nothing written"),
    Case("max-seq-len-negative-eval", ["eval", "--model", "{work}/base", "--data",
                                       "{work}/train.jsonl", "--max-seq-len", "-4"],
         "--max-seq-len: expected an integer >= 2, got -4", "nothing written"),
    Case("rank-0", TRAIN + ["--r", "0"], "--r: expected an integer >= 1, got 0",
         "nothing written"),
    Case("rank-above-a-layer", TRAIN + ["--r", "20"],
         "r=20 is larger than min(in_features, out_features) of: ['model.layers.0.self_attn."
         "k_proj (32 -> 16)', 'model.layers.0.self_attn.v_proj (32 -> 16)', "
         "'model.layers.1.self_attn.k_proj (32 -> 16)', 'model.layers.1.self_attn.v_proj "
         "(32 -> 16)']", "nothing written; lower --r or --exclude those layers"),
    Case("alpha-0", TRAIN + ["--alpha", "0"],
         "--alpha must be > 0, got 0.0", "nothing written"),
    Case("alpha-negative", TRAIN + ["--alpha", "-2"],
         "--alpha must be > 0, got -2.0", "nothing written"),
    Case("dropout-1", TRAIN + ["--dropout", "1"],
         "--dropout must be in [0, 1), got 1.0", "nothing written"),
    Case("dropout-negative", TRAIN + ["--dropout", "-0.1"],
         "--dropout must be in [0, 1), got -0.1", "nothing written"),
    Case("targets-match-nothing", TRAIN + ["--targets", "qkv_proj"],
         "LoRA targets 'qkv_proj' (nearest: v_proj, q_proj, k_proj) match no Linear module; the "
         "model's Linear names end in: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
         "down_proj, lm_head",
         "nothing written"),
    Case("unknown-config-key", ["train", "--model", "{work}/base", "--config", "{dir}/run.json"],
         "unknown config key(s) ['lora_rank']; valid keys: ['data', 'eval_data', …",
         "nothing written",
         setup=lambda d, n: (d / "run.json").write_text(json.dumps(
             {"data": str(n["work"] / "train.jsonl"), "out_dir": str(d / "out"),
              "lora_rank": 4}))),
    # -- adapters and bases -----------------------------------------------------------------
    Case("adapter-missing-config", GENERATE + ["--adapter", "{dir}/adapter"],
         "missing {dir}/adapter/adapter_config.json", "the model is not touched",
         setup=lambda d, n: (copy_adapter(d, n) / "adapter_config.json").unlink()),
    Case("adapter-missing-weights", GENERATE + ["--adapter", "{dir}/adapter"],
         "missing {dir}/adapter/adapter_model.safetensors", "the model is not touched",
         setup=lambda d, n: (copy_adapter(d, n) / "adapter_model.safetensors").unlink()),
    Case("adapter-for-another-architecture",
         ["generate", "--model", "{work}/wide", "--adapter", "{work}/run/adapter", "hi"],
         "{work}/run/adapter/adapter_model.safetensors was trained on another base "
         "({work}/base); it does not fit this model: mis-shaped keys "
         "[base_model.model.model.layers.0.mlp.down_proj.lora_A.weight: file (2, 64), model "
         "(2, 96); …", "the model is not touched (the LoRA injected for the check is removed)"),
    Case("adapter-for-another-base",
         ["generate", "--model", "{work}/other", "--adapter", "{work}/run/adapter", "hi"],
         "{work}/run/adapter/adapter_model.safetensors was trained on another base model "
         "(fingerprint {fp_run}, this model's {fp_other}); pass --no-fingerprint-check to load "
         "it anyway", "the model is not touched"),
    Case("adapter-safetensors-truncated", GENERATE + ["--adapter", "{dir}/adapter"],
         "{dir}/adapter/adapter_model.safetensors is not a readable safetensors file: Error "
         "while deserializing header: incomplete metadata, file not fully covered",
         "the model is not touched",
         setup=lambda d, n: cut_in_half(copy_adapter(d, n) / "adapter_model.safetensors")),
    Case("adapter-safetensors-corrupted", GENERATE + ["--adapter", "{dir}/adapter"],
         "{dir}/adapter/adapter_model.safetensors is not a readable safetensors file: Error "
         "while deserializing header: header too large", "the model is not touched",
         setup=lambda d, n: (copy_adapter(d, n) / "adapter_model.safetensors").write_bytes(
             b"\xff" * 64)),
    Case("base-safetensors-truncated", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/model.safetensors: not a readable safetensors file, truncated or damaged "
         "(Error while deserializing header: incomplete metadata, file not fully covered)",
         "nothing written",
         setup=lambda d, n: cut_in_half(
             Path(shutil.copytree(n["work"] / "base", d / "base")) / "model.safetensors")),
    # -- preference pairs (--method dpo / simpo) ---------------------------------------------
    Case("beta-not-positive", DPO + ["--beta", "0"],
         "--beta: expected a finite number > 0, got 0.0", "nothing written", rows=PAIRS,
         after=nothing_written),
    Case("beta-not-finite", DPO + ["--beta", "inf"], "--beta: expected a finite number, got inf",
         "nothing written", rows=PAIRS, after=nothing_written),
    Case("method-dpo-with-sft-data", DPO,
         "{data}:1: an SFT record, not a preference pair; preference training needs "
         "{{\"chosen\": ..., \"rejected\": ...}} answers (train SFT data with the sft method)",
         "nothing written", after=nothing_written),
    Case("preference-flag-with-sft", TRAIN + ["--beta", "0.2"],
         "--beta: only for preference pairs; set --method dpo or simpo (the data then holds "
         "chosen and rejected answers)", "nothing written", after=nothing_written),
    Case("sft-flag-with-pairs", DPO + ["--pack"],
         "--pack: not with --method dpo: a pair is one chosen and one rejected row, never packed",
         "nothing written", rows=PAIRS, after=nothing_written),
    Case("pair-data-read-as-sft", TRAIN,
         "{data}:1: a preference pair (chosen and rejected answers), not an SFT record; train "
         "pairs with the dpo or simpo method (minilora train --method dpo)", "nothing written",
         rows=PAIRS, after=nothing_written),
    Case("pair-prompts-differ", DPO,
         "{data}:2: field 'rejected[0]': the prompt differs from chosen's (message 1); a pair is "
         "two answers to one prompt", "nothing written",
         rows=[PAIRS[0], {"chosen": CHATS[1], "rejected": [
             {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "X"}]}],
         after=nothing_written),
    Case("pair-empty-answer", DPO,
         "{data}:2: field 'rejected': an empty answer; a pair needs two non-empty answers",
         "nothing written",
         rows=[PAIRS[0], {"prompt": "Hi", "chosen": "Hello", "rejected": ""}],
         after=nothing_written),
    Case("pair-identical-answers", DPO,
         "{data}:2: field 'rejected': the same answer as chosen's; a pair needs two different "
         "answers", "nothing written",
         rows=[PAIRS[0], {"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}],
         after=nothing_written),
    Case("pair-prompt-longer-than-max-seq-len", DPO + ["--max-seq-len", "8"],
         "{data}:1: field 'prompt': the prompt is 38 tokens, leaving no answer token within "
         "max_seq_len=8; raise max_seq_len or shorten the prompt",
         "nothing written; a pair that fits its prompt has its answers cut at the end instead "
         "(never the prompt)", rows=PAIRS, after=nothing_written),
    Case("from-adapter-of-another-base",
         DPO + ["--model", "{work}/other", "--from-adapter", "{work}/run/adapter"],
         "--from-adapter: {work}/run/adapter/adapter_model.safetensors was trained on another "
         "base model (fingerprint {fp_run}, this model's {fp_other}); start from an adapter "
         "trained on this base, or give its own base as --model",
         "nothing written; the model is not touched", rows=PAIRS, after=nothing_written),
    # -- runs, checkpoints, outputs -----------------------------------------------------------
    Case("resume-with-another-config", TRAIN + ["--resume", "--lr", "0.5"],
         "{dir}/out/checkpoints/step-00000001 was written by a different run; refusing to "
         "resume: lr: 0.0001 in the checkpoint, 0.5 now. Resume with the same settings, or "
         "train into a new --out.", "the checkpoint and adapter are untouched",
         setup=train_first("--stop-after", "1")),
    Case("fsdp-without-torchrun", TRAIN + ["--fsdp"],
         "--fsdp shards the model across the processes torchrun starts; launch it as: torchrun "
         "--nproc_per_node 2 -m minilora train --fsdp ... (one node; see the README for several)",
         "nothing written"),
    Case("fsdp-with-full", TRAIN + ["--fsdp", "--full"],
         "--full: cannot go with --fsdp yet: sharded training trains LoRA adapters only",
         "nothing written; train without --full (LoRA), or --full without --fsdp"),
    Case("answer-tokens-with-full", TRAIN + ["--full", "--answer-tokens"],
         "--answer-tokens: trains beside LoRA; --full trains every weight already: leave it out",
         "nothing written; LoRA with --answer-tokens, or --full alone"),
    Case("preset-new-skill-with-full", TRAIN + ["--preset", "new-skill", "--full"],
         "--preset new-skill trains the answers' token rows beside LoRA, which --full does not "
         "take: leave out --preset, or give its other settings yourself (--r 8, --alpha 16, "
         "--lr 0.001, --max-steps 600, --batch-size 16, --warmup-steps 20)",
         "nothing written (was: an error naming --answer-tokens, a flag never given)"),
    Case("resume-with-another-fsdp-setting", TRAIN + ["--resume", "--fsdp"],
         "{dir}/out/checkpoints/step-00000001 was written by a different run; refusing to "
         "resume: fsdp: False in the checkpoint, True now. Resume with the same settings, or "
         "train into a new --out.", "the checkpoint and adapter are untouched; resume as the "
         "run was started", setup=train_first("--stop-after", "1"), patch=one_torchrun_process),
    Case("resume-with-a-damaged-checkpoint", TRAIN + ["--resume"],
         "{dir}/out/checkpoints/step-00000001/trainable.safetensors: damaged (checksum "
         "mismatch)", "nothing written",
         setup=lambda d, n: (train_first("--stop-after", "1")(d, n), flip_last_byte(
             d / "out" / "checkpoints" / "step-00000001" / "trainable.safetensors"))),
    Case("fresh-run-over-an-unfinished-one", TRAIN,
         "{dir}/out/checkpoints/step-00000001 holds an unfinished run: pass --resume "
         "to continue it, or train into another --out",
         "the unfinished run is untouched", setup=train_first("--stop-after", "1")),
    Case("output-folder-not-writable", TRAIN + ["--out", "{dir}/file/sub"],
         "[Errno 20] cannot write the output folder {dir}/file/sub: Not a directory; choose "
         "another out_dir (--out)", "nothing written",
         setup=lambda d, n: (d / "file").write_text("a file, not a folder")),
    Case("disk-full-during-a-checkpoint",
         TRAIN + ["--max-steps", "4", "--save-every", "1", "--resume"],
         "[Errno 28] cannot write checkpoint {dir}/out/checkpoints/step-00000003: No space left "
         "on device; {dir}/out/checkpoints/step-00000002 is kept",
         "the previous checkpoint is intact and the temporary folder removed; --resume goes on",
         setup=train_first("--max-steps", "4", "--save-every", "1", "--stop-after", "2"),
         patch=fsync_fails("/checkpoints/.step-"),
         may_change=("out/config.json", "out/metrics.jsonl"),
         after=resume_completes),
    Case("disk-full-while-writing-checkpoint-state",
         TRAIN + ["--max-steps", "4", "--save-every", "1", "--resume"],
         "[Errno 28] cannot write checkpoint {dir}/out/checkpoints/step-00000003: No space left "
         "on device; {dir}/out/checkpoints/step-00000002 is kept",
         "the previous checkpoint is intact; state.pt is serialised in memory first, so torch."
         "save never writes to the disk itself (a full disk gave its RuntimeError traceback)",
         setup=train_first("--max-steps", "4", "--save-every", "1", "--stop-after", "2"),
         patch=writes_fail("/.state.pt."),
         may_change=("out/config.json", "out/metrics.jsonl"), after=resume_completes),
    Case("disk-full-during-the-adapter-save",
         TRAIN + ["--max-steps", "4", "--save-every", "1", "--resume"],
         "[Errno 28] cannot write {dir}/out/adapter: No space left on device",
         "the previous adapter files are intact; the checkpoint holds the weights: --resume",
         setup=train_first("--max-steps", "4", "--save-every", "1", "--stop-after", "2"),
         patch=fsync_fails("/out/.adapter.tmp-"),
         may_change=("out/config.json", "out/metrics.jsonl", "out/checkpoints/"),
         after=resume_completes),
    Case("non-finite-loss-k-steps-in-a-row",
         TRAIN + ["--max-steps", "6", "--max-bad-steps", "3", "--save-every", "1"],
         "stopped at step 4: 3 steps in a row had a non-finite loss or gradient (skipped, "
         "nothing saved from them); lower --lr, use --amp-dtype float32, or check the data",
         "checkpoints hold the last finite weights; no adapter is written",
         patch=poisoned("nan-loss", lambda call: call >= 1),
         after=nothing_saved_is_non_finite),
    Case("non-finite-weights", TRAIN + ["--max-steps", "3", "--save-every", "1"],
         "refusing to save non-finite (NaN or inf) weights in ['model.layers.0.self_attn."
         "q_proj.lora_A.default.weight']; the checkpoints in {dir}/out/checkpoints are kept: "
         "lower the learning rate, or train in fp32 (--amp-dtype float32)",
         "the checkpoint before is kept; nothing non-finite is written",
         patch=poisoned("nan-weight", lambda call: call == 1),
         after=nothing_saved_is_non_finite),
    # -- hostile files ------------------------------------------------------------------------
    Case("hostile-pickle-as-adapter-pth", GENERATE + ["--adapter", "{dir}/lora.pth"],
         "{dir}/lora.pth is not a plain tensor file and was not loaded (read with torch.load("
         "weights_only=True); a pickle that needs code is refused): UnpicklingError: "
         "Unsupported global: GLOBAL exec was not an allowed global by default.",
         "the payload never runs", setup=lambda d, n: hostile(
             d / "lora.pth", d / MARKER, **{"model.layers.0.self_attn.q_proj.lora.A.weight":
                                            torch.zeros(2, 32)})),
    Case("hostile-pickle-as-checkpoint-state", TRAIN + ["--resume"],
         "{dir}/out/checkpoints/step-00000001: cannot read the checkpoint, damaged or not "
         "minilora's (UnpicklingError: Unsupported global: GLOBAL exec was not an "
         "allowed global by default.)", "the payload never runs",
         setup=lambda d, n: (train_first("--stop-after", "1")(d, n), rehash(hostile(
             d / "out" / "checkpoints" / "step-00000001" / "state.pt", d / MARKER,
             step=torch.tensor(1))))),
    Case("hostile-pickle-as-minimind-base", ["generate", "--model", "{dir}/minimind.pth",
                                             "--tokenizer", "{work}/base", "hi"],
         "{dir}/minimind.pth: not a plain tensor state dict that loads with weights_only=True "
         "(UnpicklingError: Unsupported global: GLOBAL exec was not an allowed global "
         "by default.)", "the payload never runs",
         setup=lambda d, n: hostile(d / "minimind.pth", d / MARKER, **load_file(
             n["work"] / "base" / "model.safetensors"))),
    Case("hostile-pickle-given-to-info", ["info", "{dir}/minimind.pth"],
         "{dir}/minimind.pth: not a plain tensor state dict that loads with weights_only=True "
         "(UnpicklingError: Unsupported global: GLOBAL exec was not an allowed global "
         "by default.)", "the payload never runs",
         setup=lambda d, n: hostile(d / "minimind.pth", d / MARKER, **load_file(
             n["work"] / "base" / "model.safetensors"))),
    # == round two (issue 14) ================================================================
    # -- 1. on disk: verified before use; the user's files never lost -----------------------
    Case("damaged-state-pt", TRAIN + ["--resume"],
         "{dir}/out/checkpoints/step-00000001/state.pt: damaged (checksum mismatch)",
         "nothing written; every file of a checkpoint is checked against its manifest.json",
         setup=lambda d, n: (train_first("--stop-after", "1")(d, n), flip_a_bit(
             d / "out" / "checkpoints" / "step-00000001" / "state.pt"))),
    Case("checkpoint-without-manifest", TRAIN + ["--resume"],
         "{dir}/out/checkpoints/step-00000001: not a minilora checkpoint (no manifest.json); "
         "train into another --out", "nothing written",
         setup=lambda d, n: (train_first("--stop-after", "1")(d, n), (
             d / "out" / "checkpoints" / "step-00000001" / "manifest.json").unlink())),
    Case("checkpoint-state-not-minilora", TRAIN + ["--resume"],
         "{dir}/out/checkpoints/step-00000001/state.pt: not a minilora checkpoint: "
         "total_steps is missing; world_size is missing; config is missing; data is missing; "
         "optimizer is missing; scaler is missing; skipped is missing; "
         "bad_in_a_row is missing; best_eval_loss is missing; fingerprint is missing; "
         "trainable_sha256 is missing", "nothing written; was a KeyError traceback",
         setup=lambda d, n: (train_first("--stop-after", "1")(d, n), rehash(plain_torch_file(
             d / "out" / "checkpoints" / "step-00000001" / "state.pt",
             {"format": 1, "step": 1})))),
    Case("checkpoint-state-field-of-another-type", TRAIN + ["--resume"],
         "{dir}/out/checkpoints/step-00000001/state.pt: not a minilora checkpoint: step is "
         "str, expected int", "nothing written",
         setup=lambda d, n: (train_first("--stop-after", "1")(d, n), edit_state(
             d / "out" / "checkpoints" / "step-00000001" / "state.pt", step="1"))),
    Case("resume-with-shuffled-lines", TRAIN + ["--resume"],
         "{dir}/out/checkpoints/step-00000001 was written by a different run; refusing to "
         "resume: data.sha256: …", "nothing written; the checkpoint records a hash of the "
         "training tokens in file order",
         setup=lambda d, n: (train_first("--stop-after", "1")(d, n),
                             write_jsonl(d / "data.jsonl", chat_rows(repeat=4)[::-1]))),
    Case("resume-with-digits-swapped", TRAIN + ["--resume"],
         "{dir}/out/checkpoints/step-00000001 was written by a different run; refusing to "
         "resume: data.sha256: …", "nothing written; same rows and token count, other content",
         setup=lambda d, n: (train_first("--stop-after", "1")(d, n), swap_digits(
             d / "data.jsonl"))),
    Case("out-is-the-base-model", TRAIN + ["--model", "{dir}/base", "--out", "{dir}/base"],
         "--out {dir}/base is the input --model {dir}/base; the command would overwrite what it "
         "reads: choose another --out", "the model folder is untouched (was: its config.json "
         "replaced, exit 0)", setup=lambda d, n: copy_base(d, n)),
    Case("out-inside-the-base-model",
         TRAIN + ["--model", "{dir}/base", "--out", "{dir}/base/run"],
         "--out {dir}/base/run lies inside the input --model {dir}/base; the command would "
         "overwrite what it reads: choose another --out", "nothing written",
         setup=lambda d, n: copy_base(d, n)),
    Case("out-holds-the-data", TRAIN + ["--out", "{dir}"],
         "out_dir (--out) {dir} contains the input data {data}; the command would overwrite "
         "what it reads: choose another out_dir (--out)", "nothing written"),
    Case("out-holds-a-users-files", TRAIN + ["--out", "{dir}/mine"],
         "out_dir (--out) {dir}/mine holds files that minilora train did not write (notes.txt);"
         " nothing there is overwritten: choose an empty or new out_dir (--out)",
         "the user's file is kept", setup=lambda d, n: write_file(d / "mine" / "notes.txt")),
    Case("fresh-run-over-a-finished-one", TRAIN,
         "{dir}/out holds an earlier run (adapter, checkpoints, metrics.jsonl): pass "
         "--overwrite to replace it, or train into another --out",
         "the finished run is untouched (was: its checkpoints and best/ deleted at the start)",
         setup=train_first()),
    Case("resume-without-a-checkpoint-over-a-finished-run", TRAIN + ["--resume"],
         "{dir}/out holds an earlier run (adapter, metrics.jsonl): pass --overwrite to "
         "replace it, or train into another --out",
         "the finished run is untouched (was: restarted at step 0, its adapter and metrics "
         "replaced)", setup=lambda d, n: (train_first()(d, n),
                                         shutil.rmtree(d / "out" / "checkpoints"))),
    Case("second-run-into-a-busy-folder", TRAIN,
         "{dir}/out is in use by another process (minilora train, PID {pid}); wait for it to "
         "end, or choose another output folder", "the running run's files are untouched",
         setup=hold_lock, after=release_lock),
    Case("merge-out-is-the-base", MERGE + ["--adapter", "{work}/run/adapter", "--model",
                                           "{dir}/base", "--out", "{dir}/base"],
         "--out {dir}/base is the input --model {dir}/base; the command would overwrite what it "
         "reads: choose another --out", "the base is untouched (was: overwritten, exit 0)",
         setup=lambda d, n: copy_base(d, n)),
    Case("merge-into-a-users-model-folder", MERGE + ["--adapter", "{work}/run/adapter", "--out",
                                                     "{dir}/base"],
         "--out {dir}/base holds files that minilora merge did not write (config.json, "
         "model.safetensors, tokenizer.json, tokenizer_config.json); nothing there is "
         "overwritten: choose an empty or new --out", "the other model is untouched",
         setup=lambda d, n: copy_base(d, n)),
    Case("combine-out-is-an-input", ["combine", "--model", "{work}/base", "a={dir}/adapter",
                                     "b={work}/run/adapter", "--weights", "0.5", "0.5",
                                     "--out", "{dir}/adapter"],
         "--out {dir}/adapter is the input --adapter {dir}/adapter; the command would overwrite "
         "what it reads: choose another --out", "both adapters are untouched",
         setup=lambda d, n: copy_adapter(d, n)),
    Case("convert-output-inside-its-input",
         ["convert", "--model", "{work}/base", "{dir}/adapter", "{dir}/adapter/lora.pth"],
         "output {dir}/adapter/lora.pth lies inside the input INPUT {dir}/adapter; the command "
         "would overwrite what it reads: choose another output", "the adapter is untouched",
         setup=lambda d, n: copy_adapter(d, n)),
    Case("convert-over-a-users-file",
         ["convert", "--model", "{work}/base", "{work}/run/adapter", "{dir}/notes.pth"],
         "{dir}/notes.pth exists and is not a MiniMind LoRA .pth; nothing is overwritten: "
         "choose a new output path", "the file is untouched",
         setup=lambda d, n: write_file(d / "notes.pth")),
    # -- 2. bounded reads ------------------------------------------------------------------------
    Case("config-with-a-million-layers", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/model.safetensors: num_hidden_layers is 1000000, but the weights hold "
         "model.layers.N for N in [0, 1]; expected N = 0 .. 999999",
         "nothing allocated (was: 7.3 GB and rising after 500 s)",
         setup=lambda d, n: edit_config(d, n, num_hidden_layers=1000000)),
    Case("pth-key-names-layer-999999999", ["generate", "--model", "{dir}/minimind.pth",
                                           "--model-config", "minimind2", "--tokenizer",
                                           "{work}/base", "hi"],
         "{dir}/minimind.pth: num_hidden_layers is 1000000000, but the weights hold "
         "model.layers.N for N in [0, 1, 999999999]; expected N = 0 .. 999999999",
         "nothing allocated (was: 3.9 GB in 90 s)", setup=lambda d, n: plain_torch_file(
             d / "minimind.pth", {**load_file(n["work"] / "base" / "model.safetensors"),
                                  "model.layers.999999999.input_layernorm.weight":
                                      torch.ones(32)})),
    Case("experts-beyond-the-weights", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/model.safetensors: num_experts is 100000, but the weights hold "
         "model.layers.0.mlp.experts.N for N in []; expected N = 0 .. 99999", "nothing allocated",
         setup=lambda d, n: edit_config(d, n, use_moe=True, num_experts=100000)),
    Case("adapter-config-is-a-fifo", GENERATE + ["--adapter", "{dir}/adapter"],
         "[Errno 22] {dir}/adapter/adapter_config.json is a FIFO (pipe); expected a regular "
         "file", "nothing read (was: blocked forever)",
         setup=lambda d, n: fifo_in_place_of(copy_adapter(d, n) / "adapter_config.json")),
    Case("adapter-config-too-large", GENERATE + ["--adapter", "{dir}/adapter"],
         "[Errno 27] {dir}/adapter/adapter_config.json is larger than 16777216 bytes; expected "
         "an adapter_config.json", "not read (was: over 6 GB for an endless file)",
         setup=lambda d, n: write_file(copy_adapter(d, n) / "adapter_config.json",
                                       b" " * (17 << 20))),
    Case("tasks-is-a-device", ["eval", "--model", "{work}/base", "--tasks", "/dev/zero"],
         "[Errno 22] /dev/zero is a device; expected an eval (tasks) .jsonl file",
         "not read (was: over 6 GB in seconds)"),
    Case("train-config-is-a-device", ["train", "--model", "{work}/base", "--config",
                                      "/dev/zero"],
         "[Errno 22] /dev/zero is a device; expected a TrainConfig JSON file",
         "not read (was: over 6 GB in seconds)"),
    Case("data-is-a-device", TRAIN + ["--data", "/dev/zero"],
         "/dev/zero: is not a regular file (a pipe or a device has no end); expected a .jsonl "
         "file", "not read (was: busy forever)"),
    Case("data-is-a-fifo", TRAIN + ["--data", "{dir}/pipe.jsonl"],
         "{dir}/pipe.jsonl: is not a regular file (a pipe or a device has no end); expected a "
         ".jsonl file", "not opened (opening a FIFO blocks until a writer comes)",
         setup=lambda d, n: os.mkfifo(d / "pipe.jsonl")),
    Case("catastrophic-regex-in-adapter", GENERATE + ["--adapter", "{dir}/adapter"],
         "{dir}/adapter/adapter_config.json: field 'target_modules' is not a usable regex "
         "'(.*_*)+_proj': a repeated group holds another repeat or an alternation (such as "
         "(a+)+ or (a|b)*), which can take exponential time; simplify it",
         "refused before any match (was: loading hung)",
         setup=lambda d, n: edit_adapter_config(copy_adapter(d, n),
                                                target_modules="(.*_*)+_proj")),
    Case("catastrophic-regex-flag", TRAIN + ["--targets", "(a|aa)+_proj"],
         "--targets is not a usable regex '(a|aa)+_proj': a "
         "repeated group holds another repeat or an alternation (such as (a+)+ or (a|b)*), "
         "which can take exponential time; simplify it", "nothing written"),
    # -- 3. no non-finite number accepted, used or written ----------------------------------
    Case("alpha-inf", TRAIN + ["--alpha", "inf"],
         "--alpha: expected a finite number, got inf",
         "nothing written (was: trained, every step skipped, saved \"lora_alpha\": Infinity)"),
    Case("adapter-alpha-infinity", GENERATE + ["--adapter", "{dir}/adapter"],
         "{dir}/adapter/adapter_config.json: Infinity is not a finite number; expected an "
         "adapter_config.json with finite numbers", "the model is not touched (was: an empty "
         "reply, exit 0)", setup=lambda d, n: edit_adapter_text(copy_adapter(d, n),
                                                               '"lora_alpha": Infinity')),
    Case("adapter-alpha-1e999", GENERATE + ["--adapter", "{dir}/adapter"],
         "{dir}/adapter/adapter_config.json: 1e999 is not a finite number; expected an "
         "adapter_config.json with finite numbers", "the model is not touched",
         setup=lambda d, n: edit_adapter_text(copy_adapter(d, n), '"lora_alpha": 1e999')),
    Case("adapter-nan-in-b", GENERATE + ["--adapter", "{dir}/adapter"],
         "{dir}/adapter/adapter_model.safetensors: not usable LoRA weights: 1 tensor(s) holding "
         "NaN or infinite values: base_model.model.model.layers.0.self_attn.q_proj.lora_B."
         "weight", "the model is not touched (was: an empty reply, exit 0)",
         setup=lambda d, n: poison_tensor(copy_adapter(d, n) / "adapter_model.safetensors",
                                          "base_model.model.model.layers.0.self_attn.q_proj."
                                          "lora_B.weight", float("nan"))),
    Case("merge-would-write-inf", MERGE + ["--adapter", "{dir}/adapter", "--save-dtype",
                                           "float16", "--out", "{dir}/merged"],
         "refusing to write {dir}/merged: 1 tensor(s) holding NaN or infinite values: "
         "model.layers.0.self_attn.q_proj.weight", "nothing written (was: 2,949,120 non-finite "
         "weights, exit 0)", setup=lambda d, n: poison_tensor(
             copy_adapter(d, n) / "adapter_model.safetensors",
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", 1e6),
),
    Case("combine-weight-nan", ["combine", "--model", "{work}/base", "a={work}/run/adapter",
                                "b={dir}/adapter", "--weights", "nan", "1", "--out",
                                "{dir}/mix"],
         "--weights: expected a finite number, got nan", "nothing written (was: NaN adapters)",
         setup=lambda d, n: copy_adapter(d, n)),
    Case("rms-norm-eps-nan", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/config.json: NaN is not a finite number; expected a model config.json with "
         "finite numbers", "nothing used (was: used without a word)",
         setup=lambda d, n: edit_config(d, n, rms_norm_eps="NaN")),
    Case("rope-theta-1e999", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/config.json: 1e999 is not a finite number; expected a model config.json "
         "with finite numbers", "nothing used", setup=lambda d, n: edit_config(
             d, n, rope_theta="1e999")),
    Case("nan-in-a-base-weight", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/model.safetensors: not usable base weights: 1 tensor(s) holding NaN or "
         "infinite values: model.layers.1.mlp.up_proj.weight", "nothing used",
         setup=lambda d, n: poison_tensor(copy_base(d, n) / "model.safetensors",
                                          "model.layers.1.mlp.up_proj.weight", float("nan"))),
    Case("inf-norm-weight", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/model.safetensors: not usable base weights: 1 tensor(s) holding NaN or "
         "infinite values: model.norm.weight", "nothing used",
         setup=lambda d, n: poison_tensor(copy_base(d, n) / "model.safetensors",
                                          "model.norm.weight", float("inf"))),
    Case("grad-clip-nan", TRAIN + ["--grad-clip", "nan"],
         "--grad-clip: expected a finite number, got nan",
         "nothing written (was: clipping off, invalid JSON in config.json)"),
    Case("weight-decay-inf", TRAIN + ["--weight-decay", "inf"],
         "--weight-decay: expected a finite number, got inf", "nothing written"),
    Case("temperature-nan", GENERATE + ["--temperature", "nan"],
         "temperature: expected a finite number, got nan", "nothing generated (was: a "
         "traceback)"),
    Case("top-p-nan", GENERATE + ["--top-p", "nan"],
         "top_p: expected a finite number, got nan", "nothing generated"),
    Case("lr-1e9", TRAIN + ["--lr", "1e9"],
         "refusing to save weights that diverged (lower the learning rate; the checkpoints in "
         "{dir}/out/checkpoints are kept): largest magnitude …",
         "no adapter is written (was: an adapter with weights ~ 2e9 that answers nothing)",
         after=nothing_saved_is_non_finite),
    # -- 4. types are what they claim -----------------------------------------------------------
    Case("use-rslora-a-string", GENERATE + ["--adapter", "{dir}/adapter"],
         "{dir}/adapter/adapter_config.json: field 'use_rslora' is 'false'; expected true or "
         "false", "the model is not touched (was: read as true, the adapter 2.8x stronger)",
         setup=lambda d, n: edit_adapter_config(copy_adapter(d, n), use_rslora="false")),
    Case("adapter-r-a-string", GENERATE + ["--adapter", "{dir}/adapter"],
         "{dir}/adapter/adapter_config.json: field 'r' is '2'; expected an integer",
         "the model is not touched", setup=lambda d, n: edit_adapter_config(
             copy_adapter(d, n), r="2")),
    Case("head-dim-a-float", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/config.json: head_dim: expected int or null, got 8.0",
         "nothing used", setup=lambda d, n: edit_config(d, n, head_dim=8.0)),
    Case("layers-a-bool", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/config.json: num_hidden_layers: expected int, got True",
         "nothing used", setup=lambda d, n: edit_config(d, n, num_hidden_layers=True)),
    Case("config-json-an-array", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/config.json: a JSON array; expected a JSON object", "nothing used",
         setup=lambda d, n: write_file(copy_base(d, n) / "config.json", b"[1, 2]")),
    Case("config-json-null", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/config.json: a JSON null; expected a JSON object", "nothing used",
         setup=lambda d, n: write_file(copy_base(d, n) / "config.json", b"null")),
    Case("rope-scaling-a-string", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/config.json: field 'rope_scaling': a JSON string, expected an object such "
         "as {{\"rope_type\": \"default\"}}", "nothing used",
         setup=lambda d, n: edit_config(d, n, rope_scaling="linear")),
    Case("bos-token-a-number", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/tokenizer_config.json: field 'bos_token': 123; expected a token string (or "
         "an AddedToken object), or null", "nothing used",
         setup=lambda d, n: edit_json(copy_base(d, n) / "tokenizer_config.json",
                                      bos_token=123)),
    Case("int8-weight", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/model.safetensors: not usable base weights: 1 tensor(s) of a dtype that is "
         "not float32, float16, bfloat16 or float64: model.layers.0.mlp.up_proj.weight (int8)",
         "nothing used", setup=lambda d, n: retype_tensor(
             copy_base(d, n) / "model.safetensors", "model.layers.0.mlp.up_proj.weight",
             torch.int8)),
    Case("bool-weight", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/model.safetensors: not usable base weights: 1 tensor(s) of a dtype that is "
         "not float32, float16, bfloat16 or float64: model.norm.weight (bool)",
         "nothing used", setup=lambda d, n: retype_tensor(
             copy_base(d, n) / "model.safetensors", "model.norm.weight", torch.bool)),
    Case("complex64-weight", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/model.safetensors: not usable base weights: 1 tensor(s) of a dtype that is "
         "not float32, float16, bfloat16 or float64: model.layers.0.self_attn.q_proj.weight "
         "(complex64)", "nothing used", setup=lambda d, n: retype_tensor(
             copy_base(d, n) / "model.safetensors", "model.layers.0.self_attn.q_proj.weight",
             torch.complex64)),
    # -- 5. no traceback for a condition of the world -----------------------------------------
    Case("device-cuda-without-cuda", ["train", "--model", "{work}/base", "--config",
                                      "{dir}/run.json"],
         "device cuda:0: CUDA is not available on this machine; use \"cpu\" or \"auto\"",
         "nothing written", setup=lambda d, n: train_config(d, n, device="cuda:0"),
         patch=lambda mp, d: mp.setattr(torch.cuda, "is_available", lambda: False)),
    Case("device-banana", ["train", "--model", "{work}/base", "--config", "{dir}/run.json"],
         "--device: unknown device 'banana'; expected \"auto\", \"cpu\", \"cuda\" or "
         "\"cuda:N\"", "nothing written", setup=lambda d, n: train_config(d, n,
                                                                             device="banana")),
    Case("token-ids-beyond-the-vocab-generate",
         ["generate", "--model", "{dir}/small", "--tokenizer", "{work}/base", "hi"],
         "the prompt holds token ids outside the model's vocabulary (0 .. 7, found …",
         "nothing generated (was: IndexError)", setup=lambda d, n: small_vocab_base(d)),
    Case("token-ids-beyond-the-vocab-train",
         TRAIN + ["--model", "{dir}/small", "--tokenizer", "{work}/base"],
         "{data}: sample 1 holds token id …", "nothing written (was: IndexError part-way through "
         "a run)", setup=lambda d, n: small_vocab_base(d)),
    Case("config-not-utf8", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/config.json: byte 0 is not UTF-8 (b'\\xff'); expected a model config.json "
         "in UTF-8", "nothing used", setup=lambda d, n: write_file(
             copy_base(d, n) / "config.json", b"\xff{}")),
    Case("adapter-config-not-utf8", GENERATE + ["--adapter", "{dir}/adapter"],
         "{dir}/adapter/adapter_config.json: byte 1 is not UTF-8 (b'\\xfe'); expected an "
         "adapter_config.json in UTF-8", "the model is not touched",
         setup=lambda d, n: write_file(copy_adapter(d, n) / "adapter_config.json", b"{\xfe}")),
    Case("seed-2-to-the-64", TRAIN + ["--seed", str(2**64)],
         "--seed: expected an integer in [0, 2**63), got 18446744073709551616",
         "nothing written"),
    Case("generate-seed-2-to-the-64", GENERATE + ["--seed", str(2**64), "--temperature", "1"],
         "seed: expected an integer in [0, 2**63), got 18446744073709551616",
         "nothing generated"),
    Case("refused-pickle-naming-os-system", GENERATE + ["--adapter", "{dir}/lora.pth"],
         "{dir}/lora.pth is not a plain tensor file and was not loaded (read with torch.load("
         "weights_only=True); a pickle that needs code is refused): UnpicklingError: Trying to "
         "load unsupported GLOBAL posix.system whose module posix is blocked.",
         "never \"weights_only=False will likely succeed\"", setup=lambda d, n: plain_torch_file(
             d / "lora.pth", {"model.layers.0.self_attn.q_proj.lora.A.weight": torch.zeros(2, 32),
                              "call": os.system})),
    Case("refused-pickle-naming-a-class", GENERATE + ["--adapter", "{dir}/lora.pth"],
         "{dir}/lora.pth is not a plain tensor file and was not loaded (read with torch.load("
         "weights_only=True); a pickle that needs code is refused): UnpicklingError: "
         "Unsupported global: GLOBAL torch.nn.modules.linear.Linear was not an allowed global "
         "by default.", "no advice to retry without weights_only",
         setup=lambda d, n: plain_torch_file(d / "lora.pth", {"layer": torch.nn.Linear(2, 2)})),
    Case("eval-batch-size-negative", ["eval", "--model", "{work}/base", "--data",
                                      "{work}/train.jsonl", "--batch-size", "-1"],
         "--batch-size: expected an integer >= 1, got -1",
         "nothing printed (was: loss 0.0000, perplexity 1.00)"),
    Case("eval-batch-size-0", ["eval", "--model", "{work}/base", "--data",
                               "{work}/train.jsonl", "--batch-size", "0"],
         "--batch-size: expected an integer >= 1, got 0", "nothing printed"),
    Case("checkpoint-folder-not-minilora", TRAIN + ["--resume"],
         "{dir}/out/checkpoints/step-00000001: not a minilora checkpoint (no manifest.json); "
         "train into another --out", "nothing written (was: KeyError: 'config')",
         setup=lambda d, n: (train_first("--stop-after", "1")(d, n),
                             shutil.rmtree(d / "out" / "checkpoints" / "step-00000001"),
                             write_file(d / "out" / "checkpoints" / "step-00000001" /
                                        "state.pt"))),
    # ---- issue 12: MiniMind files that do not say what they are
    Case("bare-pth-without-config", ["generate", "--model", "{dir}/minimind.pth",
                                     "--tokenizer", "{work}/base", "hi"],
         "{dir}/minimind.pth: a bare .pth does not tell rms_norm_eps, rope_theta, "
         "max_position_embeddings, num_attention_heads (its tensors are a minimind2 model's); "
         "pass its config (--model-config FILE: MiniMind's config.json or "
         "MiniMindConfig.to_dict() as JSON), or --model-config minimind2 to take minimind2's "
         "MiniMindConfig defaults",
         "nothing loaded (was: MiniMind2's defaults assumed, logits off by 1.9 "
         "on a current MiniMind MoE model)", setup=lambda d, n: plain_torch_file(
             d / "minimind.pth", load_file(n["work"] / "base" / "model.safetensors"))),
    Case("config-of-both-generations", ["generate", "--model", "{dir}/base", "hi"],
         "{dir}/base/config.json: config has keys of both MiniMind generations: "
         "['n_routed_experts'] (MiniMind2) and ['num_experts'] (current MiniMind); keep one "
         "generation's names", "nothing loaded",
         setup=lambda d, n: edit_config(d, n, model_type="minimind", use_moe=True,
                                        n_routed_experts=4, num_experts=4)),
    Case("kasa-adapter", GENERATE + ["--adapter", "{dir}/adapter"],
         "{dir}/adapter/adapter_config.json: field 'kasa_config' is {{'x': 1}}; minilora supports "
         "only None", "the model is not touched (was: refused by the key check, the field not "
         "named)", setup=lambda d, n: edit_adapter_config(copy_adapter(d, n),
                                                          kasa_config={"x": 1})),
    # ---- a run's folders given as an adapter
    Case("adapter-is-a-checkpoint", GENERATE + ["--adapter", "{dir}/out/checkpoints/step-00000001"],
         "{dir}/out/checkpoints/step-00000001 is a training checkpoint, not an adapter: resume "
         "its run to finish it; the adapter a run writes at its end is {dir}/out/adapter",
         "nothing loaded; `minilora train --resume --out <run>` finishes the run",
         setup=train_first("--stop-after", "1")),
    Case("adapter-is-an-unfinished-run", GENERATE + ["--adapter", "{dir}/out"],
         "{dir}/out is a training run that has not written its adapter yet (its latest "
         "checkpoint: {dir}/out/checkpoints/step-00000001): resume it to finish it",
         "nothing loaded; the run is untouched",
         # a run killed before its end: its checkpoint, no adapter yet
         setup=lambda d, n: (train_first("--stop-after", "1")(d, n),
                             shutil.rmtree(d / "out" / "adapter"))),
    Case("adapter-is-a-full-run", GENERATE + ["--adapter", "{dir}/out"],
         "{dir}/out is a full fine-tuning run: it wrote a model ({dir}/out/model), not an "
         "adapter; load that as the base model", "nothing loaded; `--model <run>/model` loads it",
         setup=train_first("--full")),
    # ---- export to GGUF
    Case("export-out-exists", EXPORT + ["--out", "{dir}/m.gguf"],
         "--out {dir}/m.gguf exists; nothing is overwritten without --overwrite",
         "the file is untouched; --overwrite replaces it",
         setup=lambda d, n: write_file(d / "m.gguf")),
    Case("export-out-inside-the-base", ["export", "--model", "{dir}/base", "--out",
                                        "{dir}/base/m.gguf"],
         "--out {dir}/base/m.gguf lies inside the input --model {dir}/base; the command would "
         "overwrite what it reads: choose another --out", "nothing written into the base",
         setup=lambda d, n: copy_base(d, n)),
    Case("export-adapter-only-without-adapter", EXPORT + ["--adapter-only", "--out",
                                                          "{dir}/a.gguf"],
         "--adapter-only needs --adapter: the adapter to write", "nothing written"),
    Case("export-moe-base", ["export", "--model", "{dir}/moe", "--out", "{dir}/m.gguf"],
         "this minimind model is a mixture of experts, which llama.cpp's llama / qwen2 / qwen3 "
         "architectures do not compute; only dense models are exported to GGUF",
         "nothing written (not an approximate file)",
         setup=lambda d, n: save_minimind(d / "moe", n, use_moe=True)),
    Case("export-yarn-base", ["export", "--model", "{dir}/yarn", "--out", "{dir}/m.gguf"],
         "this minimind model uses MiniMind's YaRN rope scaling, which llama.cpp does not "
         "compute the same way; export the model without inference_rope_scaling (its "
         "config.json) to get it exactly", "nothing written",
         setup=lambda d, n: save_minimind(d / "yarn", n, rope_scaling=dict(YARN_DEFAULTS),
                                          max_position_embeddings=32768)),
    Case("export-prefix-space-tokenizer", ["export", "--model", "{dir}/base", "--out",
                                           "{dir}/m.gguf"],
         "the tokenizer splits 'Hello world' differently from llama.cpp's gpt-2 pre-tokenizer "
         "(a normalizer, a prefix space or another split step), so the GGUF model would read "
         "other tokens; it is not exported", "nothing written (was: no such export)",
         setup=lambda d, n: edit_pre_tokenizer(copy_base(d, n), {
             "type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
             "use_regex": True})),
    Case("export-unknown-pre-tokenizer", ["export", "--model", "{dir}/base", "--out",
                                          "{dir}/m.gguf"],
         "the tokenizer's pre-tokenizer ({{\"type\": \"Whitespace\"}}) is none that llama.cpp "
         "knows by name (gpt-2, qwen2, llama-bpe), so llama.cpp would split text differently "
         "and the model would read other tokens; it is not exported", "nothing written",
         setup=lambda d, n: edit_pre_tokenizer(copy_base(d, n), {"type": "Whitespace"})),
    Case("export-dora-adapter-only", EXPORT + ["--adapter", "{dir}/out", "--adapter-only",
                                               "--out", "{dir}/a.gguf"],
         "adapter 'default' is DoRA (model.layers.0.self_attn.q_proj), which llama.cpp's LoRA "
         "adapters cannot hold; export the merged model instead (without --adapter-only)",
         "nothing written; the merged export holds DoRA exactly", setup=train_first("--dora")),
    Case("export-merged-weight-overflows-f16", EXPORT + ["--adapter", "{dir}/adapter", "--out",
                                                         "{dir}/m.gguf"],
         "blk.0.attn_q.weight does not fit f16 (values up to …", "nothing written; --dtype "
         "bf16 or f32 holds it", setup=lambda d, n: poison_tensor(
             copy_adapter(d, n) / "adapter_model.safetensors",
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", 1e6)),
]


# == round three (issue 23) ==================================================================


def base_with_template(text: bytes | str, name: str = "chat_template.jinja"
                       ) -> Callable[[Path, dict], None]:
    """A copy of the base whose chat_template.jinja (beside tokenizer.json) holds ``text``."""

    def setup(d: Path, n: dict) -> None:
        write_file(copy_base(d, n) / name, text.encode() if isinstance(text, str) else text)

    return setup


def base_with(change: Callable[[Path], None]) -> Callable[[Path, dict], None]:
    def setup(d: Path, n: dict) -> None:
        change(copy_base(d, n))

    return setup


def sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)  # a hole: no disk used, but ``size`` bytes to whoever reads it whole


def environ(**values: str | None) -> Callable[[pytest.MonkeyPatch, Path], None]:
    def patch(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
        for name, value in values.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)

    return patch


def render_seconds(seconds: float) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """The render time bound lowered, so that the test of a hanging template is quick."""
    def patch(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
        monkeypatch.setattr("minilora.data.chat_template.MAX_RENDER_SECONDS", seconds)

    return patch


def minimind_pth(change: Callable[[dict], None]) -> Callable[[Path, dict], None]:
    def setup(d: Path, n: dict) -> None:
        sd = load_file(n["work"] / "base" / "model.safetensors")
        change(sd)
        plain_torch_file(d / "minimind.pth", sd)

    return setup


GENERATE_OWN = ["generate", "--model", "{dir}/base", "--max-new-tokens", "1", "hi"]
TEMPLATE = "{dir}/base/chat_template.jinja"
NOT_TORCHRUN = dict(RANK=None, LOCAL_RANK=None, MASTER_ADDR=None, MASTER_PORT=None)
HANG = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
DOUBLING = ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
            "{% endfor %}{{ ns.s }}")

ROUND_THREE = [
    # -- 2. a traceback where the input was wrong -------------------------------------------
    Case("world-size-without-torchrun", TRAIN,
         "environment variable WORLD_SIZE=2 asks for 2 processes, but RANK, LOCAL_RANK, "
         "MASTER_ADDR, MASTER_PORT are not set; start multi-process training with torchrun "
         "--nproc-per-node 2 -m minilora train ..., or unset WORLD_SIZE",
         "nothing written (was: torch's ValueError from its rendezvous)",
         patch=environ(WORLD_SIZE="2", **NOT_TORCHRUN)),
    Case("world-size-not-a-number", TRAIN,
         "environment variable WORLD_SIZE='two': expected an integer >= 1 (torchrun sets it; "
         "unset it to train in one process)", "nothing written (was: int()'s ValueError)",
         patch=environ(WORLD_SIZE="two")),
    Case("template-not-utf8", GENERATE_OWN,
         TEMPLATE + ": byte 0 is not UTF-8 (b'\\xff'); expected a chat template in UTF-8",
         "nothing used (was: UnicodeDecodeError)",
         setup=base_with_template(b"\xff\xfe{{ messages }}")),
    Case("template-macro-recurses", GENERATE_OWN,
         TEMPLATE + ": the model's chat template recursed too deeply (a macro that calls itself "
         "without end?)", "nothing generated (was: RecursionError)",
         setup=base_with_template("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}")),
    Case("template-include", GENERATE_OWN,
         TEMPLATE + ": the model's chat template uses {{% include %}} (line 1), which reads "
         "another template file; a chat template must be one self-contained template",
         "refused when the tokenizer loads (was: TypeError: no loader)",
         setup=base_with_template("{% include 'other.jinja' %}")),
    Case("template-import", GENERATE_OWN,
         TEMPLATE + ": the model's chat template uses {{% from %}} (line 2), which reads "
         "another template file; a chat template must be one self-contained template",
         "refused when the tokenizer loads", setup=base_with_template(
             "{{ messages[0].content }}\n{% from 'macros.jinja' import turn %}")),
    Case("template-divides-by-zero", GENERATE_OWN,
         TEMPLATE + ": the model's chat template failed: ZeroDivisionError: division by zero",
         "nothing generated (was: ZeroDivisionError)",
         setup=base_with_template("{{ messages | length / 0 }}")),
    Case("alpha-1e308", TRAIN + ["--alpha", "1e308"],
         "--alpha gives a scaling of 5e+307 (alpha / r), beyond 65504, the largest float16 "
         "number the update is computed in; got 1e+308",
         "nothing written (was: RuntimeError from the fused layers: overflow)"),
    Case("adapter-alpha-1e308", GENERATE + ["--adapter", "{dir}/adapter"],
         "{dir}/adapter/adapter_config.json: field 'lora_alpha' gives a scaling of 5e+307 "
         "(alpha / r), beyond 65504, the largest float16 number the update is computed in; got "
         "1e+308", "the model is not touched (was: RuntimeError at the first forward)",
         setup=lambda d, n: edit_adapter_config(copy_adapter(d, n), lora_alpha=1e308)),
    Case("device-meta", ["train", "--model", "{work}/base", "--config", "{dir}/run.json"],
         "device 'meta': the meta device holds no data, so a model cannot run there; use "
         "\"cpu\", \"cuda\" or \"auto\"", "nothing written (was: RuntimeError: unsupported "
         "scalarType)", setup=lambda d, n: train_config(d, n, device="meta")),
    Case("minimind-1d-embedding", ["generate", "--model", "{dir}/minimind.pth", "--model-config",
                                   "minimind2", "--tokenizer", "{work}/base", "hi"],
         "{dir}/minimind.pth: model.embed_tokens.weight has shape [12800]; expected a matrix "
         "with no empty dimension in a MiniMind model", "nothing loaded (was: ValueError: not "
         "enough values to unpack)", setup=minimind_pth(lambda sd: sd.update({
             "model.embed_tokens.weight": sd["model.embed_tokens.weight"].flatten()}))),
    Case("combine-svd-weights-overflow",
         ["combine", "--model", "{work}/base", "a={work}/run/adapter", "b={dir}/adapter",
          "--weights", "1e200", "1", "--method", "svd", "--out", "{dir}/mix"],
         "weights {{'a': 1e+200, 'b': 1.0}}: the weighted sum of the updates of "
         "model.layers.0.self_attn.q_proj is not finite in float32; use smaller weights",
         "nothing written (was: torch's LinAlgError: the SVD failed to converge)",
         setup=lambda d, n: copy_adapter(d, n)),
    # -- 3. templates are programs: bounded ------------------------------------------------------
    Case("template-hangs", GENERATE_OWN,
         TEMPLATE + ": the model's chat template ran past 0.2 seconds on one conversation and "
         "was stopped; use a template without long loops",
         "stopped at the render time bound (5 s; lowered here) (was: ran for hours)",
         setup=base_with_template(HANG), patch=render_seconds(0.2)),
    Case("template-makes-4-gb", GENERATE_OWN,
         TEMPLATE + ": the model's chat template made a value of 4000000000 characters or items "
         "(the bound is 67108864) and was stopped; use a template whose text is about as long "
         "as the messages", "refused before the string is built (was: killed at 3 GB)",
         setup=base_with_template("{{ 'a' * 4000000000 }}")),
    Case("template-doubles-a-string", GENERATE_OWN,
         TEMPLATE + ": the model's chat template made a string of more than 67108864 "
         "characters and was stopped; use a template whose text is about as long as the "
         "messages", "stopped at 64 Mi characters (~ is bounded too)",
         setup=base_with_template(DOUBLING)),
    Case("template-pads-to-4-gb", GENERATE_OWN,
         TEMPLATE + ": the model's chat template made a count of 4000000000 (the bound is "
         "67108864) and was stopped; use a template whose text is about as long as the "
         "messages", "refused before the call (filters and methods are bounded too)",
         setup=base_with_template("{{ messages[0].content | center(4000000000) }}")),
    Case("template-file-6-gb", GENERATE_OWN,
         "[Errno 27] " + TEMPLATE + " is larger than 1048576 bytes; expected a chat template "
         "(Jinja text)", "not read (was: read whole, 6 GB)",
         setup=base_with(lambda b: sparse_file(b / "chat_template.jinja", 6 << 30))),
    Case("template-file-is-a-fifo", GENERATE_OWN,
         "[Errno 22] " + TEMPLATE + " is a FIFO (pipe); expected a chat template (Jinja text)",
         "not opened (was: skipped for another template, exit 0)",
         setup=base_with(lambda b: os.mkfifo(b / "chat_template.jinja"))),
    Case("template-file-is-a-folder", GENERATE_OWN,
         "[Errno 22] " + TEMPLATE + " is a folder; expected a chat template (Jinja text)",
         "nothing used (was: skipped for another template, exit 0)",
         setup=base_with(lambda b: (b / "chat_template.jinja").mkdir())),
    Case("template-not-a-string", GENERATE_OWN,
         "{dir}/base/tokenizer_config.json: field 'chat_template': a JSON number; expected a "
         "Jinja template string (or null)", "nothing used (was: skipped for ChatML, exit 0)",
         setup=lambda d, n: edit_json(copy_base(d, n) / "tokenizer_config.json",
                                      chat_template=12345)),
]
CASES += ROUND_THREE


def parquet_of_30_million_rows(d: Path, n: dict) -> None:
    """30 million dictionary-encoded rows in a file of about 200 KB."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 30_000_000
    text = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int8)),
                                          pa.array(["Say hello. Hello! How can I help you?"]))
    pq.write_table(pa.table({"text": text}), d / "many.parquet", row_group_size=rows // 4)


def data_folder(*extra: str) -> Callable[[Path, dict], None]:
    """{dir}/data: a.jsonl (good chats) and ``extra``: "b.jsonl->" a link to nothing, "sub/"
    a folder."""
    def setup(d: Path, n: dict) -> None:
        folder = d / "data"
        folder.mkdir()
        write_jsonl(folder / "a.jsonl", chat_rows(repeat=4))
        for name in extra:
            if name.endswith("->"):
                os.symlink(d / "gone.jsonl", folder / name[:-2])
            else:
                (folder / name.rstrip("/")).mkdir()
                write_jsonl(folder / name.rstrip("/") / "c.jsonl", chat_rows())

    return setup


def lowered(name: str, value: int) -> Callable[[pytest.MonkeyPatch, Path], None]:
    def patch(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
        monkeypatch.setattr(f"minilora.data.formats.{name}", value)

    return patch


LONG_PROMPT = "hello world " * 600  # 2415 tokens; the shared bases' context is 512
ROUND_THREE_DATA = [
    # -- 4. data readers in bounded time and memory ----------------------------------------
    Case("parquet-of-30-million-rows", TRAIN + ["--data", "{dir}/many.parquet"],
         "{dir}/many.parquet: holds 30000000 rows, more than 10000000 (a Parquet file "
         "compresses repeated rows; the samples would not fit in memory); split it or train on "
         "a part", "refused from the metadata, nothing read (was: killed at 3 GB)",
         setup=parquet_of_30_million_rows),
    Case("json-array-too-large", TRAIN + ["--data", "{dir}/data.json"],
         "{dir}/data.json: {dir}/data.json is larger than 1024 bytes; expected a JSON array file "
         "(use JSON Lines for more)", "not read whole (bound 2 GiB, lowered here)",
         setup=lambda d, n: write_file(d / "data.json", json.dumps(chat_rows(repeat=4)).encode()),
         patch=lowered("MAX_ARRAY_BYTES", 1024)),
    Case("json-array-nested-too-deeply", TRAIN + ["--data", "{dir}/data.json"],
         "{dir}/data.json:1: an item nested too deeply; expected a JSON array of objects",
         "nothing written (was: RecursionError)",
         setup=lambda d, n: write_file(d / "data.json", b"[" + b"[" * 100000 + b"]" * 100000
                                       + b"]")),
    Case("alpaca-history-not-pairs", TRAIN,
         "{data}:1: field 'history[0]': expected [instruction, response], two strings",
         "nothing written (was: history ignored, exit 0)",
         rows=[{"instruction": "Add 2 and 3.", "output": "5", "history": [["Hi"]]}]),
    Case("record-of-three-formats", TRAIN,
         "{data}:1: the keys of more than one format ('messages', 'instruction', 'output', "
         "'text'); keep one: conversations or messages (chat), instruction and output (Alpaca), "
         "or text", "nothing written (was: the messages trained, the rest ignored)",
         rows=[{"messages": CHATS[1], "instruction": "Hi", "output": "Hello", "text": "Hi"}]),
    Case("data-folder-with-a-dangling-link", TRAIN + ["--data", "{dir}/data"],
         "{dir}/data/b.jsonl: is a link to nothing (its target is missing); fix or remove it, or "
         "pass the files to train on", "nothing written (was: trained on a.jsonl alone, exit 0)",
         setup=data_folder("b.jsonl->")),
    Case("data-folder-with-a-sub-folder", TRAIN + ["--data", "{dir}/data"],
         "{dir}/data/more: is a folder inside the --data folder; sub-folders are not read: move "
         "its files up, or pass it as --data itself", "nothing written (was: its files left out, "
         "exit 0)", setup=data_folder("more/")),
    Case("prompt-longer-than-the-context", GENERATE[:-1] + [LONG_PROMPT],
         "the prompt is 2415 tokens, but the model's context (max_position_embeddings) is 512 "
         "tokens, which leaves no room for a reply; shorten the prompt",
         "nothing generated (was: generated past the context without a word); a shorter prompt "
         "generates up to the context's end"),
    Case("train-sample-longer-than-the-context", TRAIN + ["--max-seq-len", "4096"],
         "{data}: a sample of 2404 tokens is longer than the model's context "
         "(max_position_embeddings: 512 tokens); use --max-seq-len 512 or less",
         "nothing written (was: trained on positions past the context without a word)",
         rows=[{"text": LONG_PROMPT}] * 4),
    Case("eval-question-longer-than-the-context",
         ["eval", "--model", "{work}/base", "--tasks", "{dir}/tasks.jsonl"],
         "{dir}/tasks.jsonl:1: the prompt is 2415 tokens, but the model's context "
         "(max_position_embeddings) is 512 tokens, which leaves no room for a reply; shorten the "
         "question", "checked before any question is answered; `eval --data` cuts samples at "
         "the context with a note instead",
         setup=lambda d, n: write_jsonl(d / "tasks.jsonl", [
             {"task": "t", "messages": [{"role": "user", "content": LONG_PROMPT}],
              "expected": "x", "match": "contains"}])),
]
CASES += ROUND_THREE_DATA


def hold_lock_beside(output: str, command: str) -> Callable[[Path, dict], None]:
    """Another run is writing ``output`` (this process, through another lock file handle)."""
    def setup(d: Path, n: dict) -> None:
        n["lock"] = FolderLock.beside(d / output, command).acquire()

    return setup


ROUND_THREE_OUTPUTS = [
    # -- 5. every output folder replaced whole, and locked ----------------------------------
    Case("second-combine-into-a-busy-folder",
         ["combine", "--model", "{work}/base", "a={work}/run/adapter", "b={work}/run/adapter",
          "--weights", "0.5", "0.5", "--out", "{dir}/mix"],
         "{dir}/mix is in use by another process (minilora combine, PID {pid}); wait for it to "
         "end, or choose another output folder", "the running combine's output is untouched "
         "(was: both wrote, both said \"written\")",
         setup=hold_lock_beside("mix", "combine"), after=release_lock),
    Case("second-convert-into-a-busy-file",
         ["convert", "--model", "{work}/base", "{work}/run/adapter", "{dir}/lora.pth"],
         "{dir}/lora.pth is in use by another process (minilora convert, PID {pid}); wait for it "
         "to end, or choose another output folder", "the running convert's output is untouched",
         setup=hold_lock_beside("lora.pth", "convert"), after=release_lock),
]
CASES += ROUND_THREE_OUTPUTS

ROUND_THREE_INITS = [
    # -- 1. adapters whose initialisation rewrote the base ----------------------------------
    Case("peft-pissa-adapter", GENERATE + ["--adapter", "{dir}/adapter"],
         "{dir}/adapter/adapter_config.json: field 'init_lora_weights' is 'pissa': that "
         "initialisation rewrote the base weights (PEFT repeats it on the base it loads the "
         "adapter onto), so A and B do not fit a base as it is; convert it to plain LoRA with "
         "PEFT (save_pretrained's path_initial_model_for_weight_conversion)",
         "the model is not touched (was: loaded, logits off by 1.7 to 5.6)",
         setup=lambda d, n: edit_adapter_config(copy_adapter(d, n),
                                                init_lora_weights="pissa")),
    Case("peft-corda-adapter", GENERATE + ["--adapter", "{dir}/adapter"],
         "{dir}/adapter/adapter_config.json: field 'init_lora_weights' is 'corda': that "
         "initialisation rewrote the base weights (PEFT repeats it on the base it loads the "
         "adapter onto), so A and B do not fit a base as it is; convert it to plain LoRA with "
         "PEFT (save_pretrained's path_initial_model_for_weight_conversion)",
         "the model is not touched; pissa_niter_N, olora, loftq and lora_ga too",
         setup=lambda d, n: edit_adapter_config(copy_adapter(d, n), init_lora_weights="corda")),
    Case("quantize-nf4-with-pissa", TRAIN + ["--quantize", "nf4", "--init", "pissa"],
         "--quantize: PiSSA (--init pissa) replaces the base weights with their residual, which "
         "a quantized base cannot hold; train PiSSA on the full-precision base, or quantize with "
         "another --init", "nothing written, checked before bitsandbytes is needed (was: every "
         "step trained, then a crash at the save, and again after --resume)"),
]
CASES += ROUND_THREE_INITS

# --modules-to-save and --trainable-tokens (PEFT's modules_to_save, trainable_token_indices)
EXTRA_TRAINABLES = [
    Case("modules-to-save-matches-nothing", TRAIN + ["--modules-to-save", "lm_hed"],
         "modules to save: 'lm_hed' matches no module (the model's module names end in: "
         "down_proj, embed_tokens…", "nothing written"),
    Case("modules-to-save-a-lora-layer", TRAIN + ["--modules-to-save", "o_proj"],
         "modules to save: model.layers.0.self_attn.o_proj (and 1 more) is, holds or sits in a "
         "LoRA layer or trainable tokens; a module trains one way, by LoRA, its token rows or "
         "as a whole copy: drop it from one list",
         "nothing written; --exclude o_proj to save them whole"),
    Case("trainable-token-outside-vocabulary", TRAIN + ["--trainable-tokens", "5", "100000"],
         "trainable tokens: token ids [100000] are outside the vocabulary of "
         "model.embed_tokens…", "nothing written"),
    Case("trainable-token-negative", TRAIN + ["--trainable-tokens", "-3"],
         "--trainable-tokens must be token ids >= 0, got [-3]", "nothing written"),
    Case("trainable-token-not-an-integer", TRAIN + ["--trainable-tokens", "1.5"],
         "argument --trainable-tokens: expected token ids (integers), got '1.5' (see "
         "`minilora train --help`)", "nothing written; find a word's ids with the tokenizer"),
]
CASES += EXTRA_TRAINABLES


def trained_with_embedding_tying(d: Path, n: dict) -> None:
    """An adapter with LoRA on the embedding whose config says PEFT's ensure_weight_tying."""
    train_first("--targets", "embed_tokens,q_proj")(d, n)
    edit_adapter_config(d / "out" / "adapter", ensure_weight_tying=True)


EMBEDDING_LORA = [
    Case("embedding-dora", TRAIN + ["--targets", "embed_tokens,q_proj", "--dora"],
         "LoRA on the embedding model.embed_tokens: DoRA is not supported on an embedding; "
         "leave the embedding out of the targets or turn DoRA off",
         "nothing written; PEFT has DoRA on an embedding, minilora does not"),
    Case("embedding-pissa", TRAIN + ["--targets", "embed_tokens,q_proj", "--init", "pissa"],
         "LoRA on the embedding model.embed_tokens: the PiSSA init is not supported on an "
         "embedding; leave the embedding out of the targets or use another init",
         "nothing written (PEFT silently starts an embedding its own way instead)"),
    Case("export-embedding-adapter-only", EXPORT + ["--adapter", "{dir}/out", "--adapter-only",
                                                    "--out", "{dir}/a.gguf"],
         "adapter 'default' has LoRA on the embedding (model.embed_tokens), which minilora does "
         "not write as a llama.cpp adapter; export the merged model instead (without "
         "--adapter-only)", "nothing written; the merged export holds the embedding's update",
         setup=train_first("--targets", "embed_tokens,q_proj")),
    Case("peft-embedding-weight-tying", GENERATE + ["--adapter", "{dir}/out/adapter"],
         "{dir}/out/adapter/adapter_config.json: field 'ensure_weight_tying' is true with LoRA "
         "on an embedding: the tied output head would share the embedding's update, which "
         "minilora does not do; save the adapter with ensure_weight_tying false",
         "the model is not touched", setup=trained_with_embedding_tying),
]
CASES += EMBEDDING_LORA


def rehash(path: Path) -> None:
    """Record a planted checkpoint file in the manifest, as an attacker who edits both would."""
    manifest = path.parent / "manifest.json"
    data = json.loads(manifest.read_text())
    data["files"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest.write_text(json.dumps(data))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def snapshot(*roots: Path) -> dict[Path, str]:
    """Every file under roots with a digest of its bytes (size and mtime for big ones)."""
    files = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.name != LOCK_NAME:  # the lock file holds its last holder's PID
                st = p.stat()
                files[p] = (f"{st.st_size}:{st.st_mtime_ns}" if st.st_size > 1 << 20
                            else hashlib.sha256(p.read_bytes()).hexdigest())
    return files


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_clear_line_exit_2_and_nothing_damaged(
        case: Case, work: Path, names: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    n = {**names, "dir": tmp_path, "data": tmp_path / "data.jsonl", "pid": os.getpid()}
    write_jsonl(tmp_path / "data.jsonl", chat_rows(repeat=4) if case.rows is None else case.rows)
    if case.setup is not None:
        case.setup(tmp_path, n)
    before = snapshot(work, tmp_path)
    if case.patch is not None:
        case.patch(monkeypatch, tmp_path)
    argv = fill(case.argv, n)
    code, err = run_cli(argv, capsys)
    monkeypatch.undo()

    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    expected = f"minilora {argv[0]}: error: " + case.message.format(**n)
    if expected.endswith("…"):
        assert lines[-1].startswith(expected[:-1]), lines[-1]
    else:
        assert lines[-1] == expected
    assert all(PROGRESS.match(line) for line in lines[:-1]), err
    after = snapshot(work, tmp_path)
    allowed = tuple(str(tmp_path / p) for p in case.may_change)
    changed = [str(p) for p, digest in before.items()
               if after.get(p) != digest and not str(p).startswith(allowed)]
    assert not changed, f"changed or removed: {changed}"
    leftovers = [str(p) for p in after if ".tmp" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    assert not (tmp_path / MARKER).exists(), "the pickle's payload ran"
    if case.after is not None:
        case.after(tmp_path, n, capsys)


def test_the_catalogue_in_the_docs_is_the_tested_one() -> None:
    """docs/reliability.md has one row per case, with the message the test checks."""
    doc = DOC.read_text(encoding="utf-8")
    cells = [[c.strip() for c in line.strip().strip("|").split(" | ")]
             for line in doc.splitlines() if line.startswith("| `")]
    rows = {c[0].strip("`"): c[2].strip("`") for c in cells}
    shown = {"dir": "<dir>", "data": "<dir>/data.jsonl", "work": "<work>", "pid": "<pid>",
             "fp_run": "sha256:<the adapter's>", "fp_other": "sha256:<this base's>"}
    assert set(rows) == {c.id for c in CASES}
    for case in CASES:
        assert rows[case.id] == case.message.format(**shown), case.id


def test_a_100_mb_line_is_skipped_in_pieces_not_read_whole(work: Path, tok) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(DataError, match=r"huge\.jsonl:2: line longer than 16777216 bytes"):
            load_jsonl(work / "huge.jsonl", tok, 64)
        dataset = load_jsonl(work / "huge.jsonl", tok, 64, skip_bad=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - started
    # The line is 100 MiB; reading it whole (or decoding it) would need at least that.
    assert peak < 2.2 * MAX_LINE_BYTES, f"peak {peak / 2**20:.0f} MiB"
    assert seconds < 10
    assert dataset.stats.skipped_bad == 1 and len(dataset) == 2  # the lines around it are read


# ---------------------------------------------------------------------------------------------
# Crash safety: SIGKILL at random moments, then --resume
# ---------------------------------------------------------------------------------------------

# Loaded by the child processes through PYTHONPATH: every fsync takes a little longer, as on a
# slow disk, so that a good share of the random kills land inside checkpoint writes.
SLOW_DISK = """\
import os
import time

_fsync = os.fsync


def _slow_fsync(fd):
    time.sleep(0.015)
    _fsync(fd)


os.fsync = _slow_fsync
"""
KILLS = 5


def check_latest_checkpoint(folder: Path) -> int:
    """The latest complete checkpoint is whole (checksum, step); returns its step (0: none)."""
    latest = latest_checkpoint(folder)
    if latest is None:
        return 0
    state = torch.load(latest / "state.pt", map_location="cpu", weights_only=True)
    blob = (latest / "trainable.safetensors").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == state["trainable_sha256"], latest
    assert state["step"] == int(latest.name.removeprefix("step-"))
    return state["step"]


def kill_at_random(proc: subprocess.Popen, folder: Path, rng: random.Random,
                   in_a_write: bool) -> str:
    """Wait for training to start, a random delay, (a checkpoint write,) then SIGKILL."""
    seen = ""
    while not seen.endswith("\n") or not seen.splitlines()[-1].startswith("data: "):
        line = proc.stderr.readline()
        assert line, f"the run ended before training: {seen}"
        seen += line
    time.sleep(rng.uniform(0.0, 0.3))
    deadline = time.monotonic() + 5
    while in_a_write and proc.poll() is None and time.monotonic() < deadline:
        if folder.is_dir() and any(".tmp-" in p.name for p in folder.iterdir()):
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    return seen + proc.communicate()[1]


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(work, tmp_path,
                                                                          capsys) -> None:
    args = ["train", "--model", str(work / "base"), "--data", str(work / "train.jsonl"),
            "--max-steps", "24", "--batch-size", "4", "--r", "2", "--max-seq-len", "64",
            "--amp-dtype", "float32", "--seed", "3", "--lr", "1e-2", "--dropout", "0.1",
            "--save-every", "1", "--log-every", "1"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_DISK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO)]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    folder = out / "checkpoints"
    rng = random.Random(20261129)
    kills = torn = 0
    for attempt in range(KILLS + 1):
        start = check_latest_checkpoint(folder)
        resume = ["--resume"] if attempt else []
        proc = subprocess.Popen([sys.executable, "-m", "minilora", *args, "--out", str(out),
                                 *resume], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=tmp_path)
        if attempt < KILLS:
            err = kill_at_random(proc, folder, rng, in_a_write=attempt % 2 == 1)
        else:
            err = proc.communicate(timeout=300)[1]
            assert proc.returncode == 0, err
        assert "Traceback" not in err, err
        # A resumed run starts right after the latest complete checkpoint, never a torn one.
        steps = [int(s) for s in re.findall(r"^step (\d+)/24 ", err, re.M)]
        assert not steps or steps[0] == start + 1, (start, steps[:3])
        if proc.returncode == 0:
            break
        kills += 1
        torn += folder.is_dir() and any(".tmp-" in p.name for p in folder.iterdir())
        check_latest_checkpoint(folder)

    assert kills == KILLS, f"only {kills} kills landed before the run finished"
    assert torn >= 1, "no kill landed inside a checkpoint write"
    assert [p.name for p in folder.iterdir()] == ["step-00000024"]  # torn leftovers cleaned
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-6)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))  # no step logged twice


# ---------------------------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------------------------


class InfGradient(torch.autograd.Function):
    """The identity forward; an infinite gradient backward (a finite loss, a non-finite step)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


def poison(model: torch.nn.Module, kind: str, calls: Callable[[int], bool]) -> None:
    """Make the forward calls (from 0) that ``calls`` picks go non-finite in the way ``kind`` says.

    nan-loss / inf-loss: the loss; inf-grad: the gradient, the loss staying finite; nan-weight:
    a LoRA weight (then every later loss).
    """
    count = [0]

    def before(module: torch.nn.Module, args: Any) -> None:
        count[0] += 1
        if kind == "nan-weight" and calls(count[0] - 1):
            with torch.no_grad():
                lora_modules(module)[0][1].lora_A["default"].weight[0, 0] = float("nan")

    def after(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if kind == "nan-weight" or not calls(count[0] - 1):
            return output
        loss = {"nan-loss": lambda x: x * float("nan"), "inf-loss": lambda x: x + float("inf"),
                "inf-grad": InfGradient.apply}[kind](output.loss)
        return dataclasses.replace(output, loss=loss)

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after)


@pytest.fixture(scope="module")
def short_run(tok, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The adapter after 1 step of a clean run (the reference for a skipped step 2)."""
    out = tmp_path_factory.mktemp("clean")
    fit(tiny_model(tok.vocab_size), tok, nan_config(tmp_path_factory, out, stop_after=1))
    return load_file(out / "adapter" / "adapter_model.safetensors")


def nan_config(tmp_path_factory, out: Path, **changes: Any) -> TrainConfig:
    data = tmp_path_factory.getbasetemp() / "nan-train.jsonl"
    if not data.exists():
        write_jsonl(data, chat_rows(repeat=4))
    return TrainConfig(**{**dict(data=str(data), out_dir=str(out), lora_r=2, batch_size=4,
                                 lr=1e-2, max_seq_len=64, amp_dtype="float32", log_every=1, seed=0,
                                 max_steps=4), **changes})


@pytest.mark.parametrize("kind", ["nan-loss", "inf-loss", "inf-grad"])
def test_a_non_finite_step_is_skipped_counted_and_logged(kind, tok, tmp_path_factory,
                                                         short_run) -> None:
    out = tmp_path_factory.mktemp(kind)
    model = tiny_model(tok.vocab_size)
    poison(model, kind, lambda call: call == 1)  # step 2
    result = fit(model, tok, nan_config(tmp_path_factory, out, stop_after=2))
    assert result.skipped_steps == 1 and result.steps == 2

    # metrics.jsonl stays strict JSON: no loss that step (null), the skip counted.
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in metrics.jsonl")

    records = [json.loads(line, parse_constant=refuse)
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"]) for r in records] == [(1, 0), (2, 1)]
    assert records[0]["loss"] > 0 and records[1]["loss"] is None
    # Skipped means skipped: the weights after step 2 are those after step 1.
    after = load_file(out / "adapter" / "adapter_model.safetensors")
    for key, value in short_run.items():
        assert torch.equal(after[key], value), key


def test_k_non_finite_steps_in_a_row_stop_the_run(tok, tmp_path_factory) -> None:
    out = tmp_path_factory.mktemp("stop")
    model = tiny_model(tok.vocab_size)
    poison(model, "inf-grad", lambda call: call >= 2)
    with pytest.raises(TrainError, match="stopped at step 6: 4 steps in a row had a non-finite"):
        fit(model, tok, nan_config(tmp_path_factory, out, max_steps=8, max_bad_steps=4,
                                     save_every=1))
    state = torch.load(latest_checkpoint(out / "checkpoints") / "state.pt", weights_only=True)
    assert state["step"] == 5 and state["skipped"] == 3 and state["bad_in_a_row"] == 3
    assert not (out / "adapter").exists()


# ---------------------------------------------------------------------------------------------
# Hostile files
# ---------------------------------------------------------------------------------------------


def test_the_planted_payload_is_live(tmp_path: Path) -> None:
    """The control for the hostile cases: unpickled without weights_only, the payload runs."""
    path = hostile(tmp_path / "lora.pth", tmp_path / MARKER, x=torch.zeros(1))
    torch.load(path, weights_only=False)
    assert (tmp_path / MARKER).read_text() == "code ran"


def test_every_read_in_the_package_is_safetensors_or_weights_only() -> None:
    """Every torch.load passes weights_only=True; nothing imports pickle or its relatives."""
    loads = 0
    for file in sorted((REPO / "minilora").rglob("*.py")):
        where = file.relative_to(REPO)
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"} & {
                    m.split(".")[0] for m in modules}, f"{where}:{node.lineno}"
                if getattr(node, "module", None) == "torch":
                    assert "load" not in [a.name for a in node.names], f"{where}:{node.lineno}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                    node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                loads += 1
                safe = [k for k in node.keywords if k.arg == "weights_only"
                        and isinstance(k.value, ast.Constant) and k.value.value is True]
                assert safe, f"{where}:{node.lineno}: torch.load without weights_only=True"
            if isinstance(node, ast.Attribute) and node.attr in ("add_safe_globals",
                                                                 "safe_globals"):
                raise AssertionError(f"{where}:{node.lineno}: widens weights_only")
    assert loads >= 4  # adapter, weights, train (twice), cli: the reads exist


# ---------------------------------------------------------------------------------------------
# The adapter save: SIGKILL anywhere leaves the old adapter, the new one, or a refusal
# ---------------------------------------------------------------------------------------------

# Points inside save_adapter where a forked child stops and waits to be killed: between the two
# files of the new folder, after both (before the rename), after the exchange (before the old
# folder is removed).
SAVE_POINTS = ("between-files", "before-rename", "after-exchange")
# Without an atomic exchange (another system): the old folder renamed aside, not yet replaced.
FALLBACK_POINT = "between-renames"


def _two_adapters(vocab: int) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """A model with LoRA, and the two adapters a save loop alternates: (alpha, B value)."""
    from minilora.lora.injection import inject_lora
    from minilora.lora.layer import LoraConfig

    model = tiny_model(vocab)
    inject_lora(model, LoraConfig(r=2, alpha=16, targets=["q_proj", "v_proj"]))
    return model, {"alpha": 16.0, "b": 0.5}, {"alpha": 32.0, "b": 0.25}


def _set(model: torch.nn.Module, adapter: dict[str, Any]) -> None:
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_B["default"].weight.fill_(adapter["b"])
            module.lora_alpha["default"] = adapter["alpha"]
            module.scaling["default"] = adapter["alpha"] / 2


def _kill_child(work: Callable[[int], None], point: str | None, rng: random.Random,
                longest: float) -> int:
    """Forks a child that runs ``work(write_fd)`` (it writes "go" then "at POINT" lines to the
    pipe), and SIGKILLs it at ``point`` or, with None, after a random wait of up to ``longest``
    seconds; reaps it, so its PID is no longer alive for the cleanup. Returns that PID."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            work(write)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        assert pipe.readline() == b"go\n"
        if point is None:
            time.sleep(rng.uniform(0, longest))
        else:
            assert pipe.readline() == f"at {point}\n".encode()
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return pid


def _save_loop(model: torch.nn.Module, folder: Path, adapters: list[dict], first: int,
               point: str | None, pipe: int) -> None:
    """The child: announce, then save adapters[first], the other, ... until killed; with a
    ``point``, stop there in the first save and wait to be killed."""
    import minilora.core.files as files
    from minilora.adapters.folder import save_adapter

    def stop_here(name: str) -> None:
        if name == point:
            os.write(pipe, b"at " + name.encode() + b"\n")
            time.sleep(60)

    real_write_text, real_fsync_dir, real_exchange = Path.write_text, files.fsync_dir, \
        files._exchange
    Path.write_text = lambda self, *a, **k: (  # type: ignore[method-assign]
        stop_here("between-files") if self.name == "adapter_config.json" else None,
        real_write_text(self, *a, **k))[1]
    files.fsync_dir = lambda f: (stop_here("before-rename") if ".tmp-" in str(f) else None,
                                 real_fsync_dir(f))[1]
    files._exchange = lambda a, b: (real_exchange(a, b), stop_here("after-exchange"))[0]
    if point == FALLBACK_POINT:
        real_rename = os.rename
        files._exchange = lambda a, b: False
        os.rename = lambda a, b: (real_rename(a, b), stop_here(  # type: ignore[assignment]
            FALLBACK_POINT) if ".old-" in str(b) else None)[0]
    os.write(pipe, b"go\n")
    for i in range(10**6):
        _set(model, adapters[(first + i) % 2])
        save_adapter(model, folder)


def _loads_as(folder: Path, vocab: int, adapters: list[dict]) -> str:
    """"old", "new" or "refused": what a reader gets from the folder."""
    from minilora.core.errors import AdapterError

    reader = tiny_model(vocab)
    try:
        config = load_adapter(reader, folder)
    except AdapterError:
        return "refused"
    b = {float(m.lora_B["default"].weight.detach().unique()[0]) for _, m in lora_modules(reader)}
    for name, adapter in zip(("old", "new"), adapters, strict=True):
        if config.alpha == adapter["alpha"] and b == {adapter["b"]}:
            return name
    raise AssertionError(f"a mixture: alpha {config.alpha} with B values {b}")


def test_sigkill_during_adapter_saves_leaves_the_old_or_the_new_adapter(tok, tmp_path) -> None:
    from minilora.adapters.folder import save_adapter

    vocab = tok.vocab_size
    model, old, new = _two_adapters(vocab)
    adapters = [old, new]
    folder = tmp_path / "adapter"
    _set(model, old)
    started = time.perf_counter()
    save_adapter(model, folder)
    one_save = time.perf_counter() - started  # random kills land within the first few saves
    rng = random.Random(0)
    # The fallback kills come last: each leaves the folder missing until the next writer's
    # first step puts the backup back, and a random kill could land before that step (then a
    # reader finds no folder, which is what the fallback documents, not a mixture).
    plan = [p for p in SAVE_POINTS for _ in range(3)] + [None] * 15 + [FALLBACK_POINT] * 3
    state = "old"
    for point in plan:
        before = state
        first = 1 if before == "old" else 0  # the child's first save changes the folder
        pid = _kill_child(partial(_save_loop, model, folder, adapters, first, point), point, rng,
                          4 * one_save)
        state = _loads_as(folder, vocab, adapters)
        if point == FALLBACK_POINT:  # refused (no folder); the backup holds the old one whole
            assert state == "refused"
            (backup,) = tmp_path.glob(f".adapter.old-{pid}")
            assert _loads_as(backup, vocab, adapters) == before
            state = before  # what the next save puts back first
            continue
        assert state in ("old", "new"), state  # whole, never a mixture, never missing
        if point in ("between-files", "before-rename"):
            assert state == before, point  # the save under way is not visible yet
        elif point == "after-exchange":
            assert state != before, point  # the new folder is in place; the old one aside
    assert len(plan) >= 20
    # A later save cleans what the killed writers left (their new folders, their backups).
    _set(model, new)
    save_adapter(model, folder)
    assert _loads_as(folder, vocab, adapters) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ---------------------------------------------------------------------------------------------
# Crash safety of merge: its output folder is replaced whole
# ---------------------------------------------------------------------------------------------

# Where a killed merge stops: the weights written (the tokenizer not yet), between the
# tokenizer's two files, and after the new folder was swapped in (the old one not yet removed).
MERGE_POINTS = ("after-weights", "between-tokenizer-files", "after-exchange")
OWN_TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"


def _merge_child(argv: list[str], point: str | None, pipe: int) -> None:
    """The child: announce, stop at ``point`` (and wait to be killed), else merge until done."""
    import minilora.data.tokenizer as tokenizer_module
    from minilora.data.tokenizer import Tokenizer

    def stop_here(name: str) -> None:
        if name == point:
            os.write(pipe, b"at " + name.encode() + b"\n")
            time.sleep(60)

    real_save, real_write, real_rmtree = Tokenizer.save, tokenizer_module.atomic_write, \
        shutil.rmtree

    def save(self: Tokenizer, folder: Any) -> Path:
        stop_here("after-weights")
        return real_save(self, folder)

    def atomic_write(path: Any, data: Any) -> None:
        if Path(path).name == "tokenizer_config.json":
            stop_here("between-tokenizer-files")
        real_write(path, data)

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        if ".old-" in Path(path).name and Path(path).exists():  # not the first, stale sweep
            stop_here("after-exchange")
        real_rmtree(path, *args, **kwargs)

    Tokenizer.save, tokenizer_module.atomic_write, shutil.rmtree = save, atomic_write, rmtree
    os.write(pipe, b"go\n")
    main(argv)


def _merged_as(out: Path, refs: dict[str, tuple[torch.Tensor, str | None]]) -> str:
    """"old" or "new" when the folder's weights and tokenizer are both that merge's, else what
    it holds ("weights new, tokenizer old")."""
    from minilora.data.tokenizer import Tokenizer

    model = load_model(out).eval()
    with torch.no_grad():
        logits = model(torch.arange(12).view(1, -1)).logits
    template = Tokenizer.from_file(out).chat_template
    weights = [k for k, (want, _) in refs.items() if torch.allclose(logits, want, atol=1e-5)]
    tokenizer = [k for k, (_, want) in refs.items() if template == want]
    if weights == tokenizer and len(weights) == 1:
        return weights[0]
    return f"weights {weights}, tokenizer {tokenizer}"


def test_sigkill_during_merge_leaves_the_old_or_the_new_model(work, tmp_path, capsys) -> None:
    """merge into a folder holding an earlier merge, killed at fixed points and at random: the
    folder loads as the old merged model or the new one, weights and tokenizer together (it was
    written file by file: new weights under an old tokenizer loaded with ChatML)."""
    own = copy_base(tmp_path, {"work": work})  # the same weights, a template of its own
    edit_json(own / "tokenizer_config.json", chat_template=OWN_TEMPLATE)
    stronger = copy_adapter(tmp_path, {"work": work})
    rewrite_tensors(stronger / "adapter_model.safetensors", lambda t: t.update(
        {k: v * 3 for k, v in t.items() if "lora_B" in k}))
    out = tmp_path / "merged"
    old = ["merge", "--model", str(work / "base"), "--adapter", str(work / "run" / "adapter"),
           "--out", str(out)]
    new = ["merge", "--model", str(own), "--adapter", str(stronger), "--out", str(out)]
    refs = {}
    for name, argv in (("new", new), ("old", old)):  # the folder holds the old one after
        started = time.perf_counter()
        assert main(argv) == 0
        model = load_model(out).eval()
        with torch.no_grad():
            refs[name] = (model(torch.arange(12).view(1, -1)).logits,
                          None if name == "old" else OWN_TEMPLATE)
    one_merge = time.perf_counter() - started
    assert not torch.allclose(refs["old"][0], refs["new"][0], atol=1e-3)
    rng = random.Random(0)
    for point in [*MERGE_POINTS, None, None, None]:
        _kill_child(partial(_merge_child, new, point), point, rng, 1.5 * one_merge)
        state = _merged_as(out, refs)
        assert state in ("old", "new"), (point, state)
        if point in ("after-weights", "between-tokenizer-files"):
            assert state == "old", point  # the merge under way is not visible yet
        elif point == "after-exchange":
            assert state == "new", point
        assert main(old) == 0  # the next merge cleans up what the killed one left
        assert _merged_as(out, refs) == "old"
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged"]
