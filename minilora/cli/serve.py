"""`minilora serve`: an OpenAI-compatible server; each request names its adapter."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from minilora.cli.common import (
    CliError,
    adapter_spec,
    add_model_args,
    load_base,
    load_named_adapters,
)


def add_serve_parser(sub: Any) -> None:
    """Adds `minilora serve`."""
    p = sub.add_parser("serve", help="an OpenAI-compatible server; each request picks its "
                                     "adapter (needs the serve extra)")
    add_model_args(p)
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the base's name in requests and /v1/models (default: the model's "
                        "folder name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: none)")
    p.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="most requests decoded together; more wait (default: %(default)s)")
    p.add_argument("--adapter-dir", default=None, metavar="DIR",
                   help="allow POST /v1/load_lora_adapter to read adapters under DIR "
                        "(default: run-time loading is refused)")
    p.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """`minilora serve`: an OpenAI-compatible server; each request names its adapter."""
    from minilora.core.errors import MissingExtra

    try:
        import uvicorn
    except ImportError:
        raise MissingExtra("minilora serve", "serve") from None
    from minilora.serve.app import ServeState, create_app
    from minilora.serve.engine import Engine

    if args.max_batch < 1:
        raise CliError(f"--max-batch: expected >= 1, got {args.max_batch}")
    if args.adapter_dir is not None and not Path(args.adapter_dir).is_dir():
        raise CliError(f"--adapter-dir {args.adapter_dir}: no such folder")
    model, tokenizer = load_base(args)
    names = load_named_adapters(model, args.adapter, args, "--adapter NAME=PATH")
    base_name = args.model_name or Path(args.model).stem
    if base_name in names:
        raise CliError(f"--model-name {base_name!r} is also an adapter's name")
    engine = Engine(model, tokenizer, max_batch=args.max_batch)
    state = ServeState(engine, tokenizer, base_name,
                       adapters={n: str(adapter_spec(s)[1]) for n, s in zip(names, args.adapter,
                                                                         strict=True)},
                       api_key=args.api_key,
                       adapter_dir=None if args.adapter_dir is None else Path(args.adapter_dir),
                       check_fingerprint=not args.no_fingerprint_check)
    app = create_app(state)
    engine.start()
    print(f"minilora serve: {base_name} + adapters {names or 'none'} on "
          f"http://{args.host}:{args.port} (chat page at /, API at /v1)", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0
