"""`minilora eval`: loss and perplexity on a data file, accuracy on task files."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from minilora.cli.common import (
    CliError,
    add_distribution_args,
    add_model_args,
    apply_adapters,
    inputs,
    load_base,
    sampling_params,
)
from minilora.core.files import atomic_write
from minilora.core.outputs import check_not_an_input


def add_eval_parser(sub: Any) -> None:
    """Adds `minilora eval`."""
    p = sub.add_parser("eval", help="loss / perplexity and task accuracy")
    add_model_args(p)
    p.add_argument("--data", default=None, metavar="FILE",
                   help="chat or text jsonl: loss and perplexity on its trained tokens")
    p.add_argument("--tasks", nargs="+", default=None, metavar="FILE",
                   help="eval files (questions with expected answers): accuracy per task")
    p.add_argument("--max-seq-len", type=int, default=512, metavar="N",
                   help="samples of --data are cut to N tokens (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="samples per forward pass for --data (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=48, metavar="N",
                   help="most tokens per answer for --tasks (default: %(default)s)")
    p.add_argument("--samples", type=int, default=1, metavar="K",
                   help="--tasks: answer each question K times, sampled (with --temperature > 0), "
                        "and score the share of the answers that are right (default: "
                        "%(default)s)")
    add_distribution_args(p, greedy=True)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampled answers (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
    p.set_defaults(run=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """`minilora eval`: loss / perplexity on a jsonl, and task accuracy on eval files."""
    from minilora.data.sft import load_jsonl
    from minilora.training.loop import evaluate

    if not args.data and not args.tasks:
        raise CliError("give --data (loss, perplexity) and/or --tasks (accuracy)")
    # Checked before the model loads (seconds): each against what it means.
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--max-seq-len",
                             args.max_seq_len, 2), ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < low:
            raise CliError(f"{flag}: expected an integer >= {low}, got {value}")
    params = _task_sampling(args)
    if args.json:
        check_not_an_input(args.json, {**inputs(args), "--data": args.data, "--tasks": args.tasks},
                           "--json")
    model, tokenizer = load_base(args)
    apply_adapters(model, args)
    model.eval()
    report: dict[str, Any] = {}
    if args.data:
        max_seq_len = args.max_seq_len
        context = model.config.max_position_embeddings
        if max_seq_len > context:  # positions past the context mean nothing to the model
            max_seq_len = context
            print(f"minilora eval: note: --max-seq-len {args.max_seq_len} is longer than the "
                  f"model's context ({context} tokens); samples are cut at {context}",
                  file=sys.stderr)
        dataset = load_jsonl(args.data, tokenizer, max_seq_len)
        report.update(evaluate(model, dataset, args.batch_size))
        print(f"{args.data}: loss {report['eval_loss']:.4f}, perplexity {report['eval_ppl']:.2f} "
              f"({len(dataset)} samples)")
    if args.tasks:
        report["tasks"] = _score_tasks(model, tokenizer, args, params)
    if args.json:
        atomic_write(args.json, json.dumps(report, indent=2) + "\n")
    return 0


def _task_sampling(args: argparse.Namespace) -> Any:
    """How --tasks answers: greedy unless --temperature > 0 (then the settings not given come
    from the adapter's or model's generation_config.json); None for greedy."""
    if args.samples < 1:
        raise CliError(f"--samples: expected an integer >= 1, got {args.samples}")
    if not args.temperature:
        if args.samples > 1:
            raise CliError(f"--samples {args.samples} needs --temperature > 0 (greedy answers "
                           "are the same each time)")
        return None
    if not args.tasks:
        raise CliError("--temperature and --samples score --tasks answers; give --tasks")
    return sampling_params(args)


def _score_tasks(model: Any, tokenizer: Any, args: argparse.Namespace, params: Any
                 ) -> dict[str, Any]:
    """Scores the --tasks files with a progress bar, prints the table, returns the numbers."""
    from tqdm import tqdm

    from minilora.data import tasks
    from minilora.decoding.chat import chat_answerer, sampled_answerer

    samples = [s for f in args.tasks for s in tasks.load_samples(f)]
    # Every question must leave room for a reply in the model's context: checked before the
    # first is answered, naming the question, rather than failing part-way through.
    context = model.config.max_position_embeddings
    for sample in samples:
        ids, _ = tokenizer.encode_chat(sample.chat(), add_generation_prompt=True)
        if len(ids) >= context:
            raise CliError(f"{sample.source}: the prompt is {len(ids)} tokens, but the model's "
                           f"context (max_position_embeddings) is {context} tokens, which leaves "
                           "no room for a reply; shorten the question")
    label = "adapter" if args.adapter else "base"
    if params is None:
        answer: Any = chat_answerer(model, tokenizer, max_new_tokens=args.max_new_tokens,
                                    eos_token_id=tokenizer.stop_token_ids)
    else:
        answer = sampled_answerer(model, tokenizer, args.samples, seed=args.seed,
                                  max_new_tokens=args.max_new_tokens,
                                  eos_token_id=tokenizer.stop_token_ids, **params.as_kwargs())
        label += f" ({params.describe()}; {args.samples} a question)"
    with tqdm(total=len(samples), unit="question", desc="tasks", file=sys.stderr) as bar:
        result = tasks.score(samples, answer, on_result=lambda _: bar.update(1))
    print(tasks.format_table({label: result}))
    report = result.to_dict()
    if params is not None:
        report["sampling"] = {**params.as_kwargs(), "samples": args.samples, "seed": args.seed}
    return report
