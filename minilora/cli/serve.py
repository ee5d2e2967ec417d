"""`minilora serve`: an OpenAI-compatible server; each request names its adapter."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import Any

from minilora.cli.common import (
    CliError,
    adapter_spec,
    add_model_args,
    load_base,
    load_named_adapters,
    resolve_base,
)

MAX_BATCH = 1024  # rows of the batch's KV cache; more would allocate for requests never sent


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
    p.add_argument("--port", type=int, default=8000,
                   help="port, 0 to 65535 (default: %(default)s)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 routes; / and /health stay "
                        "open (default: none)")
    p.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help=f"most requests decoded together, 1 to {MAX_BATCH}; more wait "
                        "(default: %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=0, metavar="N",
                   help="feed a joining request's prompt N tokens a step inside the running "
                        "batch's decode step (chunked prefill), so it does not stall the others "
                        "for a step of its own; 0: prefill it in a step of its own "
                        "(default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="most requests waiting for a place in the batch; past it the server "
                        "answers 503 with Retry-After (default: %(default)s)")
    p.add_argument("--adapter-dir", default=None, metavar="DIR",
                   help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter for "
                        "adapters under DIR (default: the served set cannot change)")
    p.add_argument("--max-loras", type=int, default=16, metavar="N",
                   help="most adapters held in memory at once; run-time ones past it are "
                        "evicted, least recently used first, and read again from --adapter-dir "
                        "when asked for (default: %(default)s)")
    p.add_argument("--allowed-hosts", action="append", default=[], metavar="NAME",
                   help="a Host name to answer besides this machine's addresses and "
                        "localhost (repeatable; '*' answers any, which lets web pages read "
                        "answers through DNS rebinding)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://app.example) call the API "
                        "(repeatable; default: only the server's own page)")
    p.add_argument("--generation-config", choices=["auto", "none"], default="auto",
                   help="auto: sampling defaults (temperature, top_p, top_k, max_new_tokens) "
                        "from the model folder's generation_config.json when a request leaves "
                        "them out; none: OpenAI's defaults (default: %(default)s)")
    p.add_argument("--read-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="seconds a request's header and body may take to arrive; a slower "
                        "client is disconnected (default: %(default)s)")
    p.add_argument("--keep-alive", type=int, default=5, metavar="SECONDS",
                   help="seconds an idle connection stays open (default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=256, metavar="N",
                   help="most connections open at once; one more is answered 503 and closed "
                        "(default: %(default)s)")
    p.set_defaults(run=cmd_serve)


def check_flags(args: argparse.Namespace) -> None:
    """The flags' ranges, before anything is bound or loaded (one line each)."""
    if not 1 <= args.max_batch <= MAX_BATCH:
        raise CliError(f"--max-batch: expected 1 to {MAX_BATCH}, got {args.max_batch}")
    for flag, value, low in (("--max-queue", args.max_queue, 0),
                             ("--max-loras", args.max_loras, 1),
                             ("--max-connections", args.max_connections, 1),
                             ("--keep-alive", args.keep_alive, 1),
                             ("--prefill-chunk", args.prefill_chunk, 0)):
        if value < low:
            raise CliError(f"{flag}: expected >= {low}, got {value}")
    if not 0 < args.read_timeout <= 3600:
        raise CliError(f"--read-timeout: expected 0 to 3600 seconds, got {args.read_timeout}")
    if args.adapter_dir is not None and not Path(args.adapter_dir).is_dir():
        raise CliError(f"--adapter-dir {args.adapter_dir}: no such folder")
    room = args.max_loras - len(args.adapter)
    if room < 0 or (room == 0 and args.adapter_dir is not None):
        raise CliError(f"--max-loras {args.max_loras}: the {len(args.adapter)} adapters given "
                       "with --adapter stay loaded" + (" and run-time adapters need room"
                                                       if args.adapter_dir else "")
                       + "; raise --max-loras")
    for origin in args.cors_origin:
        if origin == "*" or "://" not in origin or origin.endswith("/"):
            raise CliError(f"--cors-origin {origin}: expected one origin such as "
                           "https://app.example (scheme and host, no path)")


def cmd_serve(args: argparse.Namespace) -> int:
    """`minilora serve`: an OpenAI-compatible server; each request names its adapter."""
    from minilora.core.errors import MissingExtra

    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise MissingExtra("minilora serve", "serve") from None
    from minilora.serve.app import ServeState, create_app, served_defaults
    from minilora.serve.engine import Engine
    from minilora.serve.listen import bind_socket

    check_flags(args)
    sock = bind_socket(args.host, args.port)  # before the model: a port in use fails fast
    try:
        resolve_base(args)  # no --model: the base the first adapter records, else the embedded
        model_path = Path(args.model)
        defaults, ignored = ({}, []) if args.generation_config == "none" else (
            served_defaults(model_path if model_path.is_dir() else model_path.parent))
        model, tokenizer = load_base(args)
        names = load_named_adapters(model, args.adapter, args, "--adapter NAME=PATH")
        base_name = args.model_name or Path(args.model).stem
        if base_name in names:
            raise CliError(f"--model-name {base_name!r} is also an adapter's name")
        engine = Engine(model, tokenizer, max_batch=args.max_batch, max_loras=args.max_loras,
                        prefill_chunk=args.prefill_chunk or None)
        adapters = {n: str(adapter_spec(s)[1]) for n, s in zip(names, args.adapter, strict=True)}
        state = ServeState(engine, tokenizer, base_name, adapters=adapters,
                           api_key=args.api_key,
                           adapter_dir=None if args.adapter_dir is None else Path(
                               args.adapter_dir),
                           check_fingerprint=not args.no_fingerprint_check,
                           allowed_hosts=[h for v in args.allowed_hosts for h in v.split(",")]
                           + [args.host, socket.gethostname()],  # names this machine has
                           cors_origins=args.cors_origin, max_queue=args.max_queue,
                           defaults=defaults)
        app = create_app(state)
        engine.start()
        port = sock.getsockname()[1]
        print(f"minilora serve: {base_name} + adapters {names or 'none'} on "
              f"http://{args.host}:{port} (chat page at /, API at /v1)", file=sys.stderr)
        if defaults:
            print(f"minilora serve: defaults from generation_config.json: {defaults}",
                  file=sys.stderr)
        if ignored:
            print(f"minilora serve: generation_config.json sets {', '.join(ignored)}, which "
                  "this server does not apply", file=sys.stderr)
        try:
            run_server(app, sock, args)
        finally:
            engine.stop()
    finally:
        sock.close()
    return 0


def run_server(app: Any, sock: Any, args: argparse.Namespace) -> None:
    """Serves app on the bound socket until Ctrl-C, with the read timeout, keep-alive and
    connection cap of args."""
    import uvicorn

    from minilora.serve.listen import server_config

    config = server_config(app, read_timeout=args.read_timeout, keep_alive=args.keep_alive,
                           max_connections=args.max_connections)
    uvicorn.Server(config).run(sockets=[sock])
