"""The KV cache: every layer's keys and values in preallocated buffers, grown on demand."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from minilora.model.config import ModelConfig


class KVCache:
    """Keys and values of every layer in preallocated (B, KV, capacity, D) buffers.

    ``length`` is how many positions are filled; the model advances it after each forward.
    A write past ``capacity`` doubles the buffers (generate sizes them once, up front).
    """

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        kv_heads, head_dim = config.num_key_value_heads, config.head_dim
        assert kv_heads is not None and head_dim is not None  # ModelConfig.__post_init__ fills them
        shape = (batch_size, kv_heads, max(capacity, 1), head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype)
                     for _ in range(config.num_hidden_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype)
                       for _ in range(config.num_hidden_layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes k, v (B, KV, T, D) at positions start.. and returns all keys/values so far."""
        end = start + k.shape[2]
        if end > self.capacity:
            new = max(end, 2 * self.capacity)
            for buffers in (self.keys, self.values):
                for i, old in enumerate(buffers):
                    grown = old.new_empty(*old.shape[:2], new, old.shape[3])
                    grown[:, :, : self.length] = old[:, :, : self.length]
                    buffers[i] = grown
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]  # (B, KV, S, D)
