"""What a run trains on: the datasets a TrainConfig names, and which rows each process takes at
each step (the batch plan, a function of seed and step, so a resumed run sees what an
uninterrupted one saw).
"""

from __future__ import annotations

import array
import hashlib
import random
import sys
from typing import Any

from torch import nn

from minilora.core.errors import ConfigError, DataError
from minilora.data.preference import load_pairs
from minilora.data.sft import JsonlDataset, batch_indices, load_jsonl, pack_samples
from minilora.data.tokenizer import Tokenizer
from minilora.lora.embedding import LoRAEmbedding
from minilora.training.config import TrainConfig


def load_datasets(config: TrainConfig, tokenizer: Tokenizer
                  ) -> tuple[JsonlDataset, JsonlDataset | None]:
    """The datasets a config names: its training data (with its replay mixed in), and its eval
    data (None without one), tokenized with ``tokenizer``.

    Returns:
        (train_set, eval_set), for ``train(model, train_set, config, eval_set)``.

    Raises:
        ConfigError: the config names no training data.
        DataError: a bad training, replay or eval file.
    """
    if config.data is None:
        raise ConfigError("{data}: no training data given",
                          fields={"data": "TrainConfig.data"})
    if config.method != "sft":  # preference pairs (data/preference.py)
        train_pairs = load_pairs(config.data, tokenizer, config.max_seq_len,
                                 skip_bad=config.skip_bad)
        eval_pairs = None if config.eval_data is None else load_pairs(
            config.eval_data, tokenizer, config.max_seq_len, skip_bad=config.skip_bad)
        return train_pairs, eval_pairs
    train_set = load_jsonl(config.data, tokenizer, config.max_seq_len, skip_bad=config.skip_bad,
                           pack=config.pack and not config.replay)
    if config.replay:
        train_set = _with_replay(train_set, tokenizer, config)
    eval_set = None
    if config.eval_data is not None:
        eval_set = load_jsonl(config.eval_data, tokenizer, config.max_seq_len,
                              skip_bad=config.skip_bad)
    return train_set, eval_set


def _with_replay(train_set: JsonlDataset, tokenizer: Tokenizer, config: TrainConfig
                 ) -> JsonlDataset:
    """The training rows plus replay_ratio x as many rows of config.replay, drawn in a seeded
    order (cycled when the replay file is the smaller), then packed if asked."""
    assert config.replay is not None  # called only when the config names a replay file
    replay = load_jsonl(config.replay, tokenizer, config.max_seq_len, skip_bad=config.skip_bad)
    wanted = round(config.replay_ratio * len(train_set))
    order = list(range(len(replay)))
    random.Random(f"minilora-replay:{config.seed}").shuffle(order)
    picked = [replay.samples[order[i % len(order)]] for i in range(wanted)]
    samples = train_set.samples + picked
    stats = train_set.stats
    stats.formats.update(replay.stats.formats)
    if config.pack:
        samples = pack_samples(samples, config.max_seq_len)
    print(f"data: replay {len(picked)} rows of {config.replay} beside {len(train_set)} training "
          "rows", file=sys.stderr)
    return JsonlDataset(samples, pad_id=train_set.pad_id, max_seq_len=config.max_seq_len,
                        path=train_set.path, packed=config.pack, stats=stats)


class BatchPlan:
    """Which samples each process takes at each step.

    Step s of epoch e = s // steps_per_epoch takes global batch s % steps_per_epoch of
    ``batch_indices(n, G, seed, e)``, G = batch_size x accumulation_steps x world. Micro-batch j
    of rank r is its slice [(j W + r) B, (j W + r + 1) B): the union over ranks of micro-batch j
    is micro-batch j of one process with batch_size W x B.
    """

    def __init__(self, dataset: JsonlDataset, config: TrainConfig, rank: int, world: int) -> None:
        self.dataset = dataset
        self.config = config
        self.rank, self.world = rank, world
        self.global_batch = config.batch_size * config.accumulation_steps * world
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{dataset.path or 'the dataset'} has {len(dataset)} rows, fewer than one global "
                f"batch of {self.global_batch} ({{batch_size}} x {{accumulation_steps}} x "
                "processes); lower {batch_size} or {accumulation_steps}",
                fields={"batch_size": "batch_size", "accumulation_steps": "accumulation_steps"})
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self._trained = [s.trained_tokens for s in dataset.samples]
        self._lengths = [len(s.input_ids) for s in dataset.samples]
        self._content = content_sha256(dataset)
        self._epoch = -1
        self._order: list[list[int]] = []

    def position(self, step: int) -> dict[str, int | str]:
        """The data position before ``step``: what a checkpoint records."""
        return {"epoch": step // self.steps_per_epoch, "batch": step % self.steps_per_epoch,
                "rows": len(self.dataset), "tokens": sum(self._lengths),
                "global_batch": self.global_batch, "sha256": self._content}

    def batches(self, step: int) -> tuple[list[Any], int, int]:
        """(this rank's micro-batches, trained tokens and tokens of the whole global batch)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = batch_indices(len(self.dataset), self.global_batch,
                                        seed=self.config.seed, epoch=epoch)
            self._epoch = epoch
        rows = self._order[index]
        b = self.config.batch_size
        starts = [(j * self.world + self.rank) * b for j in range(self.config.accumulation_steps)]
        micro = [self.dataset.collate(rows[start: start + b]) for start in starts]
        return (micro, sum(self._trained[i] for i in rows), sum(self._lengths[i] for i in rows))


def check_vocab(dataset: JsonlDataset | None, model: nn.Module) -> None:
    """Every token id has a row in the model's embedding: a tokenizer larger than the model
    would otherwise fail with an IndexError part-way through a run."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = (getter() if callable(getter)
                 else getattr(getattr(model, "model", None), "embed_tokens", None))
    if dataset is None or not isinstance(embedding, (nn.Embedding, LoRAEmbedding)) or (
            not dataset.samples):
        return
    vocab = embedding.num_embeddings
    for row, sample in enumerate(dataset.samples):
        if sample.input_ids and (max(sample.input_ids) >= vocab or min(sample.input_ids) < 0):
            bad = max(sample.input_ids) if max(sample.input_ids) >= vocab else min(
                sample.input_ids)
            raise DataError(dataset.path or "the dataset",
                            f"sample {row + 1} holds token id {bad}, outside the model's "
                            f"vocabulary (0 .. {vocab - 1}); the tokenizer does not belong to "
                            "this model")


def content_sha256(dataset: JsonlDataset) -> str:
    """A hash of what the model is trained on, row by row in file order: the token ids and the
    labels. Other data of the same size (lines shuffled, digits swapped) gives another hash."""
    digest = hashlib.sha256()
    for sample in dataset.samples:
        digest.update(array.array("q", sample.input_ids).tobytes())
        digest.update(b"|")
        digest.update(array.array("q", sample.labels).tobytes())
        digest.update(b"\n")
    return digest.hexdigest()
