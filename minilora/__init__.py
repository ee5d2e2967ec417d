"""minilora: LoRA fine-tuning of small causal language models.

The public API, re-exported from the rooms that own it (docs/architecture.md is the map).
"""

__version__ = "0.1.0"

# The names below are imported on first use (PEP 562): `import minilora` (and so `minilora --help`)
# stays free of torch, which takes a second and a few hundred MB to import.
_EXPORTS = {
    "minilora.adapters.folder": (
        "load_adapter", "save_adapter",
    ),
    "minilora.adapters.state": (
        "adapter_state_dict", "load_adapter_state_dict",
    ),
    "minilora.decoding.chat": (
        "chat_answerer", "stream_reply", "stream_text",
    ),
    "minilora.data.sft": (
        "load_jsonl",
    ),
    "minilora.training.describe": (
        "describe_adapter", "describe_path", "resolve_adapter_path",
    ),
    "minilora.lora.fingerprint": (
        "base_fingerprint",
    ),
    "minilora.adapters.peft": (
        "find_adapters",
    ),
    "minilora.core.errors": (
        "AdapterError", "CheckpointError", "ConfigError", "DataError", "ExportError",
        "FingerprintMismatch",
        "MiniloraError", "MissingExtra", "OutputError", "TaskError", "TrainError", "WeightsError",
    ),
    "minilora.lora.injection": (
        "count_parameters", "disabled", "inject_lora", "lora_parameters", "mark_trainable",
        "merge_and_unload", "merge_lora", "unmerge_lora",
    ),
    "minilora.lora.layer": (
        "LoRALinear", "lora_modules",
    ),
    "minilora.lora.embedding": (
        "LoRAEmbedding",
    ),
    "minilora.lora.config": (
        "LoraConfig", "check_adapter_name",
    ),
    "minilora.lora.named": (
        "active_adapters", "combine_adapters", "delete_adapter", "list_adapters",
        "mixed_adapters", "set_active",
    ),
    "minilora.decoding.generation": (
        "generate", "stream_generate",
    ),
    "minilora.model.decoder": (
        "CausalLM",
    ),
    "minilora.model.config": (
        "ModelConfig",
    ),
    "minilora.data.tokenizer": (
        "Tokenizer", "train_tokenizer",
    ),
    "minilora.training.config": (
        "TrainConfig",
    ),
    "minilora.training.loop": (
        "train",
    ),
    "minilora.model.io": (
        "describe_model", "load_model", "save_model",
    ),
    "minilora.export.gguf": (
        "export_gguf",
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
    "ExportError",
    "FingerprintMismatch", "MiniloraError", "MissingExtra", "OutputError", "TaskError",
    "LoraConfig", "LoRALinear", "LoRAEmbedding",
    "ModelConfig", "Tokenizer", "TrainConfig", "TrainError", "WeightsError", "active_adapters",
    "adapter_state_dict", "base_fingerprint", "check_adapter_name", "combine_adapters",
    "count_parameters",
    "delete_adapter", "describe_adapter", "describe_model", "disabled", "export_gguf",
    "find_adapters",
    "generate", "inject_lora", "list_adapters", "load_adapter", "load_adapter_state_dict",
    "load_jsonl", "load_model", "lora_modules", "lora_parameters", "mark_trainable",
    "merge_and_unload", "merge_lora", "mixed_adapters", "save_adapter", "save_model",
    "set_active", "stream_generate", "train", "train_tokenizer", "unmerge_lora",
    "chat_answerer", "describe_path", "resolve_adapter_path", "stream_reply", "stream_text",
]
