"""Fused projections (minilora.model.fused) against the same models unfused, in one process.

    python benchmarks/fused.py                 # MiniMind's small size, fp32 and bf16 autocast
    python benchmarks/fused.py --quick         # tiny shapes: checks that every row runs
    python benchmarks/fused.py --profile fp32  # self CPU ms per op, LoRA step fused/unfused

Training: the frozen-base floor and the LoRA step (r=8 all-linear), each fused and unfused (the
same model, `fused_projections(model, False)` around the unfused call), and transformers + PEFT
on the same weights; one step of each in turn per round, the order rotated every round.
Inference: the base and the unmerged LoRA model (B != 0), fused and unfused, in turn the same
way. Each table shows the median of the per-round ratios and their spread (25th to 75th
percentile), and what one forward keeps for backward (the bytes of the distinct storages
autograd saves).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import run as bench  # noqa: E402  (benchmarks/run.py: the same models, batches and steps)


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def _alternate(fns: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """CPU seconds of each call, the rows called in turn, the order rotated every round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(rounds):
        for k in range(len(names)):
            name = names[(rep + k) % len(names)]
            t0 = time.process_time()
            fns[name]()
            times[name].append(time.process_time() - t0)
    return times


def _saved_mib(step_forward) -> float:
    """MiB autograd keeps for backward after one forward (distinct storages)."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_forward()
    del loss
    return sum(seen.values()) / 2**20


def train_rows(dtype: str, shapes: dict, batch, args) -> tuple:
    from minilora.model.fused import fused_projections

    def case(impl, target):
        return dict(kind="train", impl=impl, target=target, dtype=dtype)

    steps = {"frozen": bench._train_fn(case("minilora-frozen", None), shapes, batch),
             "lora": bench._train_fn(case("minilora", "all"), shapes, batch)}
    peft_case = case("hf-peft", "all")
    steps["peft"] = bench._train_fn(peft_case, shapes, batch)

    def unfused(fn):
        def call():
            with fused_projections(fn.model, False):
                fn()
        return call

    fns = {"frozen fused": steps["frozen"], "frozen unfused": unfused(steps["frozen"]),
           "LoRA fused": steps["lora"], "LoRA unfused": unfused(steps["lora"]),
           "PEFT": steps["peft"]}
    t = _alternate(fns, args.rounds, args.warmup)

    def ratio(a, b):
        return _quantiles([x / y for x, y in zip(t[a], t[b], strict=True)])

    out = [f"| {dtype} | {name} | {statistics.median(t[name]):.3f} |" for name in fns]
    comps = [("frozen fused", "frozen unfused"), ("LoRA fused", "LoRA unfused"),
             ("LoRA fused", "PEFT"), ("LoRA unfused", "PEFT"), ("LoRA fused", "frozen fused"),
             ("LoRA unfused", "frozen unfused")]
    ratios = [f"| {dtype} | {a} / {b} | {m:.3f}x | {lo:.3f} - {hi:.3f} |"
              for a, b in comps for lo, m, hi in [ratio(a, b)]]
    mem = _saved_rows(dtype, shapes, batch)
    return out, ratios, mem, args.rounds


def _saved_rows(dtype: str, shapes: dict, batch) -> list[str]:
    import torch

    from minilora.model.fused import fused_projections

    rows = []
    for impl, target in (("minilora-frozen", None), ("minilora", "all")):
        model = bench._build(dict(impl=impl), shapes)
        bench._adapt(model, dict(impl=impl, target=target))
        ids, labels = bench._batch(shapes, batch, False)
        for on in (True, False):
            def fwd(model=model, ids=ids, labels=labels, on=on):
                with fused_projections(model, on), torch.autocast(
                        "cpu", torch.bfloat16, enabled=dtype == "bf16"):
                    return model(input_ids=ids, labels=labels).loss
            name = ("frozen" if target is None else "LoRA") + (" fused" if on else " unfused")
            rows.append(f"| {dtype} | {name} | {_saved_mib(fwd):.1f} |")
    return rows


def overhead_rows(dtype: str, shapes: dict, batch, args) -> list[str]:
    """Unmerged LoRA forward / base forward, fused and unfused, as run.py's overhead row."""
    import torch

    from minilora.lora.injection import inject_lora
    from minilora.lora.layer import LoraConfig
    from minilora.model.fused import fused_projections

    base = bench._build(dict(impl="minilora"), shapes)
    if dtype == "bf16":
        base = base.to(torch.bfloat16)
    unmerged = copy.deepcopy(base)
    inject_lora(unmerged, LoraConfig(r=bench.RANK, alpha=bench.ALPHA, targets="all-linear"))
    with torch.no_grad():
        for name, p in unmerged.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(std=0.02)
    ids, _ = bench._batch(shapes, batch, True)

    def call(model, on):
        def fn():
            with torch.inference_mode(), fused_projections(model, on):
                model.eval()(input_ids=ids)
        return fn

    fns = {"base fused": call(base, True), "unmerged fused": call(unmerged, True),
           "base unfused": call(base, False), "unmerged unfused": call(unmerged, False)}
    t = _alternate(fns, 3 * args.rounds, args.warmup)
    comps = [("unmerged fused", "base fused"), ("unmerged unfused", "base unfused"),
             ("base fused", "base unfused"), ("unmerged fused", "unmerged unfused"),
             ("unmerged fused", "base unfused")]
    return [f"| {dtype} | {a} / {b} | {m:.3f}x | {lo:.3f} - {hi:.3f} |"
            for a, b in comps
            for lo, m, hi in [_quantiles([x / y for x, y in zip(t[a], t[b], strict=True)])]]


