"""The CUDA paths no CPU run reaches, run once on a GPU: a pass/fail table in a minute or two.

Checks, each against a reference computed here (float64 or the CPU), never timed:
  train-fp16-gradscaler   train() with dtype float16: autocast + GradScaler steps, loss falls
  train-bf16              train() with dtype bfloat16 on CUDA
  lora-node-autocast-*    the one-node LoRA forward/backward under CUDA autocast (bf16, fp16)
                          against the composed formula in float64: output and every gradient
  model-autocast-*        a whole CausalLM loss and LoRA gradients under autocast vs float32
  nccl-one-process        torch.distributed with nccl on localhost, one process: DDP over a
                          LoRA model, and train()'s own broadcast / gradient all-reduce helpers
  generate-kv-cache       greedy generate on CUDA (KV cache) = the CPU's tokens; cached logits
                          = full-sequence logits; generate_batch rows = generate alone; bf16 runs

Usage: python benchmarks/gpu_check.py      (no CUDA: says so in one line and exits 0)
       python benchmarks/gpu_check.py --cpu-dry-run   (the script's own logic on the CPU: gloo
       for nccl, bf16 for fp16 training; says nothing about CUDA)
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minilora.decoding.generation import generate, generate_batch
from minilora.lora.injection import inject_lora, lora_parameters, mark_trainable
from minilora.lora.layer import LoraConfig, lora_modules
from minilora.model.decoder import CausalLM, ModelConfig

ASSETS = Path(__file__).resolve().parent.parent / "minilora" / "assets"
DEV = "cuda"  # "cpu" with --cpu-dry-run
CHECKS: list[tuple[str, Callable[[], str]]] = []


def check(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        CHECKS.append((name, fn))
        return fn
    return register


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def tiny(seed: int = 0, vocab: int = 128) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=64,
                                intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=512))


# ------------------------------------------------------------------------------------------------
# train() in low precision
# ------------------------------------------------------------------------------------------------


def _train(dtype: str) -> str:
    if DEV == "cpu" and dtype == "float16":
        dtype = "bfloat16"  # train() refuses float16 off CUDA (GradScaler)
    from minilora.data.tokenizer import Tokenizer
    from minilora.model.io import load_model
    from minilora.training.datasets import load_datasets
    from minilora.training.loop import TrainConfig, train

    model = load_model(ASSETS / "base")
    tokenizer = Tokenizer.from_file(ASSETS / "base")
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(data=str(ASSETS / "persona.jsonl"), out_dir=out, max_steps=30,
                             batch_size=16, lr=2e-3, max_seq_len=128, amp_dtype=dtype, log_every=5,
                             device="cuda:0" if DEV == "cuda" else "cpu", seed=0)
        train_set, eval_set = load_datasets(config, tokenizer)
        result = train(model, train_set, config, eval_set)
    losses = [loss for _, loss in result.losses]
    if result.steps != 30 or not losses or not all(map(math.isfinite, losses)):
        raise AssertionError(f"steps {result.steps}, losses {losses}")
    if result.skipped_steps > 3:
        raise AssertionError(f"{result.skipped_steps} of 30 steps skipped (GradScaler overflow)")
    if not losses[-1] < 0.8 * losses[0]:
        raise AssertionError(f"loss did not fall: {losses}")
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {result.skipped_steps} skipped"


@check("train-fp16-gradscaler")
def train_fp16() -> str:
    return _train("float16")


@check("train-bf16")
def train_bf16() -> str:
    if DEV == "cuda" and torch.cuda.get_device_capability() < (8, 0):
        return "skipped: bf16 needs sm80+"
    return _train("bfloat16")


# ------------------------------------------------------------------------------------------------
# The LoRA node and the model under autocast
# ------------------------------------------------------------------------------------------------


def _lora_node(dtype: torch.dtype, tol: float) -> str:
    torch.manual_seed(0)
    layer = nn.Sequential()
    layer.proj = nn.Linear(256, 192).to(DEV)
    inject_lora(layer, LoraConfig(r=8, alpha=16, targets=["proj"]))
    (name, lora), = lora_modules(layer)
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(0, 0.05)
    mark_trainable(layer)
    x = torch.randn(4, 33, 256, device=DEV, requires_grad=True)
    g = torch.randn(4, 33, 192, device=DEV)
    with torch.autocast(DEV, dtype=dtype):
        y = layer.proj(x)
    y.backward(g)
    got = [y, x.grad, lora.lora_A["default"].weight.grad, lora.lora_B["default"].weight.grad]
    # the composed formula in float64: y = W x + b + s B (A x)
    W, b = lora.weight.double(), lora.bias.double()
    A = lora.lora_A["default"].weight.detach().double().requires_grad_()
    B = lora.lora_B["default"].weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y64 = F.linear(x64, W, b) + lora.scaling * F.linear(F.linear(x64, A), B)
    y64.backward(g.double())
    want = [y64, x64.grad, A.grad, B.grad]
    errors = {n: rel(a, w) for n, a, w in zip(("y", "dx", "dA", "dB"), got, want, strict=True)}
    if y.dtype != dtype:
        raise AssertionError(f"output dtype {y.dtype}, expected {dtype}")
    if max(errors.values()) > tol:
        raise AssertionError(f"relative errors {errors} > {tol}")
    return " ".join(f"{k} {v:.1e}" for k, v in errors.items())


@check("lora-node-autocast-bf16")
def lora_bf16() -> str:
    return _lora_node(torch.bfloat16, 2e-2)


@check("lora-node-autocast-fp16")
def lora_fp16() -> str:
    return _lora_node(torch.float16, 3e-3)


def _model_autocast(dtype: torch.dtype, tol: float) -> str:
    model = tiny().to(DEV)
    inject_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B["default"].weight.normal_(0, 0.05)
    mark_trainable(model)
    ids = torch.randint(0, 128, (4, 48), device=DEV, generator=torch.Generator(DEV)
                        .manual_seed(1))
    model(ids, labels=ids).loss.backward()
    ref_loss = model(ids, labels=ids).loss.item()
    ref = [p.grad.clone() for p in lora_parameters(model)]
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEV, dtype=dtype):
        loss = model(ids, labels=ids).loss
    loss.backward()
    grad_err = max(rel(p.grad, r) for p, r in zip(lora_parameters(model), ref, strict=True))
    loss_err = abs(loss.item() - ref_loss) / ref_loss
    # a wrong cast or scale is an O(1) error; low-precision rounding of small LoRA gradients
    # through two layers is about 1e-2 (measured on the CPU's autocast)
    if loss_err > tol or grad_err > 5e-2:
        raise AssertionError(f"loss rel err {loss_err:.1e}, worst LoRA grad rel err "
                             f"{grad_err:.1e} (tol {tol}, 5e-2)")
    return f"loss {loss_err:.1e}, grads {grad_err:.1e}"


@check("model-autocast-bf16")
def model_bf16() -> str:
    return _model_autocast(torch.bfloat16, 1e-2)


@check("model-autocast-fp16")
def model_fp16() -> str:
    return _model_autocast(torch.float16, 2e-3)


# ------------------------------------------------------------------------------------------------
# nccl with one process
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@check("nccl-one-process")
def nccl_one_process() -> str:
    import torch.distributed as dist

    from minilora.training.distributed import broadcast, sync_gradients

    dist.init_process_group("nccl" if DEV == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        t = torch.arange(4.0, device=DEV)
        dist.all_reduce(t)
        if t.tolist() != [0.0, 1.0, 2.0, 3.0]:
            raise AssertionError(f"all_reduce over one rank changed {t.tolist()}")
        ids = torch.randint(0, 128, (2, 32), device=DEV)
        plain, wrapped = tiny().to(DEV), tiny().to(DEV)
        for m in (plain, wrapped):
            torch.manual_seed(3)  # the same A and B in both
            inject_lora(m, LoraConfig(r=4, targets=["q_proj", "v_proj", "down_proj"]))
            with torch.no_grad():
                for _, layer in lora_modules(m):
                    layer.lora_B["default"].weight.normal_(0, 0.05)
            mark_trainable(m)
        ddp = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[0] if DEV == "cuda" else None)
        plain(ids, labels=ids).loss.backward()
        ddp(ids, labels=ids).loss.backward()
        err = max(rel(a.grad, b.grad) for a, b in zip(lora_parameters(wrapped),
                                                       lora_parameters(plain), strict=True))
        if err > 1e-6:
            raise AssertionError(f"DDP gradients differ from the plain model's by {err:.1e}")
        # train()'s own collectives skip themselves at world 1: called as for two ranks, they
        # run over this one-rank nccl group, where a sum over ranks is the identity
        params = lora_parameters(plain)
        before = [p.grad.clone() for p in params]
        broadcast(params, world=2)
        loss = sync_gradients(params, torch.tensor(1.5, device=DEV), world=2)
        same = all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
        if not same or loss.item() != 1.5:
            raise AssertionError("train()'s gradient all-reduce changed one rank's gradients")
    finally:
        dist.destroy_process_group()
    return f"DDP grads = plain (rel {err:.1e}); broadcast + flat all-reduce exact"


# ------------------------------------------------------------------------------------------------
# Generation with a KV cache
# ------------------------------------------------------------------------------------------------


@check("generate-kv-cache")
def generate_kv_cache() -> str:
    from minilora.data.tokenizer import Tokenizer
    from minilora.model.io import load_model

    # the embedded base (a trained model: greedy choices are not near-ties between devices)
    torch.backends.cuda.matmul.allow_tf32 = False  # the CPU comparison needs true fp32 products
    tok = Tokenizer.from_file(ASSETS / "base")
    questions = ["What is your name?", "add 12 and 30", "reverse: minilora", "upper: gpu"]
    prompts = [tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
               for q in questions]
    cpu = load_model(ASSETS / "base").eval()
    gpu = load_model(ASSETS / "base", device=DEV).eval()
    want = generate(cpu, prompts[0], max_new_tokens=40)
    got = generate(gpu, prompts[0], max_new_tokens=40)
    if got != want:
        raise AssertionError(f"{DEV} tokens {got} != CPU tokens {want}")
    n = len(prompts[0])
    ids = torch.tensor([prompts[0] + got], device=DEV)
    with torch.no_grad():
        full = gpu(ids).logits
        out = gpu(ids[:, :n], use_cache=True)
        steps = [out.logits] + [gpu(ids[:, t:t + 1], past_key_values=out.past_key_values).logits
                                for t in range(n, ids.shape[1])]
    cache_err = (torch.cat(steps, dim=1) - full).abs().max().item()
    if cache_err > 1e-3:
        raise AssertionError(f"cached logits differ from full-sequence logits by {cache_err}")
    rows = generate_batch(gpu, prompts, max_new_tokens=16)
    alone = [generate(gpu, p, max_new_tokens=16) for p in prompts]
    if rows != alone:
        raise AssertionError(f"generate_batch {rows} != generate one by one {alone}")
    bf16 = load_model(ASSETS / "base", device=DEV, dtype=torch.bfloat16).eval()
    low = generate(bf16, prompts[0], max_new_tokens=40)
    same = [a == b for a, b in zip(low, want, strict=False)]  # eos may end either earlier
    agree = same.index(False) if False in same else len(same)
    return (f"{len(got)} tokens = CPU; cache err {cache_err:.1e}; batch of 4 = alone; bf16 "
            f"agrees on {agree}/{len(want)}")


# ------------------------------------------------------------------------------------------------


def main() -> int:
    global DEV
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the checks on the CPU (gloo, bf16) to test this script itself")
    if parser.parse_args().cpu_dry_run:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing run")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    name = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (dry run)"
    print(f"gpu_check on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    rows = []
    for check_name, fn in CHECKS:
        started = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as e:  # a failed check is a row of the table, not the end of the run
            detail, ok = f"{type(e).__name__}: {e}", False
            traceback.print_exc(file=sys.stderr)
        if DEV == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
        rows.append((check_name, "pass" if ok else "FAIL", time.perf_counter() - started,
                     detail.replace("\n", " ")[:160]))
        print(f"  {check_name}: {rows[-1][1]}", file=sys.stderr, flush=True)
    print("| check | result | s | detail |\n|---|---|---|---|")
    for check_name, result, seconds, detail in rows:
        print(f"| {check_name} | {result} | {seconds:.1f} | {detail} |")
    failed = [r[0] for r in rows if r[1] == "FAIL"]
    print(json.dumps({"device": name, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
