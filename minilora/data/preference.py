"""Preference data: pairs of a chosen and a rejected answer to one prompt, tokenized for DPO.

A record (one JSON object, in JSON Lines, a JSON array or Parquet, as the SFT files) is one of:

- chosen/rejected conversations (MiniMind's DPO file, TRL's conversational implicit prompt):
  ``{"chosen": [messages], "rejected": [messages]}``, the two conversations equal up to their
  last message, the answer (an assistant message);
- prompt/chosen/rejected (TRL's explicit prompt): ``{"prompt": ..., "chosen": ...,
  "rejected": ...}``, each a string (the prompt a user message, the answers assistant messages)
  or a list of messages (the answers' lists end with the answer).

Only the last answer of each side is trained (its tokens as the chat template's assistant mask
marks them, with its end-of-turn token); an earlier assistant turn is part of the prompt. A pair
longer than max_seq_len has its answers cut at the end, never its prompt: a prompt that leaves
no answer token is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minilora.core.errors import DataError
from minilora.data.formats import data_files, detect
from minilora.data.messages import MessageError, check_messages
from minilora.data.sft import (
    IGNORE_INDEX,
    Batch,
    ChatTokenizer,
    DataStats,
    JsonlDataset,
    Sample,
    collate,
    count_skipped,
    read_records,
)

PAIR_FORMATS = ("chosen/rejected conversations", "prompt/chosen/rejected")


@dataclass
class Pair:
    """A chosen and a rejected row of one prompt (each with -100 outside its answer)."""

    chosen: Sample
    rejected: Sample

    # The pair read as one row, for what counts rows and hashes them (the batch plan, a
    # checkpoint's data hash): both rows' ids and labels, the rejected after the chosen.
    @property
    def input_ids(self) -> list[int]:
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def labels(self) -> list[int]:
        return self.chosen.labels + self.rejected.labels

    @property
    def trained_tokens(self) -> int:
        return self.chosen.trained_tokens + self.rejected.trained_tokens


class PairDataset(JsonlDataset):
    """Preference pairs (see ``load_pairs``); ``collate`` gives one Batch of 2 x B rows: the B
    chosen rows, then the B rejected rows in the same order, so chosen and rejected run as one
    forward."""

    samples: list[Pair]  # type: ignore[assignment]

    def collate(self, indices: Sequence[int]) -> Batch:
        """The chosen rows of the pairs at ``indices``, then their rejected rows, padded."""
        pairs = [self.samples[i] for i in indices]
        return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], self.pad_id)


def load_pairs(path: str | Path, tokenizer: ChatTokenizer, max_seq_len: int, *,
               skip_bad: bool = False) -> PairDataset:
    """Read and tokenize a preference file (or a folder of them).

    Args:
        path: a .jsonl, .json or .parquet file, or a folder of them.
        tokenizer: provides ``encode_chat``.
        max_seq_len: each row's most tokens; longer answers are cut at the end (counted in
            ``stats.truncated``).
        skip_bad: skip bad records (counted in ``stats.skipped_bad``) instead of raising.

    Returns:
        The PairDataset; ``stats.formats`` says which format each file was read as.

    Raises:
        DataError: a missing or empty file, a record that is not a pair (an SFT record says so),
            prompts that differ, an empty answer, two identical answers, a prompt that leaves no
            room for an answer within max_seq_len: naming file, line and field.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found; expected a .jsonl, .json or .parquet file of "
                        "preference pairs or a folder of them")
    stats = DataStats()
    pairs: list[Pair] = []
    for file in data_files(path):
        lines_before, kept_before = stats.lines, len(pairs)
        formats = stats.formats.setdefault(str(file), {})
        for line_no, record in read_records(file, stats, skip_bad):
            try:
                pair, kind, cut = _parse_pair(record, file, line_no, tokenizer, max_seq_len)
            except DataError as err:
                if not skip_bad:
                    raise
                count_skipped(err, stats)
                continue
            formats[kind] = formats.get(kind, 0) + 1
            stats.truncated += cut
            stats.tokens += len(pair.input_ids)
            stats.trained_tokens += pair.trained_tokens
            pairs.append(pair)
        if stats.lines == lines_before:
            raise DataError(file, "the file is empty; expected one preference pair per line")
        if len(pairs) == kept_before:
            raise DataError(file, f"no valid pair ({stats.skipped_bad} skipped); first: "
                            f"{stats.errors[0] if stats.errors else 'none'}")
    stats.samples = len(pairs)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None),
                  0)
    # a Pair is this dataset's sample (PairDataset.samples says so)
    return PairDataset(pairs, pad_id=pad_id,  # type: ignore[arg-type]
                       max_seq_len=max_seq_len, path=str(path), stats=stats)


