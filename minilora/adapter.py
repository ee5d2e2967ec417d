"""Adapters on disk: PEFT's folder layout, MiniMind's .pth, and the base fingerprint.

A PEFT folder holds `adapter_model.safetensors` (keys `base_model.model.<path>.lora_A.weight`,
header metadata `{"format": "pt"}` plus minilora's own entries) and `adapter_config.json` (PEFT's
LoraConfig keys). MiniMind's format is one `.pth` with `<path>.lora.A.weight` /
`<path>.lora.B.weight` and scale 1. docs/formats.md describes both.

A model may hold several named adapters (minilora.lora); each file holds one, without its name
in the keys. PEFT saves a model's non-default adapters into subfolders named after them:
`load_adapter(model, folder, name="b")` reads `folder/b` when it exists.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from minilora.checks import check_written, tensor_problems
from minilora.errors import AdapterError, FingerprintMismatch
from minilora.files import atomic_write, read_json, regular_file, replace_folder, torch_load_reason
from minilora.injection import inject_lora
from minilora.lora import (
    DEFAULT_ADAPTER,
    LoraConfig,
    LoRALinear,
    check_adapter_name,
    lora_modules,
    matches,
)
from minilora.named_adapters import active_adapters, delete_adapter, list_adapters, set_active
from minilora.quant import QUANTIZED_FROM, is_quantized

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FINGERPRINT_KEY = "minilora_base_fingerprint"
VERSION_KEY = "minilora_version"
_KEY_RE = re.compile(r"(.+)\.lora_([AB])\.weight")
_MINIMIND_KEY_RE = re.compile(r"(.+)\.lora\.([AB])\.weight")
# PEFT also saves the base weights of an adapted lm_head / embed_tokens (save_embedding_layers)
_BASE_LAYER_RE = re.compile(r"(.+)\.base_layer\.(weight|bias)")

# PEFT LoraConfig keys whose non-default values change what the adapter computes in ways
# minilora does not implement: loading such an adapter is refused rather than silently wrong.
_UNSUPPORTED_PEFT = {
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "fan_in_fan_out": (False, None),
    "layers_to_transform": (None, []),
    "layer_replication": (None, []),
    "lora_bias": (False, None),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}, []),
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
}
# PEFT inits that rewrite the base weights: their adapters only work on the rewritten base.
# PiSSA's is the exception read: its folder's base is the residual that PEFT saves beside it.
_BASE_CHANGING_INITS = ("olora", "loftq", "corda", "lora_ga")
_MAGNITUDE = "lora_magnitude_vector"  # DoRA's m, PEFT's key (no adapter name, no ".weight")


# ---------------------------------------------------------------- state dicts


def resolve_adapter(model: nn.Module, name: str | None = None, doing: str = "use") -> str:
    """The adapter a call means: `name` when given, else the model's only adapter, else its
    only active one.

    Raises:
        AdapterError: when the model has no LoRA, `name` is unknown, or None is ambiguous.
    """
    names = list_adapters(model)
    if not names:
        raise AdapterError(f"the model has no LoRA modules to {doing}; inject_lora first")
    if name is not None:
        if name not in names:
            raise AdapterError(f"the model has no adapter {name!r}; it has {names}")
        return name
    if len(names) == 1:
        return names[0]
    active = active_adapters(model)
    if len(active) == 1:
        return active[0]
    raise AdapterError(
        f"the model holds adapters {names} ({active or 'none'} active): pass name=... to say "
        f"which one to {doing}"
    )


def _layers(model: nn.Module, name: str) -> list[tuple[str, LoRALinear]]:
    """(path, layer) of every layer that carries adapter `name`, in model order."""
    return [(p, m) for p, m in lora_modules(model) if name in m.lora_A]


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """Returns one adapter's LoRA weights under PEFT's keys (the adapter's name not in them).

    Args:
        model: a model with LoRA.
        name: which adapter (default: the only one, or the only active one).

    Returns:
        `{"base_model.model.<path>.lora_A.weight": (r, in), "...lora_B.weight": (out, r)}`,
        detached tensors sharing memory with the Parameters.

    Raises:
        AdapterError: when the model has no LoRA or `name` is unknown or ambiguous.
    """
    name = resolve_adapter(model, name, "save")
    sd = {}
    for path, m in _layers(model, name):
        sd[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A[name].weight.detach()
        sd[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B[name].weight.detach()
        if name in m.lora_magnitude_vector:
            sd[f"{PREFIX}{path}.{_MAGNITUDE}"] = m.lora_magnitude_vector[name].detach()
    return sd


def _check_state_dict(
    model: nn.Module, sd: dict[str, torch.Tensor], source: str, name: str
) -> None:
    """Raises one AdapterError naming every missing, unexpected and mis-shaped key."""
    if any(m.merged for _, m in lora_modules(model)):
        raise AdapterError(
            f"cannot load {source} into a model whose LoRA is merged; "
            "call unmerge_lora(model) first"
        )
    expected = {k: tuple(v.shape) for k, v in adapter_state_dict(model, name).items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [
        f"{k}: file {tuple(sd[k].shape)}, model {expected[k]}"
        for k in sorted(set(sd) & set(expected))
        if tuple(sd[k].shape) != expected[k]
    ]
    not_float = [k for k in sorted(sd) if k in expected and not sd[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(
            f"unexpected keys {unexpected} (expected {PREFIX}<module>.lora_A.weight / lora_B.weight"
            f" for the model's LoRA modules)"
        )
    if shapes:
        problems.append(f"mis-shaped keys [{'; '.join(shapes)}]")
    if not_float:
        problems.append(f"non-floating-point tensors {not_float}")
    if problems:
        raise AdapterError(f"{source} does not fit the model: " + "; ".join(problems))


def _copy_in(
    model: nn.Module, sd: dict[str, torch.Tensor], scaling: float | None, name: str
) -> None:
    """Copies A and B into adapter `name` in place (the Parameters stay the same objects); B
    is rescaled when the file was saved with another scaling than the layer uses, so the
    adapter computes what it computed."""
    with torch.no_grad():
        for path, m in _layers(model, name):
            m.lora_A[name].weight.copy_(sd[f"{PREFIX}{path}.lora_A.weight"])
            b = sd[f"{PREFIX}{path}.lora_B.weight"]
            if scaling is not None and scaling != m.scaling[name]:
                b = b.float() * (scaling / m.scaling[name])
            m.lora_B[name].weight.copy_(b)
            if name in m.lora_magnitude_vector:
                m.lora_magnitude_vector[name].copy_(sd[f"{PREFIX}{path}.{_MAGNITUDE}"])


def load_adapter_state_dict(
    model: nn.Module, sd: dict[str, torch.Tensor], name: str | None = None
) -> None:
    """Loads LoRA weights (PEFT keys, as `adapter_state_dict` returns them) into `model`.

    Args:
        model: a model with LoRA modules injected.
        sd: exactly one A and one B per layer of the adapter, with its shapes.
        name: which adapter (default: the only one, or the only active one).

    Raises:
        AdapterError: naming every missing, unexpected or mis-shaped key, or when the model's
            LoRA is merged. Nothing is loaded when it raises.
    """
    name = resolve_adapter(model, name, "load into")
    _check_state_dict(model, sd, "the state dict", name)
    _copy_in(model, sd, None, name)


# ---------------------------------------------------------------- fingerprint


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
        modules = _layers(model, name)
    merged = [n for n, m in modules if m.merged]
    if merged:
        raise AdapterError(
            f"LoRA is merged into {merged[:3]}{'...' if len(merged) > 3 else ''}: the base weights"
            " are not held exactly; call unmerge_lora(model) first"
        )
    quantized = [n for n, m in modules if is_quantized(m.weight)]
    if quantized:
        return _quantized_fingerprint(model, [n for n, _ in modules], quantized)
    return _hash_weights({n: m.weight.detach() for n, m in modules})


def _hash_weights(weights: dict[str, torch.Tensor]) -> str:
    """base_fingerprint's hash of {layer path: weight}."""
    h = hashlib.sha256(b"minilora-fingerprint-1\0")
    for name, w in sorted(weights.items()):
        if w.is_meta:
            raise AdapterError(f"{name}.weight is on the meta device: it has no values to hash")
        h.update(f"{name}:{tuple(w.shape)}\0".encode())
        bits = w.to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16)
        h.update(bits.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _pissa_to_lora(
    model: nn.Module, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor],
    initial: Path,
) -> tuple[LoraConfig, dict[str, torch.Tensor], str]:
    """A trained PiSSA adapter as a plain LoRA of rank 2r on the original base (PEFT's
    path_initial_model_for_weight_conversion): s B A - s B0 A0 = s' [B, -B0] [A; A0] with
    s' = s, and the original weight W_res + s B0 A0 is what the fingerprint hashes."""
    if config.init != "pissa" or config.use_dora:
        raise AdapterError(f"pissa_initial: adapter {name!r} is not a PiSSA LoRA adapter "
                           f"(init {config.init!r}, use_dora {config.use_dora})")
    _, start, _ = _read_peft(initial)
    if {k: tuple(v.shape) for k, v in start.items()} != {
            k: tuple(v.shape) for k, v in tensors.items()}:
        raise AdapterError(f"{initial}: not the initial state of adapter {name!r} (its keys or "
                           "shapes differ)")
    out: dict[str, torch.Tensor] = {}
    original: dict[str, torch.Tensor] = {}
    for path, m in _layers(model, name):
        a, b = f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"
        a0, b0 = start[a].to(tensors[a].dtype), start[b].to(tensors[b].dtype)
        out[a] = torch.cat([tensors[a], a0])  # (2r, in)
        out[b] = torch.cat([tensors[b], -b0], dim=1)  # (out, 2r)
        w = m.weight.detach().float() + config.scaling * (b0.float() @ a0.float())
        original[path] = w.to(m.weight.dtype)
    alpha = config.alpha * (2 ** 0.5 if config.use_rslora else 2)
    plain = replace(config, r=2 * config.r, alpha=alpha, init="kaiming")
    return plain, out, _hash_weights(original)


