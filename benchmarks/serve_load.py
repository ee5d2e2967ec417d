"""`minilora serve` under sustained load and under slow clients, the server's memory sampled.

    python benchmarks/serve_load.py                         # 10,000 requests, 32 clients
    python benchmarks/serve_load.py --requests 2000 --slow 600

The server is the real command (`python -m minilora serve`, a child process) on the embedded
base with 4 adapters, --max-queue small enough that some requests are turned away. The clients
are the official `openai` client in threads, each request a short chat completion (seeded,
temperature 1) for the base or one of the adapters. Every answer must be whole (a finish reason
and its text) or a clean 503 with Retry-After; anything else is counted as an error. The
child's resident memory (RSS) is sampled twice a second; the table gives it after the first
10% of the requests (warm), at the end, its peak, and the slope of a least-squares line through
the warm samples (MB per 1,000 requests: flat is about 0).

With --slow N, N connections then send a header byte every second (and N/4 stop their body
after 9 of 1,000 bytes) while /health is asked every 0.5 s: the table gives how many were
answered 503 at once (past --max-connections), how many the server closed (--read-timeout),
and /health's answers and worst latency during the attack.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402

QUESTIONS = ["What is your name?", "Add 12 and 30.", "Reverse the word minilora.",
             "Tell me about yourself."]


def make_adapters(folder: Path) -> dict[str, Path]:
    """The 4 adapters of benchmarks/serve.py."""
    spec = importlib.util.spec_from_file_location("serve_bench", Path(__file__).with_name(
        "serve.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_adapters(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, adapters: dict[str, Path], args: argparse.Namespace):
    argv = [sys.executable, "-m", "minilora", "serve", "--port", str(port),
            "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue),
            "--max-connections", str(args.max_connections),
            "--read-timeout", str(args.read_timeout)]
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return child
        except httpx.HTTPError:
            time.sleep(0.2)
    child.kill()
    raise SystemExit(f"the server did not start: {child.stderr.read()}")


class Sampler:
    """The child's RSS twice a second, with the number of requests done at that moment."""

    def __init__(self, pid: int, done) -> None:
        self.process, self.done = psutil.Process(pid), done
        self.samples: list[tuple[int, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((self.done(), self.process.memory_info().rss / 2**20))
            self.stop.wait(0.5)


def load_phase(url: str, args: argparse.Namespace, models: list[str], counts: dict) -> dict:
    """The requests from --clients threads; counts (ok, busy, error) is updated as they end."""
    errors: list[str] = []
    lock = threading.Lock()
    next_job = iter(range(args.requests))

    def client_loop() -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                               timeout=120)
        while True:
            with lock:
                i = next(next_job, None)
            if i is None:
                return
            outcome = "error"
            try:
                reply = client.chat.completions.create(
                    model=models[i % len(models)], max_tokens=args.max_tokens,
                    temperature=1.0, seed=i,
                    messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
                choice = reply.choices[0]
                if choice.finish_reason in ("stop", "length") and isinstance(
                        choice.message.content, str):
                    outcome = "ok"
                else:
                    errors.append(f"incomplete: {reply}")
            except openai.APIStatusError as e:
                if e.status_code == 503 and e.response.headers.get("retry-after"):
                    outcome = "busy"
                    time.sleep(0.05)
                else:
                    errors.append(f"{e.status_code}: {e.message}")
            except openai.APIError as e:
                errors.append(f"{type(e).__name__}: {e}")
            with lock:
                counts[outcome] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        for _ in range(args.clients):
            pool.submit(client_loop)
    return {**counts, "seconds": time.perf_counter() - start, "errors": errors[:5]}


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares MB per 1,000 requests."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else 1000 * sum((x - mx) * (y - my) for x, y in zip(
        xs, ys, strict=True)) / var


