"""--fsdp on a safetensors base: each process reads only its shards of it (training/fsdp.py
shard_and_load), and the run is the one-process run.

One torchrun launch of 2 processes (CPU, gloo) trains through the command line three times,
plain LoRA, DoRA and DPO, on a saved base of hidden 64 (DoRA's a .pth of it, mapped; the others
safetensors); the references are the same commands in this process without --fsdp, global
batch the same.
What each process read from the base file is counted by wrapping the one reader of slices, and
loading the whole base (model.io.load_model) is recorded if it happens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import CHATS, chat_rows, tiny_model, write_jsonl
from minilora.cli.main import main
from minilora.model.io import save_model

TESTS = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = """
import json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
torch.set_num_threads(1)
from minilora.cli.main import main
from minilora.model import io, state_files

read, whole = [], []
real_read, real_load = state_files.BaseSlices.read, io.load_model
def counting_read(self, name, rows=None):
    t = real_read(self, name, rows)
    read.append(t.numel() * t.element_size())
    return t
def recording_load(*args, **kwargs):
    whole.append(str(args[0]))
    return real_load(*args, **kwargs)
state_files.BaseSlices.read = counting_read
io.load_model = recording_load
dist.init_process_group("gloo")
codes = [main(json.loads(cli)) for cli in sys.argv[2:]]
dist.destroy_process_group()
Path(f"{sys.argv[1]}.{os.environ['RANK']}.json").write_text(
    json.dumps({"codes": codes, "read": read, "whole": whole}))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("fsdp_loading")
    data = str(write_jsonl(d / "train.jsonl", chat_rows(repeat=2)))
    pairs = str(write_jsonl(d / "pairs.jsonl", [
        {"chosen": chat, "rejected": chat[:-1] + [{"role": "assistant", "content": "No idea."}]}
        for chat in CHATS] * 2))
    base, pth = d / "base", d / "pth"
    save_model(tiny_model(tok.vocab_size, hidden=64), base)
    tok.save(base)
    # The same base as a .pth (torch's zip format, mapped and sliced) beside its config.json
    pth.mkdir()
    shutil.copy(base / "config.json", pth)
    tok.save(pth)
    torch.save(tiny_model(tok.vocab_size, hidden=64).state_dict(), pth / "model.pth")
    worker = d / "worker.py"
    worker.write_text(WORKER)

    def cli(out: str, *extra: str, batch: int, rows: str = data, model: Path = base
            ) -> list[str]:
        return ["train", "--model", str(model), "--data", rows, "--out", str(d / out),
                "--batch-size", str(batch), "--max-steps", "2", "--max-seq-len", "64",
                "--lr", "1e-3", "--amp-dtype", "float32", "--log-every", "1", *extra]

    # DPO: its loss runs the model's sequence_log_probs (policy, then the base as reference),
    # not forward; the pairs are evaluated at the end.
    dpo = ("--method", "dpo", "--eval-data", pairs)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(d / "report"),
         json.dumps(cli("lora", "--fsdp", batch=2)),
         json.dumps(cli("dora", "--fsdp", "--dora", batch=2, model=pth)),
         json.dumps(cli("dpo", "--fsdp", *dpo, batch=1, rows=pairs))],
        env=env, capture_output=True, text=True, timeout=300)
    assert main(cli("lora1", batch=4)) == 0
    assert main(cli("dora1", "--dora", batch=4, model=pth)) == 0
    assert main(cli("dpo1", *dpo, batch=2, rows=pairs)) == 0
    reports = [json.loads(p.read_text()) if (p := d / f"report.{rank}.json").exists() else None
               for rank in range(2)]
    stored = sum(t.numel() * t.element_size()
                 for t in load_file(str(base / "model.safetensors")).values())
    return {"dir": d, "launched": launched, "reports": reports, "stored": stored}


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def losses(out: Path, key: str = "loss") -> list[float]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


def test_both_processes_train_through_the_command_line(runs):
    launched = runs["launched"]
    assert launched.returncode == 0, (launched.stdout + launched.stderr)[-3000:]
    assert [r["codes"] for r in runs["reports"]] == [[0, 0, 0], [0, 0, 0]]


def test_no_process_loads_the_whole_base(runs):
    for report in runs["reports"]:
        assert report["whole"] == []  # model.io.load_model was never called
    rank1 = runs["reports"][1]["read"]
    per_run = sum(rank1) / 3  # three runs read the same rows
    # Rank 1 reads its half of every tensor (torch.chunk's pieces: 65 of 129 rows at most),
    # nothing else; reading the base whole, or a whole tensor of it, would fail this.
    assert 0.45 * runs["stored"] <= per_run <= 0.52 * runs["stored"], (per_run, runs["stored"])
    # Rank 0 reads its half and, once per run, the LoRA layers' weights for the fingerprint.
    assert sum(runs["reports"][0]["read"]) > sum(rank1)


@pytest.mark.parametrize("name", ["lora", "dora", "dpo"])
def test_two_processes_reading_their_shards_equal_one_process(runs, name):
    d = runs["dir"]
    assert losses(d / name) == pytest.approx(losses(d / f"{name}1"), abs=1e-5, rel=0)
    sharded, one = adapter(d / name), adapter(d / f"{name}1")
    assert sharded.keys() == one.keys()
    if name == "dora":
        assert any("magnitude" in k for k in one)
    if name == "dpo":  # each process evaluates every pair (each forward needs both)
        evals = losses(d / name, "eval_loss")
        assert len(evals) == 1
        assert evals == pytest.approx(losses(d / "dpo1", "eval_loss"), abs=1e-5, rel=0)
    for k in one:
        assert torch.allclose(sharded[k], one[k], rtol=0, atol=1e-5), (
            k, (sharded[k] - one[k]).abs().max())
    # The base fingerprint, hashed from the file one weight at a time, is the whole model's.
    meta = [safe_open(str(d / r / "adapter" / "adapter_model.safetensors"), "pt").metadata()
            for r in (name, f"{name}1")]
    assert meta[0] == meta[1]
