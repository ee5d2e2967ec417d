"""Questions to ask a model: what `minilora replay` answers with the base's own replies.

A questions file is one of:

- ``.txt``: one question a line (blank lines skipped);
- ``.jsonl``: one JSON object a line, which is a tasks record (``messages`` or ``conversations``
  and ``expected``), a training record (chat, ShareGPT or Alpaca: the conversation up to its
  first user turn is asked, the data's own answer left out), or ``{"prompt": ...}`` /
  ``{"question": ...}``.

Each question comes back as chat messages ending with the user's turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minilora.core.errors import DataError
from minilora.core.files import parse_json, read_bounded
from minilora.data.formats import SHAREGPT_ROLES, detect
from minilora.data.messages import MessageError, check_messages

MAX_QUESTIONS_BYTES = 64 << 20  # read whole: questions are short; 64 MiB is a million of them

Messages = list[dict[str, str]]


def load_questions(path: str | Path) -> list[Messages]:
    """The questions of one file, each as chat messages ending with a user turn.

    Raises:
        DataError: the file is missing, too large, not UTF-8, or a line is not a question
            (naming the file, the line and what was expected); or it holds no question.
    """
    path = Path(path)
    try:
        text = read_bounded(path, MAX_QUESTIONS_BYTES, "a questions file").decode("utf-8")
    except FileNotFoundError:
        raise DataError(path, "file not found; expected a .txt (one question a line) or a "
                              ".jsonl of questions, tasks or conversations") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"byte {e.start} is not UTF-8; expected UTF-8 text") from None
    except OSError as e:  # a folder, a FIFO, too large: never read whole
        raise DataError(path, str(e)) from None
    questions = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            questions.append([{"role": "user", "content": line.strip()}])
        else:
            questions.append(_question(parse_line(path, number, line), path, number))
    if not questions:
        raise DataError(path, "holds no question")
    return questions


def parse_line(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        obj = parse_json(line)
    except ValueError as e:  # invalid, too deep, an integer too long
        raise DataError(path, f"not valid JSON ({e}); expected one JSON object a line (a .txt "
                              "file takes one question a line)", line=number) from None
    if not isinstance(obj, dict):
        raise DataError(path, "expected a JSON object", line=number)
    return obj


def _question(obj: dict[str, Any], path: Path, number: int) -> Messages:
    """One record as the messages to ask: through its first user turn."""
    for key in ("prompt", "question"):
        if isinstance(obj.get(key), str) and obj[key].strip():
            return [{"role": "user", "content": obj[key]}]
    kind = detect(obj)
    if kind == "alpaca":
        instruction, extra = obj.get("instruction"), obj.get("input")
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(path, "expected a non-empty string", line=number,
                            field="instruction")
        content = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra else instruction
        system = obj.get("system")
        head = [{"role": "system", "content": system}] if isinstance(system, str) else []
        return [*head, {"role": "user", "content": content}]
    if kind in ("chat", "sharegpt"):
        key = "conversations" if "conversations" in obj else "messages"
        turns = obj[key]
        if kind == "sharegpt":
            turns = [{"role": SHAREGPT_ROLES.get(str(t.get("from")), t.get("from")),
                      "content": t.get("value")} if isinstance(t, dict) else t for t in turns]
        try:
            messages = check_messages(turns, key)
        except MessageError as e:
            raise DataError(path, e.said, line=number, field=e.field) from None
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first_user is None:
            raise DataError(path, "no user turn to ask", line=number, field=key)
        return [{"role": m["role"], "content": m["content"]} for m in messages[:first_user + 1]]
    raise DataError(path, f"no question here (keys found: {', '.join(map(repr, obj)) or 'none'}); "
                          'expected {"prompt": ...}, {"question": ...}, a tasks record or a '
                          "chat, ShareGPT or Alpaca record", line=number)
