"""Training data: SFT and plain-text jsonl files turned into token ids and labels, then batches.

One sample a line:

- chat (SFT): ``{"conversations": [{"role": "user", "content": ...}, ...]}`` (MiniMind) or
  ``{"messages": [...]}`` (OpenAI / Hugging Face); roles ``system``, ``user``, ``assistant``.
  Only the assistant replies and their end-of-turn token are trained (the mask comes from
  ``Tokenizer.encode_chat``: the model's chat template, else ChatML); every other label is -100.
- plain text: ``{"text": ...}``, every token trained (bos + text + eos), for training from scratch.

Labels are aligned with ``input_ids`` the Hugging Face way (the model shifts), so ``labels[0]`` of
a row can never be trained and is always -100: the number of trained tokens of a row is the number
of labels that are not -100, the same count the model's loss divides by.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from minilora.core.errors import DataError
from minilora.data.formats import (
    DATA_SUFFIXES,
    alpaca_messages,
    array_records,
    data_files,
    detect,
    is_json_array,
    mixed_formats,
    parquet_records,
    sharegpt_messages,
)
from minilora.data.messages import MessageError, check_messages, described_type, unicode_problem

IGNORE_INDEX = -100
# A line longer than this is refused without reading it whole (a 100 MB line is a broken file,
# not a conversation).
MAX_LINE_BYTES = 16 * 1024 * 1024
# How many skipped-line messages DataStats keeps for the report.
_KEPT_ERRORS = 5


class ChatTokenizer(Protocol):
    """What data.py needs from a tokenizer (minilora.data.tokenizer.Tokenizer provides it)."""

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def pad_token_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]: ...


@dataclass
class Sample:
    """One row of token ids and its labels (-100 where nothing is trained).

    ``segments`` (a packed row only) numbers the samples of the row from 1, one entry a token.
    """

    input_ids: list[int]
    labels: list[int]
    segments: list[int] | None = None

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class DataStats:
    """What reading a file kept, dropped and skipped."""

    lines: int = 0  # non-blank lines read
    samples: int = 0  # samples kept (before packing)
    skipped_bad: int = 0  # bad lines skipped (skip_bad=True)
    dropped_untrained: int = 0  # samples with no trained token left (after truncation)
    truncated: int = 0  # samples cut to max_seq_len
    tokens: int = 0  # tokens in the kept samples
    trained_tokens: int = 0  # of which trained
    errors: list[str] = field(default_factory=list)  # the first few skipped-line messages
    formats: dict[str, dict[str, int]] = field(default_factory=dict)  # file -> {format: records}
    template: str | None = None  # the chat template conversations were rendered with, in words


@dataclass
class Batch:
    """A batch padded on the right (pad ids, -100 labels); the model needs no mask for it."""

    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, -100 on padding and untrained tokens
    tokens: int  # real (non-pad) tokens
    trained_tokens: int  # labels that are not -100
    segment_ids: torch.Tensor | None = None  # (B, T) packed rows: 1, 2, ... per sample, 0 on pad

    def to(self, device: torch.device | str) -> Batch:
        """Return the batch with its tensors moved to ``device``."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(self.input_ids.to(device, non_blocking=True),
                     self.labels.to(device, non_blocking=True), self.tokens, self.trained_tokens,
                     move(self.segment_ids))


