"""Memory of a LoRA training step: activation checkpointing, the chunked head + loss, QLoRA.

    python benchmarks/memory.py                    # checkpointing + head rows (a few minutes)
    python benchmarks/memory.py --only head        # rows whose id contains a word
    python benchmarks/memory.py --tinyllama        # also the 1.1B rows (makes a 2.2 GB folder once)
    python benchmarks/memory.py --quick            # tiny shapes: checks that every row runs

Every row runs in its own fresh process (this file with ``--worker``), the rows alternated
``--repeat`` times. A worker builds its model, LoRA and optimizer, then resets the kernel's peak
RSS (``/proc/self/clear_refs``) and runs its steps: "step peak" is VmHWM over the steps, "step
memory" that minus the RSS before the first step (activations, gradients, optimizer state, the
logits). Big allocations are mmap'd (MALLOC_MMAP_THRESHOLD_) so a freed tensor leaves RSS at once.
Seconds per step: the median of the steps after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from run import FULL_SHAPES, QUICK_SHAPES, _llama_config  # noqa: E402  (run.py's model)

# A Qwen2.5-0.5B-like head (vocab 151,936, hidden 896) on two blocks: the head dominates.
HEAD_SHAPES = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                   num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2,
                   tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                   max_position_embeddings=32768)
TINYLLAMA_SHAPES = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                        num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                        tie_word_embeddings=False, rope_theta=1e4, rms_norm_eps=1e-5,
                        max_position_embeddings=2048)
CACHE = ROOT / "benchmarks" / ".cache"  # ignored by git: the 1.1B folder lives here
GiB = 2**30


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _minilora_model(case: dict, shapes: dict):
    import torch
    from torch import nn

    from minilora.lora.injection import inject_lora, lora_parameters, mark_trainable
    from minilora.lora.layer import LoraConfig
    from minilora.lora.qlora import quantize_model
    from minilora.model.decoder import CausalLM, ModelConfig
    from minilora.model.io import load_model
    from minilora.training.loop import set_activation_checkpointing

    if case.get("folder"):
        model = load_model(case["folder"], dtype=torch.bfloat16)
    else:
        torch.manual_seed(0)
        model = CausalLM(ModelConfig(model_type="llama", **shapes))
    if case.get("whole_logits"):
        class WholeHead(nn.Linear):  # not exactly nn.Linear: CausalLM takes the unchunked path
            pass

        head = WholeHead(model.lm_head.in_features, model.lm_head.out_features, bias=False)
        head.weight = model.lm_head.weight
        model.lm_head = head
    inject_lora(model, LoraConfig(r=case["rank"], alpha=2.0 * case["rank"]))
    mark_trainable(model)
    set_activation_checkpointing(model, case.get("checkpointing", False))
    if case.get("quantize"):
        quantize_model(model, case["quantize"])
    model.train()
    return model, lora_parameters(model)


def _peft_model(case: dict, shapes: dict):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    if case.get("folder"):
        quant = None
        if case.get("quantize") == "nf4":
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(case["folder"], dtype=torch.bfloat16,
                                                     quantization_config=quant)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(_llama_config(shapes))
    if case.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=case["rank"], lora_alpha=2 * case["rank"],
                                             target_modules="all-linear"))
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def worker(case: dict) -> dict:
    import torch

    torch.manual_seed(0)
    shapes = case["shapes"]
    rss_start = _vm("VmRSS")
    build = _peft_model if case["impl"] == "peft" else _minilora_model
    model, params = build(case, shapes)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    B, T = case["batch"]
    ids = torch.randint(0, shapes["vocab_size"], (B, T))
    rss_model = _vm("VmRSS")
    estimate = None
    if case["impl"] == "minilora":
        from minilora.training.memory import estimate_memory

        e = estimate_memory(model, B, T, amp_dtype=torch.bfloat16, device=torch.device("cpu"))
        estimate = e.trainable + e.activations  # what the step adds to the built model
    _reset_peak()
    times = []
    for _ in range(case["steps"]):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    peak = _vm("VmHWM")
    return {"rss_start": rss_start, "rss_model": rss_model, "peak": peak,
            "step_memory": peak - rss_model, "estimated_step_memory": estimate,
            "seconds": statistics.median(times[1:]) if len(times) > 1 else times[0],
            "loss": float(out.loss)}


def time_checkpointing(shapes: dict, batch: tuple[int, int], rounds: int) -> str:
    """Step time with and without activation checkpointing in ONE process, alternated."""
    import torch

    case = dict(shapes=shapes, rank=8)
    model, params = _minilora_model(case, shapes)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, shapes["vocab_size"], batch)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(rounds + 1):  # the first round warms up, unmeasured
        for checkpointing in (False, True):
            model.activation_checkpointing = checkpointing
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(ids, labels=ids)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i:
                times[checkpointing].append(time.perf_counter() - started)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return (f"step time, one process, alternated, median of {rounds}: checkpointing off "
            f"{off:.2f} s, on {on:.2f} s, ratio {on / off:.2f}x (batch {batch[0]} x {batch[1]})")


def make_tinyllama_folder(quick: bool) -> Path:
    """The random 1.1B bf16 folder, sharded by transformers, made once under benchmarks/.cache."""
    folder = CACHE / ("tinyllama-quick" if quick else "tinyllama-1.1b")
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import LlamaForCausalLM

    shapes = dict(TINYLLAMA_SHAPES, **({} if not quick else dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512)))
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(_llama_config(shapes)).to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="500MB")
    tmp.rename(folder)
    return folder


def cases(args) -> list[dict]:
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    head = dict(HEAD_SHAPES, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                vocab_size=32000) if args.quick else HEAD_SHAPES
    steps = 2 if args.quick else args.steps
    ckpt_batch = (2, 64) if args.quick else (8, 1024)
    head_batch = (1, 128) if args.quick else (1, 2048)
    rows = [
        dict(id="ckpt-off", impl="minilora", shapes=shapes, batch=ckpt_batch, rank=8),
        dict(id="ckpt-on", impl="minilora", shapes=shapes, batch=ckpt_batch, rank=8,
             checkpointing=True),
        dict(id="head-chunked", impl="minilora", shapes=head, batch=head_batch, rank=16),
        dict(id="head-whole", impl="minilora", shapes=head, batch=head_batch, rank=16,
             whole_logits=True),
        dict(id="head-peft", impl="peft", shapes=head, batch=head_batch, rank=16),
    ]
    if args.tinyllama:
        folder = str(make_tinyllama_folder(args.quick))
        tl_shapes = dict(TINYLLAMA_SHAPES, vocab_size=512) if args.quick else TINYLLAMA_SHAPES
        tl = dict(shapes=tl_shapes, batch=(1, 64) if args.quick else (1, 1024), rank=16,
                  folder=folder, quantize="nf4", checkpointing=True)
        rows += [dict(id="tinyllama-minilora-nf4", impl="minilora", **tl),
                 dict(id="tinyllama-peft-nf4", impl="peft", **tl)]
    for r in rows:
        r.setdefault("steps", steps)
    return [r for r in rows if not args.only or any(w in r["id"] for w in args.only)]


def run_case(case: dict, timeout: float) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps")
    parser.add_argument("--tinyllama", action="store_true", help="add the 1.1B NF4 rows")
    parser.add_argument("--only", nargs="*", default=None, help="rows whose id has a word")
    parser.add_argument("--steps", type=int, default=3, help="steps per row (first one unmeasured)")
    parser.add_argument("--repeat", type=int, default=1, help="passes over the rows, alternated")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    parser.add_argument("--time-checkpointing", type=int, default=0, metavar="ROUNDS",
                        help="instead: time checkpointing on/off alternated in one process")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.time_checkpointing:
        shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
        print(time_checkpointing(shapes, (2, 64) if args.quick else (8, 1024),
                                 args.time_checkpointing))
        return
    rows = cases(args)
    results: dict[str, list[dict]] = {r["id"]: [] for r in rows}
    for _ in range(args.repeat):
        for case in rows:
            res = run_case(case, args.timeout)
            results[case["id"]].append(res)
            print(f"{case['id']}: {res}", file=sys.stderr, flush=True)
    print(table(rows, results))


def _best(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return min(values) if values else None


def table(rows: list[dict], results: dict[str, list[dict]]) -> str:
    out = ["| row | batch | model RSS | step peak RSS | step memory | estimated | s/step |",
           "|---|---|---|---|---|---|---|"]
    for case in rows:
        runs = results[case["id"]]
        if not any("peak" in r for r in runs):
            out.append(f"| {case['id']} | error: {runs[-1].get('error')} | | | | | |")
            continue
        b = case["batch"]
        est = runs[-1].get("estimated_step_memory")
        est = f"{est / GiB:.2f} GiB" if est else "-"
        out.append(f"| {case['id']} | {b[0]} x {b[1]} | {_best(runs, 'rss_model') / GiB:.2f} GiB"
                   f" | {_best(runs, 'peak') / GiB:.2f} GiB"
                   f" | {_best(runs, 'step_memory') / GiB:.2f} GiB | {est}"
                   f" | {_best(runs, 'seconds'):.2f} |")
    ratios = [("ckpt-on", "ckpt-off", "step_memory", "activation checkpointing, step memory"),
              ("ckpt-on", "ckpt-off", "seconds", "activation checkpointing, step time"),
              ("head-chunked", "head-whole", "step_memory", "chunked head, step memory"),
              ("head-chunked", "head-peft", "peak", "chunked head vs PEFT, peak RSS"),
              ("tinyllama-minilora-nf4", "tinyllama-peft-nf4", "peak", "1.1B NF4, peak RSS"),
              ("tinyllama-minilora-nf4", "tinyllama-peft-nf4", "seconds", "1.1B NF4, step time")]
    out.append("")
    for a, b, key, label in ratios:
        if a in results and b in results:
            x, y = _best(results[a], key), _best(results[b], key)
            if x is not None and y:
                out.append(f"- {label}: {x / y:.2f}x ({a} / {b})")
    return "\n".join(out)


if __name__ == "__main__":
    main()