def _parse_pair(record: Any, path: Path, line_no: int, tokenizer: ChatTokenizer,
                max_seq_len: int) -> tuple[Pair, str, int]:
    """One record -> (its Pair, its format, how many of its two rows were cut)."""

    def fail(message: str, field: str | None = None) -> DataError:
        return DataError(path, message, line=line_no, field=field)

    obj = record
    if isinstance(record, str):
        try:
            obj = json.loads(record)
        except RecursionError:
            raise fail("JSON nested too deeply; expected one flat JSON object") from None
        except ValueError as err:
            raise fail(f"not valid JSON ({err}); expected one JSON object per line") from None
    if not isinstance(obj, dict):
        raise fail(f"a JSON {type(obj).__name__}, expected a JSON object")
    if "chosen" not in obj or "rejected" not in obj:
        if detect(obj) is not None:
            raise fail("an SFT record, not a preference pair; preference training needs "
                       '{"chosen": ..., "rejected": ...} answers (train SFT data with the sft '
                       "method)")
        found = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        raise fail(f"no 'chosen' and 'rejected' keys (keys found: {found}); expected "
                   '{"chosen": [messages], "rejected": [messages]} or {"prompt": ..., '
                   '"chosen": ..., "rejected": ...}')
    kind = PAIR_FORMATS[1] if "prompt" in obj else PAIR_FORMATS[0]
    try:
        prompt = _prompt(obj) if "prompt" in obj else []
        sides = [prompt + _answer(obj[key], key, "prompt" in obj) for key in ("chosen",
                                                                               "rejected")]
    except MessageError as err:
        raise fail(err.said, err.field) from None
    _check_pair(sides, "prompt" in obj, fail)
    rows = [_answer_row(tokenizer.encode_chat(side), max_seq_len, fail) for side in sides]
    return Pair(rows[0][0], rows[1][0]), kind, rows[0][1] + rows[1][1]


def _prompt(obj: dict[str, Any]) -> list[dict[str, str]]:
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return check_messages(prompt, "prompt")


def _answer(value: Any, key: str, explicit_prompt: bool) -> list[dict[str, str]]:
    """One side as messages: a string is one assistant answer (with a prompt given)."""
    if isinstance(value, str):
        if not explicit_prompt:
            raise MessageError(key, "a string without a 'prompt'; expected a conversation "
                               "(a list of messages ending with the answer), or give the "
                               "prompt as 'prompt'")
        return [{"role": "assistant", "content": value}]
    return check_messages(value, key)


def _check_pair(sides: list[list[dict[str, str]]], explicit_prompt: bool, fail: Any) -> None:
    """Both sides end with a non-empty assistant answer, the answers differ, and what comes
    before them (the prompt) is the same."""
    for key, side in zip(("chosen", "rejected"), sides, strict=True):
        last = side[-1]
        where = key if explicit_prompt else f"{key}[{len(side) - 1}]"
        if last["role"] != "assistant":
            raise fail(f"the last message is a {last['role']} message; expected the answer, an "
                       "assistant message", f"{where}.role" if not explicit_prompt else where)
        if not last["content"].strip():
            raise fail("an empty answer; a pair needs two non-empty answers",
                       f"{where}.content" if not explicit_prompt else where)
    chosen, rejected = sides
    if chosen[:-1] != rejected[:-1]:
        pairs = zip(chosen[:-1], rejected[:-1], strict=False)  # one may be longer
        at = next((i for i, (a, b) in enumerate(pairs) if a != b),
                  min(len(chosen), len(rejected)) - 1)
        field = f"rejected[{at}]" if not explicit_prompt else "rejected"
        raise fail("the prompt differs from chosen's (message "
                   f"{at + 1}); a pair is two answers to one prompt", field)
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise fail("the same answer as chosen's; a pair needs two different answers",
                   "rejected")


def _answer_row(encoded: tuple[list[int], list[int]], max_seq_len: int, fail: Any
                ) -> tuple[Sample, int]:
    """The row's Sample, labels only on the last answer (the last run of the assistant mask),
    cut to max_seq_len at the answer's end; and 1 when it was cut."""
    ids, mask = encoded
    end = max(i for i, m in enumerate(mask) if m) + 1 if any(mask) else 0
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    if end == 0:
        raise fail("the answer has no token the chat template marks as the assistant's")
    if start >= max_seq_len:
        raise fail(f"the prompt is {start} tokens, leaving no answer token within "
                   f"max_seq_len={max_seq_len}; raise max_seq_len or shorten the prompt",
                   "prompt")
    labels = [t if start <= i < end and i > 0 else IGNORE_INDEX for i, t in enumerate(ids)]
    cut = int(len(ids) > max_seq_len)
    return Sample(ids[:max_seq_len], labels[:max_seq_len]), cut