def _quantized_fingerprint(model: nn.Module, names: list[str], quantized: list[str]) -> str:
    """The fingerprint quantize_model recorded from the weights before quantizing them."""
    record = getattr(model, QUANTIZED_FROM, None)
    if record is None or tuple(sorted(names)) != record["modules"]:
        raise AdapterError(
            f"{quantized[0]}.weight is quantized and no fingerprint of its full-precision "
            "weights was recorded for these layers (quantize_model records it when LoRA is "
            "injected before quantizing)")
    return record["fingerprint"]


# ---------------------------------------------------------------- writing


def _model_config(model: nn.Module, name: str) -> LoraConfig:
    """The one LoraConfig that describes adapter `name` on every layer (targets resolved
    later)."""
    layers = _layers(model, name)

    def shape(m: LoRALinear) -> tuple:
        return (m.r[name], m.lora_alpha[name], m.use_rslora[name], m.lora_dropout[name])

    first = shape(layers[0][1])
    differ = [p for p, m in layers if shape(m) != first]
    if differ:
        raise AdapterError(
            f"LoRA modules differ in (r, alpha, use_rslora, dropout): {layers[0][0]} has {first}"
            f" but {differ} do not; an adapter file holds one setting for all modules"
        )
    r, alpha, use_rslora, dropout = first
    configs = {id(m.lora_config[name]): m.lora_config[name] for _, m in layers}
    user = next(iter(configs.values())) if len(configs) == 1 else None
    return LoraConfig(
        r=r,
        alpha=alpha,
        dropout=dropout,
        targets=user.targets if user is not None else [p for p, _ in layers],
        exclude=user.exclude if user is not None else [],
        init=layers[0][1].init[name],
        use_rslora=use_rslora,
        use_dora=name in layers[0][1].lora_magnitude_vector,
    )


