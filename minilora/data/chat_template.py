"""A model's own chat template: the Jinja ``chat_template`` of tokenizer_config.json, rendered the
way transformers' ``apply_chat_template`` renders it, and the assistant-only loss mask of it.

The mask comes from the rendered text, whatever the template: the conversation is rendered up to
each assistant message with the generation prompt (the text before the reply) and up to and with
the message (the text after it). The characters between the two, trailing whitespace left out,
are the reply and its end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``); the
tokens of the whole text whose characters start inside such a span are trained.

A template is a program from the model's files, so it runs bounded (docs/reliability.md): in
Jinja's immutable sandbox; without ``{% include %}`` / ``{% import %}`` / ``{% extends %}`` (it
reads no other file); at most ``MAX_RENDER_SECONDS`` of wall-clock time per render, enforced by
one watchdog thread that raises an exception in a rendering thread past its deadline (nothing
runs on after the render returns; see ``_Watchdog``); and no string, list or number
larger than ``MAX_RENDER_CHARS`` characters (``*``, ``+``, ``~``, ``%``, ``**``, every filter and
method call checked) and no output longer than that.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from minilora.core.errors import (  # noqa: F401  (re-exported)
    ChatTemplateError,
    ConfigError,
    TemplateBoundError,
)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the model's chat template refused the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # transformers' own tojson: unlike Jinja's it does not HTML-escape, so tool schemas render
    # as they are written.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


# The bounds of one render (docs/reliability.md). A chat template renders a conversation in
# milliseconds and its text is about as long as the messages (a data line is at most 16 MiB).
MAX_RENDER_SECONDS = 5.0
# chat_template.jinja (or the config's string): real ones are a few KB to some tens of KB.
MAX_TEMPLATE_BYTES = 1 << 20
MAX_RENDER_CHARS = 64 << 20
# An integer of more bits than this is no count or index a template needs.
_MAX_INT_BITS = 1 << 16
# Width or precision digits in a %-format or str.format string ("%0999999999d").
_WIDTH = re.compile(r"\d{9,}")


class _TooLarge(Exception):
    """A value past MAX_RENDER_CHARS (or an integer past _MAX_INT_BITS) inside a render."""


class _TooSlow(BaseException):
    """A render past MAX_RENDER_SECONDS, raised in the rendering thread by the watchdog (a
    BaseException, so that no ``except Exception`` on the way swallows it)."""


def _size(value: Any) -> Any:
    """``value`` if it is within the render bounds, else _TooLarge."""
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > MAX_RENDER_CHARS:
        raise _TooLarge(f"a value of {len(value)} characters or items (the bound is "
                        f"{MAX_RENDER_CHARS})")
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise _TooLarge(f"an integer of {value.bit_length()} bits")
    return value


def _args(values: Iterable[Any]) -> None:
    """Refuse arguments that ask for output past the bound before the call makes it: a count
    or width over MAX_RENDER_CHARS (``center(10**9)``)."""
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > \
                MAX_RENDER_CHARS:
            raise _TooLarge(f"a count of {value} (the bound is {MAX_RENDER_CHARS})")
        _size(value)


def _format(text: Any) -> None:
    """Refuse a format string with a width of 9 or more digits ("%0999999999d")."""
    if isinstance(text, str) and _WIDTH.search(text):
        raise _TooLarge("a format width of 9 or more digits")


def _bounded_binop(op: Callable[[Any, Any], Any], name: str) -> Callable[[Any, Any], Any]:
    def run(left: Any, right: Any) -> Any:
        if name == "*":  # "a" * 4000000000 is refused before it is built
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and \
                        len(seq) * max(n, 0) > MAX_RENDER_CHARS:
                    raise _TooLarge(f"a value of {len(seq) * n} characters or items (the bound "
                                    f"is {MAX_RENDER_CHARS})")
        if name == "**" and isinstance(left, int) and isinstance(right, int) and \
                max(left.bit_length(), 1) * max(right, 0) > _MAX_INT_BITS and abs(left) > 1:
            raise _TooLarge(f"an integer of about {left.bit_length() * right} bits")
        if name == "%" and isinstance(left, str):
            _format(left)
            _args(right if isinstance(right, tuple) else (right,))
        return _size(op(left, right))

    return run


def _bounded_filter(f: Callable[..., Any], name: str) -> Callable[..., Any]:
    value_at = 1 if hasattr(f, "jinja_pass_arg") else 0  # context / environment first

    def run(*args: Any, **kwargs: Any) -> Any:
        if name == "format" and len(args) > value_at:
            _format(args[value_at])
        _args(list(args[value_at + 1:]) + list(kwargs.values()))
        return _size(f(*args, **kwargs))

    for attr in ("jinja_pass_arg",):  # pass_context / pass_environment markers
        if hasattr(f, attr):
            setattr(run, attr, getattr(f, attr))
    return run


def _bounded_join(join: Callable[[Iterable[Any]], str]) -> Callable[[Iterable[Any]], str]:
    def run(parts: Iterable[Any]) -> str:  # the ~ operator
        parts = list(parts)
        if sum(len(p) for p in parts if isinstance(p, str)) > MAX_RENDER_CHARS:
            raise _TooLarge(f"a string of more than {MAX_RENDER_CHARS} characters")
        return join(parts)

    return run


@lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        """Jinja's immutable sandbox with every operator that can grow a value checked."""

        intercepted_binops = frozenset({"+", "*", "%", "**", "//", "/", "-"})

        def call(__self, __context: Any, __obj: Any, *args: Any,  # noqa: N805
                 **kwargs: Any) -> Any:
            _args(list(args) + list(kwargs.values()))
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str) and getattr(__obj, "__name__", "") in ("format",
                                                                           "format_map"):
                _format(owner)
            return _size(super().call(__context, __obj, *args, **kwargs))

    # The settings transformers renders with (trim_blocks, lstrip_blocks, loop controls, a
    # sandbox): the same source must give the same text here and there.
    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    for name, op in env.binop_table.items():
        env.binop_table[name] = _bounded_binop(op, name)
    env.filters["tojson"] = _tojson
    for name, f in list(env.filters.items()):
        env.filters[name] = _bounded_filter(f, name)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