def slow_phase(port: int, url: str, n: int, read_timeout: float) -> dict:
    """n slow connections (a quarter of them stall their body); /health asked meanwhile."""
    socks, refused = [], 0
    for i in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            refused += 1
            continue
        s.setblocking(False)
        if i % 4 == 0:
            s.send(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":")
        else:
            s.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    answered_503, closed, health = 0, 0, []
    start = time.monotonic()
    open_socks = list(socks)
    while open_socks and time.monotonic() - start < read_timeout * 3 + 5:
        still = []
        for s in open_socks:
            try:
                data = s.recv(4096)
                if data.startswith(b"HTTP/1.1 503"):
                    answered_503 += 1
                elif data == b"":
                    closed += 1
                else:
                    still.append(s)
                    continue
                s.close()
                continue
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
                continue
            try:
                s.send(b"X-Slow: a\r\n"[:1])
                still.append(s)
            except OSError:
                closed += 1
        open_socks = still
        t = time.perf_counter()
        try:
            status = httpx.get(url + "/health", timeout=10).status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        health.append((status, time.perf_counter() - t))
        time.sleep(0.5)
    for s in open_socks:
        s.close()
    return {"connections": n, "refused_at_connect": refused, "answered_503": answered_503,
            "closed_by_server": closed, "still_open": len(open_socks),
            "seconds": time.monotonic() - start,
            "health_200": sum(1 for s, _ in health if s == 200), "health_asked": len(health),
            "health_other": sorted({str(s) for s, _ in health if s != 200}),
            "health_worst_s": max((d for _, d in health), default=0.0)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=10000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--max-connections", type=int, default=256)
    p.add_argument("--read-timeout", type=float, default=5.0)
    p.add_argument("--slow", type=int, default=0, help="slow connections after the load")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        child = start_server(port, adapters, args)
        try:
            counts = {"ok": 0, "busy": 0, "error": 0}
            sampler = Sampler(child.pid, lambda: sum(counts.values()))
            sampler.thread.start()
            load = load_phase(url, args, ["base", *adapters], counts)
            sampler.stop.set()
            sampler.thread.join()
            warm = [(n, rss) for n, rss in sampler.samples if n >= args.requests // 10]
            rss_warm = warm[0][1] if warm else float("nan")
            rss_end = sampler.samples[-1][1]
            slow = slow_phase(port, url, args.slow, args.read_timeout) if args.slow else None
        finally:
            child.terminate()
            child.wait(timeout=30)

    print(f"# serve_load: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads default, python {platform.python_version()}")
    print(f"# command: python benchmarks/serve_load.py --requests {args.requests} --clients "
          f"{args.clients} --max-tokens {args.max_tokens} --max-batch {args.max_batch} "
          f"--max-queue {args.max_queue}" + (f" --slow {args.slow}" if args.slow else ""))
    print("| requests | ok (whole) | 503 + Retry-After | errors | seconds | req/s | RSS warm MB "
          "| RSS end MB | RSS peak MB | MB per 1000 req (warm) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    total = load["ok"] + load["busy"] + load["error"]
    print(f"| {total} | {load['ok']} | {load['busy']} | {load['error']} | "
          f"{load['seconds']:.1f} | {total / load['seconds']:.1f} | {rss_warm:.1f} | "
          f"{rss_end:.1f} | {max(r for _, r in sampler.samples):.1f} | {slope(warm):+.2f} |")
    for line in load["errors"]:
        print("error:", line[:200])
    if slow:
        print()
        print("| slow connections | refused at connect | 503 at once | closed by the server | "
              "still open | seconds | /health 200 / asked | /health other | worst /health s |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {slow['connections']} | {slow['refused_at_connect']} | {slow['answered_503']} "
              f"| {slow['closed_by_server']} | {slow['still_open']} | {slow['seconds']:.1f} | "
              f"{slow['health_200']} / {slow['health_asked']} | "
              f"{', '.join(slow['health_other']) or '-'} | {slow['health_worst_s']:.2f} |")
    return 1 if load["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
