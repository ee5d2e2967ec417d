"""Training throughput when another process takes a core: torch's defaults against minilora's.

Rows (each a fresh worker process, since OpenMP reads OMP_WAIT_POLICY once at start-up):

- ``torch default``: one intra-op thread per CPU, OMP_WAIT_POLICY unset;
- ``passive``: the same threads, OMP_WAIT_POLICY=PASSIVE;
- ``minilora``: what the command line does (core/threads.py): PASSIVE, as many intra-op threads
  as CPUs are free, one inter-op thread.

each quiet and with one core taken by a spinning process. The rows run alternated, ``--repeat``
rounds, and each worker times its own steps (a LoRA step of the embedded model, batch x seq
tokens) after warm-up; the table gives the median tokens/s of each row.

    python benchmarks/shared_cpu.py --repeat 3 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORKER = r"""
import json, os, sys, time
setting, steps, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
import torch
if setting == "minilora":
    from minilora.core.threads import configure_threads
    configure_threads()
from minilora.cli import BASE_MODEL
from minilora.lora.injection import inject_lora, lora_parameters, mark_trainable
from minilora.lora.layer import LoraConfig
from minilora.model.io import load_model
model = load_model(BASE_MODEL)
inject_lora(model, LoraConfig(r=8, alpha=16, targets="all-linear"))
mark_trainable(model)
opt = torch.optim.AdamW(lora_parameters(model), lr=1e-3)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
def step():
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(2):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
seconds = time.perf_counter() - start
print(json.dumps({"tokens_per_s": steps * batch * seq / seconds,
                  "threads": torch.get_num_threads()}))
"""

SETTINGS = ("torch default", "passive", "minilora")


def run_worker(setting: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("OMP_WAIT_POLICY", None)
    if setting in ("passive", "minilora"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    done = subprocess.run(
        [sys.executable, "-c", WORKER, setting, str(args.steps), str(args.batch), str(args.seq)],
        env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every row")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per worker")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row")
    args = parser.parse_args()
    results: dict[tuple[str, str], list[float]] = {}
    threads: dict[tuple[str, str], int] = {}
    for _ in range(args.repeat):
        for load in ("quiet", "one core busy"):
            spinner = None
            if load != "quiet":
                spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.5)
            try:
                for setting in SETTINGS:
                    out = run_worker(setting, args)
                    results.setdefault((setting, load), []).append(out["tokens_per_s"])
                    threads[(setting, load)] = out["threads"]
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    print("| setting | threads quiet / busy | quiet tok/s | one core busy tok/s | busy / quiet |")
    print("|---|---:|---:|---:|---:|")
    for setting in SETTINGS:
        quiet = statistics.median(results[(setting, "quiet")])
        busy = statistics.median(results[(setting, "one core busy")])
        print(f"| {setting} | {threads[(setting, 'quiet')]} / "
              f"{threads[(setting, 'one core busy')]} | {quiet:,.0f} | {busy:,.0f} | "
              f"{busy / quiet:.2f} |")


if __name__ == "__main__":
    main()
