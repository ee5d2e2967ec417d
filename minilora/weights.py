"""Base checkpoints: Hugging Face folders and MiniMind ``.pth`` files in, Hugging Face folders out.

Parameter names are the model's own (transformers' and MiniMind's are the same), so loading is a
check of names and shapes, not a translation. Nothing is unpickled: safetensors is read as is and a
``.pth`` / ``.bin`` goes through ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from .checks import check_written, resolve_device, tensor_problems
from .errors import BaseConfigNeeded, ConfigError, WeightsError
from .files import atomic_write, read_json, regular_file, torch_load_reason
from .model import CausalLM
from .model_config import GENERATIONS, MINIMIND_DEFAULTS, ModelConfig

# Buffers some checkpoints carry that hold no learned weight (the model recomputes them).
IGNORED_KEYS = re.compile(r"(.*\.)?(rotary_emb\.inv_freq|freqs_cos|freqs_sin)$")
# Wrappers a training script leaves in front of every key: DDP's `module.`, torch.compile's
# `_orig_mod.`.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
INDEX_NAME = "model.safetensors.index.json"
# What save_model writes: one file, or shards and their index. Those of an earlier save that
# this one did not write are removed.
_MODEL_FILES = re.compile(r"model\.safetensors|model\.safetensors\.index\.json|"
                          r"model-\d+-of-\d+\.safetensors")


def load_model(path: str | Path, *, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str = "cpu",
               config: ModelConfig | dict | str | Path | None = None) -> CausalLM:
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
    shards = _safetensors_source(path)
    if shards is not None:
        return _load_shard_by_shard(path, *shards, dtype, device, config)
    state_dict, source = _read_state_dict(path)
    state_dict = _strip_wrappers(state_dict)
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


def _skeleton(path: Path, config: ModelConfig | dict | str | Path | None,
              tensors: dict[str, Tensor], source: Path) -> CausalLM:
    """The model the config (or the tensors' names and shapes) describe, built on the meta
    device once its layer and expert counts are checked against the tensors present."""
    cfg = _resolve_config(path, config, tensors)
    _check_size(cfg, tensors, source)
    if cfg.model_type == "minimind" and not cfg.qk_norm and any(
            k.endswith("self_attn.q_norm.weight") for k in tensors):
        # MiniMind's configs carry no q/k-norm flag: the versions that have it say so in weights
        cfg = dataclasses.replace(cfg, qk_norm=True)
    with torch.device("meta"):
        return CausalLM(cfg)


def save_model(model: CausalLM, folder: str | Path, *, dtype: torch.dtype | str | None = None,
               max_shard_size: int | None = None) -> Path:
    """Writes a Hugging Face folder: config.json and model.safetensors (or shards + index).

    transformers' ``AutoModelForCausalLM.from_pretrained`` reads the folder for llama, qwen2 and
    qwen3 configs. A tied lm_head is not written (transformers ties it again on load).

    Args:
        model: the model; a LoRA-injected one must be merged and unloaded first.
        folder: created if missing; an earlier save there is replaced (its model*.safetensors
            files and index that this save does not write are removed).
        dtype: dtype to store (default: the parameters' own).
        max_shard_size: bytes per shard; None writes one file.

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
                           f"place for (merge and unload adapters first): {_listing(extra)}")
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    target = _dtype(dtype) if dtype is not None else None
    tensors = {k: (v.to(target) if target is not None and v.is_floating_point() else v)
               .detach().to("cpu").contiguous() for k, v in sd.items()}
    hf = config.to_hf_dict()
    stored = next(iter(tensors.values())).dtype
    hf["dtype"] = str(stored).removeprefix("torch.")
    check_written(tensors, folder, WeightsError)
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


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def _safetensors_source(path: Path) -> tuple[Path, list[Path], dict[str, str] | None] | None:
    """(source, shard files, index weight_map) when path holds safetensors; else None."""
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return _safetensors_source(path / INDEX_NAME)
        if (path / "model.safetensors").is_file():
            return path / "model.safetensors", [path / "model.safetensors"], None
        return None
    if path.name.endswith(".index.json"):
        weight_map = _read_index(path)
        return path, [path.parent / s for s in sorted(set(weight_map.values()))], weight_map
    if path.suffix == ".safetensors":
        return path, [path], None
    return None


def _load_shard_by_shard(path: Path, source: Path, shards: list[Path],
                         weight_map: dict[str, str] | None, dtype: torch.dtype,
                         device: torch.device | str,
                         config: ModelConfig | dict | str | Path | None) -> CausalLM:
    """load_model for safetensors: the model is built on the meta device, checked against the
    shards' headers, then filled one shard at a time, each tensor cast and moved as it is read,
    so the model never exists twice (peak: the model plus one shard)."""
    shapes: dict[str, Tensor] = {}  # stripped name -> a meta tensor of the stored shape
    names: dict[str, str] = {}  # stored key -> stripped name
    headers = {shard: _safetensors_header(shard) for shard in shards}
    for header, _ in headers.values():
        for key, info in header.items():
            names[key] = _strip_wrappers({key: None}).popitem()[0]
            shapes[names[key]] = torch.empty(info["shape"], device="meta")
    if weight_map is not None:
        _check_index_keys(source, weight_map, set(names))
    model = _skeleton(path, config, shapes, source)
    cfg = model.config
    tied = cfg.tie_word_embeddings
    stored_head = shapes.pop("lm_head.weight", None) if tied else None
    wanted = _fit(model, shapes, source)  # names and shapes checked before any value is read
    head = None  # a tied checkpoint's own lm_head, compared with the embedding at the end
    for shard in shards:
        part: dict[str, Tensor] = {}
        header, start = headers[shard]
        with open(shard, "rb") as f:
            for key, info in header.items():
                name = names[key]
                if name not in wanted and not (tied and name == "lm_head.weight"):
                    continue  # an ignored buffer
                t = _read_tensor(f, shard, key, info, start)
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
        if stored_head is not None and (head.shape != embed.shape or not torch.equal(head, embed)):
            raise WeightsError(f"{source}: config says tie_word_embeddings, but lm_head.weight "
                               f"differs from model.embed_tokens.weight (set "
                               f"tie_word_embeddings false to keep both)")
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise WeightsError(f"{source}: no values read for {_listing(empty)}")
    return model.to(device).eval()


# safetensors dtype names -> torch dtypes: every one safetensors writes, so that a weight of a
# dtype no model computes with (int8, bool, complex64) is read and then refused by name, not
# reported as a damaged file
_ST_DTYPES = {name: getattr(torch, dtype) for name, dtype in {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}.items() if hasattr(torch, dtype)}


def _safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensors' entries of a safetensors header and where the data starts.

    The shards are read with plain reads, not safetensors' memory map: a mapped shard's pages
    stay resident (and counted in the process's RSS) after its tensors are copied out.
    """
    try:  # safetensors' own checks of the header first (it maps the file, reads no data)
        with safe_open(str(path), framework="pt", device="cpu"):
            pass
    except Exception as e:  # SafetensorError: torn or damaged
        raise WeightsError(f"{path}: not a readable safetensors file, truncated or damaged "
                           f"({e})") from None
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for key, info in header.items():
            begin, end = info["data_offsets"]
            if info["dtype"] not in _ST_DTYPES or not 0 <= begin <= end <= size - 8 - n:
                raise ValueError(f"tensor {key}: dtype {info['dtype']}, bytes {begin}..{end}")
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file, truncated or damaged "
                           f"({e})") from None
    return header, 8 + n


def _read_tensor(f, path: Path, key: str, info: dict, start: int) -> Tensor:
    begin, end = info["data_offsets"]
    dtype = _ST_DTYPES[info["dtype"]]
    data = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(start + begin)
    if f.readinto(data.numpy()) != end - begin:
        raise WeightsError(f"{path}: tensor {key} is cut short (truncated file)")
    return data.view(dtype).reshape(info["shape"])


def _read_state_dict(path: Path) -> tuple[dict[str, Tensor], Path]:
    """The tensors at path and the file (or index) they came from."""
    if path.is_dir():
        for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return _read_state_dict(path / name)
        pths = sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES)
        if len(pths) == 1:
            return _read_state_dict(pths[0])
        raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json, "
                                f"pytorch_model.bin or single .pth file here")
    if path.name.endswith(".index.json"):
        weight_map = _read_index(path)
        sd: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(_load_safetensors(path.parent / shard))
        _check_index_keys(path, weight_map, set(sd))
        return sd, path
    regular_file(path, "a weights file")  # a FIFO or a device would never end
    if path.suffix == ".safetensors":
        return _load_safetensors(path), path
    if path.suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses pickled code with an UnpicklingError
            raise WeightsError(f"{path}: not a plain tensor state dict that loads with "
                               f"weights_only=True ({torch_load_reason(e)})") from None
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            obj = obj["model"]  # a training checkpoint {"model": state_dict, "optimizer": ...}
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise WeightsError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
        return obj, path
    raise WeightsError(f"{path}: unknown checkpoint type (expected a folder, .safetensors, "
                       f".index.json, {', '.join(TORCH_SUFFIXES)})")


def _read_index(path: Path) -> dict[str, str]:
    """A model.safetensors.index.json's weight_map, its shards checked to be in its folder."""
    try:  # bounded: an endless or huge index is refused before it is parsed
        weight_map = read_json(path, "a safetensors index", error=WeightsError)["weight_map"]
    except (KeyError, TypeError) as e:
        raise WeightsError(f"{path}: expected a JSON object with a 'weight_map' ({e})") from e
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{path}: 'weight_map' is a {type(weight_map).__name__}; expected "
                           f"an object of tensor name -> shard file name")
    outside = sorted({repr(s) for s in weight_map.values() if not _plain_file_name(s)})
    if outside:  # "../x" or "/x" would read a file the folder does not hold
        raise WeightsError(f"{path}: weight_map names shards {', '.join(outside)}; expected "
                           f"file names inside {path.parent} (no folders, no absolute paths)")
    for shard in sorted(set(weight_map.values())):
        if not (path.parent / shard).is_file():
            raise FileNotFoundError(f"{path}: names shard {shard}, which is not in "
                                    f"{path.parent}")
    return weight_map


def _check_index_keys(path: Path, weight_map: dict[str, str], found: set[str]) -> None:
    absent = sorted(set(weight_map) - found)
    if absent:
        raise WeightsError(f"{path}: keys listed in the index but not in their shard: "
                           f"{_listing(absent)}")


def _plain_file_name(name: object) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "\\" not in name
            and Path(name).name == name)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError (neither OSError nor ValueError): torn or damaged
        raise WeightsError(f"{path}: not a readable safetensors file, truncated or damaged "
                           f"({e})") from None


