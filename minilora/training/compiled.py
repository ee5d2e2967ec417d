"""The training forward under torch.compile, compiled once per run.

The sequence length is marked dynamic (one graph for every length up to the run's
max_seq_len) and each batch is padded on the right to a multiple of ``MULTIPLE``, which keeps
the products' rows aligned and the symbolic range away from the 0/1 sizes dynamo specializes.
Right padding changes nothing the loss counts: its labels are -100 and a causal (or
same-segment) mask keeps every real token from seeing it. Inside the compiled region the model
takes its fixed-shape loss path (every position through the head, -100 ignored) instead of
gathering the counted positions, whose number depends on the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, overload

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor, nn

MULTIPLE = 8  # batches are padded to a multiple of this many tokens
DEFAULT_BACKEND = "inductor"


@dataclass
class StepOutput:
    """What the training loop reads of a model output: the loss and the MoE auxiliary loss."""

    loss: Tensor
    aux_loss: Tensor


def padded_length(length: int) -> int:
    """The length a batch of ``length`` tokens is padded to: the next multiple of MULTIPLE."""
    return -(-length // MULTIPLE) * MULTIPLE


@overload
def pad_right(t: Tensor, length: int, value: int) -> Tensor: ...
@overload
def pad_right(t: None, length: int, value: int) -> None: ...
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
    padded to a multiple of MULTIPLE tokens, its length dynamic; returns a StepOutput (loss,
    aux_loss), the same values as the eager model's within rounding.

    ``backend`` is torch.compile's (default inductor), the caller's choice for this model.

    The compiled code guards on the model's structure and flags, not on parameter values, so
    optimizer steps, a checkpoint loaded in place, or another adapter of the same shape made
    active reuse it. MoE models: their auxiliary loss counts padded tokens too.
    """

    def __init__(self, model: nn.Module, longest: int, backend: Any = None) -> None:
        self.model, self.longest = model, padded_length(max(longest, 1))
        self._compiled = torch.compile(_loss, backend=backend or DEFAULT_BACKEND)
        rotary = getattr(getattr(model, "model", None), "rotary", None)
        if rotary is not None:
            # Grown now, not while the first batch is traced: a table that changes shape
            # between calls fails the compiled code's guards (one more compile per run).
            weight = next(model.parameters())
            rotary(0, self.longest, weight.device, torch.float32)

    def __call__(self, input_ids: Tensor, labels: Tensor,
                 segment_ids: Tensor | None = None) -> StepOutput:
        length = padded_length(input_ids.shape[1])
        tensors = (pad_right(input_ids, length, 0), pad_right(labels, length, -100),
                   pad_right(segment_ids, length, 0))
        top = max(self.longest, length)
        for t in tensors:
            if t is not None:  # one graph for every length in [MULTIPLE, top]
                torch._dynamo.mark_dynamic(t, 1, min=MULTIPLE, max=top)
        loss, aux = self._compiled(self.model, *tensors)
        return StepOutput(loss, aux)