def _base_module_names(model: nn.Module) -> list[str]:
    """Module names as PEFT sees the base model: LoRA's own submodules left out."""
    inside = [n + "." for n, _ in lora_modules(model)]
    return [n for n, _ in model.named_modules() if n and not n.startswith(tuple(inside))]


def _peft_targets(model: nn.Module, name: str) -> list[str]:
    """target_modules naming exactly the layers of adapter `name`, as PEFT records what it
    adapted: their last names when those select exactly these layers here, else their full
    paths. Never the user's own list or regex: on another model of the same weights (the
    transformers one) it may also match modules PEFT cannot adapt (Llama's `mlp.act_fn`)."""
    injected = {p for p, _ in _layers(model, name)}
    short = sorted({n.rsplit(".", 1)[-1] for n in injected})
    chosen = {n for n in _base_module_names(model) if matches(n, short)}
    return short if chosen == injected else sorted(injected)


def _peft_config_dict(
    model: nn.Module, config: LoraConfig, base_model_name_or_path: str | None, name: str
) -> dict:
    targets = _peft_targets(model, name)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None)
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
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
    }


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    format: str = "peft",
    base_model_name_or_path: str | None = None,
    name: str | None = None,
    pissa_initial: str | os.PathLike | None = None,
) -> Path:
    """Writes one adapter of `model`.

    Args:
        model: a model with LoRA modules (unmerged for format="peft": the fingerprint hashes the
            base weights).
        path: a folder for format="peft" (created if needed; the adapter's own folder, PEFT's
            layout inside whatever the adapter's name), a file (.pth) for "minimind".
        dtype: cast the weights to this dtype (default: as they are).
        format: "peft" (PEFT's folder layout, read by PEFT and vLLM) or "minimind" (MiniMind's
            .pth, scaling folded into B; only square layers, as MiniMind's apply_lora).
        base_model_name_or_path: written into adapter_config.json (default: the model's
            `config.name_or_path` when it has one).
        name: which adapter (default: the only one, or the only active one).
        pissa_initial: the folder this PiSSA adapter was saved to before training: the file
            written is then a plain LoRA adapter of rank 2r for the original base model (not
            the residual), as PEFT's path_initial_model_for_weight_conversion writes it.

    Returns:
        The folder (peft) or file (minimind) written.

    Raises:
        AdapterError: no LoRA modules, an unknown or ambiguous name, modules with different
            settings, a merged model (peft), non-square layers (minimind), an unknown format or
            a path of the wrong kind.
    """
    path = Path(path)
    if format not in ("peft", "minimind"):
        raise AdapterError(f"format must be 'peft' or 'minimind', got {format!r}")
    name = resolve_adapter(model, name, "save")
    if format == "minimind":
        return _save_minimind(model, path, dtype, name)
    if path.exists() and not path.is_dir():
        raise AdapterError(f"{path} is a file; format='peft' writes a folder")
    config = _model_config(model, name)
    fingerprint = base_fingerprint(model, name)
    tensors = adapter_state_dict(model, name)
    if pissa_initial is not None:
        config, tensors, fingerprint = _pissa_to_lora(model, name, config, tensors,
                                                      Path(pissa_initial))
    metadata = {"format": "pt", FINGERPRINT_KEY: fingerprint, VERSION_KEY: _version()}
    tensors = {k: _for_disk(v, dtype) for k, v in tensors.items()}
    check_written(tensors, path, AdapterError)
    peft_config = _peft_config_dict(model, config, base_model_name_or_path, name)
    _check_replaceable(path)
    blob = safetensors_bytes(tensors, metadata=metadata)
    text = json.dumps(peft_config, indent=2, allow_nan=False) + "\n"

    def write(folder: Path) -> None:
        (folder / WEIGHTS_NAME).write_bytes(blob)
        (folder / CONFIG_NAME).write_text(text, encoding="utf-8")
        for name, sub in find_adapters(path).items():  # PEFT's layout: named ones inside
            if sub != path:
                shutil.copytree(sub, folder / name)

    # The folder is replaced as a whole: a reader (or a crash) sees the old adapter or the new
    # one, never new weights beside an old config.
    return replace_folder(path, write)


