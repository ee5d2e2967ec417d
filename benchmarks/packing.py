"""Packed rows (block-diagonal attention) against padded rows on the demo data, one process.

    python benchmarks/packing.py [--seq-len 512] [--batch 8] [--repeat 5]

The embedded base with the demo's LoRA (r=8, all linear layers), a training step (forward,
backward) over the demo's persona set: once padded (each conversation its own row, rows of a
batch padded to the longest) and once packed (conversations first-fit into rows of --seq-len,
each attending only to itself). Each way runs over the same conversations; the ways take turns
and each reports its fastest of --repeat passes (the least disturbed figure on a shared CPU).
tokens/s counts real tokens only, so padding is cost without credit.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minilora.data.sft import load_jsonl  # noqa: E402
from minilora.data.tokenizer import Tokenizer  # noqa: E402
from minilora.lora.injection import inject_lora, lora_parameters  # noqa: E402
from minilora.lora.layer import LoraConfig  # noqa: E402
from minilora.model.io import load_model  # noqa: E402

ASSETS = ROOT / "minilora" / "assets"


def one_pass(model, dataset, batch: int) -> tuple[float, int, int]:
    """Seconds, real tokens and row slots (tokens + padding) of one pass over the dataset."""
    tokens = slots = 0
    start = time.perf_counter()
    for at in range(0, len(dataset), batch):
        b = dataset.collate(range(at, min(at + batch, len(dataset))))
        out = model(b.input_ids, labels=b.labels, segment_ids=b.segment_ids)
        out.loss.backward()
        tokens += b.tokens
        slots += b.input_ids.numel()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds, tokens, slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=512, help="packed row length")
    ap.add_argument("--batch", type=int, default=8, help="rows a step")
    ap.add_argument("--repeat", type=int, default=5, help="timed passes of each way")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = Tokenizer.from_file(ASSETS / "base")
    model = load_model(ASSETS / "base")
    inject_lora(model, LoraConfig(r=8, alpha=16, targets="all-linear"))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    padded = load_jsonl(ASSETS / "persona.jsonl", tok, args.seq_len)
    packed = load_jsonl(ASSETS / "persona.jsonl", tok, args.seq_len, pack=True)
    ways = {"padded": padded, "packed": packed}
    best = {k: (float("inf"), 0, 0) for k in ways}
    for d in ways.values():
        one_pass(model, d, args.batch)  # warm-up
    for _ in range(args.repeat):
        for k, d in ways.items():
            run = one_pass(model, d, args.batch)
            best[k] = min(best[k], run)
    cpu = platform.processor() or platform.machine()
    print(f"CPU: {cpu}, {torch.get_num_threads()} threads, pid {os.getpid()}, torch "
          f"{torch.__version__}; {len(padded)} conversations, batch {args.batch}")
    print(f"{'way':8} {'rows':>5} {'real tokens':>11} {'padding':>8} {'tokens/s':>9} "
          f"{'vs padded':>9}")
    base = best["padded"][1] / best["padded"][0]
    for k, d in ways.items():
        s, tokens, slots = best[k]
        print(f"{k:8} {len(d):5d} {tokens:11d} {1 - tokens / slots:8.1%} {tokens / s:9.0f} "
              f"{tokens / s / base:8.2f}x")


if __name__ == "__main__":
    main()
