"""A quantized frozen base (QLoRA) through bitsandbytes, the library PEFT and transformers use.

``quantize_model(model, "nf4")`` replaces the weight of every frozen Linear (the output head and
Linears tied to an embedding excepted, as transformers does) by a bitsandbytes 4-bit NF4 weight
(double quantization, blocks of 64) or, with ``"int8"``, an LLM.int8 weight. LoRA layers keep
their A and B in float32 and trainable; their base product becomes the quantized matmul
(``quantized_linear``), by composition: LoRALinear still owns ``weight`` under its own name.

Precision: the quantized product computes in the input's dtype, or in the autocast dtype under
autocast (bf16 compute with ``--dtype bfloat16``, as QLoRA's ``bnb_4bit_compute_dtype``).

Base fingerprint: a quantized weight no longer holds the values its adapters were trained on, so
``quantize_model`` fingerprints the LoRA layers' weights *before* quantizing and records it on the
model (``QUANTIZED_FROM``); ``minilora.adapter.base_fingerprint`` returns that record for a
quantized model. An adapter trained on an NF4 base therefore carries the fingerprint of the
full-precision weights it was quantized from: it loads onto that base, and is refused on another.

Merging into a quantized weight is refused (a merged 4-bit weight would round the update away):
merge the adapter into the full-precision base instead (``minilora merge``), which writes a
full-precision model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minilora.errors import ConfigError, MissingExtra

QUANT_KINDS = ("nf4", "int8")
# The model attribute holding {"fingerprint": ..., "modules": (...), "kind": ...}.
QUANTIZED_FROM = "minilora_quantized_from"


def require_bitsandbytes():
    """Imports bitsandbytes.

    Raises:
        MissingExtra: it is not installed (the message names the ``qlora`` extra).
    """
    try:
        import bitsandbytes
    except ImportError:
        raise MissingExtra("--quantize (a bitsandbytes-quantized base)", "qlora") from None
    return bitsandbytes


def is_quantized(weight: Tensor) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit or 8-bit weight (False without bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(weight, (bnb.nn.Params4bit, bnb.nn.Int8Params))


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
    dt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        x = x.to(dt)
        b = None if bias is None else bias.to(dt)
        if isinstance(weight, bnb.nn.Params4bit):
            y = bnb.matmul_4bit(x, weight.t(), bias=b, quant_state=weight.quant_state)
        else:
            state = bnb.MatmulLtState()
            state.CB, state.SCB, state.has_fp16_weights = weight.CB, weight.SCB, False
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
    return weight.CB.float() * weight.SCB.float()[:, None] / 127.0  # LLM.int8's row scale


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
    from minilora.adapter import base_fingerprint
    from minilora.lora import LoRALinear, _output_head_names, lora_modules

    if kind not in QUANT_KINDS:
        raise ConfigError(f"quantize: expected one of {QUANT_KINDS}, got {kind!r}")
    require_bitsandbytes()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, LoRALinear)) and not is_quantized(m.weight)
               and id(m.weight) not in embeddings and not _inside_lora(n, model)]
    heads = _output_head_names(model, linears)
    chosen = [(n, m) for n, m in linears if n not in heads]
    problems = [f"{n}: weight is trainable (quantize freezes it)" for n, m in chosen
                if m.weight.requires_grad]
    problems += [f"{n}: LoRA is merged into it; unmerge first" for n, m in chosen
                 if getattr(m, "merged", False)]
    problems += [f"{n}: weight is {m.weight.dtype} (bitsandbytes quantizes float16, bfloat16, "
                 f"float32)" for n, m in chosen
                 if m.weight.dtype not in (torch.float16, torch.bfloat16, torch.float32)]
    problems += [f"{n}: weight is on the meta device" for n, m in chosen if m.weight.is_meta]
    if problems:
        raise ConfigError("cannot quantize: " + "; ".join(problems))
    if lora_modules(model):
        setattr(model, QUANTIZED_FROM, {
            "fingerprint": base_fingerprint(model), "kind": kind,
            "modules": tuple(sorted(n for n, _ in lora_modules(model)))})
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


def _inside_lora(name: str, model: nn.Module) -> bool:
    """Whether a module is a LoRALinear's own lora_A / lora_B (never quantized)."""
    return ".lora_A" in f".{name}" or ".lora_B" in f".{name}" or ".lora_adapters." in f".{name}"


def _nbytes(q: Tensor) -> int:
    n = q.data.numel() * q.data.element_size()
    state = getattr(q, "quant_state", None)
    if state is not None and state.absmax is not None:
        n += state.absmax.numel() * state.absmax.element_size()
    scb = getattr(q, "SCB", None)
    return n + (scb.numel() * scb.element_size() if scb is not None else 0)


class QuantizedLinear(nn.Linear):
    """A frozen Linear whose weight is a bitsandbytes 4-bit or 8-bit weight.

    Not bitsandbytes' own Linear4bit: in eval mode on a CPU with AVX512-BF16, that layer repacks
    its weight in place for an inference kernel, after which no gradient flows through it
    (bitsandbytes 0.50.2), and train() evaluates between steps. This one always computes
    ``quantized_linear``, LoRALinear's base product, so both kinds of layer compute alike.
    """

    def forward(self, x: Tensor) -> Tensor:
        return quantized_linear(x, self.weight, self.bias)


def _replace_linear(model: nn.Module, name: str, linear: nn.Linear, q: nn.Parameter) -> None:
    new = QuantizedLinear(linear.in_features, linear.out_features, bias=False, device="meta")
    new.weight = q
    new.bias = linear.bias
    new.train(linear.training)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def base_output(module: nn.Module, x: Tensor) -> Tensor:
    """A LoRALinear's base product: the quantized matmul for a bitsandbytes weight."""
    if is_quantized(module.weight):
        return quantized_linear(x, module.weight, module.bias)
    return F.linear(x, module.weight, module.bias)
