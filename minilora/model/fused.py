"""Fused projections: sibling Linears that read the same input run as one matrix product.

The attention's q/k/v and the MLP's gate/up read one input each. `project(modules, x)` returns
what each module returns for x, computed as one product with the weights concatenated for the
call (`[W_q; W_k; W_v]`), and, where the modules carry LoRA adapters, the adapters' down
projections stacked into one product too (`x [A_q; A_v]^T`), each B applied to its slice. The
modules stay as they are (same names, same Parameters, same state_dict): nothing is stored
fused, so loading, saving, merging and tying see the per-module weights only.

Memory: the concatenated weight exists for the call only. In float32 it is one layer's q/k/v (or
gate/up) weights, freed when the product is done; backward reads the per-module weights, so no
concatenated copy is held through the step. Under autocast the weights are cast into one
low-precision buffer, which is the copy autocast makes of each weight anyway.

The product is minilora.core.lowrank's kernel, the one a single LoRA layer runs too (a layer is
the group of one); its dtype under autocast is that module's `compute_dtype`.

This module knows nothing of LoRA. A module fuses when it is a plain `nn.Linear` or implements
`fused_parts(x)`, returning `(weight, bias, adapter)` with adapter `(A, B, scale)` or None (the
base alone), or None when it must run its own forward (see minilora.lora.layer.LoRALinear).
Anything else makes the whole group run module by module, exactly as without fusion: a module
with hooks, a trainable base weight, mixed dtypes or devices.

Whether a model fuses is the model's own setting: each module that calls `project` (attention,
MLP) has a `fuse_projections` attribute (True by default), which `set_fused_projections(model,
False)` turns off for every such module of a model, and `fused_projections(model, False)` for
a block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from minilora.core.lowrank import AUTOCAST_FROM, compute_dtype, lowrank_linear

# One module of a group: (weight, bias, (A, B, scaling) of its one adapter or None), as the
# fused_parts protocol returns it.
Part = tuple[Tensor, Tensor | None, tuple[Tensor, Tensor, float] | None]

_PLAIN = (torch.Tensor, nn.Parameter)


def set_fused_projections(model: nn.Module, enabled: bool) -> None:
    """Turns fused projections on or off for every module of `model` that has them.

    Args:
        model: a model (or any module) whose attention / MLP modules call `project`.
        enabled: False runs every projection as its own module call.
    """
    for m in model.modules():
        if hasattr(m, "fuse_projections"):
            setattr(m, "fuse_projections", bool(enabled))  # noqa: B010  (a module attribute)


@contextmanager
def fused_projections(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Inside the block `model`'s projections fuse or not as `enabled` says; each module's
    setting is put back after it."""
    before = [(m, m.fuse_projections) for m in model.modules() if hasattr(m, "fuse_projections")]
    set_fused_projections(model, enabled)
    try:
        yield model
    finally:
        for m, on in before:
            m.fuse_projections = on


def project(modules: Sequence[nn.Module], x: Tensor, fuse: bool = True) -> list[Tensor]:
    """Each module applied to x: `[m(x) for m in modules]`, computed as one product when the
    modules can fuse (see the module docstring), else by calling each.

    Args:
        modules: sibling projections reading x, e.g. (q_proj, k_proj, v_proj).
        x: (..., in) their input.
        fuse: False calls each module (the caller's `fuse_projections`).

    Returns:
        One (..., out_i) tensor per module, views into one output when fused.
    """
    parts = _fusable_parts(modules, x) if fuse and len(modules) > 1 else None
    dt = _compute_dtype(parts, x) if parts is not None else None
    if parts is None or dt is None:
        return [m(x) for m in modules]
    weights, biases, adapters = zip(*parts, strict=True)
    return list(lowrank_linear(x, weights, biases, adapters, dt))


# ------------------------------------------------------------------------------------------------
# Which groups fuse
# ------------------------------------------------------------------------------------------------


def _has_hooks(m: nn.Module) -> bool:
    """Whether a hook would see or change this module's call."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks or _nn_module._global_forward_hooks
                or _nn_module._global_forward_pre_hooks or _nn_module._global_backward_hooks)


def _fusable_parts(modules: Sequence[nn.Module], x: Tensor) -> list[Part] | None:
    """(weight, bias, adapter) of each module, or None when one of them cannot fuse."""
    parts: list[Part] = []
    for m in modules:
        if _has_hooks(m):
            return None
        if type(m) is nn.Linear:
            part = (m.weight, m.bias, None)
        elif (fused_parts := getattr(m, "fused_parts", None)) is not None:  # a LoRALinear's
            part = fused_parts(x)
            if part is None:
                return None
        else:
            return None
        weight, bias, _ = part
        if type(weight) not in _PLAIN or (bias is not None and type(bias) not in _PLAIN):
            return None  # a tensor subclass (a quantized weight) computes its own product
        grad = torch.is_grad_enabled()
        if grad and (weight.requires_grad or (bias is not None and bias.requires_grad)):
            return None  # full fine-tuning: each module's own autograd computes its gradient
        parts.append(part)
    return parts


def _compute_dtype(parts: list[Part], x: Tensor) -> torch.dtype | None:
    """The dtype the group computes in (what each module would), or None: unfused."""
    tensors = [t for w, b, ad in parts for t in (w, b, *(ad[:2] if ad else ())) if t is not None]
    if any(t.device != x.device for t in tensors):
        return None
    dtypes = {p[0].dtype for p in parts} | {p[1].dtype for p in parts if p[1] is not None}
    if len(dtypes) != 1:
        return None
    (w_dtype,) = dtypes
    if w_dtype not in AUTOCAST_FROM:
        return None  # float64 (gradient checks): module by module, no group to gain from
    if len({t.dtype for _, _, ad in parts if ad for t in ad[:2]}) > 1:
        return None
    return compute_dtype(x, w_dtype)