def _check_replaceable(path: Path) -> None:
    """An existing folder is replaced as a whole: refuse one that holds more than an adapter
    (and the named adapters of PEFT's layout in subfolders, which the new folder keeps)."""
    if not path.is_dir():
        return
    named = {sub.name for sub in find_adapters(path).values() if sub != path}
    # Leftovers of a killed save of a named adapter (".b.tmp-<pid>") are not the user's.
    other = sorted(e.name for e in path.iterdir() if e.name not in (WEIGHTS_NAME, CONFIG_NAME)
                   and e.name not in named and not re.fullmatch(r"\..+\.(tmp|old)-\d+", e.name))
    if other:
        raise AdapterError(f"{path} holds more than an adapter ({', '.join(other[:8])}); saving "
                           "replaces the whole folder, so nothing is written: choose another "
                           "folder")


def _for_disk(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()


def _version() -> str:
    import minilora  # here, not at the top: minilora/__init__ imports this module

    return str(getattr(minilora, "__version__", "unknown"))


def _save_minimind(model: nn.Module, path: Path, dtype: torch.dtype | None, name: str) -> Path:
    modules = _layers(model, name)
    if path.is_dir():
        raise AdapterError(f"{path} is a folder; format='minimind' writes one .pth file")
    if name in modules[0][1].lora_magnitude_vector:
        raise AdapterError("MiniMind's format has no place for DoRA's magnitude vectors; save "
                           "a DoRA adapter with format='peft'")
    not_square = [f"{n} ({m.in_features} -> {m.out_features})"
                  for n, m in modules if m.in_features != m.out_features]
    if not_square:
        raise AdapterError(
            "MiniMind's apply_lora adds LoRA to square layers only and would drop these: "
            f"{not_square}; save them with format='peft'"
        )
    sd = {}
    for path_, m in modules:
        sd[f"{path_}.lora.A.weight"] = _for_disk(m.lora_A[name].weight, dtype)
        # MiniMind computes B(A(x)) unscaled: fold the scaling into B.
        b = m.lora_B[name].weight.detach().float() * m.scaling[name]
        sd[f"{path_}.lora.B.weight"] = _for_disk(b, dtype or m.lora_B[name].weight.dtype)
    check_written(sd, path, AdapterError)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(sd, buffer)  # in memory: a full disk is then an OSError of the write
    atomic_write(path, buffer.getvalue())
    return path


# ---------------------------------------------------------------- reading


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    check_fingerprint: bool = True,
    name: str | None = None,
) -> LoraConfig:
    """Loads an adapter into `model` under `name`.

    When the model has no adapter of that name, LoRA is injected first and the new adapter
    becomes the only active one. When it has one, the weights are copied into its existing
    Parameters (a hot swap: same shapes required, nothing rebuilt, the active adapters left as
    they are, so a compiled model keeps its graph).

    Args:
        model: the base model (with or without LoRA modules).
        path: a PEFT adapter folder (or its adapter_model.safetensors), or a MiniMind .pth. With
            a name, `path/<name>` is read when it is an adapter folder (PEFT saves a model's
            non-default adapters into subfolders named after them).
        check_fingerprint: refuse an adapter whose recorded base fingerprint differs from the
            model's. Adapters without one (PEFT's, MiniMind's) are loaded unchecked.
        name: the adapter's name in the model (default: "default").

    Returns:
        The adapter's LoraConfig (for a MiniMind file: r from the shapes, alpha = r, targets the
        module paths found in the keys).

    Raises:
        AdapterError: a bad name, missing or unreadable files, a pickle that needs code, a
            config minilora cannot honour, missing/unexpected/mis-shaped keys, or a fingerprint
            mismatch. When it raises, a LoRA injected by this call is removed again and the
            adapters active before the call are active again.
    """
    if name is not None:  # before path / name is read: "../x" must not reach another folder
        try:
            check_adapter_name(name)
        except ValueError as e:
            raise AdapterError(str(e)) from None
    path = _adapter_path(Path(path), name)
    target = DEFAULT_ADAPTER if name is None else name
    base_layers: dict[str, torch.Tensor] = {}
    if path.is_dir():
        config, sd, metadata = _read_peft(path)
        source = str(path / WEIGHTS_NAME)
        base_layers = {k: sd.pop(k) for k in list(sd) if _BASE_LAYER_RE.fullmatch(k)}
    elif path.is_file():
        config, sd = _read_minimind(path)
        metadata, source = {}, str(path)
    else:
        raise AdapterError(
            f"no adapter at {path}: expected a folder with {WEIGHTS_NAME} and {CONFIG_NAME}, "
            "or a MiniMind .pth file"
        )
    injected = False
    active = active_adapters(model)
    if target not in list_adapters(model):
        try:
            # The base is already PiSSA's residual: injecting must not take its SVD again.
            inject_lora(model, replace(config, init="kaiming") if config.init == "pissa"
                        else config, name=target)
            for _, m in _layers(model, target):
                m.init[target], m.lora_config[target] = config.init, config
        except ValueError as e:
            raise AdapterError(_another_base(path, metadata, source,
                                             f"cannot apply {source} to this model: {e}")) from None
        injected = True
    try:
        try:
            _check_state_dict(model, sd, source, target)
        except AdapterError as e:
            message = _another_base(path, metadata, source, str(e))
            if message == str(e):
                raise
            raise AdapterError(message) from None
        _check_base_layers(model, base_layers, source, target)
        recorded = metadata.get(FINGERPRINT_KEY)
        if check_fingerprint and recorded is not None:
            actual = base_fingerprint(model, target)
            if actual != recorded:
                raise FingerprintMismatch(
                    f"{source} was trained on another base model (fingerprint {recorded}, this "
                    f"model's {actual})"
                )
    except AdapterError:
        if injected:  # B is still zero: this puts the model back exactly
            delete_adapter(model, target)
            set_active(model, active)
        raise
    _copy_in(model, sd, config.scaling, target)
    return config


