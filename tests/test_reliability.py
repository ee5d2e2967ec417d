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
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import minilora.weights
from helpers import CHATS, chat_rows, tiny_model, write_jsonl
from minilora.adapter import FINGERPRINT_KEY, base_fingerprint, load_adapter
from minilora.cli import main
from minilora.data import MAX_LINE_BYTES, DataError, load_jsonl
from minilora.lora import lora_modules
from minilora.train import TrainConfig, TrainError, latest_checkpoint, train
from minilora.weights import load_model, save_model

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
         "--dtype", "float32", "--seed", "0", "--log-every", "1"]
GENERATE = ["generate", "--model", "{work}/base", "--max-new-tokens", "1", "hi"]
GOOD = {"conversations": CHATS[1]}
# What a failing train run may print before its error line.
PROGRESS = re.compile(r"(data: |step \d+/\d+ |resume: |eval at step |memory: )")


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


def poisoned(kind: str, calls: Callable[[int], bool]) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """Models loaded by the CLI go bad at the forward calls (from 0) that ``calls`` picks."""

    def patch(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
        real = minilora.weights.load_model

        def load(*args: Any, **kwargs: Any) -> Any:
            model = real(*args, **kwargs)
            poison(model, kind, calls)
            return model

        monkeypatch.setattr(minilora.weights, "load_model", load)

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
         "{data}:1: no 'conversations', 'messages' or 'text' key (keys found: 'prompt', "
         "'answer'); expected {{\"conversations\": [{{\"role\": ..., \"content\": ...}}, ...]}} "
         "or {{\"text\": ...}}", "nothing written",
         rows=[{"prompt": "Hi", "answer": "Hello"}]),
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
         "{dir}/missing.jsonl: file not found; expected a .jsonl file", "nothing written"),
    Case("folder-given-for-a-file", TRAIN + ["--data", "{dir}"],
         "{dir}: is a folder; expected a .jsonl file", "nothing written"),
    Case("bytes-not-utf8", TRAIN, "{data}:2: byte 13 is not UTF-8 (b'\\xe9'); expected UTF-8 "
         "text", "nothing written; --skip-bad skips and counts such lines",
         rows=[GOOD, b'{"text": "caf\xe9"}']),
    Case("100-mb-line", TRAIN + ["--data", "{work}/huge.jsonl"],
         "{work}/huge.jsonl:2: line longer than 16777216 bytes; expected one JSON object per "
         "line", "nothing written; read in 16 MiB pieces, never whole (test below)"),
    # -- settings -----------------------------------------------------------------------------
    Case("max-seq-len-0", TRAIN + ["--max-seq-len", "0"],
         "TrainConfig.max_seq_len: expected an integer >= 1, got 0", "nothing written"),
    Case("max-seq-len-negative-eval", ["eval", "--model", "{work}/base", "--data",
                                       "{work}/train.jsonl", "--max-seq-len", "-4"],
         "{work}/train.jsonl: max_seq_len must be at least 2, got -4", "nothing written"),
    Case("rank-0", TRAIN + ["--r", "0"], "TrainConfig.lora_r: expected an integer >= 1, got 0",
         "nothing written"),
    Case("rank-above-a-layer", TRAIN + ["--r", "20"],
         "r=20 is larger than min(in_features, out_features) of: ['model.layers.0.self_attn."
         "k_proj (32 -> 16)', 'model.layers.0.self_attn.v_proj (32 -> 16)', "
         "'model.layers.1.self_attn.k_proj (32 -> 16)', 'model.layers.1.self_attn.v_proj "
         "(32 -> 16)']", "nothing written; lower --r or --exclude those layers"),
    Case("alpha-0", TRAIN + ["--alpha", "0"],
         "TrainConfig.lora_*: LoraConfig.alpha must be > 0, got 0.0", "nothing written"),
    Case("alpha-negative", TRAIN + ["--alpha", "-2"],
         "TrainConfig.lora_*: LoraConfig.alpha must be > 0, got -2.0", "nothing written"),
    Case("dropout-1", TRAIN + ["--dropout", "1"],
         "TrainConfig.lora_*: LoraConfig.dropout must be in [0, 1), got 1.0", "nothing written"),
    Case("dropout-negative", TRAIN + ["--dropout", "-0.1"],
         "TrainConfig.lora_*: LoraConfig.dropout must be in [0, 1), got -0.1", "nothing written"),
    Case("targets-match-nothing", TRAIN + ["--targets", "qkv_proj"],
         "LoRA targets ['qkv_proj'] (exclude []) match no Linear module; the model's Linear "
         "modules are: model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, …",
         "nothing written"),
    Case("unknown-config-key", ["train", "--model", "{work}/base", "--config", "{dir}/run.json"],
         "unknown TrainConfig key(s) ['lora_rank']; valid keys: ['data', 'eval_data', …",
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
         "{work}/run/adapter/adapter_model.safetensors does not fit the model: mis-shaped keys "
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
    # -- runs, checkpoints, outputs -----------------------------------------------------------
    Case("resume-with-another-config", TRAIN + ["--resume", "--lr", "0.5"],
         "{dir}/out/checkpoints/step-00000001 was written by a different run; refusing to "
         "resume: lr: 0.0001 in the checkpoint, 0.5 now. Resume with the same settings, or "
         "train into a new out_dir.", "the checkpoint and adapter are untouched",
         setup=train_first("--stop-after", "1")),
    Case("resume-with-a-damaged-checkpoint", TRAIN + ["--resume"],
         "{dir}/out/checkpoints/step-00000001/trainable.safetensors: damaged (checksum "
         "mismatch)", "nothing written",
         setup=lambda d, n: (train_first("--stop-after", "1")(d, n), flip_last_byte(
             d / "out" / "checkpoints" / "step-00000001" / "trainable.safetensors"))),
    Case("fresh-run-over-an-unfinished-one", TRAIN,
         "{dir}/out/checkpoints/step-00000001 holds an unfinished run: pass resume=True "
         "(--resume) to continue it, or train into another out_dir",
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
         patch=fsync_fails("/.tmp-step-"), may_change=("out/config.json", "out/metrics.jsonl"),
         after=resume_completes),
    Case("disk-full-during-the-adapter-save",
         TRAIN + ["--max-steps", "4", "--save-every", "1", "--resume"],
         "[Errno 28] cannot write {dir}/out/adapter: No space left on device",
         "the previous adapter files are intact; the checkpoint holds the weights: --resume",
         setup=train_first("--max-steps", "4", "--save-every", "1", "--stop-after", "2"),
         patch=fsync_fails("/out/adapter/"),
         may_change=("out/config.json", "out/metrics.jsonl", "out/checkpoints/"),
         after=resume_completes),
    Case("non-finite-loss-k-steps-in-a-row",
         TRAIN + ["--max-steps", "6", "--max-bad-steps", "3", "--save-every", "1"],
         "stopped at step 4: 3 steps in a row had a non-finite loss or gradient (skipped, "
         "nothing saved from them); lower lr, use dtype float32, or check the data",
         "checkpoints hold the last finite weights; no adapter is written",
         patch=poisoned("nan-loss", lambda call: call >= 1),
         after=nothing_saved_is_non_finite),
    Case("non-finite-weights", TRAIN + ["--max-steps", "3", "--save-every", "1"],
         "refusing to save non-finite weights: ['model.layers.0.self_attn.q_proj.lora_A."
         "weight']", "the checkpoint before is kept; nothing non-finite is written",
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
         setup=lambda d, n: (train_first("--stop-after", "1")(d, n), hostile(
             d / "out" / "checkpoints" / "step-00000001" / "state.pt", d / MARKER,
             step=torch.tensor(1)))),
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
]


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def snapshot(*roots: Path) -> dict[Path, str]:
    """Every file under roots with a digest of its bytes (size and mtime for big ones)."""
    files = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                st = p.stat()
                files[p] = (f"{st.st_size}:{st.st_mtime_ns}" if st.st_size > 1 << 20
                            else hashlib.sha256(p.read_bytes()).hexdigest())
    return files


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_clear_line_exit_2_and_nothing_damaged(
        case: Case, work: Path, names: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    n = {**names, "dir": tmp_path, "data": tmp_path / "data.jsonl"}
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
    shown = {"dir": "<dir>", "data": "<dir>/data.jsonl", "work": "<work>",
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
        if folder.is_dir() and any(p.name.startswith(".tmp-") for p in folder.iterdir()):
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    return seen + proc.communicate()[1]


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(work, tmp_path,
                                                                          capsys) -> None:
    args = ["train", "--model", str(work / "base"), "--data", str(work / "train.jsonl"),
            "--max-steps", "24", "--batch-size", "4", "--r", "2", "--max-seq-len", "64",
            "--dtype", "float32", "--seed", "3", "--lr", "1e-2", "--dropout", "0.1",
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
        torn += folder.is_dir() and any(p.name.startswith(".tmp-") for p in folder.iterdir())
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
                lora_modules(module)[0][1].lora_A.weight[0, 0] = float("nan")

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
    train(tiny_model(tok.vocab_size), tok, nan_config(tmp_path_factory, out, stop_after=1))
    return load_file(out / "adapter" / "adapter_model.safetensors")


def nan_config(tmp_path_factory, out: Path, **changes: Any) -> TrainConfig:
    data = tmp_path_factory.getbasetemp() / "nan-train.jsonl"
    if not data.exists():
        write_jsonl(data, chat_rows(repeat=4))
    return TrainConfig(**{**dict(data=str(data), out_dir=str(out), lora_r=2, batch_size=4,
                                 lr=1e-2, max_seq_len=64, dtype="float32", log_every=1, seed=0,
                                 max_steps=4), **changes})


@pytest.mark.parametrize("kind", ["nan-loss", "inf-loss", "inf-grad"])
def test_a_non_finite_step_is_skipped_counted_and_logged(kind, tok, tmp_path_factory,
                                                         short_run) -> None:
    out = tmp_path_factory.mktemp(kind)
    model = tiny_model(tok.vocab_size)
    poison(model, kind, lambda call: call == 1)  # step 2
    result = train(model, tok, nan_config(tmp_path_factory, out, stop_after=2))
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
        train(model, tok, nan_config(tmp_path_factory, out, max_steps=8, max_bad_steps=4,
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
    for file in sorted((REPO / "minilora").glob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"} & {
                    m.split(".")[0] for m in modules}, f"{file.name}:{node.lineno}"
                if getattr(node, "module", None) == "torch":
                    assert "load" not in [a.name for a in node.names], f"{file.name}:{node.lineno}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                    node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                loads += 1
                safe = [k for k in node.keywords if k.arg == "weights_only"
                        and isinstance(k.value, ast.Constant) and k.value.value is True]
                assert safe, f"{file.name}:{node.lineno}: torch.load without weights_only=True"
            if isinstance(node, ast.Attribute) and node.attr in ("add_safe_globals",
                                                                 "safe_globals"):
                raise AssertionError(f"{file.name}:{node.lineno}: widens weights_only")
    assert loads >= 4  # adapter, weights, train (twice), cli: the reads exist
