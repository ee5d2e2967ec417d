"""Will it fit: the peak memory of a training step, estimated before the first step and measured
after the run.

The estimate adds up what a step holds at its peak: the weights (a quantized weight at its
packed size), the trainable parameters with their gradients and AdamW's two moments (float32),
and the activations autograd keeps for backward at this micro-batch (every block's, or with
activation checkpointing one block input per layer plus one block recomputed), and the output
head's logits (one chunk of them, see model/loss.py). The per-token sizes below count the tensors
minilora's decoder saves; docs/benchmarks.md says how close the estimate came.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minilora.model.loss import CHUNK_ELEMENTS

GiB = 2**30


@dataclass
class MemoryEstimate:
    """Bytes a training step is expected to hold at its peak, by kind."""

    weights: int  # every parameter and buffer, as stored
    trainable: int  # trainable parameters + gradients + AdamW moments
    activations: int  # saved for backward at this batch, logits included; 0 when unknown
    runtime: int  # the process around the model (CPU: resident memory not counted above)
    batch: tuple[int, int]
    checkpointing: bool

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.runtime

    def __str__(self) -> str:
        act = (f"activations ~{self.activations / GiB:.2f}" if self.activations
               else "activations unknown (not a minilora model)")
        ckpt = ", checkpointed" if self.checkpointing else ""
        return (f"memory: estimated peak {self.total / GiB:.2f} GiB = weights "
                f"{self.weights / GiB:.2f} + adapters, gradients and AdamW "
                f"{self.trainable / GiB:.2f} + {act} (batch {self.batch[0]} x {self.batch[1]}"
                f"{ckpt}) + runtime {self.runtime / GiB:.2f} GiB")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def estimate_memory(model: nn.Module, batch_size: int, seq_len: int, *,
                    amp_dtype: torch.dtype | None, device: torch.device) -> MemoryEstimate:
    """Estimates the peak memory of a training step of ``model``.

    Args:
        model: the model as it will train (LoRA injected, quantized, checkpointing set).
        batch_size: rows per micro-batch.
        seq_len: tokens per row (the longest a batch can have).
        amp_dtype: the autocast dtype, None for float32.
        device: where it trains; on a CPU the process's current resident memory beyond the
            weights is counted as runtime.

    Returns:
        A MemoryEstimate.
    """
    seen: set[int] = set()
    weights = trainable = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        weights += _nbytes(t)
        if t.requires_grad:
            trainable += 3 * t.numel() * 4 + _nbytes(t)  # gradient (float32 here) + 2 moments
    activations = _activations(model, batch_size, seq_len, amp_dtype)
    runtime = 0
    if device.type == "cpu":
        runtime = max(0, _rss() - weights)
    return MemoryEstimate(weights, trainable, activations, runtime, (batch_size, seq_len),
                          bool(getattr(model, "activation_checkpointing", False)))


def _activations(model: nn.Module, B: int, T: int, amp_dtype: torch.dtype | None) -> int:
    config: Any = getattr(model, "config", None)  # duck-typed: a CausalLM's ModelConfig
    if not hasattr(config, "num_hidden_layers") or not hasattr(model, "activation_checkpointing"):
        return 0
    C, F, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    H, KV, D, V = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                   config.vocab_size)
    if config.use_moe:  # each token through k routed experts (their own width) and the shared
        F = (config.num_experts_per_tok * config.moe_intermediate_size
             + config.n_shared_experts * config.intermediate_size)
    low = 2 if amp_dtype in (torch.bfloat16, torch.float16) else 4
    N = B * T
    # Saved per token by one block: the float32 residual stream at the two norms, each norm's
    # output, q/k before and after RoPE, v, the attention output, the MLP's gate, up, silu and
    # their product; in low precision the attention's probabilities (H x T per token) too,
    # where float32's fused attention keeps one log-sum-exp per head.
    qkv = H * D + 2 * KV * D
    per_token = 2 * 4 * C + low * (2 * C + 2 * qkv + H * D + 4 * F)
    scores = low * H * T if low == 2 else 4 * H
    block = N * (per_token + scores)
    if model.activation_checkpointing:
        body = L * N * 4 * C + block  # each block's input, then one block recomputed
    else:
        body = L * block
    rows = min(N, max(1, CHUNK_ELEMENTS // V))
    head = N * C * (4 + low) + rows * V * (4 + low)  # norm out + grad of h; one chunk of logits
    if low == 2:
        head += V * C * low  # the head's weight cast to the autocast dtype for the loss
    return body + head


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def measured_peak(device: torch.device) -> tuple[int, str]:
    """The peak memory so far and what it measures: CUDA's allocator peak, or the process's
    resident high-water mark on a CPU (ru_maxrss: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA allocator peak"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024), "process RSS high-water mark"