def _adapter_path(path: Path, name: str | None) -> Path:
    """The folder or file `load_adapter(path, name=name)` reads."""
    if path.is_file() and path.name == WEIGHTS_NAME:
        path = path.parent
    if name is not None and (path / name / CONFIG_NAME).is_file():
        path = path / name
    if path.is_dir() and not (path / CONFIG_NAME).exists() and not (path / WEIGHTS_NAME).exists():
        inside = sorted(find_adapters(path))
        if inside:
            raise AdapterError(
                f"{path} holds adapters in subfolders {inside}: pass name=... (or the subfolder)"
            )
    return path


def _check_base_layers(
    model: nn.Module, base_layers: dict[str, torch.Tensor], source: str, name: str
) -> None:
    """PEFT's copies of adapted layers' base weights must equal the model's: PEFT would load
    them over the base, minilora leaves base weights alone."""
    layers = {f"{PREFIX}{p}": m for p, m in _layers(model, name)}
    problems = []
    for key, saved in sorted(base_layers.items()):
        m = _BASE_LAYER_RE.fullmatch(key)
        layer = layers.get(m[1])
        own = None if layer is None else getattr(layer, m[2])
        if own is None:
            problems.append(f"{key} (no adapted layer of this adapter has it)")
        elif saved.shape != own.shape or not (
            torch.equal(saved.to(own.dtype), own.detach())
            or torch.equal(own.detach().to(saved.dtype), saved)
        ):
            problems.append(f"{key} (differs from this model's {m[1].removeprefix(PREFIX)}."
                            f"{m[2]}: PEFT would load it over the base, e.g. after a resized "
                            "vocabulary; load the adapter on the base it was saved with)")
    if problems:
        raise AdapterError(f"{source}: base layer weights minilora cannot apply: "
                           + "; ".join(problems))
