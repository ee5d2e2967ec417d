"""The serving engine stepped directly (no HTTP): a mixed batch's cost against the base's.

    python benchmarks/engine_mix.py                 # best of 3 rounds, 32 tokens a request
    python benchmarks/engine_mix.py --repeat 5 --max-tokens 24

The embedded base (minilora.cli BASE_MODEL) with 32 hand-made all-linear r=8 adapters (non-zero
B), all resident. Each row submits the same 32 seeded chat requests (temperature 1) to
minilora.serve.engine.Engine and steps it until every request is answered: to the base alone,
then spread over 1, 4 and 32 distinct adapters. The measure is tokens per second of this
process's CPU time (time.process_time, one torch thread), which the other jobs on a shared
machine disturb far less than wall time; each row reports its best of --repeat rounds, the
rows taking turns. Every request's answer is seeded per request and independent of the batch,
and every request decodes exactly --max-tokens tokens (`ignore_eos`, as vLLM's serving
benchmark does): a row whose adapters happened to end their answers sooner would otherwise
count fewer decode steps for the same prefill. So the rows differ only in which adapter each
row adds.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minilora.cli import BASE_MODEL  # noqa: E402
from minilora.data.tokenizer import Tokenizer  # noqa: E402
from minilora.lora.injection import inject_lora  # noqa: E402
from minilora.lora.layer import LoraConfig, lora_modules  # noqa: E402
from minilora.model.io import load_model  # noqa: E402
from minilora.serve.engine import Engine, Event, Request, SamplingParams  # noqa: E402

QUESTIONS = ["What is your name?", "Add 12 and 30.", "Reverse the word minilora.",
             "Tell me about yourself."]
REQUESTS = 32
ROWS = (0, 1, 4, 32)  # distinct adapters in the batch (0: the base alone)


def cpu_name() -> str:
    """The CPU's model name from lscpu (the platform's name where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def build(count: int):
    """The embedded base with `count` all-linear r=8 adapters a0.. (random non-zero B)."""
    model = load_model(BASE_MODEL)
    for i in range(count):
        name = f"a{i}"
        torch.manual_seed(100 + i)  # inject_lora draws A from the global generator
        inject_lora(model, LoraConfig(r=8, alpha=16), name=name)
        g = torch.Generator().manual_seed(i)
        for _, m in lora_modules(model):
            b = m.lora_B[name].weight
            b.data.copy_(torch.randn(b.shape, generator=g) * 0.5)
    return model


def run_row(engine: Engine, prompts: list[list[int]], adapters: int,
            max_tokens: int) -> tuple[float, int, list[str]]:
    """Submits the requests, steps the engine until all are answered.

    Returns:
        (CPU seconds, completion tokens, each request's text).
    """
    texts = [""] * len(prompts)
    done = [False] * len(prompts)
    tokens = [0]
    errors: list[str] = []

    def on_event(i: int):
        def take(event: Event) -> None:
            if event.error is not None:
                errors.append(f"request {i}: {event.error}")
                done[i] = True
                return
            texts[i] += event.text
            if event.finish_reason is not None:
                done[i] = True
                tokens[0] += event.completion_tokens
        return take

    start = time.process_time()
    for i, ids in enumerate(prompts):
        adapter = None if adapters == 0 else f"a{i % adapters}"
        params = SamplingParams(max_tokens=max_tokens, seed=i, temperature=1.0, ignore_eos=True)
        engine.submit(Request(ids, adapter, params, on_event(i)))
    while not all(done):
        engine.step()
    if errors:
        raise RuntimeError("; ".join(errors))
    return time.process_time() - start, tokens[0], texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each row keeps its best")
    parser.add_argument("--max-tokens", type=int, default=32, help="most new tokens a request")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_file(BASE_MODEL)
    model = build(max(ROWS))
    engine = Engine(model, tokenizer, max_batch=REQUESTS)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[i % 4]}],
                                     add_generation_prompt=True)[0] for i in range(REQUESTS)]
    best: dict[int, float] = {}
    answers: dict[int, list[str]] = {}
    run_row(engine, prompts[:4], 4, 4)  # warm up
    for _ in range(args.repeat):
        for adapters in ROWS:
            seconds, tokens, texts = run_row(engine, prompts, adapters, args.max_tokens)
            best[adapters] = max(best.get(adapters, 0.0), tokens / seconds)
            if answers.setdefault(adapters, texts) != texts:
                raise RuntimeError(f"{adapters} adapters: the answers changed between rounds")
    load = " / ".join(f"{v:.1f}" for v in _loadavg())
    print(f"engine stepped directly: the embedded base (hidden 256, 4 layers) + 32 all-linear "
          f"r=8 adapters; {REQUESTS} chat requests of up to {args.max_tokens} tokens "
          f"(temperature 1, seeded); CPU: {cpu_name()}; torch {torch.__version__}, 1 thread; "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; load average {load}; "
          f"best of {args.repeat} rounds\n")
    print("| adapters | tokens per CPU-second | vs the base |")
    print("|---|---:|---:|")
    for adapters in ROWS:
        label = "base alone" if adapters == 0 else str(adapters)
        print(f"| {label} | {best[adapters]:.0f} | {best[adapters] / best[0]:.2f}x |")


def _loadavg() -> tuple[float, float, float]:
    try:
        import os
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


if __name__ == "__main__":
    main()