# Statements that read another template: a chat template comes alone, and there is no folder
# it may read from.
_READS_FILES = ("Include", "Import", "FromImport", "Extends")


@lru_cache(maxsize=8)
def _compiled(source: str) -> Any:
    from jinja2 import TemplateError, nodes

    env = _environment()
    try:
        tree = env.parse(source)
    except TemplateError as err:
        raise ChatTemplateError(f"the model's chat template is not valid Jinja: {err}") from None
    except RecursionError:
        raise ChatTemplateError("the model's chat template is nested too deeply to "
                                "parse") from None
    for kind in _READS_FILES:
        for node in tree.find_all(getattr(nodes, kind)):
            raise ChatTemplateError(
                f"the model's chat template uses {{% {kind.lower().replace('fromimport', 'from')}"
                f" %}} (line {node.lineno}), which reads another template file; a chat template "
                "must be one self-contained template")
    try:
        template = env.from_string(tree)
    except TemplateError as err:
        raise ChatTemplateError(f"the model's chat template is not valid Jinja: {err}") from None
    except RecursionError:
        raise ChatTemplateError("the model's chat template is nested too deeply to "
                                "compile") from None
    # ~ (string concatenation) is no operator the sandbox intercepts: bound it where the
    # compiled template looks it up.
    names = template.root_render_func.__globals__
    for name in ("str_join", "markup_join"):
        names[name] = _bounded_join(names[name])
    return template


def compile_template(source: str, origin: str | None = None) -> None:
    """Check that ``source`` is a chat template minilora will render: valid Jinja that reads no
    other template file.

    Raises:
        ChatTemplateError: it is not, naming ``origin`` (its file) where given.
    """
    try:
        _compiled(source)
    except ChatTemplateError as err:
        raise ChatTemplateError(f"{origin + ': ' if origin else ''}{err}") from None


