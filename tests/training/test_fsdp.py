"""training/fsdp.py: --fsdp under torchrun on CPU (gloo), tiny model (hidden 32, 2 layers).

One module fixture runs every process launch once and the tests read what it left:
- a 2-process run (torchrun --standalone) whose rank 1 is SIGKILLed after the step-2 checkpoint;
- a run of one torchrun process (FSDP over a group of one) stopped at step 2;
- 2 "nodes" x 1 process through torchrun's c10d rendezvous on localhost: the uninterrupted run,
  the killed run resumed, the one-process run resumed on two, and a resume whose global batch
  does not divide over two processes (through the command line);
- the killed run's checkpoint resumed on one process;
- the reference: one process, no FSDP, the same global batch.
The single-process reference is the loop without FSDP (the DDP test compares that loop with
data parallelism the same way); the formula of the step is checked against the model's own in
test_train.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import chat_rows, fit, tiny_model, write_jsonl
from minilora.cli.main import main
from minilora.core.errors import CheckpointError
from minilora.model.io import save_model
from minilora.training.config import TrainConfig

TESTS = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = """
import json, os, signal, sys, time
from pathlib import Path
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from helpers import fit, tiny_model
from minilora.cli.main import main
from minilora.data.tokenizer import Tokenizer
from minilora.training import loop
from minilora.training.fsdp import resident_bytes
from minilora.training.loop import TrainConfig

