"""Quantized weights (QLoRA) through bitsandbytes, the library PEFT and transformers use: the
product with a quantized weight, its dequantized values, and the frozen Linear that holds one.
minilora.lora.qlora quantizes a model's weights.

``quantize_model(model, "nf4")`` replaces the weight of every frozen Linear (the output head and
Linears tied to an embedding excepted, as transformers does) by a bitsandbytes 4-bit NF4 weight
(double quantization, blocks of 64) or, with ``"int8"``, an LLM.int8 weight. LoRA layers keep
their A and B in float32 and trainable; their base product becomes the quantized matmul
(``quantized_linear``), by composition: LoRALinear still owns ``weight`` under its own name.

Precision: the quantized product computes in the input's dtype, or in the autocast dtype under
autocast (bf16 compute with ``--dtype bfloat16``, as QLoRA's ``bnb_4bit_compute_dtype``).

Base fingerprint: a quantized weight no longer holds the values its adapters were trained on, so
``quantize_model`` fingerprints the LoRA layers' weights *before* quantizing and records it on
each of them (``LoRALinear.quantized_from``); ``minilora.lora.fingerprint.base_fingerprint``
returns that record for a quantized model. An adapter trained on an NF4 base therefore carries
the fingerprint of the full-precision weights it was quantized from: it loads onto that base,
and is refused on another.

Merging into a quantized weight is refused (a merged 4-bit weight would round the update away):
merge the adapter into the full-precision base instead (``minilora merge``), which writes a
full-precision model.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minilora.core.errors import MissingExtra
from minilora.core.lowrank import autocast_dtype_for

QUANT_KINDS = ("nf4", "int8")


def require_bitsandbytes() -> ModuleType:
    """Imports bitsandbytes.

    Raises:
        MissingExtra: it is not installed (the message names the ``qlora`` extra).
    """
    # On a CPU with AVX512-BF16, importing bitsandbytes tries an optional kernel from the Hugging
    # Face hub, which needs trust_remote_code (minilora never turns it on), and logs a warning
    # about it; bitsandbytes then uses its own CPU kernel, which is what minilora tests against.
    # The warning asks the user to do something they need not do: it is dropped.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_remote_kernel_warning)
    try:
        import bitsandbytes
    except ImportError:
        raise MissingExtra("--quantize (a bitsandbytes-quantized base)", "qlora") from None
    return bitsandbytes


def _drop_remote_kernel_warning(record: logging.LogRecord) -> bool:
    return "kernels-community" not in record.getMessage()


def is_quantized(weight: Tensor) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit or 8-bit weight (False without bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(weight, (bnb.nn.Params4bit, bnb.nn.Int8Params))


def stored_values(weight: Tensor) -> int:
    """The number of values a weight stands for: a 4-bit weight's original shape (its storage
    packs two a byte), any other tensor's numel."""
    state = getattr(weight, "quant_state", None) if is_quantized(weight) else None
    if state is None:
        return weight.numel()
    return int(torch.Size(state.shape).numel())


def quant_kind(weight: Tensor) -> str:
    """"nf4" (or "fp4") for a 4-bit weight, "int8" for an 8-bit one."""
    state = getattr(weight, "quant_state", None)
    return "int8" if state is None else state.quant_type


def quantized_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ W^T + b`` with a bitsandbytes weight; gradients flow to x (W is frozen).

    Computes in x's dtype, or the autocast dtype under autocast; returns that dtype.
    """
    bnb = sys.modules["bitsandbytes"]
    device = x.device.type
    dt = autocast_dtype_for(device, x.dtype) or x.dtype
    with torch.autocast(device, enabled=False):
        x = x.to(dt)
        b = None if bias is None else bias.to(dt)
        if isinstance(weight, bnb.nn.Params4bit):
            y = bnb.matmul_4bit(x, weight.t(), bias=b, quant_state=weight.quant_state)
        else:
            int8: Any = weight  # bitsandbytes' Int8Params: its int8 rows CB and row scales SCB
            state = bnb.MatmulLtState()
            state.CB, state.SCB, state.has_fp16_weights = int8.CB, int8.SCB, False
            y = bnb.matmul(x, weight, bias=b, state=state).to(dt)
    # LoRA adds its update into this output in place; autograd forbids that on a view made
    # inside a custom Function (bitsandbytes' int8 product returns one), so own the memory.
    return y.clone() if y._base is not None else y


@torch.no_grad()
def dequantize(weight: Tensor) -> Tensor:
    """The float32 values a bitsandbytes weight stands for (a plain tensor passes through)."""
    if not is_quantized(weight):
        return weight.float()
    bnb = sys.modules["bitsandbytes"]
    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    int8: Any = weight  # bitsandbytes' Int8Params: its int8 rows CB and row scales SCB
    return int8.CB.float() * int8.SCB.float()[:, None] / 127.0  # LLM.int8's row scale


class QuantizedLinear(nn.Linear):
    """A frozen Linear whose weight is a bitsandbytes 4-bit or 8-bit weight.

    Not bitsandbytes' own Linear4bit: in eval mode on a CPU with AVX512-BF16, that layer repacks
    its weight in place for an inference kernel, after which no gradient flows through it
    (bitsandbytes 0.50.2), and train() evaluates between steps. This one always computes
    ``quantized_linear``, LoRALinear's base product, so both kinds of layer compute alike.
    """

    def forward(self, x: Tensor) -> Tensor:
        return quantized_linear(x, self.weight, self.bias)


class LinearWeights(Protocol):
    """What a base product reads: a Linear's or a LoRALinear's weight and bias."""

    @property
    def weight(self) -> Tensor: ...

    @property
    def bias(self) -> Tensor | None: ...


def base_output(module: LinearWeights, x: Tensor) -> Tensor:
    """A LoRALinear's base product: the quantized matmul for a bitsandbytes weight."""
    if is_quantized(module.weight):
        return quantized_linear(x, module.weight, module.bias)
    return F.linear(x, module.weight, module.bias)
