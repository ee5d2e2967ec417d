"""The base fingerprint: a hash of the base weights an adapter was trained on.

An adapter file records it; loading refuses an adapter whose fingerprint differs from the
model's, and a checkpoint refuses to resume on another base. docs/formats.md describes it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from minilora.core.errors import AdapterError
from minilora.core.tensor_checks import is_sharded
from minilora.lora.layer import LoRALayer, lora_modules
from minilora.lora.named import adapter_layers, resolve_adapter
from minilora.lora.quantized_weight import is_quantized
from minilora.lora.saved_modules import saved_layers
from minilora.lora.trainable_tokens import token_layers
from minilora.lora.weight_hash import hash_weights


def base_fingerprint(model: nn.Module, name: str | None = None) -> str:
    """Hashes the base weights of the layers that carry LoRA (adapter `name`'s layers only,
    when given).

    The hash covers each LoRA module's name, weight shape and weight values rounded to bfloat16,
    so a float32 base and its bfloat16 copy share a fingerprint (a float16 copy, rounded twice,
    does not).

    Returns:
        "sha256:<hex>".

    Raises:
        AdapterError: when the model has no LoRA modules (or no adapter `name`), or they are
            merged (the base weights are then not held exactly).
    """
    modules = lora_modules(model)
    if not modules:
        raise AdapterError("the model has no LoRA modules to fingerprint; inject_lora first")
    if name is not None:
        name = resolve_adapter(model, name, "fingerprint")
        modules = adapter_layers(model, name)
    merged = [n for n, m in modules if m.merged]
    if merged:
        raise AdapterError(
            f"LoRA is merged into {merged[:3]}{'...' if len(merged) > 3 else ''}: the base weights"
            " are not held exactly; call unmerge_lora(model) first"
        )
    sharded = [n for n, m in modules if is_sharded(m.weight)]
    if sharded:
        return _sharded_fingerprint(modules, sharded)
    quantized = [n for n, m in modules if is_quantized(m.weight)]
    if quantized:
        return _quantized_fingerprint(modules, quantized)
    return hash_weights({n: m.weight.detach() for n, m in modules}
                        | extra_base_weights(model, name))


def extra_base_weights(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """The base weights under the modules to save and trainable tokens (of adapter `name`, or
    of any adapter): what their copies and rows start from. Empty without them, so the
    fingerprint of a LoRA-only adapter is what it always was.

    Raises:
        AdapterError: when trainable tokens are merged into their weight.
    """
    weights: dict[str, Any] = {}
    for path, saved in saved_layers(model):
        if name is None or name in saved.adapters:
            for k, v in saved.original.state_dict().items():
                weights[f"{path}.{k}"] = v.detach()
    for path, tokens in token_layers(model):
        if tokens.tied_to is None and (name is None or name in tokens.adapters):
            if tokens.merged:
                raise AdapterError(f"trainable tokens are merged into {path}.weight: the base "
                                   "weights are not held exactly; call unmerge_lora(model) first")
            weights[f"{path}.weight"] = tokens.weight.detach()
    return weights


def _recorded(modules: list[tuple[str, LoRALayer]], records: list[dict[str, Any] | None],
              missing: str) -> str:
    """The fingerprint one record kept on every layer holds, for exactly these layers; else
    AdapterError(missing)."""
    distinct = {id(r): r for r in records}
    record = next(iter(distinct.values())) if len(distinct) == 1 else None
    if record is None or tuple(sorted(n for n, _ in modules)) != record["modules"]:
        raise AdapterError(missing)
    return str(record["fingerprint"])


def _quantized_fingerprint(modules: list[tuple[str, LoRALayer]], quantized: list[str]) -> str:
    """The fingerprint quantize_model recorded (on each layer) from the weights before
    quantizing them."""
    return _recorded(modules, [m.quantized_from for _, m in modules],
                     f"{quantized[0]}.weight is quantized and no fingerprint of its "
                     "full-precision weights was recorded for these layers (quantize_model "
                     "records it when LoRA is injected before quantizing)")


def record_fingerprint_before_sharding(model: nn.Module) -> None:
    """Records the base fingerprint of ``model``'s whole weights, for ``base_fingerprint`` to
    return once they are sharded across processes (it hashes whole weights, which no process
    then holds)."""
    record = {"fingerprint": base_fingerprint(model),
              "modules": tuple(sorted(n for n, _ in lora_modules(model)))}
    for _, m in lora_modules(model):  # each layer keeps it, as quantize_model's record
        m.sharded_from = record


def _sharded_fingerprint(modules: list[tuple[str, LoRALayer]], sharded: list[str]) -> str:
    """The fingerprint record_fingerprint_before_sharding kept (on each layer)."""
    return _recorded(modules, [m.sharded_from for _, m in modules],
                     f"{sharded[0]}.weight is sharded across processes and no fingerprint of the "
                     "whole weights was recorded for these layers "
                     "(record_fingerprint_before_sharding)")