tok = Tokenizer.from_file(sys.argv[2])
report, kill_at, cli = Path(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
rank = int(os.environ["RANK"])
if kill_at and rank == 1:  # die (SIGKILL) before step kill_at + 1, once its checkpoint is whole
    real_step = loop._step
    def killing_step(run, step, config, place):
        if step == kill_at:
            done = Path(config.out_dir) / "checkpoints" / f"step-{step:08d}"
            while not done.exists():
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(run, step, config, place)
    loop._step = killing_step
dist.init_process_group("gloo")  # one group for every run below
runs = []
for path in sys.argv[6:]:
    model = tiny_model(tok.vocab_size)
    result = fit(model, tok, TrainConfig.from_json(path))
    model.reshard()  # FSDP keeps the root gathered after a forward (the last eval's)
    runs.append({"start_step": result.start_step, "resident": resident_bytes(model),
                 "whole": sum(p.numel() * p.element_size() for p in model.parameters())})
code = main(cli) if cli else None
dist.destroy_process_group()
Path(f"{report}.{rank}.json").write_text(json.dumps({"runs": runs, "cli": code}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(agents: list[list[str]], worker: Path, args: list[str]) -> list[tuple[int, str]]:
    """Start each torchrun agent (its own flags) on the worker; (exit code, output) of each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *flags,
                               str(worker), *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for flags in agents]
    return [(p.wait(timeout=300), p.stdout.read()) for p in procs]


@contextmanager
def one_torchrun_process():
    """The environment torchrun gives a run of one process."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
            mp.setenv(name, value)
        yield


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=tol), (k, (a[k] - b[k]).abs().max())


def losses(out: Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("fsdp")
    data = str(write_jsonl(d / "train.jsonl", chat_rows(repeat=4)))  # 24 chats: 3 steps an epoch
    evals = str(write_jsonl(d / "eval.jsonl", chat_rows("messages")))
    tok_dir = tok.save(d / "tok")
    worker = d / "worker.py"
    worker.write_text(WORKER)

    def config(name: str, **changes) -> Path:
        # Per process 2 rows x 2 micro-batches; with 2 processes a global batch of 8 rows.
        # grad_clip 0.02 clips every step (the global norms are 0.03 to 0.16 here), so a norm
        # of one rank's shards instead of all of them would show.
        base = dict(data=data, out_dir=str(d / name), lora_r=4, lora_alpha=8.0, batch_size=2,
                    accumulation_steps=2, lr=1e-2, grad_clip=0.02, max_seq_len=64,
                    amp_dtype="float32", log_every=1, seed=0, max_steps=4, save_every=2,
                    eval_data=evals, eval_every=2, fsdp=True, activation_checkpointing=True)
        cfg = TrainConfig(**{**base, **changes})
        cfg.save_json(d / f"{name}.json")
        return d / f"{name}.json"

    def train(cfg: Path) -> None:
        fit(tiny_model(tok.vocab_size), tok, TrainConfig.from_json(cfg))

    short = dict(max_steps=2, eval_data=None, eval_every=0, save_every=0)
    standalone = ["--standalone", "--nproc_per_node", "2"]
    killed = launch([standalone], worker,
                    [str(TESTS), str(tok_dir), str(d / "killed"), "2", "[]", str(config("k"))])
    shutil.copytree(d / "k", d / "k1")  # the same killed run, resumed on one process below

    with one_torchrun_process():
        train(config("s", batch_size=4, stop_after=2))
    # A run through the command line whose global batch (3) does not divide over 2 processes.
    save_model(tiny_model(tok.vocab_size), d / "base")
    tok.save(d / "base")
    with one_torchrun_process():
        assert main(["train", "--model", str(d / "base"), "--data", data, "--out",
                     str(d / "three"), "--fsdp", "--batch-size", "3", "--max-steps", "4",
                     "--stop-after", "1", "--max-seq-len", "64", "--amp-dtype", "float32"]) == 0

    port = free_port()
    node = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "minilora-test"]
    cli = ["train", "--resume", "--out", str(d / "three"), "--batch-size", "1"]
    nodes = launch([node, node], worker, [
        str(TESTS), str(tok_dir), str(d / "nodes"), "0", json.dumps(cli),
        str(config("u")), str(config("k", resume=True)), str(config("s", resume=True)),
        str(config("bf", amp_dtype="bfloat16", **short))])

    with one_torchrun_process(), pytest.raises(CheckpointError) as regroup:
        train(config("k1", batch_size=2, resume=True))  # the global batch would halve
    with one_torchrun_process():
        train(config("k1", batch_size=4, resume=True))
    train(config("one", batch_size=4, fsdp=False, activation_checkpointing=False))
    train(config("bf1", batch_size=4, fsdp=False, amp_dtype="bfloat16", **short))
    reports = [json.loads((d / f"nodes.{rank}.json").read_text()) if (
        d / f"nodes.{rank}.json").exists() else None for rank in range(2)]
    return {"dir": d, "killed": killed, "nodes": nodes, "reports": reports,
            "regroup": str(regroup.value)}


def test_two_nodes_through_the_rendezvous_equal_one_process(runs):
    assert [code for code, _ in runs["nodes"]] == [0, 0], runs["nodes"]
    d = runs["dir"]
    one, sharded = losses(d / "one"), losses(d / "u")
    assert list(sharded) == [1, 2, 3, 4]
    assert list(sharded.values()) == pytest.approx(list(one.values()), abs=1e-5, rel=0)
    assert_close(adapter(d / "u"), adapter(d / "one"), 1e-5)
    evals = losses(d / "u", "eval_loss")  # every rank evaluates the whole set
    assert list(evals) == [2, 4]
    assert list(evals.values()) == pytest.approx(list(losses(d / "one", "eval_loss").values()),
                                                 abs=1e-5, rel=0)
    # The folder rank 0 writes is the one-process format: the same config and header.
    for name in ("adapter_config.json",):
        assert (d / "u" / "adapter" / name).read_text() == (d / "one" / "adapter" / name
                                                            ).read_text()
    meta = [safe_open(str(d / r / "adapter" / "adapter_model.safetensors"), "pt").metadata()
            for r in ("u", "one")]
    assert meta[0] == meta[1]
    assert (d / "u" / "best" / "adapter_model.safetensors").is_file()


def test_each_rank_holds_about_half_of_the_parameters(runs):
    reports = runs["reports"]
    assert all(r is not None for r in reports), runs["nodes"]
    resident = [r["runs"][0]["resident"] for r in reports]
    whole = reports[0]["runs"][0]["whole"]
    assert sum(resident) == whole  # the shards partition the model: nothing held twice
    assert all(0.45 * whole <= b <= 0.55 * whole for b in resident), (resident, whole)


def test_a_rank_killed_mid_run_resumes_to_the_uninterrupted_adapter(runs):
    code, output = runs["killed"][0]
    assert code != 0, output  # torchrun ended the job when rank 1 died
    d = runs["dir"]
    assert runs["reports"][0]["runs"][1]["start_step"] == 2
    assert_close(adapter(d / "k"), adapter(d / "u"), 0)  # same world size: exactly
    assert [losses(d / "k")[s] for s in (3, 4)] == [losses(d / "u")[s] for s in (3, 4)]


def test_a_checkpoint_resumes_on_another_number_of_processes(runs):
    d = runs["dir"]
    assert_close(adapter(d / "k1"), adapter(d / "u"), 1e-5)  # 2 processes, then 1
    assert runs["reports"][0]["runs"][2]["start_step"] == 2
    assert_close(adapter(d / "s"), adapter(d / "u"), 1e-5)  # 1 process, then 2


def test_a_global_batch_that_does_not_divide_is_one_line_exit_2(runs):
    assert runs["reports"][0]["cli"] == 2
    output = runs["nodes"][0][1] + runs["nodes"][1][1]
    line = (f"minilora train: error: {runs['dir']}/three/checkpoints/step-00000001 was written "
            "by a different run; refusing to resume: processes: the global batch of 3 rows (3 x "
            "1 process in the checkpoint) does not divide over 2 processes; resume on a number "
            "of processes that divides 3. Resume with the same settings, or train into a new "
            "--out.")
    assert line in output.splitlines(), output[-3000:]


def test_bf16_autocast_under_fsdp_trains_as_one_process_does(runs):
    d = runs["dir"]
    sharded, one = losses(d / "bf"), losses(d / "bf1")
    assert list(sharded) == [1, 2]
    # bf16 matmuls of other batch shapes round differently: close, not equal.
    assert list(sharded.values()) == pytest.approx(list(one.values()), abs=2e-2, rel=0)
    assert all(t.dtype == torch.float32 for t in adapter(d / "bf").values())
    # No adapter comparison: AdamW moves each weight by about lr a step whatever the gradient's
    # size, so bf16's rounding of the tiniest gradients shows as differences of order lr.


def test_another_number_of_processes_must_keep_the_global_batch(runs):
    assert ("batch_size: 2 x 2 processes in the checkpoint, 2 x 1 process now; resume with "
            "batch_size 4 on 1 process (the global batch stays the same)") in runs["regroup"]
