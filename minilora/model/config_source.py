"""The config of a base checkpoint: given, beside it (config.json), or, for a bare MiniMind
``.pth``, read from its tensors' names and shapes with that MiniMind generation's defaults."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from minilora.core.errors import BaseConfigNeeded, ConfigError, MissingFile, WeightsError
from minilora.model.config import GENERATIONS, MINIMIND_DEFAULTS, ModelConfig
from minilora.model.state_files import TORCH_SUFFIXES

# How a caller passes the config: load_model's keyword; the command line names its flag.
CONFIG_WORDS = {"base_config": "config=FILE"}


def resolve_config(path: Path, config: ModelConfig | dict[str, Any] | str | Path | None,
                   sd: dict[str, Tensor]) -> ModelConfig:
    """The config of the checkpoint at `path` whose tensors (or meta tensors of their shapes)
    are `sd`: `config` as ``load_model`` takes it, else the config.json beside `path`.

    Raises:
        MissingFile: no config given and no config.json beside a folder or safetensors file.
        BaseConfigNeeded: a bare MiniMind .pth without a config (its generation named).
        WeightsError: tensors that fit no MiniMind generation's config.
        ConfigError: an unreadable or invalid config.
    """
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, dict):
        return ModelConfig.from_hf_dict(config)
    if isinstance(config, str) and config in GENERATIONS and not Path(config).exists():
        return _minimind_config_from_shapes(sd, path, config)
    if config is not None:
        return ModelConfig.from_json(config)
    beside = (path if path.is_dir() else path.parent) / "config.json"
    if beside.is_file():
        return ModelConfig.from_json(beside)
    if path.is_dir() or path.suffix not in TORCH_SUFFIXES:
        raise MissingFile(f"{beside}: no config.json; pass the model's config ({{base_config}})",
                          fields=CONFIG_WORDS)
    generation = _generation_from_tensors(sd, path)
    moe = "model.layers.0.mlp.gate.weight" in sd
    unknown = ["rms_norm_eps", "rope_theta", "max_position_embeddings"]
    if generation == "minimind2":
        unknown.append("num_attention_heads")  # without q_norm no tensor holds head_dim
    if moe:
        unknown += ["num_experts_per_tok", "norm_topk_prob", "router_aux_loss_coef"]
    raise BaseConfigNeeded(str(path), unknown, generation)


def _generation_from_tensors(sd: dict[str, Tensor], path: Path) -> str:
    """Which MiniMind generation a state dict is: current MiniMind (minimind3) always has q/k
    norms and no shared experts; MiniMind2 never has q/k norms."""
    qk_norm = "model.layers.0.self_attn.q_norm.weight" in sd
    shared = any(k.startswith("model.layers.0.mlp.shared_experts.") for k in sd)
    if qk_norm and shared:
        raise WeightsError(f"{path}: q/k norms (current MiniMind) beside shared experts "
                           f"(MiniMind2) fit neither MiniMind generation; pass its config.json "
                           f"({{base_config}})", fields=CONFIG_WORDS)
    return "minimind3" if qk_norm else "minimind2"


def _same_values(a: Tensor, b: Tensor) -> bool:
    # the shard-by-shard loader knows only shapes here (meta tensors): a stored lm_head is then
    # taken as untied, which loads either way; only read values can show a tie
    if a.is_meta or b.is_meta:
        return False
    return a.shape == b.shape and torch.equal(a, b)


def _minimind_config_from_shapes(sd: dict[str, Tensor], path: Path,
                                 generation: str) -> ModelConfig:
    """A MiniMind config read from the tensor shapes, the generation's defaults for the rest."""
    def shape(key: str, dims: int) -> tuple[int, ...]:
        if key not in sd:
            raise WeightsError(f"{path}: no {key} to read the shape from; pass its config.json "
                               f"({{base_config}})", fields=CONFIG_WORDS)
        found = tuple(sd[key].shape)
        # The sizes are read from these shapes: a tensor of another rank (a 1-D embedding) or
        # with an empty dimension gives no config (it was an unpacking or division traceback).
        if len(found) != dims or 0 in found:
            raise WeightsError(f"{path}: {key} has shape {list(found)}; expected "
                               f"{'a matrix' if dims == 2 else 'a vector'} with no empty "
                               "dimension in a MiniMind model")
        return found

    found = _generation_from_tensors(sd, path)
    if found != generation:
        raise WeightsError(f"{path}: config {generation!r}, but the tensors are {found}'s "
                           f"({'no ' if found == 'minimind2' else ''}q/k norms)")
    vocab_size, hidden = shape("model.embed_tokens.weight", 2)
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if not layers:
        raise WeightsError(f"{path}: no model.layers.N.* keys")
    prefix = "model.layers.0."
    use_moe = prefix + "mlp.gate.weight" in sd
    mlp = prefix + ("mlp.experts.0." if use_moe else "mlp.")
    defaults = MINIMIND_DEFAULTS[generation]
    q_out = shape(prefix + "self_attn.q_proj.weight", 2)[0]
    k_out = shape(prefix + "self_attn.k_proj.weight", 2)[0]
    qk_norm = generation == "minimind3"
    if qk_norm:
        head_dim = shape(prefix + "self_attn.q_norm.weight", 1)[0]
        heads = q_out // head_dim
    else:
        heads = defaults["num_attention_heads"]  # MiniMind2's scripts never change it
        head_dim = hidden // heads
    width = shape(mlp + "gate_proj.weight", 2)[0]
    d = {**defaults, "model_type": "minimind", "minimind_generation": generation,
         "vocab_size": vocab_size, "hidden_size": hidden, "num_hidden_layers": max(layers) + 1,
         "num_attention_heads": heads, "num_key_value_heads": k_out // head_dim,
         "head_dim": head_dim, "qk_norm": qk_norm, "intermediate_size": width,
         "attention_bias": prefix + "self_attn.q_proj.bias" in sd,
         "tie_word_embeddings": "lm_head.weight" not in sd or _same_values(
             sd["lm_head.weight"], sd["model.embed_tokens.weight"])}
    if generation == "minimind2":
        d["n_shared_experts"] = len({int(m.group(1)) for k in sd if (m := re.match(
            r"model\.layers\.0\.mlp\.shared_experts\.(\d+)\.", k))})
    if use_moe:
        d.update(use_moe=True, num_experts=shape(prefix + "mlp.gate.weight", 2)[0])
        d["num_experts_per_tok"] = min(d["num_experts_per_tok"], d["num_experts"])
    try:
        return ModelConfig(**d)
    except ConfigError as e:
        raise WeightsError(f"{path}: the shapes give no valid {generation} config ({e}); "
                           f"pass its config.json ({{base_config}})", fields=CONFIG_WORDS) from e