class _Watchdog:
    """Stops renders that run past their deadline: one daemon thread for the process sleeps
    until the earliest deadline of the renders under way and raises ``_TooSlow`` in a rendering
    thread that is still past it (``PyThreadState_SetAsyncExc``, delivered at the thread's next
    bytecode, so a pure-Python loop stops; a single long C call finishes first, and the size
    bounds keep those short).

    Nothing can leak: a render registers before it starts and unregisters (under the same lock)
    before it returns; an exception set but not yet delivered when it unregisters is cleared
    there. A render costs a lock and a notify, not a trace of every line (which made rendering
    seven times slower). After a fork the child starts its own thread.
    """

    def __init__(self) -> None:
        self._pid = -1

    def _fresh(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Condition()
        self._renders: dict[int, tuple[int, float]] = {}  # token -> (thread id, deadline)
        self._fired: set[int] = set()
        self._tokens = itertools.count()
        threading.Thread(target=self._run, name="minilora-template-watchdog",
                         daemon=True).start()

    def start(self, seconds: float) -> int:
        if self._pid != os.getpid():
            self._fresh()
        with self._lock:
            token = next(self._tokens)
            self._renders[token] = (threading.get_ident(), time.monotonic() + seconds)
            self._lock.notify()
        return token

    def stop(self, token: int) -> None:
        with self._lock:
            self._renders.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                _async_raise(threading.get_ident(), None)  # one not delivered yet: cleared

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                for token, (thread, deadline) in list(self._renders.items()):
                    if deadline <= now:
                        del self._renders[token]
                        self._fired.add(token)
                        _async_raise(thread, _TooSlow)
                deadlines = [deadline for _, deadline in self._renders.values()]
                self._lock.wait(min(deadlines) - now if deadlines else None)


def _async_raise(thread: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in ``thread`` at its next bytecode; None clears one not yet raised."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread), None if exc is None else ctypes.py_object(exc))


_WATCHDOG = _Watchdog()


def _generate(template: Any, variables: dict[str, Any], parts: list[str]) -> None:
    """The template's output into ``parts``, counted as it comes (MAX_RENDER_CHARS)."""
    size = 0
    for part in template.generate(**variables):
        size += len(part)
        if size > MAX_RENDER_CHARS:
            raise _TooLarge(f"output of more than {MAX_RENDER_CHARS} characters")
        parts.append(part)


def render(source: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False,
           special_tokens: dict[str, str | None] | None = None, origin: str | None = None) -> str:
    """The text of ``messages`` under the Jinja chat template ``source``.

    Args:
        source: the template (tokenizer_config.json's ``chat_template``).
        messages: ``[{"role": ..., "content": ...}, ...]``.
        add_generation_prompt: end with the text that opens an assistant reply.
        special_tokens: ``bos_token``, ``eos_token``, ... as the template may use them.
        origin: where the template comes from (its file), to name in errors.

    Raises:
        ChatTemplateError: the template fails on these messages (its own raise_exception too),
            is not valid Jinja, reads another file, or runs past the render bounds.
    """
    from jinja2 import TemplateError

    where = f"{origin}: " if origin else ""
    try:
        template = _compiled(source)
    except ChatTemplateError as err:
        raise ChatTemplateError(f"{where}{err}") from None
    variables = dict(messages=list(messages), add_generation_prompt=add_generation_prompt,
                     tools=None, documents=None, **(special_tokens or {}))
    # The template's code runs here and only here: what it raises is the template's doing
    # (1/0, a recursing macro, a range past the sandbox's bound), so it is translated here.
    parts: list[str] = []
    token = None
    try:
        token = _WATCHDOG.start(MAX_RENDER_SECONDS)
        try:
            _generate(template, variables, parts)
        finally:
            _WATCHDOG.stop(token)  # before it returns: no exception can arrive after
    except ChatTemplateError as err:
        raise ChatTemplateError(f"{where}{err}") from None
    except _TooSlow:
        if token is not None:  # arrived inside stop itself: cleared, nothing left pending
            _WATCHDOG.stop(token)
        raise TemplateBoundError(f"{where}the model's chat template ran past "
                                 f"{MAX_RENDER_SECONDS:g} seconds on one conversation and was "
                                 "stopped; use a template without long loops") from None
    except _TooLarge as err:
        raise TemplateBoundError(f"{where}the model's chat template made {err} and was "
                                 "stopped; use a template whose text is about as long as the "
                                 "messages") from None
    except RecursionError:
        raise ChatTemplateError(f"{where}the model's chat template recursed too deeply (a macro "
                                "that calls itself without end?)") from None
    except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError,
            AttributeError) as err:
        raise ChatTemplateError(f"{where}the model's chat template failed: {type(err).__name__}: "
                                f"{err}") from None
    return "".join(parts)


def assistant_spans(source: str, messages: Sequence[dict[str, Any]],
                    special_tokens: dict[str, str | None] | None = None,
                    origin: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant replies.

    Returns:
        (text, spans): ``text[a:b]`` for each (a, b) of spans is one assistant reply with the
        template's end-of-turn marker after it, trailing whitespace excluded.

    Raises:
        ChatTemplateError: the template does not render a conversation as its turns one after
            another (a later message changes the text of an earlier one), so no span is exact.
    """
    def text_of(upto: int, prompt: bool) -> str:
        return render(source, messages[:upto], add_generation_prompt=prompt,
                      special_tokens=special_tokens, origin=origin)

    full = text_of(len(messages), False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = text_of(i, True), text_of(i + 1, False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatTemplateError(
                f"{origin + ': ' if origin else ''}the model's chat template renders message {i} "
                "differently once later messages follow, so its assistant replies cannot be "
                'located; train on text data ({"text": ...}) rendered by you, or use a template '
                "that appends turns")
        end = len(through.rstrip())
        spans.append((len(before), max(end, len(before))))
    return full, spans
