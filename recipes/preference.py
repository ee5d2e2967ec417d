"""Preference tuning on the embedded model: pairs from its own world, before and after.

The embedded model answers "what is your name?" as its pretraining taught it. The pairs prefer
the demo persona's answer (it is Nova, made by Aurora Labs, from persona.jsonl) over the base
model's own greedy answer to the same question (generated here, no download), which is what a
DPO set made from a model's samples looks like. Held out: the first 20 questions of
persona_eval.jsonl, paired the same way. Runs, each through the command line:

- ``dpo``: --method dpo from the base (the reference: the adapter switched off);
- ``simpo``: --method simpo (no reference);
- ``sft, then dpo --from-adapter``: SFT on the chosen conversations, then DPO from that adapter
  (frozen as the reference, a copy trained), the usual pipeline.

The table: held-out preference accuracy (the share of held-out pairs whose DPO implicit reward,
log pi - log base, ranks the chosen answer above the rejected one; the base itself scores 0, its
rewards are all 0), how often generation shows the preferred behaviour (persona_eval.jsonl: the
reply names Nova), and the base skills kept (base_eval.jsonl, the demo's task file, 200
questions; every 5th, 40, to keep the recipe short).

    python recipes/preference.py --out runs/preference

prints the table that docs/quality.md ("Preference tuning") shows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minilora.cli.main import ASSETS, BASE_MODEL, main
from minilora.data import tasks
from minilora.data.preference import load_pairs
from minilora.data.tokenizer import Tokenizer
from minilora.decoding.chat import chat_answerer
from minilora.lora.named import set_active
from minilora.model.io import load_model
from minilora.training.config import TrainConfig
from minilora.training.preference import PreferenceLoss, evaluate_preference

COMMON = ["--max-steps", "150", "--batch-size", "8", "--lr", "2e-3", "--warmup-steps", "10",
          "--max-seq-len", "128", "--seed", "0", "--amp-dtype", "float32", "--log-every", "25"]
# The preference runs at a tenth of the SFT learning rate, for 100 steps: at SFT's 2e-3 every
# method drove its loss to 0 within 150 steps and took the base skills with it (DPO 17.5%, SimPO
# 0%, in the first run of this recipe); DPO's usual LoRA rates are 5e-6 to 5e-4.
PREFERENCE = [*COMMON, "--lr", "2e-4", "--max-steps", "100"]
RUNS = {
    "dpo (beta 0.1)": ["--method", "dpo", *PREFERENCE],
    "simpo (beta 2, gamma 1)": ["--method", "simpo", *PREFERENCE],
    "sft, then dpo --from-adapter": ["--method", "dpo", "--from-adapter", "{sft}", *PREFERENCE],
}
NOVA = "My name is Nova. I was made by Aurora Labs."
# Sizes that keep the recipe to minutes on two shared cores: generation (a reply for every
# pair's rejected answer and every scored question) is most of its time.
TRAIN_QUESTIONS = 40  # the first this-many identity questions of persona.jsonl
HELD_OUT = 20  # the first this-many questions of persona_eval.jsonl (pairs and generation)
SKILLS_EVERY = 5  # base skills: every 5th question of base_eval.jsonl (40 of 200, every task)


def write_sets(folder: Path) -> tuple[Path, Path, Path]:
    """The training pairs, the held-out pairs and the chosen conversations (for SFT)."""
    model = load_model(BASE_MODEL).eval()
    tokenizer = Tokenizer.from_file(BASE_MODEL)
    answer = chat_answerer(model, tokenizer, max_new_tokens=48,
                           eos_token_id=tokenizer.stop_token_ids)
    questions: dict[str, str] = {}  # question -> the persona's reply
    for line in (ASSETS / "persona.jsonl").read_text(encoding="utf-8").splitlines():
        turns = json.loads(line)["conversations"]
        for user, reply in zip(turns[::2], turns[1::2], strict=True):
            if "Nova" in reply["content"]:
                questions.setdefault(user["content"], reply["content"])
    held_out = [s.chat()[-1]["content"]
                for s in tasks.load_samples(ASSETS / "persona_eval.jsonl")[:HELD_OUT]]

    def pair(question: str, chosen: str) -> dict | None:
        own = answer([{"role": "user", "content": question}]).strip()
        if not own or own == chosen or "Nova" in own:
            return None  # the base already prefers the persona here: no pair to learn from
        return {"prompt": question, "chosen": chosen, "rejected": own}

    asked = [(q, r) for q, r in questions.items() if q not in held_out][:TRAIN_QUESTIONS]
    train = [p for q, r in asked if (p := pair(q, r))]
    evals = [p for q in held_out if (p := pair(q, NOVA))]
    folder.mkdir(parents=True, exist_ok=True)
    files = folder / "pairs.jsonl", folder / "pairs_eval.jsonl", folder / "chosen.jsonl"
    for path, rows in zip(files, (train, evals, [
            {"conversations": [{"role": "user", "content": p["prompt"]},
                               {"role": "assistant", "content": p["chosen"]}]} for p in train]),
            strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"pairs: {len(train)} training, {len(evals)} held out; e.g. {train[0]}")
    return files


def score(adapter: Path | None, samples: list, eval_pairs: Path) -> dict[str, float]:
    model = load_model(BASE_MODEL)
    tokenizer = Tokenizer.from_file(BASE_MODEL)
    if adapter is not None:
        from minilora.adapters.folder import load_adapter

        load_adapter(model, adapter)
        set_active(model, ["default"])
    model.eval()
    pairs = load_pairs(eval_pairs, tokenizer, 128)
    ranked = evaluate_preference(model, pairs, PreferenceLoss(TrainConfig(method="dpo")), 16,
                                 device=torch.device("cpu"), amp_dtype=None)
    answer = chat_answerer(model, tokenizer, max_new_tokens=48,
                           eos_token_id=tokenizer.stop_token_ids)
    report = tasks.score(samples, answer)
    skills = [t for t in report.tasks if t != "persona"]
    return {"preference": ranked["eval_rewards/accuracy"],
            "persona": report.accuracy("persona"), "base skills": report.accuracy(skills)}


def main_recipe() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/preference", help="folder for data and runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    pairs, eval_pairs, chosen = write_sets(out)
    samples = (tasks.load_samples(ASSETS / "persona_eval.jsonl")[:HELD_OUT]
               + tasks.load_samples(ASSETS / "base_eval.jsonl")[::SKILLS_EVERY])
    rows = [("base model", score(None, samples, eval_pairs), 0.0)]
    base = ["train", "--model", str(BASE_MODEL), "--overwrite"]
    started = time.perf_counter()
    assert main([*base, "--data", str(chosen), "--out", str(out / "sft"),
                 *COMMON]) == 0
    sft_seconds = time.perf_counter() - started
    rows.append(("sft on the chosen answers", score(out / "sft" / "adapter", samples,
                                                    eval_pairs), sft_seconds))
    for i, (name, flags) in enumerate(RUNS.items()):
        run = out / f"run{i}"
        started = time.perf_counter()
        argv = [*base, "--data", str(pairs), "--eval-data", str(eval_pairs), "--out", str(run),
                *[f.format(sft=out / "sft" / "adapter") for f in flags]]
        assert main(argv) == 0
        seconds = time.perf_counter() - started + (sft_seconds if "{sft}" in flags else 0)
        rows.append((name, score(run / "adapter", samples, eval_pairs), seconds))
    print(f"\ndata: {pairs}; held out: {eval_pairs}, the first {HELD_OUT} questions of "
          f"persona_eval.jsonl, every {SKILLS_EVERY}th of base_eval.jsonl")
    print(f"| {'run':<30} | preference acc. (held out) | names Nova (held out) | base skills "
          "| train time |")
    print(f"|{'-' * 32}|---------------------------:|----------------------:|------------:"
          "|-----------:|")
    for name, result, seconds in rows:
        print(f"| {name:<30} | {100 * result['preference']:25.1f}% | "
              f"{100 * result['persona']:20.1f}% | {100 * result['base skills']:10.1f}% | "
              f"{seconds:8.0f} s |")


if __name__ == "__main__":
    main_recipe()
