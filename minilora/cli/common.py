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
    """--model, --tokenizer, --model-config, --load-dtype; with adapters: --adapter and
    --no-fingerprint-check."""
    default = ("the base the --adapter records, else the embedded tiny model" if adapters
               else "the embedded tiny model")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="base model: a Hugging Face folder (config.json + *.safetensors) or a "
                        f"MiniMind .pth (default: {default})")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or its folder (default: the model's folder)")
    add_model_config_arg(p)
    p.add_argument("--load-dtype", "--dtype", dest="dtype", default="float32",
                   choices=["float32", "bfloat16", "float16"], action=Renamed,
                   help="dtype to load the weights in (default: %(default)s; --dtype: its old "
                        "name)")
    if adapters:
        p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                       help="adapter folder (PEFT layout), a training run's folder (its "
                            "adapter/) or a MiniMind .pth to apply; chat and generate take "
                            "several (named NAME, else after the folder)")
        p.add_argument("--no-fingerprint-check", action="store_true",
                       help="apply an adapter even if it was trained on another base")


def add_model_config_arg(p: argparse.ArgumentParser, subject: str = "--model") -> None:
    """--model-config (old name --config, which in `train` names the run's settings)."""
    p.add_argument("--model-config", "--config", dest="model_config", default=None,
                   metavar="FILE", action=Renamed,
                   help=f"the model's config when {subject} has no config.json beside it (a bare "
                        "MiniMind .pth): MiniMind's config.json or transformers', or minimind2 / "
                        "minimind3 for that MiniMind generation's defaults (default: the "
                        "config.json beside the model; --config: its old name)")


