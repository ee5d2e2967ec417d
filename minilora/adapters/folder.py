"""Adapters on disk: `load_adapter` and `save_adapter`, in PEFT's folder layout or MiniMind's .pth.

The formats live in their own files (minilora.adapters.peft, minilora.adapters.minimind), the
state-dict keys in adapters/state.py and the base fingerprint in lora/fingerprint.py; this
file puts them together: what to read, whether it fits the model, what to write, and undoing an
injection that does not fit.

A model may hold several named adapters (minilora.lora.named); each file holds one, without
its name in the keys. PEFT saves a model's non-default adapters into subfolders named after them:
`load_adapter(model, folder, name="b")` reads `folder/b` when it exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from minilora.adapters.minimind import FORMAT_WORDS, read_minimind, save_minimind
from minilora.adapters.peft import (
    BASE_LAYER_RE,
    CONFIG_NAME,
    FINGERPRINT_KEY,
    PREFIX,
    VERSION_KEY,
    WEIGHTS_NAME,
    find_adapters,
    peft_config_dict,
    read_peft,
)
from minilora.adapters.state import (
    adapter_state_dict,
    check_state_dict,
    copy_in,
    for_disk,
    load_adapter_state_dict,
)
from minilora.core.errors import AdapterError, ConfigError, FingerprintMismatch
from minilora.core.files import replace_folder
from minilora.core.tensor_checks import check_written
from minilora.lora.config import DEFAULT_ADAPTER, LoraConfig, check_adapter_name, matches
from minilora.lora.fingerprint import base_fingerprint
from minilora.lora.injection import inject_lora
from minilora.lora.layer import LoRALayer, lora_modules
from minilora.lora.named import (
    active_adapters,
    adapter_layers,
    delete_adapter,
    list_adapters,
    resolve_adapter,
    set_active,
)
from minilora.lora.saved_modules import saved_layers
from minilora.lora.trainable_tokens import input_embedding_name, token_layers
from minilora.lora.weight_hash import hash_weights

# The public names of the adapter files, importable from here as before the split.
__all__ = [
    "AdapterError", "FingerprintMismatch", "adapter_state_dict", "base_fingerprint",
    "find_adapters", "load_adapter", "load_adapter_state_dict", "resolve_adapter",
    "save_adapter",
]


# ---------------------------------------------------------------- reading


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    check_fingerprint: bool = True,
    name: str | None = None,
    verified: set[str] | None = None,
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
        verified: fingerprints already found equal to this model's base, kept by a caller
            whose base weights do not change (the server, which reads evicted adapters back):
            an adapter recording one of them is not hashed again, and one that matches is
            added. Hashing reads every base weight the adapter adapts (the whole model for an
            all-linear adapter), on every load.

    Returns:
        The adapter's LoraConfig (for a MiniMind file: r from the shapes, alpha = r, targets the
        module paths found in the keys).

    Raises:
        AdapterError: a bad name, missing or unreadable files, a pickle that needs code, a
            config minilora cannot honour, missing/unexpected/mis-shaped keys, or a fingerprint
            mismatch (FingerprintMismatch). When it raises, a LoRA injected by this call is
            removed again and the adapters active before the call are active again.
    """
    if name is not None:  # before path / name is read: "../x" must not reach another folder
        try:
            check_adapter_name(name)
        except ValueError as e:
            raise AdapterError(str(e)) from None
    found = _read_adapter(_adapter_path(Path(path), name))
    target = DEFAULT_ADAPTER if name is None else name
    injected, active = target not in list_adapters(model), active_adapters(model)
    if injected:
        _inject_for(model, found, target)
    try:
        _check_fits(model, found, target, check_fingerprint, verified)
    except AdapterError:
        if injected:  # B is still zero: this puts the model back exactly
            delete_adapter(model, target)
            set_active(model, active)
        raise
    copy_in(model, found.sd, found.config.scaling, target)
    return found.config


@dataclass
class _Found:
    """An adapter file as read, before it meets the model."""

    path: Path  # the folder or .pth
    source: str  # the file named in errors
    config: LoraConfig
    sd: dict[str, torch.Tensor]  # PEFT's keys
    metadata: dict[str, str]  # minilora's entries (fingerprint, version) in a folder it wrote
    base_layers: dict[str, torch.Tensor]  # PEFT's copies of adapted layers' base weights


