"""The `minilora` command line: parse, call the library, print.

Every subcommand is a small function over the library, in a file of its own beside its parser
(cli_chat, cli_eval, cli_files, cli_serve; what they share is in cli_common); `train` is here.
Bad input (a wrong argument, a bad file, an adapter for another base) ends with one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from minilora import __version__
from minilora.cli.chat import add_chat_parser, add_generate_parser
from minilora.cli.common import ASSETS, EXIT_USAGE, CliError, Parser
from minilora.cli.common import BASE_MODEL as BASE_MODEL  # the embedded model, for scripts
from minilora.cli.eval import add_eval_parser
from minilora.cli.files import (
    add_combine_parser,
    add_convert_parser,
    add_info_parser,
    add_merge_parser,
)
from minilora.cli.serve import add_serve_parser
from minilora.core.errors import BaseConfigNeeded, MiniloraError
from minilora.core.outputs import check_not_an_input

# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------

# --preset: settings measured to teach on such data (docs/quality.md, "Small data"). A few dozen
# rows give a handful of steps an epoch, so the preset fixes the number of steps, not epochs, and
# takes the demo's learning rate: 1e-4 for 20 steps moves a LoRA adapter nowhere.
PRESETS: dict[str, dict[str, Any]] = {
    "small-data": {"lr": 2e-3, "max_steps": 300, "batch_size": 16, "warmup_steps": 10,
                   "lora_dropout": 0.0},
}

# The TrainConfig fields the command line does not offer: the library sets them itself (model
# and tokenizer are --model / --tokenizer, added by hand with the other model arguments).
_HIDDEN_FIELDS = {"device", "model", "tokenizer"}
_SHORT = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
          "lora_targets": "targets", "lora_exclude": "exclude", "lora_init": "init",
          "use_rslora": "rslora", "use_dora": "dora", "out_dir": "out"}


def _parse_targets(text: str) -> list[str] | str:
    if text in ("all-linear", "square") or not re.fullmatch(r"[\w.,]+", text):
        return text  # a special rule or a regex
    return [t for t in text.split(",") if t]


# Old flag -> the field it sets; it still works, with a one-line note naming the new flag
# (train's --dtype was the autocast dtype, where --dtype elsewhere is the weights' dtype).
_OLD_FLAGS = {"--dtype": "amp_dtype"}


class _OldFlagToo(argparse.Action):
    """A flag that also answers to its old name, with a one-line note when that one is used."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if option_string in _OLD_FLAGS:
            print(f"minilora train: note: {option_string} is now {_flag(self.dest)}",
                  file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from minilora.training.config import TrainConfig

    p.add_argument("--model", default=None, metavar="PATH",
                   help="base model folder or MiniMind .pth (default: the embedded tiny model)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or its folder (default: the model's folder)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a JSON file of these settings (a run's config.json, say), keys named "
                        "as the flags with _ for - (lora_r for --r); flags given override it; "
                        "the run goes to a new --out folder unless --resume")
    p.add_argument("--tasks", nargs="*", default=None, metavar="FILE",
                   help="eval files (tasks format) scored before and after training")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="settings for a case, under the flags given: small-data (a few dozen to "
                        "a few hundred conversations): " + ", ".join(
                            f"--{_SHORT.get(k, k).replace('_', '-')} {v}"
                            for k, v in PRESETS["small-data"].items()) + " (default: none)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in _HIDDEN_FIELDS:
            continue
        flag = "--" + _SHORT.get(f.name, f.name).replace("_", "-")
        help_text = f.metadata["help"] + f" (default: {_shown_default(f)})"
        kind = str(f.type)
        if kind == "bool":
            p.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
        elif f.name == "lora_targets":
            p.add_argument(flag, dest=f.name, type=_parse_targets, default=None,
                           metavar="LIST|REGEX", help=help_text + " (comma-separated list)")
        elif f.name == "lora_exclude":
            p.add_argument(flag, dest=f.name, type=_parse_targets, default=None,
                           metavar="LIST", help=help_text + " (comma-separated)")
        else:
            conv = int if "int" in kind else float if "float" in kind else str
            old = [o for o, name in _OLD_FLAGS.items() if name == f.name]
            p.add_argument(flag, *old, dest=f.name, type=conv, default=None,
                           action=_OldFlagToo, metavar=f.name.split("_")[-1].upper(),
                           help=help_text + "".join(f" ({o}: its old name)" for o in old))


def _train_config(args: argparse.Namespace, given: dict[str, Any]) -> tuple[Any, bool]:
    """The run's TrainConfig from the demo, --config or a resumed run's config.json, then the
    flags given; returns it and whether this is the demo."""
    from minilora.training.config import TrainConfig

    saved = Path(given["out_dir"]) / "config.json" if "out_dir" in given else None
    resuming_saved = bool(given.get("resume")) and not args.config and saved is not None
    if resuming_saved and not saved.is_file():
        raise CliError(f"--resume: {saved} does not exist, so there is no run to continue in "
                       f"{given['out_dir']}; check --out")
    demo = (args.model is None and args.config is None and "data" not in given
            and not resuming_saved)
    settings: dict[str, Any] = {}
    if demo:
        settings = json.loads((ASSETS / "demo_train.json").read_text(encoding="utf-8"))
        settings["data"] = str(ASSETS / settings["data"])
        if settings.get("eval_data"):
            settings["eval_data"] = str(ASSETS / settings["eval_data"])
    elif resuming_saved:
        settings = TrainConfig.from_json(saved).to_dict()  # the run's own settings, no retyping
        settings.pop("stop_after", None)  # where that invocation stopped, not this one
        settings.pop("overwrite", None)  # nor may its --overwrite replace anything now
    elif args.config:
        settings = TrainConfig.from_json(args.config).to_dict()
        for key in ("overwrite", "resume", "stop_after"):  # that invocation's, not this one's
            settings.pop(key, None)
        if not given.get("resume"):  # a rerun of a saved config is a new run, in a new folder
            settings.pop("out_dir", None)
    if getattr(args, "preset", None):
        settings.update(PRESETS[args.preset])
    settings.update(given)
    if not settings.get("data"):
        raise CliError("--data is required with --model or --config (a chat or text jsonl)")
    if not settings.get("out_dir"):
        stem = Path(settings["data"]).stem
        settings["out_dir"] = str(Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    settings["model"] = str(args.model or settings.get("model") or BASE_MODEL)
    if args.tokenizer:
        settings["tokenizer"] = str(args.tokenizer)
    return TrainConfig.from_dict(settings), demo


# What a None default means on the command line, where "None" would say nothing.
_NONE_MEANS = {"data": "the demo data with no --model", "eval_data": "no eval",
               "max_steps": "epochs x steps per epoch", "stop_after": "the end",
               "model_config": "the config.json beside the model",
               "beta": "0.1 for dpo, 2.0 for simpo", "from_adapter": "a new adapter"}


def _shown_default(f: Any) -> str:
    if f.name == "out_dir":
        return "runs/<data name>-<date>-<time>"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None:
        return _NONE_MEANS.get(f.name, "none")
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(value) or "none"
    return str(value)


def cmd_train(args: argparse.Namespace) -> int:
    """`minilora train`: LoRA (or --full) fine-tuning; with no arguments, the demo."""
    from minilora.training.config import TrainConfig

    started = time.perf_counter()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    config, demo = _train_config(args, given)
    # torch only now: a bad setting is answered before it loads (a second and 230 MB)
    from minilora.core.threads import configure_threads
    from minilora.data import tasks
    from minilora.data.tokenizer import Tokenizer
    from minilora.decoding.chat import chat_answerer
    from minilora.model.io import load_model
    from minilora.training.datasets import load_datasets
    from minilora.training.loop import train

    configure_threads()  # the CPUs other processes leave free (a shared machine)
    check_not_an_input(config.out_dir, {"--model": config.model, "--tokenizer": config.tokenizer,
                                        "--config": args.config, "--tasks": args.tasks},
                       "--out")
    model_path = Path(config.model)
    model = load_model(model_path, config=config.model_config)
    tokenizer = Tokenizer.from_file(Path(config.tokenizer) if config.tokenizer else
                                    (model_path if model_path.is_dir() else model_path.parent))
    train_set, eval_set = load_datasets(config, tokenizer)

    task_files = args.tasks
    if task_files is None and demo:
        task_files = [str(ASSETS / f) for f in ("persona_eval.jsonl", "base_eval.jsonl")]
    samples = [s for f in task_files or [] for s in tasks.load_samples(f)]
    answer = chat_answerer(model, tokenizer, max_new_tokens=48,
                           eos_token_id=tokenizer.stop_token_ids)
    before = tasks.score(samples, answer) if samples else None

    try:
        result = train(model, train_set, config, eval_set)
    except KeyboardInterrupt:
        _say_how_to_resume(config)
        return 130
    if result.output_dir is None:  # not rank 0 under torchrun: rank 0 reports
        return 0
    last = f"; last loss {result.losses[-1][1]:.4f}" if result.losses else ""
    resumed = f"resumed at step {result.start_step}, " if result.start_step else ""
    print(f"{resumed}trained {result.steps - result.start_step} steps in {result.seconds:.1f} s"
          f"{last}")
    if before is not None:
        model.eval()
        _before_and_after(before, samples, answer)
    print(f"adapter: {result.output_dir}")
    written = [f for f in ("metrics.jsonl", "loss.png", "config.json", "checkpoints/")
               if (Path(config.out_dir) / f).exists()]
    print(f"outputs: {config.out_dir} ({', '.join(written)})")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def _before_and_after(before: Any, samples: list[Any], answer: Callable[[list[dict]], str]
                      ) -> None:
    """The tasks' table before and after training, and a few answers of the trained model."""
    from minilora.data import tasks

    after = tasks.score(samples, answer)
    # The tasks the run did not train on, pooled: what the adapter should leave intact.
    kept = [t for t in before.tasks if t != "persona"]
    groups = {"base skills": kept} if len(kept) > 1 else None
    print()
    print(tasks.format_table({"before": before, "after": after}, groups=groups, ratio=True))
    print()
    for sample in samples[:3]:
        question = sample.chat()[-1]["content"]
        print(f"Q: {question}\nA: {answer(sample.chat())}\n")


def _say_how_to_resume(config: Any) -> None:
    """Ctrl-C during training: which checkpoint is kept and the command that continues it."""
    from minilora.training.checkpoint import CHECKPOINTS, latest_checkpoint

    kept = latest_checkpoint(Path(config.out_dir) / CHECKPOINTS)
    if kept is None:
        print("minilora train: interrupted before its first checkpoint (--save-every N writes "
              "one every N steps); start it over with: minilora train --resume --out "
              f"{config.out_dir}", file=sys.stderr)
        return
    print(f"minilora train: interrupted; kept {kept}. Resume with: minilora train --resume "
          f"--out {config.out_dir}", file=sys.stderr)

# ------------------------------------------------------------------------------------------------
# The parser and main
# ------------------------------------------------------------------------------------------------


def build_parser(train_args: bool = True) -> argparse.ArgumentParser:
    """The `minilora` argument parser with every subcommand.

    Args:
        train_args: add `train`'s flags, which come from TrainConfig and so import torch; main
            leaves them out unless the command is `train`, so help and errors answer at once.
    """
    parser = Parser(prog="minilora", description="LoRA fine-tuning of small causal LMs.")
    parser.add_argument("--version", action="version", version=f"minilora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    p = sub.add_parser("train", help="LoRA fine-tune (no arguments: the embedded demo)",
                       description="LoRA fine-tuning (or --full). With no arguments: the embedded "
                                   "tiny model learns a new persona, with a before/after table.")
    if train_args:
        _add_train_args(p)
    p.set_defaults(run=cmd_train)

    for add_parser in (add_chat_parser, add_generate_parser, add_eval_parser, add_merge_parser,
                       add_convert_parser, add_combine_parser, add_serve_parser,
                       add_info_parser):
        add_parser(sub)
    return parser


def _unknown_flags(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> None:
    """An unknown argument: one line naming the nearest flag of that subcommand; exit 2."""
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = [f for action in sub.choices[command]._actions for f in action.option_strings]
    word = unknown[0]
    near = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]}?" if near else ""
    print(f"minilora {command}: error: unknown argument {word}{hint} (see `minilora {command} "
          "--help`)", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _flag(field: str) -> str:
    return "--" + _SHORT.get(field, field).replace("_", "-")


def _cli_words(command: str) -> dict[str, str]:
    """The command line's words for what library errors name by their keywords (the keys of
    ``err.fields`` that are not TrainConfig fields)."""
    return {
        "adapter_name": "NAME=PATH" if command == "combine" else "--adapter NAME=PATH",
        "peft_format": "an adapter folder: an output path not ending in .pth",
        "minimind_format": "an output path ending in .pth",
        "rank": "--r",
        "linear_method": "--method linear",
        "svd_method": "--method svd",
        "base_config": ("--model-config" if command == "train" else "--config") + " FILE",
    }


def _in_flag_words(err: BaseException, command: str) -> None:
    """A library error in the command line's words: the settings it names (carried as data,
    ``err.fields``) become their flags."""
    if isinstance(err, MiniloraError) and err.fields:
        words = _cli_words(command)
        err.words = {name: words.get(name) or _flag(name) for name in err.fields}


def _user_errors() -> tuple[type[BaseException], ...]:
    # What a bad input or the world raises: minilora's own error types and OS errors (a missing
    # file, a folder that cannot be written, a full disk). Anything else is a bug in minilora and
    # keeps its traceback (exit 1), rather than being passed off as the user's mistake.
    return (MiniloraError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `minilora ARGS`; returns the exit code (2 for bad input)."""
    from minilora.core.threads import prepare_env

    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(train_args=command == "train")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _unknown_flags(parser, args.command, unknown)
    # Before the command imports torch (OpenMP reads it once), after parsing: help and a bad
    # argument answer without its CPU sample (0.2 s).
    prepare_env()
    try:
        return args.run(args)
    except _user_errors() as err:
        if isinstance(err, BaseConfigNeeded):  # train's --config is its own settings file
            err.flag = "--model-config" if args.command == "train" else "--config"
        _in_flag_words(err, args.command)
        # One line whatever the message holds (a wrapped library error may carry newlines or
        # terminal colour codes).
        message = re.sub(r"\s*\n\s*", " ", re.sub(r"\x1b\[[0-9;]*m", "", str(err))).strip()
        print(f"minilora {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"minilora {args.command}: interrupted", file=sys.stderr)
        return 130
