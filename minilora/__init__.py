"""minilora: LoRA fine-tuning of small causal language models.

The public API, re-exported from the files that own it (one file per concept, see DESIGN.md).
"""

__version__ = "0.1.0"

# `train` the function stays in minilora.train: re-exported here it would hide the submodule
# (`import minilora.train` would then give the function).
from minilora.adapter import (
    adapter_state_dict,
    base_fingerprint,
    describe_adapter,
    find_adapters,
    load_adapter,
    load_adapter_state_dict,
    save_adapter,
)
from minilora.data import load_jsonl
from minilora.errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    DataError,
    FingerprintMismatch,
    MiniloraError,
    MissingExtra,
    OutputError,
    TaskError,
    TrainError,
    WeightsError,
)
from minilora.lora import (
    LoraConfig,
    LoRALinear,
    active_adapters,
    combine_adapters,
    count_parameters,
    delete_adapter,
    disabled,
    inject_lora,
    list_adapters,
    lora_modules,
    lora_parameters,
    mark_trainable,
    merge_and_unload,
    merge_lora,
    mixed_adapters,
    set_active,
    unmerge_lora,
)
from minilora.model import CausalLM, ModelConfig, generate, stream_generate
from minilora.tokenizer import Tokenizer, train_tokenizer
from minilora.train import TrainConfig
from minilora.weights import describe_model, load_model, save_model

__all__ = [
    "__version__", "AdapterError", "CausalLM", "CheckpointError", "ConfigError", "DataError",
    "FingerprintMismatch", "MiniloraError", "MissingExtra", "OutputError", "TaskError",
    "LoraConfig", "LoRALinear",
    "ModelConfig", "Tokenizer", "TrainConfig", "TrainError", "WeightsError", "active_adapters",
    "adapter_state_dict", "base_fingerprint", "combine_adapters", "count_parameters",
    "delete_adapter", "describe_adapter", "describe_model", "disabled", "find_adapters",
    "generate", "inject_lora", "list_adapters", "load_adapter", "load_adapter_state_dict",
    "load_jsonl", "load_model", "lora_modules", "lora_parameters", "mark_trainable",
    "merge_and_unload", "merge_lora", "mixed_adapters", "save_adapter", "save_model",
    "set_active", "stream_generate", "train_tokenizer", "unmerge_lora",
]