def _read_adapter(path: Path) -> _Found:
    if path.is_dir():
        config, sd, metadata = read_peft(path)
        base_layers = {k: sd.pop(k) for k in list(sd) if BASE_LAYER_RE.fullmatch(k)}
        return _Found(path, str(path / WEIGHTS_NAME), config, sd, metadata, base_layers)
    if path.is_file():
        config, sd = read_minimind(path)
        return _Found(path, str(path), config, sd, {}, {})
    raise AdapterError(
        f"no adapter at {path}: expected a folder with {WEIGHTS_NAME} and {CONFIG_NAME}, "
        "or a MiniMind .pth file"
    )


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
                f"{path} holds adapters in subfolders {inside}: pass {{adapter_name}} (or the "
                "subfolder)", fields={"adapter_name": "name=..."}
            )
    return path


def _inject_for(model: nn.Module, found: _Found, target: str) -> None:
    """Adds adapter `target` shaped as `found` says (B zero: the model still computes its base)."""
    config = found.config
    try:
        # The base is already PiSSA's residual: injecting must not take its SVD again.
        inject_lora(model, replace(config, init="kaiming") if config.init == "pissa"
                    else config, name=target)
    except ValueError as e:
        raise AdapterError(_another_base(
            found, f"cannot apply {found.source} to this model: {e}")) from None
    for _, m in adapter_layers(model, target):
        m.init[target], m.lora_config[target] = config.init, config


def _check_fits(model: nn.Module, found: _Found, target: str, check_fingerprint: bool,
                verified: set[str] | None = None) -> None:
    """Raises AdapterError unless `found` fits adapter `target` of `model`: its keys and shapes,
    PEFT's base-layer copies, and (when asked) the base it was trained on (see load_adapter's
    `verified`)."""
    try:
        check_state_dict(model, found.sd, found.source, target)
    except AdapterError as e:
        if FINGERPRINT_KEY not in found.metadata:
            raise  # a foreign adapter: the keys are all there is to say
        # one line: which base it wants, and only the first key at fault (the whole list of a
        # model of another size is thousands of characters of the same news)
        raise AdapterError(_another_base(found, _first_key_problem(model, found, target),
                                         advise=True)) from e
    _check_base_layers(model, found.base_layers, found.source, target)
    recorded = found.metadata.get(FINGERPRINT_KEY)
    if check_fingerprint and recorded is not None and recorded not in (verified or ()):
        # (the fingerprint covers the adapted layers' names and shapes too: one recorded value
        # is one set of layers)
        actual = base_fingerprint(model, target)
        if actual != recorded:
            raise FingerprintMismatch(
                f"{found.source} was trained on another base model (fingerprint {recorded}, "
                f"this model's {actual})"
            )
        if verified is not None:
            verified.add(actual)


def _check_base_layers(
    model: nn.Module, base_layers: dict[str, torch.Tensor], source: str, name: str
) -> None:
    """PEFT's copies of adapted layers' base weights must equal the model's: PEFT would load
    them over the base, minilora leaves base weights alone."""
    layers = {f"{PREFIX}{p}": m for p, m in adapter_layers(model, name)}
    problems = []
    for key, saved in sorted(base_layers.items()):
        m = BASE_LAYER_RE.fullmatch(key)
        assert m is not None  # base_layers holds only the keys this pattern matched
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


def _another_base(found: _Found, message: str, advise: bool = False) -> str:
    """An adapter minilora wrote (it records its base) that does not fit the model was trained on
    another base: say so first, before the key at fault; ``advise``: and end with the base to
    load it on."""
    if FINGERPRINT_KEY not in found.metadata:
        return message  # a foreign adapter: the keys are all there is to say
    base = recorded_base(found.path)
    named = f" ({base})" if base else ""
    detail = message.removeprefix(f"{found.source} does not fit the model: ")
    hint = f"; load it on {base}" if advise and base else ""
    return (f"{found.source} was trained on another base{named}; it does not fit this model: "
            f"{detail}{hint}")


