"""Make the embedded base model (minilora/assets/base) from nothing, on a CPU.

Steps, all with minilora's own code:
1. ``recipes/make_data.py`` writes the base corpus (recipes/data/base_sft.jsonl) and the demo sets.
2. A byte-level BPE tokenizer (``train_tokenizer``) is trained on the corpus in ChatML form.
3. A small Llama-style decoder is trained from scratch with ``minilora.train(full=True)``
   on the corpus, assistant tokens only, rows packed.
4. The model and tokenizer are written to the output folder (safetensors + tokenizer.json), and
   the base skills and persona are scored on held-out questions (report.json beside them).

Usage (about 70 minutes on one CPU thread, as the shipped model was made; report.json beside
the model records the command and the time; ``--threads`` sets torch's threads):
    python recipes/make_data.py
    python recipes/make_base.py --out minilora/assets/base --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from minilora.data import tasks
from minilora.data.tokenizer import train_tokenizer
from minilora.decoding.generation import generate
from minilora.decoding.sampling import GENERATION_CONFIG, SamplingParams, generation_config_text
from minilora.model.decoder import CausalLM, ModelConfig
from minilora.model.io import save_model
from minilora.training.datasets import load_datasets
from minilora.training.loop import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "recipes" / "data" / "base_sft.jsonl"
EVALS = [ROOT / "minilora" / "assets" / "base_eval.jsonl",
         ROOT / "recipes" / "data" / "base_persona_eval.jsonl"]


def chatml_texts(path: Path) -> list[str]:
    """The corpus as the text the model will read, for training the tokenizer."""
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        turns = json.loads(line)["conversations"]
        texts.append("".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n"
                             for t in turns))
    return texts


def score(model: CausalLM, tokenizer, files: list[Path]) -> tasks.TaskReport:
    """Greedy answers to the held-out questions, judged by exact match / contains."""
    model.eval()

    def answer(messages: list[dict]) -> str:
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        return tokenizer.decode(generate(model, ids, max_new_tokens=32,
                                         eos_token_id=[tokenizer.im_end_id])).strip()

    return tasks.score([s for f in files for s in tasks.load_samples(f)], answer)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="minilora/assets/base", help="folder to write the model to")
    p.add_argument("--work", default="runs/make-base", help="training outputs and checkpoints")
    p.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary size")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--steps", type=int, default=4200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="packed rows per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed row")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --work")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and data order")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not CORPUS.exists():
        sys.exit(f"{CORPUS} is missing: run `python recipes/make_data.py` first")
    started = time.time()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(chatml_texts(CORPUS), args.vocab_size)
    tokenizer.save(work / "tokenizer")
    torch.manual_seed(args.seed)
    config = ModelConfig(
        model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=1024,
        rope_theta=10000.0, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.im_end_id, pad_token_id=tokenizer.pad_token_id)
    model = CausalLM(config)
    run_config = TrainConfig(
        data=str(CORPUS), out_dir=str(work), full=True, max_steps=args.steps,
        batch_size=args.batch_size, max_seq_len=args.seq_len, pack=True, lr=args.lr,
        warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0, amp_dtype="float32",
        save_every=100, log_every=50, seed=args.seed, resume=args.resume)
    result = train(model, load_datasets(run_config, tokenizer)[0], run_config)
    trained_s = time.time() - started

    report = score(model, tokenizer, EVALS)
    print(tasks.format_table({"base": report}))
    if out.exists():
        shutil.rmtree(out)
    save_model(model, out)
    tokenizer.save(out)
    # The sampling that keeps taught answers (docs/quality.md, "Sampled answers"): with no
    # filter, temperature 1 gives the demo adapter's name in 47% of its answers; min_p 0.2 at
    # temperature 0.7 in 99%.
    (out / GENERATION_CONFIG).write_text(generation_config_text(
        SamplingParams(temperature=0.7, min_p=0.2)), encoding="utf-8")
    corpus_sha = hashlib.sha256(CORPUS.read_bytes()).hexdigest()
    (out / "report.json").write_text(json.dumps({
        "steps": result.steps, "train_seconds": round(trained_s),
        "threads": torch.get_num_threads(), "corpus_sha256": corpus_sha,
        "parameters": sum(p.numel() for p in model.parameters()),
        "accuracy": {t: round(report.accuracy(t), 4) for t in report.tasks},
        "command": " ".join(sys.argv),
    }, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
