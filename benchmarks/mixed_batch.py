"""One mixed batch (each row its own adapter) against the groups run one adapter at a time.

    python benchmarks/mixed_batch.py            # a short run (under a minute on 2 idle cores)
    python benchmarks/mixed_batch.py --hidden 512 --layers 8 --repeat 5   # the benchmark model

8 rows over 4 adapters (2 rows each), the same model and adapters both ways:
- mixed: one forward / one generate_batch call with adapter_names per row;
- grouped: for each adapter, set_active then the same call on its 2 rows (4 calls).
Rows: a prefill forward over the whole prompt, and greedy generation (prefill + decode steps,
where batching pays most: every decode step is 4 small forwards instead of one). The two ways
alternate, after one warm-up each, and each reports its fastest of --repeat runs: on a CPU shared
with other work the minimum is the least disturbed figure. The ratio is grouped / mixed (> 1:
the mixed batch is faster).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minilora.decoding.generation import generate_batch  # noqa: E402
from minilora.lora.injection import inject_lora  # noqa: E402
from minilora.lora.layer import LoraConfig, lora_modules  # noqa: E402
from minilora.lora.named import set_active  # noqa: E402
from minilora.model.decoder import CausalLM, ModelConfig  # noqa: E402

ADAPTERS = ["a0", "a1", "a2", "a3"]


def build(hidden: int, layers: int, rank: int) -> CausalLM:
    torch.manual_seed(0)
    config = ModelConfig(model_type="llama", vocab_size=6400, hidden_size=hidden,
                         intermediate_size=64 * ((int(hidden * 8 / 3) + 63) // 64),
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=4096)
    model = CausalLM(config).eval()
    for i, name in enumerate(ADAPTERS):
        inject_lora(model, LoraConfig(r=rank, alpha=2 * rank), name=name)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, m in lora_modules(model):
                b = m.lora_B[name].weight
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
    return model


def fastest_seconds(fns: list, repeat: int) -> list[float]:
    """The fastest of `repeat` timed runs of each function, the functions taking turns."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args.hidden, args.layers, args.rank)
    names = [ADAPTERS[i % len(ADAPTERS)] for i in range(8)]  # 8 rows, 2 per adapter
    x = torch.randint(0, 6400, (8, args.prompt), generator=torch.Generator().manual_seed(1))
    prompts = x.tolist()
    groups = {n: [i for i, m in enumerate(names) if m == n] for n in ADAPTERS}

    @torch.inference_mode()
    def forward_mixed() -> None:
        model(x, adapter_names=names)

    @torch.inference_mode()
    def forward_grouped() -> None:
        for name, rows in groups.items():
            set_active(model, name)
            model(x[rows])

    def generate_mixed() -> None:
        generate_batch(model, prompts, max_new_tokens=args.new_tokens, adapter_names=names)

    def generate_grouped() -> None:
        for name, rows in groups.items():
            set_active(model, name)
            generate_batch(model, [prompts[i] for i in rows], max_new_tokens=args.new_tokens)

    # the two ways give the same tokens (checked once, outside the timing)
    mixed_out = generate_batch(model, prompts, max_new_tokens=4, adapter_names=names)
    for name, rows in groups.items():
        set_active(model, name)
        assert generate_batch(model, [prompts[i] for i in rows], max_new_tokens=4) == [
            mixed_out[i] for i in rows], name

    rows = [
        (f"forward, 8 x {args.prompt} tokens", forward_mixed, forward_grouped),
        (f"generate, 8 x ({args.prompt} + {args.new_tokens}) tokens", generate_mixed,
         generate_grouped),
    ]
    print(f"model: hidden {args.hidden}, {args.layers} layers, all-linear LoRA r={args.rank} x "
          f"{len(ADAPTERS)} adapters; 8 rows, 2 per adapter; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; fastest of {args.repeat}")
    print(f"| {'work':<36} | {'mixed batch (s)':>15} | {'4 groups (s)':>12} | {'ratio':>5} |")
    print(f"|{'-' * 38}|{'-' * 17}|{'-' * 14}|{'-' * 7}|")
    for label, mixed, grouped in rows:
        t_mixed, t_grouped = fastest_seconds([mixed, grouped], args.repeat)
        print(f"| {label:<36} | {t_mixed:>15.3f} | {t_grouped:>12.3f} | "
              f"{t_grouped / t_mixed:>5.2f} |")


if __name__ == "__main__":
    main()