def _first_key_problem(model: nn.Module, found: _Found, target: str) -> str:
    """Each kind of key at fault (missing, unexpected, mis-shaped, as check_state_dict names
    them) with its first key and how many more there are."""
    expected = {k: tuple(v.shape) for k, v in adapter_state_dict(model, target).items()}
    kinds = {
        "missing keys": sorted(set(expected) - set(found.sd)),
        "unexpected keys": sorted(set(found.sd) - set(expected)),
        "mis-shaped keys": [f"{k}: file {tuple(found.sd[k].shape)}, model {expected[k]}"
                            for k in sorted(set(found.sd) & set(expected))
                            if tuple(found.sd[k].shape) != expected[k]],
    }
    return "; ".join(f"{kind} [{keys[0]}" + (f"; and {len(keys) - 1} more" if len(keys) > 1
                                              else "") + "]"
                     for kind, keys in kinds.items() if keys) or "non-floating-point tensors"


def recorded_base(path: str | os.PathLike[str]) -> str | None:
    """The base an adapter folder's adapter_config.json names (``base_model_name_or_path``), or
    None when it names none or cannot be read (the loader reports that)."""
    try:
        base = json.loads((Path(path) / CONFIG_NAME).read_text(encoding="utf-8")).get(
            "base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) and base else None


# ---------------------------------------------------------------- writing


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    format: str = "peft",
    base_model_name_or_path: str | None = None,
    name: str | None = None,
    pissa_initial: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
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
        pissa_initial: the folder this PiSSA adapter was saved to before training (or its
            ``adapter_state_dict`` then, held in memory): the file
            written is then a plain LoRA adapter of rank 2r for the original base model (not
            the residual), as PEFT's path_initial_model_for_weight_conversion writes it.
        tensors: the adapter's weights under the keys ``adapter_state_dict`` gives, whole, for
            a model whose own weights are sharded across processes (FSDP: each process holds
            a shard, the caller gathers them); default: the model's (format="peft" only).

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
        return save_minimind(model, path, dtype, name)
    if path.exists() and not path.is_dir():
        raise AdapterError(f"{path} is a file; PEFT's format ({{peft_format}}) is a folder",
                           fields=FORMAT_WORDS)
    config, fingerprint = _model_config(model, name), base_fingerprint(model, name)
    tensors = _whole(adapter_state_dict(model, name), tensors, path)
    if pissa_initial is not None:
        config, tensors, fingerprint = _pissa_to_lora(model, name, config, tensors,
                                                      pissa_initial)
    metadata = {"format": "pt", FINGERPRINT_KEY: fingerprint, VERSION_KEY: _version()}
    tensors = {k: for_disk(v, dtype) for k, v in tensors.items()}
    check_written(tensors, path, AdapterError)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None)
    if base_model_name_or_path and Path(base_model_name_or_path).exists():
        # a local base: absolute, so the adapter finds it from any folder (a hub id, which is
        # no local path, is written as it is)
        base_model_name_or_path = str(Path(base_model_name_or_path).absolute())
    peft_config = peft_config_dict(config, _peft_targets(model, name), base_model_name_or_path)
    _check_replaceable(path)
    return _replace_adapter_folder(path, safetensors_bytes(tensors, metadata=metadata),
                         json.dumps(peft_config, indent=2, allow_nan=False) + "\n")


def _whole(own: dict[str, torch.Tensor], given: Mapping[str, torch.Tensor] | None,
           path: Path) -> dict[str, torch.Tensor]:
    """The model's own adapter weights, or the gathered ones given for them (same keys and
    shapes: a gathered state of another model is refused)."""
    if given is None:
        return own
    wrong = sorted(set(own) ^ set(given)) + sorted(
        k for k in own if k in given and tuple(given[k].shape) != tuple(own[k].shape))
    if wrong:
        raise AdapterError(f"{path}: the gathered adapter weights do not fit the model: "
                           f"{wrong[:5]}")
    return dict(given)


def _replace_adapter_folder(path: Path, blob: bytes, text: str) -> Path:
    """The adapter folder at `path` replaced as a whole (the named adapters inside kept): a
    reader (or a crash) sees the old adapter or the new one, never new weights beside an old
    config."""
    def write(folder: Path) -> None:
        (folder / WEIGHTS_NAME).write_bytes(blob)
        (folder / CONFIG_NAME).write_text(text, encoding="utf-8")
        for name, sub in find_adapters(path).items():  # PEFT's layout: named ones inside
            if sub != path:
                shutil.copytree(sub, folder / name)

    return replace_folder(path, write)


