"""A preference (DPO) step: minilora against TRL's DPOTrainer + PEFT, and against minilora's own
SFT step on the same tokens; memory and time side by side in one process.

    python benchmarks/preference.py                  # MiniMind-shaped and big-vocabulary rows
    python benchmarks/preference.py --quick          # tiny shapes: checks that every row runs

Each shape builds one random Llama, saved once so minilora loads the same weights; LoRA r 8 on
every Linear of the blocks (the same A and B on both sides: TRL's adapter is copied into
minilora's). The batch is random tokens: P pairs, a prompt and two answers of different lengths,
right-padded, the chosen rows then the rejected rows, the answer tokens counted (TRL's
completion_mask, minilora's labels). Rows, each one optimizer step (forward, backward, AdamW over
the LoRA parameters), under the same autocast:

- ``sft``: minilora's SFT step on the same 2P rows and counted tokens (cross-entropy);
- ``dpo``: minilora's DPO step (the reference: the adapter disabled, no_grad);
- ``simpo``: minilora's SimPO step (no reference pass);
- ``trl-dpo``: TRL's ``DPOTrainer.compute_loss`` on the same batch (its reference: the PEFT
  adapter disabled), then backward and the same AdamW.

Rows are alternated ``--repeat`` times in one process; step time is the median over the
repeats (the first round warms up, unmeasured), in CPU seconds of the process (all its threads,
``time.process_time``): the machine is shared, and wall-clock medians move with other people's
jobs (the wall-clock medians are shown beside). Step memory: the kernel's RSS high-water mark
during the step minus RSS before it (``/proc/self/clear_refs`` resets the mark), with big
allocations mmap'd (the script re-executes itself with MALLOC_MMAP_THRESHOLD_) so a freed
tensor leaves RSS at once; the median over the repeats. The loss of each row is printed: DPO's
must equal TRL's (same weights, batch and reference).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = {
    # MiniMind2-small-like: what the embedded model's family trains at
    "minimind": dict(vocab_size=6400, hidden_size=512, intermediate_size=1408,
                     num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                     tie_word_embeddings=True),
    # a Qwen2.5-0.5B-sized head (vocab 151,936, hidden 896) on two blocks: the head dominates
    "qwen-head": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                      num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2,
                      tie_word_embeddings=True),
}
QUICK = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
ROWS = ("sft", "dpo", "simpo", "trl-dpo")
MiB = 2**20


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _batch(vocab: int, pairs: int, prompt: int, answer: int, seed: int = 0):
    """TRL's collated form: input_ids, attention_mask, completion_mask; chosen rows first."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for side in range(2):
        for i in range(pairs):
            n = answer - (i * 7 + side * 13) % (answer // 2)  # answers of different lengths
            rows.append(torch.randint(3, vocab, (prompt + n,), generator=g))
            masks.append(torch.cat([torch.zeros(prompt, dtype=torch.long),
                                    torch.ones(n, dtype=torch.long)]))
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, :len(r)], attention[i, :len(r)], completion[i, :len(r)] = r, 1, m
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def _trl_trainer(folder: Path, out: Path, rank: int):
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(ROOT / "minilora" / "assets" / "base" / "tokenizer.json"),
        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    args = DPOConfig(output_dir=str(out), beta=0.1, loss_type=["sigmoid"], report_to=[],
                     per_device_train_batch_size=1, use_cpu=True, bf16=False,
                     save_strategy="no")
    rows = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                         peft_config=lora)
    trainer.model.train()
    return trainer


def _minilora_model(folder: Path, adapter: Path):
    from minilora.adapters.folder import load_adapter
    from minilora.lora.injection import lora_parameters, mark_trainable
    from minilora.model.io import load_model

    model = load_model(folder)
    load_adapter(model, adapter)
    mark_trainable(model)
    model.train()
    return model, lora_parameters(model)