class JsonlDataset(torch.utils.data.Dataset[Sample]):
    """Tokenized samples of one jsonl file (see load_jsonl), indexable like any Dataset.

    Attributes:
        path: the file read.
        samples: the rows (packed rows when ``packed``).
        pad_id: the id collate pads with.
        max_seq_len: the longest row.
        packed: whether samples were packed into rows of max_seq_len.
        stats: what was kept, dropped and skipped.
    """

    def __init__(
        self,
        samples: list[Sample],
        *,
        pad_id: int,
        max_seq_len: int,
        path: str = "",
        packed: bool = False,
        stats: DataStats | None = None,
    ) -> None:
        self.samples = samples
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len
        self.path = path
        self.packed = packed
        self.stats = stats if stats is not None else DataStats(samples=len(samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def collate(self, indices: Sequence[int]) -> Batch:
        """The batch of the samples at ``indices``, padded to the longest of them."""
        return collate([self.samples[i] for i in indices], self.pad_id)


def load_jsonl(
    path: str | Path,
    tokenizer: ChatTokenizer,
    max_seq_len: int,
    *,
    skip_bad: bool = False,
    pack: bool = False,
) -> JsonlDataset:
    """Read and tokenize a chat or plain-text jsonl file.

    Args:
        path: the .jsonl file, one JSON object a line (blank lines are ignored).
        tokenizer: provides ``encode_chat`` (chat lines) and ``encode`` (text lines).
        max_seq_len: samples are cut to this many tokens; one left with nothing to train is
            dropped and counted in ``stats.dropped_untrained``.
        skip_bad: skip bad lines (counted in ``stats.skipped_bad``) instead of raising.
        pack: pack the samples into rows of ``max_seq_len`` (see ``pack_samples``).

    Returns:
        The dataset, with ``stats``.

    Raises:
        DataError: a missing file, a folder, an empty file, a bad line (unless skip_bad), no
            assistant turn anywhere, or no sample left after truncation.
    """
    if max_seq_len < 2:
        raise DataError(path, f"max_seq_len must be at least 2, got {max_seq_len}")
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found; expected a .jsonl, .json or .parquet file or a "
                        "folder of them")
    stats = DataStats()
    describe = getattr(tokenizer, "describe_template", None)  # a Tokenizer; a stand-in may lack it
    stats.template = describe() if callable(describe) else None
    samples: list[Sample] = []
    for file in data_files(path):
        kinds = {"chat": 0, "text": 0, "assistant": 0}
        before, kept_before = stats.lines, len(samples)
        formats = stats.formats.setdefault(str(file), {})
        for line_no, record in read_records(file, stats, skip_bad):
            try:
                sample = _parse_record(record, file, line_no, tokenizer, kinds, formats)
            except DataError as err:
                if not skip_bad:
                    raise
                count_skipped(err, stats)
                continue
            _keep(sample, max_seq_len, samples, stats)
        _check_file(file, stats, kinds, max_seq_len, lines=stats.lines - before,
                    kept=len(samples) - kept_before)
    stats.samples = len(samples)
    if pack:
        samples = pack_samples(samples, max_seq_len)
    pad_id = next(
        (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0
    )
    return JsonlDataset(
        samples, pad_id=pad_id, max_seq_len=max_seq_len, path=str(path), packed=pack, stats=stats
    )


def read_records(path: Path, stats: DataStats, skip_bad: bool) -> Iterator[tuple[int, Any]]:
    """(line or row number, record: JSON text of a line, or a parsed item) of any data file
    (JSON Lines, a JSON array, Parquet), counting lines in ``stats``.

    Raises:
        DataError: a file that is not regular, or a bad line (unless skip_bad: then counted).
    """
    if path.exists() and not path.is_dir() and not path.is_file():
        # a FIFO or a device never ends: refused before any reader (JSON array, Parquet) opens it
        raise DataError(path, "is not a regular file (a pipe or a device has no end); expected "
                              f"a {path.suffix if path.suffix in DATA_SUFFIXES else '.jsonl'} "
                              "file")
    if path.suffix == ".parquet":
        items = parquet_records(path)
    elif is_json_array(path):
        items = array_records(path)
    else:
        yield from _read_lines(path, stats, skip_bad)
        return
    for number, item in items:
        stats.lines += 1
        yield number, item


def _read_lines(path: Path, stats: DataStats, skip_bad: bool) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, decoded line) for each non-blank line."""
    if not path.exists():
        raise DataError(path, "file not found; expected a .jsonl file")
    if path.is_dir():
        raise DataError(path, "is a folder; expected a .jsonl file")
    if not path.is_file():  # a FIFO or a device (/dev/zero, /dev/urandom) never ends
        raise DataError(path, "is not a regular file (a pipe or a device has no end); expected "
                              "a .jsonl file")
    with open(path, "rb") as f:
        line_no = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            line_no += 1
            try:
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    _skip_rest_of_line(f)
                    raise DataError(
                        path,
                        f"line longer than {MAX_LINE_BYTES} bytes; expected one JSON object "
                        "per line",
                        line=line_no,
                    )
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        path,
                        f"byte {err.start} is not UTF-8 ({raw[err.start:err.start + 1]!r}); "
                        "expected UTF-8 text",
                        line=line_no,
                    ) from None
            except DataError as err:
                if not skip_bad:
                    raise
                stats.lines += 1
                count_skipped(err, stats)
                continue
            if text.strip():
                stats.lines += 1
                yield line_no, text


def count_skipped(err: DataError, stats: DataStats) -> None:
    """Counts a bad line as skipped, keeping the first few messages.

    The caller raises (a bare ``raise``) when it does not skip: raising ``err`` in here would tie
    it to this frame, and through the traceback keep the reader's frame and its line buffer (up
    to MAX_LINE_BYTES) alive until the garbage collector runs.
    """
    stats.skipped_bad += 1
    if len(stats.errors) < _KEPT_ERRORS:
        stats.errors.append(str(err))


def _skip_rest_of_line(f: Any) -> None:
    # Small pieces: readline(n) may hold 2n bytes while it reads; a skipped line needs no more.
    while True:
        chunk = f.readline(1 << 20)
        if not chunk or chunk.endswith(b"\n"):
            return


def _parse_record(
    record: Any, path: Path, line_no: int, tokenizer: ChatTokenizer, kinds: dict[str, int],
    formats: dict[str, int],
) -> Sample:
    """One line (JSON text) or one parsed record -> one untruncated Sample (labels[0] -100)."""

    def fail(message: str, field: str | None = None) -> DataError:
        return DataError(path, message, line=line_no, field=field)

    obj = record
    if isinstance(record, str):
        try:
            obj = json.loads(record)
        except RecursionError:
            raise fail("JSON nested too deeply; expected one flat JSON object") from None
        except ValueError as err:  # JSONDecodeError, and int-too-long errors
            raise fail(f"not valid JSON ({err}); expected one JSON object per line") from None
    if not isinstance(obj, dict):
        raise fail(f"a JSON {type(obj).__name__}, expected a JSON object")

    mixed = mixed_formats(obj)
    if mixed:
        raise fail(mixed)
    kind = detect(obj)
    if kind is None and "chosen" in obj and "rejected" in obj:
        raise fail("a preference pair (chosen and rejected answers), not an SFT record; train "
                   "pairs with the dpo or simpo method (minilora train --method dpo)")
    if kind is None:
        found = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        raise fail(
            f"no 'conversations', 'messages', 'instruction' or 'text' key (keys found: {found}); "
            'expected {"conversations": [{"role": ..., "content": ...}, ...]}, ShareGPT '
            '{"conversations": [{"from": ..., "value": ...}]}, Alpaca {"instruction": ..., '
            '"output": ...} or {"text": ...}'
        )
    formats[kind] = formats.get(kind, 0) + 1
    if kind in ("sharegpt", "alpaca"):
        turns = (alpaca_messages(obj, fail) if kind == "alpaca"
                 else sharegpt_messages(obj["conversations"], fail))
        obj = {"conversations": turns}
    key = next((k for k in ("conversations", "messages") if k in obj), None)
    if key is None:
        if not isinstance(obj["text"], str):
            raise fail(f"a {described_type(obj['text'])}, expected a string", "text")
        problem = unicode_problem(obj["text"])
        if problem:
            raise fail(problem, "text")
        kinds["text"] += 1
        ids = tokenizer.encode(obj["text"])
        ids = [i for i in (tokenizer.bos_token_id,) if i is not None] + ids
        ids += [i for i in (tokenizer.eos_token_id,) if i is not None]
        return _sample(ids, [1] * len(ids))

    try:
        messages = check_messages(obj[key], key)
    except MessageError as err:
        raise fail(err.said, err.field) from None
    kinds["chat"] += 1
    kinds["assistant"] += any(m["role"] == "assistant" for m in messages)
    ids, mask = tokenizer.encode_chat(messages)
    return _sample(ids, mask)


def _sample(ids: list[int], mask: list[int]) -> Sample:
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    if labels:
        labels[0] = IGNORE_INDEX  # nothing predicts the first token of a row
    return Sample(list(ids), labels)


def _keep(sample: Sample, max_seq_len: int, samples: list[Sample], stats: DataStats) -> None:
    if len(sample.input_ids) > max_seq_len:
        stats.truncated += 1
        sample = Sample(sample.input_ids[:max_seq_len], sample.labels[:max_seq_len])
    trained = sample.trained_tokens
    if trained == 0:
        stats.dropped_untrained += 1
        return
    samples.append(sample)
    stats.tokens += len(sample.input_ids)
    stats.trained_tokens += trained


def _check_file(path: Path, stats: DataStats, kinds: dict[str, int], max_seq_len: int, *,
                lines: int, kept: int) -> None:
    """File-level errors, raised even with skip_bad (each file of a folder on its own: ``lines``
    and ``kept`` are this file's)."""
    if lines == 0:
        raise DataError(path, "the file is empty; expected one JSON object per line")
    if kinds["chat"] and not kinds["assistant"] and not kinds["text"]:
        raise DataError(
            path,
            "no conversation has an assistant turn; SFT trains only the assistant replies, "
            "so each conversation needs at least one",
        )
    if kept:  # at least one sample of this file kept
        return
    if stats.dropped_untrained:
        raise DataError(
            path,
            f"no sample has a trained token left after truncation to max_seq_len={max_seq_len} "
            f"({stats.dropped_untrained} dropped); raise max_seq_len or shorten the prompts",
        )
    raise DataError(path, f"no valid line ({stats.skipped_bad} skipped); first: {stats.errors[0]}")


def pack_samples(samples: Sequence[Sample], max_seq_len: int) -> list[Sample]:
    """Pack whole samples into rows of at most ``max_seq_len`` tokens, each kept apart.

    Each sample goes, in order, into the first row with room for it (first fit), so a row holds
    several samples end to end and no sample is ever split. A packed row records which sample each
    token belongs to (``Sample.segments``); the model then attends only within a sample (a
    block-diagonal causal mask) and counts positions from 0 in each, as the varlen attention
    packers do, so a packed sample computes what it computes alone.

    Args:
        samples: rows of at most max_seq_len tokens, ``labels[0] == -100`` each.
        max_seq_len: the longest row.

    Returns:
        The packed rows, in the order their first sample came.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []  # (ids, labels, segments)
    for sample in samples:
        n = len(sample.input_ids)
        row = next((r for r in rows if len(r[0]) + n <= max_seq_len), None)
        if row is None:
            row = ([], [], [])
            rows.append(row)
        ids, labels, segments = row
        segment = segments[-1] + 1 if segments else 1
        ids += sample.input_ids
        labels += sample.labels
        segments += [segment] * n
    return [Sample(ids, labels, segments) for ids, labels, segments in rows]


def collate(samples: Sequence[Sample], pad_id: int) -> Batch:
    """Pad samples on the right to the longest of them.

    Args:
        samples: the rows of the batch.
        pad_id: the token id of the padding (its labels are -100).

    Returns:
        The Batch.
    """
    longest = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    packed = any(s.segments is not None for s in samples)
    segment_ids = torch.zeros((len(samples), longest), dtype=torch.long) if packed else None
    tokens = trained = 0
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(s.labels, dtype=torch.long)
        if segment_ids is not None:
            segment_ids[row, :n] = torch.tensor(s.segments or [1] * n, dtype=torch.long)
        tokens += n
        trained += s.trained_tokens
    return Batch(input_ids, labels, tokens, trained, segment_ids)


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled sample order of one epoch: a function of (seed, epoch) alone.

    It draws from its own generator, so nothing else that uses random numbers changes it, and a
    run resumed at (epoch, batch) sees the same order as one that never stopped.
    """
    order = list(range(num_samples))
    random.Random(f"minilora:{seed}:{epoch}").shuffle(order)
    return order


def batch_indices(
    num_samples: int, batch_size: int, *, seed: int, epoch: int
) -> list[list[int]]:
    """The batches of one epoch, in order: shuffled with ``epoch_order``, the last partial
    batch dropped (so every step sees ``batch_size`` samples).

    Args:
        num_samples: the dataset size.
        batch_size: samples per batch (the global batch of one optimizer step).
        seed: the run's seed.
        epoch: the epoch number, from 0.

    Returns:
        ``num_samples // batch_size`` lists of sample indices.
    """
    order = epoch_order(num_samples, seed, epoch)
    return [
        order[start : start + batch_size]
        for start in range(0, num_samples - batch_size + 1, batch_size)
    ]
