"""`minilora merge`, `convert`, `combine` and `info`: write a model or an adapter from others,
or say what a path holds."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from minilora.cli.common import (
    CliError,
    add_model_args,
    add_model_config_arg,
    apply_adapters,
    inputs,
    load_adapter,
    load_base,
    load_named_adapters,
    name_after,
    tokenizer_path,
)
from minilora.core.errors import MiniloraError, OutputError
from minilora.core.outputs import FolderLock, check_not_an_input, check_own_folder

# What merge writes into --out: a model folder and its tokenizer.
_MERGE_OUTPUTS = re.compile(r"config\.json|model\.safetensors|model\.safetensors\.index\.json|"
                            r"model-\d+-of-\d+\.safetensors|tokenizer\.json|"
                            r"tokenizer_config\.json")


def add_merge_parser(sub: Any) -> None:
    """Adds `minilora merge`."""
    p = sub.add_parser("merge", help="base + adapter -> a merged model folder")
    add_model_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--save-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: as loaded)")
    p.set_defaults(run=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    """`minilora merge`: base + adapter -> a plain model folder transformers loads."""
    from minilora.lora.injection import merge_and_unload
    from minilora.model.io import save_model

    if not args.adapter:
        raise CliError("--adapter is required: the adapter to merge into the base")
    out = Path(args.out)
    check_not_an_input(out, inputs(args), "--out")
    check_own_folder(out, _MERGE_OUTPUTS, "merge", "--out")
    model, _ = load_base(args, tokenizer=False)  # copied beside the result when there is one
    apply_adapters(model, args)
    model = merge_and_unload(model)
    with FolderLock(out, "merge"):
        save_model(model, out, dtype=args.save_dtype)
        _copy_tokenizer(args, out)
    print(f"merged model written to {out}")
    return 0


def _copy_tokenizer(args: argparse.Namespace, out: Path) -> None:
    from minilora.data.tokenizer import Tokenizer

    source = tokenizer_path(args, Path(args.model))
    try:
        Tokenizer.from_file(source).save(out)
    except FileNotFoundError:  # MiniMind keeps tokenizer.json apart from its weights
        print(f"note: no tokenizer found at {source}; the merged folder has none "
              "(--tokenizer names one to copy)", file=sys.stderr)
    except (MiniloraError, OSError) as err:
        print(f"note: the tokenizer was not copied ({err}); the merged folder has none",
              file=sys.stderr)


def add_convert_parser(sub: Any) -> None:
    """Adds `minilora convert`."""
    p = sub.add_parser("convert", help="MiniMind .pth adapter <-> adapter folder")
    add_model_args(p, adapters=False)
    p.add_argument("input", help="a MiniMind .pth LoRA file or an adapter folder")
    p.add_argument("output", help="an adapter folder (from a .pth) or a .pth (from a folder)")
    p.add_argument("--no-fingerprint-check", action="store_true",
                   help="convert even if the adapter was trained on another base")
    p.set_defaults(run=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    """`minilora convert`: MiniMind .pth adapter <-> PEFT adapter folder."""
    from minilora.adapters.folder import save_adapter

    src, dst = Path(args.input), Path(args.output)
    to_minimind = dst.suffix == ".pth"
    if to_minimind == (src.suffix == ".pth"):
        raise CliError("convert turns a .pth into a folder or a folder into a .pth: "
                       f"got {src} -> {dst}")
    _check_adapter_out(dst, args)
    model, _ = load_base(args, tokenizer=False)
    load_adapter(model, src, args)
    save_adapter(model, dst, format="minimind" if to_minimind else "peft",
                 base_model_name_or_path=None if to_minimind else args.model)
    print(f"{src} -> {dst}")
    return 0


def _check_adapter_out(out: Path, args: argparse.Namespace) -> None:
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


def add_combine_parser(sub: Any) -> None:
    """Adds `minilora combine`."""
    p = sub.add_parser("combine", help="weighted combination of adapters -> one adapter")
    add_model_args(p, adapters=False)
    p.add_argument("adapters", nargs="+", metavar="[NAME=]PATH", help="the adapters to combine")
    p.add_argument("--weights", nargs="+", type=float, required=True, metavar="W",
                   help="one weight per adapter (e.g. 0.7 0.3)")
    p.add_argument("--out", required=True, metavar="DIR", help="the adapter folder to write")
    p.add_argument("--method", default="linear", choices=["linear", "svd"],
                   help="linear: ranks concatenated, exact; svd: re-factored to --r with the "
                        "error reported (default: %(default)s)")
    p.add_argument("--r", type=int, default=None, metavar="N",
                   help="rank for --method svd (default: the sum of the ranks)")
    p.add_argument("--no-fingerprint-check", action="store_true",
                   help="combine even if an adapter was trained on another base")
    p.set_defaults(run=cmd_combine)


def cmd_combine(args: argparse.Namespace) -> int:
    """`minilora combine`: a weighted combination of adapters, written as one adapter."""
    from minilora.adapters.folder import save_adapter
    from minilora.core.checks import number as checked_number
    from minilora.lora.named import combine_adapters

    if len(args.weights) != len(args.adapters):
        raise CliError(f"{len(args.adapters)} adapters but {len(args.weights)} --weights")
    for weight in args.weights:
        checked_number("--weights", weight)
    _check_adapter_out(Path(args.out), args)
    model, _ = load_base(args, tokenizer=False)
    names = load_named_adapters(model, args.adapters, args, "NAME=PATH")
    out = Path(args.out)
    name = name_after(out.name, "combined")
    if name in names or name == "base":
        name = "combined"
    report = combine_adapters(model, dict(zip(names, args.weights, strict=True)), name,
                              method=args.method, r=args.r)
    save_adapter(model, out, name=name, base_model_name_or_path=args.model)
    print(report)
    print(f"adapter written to {out}")
    return 0


def add_info_parser(sub: Any) -> None:
    """Adds `minilora info`."""
    p = sub.add_parser("info", help="what a model, adapter, run or checkpoint folder holds")
    p.add_argument("path", help="a model folder, an adapter folder, a .pth file, a training "
                                "run's folder or one of its checkpoints")
    p.add_argument("--json", action="store_true", help="print JSON instead of a listing")
    add_model_config_arg(p, "--config", "--model-config")
    p.set_defaults(run=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    """`minilora info`: what a model, adapter, run or checkpoint folder (or .pth) holds."""
    from minilora.training.describe import describe_path

    info = describe_path(args.path, args.model_config)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key.ljust(width)}  {value}")
    return 0
