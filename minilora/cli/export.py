"""`minilora export`: a base (+ an adapter) as one GGUF file for llama.cpp and Ollama, or the
adapter alone as a GGUF LoRA adapter."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from minilora.cli.common import (
    BASE_MODEL,
    CliError,
    add_model_config_arg,
    inputs,
    tokenizer_path,
)
from minilora.core.outputs import check_not_an_input

DTYPES = ("f32", "f16", "bf16", "q8_0")  # minilora.export.gguf.DTYPES (that module loads torch)


def add_export_parser(sub: Any) -> None:
    """Adds `minilora export`."""
    p = sub.add_parser(
        "export", help="a GGUF file for llama.cpp / Ollama: merged, or the adapter alone",
        description="Writes the base model with its adapter merged in (or the adapter alone, "
                    "--adapter-only) as one GGUF file that llama.cpp, Ollama and LM Studio "
                    "load, tokenizer and chat template included.")
    # add_model_args' --dtype is the dtype weights are loaded in; here --dtype is the file's
    # (the base is always read in float32, so nothing is rounded twice)
    p.add_argument("--model", default=str(BASE_MODEL), metavar="PATH",
                   help="base model: a Hugging Face folder (config.json + *.safetensors) or a "
                        "MiniMind .pth (default: the embedded tiny model)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or its folder (default: the model's folder)")
    add_model_config_arg(p)
    p.add_argument("--adapter", action="append", default=[], metavar="PATH",
                   help="adapter folder (PEFT layout), a training run's folder (its adapter/), "
                        "a combined adapter or a MiniMind .pth: merged into the base, or written "
                        "alone with --adapter-only")
    p.add_argument("--no-fingerprint-check", action="store_true",
                   help="apply the adapter even if it was trained on another base")
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="the GGUF file to write")
    p.add_argument("--dtype", dest="gguf_dtype", default="f16", choices=DTYPES,
                   help="type of the written weights; norms and biases stay f32; q8_0: 8-bit "
                        "blocks of 32, weights whose rows are not whole blocks written f16 "
                        "(default: %(default)s)")
    p.add_argument("--adapter-only", action="store_true",
                   help="write the adapter alone, as a llama.cpp LoRA adapter to apply over a "
                        "GGUF of the base (llama.cpp --lora, Ollama ADAPTER)")
    p.add_argument("--ollama", action="store_true",
                   help="also write a Modelfile beside the GGUF for `ollama create`")
    p.add_argument("--ollama-base", default=None, metavar="BASE.gguf",
                   help="with --adapter-only --ollama: the base GGUF the Modelfile's FROM names "
                        "(export it with `minilora export --model BASE --out BASE.gguf`)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (and Modelfile)")
    p.set_defaults(run=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """`minilora export`: base (+ adapter) -> one GGUF file (and a Modelfile with --ollama)."""
    out = Path(args.out)
    if args.adapter_only and not args.adapter:
        raise CliError("--adapter-only needs --adapter: the adapter to write")
    if args.ollama and args.adapter_only and not args.ollama_base:
        raise CliError("--adapter-only --ollama needs --ollama-base BASE.gguf: the Modelfile's "
                       "FROM (export the base with `minilora export --model BASE --out "
                       "BASE.gguf`)")
    if args.ollama_base and not args.ollama:
        raise CliError("--ollama-base is for --ollama (the Modelfile's FROM)")
    if out.suffix != ".gguf":
        raise CliError(f"--out {out}: a GGUF file name ends in .gguf")
    check_not_an_input(out, inputs(args), "--out")
    modelfile = out.parent / "Modelfile"
    if args.ollama:
        check_not_an_input(modelfile, inputs(args), "the Modelfile beside --out")
        if modelfile.exists() and not args.overwrite:
            raise CliError(f"{modelfile} exists; nothing is overwritten without --overwrite")
    if out.exists() and not args.overwrite:
        raise CliError(f"--out {out} exists; nothing is overwritten without --overwrite")

    from minilora.cli.common import apply_adapters, load_base
    from minilora.data.tokenizer import Tokenizer
    from minilora.export.gguf import export_gguf
    from minilora.export.ollama import modelfile_text

    args.dtype = "float32"
    model, _ = load_base(args, tokenizer=False)
    tokenizer = Tokenizer.from_file(tokenizer_path(args, Path(args.model)))
    apply_adapters(model, args)
    # the Modelfile's template is checked before the GGUF is written: a refusal writes nothing
    text = modelfile_text(tokenizer, out, adapter_only=args.adapter_only,
                          base=args.ollama_base) if args.ollama else None
    report = export_gguf(model, tokenizer, out, dtype=args.gguf_dtype,
                         adapter_only=args.adapter_only, overwrite=args.overwrite)
    print(report)
    if text is not None:
        from minilora.core.files import atomic_write

        atomic_write(modelfile, text)
        print(f"{modelfile}: for `ollama create NAME -f {modelfile}`")
    return 0
