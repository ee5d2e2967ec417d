"""`minilora convert`: a MiniMind .pth adapter to an adapter folder and back."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from minilora.cli.common import (
    CliError,
    add_model_args,
    check_adapter_out,
    load_adapter_arg,
    load_base,
)
from minilora.core.outputs import FolderLock


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
    check_adapter_out(dst, args)  # before the lock file is made beside a refused output
    with FolderLock.beside(dst, "convert"):  # one writer; checked again under the lock
        check_adapter_out(dst, args)
        model, _ = load_base(args, tokenizer=False)
        load_adapter_arg(model, src, args)
        save_adapter(model, dst, format="minimind" if to_minimind else "peft",
                     base_model_name_or_path=None if to_minimind else args.model)
    print(f"{src} -> {dst}")
    return 0
