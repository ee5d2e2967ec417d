"""The rank-r products of a LoRA layer next to the base product, alone, per shape and dtype.

What the LoRA-vs-floor and unmerged-forward rows of docs/benchmarks.md rest on: how long one
[N, in] @ [in, r] and one in-place [N, r] @ [r, out] take next to the base's [N, in] @ [in, out]
on this CPU. Prints a markdown table; nothing is written.

Usage: python benchmarks/skinny.py [--threads 2] [--rank 8] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

# MiniMind small's projections: q/o, k/v, gate/up, down
SHAPES = [(512, 512), (512, 128), (512, 1408), (1408, 512)]


def median_ms(fn, steps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--tokens", type=int, default=2048, help="N, rows of x (batch x sequence)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n, r = args.tokens, args.rank
    print(f"torch {torch.__version__}, {args.threads} threads, N={n}, r={r}; median ms\n")
    print("| in -> out | dtype | base x W^T | x A^T | y.addmm_(h, B^T) | both / base |")
    print("|---|---|---:|---:|---:|---:|")
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for fan_in, fan_out in SHAPES:
                x = torch.randn(n, fan_in, dtype=dtype)
                w = torch.randn(fan_out, fan_in, dtype=dtype)
                a = torch.randn(r, fan_in, dtype=dtype)
                b = torch.randn(fan_out, r, dtype=dtype)
                y, h = F.linear(x, w), F.linear(x, a)
                base = median_ms(lambda: F.linear(x, w))  # noqa: B023
                down = median_ms(lambda: F.linear(x, a))  # noqa: B023
                up = median_ms(lambda: y.addmm_(h, b.t()))  # noqa: B023
                name = str(dtype).removeprefix("torch.")
                print(f"| {fan_in} -> {fan_out} | {name} | {base:.3f} | {down:.3f} | {up:.3f} "
                      f"| {(down + up) / base:.1%} |")


if __name__ == "__main__":
    main()
