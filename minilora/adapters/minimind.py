"""MiniMind's adapter file: one `.pth` of `<path>.lora.A.weight` / `<path>.lora.B.weight`,
added unscaled (scale 1), on square layers only; read and written.

Read with `torch.load(weights_only=True)`: a pickle that needs code is refused. docs/formats.md
describes the format.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch
from torch import nn

from minilora.adapters.peft import PREFIX, check_tensors
from minilora.adapters.state import for_disk
from minilora.core.errors import AdapterError
from minilora.core.files import atomic_write, regular_file, torch_load_reason
from minilora.core.tensor_checks import check_written
from minilora.lora.config import LoraConfig
from minilora.lora.embedding import LoRAEmbedding
from minilora.lora.named import adapter_layers, extras_of

_MINIMIND_KEY_RE = re.compile(r"(.+)\.lora\.([AB])\.weight")
# How a caller asks for each format: the library's keywords; the command line has its words.
FORMAT_WORDS = {"peft_format": "format='peft'", "minimind_format": "format='minimind'"}


def read_minimind(path: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A MiniMind adapter .pth, read without a model.

    Returns:
        Its LoraConfig (r from the shapes, alpha = r so that the scaling is 1, targets the
        module paths in the keys) and its tensors under PEFT's keys.

    Raises:
        AdapterError: a file that is not a plain tensor dict of MiniMind LoRA keys with one
            rank, or whose tensors are not usable weights.
    """
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
    parts = _pairs(raw, path)
    ranks = {n: ab["A"].shape[0] for n, ab in parts.items()}
    bad = [f"{n}: A {tuple(ab['A'].shape)}, B {tuple(ab['B'].shape)}" for n, ab in parts.items()
           if ab["B"].shape[1] != ab["A"].shape[0]]
    if bad:
        raise AdapterError(f"{path}: A is (r, in) and B (out, r), but {bad}")
    if len(set(ranks.values())) != 1:
        raise AdapterError(f"{path}: modules have different ranks {ranks}; expected one r")
    check_tensors(raw, path)
    r = next(iter(ranks.values()))
    # MiniMind adds B(A(x)) unscaled: alpha = r gives scaling 1.
    config = LoraConfig(r=r, alpha=float(r), targets=sorted(parts), init="gaussian")
    sd = {}
    for name, ab in parts.items():
        sd[f"{PREFIX}{name}.lora_A.weight"] = ab["A"]
        sd[f"{PREFIX}{name}.lora_B.weight"] = ab["B"]
    return config, sd


def _pairs(raw: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module path -> {"A": A, "B": B}; every key a 2-D MiniMind LoRA weight, none alone."""
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
    return parts


def save_minimind(model: nn.Module, path: Path, dtype: torch.dtype | None, name: str) -> Path:
    """Writes adapter `name` of `model` as MiniMind's .pth at `path` (atomically), the
    scaling folded into B.

    Raises:
        AdapterError: `path` is a folder, the adapter is DoRA, has LoRA on an embedding, or it
            adapts a layer that is not square (MiniMind's apply_lora would drop it). The
            error's fields ``peft_format`` / ``minimind_format`` say how the caller asks for
            each format.
    """
    modules = adapter_layers(model, name)
    extras = extras_of(model, name)
    if extras:
        raise AdapterError(f"MiniMind's .pth holds LoRA A and B only; adapter {name!r} also "
                           f"trains {extras[0]} (modules to save or token rows): save it in "
                           "PEFT's format ({peft_format})", fields=FORMAT_WORDS)
    if path.is_dir():
        raise AdapterError(f"{path} is a folder; MiniMind's format ({{minimind_format}}) is one "
                           ".pth file", fields=FORMAT_WORDS)
    if name in modules[0][1].lora_magnitude_vector:
        raise AdapterError("MiniMind's format has no place for DoRA's magnitude vectors; save "
                           "a DoRA adapter in PEFT's format ({peft_format})", fields=FORMAT_WORDS)
    tables = [n for n, m in modules if isinstance(m, LoRAEmbedding)]
    if tables:
        raise AdapterError(f"MiniMind's apply_lora adds LoRA to Linear layers only and would "
                           f"drop the embedding's: {tables}; save it in PEFT's format "
                           "({peft_format})", fields=FORMAT_WORDS)
    not_square = [f"{n} ({m.in_features} -> {m.out_features})"
                  for n, m in modules if m.in_features != m.out_features]
    if not_square:
        raise AdapterError(
            "MiniMind's apply_lora adds LoRA to square layers only and would drop these: "
            f"{not_square}; save them in PEFT's format ({{peft_format}})", fields=FORMAT_WORDS
        )
    sd = {}
    for path_, m in modules:
        sd[f"{path_}.lora.A.weight"] = for_disk(m.lora_A[name].weight, dtype)
        # MiniMind computes B(A(x)) unscaled: fold the scaling into B.
        b = m.lora_B[name].weight.detach().float() * m.scaling[name]
        sd[f"{path_}.lora.B.weight"] = for_disk(b, dtype or m.lora_B[name].weight.dtype)
    check_written(sd, path, AdapterError)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(sd, buffer)  # in memory: a full disk is then an OSError of the write
    atomic_write(path, buffer.getvalue())
    return path
