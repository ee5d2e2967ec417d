"""Task accuracy: held-out question files, answer matching, before/after tables.

An eval file is JSON Lines (UTF-8), one sample per line; blank lines are skipped::

    {"task": "persona", "messages": [{"role": "user", "content": "What shall I call you?"}],
     "expected": "Nova", "match": "contains"}

Fields of a sample:

- ``task``: non-empty string; the row of the report the sample counts toward.
- ``messages`` (or ``conversations``, the SFT files' name; exactly one of the two): a non-empty
  list of ``{"role": "system" | "user" | "assistant", "content": str}``, ending with a user turn.
  The model's reply to these messages is what gets scored.
- ``expected``: non-empty string.
- ``match``: ``"exact"`` or ``"contains"``.
- ``id``: optional string, carried into the report.

Any other key is an error, so a typo (``"expect"``) is caught instead of silently scored.

Matching:

- ``exact``: both sides normalised by :func:`normalize_answer` (Unicode NFKC, whitespace runs
  collapsed to one space, ends stripped, trailing ``. ! ?`` dropped) and compared **with case**,
  because upper-casing a word is one of the skills scored.
- ``contains``: the words of ``expected`` (runs of letters and digits, case-folded) occur as a
  contiguous run in the words of the answer: ``"Nova"`` is found in ``"I am nova!"`` but not in
  ``"I am Novak"``.

This module is pure Python: the model is reached only through ``answer_fn``, a function from a
list of chat messages to the reply text.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minilora.core.errors import TaskError
from minilora.core.files import parse_json, read_bounded
from minilora.data.messages import MessageError, check_messages

MATCH_KINDS = ("exact", "contains")
_FIELDS = ("task", "messages", "conversations", "expected", "match", "id")
# An eval file is questions and answers: a few MB at most. Read whole, so bounded.
MAX_TASKS_BYTES = 64 << 20
_WORD = re.compile(r"[^\W_]+")  # letters and digits; punctuation and "_" separate words
_TRAILING_PUNCT = re.compile(r"[.!?]+$")

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class EvalSample:
    """One scored question: the messages to answer and how to judge the reply."""

    task: str
    # (role, content) pairs; a tuple so that a sample can be shared without being changed
    messages: tuple[tuple[str, str], ...]
    expected: str
    match: str
    id: str | None = None
    source: str = ""  # "file:line" where it was read, for messages

    def chat(self) -> Messages:
        """The messages as the list of ``{"role", "content"}`` dicts a chat template takes."""
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True)
class Result:
    """A sample, the reply it got and whether the reply matched."""

    sample: EvalSample
    answer: str
    correct: bool


@dataclass(frozen=True)
class TaskScore:
    """Counts for one task."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


@dataclass
class TaskReport:
    """Every result of one scoring run, with per-task and pooled accuracy."""

    results: list[Result] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        """Task names in the order they first appear."""
        return list(dict.fromkeys(r.sample.task for r in self.results))

    def score(self, tasks: str | Iterable[str] | None = None) -> TaskScore:
        """Correct and total over one task, several (pooled per sample), or all when None."""
        if isinstance(tasks, str):
            tasks = [tasks]
        wanted = None if tasks is None else set(tasks)
        chosen = [r for r in self.results if wanted is None or r.sample.task in wanted]
        return TaskScore(sum(r.correct for r in chosen), len(chosen))

    def accuracy(self, tasks: str | Iterable[str] | None = None) -> float:
        """Fraction correct over the given tasks (all when None); NaN when there are no samples."""
        return self.score(tasks).accuracy

    @property
    def per_task(self) -> dict[str, TaskScore]:
        return {t: self.score(t) for t in self.tasks}

    def to_dict(self) -> dict[str, Any]:
        """Counts and accuracies, ready for json (metrics.jsonl)."""
        tasks = {
            t: {"correct": s.correct, "total": s.total, "accuracy": s.accuracy}
            for t, s in self.per_task.items()
        }
        return {"tasks": tasks, "accuracy": self.accuracy(), "total": len(self.results)}


def normalize_answer(text: str) -> str:
    """Normalise a reply for ``exact`` matching (case is kept).

    Args:
        text: a model reply or an expected answer.

    Returns:
        NFKC form with whitespace runs collapsed to one space, ends stripped and trailing
        ``. ! ?`` removed.
    """
    text = " ".join(unicodedata.normalize("NFKC", text).split())
    return _TRAILING_PUNCT.sub("", text).rstrip()


def _words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def is_correct(answer: str, expected: str, match: str) -> bool:
    """Whether ``answer`` matches ``expected`` under ``match`` (see the module docstring).

    Raises:
        TaskError: ``match`` is not one of ``MATCH_KINDS``.
    """
    if match == "exact":
        return normalize_answer(answer) == normalize_answer(expected)
    if match == "contains":
        want, got = _words(expected), _words(answer)
        if not want:
            return False
        return any(got[i : i + len(want)] == want for i in range(len(got) - len(want) + 1))
    raise TaskError(f"match {match!r} is not one of {MATCH_KINDS}")


