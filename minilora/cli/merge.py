"""`minilora merge`: a base and its adapter(s) written as one model folder."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from minilora.cli.common import (
    CliError,
    add_model_args,
    apply_adapters,
    inputs,
    load_base,
    tokenizer_path,
)
from minilora.core.errors import MiniloraError
from minilora.core.files import replace_folder
from minilora.core.outputs import LOCK_NAME, FolderLock, check_not_an_input, check_own_folder

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
    merge_and_unload(model)  # in place: the model (not a LoRALinear) comes back

    def write(folder: Path) -> None:
        save_model(model, folder, dtype=args.save_dtype, name=out)
        _copy_tokenizer(args, folder)
        # The new folder is merge's too (check_own_folder reads the lock file's command).
        shutil.copyfile(out / LOCK_NAME, folder / LOCK_NAME)

    with FolderLock(out, "merge"):
        # Written whole into a sibling folder, then swapped in: a kill leaves the old merged
        # model or the new one, never new weights under an old config or tokenizer.
        replace_folder(out, write)
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
