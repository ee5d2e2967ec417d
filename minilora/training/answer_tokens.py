"""The embedding rows a run's answers need: ``answer_tokens`` turned into trainable token ids.

LoRA on the linear layers cannot move the (often tied) embedding rows that read and score a
token; an answer written in tokens the base rarely produced (number words cut into fragments,
say) is then learned slowly and at the cost of the base's other skills (docs/quality.md, "A new
skill"). ``answer_tokens`` trains the rows of exactly the tokens the training answers use, as
``trainable_tokens`` would with their ids written out, found in the data instead.
"""

from __future__ import annotations

from dataclasses import replace

from minilora.data.preference import PairDataset
from minilora.data.sft import JsonlDataset
from minilora.training.config import TrainConfig


def answer_token_ids(dataset: JsonlDataset | PairDataset, exclude: list[int]) -> list[int]:
    """Every token id a trained label of ``dataset`` holds, less ``exclude``, in order.

    Args:
        dataset: the training rows (their labels: -100 where nothing is trained).
        exclude: ids left out (the end-of-turn tokens, which the base already writes).

    Returns:
        The sorted ids.
    """
    skip = set(exclude)
    return sorted({t for sample in dataset.samples for t in sample.labels
                   if t >= 0 and t not in skip})


def with_answer_tokens(config: TrainConfig, dataset: JsonlDataset | PairDataset,
                       exclude: list[int]) -> TrainConfig:
    """``config`` with its answers' token ids added to ``trainable_tokens`` when
    ``answer_tokens`` is set (the same config otherwise): the ids found are written into the
    run's config.json, so a resumed run trains the same rows."""
    if not config.answer_tokens:
        return config
    ids = sorted(set(config.trainable_tokens) | set(answer_token_ids(dataset, exclude)))
    return replace(config, trainable_tokens=ids)
