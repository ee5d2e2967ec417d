"""`minilora generate`: prompts in, text out (scriptable), one adapter per prompt if asked."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from minilora.cli.common import (
    CliError,
    add_model_args,
    add_sampling_args,
    load_for_answers,
)
from minilora.core.files import parse_json


def add_generate_parser(sub: Any) -> None:
    """Adds `minilora generate`."""
    p = sub.add_parser("generate", help="one prompt in, text out (scriptable)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("prompt", nargs="?", default=None,
                   help="the prompt (default: read from stdin)")
    p.add_argument("--system", default=None, help="a system message before the prompt")
    p.add_argument("--raw", action="store_true",
                   help="continue the prompt as plain text, without the chat template")
    p.add_argument("--adapter-per-prompt", action="store_true",
                   help='read JSON lines {"prompt": TEXT, "adapter": NAME|null} from stdin and '
                        "answer them in one batch, each row with its own adapter; JSON lines out")
    p.set_defaults(run=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """`minilora generate`: one prompt in, the reply streamed out."""
    from minilora.decoding.chat import stream_text
    from minilora.decoding.generation import stream_generate

    model, tokenizer, adapters, settings = load_for_answers(args)
    if args.adapter_per_prompt:
        if args.prompt is not None:
            raise CliError("--adapter-per-prompt reads JSON lines from stdin, not a prompt "
                           "argument")
        return _generate_per_prompt(model, tokenizer, args, adapters, settings)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    ids = _prompt_ids(tokenizer, prompt, args)
    for piece in stream_text(tokenizer, stream_generate(model, ids, **settings)):
        print(piece, end="", flush=True)
    print()
    return 0


def _generate_per_prompt(model: Any, tokenizer: Any, args: argparse.Namespace,
                         adapters: list[str], settings: dict[str, Any]) -> int:
    """--adapter-per-prompt: JSON lines {"prompt": ..., "adapter": NAME|null} on stdin, all
    generated in one batch whose rows use their own adapter; one JSON line out per prompt."""
    from minilora.decoding.generation import generate_batch

    rows = _read_prompt_rows(adapters)
    prompts = [_prompt_ids(tokenizer, prompt, args) for prompt, _ in rows]
    # with no adapter loaded every row is the base's, and the model takes no adapter_names
    per_row: dict[str, Any] = {"adapter_names": [name for _, name in rows]} if adapters else {}
    outputs = generate_batch(model, prompts, **per_row, **settings)
    for (prompt, name), tokens in zip(rows, outputs, strict=True):
        print(json.dumps({"adapter": name, "prompt": prompt, "text": tokenizer.decode(tokens)},
                         ensure_ascii=False))
    return 0


def _read_prompt_rows(adapters: list[str]) -> list[tuple[str, str | None]]:
    """(prompt, adapter name) of each JSON line on stdin."""
    rows = []
    for number, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except ValueError as e:  # invalid, too deep, an integer too long
            raise CliError(f"stdin line {number}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise CliError(f'stdin line {number}: expected {{"prompt": TEXT, "adapter": NAME}}')
        name = row.get("adapter")
        if name not in (None, "base", *adapters):
            raise CliError(f"stdin line {number}: no adapter {name!r}; loaded: {adapters}")
        rows.append((row["prompt"], name))
    if not rows:
        raise CliError('no prompts on stdin (one JSON line each: {"prompt": ..., "adapter": ...})')
    return rows


def _prompt_ids(tokenizer: Any, prompt: str, args: argparse.Namespace) -> list[int]:
    if not prompt.strip():  # the chat template alone would make a prompt of it
        raise CliError("the prompt is empty; give one as the argument or on stdin")
    if args.raw:
        ids = tokenizer.encode(prompt)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
    if not ids:
        raise CliError("the prompt is empty")
    return ids
