"""Base models in and out: ``load_model`` fits a checkpoint's tensors to a ``CausalLM``,
``save_model`` writes a Hugging Face folder, ``describe_model`` says what a checkpoint holds.

Parameter names are the model's own (transformers' and MiniMind's are the same), so loading is a
check of names and shapes, not a translation. Reading the files is minilora.model.state_files' job,
finding the config minilora.model.config_source's.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import Tensor

from minilora.core.errors import ConfigError, WeightsError
from minilora.core.files import atomic_write
from minilora.core.tensor_checks import check_written, resolve_device, tensor_problems
from minilora.model.config import ModelConfig
from minilora.model.config_source import resolve_config
from minilora.model.decoder import CausalLM
from minilora.model.state_files import (
    INDEX_NAME,
    TORCH_SUFFIXES,
    WRAPPER_PREFIXES,
    check_index_keys,
    listing,
    mapped_state_dict,
    read_state_dict,
    read_tensor,
    safetensors_header,
    safetensors_source,
    strip_wrappers,
)

__all__ = ["IGNORED_KEYS", "INDEX_NAME", "TORCH_SUFFIXES", "WRAPPER_PREFIXES", "WeightsError",
           "describe_model", "load_model", "load_skeleton", "save_model"]

# Buffers some checkpoints carry that hold no learned weight (the model recomputes them).
IGNORED_KEYS = re.compile(r"(.*\.)?(rotary_emb\.inv_freq|freqs_cos|freqs_sin)$")
# What save_model writes: one file, or shards and their index. Those of an earlier save that
# this one did not write are removed.
_MODEL_FILES = re.compile(r"model\.safetensors|model\.safetensors\.index\.json|"
                          r"model-\d+-of-\d+\.safetensors")


def load_model(path: str | Path, *, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str = "cpu",
               config: ModelConfig | dict[str, Any] | str | Path | None = None) -> CausalLM:
    """Loads a base model.

    Args:
        path: a Hugging Face folder (config.json + model.safetensors, a sharded
            model.safetensors.index.json, or pytorch_model.bin), a single .safetensors file, or a
            MiniMind .pth state dict.
        dtype: dtype of the parameters (a torch dtype or its name, e.g. "bfloat16").
        device: where the model goes.
        config: the model's config when path has none beside it: a ModelConfig, a config.json
            dict (transformers' or MiniMind's names, either MiniMind generation) or a path to
            one; or "minimind2" / "minimind3": the sizes read from a MiniMind .pth's shapes and
            that generation's MiniMindConfig defaults for the rest (eps, rope_theta, routing).
            A bare .pth without any is refused, naming what its tensors do not tell.

    Safetensors (one file or shards) are read one shard at a time into a model built on the
    meta device, each tensor cast to dtype and moved to device as it arrives: the model is never
    held twice (peak: the model plus the largest shard).

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: when path or a file it names does not exist.
        WeightsError: when the weights do not fit the config (every offending key named).
        ValueError: on an unreadable or unsupported config.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    dtype = _dtype(dtype)
    device = resolve_device(device)  # "banana" or CUDA on a machine without it: one line
    shards = safetensors_source(path)
    if shards is not None:
        return _load_shard_by_shard(path, *shards, dtype, device, config)
    state_dict, source = read_state_dict(path)
    state_dict = strip_wrappers(state_dict)
    model = _skeleton(path, config, state_dict, source)
    cfg = model.config
    state_dict = _fit(model, state_dict, source)
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    # checked after the cast, as shard by shard: a float64 1e300 is inf in float32
    problems = tensor_problems(state_dict)
    if problems:  # an int8 or complex weight computes nonsense; a NaN spreads to every output
        raise WeightsError(f"{source}: not usable base weights: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True untied them
    return model.to(device).eval()


def _skeleton(path: Path, config: ModelConfig | dict[str, Any] | str | Path | None,
              tensors: dict[str, Tensor], source: Path) -> CausalLM:
    """The model the config (or the tensors' names and shapes) describe, built on the meta
    device once its layer and expert counts are checked against the tensors present."""
    cfg = resolve_config(path, config, tensors)
    _check_size(cfg, tensors, source)
    if cfg.model_type == "minimind" and not cfg.qk_norm and any(
            k.endswith("self_attn.q_norm.weight") for k in tensors):
        # MiniMind's configs carry no q/k-norm flag: the versions that have it say so in weights
        cfg = dataclasses.replace(cfg, qk_norm=True)
    with torch.device("meta"):
        return CausalLM(cfg)


def load_skeleton(path: str | Path,
                  config: ModelConfig | dict[str, Any] | str | Path | None = None) -> CausalLM:
    """The model a base describes, on the meta device: its names and shapes checked as
    ``load_model`` checks them, no weight read (safetensors: the files' headers; a zip-format
    ``.pth`` / ``.bin``: mapped, its tensors' shapes only).

    For sharded training, where each process then reads only its shards
    (state_files.BaseSlices).

    Args:
        path, config: as ``load_model``.

    Returns:
        The model (float32 meta tensors, embeddings tied as the config says), in eval mode.

    Raises:
        FileNotFoundError: when path does not exist, or holds neither safetensors nor a
            zip-format torch file (state_files.sliceable).
        WeightsError: when the weights do not fit the config (every offending key named).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    shards = safetensors_source(path)
    if shards is not None:
        model = _checked_skeleton(path, *shards, config)[0]
    else:
        mapped, source = mapped_state_dict(path)
        model = _skeleton(path, config, mapped, source)
        # names and shapes (a tied lm_head is compared with the embedding: two tensors read)
        _fit(model, mapped, source)
        del mapped  # unmapped
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _checked_skeleton(path: Path, source: Path, shards: list[Path],
                      weight_map: dict[str, str] | None,
                      config: ModelConfig | dict[str, Any] | str | Path | None
                      ) -> tuple[CausalLM, dict[Path, tuple[dict[str, Any], int]], dict[str, str],
                                 dict[str, Tensor], Tensor | None]:
    """The meta model, checked against the shards' headers; with the headers, the stripped name
    of each stored key, the tensors wanted and a tied checkpoint's stored lm_head (or None)."""
    shapes: dict[str, Tensor] = {}  # stripped name -> a meta tensor of the stored shape
    names: dict[str, str] = {}  # stored key -> stripped name
    headers = {shard: safetensors_header(shard) for shard in shards}
    for header, _ in headers.values():
        for key, info in header.items():
            names[key] = strip_wrappers({key: None}).popitem()[0]
            shapes[names[key]] = torch.empty(info["shape"], device="meta")
    if weight_map is not None:
        check_index_keys(source, weight_map, set(names))
    model = _skeleton(path, config, shapes, source)
    tied = model.config.tie_word_embeddings
    stored_head = shapes.pop("lm_head.weight", None) if tied else None
    wanted = _fit(model, shapes, source)  # names and shapes checked before any value is read
    return model, headers, names, wanted, stored_head


def _load_shard_by_shard(path: Path, source: Path, shards: list[Path],
                         weight_map: dict[str, str] | None, dtype: torch.dtype,
                         device: torch.device | str,
                         config: ModelConfig | dict[str, Any] | str | Path | None) -> CausalLM:
    """load_model for safetensors: the model is built on the meta device, checked against the
    shards' headers, then filled one shard at a time, each tensor cast and moved as it is read,
    so the model never exists twice (peak: the model plus one shard)."""
    model, headers, names, wanted, stored_head = _checked_skeleton(path, source, shards,
                                                                   weight_map, config)
    tied = model.config.tie_word_embeddings
    head = None  # a tied checkpoint's own lm_head, compared with the embedding at the end
    for shard in shards:
        part: dict[str, Tensor] = {}
        header, start = headers[shard]
        with open(shard, "rb") as f:
            for key, info in header.items():
                name = names[key]
                if name not in wanted and not (tied and name == "lm_head.weight"):
                    continue  # an ignored buffer
                t = read_tensor(f, shard, key, info, start)
                t = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
                if tied and name == "lm_head.weight":
                    head = t
                else:
                    part[name] = t
        problems = tensor_problems(part)
        if problems:  # an int8 or complex weight computes nonsense; a NaN spreads to every output
            raise WeightsError(f"{shard}: not usable base weights: " + "; ".join(problems))
        model.load_state_dict(part, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True untied them
        embed = model.lm_head.weight
        if stored_head is not None:
            assert head is not None  # read from the shard whose header listed it
            if head.shape != embed.shape or not torch.equal(head, embed):
                raise WeightsError(f"{source}: config says tie_word_embeddings, but "
                                   f"lm_head.weight differs from model.embed_tokens.weight (set "
                                   f"tie_word_embeddings false to keep both)")
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise WeightsError(f"{source}: no values read for {listing(empty)}")
    return model.to(device).eval()


def _check_size(cfg: ModelConfig, sd: dict[str, Tensor], source: Path) -> None:
    """The layers (and experts) the config asks for are the ones the file holds, checked before
    the model is built: a config (or a key) naming a million layers would otherwise build a
    million modules before the mismatch is found."""
    def indices(pattern: str) -> set[int]:
        return {int(m[1]) for k in sd if (m := re.match(pattern, k))}

    checks = [("num_hidden_layers", cfg.num_hidden_layers, indices(r"model\.layers\.(\d+)\."),
               "model.layers.N")]
    if cfg.use_moe:
        checks.append(("num_experts", cfg.num_experts,
                       indices(r"model\.layers\.0\.mlp\.experts\.(\d+)\."),
                       "model.layers.0.mlp.experts.N"))
    for name, wanted, present, keys in checks:
        if present != set(range(len(present))) or len(present) != wanted:
            shown = sorted(present)
            listed = shown if len(shown) <= 6 else [*shown[:3], "...", *shown[-2:]]
            raise WeightsError(f"{source}: {name} is {wanted}, but the weights hold {keys} for "
                               f"N in {listed}; expected N = 0 .. {wanted - 1}")


def _fit(model: CausalLM, sd: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    """sd checked against the model's names and shapes, a tied lm_head filled in."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = {k: v for k, v in sd.items() if not IGNORED_KEYS.fullmatch(k)}
    tied = model.config.tie_word_embeddings
    embed = sd.get("model.embed_tokens.weight")
    if tied and embed is not None:
        head = sd.get("lm_head.weight")
        if head is not None and (head.shape != embed.shape or not torch.equal(head, embed)):
            raise WeightsError(f"{source}: config says tie_word_embeddings, but lm_head.weight "
                               f"differs from model.embed_tokens.weight (set "
                               f"tie_word_embeddings false to keep both)")
        sd["lm_head.weight"] = embed
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(f"{k} {tuple(sd[k].shape)} (expected {expected[k]})"
                       for k in set(sd) & set(expected) if tuple(sd[k].shape) != expected[k])
    problems = [f"{label} {len(keys)}: {listing(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if keys]
    if problems:
        raise WeightsError(f"{source} does not fit a {model.config.model_type} model with this "
                           f"config; " + "; ".join(problems))
    return sd


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"dtype: expected a torch dtype or its name such as 'bfloat16', "
                         f"got {dtype!r}")
    return value


def save_model(model: CausalLM, folder: str | Path, *, dtype: torch.dtype | str | None = None,
               max_shard_size: int | None = None, name: str | Path | None = None) -> Path:
    """Writes a Hugging Face folder: config.json and model.safetensors (or shards + index).

    transformers' ``AutoModelForCausalLM.from_pretrained`` reads the folder for llama, qwen2 and
    qwen3 configs. A tied lm_head is not written (transformers ties it again on load).

    Args:
        model: the model; a LoRA-injected one must be merged and unloaded first.
        folder: created if missing; an earlier save there is replaced (its model*.safetensors
            files and index that this save does not write are removed).
        dtype: dtype to store (default: the parameters' own).
        max_shard_size: bytes per shard; None writes one file.
        name: the folder errors name, when ``folder`` is a staging folder that will take its
            place (default: ``folder``).

    Returns:
        The folder.

    Raises:
        WeightsError: when the model holds parameters a base checkpoint has no place for.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    with torch.device("meta"):
        expected = CausalLM(config).state_dict()
    sd = model.state_dict()
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise WeightsError(f"the model has {len(extra)} parameter(s) a base checkpoint has no "
                           f"place for (merge and unload adapters first): {listing(extra)}")
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    target = _dtype(dtype) if dtype is not None else None
    tensors = {k: (v.to(target) if target is not None and v.is_floating_point() else v)
               .detach().to("cpu").contiguous() for k, v in sd.items()}
    hf = config.to_hf_dict()
    stored = next(iter(tensors.values())).dtype
    hf["dtype"] = str(stored).removeprefix("torch.")
    check_written(tensors, folder if name is None else name, WeightsError)
    # Tensors first, config last: a folder whose config is new has its new weights too.
    written = _write_tensors(tensors, folder, max_shard_size)
    for stale in folder.iterdir():  # an earlier save's files would be read instead of ours
        if _MODEL_FILES.fullmatch(stale.name) and stale.name not in written:
            stale.unlink()
    atomic_write(folder / "config.json", json.dumps(hf, indent=2) + "\n")
    return folder


def _write_tensors(tensors: dict[str, Tensor], folder: Path,
                   max_shard_size: int | None) -> set[str]:
    """model.safetensors, or shards and their index; returns the names of the files written."""
    metadata = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_size is None or total <= max_shard_size:
        atomic_write(folder / "model.safetensors", save(tensors, metadata=metadata))
        return {"model.safetensors"}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(folder / name, save(shard, metadata=metadata))
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write(folder / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    return set(weight_map.values()) | {INDEX_NAME}


def describe_model(path: str | Path,
                   config: ModelConfig | dict[str, Any] | str | Path | None = None
                   ) -> dict[str, object]:
    """What a base model folder (or .pth) holds: its config and parameter counts.

    Args:
        path: as ``load_model``.
        config: as ``load_model`` (a bare .pth needs one).

    Returns:
        An ordered dict for display.

    Raises:
        FileNotFoundError, WeightsError, ValueError: as ``load_model``.
    """
    model = load_model(path, config=config)
    config = model.config
    dtypes = sorted({str(t.dtype).removeprefix("torch.")
                     for t in read_state_dict(Path(path))[0].values()})
    info: dict[str, object] = {
        "path": str(path),
        "format": "base model",
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "stored dtype": ", ".join(dtypes),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads (q / kv)": f"{config.num_attention_heads} / {config.num_key_value_heads}",
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "tied embeddings": config.tie_word_embeddings,
        "linear layers": sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                 if isinstance(m, torch.nn.Linear)}),
    }
    if config.use_moe:
        info["experts (routed / per token)"] = (
            f"{config.num_experts} / {config.num_experts_per_tok}")
    if config.use_moe or config.model_type == "minimind":
        info["MiniMind generation"] = config.minimind_generation
    return info