def profile(dtype: str, shapes: dict, batch) -> None:
    """Self CPU ms per op of the LoRA step fused and unfused (each profiled twice, in turn)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    from minilora.model.fused import fused_projections

    step = bench._train_fn(dict(kind="train", impl="minilora", target="all", dtype=dtype),
                           shapes, batch)
    ms: dict[str, list[float]] = {}
    step()  # the optimizer's state and first-call setup, outside the profiles
    for on in (True, False, True, False):
        with fused_projections(step.model, on):
            step()
            with prof(activities=[ProfilerActivity.CPU]) as p:
                step()
        for e in p.key_averages():
            ms.setdefault(e.key, [0.0, 0.0])[0 if on else 1] += e.self_cpu_time_total / 2e3
    total = [sum(v[i] for v in ms.values()) for i in (0, 1)]
    print(f"{dtype} LoRA step, self CPU ms: fused {total[0]:.0f}, unfused {total[1]:.0f}\n")
    print("| op | fused | unfused | difference |\n|---|---:|---:|---:|")
    for key, (a, b) in sorted(ms.items(), key=lambda kv: -max(kv[1]))[:18]:
        print(f"| {key[:50]} | {a:.1f} | {b:.1f} | {a - b:+.1f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds")
    p.add_argument("--rounds", type=int, default=12, help="measured rounds (each row once)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32, bf16 (autocast) or both")
    p.add_argument("--profile", default=None,
                   help="print the per-op profile of the LoRA step (fp32 or bf16) only")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = bench.QUICK_SHAPES if args.quick else bench.FULL_SHAPES
    batch = bench.QUICK_BATCH if args.quick else bench.FULL_BATCH
    if args.quick:
        args.rounds = 3
    if args.profile:
        profile(args.profile, shapes, batch)
        return 0
    steps, ratios, saved, over = [], [], [], []
    for dtype in args.dtypes.split(","):
        s, r, m, _ = train_rows(dtype, shapes, batch, args)
        steps, ratios, saved = steps + s, ratios + r, saved + m
        print("\n".join(s + r + m), flush=True)
        over += overhead_rows(dtype, shapes, batch, args)
    print(f"batch {batch[0]} x {batch[1]}, {torch.get_num_threads()} threads, {args.rounds} "
          f"rounds (overhead: {3 * args.rounds}), CPU seconds\n")
    print("| dtype | training step | median (s) |\n|---|---|---:|\n" + "\n".join(steps))
    print("\n| dtype | ratio (per round) | median | 25th - 75th pct |\n|---|---|---:|---:|\n"
          + "\n".join(ratios))
    print("\n| dtype | forward with labels | saved for backward (MiB) |\n|---|---|---:|\n"
          + "\n".join(saved))
    print("\n| dtype | inference forward (per round) | median | 25th - 75th pct |\n"
          "|---|---|---:|---:|\n" + "\n".join(over))
    return 0


if __name__ == "__main__":
    sys.exit(main())
