"""PEFT's adapter folder: its file names and keys, reading one, and its adapter_config.json.

A folder holds `adapter_model.safetensors` (keys `base_model.model.<path>.lora_A.weight`,
header metadata `{"format": "pt"}` plus minilora's own entries) and `adapter_config.json` (PEFT's
LoraConfig keys). A model's non-default adapters are saved into subfolders named after them.
docs/formats.md describes the layout. This file knows the format, not the model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from minilora.core.errors import AdapterError, ConfigError
from minilora.core.files import read_json, regular_file
from minilora.core.tensor_checks import tensor_problems
from minilora.lora.config import DEFAULT_ADAPTER, LoraConfig

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FINGERPRINT_KEY = "minilora_base_fingerprint"
VERSION_KEY = "minilora_version"
MAGNITUDE_KEY = "lora_magnitude_vector"  # DoRA's m, PEFT's key (no adapter name, no ".weight")
# An embedding's A (r, num_embeddings) and B (embedding_dim, r): PEFT's keys, no ".weight"
EMBEDDING_KEYS = ("lora_embedding_A", "lora_embedding_B")
_EMBEDDING_KEY_RE = re.compile(r"(.+)\.lora_embedding_[AB]")
# PEFT also saves the base weights of an adapted lm_head / embed_tokens (save_embedding_layers)
BASE_LAYER_RE = re.compile(r"(.+)\.base_layer\.(weight|bias)")
_KEY_RE = re.compile(r"(.+)\.lora_([AB])\.weight")

# PEFT LoraConfig keys whose non-default values change what the adapter computes in ways
# minilora does not implement: loading such an adapter is refused rather than silently wrong.
_UNSUPPORTED_PEFT: dict[str, tuple[Any, ...]] = {  # key -> the values that are fine
    "bias": ("none", None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "fan_in_fan_out": (False, None),
    "layers_to_transform": (None, []),
    "layer_replication": (None, []),
    "lora_bias": (False, None),
    "target_parameters": (None, []),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None, []),
    "use_bdlora": (None, False),
    # KaSA truncates the base weight's SVD and puts a learned diagonal between A and B
    "kasa_config": (None, {}),
    "monteclora_config": (None, {}),  # Monte Carlo sampling around the adapter
    "arrow_config": (None, {}),  # routing among several adapters per token
    "megatron_config": (None, {}),  # tensor-parallel layers
}
# The type of each adapter_config.json field minilora reads ("use_rslora": "false" is a string,
# which is true in Python: refused, not guessed).
_PEFT_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "peft_type": ((str,), "a string"),
    "r": ((int,), "an integer"),
    "lora_alpha": ((int, float), "a number"),
    "lora_dropout": ((int, float), "a number"),
    "use_rslora": ((bool,), "true or false"),
    "use_dora": ((bool, type(None)), "true or false"),
    "target_modules": ((list, str, type(None)), "a list of names, a regex or null"),
    "exclude_modules": ((list, str, type(None)), "a list of names, a regex or null"),
    "init_lora_weights": ((bool, str), "true, false or an init name"),
    "modules_to_save": ((list, type(None)), "a list of module names or null"),
    "trainable_token_indices": ((list, dict, type(None)),
                                "a list of token ids, module name -> ids, or null"),
    "ensure_weight_tying": ((bool, type(None)), "true or false"),
}
# PEFT inits that rewrite the base weights (PiSSA and pissa_niter_N, OLoRA, CorDA, LoftQ,
# LoRA-GA): PeftModel.from_pretrained repeats the initialisation on the base it is given, so the
# saved A and B only mean something beside that rewritten base, which the file does not hold or
# name (given the original base, they loaded with logits off by 1.7 to 5.6). Refused, naming
# the field; minilora writes its own trained PiSSA adapters as plain LoRA (pissa_initial).
# EVA is not among them: it initialises A from activations and leaves the base as it is.
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


def find_adapters(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """The adapters a folder holds in PEFT's layout: the folder itself ("default") and each
    subfolder with an adapter_config.json (named after it).

    Returns:
        name -> adapter folder, "default" first when present.
    """
    folder = Path(folder)
    found = {}
    if (folder / CONFIG_NAME).is_file():
        found[DEFAULT_ADAPTER] = folder
    if folder.is_dir():
        for sub in sorted(folder.iterdir()):
            if sub.is_dir() and (sub / CONFIG_NAME).is_file():
                found[sub.name] = sub
    return found


def read_peft(folder: Path, *, initial_pissa: bool = False
              ) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, str]]:
    """One PEFT adapter folder, read without a model.

    Returns:
        Its LoraConfig, its tensors under the file's keys (PEFT's base-layer copies included)
        and the safetensors header metadata.

    Args:
        folder: the adapter folder.
        initial_pissa: read a PiSSA adapter (``init_lora_weights: "pissa"``), as the initial
            state ``save_adapter(..., pissa_initial=folder)`` converts from; refused otherwise.

    Raises:
        AdapterError: a missing, unreadable or non-regular file, a config minilora cannot
            honour (an init that rewrote the base weights among them), or tensors that are not
            usable LoRA weights.
    """
    weights = folder / WEIGHTS_NAME
    for file in (weights, folder / CONFIG_NAME):
        if file.exists():  # a FIFO or a device there would never end or never answer
            regular_file(file, "a regular file")
    if not weights.is_file():
        hint = " (adapter_model.bin is a pickle; minilora reads safetensors only)" if (
            folder / "adapter_model.bin"
        ).exists() else ""
        raise AdapterError(f"missing {weights}{hint}")
    data = _read_json(folder / CONFIG_NAME)
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise AdapterError(f"{weights} is not a readable safetensors file: {e}") from None
    check_tensors(sd, weights)
    return _config_from_peft(data, folder / CONFIG_NAME, sd, initial_pissa), sd, metadata


def check_tensors(sd: dict[str, torch.Tensor], source: Path) -> None:
    """Raises one AdapterError naming every tensor that is not a usable weight."""
    problems = tensor_problems(sd)
    if problems:
        raise AdapterError(f"{source}: not usable LoRA weights: " + "; ".join(problems))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path, "an adapter_config.json", error=AdapterError)
    except FileNotFoundError:
        raise AdapterError(f"missing {path}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _config_from_peft(data: dict[str, Any], source: Path, sd: dict[str, torch.Tensor],
                      initial_pissa: bool = False) -> LoraConfig:
    def fail(key: str, why: str) -> AdapterError:
        return AdapterError(f"{source}: field {key!r} {why}")

    if data.get("peft_type") != "LORA":
        raise fail("peft_type", f"is {data.get('peft_type')!r}; minilora reads 'LORA' adapters")
    for key in ("r", "lora_alpha"):
        if key not in data:
            raise fail(key, "is missing")
    for key, (kinds, expected) in _PEFT_TYPES.items():
        value = data.get(key)
        if key in data and (isinstance(value, bool) and bool not in kinds
                            or not isinstance(value, kinds)):
            raise fail(key, f"is {value!r}; expected {expected}")
    for key, fine in _UNSUPPORTED_PEFT.items():
        if key in data and data[key] not in fine:
            raise fail(key, f"is {data[key]!r}; minilora supports only {fine[0]!r}")
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS) and not (
            initial_pissa and init.startswith("pissa")):
        raise fail("init_lora_weights", f"is {init!r}: that initialisation rewrote the base "
                   "weights (PEFT repeats it on the base it loads the adapter onto), so A and B "
                   "do not fit a base as it is; convert it to plain LoRA with PEFT "
                   "(save_pretrained's path_initial_model_for_weight_conversion)")
    if isinstance(init, str) and init.startswith("pissa"):
        init = "pissa"  # "pissa_niter_4" too: the same adapter, its SVD found faster
    targets = data.get("target_modules")
    if targets is None:  # PEFT's per-architecture default: the keys say which modules
        targets = sorted({m[1] for k in sd if (m := _KEY_RE.fullmatch(k.removeprefix(PREFIX))
                                                    or _EMBEDDING_KEY_RE.fullmatch(
                                                        k.removeprefix(PREFIX)))})
    _refuse_tied_embedding_lora(data, sd, fail)
    exclude = data.get("exclude_modules") or []
    saved, tokens = data.get("modules_to_save") or [], data.get("trainable_token_indices") or []
    if data.get("ensure_weight_tying") and (saved or tokens):
        # it re-ties copies and rows PEFT's default keeps apart; minilora implements the default
        raise fail("ensure_weight_tying", "is true; minilora reads modules_to_save and "
                   "trainable_token_indices as PEFT's default (false) applies them")
    try:
        return LoraConfig(
            r=data["r"],
            alpha=data["lora_alpha"],
            dropout=data.get("lora_dropout", 0.0),
            targets=targets,
            exclude=exclude,
            init=init if init in ("gaussian", "pissa") else "kaiming",
            use_rslora=data.get("use_rslora", False),
            use_dora=bool(data.get("use_dora")),
            modules_to_save=saved,
            trainable_token_indices=tokens,
        )
    except ConfigError as e:  # in the file's words: field 'lora_alpha', not LoraConfig.alpha
        e.words = {name: f"field {key!r}" for name, key in _PEFT_NAMES.items()}
        raise AdapterError(f"{source}: {e}") from None
    except ValueError as e:
        raise AdapterError(f"{source}: {e}") from None


def _refuse_tied_embedding_lora(data: dict[str, Any], sd: dict[str, torch.Tensor],
                                fail: Any) -> None:
    """PEFT's ``ensure_weight_tying`` gives a tied output head the embedding's LoRA too;
    minilora's embedding LoRA changes the lookup only (PEFT's default): such a file is refused
    rather than loaded computing something else."""
    if data.get("ensure_weight_tying") and any(
            _EMBEDDING_KEY_RE.fullmatch(k.removeprefix(PREFIX)) for k in sd):
        raise fail("ensure_weight_tying", "is true with LoRA on an embedding: the tied output "
                   "head would share the embedding's update, which minilora does not do; save "
                   "the adapter with ensure_weight_tying false")


# LoraConfig's field -> the adapter_config.json key it is read from.
_PEFT_NAMES = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
               "targets": "target_modules", "exclude": "exclude_modules",
               "init": "init_lora_weights", "use_rslora": "use_rslora", "use_dora": "use_dora",
               "modules_to_save": "modules_to_save",
               "trainable_token_indices": "trainable_token_indices"}


def peft_config_dict(
    config: LoraConfig, targets: list[str], base_model_name_or_path: str | None
) -> dict[str, Any]:
    """The adapter_config.json PEFT reads for `config`, adapting exactly `targets`."""
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "exclude_modules": None,  # target_modules already leaves the excluded layers out
        "bias": "none",
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": False,
        "init_lora_weights": {"gaussian": "gaussian", "pissa": "pissa"}.get(config.init, True),
        "modules_to_save": list(config.modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
        # PEFT 0.15+'s key, written only when used: older PEFT versions do not know it
        **({"trainable_token_indices": config.trainable_token_indices}
           if config.trainable_token_indices else {}),
    }
