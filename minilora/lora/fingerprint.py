"""The base fingerprint: a hash of the base weights an adapter was trained on.

An adapter file records it; loading refuses an adapter whose fingerprint differs from the
model's, and a checkpoint refuses to resume on another base. docs/formats.md describes it.
"""

from __future__ import annotations

from torch import nn

from minilora.core.errors import AdapterError
from minilora.core.tensor_checks import is_sharded
from minilora.lora.layer import lora_modules
from minilora.lora.named import adapter_layers, resolve_adapter
from minilora.lora.quantized_weight import QUANTIZED_FROM, is_quantized
from minilora.lora.weight_hash import hash_weights

# Where a model sharded across processes (FSDP) keeps the fingerprint of its whole base weights,
# recorded before sharding: afterwards each process holds only a shard of them.
SHARDED_FROM = "minilora_sharded_from"


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
        return _sharded_fingerprint(model, [n for n, _ in modules], sharded)
    quantized = [n for n, m in modules if is_quantized(m.weight)]
    if quantized:
        return _quantized_fingerprint(model, [n for n, _ in modules], quantized)
    return hash_weights({n: m.weight.detach() for n, m in modules})


def _quantized_fingerprint(model: nn.Module, names: list[str], quantized: list[str]) -> str:
    """The fingerprint quantize_model recorded from the weights before quantizing them."""
    record = getattr(model, QUANTIZED_FROM, None)
    if record is None or tuple(sorted(names)) != record["modules"]:
        raise AdapterError(
            f"{quantized[0]}.weight is quantized and no fingerprint of its full-precision "
            "weights was recorded for these layers (quantize_model records it when LoRA is "
            "injected before quantizing)")
    return record["fingerprint"]


def record_fingerprint_before_sharding(model: nn.Module) -> None:
    """Records the base fingerprint of ``model``'s whole weights, for ``base_fingerprint`` to
    return once they are sharded across processes (it hashes whole weights, which no process
    then holds)."""
    setattr(model, SHARDED_FROM, {"fingerprint": base_fingerprint(model),
                                  "modules": tuple(sorted(n for n, _ in lora_modules(model)))})


def _sharded_fingerprint(model: nn.Module, names: list[str], sharded: list[str]) -> str:
    record = getattr(model, SHARDED_FROM, None)
    if record is None or tuple(sorted(names)) != record["modules"]:
        raise AdapterError(
            f"{sharded[0]}.weight is sharded across processes and no fingerprint of the whole "
            "weights was recorded for these layers (record_fingerprint_before_sharding)")
    return record["fingerprint"]
