"""What the `minilora` commands share: the parser class, the model, adapter and sampling flags,
and loading what those flags name.

The library is imported inside the functions that use it, never at the top of a command file: it
imports torch (about a second and a few hundred MB), which `--help` and a bad argument must not
wait for.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from minilora.core.errors import (  # noqa: F401  (CliError re-exported: cli.common.CliError)
    CliError,
    ConfigError,
    MiniloraError,
    OutputError,
)
from minilora.core.outputs import check_not_an_input

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BASE_MODEL = ASSETS / "base"
EXIT_USAGE = 2


def say_error(prog: str, message: str) -> None:
    """The one way the command line words an error: ``PROG: error: MESSAGE`` on one line of
    stderr (newlines and terminal colour codes a wrapped message may hold are flattened)."""
    message = re.sub(r"\s*\n\s*", " ", re.sub(r"\x1b\[[0-9;]*m", "", message)).strip()
    print(f"{prog}: error: {message}", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (not the usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        say_error(self.prog, f"{message} (see `{self.prog} --help`)")
        raise SystemExit(EXIT_USAGE)


def add_model_args(p: argparse.ArgumentParser, *, adapters: bool = True) -> None:
    """--model, --tokenizer, --config, --dtype; with adapters: --adapter and
    --no-fingerprint-check."""
    p.add_argument("--model", default=str(BASE_MODEL), metavar="PATH",
                   help="base model: a Hugging Face folder (config.json + *.safetensors) or a "
                        "MiniMind .pth (default: the embedded tiny model)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or its folder (default: the model's folder)")
    add_model_config_arg(p, "--config", "--model-config")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load the weights in (default: %(default)s)")
    if adapters:
        p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                       help="adapter folder (PEFT layout), a training run's folder (its "
                            "adapter/) or a MiniMind .pth to apply; chat and generate take "
                            "several (named NAME, else after the folder)")
        p.add_argument("--no-fingerprint-check", action="store_true",
                       help="apply an adapter even if it was trained on another base")


def add_model_config_arg(p: argparse.ArgumentParser, *flags: str) -> None:
    p.add_argument(*flags, dest="model_config", default=None, metavar="FILE",
                   help="the model's config when --model has no config.json beside it (a bare "
                        "MiniMind .pth): MiniMind's config.json or transformers', or minimind2 / "
                        "minimind3 for that MiniMind generation's defaults (default: the "
                        "config.json beside the model)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="most tokens to generate per reply (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0: greedy; > 0: sample from softmax(logits / T) (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K most likely tokens; 0: all (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling threshold; 1: off (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="divide the logits of tokens already seen by R; 1: off "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for sampling, so a run can be repeated")


def sampling(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """The generation settings the sampling flags give."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                eos_token_id=tokenizer.stop_token_ids, seed=args.seed)


def load_base(args: argparse.Namespace, *, tokenizer: bool = True) -> tuple[Any, Any]:
    """The model and tokenizer that --model / --config / --tokenizer name (tokenizer=False:
    the model only, the tokenizer None)."""
    from minilora.core.threads import configure_threads
    from minilora.data.tokenizer import Tokenizer
    from minilora.model.io import load_model

    configure_threads()  # the CPUs other processes leave free (a shared machine)
    model_path = Path(args.model)
    model = load_model(model_path, dtype=args.dtype, config=getattr(args, "model_config", None))
    if not tokenizer:
        return model, None
    return model, Tokenizer.from_file(tokenizer_path(args, model_path))


def tokenizer_path(args: argparse.Namespace, model_path: Path) -> Path:
    """--tokenizer, else the model's folder (a .pth's own folder)."""
    if args.tokenizer:
        return Path(args.tokenizer)
    return model_path if model_path.is_dir() else model_path.parent


