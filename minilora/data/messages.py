"""Chat messages: the one check of a ``[{"role": ..., "content": ...}, ...]`` conversation.

The SFT reader (data.py), the eval reader (tasks.py) and the tokenizer all take conversations;
each calls ``check_messages`` and words its error for its own input (a data file's line, an eval
file's field, a library call), from the field at fault and the problem given here.
"""

from __future__ import annotations

from collections.abc import Sequence

from minilora.core.errors import (  # noqa: F401  (re-exported: data.messages.MessageError)
    ConfigError,
    MessageError,
)
from minilora.core.files import json_type

ROLES = ("system", "user", "assistant")


def check_messages(turns: object, key: str = "messages", *, roles: Sequence[str] | None = ROLES,
                   exact: bool = False, non_empty: bool = True) -> list[dict[str, str]]:
    """Checks a conversation and returns it as ``[{"role", "content"}]`` (other keys dropped).

    Args:
        turns: the conversation as given.
        key: its field name, the start of every field an error names (``"conversations"``).
        roles: the roles allowed; None allows any one-line word (a model's own template may
            know others, such as "tool").
        exact: refuse a message with keys other than role and content.
        non_empty: refuse an empty conversation.

    Returns:
        The messages, in order.

    Raises:
        MessageError: naming the field at fault.
    """
    if isinstance(turns, (str, bytes)) or not isinstance(turns, (list, tuple)):
        raise MessageError(
            key, f"a {described_type(turns)}, expected a non-empty list of {{role, content}} "
            "objects", f"expected a list of {{'role', 'content'}} objects, got "
            f"{type(turns).__name__}")
    if non_empty and not turns:
        raise MessageError(key, "an empty list, expected a non-empty list of {role, content} "
                           "objects", "expected a non-empty list of {'role', 'content'} objects")
    return [_check_turn(turn, f"{key}[{i}]", roles, exact) for i, turn in enumerate(turns)]


def _check_turn(turn: object, where: str, roles: Sequence[str] | None,
                exact: bool) -> dict[str, str]:
    if not isinstance(turn, dict) or (exact and set(turn) != {"role", "content"}):
        wanted = "exactly 'role' and 'content'" if exact else "role and content"
        raise MessageError(where, f"a {described_type(turn)}, expected an object with {wanted}"
                           if not isinstance(turn, dict) else
                           f"expected an object with {wanted}")
    for name in ("role", "content"):
        if name not in turn:
            raise MessageError(f"{where}.{name}", "missing; expected a string")
    role, content = turn["role"], turn["content"]
    if roles is not None and role not in roles:
        shown = repr(role) if len(repr(role)) <= 40 else repr(role)[:37] + "..."
        raise MessageError(f"{where}.role", f"unknown role {shown}; expected one of "
                           f"{', '.join(roles)}", f"expected one of {tuple(roles)}, got {role!r}")
    if roles is None and (not isinstance(role, str) or not role or "\n" in role):
        raise MessageError(f"{where}.role", f"expected a word such as 'user', got {role!r}")
    if not isinstance(content, str):
        raise MessageError(f"{where}.content", f"a {described_type(content)}, expected a string",
                           f"expected a string, got {content!r}")
    for name, text in (("role", role), ("content", content)):
        problem = unicode_problem(text)
        if problem:
            raise MessageError(f"{where}.{name}", problem)
    return {"role": role, "content": content}


def unicode_problem(text: str) -> str | None:
    """What keeps a str from being encoded (a lone surrogate from a ``\\ud800`` JSON escape,
    which no tokenizer accepts), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = f"\\u{ord(text[err.start]):04x}"
        return (f"an unpaired surrogate {bad} at character {err.start}; expected valid Unicode "
                "text")
    return None


def described_type(value: object) -> str:
    """A parsed JSON value's type in the SFT reader's words ("JSON object", "list", "string",
    ...), which docs/reliability.md quotes."""
    kind = json_type(value)
    return {"object": "JSON object", "array": "list"}.get(kind, kind)
