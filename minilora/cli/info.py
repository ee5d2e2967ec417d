"""`minilora info`: what a model, adapter, run or checkpoint folder holds."""

from __future__ import annotations

import argparse
import json
from typing import Any

from minilora.cli.common import (
    add_model_config_arg,
)


def add_info_parser(sub: Any) -> None:
    """Adds `minilora info`."""
    p = sub.add_parser("info", help="what a model, adapter, run or checkpoint folder holds")
    p.add_argument("path", help="a model folder, an adapter folder, a .pth file, a training "
                                "run's folder or one of its checkpoints")
    p.add_argument("--json", action="store_true", help="print JSON instead of a listing")
    add_model_config_arg(p, subject="PATH")
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
