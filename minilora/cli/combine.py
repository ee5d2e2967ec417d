"""`minilora combine`: several adapters written as one (weighted, or SVD to a rank)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from minilora.cli.common import (
    CliError,
    add_model_args,
    check_adapter_out,
    load_base,
    load_named_adapters,
    name_after,
)
from minilora.core.outputs import FolderLock


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
    out = Path(args.out)
    check_adapter_out(out, args)  # before the lock file is made beside a refused output
    with FolderLock.beside(out, "combine"):  # one writer; checked again under the lock
        check_adapter_out(out, args)
        model, _ = load_base(args, tokenizer=False)
        names = load_named_adapters(model, args.adapters, args, "NAME=PATH")
        name = name_after(out.name, "combined")
        if name in names or name == "base":
            name = "combined"
        report = combine_adapters(model, dict(zip(names, args.weights, strict=True)), name,
                                  method=args.method, r=args.r)
        save_adapter(model, out, name=name, base_model_name_or_path=args.model)
    print(report)
    print(f"adapter written to {out}")
    return 0
