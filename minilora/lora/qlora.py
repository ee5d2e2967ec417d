"""Quantizing a model's frozen base for QLoRA: `quantize_model`.

Every frozen Linear's weight (the output head and Linears tied to an embedding excepted, as
transformers does) becomes a bitsandbytes weight; quantized_weight.py holds what such a weight
computes. The LoRA layers' base fingerprint is recorded before (see minilora.lora.quantized_weight).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minilora.core.errors import ConfigError
from minilora.lora.embedding import LoRAEmbedding
from minilora.lora.fingerprint import base_fingerprint
from minilora.lora.injection import linear_modules, output_head_names
from minilora.lora.layer import LoRALinear, lora_modules
from minilora.lora.quantized_weight import (
    QUANT_KINDS,
    QuantizedLinear,
    is_quantized,
    require_bitsandbytes,
)


def _quantize(weight: Tensor, kind: str, device: torch.device | str) -> nn.Parameter:
    bnb = sys.modules["bitsandbytes"]
    data = weight.detach().to("cpu")
    if kind == "nf4":
        q = bnb.nn.Params4bit(data, requires_grad=False, quant_type="nf4",
                              compress_statistics=True, blocksize=64)
    else:
        q = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
    # Params4bit / Int8Params quantize on their first move to a device (cpu included).
    return q.to(device)


@dataclass
class QuantReport:
    """What ``quantize_model`` did: the quantized Linears by name, the bytes before and after."""

    kind: str
    modules: list[str]
    bytes_before: int
    bytes_after: int

    def __str__(self) -> str:
        return (f"quantized {len(self.modules)} Linear weights to {self.kind}: "
                f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB")


def quantize_model(model: nn.Module, kind: str, device: torch.device | str | None = None
                   ) -> QuantReport:
    """Quantizes the frozen Linear weights of ``model`` in place (LoRA layers' base included).

    Call it after ``inject_lora``: the fingerprint of the LoRA layers' full-precision weights is
    recorded first (see the module docstring). Plain Linears become ``QuantizedLinear`` layers.

    Args:
        model: a model with LoRA injected (or none), on any device.
        kind: "nf4" or "int8".
        device: where the quantized weights go (bitsandbytes quantizes there); default: where
            each weight is. The rest of the model stays where it is.

    Returns:
        A QuantReport.

    Raises:
        ConfigError: an unknown kind, a trainable or merged layer, or a weight bitsandbytes cannot
            quantize (named); nothing is changed then.
        MissingExtra: bitsandbytes is not installed.
    """
    if kind not in QUANT_KINDS:
        raise ConfigError(f"quantize: expected one of {QUANT_KINDS}, got {kind!r}")
    require_bitsandbytes()
    embeddings = {id(m.weight) for m in model.modules()
                  if isinstance(m, (nn.Embedding, LoRAEmbedding))}
    # linear_modules never descends into a LoRALinear: its own lora_A / lora_B stay float
    linears = [(n, m) for n, m in linear_modules(model)
               if not is_quantized(m.weight) and id(m.weight) not in embeddings]
    heads = output_head_names(model, linears)
    chosen = [(n, m) for n, m in linears if n not in heads]
    problems = [f"{n}: weight is trainable (quantize freezes it)" for n, m in chosen
                if m.weight.requires_grad]
    problems += [f"{n}: LoRA is merged into it; unmerge first" for n, m in chosen
                 if getattr(m, "merged", False)]
    problems += [f"{n}: a DoRA adapter needs the full-precision weight's norms" for n, m in chosen
                 if isinstance(m, LoRALinear) and len(m.lora_magnitude_vector)]
    problems += [f"{n}: weight is {m.weight.dtype} (bitsandbytes quantizes float16, bfloat16, "
                 f"float32)" for n, m in chosen
                 if m.weight.dtype not in (torch.float16, torch.bfloat16, torch.float32)]
    problems += [f"{n}: weight is on the meta device" for n, m in chosen if m.weight.is_meta]
    if problems:
        raise ConfigError("cannot quantize: " + "; ".join(problems))
    if lora_modules(model):  # kept by each LoRA layer (LoRALinear.quantized_from)
        record = {"fingerprint": base_fingerprint(model), "kind": kind,
                  "modules": tuple(sorted(n for n, _ in lora_modules(model)))}
        for _, m in lora_modules(model):
            m.quantized_from = record
    before = after = 0
    for name, module in chosen:
        before += module.weight.numel() * module.weight.element_size()
        q = _quantize(module.weight, kind, device or module.weight.device)
        after += _nbytes(q)
        if isinstance(module, LoRALinear):
            module.weight = q
        else:
            _replace_linear(model, name, module, q)
    return QuantReport(kind, [n for n, _ in chosen], before, after)


def _nbytes(q: Tensor) -> int:
    n = q.data.numel() * q.data.element_size()
    state = getattr(q, "quant_state", None)
    if state is not None and state.absmax is not None:
        n += state.absmax.numel() * state.absmax.element_size()
    scb = getattr(q, "SCB", None)
    return n + (scb.numel() * scb.element_size() if scb is not None else 0)


def _replace_linear(model: nn.Module, name: str, linear: nn.Linear, q: nn.Parameter) -> None:
    new = QuantizedLinear(linear.in_features, linear.out_features, bias=False, device="meta")
    new.weight = q
    new.bias = linear.bias
    new.train(linear.training)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


