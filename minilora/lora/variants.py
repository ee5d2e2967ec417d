"""LoRA variants: what an adapter adds beyond plain LoRA, each one class behind one interface.

A variant says, for its adapters, how they start (`init`, after A and B are drawn), what they add
to the base output (`update`), what merging adds to the weight (`delta`), and two facts the rest
of minilora reads instead of knowing every variant:

- `fast_path`: the update is s B A x, so the one-node kernel (minilora.core.lowrank) computes it,
  alone or inside a fused group;
- `adds_up`: the update is a B A product, so adapters combine by concatenating their A's and B's.

Plain LoRA and PiSSA (plain LoRA whose A, B start from the weight's top singular directions,
the weight keeping the rest) take the fast path; DoRA (a magnitude per output row, a norm of the
whole weight in its forward) does not and runs the layer's reference forward. A new variant is a
new class here and one line in `variant_for`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minilora.core.errors import ConfigError
from minilora.lora.quantized_weight import is_quantized

if TYPE_CHECKING:
    from minilora.lora.layer import LoRALinear


class LoraVariant:
    """Plain LoRA: update s B A x', merge adds s B A (x' = dropout(x))."""

    name = "lora"
    label = "LoRA"  # how messages name it
    fast_path = True
    adds_up = True

    def init(self, layer: LoRALinear, adapter: str) -> None:
        """Finishes adapter `adapter` after A and B are drawn (plain LoRA: nothing to do)."""

    def update(self, layer: LoRALinear, adapter: str, xa: Tensor, lora: Tensor,
               base: Tensor) -> Tensor:
        """What the adapter adds to `base` = W x + b, given its input xa (dropout applied)
        and lora = s B A xa: (..., out)."""
        return lora

    def delta(self, layer: LoRALinear, adapter: str, w: Tensor, delta: Tensor) -> Tensor:
        """What merging adds to the float32 weight `w` (out, in), given delta = s B A."""
        return delta


class PissaVariant(LoraVariant):
    """PiSSA (Meng et al. 2024): A, B hold the top-r singular directions, scaled so s B A is
    their part of W; W keeps the rest, so the output does not change. Computes as plain LoRA."""

    name = "pissa"
    label = "PiSSA"

    @torch.no_grad()
    def init(self, layer: LoRALinear, adapter: str) -> None:
        if is_quantized(layer.weight):
            raise ConfigError("init='pissa' rewrites the base weight: not a quantized one")
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        r, s = layer.r[adapter], layer.scaling[adapter]
        u, sv, vh = torch.linalg.svd(layer.weight.float(), full_matrices=False)
        root = (sv[:r] / s).sqrt()  # (r,)
        a.copy_(root[:, None] * vh[:r])  # (r, in)
        b.copy_(u[:, :r] * root)  # (out, r)
        layer.weight.copy_(layer.weight.float() - s * (b.float() @ a.float()))


class DoraVariant(LoraVariant):
    """DoRA (weight-decomposed LoRA), PEFT's formula with the norm detached as in the paper's
    section 4.3: with f = m / ||W + s B A||_row, the update is (f - 1) W x' + f s B A x'.
    The magnitude m (out,) lives in the layer's `lora_magnitude_vector[adapter]`."""

    name = "dora"
    label = "DoRA"
    fast_path = False  # the row norm of the whole weight: the reference forward computes it
    adds_up = False  # m (W + s B A) / ||.|| is no B A product

    def __init__(self, start: LoraVariant | None = None) -> None:
        self.start = start or LoraVariant()  # how A and B start (PiSSA or plain)

    @torch.no_grad()
    def init(self, layer: LoRALinear, adapter: str) -> None:
        self.start.init(layer, adapter)
        if is_quantized(layer.weight):
            raise ConfigError("use_dora needs the base weight's norms: not a quantized one")
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        w = layer.weight.float() + layer.scaling[adapter] * (b.float() @ a.float())  # (out, in)
        layer.lora_magnitude_vector[adapter] = nn.Parameter(
            torch.linalg.norm(w, dim=1).to(a.dtype))  # (out,)

    def update(self, layer: LoRALinear, adapter: str, xa: Tensor, lora: Tensor,
               base: Tensor) -> Tensor:
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        w = layer.weight.to(xa.dtype)
        delta = (b @ a).detach().to(w.dtype)  # (out, in)
        norm = torch.linalg.norm(w + layer.scaling[adapter] * delta, dim=1).detach()  # (out,)
        f = layer.lora_magnitude_vector[adapter] / norm  # (out,)
        if layer.dropping(adapter):
            wx = F.linear(xa, w)
        else:
            wx = base if layer.bias is None else base - layer.bias
        return (f - 1) * wx + f * lora

    def delta(self, layer: LoRALinear, adapter: str, w: Tensor, delta: Tensor) -> Tensor:
        # m * (W + d) / ||W + d||_row - W
        f = layer.lora_magnitude_vector[adapter].float() / torch.linalg.norm(w + delta, dim=1)
        return f[:, None] * (w + delta) - w


def variant_for(init: str, use_dora: bool) -> LoraVariant:
    """The variant of an adapter added with `init` and `use_dora`."""
    start = PissaVariant() if init == "pissa" else LoraVariant()
    return DoraVariant(start) if use_dora else start
