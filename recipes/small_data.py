"""A newcomer's own small data set on the embedded model: which settings teach it.

Sixty one-turn conversations teach one fact (the assistant is Nova, made by Aurora Labs), taken
from the demo's persona set without its replayed base-skill turns. Each run trains through the
command line and is scored on the 60 held-out persona paraphrases and the 200 base-skill
questions (the embedded model's own skills, what an adapter should leave alone):

- README's former recipe: --r 16 --alpha 32 --lr 2e-4 --epochs 3
- --preset small-data
- --preset small-data --replay FILE --replay-ratio 1 (the base's own answers to skill questions)

    python recipes/small_data.py --out runs/small-data

prints the table that docs/quality.md ("Small data") shows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minilora.cli import ASSETS, BASE_MODEL, main
from minilora.data import tasks
from minilora.data.tokenizer import Tokenizer
from minilora.decoding.chat import chat_answerer
from minilora.lora.named import set_active
from minilora.model.io import load_model
from minilora.training.run_layout import RunLayout

RUNS = {
    "README's former recipe (lr 2e-4, 3 epochs)": ["--r", "16", "--alpha", "32", "--lr", "2e-4",
                                                  "--epochs", "3"],
    "--preset small-data": ["--preset", "small-data"],
    "--preset small-data --replay (ratio 1)": ["--preset", "small-data", "--replay", "{replay}",
                                               "--replay-ratio", "1"],
}


def write_sets(folder: Path) -> tuple[Path, Path]:
    """60 persona conversations (one turn each) and the replay file (the base's own answers to
    the skill questions the demo's persona set carries)."""
    persona, replay = [], []
    for line in (ASSETS / "persona.jsonl").read_text(encoding="utf-8").splitlines():
        turns = json.loads(line)["conversations"]
        for user, reply in zip(turns[::2], turns[1::2], strict=True):
            pair = {"conversations": [user, reply]}
            if "Nova" in reply["content"] or "Aurora" in reply["content"]:
                persona.append(pair)
            elif any(c.isdigit() for c in user["content"]) or "-" in user["content"]:
                replay.append(pair)
    folder.mkdir(parents=True, exist_ok=True)
    data, replay_file = folder / "persona60.jsonl", folder / "replay.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in persona[:60]), encoding="utf-8")
    replay_file.write_text("".join(json.dumps(p) + "\n" for p in replay), encoding="utf-8")
    return data, replay_file


def score(adapter: Path | None, samples: list) -> dict[str, float]:
    model = load_model(BASE_MODEL)
    tokenizer = Tokenizer.from_file(BASE_MODEL)
    if adapter is not None:
        from minilora.adapters.folder import load_adapter

        load_adapter(model, adapter)
        set_active(model, ["default"])
    model.eval()
    answer = chat_answerer(model, tokenizer, max_new_tokens=48,
                           eos_token_id=tokenizer.stop_token_ids)
    report = tasks.score(samples, answer)
    skills = [t for t in report.tasks if t != "persona"]
    return {"persona": report.accuracy("persona"), "base skills": report.accuracy(skills)}


def main_recipe() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/small-data", help="folder for data and runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    data, replay = write_sets(out)
    samples = [s for f in ("persona_eval.jsonl", "base_eval.jsonl")
               for s in tasks.load_samples(ASSETS / f)]
    rows = [("base model", score(None, samples), 0.0)]
    for i, (name, flags) in enumerate(RUNS.items()):
        run = out / f"run{i}"
        started = time.perf_counter()
        argv = ["train", "--model", str(BASE_MODEL), "--data", str(data), "--out", str(run),
                "--seed", "0", *[f.format(replay=replay) for f in flags]]
        assert main(argv) == 0
        rows.append((name, score(RunLayout(run).adapter, samples), time.perf_counter() - started))
    print(f"data: {data} (60 conversations); held out: persona_eval.jsonl (60), "
          "base_eval.jsonl (200)")
    print(f"| {'run':<44} | persona (held out) | base skills | train time |")
    print(f"|{'-' * 46}|-------------------:|------------:|-----------:|")
    for name, result, seconds in rows:
        print(f"| {name:<44} | {100 * result['persona']:17.1f}% | "
              f"{100 * result['base skills']:10.1f}% | {seconds:8.0f} s |")


if __name__ == "__main__":
    main_recipe()