def _strip_wrappers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = value
    return out


def _resolve_config(path: Path, config: ModelConfig | dict | str | Path | None,
                    sd: dict[str, Tensor]) -> ModelConfig:
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
        raise FileNotFoundError(f"{beside}: no config.json (pass config= to load_model)")
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
                           f"(MiniMind2) fit neither MiniMind generation; pass config=")
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
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise WeightsError(f"{path}: no {key} to read the shape from; pass a config.json "
                               f"as config")
        return tuple(sd[key].shape)

    found = _generation_from_tensors(sd, path)
    if found != generation:
        raise WeightsError(f"{path}: config {generation!r}, but the tensors are {found}'s "
                           f"({'no ' if found == 'minimind2' else ''}q/k norms)")
    vocab_size, hidden = shape("model.embed_tokens.weight")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if not layers:
        raise WeightsError(f"{path}: no model.layers.N.* keys")
    prefix = "model.layers.0."
    use_moe = prefix + "mlp.gate.weight" in sd
    mlp = prefix + ("mlp.experts.0." if use_moe else "mlp.")
    defaults = MINIMIND_DEFAULTS[generation]
    q_out = shape(prefix + "self_attn.q_proj.weight")[0]
    k_out = shape(prefix + "self_attn.k_proj.weight")[0]
    qk_norm = generation == "minimind3"
    if qk_norm:
        head_dim = shape(prefix + "self_attn.q_norm.weight")[0]
        heads = q_out // head_dim
    else:
        heads = defaults["num_attention_heads"]  # MiniMind2's scripts never change it
        head_dim = hidden // heads
    width = shape(mlp + "gate_proj.weight")[0]
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
        d.update(use_moe=True, num_experts=shape(prefix + "mlp.gate.weight")[0])
        d["num_experts_per_tok"] = min(d["num_experts_per_tok"], d["num_experts"])
    try:
        return ModelConfig(**d)
    except ConfigError as e:
        raise WeightsError(f"{path}: the shapes give no valid {generation} config ({e}); "
                           f"pass a config.json as config") from e


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
    problems = [f"{label} {len(keys)}: {_listing(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if keys]
    if problems:
        raise WeightsError(f"{source} does not fit a {model.config.model_type} model with this "
                           f"config; " + "; ".join(problems))
    return sd


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"dtype: expected a torch dtype or its name such as 'bfloat16', "
                         f"got {dtype!r}")
    return value


def describe_model(path: str | Path,
                   config: ModelConfig | dict | str | Path | None = None) -> dict[str, object]:
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
                     for t in _read_state_dict(Path(path))[0].values()})
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
