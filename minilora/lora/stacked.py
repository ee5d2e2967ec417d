"""A mixed batch's adapters gathered per row: one layer's adapters stacked, each row's picked.

In a mixed batch (minilora.lora.named.mixed_adapters) every row may name another adapter. Run
one adapter at a time, a LoRA layer costs a handful of small operations per adapter present
(gather the rows, two rank-r products, scatter back): with 32 adapters that is 32 times the
operations of one, and on a CPU (or a GPU for this small a model) each operation costs far more
than its arithmetic. Punica's BGMV and S-LoRA's gather do it the other way, and so does this
file: the layer's adapters are stacked once into
- `a`: (n + 1, in, r_max), slot i holding A_i^T, and
- `b`: (n + 1, r_max, out), slot i holding scaling_i * B_i^T,
both zero-padded past each adapter's rank, the last slot all zeros (the base's rows, and rows of
an adapter this layer does not have); each row's slot is gathered and two batched products
(`torch.bmm`) give every row its own update at once. Every row is its own product in the batch
of `bmm`, so what a row gets does not depend on the other rows.

The stack is a cache of the adapters' weights: `AdapterStack.key` records the version counter
and storage of every A and B it was read from, so a stack is rebuilt after any in-place change
(an optimizer step, a dtype change); adding or deleting an adapter, or loading weights into one
(which may be an inference tensor, which has no version counter), drops the layer's stack
outright (`LoRALinear.adapter_stack`, `LoRALinear.weights_changed`). The key is checked on
every call, through the weights the stack holds (not the layer's module dicts, whose lookups
cost more than the check), unless the caller vouches that nothing writes the weights but
minilora's loaders (`mixed_adapters(..., check_stacks=False)`, as the server's engine does):
with 32 adapters the check reads some 1,800 version counters a call on the embedded model, a
sixth of the call.

Only variants whose update is s B A x (`LoraVariant.fast_path`) are stacked; the others (DoRA)
hold a zero slot and the layer runs their rows with its per-adapter loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from minilora.lora.layer import LoRALinear

# What a stack was built from: (version counter, storage address) of each adapter's A and B.
StackKey = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class AdapterStack:
    """One layer's adapters, stacked for gathering (see the module docstring).

    Attributes:
        names: the adapters by slot: slot i is `names[i]`; slot `len(names)` is all zeros.
        a: (len(names) + 1, in, r_max): A_i^T, zero past adapter i's rank.
        b: (len(names) + 1, r_max, out): scaling_i * B_i^T, zero past adapter i's rank; a
            variant off the fast path (DoRA) has a zero slot here.
        weights: the A and B weights it was read from, adapter by adapter.
        key: their `stack_key` when it was read.
        looped: the adapters held as zero slots, whose rows the layer's per-adapter loop runs
            (variants off the fast path).
        picked: the last batch's gathered rows of `a` and `b`, keyed by its slots (see
            `pick`).
    """

    names: tuple[str, ...]
    a: Tensor
    b: Tensor
    weights: tuple[Tensor, ...]
    key: StackKey
    looped: frozenset[str]
    picked: dict[tuple[int, ...], tuple[Tensor, Tensor]] = field(
        default_factory=dict, compare=False, repr=False)

    def pick(self, slots: Tensor, slot_ids: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Each row's A^T and s B^T: `a` and `b` gathered at `slots` ((B, in, r_max),
        (B, r_max, out)).

        A server decodes the same rows with the same adapters step after step, so the last
        batch's gathered rows are kept and reused while its slots (`slot_ids`, the same as
        Python ints) stay the same; they are copies of the stack, made again with it. Kept
        only when the batch has no more rows than the stack has slots, so the copy is never
        larger than the stack itself."""
        if not slot_ids or len(slot_ids) > len(self.names) + 1:
            self.picked.clear()
            return self.a.index_select(0, slots), self.b.index_select(0, slots)
        hit = self.picked.get(slot_ids)
        if hit is None:
            self.picked.clear()
            hit = self.picked[slot_ids] = (self.a.index_select(0, slots),
                                           self.b.index_select(0, slots))
        return hit

    def current(self) -> bool:
        """Whether no weight the stack was read from has changed since (written in place, or
        given another storage); adding or deleting an adapter is the layer's to notice."""
        return stack_key(self.weights) == self.key

    @property
    def base_slot(self) -> int:
        """The slot of rows that get no update (the zero slot)."""
        return len(self.names)


def stack_key(weights: tuple[Tensor, ...]) -> StackKey:
    """The version counter and storage of each of `weights`: equal keys mean the weights have
    not changed in between (an in-place write bumps the counter, a new storage moves the
    address). Tensors made under `torch.inference_mode` have no version counter (-1 here):
    whoever writes them in place says so (`LoRALinear.weights_changed`), as loading an
    adapter does."""
    return tuple((-1 if p.is_inference() else p._version, p.data_ptr()) for p in weights)


@torch.no_grad()
def build_stack(layer: LoRALinear) -> AdapterStack:
    """Stacks `layer`'s adapters (see the module docstring); computed in the adapters' dtype,
    the scaling folded into B."""
    names = tuple(layer.lora_A)
    first = layer.lora_A[names[0]].weight
    r_max = max(layer.r[n] for n in names)
    a = first.new_zeros(len(names) + 1, layer.in_features, r_max)  # (n + 1, in, r_max)
    b = first.new_zeros(len(names) + 1, r_max, layer.out_features)  # (n + 1, r_max, out)
    for i, name in enumerate(names):
        if not layer.variant[name].fast_path:
            continue  # its rows take the layer's per-adapter loop
        r = layer.r[name]
        a[i, :, :r] = layer.lora_A[name].weight.t()
        b[i, :r] = layer.lora_B[name].weight.t() * layer.scaling[name]
    weights = tuple(w for n in names for w in (layer.lora_A[n].weight, layer.lora_B[n].weight))
    looped = frozenset(n for n in names if not layer.variant[n].fast_path)
    return AdapterStack(names, a, b, weights, stack_key(weights), looped)


def add_gathered(y: Tensor, x: Tensor, stack: AdapterStack, slots: Tensor,
                 slot_ids: tuple[int, ...] = ()) -> Tensor:
    """Adds to y each row's own adapter update: y[i] += x[i] A_s^T (s B_s)^T with s = slots[i].

    Args:
        y: (B, ..., out) the base output, written in place.
        x: (B, ..., in) the layer's input.
        stack: the layer's stack.
        slots: (B,) long, each row's slot in the stack (`stack.base_slot`: no update).
        slot_ids: the same as Python ints, which lets the stack reuse the rows it gathered
            for the last call with these slots (`AdapterStack.pick`); () gathers anew.

    Returns:
        y.
    """
    rows = x.shape[0]
    autocast = torch.is_autocast_enabled(x.device.type)
    xa = x if autocast or x.dtype == stack.a.dtype else x.to(stack.a.dtype)
    a, b = stack.pick(slots, slot_ids)  # (B, in, r_max), (B, r_max, out)
    h = torch.bmm(xa if xa.dim() == 3 else xa.reshape(rows, -1, x.shape[-1]), a)  # (B, T, r)
    flat = y if y.dim() == 3 else y.view(rows, -1, y.shape[-1])  # (B, T, out), y's memory
    if not autocast and h.dtype == y.dtype:
        flat.baddbmm_(h, b)
    else:
        flat.add_(torch.bmm(h, b).to(y.dtype))
    return y