class Renamed(argparse.Action):
    """A flag that still answers to its old spelling (its last option string), with a one-line
    note on stderr when that one is used: a word keeps one meaning across the commands."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if option_string == self.option_strings[-1] != self.option_strings[0]:
            print(f"{parser.prog}: note: {option_string} is now {self.option_strings[0]}",
                  file=sys.stderr)
        setattr(namespace, self.dest, values)


# The sampling flags, by SamplingParams field. Each defaults to None, "left out": the adapter's
# or the model's generation_config.json then decides, else SamplingParams' own default.
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
_FROM_FILE = "the model's generation_config.json, else"


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="most tokens to generate per reply (default: %(default)s)")
    add_distribution_args(p)
    p.add_argument("--seed", type=int, default=None,
                   help="seed for sampling, so a run can be repeated")


def add_distribution_args(p: argparse.ArgumentParser, *, greedy: bool = False) -> None:
    """The flags that shape the next-token distribution (SAMPLING_FLAGS); ``greedy``: the
    command answers greedily unless --temperature is given (eval)."""
    shown = ("0, greedy (the others, when sampling: the model's generation_config.json, else off)"
             if greedy else f"{_FROM_FILE} 0")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help=f"0: greedy; > 0: sample from softmax(logits / T) (default: {shown})")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help=f"sample among the K most likely tokens; 0: all (default: {_FROM_FILE} 0)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help=f"nucleus sampling threshold; 1: off (default: {_FROM_FILE} 1)")
    p.add_argument("--min-p", type=float, default=None, metavar="P",
                   help="drop tokens less likely than P times the most likely one; 0: off "
                        f"(default: {_FROM_FILE} 0)")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help="divide the logits of tokens already seen by R; 1: off "
                        f"(default: {_FROM_FILE} 1)")


def sampling_params(args: argparse.Namespace, *, say: bool = True) -> Any:
    """The SamplingParams of the flags given, the rest from the first --adapter's
    generation_config.json, then the model's; with ``say``, one line on stderr naming the file
    when one supplied a setting."""
    from minilora.decoding.sampling import GENERATION_CONFIG, SamplingParams, generation_defaults

    resolve_base(args)
    given = {k: getattr(args, k, None) for k in SAMPLING_FLAGS}
    sources = [(folder, generation_defaults(folder)) for folder in _generation_folders(args)]
    params = SamplingParams.resolve(given, *(d for _, d in sources))
    used = [folder for n, (folder, d) in enumerate(sources)
            if any(given[k] is None and all(k not in e for _, e in sources[:n]) for k in d)]
    if say and used:
        files = " and ".join(str(Path(f) / GENERATION_CONFIG) for f in used)
        print(f"minilora {args.command}: sampling: {params.describe()} (from {files}; the "
              "flags given override it)", file=sys.stderr)
    return params


def _generation_folders(args: argparse.Namespace) -> list[Path]:
    """Where a generation_config.json may sit: the first --adapter's folder, then the model's."""
    folders = []
    if getattr(args, "adapter", None):
        from minilora.training.describe import resolve_adapter_path

        path = Path(adapter_spec(args.adapter[0])[1])
        if path.is_dir():
            folders.append(resolve_adapter_path(path))
    if args.model and Path(args.model).is_dir():
        folders.append(Path(args.model))
    return folders


def sampling(args: argparse.Namespace, tokenizer: Any, params: Any = None) -> dict[str, Any]:
    """The generation settings the sampling flags give (the folders' defaults under them);
    ``params``: the SamplingParams already resolved (``sampling_params``)."""
    params = params if params is not None else sampling_params(args)
    return dict(max_new_tokens=args.max_new_tokens, **params.as_kwargs(),
                eos_token_id=tokenizer.stop_token_ids, seed=args.seed)


def load_for_answers(args: argparse.Namespace
                     ) -> tuple[Any, Any, list[str], dict[str, Any]]:
    """What chat and generate answer with: the sampling settings checked first (before the
    model loads), the base with every --adapter loaded, in eval mode; returns (model,
    tokenizer, the adapters' names, the generation settings)."""
    params = sampling_params(args)  # a bad setting is answered before the model loads
    model, tokenizer = load_base(args)
    adapters = apply_adapters(model, args, several=True)
    model.eval()
    return model, tokenizer, adapters, sampling(args, tokenizer, params)


def resolve_base(args: argparse.Namespace) -> None:
    """Fills in --model when it was left out: the base the first --adapter's
    adapter_config.json records (``base_model_name_or_path``), else the embedded tiny model.

    Raises:
        CliError: the adapter records a base that is not on this machine.
    """
    if args.model is not None:
        return
    base = _adapter_base(args)
    if base is not None:
        print(f"minilora {args.command}: base: {base} (the one the adapter was trained on; "
              "--model chooses another)", file=sys.stderr)
    args.model = str(base or BASE_MODEL)


def _adapter_base(args: argparse.Namespace) -> Path | None:
    """The local base the first --adapter records, None when it records none (or is a .pth)."""
    if not getattr(args, "adapter", None):
        return None
    from minilora.adapters.folder import recorded_base
    from minilora.training.describe import resolve_adapter_path

    folder = resolve_adapter_path(adapter_spec(args.adapter[0])[1])
    recorded = recorded_base(folder) if folder.is_dir() else None
    if recorded is None:
        return None
    base = Path(recorded)
    if base.exists():
        return base
    if base.parts[-3:] == BASE_MODEL.parts[-3:]:  # the embedded model, of another install
        return BASE_MODEL
    raise CliError(f"{folder / 'adapter_config.json'} records its base as {recorded}, which is "
                   "not on this machine; pass --model PATH (that base, or a local copy of it)")


def load_base(args: argparse.Namespace, *, tokenizer: bool = True) -> tuple[Any, Any]:
    """The model and tokenizer that --model / --config / --tokenizer name (tokenizer=False:
    the model only, the tokenizer None); --model left out: see ``resolve_base``."""
    from minilora.core.threads import configure_threads
    from minilora.data.tokenizer import Tokenizer
    from minilora.model.io import load_model

    resolve_base(args)
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
    resolve_base(args)
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
