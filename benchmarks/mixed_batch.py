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

A second table times one LoRA layer's routed forward (hidden -> the MLP's width, 32 adapters
of rank --rank, 32 rows spread over 1, 4, 16 or 32 of them; a decode step's 1 token a row and
a prefill's --prompt tokens a row), both ways a mixed batch can run it:
- loop: one adapter at a time (gather its rows, two rank-r products, add them back), the
  layer's `gather_mixed = False`;
- gathered: every row's A and B gathered from the layer's stacked adapters, two batched
  products (minilora.lora.stacked), the default.
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
from minilora.lora.layer import LoraConfig, LoRALinear, lora_modules  # noqa: E402
from minilora.lora.named import mixed_adapters, set_active  # noqa: E402
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


CALLS = 200  # layer calls per timed run


def time_routed(layer: LoRALinear, names: list[str], x: torch.Tensor, gather: bool) -> float:
    """Seconds for CALLS routed forwards of `layer` (routed once: the layer's own cost)."""
    layer.gather_mixed = gather
    with torch.inference_mode(), mixed_adapters(layer, names):
        start = time.perf_counter()
        for _ in range(CALLS):
            layer(x)
        return time.perf_counter() - start


def routed_layer_table(hidden: int, rank: int, prompt: int, repeat: int) -> None:
    """One LoRA layer's mixed-batch forward, the per-adapter loop against the gathered path."""
    torch.manual_seed(0)
    width = 64 * ((int(hidden * 8 / 3) + 63) // 64)  # the MLP's up projection
    layer = LoRALinear(torch.nn.Linear(hidden, width, bias=False), r=rank, alpha=2 * rank,
                       name="a0")
    for i in range(1, 32):
        layer.add_adapter(f"a{i}", r=rank, alpha=2 * rank)
    with torch.no_grad():
        for name in layer.adapter_names:
            layer.lora_B[name].weight.normal_(std=0.02)
    print(f"one routed LoRA layer: {hidden} -> {width}, 32 adapters of r={rank}, 32 rows; "
          f"fastest of {repeat} x {CALLS} calls (ms a call)")
    print(f"| {'adapters in the batch':>21} | {'tokens a row':>12} | {'loop (ms)':>9} | "
          f"{'gathered (ms)':>13} | {'loop / gathered':>15} |")
    print(f"|{'-' * 23}|{'-' * 14}|{'-' * 11}|{'-' * 15}|{'-' * 17}|")
    for tokens in (1, prompt):
        x = torch.randn(32, tokens, hidden)
        for count in (1, 4, 16, 32):
            names = [f"a{i % count}" for i in range(32)]

            best = {False: float("inf"), True: float("inf")}
            for round_ in range(repeat + 1):  # round 0 warms up
                for gather in (False, True):
                    seconds = time_routed(layer, names, x, gather)
                    if round_:
                        best[gather] = min(best[gather], seconds)
            loop, gathered = best[False] / CALLS * 1000, best[True] / CALLS * 1000
            print(f"| {count:>21} | {tokens:>12} | {loop:>9.3f} | {gathered:>13.3f} | "
                  f"{loop / gathered:>15.2f} |")
    layer.gather_mixed = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--layer-only", action="store_true",
                        help="only the second table (one routed LoRA layer, loop vs gathered)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layer_only:
        routed_layer_table(args.hidden, args.rank, args.prompt, args.repeat)
        return

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
    print()
    routed_layer_table(args.hidden, args.rank, args.prompt, args.repeat)


if __name__ == "__main__":
    main()
