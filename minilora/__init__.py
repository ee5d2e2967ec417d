"""minilora: LoRA fine-tuning of small causal language models.

The public API, re-exported from the files that own it (one file per concept, see DESIGN.md).
"""

__version__ = "0.1.0"

# `train` the function stays in minilora.train: re-exported here it would hide the submodule
# (`import minilora.train` would then give the function).
# The names below are imported on first use (PEP 562): `import minilora` (and so `minilora --help`)
# stays free of torch, which takes a second and a few hundred MB to import.
_EXPORTS = {
    "minilora.adapter": (
        "load_adapter", "save_adapter",
    ),
    "minilora.adapter_state": (
        "adapter_state_dict", "load_adapter_state_dict",
    ),
    "minilora.chat": (
        "chat_answerer", "stream_reply", "stream_text",
    ),
    "minilora.data": (
        "load_jsonl",
    ),
    "minilora.describe": (
        "describe_adapter", "describe_path", "resolve_adapter_path",
    ),
    "minilora.fingerprint": (
        "base_fingerprint",
    ),
    "minilora.peft_format": (
        "find_adapters",
    ),
    "minilora.errors": (
        "AdapterError", "CheckpointError", "ConfigError", "DataError", "FingerprintMismatch",
        "MiniloraError", "MissingExtra", "OutputError", "TaskError", "TrainError", "WeightsError",
    ),
    "minilora.injection": (
        "count_parameters", "disabled", "inject_lora", "lora_parameters", "mark_trainable",
        "merge_and_unload", "merge_lora", "unmerge_lora",
    ),
    "minilora.lora": (
        "LoRALinear", "lora_modules",
    ),
    "minilora.lora_config": (
        "LoraConfig", "check_adapter_name",
    ),
    "minilora.named_adapters": (
        "active_adapters", "combine_adapters", "delete_adapter", "list_adapters",
        "mixed_adapters", "set_active",
    ),
    "minilora.generation": (
        "generate", "stream_generate",
    ),
    "minilora.model": (
        "CausalLM",
    ),
    "minilora.model_config": (
        "ModelConfig",
    ),
    "minilora.tokenizer": (
        "Tokenizer", "train_tokenizer",
    ),
    "minilora.train_config": (
        "TrainConfig",
    ),
    "minilora.weights": (
        "describe_model", "load_model", "save_model",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'minilora' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))


__all__ = [
    "__version__", "AdapterError", "CausalLM", "CheckpointError", "ConfigError", "DataError",
    "FingerprintMismatch", "MiniloraError", "MissingExtra", "OutputError", "TaskError",
    "LoraConfig", "LoRALinear",
    "ModelConfig", "Tokenizer", "TrainConfig", "TrainError", "WeightsError", "active_adapters",
    "adapter_state_dict", "base_fingerprint", "check_adapter_name", "combine_adapters",
    "count_parameters",
    "delete_adapter", "describe_adapter", "describe_model", "disabled", "find_adapters",
    "generate", "inject_lora", "list_adapters", "load_adapter", "load_adapter_state_dict",
    "load_jsonl", "load_model", "lora_modules", "lora_parameters", "mark_trainable",
    "merge_and_unload", "merge_lora", "mixed_adapters", "save_adapter", "save_model",
    "set_active", "stream_generate", "train_tokenizer", "unmerge_lora",
    "chat_answerer", "describe_path", "resolve_adapter_path", "stream_reply", "stream_text",
]