def run_shape(name: str, shapes: dict, args) -> list[str]:
    import torch
    import transformers

    from minilora.data.sft import Batch
    from minilora.training.config import TrainConfig
    from minilora.training.preference import PreferenceLoss

    tmp = Path(tempfile.mkdtemp(prefix="minilora-pref-"))
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **shapes, max_position_embeddings=4096, rope_theta=1e6))
    hf.save_pretrained(tmp / "base")
    del hf
    trainer = _trl_trainer(tmp / "base", tmp / "trl", args.rank)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: B not zero, so policy != reference
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    trainer.model.save_pretrained(tmp / "adapter")
    ours, ours_params = _minilora_model(tmp / "base", tmp / "adapter")
    trl_params = [p for p in trainer.model.parameters() if p.requires_grad]
    optimizers = {"ours": torch.optim.AdamW(ours_params, lr=1e-5),
                  "trl": torch.optim.AdamW(trl_params, lr=1e-5)}
    batch = _batch(shapes["vocab_size"], args.pairs, args.prompt, args.answer)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    ours_batch = Batch(batch["input_ids"], labels, int(batch["attention_mask"].sum()),
                       int((labels != -100).sum()))
    P = args.pairs
    losses = {m: PreferenceLoss(TrainConfig(method=m)) for m in ("dpo", "simpo")}
    amp = torch.bfloat16 if args.dtype == "bfloat16" else None

    def step(row: str) -> float:
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            if row == "sft":
                loss = ours(ours_batch.input_ids, labels=ours_batch.labels).loss
            elif row in losses:
                summed, _, _ = losses[row](ours, ours_batch)
                loss = summed / P
            else:
                loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        optimizer = optimizers["trl" if row == "trl-dpo" else "ours"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # The first losses, before any step changed either adapter: DPO's must equal TRL's.
    first = {}
    for row in ("dpo", "trl-dpo"):
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None), torch.no_grad():
            first[row] = float(losses["dpo"](ours, ours_batch)[0] / P if row == "dpo"
                               else trainer.compute_loss(trainer.model, batch))
    seconds: dict[str, list[float]] = {r: [] for r in ROWS}
    walls: dict[str, list[float]] = {r: [] for r in ROWS}
    memory: dict[str, list[int]] = {r: [] for r in ROWS}
    for i in range(args.repeat + 1):
        for row in ROWS:
            before = _vm("VmRSS")
            _reset_peak()
            started, cpu = time.perf_counter(), time.process_time()
            step(row)
            took, wall = time.process_time() - cpu, time.perf_counter() - started
            if i:  # round 0 warms up
                seconds[row].append(took)
                walls[row].append(wall)
                memory[row].append(_vm("VmHWM") - before)
    T = batch["input_ids"].shape[1]
    counted = int(batch["completion_mask"].sum())
    lines = [f"### `{name}`: {shapes['num_hidden_layers']} blocks, hidden "
             f"{shapes['hidden_size']}, vocab {shapes['vocab_size']:,}; {P} pairs = {2 * P} "
             f"rows x {T} tokens ({counted} answer tokens counted), LoRA r {args.rank} "
             f"all-linear, {args.dtype}", "",
             f"First DPO loss, same weights and batch: minilora {first['dpo']:.6f}, TRL "
             f"{first['trl-dpo']:.6f}.", "",
             "| row | step memory (MiB) | step CPU time (s) | (wall, s) | vs trl-dpo memory "
             "| vs trl-dpo time | vs minilora sft memory |", "|---|---|---|---|---|---|---|"]
    med_m = {r: statistics.median(memory[r]) for r in ROWS}
    med_s = {r: statistics.median(seconds[r]) for r in ROWS}
    for row in ROWS:
        lines.append(f"| {row} | {med_m[row] / MiB:.0f} | {med_s[row]:.3f} | "
                     f"{statistics.median(walls[row]):.3f} | "
                     f"{med_m[row] / med_m['trl-dpo']:.2f}x | {med_s[row] / med_s['trl-dpo']:.2f}x "
                     f"| {med_m[row] / max(med_m['sft'], 1):.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat")
    parser.add_argument("--only", default=None, help="run only this shape (minimind, qwen-head)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step (default 4)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--answer", type=int, default=64, help="longest answer (default 64)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="measured rounds (default 3)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="autocast dtype of every row (default bfloat16)")
    args = parser.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # before any allocation: re-run with it
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
        raise SystemExit(subprocess.call([sys.executable, *sys.argv], env=env))
    import torch

    shapes = {"quick": QUICK} if args.quick else {
        k: v for k, v in SHAPES.items() if args.only in (None, k)}
    if args.quick:
        args.repeat, args.pairs, args.prompt, args.answer = 1, 2, 16, 16
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import trl

    print(f"{cpu}; {torch.get_num_threads()} threads; torch {torch.__version__}, trl "
          f"{trl.__version__}; load average {os.getloadavg()[0]:.1f}; command: python "
          f"benchmarks/preference.py {' '.join(sys.argv[1:])}\n")
    for name, shape in shapes.items():
        started = time.perf_counter()
        print("\n".join(run_shape(name, shape, args)), flush=True)
        print(f"\n({time.perf_counter() - started:.0f} s; load average after "
              f"{os.getloadavg()[0]:.1f})\n", flush=True)


if __name__ == "__main__":
    main()
