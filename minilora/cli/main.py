"""The `minilora` command line: parse, call the library, print.

Every subcommand is a small function over the library, in a file of its own beside its parser
(cli/train.py, chat.py, generate.py, ...; what they share is in cli/common.py); this file
builds the parser and is the one place errors become one line.
Bad input (a wrong argument, a bad file, an adapter for another base) ends with one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from minilora import __version__
from minilora.cli.chat import add_chat_parser
from minilora.cli.combine import add_combine_parser
from minilora.cli.common import BASE_MODEL as BASE_MODEL  # the embedded model, for scripts
from minilora.cli.common import EXIT_USAGE, Parser, flag, say_error
from minilora.cli.convert import add_convert_parser
from minilora.cli.eval import add_eval_parser
from minilora.cli.export import add_export_parser
from minilora.cli.generate import add_generate_parser
from minilora.cli.info import add_info_parser
from minilora.cli.merge import add_merge_parser
from minilora.cli.replay import add_replay_parser
from minilora.cli.serve import add_serve_parser
from minilora.cli.train import add_train_parser
from minilora.core.errors import BaseConfigNeeded, MiniloraError

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

    add_train_parser(sub, flags=train_args)

    for add_parser in (add_chat_parser, add_generate_parser, add_eval_parser, add_merge_parser,
                       add_convert_parser, add_combine_parser, add_replay_parser,
                       add_serve_parser, add_info_parser, add_export_parser):
        add_parser(sub)
    return parser


def _unknown_flags(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> None:
    """An unknown argument: one line naming the nearest flag of that subcommand; exit 2."""
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    names = _flag_names(sub.choices[command])
    word = unknown[0]
    near = difflib.get_close_matches(word.split("=")[0], list(names), n=1, cutoff=0.6)
    hint = f"; did you mean {names[near[0]]}?" if near else ""
    say_error(f"minilora {command}", f"unknown argument {word}{hint} (see `minilora {command} "
              "--help`)")
    raise SystemExit(EXIT_USAGE)


# The long names other tools give some of our flags (transformers' TrainingArguments, PEFT's
# LoraConfig): a user who types one is pointed to ours.
_OTHER_NAMES = {"--learning-rate": "lr", "--lora-rank": "lora_r", "--rank": "lora_r",
                "--output-dir": "out_dir", "--num-train-epochs": "epochs",
                "--per-device-train-batch-size": "batch_size", "--target-modules": "lora_targets",
                "--gradient-accumulation-steps": "accumulation_steps"}


def _flag_names(subparser: argparse.ArgumentParser) -> dict[str, str]:
    """Every name a user may try for a flag of `subparser` -> the flag: its own spellings, its
    setting's full name (`--lora-r` for `--r`) and other tools' names for it."""
    names: dict[str, str] = {}
    by_dest: dict[str, str] = {}
    for action in subparser._actions:
        if not action.option_strings:
            continue
        own = action.option_strings[0]
        by_dest[action.dest] = own
        names.update({f: f for f in action.option_strings})
        names.setdefault("--" + action.dest.replace("_", "-"), own)
    for other, dest in _OTHER_NAMES.items():
        if dest in by_dest:
            names.setdefault(other, by_dest[dest])
    return names


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
        "base_config": "--model-config FILE",
        "check_fingerprint": "--no-fingerprint-check",
    }


def _in_flag_words(err: BaseException, command: str) -> None:
    """A library error in the command line's words: the settings it names (carried as data,
    ``err.fields``) become their flags."""
    if isinstance(err, MiniloraError) and err.fields:
        words = _cli_words(command)
        err.words = {name: words.get(name) or flag(name) for name in err.fields}


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
        if isinstance(err, BaseConfigNeeded):  # --config is train's own settings file
            err.flag = "--model-config"
        _in_flag_words(err, args.command)
        say_error(f"minilora {args.command}", str(err))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"minilora {args.command}: interrupted", file=sys.stderr)
        return 130
