"""A model's own chat template: the Jinja ``chat_template`` of tokenizer_config.json, rendered the
way transformers' ``apply_chat_template`` renders it, and the assistant-only loss mask of it.

The mask comes from the rendered text, whatever the template: the conversation is rendered up to
each assistant message with the generation prompt (the text before the reply) and up to and with
the message (the text after it). The characters between the two, trailing whitespace left out,
are the reply and its end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``); the
tokens of the whole text whose characters start inside such a span are trained.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from minilora.core.errors import ChatTemplateError, ConfigError  # noqa: F401  (re-exported)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the model's chat template refused the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # transformers' own tojson: unlike Jinja's it does not HTML-escape, so tool schemas render
    # as they are written.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compiled(source: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The settings transformers renders with (trim_blocks, lstrip_blocks, loop controls, a
    # sandbox): the same source must give the same text here and there.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as err:
        raise ChatTemplateError(f"the model's chat template is not valid Jinja: {err}") from None


def render(source: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False,
           special_tokens: dict[str, str | None] | None = None) -> str:
    """The text of ``messages`` under the Jinja chat template ``source``.

    Args:
        source: the template (tokenizer_config.json's ``chat_template``).
        messages: ``[{"role": ..., "content": ...}, ...]``.
        add_generation_prompt: end with the text that opens an assistant reply.
        special_tokens: ``bos_token``, ``eos_token``, ... as the template may use them.

    Raises:
        ChatTemplateError: the template fails on these messages (its own raise_exception too).
    """
    from jinja2 import TemplateError

    template = _compiled(source)
    try:
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               tools=None, documents=None, **(special_tokens or {}))
    except TemplateError as err:
        raise ChatTemplateError(f"the model's chat template failed: {err}") from None


def assistant_spans(source: str, messages: Sequence[dict[str, Any]],
                    special_tokens: dict[str, str | None] | None = None
                    ) -> tuple[str, list[tuple[int, int]]]:
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
                      special_tokens=special_tokens)

    full = text_of(len(messages), False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = text_of(i, True), text_of(i + 1, False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatTemplateError(
                f"the model's chat template renders message {i} differently once later messages "
                "follow, so its assistant replies cannot be located; train on text data "
                '({"text": ...}) rendered by you, or use a template that appends turns')
        end = len(through.rstrip())
        spans.append((len(before), max(end, len(before))))
    return full, spans
