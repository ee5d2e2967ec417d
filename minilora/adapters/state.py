"""One adapter's weights as a state dict under PEFT's keys, out of a model and back into it.

A model may hold several named adapters (minilora.lora.named); a state dict holds one,
without its name in the keys (`base_model.model.<path>.lora_A.weight`), as its file does.
"""

from __future__ import annotations

import torch
from torch import nn

from minilora.adapters.peft import EMBEDDING_KEYS, MAGNITUDE_KEY, PREFIX
from minilora.core.errors import AdapterError
from minilora.lora.embedding import LoRAEmbedding
from minilora.lora.layer import LoRALayer, lora_modules
from minilora.lora.named import adapter_layers, resolve_adapter
from minilora.lora.saved_modules import saved_layers
from minilora.lora.trainable_tokens import DELTA, TOKEN_ADAPTER, token_layers


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """Returns one adapter's LoRA weights under PEFT's keys (the adapter's name not in them).

    Args:
        model: a model with LoRA.
        name: which adapter (default: the only one, or the only active one).

    Returns:
        `{"base_model.model.<path>.lora_A.weight": (r, in), "...lora_B.weight": (out, r)}`
        (an embedding's: `...lora_embedding_A` (r, num_embeddings), `...lora_embedding_B`
        (embedding_dim, r)), detached tensors sharing memory with the Parameters.

    Raises:
        AdapterError: when the model has no LoRA or `name` is unknown or ambiguous.
    """
    name = resolve_adapter(model, name, "save")
    sd = {}
    for path, m in adapter_layers(model, name):
        a_key, b_key = ab_keys(path, m)
        sd[a_key] = m.lora_A[name].weight.detach()
        sd[b_key] = m.lora_B[name].weight.detach()
        if name in m.lora_magnitude_vector:
            sd[f"{PREFIX}{path}.{MAGNITUDE_KEY}"] = m.lora_magnitude_vector[name].detach()
    sd.update(extra_state_dict(model, name))
    return sd


def extra_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s modules to save and trainable tokens under PEFT's file keys: each
    copy's own state_dict under the module's path (``base_model.model.lm_head.weight``), the
    rows under ``<path>.token_adapter.trainable_tokens_delta`` (a tied head's are its
    embedding's, saved once)."""
    sd = {}
    for path, saved in saved_layers(model):
        if name in saved.modules_to_save:
            for k, v in saved.modules_to_save[name].state_dict().items():
                sd[f"{PREFIX}{path}.{k}"] = v.detach()
    for path, tokens in token_layers(model):
        if tokens.tied_to is None and name in tokens.adapters:
            sd[f"{PREFIX}{path}.{TOKEN_ADAPTER}.{DELTA}"] = tokens.delta(name).detach()
    return sd


def ab_keys(path: str, m: LoRALayer) -> tuple[str, str]:
    """The file's keys of A and B of the layer at `path`: PEFT's `lora_A.weight` /
    `lora_B.weight`, or an embedding's `lora_embedding_A` / `lora_embedding_B`."""
    if isinstance(m, LoRAEmbedding):
        return f"{PREFIX}{path}.{EMBEDDING_KEYS[0]}", f"{PREFIX}{path}.{EMBEDDING_KEYS[1]}"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


def check_state_dict(
    model: nn.Module, sd: dict[str, torch.Tensor], source: str, name: str
) -> None:
    """Raises one AdapterError naming every missing, unexpected and mis-shaped key of `sd`
    (read from `source`) against adapter `name` of `model`."""
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
            f" for the model's LoRA modules, lora_embedding_A / _B for an embedding's, "
            f"<module>.weight for a module saved whole, "
            f"<module>.token_adapter.trainable_tokens_delta for token rows)"
        )
    if shapes:
        problems.append(f"mis-shaped keys [{'; '.join(shapes)}]")
    if not_float:
        problems.append(f"non-floating-point tensors {not_float}")
    if problems:
        raise AdapterError(f"{source} does not fit the model: " + "; ".join(problems))


def copy_in(
    model: nn.Module, sd: dict[str, torch.Tensor], scaling: float | None, name: str
) -> None:
    """Copies A and B of a checked `sd` into adapter `name` in place (the Parameters stay the
    same objects); B is rescaled when the file was saved with another scaling than the layer
    uses, so the adapter computes what it computed."""
    with torch.no_grad():
        for path, m in adapter_layers(model, name):
            a_key, b_key = ab_keys(path, m)
            m.lora_A[name].weight.copy_(sd[a_key])
            b = sd[b_key]
            if scaling is not None and scaling != m.scaling[name]:
                b = b.float() * (scaling / m.scaling[name])
            m.lora_B[name].weight.copy_(b)
            if name in m.lora_magnitude_vector:
                m.lora_magnitude_vector[name].copy_(sd[f"{PREFIX}{path}.{MAGNITUDE_KEY}"])
            if not isinstance(m, LoRAEmbedding):  # a Linear's stacked adapters (mixed
                m.weights_changed()  # batches) are read again
        for key, own in extra_state_dict(model, name).items():
            own.copy_(sd[key])  # the Parameters' (and buffers') own memory


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
    check_state_dict(model, sd, "the state dict", name)
    copy_in(model, sd, None, name)


def for_disk(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`t` as written to a file: detached, on the CPU, contiguous, in `dtype` if given."""
    return t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()