def _model_config(model: nn.Module, name: str) -> LoraConfig:
    """The one LoraConfig that describes adapter `name` on every layer (targets resolved
    later)."""
    layers = adapter_layers(model, name)

    def shape(m: LoRALayer) -> tuple[Any, ...]:
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
        modules_to_save=[p for p, m in saved_layers(model) if name in m.modules_to_save],
        trainable_token_indices=_token_indices(model, name),
    )


def _token_indices(model: nn.Module, name: str) -> list[int] | dict[str, list[int]]:
    """Adapter `name`'s trainable tokens as PEFT's config writes them: the ids alone when they
    are the input embedding's only (a tied head follows it), else module path -> ids."""
    own = {p: m.token_indices(name) for p, m in token_layers(model)
           if m.tied_to is None and name in m.adapters}
    if len(own) == 1:
        try:
            if input_embedding_name(model) in own:
                return next(iter(own.values()))
        except ConfigError:  # no single input embedding: name the module
            pass
    return own


def _base_module_names(model: nn.Module) -> list[str]:
    """Module names as PEFT sees the base model: LoRA's own submodules left out."""
    inside = [n + "." for n, _ in lora_modules(model)]
    inside += [n + ".modules_to_save." for n, _ in saved_layers(model)]  # the trained copies
    return [n for n, _ in model.named_modules() if n and not n.startswith(tuple(inside))]


def _peft_targets(model: nn.Module, name: str) -> list[str]:
    """target_modules naming exactly the layers of adapter `name`, as PEFT records what it
    adapted: their last names when those select exactly these layers here, else their full
    paths. Never the user's own list or regex: on another model of the same weights (the
    transformers one) it may also match modules PEFT cannot adapt (Llama's `mlp.act_fn`)."""
    injected = {p for p, _ in adapter_layers(model, name)}
    short = sorted({n.rsplit(".", 1)[-1] for n in injected})
    chosen = {n for n in _base_module_names(model) if matches(n, short)}
    return short if chosen == injected else sorted(injected)


def _pissa_to_lora(
    model: nn.Module, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor],
    initial: str | os.PathLike[str] | Mapping[str, torch.Tensor],
) -> tuple[LoraConfig, dict[str, torch.Tensor], str]:
    """A trained PiSSA adapter as a plain LoRA of rank 2r on the original base (PEFT's
    path_initial_model_for_weight_conversion): s B A - s B0 A0 = s' [B, -B0] [A; A0] with
    s' = s, and the original weight W_res + s B0 A0 is what the fingerprint hashes."""
    if config.init != "pissa" or config.use_dora:
        raise AdapterError(f"pissa_initial: adapter {name!r} is not a PiSSA LoRA adapter "
                           f"(init {config.init!r}, use_dora {config.use_dora})")
    start = (dict(initial) if isinstance(initial, Mapping)
             else read_peft(Path(initial), initial_pissa=True)[1])
    if {k: tuple(v.shape) for k, v in start.items()} != {
            k: tuple(v.shape) for k, v in tensors.items()}:
        where = "pissa_initial" if isinstance(initial, Mapping) else initial
        raise AdapterError(f"{where}: not the initial state of adapter {name!r} (its keys or "
                           "shapes differ)")
    out: dict[str, torch.Tensor] = {}
    original: dict[str, torch.Tensor] = {}
    for path, m in adapter_layers(model, name):
        a, b = f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"
        a0, b0 = start[a].to(tensors[a].dtype), start[b].to(tensors[b].dtype)
        out[a] = torch.cat([tensors[a], a0])  # (2r, in)
        out[b] = torch.cat([tensors[b], -b0], dim=1)  # (out, 2r)
        w = m.weight.detach().float() + config.scaling * (b0.float() @ a0.float())
        original[path] = w.to(m.weight.dtype)
    alpha = config.alpha * (2 ** 0.5 if config.use_rslora else 2)
    plain = replace(config, r=2 * config.r, alpha=alpha, init="kaiming")
    # The fingerprint of the weights before the init, recorded by inject_lora; W_res + s B0 A0
    # rebuilt here can round differently in a few places, which would refuse the true base.
    recorded = next((m.pissa_from[name] for _, m in adapter_layers(model, name)
                     if name in m.pissa_from), None)
    return plain, out, recorded or hash_weights(original)


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


def _version() -> str:
    import minilora  # here, not at the top: minilora/__init__ imports this module

    return str(getattr(minilora, "__version__", "unknown"))
