"""`minilora chat`: talk to a model, optionally through adapters, switching them with /adapter."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from minilora.cli.common import (
    add_model_args,
    add_sampling_args,
    load_for_answers,
)

_EXIT_WORDS = ("/quit", "exit", "quit", "/exit")


def add_chat_parser(sub: Any) -> None:
    """Adds `minilora chat` (its flags beside the function that runs it)."""
    p = sub.add_parser("chat", help="talk to a model, optionally with adapters "
                                    "(/adapter NAME switches)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="a system message to start with")
    p.set_defaults(run=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    """`minilora chat`: a conversation on stdin/stdout, streamed."""
    from minilora.decoding.chat import stream_reply

    model, tokenizer, adapters, settings = load_for_answers(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("minilora chat: type a message; /reset starts over, exit, quit, /quit or Ctrl-D "
              "ends; /help lists the commands; Ctrl-C stops a reply.")
        if len(adapters) > 1:
            print(f"adapters {adapters} ({adapters[0]} active); /adapter NAME switches "
                  "(NAME,NAME adds them up; base: none)")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        text = line.strip()
        if not line or text in _EXIT_WORDS:
            break
        if text == "/reset":
            messages = list(system)
        elif text == "/adapter" or text.startswith("/adapter "):
            _switch_adapter(model, text.removeprefix("/adapter").strip(), adapters)
        elif not text:  # the tool answers; the model is not asked about nothing
            print("(an empty message is not sent; type a message, /help for the commands)",
                  file=sys.stderr)
        elif text.startswith("/") and not text.startswith("//"):
            _command_help(text)
        else:
            text = text[1:] if text.startswith("//") else text  # //x sends /x to the model
            messages.append({"role": "user", "content": text})
            reply = ""
            try:
                for piece in stream_reply(model, tokenizer, messages, **settings):
                    print(piece, end="", flush=True)
                    reply += piece
            except KeyboardInterrupt:  # stops this reply; the conversation goes on
                print(" [stopped]", end="")
            print()
            messages.append({"role": "assistant", "content": reply.strip()})
    return 0


_COMMANDS = ("/reset: start the conversation over; /adapter [NAME]: show or switch adapters; "
             "/quit, exit, quit or Ctrl-D: end; //text sends a message that starts with /")


def _command_help(text: str) -> None:
    """/help, or a /word chat does not know: answered by the tool, never sent to the model."""
    word = text.split()[0]
    known = "" if word == "/help" else f"unknown command {word}; "
    print(f"{known}{_COMMANDS}", file=sys.stderr)


def _switch_adapter(model: Any, text: str, adapters: list[str]) -> None:
    """`/adapter NAME` in chat: NAME, NAME,NAME (their updates add up) or base; a bare
    `/adapter` says which are loaded and active. Messages go to stderr."""
    from minilora.lora.named import active_adapters, set_active

    if text:
        names = [n for n in re.split(r"[,+ ]+", text) if n]
        unknown = [n for n in names if n not in adapters and n != "base"]
        if unknown:
            print(f"no adapter {unknown[0]!r}; loaded: {adapters or 'none'} (and base)",
                  file=sys.stderr)
            return
        set_active(model, names)
    print(f"active: {active_adapters(model) or 'base'} (loaded: {adapters or 'none'})",
          file=sys.stderr)
