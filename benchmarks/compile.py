"""The compiled training step (training/compiled.py, what `minilora train --compile` runs) beside
the eager one, in ONE process, alternated step by step, on the demo: the embedded model, the
demo data and settings (batch 16, max_seq_len 128, LoRA r=8 all-linear, AdamW).

Each dtype (fp32; bf16 autocast) gets its own model pair (eager, compiled) with the same
weights; the warm-up is the compiled row's first step, timed alone (compile
time), then ``--steps`` rounds, each running one eager and one compiled step on the same batch
(the order rotating) with a third: the eager model on the batch padded as the compiled step
pads it, which splits the ratio into what padding costs and what compiling gains. Recompiles
are counted from torch._dynamo's counters. Ratios are medians of the per-round ratios;
'spread' is (slowest - fastest) / median.

    python benchmarks/compile.py --steps 20
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

from minilora.cli import ASSETS, BASE_MODEL
from minilora.core.threads import configure_threads
from minilora.data.sft import load_jsonl
from minilora.data.tokenizer import Tokenizer
from minilora.lora.injection import inject_lora, lora_parameters, mark_trainable
from minilora.lora.layer import LoraConfig
from minilora.model.io import load_model
from minilora.training.compiled import CompiledLoss, pad_right, padded_length


def _settings() -> dict:
    return json.loads((ASSETS / "demo_train.json").read_text(encoding="utf-8"))


def _model(settings: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = load_model(BASE_MODEL)
    inject_lora(model, LoraConfig(r=settings["lora_r"], alpha=settings["lora_alpha"],
                                  targets=settings["lora_targets"]))
    mark_trainable(model)
    return model.train()


def _batches(settings: dict, count: int) -> list:
    tokenizer = Tokenizer.from_file(BASE_MODEL)
    data = load_jsonl(ASSETS / settings["data"], tokenizer, settings["max_seq_len"])
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    size = settings["batch_size"]
    return [data.collate(order[i * size:(i + 1) * size]) for i in range(count)]


def _stepper(model: torch.nn.Module, forward, amp: torch.dtype | None):
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4, fused=True)

    def step(batch) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = forward(batch.input_ids, labels=batch.labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    return step


def _row(name: str, amp: torch.dtype | None, settings: dict, batches: list, steps: int) -> dict:
    eager_model = _model(settings)
    compiled_model = copy.deepcopy(eager_model)
    longest = settings["max_seq_len"]
    eager = _stepper(eager_model, eager_model, amp)
    compiled = _stepper(compiled_model, CompiledLoss(compiled_model, longest), amp)
    eager(batches[0])  # first call costs (allocator, oneDNN primitives)
    before = counters["stats"]["unique_graphs"]
    warm = compiled(batches[0])
    first_graphs = counters["stats"]["unique_graphs"] - before
    padded_model = copy.deepcopy(eager_model)
    eager_padded = _stepper(padded_model, _padded(padded_model, longest), amp)
    eager_padded(batches[0])
    rows: list[list[float]] = [[], [], []]  # eager, compiled, eager on the padded batch
    for i in range(steps):
        batch = batches[i % len(batches)]
        order = [(i + k) % 3 for k in range(3)]  # each row first, second and third in turn
        for k in order:
            rows[k].append((eager, compiled, eager_padded)[k](batch))
    e_times, c_times, p_times = rows
    recompiles = counters["stats"]["unique_graphs"] - before - first_graphs

    def spread(t: list[float]) -> float:
        return (max(t) - min(t)) / statistics.median(t)
    return {"dtype": name, "warmup_s": warm, "graphs": first_graphs,
            "recompiles": recompiles, "eager_s": statistics.median(e_times),
            "eager_spread": spread(e_times), "compiled_s": statistics.median(c_times),
            "compiled_spread": spread(c_times),
            "ratio": statistics.median(c / e for c, e in zip(c_times, e_times, strict=True)),
            "padded_ratio": statistics.median(
                c / p for c, p in zip(c_times, p_times, strict=True)),
            "padding": sum(padded_length(b.input_ids.shape[1]) for b in batches)
            / sum(b.input_ids.shape[1] for b in batches) - 1}


def _padded(model: torch.nn.Module, longest: int):
    """The eager model on the batch padded as the compiled step pads it (what padding costs)."""
    def forward(input_ids, labels):
        length = padded_length(input_ids.shape[1])
        return model(pad_right(input_ids, length, 0), labels=pad_right(labels, length, -100))
    return forward


def _table(rows: list[dict]) -> str:
    lines = ["| dtype | warm-up (s) | graphs | recompiles after | eager step (s) "
             "| spread | compiled step (s) | spread | compiled / eager | padded tokens "
             "| compiled / eager on the padded batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['warmup_s']:.1f} | "
            f"{r['graphs']} | {r['recompiles']} | {r['eager_s']:.3f} | {r['eager_spread']:.0%} | "
            f"{r['compiled_s']:.3f} | {r['compiled_spread']:.0%} | {r['ratio']:.2f}x | "
            f"+{r['padding']:.0%} | {r['padded_ratio']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed rounds (eager + compiled each)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32 and bf16")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler tables of one eager and one compiled step")
    p.add_argument("--warm-cache", action="store_true",
                   help="reuse inductor's on-disk cache (default: a fresh one, a cold compile)")
    args = p.parse_args()
    if not args.warm_cache:  # read when inductor first compiles, so set before any compile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="minilora-inductor-")
    configure_threads()
    settings = _settings()
    batches = _batches(settings, 8)
    lengths = [b.input_ids.shape[1] for b in batches]
    print(f"torch {torch.__version__}, Python {platform.python_version()}, "
          f"{torch.get_num_threads()} threads; batch lengths {lengths}")
    rows = []
    for name in args.dtypes.split(","):
        amp = {"fp32": None, "bf16": torch.bfloat16}[name]
        rows.append(_row(name, amp, settings, batches, args.steps))
        if args.profile:
            _profile(amp, settings, batches[0])
    print(_table(rows))


def _profile(amp: torch.dtype | None, settings: dict, batch) -> None:
    for label in ("eager", "compiled"):
        model = _model(settings)
        forward = model if label == "eager" else CompiledLoss(model, settings["max_seq_len"])
        step = _stepper(model, forward, amp)
        step(batch)
        step(batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batch)
        print(f"{label} ({'bf16' if amp else 'fp32'}):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
