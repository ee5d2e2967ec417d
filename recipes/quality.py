"""LoRA at several ranks against full fine-tuning on the new skill; writes docs/quality.md.

Each run starts from the embedded base, trains on minilora/assets/skill.jsonl (shift each letter
by one: a task the base cannot do) with the same steps, batch and data order, and is scored on
held-out words (skill_eval.jsonl) and on the base's own skills and persona (retention).

Usage: python recipes/quality.py [--steps 300] [--out docs/quality.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from minilora import tasks
from minilora.cli import ASSETS, BASE_MODEL, chat_answerer
from minilora.tokenizer import Tokenizer
from minilora.train import TrainConfig, train
from minilora.weights import load_model

ROOT = Path(__file__).resolve().parent.parent
SKILL = ["shift"]
BASE_TASKS = ["add", "sub", "reverse", "upper", "fact", "persona"]


def evaluate(model, tokenizer) -> tasks.TaskReport:
    files = [ASSETS / "skill_eval.jsonl", ASSETS / "base_eval.jsonl",
             ROOT / "recipes" / "data" / "base_persona_eval.jsonl"]
    answer = chat_answerer(model.eval(), tokenizer, max_new_tokens=32,
                           eos_token_id=[tokenizer.im_end_id])
    return tasks.score([s for f in files for s in tasks.load_samples(f)], answer)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    p.add_argument("--out", default="docs/quality.md", help="the report to write")
    p.add_argument("--work", default="runs/quality", help="folder for the runs' outputs")
    args = p.parse_args()
    tokenizer = Tokenizer.from_file(BASE_MODEL)
    runs = [("base", None)] + [(f"LoRA r={r}", {"lora_r": r, "lora_alpha": 2.0 * r, "lr": 2e-3})
                               for r in (1, 4, 8, 32)]
    runs.append(("full fine-tune", {"full": True, "lr": 3e-4}))
    reports: dict[str, tasks.TaskReport] = {}
    seconds: dict[str, float] = {}
    for label, settings in runs:
        model = load_model(BASE_MODEL)
        if settings is not None:
            name = label.replace(" ", "").replace("=", "")
            config = TrainConfig(
                data=str(ASSETS / "skill.jsonl"), out_dir=f"{args.work}/{name}",
                max_steps=args.steps, batch_size=16, warmup_steps=20, max_seq_len=128,
                dtype="float32", log_every=50, seed=0, **settings)
            seconds[label] = train(model, tokenizer, config).seconds
        reports[label] = evaluate(model, tokenizer)
        print(f"{label}: shift {reports[label].accuracy(SKILL):.1%}, "
              f"base skills {reports[label].accuracy(BASE_TASKS):.1%}", flush=True)

    base = reports["base"]
    lines = [
        "# Quality: what LoRA learns and what it keeps",
        "",
        f"Made by `{' '.join(['python', *sys.argv])}` on {time.strftime('%Y-%m-%d')} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32).",
        "",
        "## New skill: LoRA ranks against full fine-tuning",
        "",
        f"Every run: the embedded base, `minilora/assets/skill.jsonl` (shift each letter by one), "
        f"{args.steps} steps of 16 conversations, warmup 20 then cosine; LoRA on all linear "
        "layers with alpha = 2r and lr 2e-3; full fine-tuning with lr 3e-4. Held-out words for "
        "the skill; retention = after / before on the base's own held-out questions "
        "(add, sub, reverse, upper, fact, and the base persona Pico).",
        "",
        "| run | shift (held out) | base skills | retention | train s |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, report in reports.items():
        kept = report.accuracy(BASE_TASKS) / base.accuracy(BASE_TASKS)
        lines.append(f"| {label} | {report.accuracy(SKILL):.1%} | "
                     f"{report.accuracy(BASE_TASKS):.1%} | {kept:.1%} | "
                     f"{seconds.get(label, 0):.0f} |")
    lines += ["", "Per task:", "", "```", tasks.format_table(reports), "```", "",
              "## Persona (the default `minilora train`)", "",
              "`minilora train` with no arguments: held-out persona accuracy 0.0% before, "
              "100.0% after; base skills 67.5% before, 64.0% after (94.8% retained); "
              "see the README for the table.", ""]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
