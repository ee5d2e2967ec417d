"""The LoRA training step of two source trees (before / after a change), in alternating processes.

    python benchmarks/kernel_ab.py BEFORE_TREE AFTER_TREE            # 6 rounds, 4 layers
    python benchmarks/kernel_ab.py /tmp/base . --rounds 4 --layers 2 --dtypes fp32

Each round starts one fresh process per tree and row, in turn (the order swapped every round);
each process builds benchmarks/run.py's model of its own tree (MiniMind's small size, LoRA r=8 on
every Linear, fused projections on), runs a warm-up step, then times `--steps` steps in CPU
seconds on one thread and prints the median. The table gives the median over the rounds of each
tree, and the median and the 25th-75th percentile of the per-round ratio after / before: the
run-to-run spread a difference must exceed. Both trees' processes see the same load, in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, statistics, sys, time
tree, dtype, layers, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path[:0] = [tree, tree + "/benchmarks"]
import torch
torch.set_num_threads(1)
import run as bench
shapes = dict(bench.FULL_SHAPES, num_hidden_layers=layers)
step = bench._train_fn(dict(kind="train", impl="minilora", target="all", dtype=dtype), shapes,
                       (4, 256))
step()
times = []
for _ in range(steps):
    t0 = time.process_time()
    step()
    times.append(time.process_time() - t0)
import minilora
assert minilora.__file__.startswith(tree), minilora.__file__
print(json.dumps(statistics.median(times)))
"""


def _one(tree: str, dtype: str, layers: int, steps: int) -> float:
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", WORKER, tree, dtype, str(layers), str(steps)],
                         env=env, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", help="the source tree before the change (holds minilora/)")
    p.add_argument("after", help="the source tree after it")
    p.add_argument("--rounds", type=int, default=6, help="processes per tree and row")
    p.add_argument("--steps", type=int, default=4, help="timed steps per process")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (8: MiniMind's small)")
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32, bf16 (autocast) or both")
    args = p.parse_args()
    trees = {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())}
    print("| dtype | before (s) | after (s) | after / before | spread (25-75%) |\n"
          "|---|---:|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        t: dict[str, list[float]] = {"before": [], "after": []}
        for rnd in range(args.rounds):
            for name in (("before", "after") if rnd % 2 == 0 else ("after", "before")):
                t[name].append(_one(trees[name], dtype, args.layers, args.steps))
        ratios = [a / b for a, b in zip(t["after"], t["before"], strict=True)]
        q = statistics.quantiles(ratios, n=4, method="inclusive")
        print(f"| {dtype} | {statistics.median(t['before']):.3f} | "
              f"{statistics.median(t['after']):.3f} | {statistics.median(ratios):.3f}x | "
              f"{q[0]:.3f} - {q[2]:.3f} |", flush=True)
    print(f"\nLoRA r=8 all-linear training step, batch 4 x 256, {args.layers} layers, 1 thread, "
          f"median of {args.steps} steps per process, {args.rounds} processes per tree and row")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
