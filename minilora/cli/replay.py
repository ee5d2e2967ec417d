"""`minilora replay`: the base's own answers to a set of questions, as training conversations.

What `train --replay FILE` mixes in so that an adapter keeps what the base already does: the
questions come from a questions file (one a line), task files or training data, and the answers
from the base model itself, greedy (its most likely reply).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from minilora.cli.common import CliError, add_model_args, inputs, load_base
from minilora.core.outputs import check_not_an_input


def add_replay_parser(sub: Any) -> None:
    """Adds `minilora replay`."""
    p = sub.add_parser("replay", help="the base's own answers to questions -> a --replay file",
                       description="Asks the base model each question and writes its own "
                                   "answers as chat conversations, the file train --replay "
                                   "mixes in so an adapter keeps what the base does.")
    add_model_args(p, adapters=False)
    p.add_argument("questions", nargs="+", metavar="FILE",
                   help=".txt (one question a line), or .jsonl of questions ({\"prompt\": ...}), "
                        "task files (their expected answers are not used) or training data "
                        "(each conversation asked up to its first user turn)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .jsonl to write")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="most tokens per answer (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="questions answered together (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(run=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    """`minilora replay`: questions in, the base's answers out as chat jsonl."""
    from minilora.core.files import atomic_write
    from minilora.data.questions import load_questions

    for flag, value in (("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise CliError(f"{flag}: expected an integer >= 1, got {value}")
    out = Path(args.out)
    check_not_an_input(out, {**inputs(args), "FILE": args.questions}, "--out")
    if out.exists() and not args.overwrite:
        raise CliError(f"{out} exists; nothing is overwritten without --overwrite")
    questions = [q for f in args.questions for q in load_questions(f)]  # before the model loads
    model, tokenizer = load_base(args)
    model.eval()
    answers = _answers(model, tokenizer, questions, args)
    rows = [{"conversations": [*q, {"role": "assistant", "content": a}]}
            for q, a in zip(questions, answers, strict=True) if a]
    if not rows:
        raise CliError("the base answered none of the questions (every answer was empty); "
                       "nothing written")
    atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    empty = len(questions) - len(rows)
    left_out = f"; {empty} empty answers left out" if empty else ""
    print(f"wrote {len(rows)} conversations to {out} (the base's own answers to "
          f"{len(questions)} questions{left_out}); train with --replay {out}")
    return 0


def _answers(model: Any, tokenizer: Any, questions: list[list[dict[str, Any]]],
             args: argparse.Namespace) -> list[str]:
    """The base's greedy answer to each question, in batches, with a progress bar."""
    from tqdm import tqdm

    from minilora.decoding.generation import generate_batch

    answers: list[str] = []
    with tqdm(total=len(questions), unit="question", desc="replay", file=sys.stderr) as bar:
        for start in range(0, len(questions), args.batch_size):
            batch = questions[start:start + args.batch_size]
            prompts = [tokenizer.encode_chat(q, add_generation_prompt=True)[0] for q in batch]
            replies = generate_batch(model, prompts, max_new_tokens=args.max_new_tokens,
                                     eos_token_id=tokenizer.stop_token_ids)
            answers += [tokenizer.decode(r).strip() for r in replies]
            bar.update(len(batch))
    return answers
