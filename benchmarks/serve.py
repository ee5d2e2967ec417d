"""`minilora serve` under concurrent clients: tokens/s, time to first token, time per token.

    python benchmarks/serve.py                  # the embedded base, 4 hand-made adapters
    python benchmarks/serve.py --repeat 3 --max-tokens 48
    python benchmarks/serve.py --many           # 32 clients: the base, 1, 4, 16, 32 adapters

One process: the server (uvicorn and the engine, each in its thread) and the clients (one
asyncio loop of httpx streams), so every row runs on the same machine state. Each row sends the
same 64 requests (4 questions, each request with its own seed, temperature 1, --max-tokens)
from 1, 8 or 32 concurrent clients, to one adapter or spread over 4. The 1-client rows are
"one at a time": the same requests served in turn. The rows take turns, --repeat rounds; each
row reports its round with the highest throughput (the least disturbed on a shared CPU) and its
latencies over all rounds. Every request decodes exactly --max-tokens tokens (`ignore_eos`, as
vLLM's serving benchmark does), so every row does the same number of decode steps whatever its
adapters answer; each request's answer is seeded per request and independent of the batch.

With --many the rows are 32 clients each: the base alone, then the requests spread over 1, 4,
16 and 32 distinct adapters (all resident), and 32 adapters with --max-loras 8 (a second server
whose adapters are read from their folders on demand, least recently used evicted); the table
adds inter-token latency (the gaps between streamed chunks) percentiles, and beside each row's
best round against the base's best, the median over rounds of its ratio to the base's row of
the same round.

Where the time goes: the engine's own timers (prefill, decode forward, the rest of its step)
against the row's wall time; what is left is the HTTP side (uvicorn, JSON, SSE, the clients),
which shares the same cores and the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from minilora.adapters.folder import load_adapter, save_adapter  # noqa: E402
from minilora.cli import BASE_MODEL  # noqa: E402
from minilora.data.tokenizer import Tokenizer  # noqa: E402
from minilora.lora.injection import inject_lora  # noqa: E402
from minilora.lora.layer import LoraConfig, lora_modules  # noqa: E402
from minilora.lora.named import delete_adapter  # noqa: E402
from minilora.model.io import load_model  # noqa: E402
from minilora.serve.app import ServeState, create_app  # noqa: E402
from minilora.serve.engine import Engine  # noqa: E402

ADAPTERS = ["a0", "a1", "a2", "a3"]
QUESTIONS = ["What is your name?", "Add 12 and 30.", "Reverse the word minilora.",
             "Tell me about yourself."]
REQUESTS = 64


def make_adapters(folder: Path, count: int = 4) -> dict[str, Path]:
    """`count` all-linear r=8 adapters with non-zero B, written as PEFT folders."""
    maker = load_model(BASE_MODEL)
    paths = {}
    for i, name in enumerate(f"a{i}" for i in range(count)):
        torch.manual_seed(100 + i)  # inject_lora draws A from the global generator
        inject_lora(maker, LoraConfig(r=8, alpha=16), name=name)
        g = torch.Generator().manual_seed(i)
        for _, m in lora_modules(maker):
            b = m.lora_B[name].weight
            b.data.copy_(torch.randn(b.shape, generator=g) * 0.5)
        paths[name] = save_adapter(maker, folder / name, name=name)
        delete_adapter(maker, name)
    return paths


class Timed:
    """Wraps the engine's prefill and decode to add up their seconds."""

    def __init__(self, engine: Engine) -> None:
        self.seconds = {"prefill": 0.0, "decode": 0.0, "step": 0.0}
        # with chunked prefill the mixed step (prompts folded into decode) counts as decode
        for part, attr in (("prefill", "_admit"), ("decode", "_decode"), ("decode", "_mixed_step"),
                           ("step", "step")):
            setattr(engine, attr, self._wrap(part, getattr(engine, attr)))

    def _wrap(self, part: str, fn):
        def timed(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[part] += time.perf_counter() - start
        return timed

    def reset(self) -> dict[str, float]:
        out, self.seconds = self.seconds, dict.fromkeys(self.seconds, 0.0)
        return out


async def one_request(client: httpx.AsyncClient, url: str, i: int, model: str,
                      max_tokens: int) -> dict:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 1.0,
            "seed": i, "stream_options": {"include_usage": True}, "ignore_eos": True,
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
    start = time.perf_counter()
    first = None
    tokens = 0
    stamps = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{model}: {chunk['error']['message']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
                first = first or stamps[-1]
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - start, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens,
            "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)]}


async def run_row(url: str, clients: int, adapters: int, max_tokens: int,
                  names: list[str] | None = None) -> tuple[float, list]:
    """The 64 requests from `clients` concurrent clients; returns (seconds, per request)."""
    jobs = asyncio.Queue()
    for i in range(REQUESTS):
        jobs.put_nowait(i)
    results = []
    limits = httpx.Limits(max_connections=clients + 1)

    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker() -> None:
            while not jobs.empty():
                i = jobs.get_nowait()
                model = "base" if adapters == 0 else (names or ADAPTERS)[i % adapters]
                results.append(await one_request(client, url, i, model, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - start, results


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def start_server(state: ServeState) -> tuple[str, uvicorn.Server, Timed]:
    timed = Timed(state.engine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port,
                                           log_level="error"))
    state.engine.start()
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, timed


def many(args: argparse.Namespace) -> None:
    """32 clients: the base, 1/4/16/32 resident adapters, 32 adapters with --max-loras 8."""
    folder = Path(tempfile.mkdtemp(prefix="minilora-serve-many-"))
    paths = make_adapters(folder, 32)
    names = list(paths)
    tokenizer = Tokenizer.from_file(BASE_MODEL)
    model = load_model(BASE_MODEL)
    for name, path in paths.items():
        load_adapter(model, path, name=name)
    chunk = args.prefill_chunk or None
    resident = ServeState(Engine(model, tokenizer, max_batch=32, prefill_chunk=chunk),
                          tokenizer, "base",
                          adapters={n: str(p) for n, p in paths.items()})
    evicting = ServeState(Engine(load_model(BASE_MODEL), tokenizer, max_batch=32,
                                 max_loras=8, prefill_chunk=chunk), tokenizer, "base",
                          adapters={n: str(p) for n, p in paths.items()}, pinned=set(),
                          adapter_dir=folder)
    servers = {"resident": start_server(resident), "max-loras 8": start_server(evicting)}
    rows = [("resident", 0), ("resident", 1), ("resident", 4), ("resident", 16),
            ("resident", 32), ("max-loras 8", 32)]
    for url, _, _ in servers.values():
        asyncio.run(run_row(url, 8, 4, 4, names))  # warm-up
    runs: dict[tuple[str, int], list] = {row: [] for row in rows}
    for _ in range(args.repeat):
        for where, adapters in rows:
            url, _, timed = servers[where]
            timed.reset()
            seconds, results = asyncio.run(run_row(url, 32, adapters, args.max_tokens, names))
            runs[where, adapters].append((seconds, results, timed.reset()))
    for _, server, _ in servers.values():
        server.should_exit = True
    resident.engine.stop()
    evicting.engine.stop()
    print(f"model: the embedded base (hidden 256, 4 layers) + 32 all-linear r=8 adapters; "
          f"{REQUESTS} streamed requests of up to {args.max_tokens} tokens from 32 clients "
          f"(temperature 1, seeded); prefill chunk {args.prefill_chunk or 'off'}; "
          f"torch {torch.__version__}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}; best of {args.repeat} rounds")
    print()
    print("| adapters | tokens/s | vs the base | vs the base, median of rounds "
          "| TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) "
          "| prefill / decode / other engine / outside engine |")
    print("|---|---:|---:|---:|---:|---:|---|")
    best = {}

    def rate(r: tuple) -> float:
        return sum(x["tokens"] for x in r[1]) / r[0]

    for (where, adapters), rounds in runs.items():
        # each round against the base's row of the same round (run minutes apart at most):
        # less moved by a shared machine's slow spells than the best rounds' ratio
        paired = statistics.median(rate(r) / rate(b) for r, b in zip(
            rounds, runs["resident", 0], strict=True))
        seconds, results, parts = max(rounds, key=rate)
        best[where, adapters] = sum(x["tokens"] for x in results) / seconds
        every = [x for r in rounds for x in r[1]]
        ttft = [x["ttft"] * 1000 for x in every]
        itl = [gap * 1000 for x in every for gap in x["itl"]]
        other = parts["step"] - parts["prefill"] - parts["decode"]
        shares = " / ".join(f"{100 * v / seconds:.0f}%" for v in (
            parts["prefill"], parts["decode"], other, seconds - parts["step"]))
        label = "base alone" if adapters == 0 else f"{adapters}" + (
            " (--max-loras 8)" if where != "resident" else "")
        print(f"| {label} | {best[where, adapters]:.0f} | "
              f"{best[where, adapters] / best['resident', 0]:.2f}x | {paired:.2f}x | "
              + " / ".join(f"{percentile(ttft, q):.0f}" for q in (0.5, 0.9, 0.99)) + " | "
              + " / ".join(f"{percentile(itl, q):.1f}" for q in (0.5, 0.9, 0.99))
              + f" | {shares} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--repeat", type=int, default=2, help="rounds (the rows take turns)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads")
    parser.add_argument("--prefill-chunk", type=int, default=0,
                        help="with --many: chunked prefill, N prompt tokens a step (0: off)")
    parser.add_argument("--many", action="store_true",
                        help="32 clients over the base and 1 to 32 adapters (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.many:
        many(args)
        return

    folder = Path(tempfile.mkdtemp(prefix="minilora-serve-bench-"))
    paths = make_adapters(folder)
    tokenizer = Tokenizer.from_file(BASE_MODEL)
    model = load_model(BASE_MODEL)
    for name, path in paths.items():
        load_adapter(model, path, name=name)
    engine = Engine(model, tokenizer, max_batch=32)
    timed = Timed(engine)
    state = ServeState(engine, tokenizer, "base", adapters={n: str(p) for n, p in paths.items()})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port,
                                           log_level="error"))
    engine.start()
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"

    rows = [(c, a) for a in (1, 4) for c in (1, 8, 32)]
    asyncio.run(run_row(url, 8, 4, 4))  # warm-up
    runs: dict[tuple[int, int], list] = {row: [] for row in rows}
    for _ in range(args.repeat):
        for clients, adapters in rows:
            timed.reset()
            seconds, results = asyncio.run(run_row(url, clients, adapters, args.max_tokens))
            runs[clients, adapters].append((seconds, results, timed.reset()))
    server.should_exit = True
    engine.stop()
    print_table(runs, args)


def print_table(runs: dict, args: argparse.Namespace) -> None:
    print(f"model: the embedded base (hidden 256, 4 layers) + 4 all-linear r=8 adapters; "
          f"{REQUESTS} streamed requests of up to {args.max_tokens} tokens (temperature 1, "
          f"seeded); torch {torch.__version__}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}; best of {args.repeat} rounds")
    print()
    print("| clients | adapters | tokens/s | vs one at a time | TTFT p50 / p99 (ms) "
          "| per token p50 / p99 (ms) | prefill / decode / other engine / outside engine |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    best = {}
    for (clients, adapters), rounds in runs.items():
        seconds, results, parts = max(rounds, key=lambda r: sum(x["tokens"] for x in r[1]) / r[0])
        best[clients, adapters] = sum(x["tokens"] for x in results) / seconds
        every = [x for r in rounds for x in r[1]]
        ttft = [x["ttft"] * 1000 for x in every]
        tpot = [x["tpot"] * 1000 for x in every]
        other = parts["step"] - parts["prefill"] - parts["decode"]
        shares = " / ".join(f"{100 * v / seconds:.0f}%" for v in (
            parts["prefill"], parts["decode"], other, seconds - parts["step"]))
        print(f"| {clients} | {adapters} | {best[clients, adapters]:.0f} | "
              f"{best[clients, adapters] / best[1, adapters]:.1f}x | "
              f"{statistics.median(ttft):.0f} / {percentile(ttft, 0.99):.0f} | "
              f"{statistics.median(tpot):.1f} / {percentile(tpot, 0.99):.1f} | {shares} |")
    print()
    print(f"targets at 32 clients x 4 adapters: {best[32, 4] / best[1, 4]:.1f}x one at a time "
          f"(aim >= 4x); {best[32, 4] / best[32, 1]:.2f}x of 32 clients on one adapter "
          f"(aim >= 0.8x)")


if __name__ == "__main__":
    main()