def _another_base(path: Path, metadata: dict, source: str, message: str) -> str:
    """An adapter minilora wrote (it records its base) that does not fit the model was trained on
    another base: say so first, before the list of keys."""
    if FINGERPRINT_KEY not in metadata:
        return message  # a foreign adapter: the keys are all there is to say
    base = None
    try:
        base = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")).get(
            "base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        pass
    named = f" ({base})" if isinstance(base, str) and base else ""
    detail = message.removeprefix(f"{source} does not fit the model: ")
    return f"{source} was trained on another base{named}; it does not fit this model: {detail}"


def find_adapters(folder: str | os.PathLike) -> dict[str, Path]:
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


def _read_json(path: Path) -> dict:
    try:
        data = read_json(path, "an adapter_config.json", error=AdapterError)
    except FileNotFoundError:
        raise AdapterError(f"missing {path}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_peft(folder: Path) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, str]]:
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
    _check_tensors(sd, weights)
    return _config_from_peft(data, folder / CONFIG_NAME, sd), sd, metadata


def _check_tensors(sd: dict[str, torch.Tensor], source: Path) -> None:
    problems = tensor_problems(sd)
    if problems:
        raise AdapterError(f"{source}: not usable LoRA weights: " + "; ".join(problems))


def _config_from_peft(data: dict, source: Path, sd: dict[str, torch.Tensor]) -> LoraConfig:
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
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        raise fail("init_lora_weights", f"is {init!r}, which changes the base weights")
    if isinstance(init, str) and init.startswith("pissa"):
        init = "pissa"  # "pissa_niter_4" too: the same adapter, its SVD found faster
    targets = data.get("target_modules")
    if targets is None:  # PEFT's per-architecture default: the keys say which modules
        targets = sorted({m[1] for k in sd if (m := _KEY_RE.fullmatch(k.removeprefix(PREFIX)))})
    exclude = data.get("exclude_modules") or []
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
        )
    except ValueError as e:
        raise AdapterError(f"{source}: {e}") from None