def apply_adapters(model: Any, args: argparse.Namespace, *, several: bool = False) -> list[str]:
    """Loads the --adapter options; returns their names (the first one is active)."""
    from minilora.lora.named import set_active

    if len(args.adapter) > 1 and not several:
        raise CliError(f"one --adapter at a time for `{args.command}` (chat and generate take "
                       "several)")
    if len(args.adapter) == 1 and "=" not in args.adapter[0]:
        load_adapter_arg(model, args.adapter[0], args)  # one adapter: "default", as always
        return ["default"]
    names = load_named_adapters(model, args.adapter, args, "--adapter NAME=PATH")
    if names:
        set_active(model, names[0])
    return names


def load_named_adapters(model: Any, specs: list[str], args: argparse.Namespace,
                        how: str) -> list[str]:
    """Loads each [NAME=]PATH of specs as a named adapter; returns the names in order."""
    names: list[str] = []
    for spec in specs:
        name, path = adapter_spec(spec)
        if name in names:
            raise CliError(f"two adapters are named {name!r}: name them with {how}")
        load_adapter_arg(model, path, args, name=name)
        names.append(name)
    return names


def adapter_spec(spec: str) -> tuple[str, str]:
    """NAME=PATH, or PATH named after its folder (or file stem)."""
    from minilora.lora.config import check_adapter_name

    name, eq, path = spec.partition("=")
    if not eq or Path(spec).exists():
        path = spec
        name = name_after(Path(spec).stem, "adapter")
    try:
        check_adapter_name(name)
    except ConfigError as err:
        raise CliError(f"--adapter {spec}: {err}") from None
    return name, path


def name_after(text: str, fallback: str) -> str:
    """An adapter name made from a file or folder name: what is not a name character becomes _."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text).lstrip("-") or fallback


def load_adapter_arg(model: Any, path: str | Path, args: argparse.Namespace,
                     name: str | None = None) -> None:
    """--adapter PATH: loads the adapter at path (a training run's folder: the adapter it wrote)
    into model, checking its fingerprint unless --no-fingerprint-check."""
    from minilora.adapters.folder import load_adapter
    from minilora.training.describe import resolve_adapter_path

    load_adapter(model, resolve_adapter_path(path), check_fingerprint=not args.no_fingerprint_check,
                 name=name)


def inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The paths a model command reads, by flag: what its output may not overwrite."""
    adapters = [adapter_spec(a)[1] for a in getattr(args, "adapter", None) or []]
    adapters += [adapter_spec(a)[1] for a in getattr(args, "adapters", None) or []]
    return {"--model": args.model, "--tokenizer": args.tokenizer, "--adapter": adapters,
            "INPUT": getattr(args, "input", None)}


def check_adapter_out(out: Path, args: argparse.Namespace) -> None:
    """An adapter output: not an input; an existing one is replaced only if it is an adapter
    minilora wrote (a .pth: a MiniMind LoRA file), never a user's other files."""
    from minilora.training.describe import describe_adapter

    check_not_an_input(out, inputs(args), "output" if args.command == "convert" else "--out")
    if not out.exists() or out.is_dir() and not any(out.iterdir()):
        return
    try:
        info = describe_adapter(out)
        ours = out.suffix == ".pth" or info["minilora version"] != "-"
    except (MiniloraError, OSError):
        ours = False
    if not ours:
        kind = "an adapter minilora wrote" if out.is_dir() else "a MiniMind LoRA .pth"
        raise OutputError(f"{out} exists and is not {kind}; nothing is overwritten: choose a new "
                          "output path")


# Short flags for TrainConfig fields: --r for lora_r, --out for out_dir, ...
SHORT = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
          "lora_targets": "targets", "lora_exclude": "exclude", "lora_init": "init",
          "use_rslora": "rslora", "use_dora": "dora", "out_dir": "out"}


def flag(field: str) -> str:
    """The command-line flag of a TrainConfig (or other config) field: `lora_r` -> `--r`."""
    return "--" + SHORT.get(field, field).replace("_", "-")
