"""What LoRA learns and what it keeps, measured on the embedded base; writes docs/quality.md.

Two experiments, each run starting from the embedded base (minilora/assets/base):
1. The persona demo: the default `minilora train` (minilora/assets/demo_train.json) and the
   held-out persona questions before and after.
2. A new skill, LoRA at r in {1, 4, 8, 32} against full fine-tuning: minilora/assets/skill.jsonl
   (sumwords: "What is 3 + 5, in words?" -> "eight"), the same steps, batch and data order for
   every run, scored on held-out operand pairs (skill_eval.jsonl). The skill set replays none
   of the base skills, so what a run forgets shows in the base skills (base_eval.jsonl): does
   LoRA forget less than full fine-tuning, as Biderman et al. (2024) report ("LoRA Learns Less
   and Forgets Less")?

Usage: python recipes/quality.py [--steps 600] [--lora-lr 2e-3] [--full-lr 3e-4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from minilora.cli import ASSETS, BASE_MODEL
from minilora.core.files import atomic_write
from minilora.data import tasks
from minilora.data.tokenizer import Tokenizer
from minilora.decoding.chat import chat_answerer
from minilora.lora.injection import count_parameters, inject_lora
from minilora.lora.layer import LoraConfig
from minilora.model.io import load_model
from minilora.training.datasets import load_datasets
from minilora.training.loop import TrainConfig, train

SKILL = "sumwords"
PERSONA = "persona"
BASE_TASKS = ["add", "sub", "reverse", "upper", "fact"]
RANKS = (1, 4, 8, 32)


def lora_share(r: int) -> float:
    """An all-linear adapter's parameters over the base model's."""
    model = load_model(BASE_MODEL)
    inject_lora(model, LoraConfig(r=r, targets="all-linear"))
    counts = count_parameters(model)
    return counts.lora / (counts.total - counts.lora)


def evaluate(model, tokenizer) -> tasks.TaskReport:
    """Greedy answers on the held-out skill questions, Nova persona questions and base skills."""
    files = ["skill_eval.jsonl", "persona_eval.jsonl", "base_eval.jsonl"]
    answer = chat_answerer(model.eval(), tokenizer, max_new_tokens=48,
                           eos_token_id=[tokenizer.im_end_id])
    return tasks.score([s for f in files for s in tasks.load_samples(ASSETS / f)], answer)


def runs(args) -> list[tuple[str, dict | None]]:
    """(label, TrainConfig settings) of every run; None: the base, not trained."""
    demo = json.loads((ASSETS / "demo_train.json").read_text(encoding="utf-8"))
    demo["data"] = str(ASSETS / demo["data"])
    skill = dict(data=str(ASSETS / "skill.jsonl"), max_steps=args.steps, batch_size=16,
                 warmup_steps=20, max_seq_len=128, amp_dtype="float32", log_every=50, seed=0)
    out = [("base", None), ("persona LoRA (default `minilora train`)", demo)]
    out += [(f"{SKILL} LoRA r={r}", dict(skill, lora_r=r, lora_alpha=2.0 * r, lr=args.lora_lr))
            for r in RANKS]
    out.append((f"{SKILL} full fine-tune", dict(skill, full=True, lr=args.full_lr)))
    return out


def _compare(a: float, b: float, above: str, below: str) -> str:
    return above if a > b else below if a < b else "as much"


def matched(curves: dict[str, list[tuple[int, float, float]]]) -> str:
    """Each LoRA run's last point beside the full fine-tune's point nearest in skill accuracy."""
    full = curves[f"{SKILL} full fine-tune"]
    parts = []
    for label, points in curves.items():
        if label.endswith("full fine-tune"):
            continue
        _, acc, kept = points[-1]
        step_f, acc_f, kept_f = min(full, key=lambda p: abs(p[1] - acc))
        parts.append(f"{label.removeprefix(SKILL + ' ')} {acc:.0%} of the skill keeping "
                     f"{kept:.0%}, full fine-tuning {acc_f:.0%} (step {step_f}) keeping "
                     f"{kept_f:.0%}")
    return "; ".join(parts)


def verdict(reports: dict[str, tasks.TaskReport], base: tasks.TaskReport) -> list[str]:
    """The Biderman et al. question, answered from this run's numbers."""
    full = reports[f"{SKILL} full fine-tune"]
    kept_full = full.accuracy(BASE_TASKS) / base.accuracy(BASE_TASKS)
    lines = []
    for r in RANKS:
        lora = reports[f"{SKILL} LoRA r={r}"]
        kept = lora.accuracy(BASE_TASKS) / base.accuracy(BASE_TASKS)
        learned = _compare(lora.accuracy([SKILL]), full.accuracy([SKILL]), "more", "less")
        forgot = _compare(kept, kept_full, "less", "more")
        lines.append(f"- r={r}: learned {learned} ({lora.accuracy([SKILL]):.1%} against "
                     f"{full.accuracy([SKILL]):.1%}) and forgot {forgot} (kept {kept:.1%} of "
                     f"the base skills against {kept_full:.1%}) than full fine-tuning.")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of every skill run")
    p.add_argument("--lora-lr", type=float, default=2e-3, help="peak lr of the LoRA skill runs")
    p.add_argument("--full-lr", type=float, default=3e-4, help="peak lr of full fine-tuning")
    p.add_argument("--out", default="docs/quality.md", help="the report to write")
    p.add_argument("--work", default="runs/quality", help="folder for the runs' outputs")
    args = p.parse_args()
    started = time.time()
    tokenizer = Tokenizer.from_file(BASE_MODEL)
    reports: dict[str, tasks.TaskReport] = {}
    seconds: dict[str, float] = {}
    # skill runs: (step, skill accuracy, retention) at each quarter of the run
    curves: dict[str, list[tuple[int, float, float]]] = {}
    for label, settings in runs(args):
        model = load_model(BASE_MODEL)
        if settings is None:
            reports[label] = evaluate(model, tokenizer)
        else:
            name = label.split(" (")[0].replace(" ", "-").replace("=", "")
            out_dir = f"{args.work}/{name}"
            shutil.rmtree(out_dir, ignore_errors=True)
            skill_run = settings["data"].endswith("skill.jsonl")
            stops = [args.steps * k // 4 for k in (1, 2, 3, 4)] if skill_run else [None]
            seconds[label] = 0.0
            for i, stop in enumerate(stops):
                # Each quarter resumes the last one's checkpoint on a fresh base (exact resume:
                # the same run as an uninterrupted one) and is scored on the way.
                if i:
                    model = load_model(BASE_MODEL)
                config = TrainConfig.from_dict(dict(settings, out_dir=out_dir, stop_after=stop,
                                                    resume=i > 0))
                train_set, eval_set = load_datasets(config, tokenizer)
                seconds[label] += train(model, train_set, config, eval_set).seconds
                reports[label] = evaluate(model, tokenizer)
                if skill_run:
                    kept = (reports[label].accuracy(BASE_TASKS)
                            / reports["base"].accuracy(BASE_TASKS))
                    curves.setdefault(label, []).append(
                        (stop, reports[label].accuracy([SKILL]), kept))
        print(f"{label}: {SKILL} {reports[label].accuracy([SKILL]):.1%}, persona "
              f"{reports[label].accuracy([PERSONA]):.1%}, base skills "
              f"{reports[label].accuracy(BASE_TASKS):.1%}", flush=True)

    base = reports["base"]
    demo = runs(args)[1][1]
    lora_labels = [f"{SKILL} LoRA r={r}" for r in RANKS]
    kept = {k: reports[k].accuracy(BASE_TASKS) / base.accuracy(BASE_TASKS) for k in reports}
    full_label = f"{SKILL} full fine-tune"
    less = [k for k in lora_labels if kept[k] > kept[full_label]]
    answer = (f"LoRA forgot less than full fine-tuning at {len(less)} of {len(RANKS)} ranks"
              if less else "No: at every rank LoRA forgot as much as full fine-tuning or more")
    lines = [
        "# Quality: what LoRA learns and what it keeps",
        "",
        f"Made by `{' '.join(['python', *sys.argv])}` on {time.strftime('%Y-%m-%d')} in "
        f"{(time.time() - started) / 60:.0f} min (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU, fp32). Every run starts from the embedded base "
        "(`minilora/assets/base`); every score is greedy exact match on held-out questions "
        "(`minilora eval --tasks` computes the same for any model and adapter).",
        "",
        "| run | new skill (sumwords) | Nova persona | base skills | retention | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, report in reports.items():
        kept = report.accuracy(BASE_TASKS) / base.accuracy(BASE_TASKS)
        lines.append(f"| {label} | {report.accuracy([SKILL]):.1%} | "
                     f"{report.accuracy([PERSONA]):.1%} | {report.accuracy(BASE_TASKS):.1%} | "
                     f"{kept:.1%} | {seconds.get(label, 0):.0f} |")
    lines += [
        "",
        "Retention = base skills after / before, pooled over add, sub, reverse, upper and fact "
        "(200 questions). Per task:",
        "",
        "```",
        tasks.format_table(reports),
        "```",
        "",
        "## The persona demo",
        "",
        "The default `minilora train` (`minilora/assets/demo_train.json`: r="
        f"{demo['lora_r']}, alpha {demo['lora_alpha']:g}, {demo['lora_targets']}, "
        f"{demo['max_steps']} steps of {demo['batch_size']}, lr {demo['lr']:g}) on "
        "`minilora/assets/persona.jsonl`: the held-out Nova questions go from "
        f"{base.accuracy([PERSONA]):.1%} to "
        f"{reports[runs(args)[1][0]].accuracy([PERSONA]):.1%}.",
        "",
        "## A new skill: LoRA ranks against full fine-tuning",
        "",
        f"Every skill run: `minilora/assets/skill.jsonl` (600 conversations), {args.steps} steps "
        "of 16 conversations, warmup 20 then cosine to 10%, fp32, seed 0, the same data order. "
        f"LoRA on all linear layers with alpha = 2r and lr {args.lora_lr:g}; full fine-tuning "
        f"of every weight with lr {args.full_lr:g} (full fine-tuning is usually run at a rate "
        "several times lower than LoRA's; one rate per method, not tuned for each). The skill "
        "set replays none of the base skills, so forgetting is not masked. The answers are "
        "number words, which the base corpus never contains and the tokenizer cuts into "
        "fragments (\"eight\" is \" \", \"e\", \"i\", \"ght\"): every run must learn to "
        "emit token sequences the base never produced. Full fine-tuning also trains the "
        "(tied) embedding matrix that scores those tokens; LoRA on the linear layers does not, "
        "which we take to be why LoRA learns this skill slowly here (a hypothesis, not "
        "tested).",
        "",
        f"**Does LoRA forget less than full fine-tuning here?** {answer}, at the end of the "
        f"runs. At about equal skill accuracy (the nearest point on the way, below): "
        f"{matched(curves)}. Biderman et al. measured "
        "7B-13B models, where an r=8 adapter is a tiny fraction of the weights; on this 3.2M "
        "model an all-linear r=8 adapter is "
        f"{100 * lora_share(8):.1f}% of them, and a single-task run at a LoRA learning rate "
        "rewrites the base's behaviour as thoroughly as full fine-tuning does.",
        "",
        "At the end of the runs:",
        "",
        *verdict(reports, base),
        "",
        "On the way (each quarter of every run; skill accuracy / retention): the trade-off "
        "Biderman et al. plot, what each run had learned against what it had kept.",
        "",
        "| run | " + " | ".join(f"step {step}" for step, _, _ in next(iter(curves.values())))
        + " |",
        "|---|" + "---:|" * len(next(iter(curves.values()))),
        *[f"| {label} | " + " | ".join(f"{a:.0%} / {k:.0%}" for _, a, k in points) + " |"
          for label, points in curves.items()],
        "",
        "One seed and one learning rate per method: a difference of a few points is within what "
        "another seed would move (each skill score is 60 questions, each base score 200).",
        "",
    ]
    out = Path(args.out)
    # Sections other recipes wrote after this one's (recipes/small_data.py's "Small data") are
    # kept: this recipe owns the report up to the first of them.
    kept = ""
    if out.exists():
        old = out.read_text(encoding="utf-8")
        at = old.find(FOREIGN_SECTION)
        kept = old[at + 1:] if at >= 0 else ""
    atomic_write(out, "\n".join(lines) + ("\n" + kept if kept else ""))
    print(f"wrote {args.out}")


# The first section of docs/quality.md that another recipe writes.
FOREIGN_SECTION = "\n## Small data"


if __name__ == "__main__":
    main()