def parse_sample(obj: object, where: str = "<sample>") -> EvalSample:
    """Check one decoded JSON object against the eval format and build an :class:`EvalSample`.

    Args:
        obj: the decoded line.
        where: ``"file:line"`` used in error messages.

    Returns:
        The sample.

    Raises:
        TaskError: naming ``where``, the field and what was expected.
    """

    def fail(fld: str, what: str) -> TaskError:
        return TaskError(f"{where}: field {fld!r}: {what}")

    if not isinstance(obj, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise fail(unknown[0], f"unknown field; valid fields are {', '.join(_FIELDS)}")
    for name in ("task", "expected", "match"):
        if name not in obj:
            raise fail(name, "missing")
        if not isinstance(obj[name], str) or not obj[name].strip():
            raise fail(name, f"expected a non-empty string, got {obj[name]!r}")
    if obj["match"] not in MATCH_KINDS:
        raise fail("match", f"expected one of {MATCH_KINDS}, got {obj['match']!r}")
    if obj["match"] == "contains" and not _words(obj["expected"]):
        raise fail("expected", "a 'contains' answer needs at least one letter or digit")
    if "id" in obj and not isinstance(obj["id"], str):
        raise fail("id", f"expected a string, got {obj['id']!r}")

    keys = [k for k in ("messages", "conversations") if k in obj]
    if len(keys) != 1:
        raise fail("messages", "give exactly one of 'messages' or 'conversations'")
    key = keys[0]
    try:
        messages = [(m["role"], m["content"]) for m in check_messages(obj[key], key, exact=True)]
    except MessageError as err:
        raise fail(err.field, err.expected) from None
    if messages[-1][0] != "user":
        raise fail(key, f"the last turn must be 'user' (the question), got {messages[-1][0]!r}")
    return EvalSample(
        task=obj["task"],
        messages=tuple(messages),
        expected=obj["expected"],
        match=obj["match"],
        id=obj.get("id"),
        source=where,
    )


def load_samples(path: str | Path) -> list[EvalSample]:
    """Read an eval file.

    Args:
        path: a ``.jsonl`` file in the format of the module docstring.

    Returns:
        The samples in file order.

    Raises:
        TaskError: the file is missing, not UTF-8, a line is not JSON or breaks the format, or
            the file holds no sample; the message names the file and line.
    """
    path = Path(path)
    try:
        text = read_bounded(path, MAX_TASKS_BYTES, "an eval (tasks) .jsonl file").decode("utf-8")
    except FileNotFoundError:
        raise TaskError(f"{path}: no such eval file") from None
    except OSError as e:  # a FIFO, a device, a folder, or too large: never read whole
        raise TaskError(str(e)) from None
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    samples = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = parse_json(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        except ValueError as e:  # too deep, an integer too long
            raise TaskError(f"{where}: not valid JSON ({e})") from None
        samples.append(parse_sample(obj, where))
    if not samples:
        raise TaskError(f"{path}: holds no samples")
    return samples


def score(
    samples: Iterable[EvalSample],
    answer_fn: Callable[[Messages], str] | Callable[[Messages], list[str]],
    *,
    on_result: Callable[[Result], None] | None = None,
) -> TaskReport:
    """Ask every sample's question and judge the replies.

    Args:
        samples: what to ask (from :func:`load_samples`).
        answer_fn: maps chat messages (``[{"role", "content"}, ...]``, ending with the user's
            question) to the model's reply text, or to a list of sampled replies (each scored:
            the accuracy is then the share of replies that are right); it gets a fresh list
            per sample.
        on_result: called after each sample (with its last result), e.g. to show progress.

    Returns:
        A :class:`TaskReport` with one result per sample, in order.

    Raises:
        TaskError: ``answer_fn`` returned something that is not a string.
    """
    report = TaskReport()
    for sample in samples:
        answer = answer_fn(sample.chat())
        answers = answer if isinstance(answer, list) else [answer]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise TaskError(f"{sample.source}: answer_fn returned {type(answer).__name__}, "
                            "expected str or a non-empty list of str")
        for text in answers:  # several sampled replies: each is scored, a share of them right
            result = Result(sample, text, is_correct(text, sample.expected, sample.match))
            report.results.append(result)
        if on_result is not None:
            on_result(result)
    return report


def retention(before: TaskReport, after: TaskReport, tasks: Iterable[str] | None = None) -> float:
    """After-accuracy as a fraction of before-accuracy over ``tasks`` (all of before's when None).

    Returns NaN when the before-accuracy is 0 (nothing to retain).
    """
    tasks = before.tasks if tasks is None else list(tasks)
    base = before.accuracy(tasks)
    return after.accuracy(tasks) / base if base else float("nan")


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"  # x != x: NaN, no samples


def format_table(
    reports: Mapping[str, TaskReport],
    *,
    groups: Mapping[str, Sequence[str]] | None = None,
    ratio: bool = False,
) -> str:
    """A plain-text table of accuracy: one row per task, one column per report.

    Args:
        reports: column label -> report, e.g. ``{"before": r0, "after": r1}``.
        groups: extra rows pooling several tasks, e.g. ``{"base skills": ["add", "sub"]}``.
        ratio: add a column with the last report's accuracy divided by the first's
            (retention, when the first is the base model).

    Returns:
        The table, columns aligned, no trailing newline.
    """
    labels = list(reports)
    tasks = list(dict.fromkeys(t for rep in reports.values() for t in rep.tasks))
    rows: list[tuple[str, list[str] | None]] = [(t, [t]) for t in tasks]
    rows += [(name, list(members)) for name, members in (groups or {}).items()]

    header = ["task", "n", *labels] + ([f"{labels[-1]}/{labels[0]}"] if ratio else [])
    table = [header]
    for name, members in rows:
        scores = [rep.score(members) for rep in reports.values()]
        n = next((s.total for s in scores if s.total), 0)
        cells = [name, str(n), *(_pct(s.accuracy) for s in scores)]
        if ratio:
            first, last = scores[0].accuracy, scores[-1].accuracy
            cells.append(_pct(last / first) if first else "-")
        table.append(cells)

    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for k, row in enumerate(table):
        # task names left-aligned, numbers right-aligned so the decimal points line up
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
