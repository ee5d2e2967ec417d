"""A mixed batch's routing: which rows of the current call take which adapter.

minilora.lora.named.mixed_adapters sets one `Routes` on every LoRA layer, module to save and
trainable-tokens layer for the length of a call, and clears it after. Each kind of layer reads
the fields it needs: the per-adapter loop reads `groups`, a Linear's gathered path
(minilora.lora.stacked) reads `slots` too.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Routes:
    """A mixed batch's routing for one call of one layer.

    Attributes:
        groups: (adapter name, its rows (k,) long) for each adapter of this layer the batch
            names: what the per-adapter loop runs.
        n_rows: the batch's row count.
        adapters: a Linear layer's adapters when routed (its `adapter_names`), which `slots`
            index; empty for the other kinds.
        slots: (n_rows,) long: each row's adapter as its index in `adapters`, len(adapters) for
            the base (what the gathered path reads; see minilora.lora.stacked), or None.
        slot_ids: `slots` as Python ints (what a stack's kept gathered rows are keyed by).
        every_row: the adapter every row names, when they all name one (a Linear runs it as
            its one active adapter, with the single adapter's kernel), else None.
        check_stack: False when the caller vouches that no adapter weight was written in place
            since the layer's stack was read except through minilora's loaders, which drop the
            stack (`mixed_adapters(..., check_stacks=False)`); True re-reads every weight's
            version counter on each call.
    """

    groups: tuple[tuple[str, Tensor], ...]
    n_rows: int
    adapters: tuple[str, ...] = ()
    slots: Tensor | None = None
    slot_ids: tuple[int, ...] = ()
    every_row: str | None = None
    check_stack: bool = True
