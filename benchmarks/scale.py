"""Scale-out on a CPU: one process, DDP x2 and FSDP x2 (``--fsdp``) on the benchmark model.

    python benchmarks/scale.py            # benchmark model (run.py's FULL_SHAPES), a few minutes
    python benchmarks/scale.py --quick    # tiny shapes: checks that every row runs
    python benchmarks/scale.py --cap-gib 1.9 --layers 16,24   # which rows fit a memory cap

Each row is a fresh launch: one process (``--worker``), or ``torchrun --standalone
--nproc_per_node 2`` of the same worker. A worker builds the model (LoRA r=8 on every Linear),
trains ``--steps`` steps of a fixed global batch on random token rows through ``train()``, and
reports: its peak RSS (``ru_maxrss``: loading and sharding included), the parameter bytes it holds
after training (DTensor local shards under FSDP), and the median seconds per step after the
first (from metrics.jsonl). The single process runs 2 intra-op threads, each of the two ranks 1,
so every row has the machine's 2 cores.

``--cap-gib`` uses a wider model (CAP_SHAPES: 43 MiB of fp32 weights a block) saved once as a
safetensors base for each depth in ``--layers``, read by every row as ``minilora train`` reads it:
whole by each process for one process and DDP, only each rank's shards under FSDP (meta-device
model, sharded, then filled from the file). Each row runs once without a cap (its peak RSS,
address space and step time) and once under ``RLIMIT_AS`` of that many GiB per process
(inherited by torchrun's workers), and reports whether it finishes. RLIMIT_AS caps address
space, not resident memory: a process reserves several hundred MiB more than it touches (the
peak address space column shows how much), so the cap sits between the rows' address-space
peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from run import FULL_BATCH, FULL_SHAPES, QUICK_BATCH, QUICK_SHAPES  # noqa: E402

MODES = {"1 process": (1, False), "DDP x2": (2, False), "FSDP x2": (2, True)}
# --cap-gib only: FSDP as it runs on a model loaded whole by every rank (the train() API given a
# loaded model), beside the command line's shard-by-shard load
WHOLE_BASE_FSDP = "FSDP x2, base loaded whole per rank"
# The --cap-gib model: wide blocks (43 MiB of fp32 weights each) and a small vocabulary, so the
# blocks are nearly all of it (the root, gathered whole for the whole forward, is 25 MiB), and a
# small batch, so the weights and not the activations decide the peak.
CAP_SHAPES = dict(FULL_SHAPES, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                  num_key_value_heads=4)
CAP_BATCH = (2, 64)
MiB = 2**20


def worker(case_path: str) -> None:
    """One rank of one row: train, then write this rank's numbers beside the case file."""
    import torch

    from minilora.data.sft import DataStats, JsonlDataset, Sample
    from minilora.model.decoder import CausalLM, ModelConfig
    from minilora.model.io import load_model, load_skeleton
    from minilora.training.config import TrainConfig
    from minilora.training.fsdp import resident_bytes
    from minilora.training.loop import train

    case = json.loads(Path(case_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    base = case.get("base")
    if base is None:
        model = CausalLM(ModelConfig(model_type="llama", **case["shapes"]))
    elif case["fsdp"] and not case.get("whole_base"):
        # each rank reads only its shards, after fully_shard (training/fsdp.py)
        model = load_skeleton(base)
    else:  # the whole base, a file shard at a time
        model = load_model(base)
    rows, seq = case["global_batch"], case["seq"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, case["shapes"]["vocab_size"], (rows * 4, seq), generator=g).tolist()
    samples = [Sample(row, list(row)) for row in ids]
    data = JsonlDataset(samples, pad_id=0, max_seq_len=seq, path="random", stats=DataStats())
    out = Path(case["out"])
    config = TrainConfig(out_dir=str(out), lora_r=8, lora_alpha=16.0, lora_targets="all-linear",
                         batch_size=rows // case["world"], max_steps=case["steps"], lr=1e-4,
                         max_seq_len=seq, amp_dtype=case["amp"], log_every=1, seed=0,
                         fsdp=case["fsdp"], overwrite=True, model=base)
    train(model, data, config)
    if case["fsdp"]:
        model.reshard()  # FSDP keeps the root gathered after the last forward
    record = {"rank": rank, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "end_rss": _vm("VmRSS"), "peak_vm": _vm("VmPeak"), "params": resident_bytes(model)}
    if rank == 0:
        steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        tokens = rows * seq
        record["step_s"] = statistics.median(tokens / r["tokens_per_s"] for r in steps[1:])
    Path(f"{case_path}.{rank}.json").write_text(json.dumps(record))


def _vm(field: str) -> int:
    """A /proc/self/status field in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run_row(mode: str, shapes: dict, batch: tuple[int, int], steps: int, amp: str,
            folder: Path, cap: float | None, base: Path | None = None) -> dict | None:
    """Launch one row; its ranks' records, or None when it did not finish (under a cap)."""
    world, fsdp = MODES.get(mode, (2, True))
    case = {"shapes": shapes, "global_batch": batch[0], "seq": batch[1], "steps": steps,
            "amp": amp, "world": world, "fsdp": fsdp, "threads": 2 // world,
            "out": str(folder / "out"), "base": None if base is None else str(base),
            "whole_base": mode == WHOLE_BASE_FSDP}
    path = folder / "case.json"
    path.write_text(json.dumps(case))
    command = [sys.executable, __file__, "--worker", str(path)]
    if world > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", str(world), *command[1:]]
    limit = int(cap * 2**30) if cap else None

    def capped() -> None:
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": str(2 // world),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, preexec_fn=capped)
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("case.json.*.json"))]
    if done.returncode != 0 or len(records) != world:
        if cap is None:
            sys.exit(f"{mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return None
    return {"ranks": records, "step_s": next(r["step_s"] for r in records if r["rank"] == 0)}


def params_mib(shapes: dict) -> float:
    import torch

    from minilora.model.decoder import CausalLM, ModelConfig

    with torch.device("meta"):
        model = CausalLM(ModelConfig(model_type="llama", **shapes))
    return sum(p.numel() * 4 for p in model.parameters()) / MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps a row")
    parser.add_argument("--amp", default="float32", help="autocast dtype: float32 or bfloat16")
    parser.add_argument("--cap-gib", type=float, default=None,
                        help="run each row under RLIMIT_AS of this many GiB per process")
    parser.add_argument("--layers", default=None,
                        help="with --cap-gib: comma-separated depths of the model to try")
    parser.add_argument("--make-base", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.make_base:
        return make_base(*args.make_base)
    shapes = dict(QUICK_SHAPES if args.quick else FULL_SHAPES)
    batch = QUICK_BATCH if args.quick else FULL_BATCH
    steps = 2 if args.quick else args.steps
    if args.cap_gib:
        shapes = dict(QUICK_SHAPES) if args.quick else dict(CAP_SHAPES)
        return cap_table(shapes, QUICK_BATCH if args.quick else CAP_BATCH, steps, args)
    print(f"load average (1 min) before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"model: {params_mib(shapes):.0f} MiB of fp32 weights ({shapes['num_hidden_layers']} "
          f"layers, hidden {shapes['hidden_size']}); global batch {batch[0]} x {batch[1]} "
          f"tokens; {args.amp}; {steps} steps")
    print("| run | step (s) | peak RSS per rank (MiB) | RSS at the end per rank (MiB) | "
          "peak address space per rank (MiB) | parameters held per rank (MiB) |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        with tempfile.TemporaryDirectory() as d:
            row = run_row(mode, shapes, batch, steps, args.amp, Path(d), None)
        ranks = sorted(row["ranks"], key=lambda r: r["rank"])
        cells = [" / ".join(f"{r[key] / MiB:.{digits}f}" for r in ranks)
                 for key, digits in (("peak_rss", 0), ("end_rss", 0), ("peak_vm", 0),
                                     ("params", 1))]
        print(f"| {mode} | {row['step_s']:.3f} | " + " | ".join(cells) + " |", flush=True)
    print(f"load average (1 min) after: {os.getloadavg()[0]:.1f}")


def make_base(shapes_path: str, folder: str) -> None:
    """Save a randomly initialised model of these shapes as a safetensors base (256 MiB shards,
    so that writing it holds one shard's bytes at a time)."""
    import torch

    from minilora.model.decoder import CausalLM, ModelConfig
    from minilora.model.io import save_model

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(model_type="llama", **json.loads(shapes_path)))
    save_model(model, folder, max_shard_size=256 * MiB)


def cap_table(shapes: dict, batch: tuple[int, int], steps: int, args: argparse.Namespace
              ) -> None:
    """For each depth: each mode once without a cap (its peak RSS, address space and step time)
    and once under RLIMIT_AS of --cap-gib per process (whether it finishes). The base is saved
    once, to a safetensors folder, and read by every row: whole by each process for 1 process
    and DDP, each rank's shards only for FSDP."""
    depths = [int(x) for x in (args.layers or "16,24").split(",")]  # 43 MiB a layer
    print(f"load average (1 min) before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"cap: RLIMIT_AS {args.cap_gib} GiB per process (each torchrun worker has its own); "
          f"{args.amp}; global batch {batch[0]} x {batch[1]} tokens; {steps} steps; "
          "MALLOC_MMAP_THRESHOLD_=131072 in every row")
    print("| layers | fp32 weights (MiB) | run | step (s) | peak RSS per rank (MiB) | "
          "peak address space per rank (MiB) | under the cap |")
    print("|---|---|---|---|---|---|---|")
    for depth in depths:
        sized = dict(shapes, num_hidden_layers=depth)
        with tempfile.TemporaryDirectory() as base:
            subprocess.run([sys.executable, __file__, "--make-base", json.dumps(sized), base],
                           check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            # every row with the allocator policy --fsdp sets for itself on a CPU (fsdp.py):
            # glibc maps each tensor over 128 KiB on its own and unmaps it when freed
            os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
            for mode in [*MODES, WHOLE_BASE_FSDP]:
                with tempfile.TemporaryDirectory() as d:
                    row = run_row(mode, sized, batch, steps, args.amp, Path(d), None,
                                  Path(base))
                assert row is not None  # uncapped: run_row exits on a failure
                with tempfile.TemporaryDirectory() as d:
                    capped = run_row(mode, sized, batch, steps, args.amp, Path(d),
                                     args.cap_gib, Path(base))
                ranks = sorted(row["ranks"], key=lambda r: r["rank"])
                rss, vm = (" / ".join(f"{r[key] / MiB:.0f}" for r in ranks)
                           for key in ("peak_rss", "peak_vm"))
                print(f"| {depth} | {params_mib(sized):.0f} | {mode} | {row['step_s']:.2f} | "
                      f"{rss} | {vm} | {'fits' if capped else 'does not fit'} |", flush=True)
    print(f"load average (1 min) after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
