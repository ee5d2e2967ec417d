"""The training forward under torch.compile, compiled once per bucket of sequence lengths.

A batch is padded on the right to its length bucket (a power of two from ``MIN_BUCKET``, capped
at the run's longest sequence), so a run sees at most a handful of shapes and compiles each one
once, with static shapes (no symbolic sizes: the fastest kernels, and no SymBool where the
attention wants a bool). Right padding changes nothing the loss counts: its labels are -100 and
a causal (or same-segment) mask keeps every real token from seeing it. Inside the compiled
region the model takes its fixed-shape loss path (every position through the head, -100
ignored) instead of gathering the counted positions, whose number depends on the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor, nn

MIN_BUCKET = 32  # shortest padded length: shorter batches cost little more, and compile once
BACKEND = "inductor"  # tests switch to a cheaper or counting backend


@dataclass
class StepOutput:
    """What the training loop reads of a model output: the loss and the MoE auxiliary loss."""

    loss: Tensor
    aux_loss: Tensor


def bucket_length(length: int, longest: int) -> int:
    """The padded length of a batch of ``length`` tokens: the next power of two from MIN_BUCKET,
    but never past ``longest`` (the run's max_seq_len) or below ``length`` itself."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return max(length, min(bucket, longest))


def buckets(longest: int) -> list[int]:
    """Every padded length a run with max_seq_len ``longest`` can compile for."""
    return sorted({bucket_length(n, longest) for n in range(1, longest + 1)})


def pad_right(t: Tensor | None, length: int, value: int) -> Tensor | None:
    """``t`` (B, T) padded on the right with ``value`` to (B, length); None stays None."""
    if t is None or t.shape[1] == length:
        return t
    return F.pad(t, (0, length - t.shape[1]), value=value)  # (B, length)


def _loss(model: nn.Module, input_ids: Tensor, labels: Tensor,
          segment_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    output = model(input_ids, labels=labels, segment_ids=segment_ids)
    return output.loss, output.aux_loss


class CompiledLoss:
    """Calls ``model(input_ids, labels=..., segment_ids=...)`` through torch.compile, each batch
    padded to its length bucket; returns a StepOutput (loss, aux_loss), the same values as the
    eager model's within rounding.

    The compiled code guards on the model's structure and flags, not on parameter values, so
    optimizer steps, a resumed checkpoint loaded in place or a hot-swapped adapter of the same
    shape reuse it. MoE models: their auxiliary loss counts padded tokens too.
    """

    def __init__(self, model: nn.Module, longest: int, backend: Any = None) -> None:
        self.model, self.longest = model, longest
        # Static shapes: one graph per bucket, and a bucket per power of two must all fit in
        # dynamo's per-function cache, with room for a train/eval flag flip.
        limit = len(buckets(longest)) + 4
        if torch._dynamo.config.recompile_limit < limit:
            torch._dynamo.config.recompile_limit = limit
        self._compiled = torch.compile(_loss, backend=backend or BACKEND, dynamic=False)
        rotary = getattr(getattr(model, "model", None), "rotary", None)
        if rotary is not None:
            # Grown now, not while the first batch is traced: a table that changes shape
            # between calls fails the compiled code's guards (one more compile per run).
            weight = next(model.parameters())
            rotary(0, longest, weight.device, torch.float32)

    def __call__(self, input_ids: Tensor, labels: Tensor,
                 segment_ids: Tensor | None = None) -> StepOutput:
        length = bucket_length(input_ids.shape[1], self.longest)
        loss, aux = self._compiled(self.model, pad_right(input_ids, length, 0),
                                   pad_right(labels, length, -100),
                                   pad_right(segment_ids, length, 0))
        return StepOutput(loss, aux)