def _read_minimind(path: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    regular_file(path, "a MiniMind .pth file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code, RuntimeError for a damaged zip, ...
        raise AdapterError(
            f"{path} is not a plain tensor file and was not loaded (read with "
            f"torch.load(weights_only=True); a pickle that needs code is refused): "
            f"{torch_load_reason(e)}"
        ) from None
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()
    ):
        raise AdapterError(f"{path}: expected a dict of name -> tensor (MiniMind's save_lora)")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in raw.items():
        m = _MINIMIND_KEY_RE.fullmatch(key)
        if m is None or tensor.dim() != 2:
            unexpected.append(key)
        else:
            parts.setdefault(m[1], {})[m[2]] = tensor
    if unexpected or not parts:
        raise AdapterError(
            f"{path}: unexpected keys {sorted(unexpected)}; a MiniMind adapter holds 2-D "
            "<module>.lora.A.weight and <module>.lora.B.weight tensors only"
        )
    half = sorted(f"{n}.lora.{'B' if 'A' in ab else 'A'}.weight" for n, ab in parts.items()
                  if len(ab) != 2)
    if half:
        raise AdapterError(f"{path}: missing keys {half}")
    ranks = {n: ab["A"].shape[0] for n, ab in parts.items()}
    bad = [f"{n}: A {tuple(ab['A'].shape)}, B {tuple(ab['B'].shape)}" for n, ab in parts.items()
           if ab["B"].shape[1] != ab["A"].shape[0]]
    if bad:
        raise AdapterError(f"{path}: A is (r, in) and B (out, r), but {bad}")
    if len(set(ranks.values())) != 1:
        raise AdapterError(f"{path}: modules have different ranks {ranks}; expected one r")
    _check_tensors(raw, path)
    r = next(iter(ranks.values()))
    # MiniMind adds B(A(x)) unscaled: alpha = r gives scaling 1.
    config = LoraConfig(r=r, alpha=float(r), targets=sorted(parts), init="gaussian")
    sd = {}
    for name, ab in parts.items():
        sd[f"{PREFIX}{name}.lora_A.weight"] = ab["A"]
        sd[f"{PREFIX}{name}.lora_B.weight"] = ab["B"]
    return config, sd
