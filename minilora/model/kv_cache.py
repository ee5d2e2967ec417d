"""The KV cache: every layer's keys and values on a timeline of slots, and which slots each row
owns; `generate` decodes its rows in lockstep, the server's rows join, leave and are packed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from minilora.model.config import ModelConfig


class KVCache:
    """Keys and values of every layer in preallocated (rows, KV, slots, D) buffers.

    The slots are a timeline that the batch writes at once: ``length`` of them are filled (the
    model advances it after each forward), and a write past ``capacity`` grows the buffers to at
    least twice the slots (generate sizes them once, up front). A forward may run on the first
    n rows only (the rest are free).

    ``owned`` (rows, slots) marks the slots that hold a row's own tokens, for a batch whose rows
    do not line up (the server's): its rows are the forward's attention mask. `clear`, `place`,
    `move` and `make_room` let rows join, leave and be packed. `generate` needs none of them: its
    rows decode in lockstep, its left-padding masked by a mask of its own.

    Slots past ``length`` hold whatever memory held; a taken row's slots below it are finite,
    since attention reads a row's slots that it does not own too (masked) and a NaN there would
    still make the row's attention NaN: a forward writes every row it runs, `clear` and `place`
    zero a row they take, and `place` zeroes the slots it adds to the timeline in every row.

    Args:
        config: the model's config (layers, key/value heads, head size).
        rows: the batch's rows.
        capacity: slots to start with.
        device, dtype: the buffers'.
    """

    def __init__(self, config: ModelConfig, rows: int, capacity: int, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        kv_heads, head_dim = config.num_key_value_heads, config.head_dim
        assert kv_heads is not None and head_dim is not None  # ModelConfig.__post_init__ fills them
        shape = (rows, kv_heads, max(capacity, 1), head_dim)
        # Empty, not zeros: the room that generate's answer never reaches is never touched, so
        # never resident (the rows' slots are made finite as they are taken, see above).
        self.keys = [torch.empty(shape, device=device, dtype=dtype)
                     for _ in range(config.num_hidden_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype)
                       for _ in range(config.num_hidden_layers)]
        self.owned = torch.zeros(rows, max(capacity, 1), dtype=torch.bool, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes the first n rows' k, v (n, KV, T, D) at slots start.. and returns those rows'
        keys and values so far (n, KV, start + T, D)."""
        n, end = k.shape[0], start + k.shape[2]
        if end > self.capacity:
            self._grow(end)
        self.keys[layer][:n, :, start:end] = k
        self.values[layer][:n, :, start:end] = v
        return self.keys[layer][:n, :, :end], self.values[layer][:n, :, :end]

    def clear(self, row: int) -> None:
        """Takes `row` for a new sequence: it owns no slot, and its filled slots are zeros."""
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[row, :, : self.length] = 0
        self.owned[row] = False

    def place(self, row: int, cache: KVCache, source: int, owned: Tensor) -> None:
        """Takes `row` for row `source` of another cache (a prefill's): copies its keys and
        values; the slots where `owned` (L,) is True are the row's own. Slots it adds to the
        timeline are zeros in the other rows."""
        length = owned.shape[0]
        if length > self.capacity:
            self._grow(length)
        for mine, theirs in ((self.keys, cache.keys), (self.values, cache.values)):
            for layer, buffer in enumerate(mine):
                buffer[:, :, self.length:length] = 0
                buffer[row, :, length:self.length] = 0
                buffer[row, :, :length] = theirs[layer][source, :, :length]
        self.owned[row] = False
        self.owned[row, :length] = owned
        self.length = max(self.length, length)

    def move(self, src: int, dst: int) -> None:
        """Row src takes row dst's place (dst has left the batch)."""
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[dst, :, : self.length] = buffer[src, :, : self.length]
        self.owned[dst] = self.owned[src]

    def make_room(self, rows: int, slots: int = 1) -> None:
        """Makes room for `slots` more slots on the timeline: when they do not fit, packs the
        slots of the first `rows` rows to the front, and grows the buffers when that frees
        little."""
        if self.length + slots <= self.capacity:
            return
        self._pack(rows)
        if self.length + slots > self.capacity * 3 // 4:
            self._grow(self.length + slots)

    def _pack(self, rows: int) -> None:
        counts = self.owned[:rows].sum(dim=1)  # (rows,)
        for row in range(rows):
            owned = self.owned[row].nonzero().squeeze(1)  # (c,)
            for buffers in (self.keys, self.values):
                for buffer in buffers:
                    buffer[row, :, : owned.numel()] = buffer[row, :, owned]
            self.owned[row] = False
            self.owned[row, : owned.numel()] = True
        self.length = int(counts.max()) if rows else 0

    def _grow(self, slots: int) -> None:
        """At least `slots` slots, and at least twice as many as now; the filled ones kept."""
        slots = max(slots, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                grown = old.new_empty(*old.shape[:2], slots, old.shape[3])
                grown[:, :, : self.length] = old[:, :, : self.length]
                buffers[i] = grown
        owned = self.owned.new_zeros(self.owned.shape[0], slots)
        owned[:, : self.length] = self.owned[:, : self.length]
        self.owned = owned
