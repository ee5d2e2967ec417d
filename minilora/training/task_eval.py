"""Task accuracy during a run: the held-out questions of task files answered greedily at every
evaluation, so what the run learns and what it keeps are seen as it trains, not only after.

A record is ``{"step": s, "task/<name>": accuracy, ...}`` in metrics.jsonl (and TensorBoard);
the tasks are those of the files (`data/tasks.py`'s format), scored as `minilora eval --tasks`
scores them.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from minilora.data import tasks
from minilora.data.tokenizer import Tokenizer
from minilora.decoding.chat import chat_answerer
from minilora.model.decoder import CausalLM

MAX_NEW_TOKENS = 48  # the before/after table's answer length


def load_task_samples(files: list[str] | str) -> list[tasks.EvalSample]:
    """Every question of the task files, in order.

    Raises:
        TaskError: a file that is not a task file (file, line and field named).
    """
    return [s for f in ([files] if isinstance(files, str) else files)
            for s in tasks.load_samples(f)]


def task_accuracy(model: nn.Module, tokenizer: Tokenizer, samples: list[tasks.EvalSample]
                  ) -> dict[str, float]:
    """``{"task/<name>": accuracy}`` of greedy answers, per task of ``samples``; the model is in
    eval mode while it answers and back in the mode it was in after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            answer = chat_answerer(cast(CausalLM, model), tokenizer, max_new_tokens=MAX_NEW_TOKENS,
                                   eos_token_id=tokenizer.stop_token_ids)
            report = tasks.score(samples, answer)
    finally:
        model.train(was_training)
    return {f"task/{name}": s.accuracy for name, s in report.per_task.items()
            if not math.isnan(s.accuracy)}
